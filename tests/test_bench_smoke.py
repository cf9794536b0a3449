"""The benchmark harness on CPU: the smoke run covers every case and claims no speed.

The subprocess runs ``python -m bench --smoke`` exactly as a user would (torch.compile rows use
the aot_eager backend there, see bench/harness.py). Other tests check the GPU case list, the
byte counts and the derived-metric arithmetic in-process without timing anything.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# `bench` is a top-level package of the repository, not installed: importable from the repo
# root with `python -m pytest`, and with a bare `pytest` only through this.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import harness, logprobs, mtp_verify, rms_norm, rope, swiglu, tune  # noqa: E402

# The smoke shapes the harness promises: tokens 8, hidden 64 and 1000.
SMOKE_SHAPES = ("8x64", "8x1000")
VARIANTS = ("norm", "add+norm")
MODES = ("fwd", "fwd+bwd")
# These implementations can always run on CPU; the others may be "missing" with a reason.
CPU_IMPLS = ("thinkfuse-torch", "thinkfuse-torch-apply_rotary", "thinkfuse-torch-fused", "hf-eager", "torch-compile",
             "trl-selective-log-softmax", "materialised", "verl-chunked", "vllm-style")
THINKFUSE_IMPLS = ("thinkfuse-cuda", "thinkfuse-triton", "thinkfuse-torch")
BASELINES = ("hf-eager", "torch-compile", "liger")

# rope: 8 tokens, 4/2 heads, head_dim 16; one tiny preset per RoPE variant.
ROPE_SMOKE_SHAPES = ("8x4x2x16",)
ROPE_VARIANTS = ("default", "yarn+temperature")
ROPE_IMPLS = (*THINKFUSE_IMPLS, *(f"{name}-apply_rotary" for name in THINKFUSE_IMPLS), *BASELINES, "flashinfer")
# swiglu: 8 tokens, intermediate 64 and 1000.
SWIGLU_SMOKE_SHAPES = ("8x64", "8x1000")
SWIGLU_IMPLS = (*THINKFUSE_IMPLS, *(f"{name}-fused" for name in THINKFUSE_IMPLS), *BASELINES)
# logprobs: token_logprobs on 8 tokens x V 1000; fused_linear on 8 tokens x hidden 64 x V 1000.
TOKEN_LOGPROBS_IMPLS = (*THINKFUSE_IMPLS, "trl-selective-log-softmax", "torch-compile")
FUSED_LINEAR_IMPLS = (*THINKFUSE_IMPLS, "materialised", "verl-chunked", "liger")
ONE_PASS_IMPLS = tuple(f"{name}-one-pass" for name in THINKFUSE_IMPLS)  # fwd+bwd rows only
# mtp_verify: B 2, K 2, V 64; forward only (not differentiable).
MTP_VARIANTS = ("greedy", "sample", "sample+draft_probs")
MTP_IMPLS = (*THINKFUSE_IMPLS, "thinkfuse-cuda-rowblock", "vllm-style", "flashinfer")
ALL_OPS = ("logprobs", "mtp_verify", "rms_norm", "rope", "swiglu")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-smoke")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    return out, json.loads((out / "results.json").read_text())


def test_smoke_has_a_row_for_every_rms_norm_case_and_implementation(smoke):
    _, results = smoke
    rows = [r for r in results["rows"] if r["op"] == "rms_norm"]
    keys = [(r["variant"], r["shape_label"], r["mode"], r["impl"]) for r in rows]
    expected = set(itertools.product(VARIANTS, SMOKE_SHAPES, MODES, harness.IMPL_ORDER))
    assert len(keys) == len(set(keys)), "duplicate rows"
    assert set(keys) == expected


def _row_keys(results, op):
    rows = [r for r in results["rows"] if r["op"] == op]
    keys = [(r["variant"], r["shape_label"], r["mode"], r["impl"]) for r in rows]
    assert len(keys) == len(set(keys)), f"duplicate {op} rows"
    return set(keys)


def test_smoke_has_a_row_for_every_rope_case_and_implementation(smoke):
    _, results = smoke
    expected = set(itertools.product(ROPE_VARIANTS, ROPE_SMOKE_SHAPES, MODES, ROPE_IMPLS))
    assert _row_keys(results, "rope") == expected
    models = {r["variant"]: r["model"] for r in results["rows"] if r["op"] == "rope"}
    assert models == {"default": "tiny-qwen2", "yarn+temperature": "tiny-ministral3"}


def test_smoke_has_a_row_for_every_swiglu_case_and_implementation(smoke):
    _, results = smoke
    expected = set(itertools.product(("silu*up",), SWIGLU_SMOKE_SHAPES, MODES, SWIGLU_IMPLS))
    assert _row_keys(results, "swiglu") == expected


def test_smoke_has_a_row_for_every_logprobs_case_and_implementation(smoke):
    _, results = smoke
    expected = set(itertools.product(("token_logprobs",), ("8x1000",), MODES, TOKEN_LOGPROBS_IMPLS))
    expected |= set(itertools.product(("fused_linear",), ("8x64x1000",), MODES, FUSED_LINEAR_IMPLS))
    expected |= set(itertools.product(("fused_linear",), ("8x64x1000",), ("fwd+bwd",), ONE_PASS_IMPLS))
    assert _row_keys(results, "logprobs") == expected


def test_smoke_has_a_row_for_every_mtp_verify_case_and_implementation(smoke):
    _, results = smoke
    expected = set(itertools.product(MTP_VARIANTS, ("2x2x64",), ("fwd",), MTP_IMPLS))
    assert _row_keys(results, "mtp_verify") == expected
    # FlashInfer's chain_speculative_sampling has no greedy mode: always missing, with a reason.
    greedy_flashinfer = [r for r in results["rows"] if r["op"] == "mtp_verify" and r["impl"] == "flashinfer"
                         and r["variant"] == "greedy"]
    assert [r["status"] for r in greedy_flashinfer] == ["missing"]


def test_smoke_rows_are_ok_or_missing_with_a_reason(smoke):
    _, results = smoke
    for row in results["rows"]:
        assert row["status"] in ("ok", "missing"), row
        if row["status"] == "missing":
            assert row["reason"], row
        if row["impl"] in CPU_IMPLS:
            assert row["status"] == "ok", row


def test_smoke_reports_no_speed_numbers(smoke):
    _, results = smoke
    meta = results["metadata"]
    assert meta["smoke"] is True
    assert meta["peaks"]["copy_gbps"] is None and meta["peaks"]["matmul_bf16_tflops"] is None
    for row in results["rows"]:
        assert all(row[key] is None for key in harness.METRIC_KEYS), row
        assert row["setup_s"] is None, row
        if row["status"] == "ok":
            assert row["timing"] == "smoke"


def test_smoke_writes_markdown_and_plots(smoke):
    out, results = smoke
    markdown = (out / "results.md").read_text()
    assert "Smoke run" in markdown
    for op in ALL_OPS:
        assert f"## {op}" in markdown
    assert markdown.count("Bytes counted") >= len(ALL_OPS)
    assert not (out / "rows.partial.jsonl").exists()
    pytest.importorskip("matplotlib")
    for op in ALL_OPS:
        assert (out / f"{op}_speedup_vs_hf_eager.png").stat().st_size > 0
        assert (out / f"{op}_copy_bw_fraction.png").stat().st_size > 0


def test_finalize_merges_killed_and_finished_runs(smoke, tmp_path):
    """A run killed outright leaves metadata.partial.json + rows.partial.jsonl; --finalize writes
    its results, merged with a finished run's results.json, and recomputes the derived metrics."""
    out, results = smoke
    killed = tmp_path / "killed"
    killed.mkdir()
    metadata = dict(results["metadata"], peaks={"copy_gbps": 1000.0, "matmul_bf16_tflops": 100.0})
    (killed / harness.PARTIAL_METADATA).write_text(json.dumps(metadata))
    row = dict(results["rows"][0], median_ms=2.0, bytes_moved=4_000_000, flops=None, status="ok")
    (killed / harness.PARTIAL_ROWS).write_text(json.dumps(row) + "\n")
    merged = tmp_path / "merged"
    assert harness.main(["--finalize", str(killed), str(out), "--out", str(merged), "--no-plots"]) == 1
    data = json.loads((merged / "results.json").read_text())
    assert len(data["rows"]) == 1 + len(results["rows"])
    assert data["rows"][0]["gbps"] == pytest.approx(2.0) and data["rows"][0]["frac_copy_bw"] == pytest.approx(2e-3)
    assert data["metadata"]["merged_from"] == [str(killed), str(out)] and data["metadata"]["interrupted"]
    assert not (merged / harness.PARTIAL_ROWS).exists()


