"""bench/e2e.py without a GPU: its case lists, FLOP counts and derived numbers, the Liger
global-patch containment, and the decode-step workloads on tiny MiMo (the smoke run in
test_bench_smoke.py only checks that every e2e row is ok or missing)."""

from __future__ import annotations

import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import thinkfuse  # noqa: E402
from bench import e2e, harness  # noqa: E402


def _config(**overrides) -> harness.Config:
    presets, _ = harness.load_presets()
    config = dict(smoke=False, device=torch.device("cuda", 0), dtype=torch.bfloat16,
                  modes=("fwd", "fwd+bwd"), presets=presets, compile_backend="inductor")
    return harness.Config(**(config | overrides))


def _smoke_config() -> harness.Config:
    return _config(smoke=True, device=torch.device("cpu"), dtype=torch.float32, compile_backend="aot_eager")


def test_gpu_case_list():
    cases = e2e.cases(_config())
    counts = Counter((c.variant, c.impl, c.mode) for c in cases)
    presets = len(_config().presets)
    assert counts[("train-step", "hf-sdpa", "fwd+bwd")] == presets
    assert counts[("train-step", "thinkfuse", "fwd+bwd")] == presets
    assert counts[("train-step", "liger", "fwd+bwd")] == presets
    grpo = {(c.model, c.shape["tokens"], c.impl) for c in cases if c.variant == "grpo-step"}
    assert grpo == {(m, t, i) for m in e2e.GRPO_PRESETS for t in e2e.GRPO_TOKENS
                    for i in ("thinkfuse", "trl-materialised")}
    full = [c for c in cases if c.variant == "grpo-model-step"]
    assert {(c.model, c.shape["tokens"], c.impl) for c in full} == {
        ("palmyra-mini", 32768, "thinkfuse"), ("palmyra-mini", 32768, "trl-materialised")}
    layers = harness.load_presets()[0]["palmyra-mini"]["num_hidden_layers"]
    assert full[0].flops == e2e.train_flops(_config().presets["palmyra-mini"], layers, 32, 1024)
    assert {(c.variant, c.impl) for c in cases if c.mode == "fwd"} == {
        ("decode", "hf-sdpa"), ("decode", "thinkfuse-mtp"), ("decode", "thinkfuse-mtp-graph"),
        ("decode", "thinkfuse-mtp-graph-sampled"),
        ("decode", "hf-static-compile"), ("decode", "thinkfuse-static-compile"), ("decode", "thinkfuse-graph"),
        ("decode-step", "hf-sdpa"), ("decode-step", "thinkfuse"), ("decode-step", "thinkfuse-mtp")}
    assert {c.model for c in cases if c.mode == "fwd"} == {"mimo-7b"}
    # Liger has no Ministral 3 entry point: those rows are missing with a reason, never absent.
    assert all(c.missing for c in cases if c.impl == "liger" and c.model.startswith("ministral-3"))
    # Mode and model filters: no decode rows for fwd+bwd only, none for a preset without MTP.
    assert {c.mode for c in e2e.cases(_config(modes=("fwd+bwd",)))} == {"fwd+bwd"}
    presets, _ = harness.load_presets()
    palmyra = e2e.cases(_config(presets={"palmyra-mini": presets["palmyra-mini"]}))
    assert {c.variant for c in palmyra} == {"train-step", "grpo-step", "grpo-model-step"}


def test_train_flops():
    spec = harness.load_presets()[0]["palmyra-mini"]
    h, i, v, d, hq, hkv, layers, b, s = 1536, 8960, 151936, 128, 12, 2, 2, 2, 4096
    per_layer = 2 * h * hq * d + 2 * h * hkv * d + 3 * h * i
    forward = 2 * b * s * (layers * per_layer + h * v) + layers * 2 * b * hq * s * s * d
    assert e2e.train_flops(spec, layers, b, s) == 3 * forward


