"""The real CUDA kernel sources, run on the CPU by the host emulator of tests/cuda_emulation.

csrc/ops/{flash_attention_fwd,flash_attention_bwd,decode_attention,mtp_verify,
flash_attention_fwd_sm90}.cu are compiled unchanged with g++ against an emulation of the CUDA
execution model (threads as fibers, warp collectives, cp.async / ldmatrix / mma.sync with the PTX
fragment semantics, NaN-poisoned shared memory, random interleavings; for the Hopper kernel TMA
with tensor maps, mbarriers, wgmma through shared-memory descriptors, named barriers and
setmaxnreg; see tests/cuda_emulation/README.md) and their launchers are driven as the torch
bindings drive them. Results are held to the tolerances the GPU tests use
(tests/test_attention.py, test_flash_attention_bwd_cuda.py, test_decode_attention_cuda.py,
test_flash_attention_sm90.py, tolerances.py) against reference.py (float64 truths for float16 /
bfloat16).

What this cannot see: timing, fast-math approximations (ex2.approx, approximate division), the
real memory model and real concurrency between blocks, register / occupancy limits. It catches
indexing, fragment-layout, masking, pipelining (cp.async waits, barriers), reduction and
launch-configuration bugs in the sources as written.

Needs g++ and the CUDA headers (not a GPU); skipped without them. The build is cached
(THINKFUSE_EMU_CACHE, default ~/.cache/thinkfuse/cuda_emulation/<hash of the sources>).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
from attention_helpers import (
    assert_low_close,
    assert_lse_close,
    assert_rows_without_keys_empty,
    cu_seqlens,
    failure_label,
    qkv,
    randn,
    reference_grads,
)
from tolerances import ULP, assert_close_fp32, assert_low_precision_ok

from thinkfuse import reference

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emulation"))
import emulator as emu  # noqa: E402

FP16, BF16 = torch.float16, torch.bfloat16


@pytest.fixture(scope="module")
def harness():
    try:
        return emu.build()
    except emu.Unavailable as e:
        pytest.skip(f"CUDA host emulation unavailable: {e}")


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x ([.., S, H, D]) in another memory layout with 16-byte aligned rows: heads-major storage
    [.., H, S, D], or rows padded by 8 elements (and starting 8 elements into the storage)."""
    if layout == "contig":
        return x.contiguous()
    if layout == "heads-major":
        return x.transpose(-3, -2).contiguous().transpose(-3, -2)
    if layout == "padded-rows":
        *lead, h, d = x.shape
        big = torch.zeros(*lead, h * d + 16, dtype=x.dtype)
        y = big[..., 8:8 + h * d].view(*lead, h, d)
        y.copy_(x)
        return y
    raise ValueError(layout)


# --- flash attention: cases ---------------------------------------------------------------------


@dataclass(frozen=True)
class Attn:
    d: int
    b: int = 1
    sq: int = 0
    sk: int = 0
    hq: int = 2
    hkv: int = 1
    causal: bool = True
    window: int | None = None
    lens_q: tuple | None = None  # packed (varlen) sequences
    lens_k: tuple | None = None
    tail: int = 0  # packed rows after the last sequence (left untouched by the forward)
    extra_max: int = 0  # max_seqlen above the longest sequence (allowed)
    layout: str = "contig"
    scale: float | None = None
    dlse: bool = True
    opts: dict = field(default_factory=dict)  # emulator options

    @property
    def packed(self):
        return self.lens_q is not None


# Emulator settings varied across the cases: cp.async landing (late / early / random), thread
# interleaving (warp-ordered / fully random), block order, two OS threads running blocks at once.
EARLY = dict(copies="early")
RANDOM = dict(copies="random", sched="random", seed=7)
WORKERS = dict(workers=2, copies="random", seed=3)

FWD_CASES = {
    "d16-causal-gqa2": Attn(16, b=1, sq=129, sk=129, hq=2, hkv=1),
    "d32-noncausal-sq<sk": Attn(32, sq=127, sk=200, hq=4, hkv=2, causal=False, opts=EARLY),
    "d64-causal-b2-gqa2": Attn(64, b=2, sq=150, sk=150, hq=4, hkv=2, opts=RANDOM),
    "d64-causal-sq<sk": Attn(64, sq=70, sk=200, hq=2, hkv=1),
    "d64-causal-sq>sk-rows-without-keys": Attn(64, sq=200, sk=70, hq=2, hkv=2, opts=WORKERS),
    "d64-one-query-many-keys": Attn(64, b=2, sq=1, sk=300, hq=4, hkv=4),
    "d96-noncausal-odd-gqa3": Attn(96, sq=130, sk=97, hq=3, hkv=1, causal=False),
    "d96-window37": Attn(96, sq=180, sk=260, hq=2, hkv=1, window=37, opts=RANDOM),
    "d128-causal-gqa8": Attn(128, sq=129, sk=129, hq=8, hkv=1, opts=EARLY),
    "d128-window1": Attn(128, b=2, sq=129, sk=129, hq=2, hkv=1, window=1),
    "d128-window-sq>sk": Attn(128, sq=260, sk=150, hq=2, hkv=1, window=70, opts=WORKERS),
    "d128-heads-major": Attn(128, b=2, sq=100, sk=140, hq=4, hkv=2, layout="heads-major"),
    "d256-window77": Attn(256, sq=150, sk=150, hq=2, hkv=1, window=77),
    "d256-noncausal": Attn(256, sq=65, sk=97, hq=2, hkv=2, causal=False, opts=RANDOM),
    "d64-seqlen1": Attn(64, b=3, sq=1, sk=1, hq=4, hkv=1),
    "d64-scale0.3-padded-rows": Attn(64, sq=90, sk=90, hq=4, hkv=2, scale=0.3, layout="padded-rows"),
    "packed-d128-empty-seqs": Attn(128, lens_q=(0, 150, 33, 129), lens_k=(5, 150, 70, 0), hq=4, hkv=2,
                                   opts=EARLY),
    "packed-d64-window50-tail": Attn(64, lens_q=(200, 7, 129), lens_k=(210, 7, 129), window=50, tail=5,
                                     extra_max=9),
    "packed-d32-noncausal-heads-major": Attn(32, lens_q=(70, 0, 33, 127), lens_k=(40, 9, 130, 1), hq=2, hkv=2,
                                             causal=False, layout="heads-major", opts=RANDOM),
    "packed-d96-no-keys-for-some": Attn(96, lens_q=(5, 4, 3), lens_k=(0, 3, 6), hq=2, hkv=1, opts=WORKERS),
    "packed-d256-mixed": Attn(256, lens_q=(1, 64, 0, 40), lens_k=(1, 70, 3, 33), hq=2, hkv=1),
    # many key blocks: the unmasked interior path between the diagonal and the window edge
    "d128-causal-1000": Attn(128, sq=1000, sk=1000, hq=2, hkv=1),
    "d64-window100-1000": Attn(64, sq=1000, sk=1000, hq=2, hkv=1, window=100, opts=RANDOM),
}


