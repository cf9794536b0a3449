"""``thinkfuse.ops.rope`` and ``apply_rotary_pos_emb``: half-split rotary embedding of q and k.

- ``rope(q, k, position_ids, inv_freq, ...)``: q ``[B, S, Hq, D]``, k ``[B, S, Hkv, D]``; cos/sin
  are computed inside the kernel in float32 from ``position_ids * inv_freq`` (never stored),
  optionally with Ministral 3's query temperature fused on q.
- ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``: transformers' function, drop-in.

Both rotate q and k in one launch, compute in float32 and round once (transformers rounds each
product in the activation dtype: up to one unit in the last place apart in bfloat16/float16).
The cuda and triton backends run behind ``torch.library`` custom ops joined by autograd
formulas; the torch backend is ``reference.rope`` / ``reference.apply_rotary_pos_emb``.

The CUDA extension is expected to provide, with the Triton launchers' argument order (q/k
``[B, S, H, D]`` with a unit stride on D and any other strides; outputs contiguous
``[B, S, H, D]``; ``position_ids`` ``[B or 1, S]`` int32/int64, any strides, batch 1 broadcast;
``inv_freq`` float32 contiguous ``[D/2]``; cos/sin ``[B or 1, S, D]`` with a unit stride on D;
``llama4_beta == 0`` means no query temperature):
    rope_fwd(Tensor q, Tensor k, Tensor position_ids, Tensor inv_freq, float attention_scaling,
             float llama4_beta, int llama4_original_max) -> (Tensor q_out, Tensor k_out)
    rope_bwd(Tensor dq_out, Tensor dk_out, Tensor position_ids, Tensor inv_freq,
             float attention_scaling, float llama4_beta, int llama4_original_max) -> (Tensor dq, Tensor dk)
    apply_rotary_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor q_out, Tensor k_out)
        # outputs in promote_types(q.dtype, cos.dtype) / promote_types(k.dtype, cos.dtype)
    apply_rotary_bwd(Tensor dq_out, Tensor dk_out, Tensor cos, Tensor sin, ScalarType q_dtype,
                     ScalarType k_dtype) -> (Tensor dq, Tensor dk)
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._checks import FLOAT_DTYPES, check_float, check_same_device, check_tensor, with_unit_last_stride
from ..backend import resolve_backend
from ._registry import call, custom_op, implementation, register_autograd

POSITION_DTYPES = (torch.int32, torch.int64)
# transformers converts its inv_freq buffer with `.to(torch.float)` (a model cast to bfloat16
# casts the buffer too); any floating dtype is accepted and converted the same way.
INV_FREQ_DTYPES = FLOAT_DTYPES + (torch.float64,)
_NO_TEMPERATURE = (0.0, 1)  # beta 0: the query temperature is exactly 1


def rope(
    q: Tensor,
    k: Tensor,
    position_ids: Tensor,
    inv_freq: Tensor,
    *,
    attention_scaling: float = 1.0,
    llama4_scaling: Optional[tuple[float, int]] = None,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q ``[B, S, Hq, D]`` and k ``[B, S, Hkv, D]``; returns ``(q, k)``.

    cos/sin are ``cos/sin(position_ids.float() * inv_freq) * attention_scaling`` (float32, as
    transformers' rotary module). ``position_ids`` ``[B, S]`` or ``[1, S]`` (broadcast), int32 or
    int64. ``inv_freq`` ``[D/2]``, any floating dtype (converted to float32 as transformers does).
    ``llama4_scaling=(beta, original_max_position)`` multiplies q (only q) by
    ``1 + beta * log(1 + floor(position / original_max_position))`` (Ministral 3).
    Not differentiable w.r.t. ``inv_freq`` (transformers computes cos/sin under no_grad).
    """
    llama4 = _check_rope_args(q, k, position_ids, inv_freq, attention_scaling, llama4_scaling)
    inv_freq = inv_freq.detach().float()  # no gradient on any backend (the kernels have none)
    name = resolve_backend(q.device, backend, cuda_op="rope_fwd")
    if name == "torch":
        return reference.rope(q, k, position_ids, inv_freq, attention_scaling, llama4)
    beta, original_max = llama4 or _NO_TEMPERATURE
    return call(
        "rope_fwd", with_unit_last_stride(q), with_unit_last_stride(k), position_ids, inv_freq.contiguous(),
        float(attention_scaling), float(beta), int(original_max), name,
    )


