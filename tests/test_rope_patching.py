"""The rope patch rule against transformers, on tiny models of every family: q and k as the
attention implementation receives them (after RoPE and Ministral 3's query temperature),
patched with the rope rule only vs unpatched, at positions far past the original context, for
the rope types and parameters the families' configs can hold.

(Logits of tiny random models hardly depend on positions, so they would hide a wrong rotation;
q and k do not.)"""

import copy

import pytest
import torch
from conftest import DEVICE
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import thinkfuse
from thinkfuse import tiny

L0 = 64  # original_max_position_embeddings of the scaled rope types
YARN = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": L0,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 1e6},
    "linear": {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0},
    "yarn": YARN,
    "yarn-mscale_all_dim-0": {**YARN, "mscale_all_dim": 0.0},
    "yarn-attention_factor-no-truncate": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0,
                                          "original_max_position_embeddings": L0, "attention_factor": 1.3,
                                          "truncate": False, "beta_fast": 16.0, "beta_slow": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": L0},
    # The families' own default frequencies ignore partial_rotary_factor (full rotation).
    "default-partial_rotary_factor": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
    "proportional": {"rope_type": "proportional", "rope_theta": 1e4, "factor": 2.0, "partial_rotary_factor": 0.5},
    # Only Ministral 3's attention reads llama_4_scaling_beta; the others ignore the key.
    "yarn-llama_4_scaling_beta": {**YARN, "llama_4_scaling_beta": 0.1},
}
FAMILIES = ["qwen2", "mimo", "mistral", "ministral3"]

_RECORDED = []


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    _RECORDED.append((query.detach().double(), key.detach().double()))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("thinkfuse_test_qk_recorder", _recording_attention)


def _model(family, rope, head_dim=64, dtype=torch.float32, max_position_embeddings=512):
    """A tiny model of ``family`` with ``rope`` as its rope_parameters, built in float32 and then
    cast to ``dtype`` (as ``model.to(dtype)`` does: the rotary module's inv_freq buffer too)."""
    from transformers import (MistralConfig, MistralForCausalLM, Ministral3Config, Ministral3ForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    from thinkfuse.models import MiMoConfig, MiMoForCausalLM

    rope = copy.deepcopy(rope)
    if family == "ministral3":  # its attention needs the query temperature's parameters
        rope.setdefault("llama_4_scaling_beta", 0.1)
        rope.setdefault("original_max_position_embeddings", L0)
    fields = dict(tiny._COMMON, head_dim=head_dim, max_position_embeddings=max_position_embeddings,
                  rope_parameters=rope)
    torch.manual_seed(0)
    model = {
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**fields)),
        "mimo": lambda: MiMoForCausalLM(MiMoConfig(**fields, num_nextn_predict_layers=1)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**fields, sliding_window=None)),
        "ministral3": lambda: Ministral3ForCausalLM(Ministral3Config(**fields)),
    }[family]()
    tiny.randomize_norm_weights(model, torch.Generator().manual_seed(1))
    model.set_attn_implementation("thinkfuse_test_qk_recorder")
    return model.to(DEVICE, dtype).eval()


def _recorded_qk(model, ids, positions, **kwargs):
    _RECORDED.clear()
    with torch.no_grad():
        model(ids, position_ids=positions, **kwargs)
    return list(_RECORDED)


def _patch_rope_only(model, backend):
    report = thinkfuse.patch_model(model, backend=backend, rms_norm=False, swiglu=False, attention=False,
                                   loss=False)
    attention_layers = len(model.model.layers) + len(getattr(model.model, "mtp_layers", ()))
    assert report.patched.get("rope") == attention_layers, report.patched


def _assert_qk_close(ours, theirs, rtol):
    assert len(ours) == len(theirs) and ours
    for layer, ((q, k), (hf_q, hf_k)) in enumerate(zip(ours, theirs)):
        for name, x, ref in (("q", q, hf_q), ("k", k, hf_k)):
            err = (x - ref).abs().max().item()
            scale = ref.abs().max().item()
            assert err <= rtol * scale, f"layer {layer} {name}: max error {err:.3e} > {rtol} x {scale:.3e}"


def _far_positions(seq, batch=2, offset=100_000):
    return (torch.arange(seq) + offset).expand(batch, -1).to(DEVICE)


