"""Hugging Face safetensors <-> qwen-jax params: config mapping, tensor names, streaming load."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from safetensors import safe_open
from safetensors.flax import save_file

from qwen_jax.config import ROPE_TYPES, ModelConfig, RopeScaling, VisionConfig
from qwen_jax.interop import hf_layouts
from qwen_jax.model.decoder import Qwen35ForCausalLM
from qwen_jax.model.lora import plain_model

# model_type -> (our architecture, whether the text config is nested under "text_config")
MODEL_TYPES = {"qwen3_5_text": ("qwen3_5", False), "qwen3_5": ("qwen3_5", True),
               "qwen3_5_moe_text": ("qwen3_5", False), "qwen3_5_moe": ("qwen3_5", True),
               "qwen3_next": ("qwen3_next", False)}
SUPPORTED_MODEL_TYPES = tuple(MODEL_TYPES)
TEXT_PREFIXES = ("model.language_model.", "model.")
VISION_PREFIX = "model.visual."  # read when the config has a vision tower, skipped otherwise
IGNORED_PREFIXES = ("mtp.",)  # multi-token-prediction heads: HF does not use them either
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")
SHARD_BYTES = 4 * 1024**3
HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "linear_num_key_heads", "linear_num_value_heads",
    "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim", "layer_types",
    "rms_norm_eps", "max_position_embeddings", "initializer_range", "eos_token_id", "pad_token_id",
)
MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
              "shared_expert_intermediate_size", "router_aux_loss_coef")
# What each architecture's text-only class is called in transformers: (dense, MoE).
HF_CLASSES = {"qwen3_5": (("Qwen3_5ForCausalLM", "qwen3_5_text"),
                          ("Qwen3_5MoeForCausalLM", "qwen3_5_moe_text")),
              "qwen3_next": (("Qwen3NextForCausalLM", "qwen3_next"),) * 2}
# The vision-language classes (dense, MoE); their vision config's model_type is this + "_vision".
HF_VLM_CLASSES = (("Qwen3_5ForConditionalGeneration", "qwen3_5"),
                  ("Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe"))
VISION_FIELDS = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                 "temporal_patch_size", "spatial_merge_size", "out_hidden_size",
                 "num_position_embeddings", "hidden_act", "initializer_range")
# Kept on the composite (top-level) config by HF.
TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
# Optional yarn rope_parameters besides factor and original_max_position_embeddings.
YARN_FIELDS = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message names the tensor or field."""


# ---------------------------------------------------------------- config


def config_from_hf(hf: dict, *, dtype: str = "float32") -> ModelConfig:
    """An HF config.json dict (Qwen3.5 dense or MoE, text or vision-language; Qwen3-Next) -> ModelConfig."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"config.json model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    architecture, nested = MODEL_TYPES[model_type]
    text = hf["text_config"] if nested else hf
    fields = {name: text[name] for name in HF_FIELDS + MOE_FIELDS if text.get(name) is not None}
    rope = text.get("rope_parameters") or {}
    if rope.get("rope_type", "default") not in ("default",) + ROPE_TYPES:
        raise CheckpointError(f"rope_parameters.rope_type {rope['rope_type']!r} is not supported; "
                              f"supported: default, {', '.join(ROPE_TYPES)}")
    for name in ("rope_theta", "partial_rotary_factor", "mrope_section"):
        if name in rope:
            fields[name] = rope[name]
    if rope.get("rope_type") == "yarn":
        fields["rope_scaling"] = _rope_scaling_from_hf(rope, text)
    if architecture == "qwen3_next":
        _check_all_layers_sparse(text)
        # Plain 1-D RoPE: every frequency slot takes the (text) position.
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        fields["mrope_section"] = (int(head_dim * rope.get("partial_rotary_factor", 0.25)) // 2, 0, 0)
        fields["norm_topk_prob"] = text.get("norm_topk_prob", True)
    # The vision-language wrapper decides tying at its top level.
    fields["tie_word_embeddings"] = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    if nested and hf.get("vision_config") is not None:
        fields["vision"] = _vision_config_from_hf(hf["vision_config"])
        fields.update({name: hf[name] for name in TOKEN_FIELDS if hf.get(name) is not None})
    return ModelConfig(**fields, architecture=architecture, dtype=dtype, param_dtype=dtype)


def _rope_scaling_from_hf(rope: dict, text: dict) -> RopeScaling:
    """HF's yarn rope_parameters -> RopeScaling; a missing factor is max / original positions, as HF."""
    original = rope.get("original_max_position_embeddings")
    if original is None:
        raise CheckpointError("rope_parameters with rope_type 'yarn' needs original_max_position_embeddings")
    factor = rope.get("factor") or text["max_position_embeddings"] / original
    optional = {name: rope[name] for name in YARN_FIELDS if rope.get(name) is not None}
    return RopeScaling(factor=factor, original_max_position_embeddings=original, **optional)


