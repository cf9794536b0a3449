"""CUDA-backend checks of decode_attention (csrc/include/thinkfuse/decode_attention.cuh: mma.sync
for float16/bfloat16, CUDA-core FMAs for float32) that need a GPU: every dtype and supported
head dim, 1 to 16 query tokens, GQA groups 1 to 8 (and row tiles past 32 rows), cache lengths
0, 1, shorter than Sq, past S_max and negative, mixed lengths in a batch, sliding windows,
strided and unaligned caches and q, left padding (cache_leftpad), explicit split counts (the split count must not change the
result), a 20k-key cache at batch 1, CUDA graph capture and bad arguments at the binding.
Compared with reference.py (a float64 truth for float16/bfloat16, see tolerances.py). The
reference counts lengths as the kernels do after clamping them to [0, S_max], so it is given the
clamped lengths."""

from functools import partial

import pytest
import torch
from attention_helpers import capture_cuda_graph, has_cuda_op, qkv, randn
from conftest import KERNEL_BACKENDS
from tolerances import ULP, assert_close_fp32, assert_low_precision_ok

from thinkfuse import reference
from thinkfuse.ops import decode_attention


def _has_kernel() -> bool:
    return "cuda" in KERNEL_BACKENDS and has_cuda_op("decode_attention")


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _has_kernel(), reason="no cuda decode_attention kernel (or no GPU)"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [16, 32, 64, 96, 128, 256]


# inputs drawn on the GPU
_randn = partial(randn, device="cuda")


def _lens(values):
    return torch.tensor(values, dtype=torch.int32, device="cuda")


def _inputs(batch, sq, hq, hkv, smax, d, dtype, seed=0):
    """q [batch, sq, hq, d] and the caches k / v [batch, smax, hkv, d], drawn on the GPU."""
    return qkv(batch, sq, smax, hq, hkv, d, dtype, seed, device="cuda")


def _check(ours, q, kc, vc, lens, scale=None, window=None):
    """ours against reference.decode_attention (float32: elementwise 1e-5; float16/bfloat16: no
    worse than twice the reference's own error against a float64 truth, plus one ulp)."""
    assert ours.shape == q.shape and ours.dtype == q.dtype and ours.is_contiguous()
    ref_lens = lens.clamp(0, kc.shape[1])
    ref = reference.decode_attention(q, kc, vc, ref_lens, scale, window)
    if q.dtype == torch.float32:
        assert_close_fp32(ours, ref)
    else:
        truth = reference.decode_attention(q.double(), kc.double(), vc.double(), ref_lens, scale, window)
        assert_low_precision_ok(ours, ref, truth)


def _cuda(q, kc, vc, lens, **kwargs):
    return decode_attention(q, kc, vc, lens, backend="cuda", **kwargs)


# --- dtypes x head dims x row tilings ------------------------------------------------------------

# (B, Sq, Hq, Hkv, S_max, lengths): rows per kv head G * Sq = 4, 8, 12, 32, 80 (three row tiles)
# and 3 (MHA), i.e. every rows-per-block instantiation; lengths that are not multiples of any tile.
SHAPES = {
    "decode-g4": (3, 1, 32, 8, 300, [300, 1, 157]),
    "decode-g8": (2, 1, 16, 2, 260, [260, 100]),
    "verify-g6-sq2": (2, 2, 12, 2, 200, [200, 77]),
    "verify-g8-sq4": (2, 4, 16, 2, 130, [5, 130]),
    "verify-g5-sq16": (2, 16, 10, 2, 90, [90, 40]),
    "mha-sq3": (2, 3, 4, 4, 70, [70, 3]),
}


@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, head_dim, case, splits):
    b, sq, hq, hkv, smax, lens = SHAPES[case]
    q, kc, vc = _inputs(b, sq, hq, hkv, smax, head_dim, dtype)
    lens = _lens(lens)
    _check(_cuda(q, kc, vc, lens, num_splits=splits), q, kc, vc, lens)


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("sq", [1, 2, 3, 4, 5, 6, 7, 8, 16])
def test_query_counts_and_groups(sq, group):
    hkv = 2
    q, kc, vc = _inputs(2, sq, hkv * group, hkv, 96, 64, torch.bfloat16, seed=sq)
    lens = _lens([96, sq + 13])
    _check(_cuda(q, kc, vc, lens), q, kc, vc, lens)
    _check(_cuda(q, kc, vc, lens, num_splits=4), q, kc, vc, lens)


