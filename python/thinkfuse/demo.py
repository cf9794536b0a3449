"""The main job: patch a tiny model of every family on every usable backend, check it
against the unpatched model, and print what ran where.

    python -m thinkfuse.demo            (exit status 1 if any check fails)

On a machine without a GPU the Triton kernels run through the Triton interpreter
(TRITON_INTERPRET=1 is set here unless the environment says otherwise).
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import thinkfuse  # noqa: E402  (after TRITON_INTERPRET is settled)
from thinkfuse.tiny import BUILDERS, tiny_batch, tiny_model  # noqa: E402

# Float32 tolerances from ARCHITECTURE.md (logits and gradients are long reductions).
LOGITS_TOL = 1e-4
GRAD_TOL = 1e-4


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
    logits.float().square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _relative_error(ours: torch.Tensor, truth: torch.Tensor) -> float:
    return ((ours - truth).abs().max() / truth.abs().max().clamp_min(1e-12)).item()


def check_family(family: str, backend: str, device: torch.device) -> dict:
    """Patch a tiny model of ``family`` with ``backend``; compare logits and grads."""
    model = tiny_model(family).to(device)
    ids = tiny_batch(device=device)
    ref_logits, ref_grads = _forward_backward(model, ids)
    state_keys = list(model.state_dict())

    start = time.perf_counter()
    report = thinkfuse.patch_model(model, backend=backend)
    logits, grads = _forward_backward(model, ids)
    seconds = time.perf_counter() - start

    logits_err = _relative_error(logits, ref_logits)
    # a parameter the patched model gave no gradient counts as an infinite error
    grad_err = max(_relative_error(grads[n], g) if n in grads else float("inf") for n, g in ref_grads.items())
    thinkfuse.unpatch_model(model)
    restored = torch.equal(_forward_backward(model, ids)[0], ref_logits)
    ok = (
        logits_err <= LOGITS_TOL
        and grad_err <= GRAD_TOL
        and restored
        and list(model.state_dict()) == state_keys
        and report.total > 0
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
    headers = ["family", "model", "patched", "backend", "attention", "logits err", "grads err", "unpatch",
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


def main(argv=None) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = thinkfuse.available_backends()
    print(f"thinkfuse {thinkfuse.__version__} | torch {torch.__version__} | device {device} | "
          f"backends {backends} | TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    rows = [check_family(family, backend, device) for family in BUILDERS for backend in backends]
    _print_table(rows)
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
