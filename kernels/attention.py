"""Flash attention (FA2-style) forward and backward in Triton, with GQA, bottom-right aligned
causal masking, sliding windows and packed variable-length batches.

Layouts: padded ``[B, S, H, D]`` or packed ``[total, H, D]`` with ``cu_seqlens_q/k`` (int32,
``[B + 1]``). Every tensor is addressed through its strides (the last dim must have unit
stride). Query head h reads kv head ``h // group``; K/V are never expanded.

Masks: query row i of a sequence with Sq queries and Sk keys sits at key position
``i + Sk - Sq``; causal keeps ``j <= pos``, a window w keeps ``j > pos - w``. Key blocks that a
query block cannot see are skipped (not only masked). Rows that see no key give zeros and an
lse of -inf.

Forward: one program per (query block, batch, query head), online softmax in the log2 domain,
float32 lse output. Backward: a preprocessing kernel computes ``delta = rowsum(dO * O)``; one
kernel per (key block, batch, kv head) accumulates dK/dV in float32 over every query head of the
group (no expanded copies, no atomics); one kernel per (query block, batch, query head)
computes dQ.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _seq_bounds(CU, b, seqlen, total, IS_VARLEN: tl.constexpr):
    """(start offset, length) of sequence b. Packed: the offsets are clamped into [0, total]
    (the tensor's rows), as the cuda kernels do: on GPU tensors cu_seqlens' values are not checked
    (a host sync), and bad ones must not make the kernels read or write outside the tensors."""
    if IS_VARLEN:
        start = tl.minimum(tl.maximum(tl.load(CU + b).to(tl.int64), 0), total)
        end = tl.minimum(tl.maximum(tl.load(CU + b + 1).to(tl.int64), start), total)
        length = end - start
    else:
        start = b * 0
        length = seqlen + b * 0
    return start, length


@triton.jit
def _tile_program(batch, heads, LONGEST_FIRST_IS_LAST: tl.constexpr):
    """(tile, b, h) of this program of a 1-D grid of n_tiles * batch * heads programs
    (_tile_grid), tile slowest: every (sequence, head)'s tile of one slot runs before any of the
    next slot. LONGEST_FIRST_IS_LAST: slot 0 is the last tile (the forward's and dQ's query tiles,
    longest under a causal mask), else the first (dK/dV's key blocks). Longest-processing-time-
    first ordering: the final wave is made of short tiles, so the SMs finish together (a
    head-by-head order leaves some head's longest tile for the last wave)."""
    pid = tl.program_id(0)
    per_slot = batch * heads
    slot = pid // per_slot
    rest = pid - slot * per_slot
    tile = slot
    if LONGEST_FIRST_IS_LAST:
        tile = tl.num_programs(0) // per_slot - 1 - slot
    return tile, (rest // heads).to(tl.int64), (rest % heads).to(tl.int64)


@triton.jit
def _visible(rows, cols, k_len, shift, window, row_ok, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[rows x cols] mask of the keys each query row sees."""
    ok = row_ok[:, None] & (cols[None, :] < k_len)
    pos = rows[:, None] + shift
    if CAUSAL:
        ok = ok & (cols[None, :] <= pos)
    if HAS_WINDOW:
        ok = ok & (cols[None, :] > pos - window)
    return ok


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, sk_s, sv_s, offs_m, offs_n, offs_d, d_ok, row_ok,
                k_len, shift, window, scale_log2, lo, hi,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr,
                EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update over the key blocks [lo, hi). MASKED=False: every row of the tile
    sees every key of these blocks (interior blocks), so no mask is built."""
    for start_n in range(lo, hi, BLOCK_N):
        # int64 on the GPU already (the loop variable takes hi = k_len's type); explicit for the
        # interpreter, whose loop variable is a Python int (cols * sk_s would wrap in int32)
        cols = start_n + offs_n.to(tl.int64)
        k_ptrs = k_base + cols[None, :] * sk_s + offs_d[:, None]
        v_ptrs = v_base + cols[:, None] * sv_s + offs_d[None, :]
        if MASKED:
            col_ok = cols < k_len
            kt = tl.load(k_ptrs, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        elif EVEN_D:
            kt = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            kt = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        qk = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
        if MASKED:
            ok = _visible(offs_m, cols, k_len, shift, window, row_ok, CAUSAL, HAS_WINDOW)
            qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_b, so_s, so_h, sl_b, sl_h, sl_s,
    seqlen_q, seqlen_k, total_q, total_k, head_dim, group, scale_log2, window, batch, heads,
    IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, b, h = _tile_program(batch, heads, True)
    q_start, q_len = _seq_bounds(CU_Q, b, seqlen_q, total_q, IS_VARLEN)
    k_start, k_len = _seq_bounds(CU_K, b, seqlen_k, total_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    kvh = h // group
    shift = k_len - q_len

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    d_ok = offs_d < head_dim
    q = tl.load(Q + b * sq_b + h * sq_h + (q_start + offs_m[:, None]) * sq_s + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * sk_b + kvh * sk_h + k_start * sk_s
    v_base = V + b * sv_b + kvh * sv_h + k_start * sv_s

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo = 0
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + shift)
    if HAS_WINDOW:
        lo = tl.maximum(start_m + shift - window + 1, 0) // BLOCK_N * BLOCK_N
    # [lo, a) masked, [a, c) blocks every row of this tile fully sees (no mask), [c, hi) masked
    full_hi = k_len // BLOCK_N * BLOCK_N
    if CAUSAL:
        full_hi = tl.minimum(full_hi, tl.maximum(start_m + shift + 1, 0) // BLOCK_N * BLOCK_N)
    full_lo = lo
    if HAS_WINDOW:
        full_lo = tl.maximum(full_lo, (tl.maximum(start_m + BLOCK_M + shift - window, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N)
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    c = tl.maximum(tl.minimum(full_hi, hi), a)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, sk_s, sv_s, offs_m, offs_n, offs_d, d_ok, row_ok,
                                k_len, shift, window, scale_log2, lo, a,
                                True, CAUSAL, HAS_WINDOW, BLOCK_N, EVEN_D, PRECISION)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, sk_s, sv_s, offs_m, offs_n, offs_d, d_ok, row_ok,
                                k_len, shift, window, scale_log2, a, c,
                                False, CAUSAL, HAS_WINDOW, BLOCK_N, EVEN_D, PRECISION)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, sk_s, sv_s, offs_m, offs_n, offs_d, d_ok, row_ok,
                                k_len, shift, window, scale_log2, c, hi,
                                True, CAUSAL, HAS_WINDOW, BLOCK_N, EVEN_D, PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    m_safe = tl.where(empty, 0.0, m_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_safe + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(O + b * so_b + h * so_h + (q_start + offs_m[:, None]) * so_s + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * sl_b + h * sl_h + (q_start + offs_m) * sl_s, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA, CU_Q,
    so_b, so_s, so_h, sdo_b, sdo_s, sdo_h, sl_b, sl_h, sl_s,
    seqlen_q, total_q, head_dim,
    IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    q_start, q_len = _seq_bounds(CU_Q, b, seqlen_q, total_q, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < q_len)[:, None] & (offs_d < head_dim)[None, :]
    rows = q_start + offs_m[:, None]
    o = tl.load(O + b * so_b + h * so_h + rows * so_s + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows * sdo_s + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + b * sl_b + h * sl_h + (q_start + offs_m) * sl_s, tl.sum(o * do, 1), mask=offs_m < q_len)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_base, do_base, l_base, d_base, sq_s, sdo_s, sl_s, offs_m, offs_n, offs_d, d_ok,
                 q_len, k_len, shift, window, scale_log2, lo, hi,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                 PRECISION: tl.constexpr):
    """dK/dV of one key block from the query blocks [lo, hi) of one query head. MASKED=False:
    every query row sees every key of the block, so no mask is built."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m.to(tl.int64)  # int64 for the interpreter too (see _fwd_blocks)
        row_ok = rows < q_len
        qd_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * sq_s + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * sdo_s + offs_d[None, :], mask=qd_mask, other=0.0)
        lse = tl.load(l_base + rows * sl_s, mask=row_ok, other=0.0)
        delta = tl.load(d_base + rows * sl_s, mask=row_ok, other=0.0)
        qkt = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        pt = tl.exp2(qkt * scale_log2 - lse[None, :] * 1.4426950408889634)
        if MASKED:
            ok = tl.trans(_visible(rows, offs_n, k_len, shift, window, row_ok, CAUSAL, HAS_WINDOW))
            pt = tl.where(ok, pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_base, v_base, sk_s, sv_s, offs_m, offs_n, offs_d, d_ok, row_ok,
               k_len, shift, window, scale_log2, lo, hi,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr,
               PRECISION: tl.constexpr):
    """dQ of one query block from the key blocks [lo, hi). MASKED=False: every row sees every key
    of these blocks (all inside k_len), so no mask is built."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n.to(tl.int64)  # int64 for the interpreter too (see _fwd_blocks)
        col_ok = cols < k_len
        kt = tl.load(k_base + cols[None, :] * sk_s + offs_d[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(v_base + cols[None, :] * sv_s + offs_d[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        qk = tl.dot(q, kt, input_precision=PRECISION)
        p = tl.exp2(qk * scale_log2 - lse[:, None] * 1.4426950408889634)
        if MASKED:
            ok = _visible(offs_m, cols, k_len, shift, window, row_ok, CAUSAL, HAS_WINDOW)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sdo_b, sdo_s, sdo_h,
    sdk_b, sdk_s, sdk_h, sdv_b, sdv_s, sdv_h, sl_b, sl_h, sl_s,
    seqlen_q, seqlen_k, total_q, total_k, head_dim, group, scale, window, batch, heads,
    IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n, b, kvh = _tile_program(batch, heads, False)  # heads: the kv heads
    q_start, q_len = _seq_bounds(CU_Q, b, seqlen_q, total_q, IS_VARLEN)
    k_start, k_len = _seq_bounds(CU_K, b, seqlen_k, total_k, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= k_len:
        return
    shift = k_len - q_len
    scale_log2 = scale * 1.4426950408889634

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    kv_mask = (offs_n < k_len)[:, None] & d_ok[None, :]
    k = tl.load(K + b * sk_b + kvh * sk_h + (k_start + offs_n[:, None]) * sk_s + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * sv_b + kvh * sv_h + (k_start + offs_n[:, None]) * sv_s + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    lo = 0
    hi = q_len
    if CAUSAL:
        lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(hi, start_n + BLOCK_N - 1 - shift + window)
    # Query blocks [lo, a) need the mask; from a on every query row sees every key of this block
    # (causal, no window), so no mask is built. Rows past q_len load q = do = 0 and add nothing.
    a = hi
    if not HAS_WINDOW:
        a = lo
        if CAUSAL:
            a = tl.maximum(lo, (tl.maximum(start_n + BLOCK_N - 1 - shift, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
        a = tl.minimum(a, hi)
    for g in range(0, group):
        h = kvh * group + g
        q_base = Q + b * sq_b + h * sq_h + q_start * sq_s
        do_base = DO + b * sdo_b + h * sdo_h + q_start * sdo_s
        l_base = LSE + b * sl_b + h * sl_h + q_start * sl_s
        d_base = DELTA + b * sl_b + h * sl_h + q_start * sl_s
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, l_base, d_base, sq_s, sdo_s, sl_s, offs_m, offs_n,
                              offs_d, d_ok, q_len, k_len, shift, window, scale_log2, lo, a,
                              True, CAUSAL, HAS_WINDOW, BLOCK_M, PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, l_base, d_base, sq_s, sdo_s, sl_s, offs_m, offs_n,
                              offs_d, d_ok, q_len, k_len, shift, window, scale_log2, a, hi,
                              False, CAUSAL, HAS_WINDOW, BLOCK_M, PRECISION)
    dk = dk * scale
    tl.store(DK + b * sdk_b + kvh * sdk_h + (k_start + offs_n[:, None]) * sdk_s + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdv_b + kvh * sdv_h + (k_start + offs_n[:, None]) * sdv_s + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sdo_b, sdo_s, sdo_h,
    sdq_b, sdq_s, sdq_h, sl_b, sl_h, sl_s,
    seqlen_q, seqlen_k, total_q, total_k, head_dim, group, scale, window, batch, heads,
    IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, b, h = _tile_program(batch, heads, True)
    q_start, q_len = _seq_bounds(CU_Q, b, seqlen_q, total_q, IS_VARLEN)
    k_start, k_len = _seq_bounds(CU_K, b, seqlen_k, total_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    kvh = h // group
    shift = k_len - q_len
    scale_log2 = scale * 1.4426950408889634

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    d_ok = offs_d < head_dim
    qd_mask = row_ok[:, None] & d_ok[None, :]
    rows = q_start + offs_m
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_s + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_s + offs_d[None, :], mask=qd_mask, other=0.0)
    lse = tl.load(LSE + b * sl_b + h * sl_h + rows * sl_s, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + b * sl_b + h * sl_h + rows * sl_s, mask=row_ok, other=0.0)
    k_base = K + b * sk_b + kvh * sk_h + k_start * sk_s
    v_base = V + b * sv_b + kvh * sv_h + k_start * sv_s
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo = 0
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + shift)
    if HAS_WINDOW:
        lo = tl.maximum(start_m + shift - window + 1, 0) // BLOCK_N * BLOCK_N
    # Key blocks [lo, c) are seen whole by every row of this tile (causal, no window, inside
    # k_len): no mask. Rows past q_len load q = do = 0 and are not stored.
    c = lo
    if not HAS_WINDOW:
        c = k_len // BLOCK_N * BLOCK_N
        if CAUSAL:
            c = tl.minimum(c, tl.maximum(start_m + shift + 1, 0) // BLOCK_N * BLOCK_N)
        c = tl.maximum(tl.minimum(c, hi), lo)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, sk_s, sv_s, offs_m, offs_n, offs_d, d_ok, row_ok,
                    k_len, shift, window, scale_log2, lo, c, False, CAUSAL, HAS_WINDOW, BLOCK_N, PRECISION)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, sk_s, sv_s, offs_m, offs_n, offs_d, d_ok, row_ok,
                    k_len, shift, window, scale_log2, c, hi, True, CAUSAL, HAS_WINDOW, BLOCK_N, PRECISION)
    dq = dq * scale
    tl.store(DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_s + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qd_mask)


# ---------------------------------------------------------------------------------------------
# Host side


def _strides(t, varlen: bool):
    """(batch, seq, head) strides; the packed layout has no batch dim (stride 0)."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(lse, varlen: bool):
    """(batch, head, seq) strides of the lse ([B, H, Sq] or [H, total])."""
    if varlen:
        return 0, lse.stride(0), lse.stride(1)
    return lse.stride(0), lse.stride(1), lse.stride(2)


def _precision(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


class TileConfig(NamedTuple):
    """Launch shape of one attention kernel: query rows and keys per tile, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_fwd_config(head_dim: int, dtype) -> TileConfig:
    if _INTERPRET:
        return TileConfig(32, 16, 4, 1)
    if dtype == torch.float32:
        return TileConfig(64, 32, 4, 2)
    if head_dim <= 128:
        return TileConfig(128, 64, 8, 3)
    return TileConfig(64, 32, 4, 2)


def default_bwd_configs(head_dim: int, dtype) -> tuple[TileConfig, TileConfig]:
    """(dK/dV kernel, dQ kernel) configs."""
    if _INTERPRET:
        return TileConfig(16, 32, 4, 1), TileConfig(16, 32, 4, 1)
    if dtype == torch.float32 or head_dim > 128:
        return TileConfig(32, 32, 4, 1), TileConfig(32, 32, 4, 1)
    return TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 2)


# What bench/tune.py sweeps for half-precision inputs (the defaults above are among them). Each
# kernel is generic in its tile sizes; the tests run every candidate under the interpreter.
FWD_CANDIDATES = tuple(TileConfig(*c) for c in (
    (128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2),
    (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (256, 64, 8, 2),
))
DKDV_CANDIDATES = tuple(TileConfig(*c) for c in (
    (64, 64, 4, 2), (32, 64, 4, 2), (32, 128, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2),
    (64, 64, 8, 2), (64, 64, 4, 3), (16, 128, 4, 2), (128, 128, 8, 2),
))
DQ_CANDIDATES = tuple(TileConfig(*c) for c in (
    (64, 64, 4, 2), (128, 32, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2),
    (64, 64, 4, 3), (64, 128, 8, 2), (128, 64, 8, 3),
))


def _launch(config: TileConfig) -> dict:
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps,
                num_stages=config.num_stages)


def _geometry(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    varlen = cu_seqlens_q is not None
    if varlen:
        batch = cu_seqlens_q.shape[0] - 1
        hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
        return varlen, batch, hq, hkv, d, max_seqlen_q, max_seqlen_k
    return varlen, q.shape[0], q.shape[2], k.shape[2], q.shape[3], q.shape[1], k.shape[1]


def _tile_grid(n_tiles: int, batch: int, heads: int) -> tuple[int]:
    """The 1-D grid of _tile_program (tiles x sequences x heads programs)."""
    programs = n_tiles * batch * heads
    if programs >= 2**31:
        raise ValueError(f"{n_tiles} tiles x {batch} sequences x {heads} heads exceed the 2^31 - 1 programs "
                         "of a triton grid")
    return (programs,)


def _dummy(q):
    return torch.empty((1,), dtype=torch.int32, device=q.device)


def flash_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            softmax_scale, causal, window, config: TileConfig | None = None):
    """Returns ``(out, lse)``: out like q (contiguous), lse float32 ``[B, Hq, Sq]`` / ``[Hq, total]``.

    ``window <= 0`` means no sliding window. Inputs need a unit stride on the last dim.
    ``config`` overrides ``default_fwd_config`` (bench/tune.py sweeps it).
    """
    varlen, batch, hq, hkv, d, sq, sk = _geometry(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    # packed rows outside every sequence (cu_seqlens not ending at total) read as zeros / -inf
    alloc = torch.zeros if varlen else torch.empty
    out = alloc(q.shape, dtype=q.dtype, device=q.device)
    lse_shape = (hq, q.shape[0]) if varlen else (batch, hq, sq)
    lse = torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or batch == 0 or sq == 0:
        return out, lse
    config = config or default_fwd_config(d, q.dtype)
    cu_q = cu_seqlens_q if varlen else _dummy(q)
    cu_k = cu_seqlens_k if varlen else _dummy(q)
    grid = _tile_grid(triton.cdiv(sq, config.block_m), batch, hq)
    block_d = max(16, triton.next_power_of_2(d))
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_q, cu_k,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
        *_lse_strides(lse, varlen),
        sq, sk, q.shape[0], k.shape[0], d, hq // hkv, softmax_scale * _LOG2E, max(window, 0), batch, hq,
        IS_VARLEN=varlen, CAUSAL=causal, HAS_WINDOW=window > 0, BLOCK_D=block_d, EVEN_D=block_d == d,
        PRECISION=_precision(q.dtype), **_launch(config),
    )
    return out, lse


def flash_attention_backward(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, softmax_scale, causal, window,
                             configs: tuple[TileConfig, TileConfig] | None = None):
    """Returns ``(dq, dk, dv)``, contiguous, shaped and typed like q, k, v. ``dlse`` (optional,
    like lse) is the gradient reaching the lse output: it enters as ``delta -= dlse``.
    ``configs`` (dK/dV kernel, dQ kernel) overrides ``default_bwd_configs``."""
    varlen, batch, hq, hkv, d, sq, sk = _geometry(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if batch == 0 or q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if sq == 0 or sk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    dkdv_config, dq_config = configs or default_bwd_configs(d, q.dtype)
    block_d = max(16, triton.next_power_of_2(d))
    cu_q = cu_seqlens_q if varlen else _dummy(q)
    cu_k = cu_seqlens_k if varlen else _dummy(q)
    if varlen:
        # rows/keys past the last sequence (none when cu_seqlens end at total) stay zero
        dq.zero_()
        dk.zero_()
        dv.zero_()
    delta = torch.empty_like(lse)
    _attn_bwd_preprocess_kernel[(triton.cdiv(sq, 32 if _INTERPRET else 64), batch, hq)](
        out, dout, delta, cu_q, *_strides(out, varlen), *_strides(dout, varlen), *_lse_strides(lse, varlen),
        sq, q.shape[0], d, IS_VARLEN=varlen, BLOCK_M=32 if _INTERPRET else 64, BLOCK_D=block_d, num_warps=4,
    )
    if dlse is not None:
        delta -= dlse
    common = dict(IS_VARLEN=varlen, CAUSAL=causal, HAS_WINDOW=window > 0, BLOCK_D=block_d,
                  PRECISION=_precision(q.dtype))
    geometry = (sq, sk, q.shape[0], k.shape[0], d, hq // hkv, softmax_scale, max(window, 0), batch)
    _attn_bwd_dkdv_kernel[_tile_grid(triton.cdiv(sk, dkdv_config.block_n), batch, hkv)](
        q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen),
        *_strides(dk, varlen), *_strides(dv, varlen), *_lse_strides(lse, varlen),
        *geometry, hkv, **common, **_launch(dkdv_config),
    )
    _attn_bwd_dq_kernel[_tile_grid(triton.cdiv(sq, dq_config.block_m), batch, hq)](
        q, k, v, dout, lse, delta, dq, cu_q, cu_k,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen),
        *_strides(dq, varlen), *_lse_strides(lse, varlen),
        *geometry, hq, **common, **_launch(dq_config),
    )
    return dq, dk, dv
