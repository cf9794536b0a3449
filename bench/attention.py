"""Attention cases: ``thinkfuse.ops.flash_attention`` (prefill / training, padded and packed) and
``thinkfuse.ops.decode_attention`` (serving) against PyTorch SDPA, flash-attn, FlashInfer and
transformers' eager attention.

Head shapes are the distinct ``(num_attention_heads, num_key_value_heads, head_dim)`` triples of
the model presets (the model column names every preset sharing one). Inputs are random, in the
run's dtype (bf16 on a GPU), default softmax scale ``1/sqrt(D)``, no sliding window.

Variants:
- ``flash-causal`` / ``flash-noncausal``: q ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]`` for S in
  1024..16384 with ``B = 16384 // S`` (16k tokens per batch). Square, so the causal mask is the
  plain lower triangle.
- ``varlen``: one packed batch of 16384 tokens, ``[total, H, D]`` with int32 ``cu_seqlens`` (one
  8192-token sequence and short ones of seeded random lengths, see ``varlen_lengths``), causal.
- ``decode``: q ``[B, Sq, Hq, D]`` (Sq 1: decode; Sq 4: speculative verify, causal among the 4)
  over full KV caches ``[B, cache_len, Hkv, D]`` (``cache_seqlens = cache_len``, the query tokens
  included). Forward only. Besides the presets' head shapes, a synthetic group-8 shape (32 query
  / 4 kv heads, D 128) when no preset has GQA group 8.

Implementations (each timed as a user calls it, from the tensors to the attention output):
- ``thinkfuse-cuda-sm90`` (dense and varlen): the Hopper kernels (wgmma + TMA) called directly,
  ``flash_attention_fwd_sm90`` and in fwd+bwd rows ``flash_attention_bwd_sm90``: the kernels
  alone, where ``thinkfuse-cuda`` is the op's own choice for the shape.
- ``thinkfuse-<backend>``: the torch ops ``flash_attention(q, k, v, causal=..., [cu_seqlens_*,
  max_seqlen_*,] backend=...)`` / ``decode_attention(q, k_cache, v_cache, cache_seqlens,
  backend=...)``. The cuda rows are missing until the extension has the kernels. The torch
  backend is not benchmarked: it is the float32 reference (hf-eager plays the unfused role).
- ``sdpa-flash`` / ``sdpa-cudnn`` / ``sdpa-efficient`` (flash variants): ``F.scaled_dot_product_
  attention`` on the ``[B, H, S, D]`` transposed views (as transformers' attention modules pass
  them) inside ``sdpa_kernel(<that backend>)``, ``is_causal`` for causal, ``enable_gqa=True``.
  SDPA's efficient kernel has no GQA, so that row expands k/v to Hq heads inside the timed call
  (transformers' ``repeat_kv``, what its sdpa path does when GQA is not supported).
- ``flash-attn``: ``flash_attn_func`` / ``flash_attn_varlen_func`` / ``flash_attn_with_kvcache``
  (causal masks bottom-right aligned, as thinkfuse's).
- ``hf-eager`` (flash variants, S <= 4096 only: it materialises the ``[B, Hq, S, S]`` scores):
  ``transformers.models.qwen2.modeling_qwen2.eager_attention_forward`` with an additive causal
  mask built once outside the timing (a model builds it once per forward for all layers).
- ``sdpa`` (decode): ``F.scaled_dot_product_attention(..., enable_gqa=True)`` with PyTorch's
  default backend choice, caches held in the ``[B, Hkv, S, D]`` layout of transformers' KV cache
  (converted once, untimed); Sq > 1 uses ``causal_lower_right`` (bottom-right causal).
- ``flashinfer`` (decode, batch 1 only): ``single_decode_with_kv_cache`` (Sq 1) or
  ``single_prefill_with_kv_cache(causal=True)`` (Sq > 1), NHD layout; batched rows are missing
  (FlashInfer's batch API needs a paged KV cache and a planning step).

In fwd+bwd rows the output gets a random gradient and gradients are taken for q, k and v
(allocated once per case, outside the timing).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import thinkfuse
from bench import harness
from bench.harness import FWD, FWD_BWD, HF_EAGER, Case, Config, Workload

OP = "attention"
FLASH_CAUSAL, FLASH_NONCAUSAL, VARLEN, DECODE = "flash-causal", "flash-noncausal", "varlen", "decode"
SDPA, SDPA_FLASH, SDPA_CUDNN, SDPA_EFFICIENT = "sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient"
FLASH_ATTN, FLASHINFER = "flash-attn", "flashinfer"
# (row name, torch.nn.attention.SDPBackend member, expand k/v to Hq heads: the kernel has no GQA)
SDPA_BACKENDS = ((SDPA_FLASH, "FLASH_ATTENTION", False), (SDPA_CUDNN, "CUDNN_ATTENTION", False),
                 (SDPA_EFFICIENT, "EFFICIENT_ATTENTION", True))

TOKENS = 16384  # tokens per batch of the flash and varlen variants
SEQLENS = (1024, 2048, 4096, 8192, 16384)
VARLEN_LONGEST = 8192
VARLEN_SHORT = (32, 512)  # inclusive range of the short sequences' lengths
VARLEN_SEED = 0
DECODE_BATCH_CACHE = ((1, 8192), (16, 8192), (64, 8192), (1, 32768))  # (batch, cache_len)
DECODE_Q_LENS = (1, 4)  # 1: decode; 4: speculative verify of 3 drafts + 1
HF_EAGER_MAX_SEQLEN = 4096  # beyond, the [B, Hq, S, S] scores (x several copies) crowd 80 GB
BACKWARD_FLOPS_RATIO = 2.5  # backward = 2.5 x forward matmul FLOPs (dQ, dK, dV, dP + recomputed S)
GQA8 = 8

SMOKE_TOKENS = 32
SMOKE_SEQLENS = (16, 33)  # 33: a partial key/query block
SMOKE_VARLEN_LENGTHS = (33, 16, 9, 1)
SMOKE_DECODE_BATCH_CACHE = ((1, 40), (2, 24))
SMOKE_MODEL = "tiny"

CUDA_FLASH_OPS = {FWD: ("flash_attention_fwd",), FWD_BWD: ("flash_attention_fwd", "flash_attention_bwd")}
CUDA_DECODE_OP = "decode_attention"
SM90_OPS = {FWD: ("flash_attention_fwd_sm90",), FWD_BWD: ("flash_attention_fwd_sm90", "flash_attention_bwd_sm90")}
SM90_IMPL = "thinkfuse-cuda-sm90"  # dense forward rows, dense and varlen fwd+bwd rows

BYTES_COUNTED = (
    "flash and varlen rows count FLOPs, not bytes: the two attention matmuls, forward "
    "4*B*Hq*Sq*Sk*D, halved when causal (square, so half the score matrix: S*S/2 pairs, flash-attn's "
    "convention, S/2 fewer than the S*(S+1)/2 unmasked ones, so never an overcount; varlen: the sum "
    "of 2*Hq*L*L*D over sequences of length L); fwd+bwd adds a backward of 2.5x the forward "
    "(3.5x in all). The recomputation some kernels do is not counted, nor are softmax FLOPs. "
    "decode rows count bytes: the K and V caches read once (2*B*cache_len*Hkv*D elements, all "
    "cache_len positions valid), plus q read and the output written (2*B*Sq*Hq*D), in the run's "
    "dtype; not counted: cache_seqlens (B int32) and split-K partial results."
)


@dataclass(frozen=True)
class Heads:
    """One (Hq, Hkv, D) head shape and the comma-joined presets that have it."""

    q_heads: int
    kv_heads: int
    head_dim: int
    models: str

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    def as_shape(self) -> dict[str, int]:
        return {"q_heads": self.q_heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim}


SMOKE_HEADS = Heads(4, 2, 64, SMOKE_MODEL)
SMOKE_GQA8_HEADS = Heads(8, 1, 64, f"{SMOKE_MODEL}-gqa8")
SYNTHETIC_GQA8_HEADS = Heads(32, 4, 128, "synthetic-gqa8")


@dataclass(frozen=True)
class DenseProblem:
    batch: int
    seqlen: int
    heads: Heads
    causal: bool


@dataclass(frozen=True)
class VarlenProblem:
    lengths: tuple[int, ...]
    heads: Heads


@dataclass(frozen=True)
class DecodeProblem:
    batch: int
    cache_len: int
    q_len: int
    heads: Heads


def cases(config: Config) -> list[Case]:
    # The rows the goals are judged on come first (causal training attention, then decode), so a
    # run stopped by its time limit has measured them.
    flash = _flash_cases(config)
    causal = [case for case in flash if case.variant == FLASH_CAUSAL]
    noncausal = [case for case in flash if case.variant != FLASH_CAUSAL]
    return causal + _decode_cases(config) + _varlen_cases(config) + noncausal


# ---------------------------------------------------------------------------------------------
# What is counted


def flops(batch: int, seqlen: int, q_heads: int, head_dim: int, causal: bool, mode: str) -> int:
    """Matmul FLOPs of square attention (see BYTES_COUNTED)."""
    forward = 4 * batch * q_heads * seqlen * seqlen * head_dim
    if causal:
        forward //= 2
    return _with_backward(forward, mode)


def varlen_flops(lengths, q_heads: int, head_dim: int, mode: str) -> int:
    """Causal matmul FLOPs summed over the packed sequences (see BYTES_COUNTED)."""
    forward = sum(flops(1, length, q_heads, head_dim, True, FWD) for length in lengths)
    return _with_backward(forward, mode)


def _with_backward(forward: int, mode: str) -> int:
    return int(forward * (1 + BACKWARD_FLOPS_RATIO)) if mode == FWD_BWD else forward


def decode_bytes(problem: DecodeProblem, dtype: torch.dtype) -> int:
    """K and V caches read, q read and output written (see BYTES_COUNTED)."""
    element = torch.empty((), dtype=dtype).element_size()
    heads = problem.heads
    cache = 2 * problem.batch * problem.cache_len * heads.kv_heads * heads.head_dim
    query_and_out = 2 * problem.batch * problem.q_len * heads.q_heads * heads.head_dim
    return (cache + query_and_out) * element


def varlen_lengths(total: int = TOKENS, longest: int = VARLEN_LONGEST, short=VARLEN_SHORT,
                   seed: int = VARLEN_SEED) -> tuple[int, ...]:
    """One ``longest`` sequence and short ones of seeded random lengths, ``total`` tokens in all,
    in a seeded random order."""
    rng = random.Random(seed)
    lengths, left = [longest], total - longest
    while left > 0:
        length = min(rng.randint(*short), left)
        lengths.append(length)
        left -= length
    rng.shuffle(lengths)
    return tuple(lengths)


# ---------------------------------------------------------------------------------------------
# Shapes


def head_shapes(config: Config) -> list[Heads]:
    """The distinct (Hq, Hkv, D) of the presets, each with the names sharing it."""
    if config.smoke:
        return [SMOKE_HEADS]
    groups: dict[tuple[int, int, int], list[str]] = {}
    for name, spec in config.presets.items():
        key = (spec["num_attention_heads"], spec["num_key_value_heads"], spec["head_dim"])
        groups.setdefault(key, []).append(name)
    return [Heads(*key, models=",".join(names)) for key, names in sorted(groups.items())]


def decode_head_shapes(config: Config) -> list[Heads]:
    """The presets' head shapes, plus a group-8 one when no preset has it (serving kernels
    split work by kv head, so a large group is a case of its own)."""
    shapes = head_shapes(config)
    if config.smoke:
        return shapes + [SMOKE_GQA8_HEADS]
    if not any(heads.group == GQA8 for heads in shapes):
        shapes.append(SYNTHETIC_GQA8_HEADS)
    return shapes


def _dense_problems(config: Config) -> list[DenseProblem]:
    tokens, seqlens = (SMOKE_TOKENS, SMOKE_SEQLENS) if config.smoke else (TOKENS, SEQLENS)
    return [
        DenseProblem(max(1, tokens // seqlen), seqlen, heads, causal)
        for heads in head_shapes(config) for causal in (True, False) for seqlen in seqlens
    ]


def _varlen_problems(config: Config) -> list[VarlenProblem]:
    lengths = SMOKE_VARLEN_LENGTHS if config.smoke else varlen_lengths()
    return [VarlenProblem(lengths, heads) for heads in head_shapes(config)]


def _decode_problems(config: Config) -> list[DecodeProblem]:
    batch_cache = SMOKE_DECODE_BATCH_CACHE if config.smoke else DECODE_BATCH_CACHE
    return [
        DecodeProblem(batch, cache_len, q_len, heads)
        for heads in decode_head_shapes(config) for batch, cache_len in batch_cache for q_len in DECODE_Q_LENS
    ]


# ---------------------------------------------------------------------------------------------
# Cases


def _flash_cases(config: Config) -> list[Case]:
    out = []
    for problem in _dense_problems(config):
        shape = {"batch": problem.batch, "seqlen": problem.seqlen, **problem.heads.as_shape()}
        for mode in config.modes:
            for impl, make_forward, missing in _flash_impls(config, problem, mode):
                build = functools.partial(_build_dense, make_forward, problem, mode, config)
                out.append(Case(
                    op=OP, impl=impl, variant=FLASH_CAUSAL if problem.causal else FLASH_NONCAUSAL,
                    mode=mode, shape=shape, model=problem.heads.models, dtype=config.dtype,
                    flops=flops(problem.batch, problem.seqlen, problem.heads.q_heads, problem.heads.head_dim,
                                problem.causal, mode),
                    build=None if missing else build, missing=missing,
                ))
    return out


def _varlen_cases(config: Config) -> list[Case]:
    out = []
    for problem in _varlen_problems(config):
        shape = {"tokens": sum(problem.lengths), "seqs": len(problem.lengths),
                 "max_seqlen": max(problem.lengths), **problem.heads.as_shape()}
        for mode in config.modes:
            for impl, make_forward, missing in _varlen_impls(config, mode):
                build = functools.partial(_build_varlen, make_forward, problem, mode, config)
                out.append(Case(
                    op=OP, impl=impl, variant=VARLEN, mode=mode, shape=shape, model=problem.heads.models,
                    dtype=config.dtype,
                    flops=varlen_flops(problem.lengths, problem.heads.q_heads, problem.heads.head_dim, mode),
                    build=None if missing else build, missing=missing,
                ))
    return out


def _decode_cases(config: Config) -> list[Case]:
    if FWD not in config.modes:
        return []  # decode_attention is not differentiable: forward rows only
    out = []
    for problem in _decode_problems(config):
        shape = {"batch": problem.batch, "cache_len": problem.cache_len, "q_len": problem.q_len,
                 **problem.heads.as_shape()}
        for impl, prepare, missing in _decode_impls(config, problem):
            build = functools.partial(_build_decode, prepare, problem, config)
            out.append(Case(
                op=OP, impl=impl, variant=DECODE, mode=FWD, shape=shape, model=problem.heads.models,
                dtype=config.dtype, bytes_moved=decode_bytes(problem, config.dtype),
                build=None if missing else build, missing=missing,
                cuda_graph=True,  # a decode step runs captured; host launch cost is not the op's
            ))
    return out


# ---------------------------------------------------------------------------------------------
# Why an implementation cannot run


def _thinkfuse_impls(config: Config, cuda_ops) -> list[tuple[str, str, Optional[str]]]:
    """(name, backend, why missing) of the cuda and triton backends; the cuda one is missing
    while the extension lacks any of ``cuda_ops``."""
    from thinkfuse.backend import cuda_has_op

    out = []
    for name, backend, missing in harness.thinkfuse_impls(config):
        if backend == "torch":
            continue  # the float32 reference, not a contender (see the module docstring)
        absent = [op for op in cuda_ops if not cuda_has_op(op)] if backend == "cuda" else []
        if missing is None and absent:
            missing = f"this build of the CUDA extension has no {', '.join(absent)} kernel"
        out.append((name, backend, missing))
    return out


def _cuda_only(config: Config, what: str) -> Optional[str]:
    if config.device.type != "cuda":
        return f"{what} runs only on CUDA tensors (smoke mode is CPU)"
    return None


def _optional_cuda_attr(config: Config, module: str, attr: str):
    function, missing = harness.optional_attr(module, attr)
    return function, missing or _cuda_only(config, module.split(".")[0])


# ---------------------------------------------------------------------------------------------
# flash variants. Each factory takes the problem and returns forward(q, k, v) on [B, S, H, D]
# tensors, returning the output as a [B, S, Hq, D] tensor (a view for the [B, H, S, D] APIs).


def _thinkfuse_dense(problem: DenseProblem, backend: str):
    return functools.partial(thinkfuse.ops.flash_attention, causal=problem.causal, backend=backend)


class _Sm90Attention(torch.autograd.Function):
    """The Hopper forward and backward kernels called directly (the ops route to the backward only
    once a GPU run has validated it). cu_seqlens None: the padded layout."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen: int, causal: bool):
        scale = q.shape[-1] ** -0.5
        out, lse = torch.ops.thinkfuse_C.flash_attention_fwd_sm90(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale, causal, 0)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale, causal, 0)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.thinkfuse_C.flash_attention_bwd_sm90(dout, q, k, v, out, lse, None, *ctx.args)
        return dq, dk, dv, None, None, None


