"""GRPO loss on top of thinkfuse's log-prob ops, with TRL's normalisations, and a patch that
makes TRL's ``GRPOTrainer`` compute its log-probs with thinkfuse.

- ``grpo_loss(logprobs, old_logprobs, advantages, mask, ...)``: the clipped-ratio GRPO objective
  with the k3 KL term, loss types ``grpo | bnpo | dr_grpo | dapo`` normalised exactly as TRL's
  ``GRPOTrainer`` does (per-token importance sampling), plus TRL's clip metrics.
- ``GRPOLoss``: the same from the policy's last hidden states and the lm_head weight, through
  ``fused_linear_token_logprobs``, so the ``[tokens, V]`` logits are never materialised.
- ``patch_trl()``: routes TRL's fused lm_head (``add_fused_lm_head``, what ``GRPOTrainer`` uses
  for the policy and reference log-probs) and ``selective_log_softmax`` to thinkfuse.

Gradient accumulation. ``grpo``, ``bnpo`` and ``dr_grpo`` are means over one micro-batch: divide
the loss by the number of accumulation steps (TRL does), which weights micro-batches equally.
``dapo`` divides the masked sum by ``num_items_in_batch / world_size``: pass the number of
completion tokens (mask ones) in the whole accumulated batch over all ranks, and ``world_size``
the number of data-parallel ranks whose gradients are averaged; summing the micro-batch losses
(no further division) then gives the exact token mean over the global batch. (TRL's own
``num_items_in_batch`` counts the tokens of a whole generation batch, which spans
``steps_per_generation`` micro-batches: TRL multiplies its divisor by
``gradient_accumulation_steps / steps_per_generation``, so pass that product to reproduce it.)

ZeRO-3 / FSDP. ``GRPOLoss`` (like ``fused_linear_token_logprobs``) reads ``lm_head.weight``
directly, without calling the lm_head module, and its backward recomputes the logits from the
saved weight, so a sharded weight must be whole from the forward until the backward has run:

- DeepSpeed ZeRO-3: keep it gathered across both, e.g.
  ``with deepspeed.zero.GatheredParameters([lm_head.weight, lm_head.bias]): loss, m = grpo(...);
  engine.backward(loss)`` (TRL's ``maybe_gather_lm_head_ctx`` gathers the same parameters, but
  TRL's own chunked function re-enters it inside its backward, which thinkfuse's ops cannot do).
- FSDP2: pass ``lm_head.weight.full_tensor()`` (and the bias's): a gathered copy that autograd
  keeps alive until backward and whose gradient flows back to the shards.
- FSDP1: compute the loss inside the wrapped module's forward, where its parameters are
  unsharded (FSDP re-gathers them before that module's backward).

Under ZeRO-3, ``patch_trl`` leaves TRL's own fused lm_head in place. None of these distributed
set-ups is exercised by the test suite (no DeepSpeed / multi-GPU in CI).
"""

from __future__ import annotations

