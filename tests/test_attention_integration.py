"""The "thinkfuse" transformers attention implementation (thinkfuse.integrations) and the
"attention" patch rule: tiny models of every family in float32 against the unpatched model
(transformers' sdpa), on the torch backend and the Triton kernels (interpreter on CPU).

Padding positions are compared nowhere: their outputs are meaningless (sdpa and flash-attn
disagree there too) and nothing downstream reads them.
"""

import numpy as np
import pytest
import torch
from conftest import DEVICE
from tolerances import assert_close_fp32

import thinkfuse
from thinkfuse.integrations import ATTN_IMPLEMENTATION, thinkfuse_attention_forward, thinkfuse_attention_mask
from thinkfuse.tiny import BUILDERS, tiny_batch, tiny_model

FAMILIES = list(BUILDERS)


def _text_config(model):
    return model.config.get_text_config()


def _masked_logits_and_grads(model, ids, mask=None, **inputs):
    """Logits and parameter gradients of a loss that reads only the non-padding positions."""
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask, **inputs).logits
    weight = torch.ones(ids.shape, device=ids.device) if mask is None else mask.float()
    ramp = torch.linspace(-1, 1, logits.shape[-1], device=logits.device)
    (logits * ramp * weight[..., None]).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _assert_matches_unpatched(model, backend, ids, mask=None, **inputs):
    ref_logits, ref_grads = _masked_logits_and_grads(model, ids, mask, **inputs)
    report = thinkfuse.patch_model(model, backend=backend)
    assert report.patched["attention"] >= 2 and _text_config(model)._attn_implementation == ATTN_IMPLEMENTATION
    logits, grads = _masked_logits_and_grads(model, ids, mask, **inputs)
    valid = slice(None) if mask is None else mask.bool()
    assert_close_fp32(logits[valid], ref_logits[valid], tol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert_close_fp32(grads[name], grad, tol=1e-4)


def _padding_mask(batch, seq, side):
    mask = torch.ones(batch, seq, dtype=torch.long)
    pads = [4, 0, 1][:batch]
    for row, n in enumerate(pads):
        if n:
            if side == "left":
                mask[row, :n] = 0
            else:
                mask[row, seq - n:] = 0
    return mask.to(DEVICE)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_logits_and_grads(family, side, backend):
    ids = tiny_batch(3, 9, device=DEVICE)
    mask = _padding_mask(3, 9, side)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate() derives them
    _assert_matches_unpatched(tiny_model(family).to(DEVICE), backend, ids, mask, position_ids=positions)


@pytest.mark.parametrize("family", ["qwen2", "ministral3"])
def test_unpadded_and_packed_batches(family, backend):
    model = tiny_model(family).to(DEVICE)
    ids = tiny_batch(2, 10, device=DEVICE)
    _assert_matches_unpatched(model, backend, ids)
    thinkfuse.unpatch_model(model)
    # Two rows, each packing sequences of 3+7 and 6+4 tokens (position_ids restart in a row).
    # use_cache=False: transformers' sdpa masks keep packed sequences apart (only without a cache).
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]], device=DEVICE)
    _assert_matches_unpatched(model, backend, ids, position_ids=positions, use_cache=False)
    thinkfuse.unpatch_model(model)
    # With a cache (use_cache defaults to True) transformers does not look for packing in
    # inference, and neither does the patched model; positions that repeat or jump are no
    # sequence boundary there either.
    odd = torch.tensor([[0, 1, 1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 7, 8, 9, 10, 11, 12]], device=DEVICE)
    for pos in (positions, odd):
        _assert_matches_unpatched(model, backend, ids, position_ids=pos)
        thinkfuse.unpatch_model(model)
    # In training a cache serves nothing: packed sequences are kept apart whatever use_cache says,
    # each equal to that sequence run alone.
    with torch.no_grad():
        alone = [model(ids[r:r + 1, a:b]).logits for r, cuts in enumerate([(0, 3, 10), (0, 6, 10)])
                 for a, b in zip(cuts, cuts[1:])]
        thinkfuse.patch_model(model, backend=backend)
        model.train()
        packed = model(ids, position_ids=positions, use_cache=True).logits
        model.eval()
    assert_close_fp32(packed, torch.cat([torch.cat(alone[:2], 1), torch.cat(alone[2:], 1)]), tol=1e-4)


PACKED_ROWS = {
    # row 1 starts at row 0's last position + 1: still a new sequence (rows never continue)
    "row-start": [[0, 1, 2, 0, 1, 2], [3, 4, 5, 6, 7, 8]],
    # a jump forward starts a sequence, as a restart does (transformers cuts where diff != 1)
    "jump": [[0, 1, 2, 7, 8, 9], [0, 1, 2, 3, 4, 5]],
    "repeat": [[0, 1, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10]],
    "one-per-row": [[3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5]],
    "broadcast": [[0, 1, 2, 0, 1, 2]],  # [1, S] position_ids shared by both rows
}


@pytest.mark.parametrize("rows", list(PACKED_ROWS))
def test_packed_plan_cuts_where_transformers_does(rows):
    """The attention function's packed sequences are transformers' (find_packed_sequence_indices,
    which its sdpa masks follow): a new sequence wherever a position is not the previous one + 1,
    and at the start of every row."""
    from transformers import masking_utils

    from thinkfuse import attention_interface

    position_ids = torch.tensor(PACKED_ROWS[rows])
    batch, seq = 2, position_ids.shape[1]
    find = getattr(masking_utils.find_packed_sequence_indices, "__wrapped__",
                   masking_utils.find_packed_sequence_indices)
    index = find(position_ids.expand(batch, seq))
    plan = attention_interface._packed_plan(position_ids, batch, seq)
    if index is None:
        assert plan is None
        return
    assert plan is not None, "packed sequences missed"
    flat = (index + torch.arange(batch)[:, None] * seq).flatten()  # sequence ids unique across rows
    starts = [0] + [i for i in range(1, flat.numel()) if flat[i] != flat[i - 1]]
    cu = [*starts, flat.numel()]
    assert plan[0].dtype == torch.int32 and plan[0].tolist() == cu
    assert plan[1] == max(b - a for a, b in zip(cu, cu[1:]))


