"""thinkfuse.grpo: grpo_loss against a plain-torch transcription of TRL's GRPOTrainer formulas
for every loss type (loss, gradients, metrics), gradient accumulation, GRPOLoss through the
fused lm_head, and the TRL integration (skipped when trl is not installed)."""

import pytest
import torch
from conftest import DEVICE
from tolerances import assert_close_fp32

from thinkfuse import reference
from thinkfuse.grpo import LOSS_TYPES, GRPOLoss, grpo_loss

B, T = 4, 7


def _batch(seed=0, spread=0.4):
    """Random (logprobs, old, ref, advantages [B], mask [B, T] int with one empty row)."""
    gen = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, T, generator=gen) * 3
    old = logprobs + spread * torch.randn(B, T, generator=gen)  # ratios well outside [0.8, 1.2]
    ref = logprobs + spread * torch.randn(B, T, generator=gen)
    advantages = torch.randn(B, generator=gen)
    mask = (torch.rand(B, T, generator=gen) > 0.3).long()
    mask[2] = 0  # a completion with no scored token: TRL's clamp(min=1) matters
    mask[0, 0] = 1
    return [t.to(DEVICE) for t in (logprobs, old, ref, advantages, mask)]


def _trl_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, completion_mask, *,
              beta, epsilon_low, epsilon_high, loss_type, max_completion_length, num_items_in_batch, num_processes,
              use_bias_correction_kl=False, delta=None, gradient_accumulation_steps=1, steps_per_generation=1):
    """TRL GRPOTrainer._compute_loss (trl 1.16, importance_sampling_level="token", no vLLM IS
    correction, no entropy mask, train mode), transcribed line by line; the losses other than
    dapo are shown before TRL's division by the accumulation steps."""
    mask = completion_mask
    advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps
    coef_1 = torch.exp(log_ratio)
    if beta != 0.0:
        per_token_kl = (
            torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        )
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type == "dapo":
        normalizer = num_items_in_batch.clamp(min=1.0) / num_processes
        normalizer = normalizer * gradient_accumulation_steps / steps_per_generation
        loss = (per_token_loss * mask).sum() / normalizer

    def masked_seq_mean(x):
        return (x * mask).sum(-1) / mask.sum(-1)

    def global_masked_mean(x):
        return ((x * mask).sum() / mask.sum().float().clamp(min=1.0)).item()

    is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    low_seq, high_seq = masked_seq_mean(is_low_clipped.float()), masked_seq_mean(is_high_clipped.float())
    metrics = {
        "clip_ratio/low_mean": global_masked_mean(is_low_clipped.float()),
        "clip_ratio/high_mean": global_masked_mean(is_high_clipped.float()),
        "clip_ratio/region_mean": global_masked_mean((is_low_clipped | is_high_clipped).float()),
        "clip_ratio/low_min": low_seq[~low_seq.isnan()].min().item(),  # TRL's nanmin
        "clip_ratio/high_max": high_seq[~high_seq.isnan()].max().item(),  # TRL's nanmax
    }
    if beta != 0.0:
        metrics["kl"] = global_masked_mean(per_token_kl)
    return loss, metrics


# (beta, epsilon_low, epsilon_high, use_bias_correction_kl, delta): TRL's defaults in trl 1.16
# are beta 0, epsilon 0.2 both sides, use_bias_correction_kl True, delta None.
LOSS_OPTIONS = [(0.0, 0.2, 0.2, True, None), (0.04, 0.2, 0.28, False, None), (0.04, 0.2, 0.28, True, None),
                (0.1, 0.1, 0.3, True, 1.5), (0.0, 0.2, 0.2, False, 2.0)]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta,epsilon_low,epsilon_high,use_bias_correction_kl,delta", LOSS_OPTIONS)