import contextlib
import functools
import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from ._checks import check_float, check_same_device, check_tensor
from .ops.logprobs import TOKEN_ID_DTYPES, fused_linear_logprobs_with_grads, fused_linear_token_logprobs, token_logprobs
from .ops.one_pass import one_pass_loss

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
MASK_DTYPES = (torch.bool, torch.int32, torch.int64, torch.float32, torch.float16, torch.bfloat16)


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logprobs: Optional[Tensor] = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "grpo",
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    world_size: int = 1,
    delta: Optional[float] = None,
    use_bias_correction_kl: bool = False,
) -> tuple[Tensor, dict]:
    """GRPO loss and metrics, as TRL's ``GRPOTrainer`` computes them (token-level ratios;
    checked against trl 1.16's ``_compute_loss``).

    Per token, with ``r = exp(logprobs - old_logprobs)`` and ``A`` the advantage of its sequence:
    ``L = -min(r' * A, clamp(r, 1 - epsilon_low, 1 + epsilon_high) * A) + beta * KL`` where
    ``r' = min(r, delta)`` (TRL's two-sided clipping; ``r' = r`` when ``delta`` is None),
    ``KL = k3 = exp(ref - logprobs) - (ref - logprobs) - 1``, times ``r`` when
    ``use_bias_correction_kl`` (TRL's option of that name, whose default is True in trl 1.16:
    pass it to reproduce a TRL run). With ``M = mask``:

    - ``grpo``: ``mean_b(sum_t(L * M) / sum_t(M))``
    - ``bnpo``: ``sum(L * M) / sum(M)``
    - ``dr_grpo``: ``sum(L * M) / (B * max_completion_length)`` (default: T; TRL divides by its
      config's max_completion_length, not by the batch's padded length: pass it)
    - ``dapo``: ``sum(L * M) / (num_items_in_batch / world_size)`` (default: ``sum(M)``)

    Shapes: logprobs/old_logprobs/ref_logprobs/mask ``[B, T]``, advantages ``[B]`` (or ``[B, T]``).
    ``old_logprobs=None`` means on-policy (``logprobs.detach()``, ratio 1). Token sums use at
    least 1 as divisor, as TRL. Computed in float32 whatever the inputs' dtype (as TRL, whose
    log-probs are float32). Positions with ``mask == 0`` contribute nothing whatever their
    old/ref log-probs hold (-inf included: they are not read there).

    metrics (0-d float32 tensors, detached; over this call's tokens, no host sync; TRL also
    reduces them across ranks): ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
    ``clip_ratio/region_mean`` (token fractions where the clipped term is the active one:
    ``r' < 1 - epsilon_low`` with ``A < 0``, ``r' > 1 + epsilon_high`` with ``A > 0``, either),
    ``clip_ratio/low_min`` and ``clip_ratio/high_max`` (min / max over sequences of each
    sequence's fraction, sequences without tokens ignored), ``clip_ratio`` (= region_mean),
    ``ratio_mean`` (mean r), and ``kl`` (mean KL as above) when ``ref_logprobs`` is given.
    """
    _check_loss_args(logprobs, old_logprobs, advantages, mask, ref_logprobs)
    beta = check_float("beta", beta, non_negative=True)
    epsilon_low = check_float("epsilon_low", epsilon_low, non_negative=True)
    epsilon_high = check_float("epsilon_high", epsilon_high, non_negative=True)
    if delta is not None:
        delta = check_float("delta", delta, non_negative=True)
    if not isinstance(use_bias_correction_kl, bool):
        raise TypeError(f"use_bias_correction_kl must be a bool, got {type(use_bias_correction_kl).__name__}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (the reference model's log-probs)")
    _check_num_items(num_items_in_batch)

    scored = mask != 0
    mask = mask.to(torch.float32)
    logprobs = logprobs.float()
    # Unscored positions read as on-policy and equal to the reference (ratio 1, KL 0): whatever
    # the caller left there (log-probs of padding, -inf) cannot turn into inf * 0 = NaN.
    old_logprobs = logprobs.detach() if old_logprobs is None else _scored_or(scored, old_logprobs, logprobs)
    adv = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).float()
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token = -torch.min(capped * adv, clipped * adv)
    kl = None
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, _scored_or(scored, ref_logprobs, logprobs))
        if use_bias_correction_kl:
            kl = kl * ratio
        if beta != 0:
            per_token = per_token + beta * kl

    loss = _normalise(per_token * mask, mask, loss_type, max_completion_length, num_items_in_batch, world_size)
    return loss, _metrics(ratio, capped, adv, mask, kl, epsilon_low, epsilon_high)


def _scored_or(scored: Tensor, values: Tensor, logprobs: Tensor) -> Tensor:
    """``values`` (as float32) where scored, the detached log-probs elsewhere."""
    return torch.where(scored, values.float(), logprobs.detach())


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(policy || reference): ``exp(d) - d - 1``, ``d = ref - logp``."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def _normalise(masked_loss, mask, loss_type, max_completion_length, num_items_in_batch, world_size) -> Tensor:
    if loss_type == "grpo":
        return (masked_loss.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked_loss.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        length = masked_loss.shape[1] if max_completion_length is None else max_completion_length
        if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length <= 0:
            raise ValueError(f"max_completion_length must be a positive int, got {max_completion_length!r}")
        return masked_loss.sum() / (masked_loss.shape[0] * length)
    # dapo
    if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral) or world_size <= 0:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    items = mask.sum() if num_items_in_batch is None else num_items_in_batch
    items = torch.as_tensor(items, dtype=masked_loss.dtype, device=masked_loss.device)
    return masked_loss.sum() / (items.clamp(min=1.0) / world_size)


