"""CUDA flash-attention backward (torch.ops.thinkfuse_C.flash_attention_bwd): gradients dq, dk,
dv (and those flowing from a gradient into the lse) against autograd of reference.py in float64,
with the low-precision tolerance of tests/tolerances.py (at most twice the error of an HF-style
eager attention run in the same dtype, plus one ulp of the gradient's scale).

Two ways in: the op called directly on the reference forward's out / lse (isolates the backward),
and end to end through ``ops.flash_attention(..., backend="cuda")`` (needs the CUDA forward too).
Covers float16 / bfloat16, head dims 64 / 96 / 128, causal and not, Sq < Sk and Sq > Sk (rows
that see no key), GQA groups 1 / 2 / 4 / 8, odd lengths, sliding windows, packed batches with
empty sequences and one long + many short, strided / misaligned inputs, CUDA graph capture (no
host synchronisation) and bad arguments."""

from functools import partial

import pytest
import torch
from attention_helpers import (
    capture_cuda_graph,
    cu_seqlens,
    failure_label,
    grads,
    has_cuda_op,
    qkv,
    randn,
    reference_grads,
    with_changes,
)
from tolerances import assert_low_precision_ok

from thinkfuse import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not has_cuda_op("flash_attention_bwd"), reason="no cuda flash_attention_bwd kernel"),
]
needs_fwd = pytest.mark.skipif(not has_cuda_op("flash_attention_fwd"), reason="no cuda flash_attention_fwd kernel")

DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 96, 128]

# (B, Sq, Sk, Hq, Hkv, causal, window)
CASES = {
    "causal-mha-129": (2, 129, 129, 4, 4, True, None),
    "noncausal-gqa2-127": (1, 127, 127, 4, 2, False, None),
    "causal-sq<sk-gqa4": (1, 17, 1000, 8, 2, True, None),
    "causal-sq>sk-empty-rows-gqa8": (1, 1000, 17, 8, 1, True, None),
    "seqlen1": (2, 1, 1, 4, 1, True, None),
    "one-query-many-keys": (1, 1, 129, 2, 1, True, None),
    "window": (1, 300, 300, 4, 1, True, 64),
    "window-sq<sk": (1, 100, 333, 2, 1, True, 40),
    "window-wider-than-seq": (1, 200, 200, 2, 2, True, 1000),
    "noncausal-sq<sk": (1, 257, 513, 4, 2, False, None),
    "noncausal-sq>sk": (2, 300, 65, 2, 1, False, None),
}


# inputs drawn on the GPU
_randn = partial(randn, device="cuda")
_qkv = partial(qkv, device="cuda")
_cu = partial(cu_seqlens, device="cuda")


# --- truths -----------------------------------------------------------------------------------


def _projections(q, lse, seed):
    """dout like q (its dtype) and a float32 dlse that is 0 where lse is -inf (such rows have no
    lse gradient through the public op: the loss sees them only through torch.where)."""
    dout = _randn(*q.shape, dtype=q.dtype, seed=seed)
    dlse = _randn(*lse.shape, seed=seed + 1)
    return dout, torch.where(torch.isfinite(lse), dlse, 0.0)


def _check(ours, low, truth, contiguous=True):
    for name, o, lo, t in zip(("dq", "dk", "dv"), ours, low, truth):
        assert o.shape == t.shape and o.dtype == lo.dtype, name
        assert o.is_contiguous() or not contiguous, name
        with failure_label(name):
            assert_low_precision_ok(o, lo, t)


def _run_direct(q, k, v, causal, scale, window, cu_q=None, cu_k=None, max_q=None, max_k=None, use_dlse=True,
                seed=11, dout_transform=None, op="flash_attention_bwd"):
    """The op called directly on the reference forward; returns (ours, eager low, float64 truth)."""
    out32, lse = reference.flash_attention(q, k, v, causal, scale, window, cu_q, cu_k, return_lse=True)
    out = out32.to(q.dtype)
    dout, dlse = _projections(q, lse, seed)
    dlse = dlse if use_dlse else None
    if cu_q is not None:
        lq, lk = (cu_q[1:] - cu_q[:-1]), (cu_k[1:] - cu_k[:-1])
        if max_q is None:
            max_q = int(lq.max()) if len(lq) else 0
        if max_k is None:
            max_k = int(lk.max()) if len(lk) else 0
    else:
        max_q, max_k = q.shape[1], k.shape[1]
    dout_arg = dout_transform(dout) if dout_transform is not None else dout
    ours = getattr(torch.ops.thinkfuse_C, op)(dout_arg, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k,
                                              scale, causal, window or 0)
    low, truth = reference_grads(q, k, v, dout, dlse, causal, scale, window, cu_q, cu_k)
    return list(ours), low, truth