def apply_rotary_pos_emb(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1, *, backend: Optional[str] = None
) -> tuple[Tensor, Tensor]:
    """Transformers' ``apply_rotary_pos_emb``: ``x * cos + rotate_half(x) * sin`` for q and k.

    ``unsqueeze_dim=1`` (or -3, the same dim of cos): q/k ``[B, H, S, D]``; ``unsqueeze_dim=2``
    (or -2): ``[B, S, H, D]``. cos/sin ``[B, S, D]`` or ``[1, S, D]``. Outputs have dtype
    ``promote_types(q.dtype, cos.dtype)``.
    """
    unsqueeze_dim = _check_apply_rotary_args(q, k, cos, sin, unsqueeze_dim)
    name = resolve_backend(q.device, backend, cuda_op="apply_rotary_fwd")
    if name == "torch":
        return reference.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    q_out, k_out = call(
        "apply_rotary_fwd", with_unit_last_stride(_to_bshd(q, unsqueeze_dim)), with_unit_last_stride(_to_bshd(k, unsqueeze_dim)),
        with_unit_last_stride(cos), with_unit_last_stride(sin), name,
    )
    return _to_bshd(q_out, unsqueeze_dim), _to_bshd(k_out, unsqueeze_dim)


def _to_bshd(x: Tensor, unsqueeze_dim: int) -> Tensor:
    """The ``[B, S, H, D]`` view of a q/k in ``unsqueeze_dim``'s layout (its own inverse)."""
    return x.transpose(1, 2) if unsqueeze_dim == 1 else x


# --- argument checks ---------------------------------------------------------------------------


def _check_qk(q: Tensor, k: Tensor, layout: str) -> None:
    """q and k in ``[B, S, H, D]`` order (``layout`` names the caller's order in messages)."""
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    if k.dtype != q.dtype:
        raise TypeError(f"k dtype {k.dtype} must equal q dtype {q.dtype}")
    for what, dim in (("batch size", 0), ("sequence length", 1), ("head_dim", 3)):
        if q.shape[dim] != k.shape[dim]:
            raise ValueError(
                f"q and k must have the same {what}, got q {tuple(q.shape)} and k {tuple(k.shape)} (layout {layout})"
            )
    head_dim = q.shape[3]
    if head_dim == 0 or head_dim % 2:
        raise ValueError(f"q/k head_dim must be even and non-zero (half-split rotation), got {head_dim}")


def _check_rope_args(q, k, position_ids, inv_freq, attention_scaling, llama4_scaling):
    _check_qk(q, k, "[B, S, H, D]")
    batch, seq, _, head_dim = q.shape
    check_tensor("position_ids", position_ids, dtypes=POSITION_DTYPES, ndim=2)
    if position_ids.shape[1] != seq or position_ids.shape[0] not in (1, batch):
        raise ValueError(
            f"position_ids must have shape [{batch}, {seq}] or [1, {seq}] (q is {tuple(q.shape)}), "
            f"got {tuple(position_ids.shape)}"
        )
    check_tensor("inv_freq", inv_freq, dtypes=INV_FREQ_DTYPES, ndim=1)
    if inv_freq.shape[0] != head_dim // 2:
        raise ValueError(f"inv_freq must have head_dim / 2 = {head_dim // 2} elements, got {inv_freq.shape[0]}")
    check_float("attention_scaling", attention_scaling)
    llama4 = _check_llama4_scaling(llama4_scaling)
    check_same_device(q=q, k=k, position_ids=position_ids, inv_freq=inv_freq)
    return llama4


