"""thinkfuse inside TRL 1.16's trainers on CPU, with the tiny models: each run (a thinkfuse-patched
model, with or without ``thinkfuse.grpo.patch_trl()``) is compared with the same run on the
unpatched model (same seed, data and config): every logged metric and the trained weights
agree within float32 tolerance. SGD, so that the weights move in proportion to the gradients
(Adam would amplify rounding noise in near-zero gradients). Skipped without trl."""

import math

import pytest
import torch

pytest.importorskip("trl")

import thinkfuse  # noqa: E402
import thinkfuse.grpo  # noqa: E402
from thinkfuse.tiny import VOCAB, tiny_model  # noqa: E402

COMMON = dict(max_steps=2, learning_rate=0.1, optim="sgd", report_to=[], save_strategy="no", use_cpu=True,
              bf16=False, logging_steps=1, disable_tqdm=True, seed=0)
TIMING = ("runtime", "per_second", "step_time")


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # output_dir=None: the trainers' default output folder goes here


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="t0", pad_token="t1", eos_token="t2")


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Tiny models saved to disk: GRPOTrainer builds its reference model (beta > 0) from the
    policy's ``_name_or_path``, so the policy must come from ``from_pretrained``."""
    paths = {}

    def path(family):
        if family not in paths:
            model = tiny_model(family)
            for config in (model.config, model.generation_config):
                config.pad_token_id, config.eos_token_id = 1, 2
            paths[family] = tmp_path_factory.mktemp(family)
            model.save_pretrained(paths[family])
        return paths[family]

    return path


def _load(saved_models, family):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(saved_models(family))


def _metrics(trainer):
    """Every numeric logged value, step by step, timings left out."""
    return [{k: v for k, v in entry.items() if isinstance(v, (int, float)) and not any(t in k for t in TIMING)}
            for entry in trainer.state.log_history]


def _assert_same_run(ours, base):
    """ours and base: (metrics, weights) of two runs."""
    (ours_logs, ours_weights), (base_logs, base_weights) = ours, base
    assert len(ours_logs) == len(base_logs)
    for step, (o, b) in enumerate(zip(ours_logs, base_logs)):
        assert o.keys() == b.keys(), (step, o.keys() ^ b.keys())
        for key in b:
            assert math.isclose(o[key], b[key], rel_tol=1e-4, abs_tol=1e-5), (step, key, o[key], b[key])
    for o, b in zip(ours_weights, base_weights):
        torch.testing.assert_close(o, b, rtol=1e-4, atol=1e-5)


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


_BASE_RUNS = {}


def _base_run(run, *key):
    """The unpatched run ``run()`` (tests comparing with the same run share it)."""
    if key not in _BASE_RUNS:
        _BASE_RUNS[key] = run()
    return _BASE_RUNS[key]


@pytest.fixture
def fused_calls(monkeypatch):
    """Shapes of the hidden states thinkfuse's fused lm_head saw through patch_trl."""
    calls = []
    fused = thinkfuse.grpo.fused_linear_token_logprobs

    def counting(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return fused(*args, **kwargs)

    monkeypatch.setattr(thinkfuse.grpo, "fused_linear_token_logprobs", counting)
    return calls


# --- SFTTrainer --------------------------------------------------------------------------------


def _sft(model, *, trl_patch=False, data="text", metrics=False, after_build=None, **config):
    import numpy as np
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    if data == "text":
        dataset = Dataset.from_dict({"text": ["t5 t6 t7 t8 t9", "t9 t10 t11", "t12 t13 t14 t15 t16 t17",
                                              "t20 t21 t22 t23"]})
    else:
        dataset = Dataset.from_dict({"prompt": ["t5 t6", "t9", "t12 t13 t14", "t20"],
                                     "completion": [" t7 t8 t9", " t10 t11", " t15 t16 t17", " t21 t22 t23"]})
    predictions = []

    def compute_metrics(evaluation):  # needs the logits: SFTTrainer.prediction_step recomputes them
        # padded positions (no label) hold whatever the attention makes of a masked-out query
        scored = np.asarray(evaluation.label_ids) != -100
        predictions.append(np.asarray(evaluation.predictions)[scored])
        return {"logits_mean": float(predictions[-1].mean())}

    args = SFTConfig(output_dir=None, per_device_train_batch_size=2, per_device_eval_batch_size=2, **COMMON,
                     **config)
    with thinkfuse.grpo.patch_trl() if trl_patch else torch.enable_grad():
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=_tokenizer(),
                             eval_dataset=dataset if metrics else None,
                             compute_metrics=compute_metrics if metrics else None)
        if after_build is not None:
            after_build(trainer)
        trainer.train()
        if metrics:
            trainer.evaluate()
    return (_metrics(trainer), _weights(model)), predictions


