"""thinkfuse.ops.token_logprobs: every backend against reference.py and a float64 truth, large
vocabularies, temperature, entropy, ignored and out-of-range ids, strided logits, bad inputs,
custom-op registration and torch.compile."""

import pytest
import torch
from conftest import DEVICE, backends_with
from tolerances import assert_close_fp32, assert_low_precision_ok, assert_no_scale_bias

import thinkfuse
from thinkfuse import reference
from thinkfuse.ops import token_logprobs

CUDA_OP = "token_logprobs_fwd"  # the cuda backend runs only where the extension has this kernel
KERNEL_BACKENDS = [b for b in backends_with(CUDA_OP) if b != "torch"]

IGNORED = -100


def _inputs(shape, n_vocab, dtype=torch.float32, seed=0, scale=3.0):
    """Logits [*shape, V] and ids [*shape] with one ignored position."""
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(*shape, n_vocab, generator=gen)).to(DEVICE, dtype)
    ids = torch.randint(0, n_vocab, shape, generator=gen)
    ids.view(-1)[min(1, ids.numel() - 1)] = IGNORED
    return logits, ids.to(DEVICE)


def _run(fn, logits, ids, return_entropy, seed=1):
    """Outputs and d/dlogits of a fixed random projection of them."""
    leaf = logits.detach().clone().requires_grad_()
    outs = fn(leaf, ids)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen).to(o.device, torch.float64)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs] + [leaf.grad]


def _ours(backend, temperature, return_entropy):
    return lambda x, ids: token_logprobs(x, ids, temperature=temperature, return_entropy=return_entropy,
                                         backend=backend)


def _reference(temperature, return_entropy):
    return lambda x, ids: reference.token_logprobs(x, ids, temperature, return_entropy)


def _truth(temperature, return_entropy):
    """float64 log-probs/entropy of the same logits values (the reference keeps float64)."""
    return lambda x, ids: reference.token_logprobs(x.double(), ids, temperature, return_entropy)


# --- reference.py ---------------------------------------------------------------------------------


def test_reference_is_log_softmax_gather():
    logits, ids = _inputs((4,), 50)
    ids[1] = 7
    expected = torch.log_softmax(logits / 0.5, dim=-1).gather(-1, ids[:, None]).squeeze(-1)
    torch.testing.assert_close(reference.token_logprobs(logits, ids, 0.5), expected)


# --- every backend against the reference ---------------------------------------------------------


@pytest.mark.parametrize("n_vocab", [1001, 4099])
@pytest.mark.parametrize("temperature,return_entropy", [(1.0, False), (0.7, True), (1.3, False), (1.0, True)])
def test_fp32_matches_reference(backend, n_vocab, temperature, return_entropy):
    logits, ids = _inputs((2, 3), n_vocab)
    ours = _run(_ours(backend, temperature, return_entropy), logits, ids, return_entropy)
    ref = _run(_reference(temperature, return_entropy), logits, ids, return_entropy)
    for o, r in zip(ours, ref):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert_close_fp32(o, r, tol=1e-4)


