"""thinkfuse.ops.rope and apply_rotary_pos_emb: every backend against reference.py, reference.py
against transformers (Qwen2/Ministral 3 attention), forward and gradients, dtypes, GQA, odd
sizes, packed/broadcast/far positions, the Ministral 3 query temperature, strides, bad inputs,
custom-op registration and torch.compile."""

import math
from dataclasses import dataclass, field

import pytest
import torch
from conftest import DEVICE, KERNEL_BACKENDS
from strided_helpers import spy_on_op_calls, strided_leaf
from tolerances import assert_close_fp32, assert_low_precision_ok
from transformers.models.ministral3 import modeling_ministral3
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb as hf_apply_rotary_pos_emb

import thinkfuse
from thinkfuse import reference
from thinkfuse.ops import apply_rotary_pos_emb, rope

LLAMA4 = (0.1, 16384)  # Ministral 3's (llama_4_scaling_beta, original_max_position_embeddings)
FAR_POSITIONS = [0, 16383, 16384, 32767, 32768, 100000, 262143, 262144, 300001, 1_000_003, 2**24 + 5]


def _inv_freq(head_dim, theta=1e6):
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def _positions(kind, batch, seq, dtype=torch.int64):
    gen = torch.Generator().manual_seed(7)
    if kind == "random":
        pos = torch.randint(0, 4096, (batch, seq), generator=gen)
    elif kind == "packed":  # two sequences packed in each row: positions restart inside the row
        cut = seq // 2 + 1
        pos = torch.cat([torch.arange(cut), torch.arange(seq - cut)]).expand(batch, seq)
    elif kind == "broadcast":  # [1, S]: shared by the whole batch
        pos = torch.arange(seq)[None] + 100
    elif kind == "far":  # past 2^18, across the temperature's buckets, past 2^24
        pos = torch.tensor(FAR_POSITIONS).repeat(batch * seq)[: batch * seq].view(batch, seq)
    else:
        raise ValueError(kind)
    return pos.to(DEVICE, dtype)


@dataclass
class RopeCase:
    batch: int
    seq: int
    q_heads: int
    kv_heads: int
    head_dim: int
    positions: str = "random"
    llama4: tuple = None
    attention_scaling: float = 1.0
    pos_dtype: torch.dtype = field(default=torch.int64)

    def inputs(self, dtype, seed=0):
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(self.batch, self.seq, self.q_heads, self.head_dim, generator=gen).to(DEVICE, dtype)
        k = torch.randn(self.batch, self.seq, self.kv_heads, self.head_dim, generator=gen).to(DEVICE, dtype)
        pos = _positions(self.positions, self.batch, self.seq, self.pos_dtype)
        return q, k, pos, _inv_freq(self.head_dim).to(DEVICE)

    def kwargs(self):
        return dict(attention_scaling=self.attention_scaling, llama4_scaling=self.llama4)


ROPE_CASES = {
    "gqa-6-2": RopeCase(2, 5, 6, 2, 64),
    "decode-s1": RopeCase(3, 1, 4, 4, 128, positions="far", llama4=LLAMA4),
    "packed-s37": RopeCase(1, 37, 2, 1, 16, positions="packed"),
    "broadcast-d80": RopeCase(2, 7, 4, 2, 80, positions="broadcast", attention_scaling=1.2772589),
    "far-temperature-int32": RopeCase(2, 6, 4, 2, 32, positions="far", llama4=LLAMA4, pos_dtype=torch.int32),
    "d96": RopeCase(1, 3, 3, 1, 96),
    "d256": RopeCase(1, 2, 2, 1, 256, positions="far", llama4=LLAMA4),
}


def _run(fn, inputs, seed=1):
    """Forward and the gradients of a fixed random projection of the outputs w.r.t. ``inputs``."""
    leaves = [strided_leaf(t) for t in inputs]
    outs = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen).to(o.device, torch.float64)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], [t.grad for t in leaves]


def _rope_fn(case, pos, inv_freq, backend=None, impl=None):
    impl = impl or (lambda q, k, p, f, **kw: rope(q, k, p, f, backend=backend, **kw))
    return lambda q, k: impl(q, k, pos, inv_freq, **case.kwargs())


def _reference_rope_fn(case, pos, inv_freq):
    return _rope_fn(case, pos, inv_freq, impl=lambda q, k, p, f, **kw: reference.rope(q, k, p, f, **kw))


