"""SwiGLU cases: ``thinkfuse.ops.swiglu`` and ``swiglu_fused`` against the transformers MLP's
``act_fn(gate) * up`` (eager and torch.compile) and Liger-Kernel's ``LigerSiLUMulFunction``.

One variant, ``silu*up``, T tokens x intermediate size I (each distinct ``intermediate_size`` of
the model presets):
- ``thinkfuse-<backend>``: ``swiglu(gate, up)``, gate and up separate ``[T, I]`` tensors (the
  outputs of ``gate_proj`` and ``up_proj``).
- ``thinkfuse-<backend>-fused``: ``swiglu_fused(gate_up)`` on one ``[T, 2I]`` tensor (the output
  of a merged gate/up projection), read in place; its backward writes one ``[T, 2I]`` gradient.
- ``hf-eager``: ``ACT2FN["silu"](gate) * up``, as ``Qwen2MLP``/``Ministral3MLP`` compute it.
- ``torch-compile``: ``torch.compile`` of that module.
- ``liger``: ``LigerSiLUMulFunction.apply(gate, up)``. Its backward writes dgate and dup into
  gate's and up's storage, so the inputs change between timed repetitions; the cost of these
  elementwise kernels does not depend on the values.

In fwd+bwd rows the output gets a gradient ``dy`` and gradients are taken for gate and up (or
gate_up).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

import thinkfuse
from bench import harness
from bench.harness import FWD_BWD, HF_EAGER, LIGER, TORCH_COMPILE, Case, Config, Workload

OP = "swiglu"
VARIANT = "silu*up"
FUSED_SUFFIX = "-fused"
TOKENS = (4096, 16384)
SMOKE_TOKENS = 8
SMOKE_INTERMEDIATE = (64, 1000)  # 1000: not a power of two, exercises the masked tail
SMOKE_MODEL = "tiny"

# Where LigerSiLUMulFunction lives, newest layout last.
LIGER_LOCATIONS = (("liger_kernel.ops.swiglu", "LigerSiLUMulFunction"), ("liger_kernel.ops", "LigerSiLUMulFunction"))

BYTES_COUNTED = (
    "minimal DRAM traffic, T tokens x I intermediate, all tensors in the run's dtype. "
    "fwd: read gate, up; write y (3*T*I elements). fwd+bwd adds the backward: read dy, gate, up; "
    "write dgate, dup (5*T*I), 8*T*I in all. The fused layout moves the same bytes (gate_up is "
    "[T, 2I], dgate_up [T, 2I]). Not counted: anything an implementation saves for the backward "
    "beyond gate and up (HF eager's autograd keeps silu(gate), T*I more)."
)


def cases(config: Config) -> list[Case]:
    out = []
    for tokens, intermediate, model in _shapes(config):
        for mode in config.modes:
            for impl, make_module, fused, compiled, missing in _implementations(config):
                build = functools.partial(_build, make_module, fused, compiled, tokens, intermediate, mode, config)
                out.append(Case(
                    op=OP, impl=impl, variant=VARIANT, mode=mode,
                    shape={"tokens": tokens, "intermediate": intermediate}, model=model,
                    dtype=config.dtype, bytes_moved=bytes_moved(tokens, intermediate, mode, config.dtype),
                    build=None if missing else build, missing=missing,
                ))
    return out


def bytes_moved(tokens: int, intermediate: int, mode: str, dtype: torch.dtype) -> int:
    """Bytes of the op's minimal reads + writes (see BYTES_COUNTED)."""
    element = torch.empty((), dtype=dtype).element_size()
    streams = 3 + (5 if mode == FWD_BWD else 0)
    return streams * tokens * intermediate * element


def _shapes(config: Config) -> list[tuple[int, int, str]]:
    """(tokens, intermediate, model names) for every case shape."""
    if config.smoke:
        return [(SMOKE_TOKENS, intermediate, SMOKE_MODEL) for intermediate in SMOKE_INTERMEDIATE]
    sizes = harness.presets_by(config.presets, "intermediate_size")
    return [(tokens, intermediate, models) for tokens in TOKENS for intermediate, models in sizes.items()]


# ---------------------------------------------------------------------------------------------
# Implementations: modules whose forward takes (gate, up), or (gate_up) when fused, and
# returns y.


class ThinkfuseSwiGLU(nn.Module):
    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend

    def forward(self, gate, up):
        return thinkfuse.ops.swiglu(gate, up, backend=self.backend)


class ThinkfuseSwiGLUFused(nn.Module):
    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend

    def forward(self, gate_up):
        return thinkfuse.ops.swiglu_fused(gate_up, backend=self.backend)


class HFSwiGLU(nn.Module):
    """The elementwise part of transformers' Qwen2MLP / Ministral3MLP."""

    def __init__(self):
        super().__init__()
        from transformers.activations import ACT2FN

        self.act_fn = ACT2FN["silu"]

    def forward(self, gate, up):
        return self.act_fn(gate) * up


class LigerSwiGLU(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, gate, up):
        return self.function.apply(gate, up)


def _liger_function(config: Config):
    missing = None
    for module, attr in LIGER_LOCATIONS:
        function, missing = harness.liger_attr(config, module, attr)
        if function is not None:
            return function, missing
    return None, missing


def _implementations(config: Config):
    """(implementation name, module factory, fused input?, compile it?, why missing) in table order."""
    thinkfuse_impls = harness.thinkfuse_impls(config)
    impls = [
        (name, functools.partial(ThinkfuseSwiGLU, backend), False, False, missing)
        for name, backend, missing in thinkfuse_impls
    ]
    impls += [
        (name + FUSED_SUFFIX, functools.partial(ThinkfuseSwiGLUFused, backend), True, False, missing)
        for name, backend, missing in thinkfuse_impls
    ]
    impls.append((HF_EAGER, HFSwiGLU, False, False, None))
    impls.append((TORCH_COMPILE, HFSwiGLU, False, True, None))
    liger_function, missing = _liger_function(config)
    impls.append((LIGER, functools.partial(LigerSwiGLU, liger_function), False, False, missing))
    return impls


# ---------------------------------------------------------------------------------------------
# Inputs


def _build(make_module, fused: bool, compiled: bool, tokens: int, intermediate: int, mode: str,
           config: Config) -> Workload:
    device, dtype = config.device, config.dtype
    needs_grad = mode == FWD_BWD
    module = make_module().to(device)
    if compiled:
        module = harness.compile_module(module, config)

    def activation(width):
        return torch.randn(tokens, width, device=device, dtype=dtype, requires_grad=needs_grad)

    args = (activation(2 * intermediate),) if fused else (activation(intermediate), activation(intermediate))
    workload = Workload(forward=lambda: module(*args))
    if needs_grad:
        workload.inputs = args
        workload.grad_outputs = (torch.randn(tokens, intermediate, device=device, dtype=dtype),)
    return workload
