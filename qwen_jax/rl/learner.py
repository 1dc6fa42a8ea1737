"""The learner: the trainer's logprobs of episode tokens, and the jitted policy-gradient update.

Scoring uses the sampler's temperature (INTERFACES.md: logprobs under softmax(logits / T)), so the
trainer's logprobs of the behaviour policy equal the sampler's up to rounding; their mean gap is
`actor/logprob_mismatch`. The ratio's denominator is the trainer's own score of the behaviour
policy (taken before the first update of a batch), as verl and OpenRLHF do.

For MoE models both forwards can replay the sampler's routing (the experts each token went to
while sampling): the router still weights those experts, but no token switches experts because
the trainer's numerics (or a few updates) moved a top-k boundary, which would change the token's
logprob by far more than rounding (rollout routing replay, R3, as verl and Megatron ship it).

On a mesh the learner is the trainer's: params and optimizer moments sharded by the logical-axis
rules, episode rows over the batch axes (`Learner.place`), activations constrained the same way. A LoRA
state (state["frozen"] beside the trained state["params"]) is updated in its trained part only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen_jax.parallel.rules import activation_sharding, hashable_rules, spec_for
from qwen_jax.rl.losses import PolicyLossConfig, policy_objective, token_entropy
from qwen_jax.train.step import model_params


def sequence_logprobs(params, graphdef, tokens, segment_ids, temperature: float, routing=None):
    """tokens [N, S] -> (logprobs [N, S]: log p(tokens[t] | tokens[:t]), 0 at t = 0; entropy [N, S]
    of the distribution that sampled tokens[t]). routing (ints) [N, L, S, k] replays those experts;
    None routes freely."""
    model = nnx.merge(graphdef, params)
    replay = None if routing is None else jnp.swapaxes(routing, 0, 1).astype(jnp.int32)  # [L, N, S, k]
    hidden = model(tokens, segment_ids=segment_ids, routing=replay).hidden
    logits = model.logits(hidden[:, :-1]).astype(jnp.float32) / max(temperature, 1e-6)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)[..., 0]
    pad = jnp.zeros_like(logprobs[:, :1])
    return (jnp.concatenate([pad, logprobs], axis=1),
            jnp.concatenate([pad, token_entropy(logits)], axis=1))


@dataclasses.dataclass(frozen=True)
class Learner:
    """Jitted `score(params, tokens, segment_ids, routing=None) -> logprobs` and
    `update(state, batch) -> (state, metrics)` for one model and loss on `mesh`; a batch with
    "routing" ([N, L, S, k] expert ids) replays it. Inputs may be numpy (identical on every host)."""

    graphdef: Any
    score: Any
    update: Any
    mesh: Mesh
    rules: tuple

    def place(self, array) -> jax.Array:
        """A host array [N, ...], the same on every host, as a global array with its rows over the
        mesh's batch axes (whole rows: the learner's sequences are short)."""
        array = np.asarray(array)
        logical = ("batch",) + (None,) * (array.ndim - 1)
        sharding = NamedSharding(self.mesh, spec_for(logical, array.shape, self.mesh, self.rules))
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def make_learner(graphdef, optimizer: optax.GradientTransformation, loss: PolicyLossConfig,
                 temperature: float, mesh: Mesh, rules, state_shardings) -> Learner:
    """The learner on `mesh`: the state keeps `state_shardings` (the trainer's, state_shardings_for),
    scores come back replicated."""
    rules = hashable_rules(rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def score(params, tokens, segment_ids, routing=None):
        with activation_sharding(mesh, rules):
            return sequence_logprobs(params, graphdef, tokens, segment_ids, temperature,
                                     routing)[0]

    def objective(params, batch):
        logprobs, entropy = sequence_logprobs(params, graphdef, batch["tokens"],
                                              batch["segment_ids"], temperature,
                                              batch.get("routing"))
        return policy_objective(logprobs, batch["old_logprobs"], batch["advantages"],
                                batch["loss_mask"], loss, ref_logprobs=batch.get("ref_logprobs"),
                                entropy=entropy)  # for actor/entropy even without the bonus

    def update(state, batch):
        def trained_objective(trained, batch):  # a LoRA state's frozen base is held fixed
            return objective(model_params({**state, "params": trained}), batch)

        with activation_sharding(mesh, rules):
            (value, metrics), grads = jax.value_and_grad(trained_objective, has_aux=True)(
                state["params"], batch)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # A non-finite loss or gradient never reaches the parameters (as in pretraining).
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        new = {**state, "params": keep(params, state["params"]),
               "opt_state": keep(opt_state, state["opt_state"]), "step": state["step"] + 1,
               "skipped_steps": state["skipped_steps"] + (~finite)}
        return new, {**metrics, "actor/loss": value, "actor/grad_norm": grad_norm}

    return Learner(graphdef, jax.jit(score, out_shardings=replicated),
                   jax.jit(update, out_shardings=(state_shardings, replicated), donate_argnums=0),
                   mesh, rules)
