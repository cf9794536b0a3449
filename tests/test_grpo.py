"""thinkfuse.grpo: grpo_loss against a plain-torch transcription of TRL's GRPOTrainer formulas
for every loss type (loss, gradients, metrics), gradient accumulation, GRPOLoss through the
fused lm_head, and the TRL integration (skipped when trl is not installed)."""

import math

import pytest
import torch
from conftest import DEVICE
from tolerances import assert_close_fp32

from thinkfuse import reference
from thinkfuse.grpo import CLIPPED_LOSS_TYPES, LOSS_TYPES, GRPOLoss, grpo_loss

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
              use_bias_correction_kl=False, delta=None, gradient_accumulation_steps=1, steps_per_generation=1,
              importance_sampling_level="token", entropies=None, top_entropy_quantile=1.0, entropy_coef=0.0,
              importance_sampling_ratio=None, off_policy_mask_threshold=None, sampling_per_token_logps=None,
              sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
              vespo_k_neg=3.0, vespo_lambda_neg=2.0):
    """TRL GRPOTrainer._compute_loss (trl 1.16, one process, train mode, static entropy bonus, no
    MoE aux loss), transcribed line by line with get_high_entropy_mask, get_off_policy_mask and
    get_gamma_weights; ``importance_sampling_ratio`` given = TRL's use_vllm with
    vllm_importance_sampling_correction. The loss is TRL's, divided by the accumulation steps."""
    mask = completion_mask
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if top_entropy_quantile < 1.0:
        local = entropies[mask.bool()].float()
        if local.numel() == 0:
            entropy_mask = torch.zeros_like(entropies, dtype=torch.bool)
        else:
            entropy_threshold = torch.quantile(local, 1 - top_entropy_quantile)
            entropy_mask = ((entropies * mask.float()) >= entropy_threshold) & mask.bool()
    else:
        entropy_mask = None
    if off_policy_mask_threshold is not None:
        sampling = old_per_token_logps if sampling_per_token_logps is None else sampling_per_token_logps
        kl_div = torch.nan_to_num(sampling - per_token_logps.detach(), nan=0.0)
        avg_seq_kl = (kl_div * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        off_policy_mask = ((advantages >= 0) | (avg_seq_kl <= off_policy_mask_threshold)).to(dtype=mask.dtype)
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:
        per_token_kl = (
            torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        )
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    elif loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss1 = coef_1 * advantages
        per_token_loss2 = coef_2 * advantages
        per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    elif loss_type == "sapo":
        temperatures = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        per_token_loss = -soft_coef_1 * advantages
    elif loss_type == "vespo":
        with torch.no_grad():
            lower_clamp = math.log(1e-8)
            log_ratio_clamped = torch.clamp(log_ratio, -20.0, 20.0)
            seq_log_ratio = torch.sum(log_ratio_clamped * mask, dim=-1, keepdim=True)
            if importance_sampling_ratio is not None:
                log_is_ratio = torch.clamp(torch.log(importance_sampling_ratio), lower_clamp, 20.0)
                seq_log_ratio += torch.sum(log_is_ratio, dim=-1, keepdim=True)
            log_w_seq = torch.clamp(seq_log_ratio, lower_clamp, 20.0)
            w_seq = torch.exp(log_w_seq)
            is_nonneg_adv = advantages >= 0
            k_seq = torch.where(is_nonneg_adv, vespo_k_pos, vespo_k_neg)
            lambda_seq = torch.where(is_nonneg_adv, vespo_lambda_pos, vespo_lambda_neg).clamp(min=1e-4)
            log_phi = lambda_seq + k_seq * log_w_seq - lambda_seq * w_seq
            phi_seq = torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        per_token_loss = -phi_seq * advantages * per_token_logps
    if off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * off_policy_mask
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if importance_sampling_ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * importance_sampling_ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    ga = gradient_accumulation_steps
    if loss_type in ["grpo", "sapo"]:
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        policy_loss = loss.detach()
        loss = loss / ga
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
        policy_loss = loss.detach()
        loss = loss / ga
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
        policy_loss = loss.detach()
        loss = loss / ga
    elif loss_type in ["cispo", "dapo", "vespo"]:
        normalizer = num_items_in_batch.clamp(min=1.0) / num_processes
        normalizer = normalizer * ga / steps_per_generation
        loss = (per_token_loss * mask).sum() / normalizer
        policy_loss = loss.detach()
    elif loss_type == "luspo":
        loss = (per_token_loss * mask).sum(-1).mean()
        policy_loss = loss.detach()
        loss = loss / ga
    metrics = {}
    if entropy_coef != 0.0:
        effective_mask = mask if entropy_mask is None else mask * entropy_mask
        entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0) / ga
        loss = loss - entropy_coef * entropy_loss
        metrics["policy_loss"] = policy_loss.item()

    def masked_seq_mean(x):
        if x.shape[1] == 1:
            return x.squeeze(1)
        return (x * mask).sum(-1) / mask.sum(-1)

    def global_masked_mean(x):
        if x.shape[1] == 1:
            local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        else:
            local_sum, local_count = (x * mask).sum(), mask.sum().float()
        return (local_sum / local_count.clamp(min=1.0)).item()

    def nanmin(t):  # trl.trainer.utils.nanmin / nanmax
        return float("nan") if torch.isnan(t).all() else t[~torch.isnan(t)].min().item()

    def nanmax(t):
        return float("nan") if torch.isnan(t).all() else t[~torch.isnan(t)].max().item()

    if beta != 0.0:
        metrics["kl"] = global_masked_mean(per_token_kl)
    if entropies is not None:
        metrics["entropy"] = global_masked_mean(entropies)
    if loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
        is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
        is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
        is_region_clipped = is_low_clipped | is_high_clipped
        metrics["clip_ratio/low_mean"] = global_masked_mean(is_low_clipped.float())
        metrics["clip_ratio/high_mean"] = global_masked_mean(is_high_clipped.float())
        metrics["clip_ratio/region_mean"] = global_masked_mean(is_region_clipped.float())
        metrics["clip_ratio/low_min"] = nanmin(masked_seq_mean(is_low_clipped.float()))
        metrics["clip_ratio/high_max"] = nanmax(masked_seq_mean(is_high_clipped.float()))
    elif loss_type == "cispo":
        metrics["cispo_clip_ratio"] = global_masked_mean(((coef_1 > epsilon_high) & (advantages > 0)).float())
    elif loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = global_masked_mean(phi_seq)
    return loss, metrics


def _trl_vllm_is_ratio(old_per_token_logps, sampling_per_token_logps, mask, mode, clip_min, clip_max):
    """TRL 1.16 _generate_and_score_completions' vLLM importance-sampling ratio, transcribed."""
    per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    if mode in ["sequence_mask", "sequence_truncate"]:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    min_val = clip_min if clip_min is not None else -math.inf
    max_val = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)


