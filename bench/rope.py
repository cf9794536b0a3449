"""RoPE cases: ``thinkfuse.ops.rope`` (cos/sin computed in the kernel from position_ids) and the
cos/sin drop-in ``thinkfuse.ops.apply_rotary_pos_emb``, against transformers (eager and
torch.compile), Liger-Kernel and FlashInfer.

Every case rotates q ``[B, S, Hq, D]`` and k ``[B, S, Hkv, D]`` (contiguous, as the q/k
projections produce them; one sequence of T tokens, B = 1, ``position_ids = arange(T)`` int64)
with one model family's RoPE. Variants (the RoPE flavour; its parameter values do not change
the cost, so the first preset of a group supplies them):
- ``default``: plain RoPE (Qwen2 family, MiMo).
- ``yarn+temperature``: YaRN frequencies and attention factor, then Ministral 3's query
  temperature ``q *= 1 + beta * log(1 + floor(pos / L0))`` (only q).

Implementations (each timed from q, k, position_ids to the rotated q, k):
- ``thinkfuse-<backend>``: ``thinkfuse.ops.rope`` with the model's ``rope_params`` (temperature
  fused); outputs ``[B, S, H, D]``.
- ``thinkfuse-<backend>-apply_rotary``: the drop-in: transformers' rotary module computes cos/sin
  from position_ids, then ``thinkfuse.ops.apply_rotary_pos_emb`` on HF's ``[B, H, S, D]`` views,
  then (Ministral 3) the temperature multiply in torch, as the attention module does.
- ``hf-eager``: what a transformers decoder layer does: the family's rotary embedding module
  (``Qwen2RotaryEmbedding`` / ``Ministral3RotaryEmbedding``) computing cos/sin from position_ids
  (counted here, although a model computes them once per forward for all layers), then
  ``transformers.models.qwen2.modeling_qwen2.apply_rotary_pos_emb`` on the transposed
  ``[B, H, S, D]`` views of q and k, then (Ministral 3) ``get_llama_4_attn_scale``'s multiply.
- ``torch-compile``: ``torch.compile`` of that same module.
- ``liger``: HF's rotary module + ``liger_rotary_pos_emb`` (+ the temperature multiply in
  torch). Liger rotates q and k in place (and dq, dk in place in its backward): the inputs
  change between timed repetitions; the cost of a rotation does not depend on the values.
- ``flashinfer``: ``flashinfer.apply_rope_with_cos_sin_cache`` on the ``[T, H*D]`` views, reading
  a float32 cos/sin cache built once outside the timing (as vLLM/SGLang hold it), + the
  temperature multiply in torch. Forward only: FlashInfer's RoPE has no backward.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Optional

import torch
from torch import nn

import thinkfuse
from bench import harness
from bench.harness import FWD_BWD, HF_EAGER, LIGER, TORCH_COMPILE, Case, Config, Workload

OP = "rope"
TOKENS = (4096, 16384)
FLASHINFER = "flashinfer"
APPLY_ROTARY_SUFFIX = "-apply_rotary"
POSITION_DTYPE = torch.int64  # transformers' default position_ids dtype

# Tiny presets for --smoke: 8 tokens, 4/2 heads, head_dim 16. The YaRN one has a 4-token
# original context so the query temperature is active (> 1) at positions 4..7.
SMOKE_TOKENS = 8
SMOKE_PRESETS = {
    "tiny-qwen2": {
        "family": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    "tiny-ministral3": {
        "family": "ministral3", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 64,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                            "original_max_position_embeddings": 4, "beta_fast": 32.0, "beta_slow": 1.0,
                            "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1},
    },
}

BYTES_COUNTED = (
    "minimal DRAM traffic, T tokens, Hq query and Hkv key heads of head_dim D, q/k in the run's "
    "dtype, position_ids int64. fwd: read q, k, position_ids; write q, k "
    "(2*T*(Hq+Hkv)*D elements + 8*T bytes). fwd+bwd adds the backward: read dq, dk, "
    "position_ids; write dq, dk (the same count again). Not counted: inv_freq (D/2 floats), and "
    "the cos/sin tables some implementations materialise (HF eager, Liger and the apply_rotary "
    "drop-in write and read [T, D] cos and sin; FlashInfer reads a float32 [T, D] cache): they "
    "are overheads of those implementations, not inputs of the op. The query temperature is "
    "computed from position_ids."
)


@dataclasses.dataclass
class RopeGroup:
    """Presets sharing one (Hq, Hkv, D, RoPE variant): one set of cases."""

    q_heads: int
    kv_heads: int
    head_dim: int
    variant: str
    models: str  # comma-joined preset names
    spec: dict  # the first preset: supplies the config and RoPE parameter values


def cases(config: Config) -> list[Case]:
    out = []
    for group in _groups(config):
        for tokens in (SMOKE_TOKENS,) if config.smoke else TOKENS:
            shape = {"tokens": tokens, "q_heads": group.q_heads, "kv_heads": group.kv_heads,
                     "head_dim": group.head_dim}
            for mode in config.modes:
                for impl, make_module, compiled, missing in _implementations(config, group, mode):
                    build = functools.partial(_build, make_module, compiled, group, tokens, mode, config)
                    out.append(Case(
                        op=OP, impl=impl, variant=group.variant, mode=mode, shape=shape,
                        model=group.models, dtype=config.dtype,
                        bytes_moved=bytes_moved(tokens, group.q_heads, group.kv_heads, group.head_dim,
                                                mode, config.dtype),
                        build=None if missing else build, missing=missing,
                    ))
    return out


def bytes_moved(tokens: int, q_heads: int, kv_heads: int, head_dim: int, mode: str,
                dtype: torch.dtype) -> int:
    """Bytes of the op's minimal reads + writes (see BYTES_COUNTED)."""
    element = torch.empty((), dtype=dtype).element_size()
    position_bytes = tokens * torch.empty((), dtype=POSITION_DTYPE).element_size()
    one_pass = 2 * tokens * (q_heads + kv_heads) * head_dim * element + position_bytes
    return one_pass * (2 if mode == FWD_BWD else 1)


