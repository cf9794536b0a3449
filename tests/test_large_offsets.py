"""Element offsets past 2**31 in every Triton kernel, without 2**31-element allocations.

In Triton, ``tl.program_id`` and int arguments below 2**31 are int32, and a product of two int32
values (``row * stride``) wraps silently. The interpreter computes with numpy in the kernel's
dtypes, so it wraps as the GPU does; the one difference is a ``for`` loop's variable, which the
GPU types from the loop bounds (int64 when a bound is) and the interpreter leaves a Python int
(int32 once added to an ``arange``), so the kernels widen those explicitly.

Each CPU case gives a kernel small views whose strides are just above 2**30 (or 2**26 per key),
so that their last rows / heads / keys / positions sit past element 2**31 of a sparse buffer: a
21 GiB anonymous mapping with MAP_NORESERVE, of which only the pages the views touch become
memory (a few MiB; the module takes about 3 s). The views start at element 2**31 of the buffer,
so an offset that wraps lands 2**32 elements earlier, still inside the mapping (zeros: a wrong
result, never a crash), and the result differs from the reference on contiguous copies.

The gpu-marked tests at the end allocate real tensors of more than 2**31 elements (4 to 10 GiB
each) and run both kernel backends, the CUDA kernels included (the emulator cannot hold such
buffers).
"""

from __future__ import annotations

import mmap

import pytest
import torch
from conftest import HAS_CUDA, backends_with
from tolerances import assert_close_fp32, assert_low_precision_ok

from thinkfuse import reference

BASE = 2**31  # element offset of every view in the sparse buffer
BIG = 2**30 + 64  # a stride: index 2 of a dimension with it sits past element 2**31
KEY_STRIDE = 2**26 + 16  # a per-key stride: key 32 sits past element 2**31

needs_interpreter = pytest.mark.skipif(HAS_CUDA, reason="the sparse CPU buffer is for the interpreter")


@pytest.fixture(scope="module")
def sparse():
    """A float32 tensor of 5 * 2**30 + 2**28 elements (21 GiB of address space, pages made only
    where written). Skips where the system refuses such a mapping (strict overcommit)."""
    numel = 5 * 2**30 + 2**28
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    try:
        buf = mmap.mmap(-1, numel * 4, flags=flags)
    except (OSError, OverflowError, ValueError) as err:
        pytest.skip(f"cannot map a sparse 21 GiB buffer here: {err}")
    return torch.frombuffer(buf, dtype=torch.float32, count=numel)


def view(buf, shape, strides, offset=0, dtype=torch.float32, seed=0):
    """A view of ``buf`` at element BASE + offset, filled with random values (or ints < 8)."""
    v = torch.as_strided(buf if dtype == torch.float32 else buf.view(dtype), shape, strides, BASE + offset)
    gen = torch.Generator().manual_seed(seed)
    v.copy_(torch.randn(shape, generator=gen) if dtype.is_floating_point else torch.randint(0, 8, shape, generator=gen))
    return v


