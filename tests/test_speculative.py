"""mtp_generate: greedy output equals model.generate token for token (left padding, several
lengths, eos), acceptance statistics with a drafter that is often right, mixed accept/reject
batches (dead slots moved to the rows' fronts), sliding-window trunks and sampling.

Tiny models run in float64 here, so the 2-token verify forward and generate's 1-token steps
cannot pick different argmaxes through rounding.
"""

import pytest
import torch
from conftest import DEVICE
from speculative_helpers import chi_square_p_value, filtered_probs, record_acceptances, record_verify_counts

import thinkfuse
from thinkfuse import speculative
from thinkfuse.sampling import Sampling, pick, verify, warpers
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
    steps = record_acceptances(monkeypatch, thinkfuse.reference)  # float64 verifies by the reference
    sequences, stats = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens)
    assert torch.equal(sequences, reference)
    assert any(len(set(step)) > 1 for step in steps)  # rows disagreed: dead slots moved
    assert any(set(step) == {0} for step in steps)  # all rejected: the cropping path
    assert 0 < stats["accepted"] < stats["drafted"]
    assert stats["target_forwards"] < max_new_tokens + 1
    assert stats["acceptance_rate"] == stats["accepted"] / stats["drafted"]


def _record_slot_masks(monkeypatch) -> list:
    """The slot mask after each step's dead slots were moved (the layout the next verify sees)."""
    masks = []
    move = speculative._move_dead_slots_to_the_front

    def recording(state):
        move(state)
        masks.append(state.slot_mask.clone())

    monkeypatch.setattr(speculative, "_move_dead_slots_to_the_front", recording)
    return masks


def test_mixed_steps_keep_every_row_padding_then_tokens(monkeypatch):
    """A rejecting row's dead slot is rotated to its front: no row ever has a hole, and its
    tokens stay in the cache in order (greedy output unchanged)."""
    model = _model()
    ids, mask = _padded_batch()
    reference = _greedy(model, ids, mask, 16)
    _oracle_drafter(model, monkeypatch, reference, mask)
    steps = record_acceptances(monkeypatch, thinkfuse.reference)
    masks = _record_slot_masks(monkeypatch)
    sequences, _ = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=16)
    assert torch.equal(sequences, reference)
    assert any(len(set(step)) > 1 for step in steps)
    grew_padding = False
    for slot_mask in masks:
        assert torch.equal(slot_mask, slot_mask.cummax(dim=1).values)  # zeros, then ones
        grew_padding |= bool((slot_mask == 0).sum() > (mask == 0).sum())
    assert grew_padding  # some rejection became padding


def test_mtp_logits_follow_the_verified_tokens_through_mixed_steps(monkeypatch):
    """The MTP layer drafts from its own cache, whose rejecting rows' slots are rotated as the
    trunk's are: at every draft its real logits equal the MTP layer run from scratch (no cache,
    no padding) over the row's verified tokens. Greedy output cannot show this (drafts only
    change how many tokens a step emits), so the drafts come from an oracle at this level while
    the real logits are kept."""
    model = _model()
    ids, mask = _padded_batch()
    reference = _greedy(model, ids, mask, 12)
    real_tokens = [reference[r, ids.shape[1] - int(mask[r].sum()):] for r in range(3)]
    drafted_from = []  # (pending token's position [B], real MTP logits [B, V]) per draft
    mtp_logits = speculative._mtp_logits

    def oracle(model_, state, mtp_input):
        logits = mtp_logits(model_, state, mtp_input)
        drafted_from.append((state.position.tolist(), logits))
        drafts = []
        for r, position in enumerate(state.position.tolist()):  # the draft is for position + 1
            token = int(real_tokens[r][position + 1]) if position + 1 < len(real_tokens[r]) else 0
            drafts.append((token + 1) % VOCAB if (r + position) % 3 == 0 else token)
        return torch.nn.functional.one_hot(torch.tensor(drafts, device=DEVICE), VOCAB).to(logits.dtype)

    monkeypatch.setattr(speculative, "_mtp_logits", oracle)
    steps = record_acceptances(monkeypatch, thinkfuse.reference)
    sequences, _ = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(sequences, reference)
    assert any(len(set(step)) > 1 for step in steps)  # mixed steps: rejecting rows' slots rotated
    checked = 0
    with torch.no_grad():
        for positions, logits in drafted_from:
            for r, position in enumerate(positions):
                if position >= len(real_tokens[r]):  # a row past max_new_tokens
                    continue
                tokens = real_tokens[r][None, : position + 1]  # ends with the pending token
                _, hidden = model.forward_with_pre_norm_hidden(tokens[:, :-1])
                expected = model.mtp_forward(hidden, tokens[:, 1:], position_ids=torch.arange(position, device=DEVICE),
                                             logits_to_keep=1).logits[0, -1]
                torch.testing.assert_close(logits[r], expected)
                checked += 1
    assert checked >= 3 * len(steps)