def rope_variant(spec: dict) -> str:
    """``default``, ``yarn+temperature``, ...: the RoPE type, plus the query temperature if any."""
    params = spec.get("rope_parameters") or {}
    variant = params.get("rope_type", "default")
    if params.get("llama_4_scaling_beta") is not None:
        variant += "+temperature"
    return variant


def _groups(config: Config) -> list[RopeGroup]:
    presets = SMOKE_PRESETS if config.smoke else config.presets
    grouped: dict[tuple, list[str]] = {}
    for name, spec in presets.items():
        key = (spec["num_attention_heads"], spec["num_key_value_heads"], spec["head_dim"], rope_variant(spec))
        grouped.setdefault(key, []).append(name)
    return [
        RopeGroup(*key, models=",".join(names), spec=presets[names[0]])
        for key, names in sorted(grouped.items())
    ]


# ---------------------------------------------------------------------------------------------
# transformers pieces of a family


def _family_classes(family: str) -> tuple[Any, Any]:
    """(config class, rotary embedding class) of a model family."""
    if family == "ministral3":
        from transformers import Ministral3Config
        from transformers.models.ministral3.modeling_ministral3 import Ministral3RotaryEmbedding

        return Ministral3Config, Ministral3RotaryEmbedding
    # Qwen2 and MiMo (whose trunk is Qwen2's modules).
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    return Qwen2Config, Qwen2RotaryEmbedding


def _hf_config(spec: dict):
    """A transformers config with the preset's attention and RoPE fields (nothing allocated)."""
    config_class, _ = _family_classes(spec["family"])
    return config_class(
        hidden_size=spec["hidden_size"], num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"], head_dim=spec["head_dim"],
        max_position_embeddings=spec["max_position_embeddings"], num_hidden_layers=1,
        rope_parameters=dict(spec["rope_parameters"]),
    )


def _hf_apply_rotary_pos_emb():
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    return apply_rotary_pos_emb