def test_liger_globals_are_applied_only_around_the_forward():
    modeling = types.ModuleType("fake_modeling_for_e2e")
    modeling.apply_rotary_pos_emb = "hf"
    sys.modules[modeling.__name__] = modeling
    seen = {}

    def apply_fake(model=None, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                   fused_linear_cross_entropy=True):
        seen.update(cross_entropy=cross_entropy, fused_linear_cross_entropy=fused_linear_cross_entropy)
        modeling.apply_rotary_pos_emb = "liger"
        modeling.LigerOnly = object()

    try:
        context = e2e._liger_patch(apply_fake, modeling.__name__, model=None)
        assert seen == {"cross_entropy": False, "fused_linear_cross_entropy": True}
        assert modeling.apply_rotary_pos_emb == "hf" and not hasattr(modeling, "LigerOnly")
        with context():
            assert modeling.apply_rotary_pos_emb == "liger" and hasattr(modeling, "LigerOnly")
        assert modeling.apply_rotary_pos_emb == "hf" and not hasattr(modeling, "LigerOnly")
    finally:
        del sys.modules[modeling.__name__]


def test_decode_steps_leave_the_caches_as_they_found_them():
    config = _smoke_config()
    spec = e2e.ModelSpec("tiny-mimo", "mimo", None)
    model = e2e._decode_model(spec, False, config)
    ctx = e2e._prefill(model, 12, config)
    with torch.no_grad():
        plain = [e2e._plain_step(model, ctx) for _ in range(2)]
        drafts = [e2e._mtp_step(model, ctx) for _ in range(2)]
        # the verify forward's first token is the plain step's greedy token
        mask = torch.ones((1, 14), dtype=torch.int64)
        outputs = model(torch.stack([ctx.pending, ctx.draft], 1), attention_mask=mask,
                        position_ids=12 + torch.arange(2)[None], past_key_values=ctx.trunk_cache)
    assert torch.equal(plain[0], plain[1]) and torch.equal(drafts[0], drafts[1])
    assert torch.equal(outputs.logits[:, 0].argmax(-1), plain[0])
    assert ctx.mtp_cache.get_seq_length() == 12


def test_padded_decode_step_matches_between_hf_and_thinkfuse():
    """The left-padded batch step: repeatable (the cache is cropped back), and the patched
    model's step (cache_leftpad) gives the unpatched one's logits."""
    config = _smoke_config()
    spec = e2e.ModelSpec("tiny-mimo", "mimo", None)
    try:
        logits = {}
        for patched in (False, True):
            model = e2e._decode_model(spec, patched, config)
            ctx = e2e._prefill(model, 12, config, batch=4)
            assert ctx.padding.tolist() == [0, 1, 3, 4]
            with torch.no_grad():
                tokens = [e2e._plain_step(model, ctx) for _ in range(2)]
                assert torch.equal(tokens[0], tokens[1]) and ctx.trunk_cache.get_seq_length() == 12
                mask = e2e._padding_mask(ctx, 1)
                logits[patched] = model(ctx.pending[:, None], attention_mask=mask,
                                        position_ids=mask.sum(-1, keepdim=True) - 1,
                                        past_key_values=ctx.trunk_cache).logits
        torch.testing.assert_close(logits[True], logits[False], rtol=2e-2, atol=2e-2)
    finally:
        e2e._DECODE_MODEL.clear()


def _is_patched(model) -> bool:
    from thinkfuse.patching.engine import _STATE_ATTR

    return any(_STATE_ATTR in module.__dict__ for module in model.modules())


