"""thinkfuse.models: config validation of num_nextn_predict_layers, MTP layers beyond the trunk's
depth, and mtp_forward's argument checks."""

import json

import pytest
import torch
from conftest import DEVICE
from tolerances import assert_close_fp32
from transformers import AutoModelForCausalLM, DynamicCache

from thinkfuse.models import MiMoConfig, MiMoForCausalLM
from thinkfuse.tiny import tiny_batch, tiny_model


def _config(**overrides):
    return MiMoConfig(**{**tiny_model("mimo").config.to_dict(), **overrides})


@pytest.mark.parametrize("value", [1.5, "2", None, True])
def test_num_nextn_predict_layers_of_a_wrong_type_is_a_type_error(value):
    # The strict dataclass check does not see the field (its annotation is a string): a float or
    # a str got through and failed later in the model's range(), naming nothing.
    with pytest.raises(TypeError, match="num_nextn_predict_layers"):
        _config(num_nextn_predict_layers=value)


def test_negative_num_nextn_predict_layers_is_a_value_error():
    # -1 built a model with no MTP layer at all, silently
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        _config(num_nextn_predict_layers=-1)


def test_bad_num_nextn_predict_layers_in_config_json_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_model("mimo").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": "1"}))
    with pytest.raises(TypeError, match="num_nextn_predict_layers"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("value", [0, 2])
def test_valid_num_nextn_predict_layers_round_trip(tmp_path, value):
    config = _config(num_nextn_predict_layers=value)
    config.save_pretrained(tmp_path)
    loaded = MiMoConfig.from_pretrained(tmp_path)
    assert loaded.num_nextn_predict_layers == value and loaded.to_dict() == config.to_dict()
    assert len(MiMoForCausalLM(loaded).model.mtp_layers) == value


def test_more_mtp_layers_than_trunk_layers():
    """MTP layer i has cache slot i of the MTP cache, whatever the trunk's depth: building one
    past the trunk's last layer raised IndexError (its attention looked up the trunk's
    layer_types[i]), and MTP attention is full even where the trunk's layers slide."""
    config = _config(num_hidden_layers=1, num_nextn_predict_layers=2, layer_types=None,
                     use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert config.layer_types == ["sliding_attention"]
    model = MiMoForCausalLM(config).to(DEVICE).eval()
    attns = [layer.self_attn for layer in model.model.mtp_layers]
    assert [a.layer_idx for a in attns] == [0, 1]
    assert all(a.layer_type == "full_attention" and a.sliding_window is None for a in attns)

    ids = tiny_batch(2, 10, device=DEVICE)
    _, hidden = model.forward_with_pre_norm_hidden(ids)
    whole = model.mtp_forward(hidden[:, :-1], ids[:, 1:], mtp_layer=1)
    assert whole.past_key_values.get_seq_length(1) == 9
    cache = DynamicCache()
    first = model.mtp_forward(hidden[:, :4], ids[:, 1:5], mtp_layer=1, past_key_values=cache)
    second = model.mtp_forward(hidden[:, 4:-1], ids[:, 5:], mtp_layer=1, past_key_values=cache)
    assert_close_fp32(torch.cat([first.logits, second.logits], 1), whole.logits, tol=1e-5)


def _inputs():
    model = tiny_model("mimo").to(DEVICE).eval()
    ids = tiny_batch(2, 12, device=DEVICE)
    _, hidden = model.forward_with_pre_norm_hidden(ids)
    return model, hidden[:, :-1], ids[:, 1:]


_BAD_MTP_ARGS = {
    # (argument named in the error, exception type, how the call is made wrong)
    "rows": ("previous_hidden_states", ValueError, lambda h, n: dict(previous_hidden_states=h[:, :-1])),
    "batch": ("previous_hidden_states", ValueError, lambda h, n: dict(previous_hidden_states=h[:1])),
    "hidden": ("previous_hidden_states", ValueError, lambda h, n: dict(previous_hidden_states=h[..., :32])),
    "2-D hidden": ("previous_hidden_states", ValueError, lambda h, n: dict(previous_hidden_states=h[0])),
    "1-D ids": ("next_input_ids", ValueError, lambda h, n: dict(previous_hidden_states=h[0], next_input_ids=n[0])),
    "float ids": ("next_input_ids", TypeError, lambda h, n: dict(next_input_ids=n.float())),
    "positions": ("position_ids", ValueError, lambda h, n: dict(position_ids=torch.arange(5, device=n.device)[None])),
    "short mask": ("attention_mask", ValueError, lambda h, n: dict(attention_mask=torch.ones_like(n)[:, :5])),
    "mask batch": ("attention_mask", ValueError, lambda h, n: dict(attention_mask=torch.ones_like(n)[:1])),
    "bool layer": ("mtp_layer", TypeError, lambda h, n: dict(mtp_layer=True)),
    "float layer": ("mtp_layer", TypeError, lambda h, n: dict(mtp_layer=0.0)),
    "negative keep": ("logits_to_keep", ValueError, lambda h, n: dict(logits_to_keep=-1)),
}


@pytest.mark.parametrize("case", list(_BAD_MTP_ARGS))
def test_mtp_forward_checks_its_arguments(case):
    """Mismatched shapes raised bare RuntimeErrors from deep inside (cat, rotary), and a short
    mask or a negative logits_to_keep returned wrong rows silently."""
    name, error, make = _BAD_MTP_ARGS[case]
    model, hidden, next_ids = _inputs()
    kwargs = {"previous_hidden_states": hidden, "next_input_ids": next_ids, **make(hidden, next_ids)}
    with pytest.raises(error, match=name):
        model.mtp_forward(**kwargs)


def test_mtp_forward_mask_covers_the_cache_and_the_rows():
    """The accepted mask: the MTP cache's length plus the rows; a [S] or [1, S] position_ids
    broadcasts over the batch."""
    model, hidden, next_ids = _inputs()
    cache = DynamicCache()
    mask = torch.ones_like(next_ids)
    model.mtp_forward(hidden[:, :6], next_ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache)
    out = model.mtp_forward(hidden[:, 6:], next_ids[:, 6:], attention_mask=mask, past_key_values=cache,
                            position_ids=torch.arange(6, 11, device=DEVICE), logits_to_keep=2)
    whole = model.mtp_forward(hidden, next_ids).logits
    assert out.logits.shape[1] == 2
    assert_close_fp32(out.logits, whole[:, -2:], tol=1e-5)


def test_an_unpickled_config_registers_the_model_classes(tmp_path):
    """A config unpickled in a process that never built one (a worker) still resolves to
    MiMoForCausalLM: unpickling skips __post_init__, where the classes are registered."""
    import pickle
    import subprocess
    import sys

    from thinkfuse.models import MiMoConfig

    path = tmp_path / "config.pkl"
    path.write_bytes(pickle.dumps(MiMoConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)))
    code = ("import pickle, sys, thinkfuse; from transformers import AutoModelForCausalLM; "
            "model = AutoModelForCausalLM.from_config(pickle.load(open(sys.argv[1], 'rb'))); "
            "print(type(model).__name__, len(model.model.mtp_layers))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["MiMoForCausalLM", "1"]
