"""thinkfuse: fused kernels for training and serving small dense reasoning models.

    import thinkfuse
    report = thinkfuse.patch_model(model)   # per-instance, reversible, exact to the original
    print(report)

Ops live in ``thinkfuse.ops``; each has a CUDA, a Triton and a pure-torch backend
(``thinkfuse.available_backends()``).
"""

__version__ = "0.1.0"

from . import ops, reference
from .backend import (
    BackendUnavailable,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from .patching import PatchReport, UnsupportedModel, patch_model, unpatch_model
from . import models  # registers MiMo with transformers' Auto classes

__all__ = [
    "BackendUnavailable",
    "PatchReport",
    "UnsupportedModel",
    "available_backends",
    "get_backend",
    "models",
    "ops",
    "patch_model",
    "reference",
    "set_backend",
    "unpatch_model",
    "use_backend",
]
