"""Pure-torch definitions of every thinkfuse op: the specification of truth and the
``torch`` backend.

Each function reproduces the Hugging Face transformers computation it replaces, rounding where
transformers rounds, so that the torch backend is bit-compatible with the unpatched model.
Gradients come from autograd.
"""

from __future__ import annotations

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (the tests' truth), float32 for everything else."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual=None):
    """``weight * (x32 * rsqrt(mean(x32**2, -1) + eps)).to(x.dtype)``, as Qwen2RMSNorm.

    With ``residual``: ``h = x + residual`` (in x's dtype) and the result is
    ``(rms_norm(h), h)``. Float64 inputs are computed in float64 (Qwen2RMSNorm would use
    float32): that is the truth the tests measure low-precision errors against.
    """
    if residual is not None:
        hidden = x + residual
        return rms_norm(hidden, weight, eps), hidden
    x32 = x.to(_compute_dtype(x))
    variance = x32.pow(2).mean(-1, keepdim=True)
    normed = x32 * torch.rsqrt(variance + eps)
    return weight * normed.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, computed in float32 and rounded once to the input dtype.

    Transformers' eager MLP (``act_fn(gate_proj(x)) * up_proj(x)``) rounds ``silu(gate)`` to the
    activation dtype before the multiply, so in bfloat16/float16 it can differ from this by one
    unit in the last place; in float32 the two agree.
    """
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x[..., d/2:], x[..., :d/2])``: the half-split rotation partner of ``x``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Transformers' ``apply_rotary_pos_emb``: ``x * cos + rotate_half(x) * sin`` for q and k.

    ``cos``/``sin`` ``[B, S, D]`` are unsqueezed at ``unsqueeze_dim`` to broadcast against
    ``[B, H, S, D]`` (1) or ``[B, S, H, D]`` (2). Each product and the sum are rounded to the
    promoted dtype of q and cos, as in transformers.
    """
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
    """Float32 ``(cos, sin)`` ``[B, S, D]`` as transformers' rotary embedding module computes
    them, before its cast to the activation dtype."""
    freqs = position_ids[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def llama4_query_scale(position_ids: torch.Tensor, beta: float, original_max_position: int):
    """Ministral 3's query temperature ``1 + beta * log(1 + floor(pos / L0))``, float32 ``[B, S]``."""
    return 1 + beta * torch.log(1 + torch.floor(position_ids / original_max_position))


def rope(q, k, position_ids, inv_freq, attention_scaling: float = 1.0, llama4_scaling=None):
    """RoPE on q ``[B, S, Hq, D]`` and k ``[B, S, Hkv, D]`` at ``position_ids`` ``[B|1, S]``.

    Transformers' rotary embedding (float32 cos/sin times ``attention_scaling``, cast to the
    activation dtype) followed by ``apply_rotary_pos_emb`` with ``unsqueeze_dim=2``. With
    ``llama4_scaling = (beta, L0)`` the rotated q (only q) is then multiplied by
    ``llama4_query_scale`` cast to q's dtype, as Ministral 3's attention does.
    """
    cos, sin = rope_cos_sin(position_ids, inv_freq, attention_scaling)
    q_out, k_out = apply_rotary_pos_emb(q, k, cos.to(q.dtype), sin.to(q.dtype), unsqueeze_dim=2)
    if llama4_scaling is not None:
        scale = llama4_query_scale(position_ids, *llama4_scaling)
        q_out = q_out * scale[:, :, None, None].to(q_out.dtype)
    return q_out, k_out


def token_logprobs(logits, token_ids, temperature: float = 1.0, return_entropy: bool = False):
    """Float32 ``log_softmax(logits / temperature)[..., token]`` for logits ``[..., V]`` and
    token_ids ``[...]`` (and, with ``return_entropy``, the float32 entropy of that distribution).
    Float64 logits are computed in float64: that is the truth the tests measure errors against.

    A position whose token id is negative (padding, ``-100``) gives 0 for both outputs and no
    gradient. Token ids must be below V (checked by the public op).
    """
    ignored = token_ids < 0
    # An ignored row gets no gradient: its logits are replaced before the softmax (with where,
    # which passes no gradient to them), so even a row of all -inf (whose softmax is NaN) gives 0.
    logits = torch.where(ignored[..., None], torch.zeros((), dtype=logits.dtype, device=logits.device), logits)
    logp = torch.log_softmax(logits.to(_compute_dtype(logits)) / temperature, dim=-1)
    picked = logp.gather(-1, token_ids.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)
    # where() rather than multiplying by a mask, so no gradient reaches ignored rows
    picked = torch.where(ignored, torch.zeros_like(picked), picked)
    if not return_entropy:
        return picked
    # -inf logits (a masked vocabulary) have p = 0 and add nothing; without the where, 0 * -inf
    # would make the entropy and its gradient NaN.
    finite_logp = torch.where(torch.isneginf(logp), torch.zeros_like(logp), logp)
    entropy = -(logp.exp() * finite_logp).sum(-1)
    # A row with no finite logit has no distribution: its log-prob is NaN and its entropy 0 (the
    # kernels' convention; softmax would make it NaN).
    empty = torch.isneginf(logits).all(-1)
    return picked, torch.where(ignored | empty, torch.zeros_like(entropy), entropy)


def fused_linear_token_logprobs(
    hidden, weight, token_ids, bias=None, temperature: float = 1.0, return_entropy: bool = False
):
    """``token_logprobs(F.linear(hidden, weight, bias), ...)``: the lm_head's logits (in the
    activation dtype, as transformers computes them) followed by their log-probabilities.

    This definition materialises the full logits; the op does not.
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return token_logprobs(logits, token_ids, temperature, return_entropy)


# ---------------------------------------------------------------------------------------------
# mtp_verify: speculative verification of K draft tokens against the target's K+1 logits rows.


def mtp_verify(draft_tokens, target_logits, temperature: float = 0.0, draft_probs=None, uniforms=None):
    """Verify drafts ``[B, K]`` against ``target_logits`` ``[B, K+1, V]``.

    Returns ``(tokens [B, K+1] int64, num_accepted [B] int64)``: the accepted drafts, then one
    token drawn from the target (the correction at the first rejection, or the bonus after K
    acceptances), then -1 padding. A draft id outside ``[0, V)`` is rejected.

    ``temperature == 0``: greedy, accept while the draft equals the target's argmax (ties to the
    lowest id, as torch.argmax), emit the argmax. ``temperature > 0``: rejection sampling, exact
    for ``q = softmax(target_logits / temperature)``: accept draft x with probability
    ``min(1, q(x)/p(x))`` (``p(x) = 1`` when ``draft_probs`` is None, a deterministic draft), and
    at the first rejection draw from ``normalise(max(q - p, 0))`` (deterministic draft: q without
    x); after K acceptances draw the bonus from q_K. ``uniforms`` ``[B, K+1]`` in [0, 1) hold the
    randomness: column j < K decides acceptance at j (accept iff ``u * p(x) < q(x)``), column K
    drives the single draw, by inverse CDF over the vocabulary in id order. When no token can be
    drawn (all weights zero or NaN) the target's argmax is emitted.
    """
    if temperature == 0:
        return _greedy_verify(draft_tokens, target_logits)
    return _sampled_verify(draft_tokens, target_logits, temperature, draft_probs, uniforms)


def _emit(draft, num_accepted, final_token):
    """Row layout: the first num_accepted drafts, then final_token, then -1."""
    batch, k = draft.shape
    cols = torch.arange(k + 1, device=draft.device)[None, :]
    padded_draft = torch.cat([draft, draft.new_full((batch, 1), -1)], dim=1)
    n = num_accepted[:, None]
    tokens = torch.where(cols < n, padded_draft, torch.full_like(padded_draft, -1))
    return torch.where(cols == n, final_token[:, None], tokens), num_accepted


def _accepted_prefix(accept):
    """Number of leading True per row of ``accept`` ``[B, K]``."""
    return accept.long().cumprod(dim=-1).sum(dim=-1)


def _greedy_verify(draft_tokens, target_logits):
    draft = draft_tokens.long()
    k = draft.shape[1]
    target = target_logits.argmax(dim=-1)  # [B, K+1]
    num_accepted = _accepted_prefix(draft == target[:, :k])
    return _emit(draft, num_accepted, target.gather(1, num_accepted[:, None])[:, 0])


def _sampled_verify(draft_tokens, target_logits, temperature, draft_probs, uniforms):
    draft = draft_tokens.long()
    batch, k = draft.shape
    vocab = target_logits.shape[-1]
    x = target_logits.float() / temperature
    unnormalised = torch.exp(x - x.amax(dim=-1, keepdim=True))
    q = unnormalised / unnormalised.sum(dim=-1, keepdim=True)  # [B, K+1, V]

    valid = (draft >= 0) & (draft < vocab)
    safe = draft.clamp(0, vocab - 1)[..., None]
    q_draft = torch.where(valid, q[:, :k].gather(-1, safe)[..., 0], torch.zeros_like(q[:, :k, 0]))
    p_draft = 1.0 if draft_probs is None else draft_probs.float().gather(-1, safe)[..., 0]
    num_accepted = _accepted_prefix(valid & (uniforms[:, :k].float() * p_draft < q_draft))

    rows = torch.arange(batch, device=draft.device)
    weights = q[rows, num_accepted]  # [B, V]: q at the position of the final token
    residual = num_accepted < k
    at = num_accepted.clamp(max=max(k - 1, 0))
    if k > 0 and draft_probs is None:
        # deterministic draft rejected: q with that draft token removed
        removed = residual & valid[rows, at]
        # a comparison, not indexing by a mask: no data-dependent shapes (torch.compile, meta)
        ids = torch.arange(vocab, device=draft.device)
        drop = removed[:, None] & (ids[None, :] == draft[rows, at][:, None])
        weights = weights.masked_fill(drop, 0.0)
    elif k > 0:
        leftover = (weights - draft_probs[rows, at].float()).clamp(min=0)
        weights = torch.where(residual[:, None], leftover, weights)

    fallback = target_logits[rows, num_accepted].argmax(dim=-1)
    final = _inverse_cdf(weights, uniforms[:, k], fallback)
    return _emit(draft, num_accepted, final)


def _inverse_cdf(weights, u, fallback):
    """Per row, the first id whose cumulative weight exceeds ``u * total``; when rounding leaves
    none, the last id with positive weight; when no weight is positive, ``fallback``."""
    vocab = weights.shape[-1]
    weights = torch.nan_to_num(weights.double(), nan=0.0).clamp(min=0)
    cdf = weights.cumsum(dim=-1)
    threshold = u.double()[:, None] * cdf[:, -1:]
    crossed = (cdf > threshold) & (weights > 0)
    ids = torch.arange(vocab, device=weights.device)
    first = torch.where(crossed, ids, vocab).amin(dim=-1)
    last_positive = torch.where(weights > 0, ids, -1).amax(dim=-1)
    token = torch.where(first < vocab, first, last_positive)
    return torch.where(token >= 0, token, fallback)


# --- attention ---------------------------------------------------------------------------------


def _attention_dense(q, k, v, causal, scale, sliding_window):
    """One sequence: q [Sq, Hq, D], k/v [Sk, Hkv, D]. Returns (out [Sq, Hq, D] in the compute
    dtype, lse [Hq, Sq]). Plain softmax(QK^T)V with explicit masks; rows that see no key give
    zeros (and an lse of -inf)."""
    sq, hq, _ = q.shape
    sk, hkv, _ = k.shape
    group = hq // hkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    rows = torch.arange(sq, device=q.device)[:, None] + (sk - sq)  # bottom-right aligned position
    cols = torch.arange(sk, device=q.device)[None, :]
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        visible &= cols <= rows
    if sliding_window is not None:
        visible &= cols > rows - sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True).detach() if sk else scores.new_full((hq, sq, 1), float("-inf"))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(scores - m)
    l = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(l == 0, torch.ones_like(l), l)
    out = torch.einsum("hqk,khd->qhd", p, v)
    lse = (torch.log(l) + m).squeeze(-1)
    return out, lse


def flash_attention(
    q,
    k,
    v,
    causal: bool = True,
    softmax_scale=None,
    sliding_window=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    return_lse: bool = False,
):
    """``softmax(scale * Q K^T + mask) V`` in float32 (float64 inputs stay float64).

    Layout ``[B, S, H, D]``, or ``[total, H, D]`` with ``cu_seqlens_q/k``. GQA: query head h uses
    kv head ``h // (Hq // Hkv)``. The causal mask is bottom-right aligned (query i of Sq sits at
    key position ``i + Sk - Sq``); ``sliding_window=w`` keeps keys ``pos - w < j <= pos``. Rows
    that see no key output zeros. The lse is ``[B, H, Sq]`` (or ``[H, total]``), float32.
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    compute = _compute_dtype(q)
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    if cu_seqlens_q is None:
        outs, lses = zip(*(_attention_dense(qc[b], kc[b], vc[b], causal, scale, sliding_window)
                           for b in range(q.shape[0]))) if q.shape[0] else ((), ())
        out = torch.stack(outs) if outs else _empty_output(qc, kc, vc)
        lse = torch.stack(lses) if lses else qc.new_empty((0, q.shape[2], q.shape[1]))
    else:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs, lses = [], []
        for b in range(len(cq) - 1):
            o, l = _attention_dense(qc[cq[b]:cq[b + 1]], kc[ck[b]:ck[b + 1]], vc[ck[b]:ck[b + 1]],
                                    causal, scale, sliding_window)
            outs.append(o)
            lses.append(l)
        out = torch.cat(outs, dim=0) if outs else _empty_output(qc, kc, vc)
        lse = torch.cat(lses, dim=1) if lses else qc.new_empty((q.shape[1], 0))
    out = out.to(q.dtype)
    return (out, lse.to(torch.float32)) if return_lse else out