@pytest.mark.parametrize("n_vocab", [151936, 131072])
def test_model_vocab_sizes(backend, n_vocab):
    """Qwen2/MiMo (151936) and Ministral 3 (131072) vocabularies, a few tokens."""
    logits, ids = _inputs((3,), n_vocab, seed=n_vocab)
    ids[0] = n_vocab - 1  # the last column
    ours = _run(_ours(backend, 0.9, True), logits, ids, True)
    ref = _run(_reference(0.9, True), logits, ids, True)
    for o, r in zip(ours, ref):
        assert_close_fp32(o, r, tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_vs_float64_truth(backend, dtype):
    logits, ids = _inputs((2, 4), 997, dtype)
    ours = _run(_ours(backend, 0.8, True), logits, ids, True)
    ref = _run(_reference(0.8, True), logits, ids, True)
    truth = _run(_truth(0.8, True), logits.double(), ids, True)  # same values, float64 throughout
    for o, r, t in zip(ours, ref, truth):
        if o.dtype == torch.float32:  # log-probs and entropy: float32 results of low-precision inputs
            assert_close_fp32(o, t, tol=1e-4)
        else:
            assert_low_precision_ok(o, r, t)
            assert_no_scale_bias(o, t)
    assert ours[0].dtype == torch.float32 and ours[2].dtype == dtype, "float32 log-probs, gradient in logits' dtype"


def test_ignored_ids_give_zero_and_no_gradient(backend):
    logits, ids = _inputs((6,), 300)
    ids[::2], ids[1::2] = IGNORED, 5
    logprobs, entropy, grad = _run(_ours(backend, 1.0, True), logits, ids, True)
    assert torch.all(logprobs[::2] == 0) and torch.all(entropy[::2] == 0)
    assert torch.all(grad[::2] == 0)
    assert torch.all(grad[1::2].abs().sum(-1) > 0)


def test_ignored_rows_of_all_minus_inf_give_zero_and_no_gradient(backend):
    """An ignored row has no distribution to speak of (padding may carry -inf logits): outputs 0
    and a zero gradient, not the NaN of softmax over nothing, on every backend and the reference."""
    logits, ids = _inputs((4,), 100)
    logits[1] = float("-inf")
    ids[1], ids[0] = IGNORED, 7
    for fn in (_ours(backend, 1.0, True), _reference(1.0, True)):
        logprobs, entropy, grad = _run(fn, logits, ids, True)
        assert logprobs[1] == 0 and entropy[1] == 0 and not grad[1].any()
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("return_entropy", [False, True])
def test_ignored_rows_holding_nan_or_inf_give_zero_and_no_gradient(backend, return_entropy):
    """Whatever an ignored row holds (NaN or +inf logits from a padded position's garbage hidden
    state), it gives 0 and a zero gradient, as in the reference; the scored rows are untouched."""
    logits, ids = _inputs((5,), 40)
    logits[0, 3] = float("nan")
    logits[1] = float("nan")
    logits[2, 7] = float("inf")
    logits[3, :5] = float("inf")
    ids[:4], ids[4] = IGNORED, 9
    results = [_run(fn, logits, ids, return_entropy)
               for fn in (_ours(backend, 0.8, return_entropy), _reference(0.8, return_entropy))]
    for *outs, grad in results:
        assert all(torch.all(o[:4] == 0) for o in outs)
        assert torch.all(grad[:4] == 0) and torch.isfinite(grad).all()
    for ours, ref in zip(*results):
        assert_close_fp32(ours, ref)


def test_scored_rows_of_all_minus_inf_give_nan_logprob_and_zero_entropy(backend):
    """A scored row with no finite logit has no distribution: every backend and the reference
    say so with a NaN log-prob (and entropy 0, the kernels' convention for an empty sum)."""
    logits, ids = _inputs((3,), 50)
    logits[2] = float("-inf")
    ids[2] = 4
    for fn in (_ours(backend, 1.0, True), _reference(1.0, True)):
        logprobs, entropy = fn(logits, ids)
        assert torch.isnan(logprobs[2]) and entropy[2] == 0
        assert torch.isfinite(logprobs[:2]).all() and torch.isfinite(entropy[:2]).all()


def test_a_nan_logit_gives_a_nan_logprob(backend):
    """A NaN anywhere in a row (a diverged model) must show: its log-prob and entropy are NaN on
    every backend, as in the reference. The kernels' running max skips NaN; their sum must not
    read as an empty row."""
    logits, ids = _inputs((3,), 600)
    ids[0], ids[2] = 5, 7
    logits[0, 300] = float("nan")  # not the target, in a later block than it
    for fn in (_ours(backend, 1.0, True), _reference(1.0, True)):
        logprobs, entropy = fn(logits, ids)
        assert torch.isnan(logprobs[0]) and torch.isnan(entropy[0])
        assert torch.isfinite(logprobs[2]) and torch.isfinite(entropy[2])


@pytest.mark.parametrize("target_is_the_inf", [False, True])
def test_a_plus_inf_logit_gives_a_nan_logprob_and_gradient(backend, target_is_the_inf):
    """An overflowed logit (+inf, e.g. float16 lm_head output of a diverging model) leaves no
    distribution: log_softmax makes the row NaN, and so must every backend. torch.logsumexp
    returns +inf for such a row, which once turned the log-prob into -inf (finite loss terms,
    e.g. a GRPO ratio of 0) and the gradient into a finite onehot push: divergence hidden."""
    logits, ids = _inputs((3,), 600)
    ids[0], ids[1], ids[2] = 5, 9, 7
    logits[1, 5 if target_is_the_inf else 300] = float("inf")
    for fn in (_ours(backend, 0.9, True), _reference(0.9, True)):
        logprobs, entropy, grad = _run(fn, logits, ids, True)
        assert torch.isnan(logprobs[1]) and torch.isnan(entropy[1])
        assert torch.isnan(grad[1]).all()
        assert torch.isfinite(logprobs[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()


def test_all_ignored(backend):
    logits, _ = _inputs((3,), 64)
    ids = torch.full((3,), -1, device=DEVICE)
    logprobs, entropy, grad = _run(_ours(backend, 1.0, True), logits, ids, True)
    assert not logprobs.any() and not entropy.any() and not grad.any()


def test_masked_vocab_entries_are_minus_inf(backend):
    """-inf logits (a vocabulary mask) are legal: no NaN, zero probability, zero gradient there."""
    logits, ids = _inputs((4,), 500)
    logits[:, 100:300] = float("-inf")
    logits[2, :] = float("-inf")
    logits[2, 7] = 0.0
    ids[2], ids[0] = 7, 42
    ours = _run(_ours(backend, 1.0, True), logits, ids, True)
    ref = _run(_reference(1.0, True), logits, ids, True)
    for o, r in zip(ours, ref):
        assert_close_fp32(o, r, tol=1e-4)
    assert torch.all(ours[2][:, 100:300] == 0)


def _strided_logits():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(2, 6, 301, generator=gen)
    yield "causal-slice", base[:, :-1]  # read in place: strides (6*301, 301, 1)
    yield "transposed", base.transpose(0, 1)
    yield "every-other-vocab-entry", base[..., ::2]  # unit stride on V lost: copied
    yield "4-d", base.view(2, 2, 3, 301)


@pytest.mark.parametrize("case", list(_strided_logits()), ids=lambda c: c[0])
def test_strided_logits(backend, case):
    _, logits = case
    logits = logits.to(DEVICE)
    ids = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=torch.Generator().manual_seed(0))
    ids = ids.to(DEVICE)
    before = logits.clone()
    ours = _run(_ours(backend, 1.0, True), logits, ids, True)
    ref = _run(_reference(1.0, True), logits, ids, True)
    assert torch.equal(logits, before), "token_logprobs wrote into its input"
    for o, r in zip(ours, ref):
        assert o.shape == r.shape
        assert_close_fp32(o, r, tol=1e-4)


def test_slice_of_logits_gets_gradient_through_the_view(backend):
    full = torch.randn(2, 5, 80, device=DEVICE, requires_grad=True)
    ids = torch.randint(0, 80, (2, 4), device=DEVICE)
    token_logprobs(full[:, :-1], ids, backend=backend).sum().backward()
    ours = full.grad.clone()
    full.grad = None
    reference.token_logprobs(full[:, :-1], ids).sum().backward()
    assert_close_fp32(ours, full.grad)
    assert not ours[:, -1].any()


def test_entropy_only_gradient(backend):
    logits, ids = _inputs((3,), 200)
    x = logits.clone().requires_grad_()
    token_logprobs(x, ids, return_entropy=True, backend=backend)[1].sum().backward()
    y = logits.clone().requires_grad_()
    reference.token_logprobs(y, ids, 1.0, True)[1].sum().backward()
    assert_close_fp32(x.grad, y.grad, tol=1e-4)


SECOND_DERIVATIVE_REFUSED = "no second derivative|no autograd formula"


@pytest.mark.parametrize("return_entropy", [False, True])
def test_second_derivative_raises_instead_of_being_wrong(backend, return_entropy):
    """The backward is a hand-written formula with no derivative of its own: a double backward
    (create_graph=True, Hessian-vector products) must refuse, not differentiate the formula's
    in-place float32 steps (which gave a wrong Hessian with the entropy, a confusing in-place
    error without it)."""
    logits, ids = _inputs((4,), 30)
    x = logits.clone().requires_grad_()
    outs = token_logprobs(x, ids, return_entropy=return_entropy, backend=backend)
    loss = sum(o.sum() for o in outs) if return_entropy else outs.sum()
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match=SECOND_DERIVATIVE_REFUSED):
        torch.autograd.grad(grad.pow(2).sum(), x)


def test_empty_and_int32_ids(backend):
    out = token_logprobs(torch.empty(0, 7, device=DEVICE), torch.empty(0, dtype=torch.long, device=DEVICE),
                         backend=backend)
    assert out.shape == (0,)
    logits, ids = _inputs((4,), 33)
    torch.testing.assert_close(token_logprobs(logits, ids.int(), backend=backend),
                               reference.token_logprobs(logits, ids), rtol=1e-5, atol=1e-5)


# --- out-of-range ids and bad inputs --------------------------------------------------------------


def test_out_of_range_id_raises_on_cpu(backend):
    logits, ids = _inputs((3,), 40)
    ids[2] = 40
    with pytest.raises(ValueError, match="token_ids must be < V = 40"):
        token_logprobs(logits.cpu(), ids.cpu(), backend=backend if backend != "cuda" else "torch")


@pytest.mark.parametrize("kb", KERNEL_BACKENDS)
def test_out_of_range_id_gives_nan_in_the_kernels(kb):
    """What GPU tensors get (no eager check there): the custom op called directly."""
    logits, ids = _inputs((3,), 40)
    ids[1] = 40  # == V: the first id past the vocabulary
    ids[2] = 45
    logprobs, _, _ = torch.ops.thinkfuse.token_logprobs_fwd(logits.unsqueeze(0), ids, 1.0, False, kb)
    assert torch.isnan(logprobs[1]) and torch.isnan(logprobs[2]) and torch.isfinite(logprobs[0])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(logits=[1.0]), TypeError, "logits must be a torch.Tensor"),
        (dict(logits=torch.ones(2, 8, dtype=torch.int32)), TypeError, "logits must have dtype"),
        (dict(logits=torch.ones(())), ValueError, "at least 1 dims"),
        (dict(logits=torch.ones(2, 0)), ValueError, "non-empty last dim"),
        (dict(token_ids=torch.zeros(2, dtype=torch.float32)), TypeError, "token_ids must have dtype"),
        (dict(token_ids=torch.zeros(3, dtype=torch.long)), ValueError, "token_ids shape"),
        (dict(token_ids=torch.zeros(2, 1, dtype=torch.long)), ValueError, "token_ids shape"),
        (dict(token_ids=torch.zeros(2, dtype=torch.long, device="meta")), ValueError, "token_ids is on meta"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0"),
        (dict(temperature=-1.0), ValueError, "temperature must be > 0"),
        (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
        (dict(temperature="1"), TypeError, "temperature must be a float"),
    ],
)
def test_bad_inputs_raise_before_any_kernel(backend, kwargs, error, match):
    args = dict(logits=torch.ones(2, 8), token_ids=torch.zeros(2, dtype=torch.long), temperature=1.0)
    args.update(kwargs)
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v)
            for k, v in args.items()}
    with pytest.raises(error, match=match):
        token_logprobs(args["logits"], args["token_ids"], temperature=args["temperature"], backend=backend)


