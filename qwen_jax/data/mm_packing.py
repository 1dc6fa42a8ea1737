"""Image-text documents as token streams, packed greedily into fixed rows that never split an image.

A document is its parts in reading order: a text part's tokens, or for an image
`<|vision_start|> <|image_pad|> x n <|vision_end|>` (n = `image_placeholder_length`), then eos.
The vision token ids are the model config's (`image_token_id`, `vision_start_token_id`,
`vision_end_token_id`), the ids Qwen's own tokenizer gives those names. A tokenizer trained here has
no such tokens: `add_vision_tokens` appends them as special tokens after its vocabulary (so no text
merge is displaced) and returns the config fields to set.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from tokenizers import Tokenizer

from qwen_jax.config import ModelConfig
from qwen_jax.data.images import ProcessedImage, image_placeholder_length
from qwen_jax.data.mm_sources import ImageTextRecord
from qwen_jax.model.positions import rope_index

# ModelConfig field -> the token's name in Qwen's tokenizer.json (video_pad too: every id a token).
VISION_TOKENS = {
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
}


def load_hf_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The `tokenizer.json` of a Hugging Face model directory (e.g. a Qwen3.5 checkpoint)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the model directory needs a tokenizer.json "
                                "(the fast-tokenizer file that Hugging Face saves)")
    return Tokenizer.from_file(str(path))


def add_vision_tokens(tokenizer: Tokenizer) -> dict[str, int]:
    """Add `VISION_TOKENS` as special tokens where missing (in place); {ModelConfig field: id}."""
    tokenizer.add_special_tokens([name for name in VISION_TOKENS.values()
                                  if tokenizer.token_to_id(name) is None])
    return {field: tokenizer.token_to_id(name) for field, name in VISION_TOKENS.items()}


def check_vision_tokens(tokenizer: Tokenizer, config: ModelConfig) -> None:
    """Raise if the tokenizer names a vision token with another id than the config gives it."""
    for field, name in VISION_TOKENS.items():
        token_id = tokenizer.token_to_id(name)
        if token_id is not None and token_id != getattr(config, field):
            raise ValueError(f"the tokenizer has {name} = {token_id} but model.{field} is "
                             f"{getattr(config, field)}: images would be read as other tokens")


def placeholder_ids(config: ModelConfig) -> tuple[int, int, int]:
    """(vision_start, image_pad, vision_end) ids: the tokens that only ever stand for an image."""
    return config.vision_start_token_id, config.image_token_id, config.vision_end_token_id


class SkipRecord(Exception):
    """A record that cannot be used; `reason` is its key in the skip counts."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TokenizedDocument(NamedTuple):
    """ids int32 [L] (eos last), the images in order, and image_spans int64 [num_images, 2]: each
    image's block ids[start:end], from its vision_start to its vision_end."""

    ids: np.ndarray
    images: tuple[ProcessedImage, ...]
    image_spans: np.ndarray

    @property
    def num_patches(self) -> int:
        return sum(len(image.pixel_values) for image in self.images)

    def images_in(self, start: int, end: int) -> list[ProcessedImage]:
        """The images whose blocks lie in ids[start:end] (blocks are never cut)."""
        return [image for image, (block_start, _) in zip(self.images, self.image_spans)
                if start <= block_start < end]


def tokenize_record(tokenizer: Tokenizer, record, config: ModelConfig,
                    eos_id: int) -> TokenizedDocument:
    """A str or ImageTextRecord -> its token stream; raises SkipRecord (not_text, empty,
    encode_error, vision_token_in_text)."""
    if isinstance(record, str):
        record = ImageTextRecord(parts=(record,), source="text")
    if not isinstance(record, ImageTextRecord):
        raise SkipRecord("not_text")
    if not any(isinstance(part, str) and part.strip() for part in record.parts):
        raise SkipRecord("empty")
    start, pad, end = placeholder_ids(config)
    merge = config.vision.spatial_merge_size
    pieces, images, image_spans, length = [], [], [], 0
    for part in record.parts:
        if isinstance(part, str):
            try:
                # No special tokens: a post-processor's BOS must not appear between two images.
                ids = np.asarray(tokenizer.encode(part, add_special_tokens=False).ids, np.int32)
            except Exception:  # the tokenizer's error types are undocumented; any record may fail
                raise SkipRecord("encode_error") from None
            # A literal "<|image_pad|>" in text would be one more image token than the grids cover.
            if np.isin(ids, (start, pad, end)).any():
                raise SkipRecord("vision_token_in_text")
        else:
            if part.pixel_values.shape[1] != config.vision.patch_dim:
                raise ValueError(f"{record.source}: pixel_values rows of "
                                 f"{part.pixel_values.shape[1]} values, but model.vision.patch_dim "
                                 f"is {config.vision.patch_dim}")
            ids = np.full(image_placeholder_length(part.grid_thw, merge) + 2, pad, np.int32)
            ids[0], ids[-1] = start, end
            images.append(part)
            image_spans.append((length, length + len(ids)))
        pieces.append(ids)
        length += len(ids)
    pieces.append(np.array([eos_id], np.int32))
    return TokenizedDocument(np.concatenate(pieces), tuple(images),
                             np.array(image_spans, np.int64).reshape(-1, 2))