def _thinkfuse_sm90_dense(problem: DenseProblem):
    return lambda q, k, v: _Sm90Attention.apply(q, k, v, None, q.shape[1], problem.causal)


def _thinkfuse_sm90_varlen(cu_seqlens, max_seqlen: int):
    return lambda q, k, v: _Sm90Attention.apply(q, k, v, cu_seqlens, max_seqlen, True)


def _sm90_missing(config: Config, mode: str) -> Optional[str]:
    from thinkfuse.backend import cuda_has_op

    if config.device.type != "cuda":
        return "runs only on CUDA tensors (smoke mode is CPU)"
    absent = [op for op in SM90_OPS[mode] if not cuda_has_op(op)]
    if absent:
        return f"this build of the CUDA extension has no {', '.join(absent)} kernel"
    if torch.cuda.get_device_capability(config.device) != (9, 0):
        return "needs a compute capability 9.0 GPU (H100/H200)"
    return None


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """transformers' ``repeat_kv``: ``[B, Hkv, S, D]`` -> ``[B, Hkv * group, S, D]`` (a copy)."""
    if group == 1:
        return x
    batch, kv_heads, seqlen, head_dim = x.shape
    return x[:, :, None].expand(batch, kv_heads, group, seqlen, head_dim).reshape(
        batch, kv_heads * group, seqlen, head_dim)


