"""thinkfuse.ops.rms_norm: every backend against reference.py, reference.py against the
transformers module, forward and gradients, dtypes, odd sizes, strides, bad inputs, compile."""

import importlib

import pytest
import torch
from conftest import DEVICE, KERNEL_BACKENDS
from strided_helpers import spy_on_op_calls, strided_leaf
from tolerances import ULP, assert_close_fp32, assert_low_precision_ok, assert_no_scale_bias
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

import thinkfuse
from thinkfuse import reference
from thinkfuse.ops import rms_norm

HIDDEN_SIZES = [64, 1000, 1536, 4096, 5120]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(rows, hidden, dtype, *, residual=False, w_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen).to(DEVICE, dtype)
    w = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(DEVICE, w_dtype or dtype)
    r = torch.randn(rows, hidden, generator=gen).to(DEVICE, dtype) if residual else None
    return x, w, r


def _run(fn, x, w, r, eps=1e-6, seed=1):
    """Forward and the gradients of a fixed random projection of the outputs."""
    leaves = [strided_leaf(t) for t in (x, w, r) if t is not None]
    out = fn(*leaves[:2], eps, residual=leaves[2] if r is not None else None)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen).to(o.device, torch.float64)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], [t.grad for t in leaves]


def _backend_fn(backend):
    return lambda x, w, eps, residual=None: rms_norm(x, w, eps, residual=residual, backend=backend)


def _reference_fn(x, w, eps, residual=None):
    return reference.rms_norm(x, w, eps, residual)


def _truth_fn(x, w, eps, residual=None):
    return reference.rms_norm(x.double(), w.double(), eps, None if residual is None else residual.double())


# --- reference.py against transformers -----------------------------------------------------


@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                           (torch.float32, torch.bfloat16)])
def test_reference_matches_transformers_module(dtype, w_dtype):
    x, w, _ = _inputs(7, 96, dtype, w_dtype=w_dtype)
    module = Qwen2RMSNorm(96, eps=1e-5).to(DEVICE, w_dtype)
    module.weight.data.copy_(w)
    hf_out, (hf_dx, hf_dw) = _run(lambda x_, w_, eps, residual=None: torch.func.functional_call(
        module, {"weight": w_}, (x_,)), x, w, None, eps=1e-5)
    ref_out, (ref_dx, ref_dw) = _run(_reference_fn, x, w, None, eps=1e-5)
    assert ref_out[0].dtype == hf_out[0].dtype == torch.promote_types(dtype, w_dtype)
    for ours, theirs in [(ref_out[0], hf_out[0]), (ref_dx, hf_dx), (ref_dw, hf_dw)]:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_reference_residual_is_add_then_norm():
    x, w, r = _inputs(5, 64, torch.bfloat16, residual=True)
    y, h = reference.rms_norm(x, w, 1e-6, r)
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, reference.rms_norm(x + r, w, 1e-6), rtol=0, atol=0)


# --- every backend against the reference -----------------------------------------------------


@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("rows", [1, 37])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_fp32_matches_reference(kernel_backend, hidden, rows, residual):
    x, w, r = _inputs(rows, hidden, torch.float32, residual=residual)
    outs, grads = _run(_backend_fn(kernel_backend), x, w, r)
    ref_outs, ref_grads = _run(_reference_fn, x, w, r)
    for ours, ref in zip(outs, ref_outs):
        assert ours.dtype == ref.dtype
        assert_close_fp32(ours, ref)
    for ours, ref in zip(grads, ref_grads):
        assert_close_fp32(ours, ref, tol=1e-4)  # dweight is a reduction over rows


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 1000, 4096])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_low_precision_vs_float64_truth(kernel_backend, dtype, hidden, residual):
    x, w, r = _inputs(29, hidden, dtype, residual=residual)
    outs, grads = _run(_backend_fn(kernel_backend), x, w, r)
    hf_outs, hf_grads = _run(_reference_fn, x, w, r)
    truth_outs, truth_grads = _run(_truth_fn, x, w, r)
    for i, (ours, hf, truth) in enumerate(zip(outs + grads, hf_outs + hf_grads, truth_outs + truth_grads)):
        assert_low_precision_ok(ours, hf, truth)
        # y is rounded twice (the normalised row, then times the weight), the rest once
        assert_no_scale_bias(ours, truth, roundings=2 if i == 0 else 1)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.float16, torch.bfloat16)])
