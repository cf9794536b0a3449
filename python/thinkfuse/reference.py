"""Pure-torch definitions of every thinkfuse op: the specification of truth and the
``torch`` backend.

Each function reproduces the Hugging Face transformers computation it replaces, rounding where
transformers rounds, so that the torch backend is bit-compatible with the unpatched model.
Gradients come from autograd.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual=None):
    """``weight * (x32 * rsqrt(mean(x32**2, -1) + eps)).to(x.dtype)``, as Qwen2RMSNorm.

    With ``residual``: ``h = x + residual`` (in x's dtype) and the result is
    ``(rms_norm(h), h)``.
    """
    if residual is not None:
        hidden = x + residual
        return rms_norm(hidden, weight, eps), hidden
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    normed = x32 * torch.rsqrt(variance + eps)
    return weight * normed.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, computed in float32 and rounded once to the input dtype.

    Transformers' eager MLP (``act_fn(gate_proj(x)) * up_proj(x)``) rounds ``silu(gate)`` to the
    activation dtype before the multiply, so in bfloat16/float16 it can differ from this by one
    unit in the last place; in float32 the two agree.
    """
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x[..., d/2:], x[..., :d/2])``: the half-split rotation partner of ``x``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Transformers' ``apply_rotary_pos_emb``: ``x * cos + rotate_half(x) * sin`` for q and k.

    ``cos``/``sin`` ``[B, S, D]`` are unsqueezed at ``unsqueeze_dim`` to broadcast against
    ``[B, H, S, D]`` (1) or ``[B, S, H, D]`` (2). Each product and the sum are rounded to the
    promoted dtype of q and cos, as in transformers.
    """
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
    """Float32 ``(cos, sin)`` ``[B, S, D]`` as transformers' rotary embedding module computes
    them, before its cast to the activation dtype."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def llama4_query_scale(position_ids: torch.Tensor, beta: float, original_max_position: int):
    """Ministral 3's query temperature ``1 + beta * log(1 + floor(pos / L0))``, float32 ``[B, S]``."""
    return 1 + beta * torch.log(1 + torch.floor(position_ids / original_max_position))


def rope(q, k, position_ids, inv_freq, attention_scaling: float = 1.0, llama4_scaling=None):
    """RoPE on q ``[B, S, Hq, D]`` and k ``[B, S, Hkv, D]`` at ``position_ids`` ``[B|1, S]``.

    Transformers' rotary embedding (float32 cos/sin times ``attention_scaling``, cast to the
    activation dtype) followed by ``apply_rotary_pos_emb`` with ``unsqueeze_dim=2``. With
    ``llama4_scaling = (beta, L0)`` the rotated q (only q) is then multiplied by
    ``llama4_query_scale`` cast to q's dtype, as Ministral 3's attention does.
    """
    cos, sin = rope_cos_sin(position_ids, inv_freq, attention_scaling)
    q_out, k_out = apply_rotary_pos_emb(q, k, cos.to(q.dtype), sin.to(q.dtype), unsqueeze_dim=2)
    if llama4_scaling is not None:
        scale = llama4_query_scale(position_ids, *llama4_scaling)
        q_out = q_out * scale[:, :, None, None].to(q_out.dtype)
    return q_out, k_out
