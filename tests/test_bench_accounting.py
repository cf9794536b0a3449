"""The benchmark's FLOP and byte accounting, checked by brute force rather than by restating the
formulas: unmasked (q, k) pairs counted on explicit masks, matmul FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` while the real workloads run, bytes summed over the
tensors the workloads actually allocate (their real shapes and dtypes), and the harness's unit
conversions on numbers worked out by hand. A wrong formula here would make a results table claim
a speed the code does not have."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import attention, e2e, harness, logprobs, mtp_verify, rms_norm, rope, swiglu  # noqa: E402

FWD, FWD_BWD = harness.FWD, harness.FWD_BWD


def _cpu_config(dtype=torch.bfloat16, modes=(FWD, FWD_BWD)) -> harness.Config:
    """Smoke-sized cases on CPU, but in bf16 so element sizes are the GPU runs'."""
    return harness.Config(smoke=True, device=torch.device("cpu"), dtype=dtype, modes=modes, presets={},
                          compile_backend="aot_eager")


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _tensors(*xs):
    """Flatten tensors / tuples of tensors."""
    out = []
    for x in xs:
        if isinstance(x, (tuple, list)):
            out += _tensors(*x)
        elif isinstance(x, torch.Tensor):
            out.append(x)
    return out


def _nbytes(*xs) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(*xs))


# ---------------------------------------------------------------------------------------------
# attention


def _allowed(sq: int, sk: int, causal: bool) -> torch.Tensor:
    """[Sq, Sk] bool, True where query i may see key j; causal is bottom-right aligned."""
    query_pos = torch.arange(sq)[:, None] + (sk - sq)
    keys = torch.arange(sk)[None, :]
    return keys <= query_pos if causal else torch.ones(sq, sk, dtype=torch.bool)


def _packed_allowed(lengths) -> torch.Tensor:
    """[total, total] mask of a packed causal batch: block-diagonal, causal inside each block."""
    seq_id = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    pos = torch.cat([torch.arange(n) for n in lengths])
    same = seq_id[:, None] == seq_id[None, :]
    return same & (pos[None, :] <= pos[:, None])


def _explicit_attention_flops(batch, q_heads, kv_heads, sq, sk, head_dim):
    """(forward, autograd backward, the S = QK^T matmul alone) matmul FLOPs of full (unmasked)
    attention written as matmuls, GQA by expanding k/v to the query heads."""
    q = torch.randn(batch, q_heads, sq, head_dim, requires_grad=True)
    k = torch.randn(batch, kv_heads, sk, head_dim, requires_grad=True)
    v = torch.randn(batch, kv_heads, sk, head_dim, requires_grad=True)
    group = q_heads // kv_heads
    with FlopCounterMode(display=False) as counter:
        kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        out = (q @ kk.transpose(-1, -2)).softmax(-1) @ vv
    forward = counter.get_total_flops()
    backward = _flops(lambda: out.backward(torch.randn_like(out)))
    scores = _flops(lambda: q @ kk.transpose(-1, -2))
    return forward, backward, scores


def test_attention_causal_mask_is_bottom_right_and_pairs_counted_by_hand():
    assert _allowed(3, 3, True).sum() == 6
    assert _allowed(2, 5, True).tolist() == [[True] * 4 + [False], [True] * 5]  # Sq < Sk
    assert _packed_allowed((2, 1)).sum() == 3 + 1


