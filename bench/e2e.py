"""End-to-end cases: a training step, a GRPO loss step and greedy decoding of whole models
(random weights, built in-process from the transformers config classes; nothing is downloaded).

Variants (the model column names the preset whose shape is used; ``--smoke`` uses the tiny
models of ``thinkfuse.tiny`` instead, see the end of this docstring):

- ``train-step`` (fwd+bwd rows), one case per preset: the family's ``*ForCausalLM`` at the
  preset's real width (hidden, heads, kv heads, head_dim, intermediate, vocab, RoPE, tying) with
  ``TRAIN_LAYERS`` = 2 decoder layers, in the run's dtype, ``TRAIN_BATCH`` x ``TRAIN_SEQ`` =
  2 x 4096 = 8192 random tokens. One timed call = ``model(input_ids, labels=input_ids).loss``
  (transformers' shifted cross-entropy through the lm_head: the ``[tokens, V]`` logits are
  materialised and upcast to float32 there) and the gradient of that loss for every parameter
  (``torch.autograd.grad``; no optimizer step). MiMo is built without its MTP layer (HF's
  forward never runs it). The thinkfuse rows' backend: see ``thinkfuse_backend``.
  Implementations:
  - ``hf-sdpa``: the unpatched model, ``attn_implementation="sdpa"``.
  - ``thinkfuse``: the same model after ``thinkfuse.patch_model(model)`` with its defaults
    (every rule it has for the family: RMSNorm, SwiGLU, RoPE, attention and the fused loss,
    which computes the same cross-entropy from the hidden states without holding the logits)
    and the automatic backend (per op the cuda kernel where the extension has it, else triton).
  - ``liger``: the same model after Liger-Kernel's ``apply_liger_kernel_to_<family>(model=...,
    rope, rms_norm, swiglu, fused_linear_cross_entropy)``: its defaults, the fused loss included,
    as thinkfuse's (``cross_entropy`` off: it is the alternative to the fused one). Liger's RoPE patch is a
    module-level global of ``modeling_<family>``: it is put in place only around this row's
    forward, so no other row runs it. Missing where Liger has no function for the family
    (Ministral 3) or is not installed.
  FLOPs counted (TFLOP/s column): 3 x the forward's matmul FLOPs, forward = ``2 * tokens *
  (layers * (q, k, v, o and the three MLP projections) + H * V)`` plus causal attention
  ``layers * 2 * B * heads * S^2 * head_dim``. Tokens/s = ``tokens / ms * 1000``.
- ``grpo-step`` (fwd+bwd rows): one GRPO loss forward+backward from the policy's final hidden
  states ``[T / 1024, 1024, H]`` through the lm_head weight ``[V, H]`` (std ``H^-0.5``), for
  T in 4096 / 16384 / 32768 at the palmyra-mini shape (1536, 151936) and the am-thinking-v1
  shape (5120, 152064); TRL's defaults: ``loss_type="dapo"``, beta 0 (no reference model),
  on-policy (``old_logprobs = logprobs.detach()``), temperature 1, every token scored (mask of
  ones), one random advantage per sequence. Gradients for hidden and the lm_head weight.
  - ``thinkfuse``: ``thinkfuse.grpo.GRPOLoss`` (``fused_linear_token_logprobs``, automatic
    backend: the logits are never materialised).
  - ``trl-materialised``: ``hidden @ W.T`` (full bf16 logits), TRL's per-sequence
    ``selective_log_softmax`` (log_softmax in the logits' dtype, then gather; the function of
    bench/logprobs.py), then ``thinkfuse.grpo.grpo_loss``, which is plain torch and matches
    TRL's formulas: the loss arithmetic is identical in both rows, only the log-prob path
    differs.
  FLOPs counted: ``2 * T * H * V`` for the logits matmul, x 3 with the backward (a fused
  backward's recomputation of the logits not counted), as bench/logprobs.py's fused_linear.
- ``grpo-model-step`` (fwd+bwd rows): the issue-5 memory goal, a whole GRPO policy step of a
  Palmyra-mini-shape model at full depth (28 layers) over ``GRPO_MODEL_TOKENS`` = 32768
  completion tokens (32 x 1024), gradient checkpointing on (non-reentrant; what a
  memory-bound GRPO run turns on), gradients for every parameter: trunk forward to the final
  hidden states, then the loss of the grpo-step rows through the (tied) lm_head weight.
  - ``thinkfuse``: ``patch_model(model)`` and ``GRPOLoss`` (the logits are never held).
  - ``trl-materialised``: the unpatched model (sdpa), full logits, TRL's selective_log_softmax.
  Peak memory is the number that answers "does 32k fit on one GPU" (gradients included,
  weights not). FLOPs counted as train-step's at full depth (the checkpointing recomputation
  not counted). ``--smoke``: tiny Qwen2, 8 tokens.
- ``decode`` (fwd rows): the MiMo-7B preset at full depth (36 layers + 1 MTP layer, ~15 GB of
  bf16 weights), batch 1, a random DECODE_PROMPT-token prompt (128), exactly DECODE_NEW new tokens (64, no eos).
  - ``hf-sdpa``: ``model.generate(greedy, max_new_tokens=DECODE_NEW)`` on the unpatched model.
  - ``thinkfuse-mtp``: ``thinkfuse.speculative.mtp_generate`` on the patched model (trunk
    verifies [pending, draft] in one 2-token forward, ``mtp_verify``, the MTP layer drafts).
  - ``thinkfuse-mtp-graph`` / ``thinkfuse-graph``: the same, and plain greedy decoding, on the
    static engine with replayed CUDA graphs (``cuda_graph=True``; see graph_costs).
  - ``thinkfuse-mtp-graph-sampled``: ``thinkfuse-mtp-graph`` sampling at SAMPLED_DECODE
    (temperature 0.6, top-p 0.95, as reasoning models are served). Tokens/s only: with random
    weights its drafts are accepted at whatever rate two near-random distributions give, so no
    step cost or implied speedup is derived from it.
  With random weights the MTP layer's drafts are (almost) never accepted, so this row pays for
  speculation without its benefit: it is a lower bound, not MiMo's real speed. Tokens/s =
  ``DECODE_NEW / ms * 1000``.
- ``decode-step`` (fwd rows): the cost of one decoding step at a fixed context of 160 tokens
  (the prompt plus half the new tokens, the mean context of the ``decode`` rows), the caches
  cropped back after each call so every call sees the same context:
  - ``hf-sdpa``: one 1-token trunk forward of the unpatched model + argmax (one plain step of
    ``generate``).
  - ``thinkfuse``: the same step on the patched model.
  - ``thinkfuse-mtp``: one speculative step on the patched model: the 2-token verify forward,
    ``thinkfuse.ops.mtp_verify`` (greedy), then the MTP layer over the 2 verified rows (the
    accepted case) + argmax of its draft.
  Plain steps also run on a left-padded batch of DECODE_PADDED_BATCH rows (shape
  ``padding: "left"``; rows padded by 0 to half the context): where generate serves prompts of
  different lengths. ``thinkfuse`` skips each row's padding in place (decode_attention's
  cache_leftpad); tokens/s counts every row.
  Cost ratio = ms(thinkfuse-mtp) / ms(plain step). One MTP layer drafts one token, so a step
  emits 1 + a tokens on average at acceptance a; the implied decode speedup at MiMo's reported
  ~90% acceptance is ``1.9 / cost ratio`` (vs ``hf-sdpa``: the whole thinkfuse stack; vs
  ``thinkfuse``: speculation alone). ``python -m bench.e2e <results.json>`` prints these and
  every row's tokens/s, since the harness has no per-row field for derived numbers.

Peak memory (harness ``peak_mem_mb``, in MiB): one call's peak beyond what was allocated before it,
i.e. without the weights; it includes the gradients, activations, logits and KV caches.

Out of memory: a CUDA OOM in a row becomes an ``error`` whose reason starts with ``out of
memory`` (the harness has no status for it, and a row can only be ``missing`` before it runs),
the cache is emptied and the run goes on. The ``trl-materialised`` rows, the ones at risk, are
tried once when the case list is made (GPU runs only): if that raises OOM, the row is
``missing`` with reason ``out of memory (...)`` instead.

``--smoke`` (CPU, float32): the tiny model of each family in the presets (hidden 64, 2 layers,
4/2 heads, vocab 256): train-step on 2 x 16 tokens, grpo-step on 8 tokens (sequences of 4)
x hidden 64 x vocab 256, decode on tiny MiMo with an 8-token prompt and 8 new tokens
(decode-step at context 12). thinkfuse rows run the triton backend under the interpreter when
TRITON_INTERPRET=1 (the e2e smoke then takes ~25 s on 2 CPU cores, ~14 s without), else the
automatic backend (torch on CPU tensors). Tiny MiMo keeps its MTP layer; train-step leaves its
parameters out of the gradients (autograd.grad rejects tensors the loss does not use).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import thinkfuse
from bench import harness
from bench.harness import FWD, FWD_BWD, LIGER, Case, Config, Workload
from bench.logprobs import _oom_guard, _OomGuardedWorkload, trl_selective_log_softmax

OP = "e2e"
TRAIN, GRPO, DECODE, DECODE_STEP = "train-step", "grpo-step", "decode", "decode-step"
GRPO_MODEL = "grpo-model-step"
HF_SDPA, THINKFUSE, THINKFUSE_MTP, TRL_MATERIALISED = "hf-sdpa", "thinkfuse", "thinkfuse-mtp", "trl-materialised"
THINKFUSE_MTP_GRAPH = "thinkfuse-mtp-graph"  # mtp_generate(cuda_graph=True): static caches, replayed steps
THINKFUSE_GRAPH = "thinkfuse-graph"  # static_decode.greedy_generate: the same engine, no speculation
# mtp_generate(cuda_graph=True) sampling as reasoning models are served (SAMPLED_DECODE): what the
# softmax, the top-p sort and the rejection sampling add to a replayed step
THINKFUSE_MTP_GRAPH_SAMPLED = "thinkfuse-mtp-graph-sampled"
SAMPLED_DECODE = {"temperature": 0.6, "top_p": 0.95}
# HF's own fast decode: generate with a static cache, which transformers compiles on a GPU
# (torch.compile, CUDA graphs). Compiling takes minutes: gpu_check runs it in a job of its own.
HF_STATIC_COMPILE = "hf-static-compile"
# The same compiled static-cache generate on the patched model (what a thinkfuse user who
# compiles gets): decode steps reach the decode kernel with the written-slot count as a tensor.
THINKFUSE_STATIC_COMPILE = "thinkfuse-static-compile"
COMPILED_DECODE = (HF_STATIC_COMPILE, THINKFUSE_STATIC_COMPILE)

TRAIN_LAYERS, TRAIN_BATCH, TRAIN_SEQ = 2, 2, 4096
GRPO_TOKENS = (4096, 16384, 32768)
GRPO_SEQ = 1024  # completion tokens per sequence
GRPO_PRESETS = ("palmyra-mini", "am-thinking-v1")  # the smallest lm_head and a large one
GRPO_LOSS = dict(loss_type="dapo", beta=0.0)  # TRL GRPOConfig defaults
GRPO_MODEL_PRESET, GRPO_MODEL_TOKENS = "palmyra-mini", 32768
DECODE_PROMPT, DECODE_NEW = 128, 64
DECODE_PADDED_BATCH = 8
ACCEPTANCE = 0.9  # MiMo's reported MTP acceptance
OOM_PREFIX = "out of memory"  # how bench.logprobs._oom_guard words a CUDA OOM

SMOKE_TRAIN_BATCH, SMOKE_TRAIN_SEQ = 2, 16
SMOKE_GRPO_TOKENS, SMOKE_GRPO_SEQ, SMOKE_HIDDEN = (8,), 4, 64
SMOKE_DECODE_PROMPT, SMOKE_DECODE_NEW = 8, 8

# Liger-Kernel entry point per family: MiMo's trunk is Qwen2's modules. Ministral 3 has none
# (liger's apply_liger_kernel_to_ministral is the older `ministral` model), so it is missing.
LIGER_APPLY = {
    "qwen2": ("apply_liger_kernel_to_qwen2", "transformers.models.qwen2.modeling_qwen2"),
    "mimo": ("apply_liger_kernel_to_qwen2", "transformers.models.qwen2.modeling_qwen2"),
    "mistral": ("apply_liger_kernel_to_mistral", "transformers.models.mistral.modeling_mistral"),
    "ministral3": ("apply_liger_kernel_to_ministral3", "transformers.models.ministral3.modeling_ministral3"),
}
LIGER_OPTIONS = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)

BYTES_COUNTED = (
    "none (end-to-end rows). TFLOP/s: train-step counts 3x the forward's matmul and causal "
    "attention FLOPs (grpo-model-step: at full depth); grpo-step 3 * 2*T*H*V; decode rows count none. Tokens/s = tokens in the "
    "shape / ms * 1000 (decode: new_tokens / ms * 1000). decode-step: cost ratio = "
    "ms(thinkfuse-mtp) / ms(hf-sdpa or thinkfuse), implied speedup at 90% acceptance = 1.9 / "
    "ratio. decode thinkfuse-mtp-graph: random weights reject the drafts, so each step emits one "
    "token and ms(graph generate) / ms(hf-sdpa generate) is the step cost ratio (the capture "
    "included). `python -m bench.e2e results.json` prints them. See bench/e2e.py's docstring."
)


def cases(config: Config) -> list[Case]:
    out: list[Case] = []
    if FWD_BWD in config.modes:
        out += train_cases(config) + grpo_cases(config) + grpo_model_cases(config)
    if FWD in config.modes:
        out += decode_cases(config)
    return out


# ---------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelSpec:
    """What to build: a preset's shape (or a tiny model's family) and the number of layers."""

    name: str  # preset name, or tiny-<family>
    family: str
    preset: Optional[dict]  # None: thinkfuse.tiny's model of this family
    layers: Optional[int] = None  # None: the preset's own depth
    mtp_layers: int = 0


def _model_classes(family: str):
    if family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2Config, Qwen2ForCausalLM
    if family == "mimo":
        from thinkfuse.models import MiMoConfig, MiMoForCausalLM

        return MiMoConfig, MiMoForCausalLM
    if family == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        return MistralConfig, MistralForCausalLM
    if family == "ministral3":
        from transformers import Ministral3Config, Ministral3ForCausalLM

        return Ministral3Config, Ministral3ForCausalLM
    raise ValueError(f"no end-to-end model for family {family!r}")


def hf_config(spec: ModelSpec):
    """The family's transformers config with the preset's shape fields (nothing allocated)."""
    preset = spec.preset
    config_class, _ = _model_classes(spec.family)
    fields = dict(
        hidden_size=preset["hidden_size"], intermediate_size=preset["intermediate_size"],
        num_hidden_layers=spec.layers or preset["num_hidden_layers"],
        num_attention_heads=preset["num_attention_heads"], num_key_value_heads=preset["num_key_value_heads"],
        head_dim=preset["head_dim"], vocab_size=preset["vocab_size"], rms_norm_eps=preset["rms_norm_eps"],
        max_position_embeddings=preset["max_position_embeddings"],
        tie_word_embeddings=preset["tie_word_embeddings"], rope_parameters=dict(preset["rope_parameters"]),
    )
    if spec.family == "mimo":
        fields["num_nextn_predict_layers"] = spec.mtp_layers
    if spec.family == "mistral":
        fields["sliding_window"] = None
    return config_class(**fields)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(spec: ModelSpec, config: Config) -> torch.nn.Module:
    """Random weights, created directly on the device in the run's dtype (a 7B model never
    exists in float32), SDPA attention."""
    torch.manual_seed(0)
    if spec.preset is None:
        from thinkfuse.tiny import tiny_model

        model = tiny_model(spec.family, dtype=config.dtype).to(config.device)
    else:
        _, model_class = _model_classes(spec.family)
        with torch.device(config.device), _default_dtype(config.dtype):
            model = model_class(hf_config(spec))
    model.set_attn_implementation("sdpa")
    return model


def thinkfuse_backend(config: Config) -> Optional[str]:
    """None (automatic: cuda where the extension has the op, else triton) on a GPU run; in a
    smoke run the Triton kernels under the interpreter when TRITON_INTERPRET=1, else automatic
    (torch on CPU)."""
    from thinkfuse.backend import triton_interpreter_enabled

    return "triton" if config.smoke and triton_interpreter_enabled() else None


def _train_specs(config: Config) -> list[ModelSpec]:
    """One spec per preset on a GPU run; one tiny model per family in a smoke run."""
    if config.smoke:
        families = dict.fromkeys(spec["family"] for spec in config.presets.values())
        return [ModelSpec(f"tiny-{family}", family, None) for family in families]
    return [ModelSpec(name, spec["family"], spec, layers=TRAIN_LAYERS) for name, spec in config.presets.items()]


# ---------------------------------------------------------------------------------------------
# train-step


def train_cases(config: Config) -> list[Case]:
    batch, seq = (SMOKE_TRAIN_BATCH, SMOKE_TRAIN_SEQ) if config.smoke else (TRAIN_BATCH, TRAIN_SEQ)
    out = []
    for spec in _train_specs(config):
        flops = None if spec.preset is None else train_flops(spec.preset, TRAIN_LAYERS, batch, seq)
        for impl, patch, missing in _train_impls(spec, config):
            build = functools.partial(_build_train, spec, patch, batch, seq, config)
            out.append(Case(
                op=OP, impl=impl, variant=TRAIN, mode=FWD_BWD,
                shape={"tokens": batch * seq, "seq": seq, "layers": TRAIN_LAYERS},  # tiny models: 2 too
                model=spec.name, dtype=config.dtype, flops=flops,
                build=None if missing else _oom_guard(build), missing=missing,
            ))
    return out


def train_flops(preset: dict, layers: int, batch: int, seq: int) -> int:
    """3 x the forward's matmul FLOPs (see the docstring)."""
    hidden, inter = preset["hidden_size"], preset["intermediate_size"]
    vocab, head_dim = preset["vocab_size"], preset["head_dim"]
    q_width = preset["num_attention_heads"] * head_dim
    kv_width = preset["num_key_value_heads"] * head_dim
    per_layer = 2 * hidden * q_width + 2 * hidden * kv_width + 3 * hidden * inter  # q, o; k, v; MLP
    tokens = batch * seq
    linear = 2 * tokens * (layers * per_layer + hidden * vocab)
    attention = layers * 2 * batch * preset["num_attention_heads"] * seq * seq * head_dim  # causal half
    return 3 * (linear + attention)


