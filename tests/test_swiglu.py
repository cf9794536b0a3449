"""thinkfuse.ops.swiglu / swiglu_fused: every backend against reference.py, reference.py against
transformers' MLP activation, forward and gradients, dtypes, odd sizes, strides, bad inputs,
custom-op registration and torch.compile."""


import pytest
import torch
from conftest import DEVICE, KERNEL_BACKENDS
from strided_helpers import spy_on_op_calls, strided_leaf
from tolerances import ULP, assert_close_fp32, assert_low_precision_ok, assert_no_scale_bias
from transformers.activations import ACT2FN

import thinkfuse
from thinkfuse import reference
from thinkfuse.ops import swiglu, swiglu_fused

# intermediate sizes: tiny-model 160, a non-power-of-two 1000, an odd 997, one wider than a block
SIZES = [160, 1000, 997, 2100]


def _gate_up(rows, size, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple((3 * torch.randn(rows, size, generator=gen)).to(DEVICE, dtype) for _ in range(2))


def _run(fn, inputs, seed=1):
    """Forward and the gradients of a fixed random projection of the output w.r.t. ``inputs``."""
    leaves = [strided_leaf(t) for t in inputs]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    (out.double() * torch.randn(out.shape, generator=gen).to(out.device, torch.float64)).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def _split_fn(backend):
    return lambda gate, up: swiglu(gate, up, backend=backend)


def _fused_fn(backend):
    """swiglu_fused on ``cat(gate, up)``: its gradients are compared as the two halves."""
    def fn(gate, up):
        return swiglu_fused(torch.cat([gate, up], dim=-1), backend=backend)
    return fn


FORMS = {"split": _split_fn, "fused": _fused_fn}


def _truth(gate, up):
    return reference.swiglu(gate.double(), up.double())


# --- reference.py against transformers -----------------------------------------------------------


def test_reference_matches_transformers_activation_in_float32():
    """Forward and the gradients w.r.t. gate and up."""
    gate, up = _gate_up(7, 96, torch.float32)
    dy = torch.randn(gate.shape, generator=torch.Generator().manual_seed(5)).to(gate.device)
    results = []
    for fn in (reference.swiglu, lambda g, u: ACT2FN["silu"](g) * u):
        leaves = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
        out = fn(*leaves)
        results.append([out.detach(), *torch.autograd.grad(out, leaves, dy)])
    for ours, hf in zip(*results):
        torch.testing.assert_close(ours, hf, rtol=1e-6, atol=1e-6)


def test_reference_rounds_once_where_transformers_rounds_twice():
    """In bfloat16, eager rounds silu(gate) first: at most one ulp apart, and never less exact."""
    gate, up = _gate_up(64, 256, torch.bfloat16)
    ours, hf = reference.swiglu(gate, up), ACT2FN["silu"](gate) * up
    truth = _truth(gate, up)
    torch.testing.assert_close(ours.float(), hf.float(), rtol=2 * ULP[torch.bfloat16], atol=1e-2)
    assert (ours.double() - truth).abs().max() <= (hf.double() - truth).abs().max()


# --- every backend against the reference ---------------------------------------------------------


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("rows", [1, 5])
def test_fp32_matches_reference(kernel_backend, form, size, rows):
    gate, up = _gate_up(rows, size, torch.float32)
    ours = _run(FORMS[form](kernel_backend), [gate, up])
    ref = _run(reference.swiglu, [gate, up])
    for o, r in zip(ours, ref):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert_close_fp32(o, r)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("size", [160, 997])
def test_low_precision_vs_float64_truth(backend, dtype, form, size):
    gate, up = _gate_up(6, size, dtype)
    hf_mlp = lambda g, u: ACT2FN["silu"](g) * u  # noqa: E731  transformers' eager rounding
    for ours, hf, truth in zip(_run(FORMS[form](backend), [gate, up]), _run(hf_mlp, [gate, up]),
                               _run(_truth, [gate, up])):
        assert_low_precision_ok(ours, hf, truth)
        assert_no_scale_bias(ours, truth)


def _strided_inputs():
    """(id, gate, up, the row strides the op reads gate and up with)."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(4, 6, 2 * 150, generator=gen)
    yield "column-slices", base[..., :150], base[..., 150:], (300, 300)  # read in place
    yield "transposed", base[..., :150].transpose(0, 1), base[..., 150:].transpose(0, 1), (150, 150)  # copied
    yield "every-other-column", base[..., ::2], base[..., 1::2], (150, 150)  # unit stride lost: copied
    yield "expanded", torch.randn(1, 150, generator=gen).expand(5, 150), torch.randn(5, 150, generator=gen), (0, 150)


@pytest.mark.parametrize("case", list(_strided_inputs()), ids=lambda c: c[0])
def test_strided_inputs(kernel_backend, case, monkeypatch):
    _, gate, up, (gate_stride, up_stride) = case
    gate, up = gate.to(DEVICE), up.to(DEVICE)
    before = gate.clone(), up.clone()
    seen = spy_on_op_calls(monkeypatch, "thinkfuse.ops.swiglu")
    ours = _run(_split_fn(kernel_backend), [gate, up])
    # forward and backward read gate and up with their strides
    for op in ("swiglu_fwd", "swiglu_bwd"):
        assert seen[op][-3:-1] == [(gate_stride, 1), (up_stride, 1)], (op, seen[op])
    ref = _run(reference.swiglu, [gate, up])
    assert torch.equal(gate, before[0]) and torch.equal(up, before[1]), "swiglu wrote into its inputs"
    for o, r in zip(ours, ref):
        assert o.shape == r.shape
        assert_close_fp32(o, r)


def test_fused_reads_a_strided_projection_output_and_leading_dims(kernel_backend, monkeypatch):
    """gate_up as a merged projection's [B, S, 2I] output, sliced out of a wider buffer."""
    wide = torch.randn(2, 3, 2 * 97 + 11, device=DEVICE)
    gate_up = wide[..., : 2 * 97]
    seen = spy_on_op_calls(monkeypatch, "thinkfuse.ops.swiglu")
    ours = _run(lambda x: swiglu_fused(x, backend=kernel_backend), [gate_up])
    assert seen["swiglu_fused_fwd"][0] == seen["swiglu_fused_bwd"][1] == (2 * 97 + 11, 1)  # read in place
    ref = _run(lambda x: reference.swiglu(*x.chunk(2, dim=-1)), [gate_up])
    assert ours[0].shape == (2, 3, 97)
    for o, r in zip(ours, ref):
        assert_close_fp32(o, r)


@pytest.mark.parametrize("form", list(FORMS))
def test_row_strided_output_gradient(kernel_backend, form, monkeypatch):
    """dy read with its row stride: ``torch.cat([swiglu(g, u), other], -1)`` hands the backward
    a slice of its gradient."""
    gate, up = _gate_up(4, 150, torch.float32)
    other = torch.randn(4, 150, device=DEVICE)
    dy = torch.randn(4, 300, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    seen = spy_on_op_calls(monkeypatch, "thinkfuse.ops.swiglu")
    results = []
    for fn in (FORMS[form](kernel_backend), reference.swiglu):
        leaves = [strided_leaf(gate), strided_leaf(up)]
        results.append(torch.autograd.grad(torch.cat([fn(*leaves), other], -1), leaves, dy))
    assert seen[{"split": "swiglu_bwd", "fused": "swiglu_fused_bwd"}[form]][0] == (300, 1)
    for ours, ref in zip(*results):
        assert_close_fp32(ours, ref)


def test_empty_rows(backend):
    gate = torch.empty(0, 64, device=DEVICE, requires_grad=True)
    y = swiglu(gate, torch.empty(0, 64, device=DEVICE), backend=backend)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert gate.grad.shape == (0, 64)
    assert swiglu_fused(torch.empty(2, 0, 128, device=DEVICE), backend=backend).shape == (2, 0, 64)


# --- bad inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(gate=[1.0]), TypeError, "gate must be a torch.Tensor"),
        (dict(gate=torch.ones(2, 8, dtype=torch.int32)), TypeError, "gate must have dtype"),
        (dict(up=torch.ones(2, 7)), ValueError, "up shape"),
        (dict(up=torch.ones(2, 8, dtype=torch.float16)), TypeError, "up dtype"),
        (dict(up=torch.ones(2, 8, device="meta")), ValueError, "up is on meta"),
        (dict(gate=torch.ones(()), up=torch.ones(())), ValueError, "at least 1 dims"),
        (dict(gate=torch.ones(2, 0), up=torch.ones(2, 0)), ValueError, "non-empty last dim"),
    ],
)
def test_bad_inputs_raise_before_any_kernel(backend, kwargs, error, match):
    args = dict(gate=torch.ones(2, 8), up=torch.ones(2, 8))
    args.update(kwargs)
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v)
            for k, v in args.items()}
    with pytest.raises(error, match=match):
        swiglu(args["gate"], args["up"], backend=backend)


