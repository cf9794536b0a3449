"""Replacement forwards bound onto transformers modules by the rule tables.

Each keeps the original forward's parameters and reads the module's own attributes (the
contract of Hugging Face's `kernels` library), so weights, names and state_dict are untouched.
The optional keyword-only ``backend`` is filled in by patch_model when a backend was named.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect

import torch
from torch import nn

from .. import ops
from ..rope_params import RopeParams, llama4_scaling, rope_params

# Rope types whose inv_freq depends on the sequence length at run time: the attention rule does
# not apply to them (the unpatched module keeps using the model's own cos/sin).
_RUNTIME_ROPE_TYPES = ("dynamic", "longrope")


def rms_norm_forward(self, hidden_states, *, backend=None):
    """Forward of Qwen2RMSNorm / MistralRMSNorm / Ministral3RMSNorm (attributes weight,
    variance_epsilon)."""
    return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon, backend=backend)


def swiglu_mlp_forward(self, x, *, backend=None):
    """Forward of Qwen2MLP / MistralMLP / Ministral3MLP: ``down(silu(gate(x)) * up(x))``."""
    return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x), backend=backend))


def has_silu_activation(module: nn.Module) -> bool:
    """The MLP rule applies only where the activation really is SiLU."""
    return getattr(module.config, "hidden_act", None) in ("silu", "swish")


def attention_window(attn: nn.Module):
    """The sliding window an attention module's forward passes on, as transformers reads it: the
    module's own attribute (per layer, Qwen2), else its config's (Mistral, Ministral 3); None:
    full attention."""
    return attn.sliding_window if hasattr(attn, "sliding_window") else getattr(attn.config, "sliding_window", None)


def has_static_rope(module: nn.Module) -> bool:
    """The attention rule applies where inv_freq is fixed by the config (not dynamic/longrope,
    whose frequencies change with the sequence length at run time)."""
    params = getattr(module.config, "rope_parameters", None) or {}
    return params.get("rope_type", params.get("type", "default")) not in _RUNTIME_ROPE_TYPES


# the engine deletes "_thinkfuse_*" attributes at unpatch
_ROTARY_ATTR = "_thinkfuse_rotary"
_LLAMA4_SCALING_ATTR = "_thinkfuse_llama4_scaling"


def link_rotary_embedding(module: nn.Module, root: nn.Module) -> None:
    """Setup of the rope rule: remember the rotary embedding module that makes this attention's
    cos/sin (the one module under ``root`` holding an ``inv_freq`` buffer and the attention's
    config object: the base model's ``rotary_emb``, which MiMo's MTP layers share too). Kept in
    ``__dict__``, so it is not registered as a submodule. With it, the config's query
    temperature (Ministral 3), read once here: the frequencies then come from the buffer."""
    found = [m for m in root.modules()
             if "inv_freq" in m._buffers and m.__dict__.get("config") is module.config and m is not module]
    if len(found) == 1:
        module.__dict__[_ROTARY_ATTR] = found[0]
        module.__dict__[_LLAMA4_SCALING_ATTR] = llama4_scaling(module.config)


def _rope_params(module: nn.Module, device) -> RopeParams:
    """rope_params of the module's config with inv_freq on ``device``, cached on the module
    per device (so no host-to-device copy happens per call, and CUDA graphs can capture it).
    getattr/setattr rather than ``__dict__.setdefault``: torch.compile (2.11) cannot trace the
    latter."""
    cache = getattr(module, "_thinkfuse_rope", None)
    if cache is None:
        cache = {}
        setattr(module, "_thinkfuse_rope", cache)
    params = cache.get(device)
    if params is None:
        params = rope_params(module.config)
        params = cache[device] = dataclasses.replace(params, inv_freq=params.inv_freq.to(device))
    return params


def _rope_inputs(module: nn.Module, device):
    """``(inv_freq, attention_scaling, llama4_scaling)`` the module's rope runs with.

    With the model's rotary embedding module linked (the rope rule's setup), its ``inv_freq``
    buffer and ``attention_scaling`` as they are now, which is what transformers' cos/sin are
    made of: a model cast with ``model.to(torch.bfloat16)`` after construction holds a rounded
    inv_freq buffer (from_pretrained(dtype=...) keeps it in float32), and at position 1e5 the
    rounding moves angles by radians. Else (no single rotary module found) from the config.
    The query temperature always comes from the config, as Ministral 3's attention reads it.
    """
    rotary = getattr(module, _ROTARY_ATTR, None)
    if rotary is None:
        params = _rope_params(module, device)
        return params.inv_freq, params.attention_scaling, params.llama4_scaling
    inv_freq = rotary.inv_freq
    if inv_freq.device != device:  # layers dispatched over several devices
        inv_freq = inv_freq.to(device)
    return inv_freq, float(rotary.attention_scaling), getattr(module, _LLAMA4_SCALING_ATTR)


def _rotate(module, query, key, position_embeddings, position_ids, backend):
    """Rotate q, k given as [B, S, H, D]; returns them as [B, H, S, D] like transformers."""
    inv_freq, attention_scaling, llama4_scaling = _rope_inputs(module, query.device)
    if position_ids is None:  # transformers' models always pass them; keep their cos/sin if not
        if llama4_scaling is not None:
            raise ValueError("Ministral 3 attention needs position_ids for its query temperature")
        cos, sin = position_embeddings
        query, key = ops.apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=2, backend=backend)
    else:
        query, key = ops.rope(
            query, key, position_ids, inv_freq,
            attention_scaling=attention_scaling, llama4_scaling=llama4_scaling,
            backend=backend,
        )
    return query.transpose(1, 2), key.transpose(1, 2)


def rope_attention_forward(
    self, hidden_states, position_embeddings, attention_mask, past_key_values=None, *, backend=None, **kwargs
):
    """Forward of Qwen2Attention / MistralAttention (and, through
    rope_attention_with_positions_forward, Ministral3Attention) with the rotary embedding (and
    Ministral 3's query temperature) fused into one kernel; everything else,
    the KV cache and the configured attention implementation included, as in transformers."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape)
    key = self.k_proj(hidden_states).view(hidden_shape)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    query, key = _rotate(self, query, key, position_embeddings, kwargs.get("position_ids"), backend)

    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)

    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, eager_attention_forward
    )
    sliding_window = attention_window(self)
    attn_output, attn_weights = attention_interface(
        self, query, key, value, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        sliding_window=sliding_window,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def rope_attention_with_positions_forward(
    self, hidden_states, position_embeddings, attention_mask, position_ids, past_key_values=None, *, backend=None,
    **kwargs
):
    """Forward of Ministral3Attention, whose position_ids (read by its query temperature) are a
    parameter of its own, before past_key_values: a positional caller binds them there."""
    return rope_attention_forward(self, hidden_states, position_embeddings, attention_mask, past_key_values,
                                  backend=backend, position_ids=position_ids, **kwargs)


# --- causal LM: the loss from the hidden states ---------------------------------------------------


def has_linear_lm_head(module: nn.Module) -> bool:
    """The loss rule applies where the logits are a plain linear lm_head of the base model's
    output, with transformers' standard causal-LM loss (no softcapping, no custom loss_type).
    Checked at patch time and again in every forward: an adapter wrapping the lm_head after
    patching (LoRA), or an nn.Linear subclass with its own forward (quantized), computes logits
    that ``lm_head.weight`` alone does not give."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    head = getattr(module, "lm_head", None)
    return (
        isinstance(head, nn.Linear)
        and type(head).forward is nn.Linear.forward
        and hasattr(module, "model")
        and getattr(module.config, "final_logit_softcapping", None) is None
        and module.loss_function is ForCausalLMLoss
    )


def _original_forward(module: nn.Module):
    """The forward patch_model replaced: an instance-level one set before it (e.g. an
    accelerate hook), else the class's."""
    state = module.__dict__.get("_thinkfuse_patch")  # the engine's per-module state
    original = getattr(state, "original_forward", None)
    # functools.partial rather than types.MethodType: torch.compile traces through a partial
    # and breaks the graph at MethodType.
    return original if callable(original) else functools.partial(type(module).forward, module)


_BASE_MODEL_PARAMETERS = ("self", "input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds",
                          "use_cache")


def has_standard_base_model_forward(module: nn.Module) -> bool:
    """The positions rule applies where the class's forward takes the decoder base model's
    usual parameters (the ones generated_positions_forward passes on by name)."""
    parameters = tuple(inspect.signature(type(module).forward).parameters)
    return parameters[:len(_BASE_MODEL_PARAMETERS)] == _BASE_MODEL_PARAMETERS


def generated_positions_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                                inputs_embeds=None, use_cache=None, *, backend=None, **kwargs):
    """Forward of Qwen2Model / MistralModel / Ministral3Model / MiMoModel: the original one, run
    inside ``attention_interface.generated_positions()`` when the caller passes no position_ids.
    The model then makes them itself (``arange`` from the cache length), so they hold one
    sequence per row, and transformers' check for packed sequences (a host sync in every
    forward, which stalls the GPU until the host has queued work again) and the attention
    function's own check are skipped. The attention function learns it from a keyword the
    base model hands every layer (``GENERATED_POSITIONS_KWARG``), which torch.compile can trace
    (the context's ContextVar it cannot: under compile only the keyword is used, and
    transformers' check makes no host read there)."""
    from ..attention_interface import GENERATED_POSITIONS_KWARG, generated_positions

    if position_ids is None:
        kwargs[GENERATED_POSITIONS_KWARG] = True
    own_positions = position_ids is None and not torch.compiler.is_compiling()
    with generated_positions() if own_positions else contextlib.nullcontext():
        return _original_forward(self)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                                       use_cache=use_cache, **kwargs)


