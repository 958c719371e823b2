"""Countdown: combine the given numbers (each exactly once) with + - * / and parentheses to hit the target.

Data: the held-out Countdown-3 set ``countdown/cd3_test.jsonl`` (``{"input": "30,100,93", "output": "23"}``,
the set d1, SPG and AGRPO report on). Countdown-4 has no shared test file: its held-out set is 256 items
drawn by the generator from a reserved seed (or ``task.eval_file`` in the same JSONL format).
Training items come from a seeded generator: numbers uniform in 1..100, target drawn uniformly from
the integers in 1..100 reachable from them (so every item is solvable), never an item of the held-out
set (compared as multiset of numbers plus target).

Compact format (tiny char models)::

    prompt:      "30,100,93=23\\n"        numbers in item order, '=', target, newline
    completion:  "30-(100-93)"            one expression on the first line

The reward reads the first non-empty line; an optional ``=...`` suffix is ignored. Reference
completions are the solver's shortest expression (at most 12 characters for 3 numbers of 1..100, 17 for 4).

Chat format: d1's Countdown prompt in our words, answer inside ``<answer>`` tags, no equals sign.
The answer is what the completion marks (``answers.marked_answer``): the last non-empty ``\\boxed{}`` inside
the answer tags, else the tag content, else (no tags, or empty ones) the last box anywhere, which is how
LLaDA-8B-Instruct answers. LaTeX operators (``\\times``, ``\\cdot``, ``\\div``, ``\\frac{a}{b}``,
``\\left( \\right)``) are rewritten to plain arithmetic first, and ``= target`` (or ``target =``) is dropped.

Reward: the expression goes through ``arith.evaluate`` (own parser, exact ``Fraction`` arithmetic, no
powers, bounded length and depth). ``format`` = it was marked and parses; ``correct`` = it uses exactly the
given numbers (as a multiset) and equals the target exactly; extra component ``numbers`` = the multiset
matches.
"""
from __future__ import annotations

import random
from fractions import Fraction
from functools import lru_cache
from math import gcd
from typing import Iterator

from common.tasks.answers import latex_to_arith, marked_answer
from common.tasks.arith import ArithError, evaluate
from common.tasks.base import (
    SYSTEM_PROMPT, Item, Reward, Task, chat_completion, first_line, read_jsonl, resolve_data_path, shaped_reward,
)

DEFAULT_EVAL_FILE = "countdown/cd3_test.jsonl"
GENERATED_EVAL_SIZE = 256
_EVAL_SEED = "countdown-heldout"
NUMBER_RANGE = (1, 100)
TARGET_RANGE = (1, 100)

# Precedence of a printed sub-expression: 3 atom, 2 product/quotient, 1 sum/difference.
_ATOM, _MUL, _ADD = 3, 2, 1


def _parens(op: str, pa: int, pb: int) -> tuple[bool, bool]:
    """Whether ``a op b`` needs parentheses around a and around b (by precedence 3 atom, 2 mul, 1 add)."""
    if op == "+":
        return False, False
    if op == "-":
        return False, pb == _ADD
    if op == "*":
        return pa == _ADD, pb == _ADD
    return pa == _ADD, pb != _ATOM


def _combine(a: tuple[str, int], op: str, b: tuple[str, int]) -> tuple[str, int]:
    """Print ``a op b`` with the fewest parentheses that keep its value."""
    (sa, pa), (sb, pb) = a, b
    wa, wb = _parens(op, pa, pb)
    left = f"({sa})" if wa else sa
    right = f"({sb})" if wb else sb
    return f"{left}{op}{right}", _ADD if op in "+-" else _MUL