def _finished_run(run_dir: Path, rows: list[dict], **metadata) -> Path:
    """A run directory as the harness leaves it: results.json with metadata and rows."""
    run_dir.mkdir()
    base = {"date_utc": "2026-11-23T10:00:00+00:00", "smoke": False, "device": "NVIDIA H100 80GB HBM3",
            "driver": "580.159.04", "cuda": "13.0", "torch": "2.11", "triton": "3.6", "transformers": "5",
            "liger_kernel": None, "thinkfuse": "-", "thinkfuse_backends": [], "git_commit": "aaaa111",
            "timing": "-", "compile_backend": "inductor", "models_json": "-", "bytes_counted": {},
            "peaks": {"copy_gbps": 3000.0, "matmul_bf16_tflops": 700.0}}
    (run_dir / "results.json").write_text(json.dumps({"metadata": base | metadata, "rows": rows}))
    return run_dir


def test_finalize_takes_the_peaks_of_a_run_that_measured_them(tmp_path):
    """gpu_check merges its jobs in alphabetical order, and the first job's metadata is the
    merged run's: a job stopped by its limit while it measured the device (the last job of a
    call, cut to the seconds left) has empty peaks, and every merged row lost its fraction of
    copy bandwidth and its L2 flag."""
    row = _timed_row("rms_norm", "norm", {"tokens": 4096, "hidden": 1536}, "thinkfuse-cuda", 0.01)
    row["bytes_moved"] = 30_000_000
    stopped = _finished_run(tmp_path / "attention", [], peaks={}, interrupted="signal 15")
    measured = _finished_run(tmp_path / "memory-bound", [row])
    out = tmp_path / "merged"
    harness.finalize([stopped, measured], out, plots=False)
    data = json.loads((out / "results.json").read_text())
    assert data["metadata"]["peaks"]["copy_gbps"] == 3000.0
    assert data["rows"][0]["frac_copy_bw"] == pytest.approx(3000.0 / 3000.0)


