"""``rope_params(config)``: the inputs of ``thinkfuse.ops.rope`` from a transformers config.

The formulas follow ``transformers.modeling_rope_utils`` (5.x) operation for operation (same
float32/float64 order, same defaults), so ``inv_freq`` and ``attention_scaling`` are bit-equal
to what the model's rotary embedding module holds. Supported rope types: default, linear,
dynamic (at its base length, where it equals default), yarn, llama3 and proportional.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional

import torch

DEFAULT_THETA = 10_000.0


@dataclasses.dataclass(frozen=True, eq=False)
class RopeParams:
    """``inv_freq``: float32 ``[rotary_dim / 2]``; ``attention_scaling``: the factor applied to
    cos and sin; ``llama4_scaling``: ``(beta, original_max_position)`` of Ministral 3's query
    temperature, or None."""

    inv_freq: torch.Tensor
    attention_scaling: float = 1.0
    llama4_scaling: Optional[tuple[float, int]] = None

    def to(self, device) -> "RopeParams":
        return dataclasses.replace(self, inv_freq=self.inv_freq.to(device))


def rope_params(config) -> RopeParams:
    """RoPE parameters of a transformers config (or a multimodal config's text config).

    Reads ``config.rope_parameters`` (transformers 5), else ``rope_scaling`` and ``rope_theta``
    (older configs). ``dynamic`` is returned at its base length (positions below
    ``max_position_embeddings``), where transformers' module uses the default frequencies.
    """
    config = _text_config(config)
    params = _standardized_rope_parameters(config)
    rope_type = params["rope_type"]
    compute = _INV_FREQ_FUNCTIONS.get(rope_type)
    if compute is None:
        raise ValueError(
            f"config has rope_type {rope_type!r}; rope_params supports {sorted(_INV_FREQ_FUNCTIONS)}"
        )
    _check_required_keys(params, rope_type)
    inv_freq, attention_scaling = compute(params, _rotary_dim(config, params), config)
    return RopeParams(inv_freq, float(attention_scaling), _llama4_scaling(params, config))


def _text_config(config):
    if isinstance(config, dict):
        raise TypeError("rope_params takes a transformers config object (e.g. model.config), got a dict; "
                        "build one with transformers.AutoConfig.for_model(**d) or PretrainedConfig(**d)")
    if isinstance(config, torch.nn.Module):  # the likeliest slip: the model itself
        raise TypeError(f"rope_params takes a transformers config object, got a {type(config).__name__}; "
                        "pass model.config")
    if config is None or isinstance(config, (str, bytes, numbers.Number)):
        raise TypeError(f"rope_params takes a transformers config object (e.g. model.config), "
                        f"got {type(config).__name__}")
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _standardized_rope_parameters(config) -> dict:
    """A copy of the config's RoPE dict with the defaults transformers' standardisation adds."""
    raw = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(raw, dict):
        raise TypeError(f"config.rope_parameters must be a dict, got {type(raw).__name__}")
    if any(isinstance(value, dict) for value in raw.values()):
        raise ValueError("config.rope_parameters is nested per layer type; rope_params supports one global RoPE")
    params = dict(raw)
    params.setdefault("rope_type", params.get("type", "default"))
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(config, "rope_theta", None) or getattr(config, "default_theta", DEFAULT_THETA)
    if "partial_rotary_factor" not in params and getattr(config, "partial_rotary_factor", None) is not None:
        params["partial_rotary_factor"] = config.partial_rotary_factor
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        # A top-level original_max_position_embeddings (Phi-3 style) wins, as in transformers.
        if getattr(config, "original_max_position_embeddings", None) is not None:
            params["original_max_position_embeddings"] = config.original_max_position_embeddings
        else:
            params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    return params


# Keys transformers' config validation requires per rope type (yarn's factor may be None, then
# derived). A config object that skipped that validation (an old-style one) would otherwise fail
# with a bare KeyError deep in the formulas.
_REQUIRED_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}


def _check_required_keys(params: dict, rope_type: str) -> None:
    missing = [key for key in _REQUIRED_KEYS.get(rope_type, ()) if key not in params]
    if missing:
        raise ValueError(f"config.rope_parameters with rope_type {rope_type!r} lacks {missing}, "
                         "which transformers requires")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rotary_dim(config, params) -> int:
    return int(_head_dim(config) * params.get("partial_rotary_factor", 1.0))


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    """``1 / base^(2j/dim)`` in float32, exactly as transformers computes it."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _default(params, dim, config):
    # The families' own default (each model's ``compute_default_rope_parameters``: Qwen2,
    # Mistral, Ministral 3, Llama) rotates the whole head: partial_rotary_factor is ignored.
    return _default_inv_freq(params["rope_theta"], _head_dim(config)), 1.0


def _linear(params, dim, config):
    inv_freq = _default_inv_freq(params["rope_theta"], dim)
    inv_freq /= params["factor"]
    return inv_freq, 1.0


def _dynamic(params, dim, config):
    # At seq_len = max_position_embeddings, transformers' NTK base correction; the expression is
    # kept verbatim (float64 Python arithmetic) so rounding matches even when it is not exactly 1.
    max_pos = config.max_position_embeddings
    factor = params["factor"]
    base = params["rope_theta"] * ((factor * max_pos / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _default_inv_freq(base, dim), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_attention_factor(params, factor: float) -> float:
    attention_factor = params.get("attention_factor")
    if attention_factor is not None:
        return attention_factor
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def _yarn_correction_range(params, dim: int, base: float) -> tuple[float, float]:
    """Dimensions where the ramp from extrapolation to interpolation starts and ends."""
    original_max = params["original_max_position_embeddings"]

    def correction_dim(num_rotations):
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = correction_dim(params.get("beta_fast") or 32)
    high = correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _yarn(params, dim, config):
    base = params["rope_theta"]
    factor = params["factor"]
    if factor is None:
        factor = config.max_position_embeddings / params["original_max_position_embeddings"]
    attention_factor = _yarn_attention_factor(params, factor)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)

    low, high = _yarn_correction_range(params, dim, base)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (
        inv_freq_interpolation * (1 - extrapolation_weight) + inv_freq_extrapolation * extrapolation_weight
    )
    return inv_freq, attention_factor


def _llama3(params, dim, config):
    inv_freq = _default_inv_freq(params["rope_theta"], dim)
    factor = params["factor"]
    low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are interpolated (divided by factor), short ones kept, the middle blended.
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama), 1.0


def _proportional(params, dim, config):
    # The first partial_rotary_factor of the head's frequency pairs, with exponents over the
    # whole head_dim; the remaining pairs get frequency 0 (cos 1, sin 0: not rotated).
    head_dim = _head_dim(config)
    rope_angles = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
    inv_freq = 1.0 / (
        params["rope_theta"] ** (torch.arange(0, 2 * rope_angles, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim)
    )
    nope_angles = head_dim // 2 - rope_angles
    if nope_angles > 0:
        inv_freq = torch.cat((inv_freq, torch.zeros(nope_angles, dtype=torch.float32)))
    inv_freq /= params.get("factor", 1.0)
    return inv_freq, 1.0


_INV_FREQ_FUNCTIONS = {
    "default": _default,
    "linear": _linear,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "llama3": _llama3,
    "proportional": _proportional,
}

# Model types whose attention applies the query temperature of ``llama_4_scaling_beta``; any
# other model ignores the key (a Mistral or Qwen2 config may carry it without effect).
_LLAMA4_SCALING_MODEL_TYPES = ("ministral3",)


def llama4_scaling(config) -> Optional[tuple[float, int]]:
    """Only the query temperature's parameters of ``rope_params(config)`` (no frequencies built,
    and any rope type)."""
    config = _text_config(config)
    return _llama4_scaling(_standardized_rope_parameters(config), config)


def _llama4_scaling(params, config) -> Optional[tuple[float, int]]:
    """Ministral 3's ``(llama_4_scaling_beta, original_max_position_embeddings)``, or None (also
    for other model types, whose attention ignores the key)."""
    beta = params.get("llama_4_scaling_beta")
    if beta is None or getattr(config, "model_type", None) not in _LLAMA4_SCALING_MODEL_TYPES:
        return None
    original_max = params.get("original_max_position_embeddings") or config.max_position_embeddings
    return float(beta), int(original_max)
