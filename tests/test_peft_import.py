"""PEFT LoRA adapters read back: merged into their base they give PEFT's own logits (rsLoRA, adapters on some
layers only); a run's init_adapter starts a LoRA run's adapters (and its DPO reference) or is merged into a
full run's params; what this LoRA cannot compute is refused, naming the field or tensor."""

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import Qwen3_5ForCausalLM

from qwen_jax import Qwen35ForCausalLM, load_hf, preset, save_hf
from qwen_jax.cli import main
from qwen_jax.config import ConfigError
from qwen_jax.data.conversations import CHATML_TEMPLATE
from qwen_jax.data.tokenizer import train_bpe_tokenizer
from qwen_jax.experiment import load_config, model_config
from qwen_jax.interop.init_from import check_init_adapter
from qwen_jax.interop.native import load_model, save_model
from qwen_jax.interop.peft import adapter_model_config, adapter_params, save_peft, with_adapter
from qwen_jax.model.lora import split_adapters
from qwen_jax.train.loop import run_training
from qwen_jax.train.metrics import read_metrics

TARGETS = ["q_proj", "v_proj", "in_proj_qkv", "down_proj"]  # in LORA_MODULES' order
IDS = np.arange(24).reshape(2, 12) % 64


def logits(model, ids) -> np.ndarray:
    return np.asarray(model(ids).logits)


def relative_error(ours, theirs) -> float:
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def moved_lora_model(config, seed: int):
    """-> (a LoRA model of `config` with every param moved by 0.05, so that B is far from zero, its params)."""
    graphdef, state = nnx.split(Qwen35ForCausalLM(config, rngs=nnx.Rngs(seed)))
    params = jax.tree.map(lambda x: x + 0.05, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), params


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """(HF base dir, PEFT adapter dir, PEFT's logits on IDS): rsLoRA r 4 with random A and B on TARGETS of
    layers 0 and 3 (the tiny preset: three GDN layers, then attention)."""
    tmp = tmp_path_factory.mktemp("peft")
    save_hf(Qwen35ForCausalLM(preset("tiny", vocab_size=64, dtype="float32"), rngs=nnx.Rngs(0)), tmp / "base")
    torch.manual_seed(0)
    base = Qwen3_5ForCausalLM.from_pretrained(tmp / "base", attn_implementation="eager")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, layers_to_transform=[0, 3], use_rslora=True,
                        init_lora_weights=False)  # B random too: the adapter changes the model
    peft_model = get_peft_model(base, config).eval()
    peft_model.save_pretrained(tmp / "adapter")
    with torch.no_grad():
        theirs = peft_model(torch.as_tensor(IDS)).logits.numpy()
    return tmp / "base", tmp / "adapter", theirs


def test_a_peft_adapter_merged_into_its_base_computes_what_peft_does(peft_adapter, tmp_path):
    base_dir, adapter_dir, theirs = peft_adapter
    base = load_hf(base_dir)
    merged = with_adapter(base, adapter_dir)
    assert relative_error(logits(merged, IDS), theirs) < 1e-5
    assert relative_error(logits(base, IDS), theirs) > 1e-2  # the adapter matters

    config = adapter_model_config(adapter_dir, base.config)
    assert (config.lora_rank, config.lora_targets) == (4, tuple(TARGETS))
    assert config.lora_alpha / config.lora_rank == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
    # Layers the adapter leaves out get zero adapters: in_proj_qkv is adapted in GDN layer 0 only.
    qkv = adapter_params(adapter_dir, config)["groups"]["layers"][0]["linear_attn"]["in_proj_qkv"]["lora_b"]
    assert np.abs(qkv[0]).max() > 0 and not qkv[1:].any()

    # An adapter saved in bfloat16 (as PEFT saves one trained in bfloat16) reads too.
    shutil.copytree(adapter_dir, tmp_path / "bf16")
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    save_file({name: x.to(torch.bfloat16) for name, x in tensors.items()},
              tmp_path / "bf16" / "adapter_model.safetensors")
    assert relative_error(logits(with_adapter(base, tmp_path / "bf16"), IDS), theirs) < 2e-2

    main(["convert", f"--from-hf={base_dir}", f"--adapter={adapter_dir}", f"--to-hf={tmp_path / 'merged'}"])
    assert relative_error(logits(load_hf(tmp_path / "merged"), IDS), theirs) < 1e-5
    with pytest.raises(SystemExit, match="--to-peft writes a LoRA run's own adapters"):
        main(["convert", f"--from-hf={base_dir}", f"--adapter={adapter_dir}", f"--to-peft={tmp_path / 'p'}"])


