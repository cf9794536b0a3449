"""patch_model / unpatch_model on tiny random models of every family (float32)."""

import copy
import inspect

import pytest
import torch
from conftest import DEVICE
from tolerances import assert_close_fp32

import thinkfuse
from thinkfuse.patching.engine import FAMILIES
from thinkfuse.tiny import BUILDERS, tiny_batch, tiny_model

FAMILY_NAMES = list(BUILDERS)
# Two decoder layers: two norms each plus the final norm, one MLP and one attention each.
# The attention rule switches the same attention modules the rope rule patches to "thinkfuse";
# the positions rule patches the base model, the loss rule the *ForCausalLM itself.
DECODER_PATCHES = {"rms_norm": 5, "swiglu": 2, "rope": 2, "attention": 2, "positions": 1}
TWO_LAYER_PATCHES = {**DECODER_PATCHES, "loss": 1}
EXPECTED_PATCHES = {
    # MiMo's MTP layer adds a decoder block and its own token/hidden/final norms.
    "mimo": {"rms_norm": 10, "swiglu": 3, "rope": 3, "attention": 3, "positions": 1, "loss": 1},
    # Only the text model of the VLM is patched (no *ForCausalLM there).
    "mistral3": DECODER_PATCHES,
}


def _logits_and_grads(model, ids, **inputs):
    """Logits and parameter gradients; the loss reads only non-padding positions (what padding
    positions output is meaningless and differs between attention implementations)."""
    model.zero_grad(set_to_none=True)
    logits = model(ids, **inputs).logits
    mask = inputs.get("attention_mask")
    weight = 1.0 if mask is None else mask[..., None].float()
    (logits * torch.linspace(-1, 1, logits.shape[-1], device=logits.device) * weight).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _patched_state(model):
    return {name: m._thinkfuse_patch for name, m in model.named_modules() if hasattr(m, "_thinkfuse_patch")}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_patched_model_matches_unpatched(family, backend):
    model = tiny_model(family).to(DEVICE)
    ids = tiny_batch(device=DEVICE)
    ref_logits, ref_grads = _logits_and_grads(model, ids)
    keys = list(model.state_dict())
    cls = type(model)

    report = thinkfuse.patch_model(model, backend=backend)
    assert report.patched == EXPECTED_PATCHES.get(family, TWO_LAYER_PATCHES)
    assert report.resolved_backend == backend
    logits, grads = _logits_and_grads(model, ids)
    assert_close_fp32(logits, ref_logits, tol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert_close_fp32(grads[name], grad, tol=1e-4)
    assert list(model.state_dict()) == keys and type(model) is cls

    assert thinkfuse.unpatch_model(model) == report.total
    assert not _patched_state(model)
    restored, _ = _logits_and_grads(model, ids)
    assert torch.equal(restored, ref_logits)


def _assert_patched_matches(family, backend, ids, **inputs):
    model = tiny_model(family).to(DEVICE)
    ref_logits, ref_grads = _logits_and_grads(model, ids, **inputs)
    thinkfuse.patch_model(model, backend=backend)
    logits, grads = _logits_and_grads(model, ids, **inputs)
    mask = inputs.get("attention_mask")
    valid = slice(None) if mask is None else mask.bool()
    assert_close_fp32(logits[valid], ref_logits[valid], tol=1e-4)
    for name, grad in ref_grads.items():
        assert_close_fp32(grads[name], grad, tol=1e-4)


@pytest.mark.parametrize("family", ["ministral3", "mistral3", "qwen2"])
def test_positions_past_original_context(family, backend):
    """The tiny Ministral 3 config has original_max_position_embeddings 32: positions 60..109
    exercise the YaRN frequencies and the llama4 query temperature (1 + 0.1 ln(1 + pos // 32))."""
    ids = tiny_batch(2, 50, device=DEVICE)
    positions = torch.arange(60, 110, device=DEVICE).expand(2, -1)
    _assert_patched_matches(family, backend, ids, position_ids=positions)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_packed_position_ids(family, backend):
    """Two sequences packed in one row: position_ids restart inside the row."""
    ids = tiny_batch(1, 19, device=DEVICE)
    positions = torch.cat([torch.arange(7), torch.arange(12)]).to(DEVICE)[None]
    # use_cache=False: only then do transformers' sdpa masks separate packed sequences.
    _assert_patched_matches(family, backend, ids, position_ids=positions, use_cache=False)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_left_padded_batch(family, backend):
    ids = tiny_batch(3, 13, device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :1] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate() derives them
    _assert_patched_matches(family, backend, ids, attention_mask=mask, position_ids=positions)


def test_torch_backend_is_bit_exact():
    model = tiny_model("qwen2").to(DEVICE)
    ids = tiny_batch(device=DEVICE)
    ref = model(ids).logits
    # attention=False: the torch reference attention sums in another order than sdpa (1e-7 off).
    thinkfuse.patch_model(model, backend="torch", attention=False)
    assert torch.equal(model(ids).logits, ref)


def test_patching_twice_is_a_no_op():
    model = tiny_model("mistral")
    first = thinkfuse.patch_model(model, backend="torch")
    forwards = {n: m.forward for n, m in model.named_modules() if hasattr(m, "_thinkfuse_patch")}
    second = thinkfuse.patch_model(model, backend="torch")
    assert second.patched == first.patched
    assert forwards == {n: m.forward for n, m in model.named_modules() if hasattr(m, "_thinkfuse_patch")}
    assert thinkfuse.unpatch_model(model) == first.total
    assert "forward" not in model.model.norm.__dict__


def test_repatch_with_other_backend_needs_unpatch():
    model = tiny_model("qwen2")
    thinkfuse.patch_model(model, backend="torch")
    with pytest.raises(ValueError, match="unpatch_model"):
        thinkfuse.patch_model(model, backend="triton")


def test_unpatch_restores_an_instance_forward_that_was_there_before():
    model = tiny_model("qwen2")
    norm = model.model.norm
    calls = []

    def hooked(x):
        calls.append(1)
        return type(norm).forward(norm, x)

    norm.forward = hooked
    thinkfuse.patch_model(model, backend="torch")
    model(tiny_batch())
    assert not calls
    thinkfuse.unpatch_model(model)
    assert norm.forward is hooked
    model(tiny_batch())
    assert calls


def test_mistral3_vision_tower_and_projector_untouched():
    model = tiny_model("mistral3")
    thinkfuse.patch_model(model, backend="torch")
    patched = _patched_state(model)
    assert patched and all(name.startswith("model.language_model.") for name in patched if name != "model.language_model")
    assert not any(hasattr(m, "_thinkfuse_patch") for m in model.model.vision_tower.modules())
    assert not hasattr(model.model.multi_modal_projector.norm, "_thinkfuse_patch")


def test_flags_turn_kinds_off():
    model = tiny_model("ministral3")
    report = thinkfuse.patch_model(model, rms_norm=False, swiglu=False, rope=False, attention=False, loss=False)
    assert report.total == 0 and {"rms_norm", "swiglu", "rope", "attention", "loss"} <= set(report.disabled)
    assert not _patched_state(model)
    assert "rms_norm" in str(report) and "attention" in str(report)
    report = thinkfuse.patch_model(model, rms_norm=False)
    assert report.patched == {"swiglu": 2, "rope": 2, "attention": 2, "positions": 1, "loss": 1}


def test_rules_skip_modules_they_do_not_fit():
    """A non-SiLU MLP and a dynamic-rope attention are left as they are."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, hidden_act="gelu",
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    report = thinkfuse.patch_model(Qwen2ForCausalLM(config))
    # The attention core still switches: the original forward dispatches through the config.
    assert report.patched == {"rms_norm": 3, "attention": 1, "positions": 1, "loss": 1}


def test_report_names_backend_and_counts():
    model = tiny_model("qwen2")
    report = thinkfuse.patch_model(model)
    assert report.backend == "auto" and report.resolved_backend == "torch" and report.family == "qwen2"
    text = str(report)
    assert "Qwen2ForCausalLM" in text and "rms_norm" in text and "5 modules" in text
    assert report.patched == {"rms_norm": 5, "swiglu": 2, "rope": 2, "attention": 2, "positions": 1, "loss": 1}


def test_report_says_which_backend_each_kind_runs_on(monkeypatch):
    """API.md: the report says, per kind, with which backend. A model-wide "cuda" runs the kinds
    whose CUDA kernel is pending validation (attention here) on triton: each line says so."""
    import thinkfuse.backend as backend_module
    from thinkfuse.patching import PatchReport

    report = PatchReport(model="Qwen2ForCausalLM", family="qwen2", backend="cuda", device="cuda:0",
                         resolved_backend="cuda",
                         patched={"rms_norm": 5, "swiglu": 2, "rope": 2, "attention": 2, "positions": 1, "loss": 1})
    monkeypatch.setattr(backend_module, "cuda_has_op", lambda op: True)
    assert [report.backend_of(k) for k in ("rms_norm", "swiglu", "rope", "attention", "positions", "loss")] == \
        ["cuda", "cuda", "cuda", "triton", None, "cuda"]
    lines = str(report).splitlines()
    assert "  rms_norm      5 modules on cuda" in lines and "  attention     2 modules on triton" in lines
    assert "  positions     1 modules" in lines
    text = str(thinkfuse.patch_model(tiny_model("qwen2"), backend="triton"))
    assert "attention     2 modules on triton" in text and "rms_norm      5 modules on triton" in text


def test_deepcopy_of_patched_model_keeps_its_own_patches():
    model = tiny_model("qwen2")
    thinkfuse.patch_model(model, backend="torch")
    clone = copy.deepcopy(model)
    assert clone.model.norm.forward.__self__ is clone.model.norm
    assert clone.forward.__self__ is clone  # the loss rule's forward, bound to the copy
    assert thinkfuse.unpatch_model(clone) == sum(TWO_LAYER_PATCHES.values())
    assert clone.config._attn_implementation == "sdpa" and model.config._attn_implementation == "thinkfuse"
    assert "forward" not in clone.model.norm.__dict__ and "forward" not in clone.__dict__


@pytest.mark.parametrize("family", ["qwen2", "mistral3"])
def test_torch_save_of_a_whole_patched_model(family, tmp_path):
    """torch.save(model) pickles the replacement forwards: the loaded model runs them (not the
    class's forwards), equals the patched original, and unpatches like it."""
    model = tiny_model(family)
    report = thinkfuse.patch_model(model, backend="torch")
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    norm = loaded.get_decoder().norm
    assert norm.forward.__self__ is norm and norm.forward.__func__.func.__name__ == "rms_norm_forward"
    assert norm.forward is norm._thinkfuse_patch.patched_forward
    ids = tiny_batch(batch=2, seq=7)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert thinkfuse.unpatch_model(loaded) == report.total
    assert "forward" not in norm.__dict__


def test_replacement_forward_looks_like_a_bound_method():
    model = tiny_model("qwen2")
    original = inspect.signature(model.forward)
    thinkfuse.patch_model(model, backend="torch")
    patched = inspect.signature(model.forward)
    assert list(patched.parameters)[:7] == list(original.parameters)[:7]  # input_ids ... use_cache
    assert "self" not in patched.parameters and model.forward.__name__ == "causal_lm_forward"


def test_torch_compile_of_a_patched_model():
    """Inference compiles without a graph break (fullgraph); training, whose packed-sequence
    check reads position_ids on the host, compiles with breaks there; both equal eager."""
    model = tiny_model("qwen2")
    thinkfuse.patch_model(model, backend="torch")
    ids = tiny_batch(batch=2, seq=9)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        assert torch.equal(compiled(input_ids=ids).logits, model(input_ids=ids).logits)
    model.train()
    torch._dynamo.reset()
    compiled_loss = torch.compile(model, backend="eager")(input_ids=ids, labels=ids).loss
    compiled_loss.backward()
    compiled_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    eager_loss = model(input_ids=ids, labels=ids).loss
    eager_loss.backward()
    assert torch.equal(compiled_loss, eager_loss)
    assert_close_fp32(compiled_grad, model.lm_head.weight.grad)


def test_meta_device_forward_of_a_patched_model():
    """Shape-only forwards (meta tensors: memory planners, FLOP counters) run, in inference and
    in training, where the packed-sequence check has no values to read."""
    model = tiny_model("qwen2")
    thinkfuse.patch_model(model, backend="torch")
    model = model.to("meta")
    ids = tiny_batch(batch=2, seq=7).to("meta")
    assert model.eval()(input_ids=ids).logits.shape == (2, 7, model.config.vocab_size)
    assert model.train()(input_ids=ids, labels=ids).loss.device.type == "meta"


def test_accelerate_mixed_precision_keeps_the_named_backend(monkeypatch):
    """accelerate's prepare (native amp) rebinds ``forward.__func__`` inside autocast, and unwrap
    restores it: the patched forwards must still run on the backend patch_model was given."""
    accelerate = pytest.importorskip("accelerate")
    from thinkfuse.patching import forwards

    seen = []
    real_loss = forwards.ops.causal_lm_loss

    def spy(*args, backend=None, **kwargs):
        seen.append(backend)
        return real_loss(*args, backend=backend, **kwargs)

    monkeypatch.setattr(forwards.ops, "causal_lm_loss", spy)
    model = tiny_model("qwen2")
    thinkfuse.patch_model(model, backend="torch")
    model.train()
    ids = tiny_batch(batch=2, seq=8)
    from accelerate.state import AcceleratorState

    # accelerate's state is a process-wide singleton: an earlier test's Trainer may have set it.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        accelerator = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
        prepared = accelerator.prepare(model)
        prepared(input_ids=ids, labels=ids)
        accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)(input_ids=ids, labels=ids)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert seen == ["torch", "torch"]


def test_unsupported_models_are_named():
    with pytest.raises(thinkfuse.UnsupportedModel, match="Qwen2ForCausalLM.*MistralForCausalLM"):
        thinkfuse.patch_model(torch.nn.Linear(2, 2))
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64))
    with pytest.raises(thinkfuse.UnsupportedModel, match="LlamaForCausalLM"):
        thinkfuse.patch_model(llama)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        thinkfuse.patch_model("qwen2")


