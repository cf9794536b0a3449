"""MiMo-7B (Xiaomi) without remote code: a Qwen2 trunk plus multi-token-prediction (MTP) layers.

The released checkpoints (``model_type: "mimo"``, ``architectures: ["MiMoForCausalLM"]``) ship
remote code. This module reproduces their structure and weight names so that a local copy loads
with ``AutoModelForCausalLM.from_pretrained(path)`` and no ``trust_remote_code``:

    model.embed_tokens, model.layers.*, model.norm, lm_head              (a plain Qwen2 model)
    model.mtp_layers.N.{token_layernorm, hidden_layernorm, input_proj,
                        input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
                        mlp.{gate,up,down}_proj, final_layernorm}

``MiMoForCausalLM.forward`` is exactly Qwen2's: like the released code, it never runs the MTP
layers. They are run by ``mtp_forward`` (used by ``thinkfuse.speculative.mtp_generate``), whose
inputs come from ``forward_with_pre_norm_hidden``.

MTP alignment (as vLLM's MiMo MTP, contributed by the MiMo authors): the MTP row for position t
takes the trunk's last decoder-layer output at t (before ``model.norm``) and the embedding of
token t+1, runs at RoPE position t and predicts token t+2. The embedding is zeroed where the
position is 0. Input order to ``input_proj`` is ``cat[hidden_layernorm(h), token_layernorm(e)]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2ForCausalLM,
    Qwen2Model,
    Qwen2PreTrainedModel,
    Qwen2RMSNorm,
)
from transformers.utils import ModelOutput

from .configuration_mimo import MiMoConfig


class MiMoMTPLayer(Qwen2DecoderLayer):
    """One MTP layer: fuse the trunk hidden state with the next token's embedding, run one Qwen2
    decoder block over the result, normalise.

    It *is* a Qwen2 decoder block (same submodules and names, same forward for the block part), so
    the released weight names map one to one and patch_model's Qwen2 rules apply inside it.
    ``layer_idx`` indexes the MTP layers' own KV cache, never the trunk's.
    """

    def __init__(self, config: MiMoConfig, layer_idx: int):
        # Built as index 0: Qwen2Attention looks its layer type up in the trunk's layer_types,
        # which has no entry for an MTP index past the trunk's depth (and the trunk's type is not
        # the MTP layer's anyway).
        super().__init__(config, 0)
        self.token_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.input_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.final_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn.layer_idx = layer_idx
        # The MTP block always attends to everything it has cached (MiMo has no sliding window).
        self.self_attn.layer_type = "full_attention"
        self.self_attn.sliding_window = None

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        previous_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """``final_layernorm(block(input_proj(cat[hidden_layernorm(h), token_layernorm(e)])))``.

        inputs_embeds: embeddings of tokens t+1 ``[B, S, H]`` (already zeroed where t == 0);
        previous_hidden_states: the trunk's last decoder-layer output at t, before ``model.norm``.
        """
        fused = self.input_proj(
            torch.cat([self.hidden_layernorm(previous_hidden_states), self.token_layernorm(inputs_embeds)], dim=-1)
        )
        hidden_states = super().forward(
            fused,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        return self.final_layernorm(hidden_states)


class MiMoModel(Qwen2Model):
    """Qwen2Model plus ``mtp_layers`` (not run by forward)."""

    config: MiMoConfig
    config_class = MiMoConfig
    _no_split_modules = ["Qwen2DecoderLayer", "MiMoMTPLayer"]

    def __init__(self, config: MiMoConfig):
        super().__init__(config)
        self.mtp_layers = nn.ModuleList(
            [MiMoMTPLayer(config, layer_idx) for layer_idx in range(config.num_nextn_predict_layers)]
        )
        self.post_init()


@dataclass
class MiMoMTPOutput(ModelOutput):
    """Output of ``MiMoForCausalLM.mtp_forward``.

    logits: ``[B, S, V]`` (or the last ``logits_to_keep`` positions), the MTP layer's prediction of
    token t+2 at each row position t; hidden_states: the MTP layer's output (after its
    final_layernorm); past_key_values: the MTP layers' own cache.
    """

    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    past_key_values: Cache | None = None


class MiMoForCausalLM(Qwen2ForCausalLM):
    """MiMo-7B: Qwen2ForCausalLM whose base model carries the MTP layers (shared embedding and
    lm_head). ``forward`` and ``generate`` are exactly Qwen2's."""

    config: MiMoConfig
    config_class = MiMoConfig
    _no_split_modules = ["Qwen2DecoderLayer", "MiMoMTPLayer"]

    def __init__(self, config: MiMoConfig):
        # Qwen2ForCausalLM.__init__ would first build (and allocate) a plain Qwen2Model: skip it.
        Qwen2PreTrainedModel.__init__(self, config)
        self.model = MiMoModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward_with_pre_norm_hidden(self, *args, **kwargs) -> tuple[CausalLMOutputWithPast, torch.Tensor]:
        """``self(*args, **kwargs)`` plus the last decoder layer's output before ``model.norm``
        ``[B, S, H]``, the trunk state an MTP layer consumes.

        The state is read off the final norm's input with a hook that lives only for this call,
        so the ordinary forward stays untouched (and patched norms are seen through as well).
        """
        captured: list[torch.Tensor] = []
        handle = self.model.norm.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            outputs = self(*args, **kwargs)
        finally:
            handle.remove()
        return outputs, captured[-1]

    def mtp_forward(
        self,
        previous_hidden_states: torch.Tensor,
        next_input_ids: torch.LongTensor,
        *,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        mtp_layer: int = 0,
        logits_to_keep: int = 0,
    ) -> MiMoMTPOutput:
        """Run MTP layer ``mtp_layer`` over rows t = position_ids.

        previous_hidden_states: ``[B, S, H]`` trunk states h_t (``forward_with_pre_norm_hidden``);
        next_input_ids: ``[B, S]`` tokens t+1; position_ids ``[B, S]`` (or ``[S]``): t (default: continues
        the MTP cache); attention_mask: 2-D padding mask over the MTP cache plus these rows, as
        for the trunk; past_key_values: the MTP layers' own cache (a fresh DynamicCache when None;
        never pass the trunk's cache: the MTP attention's layer index would alias trunk layer 0).
        Returns the logits for tokens t+2 (shared lm_head).
        """
        if not isinstance(mtp_layer, int) or isinstance(mtp_layer, bool):
            raise TypeError(f"mtp_layer must be an int, got {type(mtp_layer).__name__}")
        if not 0 <= mtp_layer < len(self.model.mtp_layers):
            raise ValueError(f"mtp_layer must be in [0, {len(self.model.mtp_layers)}), got {mtp_layer}")
        if past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length(mtp_layer)
        _check_mtp_args(self.config, previous_hidden_states, next_input_ids, position_ids, attention_mask, past,
                        logits_to_keep)
        if position_ids is None:
            position_ids = torch.arange(past, past + next_input_ids.shape[1], device=next_input_ids.device)[None]
        position_ids = position_ids.expand(next_input_ids.shape[0], -1)

        embeds = self.model.embed_tokens(next_input_ids)
        # The MTP layer was trained with no token embedding at position 0.
        embeds = embeds.masked_fill((position_ids == 0)[..., None], 0.0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
            layer_idx=mtp_layer,
        )
        hidden_states = self.model.mtp_layers[mtp_layer](
            embeds,
            previous_hidden_states,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=True,
            position_embeddings=self.model.rotary_emb(embeds, position_ids),
        )
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        return MiMoMTPOutput(
            logits=self.lm_head(hidden_states[:, keep]),
            hidden_states=hidden_states,
            past_key_values=past_key_values,
        )