@torch.no_grad()
def _metrics(ratio, capped, adv, mask, kl, epsilon_low, epsilon_high) -> dict:
    """TRL's clip metrics (computed on the delta-capped ratio, as TRL does) and means."""
    count = mask.sum().clamp(min=1.0)
    mean = lambda x: (x.to(mask.dtype) * mask).sum() / count  # noqa: E731
    low = (capped < 1 - epsilon_low) & (adv < 0)
    high = (capped > 1 + epsilon_high) & (adv > 0)
    region = mean(low | high)
    metrics = {
        "clip_ratio": region,
        "clip_ratio/region_mean": region,
        "clip_ratio/low_mean": mean(low),
        "clip_ratio/high_mean": mean(high),
        "clip_ratio/low_min": _nan_extreme(_sequence_means(low, mask), torch.amin),
        "clip_ratio/high_max": _nan_extreme(_sequence_means(high, mask), torch.amax),
        "ratio_mean": mean(ratio),
    }
    if kl is not None:
        metrics["kl"] = mean(kl)
    return metrics


def _sequence_means(flags: Tensor, mask: Tensor) -> Tensor:
    """Per sequence, the masked mean of ``flags``; NaN for a sequence without tokens (as TRL)."""
    flags = flags.expand_as(mask).to(mask.dtype)
    return (flags * mask).sum(-1) / mask.sum(-1)


def _nan_extreme(values: Tensor, reduce) -> Tensor:
    """``reduce`` (amin / amax) over the non-NaN values; NaN when all are NaN (TRL's nanmin/nanmax)."""
    present = ~torch.isnan(values)
    fill = float("inf") if reduce is torch.amin else float("-inf")
    extreme = reduce(torch.where(present, values, fill)) if values.numel() else values.new_tensor(fill)
    return torch.where(present.any(), extreme, torch.full_like(extreme, float("nan")))


def _check_num_items(num_items_in_batch) -> None:
    """None, a positive number, or a tensor (its value is not read: that would cost a host sync)."""
    if num_items_in_batch is None or isinstance(num_items_in_batch, Tensor):
        return
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
        raise TypeError(f"num_items_in_batch must be None, a number or a tensor, got "
                        f"{type(num_items_in_batch).__name__}")
    if not num_items_in_batch > 0:
        raise ValueError(f"num_items_in_batch must be > 0 (the completion tokens of the whole accumulated batch), "
                         f"got {num_items_in_batch!r}")


def _check_loss_args(logprobs, old_logprobs, advantages, mask, ref_logprobs) -> None:
    check_tensor("logprobs", logprobs, ndim=2)
    shape = tuple(logprobs.shape)
    for name, value in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if value is not None:
            check_tensor(name, value, ndim=2)
            if tuple(value.shape) != shape:
                raise ValueError(f"{name} shape {tuple(value.shape)} must equal logprobs shape {shape}")
    check_tensor("mask", mask, dtypes=MASK_DTYPES, ndim=2)
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal logprobs shape {shape}")
    check_tensor("advantages", advantages)
    if tuple(advantages.shape) not in ((shape[0],), shape):
        raise ValueError(f"advantages must have shape [B] = ({shape[0]},) or [B, T], got {tuple(advantages.shape)}")
    check_same_device(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                      ref_logprobs=ref_logprobs)


