"""GRPO loss on top of thinkfuse's log-prob ops, with TRL's normalisations, and a patch that
makes TRL's ``GRPOTrainer`` compute its log-probs with thinkfuse.

- ``grpo_loss(logprobs, old_logprobs, advantages, mask, ...)``: TRL 1.16 ``GRPOTrainer``'s loss,
  normalised exactly as TRL does: loss types ``grpo | bnpo | dr_grpo | dapo | cispo | sapo |
  luspo | vespo``, token- or sequence-level (GSPO) importance sampling, the k3 KL term (with
  TRL's bias correction), two-sided clipping (``delta``), the top-entropy token mask, the
  entropy bonus, the off-policy sequence mask (OPSM) and the vLLM importance-sampling
  correction (``vllm_importance_sampling_ratio`` computes TRL's ratio), plus TRL's metrics.
- ``GRPOLoss``: the same from the policy's last hidden states and the lm_head weight, through
  ``fused_linear_token_logprobs``, so the ``[tokens, V]`` logits are never materialised.
- ``patch_trl()``: routes TRL's fused lm_head (``add_fused_lm_head``, what ``GRPOTrainer`` uses
  for the policy and reference log-probs) and ``selective_log_softmax`` to thinkfuse.

Gradient accumulation. ``grpo``, ``bnpo``, ``dr_grpo``, ``sapo`` and ``luspo`` are means over one
micro-batch: divide the loss by the number of accumulation steps (TRL does), which weights
micro-batches equally; so is the entropy bonus, for every loss type (TRL divides it too).
``dapo``, ``cispo`` and ``vespo`` divide the masked sum by ``num_items_in_batch / world_size``:
pass the number of completion tokens (mask ones) in the whole accumulated batch over all ranks,
and ``world_size`` the number of data-parallel ranks whose gradients are averaged; summing the
micro-batch losses (no further division) then gives the exact token mean over the global batch.
With an entropy bonus, pass ``entropy_coef / gradient_accumulation_steps`` then. (TRL's own
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
import math
import numbers
import sys
from typing import Optional

import torch
from torch import Tensor, nn

from ._checks import FLOAT_DTYPES, check_float, check_same_device, check_tensor
from .ops.logprobs import TOKEN_ID_DTYPES, fused_linear_logprobs_with_grads, fused_linear_token_logprobs, token_logprobs
from .ops.one_pass import one_pass_applies, one_pass_loss

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # PPO-style clipped ratio (TRL's set)
TOKEN_SUM_LOSS_TYPES = ("dapo", "cispo", "vespo")  # divided by num_items_in_batch / world_size
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
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
    importance_sampling_level: str = "token",
    entropies: Optional[Tensor] = None,
    top_entropy_quantile: float = 1.0,
    entropy_quantile_group=None,
    entropy_coef: float = 0.0,
    importance_sampling_ratio: Optional[Tensor] = None,
    off_policy_mask_threshold: Optional[float] = None,
    sampling_logprobs: Optional[Tensor] = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
) -> tuple[Tensor, dict]:
    """GRPO-family loss and metrics, as TRL's ``GRPOTrainer._compute_loss`` computes them
    (checked against trl 1.16's own code).

    Importance weight ``r = exp(w)``: ``importance_sampling_level="token"`` (default) ``w =
    logprobs - old_logprobs`` per token; ``"sequence"`` (GSPO) the masked mean of that over each
    sequence, ``[B, 1]``, broadcast to its tokens (its gradient reaches every token of the
    sequence). ``A`` is the advantage of the sequence. Per-token loss ``L`` by ``loss_type``:

    - ``grpo | bnpo | dr_grpo | dapo | luspo`` (clipped): ``-min(r' * A, clamp(r, 1 - epsilon_low,
      1 + epsilon_high) * A)``, ``r' = min(r, delta)`` (TRL's two-sided clipping; ``r' = r`` when
      ``delta`` is None)
    - ``cispo``: ``-min(r, epsilon_high).detach() * A * logprobs`` (``epsilon_high`` is CISPO's
      eps_max: TRL recommends 5.0)
    - ``sapo``: ``-sigmoid(tau * (r - 1)) * 4 / tau * A``, ``tau = sapo_temperature_pos`` where
      ``A > 0`` else ``sapo_temperature_neg``
    - ``vespo``: ``-phi.detach() * A * logprobs`` with the Gamma weight ``phi = exp(lambda + k log w
      - lambda w)`` of the sequence ratio ``w = exp(clamp(sum_t clamp(logprobs - old, +-20) +
      sum_t clamp(log importance_sampling_ratio, log 1e-8, 20), log 1e-8, 20))``, ``(k, lambda) =
      (vespo_k_pos, vespo_lambda_pos)`` where ``A >= 0`` else the ``_neg`` pair (always
      sequence-level, whatever ``importance_sampling_level``)

    then, in TRL's order, times the off-policy sequence mask (``off_policy_mask_threshold``:
    DeepSeek-V3.2's OPSM, keeps a sequence when ``A >= 0`` or the masked mean of
    ``sampling_logprobs - logprobs.detach()`` is ``<= threshold``; ``sampling_logprobs`` defaults
    to ``old_logprobs``), times the top-entropy mask (``top_entropy_quantile < 1``: keeps the
    scored tokens whose ``entropies`` are ``>=`` the ``1 - top_entropy_quantile`` quantile of
    this call's scored tokens, or of the scored tokens of every rank of ``entropy_quantile_group``
    when given, a ``torch.distributed`` process group: pass ``torch.distributed.group.WORLD`` to
    take it over all ranks, as TRL does; every rank of the group must then make the call), times
    ``importance_sampling_ratio`` (TRL's vLLM importance-sampling correction, ``[B, T]`` for the
    token modes or ``[B, 1]`` for the sequence modes, see ``vllm_importance_sampling_ratio``; for
    vespo it enters ``w`` instead and must be ``[B, T]``), plus ``beta * KL`` with ``KL = k3 =
    exp(ref - logprobs) - (ref - logprobs) - 1``, times ``r`` when ``use_bias_correction_kl``
    (TRL's option of that name, whose default is True in trl 1.16: pass it to reproduce a TRL run).
    With ``M = mask``:

    - ``grpo``, ``sapo``: ``mean_b(sum_t(L * M) / sum_t(M))``
    - ``bnpo``: ``sum(L * M) / sum(M)``
    - ``dr_grpo``: ``sum(L * M) / (B * max_completion_length)`` (default: T; TRL divides by its
      config's max_completion_length, not by the batch's padded length: pass it)
    - ``dapo``, ``cispo``, ``vespo``: ``sum(L * M) / (num_items_in_batch / world_size)``
      (default: ``sum(M)``)
    - ``luspo``: ``mean_b(sum_t(L * M))``

    ``entropy_coef != 0`` subtracts ``entropy_coef`` times the mean of ``entropies`` over the
    scored (and, with ``top_entropy_quantile < 1``, kept) tokens of this call: TRL's static
    entropy bonus, a micro-batch mean for every loss type (with dapo / cispo / vespo, whose
    micro-batch losses are summed, pass ``entropy_coef / gradient_accumulation_steps`` to
    reproduce TRL). ``entropies`` (``[B, T]``, may carry a gradient) is needed for it and for the
    entropy mask.

    Shapes: logprobs/old_logprobs/ref_logprobs/sampling_logprobs/entropies/mask ``[B, T]``,
    advantages ``[B]`` (or ``[B, T]``). ``old_logprobs=None`` means on-policy
    (``logprobs.detach()``, ratio 1). Token sums use at least 1 as divisor, as TRL. Computed in
    float32 whatever the inputs' dtype (as TRL, whose log-probs are float32). Positions with
    ``mask == 0`` contribute nothing whatever the other tensors hold there (-inf included: they
    are not read there).

    metrics (0-d float32 tensors, detached; over this call's tokens, no host sync; TRL also
    reduces them across ranks). Means are over the scored tokens for per-token quantities and over
    the B sequences for per-sequence ones (``importance_sampling_level="sequence"``, vespo's
    ``phi``), as TRL's; with T = 1 every quantity is averaged over the B sequences, empty ones
    included, as TRL does (it cannot tell ``[B, 1]`` token quantities from sequence ones).
    Clipped loss types: ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
    ``clip_ratio/region_mean`` (fractions where the clipped term is the active one: ``r' < 1 -
    epsilon_low`` with ``A < 0``, ``r' > 1 + epsilon_high`` with ``A > 0``, either),
    ``clip_ratio/low_min`` and ``clip_ratio/high_max`` (min / max over sequences of each
    sequence's fraction, sequences without tokens ignored at token level), ``clip_ratio`` (=
    region_mean). cispo: ``cispo_clip_ratio`` (``r > epsilon_high`` with ``A > 0``) and
    ``clip_ratio`` (= it). sapo and vespo clip nothing: ``clip_ratio`` 0 (API.md's minimum set;
    TRL logs none for them); vespo: ``vespo/phi_seq_mean``. All:
    ``ratio_mean`` (mean r), ``kl`` (mean KL as above) when ``ref_logprobs`` is given,
    ``entropy`` (mean over the scored tokens) when ``entropies`` is given, and ``policy_loss``
    (the loss before the entropy bonus) when ``entropy_coef != 0``.
    """
    options = _checked_options(logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, beta=beta,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, loss_type=loss_type,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
        world_size=world_size, delta=delta, use_bias_correction_kl=use_bias_correction_kl,
        importance_sampling_level=importance_sampling_level, entropies=entropies,
        top_entropy_quantile=top_entropy_quantile, entropy_quantile_group=entropy_quantile_group,
        entropy_coef=entropy_coef, importance_sampling_ratio=importance_sampling_ratio,
        off_policy_mask_threshold=off_policy_mask_threshold, sampling_logprobs=sampling_logprobs,
        sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
        vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg)
    return _loss_and_metrics(logprobs, old_logprobs, advantages, mask, **options)


def _checked_options(logprobs, old_logprobs, advantages, mask, *, ref_logprobs, beta, epsilon_low, epsilon_high,
                     loss_type, max_completion_length, num_items_in_batch, world_size, delta,
                     use_bias_correction_kl, importance_sampling_level, entropies, top_entropy_quantile,
                     entropy_quantile_group, entropy_coef, importance_sampling_ratio, off_policy_mask_threshold,
                     sampling_logprobs, sapo_temperature_pos, sapo_temperature_neg, vespo_k_pos,
                     vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg) -> dict:
    """Every check grpo_loss makes, before it computes anything (GRPOLoss makes them before its
    lm_head work too); returns grpo_loss's options with the numbers as floats, and vespo's four
    parameters as one list (None for other loss types)."""
    _check_loss_args(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropies, importance_sampling_ratio,
                     sampling_logprobs)
    beta = check_float("beta", beta, non_negative=True)
    epsilon_low = check_float("epsilon_low", epsilon_low, non_negative=True)
    epsilon_high = check_float("epsilon_high", epsilon_high, non_negative=True)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    if delta is not None:
        delta = check_float("delta", delta, non_negative=True)
        if loss_type not in CLIPPED_LOSS_TYPES:
            raise ValueError(f"delta (two-sided clipping) applies to loss_type in {CLIPPED_LOSS_TYPES} only, "
                             f"got loss_type={loss_type!r}")
    if not isinstance(use_bias_correction_kl, bool):
        raise TypeError(f"use_bias_correction_kl must be a bool, got {type(use_bias_correction_kl).__name__}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (the reference model's log-probs)")
    top_entropy_quantile = _checked_quantile(top_entropy_quantile)
    entropy_coef = check_float("entropy_coef", entropy_coef)
    if entropies is None and (top_entropy_quantile < 1.0 or entropy_coef != 0.0):
        raise ValueError("top_entropy_quantile < 1 and entropy_coef != 0 need entropies (the per-token entropies)")
    _check_process_group("entropy_quantile_group", entropy_quantile_group)
    if off_policy_mask_threshold is not None:
        off_policy_mask_threshold = check_float("off_policy_mask_threshold", off_policy_mask_threshold)
    if loss_type == "sapo":
        sapo_temperature_pos = check_float("sapo_temperature_pos", sapo_temperature_pos, positive=True)
        sapo_temperature_neg = check_float("sapo_temperature_neg", sapo_temperature_neg, positive=True)
    vespo = None
    if loss_type == "vespo":
        vespo = [check_float(name, value) for name, value in (
            ("vespo_k_pos", vespo_k_pos), ("vespo_lambda_pos", vespo_lambda_pos),
            ("vespo_k_neg", vespo_k_neg), ("vespo_lambda_neg", vespo_lambda_neg))]
        if importance_sampling_ratio is not None and importance_sampling_ratio.shape[1] != logprobs.shape[1]:
            raise ValueError("loss_type 'vespo' takes a token-level importance_sampling_ratio [B, T] (TRL's "
                             "token_truncate / token_mask modes), got shape "
                             f"{tuple(importance_sampling_ratio.shape)}")
    _check_num_items(num_items_in_batch)
    if loss_type == "dr_grpo":
        _check_positive_int("max_completion_length", max_completion_length, none_ok=True)
    if loss_type in TOKEN_SUM_LOSS_TYPES:
        _check_positive_int("world_size", world_size)
    return dict(ref_logprobs=ref_logprobs, beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                loss_type=loss_type, max_completion_length=max_completion_length,
                num_items_in_batch=num_items_in_batch, world_size=world_size, delta=delta,
                use_bias_correction_kl=use_bias_correction_kl, importance_sampling_level=importance_sampling_level,
                entropies=entropies, top_entropy_quantile=top_entropy_quantile,
                entropy_quantile_group=entropy_quantile_group, entropy_coef=entropy_coef,
                importance_sampling_ratio=importance_sampling_ratio,
                off_policy_mask_threshold=off_policy_mask_threshold, sampling_logprobs=sampling_logprobs,
                sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg, vespo=vespo)


def _check_positive_int(name, value, none_ok=False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _loss_and_metrics(logprobs, old_logprobs, advantages, mask, *, ref_logprobs, beta, epsilon_low,
                      epsilon_high, loss_type, max_completion_length, num_items_in_batch, world_size, delta,
                      use_bias_correction_kl, importance_sampling_level, entropies, top_entropy_quantile,
                      entropy_quantile_group, entropy_coef, importance_sampling_ratio,
                      off_policy_mask_threshold, sampling_logprobs, sapo_temperature_pos, sapo_temperature_neg,
                      vespo) -> tuple[Tensor, dict]:
    """grpo_loss on checked options (_checked_options)."""
    scored = mask != 0
    mask = mask.to(torch.float32)
    # Unscored positions read as log-prob 0, on-policy and equal to the reference (ratio 1, KL 0):
    # whatever the caller left there (log-probs of padding, -inf) cannot turn into inf * 0 = NaN.
    logprobs = _scored_or_zero(scored, logprobs.float())
    old_logprobs = logprobs.detach() if old_logprobs is None else _scored_or(scored, old_logprobs, logprobs)
    adv = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).float()
    log_ratio = logprobs - old_logprobs
    if importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_weights)
    is_ratio = None
    if importance_sampling_ratio is not None:
        is_ratio = importance_sampling_ratio.float()
        if is_ratio.shape[1] == logprobs.shape[1]:  # token-level ratios: 1 where not scored
            is_ratio = torch.where(scored, is_ratio, torch.ones_like(is_ratio))
    kl = None
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, _scored_or(scored, ref_logprobs, logprobs))
        if use_bias_correction_kl:
            kl = kl * ratio

    capped, phi = ratio, None
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=epsilon_high).detach() * adv * logprobs
    elif loss_type in CLIPPED_LOSS_TYPES:
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        capped = ratio if delta is None else torch.clamp(ratio, max=delta)
        per_token = -torch.min(capped * adv, clipped * adv)
    elif loss_type == "sapo":
        temperatures = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token = -(torch.sigmoid(temperatures * (ratio - 1)) * 4 / temperatures) * adv
    else:  # vespo
        phi = _vespo_weights(adv, log_ratio, mask, is_ratio, *vespo)
        per_token = -phi * adv * logprobs

    if off_policy_mask_threshold is not None:
        sampling = old_logprobs if sampling_logprobs is None else _scored_or(scored, sampling_logprobs, logprobs)
        per_token = per_token * _off_policy_mask(adv, logprobs, sampling, mask, off_policy_mask_threshold)
    entropy_mask = None
    if entropies is not None:
        entropies = torch.where(scored, entropies.float(), torch.zeros_like(logprobs))
        if top_entropy_quantile < 1.0:
            entropy_mask = _high_entropy_mask(entropies, scored, 1 - top_entropy_quantile, entropy_quantile_group)
            per_token = per_token * entropy_mask
    if is_ratio is not None and loss_type != "vespo":
        per_token = per_token * is_ratio
    if kl is not None and beta != 0:
        per_token = per_token + beta * kl

    loss = _normalise(per_token * mask, mask, loss_type, max_completion_length, num_items_in_batch, world_size)
    policy_loss = None
    if entropy_coef != 0.0:
        kept = mask if entropy_mask is None else mask * entropy_mask
        policy_loss = loss.detach()
        loss = loss - entropy_coef * ((entropies * kept).sum() / kept.sum().clamp(min=1.0))
    metrics = _metrics(loss_type, ratio, capped, adv, mask, kl, phi, entropies, epsilon_low, epsilon_high)
    if policy_loss is not None:
        metrics["policy_loss"] = policy_loss
    return loss, metrics


def vllm_importance_sampling_ratio(
    old_logprobs: Tensor,
    sampling_logprobs: Tensor,
    mask: Tensor,
    *,
    mode: str = "sequence_mask",
    clip_min: Optional[float] = None,
    clip_max: Optional[float] = 3.0,
) -> Tensor:
    """TRL's vLLM importance-sampling correction ratio (``vllm_importance_sampling_correction``),
    the ``importance_sampling_ratio`` that ``grpo_loss`` multiplies the per-token loss by.

    ``old_logprobs`` are the trainer's log-probs of the sampled completions, ``sampling_logprobs``
    the sampler's (vLLM's; NaN where it gave none: no correction there), ``[B, T]``. ``d =
    (old - sampling) * mask``; ``token_*`` modes: ``exp(d)`` per token (``[B, T]``); ``sequence_*``
    modes: ``exp(sum_t d)`` per sequence (``[B, 1]``). ``*_truncate`` clamps it to ``[clip_min,
    clip_max]``, ``*_mask`` sets it to 0 outside (a None bound is no bound). TRL's defaults:
    ``mode="sequence_mask"``, ``clip_max=3.0``, ``clip_min=None``. Float32, no gradient.
    """
    check_tensor("old_logprobs", old_logprobs, ndim=2)
    shape = tuple(old_logprobs.shape)
    check_tensor("sampling_logprobs", sampling_logprobs, ndim=2)
    if tuple(sampling_logprobs.shape) != shape:
        raise ValueError(f"sampling_logprobs shape {tuple(sampling_logprobs.shape)} must equal old_logprobs shape "
                         f"{shape}")
    check_tensor("mask", mask, dtypes=MASK_DTYPES, ndim=2)
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal old_logprobs shape {shape}")
    check_same_device(old_logprobs=old_logprobs, sampling_logprobs=sampling_logprobs, mask=mask)
    if mode not in VLLM_IS_MODES:
        raise ValueError(f"mode must be one of {VLLM_IS_MODES}, got {mode!r}")
    if clip_min is not None:
        clip_min = check_float("clip_min", clip_min)
    if clip_max is not None:
        clip_max = check_float("clip_max", clip_max)
    if clip_min is not None and clip_max is not None and clip_min >= clip_max:
        raise ValueError(f"clip_min ({clip_min}) must be less than clip_max ({clip_max})")
    if mode.endswith("_truncate") and clip_min is None and clip_max is None:
        raise ValueError(f"mode {mode!r} needs clip_min or clip_max")
    with torch.no_grad():
        scored = mask != 0
        diff = torch.where(scored, old_logprobs.float() - sampling_logprobs.float(), 0.0)
        diff = torch.nan_to_num(diff, nan=0.0)
        if mode.startswith("sequence"):
            diff = diff.sum(dim=-1, keepdim=True)
        ratio = torch.exp(diff)
        if mode.endswith("_truncate"):
            return torch.clamp(ratio, min=clip_min, max=clip_max)
        low = -math.inf if clip_min is None else clip_min
        high = math.inf if clip_max is None else clip_max
        return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def _scored_or(scored: Tensor, values: Tensor, logprobs: Tensor) -> Tensor:
    """``values`` (as float32) where scored, the detached log-probs elsewhere."""
    return torch.where(scored, values.float(), logprobs.detach())


def _scored_or_zero(scored: Tensor, logprobs: Tensor) -> Tensor:
    """The log-probs where scored, 0 elsewhere (no gradient there)."""
    return torch.where(scored, logprobs, torch.zeros_like(logprobs))


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(policy || reference): ``exp(d) - d - 1``, ``d = ref - logp``."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


@torch.no_grad()
def _vespo_weights(adv, log_ratio, mask, is_ratio, k_pos, lambda_pos, k_neg, lambda_neg) -> Tensor:
    """TRL's ``get_gamma_weights``: ``phi(w) = exp(lambda + k log w - lambda w)`` of the sequence
    importance weight ``w`` (``[B, 1]``, or ``[B, T]`` with per-token advantages); no gradient."""
    lower = math.log(1e-8)
    seq_log_ratio = torch.sum(torch.clamp(log_ratio, -20.0, 20.0) * mask, dim=-1, keepdim=True)
    if is_ratio is not None:  # 1 (log 0) where not scored
        seq_log_ratio = seq_log_ratio + torch.sum(torch.clamp(torch.log(is_ratio), lower, 20.0), dim=-1, keepdim=True)
    log_w = torch.clamp(seq_log_ratio, lower, 20.0)
    w = torch.exp(log_w)
    nonneg = adv >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * w).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@torch.no_grad()
def _off_policy_mask(adv, logprobs, sampling, mask, threshold) -> Tensor:
    """TRL's ``get_off_policy_mask`` (OPSM): 1 where ``A >= 0`` or the sequence's mean of
    ``sampling - logprobs`` is ``<= threshold``, else 0 (``[B, 1]``, or ``[B, T]`` with per-token
    advantages)."""
    kl_div = torch.nan_to_num(sampling - logprobs.detach(), nan=0.0)
    mean_kl = (kl_div * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((adv >= 0) | (mean_kl <= threshold)).to(mask.dtype)


def _check_process_group(name: str, group) -> None:
    if group is None:
        return
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{name} needs torch.distributed initialised (init_process_group), or None")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be None or a torch.distributed ProcessGroup, got {type(group).__name__}")


@torch.no_grad()
def _high_entropy_mask(entropies: Tensor, scored: Tensor, threshold: float, group=None) -> Tensor:
    """TRL's ``get_high_entropy_mask``: scored tokens whose entropy is >= the ``threshold``
    quantile (linear interpolation, as ``torch.quantile``, bit for bit) of the scored tokens'
    entropies, this call's or (``group``) those of every rank of the process group; none when no
    token is scored. Sort-based: no ``torch.quantile`` size limit, and no host sync unless
    gathered (the ranks' token counts are read to size the gather)."""
    count = scored.sum()
    values = torch.where(scored, entropies, math.inf).flatten()
    if group is not None:
        values, count = _gather_across_ranks(values, count, group)
    if values.numel() == 0:  # no token anywhere
        return torch.zeros_like(scored)
    values = values.sort().values
    ranks = torch.tensor(threshold, dtype=torch.float32, device=entropies.device) * (count - 1).clamp(min=0).float()
    below, above = ranks.long(), ranks.ceil().long()
    cut = torch.lerp(values[below], values[above], ranks - below)
    return (entropies >= cut) & scored


def _gather_across_ranks(values: Tensor, count: Tensor, group) -> tuple[Tensor, Tensor]:
    """Every rank's ``values`` (unscored entries +inf, so they sort last) laid end to end, padded
    with +inf to the longest rank's, and the ranks' summed scored ``count``."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=values.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([values.numel()], device=values.device), group=group)
    longest = int(torch.cat(sizes).max())
    padded = torch.nn.functional.pad(values, (0, longest - values.numel()), value=math.inf)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous(), group=group)
    total = count.clone()
    dist.all_reduce(total, group=group)
    return torch.cat(gathered), total


def _normalise(masked_loss, mask, loss_type, max_completion_length, num_items_in_batch, world_size) -> Tensor:
    if loss_type in ("grpo", "sapo"):
        return (masked_loss.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked_loss.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "luspo":
        return masked_loss.sum(-1).mean()
    if loss_type == "dr_grpo":
        length = masked_loss.shape[1] if max_completion_length is None else max_completion_length
        return masked_loss.sum() / (masked_loss.shape[0] * length)
    # dapo, cispo, vespo
    items = mask.sum() if num_items_in_batch is None else num_items_in_batch
    items = torch.as_tensor(items, dtype=masked_loss.dtype, device=masked_loss.device)
    return masked_loss.sum() / (items.clamp(min=1.0) / world_size)


@torch.no_grad()
def _metrics(loss_type, ratio, capped, adv, mask, kl, phi, entropies, epsilon_low, epsilon_high) -> dict:
    """TRL's metrics (the clip ones on the delta-capped ratio, as TRL) and means. A ``[B, 1]``
    quantity (sequence-level) is averaged over the sequences, a ``[B, T]`` one over the tokens. With
    T = 1 every quantity is ``[B, 1]`` and TRL averages each over the sequences, empty ones included
    (where its log-probs and entropies are 0: ratio 1, KL 0, as here), so that is done here too."""
    count = mask.sum().clamp(min=1.0)

    def mean(x):
        x = x.to(mask.dtype)
        if x.shape[1] == 1:
            return x.sum() / max(x.shape[0], 1)
        return (x * mask).sum() / count

    metrics = {}
    if loss_type in CLIPPED_LOSS_TYPES:
        low = (capped < 1 - epsilon_low) & (adv < 0)
        high = (capped > 1 + epsilon_high) & (adv > 0)
        region = mean(low | high)
        metrics.update({
            "clip_ratio": region,
            "clip_ratio/region_mean": region,
            "clip_ratio/low_mean": mean(low),
            "clip_ratio/high_mean": mean(high),
            "clip_ratio/low_min": _nan_extreme(_sequence_means(low, mask), torch.amin),
            "clip_ratio/high_max": _nan_extreme(_sequence_means(high, mask), torch.amax),
        })
    elif loss_type == "cispo":
        metrics["clip_ratio"] = metrics["cispo_clip_ratio"] = mean((ratio > epsilon_high) & (adv > 0))
    else:  # sapo, vespo: a smooth weight, never a clipped ratio (TRL logs no clip metric for them)
        metrics["clip_ratio"] = torch.zeros((), dtype=mask.dtype, device=mask.device)
        if loss_type == "vespo":
            metrics["vespo/phi_seq_mean"] = mean(phi)
    metrics["ratio_mean"] = mean(ratio)
    if kl is not None:
        metrics["kl"] = mean(kl)
    if entropies is not None:
        metrics["entropy"] = mean(entropies)
    return metrics


def _sequence_means(flags: Tensor, mask: Tensor) -> Tensor:
    """Per sequence, the masked mean of ``flags``; NaN for a sequence without tokens (as TRL). A
    ``[B, 1]`` flag (sequence-level, or T = 1) is its own mean (as TRL)."""
    if flags.shape[1] == 1:
        return flags[:, 0].to(mask.dtype)
    flags = flags.expand_as(mask).to(mask.dtype)
    return (flags * mask).sum(-1) / mask.sum(-1)


def _nan_extreme(values: Tensor, reduce) -> Tensor:
    """``reduce`` (amin / amax) over the non-NaN values; NaN when all are NaN (TRL's nanmin/nanmax)."""
    present = ~torch.isnan(values)
    fill = float("inf") if reduce is torch.amin else float("-inf")
    extreme = reduce(torch.where(present, values, fill)) if values.numel() else values.new_tensor(fill)
    return torch.where(present.any(), extreme, torch.full_like(extreme, float("nan")))


def _checked_quantile(top_entropy_quantile) -> float:
    top_entropy_quantile = check_float("top_entropy_quantile", top_entropy_quantile)
    if not 0.0 <= top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {top_entropy_quantile}")
    return top_entropy_quantile


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


def _check_loss_args(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropies=None,
                     importance_sampling_ratio=None, sampling_logprobs=None) -> None:
    check_tensor("logprobs", logprobs, ndim=2)
    shape = tuple(logprobs.shape)
    for name, value in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                        ("sampling_logprobs", sampling_logprobs), ("entropies", entropies)):
        if value is not None:
            check_tensor(name, value, ndim=2)
            if tuple(value.shape) != shape:
                raise ValueError(f"{name} shape {tuple(value.shape)} must equal logprobs shape {shape}")
    if importance_sampling_ratio is not None:
        check_tensor("importance_sampling_ratio", importance_sampling_ratio, ndim=2)
        if tuple(importance_sampling_ratio.shape) not in (shape, (shape[0], 1)):
            raise ValueError(f"importance_sampling_ratio must have shape [B, T] = {shape} (token modes) or [B, 1] = "
                             f"({shape[0]}, 1) (sequence modes), got {tuple(importance_sampling_ratio.shape)}")
    check_tensor("mask", mask, dtypes=MASK_DTYPES, ndim=2)
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal logprobs shape {shape}")
    check_tensor("advantages", advantages)
    if tuple(advantages.shape) not in ((shape[0],), shape):
        raise ValueError(f"advantages must have shape [B] = ({shape[0]},) or [B, T], got {tuple(advantages.shape)}")
    check_same_device(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                      ref_logprobs=ref_logprobs, entropies=entropies,
                      importance_sampling_ratio=importance_sampling_ratio,
                      sampling_logprobs=sampling_logprobs)


class GRPOLoss(nn.Module):
    """GRPO loss from the policy's hidden states, with fused lm_head log-probs.

    The constructor takes ``grpo_loss``'s options (loss type, clipping, KL, importance-sampling
    level, entropy mask and bonus, OPSM threshold, sapo / vespo parameters); ``forward(hidden,
    lm_head_weight, completion_ids, mask, advantages, old_logprobs=None, ref_logprobs=None, *,
    bias=None, temperature=1.0, num_items_in_batch=None, importance_sampling_ratio=None,
    sampling_logprobs=None)`` returns ``(loss, metrics)`` as ``grpo_loss``. ``hidden`` ``[B, T, H]``
    are the last hidden states that *predict* ``completion_ids`` ``[B, T]`` (already shifted:
    position t predicts token t); ``lm_head_weight`` ``[V, H]`` (gathered, see the module
    docstring on ZeRO-3 / FSDP). Positions with ``mask == 0`` are not scored (their log-prob is 0
    and they get no gradient; the lm_head matmul still covers them, as it works on whole chunks of
    tokens). The per-token entropies are computed (through the same fused op, with their
    gradient) when the loss needs them: ``top_entropy_quantile < 1`` or ``entropy_coef != 0``.
    ``metrics`` also holds ``logprobs`` (detached, ``[B, T]``), e.g. to serve as the next
    iteration's ``old_logprobs``.

    ``one_pass=True`` (the default, when a gradient is needed, outside torch.compile and torch.func, and when
    the loss is a sum of per-token terms each depending on its own log-prob only: token-level
    importance sampling, a loss type other than vespo, no off-policy mask, no entropy mask or
    bonus; otherwise the ``one_pass=False`` path runs): the lm_head's gradients are formed in
    the forward, chunk by chunk, from logits computed once (3 matmuls instead of the 4 of
    forward + a recomputing backward); the backward only scales them. They are held from the
    forward to the backward ([B*T, H] + [V, H]), and the loss can be differentiated once. While it
    runs, d_weight is summed over token chunks in a float32 [V, H] buffer, unless all tokens'
    logits weigh less than a default chunk plus that buffer (fewer than about 2 H tokens more
    than a chunk, for a bfloat16 lm_head): then they form one chunk and d_weight is one matmul.
    ``one_pass=False`` differentiates ``fused_linear_token_logprobs``, whose backward walks
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
        importance_sampling_level: str = "token",
        top_entropy_quantile: float = 1.0,
        entropy_quantile_group=None,
        entropy_coef: float = 0.0,
        off_policy_mask_threshold: Optional[float] = None,
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        chunk_size: Optional[int] = None,
        backend: Optional[str] = None,
        one_pass: bool = True,
    ):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                             f"got {importance_sampling_level!r}")
        if not isinstance(one_pass, bool):
            raise TypeError(f"one_pass must be a bool, got {type(one_pass).__name__}")
        self.beta, self.epsilon_low, self.epsilon_high = beta, epsilon_low, epsilon_high
        self.loss_type, self.max_completion_length, self.world_size = loss_type, max_completion_length, world_size
        self.delta, self.use_bias_correction_kl = delta, use_bias_correction_kl
        self.importance_sampling_level = importance_sampling_level
        self.top_entropy_quantile, self.entropy_coef = top_entropy_quantile, entropy_coef
        self.entropy_quantile_group = entropy_quantile_group  # a property: see _ProcessGroupSlot
        self.off_policy_mask_threshold = off_policy_mask_threshold
        self.sapo_temperature_pos, self.sapo_temperature_neg = sapo_temperature_pos, sapo_temperature_neg
        self.vespo_k_pos, self.vespo_lambda_pos = vespo_k_pos, vespo_lambda_pos
        self.vespo_k_neg, self.vespo_lambda_neg = vespo_k_neg, vespo_lambda_neg
        self.chunk_size, self.backend, self.one_pass = chunk_size, backend, one_pass

    @property
    def entropy_quantile_group(self):
        """The torch.distributed ProcessGroup the entropy quantile is taken over (None: this
        call's tokens). A module unpickled in another process has none until it is set again."""
        return self._entropy_quantile_group.group(needed=True)

    @entropy_quantile_group.setter
    def entropy_quantile_group(self, group) -> None:
        self._entropy_quantile_group = _ProcessGroupSlot(group)

    def _group_for_forward(self):
        """The group for grpo_loss; an unpickled module without one still runs where the entropy
        quantile is not taken (top_entropy_quantile 1), the only case the group is unused."""
        return self._entropy_quantile_group.group(needed=self.top_entropy_quantile < 1.0)

    def _needs_entropy(self) -> bool:
        return self.top_entropy_quantile != 1.0 or self.entropy_coef != 0.0

    def _per_token_separable(self) -> bool:
        """Whether the loss is a sum of per-token terms, each a function of its own log-prob (what
        the one-pass path needs: the gradient at a token does not read the other tokens' values)."""
        return (self.importance_sampling_level == "token" and self.loss_type != "vespo"
                and self.off_policy_mask_threshold is None and not self._needs_entropy())

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
        importance_sampling_ratio: Optional[Tensor] = None,
        sampling_logprobs: Optional[Tensor] = None,
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
                           delta=self.delta, use_bias_correction_kl=self.use_bias_correction_kl,
                           importance_sampling_level=self.importance_sampling_level,
                           top_entropy_quantile=self.top_entropy_quantile,
                           entropy_quantile_group=self._group_for_forward(), entropy_coef=self.entropy_coef,
                           importance_sampling_ratio=importance_sampling_ratio,
                           off_policy_mask_threshold=self.off_policy_mask_threshold,
                           sampling_logprobs=sampling_logprobs, sapo_temperature_pos=self.sapo_temperature_pos,
                           sapo_temperature_neg=self.sapo_temperature_neg, vespo_k_pos=self.vespo_k_pos,
                           vespo_lambda_pos=self.vespo_lambda_pos, vespo_k_neg=self.vespo_k_neg,
                           vespo_lambda_neg=self.vespo_lambda_neg)
        needs_entropy = self._needs_entropy()
        options = _check_module_loss_args(hidden, mask, advantages, old_logprobs, needs_entropy, loss_kwargs)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, lm_head_weight, bias))
        if self.one_pass and needs_grad and self._per_token_separable() and one_pass_applies():
            return _one_pass_grpo(hidden, lm_head_weight, bias, scored_ids, mask, advantages, old_logprobs,
                                  temperature, options, self.chunk_size, self.backend)
        result = fused_linear_token_logprobs(
            hidden, lm_head_weight, scored_ids, bias=bias, temperature=temperature, return_entropy=needs_entropy,
            chunk_size=self.chunk_size, backend=self.backend,
        )
        logprobs, entropies = result if needs_entropy else (result, None)
        loss, metrics = _loss_and_metrics(logprobs, old_logprobs, advantages, mask, **{**options, "entropies": entropies})
        metrics["logprobs"] = logprobs.detach()
        return loss, metrics


