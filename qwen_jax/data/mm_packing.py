"""Image-, video- and text documents as token streams, packed greedily into fixed rows that never
split an image or a video.

A document is its parts in reading order: a text part's tokens; for an image
`<|vision_start|> <|image_pad|> x n <|vision_end|>` (n = `image_placeholder_length`); for a video,
per temporal patch, its timestamp text `<1.5 seconds>` then `<|vision_start|> <|video_pad|> x n
<|vision_end|>` (n = h * w / merge^2, Qwen3-VL's processor layout); then eos. The vision token ids
are the model config's (`image_token_id`, `video_token_id`, `vision_start_token_id`,
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
from qwen_jax.data.records import Skip
from qwen_jax.data.videos import ProcessedVideo, timestamp_text
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


def placeholder_ids(config: ModelConfig) -> tuple[int, int, int, int]:
    """(vision_start, image_pad, video_pad, vision_end) ids: tokens that only ever stand for pixels."""
    return (config.vision_start_token_id, config.image_token_id, config.video_token_id,
            config.vision_end_token_id)


class RowBudget(NamedTuple):
    """What one packed row holds at most: tokens, image patches and images, video patches and
    videos (0 video patches: rows carry no video arrays)."""

    seq_len: int
    max_patches: int
    max_images: int
    max_video_patches: int = 0
    max_videos: int = 0


class TokenizedDocument(NamedTuple):
    """ids int32 [L] (eos last), the images and videos in order, and their spans int64 [n, 2]:
    each item's block ids[start:end] (a video's from its first timestamp to its last vision_end);
    `trained` bool [L], the tokens to learn (a conversation's assistant turns; None: all text)."""

    ids: np.ndarray
    images: tuple[ProcessedImage, ...]
    image_spans: np.ndarray
    videos: tuple[ProcessedVideo, ...] = ()
    video_spans: np.ndarray = np.zeros((0, 2), np.int64)
    trained: np.ndarray | None = None

    @property
    def num_patches(self) -> int:
        return sum(len(image.pixel_values) for image in self.images)

    @property
    def num_video_patches(self) -> int:
        return sum(len(video.pixel_values) for video in self.videos)

    @property
    def spans(self) -> np.ndarray:
        """Every image's and video's block, int64 [n, 2]."""
        return np.concatenate([self.image_spans, self.video_spans])

    def images_in(self, start: int, end: int) -> list[ProcessedImage]:
        """The images whose blocks lie in ids[start:end] (blocks are never cut)."""
        return [image for image, (block_start, _) in zip(self.images, self.image_spans)
                if start <= block_start < end]

    def videos_in(self, start: int, end: int) -> list[ProcessedVideo]:
        """The videos whose blocks lie in ids[start:end]."""
        return [video for video, (block_start, _) in zip(self.videos, self.video_spans)
                if start <= block_start < end]


def _encode_text(tokenizer: Tokenizer, text: str, config: ModelConfig) -> np.ndarray:
    """Text -> ids int32 [n]; raises Skip (encode_error, vision_token_in_text)."""
    try:
        # No special tokens: a post-processor's BOS must not appear between two images.
        ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)
    except Exception:  # the tokenizer's error types are undocumented; any record may fail
        raise Skip("encode_error", "the tokenizer failed on it") from None
    # A literal "<|image_pad|>" in text would be one more image token than the grids cover.
    if np.isin(ids, placeholder_ids(config)).any():
        raise Skip("vision_token_in_text", "the text holds a vision placeholder token")
    return ids


def _block(length: int, pad: int, config: ModelConfig) -> np.ndarray:
    """<vision_start> pad x length <vision_end>."""
    ids = np.full(length + 2, pad, np.int32)
    ids[0], ids[-1] = config.vision_start_token_id, config.vision_end_token_id
    return ids


