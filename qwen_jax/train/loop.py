"""`qwen-jax train`: config -> data -> mesh and state (fresh, resumed or init_from) -> steps -> checkpoints."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from qwen_jax.config import ConfigError
from qwen_jax.experiment import local_workdir, model_config, train_config
from qwen_jax.interop.init_from import check_init_adapter, keep_chat_files, load_start_params
from qwen_jax.parallel.mesh import make_mesh
from qwen_jax.parallel.rules import DEFAULT_RULES
from qwen_jax.train.checkpoint import Checkpointer, abstract_like, data_states, own_data_state
from qwen_jax.train.datasets import build_run_data
from qwen_jax.train.distributed import maybe_initialize_distributed
from qwen_jax.train.reporting import WANDB_MODES, RunLogger
from qwen_jax.train.metrics import peak_flops, train_flops_per_token
from qwen_jax.train.profiling import StepProfiler
from qwen_jax.train.step import (Trainer, checkpointed, host_layout_for, load_lora_base, lora_start, make_trainer,
                                 model_params, with_frozen)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many consecutive non-finite steps)."""


def rules_from_config(config: ml_collections.ConfigDict):
    return tuple(tuple(rule) for rule in config.get("logical_axis_rules", DEFAULT_RULES))


def check_run_fields(config: ml_collections.ConfigDict) -> None:
    """The loop's own fields (checkpoint.*, wandb.mode, init_adapter), checked before anything is built."""
    check_init_adapter(config.get("init_from", ""), config.get("init_adapter", ""))
    for name in ("every_steps", "keep"):
        value = config.checkpoint[name]
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"checkpoint.{name} must be a positive integer, got {value!r}")
    if config.wandb.mode not in WANDB_MODES:
        raise ConfigError(f"wandb.mode is {config.wandb.mode!r}; choose one of {WANDB_MODES}")


