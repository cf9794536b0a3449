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
        super().__post_init__(**kwargs)
        # Every path to a MiMo model (AutoModel*.from_pretrained / from_config) builds this config
        # first: that is when the model classes get registered with the Auto classes.
        importlib.import_module("thinkfuse.models.mimo")


AutoConfig.register("mimo", MiMoConfig, exist_ok=True)