@pytest.mark.parametrize("hq,hkv", [(12, 2), (32, 8), (40, 8), (28, 4)])
@pytest.mark.parametrize("sq", [1, 4])
def test_model_head_layouts(hq, hkv, sq):
    """The head layouts of the target models (Qwen2 12/2 and 28/4, 32/8, 40/8), head_dim 128."""
    q, kc, vc = _inputs(3, sq, hq, hkv, 520, 128, torch.bfloat16)
    lens = _lens([520, 333, sq])
    _check(_cuda(q, kc, vc, lens), q, kc, vc, lens)


# --- lengths -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [None, 1, 3, 64])
def test_edge_lengths_in_one_batch(dtype, splits):
    """0, 1, shorter than Sq (the first query tokens see nothing: zeros), exactly Sq, tile-odd,
    S_max, past S_max (clamped), negative (treated as 0), INT32_MAX."""
    lens = _lens([0, 1, 3, 4, 33, 100, 150, -5, 2**31 - 1])
    q, kc, vc = _inputs(len(lens), 4, 8, 2, 100, 32, dtype)
    ours = _cuda(q, kc, vc, lens, num_splits=splits)
    _check(ours, q, kc, vc, lens)
    assert not ours[0].any() and not ours[7].any()  # no key at all
    assert not ours[2, 0].any()  # length 3 < Sq = 4: query 0 sits at position -1


def test_empty_cache_and_empty_batch():
    q, kc, vc = _inputs(2, 2, 4, 2, 0, 64, torch.float16)
    out = _cuda(q, kc, vc, _lens([0, 5]))
    assert out.shape == q.shape and not out.any()
    q, kc, vc = _inputs(0, 1, 4, 2, 16, 64, torch.float16)
    assert _cuda(q, kc, vc, _lens([])).shape == (0, 1, 4, 64)


def test_long_cache_batch1():
    """20k keys at batch 1: the automatic split count (many splits) and explicit ones agree with
    the reference."""
    q, kc, vc = _inputs(1, 1, 32, 8, 20000, 128, torch.bfloat16)
    for lens in (_lens([20000]), _lens([12345])):
        for splits in (None, 1, 7):
            _check(_cuda(q, kc, vc, lens, num_splits=splits), q, kc, vc, lens)
    qf, kf, vf = (t.float() for t in (q, kc, vc))
    lens = _lens([19999])
    _check(_cuda(qf, kf, vf, lens), qf, kf, vf, lens)


# --- sliding window ------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 5, 37, 64, 1000])
@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sliding_window(dtype, window, splits):
    q, kc, vc = _inputs(4, 4, 16, 4, 300, 128, dtype)
    lens = _lens([300, 45, 4, 2])
    _check(_cuda(q, kc, vc, lens, sliding_window=window, num_splits=splits), q, kc, vc, lens, window=window)


def test_softmax_scale():
    q, kc, vc = _inputs(2, 2, 8, 2, 50, 64, torch.float32)
    lens = _lens([50, 20])
    for scale in (0.01, 0.3, 2.0):
        _check(_cuda(q, kc, vc, lens, softmax_scale=scale), q, kc, vc, lens, scale=scale)


# --- layouts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_q_and_caches(dtype):
    """q a transposed view of [B, Hq, Sq, D]; K and V interleaved in one buffer; a heads-major
    cache [B, Hkv, S, D] seen as [B, S, Hkv, D]. No copies: the kernels use the strides."""
    b, sq, hq, hkv, smax, d = 3, 4, 16, 4, 120, 64
    q = _randn(b, hq, sq, d, dtype=dtype).transpose(1, 2)
    kv = _randn(b, smax, 2, hkv, d, dtype=dtype, seed=1)
    kc, vc = kv[:, :, 0], kv[:, :, 1]
    lens = _lens([120, 61, 4])
    assert not q.is_contiguous() and not kc.is_contiguous()
    _check(_cuda(q, kc, vc, lens), q, kc, vc, lens)
    kh = _randn(b, hkv, smax, d, dtype=dtype, seed=3).transpose(1, 2)
    vh = _randn(b, hkv, smax, d, dtype=dtype, seed=4).transpose(1, 2)
    _check(_cuda(q, kh, vh, lens, num_splits=3), q, kh, vh, lens)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_caches(dtype):
    """Rows that are not 16-byte aligned (element-wise copy path): a cache sliced out of a
    buffer with one extra element per row, and one starting one element into its storage."""
    b, sq, hq, hkv, smax, d = 2, 2, 8, 2, 70, 32
    q = _randn(b, sq, hq, d, dtype=dtype)
    kc = _randn(b, smax, hkv, d + 1, dtype=dtype, seed=1)[..., 1:]
    vc = _randn(b, smax, hkv, d + 1, dtype=dtype, seed=2)[..., :d]
    lens = _lens([70, 33])
    _check(_cuda(q, kc, vc, lens), q, kc, vc, lens)
    flat = _randn(b * smax * hkv * d + 1, dtype=dtype, seed=3)
    kc2 = flat[1:].view(b, smax, hkv, d)
    _check(_cuda(q, kc2, vc, lens, num_splits=2), q, kc2, vc, lens)