def _train_impls(spec: ModelSpec, config: Config):
    """(implementation name, patch function (model) -> forward context factory, why missing)."""
    impls = [(HF_SDPA, _no_patch, None),
             (THINKFUSE, functools.partial(_thinkfuse_patch, backend=thinkfuse_backend(config)), None)]
    if spec.family not in LIGER_APPLY:
        return impls + [(LIGER, None, f"no Liger-Kernel entry point known for family {spec.family}")]
    name, modeling = LIGER_APPLY[spec.family]
    apply_fn, missing = harness.liger_attr(config, "liger_kernel.transformers", name)
    impls.append((LIGER, functools.partial(_liger_patch, apply_fn, modeling), missing))
    return impls


def _no_patch(model) -> Callable[[], Any]:
    return contextlib.nullcontext


def _thinkfuse_patch(model, backend: Optional[str]) -> Callable[[], Any]:
    thinkfuse.patch_model(model, backend=backend)
    return contextlib.nullcontext


def _liger_patch(apply_fn, modeling_name: str, model) -> Callable[[], Any]:
    """Apply Liger to this instance; its module-level replacements (RoPE) are taken back at once
    and returned as a context that re-applies them around this row's forward only."""
    modeling = importlib.import_module(modeling_name)
    before = dict(vars(modeling))
    accepted = inspect.signature(apply_fn).parameters
    apply_fn(model=model, **{k: v for k, v in LIGER_OPTIONS.items() if k in accepted})
    changed = {k: v for k, v in vars(modeling).items() if before.get(k, _ABSENT) is not v}
    _restore(modeling, changed, before)
    return functools.partial(_module_attrs, modeling, changed)