def _real_trl_loss(per_token_logps, entropies, inputs, *, beta, epsilon_low, epsilon_high, loss_type,
                   max_completion_length, num_processes, use_bias_correction_kl=False, delta=None,
                   gradient_accumulation_steps=1, steps_per_generation=1, importance_sampling_level="token",
                   top_entropy_quantile=1.0, entropy_coef=0.0, off_policy_mask_threshold=None,
                   sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                   vespo_k_neg=3.0, vespo_lambda_neg=2.0):
    """trl 1.16's own GRPOTrainer._compute_loss, run on a trainer built without __init__ whose
    model forward returns the given log-probs and entropies, on one process in train mode.
    ``inputs`` holds TRL's batch keys (completion_mask, advantages, old/ref/sampling_per_token_logps,
    importance_sampling_ratio: its presence turns on use_vllm + vllm_importance_sampling_correction,
    num_items_in_batch). Returns (loss, {metric name: last logged value})."""
    import collections
    import types

    from trl import GRPOTrainer

    class Accelerator:  # one process: reductions are identities
        num_processes, sync_gradients = 1, True

        def reduce(self, t, reduction="sum"):
            return t

        def gather(self, t):
            return t

        gather_for_metrics = gather

        def pad_across_processes(self, t, dim=0, pad_index=0):
            return t

    accelerator = Accelerator()
    accelerator.num_processes = num_processes
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.__dict__.update(
        args=types.SimpleNamespace(delta=delta, use_bias_correction_kl=use_bias_correction_kl,
                                   steps_per_generation=steps_per_generation, sapo_temperature_pos=sapo_temperature_pos,
                                   sapo_temperature_neg=sapo_temperature_neg, vespo_k_pos=vespo_k_pos,
                                   vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
                                   vespo_lambda_neg=vespo_lambda_neg, entropy_target=0.2),
        accelerator=accelerator, model=torch.nn.Module().train(), loss_type=loss_type, beta=beta,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, importance_sampling_level=importance_sampling_level,
        top_entropy_quantile=top_entropy_quantile, off_policy_mask_threshold=off_policy_mask_threshold,
        use_vllm="importance_sampling_ratio" in inputs, vllm_importance_sampling_correction=True,
        max_completion_length=max_completion_length, current_gradient_accumulation_steps=gradient_accumulation_steps,
        entropy_coef=entropy_coef, use_adaptive_entropy=False, _entropy_bonus_enabled=entropy_coef != 0.0,
        aux_loss_enabled=False, _metrics={"train": collections.defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (per_token_logps, entropies, None),
    )
    batch, length = per_token_logps.shape
    device = per_token_logps.device
    inputs = {"prompt_ids": torch.zeros(batch, 0, dtype=torch.long, device=device),
              "prompt_mask": torch.zeros(batch, 0, dtype=torch.long, device=device),
              "completion_ids": torch.zeros(batch, length, dtype=torch.long, device=device), **inputs}
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {name: values[-1] for name, values in trainer._metrics["train"].items()}


# (beta, epsilon_low, epsilon_high, use_bias_correction_kl, delta): TRL's defaults in trl 1.16
# are beta 0, epsilon 0.2 both sides, use_bias_correction_kl True, delta None.
LOSS_OPTIONS = [(0.0, 0.2, 0.2, True, None), (0.04, 0.2, 0.28, False, None), (0.04, 0.2, 0.28, True, None),
                (0.1, 0.1, 0.3, True, 1.5), (0.0, 0.2, 0.2, False, 2.0)]


@pytest.mark.parametrize("loss_type", CLIPPED_LOSS_TYPES)
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


def _module_against_materialised(run, tol):
    """(module metrics, materialised metrics) of ``run(True)`` / ``run(False)`` (each returning
    loss, metrics, leaf gradients), after checking that their losses and gradients agree."""
    loss, metrics, grads = run(True)
    ref_loss, ref_metrics, ref_grads = run(False)
    assert_close_fp32(loss, ref_loss, tol=tol)
    for g, r in zip(grads, ref_grads):
        assert_close_fp32(g, r, tol=tol)
    return metrics, ref_metrics


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

    metrics, ref_metrics = _module_against_materialised(run, tol=1e-4)
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
    trl_options = {} if policy == "on" else dict(use_bias_correction_kl=True)
    if policy == "off" and loss_type in CLIPPED_LOSS_TYPES:
        trl_options["delta"] = 1.5

    def run(one_pass):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        module = GRPOLoss(beta=0.04, loss_type=loss_type, chunk_size=5, backend=backend, one_pass=one_pass,
                          **trl_options)
        loss, metrics = module(leaves[0], leaves[1], ids, mask, advantages, old, ref - 2.5, bias=leaves[2],
                               num_items_in_batch=40)
        (3.0 * loss).backward()
        return loss.detach(), metrics, [t.grad for t in leaves]

    metrics, ref_metrics = _module_against_materialised(run, tol=1e-5)
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


@pytest.mark.parametrize("options", [dict(one_pass=False), dict(top_entropy_quantile=0.5), dict(entropy_coef=0.1),
                                     dict(loss_type="vespo"), dict(importance_sampling_level="sequence")])
def test_grpo_loss_module_checks_arguments_before_the_lm_head(options, monkeypatch):
    """Where the one-pass path does not apply, bad loss arguments are refused before the fused
    lm_head runs too (API.md: before any kernel), with the same messages as the one-pass path."""
    import thinkfuse.grpo as grpo_module

    calls = []
    monkeypatch.setattr(grpo_module, "fused_linear_token_logprobs", lambda *a, **k: calls.append(1))
    hidden, weight, _, ids = _module_inputs(seed=13)
    _, old, ref, advantages, mask = _batch(11)
    h = hidden.clone().requires_grad_()
    for kwargs, error, match in [
        (dict(advantages=advantages[:2]), ValueError, "advantages must have shape"),
        (dict(old_logprobs=old[:, :-1]), ValueError, "old_logprobs shape"),
        (dict(importance_sampling_ratio=torch.ones(B, 3, device=DEVICE)), ValueError, "importance_sampling_ratio"),
        (dict(num_items_in_batch="x"), TypeError, "num_items_in_batch"),
        (dict(hidden=h[:, :-1]), ValueError, "hidden must be"),
    ]:
        args = {**dict(hidden=h, advantages=advantages, old_logprobs=old), **kwargs}
        extra = {k: v for k, v in args.items() if k in ("importance_sampling_ratio", "num_items_in_batch")}
        with pytest.raises(error, match=match):
            GRPOLoss(**options)(args["hidden"], weight, ids, mask, args["advantages"], args["old_logprobs"], **extra)
    with pytest.raises(ValueError, match="beta > 0 needs ref_logprobs"):
        GRPOLoss(beta=0.1, **options)(h, weight, ids, mask, advantages, old)
    assert not calls, "the lm_head ran before the arguments were checked"

@pytest.mark.parametrize("options", [dict(one_pass=False), dict(top_entropy_quantile=0.5)])
def test_grpo_loss_module_computes_the_loss_once(options, monkeypatch):
    """The up-front checks compute nothing, and run once: the loss is computed once per forward
    (it used to be computed on zeros as well, a few [B, T] kernels per step), on the options
    checked up front."""
    import thinkfuse.grpo as grpo_module

    hidden, weight, _, ids = _module_inputs(seed=17)
    _, old, _, advantages, mask = _batch(12)
    calls = []
    for name in ("_checked_options", "_loss_and_metrics"):
        real = getattr(grpo_module, name)
        monkeypatch.setattr(grpo_module, name,
                            lambda *a, _name=name, _real=real, **k: calls.append(_name) or _real(*a, **k))
    loss, _ = GRPOLoss(**options)(hidden.clone().requires_grad_(), weight, ids, mask, advantages, old)
    assert calls == ["_checked_options", "_loss_and_metrics"] and torch.isfinite(loss)


@pytest.mark.parametrize("options", [dict(loss_type="dr_grpo", max_completion_length=0),
                                     dict(loss_type="dapo", world_size=0), dict(loss_type="dapo", world_size=1.5)])
@pytest.mark.parametrize("one_pass", [True, False])
def test_grpo_loss_module_checks_normalisation_options_before_the_lm_head(options, one_pass, monkeypatch):
    """Options only the loss's normalisation reads are refused before the lm_head runs too."""
    import thinkfuse.grpo as grpo_module

    calls = []
    monkeypatch.setattr(grpo_module, "fused_linear_token_logprobs", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(grpo_module, "fused_linear_logprobs_with_grads", lambda *a, **k: calls.append(1))
    hidden, weight, _, ids = _module_inputs(seed=17)
    _, old, _, advantages, mask = _batch(12)
    with pytest.raises(ValueError, match="must be a positive int"):
        GRPOLoss(one_pass=one_pass, **options)(hidden.clone().requires_grad_(), weight, ids, mask, advantages, old)
    assert not calls, "the lm_head ran before the arguments were checked"


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_reports_the_contracts_metrics(loss_type):
    """API.md: metrics has at least clip_ratio, kl (when beta > 0) and ratio_mean, whatever the
    loss type; sapo and vespo clip nothing, so theirs is 0."""
    logprobs, old, ref, advantages, mask = _batch(3)
    _, metrics = grpo_loss(logprobs, old, advantages, mask, ref_logprobs=ref, beta=0.1, loss_type=loss_type)
    assert {"clip_ratio", "kl", "ratio_mean"} <= set(metrics)
    assert all(m.dim() == 0 and m.dtype == torch.float32 and torch.isfinite(m) for m in metrics.values())
    if loss_type in ("sapo", "vespo"):
        assert metrics["clip_ratio"].item() == 0.0


def test_grpo_loss_module_rejects_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type"):
        GRPOLoss(loss_type="ppo")


def test_import_as_submodule():
    import thinkfuse.grpo as grpo_module

    assert grpo_module.grpo_loss is grpo_loss


# --- TRL 1.16's other options: GSPO, cispo / sapo / luspo / vespo, entropy mask and bonus, OPSM,
# --- vLLM importance sampling; against the transcription above and trl's own _compute_loss ------


def _have_trl():
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


BIG_B, BIG_T = 8, 9


def _trl_inputs(seed, spread=0.4, adv_per_token=False, on_policy=False):
    """A batch of BIG_B x BIG_T (one empty completion), with entropies and sampler log-probs."""
    gen = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(BIG_B, BIG_T, generator=gen) * 3
    old = logprobs + spread * torch.randn(BIG_B, BIG_T, generator=gen)
    ref = logprobs + spread * torch.randn(BIG_B, BIG_T, generator=gen)
    sampling = old + 0.3 * torch.randn(BIG_B, BIG_T, generator=gen)
    entropies = torch.rand(BIG_B, BIG_T, generator=gen) * 3
    shape = (BIG_B, BIG_T) if adv_per_token else (BIG_B,)
    advantages = torch.randn(shape, generator=gen)
    advantages[6] = 0.0  # a group whose rewards were all equal
    mask = (torch.rand(BIG_B, BIG_T, generator=gen) > 0.25).long()
    mask[3] = 0
    mask[0, 0] = 1
    old = logprobs.clone() if on_policy else old
    return [t.to(DEVICE) for t in (logprobs, old, ref, sampling, entropies, advantages, mask)]


# (options, the keys that make the option under test: dropping them must change the loss).
# Data keys: ga / spg / world (TRL's gradient_accumulation_steps, steps_per_generation,
# num_processes), is_mode (vLLM IS: mode, clip_min, clip_max), sampling (pass the sampler's
# log-probs), adv_per_token, on_policy, spread.
TRL_CASES = {
    "gspo-grpo": (dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=0.05, epsilon_high=0.06,
                       beta=0.04, use_bias_correction_kl=True), ["importance_sampling_level"]),
    "gspo-bnpo": (dict(loss_type="bnpo", importance_sampling_level="sequence", epsilon_low=0.05,
                       epsilon_high=0.05), ["importance_sampling_level"]),
    "gspo-dr_grpo": (dict(loss_type="dr_grpo", importance_sampling_level="sequence", epsilon_low=0.05,
                          epsilon_high=0.08, ga=2), ["importance_sampling_level"]),
    "gspo-dapo-delta": (dict(loss_type="dapo", importance_sampling_level="sequence", epsilon_low=0.05,
                             epsilon_high=0.05, delta=1.1, beta=0.04, ga=4, spg=8, world=2, spread=0.8),
                        ["importance_sampling_level", "delta"]),
    "gspo-per-token-advantages": (dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=0.05,
                                       epsilon_high=0.05, adv_per_token=True), ["importance_sampling_level"]),
    "gspo-on-policy": (dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04,
                            use_bias_correction_kl=True, on_policy=True), []),
    "cispo": (dict(loss_type="cispo", epsilon_high=1.3, beta=0.04, use_bias_correction_kl=True), []),
    "cispo-sequence-ga": (dict(loss_type="cispo", importance_sampling_level="sequence", epsilon_high=1.05, ga=4,
                               spg=8, world=2), ["importance_sampling_level"]),
    "sapo": (dict(loss_type="sapo", beta=0.04), []),
    "sapo-temperatures-sequence-ga": (dict(loss_type="sapo", sapo_temperature_pos=0.7, sapo_temperature_neg=1.6,
                                           importance_sampling_level="sequence", ga=3),
                                      ["sapo_temperature_pos", "sapo_temperature_neg", "importance_sampling_level"]),
    "luspo-sequence": (dict(loss_type="luspo", importance_sampling_level="sequence", epsilon_low=0.05,
                            epsilon_high=0.05, beta=0.04, use_bias_correction_kl=True, ga=2),
                       ["importance_sampling_level"]),
    "luspo-token": (dict(loss_type="luspo", delta=1.5, spread=1.0), ["delta"]),
    "vespo": (dict(loss_type="vespo", beta=0.04), []),
    "vespo-parameters-ga": (dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.0,
                                 vespo_lambda_neg=1.0, ga=4, spg=8, world=2),
                            ["vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"]),
    "vespo-token-truncate-is": (dict(loss_type="vespo", is_mode=("token_truncate", 0.7, 1.4)), ["is_mode"]),
    "vespo-token-mask-is": (dict(loss_type="vespo", is_mode=("token_mask", 0.7, 1.4)), ["is_mode"]),
    "vespo-sequence-level": (dict(loss_type="vespo", importance_sampling_level="sequence", beta=0.04,
                                  use_bias_correction_kl=True), ["importance_sampling_level"]),
    "top-entropy-grpo": (dict(loss_type="grpo", top_entropy_quantile=0.3, beta=0.04), ["top_entropy_quantile"]),
    "top-entropy-dapo-sequence": (dict(loss_type="dapo", top_entropy_quantile=0.5,
                                       importance_sampling_level="sequence", ga=4, spg=8),
                                  ["top_entropy_quantile"]),
    "top-entropy-zero": (dict(loss_type="bnpo", top_entropy_quantile=0.0, on_policy=True), ["top_entropy_quantile"]),
    "entropy-bonus-grpo-ga": (dict(loss_type="grpo", entropy_coef=0.01, ga=2), ["entropy_coef"]),
    "entropy-bonus-dapo-ga": (dict(loss_type="dapo", entropy_coef=0.01, ga=4, spg=8, world=2), ["entropy_coef"]),
    "entropy-bonus-and-mask-vespo": (dict(loss_type="vespo", entropy_coef=-0.02, top_entropy_quantile=0.4, ga=2,
                                          spg=2), ["entropy_coef", "top_entropy_quantile"]),
    "opsm": (dict(loss_type="grpo", off_policy_mask_threshold=0.07), ["off_policy_mask_threshold"]),
    "opsm-sampling-sequence": (dict(loss_type="dapo", off_policy_mask_threshold=0.1, sampling=True,
                                    importance_sampling_level="sequence", beta=0.04),
                               ["off_policy_mask_threshold"]),
    "is-token_truncate": (dict(loss_type="grpo", is_mode=("token_truncate", 0.8, 1.25), beta=0.04), ["is_mode"]),
    "is-token_mask": (dict(loss_type="dapo", is_mode=("token_mask", 0.8, 1.25), ga=2, spg=4), ["is_mode"]),
    "is-sequence_truncate": (dict(loss_type="bnpo", is_mode=("sequence_truncate", None, 1.5)), ["is_mode"]),
    "is-sequence_mask": (dict(loss_type="cispo", epsilon_high=1.3, is_mode=("sequence_mask", 0.5, 3.0)),
                         ["is_mode"]),
    "is-sequence_mask-gspo-sapo": (dict(loss_type="sapo", importance_sampling_level="sequence",
                                        is_mode=("sequence_mask", 0.5, 3.0)), ["is_mode"]),
    "everything": (dict(loss_type="dapo", importance_sampling_level="sequence", epsilon_low=0.05, epsilon_high=0.05,
                        delta=1.2, beta=0.04, use_bias_correction_kl=True, top_entropy_quantile=0.6,
                        entropy_coef=0.01, off_policy_mask_threshold=0.05, sampling=True,
                        is_mode=("token_truncate", 0.8, 1.25), ga=4, spg=8, world=2), []),
}
_DATA_KEYS = {"ga": 1, "spg": 1, "world": 1, "is_mode": None, "sampling": False, "adv_per_token": False,
              "on_policy": False, "spread": 0.4}