def test_finalize_names_every_commit_it_merges(tmp_path):
    """Runs of one session can be at different commits (a job rerun after a fix); the merged
    metadata named the first run's commit only, so rows measured at another passed for its."""
    first = _finished_run(tmp_path / "a", [], git_commit="aaaa111")
    second = _finished_run(tmp_path / "b", [], git_commit="bbbb222", date_utc="2026-11-23T11:00:00+00:00")
    same = _finished_run(tmp_path / "c", [], git_commit="aaaa111")
    out = tmp_path / "merged"
    harness.finalize([first, second, same], out, plots=False)
    metadata = json.loads((out / "results.json").read_text())["metadata"]
    assert "aaaa111" in metadata["git_commit"] and "bbbb222" in metadata["git_commit"]
    assert "bbbb222" in (out / "results.md").read_text()
    harness.finalize([first, same], tmp_path / "one-commit", plots=False)
    assert json.loads((tmp_path / "one-commit" / "results.json").read_text())["metadata"]["git_commit"] == "aaaa111"


def test_finalize_needs_an_output_directory():
    """Without --out, --finalize wrote to bench/results/<today>_<this machine's device>/: a GPU
    run's jobs finished on a laptop the next day became `<next day>_cpu`."""
    with pytest.raises(SystemExit):
        harness.parse_args(["--finalize", "some-run"])
    assert harness.parse_args(["--finalize", "some-run", "--out", "merged"]).out == Path("merged")


def test_thinkfuse_rows_get_speedups_over_every_baseline_of_their_group():
    def row(impl, ms, shape="s"):
        r = dict(op="attention", variant="v", shape_label=shape, mode="fwd", dtype="bfloat16", impl=impl,
                 bytes_moved=None, flops=None)
        return r | dict.fromkeys(harness.METRIC_KEYS) | {"median_ms": ms}

    rows = [row("thinkfuse-triton", 2.0), row("sdpa-flash", 3.0), row("sdpa-cudnn", 1.0), row("hf-eager", 8.0),
            row("thinkfuse-cuda", None), row("sdpa-flash", 1.0, shape="other")]
    harness.add_derived_metrics(rows, {})
    ours = rows[0]
    assert ours["speedup_vs"] == {"hf-eager": 4.0, "sdpa-cudnn": 0.5, "sdpa-flash": 1.5}
    assert ours["best_baseline"] == "sdpa-cudnn" and ours["speedup_vs_best_baseline"] == 0.5
    assert all(r["speedup_vs"] is None for r in rows[1:])  # baselines, an untimed row, another group


def _timed_row(op, variant, shape, impl, ms, model="m", timing="do_bench median (CUDA events)"):
    case = harness.Case(op=op, impl=impl, variant=variant, mode="fwd+bwd", shape=shape, model=model,
                        dtype=torch.bfloat16)
    return harness.base_row(case) | {"status": "ok", "median_ms": ms, "timing": timing}


def test_speedups_compare_rows_of_the_same_model_only():
    """e2e train-step rows of every preset share one shape (8192 tokens x 4096 x 2 layers): a
    full run's thinkfuse Palmyra-mini row was divided into the last preset's hf-sdpa time (a 7x
    slower model), not its own."""
    shape = {"tokens": 8192, "seq": 4096, "layers": 2}
    rows = [_timed_row("e2e", "train-step", shape, "hf-sdpa", 50.0, model="palmyra-mini"),
            _timed_row("e2e", "train-step", shape, "thinkfuse", 40.0, model="palmyra-mini"),
            _timed_row("e2e", "train-step", shape, "hf-sdpa", 400.0, model="am-thinking-v1"),
            _timed_row("e2e", "train-step", shape, "thinkfuse", 320.0, model="am-thinking-v1")]
    harness.add_derived_metrics(rows, {})
    assert rows[1]["speedup_vs"] == {"hf-sdpa": pytest.approx(1.25)}
    assert rows[3]["speedup_vs"] == {"hf-sdpa": pytest.approx(1.25)}


