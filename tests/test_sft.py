"""Chat data for supervised fine-tuning: the tokens learned are exactly the assistant's (transformers'
`{% generation %}` mask is the oracle), rows hold whole conversations, bad records are counted, the
stream resumes exactly and splits over hosts, and a fine-tuning run resumes bitwise."""

import json

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from qwen_jax.config import ConfigError
from qwen_jax.data.chat import load_chat_template
from qwen_jax.data.chat_stream import ChatStream, chat_eval_batches, chat_records
from qwen_jax.data.conversations import (CHATML_TEMPLATE, ChatRenderer, TokenizeConversation, chat_renderer,
                                         is_held_out_conversation, parse_conversation,
                                         python_help_conversations)
from qwen_jax.data.records import Skip
from qwen_jax.data.sources import HELD_OUT_FRACTION
from qwen_jax.data.tokenizer import pad_id, train_bpe_tokenizer
from qwen_jax.experiment import load_config
from qwen_jax.rl.loop import run_rl
from qwen_jax.train.loop import run_training
from resume_check import assert_resume_from_step_2_repeats_the_run

SEQ_LEN = 96
# ChatML with transformers' generation markers: HF's assistant mask covers what they enclose.
CHATML_WITH_GENERATION = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.role == 'assistant' %}{% generation %}{{- (message.content or '') + '<|im_end|>' }}"
    "{% endgeneration %}{%- else %}{{- message.content + '<|im_end|>' }}{%- endif %}{{- '\\n' }}{%- endfor %}")
WORDS = ["alpha", "beta", "gamma", "delta", "list", "dict", "sort", "key", "value", "return"]


def conversation(i: int) -> dict:
    """Conversation i: 1 to 3 exchanges of a few words, every third with a system turn."""
    words = lambda n: " ".join(WORDS[(i * 3 + j * 7) % len(WORDS)] for j in range(n))  # noqa: E731
    messages = [{"role": "system", "content": "be brief"}] if i % 3 == 0 else []
    for turn in range(1 + i % 3):
        messages += [{"role": "user", "content": f"q{i}.{turn} {words(2 + i % 4)}?"},
                     {"role": "assistant", "content": words(3 + (i + turn) % 9)}]
    return {"messages": messages, "tools": None}


@pytest.fixture(scope="module")
def tokenizer():
    texts = [CHATML_TEMPLATE] + [json.dumps(conversation(i)) for i in range(60)]
    return train_bpe_tokenizer(texts, 400)


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """A JSONL file of 200 conversations with bad and blank lines among them; the good ones in order."""
    good = [conversation(i) for i in range(200)]
    bad = [b"{not json", json.dumps({"turns": []}).encode(), json.dumps({"messages": [{"content": "x"}]}).encode(),
           json.dumps({"messages": [{"role": "user", "content": "no reply"}]}).encode(),
           json.dumps({"messages": [{"role": "assistant", "content": " ".join(WORDS * 20)}]}).encode()]
    lines = [json.dumps(chat).encode() for chat in good]
    lines[10:10] = bad[:3] + [b""] + bad[3:]
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path), good


def tokenize(tokenizer, template=CHATML_TEMPLATE, **kwargs):
    return TokenizeConversation(tokenizer, ChatRenderer(template), seq_len=SEQ_LEN, **kwargs)


