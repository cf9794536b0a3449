"""mtp_generate(cuda_graph=True): the static-cache greedy path (thinkfuse.static_decode) equals
model.generate token for token, with acceptance patterns forced by an oracle drafter (all
right, all wrong, rows disagreeing in one step), eos in the middle, patched models; bad uses are
refused. On CPU its steps run eagerly; the GPU test replays captured steps.

float32 (the kernels' dtypes): seeds where no greedy step is a near-tie, as in the other tests.
"""

import pytest
import torch
from conftest import DEVICE, KERNEL_BACKENDS
from speculative_helpers import chi_square_p_value, filtered_probs, record_acceptances, record_verify_counts

import thinkfuse
from thinkfuse import static_decode
from thinkfuse.sampling import Sampling
from thinkfuse.speculative import mtp_generate
from thinkfuse.tiny import VOCAB, tiny_batch, tiny_model


def _model(seed=0):
    return tiny_model("mimo", seed=seed, dtype=torch.float32).to(DEVICE)


def _greedy(model, ids, max_new_tokens, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          do_sample=False, **kwargs)


def _static(model, ids, max_new_tokens, **kwargs):
    return mtp_generate(model, ids, max_new_tokens=max_new_tokens, cuda_graph=True, **kwargs)


def _captured(stats) -> bool:
    """Whether the steps should have been graph replays: on a GPU, once the warm-up is done."""
    return DEVICE.type == "cuda" and stats["steps"] > static_decode.WARMUP_STEPS


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 16])
def test_greedy_equals_generate(max_new_tokens):
    model = _model()
    ids = tiny_batch(3, 9, seed=1, device=DEVICE)
    sequences, stats = _static(model, ids, max_new_tokens, eos_token_id=[])
    assert torch.equal(sequences, _greedy(model, ids, max_new_tokens, eos_token_id=None))
    assert stats["new_tokens"] == 3 * max_new_tokens
    assert stats["target_forwards"] == 1 + stats["steps"]
    assert stats["cuda_graph"] is _captured(stats)  # CPU: the same steps, run eagerly


def _left_padding(ids, pads):
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return mask


@pytest.mark.parametrize("pads", [(3, 0, 1), (8, 2, 0)], ids=["some", "one-token-prompt"])
def test_left_padded_prompts_equal_generate(pads):
    """Left padding: RoPE positions count from each row's first token, and prefill, verify and
    the MTP layer skip the padding slots (cache_leftpad); generate's greedy output token for
    token."""
    model = _model()
    ids = tiny_batch(3, 9, seed=1, device=DEVICE)
    mask = _left_padding(ids, pads)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    sequences, stats = _static(model, ids, 10, eos_token_id=[], attention_mask=mask)
    assert torch.equal(sequences, reference)
    assert stats["new_tokens"] == 30
    # Greedy verification makes the tokens exact whatever the drafts; the drafts (the MTP layer
    # skips position 0's token, which padding moves) show in the acceptances, which must be the
    # eager path's.
    eager, eager_stats = mtp_generate(model, ids, max_new_tokens=10, eos_token_id=[], attention_mask=mask)
    assert torch.equal(eager, reference)
    assert (stats["accepted"], stats["drafted"]) == (eager_stats["accepted"], eager_stats["drafted"])


def _first_step_logits(model, ids, mask, mtp: bool):
    """(decoder, first token, the static decoder's logits of the first decode step, the model's
    logits of the same token with generate's positions)."""
    decoder = static_decode.StaticDecoder(model, ids.shape[0], ids.shape[1] + 4, ids.device, cuda_graph=False, mtp=mtp)
    first = decoder.prefill(ids, mask)
    _, step_logits = decoder.trunk(first[:, None], decoder.length[:, None])
    full_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    expected = model(torch.cat([ids, first[:, None]], 1), attention_mask=full_mask, position_ids=positions).logits
    return decoder, first, step_logits[:, 0], expected[:, -1]


