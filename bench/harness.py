"""Shared benchmark machinery: op discovery, cases, timing, device peaks, memory, reports, CLI.

An op module (``bench/<op>.py``) only describes *what* to run: it returns a list of ``Case``
from ``cases(config)``, each with a ``build()`` that allocates inputs on the device and returns
a ``Workload`` (a forward closure, plus what to differentiate for fwd+bwd). Everything else,
how a case is timed, how its memory is measured, the derived metrics and the reports, lives here
so that every op is measured the same way.

Timing uses ``triton.testing.do_bench`` (median of CUDA-event timings, L2 flushed between
repetitions); cases marked ``cuda_graph`` (decode-time ops, which serving runs captured) use
``do_bench_cudagraph`` instead, so their rows are GPU time without host launch overhead; each
row's ``timing`` field says which. At the start of a GPU run the device's copy bandwidth and bf16 matmul rate are
measured so each row can say what fraction of the *measured* peak it reaches. ``--smoke`` runs
every case once on CPU at tiny sizes to prove the harness works; it reports no speed numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.metadata
import json
import os
import pkgutil
import platform
import re
import statistics
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_ROOT = BENCH_DIR / "results"

FWD, FWD_BWD = "fwd", "fwd+bwd"
# --mode value -> the row modes it selects ("bwd" means the rows that include a backward).
MODE_CHOICES = {"fwd": (FWD,), "bwd": (FWD_BWD,), "full": (FWD, FWD_BWD)}

HF_EAGER, TORCH_COMPILE, LIGER = "hf-eager", "torch-compile", "liger"
# Table order; an op may add other implementation names (they sort after these).
IMPL_ORDER = ("thinkfuse-cuda", "thinkfuse-triton", "thinkfuse-torch", HF_EAGER, TORCH_COMPILE, LIGER)

# Modules of the bench package that are not op modules.
NON_OP_MODULES = {"harness", "tune", "profile_kernels", "breakdown"}  # bench modules that define no cases

# Device peak probes. 1 GiB per buffer is far beyond any L2, so the copy runs at DRAM speed.
COPY_BYTES = 1 << 30
MATMUL_N = 8192

SMOKE_COMPILE_BACKEND = "aot_eager"  # why: inductor needs ~25 s per compile on a 2-core CPU
GPU_COMPILE_BACKEND = "inductor"

# ---------------------------------------------------------------------------------------------
# Model presets


MODELS_JSON_ENV = "THINKFUSE_MODELS_JSON"

def models_json_candidates() -> list[Path]:
    env = os.environ.get(MODELS_JSON_ENV)
    paths = [Path(env)] if env else []
    # ../shared is the source of truth where it exists; bench/models.json is its committed copy
    # for machines that get only the repository (tests/test_bench_smoke.py keeps them equal).
    return paths + [
        REPO_ROOT.parent / "shared" / "models.json",
        REPO_ROOT / "shared" / "models.json",
        BENCH_DIR / "models.json",
    ]


def load_presets() -> tuple[dict[str, dict], str]:
    """Model presets by name, and where they came from."""
    for path in models_json_candidates():
        if path.is_file():
            data = json.loads(path.read_text())
            return {name: spec for name, spec in data.items() if not name.startswith("_")}, str(path)
    raise FileNotFoundError(f"no models.json found; looked in {[str(p) for p in models_json_candidates()]}")


def presets_by(presets: dict[str, dict], fieldname: str) -> dict[Any, str]:
    """Distinct values of one preset field, each with the comma-joined names sharing it."""
    groups: dict[Any, list[str]] = {}
    for name, spec in presets.items():
        groups.setdefault(spec[fieldname], []).append(name)
    return {value: ",".join(names) for value, names in sorted(groups.items())}


# ---------------------------------------------------------------------------------------------
# Configuration, cases, workloads


@dataclass
class Config:
    """What op modules may read when building their cases."""

    smoke: bool
    device: torch.device
    dtype: torch.dtype
    modes: tuple[str, ...]
    presets: dict[str, dict]  # after --model
    compile_backend: str
    warmup_ms: int = 25
    rep_ms: int = 100
    impls: tuple[str, ...] = ()  # --impl: only these implementations (empty: all)
    skip_impls: tuple[str, ...] = ()  # --skip-impl
    graph_timing: bool = False  # --cuda-graph: time every case as CUDA-graph replays

    def selects(self, impl: str) -> bool:
        """Whether the implementation filters keep rows of ``impl``."""
        return (not self.impls or impl in self.impls) and impl not in self.skip_impls


@dataclass
class Workload:
    """One case, ready to run: inputs already on the device, closed over by ``forward``."""

    forward: Callable[[], Any]  # returns a tensor or a tuple of tensors
    inputs: tuple = ()  # fwd+bwd: tensors to differentiate with respect to
    grad_outputs: tuple = ()  # fwd+bwd: one gradient per forward output

    def runner(self, mode: str) -> Callable[[], Any]:
        if mode == FWD:
            return self._run_forward
        return self._run_forward_backward

    def _run_forward(self):
        # no_grad: a forward-only row must not pay for saving activations.
        with torch.no_grad():
            return self.forward()

    def _run_forward_backward(self):
        outputs = self.forward()
        outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
        # autograd.grad rather than backward(): nothing accumulates into .grad between
        # repetitions, and an input that receives the same gradient tensor twice (x and
        # residual) is not cloned by AccumulateGrad, which would add a copy to the timing.
        return torch.autograd.grad(outputs, self.inputs, self.grad_outputs)


@dataclass
class Case:
    """One row of the results: op x variant x shape x mode x implementation."""

    op: str
    impl: str
    variant: str
    mode: str
    shape: dict[str, int]
    model: str
    dtype: torch.dtype
    bytes_moved: Optional[int] = None  # minimal DRAM traffic of the op (documented per op)
    flops: Optional[int] = None
    build: Optional[Callable[[], Workload]] = None
    missing: Optional[str] = None  # why this implementation cannot run here
    # Time replays of a CUDA graph of the call (serving runs decode-time ops captured): GPU time
    # without the host's launch overhead, which otherwise dominates microsecond-scale ops.
    cuda_graph: bool = False

    @property
    def shape_label(self) -> str:
        return "x".join(str(v) for v in self.shape.values())


# ---------------------------------------------------------------------------------------------
# Helpers for op modules


def thinkfuse_impls(config: Config) -> list[tuple[str, str, Optional[str]]]:
    """``(implementation name, backend, why missing or None)`` for every thinkfuse backend."""
    from thinkfuse.backend import BACKENDS

    return [(f"thinkfuse-{name}", name, _thinkfuse_missing(name, config)) for name in BACKENDS]


def _thinkfuse_missing(backend: str, config: Config) -> Optional[str]:
    from thinkfuse.backend import triton_interpreter_enabled, why_unavailable

    reason = why_unavailable(backend)
    if reason is not None:
        return reason
    if config.device.type == "cpu" and backend == "cuda":
        return "smoke mode runs on CPU; the cuda backend needs CUDA tensors"
    if config.device.type == "cpu" and backend == "triton" and not triton_interpreter_enabled():
        return "smoke mode runs on CPU; set TRITON_INTERPRET=1 to run the triton backend"
    return None


def optional_attr(module: str, attr: str) -> tuple[Any, Optional[str]]:
    """``module.attr`` if importable, else ``(None, why)``; optional baselines use this."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        return None, f"{exc.name} is not installed"
    except Exception as exc:  # a broken install failing at import time
        return None, f"{module.split('.')[0]} not importable ({type(exc).__name__}: {exc})"
    obj = getattr(mod, attr, None)
    if obj is None:
        return None, f"{module}.{attr} does not exist in the installed version"
    return obj, None


