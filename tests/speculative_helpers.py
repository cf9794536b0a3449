"""Shared by the speculative-decoding tests (test_speculative.py, test_static_decode.py)."""


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