def _sdpa_dense(problem: DenseProblem, sdpa_backend_name: str, expand_kv: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa_backend = getattr(SDPBackend, sdpa_backend_name)
    group = problem.heads.group

    def forward(q, k, v):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if expand_kv:
            k, v = repeat_kv(k, group), repeat_kv(v, group)
        with sdpa_kernel(sdpa_backend):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=problem.causal, enable_gqa=not expand_kv)
        return out.transpose(1, 2)

    return forward


def _flash_attn_dense(problem: DenseProblem, function: Callable):
    return functools.partial(function, causal=problem.causal)


def _hf_eager_dense(problem: DenseProblem, function: Callable, config: Config):
    """transformers' eager attention: repeat_kv, matmul, + mask, float32 softmax, matmul."""
    module = SimpleNamespace(num_key_value_groups=problem.heads.group, training=False)
    mask = _additive_causal_mask(problem.seqlen, config) if problem.causal else None
    scale = problem.heads.head_dim ** -0.5

    def forward(q, k, v):
        out, _ = function(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scaling=scale)
        return out  # [B, S, Hq, D]

    return forward


def _additive_causal_mask(seqlen: int, config: Config) -> torch.Tensor:
    """The ``[1, 1, S, S]`` float mask transformers builds for eager attention (0 or dtype min)."""
    full = torch.full((seqlen, seqlen), torch.finfo(config.dtype).min, device=config.device, dtype=config.dtype)
    return full.triu(1)[None, None]


