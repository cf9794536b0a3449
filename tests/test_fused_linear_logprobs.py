"""thinkfuse.ops.fused_linear_token_logprobs: every backend against reference.py (logits
materialised) and a float64 truth, gradients w.r.t. hidden / weight / bias, model vocabularies,
chunking, ignored ids, frozen lm_head, strides, memory bound, bad inputs, custom ops."""


import pytest
import torch
from ptx import compile_in_subprocess
from conftest import DEVICE, backends_with
from tolerances import assert_close_fp32, assert_low_precision_ok, assert_no_scale_bias
from torch.utils._python_dispatch import TorchDispatchMode

import thinkfuse
from thinkfuse import reference
from thinkfuse.ops import fused_linear_token_logprobs
from thinkfuse.ops import logprobs as logprobs_mod
from thinkfuse.ops.logprobs import (CHUNK_LOGITS_BYTES, KERNEL_CHUNK_LOGITS_BYTES, default_chunk_tokens,
                                    kernel_chunk_tokens, vocab_slab_plan)

CUDA_OP = "token_logprobs_fwd"  # the cuda backend runs the token_logprobs kernels on each chunk
KERNEL_BACKENDS = [b for b in backends_with(CUDA_OP) if b != "torch"]

IGNORED = -100


def _inputs(shape, n_hidden, n_vocab, dtype=torch.float32, bias=True, seed=0):
    """(hidden [*shape, H], weight [V, H], bias [V] or None, ids [*shape] with one ignored)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=gen)).to(DEVICE, dtype)  # noqa: E731
    hidden = rand(*shape, n_hidden)
    weight = rand(n_vocab, n_hidden, scale=2.0 / n_hidden**0.5)
    ids = torch.randint(0, n_vocab, shape, generator=gen)
    if ids.numel():
        ids.view(-1)[min(1, ids.numel() - 1)] = IGNORED
    return hidden, weight, (rand(n_vocab, scale=0.5) if bias else None), ids.to(DEVICE)


def _run(fn, tensors, ids, seed=1):
    """Outputs and the gradients of a fixed random projection of them w.r.t. ``tensors``
    (hidden, weight, bias-or-None)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    outs = fn(*leaves, ids)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen).to(o.device, torch.float64)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs] + [t.grad for t in leaves if t is not None]


def _ours(backend, temperature=1.0, return_entropy=False, chunk_size=None):
    return lambda h, w, b, ids: fused_linear_token_logprobs(
        h, w, ids, bias=b, temperature=temperature, return_entropy=return_entropy, chunk_size=chunk_size,
        backend=backend,
    )


def _reference(temperature=1.0, return_entropy=False):
    return lambda h, w, b, ids: reference.fused_linear_token_logprobs(h, w, ids, b, temperature, return_entropy)


def _truth(temperature=1.0, return_entropy=False):
    """float64 throughout (inputs must be float64)."""
    def fn(h, w, b, ids):
        logp = torch.log_softmax(torch.nn.functional.linear(h, w, b) / temperature, dim=-1)
        live = ids >= 0
        picked = torch.where(live, logp.gather(-1, ids.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
        if not return_entropy:
            return picked
        return picked, torch.where(live, -(logp.exp() * logp).sum(-1), 0.0)
    return fn


def _assert_all_close(ours, ref, tol=1e-4):
    assert len(ours) == len(ref)
    for o, r in zip(ours, ref):
        assert o.dtype == r.dtype and o.shape == r.shape, (o.dtype, r.dtype, o.shape, r.shape)
        assert_close_fp32(o, r, tol=tol)


# --- every backend against the reference ---------------------------------------------------------

CASES = [  # (bias, temperature, return_entropy)
    (False, 1.0, False),
    (True, 0.7, True),
    (True, 1.0, False),
    (False, 1.3, True),
]


@pytest.mark.parametrize("bias,temperature,return_entropy", CASES)
@pytest.mark.parametrize("n_hidden,n_vocab", [(48, 1001), (40, 2053)])
def test_fp32_matches_reference(backend, bias, temperature, return_entropy, n_hidden, n_vocab):
    hidden, weight, b, ids = _inputs((19,), n_hidden, n_vocab, bias=bias)
    ours = _run(_ours(backend, temperature, return_entropy), (hidden, weight, b), ids)
    ref = _run(_reference(temperature, return_entropy), (hidden, weight, b), ids)
    _assert_all_close(ours, ref)


@pytest.mark.parametrize("n_vocab", [151936, 131072])
def test_model_vocab_sizes_torch_backend(n_vocab):
    """Qwen2/MiMo (151936) and Ministral 3 (131072) vocabularies, a few tokens, two chunks."""
    hidden, weight, bias, ids = _inputs((3,), 64, n_vocab, seed=n_vocab)
    ids[0] = n_vocab - 1
    ours = _run(_ours("torch", 0.9, True, chunk_size=2), (hidden, weight, bias), ids)
    ref = _run(_reference(0.9, True), (hidden, weight, bias), ids)
    _assert_all_close(ours, ref)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, None])
