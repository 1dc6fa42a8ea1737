"""Early fusion (spec section 5.3): the vision tower's outputs replace, in order, the embeddings of
the image and video placeholder tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
                           video_grid_thw) -> None:
    """Vision inputs need a vision tower, and pixels need their grid."""
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


def embed_vision(visual: VisionModel, config: ModelConfig, h: jax.Array, input_ids: jax.Array,
                 pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw) -> jax.Array:
    """h [B, T, H] (token embeddings) with the images' and videos' placeholder rows filled in."""
    items = (("image", pixel_values, image_grid_thw, config.image_token_id),
             ("video", pixel_values_videos, video_grid_thw, config.video_token_id))
    for kind, pixels, grid, token_id in items:
        if pixels is not None:
            features = visual(jnp.asarray(pixels), grid, kind=kind)
            h = scatter_features(h, input_ids, token_id, features, kind)
    return h