def _check_llama4_scaling(llama4_scaling) -> Optional[tuple[float, int]]:
    if llama4_scaling is None:
        return None
    if not isinstance(llama4_scaling, (tuple, list)) or len(llama4_scaling) != 2:
        raise TypeError(
            f"llama4_scaling must be None or a (beta, original_max_position) pair, got {llama4_scaling!r}"
        )
    beta = check_float("llama4_scaling's beta", llama4_scaling[0])
    original_max = llama4_scaling[1]
    if isinstance(original_max, bool) or not isinstance(original_max, numbers.Integral):
        raise TypeError(
            f"llama4_scaling's original_max_position must be an int, got {type(original_max).__name__}"
        )
    if original_max <= 0:
        raise ValueError(f"llama4_scaling's original_max_position must be > 0, got {original_max}")
    return beta, int(original_max)


def _check_apply_rotary_args(q, k, cos, sin, unsqueeze_dim) -> int:
    """The checks, and unsqueeze_dim as 1 or 2 (transformers unsqueezes the 3-D cos at it, so -3
    and -2 are the same dims)."""
    # Type first: `in (1, 2)` would let True and 1.0 through (True == 1) and raise a bare
    # RuntimeError for a tensor, e.g. position_ids passed fifth as transformers 4.x's signature had.
    if isinstance(unsqueeze_dim, bool) or not isinstance(unsqueeze_dim, numbers.Integral):
        raise TypeError(
            f"unsqueeze_dim must be an int (1 or 2), got {type(unsqueeze_dim).__name__}; "
            "transformers 5's apply_rotary_pos_emb takes no position_ids"
        )
    if unsqueeze_dim in (-3, -2):
        unsqueeze_dim += 4
    if unsqueeze_dim not in (1, 2):
        raise ValueError(
            f"unsqueeze_dim must be 1 or -3 (q/k [B, H, S, D]) or 2 or -2 (q/k [B, S, H, D]), got {unsqueeze_dim!r}"
        )
    layout = "[B, H, S, D]" if unsqueeze_dim == 1 else "[B, S, H, D]"
    for name, x in (("q", q), ("k", k)):
        check_tensor(name, x, ndim=4)
    q_bshd, k_bshd = _to_bshd(q, unsqueeze_dim), _to_bshd(k, unsqueeze_dim)
    _check_qk(q_bshd, k_bshd, layout)
    batch, seq, _, head_dim = q_bshd.shape
    check_tensor("cos", cos, ndim=3)
    check_tensor("sin", sin, ndim=3)
    if cos.shape[1:] != (seq, head_dim) or cos.shape[0] not in (1, batch):
        raise ValueError(
            f"cos must have shape [{batch}, {seq}, {head_dim}] or [1, {seq}, {head_dim}] for q {tuple(q.shape)} "
            f"(layout {layout}), got {tuple(cos.shape)}"
        )
    if sin.shape != cos.shape:
        raise ValueError(f"sin shape {tuple(sin.shape)} must equal cos shape {tuple(cos.shape)}")
    if sin.dtype != cos.dtype:
        raise TypeError(f"sin dtype {sin.dtype} must equal cos dtype {cos.dtype}")
    check_same_device(q=q, k=k, cos=cos, sin=sin)
    return unsqueeze_dim


# ---------------------------------------------------------------------------------------------
# Custom ops. q/k are [B, S, H, D] with a unit stride on D; outputs are contiguous.
# `backend` is a plain string argument so torch.compile sees it as a constant.


def _torch_rotate(x, cos, sin, out_dtype):
    """Explicit torch form of the kernels' rotation: float32 math, one rounding."""
    x32 = x.float()
    out = x32 * cos[:, :, None] + reference.rotate_half(x32) * sin[:, :, None]
    return out.to(out_dtype).contiguous()


def _inverse_sin(sin):
    """The sin of the transposed rotation: ``(s1, s2) -> (-s2, -s1)`` (see kernels/rope.py)."""
    half = sin.shape[-1] // 2
    return -torch.cat((sin[..., half:], sin[..., :half]), dim=-1)


