"""``thinkfuse.ops.token_logprobs`` and ``fused_linear_token_logprobs``: the per-token
log-probabilities (and entropies) that GRPO/PPO losses need, without the memory wall of
float32 logits.

- ``token_logprobs(logits, token_ids)``: ``log_softmax(logits / T)[token]`` in one pass over the
  logits (online logsumexp); backward writes ``d logits`` straight in the logits' dtype. No float32
  copy of the logits is made.
- ``fused_linear_token_logprobs(hidden, weight, token_ids)``: the same for the lm_head's logits
  ``hidden @ weight.T + bias``, which are never held for all tokens at once. Every backend works
  on chunks of tokens: a chunk's logits come from one tensor-core matmul (cuBLAS, in the
  activation dtype, exactly as the lm_head computes them), then the backend's log-prob kernel
  reduces them (cuda/triton) or float32 torch code does (torch); backward recomputes the logits,
  turns them into d logits with the backend's kernel (cuda/triton: written over the logits, so a
  chunk needs one buffer, not two), and feeds two more matmuls (d hidden and d weight). With a weight gradient, backward walks vocab slabs rather than token chunks, so each
  slab's d_weight rows come from one matmul over all tokens and no float32 [V, H] accumulator
  exists (only float32 d_hidden [N, H]). A first version that did the matmul inside a Triton kernel
  (tl.dot tiles) measured 5-12x slower than this on an H100 (bench/results/2026-11-22_*).

Token ids: negative ids (padding, ``-100``) give 0 and no gradient (entropy too). Ids >= V raise
``ValueError`` on CPU tensors (checked eagerly); on GPU tensors, where that check would cost a
host synchronisation, they give a NaN log-prob (the kernels never read out of bounds). A scored
row whose logits are all -inf has no distribution: NaN log-prob, entropy 0, on every backend.

The cuda and triton backends run behind ``torch.library`` custom ops joined by autograd formulas
(``thinkfuse::token_logprobs_fwd``/``_bwd``, ``thinkfuse::fused_linear_logprobs_fwd``/``_bwd``).
The torch backend chunks over tokens with ``torch.autograd.Function``s that recompute each chunk
in backward, so it too never holds more than one chunk of float32 logits.

The CUDA extension is expected to provide, with the Triton launchers' argument order and
conventions (kernels/logprobs.py):
    token_logprobs_fwd(Tensor logits, Tensor token_ids, float temperature, bool return_entropy)
        -> (Tensor logprobs, Tensor entropy, Tensor lse)
        # logits [B, T, V], unit stride on V, any strides on B and T (a logits[:, :-1] slice is
        # read in place); token_ids [B*T] contiguous int32/int64, row r = b*T + t; outputs float32
        # [B*T]; entropy is an empty [0] tensor when not requested; lse is saved for backward.
    token_logprobs_bwd(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor token_ids,
                       Tensor lse, Tensor? entropy, float temperature) -> Tensor grad_logits
        # grad_* float32 [B*T] contiguous; grad_logits contiguous [B, T, V] in logits' dtype
    token_logprobs_bwd_out(<the same arguments>, Tensor(a!) grad_logits) -> ()
        # the same, written into grad_logits (contiguous, logits' shape and dtype), which may be
        # the logits themselves but must not otherwise overlap them
The fused op needs nothing more from the extension: its cuda backend runs the two kernels above on
each chunk of logits.
"""

from __future__ import annotations

import functools
import numbers
import os
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .._checks import as_rows, check_float, check_same_device, check_tensor, with_unit_last_stride
from ..backend import resolve_backend
from ._registry import call, custom_op, implementation, register_autograd

TOKEN_ID_DTYPES = (torch.int32, torch.int64)
# The torch backend's chunks hold at most this many bytes of float32 logits.
CHUNK_LOGITS_BYTES = 256 * 2**20
# The kernel backends' chunks hold at most this many bytes of logits in the activation dtype (plus
# as many again for their gradient in backward): big enough for the matmuls to run at full rate.
# THINKFUSE_LOGITS_CHUNK_MIB overrides it (memory for speed: fewer, larger chunks mean fewer
# passes over the one-pass path's float32 d_weight accumulator).
KERNEL_CHUNK_LOGITS_BYTES = 512 * 2**20
CHUNK_ENV = "THINKFUSE_LOGITS_CHUNK_MIB"
# Narrowest vocab slab the weight-gradient backward uses (see vocab_slab_plan): its d_hidden
# matmul sums over the slab's columns, and fewer would starve the tensor cores.
MIN_VOCAB_SLAB = 2048


def token_logprobs(
    logits: Tensor,
    token_ids: Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: Optional[str] = None,
):
    """Float32 ``log_softmax(logits / temperature, -1)`` gathered at ``token_ids``.

    logits ``[..., V]`` (float32/float16/bfloat16, any strides), token_ids ``[...]`` int32/int64.
    Returns logprobs ``[...]`` float32, or ``(logprobs, entropy)`` with ``return_entropy``
    (the float32 entropy of ``softmax(logits / temperature)``; differentiable too). Positions
    whose token id is negative give 0 for both and no gradient. Differentiable w.r.t. logits;
    the gradient is written in the logits' dtype.
    """
    temperature = _check_token_logprobs_args(logits, token_ids, temperature)
    _check_return_entropy(return_entropy)
    name = resolve_backend(logits.device, backend, cuda_op="token_logprobs_fwd")
    logits3, ids = _as_batch_rows(logits), _flat_ids(token_ids)
    if name == "torch":
        logprobs, entropy, _ = _ChunkedTokenLogprobs.apply(logits3, ids, temperature, bool(return_entropy))
    else:
        logprobs, entropy, _ = call(
            "token_logprobs_fwd", logits3, ids, temperature, bool(return_entropy), name
        )
    return _outputs(logprobs, entropy, token_ids.shape, return_entropy)


