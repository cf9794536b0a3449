"""CUDA-backend checks of token_logprobs and mtp_verify that need a GPU: the vocabulary sizes of
the target models (odd sizes too, which take the unaligned path), temperature, entropy and its
gradient, strided ``logits[:, :-1]`` slices, ignored and out-of-range ids, every float dtype,
against reference.py (a float64 truth for float16/bfloat16) and against the triton backend;
mtp_verify greedy and sampled against the reference (exact token equality for the same
uniforms), out-of-range drafts and CUDA graph capture (no host synchronisation), for the
one-block-per-row kernel (num_splits=1) and the split path (several explicit num_splits and the
heuristic's choice, 0): identical tokens, the sampled distribution (chi-square), graph replays
(the per-row ticket counters must be back at 0), bad num_splits."""

import pytest
import torch
from conftest import KERNEL_BACKENDS
from tolerances import assert_close_fp32, assert_low_precision_ok

from thinkfuse import reference
from thinkfuse.backend import cuda_has_op
from thinkfuse.ops import mtp_verify, token_logprobs


def _has(op: str) -> bool:
    return torch.cuda.is_available() and "cuda" in KERNEL_BACKENDS and cuda_has_op(op)


pytestmark = [pytest.mark.gpu]
needs_logprobs = pytest.mark.skipif(not _has("token_logprobs_fwd"), reason="no cuda token_logprobs kernel")
needs_mtp = pytest.mark.skipif(not _has("mtp_verify"), reason="no cuda mtp_verify kernel")
needs_triton = pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="triton backend unavailable")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Qwen2.5/Qwen3, Llama 3, MiMo-ish, Mistral; 151937 and 37 are odd (element-wise loads).
VOCABS = [151936, 152064, 128256, 32000, 151937, 37]
IGNORED = -100


def _gen(seed=0):
    return torch.Generator(device="cuda").manual_seed(seed)


def _logits_ids(batch, seq, vocab, dtype, seed=0, scale=3.0):
    gen = _gen(seed)
    logits = (scale * torch.randn(batch, seq, vocab, device="cuda", generator=gen)).to(dtype)
    ids = torch.randint(0, vocab, (batch, seq), device="cuda", generator=gen)
    ids[0, min(1, seq - 1)] = IGNORED
    return logits, ids


def _run(fn, logits, ids, seed=1):
    """Outputs and d/dlogits of a fixed random projection of them."""
    leaf = logits.detach().clone().requires_grad_()
    outs = fn(leaf, ids)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = _gen(seed)
    loss = sum((o.double() * torch.randn(o.shape, device="cuda", generator=gen, dtype=torch.float64)).sum()
               for o in outs)
    loss.backward()
    return [o.detach() for o in outs] + [leaf.grad]


def _ours(backend, temperature, entropy):
    return lambda x, ids: token_logprobs(x, ids, temperature=temperature, return_entropy=entropy, backend=backend)


def _reference(temperature, entropy):
    return lambda x, ids: reference.token_logprobs(x, ids, temperature, entropy)


def _truth(temperature, entropy):
    def fn(x, ids):
        logp = torch.log_softmax(x.double() / temperature, dim=-1)
        live = ids >= 0
        picked = torch.where(live, logp.gather(-1, ids.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
        if not entropy:
            return picked
        return picked, torch.where(live, -(logp.exp() * logp).sum(-1), 0.0)
    return fn


# --- token_logprobs ------------------------------------------------------------------------------


@needs_logprobs
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [False, True], ids=["logprob", "entropy"])
def test_token_logprobs_fp32_vs_reference(vocab, temperature, entropy):
    logits, ids = _logits_ids(2, 9, vocab, torch.float32)
    ours = _run(_ours("cuda", temperature, entropy), logits, ids)
    ref = _run(_reference(temperature, entropy), logits, ids)
    for o, r in zip(ours[:-1], ref[:-1]):
        assert_close_fp32(o, r, tol=1e-4)  # reductions over long rows
    assert_close_fp32(ours[-1], ref[-1])


@needs_logprobs
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [151936, 151937])
@pytest.mark.parametrize("entropy", [False, True], ids=["logprob", "entropy"])
def test_token_logprobs_low_precision_vs_truth(dtype, vocab, entropy):
    logits, ids = _logits_ids(3, 5, vocab, dtype, seed=2)
    ours = _run(_ours("cuda", 0.9, entropy), logits, ids)
    truth = _run(_truth(0.9, entropy), logits.double(), ids)
    for o, t in zip(ours[:-1], truth[:-1]):  # float32 outputs of low-precision inputs
        assert_close_fp32(o, t, tol=1e-4)
    hf_low = _run(_reference(0.9, entropy), logits, ids)[-1]
    assert_low_precision_ok(ours[-1], hf_low, truth[-1])


