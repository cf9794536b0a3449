"""Build and drive the host emulation of thinkfuse's CUDA kernels (see README.md here).

``build()`` compiles the real sources of csrc/ops (g++, -DTHINKFUSE_HOST_EMULATION, the shim
force-included) with the emulator and the harness into one program, cached under a directory
keyed by a hash of every input; ``flash_fwd`` / ``flash_fwd_sm90`` / ``flash_bwd`` / ``decode`` /
``mtp_verify`` / ``token_logprobs_fwd`` / ``token_logprobs_bwd`` / ``token_logprobs_bwd_out`` /
``rms_norm_fwd`` / ``rms_norm_bwd`` / ``rope_fwd`` / ``rope_bwd`` / ``apply_rotary_fwd`` /
``apply_rotary_bwd`` / ``swiglu_fwd`` / ``swiglu_bwd`` / ``swiglu_fused_fwd`` /
``swiglu_fused_bwd`` run one case through the real launchers, taking and returning torch CPU
tensors and filling the launchers' parameters the way csrc/bindings/*.cpp do (one function per
op of the bindings, same name and arguments, plus the harness and the emulator options).

Command line (a case from Python is quicker to write than to pass on the command line)::

    python tests/cuda_emulation/emulator.py build [--mutation NAME] [--variant NAME]
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
KERNEL_SOURCES = ["flash_attention_fwd", "flash_attention_bwd", "decode_attention", "mtp_verify",
                  "flash_attention_fwd_sm90", "flash_attention_bwd_sm90", "logprobs", "rms_norm", "rope",
                  "swiglu"]
EMU_SOURCES = ["runtime", "sm90", "dynamic_smem", "harness"]
# Compile-time mutations of the emulator that must make the sweeps fail: name -> the emulator
# source (src/<name>.cpp) recompiled with -DEMU_MUTATE_<NAME>.
MUTATIONS = {
    "LDMATRIX": "runtime", "MMA": "runtime", "CP_ASYNC_WAIT": "runtime", "SHFL_XOR": "runtime",
    "TMA_SWIZZLE": "sm90", "WGMMA_LBO": "sm90", "TMA_TX": "sm90",
}
# Deliberately wrong kernels, built with build(mutation=NAME) too: name -> (the csrc/ops source
# whose object is replaced, the test-only translation unit under src/mutants/ that replaces it;
# it includes the real source and swaps one kernel for a broken one).
KERNEL_MUTANTS = {
    # thread 0 reads the target's logit without a barrier before its owner overwrites it in place
    "LOGPROBS_INPLACE_RACE": ("logprobs", "logprobs_inplace_race.cu"),
}
# Kernel sources built with other compile-time settings: name -> (csrc/ops source, flags).
VARIANTS = {
    # Config::kPingPong = false: the consumers issue their GEMMs without taking turns
    "SM90_NO_PINGPONG": ("flash_attention_fwd_sm90", ("-DTHINKFUSE_SM90_PINGPONG=0",)),
}

# The nvcc build's restrictions on half / bfloat16 conversions (scripts/check_cuda.sh).
CXXFLAGS = [
    "-std=c++17", "-O2", "-g0", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
    # every thread_local is constant-initialised: no TLS wrapper calls (GCC would also call a
    # missing init function for the block-scope `extern thread_local` shared memory arrays)
    "-fno-extern-tls-init",
    "-DTHINKFUSE_HOST_EMULATION",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]

ERRORS = {0: "cudaSuccess", 1: "cudaErrorInvalidValue", 9: "cudaErrorInvalidConfiguration",
          12: "cudaErrorInvalidPitchValue", 801: "cudaErrorNotSupported"}
CUDA_ERROR_INVALID_PITCH_VALUE = 12


class Unavailable(RuntimeError):
    """No host compiler or no CUDA headers: the emulation cannot be built here."""


class EmulatorFailure(AssertionError):
    """The emulator stopped the kernel (race, out-of-bounds access, deadlock, ...)."""


def toolchain() -> tuple[str, Path]:
    cxx = os.environ.get("CXX", "g++")
    cxx_path = shutil.which(cxx)
    if cxx_path is None:
        raise Unavailable(f"no host C++ compiler ({cxx!r} not on PATH)")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_bf16.h").is_file():
            return cxx_path, Path(c) / "include"
    raise Unavailable("no CUDA headers (cuda_bf16.h) under CUDA_HOME, /usr/local/cuda or nvcc's prefix")


def _inputs_digest(cxx: str, cuda_include: Path) -> str:
    h = hashlib.sha256()
    files = sorted((CSRC / "include" / "thinkfuse").glob("*"))
    files += [CSRC / "ops" / f"{s}.cu" for s in KERNEL_SOURCES]
    files += sorted((HERE / "include").rglob("*.h")) + sorted((HERE / "src").glob("*.cpp"))
    files += sorted((HERE / "src" / "mutants").glob("*.cu"))
    files += sorted((HERE / "src").glob("*.h"))
    files.append(Path(__file__))
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h.update(version.encode())
    h.update(str(cuda_include).encode())
    h.update((cuda_include / "cuda.h").read_bytes() if (cuda_include / "cuda.h").exists() else b"")
    h.update(" ".join(CXXFLAGS).encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    env = os.environ.get("THINKFUSE_EMU_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "thinkfuse" / "cuda_emulation"


def _compile(cxx, cuda_include, src: Path, obj: Path, extra=()):
    cmd = [cxx, *CXXFLAGS, *extra, "-I", str(HERE / "include"), "-I", str(CSRC / "include"),
           "-isystem", str(cuda_include), "-c", str(src), "-o", str(obj) + ".tmp"]
    if src.suffix == ".cu":
        cmd[1:1] = ["-x", "c++", "-include", "thinkfuse_emu/cuda_emu.h"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"compiling {src.relative_to(ROOT)} failed:\n{' '.join(cmd)}\n{r.stderr[-6000:]}")
    os.replace(str(obj) + ".tmp", obj)


def build(mutation: str | None = None, variant: str | None = None, jobs: int | None = None) -> Path:
    """Path of the harness program (built unless cached). ``mutation``: one of MUTATIONS, a
    harness whose emulator is deliberately wrong (only the mutated emulator source is
    recompiled), or one of KERNEL_MUTANTS, a harness with one deliberately wrong kernel.
    ``variant``: one of VARIANTS, a harness with one kernel source built with other
    compile-time settings (e.g. the sm90 kernel without its ping-pong)."""
    if mutation is not None and mutation not in MUTATIONS and mutation not in KERNEL_MUTANTS:
        raise ValueError(f"mutation {mutation!r} not in {tuple(MUTATIONS) + tuple(KERNEL_MUTANTS)}")
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} not in {tuple(VARIANTS)}")
    cxx, cuda_include = toolchain()
    out = cache_root() / _inputs_digest(cxx, cuda_include)
    out.mkdir(parents=True, exist_ok=True)
    name = "emu_harness" + "".join(f"_{x.lower()}" for x in (mutation, variant) if x is not None)
    exe = out / name
    if exe.exists():
        return exe
    with open(out / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if exe.exists():
            return exe
        units = {f"{s}.o": (CSRC / "ops" / f"{s}.cu", ()) for s in KERNEL_SOURCES}
        units.update({f"{s}.o": (HERE / "src" / f"{s}.cpp", ()) for s in EMU_SOURCES})
        objs = list(units)
        if mutation in MUTATIONS:  # the mutated emulator source replaces its normal object
            mutated = MUTATIONS[mutation]
            obj = f"{mutated}_{mutation.lower()}.o"
            units[obj] = (HERE / "src" / f"{mutated}.cpp", (f"-DEMU_MUTATE_{mutation}",))
            objs[objs.index(f"{mutated}.o")] = obj
        elif mutation is not None:  # the mutant translation unit replaces the kernel's object
            source, mutant = KERNEL_MUTANTS[mutation]
            obj = f"{source}_{mutation.lower()}.o"
            units[obj] = (HERE / "src" / "mutants" / mutant, ())
            objs[objs.index(f"{source}.o")] = obj
        if variant is not None:  # the kernel source with other settings replaces its object
            source, flags = VARIANTS[variant]
            obj = f"{source}_{variant.lower()}.o"
            units[obj] = (CSRC / "ops" / f"{source}.cu", tuple(flags))
            objs[objs.index(f"{source}.o")] = obj
        todo = [(src, out / obj, flags) for obj, (src, flags) in units.items()
                if obj in objs and not (out / obj).exists()]
        # the slowest first (decode_attention instantiates 54 kernels)
        slow = ("decode_attention.cu", "flash_attention_fwd_sm90.cu", "flash_attention_bwd_sm90.cu", "sm90.cpp")
        todo.sort(key=lambda u: slow.index(u[0].name) if u[0].name in slow else len(slow))
        jobs = jobs or max(1, min(len(todo), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            for f in [pool.submit(_compile, cxx, cuda_include, *u) for u in todo]:
                f.result()
        r = subprocess.run([cxx, "-o", str(exe) + ".tmp", *(str(out / o) for o in objs), "-pthread"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"linking the harness failed:\n{r.stderr[-6000:]}")
        os.replace(str(exe) + ".tmp", exe)
    _prune(out)
    return exe


def _prune(keep: Path, generations: int = 4):
    """Removes all but the most recent builds (each edit of a source makes a new one)."""
    dirs = sorted((d for d in keep.parent.iterdir() if d.is_dir() and d != keep),
                  key=lambda d: d.stat().st_mtime, reverse=True)
    for d in dirs[generations - 1:]:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Running one case.

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class Options:
    """Emulator options of one run (see include/thinkfuse_emu/runtime.h)."""
    seed: int = 1
    copies: str = "late"  # late | early | random
    sched: str = "warp"  # warp | random
    workers: int = 1
    device: int = 0  # 0 H100, 1 A100, 2 sm_86 (99 KB shared memory), 3 a 90 KB part
    shuffle_blocks: bool = True
    yield_prob: float = 0.05
    verbose: bool = False  # one line per launch on the harness's stderr
    kernel_regs: int = 168  # numRegs of cudaFuncGetAttributes (ptxas: 168 for the sm90 kernel)
    smem_window_base: int = -1  # shared-window address of dynamic smem; -1: drawn per block

    def scalars(self):
        return dict(seed=self.seed, copies=self.copies, sched=self.sched, workers=self.workers,
                    device=self.device, shuffle_blocks=int(self.shuffle_blocks),
                    yield_prob=self.yield_prob, verbose=int(self.verbose), kernel_regs=self.kernel_regs,
                    smem_window_base=self.smem_window_base)


@dataclass
class Launch:
    kernel: str  # the kernel expression at the launch site (spaces as _)
    grid: tuple
    threads: int
    smem: int


@dataclass
class Result:
    status: int
    values: dict
    outputs: dict = field(default_factory=dict)


def storage_bytes(t: torch.Tensor) -> bytes:
    """Every byte of t's storage (the kernel sees the view through its offset and strides)."""
    n = t.untyped_storage().nbytes() // t.element_size()
    if n == 0:
        return b""
    flat = t.detach().as_strided((n,), (1,), 0)
    return flat.view(torch.uint8).numpy().tobytes()