def test_every_rule_resolves_to_a_transformers_class():
    from thinkfuse.patching.rules import resolve_class

    for family in FAMILIES:
        for dotted in family.model_classes + tuple(r.module_class for r in family.rules):
            assert resolve_class(dotted) is not None, dotted
        # The VLM's rules apply to its text model only, which has no *ForCausalLM (no loss rule).
        kinds = set(thinkfuse.patching.KINDS) - ({"loss"} if family.name == "mistral3" else set())
        assert {r.kind for r in family.rules} == kinds, family.name


def test_demo_runs_and_passes(capsys):
    from thinkfuse import demo

    assert demo.main() == 0
    out = capsys.readouterr().out
    assert "0 failed" in out


def test_patching_again_without_a_backend_keeps_the_first_one():
    model = tiny_model("qwen2")
    first = thinkfuse.patch_model(model, backend="torch")
    second = thinkfuse.patch_model(model)
    assert second.backend == "torch" and second.patched == first.patched


def test_report_shows_the_backend_chosen_by_set_backend():
    model = tiny_model("qwen2")
    with thinkfuse.use_backend("torch"):
        report = thinkfuse.patch_model(model)
    assert report.backend == "auto" and report.resolved_backend == "torch"


def test_models_sharing_a_config_object_are_patched_per_instance():
    """Two models built from one config object: patching one must not switch the other's
    attention (the attention rule's switch is a config attribute)."""
    from transformers import Qwen2ForCausalLM

    first = tiny_model("qwen2")
    second = Qwen2ForCausalLM(first.config)
    ids = tiny_batch()
    ref = second(ids).logits
    thinkfuse.patch_model(first, backend="torch")
    assert first.config._attn_implementation == "thinkfuse"
    assert second.config._attn_implementation == "sdpa" and second.config is not first.config
    assert not any(hasattr(m, "_thinkfuse_patch") for m in second.modules())
    assert torch.equal(second(ids).logits, ref)
    # every module of the patched model reads the same (its own) config
    assert {id(m.config) for m in first.modules() if "config" in m.__dict__} == {id(first.config)}
    thinkfuse.unpatch_model(first)
    assert first.config is second.config  # the original object is back