def _sliding_window_model(window: int):
    """The tiny MiMo with a sliding window on every trunk layer (MiMo-7B has none; a fine-tune
    may): a hole in a row would narrow the window, and a sliding cache layer could not roll back."""
    config = _model().config
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, window, 0
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    torch.manual_seed(0)
    model = type(_model())(config).to(device=DEVICE, dtype=torch.float64).eval()
    # Sharper attention (logits x9): tiny random models hardly depend on it otherwise, and a key
    # in the wrong slot must change the tokens.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(3.0)
    return model


@pytest.mark.parametrize("miss_every", [3, 1])
def test_sliding_window_trunk_equals_generate(monkeypatch, miss_every):
    """Window 4 over 9-token prompts and 16 new tokens: the window decides most logits. Mixed
    steps (3) and all-rejected steps, which crop the trunk cache (1)."""
    model = _sliding_window_model(4)
    ids, mask = _padded_batch()
    reference = _greedy(model, ids, mask, 16)
    _oracle_drafter(model, monkeypatch, reference, mask, miss_every=miss_every)
    sequences, _ = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=16)
    assert torch.equal(sequences, reference)


def test_patched_sliding_window_trunk_with_mixed_steps(monkeypatch, kernel_backend):
    """Patched, rows that padded at different steps decode through thinkfuse's attention with
    per-row padding and the window; float32, against the unpatched model's generate."""
    model = _sliding_window_model(4).float()
    ids, mask = _padded_batch()
    reference = _greedy(model, ids, mask, 12)
    thinkfuse.patch_model(model, backend=kernel_backend)
    _oracle_drafter(model, monkeypatch, reference, mask)
    with thinkfuse.use_backend(kernel_backend):
        sequences, _ = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(sequences, reference)


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
    counts = record_verify_counts(monkeypatch, DEVICE)
    sequences, stats = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(sequences, reference)
    assert (sequences[0, ids.shape[1]:] == VOCAB - 1).any()  # row 0 was padded after its eos
    # Drafts count for the rows still generating only: row 0's after its eos do not.
    assert stats["drafted"] == int(counts["generating"]) < 3 * stats["steps"]
    assert stats["accepted"] == int(counts["accepted"])
    if oracle:  # row 0 still accepts the oracle's drafts after its eos
        assert int(counts["accepted_when_done"]) > 0
    # as generate, a tensor of eos ids (0-d or 1-d) is accepted
    as_tensor, _ = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=torch.tensor(eos))
    assert torch.equal(as_tensor, reference)


def test_without_a_pad_id_rows_are_padded_with_the_first_eos_id():
    """generation_config.pad_token_id None and two eos ids: a row that ends on the second one is
    padded with the first, as generate pads."""
    model = _model()
    ids, mask = _padded_batch()
    plain = _greedy(model, ids, mask, 12)
    ends = _eos_from_the_middle(plain, ids.shape[1])
    never = next(t for t in range(VOCAB) if t not in plain.flatten().tolist())  # ends no row: only pads
    assert model.generation_config.pad_token_id is None
    reference = _greedy(model, ids, mask, 12, eos_token_id=[never, ends])
    sequences, _ = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[never, ends])
    assert torch.equal(sequences, reference)
    assert (sequences[0, ids.shape[1]:] == never).any()


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