# --- torch.library registration and torch.compile ------------------------------------------------


def _op_args(n_vocab=37):
    logits, ids = _inputs((2, 3), n_vocab)
    return logits, ids.reshape(-1)


def test_custom_ops_pass_opcheck(backend):
    logits, ids = _op_args()
    for return_entropy in (False, True):
        torch.library.opcheck(torch.ops.thinkfuse.token_logprobs_fwd.default,
                              (logits.clone().requires_grad_(), ids, 0.7, return_entropy, backend))
    _, entropy, lse = torch.ops.thinkfuse.token_logprobs_fwd(logits, ids, 0.7, True, "torch")
    grad = torch.randn(6, device=DEVICE)
    torch.library.opcheck(torch.ops.thinkfuse.token_logprobs_bwd.default,
                          (grad, grad * 0.5, logits, ids, lse, entropy, 0.7, backend))
    torch.library.opcheck(torch.ops.thinkfuse.token_logprobs_bwd.default,
                          (grad, None, logits, ids, lse, None, 0.7, backend))


def test_custom_ops_torch_forms_match_the_kernels(kernel_backend):
    logits, ids = _op_args(301)
    ours = torch.ops.thinkfuse.token_logprobs_fwd(logits, ids, 0.7, True, kernel_backend)
    ref = torch.ops.thinkfuse.token_logprobs_fwd(logits, ids, 0.7, True, "torch")
    for o, r in zip(ours, ref):
        assert_close_fp32(o, r, tol=1e-4)
    grad = torch.randn(6, device=DEVICE)
    args = (grad, grad * 0.5, logits, ids, ref[2], ref[1], 0.7)
    assert_close_fp32(torch.ops.thinkfuse.token_logprobs_bwd(*args, kernel_backend),
                      torch.ops.thinkfuse.token_logprobs_bwd(*args, "torch"), tol=1e-4)