def _run_case(options, seed=0, reference="ours"):
    """(loss, d loss / d logprobs, d loss / d entropies, metrics) of one TRL_CASES entry, computed by
    grpo_loss ("ours"), the transcription ("transcription") or trl itself ("trl"). Our loss is
    scaled as TRL's gradient accumulation needs (see the module docstring of thinkfuse.grpo)."""
    options = dict(options)
    data = {key: options.pop(key, default) for key, default in _DATA_KEYS.items()}
    logprobs, old, ref, sampling, entropies, advantages, mask = _trl_inputs(
        seed, data["spread"], data["adv_per_token"], data["on_policy"])
    ratio = None if data["is_mode"] is None else _trl_vllm_is_ratio(old, sampling, mask, *data["is_mode"])
    num_items, ga, spg, world = torch.tensor(50.0, device=DEVICE), data["ga"], data["spg"], data["world"]
    lp, ent = logprobs.clone().requires_grad_(), entropies.clone().requires_grad_()
    sampling = sampling if data["sampling"] else None
    if reference == "ours":
        token_sum = options["loss_type"] in ("dapo", "cispo", "vespo")
        coef = options.pop("entropy_coef", 0.0)
        loss, metrics = grpo_loss(
            lp, old, advantages, mask, ref_logprobs=ref, entropies=ent, importance_sampling_ratio=ratio,
            sampling_logprobs=sampling, max_completion_length=11, num_items_in_batch=num_items * ga / spg,
            world_size=world, entropy_coef=coef / ga if token_sum else coef, **options)
        loss = loss if token_sum else loss / ga
        metrics = {name: value.item() for name, value in metrics.items()}
    elif reference == "transcription":
        loss, metrics = _trl_loss(lp, old, ref, advantages, mask, entropies=ent, importance_sampling_ratio=ratio,
                                  sampling_per_token_logps=sampling, max_completion_length=11,
                                  num_items_in_batch=num_items, num_processes=world, gradient_accumulation_steps=ga,
                                  steps_per_generation=spg, **{"beta": 0.0, "epsilon_low": 0.2, "epsilon_high": 0.2,
                                                               **options})
    else:
        inputs = {"completion_mask": mask, "advantages": advantages, "old_per_token_logps": old,
                  "ref_per_token_logps": ref, "num_items_in_batch": num_items}
        if ratio is not None:
            inputs["importance_sampling_ratio"] = ratio
        if sampling is not None:
            inputs["sampling_per_token_logps"] = sampling
        loss, metrics = _real_trl_loss(lp, ent, inputs, max_completion_length=11, num_processes=world,
                                       gradient_accumulation_steps=ga, steps_per_generation=spg,
                                       **{"beta": 0.0, "epsilon_low": 0.2, "epsilon_high": 0.2, **options})
        metrics.pop("entropy_coef", None)
    loss.backward()
    return loss.detach(), lp.grad, ent.grad, metrics


