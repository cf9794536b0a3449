"""thinkfuse.ops.rope_params against transformers' rotary embedding modules: inv_freq and
attention_scaling bit for bit, and the cos/sin the modules return, for configs of every family
(shapes from ../shared/models.json; nothing is downloaded) and the RoPE scaling variants."""

import types

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Ministral3Config, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.ministral3.modeling_ministral3 import Ministral3RotaryEmbedding
from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from thinkfuse import reference
from thinkfuse.ops import rope_params

# Fields of ../shared/models.json (and Ministral-8B-2410 from the field notes) that RoPE reads.
_QWEN2_FAMILY = {
    "palmyra-mini": dict(hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                         rope_theta=1e6, max_position_embeddings=131072),
    "am-thinking-v1": dict(hidden_size=5120, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                           rope_theta=1e6, max_position_embeddings=131072),
    "mimo-7b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                    rope_theta=640000.0, max_position_embeddings=32768),
}
_MINISTRAL3_YARN = dict(rope_type="yarn", factor=16.0, original_max_position_embeddings=16384, beta_fast=32.0,
                        beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1)
_MINISTRAL3_FAMILY = {
    "ministral-3-3b": dict(hidden_size=3072, rope_theta=1e6),
    "ministral-3-8b": dict(hidden_size=4096, rope_theta=1e6),
    "ministral-3-14b": dict(hidden_size=5120, rope_theta=1e9),
}


def _qwen2(name):
    fields = dict(_QWEN2_FAMILY[name])
    theta = fields.pop("rope_theta")
    config = Qwen2Config(**fields, rope_parameters={"rope_type": "default", "rope_theta": theta})
    return config, Qwen2RotaryEmbedding


def _ministral3(name, **rope_overrides):
    fields = dict(_MINISTRAL3_FAMILY.get(name, _MINISTRAL3_FAMILY["ministral-3-8b"]))
    rope = {**_MINISTRAL3_YARN, "rope_theta": fields.pop("rope_theta"), **rope_overrides}
    rope = {key: value for key, value in rope.items() if value is not None}
    config = Ministral3Config(**fields, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                              max_position_embeddings=262144, rope_parameters=rope)
    return config, Ministral3RotaryEmbedding


def _mistral(**rope):
    config = MistralConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e8, **rope})
    return config, MistralRotaryEmbedding


def _qwen2_rope(**rope):
    config = Qwen2Config(hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                         rope_parameters=rope)
    return config, Qwen2RotaryEmbedding


def _llama(rope, **extra):
    config = LlamaConfig(hidden_size=2048, num_attention_heads=16, max_position_embeddings=8192,
                         rope_parameters=rope, **extra)
    return config, LlamaRotaryEmbedding


