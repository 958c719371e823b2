"""`model:` section: which network to load or build."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.config.base import Section


class ModelConfig(Section):
    """Where the policy's weights come from and how they are held in memory."""

    path: str | None = Field(
        default=None,
        description="HF-format checkpoint directory of a supported family (config.json's model_type: llada, Dream, "
        "sdar, llada2_moe; + safetensors). "
        "Relative paths resolve against the repository root. None builds `preset` with random weights.",
    )
    preset: Literal["tiny", "100m", "1b", "llada-8b", "tiny-dream", "tiny-sdar", "dream-7b", "sdar-8b",
                    "sdar-1.7b", "tiny-llada2", "small-llada2", "llada2-mini", "tiny-dgemma", "dgemma-26b-a4b"] | None = Field(
        default=None, description="Architecture preset used when `path` is None (random init): LLaDA's (tiny .. "
        "llada-8b), Dream's (tiny-dream, dream-7b), SDAR's (tiny-sdar, sdar-1.7b, sdar-8b) or LLaDA2 MoE's "
        "(tiny-llada2, small-llada2, llada2-mini) or DiffusionGemma's (tiny-dgemma, dgemma-26b-a4b).")
    vocab_size: int | None = Field(
        default=None, ge=8, description="Override the preset's vocabulary size (e.g. to a tokenizer's size)."
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="Parameter dtype for rollout and the learner's compute."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute each transformer block in backward to save activation memory."
    )

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if self.path is None and self.preset is None:
            raise ValueError("set either model.path (a checkpoint directory) or model.preset")
        return self
