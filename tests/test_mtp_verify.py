"""mtp_verify: greedy exact cases, every backend against the reference, the sampling
distribution (chi-square), GPU-path handling of bad draft ids, bad inputs, torch.compile and a
PTX compile of the Triton kernels."""

import functools

import pytest
import torch
from ptx import compile_in_subprocess
from conftest import DEVICE, backends_with

import thinkfuse
from thinkfuse import reference
from thinkfuse.ops import mtp_verify

CUDA_OP = "mtp_verify"  # the cuda backend runs only where the extension has this kernel
ALL_BACKENDS = backends_with(CUDA_OP)
KERNEL_BACKENDS = [b for b in ALL_BACKENDS if b != "torch"]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _logits_with_argmax(argmax_ids, vocab: int, seed: int = 0) -> torch.Tensor:
    """Random logits [B, K+1, V] whose argmax at each position is argmax_ids[b][k]."""
    ids = torch.tensor(argmax_ids)
    logits = torch.randn((*ids.shape, vocab), generator=torch.Generator().manual_seed(seed))
    logits.scatter_(-1, ids[..., None], 10.0)
    return logits.to(DEVICE)


# ---------------------------------------------------------------------------------------------
# Greedy


@pytest.mark.parametrize(
    "draft, argmax, accepted, expected",
    [
        ([3, 5, 7], [3, 5, 7, 9], 3, [3, 5, 7, 9]),  # all accepted, bonus
        ([4, 5, 7], [3, 5, 7, 9], 0, [3, -1, -1, -1]),  # first rejected, correction
        ([3, 6, 7], [3, 5, 7, 9], 1, [3, 5, -1, -1]),  # middle rejected
        ([3, 5, 8], [3, 5, 7, 9], 2, [3, 5, 7, -1]),  # last rejected
        ([2], [2, 0], 1, [2, 0]),  # K = 1
    ],
)
def test_greedy_cases(draft, argmax, accepted, expected, backend):
    logits = _logits_with_argmax([argmax], vocab=11)
    tokens, num_accepted = mtp_verify(torch.tensor([draft], device=DEVICE), logits, backend=backend)
    assert tokens.dtype == num_accepted.dtype == torch.int64
    assert tokens.tolist() == [expected] and num_accepted.tolist() == [accepted]


def test_greedy_ties_go_to_the_lowest_id(backend):
    # position 0: ids 2 and 6 tie (draft 6 is rejected, 2 emitted); position 1: ids 0 and V-1 tie
    # across vocabulary blocks of the kernels; position 2: all equal -> id 0.
    vocab = 9000
    logits = torch.zeros(3, 3, vocab)
    logits[0, 0, [2, 6]] = 5.0
    logits[1, 0, 4] = 1.0
    logits[1, 1, [0, vocab - 1]] = 3.0
    draft = torch.tensor([[6, 1], [4, vocab - 1], [0, 0]])
    tokens, num_accepted = mtp_verify(draft.to(DEVICE), logits.to(DEVICE), backend=backend)
    assert num_accepted.tolist() == [0, 1, 2]
    assert tokens.tolist() == [[2, -1, -1], [4, 0, -1], [0, 0, 0]]


# NaN and infinities rank as in torch.argmax: any NaN is the maximum (the first NaN wins when
# there are several, NaN beats +inf), then +inf; equal values, infinities included, go to the
# lowest id, and a row of only -inf gives id 0. Each case: the row's background (random values
# in [-2, -1), or -inf), the values set, and torch's argmax. V = 9000 spans three of the Triton
# kernel's 4096-id blocks, so competitors sit in one block or in different ones.
_NAN, _INF = float("nan"), float("inf")
_SPECIAL_VOCAB = 9000
_SPECIAL_ROWS = [
    ("random", {3: _INF, 6000: _NAN}, 6000),  # NaN beats an earlier +inf (another block)
    ("random", {50: _INF, 100: _NAN}, 100),  # ... in the same block
    ("random", {5: _NAN, 7000: _NAN}, 5),  # several NaNs: the first
    ("random", {4100: _NAN, 4097: _NAN, 8999: _NAN, 20: _INF}, 4097),
    ("random", {8999: _NAN}, 8999),  # NaN at the last id
    ("random", {10: _INF, 8000: _INF}, 10),  # +inf ties: the first
    ("random", {2: 7.0, 4500: 7.0, 8998: 7.0}, 2),  # finite ties across blocks: the first
    ("-inf", {}, 0),  # all -inf
    ("-inf", {7: _NAN}, 7),
    ("-inf", {4096: 1.0, 8000: _INF}, 8000),
    ("random", {9: 0.0, 4: -0.0}, 4),  # -0.0 == 0.0: a tie, the first
]


