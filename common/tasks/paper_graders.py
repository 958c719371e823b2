"""The answer extraction and grading behind published numbers: d1's and the AGRPO release's, in our code.

Written from reading d1's ``eval/parse_and_get_acc.py`` + ``eval/parser_helper.py`` (github.com/dllm-reasoning/d1
at 837888f) and AGRPO's ``eval.py`` + ``rewards.py`` (github.com/probablyabot/agrpo at 98f1182), so that a
number from ``unmask eval --protocol d1|agrpo`` can stand beside theirs. Quirks are reproduced on purpose
(they move published numbers); where reproducing one would mean running completion text as code, we
do not, and the difference is named:

* d1 evaluates Countdown expressions with Python ``eval``; here they go through the safe parser, so an
  expression with unary minus, ``**``, ``//`` or decimals (which ``eval`` would take) scores wrong.
* AGRPO parses Countdown left sides and MATH answers with math-verify's default extraction, which includes
  sympy's ``eval``-based expression parser; here the arithmetic a Countdown left side ends with (LaTeX
  operators rewritten) goes through the safe parser, and MATH answers through math-verify's LaTeX parser
  only (with our hostility guard). Run on d1's published generations next to AGRPO's own code, the
  grades differ on 2-3 of 500 MATH items per length (prose with no tags or box, where the expression
  parser finds a last formula; answers padded with newlines, which break AGRPO's LaTeX parse and not ours)
  and on none of the 1128 GSM8K, 256 Countdown and 256 Sudoku items per length.
* Both graders read the raw decode with special tokens; ours sees the completion cut at EOS, so d1's
  "up to ``<|eot_id|>``" patterns get that token appended (a completion cut by the length limit differs).

Each grader returns a ``Grade``: ``correct``, ``credit`` in [0, 1] (the Sudoku cell fraction; else 0/1) and
``weight`` (d1 pools Sudoku cells over all puzzles: weight = blanks; else 1) plus the extracted ``answer``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from itertools import islice

from common.tasks.answers import latex_to_arith
from common.tasks.arith import ArithError, evaluate
from common.tasks.base import MAX_COMPLETION_CHARS, Item


@dataclass(frozen=True)
class Grade:
    """One completion graded the way a paper grades it."""

    correct: bool
    credit: float
    weight: float = 1.0
    answer: str | None = None


def accuracy(grades: list[Grade]) -> float:
    """The paper's headline number: credit pooled by weight (d1 Sudoku: correct cells / blank cells)."""
    total = sum(g.weight for g in grades)
    return sum(g.credit * g.weight for g in grades) / total if total else 0.0


def _binary(correct: bool, answer: str | None) -> Grade:
    return Grade(correct=correct, credit=float(correct), answer=answer)


# --- d1: extraction helpers (parser_helper.py's behaviour)

_D1_EOT = "<|eot_id|>"


