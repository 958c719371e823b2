"""What every task shares: the ``Item`` and ``Reward`` records, the ``Task`` interface, answer extraction.

Reward shaping (all tasks, following d1 / TinyZero): ``total = (1 - w) * score + w * format`` with
``w = TaskConfig.format_weight``. ``score`` is the task's correctness credit in [0, 1] (1/0 for
Countdown, GSM8K and MATH; the fraction of blank cells right for Sudoku), ``format`` is 1 when the answer
is well formed (chat: inside ``<answer>`` tags and parseable; compact: parseable). So a correct,
well-formed answer scores exactly 1.0 and, with the default w = 0.1, a parseable wrong answer scores 0.1,
the TinyZero Countdown setup. ``Reward.components`` reports ``score``, ``format`` and ``correct``.

Two prompt styles:
  * ``compact``: a few characters for the tiny character-level models; the completion is the bare answer
    on one line (each task module documents its exact format).
  * ``chat``: d1/AGRPO style; ``SYSTEM_PROMPT`` asks for ``<reasoning>...</reasoning><answer>...</answer>``
    and ``tokenizer.format_prompt(user, system)`` applies the checkpoint's chat template.

Completions are hostile input: every reward bounds the text it looks at (``MAX_COMPLETION_CHARS``) and
never evaluates it as code.
"""
from __future__ import annotations

import json
import random
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from common.tasks.guard import GUARD

if TYPE_CHECKING:
    from common.config.task import TaskConfig
    from common.tokenizers import Tokenizer

# Longer completions are judged on their first MAX_COMPLETION_CHARS characters (and, for tags, the last
# ones): regexes stay linear and nothing downstream sees unbounded text.
MAX_COMPLETION_CHARS = 8192

SYSTEM_PROMPT = (
    "Respond in the following format:\n"
    "<reasoning>\n...\n</reasoning>\n"
    "<answer>\n...\n</answer>"
)

_ANSWER_OPEN = "<answer>"
_ANSWER_CLOSE = "</answer>"


@dataclass(frozen=True)
class Item:
    """One prompt of a task: picklable, hashable, cheap to ship to a rollout actor.

    ``question`` is the task input (Countdown: "30,100,93"; Sudoku: 16 digits with 0 = blank; GSM8K /
    MATH: the problem text), ``answer`` the gold answer as text (Countdown: the target), ``numbers`` the
    Countdown numbers, ``solution`` a worked solution when the data has one (GSM8K, MATH).
    """

    id: str
    question: str
    answer: str
    numbers: tuple[int, ...] = ()
    solution: str = ""


@dataclass(frozen=True)
class Reward:
    """Scalar reward plus its parts; ``correct`` is what accuracy counts."""

    total: float
    correct: bool
    components: dict[str, float] = field(default_factory=dict)


def shaped_reward(score: float, well_formed: bool, correct: bool, format_weight: float, **extra: float) -> Reward:
    """``(1 - w) * score + w * format`` with the components every task reports, plus task-specific ``extra``."""
    fmt = 1.0 if well_formed else 0.0
    total = (1.0 - format_weight) * score + format_weight * fmt
    components = {"score": float(score), "format": fmt, "correct": float(correct), **extra}
    return Reward(total=total, correct=correct, components=components)


def extract_tagged_answer(completion: str) -> str | None:
    """The text inside the last closed ``<answer>...</answer>``, or after a final unclosed ``<answer>``; None if no tag."""
    text = completion[-MAX_COMPLETION_CHARS:]
    # rfind instead of a lazy regex: linear even on thousands of unclosed "<answer>" tags.
    end = text.rfind(_ANSWER_CLOSE)
    start = text.rfind(_ANSWER_OPEN, 0, end) if end >= 0 else -1
    if start >= 0:
        return text[start + len(_ANSWER_OPEN):end].strip()
    # A completion cut at the generation length may lose its closing tag; d1 accepts that too.
    idx = text.rfind(_ANSWER_OPEN)
    return text[idx + len(_ANSWER_OPEN):].strip() if idx >= 0 else None


def first_line(completion: str) -> str:
    """The compact-style answer: the first non-empty line, stripped (trailing junk lines are ignored)."""
    for line in completion[:MAX_COMPLETION_CHARS].splitlines():
        if line.strip():
            return line.strip()
    return ""


def chat_completion(reasoning: str, answer: str) -> str:
    """A completion in the chat format the system prompt asks for."""
    return f"<reasoning>\n{reasoning.strip()}\n</reasoning>\n<answer>\n{answer}\n</answer>"


