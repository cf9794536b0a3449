"""Mistral (Mistral-7B style, Ministral-8B-2410)."""

from .forwards import (has_silu_activation, has_static_rope, link_rotary_embedding, loss_rule, positions_rule,
                       rms_norm_forward, rope_attention_forward, swiglu_mlp_forward)
from .rules import ModelFamily, PatchRule, attention_rule

_M = "transformers.models.mistral.modeling_mistral."

RULES = (
    PatchRule("rms_norm", _M + "MistralRMSNorm", rms_norm_forward),
    PatchRule("swiglu", _M + "MistralMLP", swiglu_mlp_forward, when=has_silu_activation),
    PatchRule("rope", _M + "MistralAttention", rope_attention_forward, when=has_static_rope,
              setup=link_rotary_embedding),
    attention_rule(_M + "MistralAttention"),
    positions_rule(_M + "MistralModel"),
)

FAMILY = ModelFamily(
    name="mistral",
    model_classes=(_M + "MistralForCausalLM", _M + "MistralModel"),
    rules=RULES + (loss_rule(_M + "MistralForCausalLM"),),
)
