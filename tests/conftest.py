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


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _reset_backend_selection():
    yield
    thinkfuse.set_backend(None)
