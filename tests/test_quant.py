"""Weight-only int8 (model.weight_quant): each kernel within half a step of its float one, a quantised model
close to its float one; QLoRA: a LoRA step on a mesh trains adapters on an int8 base it never changes, and a
run quantises its init_from base as it loads it (and is itself an init_from, merged); what would train int8
kernels is refused by name."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax import Qwen35ForCausalLM, preset
from qwen_jax.config import ConfigError, TrainConfig
from qwen_jax.experiment import load_config, model_config
from qwen_jax.generate.loading import load_run_model, with_weight_quant
from qwen_jax.interop.init_from import load_init_params
from qwen_jax.interop.native import save_model
from qwen_jax.model.lora import plain_model
from qwen_jax.model.quant import quantize_int8
from qwen_jax.parallel.mesh import make_mesh
from qwen_jax.parallel.rules import DEFAULT_RULES
from qwen_jax.train.loop import run_training
from qwen_jax.train.metrics import read_metrics
from qwen_jax.train.step import make_trainer

IDS = np.arange(24).reshape(2, 12) % 64


def logits(model) -> np.ndarray:
    return np.asarray(model(IDS).logits)


def int8_leaves(tree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if leaf.dtype == jnp.int8]


def test_int8_kernels_are_within_half_a_step_and_a_quantised_model_stays_close():
    kernel = jax.random.normal(jax.random.key(0), (3, 64, 16)).at[1, :, 5].set(0.0)
    quantized, scale = quantize_int8(kernel)
    assert quantized.dtype == jnp.int8 and scale.shape == (3, 16)
    error = np.abs(np.asarray(quantized, np.float32) * np.asarray(scale)[:, None, :] - np.asarray(kernel))
    assert np.all(error <= np.asarray(scale)[:, None, :] / 2 + 1e-7)
    assert not np.asarray(quantized)[1, :, 5].any()  # a zero column stays zero
    assert np.abs(np.asarray(quantized)).max() == 127  # each column's largest weight sets its step

    model = Qwen35ForCausalLM(preset("tiny", vocab_size=64, dtype="float32"), rngs=nnx.Rngs(0))
    int8 = with_weight_quant(model, "int8")
    kernels = int8_leaves(nnx.to_pure_dict(nnx.state(int8, nnx.Param)))
    assert len(kernels) == 3 * 5 + 4 + 4 * 3  # 3 GDN layers' 5 projections, attention's 4, 4 MLPs' 3 (stacked)
    assert any("in_proj_qkv" in name for name in kernels) and not any("embed" in name for name in kernels)
    float_logits, int8_logits = logits(model), logits(int8)
    assert 1e-4 < np.linalg.norm(int8_logits - float_logits) / np.linalg.norm(float_logits) < 5e-2  # measured 0.024
    # Dequantised (convert, export), the int8 model computes the same, to float rounding.
    np.testing.assert_allclose(logits(plain_model(int8)), int8_logits, rtol=1e-4, atol=1e-5)


def test_a_qlora_step_on_a_mesh_trains_adapters_on_an_int8_base_it_never_changes():
    model = preset("tiny", vocab_size=256, num_hidden_layers=4, lora_rank=4, weight_quant="int8")
    train = TrainConfig(batch_size=8, seq_len=32, lr=1e-2, warmup_steps=0, schedule="constant")
    trainer = make_trainer(model, train, make_mesh({"fsdp": 4, "tensor": 2}), DEFAULT_RULES)
    state = trainer.init_state(seed=0)
    before = jax.tree.map(np.asarray, state["frozen"])
    assert int8_leaves(before) and not int8_leaves(state["params"])
    scales = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state["frozen"])[0]
              if "kernel_scale" in jax.tree_util.keystr(path)]
    assert any(len(leaf.sharding.device_set) > 1 and not leaf.sharding.is_fully_replicated for leaf in scales)
    ids = np.random.default_rng(0).integers(0, 256, (8, 33)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((8, 32), np.int32),
             "loss_mask": np.ones((8, 32), np.float32)}
    losses = []
    for _ in range(3):
        state, metrics = trainer.step_fn(state, trainer.global_batch(batch))
        losses.append(float(metrics["learning/loss"]))
    assert losses[2] < losses[0]
    for got, want in zip(jax.tree.leaves(state["frozen"]), jax.tree.leaves(before)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), want)

    with pytest.raises(ConfigError, match="weight_quant='int8' stores the projections' kernels quantised and frozen"):
        make_trainer(model.replace(lora_rank=0), train, make_mesh({"data": 1}, jax.devices()[:1]), DEFAULT_RULES)
    with pytest.raises(ConfigError, match=r"lora_also_train \['mlp'\] would train int8 kernels"):
        make_trainer(model.replace(lora_also_train=("mlp",)), train, make_mesh({"data": 1}, jax.devices()[:1]),
                     DEFAULT_RULES)


def test_a_qlora_run_quantises_its_base_as_it_loads_it(tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}?"},
                                                        {"role": "assistant", "content": "a dict maps keys"}]})
                               for i in range(100)) + "\n")
    small = ["wandb.mode=disabled", "train.batch_size=4", "train.seq_len=64", "model.vocab_size=400",
             "model.num_hidden_layers=2", "train.steps=2", "train.eval_every=100", "train.lr=1e-2",
             f"data.chat_sources=['{chats}']", f"init_from={tmp_path / 'base'}", "model.lora_rank=4"]
    plain = model_config(load_config("configs/sft_tiny.py", small[:-2]))
    base = Qwen35ForCausalLM(plain, rngs=nnx.Rngs(1))
    save_model(base, tmp_path / "base")
    run_training(load_config("configs/sft_tiny.py", small + ["model.weight_quant=int8"]), tmp_path / "qlora")
    losses = [row["learning/loss"] for row in read_metrics(tmp_path / "qlora" / "metrics.jsonl")]
    assert losses[1] < losses[0]
    # Generation puts the adapters on the base quantised as the run's was (init_from's kernels, quantised), then
    # dequantises and merges them into float kernels: the same model.
    adapted, merged = load_run_model(tmp_path / "qlora", merge=False), load_run_model(tmp_path / "qlora")
    def up_proj(model) -> dict:
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))["groups"]["layers"][0]["mlp"]["up_proj"]

    quantized, want = up_proj(adapted), quantize_int8(up_proj(base)["kernel"])
    np.testing.assert_array_equal(np.asarray(quantized["kernel"]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(quantized["kernel_scale"]), np.asarray(want[1]))
    assert (merged.config.lora_rank, merged.config.weight_quant) == (0, "") and not int8_leaves(
        nnx.to_pure_dict(nnx.state(merged, nnx.Param)))
    ids = np.arange(30)[None]
    np.testing.assert_allclose(np.asarray(merged(ids).logits), np.asarray(adapted(ids).logits), rtol=1e-4, atol=1e-5)
    # A LoRA run's checkpoint step is an init_from too (e.g. DPO after LoRA SFT): the model it trained, merged.
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Qwen35ForCausalLM(plain, rngs=nnx.Rngs(0))),
                                          nnx.Param))
    params = load_init_params(tmp_path / "qlora" / "checkpoints" / "2", abstract, plain.param_dtype)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(nnx.to_pure_dict(nnx.state(merged, nnx.Param)))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
