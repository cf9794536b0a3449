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
