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


def test_direct_path_only_without_gradient_subclass_or_compile():
    x = torch.ones(2, 3)
    assert not _registry.needs_dispatcher((x, 1.0, "torch", None))
    leaf = x.clone().requires_grad_()
    assert _registry.needs_dispatcher((leaf,))
    with torch.no_grad():
        assert not _registry.needs_dispatcher((leaf,))
    assert not _registry.needs_dispatcher((torch.nn.Parameter(x, requires_grad=False),))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert _registry.needs_dispatcher((fake,))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_both_paths_give_the_same_result(requires_grad):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 12, generator=gen).to(DEVICE).requires_grad_(requires_grad)
    w = torch.randn(12, generator=gen).to(DEVICE)
    direct_or_not = _registry.call("rms_norm_fwd", x, w, None, 1e-6, "torch")
    dispatched = torch.ops.thinkfuse.rms_norm_fwd(x, w, None, 1e-6, "torch")
    for a, b in zip(direct_or_not, dispatched):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert direct_or_not[0].requires_grad == requires_grad