@pytest.mark.parametrize("case", list(TRL_CASES))
def test_trl_options_match_trl(case):
    """Loss, gradients (log-probs and entropies) and every TRL metric of grpo_loss equal TRL's:
    the line-by-line transcription always, trl 1.16's own _compute_loss when trl is installed
    (its gradient-accumulation and data-parallel normalisation included)."""
    options, _ = TRL_CASES[case]
    loss, grad, ent_grad, metrics = _run_case(options)
    for reference in ["transcription"] + (["trl"] if _have_trl() else []):
        ref_loss, ref_grad, ref_ent_grad, ref_metrics = _run_case(options, reference=reference)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7, msg=f"loss vs {reference}")
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7, msg=f"gradient vs {reference}")
        assert (ent_grad is None) == (ref_ent_grad is None), reference
        if ent_grad is not None:
            torch.testing.assert_close(ent_grad, ref_ent_grad, rtol=1e-6, atol=1e-7)
        assert ref_metrics.keys() <= metrics.keys(), f"missing {ref_metrics.keys() - metrics.keys()}"
        for name, value in ref_metrics.items():
            assert metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-7, nan_ok=True), (reference, name)
    assert torch.isfinite(loss) and grad.abs().sum() > 0


@pytest.mark.parametrize("case", [c for c, (_, keys) in TRL_CASES.items() if keys])
def test_trl_options_are_exercised_by_the_data(case):
    """Each option above changes the loss and its gradient on the test data (a no-op would pass
    the comparison only if TRL's option were a no-op too)."""
    options, keys = TRL_CASES[case]
    loss, grad, ent_grad, _ = _run_case(options)
    plain_loss, plain_grad, plain_ent_grad, _ = _run_case({k: v for k, v in options.items() if k not in keys})
    assert loss != plain_loss
    if "entropy_coef" in keys:  # the bonus's gradient goes to the entropies
        assert ent_grad is not None and plain_ent_grad is None and ent_grad.abs().sum() > 0
    if keys != ["entropy_coef"]:
        assert not torch.equal(grad, plain_grad)