class _ProcessGroupSlot:
    """Where a GRPOLoss keeps its entropy_quantile_group. A ProcessGroup is process-local (a
    communicator between this process and its peers) and cannot be pickled, yet trainers
    deepcopy modules (reference models) and pickle them (checkpoints, spawned workers). A
    deepcopy stays in this process, so it shares the group object; a pickle may be loaded
    anywhere, so the group is left out and the unpickled module says so when a forward needs it
    (rather than silently taking the quantile over its own rank's tokens only)."""

    def __init__(self, group, dropped_by_pickle: bool = False):
        self._group, self._dropped_by_pickle = group, dropped_by_pickle

    def group(self, *, needed: bool):
        if self._dropped_by_pickle:
            if needed:
                raise RuntimeError(
                    "this GRPOLoss was unpickled without its entropy_quantile_group: a torch.distributed "
                    "ProcessGroup belongs to the process that made it and is not pickled; set "
                    "loss.entropy_quantile_group = <this process's group> before a forward with "
                    "top_entropy_quantile < 1")
            return None
        return self._group

    def __deepcopy__(self, memo):
        return _ProcessGroupSlot(self._group, self._dropped_by_pickle)

    def __reduce__(self):
        return _ProcessGroupSlot, (None, self._dropped_by_pickle or self._group is not None)


