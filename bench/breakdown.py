"""Where the time of an end-to-end step goes: GPU time per kernel and per kind of kernel.

    python -m bench.breakdown                                  # train-step + grpo-step, thinkfuse and hf-sdpa
    python -m bench.breakdown --variant grpo-step --impl thinkfuse --out DIR
    python -m bench.breakdown --variant decode-step --model mimo-7b --impl thinkfuse --impl hf-sdpa
    python -m bench.breakdown --smoke                          # CPU, tiny models: checks the plumbing only

The benchmark rows of bench/e2e.py say how long a step takes; this says why. Each selected
e2e case (same builders, same shapes) is run as its fwd+bwd step: 2 warm-up steps, then
``--steps`` steps under ``torch.profiler`` with CUDA activity. Per case it reports, per step:
- wall time (host clock around the profiled steps, synchronised) and GPU-busy time (the union
  of all kernel / memset / memcpy intervals): a gap between them means the GPU waited on the
  host (launch overhead, syncs). The profiler's own per-op cost is in the wall time, so the gap
  is an upper bound;
- GPU time per kind of kernel (``KINDS``: matmul, attention, thinkfuse's log-prob kernels, norms,
  elementwise, ...), so "the lm_head matmuls are 60% of the step" is one line;
- the ``--top`` kernels by GPU time, names shortened;
- the ``--host-top`` host ops by self time per step (where a host-bound step, a decode step
  say, spends its time);
- the ``--gaps`` longest stretches with no kernel running, each with the kernels on either side
  and the host ops that were running meanwhile (what kept the next launch from coming sooner),
  and the host synchronisations per step (``aten::_local_scalar_dense`` is ``.item()`` /
  ``int()`` / ``bool()`` of a GPU tensor; ``cudaStreamSynchronize`` / ``cudaDeviceSynchronize``).

Output: a text report on stdout and, with ``--out``, ``breakdown.json`` there (gpu_check.sh's
``breakdown`` step puts both in the run's logs). ``--smoke`` profiles CPU activity only (no
kernels to attribute) and makes no claim about time.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch

from bench import e2e, harness

DEFAULT_VARIANTS = (e2e.TRAIN, e2e.GRPO)
DEFAULT_IMPLS = (e2e.THINKFUSE, e2e.HF_SDPA, e2e.TRL_MATERIALISED)
WARMUP_STEPS = 2
#: Host ops that wait for the GPU: a count per step says how many times a step stalls the queue.
SYNC_OPS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
#: Idle stretches shorter than this are launch latency, not worth listing.
MIN_GAP_US = 20.0

# (kind, regex), first match wins, tried on the kernel name without its template arguments and
# parameter list (template arguments name types such as cutlass::bfloat16_t inside attention
# kernels). Attention before matmul: PyTorch's memory-efficient kernels are fmha_cutlass*.
# cuBLAS / cuBLASLt / CUTLASS matmuls are named gemm / xmma / nvjet / cutlass; ours and
# Triton's by their namespace or function names.
KINDS: tuple[tuple[str, str], ...] = (
    ("memset/memcpy", r"^(memset|memcpy)|Memset|Memcpy"),
    ("log-probs", r"logprob|cross_entropy|nll_loss|log_softmax|softmax"),
    ("attention", r"flash|attn|fmha|sdpa|dkdv|cudnn|decode"),
    ("matmul", r"gemm|xmma|nvjet|cutlass|cublas|splitKreduce"),
    ("rms-norm", r"rms_norm|rmsnorm|layer_norm"),
    ("swiglu/rope", r"swiglu|silu|rotary|rope"),
    ("mtp-verify", r"mtp::|verify"),
    ("embedding", r"embedding|index_put|indexing_backward|scatter|gather"),
    ("reduce", r"reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled|CatArray|copy"),
)


@dataclass
class KernelTotal:
    name: str
    kind: str
    calls: int = 0
    gpu_us: float = 0.0


@dataclass
class Breakdown:
    """One case's figures, per step."""

    label: str
    steps: int
    wall_ms: float
    gpu_busy_ms: float
    kinds_ms: dict[str, float] = field(default_factory=dict)
    top: list[dict] = field(default_factory=list)
    gaps: list[dict] = field(default_factory=list)  # longest idle stretches, longest first
    idle_in_gaps_ms: float = 0.0  # per step, summed over every gap of >= MIN_GAP_US
    syncs_per_step: dict[str, float] = field(default_factory=dict)
    host_top: list[dict] = field(default_factory=list)  # host ops by self time, largest first


