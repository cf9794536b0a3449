"""mtp_generate: greedy output equals model.generate token for token (left padding, several
lengths, eos), acceptance statistics with a drafter that is often right, mixed accept/reject
batches (cache holes) and sampling.

Tiny models run in float64 here, so the 2-token verify forward and generate's 1-token steps
cannot pick different argmaxes through rounding.
"""

import pytest
import torch
from conftest import DEVICE
from speculative_helpers import record_acceptances

import thinkfuse
from thinkfuse import speculative
from thinkfuse.speculative import mtp_generate
from thinkfuse.tiny import VOCAB, tiny_batch, tiny_model


def _model(dtype=torch.float64, seed=0):
    return tiny_model("mimo", seed=seed, dtype=dtype).to(DEVICE)


def _padded_batch():
    ids = tiny_batch(3, 9, seed=1, device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    return ids, mask


def _greedy(model, ids, mask, max_new_tokens, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 16])
def test_greedy_equals_generate(max_new_tokens):
    model = _model()
    ids, mask = _padded_batch()
    sequences, stats = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens)
    assert torch.equal(sequences, _greedy(model, ids, mask, max_new_tokens))
    assert stats["new_tokens"] == 3 * max_new_tokens
    assert stats["target_forwards"] == 1 + stats["steps"]


def _oracle_drafter(model, monkeypatch, reference, mask, miss_every=3):
    """Make the MTP layer draft the true next-next greedy token (read off ``reference``, the
    greedy output), except at positions where ``(row + t) % miss_every == 0``: rows then accept
    different counts in the same step. The real MTP layer still runs (its cache must stay
    right); only its logits are replaced."""
    full_mask = torch.cat([mask, torch.ones_like(reference[:, mask.shape[1]:])], dim=1)
    real_tokens = [reference[r][full_mask[r].bool()] for r in range(reference.shape[0])]
    original = model.mtp_forward

    def drafting(hidden, next_ids, *, position_ids, logits_to_keep=0, **kwargs):
        out = original(hidden, next_ids, position_ids=position_ids, logits_to_keep=logits_to_keep, **kwargs)
        target = (position_ids[:, -logits_to_keep:] if logits_to_keep else position_ids) + 2
        logits = torch.zeros_like(out.logits)
        for r in range(target.shape[0]):
            for s, position in enumerate(target[r].tolist()):
                token = int(real_tokens[r][position]) if position < len(real_tokens[r]) else 0
                if (r + position) % miss_every == 0:
                    token = (token + 1) % VOCAB
                logits[r, s, token] = 1.0
        out.logits = logits
        return out

    monkeypatch.setattr(model, "mtp_forward", drafting)


def test_often_right_drafter_is_accepted_and_saves_forwards(monkeypatch):
    model = _model()
    ids, mask = _padded_batch()
    max_new_tokens = 16
    reference = _greedy(model, ids, mask, max_new_tokens)
    _oracle_drafter(model, monkeypatch, reference, mask)
    steps = record_acceptances(monkeypatch, speculative.reference)  # float64 verifies by the reference
    sequences, stats = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens)
    assert torch.equal(sequences, reference)
    assert any(len(set(step)) > 1 for step in steps)  # rows disagreed: masked cache slots
    assert any(set(step) == {0} for step in steps)  # all rejected: the cropping path
    assert 0 < stats["accepted"] < stats["drafted"]
    assert stats["target_forwards"] < max_new_tokens + 1
    assert stats["acceptance_rate"] == stats["accepted"] / stats["drafted"]


def test_always_right_drafter_batch_of_one(monkeypatch):
    model = _model()
    ids = tiny_batch(1, 6, seed=2, device=DEVICE)
    mask = torch.ones_like(ids)
    reference = _greedy(model, ids, mask, 9)
    _oracle_drafter(model, monkeypatch, reference, mask, miss_every=10**9)
    sequences, stats = mtp_generate(model, ids, max_new_tokens=9)
    assert torch.equal(sequences, reference)
    # prefill emits 1 token, every verify step 2: 1 + 4 steps for 9 tokens
    assert stats["target_forwards"] == 5 and stats["acceptance_rate"] == 1.0


