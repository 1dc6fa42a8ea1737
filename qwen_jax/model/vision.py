"""The Qwen3.5 vision tower (spec section 5.2): patch embedding, learned positions resampled to each
image, 2-D rotary, pre-LN ViT blocks that attend within one frame, and the 2x2 patch merger.

pixel_values rows come image by image, frame by frame, and inside a frame in merge-block order
(block_row, block_col, row_in_block, col_in_block), as HF's processor writes them. Everything that
depends on the grids is computed from image_grid_thw with array ops, so shapes depend only on the
number of patches and images, and the tower jits once per such shape.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax.config import VisionConfig
from qwen_jax.model.positions import check_grid, concrete_value
from qwen_jax.model.rope import apply_rope, rope_inv_freq

LAYER_NORM_EPS = 1e-6  # HF hard-codes it for every vision LayerNorm


def patch_coordinates(grid_thw: jax.Array, num_patches: int, merge_size: int):
    """grid_thw [I, 3] -> per patch, each [num_patches] int32: frame (a number unique to its image
    and temporal slice: the attention segment), row, col, and its image's height and width."""
    t, h, w = grid_thw[:, 0], grid_thw[:, 1], grid_thw[:, 2]
    counts = t * h * w
    ends = jnp.cumsum(counts)
    patch = jnp.arange(num_patches)
    image = jnp.minimum(jnp.searchsorted(ends, patch, side="right"), grid_thw.shape[0] - 1)
    local = patch - (ends - counts)[image]
    height, width = h[image], w[image]
    frame_in_image, within = jnp.divmod(local, height * width)
    frame = (jnp.cumsum(t) - t)[image] + frame_in_image
    block, in_block = jnp.divmod(within, merge_size * merge_size)
    block_row, block_col = jnp.divmod(block, width // merge_size)
    row_in_block, col_in_block = jnp.divmod(in_block, merge_size)
    return (frame, block_row * merge_size + row_in_block, block_col * merge_size + col_in_block,
            height, width)


def _bilinear_taps(index: jax.Array, size: jax.Array, side: int) -> tuple[jax.Array, jax.Array]:
    """Target cells `index` [N] of axes of length `size` [N] -> the two source cells [N, 2] of a
    `side`-long table and their weights [N, 2] (align_corners=True: the ends map onto the ends)."""
    # HF's float32 arithmetic, op for op, so the floor lands on the same cell.
    source = index.astype(jnp.float32) * (side - 1) / jnp.maximum(size - 1, 1).astype(jnp.float32)
    floor = jnp.floor(source)
    offsets = jnp.arange(2)
    weights = jnp.maximum(1 - jnp.abs(source[:, None] - floor[:, None] - offsets), 0)
    taps = jnp.clip(floor.astype(jnp.int32)[:, None] + offsets, 0, side - 1)
    return taps, weights


def resampled_position_embedding(table: jax.Array, row, col, height, width) -> jax.Array:
    """table [side^2, C] (a side x side grid) resampled bilinearly to each patch's image grid ->
    [N, C] float32."""
    side = int(round(table.shape[0] ** 0.5))
    row_taps, row_weights = _bilinear_taps(row, height, side)
    col_taps, col_weights = _bilinear_taps(col, width, side)
    index = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
    weight = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
    return jnp.sum(table[index].astype(jnp.float32) * weight[..., None], axis=1)


def vision_rotary(row: jax.Array, col: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Axial 2-D RoPE: row, col [N] -> cos, sin [N, head_dim] float32; the first half of the
    frequencies turn with the row, the second with the column, rotating the whole head."""
    half = head_dim // 2
    inv_freq = rope_inv_freq(half, theta)[0]
    angles = jnp.concatenate([row[:, None].astype(jnp.float32) * inv_freq,
                              col[:, None].astype(jnp.float32) * inv_freq], axis=-1)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _linear(in_features: int, out_features: int, *, dtype, param_dtype, init_std, rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.initializers.normal(init_std), rngs=rngs)


def _layer_norm(features: int, *, dtype, param_dtype, rngs) -> nnx.LayerNorm:
    # Two-pass variance, as torch computes it.
    return nnx.LayerNorm(features, epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype,
                         use_fast_variance=False, rngs=rngs)


class VisionAttention(nnx.Module):
    """Bidirectional attention with 2-D rotary, masked to the patch's own frame."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, init_std=cfg.initializer_range, rngs=rngs)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        # qkv rows: all q, then all k, then all v, heads contiguous inside each.
        self.qkv = _linear(cfg.hidden_size, 3 * cfg.hidden_size, **kw)
        self.proj = _linear(cfg.hidden_size, cfg.hidden_size, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x [N, C], cos/sin [N, head_dim] float32, mask bool [1, 1, N, N] -> [N, C]."""
        q, k, v = jnp.unstack(self.qkv(x).reshape(x.shape[0], 3, self.num_heads, self.head_dim), axis=1)
        # apply_rope takes [B, T, heads, D]; float32 cos/sin make it rotate in float32, as HF does.
        q = apply_rope(q[None], cos[None], sin[None])
        k = apply_rope(k[None], cos[None], sin[None])
        # XLA's attention: the block-diagonal mask is not a pattern cuDNN's fused kernel takes.
        out = jax.nn.dot_product_attention(q, k, v[None], mask=mask, scale=self.head_dim**-0.5,
                                           implementation="xla")
        return self.proj(out.reshape(x.shape))


class VisionMLP(nnx.Module):
    """linear_fc1, GELU (tanh-approximated for every published tower), linear_fc2; with biases."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, init_std=cfg.initializer_range, rngs=rngs)
        self.approximate = cfg.hidden_act == "gelu_pytorch_tanh"
        self.linear_fc1 = _linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.linear_fc2 = _linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[N, C] -> [N, C]."""
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=self.approximate))


class VisionBlock(nnx.Module):
    """Pre-LN ViT block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = _layer_norm(cfg.hidden_size, **kw)
        self.norm2 = _layer_norm(cfg.hidden_size, **kw)
        self.attn = VisionAttention(cfg, **kw)
        self.mlp = VisionMLP(cfg, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x [N, C] -> [N, C]."""
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """LayerNorm per patch, then each merge block's patches side by side -> fc1, exact GELU, fc2."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, init_std=cfg.initializer_range, rngs=rngs)
        merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.norm = _layer_norm(cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_fc1 = _linear(merged, merged, **kw)
        self.linear_fc2 = _linear(merged, cfg.out_hidden_size, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[N, C] (merge blocks contiguous) -> [N / merge^2, out_hidden_size]."""
        merged = self.norm(x).reshape(-1, self.linear_fc1.in_features)
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(merged), approximate=False))


class PatchEmbed(nnx.Module):
    """Conv3d with stride = kernel, i.e. a linear map of each patch's (C, t, p, p) values, with bias."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
        self.patch_shape = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        # kernel [C, t, p, p, hidden]: HF's [hidden, C, t, p, p] with the output axis moved last.
        self.proj = nnx.LinearGeneral(
            self.patch_shape, cfg.hidden_size, axis=(-4, -3, -2, -1), dtype=dtype,
            param_dtype=param_dtype, kernel_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """[N, C * t * p * p] -> [N, hidden]."""
        return self.proj(pixel_values.reshape(pixel_values.shape[0], *self.patch_shape))


class VisionModel(nnx.Module):
    """HF `Qwen3_5VisionModel`: pixel patches -> one token embedding per merge block."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, remat_policy: Callable | None = None,
                 rngs: nnx.Rngs):
        self.config = cfg
        self.remat_policy = remat_policy
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = PatchEmbed(cfg, **kw)
        self.pos_embed = nnx.Embed(cfg.num_position_embeddings, cfg.hidden_size,
                                   embedding_init=nnx.initializers.normal(cfg.initializer_range), **kw)

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return VisionBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.blocks = make_blocks(rngs)  # stacked [depth, ...] and scanned, like the decoder layers
        self.merger = PatchMerger(cfg, **kw)

    def __call__(self, pixel_values: jax.Array, grid_thw: jax.Array, *, kind: str = "image") -> jax.Array:
        """pixel_values [N, C * t * p * p], grid_thw int [I, 3] (t, h, w in patches) ->
        [N / merge^2, out_hidden_size], items in order. kind ("image" | "video") names the inputs in
        errors."""
        cfg = self.config
        grid_thw = grid_thw if isinstance(grid_thw, jax.Array) else np.asarray(grid_thw)
        check_vision_inputs(cfg, pixel_values, grid_thw, kind)
        frame, row, col, height, width = patch_coordinates(
            jnp.asarray(grid_thw, jnp.int32), pixel_values.shape[0], cfg.spatial_merge_size)
        x = self.patch_embed(pixel_values)
        x = x + resampled_position_embedding(
            self.pos_embed.embedding[...], row, col, height, width).astype(x.dtype)
        cos, sin = vision_rotary(row, col, cfg.head_dim, cfg.rope_theta)
        mask = (frame[:, None] == frame[None, :])[None, None]
        graphdef, state = nnx.split(self.blocks)

        def body(x, block_state):
            return nnx.merge(graphdef, block_state)(x, cos, sin, mask), None

        if self.remat_policy is not None:
            body = jax.checkpoint(body, policy=self.remat_policy)
        x, _ = jax.lax.scan(body, x, state)
        return self.merger(x)


def check_vision_inputs(cfg: VisionConfig, pixel_values: jax.Array, grid_thw, kind: str) -> None:
    """Shapes always; that the grids cover exactly the patch rows when their values are known."""
    name, grid_name = ("pixel_values", "image_grid_thw") if kind == "image" else (
        "pixel_values_videos", "video_grid_thw")
    merge = cfg.spatial_merge_size
    if pixel_values.ndim != 2 or pixel_values.shape[1] != cfg.patch_dim:
        raise ValueError(
            f"{name} must be [num_patches, {cfg.patch_dim}] (in_channels x temporal_patch_size x "
            f"patch_size^2), got shape {tuple(pixel_values.shape)}")
    check_grid(grid_thw, merge, grid_name)
    grid = concrete_value(grid_thw)
    if grid is not None and int(np.sum(np.prod(grid, axis=1))) != pixel_values.shape[0]:
        raise ValueError(f"{grid_name} {grid.tolist()} covers {int(np.sum(np.prod(grid, axis=1)))} "
                         f"patches (sum of t*h*w) but {name} has {pixel_values.shape[0]} rows")
    if pixel_values.shape[0] % merge**2:
        raise ValueError(f"{name} has {pixel_values.shape[0]} rows, not a multiple of "
                         f"spatial_merge_size^2 = {merge**2}")