def test_speedups_compare_rows_timed_the_same_way_only():
    """mtp_verify's thinkfuse sampling rows are CUDA-graph replays (GPU time, no L2 flush) and
    vllm-style's plain do_bench (host launches, L2 flushed): their ratio (12.6x on the
    2026-11-23 H100) is not a speedup of the kernel. A thinkfuse row gets speedups only over
    baselines timed as it was."""
    graph = "do_bench_cudagraph median (CUDA graph replay: no host overhead)"
    shape = {"batch": 64, "drafts": 1, "vocab": 151680}
    rows = [_timed_row("mtp_verify", "sample", shape, "thinkfuse-cuda", 0.087, timing=graph),
            _timed_row("mtp_verify", "sample", shape, "thinkfuse-torch", 1.6),
            _timed_row("mtp_verify", "sample", shape, "vllm-style", 1.1),
            _timed_row("mtp_verify", "sample", shape, "hf-eager", 2.2)]
    harness.add_derived_metrics(rows, {})
    assert rows[0]["speedup_vs"] is None and rows[0]["best_baseline"] is None
    assert rows[0]["speedup_vs_hf_eager"] is None
    assert rows[1]["speedup_vs"] == {"hf-eager": pytest.approx(2.2 / 1.6), "vllm-style": pytest.approx(1.1 / 1.6)}
    assert rows[1]["speedup_vs_hf_eager"] == pytest.approx(2.2 / 1.6)


def test_an_op_whose_cases_fail_keeps_its_error_row_in_the_partial_rows(tmp_path, monkeypatch):
    """The error row of an op whose cases() raised was only in memory: a job killed later (as the
    logprobs and mtp_verify jobs were on 2026-11-23) wrote, or --finalize merged, its partial
    rows without it, and the op's failure vanished from the results."""
    def cases(op, config):
        if op == "broken":
            raise ImportError("no module named something")
        return []

    monkeypatch.setattr(harness, "op_cases", cases)
    config = _gpu_config(smoke=True, device=torch.device("cpu"))
    partial = tmp_path / harness.PARTIAL_ROWS
    rows = harness.run_ops(["broken", "fine"], config, partial)
    assert [r["status"] for r in rows] == ["error"]
    assert harness._read_partial(partial) == rows


def test_smoke_refuses_to_write_under_bench_results():
    with pytest.raises(SystemExit, match="refusing"):
        harness.main(["--smoke", "--out", str(harness.RESULTS_ROOT / "smoke")])
    assert not (harness.RESULTS_ROOT / "smoke").exists()


def _gpu_config(**overrides) -> harness.Config:
    """The configuration of a GPU run, built without a GPU (cases() allocates nothing)."""
    presets, _ = harness.load_presets()
    config = dict(smoke=False, device=torch.device("cuda", 0), dtype=torch.bfloat16,
                  modes=("fwd", "fwd+bwd"), presets=presets, compile_backend="inductor")
    return harness.Config(**(config | overrides))


def test_gpu_case_list_covers_tokens_hidden_sizes_variants_modes_and_impls():
    cases = rms_norm.cases(_gpu_config())
    keys = {(c.shape["tokens"], c.shape["hidden"], c.variant, c.mode, c.impl) for c in cases}
    expected = set(itertools.product(
        (4096, 16384), (1536, 3072, 4096, 5120), VARIANTS, MODES, harness.IMPL_ORDER))
    assert keys == expected and len(cases) == len(expected)
    assert {c.model for c in cases if c.shape["hidden"] == 5120} == {"am-thinking-v1,ministral-3-14b"}


def test_model_and_mode_filters():
    presets, _ = harness.load_presets()
    config = _gpu_config(presets={"mimo-7b": presets["mimo-7b"]}, modes=harness.MODE_CHOICES["bwd"])
    cases = rms_norm.cases(config)
    assert {c.shape["hidden"] for c in cases} == {4096}
    assert {c.mode for c in cases} == {"fwd+bwd"}
    assert {c.model for c in cases} == {"mimo-7b"}


def test_impl_filters(tmp_path):
    args = harness.parse_args(["--smoke", "--impl", "thinkfuse-cuda", "--impl", "hf-eager", "--skip-impl", "hf-eager"])
    config = harness.make_config(args, harness.load_presets()[0])
    assert config.selects("thinkfuse-cuda")
    assert not config.selects("hf-eager") and not config.selects("liger")
    assert _gpu_config().selects("anything")
    # the smoke run honours them: only the named implementation's rows
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--op", "swiglu", "--impl", "hf-eager", "--out", str(tmp_path)],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows and {row["impl"] for row in rows} == {"hf-eager"}


def test_bytes_counted():
    t, n, bf16 = 4096, 1536, 2
    assert rms_norm.bytes_moved(t, n, "norm", "fwd", torch.bfloat16) == (2 * t * n + n) * bf16
    assert rms_norm.bytes_moved(t, n, "add+norm", "fwd", torch.bfloat16) == (4 * t * n + n) * bf16
    assert rms_norm.bytes_moved(t, n, "norm", "fwd+bwd", torch.bfloat16) == (5 * t * n + 3 * n) * bf16
    assert rms_norm.bytes_moved(t, n, "add+norm", "fwd+bwd", torch.bfloat16) == (8 * t * n + 3 * n) * bf16


