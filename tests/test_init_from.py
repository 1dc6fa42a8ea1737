"""`init_from` for RL and pretraining: a run starts from an HF directory's (or a checkpoint step's)
params and takes its tokenizer, including one shaped like Qwen's own (no pad token, `<|im_end|>`);
RL prompts and environment replies in a chat model's markup."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from qwen_jax import Qwen35ForCausalLM, load_hf, save_hf
from qwen_jax.config import ConfigError
from qwen_jax.data.tokenizer import load_or_train_tokenizer, pad_id, stop_ids
from qwen_jax.experiment import load_config, model_config
from qwen_jax.rl.envs import EnvPool, make_env
from qwen_jax.rl.loop import RLConfig, run_rl
from qwen_jax.rl.rollout import play_episodes
from qwen_jax.rl.warmup import demonstrations
from qwen_jax.train.loop import run_training
from test_rl_loop import params_at

CHAT_TEMPLATE = Path(__file__).parent / "data" / "qwen_like_chat_template.jinja"
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen's order; it has no <|pad|>
RL_OVERRIDES = ["wandb.mode=disabled", "model.hidden_size=64", "model.intermediate_size=128",
                "model.num_hidden_layers=2", "rl.warmup_steps=0", "rl.groups=2", "rl.group_size=8",
                "rl.max_new_tokens=3", "rl.max_length=24", "rl.eval_prompts=4", "rl.steps=1",
                # Updates of about 1e-30: the saved params equal the start's (to 1e-12, as asserted).
                "rl.lr=1e-30"]


def qwen_like_tokenizer(texts, vocab_size) -> Tokenizer:
    """Byte-level BPE with Qwen's special tokens (no `<|pad|>`)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tokenizer


@pytest.fixture(scope="module")
def hf_policy(tmp_path_factory):
    """An HF directory: a random policy of rl_tiny's shape (seed 7, not the run's 0) and its tokenizer."""
    directory = tmp_path_factory.mktemp("hf_policy")
    config = load_config("configs/rl_tiny.py", RL_OVERRIDES)
    model = Qwen35ForCausalLM(model_config(config), rngs=nnx.Rngs(7))
    save_hf(model, directory)
    texts = [prompt + answer for prompt, answer in demonstrations(make_env("arithmetic"), range(500))]
    qwen_like_tokenizer(texts, config.model.vocab_size).save(str(directory / "tokenizer.json"))
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE.read_text())
    return directory, nnx.to_pure_dict(nnx.state(model, nnx.Param))


def assert_params_equal(got, want):
    for (key, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12,
                                   err_msg=jax.tree_util.keystr(key))


def test_qwen_like_tokenizer_pads_with_end_of_text_and_stops_at_im_end(hf_policy):
    tokenizer = Tokenizer.from_file(str(hf_policy[0] / "tokenizer.json"))
    assert pad_id(tokenizer) == tokenizer.token_to_id("<|endoftext|>") == 0
    assert stop_ids(tokenizer) == [tokenizer.token_to_id("<|im_end|>"), 0] == [2, 0]


@pytest.mark.slow
def test_rl_starts_from_an_hf_directory_then_from_a_checkpoint_step(hf_policy, tmp_path):
    directory, params = hf_policy
    first, second = tmp_path / "from_hf", tmp_path / "from_checkpoint"
    rows = run_rl(load_config("configs/rl_tiny.py", RL_OVERRIDES + [f"init_from={directory}"]), first)
    assert np.isfinite(rows[0]["actor/pg_loss"]) and rows[0]["actor/logprob_mismatch"] < 1e-4
    assert_params_equal(params_at(first, 1), params)
    assert (first / "tokenizer.json").read_text() == (directory / "tokenizer.json").read_text()
    # A checkpoint step of that run: its params (not its optimizer state), its run's tokenizer and the
    # chat template the run kept, whose ChatML turns the prompts take.
    run_rl(load_config("configs/rl_tiny.py", RL_OVERRIDES + [
        f"init_from={first / 'checkpoints' / '1'}", "rl.chat_template=init_from", "rl.max_length=40"]), second)
    assert_params_equal(params_at(second, 1), params)
    assert (second / "tokenizer.json").read_text() == (directory / "tokenizer.json").read_text()
    assert (first / "chat_template.jinja").read_text() == CHAT_TEMPLATE.read_text()
    rl = json.loads((second / "config.json").read_text())["rl"]
    assert (rl["prompt_format"], rl["reply_format"]) == CHAT


