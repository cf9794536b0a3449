"""The demo (python -m thinkfuse.demo): its command line, and that its check fails when a kernel
is wrong in a way only some feature of the tiny models shows (each wrong kernel is simulated by
monkeypatching the op the patched forwards call)."""

import functools

import pytest
import torch

import thinkfuse
from thinkfuse import demo
from thinkfuse.patching import forwards
import thinkfuse.attention_interface as attention_interface

from conftest import DEVICE


def _no_checks(*args, **kwargs):
    raise AssertionError("the demo ran a check")


def test_help_prints_the_options_and_runs_nothing(monkeypatch, capsys):
    monkeypatch.setattr(demo, "check_family", _no_checks)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--backend" in out and "--family" in out


@pytest.mark.parametrize("argv, named", [(["--backend", "gpu"], "--backend"), (["--family", "llama"], "--family"),
                                         (["--bogus"], "--bogus")])
def test_bad_options_are_refused_before_any_check(monkeypatch, capsys, argv, named):
    monkeypatch.setattr(demo, "check_family", _no_checks)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_an_unavailable_backend_is_refused_with_the_reason(monkeypatch, capsys):
    # as on a GPU machine without the built extension
    reason = "the CUDA extension thinkfuse._C is not built"
    monkeypatch.setattr(demo, "why_unavailable", lambda name: reason if name == "cuda" else None)
    monkeypatch.setattr(demo, "check_family", _no_checks)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--backend", "cuda"])
    assert exit_info.value.code == 2
    assert reason in capsys.readouterr().err


def _fake_row(family, backend, device):
    return {"family": family, "model": "M", "patched": "rms_norm:1", "backend": backend, "attention": "a",
            "logits_err": 0.0, "grad_err": 0.0, "restored": True, "seconds": 0.0, "ok": family != "mimo"}


def test_backend_and_family_selection(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(demo, "check_family", lambda *a: calls.append(a[:2]) or _fake_row(*a))
    assert demo.main(["--backend", "torch", "--family", "qwen2", "--family", "mistral"]) == 0
    assert calls == [("qwen2", "torch"), ("mistral", "torch")]
    assert "2 passed, 0 failed" in capsys.readouterr().out


def test_a_failed_check_gives_exit_status_1(monkeypatch):
    monkeypatch.setattr(demo, "check_family", _fake_row)
    assert demo.main(["--backend", "torch", "--family", "mimo"]) == 1


def test_a_backend_left_out_is_explained(monkeypatch, capsys):
    # a GPU machine without the built extension: only triton and torch run, and the reason shows
    reason = "the CUDA extension thinkfuse._C is not built"
    monkeypatch.setattr(demo, "why_unavailable", lambda name: reason if name == "cuda" else None)
    monkeypatch.setattr(thinkfuse, "available_backends", lambda: ["triton", "torch"])
    monkeypatch.setattr(demo, "check_family", _fake_row)
    assert demo.main(["--family", "qwen2"]) == 0
    assert f"cuda not checked: {reason}" in capsys.readouterr().out


# --- the check catches wrong kernels ---------------------------------------------------------


def test_a_wrong_rms_norm_fails_the_check(monkeypatch):
    rms_norm = thinkfuse.ops.rms_norm
    monkeypatch.setattr(thinkfuse.ops, "rms_norm", lambda x, w, eps=1e-6, **kw: rms_norm(x, w * 1.001, eps, **kw))
    assert not demo.check_family("qwen2", "torch", DEVICE)["ok"]


def test_a_missing_query_temperature_fails_the_check(monkeypatch):
    # Ministral 3 multiplies q by 1 + beta*ln(1 + floor(pos / 32)) (tiny.py): 1 below position 32
    monkeypatch.setattr(forwards, "llama4_scaling", lambda config: None)
    assert not demo.check_family("ministral3", "torch", DEVICE)["ok"]


def test_an_ignored_sliding_window_fails_the_check(monkeypatch):
    monkeypatch.setattr(attention_interface, "_window", lambda window: None)
    assert not demo.check_family("mistral", "torch", DEVICE)["ok"]


def test_a_wrong_fused_loss_fails_the_check(monkeypatch):
    # the loss rule's kernel runs only in training with labels
    loss = thinkfuse.ops.causal_lm_loss
    monkeypatch.setattr(thinkfuse.ops, "causal_lm_loss", lambda *a, **kw: loss(*a, **kw) * 1.001)
    assert not demo.check_family("qwen2", "torch", DEVICE)["ok"]


def test_a_kernel_that_was_not_patched_fails_the_check(monkeypatch):
    # the model's own attention then runs: the logits match, but no thinkfuse attention ran
    monkeypatch.setattr(thinkfuse, "patch_model", functools.partial(thinkfuse.patch_model, attention=False))
    assert not demo.check_family("qwen2", "torch", DEVICE)["ok"]



def test_a_fused_loss_that_never_runs_fails_the_check(monkeypatch):
    # patch_model reports the loss rule, but the patched forward falls back to the model's loss
    monkeypatch.setattr(forwards, "_fused_loss_applies", lambda *args: False)
    assert not demo.check_family("qwen2", "torch", DEVICE)["ok"]