def test_decode_rows_share_one_model_and_set_its_patch_state():
    """The decode rows build their (7B on a GPU) model once per job; each row's build leaves it
    patched or restored to HF's forwards, as the row needs."""
    config = _smoke_config()
    spec = e2e.ModelSpec("tiny-mimo", "mimo", None)
    try:
        plain = e2e._decode_model(spec, False, config)
        assert not _is_patched(plain)
        first_prompt = torch.randint(0, 100, (4,))
        patched = e2e._decode_model(spec, True, config)
        assert patched is plain and _is_patched(patched)
        again = e2e._decode_model(spec, False, config)  # restores HF's forwards by itself
        assert again is plain and not _is_patched(again)
        assert torch.equal(torch.randint(0, 100, (4,)), first_prompt)  # same RNG state per row
        other = e2e._decode_model(e2e.ModelSpec("tiny-mimo-2", "mimo", None), False, config)
        assert other is not plain  # another spec: a new model, the old one let go
        assert len(e2e._DECODE_MODEL) == 1
    finally:
        e2e._DECODE_MODEL.clear()


def test_derived_numbers():
    rows = []
    for variant, shape, impl, ms in (
        ("train-step", {"tokens": 8192, "seq": 4096, "layers": 2}, "hf-sdpa", 200.0),
        ("decode", {"batch": 1, "prompt": 128, "new_tokens": 128}, "thinkfuse-mtp", 2000.0),
        ("decode-step", {"batch": 1, "context": 192}, "hf-sdpa", 20.0),
        ("decode-step", {"batch": 1, "context": 192}, "thinkfuse-mtp", 25.0),
        ("decode-step", {"batch": 8, "context": 192, "padding": "left"}, "thinkfuse", 40.0),
    ):
        case = harness.Case(op="e2e", impl=impl, variant=variant, mode="fwd", shape=shape, model="mimo-7b",
                            dtype=torch.bfloat16)
        rows.append(harness.base_row(case) | {"status": "ok", "median_ms": ms})
    expected = [8192 / 0.2, 128 / 2.0, 50.0, 1.9 / 0.025, 8 / 0.04]
    assert [e2e.tokens_per_s(r) for r in rows] == pytest.approx(expected)
    (cost,) = e2e.step_costs(rows)
    assert cost["vs"] == "hf-sdpa" and cost["cost_ratio"] == 1.25
    assert abs(cost["implied_speedup"] - 1.9 / 1.25) < 1e-12
    assert any("1.52x" in line for line in e2e.summary_lines(rows))
    assert e2e.graph_costs(rows) == []  # no graph row


def test_graph_generate_cost_ratio():
    rows = []
    for impl, ms in (("hf-sdpa", 3000.0), ("thinkfuse-mtp-graph", 600.0), ("thinkfuse-mtp", 4000.0),
                     ("thinkfuse-graph", 500.0)):
        case = harness.Case(op="e2e", impl=impl, variant="decode", mode="fwd",
                            shape={"batch": 1, "prompt": 128, "new_tokens": 64}, model="mimo-7b", dtype=torch.bfloat16)
        rows.append(harness.base_row(case) | {"status": "ok", "median_ms": ms})
    cost, own = e2e.graph_costs(rows)
    assert cost["vs"] == "hf-sdpa" and cost["cost_ratio"] == pytest.approx(0.2)
    assert cost["implied_speedup"] == pytest.approx(1.9 / 0.2)
    assert own["vs"] == "thinkfuse-graph" and own["implied_speedup"] == pytest.approx(1.9 / 1.2)
    assert any("thinkfuse-mtp-graph / hf-sdpa = 0.200 -> 9.50x" in line for line in e2e.summary_lines(rows))


def test_grpo_model_step_rows_compute_the_same_loss():
    """The two grpo-model-step workloads (patched + GRPOLoss, unpatched + materialised logits)
    build the same tiny model, tokens and advantages, so their losses and gradients agree."""
    config = _smoke_config()
    cases = {c.impl: c for c in e2e.grpo_model_cases(config)}
    assert set(cases) == {"thinkfuse", "trl-materialised"}
    results = {}
    for impl, case in cases.items():
        workload = case.build()
        loss = workload.forward()
        grads = torch.autograd.grad(loss, workload.inputs)
        results[impl] = (loss.detach(), grads)
    (loss_a, grads_a), (loss_b, grads_b) = results["thinkfuse"], results["trl-materialised"]
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
