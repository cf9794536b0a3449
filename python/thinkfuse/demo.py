"""The main job: patch a tiny model of every family on every usable backend, check it
against the unpatched model, and print what ran where.

    python -m thinkfuse.demo            (exit status 1 if any check fails)
    python -m thinkfuse.demo --backend triton --family mimo   (--help lists the options)

On a machine without a GPU the Triton kernels run through the Triton interpreter
(TRITON_INTERPRET=1 is set here unless the environment says otherwise).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import thinkfuse  # noqa: E402  (after TRITON_INTERPRET is settled)
from thinkfuse.backend import BACKENDS, why_unavailable  # noqa: E402
from thinkfuse.tiny import BUILDERS, tiny_batch, tiny_model  # noqa: E402

# Float32 tolerances from ARCHITECTURE.md (logits and gradients are long reductions).
LOGITS_TOL = 1e-4
GRAD_TOL = 1e-4

# Sequence lengths at which every feature of the tiny models acts: Ministral 3's query temperature
# differs from 1 only from position original_max_position_embeddings (32 in tiny.py) on, and
# Mistral's sliding window must be shorter than the sequence. Longer sequences cost time in the
# Triton interpreter, so only the Ministral 3 models get one.
SEQ = {"ministral3": 40, "mistral3": 40}
DEFAULT_SEQ = 11
# tiny_model("mistral") has no window (tests rely on that); the demo gives it one.
MISTRAL_SLIDING_WINDOW = 4
# A check where one of these was not patched would not have run that kernel.
KERNEL_KINDS = ("rms_norm", "swiglu", "rope", "attention")


def _logits(model, ids):
    """The model's logits; for a model with MTP layers (MiMo) the first MTP layer's logits
    (drafts for tokens t+2) follow along the sequence axis, so its patched modules are checked
    too (a plain forward runs the trunk only)."""
    if not hasattr(model, "mtp_forward"):
        return model(ids).logits
    outputs, hidden = model.forward_with_pre_norm_hidden(ids)
    return torch.cat([outputs.logits, model.mtp_forward(hidden[:, :-1], ids[:, 1:]).logits], dim=1)


def _forward_backward(model, ids):
    model.zero_grad(set_to_none=True)
    logits = _logits(model, ids)
    # The fused loss (the "loss" rule) runs only in training with labels; the tiny models have no
    # dropout, so train mode changes nothing else.
    model.train()
    outputs = model(ids, labels=ids)
    model.eval()
    (logits.float().square().mean() + outputs.loss).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    fused_loss = outputs.logits is None  # the fused loss returns no logits
    return logits.detach(), outputs.loss.detach(), grads, fused_loss


def _relative_error(ours: torch.Tensor, truth: torch.Tensor) -> float:
    return ((ours - truth).abs().max() / truth.abs().max().clamp_min(1e-12)).item()


def demo_model(family: str, device: torch.device):
    model = tiny_model(family).to(device)
    if family == "mistral":
        model.config.sliding_window = MISTRAL_SLIDING_WINDOW
    return model


def check_family(family: str, backend: str, device: torch.device) -> dict:
    """Patch a tiny model of ``family`` with ``backend``; compare logits, loss and grads."""
    model = demo_model(family, device)
    ids = tiny_batch(seq=SEQ.get(family, DEFAULT_SEQ), device=device)
    ref_logits, ref_loss, ref_grads, _ = _forward_backward(model, ids)
    state_keys = list(model.state_dict())

    start = time.perf_counter()
    report = thinkfuse.patch_model(model, backend=backend)
    logits, loss, grads, fused_loss = _forward_backward(model, ids)
    seconds = time.perf_counter() - start

    logits_err = max(_relative_error(logits, ref_logits), _relative_error(loss, ref_loss))
    # a parameter the patched model gave no gradient counts as an infinite error
    grad_err = max(_relative_error(grads[n], g) if n in grads else float("inf") for n, g in ref_grads.items())
    thinkfuse.unpatch_model(model)
    after = _forward_backward(model, ids)
    restored = torch.equal(after[0], ref_logits) and torch.equal(after[1], ref_loss)
    ok = (
        logits_err <= LOGITS_TOL
        and grad_err <= GRAD_TOL
        and restored
        and list(model.state_dict()) == state_keys
        and all(report.patched.get(kind) for kind in KERNEL_KINDS)
        and fused_loss == bool(report.patched.get("loss"))  # a patched loss that never ran checks nothing
    )
    return {
        "family": family,
        "model": report.model,
        "patched": " ".join(f"{k}:{n}" for k, n in report.patched.items()),
        "backend": report.resolved_backend,
        "attention": report.attention,  # which attention core ran: thinkfuse:<backend> or transformers
        "logits_err": logits_err,
        "grad_err": grad_err,
        "restored": restored,
        "seconds": seconds,
        "ok": ok,
    }


def _print_table(rows: list[dict]) -> None:
    headers = ["family", "model", "patched", "backend", "attention", "logits/loss err", "grads err", "unpatch",
               "time s", "status"]
    cells = [
        [r["family"], r["model"], r["patched"], r["backend"], r["attention"], f"{r['logits_err']:.2e}",
         f"{r['grad_err']:.2e}", "yes" if r["restored"] else "NO", f"{r['seconds']:.2f}",
         "ok" if r["ok"] else "FAIL"]
        for r in rows
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
        for line in [headers] + cells:
            print("  ".join(v.ljust(w) for v, w in zip(line, widths)))
        return
    table = Table(title="patch_model vs the unpatched model (float32, max relative error)")
    for h in headers:
        table.add_column(h)
    for c in cells:
        table.add_row(*c, style=None if c[-1] == "ok" else "bold red")
    # Wide enough for one line per row even when stdout is not a terminal (CI logs).
    Console(width=max(shutil.get_terminal_size().columns, 150)).print(table)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m thinkfuse.demo",
        description="Patch a tiny random model of every family on every usable backend, compare it with the "
                    "unpatched model (logits, loss, gradients) and print what ran where. Exit status 1 if a "
                    "check fails.")
    parser.add_argument("--backend", action="append", choices=BACKENDS,
                        help="backend to check (repeatable; default: every one usable here)")
    parser.add_argument("--family", action="append", choices=list(BUILDERS),
                        help="model family to check (repeatable; default: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    # None means no options (not sys.argv): main() called from Python checks everything.
    parser = _parser()
    args = parser.parse_args([] if argv is None else argv)
    for name in args.backend or ():
        reason = why_unavailable(name)
        if reason is not None:
            parser.error(f"argument --backend: {name!r} is unavailable here: {reason}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = list(dict.fromkeys(args.backend)) if args.backend else thinkfuse.available_backends()
    print(f"thinkfuse {thinkfuse.__version__} | torch {torch.__version__} | device {device} | "
          f"backends {backends} | TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    for name in BACKENDS:  # say why a backend is left out (e.g. a GPU without the built extension)
        if name not in backends and why_unavailable(name) is not None:
            print(f"  {name} not checked: {why_unavailable(name)}")
    rows = [check_family(family, backend, device) for family in dict.fromkeys(args.family or BUILDERS) for backend in backends]
    _print_table(rows)
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
