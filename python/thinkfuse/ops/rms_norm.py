"""``thinkfuse.ops.rms_norm``: RMSNorm with HF semantics and an optional fused residual add.

The cuda and triton backends run behind two ``torch.library`` custom ops
(``thinkfuse::rms_norm_fwd`` / ``thinkfuse::rms_norm_bwd``) joined by an autograd formula, so
the op works under autograd and ``torch.compile``. The torch backend is ``reference.rms_norm``
itself (plain autograd).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._checks import FLOAT_DTYPES, as_rows, check_float, check_same_device, check_tensor
from ..backend import get_backend, resolve_backend
from ._registry import call, custom_op, implementation, register_autograd


def rms_norm(
    x: Tensor,
    weight: Tensor,
    eps: float = 1e-6,
    *,
    residual: Optional[Tensor] = None,
    backend: Optional[str] = None,
):
    """RMSNorm over the last dim: ``weight * (x32 * rsqrt(mean(x32**2) + eps)).to(x.dtype)``.

    With ``residual``, computes ``h = x + residual`` first and returns ``(rms_norm(h), h)``.
    The output dtype is ``promote_types(x.dtype, weight.dtype)``, as in transformers.
    """
    _check_args(x, weight, eps, residual)
    name = resolve_backend(x.device, backend, cuda_op="rms_norm_fwd")
    if name == "triton" and not _triton_takes_rows_of(x.shape[-1], backend):
        name = "torch"
    if name == "torch" or x.numel() == 0:  # nothing for a kernel to do
        return reference.rms_norm(x, weight, eps, residual)

    res_rows = None if residual is None else as_rows(residual)
    y, h, _ = call("rms_norm_fwd", as_rows(x), weight.contiguous(), res_rows, float(eps), name)
    y = y.view(x.shape)
    return y if residual is None else (y, h.view(x.shape))


def _check_args(x, weight, eps, residual) -> None:
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=1)
    check_float("eps", eps, non_negative=True)
    if x.shape[-1] == 0:
        raise ValueError("x must have a non-empty last dim")
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight has {weight.shape[0]} elements but x's last dim (the normalised size) is {x.shape[-1]}"
        )
    if residual is not None:
        check_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual dtype {residual.dtype} must equal x dtype {x.dtype}")
    check_same_device(x=x, weight=weight, residual=residual)



def _triton_takes_rows_of(cols: int, requested: Optional[str]) -> bool:
    """Whether the Triton kernels, which hold a row in one tile, take rows of ``cols`` elements;
    past their limit a named triton backend (``requested``, or use_backend / set_backend) is a
    ValueError and an automatic choice falls back to the torch form (the cuda kernels stream long
    rows)."""
    from ..kernels.rms_norm import MAX_HIDDEN

    if cols <= MAX_HIDDEN:
        return True
    if requested is not None or get_backend() is not None:
        raise ValueError(f"the triton rms_norm takes rows of at most {MAX_HIDDEN} elements (x's last dim), got "
                         f"{cols}; use backend='cuda' or 'torch'")
    return False

# ---------------------------------------------------------------------------------------------
# Custom ops. Inputs are 2-D [rows, N] with a unit column stride (see _checks.as_rows).
# `backend` is a plain string argument so torch.compile sees it as a constant.


def _torch_forward(x, weight, residual, eps):
    """Explicit torch form of the kernels' forward (used for the "torch" value of `backend`)."""
    h = x if residual is None else x + residual
    h32 = h.float()
    rstd = torch.rsqrt(h32.pow(2).mean(-1) + eps)
    y = weight * (h32 * rstd[:, None]).to(x.dtype)
    empty = h.new_empty((0,))
    return y, (empty if residual is None else h), rstd


def _torch_backward(dy, h, weight, rstd, dh):
    normed = h.float() * rstd[:, None]
    dnormed = dy.float() * weight.float()
    proj = (dnormed * normed).mean(-1, keepdim=True)
    dx = rstd[:, None] * (dnormed - normed * proj)
    if dh is not None:
        dx = dx + dh.float()
    dw = (dy.float() * normed.to(h.dtype).float()).sum(0)
    return dx.to(h.dtype), dw.to(weight.dtype)


@custom_op("rms_norm_fwd")
def rms_norm_fwd(
    x: Tensor, weight: Tensor, residual: Optional[Tensor], eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    y, h, rstd = implementation(backend, "rms_norm", "rms_norm_forward", "rms_norm_fwd", _torch_forward)(
        x, weight, residual, eps
    )
    return y, h, rstd


@rms_norm_fwd.register_fake
def _(x, weight, residual, eps, backend):
    rows, n_cols = x.shape
    y = x.new_empty((rows, n_cols), dtype=torch.promote_types(x.dtype, weight.dtype))
    h = x.new_empty((rows, n_cols) if residual is not None else (0,))
    return y, h, x.new_empty((rows,), dtype=torch.float32)


@custom_op("rms_norm_bwd")
def rms_norm_bwd(
    dy: Tensor, h: Tensor, weight: Tensor, rstd: Tensor, dh: Optional[Tensor], backend: str
) -> tuple[Tensor, Tensor]:
    dx, dw = implementation(backend, "rms_norm", "rms_norm_backward", "rms_norm_bwd", _torch_backward)(
        dy, h, weight, rstd, dh
    )
    return dx, dw


@rms_norm_bwd.register_fake
def _(dy, h, weight, rstd, dh, backend):
    return h.new_empty(h.shape), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, residual, _eps, backend = inputs
    _y, h, rstd = output
    ctx.has_residual = residual is not None
    ctx.backend = backend
    ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)


def _backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    dh = dh.contiguous() if (ctx.has_residual and dh is not None) else None
    dx, dw = call("rms_norm_bwd", as_rows(dy), h, weight, rstd, dh, ctx.backend)
    return dx, dw, (dx if ctx.has_residual else None), None, None


register_autograd("rms_norm_fwd", _backward, _setup_context)
