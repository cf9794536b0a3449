"""Speculative-decoding verification cases: ``thinkfuse.ops.mtp_verify`` against a vLLM-style torch
implementation and FlashInfer's ``chain_speculative_sampling``.

Shapes: batch B in (1, 8, 64, 256) x K draft tokens in (1, 2, 4) x the vocabulary of each preset
with an MTP layer (``num_nextn_predict_layers``: MiMo-7B, V 151680; a ``--model`` without one has
no cases). Target logits ``[B, K+1, V]`` in the run's dtype; the drafts are the target's argmax at
positions 0..K-1 (greedy accepts them all, the most work for a kernel that scans the prefix).
Forward only (verification is not differentiable); the harness reports milliseconds per call
(x 1000 for microseconds), timed as replays of a CUDA graph (serving captures the decode step)
where the implementation can be captured, so the numbers are GPU time without the host's launch
overhead; the torch sampling baselines cannot and are timed per call (see ``_capturable``).
Graph replays read the same logits every time, so where they fit in L2 (50 MB on an H100; B=64,
K=1 is 128 x 151680 bf16 = 38.8 MB) the rows measure reads from L2, as in serving, where the
lm_head GEMM has just written the logits; from DRAM the same read takes 12.9 us at 3.0 TB/s (the
copy bandwidth an H100 measured in bench/results/2026-11-22_*; arithmetic, not a timing). A
fraction of copy bandwidth above 1 on such rows is the L2's doing.

Variants:
- ``greedy``: temperature 0.
- ``sample``: temperature 1, deterministic draft (no draft_probs, p = 1 at the draft).
- ``sample+draft_probs``: temperature 1, draft_probs ``[B, K, V]`` float32 (a softmax).

Implementations (each timed from logits and drafts to the emitted tokens and accept counts, with
its randomness drawn inside the call):
- ``thinkfuse-<backend>``: ``mtp_verify(draft_tokens, target_logits, temperature=...,
  draft_probs=...)``; for cuda that is the wrapper's default work split
  (``thinkfuse.ops.mtp_verify.CUDA_NUM_SPLITS``, at present 0: the split its heuristic picks from
  B, K, V and the SM count, every vocabulary row cut into slices, one block each, the last block
  of a batch row finishing it; see csrc/include/thinkfuse/mtp_verify.cuh).
- ``thinkfuse-cuda-rowblock``: the same with ``num_splits=1``: one block per batch row walks the
  K+1 positions (the cuda kernel's other path, beside the default).
- ``vllm-style``: written inline after vLLM's rejection sampler. Greedy: ``argmax`` of the
  target and compare. Sampling: float32 ``softmax`` of target logits / T, accept draft x iff
  ``u * p(x) < q(x)``, residual ``max(q - p, 0)`` (deterministic draft: q with x zeroed) sampled
  with ``torch.multinomial`` at every position, the bonus token with ``torch.multinomial`` on
  q_K, then the accepted prefix + correction/bonus assembled with tensor ops (no host sync).
- ``flashinfer``: float32 ``softmax`` of target logits / T, then
  ``flashinfer.sampling.chain_speculative_sampling`` (draft ids int32). A deterministic draft is
  passed as one-hot float32 draft_probs built inside the timed call. Sampling only: its greedy
  rows are missing.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch

import thinkfuse
from bench import harness
from bench.harness import FWD, Case, Config, Workload

OP = "mtp_verify"
GREEDY, SAMPLE, SAMPLE_DRAFT_PROBS = "greedy", "sample", "sample+draft_probs"
VARIANTS = {GREEDY: (0.0, False), SAMPLE: (1.0, False), SAMPLE_DRAFT_PROBS: (1.0, True)}
BATCHES = (64, 1, 8, 256)  # 64 first: the goal, reached before a job limit ends the run
DRAFTS = (1, 2, 4)
VLLM, FLASHINFER = "vllm-style", "flashinfer"
CUDA_ROW_BLOCK = "thinkfuse-cuda-rowblock"  # the cuda backend with num_splits=1 (one block per row)
CUDA_OP = "mtp_verify"
DRAFT_PROBS_DTYPE = torch.float32  # as vLLM and FlashInfer hold them

SMOKE_BATCHES, SMOKE_DRAFTS, SMOKE_VOCAB = (2,), (2,), 64
SMOKE_MODEL = "tiny"

BYTES_COUNTED = (
    "minimal DRAM traffic, B rows, K drafts, V vocab: read the target logits (B*(K+1)*V elements "
    "in the run's dtype); sample+draft_probs also reads draft_probs (B*K*V float32). Not "
    "counted: draft ids, uniforms, emitted tokens and accept counts (O(B*K))."
)


def cases(config: Config) -> list[Case]:
    if FWD not in config.modes:
        return []  # not differentiable: forward rows only
    out = []
    for batch, k, vocab, model in _shapes(config):
        for variant, (temperature, with_probs) in VARIANTS.items():
            for impl, verify, missing in _implementations(config, variant):
                build = functools.partial(_build, verify, batch, k, vocab, temperature, with_probs, config)
                out.append(Case(
                    op=OP, impl=impl, variant=variant, mode=FWD,
                    shape={"batch": batch, "drafts": k, "vocab": vocab}, model=model,
                    dtype=config.dtype, bytes_moved=bytes_moved(batch, k, vocab, with_probs, config.dtype),
                    build=None if missing else build, missing=missing,
                    cuda_graph=_capturable(variant, impl),
                ))
    return out


def _capturable(variant: str, impl: str) -> bool:
    """Whether to time the case as CUDA graph replays (a decode step runs captured, so host
    launch cost is not the op's). Seen capturing on an H100: every greedy implementation and the
    thinkfuse kernels' sampling. The torch sampling paths were not: a capture that fails midway
    leaves torch's CUDA generator unusable for the rest of the process, so they are timed with
    plain do_bench (their rows say so)."""
    return variant == "greedy" or impl in ("thinkfuse-cuda", CUDA_ROW_BLOCK, "thinkfuse-triton")


def bytes_moved(batch: int, k: int, vocab: int, with_probs: bool, dtype: torch.dtype) -> int:
    """Bytes of the op's minimal reads (see BYTES_COUNTED)."""
    element = torch.empty((), dtype=dtype).element_size()
    total = batch * (k + 1) * vocab * element
    if with_probs:
        total += batch * k * vocab * torch.empty((), dtype=DRAFT_PROBS_DTYPE).element_size()
    return total


def _shapes(config: Config) -> list[tuple[int, int, int, str]]:
    """(batch, drafts, vocab, model names) for every case shape."""
    if config.smoke:
        return [(b, k, SMOKE_VOCAB, SMOKE_MODEL) for b in SMOKE_BATCHES for k in SMOKE_DRAFTS]
    mtp_presets = {name: spec for name, spec in config.presets.items() if spec.get("num_nextn_predict_layers")}
    vocabs = harness.presets_by(mtp_presets, "vocab_size")
    return [(b, k, vocab, models) for vocab, models in vocabs.items() for b in BATCHES for k in DRAFTS]


# ---------------------------------------------------------------------------------------------
# Implementations: verify(draft [B, K] int64, logits [B, K+1, V], temperature, draft_probs or None)
# -> (tokens [B, K+1], num_accepted [B]).


def _thinkfuse_verify(draft, logits, temperature, draft_probs, *, backend, num_splits=None):
    return thinkfuse.ops.mtp_verify(draft, logits, temperature=temperature, draft_probs=draft_probs,
                                    backend=backend, num_splits=num_splits)


def _emit(draft, accepted, final):
    """The accepted prefix of the drafts, then ``final[:, n]``, then -1 (all tensor ops)."""
    batch, k = draft.shape
    num_accepted = accepted.long().cumprod(dim=1).sum(dim=1)
    cols = torch.arange(k + 1, device=draft.device)[None, :]
    padded = torch.cat([draft, draft.new_full((batch, 1), -1)], dim=1)
    tokens = torch.where(cols < num_accepted[:, None], padded, torch.full_like(padded, -1))
    final_token = final.gather(1, num_accepted[:, None])
    return torch.where(cols == num_accepted[:, None], final_token, tokens), num_accepted


def vllm_style_verify(draft, logits, temperature, draft_probs):
    batch, k = draft.shape
    vocab = logits.shape[-1]
    if temperature == 0:
        target_argmax = logits.argmax(dim=-1)  # [B, K+1]
        return _emit(draft, draft == target_argmax[:, :k], target_argmax)
    q = torch.softmax(logits.float() / temperature, dim=-1)  # [B, K+1, V]
    q_draft = q[:, :k].gather(-1, draft.unsqueeze(-1)).squeeze(-1)
    if draft_probs is None:  # deterministic draft: p = onehot(draft)
        p_draft = torch.ones_like(q_draft)
        residual = q[:, :k].scatter(-1, draft.unsqueeze(-1), 0.0)
    else:
        p = draft_probs.float()
        p_draft = p.gather(-1, draft.unsqueeze(-1)).squeeze(-1)
        residual = (q[:, :k] - p).clamp_min_(0.0)
    uniforms = torch.rand(batch, k, device=logits.device)
    accepted = uniforms * p_draft < q_draft
    recovered = torch.multinomial(residual.reshape(batch * k, vocab), 1).view(batch, k)
    bonus = torch.multinomial(q[:, k], 1)  # [B, 1]
    return _emit(draft, accepted, torch.cat([recovered, bonus], dim=1))


def _flashinfer_function(config: Config, variant: str):
    function, missing = harness.optional_attr("flashinfer.sampling", "chain_speculative_sampling")
    if missing is None and config.device.type != "cuda":
        missing = "FlashInfer runs only on CUDA tensors (smoke mode is CPU)"
    if missing is None and variant == GREEDY:
        missing = "FlashInfer's chain_speculative_sampling samples; it has no greedy (temperature 0) mode"
    return function, missing


def _flashinfer_verify(draft, logits, temperature, draft_probs, *, function):
    batch, k = draft.shape
    target_probs = torch.softmax(logits.float() / temperature, dim=-1)
    if draft_probs is None:  # FlashInfer needs probabilities: a one-hot for a deterministic draft
        draft_probs = torch.zeros(batch, k, logits.shape[-1], device=logits.device, dtype=torch.float32)
        draft_probs.scatter_(-1, draft.unsqueeze(-1), 1.0)
    kwargs = {"draft_probs": draft_probs, "draft_token_ids": draft.to(torch.int32), "target_probs": target_probs}
    if "uniform_samples" in inspect.signature(function).parameters:  # FlashInfer < 0.2 takes them
        kwargs["uniform_samples"] = torch.rand(batch, k + 1, device=logits.device)
    tokens, num_accepted = function(**kwargs)[:2]
    return tokens, num_accepted


def _implementations(config: Config, variant: str):
    """(implementation name, verify function, why missing) in table order."""
    from thinkfuse.backend import cuda_has_op

    impls = []
    for name, backend, missing in harness.thinkfuse_impls(config):
        if missing is None and backend == "cuda" and not cuda_has_op(CUDA_OP):
            missing = f"this build of the CUDA extension has no {CUDA_OP} kernel"
        impls.append((name, functools.partial(_thinkfuse_verify, backend=backend), missing))
        if backend == "cuda":  # the one-block-per-row path beside the default split, as its own row
            impls.append((CUDA_ROW_BLOCK, functools.partial(_thinkfuse_verify, backend=backend, num_splits=1),
                          missing))
    impls.append((VLLM, vllm_style_verify, None))
    function, missing = _flashinfer_function(config, variant)
    impls.append((FLASHINFER, functools.partial(_flashinfer_verify, function=function), missing))
    return impls


# ---------------------------------------------------------------------------------------------
# Inputs


def _build(verify, batch: int, k: int, vocab: int, temperature: float, with_probs: bool,
           config: Config) -> Workload:
    device = config.device
    logits = 2.0 * torch.randn(batch, k + 1, vocab, device=device, dtype=config.dtype)
    draft = logits[:, :k].argmax(dim=-1)  # int64 [B, K]
    draft_probs: Optional[torch.Tensor] = None
    if with_probs:
        draft_probs = torch.softmax(torch.randn(batch, k, vocab, device=device, dtype=torch.float32), dim=-1)
        draft_probs = draft_probs.to(DRAFT_PROBS_DTYPE)
    return Workload(forward=lambda: verify(draft, logits, temperature, draft_probs))