def test_two_queries_with_restarting_positions_are_two_sequences():
    """Packing is looked for from two queries on: position_ids [0, 0] are two sequences of one
    token, each attending to itself alone (transformers' sdpa masks keep them apart too)."""
    q, k, v = _qkv(sq=2, sk=2)
    thinkfuse.set_backend("torch")
    out, _ = thinkfuse_attention_forward(_Module(is_causal=True), q, k, v, None, scaling=0.25,
                                         position_ids=torch.tensor([[0, 0]]), use_cache=False)
    assert_close_fp32(out, v.repeat_interleave(2, dim=1).transpose(1, 2))


def test_packed_rows_cut_at_jumps_and_row_starts():
    """A training batch whose position_ids jump forward inside a row and continue across rows
    (row 1 starts where row 0 ends): the same sequences as transformers' sdpa keeps apart."""
    model = tiny_model("qwen2").to(DEVICE).train()
    ids = tiny_batch(2, 10, device=DEVICE)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21]],
                             device=DEVICE)
    _assert_matches_unpatched(model, "torch", ids, position_ids=positions, use_cache=False)


def test_transformers_packing_decision_is_reused(monkeypatch):
    """Where transformers has looked for packed sequences itself (no mask, no cache) and found
    none, the attention function does not look again (a second host sync per forward); where it
    found some, or did not look, the attention function decides."""
    from thinkfuse import attention_interface

    plans = []
    real_plan = attention_interface._packed_plan
    monkeypatch.setattr(attention_interface, "_packed_plan", lambda *a: plans.append(1) or real_plan(*a))
    model = tiny_model("qwen2").to(DEVICE)
    thinkfuse.patch_model(model, backend="torch")
    ids = tiny_batch(2, 10, device=DEVICE)
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]], device=DEVICE)
    for training in (False, True):
        model.train(training)
        model(ids, use_cache=False)
        assert plans == [], training
        model(ids, position_ids=packed.clone(), use_cache=False)  # a new tensor: the plan is memoized
        assert len(plans) == 1, training  # once per forward, not per layer
        plans.clear()
    model(ids, position_ids=packed.clone(), use_cache=True)  # training with a cache: transformers did not look
    assert len(plans) == 1


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_packing_given_as_flash_attention_kwargs(family, backend, monkeypatch):
    """cu_seq_lens_q/k and max_length_q/k (DataCollatorWithFlattening(return_flash_attn_kwargs=True))
    are taken as flash_attention_2 takes them: each sequence equals itself run alone, and the
    position_ids are not read to find the sequences."""
    from thinkfuse import attention_interface

    monkeypatch.setattr(attention_interface, "_packed_plan", None)  # must not be needed
    model = tiny_model(family).to(DEVICE)
    lengths = [3, 9, 1, 5]
    ids = tiny_batch(1, sum(lengths), device=DEVICE)
    with torch.no_grad():
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        alone = torch.cat([model(ids[:, a:a + n]).logits for a, n in zip(starts, lengths)], 1)
        thinkfuse.patch_model(model, backend=backend)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        positions = torch.cat([torch.arange(n) for n in lengths])[None].to(DEVICE)
        packed = model(ids, position_ids=positions, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                       max_length_q=max(lengths), max_length_k=max(lengths)).logits
        assert_close_fp32(packed, alone, tol=1e-4)
        without_max = model(ids, position_ids=positions, use_cache=False, cu_seq_lens_q=cu.long(),
                            cu_seq_lens_k=cu.long()).logits
        assert_close_fp32(without_max, alone, tol=1e-4)
        numpy_max = model(ids, position_ids=positions, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                          max_length_q=np.int64(max(lengths)), max_length_k=np.int32(max(lengths))).logits
        assert_close_fp32(numpy_max, alone, tol=1e-4)
        with pytest.raises(ValueError, match="together"):
            model(ids, position_ids=positions, use_cache=False, cu_seq_lens_q=cu)
        with pytest.raises(TypeError, match="cu_seq_lens_k"):
            model(ids, position_ids=positions, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu.float())
        with pytest.raises(TypeError, match="max_length_q"):
            model(ids, position_ids=positions, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=2.5)


# Ops that read a tensor's values on the host: on a GPU each is a synchronisation.
_HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
               torch.ops.aten.nonzero.default}


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in _HOST_READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_forward_without_position_ids_reads_nothing_on_the_host(family):
    """Without position_ids the base model makes them (one sequence per row): the unpatched
    forward still looks for packed sequences in them (transformers' check, a host read), the
    patched one (positions rule) does not, in training and without or with a cache."""
    model = tiny_model(family).to(DEVICE).train()
    ids = tiny_batch(2, 12, device=DEVICE)
    base = model.model.language_model if family == "mistral3" else model.model

    def reads(**inputs):
        with _HostReads() as mode:
            base(input_ids=ids, **inputs).last_hidden_state.sum().backward()
        return mode.count

    assert reads(use_cache=False) >= 1
    ref = base(input_ids=ids, use_cache=False).last_hidden_state.detach()
    thinkfuse.patch_model(model, backend="torch")
    assert reads(use_cache=False) == 0 and reads(use_cache=True) == 0
    assert_close_fp32(base(input_ids=ids, use_cache=False).last_hidden_state.detach(), ref, tol=1e-4)
    positions = torch.arange(12, device=DEVICE)[None]
    assert reads(position_ids=positions.clone(), use_cache=False) >= 1  # given positions are checked
    thinkfuse.unpatch_model(model)
    assert "forward" not in base.__dict__ and reads(use_cache=False) >= 1


def test_packing_shortcuts_trace_under_fullgraph_compile():
    """The process-wide wrapper of transformers' packing check and the attention function's
    shortcut must not read their ContextVar while dynamo traces (it cannot): a whole unpatched
    sdpa model and a patched model's decoder layers still compile with fullgraph=True."""
    from thinkfuse.attention_interface import register_attention

    register_attention()  # installs the wrapper, as `import thinkfuse` does with transformers loaded
    ids = tiny_batch(1, 8, device=DEVICE)
    model = tiny_model("qwen2").to(DEVICE)
    model.config._attn_implementation = "sdpa"
    ref = model(ids, use_cache=False).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert_close_fp32(compiled(ids, use_cache=False).logits, ref, tol=1e-5)

    model = tiny_model("qwen2").to(DEVICE).train()
    ref = model(ids, use_cache=False).logits.detach()
    thinkfuse.patch_model(model, backend="torch")
    for layer in model.model.layers:
        layer.compile(backend="eager", fullgraph=True)
    torch._dynamo.reset()
    assert_close_fp32(model(ids, use_cache=False).logits.detach(), ref, tol=1e-4)