def budget_problem(document: TokenizedDocument, *, seq_len: int, max_patches: int,
                   max_images: int) -> str | None:
    """Why `document` can never be packed (image_too_long, too_many_patches, too_many_images)."""
    if np.any(np.diff(document.image_spans, axis=1) > seq_len):
        return "image_too_long"
    if document.num_patches > max_patches:
        return "too_many_patches"
    if len(document.images) > max_images:
        return "too_many_images"
    return None


def split_points(document: TokenizedDocument, seq_len: int) -> list[tuple[int, int]]:
    """[(start, end)] pieces of at most seq_len tokens, cut as late as possible outside a block."""
    inside = np.zeros(len(document.ids) + 1, bool)  # inside[e]: a cut before token e splits a block
    for block_start, block_end in document.image_spans:
        inside[block_start + 1:block_end] = True
    pieces, start = [], 0
    while len(document.ids) - start > seq_len:
        end = start + seq_len
        while inside[end]:  # terminates above start: every block fits a row (budget_problem)
            end -= 1
        pieces.append((start, end))
        start = end
    return pieces + [(start, len(document.ids))]


Piece = tuple[int, int, int]  # (document index, start, end): a slice of a document's tokens


def plan_rows(documents: list[TokenizedDocument], *, seq_len: int, max_patches: int,
              max_images: int) -> list[tuple[Piece, ...]]:
    """Greedy, in order: each row's pieces. A document that does not fit what is left of the row
    (tokens, patches or images) starts a new row; one longer than a row is cut by `split_points`,
    every piece but the last filling a row of its own. Documents must pass `budget_problem`."""
    rows, row, used, patches, images = [], [], 0, 0, 0
    for index, document in enumerate(documents):
        fits = (used + len(document.ids) <= seq_len
                and patches + document.num_patches <= max_patches
                and images + len(document.images) <= max_images)
        if row and not fits:
            rows.append(tuple(row))
            row, used, patches, images = [], 0, 0, 0
        pieces = split_points(document, seq_len)
        for start, end in pieces[:-1]:
            rows.append(((index, start, end),))
        start, end = pieces[-1]
        row.append((index, start, end))
        in_piece = document.images_in(start, end)
        used += end - start
        patches += sum(len(image.pixel_values) for image in in_piece)
        images += len(in_piece)
    return rows + [tuple(row)] if row else rows


def build_row(documents: list[TokenizedDocument], pieces: tuple[Piece, ...], config: ModelConfig,
              *, seq_len: int, max_patches: int, max_images: int,
              pad_id: int) -> dict[str, np.ndarray]:
    """One packed row, the arrays mm_pipeline's docstring lists; pieces are segments 1, 2, ..."""
    input_ids = np.full(seq_len, pad_id, np.int32)
    segment_ids = np.zeros(seq_len, np.int32)
    pixel_values = np.zeros((max_patches, config.vision.patch_dim), np.float32)
    image_grid_thw = np.zeros((max_images, 3), np.int32)
    at = patch_at = num_images = 0
    for segment, (index, start, end) in enumerate(pieces, start=1):
        document = documents[index]
        input_ids[at:at + end - start] = document.ids[start:end]
        segment_ids[at:at + end - start] = segment
        at += end - start
        for image in document.images_in(start, end):
            pixel_values[patch_at:patch_at + len(image.pixel_values)] = image.pixel_values
            patch_at += len(image.pixel_values)
            image_grid_thw[num_images] = image.grid_thw
            num_images += 1
    targets = np.append(input_ids[1:], np.int32(pad_id))
    same_segment = np.append((segment_ids[:-1] == segment_ids[1:]) & (segment_ids[:-1] > 0), False)
    positions = rope_index(input_ids[None], image_grid_thw[:num_images], config,
                           segment_ids=segment_ids[None])[:, 0]
    loss_mask = same_segment & ~np.isin(targets, placeholder_ids(config))
    return {"input_ids": input_ids, "targets": targets, "segment_ids": segment_ids,
            "positions": positions, "loss_mask": loss_mask.astype(np.float32),
            "pixel_values": pixel_values, "image_grid_thw": image_grid_thw,
            "num_images": np.int32(num_images)}