def _mask_fractions(options, seed=0):
    """The fractions of scored tokens (or of non-empty sequences) that each of TRL's masks keeps."""
    logprobs, old, _, sampling, entropies, advantages, mask = _trl_inputs(seed)
    scored = mask.bool()
    out = {}
    if "is_mode" in options:
        ratio = _trl_vllm_is_ratio(old, sampling, mask, *options["is_mode"])
        ratio = ratio.expand_as(mask)[scored]
        mode, low, high = options["is_mode"]
        bounded = ((ratio == 0) if mode.endswith("mask") else ((ratio == low) | (ratio == high)))
        out["is"] = bounded.float().mean().item()
    if "off_policy_mask_threshold" in options:
        sampling = sampling if options.get("sampling") else old
        kl = ((sampling - logprobs) * mask).sum(1) / mask.sum(1).clamp(min=1)
        dropped = (advantages < 0) & (kl > options["off_policy_mask_threshold"])
        out["opsm"] = dropped[scored.any(1)].float().mean().item()
    return out


@pytest.mark.parametrize("case", [c for c in TRL_CASES if c.startswith(("is-", "opsm", "vespo-token"))])
def test_trl_masks_both_keep_and_drop_on_the_test_data(case):
    """The IS ratios are bounded (truncated / masked) for some tokens and not others, and OPSM
    drops some sequences and keeps others: both branches of each are compared with TRL."""
    for name, fraction in _mask_fractions(TRL_CASES[case][0]).items():
        assert 0 < fraction < 1, (name, fraction)


def test_off_policy_mask_reads_sampling_logprobs():
    """OPSM measures the drift from the sampler's log-probs when given (TRL's
    sampling_per_token_logps), else from old_logprobs: the two masks differ on the test data."""
    options = dict(TRL_CASES["opsm-sampling-sequence"][0])
    with_sampling, grad, _, _ = _run_case(options)
    without, grad_without, _, _ = _run_case({**options, "sampling": False})
    assert with_sampling != without and not torch.equal(grad, grad_without)


def _single_token_batch():
    """A batch whose longest completion is one token (T = 1), with two empty completions; the
    unscored positions hold what TRL's fused lm_head gives there (log-prob 0, entropy 0)."""
    gen = torch.Generator().manual_seed(31)
    mask = torch.tensor([[1], [0], [1], [1], [0], [1]])
    logprobs = -torch.rand(6, 1, generator=gen) * 3 * mask
    old = (logprobs + 0.5 * torch.randn(6, 1, generator=gen)) * mask
    ref = (logprobs + 0.5 * torch.randn(6, 1, generator=gen)) * mask
    entropies = torch.rand(6, 1, generator=gen) * 3 * mask
    advantages = torch.tensor([-1.0, 0.5, 1.0, -0.7, -0.3, 0.8])
    return [t.to(DEVICE) for t in (logprobs, old, ref, entropies, advantages, mask)]


@pytest.mark.parametrize("options", [dict(loss_type="vespo"),
                                     dict(loss_type="grpo", importance_sampling_level="sequence"),
                                     dict(loss_type="dapo", beta=0.04), dict(loss_type="cispo", epsilon_high=1.1)],
                         ids=["vespo", "gspo", "dapo-kl", "cispo"])
