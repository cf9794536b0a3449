"""patch_model / unpatch_model: bind replacement forwards per instance, and undo it.

A patched module carries ``_thinkfuse_patch`` (a plain attribute, so it is not in the
state_dict and it survives deepcopy) that remembers the forward to restore.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from ..backend import default_backend, require_backend
from . import ministral3, mistral, qwen2
from . import mimo
from .rules import KINDS, ModelFamily, resolve_class, short_name

FAMILIES: tuple[ModelFamily, ...] = (
    qwen2.FAMILY,
    mimo.FAMILY,
    ministral3.FAMILY,
    ministral3.VLM_FAMILY,
    mistral.FAMILY,
)

_STATE_ATTR = "_thinkfuse_patch"
_CACHE_PREFIX = "_thinkfuse_"  # replacement forwards may cache derived values under this prefix


class UnsupportedModel(TypeError):
    """patch_model was given a model class that has no rule table."""


@dataclass
class PatchState:
    kind: str
    backend: str | None
    # The instance-level forward that was there before (e.g. an accelerate hook), or None when
    # the class's forward was in use.
    original_forward: object = None


@dataclass
class PatchReport:
    """What patch_model did: modules patched per kind, and the backend they run on."""

    model: str
    family: str
    backend: str  # the backend named in patch_model, or "auto"
    device: str
    resolved_backend: str  # what the ops pick for this model's device
    patched: dict[str, int] = field(default_factory=dict)  # kind -> module count
    disabled: tuple[str, ...] = ()  # kinds turned off by the caller

    @property
    def total(self) -> int:
        return sum(self.patched.values())

    def __str__(self) -> str:
        lines = [
            f"thinkfuse patch of {self.model} (family {self.family}) on {self.device}: "
            f"backend {self.backend} -> {self.resolved_backend}"
        ]
        for kind in KINDS:
            if kind in self.patched:
                lines.append(f"  {kind:<10} {self.patched[kind]:>4} modules")
            elif kind in self.disabled:
                lines.append(f"  {kind:<10}  off")
        return "\n".join(lines)


def supported_models() -> list[str]:
    return [short_name(c) for family in FAMILIES for c in family.model_classes]


def find_family(model: nn.Module) -> ModelFamily:
    for family in FAMILIES:
        if any(type(model) is resolve_class(c) for c in family.model_classes):
            return family
    raise UnsupportedModel(
        f"thinkfuse cannot patch {type(model).__name__}; supported: {', '.join(supported_models())}"
    )


def _bind(forward, module: nn.Module, backend: str | None):
    fn = forward if backend is None else functools.partial(forward, backend=backend)
    return types.MethodType(fn, module)


def _patch_module(module: nn.Module, kind: str, forward, backend: str | None) -> None:
    previous = module.__dict__.get("forward")
    module.forward = _bind(forward, module, backend)
    setattr(module, _STATE_ATTR, PatchState(kind, backend, previous))


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def patch_model(
    model: nn.Module,
    *,
    backend: str | None = None,
    rms_norm: bool = True,
    swiglu: bool = True,
    rope: bool = True,
    attention: bool = True,
) -> PatchReport:
    """Patch ``model`` in place, per instance, with thinkfuse's fused ops.

    Parameters, parameter names, state_dict and classes stay as they are; ``unpatch_model``
    restores the original forwards. Calling it again is a no-op (to change the backend,
    unpatch first). Raises UnsupportedModel for model classes without a rule table.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    family = find_family(model)
    if backend is not None:
        require_backend(backend)
    flags = {"rms_norm": rms_norm, "swiglu": swiglu, "rope": rope, "attention": attention}
    rules = [(rule, resolve_class(rule.module_class)) for rule in family.rules if flags[rule.kind]]

    counts: dict[str, int] = {}
    for module in family.root(model).modules():
        for rule, cls in rules:
            if cls is None or type(module) is not cls or (rule.when and not rule.when(module)):
                continue
            state = getattr(module, _STATE_ATTR, None)
            if state is None:
                _patch_module(module, rule.kind, rule.forward, backend)
            elif state.backend != backend:
                raise ValueError(
                    f"{type(module).__name__} is already patched with backend {state.backend!r}; "
                    f"call thinkfuse.unpatch_model(model) before patching with {backend!r}"
                )
            counts[rule.kind] = counts.get(rule.kind, 0) + 1

    device = _model_device(model)
    return PatchReport(
        model=type(model).__name__,
        family=family.name,
        backend=backend or "auto",
        device=str(device),
        resolved_backend=backend or default_backend(device),
        patched={k: counts[k] for k in KINDS if k in counts},
        disabled=tuple(k for k in KINDS if not flags[k]),
    )


def unpatch_model(model: nn.Module) -> int:
    """Restore every forward patch_model replaced in ``model``; returns how many."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    restored = 0
    for module in model.modules():
        state = module.__dict__.pop(_STATE_ATTR, None)
        if state is None:
            continue
        for cache in [k for k in module.__dict__ if k.startswith(_CACHE_PREFIX)]:
            del module.__dict__[cache]
        if state.original_forward is None:
            del module.forward
        else:
            module.forward = state.original_forward
        restored += 1
    return restored
