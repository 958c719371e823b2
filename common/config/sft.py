"""`sft:` section: masked-diffusion supervised training of a base model (`unmask sft`)."""
from __future__ import annotations

from pydantic import Field

from common.config.base import Section


class SftConfig(Section):
    """LLaDA's SFT objective on solver-made completions; runs on the learner group like RL."""

    steps: int = Field(default=2000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(default=64, ge=1, description="Examples per optimizer step.")
    eps: float = Field(default=1e-3, gt=0.0, lt=1.0, description="Smallest masking ratio t ~ U(eps, 1).")
    eval_every: int = Field(default=500, ge=0, description="Held-out evaluation every n steps (0: only at the end).")
    eval_size: int = Field(default=256, ge=1, description="Held-out items evaluated during SFT.")
    output: str | None = Field(default=None, description="Where the final HF-format checkpoint is written; None: <run dir>/model (a new directory). Name a directory (relative to the working directory) to write there, e.g. to refresh a shipped base.")