def poison(shape, dtype) -> torch.Tensor:
    """A tensor of 0xFF bytes (NaN in every float format; -1 for integers)."""
    t = torch.empty(shape, dtype=dtype)
    if t.numel():
        t.view(torch.uint8).fill_(0xFF)
    return t


def from_bytes(data: bytes, dtype, shape) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape) if data else torch.empty(shape, dtype=dtype)


class _kept_dir:
    def __enter__(self):
        return tempfile.mkdtemp(prefix="tf_emu_")

    def __exit__(self, *exc):
        return False


def run_case(exe: Path, op: str, scalars: dict, buffers: dict, outputs: list[str],
             options: Options | None = None, timeout: float = 120) -> Result:
    """Runs the harness on one case. buffers: name -> tensor (its whole storage is passed);
    returns the listed outputs as raw bytes. Raises EmulatorFailure when the emulator reports a
    failure or a guard was overwritten."""
    options = options or Options()
    keep = os.environ.get("THINKFUSE_EMU_KEEP")  # keep the case directories (for debugging)
    with tempfile.TemporaryDirectory(prefix="tf_emu_") if not keep else _kept_dir() as d:
        lines = {"op": op, **options.scalars(), **scalars,
                 "buffers": " ".join(buffers), "outputs": " ".join(outputs)}
        with open(os.path.join(d, "case.txt"), "w") as f:
            for k, v in lines.items():
                f.write(f"{k} {int(v) if isinstance(v, bool) else v}\n")
        for name, t in buffers.items():
            with open(os.path.join(d, f"{name}.bin"), "wb") as f:
                f.write(storage_bytes(t))
        r = subprocess.run([str(exe), d], capture_output=True, text=True, timeout=timeout)
        if options.verbose:
            sys.stderr.write(r.stderr)
        if r.returncode != 0:
            raise EmulatorFailure(f"harness exit status {r.returncode} (case: {d}):\n{r.stderr[-4000:]}")
        values = {"launches": []}
        with open(os.path.join(d, "result.txt")) as f:
            for line in f:
                k, *v = line.split()
                if k == "launch":  # kernel expression, grid x y z, threads per block, smem bytes
                    values["launches"].append(Launch(v[0], tuple(map(int, v[1:4])), int(v[4]), int(v[5])))
                else:
                    values[k] = int(v[0])
        outs = {}
        for name in outputs:
            with open(os.path.join(d, f"{name}.out.bin"), "rb") as f:
                outs[name] = f.read()
    return Result(values.pop("status"), values, outs)


