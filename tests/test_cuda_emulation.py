"""The real CUDA kernel sources, run on the CPU by the host emulator of tests/cuda_emulation.

csrc/ops/{flash_attention_fwd,flash_attention_bwd,decode_attention,mtp_verify,
flash_attention_fwd_sm90,logprobs,rms_norm,rope,swiglu}.cu are compiled unchanged with g++
against an emulation of the CUDA execution model (threads as fibers, warp collectives, cp.async /
ldmatrix / mma.sync with the PTX fragment semantics, NaN-poisoned shared memory, random
interleavings; for the Hopper kernel TMA
with tensor maps, mbarriers, wgmma through shared-memory descriptors, named barriers and
setmaxnreg; see tests/cuda_emulation/README.md) and their launchers are driven as the torch
bindings drive them. Results are held to the tolerances the GPU tests use
(tests/test_attention.py, test_flash_attention_bwd_cuda.py, test_decode_attention_cuda.py,
test_flash_attention_sm90.py, test_logprobs_mtp_cuda.py, test_rms_norm.py,
test_rope_swiglu_cuda.py, tolerances.py) against reference.py (float64 truths for float16 /
bfloat16). The token log-probability backward also runs in place (its gradient written over the
logits), which must give the out-of-place gradient bit for bit.

What this cannot see: timing, fast-math approximations (ex2.approx, approximate division), the
real memory model and real concurrency between blocks, register / occupancy limits; races
between threads only as wrong results of the schedules drawn. It catches indexing,
fragment-layout, masking, pipelining (cp.async waits, barriers), reduction, aliasing and
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
    # one launch: ceil(max_seqlen_q / 128) x heads x batch CTAs of 3 warpgroups in a 1-D grid
    # (flash_fwd::tile_order: longest tiles first)
    assert [(launch.grid, launch.threads, launch.smem) for launch in r.launches] == \
        [(((max_q + 127) // 128 * c.hq * batch, 1, 1), 384, SM90_SMEM[c.d])], r.launches
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


def _check_bwd(harness, c: Attn, dtype, config, sm90=False):
    """flash_attention_backward with the configuration `config` of BWD_DEVICES, or (sm90) the
    Hopper backward, whose packed cases get NaN / inf in the rows after the last sequence (as
    _sm90_inputs): a tile running past its sequence must keep them out."""
    q, k, v = _sm90_inputs(c, dtype) if sm90 else _attn_inputs(c, dtype)
    scale = c.scale if c.scale is not None else c.d ** -0.5
    var = _varlen_args(c)
    cu_q, cu_k = var.get("cu_q"), var.get("cu_k")
    # the forward's out / lse from the reference (rows after the last packed sequence: 0 / -inf)
    ref_out, lse = _reference_fwd(c, q, k, v, scale)
    out = _layout(ref_out.to(dtype), c.layout)
    dout = randn(*q.shape, dtype=dtype, seed=5)
    if sm90 and c.packed and c.tail:
        dout[q.shape[0] - c.tail:] = float("nan")
    dout = _layout(dout, c.layout)
    dlse = torch.where(torch.isfinite(lse), randn(*lse.shape, seed=6), 0.0) if c.dlse else None
    device = 0 if sm90 else BWD_DEVICES[config]
    r = emu.flash_bwd(harness, dout, q, k, v, out, lse, dlse, c.causal, scale, c.window, **var,
                      options=emu.Options(device=device, **c.opts), sm90=sm90)
    assert r.status == 0, emu.ERRORS.get(r.status, r.status)
    dq, dk, dv = r.dq, r.dk, r.dv
    # preprocess, dK/dV with the configuration under test (no key at all: none), convert
    max_k = var["max_k"] if c.packed else c.sk
    threads = 384 if sm90 else BWD_THREADS[config]
    assert [launch.threads for launch in r.launches] == [256] + [threads] * (max_k > 0) + [256], r.launches
    if sm90:
        batch = len(c.lens_q) if c.packed else c.b
        dkdv = [launch for launch in r.launches if launch.threads == 384]
        # one CTA per (key block of 128, sequence, kv head), 1-D
        assert all(launch.grid == ((max_k + 127) // 128 * batch * c.hkv, 1, 1) and
                   launch.smem == SM90_BWD_SMEM for launch in dkdv), dkdv
        assert r.values["named_barrier_leftovers"] == 0
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


# --- flash attention backward, Hopper (sm_90a) ------------------------------------------------
# flash_attention_backward_sm90 (head_dim 128): the preprocess and convert kernels around the
# wgmma / TMA dK-dV kernel, on the emulated Hopper primitives, against reference.py under the
# tolerances of the backward above.

SM90_BWD_SMEM = 199224  # flash_bwd_sm90::Config<128>::kSmemBytes

SM90_BWD_CASES = {
    "d128-causal-b2-gqa2": (Attn(128, b=2, sq=150, sk=150, hq=4, hkv=2), BF16),
    # a group of 8 query heads walked by one CTA per key block (MiMo-7B's 32 / 4)
    "d128-causal-gqa8": (Attn(128, sq=129, sk=129, hq=8, hkv=1, opts=RANDOM), FP16),
    "d128-noncausal-sq<sk-gqa3": (Attn(128, sq=127, sk=300, hq=3, hkv=1, causal=False, opts=EARLY), FP16),
    "d128-causal-sq>sk-rows-without-keys": (Attn(128, sq=300, sk=129, hq=2, hkv=2, opts=WORKERS), BF16),
    "d128-window37": (Attn(128, sq=180, sk=260, hq=2, hkv=1, window=37, opts=RANDOM), BF16),
    # key blocks no query sees (before the window): dK = dV = 0 without an iteration
    "d128-window300-sq<<sk": (Attn(128, sq=17, sk=1000, hq=4, hkv=1, window=300), FP16),
    "d128-heads-major-scale0.3-no-dlse": (Attn(128, b=2, sq=90, sk=120, hq=4, hkv=2, layout="heads-major",
                                               scale=0.3, dlse=False), FP16),
    "d128-padded-rows": (Attn(128, sq=70, sk=70, hq=2, hkv=1, layout="padded-rows", opts=EARLY), BF16),
    # 16 iterations in key block 0: the two-stage ring and the dS^T buffers wrap
    "d128-causal-512": (Attn(128, sq=512, sk=512, hq=2, hkv=1, opts=WORKERS), BF16),
    "d128-seqlen1": (Attn(128, b=3, sq=1, sk=1, hq=4, hkv=1), FP16),
    "d128-no-keys-at-all": (Attn(128, b=2, sq=40, sk=0, hq=4, hkv=2), BF16),
    "packed-d128-long-and-short": (Attn(128, lens_q=(0, 300, 3, 1, 0, 17, 129), lens_k=(0, 300, 3, 1, 0, 17, 129),
                                        hq=4, hkv=2, tail=7, extra_max=3), BF16),
    "packed-d128-q-shorter-window33": (Attn(128, lens_q=(1, 5, 0, 64, 200), lens_k=(9, 300, 0, 64, 260), hq=4,
                                            hkv=2, window=33, tail=7, extra_max=5, opts=RANDOM), FP16),
    "packed-d128-noncausal-no-keys-for-some": (Attn(128, lens_q=(3, 130, 4), lens_k=(0, 1, 6), hq=2, hkv=1,
                                                    causal=False, tail=5, opts=EARLY), FP16),
}


@pytest.mark.parametrize("case", list(SM90_BWD_CASES))
def test_flash_attention_backward_sm90(harness, case):
    _check_bwd(harness, *SM90_BWD_CASES[case], None, sm90=True)


# Launch orders forced through THINKFUSE_SM90_BWD_PAIRS_PER_CHUNK (the emulated H100's 132 SMs
# give these small problems one chunk): every (key block, pair) must be run exactly once, or dK /
# dV rows stay unwritten or dQ gets a block twice.
SM90_BWD_CHUNK_CASES = {
    # 3 x 2 = 6 pairs, 3 key blocks: chunks of 4 then 2 pairs (a short last chunk)
    "chunks-4-of-6": (Attn(128, b=3, sq=300, sk=300, hq=4, hkv=2), BF16, 4),
    # one pair per chunk: each pair's key blocks back to back, longest first
    "chunks-1": (Attn(128, b=2, sq=200, sk=260, hq=6, hkv=3, causal=False, opts=RANDOM), FP16, 1),
    # packed sequences of different lengths (key blocks past a short one exit at once); the last
    # chunk's one pair is the longest sequence, so a block it skipped would show
    "packed-chunks-2-of-3": (Attn(128, lens_q=(130, 5, 260), lens_k=(130, 5, 260), hq=2, hkv=1, tail=3), BF16, 2),
}


@pytest.mark.parametrize("case", list(SM90_BWD_CHUNK_CASES))
def test_flash_attention_backward_sm90_launch_chunks(harness, case, monkeypatch):
    attn, dtype, pairs_per_chunk = SM90_BWD_CHUNK_CASES[case]
    monkeypatch.setenv("THINKFUSE_SM90_BWD_PAIRS_PER_CHUNK", str(pairs_per_chunk))
    _check_bwd(harness, attn, dtype, None, sm90=True)


@pytest.mark.parametrize("options", [dict(device=1), dict(kernel_regs=160)], ids=["a100", "fewer-registers"])
def test_flash_attention_backward_sm90_refuses(harness, options):
    """cudaErrorNotSupported without a launch on a device that is not compute capability 9.0, and
    for an image whose register count could not feed the consumers' setmaxnreg.inc."""
    q, k, v = qkv(1, 64, 64, 2, 1, 128, FP16)
    out, lse = reference.flash_attention(q, k, v, True, None, None, None, None, return_lse=True)
    r = emu.flash_bwd(harness, randn(*q.shape, dtype=FP16, seed=5), q, k, v, out.to(FP16), lse.float(),
                      options=emu.Options(**options), sm90=True)
    assert r.status == 801 and not r.launches, (r.status, r.launches)


