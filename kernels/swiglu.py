"""SwiGLU ``silu(gate) * up``, forward and backward, in Triton.

Inputs are 2-D ``[rows, N]`` views with a unit column stride (any row stride). The fused form
takes the output of a merged gate/up projection ``[rows, 2N]`` (gate first, then up) and runs
the same kernels on its two column halves, viewed in place: one launch, no split copy. The math
is float32 and each output is rounded once to the input dtype.

The grid is 1-D over rows x column blocks, so rows of any width keep every program small.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK = 1024


@triton.jit
def _tile_offsets(n_cols, n_col_blocks, BLOCK: tl.constexpr):
    """(row int64, column indices, column mask) of this program's tile."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_col_blocks
    cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    return row, cols, cols < n_cols


@triton.jit
def _swiglu_fwd_kernel(
    G, U, Y,
    stride_g, stride_u,
    n_cols, n_col_blocks,
    BLOCK: tl.constexpr,
):
    row, cols, mask = _tile_offsets(n_cols, n_col_blocks, BLOCK)
    gate = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU,
    stride_dy, stride_g, stride_u, stride_dg, stride_du,
    n_cols, n_col_blocks,
    BLOCK: tl.constexpr,
):
    row, cols, mask = _tile_offsets(n_cols, n_col_blocks, BLOCK)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(DG + row * stride_dg + cols, dgate.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, (dy * silu).to(DU.dtype.element_ty), mask=mask)


def _grid_and_block(rows: int, n_cols: int) -> tuple[tuple[int], int]:
    block = min(_MAX_BLOCK, triton.next_power_of_2(n_cols))
    n_col_blocks = triton.cdiv(n_cols, block)
    return (rows * n_col_blocks,), block


def _halves(gate_up):
    """The gate and up column halves of a ``[rows, 2N]`` tensor, as views."""
    n_cols = gate_up.shape[1] // 2
    return gate_up[:, :n_cols], gate_up[:, n_cols:]


def swiglu_forward(gate, up):
    """gate, up: ``[rows, N]`` with unit column stride. Returns contiguous ``[rows, N]``."""
    rows, n_cols = gate.shape
    y = torch.empty((rows, n_cols), dtype=gate.dtype, device=gate.device)
    if y.numel() == 0:
        return y
    grid, block = _grid_and_block(rows, n_cols)
    _swiglu_fwd_kernel[grid](
        gate, up, y, gate.stride(0), up.stride(0), n_cols, grid[0] // rows, BLOCK=block, num_warps=4,
    )
    return y


def _swiglu_backward_into(dy, gate, up, dgate, dup) -> None:
    rows, n_cols = gate.shape
    if dgate.numel() == 0:
        return
    grid, block = _grid_and_block(rows, n_cols)
    _swiglu_bwd_kernel[grid](
        dy, gate, up, dgate, dup,
        dy.stride(0), gate.stride(0), up.stride(0), dgate.stride(0), dup.stride(0),
        n_cols, grid[0] // rows, BLOCK=block, num_warps=4,
    )


def swiglu_backward(dy, gate, up):
    """Gradients of swiglu_forward: ``(dgate, dup)``, contiguous, in gate's dtype."""
    dgate, dup = (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) for _ in range(2))
    _swiglu_backward_into(dy, gate, up, dgate, dup)
    return dgate, dup


def swiglu_fused_forward(gate_up):
    """gate_up: ``[rows, 2N]`` with unit column stride. Returns ``silu(gate) * up`` ``[rows, N]``."""
    return swiglu_forward(*_halves(gate_up))


def swiglu_fused_backward(dy, gate_up):
    """Gradient of swiglu_fused_forward: one contiguous ``[rows, 2N]`` tensor."""
    dgate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    _swiglu_backward_into(dy, *_halves(gate_up), *_halves(dgate_up))
    return dgate_up
