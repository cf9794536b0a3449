"""CUDA-backend checks of rope, apply_rotary_pos_emb and swiglu that need a GPU: model-sized
shapes (GQA 32/8, head_dim 64/128, intermediate sizes of the target models), far positions with
the Ministral 3 query temperature, strided and broadcast inputs, every float dtype, forward and
backward against reference.py (a float64 truth for float16/bfloat16) and against the triton
backend, offsets past 2**31 and CUDA graph capture (no host synchronisation)."""

import pytest
import torch
from conftest import KERNEL_BACKENDS
from tolerances import ULP, assert_close_fp32, assert_low_precision_ok

from thinkfuse import reference
from thinkfuse.ops import apply_rotary_pos_emb, rope, swiglu, swiglu_fused

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("cuda" not in KERNEL_BACKENDS, reason="cuda backend not built"),
]

HAS_TRITON = "triton" in KERNEL_BACKENDS
LLAMA4 = (0.1, 16384)  # Ministral 3's (llama_4_scaling_beta, original_max_position_embeddings)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Positions that matter: 0, the temperature's bucket edges, far contexts, past 2**24 (rounds).
EDGE_POSITIONS = [0, 16383, 16384, 32767, 32768, 100000, 262143, 262144, 299999, 300000, 2**24 + 5]


def _gen(seed=0):
    return torch.Generator(device="cuda").manual_seed(seed)


def _inv_freq(head_dim, theta=1e6):
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cuda") / head_dim))


def _positions(rows, seq, dtype=torch.int64, seed=0):
    """[rows, seq] positions up to 300000, the first ones the edge positions."""
    pos = torch.randint(0, 300001, (rows, seq), device="cuda", generator=_gen(seed))
    edges = torch.tensor(EDGE_POSITIONS, device="cuda")[:seq]
    pos[:, : edges.numel()] = edges
    return pos.to(dtype)


def _qk(batch, seq, q_heads, kv_heads, head_dim, dtype, layout, seed=0):
    """q, k as [B, S, H, D]: contiguous, or transposed views of [B, H, S, D] tensors."""
    gen = _gen(seed)
    if layout == "bshd":
        shapes = [(batch, seq, h, head_dim) for h in (q_heads, kv_heads)]
        return [torch.randn(s, device="cuda", generator=gen).to(dtype) for s in shapes]
    shapes = [(batch, h, seq, head_dim) for h in (q_heads, kv_heads)]
    return [torch.randn(s, device="cuda", generator=gen).to(dtype).transpose(1, 2) for s in shapes]


def _run(fn, inputs, seed=1):
    """Outputs and the gradients of a fixed random projection of them w.r.t. ``inputs``."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    gen = _gen(seed)
    loss = sum((o.double() * torch.randn(o.shape, device="cuda", generator=gen, dtype=torch.float64)).sum()
               for o in outs)
    loss.backward()
    return [o.detach() for o in outs] + [t.grad for t in leaves]


def _check_vs_reference(ours, reference_low, truth):
    """float32: elementwise 1e-5; float16/bfloat16: no worse than 2x the reference's own error."""
    for o, r, t in zip(ours, reference_low, truth):
        assert o.dtype == r.dtype and o.shape == r.shape, (o.dtype, r.dtype, o.shape, r.shape)
        if o.dtype == torch.float32:
            assert_close_fp32(o, r)
        else:
            assert_low_precision_ok(o, r, t)


