"""Argument checks shared by the public ops.

Every check raises before any kernel runs, with a message that names the argument and says
what was expected.
"""

from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, value, *, dtypes=FLOAT_DTYPES, ndim: int | None = None, min_ndim=None):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        expected = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({expected}), got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(value.shape)}")
    return value


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, tensor in items[1:]:
        if tensor.device != first.device:
            raise ValueError(
                f"{name} is on {tensor.device} but {first_name} is on {first.device}; "
                "all tensors must be on one device"
            )
    return first.device


def check_float(name: str, value, *, positive: bool = False, non_negative: bool = False) -> float:
    # numbers.Real: Python's ints and floats, and numpy's scalars (a temperature read from a
    # numpy config); not bool, and not tensors (whose value would be a host read)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int past float's range: as infinite as float("inf")
        value = float("inf") if value > 0 else float("-inf")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if non_negative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` as 2-D ``[rows, last_dim]`` with a unit stride on the last dim.

    Copies only when no such view exists (e.g. a transposed input).
    """
    rows = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    if rows.shape[-1] > 1 and rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows


def with_unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has unit stride (any other strides are fine), else a copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def check_generator(generator, device: torch.device, tensor_name: str) -> None:
    """None, or a torch.Generator that can draw on ``device`` (where ``tensor_name`` lives):
    the same device type, and the same index where both have one (a cuda:0 generator cannot
    draw on cuda:1)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not same_generator_device(generator.device, device):
        raise ValueError(f"generator is on {generator.device} but {tensor_name} is on {device}")


def same_generator_device(generator_device: torch.device, tensor_device: torch.device) -> bool:
    if generator_device.type != tensor_device.type:
        return False
    return generator_device.index is None or tensor_device.index is None or \
        generator_device.index == tensor_device.index

