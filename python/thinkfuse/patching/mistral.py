"""Mistral (Mistral-7B style, Ministral-8B-2410)."""

from .forwards import rms_norm_forward
from .rules import ModelFamily, PatchRule

_M = "transformers.models.mistral.modeling_mistral."

RULES = (PatchRule("rms_norm", _M + "MistralRMSNorm", rms_norm_forward),)

FAMILY = ModelFamily(
    name="mistral",
    model_classes=(_M + "MistralForCausalLM", _M + "MistralModel"),
    rules=RULES,
)
