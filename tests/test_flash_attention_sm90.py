"""CUDA Hopper flash-attention forward, torch.ops.thinkfuse_C.flash_attention_fwd_sm90 (wgmma, TMA,
warp specialisation; csrc/include/thinkfuse/flash_attention_fwd_sm90.cuh), called directly.

out and lse against reference.py (float64) with the tolerance the FA2-style cuda forward is held
to (4 ulps of the dtype relative to the output's scale; lse rtol 1e-4 / atol 1e-3, -inf exactly
where a row sees no key), and against that FA2-style op (torch.ops.thinkfuse_C.flash_attention_fwd)
itself. Covers float16 / bfloat16, head dims 64 / 128, causal and not, GQA groups 1 / 2 / 4 / 8,
odd lengths (1, 17, 127, 129, 1000, 4097), Sq < Sk and Sq > Sk (rows without keys: out 0, lse
-inf), sliding windows, packed sequences with empty ones and non-finite junk in the rows past the
last sequence, strided inputs (slices of a fused qkv, a [B, H, S, D] transpose, a misaligned view),
CUDA graph capture, and bad arguments.

Runs only on a compute capability 9.0 GPU with an extension built for sm_90a; collects and skips
everywhere else (a GPU of another generation only runs the test that the op refuses it)."""

import math
from functools import partial

import pytest
import torch
from attention_helpers import (
    assert_low_close,
    assert_lse_close,
    assert_rows_without_keys_empty,
    capture_cuda_graph,
    cu_seqlens,
    has_cuda_op,
    qkv,
    randn,
    strided_qkv,
    with_changes,
)

from thinkfuse import reference
from thinkfuse.backend import cuda_has_op

OP = "flash_attention_fwd_sm90"


def _is_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


needs_sm90 = pytest.mark.skipif(not (has_cuda_op(OP) and _is_sm90()),
                                reason="needs a compute capability 9.0 GPU and the cuda flash_attention_fwd_sm90 kernel")
pytestmark = [pytest.mark.gpu]

DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 128]

# (B, Sq, Sk, Hq, Hkv, causal, window)
CASES = {
    "causal-129-mha": (2, 129, 129, 4, 4, True, None),
    "noncausal-127-gqa2": (1, 127, 127, 4, 2, False, None),
    "causal-1000-gqa4": (1, 1000, 1000, 8, 2, True, None),
    "noncausal-1000-gqa8": (1, 1000, 1000, 8, 1, False, None),
    "causal-4097": (1, 4097, 4097, 2, 1, True, None),
    "noncausal-17": (3, 17, 17, 2, 2, False, None),
    "seqlen1": (3, 1, 1, 4, 1, True, None),
    "causal-sq<sk": (1, 17, 1000, 4, 2, True, None),
    "noncausal-sq<sk": (1, 129, 4097, 2, 1, False, None),
    "causal-sq>sk-empty-rows": (1, 300, 129, 2, 2, True, None),
    "noncausal-sq>sk": (1, 1000, 17, 2, 1, False, None),
    "one-query-many-keys": (2, 1, 1000, 8, 8, True, None),
    "window": (1, 1000, 1000, 4, 2, True, 100),
    "window-1": (2, 129, 129, 2, 1, True, 1),
    "window-sq<sk": (1, 127, 1000, 4, 1, True, 300),
    "window-sq>sk": (1, 400, 150, 2, 1, True, 70),
    "window-wider-than-seq": (1, 300, 300, 2, 2, True, 4096),
}


# inputs drawn on the GPU
_randn = partial(randn, device="cuda")
_qkv = partial(qkv, device="cuda")
_cu = partial(cu_seqlens, device="cuda")


def _call(q, k, v, causal, scale, window, cu_q=None, cu_k=None, max_q=None, max_k=None, op=OP):
    if cu_q is None:
        max_q, max_k = q.shape[1], k.shape[1]
    return getattr(torch.ops.thinkfuse_C, op)(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window or 0)


