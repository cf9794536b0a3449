"""MiMoConfig: kept apart from the modeling code so that ``import thinkfuse`` registers
model_type "mimo" without importing transformers' modeling stack (which imports triton: on a
CPU machine that must wait until TRITON_INTERPRET is settled, see thinkfuse.demo)."""

from __future__ import annotations

import importlib

from transformers import AutoConfig
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config

try:  # transformers >= 5 declares configs as strict dataclasses; subclasses must be too
    from huggingface_hub.dataclasses import strict as _strict_config
except ImportError:  # pragma: no cover - older huggingface_hub
    def _strict_config(cls):
        return cls


@_strict_config
class MiMoConfig(Qwen2Config):
    """Qwen2Config plus ``num_nextn_predict_layers``, the number of MTP layers (1 in MiMo-7B)."""

    model_type = "mimo"

    num_nextn_predict_layers: int = 1

    def __post_init__(self, **kwargs):
        # Checked here: the strict dataclass type check skips this field (its annotation is a
        # string under ``from __future__ import annotations``), and a bad value would otherwise
        # surface only in the model's range(), or as a model with no MTP layer at all.
        n = self.num_nextn_predict_layers
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"num_nextn_predict_layers must be an int, got {type(n).__name__} ({n!r})")
        if n < 0:
            raise ValueError(f"num_nextn_predict_layers must be >= 0, got {n}")
        super().__post_init__(**kwargs)
        # Every path to a MiMo model (AutoModel*.from_pretrained / from_config) builds this config
        # first: that is when the model classes get registered with the Auto classes.
        importlib.import_module("thinkfuse.models.mimo")

    def __setstate__(self, state):
        # Unpickling (e.g. a config sent to another process) skips __post_init__: register there too.
        self.__dict__.update(state)
        importlib.import_module("thinkfuse.models.mimo")


AutoConfig.register("mimo", MiMoConfig, exist_ok=True)
