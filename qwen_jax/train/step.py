"""The train state and the jitted, sharded train step (loss, grads, skip-if-non-finite, update)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen_jax.config import ConfigError, ModelConfig, TrainConfig
from qwen_jax.interop.init_from import load_init_params
from qwen_jax.interop.peft import adapter_params
from qwen_jax.model.decoder import Qwen35ForCausalLM
from qwen_jax.model.lora import check_also_train, join, split_adapters, split_trained
from qwen_jax.ops.cross_entropy import chunked_cross_entropy
from qwen_jax.parallel.hosts import HostBatchLayout, host_batch_layout
from qwen_jax.parallel.rules import activation_sharding, hashable_rules, param_shardings, spec_for
from qwen_jax.train.optimizer import learning_rate_schedule, make_optimizer

# Logical axes of each batch array: rows over the batch axes, each row's tokens over `context`.
TEXT_BATCH_AXES = {key: ("batch", "length")
                   for key in ("input_ids", "targets", "segment_ids", "loss_mask")}
IMAGE_BATCH_AXES = {**TEXT_BATCH_AXES,
                    "positions": ("batch", None, "length"),  # [B, 3, T]
                    "pixel_values": ("batch", None, None),  # [B, P, D]
                    "image_grid_thw": ("batch", None, None)}  # [B, I, 3]
VIDEO_BATCH_AXES = {**IMAGE_BATCH_AXES,
                    "pixel_values_videos": ("batch", None, None),  # [B, Pv, D]
                    "video_grid_thw": ("batch", None, None)}  # [B, V, 3]


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Everything static about a run: model structure, optimizer, mesh, shardings, jitted step."""

    model_config: ModelConfig
    train_config: TrainConfig
    mesh: Mesh
    rules: tuple
    graphdef: Any
    optimizer: optax.GradientTransformation
    state_shardings: Any
    batch_shardings: dict[str, NamedSharding]
    batch_axes: dict[str, tuple]  # each batch key's logical axes (TEXT_BATCH_AXES, ...)
    host_layout: HostBatchLayout  # the rows and tokens of every batch this host feeds
    step_fn: Any
    eval_fn: Any  # (model params, batch) -> ({"eval/loss": sum, ...}, count): the means' sums and their count
    reference_fn: Any = None  # DPO: (reference params, batch) -> the reference's token log-probs [B, T]

    @property
    def lora(self) -> bool:
        """Whether the state trains LoRA adapters (and model.lora_also_train's modules: state["params"]) on a
        frozen base (state["frozen"])."""
        return self.model_config.lora_rank > 0

    def init_state(self, seed: int, params=None) -> dict:
        """start_state, sharded over the mesh."""
        return jax.jit(lambda params: start_state(self.model_config, self.optimizer, seed, params),
                       out_shardings=self.state_shardings)(params)

    def global_batch(self, local_batch: dict) -> dict:
        """This host's rows [b, T, ...] (its row block, `host_layout`) -> global arrays [B, T, ...]
        sharded over the batch axes and T over context; where context spans hosts each keeps only
        its own tokens. Keys the step does not read are dropped, and so are those computed on the
        devices (DPO's ref_logprobs: `with_reference`)."""
        arrays = {}
        for key, sharding in self.batch_shardings.items():
            if key == "ref_logprobs":
                continue
            value, axes = local_batch[key], self.batch_axes[key]
            shape = [self.train_config.batch_size, *value.shape[1:]]
            if "length" in axes:
                axis = axes.index("length")
                shape[axis] = value.shape[axis]
                value = self.host_layout.own_tokens(value, axis)
            arrays[key] = jax.make_array_from_process_local_data(sharding, value, tuple(shape))
        return arrays

    def with_reference(self, batch: dict, reference_params) -> dict:
        """A global batch with the reference model's token log-probs added (DPO; others: as it is)."""
        if self.reference_fn is None:
            return batch
        return {**batch, "ref_logprobs": self.reference_fn(reference_params, batch)}


