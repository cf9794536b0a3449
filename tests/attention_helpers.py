"""Helpers shared by the attention tests (test_attention.py, test_flash_attention_bwd_cuda.py,
test_flash_attention_sm90.py, test_decode_attention_cuda.py, test_cuda_emulation.py).

Seeded inputs (randn, qkv with GQA shapes, padded or packed), cu_seqlens of packed batches, the
HF-style eager attention in the low dtype and the gradients the backward tests compare against,
the low-precision forward tolerances (out within N ulps, lse close and -inf exactly where a row
sees no key), CUDA graph capture, and labelled assertion failures.

A test file binds the device it draws on once, e.g. ``_qkv = partial(qkv, device="cuda")``.
"""

import contextlib

import torch
from tolerances import ULP

from thinkfuse import reference
from thinkfuse.backend import cuda_has_op

# --- inputs --------------------------------------------------------------------------------------


def randn(*shape, dtype=torch.float32, seed=0, device="cpu", draw_on=None):
    """A standard normal tensor of ``shape``, drawn in float32 by a fresh generator seeded with
    ``seed`` on ``draw_on`` (default: ``device``), then cast to ``dtype`` on ``device``: the same
    arguments always give the same values. (test_attention.py draws on the CPU, so that its values
    do not depend on the machine; the GPU-only tests draw on the GPU.)"""
    draw_on = device if draw_on is None else draw_on
    gen = torch.Generator(device=draw_on).manual_seed(seed)
    return torch.randn(shape, device=draw_on, generator=gen).to(device, dtype)


def qkv(b, sq, sk, hq, hkv, d, dtype=torch.float32, seed=0, **where):
    """(q, k, v) from seeds seed, seed + 1, seed + 2: q [b, sq, hq, d] and k / v [b, sk, hkv, d]
    (GQA when hkv < hq), or with ``b=None`` the packed layout q [sq, hq, d], k / v [sk, hkv, d]
    (sq / sk the total token counts). ``where``: randn's device / draw_on."""
    lead = () if b is None else (b,)
    return (randn(*lead, sq, hq, d, dtype=dtype, seed=seed, **where),
            randn(*lead, sk, hkv, d, dtype=dtype, seed=seed + 1, **where),
            randn(*lead, sk, hkv, d, dtype=dtype, seed=seed + 2, **where))


def strided_qkv(b, s, hq, hkv, d, dtype, seed=3, **where):
    """Non-contiguous inputs the kernels must read in place or copy, as (q, k, v, q_t, k_odd): q, k, v
    views of one fused projection [b, s, (hq + 2 hkv) * d] (seed); q_t a transposed [b, hq, s, d]
    tensor (seed + 1); k_odd [b, s, hkv, d] starting one element into its storage, so that its rows
    are not 16-byte aligned (seed + 2). ``where``: randn's device / draw_on."""
    fused = randn(b, s, (hq + 2 * hkv) * d, dtype=dtype, seed=seed, **where)
    q = fused[..., : hq * d].view(b, s, hq, d)
    k = fused[..., hq * d:(hq + hkv) * d].view(b, s, hkv, d)
    v = fused[..., (hq + hkv) * d:].view(b, s, hkv, d)
    q_t = randn(b, hq, s, d, dtype=dtype, seed=seed + 1, **where).transpose(1, 2)
    flat = randn(b * s * hkv * d + 1, dtype=dtype, seed=seed + 2, **where)
    k_odd = flat[1:].view(b, s, hkv, d)  # one element (2 bytes in float16 / bfloat16) past aligned storage
    return q, k, v, q_t, k_odd


def cu_seqlens(lengths, device="cpu"):
    """int32 offsets [0, l0, l0 + l1, ...] of a packed batch whose sequences have ``lengths``."""
    offsets = [0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def has_cuda_op(op: str) -> bool:
    """A GPU is present and this build's CUDA extension has the kernel ``op``."""
    return torch.cuda.is_available() and cuda_has_op(op)


# --- truths for the backward ------------------------------------------------------------------------


def eager_attention_dense(q, k, v, causal, scale, window):
    """HF eager attention of one sequence in q's dtype (scores and P @ V in the low dtype, softmax
    in float32 then cast, as transformers' eager_attention_forward), bottom-right masks; lse in
    float32. q [Sq, Hq, D], k/v [Sk, Hkv, D]."""
    sq, hq, _ = q.shape
    sk, hkv, _ = k.shape
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    s = torch.einsum("qhd,khd->hqk", q, kr) * scale
    pos = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    cols = torch.arange(sk, device=q.device)[None, :]
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        visible &= cols <= pos
    if window:
        visible &= cols > pos - window
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32).nan_to_num(0.0)
    lse = torch.logsumexp(s.float(), dim=-1)
    return torch.einsum("hqk,khd->qhd", p.to(q.dtype), vr), lse


