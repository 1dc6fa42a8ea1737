"""DPO on preference pairs: the loss and its gradient equal the formula on full logits (packed pairs), a
pair's two sides go side by side and learn only what differs, bad records are counted, and a DPO run
from an SFT checkpoint resumes bitwise and moves the held-out pairs' preference."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax import Qwen35ForCausalLM, preset
from qwen_jax.config import ConfigError, TrainConfig
from qwen_jax.data.conversations import CHATML_TEMPLATE, ChatRenderer, TokenizeConversation
from qwen_jax.data.preferences import PairRows, TokenizePreference, parse_preference, python_help_preferences
from qwen_jax.data.records import Skip
from qwen_jax.data.tokenizer import train_bpe_tokenizer
from qwen_jax.experiment import load_config
from qwen_jax.train.loop import run_training
from qwen_jax.train.preference import dpo_loss_fn, pair_count
from resume_check import assert_resume_from_step_2_repeats_the_run

SEQ_LEN = 96
WORDS = "the list sorts its items in place a dict maps keys to values".split()


def pair(i: int) -> dict:
    """Pair i: a question, a chosen answer and a rejected one of other words."""
    words = lambda start, n: " ".join(WORDS[(start + j) % len(WORDS)] for j in range(n))  # noqa: E731
    return {"prompt": f"q{i} {words(i, 3)}?", "chosen": words(i + 1, 2 + i % 5), "rejected": words(i + 5, 3 + i % 3)}


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer([CHATML_TEMPLATE] + [json.dumps(pair(i)) for i in range(40)], 400)


# Each loss of a pair's margin h as its paper writes it (IPO's h from per-token means, as TRL takes it).
FORMULAS = {("sigmoid", 0.0): lambda h, beta: jax.nn.softplus(-beta * h),
            ("sigmoid", 0.2): lambda h, beta: (-0.8 * jax.nn.log_sigmoid(beta * h)
                                               - 0.2 * jax.nn.log_sigmoid(-beta * h)),
            ("ipo", 0.0): lambda h, beta: (h - 1 / (2 * beta)) ** 2,
            ("hinge", 0.0): lambda h, beta: jnp.maximum(0.0, 1 - beta * h)}


@pytest.mark.parametrize("variant", FORMULAS, ids=lambda variant: f"{variant[0]}-{variant[1]}")
def test_dpo_loss_and_gradient_equal_the_formula_on_full_logits(variant):
    loss_name, smoothing = variant
    config = preset("tiny", vocab_size=64, num_hidden_layers=2, dtype="float32")
    model = Qwen35ForCausalLM(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    batch_size, length = 4, 24
    # Row pair 0 packs two pairs (segments 1: 10 tokens, 2: 8), row pair 1 one pair and padding (segment 0).
    segments = np.zeros((batch_size, length), np.int32)
    segments[0:2, :10], segments[0:2, 10:18], segments[2:4, :14] = 1, 2, 1
    mask = (segments > 0) & (rng.random((batch_size, length)) < 0.7)
    batch = {"input_ids": rng.integers(0, 64, (batch_size, length)),
             "targets": rng.integers(0, 64, (batch_size, length)),
             "segment_ids": segments, "loss_mask": mask.astype(np.float32),
             "ref_logprobs": rng.normal(-4.0, 0.5, (batch_size, length)).astype(np.float32)}
    batch = {key: jnp.asarray(value) for key, value in batch.items()}
    # beta 3 puts one hinge pair past its kink (loss and gradient 0; at beta 0.3 all three are inside it)
    cfg = TrainConfig(batch_size=batch_size, seq_len=length, dpo_beta=3.0 if loss_name == "hinge" else 0.3,
                      ce_chunk=16, dpo_loss=loss_name, dpo_label_smoothing=smoothing)
    pairs = pair_count(batch)
    assert pairs == 3

    def formula(params):
        out = nnx.merge(graphdef, params)(batch["input_ids"], segment_ids=batch["segment_ids"])
        logits = out.hidden @ nnx.merge(graphdef, params).head_weight()
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], axis=-1)[..., 0]
        losses = []
        for rows, segment in (((0, 1), 1), ((0, 1), 2), ((2, 3), 1)):
            learned = [(segments[row] == segment) & mask[row] for row in rows]
            side = [jnp.sum(jnp.where(learned[i], lp[row] - batch["ref_logprobs"][row], 0))
                    for i, row in enumerate(rows)]
            if loss_name == "ipo":
                side = [side[i] / learned[i].sum() for i in range(2)]
            losses.append(FORMULAS[variant](side[0] - side[1], cfg.dpo_beta))
        return sum(losses) / 3

    ours = jax.jit(jax.value_and_grad(dpo_loss_fn, has_aux=True), static_argnums=(1, 3))
    (loss, parts), grads = ours(params, graphdef, batch, cfg, pairs)
    want_loss, want_grads = jax.jit(jax.value_and_grad(formula))(params)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(parts["ce"], want_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):  # rounding: on each leaf's scale
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5 * np.abs(want).max())
    assert 0 <= parts["dpo/accuracy"] <= 1


def test_dpo_loss_fields_are_checked():
    with pytest.raises(ConfigError, match=r"train.dpo_loss is 'kto'; choose one of \('sigmoid', 'ipo', 'hinge'\)"):
        TrainConfig(dpo_loss="kto")
    with pytest.raises(ConfigError, match="train.dpo_label_smoothing .* got 0.1 with 'ipo'"):
        TrainConfig(dpo_loss="ipo", dpo_label_smoothing=0.1)
    with pytest.raises(ConfigError, match="train.dpo_label_smoothing must be in"):
        TrainConfig(dpo_label_smoothing=0.5)


def test_a_pair_learns_only_what_its_sides_do_not_share_and_packs_side_by_side(tokenizer):
    tokenize = TokenizePreference(TokenizeConversation(tokenizer, ChatRenderer(CHATML_TEMPLATE), seq_len=SEQ_LEN))
    item = parse_preference(json.dumps(pair(3)), "pairs.jsonl:4")
    chosen, chosen_learned, rejected, rejected_learned = tokenize(item)
    shared = np.flatnonzero(chosen[:len(rejected)] != rejected[:len(chosen)])[0]
    assert not chosen_learned[:shared].any() and not rejected_learned[:shared].any()
    decoded = tokenizer.decode(chosen[chosen_learned].tolist(), skip_special_tokens=False)
    assert decoded.endswith("<|im_end|>") and "q3" not in decoded  # the answer (and its end), not the prompt
    assert pair(3)["chosen"].split()[-1] in decoded
    rows = PairRows(4, SEQ_LEN, pad=0)
    for i in range(5):
        if not rows.add(*tokenize(parse_preference(json.dumps(pair(i)), f"pairs.jsonl:{i + 1}"))):
            break
    batch = rows.batch()
    np.testing.assert_array_equal(np.unique(batch["segment_ids"][0]), np.unique(batch["segment_ids"][1]))
    assert batch["segment_ids"][0].max() > 1  # a row pair packs more than one pair
    counts = [np.sum(batch["loss_mask"][row]) for row in range(4)]
    assert all(count > 0 for count in counts)


def test_bad_preference_records_are_named():
    cases = {"{broken": "bad_json", json.dumps({"prompt": "q", "chosen": "a"}): "missing_field",
             json.dumps({"prompt": 3, "chosen": "a", "rejected": "b"}): "bad_field",
             json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}): "same_completion",
             json.dumps({"chosen": [{"role": "user", "content": "q"}],
                         "rejected": [{"role": "user", "content": "r"}]}): "no_assistant_turn"}
    for record, reason in cases.items():
        with pytest.raises(Skip) as raised:
            parse_preference(record, "pairs.jsonl:1")
        assert raised.value.reason == reason, record
    question = {"role": "user", "content": "q"}
    implicit = parse_preference(json.dumps({"chosen": [question, {"role": "assistant", "content": "a"}],
                                            "rejected": [question, {"role": "assistant", "content": "b"}]}), "x")
    assert implicit["chosen"]["messages"][0] == implicit["rejected"]["messages"][0]
    built_in = python_help_preferences()
    assert len(built_in) > 1000
    assert all(p["chosen"]["messages"][:-1] == p["rejected"]["messages"][:-1] for p in built_in)


def test_a_dpo_run_from_an_sft_checkpoint_resumes_exactly(tokenizer, tmp_path, capsys):
    pairs_file, chats_file = tmp_path / "pairs.jsonl", tmp_path / "chats.jsonl"
    lines = [json.dumps(pair(i)) if i % 10 else "{broken" for i in range(300)]  # the stream shuffles them
    pairs_file.write_text("\n".join(lines) + "\n")
    chats_file.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": pair(i)["prompt"]},
                                                             {"role": "assistant", "content": pair(i)["chosen"]}]})
                                    for i in range(300, 500)) + "\n")
    small = ["wandb.mode=disabled", "train.batch_size=8", f"train.seq_len={SEQ_LEN}", "model.vocab_size=400",
             "model.num_hidden_layers=2", "train.eval_batches=1"]
    sft = tmp_path / "sft"
    run_training(load_config("configs/sft_tiny.py", small + ["train.steps=2", "checkpoint.every_steps=2",
                                                             f"data.chat_sources=['{chats_file}']"]), sft)
    dpo = load_config("configs/dpo_tiny.py", small + [
        "train.steps=4", "train.eval_every=2", "checkpoint.every_steps=2", f"data.chat_sources=['{pairs_file}']",
        f"init_from={sft / 'checkpoints' / '2'}"])
    rows = assert_resume_from_step_2_repeats_the_run(dpo, tmp_path / "dpo", capsys)
    first = rows[0]
    assert first["dpo/accuracy"] == 0 and first["dpo/reward_margin"] == 0  # the policy starts as the reference
    np.testing.assert_allclose(first["learning/loss"], np.log(2), rtol=1e-5)
    assert rows[-1]["dpo/chosen_reward"] != 0 and 0 <= rows[-1]["eval/accuracy"] <= 1  # the policy moved
    assert rows[-1]["data/skipped/bad_json"] >= 1
    with pytest.raises(ConfigError, match="init_from must be set"):
        run_training(load_config("configs/dpo_tiny.py", small), tmp_path / "no_reference")