def _vision_config_from_hf(vision: dict) -> VisionConfig:
    rope = vision.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise CheckpointError(
            f"vision_config.rope_parameters.rope_type {rope['rope_type']!r} is not supported (only 'axial')")
    fields = {name: vision[name] for name in VISION_FIELDS if vision.get(name) is not None}
    if "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    return VisionConfig(**fields)


def _check_all_layers_sparse(text: dict) -> None:
    """Qwen3-Next may mix dense MLP layers into the MoE stack; every published size is all-MoE."""
    if text.get("decoder_sparse_step", 1) != 1 or text.get("mlp_only_layers"):
        raise CheckpointError(
            f"config.json decoder_sparse_step={text.get('decoder_sparse_step')} / mlp_only_layers="
            f"{text.get('mlp_only_layers')}: only stacks where every layer is MoE "
            "(decoder_sparse_step 1, mlp_only_layers []) are supported")


def config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig -> the config.json of transformers' matching class (text-only, or the
    vision-language one with the text config nested when the model has a vision tower)."""
    architecture, model_type = HF_CLASSES[cfg.architecture][cfg.is_moe]
    out = {name: getattr(cfg, name) for name in HF_FIELDS}
    out["layer_types"] = list(cfg.layer_types)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": cfg.partial_rotary_factor}
    if cfg.rope_scaling is not None:
        scaling = cfg.rope_scaling
        rope.update(rope_type=scaling.rope_type, factor=scaling.factor,
                    original_max_position_embeddings=scaling.original_max_position_embeddings,
                    **{name: getattr(scaling, name) for name in YARN_FIELDS if getattr(scaling, name) is not None})
    if cfg.architecture == "qwen3_5":
        rope.update(mrope_section=list(cfg.mrope_section), mrope_interleaved=True)
    out.update(
        architectures=[architecture], model_type=model_type, hidden_act="silu",
        attention_bias=False, attention_dropout=0.0, tie_word_embeddings=cfg.tie_word_embeddings,
        dtype=cfg.param_dtype, use_cache=True, rope_parameters=rope,
    )
    if cfg.is_moe:
        out.update({name: getattr(cfg, name) for name in MOE_FIELDS})
        if model_type == "qwen3_5_moe_text":
            del out["intermediate_size"]  # HF's MoE config has none
    if cfg.architecture == "qwen3_next":
        out.update(norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[])
    if isinstance(cfg.eos_token_id, tuple):
        out["eos_token_id"] = list(cfg.eos_token_id)
    if cfg.vision is None:
        return out
    architecture, model_type = HF_VLM_CLASSES[cfg.is_moe]
    del out["architectures"]
    vision = {name: getattr(cfg.vision, name) for name in VISION_FIELDS}
    vision.update(model_type=f"{model_type}_vision",
                  rope_parameters={"rope_type": "axial", "rope_theta": cfg.vision.rope_theta})
    return {"architectures": [architecture], "model_type": model_type, "text_config": out,
            "vision_config": vision, **{name: getattr(cfg, name) for name in TOKEN_FIELDS},
            "tie_word_embeddings": cfg.tie_word_embeddings, "dtype": cfg.param_dtype}


# ---------------------------------------------------------------- tensor names


def _to_hf(x: np.ndarray, kind: str) -> np.ndarray:
    """One of our param arrays -> HF's layout."""
    if kind == "linear":  # Flax kernel [in..., out] -> torch weight [out, in...] (Linear, Conv3d patches)
        return np.moveaxis(x, -1, 0)
    if kind == "conv":  # ours [K, C] -> torch depthwise [C, 1, K]
        return x.T[:, None, :]
    if kind == "experts":  # ours [E, in, out] -> HF [E, out, in]
        return np.swapaxes(x, -1, -2)
    return x


def _from_hf(x: np.ndarray, kind: str) -> np.ndarray:
    """One HF tensor -> our layout (inverse of _to_hf)."""
    if kind == "linear":
        return np.moveaxis(x, 0, -1)
    if kind == "conv":
        return x[:, 0, :].T
    if kind == "experts":
        return np.swapaxes(x, -1, -2)
    return x


def _leaf_name(path: tuple) -> tuple[str, str]:
    """Our relative leaf path -> (HF name relative to the same prefix, layout kind)."""
    *head, last = [str(p) for p in path]
    if last == "kernel":
        return ".".join([*head, "weight"]), "linear"
    if last in ("embedding", "scale"):  # nnx.Embed's table, nnx.LayerNorm's weight
        return ".".join([*head, "weight"]), "plain"
    if last == "conv_weight":
        return ".".join([*head, "conv1d", "weight"]), "conv"
    if head and head[-1] == "experts":
        return ".".join([*head, last]), "experts"
    return ".".join([*head, last]), "plain"


