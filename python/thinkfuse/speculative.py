"""Speculative decoding with MiMo's MTP layer as the drafter: ``mtp_generate``.

One step: the trunk verifies ``[pending token, draft]`` in one 2-token forward, ``mtp_verify``
accepts the draft or not and emits the target's token after it, then the MTP layer drafts the
next token from the trunk states it just got. Each step emits 1 or 2 tokens per row for one
trunk forward.

Alignment (see thinkfuse.models.mimo): the MTP row for position t reads the trunk state h_t and
the token at t+1 and predicts the token at t+2. After a step that emitted ``n + 1`` tokens
(``n`` accepted drafts), the MTP layer therefore consumes exactly the ``n + 1`` new *verified*
rows (h_L, x_{L+1}), ..., (h_{L+n}, x_{L+n+1}) and drafts from the last one: the MTP layer never
attends to a rejected token, so its own cache needs no rollback of its own.

Rollback with rows that accept different counts: both caches keep one slot layout, shared with a
2-D ``slot_mask`` (1 = the slot holds a verified token). A verify step appends two slots to every
row; a row that rejected the draft marks its second slot 0 (RoPE positions are explicit per row,
so the next token reuses the rejected one's position). The MTP cache gets the same two slots, the
second masked likewise. Once the MTP layer has consumed them, each rejecting row's slots are
rotated by one in both caches, so its dead last slot becomes its first: every row stays left
padding followed by its tokens in order, the layout ``generate`` itself decodes. That keeps
sliding windows exact (transformers counts a window in cache slots, and a hole inside a row would
narrow it) and lets thinkfuse's attention decode with per-row padding instead of unpadding the
caches. Rows never re-run anything. When every row rejected, the dead slot is cropped off the
trunk cache instead and the MTP layer gets one slot (so batch 1 never moves a slot). The price of
a rejection in a mixed batch is one padding slot per row and two copies of the rejecting rows'
caches.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from ._checks import check_float, check_generator
from .sampling import Sampling, pick, verify, warpers
from .static_decode import check_static_decode_applies, static_mtp_decode


def mtp_generate(
    model,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    attention_mask: Tensor | None = None,
    eos_token_id=None,
    generator: torch.Generator | None = None,
    cuda_graph: bool = False,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
):
    """Generate up to ``max_new_tokens`` tokens with MTP drafting and ``mtp_verify``.

    model: a ``thinkfuse.models.MiMoForCausalLM`` (patched or not). input_ids ``[B, P]``, left
    padded when ``attention_mask`` marks padding. ``eos_token_id`` (int or list; None: the
    model's ``generation_config.eos_token_id``, as ``generate``) ends a row; later positions
    hold the pad id (``generation_config.pad_token_id``, else the first eos id).

    Returns ``(sequences, stats)``: sequences ``[B, P + new]`` laid out like
    ``model.generate``'s output, new <= max_new_tokens. With temperature 0 they equal greedy
    ``generate`` token for token; with temperature > 0 the new tokens are distributed as
    sampling from ``softmax(logits / temperature)`` filtered by ``top_k`` / ``top_p`` /
    ``min_p`` when given, exactly as ``generate(do_sample=True, ...)`` filters (its classes,
    its order; greedy ignores them, as generate does). Unlike generate, nothing is taken from
    the generation config: generate's default top_k=50 applies only when passed. stats: ``accepted`` and ``drafted``
    (drafts offered to rows still generating), ``acceptance_rate``, ``target_forwards``
    (batched trunk forwards, prefill included), ``steps`` (verify steps) and ``new_tokens``.

    ``cuda_graph=True``: the same decoding (greedy, or sampled with the same filters and the same
    distribution) from static KV caches, each step replayed from a CUDA graph on a GPU
    (thinkfuse.static_decode), for host-bound small batches. It takes unpadded or left-padded
    prompts and float32/16-bit models (ValueError otherwise); on CPU its steps run eagerly.
    stats then also hold ``cuda_graph``: whether the steps were replays (False on CPU, or
    after a warning when the step could not be captured).
    """
    temperature = _check_args(model, input_ids, max_new_tokens, temperature, attention_mask)
    # the device type only: a model split over GPUs draws where its logits are, checked there
    check_generator(generator, torch.device(input_ids.device.type), "input_ids")
    sampling = Sampling(temperature, generator, warpers(top_k, top_p, min_p))
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
    if cuda_graph:
        check_static_decode_applies(model, attention_mask)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos_ids = _eos_ids(model, eos_token_id, input_ids.device)
    out = _NewTokens(input_ids.shape[0], max_new_tokens, eos_ids, _pad_id(model, eos_ids), input_ids.device)
    stats = {"accepted": 0, "drafted": 0, "target_forwards": 0, "steps": 0}
    if cuda_graph:
        stats["cuda_graph"] = False
    if max_new_tokens > 0:
        with torch.no_grad():
            if cuda_graph:
                stats = static_mtp_decode(model, input_ids, out, cuda_graph=True, attention_mask=attention_mask,
                                          sampling=sampling)
            else:
                _decode(model, input_ids, attention_mask.long(), sampling, out, stats)
    return torch.cat([input_ids, out.columns()], dim=1), _finish_stats(stats, out)


@dataclass
class _State:
    """What one verify step needs: the caches, which of their slots hold verified tokens, and
    per row the pending token (emitted, not yet fed to the trunk), its position and the draft
    for the token after it (with the draft's distribution when sampling)."""

    trunk_cache: DynamicCache
    mtp_cache: DynamicCache
    slot_mask: Tensor  # [B, slots] int64
    position: Tensor  # [B] int64
    pending: Tensor  # [B] int64
    draft: Tensor | None = None  # [B] int64
    draft_probs: Tensor | None = None  # [B, V] float32 (temperature > 0)
    dead_last_rows: Tensor | None = None  # rows whose last slot holds a rejected draft


@dataclass
class _MTPInput:
    """The rows the MTP layer consumes next: trunk states h_t, tokens t+1 and positions t of the
    slots just verified, and per row the slot to draft from (its last verified one; None: the
    last slot of every row)."""

    hidden: Tensor  # [B, S, H]
    next_ids: Tensor  # [B, S]
    positions: Tensor  # [B, S]
    draft_slot: Tensor | None = None  # [B]


def _decode(model, input_ids, attention_mask, sampling: Sampling, out, stats) -> None:
    state, mtp_input = _prefill(model, input_ids, attention_mask, sampling, out)
    stats["target_forwards"] += 1
    while not out.done():
        state.draft, state.draft_probs = pick(_mtp_logits(model, state, mtp_input), sampling)
        _move_dead_slots_to_the_front(state)
        mtp_input = _verify_step(model, state, sampling, out, stats)


def _prefill(model, input_ids, attention_mask, sampling: Sampling, out):
    """Run the prompt through the trunk and emit the first token. The MTP layer then catches up
    on the prompt: row t pairs h_t with token t+1, the last row with the token just emitted."""
    # Full layers even where the model has sliding-window ones: a sliding layer keeps only the
    # last window - 1 slots, one too few once a row's last slot is a rejected draft.
    trunk_cache = DynamicCache()
    positions = _prompt_positions(attention_mask)
    outputs, hidden = model.forward_with_pre_norm_hidden(
        input_ids, attention_mask=attention_mask, position_ids=positions,
        past_key_values=trunk_cache, use_cache=True, logits_to_keep=1,
    )
    first, _ = pick(outputs.logits[:, -1], sampling)
    out.append(first[:, None], torch.ones_like(first))
    state = _State(
        trunk_cache=trunk_cache,
        mtp_cache=DynamicCache(),
        slot_mask=attention_mask,
        position=attention_mask.sum(-1),
        pending=first,
    )
    next_ids = torch.cat([input_ids[:, 1:], first[:, None]], dim=1)
    return state, _MTPInput(hidden, next_ids, positions)


def _prompt_positions(attention_mask: Tensor) -> Tensor:
    """RoPE positions of a left-padded prompt, as ``generate`` derives them."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def _mtp_logits(model, state: _State, mtp_input: _MTPInput) -> Tensor:
    """``[B, V]``: the MTP layer's logits at each row's draft slot (its rows are appended to the
    MTP cache)."""
    logits = model.mtp_forward(
        mtp_input.hidden, mtp_input.next_ids, position_ids=mtp_input.positions,
        attention_mask=state.slot_mask, past_key_values=state.mtp_cache,
        logits_to_keep=1 if mtp_input.draft_slot is None else 0,
    ).logits
    if mtp_input.draft_slot is None:
        return logits[:, -1]
    return logits[torch.arange(logits.shape[0], device=logits.device), mtp_input.draft_slot]


def _verify_step(model, state: _State, sampling: Sampling, out, stats) -> _MTPInput:
    """Feed [pending, draft] to the trunk, accept or reject, update the caches' slots.

    Returns the MTP layer's next input: the slots this step verified (one when every row
    rejected, else two, a rejecting row's second slot masked).
    """
    batch = state.pending.shape[0]
    positions = state.position[:, None] + torch.arange(2, device=state.position.device)
    ones = torch.ones((batch, 2), dtype=state.slot_mask.dtype, device=state.slot_mask.device)
    outputs, hidden = model.forward_with_pre_norm_hidden(
        torch.stack([state.pending, state.draft], dim=1),
        attention_mask=torch.cat([state.slot_mask, ones], dim=1), position_ids=positions,
        past_key_values=state.trunk_cache, use_cache=True,
    )
    draft_probs = None if state.draft_probs is None else state.draft_probs[:, None]
    tokens, num_accepted = verify(state.draft[:, None], outputs.logits, sampling, draft_probs)
    generating = ~out.done_rows()
    stats["target_forwards"] += 1
    stats["steps"] += 1
    # counted on the device: an int() here would be one more host synchronisation per step
    stats["drafted"] = stats["drafted"] + generating.sum()
    stats["accepted"] = stats["accepted"] + (num_accepted * generating).sum()
    out.append(tokens, num_accepted + 1)

    accepted = num_accepted.bool()
    state.pending = tokens.gather(1, num_accepted[:, None])[:, 0]
    state.position = state.position + num_accepted + 1
    rejecting = (~accepted).nonzero()[:, 0]  # the step's one host synchronisation
    if rejecting.numel() == batch:
        # every row rejected: the draft's slot is dead everywhere, drop it from the trunk cache
        state.trunk_cache.crop(-1)
        state.slot_mask = torch.cat([state.slot_mask, ones[:, :1]], dim=1)
        return _MTPInput(hidden[:, :1], tokens[:, :1], positions[:, :1])
    state.slot_mask = torch.cat([state.slot_mask, ones[:, :1], accepted[:, None].to(ones.dtype)], dim=1)
    state.dead_last_rows = rejecting if rejecting.numel() else None
    # a rejecting row's second slot (rejected draft, no token after it) is masked: any id will do
    return _MTPInput(hidden, tokens.clamp(min=0), positions, draft_slot=num_accepted)


def _move_dead_slots_to_the_front(state: _State) -> None:
    """Rotate the slots of the rows whose last slot is a rejected draft by one, in both caches
    and the slot mask: the dead slot becomes padding in front of the row's tokens. Only those
    rows are copied, twice (out, and back shifted by one)."""
    rows = state.dead_last_rows
    if rows is None:
        return
    for cache in (state.trunk_cache, state.mtp_cache):
        for layer in cache.layers:
            if layer.is_initialized:  # (an MTP layer this generation does not run is not)
                _rotate_rows(layer.keys, rows)
                _rotate_rows(layer.values, rows)
    _rotate_rows(state.slot_mask, rows)
    state.dead_last_rows = None


def _rotate_rows(slots: Tensor, rows: Tensor) -> None:
    """``slots[rows]`` rolled by one along the slot dim in place (``[B, S]``, or a cache layer's
    ``[B, H, S, D]``): the last slot moves to the front."""
    dim = 1 if slots.dim() == 2 else 2
    count = slots.shape[dim]
    moved = slots.index_select(0, rows)
    slots.narrow(dim, 1, count - 1)[rows] = moved.narrow(dim, 0, count - 1)
    slots.narrow(dim, 0, 1)[rows] = moved.narrow(dim, count - 1, 1)


class _NewTokens:
    """The generated columns: per row, tokens up to its eos (or max_new_tokens), pad after."""

    def __init__(self, batch, max_new_tokens, eos_ids, pad_id, device):
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_ids
        self.tokens = torch.full((batch, max_new_tokens + 1), pad_id, dtype=torch.long, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)

    def done_rows(self) -> Tensor:
        return self.finished | (self.count >= self.max_new_tokens)

    def done(self) -> bool:
        return bool(self.done_rows().all())

    def append(self, new: Tensor, counts: Tensor) -> None:
        """Append ``new[r, :counts[r]]`` to each row still generating, stopping at eos."""
        for j in range(new.shape[1]):
            take = (j < counts) & ~self.done_rows()
            column = self.count.clamp(max=self.max_new_tokens)[:, None]
            current = self.tokens.gather(1, column)[:, 0]
            self.tokens.scatter_(1, column, torch.where(take, new[:, j], current)[:, None])
            # a comparison, not torch.isin: isin sorts (and syncs) from 10 ids up, which a CUDA
            # graph capture (static_decode) cannot take
            self.finished |= take & (new[:, j, None] == self.eos_ids).any(-1)
            self.count += take.long()

    def columns(self) -> Tensor:
        """``[B, new]``: as many columns as the longest row produced (generate's layout)."""
        return self.tokens[:, : int(self.count.max())]


def _finish_stats(stats: dict, out: _NewTokens) -> dict:
    stats["drafted"], stats["accepted"] = int(stats["drafted"]), int(stats["accepted"])
    stats["acceptance_rate"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0
    stats["new_tokens"] = int(out.count.sum())
    return stats


def _eos_ids(model, eos_token_id, device) -> Tensor:
    """The ids that end a row, 1-D: ``eos_token_id`` (an int, a list of ints, or an integer
    tensor, 0-d or 1-d, as generate takes), or the generation config's when None."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        eos_token_id = []
    ids = eos_token_id.reshape(-1).tolist() if isinstance(eos_token_id, Tensor) else eos_token_id
    if not isinstance(ids, (list, tuple)):
        ids = [ids]
    # checked here: torch.as_tensor would take floats, and fail on the rest without naming it
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"eos_token_id must be an int, a list of ints or an integer tensor, got {eos_token_id!r}")
    return torch.as_tensor([int(i) for i in ids], dtype=torch.long, device=device)


def _pad_id(model, eos_ids: Tensor) -> int:
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is not None:
        return int(pad)
    return int(eos_ids[0]) if eos_ids.numel() else 0


def _check_args(model, input_ids, max_new_tokens, temperature, attention_mask) -> float:
    if not callable(getattr(model, "mtp_forward", None)) or not getattr(model.model, "mtp_layers", None):
        raise TypeError(
            f"mtp_generate needs a thinkfuse.models.MiMoForCausalLM with MTP layers, got {type(model).__name__}"
        )
    _check_ids(model, input_ids, max_new_tokens)
    temperature = check_float("temperature", temperature, non_negative=True)
    _check_mask(input_ids, attention_mask)
    if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("attention_mask must mark left padding (every row's last token real)")
    return temperature


def _check_mask(input_ids: Tensor, attention_mask) -> None:
    """attention_mask: None, or a tensor of input_ids' shape on input_ids' device."""
    if attention_mask is None:
        return
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask must be on input_ids' device ({input_ids.device}), "
                         f"got {attention_mask.device}")


def _check_ids(model, input_ids, max_new_tokens) -> None:
    """input_ids ``[B, P]`` token ids of the model's vocabulary, B, P >= 1; max_new_tokens >= 0."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("input_ids must be a 2-D integer tensor [B, P]")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one row and one token per row, got shape "
                         f"{tuple(input_ids.shape)}")
    embedding = model.get_input_embeddings().weight.device
    # (an embedding offloaded by accelerate sits on meta until its hook moves it: nothing to compare)
    if embedding.type != "meta" and input_ids.device != embedding:
        raise ValueError(f"input_ids must be on the device of the model's input embeddings ({embedding}), "
                         f"got {input_ids.device}")
    vocab = model.config.vocab_size
    if input_ids.numel() and bool(((input_ids < 0) | (input_ids >= vocab)).any()):  # one sync, once
        raise ValueError(f"input_ids must be token ids in [0, {vocab}) (the model's vocab_size), got values in "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