def _torch_rope(q, k, position_ids, inv_freq, attention_scaling, llama4_beta, llama4_original_max, inverse):
    cos, sin = reference.rope_cos_sin(position_ids, inv_freq, attention_scaling)
    if inverse:
        sin = _inverse_sin(sin)
    q_scale = 1.0
    if llama4_beta != 0.0:
        q_scale = reference.llama4_query_scale(position_ids, llama4_beta, llama4_original_max)[..., None]
    return _torch_rotate(q, cos * q_scale, sin * q_scale, q.dtype), _torch_rotate(k, cos, sin, k.dtype)


def _torch_rope_forward(q, k, position_ids, inv_freq, attention_scaling, llama4_beta, llama4_original_max):
    return _torch_rope(q, k, position_ids, inv_freq, attention_scaling, llama4_beta, llama4_original_max, False)


def _torch_rope_backward(dq, dk, position_ids, inv_freq, attention_scaling, llama4_beta, llama4_original_max):
    return _torch_rope(dq, dk, position_ids, inv_freq, attention_scaling, llama4_beta, llama4_original_max, True)


def _torch_apply_rotary_forward(q, k, cos, sin):
    cos32, sin32 = cos.float(), sin.float()
    return (
        _torch_rotate(q, cos32, sin32, torch.promote_types(q.dtype, cos.dtype)),
        _torch_rotate(k, cos32, sin32, torch.promote_types(k.dtype, cos.dtype)),
    )


def _torch_apply_rotary_backward(dq, dk, cos, sin, q_dtype, k_dtype):
    cos32, sin32 = cos.float(), _inverse_sin(sin.float())
    return _torch_rotate(dq, cos32, sin32, q_dtype), _torch_rotate(dk, cos32, sin32, k_dtype)


@custom_op("rope_fwd")
def rope_fwd(
    q: Tensor, k: Tensor, position_ids: Tensor, inv_freq: Tensor, attention_scaling: float,
    llama4_beta: float, llama4_original_max: int, backend: str,
) -> tuple[Tensor, Tensor]:
    fn = implementation(backend, "rope", "rope_forward", "rope_fwd", _torch_rope_forward)
    q_out, k_out = fn(q, k, position_ids, inv_freq, attention_scaling, llama4_beta, llama4_original_max)
    return q_out, k_out