@pytest.mark.parametrize("family", ["qwen2", "mistral3"])
def test_config_edits_made_while_patched_survive_unpatching(family):
    """Edits to the (copied) config while patched land on the original object at unpatch, as
    they would have without the patch: resize_token_embeddings' vocab_size, use_cache."""
    model = tiny_model(family)
    text_config = model.config.get_text_config()
    thinkfuse.patch_model(model, backend="torch")
    model.resize_token_embeddings(300)
    model.config.get_text_config().use_cache = False
    thinkfuse.unpatch_model(model)
    assert model.config.get_text_config() is text_config
    assert text_config.vocab_size == 300 and text_config.use_cache is False
    assert text_config._attn_implementation != "thinkfuse"
    if family == "qwen2":
        ids = tiny_batch()
        assert torch.isfinite(model(ids, labels=ids).loss)  # reshapes logits by config.vocab_size


class _LoraHead(torch.nn.Module):
    """An lm_head adapter laid out like PEFT's LoRA Linear: ``weight`` is the base weight, the
    logits are not ``x @ weight.T`` alone."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.lora_a = torch.nn.Linear(base.in_features, 2, bias=False)
        self.lora_b = torch.nn.Linear(2, base.out_features, bias=False)
        torch.nn.init.normal_(self.lora_b.weight)

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + self.lora_b(self.lora_a(x))


def test_lm_head_wrapped_after_patching_is_not_bypassed_by_the_loss_rule():
    model = tiny_model("qwen2").train()
    ids = tiny_batch()
    thinkfuse.patch_model(model, backend="torch")
    model.lm_head = _LoraHead(model.lm_head)
    loss = model(ids, labels=ids).loss
    loss.backward()
    adapter_grad = model.lm_head.lora_b.weight.grad
    thinkfuse.unpatch_model(model)
    model.zero_grad()
    ref = model(ids, labels=ids).loss
    ref.backward()
    assert_close_fp32(loss.detach(), ref.detach(), tol=1e-5)
    assert adapter_grad is not None
    assert_close_fp32(adapter_grad, model.lm_head.lora_b.weight.grad, tol=1e-5)


def test_vlm_sub_configs_are_copied_together():
    model = tiny_model("mistral3")
    text_before = model.config.text_config
    thinkfuse.patch_model(model, backend="torch")
    assert model.config.text_config is model.model.language_model.config
    assert model.config.text_config is not text_before and text_before._attn_implementation != "thinkfuse"
    assert model.config.text_config._attn_implementation == "thinkfuse"
    assert model.model.vision_tower.config._attn_implementation != "thinkfuse"
    thinkfuse.unpatch_model(model)
    assert model.config.text_config is text_before and model.model.language_model.config is text_before


@pytest.mark.parametrize("hook_first", [True, False], ids=["offload-then-patch", "patch-then-offload"])
def test_accelerate_offloaded_model(hook_first):
    """accelerate's hooks (device_map / offload) wrap forward and call _old_forward: the
    replacement goes inside the hook, and unpatch puts the original back there."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.hooks import remove_hook_from_module

    model = tiny_model("qwen2")
    ids = tiny_batch(2, 7)
    ref = model(ids).logits
    offload = lambda: accelerate.cpu_offload(model, torch.device("cpu"))  # noqa: E731
    if hook_first:
        offload()
    report = thinkfuse.patch_model(model, backend="torch")
    if not hook_first:
        offload()
    assert report.device == "cpu"  # not "meta": offloaded weights are on meta between calls
    assert_close_fp32(model(ids).logits, ref, tol=1e-5)
    norm = model.model.norm
    assert norm.__dict__["_old_forward"] is norm._thinkfuse_patch.patched_forward
    assert thinkfuse.unpatch_model(model) == report.total
    assert norm.__dict__["_old_forward"].__func__ is type(norm).forward
    assert torch.equal(model(ids).logits, ref)
    remove_hook_from_module(model, recurse=True)
    # (accelerate leaves the class's forward bound on the instance)
    assert norm.forward.__func__ is type(norm).forward and torch.equal(model(ids).logits, ref)


