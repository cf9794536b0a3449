"""Which backends exist in this process, and which one an op call uses.

Three backends implement every op: ``cuda`` (the compiled extension ``thinkfuse._C``),
``triton`` (the kernels in ``thinkfuse.kernels``) and ``torch`` (``thinkfuse.reference``).
Selection, strongest first: the ``backend=`` argument of an op, ``use_backend`` (a context
manager), ``set_backend``, the ``THINKFUSE_BACKEND`` environment variable, and finally the
fastest backend for the tensors' device. An op given a backend by name never silently runs
on another one. ``patch_model(model, backend="cuda")`` is a model-wide request for the fastest
validated kernels: ops whose CUDA kernel is missing or still pending validation run on triton
there (``backend_for_op``), and ``PatchReport.attention`` says which one attention runs on.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os

import torch

BACKENDS = ("cuda", "triton", "torch")  # fastest first


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run in this process."""


@functools.lru_cache(maxsize=None)
def _cuda_extension_error() -> str | None:
    """Why ``thinkfuse._C`` cannot be used, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch (torch.cuda.is_available() is False)"
    try:
        importlib.import_module("thinkfuse._C")
    except ImportError as exc:
        return (
            f"the CUDA extension thinkfuse._C is not built ({exc}); build it with "
            "`pip install --no-build-isolation .` on a machine with CUDA torch and nvcc"
        )
    return None


# How Triton reads TRITON_INTERPRET (triton.knobs.runtime.interpret, libtriton's getenv_bool):
# on for these values, any case; off for anything else ("0", "false", "off", "no", ""...).
_TRITON_TRUE_VALUES = ("1", "y", "yes", "on", "true")


def triton_interpreter_enabled() -> bool:
    """Whether Triton runs its kernels in the interpreter, read as Triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRITON_TRUE_VALUES


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return f"triton is not installed ({exc}); `pip install triton`"
    return None


def _triton_error() -> str | None:
    missing = _triton_import_error()
    if missing:
        return missing
    if not torch.cuda.is_available() and not triton_interpreter_enabled():
        return "no CUDA device is visible and TRITON_INTERPRET=1 is not set"
    return None


def why_unavailable(name: str) -> str | None:
    """The reason backend ``name`` cannot run here, or None if it can."""
    _check_name(name)
    if name == "cuda":
        return _cuda_extension_error()
    if name == "triton":
        return _triton_error()
    return None


def available_backends() -> list[str]:
    """Backends usable in this process, fastest first."""
    return [name for name in BACKENDS if why_unavailable(name) is None]


def _check_name(name) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def require_backend(name: str) -> str:
    reason = why_unavailable(name)
    if reason is not None:
        raise BackendUnavailable(f"thinkfuse backend {name!r} is unavailable: {reason}")
    return name


# Outside any use_backend block the context holds _NO_CONTEXT (set_backend and the environment
# decide); inside use_backend(None) it holds None, "automatic", which overrides them as any
# use_backend does. A ContextVar keeps use_backend() correct across threads and tasks.
_NO_CONTEXT = object()
_CONTEXT_BACKEND: contextvars.ContextVar[object] = contextvars.ContextVar(
    "thinkfuse_backend", default=_NO_CONTEXT
)
_GLOBAL_BACKEND: str | None = None


def set_backend(name: str | None) -> None:
    """Set the process-wide backend; ``None`` restores automatic selection."""
    global _GLOBAL_BACKEND
    _GLOBAL_BACKEND = None if name is None else require_backend(name)


