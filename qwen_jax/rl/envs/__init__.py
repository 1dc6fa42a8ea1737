"""RL environments: the Env API and registry, a concurrent EnvPool, verifiable tasks (arithmetic,
countdown), a multi-turn tool-use task with a calculator and a sandboxed Python, and a vectorised
pure-JAX env in token space."""

from qwen_jax.rl.envs.api import (
    ENVS,
    Action,
    AsyncEnv,
    Env,
    Observation,
    env_factory,
    make_env,
    register_env,
)
from qwen_jax.rl.envs.expressions import ExpressionError, evaluate
from qwen_jax.rl.envs.jax_env import (
    JaxEnvAdapter,
    ReverseState,
    ReverseTokensEnv,
    as_env,
    reverse_tokens_env,
)
from qwen_jax.rl.envs.pool import EnvPool, StepResult, host_share
from qwen_jax.rl.envs.sandbox import ToolResult, network_isolation_prefix, run_python
from qwen_jax.rl.envs.tasks import (
    ArithmeticEnv,
    CountdownEnv,
    countdown_outcome,
    extract_answer,
    leading_integer,
)
from qwen_jax.rl.envs.tools import ToolUseEnv, calculator, python_tool

__all__ = [
    "ENVS", "Action", "ArithmeticEnv", "AsyncEnv", "CountdownEnv", "Env", "EnvPool",
    "ExpressionError", "JaxEnvAdapter", "Observation", "ReverseState", "ReverseTokensEnv",
    "StepResult", "ToolResult", "ToolUseEnv", "as_env", "calculator", "countdown_outcome",
    "env_factory", "evaluate", "extract_answer", "host_share", "leading_integer", "make_env",
    "network_isolation_prefix", "python_tool", "register_env", "reverse_tokens_env",
    "run_python",
]