@pytest.mark.parametrize("kb", KERNEL_BACKENDS)
def test_torch_compile_kernel_backend_fullgraph(kb):
    torch._dynamo.reset()
    logits, ids = _inputs((2, 3), 100)

    def fn(x):
        logprobs, entropy = token_logprobs(x[:, :-1], ids[:, :-1], temperature=0.9, return_entropy=True)
        return (logprobs * 2 + entropy).sum()

    with thinkfuse.use_backend(kb):
        x = logits.clone().requires_grad_()
        eager = fn(x)
        (eager_grad,) = torch.autograd.grad(eager, x)
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(x)
        (compiled_grad,) = torch.autograd.grad(compiled, x)
    assert_close_fp32(compiled, eager, tol=1e-4)
    assert_close_fp32(compiled_grad, eager_grad, tol=1e-4)


# --- the backward written in place (what the fused lm_head paths use) ----------------------------


def _backward_out_launcher(kb):
    from thinkfuse.ops._registry import implementation

    return implementation(kb, "logprobs", "token_logprobs_backward_out", "token_logprobs_bwd_out", None)


def _backward_args(n_vocab, dtype, with_entropy, seed=6):
    """(grad_logprobs, grad_entropy, logits [2, 5, V] contiguous, ids [10], lse, entropy)."""
    logits, ids = _inputs((2, 5), n_vocab, dtype, seed=seed)
    ids = ids.reshape(-1)
    lse = torch.logsumexp(logits.float().reshape(-1, n_vocab) / 0.8, dim=-1).contiguous()
    gen = torch.Generator().manual_seed(seed + 1)
    grad_lp = torch.randn(10, generator=gen).to(DEVICE)
    if not with_entropy:
        return grad_lp, None, logits, ids, lse, None
    entropy = torch.rand(10, generator=gen).to(DEVICE) * 3
    return grad_lp, torch.randn(10, generator=gen).to(DEVICE), logits, ids, lse, entropy