@pytest.mark.parametrize("sm90", [False, True], ids=["sm80", "sm90"])
def test_flash_attention_backward_refuses_misaligned_dout(harness, sm90):
    """dout is read with 16-byte copies like q: at an odd element offset the launcher refuses it
    (cudaErrorInvalidValue, no launch) instead of faulting. (The binding copies such a dout.)"""
    q, k, v = qkv(1, 64, 64, 2, 1, 128, FP16)
    out, lse = reference.flash_attention(q, k, v, True, None, None, None, None, return_lse=True)
    dout = randn(1, 64, 2, 129, dtype=FP16, seed=5)[..., 1:]
    r = emu.flash_bwd(harness, dout, q, k, v, out.to(FP16), lse.float(), sm90=sm90)
    assert r.status == 1 and not r.launches, (r.status, r.launches)


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
    leftpad: tuple | None = None  # cache_leftpad per row; those slots are poisoned with NaN


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
    # left padding: inside the first tile, past a split, the queries alone, none, and out of range
    # (negative: 0; past the length: no key)
    "leftpad-bf16-d128-splits3": (Decode(128, b=4, sq=1, hq=8, hkv=2, smax=300, lens=(300, 290, 150, 40),
                                         leftpad=(3, 170, 0, 39), splits=3, opts=RANDOM), BF16),
    "leftpad-fp16-d64-sq4-window7": (Decode(64, b=3, sq=4, hq=16, hkv=4, smax=120, lens=(120, 61, 30),
                                            leftpad=(50, 57, 1), window=7, splits=2), FP16),
    "leftpad-fp32-d32-edges": (Decode(32, b=4, sq=2, hq=4, hkv=2, smax=80, lens=(80, 80, 30, 10),
                                      leftpad=(-4, 79, 40, 9), splits=0, opts=EARLY), torch.float32),
    "leftpad-unaligned-bf16-d64": (Decode(64, b=2, sq=1, hq=8, hkv=4, smax=100, lens=(100, 64), leftpad=(33, 5),
                                          layout="unaligned", opts=WORKERS), BF16),
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
    leftpad = None if c.leftpad is None else torch.tensor(c.leftpad, dtype=torch.int32)
    if leftpad is not None:
        for b, pad in enumerate(c.leftpad):  # padding slots must never be read
            kc[b, :max(pad, 0)] = float("nan")
            vc[b, :max(pad, 0)] = float("nan")
    r = emu.decode(harness, q, kc, vc, lens, c.scale, c.window, c.splits, options=emu.Options(**c.opts),
                   leftpad=leftpad)
    assert r.status == 0, emu.ERRORS.get(r.status, r.status)
    out, splits = r.out, r.splits
    assert splits >= 1
    if c.splits == 1:
        assert splits == 1
    # the split kernel, then the combine kernel when the keys were split
    assert [launch.kernel.split("<")[0] for launch in r.launches] == (
        ["split_kernel"] + (["combine_kernel"] if splits > 1 else [])), r.launches
    ref_lens = lens.clamp(0, c.smax)
    ref = reference.decode_attention(q, kc, vc, ref_lens, c.scale, c.window, cache_leftpad=leftpad)
    if dtype == torch.float32:
        assert_close_fp32(out, ref)
    else:
        truth = reference.decode_attention(q.double(), kc.double(), vc.double(), ref_lens, c.scale, c.window,
                                           cache_leftpad=leftpad)
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
    # "ties" | "nan-row" | "invalid-draft" | "unaligned" | "nan-inf" (b >= 4) | "nan-probs" (probs)
    special: str = ""
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
    # NaN and infinities ranked as torch.argmax ranks them (see _nan_inf_rows)
    "greedy-one-block-nan-inf": Mtp(b=4, special="nan-inf", dtype=torch.float32),
    "greedy-split4-nan-inf": Mtp(b=4, splits=4, special="nan-inf", opts=WORKERS),
    "sampled-one-block-nan-inf": Mtp(b=4, temperature=0.8, special="nan-inf", dtype=torch.float32),
    "sampled-probs-split4-nan-inf": Mtp(b=4, temperature=0.8, probs=True, splits=4, special="nan-inf",
                                        opts=RANDOM),
    "sampled-probs-one-block-nan-probs": Mtp(b=3, temperature=1.0, probs=True, special="nan-probs", accept=0.9),
    "sampled-probs-split3-nan-probs": Mtp(b=3, temperature=1.0, probs=True, splits=3, special="nan-probs",
                                          accept=0.9, opts=WORKERS),
}