def _truth_rope_fn(case, pos, inv_freq):
    """reference.rope in float64: the float32 angle and cos/sin as transformers, exact arithmetic after."""
    reference_fn = _reference_rope_fn(case, pos, inv_freq)
    return lambda q, k: reference_fn(q.double(), k.double())


# --- reference.py against transformers -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_rope_matches_ministral3_attention(dtype):
    """rotary module cos/sin -> apply_rotary_pos_emb on [B, H, S, D] -> query temperature."""
    case = RopeCase(2, 6, 4, 2, 32, positions="far", llama4=LLAMA4, attention_scaling=1.1)
    q, k, pos, inv_freq = case.inputs(dtype)
    freqs = pos[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = (emb.cos() * 1.1).to(dtype), (emb.sin() * 1.1).to(dtype)
    hf_q, hf_k = modeling_ministral3.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    hf_q = hf_q * modeling_ministral3.get_llama_4_attn_scale(pos, *LLAMA4).to(dtype)
    ref_q, ref_k = reference.rope(q, k, pos, inv_freq, 1.1, LLAMA4)
    assert torch.equal(ref_q, hf_q.transpose(1, 2)) and torch.equal(ref_k, hf_k.transpose(1, 2))
    # and the gradients w.r.t. q and k
    gen = torch.Generator().manual_seed(4)
    dq, dk = (torch.randn(t.shape, generator=gen).to(t.device, dtype) for t in (q, k))
    grads = []
    for fn in (lambda q_, k_: reference.rope(q_, k_, pos, inv_freq, 1.1, LLAMA4),
               lambda q_, k_: _ministral3_rope(q_, k_, pos, cos, sin, dtype)):
        leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
        outs = fn(*leaves)
        grads.append(torch.autograd.grad(outs, leaves, (dq, dk)))
    for ours, hf in zip(*grads):
        assert torch.equal(ours, hf)


def _ministral3_rope(q, k, pos, cos, sin, dtype):
    """transformers' Ministral 3 attention's rope and query temperature on [B, S, H, D] tensors."""
    hf_q, hf_k = modeling_ministral3.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    hf_q = hf_q * modeling_ministral3.get_llama_4_attn_scale(pos, *LLAMA4).to(dtype)
    return hf_q.transpose(1, 2), hf_k.transpose(1, 2)


def test_temperature_values_from_the_field_notes():
    pos = torch.tensor([[0, 16383, 16384, 32767, 32768, 100000, 262143]])
    scale = reference.llama4_query_scale(pos, *LLAMA4)[0]
    expected = [1.0, 1.0, 1.069315, 1.069315, 1.109861, 1.194591, 1.277259]
    torch.testing.assert_close(scale, torch.tensor(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_reference_apply_rotary_matches_transformers(unsqueeze_dim):
    gen = torch.Generator().manual_seed(0)
    shape = (2, 3, 5, 16) if unsqueeze_dim == 1 else (2, 5, 3, 16)
    q, k = (torch.randn(shape, generator=gen).bfloat16() for _ in range(2))
    cos, sin = (t.bfloat16() for t in reference.rope_cos_sin(_positions("random", 2, 5).cpu(), _inv_freq(16)))
    ours = reference.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    theirs = hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


# --- rope: every backend against the reference -------------------------------------------------


@pytest.mark.parametrize("case_id", list(ROPE_CASES))
def test_rope_fp32_matches_reference(kernel_backend, case_id):
    case = ROPE_CASES[case_id]
    q, k, pos, inv_freq = case.inputs(torch.float32)
    outs, grads = _run(_rope_fn(case, pos, inv_freq, kernel_backend), [q, k])
    ref_outs, ref_grads = _run(_reference_rope_fn(case, pos, inv_freq), [q, k])
    for ours, ref in zip(outs + grads, ref_outs + ref_grads):
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        assert_close_fp32(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case_id", ["gqa-6-2", "far-temperature-int32", "broadcast-d80"])
def test_rope_low_precision_vs_float64_truth(kernel_backend, dtype, case_id):
    case = ROPE_CASES[case_id]
    q, k, pos, inv_freq = case.inputs(dtype)
    outs, grads = _run(_rope_fn(case, pos, inv_freq, kernel_backend), [q, k])
    hf_outs, hf_grads = _run(_reference_rope_fn(case, pos, inv_freq), [q, k])
    truth_outs, truth_grads = _run(_truth_rope_fn(case, pos, inv_freq), [q, k])
    for ours, hf, truth in zip(outs + grads, hf_outs + hf_grads, truth_outs + truth_grads):
        assert_low_precision_ok(ours, hf, truth)


def _strided_qk():
    """(id, q, k) in [B, S, H, D] order, none of them contiguous; q and k reach the op with
    their strides, except every-other-element's (copied: no unit stride on D)."""
    gen = torch.Generator().manual_seed(3)
    b, s, hq, hkv, d = 2, 5, 4, 2, 32
    yield "from-[B,H,S,D]", *(torch.randn(b, h, s, d, generator=gen).transpose(1, 2) for h in (hq, hkv))
    qkv = torch.randn(b, s, (hq + 2 * hkv) * d, generator=gen)  # a fused qkv projection's output
    yield "qkv-slices", qkv[..., : hq * d].view(b, s, hq, d), qkv[..., hq * d: (hq + hkv) * d].view(b, s, hkv, d)
    yield "every-other-element", *(torch.randn(b, s, h, 2 * d, generator=gen)[..., ::2] for h in (hq, hkv))


@pytest.mark.parametrize("case", list(_strided_qk()), ids=lambda c: c[0])
def test_rope_strided_inputs(kernel_backend, case, monkeypatch):
    case_id, q, k = case
    q, k = q.to(DEVICE), k.to(DEVICE)
    q_before, k_before = q.clone(), k.clone()
    rope_case = RopeCase(*q.shape[:3], k.shape[2], q.shape[3], llama4=LLAMA4, positions="far")
    pos, inv_freq = _positions("far", *q.shape[:2]), _inv_freq(q.shape[3]).to(DEVICE)
    seen = spy_on_op_calls(monkeypatch, "thinkfuse.ops.rope")
    outs, grads = _run(_rope_fn(rope_case, pos, inv_freq, kernel_backend), [q, k])
    copied = case_id == "every-other-element"
    assert seen["rope_fwd"][:2] == [t.contiguous().stride() if copied else t.stride() for t in (q, k)]
    ref_outs, ref_grads = _run(_reference_rope_fn(rope_case, pos, inv_freq), [q, k])
    assert torch.equal(q, q_before) and torch.equal(k, k_before), "rope wrote into its inputs"
    for ours, ref in zip(outs + grads, ref_outs + ref_grads):
        assert_close_fp32(ours, ref)


@pytest.mark.parametrize("api", ["rope", "apply_rotary"])
def test_row_strided_output_gradients(kernel_backend, api, monkeypatch):
    """dq/dk read with their strides: e.g. q and k consumed through a torch.cat, whose backward
    hands on slices of its gradient."""
    q, k, cos, sin = _apply_rotary_inputs(2, torch.float32)
    pos, inv_freq = _positions("far", *q.shape[:2]), _inv_freq(q.shape[3]).to(DEVICE)
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(*t.shape[:3], 2 * t.shape[3], generator=gen).to(DEVICE)[..., : t.shape[3]] for t in (q, k)]
    fns = {"rope": (lambda q_, k_: rope(q_, k_, pos, inv_freq, llama4_scaling=LLAMA4, backend=kernel_backend),
                    lambda q_, k_: reference.rope(q_, k_, pos, inv_freq, 1.0, LLAMA4)),
           "apply_rotary": (lambda q_, k_: apply_rotary_pos_emb(q_, k_, cos, sin, 2, backend=kernel_backend),
                            lambda q_, k_: reference.apply_rotary_pos_emb(q_, k_, cos, sin, 2))}[api]
    seen = spy_on_op_calls(monkeypatch, "thinkfuse.ops.rope")
    results = []
    for fn in fns:
        leaves = [strided_leaf(q), strided_leaf(k)]
        results.append(torch.autograd.grad(fn(*leaves), leaves, grads))
    assert seen[f"{api}_bwd"][:2] == [g.stride() for g in grads]
    for ours, ref in zip(*results):
        assert_close_fp32(ours, ref)


def test_strided_position_ids_and_cos_sin_of_different_strides(kernel_backend):
    """position_ids are read with both their strides (here a [S, B] tensor transposed: the token
    stride is B), and cos and sin each with their own (sin a slice of a wider buffer)."""
    case = ROPE_CASES["gqa-6-2"]
    q, k, pos, inv_freq = case.inputs(torch.float32)
    pos_t = pos.t().contiguous().t()
    assert pos_t.stride(1) != 1 and torch.equal(pos_t, pos)
    ours = rope(q, k, pos_t, inv_freq, backend=kernel_backend)
    for got, ref in zip(ours, reference.rope(q, k, pos, inv_freq, 1.0, None)):
        assert_close_fp32(got, ref)

    q, k, cos, sin = _apply_rotary_inputs(2, torch.float32, random_cos_sin=True)
    wide = torch.zeros(*sin.shape[:2], 3 * sin.shape[2], device=DEVICE)
    wide[..., : sin.shape[2]] = sin
    sin_sliced = wide[..., : sin.shape[2]]
    assert sin_sliced.stride() != cos.stride()
    ours = apply_rotary_pos_emb(q, k, cos, sin_sliced, 2, backend=kernel_backend)
    for got, ref in zip(ours, reference.apply_rotary_pos_emb(q, k, cos, sin, 2)):
        assert_close_fp32(got, ref)


def test_rope_position_dtypes_and_lower_precision_inv_freq_agree(backend):
    """int32 and int64 positions give the same result; a bfloat16 inv_freq is used as
    transformers uses its buffer after model.to(bfloat16): converted to float32."""
    case = ROPE_CASES["gqa-6-2"]
    q, k, pos, inv_freq = case.inputs(torch.float32)
    expected = rope(q, k, pos, inv_freq.bfloat16().float(), backend=backend)
    for got in (rope(q, k, pos.int(), inv_freq.bfloat16(), backend=backend),
                rope(q, k, pos, inv_freq.bfloat16(), backend=backend)):
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_rope_gradient_through_q_only(backend):
    q, k, pos, inv_freq = ROPE_CASES["gqa-6-2"].inputs(torch.float32)
    q.requires_grad_(), k.requires_grad_()
    q_out, _ = rope(q, k, pos, inv_freq, backend=backend)
    q_out.sum().backward()
    assert q.grad is not None and torch.count_nonzero(q.grad) > 0
    assert k.grad is None or torch.count_nonzero(k.grad) == 0


def test_rope_empty_batch(backend):
    q, k = torch.empty(0, 3, 2, 8, device=DEVICE), torch.empty(0, 3, 1, 8, device=DEVICE)
    q_out, k_out = rope(q, k, torch.empty(0, 3, dtype=torch.int64, device=DEVICE), _inv_freq(8).to(DEVICE),
                        backend=backend)
    assert q_out.shape == q.shape and k_out.shape == k.shape


# --- apply_rotary_pos_emb: every backend against the reference -----------------------------------


def _apply_rotary_inputs(unsqueeze_dim, dtype, cos_dtype=None, cos_batch=2, random_cos_sin=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, s, hq, hkv, d = 2, 5, 6, 2, 48
    q, k = (torch.randn(b, s, h, d, generator=gen).to(DEVICE, dtype) for h in (hq, hkv))
    if unsqueeze_dim == 1:  # transformers' layout: [B, H, S, D] views of the projections
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    if random_cos_sin:  # halves that differ: not from a rotary module, but accepted all the same
        cos, sin = (torch.randn(cos_batch, s, d, generator=gen).to(DEVICE) for _ in range(2))
    else:
        cos, sin = reference.rope_cos_sin(_positions("packed", cos_batch, s), _inv_freq(d).to(DEVICE), 1.1)
    return q, k, cos.to(cos_dtype or dtype), sin.to(cos_dtype or dtype)


def _apply_rotary_fn(backend, unsqueeze_dim):
    return lambda *args: apply_rotary_pos_emb(*args, unsqueeze_dim, backend=backend)


def _reference_apply_rotary_fn(unsqueeze_dim):
    return lambda *args: reference.apply_rotary_pos_emb(*args, unsqueeze_dim)


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("cos_batch,random_cos_sin", [(2, False), (1, False), (2, True)],
                         ids=["cos-[B,S,D]", "cos-[1,S,D]", "random-cos-sin"])
def test_apply_rotary_fp32_matches_reference_with_cos_sin_grads(kernel_backend, unsqueeze_dim, cos_batch, random_cos_sin):
    inputs = _apply_rotary_inputs(unsqueeze_dim, torch.float32, cos_batch=cos_batch, random_cos_sin=random_cos_sin)
    outs, grads = _run(_apply_rotary_fn(kernel_backend, unsqueeze_dim), inputs)
    ref_outs, ref_grads = _run(_reference_apply_rotary_fn(unsqueeze_dim), inputs)
    for ours, ref in zip(outs, ref_outs):
        assert ours.shape == ref.shape
        assert_close_fp32(ours, ref)
    for ours, ref in zip(grads, ref_grads):
        assert_close_fp32(ours, ref, tol=1e-4)  # dcos/dsin are sums over heads


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_apply_rotary_low_precision_vs_float64_truth(kernel_backend, dtype, unsqueeze_dim):
    q, k, cos, sin = _apply_rotary_inputs(unsqueeze_dim, dtype)
    fn = _apply_rotary_fn(kernel_backend, unsqueeze_dim)
    ref_fn = _reference_apply_rotary_fn(unsqueeze_dim)
    outs, grads = _run(lambda q_, k_: fn(q_, k_, cos, sin), [q, k])
    hf_outs, hf_grads = _run(lambda q_, k_: ref_fn(q_, k_, cos, sin), [q, k])
    truth_outs, truth_grads = _run(lambda q_, k_: ref_fn(q_.double(), k_.double(), cos.double(), sin.double()), [q, k])
    for ours, hf, truth in zip(outs + grads, hf_outs + hf_grads, truth_outs + truth_grads):
        assert_low_precision_ok(ours, hf, truth)


@pytest.mark.parametrize("negative,positive", [(-3, 1), (-2, 2)])
def test_apply_rotary_takes_negative_unsqueeze_dims_like_transformers(backend, negative, positive):
    """transformers unsqueezes the 3-D cos at unsqueeze_dim, so -3 is 1 and -2 is 2 there: a
    drop-in takes them too (they were refused)."""
    q, k, cos, sin = _apply_rotary_inputs(positive, torch.float32)
    ours = apply_rotary_pos_emb(q, k, cos, sin, negative, backend=backend)
    theirs = hf_apply_rotary_pos_emb(q, k, cos, sin, negative)
    for o, t in zip(ours, theirs):
        assert o.shape == t.shape
        assert_close_fp32(o, t)


def test_apply_rotary_promotes_like_transformers(kernel_backend):
    """bfloat16 q/k with float32 cos/sin: transformers' products promote to float32."""
    q, k, cos, sin = _apply_rotary_inputs(1, torch.bfloat16, cos_dtype=torch.float32)
    outs, grads = _run(lambda q_, k_: apply_rotary_pos_emb(q_, k_, cos, sin, backend=kernel_backend), [q, k])
    ref_outs, ref_grads = _run(lambda q_, k_: reference.apply_rotary_pos_emb(q_, k_, cos, sin), [q, k])
    assert [o.dtype for o in outs] == [torch.float32] * 2 and [g.dtype for g in grads] == [torch.bfloat16] * 2
    for ours, ref in zip(outs, ref_outs):
        assert_close_fp32(ours, ref)
    for ours, ref in zip(grads, ref_grads):
        torch.testing.assert_close(ours, ref, rtol=2**-7, atol=1e-2)


# --- bad inputs ----------------------------------------------------------------------------------


def _rope_args(**overrides):
    args = dict(q=torch.ones(2, 3, 4, 8), k=torch.ones(2, 3, 2, 8), position_ids=torch.zeros(2, 3, dtype=torch.long),
                inv_freq=torch.ones(4), attention_scaling=1.0, llama4_scaling=None)
    args.update(overrides)
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v)
            for k, v in args.items()}


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
        (dict(q=torch.ones(2, 3, 4, 8, dtype=torch.int32)), TypeError, "q must have dtype"),
        (dict(q=torch.ones(2, 3, 32)), ValueError, "q must be 4-D"),
        (dict(k=torch.ones(2, 3, 2, 8, dtype=torch.float16)), TypeError, "k dtype"),
        (dict(k=torch.ones(2, 3, 2, 6)), ValueError, "same head_dim"),
        (dict(k=torch.ones(1, 3, 2, 8)), ValueError, "same batch size"),
        (dict(k=torch.ones(2, 4, 2, 8)), ValueError, "same sequence length"),
        (dict(q=torch.ones(2, 3, 4, 7), k=torch.ones(2, 3, 2, 7), inv_freq=torch.ones(3)), ValueError, "must be even"),
        (dict(position_ids=torch.zeros(2, 3)), TypeError, "position_ids must have dtype"),
        (dict(position_ids=torch.zeros(3, 3, dtype=torch.long)), ValueError, "position_ids must have shape"),
        (dict(position_ids=torch.zeros(2, 4, dtype=torch.long)), ValueError, "position_ids must have shape"),
        (dict(position_ids=torch.zeros(6, dtype=torch.long)), ValueError, "position_ids must be 2-D"),
        (dict(inv_freq=torch.ones(8)), ValueError, "inv_freq must have head_dim / 2 = 4"),
        (dict(inv_freq=torch.ones(4, dtype=torch.int64)), TypeError, "inv_freq must have dtype"),
        (dict(inv_freq=torch.ones(4, device="meta")), ValueError, "inv_freq is on meta"),
        (dict(attention_scaling="1"), TypeError, "attention_scaling must be a float"),
        (dict(llama4_scaling=0.1), TypeError, "llama4_scaling must be None or a"),
        (dict(llama4_scaling=(0.1, 16384, 1)), TypeError, "llama4_scaling must be None or a"),
        (dict(llama4_scaling=(0.1, 16384.0)), TypeError, "original_max_position must be an int"),
        (dict(llama4_scaling=(0.1, 0)), ValueError, "original_max_position must be > 0"),
        (dict(llama4_scaling=(float("nan"), 16384)), ValueError, "beta must be finite"),
    ],
)
def test_rope_bad_inputs_raise_before_any_kernel(backend, overrides, error, match):
    args = _rope_args(**overrides)
    with pytest.raises(error, match=match):
        rope(args["q"], args["k"], args["position_ids"], args["inv_freq"], attention_scaling=args["attention_scaling"],
             llama4_scaling=args["llama4_scaling"], backend=backend)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(unsqueeze_dim=3), ValueError, "unsqueeze_dim must be 1"),
        # transformers 4.x's signature had position_ids fifth: passed positionally, it lands here
        (dict(unsqueeze_dim=torch.zeros(2, 3, dtype=torch.long)), TypeError, "unsqueeze_dim must be an int"),
        (dict(unsqueeze_dim=True), TypeError, "unsqueeze_dim must be an int"),
        (dict(unsqueeze_dim=1.0), TypeError, "unsqueeze_dim must be an int"),
        (dict(cos=torch.ones(2, 3, 8).numpy()), TypeError, "cos must be a torch.Tensor"),
        (dict(cos=torch.ones(2, 3, 6)), ValueError, "cos must have shape"),
        (dict(cos=torch.ones(3, 3, 8)), ValueError, "cos must have shape"),
        (dict(cos=torch.ones(3, 8)), ValueError, "cos must be 3-D"),
        (dict(sin=torch.ones(1, 3, 8)), ValueError, "sin shape"),
        (dict(sin=torch.ones(2, 3, 8, dtype=torch.float16)), TypeError, "sin dtype"),
        (dict(k=torch.ones(2, 2, 4, 8)), ValueError, "same sequence length.*layout \\[B, H, S, D\\]"),
        (dict(k=torch.ones(2, 2, 3, 5)), ValueError, "same head_dim"),
        (dict(sin=torch.ones(2, 3, 8, device="meta")), ValueError, "sin is on meta"),
    ],
)
def test_apply_rotary_bad_inputs_raise_before_any_kernel(backend, overrides, error, match):
    args = dict(q=torch.ones(2, 4, 3, 8), k=torch.ones(2, 2, 3, 8), cos=torch.ones(2, 3, 8), sin=torch.ones(2, 3, 8),
                unsqueeze_dim=1)
    args.update(overrides)
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v)
            for k, v in args.items()}
    with pytest.raises(error, match=match):
        apply_rotary_pos_emb(args["q"], args["k"], args["cos"], args["sin"], args["unsqueeze_dim"], backend=backend)