def test_rope_gpu_case_list_covers_tokens_head_shapes_variants_modes_and_impls():
    cases = rope.cases(_gpu_config())
    keys = {(c.shape["tokens"], c.shape["q_heads"], c.shape["kv_heads"], c.shape["head_dim"], c.variant,
             c.mode, c.impl) for c in cases}
    head_shapes = {(12, 2, 128, "default"), (40, 8, 128, "default"), (32, 8, 128, "default"),
                   (32, 8, 128, "yarn+temperature")}
    expected = {(t, *h, m, i) for t in (4096, 16384) for h in head_shapes for m in MODES for i in ROPE_IMPLS}
    assert keys == expected and len(cases) == len(expected)
    models = {(c.shape["q_heads"], c.variant): c.model for c in cases}
    assert models == {(12, "default"): "palmyra-mini", (40, "default"): "am-thinking-v1",
                      (32, "default"): "mimo-7b",
                      (32, "yarn+temperature"): "ministral-3-3b,ministral-3-8b,ministral-3-14b"}
    # FlashInfer's RoPE has no backward: its fwd+bwd rows are always missing, with a reason.
    assert all(c.missing for c in cases if c.impl == "flashinfer" and c.mode == "fwd+bwd")


def test_swiglu_gpu_case_list_covers_tokens_intermediate_sizes_modes_and_impls():
    cases = swiglu.cases(_gpu_config())
    keys = {(c.shape["tokens"], c.shape["intermediate"], c.variant, c.mode, c.impl) for c in cases}
    expected = set(itertools.product(
        (4096, 16384), (8960, 27648, 11008, 9216, 14336, 16384), ("silu*up",), MODES, SWIGLU_IMPLS))
    assert keys == expected and len(cases) == len(expected)
    assert {c.model for c in cases if c.shape["intermediate"] == 11008} == {"mimo-7b"}


def test_rope_and_swiglu_bytes_counted():
    t, hq, hkv, d, bf16 = 4096, 32, 8, 128, 2
    one_pass = 2 * t * (hq + hkv) * d * bf16 + 8 * t  # q, k in and out; int64 position_ids in
    assert rope.bytes_moved(t, hq, hkv, d, "fwd", torch.bfloat16) == one_pass
    assert rope.bytes_moved(t, hq, hkv, d, "fwd+bwd", torch.bfloat16) == 2 * one_pass
    i = 8960
    assert swiglu.bytes_moved(t, i, "fwd", torch.bfloat16) == 3 * t * i * bf16
    assert swiglu.bytes_moved(t, i, "fwd+bwd", torch.bfloat16) == 8 * t * i * bf16


def test_logprobs_gpu_case_list_covers_tokens_vocabs_hidden_sizes_modes_and_impls():
    cases = logprobs.cases(_gpu_config())
    token = {(c.shape["tokens"], c.shape["vocab"], c.mode, c.impl) for c in cases if c.variant == "token_logprobs"}
    assert token == set(itertools.product(
        (4096, 16384), (151936, 152064, 151680, 131072), MODES, TOKEN_LOGPROBS_IMPLS))
    fused = {(c.shape["tokens"], c.shape["hidden"], c.shape["vocab"], c.mode, c.impl)
             for c in cases if c.variant == "fused_linear"}
    pairs = {(1536, 151936), (5120, 152064), (4096, 151680), (3072, 131072), (4096, 131072), (5120, 131072)}
    long_pairs = {(1536, 151936), (5120, 152064)}  # the smallest and largest hidden sizes
    shapes = {(4096, h, v) for h, v in pairs} | {(t, h, v) for t in (16384, 32768) for h, v in long_pairs}
    assert fused == {(t, h, v, m, i) for t, h, v in shapes for m in MODES for i in FUSED_LINEAR_IMPLS} | {
        (t, h, v, "fwd+bwd", i) for t, h, v in shapes for i in ONE_PASS_IMPLS}
    assert len(cases) == len(token) + len(fused)
    assert {c.model for c in cases if c.variant == "token_logprobs" and c.shape["vocab"] == 131072} == {
        "ministral-3-3b,ministral-3-8b,ministral-3-14b"}
    assert all(c.flops and not c.bytes_moved for c in cases if c.variant == "fused_linear")
    assert all(c.bytes_moved and not c.flops for c in cases if c.variant == "token_logprobs")


def test_mtp_verify_gpu_case_list_covers_batches_drafts_variants_and_impls():
    cases = mtp_verify.cases(_gpu_config())
    keys = {(c.shape["batch"], c.shape["drafts"], c.shape["vocab"], c.variant, c.mode, c.impl) for c in cases}
    expected = set(itertools.product((1, 8, 64, 256), (1, 2, 4), (151680,), MTP_VARIANTS, ("fwd",), MTP_IMPLS))
    assert keys == expected and len(cases) == len(expected)
    assert {c.model for c in cases} == {"mimo-7b"}
    assert all(c.missing for c in cases if c.impl == "flashinfer" and c.variant == "greedy")
    # Forward-only op; presets without an MTP layer have no verify shapes.
    assert mtp_verify.cases(_gpu_config(modes=harness.MODE_CHOICES["bwd"])) == []
    presets, _ = harness.load_presets()
    assert mtp_verify.cases(_gpu_config(presets={"palmyra-mini": presets["palmyra-mini"]})) == []