@pytest.mark.parametrize("family,options", [
    ("qwen2", dict(metrics=True)),
    ("qwen2", dict(data="prompt-completion", completion_only_loss=True, gradient_accumulation_steps=2)),
    ("qwen2", dict(packing=True, max_length=8)),
    ("mistral", dict(padding_free=True, max_length=None, metrics=True)),
], ids=["eval-compute-metrics", "completion-only-ga", "packing", "mistral-padding-free-eval"])
def test_sft_on_a_patched_model_matches_the_unpatched_run(family, options):
    """Loss, entropy, mean_token_accuracy, grad_norm, eval loss / metrics (the eval logits too)
    and the trained weights; with patch_trl on (SFTTrainer asks its fused lm_head for is_top1,
    which TRL's own kernel then computes)."""
    base, base_predictions = _base_run(lambda: _sft(tiny_model(family), **options), "sft", family, repr(options))
    model = tiny_model(family)
    thinkfuse.patch_model(model)
    ours, predictions = _sft(model, trl_patch=True, **options)
    _assert_same_run(ours, base)
    assert {"loss", "mean_token_accuracy", "entropy"} <= base[0][0].keys()
    assert not all(torch.equal(w, p) for w, p in zip(base[1], _weights(tiny_model(family)))), "nothing trained"
    for o, b in zip(predictions, base_predictions):
        assert o.shape == b.shape and o.shape[0] > 0 and o.shape[-1] == VOCAB
        torch.testing.assert_close(torch.from_numpy(o), torch.from_numpy(b), rtol=1e-4, atol=1e-4)


def test_sft_with_the_model_patched_after_the_trainer_was_built():
    """patch_model on the model SFTTrainer has already given a fused lm_head: thinkfuse's
    forward wraps TRL's (its fused_lm_head mode still works) and the run is unchanged."""
    options = dict(metrics=True)
    base, _ = _base_run(lambda: _sft(tiny_model("qwen2"), **options), "sft", "qwen2", repr(options))

    def patch(trainer):
        assert thinkfuse.patch_model(trainer.model).patched["swiglu"] == 2

    late, _ = _sft(tiny_model("qwen2"), after_build=patch, **options)
    _assert_same_run(late, base)


# --- GRPOTrainer -------------------------------------------------------------------------------


def _reward(completions, **_):
    return [float(len(c)) for c in completions]


def _grpo(model, *, trl_patch=False, callbacks=(), after_build=None, **config):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    options = dict(per_device_train_batch_size=2, num_generations=2, max_completion_length=4, **COMMON)
    options.update(config)
    args = GRPOConfig(output_dir=None, **options)
    dataset = Dataset.from_dict({"prompt": ["t5 t6 t7", "t9 t10", "t11 t12 t13 t14", "t40"]})
    with thinkfuse.grpo.patch_trl() if trl_patch else torch.enable_grad():
        trainer = GRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=dataset,
                              processing_class=_tokenizer(), callbacks=list(callbacks))
        if after_build is not None:
            after_build(trainer)
        trainer.train()
    return trainer, (_metrics(trainer), _weights(model))