@pytest.mark.parametrize("use_cache", [None, False])
def test_patched_training_step_compiles_with_fullgraph(use_cache):
    """A whole patched model's training forward (labels, no mask, no position_ids) traces as
    one graph: the base model tells the attention by keyword that it made the positions, so
    nothing looks for packed sequences (a data-dependent nonzero) while compiling."""
    model = tiny_model("qwen2").to(DEVICE).train()
    ids = tiny_batch(2, 8, device=DEVICE)
    ref = model(ids, labels=ids, use_cache=use_cache).loss.detach()
    thinkfuse.patch_model(model, backend="torch")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    loss = compiled(ids, labels=ids, use_cache=use_cache).loss
    loss.backward()
    torch._dynamo.reset()
    assert_close_fp32(loss.detach(), ref, tol=1e-5)


def test_generated_positions_context_ends_with_the_forward():
    from thinkfuse import attention_interface

    model = tiny_model("qwen2").to(DEVICE)
    thinkfuse.patch_model(model, backend="torch")
    seen = []
    model.model.norm.register_forward_hook(lambda *_: seen.append(attention_interface._GENERATED_POSITIONS.get()))
    model(tiny_batch(1, 5, device=DEVICE))
    model(tiny_batch(1, 5, device=DEVICE), position_ids=torch.arange(5, device=DEVICE)[None])
    assert seen == [True, False] and not attention_interface._GENERATED_POSITIONS.get()
    with pytest.raises(Exception):
        model(tiny_batch(1, 5, device=DEVICE) + 10**6)  # ids out of the embedding's range
    assert not attention_interface._GENERATED_POSITIONS.get()