def _attn_inputs(c: Attn, dtype, seed=11):
    b, sq, sk = (None, sum(c.lens_q) + c.tail, sum(c.lens_k) + c.tail) if c.packed else (c.b, c.sq, c.sk)
    return tuple(_layout(t, c.layout) for t in qkv(b, sq, sk, c.hq, c.hkv, c.d, dtype, seed))


def _varlen_args(c: Attn):
    if not c.packed:
        return {}
    return dict(cu_q=cu_seqlens(c.lens_q), cu_k=cu_seqlens(c.lens_k), max_q=max(c.lens_q) + c.extra_max,
                max_k=max(c.lens_k) + c.extra_max)


def _reference_fwd(c: Attn, q, k, v, scale):
    """reference.flash_attention (float32 compute), and rows after the last packed sequence as
    the binding initialises them (0 / -inf): the kernel leaves them alone."""
    cu_q, cu_k = (cu_seqlens(c.lens_q), cu_seqlens(c.lens_k)) if c.packed else (None, None)
    qs = q[: q.shape[0] - c.tail] if c.tail else q
    out, lse = reference.flash_attention(qs, k, v, c.causal, scale, c.window, cu_q, cu_k, return_lse=True)
    if c.tail:
        out = torch.cat([out, torch.zeros(c.tail, *out.shape[1:], dtype=out.dtype)])
        lse = torch.cat([lse, torch.full((lse.shape[0], c.tail), float("-inf"))], dim=1)
    return out, lse


def _check_fwd(harness, c: Attn, dtype):
    q, k, v = _attn_inputs(c, dtype)
    scale = c.scale if c.scale is not None else c.d ** -0.5
    r = emu.flash_fwd(harness, q, k, v, c.causal, scale, c.window, **_varlen_args(c), options=emu.Options(**c.opts))
    assert r.status == 0, emu.ERRORS.get(r.status, r.status)
    assert [launch.threads for launch in r.launches] == [128]
    ref_out, ref_lse = _reference_fwd(c, q, k, v, scale)
    assert_low_close(r.out, ref_out.to(dtype), 4, "out")  # test_attention.py's forward tolerance
    assert_lse_close(r.lse, ref_lse)


@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", list(FWD_CASES))
def test_flash_attention_forward(harness, case, dtype):
    _check_fwd(harness, FWD_CASES[case], dtype)


def test_flash_attention_forward_refuses_misaligned_rows(harness):
    """The launcher's own check (the binding copies such inputs first): an odd element offset."""
    q = randn(1, 64, 2, 65, dtype=FP16)[..., 1:]
    k, v = randn(1, 64, 2, 64, dtype=FP16, seed=1), randn(1, 64, 2, 64, dtype=FP16, seed=2)
    r = emu.flash_fwd(harness, q, k, v)
    assert r.status == 1 and not r.launches  # cudaErrorInvalidValue


# --- flash attention forward, Hopper kernel ----------------------------------------------------
# flash_attention_fwd_sm90.cuh (TMA tile loads completing on mbarriers, wgmma with shared-memory
# descriptors and a register A operand, a producer warp and two ping-ponging consumer warpgroups,
# the packed layout's cp.async V tail) on the emulated Hopper primitives, driven as
# csrc/bindings/flash_attention_sm90.cpp drives it, against reference.py in float64 under
# test_flash_attention_sm90.py's tolerances. Packed cases put NaN / inf in the rows after the last
# sequence (as the GPU test does): a key block running past its sequence must keep them out.

SM90_SMEM = {64: 83016, 128: 164936}  # Config<D>::kSmemBytes

