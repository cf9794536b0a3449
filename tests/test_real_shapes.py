"""patch_model on one decoder layer of every released checkpoint's shape (bench/models.json):
the real hidden size, head counts and head_dim (GQA groups of 6, 5 and 4; Ministral 3 14B's
q/o width 4096 against hidden 5120), attention bias, norm eps and rope parameters (YaRN to
256K with the query temperature), at positions far past the original context; only the MLP
width and the vocabulary are shrunk, so a layer fits a CPU test. The tiny models of the other
tests have head_dim 16 and q/o width equal to the hidden size, which hides every mistake that
only these geometries make.

Logits and every parameter's gradient, patched against unpatched, float32, with a left-padded
row; and greedy generation of a few tokens.
"""

import pytest
import torch
from conftest import DEVICE
from tolerances import assert_close_fp32

import thinkfuse
from bench.harness import load_presets
from thinkfuse.tiny import randomize_norm_weights

PRESETS, _ = load_presets()
SHRUNK = {"num_hidden_layers": 1, "intermediate_size": 96, "vocab_size": 128}
# Far past every original context (Ministral 3: 16384): YaRN's ramp and the query temperature.
POSITION_OFFSET = 40_000


def _config(name: str):
    from transformers import Ministral3Config, MistralConfig, Qwen2Config

    from thinkfuse.models import MiMoConfig

    spec = PRESETS[name]
    fields = {key: spec[key] for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                         "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
                                         "max_position_embeddings") if key in spec}
    fields |= SHRUNK
    family = spec["family"]
    if family == "qwen2":
        return Qwen2Config(**fields)
    if family == "mimo":
        return MiMoConfig(**fields, num_nextn_predict_layers=spec.get("num_nextn_predict_layers", 1))
    if family == "ministral3":
        return Ministral3Config(**fields, attention_bias=spec.get("attention_bias", False))
    return MistralConfig(**fields, sliding_window=None)


def _model(name: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(name), attn_implementation="sdpa")
    randomize_norm_weights(model, torch.Generator().manual_seed(1))
    with torch.no_grad():  # transformers zero-initialises biases: make them count
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
    # no eos: generate and the static / speculative decoders all run the full length
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(DEVICE).float()


def _inputs():
    ids = torch.randint(0, SHRUNK["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0) + POSITION_OFFSET
    return ids, mask, positions


def _logits_and_grads(model, ids, mask, positions):
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask, position_ids=positions).logits
    weights = torch.linspace(-1, 1, logits.shape[-1], device=logits.device)
    (logits * weights * mask[..., None]).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach()[mask.bool()], grads


@pytest.mark.parametrize("name", list(PRESETS))
def test_patched_layer_of_the_real_shape_matches_transformers(name, backend):
    model = _model(name)
    inputs = _inputs()
    ref_logits, ref_grads = _logits_and_grads(model, *inputs)
    report = thinkfuse.patch_model(model, backend=backend)
    assert report.patched.get("attention") and report.patched.get("rope"), report.patched
    logits, grads = _logits_and_grads(model, *inputs)
    assert_close_fp32(logits, ref_logits, tol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for param, grad in ref_grads.items():
        assert_close_fp32(grads[param], grad, tol=1e-4)


# GQA groups of 6 and 5, and 4 with q/o width != hidden size
GENERATION_PRESETS = [name for name in ("palmyra-mini", "am-thinking-v1", "ministral-3-14b") if name in PRESETS]


@pytest.mark.parametrize("name", GENERATION_PRESETS)
def test_patched_greedy_generation_of_the_real_shape(name, kernel_backend):
    """A left-padded batch decoding through the decode kernel, at head_dim 128 and real groups."""
    model = _model(name).eval()
    ids, mask, _ = _inputs()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    thinkfuse.patch_model(model, backend=kernel_backend)
    with thinkfuse.use_backend(kernel_backend):
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("name", GENERATION_PRESETS)
def test_static_greedy_decoding_of_the_real_shape(name, kernel_backend):
    """thinkfuse.static_decode's engine (its steps run eagerly on the CPU) at the real geometry."""
    from thinkfuse.static_decode import greedy_generate

    model = _model(name).eval()
    ids, mask, _ = _inputs()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with thinkfuse.use_backend(kernel_backend):
        generated, _ = greedy_generate(model, ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_mtp_generation_of_the_mimo_shape(cuda_graph, kernel_backend):
    """MiMo-7B's geometry with its MTP layer: speculative greedy decoding equals generate."""
    from thinkfuse.speculative import mtp_generate

    model = _model("mimo-7b").eval()
    ids, mask, _ = _inputs()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    thinkfuse.patch_model(model, backend=kernel_backend)
    with thinkfuse.use_backend(kernel_backend):
        generated, _ = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=5, cuda_graph=cuda_graph)
    assert torch.equal(generated, expected)