_ABSENT = object()


def _restore(module, names, before: dict) -> None:
    for name in names:
        if before.get(name, _ABSENT) is _ABSENT:
            delattr(module, name)
        else:
            setattr(module, name, before[name])


@contextlib.contextmanager
def _module_attrs(module, values: dict):
    before = {name: getattr(module, name, _ABSENT) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        _restore(module, values, before)


def trained_parameters(model) -> tuple[torch.Tensor, ...]:
    """Every parameter the causal-LM forward uses: all but MiMo's MTP layers (tiny MiMo has one;
    autograd.grad rejects a tensor that is not in the graph)."""
    return tuple(p for name, p in model.named_parameters() if p.requires_grad and ".mtp_layers." not in name)


def _build_train(spec: ModelSpec, patch, batch: int, seq: int, config: Config) -> Workload:
    model = build_model(spec, config).train()
    forward_context = patch(model)
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (batch, seq), device=config.device)

    def forward():
        with forward_context():
            return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss

    params = trained_parameters(model)
    ones = torch.ones((), device=config.device, dtype=torch.float32)
    return _OomGuardedWorkload(forward=forward, inputs=params, grad_outputs=(ones,))


# ---------------------------------------------------------------------------------------------
# grpo-step


def grpo_cases(config: Config) -> list[Case]:
    out = []
    for tokens, hidden, vocab, model in _grpo_shapes(config):
        for impl, make_loss in ((THINKFUSE, _thinkfuse_grpo), (TRL_MATERIALISED, _materialised_grpo)):
            build = _oom_guard(functools.partial(_build_grpo, make_loss, tokens, hidden, vocab, config))
            # The probe runs the case once: only for rows this run keeps.
            probe = impl == TRL_MATERIALISED and config.selects(impl)
            missing = _oom_probe(build, config) if probe else None
            out.append(Case(
                op=OP, impl=impl, variant=GRPO, mode=FWD_BWD,
                shape={"tokens": tokens, "hidden": hidden, "vocab": vocab}, model=model, dtype=config.dtype,
                flops=3 * 2 * tokens * hidden * vocab, build=None if missing else build, missing=missing,
            ))
    return out