def test_dense_attention_flops_count_every_unmasked_pair_of_every_query_head():
    """Every smoke flash case (GQA: 4 query / 2 kv heads; S 16 and 33, partial blocks): full
    attention's FLOPs are 4*D per (q, k) pair per query head exactly; causal ones are FA's
    S*S/2 pairs, short of the exact unmasked count by S/2 pairs (an undercount, never more)."""
    cases = [c for c in attention._flash_cases(_cpu_config()) if c.impl == "thinkfuse-triton"]
    assert {c.variant for c in cases} == {"flash-causal", "flash-noncausal"} and len(cases) == 8
    for case in cases:
        s = case.shape
        batch, seqlen, hq, d = s["batch"], s["seqlen"], s["q_heads"], s["head_dim"]
        assert s["kv_heads"] < hq  # GQA: the count must follow the query heads
        causal = case.variant == "flash-causal"
        pairs = int(_allowed(seqlen, seqlen, causal).sum())
        exact_forward = 4 * d * hq * batch * pairs
        forward = attention.flops(batch, seqlen, hq, d, causal, FWD)
        if causal:
            assert exact_forward - forward == 4 * d * hq * batch * seqlen // 2
            assert forward <= exact_forward
        else:
            assert forward == exact_forward
        assert case.flops == (forward if case.mode == FWD else int(3.5 * forward))


def test_attention_forward_and_backward_flops_match_counted_matmuls():
    """Forward = the counted Q K^T and P V matmuls; fwd+bwd = forward + autograd's four backward
    matmuls (dV, dP, dQ, dK) + the recomputed Q K^T a flash backward needs: 3.5x the forward."""
    batch, hq, hkv, seqlen, d = 2, 4, 2, 16, 8
    forward, backward, scores = _explicit_attention_flops(batch, hq, hkv, seqlen, seqlen, d)
    assert attention.flops(batch, seqlen, hq, d, False, FWD) == forward
    assert attention.flops(batch, seqlen, hq, d, False, FWD_BWD) == forward + backward + scores
    assert attention.BACKWARD_FLOPS_RATIO == (backward + scores) / forward