class GRPOLoss(nn.Module):
    """GRPO loss from the policy's hidden states, with fused lm_head log-probs.

    ``forward(hidden, lm_head_weight, completion_ids, mask, advantages, old_logprobs=None,
    ref_logprobs=None, *, bias=None, temperature=1.0, num_items_in_batch=None)`` returns
    ``(loss, metrics)`` as ``grpo_loss``. ``hidden`` ``[B, T, H]`` are the last hidden states that
    *predict* ``completion_ids`` ``[B, T]`` (already shifted: position t predicts token t);
    ``lm_head_weight`` ``[V, H]`` (gathered, see the module docstring on ZeRO-3 / FSDP).
    Positions with ``mask == 0`` are not scored (their log-prob is 0 and they get no gradient;
    the lm_head matmul still covers them, as it works on whole chunks of tokens). ``metrics``
    also holds ``logprobs`` (detached, ``[B, T]``), e.g. to serve as the next iteration's
    ``old_logprobs``.

    ``one_pass=True`` (the default, when a gradient is needed, outside torch.compile): the GRPO
    loss's gradient w.r.t. a token's log-prob depends on that log-prob alone, so the lm_head's
    gradients are formed in the forward, chunk by chunk, from logits computed once (3 matmuls
    instead of the 4 of forward + a recomputing backward); the backward only scales them. They
    are held from the forward to the backward ([B*T, H] + [V, H]), and the loss can be
    differentiated once. While it runs, d_weight is summed over token chunks in a float32 [V, H]
    buffer, unless all tokens' logits weigh less than a default chunk plus that buffer (fewer
    than about 2 H tokens more than a chunk, for a bfloat16 lm_head): then they form one chunk
    and d_weight is one matmul. ``one_pass=False`` differentiates ``fused_linear_token_logprobs``, whose backward walks
    vocab slabs and needs no [V, H] buffer beyond d_weight itself: one matmul more, less memory
    for half-precision lm_heads (the choice when memory is the limit).
    """

    def __init__(
        self,
        *,
        beta: float = 0.0,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "grpo",
        max_completion_length: Optional[int] = None,
        world_size: int = 1,
        delta: Optional[float] = None,
        use_bias_correction_kl: bool = False,
        chunk_size: Optional[int] = None,
        backend: Optional[str] = None,
        one_pass: bool = True,
    ):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if not isinstance(one_pass, bool):
            raise TypeError(f"one_pass must be a bool, got {type(one_pass).__name__}")
        self.beta, self.epsilon_low, self.epsilon_high = beta, epsilon_low, epsilon_high
        self.loss_type, self.max_completion_length, self.world_size = loss_type, max_completion_length, world_size
        self.delta, self.use_bias_correction_kl = delta, use_bias_correction_kl
        self.chunk_size, self.backend, self.one_pass = chunk_size, backend, one_pass

    def forward(
        self,
        hidden: Tensor,
        lm_head_weight: Tensor,
        completion_ids: Tensor,
        mask: Tensor,
        advantages: Tensor,
        old_logprobs: Optional[Tensor] = None,
        ref_logprobs: Optional[Tensor] = None,
        *,
        bias: Optional[Tensor] = None,
        temperature: float = 1.0,
        num_items_in_batch=None,
    ) -> tuple[Tensor, dict]:
        check_tensor("mask", mask, dtypes=MASK_DTYPES, ndim=2)
        check_tensor("completion_ids", completion_ids, dtypes=TOKEN_ID_DTYPES)
        if completion_ids.shape != mask.shape:
            raise ValueError(
                f"completion_ids shape {tuple(completion_ids.shape)} must equal mask shape {tuple(mask.shape)}"
            )
        # Masked positions (padding after eos) get an ignored id: log-prob 0, no gradient.
        scored_ids = completion_ids.masked_fill(mask == 0, -100)
        loss_kwargs = dict(ref_logprobs=ref_logprobs, beta=self.beta, epsilon_low=self.epsilon_low,
                           epsilon_high=self.epsilon_high, loss_type=self.loss_type,
                           max_completion_length=self.max_completion_length,
                           num_items_in_batch=num_items_in_batch, world_size=self.world_size,
                           delta=self.delta, use_bias_correction_kl=self.use_bias_correction_kl)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, lm_head_weight, bias))
        if self.one_pass and needs_grad and not torch.compiler.is_compiling():
            return _one_pass_grpo(hidden, lm_head_weight, bias, scored_ids, mask, advantages, old_logprobs,
                                  temperature, loss_kwargs, self.chunk_size, self.backend)
        logprobs = fused_linear_token_logprobs(
            hidden, lm_head_weight, scored_ids, bias=bias, temperature=temperature,
            chunk_size=self.chunk_size, backend=self.backend,
        )
        loss, metrics = grpo_loss(logprobs, old_logprobs, advantages, mask, **loss_kwargs)
        metrics["logprobs"] = logprobs.detach()
        return loss, metrics