def test_logprobs_and_mtp_verify_bytes_and_flops_counted():
    t, v, h, bf16 = 4096, 151936, 1536, 2
    assert logprobs.bytes_moved(t, v, "fwd", torch.bfloat16) == t * v * bf16
    assert logprobs.bytes_moved(t, v, "fwd+bwd", torch.bfloat16) == 3 * t * v * bf16
    assert logprobs.flops(t, h, v, "fwd") == 2 * t * h * v
    assert logprobs.flops(t, h, v, "fwd+bwd") == 6 * t * h * v
    b, k, v = 64, 2, 151680
    assert mtp_verify.bytes_moved(b, k, v, False, torch.bfloat16) == b * (k + 1) * v * bf16
    assert mtp_verify.bytes_moved(b, k, v, True, torch.bfloat16) == b * (k + 1) * v * bf16 + b * k * v * 4


def test_logprobs_baselines_match_autograd_of_the_reference():
    """The verl-style chunked baseline (hand-written backward) and the materialised one compute
    log_softmax(hidden @ W.T)[token] and its gradients."""
    torch.manual_seed(0)
    n, h, v = 8, 16, 50
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, v, (n,))
    grad = torch.randn(n, dtype=torch.float64)
    reference = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, ids[:, None]).squeeze(-1)
    expected = torch.autograd.grad(reference, (hidden, weight), grad)
    config = _gpu_config(smoke=True, device=torch.device("cpu"))
    for make in (logprobs._verl_chunked, logprobs._materialised):
        out = make(config)(hidden, weight, ids)
        torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
        got = torch.autograd.grad(out, (hidden, weight), grad.to(out.dtype))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_vllm_style_verify_matches_thinkfuse_greedy():
    import thinkfuse

    torch.manual_seed(0)
    logits = torch.randn(6, 4, 40)
    draft = torch.randint(0, 40, (6, 3))
    draft[0] = logits[0, :3].argmax(-1)  # all accepted: bonus token
    draft[1, 0] = logits[1, 0].argmax()  # one accepted
    got = mtp_verify.vllm_style_verify(draft, logits, 0.0, None)
    want = thinkfuse.ops.mtp_verify(draft, logits, backend="torch")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[1][:2].tolist() == [3, 1]


def test_out_of_memory_becomes_a_row_status():
    def build():
        def forward():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.64 GiB")
        return logprobs._OomGuardedWorkload(forward=forward)

    case = harness.Case(op="logprobs", impl="materialised", variant="fused_linear", mode="fwd",
                        shape={"tokens": 16384, "hidden": 5120, "vocab": 152064}, model="am-thinking-v1",
                        dtype=torch.bfloat16, build=logprobs._oom_guard(build))
    config = _gpu_config(smoke=True, device=torch.device("cpu"))
    row = harness.run_case(case, config)
    assert row["status"] == "error"
    assert row["reason"].startswith("RuntimeError: out of memory: CUDA out of memory"), row["reason"]


def _fake_timed_rows() -> list[dict]:
    """Rows with made-up milliseconds, to check arithmetic only (never written to results/)."""
    rows = []
    for impl, ms in (("thinkfuse-cuda", 0.5), ("hf-eager", 2.0), ("torch-compile", 1.0), ("liger", None)):
        case = harness.Case(op="rms_norm", impl=impl, variant="norm", mode="fwd",
                            shape={"tokens": 4096, "hidden": 1536}, model="palmyra-mini",
                            dtype=torch.bfloat16, bytes_moved=1_000_000_000)
        row = harness.base_row(case)
        row.update(status="ok" if ms else "missing", median_ms=ms, reason=None if ms else "absent")
        rows.append(row)
    return rows


def test_derived_metrics_and_reports_with_timed_rows(tmp_path):
    rows = _fake_timed_rows()
    harness.add_derived_metrics(rows, {"copy_gbps": 4000.0, "matmul_bf16_tflops": None})
    fused = rows[0]
    assert fused["gbps"] == pytest.approx(2000.0)  # 1e9 bytes in 0.5 ms
    assert fused["frac_copy_bw"] == pytest.approx(0.5)
    assert fused["speedup_vs_hf_eager"] == pytest.approx(4.0)
    assert fused["speedup_vs_torch_compile"] == pytest.approx(2.0)
    assert rows[3]["gbps"] is None and rows[3]["speedup_vs_hf_eager"] is None

    meta = {"smoke": False, "bytes_counted": {}, "device": "test", "date_utc": "-", "driver": None,
            "cuda": None, "torch": "-", "triton": "-", "transformers": "-", "liger_kernel": None,
            "thinkfuse": "-", "thinkfuse_backends": [], "git_commit": None, "timing": "-",
            "compile_backend": "-", "peaks": {}, "models_json": "-"}
    markdown = harness.write_markdown(tmp_path, meta, rows).read_text()
    assert "| 4.00x |" in markdown and "50.0%" in markdown
    if harness.write_plots(tmp_path, rows):  # empty when matplotlib is missing
        assert (tmp_path / "rms_norm_speedup_vs_hf_eager.png").stat().st_size > 0


