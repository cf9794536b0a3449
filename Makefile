# thinkfuse developer entry points. `make demo` and `make test` set up everything they need
# (a virtual environment in $(VENV) with torch, triton, transformers and thinkfuse) on first use.

PYTHON ?= python3
VENV ?= .venv
# On a CPU-only machine this resolves to the CPU wheel; on a GPU machine install the CUDA
# torch you want into $(VENV) first (or point VENV at an environment that has it).
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: venv demo test check-cuda bench bench-smoke gpu-check gpu-wheels build-cuda clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,bench,build]"
	touch $@

venv: $(VENV)/.installed

## The main job: patch a tiny model of every family, check it against the unpatched model.
demo: venv
	$(PY) -m thinkfuse.demo

## The test suite. Without a GPU the Triton kernels run in the Triton interpreter.
test: venv
	TRITON_INTERPRET=$${TRITON_INTERPRET:-$$($(PY) -c 'import torch; print(0 if torch.cuda.is_available() else 1)')} \
		$(PY) -m pytest tests -q -rs

## Compile-only nvcc check of every CUDA source against the installed torch headers.
check-cuda: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/check_cuda.sh

## Build the CUDA extension in place (needs CUDA torch and nvcc).
build-cuda: venv
	THINKFUSE_BUILD_CUDA=1 $(PY) -m pip install --no-build-isolation --no-deps -e .

bench: venv
	$(PY) -m bench

bench-smoke: venv
	$(PY) -m bench --smoke

## Everything a GPU machine should run: build, full GPU test suite, benchmarks.
gpu-check:
	bash bench/gpu_check.sh

## Baselines the GPU machine's image lacks, as wheels in .whl/ (git-ignored) for it to carry;
## gpu_check.sh installs whatever .whl/ holds. Pure-Python wheels only (the machine is offline).
GPU_WHEELS ?= liger-kernel==0.8.5
gpu-wheels:
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf build dist *.egg-info python/*.egg-info python/thinkfuse/_C*.so