@rope_fwd.register_fake
def _(q, k, position_ids, inv_freq, attention_scaling, llama4_beta, llama4_original_max, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@custom_op("rope_bwd")
def rope_bwd(
    dq_out: Tensor, dk_out: Tensor, position_ids: Tensor, inv_freq: Tensor, attention_scaling: float,
    llama4_beta: float, llama4_original_max: int, backend: str,
) -> tuple[Tensor, Tensor]:
    fn = implementation(backend, "rope", "rope_backward", "rope_bwd", _torch_rope_backward)
    dq, dk = fn(dq_out, dk_out, position_ids, inv_freq, attention_scaling, llama4_beta, llama4_original_max)
    return dq, dk


@rope_bwd.register_fake
def _(dq_out, dk_out, position_ids, inv_freq, attention_scaling, llama4_beta, llama4_original_max, backend):
    return dq_out.new_empty(dq_out.shape), dk_out.new_empty(dk_out.shape)


def _output_meta(outputs) -> list:
    """(shape, dtype, device) of each output: enough to make a zero gradient, unlike the outputs
    themselves, which would be kept alive until backward."""
    return [(out.shape, out.dtype, out.device) for out in outputs]


def _grad_or_zeros(grad: Optional[Tensor], meta) -> Tensor:
    """An output gradient, or zeros when autograd passes None (that output was not used)."""
    if grad is not None:
        return with_unit_last_stride(grad)
    shape, dtype, device = meta
    return torch.zeros(shape, dtype=dtype, device=device)


def _setup_rope_context(ctx, inputs, output):
    _q, _k, position_ids, inv_freq, *scalars, backend = inputs
    ctx.scalars, ctx.backend, ctx.out_meta = scalars, backend, _output_meta(output)
    ctx.save_for_backward(position_ids, inv_freq)


def _rope_backward(ctx, dq_out, dk_out):
    position_ids, inv_freq = ctx.saved_tensors
    q_meta, k_meta = ctx.out_meta
    dq, dk = call(
        "rope_bwd", _grad_or_zeros(dq_out, q_meta), _grad_or_zeros(dk_out, k_meta), position_ids, inv_freq,
        *ctx.scalars, ctx.backend,
    )
    return dq, dk, None, None, None, None, None, None


register_autograd("rope_fwd", _rope_backward, _setup_rope_context)


@custom_op("apply_rotary_fwd")
def apply_rotary_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    fn = implementation(backend, "rope", "apply_rotary_forward", "apply_rotary_fwd", _torch_apply_rotary_forward)
    q_out, k_out = fn(q, k, cos, sin)
    return q_out, k_out


@apply_rotary_fwd.register_fake
def _(q, k, cos, sin, backend):
    return (
        q.new_empty(q.shape, dtype=torch.promote_types(q.dtype, cos.dtype)),
        k.new_empty(k.shape, dtype=torch.promote_types(k.dtype, cos.dtype)),
    )


@custom_op("apply_rotary_bwd")
def apply_rotary_bwd(
    dq_out: Tensor, dk_out: Tensor, cos: Tensor, sin: Tensor, q_dtype: torch.dtype, k_dtype: torch.dtype,
    backend: str,
) -> tuple[Tensor, Tensor]:
    fn = implementation(backend, "rope", "apply_rotary_backward", "apply_rotary_bwd", _torch_apply_rotary_backward)
    dq, dk = fn(dq_out, dk_out, cos, sin, q_dtype, k_dtype)
    return dq, dk


@apply_rotary_bwd.register_fake
def _(dq_out, dk_out, cos, sin, q_dtype, k_dtype, backend):
    return dq_out.new_empty(dq_out.shape, dtype=q_dtype), dk_out.new_empty(dk_out.shape, dtype=k_dtype)


def _cos_sin_grads(dq_out, dk_out, q, k, cos):
    """Gradients w.r.t. cos and sin, in torch: a rare path (transformers makes cos/sin under
    no_grad), so q and k are saved only when it is needed. Sums over heads (and over the batch
    when cos broadcasts it)."""
    dcos = (dq_out.float() * q.float()).sum(2) + (dk_out.float() * k.float()).sum(2)
    dsin = (dq_out.float() * reference.rotate_half(q.float())).sum(2) + (
        dk_out.float() * reference.rotate_half(k.float())
    ).sum(2)
    if cos.shape[0] == 1:
        dcos, dsin = dcos.sum(0, keepdim=True), dsin.sum(0, keepdim=True)
    return dcos.to(cos.dtype), dsin.to(cos.dtype)


def _setup_apply_rotary_context(ctx, inputs, output):
    q, k, cos, sin, backend = inputs
    ctx.backend, ctx.q_dtype, ctx.k_dtype = backend, q.dtype, k.dtype
    ctx.out_meta = _output_meta(output)
    ctx.cos_sin_need_grad = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    saved_qk = (q, k) if ctx.cos_sin_need_grad else ()
    ctx.save_for_backward(cos, sin, *saved_qk)


def _apply_rotary_backward(ctx, dq_out, dk_out):
    cos, sin, *saved_qk = ctx.saved_tensors
    q_meta, k_meta = ctx.out_meta
    dq_out, dk_out = _grad_or_zeros(dq_out, q_meta), _grad_or_zeros(dk_out, k_meta)
    dq, dk = call("apply_rotary_bwd", dq_out, dk_out, cos, sin, ctx.q_dtype, ctx.k_dtype, ctx.backend)
    dcos = dsin = None
    if ctx.cos_sin_need_grad:
        dcos, dsin = _cos_sin_grads(dq_out, dk_out, *saved_qk, cos)
    return dq, dk, dcos, dsin, None


register_autograd("apply_rotary_fwd", _apply_rotary_backward, _setup_apply_rotary_context)