def test_committed_models_json_matches_shared():
    """bench/models.json is a copy of ../shared/models.json for machines without shared/."""
    shared = harness.REPO_ROOT.parent / "shared" / "models.json"
    committed = harness.BENCH_DIR / "models.json"
    assert committed.is_file()
    if not shared.is_file():
        return  # a machine with only the repository: the committed copy is all there is
    assert json.loads(committed.read_text()) == json.loads(shared.read_text())


def _gpu_check_jobs() -> dict[str, list[str]]:
    """name -> bench arguments of every job in bench/gpu_check.sh's BENCH_JOBS."""
    script = (REPO / "bench" / "gpu_check.sh").read_text()
    block = script.split("BENCH_JOBS=(", 1)[1].split("\n)", 1)[0]
    jobs = {}
    for line in block.splitlines():
        line = line.strip()
        if line.startswith('"'):
            name, _seconds, args = line.strip('"').split(":", 2)
            jobs[name] = args.split()
    return jobs


def test_gpu_check_jobs_are_valid_bench_runs_with_cases():
    """A typo in a GPU job (an op, a model, an implementation name) would only show on the GPU
    machine, as a job that measures nothing: every job must parse and select at least one case,
    each --impl naming an implementation some case has."""
    jobs = _gpu_check_jobs()
    assert {"memory-bound", "attention", "logprobs", "e2e", "decode"} <= set(jobs)
    presets, _ = harness.load_presets()
    for name, argv in jobs.items():
        args = harness.parse_args(argv)
        # harness.make_config would ask for a GPU device; the same configuration without one:
        selected = presets if args.model is None else {args.model: presets[args.model]}
        config = _gpu_config(presets=selected, modes=harness.MODE_CHOICES[args.mode],
                             impls=tuple(args.impl), skip_impls=tuple(args.skip_impl))
        cases = [c for op in (args.op or harness.discover_ops()) for c in harness.op_cases(op, config)]
        chosen = [c for c in cases if config.selects(c.impl)]
        assert chosen, f"gpu_check job {name!r} selects no case"
        for impl in args.impl:
            assert any(c.impl == impl for c in cases), f"gpu_check job {name!r}: no case of --impl {impl}"


def test_gpu_check_profiles_name_real_workloads_and_kernels():
    """The profile step's entries (name:workload:kernel regex): a workload profile_kernels has,
    and a regex that matches a kernel defined in csrc/ or kernels/ (else ncu profiles nothing)."""
    import re

    from bench import profile_kernels

    script = (REPO / "bench" / "gpu_check.sh").read_text()
    block = script.split("PROFILES=(", 1)[1].split("\n)", 1)[0]
    entries = [line.strip().strip('"').split(":") for line in block.splitlines() if line.strip().startswith('"')]
    assert entries
    sources = "\n".join(path.read_text() for folder in ("csrc", "kernels")
                        for path in (REPO / folder).rglob("*") if path.suffix in (".cuh", ".cu", ".py"))
    kernels = set(re.findall(r"__global__ void(?: __launch_bounds__\([^)]*\))?\s+(\w+)\(", sources)) | \
        set(re.findall(r"@triton\.jit\s+def (\w+)\(", sources))
    for name, workload, kernel in entries:
        assert workload in profile_kernels.WORKLOADS, name
        assert any(re.search(kernel, k) for k in kernels), f"profile {name!r}: no kernel matches {kernel!r}"


def test_profile_workloads_refuse_to_run_without_a_gpu(monkeypatch):
    from bench import profile_kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA device"):
        profile_kernels.main(["attention-sm90"])
    with pytest.raises(SystemExit):
        profile_kernels.main(["no-such-workload"])


def test_git_commit_can_be_given_by_the_launcher(monkeypatch):
    """A GPU machine's copy of the tree may carry a stale .git: the launcher's commit wins."""
    monkeypatch.setenv("THINKFUSE_GIT_COMMIT", "0123abc")
    assert harness.git_commit() == "0123abc"
    monkeypatch.delenv("THINKFUSE_GIT_COMMIT")
    assert harness.git_commit() != "0123abc"


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="CI's CPU check: on a GPU, gpu_check.sh tune runs the same sweep compiled with the same "
                           "correctness check, and the GPU image's triton 3.6 interpreter fails on the attention "
                           "kernels' scalar loop bounds (int() of a 1-element numpy array)")
def test_launch_config_sweep_smoke(tmp_path):
    """bench.tune --smoke runs every candidate launch config of every sweep (Triton attention
    forward, dK/dV, dQ; rms_norm backward) under the interpreter against reference.py, and exits
    non-zero if any is wrong."""
    done = subprocess.run([sys.executable, "-m", "bench.tune", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "tune.json").read_text())
    sweeps = tune.all_sweeps()
    assert [s.name for s in sweeps] == list(tune.SWEEP_NAMES)
    assert len(result["rows"]) == sum(len(s.candidates()) * len(s.smoke_shapes) for s in sweeps)
    assert all(r["status"] == "ok" and r["ms"] is None for r in result["rows"])  # no timings on CPU
    assert result["best"] == [] and result["metadata"]["smoke"] is True


