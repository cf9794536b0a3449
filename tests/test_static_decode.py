"""mtp_generate(cuda_graph=True): the static-cache greedy path (thinkfuse.static_decode) equals
model.generate token for token, with acceptance patterns forced by an oracle drafter (all
right, all wrong, rows disagreeing in one step), eos in the middle, patched models; bad uses are
refused. On CPU its steps run eagerly; the GPU test replays captured steps.

float32 (the kernels' dtypes): seeds where no greedy step is a near-tie, as in the other tests.
"""

import pytest
import torch
from conftest import DEVICE, KERNEL_BACKENDS
from speculative_helpers import record_acceptances

import thinkfuse
from thinkfuse import static_decode
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
    sequences, _ = _static(model, ids, 12, eos_token_id=eos)
    assert torch.equal(sequences, reference)
    assert (sequences[0, ids.shape[1]:] == VOCAB - 1).any()  # row 0 was padded after its eos


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
    with pytest.raises(ValueError, match="temperature 0"):
        mtp_generate(model, ids, max_new_tokens=2, temperature=0.7, cuda_graph=True)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="unpadded"):
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


# --- greedy_generate: the same engine without the MTP layer, for every family's causal LM ----


@pytest.mark.parametrize("family", ["qwen2", "mistral", "ministral3", "mimo"])
def test_plain_greedy_equals_generate(family):
    model = tiny_model(family, seed=0, dtype=torch.float32).to(DEVICE)
    ids = tiny_batch(3, 9, seed=1, device=DEVICE)
    sequences, stats = static_decode.greedy_generate(model, ids, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(sequences, _greedy(model, ids, 12, eos_token_id=None))
    assert stats == {"target_forwards": 12, "steps": 11, "cuda_graph": _captured(stats), "new_tokens": 36}


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
    sequences, stats = static_decode.greedy_generate(model, ids, max_new_tokens=0)
    assert torch.equal(sequences, ids) and stats["target_forwards"] == 0 and stats["new_tokens"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["qwen2", "ministral3"])
def test_plain_greedy_captured_steps_replay_to_the_greedy_output(monkeypatch, family):
    model = tiny_model(family, seed=0, dtype=torch.float32).cuda()
    ids = tiny_batch(2, 9, seed=1, device="cuda")
    reference = _greedy(model, ids, 12)
    if "cuda" in KERNEL_BACKENDS:
        thinkfuse.patch_model(model)
    captured = []
    capture = static_decode._capture
    monkeypatch.setattr(static_decode, "_capture", lambda *args: captured.append(1) or capture(*args))
    sequences, stats = static_decode.greedy_generate(model, ids, max_new_tokens=12, eos_token_id=[])
    assert captured == [1] and stats["cuda_graph"] is True
    assert torch.equal(sequences, reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_step_that_cannot_be_captured_runs_eagerly_on_the_callers_stream(monkeypatch):
    """A host sync in the step ends the capture: a warning, then eager steps with the same
    output, and the caller's current stream is the current stream again afterwards."""
    model = tiny_model("qwen2", seed=0, dtype=torch.float32).cuda()
    ids = tiny_batch(2, 9, seed=1, device="cuda")
    reference = _greedy(model, ids, 8)
    step = static_decode.StaticDecoder.plain_step

    def syncing_step(self, out, stats):
        if torch.cuda.is_current_stream_capturing():
            self.length.sum().item()  # not capturable
        step(self, out, stats)

    monkeypatch.setattr(static_decode.StaticDecoder, "plain_step", syncing_step)
    before = torch.cuda.current_stream()
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        sequences, stats = static_decode.greedy_generate(model, ids, max_new_tokens=8, eos_token_id=[])
    assert stats["cuda_graph"] is False and torch.cuda.current_stream() == before
    assert torch.equal(sequences, reference)


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
    mask[1, 0] = 0
    with pytest.raises(ValueError, match="unpadded"):
        static_decode.greedy_generate(model, ids, max_new_tokens=2, attention_mask=mask)
