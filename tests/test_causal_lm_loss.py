"""thinkfuse.ops.causal_lm_loss against transformers' ForCausalLMLoss on materialised logits, and
the "loss" patch rule (training forward with labels: loss from the hidden states, no logits)."""

import copy

import pytest
import torch
from conftest import DEVICE
from tolerances import assert_close_fp32
from transformers.loss.loss_utils import ForCausalLMLoss

import thinkfuse
from thinkfuse.ops import causal_lm_loss
from thinkfuse.tiny import tiny_batch, tiny_model

CUDA_OP = "token_logprobs_fwd"  # the fused log-probs' cuda backend runs these kernels
VOCAB, HIDDEN = 97, 24  # odd vocabulary: masked tails in the kernels


def _inputs(batch=3, seq=7, dtype=torch.float32, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, HIDDEN, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN**0.5).to(DEVICE, dtype)
    labels = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    labels[0, :3] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    b = (0.1 * torch.randn(VOCAB, generator=gen)).to(DEVICE, dtype) if bias else None
    return hidden, weight, b, labels.to(DEVICE)


def _transformers_loss(hidden, weight, bias, labels, **kwargs):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return ForCausalLMLoss(logits, labels, vocab_size=VOCAB, **kwargs)


def _loss_and_grads(fn, hidden, weight, bias, labels, **kwargs):
    """The loss and the gradients of 2.5 x the loss (an upstream gradient other than 1, as a
    loss scaler or a weighted sum of losses gives)."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    loss = fn(*leaves[:2], leaves[2] if bias is not None else None, labels, **kwargs)
    (2.5 * loss).backward()
    return [loss.detach()] + [t.grad for t in leaves]


def _ours(backend):
    return lambda h, w, b, labels, **kw: causal_lm_loss(h, w, labels, bias=b, backend=backend, **kw)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "num_items_tensor", "num_items_int"])
def test_matches_transformers_loss(backend, bias, reduction):
    hidden, weight, b, labels = _inputs(bias=bias)
    kwargs = {"mean": {}, "num_items_tensor": {"num_items_in_batch": torch.tensor(40, device=DEVICE)},
              "num_items_int": {"num_items_in_batch": 40}}[reduction]
    ours = _loss_and_grads(_ours(backend), hidden, weight, b, labels, **kwargs)
    ref = _loss_and_grads(_transformers_loss, hidden, weight, b, labels, **kwargs)
    for o, r in zip(ours, ref):
        assert_close_fp32(o, r, tol=1e-5)


def test_shift_labels_and_ignore_index(backend):
    hidden, weight, _, labels = _inputs(seed=1)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    ours = _loss_and_grads(_ours(backend), hidden, weight, None, None, shift_labels=shifted)
    ref = _loss_and_grads(_transformers_loss, hidden, weight, None, labels)
    for o, r in zip(ours, ref):
        assert_close_fp32(o, r, tol=1e-5)
    other = torch.where(labels == -100, -7, labels)
    ours = causal_lm_loss(hidden, weight, other, ignore_index=-7, backend=backend)
    assert_close_fp32(ours, ForCausalLMLoss(torch.nn.functional.linear(hidden, weight), other, VOCAB, ignore_index=-7),
                      tol=1e-5)


def test_bfloat16_is_as_close_to_the_float64_truth_as_transformers(backend):
    hidden, weight, _, labels = _inputs(dtype=torch.bfloat16, seed=2)
    truth = _transformers_loss(hidden.double(), weight.double(), None, labels)
    ours = causal_lm_loss(hidden, weight, labels, backend=backend)
    theirs = _transformers_loss(hidden, weight, None, labels)
    assert abs(ours.double() - truth) <= 2 * abs(theirs.double() - truth) + 1e-3


def test_no_counted_token_gives_nan_like_transformers():
    hidden, weight, _, labels = _inputs(seed=3)
    labels = torch.full_like(labels, -100)
    assert torch.isnan(causal_lm_loss(hidden, weight, labels, backend="torch"))
    assert torch.isnan(_transformers_loss(hidden, weight, None, labels))


@pytest.mark.parametrize("bad_label", [-1, 10**6])
def test_labels_that_are_no_token_id_are_refused(bad_label, backend):
    """A label that is neither ignore_index nor a token id fails in transformers' cross-entropy;
    it must not count as a log-prob of 0. On the CPU: a ValueError; elsewhere (a check would be a
    host sync) the loss is NaN."""
    hidden, weight, _, labels = _inputs(seed=4)
    labels = labels.clone()
    labels[0, 2] = bad_label
    if hidden.device.type == "cpu":
        with pytest.raises(ValueError, match="neither ignore_index nor a token id"):
            causal_lm_loss(hidden, weight, labels, backend=backend)
    else:
        assert torch.isnan(causal_lm_loss(hidden, weight, labels, backend=backend))


def test_labels_that_are_no_token_id_make_the_loss_nan_where_checking_would_sync(monkeypatch):
    """Where a check would be a host sync (a GPU, or under torch.compile) a bad label poisons the
    loss instead: NaN. Forced on any device by claiming to be compiling."""
    hidden, weight, _, labels = _inputs(seed=4)
    good = causal_lm_loss(hidden, weight, labels, backend="torch")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(causal_lm_loss(hidden, weight, labels, backend="torch"), good)
    for bad_label in (-1, VOCAB):
        bad = labels.clone()
        bad[0, 2] = bad_label
        assert torch.isnan(causal_lm_loss(hidden, weight, bad, backend="torch"))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(num_items_in_batch="3"), TypeError, "num_items_in_batch must be None, a number or a tensor"),
        (dict(num_items_in_batch="list"), TypeError, "num_items_in_batch must be None, a number or a tensor"),
        (dict(num_items_in_batch="pair"), ValueError, "one-element tensor"),
        (dict(weight=None), TypeError, "weight must be a torch.Tensor"),
        (dict(labels=None), ValueError, "exactly one of labels and shift_labels"),
        (dict(shift_labels="both"), ValueError, "exactly one of labels and shift_labels"),
        (dict(labels="float"), TypeError, "labels must have dtype"),
        (dict(labels="short"), ValueError, "labels shape"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (dict(labels="int32", ignore_index=2**40), ValueError, "ignore_index 1099511627776 does not fit labels"),
        (dict(hidden="1d"), ValueError, "hidden must have at least 2 dims"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    hidden, weight, _, labels = _inputs()
    args = dict(hidden=hidden, weight=weight, labels=labels, shift_labels=None, ignore_index=-100,
                num_items_in_batch=None)
    replacements = {"float": labels.float(), "int32": labels.int(), "short": labels[:, :-1], "both": labels, "1d": hidden[0, 0],
                    "list": [3], "pair": torch.tensor([3.0, 4.0])}
    args.update({k: replacements.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()})
    with pytest.raises(error, match=match):
        causal_lm_loss(args["hidden"], args["weight"], args["labels"], shift_labels=args["shift_labels"],
                       ignore_index=args["ignore_index"], num_items_in_batch=args["num_items_in_batch"])


# --- the "loss" patch rule --------------------------------------------------------------------------


def _train_step(model, ids, labels, **kwargs):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["qwen2", "mimo", "mistral", "ministral3"])
def test_patched_training_loss_matches_unpatched(family, backend):
    reference = tiny_model(family).to(DEVICE)
    model = copy.deepcopy(reference)
    report = thinkfuse.patch_model(model, backend=backend)
    assert report.patched["loss"] == 1
    ids = tiny_batch(2, 9, device=DEVICE)
    labels = ids.clone()
    labels[0, :4] = -100
    ref_out, ref_grads = _train_step(reference, ids, labels, num_items_in_batch=11)
    out, grads = _train_step(model, ids, labels, num_items_in_batch=11)
    assert out.logits is None  # the point: no [tokens, V] logits in training
    assert_close_fp32(out.loss, ref_out.loss, tol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        # relative to each gradient's own magnitude (some are ~1e-3: an absolute 1e-4 would let
        # them be 10% off)
        scale = grad.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(grads[name] / scale, grad / scale, rtol=0, atol=1e-4, msg=name)


def test_evaluation_and_inference_keep_their_logits():
    reference = tiny_model("qwen2")
    model = copy.deepcopy(reference)
    thinkfuse.patch_model(model, backend="torch")
    ids = tiny_batch(2, 9)
    model.eval(), reference.eval()
    out, ref = model(ids, labels=ids), reference(ids, labels=ids)
    assert out.logits is not None
    assert_close_fp32(out.loss, ref.loss, tol=1e-5)
    model.train(), reference.train()
    assert model(ids).logits is not None  # training without labels: logits as usual
    as_tuple = model(ids, labels=ids, return_dict=False)  # a tuple asked for: transformers' own path
    assert isinstance(as_tuple, tuple) and as_tuple[1] is not None
    assert_close_fp32(as_tuple[0], reference(ids, labels=ids).loss, tol=1e-5)


def test_loss_rule_opt_out_and_unpatch():
    model = tiny_model("qwen2")
    report = thinkfuse.patch_model(model, backend="torch", loss=False)
    assert "loss" not in report.patched and "loss" in report.disabled
    model.train()
    assert model(tiny_batch(2, 5), labels=tiny_batch(2, 5)).logits is not None
    thinkfuse.unpatch_model(model)
    thinkfuse.patch_model(model, backend="torch")
    assert model(tiny_batch(2, 5), labels=tiny_batch(2, 5)).logits is None
    thinkfuse.unpatch_model(model)
    assert "forward" not in model.__dict__
    assert model(tiny_batch(2, 5), labels=tiny_batch(2, 5)).logits is not None