def _reference(q, k, v, causal, scale, window, cu_q=None, cu_k=None):
    """reference.py in float64, out rounded to q's dtype; packed rows outside every sequence get
    out 0 and lse -inf (what the op leaves there)."""
    out, lse = reference.flash_attention(q.double(), k.double(), v.double(), causal, scale, window, cu_q, cu_k,
                                         return_lse=True)
    out = out.to(q.dtype)
    if cu_q is None:
        return out, lse.float()
    inside = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
    cq = cu_q.tolist()
    for b in range(len(cq) - 1):
        inside[cq[b]:cq[b + 1]] = True
    full_out = torch.zeros_like(q)
    full_out[inside] = out
    full_lse = torch.full((q.shape[1], q.shape[0]), -math.inf, device=q.device)
    full_lse[:, inside] = lse.float()
    return full_out, full_lse


def _check(q, k, v, causal, scale, window, cu_q=None, cu_k=None, max_q=None, max_k=None):
    out, lse = _call(q, k, v, causal, scale, window, cu_q, cu_k, max_q, max_k)
    assert out.is_contiguous() and out.shape == q.shape and out.dtype == q.dtype
    ref_out, ref_lse = _reference(q, k, v, causal, scale, window, cu_q, cu_k)
    assert_low_close(out, ref_out, 4, "out")
    assert_lse_close(lse, ref_lse)
    if cuda_has_op("flash_attention_fwd"):  # the FA2-style kernel: same semantics
        fa2_out, fa2_lse = _call(q, k, v, causal, scale, window, cu_q, cu_k, max_q, max_k, op="flash_attention_fwd")
        assert_low_close(out, fa2_out, 4, "out vs flash_attention_fwd")
        assert_lse_close(lse, fa2_lse)
    return out, lse


# --- padded layout -----------------------------------------------------------------------------------


@needs_sm90
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, d, dtype):
    b, sq, sk, hq, hkv, causal, window = CASES[case]
    q, k, v = _qkv(b, sq, sk, hq, hkv, d, dtype, seed=11)
    out, lse = _check(q, k, v, causal, d ** -0.5, window)
    assert_rows_without_keys_empty(out, lse, causal, sq, sk)


@needs_sm90
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_softmax_scale(dtype):
    q, k, v = _qkv(1, 300, 300, 4, 2, 128, dtype, seed=5)
    _check(q, k, v, True, 0.02, None)
    _check(q, k, v, False, 0.3, None)


@needs_sm90
def test_long_causal_bf16():
    """The benchmark shape's regime: many unmasked blocks between the diagonal ones."""
    q, k, v = _qkv(1, 8192, 8192, 2, 1, 128, torch.bfloat16, seed=6)
    _check(q, k, v, True, 128 ** -0.5, None)


# --- packed layout -------------------------------------------------------------------------------------

VARLEN = {
    # q lengths, k lengths
    "empty-and-one-long": ([0, 700, 3, 1, 0, 17, 129, 0], [0, 700, 3, 1, 0, 17, 129, 0]),
    "q-shorter": ([1, 5, 0, 64, 200], [9, 400, 0, 64, 1000]),
    "q-without-keys": ([3, 130, 4], [0, 1, 6]),
    "many-short": ([1, 2, 3, 5, 8, 13, 21, 34, 55, 89] * 3, [1, 2, 3, 5, 8, 13, 21, 34, 55, 89] * 3),
    "block-multiples": ([128, 256, 127], [128, 256, 129]),
}


@needs_sm90
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 33)])
@pytest.mark.parametrize("case", list(VARLEN))
def test_varlen_matches_reference(case, causal, window, d, dtype):
    """Rows past the last sequence hold NaN / inf (uninitialised memory): a key block that runs
    past its sequence must not let them into the output (the V tail is zero-filled)."""
    lq, lk = VARLEN[case]
    extra = 7
    q, k, v = _qkv(None, sum(lq) + extra, sum(lk) + extra, 8, 2, d, dtype, seed=1)
    q[sum(lq):] = float("nan")
    k[sum(lk):] = float("nan")
    v[sum(lk):] = float("inf")
    cu_q, cu_k = _cu(lq), _cu(lk)
    # max_seqlen larger than the longest sequence is allowed
    out, lse = _check(q, k, v, causal, d ** -0.5, window, cu_q, cu_k, max(lq) + 3, max(lk) + 5)
    assert lse.shape == (8, q.shape[0])
    assert torch.equal(out[sum(lq):], torch.zeros_like(out[sum(lq):]))
    assert torch.isneginf(lse[:, sum(lq):]).all()