def _special_logits(dtype):
    """Logits [R, 2, V]: position 0 of row r is case r, position 1 case r + 1; and torch's
    argmax of each [R, 2]."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for background, values, _ in _SPECIAL_ROWS:
        row = -1.0 - torch.rand(_SPECIAL_VOCAB, generator=gen)
        if background == "-inf":
            row.fill_(-_INF)
        for i, v in values.items():
            row[i] = v
        rows.append(row)
    n = len(rows)
    logits = torch.stack([torch.stack([rows[r], rows[(r + 1) % n]]) for r in range(n)]).to(dtype)
    expected = torch.tensor([[_SPECIAL_ROWS[r][2], _SPECIAL_ROWS[(r + 1) % n][2]] for r in range(n)])
    return logits, expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_argmax_ranks_nan_first_then_inf(dtype):
    """The contract the kernels follow is torch.argmax's own ranking (checked, so that a change
    in torch would show)."""
    logits, expected = _special_logits(dtype)
    assert torch.equal(logits.argmax(-1), expected)
    _, num_accepted = reference.mtp_verify(expected[:, :1], logits)
    assert num_accepted.tolist() == [1] * len(_SPECIAL_ROWS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_ranks_nan_and_inf_as_torch_argmax(dtype, backend):
    """Even rows draft torch's argmax (accepted, then the bonus: the argmax of position 1); odd
    rows draft the id a NaN-as-+inf ranking picks when that differs (rejected; the correction is
    torch's argmax)."""
    logits, expected = _special_logits(dtype)
    nan_as_inf = logits[:, 0].float().nan_to_num(nan=_INF).argmax(-1)
    wrong = torch.where(nan_as_inf == expected[:, 0], (expected[:, 0] + 1) % _SPECIAL_VOCAB, nan_as_inf)
    even = torch.arange(len(_SPECIAL_ROWS)) % 2 == 0
    draft = torch.where(even, expected[:, 0], wrong)[:, None]
    tokens, num_accepted = mtp_verify(draft.to(DEVICE), logits.to(DEVICE), backend=backend)
    assert num_accepted.tolist() == even.long().tolist()
    assert tokens.tolist() == [[e[0], e[1]] if ok else [e[0], -1] for e, ok in zip(expected.tolist(), even)]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_matches_reference(k, dtype, kernel_backend):
    batch, vocab = 24, 1000  # odd rows; a vocabulary that is not a power of two
    gen = torch.Generator().manual_seed(k)
    logits = torch.randn(batch, k + 1, vocab, generator=gen).to(dtype)
    draft = torch.randint(0, vocab, (batch, k), generator=gen)
    # accept prefixes of every length: copy the argmax into the first `cut` drafts of each row
    cut = torch.arange(batch) % (k + 1)
    keep = torch.arange(k)[None] < cut[:, None]
    draft = torch.where(keep, logits[:, :k].float().argmax(-1), draft)
    tokens, num_accepted = mtp_verify(draft.to(DEVICE), logits.to(DEVICE), backend=kernel_backend)
    ref_tokens, ref_accepted = reference.mtp_verify(draft, logits)
    assert torch.equal(num_accepted.cpu(), ref_accepted) and torch.equal(tokens.cpu(), ref_tokens)
    assert (num_accepted.cpu() >= cut).all()


@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_greedy_on_a_152k_vocabulary(backend_name):
    """MiMo's vocabulary (151680): several blocks per row, maximum in the last block."""
    vocab, k = 151680, 2
    logits = torch.randn(2, k + 1, vocab, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    logits[0, 0, vocab - 3] = 100.0
    logits[0, 1, 77] = 100.0
    logits[0, 2, vocab - 1] = 100.0
    draft = torch.tensor([[vocab - 3, 77], [5, 6]])
    tokens, num_accepted = mtp_verify(draft.to(DEVICE), logits.to(DEVICE), backend=backend_name)
    ref_tokens, ref_accepted = reference.mtp_verify(draft, logits)
    assert tokens[0].tolist() == [vocab - 3, 77, vocab - 1] and num_accepted[0].item() == 2
    assert torch.equal(tokens.cpu(), ref_tokens) and torch.equal(num_accepted.cpu(), ref_accepted)


def test_strided_logits_and_int32_drafts(backend):
    full = torch.randn(4, 6, 2 * 50, generator=torch.Generator().manual_seed(3))
    logits = full[:, 1:4, ::2]  # strides on every dim (vocabulary stride 2: copied internally)
    draft = logits[:, :2].argmax(-1).to(torch.int32)
    draft[1, 1] = (draft[1, 1] + 1) % 50
    tokens, num_accepted = mtp_verify(draft.to(DEVICE), logits.to(DEVICE), backend=backend)
    ref_tokens, ref_accepted = reference.mtp_verify(draft, logits.contiguous())
    assert torch.equal(tokens.cpu(), ref_tokens) and torch.equal(num_accepted.cpu(), ref_accepted)
    assert num_accepted.tolist() == [2, 1, 2, 2]


def test_empty_batch_and_no_drafts(backend):
    tokens, num_accepted = mtp_verify(
        torch.zeros(0, 2, dtype=torch.long, device=DEVICE), torch.randn(0, 3, 7, device=DEVICE), backend=backend
    )
    assert tokens.shape == (0, 3) and num_accepted.shape == (0,)
    logits = _logits_with_argmax([[4], [1]], vocab=7)
    tokens, num_accepted = mtp_verify(torch.zeros(2, 0, dtype=torch.long, device=DEVICE), logits, backend=backend)
    assert tokens.tolist() == [[4], [1]] and num_accepted.tolist() == [0, 0]


# ---------------------------------------------------------------------------------------------
# Sampling: every backend returns the reference's tokens for the same generator state


def _sampling_case(batch, k, vocab, seed, *, draft_mode, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(batch, k + 1, vocab, generator=gen)).to(dtype)
    logits[0, :, : vocab // 2] = float("-inf")  # masked logits (e.g. top-k filtered) are fine
    if draft_mode == "probs":
        probs = torch.softmax(torch.randn(batch, k, vocab, generator=gen), -1)
        probs[1, :, 0] = 0.0  # a draft distribution with zeros
        draft = torch.multinomial(probs.reshape(-1, vocab), 1, generator=gen).view(batch, k)
        return draft, logits, probs.to(dtype)
    # deterministic drafts: the target's argmax half of the time, so long prefixes get accepted
    draft = torch.randint(0, vocab, (batch, k), generator=gen)
    draft = torch.where(torch.rand(batch, k, generator=gen) < 0.5, logits[:, :k].float().argmax(-1), draft)
    return draft, logits, None


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("draft_mode", ["deterministic", "probs"])
def test_sampling_matches_reference(k, draft_mode, kernel_backend):
    draft, logits, probs = _sampling_case(48, k, 37, seed=k, draft_mode=draft_mode)
    kwargs = dict(temperature=0.7, draft_probs=None if probs is None else probs.to(DEVICE))
    tokens, num_accepted = mtp_verify(draft.to(DEVICE), logits.to(DEVICE), generator=_generator(5),
                                      backend=kernel_backend, **kwargs)
    ref_tokens, ref_accepted = mtp_verify(draft.to(DEVICE), logits.to(DEVICE), generator=_generator(5),
                                          backend="torch", **kwargs)
    assert torch.equal(num_accepted, ref_accepted) and torch.equal(tokens, ref_tokens)
    assert 0 < num_accepted.float().mean() < k  # both acceptances and rejections happened
    assert (tokens[0][tokens[0] >= 0] >= 37 // 2).all()  # never a token of probability 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sampling_low_precision_matches_reference(dtype, kernel_backend):
    draft, logits, probs = _sampling_case(32, 3, 300, seed=1, draft_mode="probs", dtype=dtype)
    args = (draft.to(DEVICE), logits.to(DEVICE))
    kwargs = dict(temperature=1.3, draft_probs=probs.to(DEVICE))
    ours = mtp_verify(*args, generator=_generator(2), backend=kernel_backend, **kwargs)
    ref = mtp_verify(*args, generator=_generator(2), backend="torch", **kwargs)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


# NaN and infinities when sampling (the reference's rules, which the kernels follow): a row whose
# softmax is undefined (a NaN logit, a +inf one, one that overflows at this temperature, or all
# -inf) gives q = NaN everywhere, so its draft is rejected and, with nothing to draw from, the
# final token is the argmax of its raw logits (torch.argmax's ranking, as greedy). A NaN draft
# probability rejects its draft (u * NaN < q is false) and gives its id no weight in the
# correction max(q - p, 0).


def _verify_with_uniforms(backend, draft, logits, probs, uniforms, temperature, num_splits=1):
    """The custom op with explicit uniforms (the public function draws them)."""
    return torch.ops.thinkfuse.mtp_verify(draft.to(DEVICE), logits.to(DEVICE),
                                          None if probs is None else probs.to(DEVICE), uniforms.to(DEVICE),
                                          temperature, backend, num_splits)


def _splits(backend):
    return [1, 0, 7] if backend == "cuda" else [1]


# (the Triton interpreter computes inf - inf and 3e38 / 0.5 with numpy, which warns)
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
@pytest.mark.parametrize("draft_mode", ["deterministic", "probs"])
def test_sampling_undefined_softmax_rows_emit_the_argmax(draft_mode, backend):
    vocab, k, temperature = 5000, 2, 0.5
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(5, k + 1, vocab, generator=gen)
    logits[0, 0, [10, 40, 4500]] = torch.tensor([_INF, _NAN, _NAN])  # rejected at 0: emits 40
    logits[1, 1, [7, 4000]] = _INF  # accepted at 0, rejected at 1: emits 7
    logits[2, 2, [4500, 200]] = _NAN  # both accepted, bonus 200
    logits[3, 0, 12] = 3e38  # finite, but +inf once divided by the temperature: emits 12
    logits[4, 0] = -_INF  # all -inf: emits 0
    # the argmax, which a row of undefined softmax rejects all the same
    draft = logits[:, :k].argmax(-1)
    probs = None
    if draft_mode == "probs":
        probs = torch.softmax(torch.randn(5, k, vocab, generator=gen), -1)
    uniforms = torch.rand(5, k + 1, generator=gen)
    uniforms[:, :k] = 0.0  # accept every draft whose q is positive
    expected_accepted = [0, 1, 2, 0, 0]
    expected_final = [40, 7, 200, 12, 0]
    for num_splits in _splits(backend):
        tokens, num_accepted = _verify_with_uniforms(backend, draft, logits, probs, uniforms, temperature, num_splits)
        assert num_accepted.tolist() == expected_accepted, num_splits
        assert [tokens[r, n].item() for r, n in enumerate(expected_accepted)] == expected_final, num_splits
        ref = reference.mtp_verify(draft, logits, temperature, probs, uniforms)
        assert torch.equal(tokens.cpu(), ref[0]) and torch.equal(num_accepted.cpu(), ref[1])


def test_sampling_nan_draft_probabilities(backend):
    """Row 0: NaN at the draft id (rejected even with u = 0). Row 1: NaN on half the ids, draft
    rejected: the correction is never one of them. Row 2: all NaN (draft rejected, nothing to draw
    from): the argmax."""
    vocab, k, temperature = 300, 1, 1.0
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, k + 1, vocab, generator=gen)
    probs = torch.softmax(torch.randn(3, k, vocab, generator=gen), -1)
    draft = logits[:, :k].argmax(-1)
    probs[0, 0, draft[0, 0]] = _NAN
    nan_ids = torch.arange(1, vocab, 2)
    probs[1, 0, nan_ids] = _NAN
    draft[1, 0] = 0
    probs[1, 0, 0] = 1.0  # u * 1 >= q(0) for the u below: rejected
    probs[2] = _NAN
    for seed in range(4):
        uniforms = torch.rand(3, k + 1, generator=torch.Generator().manual_seed(seed))
        uniforms[0, 0] = 0.0
        uniforms[1, 0] = 0.999
        for num_splits in _splits(backend):
            tokens, num_accepted = _verify_with_uniforms(backend, draft, logits, probs, uniforms, temperature,
                                                         num_splits)
            assert num_accepted.tolist() == [0, 0, 0]
            assert tokens[1, 0].item() not in nan_ids.tolist()
            assert tokens[2, 0].item() == logits[2, 0].argmax().item()
            ref = reference.mtp_verify(draft, logits, temperature, probs, uniforms)
            assert torch.equal(tokens.cpu(), ref[0]) and torch.equal(num_accepted.cpu(), ref[1])


def _assert_inverse_cdf_draw(token, weights, u, eps=1e-5):
    """``token`` is the inverse-CDF draw of ``u`` over ``weights`` (float64, in id order), up to
    ``eps`` of rounding in where the kernel's cumulative sums put the boundaries."""
    cdf = torch.cumsum(weights.double(), 0)
    cdf = cdf / cdf[-1]
    low = cdf[token - 1].item() if token > 0 else 0.0
    assert weights[token] > 0 and low - eps <= u <= cdf[token].item() + eps, (token, u, low, cdf[token].item())


def test_sampling_on_a_152k_vocabulary(backend):
    """At MiMo's vocabulary (151680, bf16 logits; the kernels walk it in many blocks), every
    backend emits the right token: accepted drafts, then the bonus drawn from q (row 0), the
    correction drawn from q without the rejected draft (row 1, rejected at 1; row 2, at 0)."""
    vocab, k, temperature = 151680, 2, 0.8
    gen = torch.Generator().manual_seed(4)
    logits = (2 * torch.randn(3, k + 1, vocab, generator=gen)).bfloat16()
    draft = logits[:, :k].float().argmax(-1)  # q(draft) > 0: accepted when its uniform is 0
    q = torch.softmax(logits.double() / temperature, -1)
    for final_u in (0.03, 0.5, 0.97):
        uniforms = torch.tensor([[0.0, 0.0, final_u], [0.0, 0.999, final_u], [0.999, 0.0, final_u]])
        tokens, num_accepted = _verify_with_uniforms(backend, draft, logits, None, uniforms, temperature)
        tokens, num_accepted = tokens.cpu(), num_accepted.cpu()
        assert num_accepted.tolist() == [2, 1, 0]
        for row, n in enumerate(num_accepted.tolist()):
            assert tokens[row, :n].tolist() == draft[row, :n].tolist() and (tokens[row, n + 1:] == -1).all()
            weights = q[row, n].clone()
            if n < k:
                weights[draft[row, n]] = 0.0  # deterministic draft rejected: q without it
            _assert_inverse_cdf_draw(tokens[row, n].item(), weights, final_u)


def test_generator_makes_sampling_reproducible(backend):
    draft, logits, _ = _sampling_case(16, 2, 20, seed=0, draft_mode="deterministic")
    first = mtp_verify(draft.to(DEVICE), logits.to(DEVICE), temperature=1.0, generator=_generator(9), backend=backend)
    again = mtp_verify(draft.to(DEVICE), logits.to(DEVICE), temperature=1.0, generator=_generator(9), backend=backend)
    assert torch.equal(first[0], again[0])


# A temperature past float32's range (finite as a Python float) is +inf in the kernels' float32
# arithmetic: every finite logit / T is 0 (a uniform distribution), as in the reference. The
# Triton kernel pads a vocabulary that is not a multiple of its block with -inf; -inf / inf is
# NaN, which once made every such row look undefined (the argmax emitted, drafts rejected).
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the interpreter's numpy casts
@pytest.mark.parametrize("temperature", [1e300, 3.5e38])
def test_sampling_at_a_temperature_past_float32_range(temperature, backend):
    vocab, k = 37, 2  # not a power of two: the kernels' last vocabulary block is padded
    gen = torch.Generator().manual_seed(8)
    logits = 3 * torch.randn(4, k + 1, vocab, generator=gen)
    draft = logits[:, :k].argmax(-1)
    uniforms = torch.rand(4, k + 1, generator=gen)
    uniforms[0, 0] = 0.0  # u * 1 < q = 1/V: row 0 accepts its first draft
    tokens, num_accepted = _verify_with_uniforms(backend, draft, logits, None, uniforms, temperature)
    ref = reference.mtp_verify(draft, logits, temperature, None, uniforms)
    assert num_accepted[0].item() >= 1
    assert torch.equal(tokens.cpu(), ref[0]) and torch.equal(num_accepted.cpu(), ref[1])


# Shape-only runs (meta tensors: memory planners, FLOP counters) give the outputs' shapes on
# every path; the reference's sampled path with a deterministic draft indexes with a data-dependent
# mask, which meta tensors cannot run.
@pytest.mark.parametrize("temperature, with_probs", [(0.0, False), (0.8, False), (0.8, True)])
def test_meta_tensors_give_shapes(temperature, with_probs, backend):
    meta = dict(device="meta")
    draft, logits = torch.empty(3, 2, dtype=torch.int32, **meta), torch.empty(3, 3, 11, **meta)
    probs = torch.empty(3, 2, 11, **meta) if with_probs else None
    tokens, num_accepted = mtp_verify(draft, logits, temperature=temperature, draft_probs=probs, backend=backend)
    assert tokens.shape == (3, 3) and num_accepted.shape == (3,)
    assert tokens.device.type == num_accepted.device.type == "meta"
    assert tokens.dtype == num_accepted.dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# The emitted tokens follow softmax(target / temperature): chi-square at every position


def _chi_square_p_value(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of `tokens` against the distribution `probs`."""
    observed = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor(probs.numel() - 1.0, dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, stat / 2).item()


def _distribution_case(rows, draft_mode, seed=0, draft_distribution=None):
    """The same target logits (V=8, K=2) in every row; drafts drawn per row."""
    vocab, k, temperature = 8, 2, 0.8
    gen = torch.Generator().manual_seed(seed)
    target = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5, 0.2, -0.5],
                           [0.0, 0.3, 2.5, 1.0, 0.0, -2.0, 0.7, 1.2],
                           [1.0, 1.0, 1.0, 0.0, 3.0, -1.0, 0.0, 0.5]])
    q = torch.softmax(target / temperature, dim=-1)
    logits = target.expand(rows, k + 1, vocab).contiguous()
    if draft_mode == "probs":
        p = torch.softmax(torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0, 0.0, -1.0, 0.5],
                                        [1.0, 0.0, 1.5, 0.0, 0.5, 0.0, 0.0, 2.0]]), dim=-1)
        draft = torch.stack([torch.multinomial(p[j], rows, replacement=True, generator=gen) for j in range(k)], 1)
        stated = p if draft_distribution is None else draft_distribution
        return draft, logits, stated.expand(rows, k, vocab).contiguous(), q, temperature
    # deterministic drafts: any rule independent of the verifier's randomness is exact. Mostly
    # the target's mode, so that all K drafts are often accepted and the bonus is well sampled.
    draft = torch.randint(0, vocab, (rows, k), generator=gen)
    draft = torch.where(torch.rand(rows, k, generator=gen) < 0.7, q[:k].argmax(-1), draft)
    return draft, logits, None, q, temperature


def _position_p_values(tokens, num_accepted, q):
    """Per position j: the p-value of the tokens emitted at j (rows that got that far)."""
    return [_chi_square_p_value(tokens[num_accepted >= j, j], q[j]) for j in range(tokens.shape[1])]


@pytest.mark.parametrize("draft_mode", ["deterministic", "probs"])
def test_sampled_tokens_follow_the_target_distribution(draft_mode):
    draft, logits, probs, q, temperature = _distribution_case(100_000, draft_mode)
    tokens, num_accepted = mtp_verify(draft, logits, temperature=temperature, draft_probs=probs,
                                      generator=torch.Generator().manual_seed(1), backend="torch")
    assert (num_accepted == 2).sum() > 5_000  # the bonus position is well sampled too
    p_values = _position_p_values(tokens, num_accepted, q)
    assert min(p_values) > 1e-3, p_values


def test_chi_square_detects_a_wrong_draft_distribution():
    """The test has power: stating the wrong draft distribution skews the emitted tokens."""
    uniform = torch.full((2, 8), 1 / 8)
    draft, logits, probs, q, temperature = _distribution_case(100_000, "probs", draft_distribution=uniform)
    tokens, num_accepted = mtp_verify(draft, logits, temperature=temperature, draft_probs=probs,
                                      generator=torch.Generator().manual_seed(1), backend="torch")
    assert min(_position_p_values(tokens, num_accepted, q)) < 1e-6


# The Triton interpreter runs about 15 ms per row here: on CPU a small sample of the mode with the
# most kernel logic (the exact match with the reference above carries the rest).
_KERNEL_DRAFT_MODES = ["deterministic", "probs"] if DEVICE.type == "cuda" else ["probs"]


@pytest.mark.parametrize("draft_mode", _KERNEL_DRAFT_MODES)
def test_kernel_sampled_tokens_follow_the_target_distribution(draft_mode, kernel_backend):
    rows = 400 if DEVICE.type == "cpu" else 100_000
    draft, logits, probs, q, temperature = _distribution_case(rows, draft_mode, seed=2)
    tokens, num_accepted = mtp_verify(draft.to(DEVICE), logits.to(DEVICE), temperature=temperature,
                                      draft_probs=None if probs is None else probs.to(DEVICE),
                                      generator=_generator(3), backend=kernel_backend)
    p_values = _position_p_values(tokens.cpu(), num_accepted.cpu(), q)
    assert min(p_values) > 1e-3, p_values


# ---------------------------------------------------------------------------------------------
# num_splits: the cuda kernel's work split (1: one block per row, >= 2: vocabulary slices, <= 0:
# heuristic); other backends ignore it. Tokens do not depend on it (greedy: exactly; sampling: up
# to float32 summation order, which these cases do not reach).


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_num_splits_does_not_change_tokens(temperature, backend):
    draft, logits, probs = _sampling_case(12, 3, 300, seed=6, draft_mode="probs")
    args = (draft.to(DEVICE), logits.to(DEVICE))
    kwargs = dict(temperature=temperature, draft_probs=probs.to(DEVICE), backend=backend)
    expected = mtp_verify(*args, generator=_generator(4), **kwargs)
    for num_splits in (1, 0, -2, 2, 7, 1024):
        ours = mtp_verify(*args, generator=_generator(4), num_splits=num_splits, **kwargs)
        assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1]), num_splits


# ---------------------------------------------------------------------------------------------
# Bad inputs


def test_out_of_range_drafts_are_rejected_without_a_check():
    """What happens on GPU tensors, where no eager check runs: the kernels (and the reference)
    reject an out-of-range draft and never read out of bounds."""
    logits = _logits_with_argmax([[3, 4, 5], [3, 4, 5]], vocab=10).cpu()
    draft = torch.tensor([[3, 10], [-1, 4]])
    expected = ([[3, 4, -1], [3, -1, -1]], [1, 0])
    ref = reference.mtp_verify(draft, logits)
    assert (ref[0].tolist(), ref[1].tolist()) == expected
    uniforms = torch.zeros(2, 3)  # u = 0 would accept anything with q > 0
    ref = reference.mtp_verify(draft, logits, 1.0, None, uniforms)
    assert ref[1].tolist() == [1, 0]
    if "triton" in KERNEL_BACKENDS:
        from thinkfuse.kernels import mtp_verify as kernels

        ours = kernels.mtp_verify(draft.to(DEVICE), logits.to(DEVICE), None, None, 0.0)
        assert (ours[0].tolist(), ours[1].tolist()) == expected
        ours = kernels.mtp_verify(draft.to(DEVICE), logits.to(DEVICE), None, uniforms.to(DEVICE), 1.0)
        assert ours[1].tolist() == [1, 0]


def test_a_draft_of_target_probability_zero_is_rejected_even_at_u_0():
    """Acceptance is strict, u * p(x) < q(x): a draft the target gives probability 0 (a -inf
    logit, e.g. a masked id) is rejected even by u = 0, with or without draft probabilities,
    and the token drawn instead is never that id."""
    gen = _generator(3)
    logits = torch.randn(2, 3, 12, generator=gen)
    logits[:, 0, 5] = -float("inf")
    draft = torch.tensor([[5, 1], [5, 2]])
    uniforms = torch.zeros(2, 3)
    probs = torch.softmax(torch.randn(2, 2, 12, generator=gen), -1)
    for draft_probs in (None, probs):
        ref = reference.mtp_verify(draft, logits, 1.0, draft_probs, uniforms)
        assert ref[1].tolist() == [0, 0] and (ref[0][:, 0] != 5).all()
        if "triton" in KERNEL_BACKENDS:
            from thinkfuse.kernels import mtp_verify as kernels

            ours = kernels.mtp_verify(draft.to(DEVICE), logits.to(DEVICE),
                                      None if draft_probs is None else draft_probs.to(DEVICE),
                                      uniforms.to(DEVICE), 1.0)
            assert torch.equal(ours[0].cpu(), ref[0]) and torch.equal(ours[1].cpu(), ref[1])


def test_a_draw_past_the_rounded_total_takes_the_last_id_of_positive_weight():
    """u = 1 puts the draw's threshold at the total weight, where no running sum exceeds it (as
    rounding can leave it): the token is the last id of positive weight, not the argmax."""
    logits = torch.zeros(1, 2, 8)
    logits[0, 1, 1:7] = -float("inf")  # the bonus row: weights [1, 0, ..., 0, 1], argmax 0
    draft = torch.tensor([[0]])
    uniforms = torch.tensor([[0.0, 1.0]])
    ref = reference.mtp_verify(draft, logits, 1.0, None, uniforms)
    assert ref[0].tolist() == [[0, 7]] and ref[1].tolist() == [1]
    if "triton" in KERNEL_BACKENDS:
        from thinkfuse.kernels import mtp_verify as kernels

        ours = kernels.mtp_verify(draft.to(DEVICE), logits.to(DEVICE), None, uniforms.to(DEVICE), 1.0)
        assert ours[0].tolist() == [[0, 7]] and ours[1].tolist() == [1]


def _good_args():
    return torch.tensor([[1, 2]]), torch.randn(1, 3, 8)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda d, l: (torch.tensor([[1, 8]]), l), ValueError, r"draft_tokens must be in \[0, 8\).*8"),
        (lambda d, l: (torch.tensor([[-1, 2]]), l), ValueError, r"draft_tokens must be in \[0, 8\).*-1"),
        (lambda d, l: (d.float(), l), TypeError, "draft_tokens must have dtype"),
        (lambda d, l: (d[0], l), ValueError, "draft_tokens must be 2-D"),
        (lambda d, l: (d, l.long()), TypeError, "target_logits must have dtype"),
        (lambda d, l: (d, l[0]), ValueError, "target_logits must be 3-D"),
        (lambda d, l: (d, l[:, :2]), ValueError, r"target_logits must be \[B, K\+1, V\]"),
        (lambda d, l: (d, torch.cat([l, l])), ValueError, r"target_logits must be \[B, K\+1, V\]"),
        (lambda d, l: (d, l[..., :0]), ValueError, "non-empty vocabulary"),
        (lambda d, l: ("12", l), TypeError, "draft_tokens must be a torch.Tensor"),
    ],
)
def test_bad_inputs(change, error, match):
    draft, logits = change(*_good_args())
    with pytest.raises(error, match=match):
        mtp_verify(draft, logits)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(temperature=-0.5), ValueError, "temperature must be >= 0"),
        (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
        (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
        (dict(temperature="1"), TypeError, "temperature must be a float"),
        (dict(temperature=10**400), ValueError, "temperature must be finite"),  # float() overflows
        (dict(temperature=1.0, draft_probs=torch.rand(1, 3, 8)), ValueError, r"draft_probs must be \[B, K, V\]"),
        (dict(temperature=1.0, draft_probs=torch.rand(1, 2, 7)), ValueError, r"draft_probs must be \[B, K, V\]"),
        (dict(temperature=1.0, draft_probs=torch.ones(1, 2, 8, dtype=torch.long)), TypeError, "draft_probs must have"),
        (dict(temperature=1.0, generator=1), TypeError, "generator must be a torch.Generator"),
        (dict(backend="nope"), ValueError, "backend must be one of"),
        (dict(num_splits=1.5), TypeError, "num_splits must be an int"),
        (dict(num_splits=True), TypeError, "num_splits must be an int"),
        (dict(num_splits="2"), TypeError, "num_splits must be an int"),
        (dict(num_splits=1025), ValueError, "num_splits must be <= 1024"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        mtp_verify(*_good_args(), **kwargs)


def test_cuda_backend_on_cpu_tensors_is_refused():
    if "cuda" in thinkfuse.available_backends():
        with pytest.raises(ValueError, match="CUDA tensors"):
            mtp_verify(*_good_args(), backend="cuda")
    else:
        with pytest.raises(thinkfuse.BackendUnavailable):
            mtp_verify(*_good_args(), backend="cuda")


# ---------------------------------------------------------------------------------------------
# torch.compile and the real Triton compiler


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_torch_compile_fullgraph(temperature, kernel_backend):
    draft, logits, _ = _sampling_case(4, 2, 16, seed=0, draft_mode="deterministic")
    draft, logits = draft.to(DEVICE), logits.to(DEVICE)

    def verify(d, l):
        # dynamo cannot trace torch.rand with an explicit generator: the global RNG it is
        return mtp_verify(d, l, temperature=temperature, backend=kernel_backend)

    compiled = torch.compile(verify, backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    ours = compiled(draft, logits)
    torch.manual_seed(0)
    expected = verify(draft, logits)
    assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1])


_COMPILE_SCRIPT = (
    """
    from thinkfuse.kernels import mtp_verify as mv

    compile_ptx(mv._greedy_verify_kernel, ["*i64", "*bf16", "*i64", "*i64"] + ["i64"] * 2 + ["i32"] * 2,
                {"BLOCK_K": 4, "BLOCK_V": 4096})
    for has_probs in (False, True):
        compile_ptx(mv._sampled_verify_kernel,
                    ["*i64", "*bf16", "*bf16", "*fp32", "*i64", "*i64"] + ["i64"] * 4 + ["i32"] * 2 + ["fp32"],
                    {"HAS_DRAFT_PROBS": has_probs, "BLOCK_K": 8, "BLOCK_V": 4096})
    print("compiled")
    """
)


def test_kernels_compile_for_sm90():
    """The interpreter cannot catch what only the compiler rejects (types across branches of the
    loops' scalar ifs); compiling to PTX needs no device."""
    compile_in_subprocess(_COMPILE_SCRIPT)


def test_reference_samples_a_deterministic_draft_without_data_dependent_shapes():
    """The rejected draft is removed by a comparison, not by indexing with a mask: the reference
    runs on meta tensors (shape-only forwards) and traces whole under torch.compile."""
    gen = torch.Generator().manual_seed(3)
    draft = torch.randint(0, 13, (4, 2), generator=gen)
    logits = torch.randn(4, 3, 13, generator=gen)
    uniforms = torch.rand(4, 3, generator=gen)
    tokens, accepted = reference.mtp_verify(draft.to("meta"), logits.to("meta"), 0.7, None, uniforms.to("meta"))
    assert tokens.shape == (4, 3) and accepted.shape == (4,)
    verify = functools.partial(reference.mtp_verify, temperature=0.7, uniforms=uniforms)
    compiled = torch.compile(verify, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(draft, logits), verify(draft, logits)):
        assert torch.equal(got, want)


def test_numpy_scalar_temperatures_are_taken():
    """A temperature read from a numpy config (np.float32 / np.float64): as the Python float."""
    import numpy as np

    draft, logits = _good_args()[:2]
    for temperature in (np.float32(0.0), np.float64(0.0)):
        tokens, accepted = mtp_verify(draft, logits, temperature=temperature)
        want_tokens, want_accepted = mtp_verify(draft, logits, temperature=0.0)
        assert torch.equal(tokens, want_tokens) and torch.equal(accepted, want_accepted)


def test_a_generator_must_be_on_the_logits_device_index_included():
    from thinkfuse._checks import same_generator_device as _same_device

    cuda = lambda index=None: torch.device("cuda", index)  # noqa: E731
    assert _same_device(torch.device("cpu"), torch.device("cpu"))
    assert _same_device(cuda(0), cuda(0)) and _same_device(cuda(), cuda(1)) and _same_device(cuda(1), cuda())
    assert not _same_device(cuda(0), cuda(1))
    assert not _same_device(torch.device("cpu"), cuda(0))
