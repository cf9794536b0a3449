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
# autograd, and with it ~16 us more than the same formula as a plain autograd.Function (34.8 vs
# 19.4 us for an rms_norm forward whose torch body alone takes 14.5; measured on this project's
# CPU machine through the "torch" backend value, tiny tensors, torch 2.13). At
# decode, where a step of a 7B model runs ~5 ops per layer, and in a training step whose GPU
# work is short, that host time shows up as idle GPU. So in eager mode ``call`` skips the
# dispatcher: without a gradient to record it runs the op's Python body; with one it applies an
# autograd.Function built from the same body, setup_context and backward that the op registered
# (what the dispatcher's autograd kernel runs too, minus the redispatch). torch.compile, tensor
# subclasses (FakeTensor, FunctionalTensor, DTensor) and torch.func transforms still go through
# ``torch.ops.thinkfuse``, except torch.func.grad / vjp (see "torch.func" below).

_BODIES: dict = {}
_OPS: dict = {}
_AUTOGRAD_FUNCTIONS: dict = {}
_SETUP_CONTEXTS: dict = {}
_BACKWARDS: dict = {}
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def custom_op(name: str):
    """``torch.library.custom_op("thinkfuse::<name>", mutates_args=())`` that also records the
    undecorated function for ``call``'s direct path."""

    def register(fn):
        _BODIES[name] = fn
        _OPS[name] = torch.library.custom_op(f"thinkfuse::{name}", mutates_args=())(fn)
        return _OPS[name]

    return register


def register_autograd(name: str, backward, setup_context) -> None:
    """``register_autograd`` of the custom op ``name``, and the same formula as the
    autograd.Function ``call`` applies in eager mode."""
    _OPS[name].register_autograd(backward, setup_context=setup_context)
    _SETUP_CONTEXTS[name], _BACKWARDS[name] = setup_context, backward
    body = _BODIES[name]

    # forward(ctx, ...) rather than a setup_context staticmethod: Function.apply binds the
    # arguments of a setup_context-style forward with inspect.signature on every call (~10 us);
    # the functorch support that style buys is given by _functorch_function, built only under torch.func.
    def forward(ctx, *args):
        output = body(*args)
        setup_context(ctx, args, output)
        return output

    _AUTOGRAD_FUNCTIONS[name] = type(f"thinkfuse_{name}", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
    })


