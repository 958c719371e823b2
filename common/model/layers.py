"""The pieces every family's transformer is made of: RMSNorm, RoPE, attention over an optional kept
KV cache, the SwiGLU MLP, and the decoder loop every family's ``hidden_states`` runs.

Families differ in names, biases, q/k norms, where RoPE is computed and the attention pattern; the math
here is shared so a change to the cached forward (the policy the sampler records) happens once.

Shapes: B batch, L sequence, Q query columns, D model width, H heads, Hkv key/value heads, Dh head width.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class RMSNorm(nn.Module):
    """RMSNorm in fp32: LLaDA's and Qwen2/3's formula (rsqrt, cast back, then the weight), or with
    ``fused_fp32`` flash-attn's fused ``rms_norm_fn`` that SDAR's public code calls (1 / sqrt, the weight
    applied in fp32, then the cast): the two differ by an ulp in fp32 and visibly in bf16."""

    def __init__(self, dim: int, eps: float, fused_fp32: bool = False):
        super().__init__()
        self.eps = eps
        self.fused_fp32 = fused_fp32
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.fused_fp32:
            return (x * (1.0 / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * self.weight.float()).to(dtype)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions_BL: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, 1, L, Dh] in fp32 (rotate-half layout: the two halves share frequencies)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions_BL.device, dtype=torch.float32) / head_dim))
    freqs = positions_BL.float()[..., None] * inv_freq  # [B, L, Dh/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x_BHLD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fp32: bool = True) -> torch.Tensor:
    """Rotate ``x``; ``fp32``: in full precision then cast back (LLaDA), else in x's dtype (Qwen2/3)."""
    if fp32:
        x = x_BHLD.float()
    else:
        x, cos, sin = x_BHLD, cos.to(x_BHLD.dtype), sin.to(x_BHLD.dtype)
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


@dataclass
class CachedQuery:
    """What a cached forward hands each layer: the kept keys/values' columns the queries replace."""

    idx_BHQD: torch.Tensor
    keep_B1Q1: torch.Tensor | None


def merge_kv(cached: torch.Tensor, fresh: torch.Tensor, query: CachedQuery) -> torch.Tensor:
    """``cached`` [B, H, L, Dh] with the query columns replaced by ``fresh`` [B, H, Q, Dh] (where kept)."""
    if query.keep_B1Q1 is not None:
        fresh = torch.where(query.keep_B1Q1, fresh, cached.gather(2, query.idx_BHQD))
    if torch.is_grad_enabled():
        return cached.scatter(2, query.idx_BHQD, fresh)
    return cached.scatter_(2, query.idx_BHQD, fresh)


def attend(q_BHQD, k_BHQD, v_BHQD, attn_bias, cache_kv=None, query: CachedQuery | None = None):
    """Scaled dot-product attention (no causal mask: patterns come in ``attn_bias``, a bool [B, 1, Q|1, L]);
    with ``cache_kv`` the fresh keys/values are merged into the kept ones first. Returns (out [B, Q, H*Dh],
    keys, values) with the keys/values the queries attended to."""
    if cache_kv is not None:
        k_BHQD = merge_kv(cache_kv[0], k_BHQD, query)
        v_BHQD = merge_kv(cache_kv[1], v_BHQD, query)
    B, H, Q, _ = q_BHQD.shape
    out = F.scaled_dot_product_attention(q_BHQD, k_BHQD, v_BHQD, attn_mask=attn_bias, is_causal=False,
                                         enable_gqa=k_BHQD.shape[1] != H)
    return out.transpose(1, 2).reshape(B, Q, -1), k_BHQD, v_BHQD


def swiglu(gate: nn.Linear, up: nn.Linear, down: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    return down(F.silu(gate(h)) * up(h))


def key_mask(attention_mask_BL: torch.Tensor | None) -> torch.Tensor | None:
    """[B, 1, 1, L] bool: which keys every query may read (None: all)."""
    return None if attention_mask_BL is None else attention_mask_BL.bool()[:, None, None, :]


def run_blocks(blocks: nn.ModuleList, x_BLD: torch.Tensor, cos, sin, attn_bias, *, kv_cache: KVCache | None,
               query: CachedQuery | None, return_kv: bool, activation_checkpointing: bool):
    """The decoder loop every family shares: each block ``(x, cos, sin, attn_bias, cache_kv, query, return_kv)``
    -> (x, k, v); returns (x, the forward's KVCache or None)."""
    out = KVCache() if return_kv else None
    for i, block in enumerate(blocks):
        cache_kv = None if kv_cache is None else (kv_cache.keys[i], kv_cache.values[i])
        if activation_checkpointing and torch.is_grad_enabled():
            x_BLD, k, v = checkpoint(block, x_BLD, cos, sin, attn_bias, cache_kv, query, return_kv, use_reentrant=False)
        else:
            x_BLD, k, v = block(x_BLD, cos, sin, attn_bias, cache_kv, query, return_kv)
        if return_kv:
            out.keys.append(k)
            out.values.append(v)
    return x_BLD, out


def cached_query(kv_cache: KVCache | None, query_idx: torch.Tensor | None, query_keep: torch.Tensor | None,
                 n_kv_heads: int, head_dim: int) -> CachedQuery | None:
    if kv_cache is None:
        return None
    idx_BHQD = query_idx[:, None, :, None].expand(-1, n_kv_heads, -1, head_dim)
    return CachedQuery(idx_BHQD, None if query_keep is None else query_keep.bool()[:, None, :, None])


def block_output(x_BLD: torch.Tensor, k, v, return_kv: bool):
    """A block's outputs, never views: FSDP2 hooks a block's outputs for backward, and an in-place op on a
    view output would silently skip that hook."""
    return (x_BLD, k.contiguous(), v.contiguous()) if return_kv else (x_BLD, None, None)