@pytest.mark.parametrize("family,trl_patch,options", [
    ("qwen2", True, dict(loss_type="grpo", beta=0.04)),
    ("qwen2", False, dict(loss_type="grpo", beta=0.04)),
    ("qwen2", True, dict(loss_type="dr_grpo", importance_sampling_level="sequence", top_entropy_quantile=0.5)),
    ("qwen2", True, dict(loss_type="dapo", gradient_accumulation_steps=2, steps_per_generation=2,
                         num_iterations=2)),
    ("mistral", True, dict(loss_type="dapo", cast_lm_head_to_fp32=True)),
], ids=["grpo-beta", "grpo-beta-no-patch-trl", "dr_grpo-gspo-entropy-mask", "dapo-ga-steps-per-generation",
        "mistral-fp32-head"])
def test_grpo_on_a_patched_model_matches_the_unpatched_run(saved_models, fused_calls, family, trl_patch, options):
    """Every logged metric (loss, kl, entropy, clip ratios, rewards...) and the trained weights.
    With beta > 0 TRL builds the reference model from the policy's path with the policy's
    attention implementation ("thinkfuse" once patched): it runs thinkfuse's attention only."""
    base = _base_run(lambda: _grpo(_load(saved_models, family), **options)[1], "grpo", family, repr(options))
    model = _load(saved_models, family)
    thinkfuse.patch_model(model)
    fused_calls.clear()
    trainer, ours = _grpo(model, trl_patch=trl_patch, **options)
    _assert_same_run(ours, base)
    assert bool(fused_calls) == trl_patch
    if options.get("beta"):
        assert "kl" in base[0][0] and base[0][0]["kl"] >= 0
        assert trainer.ref_model.config._attn_implementation == "thinkfuse"


def test_grpo_patched_after_build_unpatched_and_patch_trl_undone_mid_run(saved_models, fused_calls):
    """The order of patching does not matter: patch_model after the trainer was built (policy and
    reference model, whose forwards TRL has already wrapped), unpatch_model after the first
    step, patch_trl twice and both undone after the first step: the run equals the plain one."""
    from transformers import TrainerCallback

    import trl.trainer.utils as trl_utils

    options = dict(loss_type="grpo", beta=0.04)
    base = _base_run(lambda: _grpo(_load(saved_models, "qwen2"), **options)[1], "grpo", "qwen2", repr(options))
    original_chunked = trl_utils._ChunkedLogProbFunction

    def patch_both(trainer):
        thinkfuse.patch_model(trainer.model)
        thinkfuse.patch_model(trainer.ref_model)

    _, late = _grpo(_load(saved_models, "qwen2"), after_build=patch_both, **options)
    _assert_same_run(late, base)

    patches = []

    class UndoAfterFirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                assert thinkfuse.unpatch_model(model) > 0
                for patch in patches:
                    patch.undo()
                assert trl_utils._ChunkedLogProbFunction is original_chunked

    model = _load(saved_models, "qwen2")
    thinkfuse.patch_model(model)
    patches += [thinkfuse.grpo.patch_trl(), thinkfuse.grpo.patch_trl()]
    try:
        fused_calls.clear()
        _, undone = _grpo(model, callbacks=[UndoAfterFirstStep()], **options)
    finally:
        for patch in patches:
            patch.undo()
    _assert_same_run(undone, base)
    assert fused_calls
    assert trl_utils._ChunkedLogProbFunction is original_chunked


# --- DPOTrainer --------------------------------------------------------------------------------


