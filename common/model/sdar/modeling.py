"""SDAR: Qwen3's body (per-head q/k RMSNorm, no biases) with block-causal attention: a query reads every
key of its own block and of earlier blocks. Blocks are ``block_size`` consecutive positions counted from
the sequence's first real token (position 0), as SDAR's public decoder lays them out, so a left-padded row
(``position_ids`` counting real tokens) sees exactly what it would see unpadded. Logits are unshifted."""
from __future__ import annotations

import torch

from common.model.layers import key_mask
from common.model.qwen import QwenStyleConfig, QwenStyleLM


class SDARConfig(QwenStyleConfig):
    """SDAR's config.json (model_type "sdar")."""

    model_type = "sdar"

    def __init__(self, block_size: int = 4, mask_token_id: int = 151669, attention_bias: bool = False, **kwargs):
        super().__init__(mask_token_id=mask_token_id, **kwargs)
        self.block_size = block_size
        self.attention_bias = attention_bias
        self._refuse(attention_bias=(attention_bias, False))
        if block_size < 1:
            raise ValueError(f"config.json: block_size={block_size!r} must be >= 1")


def block_causal_bias(position_ids_BQ: torch.Tensor, block_size: int, attention_mask_BL=None,
                      key_position_ids_BL: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [B, 1, Q, L]: query i reads key j iff j's block (position // block_size) is not after i's (keys are
    the queries themselves unless ``key_position_ids_BL`` says otherwise: a cached forward).

    Rows that share their positions and have no padding get one [1, L, L] mask, the shape SDAR's public
    decoder passes: SDPA's CPU kernels round differently for other mask shapes, and this one is bitwise equal
    to the public forward."""
    shared = position_ids_BQ.shape[0] == 1 or position_ids_BQ.stride(0) == 0
    if attention_mask_BL is None and key_position_ids_BL is None and shared:
        block_L = torch.div(position_ids_BQ[0], block_size, rounding_mode="floor")
        return (block_L[None, :] <= block_L[:, None])[None]
    keys_BL = position_ids_BQ if key_position_ids_BL is None else key_position_ids_BL
    query_block_BQ = torch.div(position_ids_BQ, block_size, rounding_mode="floor")
    key_block_BL = torch.div(keys_BL, block_size, rounding_mode="floor")
    bias = key_block_BL[:, None, None, :] <= query_block_BQ[:, None, :, None]
    keys = key_mask(attention_mask_BL)
    return bias if keys is None else bias & keys


class SDARForCausalLM(QwenStyleLM):
    """SDAR's LM under its public class name (``architectures: ["SDARForCausalLM"]``)."""

    config_class = SDARConfig
    family = "sdar"
    qk_norm = True
    norm_fused_fp32 = True  # the public code normalises with flash-attn's rms_norm_fn

    def attention_bias(self, attention_mask_BL, position_ids_BQ, key_position_ids_BL):
        return block_causal_bias(position_ids_BQ, self.config.block_size, attention_mask_BL, key_position_ids_BL)