def _hf_eager_missing(problem: DenseProblem) -> Optional[str]:
    if problem.seqlen <= HF_EAGER_MAX_SEQLEN:
        return None
    scores = problem.batch * problem.heads.q_heads * problem.seqlen**2
    return (f"materialises the [B, Hq, S, S] scores ({scores * 2 / 2**30:.0f} GiB per bf16 copy, several "
            f"live at once); run up to S={HF_EAGER_MAX_SEQLEN} only")


def _flash_impls(config: Config, problem: DenseProblem, mode: str):
    """(implementation name, factory () -> forward(q, k, v), why missing) in table order."""
    impls = [(name, functools.partial(_thinkfuse_dense, problem, backend), missing)
             for name, backend, missing in _thinkfuse_impls(config, CUDA_FLASH_OPS[mode])]
    impls.append((SM90_IMPL, functools.partial(_thinkfuse_sm90_dense, problem), _sm90_missing(config, mode)))
    hf_eager, missing = harness.optional_attr("transformers.models.qwen2.modeling_qwen2", "eager_attention_forward")
    impls.append((HF_EAGER, functools.partial(_hf_eager_dense, problem, hf_eager, config),
                  missing or _hf_eager_missing(problem)))
    for name, sdpa_backend, expand_kv in SDPA_BACKENDS:
        impls.append((name, functools.partial(_sdpa_dense, problem, sdpa_backend, expand_kv),
                      _cuda_only(config, f"SDPA's {sdpa_backend} kernel")))
    flash_attn, missing = _optional_cuda_attr(config, "flash_attn", "flash_attn_func")
    impls.append((FLASH_ATTN, functools.partial(_flash_attn_dense, problem, flash_attn), missing))
    return impls