def _nan_inf_rows(logits, draft, target):
    """torch.argmax ranks NaN above everything (the first NaN of several wins, also over an
    earlier +inf), equal values (+inf too) to the lowest id, and gives 0 for a row of -inf. The
    drafts that a NaN-as-+inf ranking would accept are drafted. V = 3000: the ids set lie in
    different slices of a 4-way split."""
    nan, inf = float("nan"), float("inf")
    logits[0, 0, [3, 1500, 2900]] = torch.tensor([inf, nan, nan], dtype=logits.dtype)  # argmax 1500
    draft[0, 0] = 3
    draft[1, 0] = target[1, 0]
    logits[1, 1, [50, 100, 2999]] = torch.tensor([inf, nan, nan], dtype=logits.dtype)  # argmax 100
    draft[1, 1] = 50
    draft[2] = target[2, : draft.shape[1]]  # accepted up to the bonus (greedy)
    logits[2, 1] = -inf
    logits[2, 1, 2998] = nan  # argmax 2998
    draft[2, 1] = 2998
    logits[2, -1, [2000, 2500]] = inf  # argmax 2000
    logits[3, 0] = -inf  # argmax 0
    draft[3, 0] = 1


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
    if c.special == "nan-inf":
        _nan_inf_rows(logits, draft, target)
    probs = None
    if c.probs:
        probs = torch.softmax(torch.randn(c.b, c.k, c.vocab, generator=g), -1).to(c.dtype)
        # make some drafts likely to be rejected with a residual draw
        probs.scatter_(-1, draft[..., None].clamp(0, c.vocab - 1), 0.9)
    if c.special == "nan-probs":
        # a NaN draft probability rejects its draft and gives its id no weight in max(q - p, 0)
        probs[0, 0, draft[0, 0]] = float("nan")
        probs[1, 0, ::2] = float("nan")
        probs[-1, 0] = float("nan")  # no weight at all: the argmax
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


# --- token log-probabilities -------------------------------------------------------------------
# csrc/ops/logprobs.cu (one block of 256 threads per row: an online logsumexp folded through the
# block all-reduce, 16-byte or element-wise loads), driven as csrc/bindings/logprobs.cpp drives it:
# the forward, then the backward fed with the forward's lse / entropy (as the op's autograd formula
# chains them), out of place (token_logprobs_bwd) and written over the logits themselves
# (token_logprobs_bwd_out with grad_logits = logits: what the fused lm_head paths do). Tolerances of
# test_logprobs_mtp_cuda.py: the float32 outputs within 1e-4 (reductions over long rows) of
# reference.py (float32 logits) or of a float64 truth (float16 / bfloat16 logits); float32
# gradients within 1e-5 of reference.py's autograd gradient, float16 / bfloat16 ones no worse than
# twice reference.py's own error against the float64 truth (plus one ulp). The gradient written in
# place must be the out-of-place one bit for bit.

IGNORED = -100


@dataclass(frozen=True)
class Lp:
    vocab: int
    dtype: torch.dtype = torch.float32
    b: int = 2
    t: int = 5
    temperature: float = 1.0
    entropy: bool = True
    # contig | slice (logits[:, :-1] of a [B, T + 1, V] tensor, read in place; the in-place
    # backward then runs on a contiguous copy) | offset (contiguous, one element into its storage:
    # rows not 16-byte aligned)
    layout: str = "contig"
    ids_dtype: torch.dtype = torch.int64
    # masked: logits below V / 2 are -inf (ids above); padded: the vocabulary's last eighth is -inf
    # and the last row all -inf with an ignored id; out-of-range: one id is V (NaN log-prob, no
    # read); peaked: the targets' logits raised by 12 (p near 1: 1 - p cancels at the target)
    special: str = ""
    opts: dict = field(default_factory=dict)


LP_CASES = {
    "fp32-v1": Lp(1, b=2, t=3),
    "fp32-v7-int32-ids-t0.7": Lp(7, temperature=0.7, ids_dtype=torch.int32, opts=RANDOM),
    "fp16-v1000-t0.7": Lp(1000, FP16, temperature=0.7),
    "bf16-v4099-t1.3": Lp(4099, BF16, temperature=1.3, opts=WORKERS),
    "fp32-v4099-masked-int32-ids": Lp(4099, special="masked", ids_dtype=torch.int32),
    "bf16-v1000-padded": Lp(1000, BF16, special="padded", opts=RANDOM),
    "fp32-v1000-out-of-range-id": Lp(1000, special="out-of-range"),
    "fp16-v4096-slice-t0.9": Lp(4096, FP16, temperature=0.9, layout="slice"),
    "fp32-v4099-slice": Lp(4099, layout="slice", opts=RANDOM),
    "bf16-v4096-offset": Lp(4096, BF16, layout="offset", opts=WORKERS),
    "bf16-v4096-peaked-t0.8": Lp(4096, BF16, temperature=0.8, special="peaked", opts=RANDOM),
    "fp32-v1000-peaked": Lp(1000, special="peaked"),
    # batch 1 (stride_b 0), T = 1 (stride_s 0)
    "fp32-v9000-b1-no-entropy": Lp(9000, b=1, t=4, entropy=False),
    "bf16-v2048-t1": Lp(2048, BF16, b=4, t=1),
    # model vocabularies: 75 and 16 iterations of the row loop
    "bf16-v151937-t0.9": Lp(151937, BF16, b=1, t=3, temperature=0.9),
    "fp16-v32000-no-entropy": Lp(32000, FP16, b=1, t=3, entropy=False, opts=RANDOM),
}