def packaged_data_dir() -> Path:
    """The held-out and training files installed with the package (``common/data``; see its README)."""
    return Path(str(resources.files("common") / "data"))


def resolve_data_path(cfg: "TaskConfig", name: str) -> Path:
    """``name`` relative to ``cfg.data_dir`` (the packaged data when unset; a relative dir is from the cwd)."""
    base = Path(cfg.data_dir).expanduser() if cfg.data_dir else packaged_data_dir()
    path = Path(name).expanduser()
    return path if path.is_absolute() else base / path


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a clear error names the file and line that is broken."""
    if not path.is_file():
        raise ValueError(f"{path}: data file not found (set task.data_dir / task.train_file / task.eval_file)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


class Task(ABC):
    """A reasoning task: training stream, held-out set, prompt template, reward."""

    name: str = ""
    default_eval_file: str | None = None  # relative to the data dir; None: generated held-out set
    default_train_file: str | None = None  # None: training items come from the task's generator
    needs_train_file: bool = False  # True: no generator, training reads task.train_file
    # What every number this task reports is graded by (recorded beside it in evaluation output).
    grader: str = ""
    # Reward components beyond score/format/correct, so a timed-out reward carries the same keys.
    extra_components: tuple[str, ...] = ()
    # Seconds one reward may take when task.reward_timeout_s is unset; 0 runs it inline (no child process).
    default_reward_timeout_s: float = 0.0
    # Modules the reward child imports before its first timed call.
    heavy_imports: tuple[str, ...] = ()

    def __init__(self, cfg: "TaskConfig"):
        self.cfg = cfg
        self._eval: list[Item] | None = None

    def data_files(self, splits: tuple[str, ...] = ("train", "eval")) -> dict[str, Path]:
        """The files this task reads for ``splits``, keyed by the config field that names each."""
        if "train" in splits and self.needs_train_file and not (self.cfg.train_file or self.default_train_file):
            raise ValueError(f"task {self.name} has no training data shipped: set task.train_file to a JSONL file")
        names = {"task.train_file": (self.cfg.train_file or self.default_train_file) if "train" in splits else None,
                 "task.eval_file": (self.cfg.eval_file or self.default_eval_file) if "eval" in splits else None}
        return {key: resolve_data_path(self.cfg, name) for key, name in names.items() if name}

    @abstractmethod
    def _load_eval(self) -> list[Item]:
        """The full held-out set in its file order."""

    @abstractmethod
    def train_items(self, seed: int) -> Iterator[Item]:
        """An infinite, seed-deterministic stream of training items, none of them in the held-out set."""

    @abstractmethod
    def prompt(self, item: Item, tokenizer: "Tokenizer") -> str:
        """The prompt text in ``cfg.prompt_style``."""

    @abstractmethod
    def compute_reward(self, completion: str, item: Item) -> Reward:
        """Score one completion (decoded text, already cut at EOS) against its item, in this thread, unguarded."""

    @property
    def reward_timeout_s(self) -> float:
        t = self.cfg.reward_timeout_s
        return self.default_reward_timeout_s if t is None else t

    def reward(self, completion: str, item: Item) -> Reward:
        """Score one completion against its item, within ``reward_timeout_s`` from any thread (see ``guard``)."""
        timeout = self.reward_timeout_s
        if not timeout:
            return self.compute_reward(completion, item)
        out = GUARD.reward(self.cfg, completion, asdict(item), timeout, self.heavy_imports)
        if out is None:
            return shaped_reward(0.0, False, False, self.cfg.format_weight, timed_out=1.0,
                                 **{k: 0.0 for k in self.extra_components})
        return Reward(out["total"], out["correct"], {**out["components"], "timed_out": 0.0})

    @abstractmethod
    def reference_completion(self, item: Item) -> str | None:
        """A correct completion in the configured style (SFT data), or None when there is none."""

    def eval_items(self, n: int | None = None) -> list[Item]:
        """The first ``n`` held-out items (all when None), in the file's stable order."""
        if self._eval is None:
            self._eval = self._load_eval()
        return list(self._eval if n is None else self._eval[:n])

    @property
    def chat(self) -> bool:
        return self.cfg.prompt_style == "chat"



def shuffled_epochs(pool: list, key: str):
    """``pool`` forever, reshuffled every epoch by an RNG seeded with ``key`` and the epoch number."""
    epoch = 0
    while True:
        order = list(range(len(pool)))
        random.Random(f"{key}-{epoch}").shuffle(order)
        for i in order:
            yield pool[i]
        epoch += 1