def _check_module_loss_args(hidden, mask, advantages, old_logprobs, with_entropies, loss_kwargs) -> dict:
    """GRPOLoss's arguments checked before any lm_head work: grpo_loss's checks (nothing computed)
    on stand-ins of the mask's shape for the log-probs (and entropies) still to be computed.
    Returns the checked options (_checked_options) for _loss_and_metrics, whose ``entropies``
    the caller replaces with the computed ones."""
    shape = tuple(mask.shape)
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != shape:
        raise ValueError(f"hidden must be [B, T, H] with [B, T] = mask's shape {shape}, got {tuple(hidden.shape)}")
    stand_in = torch.empty(shape, dtype=torch.float32, device=hidden.device)
    return _checked_options(stand_in, old_logprobs, advantages, mask,
                            entropies=stand_in if with_entropies else None, **loss_kwargs)


def _one_pass_grpo(hidden, weight, bias, ids, mask, advantages, old_logprobs, temperature, options,
                   chunk_size, backend):
    """GRPOLoss.forward with the lm_head gradients formed in the forward (see GRPOLoss); its
    arguments are checked, ``options`` by _check_module_loss_args (so the loss of each chunk's
    gradient is not checked again)."""

    def loss_of(logprobs):
        return _loss_and_metrics(logprobs, old_logprobs, advantages, mask, **options)

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
    """What ``patch_trl`` replaced; ``undo()`` (or leaving the ``with`` block) restores it.

    Patches may be undone in any order: a replacement that a later patch has wrapped is only
    retired (the later patch's undo then skips past it to what it replaced), so TRL ends up
    exactly as it was once every patch is undone."""

    def __init__(self, replaced: list):
        self.replaced = replaced  # (module, attribute name, original value, replacement)

    def undo(self) -> None:
        for module, name, original, replacement in reversed(self.replaced):
            replacement.thinkfuse_retired = True
            if getattr(module, name) is replacement:
                setattr(module, name, _unretired(original))
        self.replaced = []

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        names = ", ".join(f"{m.__name__}.{n}" for m, n, _, _ in self.replaced)
        return f"TrlPatch({names})"