def _qkv(leading: tuple[int, ...], heads: Heads, mode: str, config: Config):
    """Random q ``[*leading, Hq, D]`` and k, v ``[*leading, Hkv, D]`` leaves."""
    needs_grad = mode == FWD_BWD

    def tensor(num_heads):
        return torch.randn(*leading, num_heads, heads.head_dim, device=config.device, dtype=config.dtype,
                           requires_grad=needs_grad)

    return tensor(heads.q_heads), tensor(heads.kv_heads), tensor(heads.kv_heads)


def _workload(forward: Callable, q, k, v, mode: str) -> Workload:
    workload = Workload(forward=lambda: forward(q, k, v))
    if mode == FWD_BWD:
        workload.inputs = (q, k, v)
        workload.grad_outputs = (torch.randn_like(q),)  # the output has q's shape
    return workload


def _build_dense(make_forward, problem: DenseProblem, mode: str, config: Config) -> Workload:
    forward = make_forward()
    q, k, v = _qkv((problem.batch, problem.seqlen), problem.heads, mode, config)
    return _workload(forward, q, k, v, mode)


# ---------------------------------------------------------------------------------------------
# varlen variant: factories (cu_seqlens, max_seqlen) -> forward(q, k, v) on [total, H, D].


def _thinkfuse_varlen(cu_seqlens, max_seqlen: int, backend: str):
    return functools.partial(thinkfuse.ops.flash_attention, causal=True, cu_seqlens_q=cu_seqlens,
                             cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
                             backend=backend)