def test_models_the_ops_cannot_run_are_refused_or_left_alone():
    """A float64 model is refused at patch time (every forward would fail); an attention with a
    head_dim the attention ops lack keeps its configured implementation."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with pytest.raises(ValueError, match="float64"):
        thinkfuse.patch_model(tiny_model("qwen2").double())
    config = Qwen2Config(vocab_size=64, hidden_size=160, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # head_dim 80
    model = Qwen2ForCausalLM(config)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    report = thinkfuse.patch_model(model, backend="torch")
    assert "attention" not in report.patched and report.attention == "transformers"
    assert_close_fp32(model(ids).logits, ref, tol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "mistral3"])
def test_report_reads_the_hopper_choice_off_the_patched_attention_module(family, monkeypatch):
    """PatchReport.attention_backend asks hopper_attention_applies about the patched attention
    modules' own head dim and dtype (Mistral3's text model: not the vision tower's), and only for
    an automatic or "cuda" choice on a CUDA device."""
    import thinkfuse.ops.attention as attention_ops
    from thinkfuse.patching.engine import _hopper_attention

    asked = []
    monkeypatch.setattr(attention_ops, "hopper_attention_applies",
                        lambda device, dtype, head_dim: asked.append((device.type, dtype, head_dim)) or True)
    from thinkfuse.patching.engine import find_family, resolve_class

    model = tiny_model(family, dtype=torch.bfloat16)
    spec = find_family(model)
    attention_class = resolve_class(next(r for r in spec.rules if r.kind == "attention").module_class)
    module = next(m for m in spec.root(model).modules() if type(m) is attention_class)
    cuda = torch.device("cuda", 0)
    assert _hopper_attention(module, cuda, None) == _hopper_attention(module, cuda, "cuda") == \
        attention_ops.HOPPER_FORWARD
    assert asked == [("cuda", torch.bfloat16, module.head_dim)] * 2
    assert _hopper_attention(module, cuda, "triton") is None
    assert _hopper_attention(module, torch.device("cpu"), None) is None
    assert len(asked) == 2


def test_report_of_a_later_call_counts_the_patches_it_leaves_in_place():
    """A later call that turns a kind off does not unpatch it (that takes unpatch_model): its
    report still counts those modules, and its total is what unpatch_model undoes."""
    model = tiny_model("qwen2")
    first = thinkfuse.patch_model(model, backend="torch")
    later = thinkfuse.patch_model(model, rms_norm=False, loss=False)
    assert later.patched == first.patched
    assert " off" not in str(later)
    assert thinkfuse.unpatch_model(model) == later.total


@pytest.mark.parametrize("family", ["qwen2", "mistral3"])
def test_attention_implementation_chosen_while_patched_survives_unpatching(family):
    """set_attn_implementation while patched replaces the "thinkfuse" switch: unpatch_model
    leaves the user's choice (as it leaves a forward someone replaced after patching)."""
    model = tiny_model(family)
    thinkfuse.patch_model(model, backend="torch")
    model.set_attn_implementation("eager")
    thinkfuse.unpatch_model(model)
    text_config = model.config.get_text_config()
    assert text_config._attn_implementation == "eager"
    decoder = model.get_decoder()
    assert {m.config._attn_implementation for m in decoder.modules() if "config" in m.__dict__} == {"eager"}


