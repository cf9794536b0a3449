"""thinkfuse: fused kernels for training and serving small dense reasoning models.

    import thinkfuse
    report = thinkfuse.patch_model(model)   # per-instance, reversible, matches the original within tolerance
    print(report)

Ops live in ``thinkfuse.ops``; each has a CUDA, a Triton and a pure-torch backend
(``thinkfuse.available_backends()``).
"""

__version__ = "0.1.0"

# Nothing imported here may import triton: TRITON_INTERPRET must still take effect when it is
# set after `import thinkfuse` (the demo and the tests rely on that).
from . import grpo, models, ops, reference, speculative, static_decode  # models: registers MiMo with Auto*
from .backend import (
    BackendUnavailable,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from .patching import PatchReport, UnsupportedModel, patch_model, unpatch_model
from .attention_interface import register_attention_with_transformers

# attn_implementation="thinkfuse": registered once transformers' modeling code is loaded
register_attention_with_transformers()

__all__ = [
    "BackendUnavailable",
    "PatchReport",
    "UnsupportedModel",
    "available_backends",
    "get_backend",
    "grpo",
    "models",
    "ops",
    "patch_model",
    "reference",
    "set_backend",
    "speculative",
    "static_decode",
    "unpatch_model",
    "use_backend",
]
