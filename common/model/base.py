"""The forward every family's model class provides, written once.

The sampler, the learner's state rebuild, the losses and SFT call only this: ``hidden_states`` (final-norm
hidden states, optionally over a kept KV cache), ``vocab_logits`` (the output head, to project just the rows they score), and
``forward(...).logits`` in the family's public convention. Which logits column predicts which token is
the family's business (``logit_shift``, read through ``common.model.family``), so is the attention
pattern (``attention_bias``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from common.model import io
from common.model.layers import KVCache, RMSNorm, cached_query, key_mask, rope_cos_sin, run_blocks


@dataclass
class LMOutput:
    logits: torch.Tensor


class DiffusionLM(PreTrainedModel):
    """Base of every family's model: subclasses build their modules and name ``blocks``, ``embed``,
    ``final_norm``, ``vocab_logits`` and the attention geometry (``head_dim``, ``n_kv_heads``, ``rope_theta``)."""

    family: ClassVar[str]
    logit_shift: ClassVar[int] = 0  # 1: the logits at column i predict the token at i + 1 (Dream)
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.activation_checkpointing = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load through ``common.model.io`` (keys checked first, one-line errors, weights streamed to the device)."""
        return io.from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """Write the family's public checkpoint layout (``common.model.save_pretrained``)."""
        return io.save_pretrained(self, save_directory, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """Random init of a preset: normal(initializer_range) weights, zero biases, unit norms (families with
        modules of their own extend it)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward (trades compute for activation memory)."""
        self.activation_checkpointing = enabled

    # --- what a family defines
    @property
    def blocks(self) -> nn.ModuleList:
        """The repeated transformer blocks: FSDP2 shards each, LoRA adapts linears inside them."""
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states [..., D] to vocabulary logits [..., V] (the output head)."""
        raise NotImplementedError

    head_dim: int
    n_kv_heads: int
    rope_theta: float
    rope_dim: int | None = None  # features of a head that RoPE rotates (partial rotary, LLaDA2); None: all

    def attention_bias(self, attention_mask_BL, position_ids_BQ, key_position_ids_BL):
        """Bool [B, 1, Q|1, L] of the keys each query reads (``key_position_ids_BL``: the keys' positions, None
        when the queries are the keys); default bidirectional over real keys."""
        return key_mask(attention_mask_BL)

    # --- the shared forward
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        return_kv: bool = False,
        kv_cache: KVCache | None = None,
        query_idx: torch.Tensor | None = None,
        query_keep: torch.Tensor | None = None,
        key_position_ids: torch.Tensor | None = None,
    ):
        """Final-norm hidden states [B, L, D]. ``attention_mask`` [B, L] marks real (1) vs padding (0) keys.

        ``return_kv``: also return the forward's ``KVCache``. Cached forward (``kv_cache`` given):
        ``input_ids`` [B, Q] are the tokens at columns ``query_idx`` [B, Q] of the cached sequence,
        ``position_ids`` their RoPE positions (default: the columns themselves), ``attention_mask`` the
        [B, L] key mask of the whole sequence; ``query_keep`` [B, Q] (default all) marks the queries whose
        keys/values replace the cached ones (the others only read); ``key_position_ids`` [B, L] the positions of
        the cached sequence's columns (block-causal families need them to mask a cached forward). Returns [B, Q, D].
        """
        B, L = input_ids.shape
        x = self.embed(input_ids)
        if position_ids is None:
            position_ids = query_idx if kv_cache is not None else torch.arange(L, device=input_ids.device).expand(B, L)
        cos, sin = rope_cos_sin(position_ids, self.rope_dim or self.head_dim, self.rope_theta)
        attn_bias = self.attention_bias(attention_mask, position_ids, key_position_ids)
        query = cached_query(kv_cache, query_idx, query_keep, self.n_kv_heads, self.head_dim)
        x, kv = run_blocks(self.blocks, x, cos, sin, attn_bias, kv_cache=kv_cache, query=query, return_kv=return_kv,
                           activation_checkpointing=self.activation_checkpointing)
        h = self.final_norm(x)
        return (h, kv) if return_kv else h

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **_: object) -> LMOutput:
        """Logits [B, L, V] in the family's public convention (Dream's: column i predicts token i + 1)."""
        return LMOutput(logits=self.vocab_logits(self.hidden_states(input_ids, attention_mask, position_ids)))