def _one_pass_grpo(hidden, weight, bias, ids, mask, advantages, old_logprobs, temperature, loss_kwargs,
                   chunk_size, backend):
    """GRPOLoss.forward with the lm_head gradients formed in the forward (see GRPOLoss)."""
    shape = tuple(mask.shape)
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != shape:
        raise ValueError(f"hidden must be [B, T, H] with [B, T] = mask's shape {shape}, got {tuple(hidden.shape)}")

    def loss_of(logprobs):
        return grpo_loss(logprobs, old_logprobs, advantages, mask, **loss_kwargs)

    with torch.no_grad():  # checks every argument before any lm_head work
        loss_of(torch.zeros(shape, dtype=torch.float32, device=hidden.device))
    outputs = {}
    loss = one_pass_loss(hidden, weight, bias, functools.partial(
        _one_pass_compute, hidden, weight, bias, ids, loss_of, temperature, chunk_size, backend, outputs))
    outputs["metrics"]["logprobs"] = outputs["logprobs"]
    return loss, outputs["metrics"]


def _one_pass_compute(hidden, weight, bias, ids, loss_of, temperature, chunk_size, backend, outputs, weight_grad):
    """(loss, d_hidden, d_weight, d_bias); the metrics and log-probs go to ``outputs``."""
    shape = tuple(ids.shape)
    others = torch.zeros(ids.numel(), dtype=torch.float32, device=hidden.device)

    def grad_of_logprobs(lp_chunk, start, end):
        # The loss is a sum of per-token terms (weights from the mask only), so the gradient at
        # the chunk's tokens does not depend on the other tokens' values (zeros here).
        with torch.enable_grad():
            logprobs = others.clone()
            logprobs[start:end] = lp_chunk
            logprobs.requires_grad_()
            (grad,) = torch.autograd.grad(loss_of(logprobs.view(shape))[0], logprobs)
        return grad[start:end]

    logprobs, d_hidden, d_weight, d_bias = fused_linear_logprobs_with_grads(
        hidden.reshape(-1, hidden.shape[-1]), weight, ids.reshape(-1), grad_of_logprobs, bias=bias,
        temperature=temperature, weight_grad=weight_grad, chunk_size=chunk_size, backend=backend)
    logprobs = logprobs.view(shape)
    loss, metrics = loss_of(logprobs)
    outputs.update(logprobs=logprobs, metrics=metrics)
    return loss, d_hidden.view(hidden.shape), d_weight, d_bias


# --- TRL integration ----------------------------------------------------------------------------


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0, row_mask=None, *, backend=None):
    """Drop-in for TRL's ``trl.trainer.utils.selective_log_softmax`` on thinkfuse's
    ``token_logprobs``: one pass over the logits, no float32 copy of them, float32 result.

    ``index`` of shape ``[...]`` (one token per position); rows where ``row_mask == 0`` give 0.
    Top-K indices (``index`` with the logits' rank) are not handled here: ``patch_trl`` sends
    those to TRL's own function.
    """
    if row_mask is not None:
        index = index.masked_fill(row_mask == 0, -100)
    return token_logprobs(logits, index, temperature=temperature, backend=backend)


class TrlPatch(contextlib.AbstractContextManager):
    """What ``patch_trl`` replaced; ``undo()`` (or leaving the ``with`` block) restores it."""

    def __init__(self, replaced: list):
        self.replaced = replaced  # (module, attribute name, original value)

    def undo(self) -> None:
        for module, name, original in reversed(self.replaced):
            setattr(module, name, original)
        self.replaced = []

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        names = ", ".join(f"{m.__name__}.{n}" for m, n, _ in self.replaced)
        return f"TrlPatch({names})"


