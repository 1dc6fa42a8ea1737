"""Partial, interleaved multimodal RoPE (mRoPE) for the full-attention layers."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.config import RopeScaling


def mrope_slot_axes(rotary_dim: int, mrope_section: tuple[int, ...]) -> np.ndarray:
    """[rotary_dim // 2] axis (0 = t, 1 = h, 2 = w) each frequency slot takes its position from.

    Interleaved THWTHW...: slot j is h when j % 3 == 1 and j < 3 * section_h, w when j % 3 == 2
    and j < 3 * section_w, t otherwise (HF applies this whatever `mrope_interleaved` says).
    """
    axes = np.zeros(rotary_dim // 2, np.int32)
    for axis in (1, 2):
        axes[axis : min(3 * mrope_section[axis], rotary_dim // 2) : 3] = axis
    return axes


def _base_frequencies(theta: float, dim: int) -> np.ndarray:
    """theta ** (2i / dim) float32 [dim / 2], the exponent in float32 and the power rounded once to float32.

    HF's torch float32 power gives the same bits at every slot of Qwen3.5's text and vision shapes (and at
    99.4% of a wider grid of thetas and dims). NumPy 2.4.6's own float32 power misses by an ulp at up to a
    quarter of them, which turns cos and sin by up to 0.03 at positions near 1M.
    """
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)


def _yarn_correction_dim(turns: float, rotary_dim: int, theta: float, original_length: int) -> float:
    """The (fractional) frequency slot that makes `turns` full turns within original_length positions."""
    return rotary_dim * math.log(original_length / (turns * 2 * math.pi)) / (2 * math.log(theta))


def rope_inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling | None = None) -> tuple[np.ndarray, float]:
    """-> (inverse frequencies float32 [rotary_dim / 2], factor on cos and sin), HF's float32 arithmetic.

    YaRN: slots turning more than beta_fast times within the original context keep their frequency,
    slots turning fewer than beta_slow times are divided by factor, and a linear ramp blends between.
    """
    base_freq = _base_frequencies(theta, rotary_dim)
    if scaling is None:
        return 1.0 / base_freq, 1.0
    original = scaling.original_max_position_embeddings
    low = _yarn_correction_dim(scaling.beta_fast, rotary_dim, theta, original)
    high = _yarn_correction_dim(scaling.beta_slow, rotary_dim, theta, original)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    keep = 1 - ramp  # 1: the slot keeps its original frequency
    inv_freq = (1.0 / (scaling.factor * base_freq)) * (1 - keep) + (1.0 / base_freq) * keep
    return inv_freq.astype(np.float32), _yarn_attention_factor(scaling)


def _yarn_attention_factor(scaling: RopeScaling) -> float:
    """The factor on cos/sin: given, or 0.1 ln(factor) + 1 (with HF's mscale / mscale_all_dim variant)."""
    if scaling.attention_factor is not None:
        return scaling.attention_factor

    def mscale(scale, weight=1.0):
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return mscale(scaling.factor, scaling.mscale) / mscale(scaling.factor, scaling.mscale_all_dim)
    return mscale(scaling.factor)


def rope_cos_sin(
    positions: jax.Array, *, rotary_dim: int, theta: float, mrope_section: tuple[int, ...], dtype,
    scaling: RopeScaling | None = None,
) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] (text) or [3, B, T] (t/h/w) -> cos, sin [B, T, rotary_dim] in `dtype`."""
    if positions.ndim == 2:
        positions = jnp.broadcast_to(positions[None], (3, *positions.shape))
    inv_freq, attention_factor = rope_inv_freq(rotary_dim, theta, scaling)
    slot_positions = positions[mrope_slot_axes(rotary_dim, mrope_section)]  # [R/2, B, T]
    angles = jnp.moveaxis(slot_positions, 0, -1).astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    # HF computes the tables in float32 and casts them to the activation dtype before use.
    cos, sin = jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on the first R channels of x [B, T, N, D]; cos, sin [B, T, R]."""
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x_rot * cos + rotated_half * sin, x_pass], axis=-1).astype(x.dtype)