def _flash_attn_varlen(cu_seqlens, max_seqlen: int, function: Callable):
    def forward(q, k, v):
        return function(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)

    return forward


def _varlen_impls(config: Config, mode: str):
    """(implementation name, factory (cu_seqlens, max_seqlen) -> forward, why missing)."""
    impls = [(name, functools.partial(_thinkfuse_varlen, backend=backend), missing)
             for name, backend, missing in _thinkfuse_impls(config, CUDA_FLASH_OPS[mode])]
    impls.append((SM90_IMPL, _thinkfuse_sm90_varlen, _sm90_missing(config, mode)))
    function, missing = _optional_cuda_attr(config, "flash_attn", "flash_attn_varlen_func")
    impls.append((FLASH_ATTN, functools.partial(_flash_attn_varlen, function=function), missing))
    return impls


def _cu_seqlens(lengths, device) -> torch.Tensor:
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return torch.tensor(offsets, device=device, dtype=torch.int32)


def _build_varlen(make_forward, problem: VarlenProblem, mode: str, config: Config) -> Workload:
    forward = make_forward(_cu_seqlens(problem.lengths, config.device), max(problem.lengths))
    q, k, v = _qkv((sum(problem.lengths),), problem.heads, mode, config)
    return _workload(forward, q, k, v, mode)


