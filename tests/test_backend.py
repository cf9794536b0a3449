"""Backend discovery and selection, as API.md specifies."""

import threading

import pytest
import torch
from conftest import HAS_CUDA

import thinkfuse
from thinkfuse import BackendUnavailable, backend as backend_mod


def test_available_backends_fastest_first_and_torch_always():
    names = thinkfuse.available_backends()
    assert names[-1] == "torch"
    assert names == [b for b in ("cuda", "triton", "torch") if b in names]


def test_triton_listed_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" in thinkfuse.available_backends()


@pytest.mark.parametrize("value,interpreted", [
    ("1", True), ("true", True), ("TRUE", True), ("On", True), ("yes", True), ("y", True),
    ("0", False), ("false", False), ("False", False), ("off", False), ("no", False), ("", False), ("2", False),
    (" 1", False), (None, False),
])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, interpreted):
    """TRITON_INTERPRET=false / off / no turn the interpreter off in Triton: the triton backend
    must not then be offered for CPU tensors (its kernels would not run there)."""
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert backend_mod.triton_interpreter_enabled() is interpreted
    knobs = pytest.importorskip("triton.knobs")
    assert knobs.runtime.interpret is interpreted  # the installed Triton agrees


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only behaviour")
def test_unavailable_backends_raise_with_reason(monkeypatch):
    with pytest.raises(BackendUnavailable, match="cuda.*unavailable.*CUDA"):
        thinkfuse.set_backend("cuda")
    with pytest.raises(BackendUnavailable, match="cuda"):
        with thinkfuse.use_backend("cuda"):
            pass
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        thinkfuse.set_backend("triton")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        thinkfuse.set_backend("metal")
    with pytest.raises(ValueError, match="backend must be one of"):
        thinkfuse.ops.rms_norm(torch.ones(2, 4), torch.ones(4), backend="metal")


def test_default_selection_by_device():
    assert backend_mod.default_backend(torch.device("cpu")) == "torch"
    assert backend_mod.resolve_backend(torch.device("cpu")) == "torch"
    if HAS_CUDA:
        assert backend_mod.default_backend(torch.device("cuda")) == thinkfuse.available_backends()[0]


def test_precedence_argument_context_global_environment(monkeypatch):
    # On a GPU machine the tests run triton compiled (no interpreter), which needs CUDA tensors.
    cpu = torch.device("cuda" if HAS_CUDA else "cpu")
    monkeypatch.setenv("THINKFUSE_BACKEND", "triton")
    assert backend_mod.resolve_backend(cpu) == "triton"
    thinkfuse.set_backend("torch")
    assert backend_mod.resolve_backend(cpu) == "torch"
    with thinkfuse.use_backend("triton"):
        assert backend_mod.resolve_backend(cpu) == "triton"
        with thinkfuse.use_backend("torch"):
            assert backend_mod.resolve_backend(cpu) == "torch"
        assert backend_mod.resolve_backend(cpu) == "triton"
        assert backend_mod.resolve_backend(cpu, "torch") == "torch"  # explicit argument wins
    assert backend_mod.resolve_backend(cpu) == "torch"
    thinkfuse.set_backend(None)
    assert backend_mod.resolve_backend(cpu) == "triton"


def test_bad_environment_value(monkeypatch):
    monkeypatch.setenv("THINKFUSE_BACKEND", "nope")
    with pytest.raises(ValueError, match="THINKFUSE_BACKEND"):
        backend_mod.resolve_backend(torch.device("cpu"))


def test_use_backend_is_per_thread():
    seen = {}

    def worker():
        seen["thread"] = backend_mod.get_backend()

    with thinkfuse.use_backend("torch"):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert backend_mod.get_backend() == "torch"
    assert seen["thread"] is None