def test_loss_gradients_and_metrics_match_trl(loss_type, beta, epsilon_low, epsilon_high, use_bias_correction_kl,
                                              delta):
    logprobs, old, ref, advantages, mask = _batch(spread=1.0 if delta else 0.4)  # delta caps ratios > 1.5
    num_items, world = torch.tensor(60.0, device=DEVICE), 2
    options = dict(beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, loss_type=loss_type,
                   use_bias_correction_kl=use_bias_correction_kl, delta=delta)

    ours_in = logprobs.clone().requires_grad_()
    loss, metrics = grpo_loss(ours_in, old, advantages, mask, ref_logprobs=ref, max_completion_length=9,
                              num_items_in_batch=num_items, world_size=world, **options)
    loss.backward()
    trl_in = logprobs.clone().requires_grad_()
    trl_loss, trl_metrics = _trl_loss(trl_in, old, ref, advantages, mask, max_completion_length=9,
                                      num_items_in_batch=num_items, num_processes=world, **options)
    trl_loss.backward()

    torch.testing.assert_close(loss, trl_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_in.grad, trl_in.grad, rtol=1e-6, atol=1e-7)
    assert metrics["clip_ratio"].item() == pytest.approx(trl_metrics["clip_ratio/region_mean"], abs=1e-7)
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(trl_metrics["clip_ratio/low_mean"], abs=1e-7)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(trl_metrics["clip_ratio/high_mean"], abs=1e-7)
    for name in ("clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max"):
        assert metrics[name].item() == pytest.approx(trl_metrics[name], abs=1e-7), name
    assert metrics["kl"].item() == pytest.approx(_trl_loss(
        logprobs, old, ref, advantages, mask, max_completion_length=9, num_items_in_batch=num_items,
        num_processes=world, **{**options, "beta": 1.0})[1]["kl"], rel=1e-6)
    assert 0 < trl_metrics["clip_ratio/region_mean"] < 1, "the data must exercise both clipped and unclipped tokens"


def test_delta_and_bias_correction_change_the_loss_where_they_should():
    """The options above are not inert on the test data: delta caps ratios of negative-advantage
    tokens, and the bias correction reweights the KL term."""
    logprobs, old, ref, advantages, mask = _batch(spread=1.0)
    plain = grpo_loss(logprobs, old, advantages, mask, ref_logprobs=ref, beta=0.1)[0]
    assert grpo_loss(logprobs, old, advantages, mask, ref_logprobs=ref, beta=0.1, delta=1.5)[0] != plain
    assert grpo_loss(logprobs, old, advantages, mask, ref_logprobs=ref, beta=0.1, use_bias_correction_kl=True)[0] != plain
    with pytest.raises(TypeError, match="use_bias_correction_kl"):
        grpo_loss(logprobs, old, advantages, mask, use_bias_correction_kl=1)
    with pytest.raises(ValueError, match="delta"):
        grpo_loss(logprobs, old, advantages, mask, delta=-1.0)


def test_dapo_with_trls_generation_batch_token_count():
    """TRL's num_items_in_batch spans steps_per_generation micro-batches; scaled by
    gradient_accumulation_steps / steps_per_generation it reproduces TRL's dapo loss."""
    logprobs, old, ref, advantages, mask = _batch(5)
    items, ga, spg = torch.tensor(90.0, device=DEVICE), 4, 8
    ours, _ = grpo_loss(logprobs, old, advantages, mask, loss_type="dapo", num_items_in_batch=items * ga / spg)
    trl, _ = _trl_loss(logprobs, old, ref, advantages, mask, beta=0.0, epsilon_low=0.2, epsilon_high=0.2,
                       loss_type="dapo", max_completion_length=T, num_items_in_batch=items, num_processes=1,
                       gradient_accumulation_steps=ga, steps_per_generation=spg)
    torch.testing.assert_close(ours, trl)


def test_unscored_positions_cannot_make_nan():
    """Whatever old/ref hold where mask == 0 (-inf, huge), loss, gradient and metrics stay
    finite and equal to those with harmless values there."""
    logprobs, old, ref, advantages, mask = _batch(6)
    garbage_old = old.masked_fill(mask == 0, float("-inf"))
    garbage_ref = ref.masked_fill(mask == 0, 1e4)
    results = []
    for o, r in ((old, ref), (garbage_old, garbage_ref)):
        x = logprobs.clone().requires_grad_()
        loss, metrics = grpo_loss(x, o, advantages, mask, ref_logprobs=r, beta=0.1, use_bias_correction_kl=True)
        loss.backward()
        results.append((loss.detach(), x.grad, metrics))
    (loss, grad, metrics), (loss_g, grad_g, metrics_g) = results
    torch.testing.assert_close(loss_g, loss)
    torch.testing.assert_close(grad_g, grad)
    for name in ("ratio_mean", "kl", "clip_ratio/region_mean"):
        torch.testing.assert_close(metrics_g[name], metrics[name])


