"""CUDA Hopper flash-attention backward, torch.ops.thinkfuse_C.flash_attention_bwd_sm90 (wgmma,
TMA, warp specialisation; csrc/include/thinkfuse/flash_attention_bwd_sm90.cuh), called directly
and through flash_attention's automatic routing.

Gradients against autograd of reference.py in float64 with the tolerance the sm80 backward is held
to (test_flash_attention_bwd_cuda.py, whose cases and helpers this file reuses), head_dim 128:
float16 / bfloat16, causal and not, GQA groups 1 to 8, Sq < Sk and Sq > Sk, sliding windows,
packed sequences with NaN / inf after the last one, strided and misaligned inputs, CUDA graph
capture, agreement with the sm80 kernel, bad arguments.

Runs only on a compute capability 9.0 GPU with an extension built for sm_90a; collects and skips
everywhere else (a GPU of another generation only runs the test that the op refuses it). A barrier
bug would hang rather than fail, so bench/gpu_check.sh runs this file in its own step."""

import ctypes
import threading
from functools import partial

import pytest
import torch
from attention_helpers import capture_cuda_graph, cu_seqlens, has_cuda_op, qkv, reference_grads, strided_qkv
from test_flash_attention_bwd_cuda import (
    CASES,
    DTYPES,
    VARLEN,
    _bad_calls,
    _check,
    _good_args,
    _projections,
    _run_direct,
)

from thinkfuse import reference

pytestmark = [pytest.mark.gpu]

_qkv = partial(qkv, device="cuda")
_cu = partial(cu_seqlens, device="cuda")

SM90_OP = "flash_attention_bwd_sm90"


def _is_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


needs_sm90 = pytest.mark.skipif(not (has_cuda_op(SM90_OP) and _is_sm90()),
                                reason="needs a compute capability 9.0 GPU and the flash_attention_bwd_sm90 kernel")


@needs_sm90
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_sm90_direct_matches_reference(case, dtype):
    b, sq, sk, hq, hkv, causal, window = CASES[case]
    q, k, v = _qkv(b, sq, sk, hq, hkv, 128, dtype)
    _check(*_run_direct(q, k, v, causal, 128 ** -0.5, window, op=SM90_OP))


@needs_sm90
@pytest.mark.parametrize("dtype", DTYPES)
def test_sm90_long_causal_gqa4_without_dlse(dtype):
    """Many query blocks per key block (the stage ring and dS buffers wrap), many key blocks adding
    into the same dQ rows."""
    q, k, v = _qkv(2, 2048, 2048, 8, 2, 128, dtype, seed=5)
    _check(*_run_direct(q, k, v, True, 128 ** -0.5, None, use_dlse=False, op=SM90_OP))


@needs_sm90
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(VARLEN))
def test_sm90_varlen_with_junk_after_the_sequences(case, dtype):
    """Packed batches whose tensors go on past the last sequence with NaN / inf rows (q, k, v,
    out, dout), which tiles running past their sequence must keep out of every gradient; those
    rows' own gradients are 0."""
    lq, lk, hq, hkv, causal, window = VARLEN[case]
    tail, d, scale = 7, 128, 128 ** -0.5
    nq, nk = sum(lq), sum(lk)
    cu_q, cu_k = _cu(lq), _cu(lk)
    q, k, v = _qkv(None, nq + tail, nk + tail, hq, hkv, d, dtype, seed=1)
    q[nq:], k[nk:], v[nk:] = float("nan"), float("nan"), float("inf")
    out32, lse = reference.flash_attention(q[:nq], k[:nk], v[:nk], causal, scale, window, cu_q, cu_k,
                                           return_lse=True)
    dout, dlse = _projections(q[:nq], lse, 11)
    nan_rows = torch.full((tail, hq, d), float("nan"), dtype=dtype, device="cuda")
    full_args = (torch.cat([dout, nan_rows]), q, k, v, torch.cat([out32.to(dtype), nan_rows]),
                 torch.cat([lse, torch.full((hq, tail), float("-inf"), device="cuda")], dim=1),
                 torch.cat([dlse, torch.zeros(hq, tail, device="cuda")], dim=1))
    got = getattr(torch.ops.thinkfuse_C, SM90_OP)(*full_args, cu_q, cu_k, max(lq) + 3, max(lk) + 5, scale, causal,
                                                 window or 0)
    rows = (nq, nk, nk)
    for name, g, n in zip(("dq", "dk", "dv"), got, rows):
        assert torch.isfinite(g).all(), name
        assert not g[n:].any(), name
    low, truth = reference_grads(q[:nq], k[:nk], v[:nk], dout, dlse, causal, scale, window, cu_q, cu_k)
    _check([g[:n] for g, n in zip(got, rows)], low, truth, contiguous=False)