def patch_trl(*, backend: Optional[str] = None) -> TrlPatch:
    """Make TRL compute per-token log-probs (and entropies) with thinkfuse.

    Replaces, in ``trl.trainer.utils``:

    - ``_ChunkedLogProbFunction``, the tiled lm_head that ``add_fused_lm_head`` installs on the
      policy and reference models (``GRPOTrainer`` in TRL >= 1.x computes every log-prob and the
      entropy through it), by ``fused_linear_token_logprobs``. Calls it cannot serve
      (logit soft-capping, the extra outputs ``log_sum_sq_probs``/``mean_logits``/``is_top1``,
      DeepSpeed ZeRO-3) go to TRL's original.
    - ``selective_log_softmax`` (used on full logits by older ``GRPOTrainer`` versions and other
      trainers; also replaced in ``trl.trainer.grpo_trainer`` when it imported it by name) by
      ``thinkfuse.grpo.selective_log_softmax``.

    Call it once before ``trainer.train()``, or use the result as a context manager::

        with thinkfuse.grpo.patch_trl():
            trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data)
            trainer.train()

    The loss itself stays TRL's (``loss_type``, ``beta``, ``epsilon*`` from ``GRPOConfig``): its
    formulas are the ones ``grpo_loss`` reproduces. TRL handles gradient accumulation and the
    gathering of a sharded lm_head (FSDP2 ``full_tensor``) before it calls the patched function.
    """
    import importlib

    utils = importlib.import_module("trl.trainer.utils")
    replaced = []

    def replace(module, name, new):
        if hasattr(module, name):
            replaced.append((module, name, getattr(module, name)))
            setattr(module, name, new)

    original_chunked = getattr(utils, "_ChunkedLogProbFunction", None)
    if original_chunked is not None:
        replace(utils, "_ChunkedLogProbFunction", _trl_chunked_logprob(original_chunked, backend))
    original_selective = getattr(utils, "selective_log_softmax", None)
    if original_selective is not None:
        new_selective = _trl_selective_log_softmax(original_selective, backend)
        replace(utils, "selective_log_softmax", new_selective)
        grpo_module = importlib.import_module("trl.trainer.grpo_trainer")
        if getattr(grpo_module, "selective_log_softmax", None) is original_selective:
            replace(grpo_module, "selective_log_softmax", new_selective)
    if not replaced:
        raise RuntimeError("patch_trl found neither _ChunkedLogProbFunction nor selective_log_softmax in trl")
    return TrlPatch(replaced)


def _trl_selective_log_softmax(original, backend):
    def selective_log_softmax_(logits, index, temperature=1.0, row_mask=None):
        if index.dim() != logits.dim() - 1:  # top-K gathering: TRL's own
            return original(logits, index, temperature=temperature, row_mask=row_mask)
        return selective_log_softmax(logits, index, temperature, row_mask, backend=backend)

    selective_log_softmax_.__doc__ = selective_log_softmax.__doc__
    selective_log_softmax_.thinkfuse_original = original
    return selective_log_softmax_


_SERVED_OUTPUTS = {"log_probs", "entropy"}


def _trl_chunked_logprob(original, backend):
    """A stand-in for TRL's ``ChunkedLogProbFunction``: same ``apply`` signature and 5 outputs
    ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``."""

    class ThinkfuseChunkedLogProb:
        thinkfuse_original = original

        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                  logit_scale=1.0, outputs=("log_probs",)):
            if final_logit_softcapping is not None or not set(outputs) <= _SERVED_OUTPUTS or logit_scale <= 0 \
                    or _zero3_enabled():
                return original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                      final_logit_softcapping, logit_scale, outputs)
            return _fused_trl_logprobs(hidden, weight, bias, targets, temperature / logit_scale,
                                       "entropy" in outputs, backend)

    return ThinkfuseChunkedLogProb


def _fused_trl_logprobs(hidden, weight, bias, targets, temperature, return_entropy, backend):
    """TRL's fused lm_head contract: the matmul runs in the autocast dtype when autocast is on
    (TRL casts hidden and weight to it), else in hidden's dtype."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    with torch.autocast(device_type, enabled=False):
        result = fused_linear_token_logprobs(
            hidden.to(dtype), weight.to(dtype), targets, bias=None if bias is None else bias.to(dtype),
            temperature=temperature, return_entropy=return_entropy, backend=backend,
        )
    logprobs, entropy = result if return_entropy else (result, None)
    return logprobs, entropy, None, None, None


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers without the deepspeed integration module
        return False
    return bool(is_deepspeed_zero3_enabled())


__all__ = ["GRPOLoss", "LOSS_TYPES", "TrlPatch", "grpo_loss", "k3_kl", "patch_trl", "selective_log_softmax"]
