"""Decode / speculative-verify attention over a KV cache in Triton (flash-decoding).

q ``[B, Sq, Hq, D]`` (Sq small: 1 for decode, k+1 for verify), caches ``[B, S_max, Hkv, D]``,
``cache_seqlens`` ``[B]`` int32 (valid keys per row, the Sq query tokens included: query t sits
at key position ``L - Sq + t``, causal among themselves, optional sliding window), optional
``cache_leftpad`` ``[B]`` int32 (a row's keys start there: left padding, skipped in place).

The G query heads of a kv group and the Sq query tokens form the rows of one tile (row
``r = g * Sq + t``), so each K/V byte is read once per group. The key axis is split into
``num_splits`` chunks, one program per (chunk, batch, kv head); each writes a normalised partial
output and its lse (float32), and a combine kernel merges them exactly:
``lse = log sum_i exp(lse_i)``, ``o = sum_i exp(lse_i - lse) o_i``. Lengths are read on the
device (no host synchronisation); lengths past S_max are clamped to S_max.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _decode_split_kernel(
    Q, K, V, SEQLENS, LEFTPAD, O_PART, LSE_PART,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h,
    so_b, so_p, so_r, sl_b, sl_p,
    seqlen_q, max_seqlen_k, head_dim, group, scale_log2, window, chunk,
    HAS_WINDOW: tl.constexpr, HAS_LEFTPAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kvh = tl.program_id(2).to(tl.int64)
    k_len = tl.minimum(tl.load(SEQLENS + b).to(tl.int64), max_seqlen_k)
    k_len = tl.maximum(k_len, 0)

    r = tl.arange(0, BLOCK_M)
    g = r // seqlen_q
    t = r % seqlen_q
    row_ok = r < group * seqlen_q
    h = kvh * group + g
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    # t is int32: t * sq_s in int64 (a q view with a long token stride)
    q = tl.load(Q + b * sq_b + t[:, None].to(tl.int64) * sq_s + h[:, None] * sq_h + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    pos = k_len - seqlen_q + t  # key position of each row's query token
    k_base = K + b * sk_b + kvh * sk_h
    v_base = V + b * sv_b + kvh * sv_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, k_len)
    if HAS_WINDOW:
        lo = tl.maximum(lo, (k_len - seqlen_q - window + 1) // BLOCK_N * BLOCK_N)
    k_start = 0
    if HAS_LEFTPAD:
        # Left padding: this row's keys start at k_start; skip the blocks before it entirely.
        k_start = tl.minimum(tl.maximum(tl.load(LEFTPAD + b).to(tl.int64), 0), k_len)
        lo = tl.maximum(lo, k_start // BLOCK_N * BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        # int64 on the GPU already (the loop variable takes hi's type); explicit for the
        # interpreter, whose loop variable is a Python int (cols * sk_s would wrap in int32)
        cols = start_n + offs_n.to(tl.int64)
        col_ok = (cols < hi) & (cols >= k_start)  # padding slots are never read (they may hold NaN)
        kt = tl.load(k_base + cols[None, :] * sk_s + offs_d[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        qk = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
        ok = row_ok[:, None] & col_ok[None, :] & (cols[None, :] <= pos[:, None])
        if HAS_WINDOW:
            ok = ok & (cols[None, :] > pos[:, None] - window)
        qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * sv_s + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), tl.where(empty, 0.0, m_i) + tl.log2(l_safe))  # log2 domain
    # partial rows are indexed by query head and token: row index h * Sq + t
    out_rows = h * seqlen_q + t
    tl.store(O_PART + b * so_b + split * so_p + out_rows[:, None] * so_r + offs_d[None, :],
             acc / l_safe[:, None], mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE_PART + b * sl_b + split * sl_p + out_rows, lse, mask=row_ok)


@triton.jit
def _decode_combine_kernel(
    O_PART, LSE_PART, OUT,
    so_b, so_p, so_r, sl_b, sl_p, sout_b, sout_s, sout_h,
    seqlen_q, head_dim, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # h * Sq + t
    b = tl.program_id(1).to(tl.int64)
    h = row // seqlen_q
    t = row % seqlen_q
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    d_ok = offs_d < head_dim
    lse = tl.load(LSE_PART + b * sl_b + offs_s * sl_p + row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)
    total = tl.sum(w, 0)
    o = tl.load(O_PART + b * so_b + offs_s[:, None] * so_p + row * so_r + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(OUT + b * sout_b + t * sout_s + h * sout_h + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)


#: most key splits per row (the partial outputs of more would not pay for their combine)
MAX_SPLITS = 64


def _num_splits(batch: int, hkv: int, max_seqlen_k: int, block_n: int, device) -> int:
    """Enough programs to fill the GPU, each with at least 256 keys."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = triton.cdiv(2 * sms, max(batch * hkv, 1))
    return max(1, min(want, triton.cdiv(max_seqlen_k, max(256, block_n)), MAX_SPLITS))


def decode_attention_forward(q, k_cache, v_cache, cache_seqlens, cache_leftpad, softmax_scale, window, num_splits):
    """q ``[B, Sq, Hq, D]``; caches ``[B, S_max, Hkv, D]`` (unit stride on the last dim);
    ``cache_leftpad``: None or ``[B]`` int32;
    ``window <= 0``: none; ``num_splits <= 0``: chosen from the shapes. Returns out like q."""
    batch, sq, hq, d = q.shape
    smax, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if smax == 0:
        return out.zero_()
    block_n = 16 if _INTERPRET else (64 if q.dtype != torch.float32 else 32)
    if num_splits <= 0:
        num_splits = _num_splits(batch, hkv, smax, block_n, q.device)
    # A caller's count is a hint: capped as the chosen ones are, so the combine kernel's tile
    # (BLOCK_S splits x head_dim floats) stays small enough to compile and run well.
    num_splits = min(num_splits, MAX_SPLITS)
    chunk = triton.cdiv(triton.cdiv(smax, num_splits), block_n) * block_n
    num_splits = triton.cdiv(smax, chunk)
    block_m = max(16, triton.next_power_of_2(group * sq))
    block_d = max(16, triton.next_power_of_2(d))
    o_part = torch.empty((batch, num_splits, hq * sq, d), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((batch, num_splits, hq * sq), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(num_splits, batch, hkv)](
        q, k_cache, v_cache, cache_seqlens, cache_seqlens if cache_leftpad is None else cache_leftpad,
        o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        sq, smax, d, group, softmax_scale * _LOG2E, max(window, 0), chunk,
        HAS_WINDOW=window > 0, HAS_LEFTPAD=cache_leftpad is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=1 if _INTERPRET else 3,
    )
    _decode_combine_kernel[(hq * sq, batch)](
        o_part, lse_part, out,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        sq, d, num_splits, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d, num_warps=4,
    )
    return out