def test_half_precision_log_probs_are_reduced_in_float32():
    """bf16 log-probs: the loss is float32 and its token count exact (1001 does not round to 1000)."""
    gen = torch.Generator().manual_seed(7)
    logprobs = (-torch.rand(1, 1001, generator=gen)).to(DEVICE)
    advantages = torch.ones(1, device=DEVICE)
    mask = torch.ones(1, 1001, dtype=torch.long, device=DEVICE)
    loss, _ = grpo_loss(logprobs.bfloat16(), None, advantages, mask, loss_type="dr_grpo", max_completion_length=1001)
    assert loss.dtype == torch.float32
    # ratio 1 everywhere: -sum(A * M) / 1001 = -1 (a bfloat16 sum would give -1000 / 1001)
    torch.testing.assert_close(loss, torch.tensor(-1.0, device=DEVICE))


def test_defaults_dr_grpo_length_and_dapo_items():
    logprobs, old, _, advantages, mask = _batch(1)
    dr, _ = grpo_loss(logprobs, old, advantages, mask, loss_type="dr_grpo")
    dr_t, _ = grpo_loss(logprobs, old, advantages, mask, loss_type="dr_grpo", max_completion_length=T)
    dapo, _ = grpo_loss(logprobs, old, advantages, mask, loss_type="dapo")
    bnpo, _ = grpo_loss(logprobs, old, advantages, mask, loss_type="bnpo")
    torch.testing.assert_close(dr, dr_t)
    torch.testing.assert_close(dapo, bnpo)  # num_items_in_batch defaults to mask.sum()


def test_on_policy_ratio_is_one_and_gradient_is_policy_gradient():
    logprobs, _, _, advantages, mask = _batch(2)
    x = logprobs.clone().requires_grad_()
    loss, metrics = grpo_loss(x, None, advantages, mask, loss_type="bnpo")
    loss.backward()
    m = mask.float()
    torch.testing.assert_close(loss, -(advantages[:, None] * m).sum() / m.sum())
    torch.testing.assert_close(x.grad, -advantages[:, None] * m / m.sum())
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)
    assert metrics["clip_ratio"].item() == 0.0
    assert "kl" not in metrics


def test_ratio_mean_and_metrics_are_detached():
    logprobs, old, ref, advantages, mask = _batch(3)
    x = logprobs.clone().requires_grad_()
    _, metrics = grpo_loss(x, old, advantages, mask, ref_logprobs=ref, beta=0.1)
    m = mask.float()
    expected = ((x - old).exp() * m).sum() / m.sum()
    torch.testing.assert_close(metrics["ratio_mean"], expected.detach())
    assert all(not v.requires_grad for v in metrics.values())


def test_gradient_accumulation_with_dapo_equals_one_big_batch():
    """Two micro-batches with num_items_in_batch = the global token count sum to the token mean."""
    logprobs, old, ref, advantages, mask = _batch(4)
    full, _ = grpo_loss(logprobs, old, advantages, mask, ref_logprobs=ref, beta=0.05, loss_type="bnpo")
    items = mask.sum()
    halves = [
        grpo_loss(logprobs[s], old[s], advantages[s], mask[s], ref_logprobs=ref[s], beta=0.05, loss_type="dapo",
                  num_items_in_batch=items)[0]
        for s in (slice(0, 2), slice(2, 4))
    ]
    torch.testing.assert_close(halves[0] + halves[1], full)


