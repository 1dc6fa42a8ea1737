"""HF's 3-D (t, h, w) mRoPE positions for token streams holding images and videos (spec section 3.3).

Works on numpy arrays (the data pipeline; the result is numpy) and on jax arrays, traced or not
(the model, under jit), because every step is a vectorised scan over the row: no per-image loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.config import ModelConfig


def concrete_value(x) -> np.ndarray | None:
    """x as numpy when its value is known now, None while jit traces it (its checks must wait)."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def check_grid(grid_thw, merge_size: int, name: str) -> None:
    """A [N, 3] (t, h, w) patch grid: its shape always, its values when they are known."""
    if grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"{name} must be [num_items, 3] (t, h, w), got shape {tuple(grid_thw.shape)}")
    grid = concrete_value(grid_thw)
    if grid is None:
        return
    if np.any(grid <= 0):
        raise ValueError(f"{name} has a non-positive entry: {grid.tolist()}")
    if np.any(grid[:, 1:] % merge_size):
        raise ValueError(f"{name} heights and widths must be multiples of spatial_merge_size "
                         f"({merge_size}), got {grid.tolist()}")


def _runs(is_kind, grid_thw, merge_size: int, split_frames: bool, xp):
    """For the tokens of one kind (flat [B*T] mask, rows in order): offsets [3, B*T] from the run's
    start position and how far the position advances after each token ([B*T]; 0 inside a run).

    Token k of the kind (counted over the whole batch, row-major, like HF's scatter) belongs to the
    item whose merged t*h*w tokens cover k. split_frames: every frame is its own run (Qwen3.5
    separates video frames by timestamp text), so t restarts at 0 and each frame advances alone.
    """
    t, h, w = grid_thw[:, 0], grid_thw[:, 1] // merge_size, grid_thw[:, 2] // merge_size
    tokens = t * h * w
    ends = xp.cumsum(tokens)
    rank = xp.cumsum(is_kind) - 1
    item = xp.minimum(xp.searchsorted(ends, rank, side="right"), grid_thw.shape[0] - 1)
    local = rank - (ends - tokens)[item]
    per_frame = (h * w)[item]
    frame, within = local // per_frame, local % per_frame
    width = w[item]
    zeros = xp.zeros_like(local)
    offsets = xp.stack([zeros if split_frames else frame, within // width, within % width])
    last = within == per_frame - 1 if split_frames else local == tokens[item] - 1
    # After a run the text continues max(h, w) / merge past its start, not one per vision token.
    advance = xp.where(last, xp.maximum(h, w)[item], 0)
    return offsets, advance


def rope_index(input_ids, image_grid_thw, config: ModelConfig, *, video_grid_thw=None,
               segment_ids=None):
    """input_ids [B, T], image_grid_thw [num_images, 3] or None -> positions int32 [3, B, T].

    Text counts up by one per token on all three axes; an image's tokens sit at (start + t,
    start + row, start + col) of its merged grid, and the text after it goes on from start +
    max(h, w) / merge (HF's get_rope_index). Videos (video_grid_thw [num_videos, 3]) are split into
    frames first. segment_ids [B, T] restart the count at every segment (packed documents; padding
    is a segment of its own), as HF restarts after left padding.
    """
    arrays = (input_ids, image_grid_thw, video_grid_thw, segment_ids)
    xp = jnp if any(isinstance(a, jax.Array) for a in arrays) else np
    input_ids = xp.asarray(input_ids)
    vision = config.vision
    if vision is None:
        raise ValueError("rope_index needs config.vision (a vision-language model)")
    batch, length = input_ids.shape
    flat_ids = input_ids.reshape(-1)
    offsets = xp.zeros((3, batch * length), xp.int32)
    advance = xp.ones(batch * length, xp.int32)
    kinds = (("image", config.image_token_id, image_grid_thw, False),
             ("video", config.video_token_id, video_grid_thw, True))
    for kind, token_id, grid, split_frames in kinds:
        if grid is None:
            continue
        grid = xp.asarray(grid).astype(xp.int32)
        check_grid(grid, vision.spatial_merge_size, f"{kind}_grid_thw")
        is_kind = flat_ids == token_id
        _check_token_count(is_kind, grid, vision.spatial_merge_size, kind, token_id)
        if grid.shape[0] == 0:
            continue
        kind_offsets, kind_advance = _runs(is_kind, grid, vision.spatial_merge_size, split_frames, xp)
        offsets = xp.where(is_kind, kind_offsets, offsets).astype(xp.int32)
        advance = xp.where(is_kind, kind_advance, advance).astype(xp.int32)
    advance = advance.reshape(batch, length)
    start = xp.cumsum(advance, axis=1) - advance  # each token's run starts here
    if segment_ids is not None:
        segment_ids = xp.asarray(segment_ids)
        index = xp.broadcast_to(xp.arange(length), (batch, length))
        first = xp.concatenate([xp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
        segment_start = xp.maximum.accumulate(xp.where(first, index, 0), axis=1)
        start = start - xp.take_along_axis(start, segment_start, axis=1)
    return (start[None] + offsets.reshape(3, batch, length)).astype(xp.int32)


def _check_token_count(is_kind, grid, merge_size: int, kind: str, token_id: int) -> None:
    """When both are known: the input holds exactly the merged tokens the grid describes."""
    known_mask, known_grid = concrete_value(is_kind), concrete_value(grid)
    if known_mask is None or known_grid is None:
        return
    expected = int(np.sum(np.prod(known_grid, axis=1)) // merge_size**2)
    if int(known_mask.sum()) != expected:
        raise ValueError(
            f"input_ids holds {int(known_mask.sum())} {kind} tokens ({kind}_token_id={token_id}) but "
            f"{kind}_grid_thw {known_grid.tolist()} gives {expected} merged patches "
            f"(sum of t*h*w / {merge_size}^2)")
