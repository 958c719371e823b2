"""Sudoku 4x4: fill the blanks so every row, column and 2x2 box holds 1..4 once.

Data: two held-out splits (``task.sudoku_split``), both ``Puzzle,Solution`` CSVs, 16 digits read row by
row, 0 = blank:
  * ``d1``: ``sudoku/4x4_test.csv``, d1's 500 puzzles, every one with 8 blanks (124 have several solutions);
    d1's protocol scores 256 of them.
  * ``spg``: ``sudoku/spg_test.csv``, SPG's split (also the AGRPO release's): 256 unique-solution puzzles
    with 7 to 12 blanks whose 88 solution grids never occur in SPG's training split. Papers prompt it with
    three worked examples ("3-shot"), and LLaDA-8B-Instruct's base accuracy on it is far higher than on d1's.
    Not shipped (see common/data/README.md): save SPG's ``dataset/test_sudoku_split_new.csv`` there, or
    point ``task.eval_file`` at it.
Training puzzles come from a seeded generator: a random full grid, then cells blanked in random order while
the solution stays unique, down to a blank count drawn from ``BLANKS_RANGE``; a puzzle of the held-out set
is never emitted, and under the ``spg`` split neither is any puzzle whose solution grid is a held-out one.

Compact format (tiny char models)::

    prompt:      "3102200002100320\\n"    the puzzle's 16 digits, newline
    completion:  "3142243142131324"       the solved grid's 16 digits on the first line

Chat format: d1's Sudoku prompt in our words (the grid shown as four rows), answer = 16 digits inside
``<answer>`` tags (whitespace, commas and '|' between digits are ignored); under the ``spg`` split the
prompt first shows three worked examples (our own, on puzzles outside the split). The answer is what the
completion marks (``answers.marked_answer``): a box inside the tags, the tag content, or a box anywhere.

Reward (d1): ``score`` = fraction of the originally blank cells whose digit matches the stored solution
(digits are read in order from the answer region, missing ones count wrong); ``format`` = the region is
exactly 16 digits in 1..4 once separators are dropped; ``correct`` = every blank right. Unlike d1, a
well-formed complete valid grid that keeps the givens scores 1.0 even when it differs from the stored
solution: 124 of the 500 d1 test puzzles have more than one solution.
"""
from __future__ import annotations

import csv
import random
from functools import lru_cache
from typing import Iterator

from common.tasks.answers import marked_answer
from common.tasks.base import (
    MAX_COMPLETION_CHARS, SYSTEM_PROMPT, Item, Reward, Task, chat_completion, first_line, resolve_data_path,
    shaped_reward,
)

DEFAULT_EVAL_FILE = "sudoku/4x4_test.csv"
EVAL_FILES = {"d1": DEFAULT_EVAL_FILE, "spg": "sudoku/spg_test.csv"}
# The worked examples of the 3-shot prompt: unique-solution puzzles whose solutions are not in the spg split.
SHOT_PUZZLES = ("3014002020004130", "0000100420013142", "2001403002001420")
BLANKS_RANGE = (6, 10)
_SEPARATORS = str.maketrans("", "", " \t\r\n,|-+[]")

