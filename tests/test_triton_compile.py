"""The Triton kernels compile for a real GPU target (sm_90), even on a machine without a GPU.

See tests/ptx.py for why and how. The log-prob and mtp_verify kernels are compiled in their
own test files.
"""

import pytest
from ptx import compile_in_subprocess

_COMPILE_SCRIPT = (
    """
    from thinkfuse.kernels import rms_norm, rope, swiglu

    for dt in ("bf16", "fp16", "fp32"):
        for has_residual in (False, True):
            compile_ptx(rms_norm._rms_norm_fwd_kernel,
                        [f"*{dt}"] * 3 + ["*fp32", f"*{dt}", "*fp32"] + ["i64"] * 2 + ["i32"] * 2 + ["fp32"],
                        {"HAS_RESIDUAL": has_residual, "BLOCK_M": 2, "BLOCK_N": 4096})
            compile_ptx(rms_norm._rms_norm_bwd_kernel,
                        ["*fp32", f"*{dt}", "*fp32", "*fp32", f"*{dt}", f"*{dt}", "*fp32"] + ["i64"] * 2 + ["i32"] * 3,
                        {"HAS_DH": has_residual, "BLOCK_M": 2, "BLOCK_N": 4096})
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


def test_rms_norm_rope_and_swiglu_kernels_compile_for_sm90():
    compile_in_subprocess(_COMPILE_SCRIPT)
