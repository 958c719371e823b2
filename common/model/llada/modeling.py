"""The LLaDA masked-diffusion transformer: bidirectional attention, RoPE, RMSNorm, SwiGLU.

Parameter names equal LLaDA's checkpoint keys (``model.transformer.blocks.{i}.q_proj.weight`` ...).
Shapes: B batch, L sequence, D model width, H heads, Dh head width, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.model.base import DiffusionLM, LMOutput
from common.model.layers import RMSNorm, apply_rope, attend, block_output
from common.model.llada.configuration import LLaDAConfig

LLaDAOutput = LMOutput


class LLaDABlock(nn.Module):
    """One pre-norm transformer block with LLaDA's layer names."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, kv = config.d_model, config.n_kv_heads * config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def forward(self, x_BLD, cos, sin, attn_bias, cache_kv=None, query=None, return_kv: bool = False):
        """The block output and, with ``return_kv``, the keys/values its queries attended to."""
        B, L, _ = x_BLD.shape
        h = self.attn_norm(x_BLD)
        q = self.q_proj(h).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        att, k, v = attend(q, k, v, attn_bias, cache_kv, query)
        x_BLD = x_BLD + self.attn_out(att)
        h = self.ff_norm(x_BLD)
        x_BLD = x_BLD + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))
        return block_output(x_BLD, k, v, return_kv)


class LLaDATransformer(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.wte = nn.Embedding(config.embedding_size, config.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers))
        self.ln_f = RMSNorm(config.d_model, config.rms_norm_eps)
        if not config.weight_tying:
            self.ff_out = nn.Linear(config.d_model, config.embedding_size, bias=False)


class LLaDAModel(nn.Module):
    """Holds ``transformer`` so parameter paths read ``model.transformer.*`` as in LLaDA."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.transformer = LLaDATransformer(config)


class LLaDAModelLM(DiffusionLM):
    """LLaDA mask predictor: ``model(input_ids, attention_mask).logits`` is [B, L, V], unshifted."""

    config_class = LLaDAConfig
    family = "llada"
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.head_dim, self.n_kv_heads, self.rope_theta = config.head_dim, config.n_kv_heads, config.rope_theta
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    @property
    def transformer(self) -> LLaDATransformer:
        return self.model.transformer

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.wte(input_ids)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer.ln_f(x)

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.transformer.wte.weight if self.config.weight_tying else self.transformer.ff_out.weight
        return F.linear(hidden, weight)
