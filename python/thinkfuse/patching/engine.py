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

from ..backend import backend_for_op, default_backend, require_backend
from ..attention_interface import ATTN_IMPLEMENTATION, register_attention
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


class _Unset:
    """Marker: "this module has no replaced forward / no attention switch to undo". Survives
    deepcopy and pickling as the same object (patched models may be deep-copied)."""

    def __reduce__(self):
        return "_UNSET"

    def __repr__(self):
        return "_UNSET"


_UNSET = _Unset()


@dataclass
class PatchState:
    backend: str | None
    kinds: tuple[str, ...] = ()  # the rule kinds applied to this module, in order
    # The instance-level forward that was there before (e.g. an accelerate hook), None when the
    # class's forward was in use, _UNSET when no forward was replaced.
    original_forward: object = _UNSET
    # The config's attention implementation before the attention rule switched it (_UNSET: not
    # switched). Several modules share one config; each remembers the same original value.
    original_attn_implementation: object = _UNSET

    @property
    def kind(self) -> str:  # the first kind (older readers of the state)
        return self.kinds[0] if self.kinds else ""


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

    @property
    def attention(self) -> str:
        """Which attention core the patched text model runs: "thinkfuse:<backend>" when the
        attention rule applied, else "transformers" (its configured implementation)."""
        if not self.patched.get("attention"):
            return "transformers"
        return f"{ATTN_IMPLEMENTATION}:{backend_for_op(self.resolved_backend, 'flash_attention_fwd')}"

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


def _replace_forward(module: nn.Module, state: PatchState, forward, backend: str | None) -> None:
    state.original_forward = module.__dict__.get("forward")
    module.forward = _bind(forward, module, backend)


def _select_thinkfuse_attention(module: nn.Module, state: PatchState, originals: dict) -> None:
    """Point the module's config at the "thinkfuse" attention implementation. The config object
    belongs to this model instance (the decoder's modules and its mask builder share it; a
    VLM's vision tower has its own), so this is per instance, and only for the text model.
    ``originals`` (config id -> value before this patch_model call) gives every module sharing
    the config the value from before the first switch."""
    config = module.config
    current = getattr(config, "_attn_implementation_internal", None)
    state.original_attn_implementation = originals.setdefault(id(config), current)
    config._attn_implementation_internal = ATTN_IMPLEMENTATION


def _apply(module: nn.Module, rule, backend: str | None, originals: dict) -> None:
    state = getattr(module, _STATE_ATTR, None)
    if state is None:
        state = PatchState(backend)
        setattr(module, _STATE_ATTR, state)
    elif state.backend != backend:
        raise ValueError(
            f"{type(module).__name__} is already patched with backend {state.backend!r}; "
            f"call thinkfuse.unpatch_model(model) before patching with {backend!r}"
        )
    if rule.kind in state.kinds:  # patching twice is a no-op
        return
    if rule.forward is not None:
        _replace_forward(module, state, rule.forward, backend)
    if rule.kind == "attention":
        _select_thinkfuse_attention(module, state, originals)
    state.kinds += (rule.kind,)


def _restore(module: nn.Module, state: PatchState) -> None:
    for cache in [k for k in module.__dict__ if k.startswith(_CACHE_PREFIX)]:
        del module.__dict__[cache]
    if state.original_forward is None:
        del module.forward
    elif state.original_forward is not _UNSET:
        module.forward = state.original_forward
    if state.original_attn_implementation is not _UNSET:
        module.config._attn_implementation_internal = state.original_attn_implementation


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
    loss: bool = True,
) -> PatchReport:
    """Patch ``model`` in place, per instance, with thinkfuse's fused ops.

    Parameters, parameter names, state_dict and classes stay as they are; ``unpatch_model``
    restores the original forwards. Calling it again is a no-op (to change the backend,
    unpatch first). Raises UnsupportedModel for model classes without a rule table.

    ``attention=True`` makes the text decoder's causal self-attention run thinkfuse's flash /
    decode attention (the "thinkfuse" transformers attention implementation, selected on this
    instance's text config; vision towers keep theirs); ``attention=False`` keeps the model's
    configured implementation (sdpa, flash_attention_2, ...) behind the fused rope.

    ``loss=True`` makes a ``*ForCausalLM``'s training forward with ``labels`` compute the loss
    from the hidden states (``ops.causal_lm_loss``: the logits are never held) and return
    ``logits=None``; evaluation and inference keep their logits.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    family = find_family(model)
    if backend is not None:
        require_backend(backend)
    flags = {"rms_norm": rms_norm, "swiglu": swiglu, "rope": rope, "attention": attention, "loss": loss}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"patch_model: {name} must be a bool, got {type(value).__name__}")
    rules = [(rule, resolve_class(rule.module_class)) for rule in family.rules if flags[rule.kind]]
    if attention:
        register_attention()  # idempotent; the attention rule selects it by name

    counts: dict[str, int] = {}
    originals: dict[int, object] = {}
    for module in family.root(model).modules():
        for rule, cls in rules:
            if cls is None or type(module) is not cls or (rule.when and not rule.when(module)):
                continue
            _apply(module, rule, backend, originals)
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
    """Restore every forward (and attention implementation) patch_model replaced in ``model``;
    returns how many patches it undid (``PatchReport.total`` of the patch)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    restored = 0
    for module in model.modules():
        state = module.__dict__.pop(_STATE_ATTR, None)
        if state is not None:
            _restore(module, state)
            restored += len(state.kinds)
    return restored