@needs_logprobs
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [151936, 128256, 151937])
def test_token_logprobs_cuda_matches_triton(dtype, vocab):
    logits, ids = _logits_ids(2, 17, vocab, dtype, seed=3)
    ours = _run(_ours("cuda", 0.8, True), logits, ids)
    theirs = _run(_ours("triton", 0.8, True), logits, ids)
    for o, t in zip(ours[:-1], theirs[:-1]):
        assert_close_fp32(o, t, tol=1e-5)
    grad_tol = 1e-5 if dtype == torch.float32 else 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    scale = max(theirs[-1].double().abs().max().item(), 1e-30)
    assert (ours[-1].double() - theirs[-1].double()).abs().max().item() <= grad_tol * scale


@needs_logprobs
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logprobs_slice_in_place(dtype):
    """logits[:, :-1] (strided rows, read in place), with an aligned and an odd vocabulary."""
    for vocab in (151936, 151937):
        full, ids = _logits_ids(2, 8, vocab, dtype, seed=4)
        ids = ids[:, 1:].contiguous()

        def ours(x, i):
            return token_logprobs(x[:, :-1], i, temperature=1.1, return_entropy=True, backend="cuda")

        def ref(x, i):
            return reference.token_logprobs(x[:, :-1], i, 1.1, True)
        o, r = _run(ours, full, ids), _run(ref, full, ids)
        assert_close_fp32(o[0], r[0], tol=1e-4)
        assert_close_fp32(o[1], r[1], tol=1e-4)
        assert (o[2][:, -1] == 0).all()  # the slice's tail gets no gradient
        if dtype == torch.float32:
            assert_close_fp32(o[2], r[2])


@needs_logprobs
def test_token_logprobs_ignored_and_out_of_range_ids():
    vocab = 1000
    logits, ids = _logits_ids(1, 6, vocab, torch.bfloat16, seed=5)
    ids[0, 2] = vocab  # >= V: NaN, read nothing
    ids[0, 3] = -1
    leaf = logits.detach().clone().requires_grad_()
    logprobs, entropy = token_logprobs(leaf, ids, return_entropy=True, backend="cuda")
    assert torch.isnan(logprobs[0, 2]) and torch.isfinite(entropy[0, 2])
    assert logprobs[0, 1] == 0 and logprobs[0, 3] == 0 and entropy[0, 1] == 0 and entropy[0, 3] == 0
    (torch.nan_to_num(logprobs) + entropy).sum().backward()
    assert (leaf.grad[0, 1] == 0).all() and (leaf.grad[0, 3] == 0).all()


@needs_logprobs
def test_token_logprobs_masked_vocab_and_int32_ids():
    logits, ids = _logits_ids(2, 4, 4099, torch.float32, seed=6)
    logits[..., :2000] = float("-inf")
    ids = ids.clamp(min=2000)
    ids[0, 0] = IGNORED
    for id_dtype in (torch.int32, torch.int64):
        ours = _run(_ours("cuda", 1.0, True), logits, ids.to(id_dtype))
        ref = _run(_reference(1.0, True), logits, ids)
        for o, r in zip(ours, ref):
            assert not torch.isnan(o).any()
            assert_close_fp32(o, r, tol=1e-4)


# --- mtp_verify ----------------------------------------------------------------------------------

# 1: one block per batch row; 2, 7, 64: that many vocabulary slices per row (fewer for a small
# vocabulary); 0: the heuristic's choice.
SPLITS = [1, 2, 7, 64, 0]


def _verify(draft, logits, probs=None, uniforms=None, temperature=0.0, num_splits=1):
    """The extension op itself, with explicit uniforms."""
    return torch.ops.thinkfuse_C.mtp_verify(draft, logits, probs, uniforms, temperature, num_splits)


def _assert_same(ours, expected):
    assert torch.equal(ours[1].cpu(), expected[1].cpu()), (ours[1], expected[1])
    assert torch.equal(ours[0].cpu(), expected[0].cpu()), (ours[0], expected[0])