def test_replacement_forwards_take_the_original_parameters():
    """Same parameter names, kinds and defaults as the forward they replace (the `kernels`
    contract), so that a positional caller binds each argument where the original would."""
    from thinkfuse.patching.rules import resolve_class

    def parameters(function):
        return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()
                if p.name != "backend"]

    for family in FAMILIES:
        for rule in family.rules:
            if rule.forward is not None:
                original = resolve_class(rule.module_class).forward
                assert parameters(rule.forward) == parameters(original), (family.name, rule.module_class)


def test_ministral3_attention_called_with_positional_position_ids():
    model = tiny_model("ministral3")
    attention = model.model.layers[0].self_attn
    hidden = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(40, 49).expand(2, -1)  # past the original context: the temperature is on
    cos_sin = model.model.rotary_emb(hidden, positions)
    ref = attention(hidden, cos_sin, None, positions)[0]
    thinkfuse.patch_model(model, backend="torch")
    assert_close_fp32(attention(hidden, cos_sin, None, positions)[0], ref, tol=1e-5)


def test_repatch_with_other_backend_changes_nothing():
    """The backend clash is found before any module is patched: a base model patched first,
    then its *ForCausalLM with another backend, leaves the *ForCausalLM unpatched."""
    model = tiny_model("qwen2")
    thinkfuse.patch_model(model.model, backend="torch")
    with pytest.raises(ValueError, match="unpatch_model"):
        thinkfuse.patch_model(model, backend="triton")
    assert "_thinkfuse_patch" not in model.__dict__ and "forward" not in model.__dict__


def test_base_model_patched_first_then_the_whole_model_owns_one_config():
    """patch_model(model.model), then patch_model(model): the *ForCausalLM's config joins the
    base model's copy, so edits to model.config while patched (resize_token_embeddings) reach
    every module, and unpatch_model carries them to the original."""
    model = tiny_model("qwen2")
    original = model.config
    thinkfuse.patch_model(model.model, backend="torch")
    thinkfuse.patch_model(model, backend="torch")
    assert model.config is model.model.config is not original
    model.resize_token_embeddings(300)
    thinkfuse.unpatch_model(model)
    assert model.config is model.model.config is original and original.vocab_size == 300
    ids = tiny_batch()
    assert torch.isfinite(model(ids, labels=ids).loss)