def test_named_backend_never_silently_replaced(monkeypatch):
    """Asking for triton on CPU without the interpreter is an error, not a torch fallback."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises((ValueError, BackendUnavailable), match="triton"):
        thinkfuse.ops.rms_norm(torch.ones(2, 4), torch.ones(4), backend="triton")


@pytest.mark.skipif("cuda" not in thinkfuse.available_backends(), reason="cuda backend not built")
def test_cuda_backend_rejects_cpu_tensors():
    with pytest.raises(ValueError, match="cuda backend needs CUDA tensors"):
        thinkfuse.ops.rms_norm(torch.ones(2, 4), torch.ones(4), backend="cuda")


def test_backend_for_op_sends_cuda_to_triton_only_where_the_kernel_is_missing(monkeypatch):
    monkeypatch.setattr(backend_mod, "cuda_has_op", lambda op: op == "rms_norm_fwd")
    assert backend_mod.backend_for_op("cuda", "rms_norm_fwd") == "cuda"
    assert backend_mod.backend_for_op("cuda", "flash_attention_fwd") == "triton"
    assert backend_mod.backend_for_op("triton", "flash_attention_fwd") == "triton"
    assert backend_mod.backend_for_op(None, "flash_attention_fwd") is None


def test_kernels_pending_validation_are_never_chosen_for_the_user(monkeypatch):
    pending = next(iter(backend_mod.CUDA_OPS_PENDING_VALIDATION))
    monkeypatch.setattr(backend_mod, "cuda_has_op", lambda op: True)
    monkeypatch.setattr(backend_mod, "why_unavailable", lambda name: None)
    assert backend_mod.backend_for_op("cuda", pending) == "triton"
    assert backend_mod.backend_for_op("cuda", "rms_norm_fwd") == "cuda"
    assert backend_mod.default_backend(torch.device("cuda"), pending) == "triton"
    assert backend_mod.default_backend(torch.device("cuda"), "rms_norm_fwd") == "cuda"
    # an explicit request still reaches the kernel (the GPU tests rely on it)
    assert backend_mod.resolve_backend(torch.device("cuda"), "cuda", pending) == "cuda"


@pytest.mark.gpu
@pytest.mark.skipif(not backend_mod.cuda_has_op("rms_norm_fwd"), reason="needs the built CUDA extension")
def test_extension_errors_are_python_exceptions_every_time():
    """A TORCH_CHECK in the extension reaches Python as TypeError / ValueError, again and again.
    An extension that carries its own static libstdc++ (a g++ wrapper with -static-libstdc++;
    gpu_check.sh's build avoids one) crashes the process here instead."""
    ops = torch.ops.thinkfuse_C
    x = torch.zeros(4, 8, device="cuda", dtype=torch.float64)
    for _ in range(50):
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            ops.rms_norm_fwd(x, torch.ones(8, device="cuda", dtype=torch.float64), None, 1e-6)
        with pytest.raises(ValueError):
            ops.rms_norm_fwd(x.float(), torch.ones(9, device="cuda"), None, 1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not backend_mod.cuda_has_op("rms_norm_fwd"), reason="needs the built CUDA extension")
def test_extension_shares_the_process_cpp_runtime():
    """The extension defines no C++ exception runtime of its own (__cxa_throw): it uses the
    libstdc++ that torch uses, so exceptions cross between them."""
    import shutil
    import subprocess

    import thinkfuse._C as extension

    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("needs binutils' nm")
    symbols = subprocess.run([nm, "-D", "--defined-only", extension.__file__], capture_output=True, text=True,
                             check=True).stdout.split()
    assert "__cxa_throw" not in symbols


def test_meta_tensors_give_shapes_whatever_backend_is_named(backend):
    """Shape-only runs (meta tensors) compute the torch form's shapes, whichever backend is
    named: no kernel can run on them."""
    meta = dict(device="meta")
    x, w = torch.empty(2, 3, 64, **meta), torch.empty(64, **meta)
    assert thinkfuse.ops.rms_norm(x, w, eps=1e-6, backend=backend).shape == (2, 3, 64)
    assert thinkfuse.ops.swiglu(x, x, backend=backend).shape == (2, 3, 64)
    q, k = torch.empty(2, 5, 4, 16, **meta), torch.empty(2, 5, 2, 16, **meta)
    out = thinkfuse.ops.flash_attention(q, k, k, causal=True, backend=backend)
    assert out.shape == (2, 5, 4, 16) and out.device.type == "meta"
    logits, ids = torch.empty(6, 50, **meta), torch.empty(6, dtype=torch.long, **meta)
    assert thinkfuse.ops.token_logprobs(logits, ids, backend=backend).shape == (6,)


def test_use_backend_none_is_automatic_selection(monkeypatch):
    """use_backend(None) asks for the automatic choice inside its block: it overrides
    set_backend and THINKFUSE_BACKEND as any use_backend does (context beats both), and an
    enclosing use_backend too."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("THINKFUSE_BACKEND", "torch")
    with thinkfuse.use_backend(None):
        assert backend_mod.get_backend() is None
        assert backend_mod.resolve_backend(cpu) == "torch"  # automatic: torch on CPU tensors
    thinkfuse.set_backend("triton")
    with thinkfuse.use_backend(None):
        assert backend_mod.get_backend() is None
        assert backend_mod.resolve_backend(cpu) == "torch"
    with thinkfuse.use_backend("triton"), thinkfuse.use_backend(None):
        assert backend_mod.get_backend() is None
    assert backend_mod.get_backend() == "triton"  # set_backend applies again outside