def start_state(model_config: ModelConfig, optimizer, seed: int, params=None) -> dict:
    """A run's first state: new_state of `params` (default: random from `seed`). With LoRA, `params` is the
    base (every leaf but the adapters; default random too) and any adapters to start from (the rest start
    fresh): the adapters and the model.lora_also_train modules are the trained state["params"], the rest is
    held as state["frozen"]."""
    if params is not None and not model_config.lora_rank:
        return new_state(params, optimizer, seed)
    model = Qwen35ForCausalLM(model_config, rngs=nnx.Rngs(seed))
    fresh = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if not model_config.lora_rank:
        return new_state(fresh, optimizer, seed)
    base, adapters = split_adapters(fresh)
    frozen, trained = split_trained(base if params is None else params, model_config.lora_also_train)
    return {**new_state(join(adapters, trained), optimizer, seed), "frozen": frozen}


def model_params(state: dict, trained=None) -> dict:
    """The whole params tree of the model a state trains: with LoRA, its frozen base joined to its trained
    part (or to `trained`, e.g. that part as the run started)."""
    if "frozen" not in state:
        return state["params"]
    return join(state["frozen"], state["params"] if trained is None else trained)


def check_lora_base(init_from: str) -> None:
    """Raise ConfigError for a LoRA run without a base to train its adapters on."""
    if not init_from:
        raise ConfigError("model.lora_rank trains adapters on a frozen base model: set init_from (an HF or "
                          "qwen-jax model directory, or a checkpoint step)")


def load_lora_base(init_from: str, init_adapter: str, abstract_state: dict, model_config: ModelConfig) -> dict:
    """A LoRA run's base from init_from, read on every (re)start: every leaf but the adapters, placed as the
    (abstract) state's; with the PEFT adapter init_adapter's lora_a / lora_b leaves, where one is given."""
    check_lora_base(init_from)
    base = load_init_params(init_from, split_adapters(model_params(abstract_state))[0], model_config.param_dtype)
    return join(base, adapter_params(init_adapter, model_config)) if init_adapter else base


def lora_start(model_config: ModelConfig, base: dict, abstract_trained: dict, sharding) -> dict:
    """A LoRA run's trained part as it starts, placed as `sharding`: the adapters `base` holds (init_adapter's)
    or zero ones (the init's B is zero, its A is not), and the lora_also_train modules as in `base`; joined to
    the frozen base, the model the run starts from (DPO's and RL's reference)."""
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), split_adapters(abstract_trained)[1])
    return jax.device_put(join(zeros, split_trained(base, model_config.lora_also_train)[1]), sharding)


def with_frozen(state: dict, model_config: ModelConfig, base: dict, sharding) -> dict:
    """A restored LoRA state (checkpoints hold no frozen base) with `base`'s frozen part, placed as `sharding`."""
    return {**state, "frozen": jax.device_put(split_trained(base, model_config.lora_also_train)[0], sharding)}


def checkpointed(state: dict) -> dict:
    """What a checkpoint holds of a train state: all of it but a LoRA run's frozen base, which every (re)start
    reads again from init_from."""
    return {key: value for key, value in state.items() if key != "frozen"}


def new_state(params, optimizer, seed: int) -> dict:
    """params, opt_state, step, RNG and the non-finite-step counters."""
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
        "skipped_steps": jnp.zeros((), jnp.int32),
        "bad_streak": jnp.zeros((), jnp.int32),
    }


