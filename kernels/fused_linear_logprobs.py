"""Per-token log-probabilities of the lm_head's logits, ``hidden @ weight.T + bias``, without
ever holding the ``[tokens, V]`` logits: Triton, tiles of tokens x vocab on the tensor cores.

Forward (one program per block of ``BLOCK_M`` tokens): for each vocab tile the logits tile
``[BLOCK_M, BLOCK_N]`` is computed with ``tl.dot`` in float32 (K loop over hidden), folded into
the online logsumexp (and entropy) statistics of ``logprobs.py`` and searched for the target
logit. Per token, only ``lse`` (float32) is saved for backward.

Backward recomputes the logits tiles and turns each into ``d logits`` (float32, cast to the
weight's dtype for the tensor-core products). The reductions are deterministic, with no atomics:

- ``d_hidden`` kernel, one program per token block: ``d_hidden[rows] += d_logits @ weight[tile]``
  accumulated in a float32 ``[tokens, H]`` buffer that only this program touches.
- ``d_weight`` kernel, one program per vocab tile: ``d_weight[tile] += d_logits.T @ hidden[rows]``
  (and ``d_bias[tile] += sum(d_logits)``) accumulated over all token blocks in float32.

Each backward kernel recomputes the logits once, so backward costs 4 matmuls of
``tokens x V x H`` where an atomic-add design would cost 3; in exchange the gradients are
bitwise reproducible and no ``[V, H]`` float32 atomics contend. The ``d_weight`` kernel is
skipped when the weight needs no gradient (a frozen lm_head, e.g. LoRA).

Out-of-range handling as in ``logprobs.py``: negative ids give 0 and no gradient, ids >= V give
NaN. fp32 inputs use IEEE fp32 dots (no TF32): the log-probs are compared at 1e-4.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .logprobs import finish_lse, finish_logprob, logits_grad_tile, online_lse_update


@triton.jit
def _logits_tile(HIDDEN, WEIGHT, BIAS, rows, cols, row_mask, col_mask, stride_h, stride_w, n_hidden,
                 inv_temperature, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """``(hidden[rows] @ weight[cols].T + bias[cols]) / T`` as float32 [BLOCK_M, BLOCK_N];
    columns past the vocabulary are -inf."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, n_hidden, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_mask = ks < n_hidden
        h = tl.load(HIDDEN + rows[:, None] * stride_h + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(WEIGHT + cols[:, None] * stride_w + ks[None, :], mask=col_mask[:, None] & k_mask[None, :],
                    other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_mask[None, :], acc * inv_temperature, float("-inf"))


@triton.jit
def _row_block(IDS, pid, n_tokens, BLOCK_M: tl.constexpr):
    """(rows int64, in-range mask, target ids int64, live = in range and not ignored)."""
    rows = tl.cast(pid, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_tokens
    target = tl.load(IDS + rows, mask=row_mask, other=-1).to(tl.int64)
    return rows, row_mask, target, row_mask & (target >= 0)


@triton.jit
def _row_grads(D_LOGPROBS, D_ENTROPY, LSE, ENTROPY, rows, live_row, HAS_D_ENTROPY: tl.constexpr):
    """Per-row (lse, g_logprob, g_entropy, entropy), zero for dead rows."""
    lse = tl.load(LSE + rows, mask=live_row, other=0.0)
    g_logprob = tl.load(D_LOGPROBS + rows, mask=live_row, other=0.0)
    g_entropy = g_logprob  # placeholders when there is no entropy gradient
    entropy = lse
    if HAS_D_ENTROPY:
        g_entropy = tl.load(D_ENTROPY + rows, mask=live_row, other=0.0)
        entropy = tl.load(ENTROPY + rows, mask=live_row, other=0.0)
    return lse, g_logprob, g_entropy, entropy


@triton.jit
def _fused_fwd_kernel(
    HIDDEN, WEIGHT, BIAS, IDS, LOGPROBS, ENTROPY, LSE,
    stride_h, stride_w,
    n_tokens, n_vocab, n_hidden, inv_temperature,
    HAS_BIAS: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    inv_t = tl.cast(inv_temperature, tl.float32)
    rows, row_mask, target, live_row = _row_block(IDS, tl.program_id(0), n_tokens, BLOCK_M)
    # A block of only ignored tokens (padding) skips the matmuls.
    vocab_end = tl.where(tl.sum(live_row.to(tl.int32), axis=0) > 0, n_vocab, 0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    u = tl.zeros([BLOCK_M], tl.float32)
    target_z = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, vocab_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        z = _logits_tile(HIDDEN, WEIGHT, BIAS, rows, cols, row_mask, cols < n_vocab, stride_h, stride_w,
                         n_hidden, inv_t, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K)
        m, s, u = online_lse_update(m, s, u, z, RETURN_ENTROPY)
        target_z += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
    lse, entropy = finish_lse(m, s, u)

    tl.store(LOGPROBS + rows, finish_logprob(target_z, lse, target, n_vocab), mask=row_mask)
    tl.store(LSE + rows, tl.where(live_row, lse, 0.0), mask=row_mask)
    if RETURN_ENTROPY:
        tl.store(ENTROPY + rows, tl.where(live_row, entropy, 0.0), mask=row_mask)


@triton.jit
def _fused_bwd_hidden_kernel(
    HIDDEN, WEIGHT, BIAS, IDS, LSE, ENTROPY, D_LOGPROBS, D_ENTROPY, D_HIDDEN,
    stride_h, stride_w,
    n_tokens, n_vocab, n_hidden, inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_D_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """D_HIDDEN: float32 [tokens, H], zero-initialised; this program owns its rows."""
    inv_t = tl.cast(inv_temperature, tl.float32)
    rows, row_mask, target, live_row = _row_block(IDS, tl.program_id(0), n_tokens, BLOCK_M)
    lse, g_logprob, g_entropy, entropy = _row_grads(D_LOGPROBS, D_ENTROPY, LSE, ENTROPY, rows, live_row,
                                                    HAS_D_ENTROPY)
    vocab_end = tl.where(tl.sum(live_row.to(tl.int32), axis=0) > 0, n_vocab, 0)
    for start in range(0, vocab_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < n_vocab
        z = _logits_tile(HIDDEN, WEIGHT, BIAS, rows, cols, row_mask, col_mask, stride_h, stride_w,
                         n_hidden, inv_t, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K)
        live = live_row[:, None] & col_mask[None, :]
        grad = logits_grad_tile(z, live, cols, target, lse, g_logprob, g_entropy, entropy, inv_t,
                                HAS_D_ENTROPY).to(WEIGHT.dtype.element_ty)
        for k in range(0, n_hidden, BLOCK_K):
            ks = k + tl.arange(0, BLOCK_K)
            k_mask = ks < n_hidden
            w = tl.load(WEIGHT + cols[:, None] * stride_w + ks[None, :], mask=col_mask[:, None] & k_mask[None, :],
                        other=0.0)
            out = D_HIDDEN + rows[:, None] * n_hidden + ks[None, :]
            out_mask = row_mask[:, None] & k_mask[None, :]
            acc = tl.load(out, mask=out_mask, other=0.0)
            tl.store(out, tl.dot(grad, w, acc, input_precision="ieee"), mask=out_mask)


@triton.jit
def _fused_bwd_weight_kernel(
    HIDDEN, WEIGHT, BIAS, IDS, LSE, ENTROPY, D_LOGPROBS, D_ENTROPY, D_WEIGHT, D_BIAS,
    stride_h, stride_w,
    n_tokens, n_vocab, n_hidden, inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_D_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """D_WEIGHT: float32 [V, H], zero-initialised; D_BIAS: float32 [V]. This program owns one
    vocab tile of both and walks every token block."""
    inv_t = tl.cast(inv_temperature, tl.float32)
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_vocab
    d_bias = tl.zeros([BLOCK_N], tl.float32)
    for block in range(0, tl.cdiv(n_tokens, BLOCK_M)):
        rows, row_mask, target, live_row = _row_block(IDS, block, n_tokens, BLOCK_M)
        # Blocks of only ignored tokens (padding) contribute nothing: skip their matmuls.
        if tl.sum(live_row.to(tl.int32), axis=0) > 0:
            lse, g_logprob, g_entropy, entropy = _row_grads(D_LOGPROBS, D_ENTROPY, LSE, ENTROPY, rows, live_row,
                                                            HAS_D_ENTROPY)
            z = _logits_tile(HIDDEN, WEIGHT, BIAS, rows, cols, row_mask, col_mask, stride_h, stride_w,
                             n_hidden, inv_t, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K)
            live = live_row[:, None] & col_mask[None, :]
            grad = logits_grad_tile(z, live, cols, target, lse, g_logprob, g_entropy, entropy, inv_t, HAS_D_ENTROPY)
            d_bias += tl.sum(grad, axis=0)
            grad_t = tl.trans(grad.to(HIDDEN.dtype.element_ty))
            for k in range(0, n_hidden, BLOCK_K):
                ks = k + tl.arange(0, BLOCK_K)
                k_mask = ks < n_hidden
                h = tl.load(HIDDEN + rows[:, None] * stride_h + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                            other=0.0)
                out = D_WEIGHT + cols[:, None] * n_hidden + ks[None, :]
                out_mask = col_mask[:, None] & k_mask[None, :]
                acc = tl.load(out, mask=out_mask, other=0.0)
                tl.store(out, tl.dot(grad_t, h, acc, input_precision="ieee"), mask=out_mask)
    if HAS_BIAS:
        tl.store(D_BIAS + cols, d_bias, mask=col_mask)


# --- launchers ----------------------------------------------------------------------------------


def _config(device: torch.device, n_hidden: int) -> dict:
    """Tile sizes: tensor-core friendly on GPU; under the interpreter, larger vocab tiles mean
    fewer Python-level steps."""
    block_k = min(64, max(16, triton.next_power_of_2(n_hidden)))
    if device.type == "cuda":
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=block_k, num_warps=8, num_stages=3)
    return dict(BLOCK_M=16, BLOCK_N=256, BLOCK_K=block_k)


def fused_linear_logprobs_forward(hidden, weight, token_ids, bias, temperature: float, return_entropy: bool):
    """hidden [N, H] and weight [V, H] with unit last-dim strides; bias [V] contiguous or None;
    token_ids [N] int32/int64. Returns (logprobs [N], entropy [N] or empty, lse [N]), float32."""
    n_tokens, n_hidden = hidden.shape
    n_vocab = weight.shape[0]
    out = lambda n: torch.empty((n,), dtype=torch.float32, device=hidden.device)  # noqa: E731
    logprobs, lse, entropy = out(n_tokens), out(n_tokens), out(n_tokens if return_entropy else 0)
    if n_tokens == 0:
        return logprobs, entropy, lse
    cfg = _config(hidden.device, n_hidden)
    _fused_fwd_kernel[(triton.cdiv(n_tokens, cfg["BLOCK_M"]),)](
        hidden, weight, bias if bias is not None else weight, token_ids,
        logprobs, entropy if return_entropy else lse, lse,
        hidden.stride(0), weight.stride(0),
        n_tokens, n_vocab, n_hidden, 1.0 / temperature,
        HAS_BIAS=bias is not None, RETURN_ENTROPY=return_entropy, **cfg,
    )
    return logprobs, entropy, lse


def fused_linear_logprobs_backward(grad_logprobs, grad_entropy, hidden, weight, token_ids, bias, lse, entropy,
                                   temperature: float, weight_grad: bool):
    """Returns (d_hidden [N, H] in hidden's dtype, d_weight [V, H] in weight's dtype, d_bias [V]
    in bias's dtype); d_weight and d_bias are empty tensors when ``weight_grad`` is False, and
    d_bias is one when there is no bias.

    grad_entropy/entropy are None when the entropy has no gradient."""
    n_tokens, n_hidden = hidden.shape
    n_vocab = weight.shape[0]
    device = hidden.device
    d_hidden = torch.zeros((n_tokens, n_hidden), dtype=torch.float32, device=device)
    has_bias = bias is not None
    d_weight = torch.zeros((n_vocab, n_hidden) if weight_grad else (0,), dtype=torch.float32, device=device)
    d_bias = torch.zeros((n_vocab,) if weight_grad and has_bias else (0,), dtype=torch.float32, device=device)
    if n_tokens > 0:
        has_d_entropy = grad_entropy is not None
        cfg = _config(device, n_hidden)
        common = (
            hidden, weight, bias if has_bias else weight, token_ids, lse, entropy if has_d_entropy else lse,
            grad_logprobs, grad_entropy if has_d_entropy else grad_logprobs,
        )
        scalars = (hidden.stride(0), weight.stride(0), n_tokens, n_vocab, n_hidden, 1.0 / temperature)
        flags = dict(HAS_BIAS=has_bias, HAS_D_ENTROPY=has_d_entropy, **cfg)
        _fused_bwd_hidden_kernel[(triton.cdiv(n_tokens, cfg["BLOCK_M"]),)](*common, d_hidden, *scalars, **flags)
        if weight_grad:
            _fused_bwd_weight_kernel[(triton.cdiv(n_vocab, cfg["BLOCK_N"]),)](
                *common, d_weight, d_bias if has_bias else d_weight, *scalars, **flags
            )
    d_bias = d_bias.to(bias.dtype) if has_bias and weight_grad else hidden.new_empty((0,))
    return d_hidden.to(hidden.dtype), d_weight.to(weight.dtype), d_bias
