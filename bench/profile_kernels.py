"""Workloads for Nsight Compute: each runs its kernels twice, so ncu can skip the warm-up call.

    ncu --clock-control none --set full -k regex:dkdv_kernel --launch-skip 1 --launch-count 1 \\
        python -m bench.profile_kernels attention-sm90

bench/gpu_check.sh's ``profile`` step runs this once per kernel of its PROFILES list and keeps
ncu's text report (speed of light, occupancy, memory, warp stall reasons) in the run's logs. The
benchmarks say how fast a kernel is; this says what holds it back.

Shapes: the attention goal's (causal, 2 x 8192 tokens, 32 / 8 heads, head_dim 128, bf16).
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

BATCH, SEQLEN, Q_HEADS, KV_HEADS, HEAD_DIM = 2, 8192, 32, 8, 128


def _qkv():
    def tensor(heads):
        return torch.randn(BATCH, SEQLEN, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)

    return tensor(Q_HEADS), tensor(KV_HEADS), tensor(KV_HEADS)


def attention_sm90() -> Callable[[], None]:
    """The Hopper forward and backward ops, called directly (one launch of each kernel)."""
    import thinkfuse.backend  # noqa: F401  (loads the extension's ops)
    from thinkfuse.backend import cuda_has_op

    if not cuda_has_op("flash_attention_bwd_sm90"):
        raise SystemExit("this build of the extension has no Hopper attention kernels")
    ops = torch.ops.thinkfuse_C
    q, k, v = _qkv()
    dout = torch.randn_like(q)
    scale = HEAD_DIM ** -0.5
    lengths = (None, None, SEQLEN, SEQLEN, scale, True, 0)

    def run():
        out, lse = ops.flash_attention_fwd_sm90(q, k, v, *lengths)
        ops.flash_attention_bwd_sm90(dout, q, k, v, out, lse, None, *lengths)

    return run


def attention_triton() -> Callable[[], None]:
    """Triton's forward and backward through flash_attention (its forward, dq and dk/dv kernels)."""
    import thinkfuse

    q, k, v = (t.requires_grad_() for t in _qkv())
    dout = torch.randn_like(q)

    def run():
        out = thinkfuse.ops.flash_attention(q, k, v, causal=True, backend="triton")
        torch.autograd.grad(out, (q, k, v), dout)

    return run


WORKLOADS: dict[str, Callable[[], Callable[[], None]]] = {
    "attention-sm90": attention_sm90,
    "attention-triton": attention_triton,
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profiling needs a CUDA device")
    run = WORKLOADS[args.workload]()
    for _ in range(2):  # ncu --launch-skip 1: the first call warms up
        run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