def _llama4_attn_scale():
    from transformers.models.ministral3.modeling_ministral3 import get_llama_4_attn_scale

    return get_llama_4_attn_scale


# ---------------------------------------------------------------------------------------------
# Implementations: modules whose forward takes (q, k, position_ids), q/k [B, S, H, D], and
# returns the rotated (q, k); `layout` says which layout the outputs have.


class ThinkfuseRope(nn.Module):
    layout = "bshd"

    def __init__(self, hf_config, backend: str):
        super().__init__()
        params = thinkfuse.ops.rope_params(hf_config)
        self.register_buffer("inv_freq", params.inv_freq, persistent=False)
        self.attention_scaling = params.attention_scaling
        self.llama4_scaling = params.llama4_scaling
        self.backend = backend

    def forward(self, q, k, position_ids):
        return thinkfuse.ops.rope(
            q, k, position_ids, self.inv_freq, attention_scaling=self.attention_scaling,
            llama4_scaling=self.llama4_scaling, backend=self.backend,
        )


class HFStyleRope(nn.Module):
    """A transformers attention module's RoPE: rotary module -> ``apply`` on the [B, H, S, D]
    views -> (Ministral 3) query temperature. ``apply`` is HF's function or a drop-in."""

    layout = "bhsd"

    def __init__(self, hf_config, apply: Callable):
        super().__init__()
        _, rotary_class = _family_classes(hf_config.model_type)
        self.rotary_emb = rotary_class(hf_config)
        self.apply_rotary = apply
        rope = hf_config.rope_parameters
        self.temperature = None
        if rope.get("llama_4_scaling_beta") is not None:
            self.temperature = (_llama4_attn_scale(), rope.get("llama_4_scaling_beta"),
                                rope.get("original_max_position_embeddings"))

    def forward(self, q, k, position_ids):
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # the attention module's .view(...).transpose(1, 2)
        cos, sin = self.rotary_emb(q, position_ids)
        q, k = self.apply_rotary(q, k, cos, sin)
        if self.temperature is not None:
            scale_fn, beta, original_max = self.temperature
            q = q * scale_fn(position_ids, beta, original_max).to(q.dtype)
        return q, k


class FlashInferRope(nn.Module):
    """``apply_rope_with_cos_sin_cache`` with a float32 cos/sin cache built at init (untimed)."""

    layout = "flat"

    def __init__(self, hf_config, tokens: int, function: Callable):
        super().__init__()
        params = thinkfuse.ops.rope_params(hf_config)
        freqs = torch.arange(tokens, dtype=torch.float32)[:, None] * params.inv_freq[None, :]
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1) * params.attention_scaling
        self.register_buffer("cos_sin_cache", cache, persistent=False)  # [T, D]: cos | sin halves
        self.function = function
        self.llama4_scaling = params.llama4_scaling

    def forward(self, q, k, position_ids):
        head_dim = q.shape[-1]
        q_out, k_out = self.function(
            position_ids.reshape(-1), q.reshape(-1, q.shape[-2] * head_dim),
            k.reshape(-1, k.shape[-2] * head_dim), head_dim, self.cos_sin_cache, is_neox=True,
        )
        if self.llama4_scaling is not None:
            beta, original_max = self.llama4_scaling
            scale = 1 + beta * torch.log(1 + torch.floor(position_ids.reshape(-1, 1) / original_max))
            q_out = q_out * scale.to(q_out.dtype)
        return q_out, k_out


def _flashinfer_function(config: Config, mode: str) -> tuple[Optional[Callable], Optional[str]]:
    function, missing = harness.optional_attr("flashinfer", "apply_rope_with_cos_sin_cache")
    if missing is None:
        # Early FlashInfer releases had (q, k, cos_cache, sin_cache, pos_ids, interleave); the
        # current one is (positions, query, key, head_size, cos_sin_cache, is_neox). A wrapper
        # hiding the signature (*args) is given the benefit of the doubt.
        try:
            params = list(inspect.signature(function).parameters)
        except (TypeError, ValueError):
            params = []
        if "cos_cache" in params or params[:1] == ["q"]:
            missing = ("installed flashinfer's apply_rope_with_cos_sin_cache has the old signature "
                       f"({', '.join(params)})")
    if missing is None and config.device.type != "cuda":
        missing = "FlashInfer runs only on CUDA tensors (smoke mode is CPU)"
    if missing is None and mode == FWD_BWD:
        missing = "FlashInfer's apply_rope_with_cos_sin_cache is inference-only (no backward)"
    return function, missing


