"""``python -m bench.tune``: sweep the launch configs of Triton kernels on this GPU.

Some Triton kernels are generic in their tile sizes, warps and pipeline stages, and their
defaults were picked by hand before a GPU measured them. This tool times every candidate config
on the shapes the goals are stated for, after checking its output against the default config's,
and prints the best per shape. It changes nothing: a winner becomes the default by editing the
kernel module's ``default_*config``, with the sweep's output committed beside the run's results.

Sweeps (``--sweep``, repeatable; all by default):

- ``attention-fwd``, ``attention-dkdv``, ``attention-dq``: ``thinkfuse.kernels.attention``'s
  forward, dK/dV and dQ kernels (``TileConfig``: block_m, block_n, num_warps, num_stages), bf16,
  head_dim 128, the 32/8 and 12/2 head layouts of the model presets. Each backward kernel is
  swept with the other at its default (the whole backward is timed), so the rows of one sweep
  differ only in the swept kernel. Rate: TFLOP/s (causal halved; backward 2.5x the forward).
- ``rms_norm-bwd``: ``thinkfuse.kernels.rms_norm``'s backward (``BwdConfig``: block_m,
  num_warps, programs_per_sm), bf16, 16384 tokens at the presets' hidden sizes, with and without
  the residual branch's gradient. Rate: GB/s of the minimal bytes (read dy, h, [dh]; write dx).
- ``rope-fwd``: ``thinkfuse.kernels.rope``'s in-kernel-cos/sin forward (``LaunchConfig``:
  block_h, num_warps; the backward is the same kernel), bf16, 16384 tokens, 32/8 and 12/2 heads,
  head_dim 128, with and without Ministral 3's query temperature. Rate: GB/s (read q, k; write
  them).

    python -m bench.tune                        # GPU: all sweeps; table + tune.{json,md}
    python -m bench.tune --sweep attention-fwd --out DIR
    python -m bench.tune --smoke                # CPU interpreter: every candidate checked, no timings

``--smoke`` (CI) runs each candidate once at tiny float32 shapes under ``TRITON_INTERPRET=1`` and
checks it against ``thinkfuse.reference``; it makes no speed claims. The exit status is non-zero
when a candidate computes a wrong result (a kernel bug at that config).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from bench import harness
from bench.attention import BACKWARD_FLOPS_RATIO
from bench.attention import flops as attention_flops

# Largest relative error accepted against the default config on a GPU: half-precision outputs
# round differently in other tile orders; float32 ones (attention's lse) only sum in another
# order. In smoke runs, against the float32 reference (float32 in the interpreter).
GPU_TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}
SMOKE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Sweep:
    """One kernel's sweep. ``build(shape, device, dtype)`` makes the inputs; ``run(inputs,
    config)`` returns a no-argument call of the kernel that returns its outputs (a tuple);
    ``reference(inputs)`` the float32 truth of those outputs; ``work(shape)`` the FLOPs or
    bytes one call accounts for (``unit`` says which)."""

    name: str
    candidates: Callable[[], tuple]
    default: Callable[[Any, torch.dtype], Any]
    build: Callable[[Any, torch.device, torch.dtype], Any]
    run: Callable[[Any, Any], Callable[[], tuple]]
    reference: Callable[[Any], tuple]
    work: Callable[[Any, torch.dtype], float]
    unit: str  # "TFLOP/s" or "GB/s"
    gpu_shapes: tuple = field(default=())
    smoke_shapes: tuple = field(default=())


# ---------------------------------------------------------------------------------------------
# Attention


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    seqlen: int
    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool

    @property
    def label(self) -> str:
        mask = "causal" if self.causal else "non-causal"
        return f"{self.batch}x{self.seqlen}x{self.heads_q}/{self.heads_kv}x{self.head_dim} {mask}"

    def forward_flops(self) -> float:
        return float(attention_flops(self.batch, self.seqlen, self.heads_q, self.head_dim, self.causal, harness.FWD))


# The goal shape (causal 8k, 32/8 heads as MiMo-7B and Ministral 3 8B, head_dim 128) first.
ATTENTION_GPU_SHAPES = (
    AttentionShape(1, 8192, 32, 8, 128, True),
    AttentionShape(8, 2048, 32, 8, 128, True),
    AttentionShape(2, 8192, 12, 2, 128, True),  # Palmyra-mini's heads
)
# The third is longer than the largest query tile (256) plus the largest key tile (128), and a
# multiple of neither, so that every candidate also runs its unmasked interior blocks, not only
# the masked edge ones.
ATTENTION_SMOKE_SHAPES = (AttentionShape(1, 37, 4, 2, 32, True), AttentionShape(2, 19, 2, 1, 64, False),
                          AttentionShape(1, 300, 2, 1, 16, True))


@dataclass
class AttentionInputs:
    shape: AttentionShape
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    scale: float


def _attention_kernels():
    from thinkfuse.kernels import attention

    return attention


def _random(shape: tuple, generator: torch.Generator, device, dtype) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def build_attention(shape: AttentionShape, device, dtype) -> AttentionInputs:
    generator = torch.Generator().manual_seed(0)
    q_shape = (shape.batch, shape.seqlen, shape.heads_q, shape.head_dim)
    kv_shape = (shape.batch, shape.seqlen, shape.heads_kv, shape.head_dim)
    q, k, v, dout = (_random(s, generator, device, dtype) for s in (q_shape, kv_shape, kv_shape, q_shape))
    scale = 1.0 / math.sqrt(shape.head_dim)
    out, lse = _attention_kernels().flash_attention_forward(q, k, v, None, None, None, None, scale, shape.causal, 0)
    return AttentionInputs(shape, q, k, v, dout, out, lse, scale)


def run_attention_forward(x: AttentionInputs, config) -> Callable[[], tuple]:
    kernels = _attention_kernels()
    return lambda: kernels.flash_attention_forward(
        x.q, x.k, x.v, None, None, None, None, x.scale, x.shape.causal, 0, config=config)


def _run_attention_backward(x: AttentionInputs, configs, picks: Callable[[tuple], tuple]) -> Callable[[], tuple]:
    kernels = _attention_kernels()
    return lambda: picks(kernels.flash_attention_backward(
        x.dout, x.q, x.k, x.v, x.out, x.lse, None, None, None, None, None, x.scale, x.shape.causal, 0,
        configs=configs))


def run_attention_dkdv(x: AttentionInputs, config) -> Callable[[], tuple]:
    default_dq = _attention_kernels().default_bwd_configs(x.shape.head_dim, x.q.dtype)[1]
    return _run_attention_backward(x, (config, default_dq), lambda grads: grads[1:])


def run_attention_dq(x: AttentionInputs, config) -> Callable[[], tuple]:
    default_dkdv = _attention_kernels().default_bwd_configs(x.shape.head_dim, x.q.dtype)[0]
    return _run_attention_backward(x, (default_dkdv, config), lambda grads: grads[:1])


def _reference_attention(x: AttentionInputs):
    from thinkfuse import reference

    q, k, v = (t.detach().float().requires_grad_() for t in (x.q, x.k, x.v))
    out, lse = reference.flash_attention(q, k, v, causal=x.shape.causal, softmax_scale=x.scale, return_lse=True)
    return out, lse, torch.autograd.grad(out, (q, k, v), x.dout.float())


def attention_sweeps() -> list[Sweep]:
    kernels = _attention_kernels
    common = dict(build=build_attention, unit="TFLOP/s", gpu_shapes=ATTENTION_GPU_SHAPES,
                  smoke_shapes=ATTENTION_SMOKE_SHAPES)
    backward_flops = lambda s, dtype: s.forward_flops() * BACKWARD_FLOPS_RATIO  # noqa: E731
    return [
        Sweep("attention-fwd", lambda: kernels().FWD_CANDIDATES,
              lambda s, dtype: kernels().default_fwd_config(s.head_dim, dtype), run=run_attention_forward,
              reference=lambda x: _reference_attention(x)[:2], work=lambda s, dtype: s.forward_flops(), **common),
        Sweep("attention-dkdv", lambda: kernels().DKDV_CANDIDATES,
              lambda s, dtype: kernels().default_bwd_configs(s.head_dim, dtype)[0], run=run_attention_dkdv,
              reference=lambda x: _reference_attention(x)[2][1:], work=backward_flops, **common),
        Sweep("attention-dq", lambda: kernels().DQ_CANDIDATES,
              lambda s, dtype: kernels().default_bwd_configs(s.head_dim, dtype)[1], run=run_attention_dq,
              reference=lambda x: _reference_attention(x)[2][:1], work=backward_flops, **common),
    ]


# ---------------------------------------------------------------------------------------------
# RMSNorm backward


@dataclass(frozen=True)
class RowsShape:
    rows: int
    hidden: int
    residual: bool  # the add+norm variant: its backward also reads the residual branch's dh

    @property
    def label(self) -> str:
        return f"{self.rows}x{self.hidden}{' add+norm' if self.residual else ''}"


RMS_NORM_GPU_SHAPES = tuple(RowsShape(16384, n, r) for n in (1536, 4096, 5120) for r in (False, True))
RMS_NORM_SMOKE_SHAPES = (RowsShape(29, 64, False), RowsShape(5, 1000, True))  # 29 rows: 8 per program


@dataclass
class RmsNormInputs:
    shape: RowsShape
    dy: torch.Tensor
    h: torch.Tensor
    weight: torch.Tensor
    rstd: torch.Tensor
    dh: Optional[torch.Tensor]


def build_rms_norm(shape: RowsShape, device, dtype) -> RmsNormInputs:
    from thinkfuse.kernels import rms_norm

    generator = torch.Generator().manual_seed(0)
    h, dy = (_random((shape.rows, shape.hidden), generator, device, dtype) for _ in range(2))
    weight = 1.0 + 0.1 * _random((shape.hidden,), generator, device, dtype)
    dh = _random((shape.rows, shape.hidden), generator, device, dtype) if shape.residual else None
    _, _, rstd = rms_norm.rms_norm_forward(h, weight, None, 1e-6)
    return RmsNormInputs(shape, dy, h, weight, rstd, dh)


def run_rms_norm_backward(x: RmsNormInputs, config) -> Callable[[], tuple]:
    from thinkfuse.kernels import rms_norm

    return lambda: rms_norm.rms_norm_backward(x.dy, x.h, x.weight, x.rstd, x.dh, config=config)


def reference_rms_norm_backward(x: RmsNormInputs) -> tuple:
    from thinkfuse import reference

    h, weight = x.h.detach().float().requires_grad_(), x.weight.detach().float().requires_grad_()
    dh, dw = torch.autograd.grad(reference.rms_norm(h, weight, 1e-6), (h, weight), x.dy.float())
    return (dh if x.dh is None else dh + x.dh.float()), dw


def rms_norm_bytes(shape: RowsShape, dtype: torch.dtype) -> float:
    tensors = 4 if shape.residual else 3  # read dy, h, [dh]; write dx
    return float(tensors * shape.rows * shape.hidden * torch.finfo(dtype).bits // 8)


def rms_norm_sweeps() -> list[Sweep]:
    from thinkfuse.kernels import rms_norm

    return [Sweep("rms_norm-bwd", lambda: rms_norm.BWD_CANDIDATES,
                  lambda s, dtype: rms_norm.default_bwd_config(s.hidden), build=build_rms_norm,
                  run=run_rms_norm_backward, reference=reference_rms_norm_backward, work=rms_norm_bytes,
                  unit="GB/s", gpu_shapes=RMS_NORM_GPU_SHAPES, smoke_shapes=RMS_NORM_SMOKE_SHAPES)]


# ---------------------------------------------------------------------------------------------
# RoPE forward (the backward is the same kernel with the rotation reversed)


@dataclass(frozen=True)
class RopeShape:
    batch: int
    seqlen: int
    heads_q: int
    heads_kv: int
    head_dim: int
    temperature: bool  # Ministral 3's query temperature (llama4_scaling)

    @property
    def label(self) -> str:
        extra = " +temperature" if self.temperature else ""
        return f"{self.batch}x{self.seqlen}x{self.heads_q}/{self.heads_kv}x{self.head_dim}{extra}"


ROPE_GPU_SHAPES = (RopeShape(4, 4096, 32, 8, 128, False), RopeShape(4, 4096, 12, 2, 128, False),
                   RopeShape(4, 4096, 32, 8, 128, True))
ROPE_SMOKE_SHAPES = (RopeShape(1, 7, 4, 2, 16, True), RopeShape(2, 5, 3, 1, 32, False))
ROPE_TEMPERATURE = (0.1, 1024)  # (beta, original max position): positions past 1024 get scaled


@dataclass
class RopeInputs:
    shape: RopeShape
    q: torch.Tensor
    k: torch.Tensor
    positions: torch.Tensor
    inv_freq: torch.Tensor
    llama4: Optional[tuple]


def build_rope(shape: RopeShape, device, dtype) -> RopeInputs:
    generator = torch.Generator().manual_seed(0)
    q = _random((shape.batch, shape.seqlen, shape.heads_q, shape.head_dim), generator, device, dtype)
    k = _random((shape.batch, shape.seqlen, shape.heads_kv, shape.head_dim), generator, device, dtype)
    positions = torch.arange(shape.seqlen, device=device).repeat(shape.batch, 1)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, shape.head_dim, 2, device=device).float() / shape.head_dim))
    llama4 = (ROPE_TEMPERATURE[0], 3 if shape.seqlen < 100 else ROPE_TEMPERATURE[1]) if shape.temperature else None
    return RopeInputs(shape, q, k, positions, inv_freq, llama4)


def run_rope_forward(x: RopeInputs, config) -> Callable[[], tuple]:
    from thinkfuse.kernels import rope

    beta, original = x.llama4 or (0.0, 1)
    return lambda: rope.rope_forward(x.q, x.k, x.positions, x.inv_freq, 1.0, beta, original, config=config)


def reference_rope_forward(x: RopeInputs) -> tuple:
    from thinkfuse import reference

    return reference.rope(x.q.float(), x.k.float(), x.positions, x.inv_freq, 1.0, x.llama4)


def rope_bytes(shape: RopeShape, dtype: torch.dtype) -> float:
    elements = shape.batch * shape.seqlen * (shape.heads_q + shape.heads_kv) * shape.head_dim
    return float(2 * elements * torch.finfo(dtype).bits // 8)  # read q, k; write them rotated


def rope_sweeps() -> list[Sweep]:
    from thinkfuse.kernels import rope

    return [Sweep("rope-fwd", lambda: rope.CANDIDATES,
                  lambda s, dtype: rope.default_config(max(s.heads_q, s.heads_kv), s.head_dim), build=build_rope,
                  run=run_rope_forward, reference=reference_rope_forward, work=rope_bytes, unit="GB/s",
                  gpu_shapes=ROPE_GPU_SHAPES, smoke_shapes=ROPE_SMOKE_SHAPES)]


def all_sweeps() -> list[Sweep]:
    return attention_sweeps() + rms_norm_sweeps() + rope_sweeps()


# ---------------------------------------------------------------------------------------------
# Driver


def relative_error(got: tuple, want: tuple, tolerance: Callable[[torch.Tensor], float] = lambda t: 1.0) -> float:
    """Largest ``max|got - want| / max|want| / tolerance(want)`` over the outputs (so > 1 fails
    when ``tolerance`` gives each output's bound; by default the plain relative error); inf where
    the finite entries differ (a NaN or inf one of them lacks)."""
    worst = 0.0
    for g, w in zip(got, want):
        finite = torch.isfinite(w)
        if not torch.equal(finite, torch.isfinite(g)):
            return math.inf
        bound = tolerance(w)
        w, g = w[finite].float(), g[finite].float()
        if w.numel():
            worst = max(worst, float((g - w).abs().max() / w.abs().max().clamp_min(1e-6)) / bound)
    return worst


def sweep_rows(sweep: Sweep, shape, device: torch.device, dtype: torch.dtype, smoke: bool) -> list[dict]:
    inputs = sweep.build(shape, device, dtype)
    default = sweep.default(shape, dtype)
    if smoke:
        want, tolerance = sweep.reference(inputs), (lambda t: SMOKE_TOLERANCE)
    else:
        want, tolerance = sweep.run(inputs, default)(), (lambda t: GPU_TOLERANCE[t.dtype])
    scale = 1e12 if sweep.unit == "TFLOP/s" else 1e9
    rows = []
    for config in sweep.candidates():
        row = {"sweep": sweep.name, "shape": shape.label, "config": list(config), "default": config == default,
               "ms": None, "rate": None, "unit": sweep.unit, "error": None, "status": "ok"}
        try:
            fn = sweep.run(inputs, config)
            row["error"] = relative_error(fn(), want, tolerance)  # in units of each output's bound
            if row["error"] > 1.0:
                row["status"] = f"wrong: error {row['error']:.3g} x its tolerance"
            elif not smoke:
                row["ms"] = harness.bench_ms(fn)
                row["rate"] = sweep.work(shape, dtype) / (row["ms"] * 1e-3) / scale
        except Exception as exc:  # e.g. triton's OutOfResources: a tile too big for shared memory
            row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        rows.append(row)
    return rows


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (sweep, shape): the fastest correct candidate, with its speedup over the default."""
    best = []
    for key in dict.fromkeys((r["sweep"], r["shape"]) for r in rows):
        timed = [r for r in rows if (r["sweep"], r["shape"]) == key and r["status"] == "ok" and r["ms"] is not None]
        if not timed:
            continue
        default = next((r for r in timed if r["default"]), None)
        winner = min(timed, key=lambda r: r["ms"])
        best.append({"sweep": key[0], "shape": key[1], "config": winner["config"], "ms": winner["ms"],
                     "rate": winner["rate"], "unit": winner["unit"],
                     "speedup_vs_default": default["ms"] / winner["ms"] if default else None})
    return best


def markdown(rows: list[dict], best: list[dict], metadata: dict) -> str:
    lines = ["# Triton launch-config sweep", ""]
    lines += [f"- {k}: {v}" for k, v in metadata.items()]
    lines += ["", "Configs: attention (block_m, block_n, num_warps, num_stages); rms_norm-bwd (block_m, num_warps, "
              "programs_per_sm); rope-fwd (block_h, num_warps). Backward attention sweeps time the whole backward "
              "with the other kernel at its default.", "", "## Best per shape", "",
              "| sweep | shape | config | ms | rate | vs default |", "|---|---|---|---|---|---|"]
    lines += [f"| {b['sweep']} | {b['shape']} | {tuple(b['config'])} | {harness.fmt_value(b['ms'], 4)} | "
              f"{harness.fmt_value(b['rate'], 4)} {b['unit']} | {harness.fmt_value(b['speedup_vs_default'])}x |" for b in best]
    lines += ["", "## All candidates", "", "| sweep | shape | config | default | ms | rate | error / tolerance | status |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['sweep']} | {r['shape']} | {tuple(r['config'])} | {'yes' if r['default'] else ''} | "
              f"{harness.fmt_value(r['ms'], 4)} | {harness.fmt_value(r['rate'], 4)} {r['unit']} | {harness.fmt_value(r['error'])} | {r['status']} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Optional[Path], rows: list[dict], meta: dict) -> str:
    """tune.json and tune.md of the rows so far (when there is an out_dir); returns the markdown."""
    best = best_rows(rows)
    report = markdown(rows, best, meta)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "tune.json").write_text(json.dumps({"metadata": meta, "best": best, "rows": rows}, indent=1))
        (out_dir / "tune.md").write_text(report)
    return report


def metadata(device: torch.device, dtype: torch.dtype, smoke: bool) -> dict:
    from bench import harness

    return {
        "date_utc": harness.today(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)",
        "torch": torch.__version__,
        "triton": harness.package_version("triton"),
        "git_commit": harness.git_commit(),
        "dtype": str(dtype).replace("torch.", ""),
        "smoke": smoke,
        "timing": "no timings (smoke)" if smoke else "triton.testing.do_bench median, warmup 25 ms, rep 100 ms",
    }


SWEEP_NAMES = ("attention-fwd", "attention-dkdv", "attention-dq", "rms_norm-bwd", "rope-fwd")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="append", choices=SWEEP_NAMES, help="only these sweeps (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes, no timings")
    parser.add_argument("--out", type=Path, help="directory for tune.{json,md} (GPU default: the run's "
                                                 "bench/results directory; smoke default: none)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel module is imported
        device, dtype = torch.device("cpu"), torch.float32
    elif not torch.cuda.is_available():
        print("bench.tune times kernels on a CUDA GPU; use --smoke on a CPU", file=sys.stderr)
        return 2
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    from bench import harness

    out_dir = args.out or (None if args.smoke else harness.default_out_dir())
    meta = metadata(device, dtype, args.smoke)
    rows: list[dict] = []
    for sweep in all_sweeps():
        if args.sweep and sweep.name not in args.sweep:
            continue
        for shape in sweep.smoke_shapes if args.smoke else sweep.gpu_shapes:
            new = sweep_rows(sweep, shape, device, dtype, args.smoke)
            for row in new:
                print(f"{row['sweep']:>14} {row['shape']:<28} {str(tuple(row['config'])):<20} "
                      f"{harness.fmt_value(row['ms'], 4):>8} ms {harness.fmt_value(row['rate'], 4):>7} {row['unit']:<7} {row['status']}",
                      flush=True)
            rows += new
            write_report(out_dir, rows, meta)  # after every shape: a run killed by a time limit keeps them
    print(write_report(out_dir, rows, meta))
    if out_dir is not None:
        print(f"wrote {out_dir / 'tune.md'}")
    # A wrong result is a kernel bug at that config; a failed launch (a tile too big for this
    # GPU's shared memory) is expected on a GPU, and a bug in the interpreter, which has no limit.
    bad = [r for r in rows if r["status"].startswith("wrong") or (args.smoke and r["status"] != "ok")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