# --- split-K -----------------------------------------------------------------------------------------


def test_split_count_does_not_change_the_result():
    q, kc, vc = _inputs(2, 3, 8, 2, 1000, 128, torch.float32)
    lens = _lens([1000, 517])
    one = _cuda(q, kc, vc, lens, num_splits=1)
    _check(one, q, kc, vc, lens)
    for splits in (2, 3, 7, 31, 1000):  # 1000 is more than there are tiles: capped
        assert_close_fp32(_cuda(q, kc, vc, lens, num_splits=splits), one)
    qb, kb, vb = (t.bfloat16() for t in (q, kc, vc))
    one = _cuda(qb, kb, vb, lens, num_splits=1)
    for splits in (3, 64):
        other = _cuda(qb, kb, vb, lens, num_splits=splits)
        scale = one.double().abs().max().item()
        assert (other.double() - one.double()).abs().max().item() <= ULP[torch.bfloat16] * scale


def test_opcheck():
    q, kc, vc = _inputs(2, 2, 4, 2, 40, 32, torch.float16)
    lens = _lens([40, 7])
    torch.library.opcheck(torch.ops.thinkfuse.decode_attention, (q, kc, vc, lens, None, 0.25, 0, 3, "cuda"))


# --- CUDA graphs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,smax", [(1, 8192), (16, 300)])  # several splits / one split
def test_cuda_graph_capture_and_replay(batch, smax):
    """No host synchronisation and a launch that depends only on shapes: a captured call
    replayed on new q, caches and lengths gives the eager result."""
    q, kc, vc = _inputs(batch, 2, 16, 4, smax, 128, torch.bfloat16)
    lens = _lens([smax - 3 * i for i in range(batch)])

    def step():
        return _cuda(q, kc, vc, lens, sliding_window=4000)

    torch.cuda.synchronize()
    graph, out = capture_cuda_graph(step)
    for i, t in enumerate((q, kc, vc)):
        t.copy_(_randn(*t.shape, dtype=t.dtype, seed=10 + i))
    lens.copy_(_lens([smax // 2 + 5 * i for i in range(batch)]))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, step())
    _check(out, q, kc, vc, lens, window=4000)


# --- left padding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [None, 1, 5])
def test_left_padding_is_skipped_in_place(dtype, splits):
    """cache_leftpad: each row's keys are slots [leftpad, seqlens); the padding slots hold NaN and
    must never be read. Padding inside the first tile, past a split, the queries alone, none, and
    out of range (negative: from 0; past the length: no key)."""
    q, kc, vc = _inputs(6, 2, 16, 4, 300, 128, dtype)
    lens = _lens([300, 290, 150, 40, 100, 30])
    pads = [3, 170, 0, 38, -7, 31]
    for row, pad in enumerate(pads):
        kc[row, :max(pad, 0)] = float("nan")
        vc[row, :max(pad, 0)] = float("nan")
    leftpad = _lens(pads)
    ours = _cuda(q, kc, vc, lens, num_splits=splits, cache_leftpad=leftpad, sliding_window=None)
    assert ours.shape == q.shape and ours.dtype == q.dtype
    ref = reference.decode_attention(q, kc, vc, lens, cache_leftpad=leftpad)
    if dtype == torch.float32:
        assert_close_fp32(ours, ref)
    else:
        truth = reference.decode_attention(q.double(), kc.double(), vc.double(), lens, cache_leftpad=leftpad)
        assert_low_precision_ok(ours, ref, truth)
    assert not ours[5].any(), "a row whose padding covers its keys outputs 0"


def test_left_padding_with_window_and_graph_replay():
    """Left padding with a sliding window, captured once and replayed with new pads and lengths."""
    q, kc, vc = _inputs(3, 1, 8, 2, 256, 64, torch.bfloat16)
    lens, leftpad = _lens([256, 200, 90]), _lens([10, 150, 0])
    graph, out = capture_cuda_graph(lambda: _cuda(q, kc, vc, lens, sliding_window=64, cache_leftpad=leftpad))
    for new_lens, new_pads in (([256, 200, 90], [10, 150, 0]), ([255, 230, 17], [250, 0, 3])):
        lens.copy_(_lens(new_lens))
        leftpad.copy_(_lens(new_pads))
        graph.replay()
        torch.cuda.synchronize()
        truth = reference.decode_attention(q.double(), kc.double(), vc.double(), lens, None, 64, cache_leftpad=leftpad)
        ref = reference.decode_attention(q, kc, vc, lens, None, 64, cache_leftpad=leftpad)
        assert_low_precision_ok(out, ref, truth)


# --- bad arguments at the binding -------------------------------------------------------------------


def _raw(q, kc, vc, lens, scale=0.125, window=0, splits=0, leftpad=None):
    from thinkfuse.ops._registry import cuda_ops

    return cuda_ops().decode_attention(q, kc, vc, lens, leftpad, scale, window, splits)


def _bad_binding_calls():
    q, kc, vc = _inputs(2, 2, 8, 2, 16, 32, torch.float16)
    lens = _lens([16, 3])
    return {
        "q-int": (lambda: _raw(q.int(), kc, vc, lens), TypeError, "q"),
        "k-dtype": (lambda: _raw(q, kc.float(), vc, lens), TypeError, "k_cache"),
        "v-dtype": (lambda: _raw(q, kc, vc.bfloat16(), lens), TypeError, "v_cache"),
        "seqlens-int64": (lambda: _raw(q, kc, vc, lens.long()), TypeError, "int32"),
        "seqlens-cpu": (lambda: _raw(q, kc, vc, lens.cpu()), ValueError, "cache_seqlens"),
        "seqlens-shape": (lambda: _raw(q, kc, vc, lens[:1]), ValueError, "cache_seqlens"),
        "q-rank": (lambda: _raw(q[0], kc, vc, lens), ValueError, "q"),
        "too-many-queries": (lambda: _raw(_randn(2, 17, 8, 32, dtype=torch.float16), kc, vc, lens), ValueError,
                             "query tokens"),
        "heads": (lambda: _raw(q[:, :, :7], kc, vc, lens), ValueError, "heads"),
        "head-dim": (lambda: _raw(q[..., :24], kc[..., :24], vc[..., :24], lens), ValueError, "head_dim"),
        "head-dim-mismatch": (lambda: _raw(q, kc[..., :16], vc[..., :16], lens), ValueError, "head_dim"),
        "v-shape": (lambda: _raw(q, kc, vc[:, :8], lens), ValueError, "v_cache"),
        "batch": (lambda: _raw(q[:1], kc, vc, lens[:1]), ValueError, "batch"),
        "q-last-stride": (lambda: _raw(_randn(2, 2, 8, 64, dtype=torch.float16)[..., ::2], kc, vc, lens),
                          ValueError, "unit stride"),
        "k-last-stride": (lambda: _raw(q, _randn(2, 16, 2, 64, dtype=torch.float16)[..., ::2], vc, lens),
                          ValueError, "unit stride"),
        "scale-nan": (lambda: _raw(q, kc, vc, lens, scale=float("nan")), ValueError, "softmax_scale"),
        "scale-zero": (lambda: _raw(q, kc, vc, lens, scale=0.0), ValueError, "softmax_scale"),
        "scale-overflow": (lambda: _raw(q, kc, vc, lens, scale=1e300), ValueError, "softmax_scale"),
        "leftpad-int64": (lambda: _raw(q, kc, vc, lens, leftpad=lens.long()), TypeError, "cache_leftpad"),
        "leftpad-cpu": (lambda: _raw(q, kc, vc, lens, leftpad=lens.cpu()), ValueError, "cache_leftpad"),
        "leftpad-shape": (lambda: _raw(q, kc, vc, lens, leftpad=lens[:1]), ValueError, "cache_leftpad"),
        "leftpad-strided": (lambda: _raw(q, kc, vc, lens, leftpad=_lens([0, 0, 0, 0])[::2]), ValueError,
                            "contiguous"),
    }


@pytest.mark.parametrize("case", list(_bad_binding_calls()) if _has_kernel() else [])
def test_bad_arguments_raise(case):
    call, error, word = _bad_binding_calls()[case]
    with pytest.raises(error, match=word):
        call()


def test_cpu_tensors_refused_by_the_cuda_backend():
    q = torch.randn(1, 1, 4, 32)
    kc = torch.randn(1, 8, 2, 32)
    with pytest.raises(ValueError, match="CUDA"):
        decode_attention(q, kc, kc, torch.tensor([8], dtype=torch.int32), backend="cuda")
