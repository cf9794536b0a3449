"""bench/breakdown.py: kernel names to kinds, the busy-time union, per-step sums, and a smoke run
through the e2e builders (CPU: no device events, so only the plumbing is checked there)."""

import json
from types import SimpleNamespace

import pytest

from bench import breakdown


def _event(name, start, end):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end))


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "matmul"),
    ("nvjet_tst_192x192_64x4_1x2_h_bz_coopB_TNT", "matmul"),
    ("void thinkfuse::flash_bwd_sm90::dkdv_kernel<__nv_bfloat16, 128>(thinkfuse::Params)", "attention"),
    ("_attn_bwd_dkdv_kernel", "attention"),
    ("void thinkfuse::flash_fwd_sm90::forward_kernel<__nv_bfloat16, 128>(...)", "attention"),
    ("void thinkfuse::logprobs::fwd_kernel<__nv_bfloat16>(...)", "log-probs"),
    ("void thinkfuse::mtp::split_greedy_kernel<__nv_bfloat16>(...)", "mtp-verify"),
    ("_token_logprobs_fwd_kernel", "log-probs"),
    ("void thinkfuse::rms_norm::backward_kernel<float>(...)", "rms-norm"),
    ("void thinkfuse::swiglu::fwd_kernel<__nv_bfloat16>(...)", "swiglu/rope"),
    ("void thinkfuse::rotary::rope_kernel<__nv_bfloat16>(...)", "swiglu/rope"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(...)", "elementwise"),
    ("Memset (Device)", "memset/memcpy"),
    ("void at::native::(anonymous namespace)::embedding_backward_feature_kernel<...>", "embedding"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 32, 4, false, false, "
     "cutlass::bfloat16_t>, true>(pytorch_flash::Flash_fwd_params)", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<...>::Params)",
     "attention"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_32x6_tn_align8>(...)", "matmul"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float>(float*, float const*, int)",
     "log-probs"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, unsigned int, 2>(...)", "elementwise"),
    ("Memcpy DtoD (Device -> Device)", "memset/memcpy"),
    ("something_new", "other"),
])
def test_kind_of(name, kind):
    assert breakdown.kind_of(name) == kind


def test_short_name_drops_templates_and_parameters():
    assert breakdown.short_name("void ns::k<float, ns::T<int, 2>>(ns::Params<float>)") == "void ns::k"
    assert (breakdown.short_name("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4>(float*)")
            == "void at::native::anon::cunn_SoftMaxForward")
    long = "x" * 200
    assert len(breakdown.short_name(long, width=50)) == 50