def test_varlen_attention_flops_are_the_packed_masks_pairs():
    config = _cpu_config()
    (problem,) = attention._varlen_problems(config)
    lengths, hq, d = problem.lengths, problem.heads.q_heads, problem.heads.head_dim
    pairs = int(_packed_allowed(lengths).sum())
    forward = attention.varlen_flops(lengths, hq, d, FWD)
    # S*S/2 per sequence: short of the exact count by half a pair per token.
    assert 4 * d * hq * pairs - forward == 4 * d * hq * sum(lengths) // 2
    cases = [c for c in attention._varlen_cases(config) if c.impl == "thinkfuse-triton"]
    assert {c.mode: c.flops for c in cases} == {FWD: forward, FWD_BWD: int(3.5 * forward)}
    # The GPU batch: 16384 tokens in 29 sequences, the count within 0.03% of the exact one.
    gpu = attention.varlen_lengths()
    assert sum(gpu) == attention.TOKENS and max(gpu) == attention.VARLEN_LONGEST
    exact = sum(n * (n + 1) // 2 for n in gpu)
    assert 0.9997 * exact < sum(n * n / 2 for n in gpu) <= exact


def test_decode_bytes_are_the_kv_cache_rows_read_plus_q_and_out():
    """Bytes = for every batch row its cache_seqlens positions of K and V for each kv head, plus
    q and the output, summed over the tensors the decode workload really builds (bf16)."""
    config = _cpu_config(modes=(FWD,))
    cases = {(c.shape_label, c.impl): c for c in attention._decode_cases(config)}
    problems = attention._decode_problems(config)
    assert {p.heads.kv_heads for p in problems} == {2, 1} and {p.q_len for p in problems} == {1, 4}
    for problem in problems:
        seen = {}

        def prepare(q, k_cache, v_cache, cache_seqlens):
            seen.update(q=q, k=k_cache, v=v_cache, lens=cache_seqlens)
            return attention._sdpa_decode(q, k_cache, v_cache, cache_seqlens)

        out = attention._build_decode(prepare, problem, config).forward()
        k, v, lens = seen["k"], seen["v"], seen["lens"]
        per_position = k.shape[2] * k.shape[3] * k.element_size()  # one position of one cache, all kv heads
        kv_read = sum(int(n) * per_position for n in lens) * 2  # K and V
        expected = kv_read + _nbytes(seen["q"], out)
        assert attention.decode_bytes(problem, config.dtype) == expected
        label = "x".join(str(x) for x in (problem.batch, problem.cache_len, problem.q_len,
                                          problem.heads.q_heads, problem.heads.kv_heads, problem.heads.head_dim))
        assert cases[label, attention.SDPA].bytes_moved == expected


# ---------------------------------------------------------------------------------------------
# memory-bound ops: bytes over the workloads' real tensors


def _run(workload, mode):
    """(outputs, gradients or ()) of one run of a workload."""
    if mode == FWD:
        with torch.no_grad():
            return workload.forward(), ()
    outputs = workload.forward()
    outs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    return outputs, torch.autograd.grad(outs, workload.inputs, workload.grad_outputs)


def _distinct_values(tensors):
    """Tensors with equal values counted once (x's and residual's gradients are one dx)."""
    out = []
    for t in tensors:
        if not any(t.shape == u.shape and torch.equal(t, u) for u in out):
            out.append(t)
    return out


@pytest.mark.parametrize("variant", ["norm", "add+norm"])
def test_rms_norm_bytes_are_its_tensors(variant):
    config = _cpu_config()
    tokens, hidden = 8, 64
    make = functools.partial(rms_norm._hf_module, variant=variant)
    fwd_bwd = rms_norm._build(make, False, tokens, hidden, variant, FWD_BWD, config)
    *activations, weight = fwd_bwd.inputs
    assert weight.dtype == torch.bfloat16  # the weight is counted in the run's dtype
    outputs, grads = _run(fwd_bwd, FWD_BWD)
    forward = _nbytes(activations, weight, outputs)  # read x (+ residual), weight; write y (+ h)
    # backward: read dy (+ dh), the normalised input (x, or h), weight; write dx (once), dweight
    normalised = activations[0] if variant == "norm" else outputs[1]
    backward = _nbytes(fwd_bwd.grad_outputs, normalised, weight, _distinct_values(grads))
    assert rms_norm.bytes_moved(tokens, hidden, variant, FWD, config.dtype) == forward
    assert rms_norm.bytes_moved(tokens, hidden, variant, FWD_BWD, config.dtype) == forward + backward


@pytest.mark.parametrize("fused", [False, True])
def test_swiglu_bytes_are_its_tensors(fused):
    config = _cpu_config()
    tokens, inter = 8, 64
    make = swiglu.HFSwiGLU if not fused else functools.partial(swiglu.ThinkfuseSwiGLUFused, "torch")
    workload = swiglu._build(make, fused, False, tokens, inter, FWD_BWD, config)
    outputs, grads = _run(workload, FWD_BWD)
    forward = _nbytes(workload.inputs, outputs)
    backward = _nbytes(workload.grad_outputs, workload.inputs, grads)  # dy, gate, up in; dgate, dup out
    assert swiglu.bytes_moved(tokens, inter, FWD, config.dtype) == forward
    assert swiglu.bytes_moved(tokens, inter, FWD_BWD, config.dtype) == forward + backward


def test_rope_bytes_are_its_tensors():
    config = _cpu_config()
    for group in rope._groups(config):
        tokens = rope.SMOKE_TOKENS
        seen = {}

        def make(hf_config, n):
            module = rope._hf_module(hf_config, n)
            forward = module.forward

            def spy(q, k, position_ids):
                seen["positions"] = position_ids
                return forward(q, k, position_ids)

            module.forward = spy
            return module

        workload = rope._build(make, False, group, tokens, FWD_BWD, config)
        outputs, grads = _run(workload, FWD_BWD)
        positions = seen["positions"]
        assert positions.dtype == torch.int64
        forward = _nbytes(workload.inputs, positions, outputs)
        backward = _nbytes(workload.grad_outputs, positions, grads)
        args = (tokens, group.q_heads, group.kv_heads, group.head_dim)
        assert rope.bytes_moved(*args, FWD, config.dtype) == forward
        assert rope.bytes_moved(*args, FWD_BWD, config.dtype) == forward + backward


def test_token_logprobs_bytes_are_the_logits_passes():
    config = _cpu_config()
    tokens, vocab = 8, 1000
    workload = logprobs._build_token(logprobs.TrlLogprobs, False, tokens, vocab, FWD_BWD, config)
    (logits,) = workload.inputs
    _, (d_logits,) = _run(workload, FWD_BWD)
    assert logits.dtype == d_logits.dtype == torch.bfloat16
    assert logprobs.bytes_moved(tokens, vocab, FWD, config.dtype) == _nbytes(logits)
    # backward: read the logits again, write d logits
    assert logprobs.bytes_moved(tokens, vocab, FWD_BWD, config.dtype) == 2 * _nbytes(logits) + _nbytes(d_logits)


@pytest.mark.parametrize("variant", list(mtp_verify.VARIANTS))
def test_mtp_verify_bytes_are_the_logits_and_draft_probs(variant):
    config = _cpu_config(modes=(FWD,))
    batch, k, vocab = 3, 2, 64
    temperature, with_probs = mtp_verify.VARIANTS[variant]
    seen = {}

    def verify(draft, logits, temp, draft_probs):
        seen.update(logits=logits, probs=draft_probs)
        return mtp_verify.vllm_style_verify(draft, logits, temp, draft_probs)

    mtp_verify._build(verify, batch, k, vocab, temperature, with_probs, config).forward()
    assert mtp_verify.bytes_moved(batch, k, vocab, with_probs, config.dtype) == _nbytes(seen["logits"], seen["probs"])


# ---------------------------------------------------------------------------------------------
# matmul FLOPs counted while the workloads run


@pytest.mark.parametrize("mode", [FWD, FWD_BWD])
def test_fused_linear_flops_are_the_materialised_paths_matmuls(mode):
    """fused_linear's 'effective' FLOPs = what the materialised baseline's matmuls do: 2*T*H*V
    forward, 3x with the backward's d_hidden and d_weight."""
    config = _cpu_config()
    tokens, hidden, vocab = 8, 64, 1000
    workload = logprobs._build_fused(logprobs._materialised, tokens, hidden, vocab, mode, config)
    assert logprobs.flops(tokens, hidden, vocab, mode) == _flops(workload.runner(mode))


def test_grpo_step_flops_are_the_materialised_rows_matmuls():
    config = _cpu_config(dtype=torch.float32, modes=(FWD_BWD,))
    cases = [c for c in e2e.grpo_cases(config) if c.impl == e2e.TRL_MATERIALISED]
    assert cases
    for case in cases:
        assert case.flops == _flops(case.build().runner(FWD_BWD))


def _no_matmul_attention(module, q, k, v, attention_mask, **kwargs):
    """Attention without matmuls (the gradient still reaches q, k, v): isolates the projections."""
    group = q.shape[1] // k.shape[1]
    out = q + k.repeat_interleave(group, 1) + v.repeat_interleave(group, 1)
    return out.transpose(1, 2).contiguous(), None


def test_train_flops_are_the_counted_linear_matmuls_plus_half_of_full_attention():
    """A 2-layer Qwen2 with q width != hidden (as Ministral 3) and GQA, one fwd+bwd of the loss
    for every parameter: the linear layers' and lm_head's counted matmuls (attention replaced by
    a matmul-free stand-in), plus half of eager attention's counted (full S x S) matmuls;
    the causal half is within S/2 pairs of the exact unmasked count."""
    from transformers import AttentionInterface

    AttentionInterface.register("bench-no-matmul", _no_matmul_attention)
    preset = dict(family="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=256,
                  rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    layers, batch, seq = 2, 2, 16
    config = _cpu_config(dtype=torch.float32, modes=(FWD_BWD,))
    model = e2e.build_model(e2e.ModelSpec("test", "qwen2", preset, layers=layers), config).train()
    ids = torch.randint(0, preset["vocab_size"], (batch, seq))

    def step_flops(attn_implementation):
        model.set_attn_implementation(attn_implementation)
        with FlopCounterMode(display=False) as counter:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            torch.autograd.grad(loss, e2e.trained_parameters(model))
        rotary = sum(sum(v.values()) for name, v in counter.get_flop_counts().items() if name.endswith("rotary_emb"))
        return counter.get_total_flops() - rotary  # RoPE's tiny inv_freq x positions product

    linear = step_flops("bench-no-matmul")
    full_attention = step_flops("eager") - linear  # eager computes all S x S scores, fwd + bwd
    assert full_attention == 3 * layers * 4 * batch * preset["num_attention_heads"] * seq * seq * preset["head_dim"]
    bench = e2e.train_flops(preset, layers, batch, seq)
    assert bench == linear + full_attention // 2
    exact_causal = full_attention * int(_allowed(seq, seq, True).sum()) // (seq * seq)
    assert full_attention // 2 <= exact_causal


def test_implied_speedup_counts_the_tokens_a_verify_step_really_emits():
    """At acceptance a, a one-draft speculative step emits 1 + a tokens on average: counted on
    mtp_verify's own output for a batch where 9 of 10 drafts are the target's argmax."""
    torch.manual_seed(0)
    batch, vocab = 10, 32
    logits = torch.randn(batch, 2, vocab)
    draft = logits[:, 0].argmax(-1, keepdim=True)
    draft[0] = (draft[0] + 1) % vocab  # one row's draft is rejected
    tokens, _ = mtp_verify._thinkfuse_verify(draft, logits, 0.0, None, backend="torch")
    emitted = (tokens >= 0).sum().item() / batch
    assert emitted == pytest.approx(1 + e2e.ACCEPTANCE)
    row = {"op": "e2e", "variant": e2e.DECODE_STEP, "model": "m", "shape_label": "1x160",
           "shape": {"batch": 1, "context": 160}}
    rows = [row | {"impl": e2e.HF_SDPA, "median_ms": 10.0}, row | {"impl": e2e.THINKFUSE_MTP, "median_ms": 12.5}]
    (cost,) = e2e.step_costs(rows)
    # speedup = (tokens per speculative step / its time) / (1 token / plain step time)
    assert cost["implied_speedup"] == pytest.approx((emitted / 12.5) / (1 / 10.0))
    assert e2e.tokens_per_s(rows[1]) == pytest.approx(emitted / 12.5e-3)


# ---------------------------------------------------------------------------------------------
# harness units


def test_device_peak_probes_convert_units(monkeypatch):
    """copy GB/s counts the bytes read and written (decimal GB), matmul TFLOP/s the counted
    FLOPs of the probe; both from a fixed 2 ms timing."""
    monkeypatch.setattr(harness, "COPY_BYTES", 1 << 20)
    monkeypatch.setattr(harness, "MATMUL_N", 32)
    monkeypatch.setattr(harness, "time_ms", lambda fn, config: (fn(), 2.0)[1])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"L2_cache_size": 50 << 20}))
    config = harness.Config(smoke=False, device=torch.device("cpu"), dtype=torch.bfloat16, modes=(FWD,),
                            presets={}, compile_backend="inductor")
    peaks = harness.measure_device_peaks(config)
    assert peaks["copy_gbps"] == pytest.approx(2 * (1 << 20) / 2e-3 / 1e9)
    a = torch.randn(32, 32, dtype=torch.bfloat16)
    assert peaks["matmul_bf16_tflops"] == pytest.approx(_flops(lambda: a @ a) / 2e-3 / 1e12)
    assert peaks["l2_cache_bytes"] == 50 << 20