def test_single_token_completions_with_empty_ones_match_trls_metrics(options):
    """T = 1: TRL reduces every [B, 1] metric input over the B sequences (it cannot tell them from
    sequence-level ones), empty completions included; the metrics must still equal TRL's."""
    logprobs, old, ref, entropies, advantages, mask = _single_token_batch()
    options = {"beta": 0.0, "epsilon_low": 0.2, "epsilon_high": 0.2, **options}
    common = dict(max_completion_length=1, num_processes=1)
    _, metrics = grpo_loss(logprobs, old, advantages, mask, ref_logprobs=ref, entropies=entropies, **options)
    references = [_trl_loss(logprobs, old, ref, advantages, mask, entropies=entropies,
                            num_items_in_batch=mask.sum(), **common, **options)[1]]
    if _have_trl():
        inputs = {"completion_mask": mask, "advantages": advantages, "old_per_token_logps": old,
                  "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
        references.append(_real_trl_loss(logprobs, entropies, inputs, **common, **options)[1])
    for ref_metrics in references:
        assert ref_metrics.keys() <= metrics.keys()
        for name, value in ref_metrics.items():
            assert metrics[name].item() == pytest.approx(value, rel=1e-6, abs=1e-7, nan_ok=True), name

@pytest.mark.parametrize("mode,clip_min,clip_max", [("token_truncate", 0.8, 1.25), ("token_mask", 0.8, 1.25),
                                                    ("sequence_truncate", None, 1.5), ("sequence_mask", 0.5, 3.0),
                                                    ("token_mask", None, 1.1), ("sequence_truncate", 0.7, None)])
def test_vllm_importance_sampling_ratio_matches_trl(mode, clip_min, clip_max):
    """TRL's generation-side ratio; NaN sampler log-probs (vLLM gave none) and junk at unscored
    positions give ratio 1 there (no correction), as TRL."""
    from thinkfuse.grpo import vllm_importance_sampling_ratio

    _, old, _, sampling, _, _, mask = _trl_inputs(1)
    sampling = sampling.clone()
    sampling[1, 2] = float("nan")
    ours = vllm_importance_sampling_ratio(old, sampling, mask, mode=mode, clip_min=clip_min, clip_max=clip_max)
    trl = _trl_vllm_is_ratio(old, sampling, mask, mode, clip_min, clip_max)
    torch.testing.assert_close(ours, trl, rtol=1e-6, atol=0)
    assert ours.shape == ((BIG_B, 1) if mode.startswith("sequence") else (BIG_B, BIG_T))
    junk = vllm_importance_sampling_ratio(old, sampling.masked_fill(mask == 0, float("-inf")), mask, mode=mode,
                                          clip_min=clip_min, clip_max=clip_max)
    torch.testing.assert_close(junk, ours)


def test_high_entropy_mask_threshold_is_torch_quantile_bit_for_bit():
    """The sort-based threshold equals torch.quantile's (linear interpolation) exactly, ties
    included: a token whose entropy equals the threshold is kept by both."""
    from thinkfuse.grpo import _high_entropy_mask

    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        entropies = torch.rand(5, 13, generator=gen) * 4
        if seed % 2:
            entropies = (entropies * 2).round() / 2  # many ties
        scored = torch.rand(5, 13, generator=gen) > 0.3
        q = float(torch.rand((), generator=gen)) if seed % 3 else [0.0, 0.2, 0.5, 1.0][seed % 4]
        threshold = torch.quantile(entropies[scored], q)
        expected = ((entropies * scored.float()) >= threshold) & scored
        assert torch.equal(_high_entropy_mask(entropies, scored, q), expected), seed
    assert not _high_entropy_mask(entropies, torch.zeros_like(scored), 0.5).any()
    empty = torch.zeros(0, 13)
    assert _high_entropy_mask(empty, empty.bool(), 0.5).shape == (0, 13)  # no token at all


def test_trl_options_unscored_positions_cannot_make_nan():
    """-inf / NaN / huge values where mask == 0 in every per-token input of the new options
    change nothing."""
    options = dict(loss_type="dapo", importance_sampling_level="sequence", top_entropy_quantile=0.5,
                   entropy_coef=0.01, off_policy_mask_threshold=0.05, beta=0.04, use_bias_correction_kl=True)
    logprobs, old, ref, sampling, entropies, advantages, mask = _trl_inputs(2)
    ratio = _trl_vllm_is_ratio(old, sampling, mask, "token_truncate", 0.8, 1.25)
    junk = mask == 0
    results = []
    for dirty in (False, True):
        fill = (lambda t, v: t.masked_fill(junk, v)) if dirty else (lambda t, v: t)
        for loss_type in ("dapo", "cispo", "vespo"):
            x = fill(logprobs, float("-inf")).clone().requires_grad_()
            loss, metrics = grpo_loss(x, fill(old, float("-inf")), advantages, mask, ref_logprobs=fill(ref, 1e4),
                                      entropies=fill(entropies, float("nan")), sampling_logprobs=fill(sampling, 1e4),
                                      importance_sampling_ratio=fill(ratio, float("nan")),
                                      **{**options, "loss_type": loss_type})
            loss.backward()
            results.append((loss.detach(), x.grad, metrics))
    for (loss, grad, metrics), (loss_d, grad_d, metrics_d) in zip(results[:3], results[3:]):
        assert torch.isfinite(loss_d)
        torch.testing.assert_close(loss_d, loss)
        torch.testing.assert_close(grad_d, grad)
        for name in metrics:
            torch.testing.assert_close(metrics_d[name], metrics[name], equal_nan=True)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(importance_sampling_level="sequence_token"), ValueError, "importance_sampling_level must be one of"),
        (dict(loss_type="cispo", delta=2.0), ValueError, "delta"),
        (dict(top_entropy_quantile=0.5), ValueError, "need entropies"),
        (dict(entropy_coef=0.1), ValueError, "need entropies"),
        (dict(top_entropy_quantile=1.5, entropies=True), ValueError, "top_entropy_quantile must be in"),
        (dict(top_entropy_quantile="0.5", entropies=True), TypeError, "top_entropy_quantile"),
        (dict(entropy_coef=float("inf"), entropies=True), ValueError, "entropy_coef must be finite"),
        (dict(entropies=torch.zeros(BIG_B, BIG_T + 1)), ValueError, "entropies shape"),
        (dict(importance_sampling_ratio=torch.ones(BIG_B, 2)), ValueError, "importance_sampling_ratio must have"),
        (dict(importance_sampling_ratio=torch.ones(BIG_B)), ValueError, "importance_sampling_ratio must be 2-D"),
        (dict(loss_type="vespo", importance_sampling_ratio=torch.ones(BIG_B, 1)), ValueError, "vespo"),
        (dict(sampling_logprobs=torch.zeros(BIG_B + 1, BIG_T)), ValueError, "sampling_logprobs shape"),
        (dict(off_policy_mask_threshold="x"), TypeError, "off_policy_mask_threshold"),
        (dict(loss_type="sapo", sapo_temperature_neg=0.0), ValueError, "sapo_temperature_neg must be > 0"),
        (dict(loss_type="vespo", vespo_lambda_pos=float("nan")), ValueError, "vespo_lambda_pos"),
    ],
)
def test_trl_options_bad_inputs(kwargs, error, match):
    logprobs, old, _, _, entropies, advantages, mask = _trl_inputs(3)
    kwargs = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    if kwargs.get("entropies") is True:
        kwargs["entropies"] = entropies
    with pytest.raises(error, match=match):
        grpo_loss(logprobs, old, advantages, mask, **kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(mode="token"), ValueError, "mode must be one of"),
    (dict(mode="token_truncate", clip_min=None, clip_max=None), ValueError, "needs clip_min or clip_max"),
    (dict(clip_min=2.0, clip_max=1.0), ValueError, "clip_min"),
    (dict(clip_max="3"), TypeError, "clip_max"),
])
def test_vllm_importance_sampling_ratio_bad_inputs(kwargs, error, match):
    from thinkfuse.grpo import vllm_importance_sampling_ratio

    _, old, _, sampling, _, _, mask = _trl_inputs(3)
    with pytest.raises(error, match=match):
        vllm_importance_sampling_ratio(old, sampling, mask, **kwargs)
    with pytest.raises(ValueError, match="sampling_logprobs shape"):
        vllm_importance_sampling_ratio(old, sampling[:, 1:], mask)


