"""MATH: competition problems with LaTeX answers, checked for equivalence by math-verify.

Data: the held-out set is MATH-500 (``math/math500.jsonl``, shipped); no training file is shipped, so
RL needs ``task.train_file``. Both name JSONL files (relative to ``task.data_dir``) whose rows have
``problem`` and either ``answer`` or ``solution`` (the gold answer is
then the solution's last ``\\boxed{...}``). Training problems that also occur in the evaluation file
are dropped; the rest are replayed in a fresh seeded order every epoch. Chat style only (config check).

Reward: the candidate is what the completion marks (``answers.marked_answer``: the last non-empty
``\\boxed{}`` inside the answer tags, else the tag content, else the last box anywhere; ``format`` = it was
marked and parses), else the tail of the whole completion. The candidate goes to math-verify's LaTeX parser only (never its plain-expression parser, which calls sympy's ``eval``-based
``parse_expr``). Guards because sympy evaluates integer powers and factorials eagerly and the signal
timeout cannot interrupt a C-level big-integer operation: the candidate is at most
``MAX_ANSWER_CHARS``, has at most ``MAX_POWERS`` powers, none nested or with an exponent over three
digits, and no factorial or binomial next to large numbers; anything else scores zero. Every reward runs in
the reward process (``guard``) with ``task.reward_timeout_s`` (default 5 s), which holds in any thread;
there, on its main thread, math-verify's own signal timeouts apply too. Any exception it raises scores zero.

Grader names: numbers from this reward are ``math-verify``; d1's published MATH-500 numbers come from an
exact string match after Hendrycks' normalisation (``protocols``), which rejects equivalent forms
(``0.5`` vs ``\\frac{1}{2}``, ``x=2`` vs ``2``), so on the same generations math-verify reads higher.
"""
from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Iterator

from common.tasks.answers import last_boxed, marked_answer
from common.tasks.base import (
    MAX_COMPLETION_CHARS, SYSTEM_PROMPT, Item, Reward, Task, chat_completion, read_jsonl, resolve_data_path,
    shaped_reward, shuffled_epochs,
)

DEFAULT_EVAL_FILE = "math/math500.jsonl"
MAX_ANSWER_CHARS = 400
MAX_POWERS = 8
TIMEOUT_S = 3

_POWER_RE = re.compile(r"\^|\*\*")
_BIG_INT_RE = re.compile(r"\d{4,}")


def is_hostile(answer: str) -> bool:
    """True when a candidate answer could make sympy work unboundedly (huge powers, factorials, length)."""
    if len(answer) > MAX_ANSWER_CHARS or "\x00" in answer:
        return True
    powers = _POWER_RE.findall(answer)
    if len(powers) > MAX_POWERS:
        return True
    if any(tok in answer for tok in ("!", "binom", "choose", "factorial")) and (powers or _BIG_INT_RE.search(answer)):
        return True
    # Walk the brackets once: refuse a power whose exponent holds a power or a 4+ digit number, and a
    # power of a bracketed group that itself holds a power ((9^999)^999 ...).
    group_has_power: list[bool] = [False]
    last_closed_had_power = False
    i, n = 0, len(answer)
    while i < n:
        c = answer[i]
        if c in "({[":
            group_has_power.append(False)
            last_closed_had_power = False
        elif c in ")}]":
            had = group_has_power.pop() if len(group_has_power) > 1 else False
            last_closed_had_power = had
            group_has_power[-1] = group_has_power[-1] or had
        elif c == "^" or answer.startswith("**", i):
            if last_closed_had_power:
                return True
            j = i + (2 if c == "*" else 1)
            while j < n and answer[j] == " ":
                j += 1
            exponent = _exponent(answer, j)
            if _POWER_RE.search(exponent) or _BIG_INT_RE.search(exponent):
                return True
            group_has_power[-1] = True
            k = j + len(exponent)
            while k < n and answer[k] == " ":
                k += 1
            if answer.startswith(("^", "**"), k):  # an unbracketed tower: 2**3**4
                return True
            i = k
            continue
        elif not c.isspace():
            last_closed_had_power = False
        i += 1
    return False


def _exponent(text: str, j: int) -> str:
    """The exponent starting at ``j``: a bracketed group (up to its match or the end), else a run of digits/one char."""
    if j >= len(text):
        return ""
    if text[j] in "({[":
        depth = 0
        for k in range(j, len(text)):
            depth += (text[k] in "({[") - (text[k] in ")}]")
            if depth == 0:
                return text[j:k + 1]
        return text[j:]
    k = j
    while k < len(text) and (text[k].isdigit() or text[k] == "-"):
        k += 1
    return text[j:max(k, j + 1)]


def _threaded() -> bool:
    return threading.current_thread() is not threading.main_thread()


