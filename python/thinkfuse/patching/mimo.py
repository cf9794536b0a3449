"""MiMo-7B (thinkfuse.models.MiMoForCausalLM): the Qwen2 rules, applied to the trunk and to the
MTP layers alike.

An MTP layer is a Qwen2 decoder block (its norms, MLP and attention are Qwen2RMSNorm, Qwen2MLP
and Qwen2Attention instances) plus extra Qwen2RMSNorms and a plain Linear, so the Qwen2 table
covers every module that has a fused replacement; only the base model is MiMo's own class.
"""

from . import qwen2
from .forwards import loss_rule, positions_rule
from .rules import ModelFamily

_M = "thinkfuse.models.mimo."

FAMILY = ModelFamily(
    name="mimo",
    model_classes=(_M + "MiMoForCausalLM", _M + "MiMoModel"),
    rules=qwen2.RULES + (positions_rule(_M + "MiMoModel"), loss_rule(_M + "MiMoForCausalLM")),
)