def test_advantages_per_token_and_bool_mask():
    logprobs, old, _, advantages, mask = _batch(5)
    a, _ = grpo_loss(logprobs, old, advantages, mask.bool())
    b, _ = grpo_loss(logprobs, old, advantages[:, None].expand(B, T), mask.float())
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(loss_type="ppo"), ValueError, "loss_type must be one of"),
        (dict(beta=0.1), ValueError, "beta > 0 needs ref_logprobs"),
        (dict(beta=-0.1), ValueError, "beta must be >= 0"),
        (dict(epsilon_low=float("nan")), ValueError, "epsilon_low must be finite"),
        (dict(old_logprobs=torch.zeros(B, T + 1)), ValueError, "old_logprobs shape"),
        (dict(mask=torch.ones(B, T - 1)), ValueError, "mask shape"),
        (dict(advantages=torch.zeros(B + 1)), ValueError, "advantages must have shape"),
        (dict(logprobs=torch.zeros(B * T)), ValueError, "logprobs must be 2-D"),
        (dict(loss_type="dr_grpo", max_completion_length=0), ValueError, "max_completion_length"),
        (dict(loss_type="dapo", world_size=0), ValueError, "world_size"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    logprobs, old, _, advantages, mask = _batch()
    args = dict(logprobs=logprobs, old_logprobs=old, advantages=advantages, mask=mask)
    for name in list(kwargs):
        if name in args:
            args[name] = kwargs.pop(name).to(DEVICE)
    with pytest.raises(error, match=match):
        grpo_loss(args["logprobs"], args["old_logprobs"], args["advantages"], args["mask"], **kwargs)


# --- GRPOLoss: the fused lm_head path ---------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_grpo_loss_module_matches_materialised_logits(backend, loss_type):
    gen = torch.Generator().manual_seed(7)
    n_hidden, n_vocab = 32, 301
    hidden = torch.randn(B, T, n_hidden, generator=gen).to(DEVICE)
    weight = (torch.randn(n_vocab, n_hidden, generator=gen) / 4).to(DEVICE)
    bias = (torch.randn(n_vocab, generator=gen) / 4).to(DEVICE)
    ids = torch.randint(0, n_vocab, (B, T), generator=gen).to(DEVICE)
    _, old, ref, advantages, mask = _batch(8)
    old, ref = old - 2.5, ref - 2.5  # near the model's log-probs (about -log V), so ratios clip sometimes

    def run(use_module):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        if use_module:
            module = GRPOLoss(beta=0.04, loss_type=loss_type, backend=backend)
            loss, metrics = module(leaves[0], leaves[1], ids, mask, advantages, old, ref, bias=leaves[2],
                                   temperature=0.9)
        else:
            logprobs = reference.fused_linear_token_logprobs(leaves[0], leaves[1], ids, leaves[2], 0.9)
            loss, metrics = grpo_loss(logprobs, old, advantages, mask, ref_logprobs=ref, beta=0.04,
                                      loss_type=loss_type)
        loss.backward()
        return loss.detach(), metrics, [t.grad for t in leaves]

    loss, metrics, grads = run(True)
    ref_loss, ref_metrics, ref_grads = run(False)
    assert_close_fp32(loss, ref_loss, tol=1e-4)
    for g, r in zip(grads, ref_grads):
        assert_close_fp32(g, r, tol=1e-4)
    for key in ("clip_ratio", "kl", "ratio_mean"):
        assert_close_fp32(metrics[key], ref_metrics[key], tol=1e-4)
    assert metrics["logprobs"].shape == (B, T)
    assert not metrics["logprobs"][mask == 0].any(), "masked positions are not scored"


def _module_inputs(seed=11, n_hidden=24, n_vocab=157):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, n_hidden, generator=gen).to(DEVICE)
    weight = (torch.randn(n_vocab, n_hidden, generator=gen) / 4).to(DEVICE)
    bias = (torch.randn(n_vocab, generator=gen) / 4).to(DEVICE)
    ids = torch.randint(0, n_vocab, (B, T), generator=gen).to(DEVICE)
    return hidden, weight, bias, ids


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("policy", ["on", "off"])
def test_one_pass_equals_differentiating_the_log_probs(backend, loss_type, policy):
    """GRPOLoss(one_pass=True) forms the lm_head gradients in the forward: same loss, metrics and
    gradients as one_pass=False, also through a scaled loss (gradient accumulation). Off-policy
    with TRL's delta and KL bias correction, which keep the loss a sum of per-token terms."""
    hidden, weight, bias, ids = _module_inputs()
    _, old, ref, advantages, mask = _batch(9)
    old = None if policy == "on" else old - 2.5
    trl_options = {} if policy == "on" else dict(delta=1.5, use_bias_correction_kl=True)

    def run(one_pass):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        module = GRPOLoss(beta=0.04, loss_type=loss_type, chunk_size=5, backend=backend, one_pass=one_pass,
                          **trl_options)
        loss, metrics = module(leaves[0], leaves[1], ids, mask, advantages, old, ref - 2.5, bias=leaves[2],
                               num_items_in_batch=40)
        (3.0 * loss).backward()
        return loss.detach(), metrics, [t.grad for t in leaves]

    loss, metrics, grads = run(True)
    ref_loss, ref_metrics, ref_grads = run(False)
    assert_close_fp32(loss, ref_loss, tol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert_close_fp32(g, r, tol=1e-5)
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        assert_close_fp32(metrics[key], ref_metrics[key], tol=1e-5)


def test_one_pass_frozen_lm_head_and_no_grad(backend):
    hidden, weight, _, ids = _module_inputs(seed=12)
    _, old, _, advantages, mask = _batch(10)
    h = hidden.clone().requires_grad_()
    loss, _ = GRPOLoss(backend=backend)(h, weight, ids, mask, advantages, old - 2.5)
    loss.backward()
    h2 = hidden.clone().requires_grad_()
    GRPOLoss(backend=backend, one_pass=False)(h2, weight, ids, mask, advantages, old - 2.5)[0].backward()
    assert_close_fp32(h.grad, h2.grad, tol=1e-5)
    with torch.no_grad():  # no gradient wanted: the plain path, same loss
        loss_ng, _ = GRPOLoss(backend=backend)(hidden, weight, ids, mask, advantages, old - 2.5)
    assert_close_fp32(loss_ng, loss.detach(), tol=1e-6)


def test_one_pass_gradients_are_handed_out_once():
    """The one-pass gradients are scaled in place (no second [V, H] buffer): a second backward
    through the same loss must raise, not return gradients scaled twice."""
    hidden, weight, _, ids = _module_inputs(seed=14)
    _, old, _, advantages, mask = _batch(12)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = GRPOLoss()(h, w, ids, mask, advantages, old - 2.5)
    (2.0 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated only once"):
        loss.backward()


def test_one_pass_loss_has_no_second_derivative():
    """A double backward (create_graph=True, e.g. a gradient-norm penalty) must raise: the held
    gradients carry no graph, so their derivatives would silently be missing."""
    hidden, weight, _, ids = _module_inputs(seed=15)
    _, old, _, advantages, mask = _batch(13)
    h = hidden.clone().requires_grad_()
    loss, _ = GRPOLoss()(h, weight.clone().requires_grad_(), ids, mask, advantages, old - 2.5)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_one_pass_checks_arguments_before_any_work():
    hidden, weight, _, ids = _module_inputs(seed=13)
    _, old, _, advantages, mask = _batch(11)
    h = hidden.clone().requires_grad_()
    with pytest.raises(ValueError, match="advantages"):
        GRPOLoss()(h, weight, ids, mask, advantages[:2], old)
    with pytest.raises(ValueError, match="hidden must be"):
        GRPOLoss()(h[:, :-1], weight, ids, mask, advantages, old)
    with pytest.raises(TypeError, match="one_pass"):
        GRPOLoss(one_pass=1)


def test_grpo_loss_module_rejects_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type"):
        GRPOLoss(loss_type="sapo")


def test_import_as_submodule():
    import thinkfuse.grpo as grpo_module

    assert grpo_module.grpo_loss is grpo_loss


# --- TRL integration (skipped without trl) -------------------------------------------------------


@pytest.fixture
def trl_utils():
    pytest.importorskip("trl")
    import trl.trainer.utils

    return trl.trainer.utils


def test_patch_trl_replaces_and_restores(trl_utils):
    from thinkfuse.grpo import patch_trl

    original_chunked = trl_utils._ChunkedLogProbFunction
    original_selective = trl_utils.selective_log_softmax
    with patch_trl() as patch:
        assert trl_utils._ChunkedLogProbFunction is not original_chunked
        assert trl_utils.selective_log_softmax is not original_selective
        assert patch.replaced
    assert trl_utils._ChunkedLogProbFunction is original_chunked
    assert trl_utils.selective_log_softmax is original_selective


def test_patched_selective_log_softmax_matches_trl(trl_utils):
    from thinkfuse.grpo import patch_trl

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 97, generator=gen)
    index = torch.randint(0, 97, (2, 5), generator=gen)
    row_mask = torch.ones(2, 5, dtype=torch.long)
    row_mask[1, 3:] = 0
    expected = trl_utils.selective_log_softmax(logits, index, temperature=0.7, row_mask=row_mask)
    with patch_trl():
        ours = trl_utils.selective_log_softmax(logits, index, temperature=0.7, row_mask=row_mask)
        top_k = trl_utils.selective_log_softmax(logits, index[..., None].expand(2, 5, 3))  # TRL's own path
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert top_k.shape == (2, 5, 3)


def test_patched_fused_lm_head_matches_trl(trl_utils):
    """add_fused_lm_head (what GRPOTrainer installs) gives the same log-probs, entropies and
    gradients with the patch."""
    from thinkfuse.grpo import patch_trl
    from thinkfuse.tiny import tiny_batch, tiny_model

    def run(patched):
        model = tiny_model("qwen2")
        trl_utils.add_fused_lm_head(model, temperature=0.8, outputs=("log_probs", "entropy"))
        input_ids = tiny_batch(2, 9)
        labels = input_ids.clone()
        labels[:, :4] = -100  # the prompt
        with patch_trl() if patched else torch.enable_grad():
            out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
            (out.log_probs.sum() + 0.1 * out.entropy.sum()).backward()
        return out.log_probs.detach(), out.entropy.detach(), model.lm_head.weight.grad

    for ours, trl in zip(run(True), run(False)):
        assert_close_fp32(ours, trl, tol=1e-4)


def _chunked_trl_call(function, hidden, weight, bias, targets, autocast, softcap=None, logit_scale=1.0):
    """TRL's ChunkedLogProbFunction.apply (or the patch's stand-in; positional arguments, as
    autograd.Function.apply takes them): log-probs, entropy and the gradients of a fixed mix of
    both w.r.t. hidden, weight and bias."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logprobs, entropy, *_ = function.apply(leaves[0], leaves[1], leaves[2], targets, 0.8, 64, softcap,
                                               logit_scale, ("log_probs", "entropy"))
    (logprobs.sum() + 0.1 * entropy.sum()).backward()
    return [logprobs.detach(), entropy.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("autocast,logit_scale", [(False, 1.0), (True, 1.0), (True, 1.5)],
                         ids=["float32", "bf16-autocast", "bf16-autocast-logit-scale"])
def test_patched_chunked_logprob_with_bias_autocast_and_logit_scale(trl_utils, autocast, logit_scale):
    """The stand-in for TRL's ChunkedLogProbFunction with a bias, under bfloat16 autocast (what a
    bf16 GRPOTrainer runs) and with a logit scale: log-probs, entropy and gradients within twice
    TRL's own error of a float64 truth of the same (autocast-rounded) inputs."""
    from thinkfuse.grpo import patch_trl

    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(11, 32, generator=gen), 0.3 * torch.randn(97, 32, generator=gen)
    bias, targets = 0.5 * torch.randn(97, generator=gen), torch.randint(0, 97, (11,), generator=gen)
    trl = _chunked_trl_call(trl_utils._ChunkedLogProbFunction, hidden, weight, bias, targets, autocast,
                            logit_scale=logit_scale)
    with patch_trl():
        assert trl_utils._ChunkedLogProbFunction.__name__ == "ThinkfuseChunkedLogProb"
        ours = _chunked_trl_call(trl_utils._ChunkedLogProbFunction, hidden, weight, bias, targets, autocast,
                                 logit_scale=logit_scale)
    rounded = (lambda t: t.bfloat16().double()) if autocast else (lambda t: t.double())
    truth_leaves = [rounded(t).requires_grad_() for t in (hidden, weight, bias)]
    logits = (truth_leaves[0] @ truth_leaves[1].t() + truth_leaves[2]) * logit_scale / 0.8
    logp = torch.log_softmax(logits, -1)
    truth_lp = logp.gather(-1, targets[:, None])[:, 0]
    truth_entropy = -(logp.exp() * logp).sum(-1)
    (truth_lp.sum() + 0.1 * truth_entropy.sum()).backward()
    truth = [truth_lp.detach(), truth_entropy.detach()] + [t.grad for t in truth_leaves]
    for name, o, t, r in zip(("logprobs", "entropy", "d_hidden", "d_weight", "d_bias"), ours, trl, truth):
        assert o.dtype == t.dtype, name
        ours_err, trl_err = (o.double() - r).abs().max().item(), (t.double() - r).abs().max().item()
        assert ours_err <= 2 * trl_err + 1e-5 * r.abs().max().item(), f"{name}: {ours_err:.3e} vs TRL's {trl_err:.3e}"