def tensor_map(model: Qwen35ForCausalLM) -> dict[str, tuple[tuple, int | None, str]]:
    """HF tensor name -> (our flat state path, index in the stacked layer axis or None, layout kind)."""
    entries = {}

    def add(module, hf_prefix: str, our_prefix: tuple, index: int | None):
        for rel in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(module, nnx.Param))):
            name, kind = _leaf_name(rel)
            entries[hf_prefix + name] = (our_prefix + tuple(rel), index, kind)

    for top in ("embed_tokens", "norm"):
        add(getattr(model, top), f"model.{top}.", (top,), None)
    if not model.config.tie_word_embeddings:
        add(model.lm_head, "lm_head.", ("lm_head",), None)
    period = len(model.group_pattern)
    for i in range(model.config.num_hidden_layers):
        layer, index = model.layer(i)
        if index is None:
            our_prefix = ("tail", "layers", i - model.num_groups * period)
        else:
            our_prefix = ("groups", "layers", i % period)
        add(layer, f"model.layers.{i}.", our_prefix, index)
    if model.visual is not None:
        for part in ("patch_embed", "pos_embed", "merger"):
            add(getattr(model.visual, part), f"{VISION_PREFIX}{part}.", ("visual", part), None)
        for j in range(model.config.vision.depth):
            add(model.visual.blocks, f"{VISION_PREFIX}blocks.{j}.", ("visual", "blocks"), j)
    return entries


def canonical_name(name: str, vision: bool) -> str | None:
    """A checkpoint key -> our canonical 'model.'/'model.visual.'/'lm_head.' name; None for keys we
    ignore (the vision tower's too, when the model is text only, as HF's text-only class does)."""
    if name.startswith(IGNORED_PREFIXES) or (name.startswith(VISION_PREFIX) and not vision):
        return None
    if name.startswith(VISION_PREFIX):
        return name
    for prefix in TEXT_PREFIXES:
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    return name


# ---------------------------------------------------------------- load / save


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    return files


