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

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# `bench` is a top-level package of the repository, not installed: importable from the repo
# root with `python -m pytest`, and with a bare `pytest` only through this.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import harness, rms_norm  # noqa: E402

# The smoke shapes the harness promises: tokens 8, hidden 64 and 1000.
SMOKE_SHAPES = ("8x64", "8x1000")
VARIANTS = ("norm", "add+norm")
MODES = ("fwd", "fwd+bwd")
# These implementations can always run on CPU; the others may be "missing" with a reason.
CPU_IMPLS = ("thinkfuse-torch", "hf-eager", "torch-compile")


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
    assert "## rms_norm" in markdown and "Smoke run" in markdown
    assert "Bytes counted" in markdown
    assert not (out / "rows.partial.jsonl").exists()
    pytest.importorskip("matplotlib")
    assert (out / "rms_norm_speedup_vs_hf_eager.png").stat().st_size > 0
    assert (out / "rms_norm_copy_bw_fraction.png").stat().st_size > 0


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


def test_bytes_counted():
    t, n, bf16 = 4096, 1536, 2
    assert rms_norm.bytes_moved(t, n, "norm", "fwd", torch.bfloat16) == (2 * t * n + n) * bf16
    assert rms_norm.bytes_moved(t, n, "add+norm", "fwd", torch.bfloat16) == (4 * t * n + n) * bf16
    assert rms_norm.bytes_moved(t, n, "norm", "fwd+bwd", torch.bfloat16) == (5 * t * n + 3 * n) * bf16
    assert rms_norm.bytes_moved(t, n, "add+norm", "fwd+bwd", torch.bfloat16) == (8 * t * n + 3 * n) * bf16


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
