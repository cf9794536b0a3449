"""``thinkfuse.ops.flash_attention`` / ``decode_attention``: GQA attention for training and
serving (see ../shared/API.md for the contract).

The cuda and triton backends run behind ``torch.library`` custom ops:
``thinkfuse::flash_attention_fwd`` / ``thinkfuse::flash_attention_bwd`` joined by an autograd
formula (the lse output is differentiable too), and ``thinkfuse::decode_attention`` (forward
only). The torch backend is ``reference.flash_attention`` for flash attention, and for decode
attention ``_torch_decode``: the reference's float32 math batched over the rows with a mask
(``reference.decode_attention`` loops over the rows in Python, once per layer and step of a
patched model's ``generate``); tested against the reference.

The CUDA extension is expected to provide, with the Triton launchers' argument order (inputs
with a unit stride on the last dim, any other strides; outputs contiguous; ``window <= 0`` means
no sliding window; ``num_splits <= 0`` means choose):
    flash_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k,
                        int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal,
                        int window) -> (Tensor out, Tensor lse)
    flash_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse,
                        Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k,
                        float softmax_scale, bool causal, int window) -> (Tensor dq, Tensor dk, Tensor dv)
    decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens,
                     Tensor? cache_leftpad, float softmax_scale, int window, int num_splits) -> Tensor out
lse is float32 ``[B, Hq, Sq]`` (padded) or ``[Hq, total]`` (packed); rows that see no key have
out 0 and lse -inf.

The cuda flash_attention kernel (tensor cores) takes float16 / bfloat16 and the head dims of
``CUDA_FLASH_HEAD_DIMS``: other inputs raise TypeError / ValueError when the cuda backend was
named, and run on triton when it was chosen automatically.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._checks import check_float, check_same_device, check_tensor, with_unit_last_stride
from ..backend import (
    _constant_under_compile, backend_for_op, cuda_has_op, cuda_preferred_for, get_backend, resolve_backend,
    why_unavailable,
)
from ._registry import call, cuda_ops, custom_op, implementation, register_autograd

#: head dims the kernels accept (64, 96 and 128 are the real models'; the small ones are for tests)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 96, 128, 256)
#: most query tokens per row decode_attention takes (decode 1, speculative verify k + 1)
MAX_DECODE_QUERIES = 16
#: what the cuda flash_attention forward kernel (tensor cores, mma.sync) takes
CUDA_FLASH_DTYPES = (torch.float16, torch.bfloat16)
CUDA_FLASH_HEAD_DIMS = (16, 32, 64, 96, 128, 256)
#: head dims of the cuda backward kernel; for the others a cuda forward is differentiated by the
#: triton backward (same lse convention), so training works at every head dim the forward takes
CUDA_FLASH_BWD_HEAD_DIMS = (64, 96, 128)
#: the Hopper forward kernel (wgmma + TMA, sm_90a): the cuda forward's kernel on H100/H200 for
#: these head dims once validated; the mma.sync kernel otherwise
HOPPER_FLASH_OP = "flash_attention_fwd_sm90"
HOPPER_FLASH_HEAD_DIMS = (64, 128)
#: flash_attention's backend value (internal) when its forward runs the Hopper kernel and its
#: backward the faster validated kernel for the layout (``_backward_backend``). The automatic
#: choice on H100/H200 for the inputs the Hopper kernel takes: that kernel passed its GPU tests
#: and is the fastest forward measured (595 TFLOP/s causal 8k on an H100; Triton 432, cuDNN 585),
#: while the mma.sync forward is slower than Triton's (backend.CUDA_OPS_PENDING_VALIDATION).
HOPPER_FORWARD = "cuda-sm90-fwd"
#: the Hopper backward kernel (wgmma + TMA, sm_90a, head_dim 128): after the Hopper forward, the
#: backward of both layouts (validated on an H100, 2026-11-23: causal 2 x 8k fwd+bwd 9.9 ms
#: against Triton's 11.7; packed 16k tokens 5.5 ms)
HOPPER_BWD_OP = "flash_attention_bwd_sm90"
HOPPER_BWD_HEAD_DIMS = (128,)
#: flash_attention_bwd's backend value (internal) when it runs the Hopper backward
HOPPER_BACKWARD = "cuda-sm90-bwd"


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    sliding_window: Optional[int] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
):
    """``softmax(scale * q k^T + mask) v`` with GQA, bottom-right aligned causal mask, sliding
    window and packed sequences. Returns out (like q), and with ``return_lse`` also the float32
    lse ``[B, Hq, Sq]`` (``[Hq, total]`` packed).

    With ``cu_seqlens_*`` on a GPU, ``max_seqlen_*`` should be given (else they are read from
    the device, a host synchronisation); they must not be smaller than the longest sequence.
    On the CPU that is checked; on a GPU, where checking is the host synchronisation they avoid,
    it is trusted (as flash-attn trusts it), and the rows past a too-small max_seqlen_q come out
    as zeros (lse -inf).
    """
    scale = _check_attention(q, k, v, causal, softmax_scale, sliding_window, cu_seqlens_q, cu_seqlens_k,
                             max_seqlen_q, max_seqlen_k, return_lse)
    sliding_window = _bounded_window(sliding_window)
    name = _flash_backend(q, backend)
    if name == "torch":
        return reference.flash_attention(q, k, v, causal, scale, sliding_window, cu_seqlens_q, cu_seqlens_k,
                                         return_lse)
    if cu_seqlens_q is not None:
        # The kernels read offset b at cu + b: a strided view (cu[::2]) would be read as garbage.
        cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if len(cu_seqlens_q) > 1 else 0
        if max_seqlen_k is None:
            max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if len(cu_seqlens_k) > 1 else 0
        # No sequence is longer than all the tokens: a larger bound (even past int64, which the
        # op's int arguments cannot take) only sizes the grid, so it is cut there.
        max_seqlen_q, max_seqlen_k = min(max_seqlen_q, q.shape[0]), min(max_seqlen_k, k.shape[0])
    else:
        max_seqlen_q, max_seqlen_k = q.shape[1], k.shape[1]
    out, lse = call(
        "flash_attention_fwd",
        with_unit_last_stride(q), with_unit_last_stride(k), with_unit_last_stride(v), cu_seqlens_q, cu_seqlens_k,
        int(max_seqlen_q), int(max_seqlen_k), scale, bool(causal), int(sliding_window or 0), name,
    )
    return (out, lse) if return_lse else out


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    softmax_scale: Optional[float] = None,
    sliding_window: Optional[int] = None,
    num_splits: Optional[int] = None,
    cache_leftpad: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Attention of the last ``Sq`` tokens of each row over its KV cache (not differentiable).

    q ``[B, Sq, Hq, D]`` with ``1 <= Sq <= 16``; caches ``[B, S_max, Hkv, D]``; ``cache_seqlens``
    ``[B]`` int32 is where each row's keys end, the query tokens included (causal among
    themselves). ``cache_leftpad`` (``[B]`` int32, optional, as in flash-attn's
    ``flash_attn_with_kvcache``) is where they start: a left-padded batch attends to slots
    ``[cache_leftpad[b], cache_seqlens[b])`` in place, with no copy of the cache. ``num_splits``
    (a hint; None chooses) splits the key axis (flash-decoding).
    """
    scale = _check_decode(q, k_cache, v_cache, cache_seqlens, softmax_scale, sliding_window, num_splits,
                          cache_leftpad)
    sliding_window = _bounded_window(sliding_window)
    name = _decode_backend(q, k_cache, v_cache, backend)
    if name == "torch":
        return _torch_decode(q, k_cache, v_cache, cache_seqlens, scale, sliding_window, cache_leftpad)
    return call(
        "decode_attention",
        with_unit_last_stride(q), with_unit_last_stride(k_cache), with_unit_last_stride(v_cache),
        cache_seqlens.contiguous(), None if cache_leftpad is None else cache_leftpad.contiguous(), scale,
        int(sliding_window or 0), min(num_splits or 0, MAX_NUM_SPLITS_HINT), name,
    )