def test_mixed_dtypes_follow_transformers_promotion(kernel_backend, x_dtype, w_dtype):
    x, w, r = _inputs(9, 200, x_dtype, w_dtype=w_dtype, residual=True)
    (y, h), (dx, dw, dr) = _run(_backend_fn(kernel_backend), x, w, r)
    (ref_y, ref_h), (ref_dx, ref_dw, _) = _run(_reference_fn, x, w, r)
    assert y.dtype == torch.float32 and h.dtype == x_dtype
    assert dx.dtype == x_dtype and dw.dtype == w_dtype and dr.dtype == x_dtype
    # x + residual rounded once (one ulp: the Triton interpreter truncates to bfloat16).
    torch.testing.assert_close(h, ref_h, rtol=ULP[x_dtype], atol=0)
    # Each output within twice transformers' own error of the float64 truth (plus an ulp of its
    # dtype): a product taken in the wrong dtype (e.g. a float32 x normalised through bfloat16)
    # is far outside that.
    (truth_y, _), (truth_dx, truth_dw, _) = _run(_truth_fn, x, w, r)
    for ours, hf, truth in ((y, ref_y, truth_y), (dx, ref_dx, truth_dx), (dw, ref_dw, truth_dw)):
        assert_low_precision_ok(ours, hf, truth)