def _grpo_shapes(config: Config) -> list[tuple[int, int, int, str]]:
    if config.smoke:
        from thinkfuse.tiny import VOCAB

        return [(t, SMOKE_HIDDEN, VOCAB, "tiny") for t in SMOKE_GRPO_TOKENS]
    names = [n for n in GRPO_PRESETS if n in config.presets] or list(config.presets)
    return [(t, config.presets[n]["hidden_size"], config.presets[n]["vocab_size"], n)
            for n in names for t in GRPO_TOKENS]


def _grpo_seq(config: Config) -> int:
    return SMOKE_GRPO_SEQ if config.smoke else GRPO_SEQ


def _thinkfuse_grpo(config: Config):
    loss_fn = thinkfuse.grpo.GRPOLoss(**GRPO_LOSS, backend=thinkfuse_backend(config))

    def loss(hidden, weight, ids, mask, advantages):
        return loss_fn(hidden, weight, ids, mask, advantages)[0]

    return loss


def _materialised_grpo(config: Config):
    def loss(hidden, weight, ids, mask, advantages):
        logits = hidden @ weight.t()
        logprobs = trl_selective_log_softmax(logits, ids).float()
        return thinkfuse.grpo.grpo_loss(logprobs, None, advantages, mask, **GRPO_LOSS)[0]

    return loss


