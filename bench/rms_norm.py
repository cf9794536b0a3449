"""RMSNorm cases: ``thinkfuse.ops.rms_norm`` against HF ``Qwen2RMSNorm`` (eager and
torch.compile) and Liger-Kernel, with and without the fused residual add.

Variants:
- ``norm``: ``y = rms_norm(x)``.
- ``add+norm``: ``h = x + residual; y = rms_norm(h)``, returning ``(y, h)``. thinkfuse and Liger
  fuse the add; the HF baselines run ``x + residual`` then the module, as a decoder layer does.

In fwd+bwd rows both outputs get a gradient (``dy``, and ``dh`` for add+norm, since in a model
``h`` also feeds the next residual add), and gradients are taken for x (+ residual) and weight.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

import thinkfuse
from bench import harness
from bench.harness import FWD_BWD, HF_EAGER, LIGER, TORCH_COMPILE, Case, Config, Workload

OP = "rms_norm"
EPS = 1e-6  # the epsilon does not change the cost
NORM, ADD_NORM = "norm", "add+norm"
TOKENS = (4096, 16384)
SMOKE_TOKENS = 8
SMOKE_HIDDEN = (64, 1000)  # 1000: not a power of two, exercises the masked tail
SMOKE_MODEL = "tiny"

LIGER_CLASSES = {
    NORM: ("liger_kernel.transformers.rms_norm", "LigerRMSNorm"),
    ADD_NORM: ("liger_kernel.transformers.fused_add_rms_norm", "LigerFusedAddRMSNorm"),
}

BYTES_COUNTED = (
    "minimal DRAM traffic, T tokens x N hidden, activations and weight in the run's dtype. "
    "norm fwd: read x, weight; write y (2*T*N + N elements). "
    "add+norm fwd: read x, residual, weight; write y, h (4*T*N + N). "
    "fwd+bwd adds the backward: norm reads dy, x, weight and writes dx, dweight "
    "(3*T*N + 2*N); add+norm reads dy, dh, h, weight and writes dx, dweight (4*T*N + 2*N), "
    "where dx is also the residual's gradient (the same tensor, counted once). "
    "Not counted: the per-row rstd (T floats) and any partial dweight sums."
)


def cases(config: Config) -> list[Case]:
    out = []
    for tokens, hidden, model in _shapes(config):
        for variant in (NORM, ADD_NORM):
            for mode in config.modes:
                for impl, make_module, compiled, missing in _implementations(config, variant):
                    build = functools.partial(
                        _build, make_module, compiled, tokens, hidden, variant, mode, config
                    )
                    out.append(Case(
                        op=OP, impl=impl, variant=variant, mode=mode,
                        shape={"tokens": tokens, "hidden": hidden}, model=model,
                        dtype=config.dtype,
                        bytes_moved=bytes_moved(tokens, hidden, variant, mode, config.dtype),
                        build=None if missing else build, missing=missing,
                    ))
    return out


def bytes_moved(tokens: int, hidden: int, variant: str, mode: str, dtype: torch.dtype) -> int:
    """Bytes of the op's minimal reads + writes (see BYTES_COUNTED)."""
    element = torch.empty((), dtype=dtype).element_size()
    activation, weight = tokens * hidden * element, hidden * element
    forward_streams = 2 if variant == NORM else 4  # x (+ residual) in; y (+ h) out
    total = forward_streams * activation + weight
    if mode == FWD_BWD:
        backward_streams = 3 if variant == NORM else 4  # dy, x or h (+ dh) in; dx out
        total += backward_streams * activation + 2 * weight  # weight in, dweight out
    return total


def _shapes(config: Config) -> list[tuple[int, int, str]]:
    """(tokens, hidden, model names) for every case shape."""
    if config.smoke:
        return [(SMOKE_TOKENS, hidden, SMOKE_MODEL) for hidden in SMOKE_HIDDEN]
    hidden_sizes = harness.presets_by(config.presets, "hidden_size")
    return [(tokens, hidden, models) for tokens in TOKENS for hidden, models in hidden_sizes.items()]


# ---------------------------------------------------------------------------------------------
# Implementations: each is a module factory hidden -> nn.Module whose forward takes (x) for
# norm or (x, residual) for add+norm and returns y or (y, h).


class ThinkfuseRMSNorm(nn.Module):
    def __init__(self, hidden: int, backend: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.backend = backend

    def forward(self, x, residual=None):
        return thinkfuse.ops.rms_norm(x, self.weight, EPS, residual=residual, backend=self.backend)


class HFAddThenNorm(nn.Module):
    """What an HF decoder layer does: the residual add, then Qwen2RMSNorm."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = _qwen2_rms_norm(hidden)

    @property
    def weight(self):
        return self.norm.weight

    def forward(self, x, residual):
        h = x + residual
        return self.norm(h), h


def _qwen2_rms_norm(hidden: int) -> nn.Module:
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    return Qwen2RMSNorm(hidden, eps=EPS)


def _hf_module(hidden: int, variant: str) -> nn.Module:
    return _qwen2_rms_norm(hidden) if variant == NORM else HFAddThenNorm(hidden)


def _liger_module(liger_class, hidden: int) -> nn.Module:
    # in_place=False keeps dy intact across timed repetitions (the in-place backward would
    # overwrite it with dx); the traffic is the same. Old Liger versions lack the argument.
    try:
        return liger_class(hidden, eps=EPS, in_place=False)
    except TypeError:
        return liger_class(hidden, EPS)


def _implementations(config: Config, variant: str):
    """(implementation name, module factory, compile it?, why missing) in table order."""
    impls = [
        (name, functools.partial(ThinkfuseRMSNorm, backend=backend), False, missing)
        for name, backend, missing in harness.thinkfuse_impls(config)
    ]
    hf = functools.partial(_hf_module, variant=variant)
    impls.append((HF_EAGER, hf, False, None))
    impls.append((TORCH_COMPILE, hf, True, None))
    liger_class, missing = harness.liger_attr(config, *LIGER_CLASSES[variant])
    impls.append((LIGER, functools.partial(_liger_module, liger_class), False, missing))
    return impls


# ---------------------------------------------------------------------------------------------
# Inputs


def _build(make_module, compiled: bool, tokens: int, hidden: int, variant: str, mode: str,
           config: Config) -> Workload:
    device, dtype = config.device, config.dtype
    needs_grad = mode == FWD_BWD
    module = make_module(hidden).to(device=device, dtype=dtype)
    with torch.no_grad():  # a non-trivial weight, identical for every implementation
        module.weight.copy_(1.0 + 0.1 * torch.randn(hidden, device=device, dtype=dtype))
    module.weight.requires_grad_(needs_grad)
    if compiled:
        module = harness.compile_module(module, config)

    def activation():
        return torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=needs_grad)

    args = (activation(),) if variant == NORM else (activation(), activation())
    workload = Workload(forward=lambda: module(*args))
    if needs_grad:
        workload.inputs = (*args, module.weight)
        n_outputs = 1 if variant == NORM else 2  # dy, and dh for add+norm
        workload.grad_outputs = tuple(
            torch.randn(tokens, hidden, device=device, dtype=dtype) for _ in range(n_outputs)
        )
    return workload
