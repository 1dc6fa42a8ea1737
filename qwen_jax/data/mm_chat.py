"""Conversations with images and videos, for supervised fine-tuning of a vision-language model.

A message's content may be a list of parts, as in HF chat data: {"type": "text", "text": ...},
{"type": "image", "image": "cat.png"} (or "image_bytes": base64), {"type": "video", "video":
"clip.mp4"}; paths are relative to the file's folder. The images and videos are decoded and
preprocessed as the image-text stream's are (mm_sources.py), the chat template writes each as Qwen's
vision placeholder, and each placeholder becomes the image's block of patch tokens (a video's
timestamped blocks), as in pretraining. The learned tokens are the assistant's, found as for text
conversations (conversations.py); image and video tokens are never learned. Rows are planned by
`MMStream` (whole conversations: one longer than a row is skipped as too_long).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from qwen_jax.config import ConfigError, ModelConfig
from qwen_jax.data.chat_stream import CHAT_FILE_SUFFIXES
from qwen_jax.data.conversations import (TOO_LONG, ChatRenderer, check_conversation, checked_loss_on,
                                         parse_conversation, python_help_conversations, special_ids,
                                         token_starts, trained_tokens)
from qwen_jax.data.images import ImageProcessorConfig, ProcessedImage
from qwen_jax.data.mm_packing import (RowBudget, TokenizedDocument, budget_problem, placeholder_ids, plan_rows,
                                      visual_ids)
from qwen_jax.data.mm_pipeline import MMPackedCorpus, make_mm_eval_batches
from qwen_jax.data.mm_sources import PART_KINDS, digits_image_text_records, load_part
from qwen_jax.data.mm_streaming import EVAL_MEDIA_SHARE, media_held_out
from qwen_jax.data.records import Skip
from qwen_jax.data.streaming import PASSED_OVER, RecordIndex
from qwen_jax.data.videos import VideoProcessorConfig

MEDIA_KEYS = tuple(kind for kind in PART_KINDS if kind != "text")
# What a chat template writes for an image or a video (Qwen's templates, and the built-in ChatML).
VISION_PLACEHOLDER = re.compile(r"<\|vision_start\|>(<\|image_pad\|>|<\|video_pad\|>)<\|vision_end\|>")
DIGIT_QUESTION = "Which digit is this?"


@dataclasses.dataclass(frozen=True)
class MediaConversation:
    """A conversation whose image and video parts are {"type": "image"} / {"type": "video"}, and
    those images and videos, preprocessed, in reading order."""

    conversation: dict
    media: tuple = ()


def load_media(conversation: dict, folder: Path, images: ImageProcessorConfig,
               videos: VideoProcessorConfig) -> MediaConversation:
    """Decode and preprocess every image and video part of the messages; raise Skip naming a bad one."""
    media, messages = [], []
    for message in conversation["messages"]:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and any(key in part for key in MEDIA_KEYS):
                    item = load_part(part, folder, images, videos)
                    media.append(item)
                    part = {"type": "image" if isinstance(item, ProcessedImage) else "video"}
                parts.append(part)
            message = {**message, "content": parts}
        messages.append(message)
    return MediaConversation({**conversation, "messages": messages}, tuple(media))


def digit_conversations(images: ImageProcessorConfig) -> list[MediaConversation]:
    """scikit-learn's handwritten digits as one-turn conversations: the image and a question, then
    the caption ("A handwritten digit 7.") as the answer."""
    conversations = []
    for record in digits_image_text_records(images):
        image, caption = record.parts
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DIGIT_QUESTION}]},
                    {"role": "assistant", "content": caption}]
        conversations.append(MediaConversation({"messages": messages, "tools": None}, (image,)))
    return conversations


def media_chat_records(sources: Sequence[str], images: ImageProcessorConfig,
                       videos: VideoProcessorConfig) -> RecordIndex:
    """The records of config.data.chat_sources for a vision model: built-in "python_help" and
    "digits_chat", .jsonl / .array_record files of conversations with images and videos."""
    def parser(path: Path):
        def parse(record: bytes, where: str) -> MediaConversation:
            return load_media(parse_conversation(record, where), path.parent, images, videos)
        return parse

    built_in = {"python_help": (python_help_conversations, lambda record, where: MediaConversation(
                    check_conversation(record))),
                "digits_chat": (lambda: digit_conversations(images), lambda record, where: record)}
    return RecordIndex("chat_sources", sources, built_in, parser, CHAT_FILE_SUFFIXES)


def media_chat_texts(records: RecordIndex, renderer: ChatRenderer, *, strict: bool, max_chars: int):
    """The train conversations as the template writes them (up to about `max_chars`), to train a
    tokenizer on: read without decoding their images and videos."""
    chars = 0
    for index in range(len(records)):
        where, record, _ = records[index]
        if media_held_out(where, record) or (isinstance(record, bytes) and not record.strip()):
            continue  # held out, or a blank line
        try:
            if isinstance(record, MediaConversation):
                conversation = record.conversation
            else:
                conversation = check_conversation(record) if isinstance(record, dict) else parse_conversation(
                    record, where)
            text = renderer.render(conversation["messages"], conversation["tools"])
        except Exception as error:  # noqa: BLE001 - the stream counts a bad one; here it is left out
            if strict:
                raise ValueError(f"{where}: {error}") from None
            continue
        yield text
        chars += len(text)
        if chars >= max_chars:
            return


class TokenizeMediaConversation:
    """A MediaConversation -> a TokenizedDocument (its `trained` tokens the assistant's) that fits a
    row; raise Skip where it cannot be used."""

    def __init__(self, tokenizer: Tokenizer, renderer: ChatRenderer, config: ModelConfig, budget: RowBudget,
                 *, loss_on: str = "assistant"):
        self._tokenizer, self._renderer, self._config, self._budget = tokenizer, renderer, config, budget
        self._loss_on, self._closers = checked_loss_on(loss_on), special_ids(tokenizer)

    def __call__(self, item: MediaConversation) -> TokenizedDocument:
        text, turn_spans = self._renderer(item.conversation)
        ids, starts, spans = expand_placeholders(text, item.media, self._tokenizer, self._config)
        if len(ids) > self._budget.seq_len:
            raise Skip(TOO_LONG, f"{len(ids)} tokens, more than train.seq_len {self._budget.seq_len}")
        pixels = np.zeros(len(ids), bool)  # image and video blocks: given, never learned
        for start, stop in spans["image"] + spans["video"]:
            pixels[start:stop] = True
        trained = np.ones(len(ids), bool) if self._loss_on == "all" else trained_tokens(
            ids, starts, turn_spans, self._closers)
        document = TokenizedDocument(
            ids, tuple(m for m in item.media if isinstance(m, ProcessedImage)),
            np.array(spans["image"], np.int64).reshape(-1, 2),
            tuple(m for m in item.media if not isinstance(m, ProcessedImage)),
            np.array(spans["video"], np.int64).reshape(-1, 2), trained & ~pixels)
        problem = budget_problem(document, self._budget)
        if problem:
            raise Skip(problem, "does not fit a row")
        return document


def expand_placeholders(text: str, media: Sequence, tokenizer: Tokenizer, config: ModelConfig):
    """A rendered chat text with one vision placeholder per medium -> (ids [L] int32, the character each
    token starts at [L], {"image": [(start, end)], "video": [...]} each medium's block in the ids); raise
    Skip where the placeholders and the media differ or the text cannot be encoded."""
    blocks = list(VISION_PLACEHOLDER.finditer(text))
    written = ["video" if block.group(1) == "<|video_pad|>" else "image" for block in blocks]
    held = ["image" if isinstance(medium, ProcessedImage) else "video" for medium in media]
    if written != held:
        raise Skip("template_error", f"the chat template wrote placeholders for {written}, the "
                                     f"conversation holds {held}")
    ids, starts = [], []  # per piece: token ids and the characters they start at
    spans = {"image": [], "video": []}
    at = length = 0
    for block, medium, kind in zip([*blocks, None], [*media, None], [*held, None]):
        end = block.start() if block else len(text)
        if end > at:
            piece = _encode(tokenizer, config, text[at:end])
            ids.append(np.asarray(piece.ids, np.int32))
            starts.append(token_starts(piece) + at)
            length += len(piece.ids)
        if block is None:
            break
        block_ids = visual_ids(tokenizer, medium, config, "a conversation")
        ids.append(block_ids)
        starts.append(np.full(len(block_ids), block.start(), np.int64))
        spans[kind].append((length, length + len(block_ids)))
        length += len(block_ids)
        at = block.end()
    return np.concatenate(ids), np.concatenate(starts), spans


def _encode(tokenizer: Tokenizer, config: ModelConfig, text: str):
    try:
        encoding = tokenizer.encode(text, add_special_tokens=False)
    except Exception:  # the tokenizer's error types are undocumented; any one record may fail
        raise Skip("encode_error", "the tokenizer failed on it") from None
    # A placeholder token outside a whole placeholder would be one more image token than the grids cover.
    if np.isin(encoding.ids, placeholder_ids(config)).any():
        raise Skip("vision_token_in_text", "the text holds a vision placeholder token")
    return encoding


class TokenizeMediaChatRecord:
    """(where, record, parse) -> a train conversation's TokenizedDocument, for `MMStream`;
    PASSED_OVER where it is held out (a hash of the record, before any image is decoded) or blank;
    the reason, where it is bad (strict: raise ValueError naming it)."""

    def __init__(self, tokenize: TokenizeMediaConversation, strict: bool):
        self._tokenize, self._strict = tokenize, strict

    def __call__(self, item):
        where, record, parse = item
        if media_held_out(where, record):
            return PASSED_OVER
        try:
            conversation = parse(record, where)
            return PASSED_OVER if conversation is None else self._tokenize(conversation)
        except Skip as skip:
            if self._strict:
                raise skip.at(where) from None
            return skip.reason


def media_chat_eval_batches(records: RecordIndex, tokenize: TokenizeMediaConversation, config: ModelConfig,
                            budget: RowBudget, *, pad: int, batch_size: int, max_batches: int,
                            strict: bool = False, process_index: int = 0, process_count: int = 1) -> list[dict]:
    """Eval batches of the first held-out conversations (up to 4 per eval row wanted), packed as the
    image-text pipeline packs its held-out documents."""
    wanted, documents = 4 * max_batches * batch_size, []
    for index in range(len(records)):
        where, record, parse = records[index]
        if not media_held_out(where, record):
            continue  # decided before decoding anything
        try:
            conversation = parse(record, where)
            if conversation is not None:
                documents.append(tokenize(conversation))
        except Skip as skip:  # counted where the train stream meets it; eval leaves it out
            if strict:
                raise skip.at(where) from None
        if len(documents) == wanted:
            break
    if not documents:
        raise ConfigError("data.chat_sources hold no usable conversation held out for eval (one in "
                          f"{round(1 / EVAL_MEDIA_SHARE)} is, by a hash of its record): add conversations")
    corpus = MMPackedCorpus(tuple(documents), tuple(plan_rows(documents, budget)), {}, config, budget, pad)
    return make_mm_eval_batches(corpus, batch_size=batch_size, max_batches=max_batches,
                                process_index=process_index, process_count=process_count)