@pytest.mark.parametrize(
    "gate_up,error,match",
    [
        (torch.ones(2, 7), ValueError, "last dim must be even"),
        (torch.ones(2, 0), ValueError, "last dim must be even and non-zero"),
        (torch.ones(2, 8, dtype=torch.int64), TypeError, "gate_up must have dtype"),
        ("gate_up", TypeError, "gate_up must be a torch.Tensor"),
    ],
)
def test_fused_bad_inputs_raise(backend, gate_up, error, match):
    with pytest.raises(error, match=match):
        swiglu_fused(gate_up.to(DEVICE) if isinstance(gate_up, torch.Tensor) else gate_up, backend=backend)


# --- torch.library registration and torch.compile ----------------------------------------------


def test_custom_ops_pass_opcheck(backend):
    gate, up = _gate_up(3, 20, torch.float32)
    gate_up = torch.cat([gate, up], dim=-1)
    torch.library.opcheck(torch.ops.thinkfuse.swiglu_fwd.default, (gate.requires_grad_(), up.requires_grad_(), backend))
    torch.library.opcheck(torch.ops.thinkfuse.swiglu_bwd.default, (up.detach(), gate.detach(), up.detach(), backend))
    torch.library.opcheck(torch.ops.thinkfuse.swiglu_fused_fwd.default, (gate_up.requires_grad_(), backend))
    torch.library.opcheck(torch.ops.thinkfuse.swiglu_fused_bwd.default, (gate.detach(), gate_up.detach(), backend))