@needs_sm90
def test_varlen_equals_padded_per_sequence():
    b, s, hq, hkv, d = 3, 150, 4, 2, 128
    q, k, v = _qkv(b, s, s, hq, hkv, d, torch.bfloat16, seed=7)
    out, lse = _call(q, k, v, True, d ** -0.5, None)
    cu = _cu([s] * b)
    pout, plse = _call(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), True, d ** -0.5, None, cu, cu, s, s)
    assert torch.equal(out.flatten(0, 1), pout)
    assert torch.equal(lse.permute(1, 0, 2).reshape(hq, b * s), plse)


# --- strides -----------------------------------------------------------------------------------------


@needs_sm90
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_strided_inputs(d, dtype):
    """Views of a fused qkv projection (aligned, non-contiguous: TMA reads them in place), a
    transposed [B, H, S, D] tensor, a view 2 bytes off alignment and one with a non-unit last stride
    (both copied by the binding) all give the contiguous inputs' result."""
    b, s, hq, hkv = 2, 131, 8, 2
    q, k, v, qt, k_odd = strided_qkv(b, s, hq, hkv, d, dtype, seed=3, device="cuda")
    assert not q.is_contiguous()
    assert k_odd.data_ptr() % 16 != 0
    v_every_other = _randn(b, s, hkv, 2 * d, dtype=dtype, seed=6)[..., ::2]  # non-unit last stride: copied
    for qq, kk, vv in ((q, k, v), (qt, k, v), (q, k_odd, v), (qt, k_odd, k_odd), (q, k, v_every_other)):
        out, lse = _check(qq, kk, vv, True, d ** -0.5, None)
        c_out, c_lse = _call(qq.contiguous(), kk.contiguous(), vv.contiguous(), True, d ** -0.5, None)
        assert torch.equal(out, c_out) and torch.equal(lse, c_lse)


@needs_sm90
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_packed_strided_inputs(d):
    lengths = [5, 300, 0, 77]
    total, hq, hkv = sum(lengths), 4, 2
    fused = _randn(total, hq + 2 * hkv, d, dtype=torch.bfloat16, seed=6)
    q, k, v = fused[:, :hq], fused[:, hq:hq + hkv], fused[:, hq + hkv:]
    cu = _cu(lengths)
    _check(q, k, v, True, d ** -0.5, None, cu, cu, max(lengths), max(lengths))


# --- edge cases ----------------------------------------------------------------------------------------


@needs_sm90
def test_empty_inputs():
    q, k, v = _qkv(2, 40, 40, 4, 2, 128, torch.bfloat16)
    out, lse = _call(q, k[:, :0], v[:, :0], True, 0.125, None)  # no keys at all
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out, lse = _call(q, k[:, :0], v[:, :0], False, 0.125, None)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out, lse = _call(q[:, :0], k, v, True, 0.125, None)  # no queries
    assert out.shape == (2, 0, 4, 128) and lse.shape == (2, 4, 0)
    cu = torch.zeros(1, dtype=torch.int32, device="cuda")  # packed, batch 0
    out, lse = _call(q[0], k[0], v[0], True, 0.125, None, cu, cu, 0, 0)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@needs_sm90
def test_cuda_graph_capture():
    """No host synchronisation: the op captures into a CUDA graph and replays to the same result."""
    q, k, v = _qkv(1, 300, 300, 4, 2, 128, torch.bfloat16, seed=8)
    args = (q, k, v, None, None, 300, 300, 128 ** -0.5, True, 0)
    eager = torch.ops.thinkfuse_C.flash_attention_fwd_sm90(*args)
    graph, captured = capture_cuda_graph(lambda: torch.ops.thinkfuse_C.flash_attention_fwd_sm90(*args))
    graph.replay()
    torch.cuda.synchronize()
    for e, c in zip(eager, captured):
        assert torch.equal(e, c)


# --- the automatic choice ------------------------------------------------------------------------------


