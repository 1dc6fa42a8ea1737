"""Chat templates render as transformers renders them (its apply_chat_template is the oracle), are
found where HF keeps them, and give RL its prompt and reply formats."""

import json

import jinja2
import pytest

from qwen_jax.config import ConfigError
from qwen_jax.data.chat import chat_formats, find_chat_template, render_chat
from test_init_from import CHAT, CHAT_TEMPLATE, qwen_like_tokenizer

TEMPLATE = CHAT_TEMPLATE.read_text()
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Adds <a> & <b>",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]
CONVERSATIONS = {
    "one question": [{"role": "user", "content": "What is 2+2?"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "reasoning in history": [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nfour"},
        {"role": "user", "content": "Q2 {with braces}"},
        {"role": "assistant", "content": "five", "reasoning_content": "count"}],
    "tool calls": [
        {"role": "user", "content": "Add 1 and 2"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]},
        {"role": "tool", "content": "3"}, {"role": "tool", "content": "ok"}],
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=qwen_like_tokenizer(["hello world"] * 10, 300),
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"enable_thinking": True, "tools": TOOLS}],
                         ids=["default", "no thinking", "thinking with tools"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_as_transformers_does(hf_tokenizer, name, kwargs, add_generation_prompt):
    messages = CONVERSATIONS[name]
    want = hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=add_generation_prompt, **kwargs)
    got = render_chat(TEMPLATE, messages, add_generation_prompt=add_generation_prompt,
                      special_tokens={"eos_token": "<|im_end|>"}, **kwargs)
    assert got == want


def test_a_template_error_is_raised_as_the_template_words_it():
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role robot"):
        render_chat(TEMPLATE, [{"role": "robot", "content": "beep"}], add_generation_prompt=True)


def test_found_where_hf_keeps_it(tmp_path):
    assert find_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
        "eos_token": {"content": "<|im_end|>", "lstrip": False}, "pad_token": "<|endoftext|>",
        "bos_token": None}))
    assert find_chat_template(tmp_path) == ("D", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)  # the file wins over the config's field
    assert find_chat_template(tmp_path)[0] == TEMPLATE


def test_rl_formats_from_the_template():
    """The ChatML formats configs/rl_0_8b.py writes by hand; with thinking off, the empty think block."""
    assert chat_formats(TEMPLATE, "<|im_end|>") == CHAT
    prompt, reply = chat_formats(TEMPLATE, "<|im_end|>", enable_thinking=False)
    assert prompt == CHAT[0] + "<think>\n\n</think>\n\n" and reply == CHAT[1] + "<think>\n\n</think>\n\n"
    # Braces the template writes stay text: the formats take {observation} alone.
    braces = "{{ '{' }}{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}"
    assert chat_formats(braces, "<|im_end|>")[0].format(observation="x") == "{x<|im_end|>"
    with pytest.raises(ConfigError, match=r"ends an assistant turn with '</s>.*not with the stop token '<\|im_end\|>'"):
        chat_formats(TEMPLATE.replace("<|im_end|>", "</s>"), "<|im_end|>")


def test_block_whitespace_and_loop_controls_as_transformers_do(hf_tokenizer):
    """Tags without `-`: trim_blocks drops the newline after a tag, lstrip_blocks the indent before it."""
    template = ("{% for m in messages %}\n    {% if m.role == 'system' %}\n        {% continue %}\n    {% endif %}\n"
                "{{ m.role }}: {{ m.content }}\n    {% generation %}[{{ loop.index }}]{% endgeneration %}\n"
                "{% endfor %}\n{% if add_generation_prompt %}assistant:{% endif %}")
    messages = CONVERSATIONS["system"]
    want = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                            add_generation_prompt=True)
    assert render_chat(template, messages, add_generation_prompt=True) == want == "user: Hi\n[2]assistant:"


