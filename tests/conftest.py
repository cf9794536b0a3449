"""Test setup: CPU machines run the Triton kernels through the Triton interpreter.

TRITON_INTERPRET must be set before triton (or transformers, which imports it) is imported,
so it is set here, at collection time.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import thinkfuse  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# Every backend that can run on DEVICE: the triton backend on CPU needs the interpreter.
KERNEL_BACKENDS = [b for b in thinkfuse.available_backends() if b != "torch"]
ALL_BACKENDS = KERNEL_BACKENDS + ["torch"]


def backends_with(cuda_op: str) -> list[str]:
    """ALL_BACKENDS minus cuda when this build has no ``cuda_op`` kernel (ops land in the CUDA
    extension one by one; the cuda backend then raises BackendUnavailable for them)."""
    from thinkfuse.backend import cuda_has_op

    return [b for b in ALL_BACKENDS if b != "cuda" or cuda_has_op(cuda_op)]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return DEVICE


def pytest_generate_tests(metafunc):
    """Parametrise the `backend` (every backend) and `kernel_backend` (cuda/triton) arguments.

    A test module that sets CUDA_OP = "<extension kernel>" gets the cuda backend only when this
    build has that kernel.
    """
    cuda_op = getattr(metafunc.module, "CUDA_OP", None)
    backends = ALL_BACKENDS if cuda_op is None else backends_with(cuda_op)
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", backends)
    if "kernel_backend" in metafunc.fixturenames:
        metafunc.parametrize("kernel_backend", [b for b in backends if b != "torch"])


@pytest.fixture(autouse=True)
def _reset_backend_selection():
    yield
    thinkfuse.set_backend(None)


# With THINKFUSE_FAILURE_LOG=<path>, each failure is appended there (test id, phase, traceback) as
# soon as it happens. A GPU run killed by its time limit gets no junit XML and no summary; this
# file still holds every failure seen so far. Under pytest-xdist only the controller writes.
_FAILURE_LOG = os.environ.get("THINKFUSE_FAILURE_LOG")


def pytest_runtest_logreport(report):
    if not _FAILURE_LOG or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    with open(_FAILURE_LOG, "a", encoding="utf-8") as log:
        log.write(f"=== FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
