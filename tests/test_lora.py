"""LoRA: an adapted model is its base plus scale x A B on the targeted projections (transformers, given the
merged weights, computes the same logits); a LoRA SFT run trains only the adapters, keeps only them in its
checkpoints, resumes exactly and converts to HF merged; a LoRA DPO run's reference is its base."""

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx
from peft import PeftModel
from transformers import Qwen3_5ForCausalLM

from qwen_jax import Qwen35ForCausalLM, load_hf, preset, save_hf
from qwen_jax.cli import main
from qwen_jax.config import ConfigError, TrainConfig
from qwen_jax.experiment import load_config, model_config
from qwen_jax.interop.native import save_model
from qwen_jax.interop.peft import save_peft
from qwen_jax.generate.loading import load_for_generation
from qwen_jax.model.lora import ADAPTER_LEAVES, join, merge_adapters, split_adapters, split_trained
from qwen_jax.parallel.mesh import make_mesh
from qwen_jax.parallel.rules import DEFAULT_RULES
from qwen_jax.rl.loop import run_rl
from qwen_jax.train.loop import run_training
from qwen_jax.train.metrics import read_metrics
from qwen_jax.train.step import make_trainer
from resume_check import assert_resume_from_step_2_repeats_the_run


def params_of(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def with_params(model, params):
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def flat(tree: dict) -> dict:
    """{(key, ...): leaf}, keys as strings (a checkpoint restored without a target names list items "0")."""
    return {tuple(str(part.key) for part in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def leaf_names(tree: dict) -> set[str]:
    return {path[-1] for path in flat(tree)}


def test_an_adapted_model_is_its_base_plus_the_low_rank_updates(tmp_path):
    config = preset("tiny", vocab_size=64, dtype="float32")
    plain = Qwen35ForCausalLM(config, rngs=nnx.Rngs(0))
    adapted = Qwen35ForCausalLM(config.replace(lora_rank=4, lora_alpha=8.0, lora_targets="q_proj,in_proj_qkv,down_proj"),
                                rngs=nnx.Rngs(1))
    _, adapters = split_adapters(params_of(adapted))
    assert leaf_names(adapters) == set(ADAPTER_LEAVES)
    targeted = {str(path[-2].key) for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]}
    assert targeted == {"q_proj", "in_proj_qkv", "down_proj"}
    adapted = with_params(adapted, join(params_of(plain), adapters))
    ids = np.arange(24).reshape(2, 12) % 64
    # B starts at zero: the adapted model starts as its base, exactly.
    np.testing.assert_array_equal(np.asarray(adapted(ids).logits), np.asarray(plain(ids).logits))

    rng = np.random.default_rng(0)
    moved = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype) if path[-1].key == "lora_b" else x,
        adapters)
    adapted = with_params(adapted, join(params_of(plain), moved))
    ours = np.asarray(adapted(ids).logits)
    assert np.abs(ours - np.asarray(plain(ids).logits)).max() > 1e-2  # the updates matter
    merged = merge_adapters(join(params_of(plain), moved), scale=8.0 / 4)
    layer = ("groups", "layers", 0, "linear_attn", "in_proj_qkv")
    part = lambda tree: tree[layer[0]][layer[1]][layer[2]][layer[3]][layer[4]]  # noqa: E731
    np.testing.assert_allclose(part(merged)["kernel"], part(params_of(plain))["kernel"]
                               + 2.0 * part(moved)["lora_a"] @ part(moved)["lora_b"], rtol=1e-6, atol=1e-6)
    assert set(part(merged)) == {"kernel"}

    # transformers, given the merged weights (save_hf merges), computes what the adapted model does.
    save_hf(adapted, tmp_path / "hf")
    assert "lora" not in json.dumps(json.loads((tmp_path / "hf" / "config.json").read_text()))
    reference = Qwen3_5ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = reference(torch.as_tensor(ids)).logits.numpy()
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-5

    # PEFT puts the adapters, written in its layout, onto the HF base, and computes the same logits.
    save_hf(plain, tmp_path / "base")
    save_peft(adapted, tmp_path / "adapter")
    base = Qwen3_5ForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    peft_adapted = {name.split(".lora_A.")[0].rsplit(".", 1)[-1] for name, _ in peft_model.named_parameters()
                    if ".lora_A." in name}
    assert peft_adapted == {"q_proj", "in_proj_qkv", "down_proj"}
    assert sum(".lora_A." in name for name, _ in peft_model.named_parameters()) == sum(
        np.prod(leaf.shape[:-2]) for path, leaf in flat(adapters).items() if path[-1] == "lora_a")
    with torch.no_grad():
        theirs = peft_model(torch.as_tensor(ids)).logits.numpy()
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-5


