"""``thinkfuse.ops.swiglu`` / ``swiglu_fused``: ``silu(gate) * up`` in float32, rounded once.

``swiglu_fused(gate_up)`` takes the output of a merged gate/up projection ``[..., 2*I]`` (gate in
the first half, up in the second) and reads both halves in place: no split copy, one launch.

The cuda and triton backends run behind ``torch.library`` custom ops joined by autograd formulas
(``thinkfuse::swiglu_fwd``/``_bwd`` and ``thinkfuse::swiglu_fused_fwd``/``_bwd``), so the ops work
under autograd and ``torch.compile``. The torch backend is ``reference.swiglu`` (plain autograd).

The CUDA extension is expected to provide, with the Triton launchers' argument order (2-D
inputs with a unit column stride and any row stride; outputs contiguous, in gate's dtype):
    swiglu_fwd(Tensor gate, Tensor up) -> Tensor y
    swiglu_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor dgate, Tensor dup)
    swiglu_fused_fwd(Tensor gate_up) -> Tensor y                   # y: [rows, N], gate_up: [rows, 2N]
    swiglu_fused_bwd(Tensor dy, Tensor gate_up) -> Tensor dgate_up  # [rows, 2N]
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._checks import as_rows, check_same_device, check_tensor
from ..backend import resolve_backend
from ._registry import call, custom_op, implementation, register_autograd


def swiglu(gate: Tensor, up: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """``silu(gate) * up`` computed in float32 and rounded once to gate's dtype.

    Transformers' eager MLP rounds ``silu(gate)`` to the activation dtype before the multiply,
    so bfloat16/float16 results can differ from it by one unit in the last place.
    """
    _check_gate_up(gate, up)
    name = resolve_backend(gate.device, backend, cuda_op="swiglu_fwd")
    if name == "torch" or gate.numel() == 0:  # nothing for a kernel to do
        return reference.swiglu(gate, up)
    return call("swiglu_fwd", as_rows(gate), as_rows(up), name).view(gate.shape)


def swiglu_fused(gate_up: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """``swiglu(gate_up[..., :I], gate_up[..., I:])`` for ``gate_up`` ``[..., 2*I]``."""
    check_tensor("gate_up", gate_up, min_ndim=1)
    if gate_up.shape[-1] == 0 or gate_up.shape[-1] % 2:
        raise ValueError(
            f"gate_up's last dim must be even and non-zero (gate and up halves), got {gate_up.shape[-1]}"
        )
    name = resolve_backend(gate_up.device, backend, cuda_op="swiglu_fused_fwd")
    if name == "torch" or gate_up.numel() == 0:  # nothing for a kernel to do
        return reference.swiglu(*gate_up.chunk(2, dim=-1))
    out_shape = (*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    return call("swiglu_fused_fwd", as_rows(gate_up), name).view(out_shape)


def _check_gate_up(gate, up) -> None:
    check_tensor("gate", gate, min_ndim=1)
    check_tensor("up", up)
    if gate.shape[-1] == 0:
        raise ValueError("gate must have a non-empty last dim")
    if up.shape != gate.shape:
        raise ValueError(f"up shape {tuple(up.shape)} must equal gate shape {tuple(gate.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"up dtype {up.dtype} must equal gate dtype {gate.dtype}")
    check_same_device(gate=gate, up=up)


# ---------------------------------------------------------------------------------------------
# Custom ops. Inputs are 2-D [rows, N] with a unit column stride (see _checks.as_rows).
# `backend` is a plain string argument so torch.compile sees it as a constant.


def _torch_forward(gate, up):
    """Explicit torch form of the kernels (used for the "torch" value of `backend`)."""
    return reference.swiglu(gate, up).contiguous()


def _torch_backward(dy, gate, up):
    g, u, d = gate.float(), up.float(), dy.float()
    sig = torch.sigmoid(g)
    dgate = d * u * sig * (1 + g * (1 - sig))
    return dgate.to(gate.dtype).contiguous(), (d * g * sig).to(gate.dtype).contiguous()


def _torch_fused_forward(gate_up):
    return _torch_forward(*gate_up.chunk(2, dim=-1))


def _torch_fused_backward(dy, gate_up):
    return torch.cat(_torch_backward(dy, *gate_up.chunk(2, dim=-1)), dim=-1)


@custom_op("swiglu_fwd")
def swiglu_fwd(gate: Tensor, up: Tensor, backend: str) -> Tensor:
    return implementation(backend, "swiglu", "swiglu_forward", "swiglu_fwd", _torch_forward)(gate, up)


@swiglu_fwd.register_fake
def _(gate, up, backend):
    return gate.new_empty(gate.shape)


@custom_op("swiglu_bwd")
def swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    dgate, dup = implementation(backend, "swiglu", "swiglu_backward", "swiglu_bwd", _torch_backward)(dy, gate, up)
    return dgate, dup


@swiglu_bwd.register_fake
def _(dy, gate, up, backend):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(gate, up)


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = call("swiglu_bwd", as_rows(dy), gate, up, ctx.backend)
    return dgate, dup, None


register_autograd("swiglu_fwd", _backward, _setup_context)


@custom_op("swiglu_fused_fwd")
def swiglu_fused_fwd(gate_up: Tensor, backend: str) -> Tensor:
    fn = implementation(backend, "swiglu", "swiglu_fused_forward", "swiglu_fused_fwd", _torch_fused_forward)
    return fn(gate_up)


@swiglu_fused_fwd.register_fake
def _(gate_up, backend):
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@custom_op("swiglu_fused_bwd")
def swiglu_fused_bwd(dy: Tensor, gate_up: Tensor, backend: str) -> Tensor:
    fn = implementation(backend, "swiglu", "swiglu_fused_backward", "swiglu_fused_bwd", _torch_fused_backward)
    return fn(dy, gate_up)


@swiglu_fused_bwd.register_fake
def _(dy, gate_up, backend):
    return gate_up.new_empty(gate_up.shape)


def _setup_fused_context(ctx, inputs, output):
    gate_up, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(gate_up)


def _fused_backward(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return call("swiglu_fused_bwd", as_rows(dy), gate_up, ctx.backend), None


register_autograd("swiglu_fused_fwd", _fused_backward, _setup_fused_context)
