"""Conversations with images and videos (supervised fine-tuning of the vision-language model): each
image and video becomes its block of patch tokens where the template puts it, only the assistant's
text is learned, bad records are counted, and a fine-tuning run resumes bitwise."""

import json

import numpy as np
import pytest
from PIL import Image

from qwen_jax.data import VISION_TOKENS, ImageProcessorConfig, VideoProcessorConfig, add_vision_tokens
from qwen_jax.data.chat import load_chat_template
from qwen_jax.data.clips import moving_digit_records
from qwen_jax.data.conversations import CHATML_TEMPLATE, ChatRenderer
from qwen_jax.data.mm_chat import (DIGIT_QUESTION, MediaConversation, TokenizeMediaChatRecord,
                                   TokenizeMediaConversation, digit_conversations, media_chat_records)
from qwen_jax.data.mm_packing import image_placeholder_length
from qwen_jax.data.mm_pipeline import row_budget
from qwen_jax.data.mm_streaming import MMStream, media_held_out
from qwen_jax.data.records import Skip
from qwen_jax.data.tokenizer import train_bpe_tokenizer
from qwen_jax.experiment import load_config, model_config
from resume_check import assert_resume_from_step_2_repeats_the_run

IMAGES = ImageProcessorConfig(min_pixels=32 * 32, max_pixels=64 * 64)
VIDEOS = VideoProcessorConfig(min_pixels=32 * 32, max_pixels=4 * 64 * 64, fps=2.0, max_frames=8)
SEQ_LEN = 96
WORDS = "which digit is this a handwritten red square it shows".split()


@pytest.fixture(scope="module")
def setup():
    """(model config with vision token ids, tokenizer, row budget with videos)."""
    tokenizer = train_bpe_tokenizer([" ".join(WORDS), CHATML_TEMPLATE] * 20, 400, tuple(VISION_TOKENS.values()))
    config = model_config(load_config("configs/sft_vl_tiny.py")).replace(**add_vision_tokens(tokenizer))
    return config, tokenizer, row_budget(config, SEQ_LEN, 64, max_video_patches=128)


def tokenize(setup, template=CHATML_TEMPLATE, **kwargs):
    config, tokenizer, budget = setup
    return TokenizeMediaConversation(tokenizer, ChatRenderer(template), config, budget, **kwargs)


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """A JSONL file of image conversations (a red and a noise image) with bad records among them."""
    folder = tmp_path_factory.mktemp("chats")
    Image.new("RGB", (64, 48), (255, 0, 0)).save(folder / "red.png")
    noise = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")
    lines = [json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image", "image": ["red.png", "noise.png"][i % 2]},
                                     {"type": "text", "text": f"what is this {i}"}]},
        {"role": "assistant", "content": f"it shows a red square {i}"}]}) for i in range(80)]
    lines[4:4] = [json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": "gone.png"}]},
                                           {"role": "assistant", "content": "nothing"}]}),
                  "{broken"]
    (folder / "chats.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "chats.jsonl")


def test_an_image_becomes_its_block_and_only_the_answer_is_learned(setup):
    config, tokenizer, budget = setup
    conversation = digit_conversations(IMAGES)[7]
    document = tokenize(setup)(conversation)
    image = conversation.media[0]
    block = image_placeholder_length(image.grid_thw, config.vision.spatial_merge_size)
    (start, end), = document.image_spans
    assert end - start == block + 2 and document.images == (image,)
    assert document.ids[start] == config.vision_start_token_id and document.ids[end - 1] == config.vision_end_token_id
    assert (document.ids[start + 1:end - 1] == config.image_token_id).all()
    assert tokenizer.decode(document.ids[:start].tolist(), skip_special_tokens=False) == "<|im_start|>user\n"
    assert tokenizer.decode(document.ids[end:].tolist(), skip_special_tokens=False).startswith(DIGIT_QUESTION)
    learned = tokenizer.decode(document.ids[document.trained].tolist(), skip_special_tokens=False)
    assert learned == conversation.conversation["messages"][1]["content"] + "<|im_end|>"
    everything = tokenize(setup, loss_on="all")(conversation)
    assert not everything.trained[start:end].any() and everything.trained[end:].all()


def test_a_video_becomes_its_timestamped_blocks_and_is_never_learned(setup):
    config, tokenizer, budget = setup
    video = next(part for part in moving_digit_records(VIDEOS)[0].parts if not isinstance(part, str))
    conversation = MediaConversation({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is this"}, {"type": "video"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a handwritten digit"}]}], "tools": None},
        (video,))
    document = tokenize(setup)(conversation)
    (start, end), = document.video_spans
    assert document.videos == (video,) and not document.images
    assert (document.ids[start:end] == config.video_token_id).sum() == video.grid_thw[0] * image_placeholder_length(
        (1, *video.grid_thw[1:]), config.vision.spatial_merge_size)
    assert not document.trained[start:end].any()
    assert tokenizer.decode(document.ids[document.trained].tolist(), skip_special_tokens=False) == (
        "a handwritten digit<|im_end|>")