@needs_sm90
@pytest.mark.parametrize("pairs_per_chunk", ["", "1", "5"], ids=["heuristic", "one-pair", "five-pairs"])
def test_sm90_launch_chunks(pairs_per_chunk, monkeypatch):
    """Many (sequence, kv head) pairs: the host's rule cuts them into launch chunks (96 pairs of 2
    key blocks on 132 SMs: 66, then 30), or THINKFUSE_SM90_BWD_PAIRS_PER_CHUNK does; every key
    block of every pair must still run exactly once."""
    monkeypatch.setenv("THINKFUSE_SM90_BWD_PAIRS_PER_CHUNK", pairs_per_chunk)
    q, k, v = _qkv(48, 256, 256, 4, 2, 128, torch.bfloat16, seed=4)
    _check(*_run_direct(q, k, v, True, 128 ** -0.5, None, op=SM90_OP))


@needs_sm90
def test_sm90_strided_and_misaligned_inputs():
    """Views of a fused projection, a [B, H, S, D] transpose, a view whose rows are not 16-byte
    aligned (copied by the binding), a strided dout: read through tensor maps or copied."""
    b, s, hq, hkv, d = 2, 197, 4, 2, 128
    q, k, v, q_t, k_odd = strided_qkv(b, s, hq, hkv, d, torch.bfloat16, device="cuda")
    _check(*_run_direct(q, k, v, True, d ** -0.5, None, op=SM90_OP,
                        dout_transform=lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)))
    _check(*_run_direct(q_t, k_odd, v.contiguous(), False, d ** -0.5, None, op=SM90_OP))


@needs_sm90
def test_sm90_agrees_with_the_sm80_kernel():
    q, k, v = _qkv(1, 1000, 1000, 8, 2, 128, torch.bfloat16, seed=13)
    sm80, _, _ = _run_direct(q, k, v, True, 128 ** -0.5, 100)
    sm90, _, _ = _run_direct(q, k, v, True, 128 ** -0.5, 100, op=SM90_OP)
    for name, a, b in zip(("dq", "dk", "dv"), sm80, sm90):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=name)


