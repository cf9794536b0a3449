"""``thinkfuse.ops.mtp_verify``: verify speculative draft tokens against the target's logits.

Greedy (temperature 0) or exact rejection sampling (temperature > 0); see
``reference.mtp_verify`` for the definition. Not differentiable.

The cuda and triton backends run behind the ``torch.library`` custom op ``thinkfuse::mtp_verify``
(with a fake implementation, so torch.compile can trace through it). The randomness is drawn by
torch *before* the kernel, as a ``[B, K+1]`` float32 tensor of uniforms (``generator`` picks the
stream): no host synchronisation, and the launch can be captured in a CUDA graph. The torch
backend uses the same uniforms, so every backend returns the same tokens for the same generator
state.

The CUDA extension is expected to provide, with the Triton launcher's argument order plus
num_splits:
    mtp_verify(Tensor draft_tokens, Tensor target_logits, Tensor? draft_probs, Tensor? uniforms,
               float temperature, int num_splits=1) -> (Tensor tokens, Tensor num_accepted)
    draft_tokens  [B, K]      int64, contiguous; ids outside [0, V) must be treated as rejected
    target_logits [B, K+1, V] float32/float16/bfloat16, unit stride on V (any B, K strides)
    draft_probs   [B, K, V]   None, or float32/float16/bfloat16 with a unit stride on V; read only
                              when temperature > 0
    uniforms      [B, K+1]    None when temperature == 0, else float32 contiguous in [0, 1):
                              column j < K decides acceptance at j (accept iff u * p < q), column K
                              drives the one inverse-CDF draw of the final token
    temperature   >= 0, finite
    num_splits    <= MAX_NUM_SPLITS. 1: one block per batch row walks the K+1 positions;
                  >= 2: each vocabulary row is split over that many blocks (fewer for a small
                  vocabulary) and the last block of a batch row finishes it; <= 0: the split is
                  chosen from B, K, V, the mode and the SM count. The tokens are the same (greedy:
                  bit-identical; sampled: up to float32 summation order, see
                  csrc/include/thinkfuse/mtp_verify.cuh)
    tokens        [B, K+1]    int64: accepted drafts, then the correction/bonus token, then -1
    num_accepted  [B]         int64 in [0, K]
No host synchronisation, CUDA-graph capturable: one launch with num_splits == 1; otherwise a
memset and one launch (two when sampling with draft_probs), all on the current stream. The
Triton launcher takes no num_splits (its own grid is one program per batch row).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._checks import FLOAT_DTYPES, check_float, check_generator, check_same_device, check_tensor, with_unit_last_stride
from ..backend import resolve_backend
from ._registry import call, custom_op, implementation

_ID_DTYPES = (torch.int32, torch.int64)

#: The cuda backend's work split when the caller names none (``num_splits=None``): 0, the
#: heuristic split. On an H100 (2026-11-22, bench/results/2026-11-22_nvidia-h100-80gb-hbm3_session6)
#: the split path passed tests/test_logprobs_mtp_cuda.py and verified B=1, K=1..4, V=151680 bf16
#: in 7.7-8.4 us greedy and 18-21 us sampled (CUDA-graph replays), against 29-79 us greedy and
#: 128-257 us sampled for one block per batch row (num_splits=1) and 29 us for the vLLM-style
#: torch code.
CUDA_NUM_SPLITS = 0
#: Largest num_splits accepted (kMtpMaxSplits in csrc/include/thinkfuse/ops.h).
MAX_NUM_SPLITS = 1024


def mtp_verify(
    draft_tokens: Tensor,
    target_logits: Tensor,
    *,
    temperature: float = 0.0,
    draft_probs: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    backend: Optional[str] = None,
    num_splits: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Accept a prefix of ``draft_tokens`` ``[B, K]`` given ``target_logits`` ``[B, K+1, V]``.

    Returns ``(tokens, num_accepted)``: tokens ``[B, K+1]`` int64 holding the accepted drafts
    followed by one token from the target (the correction at the first rejection, or the bonus
    after K acceptances), padded with -1; num_accepted ``[B]`` int64 in ``[0, K]``.

    ``temperature == 0``: greedy, accept while the draft equals the target's argmax, ranked as
    ``torch.argmax`` ranks: NaN above every number (+inf included), ties (NaN with NaN too) to the
    lowest id; ``draft_probs`` and ``generator`` are not used.
    ``temperature > 0``: rejection sampling, so that the emitted tokens are distributed exactly
    as sampling from ``softmax(target_logits / temperature)``; ``draft_probs`` ``[B, K, V]`` is
    the distribution the drafts were sampled from, None for a deterministic draft
    (probability 1). ``generator`` is the torch generator the randomness is drawn from (None:
    the global one; under torch.compile it must be None, as dynamo cannot trace an explicit
    generator). A position whose softmax is undefined (a NaN or +inf logit, also one that
    overflows once divided by the temperature, or all -inf) rejects its draft and emits the
    argmax above; a NaN draft probability rejects its draft and gives its id no weight in the
    correction ``max(q - p, 0)``. Every backend does the same.

    Draft ids outside ``[0, V)`` raise ValueError on CPU tensors; on GPU tensors (where the
    check would cost a host sync) they are rejected.

    ``num_splits`` picks the cuda kernel's work split (other backends ignore it): None is
    ``CUDA_NUM_SPLITS``; 1 one block per batch row; ``>= 2`` that many blocks per vocabulary row;
    ``<= 0`` chosen from the shapes and the GPU. Tokens do not depend on it (greedy: exactly;
    sampling: up to float32 rounding of sums, see the module docstring).
    """
    temperature = _check_args(draft_tokens, target_logits, temperature, draft_probs, generator)
    splits = _check_num_splits(num_splits)
    name = resolve_backend(target_logits.device, backend, cuda_op="mtp_verify")
    draft = draft_tokens.to(torch.int64).contiguous()
    logits = with_unit_last_stride(target_logits)
    probs = None
    uniforms = None
    if temperature > 0:
        probs = None if draft_probs is None else with_unit_last_stride(draft_probs)
        uniforms = _uniforms(draft.shape[0], draft.shape[1] + 1, logits.device, generator)
    if name == "torch":
        return reference.mtp_verify(draft, logits, temperature, probs, uniforms)
    return call("mtp_verify", draft, logits, probs, uniforms, temperature, name, splits)