# --- torch.library registration and torch.compile ----------------------------------------------


@pytest.mark.parametrize("llama4", [(0.0, 1), (0.1, 8)], ids=["plain", "temperature"])
def test_rope_custom_ops_pass_opcheck(backend, llama4):
    q, k, _, inv_freq = RopeCase(2, 3, 2, 1, 8).inputs(torch.float32)
    pos = torch.tensor([[0, 7, 9], [30, 31, 100]], device=DEVICE)
    scalars = (1.1, *llama4, backend)
    torch.library.opcheck(torch.ops.thinkfuse.rope_fwd.default,
                          (q.requires_grad_(), k.requires_grad_(), pos, inv_freq, *scalars))
    torch.library.opcheck(torch.ops.thinkfuse.rope_bwd.default, (q.detach(), k.detach(), pos, inv_freq, *scalars))


def test_apply_rotary_custom_ops_pass_opcheck(backend):
    q, k, cos, sin = _apply_rotary_inputs(2, torch.bfloat16, cos_dtype=torch.float32)
    q, k = q[:, :2, :3, :8].contiguous(), k[:, :2, :, :8].contiguous()
    cos, sin = cos[:, :2, :8].contiguous(), sin[:, :2, :8].contiguous()
    torch.library.opcheck(torch.ops.thinkfuse.apply_rotary_fwd.default,
                          (q.requires_grad_(), k.requires_grad_(), cos.requires_grad_(), sin, backend))
    dq_out, dk_out = q.detach().float(), k.detach().float()  # gradients of the promoted outputs
    torch.library.opcheck(torch.ops.thinkfuse.apply_rotary_bwd.default,
                          (dq_out, dk_out, cos.detach(), sin, torch.bfloat16, torch.bfloat16, backend))


