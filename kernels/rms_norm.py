"""RMSNorm (with optional fused residual add), forward and backward, in Triton.

Inputs are 2-D ``[rows, N]`` views with a unit column stride; any row stride is accepted.
A row is held in one tile of ``BLOCK_N = next_pow2(N)`` columns, so N is bounded by
``MAX_HIDDEN``; several rows share a program when N is small.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 65536
_TILE_ELEMENTS = 8192  # elements per program tile: bounds registers for small N


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, H, RSTD,
    stride_x, stride_r,
    M, N, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols[None, :] < N)

    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        # The sum is rounded to the activation dtype, as `x + residual` is in eager torch.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + rows[:, None] * N + cols[None, :], x, mask=mask)

    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / N + eps)
    tl.store(RSTD + rows, rstd, mask=row_mask)

    # HF rounds the normalised row to the input dtype before the weight multiply.
    normed = (h * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * N + cols[None, :], (normed * w[None, :]).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, H, W, RSTD, DH, DX, DW_PARTIAL,
    stride_dy, stride_h,
    M, N, rows_per_program,
    HAS_DH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Each program owns a contiguous chunk of rows and writes one partial dweight row, so the
    # dweight reduction needs no atomics; the partials are summed afterwards.
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    for start in range(row_start, row_end, BLOCK_M):
        # int64 on the GPU already (start takes row_start's type); explicit for the interpreter,
        # whose loop variable is a Python int (rows * stride_dy would wrap in int32)
        rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h_raw = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)

        normed = h_raw.to(tl.float32) * rstd[:, None]
        dnormed = dy * w[None, :]
        # d/dh of h * rstd(h): rstd * (g - n * mean(g * n)).
        proj = tl.sum(dnormed * normed, axis=1) / N
        dx = rstd[:, None] * (dnormed - normed * proj[:, None])
        if HAS_DH:
            dx += tl.load(DH + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

        # dweight sees the rounded normalised value, exactly what forward multiplied.
        dw_acc += dy * normed.to(H.dtype.element_ty).to(tl.float32)

    tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


def _tile(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of ``n_cols`` elements."""
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(16, _TILE_ELEMENTS // block_n))
    num_warps = 4 if block_n <= 2048 else (8 if block_n <= 8192 else 16)
    return block_m, block_n, num_warps


def rms_norm_forward(x, weight, residual, eps: float):
    """x, residual: [M, N] with unit column stride; weight: [N] contiguous.

    Returns (y [M, N] in promote(x, weight), h [M, N] in x's dtype or an empty tensor when
    there is no residual, rstd [M] float32).
    """
    rows, n_cols = x.shape
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty((rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    has_residual = residual is not None
    h = torch.empty((rows, n_cols) if has_residual else (0,), dtype=x.dtype, device=x.device)
    if rows == 0:
        return y, h, rstd
    block_m, block_n, num_warps = _tile(n_cols)
    _rms_norm_fwd_kernel[(triton.cdiv(rows, block_m),)](
        x, residual if has_residual else x, weight, y, h if has_residual else y, rstd,
        x.stride(0), residual.stride(0) if has_residual else 0,
        rows, n_cols, eps,
        HAS_RESIDUAL=has_residual, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y, h, rstd


class BwdConfig(NamedTuple):
    """Launch shape of the backward: rows per loop step, warps, programs per SM (each program
    owns a contiguous run of rows and one partial dweight row)."""

    block_m: int
    num_warps: int
    programs_per_sm: int


def default_bwd_config(n_cols: int) -> BwdConfig:
    block_m, _, num_warps = _tile(n_cols)
    return BwdConfig(block_m, num_warps, 2)


# What bench/tune.py sweeps (the defaults for hidden sizes 1536 .. 8192 are among them).
BWD_CANDIDATES = tuple(BwdConfig(*c) for c in itertools.product((1, 2, 4), (4, 8, 16), (1, 2, 4, 8)))


def _num_programs(device: torch.device, rows: int, programs_per_sm: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, programs_per_sm * sms))
    return max(1, min(rows, 4))  # interpreter: few programs keep CPU tests fast


def rms_norm_backward(dy, h, weight, rstd, dh, config: BwdConfig | None = None):
    """Gradients of rms_norm_forward. Returns (dx in h's dtype, dweight in weight's dtype).
    ``config`` overrides ``default_bwd_config`` (bench/tune.py sweeps it)."""
    rows, n_cols = h.shape
    dx = torch.empty((rows, n_cols), dtype=h.dtype, device=h.device)
    if rows == 0:
        return dx, torch.zeros_like(weight)
    block_m, num_warps, programs_per_sm = config or default_bwd_config(n_cols)
    programs = _num_programs(h.device, rows, programs_per_sm)
    rows_per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_program)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=h.device)
    block_m = min(block_m, triton.next_power_of_2(rows_per_program))
    _rms_norm_bwd_kernel[(programs,)](
        dy, h, weight, rstd, dh if dh is not None else dx, dx, dw_partial,
        dy.stride(0), h.stride(0),
        rows, n_cols, rows_per_program,
        HAS_DH=dh is not None, BLOCK_M=block_m, BLOCK_N=triton.next_power_of_2(n_cols), num_warps=num_warps,
    )
    return dx, dw_partial.sum(0).to(weight.dtype)
