"""A multi-turn tool-use task: a word problem, a calculator or Python tool, then an answer.

Protocol of ToolUseEnv (the prompt from `reset` spells it out to the model):
- Each `step` is one turn; the action is text, and its first tool call or `<answer>...</answer>`
  (whichever starts first) decides the turn.
- A tool call, in one of two formats (call_format):
  "tags": `<tool>EXPRESSION</tool>` (calculator) or `<tool>CODE</tool>` (python); the env runs the
  tool and returns observation "<result>OUTPUT</result>", reward 0.0, done=False.
  "json": Qwen's own, `<tool_call>{"name": "calculator", "arguments": {"expression": "..."}}
  </tool_call>` (python: "code"), the tool described to the model by `env.tools` (JSON schemas, for
  a chat template's `tools`); the observation is the bare OUTPUT, which the chat template wraps as a
  tool response (rl.chat_reply_role="tool"). A call that is not such JSON gets "error: ..." back.
- `<answer>N</answer>`: done=True; reward 1.0 if N starts with the right integer (same rule as
  ArithmeticEnv: "42", " 42 apples"), else 0.0.
- An action with neither gets an "error: ..." back (in <result> tags, as above) and costs its turn.
- The max_turns-th action must be the answer: if it is not, the episode ends (done=True) with
  reward 0.0 and info["outcome"] = "out of turns".
info: "expected", "expression" (a calculator expression for the answer), "turn", "outcome" at
the end ("correct" | "wrong answer" | "out of turns").
"""

from __future__ import annotations

import json
import random
import re
from typing import Any, Callable

from qwen_jax.config import ConfigError
from qwen_jax.rl.envs.api import register_env
from qwen_jax.rl.envs.expressions import ExpressionError, evaluate, format_number
from qwen_jax.rl.envs.sandbox import run_python
from qwen_jax.rl.envs.tasks import leading_integer

_FIRST_TAG = {"tags": re.compile(r"<(tool|answer)>(.*?)</\1>", re.DOTALL),
              "json": re.compile(r"<(tool_call|answer)>(.*?)</\1>", re.DOTALL)}
_MAX_RESULT_CHARS = 2000


def calculator(expression: str) -> str:
    """The calculator tool: the exact value of + - * / ** (|exponent| <= 64) over integers and
    decimals with parentheses, as text ("1024", "0.333333333333"), or "error: <why>"."""
    try:
        value = evaluate(expression, allow_power=True, allow_decimals=True, allow_unary=True).value
    except ExpressionError as exc:
        return f"error: {exc}"
    return format_number(value)


def python_tool(code: str, *, timeout_s: float = 2.0) -> str:
    """The Python tool: what sandboxed `code` prints, with stderr's end if it failed."""
    result = run_python(code, timeout_s=timeout_s)
    if result.timed_out:
        return f"{result.stdout}error: timed out after {timeout_s} s"
    if result.exit_code != 0:
        return f"{result.stdout}error (exit code {result.exit_code}): {result.stderr[-500:]}"
    return result.stdout


# Word problems: each draws its numbers and returns (problem text, answer expression). The
# numbers make the answer a positive integer and the sums big enough that a tool helps.
def _warehouse(rng: random.Random) -> tuple[str, str]:
    crates, per_crate, shipped = rng.randint(20, 99), rng.randint(12, 48), rng.randint(100, 239)
    return (f"A warehouse holds {crates} crates with {per_crate} bottles in each. {shipped} bottles "
            "are shipped out. How many bottles are left?", f"{crates}*{per_crate}-{shipped}")


def _train(rng: random.Random) -> tuple[str, str]:
    speed, hours, extra = rng.randint(60, 180), rng.randint(3, 19), rng.randint(10, 999)
    return (f"A train travels at {speed} km per hour for {hours} hours, then {extra} km more. "
            "How many km does it travel in all?", f"{speed}*{hours}+{extra}")


def _eggs(rng: random.Random) -> tuple[str, str]:
    per_carton = rng.randint(6, 36)
    eggs = per_carton * rng.randint(40, 999)
    return (f"A farm packs {eggs} eggs into cartons of {per_carton}. How many cartons does it fill?",
            f"{eggs}/{per_carton}")


def _book(rng: random.Random) -> tuple[str, str]:
    per_day, days = rng.randint(12, 60), rng.randint(5, 30)
    pages = per_day * days + rng.randint(1, 500)
    return (f"A book has {pages} pages. Ana reads {per_day} pages a day for {days} days. "
            "How many pages are left?", f"{pages}-{per_day}*{days}")


_PROBLEMS: tuple[Callable[[random.Random], tuple[str, str]], ...] = (_warehouse, _train, _eggs, _book)

_TOOL_HELP = {
    "calculator": "write <tool>EXPRESSION</tool> to use a calculator (+ - * / ** and parentheses); "
                  "its value comes back as <result>VALUE</result>",
    # Only printed output comes back, and a division prints a float ("40.0"): say both.
    "python": "write <tool>CODE</tool> to run Python code; the code must print the result as an "
              "integer, e.g. <tool>print(int(96 * 7 / 4))</tool>, and what it prints comes back as "
              "<result>OUTPUT</result>",
}