def _grpo_batch(tokens: int, vocab: int, config: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(completion ids [B, seq], mask of ones, per-sequence advantages) for ``tokens`` tokens:
    the inputs both GRPO variants feed the loss."""
    seq = _grpo_seq(config)
    batch = tokens // seq
    ids = torch.randint(0, vocab, (batch, seq), device=config.device)
    mask = torch.ones(batch, seq, device=config.device, dtype=torch.int64)
    advantages = torch.randn(batch, device=config.device, dtype=torch.float32)
    return ids, mask, advantages


def _scalar_grad(config: Config) -> torch.Tensor:
    return torch.ones((), device=config.device, dtype=torch.float32)


def _build_grpo(make_loss, tokens: int, hidden_size: int, vocab: int, config: Config) -> Workload:
    device, dtype = config.device, config.dtype
    loss = make_loss(config)
    ids, mask, advantages = _grpo_batch(tokens, vocab, config)
    hidden = torch.randn(*ids.shape, hidden_size, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, device=device, dtype=dtype) * hidden_size**-0.5).requires_grad_()
    return _OomGuardedWorkload(forward=lambda: loss(hidden, weight, ids, mask, advantages),
                               inputs=(hidden, weight), grad_outputs=(_scalar_grad(config),))


def _oom_probe(build, config: Config) -> Optional[str]:
    """GPU runs: one fwd+bwd of the case now; ``out of memory (...)`` if it does not fit."""
    if config.device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        build().runner(FWD_BWD)()
    except Exception as exc:  # anything but OOM: the row itself will run and report it
        if str(exc).startswith(OOM_PREFIX):
            return f"out of memory ({str(exc)[len(OOM_PREFIX):].lstrip(': ')[:160]})"
    finally:
        torch.cuda.empty_cache()
    return None


# ---------------------------------------------------------------------------------------------
# grpo-model-step


def grpo_model_cases(config: Config) -> list[Case]:
    if config.smoke:
        spec, tokens = ModelSpec("tiny-qwen2", "qwen2", None), SMOKE_GRPO_TOKENS[0]
    elif GRPO_MODEL_PRESET in config.presets:
        preset = config.presets[GRPO_MODEL_PRESET]
        spec, tokens = ModelSpec(GRPO_MODEL_PRESET, preset["family"], preset), GRPO_MODEL_TOKENS
    else:
        return []
    seq = _grpo_seq(config)
    flops = None if spec.preset is None else train_flops(
        spec.preset, spec.preset["num_hidden_layers"], tokens // seq, seq)
    out = []
    for impl, patched, make_loss in ((THINKFUSE, True, _thinkfuse_grpo), (TRL_MATERIALISED, False, _materialised_grpo)):
        build = _oom_guard(functools.partial(_build_grpo_model, spec, patched, make_loss, tokens, config))
        out.append(Case(
            op=OP, impl=impl, variant=GRPO_MODEL, mode=FWD_BWD,
            shape={"tokens": tokens, "seq": seq}, model=spec.name, dtype=config.dtype,
            flops=flops, build=build,
        ))
    return out


def _enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers >= 5.2x names
    it activation_checkpointing_enable and deprecates the older name)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _build_grpo_model(spec: ModelSpec, patched: bool, make_loss, tokens: int, config: Config) -> Workload:
    model = build_model(spec, config).train()
    _enable_checkpointing(model)
    if patched:
        thinkfuse.patch_model(model, backend=thinkfuse_backend(config))
    loss = make_loss(config)
    ids, mask, advantages = _grpo_batch(tokens, model.config.vocab_size, config)

    def forward():
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        return loss(hidden, model.lm_head.weight, ids, mask, advantages)

    return _OomGuardedWorkload(forward=forward, inputs=trained_parameters(model),
                               grad_outputs=(_scalar_grad(config),))


# ---------------------------------------------------------------------------------------------
# decode and decode-step


def decode_cases(config: Config) -> list[Case]:
    prompt, new = (SMOKE_DECODE_PROMPT, SMOKE_DECODE_NEW) if config.smoke else (DECODE_PROMPT, DECODE_NEW)
    context = prompt + new // 2
    out = []
    for spec in _mtp_specs(config):
        # The single steps first: milliseconds each, where a whole generate takes seconds and a
        # job's time limit may end the run before it.
        for impl, make in ((HF_SDPA, _plain_step), (THINKFUSE, _plain_step), (THINKFUSE_MTP, _mtp_step)):
            build = functools.partial(_build_step, make, impl != HF_SDPA, spec, context, config)
            out.append(_decode_case(spec, DECODE_STEP, impl, {"batch": 1, "context": context}, build, config))
        for impl in (HF_SDPA, THINKFUSE):
            build = functools.partial(_build_step, _plain_step, impl != HF_SDPA, spec, context, config,
                                      batch=DECODE_PADDED_BATCH)
            shape = {"batch": DECODE_PADDED_BATCH, "context": context, "padding": "left"}
            out.append(_decode_case(spec, DECODE_STEP, impl, shape, build, config))
        # The graph row first: a second or less, where the others take several.
        for impl, make in ((THINKFUSE_MTP_GRAPH, _mtp_graph_generate), (THINKFUSE_GRAPH, _graph_generate),
                           (THINKFUSE_MTP_GRAPH_SAMPLED, _mtp_graph_sampled_generate), (HF_SDPA, _hf_generate),
                           (THINKFUSE_MTP, _mtp_generate), (HF_STATIC_COMPILE, _hf_static_generate),
                           (THINKFUSE_STATIC_COMPILE, _hf_static_generate)):
            build = functools.partial(_build_generate, make, impl not in (HF_SDPA, HF_STATIC_COMPILE), spec,
                                      prompt, new, config)
            out.append(_decode_case(spec, DECODE, impl, {"batch": 1, "prompt": prompt, "new_tokens": new}, build,
                                    config))
    return out


def _decode_case(spec: ModelSpec, variant: str, impl: str, shape: dict, build, config: Config) -> Case:
    return Case(op=OP, impl=impl, variant=variant, mode=FWD, shape=shape, model=spec.name,
                dtype=config.dtype, build=_oom_guard(build))


def _mtp_specs(config: Config) -> list[ModelSpec]:
    """MiMo at full depth for every preset with an MTP layer (tiny MiMo in a smoke run)."""
    if config.smoke:
        has_mtp = any(spec.get("num_nextn_predict_layers") for spec in config.presets.values())
        return [ModelSpec("tiny-mimo", "mimo", None)] if has_mtp else []
    return [ModelSpec(name, "mimo", spec, mtp_layers=spec["num_nextn_predict_layers"])
            for name, spec in config.presets.items() if spec.get("num_nextn_predict_layers")]


#: The decode rows' model, built once per job and shared by its rows: {(spec name, device,
#: dtype): model}, one entry at most. A random MiMo-7B is ~15 GB of weights; a build per row (5
#: rows) took a large share of the decode job's time limit. Rows run one after the other, and
#: each puts the patch state it needs in place when its workload is built.
_DECODE_MODEL: dict = {}


def _decode_model(spec: ModelSpec, patched: bool, config: Config):
    """The shared decode model of ``spec``, patched by thinkfuse or restored to HF's forwards."""
    key = (spec.name, str(config.device), config.dtype)
    if key not in _DECODE_MODEL:
        _DECODE_MODEL.clear()  # at most one model alive
        model = build_model(spec, config).eval()
        # No eos: every row generates exactly the requested number of tokens.
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        _DECODE_MODEL[key] = model
    model = _DECODE_MODEL[key]
    thinkfuse.unpatch_model(model)
    if patched:
        thinkfuse.patch_model(model, backend=thinkfuse_backend(config))
    torch.manual_seed(1)  # every row draws its prompt from the same state, built model or not
    return model


def _hf_generate(model, input_ids, new: int):
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                          max_new_tokens=new, min_new_tokens=new)