def test_sliding_window(backend):
    model = tiny_model("mistral").to(DEVICE)
    model.config.sliding_window = 4
    ids = tiny_batch(2, 10, device=DEVICE)
    mask = _padding_mask(2, 10, "left")
    _assert_matches_unpatched(model, backend, ids, mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    thinkfuse.unpatch_model(model)
    ref_tokens, ref_logits = _greedy(model, ids, mask, max_new_tokens=5)
    thinkfuse.patch_model(model, backend=backend)
    tokens, logits = _greedy(model, ids, mask, max_new_tokens=5)
    assert torch.equal(tokens, ref_tokens)
    assert_close_fp32(logits, ref_logits, tol=1e-4)


def _greedy(model, ids, mask, max_new_tokens=20):
    """Greedy tokens and every step's logits: tiny random models hardly depend on their attention,
    so a wrong attention can leave the tokens unchanged; the logits show it."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_left_padded_matches_unpatched(family, backend):
    model = tiny_model(family).to(DEVICE)
    ids = tiny_batch(2, 7, device=DEVICE)
    mask = _padding_mask(2, 7, "left")
    ref_tokens, ref_logits = _greedy(model, ids, mask)
    thinkfuse.patch_model(model, backend=backend)
    tokens, logits = _greedy(model, ids, mask)
    assert torch.equal(tokens, ref_tokens)
    assert_close_fp32(logits, ref_logits, tol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_decode_steps_skip_the_padding_in_place(family, backend, monkeypatch):
    """Left-padded generate: the decode steps hand each row's padding length to the decode kernel
    (cache_leftpad), which skips it in place; nothing is unpadded (that would copy every layer's
    K/V cache each step) except the prefill. The logits of every step match unpatched."""
    from thinkfuse import attention_interface

    model = tiny_model(family).to(DEVICE)
    ids = tiny_batch(2, 7, device=DEVICE)
    mask = _padding_mask(2, 7, "left")

    def generate():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
        return out.sequences, torch.stack(out.logits, 1)

    ref_tokens, ref_logits = generate()
    leftpads, unpads = [], []
    decode, unpad = thinkfuse.ops.decode_attention, attention_interface._unpad_data
    monkeypatch.setattr(thinkfuse.ops, "decode_attention",
                        lambda *a, **k: leftpads.append(k.get("cache_leftpad")) or decode(*a, **k))
    monkeypatch.setattr(attention_interface, "_unpad_data", lambda *a: unpads.append(1) or unpad(*a))
    thinkfuse.patch_model(model, backend=backend)
    tokens, logits = generate()
    assert torch.equal(tokens, ref_tokens)
    assert_close_fp32(logits, ref_logits, tol=1e-4)
    layers = _text_config(model).num_hidden_layers
    assert len(leftpads) == 5 * layers  # every step after the prefill, every layer
    assert all(pad is not None and pad.tolist() == [4, 0] for pad in leftpads)
    assert len(unpads) == 2  # the prefill's unpad plans (queries, keys), shared by its layers


def test_step_recording_gradients_after_cached_keys_does_not_decode(monkeypatch):
    """decode_attention is not differentiable: a training step of a few queries after cached keys
    (Sq < Sk, as a decode step looks) that records gradients runs flash attention, with the
    logits and gradients of unpatched sdpa; only the no-grad steps decode."""
    from transformers import DynamicCache

    model = tiny_model("qwen2").to(DEVICE).train()
    ids = tiny_batch(2, 9, device=DEVICE)

    def step():
        model.zero_grad(set_to_none=True)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids[:, :6], past_key_values=cache, use_cache=True)
            model(ids[:, 6:7], past_key_values=cache, use_cache=True)  # a no-grad decode step
        logits = model(ids[:, 7:], past_key_values=cache, use_cache=True).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1], device=DEVICE)).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_logits, ref_grads = step()
    calls = []
    decode = thinkfuse.ops.decode_attention
    monkeypatch.setattr(thinkfuse.ops, "decode_attention",
                        lambda q, *a, **k: calls.append(torch.is_grad_enabled()) or decode(q, *a, **k))
    thinkfuse.patch_model(model, backend="torch")
    logits, grads = step()
    assert calls == [False, False]  # the no-grad decode step, in both layers
    assert_close_fp32(logits, ref_logits, tol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert_close_fp32(grads[name], grad, tol=1e-4)


def test_greedy_generate_without_padding_uses_decode_kernel(backend, monkeypatch):
    """No padding: decode steps go to ops.decode_attention (the mask is None, Sq < Sk)."""
    model = tiny_model("qwen2").to(DEVICE)
    ids = tiny_batch(2, 7, device=DEVICE)
    ids = ids[:, :4]
    ref_tokens, ref_logits = _greedy(model, ids, None, max_new_tokens=8)
    calls = []
    original = thinkfuse.ops.decode_attention
    monkeypatch.setattr(thinkfuse.ops, "decode_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    thinkfuse.patch_model(model, backend=backend)
    tokens, logits = _greedy(model, ids, None, max_new_tokens=8)
    assert torch.equal(tokens, ref_tokens)
    assert_close_fp32(logits, ref_logits, tol=1e-4)
    assert len(calls) == 7 * 2  # every decode step after the prefill, in both layers


def _static_cache_chunks(model, ids, chunks):
    """Logits of feeding ``ids`` in the given chunk sizes into one StaticCache with no
    attention_mask: the attention gets the cache's whole buffer, mostly unwritten slots."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=40)
    logits, start = [], 0
    with torch.no_grad():
        for size in chunks:
            logits.append(model(ids[:, start:start + size], past_key_values=cache, use_cache=True).logits)
            start += size
    return torch.cat(logits, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_without_mask_ignores_unwritten_slots(family, backend):
    """A StaticCache forward with no attention_mask: only the written slots are keys (sdpa gets
    that from its causal mask). Chunks of 7 (prefill, flash kernel), 1 and 3 (decode kernel)
    and 10 (more queries than the decode kernel takes: flash again)."""
    model = tiny_model(family).to(DEVICE).eval()
    ids = tiny_batch(2, 21, device=DEVICE)
    chunks = [7, 1, 3, 10]
    ref = _static_cache_chunks(model, ids, chunks)
    thinkfuse.patch_model(model, backend=backend)
    assert_close_fp32(_static_cache_chunks(model, ids, chunks), ref, tol=1e-4)


def test_static_cache_chunks_longer_than_a_decode_step_attend_to_the_written_slots(monkeypatch):
    """Chunks of more queries than the decode kernel takes run flash attention over a static
    cache's buffer: the keys are its first written slots (the count the mask function made),
    the chunk's queries the last of them (bottom-right causal); logits as unpatched sdpa."""
    from thinkfuse.ops.attention import MAX_DECODE_QUERIES

    model = tiny_model("qwen2").to(DEVICE).eval()
    n = MAX_DECODE_QUERIES + 1
    chunks = [n, 2, n]
    ids = tiny_batch(2, sum(chunks), device=DEVICE)
    ref = _static_cache_chunks(model, ids, chunks)
    keys = []
    flash = thinkfuse.ops.flash_attention
    monkeypatch.setattr(thinkfuse.ops, "flash_attention",
                        lambda q, k, *a, **kw: keys.append(k.shape[1]) or flash(q, k, *a, **kw))
    thinkfuse.patch_model(model, backend="torch")
    assert_close_fp32(_static_cache_chunks(model, ids, chunks), ref, tol=1e-4)
    assert keys == [n, n, 2 * n + 2, 2 * n + 2]  # the written slots of the two long chunks, both layers


def _static_generate(model, ids, mask, compiled):
    """Greedy generate with a static cache: tokens and the logits of every step (tiny random
    models repeat tokens, so the logits are what can tell a wrong attention apart). Compiled as
    generate compiles on a GPU (fullgraph, so a graph break fails), with dynamo's eager backend."""
    from transformers import CompileConfig

    compile_config = None
    if compiled:
        compile_config = CompileConfig(backend="eager", fullgraph=True)
        compile_config._compile_all_devices = True  # generate compiles on GPUs only by default
        torch._dynamo.reset()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         cache_implementation="static", compile_config=compile_config,
                         disable_compile=not compiled, return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
def test_greedy_generate_with_static_cache_matches_unpatched(padded, family, backend):
    """Unpadded, generate hands no mask (the written-slot count is used). For a static cache
    generate makes the masks itself (create_masks_for_generate) and feeds them back as the
    model's attention_mask: models without layer_types (Mistral, Ministral 3) then make their
    mask again from it, which a 2-D count would not survive (read as padding)."""
    _check_static_generate(padded, compiled=False, backend=backend, family=family)


@pytest.mark.parametrize("padded", [False, True])
def test_compiled_static_cache_generate_matches_unpatched(padded):
    """Compiled decode steps: unpadded, the written-slot count reaches the decode kernel as a
    tensor; left-padded, steps with a padding mask run sdpa (no host read, no graph break)."""
    _check_static_generate(padded, compiled=True, backend="torch")


def _check_static_generate(padded, compiled, backend, family="qwen2"):
    model = tiny_model(family).to(DEVICE)
    ids = tiny_batch(2, 7, device=DEVICE)
    mask = _padding_mask(2, 7, "left") if padded else torch.ones_like(ids)
    ref_tokens, ref_logits = _static_generate(model, ids, mask, compiled=False)
    thinkfuse.patch_model(model, backend=backend)
    tokens, logits = _static_generate(model, ids, mask, compiled)
    torch._dynamo.reset()
    assert torch.equal(tokens, ref_tokens)
    assert_close_fp32(logits, ref_logits, tol=1e-4)


def _padded_cache_step(model, cache_kind, step_tokens, compiled, mask=None):
    """Logits of a compiled (or eager) forward of ``step_tokens`` new tokens after a padded
    prefill (default: left padding), both with a 2-D padding mask, on a static or dynamic cache."""
    from transformers import DynamicCache, StaticCache

    ids = tiny_batch(2, 6, device=DEVICE)
    mask = _padding_mask(2, 6, "left") if mask is None else mask
    new = tiny_batch(2, step_tokens, seed=5, device=DEVICE)
    cache = StaticCache(config=model.config, max_cache_len=16) if cache_kind == "static" else DynamicCache()
    step = torch.compile(model.forward, backend="eager") if compiled else model.forward
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        mask = torch.cat([mask, torch.ones(2, step_tokens, dtype=mask.dtype, device=DEVICE)], 1)
        logits = step(input_ids=new, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    torch._dynamo.reset()
    return logits


@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
@pytest.mark.parametrize("step_tokens", [1, 3])
def test_compiled_padded_cache_step_is_causal_and_windowed(cache_kind, step_tokens):
    """Compiled steps with a padding mask run sdpa on a dense mask we build: causal from the
    last written key (a static cache's buffer runs further) and within the sliding window
    (Mistral, window 3, shorter than the context)."""
    model = tiny_model("mistral").to(DEVICE).eval()
    model.config.sliding_window = 3
    ref = _padded_cache_step(model, cache_kind, step_tokens, compiled=False)
    thinkfuse.patch_model(model, backend="torch")
    assert_close_fp32(_padded_cache_step(model, cache_kind, step_tokens, compiled=True), ref, tol=1e-4)


PREFILL_MASKS = {
    "left": [[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]],
    "hole": [[1, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]],  # not left padding: the unpad path
    "right": [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]],
}


@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
@pytest.mark.parametrize("prefill_mask", list(PREFILL_MASKS))
@pytest.mark.parametrize("step_tokens", [1, 3])
def test_eager_padded_cache_step_matches_unpatched(cache_kind, prefill_mask, step_tokens, backend):
    """Eager decode steps after a padded prefill: left padding runs the decode kernel with
    cache_leftpad; other padding patterns unpad, except that tokens after padding under a
    sliding window (Mistral, window 4, shorter than the context) run sdpa, whose window counts
    cache slots (unpadded, it would count tokens). All as unpatched sdpa."""
    model = tiny_model("mistral").to(DEVICE).eval()
    model.config.sliding_window = 4
    mask = torch.tensor(PREFILL_MASKS[prefill_mask], device=DEVICE)
    ref = _padded_cache_step(model, cache_kind, step_tokens, compiled=False, mask=mask)
    thinkfuse.patch_model(model, backend=backend)
    assert_close_fp32(_padded_cache_step(model, cache_kind, step_tokens, compiled=False, mask=mask), ref, tol=1e-4)


@pytest.mark.parametrize("prefill_mask", ["left", "right"])
def test_decode_step_of_mixed_layers_reads_each_mask_once(prefill_mask, monkeypatch):
    """Full and sliding-window layers alternating (Qwen2 layer_types) get two masks per forward.
    A decode step looks at each once, whatever its padding: left padding (the left-padding check
    only) or padding between tokens (the check, then the unpad plan), memoized across the
    layers; not once per layer (a host read each, 2 per layer when the memo held two entries)."""
    from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

    from thinkfuse import attention_interface
    from thinkfuse.tiny import _COMMON

    torch.manual_seed(0)
    config = Qwen2Config(**{**_COMMON, "num_hidden_layers": 6}, use_sliding_window=True, sliding_window=4,
                         layer_types=["full_attention", "sliding_attention"] * 3)
    model = Qwen2ForCausalLM(config).to(DEVICE).eval()
    ids = tiny_batch(2, 6, device=DEVICE)
    mask = torch.tensor(PREFILL_MASKS[prefill_mask], device=DEVICE)

    def step(calls=None):
        cache = DynamicCache(config=config)
        with torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=cache)
            if calls is not None:  # the decode step only
                plan = attention_interface._padding_plan
                monkeypatch.setattr(attention_interface, "_padding_plan", lambda *a: calls.append("plan") or plan(*a))
            full = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            return model(ids[:, :1], attention_mask=full, past_key_values=cache).logits

    ref = step()
    thinkfuse.patch_model(model, backend="torch")
    calls = []
    assert_close_fp32(step(calls), ref, tol=1e-4)
    assert calls == ["plan", "plan"]  # one per mask (a host read each), not one per layer


def test_left_padding_detection_reads_the_host_once(monkeypatch):
    """The plan's left_padding: the padding length per row when every row is padding then
    tokens (the queries among them), else None; from the plan's one host read."""
    from thinkfuse import attention_interface

    def left(rows, sq=1):
        return attention_interface._padding_plan(torch.tensor(rows, device=DEVICE), sq).left_padding

    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or real_tolist(t))
    monkeypatch.setattr(torch.Tensor, "__bool__", None)
    monkeypatch.setattr(torch.Tensor, "item", None)
    pads = left([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert len(reads) == 1
    monkeypatch.undo()
    assert pads.dtype == torch.int32 and pads.tolist() == [2, 0, 3]
    assert left([[0, 1, 0, 1], [1, 1, 1, 1]]) is None  # a hole
    assert left([[1, 1, 0, 0]]) is None  # right padding: the query is padding
    assert left([[0, 0, 1, 1]], sq=3) is None  # a query is padding
    assert left([[0, 1, 1, 1]], sq=3).tolist() == [1]


def test_static_cache_decode_step_compiles_with_fullgraph():
    """The reason to use a static cache: a compiled decode step. The written-key count reaches
    the decode kernel as a device tensor, so nothing reads the host while tracing."""
    model = tiny_model("qwen2").to(DEVICE).eval()
    ids = tiny_batch(2, 8, device=DEVICE)
    ref = _static_cache_chunks(model, ids, [5, 1, 1, 1])
    thinkfuse.patch_model(model, backend="torch")
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=16)
    torch._dynamo.reset()
    step = torch.compile(lambda t: model(t, past_key_values=cache, use_cache=True).logits, backend="eager",
                         fullgraph=True)
    with torch.no_grad():
        logits = [model(ids[:, :5], past_key_values=cache, use_cache=True).logits]
        logits += [step(ids[:, i:i + 1]) for i in range(5, 8)]
    torch._dynamo.reset()
    assert_close_fp32(torch.cat(logits, 1), ref, tol=1e-4)


def test_attn_implementation_thinkfuse_without_patching():
    """Registered with transformers: usable as attn_implementation="thinkfuse" on its own."""
    from transformers import AutoModelForCausalLM

    reference = tiny_model("qwen2").to(DEVICE)
    model = AutoModelForCausalLM.from_config(reference.config, attn_implementation=ATTN_IMPLEMENTATION)
    model.load_state_dict(reference.state_dict())
    model.to(DEVICE)
    model.eval()
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    ids = tiny_batch(2, 9, device=DEVICE)
    mask = _padding_mask(2, 9, "left")
    valid = mask.bool()
    assert_close_fp32(model(ids, attention_mask=mask).logits[valid], reference(ids, attention_mask=mask).logits[valid],
                      tol=1e-4)


def test_mistral3_vision_tower_keeps_its_attention():
    model = tiny_model("mistral3")
    vision_before = model.config.vision_config._attn_implementation
    report = thinkfuse.patch_model(model, backend="torch")
    assert report.patched["attention"] == 2 and report.attention == "thinkfuse:torch"
    assert model.config.text_config._attn_implementation == ATTN_IMPLEMENTATION
    assert model.config.vision_config._attn_implementation == vision_before != ATTN_IMPLEMENTATION
    assert not any(hasattr(m, "_thinkfuse_patch") for m in model.model.vision_tower.modules())
    thinkfuse.unpatch_model(model)
    assert model.config.text_config._attn_implementation == vision_before


def test_opt_out_and_exact_restore():
    model = tiny_model("qwen2")
    model.config._attn_implementation = "eager"
    report = thinkfuse.patch_model(model, attention=False)
    assert "attention" not in report.patched and "attention" in report.disabled
    assert report.attention == "transformers" and model.config._attn_implementation == "eager"
    thinkfuse.unpatch_model(model)
    report = thinkfuse.patch_model(model)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert thinkfuse.patch_model(model).patched == report.patched  # twice: no-op, original kept
    assert thinkfuse.unpatch_model(model) == report.total
    assert model.config._attn_implementation == "eager"


def test_dropout_in_training_is_a_clear_error():
    model = tiny_model("qwen2")
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    thinkfuse.patch_model(model, backend="torch")
    model.train()
    with pytest.raises(ValueError, match="dropout"):
        model(tiny_batch())
    model.eval()  # inference passes dropout=0
    model(tiny_batch())


class _Module(torch.nn.Module):
    def __init__(self, is_causal):
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = 2


def _qkv(b=2, hq=4, hkv=2, sq=5, sk=5, d=16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, hq, sq, d, generator=g), torch.randn(b, hkv, sk, d, generator=g),
            torch.randn(b, hkv, sk, d, generator=g))


