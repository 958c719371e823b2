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
    sudoku_split: Literal["d1", "spg"] = Field(
        default="d1",
        description="Sudoku held-out split: d1 = d1's 4x4 test set (500 puzzles; the d1 protocol scores 256 of them); "
        "spg = SPG's split (256 puzzles whose solution grids never occur in training; SPG and the AGRPO release "
        "prompt it with 3 worked examples). Every evaluation records which one it used.",
    )
    reward_timeout_s: float | None = Field(
        default=None, ge=0.0,
        description="Seconds one reward may take, enforced in a child process so it holds in any thread (a late "
        "reward, or one that kills the reward process, scores 0 with component timed_out=1). None: the task's default (math 5; countdown, sudoku, gsm8k "
        "0 = inline, their work is linear in the bounded completion).",
    )
    seed: int = Field(default=0, description="Seed of the training-item generator / shuffle.")

    @model_validator(mode="after")
    def _style(self) -> "TaskConfig":
        if self.name == "math" and self.prompt_style == "compact":
            raise ValueError("task math needs prompt_style chat (a tokenizer with a chat template)")
        if self.sudoku_split != "d1" and self.name != "sudoku":
            raise ValueError(f"task.sudoku_split applies to sudoku only (task is {self.name})")
        if not self.partial_credit and self.name != "sudoku":
            raise ValueError(f"task.partial_credit=false applies to sudoku only ({self.name} already scores all-or-nothing)")
        return self