def _parse(latex: str) -> list:
    from math_verify import LatexExtractionConfig, parse

    timeout = None if _threaded() else TIMEOUT_S
    return parse(latex, extraction_config=[LatexExtractionConfig()], parsing_timeout=timeout)


@lru_cache(maxsize=4096)
def _parse_gold(answer: str) -> list:
    return _parse(f"\\boxed{{{answer}}}")


def candidate_latex(region: str, wrap: bool) -> str:
    """What to hand the parser: the last ``\\boxed{}`` content, else the region's tail (wrapped in ``$`` when
    ``wrap`` and it has none: tag content is usually bare LaTeX)."""
    boxed = last_boxed(region)
    if boxed is not None:
        return f"\\boxed{{{boxed}}}"
    tail = region.strip()[-MAX_ANSWER_CHARS:]
    return f"${tail}$" if wrap and "$" not in tail else tail


def math_candidate(completion: str) -> tuple[str, bool]:
    """The LaTeX a completion answers with and whether it marked it (answer tags or a box)."""
    text = completion[-MAX_COMPLETION_CHARS:]
    marked, how = marked_answer(text)
    if how == "boxed":
        return f"\\boxed{{{marked}}}", True
    if how == "tags":
        return candidate_latex(marked, wrap=True), True
    return candidate_latex(text, wrap=False), False


def is_equivalent(latex: str, gold: str) -> bool:
    """math-verify equivalence of candidate LaTeX (``math_candidate``) and a gold answer; False on any failure."""
    from math_verify import verify

    if is_hostile(latex):
        return False
    try:
        pred = _parse(latex)
        if not pred:
            return False
        timeout = None if _threaded() else TIMEOUT_S
        return bool(verify(_parse_gold(gold), pred, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - hostile text may break the parser in any way; it scores zero
        return False


def gold_from_row(row: dict) -> str:
    """The gold answer: ``answer`` if present, else the last ``\\boxed{}`` of ``solution``."""
    if row.get("answer") is not None:
        return str(row["answer"]).strip()
    boxed = last_boxed(str(row.get("solution", "")))
    if boxed is None:
        raise ValueError("MATH row needs an 'answer' field or a \\boxed{} answer in 'solution'")
    return boxed.strip()


class MathTask(Task):
    """MATH-style problems from JSONL files."""

    name = "math"
    grader = "math-verify: LaTeX parser only, guarded, equivalence (accepts 0.5 for \\frac{1}{2})"
    default_reward_timeout_s = 5.0
    heavy_imports = ("math_verify",)
    default_eval_file = DEFAULT_EVAL_FILE
    needs_train_file = True

    def _read(self, name: str | None, split: str) -> list[Item]:
        if name is None:
            raise ValueError(f"task math has no {split} data shipped: set task.{split}_file to a JSONL with problem/solution fields")
        path = resolve_data_path(self.cfg, name)
        items = []
        for i, row in enumerate(read_jsonl(path)):
            if "problem" not in row:
                raise ValueError(f"{path}: row {i} needs a 'problem' field")
            try:
                answer = gold_from_row(row)
            except ValueError as e:
                raise ValueError(f"{path}: row {i}: {e}") from None
            items.append(Item(id=f"math_{split}:{i}", question=row["problem"], answer=answer, solution=str(row.get("solution", ""))))
        return items

    def _load_eval(self) -> list[Item]:
        return self._read(self.cfg.eval_file or DEFAULT_EVAL_FILE, "eval")

    def train_items(self, seed: int) -> Iterator[Item]:
        """The training file minus held-out problems, reshuffled every epoch from ``seed``."""
        held_out = {" ".join(it.question.split()) for it in self.eval_items()}
        pool = [it for it in self._read(self.cfg.train_file, "train") if " ".join(it.question.split()) not in held_out]
        if not pool:
            raise ValueError("MATH training file has no items outside the evaluation set")
        yield from shuffled_epochs(pool, f"math-train-{seed}")

    def prompt(self, item: Item, tokenizer) -> str:
        if not self.chat:
            return f"{item.question}\n"
        user = f"{item.question}\nPut the final answer inside <answer></answer> tags, in LaTeX."
        return tokenizer.format_prompt(user, SYSTEM_PROMPT)

    def reference_completion(self, item: Item) -> str | None:
        if not self.chat:
            return item.answer
        return chat_completion(item.solution or f"The answer is {item.answer}.", item.answer)

    def compute_reward(self, completion: str, item: Item) -> Reward:
        latex, marked = math_candidate(completion)
        correct = is_equivalent(latex, item.answer)
        # Format credit needs the marked answer to parse; correct implies it did.
        well_formed = marked and (correct or _parses(latex))
        return shaped_reward(float(correct), well_formed, correct, self.cfg.format_weight)


def _parses(latex: str) -> bool:
    if is_hostile(latex):
        return False
    try:
        return bool(_parse(latex))
    except Exception:  # noqa: BLE001 - see is_equivalent
        return False