def kind_of(name: str) -> str:
    bare = strip_signature(name)
    for kind, pattern in KINDS:
        if re.search(pattern, bare, flags=re.IGNORECASE):
            return kind
    return "other"


def strip_signature(name: str) -> str:
    """A kernel name without template arguments and a trailing parameter list: ``void
    at::native::(anonymous namespace)::k<float, 4>(Params)`` -> ``void at::native::anon::k``."""
    name = name.replace("(anonymous namespace)", "anon")
    depth, out = 0, []
    for ch in name:  # drop <...> and (...), nested
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return "".join(out).strip() or name


def short_name(name: str, width: int = 96) -> str:
    """``strip_signature(name)``, at most ``width`` characters."""
    name = strip_signature(name)
    return name if len(name) <= width else name[: width - 3] + "..."


def union_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (kernels of several streams overlap)."""
    total, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def idle_gaps(intervals: Iterable[tuple[float, float]], min_us: float = MIN_GAP_US) -> list[tuple[float, float]]:
    """The [start, end) stretches of at least ``min_us`` between the union of ``intervals``
    (from the end of one busy stretch to the start of the next), in time order."""
    gaps, reach = [], None
    for start, end in sorted(intervals):
        if reach is not None and start - reach >= min_us:
            gaps.append((reach, start))
        reach = end if reach is None else max(reach, end)
    return gaps


def host_ops_during(gap: tuple[float, float], cpu_events, limit: int = 3) -> list[str]:
    """Names of the host ops that overlap ``gap`` most, innermost (shortest) first among
    equals: the Python-level op the host was busy with while the GPU had nothing to run."""
    start, end = gap
    scored = []
    for e in cpu_events:
        overlap = min(end, e.time_range.end) - max(start, e.time_range.start)
        if overlap > 0:
            scored.append((-overlap, e.time_range.end - e.time_range.start, e.name))
    names: list[str] = []
    for _, _, name in sorted(scored):
        if name not in names:
            names.append(name)
        if len(names) == limit:
            break
    return names


def _kernel_at(events, time_us: float, before: bool) -> str:
    """The short name of the kernel that ends at (before=True) or starts at ``time_us``."""
    attr = "end" if before else "start"
    for e in events:
        if abs(getattr(e.time_range, attr) - time_us) < 1e-6:
            return short_name(e.name, 60)
    return "?"


def gap_report(events, cpu_events, steps: int, count: int) -> tuple[list[dict], float]:
    """The ``count`` longest idle gaps (with neighbours and host ops) and the idle time per step
    in all gaps of at least MIN_GAP_US."""
    gaps = idle_gaps((e.time_range.start, e.time_range.end) for e in events)
    longest = sorted(gaps, key=lambda g: g[0] - g[1])[:count]
    rows = [{"us": end - start, "after": _kernel_at(events, start, True), "before": _kernel_at(events, end, False),
             "host": host_ops_during((start, end), cpu_events)} for start, end in longest]
    return rows, sum(end - start for start, end in gaps) / 1000.0 / max(1, steps)


def host_top(cpu_events, steps: int, count: int) -> list[dict]:
    """The ``count`` host ops with the most self time (the op's own, its children's excluded),
    per step: what a host-bound step is made of."""
    totals: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in cpu_events:
        self_us = getattr(e, "self_cpu_time_total", e.time_range.end - e.time_range.start)
        totals[e.name][0] += self_us
        totals[e.name][1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:count]
    return [{"name": name, "self_us_per_step": us / max(1, steps), "calls_per_step": n / max(1, steps)}
            for name, (us, n) in ranked]


def sync_counts(cpu_events, steps: int) -> dict[str, float]:
    """Host synchronisations per step, by op name (SYNC_OPS)."""
    counts: dict[str, int] = defaultdict(int)
    for e in cpu_events:
        if e.name in SYNC_OPS:
            counts[e.name] += 1
    return {name: n / max(1, steps) for name, n in sorted(counts.items())}


def device_events(events) -> list:
    """The profiler's device-side events (kernels, memsets, memcpys) of a finished profile."""
    cuda = torch.autograd.DeviceType.CUDA
    return [e for e in events if getattr(e, "device_type", None) == cuda and e.time_range.end > e.time_range.start
            and not getattr(e, "is_user_annotation", False)]