@needs_sm90
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_automatic_choice_runs_this_forward_and_a_validated_backward(packed):
    """ops.flash_attention with no backend named runs this kernel's forward (bit for bit) and
    a validated backward (Triton's padded, the cuda kernel's packed), and its gradients are as
    close to the reference as Triton's own forward and backward give."""
    from thinkfuse import ops
    from thinkfuse.ops.attention import HOPPER_FORWARD, _flash_backend

    q, k, v = _qkv(2, 300, 300, 8, 2, 128, torch.bfloat16, seed=21)
    cu = max_len = None
    if packed:
        q, k, v = (t.reshape(600, *t.shape[2:]) for t in (q, k, v))
        cu, max_len = _cu([100, 500]), 500  # offsets [0, 100, 600]
    assert _flash_backend(q, None) == HOPPER_FORWARD
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    kwargs = dict(causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len)
    out = ops.flash_attention(q, k, v, **kwargs)
    hopper_out, _ = _call(q.detach(), k.detach(), v.detach(), True, 128 ** -0.5, None, cu, cu, max_len, max_len)
    assert torch.equal(out, hopper_out)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    triton_out = ops.flash_attention(q, k, v, backend="triton", **kwargs)
    triton_grads = torch.autograd.grad(triton_out, (q, k, v), dout)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference_out = reference.flash_attention(*exact, True, 128 ** -0.5, None, cu, cu)
    reference_grads = torch.autograd.grad(reference_out, exact, dout.double())
    for name, got, tri, want in zip("qkv", grads, triton_grads, reference_grads):
        triton_error = (tri.double() - want).abs().max().item()
        error = (got.double() - want).abs().max().item()
        assert error <= 2 * triton_error + 1e-2 * want.abs().max().item(), (name, error, triton_error)
    assert _flash_backend(q, "triton") == "triton"  # a named backend is not rerouted


# --- bad arguments ------------------------------------------------------------------------------------


def _good_args(dtype=torch.bfloat16, d=128):
    q, k, v = _qkv(1, 8, 8, 4, 2, d, dtype)
    return [q, k, v, None, None, 8, 8, 0.125, True, 0]


def _bad_calls():
    cu = torch.tensor([0, 8], dtype=torch.int32, device="cuda")
    names = ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale",
             "causal", "window"]

    def with_(**changes):
        return with_changes(_good_args(), names, **changes)

    def packed(**changes):
        return with_(q=lambda a: a[0][0], k=lambda a: a[1][0], v=lambda a: a[2][0], **changes)

    return {
        "float32": (TypeError, _good_args(torch.float32)),
        "k-dtype": (TypeError, with_(k=lambda a: a[1].half())),
        "head-dim-96": (ValueError, _good_args(d=96)),
        "head-dim-256": (ValueError, _good_args(d=256)),
        "heads-not-divisible": (ValueError, with_(k=lambda a: a[1][:, :, :1].expand(1, 8, 3, 128),
                                                  v=lambda a: a[2][:, :, :1].expand(1, 8, 3, 128))),
        "k-v-shapes": (ValueError, with_(v=lambda a: a[2][:, :5])),
        "rank": (ValueError, with_(q=lambda a: a[0][0])),
        "only-cu-q": (ValueError, with_(cu_seqlens_q=cu)),
        "cu-int64": (TypeError, packed(cu_seqlens_q=cu.long(), cu_seqlens_k=cu.long())),
        "negative-max-seqlen": (ValueError, packed(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=-1)),
        "cpu-k": (ValueError, with_(k=lambda a: a[1].cpu())),
        "scale-nan": (ValueError, with_(softmax_scale=float("nan"))),
        "window-noncausal": (ValueError, with_(causal=False, window=4)),
    }


@needs_sm90
@pytest.mark.parametrize("case", ["float32", "k-dtype", "head-dim-96", "head-dim-256", "heads-not-divisible",
                                  "k-v-shapes", "rank", "only-cu-q", "cu-int64", "negative-max-seqlen", "cpu-k",
                                  "scale-nan", "window-noncausal"])
def test_bad_arguments(case):
    error, args = _bad_calls()[case]
    with pytest.raises(error):
        torch.ops.thinkfuse_C.flash_attention_fwd_sm90(*args)


@pytest.mark.skipif(not has_cuda_op(OP) or _is_sm90(), reason="needs a CUDA GPU other than compute capability 9.0")
def test_refuses_other_devices():
    args = _good_args()
    with pytest.raises(ValueError, match="compute capability"):
        torch.ops.thinkfuse_C.flash_attention_fwd_sm90(*args)
