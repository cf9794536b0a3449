"""thinkfuse.models.MiMoForCausalLM: structure and weight names of the released checkpoints,
loading a released-style checkpoint without remote code, the MTP layer's computation and its
own KV cache, and patch_model on trunk and MTP layers."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE
from tolerances import assert_close_fp32
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, Qwen2Config, Qwen2ForCausalLM

import thinkfuse
from thinkfuse.models import MiMoConfig, MiMoForCausalLM, MiMoModel
from thinkfuse.tiny import tiny_batch, tiny_model

MTP_WEIGHTS = [
    "token_layernorm.weight",
    "hidden_layernorm.weight",
    "input_proj.weight",
    "input_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.q_proj.bias",
    "self_attn.k_proj.weight", "self_attn.k_proj.bias",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "final_layernorm.weight",
]


def _tiny(dtype=torch.float32):
    return tiny_model("mimo", dtype=dtype).to(DEVICE)


def test_weight_names_and_shapes_are_the_released_ones():
    model = _tiny()
    hidden = model.config.hidden_size
    state = model.state_dict()
    mtp = sorted(k.removeprefix("model.mtp_layers.0.") for k in state if k.startswith("model.mtp_layers."))
    assert mtp == sorted(MTP_WEIGHTS)
    assert state["model.mtp_layers.0.input_proj.weight"].shape == (hidden, 2 * hidden)
    trunk = {k for k in state if not k.startswith("model.mtp_layers.")}
    assert trunk == set(Qwen2ForCausalLM(Qwen2Config(**model.config.to_dict())).state_dict())
    assert model.config.model_type == "mimo" and model.config.num_nextn_predict_layers == 1
    assert not model.config.tie_word_embeddings


def test_several_mtp_layers_each_have_their_own_cache_slot():
    config = MiMoConfig(**{**_tiny().config.to_dict(), "num_nextn_predict_layers": 2})
    model = MiMoForCausalLM(config)
    assert [layer.self_attn.layer_idx for layer in model.model.mtp_layers] == [0, 1]
    assert any(k.startswith("model.mtp_layers.1.final_layernorm") for k in model.state_dict())


def test_forward_is_exactly_qwen2():
    """The MTP layers are not run by forward: a Qwen2 model with the trunk weights agrees bit
    for bit."""
    model = _tiny()
    qwen2 = Qwen2ForCausalLM(Qwen2Config(**model.config.to_dict())).to(DEVICE).eval()
    missing, unexpected = qwen2.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("model.mtp_layers.") for k in unexpected)
    ids = tiny_batch(device=DEVICE)
    assert torch.equal(model(ids).logits, qwen2(ids).logits)


def test_pre_norm_hidden_is_the_final_norms_input():
    model = _tiny()
    ids = tiny_batch(device=DEVICE)
    outputs, hidden = model.forward_with_pre_norm_hidden(ids, output_hidden_states=True)
    assert torch.equal(model.model.norm(hidden), outputs.hidden_states[-1])
    assert torch.equal(outputs.logits, model(ids).logits)
    assert not model.model.norm._forward_pre_hooks  # the capturing hook is gone


def _manual_mtp_logits(model, hidden, next_ids, positions):
    """The MTP layer written out: [hidden, embed] order, embedding zeroed at position 0."""
    layer = model.model.mtp_layers[0]
    embeds = model.model.embed_tokens(next_ids) * (positions != 0)[..., None]
    fused = layer.input_proj(torch.cat([layer.hidden_layernorm(hidden), layer.token_layernorm(embeds)], -1))
    x = layer.input_layernorm(fused)
    cos, sin = model.model.rotary_emb(x, positions)
    attn = layer.self_attn
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    q, k = thinkfuse.reference.apply_rotary_pos_emb(q, k, cos, sin)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    h = fused + attn.o_proj(out.transpose(1, 2).reshape(*x.shape[:-1], -1))
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(layer.final_layernorm(h))


def test_mtp_forward_matches_the_written_out_layer():
    model = _tiny()
    ids = tiny_batch(2, 12, device=DEVICE)
    _, hidden = model.forward_with_pre_norm_hidden(ids)
    positions = torch.arange(11, device=DEVICE).expand(2, -1)
    ours = model.mtp_forward(hidden[:, :-1], ids[:, 1:], position_ids=positions).logits
    assert_close_fp32(ours, _manual_mtp_logits(model, hidden[:, :-1], ids[:, 1:], positions), tol=1e-5)


def test_mtp_uses_its_own_cache_incrementally():
    """Chunked MTP calls with the MTP cache equal one call over all rows; the trunk's cache is
    never touched (the MTP attention's layer index would otherwise alias trunk layer 0)."""
    model = _tiny()
    ids = tiny_batch(2, 12, device=DEVICE)
    trunk_cache = DynamicCache(config=model.config)
    _, hidden = model.forward_with_pre_norm_hidden(ids, past_key_values=trunk_cache, use_cache=True)
    trunk_keys = trunk_cache.layers[0].keys.clone()
    whole = model.mtp_forward(hidden[:, :-1], ids[:, 1:]).logits

    mtp_cache = DynamicCache()
    first = model.mtp_forward(hidden[:, :7], ids[:, 1:8], past_key_values=mtp_cache)
    second = model.mtp_forward(hidden[:, 7:-1], ids[:, 8:], past_key_values=mtp_cache)
    assert first.past_key_values is mtp_cache and mtp_cache.get_seq_length() == 11
    assert_close_fp32(torch.cat([first.logits, second.logits], 1), whole, tol=1e-5)
    assert trunk_cache.get_seq_length() == 12 and torch.equal(trunk_cache.layers[0].keys, trunk_keys)


def test_mtp_layer_index_is_checked():
    model = _tiny()
    with pytest.raises(ValueError, match="mtp_layer"):
        model.mtp_forward(torch.zeros(1, 1, 64, device=DEVICE), torch.zeros(1, 1, dtype=torch.long, device=DEVICE),
                          mtp_layer=1)


# ---------------------------------------------------------------------------------------------
# Auto classes and released-style checkpoints


def test_auto_classes_know_mimo():
    config = AutoConfig.for_model("mimo", **{k: v for k, v in _tiny().config.to_dict().items() if k != "model_type"})
    assert type(config) is MiMoConfig
    assert type(AutoModelForCausalLM.from_config(config)) is MiMoForCausalLM


def _released_style_checkpoint(model, path):
    """save_pretrained, then make config.json look like MiMo-7B's: remote-code auto_map,
    legacy rope keys, fields the remote config carries."""
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.update(
        architectures=["MiMoForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_mimo.MiMoConfig",
            "AutoModel": "modeling_mimo.MiMoModel",
            "AutoModelForCausalLM": "modeling_mimo.MiMoForCausalLM",
        },
        rope_theta=config["rope_parameters"]["rope_theta"],
        rope_scaling=None,
        attention_bias=True,
        torch_dtype="float32",
        transformers_version="4.40.1",
        sliding_window=32768,
    )
    for key in ("rope_parameters", "layer_types", "dtype"):
        config.pop(key)
    (path / "config.json").write_text(json.dumps(config))
    assert not (path / "modeling_mimo.py").exists()  # the remote code is not there to run


@pytest.mark.parametrize("trust_remote_code", [None, False, True])
def test_released_style_checkpoint_loads_offline_without_remote_code(tmp_path, monkeypatch, trust_remote_code):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = _tiny()
    _released_style_checkpoint(model, tmp_path)
    kwargs = {} if trust_remote_code is None else {"trust_remote_code": trust_remote_code}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, **kwargs).to(DEVICE).eval()
    assert type(loaded) is MiMoForCausalLM and type(loaded.model) is MiMoModel
    assert loaded.config.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"]

    ids = tiny_batch(device=DEVICE)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    _, hidden = model.forward_with_pre_norm_hidden(ids)
    assert torch.equal(loaded.mtp_forward(hidden[:, :-1], ids[:, 1:]).logits,
                       model.mtp_forward(hidden[:, :-1], ids[:, 1:]).logits)


