"""Architecture presets: a ~1M-parameter CPU model up to LLaDA-8B's exact shape."""
from __future__ import annotations

from common.model.configuration import LLaDAConfig

PRESETS: dict[str, dict] = {
    # ~0.9M parameters over the built-in character tokenizer (ids: pad 0, bos 1, eos 2, mask 3, eot 4):
    # trains on a laptop CPU in minutes.
    "tiny": dict(d_model=128, n_heads=4, n_layers=4, mlp_hidden_size=384, vocab_size=101, embedding_size=101,
                 max_sequence_length=512, rope_theta=10000.0, mask_token_id=3, eos_token_id=2, pad_token_id=0,
                 bos_token_id=1),
    "100m": dict(d_model=768, n_heads=12, n_layers=12, mlp_hidden_size=2048, vocab_size=126464,
                 embedding_size=126464, max_sequence_length=4096),
    "1b": dict(d_model=2048, n_heads=16, n_layers=16, mlp_hidden_size=5632, vocab_size=126464,
               embedding_size=126464, max_sequence_length=4096),
    # LLaDA-8B-Instruct's config.json shape: exactly 8,015,581,184 parameters.
    "llada-8b": dict(d_model=4096, n_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
                     embedding_size=126464, max_sequence_length=4096, rope_theta=500000.0),
}


def preset_config(name: str, **overrides) -> LLaDAConfig:
    """An ``LLaDAConfig`` for a named preset; keyword overrides replace preset values."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    kwargs = {**PRESETS[name], **overrides}
    if "vocab_size" in overrides and "embedding_size" not in overrides:
        kwargs["embedding_size"] = overrides["vocab_size"]
    return LLaDAConfig(**kwargs)