def _ops(a: tuple[int, int], b: tuple[int, int]) -> list[tuple[tuple[int, int], str]]:
    """a+b, a-b, a*b, a/b on normalised (numerator, positive denominator) pairs: faster to hash than Fraction."""
    (p, q), (r, s) = a, b
    out = []
    for num, den, op in ((p * s + r * q, q * s, "+"), (p * s - r * q, q * s, "-"), (p * r, q * s, "*"), (p * s, q * r, "/")):
        if den == 0:
            continue
        if den < 0:
            num, den = -num, -den
        g = gcd(num, den)
        out.append(((num // g, den // g), op))
    return out


@lru_cache(maxsize=4096)
def reachable(numbers: tuple[int, ...]) -> dict[Fraction, str]:
    """Every value an expression using each number exactly once can take, with its shortest expression."""
    n = len(numbers)
    by_mask: dict[int, dict[tuple[int, int], tuple[str, int]]] = {}
    for i, x in enumerate(numbers):
        by_mask[1 << i] = {(x, 1): (str(x), _ATOM)}
    for mask in sorted(range(1, 1 << n), key=lambda m: bin(m).count("1")):
        if mask in by_mask:
            continue
        out: dict[tuple[int, int], tuple[str, int]] = {}
        sub = (mask - 1) & mask
        while sub:
            rest = mask ^ sub
            for va, ea in by_mask[sub].items():
                for vb, eb in by_mask[rest].items():
                    for v, op in _ops(va, vb):
                        # Compare lengths before building the string: most candidates lose.
                        wa, wb = _parens(op, ea[1], eb[1])
                        size = len(ea[0]) + len(eb[0]) + 1 + 2 * (wa + wb)
                        best = out.get(v)
                        if best is None or size < len(best[0]):
                            out[v] = _combine(ea, op, eb)
            sub = (sub - 1) & mask
        by_mask[mask] = out
    return {Fraction(*v): e[0] for v, e in by_mask[(1 << n) - 1].items()}


def solve(numbers: tuple[int, ...], target: int) -> str | None:
    """The shortest expression using each number once that equals ``target``, or None if unsolvable."""
    return reachable(tuple(numbers)).get(Fraction(target))


def _key(numbers: tuple[int, ...], target: int) -> tuple[tuple[int, ...], int]:
    return tuple(sorted(numbers)), int(target)


def generate_item(rng: random.Random, num_numbers: int, item_id: str) -> Item:
    """One solvable item: random numbers, then a target drawn uniformly from the reachable ones in range."""
    while True:
        numbers = tuple(rng.randint(*NUMBER_RANGE) for _ in range(num_numbers))
        lo, hi = TARGET_RANGE
        targets = sorted(int(v) for v in reachable(numbers) if v.denominator == 1 and lo <= v <= hi)
        if targets:
            target = rng.choice(targets)
            return Item(id=item_id, question=",".join(map(str, numbers)), answer=str(target), numbers=numbers)


@lru_cache(maxsize=2)
def _generated_heldout(n: int) -> tuple[Item, ...]:
    rng = random.Random(f"{_EVAL_SEED}-{n}")
    return tuple(generate_item(rng, n, f"cd{n}_heldout:{i}") for i in range(GENERATED_EVAL_SIZE))


class CountdownTask(Task):
    """Countdown with ``cfg.num_numbers`` numbers."""

    name = "countdown"
    grader = "countdown-exact: safe parser (LaTeX operators rewritten), exact rational value, numbers as a multiset"
    extra_components = ("numbers",)

    @property
    def default_eval_file(self) -> str | None:
        return DEFAULT_EVAL_FILE if self.cfg.num_numbers == 3 else None  # Countdown-4: generated held-out set

    def _load_eval(self) -> list[Item]:
        n = self.cfg.num_numbers
        if self.cfg.eval_file is None and n != 3:
            return list(_generated_heldout(n))
        name = self.cfg.eval_file or DEFAULT_EVAL_FILE
        path = resolve_data_path(self.cfg, name)
        items = []
        for i, row in enumerate(read_jsonl(path)):
            numbers = tuple(int(x) for x in str(row["input"]).split(","))
            if len(numbers) != n:
                raise ValueError(f"{path}: row {i} has {len(numbers)} numbers but task.num_numbers is {n}")
            items.append(Item(id=f"{path.stem}:{i}", question=",".join(map(str, numbers)), answer=str(int(row["output"])), numbers=numbers))
        return items

    def train_items(self, seed: int) -> Iterator[Item]:
        """Generated items, seed-deterministic, skipping every held-out (numbers, target) pair."""
        held_out = {_key(it.numbers, int(it.answer)) for it in self.eval_items()}
        rng = random.Random(f"countdown-train-{self.cfg.num_numbers}-{seed}")
        k = 0
        while True:
            item = generate_item(rng, self.cfg.num_numbers, f"cd{self.cfg.num_numbers}_train:{seed}:{k}")
            k += 1
            if _key(item.numbers, int(item.answer)) not in held_out:
                yield item

    def prompt(self, item: Item, tokenizer) -> str:
        if not self.chat:
            return f"{item.question}={item.answer}\n"
        user = (
            f"Using only the numbers [{', '.join(map(str, item.numbers))}], write an arithmetic expression that "
            f"equals exactly {item.answer}. Use every number exactly once; you may use +, -, * and / and "
            "parentheses. After reasoning, give only the expression inside <answer></answer> tags, without an "
            "equals sign or the target. For example, for numbers [2, 3, 4] and target 5: <answer>2*4-3</answer>"
        )
        return tokenizer.format_prompt(user, SYSTEM_PROMPT)

    def reference_completion(self, item: Item) -> str | None:
        expr = solve(item.numbers, int(item.answer))
        if expr is None or not self.chat:
            return expr
        return chat_completion(f"We need {item.answer} from {', '.join(map(str, item.numbers))}. {expr} = {item.answer}.", expr)

    def answer_expression(self, completion: str, item: Item) -> tuple[str | None, bool]:
        """The expression a completion answers with, LaTeX rewritten (``answers.latex_to_arith``), and whether
        it was marked (chat: answer tags or a box; compact: the first line always is)."""
        if self.chat:
            text, how = marked_answer(completion)
            if text is None:
                return None, False
        else:
            text, how = first_line(completion), "line"
        sides = [s.strip() for s in latex_to_arith(text).split("=")]
        # "expr = target" and "target = expr" both name the expression; otherwise the first side counts.
        if len(sides) == 2 and sides[0] == item.answer:
            return sides[1], bool(how)
        return sides[0], bool(how)

    def compute_reward(self, completion: str, item: Item) -> Reward:
        w = self.cfg.format_weight
        expr, marked = self.answer_expression(completion, item)
        if expr is None:
            return shaped_reward(0.0, False, False, w, numbers=0.0)
        try:
            value, used = evaluate(expr)
        except ArithError:
            return shaped_reward(0.0, False, False, w, numbers=0.0)
        numbers_ok = sorted(used) == sorted(item.numbers)
        correct = numbers_ok and value == int(item.answer)
        return shaped_reward(float(correct), marked, correct, w, numbers=float(numbers_ok))
