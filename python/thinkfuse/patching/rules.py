"""The data model of patching: rules (module class -> replacement forward) grouped by family.

A family's table says which top-level model classes it covers, which submodule the rules
apply to (the text model of a multimodal wrapper), and which module classes get which
replacement forward. Adding a model family means adding a table, not code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

# Kinds of rules, in report order; patch_model's keyword flags have the same names, except
# "positions" (the base model's forward, see forwards.generated_positions_forward), which goes
# with the attention flag.
KINDS = ("rms_norm", "swiglu", "rope", "attention", "positions", "loss")


@dataclass(frozen=True)
class PatchRule:
    """One rule. Kind "attention" replaces no forward: it selects the attention implementation
    registered with transformers as "thinkfuse" (thinkfuse.integrations) for the module, through
    the module's own config object (per model instance; the rope rule's forward and the original
    forward both dispatch on it), so its ``forward`` is None."""

    kind: str  # one of KINDS
    module_class: str  # dotted path, e.g. "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm"
    forward: Callable | None  # replacement forward(self, ...): same parameters as the original
    # Optional predicate on the module instance: the rule applies only where it holds (e.g. the
    # MLP rule only where the activation is SiLU).
    when: Callable[[nn.Module], bool] | None = None
    # Optional setup(module, root), called once when the rule is applied, with the family's root
    # module (e.g. to find a sibling module the forward reads). Whatever it stores on the module
    # goes in its __dict__ under the "_thinkfuse_" prefix, which unpatch_model deletes.
    setup: Callable[[nn.Module, nn.Module], None] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"PatchRule.kind must be one of {KINDS}, got {self.kind!r}")
        if (self.forward is None) != (self.kind == "attention"):
            raise ValueError(f"PatchRule {self.kind!r}: only 'attention' rules come without a forward")


def is_causal_attention(module: nn.Module) -> bool:
    """The attention rule applies to causal decoder self-attention only (vision towers and other
    bidirectional attention keep their own implementation), with a head_dim the flash / decode
    attention ops support (others keep the configured implementation)."""
    from ..ops.attention import SUPPORTED_HEAD_DIMS

    head_dim = getattr(module, "head_dim", None)
    return (bool(getattr(module, "is_causal", False)) and hasattr(module, "config")
            and head_dim in SUPPORTED_HEAD_DIMS)


def attention_rule(module_class: str) -> PatchRule:
    """The "attention" rule for an attention module class (the same for every family)."""
    return PatchRule("attention", module_class, None, when=is_causal_attention)


def _whole_model(model: nn.Module) -> nn.Module:
    return model


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_classes: tuple[str, ...]  # dotted paths of the model classes this family covers
    rules: tuple[PatchRule, ...]
    # The submodule the rules are applied to (e.g. only the text model of a VLM).
    root: Callable[[nn.Module], nn.Module] = field(default=_whole_model)


def resolve_class(dotted: str) -> type | None:
    """Import ``package.module.Class``; None when this transformers version lacks it."""
    module_name, _, class_name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None


def short_name(dotted: str) -> str:
    return dotted.rpartition(".")[2]
