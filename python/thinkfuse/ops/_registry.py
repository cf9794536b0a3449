"""Where each backend's implementation of an op lives.

The triton kernels and the CUDA extension are imported lazily, the first time an op runs on
that backend, so ``import thinkfuse`` stays cheap and works where neither is installed.
"""

from __future__ import annotations

import importlib

import torch


def triton_kernels(op: str):
    """The module ``thinkfuse.kernels.<op>``."""
    return importlib.import_module(f"thinkfuse.kernels.{op}")


def cuda_ops():
    """The namespace of the compiled extension's ops (``torch.ops.thinkfuse_C``)."""
    importlib.import_module("thinkfuse._C")  # registers the ops with the dispatcher
    return torch.ops.thinkfuse_C


def implementation(backend: str, op: str, triton_fn: str, cuda_fn: str, torch_fn):
    """The callable that runs one kernel on ``backend``: the launcher
    ``thinkfuse.kernels.<op>.<triton_fn>``, the extension op ``cuda_fn``, or ``torch_fn`` (the
    explicit torch form used for the "torch" value of a custom op's ``backend`` argument)."""
    if backend == "triton":
        return getattr(triton_kernels(op), triton_fn)
    if backend == "cuda":
        return getattr(cuda_ops(), cuda_fn)
    return torch_fn
