"""Per-token log-probabilities ``log_softmax(logits / T)[token]`` (and the entropy), in Triton.

Forward: one pass over each row's vocabulary in blocks with an online logsumexp. Per row it
keeps the running max ``m``, ``s = sum exp(z - m)`` and, for the entropy,
``u = sum exp(z - m) * (z - m)`` (``z = logits / T``), so that ``lse = m + log s`` and
``entropy = log s - u / s``. Only ``lse`` is saved for backward (the entropy is an output); no
float32 copy of the logits is ever written.

Backward: recomputes ``p = exp(z - lse)`` block by block and writes, straight in the logits'
dtype, ``(g_logprob * (onehot - p) - g_entropy * p * (log p + entropy)) / T``.

Rows whose token id is negative are ignored: output 0, zero gradient, and the forward skips
their pass over the vocabulary. A token id >= V reads nothing out of bounds and gives a NaN
log-prob. ``thinkfuse.ops.fused_linear_token_logprobs`` runs these kernels on each chunk of
logits that cuBLAS computes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK_N = 4096  # vocab entries per block: 16 fp32 values per thread at 8 warps
_TILE_ELEMENTS = 4096  # rows x block: several rows share a program when the vocab is small


# --- tile math --------------------------------------------------------------------------------------


@triton.jit
def online_lse_update(m, s, u, z, RETURN_ENTROPY: tl.constexpr):
    """Fold a tile ``z`` [BM, BN] (masked entries -inf) into the per-row running max ``m``,
    ``s = sum exp(z - m)`` and ``u = sum exp(z - m) * (z - m)``, all [BM] float32."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    # A row that has seen only -inf keeps m_new = -inf; shifting by 0 instead keeps it NaN-free.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = tl.exp(m - shift)
    e = tl.exp(z - shift[:, None])
    if RETURN_ENTROPY:
        # Re-centre u on the new max: sum e^(z-m')(z-m') = scale * (u + (m - m') * s). s > 0
        # implies a finite m; the guards keep 0 * inf (an empty row, a -inf logit) out.
        recentre = tl.where(s > 0, m - shift, 0.0) * s
        u = scale * (u + recentre) + tl.sum(e * tl.where(e > 0, z - shift[:, None], 0.0), axis=1)
    s = s * scale + tl.sum(e, axis=1)
    return m_new, s, u


@triton.jit
def finish_lse(m, s, u):
    """(lse, entropy) of rows folded by ``online_lse_update``. A row with no finite logit
    (or a masked-out row) has s = 0: its lse is -inf and its entropy 0. A NaN logit makes s NaN
    (tl.max skips NaN, the exp does not), which must stay NaN: a diverged model's log-probs."""
    s_safe = tl.where(s == 0, 1.0, s)
    log_s = tl.log(s_safe)
    return m + log_s, log_s - u / s_safe


@triton.jit
def logits_grad_tile(z, live, cols, target, lse, g_logprob, g_entropy, entropy, inv_temperature,
                     HAS_D_ENTROPY: tl.constexpr):
    """d loss / d logits for a tile ``z = logits / T`` [BM, BN], float32.

    ``live`` [BM, BN] marks entries that exist and belong to a non-ignored row; everything else
    is 0 (``where`` also discards any inf/NaN from rows whose lse is meaningless).
    """
    logp = z - lse[:, None]
    p = tl.exp(logp)
    onehot = tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
    grad = g_logprob[:, None] * (onehot - p)
    if HAS_D_ENTROPY:
        # d entropy / dz_j = -p_j * (log p_j + entropy); p_j = 0 contributes nothing.
        grad -= g_entropy[:, None] * p * tl.where(p > 0, logp + entropy[:, None], 0.0)
    return tl.where(live, grad * inv_temperature, 0.0)


@triton.jit
def finish_logprob(target_z, lse, target, n_vocab):
    """0 for ignored rows (negative id), NaN for an id >= V, else ``z_target - lse``."""
    logprob = tl.where(target < n_vocab, target_z - lse, float("nan"))
    return tl.where(target < 0, 0.0, logprob)


