"""(I + A)^-1 for strictly lower-triangular A, by blocked substitution, with a matmul-only backward.

Why not jax.scipy.linalg.solve_triangular: on XLA:CPU its LAPACK call hangs when a sharded
program runs it on several devices inside a differentiated loop (seen with jax 0.10.2), and a
plain substitution loop would keep one residual per row for the backward pass.
"""

import jax
import jax.numpy as jnp
from jax import lax


def _forward_substitution(a: jax.Array) -> jax.Array:
    """a [..., C, C] strictly lower -> (I + a)^-1, one row at a time (row i only needs rows < i)."""
    size = a.shape[-1]
    eye = jnp.eye(size, dtype=a.dtype)

    def row(i, inverse):
        new_row = eye[i] - jnp.einsum("...s,...sc->...c", a[..., i, :], inverse,
                                      precision=lax.Precision.HIGHEST)
        return inverse.at[..., i, :].set(new_row)

    return lax.fori_loop(0, size, row, jnp.zeros_like(a))


BLOCK = 16  # diagonal blocks small enough that their Neumann series' powers stay tame in float32


def _matmul(a, b):
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


def _nilpotent_inverse(a: jax.Array) -> jax.Array:
    """a [..., n, n] strictly lower -> (I + a)^-1 = (I - a)(I + a^2)(I + a^4)..., log2(n) squarings."""
    size = a.shape[-1]
    power = -a
    inverse = jnp.eye(size, dtype=a.dtype) + power
    reach = 2  # inverse holds every power of -a below `reach`
    while reach < size:
        power = _matmul(power, power)
        inverse = inverse + _matmul(inverse, power)
        reach *= 2
    return inverse


def _blocked_inverse(a: jax.Array) -> jax.Array:
    """a [..., C, C] strictly lower, C a multiple of BLOCK -> (I + a)^-1, one block row at a time.

    Block row i of the inverse T: T_ii = (I + a_ii)^-1 and T_i,<i = -T_ii a_i,<i T_<i,<i.
    """
    size = a.shape[-1]
    blocks = size // BLOCK
    starts = range(0, size, BLOCK)
    diagonal = jnp.stack([a[..., s:s + BLOCK, s:s + BLOCK] for s in starts], axis=-3)
    diagonal_inverse = _nilpotent_inverse(diagonal)  # [..., blocks, BLOCK, BLOCK]
    inverse = diagonal_inverse[..., 0, :, :]  # the leading (i * BLOCK)-square of T
    for i in range(1, blocks):
        s = i * BLOCK
        t_ii = diagonal_inverse[..., i, :, :]
        below = -_matmul(t_ii, _matmul(a[..., s:s + BLOCK, :s], inverse))  # [..., BLOCK, s]
        top = jnp.concatenate([inverse, jnp.zeros((*inverse.shape[:-1], BLOCK), a.dtype)], axis=-1)
        inverse = jnp.concatenate([top, jnp.concatenate([below, t_ii], axis=-1)], axis=-2)
    return inverse


def _inverse(a: jax.Array) -> jax.Array:
    """Blocked when C is a multiple of BLOCK, else row by row."""
    if a.shape[-1] % BLOCK == 0:
        return _blocked_inverse(a)
    return _forward_substitution(a)


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