def _empty_output(q, k, v):
    """The (empty) output of a batch without sequences, still attached to q, k and v's graph:
    a backward through it must give their (empty or zero) gradients, not fail."""
    return q * 0 + (k.sum() + v.sum()) * 0


def decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=None, sliding_window=None,
                     cache_leftpad=None):
    """Attention of ``q [B, Sq, Hq, D]`` (the last Sq valid positions of each row) over the
    entries ``[cache_leftpad[b], cache_seqlens[b])`` of ``k_cache``/``v_cache`` ``[B, S_max, Hkv, D]``
    (no leftpad: from 0); causal among the query tokens (bottom-right aligned), with an optional
    sliding window. Left padding shifts every position of a row alike, so causality and the
    window are the same counted in cache slots or in the row's own keys."""
    outs = []
    for b in range(q.shape[0]):
        n = min(int(cache_seqlens[b]), k_cache.shape[1])
        start = 0 if cache_leftpad is None else min(max(int(cache_leftpad[b]), 0), max(n, 0))
        outs.append(flash_attention(q[b:b + 1], k_cache[b:b + 1, start:n], v_cache[b:b + 1, start:n],
                                    causal=True, softmax_scale=softmax_scale, sliding_window=sliding_window))
    return torch.cat(outs, dim=0) if outs else q.new_empty(q.shape)