def test_derived_metrics_units_direction_and_l2_flag(tmp_path):
    def row(impl, ms, timing="do_bench median (CUDA events)", **fields):
        case = harness.Case(op="attention", impl=impl, variant="decode", mode=FWD, shape={"b": 1}, model="m",
                            dtype=torch.bfloat16, **fields)
        return harness.base_row(case) | {"status": "ok", "median_ms": ms, "timing": timing,
                                         "peak_mem_mb": 1536.0}

    graph = "do_bench_cudagraph median (CUDA graph replay: no host overhead)"
    rows = [row("thinkfuse-triton", 0.01, graph, bytes_moved=30_000_000),  # fits a 50 MiB L2
            row("sdpa", 0.04, graph, bytes_moved=30_000_000),
            row("thinkfuse-cuda", 1.0, graph, bytes_moved=2_000_000_000),
            row("flash-attn", 4.0, bytes_moved=30_000_000, flops=6 * 10**12)]
    harness.add_derived_metrics(rows, {"copy_gbps": 3000.0, "matmul_bf16_tflops": 700.0, "l2_cache_bytes": 50 << 20})
    fits, baseline, large, events = rows
    assert fits["gbps"] == pytest.approx(3000.0)  # 3e7 bytes in 10 us = 3 TB/s (decimal)
    assert fits["frac_copy_bw"] == pytest.approx(1.0)
    assert events["tflops"] == pytest.approx(1500.0) and events["frac_matmul_peak"] == pytest.approx(1500 / 700)
    assert fits["speedup_vs"]["sdpa"] == pytest.approx(4.0)  # baseline ms / ours: > 1 is faster
    assert (fits["l2_resident"], large["l2_resident"], events["l2_resident"]) == (True, False, False)
    meta = {"smoke": False, "bytes_counted": {}, "device": "test", "date_utc": "-", "driver": None,
            "cuda": None, "torch": "-", "triton": "-", "transformers": "-", "liger_kernel": None,
            "thinkfuse": "-", "thinkfuse_backends": [], "git_commit": None, "timing": "-",
            "compile_backend": "-", "peaks": {"l2_cache_bytes": 50 << 20}, "models_json": "-"}
    markdown = harness.write_markdown(tmp_path, meta, rows).read_text()
    assert "| 100.0% (L2) |" in markdown and "| 66.7% |" in markdown
    # peak memory is measured in MiB (2**20 bytes) and labelled so
    assert "peak MiB" in markdown and "peak MB" not in markdown and "| 1536 |" in markdown
    # rows of runs from before the L2 size was recorded: no flag
    old = [row("thinkfuse-triton", 0.01, graph, bytes_moved=30_000_000)]
    harness.add_derived_metrics(old, {"copy_gbps": 3000.0})
    assert old[0]["l2_resident"] is None


