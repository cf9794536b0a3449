"""Replacement forwards bound onto transformers modules by the rule tables.

Each keeps the original forward's parameters and reads the module's own attributes (the
contract of Hugging Face's `kernels` library), so weights, names and state_dict are untouched.
The optional keyword-only ``backend`` is filled in by patch_model when a backend was named.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .. import ops
from ..rope_params import RopeParams, rope_params

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


def has_static_rope(module: nn.Module) -> bool:
    """The attention rule applies where inv_freq is fixed by the config (not dynamic/longrope,
    whose frequencies change with the sequence length at run time)."""
    params = getattr(module.config, "rope_parameters", None) or {}
    return params.get("rope_type", params.get("type", "default")) not in _RUNTIME_ROPE_TYPES


def _rope_params(module: nn.Module, device) -> RopeParams:
    """rope_params of the module's config with inv_freq on ``device``, cached on the module
    per device (so no host-to-device copy happens per call, and CUDA graphs can capture it)."""
    cache = module.__dict__.setdefault("_thinkfuse_rope", {})
    params = cache.get(device)
    if params is None:
        params = rope_params(module.config)
        params = cache[device] = dataclasses.replace(params, inv_freq=params.inv_freq.to(device))
    return params


def _rotate(module, query, key, position_embeddings, position_ids, backend):
    """Rotate q, k given as [B, S, H, D]; returns them as [B, H, S, D] like transformers."""
    params = _rope_params(module, query.device)
    if position_ids is None:  # transformers' models always pass them; keep their cos/sin if not
        if params.llama4_scaling is not None:
            raise ValueError("Ministral 3 attention needs position_ids for its query temperature")
        cos, sin = position_embeddings
        query, key = ops.apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=2, backend=backend)
    else:
        query, key = ops.rope(
            query, key, position_ids, params.inv_freq,
            attention_scaling=params.attention_scaling, llama4_scaling=params.llama4_scaling,
            backend=backend,
        )
    return query.transpose(1, 2), key.transpose(1, 2)


def rope_attention_forward(
    self, hidden_states, position_embeddings, attention_mask, past_key_values=None, *, backend=None, **kwargs
):
    """Forward of Qwen2Attention / MistralAttention / Ministral3Attention with the rotary
    embedding (and Ministral 3's query temperature) fused into one kernel; everything else,
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
    sliding_window = self.sliding_window if hasattr(self, "sliding_window") else getattr(
        self.config, "sliding_window", None
    )
    attn_output, attn_weights = attention_interface(
        self, query, key, value, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        sliding_window=sliding_window,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights
