"""Qwen2 (Palmyra-mini, AM-Thinking-v1); MiMo's trunk and MTP layers use the same modules."""

from .forwards import (has_silu_activation, has_static_rope, link_rotary_embedding, loss_rule, positions_rule,
                       rms_norm_forward, rope_attention_forward, swiglu_mlp_forward)
from .rules import ModelFamily, PatchRule, attention_rule

_M = "transformers.models.qwen2.modeling_qwen2."

RULES = (
    PatchRule("rms_norm", _M + "Qwen2RMSNorm", rms_norm_forward),
    PatchRule("swiglu", _M + "Qwen2MLP", swiglu_mlp_forward, when=has_silu_activation),
    PatchRule("rope", _M + "Qwen2Attention", rope_attention_forward, when=has_static_rope,
              setup=link_rotary_embedding),
    attention_rule(_M + "Qwen2Attention"),
    positions_rule(_M + "Qwen2Model"),
)
# The *ForCausalLM rule is separate: MiMo shares the decoder rules but has its own model class.
LOSS_RULES = (loss_rule(_M + "Qwen2ForCausalLM"),)

FAMILY = ModelFamily(
    name="qwen2",
    model_classes=(_M + "Qwen2ForCausalLM", _M + "Qwen2Model"),
    rules=RULES + LOSS_RULES,
)