def test_static_sampling_draws_as_the_dynamic_loop():
    """The static engine draws its random numbers in the dynamic loop's order (prefill sample,
    draft, then per step the verification's uniforms and the next draft), so with one seed both
    emit the same tokens; float32, filters on, a left-padded batch."""
    model = _model(torch.float32)
    ids, mask = _padded_batch()

    def sample(cuda_graph):
        generator = torch.Generator(device=DEVICE).manual_seed(7)
        return mtp_generate(model, ids, attention_mask=mask, max_new_tokens=10, temperature=0.9, top_k=40,
                            top_p=0.95, generator=generator, cuda_graph=cuda_graph)

    (dynamic, dynamic_stats), (static, static_stats) = sample(False), sample(True)
    assert torch.equal(static, dynamic)
    assert static_stats["accepted"] == dynamic_stats["accepted"] and static_stats["drafted"] > 0


def test_sampling_warpers_are_generates():
    """temperature, then top-k, top-p, min-p, with transformers' classes: the scores generate's
    logits processor would sample from."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 3, 50, generator=torch.Generator().manual_seed(0))
    logits[0, 0, :7] = 2.0  # ties at the k-th logit are kept
    sampling = Sampling(0.7, None, warpers(5, 0.9, 0.05))
    generate = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(5), TopPLogitsWarper(0.9),
                                    MinPLogitsWarper(0.05)])
    assert torch.equal(sampling.scores(logits), generate(None, logits.reshape(-1, 50)).view(4, 3, 50))
    assert warpers(None, None, None) is None
    assert warpers(0, 1.0, 0.0) is None  # settings that filter nothing


def test_a_temperature_that_overflows_the_scores_samples_their_limit():
    """logits / 1e-40 overflows float32 (and 1e-300 is 0 there): the sampled distribution is then
    its limit (all mass on the largest logit, shared by ties), not softmax's NaNs, from which the
    race drew token 0."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    logits[:, 0] = logits.min() - 1  # token 0 is never the largest
    logits[3, 7] = logits[3, 9] = logits[3].max() + 1  # a tie
    limit = torch.zeros(4, 50)
    limit[torch.arange(3), logits[:3].argmax(-1)] = 1.0
    limit[3, 7] = limit[3, 9] = 0.5
    for temperature, filters in ((1e-40, None), (1e-40, warpers(top_k=5)), (1e-300, None)):  # 1e-300: 0 in float32
        tokens, probs = pick(logits, Sampling(temperature, torch.Generator().manual_seed(0), filters))
        assert torch.equal(probs, limit)
        assert torch.equal(tokens[:3], logits[:3].argmax(-1)) and int(tokens[3]) in (7, 9)


@pytest.mark.parametrize("temperature", [1e-40, 1e-25])
def test_a_tiny_temperature_accepts_the_drafts_greedy_decoding_would(temperature):
    """At such temperatures the target is, to float32, its argmax: a draft equal to it is accepted
    (the kernels divided the logits themselves, overflowed, and rejected every draft)."""
    logits = torch.randn(3, 3, 50, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    draft = logits[:, :2].argmax(-1)
    sampling = Sampling(temperature, torch.Generator(device=DEVICE).manual_seed(0), None)
    tokens, num_accepted = verify(draft, logits, sampling, None)
    assert num_accepted.tolist() == [2, 2, 2]
    assert torch.equal(tokens, logits.argmax(-1))  # both drafts, then the bonus token


def test_a_tiny_temperature_decodes_greedily():
    """The limit of ever smaller temperatures is greedy decoding (these logits have no ties)."""
    model = _model()
    ids, mask = _padded_batch()
    sequences, _ = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=6, temperature=1e-40)
    assert torch.equal(sequences, _greedy(model, ids, mask, 6))


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("filters", [dict(top_k=6), dict(top_p=0.7), dict(top_k=20, top_p=0.9, min_p=0.1)],
                         ids=["top_k", "top_p", "all"])