def _sampling_case(batch, k, vocab, seed, draft_mode, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(batch, k + 1, vocab, generator=gen)).to(dtype)
    logits[0, :, : vocab // 2] = float("-inf")
    probs = None
    if draft_mode == "probs":
        probs = torch.softmax(torch.randn(batch, k, vocab, generator=gen), -1)
        draft = torch.multinomial(probs.reshape(-1, vocab), 1, generator=gen).view(batch, k)
        probs = probs.to(dtype).cuda()
    else:
        draft = torch.randint(0, vocab, (batch, k), generator=gen)
        draft = torch.where(torch.rand(batch, k, generator=gen) < 0.5, logits[:, :k].float().argmax(-1), draft)
    return draft.cuda(), logits.cuda(), probs


@needs_mtp
@pytest.mark.parametrize("num_splits", SPLITS)
@pytest.mark.parametrize("vocab", [151936, 152064, 128256, 151937, 37])
@pytest.mark.parametrize("k", [1, 3])
def test_mtp_greedy_vs_reference(vocab, k, num_splits):
    gen = torch.Generator().manual_seed(vocab + k)
    logits = torch.randn(16, k + 1, vocab, generator=gen).bfloat16()  # bfloat16: many ties
    logits[1, :, vocab - 5:] = 100.0  # ties at the end of the row go to the lowest id
    logits[2, 0, 7] = float("nan")  # NaN counts as the maximum
    target = logits.float().argmax(-1)
    draft = torch.where(torch.rand(16, k, generator=gen) < 0.7, target[:, :k], torch.randint(0, vocab, (16, k)))
    draft[3, 0] = vocab + 3  # out of range: rejected
    draft[4, 0] = -7
    draft, logits = draft.cuda(), logits.cuda()
    ours = mtp_verify(draft, logits, backend="cuda", num_splits=num_splits)
    ref = reference.mtp_verify(draft, logits)
    _assert_same(ours, ref)
    _assert_same(ours, _verify(draft, logits, num_splits=1))


def _greedy_case(batch, k, vocab, seed):
    """bfloat16 logits [B, K+1, V] (B >= 7) and drafts: accepted prefixes of every length (all K
    too), and rows with ties across the vocabulary (hence across slices), NaN (ranked as
    torch.argmax: above +inf, the first of several), out-of-range drafts and an all -inf
    position."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, k + 1, vocab, generator=gen).bfloat16()
    cut = torch.arange(batch) % (k + 2)  # k + 1: every draft accepted
    keep = torch.arange(k)[None] < cut[:, None]
    draft = torch.where(keep, logits[:, :k].float().argmax(-1), torch.randint(0, vocab, (batch, k), generator=gen))
    ids = [3, vocab // 2, vocab - 1]  # distinct for vocab >= 7
    logits[1, :, ids] = 100.0  # tie: the lowest (3) wins; drafts of 3 are all accepted
    draft[1] = 3
    logits[2, :, ids[1:]] = 100.0  # tie in the middle and at the end: vocab // 2 wins
    draft[2] = vocab - 1  # rejected at 0, correction vocab // 2
    logits[3, 0, vocab - 2] = float("nan")  # NaN counts as the maximum (accepted here)
    draft[3, 0] = vocab - 2
    draft[4, 0] = vocab + 3  # out of range: rejected
    draft[5, 0] = -7
    logits[6, 0] = float("-inf")  # all -inf: argmax 0
    draft[6, 0] = 0
    if batch > 8:
        nan, inf = float("nan"), float("inf")
        logits[7, 0, ids] = torch.tensor([inf, nan, nan]).bfloat16()  # the first NaN beats an earlier +inf
        draft[7, 0] = 3  # rejected, correction vocab // 2
        logits[8, 0, ids] = torch.tensor([inf, inf, nan]).bfloat16()  # a NaN at the end beats two +inf
        draft[8, 0] = vocab - 1  # accepted
    return draft.cuda(), logits.cuda()


@needs_mtp
@pytest.mark.parametrize("vocab", [151680, 151937, 4099, 37])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_mtp_split_greedy_matches_one_block(vocab, k):
    draft, logits = _greedy_case(24, k, vocab, seed=vocab * 10 + k)
    ref = reference.mtp_verify(draft, logits)
    one = _verify(draft, logits, num_splits=1)
    _assert_same(one, ref)
    for num_splits in SPLITS[1:]:
        _assert_same(_verify(draft, logits, num_splits=num_splits), one)
    assert (one[1] == k).any() and (one[1] == 0).any()


@needs_mtp
@pytest.mark.parametrize("num_splits", SPLITS)
def test_mtp_split_greedy_large_batch(num_splits):
    """B=256, K=4 on MiMo's vocabulary (the heuristic's one-slice-per-row regime)."""
    draft, logits = _greedy_case(256, 4, 151680, seed=1)
    _assert_same(_verify(draft, logits, num_splits=num_splits), reference.mtp_verify(draft, logits))


@needs_mtp
@pytest.mark.parametrize("num_splits", SPLITS)
@pytest.mark.parametrize("k", [9, 17])
def test_mtp_split_greedy_many_drafts(k, num_splits):
    """More positions than the finishing block has warps (8): the walk goes in groups."""
    draft, logits = _greedy_case(2 * (k + 2), k, 3000, seed=k)
    _assert_same(_verify(draft, logits, num_splits=num_splits), reference.mtp_verify(draft, logits))
    sampled_draft, sampled_logits, probs = _sampling_case(12, k, 3000, seed=k, draft_mode="probs")
    uniforms = torch.rand(12, k + 1, device="cuda", generator=_gen(k))
    ours = _verify(sampled_draft, sampled_logits, probs, uniforms, 0.9, num_splits)
    _assert_same(ours, reference.mtp_verify(sampled_draft, sampled_logits, 0.9, probs, uniforms))


@needs_mtp
@pytest.mark.parametrize("num_splits", SPLITS)
def test_mtp_split_strided_and_unaligned_logits(num_splits):
    """Logits read in place from a wider tensor: a vocabulary slice starting at id 0 (rows 16-byte
    aligned: vector loads) and one starting at id 3 (not aligned: element-wise loads)."""
    vocab, k = 151680, 2
    full = torch.randn(6, k + 2, vocab + 8, device="cuda", generator=_gen(5)).bfloat16()
    for logits in (full[:, 1:, :vocab], full[:, 1:, 3:vocab + 3]):
        target = logits.float().argmax(-1)
        draft = target[:, :k].clone()
        draft[1, 1] = (draft[1, 1] + 1) % vocab
        draft[2, 0] = (draft[2, 0] + 1) % vocab
        ours = _verify(draft, logits, num_splits=num_splits)
        _assert_same(ours, reference.mtp_verify(draft, logits))
        uniforms = torch.rand(6, k + 1, device="cuda", generator=_gen(6))
        ours = _verify(draft, logits, None, uniforms, 1.1, num_splits)
        _assert_same(ours, reference.mtp_verify(draft, logits, 1.1, None, uniforms))


@needs_mtp
@pytest.mark.parametrize("num_splits", SPLITS)
@pytest.mark.parametrize("draft_mode", ["deterministic", "probs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [151936, 300, 37])
def test_mtp_sampled_vs_reference(draft_mode, dtype, vocab, num_splits):
    draft, logits, probs = _sampling_case(24, 3, vocab, seed=vocab, draft_mode=draft_mode, dtype=dtype)
    kwargs = dict(temperature=0.8, draft_probs=probs)
    ours = mtp_verify(draft, logits, generator=_gen(7), backend="cuda", num_splits=num_splits, **kwargs)
    ref = mtp_verify(draft, logits, generator=_gen(7), backend="torch", **kwargs)
    _assert_same(ours, ref)
    one = mtp_verify(draft, logits, generator=_gen(7), backend="cuda", num_splits=1, **kwargs)
    _assert_same(ours, one)


@needs_mtp
@needs_triton
@pytest.mark.parametrize("num_splits", [1, 0])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("draft_mode", ["deterministic", "probs"])
def test_mtp_cuda_matches_triton(temperature, draft_mode, num_splits):
    draft, logits, probs = _sampling_case(8, 4, 151936, seed=3, draft_mode=draft_mode, dtype=torch.bfloat16)
    kwargs = dict(temperature=temperature, draft_probs=probs)
    ours = mtp_verify(draft, logits, generator=_gen(1), backend="cuda", num_splits=num_splits, **kwargs)
    theirs = mtp_verify(draft, logits, generator=_gen(1), backend="triton", **kwargs)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


@needs_mtp
@pytest.mark.parametrize("num_splits", [1, 7, 0])
def test_mtp_out_of_range_drafts_are_rejected(num_splits):
    logits = torch.zeros(2, 3, 5, device="cuda")
    logits[:, :, 2] = 5.0
    draft = torch.tensor([[2, 9], [-1, 2]], device="cuda")
    uniforms = torch.zeros(2, 3, device="cuda")  # u = 0 would accept anything with q > 0
    for temperature, uni in ((0.0, None), (1.0, uniforms)):
        ours = _verify(draft, logits, None, uni, temperature, num_splits)
        ref = reference.mtp_verify(draft, logits, temperature, None, uni)
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
        assert ours[1].tolist() == [1, 0]


@needs_mtp
@pytest.mark.parametrize("num_splits", [1, 7, 0])
def test_mtp_no_drafts_and_empty_batch(num_splits):
    logits = torch.randn(2, 1, 100, device="cuda")
    tokens, n = mtp_verify(torch.empty(2, 0, dtype=torch.long, device="cuda"), logits, backend="cuda",
                           num_splits=num_splits)
    assert tokens[:, 0].tolist() == logits[:, 0].argmax(-1).tolist() and n.tolist() == [0, 0]
    uniforms = torch.rand(2, 1, device="cuda", generator=_gen(2))
    probs = torch.empty(2, 0, 100, device="cuda")
    draft = torch.empty(2, 0, dtype=torch.long, device="cuda")
    for p in (None, probs):  # K = 0 sampled: the bonus token only
        ours = _verify(draft, logits, p, uniforms, 1.0, num_splits)
        _assert_same(ours, reference.mtp_verify(draft, logits, 1.0, p, uniforms))
    tokens, n = mtp_verify(torch.empty(0, 2, dtype=torch.long, device="cuda"), torch.randn(0, 3, 9, device="cuda"),
                           backend="cuda", num_splits=num_splits)
    assert tokens.shape == (0, 3) and n.shape == (0,)


@needs_mtp
def test_mtp_cuda_graph_capture():
    draft, logits, probs = _sampling_case(4, 2, 151936, seed=9, draft_mode="probs", dtype=torch.bfloat16)
    uniforms = torch.rand(4, 3, device="cuda", generator=_gen(3))
    expected = torch.ops.thinkfuse_C.mtp_verify(draft, logits, probs, uniforms, 0.9)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.ops.thinkfuse_C.mtp_verify(draft, logits, probs, uniforms, 0.9)  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = torch.ops.thinkfuse_C.mtp_verify(draft, logits, probs, uniforms, 0.9)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])


@needs_mtp
@pytest.mark.parametrize("num_splits", [7, 0])
@pytest.mark.parametrize("mode", ["greedy", "deterministic", "probs"])
def test_mtp_split_cuda_graph_replays(mode, num_splits):
    """Captured once, replayed on new inputs three times: every replay is right, so the ticket
    counters and the workspace are fit for reuse (no host sync inside the capture either)."""
    batch, k, vocab = 4, 2, 151936
    temperature = 0.0 if mode == "greedy" else 0.9
    draft_mode = "probs" if mode == "probs" else "deterministic"

    def inputs(seed):
        draft, logits, probs = _sampling_case(batch, k, vocab, seed=seed, draft_mode=draft_mode, dtype=torch.bfloat16)
        uniforms = None if mode == "greedy" else torch.rand(batch, k + 1, device="cuda", generator=_gen(seed))
        return draft, logits, probs, uniforms

    static = inputs(20)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        _verify(*static, temperature, num_splits)  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = _verify(*static, temperature, num_splits)
    for seed in (21, 22, 23):
        fresh = inputs(seed)
        for dst, src in zip(static, fresh):
            if dst is not None:
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        _assert_same(out, _verify(*fresh, temperature, 1))
        _assert_same(out, reference.mtp_verify(fresh[0], fresh[1], temperature, fresh[2], fresh[3]))
        _assert_same(_verify(*fresh, temperature, num_splits), out)  # eager after replays


@needs_mtp
def test_mtp_split_bad_num_splits():
    draft, logits = _greedy_case(8, 2, 50, seed=3)
    with pytest.raises(ValueError, match="num_splits must be <= 1024"):
        _verify(draft, logits, num_splits=1025)
    with pytest.raises(ValueError, match="num_splits must be <= 1024"):
        mtp_verify(draft, logits, backend="cuda", num_splits=10**6)
    with pytest.raises(TypeError, match="num_splits must be an int"):
        mtp_verify(draft, logits, backend="cuda", num_splits=2.0)
    ref = reference.mtp_verify(draft, logits)
    # any value <= 0 is the heuristic; more slices than the vocabulary has ids is clamped
    for num_splits in (0, -1, -(2**40), 1024, 50, 3):
        _assert_same(_verify(draft, logits, num_splits=num_splits), ref)
    tiny = torch.randn(3, 3, 1, device="cuda")  # V = 1
    zeros = torch.zeros(3, 2, dtype=torch.long, device="cuda")
    _assert_same(_verify(zeros, tiny, num_splits=1024), reference.mtp_verify(zeros, tiny))


@needs_mtp
@pytest.mark.parametrize("num_splits", [1, 7, 0])
@pytest.mark.parametrize("draft_mode", ["deterministic", "probs"])
def test_mtp_sampled_nan_logits_fall_back_to_the_argmax(draft_mode, num_splits):
    draft, logits, probs = _sampling_case(6, 2, 1000, seed=11, draft_mode=draft_mode)
    logits[2, :, 17] = float("nan")  # every position of row 2: rejected, then the argmax (17)
    uniforms = torch.rand(6, 3, device="cuda", generator=_gen(4))
    ours = _verify(draft, logits, probs, uniforms, 1.0, num_splits)
    ref = reference.mtp_verify(draft, logits, 1.0, probs, uniforms)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    assert ours[1][2] == 0 and ours[0][2, 0] == 17


def _p_value(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of `tokens` against `probs`, over the ids of positive
    probability (none may be drawn elsewhere)."""
    support = probs > 0
    observed = torch.bincount(tokens, minlength=probs.numel()).double()
    assert observed[~support].sum() == 0, "drew an id of probability 0"
    expected = probs[support].double() * tokens.numel()
    stat = ((observed[support] - expected) ** 2 / expected).sum()
    dof = torch.tensor(support.sum().item() - 1.0, dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, stat / 2).item()