def test_non_causal_module_falls_back_to_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv()
    module = _Module(is_causal=False)
    ours, _ = thinkfuse_attention_forward(module, q, k, v, None, scaling=0.25)
    ref, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25, is_causal=False)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("head_dim", [16, 24])  # the kernels, and sdpa for a head_dim they do not take
def test_padding_mask_longer_than_the_keys_keeps_its_last_columns(head_dim):
    """A 2-D mask over more tokens than the keys handed in (a sliding-window cache keeps only the
    newest keys) describes them by its last columns: the same output as the mask cut to them."""
    q, k, v = _qkv(sq=1, sk=3, d=head_dim)
    thinkfuse.set_backend("torch")
    long = torch.tensor([[0, 0, 1, 1, 1], [1, 0, 1, 1, 1]], dtype=torch.bool)
    module = _Module(is_causal=True).eval()
    with torch.no_grad():
        out, _ = thinkfuse_attention_forward(module, q, k, v, long, scaling=0.25)
        ref, _ = thinkfuse_attention_forward(module, q, k, v, long[:, -3:], scaling=0.25)
    assert torch.equal(out, ref)


def test_bad_inputs_are_clear_errors():
    q, k, v = _qkv()
    module = _Module(is_causal=True)
    with pytest.raises(ValueError, match="batch"):
        thinkfuse_attention_forward(module, q, k, v, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask"):
        thinkfuse_attention_forward(module, q, k, v, torch.ones(2, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="query"):
        thinkfuse_attention_forward(module, q[0], k, v, None)
    with pytest.raises(ValueError, match="heads"):
        thinkfuse_attention_forward(module, q[:, :3], k, v, None)
    with pytest.raises(TypeError, match="attention"):
        thinkfuse.patch_model(tiny_model("qwen2"), attention="yes")


def test_mask_function_hands_through_the_padding_mask():
    mask = torch.tensor([[False, True, True], [True, True, True]])
    assert torch.equal(thinkfuse_attention_mask(batch_size=2, q_length=3, kv_length=3, attention_mask=mask), mask)
    ones = torch.ones(2, 3).bool()  # whether anything is padding is the attention function's call
    handed = thinkfuse_attention_mask(batch_size=2, q_length=3, kv_length=3, attention_mask=ones)
    # a new view each call (each forward): the attention function's padding plans live one forward
    assert torch.equal(handed, ones) and handed is not ones and handed.data_ptr() == ones.data_ptr()
    window = thinkfuse_attention_mask(batch_size=2, q_length=1, kv_length=2, attention_mask=mask)
    assert torch.equal(window, mask[:, -2:])  # a sliding-window cache keeps the last kv_length keys
    assert thinkfuse_attention_mask(batch_size=2, q_length=3, kv_length=3, attention_mask=None) is None
    # No mask and the causal skip allowed: transformers found a plain causal mask (no packing).
    marker = thinkfuse_attention_mask(batch_size=2, q_length=3, kv_length=3, attention_mask=None,
                                      allow_is_causal_skip=True, device="cpu")
    assert marker.shape == (2, 0) and marker.dtype == torch.bool
    dense = thinkfuse_attention_mask(batch_size=2, q_length=3, kv_length=3, attention_mask=mask, use_vmap=True,
                                     allow_is_causal_skip=False, device="cpu")
    assert dense.shape == (2, 1, 3, 3)  # custom mask patterns get the sdpa mask


@pytest.mark.parametrize("source", ["q_offset-int", "q_offset-tensor", "cache_position"])
def test_mask_function_counts_the_written_slots_of_a_static_cache(source):
    """No mask and more key slots than tokens so far (a static cache's buffer): the marker holds
    the written-slot count, from q_offset (int, or a device tensor as static caches give it) or,
    as older transformers pass it, from cache_position; kv_offset is subtracted."""
    q_length, kv_length, written = 2, 16, 7  # the queries are tokens 5 and 6
    given = {"q_offset-int": {"q_offset": 5}, "q_offset-tensor": {"q_offset": torch.tensor(5)},
             "cache_position": {"cache_position": torch.arange(5, 7)}}[source]
    marker = thinkfuse_attention_mask(batch_size=3, q_length=q_length, kv_length=kv_length, attention_mask=None,
                                      device="cpu", **given)
    assert marker.shape == (3, 1, 1, 1) and marker.dtype == torch.int32
    assert marker.flatten().tolist() == [written] * 3
    shifted = thinkfuse_attention_mask(batch_size=1, q_length=q_length, kv_length=kv_length, attention_mask=None,
                                       device="cpu", kv_offset=3, **given)
    assert shifted.flatten().tolist() == [written - 3]
    # every slot written (a dynamic cache): no marker, or (a tensor count, not read on the host)
    # one that counts every slot
    full = thinkfuse_attention_mask(batch_size=1, q_length=q_length, kv_length=written, attention_mask=None,
                                    device="cpu", **given)
    assert full is None if source == "q_offset-int" else full.flatten().tolist() == [written]


def test_padding_plan_reads_the_host_once(monkeypatch):
    """The unpad plan of a padded mask equals nonzero's, from one host read of the row lengths
    (nonzero itself would be a second); a mask without padding has no plan (dense attention)."""
    from thinkfuse import attention_interface

    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(4, 11, generator=gen) > 0.3
    mask[2] = False  # an empty row
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or real_tolist(t))
    monkeypatch.setattr(torch, "nonzero", None)
    plan = attention_interface._padding_plan(mask, 5)
    (idx_q, cu_q, max_q), (idx_k, cu_k, max_k) = plan.unpadded
    assert len(reads) == 1
    monkeypatch.undo()
    for valid, idx, cu, longest in ((mask[:, -5:], idx_q, cu_q, max_q), (mask, idx_k, cu_k, max_k)):
        lengths = valid.sum(-1)
        assert torch.equal(idx, torch.nonzero(valid.flatten()).flatten())
        assert cu.dtype == torch.int32 and cu.tolist() == [0, *lengths.cumsum(0).tolist()]
        assert longest == int(lengths.max())
    assert not plan.one_run and plan.left_padding is None  # random holes
    assert attention_interface._padding_plan(torch.ones(3, 6, dtype=torch.bool), 2) is None
    ends = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert attention_interface._padding_plan(ends, 2).one_run  # padding at the ends only (or an empty row)


def test_attention_rule_without_the_rope_rule():
    """rope=False keeps transformers' attention forward, which still dispatches to "thinkfuse"."""
    model = tiny_model("ministral3").to(DEVICE)
    ids = tiny_batch(3, 9, device=DEVICE)
    mask = _padding_mask(3, 9, "right")
    ref = model(ids, attention_mask=mask).logits
    report = thinkfuse.patch_model(model, backend="torch", rope=False)
    assert report.patched == {"rms_norm": 5, "swiglu": 2, "attention": 2, "positions": 1, "loss": 1}
    valid = mask.bool()
    assert_close_fp32(model(ids, attention_mask=mask).logits[valid], ref[valid], tol=1e-4)


def test_rope_rule_reads_the_models_rotary_embedding():
    """The fused rope runs with the rotary embedding module's inv_freq buffer and
    attention_scaling as they are, which is what transformers' cos/sin are made of: a YaRN
    config (attention_scaling 1 + 0.1 ln 4) and a buffer rounded the way model.to(bfloat16)
    after construction rounds it (keys far apart make the rounding show)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from thinkfuse.tiny import _COMMON

    torch.manual_seed(0)
    config = Qwen2Config(**_COMMON, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                     "original_max_position_embeddings": 128})
    model = Qwen2ForCausalLM(config).to(DEVICE).eval()
    rotary, attention = model.model.rotary_emb, model.model.layers[0].self_attn
    assert rotary.attention_scaling > 1.1
    # the attention module itself, on large hidden states: sharp attention shows small angle errors
    hidden = 4 * torch.randn(2, 9, config.hidden_size, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    # 700 apart: angles between keys are what attention sees. use_cache: not packed sequences.
    positions = 700 * torch.arange(9, device=DEVICE).expand(2, -1)
    with torch.no_grad():
        rotary.inv_freq.copy_(rotary.inv_freq.bfloat16().float())
        cos_sin = rotary(hidden, positions)
        ref = attention(hidden, cos_sin, None, position_ids=positions, use_cache=True)[0]
        thinkfuse.patch_model(model, backend="torch")
        out = attention(hidden, cos_sin, None, position_ids=positions, use_cache=True)[0]
    assert_close_fp32(out, ref, tol=1e-4)


def test_attn_implementation_thinkfuse_after_a_plain_import(tmp_path):
    """`import thinkfuse` is enough for from_pretrained(attn_implementation="thinkfuse"), and it
    neither loads transformers' modeling code nor triton itself (TRITON_INTERPRET set after the
    import must still work)."""
    import subprocess
    import sys

    tiny_model("qwen2").save_pretrained(tmp_path)
    script = f"""
