"""Verifiable single-turn tasks: a prompt from `reset(seed)`, one answer, an exact reward, done.

Answer extraction (both tasks): the answer is the action text up to the first newline or
end-of-text marker (`<|im_end|>`, `<|endoftext|>`), whichever comes first; later text is ignored.

- ArithmeticEnv reads the integer at the start of that answer, after optional whitespace and an
  optional sign: "19", " 19 apples", "19." and "-4" read as 19, 19, 19 and -4; "19.5", "1,900" and
  "The answer is 19" do not give 19 (the last reads no integer at all).
- CountdownEnv reads an arithmetic expression: the answer before the first "=", so
  "(25 - 3) * 4 = 88" is read as "(25 - 3) * 4".
"""

from __future__ import annotations

import random
import re
from fractions import Fraction
from typing import Any

from qwen_jax.config import ConfigError
from qwen_jax.rl.envs.api import register_env
from qwen_jax.rl.envs.expressions import ExpressionError, evaluate

END_MARKERS = ("\n", "<|im_end|>", "<|endoftext|>")
_LEADING_INTEGER = re.compile(r"\s*([+-]?\d+)(?!\.?\d)")  # "19." is 19, "19.5" is not


def extract_answer(text: str) -> str:
    """The answer part of a response: text before the first newline or end-of-text marker."""
    if not isinstance(text, str):
        raise TypeError(f"action must be a str, got {type(text).__name__}")
    end = min((i for i in (text.find(marker) for marker in END_MARKERS) if i >= 0), default=len(text))
    return text[:end]


def leading_integer(text: str) -> int | None:
    """The integer `text` starts with (after whitespace, optional sign), or None."""
    match = _LEADING_INTEGER.match(text)
    return int(match.group(1)) if match else None


class _SingleTurnEnv:
    """reset/step bookkeeping shared by the tasks: one answer per episode."""

    def __init__(self) -> None:
        self._expected: Any = None

    def _start(self, expected: Any) -> None:
        self._expected = expected

    def _finish(self) -> Any:
        if self._expected is None:
            raise RuntimeError(f"{type(self).__name__}.step called without an episode: call reset")
        expected, self._expected = self._expected, None
        return expected


class ArithmeticEnv(_SingleTurnEnv):
    """"What is 12+7*3? Answer:" -> reward 1.0 iff the answer starts with the right integer.

    The prompt is exactly f"What is {expression}? Answer:", the expression written without spaces:
    `num_operands` integers drawn uniformly from [0, max_operand] joined by operators drawn from
    `operators`, evaluated with the usual precedence (* before + and -). step's info holds
    "expected" (the int) and "parsed" (the integer read from the answer, or None).
    """

    def __init__(self, max_operand: int = 99, operators: str = "+-*", num_operands: int = 2):
        super().__init__()
        if not isinstance(max_operand, int) or max_operand < 1:
            raise ConfigError(f"max_operand must be an int >= 1, got {max_operand!r}")
        if not operators or not set(operators) <= set("+-*"):
            raise ConfigError(f"operators must be a non-empty string of '+', '-', '*', "
                              f"got {operators!r}")
        if not isinstance(num_operands, int) or num_operands < 2:
            raise ConfigError(f"num_operands must be an int >= 2, got {num_operands!r}")
        self.max_operand = max_operand
        self.operators = "".join(sorted(set(operators), key=operators.index))
        self.num_operands = num_operands

    def reset(self, seed: int) -> tuple[str, dict[str, Any]]:
        rng = random.Random(seed)
        parts = [str(rng.randint(0, self.max_operand))]
        for _ in range(self.num_operands - 1):
            parts += [rng.choice(self.operators), str(rng.randint(0, self.max_operand))]
        expression = "".join(parts)
        expected = int(evaluate(expression).value)
        self._start(expected)
        return f"What is {expression}? Answer:", {"expected": expected, "expression": expression}

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        answer = extract_answer(action)
        expected = self._finish()
        parsed = leading_integer(answer)
        return "", float(parsed == expected), True, {"expected": expected, "parsed": parsed}