@pytest.mark.parametrize("case", list(ROPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_rope_rule_matches_transformers_far_past_the_original_context(family, case, backend):
    model = _model(family, ROPES[case])
    ids = tiny.tiny_batch(2, 9, device=DEVICE)
    positions = _far_positions(9)
    expected = _recorded_qk(model, ids, positions)
    _patch_rope_only(model, backend)
    _assert_qk_close(_recorded_qk(model, ids, positions), expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["qwen2", "ministral3"])
def test_rope_rule_uses_the_models_rotary_buffer_after_a_cast(family, dtype, backend):
    """``model.to(bfloat16)`` after construction rounds the rotary module's inv_freq buffer, and
    transformers rotates with the rounded frequencies (a from_pretrained(dtype=...) model keeps
    them in float32): at position 1e5 a rounded frequency moves the angle by radians, so the
    patched model must use the same buffer."""
    model = _model(family, YARN, head_dim=128, dtype=dtype)
    assert model.model.rotary_emb.inv_freq.dtype == dtype
    ids = tiny.tiny_batch(2, 9, device=DEVICE)
    positions = _far_positions(9)
    expected = _recorded_qk(model, ids, positions)
    _patch_rope_only(model, backend)
    # One rounding in the kernel vs transformers' two, carried through a second layer.
    _assert_qk_close(_recorded_qk(model, ids, positions), expected, rtol=0.05)


@pytest.mark.parametrize("family", ["qwen2", "ministral3"])
def test_rope_rule_matches_transformers_while_decoding_with_a_cache(family, backend):
    """Prefill at position 1e5, then token-by-token decoding with explicit positions."""
    model = _model(family, YARN)
    ids = tiny.tiny_batch(2, 6, device=DEVICE)

    def decode():
        cache = DynamicCache(config=model.config)
        recorded = _recorded_qk(model, ids, _far_positions(6), past_key_values=cache, use_cache=True)
        for step in range(3):
            token = ids[:, step:step + 1]
            recorded += _recorded_qk(model, token, _far_positions(1, offset=100_006 + step),
                                     past_key_values=cache, use_cache=True)
        return recorded

    expected = decode()
    _patch_rope_only(model, backend)
    _assert_qk_close(decode(), expected, rtol=1e-5)


def _text_base_model(model):
    return model.model.language_model if hasattr(model.model, "language_model") else model.model


@pytest.mark.parametrize("family", list(tiny.BUILDERS))
def test_rope_rule_links_the_text_models_rotary_embedding(family):
    """Every patched attention (MiMo's MTP layer included; not the Pixtral tower of the VLM) reads
    the text model's own rotary module; unpatch_model drops the link."""
    model = tiny.tiny_model(family)
    thinkfuse.patch_model(model, backend="torch")
    rotary = _text_base_model(model).rotary_emb
    patched = [m for m in model.modules() if "rope" in getattr(m.__dict__.get("_thinkfuse_patch"), "kinds", ())]
    assert patched and all(m.__dict__.get("_thinkfuse_rotary") is rotary for m in patched)
    assert "_thinkfuse_rotary" not in dict(model.named_modules())  # not registered as a submodule
    thinkfuse.unpatch_model(model)
    assert not any(name.startswith("_thinkfuse_") for m in model.modules() for name in m.__dict__)


@pytest.mark.parametrize("family", FAMILIES)
def test_linked_rope_rule_builds_no_frequencies_from_the_config(family, monkeypatch):
    """With the rotary module linked, the rule runs from its buffer and the query temperature
    read at patch time: the config's frequencies are never built (nor could a rope type
    rope_params lacks stop it)."""
    from thinkfuse.patching import forwards

    ids = tiny.tiny_batch(2, 9, device=DEVICE)
    positions = _far_positions(9)
    model = _model(family, YARN)
    expected = _recorded_qk(model, ids, positions)
    _patch_rope_only(model, "torch")

    def no_rope_params(config):
        raise AssertionError("rope_params was called")

    monkeypatch.setattr(forwards, "rope_params", no_rope_params)
    _assert_qk_close(_recorded_qk(model, ids, positions), expected, rtol=1e-5)


def test_rope_rule_follows_a_cast_made_after_patching(backend):
    """The patched model is run (in float32), then cast to bfloat16: the rule reads the rounded
    buffer of the cast, not frequencies it saw before."""
    ids = tiny.tiny_batch(2, 9, device=DEVICE)
    positions = _far_positions(9)
    expected = _recorded_qk(_model("ministral3", YARN, head_dim=128, dtype=torch.bfloat16), ids, positions)
    model = _model("ministral3", YARN, head_dim=128)
    _patch_rope_only(model, backend)
    _recorded_qk(model, ids, positions)
    model.to(torch.bfloat16)
    _assert_qk_close(_recorded_qk(model, ids, positions), expected, rtol=0.05)