import sys
import torch
import thinkfuse
assert "transformers.modeling_utils" not in sys.modules
# torch.library's custom ops import triton themselves on torch's CUDA builds (torch 2.11+cu130)
assert torch.version.cuda is not None or "triton" not in sys.modules
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, attn_implementation="thinkfuse")
assert model.config._attn_implementation == "thinkfuse"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def _sdpa_twin(model):
    """A copy of ``model`` on transformers' sdpa (the reference of the unpatched model)."""
    import copy

    twin = copy.deepcopy(model)
    twin.set_attn_implementation("sdpa")
    return twin


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_inference_mode_matches_sdpa(family, backend):
    """Under torch.inference_mode (pipelines, servers) masks and position_ids are inference
    tensors, which keep no version counter: padded batches, packed positions and left-padded
    generate work there as under no_grad."""
    model = tiny_model(family).to(DEVICE)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    reference = _sdpa_twin(model)
    ids = tiny_batch(2, 9, device=DEVICE)
    thinkfuse.set_backend(backend)
    with torch.inference_mode():
        mask = _padding_mask(2, 9, "left").bool()
        valid = mask.clone()
        assert_close_fp32(model(ids, attention_mask=mask).logits[valid],
                          reference(ids, attention_mask=mask).logits[valid], tol=1e-4)
        packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5]] * 2, device=DEVICE)
        assert_close_fp32(model(ids, position_ids=packed, use_cache=False).logits,
                          reference(ids, position_ids=packed, use_cache=False).logits, tol=1e-4)
        tokens, logits = _greedy(model, ids, mask.long(), max_new_tokens=3)
        ref_tokens, ref_logits = _greedy(reference, ids, mask.long(), max_new_tokens=3)
    assert torch.equal(tokens, ref_tokens)
    assert_close_fp32(logits, ref_logits, tol=1e-4)