def test_left_padded_prefill_and_step_logits_match_the_model():
    """Tokens cannot tell where padding moves a row's positions (RoPE depends on position
    differences; greedy verification is exact whatever the drafts), so the logits are compared:
    the trunk's first decode step against the model's forward (MiMo), and the MTP layer's
    prefill draft against the eager speculative path, which skips position 0's token."""
    from tolerances import assert_close_fp32

    from thinkfuse import speculative

    model = _model()
    ids = tiny_batch(3, 9, seed=1, device=DEVICE)
    mask = _left_padding(ids, (3, 0, 5))
    with torch.no_grad():
        decoder, first, step_logits, expected = _first_step_logits(model, ids, mask, mtp=True)
        assert_close_fp32(step_logits, expected, tol=1e-4)

        slots = torch.arange(9, device=DEVICE)[None].expand(3, -1)
        hidden, _ = decoder.trunk(ids, slots, prefill=True)
        next_ids = torch.cat([ids[:, 1:], first[:, None]], dim=1)
        static_draft = decoder.mtp(hidden, next_ids, slots, prefill=True)[:, -1]
        out = speculative._NewTokens(3, 4, torch.tensor([], dtype=torch.long, device=DEVICE), 0, ids.device)
        state, mtp_input = speculative._prefill(model, ids, mask, Sampling(0.0), out)
        assert_close_fp32(static_draft, speculative._mtp_logits(model, state, mtp_input), tol=1e-4)


def test_left_padded_ministral3_step_logits_follow_each_rows_positions():
    """Ministral 3's query temperature depends on the absolute position: past 32 (the tiny
    config's original_max_position_embeddings) a padded row's slots and positions differ."""
    from tolerances import assert_close_fp32
    from transformers import Ministral3Config, Ministral3ForCausalLM

    from thinkfuse.tiny import _MINISTRAL3_ROPE

    rope = {k: v for k, v in _MINISTRAL3_ROPE.items() if k not in ("mscale", "mscale_all_dim")}
    rope["llama_4_scaling_beta"] = 0.5
    model = _tiny(Ministral3Config, Ministral3ForCausalLM, rope_parameters=rope)
    ids = tiny_batch(2, 36, seed=1, device=DEVICE)
    mask = _left_padding(ids, (8, 0))  # row 0: slot 36 is position 28
    with torch.no_grad():
        _, _, step_logits, expected = _first_step_logits(model, ids, mask, mtp=False)
    assert_close_fp32(step_logits, expected, tol=1e-4)


def _oracle_drafter(monkeypatch, reference, miss_every=3):
    """The static MTP layer drafts the true next-next greedy token (from ``reference``), except
    where ``(row + position) % miss_every == 0``. The real layer still runs and fills its cache;
    only its logits are replaced, by device ops alone (so captured steps take it too)."""
    original = static_decode.StaticDecoder.mtp
    rows = torch.arange(reference.shape[0], device=reference.device)[:, None]

    def drafting(self, hidden, next_ids, positions, prefill=False):
        logits = original(self, hidden, next_ids, positions, prefill)
        targets = (positions[:, -1:] if prefill else positions) + 2
        tokens = reference.gather(1, targets.clamp(max=reference.shape[1] - 1))
        tokens = torch.where(targets < reference.shape[1], tokens, 0)
        tokens = torch.where((rows + targets) % miss_every == 0, (tokens + 1) % VOCAB, tokens)
        return torch.nn.functional.one_hot(tokens, logits.shape[-1]).to(logits.dtype)

    monkeypatch.setattr(static_decode.StaticDecoder, "mtp", drafting)


def test_rows_that_accept_different_counts_stay_exact(monkeypatch):
    model = _model()
    ids = tiny_batch(3, 9, seed=1, device=DEVICE)
    reference = _greedy(model, ids, 16)
    _oracle_drafter(monkeypatch, reference)
    steps = record_acceptances(monkeypatch, static_decode.ops)
    sequences, stats = _static(model, ids, 16, eos_token_id=[])
    assert torch.equal(sequences, reference)
    assert any(len(set(step)) > 1 for step in steps)  # rows disagreed: slots written over later
    assert 0 < stats["accepted"] < stats["drafted"]
    assert stats["target_forwards"] < 16 + 1
    assert stats["acceptance_rate"] == stats["accepted"] / stats["drafted"]


def test_always_right_drafter_emits_two_tokens_a_step(monkeypatch):
    model = _model()
    ids = tiny_batch(1, 6, seed=2, device=DEVICE)
    reference = _greedy(model, ids, 9)
    _oracle_drafter(monkeypatch, reference, miss_every=10**9)
    sequences, stats = _static(model, ids, 9, eos_token_id=[])
    assert torch.equal(sequences, reference)
    # prefill emits 1 token, every verify step 2: 1 + 4 steps for 9 tokens
    assert stats["target_forwards"] == 5 and stats["acceptance_rate"] == 1.0


