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