@pytest.mark.parametrize("kb", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("with_entropy", [False, True], ids=["logprob", "entropy"])
def test_backward_in_place_equals_out_of_place(kb, dtype, with_entropy):
    """d logits written over the logits themselves are the out-of-place kernel's, bit for bit
    (odd V: the element-wise tail too); the fused lm_head paths rely on this to hold one buffer
    per chunk."""
    grad_lp, grad_ent, logits, ids, lse, entropy = _backward_args(1001, dtype, with_entropy)
    expected = torch.empty_like(logits)
    _backward_out_launcher(kb)(grad_lp, grad_ent, logits, ids, lse, entropy, 0.8, expected)
    in_place = logits.clone()
    _backward_out_launcher(kb)(grad_lp, grad_ent, in_place, ids, lse, entropy, 0.8, in_place)
    assert torch.equal(in_place, expected)
    assert not torch.equal(expected, logits)  # the gradient, not the untouched input


@pytest.mark.parametrize("kb", KERNEL_BACKENDS)
def test_backward_out_rejects_partial_overlap_and_bad_buffers(kb):
    grad_lp, _, logits, ids, lse, _ = _backward_args(64, torch.float32, False)
    run = _backward_out_launcher(kb)
    storage = torch.zeros(2 * 5 * 64 + 1, device=DEVICE)
    shifted = storage[1:].view(2, 5, 64)
    with pytest.raises((ValueError, RuntimeError), match="overlap"):
        run(grad_lp, None, storage[:-1].view(2, 5, 64), ids, lse, None, 1.0, shifted)
    with pytest.raises((ValueError, RuntimeError), match="shape"):
        run(grad_lp, None, logits, ids, lse, None, 1.0, torch.empty(2, 5, 63, device=DEVICE))
    with pytest.raises((ValueError, TypeError, RuntimeError), match="dtype"):
        run(grad_lp, None, logits, ids, lse, None, 1.0, torch.empty_like(logits, dtype=torch.float16))
    with pytest.raises((ValueError, RuntimeError), match="contiguous"):
        run(grad_lp, None, logits, ids, lse, None, 1.0, torch.empty(5, 2, 64, device=DEVICE).transpose(0, 1))


@pytest.mark.parametrize("kb", KERNEL_BACKENDS)
def test_chunk_gradient_reuses_the_chunk_logits_buffer(kb):
    """The kernel reducer of the fused lm_head paths writes a chunk's d logits over its logits:
    no second [chunk, V] buffer."""
    from thinkfuse.ops.logprobs import kernel_reducer

    reducer = kernel_reducer(kb)
    logits, ids = _inputs((6,), 257, torch.float32, seed=7)
    expected_lp, _, lse = reducer.stats(logits.clone(), ids, 1.0, False)
    grad_lp = torch.ones_like(lse)
    reference_grad = torch.func.grad(lambda x: reference.token_logprobs(x, ids, 1.0, False).sum())(logits)
    grad = reducer.logits_grad(logits, ids, lse, None, grad_lp, None, 1.0)
    assert grad.data_ptr() == logits.data_ptr()
    assert_close_fp32(grad, reference_grad)


def test_return_entropy_must_be_a_bool():
    logits, ids = _inputs((3,), 40)
    with pytest.raises(TypeError, match="return_entropy"):
        token_logprobs(logits, ids, return_entropy="no")


@pytest.mark.parametrize("layout", ["contiguous", "sliced", "decode_rows"])
def test_torch_row_chunks_cover_every_row_once_and_span_batch_rows_when_they_can(layout):
    from thinkfuse.ops.logprobs import _row_chunks

    full = torch.randn(3, 7, 11)
    logits3 = {"contiguous": full, "sliced": full[:, :-1], "decode_rows": full[:, :1].contiguous()}[layout]
    chunks = list(_row_chunks(logits3, chunk_rows=4))
    rows = torch.cat([chunk for _, _, chunk in chunks])
    assert torch.equal(rows, logits3.reshape(-1, 11))
    assert [(s, e) for s, e, _ in chunks] == [(s, s + len(c)) for s, _, c in chunks]
    if layout != "sliced":  # flattened: the fewest chunks of at most 4 rows
        assert len(chunks) == -(-rows.shape[0] // 4)
