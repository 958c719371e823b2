"""Evaluation protocols: the prompts, decoding, held-out subset and grader a paper's numbers come from.

    proto = get_protocol("d1")
    task = get_task(proto.task_config(cfg.task))
    items = proto.eval_items(task)
    prompts = [proto.prompt(task, it, tokenizer) for it in items]
    for gen_length in proto.gen_lengths(cfg.sampler):
        sampler = cfg.sampler.model_copy(update=proto.sampler_settings(gen_length))   # then validate
        rewards = [task.reward(text, it) for text, it in zip(completions, items)]  # ours, beside it
        accuracy(proto.grades(task, completions, items, rewards))                  # the paper's number

* ``ours``: the task's own prompt (``task.prompt``), reward and grader (math-verify for MATH), the run's
  sampler settings. The default.
* ``d1`` (github.com/dllm-reasoning/d1, ``eval/``, the protocol of d1, wd1, SPG and most follow-ups):
  LLaDA's chat template around one user message (task instructions + blank line + question), the
  assistant turn pre-filled with ``<reasoning>``; generation lengths 128/256/512, block 32, steps =
  length/2, low-confidence remasking, temperature 0; the whole GSM8K test set and MATH-500, the 256
  Countdown-3 items, and 256 of the 500 d1 Sudoku puzzles (numpy's legacy ``seed(42)``,
  ``choice(500, 256, replace=False)``, as d1's ``init_seed(42)`` leaves it). With ``task.sudoku_split=spg``
  it becomes SPG's 3-shot Sudoku setup (three worked examples in d1's format, SPG's 256 puzzles).
  Graders: ``paper_graders.D1_GRADERS`` (Sudoku: correct cells / blank cells, pooled).
* ``agrpo`` (github.com/probablyabot/agrpo, ``eval.py``/``eval.yaml``): a system message per task with
  ``<think>``/``<answer>`` format (Sudoku's carries three worked examples) and the question as the user
  message, no pre-fill; length 256, block 32, 128 steps, low-confidence, temperature 0, a row stops once a
  whole block decodes to EOS; Sudoku is always SPG's split. Graders: ``paper_graders.AGRPO_GRADERS``
  (Sudoku: mean over puzzles of the blank-cell fraction). Its GSM8K test set is GSM8K-Platinum (a
  relabelled 1,209-question version) which is not shipped here: ``agrpo`` on gsm8k uses the original
  1,319-item test set and says so in ``dataset_note``.

The prompt texts are the papers' own (data under Apache-2.0 / MIT, see each constant); the code is ours.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from common.tasks.base import Item, Reward, Task
from common.tasks.paper_graders import AGRPO_GRADERS, D1_GRADERS, Grade

if TYPE_CHECKING:
    from common.config.sampler import SamplerConfig
    from common.config.task import TaskConfig
    from common.tokenizers import Tokenizer

# --- prompt texts (d1: Apache-2.0, github.com/dllm-reasoning/d1 eval/*.py at 837888f)

_D1_FORMAT = "Respond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n<answer>\n\\boxed{...}\n</answer>"
_D1_MATH_EXPERT = ("You are a math expert. You will be given a question to solve. Solve it step by step. "
                   "Wrap the final answer in a \\boxed{}.")
D1_SYSTEM = {
    # GSM8K's has a space before the newline, MATH-500's a stray quote and newline after </answer>: both as d1 sends them.
    "gsm8k": f"{_D1_MATH_EXPERT} \n{_D1_FORMAT}",
    "math": f"{_D1_MATH_EXPERT}\n{_D1_FORMAT}\" \n",
    "countdown": (
        "Using only the provided numbers, create an arithmetic expression that evaluates to exactly the provided "
        "target number. You may use the operations +, -, *, and / as needed, but each number must be used exactly "
        "once. Think step-by-step. After reasoning, provide only your final expression inside \\boxed{} tags "
        "without including an equals sign or the target number. For example: \\boxed{a + b * c}" + _D1_FORMAT
    ),
    "sudoku": (
        "\nPlease solve the following 4x4 Sudoku puzzle. The puzzle is provided as a 16-character string reading "
        "left-to-right, top-to-bottom, where '0' represents empty cells.\n\nRules:\n- Fill empty cells with digits "
        "1-4\n- Each row must contain digits 1-4 exactly once\n- Each column must contain digits 1-4 exactly once\n"
        "- Each 2x2 box must contain digits 1-4 exactly once\n\nImportant: Your solution must be a COMPLETE "
        "16-character string with only the digits 1-4, representing your final solved grid.\n\nRespond in this "
        "exact format:\n<reasoning>\nYour step-by-step solving process\n</reasoning>\n<answer>\n[16-character "
        "solution string with no spaces or separators]\n</answer>\n"
    ),
}
D1_PREFILL = "<reasoning>"

# The three worked Sudoku examples SPG (MIT, github.com/facebookresearch/SPG eval/sudoku.py at a1c7120) and the
# AGRPO release (MIT) put in front of their split: puzzle, the solving steps, solution. The grid listings
# around the steps are rendered by ``_shot_reasoning``.
SUDOKU_SHOTS = (
    ("3014002020004130", "3214142323414132", (
        "R1 missing 2 → R1C2=2.", "R4 missing 2 → R4C4=2.",
        "Box D (R3-4,C3-4) then needs {1,4}; column4 can only accept 1 → R3C4=1, R3C3=4.",
        "R3 now missing 3 → R3C2=3.", "Column1 missing 1 → R2C1=1.", "Column2 missing 4 → R2C2=4.",
        "Last cell R2C4=3.")),
    ("0000100420013142", "4213132424313142", (
        "Col1 missing 4 → R1C1=4.", "Col4 missing 3 → R1C4=3.",
        "Box A (R1-2,C1-2) missing {2,3} and R1 now needs {1,2} → R1C2=2, R2C2=3.", "R1C3=1.",
        "R2 now missing 2 → R2C3=2.", "Col2 missing 4 → R3C2=4, then R3C3=3.")),
    ("2001403002001420", "2341413232141423", (
        "R1 missing {3,4}; Col2 can't be 1 so R1C2=3 → R1C3=4.", "R4 missing 3 → R4C4=3.",
        "Col4 missing {2,4}; R2 must take 2 → R2C4=2 → R2C2=1.", "Col1 missing 3 → R3C1=3.",
        "Col3 missing 1 → R3C3=1 → R3C4=4.")),
)


def _grid_lines(grid: str) -> str:
    return "\n".join(f"R{r + 1}: {' '.join(grid[r * 4:(r + 1) * 4])}" for r in range(4))


def _shot_reasoning(puzzle: str, solution: str, steps: tuple[str, ...]) -> str:
    return (f"Interpret puzzle as 4 rows of 4:\n{_grid_lines(puzzle)}\n\nFill easy singles:\n" + "\n".join(steps)
            + f"\n\nFinal grid:\n{_grid_lines(solution)}")


def spg_few_shot() -> str:
    """SPG's 3-shot block (d1's Question/Answer format), placed between the instructions and the question."""
    return "\n\n".join(f"Question:\nSolve the following Sudoku puzzle: {p}\nAnswer:\n<reasoning>\n"
                       f"{_shot_reasoning(p, s, st)}\n</reasoning>\n<answer>\n{s}\n</answer>" for p, s, st in SUDOKU_SHOTS)


# AGRPO release (MIT, github.com/probablyabot/agrpo data.py at 98f1182).
_AGRPO_THINK = "<think>\n{}\n</think>\n<answer>\n{}\n</answer>\n"
AGRPO_SYSTEM = {
    "math": ("You will be given a math problem.\nThink through the problem step by step, enclosing your reasoning "
             "process in <think> tags.\nProvide your final answer in <answer> tags, with only the number or expression "
             "enclosed in \\boxed{}, as follows:\n" + _AGRPO_THINK.format("...", "\\boxed{...}")),
    "countdown": ("You will be given a target number and a list of numbers. Create a mathematical expression using "
                  "each number exactly once and the operations +, -, *, / (with parentheses allowed) to reach the "
                  "target.\nThink through different combinations systematically, exploring which operations might "
                  "work. Enclose your reasoning process in <think> tags.\nFormat your response as:\n"
                  + _AGRPO_THINK.format("reasoning process here", "final expression = target")
                  + "For example, if the target is 67 and the numbers are [17, 18, 5], a valid answer is:\n"
                  "<answer>\n17 * 5 - 18 = 67\n</answer>\n"),
    "sudoku": ("You will be given a 4x4 Sudoku puzzle, provided as a 16-character string from left to right, top to "
               "bottom, with 0s representing empty cells.\nFill in the empty cells with the correct digits 1-4 such "
               "that each row, column, and 2x2 subgrid contains each digit exactly once.\nThink through the puzzle "
               "step by step, enclosing your reasoning process in <think> tags.\nYour final answer should be a "
               "complete 16-character string with only the digits 1-4 representing the filled-in grid.\nFormat your "
               "response as:\n" + _AGRPO_THINK.format("reasoning process here", "[16-character string with no spaces]")
               + "".join(f"\nPuzzle: {p}\n\n" + _AGRPO_THINK.format(_shot_reasoning(p, s, st), s)
                         for p, s, st in SUDOKU_SHOTS)),
}
AGRPO_SYSTEM["gsm8k"] = AGRPO_SYSTEM["math"]


def d1_sudoku_subset(n_items: int, k: int = 256) -> list[int]:
    """The indices d1 evaluates: numpy's legacy global RNG after ``seed(42)``, ``choice(n, k, replace=False)``."""
    import numpy as np

    return [int(i) for i in np.random.RandomState(42).choice(n_items, k, replace=False)]


