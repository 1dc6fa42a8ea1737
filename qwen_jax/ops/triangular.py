"""(I + A)^-1 for strictly lower-triangular A, from matmuls only, with a matmul-only backward.

Why not jax.scipy.linalg.solve_triangular: on XLA:CPU its LAPACK call hangs when a sharded
program runs it on several devices inside a differentiated loop (seen with jax 0.10.2), and a
plain substitution loop would keep one residual per row for the backward pass.

Why doubling and not a Neumann product (I - A)(I + A^2)(I + A^4)...: with near-parallel keys and
beta = 1, A's powers grow like binomial coefficients and the product's cancellations lost 4e-4 of a
64-token chunk's inverse in float32 (16 x 16 blocks); doubling keeps 1.4e-7 there, with as many matmuls.
"""

import jax
import jax.numpy as jnp
from jax import lax

from qwen_jax.parallel.rules import target_platform

BLOCK = 16  # the blocked form's diagonal blocks: few flops on CPU, and tiles a GPU handles whole


def _matmul(a, b):
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


def _double(inverse, a, row, col, eye, level, matmul):
    """T of a's diagonal blocks of size 2^level -> T of those of size 2^(level + 1): (I - T L) T."""
    same_block = lax.shift_right_logical(row, level + 1) == lax.shift_right_logical(col, level + 1)
    same_half = lax.shift_right_logical(row, level) == lax.shift_right_logical(col, level)
    across = jnp.where(same_block & ~same_half, a, 0.0)  # L: a between each block's two halves
    # Not T - T L T: then remat "dots" keeps the levels' products, for every chunk and scanned layer, to
    # recompute the subtraction (0.8B on v5p:2x2x1: 27.05 GiB of temporaries, not 22.40).
    return matmul(eye - matmul(inverse, across), inverse)


def doubling_inverse(a, row, col, matmul=_matmul):
    """a [..., n, n] strictly lower -> (I + a)^-1; row, col: the [n, 1] and [1, n] (or [n, n]) int32 indices.

    The inverse T of each diagonal block of size b gives that of size 2b: T <- (I - T L) T, with L the
    part of a between the block's two halves. Two [n, n] matmuls a level after the first, ceil(log2 n)
    levels. Bit shifts and no integer division, so the same code runs inside a Mosaic kernel (matmul:
    its own). The result is a matmul's: remat "dots" keeps it alone, and needs none of the levels.
    """
    eye = jnp.where(row == col, 1.0, 0.0).astype(a.dtype)
    first = jnp.where(lax.shift_right_logical(row, 1) == lax.shift_right_logical(col, 1), a, 0.0)
    inverse = jnp.broadcast_to(eye - first, a.shape)  # blocks of two: [[1, 0], [-x, 1]]
    for level in range(1, max(a.shape[-1] - 1, 0).bit_length()):
        inverse = _double(inverse, a, row, col, eye, level, matmul)
    return inverse


def _indices(size: int):
    index = jnp.arange(size, dtype=jnp.int32)
    return index[:, None], index[None, :]


def _blocked_inverse(a: jax.Array) -> jax.Array:
    """a [..., C, C] strictly lower, C a multiple of BLOCK -> (I + a)^-1, one block row at a time.

    Block row i of the inverse T: T_ii = (I + a_ii)^-1 and T_i,<i = -T_ii a_i,<i T_<i,<i.
    """
    size = a.shape[-1]
    blocks = size // BLOCK
    starts = range(0, size, BLOCK)
    diagonal = jnp.stack([a[..., s:s + BLOCK, s:s + BLOCK] for s in starts], axis=-3)
    diagonal_inverse = doubling_inverse(diagonal, *_indices(BLOCK))  # [..., blocks, BLOCK, BLOCK]
    inverse = diagonal_inverse[..., 0, :, :]  # the leading (i * BLOCK)-square of T
    for i in range(1, blocks):
        s = i * BLOCK
        t_ii = diagonal_inverse[..., i, :, :]
        below = -_matmul(t_ii, _matmul(a[..., s:s + BLOCK, :s], inverse))  # [..., BLOCK, s]
        top = jnp.concatenate([inverse, jnp.zeros((*inverse.shape[:-1], BLOCK), a.dtype)], axis=-1)
        inverse = jnp.concatenate([top, jnp.concatenate([below, t_ii], axis=-1)], axis=-2)
    return inverse


def inverse_method(size: int) -> str:
    """How a [size, size] block is inverted where the program runs: 'blocked' or 'doubling'.

    TPUs take doubling at full size: [16, 16] blocks fill an eighth of an (8, 128) tile and the blocked
    form's concatenates copy. XLA:TPU's own estimate for the gated delta rule of a train step (v5p, B4
    T4096 H16 D128, fwd+bwd) falls from 22.3 to 16.5 GB moved. On CPU, full-size doubling ran at 0.87x
    (fwd) and 0.91x (fwd+bwd) the blocked form's speed (the zero blocks cost flops), so CPUs and GPUs
    keep the blocked form.
    """
    return "blocked" if size % BLOCK == 0 and target_platform() != "tpu" else "doubling"


def _inverse(a: jax.Array) -> jax.Array:
    if inverse_method(a.shape[-1]) == "blocked":
        return _blocked_inverse(a)
    return doubling_inverse(a, *_indices(a.shape[-1]))


@jax.custom_vjp
def unit_lower_inverse(a: jax.Array) -> jax.Array:
    """a [..., C, C] strictly lower-triangular -> (I + a)^-1 [..., C, C] (unit lower-triangular)."""
    return _inverse(a)


def _inverse_fwd(a):
    inverse = _inverse(a)
    return inverse, inverse


def _inverse_bwd(inverse, grad):
    # T = (I + A)^-1, dT = -T dA T  =>  dA = -T^T G T^T, kept on A's strictly lower support.
    t_transposed = jnp.swapaxes(inverse, -1, -2)
    grad_a = -jnp.matmul(jnp.matmul(t_transposed, grad, precision=lax.Precision.HIGHEST),
                         t_transposed, precision=lax.Precision.HIGHEST)
    return (jnp.tril(grad_a, -1),)


unit_lower_inverse.defvjp(_inverse_fwd, _inverse_bwd)