def _check_num_splits(num_splits) -> int:
    if num_splits is None:
        return CUDA_NUM_SPLITS
    if isinstance(num_splits, bool) or not isinstance(num_splits, int):
        raise TypeError(f"num_splits must be an int or None, got {type(num_splits).__name__}")
    if num_splits > MAX_NUM_SPLITS:
        raise ValueError(
            f"num_splits must be <= {MAX_NUM_SPLITS} (<= 0: chosen by heuristic, 1: one block per "
            f"batch row), got {num_splits}"
        )
    return int(num_splits)


def _uniforms(rows: int, cols: int, device: torch.device, generator) -> Tensor:
    """The kernel's randomness, drawn on ``device`` by torch (no host round trip)."""
    return torch.rand((rows, cols), generator=generator, device=device, dtype=torch.float32)


def _check_args(draft_tokens, target_logits, temperature, draft_probs, generator) -> float:
    check_tensor("draft_tokens", draft_tokens, dtypes=_ID_DTYPES, ndim=2)
    check_tensor("target_logits", target_logits, ndim=3)
    temperature = check_float("temperature", temperature, non_negative=True)
    batch, k = draft_tokens.shape
    if target_logits.shape[0] != batch or target_logits.shape[1] != k + 1:
        raise ValueError(
            f"target_logits must be [B, K+1, V] = [{batch}, {k + 1}, V] for draft_tokens of shape "
            f"{tuple(draft_tokens.shape)}, got {tuple(target_logits.shape)}"
        )
    vocab = target_logits.shape[2]
    if vocab == 0:
        raise ValueError("target_logits must have a non-empty vocabulary dim")
    if draft_probs is not None:
        check_tensor("draft_probs", draft_probs, dtypes=FLOAT_DTYPES, ndim=3)
        if tuple(draft_probs.shape) != (batch, k, vocab):
            raise ValueError(
                f"draft_probs must be [B, K, V] = [{batch}, {k}, {vocab}], got {tuple(draft_probs.shape)}"
            )
    check_same_device(target_logits=target_logits, draft_tokens=draft_tokens, draft_probs=draft_probs)
    check_generator(generator, target_logits.device, "target_logits")
    # Reading values costs a host sync on GPU (and a graph break under torch.compile).
    if draft_tokens.device.type == "cpu" and draft_tokens.numel() and not torch.compiler.is_compiling():
        _check_ids_in_range(draft_tokens, vocab)
    return temperature


def _check_ids_in_range(draft_tokens: Tensor, vocab: int) -> None:
    """Eager range check: free on CPU tensors (on GPU it would cost a host sync, so the kernels
    treat an out-of-range draft as rejected instead)."""
    low, high = int(draft_tokens.min()), int(draft_tokens.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(f"draft_tokens must be in [0, {vocab}) (the vocabulary size), found {bad}")


# ---------------------------------------------------------------------------------------------
# Custom op. `backend` is a plain string argument so torch.compile sees it as a constant.


@custom_op("mtp_verify")
def mtp_verify_op(
    draft_tokens: Tensor,
    target_logits: Tensor,
    draft_probs: Optional[Tensor],
    uniforms: Optional[Tensor],
    temperature: float,
    backend: str,
    num_splits: int,
) -> tuple[Tensor, Tensor]:
    fn = implementation(backend, "mtp_verify", "mtp_verify", "mtp_verify", _torch_verify)
    if backend == "cuda":  # only the CUDA kernel has a work split to choose
        return fn(draft_tokens, target_logits, draft_probs, uniforms, temperature, num_splits)
    tokens, num_accepted = fn(draft_tokens, target_logits, draft_probs, uniforms, temperature)
    return tokens, num_accepted


def _torch_verify(draft_tokens, target_logits, draft_probs, uniforms, temperature):
    """Explicit torch form of the kernels (used for the "torch" value of `backend`)."""
    return reference.mtp_verify(draft_tokens, target_logits, temperature, draft_probs, uniforms)


@mtp_verify_op.register_fake
def _(draft_tokens, target_logits, draft_probs, uniforms, temperature, backend, num_splits):
    batch, k = draft_tokens.shape
    tokens = draft_tokens.new_empty((batch, k + 1), dtype=torch.int64)
    return tokens, draft_tokens.new_empty((batch,), dtype=torch.int64)