class _Assembler:
    """Fills host buffers for our params from checkpoint tensors in any supported layout."""

    def __init__(self, model: Qwen35ForCausalLM):
        self.config = model.config
        self.names = tensor_map(model)
        self.shapes = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        self.buffers: dict[tuple, np.ndarray] = {}
        self.seen: dict[str, set] = {}

    def _target(self, name: str, where: str) -> tuple[np.ndarray, tuple, str]:
        """(writable view of our param for HF tensor `name`, its shape in our layout, layout kind)."""
        if name not in self.names:
            raise CheckpointError(f"{where} is not part of this model")
        our_path, index, kind = self.names[name]
        shape = self.shapes[our_path].shape
        if our_path not in self.buffers:
            self.buffers[our_path] = np.empty(shape, jnp.dtype(self.config.param_dtype))
        view = self.buffers[our_path] if index is None else self.buffers[our_path][index]
        return view, view.shape, kind

    def add(self, file: str, key: str, reader) -> None:
        """Read checkpoint tensor `key` (shape-checked before its data is read) into the buffers."""
        name = canonical_name(key, self.config.vision is not None)
        if name is None:
            return
        where = f"{file}: tensor {key!r}"
        found = tuple(reader.get_slice(key).get_shape())
        fused_rows = hf_layouts.next_fused_rows(name, self.config)
        if self.config.architecture == "qwen3_next" and fused_rows is not None:
            _check_shape(where, found, (fused_rows, self.config.hidden_size))
            for part_name, part in hf_layouts.split_next_projection(name, reader.get_tensor(key),
                                                                    self.config):
                self._place(part_name, None, part, where)
            return
        piece = hf_layouts.per_expert_piece(name)
        if piece is not None:
            fused_name, expert, proj = piece
            view, shape, _ = self._target(fused_name, where)
            width = shape[-1] // 2 if proj != "down" else shape[1]
            expected = (width, shape[1]) if proj != "down" else (shape[2], width)
            if expert >= shape[0]:
                raise CheckpointError(f"{where}: expert {expert} but the model has {shape[0]} experts")
            _check_shape(where, found, expected)
            self._place(fused_name, (expert, proj), reader.get_tensor(key), where)
            return
        view, shape, kind = self._target(name, where)
        _check_shape(where, found, _to_hf(np.empty(shape, np.int8), kind).shape)
        self._place(name, None, reader.get_tensor(key), where)

    def _place(self, name: str, part, tensor, where: str) -> None:
        view, shape, kind = self._target(name, where)
        tensor = np.asarray(tensor)
        if part is None:
            view[...] = _from_hf(tensor, kind)
        else:
            expert, proj = part
            columns = {"gate": slice(0, shape[-1] // 2), "up": slice(shape[-1] // 2, None),
                       "down": slice(None)}[proj]
            view[expert, :, columns] = tensor.T
        self.seen.setdefault(name, set()).add(part)

    def params(self, source: Path) -> dict:
        """The assembled params (pure dict); every tensor must have been seen in full."""
        missing = []
        for name, (our_path, _, kind) in self.names.items():
            parts = self.seen.get(name, set())
            if None in parts:
                continue
            if kind == "experts" and parts:
                projs = ("down",) if name.endswith("down_proj") else ("gate", "up")
                absent = [f"{name.rsplit('.', 1)[0]}.{e}.{p}_proj.weight"
                          for e in range(self.shapes[our_path].shape[-3]) for p in projs
                          if (e, p) not in parts]
                missing.extend(absent)
            else:
                missing.append(name)
        if missing:
            raise CheckpointError(
                f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        # Move each buffer to the device and drop its host copy before the next one.
        return traverse_util.unflatten_dict(
            {p: jnp.asarray(self.buffers.pop(p)) for p in list(self.buffers)})


def _check_shape(where: str, found: tuple, expected: tuple) -> None:
    if tuple(found) != tuple(expected):
        raise CheckpointError(f"{where} has shape {tuple(found)}, the model expects {tuple(expected)}")


def load_hf(path: str | os.PathLike, dtype: str = "float32") -> Qwen35ForCausalLM:
    """Load an HF Qwen3.5 / Qwen3.5-MoE / Qwen3-Next directory tensor by tensor (never two full
    copies in host memory); experts may be fused or per-expert. A vision-language config.json
    (with a vision_config) brings the vision tower along."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{config_file} not found: not a Hugging Face model directory")
    cfg = config_from_hf(json.loads(config_file.read_text()), dtype=dtype)
    abstract = nnx.eval_shape(lambda: Qwen35ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    assembler = _Assembler(abstract)
    for file in _checkpoint_files(path):
        with safe_open(file, framework="flax") as reader:
            for key in reader.keys():
                assembler.add(file.name, key, reader)
    nnx.replace_by_pure_dict(state, assembler.params(path))
    model = nnx.merge(graphdef, state)
    model.source_dir = str(path)
    return model


def checkpoint_name(name: str, cfg: ModelConfig) -> str:
    """Our canonical name -> the key transformers writes: text weights go under
    model.language_model. in a vision-language checkpoint."""
    if cfg.vision is None or name.startswith(VISION_PREFIX) or not name.startswith("model."):
        return name
    return "model.language_model." + name.removeprefix("model.")


def hf_tensors(model: Qwen35ForCausalLM):
    """(canonical name, array in HF layout) for every tensor transformers' class saves: experts per
    expert, Qwen3-Next's GDN projections fused."""
    cfg = model.config
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    names = tensor_map(model)

    def value(name):
        our_path, index, kind = names[name]
        array = flat[our_path] if index is None else flat[our_path][index]
        return _to_hf(np.asarray(array), kind)

    for name, (_, _, kind) in names.items():
        if kind == "experts":
            yield from hf_layouts.split_experts(name, value(name))
        elif cfg.architecture == "qwen3_next" and name.endswith("linear_attn.in_proj_qkv.weight"):
            prefix = name.removesuffix("qkv.weight")
            yield prefix + "qkvz.weight", hf_layouts.fuse_qkvz(value(name), value(prefix + "z.weight"), cfg)
        elif cfg.architecture == "qwen3_next" and name.endswith("linear_attn.in_proj_b.weight"):
            prefix = name.removesuffix("b.weight")
            yield prefix + "ba.weight", hf_layouts.fuse_ba(value(name), value(prefix + "a.weight"), cfg)
        elif cfg.architecture == "qwen3_next" and name.endswith(("in_proj_z.weight", "in_proj_a.weight")):
            continue  # written inside the fused tensor above
        else:
            yield name, value(name)


def save_hf(model: Qwen35ForCausalLM, path: str | os.PathLike) -> None:
    """Write config.json + safetensors that transformers' matching class loads (+ tokenizer files); a LoRA
    model's adapters are merged into its kernels first."""
    model = plain_model(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, jax.Array]] = [{}]
    shard_bytes = 0
    for name, array in hf_tensors(model):
        name = checkpoint_name(name, model.config)
        tensor = jnp.asarray(array)
        if shards[-1] and shard_bytes + tensor.nbytes > SHARD_BYTES:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += tensor.nbytes
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.nbytes for s in shards for t in s.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2))
    copy_tokenizer_files(model, path)


def copy_tokenizer_files(model, path: Path) -> None:
    """Copy the tokenizer and generation files of the directory `model` was loaded from into `path`."""
    source = getattr(model, "source_dir", None)
    for name in TOKENIZER_FILES:
        if source and (Path(source) / name).exists() and Path(source).resolve() != Path(path).resolve():
            shutil.copy(Path(source) / name, Path(path) / name)