def host_events(events) -> list:
    """The profiler's host-side op events."""
    cpu = torch.autograd.DeviceType.CPU
    return [e for e in events if getattr(e, "device_type", None) == cpu and e.time_range.end >= e.time_range.start]


def summarise(label: str, events, steps: int, wall_s: float, top: int, cpu_events=(), gaps: int = 0,
              host_ops: int = 0) -> Breakdown:
    """Per-step figures of ``steps`` profiled steps from their device events (and host events,
    for the idle gaps and sync counts)."""
    totals: dict[tuple[str, str], KernelTotal] = {}  # different kernels may share a short name
    for e in events:
        name, kind = short_name(e.name), kind_of(e.name)
        entry = totals.setdefault((name, kind), KernelTotal(name, kind))
        entry.calls += 1
        entry.gpu_us += e.time_range.end - e.time_range.start
    kinds: dict[str, float] = defaultdict(float)
    for entry in totals.values():
        kinds[entry.kind] += entry.gpu_us
    per_step = lambda us: us / 1000.0 / max(1, steps)  # noqa: E731
    ranked = sorted(totals.values(), key=lambda t: t.gpu_us, reverse=True)[:top]
    breakdown = Breakdown(
        label=label, steps=steps, wall_ms=wall_s * 1000.0 / max(1, steps),
        gpu_busy_ms=per_step(union_us((e.time_range.start, e.time_range.end) for e in events)),
        kinds_ms={k: per_step(v) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        top=[{"name": t.name, "kind": t.kind, "calls_per_step": t.calls / max(1, steps), "ms_per_step": per_step(t.gpu_us)}
             for t in ranked],
    )
    if events:
        breakdown.gaps, breakdown.idle_in_gaps_ms = gap_report(events, cpu_events, steps, gaps)
    breakdown.syncs_per_step = sync_counts(cpu_events, steps)
    breakdown.host_top = host_top(cpu_events, steps, host_ops)
    return breakdown


def profile_case(case: harness.Case, config: harness.Config, steps: int, top: int, gaps: int = 0,
                 host_ops: int = 0) -> Breakdown:
    label = f"{case.model} {case.variant} {case.shape_label} {case.impl}"
    workload = case.build()
    run = workload.runner(case.mode)
    for _ in range(WARMUP_STEPS):
        run()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if config.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    _synchronize(config)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            run()
        _synchronize(config)
        wall = time.perf_counter() - start
    events = prof.events()
    return summarise(label, device_events(events), steps, wall, top, host_events(events), gaps, host_ops)


def _synchronize(config: harness.Config) -> None:
    if config.device.type == "cuda":
        torch.cuda.synchronize(config.device)


def report(b: Breakdown) -> str:
    lines = [f"== {b.label}: {b.steps} steps"]
    if not b.kinds_ms:
        lines.append("   no device events (a CPU run): nothing to attribute")
        return "\n".join(lines)
    lines.append(f"   wall {b.wall_ms:.2f} ms/step, GPU busy {b.gpu_busy_ms:.2f} ms/step "
                 f"(idle {max(0.0, b.wall_ms - b.gpu_busy_ms):.2f})")
    kernel_ms = sum(b.kinds_ms.values())
    for kind, ms in b.kinds_ms.items():
        share = ms / kernel_ms if kernel_ms else 0.0
        lines.append(f"   {kind:<14} {ms:9.3f} ms  {share:6.1%}")
    if b.top:
        lines.append(f"   top {len(b.top)} kernels (ms/step, calls/step):")
        for t in b.top:
            lines.append(f"   {t['ms_per_step']:9.3f} {t['calls_per_step']:6.1f}  [{t['kind']}] {t['name']}")
    if b.gaps:
        lines.append(f"   idle in gaps of >= {MIN_GAP_US:.0f} us: {b.idle_in_gaps_ms:.2f} ms/step; longest {len(b.gaps)} "
                     "(us, kernel before -> kernel after, host ops meanwhile):")
        for g in b.gaps:
            lines.append(f"   {g['us']:9.1f}  {g['after']} -> {g['before']}  | {' / '.join(g['host'])}")
    syncs = ", ".join(f"{name} {n:g}" for name, n in b.syncs_per_step.items()) or "none"
    lines.append(f"   host syncs per step: {syncs}")
    if b.host_top:
        lines.append(f"   top {len(b.host_top)} host ops (self us/step, calls/step):")
        for h in b.host_top:
            lines.append(f"   {h['self_us_per_step']:9.1f} {h['calls_per_step']:6.1f}  {h['name']}")
    return "\n".join(lines)


#: Variants profiled as forward-only steps (the rest as fwd+bwd steps).
FORWARD_VARIANTS = (e2e.DECODE_STEP,)


def select_cases(config: harness.Config, variants, impls) -> list[harness.Case]:
    def mode(variant):
        return harness.FWD if variant in FORWARD_VARIANTS else harness.FWD_BWD

    return [c for c in e2e.cases(config)
            if c.variant in variants and c.impl in impls and c.mode == mode(c.variant) and c.build is not None]


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append",
                        choices=sorted({e2e.TRAIN, e2e.GRPO, e2e.GRPO_MODEL, e2e.DECODE_STEP}),
                        help=f"e2e variants to profile (default: {', '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--impl", action="append", help=f"implementations (default: {', '.join(DEFAULT_IMPLS)})")
    parser.add_argument("--model", default="palmyra-mini", help="models.json preset (default palmyra-mini)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per case (default 3)")
    parser.add_argument("--top", type=int, default=20, help="kernels listed per case (default 20)")
    parser.add_argument("--gaps", type=int, default=12, help="longest idle gaps listed per case (default 12)")
    parser.add_argument("--host-top", type=int, default=15, help="host ops listed per case (default 15)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models: plumbing only, no timings")
    parser.add_argument("--out", type=Path, help="directory for breakdown.json")
    args = parser.parse_args(argv)
    if args.steps < 1 or min(args.top, args.gaps, args.host_top) < 0:
        parser.error("--steps must be >= 1, --top, --gaps and --host-top >= 0")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench.breakdown needs a CUDA device (or --smoke)")
    presets, _ = harness.load_presets()
    if args.model not in presets:
        raise SystemExit(f"unknown --model {args.model!r}; known: {', '.join(sorted(presets))}")
    impls = list(args.impl or DEFAULT_IMPLS)
    variants = set(args.variant or DEFAULT_VARIANTS)
    mode = "full" if variants & set(FORWARD_VARIANTS) else "bwd"
    bench_argv = ["--mode", mode, "--model", args.model] + [a for impl in impls for a in ("--impl", impl)]
    bench_args = harness.parse_args(bench_argv + (["--smoke"] if args.smoke else []))
    config = harness.make_config(bench_args, presets)  # --impl: the e2e OOM probes run only for these
    cases = select_cases(config, variants, set(impls))
    if not cases:
        raise SystemExit("no e2e case matches the selection")
    meta = {"device": torch.cuda.get_device_name() if config.device.type == "cuda" else "cpu (smoke)",
            "torch": torch.__version__, "smoke": args.smoke}
    results, failed = [], 0
    for case in cases:
        try:
            b = profile_case(case, config, args.steps, args.top, args.gaps, args.host_top)
        except Exception as exc:  # one case's failure (e.g. out of memory) must not hide the others
            failed += 1
            print(f"== {case.model} {case.variant} {case.shape_label} {case.impl}: FAILED "
                  f"{type(exc).__name__}: {exc}", flush=True)
            continue
        finally:
            if config.device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(b)
        print(report(b), flush=True)
        if args.out is not None:  # after every case: a run cut by its time limit keeps the rest
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "breakdown.json").write_text(json.dumps(
                {"metadata": meta, "cases": [asdict(r) for r in results]}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