#: num_splits is a hint every kernel caps far below this; a larger one (even past int64, which
#: the op's int argument cannot take) is passed as this.
MAX_NUM_SPLITS_HINT = 2**31 - 1


#: Automatic selection, in eager mode, runs decode_attention's CUDA kernel for caches (K and V)
#: of at most this many bytes, and Triton's above. Eager decode of small batches is host-bound,
#: and Triton's launcher costs far more host time: on the 2026-11-23 H100 (MiMo-7B heads, bf16,
#: batch 1, 160 keys) a call took 180 us of host time on triton (two launches) and 33 us on
#: cuda. Triton's kernel is the faster on the GPU (2026-11-22: 12.1 vs 25.8 us at 1 x 8192 keys,
#: 183 vs 198 us at 16 x 8192 = 0.5 GiB, 753 vs 907 us at 64 x 8192 = 2 GiB), so the host saving
#: outweighs the GPU cost up to about 1 GiB. Under torch.compile and CUDA graph capture (no host
#: cost per replay) automatic selection stays on Triton.
EAGER_CUDA_DECODE_MAX_CACHE_BYTES = 1 << 30


def _decode_backend(q: Tensor, k_cache: Tensor, v_cache: Tensor, requested: Optional[str]) -> str:
    """The backend decode_attention runs on: the one named, else (see
    EAGER_CUDA_DECODE_MAX_CACHE_BYTES) cuda for an eager call over a small cache, else the
    automatic choice."""
    # The eager check first: under torch.compile it ends the test before get_backend's ContextVar.
    if _eager_cuda_decode_available(q) and not _backend_was_named(requested):
        cache_bytes = k_cache.numel() * k_cache.element_size() + v_cache.numel() * v_cache.element_size()
        if cache_bytes <= EAGER_CUDA_DECODE_MAX_CACHE_BYTES:
            return "cuda"
    return resolve_backend(q.device, requested, cuda_op="decode_attention")


