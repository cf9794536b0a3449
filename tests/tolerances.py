"""Comparison helpers implementing the tolerances of ARCHITECTURE.md.

float32: elementwise 1e-5, reductions over long rows 1e-4 (relative to the reference's scale).
float16/bfloat16: ours and HF's own low-precision result are both compared with a float64
truth; ours may be at most 2x HF's error, plus one unit in the last place of the output dtype
(the Triton interpreter truncates float32 -> bfloat16 instead of rounding to nearest).
"""

import torch

ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}


def max_error(ours: torch.Tensor, truth: torch.Tensor) -> float:
    assert ours.shape == truth.shape, (ours.shape, truth.shape)
    ours, truth = ours.double(), truth.double()
    assert not torch.isnan(ours).any(), "NaN in result"
    return (ours - truth).abs().max().item() if ours.numel() else 0.0


def assert_close_fp32(ours, reference, tol=1e-5):
    """Elementwise error relative to the reference's largest magnitude."""
    scale = max(reference.double().abs().max().item(), 1.0) if reference.numel() else 1.0
    err = max_error(ours, reference)
    assert err <= tol * scale, f"max error {err:.3e} > {tol:.0e} x scale {scale:.3e}"


# Smallest scale the ulp term of assert_low_precision_ok uses: a truth that is exactly 0 (e.g.
# dq when every query sees one key) is computed by kernels as float32 cancellation noise of
# ~1e-7, which no fixed-point ulp bound of 0 would admit.
MIN_LOW_PRECISION_SCALE = 2.0**-10


def assert_low_precision_ok(ours, hf_low, truth):
    """ours and hf_low (same low dtype) against a float64 truth."""
    assert ours.dtype == hf_low.dtype, (ours.dtype, hf_low.dtype)
    scale = truth.double().abs().max().item() if truth.numel() else 0.0
    scale = max(scale, MIN_LOW_PRECISION_SCALE)
    ours_err, hf_err = max_error(ours, truth), max_error(hf_low, truth)
    bound = 2 * hf_err + ULP[ours.dtype] * scale
    assert ours_err <= bound, f"error {ours_err:.3e} vs HF's {hf_err:.3e} (bound {bound:.3e})"


def assert_no_scale_bias(ours, truth, roundings=1):
    """The error's mean component along the truth, relative to the truth's size: catches a
    systematic scale error (a bfloat16 output 1% too large gives +0.01) that stays under
    assert_low_precision_ok's bound of twice HF's max error plus an ulp (~1.2% in bfloat16).

    Rounding to nearest (torch, GPUs) leaves ~0 (at most 4e-4 measured). The Triton
    interpreter's truncation toward zero only shrinks magnitudes, by 2^-9 .. 2^-8 per bfloat16
    rounding of the result (-0.0019 .. -0.0032 measured): ``roundings`` widens the negative side.
    """
    assert ours.shape == truth.shape, (ours.shape, truth.shape)
    ours, truth = ours.double(), truth.double()
    size = truth.abs().sum().item()
    if size == 0:
        return
    bias = ((ours - truth) * truth.sign()).sum().item() / size
    low, high = -roundings * 2.0**-8, 2.0**-9
    assert low <= bias <= high, f"scale bias {bias:+.4f} of the result, outside [{low:.4f}, {high:.4f}]"
