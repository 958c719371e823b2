"""GSM8K: grade-school word problems with a numeric final answer.

Data: ``gsm8k/{train,test}.jsonl`` (``{"question", "answer"}``, the answer ends with ``#### N``) or any
file of that format given by ``task.train_file`` / ``task.eval_file``. Training questions that also occur
in the evaluation file (whitespace-normalised) are dropped; the rest are replayed in a fresh seeded
order every epoch.

Compact format::

    prompt:      "<question>\\n"
    completion:  "18"                     the final number on the first line

Chat format: the question with d1's system prompt; the reference completion's reasoning is the dataset
solution with its ``<<...>>`` calculator annotations removed, the answer the final number.

Answer extraction (chat): what the completion marks (``answers.marked_answer``): the last non-empty
``\\boxed{}`` inside the answer tags, else the tag content, else (no tags, empty tags, a trailing unclosed tag)
the last non-empty box anywhere; with nothing marked, the whole completion. The number read is the last one
in that text (``answers.last_number``): thousands commas, ``$`` and ``%`` are ignored, ``\\frac{a}{b}`` is a/b,
a clock time ``2:00 pm`` is its hour (GSM8K's gold answers for "what time" questions are the hour: 7, 10),
and the comparison is exact (``18.00`` == ``18``). An empty box or the prompt's ``\\boxed{...}`` placeholder
never wins over a number. ``format`` = chat: the marked answer holds a number; compact: the first line is
exactly one number.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Iterator

from common.tasks.answers import last_number, marked_answer
from common.tasks.base import (
    MAX_COMPLETION_CHARS, SYSTEM_PROMPT, Item, Reward, Task, chat_completion, first_line, read_jsonl,
    resolve_data_path, shaped_reward, shuffled_epochs,
)

DEFAULT_TRAIN_FILE = "gsm8k/train.jsonl"
DEFAULT_EVAL_FILE = "gsm8k/test.jsonl"
MAX_NUMBER_DIGITS = 40

_CALC_RE = re.compile(r"<<[^<>]*>>")


def parse_number(text: str) -> Fraction | None:
    """The exact value of one number written with optional ``$``, commas, ``%``; None if it is not one."""
    s = text.strip().replace("$", "").replace(",", "").rstrip("%").strip().rstrip(".")
    if not s or len(s) > MAX_NUMBER_DIGITS or not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", s):
        return None
    try:
        return Fraction(Decimal(s))
    except InvalidOperation:
        return None


def extract_number(completion: str) -> Fraction | None:
    """The final numeric answer of a chat completion: the marked answer's last number, else the text's."""
    text = completion[-MAX_COMPLETION_CHARS:]
    marked, _ = marked_answer(text)
    value = last_number(marked) if marked is not None else None
    return value if value is not None else last_number(text)


def gold_answer(answer_field: str) -> str:
    """The number after ``####`` in a GSM8K answer, normalised (commas dropped)."""
    _, sep, tail = answer_field.rpartition("####")
    if not sep:
        raise ValueError("GSM8K answer field has no '#### N' final answer")
    value = parse_number(tail)
    if value is None:
        raise ValueError(f"GSM8K final answer {tail.strip()!r} is not a number")
    return str(value.numerator) if value.denominator == 1 else tail.strip().replace(",", "")


def _norm_question(q: str) -> str:
    return " ".join(q.split()).lower()


class Gsm8kTask(Task):
    """GSM8K from JSONL files."""

    name = "gsm8k"
    grader = "gsm8k-exact: marked answer's last number (box > tags > text), exact rational comparison"
    default_eval_file = DEFAULT_EVAL_FILE
    default_train_file = DEFAULT_TRAIN_FILE
    needs_train_file = True

    def _read(self, name: str, split: str) -> list[Item]:
        path = resolve_data_path(self.cfg, name)
        items = []
        for i, row in enumerate(read_jsonl(path)):
            if "question" not in row or "answer" not in row:
                raise ValueError(f"{path}: row {i} needs 'question' and 'answer' fields")
            solution = row["answer"]
            items.append(Item(id=f"gsm8k_{split}:{i}", question=row["question"], answer=gold_answer(solution), solution=solution))
        return items

    def _load_eval(self) -> list[Item]:
        return self._read(self.cfg.eval_file or DEFAULT_EVAL_FILE, "test")

    def train_items(self, seed: int) -> Iterator[Item]:
        """The training file minus held-out questions, reshuffled every epoch from ``seed``."""
        held_out = {_norm_question(it.question) for it in self.eval_items()}
        pool = [it for it in self._read(self.cfg.train_file or DEFAULT_TRAIN_FILE, "train") if _norm_question(it.question) not in held_out]
        if not pool:
            raise ValueError("GSM8K training file has no items outside the evaluation set")
        yield from shuffled_epochs(pool, f"gsm8k-train-{seed}")

    def prompt(self, item: Item, tokenizer) -> str:
        if not self.chat:
            return f"{item.question}\n"
        return tokenizer.format_prompt(item.question, SYSTEM_PROMPT)

    def reference_completion(self, item: Item) -> str | None:
        if not self.chat:
            return item.answer
        reasoning = _CALC_RE.sub("", item.solution.rpartition("####")[0]).strip()
        return chat_completion(reasoning or f"The answer is {item.answer}.", item.answer)

    def compute_reward(self, completion: str, item: Item) -> Reward:
        text = completion[-MAX_COMPLETION_CHARS:]
        gold = parse_number(item.answer)
        if self.chat:
            value = extract_number(text)
            marked, _ = marked_answer(text)
            well_formed = marked is not None and last_number(marked) is not None
        else:
            line = first_line(text)
            value = last_number(line)
            well_formed = parse_number(line) is not None
        correct = value is not None and value == gold
        return shaped_reward(float(correct), well_formed, correct, self.cfg.format_weight)