SM90_CASES = {
    "d64-causal-b2-gqa2": (Attn(64, b=2, sq=150, sk=150, hq=4, hkv=2), FP16),
    "d128-causal-b2-gqa2": (Attn(128, b=2, sq=150, sk=150, hq=4, hkv=2, opts=RANDOM), BF16),
    "d64-noncausal-sq<sk-odd-gqa3": (Attn(64, sq=127, sk=300, hq=3, hkv=1, causal=False, opts=EARLY), BF16),
    # bottom-right causal: the 70 queries see keys up to 263 .. 332
    "d128-causal-sq<sk": (Attn(128, sq=70, sk=333, hq=2, hkv=1, opts=dict(smem_window_base=1024)), FP16),
    "d128-causal-sq>sk-rows-without-keys": (Attn(128, sq=300, sk=129, hq=2, hkv=2, opts=WORKERS), BF16),
    "d64-window37-gqa4": (Attn(64, sq=400, sk=400, hq=8, hkv=2, window=37), BF16),
    "d64-window70-sq>sk": (Attn(64, sq=260, sk=150, hq=2, hkv=1, window=70, opts=RANDOM), FP16),
    # five key blocks: the two-stage ring wraps (mbarrier parities 0, 1, 0), unmasked interior blocks
    "d128-causal-640": (Attn(128, sq=640, sk=640, hq=2, hkv=1), BF16),
    "d128-window100-640": (Attn(128, sq=640, sk=640, hq=2, hkv=1, window=100, opts=RANDOM), FP16),
    "d128-seqlen1": (Attn(128, b=3, sq=1, sk=1, hq=4, hkv=1), FP16),
    "d128-no-keys-at-all": (Attn(128, b=2, sq=40, sk=0, hq=4, hkv=2), BF16),
    # tensor maps with other strides: heads-major storage, rows padded by 16 elements
    "d64-noncausal-heads-major": (Attn(64, b=2, sq=100, sk=140, hq=4, hkv=2, causal=False, layout="heads-major"), FP16),
    "d128-scale0.3-padded-rows": (Attn(128, sq=90, sk=90, hq=4, hkv=2, scale=0.3, layout="padded-rows", opts=EARLY),
                                  BF16),
    "packed-d128-long-and-short": (Attn(128, lens_q=(0, 700, 3, 1, 0, 17, 129), lens_k=(0, 700, 3, 1, 0, 17, 129),
                                        hq=4, hkv=2, tail=7, extra_max=3), BF16),
    "packed-d64-q-shorter-window33": (Attn(64, lens_q=(1, 5, 0, 64, 200), lens_k=(9, 400, 0, 64, 1000), hq=4, hkv=2,
                                           window=33, tail=7, extra_max=5, opts=RANDOM), FP16),
    "packed-d128-noncausal-no-keys-for-some": (Attn(128, lens_q=(3, 130, 4), lens_k=(0, 1, 6), hq=2, hkv=1,
                                                    causal=False, tail=5, opts=EARLY), FP16),
    "packed-d64-block-multiples": (Attn(64, lens_q=(128, 256, 127), lens_k=(128, 256, 129), hq=2, hkv=2, tail=3,
                                        opts=WORKERS), BF16),
}
# The same kernel built with Config::kPingPong = false (the consumers issue without taking turns).
SM90_NO_PINGPONG_CASES = ["d128-causal-b2-gqa2", "d64-window70-sq>sk", "packed-d64-q-shorter-window33"]


@pytest.fixture(scope="module")
def harness_no_pingpong(harness):
    return emu.build(variant="SM90_NO_PINGPONG")


def _sm90_inputs(c: Attn, dtype, seed=11):
    """q / k / v of the case; packed: NaN in q / k and inf in v after the last sequence."""
    b, sq, sk = (None, sum(c.lens_q) + c.tail, sum(c.lens_k) + c.tail) if c.packed else (c.b, c.sq, c.sk)
    q, k, v = qkv(b, sq, sk, c.hq, c.hkv, c.d, dtype, seed)
    if c.packed and c.tail:
        q[sum(c.lens_q):] = float("nan")
        k[sum(c.lens_k):] = float("nan")
        v[sum(c.lens_k):] = float("inf")
    return tuple(_layout(t, c.layout) for t in (q, k, v))


def _reference_sm90(c: Attn, q, k, v, scale):
    """reference.py in float64, out rounded to the dtype (test_flash_attention_sm90.py's truth);
    rows after the last packed sequence as the binding initialises them (0 / -inf)."""
    cu_q, cu_k = (cu_seqlens(c.lens_q), cu_seqlens(c.lens_k)) if c.packed else (None, None)
    n = q.shape[0] - c.tail if c.packed else q.shape[0]
    out, lse = reference.flash_attention(q[:n].double(), k.double(), v.double(), c.causal, scale, c.window, cu_q,
                                         cu_k, return_lse=True)
    out, lse = out.to(q.dtype), lse.float()
    if c.packed and c.tail:
        out = torch.cat([out, torch.zeros(c.tail, *out.shape[1:], dtype=out.dtype)])
        lse = torch.cat([lse, torch.full((lse.shape[0], c.tail), float("-inf"))], dim=1)
    return out, lse