def test_custom_ops_torch_forms_match_the_kernels(kernel_backend):
    """The "torch" value of the custom ops' backend argument is an explicit form of the kernels."""
    q, k, cos, sin = _apply_rotary_inputs(2, torch.float32, random_cos_sin=True)
    pos, inv_freq = _positions("far", *q.shape[:2]), _inv_freq(q.shape[3]).to(DEVICE)
    calls = [
        (torch.ops.thinkfuse.rope_fwd, (q, k, pos, inv_freq, 1.1, *LLAMA4)),
        (torch.ops.thinkfuse.rope_bwd, (q, k, pos, inv_freq, 1.1, *LLAMA4)),
        (torch.ops.thinkfuse.apply_rotary_fwd, (q, k, cos, sin)),
        (torch.ops.thinkfuse.apply_rotary_bwd, (q, k, cos, sin, torch.float32, torch.float32)),
    ]
    for op, args in calls:
        for ours, ref in zip(op(*args, kernel_backend), op(*args, "torch")):
            assert_close_fp32(ours, ref)


def _compiled_matches_eager(fn, *inputs):
    eager = fn(*inputs)
    eager_grads = torch.autograd.grad(eager, [t for t in inputs if t.requires_grad])
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(*inputs)
    compiled_grads = torch.autograd.grad(compiled, [t for t in inputs if t.requires_grad])
    for ours, ref in zip((compiled, *compiled_grads), (eager, *eager_grads)):
        assert_close_fp32(ours, ref, tol=1e-4)


@pytest.mark.parametrize("kb", KERNEL_BACKENDS)
def test_torch_compile_rope_fullgraph(kb):
    torch._dynamo.reset()
    case = ROPE_CASES["far-temperature-int32"]
    q, k, pos, inv_freq = case.inputs(torch.float32)

    def attention_input(q, k):
        q_rot, k_rot = rope(q * 2, k, pos, inv_freq, attention_scaling=1.1, llama4_scaling=LLAMA4)
        return q_rot.square().sum() + k_rot.sum()

    with thinkfuse.use_backend(kb):
        _compiled_matches_eager(attention_input, q.requires_grad_(), k.requires_grad_())


@pytest.mark.parametrize("kb", KERNEL_BACKENDS)
def test_torch_compile_apply_rotary_fullgraph(kb):
    torch._dynamo.reset()
    q, k, cos, sin = _apply_rotary_inputs(1, torch.float32)

    def attention_input(q, k):
        q_rot, k_rot = apply_rotary_pos_emb(q, k * 3, cos, sin)
        return q_rot.square().sum() + (k_rot * math.pi).sum()

    with thinkfuse.use_backend(kb):
        _compiled_matches_eager(attention_input, q.requires_grad_(), k.requires_grad_())
