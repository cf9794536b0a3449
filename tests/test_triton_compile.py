"""The Triton kernels compile for a real GPU target (sm_90), even on a machine without a GPU.

The interpreter runs kernels as Python, so it cannot catch what only the compiler rejects (a
type mismatch across branches, an unsupported construct). Compiling to PTX needs no device, but
it needs triton imported without TRITON_INTERPRET, hence the subprocess.
"""

import os
import subprocess
import sys
import textwrap

import pytest

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from thinkfuse.kernels import rope, swiglu

    def compile_ptx(fn, types, constexprs):
        signature = dict(zip(fn.arg_names, types + ["constexpr"] * len(constexprs)))
        assert len(signature) == len(fn.arg_names), f"{fn.__name__}: {len(types)} types for {fn.arg_names}"
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]

    for dt in ("bf16", "fp16", "fp32"):
        ptx = compile_ptx(rope._rope_kernel,
                          [f"*{dt}"] * 2 + ["*i64", "*fp32"] + [f"*{dt}"] * 2 + ["i64"] * 8 + ["i32"] * 4 + ["fp32"] * 4,
                          {"HAS_TEMPERATURE": True, "BLOCK_H": 16, "BLOCK_HALF": 64})
        # Angles reach 1e6 radians: the approximate instructions would be wrong there.
        assert not re.search(r"(sin|cos)\\.approx", ptx), "rope uses approximate sin/cos"
        for inverse in (False, True):
            compile_ptx(rope._apply_rotary_kernel, [f"*{dt}"] * 6 + ["i64"] * 10 + ["i32"] * 4,
                        {"INVERSE": inverse, "BLOCK_H": 8, "BLOCK_HALF": 32})
        compile_ptx(swiglu._swiglu_fwd_kernel, [f"*{dt}"] * 3 + ["i64"] * 2 + ["i32"] * 2, {"BLOCK": 1024})
        compile_ptx(swiglu._swiglu_bwd_kernel, [f"*{dt}"] * 5 + ["i64"] * 5 + ["i32"] * 2, {"BLOCK": 1024})
    print("compiled")
    """
)


def test_rope_and_swiglu_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