# --- GRPOLoss with the new options ----------------------------------------------------------------


MODULE_CASES = {
    "gspo-grpo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=0.05, epsilon_high=0.05),
    "cispo": dict(loss_type="cispo", epsilon_high=1.3),
    "sapo": dict(loss_type="sapo"),
    "luspo-sequence": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "vespo": dict(loss_type="vespo"),
    "top-entropy-bonus-dapo": dict(loss_type="dapo", top_entropy_quantile=0.4, entropy_coef=0.05),
    "opsm": dict(loss_type="grpo", off_policy_mask_threshold=0.0),
}


@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_grpo_loss_module_new_options_match_materialised_logits(backend, case):
    """GRPOLoss with each new option (one-pass where the loss is per-token, the differentiated
    fused op otherwise; entropies from the fused op when needed) equals grpo_loss on log-probs and
    entropies from materialised logits: loss, gradients w.r.t. hidden / weight / bias, metrics."""
    options = MODULE_CASES[case]
    hidden, weight, bias, ids = _module_inputs(seed=21)
    _, old, ref, advantages, mask = _batch(22)
    old, ref = old - 2.5, ref - 2.5
    ratio = torch.rand(B, T, generator=torch.Generator().manual_seed(3)).to(DEVICE) + 0.5

    def run(use_module):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        if use_module:
            module = GRPOLoss(beta=0.04, chunk_size=5, backend=backend, **options)
            loss, metrics = module(leaves[0], leaves[1], ids, mask, advantages, old, ref, bias=leaves[2],
                                   temperature=0.9, num_items_in_batch=30, importance_sampling_ratio=ratio)
        else:
            logprobs, entropies = reference.fused_linear_token_logprobs(
                leaves[0], leaves[1], ids.masked_fill(mask == 0, -100), leaves[2], 0.9, return_entropy=True)
            needs_entropy = options.get("top_entropy_quantile", 1.0) < 1 or options.get("entropy_coef", 0.0) != 0
            loss, metrics = grpo_loss(logprobs, old, advantages, mask, ref_logprobs=ref, beta=0.04,
                                      num_items_in_batch=30, importance_sampling_ratio=ratio,
                                      entropies=entropies if needs_entropy else None, **options)
        loss.backward()
        return loss.detach(), metrics, [t.grad for t in leaves]

    metrics, ref_metrics = _module_against_materialised(run, tol=1e-4)
    assert metrics.keys() - {"logprobs"} == ref_metrics.keys()
    for key in ref_metrics:
        assert_close_fp32(metrics[key], ref_metrics[key], tol=1e-4)


def test_grpo_loss_module_uses_one_pass_only_for_per_token_losses(monkeypatch):
    import thinkfuse.grpo as grpo_module

    calls = []
    original = grpo_module._one_pass_grpo
    monkeypatch.setattr(grpo_module, "_one_pass_grpo", lambda *a, **k: calls.append(1) or original(*a, **k))
    hidden, weight, _, ids = _module_inputs(seed=23)
    _, old, _, advantages, mask = _batch(24)
    for options, one_pass in [(dict(loss_type="cispo"), True), (dict(loss_type="sapo"), True),
                              (dict(loss_type="luspo"), True), (dict(loss_type="vespo"), False),
                              (dict(importance_sampling_level="sequence"), False),
                              (dict(off_policy_mask_threshold=0.1), False), (dict(top_entropy_quantile=0.5), False),
                              (dict(entropy_coef=0.1), False)]:
        calls.clear()
        GRPOLoss(**options)(hidden.clone().requires_grad_(), weight, ids, mask, advantages, old - 2.5)[0].backward()
        assert bool(calls) == one_pass, options


def test_grpo_loss_module_rejects_bad_importance_sampling_level():
    with pytest.raises(ValueError, match="importance_sampling_level"):
        GRPOLoss(importance_sampling_level="seq")


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


def test_patch_trl_nested_and_undone_in_any_order_restores_trl(trl_utils, monkeypatch):
    """Two patches (say a library's and a script's): undone in the order they were made, or in
    reverse, or inside a with block left by an exception, TRL ends up exactly as it was."""
    from thinkfuse.grpo import patch_trl

    originals = (trl_utils._ChunkedLogProbFunction, trl_utils.selective_log_softmax)
    for name, value in zip(("_ChunkedLogProbFunction", "selective_log_softmax"), originals):
        monkeypatch.setattr(trl_utils, name, value)  # restored after the test even if it fails
    current = lambda: (trl_utils._ChunkedLogProbFunction, trl_utils.selective_log_softmax)  # noqa: E731
    first, second = patch_trl(), patch_trl()
    first.undo()
    assert trl_utils._ChunkedLogProbFunction.__name__ == "ThinkfuseChunkedLogProb"  # the second still holds
    second.undo()
    assert current() == originals
    with pytest.raises(KeyError):
        with patch_trl():
            with patch_trl(backend="torch"):
                raise KeyError("inside")
    assert current() == originals