def _implementations(config: Config, group: RopeGroup, mode: str):
    """(implementation name, module factory (hf_config, tokens) -> module, compile it?,
    why missing) in table order."""
    # Every implementation builds the family's transformers config (the thinkfuse rows read
    # their RoPE parameters from it), so a transformers without the family is missing for all.
    hf_missing = _hf_missing(group)
    thinkfuse_impls = harness.thinkfuse_impls(config)
    impls = [
        (name, functools.partial(_thinkfuse_module, backend=backend), False, missing or hf_missing)
        for name, backend, missing in thinkfuse_impls
    ]
    impls += [
        (name + APPLY_ROTARY_SUFFIX, functools.partial(_apply_rotary_module, backend=backend), False,
         missing or hf_missing)
        for name, backend, missing in thinkfuse_impls
    ]
    impls.append((HF_EAGER, _hf_module, False, hf_missing))
    impls.append((TORCH_COMPILE, _hf_module, True, hf_missing))
    liger_fn, liger_missing = harness.liger_attr(config, "liger_kernel.transformers.rope", "liger_rotary_pos_emb")
    impls.append((LIGER, functools.partial(_hf_style_module, apply=liger_fn), False, hf_missing or liger_missing))
    flashinfer_fn, flashinfer_missing = _flashinfer_function(config, mode)
    impls.append((FLASHINFER, functools.partial(FlashInferRope, function=flashinfer_fn), False,
                  hf_missing or flashinfer_missing))
    return impls


def _thinkfuse_module(hf_config, tokens: int, backend: str) -> nn.Module:
    return ThinkfuseRope(hf_config, backend)


def _hf_style_module(hf_config, tokens: int, apply: Callable) -> nn.Module:
    return HFStyleRope(hf_config, apply)


def _hf_module(hf_config, tokens: int) -> nn.Module:
    return HFStyleRope(hf_config, _hf_apply_rotary_pos_emb())


def _apply_rotary_module(hf_config, tokens: int, backend: str) -> nn.Module:
    return HFStyleRope(hf_config, functools.partial(thinkfuse.ops.apply_rotary_pos_emb, backend=backend))


def _hf_missing(group: RopeGroup) -> Optional[str]:
    """Why transformers cannot provide this family's rotary module here, or None."""
    try:
        _family_classes(group.spec["family"])
        if group.spec["family"] == "ministral3":
            _llama4_attn_scale()
    except ImportError as exc:
        return f"installed transformers lacks the {group.spec['family']} modules ({exc})"
    return None


# ---------------------------------------------------------------------------------------------
# Inputs


def _build(make_module, compiled: bool, group: RopeGroup, tokens: int, mode: str, config: Config) -> Workload:
    device, dtype = config.device, config.dtype
    needs_grad = mode == FWD_BWD
    # .to(device) only: the rotary buffers (inv_freq, the FlashInfer cache) stay float32.
    module = make_module(_hf_config(group.spec), tokens).to(device)
    layout = module.layout
    if compiled:
        module = harness.compile_module(module, config)

    def activation(heads):
        return torch.randn(1, tokens, heads, group.head_dim, device=device, dtype=dtype, requires_grad=needs_grad)

    q, k = activation(group.q_heads), activation(group.kv_heads)
    position_ids = torch.arange(tokens, device=device, dtype=POSITION_DTYPE)[None]
    workload = Workload(forward=lambda: module(q, k, position_ids))
    if needs_grad:
        workload.inputs = (q, k)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        # HF-style outputs are [B, H, S, D] views: their gradients come in that layout too.
        workload.grad_outputs = (dq, dk) if layout == "bshd" else (dq.transpose(1, 2), dk.transpose(1, 2))
    return workload