# --- kernels ------------------------------------------------------------------------------------


@triton.jit
def _row_offsets(rows, seq_len, stride_batch, stride_seq):
    """Element offsets of flattened rows ``r = b * seq_len + t`` of a [B, T, V] view."""
    batch = rows // seq_len
    return batch * stride_batch + (rows - batch * seq_len) * stride_seq


@triton.jit
def _token_logprobs_fwd_kernel(
    LOGITS, IDS, LOGPROBS, ENTROPY, LSE,
    stride_batch, stride_seq, seq_len,
    n_rows, n_vocab, inv_temperature,
    RETURN_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    inv_t = tl.cast(inv_temperature, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    target = tl.load(IDS + rows, mask=row_mask, other=-1).to(tl.int64)
    live_row = row_mask & (target >= 0)
    # A program whose rows are all ignored (padding) skips the pass over the vocabulary.
    vocab_end = tl.where(tl.sum(live_row.to(tl.int32), axis=0) > 0, n_vocab, 0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    u = tl.zeros([BLOCK_M], tl.float32)
    row_ptrs = LOGITS + _row_offsets(rows, seq_len, stride_batch, stride_seq)
    for start in range(0, vocab_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = live_row[:, None] & (cols[None, :] < n_vocab)
        x = tl.load(row_ptrs[:, None] + cols[None, :], mask=mask, other=float("-inf"))
        m, s, u = online_lse_update(m, s, u, x.to(tl.float32) * inv_t, RETURN_ENTROPY)
    lse, entropy = finish_lse(m, s, u)

    in_vocab = live_row & (target < n_vocab)
    target_z = tl.load(row_ptrs + target, mask=in_vocab, other=0.0).to(tl.float32) * inv_t
    tl.store(LOGPROBS + rows, finish_logprob(target_z, lse, target, n_vocab), mask=row_mask)
    tl.store(LSE + rows, tl.where(live_row, lse, 0.0), mask=row_mask)
    if RETURN_ENTROPY:
        tl.store(ENTROPY + rows, tl.where(live_row, entropy, 0.0), mask=row_mask)


@triton.jit
def _token_logprobs_bwd_kernel(
    LOGITS, IDS, LSE, ENTROPY, D_LOGPROBS, D_ENTROPY, D_LOGITS,
    stride_batch, stride_seq, seq_len,
    n_rows, n_vocab, inv_temperature,
    HAS_D_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    inv_t = tl.cast(inv_temperature, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    target = tl.load(IDS + rows, mask=row_mask, other=-1).to(tl.int64)
    live_row = row_mask & (target >= 0)
    lse = tl.load(LSE + rows, mask=live_row, other=0.0)
    g_logprob = tl.load(D_LOGPROBS + rows, mask=live_row, other=0.0)
    g_entropy = g_logprob  # placeholders when there is no entropy gradient
    entropy = lse
    if HAS_D_ENTROPY:
        g_entropy = tl.load(D_ENTROPY + rows, mask=live_row, other=0.0)
        entropy = tl.load(ENTROPY + rows, mask=live_row, other=0.0)

    row_ptrs = LOGITS + _row_offsets(rows, seq_len, stride_batch, stride_seq)
    # Every row is written (ignored rows get zeros): the gradient buffer starts uninitialised.
    for start in range(0, n_vocab, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        in_bounds = row_mask[:, None] & (cols[None, :] < n_vocab)
        live = in_bounds & live_row[:, None]
        x = tl.load(row_ptrs[:, None] + cols[None, :], mask=live, other=0.0)
        grad = logits_grad_tile(x.to(tl.float32) * inv_t, live, cols, target, lse, g_logprob, g_entropy,
                                entropy, inv_t, HAS_D_ENTROPY)
        tl.store(D_LOGITS + rows[:, None] * n_vocab + cols[None, :],
                 grad.to(D_LOGITS.dtype.element_ty), mask=in_bounds)


# --- launchers ----------------------------------------------------------------------------------


def _tile(n_vocab: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of ``n_vocab`` logits."""
    block_n = min(triton.next_power_of_2(n_vocab), _MAX_BLOCK_N)
    block_m = max(1, min(16, _TILE_ELEMENTS // block_n))
    num_warps = 4 if block_n * block_m <= 1024 else 8
    return block_m, block_n, num_warps


def token_logprobs_forward(logits, token_ids, temperature: float, return_entropy: bool):
    """logits [B, T, V] with a unit stride on V (any strides on B and T: a ``logits[:, :-1]``
    slice is read in place); token_ids [B * T] contiguous int32/int64, row ``b * T + t``.

    Returns (per row, [B * T]) (logprobs [N] float32, entropy [N] float32 or an empty tensor when not requested,
    lse [N] float32, saved for backward).
    """
    n_batch, seq_len, n_vocab = logits.shape
    n_rows = n_batch * seq_len
    out = lambda n: torch.empty((n,), dtype=torch.float32, device=logits.device)  # noqa: E731
    logprobs, lse, entropy = out(n_rows), out(n_rows), out(n_rows if return_entropy else 0)
    if n_rows == 0:
        return logprobs, entropy, lse
    block_m, block_n, num_warps = _tile(n_vocab)
    _token_logprobs_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        logits, token_ids, logprobs, entropy if return_entropy else lse, lse,
        logits.stride(0), logits.stride(1), seq_len,
        n_rows, n_vocab, 1.0 / temperature,
        RETURN_ENTROPY=return_entropy, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return logprobs, entropy, lse


def token_logprobs_backward(grad_logprobs, grad_entropy, logits, token_ids, lse, entropy, temperature: float):
    """Gradient w.r.t. logits [B, T, V] (contiguous, logits' dtype). grad_entropy/entropy are
    None when the entropy has no gradient."""
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    token_logprobs_backward_out(grad_logprobs, grad_entropy, logits, token_ids, lse, entropy, temperature,
                                grad_logits)
    return grad_logits


def token_logprobs_backward_out(grad_logprobs, grad_entropy, logits, token_ids, lse, entropy,
                                temperature: float, grad_logits) -> None:
    """token_logprobs_backward written into ``grad_logits`` (contiguous, the logits' shape and
    dtype), which may be ``logits`` itself: each element is loaded before the same program
    stores its gradient there, so a caller done with its logits saves a buffer as large."""
    check_grad_logits_out(grad_logits, logits)
    n_batch, seq_len, n_vocab = logits.shape
    n_rows = n_batch * seq_len
    if n_rows == 0:
        return
    has_d_entropy = grad_entropy is not None
    block_m, block_n, num_warps = _tile(n_vocab)
    _token_logprobs_bwd_kernel[(triton.cdiv(n_rows, block_m),)](
        logits, token_ids, lse, entropy if has_d_entropy else lse, grad_logprobs,
        grad_entropy if has_d_entropy else grad_logprobs, grad_logits,
        logits.stride(0), logits.stride(1), seq_len,
        n_rows, n_vocab, 1.0 / temperature,
        HAS_D_ENTROPY=has_d_entropy, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )


def check_grad_logits_out(grad_logits, logits) -> None:
    """``grad_logits``: contiguous, the logits' shape, dtype and device; either the logits
    themselves (same memory, contiguous) or memory that does not overlap them."""
    if grad_logits.shape != logits.shape or grad_logits.dtype != logits.dtype:
        raise ValueError(f"grad_logits must have the logits' shape {tuple(logits.shape)} and dtype {logits.dtype}, "
                         f"got {tuple(grad_logits.shape)} {grad_logits.dtype}")
    if grad_logits.device != logits.device:
        raise ValueError(f"grad_logits must be on the logits' device {logits.device}, got {grad_logits.device}")
    if not grad_logits.is_contiguous():
        raise ValueError("grad_logits must be contiguous")
    if grad_logits.numel() and grad_logits.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
        if grad_logits.data_ptr() != logits.data_ptr() or not logits.is_contiguous():
            raise ValueError("grad_logits may be the logits themselves (in place) but must not otherwise overlap them")