def _assert_within_one_ulp(ours, theirs):
    """Two kernels with the same float32 math: at most one unit in the last place apart."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    ulp = ULP[ours.dtype] if ours.dtype != torch.float32 else 1e-5
    scale = max(theirs.double().abs().max().item(), 1.0)
    err = (ours.double() - theirs.double()).abs().max().item()
    assert err <= ulp * scale, f"max difference {err:.3e} > {ulp:.1e} x {scale:.3e}"


# --- rope ----------------------------------------------------------------------------------------


def _rope_fn(pos, inv_freq, llama4, backend):
    return lambda q, k: rope(q, k, pos, inv_freq, attention_scaling=1.2772589, llama4_scaling=llama4,
                             backend=backend)


def _reference_rope_fn(pos, inv_freq, llama4):
    return lambda q, k: reference.rope(q, k, pos, inv_freq, 1.2772589, llama4)


def _doubles(*tensors):
    """float64 copies (same strides do not matter): the leaves of the truth runs, so that the
    truth's gradients are not rounded back to the low dtype."""
    return [t.double() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("llama4", [None, LLAMA4], ids=["plain", "temperature"])
@pytest.mark.parametrize("layout", ["bshd", "from-bhsd"])
@pytest.mark.parametrize("pos_rows", ["batch", "broadcast"])
def test_rope_gqa_32_8_vs_reference(dtype, head_dim, llama4, layout, pos_rows):
    batch, seq = 2, 300
    q, k = _qk(batch, seq, 32, 8, head_dim, dtype, layout)
    pos = _positions(batch if pos_rows == "batch" else 1, seq)
    inv_freq = _inv_freq(head_dim)
    ours = _run(_rope_fn(pos, inv_freq, llama4, "cuda"), [q, k])
    hf = _run(_reference_rope_fn(pos, inv_freq, llama4), [q, k])
    truth = _run(_reference_rope_fn(pos, inv_freq, llama4), _doubles(q, k))
    _check_vs_reference(ours, hf, truth)


@pytest.mark.skipif(not HAS_TRITON, reason="triton backend unavailable")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("llama4", [None, LLAMA4], ids=["plain", "temperature"])
def test_rope_cuda_matches_triton(dtype, head_dim, llama4):
    q, k = _qk(3, 257, 32, 8, head_dim, dtype, "from-bhsd")
    pos, inv_freq = _positions(1, 257, torch.int32), _inv_freq(head_dim)
    ours = _run(_rope_fn(pos, inv_freq, llama4, "cuda"), [q, k])
    theirs = _run(_rope_fn(pos, inv_freq, llama4, "triton"), [q, k])
    for o, t in zip(ours, theirs):
        _assert_within_one_ulp(o, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_decode_and_odd_shapes(dtype):
    """One token per sequence, head_dim not a multiple of the vector width, one kv head."""
    for batch, seq, hq, hkv, d in [(64, 1, 32, 8, 128), (3, 5, 7, 1, 80), (2, 9, 4, 2, 10), (1, 3, 2, 1, 2304)]:
        q, k = _qk(batch, seq, hq, hkv, d, dtype, "bshd", seed=d)
        pos, inv_freq = _positions(batch, seq, seed=d), _inv_freq(d)
        ours = _run(_rope_fn(pos, inv_freq, LLAMA4, "cuda"), [q, k])
        hf = _run(_reference_rope_fn(pos, inv_freq, LLAMA4), [q, k])
        truth = _run(_reference_rope_fn(pos, inv_freq, LLAMA4), _doubles(q, k))
        _check_vs_reference(ours, hf, truth)


def test_rope_int32_and_int64_positions_agree_exactly():
    q, k = _qk(2, 64, 32, 8, 128, torch.bfloat16, "bshd")
    pos, inv_freq = _positions(2, 64), _inv_freq(128)
    a = rope(q, k, pos, inv_freq, llama4_scaling=LLAMA4, backend="cuda")
    b = rope(q, k, pos.int(), inv_freq, llama4_scaling=LLAMA4, backend="cuda")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_rope_offsets_beyond_int32():
    """q of more than 2**31 elements: the last tokens' offsets do not fit in int32."""
    hq, d = 32, 128
    seq = 2**31 // (hq * d) + 8
    q = torch.ones(1, seq, hq, d, device="cuda", dtype=torch.bfloat16)
    q[:, -8:] = torch.randn(1, 8, hq, d, device="cuda").bfloat16()
    k = torch.randn(1, seq, 1, d, device="cuda").bfloat16()
    pos = torch.arange(seq, device="cuda")[None]
    inv_freq = _inv_freq(d)
    q_out, k_out = rope(q, k, pos, inv_freq, llama4_scaling=LLAMA4, backend="cuda")
    # Angles as HF forms them (float32 position x inv_freq: at positions near 2**19 that product
    # is only good to ~0.03 rad, and the kernel reproduces it), the rest in float64: reference.py's
    # bfloat16 arithmetic (three roundings, cancellation) is further from it than the kernel.
    last = pos[:, -8:]
    ref_q = _rope_float64(q[:, -8:], last, inv_freq) * reference.llama4_query_scale(last.double(), *LLAMA4)[
        :, :, None, None]
    ref_k = _rope_float64(k[:, -8:], last, inv_freq)
    torch.testing.assert_close(q_out[:, -8:].double(), ref_q, rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(k_out[:, -8:].double(), ref_k, rtol=2**-7, atol=1e-2)
    del q, q_out


def _rope_float64(x, position_ids, inv_freq):
    """RoPE of x [B, S, H, D] (rotate-half convention): HF's float32 angles, float64 arithmetic."""
    freqs = (position_ids[..., None].float() * inv_freq.float()).double()
    angles = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    x = x.double()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * angles.cos() + rotated * angles.sin()


# --- apply_rotary_pos_emb ------------------------------------------------------------------------


def _cos_sin(batch_rows, seq, head_dim, dtype):
    cos, sin = reference.rope_cos_sin(_positions(batch_rows, seq, seed=5), _inv_freq(head_dim), 1.1)
    return cos.to(dtype), sin.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cos_rows", ["batch", "broadcast"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_apply_rotary_transformers_layout_vs_reference(dtype, cos_rows, head_dim):
    """q/k [B, H, S, D] (unsqueeze_dim=1) contiguous, so the kernel sees strided [B, S, H, D]
    views; cos/sin in q's dtype."""
    batch, seq = 2, 300
    q, k = (t.transpose(1, 2).contiguous() for t in _qk(batch, seq, 32, 8, head_dim, dtype, "bshd"))
    cos, sin = _cos_sin(batch if cos_rows == "batch" else 1, seq, head_dim, dtype)
    ours = _run(lambda q_, k_: apply_rotary_pos_emb(q_, k_, cos, sin, backend="cuda"), [q, k])
    hf = _run(lambda q_, k_: reference.apply_rotary_pos_emb(q_, k_, cos, sin), [q, k])
    truth = _run(lambda q_, k_: reference.apply_rotary_pos_emb(q_, k_, cos.double(), sin.double()), _doubles(q, k))
    _check_vs_reference(ours, hf, truth)


@pytest.mark.parametrize("dtype,cos_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                             (torch.float32, torch.bfloat16)], ids=str)
def test_apply_rotary_mixed_dtypes_promote(dtype, cos_dtype):
    batch, seq, d = 2, 64, 128
    q, k = _qk(batch, seq, 32, 8, d, dtype, "bshd")
    cos, sin = _cos_sin(batch, seq, d, cos_dtype)
    out_dtype = torch.promote_types(dtype, cos_dtype)
    ours = _run(lambda q_, k_: apply_rotary_pos_emb(q_, k_, cos, sin, 2, backend="cuda"), [q, k])
    ref = _run(lambda q_, k_: reference.apply_rotary_pos_emb(q_, k_, cos, sin, 2), [q, k])
    assert [t.dtype for t in ours] == [out_dtype] * 2 + [dtype] * 2
    for o, r in zip(ours, ref):
        if o.dtype == torch.float32:
            assert_close_fp32(o, r)
        else:
            torch.testing.assert_close(o, r, rtol=ULP[o.dtype], atol=ULP[o.dtype] * 4)


@pytest.mark.skipif(not HAS_TRITON, reason="triton backend unavailable")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_rotary_cuda_matches_triton(dtype):
    q, k = _qk(2, 257, 32, 8, 128, dtype, "from-bhsd")
    cos, sin = _cos_sin(1, 257, 128, dtype)
    ours = _run(lambda q_, k_: apply_rotary_pos_emb(q_, k_, cos, sin, 2, backend="cuda"), [q, k])
    theirs = _run(lambda q_, k_: apply_rotary_pos_emb(q_, k_, cos, sin, 2, backend="triton"), [q, k])
    for o, t in zip(ours, theirs):
        _assert_within_one_ulp(o, t)


# --- swiglu --------------------------------------------------------------------------------------

# Intermediate sizes of the target models (Palmyra-mini, MiMo-7B, Ministral 3 3B/8B/14B,
# AM-Thinking-v1) and an odd one (scalar path).
MODEL_INTERMEDIATE = [8960, 11008, 9216, 14336, 16384, 27648, 4099]


def _gate_up(rows, size, dtype, seed=0):
    gen = _gen(seed)
    return [(3 * torch.randn(rows, size, device="cuda", generator=gen)).to(dtype) for _ in range(2)]


def _fused(backend):
    return lambda gate, up: swiglu_fused(torch.cat([gate, up], dim=-1), backend=backend)


def _split(backend):
    return lambda gate, up: swiglu(gate, up, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", MODEL_INTERMEDIATE)
@pytest.mark.parametrize("form", ["split", "fused"])
def test_swiglu_model_sizes_vs_reference(dtype, size, form):
    gate, up = _gate_up(512, size, dtype)
    fn = _split("cuda") if form == "split" else _fused("cuda")
    ours = _run(fn, [gate, up])
    hf = _run(reference.swiglu, [gate, up])
    truth = _run(reference.swiglu, _doubles(gate, up))
    _check_vs_reference(ours, hf, truth)


@pytest.mark.skipif(not HAS_TRITON, reason="triton backend unavailable")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["split", "fused"])
def test_swiglu_cuda_matches_triton(dtype, form):
    gate, up = _gate_up(1024, 11008, dtype)
    make = _split if form == "split" else _fused
    ours = _run(make("cuda"), [gate, up])
    theirs = _run(make("triton"), [gate, up])
    for o, t in zip(ours, theirs):
        _assert_within_one_ulp(o, t)


def test_swiglu_strided_rows_and_a_projection_output():
    """Rows padded apart (aligned and not) and a merged projection's output with leading dims."""
    for pad in (8, 3):
        base = 3 * torch.randn(64, 2 * 11008 + pad, device="cuda", generator=_gen(2)).bfloat16()
        gate, up = base[:, :11008], base[:, 11008: 2 * 11008]
        ours = _run(_split("cuda"), [gate, up])
        ref = _run(reference.swiglu, [gate, up])
        truth = _run(reference.swiglu, _doubles(gate, up))
        _check_vs_reference(ours, ref, truth)
        fused = swiglu_fused(base[:, : 2 * 11008], backend="cuda")
        torch.testing.assert_close(fused, reference.swiglu(gate, up), rtol=2**-7, atol=1e-2)
    gate_up = torch.randn(2, 33, 2 * 9216, device="cuda", generator=_gen(3)).bfloat16()
    torch.testing.assert_close(swiglu_fused(gate_up, backend="cuda"), reference.swiglu(*gate_up.chunk(2, -1)),
                               rtol=2**-7, atol=1e-2)


def test_swiglu_extreme_gates():
    """Saturated sigmoid both ways, infinities and NaN behave like torch's silu."""
    gate = torch.tensor([[-1e4, -100.0, -88.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 88.0, 100.0, 1e4, float("nan")]],
                        device="cuda")
    up = torch.ones_like(gate) * 1.5
    ours = swiglu(gate, up, backend="cuda")
    ref = reference.swiglu(gate, up)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-30, equal_nan=True)


def test_swiglu_offsets_beyond_int32():
    n = 4096
    rows = 2**31 // (2 * n) + 8  # gate_up's last rows start past element 2**31
    gate_up = torch.ones(rows, 2 * n, device="cuda", dtype=torch.bfloat16)
    gate_up[-8:] = torch.randn(8, 2 * n, device="cuda").bfloat16()
    y = swiglu_fused(gate_up, backend="cuda")
    torch.testing.assert_close(y[-8:], reference.swiglu(*gate_up[-8:].chunk(2, -1)), rtol=2**-7, atol=1e-2)
    del gate_up, y


# --- CUDA graphs ---------------------------------------------------------------------------------


def test_cuda_graph_capture_rope_apply_rotary_swiglu():
    """All three ops (forward and backward) capture and replay: no host synchronisation."""
    q, k = _qk(4, 128, 32, 8, 128, torch.bfloat16, "from-bhsd")
    q, k = q.contiguous(), k.contiguous()
    pos, inv_freq = _positions(4, 128), _inv_freq(128)
    cos, sin = _cos_sin(4, 128, 128, torch.bfloat16)
    gate_up = torch.randn(256, 2 * 11008, device="cuda").bfloat16()
    dy = torch.randn(256, 11008, device="cuda").bfloat16()

    def step():
        q_rot, k_rot = rope(q, k, pos, inv_freq, llama4_scaling=LLAMA4, backend="cuda")
        dq, dk = torch.ops.thinkfuse.rope_bwd(q_rot, k_rot, pos, inv_freq, 1.0, *LLAMA4, "cuda")
        q_app, k_app = apply_rotary_pos_emb(q, k, cos, sin, 2, backend="cuda")
        y = swiglu_fused(gate_up, backend="cuda")
        dgate_up = torch.ops.thinkfuse.swiglu_fused_bwd(dy, gate_up, "cuda")
        return q_rot, k_rot, dq, dk, q_app, k_app, y, dgate_up

    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up outside capture (lazy extension load, allocator)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for t in (q, k, gate_up):
        t.copy_(torch.randn_like(t))
    pos.copy_(_positions(4, 128, seed=9))
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    for got, want in zip(outs, expected):
        assert torch.equal(got, want)
    # The custom ops' explicit torch forms (float32 math, one rounding) for the new inputs.
    ops = torch.ops.thinkfuse
    q_rot, k_rot = ops.rope_fwd(q, k, pos, inv_freq, 1.0, *LLAMA4, "torch")
    dq, dk = ops.rope_bwd(outs[0], outs[1], pos, inv_freq, 1.0, *LLAMA4, "torch")
    q_app, k_app = ops.apply_rotary_fwd(q, k, cos, sin, "torch")
    y = ops.swiglu_fused_fwd(gate_up, "torch")
    dgate_up = ops.swiglu_fused_bwd(dy, gate_up, "torch")
    for got, want in zip(outs, (q_rot, k_rot, dq, dk, q_app, k_app, y, dgate_up)):
        _assert_within_one_ulp(got, want)
