"""RL algorithm pieces: advantage estimators and the clipped policy objective against numpy."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.config import ConfigError
from qwen_jax.rl.advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from qwen_jax.rl.losses import (KL_ESTIMATORS, POLICY_LOSSES, PolicyLossConfig, policy_objective,
                                token_entropy, token_logprobs)

# Two groups of K = 4: group 0 has mean 0.5 and population std 0.5, group 1 mean 2 and std sqrt(0.5).
REWARDS = np.array([[1.0, 0.0, 0.0, 1.0],
                    [3.0, 1.0, 2.0, 2.0]], np.float32)
R2 = np.sqrt(2.0)
EXPECTED = {
    "grpo": [[1, -1, -1, 1], [R2, -R2, 0, 0]],
    "dr_grpo": [[0.5, -0.5, -0.5, 0.5], [1, -1, 0, 0]],
    # r_i - mean of the other three: 1 - 1/3, 0 - 2/3; 3 - 5/3, 1 - 7/3, 2 - 2.
    "rloo": [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [4 / 3, -4 / 3, 0, 0]],
    # centred values over the batch RMS sqrt((4 * 0.25 + 1 + 1) / 8) = sqrt(3 / 8).
    "reinforce_pp": [[0.5 / np.sqrt(3 / 8), -0.5 / np.sqrt(3 / 8), -0.5 / np.sqrt(3 / 8),
                      0.5 / np.sqrt(3 / 8)], [1 / np.sqrt(3 / 8), -1 / np.sqrt(3 / 8), 0, 0]],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_advantages_match_hand_computed_values(name):
    assert set(EXPECTED) == set(ADVANTAGE_ESTIMATORS)
    advantages = compute_advantages(name, REWARDS)
    np.testing.assert_allclose(advantages, np.array(EXPECTED[name]), rtol=1e-5, atol=1e-6)


def test_grpo_normalize_std_false_is_dr_grpo():
    np.testing.assert_allclose(compute_advantages("grpo", REWARDS, normalize_std=False),
                               EXPECTED["dr_grpo"], atol=1e-6)


def test_failed_samples_get_zero_and_leave_the_statistics():
    rewards = np.array([[1.0, 0.0, 5.0, 0.0]], np.float32)
    valid = np.array([[True, True, False, True]])
    # Valid rewards 1, 0, 0: mean 1/3, population std sqrt(2) / 3.
    np.testing.assert_allclose(compute_advantages("grpo", rewards, valid=valid),
                               [[R2, -R2 / 2, 0, -R2 / 2]], rtol=1e-5)
    np.testing.assert_allclose(compute_advantages("rloo", rewards, valid=valid),
                               [[1, -0.5, 0, -0.5]], rtol=1e-6)
    # One group only: the batch RMS of (2/3, -1/3, -1/3) over 3 valid samples is sqrt(2) / 3.
    np.testing.assert_allclose(compute_advantages("reinforce_pp", rewards, valid=valid),
                               [[R2, -R2 / 2, 0, -R2 / 2]], rtol=1e-5)


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_flat_and_empty_groups_give_exact_zeros(name):
    # XLA's fp32 mean of three 0.1s misses 0.1 by an ulp: the flat group must still give exactly 0.
    rewards = np.array([[0.1, 0.1, 0.1], [0.7, 0.2, 0.7], [1.0, 2.0, 3.0]], np.float32)
    valid = np.array([[True, True, True], [True, False, True], [False, False, False]])
    advantages = np.asarray(compute_advantages(name, rewards, valid=valid))
    assert np.all(advantages == 0.0), advantages
    everything_flat = compute_advantages(name, np.full((2, 3), 0.3, np.float32))
    assert np.all(np.asarray(everything_flat) == 0.0)


def test_advantage_errors_name_the_problem():
    with pytest.raises(ConfigError, match="'gae'.*grpo, reinforce_pp, rloo"):
        compute_advantages("gae", REWARDS)
    with pytest.raises(ValueError, match="K >= 2"):
        compute_advantages("rloo", REWARDS[:, :1])
    with pytest.raises(ValueError, match="shape"):
        compute_advantages("grpo", REWARDS.reshape(-1))


def test_advantages_jit():
    jitted = jax.jit(functools.partial(compute_advantages, "grpo"))
    np.testing.assert_allclose(jitted(REWARDS), EXPECTED["grpo"], rtol=1e-5)


@functools.partial(jax.jit, static_argnames="cfg")
def objective_and_grad(logprobs, old_logprobs, advantages, mask, cfg, **inputs):
    """((loss, metrics), d loss / d logprobs); compiled, as an eager backward pass is slow on CPU."""
    return jax.value_and_grad(policy_objective, has_aux=True)(
        logprobs, old_logprobs, advantages, mask, cfg, **inputs)


def random_batch(seed=0, batch=8, length=12, spread=0.4):
    """Log-probs, old log-probs, advantages [B], and a mask of responses of different lengths."""
    rng = np.random.default_rng(seed)
    old = np.log(rng.uniform(0.05, 0.9, (batch, length))).astype(np.float32)
    logprobs = (old + rng.normal(0.0, spread, (batch, length))).astype(np.float32)
    advantages = rng.normal(0.0, 1.0, batch).astype(np.float32)
    starts = rng.integers(0, 4, batch)
    lengths = rng.integers(1, length - 4, batch)
    positions = np.arange(length)
    mask = ((positions >= starts[:, None]) & (positions < (starts + lengths)[:, None]))
    return logprobs, old, advantages, mask.astype(np.float32)


def numpy_clipped_tokens(ratio, advantages, clip_low, clip_high):
    """[B, T] -> per-token -min(r A, clip(r) A) and whether the clipped branch was taken."""
    unclipped = ratio * advantages
    clipped = np.clip(ratio, 1 - clip_low, 1 + clip_high) * advantages
    return -np.minimum(unclipped, clipped), clipped < unclipped


@pytest.mark.parametrize("name", ["ppo", "dapo"])
def test_token_ratio_losses_match_numpy(name):
    logprobs, old, advantages, mask = random_batch()
    cfg = PolicyLossConfig.recommended(name)
    ratio = np.exp(logprobs.astype(np.float64) - old)
    tokens, active = numpy_clipped_tokens(ratio, advantages[:, None], cfg.clip_low, cfg.clip_high)
    on = mask > 0
    # The example must cover every case: above and below the clip range, both advantage signs.
    assert (ratio[on] > 1 + cfg.clip_high).any() and (ratio[on] < 1 - cfg.clip_low).any()
    assert (advantages > 0).any() and (advantages < 0).any() and active[on].any()

    loss, metrics = policy_objective(logprobs, old, advantages, mask, cfg)
    np.testing.assert_allclose(loss, tokens[on].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["actor/pg_loss"], tokens[on].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["actor/clipfrac"], active[on].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["actor/ratio_mean"], ratio[on].mean(), rtol=1e-5)


def test_dapo_clips_higher_than_ppo():
    # Ratio 1.25 with A > 0: inside DAPO's ceiling 1.28, clipped at PPO's 1.2.
    logprobs = np.log(np.array([[1.25]], np.float32))
    old, mask, advantages = np.zeros((1, 1), np.float32), np.ones((1, 1), np.float32), np.ones(1)
    ppo, _ = policy_objective(logprobs, old, advantages, mask, PolicyLossConfig.recommended("ppo"))
    dapo, _ = policy_objective(logprobs, old, advantages, mask, PolicyLossConfig.recommended("dapo"))
    np.testing.assert_allclose([ppo, dapo], [-1.2, -1.25], rtol=1e-6)


def test_gspo_matches_numpy_sequence_objective():
    logprobs, old, advantages, mask = random_batch(seed=1, spread=1e-3)
    cfg = PolicyLossConfig.recommended("gspo")
    assert (cfg.clip_low, cfg.clip_high, cfg.aggregation) == (3e-4, 4e-4, "sequence-mean")
    tokens = mask.sum(1)
    ratio = np.exp(((logprobs.astype(np.float64) - old) * mask).sum(1) / tokens)
    losses, active = numpy_clipped_tokens(ratio, advantages, cfg.clip_low, cfg.clip_high)
    assert active.any() and not active.all()

    loss, metrics = policy_objective(logprobs, old, advantages, mask, cfg)
    np.testing.assert_allclose(loss, losses.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["actor/clipfrac"], active.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["actor/ratio_mean"], ratio.mean(), rtol=1e-6)
    # token-mean weights each response by its length.
    loss, _ = policy_objective(logprobs, old, advantages, mask,
                               dataclasses.replace(cfg, aggregation="token-mean"))
    np.testing.assert_allclose(loss, (losses * tokens).sum() / tokens.sum(), rtol=1e-5)


def test_gspo_token_gradient_equals_sequence_level_gradient():
    logprobs, old, advantages, mask = random_batch(seed=2, batch=6, spread=0.05)
    cfg = PolicyLossConfig(policy_loss="gspo", clip_low=0.02, clip_high=0.02,
                           aggregation="sequence-mean")

    def sequence_level(lp):
        s = jnp.exp(jnp.sum((lp - old) * mask, 1) / mask.sum(1))
        clipped = jnp.clip(s, 1 - cfg.clip_low, 1 + cfg.clip_high)
        return -jnp.mean(jnp.minimum(s * advantages, clipped * advantages))

    _, token_form = objective_and_grad(logprobs, old, advantages, mask, cfg)
    expected = jax.jit(jax.grad(sequence_level))(logprobs)
    assert np.abs(expected).max() > 1e-3  # some sequences inside the clip range carry gradient
    np.testing.assert_allclose(token_form, expected, rtol=1e-5, atol=1e-7)


def constructed_clip_example():
    """Six tokens, five trained on; the clip is active on two of them (ratio 1.5 A+, 0.5 A-)."""
    ratio = np.array([[1.5, 1.5, 0.5, 0.5, 1.0, 3.0]], np.float32)
    advantages = np.array([[1.0, -1.0, -1.0, 1.0, 1.0, 1.0]], np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 0]], np.float32)
    return np.log(ratio), np.zeros_like(ratio), advantages, mask


def test_clipfrac_exact_and_no_gradient_where_clipped():
    logprobs, old, advantages, mask = constructed_clip_example()
    cfg = PolicyLossConfig()
    (_, metrics), grad = objective_and_grad(logprobs, old, advantages, mask, cfg)
    np.testing.assert_allclose(metrics["actor/clipfrac"], 2 / 5, rtol=1e-6)
    # d(-r A)/d logp / 5 tokens = -r A / 5 where unclipped; 0 where clipped and on the masked token.
    np.testing.assert_allclose(grad[0], [0, 1.5 / 5, 0, -0.5 / 5, -1 / 5, 0], rtol=1e-6, atol=1e-7)


def test_kl_estimators_values_and_k3_non_negative():
    x = np.array([-2.0, -0.1, 0.0, 0.3, 1.5], np.float32)  # log pi - log pi_ref
    np.testing.assert_allclose(KL_ESTIMATORS["k1"](x), x)
    np.testing.assert_allclose(KL_ESTIMATORS["k2"](x), 0.5 * x**2)
    np.testing.assert_allclose(KL_ESTIMATORS["k3"](x), np.exp(-x) + x - 1, rtol=1e-5, atol=1e-7)
    tiny = np.random.default_rng(0).normal(0, 1e-4, 10_000).astype(np.float32)
    assert np.all(np.asarray(KL_ESTIMATORS["k3"](np.concatenate([tiny, 10 * x]))) >= 0)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_term_adds_the_aggregated_estimate(estimator):
    logprobs, old, advantages, mask = random_batch(seed=3)
    ref = old - 0.3
    plain, _ = policy_objective(logprobs, old, advantages, mask, PolicyLossConfig())
    cfg = PolicyLossConfig(kl_estimator=estimator, kl_coef=0.5)
    loss, metrics = policy_objective(logprobs, old, advantages, mask, cfg, ref_logprobs=ref)
    x = (logprobs - ref)[mask > 0].astype(np.float64)
    kl = (x if estimator == "k1" else np.exp(-x) + x - 1).mean()
    np.testing.assert_allclose(metrics["actor/kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(loss, plain + 0.5 * kl, rtol=1e-5)


def test_kl_coef_zero_ignores_ref_logprobs():
    logprobs, old, advantages, mask = random_batch(seed=4)
    cfg = PolicyLossConfig(kl_coef=0.0)
    without, metrics = policy_objective(logprobs, old, advantages, mask, cfg)
    with_ref, _ = policy_objective(logprobs, old, advantages, mask, cfg, ref_logprobs=old - 1.0)
    assert float(without) == float(with_ref) and float(metrics["actor/kl"]) == 0.0


def test_entropy_bonus_lowers_the_loss():
    logprobs, old, advantages, mask = random_batch(seed=5)
    entropy = np.random.default_rng(5).uniform(0, 3, mask.shape).astype(np.float32)
    plain, _ = policy_objective(logprobs, old, advantages, mask, PolicyLossConfig())
    cfg = PolicyLossConfig(entropy_coef=0.01)
    loss, metrics = policy_objective(logprobs, old, advantages, mask, cfg, entropy=entropy)
    mean_entropy = entropy[mask > 0].mean()
    np.testing.assert_allclose(metrics["actor/entropy"], mean_entropy, rtol=1e-5)
    np.testing.assert_allclose(loss, plain - 0.01 * mean_entropy, rtol=1e-5)


def test_token_mean_and_sequence_mean_differ_on_unequal_lengths():
    # Ratio 1, so the per-token loss is -A: -1 on one token of row 0, +1 on three tokens of row 1.
    mask = np.array([[1, 0, 0, 0], [1, 1, 1, 0]], np.float32)
    logprobs = np.zeros((2, 4), np.float32)
    advantages = np.array([1.0, -1.0], np.float32)
    token_mean, _ = policy_objective(logprobs, logprobs, advantages, mask, PolicyLossConfig())
    sequence_mean, _ = policy_objective(logprobs, logprobs, advantages, mask,
                                        PolicyLossConfig(aggregation="sequence-mean"))
    np.testing.assert_allclose([token_mean, sequence_mean], [(3 - 1) / 4, (1 - 1) / 2], atol=1e-7)


@pytest.mark.parametrize("aggregation", ["token-mean", "sequence-mean"])
def test_micro_batches_with_global_counts_sum_to_the_batch_loss(aggregation):
    logprobs, old, advantages, mask = random_batch(seed=6)
    mask[2] = 0.0  # a response with no trained tokens counts for neither the tokens nor responses
    ref = old + 0.2
    entropy = np.random.default_rng(6).uniform(0, 2, mask.shape).astype(np.float32)
    cfg = PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01, aggregation=aggregation)
    counts = {"token_count": mask.sum(), "sequence_count": (mask.sum(1) > 0).sum()}

    def loss_and_grad(rows, **counts):
        (loss, _), grad = objective_and_grad(logprobs[rows], old[rows], advantages[rows], mask[rows],
                                             cfg, ref_logprobs=ref[rows], entropy=entropy[rows],
                                             **counts)
        return loss, grad

    whole_loss, whole_grad = loss_and_grad(slice(None))
    parts = [loss_and_grad(rows, **counts) for rows in (slice(0, 4), slice(4, None))]
    np.testing.assert_allclose(sum(loss for loss, _ in parts), whole_loss, rtol=1e-5)
    np.testing.assert_allclose(np.concatenate([grad for _, grad in parts]), whole_grad,
                               rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["ppo", "gspo"])  # dapo has ppo's ratio function
def test_masked_garbage_and_empty_masks_stay_finite(name):
    assert POLICY_LOSSES["dapo"] is POLICY_LOSSES["ppo"]
    logprobs, old, advantages, mask = random_batch(seed=7)
    cfg = PolicyLossConfig.recommended(name, kl_coef=0.1, entropy_coef=0.01)
    clean = {"logprobs": logprobs, "old": old, "ref": old, "entropy": np.ones_like(mask)}
    off = mask == 0
    garbage = {"logprobs": np.inf, "old": -np.inf, "ref": np.nan, "entropy": np.nan}
    dirty = {name: np.where(off, garbage[name], x) for name, x in clean.items()}

    def loss_and_grad(inputs, mask):
        (loss, metrics), grad = objective_and_grad(
            inputs["logprobs"], inputs["old"], advantages, mask, cfg, ref_logprobs=inputs["ref"],
            entropy=inputs["entropy"])
        return loss, metrics, grad

    loss, _, grad = loss_and_grad(dirty, mask)
    np.testing.assert_allclose(loss, loss_and_grad(clean, mask)[0], rtol=1e-6)
    assert np.all(np.isfinite(grad)) and np.all(grad[off] == 0)
    loss, metrics, grad = loss_and_grad(dirty, np.zeros_like(mask))
    assert float(loss) == 0.0 and np.all(grad == 0)
    assert all(np.isfinite(value) for value in metrics.values())


def test_policy_objective_jit_matches_eager():
    logprobs, old, advantages, mask = random_batch(seed=8, batch=2, length=6)
    cfg = PolicyLossConfig(kl_coef=0.05)
    eager = policy_objective(logprobs, old, advantages, mask, cfg, ref_logprobs=old)
    jitted = jax.jit(policy_objective, static_argnames="cfg")(
        logprobs, old, advantages, mask, cfg, ref_logprobs=old, token_count=mask.sum())
    np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
    assert jitted[1].keys() == eager[1].keys()


def test_config_and_missing_input_errors():
    with pytest.raises(ConfigError, match="policy_loss='reinforce'.*ppo, dapo, gspo"):
        PolicyLossConfig(policy_loss="reinforce")
    with pytest.raises(ConfigError, match="kl_estimator"):
        PolicyLossConfig(kl_estimator="k4")
    with pytest.raises(ConfigError, match="aggregation"):
        PolicyLossConfig(aggregation="sum")
    with pytest.raises(ConfigError, match="clip-higher"):
        PolicyLossConfig(policy_loss="dapo")  # clip_high 0.2 = clip_low: that is plain PPO
    assert PolicyLossConfig.recommended("dapo", kl_coef=0.1).clip_high == 0.28
    with pytest.raises(ConfigError, match="'grpo'"):
        PolicyLossConfig.recommended("grpo")  # an advantage estimator, not a policy loss
    logprobs, old, advantages, mask = random_batch()
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_objective(logprobs, old, advantages, mask, PolicyLossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy"):
        policy_objective(logprobs, old, advantages, mask, PolicyLossConfig(entropy_coef=0.1))


def test_token_logprobs_and_entropy():
    logits = np.random.default_rng(9).normal(0, 2, (2, 3, 7)).astype(np.float32)
    tokens = np.random.default_rng(10).integers(0, 7, (2, 3))
    scaled = logits / 0.7
    log_softmax = scaled - np.log(np.exp(scaled).sum(-1, keepdims=True))
    expected = np.take_along_axis(log_softmax, tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_logprobs(logits, tokens, temperature=0.7), expected, rtol=1e-5)

    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -(np.exp(log_p) * log_p).sum(-1)
    logits[0, 0] = [0, 0, 0, 0, 0, 0, -np.inf]  # a banned token: uniform over the other six
    expected[0, 0] = np.log(6)
    np.testing.assert_allclose(token_entropy(logits), expected, rtol=1e-5)
