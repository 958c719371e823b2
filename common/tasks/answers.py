"""Finding the answer in a chat completion the way LLaDA-8B-Instruct actually writes it.

The habits below are seen in d1's published LLaDA-8B-Instruct generations (``eval/eval_baselines`` in
github.com/dllm-reasoning/d1; counts by ``benchmarks/grade_published.py``): on Countdown 75-95% of answers
(512 down to 128 tokens) sit in a box inside the answer tags (``<answer>\\n\\boxed{49 + 55 - 53}\\n</answer>``),
3-15% in a box after ``</reasoning>`` with no answer tags at all (GSM8K and MATH: up to 24-25%), and some
write LaTeX operators (``\\times``, ``\\div``, ``\\frac{a}{b}``) or append ``= target``. GSM8K completions also leave ``<answer></answer>`` empty and box the
number after it, stop right after an opening tag, copy the prompt's ``\\boxed{...}`` placeholder or leave a
box empty.

``marked_answer`` is the one rule every task's reward uses: the answer a completion *marks*, by answer tags
or by a box. All scans are linear in the (bounded) text: no regex backtracking, no quadratic rescans.
"""
from __future__ import annotations

import re
from fractions import Fraction

from common.tasks.base import MAX_COMPLETION_CHARS, extract_tagged_answer

# "\boxed{", "\boxed {", or a lone brace: one pass over these tokens pairs every box with its closing brace.
_BRACE_TOKENS = re.compile(r"\\boxed\s{0,3}\{|[{}]")
# A box holding nothing, or the prompt's "..." placeholder, marks no answer.
_EMPTY_BOX = re.compile(r"\\boxed\s{0,3}\{[\s.]*\}")


def boxed_contents(text: str) -> list[str]:
    """The content of every balanced ``\\boxed{...}`` in ``text``, in the order the boxes close."""
    out: list[str] = []
    open_boxes: list[tuple[int, int]] = []  # (brace depth inside the box, where its content starts)
    depth = 0
    for m in _BRACE_TOKENS.finditer(text):
        tok = m.group()
        if tok == "}":
            if open_boxes and open_boxes[-1][0] == depth:
                out.append(text[open_boxes.pop()[1]:m.start()])
            depth = max(depth - 1, 0)
        else:
            depth += 1
            if tok != "{":
                open_boxes.append((depth, m.end()))
    return out


def _blank(content: str) -> bool:
    return not content.strip(" \t\r\n.")


def last_boxed(text: str) -> str | None:
    """The content of the last box that holds something (not empty, not the ``...`` placeholder), or None."""
    for content in reversed(boxed_contents(text)):
        if not _blank(content):
            return content
    return None


def marked_answer(completion: str) -> tuple[str | None, str]:
    """The answer a completion marks and how: ``(text, "boxed")`` for the last non-empty box inside the answer
    tags (or, when the tags are missing or empty, anywhere), ``(text, "tags")`` for tag content without a box,
    ``(None, "")`` when it marks nothing."""
    text = completion[-MAX_COMPLETION_CHARS:]
    region = extract_tagged_answer(text)
    if region is not None and not _blank(_EMPTY_BOX.sub("", region)):
        boxed = last_boxed(region)
        return (boxed, "boxed") if boxed is not None else (region, "tags")
    boxed = last_boxed(text)
    return (boxed, "boxed") if boxed is not None else (None, "")


# --- LaTeX arithmetic (Countdown)

_LATEX_OPS = [
    (re.compile(r"\\(?:times|cdot|ast)(?![a-zA-Z])"), "*"),
    (re.compile(r"\\div(?![a-zA-Z])"), "/"),
    (re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])"), ""),
    (re.compile(r"\\[()\[\]]|\$"), " "),  # inline/display math delimiters \( \) \[ \] $
    (re.compile(r"\\[,;:! ]|\\q?quad(?![a-zA-Z])"), " "),  # LaTeX spacing
    (re.compile(r"\\([{}])"), r"\1"),  # escaped braces become plain braces, then parentheses
]
_UNICODE_OPS = str.maketrans({"−": "-", "–": "-", "·": "*", "∗": "*", "⋅": "*", "[": "(", "]": ")", "{": "(", "}": ")"})
_FRAC = re.compile(r"\\[dt]?frac\s{0,3}\{")
MAX_LATEX_CHARS = 1024


def _group(text: str, start: int) -> int:
    """Index just past the brace group opening at ``text[start] == '{'``, or -1 when it never closes."""
    depth = 0
    for i in range(start, len(text)):
        depth += (text[i] == "{") - (text[i] == "}")
        if depth == 0:
            return i + 1
    return -1


def latex_to_arith(expr: str) -> str:
    """LaTeX habits in an arithmetic answer rewritten for ``arith.evaluate``: ``\\times``/``\\cdot`` → ``*``,
    ``\\div`` → ``/``, ``\\frac{a}{b}`` → ``(a)/(b)``, ``\\left( \\right)`` and math delimiters dropped, braces and
    brackets → parentheses. Anything else stays, so the parser still rejects it; longer input is returned
    unchanged (the parser refuses it by length)."""
    if len(expr) > MAX_LATEX_CHARS:
        return expr
    for pattern, repl in _LATEX_OPS:
        expr = pattern.sub(repl, expr)
    # \frac{a}{b}: one left-to-right pass; each rewrite consumes its \frac, so the loop is bounded by the length.
    while (m := _FRAC.search(expr)) is not None:
        num_end = _group(expr, m.end() - 1)
        den_start = num_end
        while 0 <= den_start < len(expr) and expr[den_start] == " ":
            den_start += 1
        if num_end < 0 or den_start >= len(expr) or expr[den_start] != "{" or (den_end := _group(expr, den_start)) < 0:
            break  # malformed \frac: leave it for the parser to reject
        num, den = expr[m.end():num_end - 1], expr[den_start + 1:den_end - 1]
        expr = f"{expr[:m.start()]}(({num})/({den})){expr[den_end:]}"
    return expr.translate(_UNICODE_OPS).strip().rstrip(".").strip()


# --- numbers (GSM8K)

MAX_NUMBER_CHARS = 40
# One left-to-right scan; the first alternative that matches at a position wins, so a clock time or a
# \frac is read whole instead of as two numbers.
_NUMBER_TOKEN = re.compile(
    r"\\[dt]?frac\{(?P<fnum>-?\d{1,12}(?:\.\d{1,12})?)\}\{(?P<fden>-?\d{1,12}(?:\.\d{1,12})?)\}"
    r"|(?<![\d:])(?P<hour>\d{1,2}):(?P<minute>[0-5]\d)(?![\d:])"
    r"|(?P<num>-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+)"
)


def _decimal(text: str) -> Fraction | None:
    s = text.replace(",", "")
    if len(s) > MAX_NUMBER_CHARS:
        return None
    return Fraction(s)


def last_number(text: str) -> Fraction | None:
    """The exact value of the last number written in ``text``: ``1,234.50``, ``\\frac{3}{4}`` (3/4), or a clock
    time ``2:00`` / ``2:30 pm`` read in hours as GSM8K's gold answers are (2, 5/2); None when there is none."""
    value = None
    for m in _NUMBER_TOKEN.finditer(text):
        if m.group("num") is not None:
            value = _decimal(m.group("num"))
        elif m.group("hour") is not None:
            value = Fraction(int(m.group("hour"))) + Fraction(int(m.group("minute")), 60)
        else:
            den = _decimal(m.group("fden"))
            value = None if not den else _decimal(m.group("fnum")) / den
    return value
