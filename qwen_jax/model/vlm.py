"""Early fusion (spec section 5.3): the vision tower's outputs replace, in order, the embeddings of
the image and video placeholder tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.config import ModelConfig
from qwen_jax.model.positions import concrete_value
from qwen_jax.model.vision import VisionModel


def scatter_features(h: jax.Array, input_ids: jax.Array, token_id: int, features: jax.Array,
                     kind: str) -> jax.Array:
    """h [B, T, H]: the rows where input_ids == token_id become features [N, H], in row-major
    order (HF's masked_scatter)."""
    is_token = input_ids == token_id
    known = concrete_value(is_token)
    if known is not None and int(known.sum()) != features.shape[0]:
        raise ValueError(
            f"input_ids holds {int(known.sum())} {kind} tokens ({kind}_token_id={token_id}) but the "
            f"vision tower gives {features.shape[0]} (sum of t*h*w / spatial_merge_size^2 over "
            f"{kind}_grid_thw)")
    rank = jnp.cumsum(is_token.reshape(-1)) - 1
    rows = features[jnp.clip(rank, 0, features.shape[0] - 1)].reshape(*input_ids.shape, -1)
    return jnp.where(is_token[..., None], rows.astype(h.dtype), h)


def check_vision_arguments(config: ModelConfig, pixel_values, image_grid_thw, pixel_values_videos,
                           video_grid_thw, positions) -> None:
    """Vision inputs need a vision tower, pixels need their grid, per-row pixels their positions."""
    given = [name for name, x in (("pixel_values", pixel_values), ("image_grid_thw", image_grid_thw),
                                  ("pixel_values_videos", pixel_values_videos),
                                  ("video_grid_thw", video_grid_thw)) if x is not None]
    if given and config.vision is None:
        raise ValueError(
            f"{', '.join(given)} given but this model has no vision tower (config.vision is None)")
    if pixel_values is not None and image_grid_thw is None:
        raise ValueError("pixel_values needs image_grid_thw ([num_images, 3]: t, h, w in patches)")
    if pixel_values_videos is not None and video_grid_thw is None:
        raise ValueError("pixel_values_videos needs video_grid_thw ([num_videos, 3]: t, h, w in patches)")
    per_row = [x for x in (pixel_values, pixel_values_videos) if x is not None and jnp.ndim(x) == 3]
    if per_row and positions is None:
        raise ValueError("per-row pixels [batch, patches, dim] need positions [3, batch, length] "
                         "(the packed pipeline gives them); HF's flat layout computes its own")


def embed_vision(visual: VisionModel, config: ModelConfig, h: jax.Array, input_ids: jax.Array,
                 pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw) -> jax.Array:
    """h [B, T, H] (token embeddings) with the images' and videos' placeholder rows filled in."""
    items = (("image", pixel_values, image_grid_thw, config.image_token_id),
             ("video", pixel_values_videos, video_grid_thw, config.video_token_id))
    for kind, pixels, grid, token_id in items:
        if pixels is None:
            continue
        pixels = jnp.asarray(pixels)
        if pixels.ndim == 3:
            h = embed_rows(visual, config, h, input_ids, pixels, grid, token_id, kind)
        else:
            h = scatter_features(h, input_ids, token_id, visual(pixels, grid, kind=kind), kind)
    return h


def embed_rows(visual: VisionModel, config: ModelConfig, h: jax.Array, input_ids: jax.Array,
               pixels: jax.Array, grid, token_id: int, kind: str) -> jax.Array:
    """Per-row images (the packed pipeline's layout: pixels [B, P, D], grid [B, I, 3], zero rows
    after the real ones): each row's tower and scatter run on that row alone, so with rows
    sharded over the batch axes every device embeds only its own images."""
    if jnp.ndim(grid) != 3 or jnp.shape(grid)[0] != pixels.shape[0]:
        raise ValueError(f"per-row {kind} pixels {pixels.shape} need a [batch, {kind}s, 3] grid, "
                         f"got shape {jnp.shape(grid)}")
    merge = config.vision.spatial_merge_size

    def one_row(h, ids, pixels, grid):
        flat, full_grid = vision_tower_inputs(pixels[None], grid[None], merge)
        features = visual(flat, full_grid, kind=kind)
        return scatter_features(h[None], ids[None], token_id, features, kind)[0]

    return jax.vmap(one_row)(h, input_ids, pixels, jnp.asarray(grid))


def vision_tower_inputs(pixel_values, image_grid_thw, merge_size: int = 2):
    """pixel_values [B, P, D], image_grid_thw [B, I, 3] -> (pixel_values [B*P, D], grid [B*I+1, 3])
    for the vision tower and the model's in-order scatter, fixed shapes, numpy or jax (under jit).

    The real patches of all rows move to the front in row order, so the tower's first outputs are
    the features of the image tokens in row-major order, as the scatter takes them. The padding
    patches go to the end as one filler image (1, merge, pad / merge) that attends only to itself
    and whose features no token takes; the (0, 0, 0) grids stay and cover nothing.
    """
    xp = jnp if any(isinstance(x, jax.Array) for x in (pixel_values, image_grid_thw)) else np
    batch, max_patches, dim = pixel_values.shape
    used = xp.sum(xp.prod(image_grid_thw, axis=-1), axis=-1)  # real patches per row [B]
    ends = xp.cumsum(used)
    slot = xp.arange(batch * max_patches)
    row = xp.minimum(xp.searchsorted(ends, slot, side="right"), batch - 1)
    source = row * max_patches + slot - (ends - used)[row]
    real = slot < ends[-1]
    flat = pixel_values.reshape(batch * max_patches, dim)
    compact = xp.where(real[:, None], flat[xp.where(real, source, 0)], 0).astype(flat.dtype)
    padding = batch * max_patches - ends[-1]
    # Padding is whole merge blocks (P and every image are), so pad / merge tiles into blocks too.
    some = xp.minimum(padding, 1)
    filler = xp.stack([some, merge_size * some, padding // merge_size])
    grid = xp.concatenate([image_grid_thw.reshape(-1, 3),
                           filler[None].astype(image_grid_thw.dtype)])
    return compact, grid