# ---------------------------------------------------------------------------------------------
# The ops, as the bindings call them.

def _stride_or_zero(t, d):
    return 0 if t.shape[d] == 1 else t.stride(d)


def _token_strides(t, packed):
    if packed:
        return 0, _stride_or_zero(t, 0), _stride_or_zero(t, 1)
    return _stride_or_zero(t, 0), _stride_or_zero(t, 1), _stride_or_zero(t, 2)


def _attention_scalars(q, k, v, out, lse, causal, scale, window, cu_q, cu_k, max_q, max_k):
    packed = cu_q is not None
    s = dict(dtype=DTYPE_NAMES[q.dtype], packed=int(packed), causal=int(causal),
             window=window or 0, scale=repr(float(scale)), head_dim=q.shape[-1],
             heads_q=q.shape[-2], heads_kv=k.shape[-2], k_empty=int(k.numel() == 0))
    for name, t in (("q", q), ("k", k), ("v", v), ("o", out)):
        b, sq, h = _token_strides(t, packed)
        s.update({f"{name}_off": t.storage_offset(), f"{name}_bs": b, f"{name}_ss": sq, f"{name}_hs": h})
    if packed:
        s.update(batch=cu_q.numel() - 1, max_seqlen_q=max_q, max_seqlen_k=max_k,
                 total_q=q.shape[0], total_k=k.shape[0], lse_bs=0, lse_hs=_stride_or_zero(lse, 0))
    else:
        s.update(batch=q.shape[0], max_seqlen_q=q.shape[1], max_seqlen_k=k.shape[1],
                 lse_bs=_stride_or_zero(lse, 0), lse_hs=_stride_or_zero(lse, 1))
    return s


