"""``model.generate`` features on patched models against the unpatched model (transformers'
sdpa), float32: beam search, prompt lookup and assisted decoding (verification steps of more
than 16 tokens, a cropped cache), static and sliding-window caches, a continued conversation
(past_key_values with padding holes), scores / logits, sampling with num_return_sequences.

Tiny random models hardly depend on their attention unless it is sharp (a wrong attention then
often leaves the greedy tokens unchanged): thinkfuse.tiny sharpens it, these tests sharpen it
further, and every step's logits are compared, not only the tokens.
"""

import pytest
import torch
from conftest import DEVICE
from tolerances import assert_close_fp32

import thinkfuse
from thinkfuse.tiny import tiny_batch, tiny_model


def _sharpened(model):
    """Attention logits x9 and a larger attention output: a wrong key or mask shows in the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(3.0)
            elif name.endswith(("v_proj.weight", "o_proj.weight")):
                param.mul_(2.0)
    return model.to(DEVICE)


def _model(family, seed=0, sliding_window=None):
    if sliding_window is None:
        return _sharpened(tiny_model(family, seed=seed))
    from transformers import MistralConfig, MistralForCausalLM

    from thinkfuse.tiny import _COMMON, randomize_norm_weights

    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=sliding_window))
    randomize_norm_weights(model, torch.Generator().manual_seed(seed + 1))
    return _sharpened(model.eval())


def _left_mask(batch, seq, pads):
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
    return mask.to(DEVICE)


def _torch_only_on_cpu(backend):
    """Variants that add little over their siblings run their kernel backends on a GPU only:
    under the Triton interpreter each generate step costs about a second."""
    if backend != "torch" and DEVICE.type == "cpu":
        pytest.skip("kernel backends run this variant on a GPU only (Triton interpreter)")


def _generate(model, seed=0, **kwargs):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(pad_token_id=0, return_dict_in_generate=True, output_logits=True, **kwargs)


def _assert_same(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.logits) == len(ref.logits)
    for fields in ("logits", "scores"):
        got, want = getattr(out, fields, None), getattr(ref, fields, None)
        if want is None:
            continue
        for step, (a, b) in enumerate(zip(got, want)):
            finite = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a), finite), f"{fields}[{step}]"
            assert_close_fp32(a[finite], b[finite], tol=1e-4)


def _check(model, backend, **kwargs):
    ref = _generate(model, **kwargs)
    thinkfuse.patch_model(model, backend=backend)
    _assert_same(_generate(model, **kwargs), ref)
    return model


def test_beam_search_left_padded_sliding_window(backend):
    """Beams expand the padded rows and reorder the cache every step; the window (5) is smaller
    than prompt + new tokens, and the cache drops the keys that left it."""
    model = _model("mistral", sliding_window=5)
    ids = tiny_batch(3, 9, device=DEVICE)
    _check(model, backend, input_ids=ids, attention_mask=_left_mask(3, 9, [4, 0, 2]), max_new_tokens=4,
           num_beams=3, num_return_sequences=2, do_sample=False, output_scores=True)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_sampling_num_return_sequences_padded(cache, backend):
    """Sampling draws do not depend on the attention implementation: same seed, same tokens."""
    model = _model("ministral3")
    ids = tiny_batch(3, 9, device=DEVICE)
    if cache == "dynamic":
        _torch_only_on_cpu(backend)
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    _check(model, backend, input_ids=ids, attention_mask=_left_mask(3, 9, [4, 0, 2]), max_new_tokens=4,
           do_sample=True, num_return_sequences=2, output_scores=True, **kwargs)


@pytest.mark.parametrize("padded", [False, True])
def test_static_sliding_window_cache(padded, backend):
    """A static cache on a sliding-window model: its layers roll once the window is full."""
    if not padded:
        _torch_only_on_cpu(backend)
    model = _model("mistral", sliding_window=5)
    ids = tiny_batch(3, 9, device=DEVICE)
    mask = _left_mask(3, 9, [4, 0, 2] if padded else [0, 0, 0])
    _check(model, backend, input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
           cache_implementation="static")


def _repetitive_prompt():
    ids = tiny_batch(1, 9, device=DEVICE)
    return torch.cat([ids, ids, ids[:, :3]], 1)


@pytest.mark.parametrize("lookup", [12, 20])
def test_prompt_lookup_left_padded(lookup, backend):
    """A left-padded row: verification steps of up to lookup + 1 tokens (13 here) run the decode
    kernel with the row's padding as cache_leftpad; rejected candidates crop the cache. (The
    verification steps of more than 16 tokens are test_assisted_decoding's.)"""
    if lookup != 12:
        _torch_only_on_cpu(backend)
    model = _model("qwen2")
    ids = _repetitive_prompt()
    _check(model, backend, input_ids=ids, attention_mask=_left_mask(1, ids.shape[1], [3]),
           prompt_lookup_num_tokens=lookup, max_new_tokens=12, do_sample=False)


