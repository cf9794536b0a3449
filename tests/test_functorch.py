"""torch.func through the kernel backends: grad / vjp / grad_and_value of every op with a gradient
give autograd's gradients (same backend) and the torch backend's; the transforms the kernels
run through the dispatcher's per-sample fallback (vmap, jacrev); what the kernels cannot take
(per-sample gradients, second derivatives) raises errors that name the op and the way out."""

from typing import Callable, NamedTuple

import pytest
import torch
from conftest import DEVICE
from tolerances import assert_close_fp32

import thinkfuse
from thinkfuse import ops


class Case(NamedTuple):
    """An op with a gradient: ``inputs(gen)`` gives the float32 tensors it is differentiated
    w.r.t.; ``run(backend, *inputs)`` calls it (other arguments fixed inside)."""

    inputs: Callable
    run: Callable
    cuda_op: str
    cuda_takes_float32: bool = True


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen).to(DEVICE)


def _token_ids(n_vocab, *shape):
    ids = torch.randint(0, n_vocab, shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ids.view(-1)[1] = -1  # a masked position: 0 and no gradient
    return ids


# Made here, outside any transform: vmap refuses random ops.
TOKEN_IDS_2x5, TOKEN_IDS_9 = _token_ids(37, 2, 5), _token_ids(37, 9)


def _positions(batch, seq):
    return (torch.arange(seq)[None, :] * 3 + torch.arange(batch)[:, None]).to(DEVICE)  # rows differ


def _rope(backend, q, k):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float32, device=DEVICE) / 16)
    return ops.rope(q, k, _positions(2, 5), inv_freq, attention_scaling=0.9, backend=backend)


CASES = {
    "rms_norm": Case(lambda g: (_randn(g, 7, 37), 1 + _randn(g, 37)),
                     lambda b, x, w: ops.rms_norm(x, w, 1e-5, backend=b), "rms_norm_fwd"),
    "rms_norm_residual": Case(lambda g: (_randn(g, 7, 37), 1 + _randn(g, 37), _randn(g, 7, 37)),
                              lambda b, x, w, r: ops.rms_norm(x, w, 1e-5, residual=r, backend=b), "rms_norm_fwd"),
    "swiglu": Case(lambda g: (_randn(g, 5, 37), _randn(g, 5, 37)),
                   lambda b, gate, up: ops.swiglu(gate, up, backend=b), "swiglu_fwd"),
    "swiglu_fused": Case(lambda g: (_randn(g, 5, 74),),
                         lambda b, gate_up: ops.swiglu_fused(gate_up, backend=b), "swiglu_fused_fwd"),
    # cos / sin are differentiated too: their gradient is formed in torch by the op's backward.
    "apply_rotary_pos_emb": Case(
        lambda g: (_randn(g, 2, 3, 5, 16), _randn(g, 2, 1, 5, 16), _randn(g, 2, 5, 16), _randn(g, 2, 5, 16)),
        lambda b, q, k, cos, sin: ops.apply_rotary_pos_emb(q, k, cos, sin, backend=b), "apply_rotary_fwd"),
    "rope": Case(lambda g: (_randn(g, 2, 5, 3, 16), _randn(g, 2, 5, 1, 16)), _rope, "rope_fwd"),
    "flash_attention": Case(
        lambda g: (_randn(g, 2, 7, 4, 16), _randn(g, 2, 9, 2, 16), _randn(g, 2, 9, 2, 16)),
        lambda b, q, k, v: ops.flash_attention(q, k, v, causal=True, return_lse=True, backend=b),
        "flash_attention_fwd", cuda_takes_float32=False),
    "token_logprobs": Case(
        lambda g: (3 * _randn(g, 2, 5, 37),),
        lambda b, logits: ops.token_logprobs(logits, TOKEN_IDS_2x5, temperature=0.7, return_entropy=True,
                                             backend=b),
        "token_logprobs_fwd"),
    "fused_linear_token_logprobs": Case(
        lambda g: (_randn(g, 9, 16), _randn(g, 37, 16), _randn(g, 37)),
        lambda b, hidden, weight, bias: ops.fused_linear_token_logprobs(
            hidden, weight, TOKEN_IDS_9, bias=bias, temperature=0.7, return_entropy=True, chunk_size=4,
            backend=b),
        "token_logprobs_fwd"),
}


def _case(name, kernel_backend) -> Case:
    case = CASES[name]
    if kernel_backend == "cuda":
        from thinkfuse.backend import cuda_has_op

        if not case.cuda_takes_float32 or not cuda_has_op(case.cuda_op):
            pytest.skip(f"the cuda {name} does not take these float32 inputs in this build")
    return case


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


