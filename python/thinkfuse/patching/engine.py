"""patch_model / unpatch_model: bind replacement forwards per instance, and undo it.

A patched module carries ``_thinkfuse_patch`` (a plain attribute, so it is not in the
state_dict and it survives deepcopy) that remembers the forward to restore.
"""

from __future__ import annotations

import copy
import functools
import inspect
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from ..backend import backend_for_op, default_backend, get_backend, require_backend
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
    # The forward the replacement took the place of: an instance-level one (e.g. accelerate's
    # _old_forward, the real forward inside its hook), None when the class's forward was in use,
    # _UNSET when no forward was replaced.
    original_forward: object = _UNSET
    # The replacement bound onto the module (found again by identity when restoring).
    patched_forward: object = None
    # The config's attention implementation before the attention rule switched it (_UNSET: not
    # switched). Several modules share one config; each remembers the same original value.
    original_attn_implementation: object = _UNSET

    @property
    def kind(self) -> str:  # the first kind (older readers of the state)
        return self.kinds[0] if self.kinds else ""


# The extension op whose availability decides each kind's backend (backend_for_op); the loss
# runs the fused lm_head log-probs.
_KIND_CUDA_OPS = {"rms_norm": "rms_norm_fwd", "swiglu": "swiglu_fwd", "rope": "rope_fwd", "loss": "token_logprobs_fwd"}


@dataclass
class PatchReport:
    """What patch_model did: modules patched per kind, and the backend each kind runs on
    (``backend_of``, printed on each kind's line)."""

    model: str
    family: str
    backend: str  # the backend named in patch_model, or "auto"
    device: str
    resolved_backend: str  # what the ops pick for this model's device
    patched: dict[str, int] = field(default_factory=dict)  # kind -> module count
    disabled: tuple[str, ...] = ()  # kinds turned off by the caller
    # the attention core's backend, when it is not backend_for_op's (the Hopper forward)
    attention_backend: str | None = None

    @property
    def total(self) -> int:
        return sum(self.patched.values())

    @property
    def attention(self) -> str:
        """Which attention core the patched text model runs: "thinkfuse:<backend>" when the
        attention rule applied, else "transformers" (its configured implementation)."""
        if not self.patched.get("attention"):
            return "transformers"
        backend = self.attention_backend or backend_for_op(self.resolved_backend, "flash_attention_fwd")
        return f"{ATTN_IMPLEMENTATION}:{backend}"

    def backend_of(self, kind: str) -> str | None:
        """The backend the kernels of ``kind`` run on (a model-wide "cuda" runs an op whose CUDA
        kernel is pending validation on triton, backend.backend_for_op); None for a kind that
        runs no kernel of its own (positions)."""
        if kind == "attention":
            return self.attention.removeprefix(f"{ATTN_IMPLEMENTATION}:") if self.patched.get(kind) else None
        op = _KIND_CUDA_OPS.get(kind)
        return None if op is None else backend_for_op(self.resolved_backend, op)

    def __str__(self) -> str:
        lines = [
            f"thinkfuse patch of {self.model} (family {self.family}) on {self.device}: "
            f"backend {self.backend} -> {self.resolved_backend}"
        ]
        for kind in KINDS:
            if kind in self.patched:
                backend = self.backend_of(kind)
                lines.append(f"  {kind:<10} {self.patched[kind]:>4} modules" + (f" on {backend}" if backend else ""))
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