class CountdownEnv(_SingleTurnEnv):
    """Reach a target from given numbers with + - * / and parentheses, each number at most once.

    The prompt is exactly
    f"Using the numbers {numbers}, each at most once, with + - * / and parentheses, write an
    expression that equals {target}. Answer:" (one line; numbers as a Python list, e.g. [3, 7, 25]).

    The target comes from a random expression over all the numbers whose every intermediate value
    is a positive integer <= max_target, so a solution always exists (info["solution"]).

    Reward of the answer (see the module docstring for which text is read):
    1.0: a well-formed expression equal to the target that uses only the given numbers, each at
         most once (not all need be used);
    0.1: a well-formed expression that is wrong: another value, or a number that is not given or
         is used more often than given;
    0.0: not well-formed: anything but integer literals, binary + - * /, and parentheses (unary
         minus, decimals, names, an empty answer), or a division by zero.
    info: "target", "numbers", "solution", "outcome" ("correct" | "wrong value" |
    "numbers not allowed" | "malformed").
    """

    def __init__(self, num_numbers: int = 4, max_number: int = 100, max_target: int = 1000):
        super().__init__()
        if not isinstance(num_numbers, int) or not 2 <= num_numbers <= 6:
            raise ConfigError(f"num_numbers must be an int in [2, 6], got {num_numbers!r}")
        if not isinstance(max_number, int) or max_number < 1:
            raise ConfigError(f"max_number must be an int >= 1, got {max_number!r}")
        if not isinstance(max_target, int) or max_target < max_number:
            raise ConfigError(f"max_target must be an int >= max_number={max_number}, "
                              f"got {max_target!r}")
        self.num_numbers = num_numbers
        self.max_number = max_number
        self.max_target = max_target
        self._numbers: list[int] = []

    def reset(self, seed: int) -> tuple[str, dict[str, Any]]:
        rng = random.Random(seed)
        numbers = [rng.randint(1, self.max_number) for _ in range(self.num_numbers)]
        target, solution = self._random_solution(numbers, rng)
        self._numbers = numbers
        self._start(target)
        prompt = (f"Using the numbers {numbers}, each at most once, with + - * / and parentheses, "
                  f"write an expression that equals {target}. Answer:")
        return prompt, {"target": target, "numbers": list(numbers), "solution": solution}

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        expression = extract_answer(action).split("=", 1)[0]
        target = self._finish()
        outcome = countdown_outcome(expression, self._numbers, target)
        reward = {"correct": 1.0, "wrong value": 0.1, "numbers not allowed": 0.1}.get(outcome, 0.0)
        info = {"target": target, "numbers": list(self._numbers), "outcome": outcome}
        return "", reward, True, info

    def _random_solution(self, numbers: list[int], rng: random.Random) -> tuple[int, str]:
        """Combine random pairs until one value is left: (that value, the expression giving it)."""
        # Each item is (value, text); the larger value goes first so a - b stays positive.
        items = [(n, str(n)) for n in numbers]
        while len(items) > 1:
            (a, a_text), (b, b_text) = sorted(
                (items.pop(rng.randrange(len(items))), items.pop(rng.randrange(len(items)))),
                reverse=True)
            # Never empty: a > b allows a - b, a == b allows a / b; both are <= a <= max_target.
            candidates = [(a + b, "+"), (a * b, "*"), (a - b, "-"), (a // b, "/")]
            allowed = [(value, op) for value, op in candidates
                       if 0 < value <= self.max_target and (op != "/" or a % b == 0)]
            value, op = rng.choice(allowed)
            items.append((value, f"({a_text} {op} {b_text})"))
        value, text = items[0]
        return value, text[1:-1] if text.startswith("(") else text


def countdown_outcome(expression: str, numbers: list[int], target: int) -> str:
    """"correct", "wrong value", "numbers not allowed" or "malformed" (see CountdownEnv)."""
    try:
        evaluated = evaluate(expression)
    except ExpressionError:
        return "malformed"
    available = [Fraction(n) for n in numbers]
    for literal in evaluated.literals:
        if literal not in available:
            return "numbers not allowed"
        available.remove(literal)
    return "correct" if evaluated.value == target else "wrong value"


register_env("arithmetic", ArithmeticEnv)
register_env("countdown", CountdownEnv)