def _unversioned_writes():
    """Ways to write into a mask between two forwards that its version counter does not see."""

    def through_data(mask, rows):
        mask.data[rows] = False

    def through_numpy(mask, rows):
        mask.numpy()[rows] = False

    def in_inference_mode(mask, rows):
        mask[rows] = False  # an inference tensor: no version counter at all

    return {"data": through_data, "numpy": through_numpy, "inference_mode": in_inference_mode}


@pytest.mark.parametrize("write", list(_unversioned_writes()))
def test_mask_written_between_forwards_gets_a_new_padding_plan(write):
    """The padding plan is memoized across the layers of one forward, never across forwards:
    the same mask tensor, written in place between two forwards in a way its version counter
    does not record, gives the second forward the new mask's result."""
    model = tiny_model("qwen2")
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    reference = _sdpa_twin(model)
    thinkfuse.set_backend("torch")
    ids = tiny_batch(2, 9)
    context = torch.inference_mode() if write == "inference_mode" else torch.no_grad()
    with context:
        mask = torch.ones(2, 9, dtype=torch.bool)
        model(ids, attention_mask=mask)  # no padding: the plan of this forward is "dense"
        _unversioned_writes()[write](mask, (0, slice(0, 3)))
        valid = mask.clone()
        assert_close_fp32(model(ids, attention_mask=mask).logits[valid],
                          reference(ids, attention_mask=mask).logits[valid], tol=1e-4)