def eager_attention(q, k, v, causal, scale, window, cu_q=None, cu_k=None):
    """eager_attention_dense over a padded batch ([B, S, H, D]: out, lse [B, H, Sq]) or, given
    cu_q / cu_k, a packed one ([total, H, D]: out, lse [H, total_q])."""
    if cu_q is None:
        outs, lses = zip(*(eager_attention_dense(q[b], k[b], v[b], causal, scale, window)
                           for b in range(q.shape[0])))
        return torch.stack(outs), torch.stack(lses)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs, lses = zip(*(eager_attention_dense(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], causal,
                                             scale, window) for b in range(len(cq) - 1)))
    return torch.cat(outs), torch.cat(lses, dim=1)


def grads(fn, inputs, dout, dlse):
    """Gradients of sum(out * dout) + sum(finite lse * dlse) (in float64; dlse None: the out term
    only) with respect to each of ``inputs``, where (out, lse) = fn(*inputs)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out, lse = fn(*leaves)
    loss = (out.double() * dout.double()).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0.0).double() * dlse.double()).sum()
    loss.backward()
    return [t.grad for t in leaves]


def reference_grads(q, k, v, dout, dlse, causal, scale, window, cu_q=None, cu_k=None):
    """(low, truth): the gradients [dq, dk, dv] of eager_attention in q's dtype (what HF's own
    attention gets, for tolerances.assert_low_precision_ok) and of reference.py in float64."""
    truth = grads(lambda *t: reference.flash_attention(*t, causal, scale, window, cu_q, cu_k, return_lse=True),
                  [t.double() for t in (q, k, v)], dout, dlse)
    low = grads(lambda *t: eager_attention(*t, causal, scale, window, cu_q, cu_k), (q, k, v), dout, dlse)
    return low, truth


# --- tolerances of the low-precision forward ---------------------------------------------------------


def assert_low_close(ours, ref, ulps, what=""):
    """Same dtype and shape, no NaN, and a max error within ``ulps`` units in the last place of the
    dtype relative to max(|ref|, 1) (P and out are rounded to the dtype inside the kernels: 4 ulps
    for a forward's out, 8 for gradients). ``what`` names the tensor in the messages."""
    what = f"{what}: " if what else ""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, \
        f"{what}{ours.dtype} {tuple(ours.shape)} vs {ref.dtype} {tuple(ref.shape)}"
    assert not torch.isnan(ours).any(), f"{what}NaN in result (an element never written, or a NaN computed)"
    scale = max(ref.float().abs().max().item(), 1.0) if ref.numel() else 1.0
    err = (ours.float() - ref.float()).abs().max().item() if ref.numel() else 0.0
    assert err <= ulps * ULP[ours.dtype] * scale, f"{what}max error {err:.3e} > {ulps} ulp x scale {scale:.3e}"


def assert_lse_close(ours, ref):
    """A float32 lse of ref's shape, no NaN, -inf exactly where ref is (rows without keys), and the
    finite entries within rtol 1e-4 / atol 1e-3 of ref."""
    assert ours.shape == ref.shape and ours.dtype == torch.float32, \
        f"lse: {ours.dtype} {tuple(ours.shape)} vs float32 {tuple(ref.shape)}"
    assert not torch.isnan(ours).any(), "lse: NaN (a row never written, or a NaN computed)"
    assert torch.equal(torch.isneginf(ours), torch.isneginf(ref)), "lse: rows without keys must have lse -inf"
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-4, atol=1e-3)


def assert_rows_without_keys_empty(out, lse, causal, sq, sk):
    """Padded layout (out [B, Sq, H, D], lse [B, H, Sq]): with a causal mask and Sq > Sk the first
    Sq - Sk queries see no key, and their out must be exactly 0 and their lse -inf."""
    if causal and sq > sk:
        assert torch.equal(out[:, : sq - sk], torch.zeros_like(out[:, : sq - sk])), "rows without keys: out not 0"
        assert torch.isneginf(lse[:, :, : sq - sk]).all(), "rows without keys: lse not -inf"


# --- misc --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def failure_label(label):
    """Re-raise an AssertionError from the block with ``label: `` in front of its message (e.g. the
    gradient's name, or a random case's parameters)."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{label}: {exc}") from None


def with_changes(args, names, **changes):
    """``args``, a list of positional arguments called ``names``, with the named ones replaced (in
    place, in the order given; returned): a callable value is called with the list and gives the
    new value (``k=lambda a: a[2].half()``)."""
    for name, value in changes.items():
        args[names.index(name)] = value(args) if callable(value) else value
    return args


def capture_cuda_graph(fn):
    """(graph, output): ``fn()`` run once on a side stream (the warm-up: lazy extension load,
    allocator, kernel attributes stay outside the capture), then captured into a CUDA graph, which
    is not replayed yet."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