def _eager_cuda_decode_available(q: Tensor) -> bool:
    """Whether an eager (not compiled, not captured) call on ``q``'s device can run the cuda
    decode kernel."""
    return (
        q.device.type == "cuda"
        and not torch.compiler.is_compiling()
        and cuda_has_op("decode_attention")
        and not torch.cuda.is_current_stream_capturing()
    )


def model_decode_backend(name: Optional[str]) -> Optional[str]:
    """decode_attention's ``backend`` for a model patched with backend ``name`` (None: automatic).
    "cuda" asks for the fastest validated kernels, which for decode depends on the call (see
    EAGER_CUDA_DECODE_MAX_CACHE_BYTES): the automatic choice. Other names as given."""
    return None if name == "cuda" else backend_for_op(name, "decode_attention")


def _torch_decode(q, k_cache, v_cache, cache_seqlens, scale: float, sliding_window, cache_leftpad=None) -> Tensor:
    """``reference.decode_attention`` for all rows at once: float32 scores over every cache slot,
    masked to each row's keys ``[cache_leftpad, cache_seqlens)``, causal among the queries (query
    i of Sq sits at key position ``len - Sq + i``) and within the window. Rows that see no key
    give 0."""
    batch, sq, hq, d = q.shape
    slots, hkv = k_cache.shape[1], k_cache.shape[2]
    q5 = q.float().reshape(batch, sq, hkv, hq // hkv, d)
    scores = torch.einsum("bqhgd,bshd->bhgqs", q5, k_cache.float()) * scale
    lengths = cache_seqlens.long().clamp(max=slots)
    position = lengths[:, None] - sq + torch.arange(sq, device=q.device)  # [B, Sq] key position of each query
    keys = torch.arange(slots, device=q.device)
    visible = keys <= position[..., None]  # [B, Sq, S]: causal, hence also inside the row's length
    if sliding_window:
        visible &= keys > position[..., None] - sliding_window
    # Only the slots [cache_leftpad, cache_seqlens) are keys. The others (left padding, and the
    # unwritten tail of a static cache allocated with torch.empty) may hold anything, NaN
    # included, which must not reach the output through 0 * v.
    is_key = keys < lengths[:, None]  # [B, S]
    if cache_leftpad is not None:
        is_key &= keys >= cache_leftpad.long()[:, None]
        visible &= is_key[:, None, :]
    v = v_cache.float().masked_fill(~is_key[:, :, None, None], 0.0)
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    seen = visible.any(-1)[:, None, None, :, None]  # a query with no key: softmax of all -inf is NaN
    probs = torch.where(seen, torch.softmax(scores, dim=-1), 0.0)
    out = torch.einsum("bhgqs,bshd->bqhgd", probs, v)
    return out.reshape(batch, sq, hq, d).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Backend choice


@_constant_under_compile
def _backend_was_named(requested: Optional[str]) -> bool:
    """Whether the backend comes from a name (the argument, use_backend, set_backend or
    THINKFUSE_BACKEND) rather than the automatic choice."""
    return requested is not None or get_backend() is not None


def _cuda_flash_refusal(q: Tensor) -> Optional[Exception]:
    """Why the cuda flash_attention kernel cannot take q (None when it can)."""
    if q.dtype not in CUDA_FLASH_DTYPES:
        return TypeError(
            f"q dtype {q.dtype} is not supported by the cuda flash_attention kernel (tensor cores: "
            "float16 or bfloat16); use backend='triton' or 'torch' for float32"
        )
    if q.shape[-1] not in CUDA_FLASH_HEAD_DIMS:
        return ValueError(
            f"head_dim {q.shape[-1]} is not supported by the cuda flash_attention kernel; expected one "
            f"of {CUDA_FLASH_HEAD_DIMS}; use backend='triton' or 'torch'"
        )
    return None


def _flash_backend(q: Tensor, requested: Optional[str]) -> str:
    """The backend flash_attention runs on. Inputs the cuda kernel lacks (float32, other head
    dims) raise when cuda was asked for by name, and go to triton when it was chosen
    automatically."""
    if requested == HOPPER_FORWARD:  # patch_model(backend="cuda"), see model_flash_backend
        if _hopper_forward_available(q):
            return requested
        return resolve_backend(q.device, "triton", cuda_op="flash_attention_fwd")
    name = resolve_backend(q.device, requested, cuda_op="flash_attention_fwd")
    if name == "cuda":
        refusal = _cuda_flash_refusal(q)
        if refusal is not None:
            if _backend_was_named(requested):
                raise refusal
            name = "triton" if why_unavailable("triton") is None else "torch"
    if name == "triton" and not _backend_was_named(requested) and _hopper_forward_available(q):
        return HOPPER_FORWARD
    return name


def model_flash_backend(name: Optional[str]) -> Optional[str]:
    """flash_attention's ``backend`` for a model patched with backend ``name`` (None: automatic).
    "cuda" asks for the fastest validated kernels: while the mma.sync forward is pending, that is
    HOPPER_FORWARD, which flash_attention turns into Triton where the Hopper kernel does not take
    the inputs; other names as backend.backend_for_op maps them."""
    if name == "cuda" and not cuda_preferred_for("flash_attention_fwd"):
        return HOPPER_FORWARD
    return backend_for_op(name, "flash_attention_fwd")


def _hopper_forward_available(q: Tensor) -> bool:
    """Whether the Hopper kernel (wgmma + TMA) runs the cuda forward of ``q``, rather than the
    mma.sync one, and is flash_attention's automatic choice for it."""
    return hopper_attention_applies(q.device, q.dtype, q.shape[-1])


#: gridDim.y / z limit: the Hopper forward launches a block row per sequence and per query head
HOPPER_MAX_GRID_DIM = 65535


def _within_hopper_grid(q: Tensor, cu_seqlens_q: Optional[Tensor]) -> bool:
    """Whether the Hopper forward's grid holds q's sequences and heads; beyond it (e.g. 70,000
    short padded sequences) the binding refuses, and the other kernels (1-D grids) take them."""
    batch = q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.numel() - 1
    return batch <= HOPPER_MAX_GRID_DIM and q.shape[-2] <= HOPPER_MAX_GRID_DIM


# Under torch.compile decided once while tracing, like resolve_backend (it imports the extension).
@_constant_under_compile
def hopper_attention_applies(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the Hopper forward takes such inputs: on a compute capability 9.0 GPU, for the
    dtypes and head dims it has, once it is validated (backend.CUDA_OPS_PENDING_VALIDATION),
    built, and has not refused this device."""
    if device.type != "cuda" or why_unavailable("cuda") is not None or device in _HOPPER_UNSUPPORTED:
        return False
    return hopper_kernel_applies(dtype, head_dim, _capability(device), cuda_preferred_for(HOPPER_FLASH_OP))


def _layout_backward(packed: bool) -> str:
    """The faster validated backward for a layout where the Hopper backward does not run."""
    return "cuda" if packed else "triton"


# A compile-time constant under torch.compile, like hopper_attention_applies.
@_constant_under_compile
def hopper_backward_validated(head_dim: int) -> bool:
    """Whether the Hopper backward takes over after the Hopper forward (which already restricts
    the device and dtypes): its head dims, once validated and built."""
    return head_dim in HOPPER_BWD_HEAD_DIMS and cuda_preferred_for(HOPPER_BWD_OP)


def _forward_backend(backend: str) -> str:
    """The backend whose forward kernel a flash_attention ``backend`` value runs (where the
    Hopper kernel does not take the inputs)."""
    return "triton" if backend == HOPPER_FORWARD else backend


def _backward_backend(backend: str, packed: bool, head_dim: int) -> str:
    """The backend whose backward kernels differentiate a forward run with ``backend``. The cuda
    backward covers CUDA_FLASH_BWD_HEAD_DIMS (Triton's, same lse convention, the others). After
    the Hopper forward: the Hopper backward where it applies (HOPPER_BACKWARD, head_dim 128),
    else Triton's for the padded layout and the cuda kernel's for packed sequences (measured on
    an H100, causal 8k: Triton's backward 8.9 ms against the cuda one's 12.0 ms padded, but
    11.6 ms against 7.4 ms packed, 16k tokens in 29 sequences)."""
    if backend == HOPPER_FORWARD:
        if hopper_backward_validated(head_dim):
            return HOPPER_BACKWARD
        backend = _layout_backward(packed)
    if backend == "cuda" and head_dim not in CUDA_FLASH_BWD_HEAD_DIMS:
        return "triton"
    return backend


# ---------------------------------------------------------------------------------------------
# Argument checks


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_scale(softmax_scale, head_dim) -> float:
    if softmax_scale is None:
        return head_dim ** -0.5
    return check_float("softmax_scale", softmax_scale, positive=True)


def _check_window(sliding_window, causal=True):
    if sliding_window is None:
        return
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
        raise TypeError(f"sliding_window must be None or an int, got {type(sliding_window).__name__}")
    if sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if not causal:
        raise ValueError("sliding_window requires causal=True")


#: a sliding window this long sees every key of any tensor (none has 2**62 elements)
UNBOUNDED_WINDOW = 2**62


def _bounded_window(sliding_window):
    """The window to compute with: longer ones see every key, like this one, whose masks
    (pos - window in int64, in the kernels and in torch) cannot overflow."""
    return None if sliding_window is None else min(sliding_window, UNBOUNDED_WINDOW)


def _check_heads(q_name, hq, k_name, hkv, head_dim, dk):
    if hkv == 0 or hq % hkv:
        raise ValueError(
            f"{q_name} has {hq} heads, which is not a multiple of {k_name}'s {hkv} heads (GQA needs Hq % Hkv == 0)"
        )
    if dk != head_dim:
        raise ValueError(f"{k_name} head_dim {dk} must equal {q_name}'s head_dim {head_dim}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not supported; expected one of {SUPPORTED_HEAD_DIMS}")


def _check_same_dtype(q, **others):
    for name, t in others.items():
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must equal q dtype {q.dtype}")


def _check_cu_seqlens(name, cu, total, batch, max_seqlen, max_name):
    check_tensor(name, cu, dtypes=None, ndim=1)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one offset (batch + 1 entries), got shape {tuple(cu.shape)}")
    if batch is not None and cu.shape[0] != batch:
        raise ValueError(f"{name} has {cu.shape[0]} entries but cu_seqlens_q has {batch}; both must be batch + 1")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)):
        raise TypeError(f"{max_name} must be None or an int >= 0, got {type(max_seqlen).__name__} {max_seqlen!r}")
    if max_seqlen is not None and max_seqlen < 0:
        raise ValueError(f"{max_name} must be None or an int >= 0, got {max_seqlen!r}")
    if cu.device.type == "cpu":  # value checks only where they cost no host synchronisation
        values = cu.tolist()
        if values[0] != 0:
            raise ValueError(f"{name} must start at 0, got {values[0]}")
        if any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"{name} must be non-decreasing, got {values}")
        if values[-1] != total:
            raise ValueError(f"{name} must end at the number of packed tokens {total}, got {values[-1]}")
        longest = max((b - a for a, b in zip(values, values[1:])), default=0)
        if max_seqlen is not None and max_seqlen < longest:
            raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest sequence in {name} ({longest})")


def _check_attention(q, k, v, causal, softmax_scale, sliding_window, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k, return_lse) -> float:
    check_tensor("q", q)
    check_tensor("k", k)
    check_tensor("v", v)
    _check_same_dtype(q, k=k, v=v)
    _check_bool("causal", causal)
    _check_bool("return_lse", return_lse)
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together (packed layout) or both be None")
    varlen = cu_seqlens_q is not None
    layout = "[total_tokens, H, D] with cu_seqlens" if varlen else "[B, S, H, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != (3 if varlen else 4):
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    if varlen:
        _check_heads("q", q.shape[1], "k", k.shape[1], q.shape[2], k.shape[2])
    else:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k batch {k.shape[0]} must equal q batch {q.shape[0]}")
        _check_heads("q", q.shape[2], "k", k.shape[2], q.shape[3], k.shape[3])
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("max_seqlen_q / max_seqlen_k go with cu_seqlens_q / cu_seqlens_k (packed layout)")
    _check_window(sliding_window, causal)
    scale = _check_scale(softmax_scale, q.shape[-1])
    if varlen:
        # before the device check, which reads .device: a cu_seqlens that is not a tensor must
        # raise a TypeError naming it, not an AttributeError
        _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], None, max_seqlen_q, "max_seqlen_q")
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], cu_seqlens_q.shape[0], max_seqlen_k,
                          "max_seqlen_k")
    check_same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return scale


def _check_decode(q, k_cache, v_cache, cache_seqlens, softmax_scale, sliding_window, num_splits,
                  cache_leftpad=None) -> float:
    check_tensor("q", q, ndim=4)
    check_tensor("k_cache", k_cache, ndim=4)
    check_tensor("v_cache", v_cache, ndim=4)
    _check_same_dtype(q, k_cache=k_cache, v_cache=v_cache)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} must equal k_cache shape {tuple(k_cache.shape)}")
    batch, sq = q.shape[0], q.shape[1]
    if k_cache.shape[0] != batch:
        raise ValueError(f"k_cache batch {k_cache.shape[0]} must equal q batch {batch}")
    if not 1 <= sq <= MAX_DECODE_QUERIES:
        raise ValueError(f"q must hold 1 to {MAX_DECODE_QUERIES} query tokens per row (dim 1), got {sq}; "
                         "use flash_attention for prefill")
    _check_heads("q", q.shape[2], "k_cache", k_cache.shape[2], q.shape[3], k_cache.shape[3])
    check_tensor("cache_seqlens", cache_seqlens, dtypes=None, ndim=1)
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if cache_seqlens.shape[0] != batch:
        raise ValueError(f"cache_seqlens must have one entry per batch row ({batch}), got {cache_seqlens.shape[0]}")
    if cache_leftpad is not None:
        check_tensor("cache_leftpad", cache_leftpad, dtypes=None, ndim=1)
        if cache_leftpad.dtype != torch.int32:
            raise TypeError(f"cache_leftpad must be int32, got {cache_leftpad.dtype}")
        if cache_leftpad.shape[0] != batch:
            raise ValueError(f"cache_leftpad must have one entry per batch row ({batch}), got "
                             f"{cache_leftpad.shape[0]}")
    _check_window(sliding_window)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")
    scale = _check_scale(softmax_scale, q.shape[-1])
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens)
    if cache_leftpad is not None:
        check_same_device(q=q, cache_leftpad=cache_leftpad)
    # The range checks read values: cheap on the CPU, a sync elsewhere, a graph break under compile.
    if cache_seqlens.device.type == "cpu" and batch and not torch.compiler.is_compiling():
        _check_decode_ranges(cache_seqlens, cache_leftpad, sq, k_cache.shape[1])
    return scale


def _check_decode_ranges(cache_seqlens: Tensor, cache_leftpad: Optional[Tensor], sq: int, slots: int) -> None:
    lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
    if lo < sq or hi > slots:
        raise ValueError(
            f"cache_seqlens must lie in [Sq, S_max] = [{sq}, {slots}] (they count the query "
            f"tokens), got values in [{lo}, {hi}]"
        )
    if cache_leftpad is not None and bool(((cache_leftpad < 0) | (cache_leftpad > cache_seqlens - sq)).any()):
        raise ValueError(
            "cache_leftpad must lie in [0, cache_seqlens - Sq] per row (the query tokens are keys of their "
            f"row), got {cache_leftpad.tolist()} for cache_seqlens {cache_seqlens.tolist()} and Sq = {sq}"
        )


# ---------------------------------------------------------------------------------------------
# Custom ops. `window <= 0` means no sliding window; `backend` is a plain string argument so
# torch.compile sees it as a constant.


def _torch_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window):
    """Explicit torch form of the kernels (used for the "torch" value of `backend`)."""
    out, lse = reference.flash_attention(q, k, v, causal, scale, window if window > 0 else None, cu_q, cu_k, True)
    return out.contiguous(), lse.contiguous()


def _dense_backward(dout, q, k, v, dlse, scale, causal, window):
    """Gradients of one sequence (q [Sq, Hq, D], k/v [Sk, Hkv, D]) in float32, written out (custom
    ops run below autograd, so the torch form cannot use it)."""
    sq, hq, d = q.shape
    sk, hkv, _ = k.shape
    group = hq // hkv
    qf, kf, vf, dof = (t.float() for t in (q, k, v, dout))
    kr, vr = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", qf, kr) * scale
    pos = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    cols = torch.arange(sk, device=q.device)[None, :]
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        visible &= cols <= pos
    if window > 0:
        visible &= cols > pos - window
    s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(dim=-1, keepdim=True) if sk else s.new_zeros((hq, sq, 1))
    e = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    l = e.sum(-1, keepdim=True)
    p = e / torch.where(l == 0, torch.ones_like(l), l)
    dof_h = dof.permute(1, 0, 2)  # [Hq, Sq, D]
    out = torch.einsum("hqk,khd->hqd", p, vr)
    delta = (out * dof_h).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.float()[..., None]
    dp = torch.einsum("hqd,khd->hqk", dof_h, vr)
    ds = p * (dp - delta)
    dq = torch.einsum("hqk,khd->qhd", ds, kr) * scale
    dk = (torch.einsum("hqk,qhd->khd", ds, qf) * scale).reshape(sk, hkv, group, d).sum(2)
    dv = torch.einsum("hqk,qhd->khd", p, dof).reshape(sk, hkv, group, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _torch_backward(dout, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, scale, causal, window):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if cu_q is None:
        for b in range(q.shape[0]):
            dq[b], dk[b], dv[b] = _dense_backward(dout[b], q[b], k[b], v[b], None if dlse is None else dlse[b],
                                                  scale, causal, window)
    else:
        cq, ck = cu_q.tolist(), cu_k.tolist()
        for b in range(len(cq) - 1):
            (qs, qe), (ks, ke) = (cq[b], cq[b + 1]), (ck[b], ck[b + 1])
            dq[qs:qe], dk[ks:ke], dv[ks:ke] = _dense_backward(
                dout[qs:qe], q[qs:qe], k[ks:ke], v[ks:ke], None if dlse is None else dlse[:, qs:qe],
                scale, causal, window)
    return dq, dk, dv


def _lse_shape(q, cu_q):
    if cu_q is not None:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


@custom_op("flash_attention_fwd")
def flash_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, causal: bool, window: int, backend: str,
) -> tuple[Tensor, Tensor]:
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window)
    if (backend in ("cuda", HOPPER_FORWARD) and _hopper_forward_available(q)
            and _within_hopper_grid(q, cu_seqlens_q)):
        result = _run_hopper(HOPPER_FLASH_OP, args, q.device)
        if result is not None:
            return result
    fn = implementation(_forward_backend(backend), "attention", "flash_attention_forward", "flash_attention_fwd",
                        _torch_forward)
    out, lse = fn(*args)
    return out, lse


#: devices where a Hopper kernel refused to run (e.g. an extension built for 9.0 without "a")
_HOPPER_UNSUPPORTED: set = set()


def _run_hopper(op: str, args: tuple, device: torch.device):
    """The Hopper kernel ``op`` of the extension on ``args``, or None where this build or driver
    cannot run it (the binding says "not supported here"); such a device is remembered, and
    neither Hopper kernel is tried on it again."""
    if device in _HOPPER_UNSUPPORTED:
        return None
    try:
        return getattr(cuda_ops(), op)(*args)
    except ValueError as exc:
        if "not supported here" not in str(exc):
            raise
        _HOPPER_UNSUPPORTED.add(device)
        return None


def hopper_kernel_applies(dtype: torch.dtype, head_dim: int, capability: tuple[int, int], validated: bool) -> bool:
    return validated and capability == (9, 0) and dtype in CUDA_FLASH_DTYPES and head_dim in HOPPER_FLASH_HEAD_DIMS


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@flash_attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window, backend):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=torch.float32)


@custom_op("flash_attention_bwd")
def flash_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float, causal: bool, window: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    args = (dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
            causal, window)
    if backend == HOPPER_BACKWARD:
        result = _run_hopper(HOPPER_BWD_OP, args, q.device)
        if result is not None:
            return result
        backend = _layout_backward(cu_seqlens_q is not None)
    fn = implementation(backend, "attention", "flash_attention_backward", "flash_attention_bwd", _torch_backward)
    dq, dk, dv = fn(*args)
    return dq, dk, dv


@flash_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      causal, window, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window, backend = inputs
    out, lse = output
    ctx.args = (max_q, max_k, scale, causal, window, backend)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, scale, causal, window, backend = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    backend = _backward_backend(backend, cu_q is not None, q.shape[-1])
    dq, dk, dv = call(
        "flash_attention_bwd",
        with_unit_last_stride(dout), q, k, v, out, lse, None if dlse is None else dlse.contiguous(),
        cu_q, cu_k, max_q, max_k, scale, causal, window, backend,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


register_autograd("flash_attention_fwd", _backward, _setup_context)


def _torch_decode_op_form(q, k_cache, v_cache, cache_seqlens, cache_leftpad, scale, window, num_splits):
    """The custom op's "torch" form (opcheck, tests): the torch backend's decode."""
    return _torch_decode(q, k_cache, v_cache, cache_seqlens, scale, window if window > 0 else None, cache_leftpad)


@custom_op("decode_attention")
def decode_attention_op(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, cache_leftpad: Optional[Tensor],
    softmax_scale: float, window: int, num_splits: int, backend: str,
) -> Tensor:
    fn = implementation(backend, "decode_attention", "decode_attention_forward", "decode_attention",
                        _torch_decode_op_form)
    return fn(q, k_cache, v_cache, cache_seqlens, cache_leftpad, softmax_scale, window, num_splits)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, cache_leftpad, softmax_scale, window, num_splits, backend):
    return q.new_empty(q.shape)