def _check_fwd_sm90(exe, c: Attn, dtype):
    q, k, v = _sm90_inputs(c, dtype)
    scale = c.scale if c.scale is not None else c.d ** -0.5
    var = _varlen_args(c)
    r = emu.flash_fwd_sm90(exe, q, k, v, c.causal, scale, c.window, **var, options=emu.Options(**c.opts))
    assert r.status == 0, emu.ERRORS.get(r.status, r.status)
    max_q = var["max_q"] if c.packed else c.sq
    batch = len(c.lens_q) if c.packed else c.b
    # one launch: ceil(max_seqlen_q / 128) x heads x batch CTAs of 3 warpgroups
    assert [(launch.grid, launch.threads, launch.smem) for launch in r.launches] == \
        [(((max_q + 127) // 128, c.hq, batch), 384, SM90_SMEM[c.d])], r.launches
    # the ping-pong's bar.arrive / bar.sync balance: no named barrier left half-arrived at exit
    assert r.values["named_barrier_leftovers"] == 0
    ref_out, ref_lse = _reference_sm90(c, q, k, v, scale)
    assert_low_close(r.out, ref_out, 4, "out")  # test_flash_attention_sm90.py's tolerances
    assert_lse_close(r.lse, ref_lse)
    if not c.packed:
        assert_rows_without_keys_empty(r.out, r.lse, c.causal, c.sq, c.sk)


@pytest.mark.parametrize("case", list(SM90_CASES))
def test_flash_attention_forward_sm90(harness, case):
    _check_fwd_sm90(harness, *SM90_CASES[case])


@pytest.mark.parametrize("case", SM90_NO_PINGPONG_CASES)
def test_flash_attention_forward_sm90_without_pingpong(harness_no_pingpong, case):
    _check_fwd_sm90(harness_no_pingpong, *SM90_CASES[case])


@pytest.mark.parametrize("options", [dict(device=1), dict(kernel_regs=160)], ids=["a100", "fewer-registers"])
def test_flash_attention_forward_sm90_refuses(harness, options):
    """cudaErrorNotSupported without a launch on a device that is not compute capability 9.0, and
    for an image whose register count could not feed the consumers' setmaxnreg.inc (the
    launcher's check of cudaFuncGetAttributes: 160 x 384 < 24 x 128 + 240 x 256)."""
    q, k, v = qkv(1, 64, 64, 2, 1, 64, FP16)
    r = emu.flash_fwd_sm90(harness, q, k, v, options=emu.Options(**options))
    assert r.status == 801 and not r.launches, (r.status, r.launches)


# --- flash attention backward -----------------------------------------------------------------


# (case, dtype); each runs with the 8-warp two-stage configuration (H100 / A100 shared memory)
# and the 4-warp one-stage one (an sm_86 device's 99 KB).
BWD_CASES = {
    "d64-causal-b2-gqa2": (Attn(64, b=2, sq=150, sk=150, hq=4, hkv=2), FP16),
    "d64-causal-sq<sk": (Attn(64, sq=70, sk=200, hq=2, hkv=1, opts=RANDOM), BF16),
    "d96-causal-sq>sk-rows-without-keys": (Attn(96, sq=200, sk=70, hq=2, hkv=2, opts=EARLY), FP16),
    "d96-noncausal-gqa3-no-dlse": (Attn(96, sq=130, sk=97, hq=3, hkv=1, causal=False, dlse=False), BF16),
    "d128-window37": (Attn(128, sq=180, sk=260, hq=2, hkv=1, window=37, opts=WORKERS), BF16),
    "d128-heads-major-scale0.3": (Attn(128, b=2, sq=90, sk=120, hq=4, hkv=2, layout="heads-major", scale=0.3),
                                  FP16),
    "packed-d128-empty-seqs": (Attn(128, lens_q=(0, 150, 33, 129), lens_k=(5, 150, 70, 0), hq=4, hkv=2,
                                    opts=WORKERS), FP16),
    "packed-d64-window50-tail": (Attn(64, lens_q=(200, 7, 129), lens_k=(210, 7, 129), window=50, tail=5,
                                      extra_max=9, layout="padded-rows", opts=RANDOM), BF16),
    "packed-d96-no-keys-for-some": (Attn(96, lens_q=(5, 4, 3), lens_k=(0, 3, 6), hq=2, hkv=1), BF16),
    # many query blocks adding into the same dQ rows (atomics from concurrent blocks)
    "d128-causal-512": (Attn(128, sq=512, sk=512, hq=2, hkv=1, opts=WORKERS), BF16),
    "d64-window300-sq<<sk": (Attn(64, sq=17, sk=1000, hq=4, hkv=1, window=300), FP16),
}
# The launcher picks the configuration from the device's shared memory: H100 (227 KB) takes the
# 8-warp one at every head dim; the emulated 90 KB part the 4-warp one.
BWD_DEVICES = {"8warps-2stages": 0, "4warps-1stage": 3}
BWD_THREADS = {"8warps-2stages": 256, "4warps-1stage": 128}


def _check_bwd(harness, c: Attn, dtype, config):
    q, k, v = _attn_inputs(c, dtype)
    scale = c.scale if c.scale is not None else c.d ** -0.5
    var = _varlen_args(c)
    cu_q, cu_k = var.get("cu_q"), var.get("cu_k")
    # the forward's out / lse from the reference (rows after the last packed sequence: 0 / -inf)
    ref_out, lse = _reference_fwd(c, q, k, v, scale)
    out = _layout(ref_out.to(dtype), c.layout)
    dout = _layout(randn(*q.shape, dtype=dtype, seed=5), c.layout)
    dlse = torch.where(torch.isfinite(lse), randn(*lse.shape, seed=6), 0.0) if c.dlse else None
    r = emu.flash_bwd(harness, dout, q, k, v, out, lse, dlse, c.causal, scale, c.window, **var,
                      options=emu.Options(device=BWD_DEVICES[config], **c.opts))
    assert r.status == 0, emu.ERRORS.get(r.status, r.status)
    dq, dk, dv = r.dq, r.dk, r.dv
    # preprocess, dK/dV with the configuration under test (no key at all: none), convert
    max_k = var["max_k"] if c.packed else c.sk
    assert [launch.threads for launch in r.launches] == [256] + [BWD_THREADS[config]] * (max_k > 0) + [256], \
        r.launches
    # truths on the rows inside the sequences (packed tails: dq 0, dk / dv untouched zeros)
    n = q.shape[0] - c.tail
    nk = k.shape[0] - c.tail
    qs, ks, vs, ds = (q[:n], k[:nk], v[:nk], dout[:n]) if c.tail else (q, k, v, dout)
    dl = dlse[:, :n] if (c.tail and dlse is not None) else dlse
    low, truth = reference_grads(qs, ks, vs, ds, dl, c.causal, scale, c.window, cu_q, cu_k)
    if c.tail:
        assert not dq[n:].any() and not dk[nk:].any() and not dv[nk:].any(), "rows outside the sequences"
    for name, o, lo, t in zip(("dq", "dk", "dv"), (dq[:n], dk[:nk], dv[:nk]), low, truth):
        with failure_label(name):
            if t.numel() and not t.any():
                # an exactly zero gradient (one visible key per row: dS = 0), which the eager
                # computation reproduces exactly: the relative bound would be 0
                assert not torch.isnan(o).any(), "NaN in result"
                err = o.double().abs().max().item()
                assert err <= ULP[dtype], f"error {err:.3e} where the gradient is exactly 0"
            else:
                assert_low_precision_ok(o, lo.to(dtype), t)


@pytest.mark.parametrize("config", list(BWD_DEVICES))
@pytest.mark.parametrize("case", list(BWD_CASES))
def test_flash_attention_backward(harness, case, config):
    _check_bwd(harness, *BWD_CASES[case], config)


# --- decode attention -------------------------------------------------------------------------


@dataclass(frozen=True)
class Decode:
    d: int
    b: int = 2
    sq: int = 1
    hq: int = 8
    hkv: int = 2
    smax: int = 100
    lens: tuple = (100, 37)
    splits: int = 0  # 0: the heuristic (H100), else the requested count
    window: int | None = None
    scale: float | None = None
    layout: str = "contig"  # contig | strided (transposed q, interleaved k/v) | unaligned
    opts: dict = field(default_factory=dict)


# G * Sq rows per kv head: <= 8 -> 8-row blocks, <= 16 -> 16, else 32-row tiles.
DECODE_SHAPES = [
    dict(sq=1, hq=8, hkv=2, smax=300, lens=(300, 1, 157)),  # 4 rows
    dict(sq=2, hq=12, hkv=2, smax=200, lens=(200, 77)),  # 12 rows
    dict(sq=4, hq=16, hkv=2, smax=130, lens=(5, 130)),  # 32 rows
    dict(sq=16, hq=10, hkv=2, smax=90, lens=(90, 40)),  # 80 rows: three row tiles
]


def _decode_grid():
    """Every dtype x head dim once, the row tilings and split requests cycling through them."""
    cases = {}
    combos = [(dt, d) for dt in (torch.float32, FP16, BF16) for d in (16, 32, 64, 96, 128, 256)]
    for i, (dtype, d) in enumerate(combos):
        shape = DECODE_SHAPES[i % len(DECODE_SHAPES)]
        splits = (0, 1, 3)[i % 3]
        name = f"{emu.DTYPE_NAMES[dtype]}-d{d}-sq{shape['sq']}-g{shape['hq'] // shape['hkv']}-splits{splits}"
        opts = (EARLY, RANDOM, {}, WORKERS)[i % 4]
        cases[name] = (Decode(d, b=len(shape["lens"]), splits=splits, opts=opts, **shape), dtype)
    return cases


EDGE_LENGTHS = (0, 1, 3, 4, 33, 100, 150, -5, 2**31 - 1)
DECODE_CASES = _decode_grid()
DECODE_CASES.update({
    # lengths 0, 1, shorter than Sq, past S_max, negative; one split and 64 requested
    "edge-lengths-bf16-d32": (Decode(32, b=9, sq=4, smax=100, lens=EDGE_LENGTHS, splits=1), BF16),
    "edge-lengths-fp32-d32-splits64": (Decode(32, b=9, sq=4, smax=100, lens=EDGE_LENGTHS, splits=64), torch.float32),
    "window5-bf16-d128-splits3": (Decode(128, b=4, sq=4, hq=16, hkv=4, smax=300, lens=(300, 45, 4, 2), window=5,
                                         splits=3, opts=RANDOM), BF16),
    "window64-fp32-d64": (Decode(64, b=2, sq=3, hq=4, hkv=4, smax=200, lens=(200, 70), window=64), torch.float32),
    "strided-fp16-d64-splits2": (Decode(64, b=3, sq=4, hq=16, hkv=4, smax=120, lens=(120, 61, 4), splits=2,
                                        layout="strided"), FP16),
    "unaligned-kv-bf16-d64": (Decode(64, b=3, sq=2, hq=8, hkv=4, smax=120, lens=(120, 61, 4), layout="unaligned",
                                     opts=EARLY), BF16),
    "unaligned-kv-fp32-d32-splits3": (Decode(32, b=2, sq=1, hq=4, hkv=1, smax=150, lens=(150, 9), splits=3,
                                             layout="unaligned"), torch.float32),
    "scale2-fp16-d96": (Decode(96, b=2, sq=2, hq=8, hkv=2, smax=50, lens=(50, 20), scale=2.0), FP16),
    "empty-cache-fp16-d64": (Decode(64, b=2, sq=2, hq=4, hkv=2, smax=0, lens=(0, 5)), FP16),
    "long-heuristic-splits-bf16-d128": (Decode(128, b=1, sq=1, hq=8, hkv=8, smax=3000, lens=(2900,),
                                               opts=WORKERS), BF16),
})


def _decode_inputs(c: Decode, dtype, seed=0):
    q = randn(c.b, c.sq, c.hq, c.d, dtype=dtype, seed=seed)
    if c.layout == "strided":
        q = randn(c.b, c.hq, c.sq, c.d, dtype=dtype, seed=seed).transpose(1, 2)
        kv = randn(c.b, c.smax, 2, c.hkv, c.d, dtype=dtype, seed=seed + 1)
        return q, kv[:, :, 0], kv[:, :, 1]
    if c.layout == "unaligned":  # rows not 16-byte aligned: the kernel's scalar-load path
        kc = randn(c.b, c.smax, c.hkv, c.d + 1, dtype=dtype, seed=seed + 1)[..., 1:]
        vc = randn(c.b, c.smax, c.hkv, c.d + 1, dtype=dtype, seed=seed + 2)[..., : c.d]
        return q, kc, vc
    kc = randn(c.b, c.smax, c.hkv, c.d, dtype=dtype, seed=seed + 1)
    vc = randn(c.b, c.smax, c.hkv, c.d, dtype=dtype, seed=seed + 2)
    return q, kc, vc


def _check_decode(harness, c: Decode, dtype):
    q, kc, vc = _decode_inputs(c, dtype)
    lens = torch.tensor(c.lens, dtype=torch.int32)
    r = emu.decode(harness, q, kc, vc, lens, c.scale, c.window, c.splits, options=emu.Options(**c.opts))
    assert r.status == 0, emu.ERRORS.get(r.status, r.status)
    out, splits = r.out, r.splits
    assert splits >= 1
    if c.splits == 1:
        assert splits == 1
    # the split kernel, then the combine kernel when the keys were split
    assert [launch.kernel.split("<")[0] for launch in r.launches] == (
        ["split_kernel"] + (["combine_kernel"] if splits > 1 else [])), r.launches
    ref_lens = lens.clamp(0, c.smax)
    ref = reference.decode_attention(q, kc, vc, ref_lens, c.scale, c.window)
    if dtype == torch.float32:
        assert_close_fp32(out, ref)
    else:
        truth = reference.decode_attention(q.double(), kc.double(), vc.double(), ref_lens, c.scale, c.window)
        assert_low_precision_ok(out, ref, truth)
    if c.smax == 0 or 0 in c.lens:
        for b, n in enumerate(c.lens):
            if n <= 0 or c.smax == 0:
                assert not out[b].any(), "a row without keys must output 0"


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_attention(harness, case):
    _check_decode(harness, *DECODE_CASES[case])


def test_decode_attention_heuristic_splits(harness):
    """The long batch-1 cache gets several splits from the H100 heuristic (the split path and the
    combine kernel run in test_decode_attention's long-heuristic case)."""
    c, dtype = DECODE_CASES["long-heuristic-splits-bf16-d128"]
    q, kc, vc = _decode_inputs(c, dtype)
    assert emu.decode(harness, q, kc, vc, torch.tensor(c.lens, dtype=torch.int32)).splits > 1


# --- mtp_verify ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mtp:
    b: int = 2
    k: int = 3
    vocab: int = 3000
    temperature: float = 0.0
    probs: bool = False
    splits: int = 1  # 1: the one-block kernel; >= 2 slices per row; 0 the heuristic
    dtype: torch.dtype = BF16
    accept: float = 0.7  # fraction of draft positions made to match the target's argmax
    special: str = ""  # "ties" | "nan-row" | "invalid-draft" | "unaligned" | "all-neg-inf"
    opts: dict = field(default_factory=dict)


MTP_CASES = {
    "greedy-one-block": Mtp(),
    "greedy-split4": Mtp(splits=4, opts=WORKERS),
    "greedy-split3-ties-unaligned": Mtp(splits=3, special="ties", dtype=FP16, vocab=2501, opts=RANDOM),
    "greedy-one-block-nan-invalid": Mtp(special="nan-row", dtype=torch.float32),
    "greedy-split-heuristic-k0": Mtp(b=3, k=0, splits=0),
    "sampled-one-block": Mtp(temperature=0.8),
    "sampled-split5": Mtp(temperature=0.8, splits=5, opts=WORKERS),
    "sampled-probs-one-block": Mtp(temperature=1.2, probs=True, dtype=FP16),
    "sampled-probs-split4": Mtp(temperature=1.2, probs=True, splits=4, opts=RANDOM),
    "sampled-split3-invalid-draft": Mtp(temperature=0.6, splits=3, special="invalid-draft", dtype=torch.float32),
    # a 40k vocabulary: several inverse-CDF tiles per slice / row, the split heuristic
    "greedy-ties-40k-heuristic": Mtp(b=1, k=3, vocab=40000, splits=0, special="ties", dtype=FP16),
    "sampled-40k-heuristic": Mtp(b=1, k=4, vocab=40000, temperature=0.9, splits=0),
    "sampled-probs-40k-heuristic": Mtp(b=1, k=4, vocab=40000, temperature=0.9, probs=True, splits=0, accept=0.3),
    "sampled-probs-33k-one-block": Mtp(b=2, k=3, vocab=33000, temperature=0.7, probs=True),
}


def _mtp_inputs(c: Mtp, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(c.b, c.k + 1, c.vocab, generator=g) * 3).to(c.dtype)
    if c.special == "ties":  # the maximum repeated: the lowest id wins
        # 3, 5 and 7 share a thread's 16-byte chunk (so its own scan must keep the first of equals);
        # 2000 lies with another thread (the reduction across threads must too)
        logits[:, :, [3, 5, 7, 2000]] = 50
    if c.special == "unaligned" or c.vocab % 8:
        big = torch.zeros(c.b, c.k + 1, c.vocab + 1, dtype=c.dtype)
        big[..., 1:] = logits
        logits = big[..., 1:]
    target = logits.float().nan_to_num(float("inf")).argmax(-1)
    draft = torch.randint(0, c.vocab, (c.b, c.k), generator=g)
    keep = torch.rand(c.b, c.k, generator=g) < c.accept
    draft = torch.where(keep, target[:, : c.k], draft)
    if c.special == "nan-row":
        logits[0, 0, 11] = float("nan")
    if c.special == "invalid-draft" and c.k:
        draft[0, 0] = c.vocab + 5
        draft[-1, -1] = -3
    probs = None
    if c.probs:
        probs = torch.softmax(torch.randn(c.b, c.k, c.vocab, generator=g), -1).to(c.dtype)
        # make some drafts likely to be rejected with a residual draw
        probs.scatter_(-1, draft[..., None].clamp(0, c.vocab - 1), 0.9)
    uniforms = torch.rand(c.b, c.k + 1, generator=g)
    return draft, logits, probs, uniforms


def _check_mtp(harness, c: Mtp):
    draft, logits, probs, uniforms = _mtp_inputs(c)
    r = emu.mtp_verify(harness, draft, logits, c.temperature, probs, uniforms if c.temperature > 0 else None,
                       c.splits, options=emu.Options(**c.opts))
    assert r.status == 0, emu.ERRORS.get(r.status, r.status)
    tokens, accepted = r.tokens, r.num_accepted
    assert (r.splits == 0) == (c.splits == 1)
    kernels = [launch.kernel.split("<")[0] for launch in r.launches]
    if r.splits == 0:
        assert kernels == ["sampled_kernel" if c.temperature > 0 else "greedy_kernel"], kernels
    else:
        assert kernels[0] == ("split_sampled_kernel" if c.temperature > 0 else "split_greedy_kernel"), kernels
        assert kernels[1:] == (["split_residual_kernel"] if c.temperature > 0 and c.probs and c.k > 0 else [])
    ref_tokens, ref_accepted = reference.mtp_verify(draft, logits, c.temperature, probs, uniforms)
    assert torch.equal(accepted, ref_accepted), (accepted, ref_accepted)
    assert torch.equal(tokens, ref_tokens), (tokens, ref_tokens)


@pytest.mark.parametrize("case", list(MTP_CASES))
def test_mtp_verify(harness, case):
    _check_mtp(harness, MTP_CASES[case])


# --- random sweeps ------------------------------------------------------------------------------
# Seeded random shapes and emulator settings (deterministic; the failing case's parameters are in
# the message). Sizes straddle the tile boundaries (63/64/65, 127/128/129).

SIZES = (1, 5, 63, 64, 65, 127, 128, 129, 200, 333)


def _random_opts(r):
    return dict(seed=r.randrange(1 << 30), copies=r.choice(("late", "early", "random")),
                sched=r.choice(("warp", "random")), workers=r.choice((1, 1, 2)))


def _random_attn(seed, backward):
    import random

    r = random.Random(seed)
    d = r.choice((64, 96, 128) if backward else (16, 32, 64, 96, 128, 256))
    hkv = r.choice((1, 2))
    hq = hkv * r.choice((1, 3, 4))
    causal = r.random() < 0.75
    window = r.choice((None, None, 1, 2, 17, 64, 65, 129, 500)) if causal else None
    layout = r.choice(("contig", "heads-major", "padded-rows"))
    scale = r.choice((None, None, 0.02, 1.0))
    opts = _random_opts(r)
    if r.random() < 0.4:
        n = r.randint(1, 4)
        lens_q = tuple(r.choice((0,) + SIZES[:8]) for _ in range(n))
        lens_k = tuple(r.choice((0,) + SIZES[:8]) for _ in range(n))
        if max(lens_q) == 0:
            lens_q = (1,) + lens_q[1:]
        c = Attn(d, hq=hq, hkv=hkv, causal=causal, window=window, lens_q=lens_q, lens_k=lens_k,
                 tail=r.choice((0, 0, 3)), extra_max=r.choice((0, 0, 7)), layout=layout, scale=scale,
                 dlse=r.random() < 0.7, opts=opts)
    else:
        sq = r.choice(SIZES)
        sk = r.choice(SIZES) if r.random() < 0.7 else sq
        c = Attn(d, b=r.choice((1, 2)), sq=sq, sk=sk, hq=hq, hkv=hkv, causal=causal, window=window, layout=layout,
                 scale=scale, dlse=r.random() < 0.7, opts=opts)
    return c, r.choice((FP16, BF16))


@pytest.mark.parametrize("seed", range(32), ids=lambda s: f"seed{s}")
def test_random_flash_attention_forward(harness, seed):
    c, dtype = _random_attn(1000 + seed, backward=False)
    with failure_label(f"{c} {dtype}"):
        _check_fwd(harness, c, dtype)


def _random_attn_sm90(seed):
    """A random case for the sm90 kernel: head dim 64 / 128, packed ones with junk after the last
    sequence (tail), lengths around the 128-row tiles."""
    import random

    r = random.Random(seed)
    c, dtype = _random_attn(seed, backward=False)
    d = r.choice((64, 128))
    if c.packed:
        return replace(c, d=d, tail=r.choice((0, 3, 7))), dtype
    return replace(c, d=d), dtype


@pytest.mark.parametrize("seed", range(16), ids=lambda s: f"seed{s}")
def test_random_flash_attention_forward_sm90(harness, seed):
    c, dtype = _random_attn_sm90(5000 + seed)
    with failure_label(f"{c} {dtype}"):
        _check_fwd_sm90(harness, c, dtype)


@pytest.mark.parametrize("seed", range(24), ids=lambda s: f"seed{s}")
def test_random_flash_attention_backward(harness, seed):
    c, dtype = _random_attn(2000 + seed, backward=True)
    config = list(BWD_DEVICES)[seed % 2]
    with failure_label(f"{c} {dtype} {config}"):
        _check_bwd(harness, c, dtype, config)


@pytest.mark.parametrize("seed", range(32), ids=lambda s: f"seed{s}")
def test_random_decode_attention(harness, seed):
    import random

    r = random.Random(3000 + seed)
    dtype = r.choice((torch.float32, FP16, BF16))
    hkv = r.choice((1, 2))
    sq = r.choice((1, 1, 2, 3, 4, 8, 16))
    smax = r.choice((0, 1, 7, 64, 65, 130, 400))
    b = r.randint(1, 3)
    lens = tuple(r.choice((0, 1, sq, smax, smax + 3, r.randint(0, max(smax, 1)), -2)) for _ in range(b))
    c = Decode(r.choice((16, 32, 64, 96, 128, 256)), b=b, sq=sq, hq=hkv * r.choice((1, 2, 4, 5, 8)), hkv=hkv,
               smax=smax, lens=lens, splits=r.choice((0, 1, 2, 3, 7)),
               window=r.choice((None, None, 1, 3, 50)), scale=r.choice((None, 0.05)),
               layout=r.choice(("contig", "strided", "unaligned")), opts=_random_opts(r))
    with failure_label(f"{c} {dtype}"):
        _check_decode(harness, c, dtype)


@pytest.mark.parametrize("seed", range(24), ids=lambda s: f"seed{s}")
def test_random_mtp_verify(harness, seed):
    import random

    r = random.Random(4000 + seed)
    c = Mtp(b=r.randint(1, 3), k=r.choice((0, 1, 2, 4)), vocab=r.choice((1, 7, 9, 100, 1000, 4099)),
            temperature=r.choice((0.0, 0.0, 0.5, 1.0)), probs=r.random() < 0.5, splits=r.choice((1, 1, 2, 3, 0, 16)),
            dtype=r.choice((torch.float32, FP16, BF16)), accept=r.choice((0.3, 0.9)),
            special=r.choice(("", "", "unaligned", "invalid-draft")), opts=_random_opts(r))
    if c.temperature == 0:
        c = replace(c, probs=False)
    with failure_label(c):
        _check_mtp(harness, c)


# --- the harness can fail -----------------------------------------------------------------------

# Each deliberately wrong emulator (tests/cuda_emulation/src/runtime.cpp, EMU_MUTATE_*) must fail
# the sweeps: proof that a pass means the kernels were checked, not that nothing was compared.
MUTANT_RUNS = {
    # a fragment index of the non-transposed ldmatrix (Q / K fragments): wrong scores
    "LDMATRIX": [("fwd", "d64-causal-b2-gqa2", FP16), ("bwd", "d64-causal-sq<sk", BF16)],
    # one B element of mma.sync: wrong products in every tensor-core kernel
    "MMA": [("fwd", "d128-causal-gqa8", BF16), ("decode", "fp16-d16-sq4-g8-splits0", None)],
    # cp.async.wait_group N leaves a group too many in flight: the emulator reports the read
    "CP_ASYNC_WAIT": [("fwd", "d96-window37", FP16), ("decode", "bf16-d64-sq4-g8-splits3", None)],
    # TMA places the 16-byte chunks with a wrong 128-byte swizzle: wgmma reads other elements
    "TMA_SWIZZLE": [("fwd_sm90", "d64-causal-b2-gqa2", None)],
    # wgmma ignores the MN-major descriptor's leading byte offset: V columns 64 .. 127 (head dim 128)
    # read as columns 0 .. 63
    "WGMMA_LBO": [("fwd_sm90", "d128-causal-sq<sk", None)],
    # TMA signals only the in-bounds bytes of a box: a tile past the tensor's end never completes its
    # mbarrier phase, which the emulator reports as a deadlock
    "TMA_TX": [("fwd_sm90", "d128-causal-sq>sk-rows-without-keys", None)],
}


def _run_sweep_case(harness, kind, case, dtype):
    if kind == "fwd_sm90":
        _check_fwd_sm90(harness, *SM90_CASES[case])
    elif kind == "fwd":
        _check_fwd(harness, FWD_CASES[case], dtype)
    elif kind == "bwd":
        _check_bwd(harness, *BWD_CASES[case], "8warps-2stages")
    else:
        _check_decode(harness, *DECODE_CASES[case])


# What the failure must say, where it is the emulator's report rather than a wrong result.
MUTANT_MESSAGES = {"TMA_TX": r"deadlock: no thread can run.*wait on mbarrier .* tx-count"}


@pytest.mark.parametrize("mutation", list(MUTANT_RUNS))
def test_mutated_emulator_fails(harness, mutation):
    mutant = emu.build(mutation)
    for kind, case, dtype in MUTANT_RUNS[mutation]:
        # a wrong result, or EmulatorFailure
        with pytest.raises(AssertionError, match=MUTANT_MESSAGES.get(mutation)):
            _run_sweep_case(mutant, kind, case, dtype)
