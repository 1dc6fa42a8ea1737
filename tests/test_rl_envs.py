"""RL environments: tasks and their rewards, the env pool's isolation of failures, the tool-use env and
its Python sandbox, and the vectorised JAX env."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
import time
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.config import ConfigError
from qwen_jax.rl.envs import (
    ENVS,
    ArithmeticEnv,
    AsyncEnv,
    CountdownEnv,
    Env,
    EnvPool,
    ReverseTokensEnv,
    ToolUseEnv,
    as_env,
    calculator,
    evaluate,
    extract_answer,
    host_share,
    make_env,
    run_python,
)

# Test envs. Process mode pickles the factory by reference, so they are top-level classes. Their
# behaviour is chosen by the seed, so one factory serves well-behaved and faulty slots alike.
RAISE_SEED, HANG_SEED, DIE_SEED = 1001, 1002, 1003
_instances = itertools.count()
_release_hung = threading.Event()  # set at the end of the thread-mode test so its hung calls end


class EchoEnv:
    """Two steps per episode; the observation names the seed, the action and the env instance."""

    def __init__(self) -> None:
        self.instance = next(_instances)
        self.seed = None
        self.turn = 0

    def reset(self, seed):
        self.seed, self.turn = seed, 0
        return f"seed {seed}", {"instance": self.instance, "pid": os.getpid()}

    def step(self, action):
        self.turn += 1
        if self.seed == RAISE_SEED:
            raise ValueError("boom")
        if self.seed == HANG_SEED:
            _release_hung.wait(5.0)
        if self.seed == DIE_SEED:
            os._exit(3)
        return f"{self.seed}:{action}", float(self.seed), self.turn >= 2, {"instance": self.instance}


class AsyncSleepEnv:
    """An AsyncEnv whose calls wait on asyncio.sleep (hangs for HANG_SEED, raises for RAISE_SEED)."""

    async def reset(self, seed):
        self.seed = seed
        await asyncio.sleep(0.02)
        return f"seed {seed}", {}

    async def step(self, action):
        await asyncio.sleep(60.0 if self.seed == HANG_SEED else 0.05)
        if self.seed == RAISE_SEED:
            raise KeyError("missing")
        return f"{self.seed}:{action}", 1.0, True, {}


# -- tasks ---------------------------------------------------------------------------------------


def test_registry_builds_by_name_and_names_the_known_ones():
    assert {"arithmetic", "countdown", "tool_use", "reverse_tokens"} <= set(ENVS)
    env = make_env("arithmetic", max_operand=9)
    assert isinstance(env, ArithmeticEnv) and isinstance(env, Env) and env.max_operand == 9
    assert isinstance(AsyncSleepEnv(), AsyncEnv)
    with pytest.raises(ConfigError, match=r"unknown env 'nope'; known: .*arithmetic.*countdown"):
        make_env("nope")


def test_answer_extraction_stops_at_newline_or_end_marker():
    assert extract_answer(" 42 apples\nmore") == " 42 apples"
    assert extract_answer("7<|im_end|>\n9") == "7"
    assert extract_answer("3+4<|endoftext|>") == "3+4"
    assert extract_answer("no marker") == "no marker"


def test_arithmetic_is_deterministic_and_rewards_exactly():
    env = ArithmeticEnv(max_operand=50, operators="+-*", num_operands=3)
    prompt, info = env.reset(7)
    assert (prompt, info) == env.reset(7) and env.reset(8)[0] != prompt
    assert prompt == f"What is {info['expression']}? Answer:"
    expected = info["expected"]
    assert expected == int(eval(info["expression"]))  # the test may eval its own generated text
    cases = {f"{expected}": 1.0, f"  {expected} because\n{expected + 1}": 1.0, f"{expected}.": 1.0,
             f"{expected + 1}": 0.0, f"{expected}.5": 0.0, f"The answer is {expected}": 0.0,
             "": 0.0, f"\n{expected}": 0.0}
    for answer, reward in cases.items():
        env.reset(7)
        _, got, done, step_info = env.step(answer)
        assert (got, done, step_info["expected"]) == (reward, True, expected), answer
    with pytest.raises(RuntimeError, match="reset"):
        env.step("1")  # the episode is over
    with pytest.raises(ConfigError, match="operators"):
        ArithmeticEnv(operators="+/")


def test_countdown_targets_are_reachable_and_rewards_exact():
    env = CountdownEnv(num_numbers=4, max_number=50, max_target=500)
    for seed in range(200):
        prompt, info = env.reset(seed)
        assert 1 <= info["target"] <= 500
        assert str(info["numbers"]) in prompt and prompt.endswith(f"equals {info['target']}. Answer:")
        assert evaluate(info["solution"]).value == info["target"]
        assert sorted(evaluate(info["solution"]).literals) == sorted(map(Fraction, info["numbers"]))
        assert env.step(info["solution"])[1] == 1.0
    assert env.reset(3) == env.reset(3)

    env = CountdownEnv(num_numbers=3, max_number=10)
    _, info = env.reset(0)
    a, b, c = info["numbers"]
    target = info["target"]

    def reward(answer):
        env.reset(0)
        _, value, done, step_info = env.step(answer)
        assert done
        return value, step_info["outcome"]

    assert reward(f"{info['solution']} = {target}\nblah") == (1.0, "correct")
    assert reward(f"{target} - {target} + {info['solution']}") == (0.1, "numbers not allowed")
    foreign = next(n for n in range(1, 20) if n not in info["numbers"])
    assert reward(f"({info['solution']}) * {foreign} / {foreign}") == (0.1, "numbers not allowed")
    assert reward(f"{a} + {a} + {a} + {a}") == (0.1, "numbers not allowed")  # reused beyond count
    wrong = next(e for e in (f"{a} + {b}", f"{a} * {b}", f"{b} + {c}") if evaluate(e).value != target)
    assert reward(wrong) == (0.1, "wrong value")
    assert reward(f"-{a} + {b}") == (0.0, "malformed")  # unary minus is not an operation here
    assert reward(f"{a} / ({b} - {b})") == (0.0, "malformed")  # division by zero
    assert reward("import os") == (0.0, "malformed")
    assert reward("") == (0.0, "malformed")


# -- pool ----------------------------------------------------------------------------------------


def test_thread_pool_runs_a_thousand_envs():
    with EnvPool(EchoEnv, 1000, mode="thread", timeout_s=10.0, max_workers=32) as pool:
        first = pool.reset(list(range(1000)))
        assert [r.observation for r in first] == [f"seed {s}" for s in range(1000)]
        assert all(not r.done and r.failed is None for r in first)
        results = pool.step({slot: f"a{slot}" for slot in range(0, 1000, 2)})
        assert sorted(results) == list(range(0, 1000, 2))
        assert all(r.observation == f"{s}:a{s}" and r.reward == s and not r.done
                   for s, r in results.items())
        results = pool.step({slot: "b" for slot in range(0, 1000, 2)})
        assert all(r.done for r in results.values())
        assert pool.running_slots() == list(range(1, 1000, 2))
        with pytest.raises(ValueError, match="slot 0 has no running episode"):
            pool.step({0: "c"})
        with pytest.raises(ValueError, match="slot 1000 is not in"):
            pool.step({1000: "c"})
        metrics = pool.metrics()
        assert metrics["env/failed"] == 0 and metrics["env/timeouts"] == 0
        assert metrics["perf/env_steps_per_sec"] > 0
        assert pool.metrics()["perf/env_steps_per_sec"] == 0.0  # a new window


def test_thread_pool_isolates_raising_and_hanging_envs():
    seeds = [5, RAISE_SEED, HANG_SEED, 6]
    try:
        with EnvPool(EchoEnv, 4, mode="thread", timeout_s=0.3, max_workers=2) as pool:
            first = pool.reset(seeds)
            instances = [r.info["instance"] for r in first]
            start = time.monotonic()
            results = pool.step({slot: "x" for slot in range(4)})
            assert time.monotonic() - start < 3.0
            assert results[1].failed == "error: ValueError: boom"
            assert results[2].failed == "timeout"
            for slot in (1, 2):
                assert (results[slot].done, results[slot].reward, results[slot].observation) == (
                    True, 0.0, None)
            assert results[0].observation == "5:x" and results[0].failed is None
            assert results[3].observation == "6:x" and results[3].failed is None
            metrics = pool.metrics()
            assert (metrics["env/failed"], metrics["env/timeouts"]) == (2, 1)
            # The hung thread is still stuck, yet both workers serve; failed slots get fresh envs.
            again = pool.reset([7, 8, 9, 10])
            assert [r.observation for r in again] == ["seed 7", "seed 8", "seed 9", "seed 10"]
            new_instances = [r.info["instance"] for r in again]
            assert new_instances[0] == instances[0] and new_instances[3] == instances[3]
            assert new_instances[1] != instances[1] and new_instances[2] != instances[2]
            assert all(r.failed is None for r in pool.step({s: "y" for s in range(4)}).values())
    finally:
        _release_hung.set()


def test_process_pool_kills_hung_and_dead_workers_and_restarts_them():
    # Three workers, slot s in worker s % 3: worker 0 holds slots 0 and 3, worker 1 slots 1 and 4,
    # worker 2 slots 2 and 5.
    seeds = [5, HANG_SEED, DIE_SEED, RAISE_SEED, 6, 7]
    with EnvPool(EchoEnv, 6, mode="process", timeout_s=0.5, max_workers=3) as pool:
        first = pool.reset(seeds)
        pids = [r.info["pid"] for r in first]
        assert len(set(pids)) == 3 and os.getpid() not in pids
        results = pool.step({slot: "x" for slot in range(6)})
        assert results[0].observation == "5:x" and results[0].failed is None
        assert results[3].failed == "error: ValueError: boom"  # its worker lives on
        assert results[1].failed == "timeout"
        assert results[2].failed == "worker died"
        # Slots 4 and 5 shared a worker with the hang and the crash: their envs died with it.
        assert results[4].failed == results[5].failed == "worker restarted"
        assert all(results[s].done and results[s].reward == 0.0 for s in range(1, 6))
        metrics = pool.metrics()
        assert (metrics["env/failed"], metrics["env/timeouts"]) == (5, 1)
        again = pool.reset([10, 11, 12, 13, 14, 15])
        assert [r.failed for r in again] == [None] * 6
        new_pids = [r.info["pid"] for r in again]
        assert new_pids[0] == pids[0] and new_pids[1] != pids[1] and new_pids[2] != pids[2]
        results = pool.step({slot: "y" for slot in range(6)})
        assert [results[s].observation for s in range(6)] == [f"{10 + s}:y" for s in range(6)]


def test_process_pool_builds_registered_envs_and_refuses_unpicklable_factories():
    with EnvPool("arithmetic", 2, mode="process", max_workers=1,
                 env_kwargs={"max_operand": 5}) as pool:
        first = pool.reset([3, 4])
        answers = {slot: str(r.info["expected"]) for slot, r in enumerate(first)}
        assert all(r.reward == 1.0 for r in pool.step(answers).values())
    with pytest.raises(ConfigError, match="cannot be pickled"):
        EnvPool(lambda: EchoEnv(), 2, mode="process")


def test_async_pool_runs_concurrently_and_isolates_hangs():
    with EnvPool(AsyncSleepEnv, 1000, mode="async", timeout_s=2.0) as pool:
        start = time.monotonic()
        pool.reset(list(range(1000)))
        results = pool.step({slot: "go" for slot in range(1000)})
        # Sequentially this is 1000 x 70 ms = 70 s.
        assert time.monotonic() - start < 5.0
        assert all(results[s].observation == f"{s}:go" and results[s].done for s in range(1000))

    with EnvPool(AsyncSleepEnv, 3, mode="async", timeout_s=0.3) as pool:
        pool.reset([1, HANG_SEED, RAISE_SEED])
        start = time.monotonic()
        results = pool.step({0: "a", 1: "b", 2: "c"})
        assert time.monotonic() - start < 2.0
        assert results[0].observation == "1:a" and results[0].failed is None
        assert results[1].failed == "timeout"
        assert results[2].failed == "error: KeyError: 'missing'"
        assert pool.metrics()["env/timeouts"] == 1


def test_pool_rejects_bad_configuration():
    with pytest.raises(ConfigError, match="mode"):
        EnvPool(EchoEnv, 2, mode="fork")
    with pytest.raises(ConfigError, match="start_method"):
        EnvPool(EchoEnv, 2, mode="process", start_method="fork")
    with pytest.raises(ConfigError, match="num_envs"):
        EnvPool(EchoEnv, 0)
    with pytest.raises(ConfigError, match="unknown env 'nope'"):
        EnvPool("nope", 2)
    with EnvPool(EchoEnv, 1, mode="async") as pool:  # a sync env in async mode fails its calls
        assert pool.reset([1])[0].failed.startswith("error: TypeError: mode='async' needs an AsyncEnv")
    with EnvPool(EchoEnv, 2) as pool:
        with pytest.raises(ValueError, match="one seed per slot"):
            pool.reset([1])
    with pytest.raises(RuntimeError, match="closed"):
        pool.reset([1, 2])


@pytest.mark.parametrize("num_envs,process_count", [(10, 3), (1000, 7), (2, 4), (8, 8)])
def test_host_share_is_disjoint_covering_and_balanced(num_envs, process_count):
    shares = [host_share(num_envs, index, process_count) for index in range(process_count)]
    assert [i for share in shares for i in share] == list(range(num_envs))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="process_index"):
        host_share(num_envs, process_count, process_count)


# -- tools ---------------------------------------------------------------------------------------


def test_calculator_is_exact_and_safe():
    assert calculator("2**10 - (3 + 4) * 5") == "989"
    assert calculator("1/3") == "0.333333333333"
    assert calculator("0.1 + 0.2") == "0.3"
    assert calculator("-2.5 * 4") == "-10"
    assert calculator("2**1000000").startswith("error")
    assert calculator("(2**64)**64**64").startswith("error")
    assert calculator("1/0") == "error: division by zero"
    assert calculator("__import__('os').system('true')").startswith("error")
    assert calculator("0x10").startswith("error")


def test_tool_env_episode_with_calculator():
    env = ToolUseEnv(tool="calculator", max_turns=4)
    prompt, info = env.reset(11)
    assert (prompt, info) == env.reset(11)
    assert "<tool>" in prompt and "<answer>" in prompt
    observation, reward, done, step_info = env.step(f"I'll compute <tool>{info['expression']}</tool>")
    assert (observation, reward, done) == (f"<result>{info['expected']}</result>", 0.0, False)
    assert step_info["turn"] == 1
    observation, reward, done, step_info = env.step("no tags at all")
    assert observation.startswith("<result>error") and not done
    _, reward, done, step_info = env.step(f"<answer>{info['expected']}</answer>")
    assert (reward, done, step_info["outcome"]) == (1.0, True, "correct")

    env.reset(11)
    _, reward, done, step_info = env.step(f"<answer>{info['expected'] + 1}</answer><tool>1</tool>")
    assert (reward, done, step_info["outcome"]) == (0.0, True, "wrong answer")


def test_tool_env_runs_out_of_turns():
    env = ToolUseEnv(tool="calculator", max_turns=2)
    _, info = env.reset(3)
    assert env.step("<tool>1+1</tool>")[2] is False
    observation, reward, done, step_info = env.step(f"<tool>{info['expression']}</tool>")
    assert (reward, done, step_info["outcome"]) == (0.0, True, "out of turns")


def test_tool_env_with_python_tool():
    env = ToolUseEnv(tool="python", max_turns=3)
    prompt, info = env.reset(5)
    # Only what the code prints comes back: the prompt says to print the integer, with an example.
    assert "must print the result as an integer" in prompt
    example = prompt.split("<tool>")[2].split("</tool>")[0]
    assert env.step(f"<tool>{example}</tool>")[0] == "<result>168\n</result>"
    env.reset(5)
    observation, _, done, _ = env.step(f"<tool>print(int({info['expression']}))</tool>")
    assert observation == f"<result>{info['expected']}\n</result>" and not done
    assert env.step(f"<answer>{info['expected']}</answer>")[1] == 1.0


def test_sandbox_limits(monkeypatch):
    monkeypatch.setenv("QWEN_JAX_SANDBOX_SECRET", "s3cret")
    ok = run_python("import os, sys\nprint(os.getcwd()); print(os.listdir('.'))\n"
                    "print(sorted(os.environ)); print(sys.flags.isolated)")
    cwd, listing, env_names, isolated = ok.stdout.splitlines()
    assert (ok.exit_code, ok.timed_out, ok.truncated) == (0, False, False)
    assert listing == "[]" and isolated == "1" and not os.path.exists(cwd)
    assert "QWEN_JAX_SANDBOX_SECRET" not in env_names and "PATH" not in env_names

    assert run_python("raise SystemExit(7)").exit_code == 7
    failed = run_python("1/0")
    assert failed.exit_code == 1 and "ZeroDivisionError" in failed.stderr

    start = time.monotonic()
    hung = run_python("while True:\n    pass", timeout_s=0.5)
    assert hung.timed_out and hung.exit_code == -9 and time.monotonic() - start < 3.0

    memory = run_python("x = bytearray(512 << 20)\nprint('allocated')", memory_mb=128)
    assert memory.exit_code != 0 and "MemoryError" in memory.stderr
    assert "allocated" not in memory.stdout

    loud = run_python("print('x' * 100000)", max_output_bytes=1000)
    assert loud.truncated and loud.stdout == "x" * 1000 and loud.exit_code == 0

    if ok.network_isolated:  # an empty network namespace has only the loopback interface
        interfaces = run_python("import socket; print([n for _, n in socket.if_nameindex()])")
        assert interfaces.stdout.strip() == "['lo']"


# -- JAX env -------------------------------------------------------------------------------------


def test_jax_env_batches_match_single_instances():
    env = ReverseTokensEnv(symbol_ids=(5, 9, 17, 33), length=8)
    keys = jax.random.split(jax.random.key(0), 4096)
    states, obs = env.batch_reset(keys)
    assert obs.shape == (4096, 8) and obs.dtype == jnp.int32
    obs = np.asarray(obs)
    assert set(np.unique(obs)) <= {5, 9, 17, 33}

    perfect = obs[:, ::-1]
    _, next_obs, reward, done = env.batch_step(states, perfect)
    assert reward.shape == (4096,) and reward.dtype == jnp.float32 and np.all(np.asarray(done))
    assert np.all(np.asarray(reward) == 1.0) and np.array_equal(np.asarray(next_obs), obs)

    # k wrong positions (token 0 is no symbol) score exactly (8 - k) / 8.
    wrong = np.arange(4096) % 9
    partial = np.where(np.arange(8)[None, :] < wrong[:, None], 0, perfect)
    _, _, reward, _ = env.batch_step(states, partial)
    np.testing.assert_array_equal(np.asarray(reward), (8 - wrong) / 8)

    for i in (0, 1, 4095):
        state, single_obs = env.reset(keys[i])
        np.testing.assert_array_equal(np.asarray(single_obs), obs[i])
        _, _, single_reward, _ = env.step(state, partial[i])
        assert float(single_reward) == float(reward[i])
    with pytest.raises(ValueError, match="length=8"):
        env.batch_step(states, perfect[:, :4])


def test_jax_env_adapter_runs_in_the_pool():
    adapter = as_env(ReverseTokensEnv(symbol_ids=(5, 6, 7), length=4))
    obs, _ = adapter.reset(3)
    assert obs == adapter.reset(3)[0] and len(obs) == 4
    assert adapter.step(obs[::-1])[1:3] == (1.0, True)

    kwargs = {"symbol_ids": (5, 6, 7), "length": 4}
    with EnvPool("reverse_tokens", 8, env_kwargs=kwargs, timeout_s=30.0) as pool:
        first = pool.reset(list(range(8)))
        actions = {slot: r.observation[::-1] for slot, r in enumerate(first)}
        actions[0] = [0, 0, 0, 0]
        results = pool.step(actions)
        assert results[0].reward == 0.0 and all(results[s].reward == 1.0 for s in range(1, 8))


def test_tool_env_takes_qwen_style_json_tool_calls():
    """call_format="json": `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the tool described
    by `env.tools`, its bare output back (a chat template wraps it as a tool response)."""
    from qwen_jax.rl.envs.tools import tool_schema

    env = ToolUseEnv(tool="calculator", max_turns=6, call_format="json")
    assert env.tools == [tool_schema("calculator")] and ToolUseEnv().tools == []
    prompt, info = env.reset(11)
    assert "call the calculator tool" in prompt and "<tool>" not in prompt
    call = {"name": "calculator", "arguments": {"expression": info["expression"]}}
    assert env.step(f"<tool_call>\n{json.dumps(call)}\n</tool_call>")[:3] == (str(info["expected"]), 0.0, False)
    # Arguments written as a JSON string, as some models do.
    call["arguments"] = json.dumps(call["arguments"])
    assert env.step(f"<tool_call>{json.dumps(call)}</tool_call>")[0] == str(info["expected"])
    assert env.step("<tool_call>{not json</tool_call>")[0].startswith("error: the tool call is not JSON")
    assert env.step('<tool_call>{"name": "python", "arguments": {}}</tool_call>')[0] == (
        "error: call the tool named 'calculator'")
    assert env.step('<tool>1+1</tool>')[0] == "error: write <tool_call>...</tool_call> or <answer>...</answer>"
    _, reward, done, step_info = env.step(f"<answer>{info['expected']}</answer>")
    assert (reward, done, step_info["outcome"]) == (1.0, True, "correct")
    python = ToolUseEnv(tool="python", call_format="json")
    python.reset(5)
    assert python.step('<tool_call>{"name": "python", "arguments": {"code": "print(6*7)"}}</tool_call>')[0] == "42\n"
    with pytest.raises(ConfigError, match="call_format must be one of"):
        ToolUseEnv(call_format="xml")


def test_tool_env_demonstrations_are_winning_replies():
    """The warm-up trains on `env.demonstration`: an answer in its tags, which ends the episode with
    full reward (a bare " 1234" would only cost a turn)."""
    from qwen_jax.rl.warmup import demonstrations

    env = ToolUseEnv()
    (prompt, reply), = demonstrations(env, [7])
    assert prompt == env.reset(7)[0]
    assert env.step(reply)[1:3] == (1.0, True)
