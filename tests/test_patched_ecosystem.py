"""A patched model among the rest of the transformers ecosystem (float32, CPU, torch backend):
trainers that wrap ``forward`` per instance, models sharing a config object, save_pretrained
read back where thinkfuse is not imported, transformers' Trainer on padded batches. The
unpatched model is the truth."""

import json
import subprocess
import sys

import pytest
import torch
from tolerances import assert_close_fp32

import thinkfuse
from thinkfuse.tiny import tiny_batch, tiny_model


def _padded_batch(side: str):
    ids = tiny_batch(batch=2, seq=9)
    mask = torch.ones_like(ids)
    if side == "left":
        mask[0, :3] = 0
    else:
        mask[0, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, :2] = -100
    return ids, mask, labels


def test_forward_wrapped_before_patching_still_runs_in_training_with_labels():
    """A forward set on the instance before patch_model (a trainer's or accelerate's wrapper)
    is the forward the patch stands in for: the loss rule must not compute the loss around it."""
    ids, mask, labels = _padded_batch("left")
    model = tiny_model("qwen2").train()
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(kwargs.get("labels") is not None)
        out = type(model).forward(model, *args, **kwargs)
        out.loss = out.loss * 2  # behaviour of its own
        return out

    model.forward = wrapped
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    calls.clear()
    thinkfuse.patch_model(model, backend="torch")
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert calls == [True]
    assert_close_fp32(loss.detach(), expected.detach())
    thinkfuse.unpatch_model(model)
    assert model.forward is wrapped


def test_trl_fused_lm_head_added_before_patching():
    """TRL's trainers (SFT, DPO, GRPO...) add ``fused_lm_head=True`` to ``model.forward``, which
    returns per-token log-probs; patching the trainer's model afterwards must keep that mode."""
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    ids, mask, labels = _padded_batch("right")
    outputs = ("log_probs", "entropy", "is_top1")
    reference = tiny_model("qwen2").train()
    add_fused_lm_head(reference, outputs=outputs)
    expected = reference(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    model = tiny_model("qwen2").train()
    add_fused_lm_head(model, outputs=outputs)
    thinkfuse.patch_model(model, backend="torch")
    got = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert_close_fp32(got.log_probs.detach(), expected.log_probs.detach())
    assert_close_fp32(got.loss.detach(), expected.loss.detach())
    assert torch.equal(got.is_top1, expected.is_top1)


def test_unpatching_keeps_what_another_model_changed_on_a_shared_config():
    """Two models built from one config object: while the first is patched (on a copy), edits
    the second makes to the shared object must survive unpatching the first."""
    from transformers import Qwen2ForCausalLM

    first = tiny_model("qwen2")
    second = Qwen2ForCausalLM(first.config)
    thinkfuse.patch_model(first, backend="torch")
    second.config.use_cache = False
    second.set_attn_implementation("eager")
    first.config.output_hidden_states = True  # the patched model's own edit goes back too
    thinkfuse.unpatch_model(first)
    assert first.config is second.config
    assert second.config.use_cache is False
    assert second.config._attn_implementation == "eager"
    assert second.config.output_hidden_states is True


_LOAD_WITHOUT_THINKFUSE = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps({"thinkfuse": "thinkfuse" in sys.modules, "attn": model.config._attn_implementation,
                  "logits": logits.tolist()}))
"""


def test_save_pretrained_of_a_patched_model_loads_where_thinkfuse_is_absent(tmp_path):
    """config.json carries nothing of thinkfuse, the (tied) weights are the unpatched model's,
    and a process that never imports thinkfuse loads them with its default attention."""
    reference = tiny_model("qwen2")
    model = tiny_model("qwen2")
    thinkfuse.patch_model(model, backend="torch")
    model.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    assert "thinkfuse" not in config and "attn_implementation" not in config
    assert list(model.state_dict()) == list(reference.state_dict())
    ids = tiny_batch(batch=1, seq=6)
    run = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_THINKFUSE, str(tmp_path), json.dumps(ids.tolist())],
                         capture_output=True, text=True, timeout=120, check=True)
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert loaded["thinkfuse"] is False and loaded["attn"] != "thinkfuse"
    with torch.no_grad():
        expected = reference(ids).logits
    assert torch.allclose(torch.tensor(loaded["logits"]), expected, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_trainer_steps_on_padded_batches_match_unpatched(side, tmp_path):
    """Two SGD steps of transformers' Trainer (gradient accumulation 2, labels -100 at padding
    and prompt): the same losses and weights as the unpatched model."""
    from transformers import Trainer, TrainingArguments

    ids, mask, labels = _padded_batch(side)
    data = [dict(input_ids=i, attention_mask=m, labels=lab) for i, m, lab in zip(ids, mask, labels)] * 2

    def train(model):
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                                 max_steps=2, optim="sgd", learning_rate=0.1, report_to=[], save_strategy="no",
                                 logging_steps=1, use_cpu=True, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h], model.state_dict()

    reference_losses, reference_weights = train(tiny_model("qwen2"))
    model = tiny_model("qwen2")
    thinkfuse.patch_model(model, backend="torch")
    losses, weights = train(model)
    assert losses == pytest.approx(reference_losses, rel=1e-5)
    for name, weight in reference_weights.items():
        assert_close_fp32(weights[name], weight)


def test_unpatching_under_a_trl_wrapper_added_after_patching_restores_the_logits():
    """TRL wraps the forward after patch_model (its trainers do so when built): the wrapper keeps
    calling the patched forward, which after unpatch_model must run the original one (logits
    and all), not the fused loss."""
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_model("qwen2")
    ids = tiny_batch()
    thinkfuse.patch_model(model, backend="torch")
    add_fused_lm_head(model)
    thinkfuse.unpatch_model(model)
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.logits is not None and torch.isfinite(out.loss)