def test_dpo_on_a_patched_model_matches_the_unpatched_run(saved_models, fused_calls):
    """DPOTrainer (a reference model loaded from the policy's path): its policy asks the fused
    lm_head for mean_logits / is_top1 (TRL's kernel), the reference for log-probs only
    (thinkfuse's, under patch_trl)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    dataset = Dataset.from_dict({"prompt": ["t5 t6", "t9", "t12 t13 t14", "t20"],
                                 "chosen": [" t7 t8", " t10 t11", " t15", " t21 t22"],
                                 "rejected": [" t30", " t31 t32 t33", " t34 t35", " t36"]})

    def run(patched):
        model = _load(saved_models, "qwen2")
        if patched:
            thinkfuse.patch_model(model)
        args = DPOConfig(output_dir=None, per_device_train_batch_size=2, **COMMON)
        with thinkfuse.grpo.patch_trl() if patched else torch.enable_grad():
            trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=_tokenizer())
            trainer.train()
        return _metrics(trainer), _weights(model)

    base = run(False)
    fused_calls.clear()
    _assert_same_run(run(True), base)
    assert fused_calls
    assert "rewards/accuracies" in base[0][0]


# --- what patch_trl hands back to TRL ----------------------------------------------------------


def test_patch_trl_leaves_float64_to_trl():
    """TRL's fused lm_head and selective_log_softmax take float64 (a float64 model, a float64
    logits tensor); thinkfuse's ops do not, so under patch_trl those calls are TRL's own instead
    of raising TypeError."""
    import trl.trainer.utils as trl_utils

    from thinkfuse.tiny import tiny_batch

    def fused_run(patched):
        model = tiny_model("qwen2").double().train()
        trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
        input_ids = tiny_batch(2, 7)
        with thinkfuse.grpo.patch_trl() if patched else torch.enable_grad():
            out = model(input_ids=input_ids, labels=input_ids, fused_lm_head=True)
            (out.loss + 0.1 * out.entropy.sum()).backward()
        return out.log_probs.detach(), out.entropy.detach(), model.lm_head.weight.grad

    for ours, trl in zip(fused_run(True), fused_run(False)):
        assert torch.equal(ours, trl)

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 33, dtype=torch.float64, generator=gen)
    index = torch.randint(0, 33, (2, 5), generator=gen)
    expected = trl_utils.selective_log_softmax(logits, index, temperature=0.7)
    with thinkfuse.grpo.patch_trl():
        ours = trl_utils.selective_log_softmax(logits, index, temperature=0.7)
    assert ours.dtype == torch.float64 and torch.equal(ours, expected)


def test_patch_trl_reaches_trainers_that_imported_selective_log_softmax_by_name(monkeypatch):
    """trl 1.16's trainers that call selective_log_softmax on full logits (trl.experimental's CPO,
    ORPO, SDPO, ...) imported it by name: patch_trl replaces their reference too, and undo puts
    TRL's back."""
    import importlib

    import trl.trainer.utils as trl_utils

    cpo = importlib.import_module("trl.experimental.cpo.cpo_trainer")
    original = trl_utils.selective_log_softmax
    assert cpo.selective_log_softmax is original
    calls = []
    token_logprobs = thinkfuse.grpo.token_logprobs
    monkeypatch.setattr(thinkfuse.grpo, "token_logprobs", lambda *a, **k: calls.append(1) or token_logprobs(*a, **k))
    gen = torch.Generator().manual_seed(0)
    logits, index = torch.randn(2, 5, 33, generator=gen), torch.randint(0, 33, (2, 5), generator=gen)
    with thinkfuse.grpo.patch_trl():
        ours = cpo.selective_log_softmax(logits, index)
    assert calls
    torch.testing.assert_close(ours, original(logits, index), rtol=1e-5, atol=1e-5)
    assert cpo.selective_log_softmax is original and trl_utils.selective_log_softmax is original


def test_selective_log_softmax_imported_while_patched_is_trls_after_undo(monkeypatch):
    """A module importing selective_log_softmax by name while TRL is patched keeps the
    replacement: once the patch is undone, that replacement calls TRL's own."""
    import trl.trainer.utils as trl_utils

    calls = []
    token_logprobs = thinkfuse.grpo.token_logprobs
    monkeypatch.setattr(thinkfuse.grpo, "token_logprobs", lambda *a, **k: calls.append(1) or token_logprobs(*a, **k))
    gen = torch.Generator().manual_seed(0)
    logits, index = torch.randn(2, 5, 33, generator=gen), torch.randint(0, 33, (2, 5), generator=gen)
    expected = trl_utils.selective_log_softmax(logits, index)
    with thinkfuse.grpo.patch_trl():
        imported_by_name = trl_utils.selective_log_softmax
        imported_by_name(logits, index)
    assert len(calls) == 1
    assert torch.equal(imported_by_name(logits, index), expected)
    assert len(calls) == 1