def test_custom_ops_torch_forms_match_the_kernels(kernel_backend):
    gate, up = _gate_up(3, 45, torch.float32)
    gate_up, dy = torch.cat([gate, up], dim=-1), up * 0.5
    calls = [
        (torch.ops.thinkfuse.swiglu_fwd, (gate, up)),
        (torch.ops.thinkfuse.swiglu_bwd, (dy, gate, up)),
        (torch.ops.thinkfuse.swiglu_fused_fwd, (gate_up,)),
        (torch.ops.thinkfuse.swiglu_fused_bwd, (dy, gate_up)),
    ]
    for op, args in calls:
        ours, ref = op(*args, kernel_backend), op(*args, "torch")
        for o, r in zip(ours if isinstance(ours, tuple) else (ours,), ref if isinstance(ref, tuple) else (ref,)):
            assert_close_fp32(o, r)


class _MLP(torch.nn.Module):
    """A merged gate/up projection -> swiglu_fused -> down projection, as a patched MLP runs."""

    def __init__(self, hidden, intermediate, fused):
        super().__init__()
        self.gate_up = torch.nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = torch.nn.Linear(intermediate, hidden, bias=False)
        self.fused = fused

    def forward(self, x):
        gate_up = self.gate_up(x)
        act = swiglu_fused(gate_up) if self.fused else swiglu(*gate_up.chunk(2, dim=-1))
        return self.down(act).square().sum()


@pytest.mark.parametrize("kb", KERNEL_BACKENDS)
@pytest.mark.parametrize("fused", [False, True], ids=["split", "fused"])
def test_torch_compile_kernel_backend_fullgraph(kb, fused):
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = _MLP(16, 40, fused).to(DEVICE)
    x = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    with thinkfuse.use_backend(kb):
        eager = module(x)
        (eager_grad,) = torch.autograd.grad(eager, x)
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True)(x)
        (compiled_grad,) = torch.autograd.grad(compiled, x)
    assert_close_fp32(compiled, eager, tol=1e-4)
    assert_close_fp32(compiled_grad, eager_grad, tol=1e-4)