def _unretired(value):
    """``value``, or, when it is a replacement of an undone patch, the first live value beneath it."""
    while getattr(value, "thinkfuse_retired", False):
        value = value.thinkfuse_original
    return value


def patch_trl(*, backend: Optional[str] = None) -> TrlPatch:
    """Make TRL compute per-token log-probs (and entropies) with thinkfuse.

    Replaces, in ``trl.trainer.utils``:

    - ``_ChunkedLogProbFunction``, the tiled lm_head that ``add_fused_lm_head`` installs on the
      policy and reference models (``GRPOTrainer`` in TRL >= 1.x computes every log-prob and the
      entropy through it), by ``fused_linear_token_logprobs``. Calls it cannot serve
      (logit soft-capping, the extra outputs ``log_sum_sq_probs``/``mean_logits``/``is_top1``,
      float64 outside autocast, DeepSpeed ZeRO-3) go to TRL's original.
    - ``selective_log_softmax`` (used on full logits by older ``GRPOTrainer`` versions and other
      trainers; also replaced in the trl modules loaded so far that imported it by name; a module
      importing it while patched calls TRL's own again once the patch is undone) by
      ``thinkfuse.grpo.selective_log_softmax``. Float64 logits and top-K indices go to TRL's.

    In trl 1.16, ``SFTTrainer`` and ``DPOTrainer``'s policy ask the fused lm_head for ``is_top1``
    (and ``mean_logits``), so they keep TRL's kernel; ``GRPOTrainer`` (policy and reference
    model) and ``DPOTrainer``'s reference model run on thinkfuse.

    Call it once before ``trainer.train()``, or use the result as a context manager::

        with thinkfuse.grpo.patch_trl():
            trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data)
            trainer.train()

    The loss itself stays TRL's (``loss_type``, ``beta``, ``epsilon*`` from ``GRPOConfig``): its
    formulas are the ones ``grpo_loss`` reproduces. TRL handles gradient accumulation and the
    gathering of a sharded lm_head (FSDP2 ``full_tensor``) before it calls the patched function.
    """
    patch = TrlPatch([])
    try:
        _replace_trl_functions(patch.replaced, backend)
    except BaseException:
        patch.undo()  # an error part way (e.g. a trl module failing to import): put back what was replaced
        raise
    if not patch.replaced:
        raise RuntimeError("patch_trl found neither _ChunkedLogProbFunction nor selective_log_softmax in trl")
    return patch