def test_patch_trl_that_fails_part_way_leaves_trl_as_it_was(trl_utils, monkeypatch):
    """An error while patching (here: trl.trainer.grpo_trainer fails to import, e.g. an optional
    dependency of it is broken) propagates, and what was already replaced is put back."""
    import importlib

    from thinkfuse.grpo import patch_trl

    originals = (trl_utils._ChunkedLogProbFunction, trl_utils.selective_log_softmax)
    for name, value in zip(("_ChunkedLogProbFunction", "selective_log_softmax"), originals):
        monkeypatch.setattr(trl_utils, name, value)  # restored after the test even if it fails
    import_module = importlib.import_module

    def failing_import(name, *args):
        if name == "trl.trainer.grpo_trainer":
            raise ImportError("broken optional dependency")
        return import_module(name, *args)

    monkeypatch.setattr(importlib, "import_module", failing_import)
    with pytest.raises(ImportError, match="broken optional dependency"):
        patch_trl()
    assert (trl_utils._ChunkedLogProbFunction, trl_utils.selective_log_softmax) == originals


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


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_entropy_quantile_over_every_rank(tmp_path, monkeypatch):
    """entropy_quantile_group=WORLD: the top-entropy threshold is the quantile of every rank's
    scored entropies (TRL's get_high_entropy_mask gathers them), with ranks of different batch
    and completion lengths; each rank's loss and gradient are those of its own tokens under
    that mask. Two gloo processes on the CPU."""
    import torch.multiprocessing as mp
    from distributed_helpers import entropy_quantile_worker

    import thinkfuse.grpo as grpo

    inputs = []
    for rank, (B, T) in enumerate([(4, 9), (3, 14)]):
        gen = torch.Generator().manual_seed(100 + rank)
        logprobs = -torch.rand(B, T, generator=gen) * 3
        old = logprobs + 0.3 * torch.randn(B, T, generator=gen)
        mask = (torch.rand(B, T, generator=gen) > 0.3).long()
        entropies = torch.rand(B, T, generator=gen) * (2 + 3 * rank)  # rank 1's run higher
        inputs.append((logprobs, old, torch.randn(B, generator=gen), mask, entropies, 0.4))
    mp.spawn(entropy_quantile_worker, args=(2, _free_port(), inputs, str(tmp_path)), nprocs=2, join=True)

    everyone = torch.cat([entropies[mask.bool()] for _, _, _, mask, entropies, _ in inputs])
    threshold = torch.quantile(everyone, 1 - 0.4)
    for rank, (logprobs, old, advantages, mask, entropies, quantile) in enumerate(inputs):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        expected_mask = (entropies >= threshold) & mask.bool()
        assert torch.equal(got["mask"], expected_mask)
        local = grpo._high_entropy_mask(entropies, mask != 0, 1 - quantile)
        assert not torch.equal(local, expected_mask)  # the ranks' threshold is not this rank's own
        monkeypatch.setattr(grpo, "_high_entropy_mask", lambda *args: expected_mask)
        x = logprobs.clone().requires_grad_()
        loss, metrics = grpo_loss(x, old, advantages, mask, entropies=entropies, top_entropy_quantile=quantile,
                                  loss_type="dapo")
        loss.backward()
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=0, atol=0)
        torch.testing.assert_close(got["grad"], x.grad, rtol=0, atol=0)
        monkeypatch.undo()


def test_entropy_quantile_group_needs_torch_distributed():
    logprobs, old, _, advantages, mask = _batch()
    with pytest.raises(ValueError, match="entropy_quantile_group needs torch.distributed"):
        grpo_loss(logprobs, old, advantages, mask, entropies=torch.rand_like(logprobs), top_entropy_quantile=0.5,
                  entropy_quantile_group=object())


# --- GRPOLoss copies: deepcopy and pickle with a process group ----------------------------------


@pytest.fixture
def single_process_group():
    """A one-rank gloo ProcessGroup in this process (a HashStore: no port), torn down after, so
    that other tests still see torch.distributed uninitialised."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("torch.distributed is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.new_group([0])
    finally:
        dist.destroy_process_group()


def _entropy_masked_loss(module, monkeypatch):
    """module's loss on fixed inputs, with the entropy mask's process group recorded."""
    import thinkfuse.grpo as grpo

    groups_used, mask_of = [], grpo._high_entropy_mask

    def recording_mask(entropies, scored, threshold, group=None):
        groups_used.append(group)
        return mask_of(entropies, scored, threshold, group)

    monkeypatch.setattr(grpo, "_high_entropy_mask", recording_mask)
    hidden, weight, bias, ids = _module_inputs(seed=21)
    _, old, _, advantages, mask = _batch(21)
    loss, _ = module(hidden, weight, ids, mask, advantages, old - 2.5, bias=bias)
    monkeypatch.undo()
    return loss, groups_used


def test_deepcopy_of_grpo_loss_shares_its_process_group(single_process_group, monkeypatch):
    """A deepcopy stays in this process: the same communicator, not a copy of it."""
    import copy

    module = GRPOLoss(top_entropy_quantile=0.5, entropy_quantile_group=single_process_group, backend="torch")
    copied = copy.deepcopy(module)
    assert copied.entropy_quantile_group is single_process_group
    loss, groups_used = _entropy_masked_loss(copied, monkeypatch)
    assert groups_used == [single_process_group]
    torch.testing.assert_close(loss, _entropy_masked_loss(module, monkeypatch)[0], rtol=0, atol=0)
    copied.entropy_quantile_group = None  # the copy's own setting, not the original's
    assert module.entropy_quantile_group is single_process_group


def test_pickled_grpo_loss_leaves_its_process_group_out(single_process_group, monkeypatch):
    """A pickle may be loaded in another process: the group is left out, and a forward that needs
    it raises (rather than taking the quantile over this rank's tokens only) until it is set."""
    import pickle

    module = GRPOLoss(top_entropy_quantile=0.5, entropy_quantile_group=single_process_group, backend="torch")
    restored = pickle.loads(pickle.dumps(module))
    assert restored.top_entropy_quantile == 0.5 and restored.backend == "torch"
    with pytest.raises(RuntimeError, match="unpickled without its entropy_quantile_group"):
        _entropy_masked_loss(restored, monkeypatch)
    with pytest.raises(RuntimeError, match="unpickled without its entropy_quantile_group"):
        restored.entropy_quantile_group
    restored.entropy_quantile_group = single_process_group
    loss, groups_used = _entropy_masked_loss(restored, monkeypatch)
    assert groups_used == [single_process_group]
    torch.testing.assert_close(loss, _entropy_masked_loss(module, monkeypatch)[0], rtol=0, atol=0)
    # Pickled twice: the first pickle's leaving-out is not forgotten (the group is not None).
    with pytest.raises(RuntimeError, match="unpickled without"):
        pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(module)))).entropy_quantile_group


def test_pickled_grpo_loss_without_an_entropy_mask_runs_without_its_group(single_process_group):
    """With top_entropy_quantile 1 the group is never used, so the unpickled module runs as is."""
    import pickle

    module = GRPOLoss(entropy_quantile_group=single_process_group, backend="torch")
    restored = pickle.loads(pickle.dumps(module))
    hidden, weight, bias, ids = _module_inputs(seed=22)
    _, old, _, advantages, mask = _batch(22)
    with torch.no_grad():
        expected, _ = module(hidden, weight, ids, mask, advantages, old - 2.5, bias=bias)
        loss, _ = restored(hidden, weight, ids, mask, advantages, old - 2.5, bias=bias)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


def test_grpo_loss_without_a_group_copies_and_pickles_as_before():
    import copy
    import pickle

    module = GRPOLoss(top_entropy_quantile=0.5, backend="torch")
    for copied in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert copied.entropy_quantile_group is None and copied._group_for_forward() is None