def abstract_params(model_config: ModelConfig):
    model = nnx.eval_shape(lambda: Qwen35ForCausalLM(model_config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def run_state_shardings(model_config: ModelConfig, params, optimizer, mesh: Mesh, rules) -> dict:
    """state_shardings_for the whole model's (abstract) params; with LoRA, for its trained part, and the frozen
    base's as "frozen". Raises ConfigError for a run that would train int8 kernels."""
    if model_config.weight_quant and not model_config.lora_rank:
        raise ConfigError(f"model.weight_quant={model_config.weight_quant!r} stores the projections' kernels "
                          "quantised and frozen: train adapters on them (model.lora_rank > 0), or quantise only to "
                          "generate")
    if not model_config.lora_rank:
        return state_shardings_for(params, optimizer, mesh, rules)
    check_also_train(params, model_config.lora_also_train)
    frozen, trained = split_trained(params, model_config.lora_also_train)
    if quantized := [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_flatten_with_path(trained)[0]
                     if leaf.dtype == jnp.int8]:
        raise ConfigError(f"model.lora_also_train {list(model_config.lora_also_train)} would train int8 kernels "
                          f"(model.weight_quant), e.g. {quantized[0]}: name modules without them")
    return {**state_shardings_for(trained, optimizer, mesh, rules), "frozen": param_shardings(frozen, mesh, rules)}


def state_shardings_for(params, optimizer, mesh: Mesh, rules):
    """Shardings of the whole train state: optimizer moments follow their params."""
    param_sh = param_shardings(params, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shapes = jax.eval_shape(optimizer.init, params)
    opt_sh = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, opt_shapes, param_sh,
        transform_non_params=lambda _: replicated)
    return {"params": param_sh, "opt_state": opt_sh, "step": replicated, "rng": replicated,
            "skipped_steps": replicated, "bad_streak": replicated}


def model_inputs(batch: dict) -> dict:
    """The model's keyword inputs for a batch: segment ids, and with images (and videos) the packed
    3-D positions and the per-row pixels (each row embeds its own, on the device holding the row)."""
    inputs = {"segment_ids": batch["segment_ids"]}
    if "pixel_values" in batch:
        inputs.update(positions=jnp.moveaxis(batch["positions"], 1, 0),
                      pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    if "pixel_values_videos" in batch:
        inputs.update(pixel_values_videos=batch["pixel_values_videos"],
                      video_grid_thw=batch["video_grid_thw"])
    return inputs


def loss_fn(params, graphdef, batch: dict, cfg: TrainConfig, token_count: jax.Array):
    """Masked mean CE (+ z-loss, + MoE aux) of one micro-batch, normalised by the global token count."""
    model = nnx.merge(graphdef, params)
    out = model(batch["input_ids"], **model_inputs(batch))
    token_loss, ce_sum, _ = chunked_cross_entropy(
        out.hidden, model.head_weight(), batch["targets"], batch["loss_mask"],
        chunk_size=cfg.ce_chunk, z_loss_weight=cfg.z_loss, compute_dtype=out.hidden.dtype)
    aux = out.aux_loss / cfg.grad_accum
    aux_weight = model.config.router_aux_loss_coef if cfg.moe_aux_loss is None else cfg.moe_aux_loss
    loss = token_loss / token_count + aux_weight * aux
    load = jnp.zeros((0,)) if out.expert_load is None else out.expert_load
    return loss, {"ce": ce_sum / token_count, "aux": aux, "expert_load": load}


def learned_tokens(batch: dict) -> jax.Array:
    """What loss_fn normalises by: the batch's learned tokens (at least 1)."""
    return jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)


def train_step(state: dict, batch: dict, *, graphdef, optimizer, cfg: TrainConfig, mesh, rules, loss=loss_fn,
               count=learned_tokens):
    """One optimizer step over the global batch (grad accumulation over cfg.grad_accum micro-batches).

    loss(params, graphdef, micro_batch, cfg, normaliser) -> (loss, parts with "ce", "aux", "expert_load" and
    any further metrics); count(batch) -> the normaliser (default: the cross-entropy's, per learned token).
    With a frozen base in the state (LoRA), only state["params"], the trained part, is differentiated."""
    normaliser = jnp.maximum(count(batch), 1.0)
    frozen = state.get("frozen")
    if frozen is not None:
        model_loss = loss
        loss = lambda trained, *args: model_loss(join(frozen, trained), *args)  # noqa: E731
    micro = jax.tree.map(lambda x: x.reshape(cfg.grad_accum, -1, *x.shape[1:]), batch)
    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def accumulate(carry, micro_batch):
        (value, parts), grads = grad_fn(state["params"], graphdef, micro_batch, cfg, normaliser)
        total = jax.tree.map(jnp.add, carry, (value, parts, grads))
        return total, None

    shapes = jax.eval_shape(lambda params, micro_batch: grad_fn(params, graphdef, micro_batch, cfg, normaliser),
                            state["params"], jax.tree.map(lambda x: x[0], micro))
    init = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (shapes[0][0], shapes[0][1], shapes[1]))
    with activation_sharding(mesh, rules):
        (total_loss, parts, grads), _ = jax.lax.scan(accumulate, init, micro)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(total_loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # A non-finite loss or gradient never reaches the parameters: keep the old state, count it.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    # The schedule advances only on applied updates, like the optimizer's own count.
    lr = learning_rate_schedule(cfg)(state["step"] - state["skipped_steps"])
    new = {
        "params": keep(params, state["params"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "step": state["step"] + 1,
        "rng": jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 1)),
        "skipped_steps": state["skipped_steps"] + (~finite),
        "bad_streak": jnp.where(finite, 0, state["bad_streak"] + 1),
    }
    if frozen is not None:
        new["frozen"] = frozen
    metrics = {"learning/loss": parts["ce"], "learning/total_loss": total_loss,
               "learning/grad_norm": grad_norm, "learning/lr": lr,
               "learning/moe_lb_loss": parts["aux"], "learning/skipped_steps": new["skipped_steps"],
               "learning/bad_streak": new["bad_streak"], "data/tokens": jnp.sum(batch["loss_mask"]),
               **{key: value for key, value in parts.items() if "/" in key}}  # e.g. the DPO's dpo/*
    if parts["expert_load"].size:
        metrics["moe/expert_load"] = parts["expert_load"]  # [L, E] tokens routed per expert
    return new, metrics


def batch_sharding(mesh: Mesh, rules, train_config: TrainConfig, axes=("batch", "length")) -> NamedSharding:
    """The sharding of a batch array with these logical axes (only batch and length are split)."""
    sizes = {"batch": train_config.batch_size, "length": train_config.seq_len, None: 1}
    return NamedSharding(mesh, spec_for(axes, [sizes[axis] for axis in axes], mesh, rules))


def host_layout_for(mesh: Mesh, rules, train_config: TrainConfig) -> HostBatchLayout:
    """The row block and tokens of each batch this host loads (before any trainer exists)."""
    return host_batch_layout(batch_sharding(mesh, hashable_rules(rules), train_config),
                             train_config.batch_size, train_config.seq_len)


def make_trainer(model_config: ModelConfig, train_config: TrainConfig, mesh: Mesh, rules, *,
                 images: bool = False, videos: bool = False, dpo: bool = False) -> Trainer:
    """Build the optimizer, shardings and the jitted step for this model on this mesh; with
    `images` (and `videos`), batches are the image-text pipeline's (IMAGE_BATCH_AXES,
    VIDEO_BATCH_AXES); with `dpo`, pairs of rows trained by train/preference.py's loss."""
    from qwen_jax.train import preference  # it imports this module

    if images and model_config.vision is None:
        raise ConfigError("image-text batches need a model with a vision tower (model.vision)")
    rules = hashable_rules(rules)
    graphdef, params = abstract_params(model_config)
    optimizer = make_optimizer(train_config)
    model_shardings = param_shardings(params, mesh, rules)
    shardings = run_state_shardings(model_config, params, optimizer, mesh, rules)
    batch_axes = VIDEO_BATCH_AXES if videos else IMAGE_BATCH_AXES if images else TEXT_BATCH_AXES
    if dpo:
        batch_axes = {**batch_axes, "ref_logprobs": ("batch", "length")}
    loss, count = (preference.dpo_loss_fn, preference.pair_count) if dpo else (loss_fn, learned_tokens)
    batch_shardings = {key: batch_sharding(mesh, rules, train_config, axes)
                       for key, axes in batch_axes.items()}
    replicated = NamedSharding(mesh, PartitionSpec())

    def step(state, batch):
        return train_step(state, batch, graphdef=graphdef, optimizer=optimizer, cfg=train_config,
                          mesh=mesh, rules=rules, loss=loss, count=count)

    def evaluate(params, batch):
        normaliser = jnp.maximum(count(batch), 1.0)
        with activation_sharding(mesh, rules):
            _, parts = loss(params, graphdef, batch, dataclasses.replace(train_config, grad_accum=1), normaliser)
        sums = {"eval/loss": parts["ce"] * normaliser}
        if dpo:
            sums["eval/accuracy"] = parts["dpo/accuracy"] * normaliser
        return sums, normaliser

    def reference(params, batch):
        with activation_sharding(mesh, rules):
            return preference.reference_logprobs(params, graphdef, batch, train_config.ce_chunk)

    step_fn = jax.jit(step, in_shardings=(shardings, batch_shardings),
                      out_shardings=(shardings, replicated), donate_argnums=0)
    eval_fn = jax.jit(evaluate, in_shardings=(model_shardings, batch_shardings), out_shardings=replicated)
    reference_fn = None
    if dpo:
        scored = {key: value for key, value in batch_shardings.items() if key != "ref_logprobs"}
        reference_fn = jax.jit(reference, in_shardings=(model_shardings, scored),
                               out_shardings=batch_shardings["ref_logprobs"])
    return Trainer(model_config, train_config, mesh, rules, graphdef, optimizer, shardings,
                   batch_shardings, batch_axes, host_layout_for(mesh, rules, train_config), step_fn,
                   eval_fn, reference_fn)