def test_graph_generate_implied_speedup_brackets_the_real_one():
    """decode rows time whole generates, fixed costs (prefill, graph capture) included: at
    acceptance a the real speedup lies between 1 / ratio (every draft rejected) and the reported
    (1 + a) / ratio, which the summary calls an upper bound."""
    new, a = 64, e2e.ACCEPTANCE
    hf_ms = 20.0 + new * 10.0  # prefill + one plain step per token
    mtp_fixed, mtp_step = 60.0, 12.0  # prefill + capture; a replayed 2-token step
    measured = mtp_fixed + new * mtp_step  # random weights: every draft rejected, one token per step
    real = hf_ms / (mtp_fixed + new / (1 + a) * mtp_step)
    rows = []
    for impl, ms in ((e2e.HF_SDPA, hf_ms), (e2e.THINKFUSE_MTP_GRAPH, measured)):
        case = harness.Case(op="e2e", impl=impl, variant=e2e.DECODE, mode=FWD,
                            shape={"batch": 1, "prompt": 128, "new_tokens": new}, model="m", dtype=torch.bfloat16)
        rows.append(harness.base_row(case) | {"status": "ok", "median_ms": ms})
    (cost,) = e2e.graph_costs(rows)
    assert 1 / cost["cost_ratio"] < real < cost["implied_speedup"]
    assert any("upper bound" in line for line in e2e.summary_lines(rows))