def test_what_this_lora_cannot_compute_is_refused_by_name(peft_adapter, tmp_path):
    base_dir, adapter_dir, _ = peft_adapter
    config = adapter_model_config(adapter_dir, preset("tiny", vocab_size=64, dtype="float32"))
    with pytest.raises(ConfigError, match="set model.lora_rank=4 model.lora_alpha=16"):
        adapter_params(adapter_dir, config.replace(lora_rank=8))
    with pytest.raises(ConfigError, match=r"down_proj.lora_A.weight: model.lora_targets .* not name 'down_proj'"):
        adapter_params(adapter_dir, config.replace(lora_targets=("q_proj", "v_proj", "in_proj_qkv")))
    with pytest.raises(ConfigError, match="not a PEFT adapter directory"):
        with_adapter(load_hf(base_dir), base_dir)
    dora = tmp_path / "dora"
    shutil.copytree(adapter_dir, dora)
    settings = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**settings, "use_dora": True}))
    with pytest.raises(ConfigError, match=r"use_dora=True \(DoRA's magnitude vectors\) is not supported"):
        adapter_model_config(dora, config)
    with pytest.raises(ConfigError, match="init_adapter=.* set init_from"):
        check_init_adapter("", str(adapter_dir))


def test_our_peft_adapter_reads_back_as_the_same_adapters(tmp_path):
    config = preset("tiny", vocab_size=64, dtype="float32", lora_rank=2, lora_alpha=4.0, lora_targets="q_proj,out_proj")
    model, params = moved_lora_model(config, seed=0)
    save_peft(model, tmp_path)
    assert adapter_model_config(tmp_path, config.replace(lora_rank=0)) == config
    ours, back = split_adapters(params)[1], adapter_params(tmp_path, config)
    assert jax.tree.structure(jax.tree.map(np.asarray, ours)) == jax.tree.structure(back)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_init_adapter_starts_a_lora_run_and_its_reference_or_is_merged_into_a_full_run(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"q{i}?", "chosen": "a dict maps keys", "rejected": "keys maps"})
                               for i in range(100)) + "\n")
    small = ["wandb.mode=disabled", "train.batch_size=8", "train.seq_len=64", "model.vocab_size=400",
             "model.num_hidden_layers=2", "train.eval_every=100", "train.steps=2", "train.warmup_steps=0",
             "train.lr=1e-3", f"data.chat_sources=['{pairs}']", "checkpoint.every_steps=2"]
    plain = model_config(load_config("configs/dpo_tiny.py", small))
    save_model(Qwen35ForCausalLM(plain, rngs=nnx.Rngs(1)), tmp_path / "base")
    train_bpe_tokenizer([CHATML_TEMPLATE, pairs.read_text()], 400).save(str(tmp_path / "base" / "tokenizer.json"))
    lora = plain.replace(lora_rank=4, lora_alpha=8.0)
    save_peft(moved_lora_model(lora, seed=2)[0], tmp_path / "adapter")
    start = [f"init_from={tmp_path / 'base'}", f"init_adapter={tmp_path / 'adapter'}"]

    # LoRA DPO: the run's adapters start as the PEFT adapter's (two Adam steps of lr 1e-3 move each by about
    # 2e-3 at most), and so does its reference: the first loss is log 2.
    run_training(load_config("configs/dpo_tiny.py", small + start + ["model.lora_rank=4", "model.lora_alpha=8"]),
                 tmp_path / "dpo")
    rows = read_metrics(tmp_path / "dpo" / "metrics.jsonl")
    np.testing.assert_allclose(rows[0]["learning/loss"], np.log(2), rtol=1e-5)
    with ocp.StandardCheckpointer() as checkpointer:
        trained = checkpointer.restore((tmp_path / "dpo" / "checkpoints" / "2" / "state").absolute())["params"]
    imported = adapter_params(tmp_path / "adapter", lora)
    moved = [np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(imported))]
    assert max(moved) < 3e-3 and min(np.abs(b).max() for b in jax.tree.leaves(imported)) > 0.04

    # A full SFT run from base + adapter is the run from the merged model: the same first loss.
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}?"},
                                                        {"role": "assistant", "content": "a dict maps keys"}]})
                               for i in range(100)) + "\n")
    sft = ["wandb.mode=disabled", "train.batch_size=4", "train.seq_len=64", "model.vocab_size=400",
           "model.num_hidden_layers=2", "train.steps=1", "train.eval_every=100", f"data.chat_sources=['{chats}']"]
    main(["convert", f"--from={tmp_path / 'base'}", f"--adapter={tmp_path / 'adapter'}",
          f"--to={tmp_path / 'merged'}"])
    shutil.copy(tmp_path / "base" / "tokenizer.json", tmp_path / "merged")
    run_training(load_config("configs/sft_tiny.py", sft + start), tmp_path / "full")
    run_training(load_config("configs/sft_tiny.py", sft + [f"init_from={tmp_path / 'merged'}"]), tmp_path / "ref")
    first = [read_metrics(tmp_path / run / "metrics.jsonl")[0]["learning/loss"] for run in ("full", "ref")]
    assert first[0] == pytest.approx(first[1], rel=1e-6)
    ids = np.arange(30)[None]  # and the merged model is not the base
    assert np.abs(logits(load_model(tmp_path / "merged"), ids) - logits(load_model(tmp_path / "base"), ids)).max() > 0.1
