"""Compile Triton kernels to sm_90 PTX on a machine without a GPU.

The interpreter runs kernels as Python, so it cannot catch what only the compiler rejects (a
type mismatch across branches, an unsupported construct). Compiling to PTX needs no device, but
it needs triton imported without TRITON_INTERPRET, hence a subprocess. A script passed to
``compile_in_subprocess`` can call ``compile_ptx(fn, arg_types, constexprs, **options)``, which
returns the PTX text, and must print "compiled" at the end.
"""

import os
import subprocess
import sys
import textwrap

import pytest

_PRELUDE = """
import re
import triton
from triton.backends.compiler import GPUTarget

def compile_ptx(fn, types, constexprs, **options):
    signature = dict(zip(fn.arg_names, types + ["constexpr"] * len(constexprs)))
    assert len(signature) == len(fn.arg_names), f"{fn.__name__}: {len(types)} types for {fn.arg_names}"
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options or None).asm["ptx"]
"""


def compile_in_subprocess(script: str) -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    source = _PRELUDE + textwrap.dedent(script)
    result = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
