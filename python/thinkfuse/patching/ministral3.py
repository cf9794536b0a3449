"""Ministral 3 (3B/8B/14B): text-only Ministral3ForCausalLM, and the text model inside
Mistral3ForConditionalGeneration. The Pixtral vision tower and the multimodal projector are
left alone: the rules apply only below ``model.language_model``, which is a Ministral3Model
(or a MistralModel for Mistral-Small-3.x checkpoints, hence the mistral rules too).
"""

from . import mistral
from .forwards import (has_silu_activation, has_static_rope, link_rotary_embedding, loss_rule, positions_rule,
                       rms_norm_forward, rope_attention_with_positions_forward, swiglu_mlp_forward)
from .rules import ModelFamily, PatchRule, attention_rule

_M = "transformers.models.ministral3.modeling_ministral3."
_VLM = "transformers.models.mistral3.modeling_mistral3."

# The attention rule fuses the query temperature (llama_4_scaling_beta) into the rope kernel.
RULES = (
    PatchRule("rms_norm", _M + "Ministral3RMSNorm", rms_norm_forward),
    PatchRule("swiglu", _M + "Ministral3MLP", swiglu_mlp_forward, when=has_silu_activation),
    PatchRule("rope", _M + "Ministral3Attention", rope_attention_with_positions_forward, when=has_static_rope,
              setup=link_rotary_embedding),
    attention_rule(_M + "Ministral3Attention"),
    positions_rule(_M + "Ministral3Model"),
)

FAMILY = ModelFamily(
    name="ministral3",
    model_classes=(_M + "Ministral3ForCausalLM", _M + "Ministral3Model"),
    rules=RULES + (loss_rule(_M + "Ministral3ForCausalLM"),),
)


def _text_model(model):
    return model.model.language_model


VLM_FAMILY = ModelFamily(
    name="mistral3",
    model_classes=(_VLM + "Mistral3ForConditionalGeneration",),
    rules=RULES + mistral.RULES,
    root=_text_model,
)