# --- the presets: each is data plus the few functions where protocols differ (its prompt, its items)

@dataclass(frozen=True)
class Protocol:
    """One evaluation preset; ``record()`` is what evaluation output stores beside every number."""

    name: str
    source: str
    prompt: Callable[[Task, Item, "Tokenizer"], str]  # the model's input text for one item
    items: Callable[[Task], list[Item]]  # the held-out items it scores
    grader: str | None = None  # None: the task's own reward grades (``task.grader`` names it)
    graders: dict[str, Callable[[str, Item], Grade]] | None = field(default=None, repr=False)  # per task name
    chat: bool = True  # the task's chat prompt style (the papers' prompts are chat turns)
    decoding: dict | None = None  # SamplerConfig fields it fixes beside the length; None: the run's sampler
    lengths: tuple[int, ...] = ()  # empty: the run's sampler.gen_length
    steps_per_token: float | None = None  # steps = gen_length * steps_per_token (with ``decoding``)
    sudoku_split: str | None = None  # None: task.sudoku_split
    dataset_notes: dict[str, str] = field(default_factory=dict)

    def task_config(self, cfg: "TaskConfig") -> "TaskConfig":
        """The task section this protocol evaluates with (chat prompts; its Sudoku split)."""
        update = {"prompt_style": "chat"} if self.chat else {}
        if cfg.name == "sudoku" and self.sudoku_split is not None:
            update["sudoku_split"] = self.sudoku_split
        return type(cfg).model_validate({**cfg.model_dump(), **update})

    def gen_lengths(self, sampler: "SamplerConfig") -> tuple[int, ...]:
        return self.lengths or (sampler.gen_length,)

    def sampler_settings(self, gen_length: int) -> dict:
        """SamplerConfig fields this protocol fixes at ``gen_length`` (``ours``: only the length)."""
        if self.decoding is None:
            return {"gen_length": gen_length}
        return {"gen_length": gen_length, "steps": int(gen_length * self.steps_per_token), **self.decoding}

    def eval_items(self, task: Task, limit: int | None = None) -> list[Item]:
        """The held-out items this protocol scores (``limit``: only the first that many)."""
        items = self.items(task)
        return items[:limit] if limit else items

    def grades(self, task: Task, completions: list[str], items: list[Item], rewards: list[Reward]) -> list[Grade]:
        """Each completion's grade; ``rewards`` are the task's own for the same completions, which are the grades
        where the protocol has no graders of its own (``ours``)."""
        if self.graders is None:
            return [Grade(correct=r.correct, credit=float(r.correct)) for r in rewards]
        return [self.graders[task.name](text, item) for text, item in zip(completions, items)]

    def record(self, task: Task) -> dict:
        """Protocol, grader, data and what it fixes, for the evaluation output."""
        out = {"protocol": self.name, "source": self.source, "grader": self.grader or task.grader,
               "task": task.name, "eval_file": task.cfg.eval_file or task.default_eval_file or "generated",
               "dataset_note": self.dataset_notes.get(task.name, "")}
        if task.name == "sudoku":
            out["sudoku_split"] = task.cfg.sudoku_split
        return out