_FRESH_PROCESS_LOAD = """
import sys
import torch
import thinkfuse
# Only the CPU interpreter cares (TRITON_INTERPRET must be set before triton is imported); with a
# GPU, torch itself may import triton.
if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "import thinkfuse must not import triton (TRITON_INTERPRET comes later)"
from transformers import AutoModel, AutoModelForCausalLM
print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__, type(AutoModel.from_pretrained(sys.argv[1])).__name__)
"""


def test_fresh_process_loads_with_the_auto_classes(tmp_path):
    """What a user does: `import thinkfuse`, then the Auto classes, with no MiMo config built
    before (the model classes register when the checkpoint's config is read)."""
    _released_style_checkpoint(_tiny(), tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_LOAD, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == ["MiMoForCausalLM", "MiMoModel"]


def test_direct_class_loading(tmp_path):
    model = _tiny()
    _released_style_checkpoint(model, tmp_path)
    loaded = MiMoForCausalLM.from_pretrained(tmp_path).to(DEVICE)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


# ---------------------------------------------------------------------------------------------
# patch_model


def _mtp_loss(model, ids):
    _, hidden = model.forward_with_pre_norm_hidden(ids)
    logits = model.mtp_forward(hidden[:, :-1], ids[:, 1:]).logits
    return logits, (logits * torch.linspace(-1, 1, logits.shape[-1], device=logits.device)).sum()


def test_patch_covers_trunk_and_mtp_layers(backend):
    model = _tiny()
    ids = tiny_batch(device=DEVICE)
    ref_logits, loss = _mtp_loss(model, ids)
    loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    report = thinkfuse.patch_model(model, backend=backend)
    # trunk: 2 layers x 2 norms + final norm, 2 MLPs, 2 attentions; MTP: 5 norms, 1 MLP, 1 attention
    assert report.family == "mimo" and report.patched == {"rms_norm": 10, "swiglu": 3, "rope": 3, "attention": 3,
                                                          "positions": 1, "loss": 1}
    mtp = model.model.mtp_layers[0]
    for module in (mtp.token_layernorm, mtp.hidden_layernorm, mtp.input_layernorm, mtp.post_attention_layernorm,
                   mtp.final_layernorm, mtp.mlp, mtp.self_attn):
        assert hasattr(module, "_thinkfuse_patch")

    logits, loss = _mtp_loss(model, ids)
    loss.backward()
    assert_close_fp32(logits, ref_logits, tol=1e-4)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == ref_grads.keys()
    assert any(name.startswith("model.mtp_layers.0.") for name in ref_grads)
    for name, grad in ref_grads.items():
        assert_close_fp32(model.get_parameter(name).grad, grad, tol=1e-4)

    thinkfuse.unpatch_model(model)
    assert torch.equal(_mtp_loss(model, ids)[0], ref_logits)