# ---------------------------------------------------------------------------------------------
# decode variant: factories (q [B, Sq, Hq, D], k_cache, v_cache [B, S, Hkv, D], cache_seqlens)
# -> forward(), doing any layout conversion once, outside the timing.


def _thinkfuse_decode(q, k_cache, v_cache, cache_seqlens, backend: str):
    return lambda: thinkfuse.ops.decode_attention(q, k_cache, v_cache, cache_seqlens, backend=backend)


def _sdpa_decode(q, k_cache, v_cache, cache_seqlens):
    from torch.nn.attention.bias import causal_lower_right

    # transformers' KV cache layout [B, Hkv, S, D]; the k_cache/v_cache arguments are dropped.
    k_hf, v_hf = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()
    q_len, cache_len = q.shape[1], k_cache.shape[1]
    # One query sees every key; several are causal among themselves, aligned bottom-right.
    mask = causal_lower_right(q_len, cache_len) if q_len > 1 else None

    def forward():
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k_hf, v_hf, attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2)

    return forward


def _flash_attn_decode(q, k_cache, v_cache, cache_seqlens, function: Callable):
    return lambda: function(q, k_cache, v_cache, cache_seqlens=cache_seqlens, causal=True)


def _flashinfer_decode(q, k_cache, v_cache, cache_seqlens, decode: Callable, prefill: Callable):
    """Batch 1: FlashInfer's single-request kernels on the NHD ``[S, Hkv, D]`` cache."""
    k0, v0 = k_cache[0], v_cache[0]
    if q.shape[1] == 1:
        q0 = q[0, 0]  # [Hq, D]
        return lambda: decode(q0, k0, v0, kv_layout="NHD")
    q0 = q[0]  # [Sq, Hq, D]
    return lambda: prefill(q0, k0, v0, causal=True, kv_layout="NHD")


def _flashinfer_missing(config: Config, problem: DecodeProblem):
    decode, missing = _optional_cuda_attr(config, "flashinfer", "single_decode_with_kv_cache")
    prefill, prefill_missing = harness.optional_attr("flashinfer", "single_prefill_with_kv_cache")
    missing = missing or (prefill_missing if problem.q_len > 1 else None)
    if missing is None and problem.batch != 1:
        missing = ("only batch 1 is wired up (single_decode/prefill_with_kv_cache); FlashInfer's batch "
                   "API needs a paged KV cache and a plan step")
    return decode, prefill, missing


def _decode_impls(config: Config, problem: DecodeProblem):
    """(implementation name, factory (q, k_cache, v_cache, cache_seqlens) -> forward(), why
    missing) in table order."""
    impls = [(name, functools.partial(_thinkfuse_decode, backend=backend), missing)
             for name, backend, missing in _thinkfuse_impls(config, (CUDA_DECODE_OP,))]
    impls.append((SDPA, _sdpa_decode, None))
    flash_attn, missing = _optional_cuda_attr(config, "flash_attn", "flash_attn_with_kvcache")
    impls.append((FLASH_ATTN, functools.partial(_flash_attn_decode, function=flash_attn), missing))
    decode, prefill, missing = _flashinfer_missing(config, problem)
    impls.append((FLASHINFER, functools.partial(_flashinfer_decode, decode=decode, prefill=prefill), missing))
    return impls


def _build_decode(prepare, problem: DecodeProblem, config: Config) -> Workload:
    heads = problem.heads
    q = torch.randn(problem.batch, problem.q_len, heads.q_heads, heads.head_dim, device=config.device,
                    dtype=config.dtype)
    k_cache, v_cache = (
        torch.randn(problem.batch, problem.cache_len, heads.kv_heads, heads.head_dim, device=config.device,
                    dtype=config.dtype)
        for _ in range(2)
    )
    cache_seqlens = torch.full((problem.batch,), problem.cache_len, device=config.device, dtype=torch.int32)
    return Workload(forward=prepare(q, k_cache, v_cache, cache_seqlens))