def positions_rule(module_class: str):
    """The "positions" rule for a decoder base model class (the same for every family)."""
    from .rules import PatchRule

    return PatchRule("positions", module_class, generated_positions_forward, when=has_standard_base_model_forward)


def _replaces_the_class_forward(module: nn.Module) -> bool:
    """Whether the forward patch_model replaced is the class's own: none was set on the
    instance, or accelerate's hook holds the class's forward as ``_old_forward``. An instance
    forward set before patching wraps it with behaviour of its own (TRL's trainers add a
    ``fused_lm_head=True`` mode that returns log-probs, accelerate's autocast wrapper a dtype
    context), which the fused loss, computed without calling it, would drop. False once the
    module is unpatched: a wrapper made while it was patched (TRL's, added after patch_model)
    still calls this replacement, which must then be the original forward again."""
    state = module.__dict__.get("_thinkfuse_patch")
    if state is None or "loss" not in state.kinds:
        return False
    original = getattr(state, "original_forward", None)
    return original is None or getattr(original, "__func__", None) is type(module).forward


def _fused_loss_applies(module: nn.Module, labels, logits_to_keep, kwargs) -> bool:
    """Training with labels, full-length logits and a ModelOutput return: the case where the
    logits tensor is only an intermediate of the loss (evaluation keeps its logits)."""
    return (
        module.training
        and labels is not None
        and isinstance(logits_to_keep, int) and logits_to_keep == 0
        and kwargs.get("return_dict", True) is not False
        and has_linear_lm_head(module)
        and _replaces_the_class_forward(module)
    )


def causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                      inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, *, backend=None,
                      **kwargs):
    """Forward of Qwen2 / Mistral / Ministral3 / MiMo ``*ForCausalLM``.

    In training with ``labels`` the loss is ``ops.causal_lm_loss`` of the base model's output
    (transformers' shifted, ignore_index-aware mean cross-entropy, ``num_items_in_batch`` and
    ``shift_labels`` honoured) and the output's ``logits`` is None: the ``[tokens, V]`` logits
    and their float32 copy are never held (Liger-Kernel's fused cross-entropy does the same).
    Everything else (inference, evaluation, ``logits_to_keep``) runs the original forward."""
    if not _fused_loss_applies(self, labels, logits_to_keep, kwargs):
        return _original_forward(self)(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, past_key_values=past_key_values,
                                       inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                       logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         **kwargs)
    shift_labels = kwargs.get("shift_labels")
    loss = ops.causal_lm_loss(
        outputs.last_hidden_state, self.lm_head.weight, None if shift_labels is not None else labels,
        bias=self.lm_head.bias, num_items_in_batch=kwargs.get("num_items_in_batch"),
        ignore_index=kwargs.get("ignore_index", -100), shift_labels=shift_labels, backend=backend,
    )
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def loss_rule(module_class: str):
    """The "loss" rule for a ``*ForCausalLM`` class (the same for every family)."""
    from .rules import PatchRule

    return PatchRule("loss", module_class, causal_lm_forward, when=has_linear_lm_head)