def test_lora_fields_are_checked():
    with pytest.raises(ConfigError, match="lora_rank must be an integer >= 0"):
        preset("tiny", lora_rank=-1)
    with pytest.raises(ConfigError, match="lora_targets"):
        preset("tiny", lora_rank=4, lora_targets=("q_proj", "lm_head"))
    with pytest.raises(ConfigError, match="lora_alpha must be > 0"):
        preset("tiny", lora_rank=4, lora_alpha=0.0)
    assert preset("tiny", lora_rank=2, lora_targets="q_proj,v_proj").lora_targets == ("q_proj", "v_proj")
    with pytest.raises(ConfigError, match=r"lora_also_train names no module \['embeddings'\]"):
        make_trainer(preset("tiny", lora_rank=2, lora_also_train="embeddings"), TrainConfig(batch_size=8, seq_len=32),
                     make_mesh({"data": 1}, jax.devices()[:1]), DEFAULT_RULES)


def test_what_a_lora_run_trains_is_split_from_the_base():
    params = params_of(Qwen35ForCausalLM(preset("tiny", vocab_size=64, lora_rank=2), rngs=nnx.Rngs(0)))
    frozen, trained = split_trained(params, ("embed_tokens", "norm"))
    assert leaf_names(trained) == {"lora_a", "lora_b", "embedding", "weight"}  # the final and GDN norms' weights
    assert "embed_tokens" not in frozen and "norm" not in frozen and "lora_a" not in leaf_names(frozen)
    assert flat(join(frozen, trained)).keys() == flat(params).keys()


def test_a_lora_train_step_on_a_mesh_moves_only_the_adapters():
    model = preset("tiny", vocab_size=256, num_hidden_layers=4, lora_rank=4)
    train = TrainConfig(batch_size=8, seq_len=32, lr=1e-2, warmup_steps=0, schedule="constant", grad_accum=2)
    trainer = make_trainer(model, train, make_mesh({"fsdp": 4, "tensor": 2}), DEFAULT_RULES)
    state = trainer.init_state(seed=0)
    before = jax.tree.map(np.asarray, state)
    assert set(before) >= {"params", "frozen"} and leaf_names(before["params"]) == set(ADAPTER_LEAVES)
    assert not any(name in ADAPTER_LEAVES for name in leaf_names(before["frozen"]))
    moments = {leaf.shape for leaf in jax.tree.leaves(before["opt_state"]) if leaf.ndim}
    assert moments == {leaf.shape for leaf in jax.tree.leaves(before["params"])}  # Adam keeps the adapters' only
    losses = []
    for seed in range(3):
        ids = np.random.default_rng(0).integers(0, 256, (8, 33)).astype(np.int32)  # one batch, three times
        batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((8, 32), np.int32),
                 "loss_mask": np.ones((8, 32), np.float32)}
        state, metrics = trainer.step_fn(state, trainer.global_batch(batch))
        losses.append(float(metrics["learning/loss"]))
    assert losses[2] < losses[0]
    for path, leaf in flat(before["frozen"]).items():
        np.testing.assert_array_equal(np.asarray(flat(state["frozen"])[path]), leaf)
    assert all(np.abs(np.asarray(b)).max() > 0 for path, b in flat(state["params"]).items() if path[-1] == "lora_b")


def chats(path, start, count):
    words = "the list sorts its items in place a dict maps keys to values".split()
    path.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"q{i} {words[i % 12]} {words[(i + 3) % 12]}?"},
        {"role": "assistant", "content": " ".join(words[(i + j) % 12] for j in range(2 + i % 5))}]})
        for i in range(start, start + count)) + "\n")
    return path


