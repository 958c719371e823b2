"""Build or load the policy and its tokenizer from the `model:` config section."""
from __future__ import annotations

from pathlib import Path

from common.config import ModelConfig
from common.config.loader import REPO_ROOT


def resolve_path(path: str) -> Path:
    """Relative paths are taken against the repository root, so presets work from any directory."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO_ROOT / p


def load_policy(cfg: ModelConfig, device: str = "cpu"):
    """(model, tokenizer) from a checkpoint directory, or a random preset with the char tokenizer."""
    from common.model import build_model, load_pretrained, preset_config
    from common.tokenizers import CharTokenizer, load_tokenizer

    if cfg.path is not None:
        directory = resolve_path(cfg.path)
        return load_pretrained(directory, dtype=cfg.dtype, device=device), load_tokenizer(directory)
    overrides = {"vocab_size": cfg.vocab_size} if cfg.vocab_size else {}
    model = build_model(preset_config(cfg.preset, **overrides), dtype=cfg.dtype, device=device)
    return model, CharTokenizer()


def check_decoding(model_cfg: ModelConfig, sampler_cfg) -> None:
    """A sampler setting the model's family cannot decode with fails here, in one line (ValueError)."""
    from common.model import family_of

    config = policy_config(model_cfg)
    family_of(config).check_sampler(sampler_cfg, config)


def policy_config(cfg: ModelConfig):
    """The architecture the `model:` section names, without loading any weights."""
    from common.model import preset_config
    from common.model.io import read_config

    if cfg.path is not None:
        return read_config(resolve_path(cfg.path))
    return preset_config(cfg.preset, **({"vocab_size": cfg.vocab_size} if cfg.vocab_size else {}))