@pytest.mark.slow
def test_pretraining_from_an_hf_directory_takes_its_tokenizer(tmp_path):
    overrides = ["wandb.mode=disabled", "train.steps=1", "train.eval_every=1", "train.batch_size=8",
                 "train.seq_len=64", "model.vocab_size=512"]
    config = load_config("configs/pretrain_tiny.py", overrides)
    source = tmp_path / "hf"
    save_hf(Qwen35ForCausalLM(model_config(config), rngs=nnx.Rngs(7)), source)
    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n"] * 50
    qwen_like_tokenizer(texts, 512).save(str(source / "tokenizer.json"))
    config = load_config("configs/pretrain_tiny.py", overrides + [f"init_from={source}"])
    rows = run_training(config, tmp_path / "run")
    assert np.isfinite(rows[-1]["learning/loss"])
    assert (tmp_path / "run" / "tokenizer.json").read_text() == (source / "tokenizer.json").read_text()


def test_a_tokenizer_that_does_not_fit_the_run_is_named(hf_policy, tmp_path):
    source = hf_policy[0] / "tokenizer.json"
    with pytest.raises(ConfigError, match=r"tokenizer.json has 384 token ids, more than model.vocab_size 300"):
        load_or_train_tokenizer(tmp_path / "a.json", [], 300, source=source)
    with pytest.raises(ConfigError, match=r"has no \['<\|image_pad\|>'\] token"):
        load_or_train_tokenizer(tmp_path / "b.json", [], 384, ("<|image_pad|>",), source=source)
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()


def test_init_from_with_a_parameter_of_another_shape_is_named(hf_policy, tmp_path):
    from qwen_jax.interop.init_from import load_init_params
    from qwen_jax.train.step import abstract_params

    wider = model_config(load_config("configs/rl_tiny.py", RL_OVERRIDES + ["model.hidden_size=128"]))
    with pytest.raises(ConfigError, match=r"init_from .*hf_policy.*: parameter .* has shape .*expects"):
        load_init_params(hf_policy[0], abstract_params(wider)[1], "float32")
    with pytest.raises(ConfigError, match=r"init_from='.*nowhere' is neither an HF directory"):
        load_init_params(tmp_path / "nowhere", abstract_params(wider)[1], "float32")


def test_the_0_8b_rl_config_resolves_and_its_episodes_fit():
    from qwen_jax.rl.loop import rl_config

    from qwen_jax.data.chat import chat_formats

    config = load_config("configs/rl_0_8b.py")
    rl, model = rl_config(config), model_config(config)
    assert model.vocab_size == 248320 and rl.warmup_steps == 0 and rl.chat_template == "init_from"
    # The prompt as a template shaped like Qwen's writes it, with the config's kwargs (no thinking).
    prompt_format, _ = chat_formats(CHAT_TEMPLATE.read_text(), "<|im_end|>", **rl.chat_template_kwargs)
    assert prompt_format.endswith("<think>\n\n</think>\n\n")
    env = make_env(rl.env, **rl.env_kwargs)
    longest = max(len(prompt_format.format(observation=env.reset(seed)[0]).encode())
                  for seed in range(200))  # byte-level BPE: at most one id a byte
    assert rl.max_length >= longest + rl.max_new_tokens, (longest, rl.max_length)


CHAT = ("<|im_start|>user\n{observation}<|im_end|>\n<|im_start|>assistant\n",
        "\n<|im_start|>user\n{observation}<|im_end|>\n<|im_start|>assistant\n")


class TwoTurnEnv:
    """A task, then one reply from the environment, then done."""

    def reset(self, seed):
        self.seed = seed
        return f"What is {seed}+1?", {}

    def step(self, action):
        if not hasattr(self, "replied"):
            self.replied = True
            return "Try again.", 0.0, False, {}
        return "", 1.0, True, {}


def test_prompts_and_replies_go_through_the_chat_formats(hf_policy):
    directory, _ = hf_policy
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    with EnvPool(TwoTurnEnv, 4) as pool:
        episodes = play_episodes(load_hf(directory), tokenizer, pool, [3, 4, 5, 6], max_new_tokens=3,
                                 max_turns=2, max_length=64, temperature=1.0, sample_seed=0,
                                 stop_ids=stop_ids(tokenizer), pad_id=pad_id(tokenizer), formats=CHAT)
    end_of_turn, closed = tokenizer.token_to_id("<|im_end|>"), 0
    for row, seed in enumerate([3, 4, 5, 6]):
        given = episodes.tokens[row][(episodes.segment_ids[row] == 1) & (episodes.loss_mask[row] == 0)]
        prompt = tokenizer.encode(CHAT[0].format(observation=f"What is {seed}+1?")).ids
        replied = np.flatnonzero(episodes.loss_mask[row])
        first_reply_end = replied[np.flatnonzero(np.diff(replied) > 1)[0]]
        # A first reply cut at max_new_tokens is closed by <|im_end|> (not sampled) before the next turn.
        closing = [] if episodes.tokens[row, first_reply_end] in stop_ids(tokenizer) else [end_of_turn]
        closed += len(closing)
        assert given.tolist() == prompt + closing + tokenizer.encode(CHAT[1].format(observation="Try again.")).ids
        assert tokenizer.token_to_id("<|im_start|>") in prompt  # the markup's special tokens, as tokens
    assert closed > 0


