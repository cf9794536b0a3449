"""Tiny random models of every supported family, built in-process (nothing is downloaded).

Used by the demo and the tests: hidden 64, 2 layers, 4 heads / 2 kv heads, vocab 256. Norm
weights are randomised (transformers initialises them to ones, which would hide a kernel that
ignores the weight), and the attention is sharpened (``sharpen_attention``), so that the
outputs depend on it.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 256

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)

# Ministral 3 with a small original context, so the YaRN ramp and the llama4 query
# temperature are active within a few hundred positions.
_MINISTRAL3_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 1_000_000.0,
    "factor": 16.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
}


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_COMMON, tie_word_embeddings=True))


def _mimo():
    from .models import MiMoConfig, MiMoForCausalLM

    return MiMoForCausalLM(MiMoConfig(**_COMMON, tie_word_embeddings=False, num_nextn_predict_layers=1))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=None))


def _ministral3_config():
    from transformers import Ministral3Config

    return Ministral3Config(**{**_COMMON, "max_position_embeddings": 512}, rope_parameters=dict(_MINISTRAL3_ROPE))


def _ministral3():
    from transformers import Ministral3ForCausalLM

    return Ministral3ForCausalLM(_ministral3_config())


def _mistral3():
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig

    vision = PixtralVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        head_dim=16, image_size=32, patch_size=8,
    )
    config = Mistral3Config(text_config=_ministral3_config(), vision_config=vision, image_token_index=VOCAB - 1)
    return Mistral3ForConditionalGeneration(config)


BUILDERS = {
    "qwen2": _qwen2,
    "mimo": _mimo,
    "mistral": _mistral,
    "ministral3": _ministral3,
    "mistral3": _mistral3,
}


def randomize_norm_weights(model: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))


def tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny random model of ``family`` (one of BUILDERS), in eval mode."""
    if family not in BUILDERS:
        raise ValueError(f"family must be one of {sorted(BUILDERS)}, got {family!r}")
    torch.manual_seed(seed)
    model = BUILDERS[family]()
    randomize_norm_weights(model, torch.Generator().manual_seed(seed + 1))
    sharpen_attention(model)
    return model.to(dtype).eval()


def sharpen_attention(model: nn.Module) -> None:
    """Query and key projections x3 (attention logits x9): with transformers' initialisation a
    tiny model's attention is nearly uniform and its outputs hardly depend on it, so a wrong key,
    mask or position would not show in its tokens."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")) and "vision" not in name:
                param.mul_(3.0)


def tiny_batch(batch: int = 2, seq: int = 11, *, seed: int = 0, device="cpu") -> torch.Tensor:
    """Random token ids (avoiding the image token of the Mistral3 wrapper)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 1, (batch, seq), generator=generator).to(device)
