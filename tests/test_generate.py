"""Generation: cached decode == full forward (also after a continuation), greedy == transformers'
generate, sampler logprobs == the training forward's, sampling options and stop tokens; caches updated in place."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import build_hf_model, hf_text_config
from jaxpr_walk import all_eqns

import qwen_jax
from qwen_jax import Qwen35ForCausalLM, preset
from qwen_jax.generate import engine
from qwen_jax.generate.engine import generate, right_pad
from qwen_jax.generate.sampling import sample

TINY = preset("tiny", vocab_size=300, num_hidden_layers=6, gdn_chunk_size=16)


@pytest.fixture(scope="module")
def model():
    return Qwen35ForCausalLM(TINY, rngs=nnx.Rngs(0))


# Every full forward runs on one [2, 80] batch (each sequence right-padded with zeros), so each
# model compiles its forward once: the forward is causal, so the padding after a sequence changes
# none of its logits.
SCORE_ROWS, SCORE_LEN = 2, 80


@nnx.jit
def full_logits(model, ids, routing=None):
    return model(ids, routing=routing).logits.astype(jnp.float32)


def full_logprobs(model, sequences, temperature=1.0, routings=None):
    """Per sequence (at most SCORE_ROWS): log softmax(logits / temperature) [len, V] of the full
    forward (float64, on the host); MoE routings [L, 1, len, k] are replayed."""
    assert len(sequences) <= SCORE_ROWS and max(map(len, sequences)) <= SCORE_LEN
    ids = np.zeros((SCORE_ROWS, SCORE_LEN), np.int32)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
    routing = None
    if routings is not None:  # padding routed to experts 0..k-1 (distinct, as top-k picks them)
        layers, _, _, k = routings[0].shape
        routing = np.broadcast_to(np.arange(k, dtype=np.int32), (layers, SCORE_ROWS, SCORE_LEN, k)).copy()
        for row, chosen in enumerate(routings):
            routing[:, row, : chosen.shape[2]] = np.asarray(chosen)[:, 0]
        routing = jnp.asarray(routing)
    logits = np.asarray(full_logits(model, jnp.asarray(ids), routing), np.float64) / temperature
    logprobs = logits - logits.max(-1, keepdims=True)
    logprobs -= np.log(np.exp(logprobs).sum(-1, keepdims=True))
    return [logprobs[row, : len(sequence)] for row, sequence in enumerate(sequences)]


def scored(model, sequences, starts, temperature=1.0, routings=None):
    """Per sequence: logprob of sequence[t] under softmax(logits / temperature) of the full forward, t >= start."""
    return [logprobs[np.arange(start - 1, len(sequence) - 1), np.asarray(sequence[start:])]
            for logprobs, sequence, start in zip(full_logprobs(model, sequences, temperature, routings),
                                                 sequences, starts)]


@nnx.jit
def cached_step(model, ids, segment_ids, cache):
    out = model(ids, segment_ids=segment_ids, cache=cache)
    return out.logits, out.cache


def test_cached_decode_and_continuation_equal_the_full_forward(model):
    """Prompts of different lengths (right-padded), decode steps, a ragged continuation, more steps."""
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, TINY.vocab_size, 70) for _ in range(2)]
    full = full_logprobs(model, sequences)
    cache = model.init_cache(2, 90)
    # New tokens per row at each call: a ragged continuation (3 and 37 tokens) as wide as the
    # prompts, so the decode steps and the wide calls compile once each.
    turns = [[37, 20], [1, 1], [1, 1], [3, 37], [1, 1]]
    done = [0, 0]
    for lengths in turns:
        ids, segments = right_pad([s[d:d + n] for s, d, n in zip(sequences, done, lengths)])
        logits, cache = cached_step(model, jnp.asarray(ids), jnp.asarray(segments), cache)
        logprobs = np.asarray(jax.nn.log_softmax(logits))
        for b in range(2):
            np.testing.assert_allclose(logprobs[b, : lengths[b]], full[b][done[b] : done[b] + lengths[b]],
                                       atol=2e-5)
        done = [d + n for d, n in zip(done, lengths)]


def test_sampler_logprobs_equal_the_training_forward_and_continuation_reuses_the_cache(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4]]
    options = dict(max_new_tokens=5, temperature=0.7, top_k=40, top_p=0.9)
    first = generate(model, prompts, **options, seeds=[1, 2], max_length=40)
    # Replies of different lengths, as wide as the prompts: the continuation runs the same program.
    replies = [[20, 21, 22, 24, 25, 26, 27, 28, 29], [23]]
    second = generate(model, replies, **options, seeds=[3, 4], cache=first.cache, donate_cache=True)
    assert all(x.is_deleted() for x in jax.tree.leaves(first.cache))  # its buffers became second.cache's
    heads = [prompts[b] + list(np.asarray(first.tokens[b])) for b in range(2)]
    wholes = [heads[b] + replies[b] + list(np.asarray(second.tokens[b])) for b in range(2)]
    expected_first = scored(model, heads, [len(p) for p in prompts], 0.7)
    expected_second = scored(model, wholes, [len(h) + len(r) for h, r in zip(heads, replies)], 0.7)
    for b in range(2):
        np.testing.assert_allclose(first.logprobs[b], expected_first[b], atol=1e-5)
        np.testing.assert_allclose(second.logprobs[b], expected_second[b], atol=1e-5)


def test_moe_sampler_logprobs_equal_the_training_forward_with_routing_replay():
    moe = Qwen35ForCausalLM(preset("tiny-moe", vocab_size=300, num_hidden_layers=4), rngs=nnx.Rngs(0))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4]]
    out = generate(moe, prompts, max_new_tokens=6, temperature=1.0, seeds=[1, 2])
    sequences = [prompt + list(np.asarray(out.tokens[b])) for b, prompt in enumerate(prompts)]
    # Each row's routing over its real cache columns.
    routings = [out.routing[:, b : b + 1, np.asarray(out.cache.valid[b])] for b in range(len(prompts))]
    expected = scored(moe, sequences, [len(p) for p in prompts], routings=routings)
    for b in range(len(prompts)):
        np.testing.assert_allclose(out.logprobs[b], expected[b], atol=1e-5)


def test_greedy_matches_transformers_generate(tmp_path):
    hf_model = build_hf_model(hf_text_config(layers=4, value_heads=4, tied=False))
    hf_model.save_pretrained(tmp_path)
    ours = qwen_jax.load_hf(tmp_path)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, 211, n)) for n in (5, 70, 150)]  # 150 > two 64-token chunks
    out = generate(ours, prompts, max_new_tokens=8)
    for b, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8,
                                         do_sample=False)[0, len(prompt):].numpy()
        np.testing.assert_array_equal(np.asarray(out.tokens[b]), expected)


def test_sampling_options():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
    keys = jax.vmap(jax.random.key)(jnp.arange(4, dtype=jnp.uint32))
    greedy, greedy_logprobs = sample(logits, keys, temperature=0.0)
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
    np.testing.assert_allclose(greedy_logprobs, jnp.max(jax.nn.log_softmax(logits), -1), rtol=1e-6)
    for truncation in (dict(top_k=1), dict(top_p=1e-6)):
        tokens, _ = sample(logits, keys, temperature=1.5, **truncation)
        np.testing.assert_array_equal(tokens, greedy)
    # The logprob is taken before truncation, under softmax(logits / temperature).
    tokens, logprobs = sample(logits, keys, temperature=1.5, top_k=5)
    full = jax.nn.log_softmax(logits / 1.5)
    np.testing.assert_allclose(logprobs, full[jnp.arange(4), tokens], rtol=1e-6)
    top5 = jax.lax.top_k(logits, 5)[1]
    assert all(int(t) in np.asarray(row) for t, row in zip(tokens, top5))
    many_keys = jax.vmap(jax.random.key)(jnp.arange(64, dtype=jnp.uint32))
    draws, _ = sample(jnp.repeat(logits[:1], 64, axis=0), many_keys, temperature=1.0)
    assert len(set(np.asarray(draws).tolist())) > 1  # different seeds, different tokens


# The prompts and options of the stop-token and sharding tests: one compiled one-device program.
PROMPTS = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]]
SAMPLING = dict(max_new_tokens=6, temperature=1.0)


def test_rows_stop_at_a_stop_token_and_seeds_reproduce(model):
    prompts = PROMPTS
    free = generate(model, prompts, **SAMPLING, seeds=[7, 8, 9, 10])
    again = generate(model, prompts, **SAMPLING, seeds=[7, 8, 9, 10])
    np.testing.assert_array_equal(free.tokens, again.tokens)
    stop = int(free.tokens[0, 2])
    stopped = generate(model, prompts, **SAMPLING, seeds=[7, 8, 9, 10], stop_ids=[stop], pad_id=0)
    first_stop = list(np.asarray(free.tokens[0])).index(stop)
    assert int(stopped.lengths[0]) == first_stop + 1
    np.testing.assert_array_equal(stopped.tokens[0, : first_stop + 1], free.tokens[0, : first_stop + 1])
    assert np.all(np.asarray(stopped.tokens[0, first_stop + 1 :]) == 0)
    assert np.all(np.asarray(stopped.logprobs[0, first_stop + 1 :]) == 0)


@pytest.fixture(scope="module")
def tokenizer():
    from qwen_jax.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(["def generate(model, prompts):\n    return model(prompts)\n"] * 20, 300)


def test_cli_generate_from_an_hf_directory_matches_transformers(tmp_path, tokenizer, capsys):
    from qwen_jax.cli import main

    hf_model = build_hf_model(hf_text_config(layers=4, vocab=300))
    hf_model.save_pretrained(tmp_path)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    prompt = "def generate(model"
    main(["generate", f"--model={tmp_path}", f"--prompt={prompt}", "--max-new-tokens=6"])
    ids = tokenizer.encode(prompt).ids
    with torch.no_grad():  # no generation_config stop ids here: the tokenizer's end-of-text (id 0)
        new = hf_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                eos_token_id=0, pad_token_id=1)[0, len(ids):].tolist()
    text = tokenizer.decode(new, skip_special_tokens=False)
    assert text and text in capsys.readouterr().out
    # A `qwen-jax convert` directory carries the tokenizer along and generates the same.
    main(["convert", f"--from-hf={tmp_path}", f"--to={tmp_path / 'native'}"])
    capsys.readouterr()
    main(["generate", f"--model={tmp_path / 'native'}", f"--prompt={prompt}", "--max-new-tokens=6"])
    assert text in capsys.readouterr().out


def test_cli_generate_from_a_workdir(tmp_path, model, tokenizer, capsys):
    import dataclasses
    import json

    import orbax.checkpoint as ocp

    from qwen_jax.cli import main
    from qwen_jax.generate.loading import load_for_generation

    (tmp_path / "config.json").write_text(json.dumps({"model": dataclasses.asdict(TINY)}))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "checkpoints" / "3" / "state",
                          {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))})
    main(["generate", f"--model={tmp_path}", "--prompt=def", "--max-new-tokens=5", "--temperature=0.8",
          "--seed=4"])
    # The workdir's model is this model (its config and every parameter), so the expected tokens
    # come from it: it shares the CLI's compiled program.
    loaded, _, stop_ids = load_for_generation(tmp_path)
    assert loaded.config == model.config and stop_ids == [tokenizer.token_to_id("<|im_end|>"), 0]
    for got, want in zip(jax.tree.leaves(nnx.state(loaded, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    expected = generate(loaded, [tokenizer.encode("def").ids], max_new_tokens=5, temperature=0.8,
                        seeds=[4], stop_ids=[0])
    new = np.asarray(expected.tokens[0, : int(expected.lengths[0])]).tolist()
    text = tokenizer.decode(new, skip_special_tokens=False)
    assert text and text in capsys.readouterr().out


def test_sharded_generation_equals_one_device(model):
    from qwen_jax.parallel.mesh import make_mesh
    from qwen_jax.parallel.rules import DEFAULT_RULES, param_shardings

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    nnx.replace_by_pure_dict(state, jax.device_put(params, param_shardings(params, mesh, DEFAULT_RULES)))
    sharded = nnx.merge(graphdef, state)
    assert tuple(sharded.tail.layers[0].mlp.up_proj.kernel[...].sharding.spec) == ("fsdp", "tensor")
    single = generate(model, PROMPTS, **SAMPLING, seeds=[0, 1, 2, 3])
    out = generate(sharded, PROMPTS, **SAMPLING, seeds=[0, 1, 2, 3], mesh=mesh)
    np.testing.assert_array_equal(out.tokens, single.tokens)
    np.testing.assert_allclose(out.logprobs, single.logprobs, atol=1e-5)
    keys = out.cache.groups[-1]["k"]  # [G, B, S, Hkv, D]: rows over data x fsdp, heads over tensor
    assert keys.sharding.spec[1] == ("data", "fsdp") and keys.sharding.spec[3] == "tensor"


def hlo_copies(text):
    """Counter {(dtype, shape): copy instructions} of an optimized HLO module's text, leaving out copies of
    a broadcast (those write a constant, as creating the buffer does, and move no data)."""
    return collections.Counter(
        (dtype, tuple(int(d) for d in dims.split(",") if d))
        for dtype, dims, operand in re.findall(r"= (\w+)\[([\d,]*)\]\{[\d,]*\} copy\(%([\w.-]+)\)", text)
        if "broadcast" not in operand)


def test_decode_updates_its_caches_in_place():
    """bf16, two scanned groups: no stacked cache is copied inside the decode loop (a fresh or donated cache
    not at all), and a step writes only its own key and value columns into the stacked attention caches
    (never a whole group's [B, S, ...])."""
    config = preset("tiny", vocab_size=300, num_hidden_layers=8, dtype="bfloat16", param_dtype="bfloat16")
    deep = Qwen35ForCausalLM(config, rngs=nnx.Rngs(0))
    ids, segments = (jnp.asarray(x) for x in right_pad([[5, 6, 7], [8, 9]]))
    cache = deep.init_cache(2, 12)
    graphdef, state = nnx.split(deep)
    keys = jax.vmap(jax.random.key)(jnp.arange(2, dtype=jnp.uint32))
    hlo_dtypes = {"float32": "f32", "bfloat16": "bf16"}
    entries = [(hlo_dtypes[x.dtype.name], x.shape) for x in jax.tree.leaves(cache.groups)]
    # A given cache that is not donated is an argument, copied once into the loop.
    for run, given, most in ((engine._generate, cache, 1), (engine._generate_donating, cache, 0),
                             (engine._generate, None, 0)):
        text = run.lower(graphdef, state, ids, segments, given, keys, jnp.asarray([-1], jnp.int32), {},
                         max_new_tokens=4, max_length=12, temperature=1.0, top_k=0, top_p=1.0, pad_id=0,
                         mesh=None, rules=engine.hashable_rules(engine.DEFAULT_RULES)).compile().as_text()
        copies = hlo_copies(text)
        for entry in set(entries):
            assert copies[entry] <= most * entries.count(entry), (run, given is None, entry, copies[entry])

    jaxpr = jax.make_jaxpr(lambda state, ids, cache: nnx.merge(graphdef, state)(ids, cache=cache).cache)(
        state, ids[:, :1], cache)
    stacked_keys = cache.groups[-1]["k"].shape  # [G, B, S, Hkv, D]
    writes = [eqn.invars[1].aval.shape for eqn in all_eqns(jaxpr.jaxpr)
              if eqn.primitive.name == "dynamic_update_slice" and eqn.invars[0].aval.shape == stacked_keys]
    assert writes and all(shape == (1, 2, 1, *stacked_keys[3:]) for shape in writes), writes