@needs_mtp
@pytest.mark.parametrize("num_splits", [3, 8, 0])
@pytest.mark.parametrize("draft_mode", ["deterministic", "probs"])
def test_mtp_split_sampled_tokens_follow_the_target_distribution(draft_mode, num_splits):
    """V=64 in slices of 8 (num_splits=8) or 24 (3), one slice of -inf logits, a mode per
    position (so that all K drafts are often accepted: ~14k rows reach the bonus with the
    deterministic drafts, ~27k with draft probabilities, the least likely id has q ~ 8e-4): at
    every position, the tokens emitted there (rows that got that far) follow softmax(target / T).
    The same case through reference.mtp_verify gives p-values of 0.03 to 0.97 over several seeds."""
    rows, vocab, k, temperature = 100_000, 64, 2, 0.9
    gen = torch.Generator().manual_seed(17)
    target = 0.7 * torch.randn(k + 1, vocab, generator=gen)
    target[:, 8:16] = float("-inf")
    modes = torch.tensor([5, 40, 63])
    target[torch.arange(k + 1), modes] = 4.0
    q = torch.softmax(target / temperature, dim=-1)
    logits = target.expand(rows, k + 1, vocab).contiguous().cuda()
    probs = None
    if draft_mode == "probs":
        bump = torch.zeros(k, vocab)
        bump[torch.arange(k), modes[:k]] = 3.0
        p = torch.softmax(torch.randn(k, vocab, generator=gen) + bump, dim=-1)
        draft = torch.stack([torch.multinomial(p[j], rows, replacement=True, generator=gen) for j in range(k)], 1)
        probs = p.expand(rows, k, vocab).contiguous().cuda()
    else:
        draft = torch.randint(0, vocab, (rows, k), generator=gen)
        draft = torch.where(torch.rand(rows, k, generator=gen) < 0.7, q[:k].argmax(-1), draft)
    uniforms = torch.rand(rows, k + 1, device="cuda", generator=_gen(3))
    tokens, num_accepted = _verify(draft.cuda(), logits, probs, uniforms, temperature, num_splits)
    tokens, num_accepted = tokens.cpu(), num_accepted.cpu()
    assert (num_accepted == k).sum() > 5_000 and (num_accepted < k).sum() > 5_000
    p_values = [_p_value(tokens[num_accepted >= j, j], q[j]) for j in range(k + 1)]
    assert min(p_values) > 1e-3, p_values
