"""Per-instance patching of transformers models with thinkfuse ops, driven by rule tables
(one module per family: qwen2.py, mistral.py, ministral3.py)."""

from .engine import FAMILIES, PatchReport, UnsupportedModel, patch_model, supported_models, unpatch_model
from .rules import KINDS, ModelFamily, PatchRule

__all__ = [
    "FAMILIES",
    "KINDS",
    "ModelFamily",
    "PatchReport",
    "PatchRule",
    "UnsupportedModel",
    "patch_model",
    "supported_models",
    "unpatch_model",
]