class BoundForward:
    """A replacement forward bound to one module, with the backend patch_model named.

    It does what ``types.MethodType(functools.partial(function, backend=...), module)`` would,
    but survives ``torch.save(model)``: a bound method pickles as "look the function's name up
    on the module", which finds the class's forward (or nothing) when loading, whereas this
    pickles the function by its import path and the module by reference."""

    __slots__ = ("function", "module", "backend")

    def __init__(self, function, module: nn.Module, backend: str | None):
        self.function = function
        self.module = module
        self.backend = backend

    def __call__(self, *args, **kwargs):
        if self.backend is not None:
            kwargs["backend"] = self.backend
        return self.function(self.module, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        # What callers inspecting ``module.forward`` (generation, Trainer's column filter)
        # expect from a bound method: the function's parameters without ``self``.
        signature = inspect.signature(self.function)
        return signature.replace(parameters=list(signature.parameters.values())[1:])

    @property
    def __self__(self) -> nn.Module:  # as on a bound method
        return self.module

    @property
    def __func__(self):
        # What rebinding code gets (accelerate's autocast wrapper does
        # MethodType(autocast(forward.__func__), module)): the function with the backend bound,
        # so that a rebound forward still runs on the backend patch_model was given.
        if self.backend is None:
            return self.function
        return functools.partial(self.function, backend=self.backend)

    @property
    def __name__(self) -> str:
        return self.function.__name__

    @property
    def __doc__(self) -> str | None:
        return self.function.__doc__

    def __repr__(self) -> str:
        return f"<thinkfuse forward {self.function.__qualname__} of {type(self.module).__name__}>"


# accelerate (device_map="auto", CPU/disk offload) wraps a module's forward in a hook: the
# instance attribute `forward` is the hook, which moves weights and inputs to the execution
# device and then calls `_old_forward`, the real forward. A replacement goes in the real forward's
# place, inside the hook.
_FORWARD_SLOTS = ("forward", "_old_forward")


def _forward_slot(module: nn.Module) -> str:
    hooked = getattr(module, "_hf_hook", None) is not None and "_old_forward" in module.__dict__
    return "_old_forward" if hooked else "forward"


def _replace_forward(module: nn.Module, state: PatchState, forward, backend: str | None) -> None:
    slot = _forward_slot(module)
    state.original_forward = module.__dict__.get(slot)
    state.patched_forward = BoundForward(forward, module, backend)
    setattr(module, slot, state.patched_forward)


def _restore_forward(module: nn.Module, state: PatchState) -> None:
    """Put the original forward back where the replacement is now: ``forward``, or
    ``_old_forward`` (also when an accelerate hook was added after patching, which moved the
    replacement there). A replacement someone else has since replaced is left alone."""
    for slot in _FORWARD_SLOTS:
        if module.__dict__.get(slot) is not state.patched_forward:
            continue
        if state.original_forward is not None:
            setattr(module, slot, state.original_forward)
        elif slot == "forward":
            del module.__dict__["forward"]  # the class's forward again
        else:  # the hook still calls _old_forward: make it the class's forward
            module._old_forward = types.MethodType(type(module).forward, module)
        return


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


_SHARED_CONFIG_ATTR = "_config_before_thinkfuse"  # not _CACHE_PREFIX: _restore deletes those


def _own_configs(model: nn.Module) -> None:
    """Give ``model`` its own copies of the config objects its modules hold, so that the
    attention rule's switch (a config attribute) stays on this instance even when other models
    were built from the same config object. Sub-config links (a VLM's text_config) point to the
    copies too. Each module remembers the object it held, its copy and the copy's attributes
    as they were made (``_SHARED_CONFIG_ATTR``) for unpatch_model. Copies an earlier call made
    (on the base model alone, say) are reused: a module holding their original gets the same
    copy, so the model keeps one config."""
    from transformers import PretrainedConfig

    holders = [m for m in model.modules() if isinstance(m.__dict__.get("config"), PretrainedConfig)]
    entries = {id(entry[0]): entry for entry in
               (m.__dict__[_SHARED_CONFIG_ATTR] for m in holders if _SHARED_CONFIG_ATTR in m.__dict__)}
    owned = {id(entry[1]) for entry in entries.values()}
    unowned = [m for m in holders
               if _SHARED_CONFIG_ATTR not in m.__dict__ and id(m.__dict__["config"]) not in owned]
    fresh = {}
    for module in unowned:
        config = module.__dict__["config"]
        if id(config) not in entries:
            fresh[id(config)] = (config, copy.copy(config))
    copies = {key: entry[1] for key, entry in {**entries, **fresh}.items()}
    for _, duplicate in fresh.values():
        for name, value in vars(duplicate).items():  # sub-configs of a copy: the copies of those
            if id(value) in copies and isinstance(value, PretrainedConfig):
                setattr(duplicate, name, copies[id(value)])
    for key, (original, duplicate) in fresh.items():
        # what the copy holds now: at unpatch, only what was changed on it since goes back
        entries[key] = (original, duplicate, dict(vars(duplicate)))
    for module in unowned:
        entry = entries[id(module.__dict__["config"])]
        module.__dict__[_SHARED_CONFIG_ATTR] = entry
        module.__dict__["config"] = entry[1]


def _restore_configs(model: nn.Module) -> None:
    """Hand every module its original config object back, carrying over what was changed on
    the copy while patched (``resize_token_embeddings`` sets vocab_size, a user turns use_cache
    off...): without the patch those edits would have gone to the original, so that is where
    they belong. Only those: the original may be shared with other models, whose edits made
    to it meanwhile stay. The attention switch was undone on the copies before (``_restore``).
    A module whose config was replaced while patched keeps the replacement."""
    from transformers import PretrainedConfig

    entries = [module.__dict__.pop(_SHARED_CONFIG_ATTR) for module in model.modules()
               if _SHARED_CONFIG_ATTR in module.__dict__]
    originals = {id(entry[1]): entry[0] for entry in entries}
    for original, duplicate, *made in {id(entry[1]): entry for entry in entries}.values():
        made = made[0] if made else {}  # (entries of older versions hold no snapshot: carry all)
        for name, value in vars(duplicate).items():
            if name not in made or made[name] is not value:
                if isinstance(value, PretrainedConfig):
                    value = originals.get(id(value), value)
                vars(original)[name] = value
        for name in made.keys() - vars(duplicate).keys():  # deleted on the copy
            vars(original).pop(name, None)
    for module in model.modules():
        current = module.__dict__.get("config")
        if current is not None and id(current) in originals:
            module.__dict__["config"] = originals[id(current)]


def _apply(module: nn.Module, rule, backend: str | None, originals: dict, root: nn.Module) -> None:
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
    if rule.setup is not None:
        rule.setup(module, root)
    if rule.forward is not None:
        _replace_forward(module, state, rule.forward, backend)
    if rule.kind == "attention":
        _select_thinkfuse_attention(module, state, originals)
    state.kinds += (rule.kind,)


def _restore(module: nn.Module, state: PatchState) -> None:
    for cache in [k for k in module.__dict__ if k.startswith(_CACHE_PREFIX)]:
        del module.__dict__[cache]
    if state.original_forward is not _UNSET:
        _restore_forward(module, state)
    if state.original_attn_implementation is not _UNSET:
        _undo_attention_switch(module.config, state.original_attn_implementation)


def _undo_attention_switch(config, original) -> None:
    """Put the implementation from before patching back, unless one was chosen while patched
    (set_attn_implementation): that replaced the switch, and stays (as a forward someone
    replaced after patching does)."""
    if getattr(config, "_attn_implementation_internal", None) == ATTN_IMPLEMENTATION:
        config._attn_implementation_internal = original


def _check_dtype(model: nn.Module) -> None:
    """The kernels take float32, float16 and bfloat16: a float64 model would fail in every
    forward, so it is refused here, where the message can say what to do."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if torch.float64 in dtypes:
        raise ValueError("patch_model: thinkfuse's ops take float32, float16 and bfloat16 parameters; this model "
                         "has float64 ones (cast it, e.g. model.float(), before patching)")


def _backend_to_patch_with(model: nn.Module, backend: str | None) -> str | None:
    """``backend``, or without one the backend an earlier patch_model named for ``model`` (None:
    none named, or unpatched). Naming another one than the earlier call raises here, before
    any module is touched (found module by module, it would leave the model half patched)."""
    earlier = {state.backend for module in model.modules()
               if (state := module.__dict__.get(_STATE_ATTR)) is not None}
    if not earlier:
        return backend
    if backend is None and len(earlier) == 1:
        return earlier.pop()
    if earlier != {backend}:
        named = ", ".join(repr(name) for name in sorted(earlier, key=str))
        raise ValueError(
            f"{type(model).__name__} is already patched with backend {named}; "
            f"call thinkfuse.unpatch_model(model) before patching with {backend!r}"
        )
    return backend


def _model_device(model: nn.Module) -> torch.device:
    """Where the model computes: its first tensor not on the meta device, else (weights
    offloaded by accelerate) the execution device of its first hook, else the CPU."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    for module in model.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
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
    restores the original forwards. Calling it again is a no-op (without a backend it keeps the
    first call's; naming another one raises ValueError: unpatch first). Raises UnsupportedModel
    for model classes without a rule table, ValueError for float64 models (the ops take
    float32, float16 and bfloat16). Models dispatched or offloaded by accelerate are patched
    inside its hooks. The attention rule gives the model its own copies of its config objects
    (the switch to "thinkfuse" is a config attribute), so models built from the same config
    object are not switched too; unpatch_model puts the original objects back.

    ``attention=True`` makes the text decoder's causal self-attention run thinkfuse's flash /
    decode attention (the "thinkfuse" transformers attention implementation, selected on this
    instance's text config; vision towers keep theirs); ``attention=False`` keeps the model's
    configured implementation (sdpa, flash_attention_2, ...) behind the fused rope. With it goes
    the "positions" rule on the decoder base model: a forward given no position_ids skips the
    search for packed sequences in the positions it makes itself (a host sync per forward).

    ``loss=True`` makes a ``*ForCausalLM``'s training forward with ``labels`` compute the loss
    from the hidden states (``ops.causal_lm_loss``: the logits are never held) and return
    ``logits=None``; evaluation and inference keep their logits. Where a forward was set on the
    instance before patching (TRL's ``fused_lm_head`` wrapper, accelerate's autocast), that
    forward runs instead, so its behaviour is kept.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    family = find_family(model)
    backend = _backend_to_patch_with(model, backend)  # none named: an earlier call's
    if backend is not None:
        require_backend(backend)
    _check_dtype(model)
    flags = {"rms_norm": rms_norm, "swiglu": swiglu, "rope": rope, "attention": attention, "loss": loss}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"patch_model: {name} must be a bool, got {type(value).__name__}")
    flags["positions"] = attention  # the base model's half of the attention rule (no flag of its own)
    rules = [(rule, resolve_class(rule.module_class)) for rule in family.rules if flags[rule.kind]]
    if attention:
        register_attention()  # idempotent; the attention rule selects it by name
        _own_configs(model)

    originals: dict[int, object] = {}
    root = family.root(model)
    for module in root.modules():
        for rule, cls in rules:
            if cls is None or type(module) is not cls or (rule.when and not rule.when(module)):
                continue
            _apply(module, rule, backend, originals, root)

    # What the model runs now, earlier calls' patches included (a kind turned off in a later
    # call stays patched until unpatch_model).
    counts = _patched_kinds(root)
    # the PatchReport's attention backend is read off this module
    first_attention = next((m for m in root.modules() if "attention" in _kinds_of(m)), None)
    device = _model_device(model)
    return PatchReport(
        model=type(model).__name__,
        family=family.name,
        backend=backend or "auto",
        device=str(device),
        # what the ops pick now: a named backend, else set_backend / THINKFUSE_BACKEND, else the fastest
        resolved_backend=backend or get_backend() or default_backend(device),
        patched={k: counts[k] for k in KINDS if k in counts},
        disabled=tuple(k for k in KINDS if not flags[k]),
        attention_backend=_hopper_attention(first_attention, device, backend) if first_attention else None,
    )


def _kinds_of(module: nn.Module) -> tuple[str, ...]:
    state = module.__dict__.get(_STATE_ATTR)
    return state.kinds if state is not None else ()


def _patched_kinds(root: nn.Module) -> dict[str, int]:
    """How many modules under ``root`` carry each kind of patch."""
    counts: dict[str, int] = {}
    for module in root.modules():
        for kind in _kinds_of(module):
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def _hopper_attention(attention: nn.Module, device: torch.device, backend: str | None) -> str | None:
    """HOPPER_FORWARD when the patched ``attention`` module (one of the model's, all alike) will
    run the Hopper forward (automatic or "cuda" choice, an sm90 GPU, a dtype and head dim it
    takes), else None. The head dim and dtype are the module's own: its ``head_dim`` and the
    dtype of its projections."""
    from ..ops.attention import HOPPER_FORWARD, hopper_attention_applies

    # the backend the ops see: patch_model's, else set_backend / THINKFUSE_BACKEND's
    if (backend or get_backend()) not in (None, "cuda") or device.type != "cuda":
        return None
    head_dim = getattr(attention, "head_dim", None)
    dtype = next((p.dtype for p in attention.parameters() if p.is_floating_point()), None)
    if head_dim is None or dtype is None:
        return None
    return HOPPER_FORWARD if hopper_attention_applies(device, dtype, int(head_dim)) else None


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
    _restore_configs(model)
    return restored
