"""Shared by the speculative-decoding tests (test_speculative.py, test_static_decode.py)."""

import torch

from thinkfuse import speculative
from thinkfuse.sampling import Sampling, warpers


def record_acceptances(monkeypatch, owner, name: str = "mtp_verify") -> list:
    """Wrap the verify function ``owner.<name>`` (where the decoding code looks it up) so that
    each call appends its rows' accepted counts; returns that list, one entry per verify step."""
    steps = []
    verify = getattr(owner, name)

    def recording(*args, **kwargs):
        tokens, accepted = verify(*args, **kwargs)
        steps.append(accepted.tolist())
        return tokens, accepted

    monkeypatch.setattr(owner, name, recording)
    return steps


def record_verify_counts(monkeypatch, device) -> dict:
    """Wrap ``_NewTokens.append``, which both engines (dynamic and static) hand each verify
    step's ``[B, 2]`` tokens with ``counts`` = accepted + 1, so that each such step adds up: the
    rows still generating (``generating``), the drafts those rows accepted (``accepted``) and
    the drafts rows already done accepted (``accepted_when_done``: they must not count). Device
    ops only, into tensors made here: a captured step replays them too. Returns the totals."""
    totals = {name: torch.zeros((), dtype=torch.long, device=device)
              for name in ("generating", "accepted", "accepted_when_done")}
    append = speculative._NewTokens.append

    def recording(self, new, counts):
        if new.shape[1] == 2:
            generating = ~self.done_rows()
            accepted = counts - 1
            totals["generating"].add_(generating.sum())
            totals["accepted"].add_(torch.where(generating, accepted, 0).sum())
            totals["accepted_when_done"].add_(torch.where(generating, 0, accepted).sum())
        append(self, new, counts)

    monkeypatch.setattr(speculative._NewTokens, "append", recording)
    return totals


def filtered_probs(model, ids, temperature, **filters):
    """The filtered sampling distribution of the model's next token after ``ids`` ``[1, P]``."""
    sampling = Sampling(temperature, None, warpers(**filters))
    with torch.no_grad():
        logits = model(ids).logits[:, -1]
    return torch.softmax(sampling.scores(logits), -1)[0]


def chi_square_p_value(tokens, probs):
    """p-value of ``tokens`` drawn from ``probs`` (chi-square over the support); asserts that no
    token lies outside it."""
    observed = torch.bincount(tokens, minlength=probs.numel()).double()
    support = probs > 0
    assert observed[~support].sum() == 0, "a token outside the filtered support was emitted"
    if support.sum() == 1:  # one possible token, and every draw is it
        return 1.0
    expected = probs.double()[support] * tokens.numel()
    stat = ((observed[support] - expected) ** 2 / expected).sum()
    dof = torch.tensor(support.sum().item() - 1.0, dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, stat / 2).item()
