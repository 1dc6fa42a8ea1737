"""The chunk's triangular inverse: both forms equal float64 numpy's, even for near-parallel keys; TPUs
take doubling; remat keeps the inverse and none of its levels."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from qwen_jax.ops import triangular
from qwen_jax.parallel.rules import DEFAULT_RULES, activation_sharding
from qwen_jax.train.compile_check import tpu_topology


def delta_rule_block(size, aligned, seed=0):
    """A [8, size, size] as the chunked rule builds it: tril(beta k k^T Gamma, -1) from unit keys."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((8, size, 32))
    if aligned:  # nearly parallel keys and beta = 1: the largest entries the rule can make
        keys = keys[:, :1] + 0.05 * keys
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
    beta = np.ones((8, size)) if aligned else rng.uniform(0, 1, (8, size))
    log_decay = np.cumsum(-rng.uniform(0, 0.1, (8, size)), axis=-1)
    gamma = np.exp(log_decay[:, :, None] - log_decay[:, None, :])
    return np.tril(beta[:, :, None] * (keys @ keys.transpose(0, 2, 1)) * gamma, -1)


@pytest.mark.parametrize("form, size", [("doubling", 64), ("doubling", 128), ("doubling", 40), ("blocked", 64)])
@pytest.mark.parametrize("aligned", [False, True])
def test_every_form_equals_the_float64_inverse(form, size, aligned):
    a = delta_rule_block(size, aligned)
    solve = {"doubling": lambda a: triangular.doubling_inverse(a, *triangular._indices(size)),
             "blocked": triangular._blocked_inverse}[form]
    got = np.asarray(jax.jit(solve)(jnp.asarray(a, jnp.float32)), np.float64)
    # Against the exact inverse of the float32-rounded A: aligned keys make I + A ill-conditioned (~33),
    # so that rounding alone moves the inverse by ~1e-3. A Neumann product missed it by 4e-4.
    exact = np.linalg.inv(np.eye(size) + a.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(got, exact, atol=1e-6 * np.abs(exact).max())
    np.testing.assert_array_equal(np.triu(got, 1), 0)


def test_tpus_take_doubling_and_other_platforms_the_blocked_form():
    assert triangular.inverse_method(64) == "blocked"
    assert triangular.inverse_method(40) == "doubling"  # not a whole number of blocks
    tpu_mesh = jax.sharding.Mesh(np.array(tpu_topology("v5p:1x1x1").devices), ("data",))
    with activation_sharding(tpu_mesh, DEFAULT_RULES):
        assert triangular.inverse_method(64) == "doubling"


def test_remat_of_dots_keeps_the_doubling_result_and_none_of_its_levels():
    """Each level's [C, C] products are dots that remat "dots" would keep for every chunk of every scanned
    layer; as the last level ends in a matmul, the inverse itself is kept and no level is needed."""
    a = jnp.asarray(delta_rule_block(40, aligned=False), jnp.float32)  # 40: doubling on every platform

    def loss(a):
        return jnp.sum(jnp.sin(triangular.unit_lower_inverse(a)))

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(jax.checkpoint(loss, policy=jax.checkpoint_policies.checkpoint_dots), a)
    assert printed.getvalue().count("f32[8,40,40]") == 1, printed.getvalue()