def _mtp_generate(model, input_ids, new: int):
    return thinkfuse.speculative.mtp_generate(model, input_ids, max_new_tokens=new, eos_token_id=[])[0]


def _hf_static_generate(model, input_ids, new: int):
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                          max_new_tokens=new, min_new_tokens=new, cache_implementation="static")


def _graph_generate(model, input_ids, new: int):
    from thinkfuse.static_decode import greedy_generate

    return greedy_generate(model, input_ids, max_new_tokens=new, eos_token_id=[], cuda_graph=True)[0]


def _mtp_graph_generate(model, input_ids, new: int):
    return thinkfuse.speculative.mtp_generate(model, input_ids, max_new_tokens=new, eos_token_id=[],
                                              cuda_graph=True)[0]


def _mtp_graph_sampled_generate(model, input_ids, new: int):
    return thinkfuse.speculative.mtp_generate(model, input_ids, max_new_tokens=new, eos_token_id=[],
                                              cuda_graph=True, **SAMPLED_DECODE)[0]


def _build_generate(make, patched: bool, spec: ModelSpec, prompt: int, new: int, config: Config) -> Workload:
    model = _decode_model(spec, patched, config)
    input_ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=config.device)
    return _decode_workload(lambda: make(model, input_ids, new), config)


@dataclass
class _Context:
    """A prefilled context of ``length`` tokens: the trunk's cache (and the MTP layer's), the
    token to feed next and, for speculation, the draft for the token after it."""

    length: int
    trunk_cache: Any
    mtp_cache: Any
    pending: torch.Tensor  # [B]
    draft: torch.Tensor  # [B]
    padding: Optional[torch.Tensor] = None  # [B] left-padding slots per row (None: unpadded)