def _d1_user(task: Task, item: Item) -> str:
    if task.name == "countdown":
        question = f"Numbers: {list(item.numbers)}\nTarget: {item.answer}"
    elif task.name == "sudoku":
        question = f"Solve the following Sudoku puzzle: {item.question}\n"
        if task.cfg.sudoku_split == "spg":  # SPG's 3-shot prompt (eval.py --few_shot 3)
            question = f"{spg_few_shot()}\n\nQuestion: {question}\nAnswer:\n"
    else:
        question = item.question
    return f"{D1_SYSTEM[task.name]}\n\n{question}"


def _agrpo_user(task: Task, item: Item) -> str:
    if task.name == "countdown":
        return f"Target: {item.answer}\nNumbers: {list(item.numbers)}"
    if task.name == "sudoku":
        return f"Puzzle: {item.question}"
    return item.question


def _d1_prompt(task: Task, item: Item, tokenizer: "Tokenizer") -> str:
    return tokenizer.format_prompt(_d1_user(task, item)) + D1_PREFILL


def _agrpo_prompt(task: Task, item: Item, tokenizer: "Tokenizer") -> str:
    return tokenizer.format_prompt(_agrpo_user(task, item), AGRPO_SYSTEM[task.name])


def _d1_items(task: Task) -> list[Item]:
    everything = task.eval_items()
    if task.name == "sudoku" and task.cfg.sudoku_split == "d1":
        return [everything[i] for i in d1_sudoku_subset(len(everything))]
    return everything


