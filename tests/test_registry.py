"""ops._registry.call: the direct eager path of the custom ops, and when it must not be taken."""

import pytest
import torch
from conftest import DEVICE
from torch._subclasses.fake_tensor import FakeTensorMode

import thinkfuse  # noqa: F401  (registers the ops)
from thinkfuse.ops import _registry


def test_every_recorded_body_is_a_registered_custom_op():
    assert {"rms_norm_fwd", "rope_fwd", "swiglu_fwd", "token_logprobs_fwd"} <= set(_registry._BODIES)
    for name in _registry._BODIES:
        assert hasattr(torch.ops.thinkfuse, name), name


def test_dispatcher_only_for_subclasses_compile_and_func_transforms():
    x = torch.ones(2, 3)
    assert not _registry.needs_dispatcher((x, 1.0, "torch", None))
    leaf = x.clone().requires_grad_()
    assert not _registry.needs_dispatcher((leaf,))  # autograd has its own direct path
    assert _registry.records_gradient((leaf,))
    with torch.no_grad():
        assert not _registry.records_gradient((leaf,))
    assert not _registry.records_gradient((torch.nn.Parameter(x, requires_grad=False),))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert _registry.needs_dispatcher((fake,))

    seen = []
    torch.func.grad(lambda t: seen.append(_registry.needs_dispatcher((t,))) or t.sum())(x)
    assert seen == [True]


def test_every_op_with_a_gradient_has_a_direct_autograd_function():
    assert set(_registry._AUTOGRAD_FUNCTIONS) == {
        "rms_norm_fwd", "swiglu_fwd", "swiglu_fused_fwd", "rope_fwd", "apply_rotary_fwd", "token_logprobs_fwd",
        "fused_linear_logprobs_fwd", "flash_attention_fwd",
    }


def _rms_norm_inputs(requires_grad):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 12, generator=gen).to(DEVICE).requires_grad_(requires_grad)
    w = torch.randn(12, generator=gen).to(DEVICE).requires_grad_(requires_grad)
    return x, w


@pytest.mark.parametrize("requires_grad", [False, True])
def test_both_paths_give_the_same_result(requires_grad):
    x, w = _rms_norm_inputs(requires_grad)
    direct_or_not = _registry.call("rms_norm_fwd", x, w, None, 1e-6, "torch")
    dispatched = torch.ops.thinkfuse.rms_norm_fwd(x, w, None, 1e-6, "torch")
    for a, b in zip(direct_or_not, dispatched):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert direct_or_not[0].requires_grad == requires_grad


def test_direct_autograd_path_gives_the_dispatchers_gradients():
    x, w = _rms_norm_inputs(True)
    dy = torch.randn(5, 12, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y, _, _ = _registry.call("rms_norm_fwd", x, w, None, 1e-6, "torch")
    assert type(y.grad_fn).__name__.startswith("thinkfuse_rms_norm_fwd")  # not the dispatcher's
    direct = torch.autograd.grad(y, (x, w), dy)
    y_dispatched, _, _ = torch.ops.thinkfuse.rms_norm_fwd(x, w, None, 1e-6, "torch")
    assert "GeneratedBackwardFor" in type(y_dispatched.grad_fn).__name__
    dispatched = torch.autograd.grad(y_dispatched, (x, w), dy)
    for a, b in zip(direct, dispatched):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_direct_autograd_path_respects_needs_input_grad():
    x, w = _rms_norm_inputs(True)
    y, _, _ = _registry.call("rms_norm_fwd", x, w.detach(), None, 1e-6, "torch")
    (dx,) = torch.autograd.grad(y.sum(), (x,))
    assert dx.shape == x.shape and w.grad is None


def test_forward_mode_ad_is_a_clear_error_on_kernel_backends():
    """Custom ops without a forward-mode formula drop tangents silently (torch.func.jvp gave
    zeros): the kernel backends refuse instead; the torch backend differentiates forward."""
    x = torch.randn(3, 8, device=DEVICE)
    weight, tangent = torch.randn(8, device=DEVICE), torch.randn(3, 8, device=DEVICE)

    def norm(backend):
        return lambda t: thinkfuse.ops.rms_norm(t, weight, backend=backend)

    expected = torch.func.jvp(lambda t: thinkfuse.reference.rms_norm(t, weight), (x,), (tangent,))[1]
    torch.testing.assert_close(torch.func.jvp(norm("torch"), (x,), (tangent,))[1], expected)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(norm("triton"), (x,), (tangent,))
    import torch.autograd.forward_ad as forward_ad

    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        norm("triton")(forward_ad.make_dual(x, tangent))