# --- the op directly ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", list(CASES))
def test_direct_matches_reference(case, head_dim, dtype):
    b, sq, sk, hq, hkv, causal, window = CASES[case]
    q, k, v = _qkv(b, sq, sk, hq, hkv, head_dim, dtype)
    _check(*_run_direct(q, k, v, causal, head_dim ** -0.5, window))


@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_without_dlse_and_custom_scale(dtype):
    q, k, v = _qkv(1, 200, 230, 4, 2, 128, dtype, seed=3)
    _check(*_run_direct(q, k, v, True, 0.3, None, use_dlse=False))


@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_long_causal(dtype):
    """Many unmasked interior tiles and many key blocks adding into the same dQ rows."""
    q, k, v = _qkv(1, 2048, 2048, 8, 2, 128, dtype, seed=5)
    _check(*_run_direct(q, k, v, True, 128 ** -0.5, None))


VARLEN = {
    # (q lengths, k lengths, Hq, Hkv, causal, window)
    "empty-and-short": ([0, 5, 1, 0, 17, 129], [3, 5, 1, 0, 17, 200], 4, 2, True, None),
    "one-long-many-short": ([1000, 1, 3, 0, 17, 5, 2, 0, 9, 64, 65], [1000, 1, 3, 0, 17, 5, 2, 0, 9, 64, 65],
                            8, 1, True, None),
    "noncausal-different-lengths": ([70, 0, 33, 127], [40, 9, 130, 1], 2, 2, False, None),
    "window": ([300, 7, 129], [310, 7, 129], 4, 1, True, 50),
    "no-keys-for-some-queries": ([5, 4, 3], [0, 3, 6], 2, 1, True, None),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", list(VARLEN))
def test_direct_varlen(case, head_dim, dtype):
    lq, lk, hq, hkv, causal, window = VARLEN[case]
    cu_q, cu_k = _cu(lq), _cu(lk)
    q, k, v = _qkv(None, sum(lq), sum(lk), hq, hkv, head_dim, dtype, seed=1)
    # max_seqlen larger than the longest sequence is allowed
    _check(*_run_direct(q, k, v, causal, head_dim ** -0.5, window, cu_q, cu_k,
                        max_q=max(lq) + 3, max_k=max(lk) + 5))


def test_direct_varlen_equals_padded_per_sequence():
    """A packed batch of equal-length sequences gives the padded layout's gradients."""
    b, s, hq, hkv, d = 3, 150, 4, 2, 64
    q, k, v = _qkv(b, s, s, hq, hkv, d, torch.bfloat16, seed=7)
    out32, lse = reference.flash_attention(q, k, v, True, None, None, return_lse=True)
    dout, dlse = _projections(q, lse, 9)
    padded = torch.ops.thinkfuse_C.flash_attention_bwd(dout, q, k, v, out32.to(q.dtype), lse, dlse, None, None,
                                                       s, s, d ** -0.5, True, 0)
    cu = _cu([s] * b)
    packed = torch.ops.thinkfuse_C.flash_attention_bwd(
        dout.flatten(0, 1), q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), out32.to(q.dtype).flatten(0, 1),
        lse.permute(1, 0, 2).reshape(hq, b * s), dlse.permute(1, 0, 2).reshape(hq, b * s), cu, cu, s, s,
        d ** -0.5, True, 0)
    for p, v_ in zip(padded, packed):
        torch.testing.assert_close(p.flatten(0, 1).float(), v_.float(), rtol=1e-2, atol=1e-2)


def test_direct_strided_and_misaligned_inputs():
    """Views of a fused projection (aligned, non-contiguous), a [B, H, S, D] transpose, an
    offset view whose rows are not 16-byte aligned (copied by the binding), a strided dout."""
    b, s, hq, hkv, d = 2, 97, 4, 2, 64
    dtype = torch.bfloat16
    qkv = _randn(b, s, hq + 2 * hkv, d, dtype=dtype, seed=1)
    q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
    assert not q.is_contiguous()
    _check(*_run_direct(q, k, v, True, d ** -0.5, None, dout_transform=lambda t: t.transpose(1, 2).contiguous()
                        .transpose(1, 2)))
    qt = _randn(b, hq, s, d, dtype=dtype, seed=2).transpose(1, 2)
    flat = _randn(b * s * hkv * d + 1, dtype=dtype, seed=3)
    km = flat[1:].view(b, s, hkv, d)  # 2 bytes past an aligned address
    assert km.data_ptr() % 16 != 0
    _check(*_run_direct(qt, km, v.contiguous(), False, d ** -0.5, None))


