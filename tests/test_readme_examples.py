"""README.md's "Use" examples, run as written on tiny models (thinkfuse.tiny) and small random
tensors: a checkpoint is a tiny model saved to a temporary directory, ``max_new_tokens`` is small,
and the TRL trainer is a one-step GRPOTrainer. One test per code block; an example that stops
working (a renamed argument, a missing stats key) fails here.
"""

import pytest
import torch

import thinkfuse
from thinkfuse.tiny import VOCAB, tiny_batch, tiny_model


def _checkpoint(tmp_path, family: str) -> str:
    """A tiny model of ``family`` saved like a downloaded checkpoint."""
    tiny_model(family).save_pretrained(tmp_path)
    return str(tmp_path)


def test_use_patch_model_and_ops(tmp_path, device):
    import thinkfuse
    from transformers import AutoModelForCausalLM

    ids = tiny_batch(device=device)
    model = AutoModelForCausalLM.from_pretrained(_checkpoint(tmp_path, "qwen2"), dtype="bfloat16").to(device)
    before = model(ids).logits
    report = thinkfuse.patch_model(model)          # backend=None: fastest for the model's device
    print(report)                                  # modules patched per kind, backend used
    text = str(report)
    assert "Qwen2ForCausalLM" in text and "backend auto -> " + report.resolved_backend in text
    for kind in ("rms_norm", "swiglu", "rope", "attention"):
        assert report.patched[kind] > 0 and kind in text
    assert report.attention.startswith("thinkfuse:")
    thinkfuse.unpatch_model(model)                 # original forwards restored exactly
    assert torch.equal(model(ids).logits, before)

    # ops directly
    x, weight, r = (torch.randn(4, 64, device=device), torch.randn(64, device=device),
                    torch.randn(4, 64, device=device))
    y = thinkfuse.ops.rms_norm(x, weight, 1e-6)
    y, h = thinkfuse.ops.rms_norm(x, weight, 1e-6, residual=r)   # fused residual add
    assert y.shape == x.shape and torch.allclose(h, x + r)
    with thinkfuse.use_backend("triton"):
        y = thinkfuse.ops.rms_norm(x, weight)
    assert torch.allclose(y, thinkfuse.reference.rms_norm(x, weight, 1e-6), atol=1e-5)


def test_mimo_without_remote_code_and_mtp_generate(tmp_path, device):
    import thinkfuse  # registers model_type "mimo" with AutoConfig / AutoModelForCausalLM
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_checkpoint(tmp_path, "mimo")).to(device)   # no trust_remote_code
    assert isinstance(model, thinkfuse.models.MiMoForCausalLM)
    report = thinkfuse.patch_model(model)                                 # trunk and MTP layers
    assert report.family == "mimo"
    input_ids = tiny_batch(2, 7, device=device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # left padding
    sequences, stats = thinkfuse.speculative.mtp_generate(model, input_ids, max_new_tokens=8,
                                                          attention_mask=attention_mask)
    print(stats["acceptance_rate"], stats["target_forwards"])   # temperature 0 == greedy generate
    greedy = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(sequences, greedy)

    sequences, stats = thinkfuse.speculative.mtp_generate(model, input_ids, max_new_tokens=8, cuda_graph=True,
                                                          temperature=0.6, top_p=0.95)
    assert sequences.shape[0] == 2 and 7 < sequences.shape[1] <= 7 + 8
    assert {"acceptance_rate", "target_forwards", "cuda_graph"} <= stats.keys()
    sequences, stats = thinkfuse.static_decode.static_generate(model, input_ids, max_new_tokens=8,
                                                               temperature=0.6, top_p=0.95)
    assert sequences.shape[0] == 2 and 7 < sequences.shape[1] <= 7 + 8
    sequences, stats = thinkfuse.static_decode.greedy_generate(model, input_ids, max_new_tokens=8)
    assert sequences.shape[0] == 2 and 7 < sequences.shape[1] <= 7 + 8 and "new_tokens" in stats


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="t0", pad_token="t1", eos_token="t2")


def test_grpo_loss_and_patch_trl(tmp_path, monkeypatch):
    from thinkfuse.grpo import GRPOLoss, grpo_loss, patch_trl

    model = tiny_model("qwen2")
    ids, (B, T) = tiny_batch(2, 9), (2, 5)
    hidden = model.model(ids).last_hidden_state[:, -T - 1:-1]   # the states that predict the completion
    completion_ids, mask = ids[:, -T:], torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    advantages = torch.randn(B)
    old_logprobs, ref_logprobs = -torch.rand(B, T), -torch.rand(B, T)

    # TRL's GRPOConfig defaults (trl 1.16): loss_type="dapo", use_bias_correction_kl=True
    loss_fn = GRPOLoss(loss_type="dapo", beta=0.04, use_bias_correction_kl=True)
    loss, metrics = loss_fn(hidden, model.lm_head.weight, completion_ids, mask, advantages,
                            old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    loss.backward()
    assert model.lm_head.weight.grad is not None
    assert {"clip_ratio", "kl", "ratio_mean", "logprobs"} <= metrics.keys()
    same, _ = grpo_loss(metrics["logprobs"], old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
                        beta=0.04, loss_type="dapo", use_bias_correction_kl=True)
    assert torch.allclose(loss.detach(), same, atol=1e-5)

    # "inside TRL": a one-step GRPOTrainer on the tiny model, built before patch_trl as in the README
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    for config in (model.config, model.generation_config):
        config.pad_token_id, config.eos_token_id = 1, 2
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=4, max_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                      bf16=False, disable_tqdm=True, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [float(len(c)) for c in completions],
                          args=args, train_dataset=Dataset.from_dict({"prompt": ["t5 t6 t7", "t9 t10"]}),
                          processing_class=_tiny_tokenizer())
    calls = []
    fused = thinkfuse.grpo.fused_linear_token_logprobs
    monkeypatch.setattr(thinkfuse.grpo, "fused_linear_token_logprobs",
                        lambda *a, **k: calls.append(1) or fused(*a, **k))

    with patch_trl():            # TRL's GRPOTrainer computes its log-probs with thinkfuse
        trainer.train()
    assert calls, "GRPOTrainer did not compute its log-probs with thinkfuse"