def needs_dispatcher(args) -> bool:
    """Whether a call with ``args`` must go through the dispatcher: under torch.compile or a
    torch.func transform, or with a tensor subclass among the arguments."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return True
    return any(isinstance(arg, torch.Tensor) and type(arg) not in _PLAIN_TENSOR_TYPES for arg in args)


def records_gradient(args) -> bool:
    """Whether autograd must record a call with ``args`` (grad mode on, an input requiring grad)."""
    return torch.is_grad_enabled() and any(isinstance(arg, torch.Tensor) and arg.requires_grad for arg in args)


def _forward_mode_ad_in_use(args) -> bool:
    """Whether forward-mode AD is asked of this call: a ``torch.func.jvp`` (or ``jacfwd``)
    transform is active, or an argument is a ``torch.autograd.forward_ad`` dual tensor. The
    kernels have no forward-mode formula, and custom ops without one silently drop tangents."""
    if torch._C._are_functorch_transforms_active():
        stack = torch._C._functorch.get_interpreter_stack() or ()
        if any(level.key() == torch._C._functorch.TransformType.Jvp for level in stack):
            return True
    if torch.autograd.forward_ad._current_level < 0:
        return False
    return any(isinstance(arg, torch.Tensor) and torch.autograd.forward_ad.unpack_dual(arg).tangent is not None
               for arg in args)


def call(name: str, *args):
    """Run the custom op ``thinkfuse::<name>`` on ``args`` (its schema's positional order)."""
    if _forward_mode_ad_in_use(args):
        raise NotImplementedError(
            f"thinkfuse op {name!r} has no forward-mode AD (torch.func.jvp / jacfwd / forward_ad dual tensors) on "
            "its cuda and triton kernels; run it with backend='torch' (patch_model(model, backend='torch'))")
    if needs_dispatcher(args):
        if torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling():
            return _call_under_functorch(name, args)
        return getattr(torch.ops.thinkfuse, name)(*args)
    if records_gradient(args):
        function = _AUTOGRAD_FUNCTIONS.get(name)
        if function is None:  # an op without a gradient formula: the dispatcher says so
            return getattr(torch.ops.thinkfuse, name)(*args)
        return function.apply(*args)
    return _BODIES[name](*args)


# ---------------------------------------------------------------------------------------------
# torch.func.
#
# The dispatcher's autograd kernel of a custom op is a forward(ctx, ...)-style autograd.Function,
# which functorch refuses ("must override the setup_context staticmethod"), so torch.func.grad /
# vjp / grad_and_value cannot go through the dispatcher. Under those transforms ``call`` applies
# a setup_context-style autograd.Function of the same body, setup_context and backward instead
# (functorch's custom_function_call unwraps each grad level, runs the body below it and records
# the backward there). Ops without a gradient formula (the backward ops, the inference-only ops)
# get one whose backward raises: a second derivative through the kernels is an error, never a
# silent zero. vmap alone (jacrev's vmap over a vjp's backward included) goes to the dispatcher,
# whose fallback runs the kernels once per sample: slow but exact. vmap and grad together
# (per-sample gradients) cannot work on the kernel backends (functorch would need a batching rule
# of the autograd.Function, and the kernels read plain tensors only), so they are refused by name.
# All of this runs only while a transform is active: the eager path above pays nothing for it.

_FUNCTORCH_FUNCTIONS: dict = {}
_BACKEND_ARGUMENT_INDEX: dict = {}


def _call_under_functorch(name: str, args):
    """``call`` while a torch.func transform (other than jvp, refused before) is active."""
    transforms = {level.key() for level in torch._C._functorch.get_interpreter_stack()}
    if torch._C._functorch.TransformType.Grad not in transforms:
        # vmap alone (the per-sample fallback), functionalize: the dispatcher handles them.
        return getattr(torch.ops.thinkfuse, name)(*args)
    backend = _backend_of(name, args)
    if torch._C._functorch.TransformType.Vmap in transforms and backend != "torch":
        raise _vmap_with_grad_error(name, backend)
    return _functorch_function(name).apply(*args)


def _backend_of(name: str, args) -> str:
    """The value of the op's ``backend`` argument in ``args`` (every thinkfuse op has one)."""
    index = _BACKEND_ARGUMENT_INDEX.get(name)
    if index is None:
        arguments = [argument.name for argument in getattr(torch.ops.thinkfuse, name).default._schema.arguments]
        index = _BACKEND_ARGUMENT_INDEX[name] = arguments.index("backend")
    return args[index]


def _vmap_with_grad_error(name: str, backend: str) -> NotImplementedError:
    return NotImplementedError(
        f"thinkfuse op {name!r} cannot run under torch.func.vmap and grad together (per-sample gradients) on its "
        f"{backend} kernels, which read plain tensors only; run it with backend='torch' "
        "(patch_model(model, backend='torch'), thinkfuse.use_backend('torch'))")


def _no_derivative_error(name: str, backend: str) -> RuntimeError:
    return RuntimeError(
        f"thinkfuse op {name!r} has no derivative on its {backend} kernels: it is a backward pass or an "
        "inference op, so second derivatives (torch.func.grad of grad, hessian, double backward) through the cuda "
        "and triton kernels are not supported; run it with backend='torch' (patch_model(model, backend='torch'), "
        "thinkfuse.use_backend('torch'))")


def _functorch_function(name: str):
    """The setup_context-style autograd.Function of op ``name``, built on first use."""
    function = _FUNCTORCH_FUNCTIONS.get(name)
    if function is None:
        function = _FUNCTORCH_FUNCTIONS[name] = _make_functorch_function(name)
    return function


def _make_functorch_function(name: str):
    registered_setup_context = _SETUP_CONTEXTS.get(name)
    registered_backward = _BACKWARDS.get(name)

    def forward(*args):
        # functorch calls this below every grad level, on unwrapped tensors (which may still be
        # FakeTensors or other subclasses: those take the dispatcher, without autograd here).
        if needs_dispatcher(args):
            return getattr(torch.ops.thinkfuse, name)(*args)
        return _BODIES[name](*args)

    def setup_context(ctx, inputs, output):
        ctx.thinkfuse_backend = _backend_of(name, inputs)
        if registered_setup_context is not None:
            registered_setup_context(ctx, inputs, output)

    def backward(ctx, *grads):
        if registered_backward is None:
            raise _no_derivative_error(name, ctx.thinkfuse_backend)
        return registered_backward(_ContextWithLiveSavedTensors(ctx), *_unwrap_dead_wrappers(grads))

    return type(f"thinkfuse_{name}_functorch", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    })


class _ContextWithLiveSavedTensors:
    """A backward's ctx whose saved tensors are unwrapped where their transform has exited (a
    torch.func.vjp's vjp_fn runs after the vjp: what its forward saved are wrappers of a dead
    level). Torch ops unwrap those in the dispatcher and autograd.Function.apply unwraps its
    arguments, but ``call``'s direct path hands tensors to the kernels as they are, and the
    kernels cannot read a wrapper."""

    def __init__(self, ctx):
        self._ctx = ctx

    def __getattr__(self, attribute):
        return getattr(self._ctx, attribute)

    @property
    def saved_tensors(self):
        return _unwrap_dead_wrappers(self._ctx.saved_tensors)


def _unwrap_dead_wrappers(tensors):
    # torch's private helper, imported only on the torch.func path: a torch release that moves it
    # cannot break importing every op
    from torch._functorch.utils import unwrap_dead_wrappers

    return unwrap_dead_wrappers(tensors)