def test_union_counts_overlaps_once():
    assert breakdown.union_us([]) == 0
    assert breakdown.union_us([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert breakdown.union_us([(20, 30), (0, 10)]) == 20


def test_kernels_that_share_a_short_name_keep_their_own_kinds():
    events = [_event("void ns::k<Silu>(int)", 0, 100), _event("void ns::k<Fill>(int)", 100, 300)]
    events[0].name = "void ns::silu_k<a>(int)"
    events[1].name = "void ns::silu_k<a>(int)"  # same short name, same kind: one row
    b = breakdown.summarise("case", events, steps=1, wall_s=0.001, top=5)
    assert len(b.top) == 1 and b.top[0]["calls_per_step"] == 2
    mixed = [_event("void at::native::(anonymous namespace)::silu_kernel<float>(int)", 0, 100),
             _event("void at::native::(anonymous namespace)::fill_kernel<float>(int)", 100, 400)]
    b = breakdown.summarise("case", mixed, steps=1, wall_s=0.001, top=5)
    assert b.kinds_ms == pytest.approx({"other": 0.3, "swiglu/rope": 0.1})
    assert len(b.top) == 2


def test_summarise_per_step_kinds_and_ranking():
    events = [_event("gemm_a", 0, 600), _event("gemm_a", 1000, 1600), _event("rms_norm_k", 600, 700),
              _event("rms_norm_k", 1600, 1700), _event("Memset (Device)", 650, 660)]
    b = breakdown.summarise("case", events, steps=2, wall_s=0.004, top=2)
    assert b.wall_ms == pytest.approx(2.0)
    assert b.gpu_busy_ms == pytest.approx(0.7)  # (0-700 and 1000-1700) / 2 steps, memset inside
    assert b.kinds_ms == pytest.approx({"matmul": 0.6, "rms-norm": 0.1, "memset/memcpy": 0.005})
    assert list(b.kinds_ms) == ["matmul", "rms-norm", "memset/memcpy"]  # largest first
    assert [t["name"] for t in b.top] == ["gemm_a", "rms_norm_k"]
    assert b.top[0]["calls_per_step"] == 1 and b.top[0]["ms_per_step"] == pytest.approx(0.6)
    text = breakdown.report(b)
    assert "GPU busy 0.70 ms/step" in text and "matmul" in text


def test_smoke_run_profiles_every_default_case(tmp_path, capsys):
    assert breakdown.main(["--smoke", "--steps", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "breakdown.json").read_text())
    labels = [c["label"] for c in data["cases"]]
    assert data["metadata"]["smoke"] is True
    assert any("train-step" in l and l.endswith(" thinkfuse") for l in labels)
    assert any("train-step" in l and l.endswith(" hf-sdpa") for l in labels)
    assert any("grpo-step" in l and l.endswith(" trl-materialised") for l in labels)
    assert all(c["steps"] == 1 and c["wall_ms"] > 0 for c in data["cases"])
    assert "no device events" in capsys.readouterr().out


def test_bad_arguments():
    with pytest.raises(SystemExit):
        breakdown.main(["--smoke", "--steps", "0"])
    with pytest.raises(SystemExit, match="unknown --model"):
        breakdown.main(["--smoke", "--model", "nope"])


def test_idle_gaps_are_the_stretches_between_busy_unions():
    busy = [(0, 100), (50, 120), (200, 300), (305, 400), (1000, 1100)]
    assert breakdown.idle_gaps(busy, min_us=20) == [(120, 200), (400, 1000)]  # 5 us is launch latency
    assert breakdown.idle_gaps([], min_us=20) == []


def test_gap_report_names_neighbours_and_the_host_op_that_ran_meanwhile():
    kernels = [_event("void ns::gemm_k<float>(int)", 0, 100), _event("rms_norm_k", 600, 700),
               _event("gemm_b", 700, 800), _event("gemm_b", 830, 900)]
    host = [_event("aten::linear", 0, 50), _event("thinkfuse::rope_forward", 90, 650),
            _event("aten::_local_scalar_dense", 150, 550), _event("aten::_local_scalar_dense", 810, 820)]
    b = breakdown.summarise("case", kernels, steps=2, wall_s=0.002, top=3, cpu_events=host, gaps=5)
    assert [g["us"] for g in b.gaps] == [500, 30]  # longest first
    first = b.gaps[0]
    assert first["after"] == "void ns::gemm_k" and first["before"] == "rms_norm_k"
    # the op overlapping the gap most comes first; the sync inside it next
    assert first["host"] == ["thinkfuse::rope_forward", "aten::_local_scalar_dense"]
    assert b.idle_in_gaps_ms == pytest.approx((500 + 30) / 1000 / 2)
    assert b.syncs_per_step == {"aten::_local_scalar_dense": 1.0}
    text = breakdown.report(b)
    assert "idle in gaps of >= 20 us: 0.27 ms/step" in text
    assert "void ns::gemm_k -> rms_norm_k  | thinkfuse::rope_forward / aten::_local_scalar_dense" in text
    assert "host syncs per step: aten::_local_scalar_dense 1" in text


def test_no_gaps_asked_lists_none_but_still_counts_syncs():
    kernels = [_event("gemm", 0, 100), _event("gemm", 500, 600)]
    b = breakdown.summarise("case", kernels, steps=1, wall_s=0.001, top=1,
                            cpu_events=[_event("cudaStreamSynchronize", 100, 500)], gaps=0)
    assert b.gaps == [] and b.idle_in_gaps_ms == pytest.approx(0.4)
    assert b.syncs_per_step == {"cudaStreamSynchronize": 1.0}


def test_host_top_ranks_host_ops_by_self_time_per_step():
    host = [SimpleNamespace(name="aten::mm", time_range=SimpleNamespace(start=0, end=50), self_cpu_time_total=30),
            SimpleNamespace(name="aten::mm", time_range=SimpleNamespace(start=60, end=90), self_cpu_time_total=30),
            SimpleNamespace(name="triton launch", time_range=SimpleNamespace(start=100, end=200),
                            self_cpu_time_total=100)]
    b = breakdown.summarise("case", [_event("gemm", 0, 10)], steps=2, wall_s=0.001, top=1, cpu_events=host,
                            host_ops=5)
    assert [h["name"] for h in b.host_top] == ["triton launch", "aten::mm"]
    assert b.host_top[1] == {"name": "aten::mm", "self_us_per_step": 30.0, "calls_per_step": 1.0}
    assert "top 2 host ops" in breakdown.report(b)


def test_decode_steps_are_profiled_as_forward_steps(tmp_path):
    out = tmp_path / "decode"
    assert breakdown.main(["--smoke", "--steps", "1", "--variant", "decode-step", "--model", "mimo-7b",
                           "--impl", "thinkfuse", "--impl", "hf-sdpa", "--out", str(out)]) == 0
    labels = [c["label"] for c in json.loads((out / "breakdown.json").read_text())["cases"]]
    # batch 1, and the left-padded batch (bench.e2e's DECODE_PADDED_BATCH rows), for both impls
    assert len(labels) == 4 and all("decode-step" in label for label in labels)
    assert sum("left" in label for label in labels) == 2
    assert any(c["host_top"] for c in json.loads((out / "breakdown.json").read_text())["cases"])