def test_torch_backend_chunk_sizes(chunk_size):
    hidden, weight, bias, ids = _inputs((2, 7), 24, 333)
    ours = _run(_ours("torch", 1.0, True, chunk_size), (hidden, weight, bias), ids)
    ref = _run(_reference(1.0, True), (hidden, weight, bias), ids)
    _assert_all_close(ours, ref)


# --- the weight-gradient backward over vocab slabs --------------------------------------------

SLAB_LAYOUTS = {  # name: (MIN_VOCAB_SLAB, tokens, V, chunk_size, expected (slab, tokens per block))
    "one block per slab": (16, 37, 1001, 5, (135, 37)),
    "several blocks per slab": (400, 37, 1001, 5, (256, 19)),
    "odd last slab": (300, 9, 777, 1, (256, 3)),
    "one token per block": (600, 9, 777, 1, (512, 1)),
}


@pytest.mark.parametrize("layout", list(SLAB_LAYOUTS))
@pytest.mark.parametrize("bias,temperature,return_entropy", CASES)
def test_vocab_slab_backward_matches_reference(backend, monkeypatch, layout, bias, temperature, return_entropy):
    """Backward by vocab slabs (d_weight rows written once per slab) against the reference, with
    targets in every slab, an ignored id, and slabs that need one or several token blocks."""
    min_slab, n_tokens, n_vocab, chunk, plan = SLAB_LAYOUTS[layout]
    monkeypatch.setattr(logprobs_mod, "MIN_VOCAB_SLAB", min_slab)
    assert vocab_slab_plan(n_tokens, n_vocab, chunk) == plan
    hidden, weight, b, ids = _inputs((n_tokens,), 24, n_vocab, bias=bias, seed=n_tokens)
    ids[0], ids[-1] = n_vocab - 1, 0  # the first and the last slab hold a target
    ours = _run(_ours(backend, temperature, return_entropy, chunk_size=chunk), (hidden, weight, b), ids)
    ref = _run(_reference(temperature, return_entropy), (hidden, weight, b), ids)
    _assert_all_close(ours, ref)


def test_vocab_slab_plan_keeps_blocks_within_the_chunk_budget():
    for n_tokens, n_vocab, chunk in [(32768, 151936, 1664), (4096, 131072, 2048), (100, 1000, 7), (5, 9, 100)]:
        slab, block = vocab_slab_plan(n_tokens, n_vocab, chunk)
        assert 1 <= slab <= n_vocab and 1 <= block <= n_tokens
        assert slab * block <= max(chunk * n_vocab, slab)
    # everything fits one chunk: no slabs
    assert vocab_slab_plan(5, 9, 100) == (9, 5)
    # Palmyra-mini's vocabulary, 32k tokens, 512 MiB bf16 chunks: slabs of whole tiles over all tokens
    slab, block = vocab_slab_plan(32768, 151936, kernel_chunk_tokens(151936, 2))
    assert block == 32768 and slab % 256 == 0 and slab >= logprobs_mod.MIN_VOCAB_SLAB


def test_vocab_slab_backward_holds_no_float32_weight_sized_buffer(monkeypatch):
    """The point of the slabs: the largest float32 buffer of the backward is [tokens, H] (or one
    slab), never the [V, H] accumulator of a token-chunked backward."""
    monkeypatch.setattr(logprobs_mod, "MIN_VOCAB_SLAB", 64)
    n_tokens, n_hidden, n_vocab, chunk = 64, 8, 4000, 4
    hidden, weight, bias, ids = _inputs((n_tokens,), n_hidden, n_vocab, dtype=torch.bfloat16)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logprobs = fused_linear_token_logprobs(h, w, ids, chunk_size=chunk, backend="torch")
    with _LargestTensor(torch.float32) as probe:
        logprobs.sum().backward()
    assert probe.largest < n_vocab * n_hidden, probe.largest
    assert w.grad.dtype == torch.bfloat16


