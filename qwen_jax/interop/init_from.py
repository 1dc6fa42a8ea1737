"""`init_from`: the params, and the tokenizer, a train or RL run starts from. A source is an HF
directory, a `qwen-jax convert` directory, or a checkpoint step of a train or RL run
(WORKDIR/checkpoints/<step>, whose run kept its tokenizer in WORKDIR)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
from flax import nnx

from qwen_jax.config import ConfigError
from qwen_jax.model.quant import float_targets, quantize_like

CHAT_FILES = ("tokenizer_config.json", "chat_template.jinja")
SOURCES = ("an HF directory", "a `qwen-jax convert` directory", "a checkpoint step directory")


def source_kind(path: str | Path) -> str:
    """'hf', 'native' or 'checkpoint'; anything else raises a ConfigError naming the path."""
    from qwen_jax.interop.native import CONFIG_FILE

    path = Path(path)
    if (path / "config.json").exists():
        return "hf"
    if (path / CONFIG_FILE).exists():
        return "native"
    if (path / "state").is_dir():
        return "checkpoint"
    raise ConfigError(f"init_from={str(path)!r} is neither {', '.join(SOURCES[:-1])} nor {SOURCES[-1]}")


def load_init_params(path: str | Path, abstract_params: dict, param_dtype) -> dict:
    """The params of `path` as a pure dict, each checked against abstract_params' (ShapeDtypeStructs,
    sharded or not) shape and placed as its sharding, if it has one. A checkpoint gives its params only: its
    optimizer state is not read; a LoRA run's checkpoint gives the model it trained, its adapters merged into
    its base. Where abstract_params holds int8 kernels (model.weight_quant), the source's float ones are
    quantised, one at a time."""
    from qwen_jax.generate.loading import load_run_model
    from qwen_jax.interop.hf import load_hf
    from qwen_jax.interop.native import load_model

    path, kind = Path(path), source_kind(path)
    targets = float_targets(abstract_params, param_dtype)
    if kind == "checkpoint" and not _holds_whole_model(path):
        model = load_run_model(path)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        del model
    elif kind == "checkpoint":
        params = _restore_params(path / "state", targets)
    else:
        model = load_hf(path, dtype=param_dtype) if kind == "hf" else load_model(path)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        del model  # the float kernels go as they are quantised
    expected = dict(jax.tree_util.tree_flatten_with_path(targets)[0])
    for key, got in jax.tree_util.tree_flatten_with_path(params)[0]:
        want = expected.get(key)
        if want is None or got.shape != want.shape:
            wanted = "no such parameter" if want is None else f"the configured model expects {want.shape}"
            raise ConfigError(f"init_from {path}: parameter {jax.tree_util.keystr(key)} has shape "
                              f"{got.shape}; {wanted}")

    def place(key, x):  # as the target says where it says (a model directory loads onto one device)
        sharding = getattr(expected[key], "sharding", None)
        return x if sharding is None else jax.device_put(x, sharding)

    return quantize_like(jax.tree_util.tree_map_with_path(place, params), abstract_params)


def load_start_params(init_from: str, init_adapter: str, abstract_params: dict, model_config) -> dict:
    """load_init_params of init_from, with the PEFT adapter `init_adapter` (where given) merged into its
    kernels: what a run that trains the whole model starts from."""
    from qwen_jax.interop.peft import merge_adapter

    params = load_init_params(init_from, abstract_params, model_config.param_dtype)
    return merge_adapter(params, init_adapter, model_config) if init_adapter else params


def check_init_adapter(init_from: str, init_adapter: str) -> None:
    """Raise ConfigError for an adapter given without the base it adapts, or one that is not a PEFT LoRA."""
    from qwen_jax.interop.peft import read_adapter_config

    if init_adapter and not init_from:
        raise ConfigError(f"init_adapter={init_adapter!r} is a PEFT adapter of a base model: set init_from to that "
                          "base (an HF or qwen-jax model directory, or a checkpoint step)")
    if init_adapter:
        read_adapter_config(init_adapter)


def _holds_whole_model(step_dir: Path) -> bool:
    """Whether a checkpoint step holds its model's every param: not a LoRA run's (adapters alone)."""
    run = step_dir.parent.parent / "config.json"
    return not (run.exists() and json.loads(run.read_text()).get("model", {}).get("lora_rank"))


def _restore_params(state_dir: Path, abstract_params: dict) -> dict:
    import orbax.checkpoint as ocp

    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        state = checkpointer.restore(state_dir.absolute(), args=ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args={"params": restore_args},
            partial_restore=True))
    return state["params"]


def tokenizer_dir(path: str | Path) -> Path | None:
    """Where the source keeps its tokenizer files (a checkpoint step: its run's WORKDIR); None for no source."""
    if not path:
        return None
    path = Path(path)
    return path.parent.parent if source_kind(path) == "checkpoint" else path


def tokenizer_file(path: str | Path) -> Path | None:
    """The source's tokenizer.json (a checkpoint step's: its run's), or None where it has none or no source
    is given (init_from "")."""
    directory = tokenizer_dir(path)
    file = directory / "tokenizer.json" if directory else None
    return file if file and file.exists() else None


def keep_chat_files(path: str | Path, workdir: Path) -> None:
    """Copy the source's tokenizer_config.json and chat_template.jinja (where it has them) into the run's
    workdir, so that a checkpoint step of this run is a source with the same chat template."""
    directory = tokenizer_dir(path)
    for name in CHAT_FILES:
        source, kept = (directory / name if directory else None), workdir / name
        if source and source.is_file() and not kept.exists() and jax.process_index() == 0:
            shutil.copyfile(source, kept)
