"""Decoding over static KV caches, one CUDA graph per step, greedy or sampled: MTP speculative
decoding (``mtp_generate(..., cuda_graph=True)``) and plain decoding (``static_generate``).

Why: at batch 1 a MiMo-7B decode step through transformers is host-bound. On the 2026-11-23 H100
it took ~48 ms of host time for ~8 ms of GPU work. Replaying a captured step removes the host
cost per kernel, as vLLM and SGLang do.

How: the trunk and the MTP layer run from their modules' weights here, not through
transformers' forward, over caches preallocated for the whole generation (``[B, max_len, Hkv,
D]`` per layer). Every step has the same shapes and keeps its state in device tensors, so the
step can be captured once and replayed:
- ``length [B]``: verified tokens per row, the same in both caches;
- ``pending`` / ``draft [B]``: the next token and the MTP layer's guess for the one after it.

One step:
1. The trunk runs ``[pending, draft]`` at positions ``length, length + 1``, writes both slots
   and attends with ``decode_attention`` over ``length + 2`` keys.
2. ``mtp_verify`` gives ``tokens [B, 2]`` and ``accepted [B]`` (0 or 1).
3. The MTP layer runs both rows ``(h_L, tokens[:, 0])`` and ``(h_L+1, tokens[:, 1])`` at the
   same positions. Row 0 is always a verified pair. Row 1 is one only when the draft was
   accepted, and its draft is then the one used.
4. The row's length advances by ``1 + accepted``.

A rejected slot (trunk or MTP) lies beyond the new length: the next step writes over it, and
no attention reads past a row's length. So rows that accept different counts need no rollback
and no masks.

Left-padded prompts: ``length`` counts cache slots, the padding included. A row's RoPE
positions are its slots minus its padding (as generate numbers a left-padded prompt), and its
attention skips the padding slots in place (``decode_attention``'s ``cache_leftpad``; the
prefill runs varlen over the prompt's tokens).

``static_generate`` (greedy or sampled; ``greedy_generate`` is its temperature 0) runs the same
engine without the MTP layer: one token per step, for the causal LMs of Qwen2, Mistral,
Ministral 3 and MiMo (its trunk); other families are refused, even with the same modules (see
STATIC_DECODE_MODEL_TYPES). It is the plain decoding that speculation has to beat once host cost
is gone.

Sampling (``temperature > 0``, with top-k / top-p / min-p): each plain token, and with MTP the
first token and each draft, are sampled from the filtered softmax (thinkfuse.sampling, as
``mtp_generate``'s dynamic loop); a draft's distribution is kept in a ``[B, V]`` float32
buffer for ``mtp_verify``'s exact rejection sampling. The random draws come from the
generator's state, which the capture registers, so each replay draws new numbers.

Scope: prompts unpadded or left-padded. Greedy, in float32 both equal ``generate``'s greedy
output token for token; in bf16/fp16 the fused rope and attention round as thinkfuse's patched
modules do (within tolerance of transformers, not bit for bit). The
modules are called as they are, patched by thinkfuse or not. On CPU the same steps run eagerly
(that is how CI tests them); graphs are captured only on CUDA.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from ._checks import check_float, check_generator
from .backend import cuda_has_op, get_backend, triton_interpreter_enabled, why_unavailable
from .patching.forwards import attention_window, has_static_rope
from .rope_params import llama4_scaling, rope_params
from .sampling import Sampling, pick, verify, warpers

#: Eager steps before the capture: they compile the Triton kernels and let cuBLAS choose its
#: algorithms, so neither happens while capturing. They are real steps (their tokens count).
WARMUP_STEPS = 2

#: The kernels' dtypes (float64 models decode with mtp_generate's default path).
STATIC_DECODE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


#: The families whose decoder layer the engine re-implements. Others with the same modules compute
#: something else (Qwen3: q/k norms in the attention; Granite: embedding and logit multipliers),
#: so the module layout alone does not admit a model.
STATIC_DECODE_MODEL_TYPES = ("qwen2", "mistral", "ministral3", "mimo")


def check_layout(model) -> None:
    """TypeError unless ``model`` is a causal LM of a family and layout the static decoder runs."""
    base = getattr(model, "model", None)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not all(hasattr(base, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")) or not hasattr(
            model, "lm_head") or model_type not in STATIC_DECODE_MODEL_TYPES:
        raise TypeError(f"static decoding needs a causal LM of Qwen2, Mistral, Ministral 3 or MiMo (model_type one of "
                        f"{STATIC_DECODE_MODEL_TYPES}, with model.{{embed_tokens, layers, norm, rotary_emb}} and "
                        f"lm_head), got {type(model).__name__} (model_type {model_type!r})")


def check_static_decode_applies(model, attention_mask: Tensor | None) -> None:
    """Raise ValueError (TypeError for a model without the layout) when the static path cannot
    serve the call (see the module doc)."""
    check_layout(model)
    attn = model.model.layers[0].self_attn
    if attn.k_proj.weight.dtype not in STATIC_DECODE_DTYPES:
        raise ValueError(f"static decoding runs float32, float16 or bfloat16 models, got {attn.k_proj.weight.dtype}")
    if not has_static_rope(attn):
        raise ValueError("static decoding needs a rope whose frequencies do not change with the length "
                         "(not dynamic or longrope)")
    rope_params(model.config)  # raises ValueError for a rope type thinkfuse does not implement
    if attention_mask is not None and not _is_left_padding(attention_mask):
        raise ValueError("static decoding takes unpadded or left-padded prompts (attention_mask: each row zeros, "
                         "then at least one one)")


def _is_left_padding(attention_mask: Tensor) -> bool:
    """Whether every row of the ``[B, P]`` mask is zeros then ones, with at least one one."""
    valid = attention_mask != 0
    return bool(((valid[:, 1:] >= valid[:, :-1]).all() & valid[:, -1].all()).item())


class StaticDecoder:
    """The caches and the per-step state of one generation (see the module doc); with ``mtp``,
    the MTP layer's cache and draft too (and, sampling, the draft's distribution)."""

    def __init__(self, model, batch: int, max_len: int, device: torch.device, cuda_graph: bool, mtp: bool,
                 sampling: Sampling | None = None):
        self.model = model
        self.sampling = Sampling(0.0) if sampling is None else sampling
        base = model.model
        self.layers = list(base.layers)
        self.mtp_layer = base.mtp_layers[0] if mtp else None
        # The model's own rotary buffer and scaling, as its forward uses them (a model cast to
        # bfloat16 after construction holds a rounded inv_freq, which generate then uses too);
        # Ministral 3's query temperature from its config, as thinkfuse's patch reads it.
        rotary = base.rotary_emb
        self.inv_freq = rotary.inv_freq.float()
        self.attention_scaling = float(rotary.attention_scaling)
        self.llama4_scaling = llama4_scaling(model.config)
        attn = self.layers[0].self_attn
        kv_heads = model.config.num_key_value_heads
        dtype = attn.k_proj.weight.dtype

        def cache() -> Tensor:
            return torch.zeros(batch, max_len, kv_heads, attn.head_dim, dtype=dtype, device=device)

        self.trunk_kv = [(cache(), cache()) for _ in self.layers]
        self.mtp_kv = (cache(), cache()) if mtp else None
        self.rows = torch.arange(batch, device=device)[:, None]
        self.offsets = torch.arange(2, device=device)[None]
        # Under capture, automatic selection runs decode on Triton while eager calls run the cuda
        # kernel: the warm-up steps must run what the graph will hold.
        graphs = cuda_graph and device.type == "cuda"
        self.decode_backend = _graph_decode_backend() if graphs else None
        self.length = torch.zeros(batch, dtype=torch.long, device=device)
        # Left padding (set by prefill): padding slots per row, as int64 for positions and int32
        # for decode_attention; the prompt's varlen plan (None: no padding).
        self.padding = torch.zeros(batch, dtype=torch.long, device=device)
        self.cache_leftpad = None
        self.prompt_tokens = None
        self.pending = torch.zeros(batch, dtype=torch.long, device=device)
        self.draft = torch.zeros(batch, dtype=torch.long, device=device)
        self.draft_probs = None
        if mtp and not self.sampling.greedy:
            vocab = model.lm_head.weight.shape[0]
            self.draft_probs = torch.zeros(batch, vocab, dtype=torch.float32, device=device)

    # --- the model, from its modules ---------------------------------------------------------

    def _positions(self, slots: Tensor) -> Tensor:
        """RoPE positions of cache ``slots`` ``[B, S]``: a row's tokens count from its first
        token (padding slots get 0)."""
        return (slots - self.padding[:, None]).clamp(min=0)

    def _attention(self, attn, x: Tensor, slots: Tensor, kv: tuple[Tensor, Tensor], prefill: bool) -> Tensor:
        batch, seq, _ = x.shape
        q = attn.q_proj(x).view(batch, seq, -1, attn.head_dim)
        k = attn.k_proj(x).view(batch, seq, -1, attn.head_dim)
        v = attn.v_proj(x).view(batch, seq, -1, attn.head_dim)
        q, k = ops.rope(q, k, self._positions(slots), self.inv_freq, attention_scaling=self.attention_scaling,
                        llama4_scaling=self.llama4_scaling)
        k_cache, v_cache = kv
        k_cache[self.rows, slots] = k.to(k_cache.dtype)
        v_cache[self.rows, slots] = v.to(v_cache.dtype)
        window = attention_window(attn) or None  # 0 in some configs: full attention
        if prefill:  # the prompt: causal attention over itself
            out = self._prompt_attention(q, k, v, attn.scaling, window)
        else:  # each row attends to its slots [padding, slots[:, -1] + 1), the queries included
            seqlens = (slots[:, -1] + 1).to(torch.int32)
            out = ops.decode_attention(q, k_cache, v_cache, seqlens, softmax_scale=attn.scaling,
                                       sliding_window=window, cache_leftpad=self.cache_leftpad,
                                       backend=self.decode_backend)
        return attn.o_proj(out.reshape(batch, seq, -1))

    def _prompt_attention(self, q: Tensor, k: Tensor, v: Tensor, scale: float, window) -> Tensor:
        """Causal attention of the prompt over itself; a left-padded one runs varlen over its
        tokens (the padding rows' outputs are 0: nothing reads them)."""
        if self.prompt_tokens is None:
            return ops.flash_attention(q, k, v, causal=True, softmax_scale=scale, sliding_window=window)
        index, cu_seqlens, longest = self.prompt_tokens
        batch, seq = q.shape[:2]

        def tokens(t: Tensor) -> Tensor:
            return t.reshape(batch * seq, *t.shape[2:]).index_select(0, index)

        out = ops.flash_attention(tokens(q), tokens(k), tokens(v), causal=True, softmax_scale=scale,
                                  sliding_window=window, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                  max_seqlen_q=longest, max_seqlen_k=longest)
        return out.new_zeros(batch * seq, *out.shape[1:]).index_copy(0, index, out).view(q.shape)

    def _layer(self, layer, h: Tensor, slots: Tensor, kv, prefill: bool) -> Tensor:
        """The decoder layer's forward (pre-norm attention and MLP, residuals)."""
        h = h + self._attention(layer.self_attn, layer.input_layernorm(h), slots, kv, prefill)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def trunk(self, ids: Tensor, slots: Tensor, prefill: bool = False) -> tuple[Tensor, Tensor]:
        """(last decoder layer's output before the final norm, logits) of ``ids`` ``[B, S]``; a
        prefill's logits are the last position's only."""
        h = self.model.model.embed_tokens(ids)
        for layer, kv in zip(self.layers, self.trunk_kv):
            h = self._layer(layer, h, slots, kv, prefill)
        return h, self.model.lm_head(self.model.model.norm(h[:, -1:] if prefill else h))

    def mtp(self, hidden: Tensor, next_ids: Tensor, slots: Tensor, prefill: bool = False) -> Tensor:
        """The MTP layer's logits (for tokens t+2) of rows t at cache ``slots`` (MiMoMTPLayer); a
        prefill's are the last row's only."""
        mtp = self.mtp_layer
        embeds = self.model.model.embed_tokens(next_ids)
        # trained without the token at position 0 (a row's first token, after its padding)
        embeds = embeds.masked_fill((self._positions(slots) == 0)[..., None], 0.0)
        fused = mtp.input_proj(torch.cat([mtp.hidden_layernorm(hidden), mtp.token_layernorm(embeds)], dim=-1))
        h = self._layer(mtp, fused, slots, self.mtp_kv, prefill)
        return self.model.lm_head(mtp.final_layernorm(h[:, -1:] if prefill else h))

    # --- generation ---------------------------------------------------------------------------

    def _set_padding(self, attention_mask: Tensor | None) -> None:
        """Left padding of the prompt (a checked ``[B, P]`` mask, or None): per-row padding
        counts on the device and the prompt's varlen plan (host reads: the prefill is eager)."""
        if attention_mask is None or bool((attention_mask != 0).all()):
            return
        valid = attention_mask != 0
        lengths = valid.sum(-1)
        self.padding.copy_(valid.shape[1] - lengths)
        self.cache_leftpad = self.padding.to(torch.int32)
        index = torch.nonzero(valid.flatten()).flatten()
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        self.prompt_tokens = (index, cu_seqlens, int(lengths.max()))

    def prefill(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Fill the caches with the prompt (left-padded where ``attention_mask`` says so);
        returns the first new token ``[B]`` (and, with the MTP layer, sets its draft of the
        token after)."""
        batch, prompt = input_ids.shape
        self._set_padding(attention_mask)
        positions = torch.arange(prompt, device=input_ids.device)[None].expand(batch, -1)
        hidden, logits = self.trunk(input_ids, positions, prefill=True)
        first, _ = pick(logits[:, -1], self.sampling)
        self.length.fill_(prompt)
        self.pending.copy_(first)
        if self.mtp_layer is not None:
            # MTP row t pairs h_t with token t+1; the last row with the token just chosen.
            next_ids = torch.cat([input_ids[:, 1:], first[:, None]], dim=1)
            self._set_draft(self.mtp(hidden, next_ids, positions, prefill=True)[:, -1])
        return first

    def _set_draft(self, draft_logits: Tensor) -> None:
        """The MTP layer's guess from its logits ``[B, V]`` (argmax, or a sample kept with its
        distribution for the verification)."""
        draft, probs = pick(draft_logits, self.sampling)
        self.draft.copy_(draft)
        if probs is not None:
            self.draft_probs.copy_(probs)

    def plain_step(self, out, stats: dict) -> None:
        """One step (one token per row, argmax or sampled), in place on the state and ``out``: no
        host synchronisation, so it can be captured."""
        generating = ~out.done_rows()
        _, logits = self.trunk(self.pending[:, None], self.length[:, None])
        token, _ = pick(logits[:, 0], self.sampling)
        out.append(token[:, None], torch.ones_like(token))
        self.pending.copy_(token)
        self.length.add_(generating.long())  # done rows stay where they are

    def mtp_step(self, out, stats: dict) -> None:
        """One verify step, in place on the state, ``out`` (speculative._NewTokens) and the
        device counters of ``stats``: no host synchronisation, so it can be captured."""
        generating = ~out.done_rows()
        positions = self.length[:, None] + self.offsets
        hidden, logits = self.trunk(torch.stack([self.pending, self.draft], dim=1), positions)
        draft_probs = None if self.draft_probs is None else self.draft_probs[:, None]
        tokens, accepted = verify(self.draft[:, None], logits, self.sampling, draft_probs)
        draft_logits = self.mtp(hidden, tokens.clamp(min=0), positions)
        stats["drafted"].add_(generating.sum())
        stats["accepted"].add_((accepted * generating).sum())
        out.append(tokens, accepted + 1)
        row = accepted[:, None]  # the MTP row after the last verified token
        self.pending.copy_(tokens.gather(1, row)[:, 0])
        vocab = draft_logits.shape[-1]
        self._set_draft(draft_logits.gather(1, row[..., None].expand(-1, -1, vocab))[:, 0])
        # rows that are done stay where they are, so the caches never outgrow max_len
        self.length.add_((accepted + 1) * generating)


def _graph_decode_backend() -> str:
    """The decode attention for captured steps: the backend named (use_backend, set_backend,
    THINKFUSE_BACKEND), else Triton's (the faster kernel once host cost is gone; not the
    interpreter's, which copies to the host and cannot be captured), else the cuda kernel, else
    the torch form (no host syncs either)."""
    named = get_backend()
    if named is not None:
        return named
    if why_unavailable("triton") is None and not triton_interpreter_enabled():
        return "triton"
    return "cuda" if cuda_has_op("decode_attention") else "torch"


def _on_one_device(model, device: torch.device) -> bool:
    """Whether every parameter of ``model`` is on ``device``: a graph captured on one GPU does
    not record the kernels of a model split over several (device_map)."""
    return all(p.device == device for p in model.parameters())


def static_mtp_decode(model, input_ids: Tensor, out, cuda_graph: bool, attention_mask: Tensor | None = None,
                      sampling: Sampling | None = None) -> dict:
    """MTP generation into ``out`` (speculative._NewTokens), greedy or as ``sampling`` says;
    returns the stats (device counters for accepted/drafted, ints for the rest, and
    ``cuda_graph``: whether the steps after the warm-up were replays of a captured one)."""
    return _on_model_device(input_ids.device,
                            lambda: _decode(model, input_ids, out, cuda_graph, mtp=True, attention_mask=attention_mask,
                                            sampling=sampling))


def static_generate(model, input_ids: Tensor, *, max_new_tokens: int, attention_mask: Tensor | None = None,
                    eos_token_id=None, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, min_p: float | None = None,
                    generator: torch.Generator | None = None, cuda_graph: bool = True):
    """Plain decoding (no speculation) over static caches, each step replayed from a CUDA graph
    on a GPU (that is the point of this function, hence ``cuda_graph=True`` by default; False, or
    a CPU model, runs the same steps eagerly).

    model: a causal LM of the Qwen2 / Mistral / Ministral 3 / MiMo layout (patched or not);
    input_ids ``[B, P]``, left-padded where ``attention_mask`` (if given) has zeros: each row
    zeros, then ones.
    ``temperature`` 0: greedy, ``generate``'s tokens. Above 0: each token sampled from
    ``softmax(logits / temperature)`` filtered by ``top_k`` / ``top_p`` / ``min_p`` as
    ``generate(do_sample=True, ...)`` filters (its classes, its order; as ``mtp_generate``,
    nothing is taken from the generation config), drawn from ``generator``.
    ``eos_token_id`` as in ``mtp_generate``. Returns ``(sequences, stats)`` like
    ``mtp_generate``: sequences ``[B, P + new]``; stats ``target_forwards``, ``steps``,
    ``new_tokens``, ``cuda_graph``.
    """
    from .speculative import _NewTokens, _check_ids, _check_mask, _eos_ids, _pad_id

    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
    check_layout(model)
    _check_ids(model, input_ids, max_new_tokens)
    _check_mask(input_ids, attention_mask)
    check_static_decode_applies(model, attention_mask)
    # the device type only: a model split over GPUs draws where its logits are, checked there
    check_generator(generator, torch.device(input_ids.device.type), "input_ids")
    sampling = Sampling(check_float("temperature", temperature, non_negative=True), generator,
                        warpers(top_k, top_p, min_p))
    eos_ids = _eos_ids(model, eos_token_id, input_ids.device)
    out = _NewTokens(input_ids.shape[0], max_new_tokens, eos_ids, _pad_id(model, eos_ids), input_ids.device)
    stats = {"target_forwards": 0, "steps": 0, "cuda_graph": False}
    if max_new_tokens > 0:
        with torch.no_grad():
            stats = _on_model_device(input_ids.device,
                                     lambda: _decode(model, input_ids, out, cuda_graph, mtp=False,
                                                     attention_mask=attention_mask, sampling=sampling))
    stats["new_tokens"] = int(out.count.sum())
    return torch.cat([input_ids, out.columns()], dim=1), stats


def greedy_generate(model, input_ids: Tensor, *, max_new_tokens: int, attention_mask: Tensor | None = None,
                    eos_token_id=None, cuda_graph: bool = True):
    """``static_generate`` at temperature 0: greedy ``generate``'s tokens, from replayed steps."""
    return static_generate(model, input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                           eos_token_id=eos_token_id, cuda_graph=cuda_graph)


def _on_model_device(device: torch.device, run):
    if device.type != "cuda":
        return run()
    # Streams, synchronisation and capture act on the current device: make it the model's.
    with torch.cuda.device(device):
        return run()


def _decode(model, input_ids: Tensor, out, cuda_graph: bool, mtp: bool, attention_mask: Tensor | None = None,
            sampling: Sampling | None = None) -> dict:
    batch, prompt = input_ids.shape
    device = input_ids.device
    decoder = StaticDecoder(model, batch, prompt + out.max_new_tokens + 2, device, cuda_graph, mtp, sampling)
    step = decoder.mtp_step if mtp else decoder.plain_step
    stats = {"target_forwards": 1, "steps": 0}
    if mtp:  # counted on the device inside the step (read once at the end)
        stats |= {name: torch.zeros((), dtype=torch.long, device=device) for name in ("accepted", "drafted")}
    first = decoder.prefill(input_ids, attention_mask)
    out.append(first[:, None], torch.ones_like(first))
    capture = cuda_graph and device.type == "cuda"
    if capture and not _on_one_device(model, device):
        warnings.warn("static decoding: the model's parameters are on several devices; running the steps eagerly",
                      RuntimeWarning, stacklevel=3)
        capture = False
    # Warm-up steps before a capture run on a side stream, as torch.cuda.graphs asks; the
    # capture uses the same stream (the model's device's, not torch.cuda.graph's shared one).
    side = torch.cuda.Stream(device) if capture else None
    graph = None
    while not out.done():  # one host sync per step: the queue holds at most one step
        if capture and graph is None and stats["steps"] >= WARMUP_STEPS:
            graph = _capture(lambda: step(out, stats), side, decoder.sampling)
            capture = graph is not None
        if graph is not None:
            graph.replay()
        elif side is not None:
            _on_stream(side, lambda: step(out, stats))
        else:
            step(out, stats)
        stats["steps"] += 1
        stats["target_forwards"] += 1
    stats["cuda_graph"] = graph is not None
    return stats


def _on_stream(stream: "torch.cuda.Stream", fn) -> None:
    """``fn()`` on ``stream``, ordered after and before the current stream's work."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)


def _capture(step, stream: "torch.cuda.Stream", sampling: Sampling | None = None) -> "torch.cuda.CUDAGraph | None":
    """``step`` captured into a CUDA graph on ``stream`` (not run: capture records the kernels
    only), or None with a warning when something in it cannot be captured: the state is then
    untouched and the generation goes on with eager steps.

    ``stream`` must be a side stream of the model's device. torch.cuda.graph's default capture
    stream is one per process, created on whichever GPU captured first, and entering the
    capture makes that GPU current.

    ``sampling``: a sampled step's generator (the default one is registered by torch) is
    registered, so that each replay draws new numbers from it and advances it. A sampled step
    that cannot be captured raises instead of going on eagerly: a capture that fails part way may
    leave the generators in their capturing state (torch versions differ), and the eager steps
    would then fail, or draw from a corrupt state."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    sampled = sampling is not None and not sampling.greedy
    if sampled and sampling.generator is not None:
        graph.register_generator_state(sampling.generator)
    current = torch.cuda.current_stream()
    try:
        # thread_local: CUDA calls of other threads (a data loader, say) do not end the capture
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            step()
    except RuntimeError as exc:
        if sampled:
            raise RuntimeError(f"static decoding: the sampled step could not be captured ({exc}); "
                               "mtp_generate(cuda_graph=False) samples without graphs") from exc
        warnings.warn(f"static decoding: the step could not be captured, running it eagerly: {exc}",
                      RuntimeWarning, stacklevel=3)
        torch.cuda.synchronize()
        return None
    finally:
        # A failed capture_end leaves the capture stream current (torch.cuda.graph restores the
        # stream only after capture_end returns): the eager steps and the caller must not run on it.
        torch.cuda.set_stream(current)
    return graph