def _low_precision_dtypes(backend):
    # The Triton interpreter's tl.dot is wrong on bfloat16 (ARCHITECTURE.md): float16 only there.
    interpreted = backend == "triton" and DEVICE.type == "cpu"
    return [torch.float16] if interpreted else [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_vs_float64_truth(backend, dtype):
    if dtype not in _low_precision_dtypes(backend):
        pytest.skip("tl.dot on bfloat16 is wrong in the Triton interpreter")
    hidden, weight, bias, ids = _inputs((2, 9), 64, 777, dtype)
    ours = _run(_ours(backend, 0.8, True), (hidden, weight, bias), ids)
    ref = _run(_reference(0.8, True), (hidden, weight, bias), ids)
    truth = _run(_truth(0.8, True), (hidden.double(), weight.double(), bias.double()), ids)
    for o, r, t in zip(ours, ref, truth):
        assert_low_precision_ok(o, r, t)  # float32 log-probs/entropy, then gradients in `dtype`
        assert_no_scale_bias(o, t)
    assert [o.dtype for o in ours] == [torch.float32] * 2 + [dtype] * 3


def test_ignored_ids_and_leading_dims(backend):
    hidden, weight, bias, ids = _inputs((2, 5), 32, 300)
    ids[0, :] = IGNORED
    ids[1, ::2] = IGNORED
    logprobs, entropy, d_hidden, _, _ = _run(_ours(backend, 1.0, True), (hidden, weight, bias), ids)
    assert logprobs.shape == (2, 5) and entropy.shape == (2, 5) and d_hidden.shape == (2, 5, 32)
    ignored = ids < 0
    assert not logprobs[ignored].any() and not entropy[ignored].any() and not d_hidden[ignored].any()
    ref = _run(_reference(1.0, True), (hidden, weight, bias), ids)
    ours = _run(_ours(backend, 1.0, True), (hidden, weight, bias), ids)
    _assert_all_close(ours, ref)


def test_a_logit_overflowing_float16_gives_nan_like_the_reference(backend):
    """A float16 lm_head whose logit overflows to +inf (a diverging model) must show it: a NaN
    log-prob for that token, as log_softmax of the materialised logits gives, not -inf."""
    hidden, weight, _, ids = _inputs((4,), 16, 70, dtype=torch.float16, bias=False)
    hidden[2], weight[30] = 200.0, 200.0  # 16 * 200 * 200 > 65504: logit (2, 30) is +inf
    ids[2] = 3
    for fn in (_ours(backend), _reference()):
        logprobs = fn(hidden, weight, None, ids)
        assert torch.isnan(logprobs[2]) and torch.isfinite(logprobs[[0, 3]]).all()


def test_all_ignored_gives_zero_gradients(backend):
    hidden, weight, bias, _ = _inputs((5,), 16, 64)
    ids = torch.full((5,), IGNORED, device=DEVICE)
    outs = _run(_ours(backend, 1.0, True), (hidden, weight, bias), ids)
    assert all(not t.any() for t in outs)


def test_frozen_lm_head_gets_no_weight_gradient(backend, monkeypatch):
    """LoRA-style: only hidden needs a gradient, and the backward is told so (the d_weight pass
    is skipped, not computed and dropped)."""
    from thinkfuse.ops import logprobs as lp_ops

    weight_grads = []
    real_backward = lp_ops._fused_chunked_backward

    def spy(*args, **kwargs):
        weight_grads.append(args[9])  # the weight_grad argument
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(lp_ops, "_fused_chunked_backward", spy)
    hidden, weight, _, ids = _inputs((6,), 32, 257, bias=False)
    h = hidden.clone().requires_grad_()
    fused_linear_token_logprobs(h, weight, ids, backend=backend).sum().backward()
    h_ref = hidden.clone().requires_grad_()
    reference.fused_linear_token_logprobs(h_ref, weight, ids).sum().backward()
    assert weight_grads == [False]
    assert weight.grad is None
    assert_close_fp32(h.grad, h_ref.grad, tol=1e-4)


def test_strided_hidden_and_weight(backend):
    """hidden as a causal slice of [B, S, H]; weight stored transposed (copied to unit stride)."""
    hidden, weight, bias, _ = _inputs((2, 6), 40, 150)
    ids = torch.randint(0, 150, (2, 5), device=DEVICE)
    weight_t = weight.t().contiguous().t()
    before = hidden.clone(), weight.clone()
    ours = _run(lambda h, w, b, i: fused_linear_token_logprobs(h[:, :-1], w, i, bias=b, backend=backend),
                (hidden, weight_t, bias), ids)
    ref = _run(lambda h, w, b, i: reference.fused_linear_token_logprobs(h[:, :-1], w, i, b),
               (hidden, weight, bias), ids)
    assert torch.equal(hidden, before[0]) and torch.equal(weight_t, before[1]), "the op wrote into its inputs"
    _assert_all_close(ours, ref)


@pytest.mark.parametrize("return_entropy", [False, True])
def test_second_derivative_raises(backend, return_entropy):
    """No double backward (create_graph=True): it must refuse rather than differentiate the
    backward's in-place steps."""
    hidden, weight, bias, ids = _inputs((5,), 8, 40)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    outs = fused_linear_token_logprobs(leaves[0], leaves[1], ids, bias=leaves[2], return_entropy=return_entropy,
                                       backend=backend)
    loss = sum(o.sum() for o in outs) if return_entropy else outs.sum()
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative|no autograd formula"):
        torch.autograd.grad(sum(g.pow(2).sum() for g in grads), leaves)


def test_empty(backend):
    hidden, weight, bias, _ = _inputs((0,), 16, 32)
    h = hidden.clone().requires_grad_()
    out = fused_linear_token_logprobs(h, weight, torch.empty(0, dtype=torch.long, device=DEVICE), bias=bias,
                                      backend=backend)
    assert out.shape == (0,)
    out.sum().backward()
    assert h.grad.shape == (0, 16)


# --- memory: never [tokens, V] ---------------------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    """Records the element count of every floating-point tensor any torch op produces (autograd's
    included), or only of those of ``dtype``. (The Triton interpreter moves kernel arguments as
    raw uint8 storage: those byte buffers are not tensors of the op.)"""

    def __init__(self, dtype=None):
        super().__init__()
        self.largest, self.dtype = 0, dtype

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and self.dtype in (None, t.dtype):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_intermediate(fn, hidden, weight, bias, ids):
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    with _LargestTensor() as probe:
        logprobs, entropy = fn(h, w, b, ids)
        (logprobs.sum() + entropy.sum()).backward()
    return probe.largest


@pytest.mark.parametrize("chosen", ["torch", *KERNEL_BACKENDS])
def test_peak_intermediate_is_bounded_by_the_chunk_not_tokens_x_vocab(chosen):
    """No tensor of the forward or backward may approach the full [tokens, V] logits.

    tokens x V = 256 x 1000, while every backend's chunk is 16 x 1000 and the other buffers are
    [tokens, H] / [V, H]. The same probe sees the materialising reference reach tokens x V, so
    this test would fail if the op ever held the full logits."""
    n_tokens, n_hidden, n_vocab, chunk = 256, 16, 1000, 16
    hidden, weight, bias, ids = _inputs((n_tokens,), n_hidden, n_vocab)
    full_logits = n_tokens * n_vocab

    reference_peak = _largest_intermediate(_reference(1.0, True), hidden, weight, bias, ids)
    assert reference_peak >= full_logits

    ours = _largest_intermediate(_ours(chosen, 1.0, True, chunk_size=chunk), hidden, weight, bias, ids)
    bound = max(chunk * n_vocab, max(n_tokens, n_vocab) * n_hidden)
    assert ours <= bound, f"largest intermediate {ours} elements > bound {bound}"
    assert ours <= full_logits // 8


def test_default_chunk_is_at_most_256_mib_of_float32_logits():
    for n_vocab in (151936, 131072, 152064, 7):
        tokens = default_chunk_tokens(n_vocab)
        assert tokens >= 1 and tokens * n_vocab * 4 <= max(CHUNK_LOGITS_BYTES, n_vocab * 4)
    assert default_chunk_tokens(151936) == 441


def test_kernel_chunks_are_whole_tiles_of_at_most_512_mib_of_logits():
    assert kernel_chunk_tokens(151936, 2) == 1664  # 1766 fit; rounded down to whole 128-token tiles
    assert kernel_chunk_tokens(131072, 4) == 1024
    assert kernel_chunk_tokens(2**30, 2) == 1  # a vocabulary bigger than the budget: one token
    for n_vocab, itemsize in ((151936, 2), (152064, 2), (131072, 4), (7, 2)):
        tokens = kernel_chunk_tokens(n_vocab, itemsize)
        assert tokens * n_vocab * itemsize <= KERNEL_CHUNK_LOGITS_BYTES


def test_chunk_budget_env_override(monkeypatch):
    """THINKFUSE_LOGITS_CHUNK_MIB sets the kernel backends' chunk budget (read at each call); a
    value that is not a positive whole number of MiB is refused by name."""
    monkeypatch.setenv("THINKFUSE_LOGITS_CHUNK_MIB", "2048")
    assert kernel_chunk_tokens(151936, 2) == 7040  # 7067 fit; whole 128-token tiles
    # 1 MiB of float32 logits at V = 50000: 5 tokens a chunk (the default would take all 23 at once).
    hidden, weight, _, ids = _inputs((23,), 16, 50000, bias=False)
    monkeypatch.setenv("THINKFUSE_LOGITS_CHUNK_MIB", "1")
    seen = []
    logprobs_mod.fused_linear_logprobs_with_grads(
        hidden, weight, ids, lambda lp, s, e: seen.append((s, e)) or torch.ones_like(lp), backend=KERNEL_BACKENDS[0])
    assert seen == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    for bad in ("0", "-5", "1.5", "lots"):
        monkeypatch.setenv("THINKFUSE_LOGITS_CHUNK_MIB", bad)
        with pytest.raises(ValueError, match="THINKFUSE_LOGITS_CHUNK_MIB"):
            kernel_chunk_tokens(151936, 2)
    monkeypatch.setenv("THINKFUSE_LOGITS_CHUNK_MIB", "")
    assert kernel_chunk_tokens(151936, 2) == 1664


# --- out-of-range ids and bad inputs --------------------------------------------------------------


@pytest.mark.parametrize("kb", KERNEL_BACKENDS)
def test_out_of_range_id_gives_nan_in_the_kernels(kb):
    hidden, weight, bias, ids = _inputs((3,), 16, 50)
    ids[2] = 55
    logprobs, _, _ = torch.ops.thinkfuse.fused_linear_logprobs_fwd(hidden, weight, ids, bias, 1.0, False, 2, kb)
    assert torch.isnan(logprobs[2]) and torch.isfinite(logprobs[0])


def _good_args():
    return dict(hidden=torch.ones(3, 8), weight=torch.ones(20, 8), token_ids=torch.zeros(3, dtype=torch.long),
                bias=None, temperature=1.0, chunk_size=None)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(hidden="h"), TypeError, "hidden must be a torch.Tensor"),
        (dict(hidden=torch.ones(3, 8, dtype=torch.int64)), TypeError, "hidden must have dtype"),
        (dict(weight=torch.ones(20)), ValueError, "weight must be 2-D"),
        (dict(weight=torch.ones(20, 7)), ValueError, "weight must be \\[V, H\\] with H = hidden's last dim 8"),
        (dict(weight=torch.ones(20, 8, dtype=torch.float16)), TypeError, "weight dtype"),
        (dict(hidden=torch.ones(3, 0), weight=torch.ones(20, 0)), ValueError, "must be non-zero"),
        (dict(bias=torch.ones(19)), ValueError, "bias must have V = 20 elements"),
        (dict(bias=torch.ones(20, dtype=torch.float16)), TypeError, "bias dtype"),
        (dict(bias=torch.ones(20, device="meta")), ValueError, "bias is on meta"),
        (dict(token_ids=torch.zeros(4, dtype=torch.long)), ValueError, "token_ids shape"),
        (dict(token_ids=torch.zeros(3, dtype=torch.uint8)), TypeError, "token_ids must have dtype"),
        (dict(token_ids=torch.tensor([0, 20, 1])), ValueError, "token_ids must be < V = 20"),
        (dict(temperature=0), ValueError, "temperature must be > 0"),
        (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
        (dict(chunk_size=0), ValueError, "chunk_size must be None or a positive int"),
        (dict(chunk_size=2.5), ValueError, "chunk_size must be None or a positive int"),
    ],
)
def test_bad_inputs_raise_before_any_kernel(backend, kwargs, error, match):
    args = _good_args()
    args.update(kwargs)
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v)
            for k, v in args.items()}
    if args["token_ids"].device.type != "cpu" and "< V" in match:
        pytest.skip("token ids are range-checked eagerly on CPU tensors only")
    with pytest.raises(error, match=match):
        fused_linear_token_logprobs(args["hidden"], args["weight"], args["token_ids"], bias=args["bias"],
                                    temperature=args["temperature"], chunk_size=args["chunk_size"], backend=backend)


# --- torch.library registration and torch.compile ------------------------------------------------


def test_custom_ops_pass_opcheck(backend):
    hidden, weight, bias, ids = _inputs((5,), 16, 70)
    for b, return_entropy in ((bias, True), (None, False)):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
        torch.library.opcheck(torch.ops.thinkfuse.fused_linear_logprobs_fwd.default,
                              (leaves[0], leaves[1], ids, leaves[2], 0.8, return_entropy, 2, backend))
    _, entropy, lse = torch.ops.thinkfuse.fused_linear_logprobs_fwd(hidden, weight, ids, bias, 0.8, True, 2,
                                                                     "torch")
    grad = torch.randn(5, device=DEVICE)
    for weight_grad in (True, False):
        torch.library.opcheck(torch.ops.thinkfuse.fused_linear_logprobs_bwd.default,
                              (grad, grad * 0.3, hidden, weight, ids, bias, lse, entropy, 0.8, weight_grad, 2,
                               backend))
    torch.library.opcheck(torch.ops.thinkfuse.fused_linear_logprobs_bwd.default,
                          (grad, None, hidden, weight, ids, None, lse, None, 0.8, True, 2, backend))


def test_custom_ops_torch_forms_match_the_kernels(kernel_backend):
    hidden, weight, bias, ids = _inputs((9,), 24, 300)
    ours = torch.ops.thinkfuse.fused_linear_logprobs_fwd(hidden, weight, ids, bias, 0.8, True, 4, kernel_backend)
    ref = torch.ops.thinkfuse.fused_linear_logprobs_fwd(hidden, weight, ids, bias, 0.8, True, 4, "torch")
    _assert_all_close(ours, ref)
    grad = torch.randn(9, device=DEVICE)
    args = (grad, grad * 0.3, hidden, weight, ids, bias, ref[2], ref[1], 0.8, True, 4)
    _assert_all_close(torch.ops.thinkfuse.fused_linear_logprobs_bwd(*args, kernel_backend),
                      torch.ops.thinkfuse.fused_linear_logprobs_bwd(*args, "torch"))


@pytest.mark.parametrize("kb", KERNEL_BACKENDS)
def test_torch_compile_kernel_backend_fullgraph(kb):
    torch._dynamo.reset()
    hidden, weight, bias, ids = _inputs((2, 4), 16, 90)
    lm_head = torch.nn.Linear(16, 90).to(DEVICE)
    with torch.no_grad():
        lm_head.weight.copy_(weight)
        lm_head.bias.copy_(bias)

    def fn(h):
        logprobs, entropy = fused_linear_token_logprobs(h, lm_head.weight, ids, bias=lm_head.bias,
                                                        return_entropy=True)
        return (logprobs - 0.1 * entropy).sum()

    with thinkfuse.use_backend(kb):
        h = hidden.clone().requires_grad_()
        eager = fn(h)
        eager_grads = torch.autograd.grad(eager, [h, lm_head.weight, lm_head.bias])
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(h)
        compiled_grads = torch.autograd.grad(compiled, [h, lm_head.weight, lm_head.bias])
    assert_close_fp32(compiled, eager, tol=1e-4)
    _assert_all_close(compiled_grads, eager_grads)


# --- the kernels compile for a real GPU target ----------------------------------------------------

_COMPILE_SCRIPT = (
    """
    from thinkfuse.kernels import logprobs

    dt = "bf16"
    row = {"BLOCK_M": 1, "BLOCK_N": 4096}
    compile_ptx(logprobs._token_logprobs_fwd_kernel,
                [f"*{dt}", "*i64"] + ["*fp32"] * 3 + ["i64", "i64"] + ["i32"] * 3 + ["fp32"],
                {"RETURN_ENTROPY": True, **row}, num_warps=8)
    compile_ptx(logprobs._token_logprobs_bwd_kernel,
                [f"*{dt}", "*i64"] + ["*fp32"] * 4 + [f"*{dt}", "i64", "i64"] + ["i32"] * 3 + ["fp32"],
                {"HAS_D_ENTROPY": True, **row}, num_warps=8)
    print("compiled")
    """
)


def test_logprob_kernels_compile_for_sm90():
    """The interpreter cannot catch what only the compiler rejects; PTX needs no device."""
    compile_in_subprocess(_COMPILE_SCRIPT)


# --- one pass: log-probs and the lm_head gradients together ------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_one_pass_with_grads_matches_reference_autograd(backend, bias):
    """fused_linear_logprobs_with_grads (used by GRPOLoss and causal_lm_loss) against autograd
    of the materialising reference, for a loss whose d/d logprob is a fixed weight per token."""
    from thinkfuse.ops.logprobs import fused_linear_logprobs_with_grads

    hidden, weight, b, ids = _inputs((23,), 16, 301, bias=bias)
    grad_weights = torch.randn(23, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    seen = []

    def grad_of_logprobs(lp_chunk, start, end):
        seen.append((start, end))
        return grad_weights[start:end]

    logprobs, d_hidden, d_weight, d_bias = fused_linear_logprobs_with_grads(
        hidden, weight, ids, grad_of_logprobs, bias=b, chunk_size=5, backend=backend)
    assert seen == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    ref = reference.fused_linear_token_logprobs(leaves[0], leaves[1], ids, leaves[2] if bias else None)
    (ref * grad_weights).sum().backward()
    assert_close_fp32(logprobs, ref.detach())
    assert_close_fp32(d_hidden, leaves[0].grad)
    assert_close_fp32(d_weight, leaves[1].grad)
    if bias:
        assert_close_fp32(d_bias, leaves[2].grad)
    else:
        assert d_bias.numel() == 0
    _, _, frozen, _ = fused_linear_logprobs_with_grads(hidden, weight, ids, grad_of_logprobs, weight_grad=False,
                                                       backend=backend)
    assert frozen.numel() == 0


@pytest.mark.parametrize("n_tokens, expected_chunks", [(19, 1), (20, 1), (21, 6), (40, 10)])
def test_one_pass_takes_one_chunk_when_that_needs_less_memory(monkeypatch, n_tokens, expected_chunks):
    """Without a chunk_size, the kernel backends' one-pass path with a weight gradient takes all
    tokens in one chunk when their logits weigh less than a default chunk plus the float32 [V, H]
    d_weight accumulator several chunks would need (one_pass_chunk_tokens), and chunks otherwise;
    both match autograd of the reference. The torch backend keeps its chunks (its float32 copies
    would make one big chunk the larger)."""
    from thinkfuse.ops import logprobs as lp_ops

    h_size, vocab = 16, 301
    # 4 tokens per default chunk (float32 logits); the accumulator weighs 301 * 16 * 4 bytes,
    # 16 tokens' logits: up to 20 tokens go in one chunk.
    monkeypatch.setattr(lp_ops, "KERNEL_CHUNK_LOGITS_BYTES", 4 * 4 * vocab)
    hidden, weight, _, ids = _inputs((n_tokens,), h_size, vocab, bias=False)
    grad_weights = torch.randn(n_tokens, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    seen = []

    def grad_of_logprobs(lp_chunk, start, end):
        seen.append((start, end))
        return grad_weights[start:end]

    logprobs, d_hidden, d_weight, _ = lp_ops.fused_linear_logprobs_with_grads(
        hidden, weight, ids, grad_of_logprobs, backend="triton")
    assert len(seen) == expected_chunks
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    ref = reference.fused_linear_token_logprobs(leaves[0], leaves[1], ids)
    (ref * grad_weights).sum().backward()
    assert_close_fp32(logprobs, ref.detach())
    assert_close_fp32(d_hidden, leaves[0].grad)
    assert_close_fp32(d_weight, leaves[1].grad)
    seen.clear()  # without a weight gradient there is no accumulator to save: default chunks
    lp_ops.fused_linear_logprobs_with_grads(hidden, weight, ids, grad_of_logprobs, weight_grad=False,
                                            backend="triton")
    assert len(seen) == -(-n_tokens // 4)
    seen.clear()
    monkeypatch.setattr(lp_ops, "CHUNK_LOGITS_BYTES", 4 * 4 * vocab)  # torch: 4 tokens per chunk too
    lp_ops.fused_linear_logprobs_with_grads(hidden, weight, ids, grad_of_logprobs, backend="torch")
    assert len(seen) == -(-n_tokens // 4)


class _Float32Storages(TorchDispatchMode):
    """Distinct storages of the float32 tensors of one shape that torch ops produce."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.storages = tuple(shape), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == self.shape:
                self.storages.add(t.untyped_storage().data_ptr())
        return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_one_pass_accumulates_d_weight_in_one_buffer(backend, dtype):
    """Over several chunks the float32 [V, H] d_weight accumulator is added to in place: one
    buffer for the whole pass. (torch's addmm with out_dtype and no ``out`` allocates a new
    [V, H] result per chunk and copies the old one in: a second accumulator alive at once, and
    twice the traffic. On CUDA this checks the in-place form this torch build supports.)"""
    from thinkfuse.ops.logprobs import fused_linear_logprobs_with_grads

    hidden, weight, _, ids = _inputs((23,), 16, 301, dtype=dtype, bias=False)
    grad_weights = torch.randn(23, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with _Float32Storages(weight.shape) as probe:
        logprobs, _, d_weight, _ = fused_linear_logprobs_with_grads(
            hidden, weight, ids, lambda lp, s, e: grad_weights[s:e], chunk_size=5, backend=backend)
    assert len(probe.storages) == 1, f"{len(probe.storages)} float32 [V, H] buffers"
    leaf = weight.float().clone().requires_grad_()
    ref = reference.fused_linear_token_logprobs(hidden.float(), leaf, ids)
    (ref * grad_weights).sum().backward()
    if dtype == torch.float32:
        assert_close_fp32(d_weight, leaf.grad)
    else:
        torch.testing.assert_close(d_weight.float(), leaf.grad, atol=2e-2, rtol=2e-2)


class _NaNEmpty(TorchDispatchMode):
    """New float32 tensors of one shape come out filled with NaN (what uninitialised memory may
    hold), and zero fills of that shape are recorded."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.zero_fills = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.zeros.default, torch.ops.aten.zero_.default, torch.ops.aten.fill_.Scalar):
            shape = args[0] if func is torch.ops.aten.zeros.default else args[0].shape
            self.zero_fills += tuple(shape) == self.shape
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.empty.memory_format and out.dtype == torch.float32 and tuple(out.shape) == self.shape:
            out.fill_(float("nan"))
        return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_one_pass_first_chunk_writes_the_accumulator_without_a_zero_fill(backend, dtype):
    """The first chunk's d_weight product overwrites the [V, H] float32 accumulator (addmm at
    beta 0): no zero fill, and whatever the new buffer held (NaN here) never reaches the result."""
    from thinkfuse.ops.logprobs import fused_linear_logprobs_with_grads

    hidden, weight, _, ids = _inputs((23,), 16, 301, dtype=dtype, bias=False)
    grad_weights = torch.randn(23, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with _NaNEmpty(weight.shape) as probe:
        _, _, d_weight, _ = fused_linear_logprobs_with_grads(
            hidden, weight, ids, lambda lp, s, e: grad_weights[s:e], chunk_size=5, backend=backend)
    assert probe.zero_fills == 0
    leaf = weight.float().clone().requires_grad_()
    (reference.fused_linear_token_logprobs(hidden.float(), leaf, ids) * grad_weights).sum().backward()
    assert torch.isfinite(d_weight).all()
    torch.testing.assert_close(d_weight.float(), leaf.grad, atol=2e-2, rtol=2e-2)


def test_one_pass_called_directly_with_grad_mode_on(backend):
    """Called outside an autograd.Function, on leaves that require grad: it returns plain
    tensors (no graph) and the same values as under no_grad."""
    from thinkfuse.ops.logprobs import fused_linear_logprobs_with_grads

    hidden, weight, _, ids = _inputs((23,), 16, 301, bias=False)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    grad_fn = lambda lp, s, e: torch.ones_like(lp)  # noqa: E731
    out = fused_linear_logprobs_with_grads(*leaves, ids, grad_fn, chunk_size=5, backend=backend)
    assert not any(t.requires_grad for t in out)
    with torch.no_grad():
        ref = fused_linear_logprobs_with_grads(hidden, weight, ids, grad_fn, chunk_size=5, backend=backend)
    for o, r in zip(out, ref):
        assert torch.equal(o, r)


def test_one_pass_with_no_tokens(backend):
    from thinkfuse.ops.logprobs import fused_linear_logprobs_with_grads

    hidden, weight, b, ids = _inputs((0,), 16, 301, bias=True)
    logprobs, d_hidden, d_weight, d_bias = fused_linear_logprobs_with_grads(
        hidden, weight, ids, lambda lp, s, e: torch.ones_like(lp), bias=b, backend=backend)
    assert logprobs.shape == (0,) and d_hidden.shape == hidden.shape
    assert d_weight.shape == weight.shape and not d_weight.any() and d_bias.shape == b.shape and not d_bias.any()


def test_one_pass_with_grads_checks_arguments():
    from thinkfuse.ops.logprobs import fused_linear_logprobs_with_grads

    hidden, weight, _, ids = _inputs((4,), 8, 20, bias=False)
    with pytest.raises(ValueError, match="weight must be \\[V, H\\]"):
        fused_linear_logprobs_with_grads(hidden, weight[:, :7], ids, lambda lp, s, e: lp)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_logprobs_with_grads(hidden, weight, ids, lambda lp, s, e: lp, chunk_size=0)


@pytest.mark.parametrize("shape", [(2, 3), ()])
def test_one_pass_with_grads_wants_token_rows(backend, shape):
    """hidden must be [N, H] (it chunks dim 0 as tokens): other ranks, which the fused op takes,
    are refused up front, not met by a shape error from inside a chunk's reduction."""
    from thinkfuse.ops.logprobs import fused_linear_logprobs_with_grads

    hidden, weight, _, ids = _inputs(shape, 8, 20, bias=False)
    with pytest.raises(ValueError, match="hidden must be 2-D"):
        fused_linear_logprobs_with_grads(hidden, weight, ids, lambda lp, s, e: torch.ones_like(lp), backend=backend)