# The papers decode greedily with low-confidence remasking, no guidance, no confidence threshold and no editing.
_PAPER_DECODING = {"block_length": 32, "remasking": "low_confidence", "temperature": 0.0, "top_k": None, "top_p": None,
                   "threshold": None, "cfg_scale": 0.0, "edit_threshold": None}

PROTOCOLS: dict[str, Protocol] = {
    "ours": Protocol(name="ours", source="this repository: the task's prompt and reward, the run's sampler",
                     prompt=lambda task, item, tokenizer: task.prompt(item, tokenizer),
                     items=lambda task: task.eval_items(task.cfg.eval_size), chat=False),
    "d1": Protocol(
        name="d1", source="github.com/dllm-reasoning/d1 eval/ (d1, wd1, SPG)", prompt=_d1_prompt, items=_d1_items,
        grader="d1: first usable box (GSM8K), last box + Hendrycks string match (MATH), last box + eval-free "
               "arithmetic within 1e-5 (Countdown), pooled correct cells / blank cells (Sudoku)",
        graders=D1_GRADERS, decoding={**_PAPER_DECODING, "stop_on_eos_block": False}, lengths=(128, 256, 512),
        steps_per_token=0.5),
    "agrpo": Protocol(
        name="agrpo", source="github.com/probablyabot/agrpo eval.py, eval.yaml", prompt=_agrpo_prompt,
        items=lambda task: task.eval_items(),
        grader="AGRPO release: first answer tag then first box; first integer (GSM8K), math-verify (MATH, LaTeX "
               "parser here), last 'lhs = target' line (Countdown), mean blank-cell fraction per puzzle (Sudoku)",
        graders=AGRPO_GRADERS, decoding={**_PAPER_DECODING, "stop_on_eos_block": True}, lengths=(256,),
        steps_per_token=0.5, sudoku_split="spg",
        dataset_notes={"gsm8k": "the AGRPO release evaluates GSM8K-Platinum (madrylab/gsm8k-platinum, 1,209 "
                                "relabelled questions), not shipped here: this is the original 1,319-item test set"}),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r}: use one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