def close(actual, expected, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


# --- token log-probabilities ----------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("layout", ["batch", "seq"])
def test_token_logprobs(sparse, layout):
    from thinkfuse.kernels import logprobs as K

    vocab = 100
    shape, strides = ((3, 1, vocab), (BIG, vocab, 1)) if layout == "batch" else ((1, 3, vocab), (3 * BIG, BIG, 1))
    logits = view(sparse, shape, strides)
    ids = torch.tensor([5, 17, 99])
    logprobs, entropy, lse = K.token_logprobs_forward(logits, ids, 0.7, True)
    dense = logits.contiguous().requires_grad_()
    ref_lp, ref_ent = reference.token_logprobs(dense, ids.view(shape[:2]), 0.7, return_entropy=True)
    close(logprobs, ref_lp.flatten())
    close(entropy, ref_ent.flatten())

    g_lp, g_ent = torch.randn(3), torch.randn(3)
    grad = K.token_logprobs_backward(g_lp, g_ent, logits, ids, lse, entropy, 0.7)
    (ref_grad,) = torch.autograd.grad([ref_lp.flatten(), ref_ent.flatten()], [dense], [g_lp, g_ent])
    close(grad, ref_grad)


# --- RMSNorm --------------------------------------------------------------------------------------


@needs_interpreter
def test_rms_norm(sparse):
    from thinkfuse.kernels import rms_norm as K

    n = 64
    x = view(sparse, (3, n), (BIG, 1), seed=1)
    residual = view(sparse, (3, n), (BIG, 1), offset=n, seed=2)
    w = torch.randn(n)
    y, h, rstd = K.rms_norm_forward(x, w, residual, 1e-6)
    ref_y, ref_h = reference.rms_norm(x.contiguous(), w, 1e-6, residual.contiguous())
    close(h, ref_h)
    close(y, ref_y)

    # the backward reads dy and h through their row strides
    dy = view(sparse, (3, n), (BIG, 1), offset=2 * n, seed=3)
    h_view = view(sparse, (3, n), (BIG, 1), offset=3 * n, seed=4)
    h_view.copy_(h)
    dx, dw = K.rms_norm_backward(dy, h_view, w, rstd, None)
    hd, wd = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref_dx, ref_dw = torch.autograd.grad(reference.rms_norm(hd, wd, 1e-6), [hd, wd], dy.contiguous())
    close(dx, ref_dx)
    close(dw, ref_dw, rtol=1e-4, atol=1e-4)


# --- SwiGLU ---------------------------------------------------------------------------------------


@needs_interpreter
def test_swiglu(sparse):
    from thinkfuse.kernels import swiglu as K

    n = 48
    gate_up = view(sparse, (3, 2 * n), (BIG, 1))
    gate, up = gate_up[:, :n], gate_up[:, n:]
    close(K.swiglu_fused_forward(gate_up), reference.swiglu(gate.contiguous(), up.contiguous()))

    dy = view(sparse, (3, n), (BIG, 1), offset=2 * n, seed=1)
    g, u = gate.contiguous().requires_grad_(), up.contiguous().requires_grad_()
    ref = torch.autograd.grad(reference.swiglu(g, u), [g, u], dy.contiguous())
    for ours, theirs in zip(K.swiglu_backward(dy, gate, up), ref):
        close(ours, theirs)
    close(K.swiglu_fused_backward(dy, gate_up), torch.cat(ref, dim=1))


# --- RoPE -----------------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("layout", ["batch", "seq", "head"])
def test_rope(sparse, layout):
    from thinkfuse.kernels import rope as K

    d = 16
    shape, strides = {
        "batch": ((3, 1, 2, d), (BIG, 2 * d, d, 1)),
        "seq": ((1, 3, 2, d), (3 * BIG, BIG, d, 1)),
        "head": ((1, 1, 3, d), (3 * BIG, 3 * BIG, BIG, 1)),
    }[layout]
    q = view(sparse, shape, strides, seed=1)
    k = view(sparse, shape, strides, offset=2 * d, seed=2)
    # positions [B, S] read through their strides too (int32 in the same buffer)
    pos_shape = shape[:2]
    pos_strides = (BIG, 1) if layout == "batch" else ((BIG, BIG) if layout == "seq" else (1, 1))
    positions = view(sparse, pos_shape, pos_strides, offset=4 * d, dtype=torch.int32)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    q_out, k_out = K.rope_forward(q, k, positions, inv_freq, 1.0, 0.0, 1)
    ref_q, ref_k = reference.rope(q.contiguous(), k.contiguous(), positions.contiguous().long(), inv_freq)
    close(q_out, ref_q)
    close(k_out, ref_k)

    cos = view(sparse, (shape[0], shape[1], d), (strides[0], strides[1], 1), offset=5 * d, seed=3)
    sin = view(sparse, (shape[0], shape[1], d), (strides[0], strides[1], 1), offset=6 * d, seed=4)
    q_out, k_out = K.apply_rotary_forward(q, k, cos, sin)
    ref_q, ref_k = reference.apply_rotary_pos_emb(q.contiguous(), k.contiguous(), cos.contiguous(),
                                                  sin.contiguous(), unsqueeze_dim=2)
    close(q_out, ref_q)
    close(k_out, ref_k)


# --- attention ------------------------------------------------------------------------------------


def _attention_case(sparse, layout):
    """(q, k, v, cu_seqlens or None, max_seqlen_q, max_seqlen_k) with strides past 2**31."""
    d, hq, hkv = 16, 4, 2
    if layout == "batch":  # b * stride_b
        q = view(sparse, (3, 5, hq, d), (BIG, hq * d, d, 1), seed=1)
        k = view(sparse, (3, 7, hkv, d), (BIG, hkv * d, d, 1), offset=5 * hq * d, seed=2)
        v = view(sparse, (3, 7, hkv, d), (BIG, hkv * d, d, 1), offset=5 * hq * d + 7 * hkv * d, seed=3)
        return q, k, v, None, 5, 7
    if layout == "head":  # h * stride_h
        q = view(sparse, (1, 5, 3, d), (3 * BIG, d, BIG, 1), seed=1)
        k = view(sparse, (1, 7, 3, d), (3 * BIG, d, BIG, 1), offset=5 * d, seed=2)
        v = view(sparse, (1, 7, 3, d), (3 * BIG, d, BIG, 1), offset=12 * d, seed=3)
        return q, k, v, None, 5, 7
    # packed: (start + token) * stride_token; key 32 of the second sequence sits past 2**31
    total = 36
    q = view(sparse, (total, hq, d), (KEY_STRIDE, d, 1), seed=1)
    k = view(sparse, (total, hkv, d), (KEY_STRIDE, d, 1), offset=hq * d, seed=2)
    v = view(sparse, (total, hkv, d), (KEY_STRIDE, d, 1), offset=(hq + hkv) * d, seed=3)
    return q, k, v, torch.tensor([0, 3, total], dtype=torch.int32), 33, 33


@needs_interpreter
@pytest.mark.parametrize("layout", ["batch", "head", "packed"])
def test_flash_attention(sparse, layout):
    from thinkfuse.kernels import attention as K

    q, k, v, cu, max_q, max_k = _attention_case(sparse, layout)
    scale = q.shape[-1] ** -0.5
    out, lse = K.flash_attention_forward(q, k, v, cu, cu, max_q, max_k, scale, True, 0)
    dense = [t.contiguous().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference.flash_attention(*dense, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                 return_lse=True)
    close(out, ref_out, rtol=1e-4, atol=1e-4)
    close(lse, ref_lse, rtol=1e-4, atol=1e-4)

    dout = view(sparse, q.shape, q.stride(), offset=2**20, seed=4)  # read through q's strides
    grads = K.flash_attention_backward(dout, q, k, v, out, lse, None, cu, cu, max_q, max_k, scale, True, 0)
    ref_grads = torch.autograd.grad(ref_out, dense, dout.contiguous())
    for ours, theirs in zip(grads, ref_grads):
        close(ours, theirs, rtol=1e-4, atol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("layout", ["batch", "head", "key", "query"])
def test_decode_attention(sparse, layout):
    from thinkfuse.kernels import decode_attention as K

    d, hq, hkv, slots = 16, 4, 2, 36
    cache = (slots * hkv * d, hkv * d, d, 1)
    if layout == "batch":  # b * stride_b of q and the caches
        q = view(sparse, (3, 1, hq, d), (BIG, hq * d, d, 1), seed=1)
        k = view(sparse, (3, slots, hkv, d), (BIG,) + cache[1:], offset=hq * d, seed=2)
        v = view(sparse, (3, slots, hkv, d), (BIG,) + cache[1:], offset=hq * d + slots * hkv * d, seed=3)
    elif layout == "head":  # kv head * stride_h
        hq, hkv = 3, 3
        q = view(sparse, (1, 1, hq, d), (hq * BIG, hq * BIG, BIG, 1), seed=1)
        k = view(sparse, (1, slots, hkv, d), (hkv * BIG, d, BIG, 1), offset=d, seed=2)
        v = view(sparse, (1, slots, hkv, d), (hkv * BIG, d, BIG, 1), offset=(slots + 1) * d, seed=3)
    elif layout == "key":  # key * stride_s: keys 32.. sit past 2**31
        q = view(sparse, (1, 2, hq, d), (2 * hq * d, hq * d, d, 1), seed=1)
        k = view(sparse, (1, slots, hkv, d), (slots * KEY_STRIDE, KEY_STRIDE, d, 1), offset=2 * hq * d, seed=2)
        v = view(sparse, (1, slots, hkv, d), (slots * KEY_STRIDE, KEY_STRIDE, d, 1), offset=(2 * hq + hkv) * d,
                 seed=3)
    else:  # query token * q's stride_s (speculative verify: Sq = 3)
        q = view(sparse, (1, 3, hq, d), (3 * BIG, BIG, d, 1), seed=1)
        k = view(sparse, (1, slots, hkv, d), cache, offset=hq * d, seed=2)
        v = view(sparse, (1, slots, hkv, d), cache, offset=hq * d + slots * hkv * d, seed=3)
    seqlens = torch.full((q.shape[0],), slots - 1, dtype=torch.int32)
    for splits in (1, 3):
        out = K.decode_attention_forward(q, k, v, seqlens, None, d**-0.5, 0, splits)
        ref = reference.decode_attention(q.contiguous(), k.contiguous(), v.contiguous(), seqlens)
        close(out, ref, rtol=1e-4, atol=1e-4)


# --- speculative verification ---------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("layout", ["batch", "position"])
def test_mtp_verify(sparse, layout):
    from thinkfuse.kernels import mtp_verify as K

    vocab, k = 64, 3
    if layout == "batch":
        shape, strides = (3, k + 1, vocab), (BIG, vocab, 1)
    else:  # position j * stride: a [K+1, B, V] buffer viewed as [B, K+1, V]
        shape, strides = (1, k + 1, vocab), ((k + 1) * BIG, BIG, 1)
    logits = view(sparse, shape, strides, seed=1)
    # drafts equal to the target's argmax where they should be accepted, so every position is read
    draft = logits.argmax(-1)[:, :k].contiguous()
    tokens, accepted = K.mtp_verify(draft, logits, None, None, 0.0)
    ref_tokens, ref_accepted = reference.mtp_verify(draft, logits.contiguous())
    assert torch.equal(tokens, ref_tokens) and torch.equal(accepted, ref_accepted)

    # draft probabilities 1 on the drafts: the u = 0 positions accept, the u = 0.99 one rejects
    # (q(draft) < 0.99) and the final token is drawn from its residual max(q - p, 0)
    probs = view(sparse, (shape[0], k, vocab), strides, offset=vocab * (k + 1))
    probs.zero_().scatter_(2, draft[:, :, None], 1.0)
    uniforms = torch.tensor([[0.0, 0.0, 0.99, 0.5]]).expand(shape[0], k + 1).contiguous()
    tokens, accepted = K.mtp_verify(draft, logits, probs, uniforms, 0.8)
    ref_tokens, ref_accepted = reference.mtp_verify(draft, logits.contiguous(), 0.8, probs.contiguous(), uniforms)
    assert ref_accepted.tolist() == [2] * shape[0]
    assert torch.equal(tokens, ref_tokens) and torch.equal(accepted, ref_accepted)


# --- on a GPU: real tensors of more than 2**31 elements, both kernel backends ----------------------
# (rms_norm, rope and swiglu have theirs in test_rms_norm_gpu.py and test_rope_swiglu_cuda.py)


def _kernel_backends(cuda_op):
    return [b for b in backends_with(cuda_op) if b != "torch"]


def _cuda_randn(*shape, seed=0):
    return torch.randn(shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


@pytest.mark.gpu
@pytest.mark.parametrize("kb", _kernel_backends("token_logprobs_fwd"))
def test_gpu_token_logprobs_past_int32(kb):
    """Qwen vocabulary logits of more than 2**31 elements (4.3 GB bf16, and as much for the
    gradient): the last rows start past element 2**31, in the forward and in the gradient."""
    from thinkfuse.ops import token_logprobs

    vocab, tail = 151936, 8
    rows = 2**31 // vocab + tail
    logits = torch.zeros(1, rows, vocab, device="cuda", dtype=torch.bfloat16)
    logits[:, -tail:] = _cuda_randn(1, tail, vocab).bfloat16()
    ids = torch.randint(0, vocab, (1, rows), device="cuda")
    logits.requires_grad_()
    logprobs, entropy = token_logprobs(logits, ids, return_entropy=True, backend=kb)
    g = torch.zeros(1, rows, device="cuda")
    g[:, -tail:] = _cuda_randn(1, tail, seed=1)
    (grad,) = torch.autograd.grad(logprobs, logits, g)

    def run(x):
        lp, ent = reference.token_logprobs(x, ids[:, -tail:], return_entropy=True)
        return lp, ent, torch.autograd.grad(lp, x, g[:, -tail:].to(lp.dtype))[0]

    ref = run(*_leaves([logits[:, -tail:]]))
    truth = run(*_leaves([logits[:, -tail:]], torch.float64))
    assert_close_fp32(logprobs[:, -tail:], ref[0], tol=1e-4)
    assert_close_fp32(entropy[:, -tail:], ref[1], tol=1e-4)
    assert_low_precision_ok(grad[:, -tail:], ref[2], truth[2])


@pytest.mark.gpu
@pytest.mark.parametrize("kb", _kernel_backends("flash_attention_fwd"))
def test_gpu_packed_attention_past_int32(kb):
    """Packed q / out / dq of 525k tokens x 32 heads x 128 (2.15e9 elements): the last two
    sequences start at element 2**31."""
    from thinkfuse.ops import flash_attention

    hq, hkv, d, seq = 32, 8, 128, 512
    total = 2**31 // (hq * d) + 2 * seq
    cu = torch.arange(0, total + 1, seq, device="cuda", dtype=torch.int32)
    q = torch.zeros(total, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.zeros(total, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.zeros(total, hkv, d, device="cuda", dtype=torch.bfloat16)
    dout = torch.zeros(total, hq, d, device="cuda", dtype=torch.bfloat16)
    for i, t in enumerate((q, k, v, dout)):
        t[-2 * seq:] = _cuda_randn(2 * seq, *t.shape[1:], seed=i).bfloat16()
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = flash_attention(*leaves, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=seq, max_seqlen_k=seq,
                          backend=kb)
    ours = [out] + list(torch.autograd.grad(out, leaves, dout))

    cu_tail = torch.tensor([0, seq, 2 * seq], device="cuda", dtype=torch.int32)

    def run(tails):
        o = reference.flash_attention(*tails, cu_seqlens_q=cu_tail, cu_seqlens_k=cu_tail)
        return [o] + list(torch.autograd.grad(o, tails, dout[-2 * seq:].to(o.dtype)))

    tails = [t[-2 * seq:] for t in (q, k, v)]
    ref, truth = run(_leaves(tails)), run(_leaves(tails, torch.float64))
    for o, r, t in zip(ours, ref, truth):
        assert_low_precision_ok(o[-2 * seq:], r, t)


@pytest.mark.gpu
@pytest.mark.parametrize("kb", _kernel_backends("decode_attention"))
def test_gpu_decode_long_cache_past_int32(kb):
    """Ministral 3's 256K context: caches [9, 262144, 8, 128] (2.4e9 elements, 4.8 GB each);
    row 8 starts at element 2**31."""
    from thinkfuse.ops import decode_attention

    batch, smax, hq, hkv, d, length = 9, 262144, 32, 8, 128, 5000
    k = torch.zeros(batch, smax, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.zeros_like(k)
    k[-1, :length] = _cuda_randn(length, hkv, d, seed=1).bfloat16()
    v[-1, :length] = _cuda_randn(length, hkv, d, seed=2).bfloat16()
    q = _cuda_randn(batch, 1, hq, d).bfloat16()
    seqlens = torch.ones(batch, device="cuda", dtype=torch.int32)
    seqlens[-1] = length
    out = decode_attention(q, k, v, seqlens, backend=kb)
    args = (q[-1:], k[-1:, :length], v[-1:, :length])
    ref = reference.decode_attention(*args, seqlens[-1:])
    truth = reference.decode_attention(*(t.double() for t in args), seqlens[-1:])
    assert_low_precision_ok(out[-1:], ref, truth)


@pytest.mark.gpu
@pytest.mark.parametrize("kb", _kernel_backends("mtp_verify"))
def test_gpu_mtp_verify_position_stride_past_int32(kb):
    """Target logits [K+1, B, V] viewed as [B, K+1, V] (B = 4096, Qwen vocabulary, 6.2 GB):
    position j sits j * B * V elements in, past 2**31 from j = 4 (an int32 product in Triton)."""
    from thinkfuse.ops import mtp_verify

    k, batch, vocab, checked = 4, 4096, 151936, 2
    buf = torch.zeros(k + 1, batch, vocab, device="cuda", dtype=torch.bfloat16)
    buf[:, :checked] = _cuda_randn(k + 1, checked, vocab).bfloat16()
    logits = buf.transpose(0, 1)
    draft = logits[:, :k].argmax(-1)  # every draft accepted: the bonus position K is read too
    tokens, accepted = mtp_verify(draft, logits, backend=kb)
    ref_tokens, ref_accepted = reference.mtp_verify(draft[:checked], logits[:checked].contiguous())
    assert ref_accepted.tolist() == [k] * checked
    assert torch.equal(tokens[:checked], ref_tokens) and torch.equal(accepted[:checked], ref_accepted)
