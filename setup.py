"""Build script for thinkfuse.

The Python package (torch and Triton backends) always installs. The CUDA extension
``thinkfuse._C`` is built with ninja when the torch already installed has CUDA and ``nvcc`` is
found, or when ``THINKFUSE_BUILD_CUDA=1`` forces it (``THINKFUSE_BUILD_CUDA=0`` skips it).
Because a build-isolated environment cannot see the installed torch, CUDA builds need
``pip install --no-build-isolation .``.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0a"


def _env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        sys.exit(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _torch_with_cuda():
    """Return the installed torch if it can build CUDA extensions, else None (and why)."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return None, "torch is not importable here (build isolation? use --no-build-isolation)"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return None, "nvcc was not found (set CUDA_HOME)"
    return torch, None


def _refuse_static_libstdcxx():
    """Stop before building an extension that would crash on its first raised error: one linked
    by a compiler that adds its own static libstdc++ (see scripts/cxx_runtime.py)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        from cxx_runtime import build_cxx_compilers, static_libstdcxx_compiler
    finally:
        sys.path.pop(0)
    cxx = static_libstdcxx_compiler(build_cxx_compilers())
    if cxx:
        sys.exit(
            f"thinkfuse: the C++ compiler {cxx!r} links libstdc++ statically, so the CUDA extension would "
            "carry its own C++ runtime and crash the process on its first raised error. Build with a "
            "compiler that links it dynamically, e.g. CC=/usr/bin/gcc CXX=/usr/bin/g++."
        )


def _cuda_extension():
    forced = _env_flag("THINKFUSE_BUILD_CUDA")
    if forced is False:
        return []
    torch, why_not = _torch_with_cuda()
    if torch is None:
        if forced:
            sys.exit(f"THINKFUSE_BUILD_CUDA=1 but the CUDA extension cannot be built: {why_not}")
        print(f"thinkfuse: building without the CUDA extension ({why_not})", file=sys.stderr)
        return []
    from torch.utils.cpp_extension import CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    sources = (
        sorted(glob.glob("csrc/ops/*.cu")) + ["csrc/torch_bindings.cpp"] + sorted(glob.glob("csrc/bindings/*.cpp"))
    )
    nvcc_flags = [
        "-O3",
        "-std=c++17",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        # torch defines these to keep half operators out of its headers; our kernels do not
        # include torch, but keep the flags consistent with torch's own builds.
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    return [
        CUDAExtension(
            name="thinkfuse._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc", "include")],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags},
        )
    ]


def _cmdclass(ext_modules):
    if not ext_modules:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    class CheckedBuildExtension(BuildExtension.with_options(use_ninja=True)):
        """torch's builder, after the compiler probe (run only when something is built, not on
        every setup.py invocation such as egg_info or sdist)."""

        def run(self):
            _refuse_static_libstdcxx()
            super().run()

    return {"build_ext": CheckedBuildExtension}


ext_modules = _cuda_extension()

setup(
    package_dir={"thinkfuse": "python/thinkfuse", "thinkfuse.kernels": "kernels"},
    packages=[f"thinkfuse.{p}" if p else "thinkfuse" for p in [""] + find_packages("python/thinkfuse")]
    + ["thinkfuse.kernels"],
    ext_modules=ext_modules,
    cmdclass=_cmdclass(ext_modules),
    zip_safe=False,
)