# Each tool's one argument in the "json" format: its name and what the schema says of it.
_ARGUMENT = {"calculator": ("expression", "An arithmetic expression: + - * / ** over numbers, with "
                                          "parentheses"),
             "python": ("code", "Python code; what it prints comes back, so print the result as an "
                                "integer")}


def tool_schema(tool: str) -> dict[str, Any]:
    """The tool as a function schema, the form chat templates list under `tools`."""
    name, about = _ARGUMENT[tool]
    return {"type": "function", "function": {
        "name": tool, "description": "Runs a calculator" if tool == "calculator" else "Runs Python code",
        "parameters": {"type": "object", "properties": {name: {"type": "string", "description": about}},
                       "required": [name]}}}


def _called_argument(body: str, tool: str) -> str:
    """The argument of a JSON tool call's body, or ValueError saying what is wrong with it."""
    name = _ARGUMENT[tool][0]
    try:
        call = json.loads(body)
        arguments = call.get("arguments") if isinstance(call, dict) else None
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            arguments = json.loads(arguments)
    except json.JSONDecodeError as error:
        raise ValueError(f"the tool call is not JSON ({error.msg})") from None
    if not isinstance(call, dict) or call.get("name") != tool:
        raise ValueError(f"call the tool named {tool!r}")
    if not isinstance(arguments, dict) or not isinstance(arguments.get(name), str):
        raise ValueError(f'give the arguments as {{"{name}": "..."}}')
    return arguments[name]


class ToolUseEnv:
    """Word problems solved with a calculator or Python tool over several turns (module docstring)."""

    def __init__(self, tool: str = "calculator", max_turns: int = 4, python_timeout_s: float = 2.0,
                 call_format: str = "tags"):
        if tool not in _TOOL_HELP:
            raise ConfigError(f"tool must be one of {sorted(_TOOL_HELP)}, got {tool!r}")
        if call_format not in _FIRST_TAG:
            raise ConfigError(f"call_format must be one of {sorted(_FIRST_TAG)}, got {call_format!r}")
        if not isinstance(max_turns, int) or max_turns < 1:
            raise ConfigError(f"max_turns must be an int >= 1, got {max_turns!r}")
        if not python_timeout_s > 0:
            raise ConfigError(f"python_timeout_s must be > 0, got {python_timeout_s!r}")
        self.tool = tool
        self.max_turns = max_turns
        self.python_timeout_s = python_timeout_s
        self.call_format = call_format
        # What a chat template shows the model ("json" calls only: "tags" are explained in the prompt).
        self.tools = [tool_schema(tool)] if call_format == "json" else []
        self._expected: int | None = None
        self._turn = 0

    def reset(self, seed: int) -> tuple[str, dict[str, Any]]:
        rng = random.Random(seed)
        problem, expression = rng.choice(_PROBLEMS)(rng)
        self._expected = int(evaluate(expression).value)
        self._turn = 0
        how = _TOOL_HELP[self.tool] if self.call_format == "tags" else f"call the {self.tool} tool"
        prompt = (f"{problem}\nTo compute, {how}. When you know "
                  f"the answer, write <answer>NUMBER</answer>. You have {self.max_turns} turns.")
        return prompt, {"expected": self._expected, "expression": expression}

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self._expected is None:
            raise RuntimeError("ToolUseEnv.step called without an episode: call reset")
        if not isinstance(action, str):
            raise TypeError(f"action must be a str, got {type(action).__name__}")
        self._turn += 1
        info: dict[str, Any] = {"expected": self._expected, "turn": self._turn}
        match = _FIRST_TAG[self.call_format].search(action)
        if match and match.group(1) == "answer":
            correct = leading_integer(match.group(2)) == self._expected
            return self._end("", float(correct), info, "correct" if correct else "wrong answer")
        if self._turn >= self.max_turns:
            return self._end("", 0.0, info, "out of turns")
        call = "<tool>...</tool>" if self.call_format == "tags" else "<tool_call>...</tool_call>"
        if match is None:
            output = f"error: write {call} or <answer>...</answer>"
        elif self.call_format == "tags":
            output = self._run_tool(match.group(2))
        else:
            try:
                output = self._run_tool(_called_argument(match.group(2), self.tool))
            except ValueError as error:
                output = f"error: {error}"
        output = output[:_MAX_RESULT_CHARS]
        return (f"<result>{output}</result>" if self.call_format == "tags" else output), 0.0, False, info

    def demonstration(self, info: dict[str, Any]) -> str:
        """A reply that ends an episode with full reward: the answer, in its tags (the warm-up's target)."""
        return f"<answer>{info['expected']}</answer>"

    def _run_tool(self, text: str) -> str:
        if self.tool == "calculator":
            return calculator(text)
        return python_tool(text, timeout_s=self.python_timeout_s)

    def _end(self, observation: str, reward: float, info: dict[str, Any],
             outcome: str) -> tuple[str, float, bool, dict[str, Any]]:
        self._expected = None
        return observation, reward, True, {**info, "outcome": outcome}


register_env("tool_use", ToolUseEnv)
