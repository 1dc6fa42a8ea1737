"""AdamW's moments in bfloat16: stochastic rounding keeps them unbiased where round-to-nearest stalls."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from qwen_jax.config import TrainConfig
from qwen_jax.train.optimizer import make_optimizer, stochastic_round_bf16


def test_stochastic_rounding_picks_a_neighbour_with_the_right_odds():
    x = jnp.full((200_000,), 1 + 2**-9, jnp.float32)  # a quarter of the way from 1 to the next bf16, 1 + 2^-7
    rounded = np.asarray(stochastic_round_bf16(x, jax.random.key_data(jax.random.key(1))).astype(jnp.float32))
    assert set(np.unique(rounded)) == {1.0, 1 + 2**-7}
    assert abs(np.mean(rounded == 1 + 2**-7) - 0.25) < 0.005
    assert np.all(np.asarray(stochastic_round_bf16(-x, jax.random.key_data(jax.random.key(2)))) < 0)


def test_bf16_second_moment_follows_the_gradient_at_b2_0_999():
    b2, steps = 0.999, 2000
    optimizer = make_optimizer(TrainConfig(opt_state_dtype="bfloat16", b2=b2, grad_clip=0.0, weight_decay=0.0))
    params, grads = {"kernel": jnp.zeros((4096,))}, {"kernel": jnp.ones((4096,))}
    state = jax.jit(lambda s: lax.fori_loop(0, steps, lambda _, s: optimizer.update(grads, s, params)[1], s))(
        optimizer.init(params))
    nu = optax.tree_utils.tree_get(state, "nu")["kernel"]
    assert nu.dtype == jnp.bfloat16
    expected = 1 - b2**steps  # the moment of a constant gradient of 1, before Adam's bias correction
    assert abs(float(jnp.mean(nu.astype(jnp.float32))) / expected - 1) < 0.01
    # The same recurrence rounded to nearest stalls far below it: each step's decay is under half an ulp.
    nearest = lax.fori_loop(0, steps, lambda _, v: (b2 * v.astype(jnp.float32) + (1 - b2)).astype(jnp.bfloat16),
                            jnp.bfloat16(0))
    assert float(nearest) / expected < 0.3
