"""Multi-turn tool use for a pretrained Qwen3.5-0.8B: word problems it solves by calling a calculator
in Qwen's own tool-call format, over up to 4 turns. Give its weights with --config.init_from=DIR;
its chat template lists the tool and wraps each result as a tool response.

    qwen-jax rl --config=configs/rl_tools_0_8b.py --workdir=runs/rl_tools_0_8b --config.init_from=/models/Qwen3.5-0.8B
"""

from pathlib import Path

from qwen_jax.experiment import load_config


def get_config():
    config = load_config(Path(__file__).with_name("rl_0_8b.py"))
    config.rl.env = "tool_use"
    config.rl.env_kwargs = {"tool": "calculator", "max_turns": 4, "call_format": "json"}
    config.rl.chat_reply_role = "tool"
    config.rl.max_turns = 4
    config.rl.max_new_tokens = 256  # a turn: a short thought and a call, or the answer
    config.rl.max_length = 2304  # the tool listing and task (<= 640 bytes), 4 turns, 3 results
    return config
