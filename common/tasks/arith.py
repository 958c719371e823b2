"""A safe arithmetic parser for model-written expressions: never ``eval``, exact rationals, bounded work.

Grammar (whitespace allowed between tokens)::

    expr   := term (('+' | '-') term)*
    term   := factor (('*' | '/' | '×' | '÷' | 'x') factor)*
    factor := INT | '(' expr ')'
    INT    := 1 to MAX_DIGITS decimal digits

No unary operators, no powers, no names, no floats. Input longer than ``MAX_CHARS`` or nested deeper than
``MAX_DEPTH`` is rejected before any arithmetic, so evaluation work is bounded by the length: at most
~MAX_CHARS/2 integers of MAX_DIGITS digits combined by exact ``Fraction`` arithmetic. Division by zero is
an ``ArithError`` (the caller scores it as wrong).
"""
from __future__ import annotations

from fractions import Fraction

MAX_CHARS = 256
MAX_DEPTH = 16
MAX_DIGITS = 6

_MUL = {"*", "×", "x", "X"}
_DIV = {"/", "÷"}
_OPS = {"+", "-", "(", ")"} | _MUL | _DIV


class ArithError(ValueError):
    """The text is not an expression of the grammar, or it divides by zero."""


def tokenize(text: str) -> list[str]:
    """Split into integer literals and operator characters; raise ``ArithError`` on anything else."""
    if len(text) > MAX_CHARS:
        raise ArithError(f"expression longer than {MAX_CHARS} characters")
    tokens: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t":
            i += 1
        elif "0" <= c <= "9":
            j = i
            while j < n and "0" <= text[j] <= "9":
                j += 1
            if j - i > MAX_DIGITS:
                raise ArithError(f"integer literal longer than {MAX_DIGITS} digits")
            tokens.append(text[i:j])
            i = j
        elif c in _OPS:
            tokens.append(c)
            i += 1
        else:
            raise ArithError(f"unexpected character {c!r}")
    if not tokens:
        raise ArithError("empty expression")
    return tokens


class _Parser:
    """Recursive descent over a token list; recursion depth is bounded by MAX_DEPTH parentheses."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.pos = 0
        self.numbers: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while (op := self.peek()) is not None and (op in _MUL or op in _DIV):
            self.pos += 1
            rhs = self.factor(depth)
            if op in _MUL:
                value = value * rhs
            elif rhs == 0:
                raise ArithError("division by zero")
            else:
                value = value / rhs
        return value

    def factor(self, depth: int) -> Fraction:
        tok = self.peek()
        if tok is None:
            raise ArithError("expression ends early")
        self.pos += 1
        if tok == "(":
            if depth >= MAX_DEPTH:
                raise ArithError(f"parentheses nested deeper than {MAX_DEPTH}")
            value = self.expr(depth + 1)
            if self.peek() != ")":
                raise ArithError("unbalanced parentheses")
            self.pos += 1
            return value
        if tok.isdigit():
            self.numbers.append(int(tok))
            return Fraction(int(tok))
        raise ArithError(f"unexpected token {tok!r}")


def evaluate(text: str) -> tuple[Fraction, list[int]]:
    """The exact value of an expression and the integer literals it uses, in order of appearance."""
    tokens = tokenize(text)
    # Cheap depth pre-check, so 10 kB of '(' is refused without recursing at all.
    depth = 0
    for tok in tokens:
        depth += (tok == "(") - (tok == ")")
        if depth > MAX_DEPTH:
            raise ArithError(f"parentheses nested deeper than {MAX_DEPTH}")
    parser = _Parser(tokens)
    value = parser.expr(0)
    if parser.pos != len(tokens):
        raise ArithError(f"unexpected token {tokens[parser.pos]!r}")
    return value, parser.numbers
