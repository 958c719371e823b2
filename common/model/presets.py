"""Architecture presets of every family: ~1M-parameter CPU models up to the public checkpoints' exact shapes."""
from __future__ import annotations

from common.model.dgemma.modeling import dgemma_config
from common.model.dream.modeling import DreamConfig
from common.model.llada.configuration import LLaDAConfig
from common.model.llada2.modeling import LLaDA2MoeConfig
from common.model.sdar.modeling import SDARConfig

# The tiny presets share the built-in character tokenizer's ids: pad 0, bos 1, eos 2, mask 3, eot 4.
_CHAR_IDS = dict(mask_token_id=3, eos_token_id=2, pad_token_id=0, bos_token_id=1)
_TINY_QWEN = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=101, max_position_embeddings=512, **_CHAR_IDS)

PRESETS: dict[str, tuple[type, dict]] = {
    # ~0.9M parameters: trains on a laptop CPU in minutes.
    "tiny": (LLaDAConfig, dict(d_model=128, n_heads=4, n_layers=4, mlp_hidden_size=384, vocab_size=101,
                               embedding_size=101, max_sequence_length=512, rope_theta=10000.0, **_CHAR_IDS)),
    "100m": (LLaDAConfig, dict(d_model=768, n_heads=12, n_layers=12, mlp_hidden_size=2048, vocab_size=126464,
                               embedding_size=126464, max_sequence_length=4096)),
    "1b": (LLaDAConfig, dict(d_model=2048, n_heads=16, n_layers=16, mlp_hidden_size=5632, vocab_size=126464,
                             embedding_size=126464, max_sequence_length=4096)),
    # LLaDA-8B-Instruct's config.json shape: exactly 8,015,581,184 parameters.
    "llada-8b": (LLaDAConfig, dict(d_model=4096, n_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
                                   embedding_size=126464, max_sequence_length=4096, rope_theta=500000.0)),
    "tiny-dream": (DreamConfig, dict(_TINY_QWEN, rope_theta=10000.0)),
    "tiny-sdar": (SDARConfig, dict(_TINY_QWEN, rope_theta=10000.0, block_size=4)),
    # Dream-v0-Instruct-7B's config.json shape.
    "dream-7b": (DreamConfig, dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                   num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                   max_position_embeddings=131072, rope_theta=1e6, mask_token_id=151666,
                                   bos_token_id=151643, eos_token_id=151643, pad_token_id=151643)),
    # SDAR-8B-Chat's and SDAR-1.7B-Chat's config.json shapes.
    "sdar-8b": (SDARConfig, dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                                 num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=32768,
                                 rope_theta=1e6, block_size=4, mask_token_id=151669, bos_token_id=151643,
                                 eos_token_id=151643, pad_token_id=151643)),
    "sdar-1.7b": (SDARConfig, dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                                   num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                   max_position_embeddings=32768, rope_theta=1e6, block_size=4, mask_token_id=151669,
                                   bos_token_id=151643, eos_token_id=151643, pad_token_id=151643)),
    # 8 experts in 4 groups (2 kept), 2 per token, one shared; a dense first layer; partial rotary; block 4.
    "tiny-llada2": (LLaDA2MoeConfig, dict(hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=16, vocab_size=101, max_position_embeddings=512,
                                          rope_theta=10000.0, num_experts=8, num_experts_per_tok=2, n_group=4,
                                          topk_group=2, moe_intermediate_size=32, first_k_dense_replace=1,
                                          block_size=4, **_CHAR_IDS)),
    # ~1.7M parameters (0.6M active a token): the CPU Countdown base; 8 experts in 4 groups, 2 a token, one shared.
    "small-llada2": (LLaDA2MoeConfig, dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=101,
                                           max_position_embeddings=512, rope_theta=10000.0, num_experts=8,
                                           num_experts_per_tok=2, n_group=4, topk_group=2, moe_intermediate_size=128,
                                           first_k_dense_replace=1, block_size=4, **_CHAR_IDS)),
    # LLaDA2.0-mini's config.json shape (16B total, 256 experts, 8 active).
    "llada2-mini": (LLaDA2MoeConfig, dict(block_size=32)),
    # DiffusionGemma: one sliding + one full layer, 4 experts (2 active), canvas 4; the character tokenizer's ids
    "tiny-dgemma": (dgemma_config, dict(
        canvas_length=4, vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=32, num_global_key_value_heads=1,
        num_experts=4, top_k_experts=2, moe_intermediate_size=32, sliding_window=16, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # google/diffusiongemma-26B-A4B-it's config.json shape (text_config; the vision tower is not built)
    "dgemma-26b-a4b": (dgemma_config, dict(
        canvas_length=256, vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
        num_experts=128, top_k_experts=8, moe_intermediate_size=704, sliding_window=1024,
        max_position_embeddings=262144, use_bidirectional_attention="vision", pad_token_id=0, bos_token_id=2,
        eos_token_id=1)),
}


def preset_config(name: str, **overrides):
    """The config of a named preset (its family's config class); keyword overrides replace preset values."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    config_class, kwargs = PRESETS[name]
    kwargs = {**kwargs, **overrides}
    if config_class is LLaDAConfig and "vocab_size" in overrides and "embedding_size" not in overrides:
        kwargs["embedding_size"] = overrides["vocab_size"]
    return config_class(**kwargs)
