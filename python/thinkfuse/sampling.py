"""How speculative decoding chooses tokens, shared by ``mtp_generate``'s dynamic-cache loop
(thinkfuse.speculative) and its static, CUDA-graph engine (thinkfuse.static_decode).

``Sampling`` says how: argmax at temperature 0, else a sample of ``softmax(logits /
temperature)`` filtered by generate's own warpers (top-k, top-p, min-p). ``pick`` chooses the
next token (with its distribution, which verification needs for a sampled draft); ``verify``
runs ``mtp_verify`` on the target's logits as that distribution sees them.

Nothing here reads the host: under a CUDA graph the draws come from the generator's state,
which a capture registers (static_decode._capture).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops, reference
from ._checks import check_float


# Below this temperature, logits / temperature may overflow float32 (logits up to 1e18 cannot
# above it). Sampling.scores then gives an overflowing row its limit, and verify hands mtp_verify
# those scores at temperature 1: the kernels' own division would reject every draft, right ones
# included. Above it neither costs a pass over the logits.
OVERFLOW_TEMPERATURE = 1e-20


@dataclass
class Sampling:
    """How tokens are chosen: argmax (temperature 0), or a sample of the softmax of the logits
    divided by the temperature, then filtered by generate's warpers (top-k, top-p, min-p; None:
    none). Drafts and targets are filtered alike, so the draft distribution mtp_verify gets is the
    one the draft was sampled from, and the verified tokens follow the filtered target."""

    temperature: float
    generator: torch.Generator | None = None
    warpers: object | None = None  # transformers LogitsProcessorList

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def scores(self, logits: Tensor) -> Tensor:
        """``logits`` ``[..., V]`` as the sampled distribution's logits: divided by the
        temperature and filtered (float32; filtered entries -inf)."""
        logits = logits.float()
        scores = logits / self.temperature  # generate's division, so the warpers see its scores
        if self.temperature < OVERFLOW_TEMPERATURE:
            scores = _limit_where_overflowed(logits, scores)
        if self.warpers is None:
            return scores
        return self.warpers(None, scores.reshape(-1, scores.shape[-1])).view(scores.shape)


def _limit_where_overflowed(logits: Tensor, scores: Tensor) -> Tensor:
    """A row whose largest score overflowed float32 (or is NaN: a temperature below float32's
    range divides by 0) would make softmax NaN; its distribution is then, to float32, its limit:
    uniform over its largest logits."""
    limit = torch.where(logits == logits.amax(dim=-1, keepdim=True), 0.0, float("-inf"))
    return torch.where(scores.amax(dim=-1, keepdim=True).isfinite(), scores, limit)


def warpers(top_k=None, top_p=None, min_p=None):
    """generate's sampling warpers for these settings, in generate's order (after the
    temperature: top-k, top-p, min-p), or None when they filter nothing. transformers' own
    classes, so the filtering (ties at the k-th logit kept, at least one token kept) is
    generate's."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    chosen = LogitsProcessorList()
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be None or an int >= 0 (0: no top-k filtering), got {top_k!r}")
        if top_k > 0:
            chosen.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        top_p = check_float("top_p", top_p, non_negative=True)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1: no top-p filtering), got {top_p}")
        if top_p < 1:
            chosen.append(TopPLogitsWarper(top_p))
    if min_p is not None:
        min_p = check_float("min_p", min_p, non_negative=True)
        if min_p > 1:
            raise ValueError(f"min_p must lie in [0, 1], got {min_p}")
        if min_p > 0:
            chosen.append(MinPLogitsWarper(min_p))
    return chosen or None


def pick(logits: Tensor, sampling: Sampling) -> tuple[Tensor, Tensor | None]:
    """The next token per row of ``logits`` ``[B, V]``: argmax, or a sample of the sampled
    distribution (returned with that distribution, which mtp_verify needs for a sampled draft)."""
    if sampling.greedy:
        return logits.argmax(dim=-1), None
    probs = torch.softmax(sampling.scores(logits), dim=-1)
    return _sample(probs, sampling.generator), probs


def _sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One index per row drawn from ``probs`` ``[B, V]``: ``argmax(probs / E)`` with ``E``
    i.i.d. Exponential(1) picks ``i`` with probability ``probs[i]`` (the exponential race). It is
    what ``torch.multinomial`` does for one sample, without multinomial's checks of the
    probabilities, which some torch versions read back to the host: a host read cannot be captured
    in a CUDA graph."""
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)


def verify(draft: Tensor, logits: Tensor, sampling: Sampling, draft_probs: Tensor | None):
    """``ops.mtp_verify`` of ``draft`` ``[B, K]`` against ``logits`` ``[B, K+1, V]``; float64
    models (the kernels take 16/32-bit floats) verify with the reference, so greedy decoding stays
    exact there too. With warpers the target's filtered scores are verified at temperature 1
    (they hold the temperature already)."""
    temperature, generator = sampling.temperature, sampling.generator
    if temperature > 0 and (sampling.warpers is not None or temperature < OVERFLOW_TEMPERATURE):
        logits, temperature = sampling.scores(logits), 1.0
    if logits.dtype != torch.float64:
        return ops.mtp_verify(draft, logits, temperature=temperature, draft_probs=draft_probs, generator=generator)
    uniforms = None
    if temperature > 0:
        uniforms = torch.rand(draft.shape[0], draft.shape[1] + 1, generator=generator, device=logits.device)
    return reference.mtp_verify(draft, logits, temperature, draft_probs, uniforms)
