"""Generation: cached decode == full forward (also after a continuation), greedy == transformers'
generate, sampler logprobs == the training forward's, sampling options and stop tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import build_hf_model, hf_text_config

import qwen_jax
from qwen_jax import Qwen35ForCausalLM, preset
from qwen_jax.generate.engine import generate, right_pad
from qwen_jax.generate.sampling import sample

TINY = preset("tiny", vocab_size=300, num_hidden_layers=6, gdn_chunk_size=16)


@pytest.fixture(scope="module")
def model():
    return Qwen35ForCausalLM(TINY, rngs=nnx.Rngs(0))


@nnx.jit(static_argnames="temperature")
def full_logprobs(model, ids, routing=None, temperature=1.0):
    return jax.nn.log_softmax(model(ids, routing=routing).logits.astype(jnp.float32) / temperature)


def scored(model, sequence, start, temperature=1.0, routing=None):
    """logprob of sequence[t] under softmax(logits / temperature) of the full forward, t >= start."""
    logprobs = np.asarray(full_logprobs(model, jnp.asarray([sequence]), routing, temperature))[0]
    return logprobs[np.arange(start - 1, len(sequence) - 1), sequence[start:]]


@nnx.jit
def cached_step(model, ids, segment_ids, cache):
    out = model(ids, segment_ids=segment_ids, cache=cache)
    return out.logits, out.cache


def test_cached_decode_and_continuation_equal_the_full_forward(model):
    """Prompts of different lengths (right-padded), decode steps, a ragged continuation, more steps."""
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, TINY.vocab_size, 70) for _ in range(2)]
    full = [np.asarray(full_logprobs(model, jnp.asarray(s[None])))[0] for s in sequences]
    cache = model.init_cache(2, 90)
    turns = [[37, 20], [1, 1], [1, 1], [7, 3], [1, 1]]  # new tokens per row at each call
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
    first = generate(model, prompts, max_new_tokens=5, temperature=0.7, top_k=40, top_p=0.9,
                     seeds=[1, 2], max_length=40)
    replies = [[20, 21, 22], [23]]
    second = generate(model, replies, max_new_tokens=4, temperature=0.7, seeds=[3, 4],
                      cache=first.cache)
    for b in range(2):
        head = prompts[b] + list(np.asarray(first.tokens[b]))
        np.testing.assert_allclose(first.logprobs[b], scored(model, head, len(prompts[b]), 0.7),
                                   atol=1e-5)
        whole = head + replies[b] + list(np.asarray(second.tokens[b]))
        np.testing.assert_allclose(second.logprobs[b], scored(model, whole, len(head) + len(replies[b]), 0.7),
                                   atol=1e-5)


def test_moe_sampler_logprobs_equal_the_training_forward_with_routing_replay():
    moe = Qwen35ForCausalLM(preset("tiny-moe", vocab_size=300, num_hidden_layers=4), rngs=nnx.Rngs(0))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4]]
    out = generate(moe, prompts, max_new_tokens=6, temperature=1.0, seeds=[1, 2])
    for b, prompt in enumerate(prompts):
        sequence = prompt + list(np.asarray(out.tokens[b]))
        routing = out.routing[:, b : b + 1, np.asarray(out.cache.valid[b])]  # this row's real columns
        np.testing.assert_allclose(out.logprobs[b], scored(moe, sequence, len(prompt), routing=routing),
                                   atol=1e-5)


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


def test_rows_stop_at_a_stop_token_and_seeds_reproduce(model):
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    free = generate(model, prompts, max_new_tokens=6, temperature=1.0, seeds=[7, 8])
    again = generate(model, prompts, max_new_tokens=6, temperature=1.0, seeds=[7, 8])
    np.testing.assert_array_equal(free.tokens, again.tokens)
    stop = int(free.tokens[0, 2])
    stopped = generate(model, prompts, max_new_tokens=6, temperature=1.0, seeds=[7, 8],
                       stop_ids=[stop], pad_id=0)
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


def test_cli_generate_from_a_workdir(tmp_path, model, tokenizer, capsys):
    import dataclasses
    import json

    import orbax.checkpoint as ocp

    from qwen_jax.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"model": dataclasses.asdict(TINY)}))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "checkpoints" / "3" / "state",
                          {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))})
    main(["generate", f"--model={tmp_path}", "--prompt=def", "--max-new-tokens=5", "--temperature=0.8",
          "--seed=4"])
    expected = generate(model, [tokenizer.encode("def").ids], max_new_tokens=5, temperature=0.8,
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
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]]
    single = generate(model, prompts, max_new_tokens=5, temperature=0.9, seeds=[0, 1, 2, 3])
    out = generate(sharded, prompts, max_new_tokens=5, temperature=0.9, seeds=[0, 1, 2, 3], mesh=mesh)
    np.testing.assert_array_equal(out.tokens, single.tokens)
    np.testing.assert_allclose(out.logprobs, single.logprobs, atol=1e-5)
    keys = out.cache.groups[-1]["k"]  # [G, B, S, Hkv, D]: rows over data x fsdp, heads over tensor
    assert keys.sharding.spec[1] == ("data", "fsdp") and keys.sharding.spec[3] == "tensor"
