"""Per-token log-prob cases: ``thinkfuse.ops.token_logprobs`` on full logits and
``thinkfuse.ops.fused_linear_token_logprobs`` from the lm_head's input, against what RL trainers
do today.

Variants:
- ``token_logprobs``: T tokens x V vocab logits (each distinct ``vocab_size`` of the model
  presets) in the run's dtype, laid out ``[T / SEQ_TOKENS, SEQ_TOKENS, V]`` (sequences of
  ``SEQ_TOKENS`` completion tokens, as a GRPO batch holds them), token ids int64.
  - ``thinkfuse-<backend>``: ``token_logprobs(logits, token_ids)``.
  - ``trl-selective-log-softmax``: TRL's ``selective_log_softmax`` for bf16 logits, written
    inline: per sequence (row of the batch), ``log_softmax`` in the logits' dtype, then gather.
    (Recent TRL versions may dispatch to their own Triton kernel instead; this is the torch path
    that GRPO trainers without it run.)
  - ``torch-compile``: ``torch.compile`` of that function.
- ``fused_linear``: T tokens x (hidden H, vocab V) of each distinct pair in the presets; hidden
  ``[T, H]`` and lm_head weight ``[V, H]`` in the run's dtype, no bias, temperature 1.
  - ``thinkfuse-<backend>``: ``fused_linear_token_logprobs(hidden, weight, token_ids)``.
  - ``thinkfuse-<backend>-one-pass`` (fwd+bwd only): the one-pass form of GRPOLoss and
    causal_lm_loss, ``sum(logprobs * g)`` with the lm_head gradients formed in the forward by
    ``fused_linear_logprobs_with_grads`` (3 matmuls per chunk; its backward only scales them).
  - ``materialised``: ``hidden @ weight.T`` (the full ``[T, V]`` logits), then the TRL-style
    per-sequence log_softmax + gather above.
  - ``verl-chunked``: after verl's ``FusedLinearForPPO``: 512-token chunks, each computing its
    logits, float32 ``log_softmax`` and gather; the backward recomputes each chunk's logits and
    accumulates d_hidden / d_weight (log-probs only, no entropy).
  - ``liger``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss(reduction="sum")`` (= minus the
    summed log-probs: the same lm_head + log-softmax + gather without the GRPO loss terms that
    ``LigerFusedLinearGRPOLoss`` adds). Liger computes the gradients inside its forward when the
    inputs require grad, so its fwd+bwd row puts the backward's work in the forward call.

Every implementation returns float32 log-probs (the TRL-style ones are cast, ``T`` elements).
In fwd+bwd rows the log-probs get a random float32 gradient (Liger: its scalar loss gets 1);
gradients are taken for the logits, or for hidden and weight.

The materialised baseline at 16384 x 152064 bf16 holds ~5 GB of logits plus their log-softmax
and gradient; an out-of-memory error makes that row an ``error`` whose reason starts with
``out of memory``, the cache is emptied, and the run goes on.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import thinkfuse
from bench import harness
from bench.harness import FWD_BWD, LIGER, TORCH_COMPILE, Case, Config, Workload

OP = "logprobs"
TOKEN_LOGPROBS, FUSED_LINEAR = "token_logprobs", "fused_linear"
TRL, MATERIALISED, VERL = "trl-selective-log-softmax", "materialised", "verl-chunked"
TOKENS = (4096, 16384)
SEQ_TOKENS = 1024  # completion tokens per sequence: the TRL-style loop runs once per sequence
VERL_CHUNK = 512
ONE_PASS_SUFFIX = "-one-pass"  # fwd+bwd rows only: its forward is the fused op's

SMOKE_TOKENS = 8
SMOKE_SEQ_TOKENS = 4  # two sequences, so the per-sequence loop runs more than once
SMOKE_VOCAB = 1000
SMOKE_HIDDEN = 64
SMOKE_VERL_CHUNK = 3  # chunks of 3, 3, 2: exercises the chunk loop and a short last chunk
SMOKE_MODEL = "tiny"

# The fused op's cuda backend runs the token_logprobs kernels on chunks of cuBLAS logits.
CUDA_OPS = {TOKEN_LOGPROBS: "token_logprobs_fwd", FUSED_LINEAR: "token_logprobs_fwd"}
# fused_linear: 4096 tokens for every (hidden, vocab) pair; the longer GRPO batches (where the
# logits wall is) only for the smallest and the largest hidden size of the presets.
FUSED_TOKENS = 4096
FUSED_LONG_TOKENS = (16384, 32768)
LIGER_FLCE = ("liger_kernel.transformers.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyLoss")

BYTES_COUNTED = (
    "token_logprobs only: minimal DRAM traffic over the T x V logits in the run's dtype. "
    "fwd: read the logits once (T*V elements). fwd+bwd adds the backward: read the logits again "
    "and write d logits (2*T*V), 3*T*V in all. Not counted: the O(T) vectors (token ids, "
    "log-probs, saved logsumexp, their gradients). fused_linear rows count FLOPs instead: "
    "2*T*H*V for the forward's logits matmul, fwd+bwd 3x that (the backward's d_hidden and "
    "d_weight matmuls; the recomputation of logits that fused/chunked backwards do is not counted)."
)


def cases(config: Config) -> list[Case]:
    out = []
    for tokens, vocab, model in _token_shapes(config):
        for mode in config.modes:
            for impl, forward_factory, compiled, missing in _token_impls(config):
                build = functools.partial(_build_token, forward_factory, compiled, tokens, vocab, mode, config)
                out.append(Case(
                    op=OP, impl=impl, variant=TOKEN_LOGPROBS, mode=mode,
                    shape={"tokens": tokens, "vocab": vocab}, model=model, dtype=config.dtype,
                    bytes_moved=bytes_moved(tokens, vocab, mode, config.dtype),
                    build=None if missing else _oom_guard(build), missing=missing,
                ))
    for tokens, hidden, vocab, model in _fused_shapes(config):
        for mode in config.modes:
            for impl, forward_factory, missing in _fused_impls(config):
                if impl.endswith(ONE_PASS_SUFFIX) and mode != FWD_BWD:
                    continue
                build = functools.partial(_build_fused, forward_factory, tokens, hidden, vocab, mode, config)
                out.append(Case(
                    op=OP, impl=impl, variant=FUSED_LINEAR, mode=mode,
                    shape={"tokens": tokens, "hidden": hidden, "vocab": vocab}, model=model,
                    dtype=config.dtype, flops=flops(tokens, hidden, vocab, mode),
                    build=None if missing else _oom_guard(build), missing=missing,
                ))
    return out


def bytes_moved(tokens: int, vocab: int, mode: str, dtype: torch.dtype) -> int:
    """token_logprobs: bytes of the logits passes (see BYTES_COUNTED)."""
    element = torch.empty((), dtype=dtype).element_size()
    passes = 3 if mode == FWD_BWD else 1
    return passes * tokens * vocab * element


def flops(tokens: int, hidden: int, vocab: int, mode: str) -> int:
    """fused_linear: matmul FLOPs (see BYTES_COUNTED)."""
    forward = 2 * tokens * hidden * vocab
    return 3 * forward if mode == FWD_BWD else forward


def _token_shapes(config: Config) -> list[tuple[int, int, str]]:
    """(tokens, vocab, model names) of the token_logprobs cases."""
    if config.smoke:
        return [(SMOKE_TOKENS, SMOKE_VOCAB, SMOKE_MODEL)]
    vocabs = harness.presets_by(config.presets, "vocab_size")
    return [(tokens, vocab, models) for tokens in TOKENS for vocab, models in vocabs.items()]


def _fused_shapes(config: Config) -> list[tuple[int, int, int, str]]:
    """(tokens, hidden, vocab, model names) of the fused_linear cases."""
    if config.smoke:
        return [(SMOKE_TOKENS, SMOKE_HIDDEN, SMOKE_VOCAB, SMOKE_MODEL)]
    groups: dict[tuple[int, int], list[str]] = {}
    for name, spec in config.presets.items():
        groups.setdefault((spec["hidden_size"], spec["vocab_size"]), []).append(name)
    pairs = sorted(groups)
    shapes = [(FUSED_TOKENS, hidden, vocab, ",".join(groups[hidden, vocab])) for hidden, vocab in pairs]
    for hidden, vocab in dict.fromkeys((pairs[0], pairs[-1])):
        shapes += [(tokens, hidden, vocab, ",".join(groups[hidden, vocab])) for tokens in FUSED_LONG_TOKENS]
    return shapes


def _seq_tokens(config: Config) -> int:
    return SMOKE_SEQ_TOKENS if config.smoke else SEQ_TOKENS


# ---------------------------------------------------------------------------------------------
# Out of memory: a row status, not a crash


@dataclass
class _OomGuardedWorkload(Workload):
    def runner(self, mode: str):
        return _oom_guard(super().runner(mode))


def _oom_guard(fn):
    """``fn``, with CUDA out-of-memory turned into a short RuntimeError (the harness makes it the
    row's status) after the failed call's tensors are released and the cache emptied."""

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        message = None
        try:
            return fn(*args, **kwargs)
        except torch.cuda.OutOfMemoryError as exc:
            message = str(exc).splitlines()[0][:200]
        # Outside the except block: the exception's frames (and their tensors) are gone.
        torch.cuda.empty_cache()
        raise RuntimeError(f"out of memory: {message}")

    return guarded


# ---------------------------------------------------------------------------------------------
# Baselines


def trl_selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's ``selective_log_softmax`` for bf16/fp16 logits ``[B, T, V]``: one sequence at a
    time (to bound the peak), log_softmax in the logits' dtype, then gather."""
    per_token_logps = []
    for row_logits, row_labels in zip(logits, index):
        row_logps = F.log_softmax(row_logits, dim=-1)
        per_token_logps.append(row_logps.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(per_token_logps)


class TrlLogprobs(nn.Module):
    def forward(self, logits, token_ids):
        return trl_selective_log_softmax(logits, token_ids).float()


class ThinkfuseLogprobs(nn.Module):
    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend

    def forward(self, logits, token_ids):
        return thinkfuse.ops.token_logprobs(logits, token_ids, backend=self.backend)


class _VerlChunkedLogprobs(torch.autograd.Function):
    """After verl's ``FusedLinearForPPO``: chunks of tokens, logits recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, token_ids, chunk: int):
        out = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            stop = start + chunk
            logits = (hidden[start:stop] @ weight.t()).float()
            ids = token_ids[start:stop].unsqueeze(-1)
            out[start:stop] = logits.log_softmax(dim=-1).gather(-1, ids).squeeze(-1)
        ctx.save_for_backward(hidden, weight, token_ids)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, token_ids = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        for start in range(0, hidden.shape[0], ctx.chunk):
            stop = start + ctx.chunk
            h, g = hidden[start:stop], grad[start:stop].unsqueeze(-1)
            probs = (h @ weight.t()).float().softmax(dim=-1)
            # d logprob / d logits = onehot - softmax
            grad_logits = probs.mul_(-g).scatter_add_(-1, token_ids[start:stop].unsqueeze(-1), g)
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden[start:stop] = grad_logits @ weight
            grad_weight.addmm_(grad_logits.t(), h)
        return grad_hidden, grad_weight, None, None


# Fused-linear implementations: factories (config) -> forward(hidden, weight, token_ids).


def _thinkfuse_fused(config: Config, backend: str):
    return functools.partial(thinkfuse.ops.fused_linear_token_logprobs, backend=backend)


def _thinkfuse_one_pass(config: Config, backend: str):
    """The one-pass form GRPOLoss and causal_lm_loss use: the scalar ``sum(logprobs * g)`` for a
    fixed random ``g`` (the fwd+bwd rows' gradient), its lm_head gradients formed in the forward
    (3 matmuls per chunk instead of 4); its backward only scales them."""
    from thinkfuse.ops.logprobs import fused_linear_logprobs_with_grads
    from thinkfuse.ops.one_pass import one_pass_loss

    fixed = {}

    def forward(hidden, weight, token_ids):
        if "g" not in fixed:
            fixed["g"] = torch.randn(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        g = fixed["g"]

        def compute(weight_grad):
            logprobs, d_hidden, d_weight, d_bias = fused_linear_logprobs_with_grads(
                hidden.detach(), weight.detach(), token_ids, lambda _lp, start, end: g[start:end],
                weight_grad=weight_grad, backend=backend)
            return (logprobs * g).sum(), d_hidden, d_weight, d_bias

        return one_pass_loss(hidden, weight, None, compute)

    return forward


def _materialised(config: Config):
    seq = _seq_tokens(config)

    def forward(hidden, weight, token_ids):
        logits = hidden @ weight.t()
        per_sequence = trl_selective_log_softmax(logits.view(-1, seq, logits.shape[-1]), token_ids.view(-1, seq))
        return per_sequence.float().view(-1)

    return forward


def _verl_chunked(config: Config):
    chunk = SMOKE_VERL_CHUNK if config.smoke else VERL_CHUNK
    return lambda hidden, weight, token_ids: _VerlChunkedLogprobs.apply(hidden, weight, token_ids, chunk)


def _liger(liger_class, config: Config):
    loss_fn = liger_class(reduction="sum")
    # Liger's signature is (lin_weight, _input, target); the scalar loss is cast for the gradient.
    return lambda hidden, weight, token_ids: loss_fn(weight, hidden, token_ids).float()


# ---------------------------------------------------------------------------------------------
# Implementations


def _thinkfuse_impls(config: Config, cuda_op: str):
    """harness.thinkfuse_impls, with the cuda backend missing when the build lacks this op."""
    from thinkfuse.backend import cuda_has_op

    out = []
    for name, backend, missing in harness.thinkfuse_impls(config):
        if missing is None and backend == "cuda" and not cuda_has_op(cuda_op):
            missing = f"this build of the CUDA extension has no {cuda_op} kernel"
        out.append((name, backend, missing))
    return out


def _token_impls(config: Config):
    """(implementation name, module factory, compile it?, why missing) in table order."""
    impls = [(name, functools.partial(ThinkfuseLogprobs, backend), False, missing)
             for name, backend, missing in _thinkfuse_impls(config, CUDA_OPS[TOKEN_LOGPROBS])]
    impls.append((TRL, TrlLogprobs, False, None))
    impls.append((TORCH_COMPILE, TrlLogprobs, True, None))
    return impls


def _fused_impls(config: Config):
    """(implementation name, forward factory, why missing) in table order."""
    thinkfuse_impls = _thinkfuse_impls(config, CUDA_OPS[FUSED_LINEAR])
    impls = [(name, functools.partial(_thinkfuse_fused, backend=backend), missing)
             for name, backend, missing in thinkfuse_impls]
    impls += [(f"{name}{ONE_PASS_SUFFIX}", functools.partial(_thinkfuse_one_pass, backend=backend), missing)
              for name, backend, missing in thinkfuse_impls]
    impls.append((MATERIALISED, _materialised, None))
    impls.append((VERL, _verl_chunked, None))
    liger_class, missing = harness.liger_attr(config, *LIGER_FLCE)
    impls.append((LIGER, functools.partial(_liger, liger_class), missing))
    return impls


# ---------------------------------------------------------------------------------------------
# Inputs


def _token_ids(shape, vocab: int, device) -> torch.Tensor:
    return torch.randint(0, vocab, shape, device=device, dtype=torch.int64)


def _build_token(make_module, compiled: bool, tokens: int, vocab: int, mode: str, config: Config) -> Workload:
    device, dtype = config.device, config.dtype
    needs_grad = mode == FWD_BWD
    seq = _seq_tokens(config)
    module = make_module()
    if compiled:
        module = harness.compile_module(module, config)
    shape = (tokens // seq, seq)
    logits = (2.0 * torch.randn(*shape, vocab, device=device, dtype=dtype)).requires_grad_(needs_grad)
    token_ids = _token_ids(shape, vocab, device)
    workload = _OomGuardedWorkload(forward=lambda: module(logits, token_ids))
    if needs_grad:
        workload.inputs = (logits,)
        workload.grad_outputs = (torch.randn(shape, device=device, dtype=torch.float32),)
    return workload


def _build_fused(make_forward, tokens: int, hidden_size: int, vocab: int, mode: str, config: Config) -> Workload:
    device, dtype = config.device, config.dtype
    needs_grad = mode == FWD_BWD
    forward = make_forward(config)
    hidden = torch.randn(tokens, hidden_size, device=device, dtype=dtype).requires_grad_(needs_grad)
    # std 1/sqrt(H): logits of unit scale, as a trained lm_head gives
    weight = torch.randn(vocab, hidden_size, device=device, dtype=dtype) * hidden_size**-0.5
    weight.requires_grad_(needs_grad)
    token_ids = _token_ids((tokens,), vocab, device)
    workload = _OomGuardedWorkload(forward=lambda: forward(hidden, weight, token_ids))
    if needs_grad:
        workload.inputs = (hidden, weight)
        if getattr(make_forward, "func", None) in (_liger, _thinkfuse_one_pass):  # a scalar loss
            workload.grad_outputs = (torch.ones((), device=device, dtype=torch.float32),)
        else:
            workload.grad_outputs = (torch.randn(tokens, device=device, dtype=torch.float32),)
    return workload