def visual_ids(tokenizer: Tokenizer, part, config: ModelConfig, source: str) -> np.ndarray:
    """An image's block, or a video's timestamped block per temporal patch."""
    if part.pixel_values.shape[1] != config.vision.patch_dim:
        raise ValueError(f"{source}: pixel_values rows of {part.pixel_values.shape[1]} values, but "
                         f"model.vision.patch_dim is {config.vision.patch_dim}")
    merge = config.vision.spatial_merge_size
    if isinstance(part, ProcessedImage):
        return _block(image_placeholder_length(part.grid_thw, merge), config.image_token_id, config)
    frame_tokens = image_placeholder_length((1, *part.grid_thw[1:]), merge)
    return np.concatenate([piece for seconds in part.timestamps for piece in (
        _encode_text(tokenizer, timestamp_text(seconds), config),
        _block(frame_tokens, config.video_token_id, config))])


def tokenize_record(tokenizer: Tokenizer, record, config: ModelConfig,
                    eos_id: int) -> TokenizedDocument:
    """A str or ImageTextRecord -> its token stream; raises Skip (not_text, empty,
    encode_error, vision_token_in_text)."""
    if isinstance(record, str):
        record = ImageTextRecord(parts=(record,), source="text")
    if not isinstance(record, ImageTextRecord):
        raise Skip("not_text", f"a {type(record).__name__}, not a document")
    if not any(isinstance(part, str) and part.strip() for part in record.parts):
        raise Skip("empty", "no text but whitespace")
    pieces, length = [], 0
    items = {ProcessedImage: ([], []), ProcessedVideo: ([], [])}  # kind -> (items, spans)
    for part in record.parts:
        if isinstance(part, str):
            ids = _encode_text(tokenizer, part, config)
        else:
            ids = visual_ids(tokenizer, part, config, record.source)
            items[type(part)][0].append(part)
            items[type(part)][1].append((length, length + len(ids)))
        pieces.append(ids)
        length += len(ids)
    pieces.append(np.array([eos_id], np.int32))
    (images, image_spans), (videos, video_spans) = items.values()
    return TokenizedDocument(np.concatenate(pieces), tuple(images),
                             np.array(image_spans, np.int64).reshape(-1, 2), tuple(videos),
                             np.array(video_spans, np.int64).reshape(-1, 2))


def budget_problem(document: TokenizedDocument, budget: RowBudget) -> str | None:
    """Why `document` can never be packed (image_too_long, video_too_long, too_many_patches,
    too_many_images, too_many_video_patches, too_many_videos)."""
    for kind, spans in (("image", document.image_spans), ("video", document.video_spans)):
        if np.any(np.diff(spans, axis=1) > budget.seq_len):
            return f"{kind}_too_long"
    checks = (("too_many_patches", document.num_patches, budget.max_patches),
              ("too_many_images", len(document.images), budget.max_images),
              ("too_many_video_patches", document.num_video_patches, budget.max_video_patches),
              ("too_many_videos", len(document.videos), budget.max_videos))
    return next((reason for reason, used, limit in checks if used > limit), None)


def split_points(document: TokenizedDocument, seq_len: int) -> list[tuple[int, int]]:
    """[(start, end)] pieces of at most seq_len tokens, cut as late as possible outside a block."""
    inside = np.zeros(len(document.ids) + 1, bool)  # inside[e]: a cut before token e splits a block
    for block_start, block_end in document.spans:
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


def usage(document: TokenizedDocument, start: int, end: int) -> np.ndarray:
    """What ids[start:end] uses of a row: [tokens, patches, images, video patches, videos]."""
    images, videos = document.images_in(start, end), document.videos_in(start, end)
    return np.array([end - start, sum(len(image.pixel_values) for image in images), len(images),
                     sum(len(video.pixel_values) for video in videos), len(videos)])