def test_an_rl_config_takes_its_formats_from_a_template(tmp_path):
    from qwen_jax.rl.loop import RLConfig, with_chat_formats

    tokenizer = qwen_like_tokenizer(["hello world"] * 10, 300)  # its first stop id is <|im_end|>
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    for source, init_from in ((str(tmp_path / "chat.jinja"), ""), (str(hf_dir), ""), ("init_from", str(hf_dir))):
        rl = with_chat_formats(RLConfig(chat_template=source), init_from, tokenizer)
        assert (rl.prompt_format, rl.reply_format, rl.chat_template) == (*CHAT, "")
    with pytest.raises(ConfigError, match="rl.chat_template='init_from' takes the template of init_from, which is not set"):
        with_chat_formats(RLConfig(chat_template="init_from"), "", tokenizer)
    with pytest.raises(ConfigError, match=r"rl.chat_template='.*nowhere': .*nowhere holds no chat template"):
        with_chat_formats(RLConfig(chat_template=str(tmp_path / "nowhere")), "", tokenizer)
    with pytest.raises(ConfigError, match="set rl.chat_template or rl.prompt_format / rl.reply_format, not both"):
        RLConfig(chat_template="init_from", prompt_format=CHAT[0])
    # A tool's results come back as a tool turn, which this template wraps in a user turn.
    rl = with_chat_formats(RLConfig(chat_template="init_from", chat_reply_role="tool"), str(hf_dir), tokenizer)
    assert rl.reply_format == ("\n<|im_start|>user\n<tool_response>\n{observation}\n</tool_response><|im_end|>\n"
                               "<|im_start|>assistant\n")
    with pytest.raises(ConfigError, match=r"rl.chat_reply_role is 'system'; choose one of \('user', 'tool'\)"):
        RLConfig(chat_reply_role="system")


def test_an_environment_s_tools_reach_the_template(tmp_path):
    """tool_use with Qwen-style calls: the template lists the calculator's schema in the system turn,
    whose JSON braces stay text in the format; the environment's results come back as tool turns."""
    from qwen_jax.rl.envs.tools import ToolUseEnv
    from qwen_jax.rl.loop import RLConfig, with_chat_formats

    env = ToolUseEnv(call_format="json")
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    rl = with_chat_formats(RLConfig(chat_template=str(tmp_path / "chat.jinja"), chat_reply_role="tool"), "",
                           qwen_like_tokenizer(["hello"] * 10, 300), env.tools)
    task, _ = env.reset(3)
    messages = [{"role": "user", "content": task}]
    assert rl.prompt_format.format(observation=task) == render_chat(
        TEMPLATE, messages, add_generation_prompt=True, tools=env.tools)
    assert '"name": "calculator"' in rl.prompt_format and "<tool_response>" in rl.reply_format


def test_cli_generate_chat_encodes_the_prompt_as_transformers_does(tmp_path, capsys):
    """`qwen-jax generate --chat`: the user turn's ids are apply_chat_template's, and the greedy
    continuation is transformers' generate from them."""
    import torch
    from hf_reference import build_hf_model, hf_text_config
    from transformers import PreTrainedTokenizerFast

    from qwen_jax.cli import main

    hf_model = build_hf_model(hf_text_config(layers=4, vocab=300))
    hf_model.save_pretrained(tmp_path)
    tokenizer = qwen_like_tokenizer(["What is two plus two? Four."] * 20, 300)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>")
    hf_tokenizer.chat_template = TEMPLATE
    ids = hf_tokenizer.apply_chat_template([{"role": "user", "content": "What is two plus two?"}],
                                           add_generation_prompt=True, enable_thinking=False, tokenize=True,
                                           return_dict=False)
    assert tokenizer.decode(ids, skip_special_tokens=False).endswith("assistant\n<think>\n\n</think>\n\n")
    with torch.no_grad():
        new = hf_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=2,
                                pad_token_id=0)[0, len(ids):].tolist()
    main(["generate", f"--model={tmp_path}", "--prompt=What is two plus two?", "--max-new-tokens=6", "--chat",
          '--chat-kwargs={"enable_thinking": false}'])
    assert tokenizer.decode(new, skip_special_tokens=False) in capsys.readouterr().out
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(SystemExit, match="error: --chat: .* holds no chat template"):
        main(["generate", f"--model={tmp_path}", "--prompt=hi", "--chat"])


def test_cli_chat_kwargs_that_are_not_a_json_object_are_named(tmp_path):
    from qwen_jax.cli import main

    for given, problem in (("{bad", "is not JSON"), ("[1]", "is not a JSON object")):
        with pytest.raises(SystemExit, match=f"error: --chat-kwargs='.*' {problem}"):
            main(["generate", f"--model={tmp_path}", "--prompt=hi", "--chat", f"--chat-kwargs={given}"])
