"""`task:` section: which reasoning task provides prompts and rewards."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.config.base import Section


class TaskConfig(Section):
    """Prompts, held-out evaluation set and reward shaping of one task."""

    name: Literal["countdown", "sudoku", "gsm8k", "math"] = Field(default="countdown", description="Task registry key.")
    prompt_style: Literal["compact", "chat"] = Field(
        default="compact", description="compact: short plain prompt for tiny char models; chat: the tokenizer's chat template with <reasoning>/<answer> tags."
    )
    num_numbers: int = Field(default=3, ge=3, le=4, description="Countdown: how many numbers per item.")
    data_dir: str | None = Field(
        default=None, description="Directory holding the task's data files; None: the copies shipped in the package (common/data). A relative path is taken from the working directory."
    )
    train_file: str | None = Field(default=None, description="Training prompts file (GSM8K/MATH format); None uses the task's default or generator.")
    eval_file: str | None = Field(default=None, description="Held-out evaluation file; None uses the task's default test set.")
    eval_size: int = Field(default=256, ge=1, description="Held-out items evaluated.")
    format_weight: float = Field(default=0.1, ge=0.0, le=1.0, description="Weight w of format credit: reward = (1 - w) * correctness score + w * (answer well formed: tags present, parses).")
    partial_credit: bool = Field(
        default=True, description="Sudoku: score = fraction of the blanks filled right (d1's reward); false: 1 only for a solved grid. The other tasks score all-or-nothing."
    )
    seed: int = Field(default=0, description="Seed of the training-item generator / shuffle.")

    @model_validator(mode="after")
    def _style(self) -> "TaskConfig":
        if self.name == "math" and self.prompt_style == "compact":
            raise ValueError("task math needs prompt_style chat (a tokenizer with a chat template)")
        if not self.partial_credit and self.name != "sudoku":
            raise ValueError(f"task.partial_credit=false applies to sudoku only ({self.name} already scores all-or-nothing)")
        return self