def test_the_learned_tokens_are_transformers_assistant_mask(tokenizer):
    reference = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    reference.chat_template = CHATML_WITH_GENERATION
    cases = [conversation(i) for i in range(6)] + [
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},  # empty reply
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "AZ alpha\n"}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Zeta A"}]}]
    for case in cases:
        want = reference.apply_chat_template(case["messages"], tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
        ids, trained = tokenize(tokenizer)({"tools": None, **case})
        assert ids.tolist() == want["input_ids"]
        assert trained.astype(int).tolist() == want["assistant_masks"], case
        assert trained.sum() > 0


def test_qwen_template_learns_reasoning_tool_calls_and_each_end_of_turn(tokenizer):
    template, special = load_chat_template("tests/data/qwen_like_chat_template.jinja", "test")
    chat = {"tools": [{"type": "function", "function": {"name": "add"}}], "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "add 2 and 3"},
        {"role": "assistant", "content": "<think>\nuse the tool\n</think>\n\ncalling",
         "tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "<think>\nit said 5\n</think>\n\nIt is 5."}]}
    ids, trained = TokenizeConversation(tokenizer, ChatRenderer(template, special), seq_len=400)(chat)
    learned = tokenizer.decode(ids[trained].tolist(), skip_special_tokens=False)
    call = '\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    # The last turn's "<think>\n" is the generation prompt's in thinking mode, not the model's to write.
    assert learned == ("<think>\nuse the tool\n</think>\n\ncalling" + call + "<|im_end|>"
                       + "it said 5\n</think>\n\nIt is 5.<|im_end|>")
    everything = TokenizeConversation(tokenizer, ChatRenderer(template, special), seq_len=400, loss_on="all")
    assert everything(chat)[1].all()


def test_a_pretraining_tokenizer_serves_chat_data():
    """Tokenizers trained here hold ChatML's tokens whatever they were trained on, so a pretraining
    run's checkpoint can be fine-tuned on conversations."""
    plain = train_bpe_tokenizer([" ".join(WORDS)] * 20, 300)
    assert [plain.token_to_id(token) for token in ("<|im_start|>", "<|im_end|>")] == [2, 3]
    tokenize(plain).check()


def test_templates_and_options_that_cannot_work_are_named(tokenizer, tmp_path):
    plain = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    with pytest.raises(ConfigError, match="does not end an assistant turn with a special token"):
        tokenize(tokenizer, plain).check()
    with pytest.raises(ConfigError, match="cannot render a user turn and a reply"):
        tokenize(tokenizer, "{{ raise_exception('no') }}").check()
    tokenize(tokenizer).check()
    tokenize(tokenizer, loss_on="all").check()
    with pytest.raises(ConfigError, match="data.chat_loss is 'prompts'"):
        tokenize(tokenizer, loss_on="prompts")
    with pytest.raises(ConfigError, match="'init_from' takes the template of init_from, which is not set"):
        chat_renderer("init_from", None, {})
    with pytest.raises(ConfigError, match="holds no chat template"):
        chat_renderer(str(tmp_path), None, {})
    with pytest.raises(Skip, match="more than train.seq_len 96") as too_long:
        tokenize(tokenizer)({"messages": [{"role": "assistant", "content": "alpha " * 100}]})
    assert too_long.value.reason == "too_long"


def batches(stream, count):
    return [next(stream) for _ in range(count)]


def test_rows_hold_whole_conversations_and_learn_only_the_assistant_tokens(chats, tokenizer):
    path, good = chats
    tokenize_chat = tokenize(tokenizer)
    train = [tokenize_chat(chat) for chat in good if not is_held_out_conversation(chat, HELD_OUT_FRACTION)]
    index_of = {ids.tobytes(): index for index, (ids, _) in enumerate(train)}
    stream = ChatStream(chat_records([path]), tokenize_chat, pad=pad_id(tokenizer),
                        global_batch_size=4, seed=None)
    seen = []
    for batch in batches(stream, 6):
        for row in range(4):
            segments = batch["segment_ids"][row]
            for segment in range(1, segments.max() + 1):
                where = np.flatnonzero(segments == segment)
                assert (np.diff(where) == 1).all()  # contiguous
                seen.append(index_of[batch["input_ids"][row, where].tobytes()])
                # The loss at t predicts t + 1: counted exactly where that token is the assistant's.
                np.testing.assert_array_equal(batch["loss_mask"][row, where[:-1]], train[seen[-1]][1][1:])
                assert batch["loss_mask"][row, where[-1]] == 0
            assert (batch["loss_mask"][row][segments == 0] == 0).all()
    assert sorted(seen) == list(range(len(seen))) and len(seen) > 24  # each once, in corpus order by batch
    assert stream.get_state()["skipped"] == {"bad_field": 1, "bad_json": 1, "missing_field": 1,
                                             "no_assistant_turn": 1, "too_long": 1}


def test_resume_is_exact_and_hosts_read_every_other_record(chats, tokenizer):
    path, _ = chats
    def make(**hosts):
        return ChatStream(chat_records([path]), tokenize(tokenizer), pad=pad_id(tokenizer), global_batch_size=4,
                          seed=3, **hosts)
    stream = make()
    ahead = batches(stream, 40)  # past the end of the first epoch
    resumed = make()
    stream = make()
    for batch in ahead[:25]:
        assert next(stream)["input_ids"].tolist() == batch["input_ids"].tolist()
    resumed.set_state(json.loads(json.dumps(stream.get_state())))
    for batch in ahead[25:]:
        got = next(resumed)
        for key in batch:
            np.testing.assert_array_equal(got[key], batch[key])
    assert resumed.get_state()["skipped"]["bad_json"] == 2  # read once in each epoch
    first, second = make(process_index=0, process_count=2), make(process_index=1, process_count=2)
    rows = lambda stream: {tuple(row) for batch in batches(stream, 3) for row in batch["input_ids"]}  # noqa: E731
    assert not rows(first) & rows(second)
    assert first.get_state()["record"] > 0 and second.get_state()["record"] > 0


def test_a_strict_stream_names_the_bad_record(chats, tokenizer):
    path, _ = chats
    stream = ChatStream(chat_records([path]), tokenize(tokenizer), pad=pad_id(tokenizer),
                        global_batch_size=4, seed=None, strict=True)
    with pytest.raises(ValueError, match=r"chats.jsonl:11: bad_json"):
        batches(stream, 20)


def test_eval_batches_hold_the_held_out_conversations_and_split_over_hosts(chats, tokenizer):
    path, good = chats
    held_out = [chat for chat in good if is_held_out_conversation(chat, HELD_OUT_FRACTION)]
    assert held_out
    options = dict(pad=pad_id(tokenizer), batch_size=4, max_batches=2)
    both = chat_eval_batches(chat_records([path]), tokenize(tokenizer), **options)
    first_ids = tokenize(tokenizer)(held_out[0])[0]
    np.testing.assert_array_equal(both[0]["input_ids"][0, :len(first_ids)], first_ids)
    halves = [chat_eval_batches(chat_records([path]), tokenize(tokenizer), process_index=p, process_count=2,
                                **options) for p in (0, 1)]
    for whole, first, second in zip(both, *halves):
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])
    with pytest.raises(ConfigError, match="no usable conversation held out for eval"):
        chat_eval_batches(chat_records([path]), TokenizeConversation(tokenizer, ChatRenderer(CHATML_TEMPLATE),
                                                                     seq_len=8), **options)


def test_sharegpt_records_are_read_as_messages():
    record = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                                {"from": "gpt", "value": "hello"}]}
    assert parse_conversation(json.dumps(record).encode(), "x") == {"tools": None, "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}]}
    with pytest.raises(Skip, match="no 'messages' \\(or ShareGPT's 'conversations'\\)"):
        parse_conversation(b'{"turns": []}', "x")
    with pytest.raises(Skip, match=r"roles \['user'\]") as no_reply:
        parse_conversation(json.dumps({"conversations": [{"from": "human", "value": "hi"}]}).encode(), "x")
    assert no_reply.value.reason == "no_assistant_turn"


def test_built_in_conversations_are_docstring_questions_and_follow_ups():
    chats = python_help_conversations()
    assert len(chats) > 1000
    first = chats[0]["messages"]
    assert first[-4]["content"].startswith(("What does `", "Explain `", "Summarise", "How do I use `"))
    assert sum(len(chat["messages"]) >= 4 for chat in chats) > len(chats) // 2  # with a follow-up


@pytest.mark.slow
def test_a_fine_tuning_run_resumes_exactly_and_rl_goes_on_in_its_chat_template(chats, tmp_path, capsys):
    path, _ = chats
    config = load_config("configs/sft_tiny.py", [
        "wandb.mode=disabled", "train.steps=4", "train.eval_every=2", "train.eval_batches=1",
        "train.batch_size=8", f"train.seq_len={SEQ_LEN}", "model.vocab_size=400",
        "model.num_hidden_layers=2", "checkpoint.every_steps=2", f"data.chat_sources=['{path}']"])
    workdir = tmp_path / "run"
    rows = assert_resume_from_step_2_repeats_the_run(config, workdir, capsys)
    assert (workdir / "chat_template.jinja").read_text() == CHATML_TEMPLATE
    saved = json.loads((workdir / "checkpoints" / "4" / "data" / "metadata").read_text())["processes"][0]
    assert saved["record"] > 0 and np.isfinite(rows[-1]["eval/loss"])
    assert {key: value for key, value in rows[-1].items() if key.startswith("data/skipped/")} == {
        f"data/skipped/{reason}": count for reason, count in saved["skipped"].items()}
    # pretrain -> SFT -> RL: the policy plays its tasks in the ChatML turns it was fine-tuned on.
    rl_workdir = tmp_path / "rl"
    run_rl(load_config("configs/rl_tiny.py", [
        "wandb.mode=disabled", "model.vocab_size=400", "model.num_hidden_layers=2", "rl.warmup_steps=0",
        "rl.groups=2", "rl.group_size=4", "rl.max_new_tokens=3", "rl.max_length=48", "rl.eval_prompts=4",
        "rl.steps=1", f"init_from={workdir / 'checkpoints' / '4'}", "rl.chat_template=init_from"]), rl_workdir)
    formats = json.loads((rl_workdir / "config.json").read_text())["rl"]
    assert formats["prompt_format"] == "<|im_start|>user\n{observation}<|im_end|>\n<|im_start|>assistant\n"
    assert (rl_workdir / "tokenizer.json").read_text() == (workdir / "tokenizer.json").read_text()


def test_a_refused_template_is_not_kept_in_the_workdir(chats, tmp_path):
    path, _ = chats
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    config = load_config("configs/sft_tiny.py", [
        "wandb.mode=disabled", f"train.seq_len={SEQ_LEN}", "model.vocab_size=400",
        f"data.chat_sources=['{path}']", f"data.chat_template={plain}"])
    with pytest.raises(ConfigError, match="does not end an assistant turn with a special token"):
        run_training(config, tmp_path / "run")
    assert not (tmp_path / "run" / "chat_template.jinja").exists()
