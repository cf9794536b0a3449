"""Helpers for tests of strided inputs: leaves that keep their strides, and a record of the
strides that reach each custom op."""

import importlib

import torch


def strided_leaf(t: torch.Tensor) -> torch.Tensor:
    """A leaf copy of ``t`` with t's strides and offset, in fresh memory: ``clone()`` of a
    non-dense view (a column slice, an expanded tensor, a slice of a fused projection) is
    contiguous, so a strided case built with it would reach the op contiguous."""
    t = t.detach()
    copy = torch.empty(0, dtype=t.dtype, device=t.device)
    return copy.set_(t.untyped_storage().clone(), t.storage_offset(), t.shape, t.stride()).requires_grad_()


def spy_on_op_calls(monkeypatch, ops_module_name: str) -> dict:
    """{custom op name: strides of its tensor arguments} of each call the ops module
    ``ops_module_name`` (e.g. "thinkfuse.ops.rms_norm") makes through ``call`` from now on,
    forward and backward."""
    ops_module = importlib.import_module(ops_module_name)  # the module, not a function of that name
    seen, call = {}, ops_module.call

    def spy(name, *args):
        seen[name] = [a.stride() if isinstance(a, torch.Tensor) else None for a in args]
        return call(name, *args)

    monkeypatch.setattr(ops_module, "call", spy)
    return seen