def _replace_trl_functions(replaced: list, backend) -> None:
    """patch_trl's replacements, each recorded in ``replaced`` as soon as it is made."""
    import importlib

    utils = importlib.import_module("trl.trainer.utils")

    def replace(module, name, new):
        if hasattr(module, name):
            replaced.append((module, name, getattr(module, name), new))
            setattr(module, name, new)

    original_chunked = getattr(utils, "_ChunkedLogProbFunction", None)
    if original_chunked is not None:
        replace(utils, "_ChunkedLogProbFunction", _trl_chunked_logprob(original_chunked, backend))
    original_selective = getattr(utils, "selective_log_softmax", None)
    if original_selective is not None:
        new_selective = _trl_selective_log_softmax(original_selective, backend)
        replace(utils, "selective_log_softmax", new_selective)
        importlib.import_module("trl.trainer.grpo_trainer")  # (older versions imported it by name)
        # Trainers that imported it by name (trl.experimental's CPO, ORPO, SDPO, ... in trl 1.16)
        # hold their own reference: replace it in every trl module loaded so far.
        for name, module in list(sys.modules.items()):
            # (the module's own names: a lazy module's getattr could import more of trl)
            if name.startswith("trl.") and module is not utils \
                    and getattr(module, "__dict__", {}).get("selective_log_softmax") is original_selective:
                replace(module, "selective_log_softmax", new_selective)