def test_always_wrong_drafter_still_decodes_greedily(monkeypatch):
    model = _model()
    ids = tiny_batch(3, 9, seed=1, device=DEVICE)
    reference = _greedy(model, ids, 6)
    _oracle_drafter(monkeypatch, reference, miss_every=1)
    sequences, stats = _static(model, ids, 6, eos_token_id=[])
    assert torch.equal(sequences, reference)
    assert stats["accepted"] == 0 and stats["target_forwards"] == 6


@pytest.mark.parametrize("oracle", [False, True])
def test_eos_in_the_middle(monkeypatch, oracle):
    model = _model()
    ids = tiny_batch(3, 9, seed=1, device=DEVICE)
    plain = _greedy(model, ids, 12)
    row = plain[0, ids.shape[1]:].tolist()
    eos = next((row[i] for i in range(2, len(row) - 2) if row[i] not in row[:i]), None)
    if eos is None:
        pytest.skip("no suitable eos token in this continuation")
    reference = _greedy(model, ids, 12, eos_token_id=eos, pad_token_id=VOCAB - 1)
    if oracle:
        _oracle_drafter(monkeypatch, plain)
    model.generation_config.pad_token_id = VOCAB - 1
    counts = record_verify_counts(monkeypatch, DEVICE)
    sequences, stats = _static(model, ids, 12, eos_token_id=eos)
    assert torch.equal(sequences, reference)
    assert (sequences[0, ids.shape[1]:] == VOCAB - 1).any()  # row 0 was padded after its eos
    # Drafts count for the rows still generating only: row 0's after its eos do not.
    assert stats["drafted"] == int(counts["generating"]) < 3 * stats["steps"]
    assert stats["accepted"] == int(counts["accepted"])
    if oracle:  # row 0 still accepts the oracle's drafts after its eos
        assert int(counts["accepted_when_done"]) > 0


def test_patched_model_with_the_kernel_backend(kernel_backend):
    model = _model(seed=3)
    ids = tiny_batch(2, 7, seed=4, device=DEVICE)
    reference = _greedy(model, ids, 6)
    thinkfuse.patch_model(model, backend=kernel_backend)
    with thinkfuse.use_backend(kernel_backend):
        sequences, _ = _static(model, ids, 6, eos_token_id=[])
    assert torch.equal(sequences, reference)


