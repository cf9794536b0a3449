"""Speculative verification of K draft tokens against the target's K+1 logits rows, in Triton.

One launch, one program per batch row. A program walks the draft positions in order and stops
doing work at the first rejection; every pass over a vocabulary row goes in blocks of at most
``_MAX_BLOCK_V`` ids, so rows of 152k ids never need one giant tile.

greedy:   per position, argmax over V ranked as torch.argmax ranks: NaN above everything (+inf
          included), ties (NaN with NaN too) to the lowest id; accept while the draft equals it;
          the argmax at the first mismatch (or at position K) is the last token.
sampled:  per position, online softmax statistics of logits / temperature (max, sum, and the sum
          without the draft token); accept iff ``u * p(draft) < q(draft)``; at the first
          rejection draw from ``max(q - p, 0)`` (deterministic draft: q without the draft token),
          after K acceptances from q_K: inverse CDF over V in blocks. The uniforms come in as a
          tensor (drawn by torch before the launch), so there is no host sync and the launch can
          be captured in a CUDA graph.

Semantics, including the degenerate cases, are those of ``thinkfuse.reference.mtp_verify``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK_V = 4096


@triton.jit
def _argmax_key(x):
    """int32 keys of float32 ``x`` ordered as torch.argmax ranks values: the float order (-0.0
    equal to 0.0), and every NaN above +inf, all NaNs equal. Integers, because a float max
    reduction leaves NaN's rank to the backend (the GPU's max ignores NaN, and mapping NaN to
    +inf ties it with +inf); the bit tests cannot be folded away by fast-math flags either."""
    bits = x.to(tl.int32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    # negative floats: flip the magnitude bits, so that a larger magnitude is a smaller int
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(magnitude == 0, 0, key)
    return tl.where(magnitude > 0x7F800000, 0x7FFFFFFF, key)


@triton.jit
def _argmax(row_ptr, V, BLOCK_V: tl.constexpr):
    """Index of the largest value of ``row_ptr[0:V]`` as torch.argmax: the first NaN if any,
    else the lowest id of the maximum (0 for a row of -inf)."""
    best_key = tl.full([], -2147483648, tl.int32)
    best_idx = 0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        block_key, block_idx = tl.max(_argmax_key(x), axis=0, return_indices=True,
                                      return_indices_tie_break_left=True)
        # strict: an equal key in a later block keeps the earlier (lower) id
        better = block_key > best_key
        best_idx = tl.where(better, start + block_idx, best_idx)
        best_key = tl.where(better, block_key, best_key)
    return best_idx


@triton.jit
def _greedy_verify_kernel(
    DRAFT, LOGITS, TOKENS, NUM_ACCEPTED,
    stride_lb, stride_lk,
    K, V,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # int64: j * stride_lk is a product of int32 values, past 2**31 at j >= 4 when the logits are
    # a [K+1, B, V] buffer viewed as [B, K+1, V] (stride_lk = B * V, e.g. B = 4096, V = 152k)
    stride_lk = tl.cast(stride_lk, tl.int64)
    logits_row = LOGITS + row * stride_lb
    slots = tl.arange(0, BLOCK_K)
    tokens = tl.full([BLOCK_K], -1, tl.int64)
    num_accepted = tl.zeros([], tl.int32)
    rejected = tl.zeros([], tl.int32)
    final = tl.full([], 0, tl.int64)
    for j in range(0, K):
        if rejected == 0:
            target = _argmax(logits_row + j * stride_lk, V, BLOCK_V).to(tl.int64)
            draft = tl.load(DRAFT + row * K + j)
            if draft == target:
                tokens = tl.where(slots == j, draft, tokens)
                num_accepted += 1
            else:
                rejected += 1  # (a tensor, not the literal 1: the interpreter keeps its type)
                final = target
    if rejected == 0:
        final = _argmax(logits_row + K * stride_lk, V, BLOCK_V).to(tl.int64)
    tokens = tl.where(slots == num_accepted, final, tokens)
    tl.store(TOKENS + row * (K + 1) + slots, tokens, mask=slots < K + 1)
    tl.store(NUM_ACCEPTED + row, num_accepted.to(tl.int64))


@triton.jit
def _softmax_stats(row_ptr, V, temperature, excluded, BLOCK_V: tl.constexpr):
    """Online softmax statistics of ``row / temperature``: (max m, sum of exp(x - m), the same
    sum without id ``excluded``). m is 0 when the row is all -inf, so exp(x - m) stays 0 there."""
    m = -float("inf")
    total = 0.0
    total_excluded = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32) / temperature
        # pad after the division: a temperature past float32's range is +inf here, and the
        # padding's -inf / inf would be NaN, making the whole row look undefined
        x = tl.where(cols < V, x, -float("inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        rescale = tl.exp(m - m_safe)
        e = tl.exp(x - m_safe)
        total = total * rescale + tl.sum(e, axis=0)
        total_excluded = total_excluded * rescale + tl.sum(tl.where(cols == excluded, 0.0, e), axis=0)
        m = m_new
    m = tl.where(m == -float("inf"), 0.0, m)
    return m, total, total_excluded


@triton.jit
def _draw_weights(logits_row, probs_row, cols, V, temperature, m, total, excluded, residual,
                  HAS_DRAFT_PROBS: tl.constexpr):
    """Unnormalised weights of the distribution the final token is drawn from, for one block:
    exp(x - m) (target), without the id ``excluded`` (rejected deterministic draft), or, on a
    rejection with draft probabilities, ``max(q - p, 0)``."""
    in_range = cols < V
    x = tl.load(logits_row + cols, mask=in_range, other=-float("inf")).to(tl.float32) / temperature
    e = tl.exp(x - m)
    if HAS_DRAFT_PROBS:
        # draft probabilities are read only on a rejection (there is no row K to read otherwise);
        # the bound is a number rather than `in_range & residual`, which the interpreter rejects
        probs_bound = tl.where(residual, V, 0)
        p = tl.load(probs_row + cols, mask=cols < probs_bound, other=0.0).to(tl.float32)
        # max(q - p, 0) written as a select: a NaN draft probability gives its id no weight (as
        # the reference's nan_to_num), whatever a backend's maximum does with NaN
        d = e / total - p
        w = tl.where(residual, tl.where(d > 0.0, d, 0.0), e)
    else:
        w = tl.where(cols == excluded, 0.0, e)
    return tl.where(in_range, w, 0.0)


@triton.jit
def _draw_total(logits_row, probs_row, V, temperature, m, total, excluded, residual,
                BLOCK_V: tl.constexpr, HAS_DRAFT_PROBS: tl.constexpr):
    acc = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        w = _draw_weights(logits_row, probs_row, cols, V, temperature, m, total, excluded, residual,
                          HAS_DRAFT_PROBS)
        acc += tl.sum(w, axis=0)
    return acc


@triton.jit
def _inverse_cdf(logits_row, probs_row, V, temperature, m, total, excluded, residual, threshold,
                 BLOCK_V: tl.constexpr, HAS_DRAFT_PROBS: tl.constexpr):
    """First id whose running weight sum exceeds ``threshold`` (only ids of positive weight
    qualify); when rounding leaves none, the last id of positive weight; -1 if there is none."""
    carry = 0.0
    found = -1
    last_positive = -1
    for start in range(0, V, BLOCK_V):
        if found < 0:
            cols = start + tl.arange(0, BLOCK_V)
            w = _draw_weights(logits_row, probs_row, cols, V, temperature, m, total, excluded, residual,
                              HAS_DRAFT_PROBS)
            cdf = tl.cumsum(w, axis=0) + carry
            crossed = (cdf > threshold) & (w > 0.0)
            first = tl.min(tl.where(crossed, cols, V), axis=0)
            found = tl.where(first < V, first, found)
            last_positive = tl.maximum(last_positive, tl.max(tl.where(w > 0.0, cols, -1), axis=0))
            # the block's last running sum, so the next block continues the same sequence
            carry = tl.max(cdf, axis=0)
    return tl.where(found >= 0, found, last_positive)


@triton.jit
def _sampled_verify_kernel(
    DRAFT, LOGITS, PROBS, UNIFORMS, TOKENS, NUM_ACCEPTED,
    stride_lb, stride_lk, stride_pb, stride_pk,
    K, V, temperature,
    HAS_DRAFT_PROBS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # int64: position * stride is a product of int32 values (see _greedy_verify_kernel)
    stride_lk = tl.cast(stride_lk, tl.int64)
    stride_pk = tl.cast(stride_pk, tl.int64)
    logits_row = LOGITS + row * stride_lb
    slots = tl.arange(0, BLOCK_K)
    tokens = tl.full([BLOCK_K], -1, tl.int64)
    num_accepted = tl.zeros([], tl.int32)
    rejected = tl.zeros([], tl.int32)
    # statistics of the position the final token is drawn at, and the id it must not be
    m = 0.0
    total = 0.0
    total_excluded = 0.0
    excluded = tl.full([], -1, tl.int64)
    for j in range(0, K):
        if rejected == 0:
            position = logits_row + j * stride_lk
            draft = tl.load(DRAFT + row * K + j)
            m_j, total_j, excl_j = _softmax_stats(position, V, temperature, draft, BLOCK_V)
            valid = (draft >= 0) & (draft < V)
            x_draft = tl.load(position + draft, mask=valid, other=-float("inf")).to(tl.float32) / temperature
            q_draft = tl.exp(x_draft - m_j) / total_j
            if HAS_DRAFT_PROBS:
                p_draft = tl.load(PROBS + row * stride_pb + j * stride_pk + draft, mask=valid, other=1.0)
                p_draft = p_draft.to(tl.float32)
            else:
                p_draft = 1.0
            u = tl.load(UNIFORMS + row * (K + 1) + j)
            if valid & (u * p_draft < q_draft):
                tokens = tl.where(slots == j, draft, tokens)
                num_accepted += 1
            else:
                rejected += 1  # (a tensor, not the literal 1: the interpreter keeps its type)
                m = m_j
                total = total_j
                total_excluded = excl_j
                excluded = draft
    if rejected == 0:
        m, total, total_excluded = _softmax_stats(logits_row + K * stride_lk, V, temperature, -1, BLOCK_V)

    position = logits_row + num_accepted * stride_lk
    probs_row = PROBS + row * stride_pb + num_accepted * stride_pk
    residual = rejected != 0
    if HAS_DRAFT_PROBS:
        if residual:
            weight_total = _draw_total(position, probs_row, V, temperature, m, total, excluded, residual,
                                       BLOCK_V, HAS_DRAFT_PROBS)
        else:
            weight_total = total
    else:
        weight_total = total_excluded
    threshold = tl.load(UNIFORMS + row * (K + 1) + K) * weight_total
    final = tl.full([], -1, tl.int32)
    # A NaN or +inf in the row (after the division by the temperature) makes the normaliser NaN,
    # hence every normalised weight NaN: the reference (nan_to_num) has nothing to draw from.
    # Skipping the draw keeps the finite unnormalised weights from being drawn from instead.
    if total == total:
        final = _inverse_cdf(position, probs_row, V, temperature, m, total, excluded, residual, threshold,
                             BLOCK_V, HAS_DRAFT_PROBS)
    if final < 0:  # nothing to draw from (all -inf, NaN or +inf logits): the argmax, as greedy
        final = _argmax(position, V, BLOCK_V)
    tokens = tl.where(slots == num_accepted, final.to(tl.int64), tokens)
    tl.store(TOKENS + row * (K + 1) + slots, tokens, mask=slots < K + 1)
    tl.store(NUM_ACCEPTED + row, num_accepted.to(tl.int64))


def _launch_config(vocab: int) -> tuple[int, int]:
    block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(vocab))
    return block_v, (8 if block_v >= 2048 else 4)


def mtp_verify(draft_tokens, target_logits, draft_probs, uniforms, temperature: float):
    """draft_tokens ``[B, K]`` int64 contiguous; target_logits ``[B, K+1, V]`` and draft_probs
    ``[B, K, V]`` (or None) with a unit vocabulary stride; uniforms ``[B, K+1]`` float32
    contiguous (None when temperature is 0). Returns (tokens ``[B, K+1]`` int64,
    num_accepted ``[B]`` int64)."""
    batch, k = draft_tokens.shape
    vocab = target_logits.shape[-1]
    device = target_logits.device
    tokens = torch.empty((batch, k + 1), dtype=torch.int64, device=device)
    num_accepted = torch.empty((batch,), dtype=torch.int64, device=device)
    if batch == 0:
        return tokens, num_accepted
    block_v, num_warps = _launch_config(vocab)
    block_k = triton.next_power_of_2(k + 1)
    if temperature == 0:
        _greedy_verify_kernel[(batch,)](
            draft_tokens, target_logits, tokens, num_accepted,
            target_logits.stride(0), target_logits.stride(1),
            k, vocab,
            BLOCK_K=block_k, BLOCK_V=block_v, num_warps=num_warps,
        )
        return tokens, num_accepted
    has_probs = draft_probs is not None
    probs = draft_probs if has_probs else target_logits  # never read without draft probs
    _sampled_verify_kernel[(batch,)](
        draft_tokens, target_logits, probs, uniforms, tokens, num_accepted,
        target_logits.stride(0), target_logits.stride(1),
        probs.stride(0) if has_probs else 0, probs.stride(1) if has_probs else 0,
        k, vocab, temperature,
        HAS_DRAFT_PROBS=has_probs, BLOCK_K=block_k, BLOCK_V=block_v, num_warps=num_warps,
    )
    return tokens, num_accepted