def fused_linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
):
    """``token_logprobs(hidden @ weight.T + bias, token_ids, ...)`` without ever holding the
    ``[tokens, V]`` logits. Differentiable w.r.t. hidden, weight and bias.

    hidden ``[..., H]``, weight ``[V, H]`` (the lm_head's weight, same dtype as hidden), bias
    ``[V]`` or None, token_ids ``[...]`` (hidden's leading shape) int32/int64.

    ``chunk_size``: the logits of this many tokens are computed at a time (default: chunks of at
    most ``kernel_chunk_bytes()`` of logits for the cuda and triton backends,
    ``CHUNK_LOGITS_BYTES`` of float32 logits for the torch backend).

    Under ZeRO-3 / FSDP the caller passes the full (gathered) ``weight`` and ``bias``, and they
    must stay whole until the backward has run, since it recomputes the logits from them:
    ``deepspeed.zero.GatheredParameters([lm_head.weight, lm_head.bias])`` around the forward and
    the backward, ``weight.full_tensor()`` for an FSDP2 DTensor (see ``thinkfuse.grpo``).
    """
    temperature = _check_fused_args(hidden, weight, token_ids, bias, temperature, chunk_size)
    _check_return_entropy(return_entropy)
    # The cuda backend runs the token_logprobs kernels on each chunk.
    name = resolve_backend(hidden.device, backend, cuda_op="token_logprobs_fwd")
    rows, ids = as_rows(hidden), _flat_ids(token_ids)
    weight = with_unit_last_stride(weight)
    bias = bias.contiguous() if bias is not None else None
    chunk = _chunk_tokens(name, weight, chunk_size)
    if name == "torch":
        logprobs, entropy, _ = _ChunkedFusedLinearLogprobs.apply(
            rows, weight, ids, bias, temperature, bool(return_entropy), chunk
        )
    else:
        logprobs, entropy, _ = call(
            "fused_linear_logprobs_fwd", rows, weight, ids, bias, temperature, bool(return_entropy), chunk, name
        )
    return _outputs(logprobs, entropy, token_ids.shape, return_entropy)


