"""Context parallelism: a sequence split over the `context` axis gives the single-device results.

The gated delta rule's cross-shard combine equals the unsplit chunked op (fp32, packed documents, an
initial state); the whole model's train step on context=8 and data=2 x context=4 meshes equals one
device, on packed and unpacked rows; the GDN exchanges small maps and boundary tokens, never the sequence.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qwen_jax.config import TrainConfig, preset
from qwen_jax.ops.delta_rule import chunked_gated_delta_rule
from qwen_jax.parallel.context import delta_rule_across_shards
from qwen_jax.parallel.mesh import make_mesh
from qwen_jax.parallel.rules import DEFAULT_RULES
from qwen_jax.train.step import make_trainer

B, T, H, DK, DV, CHUNK = 2, 384, 2, 16, 24, 16  # 8 shards of 48 tokens: 3 chunks each


def rule_inputs(seed=0):
    """l2-normalised q, k [B,T,H,DK], v [B,T,H,DV], g, beta [B,T,H], a state [B,H,DK,DV], packed ids [B,T]."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, B, T, H, DK))
    q = q / np.linalg.norm(q, axis=-1, keepdims=True) * DK**-0.5
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, H, DV))
    g = -0.3 * np.logaddexp(0.0, rng.standard_normal((B, T, H)))
    beta = 1 / (1 + np.exp(-rng.standard_normal((B, T, H))))
    state = rng.standard_normal((B, H, DK, DV))
    # Row 0: a document ends exactly on a shard edge (96), another mid-shard, then padding (id 0).
    # Row 1: ids 1, 2, 1 (a reused id must still reset) with the cuts mid-shard.
    ids = np.stack([np.repeat([1, 2, 3, 0], [96, 150, 100, 38]), np.repeat([1, 2, 1], [70, 200, 114])])
    as_f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return (*map(as_f32, (q, k, v, g, beta, state)), jnp.asarray(ids, jnp.int32))


def test_cross_shard_combine_equals_the_sequential_chunk_scan():
    q, k, v, g, beta, state, ids = rule_inputs()
    mesh = make_mesh({"context": 8})
    seq = P(None, "context")

    def local(q, k, v, g, beta, ids, state):
        return delta_rule_across_shards(q, k, v, g, beta, ids, chunk_size=CHUNK, initial_state=state)

    split = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(seq,) * 6 + (P(),),
                                  out_specs=(seq, P()), check_vma=False))
    o, final = split(q, k, v, g, beta, ids, state)
    expected_o, expected_final = chunked_gated_delta_rule(q, k, v, g, beta, initial_state=state, segment_ids=ids,
                                                          chunk_size=CHUNK)
    np.testing.assert_allclose(o, expected_o, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final, expected_final, rtol=1e-5, atol=1e-5)
    assert o.sharding.spec[1] == "context"

    # Only the shard maps (gathered) and the boundary segment ids cross devices: no collective result
    # holds the whole sequence.
    hlo = split.lower(q, k, v, g, beta, ids, state).compile().as_text()
    collectives = re.findall(r"= (\S+) (all-gather|collective-permute|all-reduce|all-to-all)\(", hlo)
    assert {kind for _, kind in collectives} == {"all-gather", "collective-permute"}
    for shape, _ in collectives:
        assert str(T) not in re.findall(r"\d+", shape), shape


MODEL = preset("tiny", vocab_size=256, num_hidden_layers=4, gdn_chunk_size=16)
TRAIN = TrainConfig(batch_size=4, seq_len=256, lr=1e-2, warmup_steps=0, schedule="constant", eps=1e-3)


def make_batch():
    """Rows 0 and 2 packed (cuts on a context=8 shard edge, 64, and inside shards), rows 1 and 3 one document."""
    ids = np.random.default_rng(0).integers(0, MODEL.vocab_size, (4, 257)).astype(np.int32)
    packed = np.repeat([1, 2, 3, 4], [64, 36, 90, 66])
    segments = np.stack([packed, np.ones(256), packed, np.ones(256)]).astype(np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": segments,
            "loss_mask": np.ones((4, 256), np.float32)}


def one_step(mesh_sizes, initial, devices=None):
    """One AdamW step (the gradients of every parameter show in the new params) from the `initial`
    state (host copies, placed by the trainer's shardings), compiled once
    -> (the batch, the new state, the loss, the compiled program's text)."""
    trainer = make_trainer(MODEL, TRAIN, make_mesh(mesh_sizes, devices), DEFAULT_RULES)
    state, batch = jax.device_put(initial, trainer.state_shardings), trainer.global_batch(make_batch())
    compiled = trainer.step_fn.lower(state, batch).compile()
    state, metrics = compiled(state, batch)
    return batch, state, float(metrics["learning/loss"]), compiled.as_text()


@pytest.fixture(scope="module")
def single_device():
    """The initial state (host copies; params are not split over context, so every mesh starts
    from these) and one device's step from it."""
    devices = jax.devices()[:1]
    trainer = make_trainer(MODEL, TRAIN, make_mesh({"data": 1}, devices), DEFAULT_RULES)
    initial = jax.tree.map(np.asarray, trainer.init_state(seed=0))
    return initial, one_step({"data": 1}, initial, devices)


@pytest.mark.parametrize("mesh_sizes", [{"context": 8}, {"data": 2, "context": 4}])
def test_train_step_on_context_mesh_matches_one_device(single_device, mesh_sizes):
    initial, (_, state_1, loss_1, _) = single_device
    batch, state, loss, hlo = one_step(mesh_sizes, initial)
    np.testing.assert_allclose(loss, loss_1, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(state_1["params"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
    # The batch's sequence axis is split over context. Across devices go the GDN's conv halos and shard
    # maps, attention's keys and values, and [B, T] ids and masks; no activation of the whole sequence.
    assert batch["input_ids"].sharding.spec[1] == "context"
    collectives = re.findall(r"= (\S+) (all-gather|collective-permute|all-reduce|reduce-scatter|all-to-all)\(", hlo)
    assert "collective-permute" in {kind for _, kind in collectives}
    allowed = rf"(s32|pred)\[\d+,256\]|f32\[\d+,256,{MODEL.num_key_value_heads},{MODEL.head_dim}\]"
    for shape, _ in collectives:
        dims = re.findall(r"\d+", shape.split("{")[0])
        whole_sequence = len(dims) > 1 and dims[1] == "256"  # [B, T, ...] with T whole
        assert not whole_sequence or re.match(allowed, shape), shape