def test_filtered_sampling_follows_generates_distribution(filters, cuda_graph):
    """Many copies of one prompt, 3 new tokens: the first is the prefill's sample, the second
    comes out of verification (an accepted draft or the correction), the third from a bonus token
    or the next step. Each, given the tokens before it, follows the filtered softmax, and none
    lies outside the filtered support. Static: thinkfuse.static_decode's engine (eager here), in
    float32 (it runs the kernels' dtypes)."""
    model = _model(torch.float32 if cuda_graph else torch.float64)
    with torch.no_grad():
        model.lm_head.weight.mul_(16)  # peaked distributions: the filters keep a few tokens
    rows, temperature = 6000, 0.6
    prompt = tiny_batch(1, 6, seed=2, device=DEVICE)
    ids = prompt.expand(rows, -1).contiguous()
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    sequences, stats = mtp_generate(model, ids, max_new_tokens=3, temperature=temperature, generator=generator,
                                    eos_token_id=[], cuda_graph=cuda_graph, **filters)
    assert stats["drafted"] > 0
    new = sequences[:, prompt.shape[1]:]
    for position in range(3):
        # the most frequent prefix of the new tokens so far, and the rows that continue it
        if position == 0:
            rows_with, prefix = torch.ones(rows, dtype=torch.bool, device=DEVICE), prompt
        else:
            before, counts = new[:, :position].unique(dim=0, return_counts=True)
            common = before[counts.argmax()]
            rows_with = (new[:, :position] == common).all(-1)
            prefix = torch.cat([prompt, common[None]], 1)
        probs = filtered_probs(model, prefix, temperature, **filters)
        assert rows_with.sum() >= 200
        assert chi_square_p_value(new[rows_with, position].cpu(), probs.cpu()) > 1e-4


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
    for name, value in (("top_k", -1), ("top_k", 2.5), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 2.0),
                        ("min_p", -0.1)):
        with pytest.raises(ValueError, match=name):
            mtp_generate(model, ids, max_new_tokens=2, temperature=0.8, **{name: value})
    with pytest.raises(ValueError, match="left padding"):
        mtp_generate(model, ids, attention_mask=mask.flip(1), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask"):
        mtp_generate(model, ids, attention_mask=mask[:, 1:], max_new_tokens=2)
    with pytest.raises(TypeError, match="input_ids"):
        mtp_generate(model, ids.float(), max_new_tokens=2)
    # tensors on another device than the model's (meta stands for one here)
    with pytest.raises(ValueError, match="input_ids must be on the device"):
        mtp_generate(model, ids.to("meta"), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask must be on input_ids' device"):
        mtp_generate(model, ids, attention_mask=mask.to("meta"), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must be token ids"):
        mtp_generate(model, ids + model.config.vocab_size, max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must be token ids"):
        mtp_generate(model, ids - ids.max() - 1, max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must hold at least one row"):
        mtp_generate(model, ids[:0], max_new_tokens=2)  # was a RuntimeError from deep inside
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):  # before the prefill
        mtp_generate(model, ids, max_new_tokens=2, temperature=0.8, generator=123)
    for eos in (3.5, "7", [1, None], torch.tensor([1.0])):  # were errors that did not name it
        with pytest.raises(TypeError, match="eos_token_id"):
            mtp_generate(model, ids, max_new_tokens=2, eos_token_id=eos)


def test_accelerate_offloaded_model():
    """accelerate's cpu_offload keeps the weights on meta between calls (the embedding's too):
    mtp_generate still runs, and still equals generate."""
    accelerate = pytest.importorskip("accelerate")
    model = _model()
    ids, mask = _padded_batch()
    reference = _greedy(model, ids, mask, 6)
    accelerate.cpu_offload(model, torch.device(DEVICE))
    assert model.get_input_embeddings().weight.device.type == "meta"
    sequences, _ = mtp_generate(model, ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(sequences, reference)
