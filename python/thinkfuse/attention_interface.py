"""thinkfuse attention as a transformers attention implementation named ``"thinkfuse"``.

    import thinkfuse  # registers it (as soon as transformers' modeling code is loaded)
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="thinkfuse")
    # or: thinkfuse.patch_model(model), which selects it per instance for the text decoder

Two functions are registered, the way transformers wires ``flash_attention_2``:

- ``AttentionMaskInterface``: ``thinkfuse_attention_mask`` hands the 2-D padding mask through,
  like transformers' ``flash_attention_mask`` (without a mask: a ``[B, 0]`` marker saying that
  transformers found the mask plain causal, see ``_plain_causal_marker``; for a static cache
  with no mask, an int32 ``[B, 1, 1, 1]`` count of its written slots, see ``_key_count_marker``): our kernels take
  causality, sliding windows and packing as arguments, so no ``[B, 1, Sq, Sk]`` mask is ever
  built. Mask patterns that are not "causal + padding (+ window, + packing)" (image-token
  overlays, bidirectional masks) get the dense boolean mask of ``sdpa_mask`` instead.
  Registering a mask function matters: without one transformers hands every attention function
  ``attention_mask=None`` and padding is silently ignored.
- ``AttentionInterface``: ``thinkfuse_attention_forward(module, q [B,Hq,Sq,D], k/v
  [B,Hkv,Sk,D], attention_mask, ...) -> ([B,Sq,Hq,D], None)`` dispatches to
  ``ops.flash_attention`` (dense, or unpadded to the packed ``cu_seqlens`` form; packed rows
  found from position_ids, or given as flash_attention_2's ``cu_seq_lens_q/k`` kwargs) and, for
  inference decode steps, to ``ops.decode_attention``. Anything that is not a causal decoder
  self-attention (``module.is_causal`` False, e.g. a vision tower; a dense 4-D mask), inputs
  the kernels do not take (a head_dim outside ``SUPPORTED_HEAD_DIMS``, float64), and
  shape-only forwards on the meta device, run transformers' own sdpa instead. Dropout,
  logit soft-capping and attention sinks are not supported (sdpa has neither of the last two):
  a training forward with ``attention_dropout > 0``, or ``softcap`` / ``s_aux`` given, raise
  ValueError rather than silently computing something else.

The backend is the one ``patch_model(model, backend=...)`` chose for the module, else the
default (``thinkfuse.use_backend`` / ``THINKFUSE_BACKEND`` / fastest for the device).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.abc
import importlib.util
import numbers
import sys
import warnings
import weakref

import torch
import torch.nn.functional as F

from . import ops
from .backend import backend_for_op
from .ops.attention import MAX_DECODE_QUERIES, SUPPORTED_HEAD_DIMS, model_decode_backend, model_flash_backend

#: the name under which the implementation is registered with transformers
ATTN_IMPLEMENTATION = "thinkfuse"

# patch_model keeps its per-module state (the backend among it) under this attribute; read here
# by name so that this module does not import the patching engine (which imports this module).
_PATCH_STATE_ATTR = "_thinkfuse_patch"


# ---------------------------------------------------------------------------------------------
# Mask function


def _needs_dense_mask(kwargs) -> bool:
    """True when create_*_mask asks for a pattern our kernels cannot express with a padding
    mask: custom or/and overlays (transformers then sets use_vmap) or a bidirectional mask
    (create_bidirectional_mask is the only caller passing allow_is_bidirectional_skip)."""
    return bool(kwargs.get("use_vmap")) or "allow_is_bidirectional_skip" in kwargs


def _plain_causal_marker(kwargs):
    """What the mask function returns when transformers found a plain causal mask: no padding,
    no overlay, and (where it looked, see ``_packing_already_ruled_out``) no packed sequences.

    transformers decides packing itself before it calls the mask function (a host sync in
    ``find_packed_sequence_indices``) and only then allows the causal skip. Passing that decision
    on saves the attention function a second sync per forward. The marker is a ``[B, 0]`` bool
    mask, which allocates nothing; thinkfuse_attention_forward reads it as "no mask". Without the
    causal-skip allowance (packed rows, block overlays, compiled caches at q_length 1) the mask
    function returns None as before and the attention function decides packing on its own."""
    if not kwargs.get("allow_is_causal_skip", False) or kwargs.get("batch_size") is None:
        return None
    return torch.empty((kwargs["batch_size"], 0), dtype=torch.bool, device=kwargs.get("device"))


def _is_plain_causal_marker(attention_mask) -> bool:
    return attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] == 0


def _written_key_count(kwargs):
    """How many of the ``kv_length`` key slots hold tokens when that is fewer than all of them,
    else None. A static cache (``StaticCache``, ``generate(cache_implementation="static")``)
    hands the attention its whole buffer, ``max_cache_len`` slots, of which only the first
    ``q_offset + q_length`` are written; sdpa masks the rest through its causal mask, whose last
    row ends there. Static caches give q_offset as a device tensor (no graph break), so the count
    stays one too: an int32 scalar tensor. Older transformers pass cache_position instead."""
    kv_length, q_length = kwargs.get("kv_length"), kwargs.get("q_length")
    if kv_length is None or q_length is None or kv_length <= q_length:
        return None
    if kwargs.get("q_offset") is not None:
        end = kwargs["q_offset"] + q_length
    elif kwargs.get("cache_position") is not None:
        end = kwargs["cache_position"][-1] + 1
    else:
        return None
    count = end - (kwargs.get("kv_offset") or 0)
    if not isinstance(count, torch.Tensor):
        return count if count < kv_length else None
    return count


def _key_count_marker(count, kwargs) -> torch.Tensor:
    """The mask function's answer for "no padding, but only the first ``count`` key slots are
    written" (see _written_key_count): an int32 ``[B, 1, 1, 1]`` tensor of the count.

    4-D because generate feeds masks it made for a static cache (``create_masks_for_generate``)
    back into the model as its ``attention_mask``, and transformers passes 4-D masks on as they
    are, where a 2-D one would be cast to bool and read as padding. Real 4-D masks are bool or
    float, so int32 cannot be mistaken for one."""
    count = torch.as_tensor(count, dtype=torch.int32, device=kwargs.get("device"))
    return count.clamp(max=kwargs["kv_length"]).reshape(1, 1, 1, 1).expand(kwargs["batch_size"], 1, 1, 1)


def _is_key_count_marker(attention_mask) -> bool:
    return (attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1:] == (1, 1, 1)
            and attention_mask.dtype == torch.int32)


def thinkfuse_attention_mask(**kwargs):
    """Mask function for ``AttentionMaskInterface``: the 2-D padding mask (bool ``[B, kv_length]``)
    when there is one; without one, the plain-causal marker or None; the sdpa mask for patterns
    that are not causal.

    All arguments are keywords (that is how transformers' create_*_mask call it); they are
    forwarded unchanged to ``sdpa_mask`` when a dense mask is needed, which keeps this working
    across transformers versions whose mask functions take different arguments."""
    if _needs_dense_mask(kwargs):
        from transformers.masking_utils import sdpa_mask

        return sdpa_mask(**kwargs)
    attention_mask = kwargs.get("attention_mask")
    kv_length = kwargs.get("kv_length")
    if attention_mask is None:
        count = _written_key_count(kwargs)
        if count is not None and kwargs.get("batch_size") is not None:
            return _key_count_marker(count, kwargs)
        return _plain_causal_marker(kwargs)
    # Sliding-window caches keep only the last kv_length keys: keep the matching columns. Always
    # a new view, even of the whole mask: the attention function memoizes its padding plan per
    # mask object (see _memoized), and a view made here, once per forward, scopes that plan to
    # the layers of this forward. The caller's own tensor can come back in the next forward
    # with other values that its version counter did not record (written through .data or
    # numpy, or an inference tensor, which has no version counter).
    # Whether anything is padding is decided by the attention function, with the one host read
    # its unpad plan needs anyway (see _padding_plan), not here with a read of its own.
    return attention_mask[:, -kv_length:] if kv_length is not None else attention_mask[:, :]


# ---------------------------------------------------------------------------------------------
# Unpad / pad helpers (own versions of flash-attn's bert_padding, kept small)

# (tensor ref, tensor version, key, value) of the latest computations, newest last. Models that
# mix full and sliding-window layers alternate between two masks (one plan each); with fewer
# entries than the masks of a forward, every layer would evict the next one's plan and read the
# host again. Four leave room.
_memo_entries: list = []
_MEMO_SIZE = 4


def _memoized(tensor: torch.Tensor, extra: tuple, compute, *, made_per_forward: bool = False):
    """compute() once per (tensor, extra) while it is among the latest: every layer of one
    forward gets the same mask / position_ids tensor, and the plan reads values on the host.

    An entry is found again only for the same tensor object at the same version. Inference
    tensors (torch.inference_mode) keep no version counter, so an in-place write to one cannot
    be seen: they are memoized by identity only where the tensor is ``made_per_forward`` (the
    mask function's answers, a new object each forward), and computed each time otherwise."""
    if tensor.is_inference() and not made_per_forward:
        return compute()
    version = None if tensor.is_inference() else tensor._version
    for ref, entry_version, key, value in _memo_entries:
        if ref() is tensor and entry_version == version and key == extra:
            return value
    value = compute()
    _memo_entries.append((weakref.ref(tensor), version, extra, value))
    del _memo_entries[:-_MEMO_SIZE]
    return value


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def _unpad_data(valid: torch.Tensor, lengths: torch.Tensor, host_lengths: list[int]):
    """Indices of the valid tokens of a bool ``[B, S]`` mask in the flattened ``[B*S]`` axis,
    the int32 cu_seqlens of the rows, and the longest row. The row lengths are known on the
    host already, so nonzero_static needs no host read of its own."""
    indices = torch.nonzero_static(valid.flatten(), size=sum(host_lengths)).flatten()
    return indices, _cu_seqlens(lengths), max(host_lengths) if host_lengths else 0


class _PaddingPlan:
    """What attention under a padding mask needs, from one host read (the row lengths, run
    counts and last columns, read together), memoized per mask across the layers:

    - ``left_padding``: int32 ``[B]`` padding slots per row when every row is padding then
      tokens, the ``sq`` queries among the tokens (generate's left-padded batch), else None: a
      decode step hands it to the decode kernel, which skips the padding in place;
    - ``one_run``: every row's tokens form one run (padding only at its ends), so distances
      counted in packed tokens equal those counted in cache slots (sliding windows);
    - ``unpadded``: the unpad plans of the queries (the newest ``sq`` tokens: with a cache they
      end the key timeline, so the valid queries are the last valid keys of each row, as bottom-
      right causal alignment per sequence needs) and of the keys; built on first use, with no
      host read of its own."""

    def __init__(self, valid: torch.Tensor, sq: int, lengths: tuple, host_lengths: tuple, runs: list, last: list):
        self._valid, self._sq = valid, sq
        self._lengths, self._host_lengths = lengths, host_lengths
        self.one_run = max(runs) <= 1
        host_q = host_lengths[0]
        left_padded = self.one_run and all(last) and all(n == sq for n in host_q)
        self.left_padding = (valid.shape[1] - lengths[1]).to(torch.int32) if left_padded else None

    @functools.cached_property
    def unpadded(self):
        (lengths_q, lengths_k), (host_q, host_k) = self._lengths, self._host_lengths
        return (_unpad_data(self._valid[:, -self._sq:], lengths_q, host_q),
                _unpad_data(self._valid, lengths_k, host_k))


def _padding_plan(mask: torch.Tensor, sq: int) -> _PaddingPlan | None:
    """The plan of a ``[B, Sk]`` padding mask for ``sq`` queries (see _PaddingPlan); None when
    no key is padding. One host synchronisation."""
    valid = mask.bool()
    lengths_q = valid[:, -sq:].sum(-1, dtype=torch.int32)
    lengths_k = valid.sum(-1, dtype=torch.int32)
    runs = (valid & ~F.pad(valid[:, :-1], (1, 0), value=False)).sum(-1, dtype=torch.int32)
    host_q, host_k, host_runs, host_last = torch.stack([lengths_q, lengths_k, runs, valid[:, -1].int()]).tolist()
    if sum(host_k) == valid.numel():
        return None
    return _PaddingPlan(valid, sq, (lengths_q, lengths_k), (host_q, host_k), host_runs, host_last)


def _packed_plan(position_ids: torch.Tensor, batch: int, seq: int):
    """cu_seqlens of the sequences packed in the rows (position_ids restart inside a row, as
    padding-free training collators write them), or None when each row holds one sequence."""
    pos = position_ids.expand(batch, seq).reshape(-1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    starts[::seq] = True  # a row never continues the previous one
    bounds = torch.nonzero(starts, as_tuple=False).flatten()
    if bounds.numel() == batch:
        return None
    cu = torch.cat([bounds, bounds.new_tensor([pos.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _may_be_packed(module, q, k, kwargs) -> bool:
    """Whether position_ids may describe packed sequences (restarting positions in a row, as
    padding-free collators write them). transformers' masks (masking_utils) look for packing only
    when there is no 2-D mask and no cache; the attention function does not see the cache, but
    the decoder layers pass ``use_cache`` (True: the model made or was given one), and keys
    beyond the queries are cached ones. In inference that rule is followed exactly, so a patched
    model equals the unpatched one. In training a cache serves nothing (transformers makes one
    whenever the config's use_cache is on), so packed sequences are kept apart there as
    use_cache=False and flash_attention_2 keep them.
    """
    no_cached_keys = q.shape[1] == k.shape[1]
    return no_cached_keys and (module.training or not kwargs.get("use_cache", False))


#: Keyword the patched base model passes to every layer (hence to this attention function)
#: when it makes the position_ids itself: they cannot hold packed sequences.
GENERATED_POSITIONS_KWARG = "thinkfuse_generated_positions"


def _packing_already_ruled_out(plain_causal_marker: bool, kwargs) -> bool:
    """Whether packed sequences are known to be absent without reading position_ids: the model
    made its positions itself (``GENERATED_POSITIONS_KWARG``, which the positions rule passes
    to every layer; traceable, unlike the ``generated_positions`` context that only transformers'
    check needs), or transformers' own packing check found none (the mask function saw a plain causal mask, and no cache was in play:
    transformers looks for packing only without a 2-D mask and without a cache; ``use_cache``
    off means the model made none). With a cache in training, where this function keeps packed
    sequences apart although transformers does not look, the attention function checks itself."""
    return (plain_causal_marker and not kwargs.get("use_cache", False)) or kwargs.get(GENERATED_POSITIONS_KWARG, False)


# True while a patched base model runs a forward whose position_ids it makes itself.
_GENERATED_POSITIONS = contextvars.ContextVar("thinkfuse_generated_positions", default=False)


def _positions_are_generated() -> bool:
    """``generated_positions`` is on. Always False under torch.compile: dynamo cannot trace
    ContextVar.get (fullgraph compiles would fail, others break the graph), the positions rule
    does not set it there, and transformers does not look for packing while tracing."""
    return not torch.compiler.is_compiling() and _GENERATED_POSITIONS.get()


@contextlib.contextmanager
def generated_positions():
    """Within this context the running model forward makes its own position_ids (the caller
    passed none: ``arange`` from the cache length, one sequence per row), so nothing needs to
    look for packed sequences in them: transformers' ``find_packed_sequence_indices`` (a host
    sync per forward; see _skip_packing_check_for_generated_positions) answers None at once.
    Set by patch_model's "positions" rule around the base model's forward (which also tells the
    attention function, by ``GENERATED_POSITIONS_KWARG``)."""
    token = _GENERATED_POSITIONS.set(True)
    try:
        yield
    finally:
        _GENERATED_POSITIONS.reset(token)


def _skip_packing_check_for_generated_positions() -> None:
    """Wrap transformers' ``masking_utils.find_packed_sequence_indices`` (once, process-wide) so
    that it answers "no packed sequences" (None) without reading the device while
    ``generated_positions`` is on. Outside that context it is the original function; inside,
    its answer for such positions would be None too, after a host sync."""
    from transformers import masking_utils

    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None or getattr(original, "_thinkfuse_wrapped", False):
        return

    @functools.wraps(original)
    def find_packed_sequence_indices(position_ids):
        if _positions_are_generated():
            return None
        return original(position_ids)

    find_packed_sequence_indices._thinkfuse_wrapped = True
    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices


def _given_packing(kwargs):
    """``(cu_q, cu_k, max_q, max_k)`` when the caller passed the packed layout the way
    flash_attention_2 takes it (``cu_seq_lens_q/k``, ``max_length_q/k``: transformers'
    DataCollatorWithFlattening(return_flash_attn_kwargs=True), padding-free trainers), else
    None. As with flash_attention_2 they describe the rows of the batch laid end to end, and
    nothing has to be read from the device (max lengths given as ints)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return None
    if cu_q is None or cu_k is None:
        raise ValueError("thinkfuse attention: cu_seq_lens_q and cu_seq_lens_k must be given together")
    for name, cu in (("cu_seq_lens_q", cu_q), ("cu_seq_lens_k", cu_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"thinkfuse attention: {name} must be a 1-D int32 or int64 tensor, got "
                            f"{getattr(cu, 'dtype', type(cu).__name__)} {tuple(getattr(cu, 'shape', ()))}")
    return cu_q.int(), cu_k.int(), _max_length(kwargs, "max_length_q"), _max_length(kwargs, "max_length_k")


def _max_length(kwargs, name: str) -> int | None:
    """A ``max_length_*`` kwarg as a host int (None: the op derives it from cu_seqlens)."""
    value = kwargs.get(name)
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):  # numpy ints too
        return int(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value)  # a host read, as flash_attention_2 makes of it
    raise TypeError(f"thinkfuse attention: {name} must be an int, got {type(value).__name__} {value!r}")


def _pad(out: torch.Tensor, indices: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Scatter packed rows ``[total, H, D]`` back to ``[B, S, H, D]``; padding rows are zero
    (as in flash_attention_2). Differentiable."""
    full = out.new_zeros((batch * seq, *out.shape[1:]))
    return full.index_copy(0, indices, out).view(batch, seq, *out.shape[1:])


# ---------------------------------------------------------------------------------------------
# Attention function


def _module_backend(module, cuda_op: str):
    """The backend patch_model chose for ``module`` (None: the default), for an op whose CUDA
    kernel is ``cuda_op`` (see backend.backend_for_op)."""
    name = getattr(getattr(module, _PATCH_STATE_ATTR, None), "backend", None)
    if cuda_op == "flash_attention_fwd":
        return model_flash_backend(name)
    if cuda_op == "decode_attention":
        return model_decode_backend(name)
    return backend_for_op(name, cuda_op)


def _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, window, kwargs,
                   key_counts=None):
    """transformers' sdpa, for the attention our kernels do not cover (see the module doc).
    Our mask function's answers (a padding mask, the written-key count of a static cache, or
    no mask where sdpa_mask would have made one) become the dense mask sdpa_mask would have
    made: padding, causal, sliding window."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    padding = isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
    # Without a mask sdpa runs its own is_causal, which aligns the queries top-left and has no
    # window: queries after cached keys (chunked prefill, speculative verify) and sliding
    # windows need the dense mask, which our mask function does not make.
    causal_needs_mask = (attention_mask is None and is_causal
                         and (window is not None or query.shape[2] != key.shape[2]))
    if padding or key_counts is not None or causal_needs_mask:
        attention_mask = _dense_sdpa_mask(attention_mask if padding else None, key_counts, query.shape[0],
                                          query.shape[2], key.shape[2], is_causal, window, query.device)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _dense_sdpa_mask(padding, key_counts, batch: int, sq: int, sk: int, causal: bool, window,
                     device) -> torch.Tensor:
    """Bool ``[B, 1, Sq, Sk]`` (True = attend) from a 2-D padding mask, a key-count marker, or
    neither (every key written, none padding). The keys written so far end where the padding
    mask ends (a static cache's later slots are not keys) or at the count; the queries are the
    last ``Sq`` of them (bottom-right causal)."""
    cols = torch.arange(sk, device=device)
    if padding is not None:
        padding = padding.bool()[:, -sk:]
        written = torch.full((padding.shape[0],), padding.shape[1], device=device)
        valid = F.pad(padding, (0, sk - padding.shape[1]), value=False)
    else:
        written = key_counts.reshape(-1).long() if key_counts is not None else torch.full((batch,), sk, device=device)
        valid = cols[None, :] < written[:, None]
    mask = valid[:, None, None, :].expand(-1, 1, sq, sk)
    if causal:
        position = written[:, None] - sq + torch.arange(sq, device=device)  # [B, Sq]: each query's key position
        visible = cols <= position[..., None]
        if window:
            visible = visible & (cols > position[..., None] - window)
        mask = mask & visible[:, None]
    return mask


def _is_inference_decode_step(sq: int, sk: int, tensors) -> bool:
    """Few new queries against a longer cache, with no gradient to record: what the split-K
    decode kernel serves (and what compiled generate steps look like)."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return not grad and sq < sk and sq <= MAX_DECODE_QUERIES


def _compiled_padded_decode(query, key, value, attention_mask) -> bool:
    """An inference decode step with a padding mask, being compiled (generate with a static
    cache compiles those): the unpad plan reads the row lengths on the host, a graph break in
    every layer of every step (and an error under fullgraph), so such steps run sdpa with the
    mask made dense on the device instead. Eager decode steps and training keep the unpad path."""
    if attention_mask is None or attention_mask.dim() != 2 or not torch.compiler.is_compiling():
        return False
    return _is_inference_decode_step(query.shape[2], key.shape[2], (query, key, value))


def _check_inputs(query, key, value, attention_mask, dropout):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"thinkfuse attention: {name} must be a [B, H, S, D] tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if dropout:
        raise ValueError(
            f"thinkfuse attention does not implement dropout (got dropout={dropout}); set the config's "
            "attention_dropout to 0, or use attn_implementation='sdpa' for training with attention dropout"
        )
    if attention_mask is not None and attention_mask.dim() == 2:
        if attention_mask.shape[0] != query.shape[0]:
            raise ValueError(f"thinkfuse attention: attention_mask has batch {attention_mask.shape[0]}, "
                             f"query has batch {query.shape[0]}")
    elif attention_mask is not None and attention_mask.dim() != 4:
        raise ValueError("thinkfuse attention: attention_mask must be None, a 2-D padding mask [B, S] or a 4-D "
                         f"mask [B, 1, Sq, Sk], got shape {tuple(attention_mask.shape)}")


def _check_supported_features(kwargs):
    """Logit soft-capping and attention sinks: our kernels have neither, and transformers' sdpa
    raises on softcap and drops s_aux without a word, so neither can be handed on."""
    if kwargs.get("softcap") is not None:
        raise ValueError(f"thinkfuse attention does not implement logit soft-capping (got softcap="
                         f"{kwargs['softcap']}); use attn_implementation='eager' for this model")
    if kwargs.get("s_aux") is not None:
        raise ValueError("thinkfuse attention does not implement attention sinks (got s_aux); use "
                         "attn_implementation='eager' for this model")


def _warn_if_weights_asked(kwargs):
    """Fused attention never forms the attention weights, so output_attentions gets none (as
    with sdpa, which warns too): say so rather than hand back an empty tuple without a word."""
    if kwargs.get("output_attentions"):
        warnings.warn("thinkfuse attention returns no attention weights (output_attentions=True gets none); "
                      "use attn_implementation='eager' (or thinkfuse.unpatch_model) to read them", stacklevel=3)


# The dtypes the flash and decode kernels take (the ops raise on others, e.g. float64).
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels_take(query, key, value) -> bool:
    """Whether the flash / decode ops take these inputs: one head_dim of SUPPORTED_HEAD_DIMS
    for q, k and v, and a dtype of _KERNEL_DTYPES. patch_model leaves attention modules with
    other head dims on their configured implementation; a model configured with
    attn_implementation="thinkfuse" runs sdpa for them instead of failing."""
    head_dim = query.shape[-1]
    return (head_dim in SUPPORTED_HEAD_DIMS and key.shape[-1] == value.shape[-1] == head_dim
            and query.dtype in _KERNEL_DTYPES)


def _window(sliding_window):
    # transformers passes None (or 0 in some configs) for full attention.
    return int(sliding_window) if sliding_window else None


def _dense(q, k, v, scaling, window, backends, key_count_marker=None):
    """No padding: one dense call; Sq < Sk (a KV cache) is bottom-right causal, as caches need.
    Inference decode steps use the split-K decode kernel. With a key-count marker only the
    first keys of each row are written (a static cache): the decode kernel takes the count as
    a device tensor (no host read, so static-cache decoding stays capturable); other calls read
    it once per forward and cut the keys there."""
    if _is_inference_decode_step(q.shape[1], k.shape[1], (q, k, v)):
        seqlens = key_count_marker.reshape(-1).contiguous() if key_count_marker is not None else None
        return _decode(q, k, v, scaling, window, backends, seqlens)
    if key_count_marker is not None:
        written = _memoized(key_count_marker, ("written keys",), lambda: int(key_count_marker[0, 0, 0, 0]),
                            made_per_forward=True)
        k, v = k[:, :written], v[:, :written]
    return ops.flash_attention(q, k, v, causal=True, softmax_scale=scaling, sliding_window=window,
                               backend=backends["flash_attention_fwd"])


def _decode(q, k, v, scaling, window, backends, seqlens=None, leftpad=None):
    """The split-K decode kernel over each row's keys ``[leftpad, seqlens)`` (defaults: the
    whole cache), read in place."""
    if seqlens is None:
        seqlens = torch.full((q.shape[0],), k.shape[1], dtype=torch.int32, device=q.device)
    return ops.decode_attention(q, k, v, seqlens, softmax_scale=scaling, sliding_window=window,
                                cache_leftpad=leftpad, backend=backends["decode_attention"])


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, scaling, window, backends):
    return ops.flash_attention(q, k, v, causal=True, softmax_scale=scaling, sliding_window=window,
                               cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
                               backend=backends["flash_attention_fwd"])


def _rows_end_to_end(q, k, v, cu_q, cu_k, max_q, max_k, scaling, window, backends):
    """Packed sequences: the batch's rows laid end to end (``[B*S, H, D]``) and cut by
    cu_seqlens, run varlen, back to ``[B, Sq, Hq, D]``."""
    flat_q, flat_k, flat_v = (t.reshape(-1, *t.shape[2:]) for t in (q, k, v))
    return _varlen(flat_q, flat_k, flat_v, cu_q, cu_k, max_q, max_k, scaling, window, backends).view(q.shape)


def _padded(q, k, v, mask, scaling, window, backends):
    """Padded batch: unpad to the packed form, run varlen, scatter back (zeros at padding); a
    mask without padding runs dense (transformers looks for packed sequences only without a
    mask, so neither does this). None for what unpadding cannot do: a sliding window over a row
    with padding between its tokens (tokens appended after right padding, or a hole), where
    the window counts cache slots (as sdpa does) and the packed form would count tokens."""
    batch, sq, hq, d = q.shape
    if mask.shape[1] > k.shape[1]:
        mask = mask[:, -k.shape[1]:]
    elif mask.shape[1] < k.shape[1]:
        # A static cache holds more slots than tokens seen so far: the unused slots are not keys.
        k, v = k[:, :mask.shape[1]], v[:, :mask.shape[1]]
    sk = k.shape[1]
    # The mask is the mask function's view, a new object each forward (see thinkfuse_attention_mask).
    plan = _memoized(mask, (sq, sk), lambda: _padding_plan(mask, sq), made_per_forward=True)
    if plan is None:  # nothing is padding
        return _dense(q, k, v, scaling, window, backends)
    if plan.left_padding is not None and _is_inference_decode_step(sq, sk, (q, k, v)):
        # A left-padded batch decoding (generate's usual case): the decode kernel skips each row's
        # padding in place, where unpadding would copy the whole K/V cache of every layer.
        return _decode(q, k, v, scaling, window, backends, leftpad=plan.left_padding)
    if window and not plan.one_run:
        return None
    (idx_q, cu_q, max_q), (idx_k, cu_k, max_k) = plan.unpadded
    q_packed = q.reshape(batch * sq, hq, d).index_select(0, idx_q)
    k_packed = k.reshape(batch * sk, *k.shape[2:]).index_select(0, idx_k)
    v_packed = v.reshape(batch * sk, *v.shape[2:]).index_select(0, idx_k)
    out = _varlen(q_packed, k_packed, v_packed, cu_q, cu_k, max_q, max_k, scaling, window, backends)
    return _pad(out, idx_q, batch, sq)


def thinkfuse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Sk, D]`` (GQA not
    repeated) -> (``[B, Sq, Hq, D]`` contiguous, None)."""
    _check_inputs(query, key, value, attention_mask, dropout)
    _check_supported_features(kwargs)
    _warn_if_weights_asked(kwargs)
    plain_causal = _is_plain_causal_marker(attention_mask)
    if plain_causal:
        attention_mask = None
    key_counts = attention_mask if _is_key_count_marker(attention_mask) else None
    if key_counts is not None:
        attention_mask = None
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    dense_mask = attention_mask is not None and attention_mask.dim() == 4
    # Meta tensors (shape-only forwards: memory planners, FLOP counters) have no values to
    # unpad or split packed sequences by; sdpa gives the same output shape.
    meta = query.device.type == "meta"
    if (not is_causal or dense_mask or not _kernels_take(query, key, value) or query.shape[2] > key.shape[2]
            or meta or _compiled_padded_decode(query, key, value, attention_mask)):
        return _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                              _window(sliding_window), kwargs, key_counts)

    backends = {op: _module_backend(module, op) for op in ("flash_attention_fwd", "decode_attention")}
    window = _window(sliding_window)
    # Our kernels take [B, S, H, D]; the transposes are views (the ops accept strided inputs).
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    batch, sq = q.shape[:2]

    if attention_mask is not None:
        out = _padded(q, k, v, attention_mask, scaling, window, backends)
        if out is None:
            return _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, window,
                                  kwargs)
    elif key_counts is not None:
        out = _dense(q, k, v, scaling, window, backends, key_counts)
    elif (given := _given_packing(kwargs)) is not None:
        out = _rows_end_to_end(q, k, v, *given, scaling, window, backends)
    else:
        position_ids = kwargs.get("position_ids")
        plan = None
        if (position_ids is not None and sq > 1 and _may_be_packed(module, q, k, kwargs)
                and not _packing_already_ruled_out(plain_causal, kwargs)):
            plan = _memoized(position_ids, (batch, sq), lambda: _packed_plan(position_ids, batch, sq))
        if plan is None:
            out = _dense(q, k, v, scaling, window, backends)
        else:
            cu, max_len = plan
            out = _rows_end_to_end(q, k, v, cu, cu, max_len, max_len, scaling, window, backends)
    return out.contiguous(), None


_TRANSFORMERS_ATTENTION_MODULE = "transformers.modeling_utils"  # holds AttentionInterface


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """One-shot import hook: runs register_attention right after transformers.modeling_utils
    has been executed, so that ``attn_implementation="thinkfuse"`` works after a plain
    ``import thinkfuse`` without that import loading transformers' modeling code (seconds, and
    triton, which must stay unimported so that TRITON_INTERPRET set later still works)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TRANSFORMERS_ATTENTION_MODULE:
            return None
        sys.meta_path.remove(self)  # one shot; the lookup below must not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run_module = spec.loader.exec_module

            def exec_module(module):
                run_module(module)
                register_attention()

            spec.loader.exec_module = exec_module
        return spec


def register_attention_with_transformers() -> None:
    """Register "thinkfuse" with transformers now if its modeling code is loaded, else as soon
    as it is (``import thinkfuse`` calls this)."""
    if _TRANSFORMERS_ATTENTION_MODULE in sys.modules:
        register_attention()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def register_attention() -> None:
    """Register ``"thinkfuse"`` with transformers' attention and mask interfaces (idempotent;
    registration is global, per process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, thinkfuse_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, thinkfuse_attention_mask)
    _skip_packing_check_for_generated_positions()