def _lp_inputs(c: Lp, seed=0):
    """logits [B, T, V] in the case's layout and token ids [B * T]."""
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(c.b, c.t + (c.layout == "slice"), c.vocab, generator=g)
    ids = torch.randint(0, c.vocab, (c.b, c.t), generator=g)
    if c.special == "masked":
        x[..., : c.vocab // 2] = float("-inf")
        ids = ids.clamp(min=c.vocab // 2)
    if c.special == "padded":
        real = c.vocab - c.vocab // 8
        x[..., real:] = float("-inf")
        ids = ids % real
        x[-1, c.t - 1] = float("-inf")
        ids[-1, -1] = IGNORED
    ids[0, min(1, c.t - 1)] = IGNORED
    if c.special == "out-of-range":
        ids[0, 0] = -1
        ids[-1, -1] = c.vocab
    if c.special == "peaked":
        live = ids >= 0
        x[:, : c.t][live, ids[live]] += 12
    x = x.to(c.dtype)
    if c.layout == "slice":
        x = x[:, :-1]
    elif c.layout == "offset":
        flat = torch.empty(x.numel() + 1, dtype=c.dtype)
        flat[1:] = x.flatten()
        x = flat[1:].view(x.shape)
    return x, ids.reshape(-1).to(c.ids_dtype)


def _lp_truth(x, ids, temperature, entropy):
    """float64 log-probs (and entropy) of logits x [B, T, V] at ids [B, T] (ids < V), as a tuple."""
    out = reference.token_logprobs(x.double(), ids, temperature, entropy)
    return out if entropy else (out,)


def _lp_grad(fn, x, ids2, grads):
    """d fn(x, ids2) / dx for the output gradients ``grads`` (flat per row; the outputs are
    float64 for float64 x, else float32)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return _run_grads(lambda leaf: fn(leaf, ids2), [x], [g.view(ids2.shape).to(dtype) for g in grads])[1][0]


def _cdiv(a, b):
    return -(-a // b)


def _aligned(t, strides, align=16):
    """The launchers' alignment tests (rows_are_16B_aligned, rope.cuh vec_aligned) for a view of a
    harness buffer (256-byte aligned) and these element strides."""
    e = t.element_size()
    return (t.storage_offset() * e) % align == 0 and all((s * e) % align == 0 for s in strides)


def _check_lp(exe, c: Lp):
    x, ids = _lp_inputs(c)
    rows, vocab = c.b * c.t, c.vocab
    opts = emu.Options(**c.opts)
    # forward: one block of 256 threads per row, vector loads iff every row start is aligned
    fwd = emu.token_logprobs_fwd(exe, x, ids, c.temperature, c.entropy, options=opts)
    assert fwd.status == 0, emu.ERRORS.get(fwd.status, fwd.status)
    aligned = _aligned(x, (emu._stride_or_zero(x, 0), emu._stride_or_zero(x, 1)))
    flags = f"{str(aligned).lower()},_{str(c.entropy).lower()}"
    assert [(launch.kernel, launch.grid, launch.threads) for launch in fwd.launches] == \
        [(f"fwd_kernel<{flags}>", (rows, 1, 1), 256)], fwd.launches
    ids2 = ids.view(c.b, c.t).long()
    ignored = ids < 0
    out_of_range = ids >= vocab
    ref_ids = ids2.masked_fill(out_of_range.view(ids2.shape), 0)  # reference.py's gather needs ids < V
    ours = (fwd.logprobs, fwd.entropy) if c.entropy else (fwd.logprobs,)
    ref = reference.token_logprobs(x, ref_ids, c.temperature, c.entropy)
    ref = ref if c.entropy else (ref,)
    truth = _lp_truth(x, ref_ids, c.temperature, c.entropy)
    for name, o, r, t in zip(("logprobs", "entropy"), ours, ref, truth):
        with failure_label(name):
            assert not o[ignored].any(), "ignored rows must give 0"
            expected = (r if c.dtype == torch.float32 else t).reshape(-1).float()
            if name == "logprobs":  # (no reference where the id is out of range)
                o, expected = o.masked_fill(out_of_range, 0.0), expected.masked_fill(out_of_range, 0.0)
            assert_close_fp32(o, expected, tol=1e-4)
    if out_of_range.any():
        assert fwd.logprobs[out_of_range].isnan().all(), "an id >= V gives a NaN log-prob"
    lse = torch.logsumexp(x.double() / c.temperature, dim=-1).reshape(-1)
    with failure_label("lse"):
        assert_close_fp32(torch.where(ignored, 0.0, fwd.lse), torch.where(ignored, 0.0, lse), tol=1e-4)
        assert not fwd.lse[ignored].any()

    # backward, out of place and in place, from the forward's lse / entropy
    gen = torch.Generator().manual_seed(1)
    grad_lp = torch.randn(rows, generator=gen).masked_fill(out_of_range, 0.0)  # (the reference has no id there)
    grad_ent = torch.randn(rows, generator=gen) if c.entropy else None
    entropy = fwd.entropy if c.entropy else None
    bwd = emu.token_logprobs_bwd(exe, grad_lp, grad_ent, x, ids, fwd.lse, entropy, c.temperature, options=opts)
    assert bwd.status == 0, emu.ERRORS.get(bwd.status, bwd.status)
    aligned_bwd = aligned and (vocab * x.element_size()) % 16 == 0  # (the fresh gradient is aligned)
    flags = f"{str(aligned_bwd).lower()},_{str(c.entropy).lower()}"
    assert [(launch.kernel, launch.grid, launch.threads) for launch in bwd.launches] == \
        [(f"bwd_kernel<{flags}>", (rows, 1, 1), 256)], bwd.launches
    in_place = x if x.is_contiguous() else x.contiguous()
    ip = emu.token_logprobs_bwd_out(exe, grad_lp, grad_ent, in_place, ids, fwd.lse, entropy, c.temperature,
                                    in_place, options=opts)
    assert ip.status == 0, emu.ERRORS.get(ip.status, ip.status)
    assert torch.equal(ip.grad_logits, bwd.grad_logits), \
        "the gradient written in place differs from the out-of-place one " \
        f"(rows {sorted(set((ip.grad_logits != bwd.grad_logits).reshape(rows, -1).any(-1).nonzero()[:, 0].tolist()))})"
    grads = (grad_lp, grad_ent) if c.entropy else (grad_lp,)
    hf = _lp_grad(lambda a, i: reference.token_logprobs(a, i, c.temperature, c.entropy), x, ref_ids, grads)
    got = bwd.grad_logits
    with failure_label("grad_logits"):
        assert not got.reshape(rows, vocab)[ignored].any(), "ignored rows get a zero gradient"
        if c.dtype == torch.float32:
            assert_close_fp32(got, hf)
        else:
            truth_grad = _lp_grad(lambda a, i: _lp_truth(a, i, c.temperature, c.entropy), x.double(), ref_ids, grads)
            assert_low_precision_ok(got, hf, truth_grad)


@pytest.mark.parametrize("case", list(LP_CASES))
def test_token_logprobs(harness, case):
    _check_lp(harness, LP_CASES[case])


# --- RMSNorm -------------------------------------------------------------------------------------
# csrc/ops/rms_norm.cu: a warp per row up to 512 columns, else a block per row (rows held in
# registers up to 8192 columns, streamed twice beyond), the fused residual add, and the backward's
# persistent grid writing one dweight partial row per row group, summed by dw_reduce_kernel.
# Driven as csrc/bindings/rms_norm.cpp (workspace from rms_norm_backward_workspace_floats for the
# emulated device, uninitialised), the backward fed with the forward's h and rstd. Tolerances of
# test_rms_norm.py: float32 outputs within 1e-5 and gradients within 1e-4 of reference.py,
# float16 / bfloat16 against the float64 truth (assert_low_precision_ok), mixed dtypes as its
# test_mixed_dtypes_follow_transformers_promotion; h = x + residual exactly.

SMS = {0: 132, 1: 108, 2: 84, 3: 84}  # the emulated devices' SM counts


@dataclass(frozen=True)
class Rms:
    cols: int
    rows: int = 37
    dtype: torch.dtype = torch.float32
    w_dtype: torch.dtype | None = None
    residual: bool = False
    layout: str = "contig"  # contig | padded (rows 8 elements apart more than cols) | offset (unaligned)
    eps: float = 1e-6
    device: int = 0
    opts: dict = field(default_factory=dict)


RMS_CASES = {
    # warp per row (<= 512 columns)
    "fp32-c1": Rms(1),
    "bf16-c7-residual": Rms(7, dtype=BF16, residual=True, opts=RANDOM),
    "fp16-c512-residual": Rms(512, dtype=FP16, residual=True),
    # a block per row, cached in registers
    "fp16-c513": Rms(513, dtype=FP16, opts=WORKERS),
    "bf16-c1000-padded-eps1e-5": Rms(1000, dtype=BF16, layout="padded", eps=1e-5, opts=RANDOM),
    "fp32-c999-offset-residual": Rms(999, residual=True, layout="offset"),
    "bf16-c4096-residual": Rms(4096, dtype=BF16, residual=True, opts=WORKERS),
    "fp32-c8192-padded": Rms(8192, rows=5, layout="padded"),
    # streamed (two passes over the row)
    "bf16-c8200-residual-streamed": Rms(8200, dtype=BF16, rows=5, residual=True),
    "fp32-c8193-streamed": Rms(8193, rows=4, residual=True, layout="offset", opts=RANDOM),
    # mixed dtypes: y (and dy) in float32
    "bf16-fp32w-c200-residual": Rms(200, dtype=BF16, w_dtype=torch.float32, residual=True),
    "fp32-bf16w-c1000": Rms(1000, w_dtype=BF16),
    "fp16-bf16w-c600-residual": Rms(600, dtype=FP16, w_dtype=BF16, residual=True, opts=RANDOM),
    # more rows than the persistent backward grid has row groups (84 SMs: 168 blocks): groups take
    # several rows and fold them into one dweight partial
    "fp16-c64-700rows-persistent-warps": Rms(64, dtype=FP16, rows=700, device=2, opts=WORKERS),
    "bf16-c1024-200rows-persistent-blocks": Rms(1024, dtype=BF16, rows=200, residual=True, device=2),
    # no rows: dweight is zeros (written by dw_reduce_kernel alone)
    "fp32-c100-no-rows": Rms(100, rows=0),
}


def _rms_layout(t, layout):
    if layout == "padded":
        big = torch.zeros(t.shape[0], t.shape[1] + 8, dtype=t.dtype)
        big[:, : t.shape[1]] = t
        return big[:, : t.shape[1]]
    if layout == "offset":
        flat = torch.zeros(t.numel() + 1, dtype=t.dtype)
        flat[1:] = t.flatten()
        return flat[1:].view(t.shape)
    return t


def _rms_plan(cols, dtype):
    """(row group, cached / streamed, threads) of rms_norm.cuh plan_rows."""
    vec = 16 // dtype.itemsize
    if cols <= 512:
        return "WarpPerRow", "kChunks", 128
    chunks, per_thread = _cdiv(cols, vec), 16 // vec
    if chunks > 512 * per_thread:
        return "BlockPerRow", "kStreamed", 512
    return "BlockPerRow", "kChunks", max(128, _cdiv(_cdiv(chunks, per_thread), 32) * 32)


def _run_grads(fn, leaves, grads):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(list(outs), list(grads))
    return [o.detach() for o in outs], [t.grad for t in leaves]


def _check_rms(exe, c: Rms):
    w_dtype = c.w_dtype or c.dtype
    y_dtype = torch.promote_types(c.dtype, w_dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(c.rows, c.cols, generator=gen).to(c.dtype)
    w = (1 + 0.5 * torch.randn(c.cols, generator=gen)).to(w_dtype)
    r = torch.randn(c.rows, c.cols, generator=gen).to(c.dtype) if c.residual else None
    dy = torch.randn(c.rows, c.cols, generator=gen).to(y_dtype)
    dh = torch.randn(c.rows, c.cols, generator=gen).to(c.dtype) if c.residual else None
    x, dy = _rms_layout(x, c.layout), _rms_layout(dy, c.layout)
    r = _rms_layout(r, c.layout) if c.residual else None
    opts = emu.Options(device=c.device, **c.opts)

    fwd = emu.rms_norm_fwd(exe, x, w, r, c.eps, options=opts)
    assert fwd.status == 0, emu.ERRORS.get(fwd.status, fwd.status)
    group, cached, threads = _rms_plan(c.cols, c.dtype)
    groups = 4 if group == "WarpPerRow" else 1
    kernel = f"<{group},_kAligned,_{cached}>"
    assert [(launch.kernel, launch.grid, launch.threads) for launch in fwd.launches] == \
        ([(f"fwd_kernel{kernel}", (_cdiv(c.rows, groups), 1, 1), threads)] if c.rows else []), fwd.launches
    h = fwd.h if c.residual else x
    bwd = emu.rms_norm_bwd(exe, dy, h, w, fwd.rstd, dh, options=opts)
    assert bwd.status == 0, emu.ERRORS.get(bwd.status, bwd.status)
    blocks = min(2 * SMS[c.device], _cdiv(c.rows, groups))
    assert bwd.workspace_floats == 2 * SMS[c.device] * groups * c.cols
    assert [(launch.kernel, launch.grid, launch.threads) for launch in bwd.launches] == \
        [(f"bwd_kernel{kernel}", (blocks, 1, 1), threads)] * (blocks > 0) + \
        [("dw_reduce_kernel", (_cdiv(c.cols, 32), 1, 1), 512)], bwd.launches

    leaves = (x, w) + ((r,) if c.residual else ())
    grads = (dy, dh) if c.residual else (dy,)

    def fn(*t):
        return reference.rms_norm(t[0], t[1], c.eps, t[2] if c.residual else None)

    def truth_fn(*t):  # float64 inputs: reference.rms_norm computes them in float64
        return reference.rms_norm(t[0], t[1], c.eps, t[2] if c.residual else None)

    hf_outs, hf_grads = _run_grads(fn, leaves, grads)
    if c.residual:
        assert torch.equal(fwd.h, hf_outs[1]), "h = x + residual, rounded once"
    ours = [("y", fwd.y, hf_outs[0]), ("dx", bwd.dx, hf_grads[0]), ("dw", bwd.dw, hf_grads[1])]
    if c.dtype != w_dtype:  # test_rms_norm.py's mixed-dtype tolerances
        for (name, o, hf), (rtol, atol) in zip(ours, ((2e-2, 2e-2), (2e-2, 2e-2), (2e-2, 5e-2))):
            with failure_label(name):
                assert o.dtype == hf.dtype
                torch.testing.assert_close(o.float(), hf.float(), rtol=rtol, atol=atol)
    elif c.dtype == torch.float32:
        for (name, o, hf), tol in zip(ours, (1e-5, 1e-4, 1e-4)):
            with failure_label(name):
                assert_close_fp32(o, hf, tol=tol)
    else:
        truth_outs, truth_grads = _run_grads(truth_fn, [t.double() for t in leaves], [g.double() for g in grads])
        for (name, o, hf), t in zip(ours, (truth_outs[0], truth_grads[0], truth_grads[1])):
            with failure_label(name):
                assert_low_precision_ok(o, hf, t)


@pytest.mark.parametrize("case", list(RMS_CASES))
def test_rms_norm(harness, case):
    _check_rms(harness, RMS_CASES[case])


# --- rotary embeddings -------------------------------------------------------------------------
# csrc/ops/rope.cu: rope (cos / sin computed in the kernel from the positions and inv_freq, times
# attention_scaling, Ministral 3's query temperature on q) and apply_rotary (cos / sin tensors),
# forward and backward (the inverse rotation), tiles of tokens with their offsets and the cos / sin
# table in shared memory. YaRN and llama3 reach the kernel as their inv_freq and attention scaling
# (thinkfuse.rope_params, bit for bit transformers'). Driven as csrc/bindings/rope.cpp; tolerances
# of test_rope_swiglu_cuda.py: float32 within 1e-5 of reference.py, float16 / bfloat16 against the
# float64 truth, mixed dtypes (apply_rotary) as its test_apply_rotary_mixed_dtypes_promote.

LLAMA4 = (0.1, 16384)  # Ministral 3's (llama_4_scaling_beta, original_max_position_embeddings)
EDGE_POSITIONS = [0, 16383, 16384, 32767, 32768, 100000, 262143, 262144, 299999, 300000, 2**24 + 5]
ROPE_SCALINGS = {
    "default": dict(rope_type="default", rope_theta=1e6),
    "yarn": dict(rope_type="yarn", rope_theta=1e6, factor=16.0, original_max_position_embeddings=16384),
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192),
    # Ministral 3: YaRN without attention scaling, and the query temperature
    "ministral3": dict(rope_type="yarn", rope_theta=1e6, factor=16.0, original_max_position_embeddings=16384,
                       beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1),
}


def _rope_params(scaling, head_dim):
    import types

    from thinkfuse.rope_params import rope_params

    config = types.SimpleNamespace(head_dim=head_dim, hidden_size=head_dim, num_attention_heads=1,
                                   max_position_embeddings=262144, rope_parameters=ROPE_SCALINGS[scaling])
    return rope_params(config)


@dataclass(frozen=True)
class Rope:
    d: int
    b: int = 2
    s: int = 5
    hq: int = 4
    hkv: int = 2
    dtype: torch.dtype = torch.float32
    scaling: str = "ministral3"  # a ROPE_SCALINGS key (rope); cos / sin of "yarn" (apply_rotary)
    pos: str = "batch"  # batch | broadcast ([1, S] positions, or cos / sin)
    pos_dtype: torch.dtype = torch.int64
    layout: str = "bshd"  # bshd | from-bhsd (transposed [B, H, S, D] storage) | offset (unaligned)
    cos_dtype: torch.dtype | None = None  # apply_rotary: cos / sin dtype (default: q's)
    opts: dict = field(default_factory=dict)


ROPE_CASES = {
    "fp32-d64-ministral3": Rope(64),
    # tiles of 2 tokens x 40 heads (the last one holds 1), positions shared by the batch
    "bf16-d128-gqa32-8-from-bhsd-ministral3": Rope(128, b=3, s=201, hq=32, hkv=8, dtype=BF16, pos="broadcast",
                                                   layout="from-bhsd", opts=WORKERS),
    # tiles of 62 tokens (the last one 4): the per-token shared arrays nearly full
    "fp32-d8-62-token-tiles": Rope(8, b=1, s=16000, hq=1, hkv=1, opts=RANDOM),
    "fp16-d128-yarn-int32-positions": Rope(128, dtype=FP16, scaling="yarn", pos_dtype=torch.int32, opts=RANDOM),
    "bf16-d80-llama3-gqa7-1": Rope(80, b=3, hq=7, hkv=1, dtype=BF16, scaling="llama3"),
    "fp32-d10-default-unaligned": Rope(10, s=9, scaling="default"),
    # half = 1152 > 1024: two column tiles per token
    "bf16-d2304-two-column-tiles": Rope(2304, b=1, s=3, hq=2, hkv=1, dtype=BF16),
    "fp16-d64-offset": Rope(64, dtype=FP16, layout="offset", opts=RANDOM),
    "fp32-d128-decode-b64-yarn": Rope(128, b=64, s=1, hq=8, hkv=2, scaling="yarn"),
}

ROTARY_CASES = {
    "fp32-d64": Rope(64),
    "bf16-d128-from-bhsd-broadcast": Rope(128, s=33, hq=8, hkv=2, dtype=BF16, pos="broadcast", layout="from-bhsd",
                                          opts=RANDOM),
    "fp16-d128": Rope(128, dtype=FP16, opts=WORKERS),
    "bf16-d10-unaligned": Rope(10, s=9, dtype=BF16),
    "fp32-d2304-offset": Rope(2304, b=1, s=3, hq=2, hkv=1, layout="offset"),
    "fp16-d16-many-token-tiles": Rope(16, b=2, s=3000, hq=2, hkv=1, dtype=FP16, pos="broadcast", opts=WORKERS),
    # mixed dtypes: outputs in promote(q, cos) = float32, the gradients in q's dtype
    "bf16-fp32cos-d128": Rope(128, dtype=BF16, cos_dtype=torch.float32),
    "fp16-bf16cos-d64-broadcast": Rope(64, dtype=FP16, cos_dtype=BF16, pos="broadcast", opts=RANDOM),
    "fp32-bf16cos-d64": Rope(64, cos_dtype=BF16),
}


def _rope_inputs(c: Rope, seed=0):
    """q, k, their output gradients (same layout), positions."""
    g = torch.Generator().manual_seed(seed)

    def heads(h):
        if c.layout == "from-bhsd":
            return torch.randn(c.b, h, c.s, c.d, generator=g).to(c.dtype).transpose(1, 2)
        t = torch.randn(c.b, c.s, h, c.d, generator=g).to(c.dtype)
        return _rms_layout(t.view(1, -1), "offset").view(t.shape) if c.layout == "offset" else t

    q, k, dq, dk = heads(c.hq), heads(c.hkv), heads(c.hq), heads(c.hkv)
    pos = torch.randint(0, 300001, (c.b if c.pos == "batch" else 1, c.s), generator=g)
    edges = torch.tensor(EDGE_POSITIONS)[: c.s]
    pos[:, : edges.numel()] = edges
    return q, k, dq, dk, pos.to(c.pos_dtype)


def _rotary_aligned(q, k, d, cos_sin=()):
    """rope.cuh qk_vectorisable (and apply_rotary's cos / sin condition): chunks of 16 bytes of q's
    dtype, each tensor aligned for that many of its own elements (the fresh outputs are)."""
    vec = 16 // q.element_size()
    heads_ok = all(_aligned(t, [emu._stride_or_zero(t, i) for i in range(3)], min(16, vec * t.element_size()))
                   for t in (q, k))
    cos_ok = all(_aligned(t, [emu._stride_or_zero(t, i) for i in range(2)], min(16, vec * t.element_size()))
                 for t in cos_sin)
    return (d // 2) % vec == 0 and heads_ok and cos_ok


def _rotary_tiles(c: Rope, table, x):
    """rope.cuh plan_tiles for the kernel input x: the grid (a block per tile of tokens x a column
    range of a half)."""
    half, vec, tokens = c.d // 2, 16 // x.element_size(), c.b * c.s
    col_tile = min(half, 1024)
    col_tiles = _cdiv(half, col_tile)
    per_tile = min(_cdiv(1024, (c.hq + c.hkv) * _cdiv(col_tile, vec)), 64)
    if table:
        per_tile = min(per_tile, 2048 // col_tile)
    per_tile = max(min(per_tile, tokens * col_tiles // 256), 1)
    return _cdiv(tokens, per_tile) * col_tiles


def _check_rotary_outputs(ours, hf, truth):
    """test_rope_swiglu_cuda.py's _check_vs_reference."""
    for name, o, r, t in zip(("q", "k", "dq", "dk"), ours, hf, truth):
        with failure_label(name):
            assert o.dtype == r.dtype and o.shape == r.shape, (o.dtype, r.dtype, o.shape, r.shape)
            if o.dtype == torch.float32:
                assert_close_fp32(o, r)
            else:
                assert_low_precision_ok(o, r, t)


def _check_rope(exe, c: Rope):
    q, k, dq_out, dk_out, pos = _rope_inputs(c)
    params = _rope_params(c.scaling, c.d)
    beta, original_max = params.llama4_scaling or (0.0, 0)
    args = (pos, params.inv_freq, params.attention_scaling, beta, original_max)
    opts = emu.Options(**c.opts)
    fwd = emu.rope_fwd(exe, q, k, *args, options=opts)
    bwd = emu.rope_bwd(exe, dq_out, dk_out, *args, options=opts)
    assert fwd.status == 0 and bwd.status == 0, (fwd.status, bwd.status)
    for r, t, u in ((fwd, q, k), (bwd, dq_out, dk_out)):
        aligned = str(_rotary_aligned(t, u, c.d)).lower()
        assert [(launch.kernel, launch.grid, launch.threads) for launch in r.launches] == \
            [(f"rope_kernel<{aligned}>", (_rotary_tiles(c, True, t), 1, 1), 256)], r.launches

    def fn(q_, k_):
        return reference.rope(q_, k_, pos, params.inv_freq, params.attention_scaling, params.llama4_scaling)

    grads = (dq_out, dk_out)
    hf_outs, hf_grads = _run_grads(fn, (q, k), grads)
    truth_outs, truth_grads = _run_grads(fn, (q.double(), k.double()), [g.double() for g in grads])
    _check_rotary_outputs((fwd.q, fwd.k, bwd.q, bwd.k), hf_outs + hf_grads, truth_outs + truth_grads)


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope(harness, case):
    _check_rope(harness, ROPE_CASES[case])


def _check_apply_rotary(exe, c: Rope):
    q, k, dq_out, dk_out, pos = _rope_inputs(c)
    params = _rope_params("yarn", c.d)
    cos, sin = reference.rope_cos_sin(pos, params.inv_freq, params.attention_scaling)
    cos_dtype = c.cos_dtype or c.dtype
    cos, sin = cos.to(cos_dtype), sin.to(cos_dtype)
    out_dtype = torch.promote_types(c.dtype, cos_dtype)
    dq_out, dk_out = dq_out.to(out_dtype), dk_out.to(out_dtype)
    opts = emu.Options(**c.opts)
    fwd = emu.apply_rotary_fwd(exe, q, k, cos, sin, options=opts)
    bwd = emu.apply_rotary_bwd(exe, dq_out, dk_out, cos, sin, c.dtype, options=opts)
    assert fwd.status == 0 and bwd.status == 0, (fwd.status, bwd.status)
    for r, t, u in ((fwd, q, k), (bwd, dq_out, dk_out)):
        aligned = str(_rotary_aligned(t, u, c.d, (cos, sin))).lower()
        assert [(launch.kernel, launch.grid, launch.threads) for launch in r.launches] == \
            [(f"apply_rotary_kernel<{aligned}>", (_rotary_tiles(c, False, t), 1, 1), 256)], r.launches

    def fn(q_, k_):
        return reference.apply_rotary_pos_emb(q_, k_, cos, sin, 2)

    grads = (dq_out, dk_out)
    hf_outs, hf_grads = _run_grads(fn, (q, k), grads)
    ours = (fwd.q, fwd.k, bwd.q, bwd.k)
    if cos_dtype == c.dtype:
        truth_outs, truth_grads = _run_grads(lambda q_, k_: reference.apply_rotary_pos_emb(
            q_, k_, cos.double(), sin.double(), 2), (q.double(), k.double()), [g.double() for g in grads])
        _check_rotary_outputs(ours, hf_outs + hf_grads, truth_outs + truth_grads)
        return
    for name, o, r in zip(("q", "k", "dq", "dk"), ours, hf_outs + hf_grads):
        with failure_label(name):
            assert o.dtype == r.dtype, (o.dtype, r.dtype)
            if o.dtype == torch.float32:
                assert_close_fp32(o, r)
            else:
                torch.testing.assert_close(o, r, rtol=ULP[o.dtype], atol=ULP[o.dtype] * 4)


@pytest.mark.parametrize("case", list(ROTARY_CASES))
def test_apply_rotary(harness, case):
    _check_apply_rotary(harness, ROTARY_CASES[case])


# --- SwiGLU --------------------------------------------------------------------------------------
# csrc/ops/swiglu.cu, separate gate / up tensors (swiglu_fwd / swiglu_bwd) and the two halves of one
# gate_up (swiglu_fused_fwd / swiglu_fused_bwd, whose gradient is the two halves of one tensor),
# rows any stride apart. Tolerances of test_rope_swiglu_cuda.py.


@dataclass(frozen=True)
class Swi:
    cols: int
    rows: int = 33
    dtype: torch.dtype = torch.float32
    form: str = "split"  # split | fused
    pad: int = 0  # rows this many elements further apart than the tensor's width (fused: 2 * cols)
    special: str = ""  # extreme: saturated / infinite / NaN gates
    opts: dict = field(default_factory=dict)


SWIGLU_CASES = {
    "fp32-c1-split": Swi(1),
    "bf16-c7-fused": Swi(7, dtype=BF16, form="fused", opts=RANDOM),
    "fp16-c1000-split": Swi(1000, dtype=FP16),
    "bf16-c4099-fused": Swi(4099, dtype=BF16, form="fused", opts=WORKERS),
    "fp32-c11008-split-pad8": Swi(11008, rows=6, pad=8),
    "bf16-c2048-split-pad3": Swi(2048, rows=9, dtype=BF16, pad=3, opts=RANDOM),
    "fp16-c4096-fused-pad8": Swi(4096, rows=5, dtype=FP16, form="fused", pad=8),
    "fp32-c12-extreme-gates": Swi(12, rows=2, special="extreme"),
}
EXTREME_GATES = [-1e4, -100.0, -88.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 88.0, 100.0, 1e4, float("nan")]


def _swiglu_inputs(c: Swi, seed=0):
    """gate, up (views into one gate_up for the fused form, else separate), gate_up or None, dy."""
    g = torch.Generator().manual_seed(seed)
    gate = 3 * torch.randn(c.rows, c.cols, generator=g)
    up = 3 * torch.randn(c.rows, c.cols, generator=g)
    dy = torch.randn(c.rows, c.cols, generator=g).to(c.dtype)
    if c.special == "extreme":
        gate[:] = torch.tensor(EXTREME_GATES)
    gate, up = gate.to(c.dtype), up.to(c.dtype)
    if c.form == "fused":
        big = torch.zeros(c.rows, 2 * c.cols + c.pad, dtype=c.dtype)
        big[:, : c.cols], big[:, c.cols: 2 * c.cols] = gate, up
        gate_up = big[:, : 2 * c.cols]
        return gate_up[:, : c.cols], gate_up[:, c.cols:], gate_up, dy
    if c.pad:
        big = torch.zeros(c.rows, 2 * (c.cols + c.pad), dtype=c.dtype)
        big[:, : c.cols], big[:, c.cols + c.pad: 2 * c.cols + c.pad] = gate, up
        gate, up = big[:, : c.cols], big[:, c.cols + c.pad: 2 * c.cols + c.pad]
    return gate, up, None, dy


def _check_swiglu(exe, c: Swi):
    gate, up, gate_up, dy = _swiglu_inputs(c)
    opts = emu.Options(**c.opts)
    if c.form == "fused":
        fwd = emu.swiglu_fused_fwd(exe, gate_up, options=opts)
        bwd = emu.swiglu_fused_bwd(exe, dy, gate_up, options=opts)
        dgate, dup = bwd.dgate_up[:, : c.cols], bwd.dgate_up[:, c.cols:]
    else:
        fwd = emu.swiglu_fwd(exe, gate, up, options=opts)
        bwd = emu.swiglu_bwd(exe, dy, gate, up, options=opts)
        dgate, dup = bwd.dgate, bwd.dup
    assert fwd.status == 0 and bwd.status == 0, (fwd.status, bwd.status)
    # blocks of (tx chunks) x (256 / tx rows), tx the power of two covering a row (at most 256)
    vec = 16 // c.dtype.itemsize
    chunks = _cdiv(c.cols, vec)
    tx = min(256, 1 << (chunks - 1).bit_length())
    grid = (_cdiv(chunks, tx), _cdiv(c.rows, 256 // tx), 1)
    aligned = c.cols % vec == 0 and _aligned(gate, (gate.stride(0),)) and _aligned(up, (up.stride(0),))
    for r, name in ((fwd, "fwd"), (bwd, "bwd")):
        assert [(launch.kernel, launch.grid, launch.threads) for launch in r.launches] == \
            [(f"{name}_kernel<{str(aligned).lower()}>", grid, 256)], r.launches
    hf_outs, hf_grads = _run_grads(reference.swiglu, (gate, up), (dy,))
    ours = (fwd.y, dgate, dup)
    if c.special == "extreme":  # test_swiglu_extreme_gates: behave like torch's silu
        for name, o, r in zip(("y", "dgate", "dup"), ours, hf_outs + hf_grads):
            with failure_label(name):
                torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-30, equal_nan=True)
        return
    truth_outs, truth_grads = _run_grads(reference.swiglu, (gate.double(), up.double()), (dy.double(),))
    for name, o, r, t in zip(("y", "dgate", "dup"), ours, hf_outs + hf_grads, truth_outs + truth_grads):
        with failure_label(name):
            if o.dtype == torch.float32:
                assert_close_fp32(o, r)
            else:
                assert_low_precision_ok(o, r, t)


@pytest.mark.parametrize("case", list(SWIGLU_CASES))
def test_swiglu(harness, case):
    _check_swiglu(harness, SWIGLU_CASES[case])


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


DTYPES = (torch.float32, FP16, BF16)


@pytest.mark.parametrize("seed", range(32), ids=lambda s: f"seed{s}")
def test_random_token_logprobs(harness, seed):
    import random

    r = random.Random(6000 + seed)
    c = Lp(r.choice((1, 2, 7, 9, 100, 1000, 1024, 2047, 2048, 2049, 4096, 4099, 8192)), dtype=r.choice(DTYPES),
           b=r.randint(1, 3), t=r.randint(1, 5), temperature=r.choice((1.0, 1.0, 0.6, 1.7)), entropy=r.random() < 0.7,
           layout=r.choice(("contig", "contig", "slice", "offset")), ids_dtype=r.choice((torch.int32, torch.int64)),
           special=r.choice(("", "", "masked", "padded", "out-of-range", "peaked")), opts=_random_opts(r))
    with failure_label(c):
        _check_lp(harness, c)


@pytest.mark.parametrize("seed", range(32), ids=lambda s: f"seed{s}")
def test_random_rms_norm(harness, seed):
    import random

    r = random.Random(7000 + seed)
    dtype = r.choice(DTYPES)
    cols = r.choice((1, 3, 8, 63, 64, 255, 256, 511, 512, 513, 520, 777, 1024, 2047, 4096, 4100, 8192, 8193, 8200))
    c = Rms(cols, rows=r.choice((1, 2, 5, 17, 64, 300)) if cols <= 1024 else r.randint(1, 5), dtype=dtype,
            w_dtype=dtype if r.random() < 0.7 else r.choice(DTYPES), residual=r.random() < 0.5,
            layout=r.choice(("contig", "padded", "offset")), eps=r.choice((1e-6, 1e-5)), device=r.choice((0, 1, 2)),
            opts=_random_opts(r))
    with failure_label(c):
        _check_rms(harness, c)


@pytest.mark.parametrize("seed", range(24), ids=lambda s: f"seed{s}")
def test_random_rotary(harness, seed):
    """Even seeds rope, odd ones apply_rotary (with mixed cos / sin dtypes now and then)."""
    import random

    r = random.Random(8000 + seed)
    hkv = r.choice((1, 2))
    c = Rope(r.choice((2, 8, 10, 16, 64, 80, 96, 128, 256)), b=r.randint(1, 3), s=r.choice((1, 2, 7, 33)),
             hq=hkv * r.choice((1, 2, 3, 4)), hkv=hkv, dtype=r.choice(DTYPES), scaling=r.choice(list(ROPE_SCALINGS)),
             pos=r.choice(("batch", "broadcast")), pos_dtype=r.choice((torch.int32, torch.int64)),
             layout=r.choice(("bshd", "from-bhsd", "offset")), cos_dtype=r.choice((None, None) + DTYPES),
             opts=_random_opts(r))
    with failure_label(c):
        if seed % 2 == 0:
            _check_rope(harness, replace(c, cos_dtype=None))
        else:
            _check_apply_rotary(harness, c)


@pytest.mark.parametrize("seed", range(16), ids=lambda s: f"seed{s}")
def test_random_swiglu(harness, seed):
    import random

    r = random.Random(9000 + seed)
    c = Swi(r.choice((1, 2, 3, 8, 9, 64, 255, 1000, 1024, 2049, 4099, 8192)), rows=r.choice((1, 3, 17, 65)),
            dtype=r.choice(DTYPES), form=r.choice(("split", "fused")), pad=r.choice((0, 0, 3, 8)), opts=_random_opts(r))
    with failure_label(c):
        _check_swiglu(harness, c)


# --- the harness can fail -----------------------------------------------------------------------

# Each deliberately wrong emulator (tests/cuda_emulation/src/runtime.cpp, EMU_MUTATE_*) and each
# deliberately wrong kernel (emulator.py KERNEL_MUTANTS) must fail the sweeps: proof that a pass
# means the kernels were checked, not that nothing was compared.
MUTANT_RUNS = {
    # a fragment index of the non-transposed ldmatrix (Q / K fragments): wrong scores
    "LDMATRIX": [("fwd", "d64-causal-b2-gqa2", FP16), ("bwd", "d64-causal-sq<sk", BF16)],
    # one B element of mma.sync: wrong products in every tensor-core kernel
    "MMA": [("fwd", "d128-causal-gqa8", BF16), ("decode", "fp16-d16-sq4-g8-splits0", None)],
    # cp.async.wait_group N leaves a group too many in flight: the emulator reports the read
    "CP_ASYNC_WAIT": [("fwd", "d96-window37", FP16), ("decode", "bf16-d64-sq4-g8-splits3", None)],
    # TMA places the 16-byte chunks with a wrong 128-byte swizzle: wgmma reads other elements
    "TMA_SWIZZLE": [("fwd_sm90", "d64-causal-b2-gqa2", None), ("bwd_sm90", "d128-causal-b2-gqa2", None)],
    # wgmma ignores the MN-major descriptor's leading byte offset: V columns 64 .. 127 (head dim 128)
    # read as columns 0 .. 63 (the backward: dO and Q as B of dV / dK)
    "WGMMA_LBO": [("fwd_sm90", "d128-causal-sq<sk", None), ("bwd_sm90", "d128-window37", None)],
    # TMA signals only the in-bounds bytes of a box: a tile past the tensor's end never completes its
    # mbarrier phase, which the emulator reports as a deadlock
    "TMA_TX": [("fwd_sm90", "d128-causal-sq>sk-rows-without-keys", None),
               ("bwd_sm90", "d128-causal-sq>sk-rows-without-keys", None)],
    # the last xor-butterfly step of lane 0 reads the wrong lane: RMSNorm's warp and block sums and
    # the block all-reduce of the log-probabilities' logsumexp go wrong
    "SHFL_XOR": [("rms", "fp16-c512-residual", None), ("rms", "bf16-c4096-residual", None),
                 ("logprobs", "bf16-v4099-t1.3", None)],
    # a kernel mutant (src/mutants/logprobs_inplace_race.cu): in the backward, thread 0 reads the
    # target's logit with no barrier before the thread owning it overwrites it in place
    # (float32 logits, or a peaked distribution: where the target's probability is tiny, the gradient
    # computed from the wrong value rounds to the right one in float16 / bfloat16)
    "LOGPROBS_INPLACE_RACE": [("logprobs", "fp32-v4099-masked-int32-ids", None),
                              ("logprobs", "bf16-v4096-peaked-t0.8", None)],
}


def _run_sweep_case(harness, kind, case, dtype):
    if kind == "fwd_sm90":
        _check_fwd_sm90(harness, *SM90_CASES[case])
    elif kind == "bwd_sm90":
        _check_bwd(harness, *SM90_BWD_CASES[case], None, sm90=True)
    elif kind == "fwd":
        _check_fwd(harness, FWD_CASES[case], dtype)
    elif kind == "bwd":
        _check_bwd(harness, *BWD_CASES[case], "8warps-2stages")
    elif kind == "logprobs":
        _check_lp(harness, LP_CASES[case])
    elif kind == "rms":
        _check_rms(harness, RMS_CASES[case])
    else:
        _check_decode(harness, *DECODE_CASES[case])


# What the failure must say, where it is the emulator's report rather than a wrong result.
MUTANT_MESSAGES = {"TMA_TX": r"deadlock: no thread can run.*wait on mbarrier .* tx-count",
                   "LOGPROBS_INPLACE_RACE": r"written in place differs from the out-of-place one"}


@pytest.mark.parametrize("mutation", list(MUTANT_RUNS))
def test_mutated_emulator_fails(harness, mutation):
    mutant = emu.build(mutation)
    for kind, case, dtype in MUTANT_RUNS[mutation]:
        # a wrong result, or EmulatorFailure
        with pytest.raises(AssertionError, match=MUTANT_MESSAGES.get(mutation)):
            _run_sweep_case(mutant, kind, case, dtype)