def _trl_selective_log_softmax(original, backend):
    def selective_log_softmax_(logits, index, temperature=1.0, row_mask=None):
        # top-K gathering, float64 logits (thinkfuse's ops take 16/32-bit floats), and calls after
        # the patch was undone (from a module that imported this by name while patched): TRL's own
        if index.dim() != logits.dim() - 1 or logits.dtype not in FLOAT_DTYPES \
                or getattr(selective_log_softmax_, "thinkfuse_retired", False):
            return _unretired(original)(logits, index, temperature=temperature, row_mask=row_mask)
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
            dtype = _trl_compute_dtype(hidden)
            # float64 (a float64 model outside autocast) is TRL's too: thinkfuse's ops take 16/32-bit floats
            if final_logit_softcapping is not None or not set(outputs) <= _SERVED_OUTPUTS or logit_scale <= 0 \
                    or dtype not in FLOAT_DTYPES or _zero3_enabled():
                return original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                      final_logit_softcapping, logit_scale, outputs)
            return _fused_trl_logprobs(hidden, weight, bias, targets, temperature / logit_scale,
                                       "entropy" in outputs, dtype, backend)

    return ThinkfuseChunkedLogProb


def _trl_compute_dtype(hidden: Tensor) -> torch.dtype:
    """TRL's fused lm_head contract: the matmul runs in the autocast dtype when autocast is on
    (TRL casts hidden and weight to it), else in hidden's dtype."""
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


def _fused_trl_logprobs(hidden, weight, bias, targets, temperature, return_entropy, dtype, backend):
    """TRL's fused lm_head in ``dtype`` (``_trl_compute_dtype``)."""
    device_type = hidden.device.type
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


__all__ = ["CLIPPED_LOSS_TYPES", "GRPOLoss", "IMPORTANCE_SAMPLING_LEVELS", "LOSS_TYPES", "TrlPatch", "VLLM_IS_MODES",
           "grpo_loss", "k3_kl", "patch_trl", "selective_log_softmax", "vllm_importance_sampling_ratio"]
