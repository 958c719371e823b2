"""The Qwen2/Qwen3 body that Dream (Qwen2.5: q/k/v biases) and SDAR (Qwen3: per-head q/k RMSNorm) share,
with the Hugging Face parameter names their public checkpoints use (``model.layers.{i}.self_attn.q_proj``,
``model.layers.{i}.mlp.gate_proj``, ``model.norm``, ``lm_head``). A family's folder subclasses the config
and the model and says what differs (biases, q/k norms, logit shift, attention pattern).

Shapes: B batch, L sequence, D model width, H heads, Hkv key/value heads, Dh head width.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from common.model.base import DiffusionLM
from common.model.layers import RMSNorm, apply_rope, attend, block_output, swiglu


class QwenStyleConfig(PretrainedConfig):
    """Hyper-parameters under the public Qwen2/Qwen3 config.json names; options we do not implement are
    refused at load (``_refuse``) rather than silently ignored."""

    def __init__(self, vocab_size: int = 151936, hidden_size: int = 4096, intermediate_size: int = 12288,
                 num_hidden_layers: int = 32, num_attention_heads: int = 32, num_key_value_heads: int | None = None,
                 head_dim: int | None = None, max_position_embeddings: int = 32768, rope_theta: float = 1e6,
                 rms_norm_eps: float = 1e-6, tie_word_embeddings: bool = False, mask_token_id: int = 151666,
                 initializer_range: float = 0.02, hidden_act: str = "silu", rope_scaling: dict | None = None,
                 use_sliding_window: bool = False, attention_dropout: float = 0.0, **kwargs):
        # the public configs name the kernel they were trained with (flash/flex); ours is always SDPA
        kwargs.pop("attn_implementation", None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.mask_token_id = mask_token_id
        self.initializer_range = initializer_range
        self.hidden_act = hidden_act
        self.use_sliding_window = use_sliding_window
        self.attention_dropout = attention_dropout
        self._refuse(hidden_act=(hidden_act, "silu"), rope_scaling=(rope_scaling, None),
                     use_sliding_window=(use_sliding_window, False))
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _refuse(self, **options) -> None:
        for key, (value, supported) in options.items():
            if value != supported:
                raise ValueError(f"config.json: {key}={value!r} is not supported by Unmask's {self.model_type} "
                                 f"code (it implements {supported!r})")


class QwenAttention(nn.Module):
    def __init__(self, config: QwenStyleConfig, qkv_bias: bool, qk_norm: bool, norm_fp32: bool):
        super().__init__()
        d, H, Hkv, Dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, Dh
        self.q_proj = nn.Linear(d, H * Dh, bias=qkv_bias)
        self.k_proj = nn.Linear(d, Hkv * Dh, bias=qkv_bias)
        self.v_proj = nn.Linear(d, Hkv * Dh, bias=qkv_bias)
        self.o_proj = nn.Linear(H * Dh, d, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(Dh, config.rms_norm_eps, norm_fp32)
            self.k_norm = RMSNorm(Dh, config.rms_norm_eps, norm_fp32)
        self.qk_norm = qk_norm

    def forward(self, h_BLD, cos, sin, attn_bias, cache_kv, query):
        B, L, _ = h_BLD.shape
        q = self.q_proj(h_BLD).view(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(h_BLD).view(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(h_BLD).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:  # Qwen3: per-head RMSNorm before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin, fp32=False)
        k = apply_rope(k.transpose(1, 2), cos, sin, fp32=False)
        att, k, v = attend(q, k, v, attn_bias, cache_kv, query)
        return self.o_proj(att), k, v


class QwenMLP(nn.Module):
    def __init__(self, config: QwenStyleConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, h):
        return swiglu(self.gate_proj, self.up_proj, self.down_proj, h)


class QwenBlock(nn.Module):
    """A pre-norm decoder layer with Qwen2/3's names."""

    def __init__(self, config: QwenStyleConfig, qkv_bias: bool, qk_norm: bool, norm_fp32: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, norm_fp32)
        self.self_attn = QwenAttention(config, qkv_bias, qk_norm, norm_fp32)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, norm_fp32)
        self.mlp = QwenMLP(config)

    def forward(self, x_BLD, cos, sin, attn_bias, cache_kv=None, query=None, return_kv: bool = False):
        att, k, v = self.self_attn(self.input_layernorm(x_BLD), cos, sin, attn_bias, cache_kv, query)
        x_BLD = x_BLD + att
        x_BLD = x_BLD + self.mlp(self.post_attention_layernorm(x_BLD))
        return block_output(x_BLD, k, v, return_kv)


class QwenBody(nn.Module):
    def __init__(self, config: QwenStyleConfig, qkv_bias: bool, qk_norm: bool, norm_fp32: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(QwenBlock(config, qkv_bias, qk_norm, norm_fp32)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, norm_fp32)


class QwenStyleLM(DiffusionLM):
    """``model`` (embed_tokens, layers, norm) and ``lm_head``, as the public checkpoints name them."""

    base_model_prefix = "model"
    _no_split_modules = ["QwenBlock"]
    qkv_bias = False
    qk_norm = False
    norm_fused_fp32 = False  # RMSNorm as flash-attn's fused kernel computes it (common.model.layers.RMSNorm)

    def __init__(self, config: QwenStyleConfig):
        super().__init__(config)
        self.model = QwenBody(config, self.qkv_bias, self.qk_norm, self.norm_fused_fp32)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.head_dim, self.n_kv_heads, self.rope_theta = config.head_dim, config.num_key_value_heads, config.rope_theta
        self.post_init()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            return torch.nn.functional.linear(hidden, self.model.embed_tokens.weight)
        return self.lm_head(hidden)