@pytest.mark.parametrize("assistant_seed,candidates", [(0, 18), (1, 12)])
def test_assisted_decoding(assistant_seed, candidates, backend, monkeypatch):
    """Seed 0: an assistant with the same weights, every candidate accepted: after the prefill
    (which verifies the first 18) a 19-token verification step, flash attention against the
    cache (bottom-right causal). Seed 1: a patched assistant, rejections, cache crops,
    verification steps of 2 to 13 tokens (the decode kernel)."""
    if assistant_seed:
        _torch_only_on_cpu(backend)
    model = _model("qwen2")
    assistant = _model("qwen2", seed=assistant_seed)
    assistant.generation_config.num_assistant_tokens = candidates
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    assistant.generation_config.assistant_confidence_threshold = 0.0
    if assistant_seed:
        thinkfuse.patch_model(assistant, backend=backend)
    new_tokens = 40 if assistant_seed == 0 else 8
    ref = _generate(model, input_ids=_repetitive_prompt(), assistant_model=assistant, max_new_tokens=new_tokens,
                    do_sample=False)
    thinkfuse.patch_model(model, backend=backend)
    queries = []
    flash, decode = thinkfuse.ops.flash_attention, thinkfuse.ops.decode_attention
    monkeypatch.setattr(thinkfuse.ops, "flash_attention",
                        lambda q, k, *a, **kw: queries.append((q.shape[1], k.shape[1])) or flash(q, k, *a, **kw))
    monkeypatch.setattr(thinkfuse.ops, "decode_attention",
                        lambda q, k, *a, **kw: queries.append((q.shape[1], k.shape[1])) or decode(q, k, *a, **kw))
    out = _generate(model, input_ids=_repetitive_prompt(), assistant_model=assistant, max_new_tokens=new_tokens,
                    do_sample=False)
    _assert_same(out, ref)
    verify = [sq for sq, sk in queries if 1 < sq < sk]  # the assistant's and the target's
    assert (max(verify) > 16) if assistant_seed == 0 else verify


@pytest.mark.parametrize("family,sliding_window,static", [("qwen2", None, True), ("mistral", 5, False)])
def test_continued_conversation_with_padding(family, sliding_window, static, backend):
    """generate, append a left-padded user turn (padding holes inside the rows), generate again
    from the returned past_key_values."""
    from transformers import StaticCache

    model = _model(family, sliding_window=sliding_window)
    ids = tiny_batch(3, 9, device=DEVICE)
    mask = _left_mask(3, 9, [4, 0, 2])
    turn = tiny_batch(3, 5, seed=7, device=DEVICE)
    turn_mask = _left_mask(3, 5, [2, 0, 3])

    def conversation():
        cache = StaticCache(config=model.config, max_cache_len=32) if static else None
        first = _generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                          past_key_values=cache)
        new = first.sequences.shape[1] - ids.shape[1]
        ids2 = torch.cat([first.sequences, turn], 1)
        mask2 = torch.cat([mask, torch.ones_like(mask[:, :new]), turn_mask], 1)
        second = _generate(model, input_ids=ids2, attention_mask=mask2, past_key_values=first.past_key_values,
                           max_new_tokens=3, do_sample=False)
        return first, second

    ref = conversation()
    thinkfuse.patch_model(model, backend=backend)
    for out, want in zip(conversation(), ref):
        _assert_same(out, want)


def test_min_new_tokens_eos_list_max_length(backend):
    model = _model("mimo")
    ids = tiny_batch(3, 9, device=DEVICE)
    _check(model, backend, input_ids=ids, attention_mask=_left_mask(3, 9, [4, 0, 2]), min_new_tokens=3,
           max_length=15, eos_token_id=[5, 17, 200], do_sample=False, output_scores=True)