def _cotangents(result):
    """A fixed random cotangent per output, so that no output's gradient goes untested."""
    gen = torch.Generator().manual_seed(1)
    return tuple(torch.randn(out.shape, generator=gen).to(out.device, out.dtype) for out in _outputs(result))


def _loss(case, backend):
    """A scalar of the inputs: every output against its fixed random cotangent."""

    def loss(*inputs):
        result = case.run(backend, *inputs)
        return sum((out * cot).sum() for out, cot in zip(_outputs(result), _cotangents(result)))

    return loss


def _inputs(case):
    return case.inputs(torch.Generator().manual_seed(0))


def _autograd_grads(case, backend):
    leaves = [t.clone().requires_grad_() for t in _inputs(case)]
    return torch.autograd.grad(_loss(case, backend)(*leaves), leaves)


def _assert_grads_equal(ours, expected, *, same_backend):
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected):
        assert a.shape == b.shape and b.abs().max() > 0  # a gradient that exists and is not all zero
        if same_backend:  # the same kernels on the same inputs
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:
            assert_close_fp32(a, b, tol=1e-4)


@pytest.mark.parametrize("name", CASES)
def test_func_grad_equals_autograd_on_the_same_backend_and_the_torch_backend(kernel_backend, name):
    case = _case(name, kernel_backend)
    inputs = _inputs(case)
    grads = torch.func.grad(_loss(case, kernel_backend), argnums=tuple(range(len(inputs))))(*inputs)
    _assert_grads_equal(grads, _autograd_grads(case, kernel_backend), same_backend=True)
    _assert_grads_equal(grads, _autograd_grads(case, "torch"), same_backend=False)


@pytest.mark.parametrize("name", CASES)
def test_func_vjp_called_after_the_transform_equals_autograd(kernel_backend, name):
    """vjp_fn runs once the transform has exited, on what its forward saved."""
    case = _case(name, kernel_backend)
    result, vjp_fn = torch.func.vjp(lambda *inputs: case.run(kernel_backend, *inputs), *_inputs(case))
    cotangents = _cotangents(result)
    grads = vjp_fn(cotangents if isinstance(result, tuple) else cotangents[0])
    _assert_grads_equal(grads, _autograd_grads(case, kernel_backend), same_backend=True)


@pytest.mark.parametrize("name", ["token_logprobs", "fused_linear_token_logprobs"])
def test_func_grad_through_the_torch_backends_chunked_logprobs(name):
    """The torch backend of the log-prob ops is a hand-written chunked autograd.Function too."""
    case = CASES[name]
    inputs = _inputs(case)
    grads = torch.func.grad(_loss(case, "torch"), argnums=tuple(range(len(inputs))))(*inputs)
    _assert_grads_equal(grads, _autograd_grads(case, "torch"), same_backend=True)


def test_grad_and_value_gives_the_eager_value(kernel_backend):
    case = _case("rms_norm_residual", kernel_backend)
    inputs = _inputs(case)
    loss = _loss(case, kernel_backend)
    grads, value = torch.func.grad_and_value(loss, argnums=(0, 1, 2))(*inputs)
    torch.testing.assert_close(value, loss(*inputs), rtol=0, atol=0)
    _assert_grads_equal(grads, _autograd_grads(case, kernel_backend), same_backend=True)


def test_func_grad_through_a_module_with_the_backend_chosen_by_use_backend(kernel_backend):
    """The backend selected by use_backend reaches the ops under the transform, as in eager."""
    x = _randn(torch.Generator().manual_seed(3), 4, 37)
    weight = _randn(torch.Generator().manual_seed(4), 37)

    def loss(w):
        return (ops.rms_norm(x, w) ** 2).sum()

    with thinkfuse.use_backend(kernel_backend):
        grad = torch.func.grad(loss)(weight)
    leaf = weight.clone().requires_grad_()
    with thinkfuse.use_backend("torch"):
        (expected,) = torch.autograd.grad(loss(leaf), leaf)
    assert_close_fp32(grad, expected, tol=1e-4)


# --- vmap: the dispatcher's per-sample fallback (slow, exact) -----------------------------------