@pytest.mark.parametrize("form", ["{obs}", "{observation} {0}", "no placeholder", "{observation"])
def test_a_format_without_its_placeholder_is_named(form):
    with pytest.raises(ConfigError, match=r"rl.prompt_format"):
        RLConfig(prompt_format=form)


def test_the_0_8b_tool_use_config_resolves_and_its_episodes_fit():
    """Four turns of the longest replies, the first three followed by a calculator's result (in the
    template's tool-response turn), fit after the prompt with its tool listing."""
    from qwen_jax.data.chat import chat_formats
    from qwen_jax.rl.loop import rl_config

    rl = rl_config(load_config("configs/rl_tools_0_8b.py"))
    env = make_env(rl.env, **rl.env_kwargs)
    prompt_format, reply_format = chat_formats(CHAT_TEMPLATE.read_text(), "<|im_end|>", None, rl.chat_reply_role,
                                               tools=env.tools, **rl.chat_template_kwargs)
    assert "<tool_response>" in reply_format and '"name": "calculator"' in prompt_format
    longest = max(len(prompt_format.format(observation=env.reset(seed)[0]).encode()) for seed in range(200))
    result = len(reply_format.format(observation="9" * 64).encode())  # a number or a short error
    assert rl.max_length >= longest + rl.max_turns * rl.max_new_tokens + (rl.max_turns - 1) * result, longest


def test_visible_reply_is_what_follows_the_reasoning():
    from qwen_jax.rl.rollout import visible_reply

    assert visible_reply("<think>\nadd them\n</think>\n\n42", opened=False) == "42"
    assert visible_reply("add them\n</think>\n\n42", opened=True) == "42"  # the prompt opened the block
    assert visible_reply("still thinking about 42", opened=True) == ""  # never closed: no answer
    assert visible_reply("<think>still thinking about 42", opened=False) == ""
    assert visible_reply("42", opened=False) == "42"  # no reasoning at all


class ThinkingReplies:
    """A tokenizer whose every decoded reply is a think block, then the answer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text):
        return self.tokenizer.encode(text)

    def decode(self, ids, **kwargs):
        return "<think>\nit is 1 more\n</think>\n\n7"


ACTIONS = []


class RecordingEnv(TwoTurnEnv):
    def step(self, action):
        ACTIONS.append(action)
        return super().step(action)


@pytest.mark.parametrize("hide_thinking, seen", [(True, "7"), (False, "<think>\nit is 1 more\n</think>\n\n7")])
def test_hide_thinking_shows_the_environment_the_answer_only(hf_policy, hide_thinking, seen):
    directory, _ = hf_policy
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    ACTIONS.clear()
    with EnvPool(RecordingEnv, 2) as pool:
        episodes = play_episodes(load_hf(directory), ThinkingReplies(tokenizer), pool, [3, 4], max_new_tokens=3,
                                 max_turns=2, max_length=64, temperature=1.0, sample_seed=0,
                                 stop_ids=stop_ids(tokenizer), pad_id=pad_id(tokenizer), formats=CHAT,
                                 hide_thinking=hide_thinking)
    assert ACTIONS == [seen] * 4 and episodes.loss_mask.sum() > 0  # two turns of two episodes


@pytest.mark.slow
def test_fine_tuning_an_hf_checkpoint_on_chat_data_in_its_own_template(hf_policy, tmp_path):
    """configs/sft_0_8b.py's path: init_from an HF directory, data.chat_template=init_from."""
    directory, _ = hf_policy
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"What is {a}+{b}?"},
                                                        {"role": "assistant", "content": str(a + b)}]})
                               for a in range(10) for b in range(10)) + "\n")
    config = load_config("configs/sft_tiny.py", [
        "wandb.mode=disabled", "model.vocab_size=384", "model.hidden_size=64", "model.intermediate_size=128",
        "model.num_hidden_layers=2", "train.steps=2", "train.eval_every=2", "train.eval_batches=1",
        "train.batch_size=8", "train.seq_len=64", f"init_from={directory}", "data.chat_template=init_from",
        f"data.chat_sources=['{chats}']", "data.chat_template_kwargs={'enable_thinking': False}"])
    rows = run_training(config, tmp_path / "run")
    assert 0 < rows[-1]["eval/loss"] < 20 and rows[-1]["learning/loss"] > 0
    assert not any(key.startswith("data/skipped/") for key in rows[-1])
    assert (tmp_path / "run" / "chat_template.jinja").read_text() == CHAT_TEMPLATE.read_text()
    assert (tmp_path / "run" / "tokenizer.json").read_text() == (directory / "tokenizer.json").read_text()