def _left_padding(batch: int, length: int, device) -> torch.Tensor:
    """Padding slots per row, spread from 0 to half the context."""
    return torch.tensor([row * length // (2 * batch) for row in range(batch)], device=device)


def _padding_mask(ctx: _Context, extra: int) -> torch.Tensor:
    """The ``[B, length + extra]`` mask of the context and ``extra`` new tokens."""
    batch, device = ctx.pending.shape[0], ctx.pending.device
    slots = torch.arange(ctx.length + extra, device=device)[None].expand(batch, -1)
    padding = torch.zeros(batch, dtype=torch.long, device=device) if ctx.padding is None else ctx.padding
    return (slots >= padding[:, None]).long()


def _prefill(model, length: int, config: Config, batch: int = 1) -> _Context:
    """The context; ``batch > 1``: left-padded rows (see _left_padding), trunk only."""
    from transformers.cache_utils import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (batch, length + 2), device=config.device)
    context, pending, draft = ids[:, :length], ids[:, length], ids[:, length + 1]
    trunk_cache = DynamicCache(config=model.config)
    padded = batch > 1
    ctx = _Context(length, trunk_cache, None, pending, draft,
                   _left_padding(batch, length, config.device) if padded else None)
    with torch.no_grad():
        mask = _padding_mask(ctx, 0)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        _, hidden = model.forward_with_pre_norm_hidden(context, attention_mask=mask, position_ids=positions,
                                                       past_key_values=trunk_cache, use_cache=True, logits_to_keep=1)
        if not padded:
            ctx.mtp_cache = DynamicCache()
            # MTP row t pairs h_t with token t+1, as mtp_generate's prefill does.
            next_ids = torch.cat([context[:, 1:], pending[:, None]], dim=1)
            model.mtp_forward(hidden, next_ids, past_key_values=ctx.mtp_cache, logits_to_keep=1)
    return ctx


def _plain_step(model, ctx: _Context) -> torch.Tensor:
    """One greedy decode step (1 token per row) at the context; the cache is cropped back after."""
    mask = _padding_mask(ctx, 1)
    position = mask.sum(-1, keepdim=True) - 1
    logits = model(ctx.pending[:, None], attention_mask=mask, position_ids=position,
                   past_key_values=ctx.trunk_cache, use_cache=True).logits
    ctx.trunk_cache.crop(-1)
    return logits[:, -1].argmax(-1)


def _mtp_step(model, ctx: _Context) -> torch.Tensor:
    """One speculative step (2-token verify, mtp_verify, MTP draft over the 2 verified rows);
    both caches are cropped back after."""
    device = ctx.pending.device
    mask = torch.ones((1, ctx.length + 2), dtype=torch.int64, device=device)
    positions = ctx.length + torch.arange(2, device=device)[None]
    outputs, hidden = model.forward_with_pre_norm_hidden(
        torch.stack([ctx.pending, ctx.draft], dim=1), attention_mask=mask, position_ids=positions,
        past_key_values=ctx.trunk_cache, use_cache=True,
    )
    tokens, _ = thinkfuse.ops.mtp_verify(ctx.draft[:, None], outputs.logits, temperature=0.0)
    draft_logits = model.mtp_forward(hidden, tokens.clamp(min=0), position_ids=positions, attention_mask=mask,
                                     past_key_values=ctx.mtp_cache, logits_to_keep=1).logits
    ctx.trunk_cache.crop(-2)
    ctx.mtp_cache.crop(-2)
    return draft_logits[:, -1].argmax(-1)


def _build_step(make, patched: bool, spec: ModelSpec, context: int, config: Config, batch: int = 1) -> Workload:
    model = _decode_model(spec, patched, config)
    ctx = _prefill(model, context, config, batch)
    return _decode_workload(lambda: make(model, ctx), config)


def _decode_workload(run, config: Config) -> Workload:
    """Forward-only; thinkfuse ops called without a backend argument (mtp_generate's and the
    step's mtp_verify) use the run's thinkfuse backend."""
    backend = thinkfuse_backend(config)

    def forward():
        with thinkfuse.use_backend(backend):
            return run()

    return _OomGuardedWorkload(forward=forward)


# ---------------------------------------------------------------------------------------------
# Derived numbers the harness has no column for: `python -m bench.e2e results.json`


def tokens_per_s(row: dict) -> Optional[float]:
    """Tokens per second of a timed e2e row (decode-step: plain steps emit 1 token, speculative
    steps 1 + ACCEPTANCE tokens on average)."""
    ms = row.get("median_ms")
    if row["op"] != OP or not ms:
        return None
    shape = row["shape"]
    if row["variant"] == DECODE_STEP:
        tokens = (1 + ACCEPTANCE if row["impl"] == THINKFUSE_MTP else 1) * shape.get("batch", 1)
    else:
        tokens = shape.get("new_tokens", shape.get("tokens"))
    return tokens / ms * 1000


def step_costs(rows: list[dict]) -> list[dict]:
    """Per decode-step group: the MTP step's cost ratio vs each plain step and the implied
    speedup at ACCEPTANCE (1 + ACCEPTANCE tokens per speculative step)."""
    out = []
    steps = [r for r in rows if r["op"] == OP and r["variant"] == DECODE_STEP and r.get("median_ms")]
    for mtp in (r for r in steps if r["impl"] == THINKFUSE_MTP):
        for plain in (r for r in steps if r["impl"] != THINKFUSE_MTP and r["model"] == mtp["model"]
                      and r["shape_label"] == mtp["shape_label"]):
            ratio = mtp["median_ms"] / plain["median_ms"]
            out.append({"model": mtp["model"], "context": mtp["shape"]["context"], "vs": plain["impl"],
                        "cost_ratio": ratio, "implied_speedup": (1 + ACCEPTANCE) / ratio})
    return out


def graph_costs(rows: list[dict]) -> list[dict]:
    """Per decode group with a thinkfuse-mtp-graph row: its generate time over hf-sdpa's (and
    hf-static-compile's and thinkfuse-graph's, the same engine without speculation, where
    measured: against the latter the implied speedup is what speculation itself adds). With
    random weights the MTP drafts are rejected, so both emit one token per trunk forward and the
    ratio is the cost of a (replayed, 2-token) speculative step over the other row's step; the implied
    speedup at ACCEPTANCE follows as for decode-step. Both times also hold fixed costs (the prompt's
    prefill; the graph row's capture) that acceptance does not shorten, so ``(1 + ACCEPTANCE) /
    ratio`` overstates the generate speedup by the share of those: an upper bound, and
    ``1 / ratio`` (every draft rejected) a lower one."""
    out = []
    done = [r for r in rows if r["op"] == OP and r["variant"] == DECODE and r.get("median_ms")]
    for graph in (r for r in done if r["impl"] == THINKFUSE_MTP_GRAPH):
        for plain in (r for r in done if r["impl"] in (HF_SDPA, *COMPILED_DECODE, THINKFUSE_GRAPH)
                      and r["model"] == graph["model"]
                      and r["shape_label"] == graph["shape_label"]):
            ratio = graph["median_ms"] / plain["median_ms"]
            out.append({"model": graph["model"], "shape": graph["shape_label"], "vs": plain["impl"],
                        "cost_ratio": ratio, "implied_speedup": (1 + ACCEPTANCE) / ratio})
    return out


BASELINES = {TRAIN: HF_SDPA, GRPO: TRL_MATERIALISED, GRPO_MODEL: TRL_MATERIALISED, DECODE: HF_SDPA,
             DECODE_STEP: HF_SDPA}


def speedup_vs_baseline(row: dict, rows: list[dict]) -> Optional[float]:
    """Baseline ms / this row's ms, the baseline being the same variant, model and shape's
    ``hf-sdpa`` (grpo-step: ``trl-materialised``) row; the harness's speedup columns only know
    hf-eager and torch-compile."""
    baseline = BASELINES.get(row["variant"])
    for other in rows:
        if (other["op"], other["impl"], other["variant"], other["model"], other["shape_label"]) == (
                OP, baseline, row["variant"], row["model"], row["shape_label"]) and other.get("median_ms"):
            return other["median_ms"] / row["median_ms"] if row.get("median_ms") else None
    return None


def summary_lines(rows: list[dict]) -> list[str]:
    lines = ["e2e tokens/s (and speedup vs hf-sdpa / trl-materialised; decode-step: per step):"]
    for row in rows:
        rate = tokens_per_s(row)
        if rate is None:
            continue
        speculative = row["variant"] == DECODE_STEP and row["impl"] == THINKFUSE_MTP
        implied = f" (implied at {ACCEPTANCE:.0%} acceptance)" if speculative else ""
        speedup = speedup_vs_baseline(row, rows)
        lines.append(f"  {row['variant']:<12} {row['model']:<16} {row['shape_label']:<18} {row['impl']:<17} "
                     f"{rate:>10,.0f} tokens/s{implied}  {row['median_ms']:.4g} ms"
                     f"{f' ({speedup:.2f}x)' if speedup else ''}, peak {row['peak_mem_mb'] or 0:.0f} MiB")
    costs = step_costs(rows)
    if costs:
        lines.append(f"decode-step: speculative step cost, implied speedup at {ACCEPTANCE:.0%} acceptance:")
        for c in costs:
            lines.append(f"  {c['model']} context {c['context']}: thinkfuse-mtp / {c['vs']} = "
                         f"{c['cost_ratio']:.3f} -> {c['implied_speedup']:.2f}x")
    graphs = graph_costs(rows)
    if graphs:
        lines.append(f"decode (random weights, drafts rejected): graph step cost, implied speedup at "
                     f"{ACCEPTANCE:.0%} acceptance (an upper bound: the prefill and the graph capture inside "
                     "both times do not shrink with acceptance, yet are divided by 1 + acceptance too):")
        for c in graphs:
            lines.append(f"  {c['model']} {c['shape']}: thinkfuse-mtp-graph / {c['vs']} = "
                         f"{c['cost_ratio']:.3f} -> {c['implied_speedup']:.2f}x")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.e2e RESULTS_JSON", file=sys.stderr)
        return 2
    rows = json.loads(Path(argv[0]).read_text())["rows"]
    print("\n".join(summary_lines(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