def test_uses_it_does_not_cover_are_refused():
    model = _model()
    ids = tiny_batch(2, 5, seed=0, device=DEVICE)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        mtp_generate(tiny_model("mimo", dtype=torch.float64).to(DEVICE), ids, max_new_tokens=2, cuda_graph=True)
    mask = torch.ones_like(ids)
    mask[0, 2] = 0  # a hole: not left padding
    with pytest.raises(ValueError, match="left-padded"):
        mtp_generate(model, ids, max_new_tokens=2, attention_mask=mask, cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        mtp_generate(model, ids, max_new_tokens=2, cuda_graph=1)
    # an all-ones mask is no padding
    sequences, _ = mtp_generate(model, ids, max_new_tokens=2, attention_mask=torch.ones_like(ids), cuda_graph=True)
    assert sequences.shape == (2, 7)
    _, stats = mtp_generate(model, ids, max_new_tokens=0, cuda_graph=True)
    assert stats["cuda_graph"] is False


def test_many_eos_ids_and_a_rope_cast_with_the_model():
    """Up to 12 eos ids (torch.isin would sort from 10 up, which a capture cannot take), and a
    model cast after construction: its rounded inv_freq buffer is what generate uses."""
    model = _model()
    ids = tiny_batch(2, 9, seed=1, device=DEVICE)
    plain = _greedy(model, ids, 10)
    eos = [int(plain[0, ids.shape[1] + 4])] + [VOCAB - 2 - i for i in range(11)]
    reference = _greedy(model, ids, 10, eos_token_id=eos, pad_token_id=0)
    model.generation_config.pad_token_id = 0
    sequences, _ = _static(model, ids, 10, eos_token_id=eos)
    assert torch.equal(sequences, reference)
    model.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.to(torch.bfloat16).float()
    sequences, _ = _static(model, ids, 10, eos_token_id=[])
    assert torch.equal(sequences, _greedy(model, ids, 10, eos_token_id=None))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("patched", [False, True])
@pytest.mark.parametrize("oracle", [False, True])
def test_captured_steps_replay_to_the_greedy_output(monkeypatch, patched, oracle):
    model = tiny_model("mimo", seed=0, dtype=torch.float32).cuda()
    ids = tiny_batch(3, 9, seed=1, device="cuda")
    plain = _greedy(model, ids, 16)
    eos = int(plain[1, ids.shape[1] + 9])  # row 1 (at least) ends early, after the capture
    reference = _greedy(model, ids, 16, eos_token_id=eos, pad_token_id=0)
    model.generation_config.pad_token_id = 0
    if patched and "cuda" in KERNEL_BACKENDS:
        thinkfuse.patch_model(model)
    if oracle:  # drafts accepted in replayed steps, rows disagreeing
        _oracle_drafter(monkeypatch, plain)
    captured = []
    capture = static_decode._capture
    monkeypatch.setattr(static_decode, "_capture", lambda *args: captured.append(1) or capture(*args))
    sequences, stats = _static(model, ids, 16, eos_token_id=eos)
    assert captured == [1]  # one capture, after the warm-up steps; every later step a replay
    assert stats["cuda_graph"] is True  # the capture did not fall back to eager steps
    assert stats["steps"] > static_decode.WARMUP_STEPS
    assert torch.equal(sequences, reference)
    if oracle:
        assert 0 < stats["accepted"] < stats["drafted"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("speculative", [True, False])
@pytest.mark.parametrize("own_generator", [False, True])
def test_captured_sampling_steps_draw_as_eager_steps(monkeypatch, own_generator, speculative):
    """Sampled decoding (speculative, or plain static_generate), replayed: the capture registers
    the generator, so each replay draws new numbers, the same the eager steps draw from the same
    seed."""
    model = tiny_model("mimo", seed=0, dtype=torch.float32).cuda()
    ids = tiny_batch(3, 9, seed=1, device="cuda")
    decode = mtp_generate if speculative else static_decode.static_generate

    def sample():
        torch.cuda.manual_seed(3)
        generator = torch.Generator(device="cuda").manual_seed(3) if own_generator else None
        return decode(model, ids, max_new_tokens=16, temperature=0.8, top_p=0.9, generator=generator,
                      eos_token_id=[], cuda_graph=True)

    replayed, stats = sample()
    assert stats["cuda_graph"] is True and stats["steps"] > static_decode.WARMUP_STEPS
    again, _ = sample()
    monkeypatch.setattr(static_decode, "_capture", lambda *args: None)  # every step eager
    eager, eager_stats = sample()
    assert eager_stats["cuda_graph"] is False
    assert torch.equal(replayed, again) and torch.equal(replayed, eager)


# --- greedy_generate: the same engine without the MTP layer, for every family's causal LM ----


@pytest.mark.parametrize("family", ["qwen2", "mistral", "ministral3", "mimo"])
def test_plain_greedy_equals_generate(family):
    model = tiny_model(family, seed=0, dtype=torch.float32).to(DEVICE)
    ids = tiny_batch(3, 9, seed=1, device=DEVICE)
    sequences, stats = static_decode.greedy_generate(model, ids, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(sequences, _greedy(model, ids, 12, eos_token_id=None))
    assert stats == {"target_forwards": 12, "steps": 11, "cuda_graph": _captured(stats), "new_tokens": 36}


@pytest.mark.parametrize("family", ["qwen2", "mistral", "ministral3", "mimo"])
def test_plain_greedy_left_padded_equals_generate(family):
    model = tiny_model(family, seed=0, dtype=torch.float32).to(DEVICE)
    ids = tiny_batch(3, 9, seed=1, device=DEVICE)
    mask = _left_padding(ids, (4, 0, 2))
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    sequences, _ = static_decode.greedy_generate(model, ids, max_new_tokens=12, eos_token_id=[],
                                                 attention_mask=mask)
    assert torch.equal(sequences, reference)


def test_plain_greedy_left_padded_with_a_sliding_window():
    """The window counts from each row's own tokens; padding longer than the window."""
    model = tiny_model("mistral", seed=0, dtype=torch.float32).to(DEVICE)
    model.config.sliding_window = 5
    ids = tiny_batch(2, 12, seed=1, device=DEVICE)
    mask = _left_padding(ids, (6, 1))
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    sequences, _ = static_decode.greedy_generate(model, ids, max_new_tokens=8, eos_token_id=[], attention_mask=mask)
    assert torch.equal(sequences, reference)


def test_plain_greedy_with_a_sliding_window_and_eos():
    model = tiny_model("mistral", seed=0, dtype=torch.float32).to(DEVICE)
    model.config.sliding_window = 5  # shorter than the prompt: prefill and decode both cut keys
    # 8 new tokens: at the 10th this seed has a near-tie that flips between runs of generate itself
    ids = tiny_batch(2, 9, seed=1, device=DEVICE)
    plain = _greedy(model, ids, 8)
    assert not torch.equal(plain, _greedy(tiny_model("mistral", seed=0).to(DEVICE), ids, 8))  # the window matters
    sequences, _ = static_decode.greedy_generate(model, ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(sequences, plain)
    eos = int(plain[0, ids.shape[1] + 3])
    reference = _greedy(model, ids, 8, eos_token_id=eos, pad_token_id=0)
    model.generation_config.pad_token_id = 0
    sequences, stats = static_decode.greedy_generate(model, ids, max_new_tokens=8, eos_token_id=eos)
    assert torch.equal(sequences, reference)


def test_plain_greedy_patched_with_the_kernel_backend(kernel_backend):
    model = tiny_model("ministral3", seed=3, dtype=torch.float32).to(DEVICE)
    ids = tiny_batch(2, 7, seed=4, device=DEVICE)
    reference = _greedy(model, ids, 6)
    thinkfuse.patch_model(model, backend=kernel_backend)
    with thinkfuse.use_backend(kernel_backend):
        sequences, _ = static_decode.greedy_generate(model, ids, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(sequences, reference)


def test_plain_greedy_bad_arguments():
    ids = tiny_batch(2, 5, seed=0, device=DEVICE)
    with pytest.raises(TypeError, match="static decoding needs a causal LM"):
        static_decode.greedy_generate(tiny_model("mistral3").to(DEVICE), ids, max_new_tokens=2)
    model = _model()
    with pytest.raises(ValueError, match="max_new_tokens"):
        static_decode.greedy_generate(model, ids, max_new_tokens=-1)
    with pytest.raises(TypeError, match="input_ids"):
        static_decode.greedy_generate(model, ids.float(), max_new_tokens=2)
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        static_decode.greedy_generate(model, ids, max_new_tokens=2, cuda_graph="yes")
    with pytest.raises(ValueError, match="attention_mask must be on input_ids' device"):
        static_decode.greedy_generate(model, ids, attention_mask=torch.ones_like(ids, device="meta"), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must hold at least one row"):
        static_decode.greedy_generate(model, ids[:0], max_new_tokens=2)
    with pytest.raises(TypeError, match="eos_token_id"):
        static_decode.greedy_generate(model, ids, max_new_tokens=2, eos_token_id=[2, 3.0])
    no_tokens = torch.ones_like(ids)
    no_tokens[1] = 0  # a row of padding only, no token at all
    with pytest.raises(ValueError, match="left-padded"):
        static_decode.greedy_generate(model, ids, max_new_tokens=2, attention_mask=no_tokens)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):  # before the prefill
        static_decode.static_generate(model, ids, max_new_tokens=2, temperature=0.8, generator=123)
    sequences, stats = static_decode.greedy_generate(model, ids, max_new_tokens=0)
    assert torch.equal(sequences, ids) and stats["target_forwards"] == 0 and stats["new_tokens"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["qwen2", "ministral3"])
@pytest.mark.parametrize("padded", [False, True])
def test_plain_greedy_captured_steps_replay_to_the_greedy_output(monkeypatch, family, padded):
    model = tiny_model(family, seed=0, dtype=torch.float32).cuda()
    ids = tiny_batch(2, 9, seed=1, device="cuda")
    mask = _left_padding(ids, (3, 0) if padded else (0, 0))
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    if "cuda" in KERNEL_BACKENDS:
        thinkfuse.patch_model(model)
    captured = []
    capture = static_decode._capture
    monkeypatch.setattr(static_decode, "_capture", lambda *args: captured.append(1) or capture(*args))
    sequences, stats = static_decode.greedy_generate(model, ids, max_new_tokens=12, eos_token_id=[],
                                                     attention_mask=mask)
    assert captured == [1] and stats["cuda_graph"] is True
    assert torch.equal(sequences, reference)


def _make_step_uncapturable(monkeypatch, name: str) -> None:
    """StaticDecoder.<name> with a host sync while a capture is on, which ends the capture."""
    step = getattr(static_decode.StaticDecoder, name)

    def syncing_step(self, out, stats):
        if torch.cuda.is_current_stream_capturing():
            self.length.sum().item()  # not capturable
        step(self, out, stats)

    monkeypatch.setattr(static_decode.StaticDecoder, name, syncing_step)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_step_that_cannot_be_captured_runs_eagerly_on_the_callers_stream(monkeypatch):
    """A host sync in the step ends the capture: a warning, then eager steps with the same
    output, and the caller's current stream is the current stream again afterwards."""
    model = tiny_model("qwen2", seed=0, dtype=torch.float32).cuda()
    ids = tiny_batch(2, 9, seed=1, device="cuda")
    reference = _greedy(model, ids, 8)
    _make_step_uncapturable(monkeypatch, "plain_step")
    before = torch.cuda.current_stream()
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        sequences, stats = static_decode.greedy_generate(model, ids, max_new_tokens=8, eos_token_id=[])
    assert stats["cuda_graph"] is False and torch.cuda.current_stream() == before
    assert torch.equal(sequences, reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_sampled_step_that_cannot_be_captured_raises(monkeypatch):
    """Sampling, a failed capture may leave the generators mid-capture: a clear error, not eager
    steps drawing from them."""
    model = tiny_model("mimo", seed=0, dtype=torch.float32).cuda()
    ids = tiny_batch(2, 9, seed=1, device="cuda")
    _make_step_uncapturable(monkeypatch, "mtp_step")
    with pytest.raises(RuntimeError, match="sampled step could not be captured"):
        mtp_generate(model, ids, max_new_tokens=8, temperature=0.7, eos_token_id=[], cuda_graph=True)


def _tiny(config_class, model_class, **fields):
    from thinkfuse.tiny import _COMMON, randomize_norm_weights

    torch.manual_seed(0)
    model = model_class(config_class(**{**_COMMON, **fields}))
    randomize_norm_weights(model, torch.Generator().manual_seed(1))
    return model.eval().to(DEVICE)


def test_plain_greedy_ministral3_query_temperature_and_yarn_scaling():
    """Past original_max_position_embeddings (32 in the tiny config) Ministral 3 scales q by
    1 + beta log(1 + floor(pos / 32)); without mscale, YaRN's attention_scaling is not 1."""
    from transformers import Ministral3Config, Ministral3ForCausalLM

    from thinkfuse.tiny import _MINISTRAL3_ROPE

    rope = {k: v for k, v in _MINISTRAL3_ROPE.items() if k not in ("mscale", "mscale_all_dim")}
    rope["llama_4_scaling_beta"] = 0.5
    model = _tiny(Ministral3Config, Ministral3ForCausalLM, rope_parameters=rope)
    assert model.model.rotary_emb.attention_scaling != 1.0
    ids = tiny_batch(2, 9, seed=1, device=DEVICE)
    sequences, _ = static_decode.greedy_generate(model, ids, max_new_tokens=40, eos_token_id=[])
    assert torch.equal(sequences, _greedy(model, ids, 40, eos_token_id=None))  # positions up to 48
    # Left padding: the temperature follows each row's own positions (RoPE alone would not tell:
    # it depends on position differences only).
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=None)
    sequences, _ = static_decode.greedy_generate(model, ids, max_new_tokens=40, eos_token_id=[], attention_mask=mask)
    assert torch.equal(sequences, reference)


def test_plain_greedy_qwen2_sliding_layers():
    """Qwen2 with use_sliding_window: layers from max_window_layers on see a window of 5 keys."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = _tiny(Qwen2Config, Qwen2ForCausalLM, tie_word_embeddings=True, use_sliding_window=True,
                  sliding_window=5, max_window_layers=1)
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [None, 5]
    ids = tiny_batch(2, 9, seed=1, device=DEVICE)
    sequences, _ = static_decode.greedy_generate(model, ids, max_new_tokens=12, eos_token_id=[],
                                                 attention_mask=torch.ones_like(ids))
    assert torch.equal(sequences, _greedy(model, ids, 12, eos_token_id=None))
    mask = torch.ones_like(ids)
    mask[1, 3] = 0  # a hole: not left padding
    with pytest.raises(ValueError, match="left-padded"):
        static_decode.greedy_generate(model, ids, max_new_tokens=2, attention_mask=mask)


@pytest.mark.parametrize("family", ["mistral", "ministral3"])  # (qwen2's tied lm_head would scale its embeddings)
def test_static_generate_samples_generates_filtered_distribution(family):
    """Sampled plain decoding on the static engine: many copies of one prompt, 2 new tokens, each
    (given the one before) following the filtered softmax, none outside its support."""
    model = tiny_model(family, seed=0, dtype=torch.float32).to(DEVICE)
    with torch.no_grad():
        model.lm_head.weight.mul_(16)  # peaked distributions: the filters keep a few tokens
    rows, temperature, filters = 6000, 0.7, dict(top_k=12, top_p=0.9)
    prompt = tiny_batch(1, 6, seed=2, device=DEVICE)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    sequences, stats = static_decode.static_generate(model, prompt.expand(rows, -1).contiguous(), max_new_tokens=2,
                                                     temperature=temperature, generator=generator, eos_token_id=[],
                                                     **filters)
    new = sequences[:, prompt.shape[1]:]
    first = filtered_probs(model, prompt, temperature, **filters)
    assert 1 < (first > 0).sum() < 12  # the filters cut, and leave a choice
    assert chi_square_p_value(new[:, 0].cpu(), first.cpu()) > 1e-4
    common = new[:, 0].mode().values
    rows_with = new[:, 0] == common
    assert rows_with.sum() >= 200
    second = filtered_probs(model, torch.cat([prompt, common.view(1, 1)], 1), temperature, **filters)
    assert chi_square_p_value(new[rows_with, 1].cpu(), second.cpu()) > 1e-4


def test_static_generate_sampling_is_reproducible_and_checked():
    model = tiny_model("mistral", seed=0, dtype=torch.float32).to(DEVICE)
    ids = tiny_batch(3, 7, seed=1, device=DEVICE)

    def sample(seed):
        generator = torch.Generator(device=DEVICE).manual_seed(seed)
        return static_decode.static_generate(model, ids, max_new_tokens=8, temperature=1.0, min_p=0.02,
                                             generator=generator, eos_token_id=[])[0]

    assert torch.equal(sample(0), sample(0)) and not torch.equal(sample(0), sample(1))
    assert torch.equal(static_decode.static_generate(model, ids, max_new_tokens=8, eos_token_id=[])[0],
                       static_decode.greedy_generate(model, ids, max_new_tokens=8, eos_token_id=[])[0])
    for name, value in (("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5)):
        with pytest.raises(ValueError, match=name):
            static_decode.static_generate(model, ids, max_new_tokens=2, **{name: value})


def test_static_generate_at_a_tiny_temperature_decodes_greedily():
    """logits / 1e-40 overflows float32; the sampled distribution's limit is the argmax (was
    token 0 at every step, drawn from softmax's NaNs)."""
    model = tiny_model("mistral", seed=0, dtype=torch.float32).to(DEVICE)
    ids = tiny_batch(3, 7, seed=1, device=DEVICE)
    sequences, _ = static_decode.static_generate(model, ids, max_new_tokens=6, temperature=1e-40, eos_token_id=[])
    assert torch.equal(sequences, _greedy(model, ids, 6, eos_token_id=None))


def test_a_model_of_the_same_module_layout_but_another_family_is_refused():
    """Qwen3 has Qwen2's modules plus q/k norms inside the attention, which the engine does not
    run: its tokens were silently not generate's. Only the families it re-implements pass."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = _tiny(Qwen3Config, Qwen3ForCausalLM)
    ids = tiny_batch(2, 5, seed=0, device=DEVICE)
    with pytest.raises(TypeError, match="static decoding needs a causal LM .*Qwen3ForCausalLM"):
        static_decode.greedy_generate(model, ids, max_new_tokens=4, eos_token_id=[])