@pytest.mark.parametrize("name", CASES)
def test_vmap_runs_each_sample_as_the_unbatched_op_does(kernel_backend, name):
    case = _case(name, kernel_backend)
    inputs = _inputs(case)
    batched = tuple(torch.stack([t, 2 * t]) for t in inputs)
    outputs = _outputs(torch.func.vmap(lambda *sample: case.run(kernel_backend, *sample))(*batched))
    for sample in range(2):
        expected = _outputs(case.run(kernel_backend, *(t[sample] for t in batched)))
        for got, want in zip(outputs, expected):
            torch.testing.assert_close(got[sample], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["rms_norm", "flash_attention", "fused_linear_token_logprobs"])
def test_jacrev_equals_the_torch_backends(kernel_backend, name):
    """jacrev's forward is a vjp; it then vmaps the backward, which takes the fallback. The
    jacobian of the scalar loss w.r.t. the first input is that input's gradient."""
    case = _case(name, kernel_backend)
    ours = torch.func.jacrev(_loss(case, kernel_backend))(*_inputs(case))
    _assert_grads_equal((ours,), _autograd_grads(case, "torch")[:1], same_backend=False)


# --- transforms the kernels cannot take ------------------------------------------------------


def test_per_sample_grads_are_a_clear_error(kernel_backend):
    x, weight = _inputs(_case("rms_norm", kernel_backend))
    per_sample = torch.func.vmap(torch.func.grad(lambda row: ops.rms_norm(row, weight, backend=kernel_backend).sum()))
    with pytest.raises(NotImplementedError, match=r"'rms_norm_fwd' cannot run under torch.func.vmap and grad"
                                                  r".*backend='torch'"):
        per_sample(x)


def test_the_suggested_torch_backend_takes_vmap():
    x, weight = _inputs(CASES["rms_norm"])
    batched = torch.func.vmap(lambda row: ops.rms_norm(row, weight, backend="torch"))(x)
    torch.testing.assert_close(batched, ops.rms_norm(x, weight, backend="torch"))


def test_grad_of_grad_is_a_clear_error_not_a_silent_zero(kernel_backend):
    x, weight = _inputs(_case("rms_norm", kernel_backend))

    def first_derivative_norm(w):
        grad = torch.func.grad(lambda w_: (ops.rms_norm(x, w_, backend=kernel_backend) ** 2).sum())(w)
        return (grad ** 2).sum()

    with pytest.raises(RuntimeError, match=r"'rms_norm_bwd' has no derivative.*second derivatives.*backend='torch'"):
        torch.func.grad(first_derivative_norm)(weight)
    # The way out the message gives: the torch backend has the second derivative.
    hessian_vector = torch.func.grad(lambda w: (torch.func.grad(
        lambda w_: (ops.rms_norm(x, w_, backend="torch") ** 2).sum())(w) ** 2).sum())(weight)
    assert hessian_vector.abs().max() > 0


# --- the losses: their one-pass form steps aside under torch.func ---------------------------


def _causal_lm_inputs():
    gen = torch.Generator().manual_seed(7)
    hidden, weight = _randn(gen, 2, 5, 16), _randn(gen, 37, 16)
    labels = torch.randint(0, 37, (2, 5), generator=gen).to(DEVICE)
    labels[0, 2] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("loss_backend", ["triton", "torch"])
def test_func_grad_of_causal_lm_loss_equals_autograd(loss_backend):
    hidden, weight, labels = _causal_lm_inputs()

    def loss(h, w):
        return ops.causal_lm_loss(h, w, labels, backend=loss_backend)

    grads = torch.func.grad(loss, argnums=(0, 1))(hidden, weight)
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    _assert_grads_equal(grads, torch.autograd.grad(loss(*leaves), leaves), same_backend=True)


@pytest.mark.parametrize("loss_backend", ["triton", "torch"])
def test_func_grad_of_grpo_loss_equals_autograd(loss_backend):
    from thinkfuse.grpo import GRPOLoss

    hidden, weight, ids = _causal_lm_inputs()
    gen = torch.Generator().manual_seed(8)
    mask = (torch.rand(2, 5, generator=gen) > 0.2).to(DEVICE)
    advantages = _randn(gen, 2)
    old_logprobs = -torch.rand(2, 5, generator=gen).to(DEVICE)
    loss_fn = GRPOLoss(loss_type="dapo", beta=0.0, backend=loss_backend)  # one_pass by default

    def loss(h, w):
        return loss_fn(h, w, ids.clamp(min=0), mask, advantages, old_logprobs=old_logprobs)[0]

    grads = torch.func.grad(loss, argnums=(0, 1))(hidden, weight)
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    _assert_grads_equal(grads, torch.autograd.grad(loss(*leaves), leaves), same_backend=False)