def plan_rows(documents: list[TokenizedDocument], budget: RowBudget) -> list[tuple[Piece, ...]]:
    """Greedy, in order: each row's pieces. A document that does not fit what is left of the row
    (tokens, patches, images, video patches or videos) starts a new row; one longer than a row is
    cut by `split_points`, every piece but the last filling a row of its own. Documents must pass
    `budget_problem`."""
    limit = np.array(budget)
    rows, row, used = [], [], np.zeros_like(limit)
    for index, document in enumerate(documents):
        if row and np.any(used + usage(document, 0, len(document.ids)) > limit):
            rows.append(tuple(row))
            row, used = [], np.zeros_like(limit)
        pieces = split_points(document, budget.seq_len)
        for start, end in pieces[:-1]:
            rows.append(((index, start, end),))
        start, end = pieces[-1]
        row.append((index, start, end))
        used += usage(document, start, end)
    return rows + [tuple(row)] if row else rows


def _fill(items, pixels: np.ndarray, grids: np.ndarray, patch_at: int, count: int) -> tuple[int, int]:
    """Copy items' patches and grids after the first patch_at patches and count items."""
    for item in items:
        pixels[patch_at:patch_at + len(item.pixel_values)] = item.pixel_values
        patch_at += len(item.pixel_values)
        grids[count] = item.grid_thw
        count += 1
    return patch_at, count


def build_row(documents: list[TokenizedDocument], pieces: tuple[Piece, ...], config: ModelConfig,
              budget: RowBudget, *, pad_id: int) -> dict[str, np.ndarray]:
    """One packed row, the arrays mm_pipeline's docstring lists; pieces are segments 1, 2, ..."""
    seq_len, dim = budget.seq_len, config.vision.patch_dim
    input_ids = np.full(seq_len, pad_id, np.int32)
    segment_ids = np.zeros(seq_len, np.int32)
    given = np.zeros(seq_len + 1, bool)  # tokens of an image or video block: never targets
    untrained = np.zeros(seq_len + 1, bool)  # tokens a conversation gives, not its assistant turns
    pixel_values = np.zeros((budget.max_patches, dim), np.float32)
    image_grid_thw = np.zeros((budget.max_images, 3), np.int32)
    pixel_values_videos = np.zeros((budget.max_video_patches, dim), np.float32)
    video_grid_thw = np.zeros((budget.max_videos, 3), np.int32)
    at = patch_at = num_images = video_patch_at = num_videos = 0
    for segment, (index, start, end) in enumerate(pieces, start=1):
        document = documents[index]
        input_ids[at:at + end - start] = document.ids[start:end]
        segment_ids[at:at + end - start] = segment
        if document.trained is not None:
            untrained[at:at + end - start] = ~document.trained[start:end]
        for block_start, block_end in document.spans:
            if start <= block_start < end:
                given[at + block_start - start:at + block_end - start] = True
        at += end - start
        patch_at, num_images = _fill(document.images_in(start, end), pixel_values, image_grid_thw,
                                     patch_at, num_images)
        video_patch_at, num_videos = _fill(document.videos_in(start, end), pixel_values_videos,
                                           video_grid_thw, video_patch_at, num_videos)
    targets = np.append(input_ids[1:], np.int32(pad_id))
    same_segment = np.append((segment_ids[:-1] == segment_ids[1:]) & (segment_ids[:-1] > 0), False)
    positions = rope_index(input_ids[None], image_grid_thw[:num_images], config,
                           video_grid_thw=video_grid_thw[:num_videos],
                           segment_ids=segment_ids[None])[:, 0]
    row = {"input_ids": input_ids, "targets": targets, "segment_ids": segment_ids,
           "positions": positions, "loss_mask": (same_segment & ~given[1:] & ~untrained[1:]).astype(np.float32),
           "pixel_values": pixel_values, "image_grid_thw": image_grid_thw,
           "num_images": np.int32(num_images)}
    if budget.max_video_patches:
        row.update(pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                   num_videos=np.int32(num_videos))
    return row