def _watch_chunk_grads(monkeypatch):
    """Weak references to every chunk of d logits the backend's reducer makes, and, per
    _LmHeadGrads.result call (the float32 accumulator turned into d_weight), how many of them
    were still alive then."""
    import weakref

    from thinkfuse.ops import logprobs as L

    grads_alive, alive_at_result = [], []
    original_reducer, original_result = L._reducer, L._LmHeadGrads.result

    def reducer(name):
        base = original_reducer(name)

        def logits_grad(*args):
            out = base.logits_grad(*args)
            grads_alive.append(weakref.ref(out))
            return out

        return base._replace(logits_grad=logits_grad)

    def result(self):
        alive_at_result.append(sum(ref() is not None for ref in grads_alive))
        return original_result(self)

    monkeypatch.setattr(L, "_reducer", reducer)
    monkeypatch.setattr(L._LmHeadGrads, "result", result)
    return grads_alive, alive_at_result


def test_no_chunk_of_d_logits_is_alive_when_the_accumulator_is_converted(backend, monkeypatch):
    """One pass: the float32 [V, H] accumulator becomes d_weight (a second [V, H] buffer) after
    the last chunk; that chunk's d logits must be gone by then, else the three make the peak."""
    from thinkfuse.ops.logprobs import fused_linear_logprobs_with_grads

    grads_alive, alive_at_result = _watch_chunk_grads(monkeypatch)
    hidden, weight, _, ids = _inputs((23,), 16, 301, bias=False)
    fused_linear_logprobs_with_grads(hidden, weight, ids, lambda lp, s, e: torch.ones_like(lp), chunk_size=5,
                                     backend=backend)
    assert len(grads_alive) == 5 and alive_at_result == [0]


def test_two_pass_backward_frees_its_last_chunk_before_the_conversion(kernel_backend, monkeypatch):
    """The same in the kernel backends' backward by token chunks."""
    grads_alive, alive_at_result = _watch_chunk_grads(monkeypatch)
    hidden, weight, _, ids = _inputs((23,), 16, 301, bias=False)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    fused_linear_token_logprobs(*leaves, ids, backend=kernel_backend, chunk_size=5).sum().backward()
    assert len(grads_alive) >= 5 and alive_at_result == [0]