def test_patched_chunked_logprob_leaves_softcapping_to_trl(trl_utils):
    """Logit soft-capping is TRL's own path (thinkfuse has no softcap): identical results."""
    from thinkfuse.grpo import patch_trl

    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(5, 16, generator=gen), torch.randn(41, 16, generator=gen)
    bias, targets = torch.randn(41, generator=gen), torch.randint(0, 41, (5,), generator=gen)
    trl = _chunked_trl_call(trl_utils._ChunkedLogProbFunction, hidden, weight, bias, targets, False,
                            softcap=3.0)
    with patch_trl():
        ours = _chunked_trl_call(trl_utils._ChunkedLogProbFunction, hidden, weight, bias, targets, False,
                                 softcap=3.0)
    for o, t in zip(ours, trl):
        assert torch.equal(o, t)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from thinkfuse.tiny import VOCAB

    word_level = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="t0", pad_token="t1", eos_token="t2")


def test_one_grpo_step_of_a_tiny_patched_qwen2_with_trl(tmp_path, monkeypatch):
    """GRPOTrainer, one optimizer step on CPU: the log-probs come from thinkfuse, the weights move."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    import thinkfuse.grpo
    from thinkfuse.tiny import tiny_model

    model = tiny_model("qwen2")
    for config in (model.config, model.generation_config):
        config.pad_token_id, config.eos_token_id = 1, 2
    calls = []
    fused = thinkfuse.grpo.fused_linear_token_logprobs

    def counting_fused(*args, **kwargs):
        calls.append(args[0].shape)
        return fused(*args, **kwargs)

    monkeypatch.setattr(thinkfuse.grpo, "fused_linear_token_logprobs", counting_fused)
    args = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, max_completion_length=4,
        max_steps=1, learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
        logging_steps=1, disable_tqdm=True, seed=0, beta=0.0,
    )
    before = [p.detach().clone() for p in model.parameters()]
    with thinkfuse.grpo.patch_trl():
        trainer = GRPOTrainer(
            model=model, reward_funcs=lambda completions, **_: [float(len(c)) for c in completions], args=args,
            train_dataset=Dataset.from_dict({"prompt": ["t5 t6 t7", "t9 t10"]}), processing_class=_tiny_tokenizer(),
        )
        result = trainer.train()
    assert result.global_step == 1
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert calls, "GRPOTrainer did not go through thinkfuse"
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), "no parameter was updated"


@pytest.mark.parametrize("value,error", [(0, ValueError), (-4, ValueError), (float("nan"), ValueError),
                                         ("x", TypeError), (True, TypeError)])
def test_bad_num_items_in_batch_is_refused(value, error):
    logprobs = torch.zeros(2, 3)
    with pytest.raises(error, match="num_items_in_batch"):
        grpo_loss(logprobs, None, torch.ones(2), torch.ones(2, 3), loss_type="dapo", num_items_in_batch=value)
