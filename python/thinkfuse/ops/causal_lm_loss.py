"""``thinkfuse.ops.causal_lm_loss``: transformers' causal-LM cross-entropy computed from the
final hidden states, without the ``[tokens, V]`` logits (nor their float32 copy) in memory.

Same result as ``ForCausalLMLoss(lm_head(hidden), labels, ...)`` of transformers: labels are
shifted left by one (or ``shift_labels`` given as is), ``ignore_index`` positions count for
nothing, and the summed negative log-likelihood is divided by the number of counted tokens, or
by ``num_items_in_batch`` when given (gradient accumulation). The log-probabilities come from
``fused_linear_token_logprobs``, so the logits are formed chunk by chunk in the activation dtype
(as the lm_head computes them) and reduced in float32 (as the loss upcasts them). When a gradient
is needed (outside torch.compile), the lm_head's gradients are formed in the same pass
(``ops.one_pass``): each chunk's logits are computed once, not again in the backward.
"""

from __future__ import annotations

import numbers

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_tensor
from .logprobs import fused_linear_logprobs_with_grads, fused_linear_token_logprobs
from .one_pass import one_pass_applies, one_pass_loss


def causal_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Optional[Tensor] = None,
    *,
    bias: Optional[Tensor] = None,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Mean next-token cross-entropy of ``hidden @ weight.T + bias`` against ``labels``.

    hidden ``[B, S, H]``; weight ``[V, H]`` (the lm_head's); labels ``[B, S]`` (unshifted, as
    given to a transformers model) or, instead, ``shift_labels`` ``[B, S]`` already aligned
    with ``hidden``. Returns a float32 scalar (NaN when no token counts and
    ``num_items_in_batch`` is None, as torch's mean cross-entropy).
    """
    targets = _shifted_targets(hidden, labels, shift_labels, ignore_index)
    check_tensor("weight", weight, ndim=2)
    counted = targets != ignore_index
    # Ignored positions become negative ids: the op gives them log-prob 0 and no gradient.
    ids = torch.where(counted, targets, torch.full_like(targets, -1))
    divisor = _poisoned_by_bad_labels(_divisor(counted, num_items_in_batch), targets, counted, weight.shape[0])
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad and one_pass_applies():
        return _one_pass(hidden, weight, bias, ids, counted, divisor, backend)
    logprobs = fused_linear_token_logprobs(hidden, weight, ids, bias=bias, backend=backend)
    return -logprobs.sum() / divisor


def _divisor(counted: Tensor, num_items_in_batch) -> Tensor:
    """What the summed negative log-likelihood is divided by: the counted tokens, or the caller's
    ``num_items_in_batch`` (tokens of the whole accumulated batch)."""
    if num_items_in_batch is None:
        return counted.sum().float()
    if isinstance(num_items_in_batch, Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, got shape "
                             f"{tuple(num_items_in_batch.shape)}")
    elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
        raise TypeError(f"num_items_in_batch must be None, a number or a tensor, got "
                        f"{type(num_items_in_batch).__name__}")
    return torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=counted.device).reshape(())


def _poisoned_by_bad_labels(divisor: Tensor, targets: Tensor, counted: Tensor, vocab: int) -> Tensor:
    """A label that is neither ignore_index nor a token id (transformers' cross-entropy fails on
    it) must not pass as a log-prob of 0: on the CPU it raises here; on a GPU, where looking would
    be a host sync, it makes the loss and its gradients NaN."""
    bad = counted & ((targets < 0) | (targets >= vocab))
    if targets.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad.any()):
            raise ValueError(f"labels hold {targets[bad][0].item()}, neither ignore_index nor a token id in "
                             f"[0, {vocab})")
        return divisor
    return torch.where(bad.any(), torch.full_like(divisor, float("nan")), divisor)


def _one_pass(hidden, weight, bias, ids, counted, divisor, backend):
    """The loss with its gradients formed in the forward (ops.one_pass): d loss / d logprob of a
    counted token is -1 / divisor, whatever the log-prob, so each chunk of logits is formed once."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    grad_per_token = -counted.reshape(-1).float() / divisor

    def compute(weight_grad):
        logprobs, d_hidden, d_weight, d_bias = fused_linear_logprobs_with_grads(
            rows, weight, ids.reshape(-1), lambda _lp, start, end: grad_per_token[start:end], bias=bias,
            weight_grad=weight_grad, backend=backend)
        return -logprobs.sum() / divisor, d_hidden.view(hidden.shape), d_weight, d_bias

    return one_pass_loss(hidden, weight, bias, compute)


def _shifted_targets(hidden, labels, shift_labels, ignore_index) -> Tensor:
    check_tensor("hidden", hidden, min_ndim=2)
    if (labels is None) == (shift_labels is None):
        raise ValueError("causal_lm_loss needs exactly one of labels and shift_labels")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    name, given = ("labels", labels) if shift_labels is None else ("shift_labels", shift_labels)
    check_tensor(name, given, dtypes=(torch.int32, torch.int64))
    limits = torch.iinfo(given.dtype)
    if not limits.min <= ignore_index <= limits.max:
        raise ValueError(f"ignore_index {ignore_index} does not fit {name}'s dtype {given.dtype}")
    if given.shape != hidden.shape[:-1]:
        raise ValueError(f"{name} shape {tuple(given.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if shift_labels is not None:
        return shift_labels.to(hidden.device)
    # Tokens < n predict n: the last position has no target.
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:].to(hidden.device)
