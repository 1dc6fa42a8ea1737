"""What `qwen-jax generate` runs: a model, its tokenizer and its stop ids from an HF directory, a
`qwen-jax convert` directory, a qwen-jax workdir or one of its checkpoint steps."""

from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx
from tokenizers import Tokenizer

from qwen_jax.config import ConfigError, ModelConfig


def _ids(value) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def load_for_generation(path: str | Path):
    """DIR -> (model, tokenizer, stop ids). HF and `qwen-jax convert` dirs stop at the eos ids of
    generation_config.json (else config.json); workdirs at their tokenizer's end of text (and at
    `<|im_end|>` where it has one)."""
    from qwen_jax.data.tokenizer import stop_ids
    from qwen_jax.interop.hf import load_hf
    from qwen_jax.interop.native import CONFIG_FILE, load_model

    path = Path(path)
    if (path / "state").is_dir():  # a checkpoint step: WORKDIR/checkpoints/<step>
        return _load_run(path)
    config_file = path / "config.json"
    if (path / CONFIG_FILE).exists():
        model, config = load_model(path), {}
    elif config_file.exists():
        config = json.loads(config_file.read_text())
        if "model" in config and (path / "checkpoints").is_dir():
            return _load_run(path)
        model = load_hf(path)
    else:
        raise ConfigError(f"--model={path}: no config.json; expected an HF directory, a `qwen-jax convert` "
                          "directory, a qwen-jax workdir or a checkpoint step directory")
    generation = path / "generation_config.json"
    source = json.loads(generation.read_text()) if generation.exists() else config
    stop = _ids(source.get("eos_token_id", (config.get("text_config") or {}).get("eos_token_id")))
    tokenizer = _tokenizer(path)
    return model, tokenizer, stop or stop_ids(tokenizer)


def _tokenizer(path: Path) -> Tokenizer:
    file = path / "tokenizer.json"
    if not file.exists():
        raise ConfigError(f"--model={path}: no tokenizer.json beside the weights")
    return Tokenizer.from_file(str(file))


def _load_run(path: Path):
    """A run's model (load_run_model, adapters merged), its tokenizer and stop ids."""
    from qwen_jax.data.tokenizer import stop_ids

    model = load_run_model(path)
    tokenizer = _tokenizer(Path(model.source_dir))
    return model, tokenizer, stop_ids(tokenizer)


def load_run_model(path: str | Path, *, merge: bool = True):
    """A qwen-jax workdir (its newest complete step) or checkpoint step dir -> the model, with the run's model
    config. A LoRA run's adapters go onto the base it trained them on (its init_from, quantised as the run's
    was), merged into its kernels (the plain model, which decodes faster) unless `merge` is False."""
    import orbax.checkpoint as ocp

    from qwen_jax.model.decoder import Qwen35ForCausalLM
    from qwen_jax.model.lora import plain_model

    path = Path(path)
    workdir, step_dir = (path.parent.parent, path) if (path / "state").is_dir() else (path, None)
    if step_dir is None:
        with ocp.CheckpointManager((workdir / "checkpoints").absolute()) as manager:
            step = manager.latest_step()  # finished saves only
        if step is None:
            raise ConfigError(f"{workdir}: no checkpoints yet")
        step_dir = workdir / "checkpoints" / str(step)
    run = json.loads((workdir / "config.json").read_text())
    config = ModelConfig(**run["model"])
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(step_dir.absolute() / "state")["params"]
    # On one device, as a model directory loads: a checkpoint restores across all of this host's devices, and
    # a LoRA run's adapters (so restored) meet their base (so loaded) in the merge.
    params = jax.device_put(params, jax.devices()[0])
    model = nnx.eval_shape(lambda: Qwen35ForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    if config.lora_rank:
        params = _on_base(params, run["config"].get("init_from"), nnx.to_pure_dict(state), config, workdir)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    if merge:
        model = plain_model(model)
    model.source_dir = str(workdir)  # its tokenizer files go along when it is converted
    return model


def _on_base(adapters: dict, init_from: str | None, abstract: dict, config: ModelConfig, workdir: Path) -> dict:
    """A LoRA run's adapters joined to its base, read from the run's init_from."""
    from qwen_jax.interop.init_from import load_init_params
    from qwen_jax.model.lora import join, split_adapters

    if not init_from or not Path(init_from).exists():
        raise ConfigError(f"{workdir}: a LoRA run's checkpoints hold only its adapters, and its base "
                          f"(init_from={init_from!r}) is not there to put them on")
    return join(load_init_params(init_from, split_adapters(abstract)[0], config.param_dtype), adapters)


def with_weight_quant(model, quant: str):
    """`model` with its projections' kernels quantised as ModelConfig.weight_quant `quant` says ("" : as it is;
    a LoRA model's adapters merged first)."""
    from qwen_jax.model.decoder import Qwen35ForCausalLM
    from qwen_jax.model.lora import plain_model
    from qwen_jax.model.quant import quantize_like

    if not quant:
        return model
    plain = plain_model(model)
    abstract = nnx.eval_shape(lambda: Qwen35ForCausalLM(plain.config.replace(weight_quant=quant), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, quantize_like(nnx.to_pure_dict(nnx.state(plain, nnx.Param)),
                                                  nnx.to_pure_dict(state)))
    quantized = nnx.merge(graphdef, state)
    quantized.source_dir = getattr(model, "source_dir", None)
    return quantized
