"""Model classes that transformers ships only as remote code, reimplemented here.

``import thinkfuse`` imports this package, which registers model_type "mimo" with AutoConfig;
the model classes are registered with AutoModel / AutoModelForCausalLM as soon as a MiMo config
is built (which every ``from_pretrained`` / ``from_config`` does first), so a local checkpoint
loads without ``trust_remote_code``. The modeling module itself is imported on first use: it
pulls in transformers' modeling stack and, through it, triton, which on a CPU machine must not
happen before TRITON_INTERPRET is settled.
"""

import importlib

from .configuration_mimo import MiMoConfig

_MODELING = ("MiMoForCausalLM", "MiMoMTPLayer", "MiMoMTPOutput", "MiMoModel")

__all__ = ["MiMoConfig", *_MODELING]


def __getattr__(name):
    if name in _MODELING:
        return getattr(importlib.import_module(".mimo", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
