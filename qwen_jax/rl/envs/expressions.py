"""Exact arithmetic on untrusted text: parsed with `ast`, evaluated with Fractions, never `eval`.

Only number literals, + - * / (and ** or unary signs where allowed) and parentheses pass; any other
syntax (names, calls, attributes, strings, comparisons) is an ExpressionError. Every intermediate
value is bounded in size, so "9**9**9" and friends fail fast instead of eating memory.
"""

from __future__ import annotations

import ast
import dataclasses
import decimal
import re
from fractions import Fraction

MAX_EXPRESSION_CHARS = 1000
MAX_EXPONENT = 64  # |b| in a**b: enough for any sum a person would do with a calculator
MAX_BITS = 4096  # numerator and denominator of every intermediate value

_INTEGER = re.compile(r"\d+")
_DECIMAL = re.compile(r"\d+\.\d*|\.\d+")
_BINARY_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)


class ExpressionError(ValueError):
    """Text that is not an allowed arithmetic expression, or whose value cannot be computed."""


@dataclasses.dataclass(frozen=True)
class Evaluated:
    """An expression's exact value and its number literals in reading order."""

    value: Fraction
    literals: tuple[Fraction, ...]


def evaluate(text: str, *, allow_power: bool = False, allow_decimals: bool = False,
             allow_unary: bool = False) -> Evaluated:
    """The exact value of arithmetic `text`; ExpressionError naming what is not allowed."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ExpressionError(f"not an arithmetic expression: {text.strip()[:60]!r}") from exc
    walker = _Walker(text.strip(), allow_power, allow_decimals, allow_unary)
    value = walker.visit(tree.body)
    return Evaluated(value, tuple(walker.literals))


def format_number(value: Fraction, significant_digits: int = 12) -> str:
    """An integer as is; anything else as a decimal rounded to `significant_digits`."""
    if value.denominator == 1:
        return str(value.numerator)
    with decimal.localcontext() as context:
        context.prec = significant_digits
        quotient = decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator)
    return format(quotient.normalize(), "f") if abs(quotient.adjusted()) < 20 else str(quotient)


class _Walker:
    def __init__(self, source: str, allow_power: bool, allow_decimals: bool, allow_unary: bool):
        self.source = source
        self.allow_power = allow_power
        self.allow_decimals = allow_decimals
        self.allow_unary = allow_unary
        self.literals: list[Fraction] = []

    def visit(self, node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant):
            return self._literal(node)
        if isinstance(node, ast.BinOp) and isinstance(node.op, _BINARY_OPS):
            return self._binary(node)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            if not self.allow_unary:
                raise ExpressionError("unary + and - are not allowed")
            value = self.visit(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        raise ExpressionError(f"{_node_text(self.source, node)!r} is not allowed: only numbers, "
                              "arithmetic operators and parentheses")

    def _literal(self, node: ast.Constant) -> Fraction:
        # The source text, not node.value: 0.1 must be exactly 1/10, and "0x1f", "1_000" or "1e9"
        # are not the plain integers and decimals a calculator takes.
        text = _node_text(self.source, node)
        if _INTEGER.fullmatch(text):
            value = Fraction(int(text))
        elif self.allow_decimals and _DECIMAL.fullmatch(text):
            value = Fraction(text)
        else:
            kind = "integers and decimals" if self.allow_decimals else "integers"
            raise ExpressionError(f"{text!r} is not allowed: only {kind}")
        _check_size(value)
        self.literals.append(value)
        return value

    def _binary(self, node: ast.BinOp) -> Fraction:
        op = type(node.op)
        if op is ast.Pow and not self.allow_power:
            raise ExpressionError("** is not allowed")
        left, right = self.visit(node.left), self.visit(node.right)
        if op is ast.Add:
            value = left + right
        elif op is ast.Sub:
            value = left - right
        elif op is ast.Mult:
            value = left * right
        elif op is ast.Div:
            if right == 0:
                raise ExpressionError("division by zero")
            value = left / right
        else:
            value = _power(left, right)
        _check_size(value)
        return value


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1 or abs(exponent) > MAX_EXPONENT:
        raise ExpressionError(f"exponents must be integers in [-{MAX_EXPONENT}, {MAX_EXPONENT}]")
    if base == 0 and exponent < 0:
        raise ExpressionError("division by zero")
    # Refuse before computing: the result has about |exponent| times the base's bits.
    bits = max(base.numerator.bit_length(), base.denominator.bit_length())
    if bits * abs(int(exponent)) > MAX_BITS:
        raise ExpressionError("number too large")
    return base ** int(exponent)


def _check_size(value: Fraction) -> None:
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_BITS:
        raise ExpressionError("number too large")


def _node_text(source: str, node: ast.AST) -> str:
    return ast.get_source_segment(source, node) or type(node).__name__