def _strided_views():
    """(id, x, the row stride the op reads x with)."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, 2 * 160, generator=gen).to(DEVICE)
    yield "every-other-column", base[..., ::2], 160  # unit stride lost: copied
    yield "column-slice", base[..., :160], 320  # row stride 320 > 160: read in place
    yield "transposed", base[..., :160].transpose(0, 1), 160  # rows not flattenable: copied
    yield "expanded", torch.randn(1, 160, generator=gen).to(DEVICE).expand(7, 160), 0  # read in place


@pytest.mark.parametrize("case", list(_strided_views()), ids=lambda c: c[0])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_strided_inputs(kernel_backend, case, residual, monkeypatch):
    _, x, row_stride = case
    w = torch.linspace(0.5, 1.5, x.shape[-1], device=DEVICE)
    # column-major: copied to row stride 160, unlike x (a kernel reading it with x's stride fails)
    r = torch.randn(x.shape, device=DEVICE).transpose(-1, -2).contiguous().transpose(-1, -2) if residual else None
    x_before = x.clone()
    seen = spy_on_op_calls(monkeypatch, "thinkfuse.ops.rms_norm")
    outs, grads = _run(_backend_fn(kernel_backend), x, w, r)
    # x reaches the kernels with its strides, in the forward and (as the saved h) the backward
    assert seen["rms_norm_fwd"][0] == (row_stride, 1)
    assert seen["rms_norm_fwd"][2] == (None if r is None else (160, 1))
    assert seen["rms_norm_bwd"][1] == ((160, 1) if residual else (row_stride, 1))
    ref_outs, ref_grads = _run(_reference_fn, x, w, r)
    assert torch.equal(x, x_before), "rms_norm wrote into its input"
    for ours, ref in zip(outs + grads, ref_outs + ref_grads):
        assert ours.shape == ref.shape
        assert_close_fp32(ours, ref, tol=1e-4)


def _grads(fn, x, w, r, grad_outputs):
    leaves = [strided_leaf(t) for t in (x, w, r) if t is not None]
    outs = fn(leaves[0], leaves[1], 1e-6, residual=leaves[2] if r is not None else None)
    return torch.autograd.grad(outs, leaves, grad_outputs)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_row_strided_output_gradient(kernel_backend, residual, monkeypatch):
    """dy read with its row stride: e.g. y consumed through a torch.cat, whose backward hands
    on slices of its gradient."""
    x, w, r = _inputs(4, 150, torch.float32, residual=residual)
    gen = torch.Generator().manual_seed(2)
    dy, dh = (torch.randn(4, 300, generator=gen).to(DEVICE)[:, :150] for _ in range(2))
    seen = spy_on_op_calls(monkeypatch, "thinkfuse.ops.rms_norm")
    ours = _grads(_backend_fn(kernel_backend), x, w, r, (dy, dh) if residual else dy)
    assert seen["rms_norm_bwd"][0] == (300, 1)
    ref = _grads(_reference_fn, x, w, r, (dy, dh) if residual else dy)
    for o, rf in zip(ours, ref):
        assert_close_fp32(o, rf, tol=1e-4)


def test_leading_dims_and_empty_rows(kernel_backend):
    x = torch.randn(2, 3, 4, 64, device=DEVICE)
    w = torch.randn(64, device=DEVICE)
    assert_close_fp32(rms_norm(x, w, backend=kernel_backend), reference.rms_norm(x, w))
    empty = torch.empty(0, 64, device=DEVICE, requires_grad=True)
    y = rms_norm(empty, w, backend=kernel_backend)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert empty.grad.shape == (0, 64)


def test_output_only_on_residual_path_gets_gradient(kernel_backend):
    """With the fused add, a loss on h alone must still give dx = dresidual = dL/dh."""
    x, w, r = _inputs(4, 64, torch.float32, residual=True)
    x.requires_grad_(), r.requires_grad_()
    _, h = rms_norm(x, w, residual=r, backend=kernel_backend)
    (h * 3).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
    torch.testing.assert_close(r.grad, torch.full_like(r, 3.0))


# --- bad inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=torch.ones(2, 8, dtype=torch.int32)), TypeError, "x must have dtype"),
        (dict(x=[[1.0] * 8]), TypeError, "x must be a torch.Tensor"),
        (dict(weight=torch.ones(8, dtype=torch.int64)), TypeError, "weight must have dtype"),
        (dict(weight=torch.ones(7)), ValueError, "weight has 7 elements"),
        (dict(weight=torch.ones(2, 8)), ValueError, "weight must be 1-D"),
        (dict(weight=torch.ones(8, device="meta")), ValueError, "weight is on meta"),
        (dict(residual=torch.ones(2, 7)), ValueError, "residual shape"),
        (dict(residual=torch.ones(2, 8, dtype=torch.float16)), TypeError, "residual dtype"),
        (dict(eps=-1.0), ValueError, "eps must be >= 0"),
        (dict(eps=float("nan")), ValueError, "eps must be finite"),
        (dict(eps="1e-6"), TypeError, "eps must be a float"),
        (dict(x=torch.ones(2, 0), weight=torch.ones(0)), ValueError, "non-empty last dim"),
    ],
)
def test_bad_inputs_raise_before_any_kernel(backend, kwargs, error, match):
    args = dict(x=torch.ones(2, 8), weight=torch.ones(8), eps=1e-6, residual=None)
    args.update(kwargs)
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v)
            for k, v in args.items()}
    with pytest.raises(error, match=match):
        rms_norm(args["x"], args["weight"], args["eps"], residual=args["residual"], backend=backend)


def test_triton_rows_past_its_tile_limit(monkeypatch):
    """The Triton kernels hold a row in one tile of at most MAX_HIDDEN columns: a named triton
    backend gets a ValueError naming the limit before any kernel runs (not a compile failure);
    an automatic choice of triton runs the torch form instead."""
    pytest.importorskip("triton")
    import importlib

    from thinkfuse.kernels.rms_norm import MAX_HIDDEN

    rms_norm_module = importlib.import_module("thinkfuse.ops.rms_norm")  # the module, not the function

    wide = MAX_HIDDEN + 1
    x, w = torch.randn(2, wide, device=DEVICE), torch.randn(wide, device=DEVICE)
    with pytest.raises(ValueError, match=f"at most {MAX_HIDDEN} elements"):
        rms_norm(x, w, backend="triton")
    monkeypatch.setattr(rms_norm_module, "resolve_backend", lambda *args, **kwargs: "triton")  # automatic pick
    assert torch.equal(rms_norm(x, w), reference.rms_norm(x, w, 1e-6))


# --- torch.library registration and torch.compile ----------------------------------------------


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_custom_op_passes_opcheck(backend, residual):
    x, w, r = _inputs(5, 64, torch.float32, residual=residual)
    args = (x.requires_grad_(), w.requires_grad_(), r.requires_grad_() if residual else None, 1e-6, backend)
    torch.library.opcheck(torch.ops.thinkfuse.rms_norm_fwd.default, args)


class _NormBlock(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, hidden))

    def forward(self, x, r):
        y, h = rms_norm(x * 2, self.weight, 1e-5, residual=r)
        return y.square().sum() + h.sum()


def _compiled_matches_eager(compile_backend):
    x = torch.randn(6, 64, device=DEVICE, requires_grad=True)
    r = torch.randn(6, 64, device=DEVICE)
    module = _NormBlock(64).to(DEVICE)
    eager = module(x, r)
    (eager_grad,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(module, backend=compile_backend, fullgraph=True)(x, r)
    (compiled_grad,) = torch.autograd.grad(compiled, x)
    assert_close_fp32(compiled, eager, tol=1e-4)
    assert_close_fp32(compiled_grad, eager_grad, tol=1e-4)


def test_torch_compile_default_backend_inductor():
    torch._dynamo.reset()
    _compiled_matches_eager("inductor")


@pytest.mark.parametrize("kb", KERNEL_BACKENDS)
def test_torch_compile_kernel_backend_fullgraph(kb):
    torch._dynamo.reset()
    with thinkfuse.use_backend(kb):
        _compiled_matches_eager("aot_eager")
