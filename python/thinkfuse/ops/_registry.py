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


# ---------------------------------------------------------------------------------------------
# Custom ops with a direct eager path.
#
# Calling a torch.library custom op costs host time in the dispatcher: ~20 us per call without
# autograd and ~55 us with it (measured on this project's CPU machine through the "torch" backend
# value, so without any kernel). At decode, where a step of a 7B model runs ~5 ops per layer, that
# is milliseconds per token. Where nothing needs the dispatcher (eager mode, no gradient to record,
# plain tensors) ``call`` runs the op's Python body directly; torch.compile, autograd and tensor
# subclasses (FakeTensor, FunctionalTensor, DTensor) still go through ``torch.ops.thinkfuse``.

_BODIES: dict = {}
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def custom_op(name: str):
    """``torch.library.custom_op("thinkfuse::<name>", mutates_args=())`` that also records the
    undecorated function for ``call``'s direct path."""

    def register(fn):
        _BODIES[name] = fn
        return torch.library.custom_op(f"thinkfuse::{name}", mutates_args=())(fn)

    return register


def needs_dispatcher(args) -> bool:
    """Whether a call with ``args`` must go through the dispatcher: under torch.compile, with a
    gradient to record, or with a tensor subclass among the arguments."""
    if torch.compiler.is_compiling():
        return True
    grad_mode = torch.is_grad_enabled()
    for arg in args:
        if isinstance(arg, torch.Tensor):
            if type(arg) not in _PLAIN_TENSOR_TYPES or (grad_mode and arg.requires_grad):
                return True
    return False


def call(name: str, *args):
    """Run the custom op ``thinkfuse::<name>`` on ``args`` (its schema's positional order)."""
    if needs_dispatcher(args):
        return getattr(torch.ops.thinkfuse, name)(*args)
    return _BODIES[name](*args)