def get_backend() -> str | None:
    """The backend chosen by name (context, set_backend, environment), or None for automatic."""
    name = _CONTEXT_BACKEND.get()
    if name is not _NO_CONTEXT:
        return name
    name = _GLOBAL_BACKEND
    if name is None:
        name = os.environ.get("THINKFUSE_BACKEND") or None
        if name is not None and name not in BACKENDS:
            raise ValueError(f"THINKFUSE_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Context manager: ops called inside use backend ``name`` (None: automatic)."""
    if name is not None:
        require_backend(name)
    token = _CONTEXT_BACKEND.set(name)
    try:
        yield name
    finally:
        _CONTEXT_BACKEND.reset(token)


@functools.lru_cache(maxsize=None)
def cuda_has_op(op: str) -> bool:
    """Whether the built extension has a kernel named ``op`` (ops land in it one by one)."""
    if _cuda_extension_error() is not None:
        return False
    importlib.import_module("thinkfuse._C")  # registers its ops
    return hasattr(torch.ops.thinkfuse_C, op)


#: Extension kernels that are built but have not yet passed the GPU test suite and been
#: measured against their Triton counterparts. Automatic selection and patch_model's
#: backend="cuda" keep these ops on triton; an explicit ``backend="cuda"`` on the op still runs
#: the kernel (that is how the GPU tests exercise it). Remove an entry once a GPU run has
#: validated the kernel and shown it is the faster one (bench/results).
#: 2026-11-22 H100 run (bench/results/2026-11-22_nvidia-h100-80gb-hbm3_session6): every kernel
#: here passed the GPU tests. The Hopper forward flash_attention_fwd_sm90 is the fastest forward,
#: so it left the list. The mma.sync forward and the decode kernel are slower than Triton's. The
#: backward is slower than Triton's padded and faster packed: ops.attention picks it after the
#: Hopper forward for packed sequences only (_backward_backend). The decode kernel's launch costs
#: far less host time than Triton's two launches, so eager decode over small caches runs it
#: (ops.attention.EAGER_CUDA_DECODE_MAX_CACHE_BYTES, measured 2026-11-23).
#: 2026-11-23 H100 run (bench/results/2026-11-23_nvidia-h100-80gb-hbm3): the Hopper backward
#: flash_attention_bwd_sm90 passed its GPU tests and is faster than Triton's backward (causal
#: fwd+bwd 9.9 vs 11.7 ms at 2 x 8k, 32/8/128), so it left the list: it is the backward after the
#: Hopper forward (ops.attention._backward_backend).
CUDA_OPS_PENDING_VALIDATION = frozenset({"flash_attention_fwd", "flash_attention_bwd", "decode_attention"})


def cuda_preferred_for(cuda_op: str) -> bool:
    """Whether the cuda backend is the one to pick for ``cuda_op`` when nobody named one: the
    extension has the kernel and it is not pending validation."""
    return cuda_has_op(cuda_op) and cuda_op not in CUDA_OPS_PENDING_VALIDATION


def backend_for_op(name: str | None, cuda_op: str) -> str | None:
    """The backend a model-wide choice ``name`` (patch_model's ``backend``) means for one op:
    "cuda" asks for the fastest validated kernels, so an op whose ``cuda_op`` kernel the built
    extension lacks (or has not validated, see CUDA_OPS_PENDING_VALIDATION) runs on triton
    instead. Other names (and None: automatic) as given."""
    if name == "cuda" and not cuda_preferred_for(cuda_op):
        return "triton"
    return name


def default_backend(device: torch.device, cuda_op: str | None = None) -> str:
    """The fastest backend for tensors on ``device`` (that has ``cuda_op``, when given)."""
    if device.type == "cuda":
        if why_unavailable("cuda") is None and (cuda_op is None or cuda_preferred_for(cuda_op)):
            return "cuda"
        if why_unavailable("triton") is None:
            return "triton"
    return "torch"


def _constant_under_compile(fn):
    """Have torch.compile call ``fn`` while tracing and bake its result into the graph.

    This is what ``torch.compiler.assume_constant_result`` does; it is set directly because
    that function imports torch._dynamo (and with it triton) when thinkfuse is imported, which
    is slow and breaks setting TRITON_INTERPRET after ``import thinkfuse``.
    """
    fn._dynamo_marked_constant = True
    return fn


# Under torch.compile the choice is made once, while tracing (dynamo cannot trace ContextVar
# reads); changing the backend later needs a new compile.
@_constant_under_compile
def resolve_backend(device: torch.device, requested: str | None = None, cuda_op: str | None = None) -> str:
    """The backend an op on ``device`` runs with, checking that it can run there.

    ``cuda_op`` names the extension kernel the op needs on the cuda backend. Raises
    BackendUnavailable when a named backend cannot run in this process (or lacks that kernel),
    and ValueError when it cannot run on this device (CPU tensors for cuda, or for triton
    without the interpreter).
    """
    name = requested if requested is not None else get_backend()
    if name is None:
        return default_backend(device, cuda_op)
    require_backend(name)
    if device.type == "meta":
        # Shapes only (memory planners, FLOP counters): no kernel can run, and every backend
        # returns the torch form's shapes, which computes them on meta tensors.
        return "torch"
    if name == "cuda" and cuda_op is not None and not cuda_has_op(cuda_op):
        raise BackendUnavailable(
            f"the cuda backend of this build has no {cuda_op} kernel; use backend='triton'"
        )
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"the cuda backend needs CUDA tensors, got tensors on {device}")
    if name == "triton" and device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(
            f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got tensors on {device}"
        )
    return name