def _d1_last_boxed_only(text: str) -> str | None:
    """d1's ``last_boxed_only_string``: the last ``\\boxed``/``\\fbox`` group, the whole text when there is none,
    None when its braces never close."""
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
    idx = text.rfind("\\boxed")
    if idx < 0:
        idx = text.rfind("\\fbox")
        if idx < 0:
            return text
    depth = 0
    for i in range(idx, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[idx:i + 1]
    return None


def _d1_remove_boxed(s: str) -> str:
    """d1's ``remove_boxed`` (raises TypeError on None, as d1's does; callers rely on it)."""
    if "\\boxed " in s:
        return s[len("\\boxed "):]
    if s.startswith("\\boxed{") and s.endswith("}"):
        return s[len("\\boxed{"):-1]
    return s


def _d1_boxed_answer(text: str) -> str | None:
    """``remove_boxed(last_boxed_only_string(text))``, None where d1's call raises."""
    found = _d1_last_boxed_only(text)
    return None if found is None else _d1_remove_boxed(found)


def _first_answer_tag(text: str, ignore_case: bool = False) -> str | None:
    """What ``re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)`` captures: from the first opening tag to the
    first closing tag after it (None when that tag is missing). With two finds it stays linear where the lazy
    regex is quadratic on thousands of unclosed tags."""
    flags = re.IGNORECASE if ignore_case else 0
    if (open_tag := re.search("<answer>", text, flags)) is None:
        return None
    close = re.compile("</answer>", flags).search(text, open_tag.end())
    return None if close is None else text[open_tag.end():close.start()]


# --- d1: Hendrycks' MATH normalisation as d1 ships it (strip_string), exceptions included

def _fix_fracs(s: str) -> str:
    head, *rest = s.split("\\frac")
    out = head
    for sub in rest:
        out += "\\frac"
        if sub[0] == "{":  # IndexError on "\\frac" at the end: d1 then falls back to raw equality
            out += sub
            continue
        if len(sub) < 2:
            return s
        a, b = sub[0], sub[1]
        out += ("{" + a + "}{" + b + "}" + sub[2:]) if b != "{" else ("{" + a + "}" + b + sub[2:])
    return out


def _fix_a_slash_b(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    a, b = int(parts[0]), int(parts[1])  # ValueError propagates, as in d1
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def _fix_sqrt(s: str) -> str:
    if "\\sqrt" not in s:
        return s
    head, *rest = s.split("\\sqrt")
    return head + "".join(("\\sqrt{" + p[0] + "}" + p[1:]) if p[0] != "{" else ("\\sqrt" + p) for p in rest)


def hendrycks_normalize(s: str) -> str:
    """The MATH answer normalisation d1 grades with; raises where d1's raises (the caller then compares raw)."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    if "\\text{ " in s:  # units on the right; more than one such group raises in d1
        parts = s.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError("several \\text{ } groups")
        s = parts[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        s = sides[1]
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def d1_is_equiv(pred: str | None, gold: str) -> bool:
    """d1's ``is_equiv``: normalised strings equal; if normalising raises, the raw strings equal."""
    if pred is None:
        return False
    try:
        return hendrycks_normalize(pred) == hendrycks_normalize(gold)
    except Exception:  # noqa: BLE001 - d1 falls back to raw equality on any error
        return pred == gold


# --- d1 graders, one per task

_D1_BOXED_LAZY = re.compile(r"\\boxed\{")
_D1_FIRST_NUMBER = re.compile(r"-?\d+\.?\d*")
MAX_BOXES = 64  # d1's lazy box regex is quadratic on hostile text; a real answer never has this many boxes


def _float_or_none(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def d1_gsm8k(completion: str, item: Item) -> Grade:
    """The first box (content up to its first ``}``) holding a number, else the first answer tag's number."""
    text = completion[:MAX_COMPLETION_CHARS]
    parsed = None
    pos = 0
    for m in islice(_D1_BOXED_LAZY.finditer(text), MAX_BOXES):
        if m.start() < pos:  # inside the previous match (findall never overlaps)
            continue
        close = text.find("}", m.end())
        if close < 0 or "\n" in text[m.end():close]:
            continue
        pos = close + 1
        content = text[m.end():close].strip()
        if not content or set(content) == {"."}:
            continue
        parsed = _float_or_none(content)
        if parsed is None and (nums := _D1_FIRST_NUMBER.findall(content)):
            parsed = _float_or_none(nums[0])
        if parsed is not None:
            break
    if parsed is None and (tag := _first_answer_tag(text)) is not None and tag.strip():
        parsed = _float_or_none(tag.strip())
        if parsed is None and (nums := _D1_FIRST_NUMBER.findall(tag)):
            parsed = _float_or_none(nums[-1])
    return _binary(parsed is not None and parsed == float(Fraction(item.answer)), None if parsed is None else str(parsed))


def d1_math(completion: str, item: Item) -> Grade:
    """The last box (the whole text when there is none), else the first answer tag; Hendrycks string match."""
    text = completion[:MAX_COMPLETION_CHARS]
    parsed = _d1_boxed_answer(text)
    if not parsed and (tag := _first_answer_tag(text)) is not None:
        parsed = tag.strip()
    return _binary(d1_is_equiv(parsed, item.answer), parsed)


_D1_CD_RUN = re.compile(r"[0-9+\-*/() ]+")
_D1_CD_ALLOWED = re.compile(r"[\d+\-*/().\s]+")


def _d1_drop_equals(equation: str) -> str:
    """d1's ``re.search(r"([0-9+\\-*/() ]+)=[0-9. ]+")`` group: the first maximal run of those characters followed
    by '=' and a digit, dot or space (the class has no '=', so a match spans a whole run). Run by run, so it
    stays linear where the regex is quadratic."""
    for m in _D1_CD_RUN.finditer(equation):
        if equation[m.end():m.end() + 1] == "=" and equation[m.end() + 1:m.end() + 2] in tuple("0123456789. "):
            return m.group().strip()
    return equation


def _numbers_match(text: str, numbers: tuple[int, ...]) -> bool:
    """The digit runs of ``text`` are exactly ``numbers`` as a multiset (a run too long to be one never is)."""
    runs = re.findall(r"\d+", text)
    return len(runs) == len(numbers) and all(len(r) <= 12 for r in runs) and sorted(map(int, runs)) == sorted(numbers)


def d1_countdown(completion: str, item: Item) -> Grade:
    """The last box (the whole text when there is none; answer tags only when the box never closes), LaTeX
    operators replaced, a trailing ``= N`` dropped; numbers as a multiset, value within 1e-5."""
    text = completion[:MAX_COMPLETION_CHARS]
    equation = _d1_boxed_answer(text)
    if equation is None:
        tag = _first_answer_tag(text)
        equation = tag.strip() if tag is not None else text
    equation = equation.replace("\\div", "/").replace("\\times", "*").replace("\\cdot", "*")
    equation = _d1_drop_equals(equation)
    if not _numbers_match(equation, item.numbers):
        return _binary(False, equation)
    if not _D1_CD_ALLOWED.fullmatch(equation):
        return _binary(False, equation)
    try:
        value, _ = evaluate(" ".join(equation.split()))
    except ArithError:
        return _binary(False, equation)
    return _binary(abs(float(value) - int(item.answer)) < 1e-5, equation)


def _digits_before_close(text: str) -> re.Match | None:
    """d1's 4th pattern ``.*?(\\d{16})\\s*</answer>``: the 16 digits right before the first '</answer>' that has
    them (whitespace between allowed). Searched tag by tag: the regex is cubic on long digit runs."""
    start = 0
    while (end := text.find("</answer>", start)) >= 0:
        m = re.search(r"(\d{16})\s*\Z", text[max(0, end - 4096):end])
        if m is not None:
            return m
        start = end + 1
    return None


_D1_FENCED = re.compile(r"<answer>.*?```\s*([\d\s]+)```", re.DOTALL)
_D1_SUDOKU_PATTERNS = [
    lambda text: _D1_FENCED.search(text) if "```" in text else None,  # the lazy scan is quadratic without fences
    re.compile(r"<answer>(.*?)(?:<\|eot_id\|>|<\|endoftext\|>|</answer>)", re.DOTALL).search,
    re.compile(r"</answer>\s*(.*?)(?:<\|eot_id\|>|<\|endoftext\|>|$)", re.DOTALL).search,
    _digits_before_close,
    re.compile(r"\b(\d{16})\b").search,
]


def d1_sudoku(completion: str, item: Item) -> Grade:
    """The first of d1's five patterns that finds something, whitespace dropped, padded/cut to 16; credit =
    blanks right, weight = blanks (d1 pools cells over the whole set)."""
    text = completion[:MAX_COMPLETION_CHARS] + _D1_EOT
    solution = ""
    for find in _D1_SUDOKU_PATTERNS:
        m = find(text)
        if m and m.group(1).strip():
            solution = m.group(1).strip()
            break
    solution = re.sub(r"\s", "", solution)
    blanks = [i for i, c in enumerate(item.question) if c == "0"]
    right = 0
    if solution:
        solution = solution.ljust(16, "0")[:16]
        right = sum(solution[i] == item.answer[i] for i in blanks)
    return Grade(correct=right == len(blanks), credit=right / len(blanks) if blanks else 0.0,
                 weight=float(len(blanks)), answer=solution)


D1_GRADERS = {"gsm8k": d1_gsm8k, "math": d1_math, "countdown": d1_countdown, "sudoku": d1_sudoku}


# --- AGRPO release

def agrpo_answer(completion: str) -> str:
    """AGRPO's ``parse_ans``: the first answer tag's content (else the whole text), then its first box's
    content when that is non-empty."""
    comp = completion[:MAX_COMPLETION_CHARS]
    if (tag := _first_answer_tag(comp, ignore_case=True)) is not None:  # <answer>\s*(.*?)\s*</answer>, then strip
        comp = tag.strip()
    if (m := re.search(r"\\boxed\{", comp)) is not None:
        depth = 1
        for j in range(m.end(), len(comp)):
            depth += (comp[j] == "{") - (comp[j] == "}")
            if depth == 0:
                if j > m.end():
                    comp = comp[m.end():j]
                break
    return comp


def agrpo_gsm8k(completion: str, item: Item) -> Grade:
    """The first run of digits in the answer equals the gold number (AGRPO then math-verifies two integers)."""
    comp = agrpo_answer(completion)
    m = re.search(r"\d+", comp)
    if m is None or len(m.group()) > 40:
        return _binary(False, comp[:80])
    return _binary(Fraction(int(m.group())) == Fraction(item.answer), m.group())


def agrpo_math(completion: str, item: Item) -> Grade:
    """``$answer$`` against ``$gold$`` by math-verify (LaTeX parser only here, guarded)."""
    from common.tasks.math import is_equivalent

    comp = agrpo_answer(completion).strip()  # math-verify's expression parser ignores the spaces; LaTeX's needs them gone
    return _binary(is_equivalent(f"${comp}$", item.answer), comp)


def _last_equation_line(comp: str) -> str:
    """What AGRPO's ``([^=\\n]+=.*)$`` (multiline) finds last: from a line's first non-'=' character that has an
    '=' after it, to the end of that line; '' when no line has one. Line by line: linear on any text."""
    for line in reversed(comp.split("\n")):
        for p, c in enumerate(line):
            if c != "=":
                if "=" in line[p + 1:]:
                    return line[p:]
                break
    return ""


def agrpo_countdown(completion: str, item: Item) -> Grade:
    """The last equation line; its left side must use the numbers as a multiset and equal the target."""
    eq = _last_equation_line(agrpo_answer(completion))
    if "=" not in eq:
        return _binary(False, eq)
    lhs = eq.split("=", 1)[0]
    if not _numbers_match(lhs, item.numbers):
        return _binary(False, eq)
    # math-verify reads "So the expression 95 - 73 + 7" and "\\[ 48 + 16 + 29" as the arithmetic they end with.
    arithmetic = re.search(r"[0-9+\-*/() ]*$", latex_to_arith(lhs)).group()
    try:
        value, _ = evaluate(arithmetic.strip())
    except ArithError:
        return _binary(False, eq)
    return _binary(value == int(item.answer), eq)


def agrpo_sudoku(completion: str, item: Item) -> Grade:
    """The answer left-padded with zeros to 16 and cut there (AGRPO's ``zfill(16)[:16]``); credit = blanks right."""
    comp = agrpo_answer(completion).zfill(16)[:16]
    blanks = [i for i, c in enumerate(item.question) if c == "0"]
    right = sum(comp[i] == item.answer[i] for i in blanks)
    return Grade(correct=right == len(blanks), credit=right / len(blanks) if blanks else 0.0, answer=comp)


AGRPO_GRADERS = {"gsm8k": agrpo_gsm8k, "math": agrpo_math, "countdown": agrpo_countdown, "sudoku": agrpo_sudoku}