def test_direct_ignores_dlse_of_rows_without_keys():
    """Rows whose lse is -inf contribute nothing, whatever gradient reaches their lse."""
    q, k, v = _qkv(1, 40, 10, 2, 1, 64, torch.float16)
    out32, lse = reference.flash_attention(q, k, v, True, None, None, return_lse=True)
    assert torch.isneginf(lse).any()
    dout, dlse = _projections(q, lse, 4)
    args = (q, k, v, out32.to(q.dtype), lse)
    clean = torch.ops.thinkfuse_C.flash_attention_bwd(dout, *args, dlse, None, None, 40, 10, 0.125, True, 0)
    noisy = torch.ops.thinkfuse_C.flash_attention_bwd(dout, *args, torch.where(torch.isfinite(lse), dlse, 7.0),
                                                      None, None, 40, 10, 0.125, True, 0)
    for c, n in zip(clean, noisy):
        assert torch.isfinite(n).all()
        torch.testing.assert_close(c, n, rtol=1e-2, atol=1e-3)
    assert torch.equal(clean[0][:, :30], torch.zeros_like(clean[0][:, :30]))  # rows without keys


def test_direct_empty_inputs():
    q, k, v = _qkv(2, 0, 5, 2, 1, 64, torch.bfloat16)
    lse = torch.empty(2, 2, 0, device="cuda")
    dq, dk, dv = torch.ops.thinkfuse_C.flash_attention_bwd(q, q, k, v, q, lse, None, None, None, 0, 5, 0.125, True, 0)
    assert dq.shape == q.shape and torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))
    cu = torch.zeros(1, dtype=torch.int32, device="cuda")  # batch 0
    q, k, v = (t.flatten(0, 1) for t in _qkv(1, 3, 3, 2, 1, 64, torch.bfloat16))
    lse = torch.zeros(2, 3, device="cuda")
    dq, dk, dv = torch.ops.thinkfuse_C.flash_attention_bwd(q, q, k, v, q, lse, None, cu, cu, 0, 0, 0.125, True, 0)
    for t in (dq, dk, dv):
        assert torch.equal(t, torch.zeros_like(t))


def test_direct_cuda_graph_capture():
    """No host synchronisation: the op captures into a CUDA graph and replays to the same result."""
    q, k, v = _qkv(1, 300, 300, 4, 2, 128, torch.bfloat16, seed=8)
    out32, lse = reference.flash_attention(q, k, v, True, None, None, return_lse=True)
    out = out32.to(q.dtype)
    dout, dlse = _projections(q, lse, 12)
    args = (dout, q, k, v, out, lse, dlse, None, None, 300, 300, 128 ** -0.5, True, 0)
    eager = torch.ops.thinkfuse_C.flash_attention_bwd(*args)
    graph, captured = capture_cuda_graph(lambda: torch.ops.thinkfuse_C.flash_attention_bwd(*args))
    graph.replay()
    torch.cuda.synchronize()
    for e, c in zip(eager, captured):
        torch.testing.assert_close(e.float(), c.float(), rtol=1e-2, atol=1e-2)  # dQ atomics reorder sums


# --- end to end through ops.flash_attention -------------------------------------------------------


def _run_e2e(q, k, v, causal, scale, window, cu_q=None, cu_k=None, seed=21):
    from thinkfuse.ops import flash_attention

    scale = scale if scale is not None else q.shape[-1] ** -0.5
    _, lse = reference.flash_attention(q, k, v, causal, scale, window, cu_q, cu_k, return_lse=True)
    dout, dlse = _projections(q, lse, seed)
    kw = dict(causal=causal, softmax_scale=scale, sliding_window=window, return_lse=True, backend="cuda")
    if cu_q is not None:
        kw.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=int((cu_q[1:] - cu_q[:-1]).max()),
                  max_seqlen_k=int((cu_k[1:] - cu_k[:-1]).max()))
    ours = grads(lambda *t: flash_attention(*t, **kw), (q, k, v), dout, dlse)
    low, truth = reference_grads(q, k, v, dout, dlse, causal, scale, window, cu_q, cu_k)
    return ours, low, truth


@needs_fwd
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", list(CASES))
def test_flash_attention_cuda_gradients(case, head_dim, dtype):
    b, sq, sk, hq, hkv, causal, window = CASES[case]
    q, k, v = _qkv(b, sq, sk, hq, hkv, head_dim, dtype, seed=4)
    _check(*_run_e2e(q, k, v, causal, None if head_dim != 96 else 0.11, window), contiguous=False)