def test_tile_sweep_defaults_are_candidates_and_errors_are_caught(monkeypatch):
    from thinkfuse.kernels import attention, rms_norm, rope

    monkeypatch.setattr(attention, "_INTERPRET", False)  # the GPU defaults, not the interpreter's
    for dtype in (torch.float16, torch.bfloat16):
        for d in (64, 96, 128):
            assert attention.default_fwd_config(d, dtype) in attention.FWD_CANDIDATES
            dkdv, dq = attention.default_bwd_configs(d, dtype)
            assert dkdv in attention.DKDV_CANDIDATES and dq in attention.DQ_CANDIDATES
    for shape in tune.RMS_NORM_GPU_SHAPES:
        assert rms_norm.default_bwd_config(shape.hidden) in rms_norm.BWD_CANDIDATES
    for shape in tune.ROPE_GPU_SHAPES:
        assert rope.default_config(max(shape.heads_q, shape.heads_kv), shape.head_dim) in rope.CANDIDATES
    a = torch.randn(4, 8)
    assert tune.relative_error((a,), (a,)) == 0.0
    assert tune.relative_error((a + 0.5,), (a,)) > tune.SMOKE_TOLERANCE
    b = a.clone()
    b[0, 0] = float("nan")
    assert tune.relative_error((b,), (a,)) == float("inf")


def test_slow_workloads_are_timed_by_a_few_runs(monkeypatch):
    """A workload of a second or so is timed by SLOW_WORKLOAD_RUNS plain runs (do_bench's 5-run
    estimate alone would cost several of them); a short one by do_bench."""
    durations = iter([700.0, 800.0])
    monkeypatch.setattr(harness, "_event_ms", lambda fn: next(durations))
    monkeypatch.setattr(harness, "time_ms", lambda fn, config: pytest.fail("do_bench for a slow workload"))
    ms, label = harness.time_ms_labelled(lambda: None, None, 900.0)  # the first run is the given one
    assert ms == 800.0 and label.startswith(f"median of {harness.SLOW_WORKLOAD_RUNS} runs")
    monkeypatch.setattr(harness, "_event_ms", lambda fn: pytest.fail("a run for a fast workload"))
    monkeypatch.setattr(harness, "time_ms", lambda fn, config: 1.5)
    config = SimpleNamespace(rep_ms=100)
    assert harness.time_ms_labelled(lambda: None, config, 2.0) == (1.5, "do_bench median (CUDA events)")
    assert harness.time_ms_labelled(lambda: None, config, 10.0)[1] == "do_bench median (CUDA events)"


def test_workloads_do_bench_would_run_a_few_times_get_min_timed_runs(monkeypatch):
    """A 50 ms decode step gets 2 do_bench runs in a 100 ms rep: it is timed as the median of
    MIN_TIMED_RUNS runs instead."""
    durations = iter([50.0 + (7 if i % 3 == 0 else 0) for i in range(harness.MIN_TIMED_RUNS)])
    monkeypatch.setattr(harness, "_event_ms", lambda fn: next(durations))
    monkeypatch.setattr(harness, "time_ms", lambda fn, config: pytest.fail("do_bench for a 50 ms workload"))
    ms, label = harness.time_ms_labelled(lambda: None, SimpleNamespace(rep_ms=100), 50.0)
    assert ms == 50.0 and label == f"median of {harness.MIN_TIMED_RUNS} runs (CUDA events)"


def test_cuda_graph_flag_times_every_case_as_graph_replays(monkeypatch):
    """--cuda-graph: cases not marked cuda_graph are timed as graph replays too."""
    args = harness.parse_args(["--smoke", "--op", "rms_norm", "--cuda-graph"])
    assert harness.make_config(args, harness.load_presets()[0]).graph_timing
    for argv in (["--cuda-graph"], ["--op", "rms_norm", "--op", "mtp_verify", "--cuda-graph"]):
        with pytest.raises(SystemExit):  # ops that draw random numbers (or all ops) are refused
            harness.parse_args(argv)
    assert not harness.make_config(harness.parse_args(["--smoke"]), harness.load_presets()[0]).graph_timing
    monkeypatch.setattr(harness, "peak_memory_mb", lambda fn: (0.0, 1.0))
    monkeypatch.setattr(harness, "time_ms_in_cuda_graph", lambda fn, config: (1.0, "graph replays"))
    monkeypatch.setattr(harness, "time_ms_labelled", lambda fn, config, once: (2.0, "events"))
    case = harness.Case(op="op", impl="impl", variant="v", mode="fwd", shape={}, model="m", dtype=torch.float32,
                        build=lambda: harness.Workload(forward=lambda: torch.zeros(1)))
    config = _gpu_config(device=torch.device("cpu"))
    assert harness.run_case(case, config)["timing"] == "events"
    assert harness.run_case(case, _gpu_config(device=torch.device("cpu"), graph_timing=True))["timing"] == "graph replays"
