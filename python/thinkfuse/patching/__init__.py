"""Per-instance patching of transformers models with thinkfuse ops, driven by rule tables
(one module per family: qwen2.py, mistral.py, ministral3.py).

The "thinkfuse" attention implementation (thinkfuse.integrations), which the "attention" rules
select per model instance, is registered with transformers by patch_model, by
``import thinkfuse.integrations``, and here when transformers' modeling code is already loaded.
Not unconditionally: importing transformers.modeling_utils imports triton, and `import thinkfuse`
must not (TRITON_INTERPRET must still take effect when set after it, as in `python -m thinkfuse.demo`).
"""

import sys

from .engine import FAMILIES, PatchReport, UnsupportedModel, patch_model, supported_models, unpatch_model
from .rules import KINDS, ModelFamily, PatchRule
from ..attention_interface import register_attention

if "transformers.modeling_utils" in sys.modules:
    register_attention()

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