@needs_fwd
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(VARLEN))
def test_flash_attention_cuda_varlen_gradients(case, dtype):
    lq, lk, hq, hkv, causal, window = VARLEN[case]
    cu_q, cu_k = _cu(lq), _cu(lk)
    q, k, v = _qkv(None, sum(lq), sum(lk), hq, hkv, 128, dtype, seed=5)
    _check(*_run_e2e(q, k, v, causal, None, window, cu_q, cu_k), contiguous=False)


@needs_fwd
def test_flash_attention_cuda_strided_gradients():
    b, s, hq, hkv, d = 1, 150, 8, 2, 128
    qkv = _randn(b, s, hq + 2 * hkv, d, dtype=torch.bfloat16, seed=9)
    q, k, v = qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:]
    _check(*_run_e2e(q, k, v, True, None, None), contiguous=False)


# --- bad arguments --------------------------------------------------------------------------------


def _good_args(dtype=torch.bfloat16, d=64):
    q, k, v = _qkv(1, 8, 8, 4, 2, d, dtype)
    lse = torch.zeros(1, 4, 8, device="cuda")
    return [q, q, k, v, q, lse, None, None, None, 8, 8, 0.125, True, 0]


def _bad_calls():
    cu = torch.tensor([0, 8], dtype=torch.int32, device="cuda")
    names = ["dout", "q", "k", "v", "out", "lse", "dlse", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
             "max_seqlen_k", "softmax_scale", "causal", "window"]

    def with_(**changes):
        return with_changes(_good_args(), names, **changes)

    f32 = _good_args(torch.float32)
    return {
        "float32": (TypeError, f32),
        "k-dtype": (TypeError, with_(k=lambda a: a[2].half())),
        "dout-dtype": (TypeError, with_(dout=lambda a: a[0].half())),
        "head-dim-32": (ValueError, _good_args(d=32)),
        "heads-not-divisible": (ValueError, with_(k=lambda a: a[2][:, :, :1].expand(1, 8, 3, 64),
                                                  v=lambda a: a[3][:, :, :1].expand(1, 8, 3, 64))),
        "k-v-shapes": (ValueError, with_(v=lambda a: a[3][:, :5])),
        "dout-shape": (ValueError, with_(dout=lambda a: a[0][:, :5])),
        "rank": (ValueError, with_(q=lambda a: a[1][0], dout=lambda a: a[0][0], out=lambda a: a[4][0])),
        "lse-dtype": (TypeError, with_(lse=lambda a: a[5].half())),
        "lse-shape": (ValueError, with_(lse=lambda a: a[5][:, :2])),
        "dlse-shape": (ValueError, with_(dlse=lambda a: a[5][:, :, :3])),
        "only-cu-q": (ValueError, with_(cu_seqlens_q=cu)),
        "cu-int64": (TypeError, with_(q=lambda a: a[1][0], k=lambda a: a[2][0], v=lambda a: a[3][0],
                                      dout=lambda a: a[0][0], out=lambda a: a[4][0], lse=lambda a: a[5][0],
                                      cu_seqlens_q=cu.long(), cu_seqlens_k=cu.long())),
        "cpu-k": (ValueError, with_(k=lambda a: a[2].cpu())),
        "non-unit-last-stride": (ValueError, with_(q=lambda a: _randn(1, 8, 4, 128, dtype=torch.bfloat16)[..., ::2])),
        "negative-max-seqlen": (ValueError, with_(q=lambda a: a[1][0], k=lambda a: a[2][0], v=lambda a: a[3][0],
                                                  dout=lambda a: a[0][0], out=lambda a: a[4][0],
                                                  lse=lambda a: a[5][0], cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                  max_seqlen_q=-1)),
        "scale-nan": (ValueError, with_(softmax_scale=float("nan"))),
    }


@pytest.mark.parametrize("case", ["float32", "k-dtype", "dout-dtype", "head-dim-32", "heads-not-divisible",
                                  "k-v-shapes", "dout-shape", "rank", "lse-dtype", "lse-shape", "dlse-shape",
                                  "only-cu-q", "cu-int64", "cpu-k", "non-unit-last-stride", "negative-max-seqlen",
                                  "scale-nan"])
def test_bad_arguments(case):
    error, args = _bad_calls()[case]
    with pytest.raises(error):
        torch.ops.thinkfuse_C.flash_attention_bwd(*args)