def flash_fwd(exe, q, k, v, causal=True, scale=None, window=None, cu_q=None, cu_k=None,
              max_q=None, max_k=None, options=None):
    """status, out, lse (and launches) of flash_attention_forward with csrc/bindings/flash_attention.cpp's
    conventions: out / lse uninitialised (poisoned here) for padded inputs, zeros / -inf for
    packed ones."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    packed = cu_q is not None
    hq = q.shape[-2]
    if packed:
        out = torch.zeros(q.shape, dtype=q.dtype)
        lse = torch.full((hq, q.shape[0]), float("-inf"))
    else:
        out = poison(q.shape, q.dtype)
        lse = poison((q.shape[0], hq, q.shape[1]), torch.float32)
    s = _attention_scalars(q, k, v, out, lse, causal, scale, window, cu_q, cu_k, max_q, max_k)
    bufs = dict(q=q, k=k, v=v, out=out, lse=lse)
    if packed:
        bufs.update(cu_q=cu_q.to(torch.int32).contiguous(), cu_k=cu_k.to(torch.int32).contiguous())
    r = run_case(exe, "fwd", s, bufs, ["out", "lse"], options)
    return SimpleNamespace(status=r.status, launches=r.values["launches"],
                           out=from_bytes(r.outputs["out"], q.dtype, q.shape),
                           lse=from_bytes(r.outputs["lse"], torch.float32, lse.shape))


def _with_16B_rows(t):
    """csrc/bindings/attention_common.h with_16B_rows: a contiguous copy unless the base (the
    harness allocates every buffer 256-byte aligned) and every stride are 16-byte multiples. A
    fresh copy, as the binding's clone: contiguous() would keep an empty tensor's strides and a
    contiguous tensor's odd storage offset."""
    e = t.element_size()
    ok = (t.storage_offset() * e) % 16 == 0 and t.stride(-1) == 1
    for d in range(t.dim() - 1):
        st = _stride_or_zero(t, d)
        ok = ok and st >= 0 and (st * e) % 16 == 0
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def flash_fwd_sm90(exe, q, k, v, causal=True, scale=None, window=None, cu_q=None, cu_k=None,
                   max_q=None, max_k=None, options=None):
    """status, out, lse (and launches) of flash_attention_forward_sm90 the way
    csrc/bindings/flash_attention_sm90.cpp calls it: inputs without 16-byte rows copied, out
    contiguous (poisoned here for padded inputs, zeros / -inf for packed ones), nothing launched
    without rows, and one retry with contiguous inputs on cudaErrorInvalidPitchValue."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    packed = cu_q is not None
    hq = q.shape[-2]
    q, k, v = _with_16B_rows(q), _with_16B_rows(k), _with_16B_rows(v)
    if packed:
        out = torch.zeros(q.shape, dtype=q.dtype)
        lse = torch.full((hq, q.shape[0]), float("-inf"))
        batch, sq = cu_q.numel() - 1, max_q
    else:
        out = poison(q.shape, q.dtype)
        lse = poison((q.shape[0], hq, q.shape[1]), torch.float32)
        batch, sq = q.shape[0], q.shape[1]
    result = SimpleNamespace(status=0, launches=[], out=out, lse=lse, values={})
    if batch == 0 or sq == 0 or q.numel() == 0:
        return result
    for attempt in range(2):
        s = _attention_scalars(q, k, v, out, lse, causal, scale, window, cu_q, cu_k, max_q, max_k)
        bufs = dict(q=q, k=k, v=v, out=out, lse=lse)
        if packed:
            bufs.update(cu_q=cu_q.to(torch.int32).contiguous(), cu_k=cu_k.to(torch.int32).contiguous())
        r = run_case(exe, "fwd_sm90", s, bufs, ["out", "lse"], options)
        if r.status == CUDA_ERROR_INVALID_PITCH_VALUE and attempt == 0:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            continue
        break
    return SimpleNamespace(status=r.status, launches=r.values.pop("launches"), values=r.values,
                           out=from_bytes(r.outputs["out"], q.dtype, q.shape),
                           lse=from_bytes(r.outputs["lse"], torch.float32, lse.shape))


def flash_bwd(exe, dout, q, k, v, out, lse, dlse=None, causal=True, scale=None, window=None,
              cu_q=None, cu_k=None, max_q=None, max_k=None, options=None, sm90=False):
    """status, dq, dk, dv (and launches) of flash_attention_backward (flash_attention_backward_sm90
    with ``sm90``), as csrc/bindings/flash_attention_bwd.cpp calls it (dq and the workspaces
    uninitialised, dk / dv zeros for packed inputs)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    packed = cu_q is not None
    s = _attention_scalars(q, k, v, out, lse, causal, scale, window, cu_q, cu_k, max_q, max_k)
    b, sq, h = _token_strides(dout, packed)
    s.update(do_off=dout.storage_offset(), do_bs=b, do_ss=sq, do_hs=h,
             rows_q=q.shape[0] if packed else q.shape[0] * q.shape[1], has_dlse=int(dlse is not None))
    if dlse is not None:
        s.update(dlse_bs=0 if packed else _stride_or_zero(dlse, 0),
                 dlse_hs=_stride_or_zero(dlse, 0 if packed else 1))
    dq = poison(q.shape, q.dtype)
    dk = torch.zeros(k.shape, dtype=k.dtype) if packed else poison(k.shape, k.dtype)
    dv = torch.zeros(v.shape, dtype=v.dtype) if packed else poison(v.shape, v.dtype)
    bufs = dict(q=q, k=k, v=v, out=out, lse=lse, dout=dout, dq=dq, dk=dk, dv=dv)
    if dlse is not None:
        bufs["dlse"] = dlse
    if packed:
        bufs.update(cu_q=cu_q.to(torch.int32).contiguous(), cu_k=cu_k.to(torch.int32).contiguous())
    r = run_case(exe, "bwd_sm90" if sm90 else "bwd", s, bufs, ["dq", "dk", "dv"], options)
    return SimpleNamespace(status=r.status, launches=r.values["launches"], values=r.values,
                           dq=from_bytes(r.outputs["dq"], q.dtype, q.shape),
                           dk=from_bytes(r.outputs["dk"], k.dtype, k.shape),
                           dv=from_bytes(r.outputs["dv"], v.dtype, v.shape))


