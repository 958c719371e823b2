"""The LLaDA masked-diffusion transformer: bidirectional attention, RoPE, RMSNorm, SwiGLU.

Parameter names equal LLaDA's checkpoint keys (``model.transformer.blocks.{i}.q_proj.weight`` ...).
Shapes: B batch, L sequence, D model width, H heads, Dh head width, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from common.model.configuration import LLaDAConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, as LLaDA does, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions_BL: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, 1, L, Dh] in fp32 (LLaDA keeps RoPE in full precision)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions_BL.device, dtype=torch.float32) / head_dim))
    freqs = positions_BL.float()[..., None] * inv_freq  # [B, L, Dh/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x_BHLD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x = x_BHLD.float()
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x_BHLD.dtype)


@dataclass
class KVCache:
    """Keys and values of every layer from one full forward, ``[B, Hkv, L, Dh]`` each (RoPE applied).

    A cached forward (``hidden_states(..., kv_cache=...)``) runs only some query columns: their fresh
    keys/values replace the cached ones at those columns and the queries attend to all L columns, so the
    other columns contribute the keys/values they had in the forward that built the cache. Without grad
    the replacement is written into the cache in place (the sampler's case: those columns are recomputed
    at every cached step anyway); with grad it is out of place, so the gradient reaches both forwards.
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)


def _merge_kv(cached: torch.Tensor, fresh: torch.Tensor, idx_BHQD: torch.Tensor, keep_B1Q1: torch.Tensor | None):
    """``cached`` [B, H, L, Dh] with the query columns ``idx`` replaced by ``fresh`` [B, H, Q, Dh] (where kept)."""
    if keep_B1Q1 is not None:
        fresh = torch.where(keep_B1Q1, fresh, cached.gather(2, idx_BHQD))
    if torch.is_grad_enabled():
        return cached.scatter(2, idx_BHQD, fresh)
    return cached.scatter_(2, idx_BHQD, fresh)


class LLaDABlock(nn.Module):
    """One pre-norm transformer block with LLaDA's layer names."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, kv = config.d_model, config.n_kv_heads * config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.rope_theta = config.rope_theta
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def forward(self, x_BLD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_bias: torch.Tensor | None,
                cache_k: torch.Tensor | None = None, cache_v: torch.Tensor | None = None,
                idx_BHQD: torch.Tensor | None = None, keep_B1Q1: torch.Tensor | None = None, return_kv: bool = False):
        """Returns the block output and, with ``return_kv``, the keys/values the queries attended to
        ([B, Hkv, L or cache L, Dh]; else None, None). Outputs are never views: FSDP2 hooks a block's outputs
        for backward, and an in-place op on a view output would silently skip that hook."""
        B, L, _ = x_BLD.shape
        h = self.attn_norm(x_BLD)
        q = self.q_proj(h).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_k is not None:
            k = _merge_kv(cache_k, k, idx_BHQD, keep_B1Q1)
            v = _merge_kv(cache_v, v, idx_BHQD, keep_B1Q1)
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, is_causal=False, enable_gqa=self.n_kv_heads != self.n_heads
        )
        x_BLD = x_BLD + self.attn_out(att.transpose(1, 2).reshape(B, L, -1))
        h = self.ff_norm(x_BLD)
        x_BLD = x_BLD + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))
        return (x_BLD, k.contiguous(), v.contiguous()) if return_kv else (x_BLD, None, None)


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


@dataclass
class LLaDAOutput:
    logits: torch.Tensor


class LLaDAModelLM(PreTrainedModel):
    """LLaDA mask predictor: ``model(input_ids, attention_mask).logits`` is [B, L, V]."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs) -> "LLaDAModelLM":
        """Load through ``common.model.io`` (keys checked first, one-line errors, weights streamed to the device)."""
        from common.model.io import from_pretrained

        return from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """Write LLaDA's checkpoint layout; the same as ``common.model.save_pretrained(self, save_directory)``."""
        from common.model.io import save_pretrained

        return save_pretrained(self, save_directory, **kwargs)

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.activation_checkpointing = False
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

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward (trades compute for activation memory)."""
        self.activation_checkpointing = enabled

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
    ):
        """Final-norm hidden states [B, L, D]. ``attention_mask`` [B, L] marks real (1) vs padding (0) keys.

        ``return_kv``: also return the forward's ``KVCache``. Cached forward (``kv_cache`` given):
        ``input_ids`` [B, Q] are the tokens at columns ``query_idx`` [B, Q] of the cached sequence,
        ``position_ids`` their RoPE positions (default: the columns themselves), ``attention_mask`` the
        [B, L] key mask of the whole sequence; ``query_keep`` [B, Q] (default all) marks the queries whose
        keys/values replace the cached ones (the others only read). Returns [B, Q, D].
        """
        B, L = input_ids.shape
        x = self.transformer.wte(input_ids)
        if position_ids is None:
            position_ids = query_idx if kv_cache is not None else torch.arange(L, device=input_ids.device).expand(B, L)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        attn_bias = None
        if attention_mask is not None:
            attn_bias = attention_mask.bool()[:, None, None, :]  # keys only: attention is bidirectional
        idx_BHQD = keep_B1Q1 = None
        if kv_cache is not None:
            idx_BHQD = query_idx[:, None, :, None].expand(-1, self.config.n_kv_heads, -1, self.config.head_dim)
            keep_B1Q1 = None if query_keep is None else query_keep.bool()[:, None, :, None]
        out = KVCache()
        for i, block in enumerate(self.transformer.blocks):
            cached = () if kv_cache is None else (kv_cache.keys[i], kv_cache.values[i], idx_BHQD, keep_B1Q1)
            if self.activation_checkpointing and torch.is_grad_enabled():
                x, k, v = checkpoint(block, x, cos, sin, attn_bias, *cached, return_kv=return_kv, use_reentrant=False)
            else:
                x, k, v = block(x, cos, sin, attn_bias, *cached, return_kv=return_kv)
            if return_kv:
                out.keys.append(k)
                out.values.append(v)
        h = self.transformer.ln_f(x)
        return (h, out) if return_kv else h

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states [..., D] to vocabulary logits [..., V]."""
        weight = self.transformer.wte.weight if self.config.weight_tying else self.transformer.ff_out.weight
        return F.linear(hidden, weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **_: object,
    ) -> LLaDAOutput:
        return LLaDAOutput(logits=self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids)))