def default_chunk_tokens(n_vocab: int) -> int:
    """Tokens per chunk of the torch backend: at most ``CHUNK_LOGITS_BYTES`` of float32 logits."""
    return max(1, CHUNK_LOGITS_BYTES // (4 * n_vocab))


def kernel_chunk_tokens(n_vocab: int, itemsize: int) -> int:
    """Tokens per chunk of the kernel backends: at most ``kernel_chunk_bytes()`` of logits of
    ``itemsize`` bytes, a multiple of 128 tokens when that many fit (whole matmul tiles)."""
    tokens = max(1, kernel_chunk_bytes() // (itemsize * n_vocab))
    return tokens - tokens % 128 if tokens >= 128 else tokens


def kernel_chunk_bytes() -> int:
    """Bytes of logits per chunk of the kernel backends: ``THINKFUSE_LOGITS_CHUNK_MIB`` MiB when
    that is set (read at each call), else ``KERNEL_CHUNK_LOGITS_BYTES``."""
    value = os.environ.get(CHUNK_ENV, "").strip()
    if not value:
        return KERNEL_CHUNK_LOGITS_BYTES
    try:
        mib = int(value)
    except ValueError:
        mib = 0
    if mib <= 0:
        raise ValueError(f"{CHUNK_ENV} must be a positive whole number of MiB, got {value!r}")
    return mib * 2**20


def _chunk_tokens(backend: str, weight: Tensor, chunk_size: Optional[int]) -> int:
    """Tokens per chunk: the caller's ``chunk_size``, else the backend's default."""
    if chunk_size:
        return chunk_size
    if backend == "torch":
        return default_chunk_tokens(weight.shape[0])
    return kernel_chunk_tokens(weight.shape[0], weight.element_size())


def _outputs(logprobs, entropy, shape, return_entropy):
    logprobs = logprobs.view(shape)
    return (logprobs, entropy.view(shape)) if return_entropy else logprobs


def _flat_ids(token_ids: Tensor) -> Tensor:
    return token_ids.reshape(-1).contiguous()


def _as_batch_rows(logits: Tensor) -> Tensor:
    """A ``[B, T, V]`` view of logits ``[..., V]`` with a unit stride on V.

    A slice such as ``logits[:, :-1]`` keeps its strides (no copy of the logits); only inputs
    with more than three dims that cannot be viewed so, or a strided V, are copied.
    """
    if logits.dim() == 1:
        logits = logits.view(1, 1, -1)
    elif logits.dim() == 2:
        logits = logits.unsqueeze(0)
    elif logits.dim() > 3:
        logits = logits.reshape(-1, *logits.shape[-2:])
    return with_unit_last_stride(logits)


# --- argument checks ---------------------------------------------------------------------------


def _check_token_ids(token_ids, leading_shape, leading_name: str, n_vocab: int) -> None:
    check_tensor("token_ids", token_ids, dtypes=TOKEN_ID_DTYPES)
    if token_ids.shape != leading_shape:
        raise ValueError(
            f"token_ids shape {tuple(token_ids.shape)} must equal {leading_name}'s leading shape {tuple(leading_shape)}"
        )
    # Reading values costs a host synchronisation on GPU (and a graph break under torch.compile),
    # where out-of-range ids give NaN instead.
    eager_cpu = token_ids.device.type == "cpu" and not torch.compiler.is_compiling()
    if eager_cpu and token_ids.numel() and int(token_ids.max()) >= n_vocab:
        raise ValueError(
            f"token_ids must be < V = {n_vocab} (negative ids are ignored), got {int(token_ids.max())}"
        )


def _check_temperature(temperature) -> float:
    return check_float("temperature", temperature, positive=True)


def _check_return_entropy(return_entropy) -> None:
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")


def _check_token_logprobs_args(logits, token_ids, temperature) -> float:
    check_tensor("logits", logits, min_ndim=1)
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty last dim (the vocabulary)")
    check_same_device(logits=logits, token_ids=token_ids if isinstance(token_ids, Tensor) else None)
    _check_token_ids(token_ids, logits.shape[:-1], "logits", logits.shape[-1])
    return _check_temperature(temperature)


def _check_fused_args(hidden, weight, token_ids, bias, temperature, chunk_size) -> float:
    check_tensor("hidden", hidden, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    n_vocab, n_hidden = weight.shape
    if hidden.shape[-1] == 0 or n_vocab == 0:
        raise ValueError(f"hidden's last dim and weight's dims must be non-zero, got hidden {tuple(hidden.shape)} "
                         f"and weight {tuple(weight.shape)}")
    if n_hidden != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden's last dim {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != n_vocab:
            raise ValueError(f"bias must have V = {n_vocab} elements (weight's rows), got {bias.shape[0]}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must equal hidden dtype {hidden.dtype}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size <= 0
    ):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    check_same_device(
        hidden=hidden, weight=weight, bias=bias, token_ids=token_ids if isinstance(token_ids, Tensor) else None
    )
    _check_token_ids(token_ids, hidden.shape[:-1], "hidden", n_vocab)
    return _check_temperature(temperature)


# --- torch implementation: chunks of rows, float32 inside a chunk only ---------------------------


# In-place steps keep a chunk's float32 working set to two [c, V] buffers.


def _float32_copy(t: Tensor) -> Tensor:
    """A float32 copy that in-place steps may overwrite (``.float()`` aliases float32 input)."""
    return t.to(torch.float32, copy=True)


def _row_logsumexp(z: Tensor) -> Tensor:
    """``logsumexp(z, -1)``, NaN for a row holding +inf (an overflowed logit), as log_softmax and
    the kernels (``m + log sum exp(z - m)`` with m = +inf) make it. torch.logsumexp returns +inf
    there, which would turn the row's log-prob into a plausible -inf and its gradient finite."""
    lse = torch.logsumexp(z, dim=-1)
    return lse.masked_fill_(torch.isposinf(lse), float("nan"))


def _chunk_stats(logits, ids, temperature: float, return_entropy: bool):
    """(logprob, entropy or None, lse) of a chunk of logits rows [c, V], all float32 [c]."""
    z = _float32_copy(logits).div_(temperature)  # the only float32 copy of logits: one chunk
    n_vocab = z.shape[-1]
    lse = _row_logsumexp(z)
    live, in_vocab = ids >= 0, ids < n_vocab
    target = z.gather(-1, torch.where(live & in_vocab, ids, 0).long().unsqueeze(-1)).squeeze(-1)
    logprob = torch.where(in_vocab, target - lse, torch.full_like(lse, float("nan")))
    logprob = torch.where(live, logprob, torch.zeros_like(lse))
    entropy = None
    if return_entropy:
        logp = z.sub_(lse.unsqueeze(-1))
        p = logp.exp()
        logp.masked_fill_(p == 0, 0.0)  # -inf logits: p = 0 adds nothing (and 0 * -inf is NaN)
        # A row with no finite logit (lse = -inf) has entropy 0, as in the kernels (its log-prob
        # is NaN, which says the row is garbage).
        entropy = torch.where(live & (lse != float("-inf")), -torch.linalg.vecdot(p, logp), torch.zeros_like(lse))
    return logprob, entropy, torch.where(live, lse, torch.zeros_like(lse))


def _chunk_logits_grad(logits, ids, lse, entropy, grad_logprob, grad_entropy, temperature: float):
    """float32 d loss / d logits [c, V] of a chunk: ``(g (onehot - p) - g_H p (log p + H)) / T``.
    ``grad_logprob`` / ``grad_entropy`` may be None (no gradient reached that output)."""
    live = ids >= 0
    zeros = torch.zeros_like(lse)
    # Ignored rows get log p = -inf, hence p = 0 and no gradient at all, whatever their logits
    # hold (subtracting an lse of +inf instead would leave NaN where a logit is NaN or +inf).
    logp = (_float32_copy(logits).div_(temperature).masked_fill_(~live.unsqueeze(-1), float("-inf"))
            .sub_(torch.where(live, lse, zeros).unsqueeze(-1)))
    p = logp.exp()
    g = zeros if grad_logprob is None else torch.where(live, grad_logprob, zeros)
    if grad_entropy is None:
        grad = p.mul_(-g.unsqueeze(-1))
    else:
        g_h = torch.where(live, grad_entropy, zeros).unsqueeze(-1)
        logp.masked_fill_(p == 0, 0.0)  # p = 0 contributes nothing; keeps -inf out
        # g (onehot - p) - g_H p (log p + H) = -p (g + g_H (log p + H)) + g onehot
        grad = logp.add_(entropy.unsqueeze(-1)).mul_(g_h).add_(g.unsqueeze(-1)).mul_(p).neg_()
    # The onehot term, scattered without a host synchronisation; ids >= V (NaN log-prob) get none.
    hit = live & (ids < logits.shape[-1])
    grad.scatter_add_(1, torch.where(hit, ids, 0).long().unsqueeze(-1), torch.where(hit, g, zeros).unsqueeze(-1))
    return grad.div_(temperature)


def _row_chunks(logits3: Tensor, chunk_rows: int):
    """(flat start, flat end, [c, V] view) chunks of a [B, T, V] view, in row order. Chunks span
    batch rows where the view allows it (``[B, 1, V]`` decode logits: one chunk, not B); a slice
    such as ``logits[:, :-1]`` cannot be flattened without a copy and is chunked per batch row."""
    n_batch, seq_len, n_vocab = logits3.shape
    if logits3.shape[0] == 1 or logits3.stride(0) == seq_len * logits3.stride(1):
        flat = logits3.view(n_batch * seq_len, n_vocab)
        for start in range(0, flat.shape[0], chunk_rows):
            yield start, min(start + chunk_rows, flat.shape[0]), flat[start:start + chunk_rows]
        return
    for b in range(n_batch):
        for start in range(0, seq_len, chunk_rows):
            end = min(start + chunk_rows, seq_len)
            yield b * seq_len + start, b * seq_len + end, logits3[b, start:end]


def _token_logprobs_torch_forward(logits3, ids, temperature, return_entropy, chunk_rows=None):
    n_rows = logits3.shape[0] * logits3.shape[1]
    out = lambda n: torch.zeros((n,), dtype=torch.float32, device=logits3.device)  # noqa: E731
    logprobs, lse, entropy = out(n_rows), out(n_rows), out(n_rows if return_entropy else 0)
    for start, end, chunk in _row_chunks(logits3, chunk_rows or default_chunk_tokens(logits3.shape[-1])):
        lp, ent, chunk_lse = _chunk_stats(chunk, ids[start:end], temperature, return_entropy)
        logprobs[start:end], lse[start:end] = lp, chunk_lse
        if return_entropy:
            entropy[start:end] = ent
    return logprobs, entropy, lse


def _token_logprobs_torch_backward(grad_logprobs, grad_entropy, logits3, ids, lse, entropy, temperature,
                                   chunk_rows=None):
    d_logits = torch.empty(logits3.shape, dtype=logits3.dtype, device=logits3.device)
    d_rows = d_logits.view(-1, logits3.shape[-1])
    for start, end, chunk in _row_chunks(logits3, chunk_rows or default_chunk_tokens(logits3.shape[-1])):
        piece = lambda t: None if t is None else t[start:end]  # noqa: E731
        d_rows[start:end] = _chunk_logits_grad(
            chunk, ids[start:end], lse[start:end], piece(entropy), piece(grad_logprobs), piece(grad_entropy),
            temperature,
        ).to(logits3.dtype)
    return d_logits


SECOND_DERIVATIVE_ERROR = (
    "thinkfuse's token_logprobs / fused_linear_token_logprobs have no second derivative (double backward, "
    "create_graph=True through them)"
)


def _first_order_only(backward):
    """For a hand-written ``autograd.Function.backward``: it runs without recording a graph, and
    under ``create_graph=True`` each gradient comes out tied to the saved inputs it depends on
    through a node that raises when differentiated. Recorded, the formula's in-place float32 steps
    gave a wrong second derivative (or an in-place error); left untied (torch's
    ``once_differentiable`` when the upstream gradients need none) they would pass as constants."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        tied = [t for t in ctx.saved_tensors if t is not None and t.requires_grad]
        if not torch.is_grad_enabled() or not tied:
            return outputs
        return tuple(None if t is None else _RefuseSecondDerivative.apply(t, *tied) for t in outputs)

    return wrapper


class _RefuseSecondDerivative(torch.autograd.Function):
    """``gradient`` itself, made to depend on ``inputs``; its backward raises."""

    @staticmethod
    def forward(gradient, *inputs):
        return gradient.view_as(gradient)

    @staticmethod
    def setup_context(ctx, inputs, output):  # this style, as torch.func (whose grad records one) needs
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(SECOND_DERIVATIVE_ERROR)


# The two torch-backend Functions below use the setup_context style (forward without ctx), the one
# torch.func.grad / vjp accept; the row statistics the backward needs (lse) are therefore a third,
# non-differentiable output that the callers drop.


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """The torch backend of token_logprobs: chunks of rows, recomputed in backward."""

    @staticmethod
    def forward(logits3, ids, temperature, return_entropy):
        return _token_logprobs_torch_forward(logits3, ids, temperature, return_entropy)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits3, ids, temperature, return_entropy = inputs
        _, entropy, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # an unused output (often the entropy) costs nothing
        ctx.temperature, ctx.return_entropy = temperature, return_entropy
        ctx.save_for_backward(logits3, ids, lse, entropy)

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        logits3, ids, lse, entropy = ctx.saved_tensors
        if not ctx.return_entropy:
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None
        d_logits = _token_logprobs_torch_backward(
            grad_logprobs, grad_entropy, logits3, ids, lse, entropy, ctx.temperature
        )
        return d_logits, None, None, None


class ChunkReducer(NamedTuple):
    """How one backend turns a chunk of logits ``[c, V]`` into statistics and gradients."""

    # (logits, ids, temperature, return_entropy) -> (logprob [c], entropy [c] or None, lse [c])
    stats: Callable
    # (logits, ids, lse, entropy or None, grad_logprob or None, grad_entropy or None, temperature)
    #   -> d logits [c, V] (float32 for torch, the logits' dtype for the kernels). The logits are
    #   a chunk the caller is done with: the kernels write d logits over them, in place.
    logits_grad: Callable


TORCH_REDUCER = ChunkReducer(_chunk_stats, _chunk_logits_grad)


def kernel_reducer(backend: str) -> ChunkReducer:
    """The token_logprobs kernels of ``backend`` ("cuda" or "triton") applied to one chunk."""
    forward = implementation(backend, "logprobs", "token_logprobs_forward", "token_logprobs_fwd", None)
    backward_out = implementation(backend, "logprobs", "token_logprobs_backward_out", "token_logprobs_bwd_out", None)

    def stats(logits, ids, temperature, return_entropy):
        logprob, entropy, lse = forward(logits.unsqueeze(0), ids, temperature, return_entropy)
        return logprob, (entropy if return_entropy else None), lse

    def logits_grad(logits, ids, lse, entropy, grad_logprob, grad_entropy, temperature):
        if grad_logprob is None:
            grad_logprob = torch.zeros_like(lse)
        # In place: a chunk's logits and their gradient are never both held.
        logits3 = logits.contiguous().unsqueeze(0)  # (matmul outputs already are)
        backward_out(grad_logprob, grad_entropy, logits3, ids, lse, entropy if grad_entropy is not None else None,
                     temperature, logits3)
        return logits3[0]

    return ChunkReducer(stats, logits_grad)


def _chunk_bounds(n_tokens: int, chunk_tokens: int):
    for start in range(0, n_tokens, chunk_tokens):
        yield start, min(start + chunk_tokens, n_tokens)


def _fused_chunked_forward(hidden, weight, ids, bias, temperature, return_entropy, chunk_tokens,
                           reducer: ChunkReducer = TORCH_REDUCER):
    """Chunks of tokens: each chunk's logits ``F.linear(hidden, weight, bias)`` in the activation
    dtype (as the lm_head computes them), then their float32 statistics."""
    n_tokens = hidden.shape[0]
    out = lambda n: torch.zeros((n,), dtype=torch.float32, device=hidden.device)  # noqa: E731
    logprobs, lse, entropy = out(n_tokens), out(n_tokens), out(n_tokens if return_entropy else 0)
    for start, end in _chunk_bounds(n_tokens, chunk_tokens):
        logits = torch.nn.functional.linear(hidden[start:end], weight, bias)
        lp, ent, chunk_lse = reducer.stats(logits, ids[start:end], temperature, return_entropy)
        logprobs[start:end], lse[start:end] = lp, chunk_lse
        if return_entropy:
            entropy[start:end] = ent
    return logprobs, entropy, lse


class _LmHeadGrads:
    """d_hidden, d_weight, d_bias of the lm_head, filled chunk by chunk from d logits. d_hidden of
    a chunk is one matmul in the weight's dtype (as autograd of the lm_head computes it). d_weight
    of a single chunk holding every token is one matmul too, rounded once to the weight's dtype;
    over several chunks it is accumulated in float32 (a [V, H] accumulator, allocated by the
    first chunk), as d_bias always is."""

    def __init__(self, hidden, weight, bias, weight_grad: bool):
        self.weight, self.bias, self.weight_grad = weight, bias, weight_grad
        self.n_tokens = hidden.shape[0]
        self.d_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
        self.d_weight = None
        f32 = dict(dtype=torch.float32, device=hidden.device)
        self.d_bias = torch.zeros((weight.shape[0],) if weight_grad and bias is not None else (0,), **f32)

    def add_chunk(self, start: int, end: int, h: Tensor, grad: Tensor) -> None:
        """Chunk [start, end) of the tokens: inputs ``h`` [c, H], d logits ``grad`` [c, V]."""
        self.d_hidden[start:end] = grad.to(self.weight.dtype) @ self.weight
        if not self.weight_grad:
            return
        if end - start == self.n_tokens:
            self.d_weight = _product(grad.t(), h, self.weight.dtype)
        else:
            first = self.d_weight is None  # the first chunk writes it (beta 0: no zero fill to read)
            if first:
                self.d_weight = torch.empty(self.weight.shape, dtype=torch.float32, device=h.device)
            self.d_weight = _add_product(self.d_weight, grad.t(), h, beta=0 if first else 1)
        if self.bias is not None:
            self.d_bias += grad.sum(0, dtype=torch.float32)

    def result(self):
        """(d_hidden, d_weight or empty, d_bias or empty) in their parameters' dtypes."""
        has_bias = self.bias is not None and self.weight_grad
        d_bias = self.d_bias.to(self.bias.dtype) if has_bias else self.d_hidden.new_empty((0,))
        if not self.weight_grad:
            d_weight = self.d_hidden.new_empty((0,), dtype=self.weight.dtype)
        elif self.d_weight is None:  # no tokens
            d_weight = torch.zeros_like(self.weight)
        else:
            d_weight = self.d_weight.to(self.weight.dtype)
        return self.d_hidden, d_weight, d_bias


def one_pass_chunk_tokens(n_tokens: int, chunk_tokens: int, weight: Tensor, logit_bytes: int) -> int:
    """Tokens per chunk of the one-pass path with a weight gradient, given the backend's default
    ``chunk_tokens``. Several chunks need a float32 ``[V, H]`` d_weight accumulator (4 V H bytes);
    one chunk of all tokens needs none but holds every token's logits (``logit_bytes`` per logit,
    gradient included). One chunk is taken when it needs less memory: ``n_tokens <= chunk_tokens
    + 4 H / logit_bytes`` (for bfloat16 kernels, fewer than ~2 H tokens above a chunk)."""
    accumulator_tokens = 4 * weight.shape[1] // logit_bytes  # tokens whose logits weigh as much
    return max(1, n_tokens) if n_tokens <= chunk_tokens + accumulator_tokens else chunk_tokens


def _fused_chunked_backward(grad_logprobs, grad_entropy, hidden, weight, ids, bias, lse, entropy, temperature,
                            weight_grad, chunk_tokens, reducer: ChunkReducer = TORCH_REDUCER):
    """(d_hidden, d_weight or empty, d_bias or empty), recomputing the logits piece by piece.

    With a weight gradient the pieces are vocab slabs (``_backward_by_vocab_slabs``) whenever the
    tokens do not fit one chunk: each slab's d_weight rows are then complete after the slab, and no
    float32 [V, H] accumulator is needed. Otherwise chunks of tokens, as in the forward."""
    grad_args = (grad_logprobs, grad_entropy, ids, lse, entropy, temperature, reducer)
    if weight_grad:
        slab, block = vocab_slab_plan(hidden.shape[0], weight.shape[0], chunk_tokens)
        if slab < weight.shape[0]:
            return _backward_by_vocab_slabs(hidden, weight, bias, slab, block, *grad_args)
    grads = _LmHeadGrads(hidden, weight, bias, weight_grad)
    for start, end in _chunk_bounds(hidden.shape[0], chunk_tokens):
        h = hidden[start:end]
        grad = _logits_grad_piece(h, weight, bias, start, end, 0, weight.shape[0], *grad_args)
        grads.add_chunk(start, end, h, grad)
        del grad  # see fused_linear_logprobs_with_grads: not alive while result() converts
    return grads.result()


def vocab_slab_plan(n_tokens: int, n_vocab: int, chunk_tokens: int) -> tuple[int, int]:
    """(vocab columns per slab, tokens per block) for a backward with a weight gradient: blocks of
    [tokens, slab] logits no bigger than the forward's [chunk_tokens, V] chunks, with all tokens in
    one block when a slab of at least MIN_VOCAB_SLAB columns allows it (its d_weight rows are then
    one matmul over every token, rounded once). A slab of V columns means: chunk over tokens."""
    budget = max(1, chunk_tokens) * n_vocab
    if n_tokens * n_vocab <= budget:
        return n_vocab, n_tokens
    slab = min(n_vocab, max(MIN_VOCAB_SLAB, budget // max(1, n_tokens)))
    if 256 <= slab < n_vocab:
        slab -= slab % 256  # whole matmul tiles
    block = max(1, min(n_tokens, budget // slab))
    if 128 <= block < n_tokens:
        block -= block % 128
    return slab, block


def _slab_ids(ids: Tensor, start: int, end: int) -> Tensor:
    """Token ids relative to the vocab columns [start, end): ignored rows stay negative (no
    gradient); a target outside the slab becomes ``end - start``, which matches no column (the
    row still gets its ``-p`` terms, but no onehot term)."""
    outside = (ids < start) | (ids >= end)
    return torch.where(ids < 0, -1, torch.where(outside, end - start, ids - start))


def _logits_grad_piece(h, weight, bias, t0, t1, v0, v1, grad_logprobs, grad_entropy, ids, lse, entropy,
                       temperature, reducer):
    """d logits of tokens [t0, t1) x vocab columns [v0, v1), from recomputed logits."""
    piece = lambda t: None if t is None else t[t0:t1]  # noqa: E731
    full_vocab = v0 == 0 and v1 == weight.shape[0]
    w, b = (weight, bias) if full_vocab else (weight[v0:v1], None if bias is None else bias[v0:v1])
    logits = torch.nn.functional.linear(h, w, b)
    chunk_ids = ids[t0:t1] if full_vocab else _slab_ids(ids[t0:t1], v0, v1)
    return reducer.logits_grad(logits, chunk_ids, lse[t0:t1], piece(entropy), piece(grad_logprobs),
                               piece(grad_entropy), temperature)


def _backward_by_vocab_slabs(hidden, weight, bias, slab, block, *grad_args):
    """The weight-gradient backward over vocab slabs of ``slab`` columns, each in blocks of
    ``block`` tokens: d_weight rows of a slab are written once, in the weight's dtype; d_hidden
    and d_bias are summed over slabs in float32 ([N, H] and [V]: small next to [V, H])."""
    n_tokens, n_vocab = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    d_hidden = torch.zeros(hidden.shape, **f32)
    d_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    d_bias = torch.zeros((n_vocab if bias is not None else 0,), **f32)
    for v0, v1 in _chunk_bounds(n_vocab, slab):
        w = weight[v0:v1]
        d_w = None if block >= n_tokens else torch.zeros(w.shape, **f32)
        for t0, t1 in _chunk_bounds(n_tokens, block):
            h = hidden[t0:t1]
            grad = _logits_grad_piece(h, weight, bias, t0, t1, v0, v1, *grad_args)
            d_hidden[t0:t1] = _add_product(d_hidden[t0:t1], grad, w)
            if d_w is None:
                d_weight[v0:v1] = _product(grad.t(), h, weight.dtype)
            else:
                d_w = _add_product(d_w, grad.t(), h)
            if bias is not None:
                d_bias[v0:v1] += grad.sum(0, dtype=torch.float32)
        if d_w is not None:
            d_weight[v0:v1] = d_w
    d_bias = d_bias.to(bias.dtype) if bias is not None else d_hidden.new_empty((0,), dtype=hidden.dtype)
    return d_hidden.to(hidden.dtype), d_weight, d_bias


@torch.no_grad()  # it forms the gradients itself; in-place accumulation must not meet autograd
def fused_linear_logprobs_with_grads(hidden: Tensor, weight: Tensor, token_ids: Tensor, grad_of_logprobs,
                                     *, bias: Optional[Tensor] = None, temperature: float = 1.0,
                                     weight_grad: bool = True, chunk_size: Optional[int] = None,
                                     backend: Optional[str] = None):
    """One pass over the lm_head for a loss whose gradient w.r.t. each token's log-prob depends
    only on that log-prob: each chunk's logits are formed once, reduced to log-probs, and turned
    straight into d hidden / d weight, with 3 matmuls per chunk instead of the 4 of forward +
    backward (which recomputes the logits).

    hidden ``[N, H]``, weight ``[V, H]``, token_ids ``[N]`` (negative: ignored).
    ``grad_of_logprobs(logprobs_chunk, start, end)`` returns d loss / d logprobs ``[end - start]``
    (float32) for tokens ``[start, end)``. Returns ``(logprobs [N] float32, d_hidden, d_weight,
    d_bias)`` (d_weight / d_bias empty when ``weight_grad`` is False or there is no bias). Not
    differentiable itself: callers wrap it (``thinkfuse.grpo.GRPOLoss``).
    """
    check_tensor("hidden", hidden, ndim=2)  # its rows are the tokens the chunks walk
    temperature = _check_fused_args(hidden, weight, token_ids, bias, temperature, chunk_size)
    name = resolve_backend(hidden.device, backend, cuda_op="token_logprobs_fwd")
    reducer = _reducer(name)
    ids = _flat_ids(token_ids)
    bias = bias.contiguous() if bias is not None else None
    weight = with_unit_last_stride(weight)
    chunk = _chunk_tokens(name, weight, chunk_size)
    if chunk_size is None and weight_grad and name != "torch":
        # Kernel backends only: they write d logits over the logits, so a token costs V logits.
        # The torch reducer holds float32 copies besides (~10 bytes a logit), and its float32 d
        # logits make a single chunk's d_weight a float32 matmul anyway: it keeps its chunks.
        chunk = one_pass_chunk_tokens(hidden.shape[0], chunk, weight, weight.element_size())
    logprobs = torch.zeros((hidden.shape[0],), dtype=torch.float32, device=hidden.device)
    grads = _LmHeadGrads(hidden, weight, bias, weight_grad)
    for start, end in _chunk_bounds(hidden.shape[0], chunk):
        h, chunk_ids = hidden[start:end], ids[start:end]
        logits = torch.nn.functional.linear(h, weight, bias)
        lp, _, lse = reducer.stats(logits, chunk_ids, temperature, False)
        logprobs[start:end] = lp
        grad_lp = grad_of_logprobs(lp, start, end).float().contiguous()
        grad = reducer.logits_grad(logits, chunk_ids, lse, None, grad_lp, None, temperature)
        del logits
        grads.add_chunk(start, end, h, grad)
        # The loop variable would keep the last chunk's d logits (512 MiB by default) alive
        # while result() turns the float32 accumulator into d_weight: that was the peak of a
        # many-chunk pass (2026-11-23 H100: 1953 MiB beyond the inputs at 32k tokens, where
        # accumulator + d_weight + d_hidden + one chunk = ~1.9 GiB).
        del grad
    return (logprobs, *grads.result())


def _add_product(acc: Tensor, a: Tensor, b: Tensor, beta: int = 1) -> Tensor:
    """``acc + a @ b`` for a float32 ``acc``, summed in float32 whatever the dtype of ``a`` and
    ``b``, written over ``acc`` wherever torch allows it (callers use the returned tensor).
    ``beta=0``: ``a @ b`` alone, ``acc``'s contents never read (an uninitialised ``acc`` is fine:
    addmm ignores its input at beta 0, NaNs included), which spares a first chunk the zero fill
    of a [V, H] float32 accumulator and the read of it (1.9 GB at Palmyra-mini's shape).

    On CUDA a half-precision ``a`` and ``b`` go through one matmul with a float32 output
    (``addmm(..., out_dtype=float32)``), so no float32 copy of a chunk is made. Given ``out=acc``
    that matmul adds into ``acc`` (cuBLAS beta = 1). Without ``out`` torch allocates a new
    ``[V, H]`` result and first copies ``acc`` into it: one more accumulator alive during the
    call, and twice the memory traffic per chunk (on the one-pass lm_head path: 0.9 GB more peak
    and ~1.9 GB more reads and writes per chunk at Palmyra-mini's 151936 x 1536)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return acc.addmm_(a, b, beta=beta)
    mode = _cuda_half_addmm_mode(acc.device, a.dtype) if acc.is_cuda and a.dtype == b.dtype else None
    if mode == "in_place" and acc.is_contiguous():
        return torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
    if mode is not None:
        return torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32)
    return acc.addmm_(a.float(), b.float(), beta=beta)


def _product(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``a @ b`` in ``dtype``, summed in float32 and rounded once: one matmul in ``dtype`` when
    both inputs have it (tensor cores accumulate in float32), else in float32."""
    if a.dtype == dtype and b.dtype == dtype:
        return a @ b
    return (a.float() @ b.float()).to(dtype)


def _cuda_half_addmm_mode(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """How this torch build adds a ``dtype`` (half-precision) product into a float32 tensor on
    ``device``: "in_place" (``addmm(acc, a, b, out_dtype=float32, out=acc)`` runs and is right),
    "new_tensor" (only the form without ``out`` runs), or None (neither: the caller upcasts).
    Probed once per (device, dtype); not while a CUDA graph is being captured (the check of the
    in-place result reads it back), when the form without ``out``, capturable, is used."""
    if torch.cuda.is_current_stream_capturing():
        return _CUDA_HALF_ADDMM_MODES.get((device, dtype), "new_tensor")
    if (device, dtype) not in _CUDA_HALF_ADDMM_MODES:
        _CUDA_HALF_ADDMM_MODES[(device, dtype)] = _probe_half_addmm(device, dtype)
    return _CUDA_HALF_ADDMM_MODES[(device, dtype)]


_CUDA_HALF_ADDMM_MODES: dict = {}


def _probe_half_addmm(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    one = torch.ones((2, 2), device=device, dtype=dtype)
    try:
        acc = torch.ones((2, 2), device=device)
        torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
        if bool((acc == 3).all()):  # 1 + (a row of ones) . (a column of ones)
            return "in_place"
    except (RuntimeError, TypeError, NotImplementedError):
        pass
    try:
        torch.addmm(torch.zeros((2, 2), device=device), one, one, out_dtype=torch.float32)
        return "new_tensor"
    except (RuntimeError, TypeError, NotImplementedError):
        return None


class _ChunkedFusedLinearLogprobs(torch.autograd.Function):
    """The torch backend of fused_linear_token_logprobs: chunks of ``chunk_tokens`` tokens, each
    chunk's logits recomputed in backward, so at most one chunk of logits is ever alive."""

    @staticmethod
    def forward(hidden, weight, ids, bias, temperature, return_entropy, chunk_tokens):
        return _fused_chunked_forward(hidden, weight, ids, bias, temperature, return_entropy, chunk_tokens)

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, ids, bias, temperature, return_entropy, chunk_tokens = inputs
        _, entropy, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        ctx.temperature, ctx.return_entropy, ctx.chunk_tokens = temperature, return_entropy, chunk_tokens
        ctx.save_for_backward(hidden, weight, ids, bias, lse, entropy)

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        hidden, weight, ids, bias, lse, entropy = ctx.saved_tensors
        if not ctx.return_entropy:
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 7
        weight_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        d_hidden, d_weight, d_bias = _fused_chunked_backward(
            grad_logprobs, grad_entropy, hidden, weight, ids, bias, lse, entropy, ctx.temperature, weight_grad,
            ctx.chunk_tokens,
        )
        return (
            d_hidden if ctx.needs_input_grad[0] else None,
            d_weight if weight_grad else None,
            None,
            d_bias if weight_grad and bias is not None else None,
            None, None, None,
        )


# ---------------------------------------------------------------------------------------------
# Custom ops (cuda and triton backends). `backend` is a plain string argument so torch.compile
# sees it as a constant; its "torch" value runs the chunked torch forms above (opcheck, tests).


@custom_op("token_logprobs_fwd")
def token_logprobs_fwd(
    logits: Tensor, token_ids: Tensor, temperature: float, return_entropy: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    fn = implementation(backend, "logprobs", "token_logprobs_forward", "token_logprobs_fwd",
                        _token_logprobs_torch_forward)
    logprobs, entropy, lse = fn(logits, token_ids, temperature, return_entropy)
    return logprobs, entropy, lse


@token_logprobs_fwd.register_fake
def _(logits, token_ids, temperature, return_entropy, backend):
    n_rows = token_ids.shape[0]
    f32 = lambda n: logits.new_empty((n,), dtype=torch.float32)  # noqa: E731
    return f32(n_rows), f32(n_rows if return_entropy else 0), f32(n_rows)


@custom_op("token_logprobs_bwd")
def token_logprobs_bwd(
    grad_logprobs: Tensor, grad_entropy: Optional[Tensor], logits: Tensor, token_ids: Tensor, lse: Tensor,
    entropy: Optional[Tensor], temperature: float, backend: str,
) -> Tensor:
    fn = implementation(backend, "logprobs", "token_logprobs_backward", "token_logprobs_bwd",
                        _token_logprobs_torch_backward)
    return fn(grad_logprobs, grad_entropy, logits, token_ids, lse, entropy, temperature)


@token_logprobs_bwd.register_fake
def _(grad_logprobs, grad_entropy, logits, token_ids, lse, entropy, temperature, backend):
    return logits.new_empty(logits.shape)


def _setup_token_context(ctx, inputs, output):
    logits, token_ids, temperature, return_entropy, backend = inputs
    _logprobs, entropy, lse = output
    ctx.temperature, ctx.return_entropy, ctx.backend = temperature, return_entropy, backend
    ctx.save_for_backward(logits, token_ids, lse, entropy)


def _token_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    logits, token_ids, lse, entropy = ctx.saved_tensors
    has_d_entropy = ctx.return_entropy and grad_entropy is not None
    d_logits = call(
        "token_logprobs_bwd", _grad_rows(grad_logprobs, lse), grad_entropy.contiguous() if has_d_entropy else None, logits, token_ids,
        lse, entropy if has_d_entropy else None, ctx.temperature, ctx.backend,
    )
    return d_logits, None, None, None, None


register_autograd("token_logprobs_fwd", _token_backward, _setup_token_context)


def _grad_rows(grad, like):
    """An upstream gradient as a contiguous float32 vector (zeros when autograd passes None)."""
    return torch.zeros_like(like) if grad is None else grad.float().contiguous()


def _reducer(backend: str) -> ChunkReducer:
    return TORCH_REDUCER if backend == "torch" else kernel_reducer(backend)


@custom_op("fused_linear_logprobs_fwd")
def fused_linear_logprobs_fwd(
    hidden: Tensor, weight: Tensor, token_ids: Tensor, bias: Optional[Tensor], temperature: float,
    return_entropy: bool, chunk_tokens: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    logprobs, entropy, lse = _fused_chunked_forward(
        hidden, weight, token_ids, bias, temperature, return_entropy, chunk_tokens, _reducer(backend)
    )
    return logprobs, entropy, lse


@fused_linear_logprobs_fwd.register_fake
def _(hidden, weight, token_ids, bias, temperature, return_entropy, chunk_tokens, backend):
    n_tokens = hidden.shape[0]
    f32 = lambda n: hidden.new_empty((n,), dtype=torch.float32)  # noqa: E731
    return f32(n_tokens), f32(n_tokens if return_entropy else 0), f32(n_tokens)


@custom_op("fused_linear_logprobs_bwd")
def fused_linear_logprobs_bwd(
    grad_logprobs: Tensor, grad_entropy: Optional[Tensor], hidden: Tensor, weight: Tensor, token_ids: Tensor,
    bias: Optional[Tensor], lse: Tensor, entropy: Optional[Tensor], temperature: float, weight_grad: bool,
    chunk_tokens: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    d_hidden, d_weight, d_bias = _fused_chunked_backward(
        grad_logprobs, grad_entropy, hidden, weight, token_ids, bias, lse, entropy, temperature, weight_grad,
        chunk_tokens, _reducer(backend),
    )
    return d_hidden, d_weight, d_bias


@fused_linear_logprobs_bwd.register_fake
def _(grad_logprobs, grad_entropy, hidden, weight, token_ids, bias, lse, entropy, temperature, weight_grad,
      chunk_tokens, backend):
    d_weight = weight.new_empty(weight.shape if weight_grad else (0,))
    has_d_bias = weight_grad and bias is not None
    d_bias = bias.new_empty(bias.shape) if has_d_bias else hidden.new_empty((0,))
    return hidden.new_empty(hidden.shape), d_weight, d_bias


def _setup_fused_context(ctx, inputs, output):
    hidden, weight, token_ids, bias, temperature, return_entropy, chunk_tokens, backend = inputs
    _logprobs, entropy, lse = output
    ctx.temperature, ctx.return_entropy, ctx.backend = temperature, return_entropy, backend
    ctx.chunk_tokens, ctx.has_bias = chunk_tokens, bias is not None
    ctx.save_for_backward(hidden, weight, token_ids, bias, lse, entropy)


def _fused_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    hidden, weight, token_ids, bias, lse, entropy = ctx.saved_tensors
    has_d_entropy = ctx.return_entropy and grad_entropy is not None
    # A frozen lm_head (e.g. LoRA) skips the whole d_weight pass.
    weight_grad = ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[3])
    d_hidden, d_weight, d_bias = call(
        "fused_linear_logprobs_bwd", _grad_rows(grad_logprobs, lse), grad_entropy.contiguous() if has_d_entropy else None, hidden, weight,
        token_ids, bias, lse, entropy if has_d_entropy else None, ctx.temperature, weight_grad, ctx.chunk_tokens,
        ctx.backend,
    )
    return (
        d_hidden,
        d_weight if weight_grad else None,
        None,
        d_bias if weight_grad and ctx.has_bias else None,
        None, None, None, None,
    )


register_autograd("fused_linear_logprobs_fwd", _fused_backward, _setup_fused_context)