def test_position_ids_reused_across_forwards_get_their_own_packed_plan():
    """The packed plan of a position_ids tensor is memoized across the layers of one forward
    only as long as it fits: the same tensor in a later forward with a larger batch (a shared
    [1, S] tensor), or after an in-place write, gets the plan of what it now describes."""
    model = tiny_model("qwen2")
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    reference = _sdpa_twin(model)
    thinkfuse.set_backend("torch")
    ids = tiny_batch(2, 6)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    with torch.no_grad():
        for rows in (ids[:1], ids):  # one row, then two rows sharing the [1, S] positions
            assert_close_fp32(model(rows, position_ids=positions, use_cache=False).logits,
                              reference(rows, position_ids=positions, use_cache=False).logits, tol=1e-4)
        positions[0, 2:] = torch.tensor([0, 1, 2, 3])  # in place: sequences of 2 and 4 tokens now
        assert_close_fp32(model(ids, position_ids=positions, use_cache=False).logits,
                          reference(ids, position_ids=positions, use_cache=False).logits, tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("head_dim", [16, 24])
def test_inputs_the_kernels_do_not_take_run_sdpa(head_dim, dtype):
    """attn_implementation="thinkfuse" on a model whose head_dim or dtype the kernels do not take
    (patch_model leaves those modules alone) runs transformers' sdpa instead of raising."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from thinkfuse.tiny import _COMMON

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**{**_COMMON, "head_dim": head_dim})).to(dtype).eval()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    reference = _sdpa_twin(model)
    ids = tiny_batch(2, 9)
    mask = _padding_mask(2, 9, "left")
    valid = mask.bool()
    with torch.no_grad():
        assert_close_fp32(model(ids, attention_mask=mask).logits[valid],
                          reference(ids, attention_mask=mask).logits[valid], tol=1e-4)
        tokens, logits = _greedy(model, ids, mask, max_new_tokens=3)
        ref_tokens, ref_logits = _greedy(reference, ids, mask, max_new_tokens=3)
    assert torch.equal(tokens, ref_tokens)
    assert_close_fp32(logits, ref_logits, tol=1e-4)


@pytest.mark.parametrize("extra", [{"s_aux": torch.zeros(4)}, {"softcap": 30.0}])
def test_attention_sinks_and_softcap_are_clear_errors(extra):
    """Neither our kernels nor transformers' sdpa implement attention sinks (sdpa drops s_aux
    silently) or logit soft-capping: asking for them is an error naming the argument."""
    q, k, v = _qkv(sq=3, sk=8)
    name = next(iter(extra))
    with pytest.raises(ValueError, match=f"thinkfuse attention.*{name}"):
        thinkfuse_attention_forward(_Module(is_causal=True), q, k, v, None, scaling=0.25, **extra)


def test_output_attentions_warns_that_no_weights_come_back():
    model = tiny_model("qwen2").to(DEVICE).eval()
    thinkfuse.patch_model(model)
    with pytest.warns(UserWarning, match="no attention weights"):
        out = model(tiny_batch(1, 5, device=DEVICE), output_attentions=True)
    assert not any(weights is not None for weights in (out.attentions or ()))


@pytest.mark.parametrize("cache_kind", ["dynamic", "static", None])
def test_sdpa_fallback_without_a_mask_is_bottom_right_causal_and_windowed(cache_kind):
    """Where sdpa runs for us (here: head_dim 24, which the kernels do not take) with no mask
    (nothing padded: our mask function makes none), the queries after cached keys still see
    the cache (bottom-right causal, not sdpa's top-left is_causal) and the sliding window
    still applies (Mistral, window 3, shorter than the chunks)."""
    from transformers import DynamicCache, MistralConfig, MistralForCausalLM, StaticCache

    from thinkfuse.tiny import _COMMON

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**{**_COMMON, "head_dim": 24}, sliding_window=3)).eval()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    reference = _sdpa_twin(model)
    ids = tiny_batch(2, 12)

    def chunked(m):
        if cache_kind is None:
            return m(ids, use_cache=False).logits
        static = cache_kind == "static"
        cache = StaticCache(config=m.config, max_cache_len=20) if static else DynamicCache(config=m.config)
        return torch.cat([m(ids[:, a:b], past_key_values=cache, use_cache=True).logits
                          for a, b in ((0, 5), (5, 8), (8, 12))], 1)

    with torch.no_grad():
        assert_close_fp32(chunked(model), chunked(reference), tol=1e-4)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_sdpa_fallback_after_cached_keys_without_a_window(cache_kind, padded):
    """Where sdpa runs for us (head_dim 24) on a model without a sliding window: chunks after
    cached keys are bottom-right causal, a static cache's unwritten slots are no keys, with or
    without a padding mask (which ends at the written slots)."""
    from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM, StaticCache

    from thinkfuse.tiny import _COMMON

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**{**_COMMON, "head_dim": 24})).eval()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    reference = _sdpa_twin(model)
    ids = tiny_batch(2, 12)
    mask = _padding_mask(2, 12, "left").cpu() if padded else None

    def chunked(m):
        static = cache_kind == "static"
        cache = StaticCache(config=m.config, max_cache_len=20) if static else DynamicCache(config=m.config)
        logits = []
        for a, b in ((0, 5), (5, 8), (8, 12)):
            extra = {} if mask is None else {"attention_mask": mask[:, :b]}
            logits.append(m(ids[:, a:b], past_key_values=cache, use_cache=True, **extra).logits)
        return torch.cat(logits, 1)

    with torch.no_grad():
        ours, ref = chunked(model), chunked(reference)
    valid = slice(None) if mask is None else mask.bool()
    assert_close_fp32(ours[valid], ref[valid], tol=1e-4)