def _driver_context_is_current():
    """Whether the calling thread has a current CUDA context (cuCtxGetCurrent); None if the
    driver library cannot be asked."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    context = ctypes.c_void_p()
    if libcuda.cuCtxGetCurrent(ctypes.byref(context)) != 0:
        return None
    return context.value is not None


def _on_fresh_thread(fn):
    """fn() on a new thread that has made no CUDA call yet, checked to have no current context."""
    result = {}

    def body():
        try:
            result["had_context"] = _driver_context_is_current()
            result["value"] = fn()
            torch.cuda.synchronize()
        except Exception as exc:  # reported on the main thread
            result["error"] = exc

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert result.get("had_context") is not True, "a fresh thread already had a current context"
    if "error" in result:
        raise result["error"]
    return result["value"]


@needs_sm90
def test_sm90_ops_on_a_thread_without_a_current_context():
    """Autograd runs backward on its own device thread. The driver's tensor-map encoder needs a
    current context, so the ops must make one current (the 2026-11-23 H100 bench saw every dense
    backward refused there, although the same call encoded on the main thread)."""
    q, k, v = _qkv(2, 300, 300, 8, 2, 128, torch.bfloat16, seed=21)
    fwd_args = (q, k, v, None, None, 300, 300, 128 ** -0.5, True, 0)
    ops = torch.ops.thinkfuse_C
    out, lse = ops.flash_attention_fwd_sm90(*fwd_args)
    # Freed blocks of the ops' sizes stay in the caching allocator, so the thread's calls
    # allocate without cudaMalloc (which would make a context current before the encoder runs).
    ops.flash_attention_fwd_sm90(*fwd_args)  # outputs dropped at once: their blocks are cached
    torch.cuda.synchronize()
    out_t, lse_t = _on_fresh_thread(lambda: ops.flash_attention_fwd_sm90(*fwd_args))
    torch.testing.assert_close(out_t, out, rtol=0, atol=0)
    torch.testing.assert_close(lse_t, lse, rtol=0, atol=0)
    dout = torch.randn_like(q)
    bwd_args = (dout, q, k, v, out, lse, None, None, None, 300, 300, 128 ** -0.5, True, 0)
    eager = getattr(ops, SM90_OP)(*bwd_args)
    getattr(ops, SM90_OP)(*bwd_args)  # dropped at once: cached blocks for the thread's call
    torch.cuda.synchronize()
    threaded = _on_fresh_thread(lambda: getattr(ops, SM90_OP)(*bwd_args))
    for name, e, t in zip(("dq", "dk", "dv"), eager, threaded):
        torch.testing.assert_close(t.float(), e.float(), rtol=1e-2, atol=1e-2, msg=name)  # dQ atomics


@needs_sm90
def test_sm90_cuda_graph_capture():
    q, k, v = _qkv(1, 300, 300, 4, 2, 128, torch.bfloat16, seed=8)
    out32, lse = reference.flash_attention(q, k, v, True, None, None, return_lse=True)
    dout, dlse = _projections(q, lse, 12)
    args = (dout, q, k, v, out32.to(q.dtype), lse, dlse, None, None, 300, 300, 128 ** -0.5, True, 0)
    op = getattr(torch.ops.thinkfuse_C, SM90_OP)
    eager = op(*args)
    graph, captured = capture_cuda_graph(lambda: op(*args))
    graph.replay()
    torch.cuda.synchronize()
    for e, c in zip(eager, captured):
        torch.testing.assert_close(e.float(), c.float(), rtol=1e-2, atol=1e-2)  # dQ atomics reorder sums


@needs_sm90
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_sm90_automatic_routing(monkeypatch, packed):
    """The kernel is validated (off CUDA_OPS_PENDING_VALIDATION since the 2026-11-23 H100 run):
    flash_attention's automatic choice on an H100/H200 runs the Hopper forward and this backward,
    and its gradients pass the reference check."""
    from thinkfuse.ops import flash_attention
    from thinkfuse.ops import attention as attention_ops

    assert attention_ops._backward_backend(attention_ops.HOPPER_FORWARD, packed, 128) == \
        attention_ops.HOPPER_BACKWARD
    calls = []
    real = getattr(torch.ops.thinkfuse_C, SM90_OP)
    monkeypatch.setattr(attention_ops, "cuda_ops", lambda: _Recording(calls, real))
    q, k, v = _qkv(2, 300, 300, 8, 2, 128, torch.bfloat16, seed=21)
    cu = max_len = None
    if packed:
        q, k, v = (t.reshape(600, *t.shape[2:]) for t in (q, k, v))
        cu, max_len = _cu([100, 500]), 500
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    kwargs = dict(causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len)
    out = flash_attention(q, k, v, **kwargs)
    dout = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), dout)
    assert calls == [SM90_OP]
    low, truth = reference_grads(q.detach(), k.detach(), v.detach(), dout, None, True, 128 ** -0.5, None, cu, cu)
    _check(ours, low, truth, contiguous=False)


class _Recording:
    """cuda_ops() stand-in: records the Hopper backward's calls, forwards everything else."""

    def __init__(self, calls, real_backward):
        self._calls, self._real = calls, real_backward

    def __getattr__(self, name):
        if name == SM90_OP:
            self._calls.append(name)
            return self._real
        return getattr(torch.ops.thinkfuse_C, name)


@needs_sm90
@pytest.mark.parametrize("case", ["float32", "k-dtype", "dout-dtype", "heads-not-divisible", "k-v-shapes",
                                  "dout-shape", "lse-shape", "only-cu-q", "cpu-k", "scale-nan"])
def test_sm90_bad_arguments(case):
    error, args = _bad_calls()[case]
    args = [_widen(a) for a in args]
    with pytest.raises(error):
        getattr(torch.ops.thinkfuse_C, SM90_OP)(*args)


def _widen(arg):
    """_good_args' head dim 64 -> 128 (the Hopper kernel's), other arguments as they are."""
    if isinstance(arg, torch.Tensor) and arg.dim() >= 3 and arg.shape[-1] == 64:
        return torch.cat([arg, arg], dim=-1)
    return arg


@needs_sm90
@pytest.mark.parametrize("head_dim", [64, 96])
def test_sm90_refuses_other_head_dims(head_dim):
    args = _good_args(d=head_dim)
    with pytest.raises(ValueError, match="head_dim"):
        getattr(torch.ops.thinkfuse_C, SM90_OP)(*args)


@pytest.mark.skipif(not has_cuda_op(SM90_OP) or _is_sm90(), reason="needs a CUDA GPU other than compute capability 9.0")
def test_sm90_refuses_other_devices():
    args = [_widen(a) for a in _good_args()]
    with pytest.raises(ValueError, match="compute capability"):
        getattr(torch.ops.thinkfuse_C, SM90_OP)(*args)