def test_lora_sft_and_dpo_runs_train_only_adapters_resume_exactly_and_convert(tmp_path, capsys):
    small = ["wandb.mode=disabled", "train.batch_size=8", "train.seq_len=96", "model.vocab_size=400",
             "model.num_hidden_layers=2", "train.eval_batches=1", "checkpoint.every_steps=2"]
    sources = f"data.chat_sources=['{chats(tmp_path / 'chats.jsonl', 0, 300)}']"
    base = tmp_path / "base"
    run_training(load_config("configs/sft_tiny.py", small + ["train.steps=2", sources]), base)
    lora = small + ["model.lora_rank=4", "train.lr=1e-2", "train.steps=4", sources,
                    f"init_from={base / 'checkpoints' / '2'}"]
    sft = tmp_path / "sft"
    assert_resume_from_step_2_repeats_the_run(load_config("configs/sft_tiny.py", lora), sft, capsys)

    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.restore((sft / "checkpoints" / "4" / "state").absolute())
    assert leaf_names(saved["params"]) == set(ADAPTER_LEAVES) and "frozen" not in saved
    with ocp.StandardCheckpointer() as checkpointer:
        base_params = checkpointer.restore((base / "checkpoints" / "2" / "state").absolute())["params"]
    base_model, _, _ = load_for_generation(base)
    ids = np.arange(30)[None] % 400
    assert any(np.abs(b).max() > 0 for path, b in flat(saved["params"]).items() if path[-1] == "lora_b")
    model, _, _ = load_for_generation(sft)  # the adapters merged into the base
    assert model.config.lora_rank == 0 and flat(params_of(model)).keys() == flat(base_params).keys()
    assert np.abs(np.asarray(model(ids).logits) - np.asarray(base_model(ids).logits)).max() > 1e-3

    main(["convert", f"--from={sft}", f"--to-hf={tmp_path / 'hf'}"])
    np.testing.assert_allclose(np.asarray(load_hf(tmp_path / "hf")(ids).logits), np.asarray(model(ids).logits),
                               rtol=1e-4, atol=1e-4)
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    # The adapters alone, as PEFT's, on the base exported to HF: the same model.
    main(["convert", f"--from={base}", f"--to-hf={tmp_path / 'base_hf'}"])
    main(["convert", f"--from={sft}", f"--to-peft={tmp_path / 'peft'}"])
    peft_model = PeftModel.from_pretrained(Qwen3_5ForCausalLM.from_pretrained(tmp_path / "base_hf"), tmp_path / "peft")
    with torch.no_grad():
        theirs = peft_model.eval()(torch.as_tensor(ids), use_cache=False).logits.numpy()  # 2 GDN layers, no attention
    np.testing.assert_allclose(theirs, np.asarray(model(ids).logits), rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit, match="no LoRA adapters"):
        main(["convert", f"--from={base}", f"--to-peft={tmp_path / 'none'}"])

    # DPO with LoRA: the reference is the base (zero adapters), so the first step sits at log 2, and later
    # rewards (policy against reference) are not zero.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"q{i}?", "chosen": "a dict maps keys", "rejected": "keys maps"})
                               for i in range(200)) + "\n")
    # Trained whole beside the adapters, the embedding's start is part of the reference.
    dpo = load_config("configs/dpo_tiny.py", lora + [f"data.chat_sources=['{pairs}']", "train.eval_every=2",
                                                     "model.lora_also_train=embed_tokens"])
    rows = assert_resume_from_step_2_repeats_the_run(dpo, tmp_path / "dpo", capsys)
    np.testing.assert_allclose(rows[0]["learning/loss"], np.log(2), rtol=1e-5)
    assert rows[0]["dpo/accuracy"] == 0 and rows[-1]["dpo/chosen_reward"] != 0

    with pytest.raises(ConfigError, match="set init_from"):
        run_training(load_config("configs/sft_tiny.py", small + ["model.lora_rank=4", sources]), tmp_path / "no_base")
    shutil.move(base, tmp_path / "moved")
    with pytest.raises(ConfigError, match="hold only its adapters, and its base .* is not there"):
        load_for_generation(sft)


def test_a_lora_rl_run_starts_at_its_base_and_resumes_exactly(tmp_path, capsys):
    small = ["wandb.mode=disabled", "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
             "rl.env_kwargs.max_operand=1", "rl.warmup_steps=0", "rl.lr=1e-2", "rl.groups=2", "rl.group_size=4",
             "rl.max_new_tokens=3", "rl.max_length=24", "rl.eval_prompts=4", "rl.eval_every=100", "rl.steps=4",
             "checkpoint.every_steps=2", "rl.kl_coef=0.1", "rl.minibatches=1"]
    save_model(Qwen35ForCausalLM(model_config(load_config("configs/rl_tiny.py", small)), rngs=nnx.Rngs(3)),
               tmp_path / "base")
    config = load_config("configs/rl_tiny.py", small + ["model.lora_rank=4", f"init_from={tmp_path / 'base'}"])
    workdir = tmp_path / "rl"
    run_rl(config, workdir)
    first = read_metrics(workdir / "metrics.jsonl")
    assert first[0]["actor/kl"] < 1e-9  # the reference is the base, where the policy starts (up to rounding)
    assert first[-1]["actor/kl"] > 1e-6
    shutil.rmtree(workdir / "checkpoints" / "4")
    capsys.readouterr()
    run_rl(config, workdir)
    assert capsys.readouterr().out.startswith("resumed from step 2\n")
    again = read_metrics(workdir / "metrics.jsonl")
    for key in ("rewards/mean", "actor/loss", "actor/kl"):
        assert [row[key] for row in again] == [row[key] for row in first], key
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.restore((workdir / "checkpoints" / "4" / "state").absolute())
    assert leaf_names(saved["params"]) == set(ADAPTER_LEAVES) and "reference" not in saved
    with pytest.raises(ConfigError, match="rl.warmup_steps trains the whole model"):
        run_rl(load_config("configs/rl_tiny.py", small + ["model.lora_rank=4", "rl.warmup_steps=2",
                                                         f"init_from={tmp_path / 'base'}"]), tmp_path / "warm")
