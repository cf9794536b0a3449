"""Qwen2 (Palmyra-mini, AM-Thinking-v1)."""

from .forwards import rms_norm_forward
from .rules import ModelFamily, PatchRule

_M = "transformers.models.qwen2.modeling_qwen2."

RULES = (PatchRule("rms_norm", _M + "Qwen2RMSNorm", rms_norm_forward),)

FAMILY = ModelFamily(
    name="qwen2",
    model_classes=(_M + "Qwen2ForCausalLM", _M + "Qwen2Model"),
    rules=RULES,
)