def decode(exe, q, k_cache, v_cache, seqlens, scale=None, window=None, splits=0, options=None, leftpad=None):
    """status, out, splits (and launches) of decode_attention with the split count from
    decode_attention_num_splits(requested=splits) (0: the heuristic for the emulated device)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, sq, hq, d = q.shape
    s = dict(dtype=DTYPE_NAMES[q.dtype], batch=b, seqlen_q=sq, q_heads=hq, kv_heads=k_cache.shape[2],
             head_dim=d, max_seqlen_k=k_cache.shape[1], scale=repr(float(scale)), window=window or 0,
             requested_splits=splits, has_leftpad=int(leftpad is not None))
    for name, t in (("q", q), ("k", k_cache), ("v", v_cache)):
        s.update({f"{name}_off": t.storage_offset(), f"{name}_sb": t.stride(0), f"{name}_ss": t.stride(1),
                  f"{name}_sh": t.stride(2)})
    out = poison(q.shape, q.dtype)
    bufs = dict(q=q, k=k_cache, v=v_cache, seqlens=seqlens.to(torch.int32).contiguous(), out=out)
    if leftpad is not None:
        bufs["leftpad"] = leftpad.to(torch.int32).contiguous()
    r = run_case(exe, "decode", s, bufs, ["out"], options)
    return SimpleNamespace(status=r.status, launches=r.values["launches"], splits=r.values["splits"],
                           out=from_bytes(r.outputs["out"], q.dtype, q.shape))


def mtp_verify(exe, draft, logits, temperature=0.0, probs=None, uniforms=None, num_splits=1,
               sm_count=132, options=None):
    """status, tokens, num_accepted, splits (and launches) of mtp_verify with splits = mtp_verify_splits(B, K,
    V, sampled, num_splits, sm_count): num_splits 1 is the one-block kernel, >= 2 asks for that
    many slices, 0 the heuristic."""
    batch, k = draft.shape
    vocab = logits.shape[-1]
    sampled = temperature > 0
    s = dict(batch=batch, k=k, vocab=vocab, temperature=repr(float(temperature)),
             logits_dtype=DTYPE_NAMES[logits.dtype], logits_off=logits.storage_offset(),
             stride_lb=logits.stride(0), stride_lk=logits.stride(1), has_probs=int(probs is not None),
             probs_dtype=DTYPE_NAMES[probs.dtype] if probs is not None else "fp32",
             num_splits=num_splits, sm_count=sm_count)
    bufs = dict(draft=draft.to(torch.int64).contiguous(), logits=logits,
                tokens=poison((batch, k + 1), torch.int64), num_accepted=poison((batch,), torch.int64))
    if probs is not None:
        s.update(probs_off=probs.storage_offset(), stride_pb=probs.stride(0), stride_pk=probs.stride(1))
        bufs["probs"] = probs
    if sampled:
        bufs["uniforms"] = uniforms.to(torch.float32).contiguous()
    r = run_case(exe, "mtp", s, bufs, ["tokens", "num_accepted"], options)
    return SimpleNamespace(status=r.status, launches=r.values["launches"], splits=r.values["splits"],
                           tokens=from_bytes(r.outputs["tokens"], torch.int64, (batch, k + 1)),
                           num_accepted=from_bytes(r.outputs["num_accepted"], torch.int64, (batch,)))


# --- the ops of logprobs.cpp, rms_norm.cpp, rope.cpp and swiglu.cpp ------------------------------
# Their tensors are passed as views: one buffer per distinct storage (the halves of a fused gate_up
# share one, and so do the logits and a gradient written over them), each view named by its buffer
# and element offset (harness.cpp: view()).


class _Views:
    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}
        self.scalars: dict[str, object] = {}
        self._storages: dict[int, str] = {}

    def add(self, name: str, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr() if storage.nbytes() else None
        buf = self._storages.get(key) if key is not None else None
        if buf is None:
            buf = name
            self.buffers[name] = t
            if key is not None:
                self._storages[key] = name
        self.scalars[f"{name}_buf"] = buf
        self.scalars[f"{name}_off"] = t.storage_offset()
        return t

    def run(self, exe, op, scalars, outputs: dict[str, torch.Tensor], options):
        """Runs op; returns (result, {name: the output view with the buffer's final bytes})."""
        names = sorted({self.scalars[f"{n}_buf"] for n in outputs})
        r = run_case(exe, op, {**self.scalars, **scalars}, self.buffers, names, options)
        return r, {n: _view_of(r.outputs[self.scalars[f"{n}_buf"]], t) for n, t in outputs.items()}


def _view_of(data: bytes, like: torch.Tensor) -> torch.Tensor:
    """The view `like` (shape, strides, offset) of a buffer holding `data`."""
    if not data:
        return torch.empty(like.shape, dtype=like.dtype)
    flat = torch.frombuffer(bytearray(data), dtype=like.dtype)
    return flat.as_strided(like.shape, like.stride(), like.storage_offset())


def _check_logits3(logits):
    """csrc/bindings/logprobs.cpp check_logits3 (the conditions the kernel relies on)."""
    if logits.dim() != 3 or not 1 <= logits.shape[2] or (logits.stride(2) != 1 and logits.shape[2] != 1):
        raise ValueError(f"logits must be [B, T, V] with a unit stride on V, got {tuple(logits.shape)}")
    return logits.shape[0] * logits.shape[1], logits.shape[2]


def _logprobs_scalars(v: _Views, logits, token_ids, temperature):
    rows, vocab = _check_logits3(logits)
    if token_ids.dtype not in (torch.int32, torch.int64) or token_ids.shape != (rows,) or not token_ids.is_contiguous():
        raise ValueError("token_ids must be contiguous int32 / int64 [B * T]")
    v.add("logits", logits)
    v.add("ids", token_ids)
    return dict(dtype=DTYPE_NAMES[logits.dtype], stride_b=_stride_or_zero(logits, 0),
                stride_s=_stride_or_zero(logits, 1), seq_len=logits.shape[1], rows=rows, vocab=vocab,
                ids_int64=int(token_ids.dtype == torch.int64), temperature=repr(float(temperature)))


def token_logprobs_fwd(exe, logits, token_ids, temperature=1.0, return_entropy=False, options=None):
    """status, logprobs, entropy, lse (and launches) of token_logprobs_fwd: logits [B, T, V] (unit
    stride on V, any other strides), token_ids [B * T]; outputs float32 [B * T] uninitialised
    (poisoned here), entropy an empty [0] tensor when not requested."""
    v = _Views()
    s = _logprobs_scalars(v, logits, token_ids, temperature)
    rows = s["rows"]
    outs = dict(logprobs=poison((rows,), torch.float32), lse=poison((rows,), torch.float32))
    if return_entropy:
        outs["entropy"] = poison((rows,), torch.float32)
    for name, t in outs.items():
        v.add(name, t)
    r, o = v.run(exe, "logprobs_fwd", dict(s, entropy=int(return_entropy)), outs, options)
    return SimpleNamespace(status=r.status, launches=r.values["launches"], logprobs=o["logprobs"], lse=o["lse"],
                           entropy=o.get("entropy", torch.empty(0)))


def _check_grad_logits(grad_logits, logits):
    """csrc/bindings/logprobs.cpp check_grad_logits: contiguous, the logits' shape and dtype, and
    either the logits themselves or no overlap with them."""
    if grad_logits.dtype != logits.dtype or grad_logits.shape != logits.shape:
        raise ValueError("grad_logits must have the logits' shape and dtype")
    if not grad_logits.is_contiguous():
        raise ValueError("grad_logits must be contiguous")
    same = grad_logits.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    if grad_logits.numel() and same:
        full = (grad_logits.storage_offset() == logits.storage_offset()
                and grad_logits.stride() == logits.stride())
        if not full:  # (at::get_overlap_status: not Full; the binding refuses any other overlap)
            raise ValueError("grad_logits may be the logits themselves (in place) but must not otherwise overlap them")


def token_logprobs_bwd_out(exe, grad_logprobs, grad_entropy, logits, token_ids, lse, entropy, temperature,
                           grad_logits, options=None):
    """status, grad_logits (and launches) of token_logprobs_bwd_out: the gradient written into
    grad_logits, which may be `logits` itself (in place). The tensors passed are not modified:
    grad_logits comes back as a new tensor with the buffer's final contents."""
    _check_grad_logits(grad_logits, logits)
    v = _Views()
    s = _logprobs_scalars(v, logits, token_ids, temperature)
    v.add("grad_logprobs", grad_logprobs.float().contiguous())
    v.add("lse", lse.float().contiguous())
    if grad_entropy is not None:
        v.add("grad_entropy", grad_entropy.float().contiguous())
        v.add("entropy", entropy.float().contiguous())
    v.add("grad_logits", grad_logits)
    r, o = v.run(exe, "logprobs_bwd", dict(s, grad_entropy=int(grad_entropy is not None)),
                 dict(grad_logits=grad_logits), options)
    return SimpleNamespace(status=r.status, launches=r.values["launches"], grad_logits=o["grad_logits"])


def token_logprobs_bwd(exe, grad_logprobs, grad_entropy, logits, token_ids, lse, entropy, temperature,
                       options=None):
    """token_logprobs_bwd: the gradient into a fresh contiguous tensor (poisoned here)."""
    return token_logprobs_bwd_out(exe, grad_logprobs, grad_entropy, logits, token_ids, lse, entropy, temperature,
                                  poison(logits.shape, logits.dtype), options)


def _rows_view(t, name):
    """csrc/bindings/common.h check_rows: [rows, cols] with a unit column stride."""
    if t.dim() != 2 or (t.stride(1) != 1 and t.shape[1] > 1 and t.shape[0] > 0):
        raise ValueError(f"{name} must be 2-D with a unit column stride, got {tuple(t.shape)} {t.stride()}")
    return t


def rms_norm_fwd(exe, x, weight, residual=None, eps=1e-6, options=None):
    """status, y, h, rstd (and launches) of rms_norm_fwd: x [rows, cols] and residual with any row
    stride; y in the promoted dtype, h (with a residual, else an empty tensor) and rstd fresh
    (poisoned here)."""
    rows, cols = _rows_view(x, "x").shape
    v = _Views()
    v.add("x", x)
    v.add("weight", weight.contiguous())
    s = dict(x_dtype=DTYPE_NAMES[x.dtype], w_dtype=DTYPE_NAMES[weight.dtype], rows=rows, cols=cols,
             x_rs=x.stride(0), residual=int(residual is not None), eps=repr(float(eps)))
    outs = dict(y=poison((rows, cols), torch.promote_types(x.dtype, weight.dtype)),
                rstd=poison((rows,), torch.float32))
    if residual is not None:
        v.add("residual", _rows_view(residual, "residual"))
        s["residual_rs"] = residual.stride(0)
        outs["h"] = poison((rows, cols), x.dtype)
    for name, t in outs.items():
        v.add(name, t)
    r, o = v.run(exe, "rms_fwd", s, outs, options)
    return SimpleNamespace(status=r.status, launches=r.values["launches"], y=o["y"], rstd=o["rstd"],
                           h=o.get("h", torch.empty(0, dtype=x.dtype)))


def rms_norm_bwd(exe, dy, h, weight, rstd, dh=None, options=None):
    """status, dx, dw, workspace_floats (and launches) of rms_norm_bwd: dy and h with any row
    stride, dh contiguous; dx, dw and the dweight workspace uninitialised (poisoned here)."""
    rows, cols = _rows_view(h, "h").shape
    v = _Views()
    v.add("dy", _rows_view(dy, "dy"))
    v.add("h", h)
    v.add("weight", weight.contiguous())
    v.add("rstd", rstd.contiguous())
    s = dict(x_dtype=DTYPE_NAMES[h.dtype], w_dtype=DTYPE_NAMES[weight.dtype], rows=rows, cols=cols,
             dy_rs=dy.stride(0), h_rs=h.stride(0), dh=int(dh is not None))
    if dh is not None:
        if not dh.is_contiguous():
            raise ValueError("dh must be contiguous")
        v.add("dh", dh)
    outs = dict(dx=poison((rows, cols), h.dtype), dw=poison((cols,), weight.dtype))
    for name, t in outs.items():
        v.add(name, t)
    r, o = v.run(exe, "rms_bwd", s, outs, options)
    return SimpleNamespace(status=r.status, launches=r.values["launches"], dx=o["dx"], dw=o["dw"],
                           workspace_floats=r.values["workspace_floats"])


def _heads(v: _Views, s: dict, name: str, t: torch.Tensor):
    """csrc/bindings/common.h heads_view: [B, S, H, D] with stride_or_zero strides."""
    if t.dim() != 4 or t.stride(3) != 1:
        raise ValueError(f"{name} must be [B, S, H, D] with a unit stride on D")
    v.add(name, t)
    s.update({f"{name}_heads": t.shape[2], f"{name}_sb": _stride_or_zero(t, 0), f"{name}_ss": _stride_or_zero(t, 1),
              f"{name}_sh": _stride_or_zero(t, 2)})


def _rotary_outputs(v, s, q, k, dtype):
    outs = dict(q_out=poison(q.shape, dtype), k_out=poison(k.shape, dtype))
    for name, t in outs.items():
        v.add(name, t)
    s.update(batch=q.shape[0], seq=q.shape[1], head_dim=q.shape[3])
    return outs


def _rope(exe, q, k, position_ids, inv_freq, attention_scaling, llama4_beta, llama4_original_max, backward,
          options):
    v, s = _Views(), {}
    _heads(v, s, "q", q)
    _heads(v, s, "k", k)
    v.add("pos", position_ids)
    v.add("inv_freq", inv_freq.contiguous())
    s.update(dtype=DTYPE_NAMES[q.dtype], pos_int64=int(position_ids.dtype == torch.int64),
             pos_sb=_stride_or_zero(position_ids, 0), pos_ss=position_ids.stride(1),
             attention_scaling=repr(float(attention_scaling)), llama4_beta=repr(float(llama4_beta)),
             llama4_original_max=int(llama4_original_max), backward=int(backward))
    outs = _rotary_outputs(v, s, q, k, q.dtype)
    r, o = v.run(exe, "rope", s, outs, options)
    return SimpleNamespace(status=r.status, launches=r.values["launches"], q=o["q_out"], k=o["k_out"])


def rope_fwd(exe, q, k, position_ids, inv_freq, attention_scaling=1.0, llama4_beta=0.0, llama4_original_max=0,
             options=None):
    """status, q, k (the rotated ones; and launches) of rope_fwd: q [B, S, Hq, D] and k [B, S, Hkv, D]
    with a unit stride on D, position_ids [B or 1, S] int32 / int64, inv_freq float32 [D / 2];
    outputs contiguous (poisoned here)."""
    return _rope(exe, q, k, position_ids, inv_freq, attention_scaling, llama4_beta, llama4_original_max, False,
                 options)


def rope_bwd(exe, dq_out, dk_out, position_ids, inv_freq, attention_scaling=1.0, llama4_beta=0.0,
             llama4_original_max=0, options=None):
    """rope_bwd: dq, dk (as q, k of the result) from the output gradients."""
    return _rope(exe, dq_out, dk_out, position_ids, inv_freq, attention_scaling, llama4_beta, llama4_original_max,
                 True, options)


def _apply_rotary(exe, q, k, cos, sin, out_dtype, backward, options):
    v, s = _Views(), {}
    _heads(v, s, "q", q)
    _heads(v, s, "k", k)
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.stride(2) != 1:
            raise ValueError(f"{name} must be [B or 1, S, D] with a unit stride on D")
        v.add(name, t)
        s.update({f"{name}_sb": _stride_or_zero(t, 0), f"{name}_ss": _stride_or_zero(t, 1)})
    s.update(in_dtype=DTYPE_NAMES[q.dtype], cos_dtype=DTYPE_NAMES[cos.dtype], out_dtype=DTYPE_NAMES[out_dtype],
             backward=int(backward))
    outs = _rotary_outputs(v, s, q, k, out_dtype)
    r, o = v.run(exe, "apply_rotary", s, outs, options)
    return SimpleNamespace(status=r.status, launches=r.values["launches"], q=o["q_out"], k=o["k_out"])


def apply_rotary_fwd(exe, q, k, cos, sin, options=None):
    """apply_rotary_fwd: outputs in promote(q's dtype, cos's dtype), as transformers'."""
    return _apply_rotary(exe, q, k, cos, sin, torch.promote_types(q.dtype, cos.dtype), False, options)


def apply_rotary_bwd(exe, dq_out, dk_out, cos, sin, q_dtype, options=None):
    """apply_rotary_bwd: dq, dk in q_dtype (the forward's input dtype)."""
    return _apply_rotary(exe, dq_out, dk_out, cos, sin, q_dtype, True, options)


def _swiglu_views(v, s, **views):
    for name, t in views.items():
        v.add(name, t)
        s[f"{name}_rs"] = t.stride(0)


def swiglu_fwd(exe, gate, up, options=None):
    """status, y (and launches) of swiglu_fwd: gate, up [rows, cols] with any row strides; y fresh
    and contiguous (poisoned here)."""
    rows, cols = _rows_view(gate, "gate").shape
    _rows_view(up, "up")
    y = poison((rows, cols), gate.dtype)
    v, s = _Views(), dict(dtype=DTYPE_NAMES[gate.dtype], rows=rows, cols=cols)
    _swiglu_views(v, s, gate=gate, up=up, y=y)
    r, o = v.run(exe, "swiglu_fwd", s, dict(y=y), options)
    return SimpleNamespace(status=r.status, launches=r.values["launches"], y=o["y"])


def swiglu_bwd(exe, dy, gate, up, options=None):
    """status, dgate, dup (and launches) of swiglu_bwd (outputs fresh and contiguous)."""
    rows, cols = _rows_view(gate, "gate").shape
    dgate, dup = poison((rows, cols), gate.dtype), poison((rows, cols), gate.dtype)
    v, s = _Views(), dict(dtype=DTYPE_NAMES[gate.dtype], rows=rows, cols=cols)
    _swiglu_views(v, s, dy=_rows_view(dy, "dy"), gate=gate, up=_rows_view(up, "up"), dgate=dgate, dup=dup)
    r, o = v.run(exe, "swiglu_bwd", s, dict(dgate=dgate, dup=dup), options)
    return SimpleNamespace(status=r.status, launches=r.values["launches"], dgate=o["dgate"], dup=o["dup"])


def _gate_up_halves(gate_up):
    """csrc/bindings/swiglu.cpp check_gate_up: [rows, 2N] -> its two column halves."""
    _rows_view(gate_up, "gate_up")
    if gate_up.shape[1] % 2:
        raise ValueError("gate_up's last dim must be even")
    cols = gate_up.shape[1] // 2
    return gate_up.narrow(1, 0, cols), gate_up.narrow(1, cols, cols)


def swiglu_fused_fwd(exe, gate_up, options=None):
    """swiglu_fused_fwd: y from the two halves of gate_up [rows, 2N], read in place (the split
    op on two views of one buffer, as the binding launches it)."""
    return swiglu_fwd(exe, *_gate_up_halves(gate_up), options)


def swiglu_fused_bwd(exe, dy, gate_up, options=None):
    """swiglu_fused_bwd: dgate_up [rows, 2N] (fresh, poisoned here) written as its two halves."""
    gate, up = _gate_up_halves(gate_up)
    rows, cols = gate.shape
    dgate_up = poison((rows, 2 * cols), gate_up.dtype)
    dgate, dup = dgate_up.narrow(1, 0, cols), dgate_up.narrow(1, cols, cols)
    v, s = _Views(), dict(dtype=DTYPE_NAMES[gate_up.dtype], rows=rows, cols=cols)
    v.add("dgate_up", dgate_up)  # the buffer of both halves
    _swiglu_views(v, s, dy=_rows_view(dy, "dy"), gate=gate, up=up, dgate=dgate, dup=dup)
    r, o = v.run(exe, "swiglu_bwd", s, dict(dgate_up=dgate_up), options)
    return SimpleNamespace(status=r.status, launches=r.values["launches"], dgate_up=o["dgate_up"])


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["build"])
    ap.add_argument("--mutation", choices=list(MUTATIONS) + list(KERNEL_MUTANTS))
    ap.add_argument("--variant", choices=list(VARIANTS))
    args = ap.parse_args()
    try:
        print(build(args.mutation, args.variant))
    except Unavailable as e:
        sys.exit(f"cannot build the emulation: {e}")
