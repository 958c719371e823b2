"""Reasoning tasks: training streams, held-out sets, prompts and safe rewards.

    task = get_task(cfg.task)
    items = task.eval_items(64)
    prompts = [task.prompt(it, tokenizer) for it in items]
    metrics = score_completions(task, completions, items)   # accuracy, mean_reward, mean of each component

Registry keys are ``TaskConfig.name``. See ``base`` for the reward shaping shared by all tasks, ``answers``
for how a chat completion's answer is found (LLaDA-8B-Instruct's boxes, tags and LaTeX), ``guard`` for
reward timeouts that hold in any thread, ``protocols`` / ``paper_graders`` for the papers' evaluation
protocols and graders, and each task module for its data and compact format. Importing this package imports
neither torch nor ray; math-verify is imported only when a MATH reward is computed (in the reward child).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from common.tasks.base import Item, Reward, Task
from common.tasks.countdown import CountdownTask
from common.tasks.gsm8k import Gsm8kTask
from common.tasks.math import MathTask
from common.tasks.sudoku import SudokuTask

if TYPE_CHECKING:
    from common.config.task import TaskConfig

TASKS: dict[str, type[Task]] = {
    "countdown": CountdownTask,
    "sudoku": SudokuTask,
    "gsm8k": Gsm8kTask,
    "math": MathTask,
}


def get_task(cfg: "TaskConfig") -> Task:
    """The task named by ``cfg.name``, configured by the rest of ``cfg``."""
    if cfg.name not in TASKS:
        raise ValueError(f"unknown task {cfg.name!r}: use one of {', '.join(sorted(TASKS))}")
    return TASKS[cfg.name](cfg)


def check_data(cfg: "TaskConfig", splits: tuple[str, ...] = ("train", "eval")) -> None:
    """Fail in one line (ValueError naming the file and the key to set) when a data file the task reads for
    ``splits`` is missing or unreadable: run before Ray starts, so a bad path costs seconds, not a run."""
    for key, path in get_task(cfg).data_files(splits).items():
        try:
            with path.open("rb") as f:
                f.read(1)
        except OSError as e:
            reason = "not found" if isinstance(e, FileNotFoundError) else (e.strerror or type(e).__name__).lower()
            raise ValueError(f"{path}: data file {reason}; set {key} (or task.data_dir) to a readable file") from None


def score_completions(task: Task, completions: list[str], items: list[Item]) -> dict[str, float]:
    """Score completions against their items: ``accuracy``, ``mean_reward``, ``mean_<component>``, ``n``."""
    if len(completions) != len(items):
        raise ValueError(f"got {len(completions)} completions for {len(items)} items: pass one completion per item")
    return summarize_rewards([task.reward(c, it) for c, it in zip(completions, items)])


def summarize_rewards(rewards: list[Reward]) -> dict[str, float]:
    """``accuracy``, ``mean_reward``, ``mean_<component>`` and ``n`` of already computed rewards."""
    n = len(rewards)
    out: dict[str, float] = {
        "n": float(n),
        "accuracy": sum(r.correct for r in rewards) / n if n else 0.0,
        "mean_reward": sum(r.total for r in rewards) / n if n else 0.0,
    }
    keys = sorted({k for r in rewards for k in r.components})
    for k in keys:
        out[f"mean_{k}"] = sum(r.components.get(k, 0.0) for r in rewards) / n
    return out


__all__ = ["TASKS", "CountdownTask", "check_data", "Gsm8kTask", "Item", "MathTask", "Reward", "SudokuTask", "Task", "get_task", "score_completions", "summarize_rewards"]
