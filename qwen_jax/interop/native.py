"""qwen-jax's own model directory: model_config.json (ModelConfig) + Orbax params, for `qwen-jax convert`,
with the tokenizer and generation files of the HF directory it came from."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from qwen_jax.config import ModelConfig
from qwen_jax.interop.hf import copy_tokenizer_files
from qwen_jax.model.decoder import Qwen35ForCausalLM

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def save_model(model: Qwen35ForCausalLM, path: str | Path) -> None:
    """Write DIR/model_config.json and DIR/params (Orbax) for `model`, and its source's tokenizer files."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.config), indent=2))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / PARAMS_DIR, nnx.to_pure_dict(nnx.state(model, nnx.Param)), force=True)
    copy_tokenizer_files(model, path)


def load_model(path: str | Path) -> Qwen35ForCausalLM:
    """Read a directory written by save_model."""
    path = Path(path).absolute()
    if not (path / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{path / CONFIG_FILE} not found: not a qwen-jax model directory")
    config = ModelConfig(**json.loads((path / CONFIG_FILE).read_text()))
    abstract = nnx.eval_shape(lambda: Qwen35ForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(path / PARAMS_DIR, target)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    model.source_dir = str(path)  # its tokenizer files go along when it is saved again
    return model