def liger_attr(config: Config, module: str, attr: str) -> tuple[Any, Optional[str]]:
    """A Liger-Kernel class, or why it cannot run (not installed, or no GPU)."""
    obj, reason = optional_attr(module, attr)
    if reason is None and config.device.type != "cuda":
        reason = "Liger-Kernel runs only on CUDA tensors (smoke mode is CPU)"
    return obj, reason


def compile_module(module: torch.nn.Module, config: Config) -> torch.nn.Module:
    """``torch.compile`` for one case, specialised to its shape.

    The dynamo cache is reset first: each case compiles its own static shape once (the first,
    untimed call), and dynamo's recompile limit can never silently send a later shape to eager.
    """
    torch._dynamo.reset()
    return torch.compile(module, backend=config.compile_backend, dynamic=False)


# ---------------------------------------------------------------------------------------------
# Measurement


def time_ms(fn: Callable[[], Any], config: Config) -> float:
    """Median milliseconds of ``fn`` by CUDA events (triton's do_bench)."""
    return bench_ms(fn, config.warmup_ms, config.rep_ms)


def bench_ms(fn: Callable[[], Any], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn`` by triton's do_bench (CUDA events); also bench.tune's timer."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


#: Ops whose workloads draw no random numbers: safe to capture into CUDA graphs (--cuda-graph).
GRAPH_SAFE_OPS = frozenset({"rms_norm", "swiglu", "rope", "logprobs"})

#: A workload at least this long (one run, ms) is timed by a few plain runs instead of do_bench,
#: whose 5-run estimate alone took 26 s of a 120 s job for MiMo-7B's 128-token generate.
SLOW_WORKLOAD_MS = 500.0
SLOW_WORKLOAD_RUNS = 3
#: do_bench runs a workload about rep_ms / (its time) times: twice for a 50 ms decode step, whose
#: host-bound time varied by tens of percent between runs on the 2026-11-23 H100. A workload that
#: would get fewer runs than this is timed as the median of this many.
MIN_TIMED_RUNS = 10


def time_ms_labelled(fn: Callable[[], Any], config: Config, once: float) -> tuple[float, str]:
    """(median milliseconds, timing label) of ``fn``, of which one warm call took ``once`` ms:
    do_bench; for a workload too long for do_bench to repeat MIN_TIMED_RUNS times, the median of
    MIN_TIMED_RUNS runs; for a workload of a second or so, the median of that call and
    SLOW_WORKLOAD_RUNS - 1 more."""
    if once >= SLOW_WORKLOAD_MS:
        runs = [once] + [_event_ms(fn) for _ in range(SLOW_WORKLOAD_RUNS - 1)]
        return statistics.median(runs), f"median of {len(runs)} runs (CUDA events; slow workload)"
    if once * MIN_TIMED_RUNS > config.rep_ms:
        runs = [_event_ms(fn) for _ in range(MIN_TIMED_RUNS)]
        return statistics.median(runs), f"median of {len(runs)} runs (CUDA events)"
    return time_ms(fn, config), "do_bench median (CUDA events)"


def _event_ms(fn: Callable[[], Any]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_ms_in_cuda_graph(fn: Callable[[], Any], config: Config) -> tuple[float, str]:
    """(median milliseconds, timing label) of ``fn`` replayed from a CUDA graph (triton's
    do_bench_cudagraph); falls back to plain do_bench, saying so, where capture fails. Mark only
    capturable cases: a capture that fails inside a random op leaves torch's CUDA generator
    unusable for the rest of the process (seen on an H100)."""
    from triton.testing import do_bench_cudagraph

    try:
        with torch.cuda.stream(torch.cuda.Stream()):  # capture needs a non-default stream
            ms = do_bench_cudagraph(fn, rep=config.rep_ms, return_mode="median")
        return float(ms), "do_bench_cudagraph median (CUDA graph replay: no host overhead)"
    except Exception as exc:  # e.g. an implementation that synchronises with the host
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
        return time_ms(fn, config), f"do_bench median (CUDA events); graph capture failed: {reason}"


def peak_memory_mb(fn: Callable[[], Any]) -> tuple[float, float]:
    """(peak CUDA memory of one call of ``fn`` beyond what was allocated before (its inputs), in
    MiB (2**20 bytes: the ``peak_mem_mb`` field keeps its old name, its unit is MiB); that call's
    milliseconds by CUDA events)."""
    torch.cuda.synchronize()
    inputs_bytes = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ms = _event_ms(fn)  # outputs and gradients are freed on return; they still count in the peak
    return (torch.cuda.max_memory_allocated() - inputs_bytes) / 2**20, ms


def measure_device_peaks(config: Config) -> dict[str, Any]:
    """Copy bandwidth and bf16 matmul rate of this device, measured the same way as the cases."""
    if config.smoke:
        return {"copy_gbps": None, "matmul_bf16_tflops": None, "note": "smoke run: not measured"}
    device = config.device
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
    src = torch.ones(COPY_BYTES // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), config)
    del src, dst
    a = torch.randn(MATMUL_N, MATMUL_N, dtype=torch.bfloat16, device=device)
    b = torch.randn(MATMUL_N, MATMUL_N, dtype=torch.bfloat16, device=device)
    matmul_ms = time_ms(lambda: torch.matmul(a, b), config)
    del a, b
    torch.cuda.empty_cache()
    return {
        # read + write: a copy moves its bytes twice
        "copy_gbps": 2 * COPY_BYTES / copy_ms / 1e6,
        "matmul_bf16_tflops": 2 * MATMUL_N**3 / matmul_ms / 1e9,
        "copy_probe": f"device-to-device copy_ of {COPY_BYTES >> 20} MiB float32, bytes read + written",
        "matmul_probe": f"torch.matmul bf16 {MATMUL_N}^3",
        # CUDA-graph replays run back to back without flushing L2: a row whose bytes fit in it
        # reads (part of) them from L2 and may exceed the DRAM copy bandwidth (l2_resident).
        "l2_cache_bytes": l2_bytes,
    }


# ---------------------------------------------------------------------------------------------
# Running cases

METRIC_KEYS = (
    "median_ms", "gbps", "frac_copy_bw", "tflops", "frac_matmul_peak",
    "speedup_vs_hf_eager", "speedup_vs_torch_compile", "peak_mem_mb",
    # thinkfuse rows: {baseline impl: its ms / this row's ms} for every baseline of the same
    # group (op, variant, shape, mode, dtype, model, timing kind: see _group_key) measured in the
    # run, and the fastest of them.
    "speedup_vs", "best_baseline", "speedup_vs_best_baseline",
    # True for a row timed as CUDA-graph replays (no L2 flush between them) whose bytes_moved fit
    # in the device's L2: its GB/s and fraction of copy bandwidth are not DRAM figures.
    "l2_resident",
)


class Interrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): stop, but still write the rows measured so far.

    A BaseException so that run_case's `except Exception` does not swallow it as a case error.
    """


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


def base_row(case: Case) -> dict[str, Any]:
    row = {
        "op": case.op, "model": case.model, "variant": case.variant,
        "shape": dict(case.shape), "shape_label": case.shape_label, "mode": case.mode,
        "impl": case.impl, "dtype": str(case.dtype).replace("torch.", ""),
        "status": None, "reason": None, "timing": None,
        "bytes_moved": case.bytes_moved, "flops": case.flops, "setup_s": None,
    }
    row.update(dict.fromkeys(METRIC_KEYS))
    return row


def error_row(op: str, reason: str) -> dict[str, Any]:
    """A row for an op that could not even produce its cases."""
    case = Case(op=op, impl="-", variant="-", mode="-", shape={}, model="-", dtype=torch.float32)
    return base_row(case) | {"status": "error", "reason": reason}


def run_case(case: Case, config: Config) -> dict[str, Any]:
    row = base_row(case)
    if case.missing is not None:
        return row | {"status": "missing", "reason": case.missing}
    try:
        torch.manual_seed(0)
        start = time.perf_counter()
        fn = case.build().runner(case.mode)
        # The untimed first call compiles (torch.compile, Triton JIT, autotuning) and, in
        # smoke mode, is the whole run.
        fn()
        if config.smoke:  # no numbers at all from a smoke run, not even setup time
            return row | {"status": "ok", "timing": "smoke"}
        row["setup_s"] = round(time.perf_counter() - start, 3)
        row["peak_mem_mb"], once_ms = peak_memory_mb(fn)
        if case.cuda_graph or config.graph_timing:
            row["median_ms"], timing = time_ms_in_cuda_graph(fn, config)
            return row | {"status": "ok", "timing": timing}
        row["median_ms"], timing = time_ms_labelled(fn, config, once_ms)
        return row | {"status": "ok", "timing": timing}
    except Exception as exc:
        traceback.print_exc()
        return row | {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        if config.device.type == "cuda":
            torch.cuda.empty_cache()


def add_derived_metrics(rows: list[dict], peaks: dict) -> None:
    """GB/s, TFLOP/s, fractions of measured peaks, speedups vs baselines of the same run."""
    for row in rows:  # rows of runs from before a metric existed (--finalize) get it empty
        for key in METRIC_KEYS:
            row.setdefault(key, None)
    baselines = {
        (_group_key(row), row["impl"]): row["median_ms"]
        for row in rows
        if row["impl"] in (HF_EAGER, TORCH_COMPILE) and row["median_ms"]
    }
    for row in rows:
        ms = row["median_ms"]
        if not ms:
            continue
        if row["bytes_moved"]:
            row["gbps"] = row["bytes_moved"] / ms / 1e6
            row["frac_copy_bw"] = _ratio(row["gbps"], peaks.get("copy_gbps"))
            row["l2_resident"] = _l2_resident(row, peaks)
        if row["flops"]:
            row["tflops"] = row["flops"] / ms / 1e9
            row["frac_matmul_peak"] = _ratio(row["tflops"], peaks.get("matmul_bf16_tflops"))
        row["speedup_vs_hf_eager"] = _ratio(baselines.get((_group_key(row), HF_EAGER)), ms)
        row["speedup_vs_torch_compile"] = _ratio(baselines.get((_group_key(row), TORCH_COMPILE)), ms)
    _add_speedups_vs_every_baseline(rows)


def _l2_resident(row: dict, peaks: dict) -> Optional[bool]:
    """Whether a timed row re-read its bytes from L2: graph replays (triton's do_bench_cudagraph
    flushes nothing between them) of a workload no larger than the L2. None: L2 size unknown."""
    l2_bytes = peaks.get("l2_cache_bytes")
    if not l2_bytes:
        return None
    return _graph_timed(row) and row["bytes_moved"] <= l2_bytes


def is_thinkfuse(impl: str) -> bool:
    return impl.startswith("thinkfuse")


def _add_speedups_vs_every_baseline(rows: list[dict]) -> None:
    """For each thinkfuse row: its speedup over every other implementation of its group that ran
    (HF, torch.compile, Liger, SDPA, flash-attn, FlashInfer, TRL, ...), and over the fastest."""
    timed: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row["median_ms"] and not is_thinkfuse(row["impl"]):
            timed.setdefault(_group_key(row), {})[row["impl"]] = row["median_ms"]
    for row in rows:
        baselines = timed.get(_group_key(row))
        if not row["median_ms"] or not is_thinkfuse(row["impl"]) or not baselines:
            continue
        row["speedup_vs"] = {impl: ms / row["median_ms"] for impl, ms in sorted(baselines.items())}
        best = min(baselines, key=baselines.get)
        row["best_baseline"], row["speedup_vs_best_baseline"] = best, row["speedup_vs"][best]


def _group_key(row: dict) -> tuple:
    """Rows that differ only in implementation share this key, and only such rows are compared.

    The model is part of it because some shapes do not name it (every e2e train-step row is
    8192 tokens x 2 layers, whatever the preset). So is the timing kind: a CUDA-graph replay
    (GPU time, inputs left in L2) against a plain do_bench row (host launches, L2 flushed) is
    no speedup of the kernel (mtp_verify's sampling rows)."""
    return (row["op"], row["variant"], row["shape_label"], row["mode"], row["dtype"], row.get("model"),
            _graph_timed(row))


def _graph_timed(row: dict) -> bool:
    """Whether the row was timed as CUDA-graph replays (a failed capture falls back to do_bench,
    and its label says so without naming do_bench_cudagraph)."""
    return bool(row.get("timing") and "cudagraph" in row["timing"])


def _ratio(numerator, denominator):
    return numerator / denominator if numerator and denominator else None


# ---------------------------------------------------------------------------------------------
# Op discovery


# Ops run cheapest first, so that a run stopped by its time limit (gpu_check.sh) has measured
# the quick memory-bound kernels before the long matmul-heavy cases. Unlisted ops run last.
OP_RUN_ORDER = ("rms_norm", "swiglu", "rope", "mtp_verify", "attention", "logprobs", "e2e")


def discover_ops() -> list[str]:
    """Every module of the bench package except the machinery is an op module, in run order."""
    names = {
        info.name
        for info in pkgutil.iter_modules([str(BENCH_DIR)])
        if not info.name.startswith("_") and info.name not in NON_OP_MODULES
    }
    known = [op for op in OP_RUN_ORDER if op in names]
    return known + sorted(names - set(known))


def op_cases(op: str, config: Config) -> list[Case]:
    return list(importlib.import_module(f"bench.{op}").cases(config))


def bytes_note(op: str) -> Optional[str]:
    """The op module's own statement of what its bytes_moved counts."""
    return getattr(sys.modules.get(f"bench.{op}"), "BYTES_COUNTED", None)


# ---------------------------------------------------------------------------------------------
# Metadata


def device_name(config: Config) -> str:
    if config.device.type == "cuda":
        return torch.cuda.get_device_name(config.device)
    return f"cpu ({platform.processor() or platform.machine()})"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug() -> str:
    return slugify(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu"


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


def default_out_dir() -> Path:
    """bench/results/<YYYY-MM-DD>_<device-slug>/ (a second run on the same day overwrites it)."""
    return RESULTS_ROOT / f"{today()}_{device_slug()}"


def package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _command_output(cmd: list[str]) -> Optional[str]:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def git_commit() -> Optional[str]:
    """The code's commit: THINKFUSE_GIT_COMMIT when set (a GPU machine gets a copy of the working
    tree whose .git may be missing or stale, so the launcher passes the commit it sent), else
    ``git rev-parse HEAD`` (+dirty with uncommitted changes to tracked files)."""
    given = os.environ.get("THINKFUSE_GIT_COMMIT", "").strip()
    if given:
        return given
    commit = _command_output(["git", "rev-parse", "HEAD"])
    if commit and _command_output(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += "+dirty"
    return commit


def gpu_driver_version() -> Optional[str]:
    out = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0] if out else None


def collect_metadata(config: Config, peaks: dict, presets_source: str, ops: list[str]) -> dict:
    import thinkfuse

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": config.smoke,
        "device": device_name(config),
        "driver": gpu_driver_version() if config.device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "liger_kernel": package_version("liger-kernel") or package_version("liger_kernel"),
        "thinkfuse": thinkfuse.__version__,
        "thinkfuse_backends": thinkfuse.available_backends(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "dtype": str(config.dtype).replace("torch.", ""),
        "compile_backend": config.compile_backend,
        "timing": "smoke: one untimed call per case, no timings" if config.smoke else (
            f"triton.testing.do_bench median, warmup {config.warmup_ms} ms, rep {config.rep_ms} ms"
            + ("; every row as CUDA-graph replays (--cuda-graph)" if config.graph_timing else
               "; rows marked so as CUDA-graph replays, workloads do_bench would repeat fewer than "
               f"{MIN_TIMED_RUNS} times as the median of {MIN_TIMED_RUNS} runs, and workloads of >= "
               f"{SLOW_WORKLOAD_MS:g} ms as the median of {SLOW_WORKLOAD_RUNS} runs (each row's timing says which)")
        ),
        "peaks": peaks,
        "models_json": presets_source,
        "ops": ops,
        "bytes_counted": {op: bytes_note(op) for op in ops},
    }


# ---------------------------------------------------------------------------------------------
# Reports


def fmt_value(value, digits=3) -> str:
    """A table cell: '-' for None, 3 significant digits (whole numbers from 1000 on)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _speedup(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _status(row, width=None) -> str:
    if row["status"] == "ok":
        return "ok"
    text = f"{row['status']}: {row['reason']}"
    return text if width is None or len(text) <= width else text[: width - 3] + "..."


# (header, cell) for the markdown and terminal tables.
COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("model", lambda r: r["model"]),
    ("variant", lambda r: r["variant"]),
    ("shape", lambda r: r["shape_label"]),
    ("mode", lambda r: r["mode"]),
    ("impl", lambda r: r["impl"]),
    ("dtype", lambda r: r["dtype"]),
    ("ms", lambda r: fmt_value(r["median_ms"], 4) if r["median_ms"] else (r["timing"] or "-")),
    ("GB/s", lambda r: fmt_value(r["gbps"], 4)),
    ("% copy BW", lambda r: _pct(r["frac_copy_bw"]) + (" (L2)" if r.get("l2_resident") else "")),
    ("TFLOP/s", lambda r: fmt_value(r["tflops"], 4)),
    ("vs hf-eager", lambda r: _speedup(r["speedup_vs_hf_eager"])),
    ("vs compile", lambda r: _speedup(r["speedup_vs_torch_compile"])),
    ("vs best baseline", lambda r: f"{_speedup(r['speedup_vs_best_baseline'])} ({r['best_baseline']})"
                                   if r["best_baseline"] else "-"),
    ("peak MiB", lambda r: fmt_value(r["peak_mem_mb"], 4)),
]


def _columns_for(rows: list[dict]):
    """Drop the TFLOP/s column for ops that count no flops (e.g. memory-bound norms)."""
    has_flops = any(row["flops"] for row in rows)
    return [col for col in COLUMNS if col[0] != "TFLOP/s" or has_flops]


def rows_by_op(rows: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["op"], []).append(row)
    return grouped


def write_json(out_dir: Path, metadata: dict, rows: list[dict]) -> Path:
    path = out_dir / "results.json"
    path.write_text(json.dumps({"metadata": metadata, "rows": rows}, indent=1) + "\n")
    return path


def _metadata_lines(meta: dict) -> list[str]:
    peaks = meta["peaks"]
    lines = [
        f"- date (UTC): {meta['date_utc']}",
        f"- device: {meta['device']}; driver {meta['driver']}; CUDA {meta['cuda']}",
        f"- torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, "
        f"liger-kernel {meta['liger_kernel'] or 'not installed'}, thinkfuse {meta['thinkfuse']} "
        f"(backends {', '.join(meta['thinkfuse_backends'])})",
        f"- git commit: {meta['git_commit'] or 'unknown'}",
        f"- timing: {meta['timing']}; torch.compile backend {meta['compile_backend']}",
        f"- measured peaks: copy {fmt_value(peaks.get('copy_gbps'), 4)} GB/s, "
        f"bf16 matmul {fmt_value(peaks.get('matmul_bf16_tflops'), 4)} TFLOP/s"
        + (f"; L2 {peaks['l2_cache_bytes'] / 1e6:.0f} MB (a % copy BW marked (L2): a CUDA-graph row whose "
           "bytes fit in L2, read from there, not DRAM)" if peaks.get("l2_cache_bytes") else ""),
        f"- model presets: {meta['models_json']}",
    ]
    if meta.get("interrupted"):
        lines.append(f"- INTERRUPTED ({meta['interrupted']}): rows after the interruption are absent")
    return lines


def write_markdown(out_dir: Path, metadata: dict, rows: list[dict]) -> Path:
    lines = ["# thinkfuse benchmark results", ""]
    if metadata["smoke"]:
        lines += ["**Smoke run on CPU: proves the harness runs; contains no speed numbers.**", ""]
    lines += _metadata_lines(metadata)
    for op, op_rows in rows_by_op(rows).items():
        columns = _columns_for(op_rows)
        lines += ["", f"## {op}", ""]
        note = metadata["bytes_counted"].get(op)
        if note:
            lines += [f"Bytes counted: {note}", ""]
        lines.append("| " + " | ".join(h for h, _ in columns) + " | status |")
        lines.append("|" + "---|" * (len(columns) + 1))
        for row in op_rows:
            cells = [cell(row) for _, cell in columns] + [_status(row)]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    path = out_dir / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def print_tables(rows: list[dict], metadata: dict) -> None:
    """A rich table per op on the terminal, or plain aligned text without rich."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    for op, op_rows in rows_by_op(rows).items():
        columns = _columns_for(op_rows)
        headers = [h for h, _ in columns] + ["status"]
        body = [[cell(r) for _, cell in columns] + [_status(r, 48)] for r in op_rows]
        title = f"{op} on {metadata['device']}" + (" (smoke: no timings)" if metadata["smoke"] else "")
        if Console is not None:
            table = Table(title=title)
            for header in headers:
                left = header in ("model", "impl", "status")
                table.add_column(header, justify="left" if left else "right")
            for cells in body:
                table.add_row(*cells)
            # Piped into a log file rich would assume 80 columns; a wide table stays readable.
            console = Console()
            (console if console.is_terminal else Console(width=240)).print(table)
        else:
            _print_plain(title, headers, body)


def _print_plain(title: str, headers: list[str], body: list[list[str]]) -> None:
    widths = [max(len(x) for x in col) for col in zip(headers, *body)]
    print(title)
    for cells in [headers] + body:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))


PLOTS = (
    ("speedup_vs_hf_eager", "speedup vs hf-eager (x)", "speedup_vs_hf_eager"),
    ("frac_copy_bw", "fraction of measured copy bandwidth", "copy_bw_fraction"),
)


def write_plots(out_dir: Path, rows: list[dict]) -> list[Path]:
    """PNG bar charts per op (one panel per variant and mode, one bar group per shape)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless: no display on GPU machines
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for op, op_rows in rows_by_op(rows).items():
        for metric, label, suffix in PLOTS:
            path = out_dir / f"{op}_{suffix}.png"
            _plot_metric(plt, op_rows, metric, f"{op}: {label}", path)
            written.append(path)
    return written


def _plot_metric(plt, rows: list[dict], metric: str, title: str, path: Path) -> None:
    panels = list(dict.fromkeys((r["variant"], r["mode"]) for r in rows))
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.2 * len(panels)), squeeze=False)
    for ax, (variant, mode) in zip(axes[:, 0], panels):
        panel_rows = [r for r in rows if (r["variant"], r["mode"]) == (variant, mode)]
        _bar_panel(ax, panel_rows, metric)
        ax.set_title(f"{variant}, {mode}", fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bar_panel(ax, rows: list[dict], metric: str) -> None:
    shapes = list(dict.fromkeys(r["shape_label"] for r in rows))
    impls = [i for i in _ordered_impls(rows) if any(r[metric] for r in rows if r["impl"] == i)]
    if not impls:
        ax.text(0.5, 0.5, "no timings in this run (smoke, or nothing ran)", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_xticks([])
        return
    value = {(r["shape_label"], r["impl"]): r[metric] for r in rows}
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        xs = [i + k * width for i in range(len(shapes))]
        ax.bar(xs, [value.get((s, impl)) or 0.0 for s in shapes], width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.legend(fontsize=7, ncol=len(impls))


def _ordered_impls(rows: list[dict]) -> list[str]:
    names = dict.fromkeys(r["impl"] for r in rows)
    known = [i for i in IMPL_ORDER if i in names]
    return known + sorted(set(names) - set(known))


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="thinkfuse microbenchmarks against HF eager, torch.compile and Liger-Kernel.",
    )
    parser.add_argument("--op", action="append", choices=discover_ops(),
                        help="op to benchmark (repeatable; default: all)")
    parser.add_argument("--model", help="only this model preset's shapes (a models.json name)")
    parser.add_argument("--mode", choices=sorted(MODE_CHOICES), default="full",
                        help="fwd: forward rows; bwd: forward+backward rows; full: both (default)")
    parser.add_argument("--impl", action="append", default=[], metavar="NAME",
                        help="only rows of this implementation (repeatable), e.g. thinkfuse-cuda")
    parser.add_argument("--skip-impl", action="append", default=[], metavar="NAME",
                        help="no rows of this implementation (repeatable)")
    parser.add_argument("--smoke", action="store_true",
                        help="run every case once on CPU at tiny sizes; no timings")
    parser.add_argument("--out", type=Path,
                        help="output directory (default: bench/results/<date>_<device>/; "
                             "with --smoke a new temporary directory)")
    parser.add_argument("--warmup-ms", type=int, default=25, help="do_bench warmup (ms)")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time (ms)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time every case as CUDA-graph replays: kernel time without host launch cost "
                             "(the memory-bound ops' fwd+bwd rows up to 16k x 5120 took a fixed ~0.4 ms "
                             "for every implementation on an H100, host-bound). Only with --op of "
                             "GRAPH_SAFE_OPS (their workloads draw no random numbers)")
    parser.add_argument("--finalize", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run nothing: write the results of runs killed before they could "
                             "(their rows.partial.jsonl + metadata.partial.json, or results.json), "
                             "merged, into --out")
    args = parser.parse_args(argv)
    if args.finalize and args.out is None:
        # The default directory names today and this machine's device, not those of the runs.
        parser.error("--finalize needs --out (the merged runs' date and device are not this machine's)")
    if args.cuda_graph and not (args.op and set(args.op) <= GRAPH_SAFE_OPS):
        parser.error(f"--cuda-graph needs --op, each one of {sorted(GRAPH_SAFE_OPS)}: a capture that fails inside "
                     "a random op leaves torch's CUDA generator unusable for the rest of the run")
    return args


def make_config(args: argparse.Namespace, presets: dict[str, dict]) -> Config:
    if args.model is not None:
        presets = {args.model: presets[args.model]}
    return Config(
        smoke=args.smoke,
        device=torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device()),
        dtype=torch.float32 if args.smoke else torch.bfloat16,
        modes=MODE_CHOICES[args.mode],
        presets=presets,
        compile_backend=SMOKE_COMPILE_BACKEND if args.smoke else GPU_COMPILE_BACKEND,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        graph_timing=args.cuda_graph,
        impls=tuple(args.impl),
        skip_impls=tuple(args.skip_impl),
    )


def resolve_out_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        out = args.out.resolve()
        # bench/results/ holds real GPU runs only (see bench/results/README.md).
        if args.smoke and RESULTS_ROOT.resolve() in (out, *out.parents):
            raise SystemExit("refusing to write a smoke run under bench/results/ (GPU results only)")
    elif args.smoke:
        out = Path(tempfile.mkdtemp(prefix="thinkfuse-bench-smoke-"))
    else:
        out = default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_ops(ops: list[str], config: Config, partial_path: Path) -> list[dict]:
    """Run every case of every op, streaming rows to ``partial_path`` as they complete."""
    rows: list[dict] = []
    with partial_path.open("w") as partial, _progress_display() as progress:
        for op in ops:
            try:
                cases = [case for case in op_cases(op, config) if config.selects(case.impl)]
            except Exception as exc:
                traceback.print_exc()
                cases = []
                # Streamed like a measured row: a run killed later must still report the failure.
                _keep_row(error_row(op, f"cases() failed: {type(exc).__name__}: {exc}"), rows, partial)
            for index, case in enumerate(cases, 1):
                row = _keep_row(run_case(case, config), rows, partial)
                progress(index, len(cases), row)
    return rows


def _keep_row(row: dict, rows: list[dict], partial) -> dict:
    """Append ``row`` to the run's rows and to its partial file, flushed at once."""
    rows.append(row)
    partial.write(json.dumps(row) + "\n")
    partial.flush()
    return row


@contextlib.contextmanager
def _progress_display():
    """A rich progress bar per op on an interactive terminal; one line per case otherwise (logs
    of gpu_check.sh, CI)."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        rich_available = False
    else:
        rich_available = True
    if not (rich_available and sys.stderr.isatty()):
        yield _progress
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        tasks: dict[str, int] = {}

        def update(index: int, total: int, row: dict) -> None:
            op = row["op"]
            if op not in tasks:
                tasks[op] = bar.add_task(op, total=total)
            bar.update(tasks[op], completed=index,
                       description=f"{op}: {row['variant']} {row['shape_label']} {row['mode']} {row['impl']}")

        yield update


def _progress(index: int, total: int, row: dict) -> None:
    result = fmt_value(row["median_ms"], 4) + " ms" if row["median_ms"] else _status(row, 60)
    print(f"[{row['op']} {index}/{total}] {row['variant']} {row['shape_label']} {row['mode']} "
          f"{row['impl']}: {result}", file=sys.stderr, flush=True)


PARTIAL_ROWS, PARTIAL_METADATA = "rows.partial.jsonl", "metadata.partial.json"


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.finalize:
        return finalize(args.finalize, resolve_out_dir(args), plots=not args.no_plots)
    presets, presets_source = load_presets()
    if args.model is not None and args.model not in presets:
        print(f"unknown --model {args.model!r}; presets: {', '.join(presets)}", file=sys.stderr)
        return 2
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: timings need a GPU (use --smoke to check the harness on CPU)",
              file=sys.stderr)
        return 2
    config = make_config(args, presets)
    out_dir = resolve_out_dir(args)
    ops = args.op or discover_ops()

    signal.signal(signal.SIGTERM, _raise_interrupted)
    interrupted = None
    rows: list[dict] = []
    partial_path = out_dir / PARTIAL_ROWS
    peaks: dict = {}
    try:
        peaks = measure_device_peaks(config)
        # Saved before any case runs, so that a run killed outright (SIGKILL) can still be
        # finished from its partial files with --finalize.
        metadata = collect_metadata(config, peaks, presets_source, ops)
        (out_dir / PARTIAL_METADATA).write_text(json.dumps(metadata, indent=1) + "\n")
        rows = run_ops(ops, config, partial_path)
    except (Interrupted, KeyboardInterrupt) as exc:
        interrupted = str(exc) or type(exc).__name__
        rows = _read_partial(partial_path)
    metadata = collect_metadata(config, peaks, presets_source, ops) | {"interrupted": interrupted}
    return write_results(out_dir, metadata, rows, plots=not args.no_plots)


def write_results(out_dir: Path, metadata: dict, rows: list[dict], plots: bool = True) -> int:
    """Derived metrics, results.json/.md, the terminal tables and plots; removes the partial
    files. Returns the exit status (1 when a case failed or the run was interrupted)."""
    add_derived_metrics(rows, metadata.get("peaks") or {})
    write_json(out_dir, metadata, rows)
    write_markdown(out_dir, metadata, rows)
    for name in (PARTIAL_ROWS, PARTIAL_METADATA):
        (out_dir / name).unlink(missing_ok=True)
    print_tables(rows, metadata)
    if plots:
        write_plots(out_dir, rows)
    print(f"results: {out_dir}")
    errors = [row for row in rows if row["status"] == "error"]
    if errors:
        print(f"{len(errors)} case(s) failed; see the status column", file=sys.stderr)
    return 1 if errors or metadata.get("interrupted") else 0


def finalize(run_dirs: list[Path], out_dir: Path, plots: bool = True) -> int:
    """Results from the partial files of runs that were killed before writing them (and/or the
    results.json of finished runs), merged in the order given. The metadata (device, versions)
    is the first run's, with the measured peaks of the first run that measured them and every
    run's commit; every run must have been on the same device."""
    metadata, rows, stops, metas = None, [], [], []
    for run_dir in run_dirs:
        run_meta, run_rows, stopped = _load_run(run_dir)
        if metadata is None:
            metadata = run_meta
        elif run_meta["device"] != metadata["device"]:
            raise SystemExit(f"{run_dir} ran on {run_meta['device']}, not {metadata['device']}")
        metas.append(run_meta)
        rows += run_rows
        if stopped:
            stops.append(f"{run_dir.name}: {stopped}")
    metadata = dict(metadata, merged_from=[str(d) for d in run_dirs], interrupted="; ".join(stops) or None,
                    peaks=_first_measured_peaks(metas), git_commit=_merged_commits(metas))
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_results(out_dir, metadata, rows, plots)


def _first_measured_peaks(metas: list[dict]) -> dict:
    """The peaks of the first run that measured them: a job stopped while it measured the device
    has none, and its place first in the merge must not leave every row without them."""
    for meta in metas:
        if (meta.get("peaks") or {}).get("copy_gbps"):
            return meta["peaks"]
    return metas[0].get("peaks") or {}


def _merged_commits(metas: list[dict]) -> Optional[str]:
    """The merged runs' commit, or every distinct one (in order) where they differ."""
    commits = list(dict.fromkeys(meta.get("git_commit") or "unknown" for meta in metas))
    if len(commits) == 1:
        return metas[0].get("git_commit")
    return "several: " + ", ".join(commits)


def _load_run(run_dir: Path) -> tuple[dict, list[dict], Optional[str]]:
    """(metadata, rows, why the run stopped early or None) of a finished or killed run."""
    results = run_dir / "results.json"
    if results.exists():
        data = json.loads(results.read_text())
        return data["metadata"], data["rows"], data["metadata"].get("interrupted")
    meta_path = run_dir / PARTIAL_METADATA
    if not meta_path.exists():
        raise SystemExit(f"{run_dir} has neither results.json nor {PARTIAL_METADATA}")
    killed = "killed before writing its results (finished from its partial rows)"
    return json.loads(meta_path.read_text()), _read_partial(run_dir / PARTIAL_ROWS), killed


def _read_partial(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