def _check_mtp_args(config, hidden, next_ids, position_ids, attention_mask, past: int, logits_to_keep) -> None:
    """mtp_forward's inputs, checked before anything runs: mismatched shapes would otherwise fail
    deep inside (cat, rotary) or, for a short mask or a negative logits_to_keep, return wrong
    rows silently (transformers pads a short mask with zeros)."""
    if not isinstance(next_ids, torch.Tensor) or next_ids.dim() != 2:
        raise ValueError("next_input_ids must be a [batch, rows] tensor")
    if next_ids.dtype.is_floating_point or next_ids.dtype.is_complex or next_ids.dtype == torch.bool:
        raise TypeError(f"next_input_ids must hold integer token ids, got {next_ids.dtype}")
    batch, rows = next_ids.shape
    if not isinstance(hidden, torch.Tensor) or tuple(hidden.shape) != (batch, rows, config.hidden_size):
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"previous_hidden_states must be [batch, rows, hidden] = "
                         f"{(batch, rows, config.hidden_size)} (next_input_ids is {(batch, rows)}), got {got}")
    if position_ids is not None and (
        not isinstance(position_ids, torch.Tensor) or position_ids.dim() not in (1, 2)
        or position_ids.shape[-1] != rows or (position_ids.dim() == 2 and position_ids.shape[0] not in (1, batch))
    ):
        got = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise ValueError(f"position_ids must be [{rows}], [1, {rows}] or [{batch}, {rows}], got {got}")
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, past + rows)
    ):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be 2-D [batch, cached + rows] = {(batch, past + rows)}, got {got}")
    if not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 (0: every row), got {logits_to_keep!r}")


def _register_with_auto_classes() -> None:
    """Make MiMoConfig resolve to these classes (the config registers itself, in
    configuration_mimo; exist_ok: importing twice, e.g. after a module reload, must not fail)."""
    AutoModel.register(MiMoConfig, MiMoModel, exist_ok=True)
    AutoModelForCausalLM.register(MiMoConfig, MiMoForCausalLM, exist_ok=True)


_register_with_auto_classes()
