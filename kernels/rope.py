"""Rotary position embedding (half-split, as transformers) on q and k in one launch, in Triton.

Two forms share one rotation routine:

- ``rope_forward``/``rope_backward``: cos/sin are computed in the kernel, in float32, from
  ``position_ids * inv_freq`` (no cos/sin tensors in memory), times ``attention_scaling``;
  Ministral 3's query temperature ``1 + beta * log(1 + floor(pos / L0))`` is fused on q.
- ``apply_rotary_forward``/``apply_rotary_backward``: cos/sin ``[B or 1, S, D]`` tensors are
  loaded, as transformers' ``apply_rotary_pos_emb`` takes them.

q/k are ``[B, S, H, D]`` views with a unit stride on D (any other strides); outputs are new
contiguous ``[B, S, H, D]`` tensors. The grid is tokens x head blocks: the first
``cdiv(Hq, BLOCK_H)`` head blocks of a token are q's, the rest k's, so GQA head counts need
nothing special. The rotation is computed in float32 and rounded once; transformers rounds
``x * cos`` and ``rotate_half(x) * sin`` separately in the activation dtype, which can differ by
one unit in the last place in bfloat16/float16.

A rotation is orthogonal, so each backward is the forward kernel run on the output gradients
with the rotation reversed: for ``out1 = x1*c1 - x2*s1``, ``out2 = x2*c2 + x1*s2`` the gradient
is the same formula with ``(s1, s2)`` replaced by ``(-s2, -s1)``.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_TILE_ELEMENTS = 2048  # elements of one head-block tile: bounds registers at large head_dim


@triton.jit
def _rotate_head_block(
    X, OUT, token_x, token_out, stride_xh,
    heads, n_heads, half_cols, HALF,
    cos1, sin1, cos2, sin2,
):
    """Rotate heads ``heads`` of one token: ``out = x * cos + rotate_half(x) * sin``.

    ``cos*``/``sin*`` are float32 ``[BLOCK_HALF]`` vectors for the first and second half of D;
    ``token_x``/``token_out`` are the token's int64 offsets in X and in the contiguous OUT.
    """
    mask = (heads < n_heads)[:, None] & (half_cols < HALF)[None, :]
    x_ptrs = X + token_x + heads[:, None].to(tl.int64) * stride_xh + half_cols[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos1[None, :] - x2 * sin1[None, :]
    out2 = x2 * cos2[None, :] + x1 * sin2[None, :]
    out_ptrs = OUT + token_out + heads[:, None].to(tl.int64) * (2 * HALF) + half_cols[None, :]
    tl.store(out_ptrs, out1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(out_ptrs + HALF, out2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_token_heads(
    Q, K, Q_OUT, K_OUT, b, s, token,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    n_q_heads, n_k_heads, half_cols, HALF,
    cos1, sin1, cos2, sin2, q_scale,
    BLOCK_H: tl.constexpr,
):
    """The head block ``program_id(1)`` of one token: q's blocks first, then k's.

    ``q_scale`` (float32 scalar) multiplies q's result only: the query temperature.
    """
    head_block = tl.program_id(1)
    n_q_blocks = tl.cdiv(n_q_heads, BLOCK_H)
    if head_block < n_q_blocks:
        heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
        _rotate_head_block(
            Q, Q_OUT, b * stride_qb + s * stride_qs, token * n_q_heads * (2 * HALF), stride_qh,
            heads, n_q_heads, half_cols, HALF,
            cos1 * q_scale, sin1 * q_scale, cos2 * q_scale, sin2 * q_scale,
        )
    else:
        heads = (head_block - n_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        _rotate_head_block(
            K, K_OUT, b * stride_kb + s * stride_ks, token * n_k_heads * (2 * HALF), stride_kh,
            heads, n_k_heads, half_cols, HALF,
            cos1, sin1, cos2, sin2,
        )


@triton.jit
def _rope_kernel(
    Q, K, P, INV_FREQ, Q_OUT, K_OUT,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_pb, stride_ps,
    seq_len, n_q_heads, n_k_heads, HALF,
    attention_scaling, sin_sign, llama4_beta, llama4_original_max,
    HAS_TEMPERATURE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    half_cols = tl.arange(0, BLOCK_HALF)

    # Exactly transformers' float32 angle, position_ids.float() * inv_freq: one float32 product,
    # so every position (even past 2^24, where the conversion itself rounds) gets its angle.
    pos = tl.load(P + b * stride_pb + s * stride_ps).to(tl.float32)
    inv_freq = tl.load(INV_FREQ + half_cols, mask=half_cols < HALF, other=0.0)
    angle = pos * inv_freq
    # Angles reach 1e6 radians, which needs full-range argument reduction: on NVIDIA GPUs
    # tl.cos/tl.sin lower to libdevice's cosf/sinf (checked in sm_90 PTX: no cos.approx).
    cos = tl.cos(angle) * attention_scaling
    sin = tl.sin(angle) * attention_scaling * sin_sign  # sin_sign -1: the inverse rotation

    q_scale = 1.0
    if HAS_TEMPERATURE:
        # IEEE division (div_rn) so floor() sees the correctly rounded quotient, as torch does.
        bucket = tl.floor(tl.math.div_rn(pos, llama4_original_max))
        q_scale = 1.0 + llama4_beta * tl.log(1.0 + bucket)

    _rotate_token_heads(
        Q, K, Q_OUT, K_OUT, b, s, token,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
        n_q_heads, n_k_heads, half_cols, HALF,
        cos, sin, cos, sin, q_scale, BLOCK_H,
    )


@triton.jit
def _apply_rotary_kernel(
    Q, K, COS, SIN, Q_OUT, K_OUT,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_cb, stride_cs, stride_sb, stride_ss,
    seq_len, n_q_heads, n_k_heads, HALF,
    INVERSE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    half_cols = tl.arange(0, BLOCK_HALF)
    col_mask = half_cols < HALF

    # Both halves are loaded: cos/sin from transformers repeat them, but any tensor is accepted.
    cos_ptrs = COS + b * stride_cb + s * stride_cs + half_cols
    sin_ptrs = SIN + b * stride_sb + s * stride_ss + half_cols
    cos1 = tl.load(cos_ptrs, mask=col_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptrs + HALF, mask=col_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptrs, mask=col_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptrs + HALF, mask=col_mask, other=0.0).to(tl.float32)
    if INVERSE:
        sin1, sin2 = -sin2, -sin1

    _rotate_token_heads(
        Q, K, Q_OUT, K_OUT, b, s, token,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
        n_q_heads, n_k_heads, half_cols, HALF,
        cos1, sin1, cos2, sin2, 1.0, BLOCK_H,
    )


class LaunchConfig(NamedTuple):
    """Heads per program (a power of 2; q's and k's head blocks are separate programs) and warps."""

    block_h: int
    num_warps: int


def default_config(n_heads: int, head_dim: int) -> LaunchConfig:
    """``n_heads``: the larger of q's and k's head counts."""
    block_half = triton.next_power_of_2(head_dim // 2)
    block_h = min(triton.next_power_of_2(n_heads), max(1, _TILE_ELEMENTS // (2 * block_half)))
    return LaunchConfig(block_h, 4 if block_h * block_half <= 1024 else 8)


# What bench/tune.py sweeps (the defaults of the presets' head layouts are among them).
CANDIDATES = tuple(LaunchConfig(*c) for c in itertools.product((2, 4, 8, 16, 32), (1, 2, 4, 8)))


def _launch_config(q, k, config: LaunchConfig | None = None) -> tuple[tuple[int, int], dict]:
    """Grid (tokens, q head blocks + k head blocks) and the block sizes; q and k not both empty."""
    batch, seq, n_q_heads, head_dim = q.shape
    block_h, num_warps = config or default_config(max(n_q_heads, k.shape[2]), head_dim)
    head_blocks = triton.cdiv(n_q_heads, block_h) + triton.cdiv(k.shape[2], block_h)
    meta = dict(BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(head_dim // 2), num_warps=num_warps)
    return (batch * seq, head_blocks), meta


def _qk_strides(q, k) -> tuple[int, ...]:
    return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))


def _batch_stride(t) -> int:
    """Batch stride of a ``[B or 1, S, ...]`` tensor: 0 when its batch of 1 broadcasts."""
    return 0 if t.shape[0] == 1 else t.stride(0)


def _empty_outputs(q, k, dtype_q=None, dtype_k=None):
    return (
        torch.empty(q.shape, dtype=dtype_q or q.dtype, device=q.device),
        torch.empty(k.shape, dtype=dtype_k or k.dtype, device=k.device),
    )


def _rope(q, k, position_ids, inv_freq, attention_scaling, llama4_beta, llama4_original_max, inverse,
          config=None):
    q_out, k_out = _empty_outputs(q, k)
    if q.numel() + k.numel() == 0:
        return q_out, k_out
    grid, meta = _launch_config(q, k, config)
    _rope_kernel[grid](
        q, k, position_ids, inv_freq, q_out, k_out,
        *_qk_strides(q, k),
        _batch_stride(position_ids), position_ids.stride(1),
        q.shape[1], q.shape[2], k.shape[2], q.shape[3] // 2,
        float(attention_scaling), -1.0 if inverse else 1.0,
        float(llama4_beta), float(llama4_original_max),
        HAS_TEMPERATURE=llama4_beta != 0.0, **meta,
    )
    return q_out, k_out


def rope_forward(q, k, position_ids, inv_freq, attention_scaling: float, llama4_beta: float,
                 llama4_original_max: int, config: LaunchConfig | None = None):
    """q ``[B, S, Hq, D]``, k ``[B, S, Hkv, D]`` (unit stride on D); position_ids ``[B or 1, S]``
    int32/int64; inv_freq ``[D/2]`` float32 contiguous. ``llama4_beta == 0`` means no query
    temperature (its value is then 1). Returns new contiguous ``(q_out, k_out)``. ``config``
    overrides ``default_config`` (bench/tune.py sweeps it)."""
    return _rope(q, k, position_ids, inv_freq, attention_scaling, llama4_beta, llama4_original_max, False,
                 config)


def rope_backward(dq_out, dk_out, position_ids, inv_freq, attention_scaling: float, llama4_beta: float,
                  llama4_original_max: int):
    """Gradients of ``rope_forward`` w.r.t. q and k (same arguments, output gradients first)."""
    return _rope(dq_out, dk_out, position_ids, inv_freq, attention_scaling, llama4_beta, llama4_original_max, True)


def _apply_rotary(q, k, cos, sin, inverse, out_dtype_q, out_dtype_k):
    q_out, k_out = _empty_outputs(q, k, out_dtype_q, out_dtype_k)
    if q.numel() + k.numel() == 0:
        return q_out, k_out
    grid, meta = _launch_config(q, k)
    _apply_rotary_kernel[grid](
        q, k, cos, sin, q_out, k_out,
        *_qk_strides(q, k),
        _batch_stride(cos), cos.stride(1), _batch_stride(sin), sin.stride(1),
        q.shape[1], q.shape[2], k.shape[2], q.shape[3] // 2,
        INVERSE=inverse, **meta,
    )
    return q_out, k_out


def apply_rotary_forward(q, k, cos, sin):
    """q ``[B, S, Hq, D]``, k ``[B, S, Hkv, D]``, cos/sin ``[B or 1, S, D]``, all with a unit
    stride on D. Outputs are in ``promote_types(x.dtype, cos.dtype)``, as in transformers."""
    return _apply_rotary(q, k, cos, sin, False,
                         torch.promote_types(q.dtype, cos.dtype), torch.promote_types(k.dtype, cos.dtype))


def apply_rotary_backward(dq_out, dk_out, cos, sin, q_dtype: torch.dtype, k_dtype: torch.dtype):
    """Gradients of ``apply_rotary_forward`` w.r.t. q and k, in ``q_dtype``/``k_dtype``."""
    return _apply_rotary(dq_out, dk_out, cos, sin, True, q_dtype, k_dtype)