CASES = {
    **{name: (lambda n=name: _qwen2(n)) for name in _QWEN2_FAMILY},
    **{name: (lambda n=name: _ministral3(n)) for name in _MINISTRAL3_FAMILY},
    "mistral-8b-2410": _mistral,
    "yarn-mscale_all_dim-0": lambda: _ministral3("yarn", mscale_all_dim=0.0),
    "yarn-no-mscale": lambda: _ministral3("yarn", mscale=None, mscale_all_dim=None),
    "yarn-attention_factor": lambda: _ministral3("yarn", attention_factor=1.25),
    "yarn-no-truncate": lambda: _ministral3("yarn", truncate=False),
    "yarn-beta-32-8": lambda: _ministral3("yarn", beta_fast=32.0, beta_slow=8.0, factor=4.0),
    # beta_fast / beta_slow left out: transformers' defaults (32 and 1) apply.
    "yarn-default-betas": lambda: _ministral3("yarn", beta_fast=None, beta_slow=None),
    "llama3": lambda: _llama({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 4096}),
    "linear": lambda: _llama({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "linear-partial-rotary": lambda: _llama({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0,
                                             "partial_rotary_factor": 0.5}),
    "dynamic": lambda: _llama({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 3.0}),
    "llama-default-theta": lambda: _llama({"rope_type": "default"}),
    # The families' default frequencies rotate the whole head whatever partial_rotary_factor says.
    "qwen2-default-partial-rotary": lambda: _qwen2_rope(rope_type="default", rope_theta=1e6,
                                                        partial_rotary_factor=0.5),
    "qwen2-proportional": lambda: _qwen2_rope(rope_type="proportional", rope_theta=1e4, factor=2.0,
                                              partial_rotary_factor=0.25),
    "qwen2-proportional-full": lambda: _qwen2_rope(rope_type="proportional", rope_theta=1e4),
    # Only Ministral 3's attention reads llama_4_scaling_beta.
    "mistral-with-llama_4_scaling_beta": lambda: _mistral(llama_4_scaling_beta=0.1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_inv_freq_and_attention_scaling_match_transformers(case):
    config, rotary_cls = CASES[case]()
    module = rotary_cls(config)
    params = rope_params(config)
    assert params.inv_freq.dtype == torch.float32
    assert torch.equal(params.inv_freq, module.inv_freq), (params.inv_freq - module.inv_freq).abs().max()
    assert params.attention_scaling == module.attention_scaling
    expected_llama4 = (0.1, 16384) if case.startswith(("ministral-3", "yarn")) else None
    assert params.llama4_scaling == expected_llama4


_POSITIONS = torch.tensor([[0, 1, 4095, 4096, 16383, 16384, 131071, 262143, 262144, 300001, 2**24 + 5]])


@pytest.mark.parametrize("case", ["palmyra-mini", "ministral-3-8b", "yarn-mscale_all_dim-0", "llama3", "dynamic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cos_sin_from_params_match_the_rotary_module(case, dtype):
    config, rotary_cls = CASES[case]()
    module = rotary_cls(config)
    params = rope_params(config)
    # dynamic rope only changes frequencies past max_position_embeddings: stay below it there.
    positions = _POSITIONS[_POSITIONS < 8192][None] if case == "dynamic" else _POSITIONS
    hf_cos, hf_sin = module(torch.zeros(1, dtype=dtype), positions)
    cos, sin = reference.rope_cos_sin(positions, params.inv_freq, params.attention_scaling)
    assert torch.equal(cos.to(dtype), hf_cos) and torch.equal(sin.to(dtype), hf_sin)


def test_ministral3_defaults_and_yarn_values():
    config, _ = _ministral3("ministral-3-8b")
    params = rope_params(config)
    assert params.attention_scaling == 1.0  # mscale == mscale_all_dim
    config, _ = _ministral3("yarn", mscale_all_dim=0.0)
    assert rope_params(config).attention_scaling == pytest.approx(1 + 0.1 * torch.tensor(16.0).log().item())


def test_old_style_config_with_rope_scaling_and_rope_theta():
    """transformers 4.x configs keep RoPE in ``rope_scaling`` (with "type") and ``rope_theta``."""
    old = types.SimpleNamespace(hidden_size=2048, num_attention_heads=16, max_position_embeddings=8192,
                                rope_theta=50000.0, rope_scaling={"type": "linear", "factor": 4.0})
    config, rotary_cls = _llama({"rope_type": "linear", "rope_theta": 50000.0, "factor": 4.0})
    assert torch.equal(rope_params(old).inv_freq, rotary_cls(config).inv_freq)
    no_scaling = types.SimpleNamespace(hidden_size=2048, num_attention_heads=16, rope_theta=50000.0)
    config, rotary_cls = _llama({"rope_type": "default", "rope_theta": 50000.0})
    assert torch.equal(rope_params(no_scaling).inv_freq, rotary_cls(config).inv_freq)


def test_unsupported_or_nested_rope_parameters_raise():
    config, _ = _llama({"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 64,
                        "long_factor": [1.0] * 64, "original_max_position_embeddings": 4096})
    with pytest.raises(ValueError, match="rope_type 'longrope'"):
        rope_params(config)
    nested = types.SimpleNamespace(hidden_size=64, num_attention_heads=4,
                                   rope_parameters={"full_attention": {"rope_type": "default"}})
    with pytest.raises(ValueError, match="nested per layer type"):
        rope_params(nested)
    with pytest.raises(TypeError, match="config object"):
        rope_params({"hidden_size": 64, "num_attention_heads": 4, "rope_theta": 10000.0})


def test_a_model_or_none_instead_of_a_config_raises_type_error():
    config, _ = _qwen2("palmyra-mini")
    model = torch.nn.Module()
    model.config = config  # what a transformers model carries
    with pytest.raises(TypeError, match=r"got a Module; pass model\.config"):
        rope_params(model)
    with pytest.raises(TypeError, match="config object"):
        rope_params(None)


@pytest.mark.parametrize("rope,missing", [
    ({"type": "yarn"}, "factor"),
    ({"type": "linear"}, "factor"),
    ({"type": "dynamic"}, "factor"),
    ({"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 4096}, "low_freq_factor"),
])
def test_rope_parameters_missing_a_required_key_raise_value_error(rope, missing):
    """A config that skipped transformers' validation (an old-style config object)."""
    old = types.SimpleNamespace(hidden_size=64, num_attention_heads=4, max_position_embeddings=8192,
                                rope_theta=10000.0, rope_scaling=rope)
    with pytest.raises(ValueError, match=f"rope_type '{rope['type']}'.*'{missing}'"):
        rope_params(old)


def test_params_move_to_a_device():
    config, _ = _qwen2("palmyra-mini")
    params = rope_params(config).to("meta")
    assert params.inv_freq.device.type == "meta" and params.attention_scaling == 1.0
