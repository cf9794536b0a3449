"""Does a C++ compiler put its own static copy of libstdc++ into the shared libraries it links?

Some images wrap g++ with ``-static-libstdc++`` (seen on an H100 image, /opt/gcc/bin/g++). A torch
extension linked that way carries a second C++ exception runtime: the first TORCH_CHECK it raises
crashes the process instead of becoming a Python exception. setup.py refuses such a compiler and
bench/gpu_check.sh switches to the system g++.

    python scripts/cxx_runtime.py [COMPILER...]   # exit 0: all link libstdc++ dynamically,
                                                  # 1: one links it statically, 2: cannot tell
                                                  # (default: the compilers a build would use)
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile


def build_cxx_compilers() -> list[str]:
    """The C++ compilers a torch extension build may use: $CXX when set (torch and setuptools
    both take it), else ``c++`` on PATH (torch's compile step) and Python's configured CXX
    (setuptools' link step)."""
    if os.environ.get("CXX"):
        return [os.environ["CXX"]]
    return [c for c in dict.fromkeys([shutil.which("c++"), sysconfig.get_config_var("CXX")]) if c]


def static_libstdcxx_compiler(compilers: list[str]) -> str | None:
    """The first of ``compilers`` that links libstdc++ statically, else None."""
    return next((c for c in compilers if links_libstdcxx_statically(c)), None)


def links_libstdcxx_statically(cxx: str) -> bool | None:
    """True / False, or None when it cannot tell (no compiler, no nm, the probe fails to build)."""
    if not cxx or shutil.which("nm") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source, library = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(source, "w") as f:
            f.write("void thinkfuse_probe() { throw 1; }\n")
        try:
            built = subprocess.run([*shlex.split(cxx), "-shared", "-fPIC", source, "-o", library],
                                   capture_output=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if built.returncode != 0:
            return None
        symbols = subprocess.run(["nm", "-D", "--defined-only", library], capture_output=True, text=True)
    return "__cxa_throw" in symbols.stdout.split()


if __name__ == "__main__":
    compilers = sys.argv[1:] or build_cxx_compilers()
    verdicts = {c: links_libstdcxx_statically(c) for c in compilers}
    static = [c for c, v in verdicts.items() if v]
    unknown = [c for c, v in verdicts.items() if v is None]
    if static:
        print(f"{static[0]} links libstdc++ statically")
        sys.exit(1)
    if unknown or not compilers:
        print(f"cannot tell for {', '.join(unknown) or 'no compiler'} (missing compiler or nm?)")
        sys.exit(2)
    print(f"{', '.join(compilers)}: libstdc++ linked dynamically")
    sys.exit(0)