def run_training(config: ml_collections.ConfigDict, workdir: str | Path) -> list[dict]:
    """Train per `config` in `workdir`, resuming from its latest complete checkpoint; returns the logged rows."""
    maybe_initialize_distributed()
    workdir = local_workdir(workdir)
    check_run_fields(config)
    model_cfg, train_cfg = model_config(config), train_config(config)
    mesh = make_mesh(dict(config.mesh))
    workdir.mkdir(parents=True, exist_ok=True)
    # Hosts sharing rows (context across hosts) read the same row block and keep their own tokens.
    layout = host_layout_for(mesh, rules_from_config(config), train_cfg)
    data = build_run_data(config, workdir, model_cfg, train_cfg, process_index=layout.row_block,
                          process_count=layout.row_blocks)
    model_cfg = data.model_config  # with the tokenizer's vision token ids
    keep_chat_files(config.get("init_from"), workdir)
    trainer = make_trainer(model_cfg, train_cfg, mesh, rules_from_config(config),
                           images=data.images, videos=data.videos, dpo=data.pairs)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep)

    abstract_state = abstract_like(jax.eval_shape(lambda: trainer.init_state(config.seed)), trainer.state_shardings)
    # Read again from init_from on every (re)start: LoRA's base (every leaf but the adapters) and DPO's
    # reference, the model the run starts from. With LoRA, that reference is the frozen base joined to the
    # trained part as it starts (reference_part).
    init_from, init_adapter = config.init_from, config.get("init_adapter", "")
    base = reference = reference_part = None
    if trainer.lora:
        base = load_lora_base(init_from, init_adapter, abstract_state, model_cfg)
        if data.pairs:
            reference_part = lora_start(model_cfg, base, abstract_state["params"], trainer.state_shardings["params"])
    elif data.pairs:  # build_run_data made sure init_from is set
        reference = jax.device_put(load_start_params(init_from, init_adapter, abstract_state["params"], model_cfg),
                                   trainer.state_shardings["params"])
    restored = checkpointer.restore_latest(checkpointed(abstract_state))
    if restored is not None:
        start, state, data_state, _ = restored
        if base is not None:
            state = with_frozen(state, model_cfg, base, trainer.state_shardings["frozen"])
        print(f"resumed from step {start}", flush=True)
        data.iterator.set_state(own_data_state(data_state))
    else:
        start = 0
        # A copy: the step donates the state's buffers, and the reference must outlive them.
        params = base if reference is None else jax.tree.map(jnp.array, reference)
        if init_from and params is None:
            params = load_start_params(init_from, init_adapter, abstract_state["params"], model_cfg)
        state = trainer.init_state(config.seed, params)
    del base  # the state holds it now
    iterator, eval_batches = data.iterator, data.eval_batches

    if jax.process_index() == 0:
        resolved = {"config": config.to_dict(), "model": dataclasses.asdict(model_cfg),
                    "train": dataclasses.asdict(train_cfg)}
        (workdir / "config.json").write_text(json.dumps(resolved, indent=2, default=list))
    logger = RunLogger(workdir, config, resume_step=start if restored else None,
                       total_steps=train_cfg.steps)
    flops_per_token = train_flops_per_token(model_cfg, train_cfg.seq_len)
    peak = peak_flops()
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
    # Each process traces its own steps; several processes write to directories of their own.
    profile_dir = workdir / "profile" / (f"process_{jax.process_index()}" if jax.process_count() > 1 else "")
    # The step's executable is cached by now: lowering and compiling again only looks it up.
    profiler = StepProfiler(profile_dir, train_cfg.profile_start, train_cfg.profile_steps,
                            lambda: trainer.step_fn.lower(state, batch).compile().as_text())
    if missed := profiler.missed(start + 1, train_cfg.steps):
        logger.note(missed)
    if trainer.lora:
        sizes = {part: sum(x.size for x in jax.tree.leaves(state[part])) for part in ("params", "frozen")}
        trained = ", ".join(("adapters",) + model_cfg.lora_also_train)
        logger.note(f"LoRA rank {model_cfg.lora_rank}: training {sizes['params']:,} parameters ({trained}), "
                    f"{sizes['frozen']:,} frozen")

    def reference_now(state):  # a LoRA reference's frozen part is the current state's (the step donates it)
        return reference if reference_part is None else model_params(state, reference_part)

    for step in range(start, train_cfg.steps):
        done = step + 1
        profiler.before_step(done)
        started = time.perf_counter()
        batch = trainer.with_reference(trainer.global_batch(next(iterator)), reference_now(state))
        state, metrics = trainer.step_fn(state, batch)
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - started
        if profiler.after_step(done, elapsed):
            logger.note(f"profiled steps {train_cfg.profile_start}..{done}: {profile_dir / 'summary.md'}")
        expert_load = metrics.pop("moe/expert_load", [])
        row = {"step": done, **{k: float(v) for k, v in metrics.items() if k != "learning/bad_streak"},
               **{f"moe/expert_load/{layer}": [int(n) for n in load]
                  for layer, load in enumerate(expert_load)},
               "perf/step_time_s": elapsed, "perf/tokens_per_sec": tokens_per_step / elapsed,
               "perf/mfu": flops_per_token * tokens_per_step / elapsed / peak,
               **{f"data/skipped/{reason}": n for reason, n in data.skipped_now().items()}}
        if done % train_cfg.eval_every == 0 or done == train_cfg.steps:
            row.update(evaluate(trainer, model_params(state), eval_batches, reference_now(state)))
        logger.log(row, log=done % train_cfg.log_every == 0 or done == train_cfg.steps)
        if int(metrics["learning/bad_streak"]) >= train_cfg.max_bad_steps:
            checkpointer.wait()
            logger.close()
            data.close()
            raise TrainingError(
                f"stopping at step {done}: {int(metrics['learning/bad_streak'])} consecutive steps had a "
                f"non-finite loss or gradient (train.max_bad_steps={train_cfg.max_bad_steps}); the "
                "parameters were never updated with them")
        if done % config.checkpoint.every_steps == 0 or done == train_cfg.steps:
            checkpointer.save(done, checkpointed(state), data_states(iterator.get_state()),
                              {"step": done, "tokens": done * tokens_per_step})
    profiler.stop()  # the run ended inside the window
    checkpointer.wait()
    checkpointer.close()
    data.close()
    return logger.close()


def evaluate(trainer: Trainer, params, batches: list[dict], reference=None) -> dict[str, float]:
    """Held-out means over fixed batches: eval/loss (cross-entropy in nats/token; DPO: its loss per pair,
    with eval/accuracy, the pairs whose chosen completion the policy prefers more than the reference does)."""
    totals, count = {}, 0.0
    for batch in batches:
        sums, weight = jax.device_get(trainer.eval_fn(params, trainer.with_reference(trainer.global_batch(batch),
                                                                                       reference)))
        totals = {key: totals.get(key, 0.0) + float(value) for key, value in sums.items()}
        count += float(weight)
    return {key: total / max(count, 1.0) for key, total in totals.items()}
