"""Shared by the speculative-decoding tests (test_speculative.py, test_static_decode.py)."""

import torch

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