# Peers of each cell: same row, column or 2x2 box.
_PEERS = [
    sorted({r * 4 + c for r in range(4) for c in range(4)
            if (r == i // 4 or c == i % 4 or (r // 2, c // 2) == (i // 8, (i % 4) // 2)) and r * 4 + c != i})
    for i in range(16)
]


def solutions(puzzle: str, limit: int = 2) -> list[str]:
    """Up to ``limit`` solutions of a 16-digit puzzle (0 = blank), by backtracking."""
    grid = [int(c) for c in puzzle]
    found: list[str] = []

    def fill(pos: int) -> None:
        while pos < 16 and grid[pos]:
            pos += 1
        if pos == 16:
            found.append("".join(map(str, grid)))
            return
        used = {grid[j] for j in _PEERS[pos]}
        for d in (1, 2, 3, 4):
            if d not in used:
                grid[pos] = d
                fill(pos + 1)
                grid[pos] = 0
                if len(found) >= limit:
                    return

    if all(grid[i] == 0 or grid[i] not in {grid[j] for j in _PEERS[i]} for i in range(16)):
        fill(0)
    return found


def is_valid_solution(grid: str) -> bool:
    """True when ``grid`` is 16 digits of a complete valid 4x4 Sudoku."""
    return len(grid) == 16 and all(c in "1234" for c in grid) and all(grid[i] != grid[j] for i in range(16) for j in _PEERS[i])


@lru_cache(maxsize=1)
def all_grids() -> tuple[str, ...]:
    """All 288 complete 4x4 grids, in a fixed order."""
    return tuple(solutions("0" * 16, limit=1000))


def _rows(grid: str) -> str:
    return "\n".join(grid[r * 4:(r + 1) * 4] for r in range(4))


def explain(puzzle: str) -> str:
    """A short worked solution: repeatedly fill a cell whose row, column and box leave one digit."""
    grid = [int(c) for c in puzzle]
    lines = []
    while 0 in grid:
        for i in range(16):
            if grid[i] == 0:
                left = {1, 2, 3, 4} - {grid[j] for j in _PEERS[i]}
                if len(left) == 1:
                    grid[i] = left.pop()
                    lines.append(f"Row {i // 4 + 1}, column {i % 4 + 1}: only {grid[i]} is left.")
                    break
        else:
            break  # no single left: the answer line carries the rest
    return "\n".join(lines)


def _solves(puzzle: str, grid: str) -> bool:
    return is_valid_solution(grid) and all(p in ("0", g) for p, g in zip(puzzle, grid))


def generate_puzzle(rng: random.Random, blanks: int) -> tuple[str, str]:
    """A puzzle with exactly ``blanks`` blanks and a unique solution, plus that solution."""
    while True:
        digits = [1, 2, 3, 4]
        rng.shuffle(digits)
        # Solve the empty grid with a random digit relabelling: a uniformly relabelled random grid.
        solution = "".join(str(digits[int(c) - 1]) for c in rng.choice(all_grids()))
        grid = list(solution)
        order = list(range(16))
        rng.shuffle(order)
        removed = 0
        for pos in order:
            if removed == blanks:
                break
            keep = grid[pos]
            grid[pos] = "0"
            if len(solutions("".join(grid))) == 1:
                removed += 1
            else:
                grid[pos] = keep
        if removed == blanks:
            return "".join(grid), solution


class SudokuTask(Task):
    """4x4 Sudoku."""

    name = "sudoku"
    grader = "sudoku-cells: blanks right vs the stored solution (any valid grid keeping the givens is right)"

    @property
    def default_eval_file(self) -> str:
        return EVAL_FILES[self.cfg.sudoku_split]

    def _load_eval(self) -> list[Item]:
        path = resolve_data_path(self.cfg, self.cfg.eval_file or self.default_eval_file)
        if not path.is_file() and self.cfg.sudoku_split == "spg" and self.cfg.eval_file is None:
            raise ValueError(f"{path}: SPG's Sudoku split is not shipped; save test_sudoku_split_new.csv from "
                             "github.com/facebookresearch/SPG (dataset/, MIT) there or set task.eval_file")
        if not path.is_file():
            raise ValueError(f"{path}: data file not found (set task.data_dir / task.eval_file)")
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        items = []
        for i, row in enumerate(rows):
            puzzle, solution = row.get("Puzzle", ""), row.get("Solution", "")
            if len(puzzle) != 16 or len(solution) != 16:
                raise ValueError(f"{path}: row {i} needs 16-digit Puzzle and Solution columns")
            items.append(Item(id=f"{path.stem}:{i}", question=puzzle, answer=solution))
        return items

    def train_items(self, seed: int) -> Iterator[Item]:
        """Generated unique-solution puzzles, seed-deterministic, never a held-out puzzle (``spg``: nor a
        held-out solution grid)."""
        held_out = {it.question for it in self.eval_items()}
        held_grids = {it.answer for it in self.eval_items()} if self.cfg.sudoku_split == "spg" else set()
        rng = random.Random(f"sudoku-train-{seed}")
        k = 0
        while True:
            puzzle, solution = generate_puzzle(rng, rng.randint(*BLANKS_RANGE))
            if puzzle not in held_out and solution not in held_grids:
                yield Item(id=f"sudoku_train:{seed}:{k}", question=puzzle, answer=solution)
                k += 1

    def prompt(self, item: Item, tokenizer) -> str:
        if not self.chat:
            return f"{item.question}\n"
        user = (
            "Solve this 4x4 Sudoku. Each row, each column and each 2x2 box must contain the digits 1 to 4 "
            "exactly once. The grid is shown row by row; 0 marks an empty cell.\n"
            f"{_rows(item.question)}\n"
            "After reasoning, give the completed grid as 16 digits, row by row, inside <answer></answer> tags."
        )
        if self.cfg.sudoku_split == "spg":
            shots = "\n\n".join(f"Puzzle:\n{_rows(p)}\n{chat_completion(explain(p), solutions(p)[0])}" for p in SHOT_PUZZLES)
            user = f"Three solved examples:\n\n{shots}\n\nNow your puzzle.\n{user}"
        return tokenizer.format_prompt(user, SYSTEM_PROMPT)

    def reference_completion(self, item: Item) -> str | None:
        if not self.chat:
            return item.answer
        return chat_completion("Fill each empty cell with the one digit its row, column and box still miss.", item.answer)

    def compute_reward(self, completion: str, item: Item) -> Reward:
        if self.chat:
            region, how = marked_answer(completion)
            tagged = region is not None
        else:
            region, tagged = first_line(completion), True
        w = self.cfg.format_weight
        if region is None:
            return shaped_reward(0.0, False, False, w)
        compact = region[:MAX_COMPLETION_CHARS].translate(_SEPARATORS)
        digits = [c for c in compact if "0" <= c <= "9"][:16]
        blanks = [i for i, c in enumerate(item.question) if c == "0"]
        well_formed = tagged and len(compact) == 16 and all(c in "1234" for c in compact)
        if well_formed and _solves(item.question, compact):
            # 124 of the 500 d1 test puzzles have several solutions; any valid one is right.
            return shaped_reward(1.0, True, True, w)
        right = sum(1 for i in blanks if i < len(digits) and digits[i] == item.answer[i])
        score = right / len(blanks) if blanks else 1.0
        if not self.cfg.partial_credit:
            score = float(score == 1.0)
        return shaped_reward(score, well_formed, right == len(blanks), w)