def test_conversations_that_cannot_be_used_are_named(setup):
    conversation = digit_conversations(IMAGES)[0]
    no_images = "{% for m in messages %}<|im_start|>{{ m.role }}\n<|im_end|>\n{% endfor %}"
    with pytest.raises(Skip, match=r"wrote placeholders for \[\], the conversation holds \['image'\]"):
        tokenize(setup, no_images)(conversation)
    long = MediaConversation({"messages": [*conversation.conversation["messages"],
                                           {"role": "user", "content": "which " * 80}]}, conversation.media)
    with pytest.raises(Skip, match="more than train.seq_len 96"):
        tokenize(setup)(long)
    typed = MediaConversation({"messages": [{"role": "user", "content": "<|image_pad|>"},
                                            {"role": "assistant", "content": "a"}]})
    with pytest.raises(Skip, match="vision placeholder") as stray:
        tokenize(setup)(typed)
    assert stray.value.reason == "vision_token_in_text"


def test_the_stream_plans_image_rows_and_counts_bad_records(chats, setup):
    config, tokenizer, budget = setup
    records = media_chat_records([chats], IMAGES, VIDEOS)
    stream = MMStream({"chat": records}, tokenizer, config, budget, global_batch_size=4, seed=None,
                      tokenize_for={"chat": TokenizeMediaChatRecord(tokenize(setup), strict=False)})
    batch = next(stream)
    images = np.isin(batch["input_ids"], [config.image_token_id, config.vision_start_token_id])
    assert images.any() and batch["num_images"].sum() >= 4
    targets_images = np.isin(batch["targets"], [config.image_token_id, config.vision_end_token_id])
    assert (batch["loss_mask"][targets_images] == 0).all()
    learned = tokenizer.decode(batch["targets"][0][batch["loss_mask"][0] == 1].tolist(), skip_special_tokens=False)
    assert learned.startswith("it shows a red square") and "what is this" not in learned
    assert stream.get_state()["skipped"] == {"bad_json": 1, "missing_image": 1}
    held = [index for index in range(len(records)) if media_held_out(*records[index][:2])]
    assert held and len(held) < len(records) // 4


def test_a_text_conversation_in_a_qwen_shaped_template_takes_the_vision_path_too(setup):
    template, special = load_chat_template("tests/data/qwen_like_chat_template.jinja", "test")
    conversation = MediaConversation({"messages": [{"role": "user", "content": "what is this"},
                                                   {"role": "assistant", "content": "a digit"}]})
    config, tokenizer, budget = setup
    document = TokenizeMediaConversation(tokenizer, ChatRenderer(template, special), config, budget)(conversation)
    assert tokenizer.decode(document.ids[document.trained].tolist(), skip_special_tokens=False) == "a digit<|im_end|>"


@pytest.mark.slow
def test_an_image_chat_run_resumes_exactly(chats, tmp_path, capsys):
    config = load_config("configs/sft_vl_tiny.py", [
        "wandb.mode=disabled", "train.steps=4", "train.eval_every=2", "train.eval_batches=1",
        "train.batch_size=8", f"train.seq_len={SEQ_LEN}", "model.vocab_size=400", "model.num_hidden_layers=2",
        "checkpoint.every_steps=2", f"data.chat_sources=['{chats}', 'digits_chat']", "data.max_patches=64",
        "data.max_video_patches=0"])
    rows = assert_resume_from_step_2_repeats_the_run(config, tmp_path / "run", capsys)
    assert np.isfinite(rows[-1]["eval/loss"]) and rows[-1]["learning/loss"] > 0