def test_always_wrong_drafter_still_decodes_greedily(monkeypatch):
    """Every row rejects every draft: the dead slot is cropped off the caches each step."""
    model = _model()
    ids, mask = _padded_batch()
    reference = _greedy(model, ids, mask, 6)
    _oracle_drafter(model, monkeypatch, reference, mask, miss_every=1)
    sequences, stats = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(sequences, reference)
    assert stats["accepted"] == 0 and stats["target_forwards"] == 6


def _eos_from_the_middle(reference, prompt_length):
    """A token that row 0 emits in the middle of its continuation (and first emits there)."""
    row = reference[0, prompt_length:].tolist()
    for index in range(2, len(row) - 2):
        if row[index] not in row[:index]:
            return row[index]
    pytest.skip("no suitable eos token in this continuation")


@pytest.mark.parametrize("oracle", [False, True])
def test_eos_in_the_middle(monkeypatch, oracle):
    model = _model()
    ids, mask = _padded_batch()
    plain = _greedy(model, ids, mask, 12)
    eos = _eos_from_the_middle(plain, ids.shape[1])
    reference = _greedy(model, ids, mask, 12, eos_token_id=eos, pad_token_id=VOCAB - 1)
    if oracle:
        _oracle_drafter(model, monkeypatch, plain, mask)
    sequences, _ = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(sequences[:, : ids.shape[1] + 1], reference[:, : ids.shape[1] + 1])
    model.generation_config.pad_token_id = VOCAB - 1
    sequences, _ = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(sequences, reference)
    assert (sequences[0, ids.shape[1]:] == VOCAB - 1).any()  # row 0 was padded after its eos
    # as generate, a tensor of eos ids (0-d or 1-d) is accepted
    as_tensor, _ = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=torch.tensor(eos))
    assert torch.equal(as_tensor, reference)


def test_every_row_ending_early_shortens_the_output():
    model = _model()
    ids, mask = _padded_batch()
    plain = _greedy(model, ids, mask, 10)
    eos = [int(plain[r, ids.shape[1] + 2]) for r in range(3)]  # each row's third new token
    reference = _greedy(model, ids, mask, 10, eos_token_id=eos, pad_token_id=0)
    model.generation_config.pad_token_id = 0
    sequences, stats = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos)
    assert torch.equal(sequences, reference) and sequences.shape[1] <= ids.shape[1] + 3


def test_float32_with_the_kernel_backend(kernel_backend):
    """The float32 path goes through the op (and its kernels); patched too."""
    model = _model(torch.float32, seed=3)
    ids, mask = _padded_batch()
    reference = _greedy(model, ids, mask, 6)
    thinkfuse.patch_model(model, backend=kernel_backend)
    with thinkfuse.use_backend(kernel_backend):
        sequences, _ = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(sequences, reference)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sampling_runs_and_is_reproducible(dtype):
    model = _model(dtype)
    ids, mask = _padded_batch()

    def sample(seed):
        generator = torch.Generator(device=DEVICE).manual_seed(seed)
        return mtp_generate(model, ids, attention_mask=mask, max_new_tokens=8, temperature=0.8, generator=generator)

    (first, stats), (again, _), (other, _) = sample(0), sample(0), sample(1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == (3, ids.shape[1] + 8) and torch.equal(first[:, : ids.shape[1]], ids)
    assert ((first >= 0) & (first < VOCAB)).all()
    assert stats["drafted"] > 0 and stats["target_forwards"] == 1 + stats["steps"]


def test_zero_new_tokens():
    model = _model()
    ids, mask = _padded_batch()
    sequences, stats = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=0)
    assert torch.equal(sequences, ids) and stats["target_forwards"] == 0 and stats["acceptance_rate"] == 0.0


def test_bad_arguments():
    model = _model()
    ids, mask = _padded_batch()
    with pytest.raises(TypeError, match="MiMoForCausalLM"):
        mtp_generate(tiny_model("qwen2"), ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        mtp_generate(model, ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        mtp_generate(model, ids, max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="left padding"):
        mtp_generate(model, ids, attention_mask=mask.flip(1), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask"):
        mtp_generate(model, ids, attention_mask=mask[:, 1:], max_new_tokens=2)
    with pytest.raises(TypeError, match="input_ids"):
        mtp_generate(model, ids.float(), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must be token ids"):
        mtp_generate(model, ids + model.config.vocab_size, max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must be token ids"):
        mtp_generate(model, ids - ids.max() - 1, max_new_tokens=2)
