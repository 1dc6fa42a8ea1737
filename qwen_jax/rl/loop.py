"""`qwen-jax rl`: init_from and/or warm-up -> (rollout -> rewards -> advantages -> updates) x steps,
resumable.

A run starts from `init_from` (an HF directory, a `qwen-jax convert` directory or a checkpoint step;
its tokenizer too, where it has one) or from fresh params; rl.warmup_steps supervised steps on the
task's demonstrations come first (0: none).

Every step plays `groups` prompts `group_size` times each in the EnvPool, turns the episode rewards
into advantages per group, scores the episodes with the current policy (the ratio's denominator),
and takes `minibatches` optimizer steps over them; the sampler then uses the new weights. The
prompt order, the sampling seeds and the minibatch order are functions of the step, so a resumed
run repeats exactly what an uninterrupted one does. For MoE models the scoring and update forwards
replay the sampler's routing (rl.routing_replay; learner.py says why).

The policy runs on the mesh of config.mesh, sampler and learner alike, as `qwen-jax train` does;
across hosts each host runs its share of the environments (hosts.py) and the warm-up runs on every
host's first device alike.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from qwen_jax.config import ConfigError, TrainConfig
from qwen_jax.data.chat import chat_formats, load_chat_template
from qwen_jax.data.tokenizer import load_or_train_tokenizer, pad_id, stop_ids
from qwen_jax.experiment import local_workdir, model_config
from qwen_jax.interop.init_from import (check_init_adapter, keep_chat_files, load_start_params, tokenizer_dir,
                                        tokenizer_file)
from qwen_jax.model.lora import split_adapters
from qwen_jax.rl.advantages import compute_advantages
from qwen_jax.parallel.mesh import make_mesh
from qwen_jax.parallel.rules import hashable_rules
from qwen_jax.rl.envs import make_env
from qwen_jax.rl.hosts import shared_pool
from qwen_jax.rl.learner import Learner, make_learner
from qwen_jax.rl.losses import PolicyLossConfig
from qwen_jax.rl.rollout import Episodes, play_episodes
from qwen_jax.rl.warmup import demonstrations, supervised_warmup
from qwen_jax.train.checkpoint import Checkpointer, abstract_like
from qwen_jax.train.distributed import maybe_initialize_distributed
from qwen_jax.train.loop import rules_from_config
from qwen_jax.train.optimizer import make_optimizer
from qwen_jax.train.reporting import RunLogger
from qwen_jax.train.step import (abstract_params, check_lora_base, checkpointed, load_lora_base, lora_start,
                                 model_params, run_state_shardings, start_state, with_frozen)

EVAL_SEED_BASE = 10**9  # held-out prompts: seeds no training step reaches


CHAT_REPLY_ROLES = ("user", "tool")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """config.rl: the task, the rollout shape, the algorithm and the warm-up."""

    env: str = "arithmetic"
    env_kwargs: dict = dataclasses.field(default_factory=dict)
    pool_mode: str = "thread"
    env_timeout_s: float = 10.0
    steps: int = 60
    groups: int = 16  # prompts per step
    group_size: int = 8  # samples per prompt
    max_new_tokens: int = 8
    max_turns: int = 1
    max_length: int = 48  # cache and episode length, all turns
    temperature: float = 1.0
    # How a text observation becomes the policy's input: the first one (the task) and each later one
    # (an environment's reply, after the policy's stop token), "{observation}" standing for the text.
    # A chat model wants its chat markup: written here, or taken from
    prompt_format: str = "{observation}"
    reply_format: str = "{observation}"
    # a chat template, rendered as transformers renders it: "init_from" (the one beside init_from's
    # tokenizer) or a .jinja file or HF directory; chat_template_kwargs go to it, e.g.
    # {"enable_thinking": False}. Environment replies are turns of chat_reply_role: "user", or "tool"
    # where they are a tool's results.
    chat_template: str = ""
    chat_template_kwargs: dict = dataclasses.field(default_factory=dict)
    chat_reply_role: str = "user"
    # Thinking models: the environment sees each reply without its reasoning (after </think>).
    hide_thinking: bool = False
    advantage: str = "grpo"
    policy_loss: str = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_estimator: str = "k3"
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    aggregation: str = "token-mean"
    minibatches: int = 2  # optimizer steps per rollout batch
    routing_replay: bool = True  # MoE: the learner uses the sampler's experts (dense: no effect)
    lr: float = 1e-4
    warmup_steps: int = 100  # supervised steps on demonstrations before RL (0: none)
    warmup_batch_size: int = 32
    warmup_lr: float = 3e-3
    eval_every: int = 20
    eval_prompts: int = 128

    def __post_init__(self):
        for name in ("steps", "groups", "group_size", "max_new_tokens", "max_turns", "max_length",
                     "minibatches", "warmup_batch_size", "eval_every", "eval_prompts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"rl.{name} must be a positive integer, got {value!r}")
        if (self.groups * self.group_size) % self.minibatches:
            raise ConfigError(f"rl.groups x rl.group_size ({self.groups * self.group_size}) must "
                              f"be a multiple of rl.minibatches ({self.minibatches})")
        for name in ("routing_replay", "hide_thinking"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"rl.{name} must be True or False, got {getattr(self, name)!r}")
        if self.temperature <= 0:
            raise ConfigError(f"rl.temperature must be > 0 (sampling), got {self.temperature}")
        if self.chat_template and (self.prompt_format, self.reply_format) != ("{observation}",) * 2:
            raise ConfigError("set rl.chat_template or rl.prompt_format / rl.reply_format, not both")
        if self.chat_reply_role not in CHAT_REPLY_ROLES:
            raise ConfigError(f"rl.chat_reply_role is {self.chat_reply_role!r}; choose one of {CHAT_REPLY_ROLES}")
        for name in ("prompt_format", "reply_format"):
            form = getattr(self, name)
            try:
                filled = form.format(observation="\0")
            except (AttributeError, IndexError, KeyError, ValueError) as error:
                raise ConfigError(f"rl.{name} {form!r} is not a format of {{observation}} alone: "
                                  f"{error!r}") from None
            if "\0" not in filled:
                raise ConfigError(f"rl.{name} {form!r} has no {{observation}}")

    @property
    def loss(self) -> PolicyLossConfig:
        return PolicyLossConfig(self.policy_loss, self.clip_low, self.clip_high, self.kl_estimator,
                                self.kl_coef, self.entropy_coef, self.aggregation)


def rl_config(config: ml_collections.ConfigDict) -> RLConfig:
    """config.rl as a validated RLConfig; an unknown field is named."""
    known = {field.name for field in dataclasses.fields(RLConfig)}
    fields = config.rl.to_dict()
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"config.rl has unknown field(s) {unknown}; known: {sorted(known)}")
    rl = RLConfig(**fields)
    rl.loss  # validates the loss names and clip ranges now, before anything is built
    return rl


def with_chat_formats(rl: RLConfig, init_from: str, tokenizer, tools: list[dict] = ()) -> RLConfig:
    """rl with the prompt and reply formats of rl.chat_template, where it names one; the template
    lists `tools` (the environment's tool schemas) unless chat_template_kwargs gives its own."""
    if not rl.chat_template:
        return rl
    if rl.chat_template == "init_from" and not init_from:
        raise ConfigError("rl.chat_template='init_from' takes the template of init_from, which is not set")
    where = tokenizer_dir(init_from) if rl.chat_template == "init_from" else Path(rl.chat_template)
    template, special_tokens = load_chat_template(where, f"rl.chat_template={rl.chat_template!r}")
    stop_text = tokenizer.id_to_token(stop_ids(tokenizer)[0])
    kwargs = {"tools": list(tools), **rl.chat_template_kwargs} if tools else rl.chat_template_kwargs
    prompt, reply = chat_formats(template, stop_text, special_tokens, rl.chat_reply_role, **kwargs)
    return dataclasses.replace(rl, chat_template="", prompt_format=prompt, reply_format=reply)


def step_seeds(rl: RLConfig, step: int) -> list[int]:
    """The environment seed of every slot at `step`: each group's prompt group_size times."""
    return [step * rl.groups + group for group in range(rl.groups) for _ in range(rl.group_size)]


def rollout_step(state, learner: Learner, reference, tokenizer, pool, rl: RLConfig, step: int,
                 seed: int):
    """One RL step; -> (new state, metrics row)."""
    stop, padding = stop_ids(tokenizer), pad_id(tokenizer)
    started = time.perf_counter()
    policy = nnx.merge(learner.graphdef, model_params(state))
    episodes = play_episodes(policy, tokenizer, pool, step_seeds(rl, step),
                             max_new_tokens=rl.max_new_tokens, max_turns=rl.max_turns,
                             max_length=rl.max_length, temperature=rl.temperature,
                             sample_seed=seed * 100003 + step, stop_ids=stop, pad_id=padding,
                             formats=(rl.prompt_format, rl.reply_format), hide_thinking=rl.hide_thinking,
                             mesh=learner.mesh, rules=learner.rules)
    rollout_s = time.perf_counter() - started - episodes.env_seconds

    started = time.perf_counter()
    rewards = episodes.rewards.reshape(rl.groups, rl.group_size)
    advantages = np.asarray(compute_advantages(
        rl.advantage, jnp.asarray(rewards), valid=jnp.asarray(~episodes.failed.reshape(rewards.shape))))
    reward_s = time.perf_counter() - started + episodes.env_seconds

    started = time.perf_counter()
    routing = episodes.routing if rl.routing_replay else None
    batch = _update_batch(episodes, advantages.reshape(-1), routing, learner, model_params(state), reference)
    mask = episodes.loss_mask
    mismatch = float(np.sum(np.abs(batch["old_logprobs"] - episodes.sampler_logprobs) * mask)
                     / max(mask.sum(), 1.0))
    order = np.random.default_rng([seed, step]).permutation(len(mask))
    sums = {}
    for part in np.split(order, rl.minibatches):
        state, metrics = learner.update(state, {k: learner.place(v[part]) for k, v in batch.items()})
        for key, value in jax.device_get(metrics).items():
            sums[key] = sums.get(key, 0.0) + float(value) / rl.minibatches
    update_s = time.perf_counter() - started

    row = {"rewards/mean": float(rewards.mean()), "rewards/std": float(rewards.std()),
           **{k: v for k, v in sums.items() if k.startswith("actor/")},
           "actor/logprob_mismatch": mismatch,
           "response_length/mean": float(mask.sum(axis=1).mean()),
           **pool.metrics(), "timing_s/rollout": rollout_s, "timing_s/reward": reward_s,
           "timing_s/update": update_s}
    return state, row


def _update_batch(episodes: Episodes, advantages, routing, learner: Learner, params,
                  reference) -> dict:
    """The learner's arrays: episodes, advantages, the behaviour policy's (and reference's) scores,
    and the routing [N, L, S, k] to replay (None: route freely)."""
    tokens, segments = learner.place(episodes.tokens), learner.place(episodes.segment_ids)
    placed_routing = None if routing is None else learner.place(routing)
    batch = {"tokens": episodes.tokens, "segment_ids": episodes.segment_ids,
             "loss_mask": episodes.loss_mask, "advantages": advantages.astype(np.float32),
             "old_logprobs": np.asarray(learner.score(params, tokens, segments, placed_routing))}
    if routing is not None:
        batch["routing"] = routing
    if reference is not None:  # kl_coef > 0 only: otherwise the reference forward is skipped
        # The reference routes freely: the KL is to its own distribution, not the sampler's experts.
        batch["ref_logprobs"] = np.asarray(learner.score(reference, tokens, segments))
    return batch


def greedy_accuracy(params, learner: Learner, tokenizer, rl: RLConfig) -> float:
    """Mean reward of greedy answers to held-out prompts (one episode each)."""
    with shared_pool(rl.env, rl.eval_prompts, timeout_s=rl.env_timeout_s,
                     env_kwargs=rl.env_kwargs) as pool:
        episodes = play_episodes(
            nnx.merge(learner.graphdef, params), tokenizer, pool,
            [EVAL_SEED_BASE + i for i in range(rl.eval_prompts)], max_new_tokens=rl.max_new_tokens,
            max_turns=rl.max_turns, max_length=rl.max_length, temperature=0.0, sample_seed=0,
            stop_ids=stop_ids(tokenizer), pad_id=pad_id(tokenizer),
            formats=(rl.prompt_format, rl.reply_format), hide_thinking=rl.hide_thinking,
            mesh=learner.mesh, rules=learner.rules)
    return float(episodes.rewards.mean())


def run_rl(config: ml_collections.ConfigDict, workdir: str | Path) -> list[dict]:
    """RL per `config` in `workdir`, resuming from its latest checkpoint; returns the logged rows."""
    maybe_initialize_distributed()
    workdir = local_workdir(workdir)
    rl = rl_config(config)
    model_cfg = model_config(config)
    lora = model_cfg.lora_rank > 0
    init_from, init_adapter = config.init_from, config.get("init_adapter", "")
    check_init_adapter(init_from, init_adapter)
    if lora:
        check_lora_base(init_from)
    if lora and rl.warmup_steps:
        raise ConfigError("rl.warmup_steps trains the whole model; with model.lora_rank, fine-tune it with "
                          "`qwen-jax train` first and give that checkpoint as init_from")
    workdir.mkdir(parents=True, exist_ok=True)
    env = make_env(rl.env, **rl.env_kwargs)
    tokenizer = load_or_train_tokenizer(
        workdir / "tokenizer.json", lambda: [text for text, _ in demonstrations(env, range(4000))],
        model_cfg.vocab_size, source=tokenizer_file(config.init_from))
    keep_chat_files(config.init_from, workdir)
    rl = with_chat_formats(rl, config.init_from, tokenizer, getattr(env, "tools", ()))
    graphdef, model_shapes = abstract_params(model_cfg)
    shapes = split_adapters(model_shapes)[0]  # what init_from and the warm-up give (LoRA's adapters start fresh)
    optimizer = make_optimizer(TrainConfig(lr=rl.lr, warmup_steps=0, schedule="constant",
                                           steps=rl.steps * rl.minibatches, weight_decay=0.0))
    mesh, rules = make_mesh(dict(config.mesh)), hashable_rules(rules_from_config(config))
    shardings = run_state_shardings(model_cfg, model_shapes, optimizer, mesh, rules)
    if rl.kl_coef and not lora:
        shardings["reference"] = shardings["params"]
    learner = make_learner(graphdef, optimizer, rl.loss, rl.temperature, mesh, rules, shardings)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep)

    def fresh_state(params):
        state = start_state(model_cfg, optimizer, config.seed, params)
        # The frozen reference rides in the state (and checkpoints) only when the KL term is on. A LoRA run's
        # is its base, which the state holds already (reference_part, below).
        return {**state, "reference": params} if rl.kl_coef and not lora else state

    abstract = abstract_like(jax.eval_shape(fresh_state, shapes), shardings)
    # A LoRA run reads its base from init_from on every (re)start; its reference is that base joined to the
    # trained part as it starts.
    base = reference_part = None
    if lora:
        base = load_lora_base(init_from, init_adapter, abstract, model_cfg)
        if rl.kl_coef:
            reference_part = lora_start(model_cfg, base, abstract["params"], shardings["params"])
    restored = checkpointer.restore_latest(checkpointed(abstract))
    if restored is not None:
        start, state, _, _ = restored
        if lora:
            state = with_frozen(state, model_cfg, base, shardings["frozen"])
        print(f"resumed from step {start}", flush=True)
    else:
        start = 0
        params = base
        if config.init_from and params is None:
            # Placed as the state's where RL starts from them; unplaced where the warm-up (on this
            # host's first device) trains them first.
            target = shapes if rl.warmup_steps else abstract_like(shapes, shardings["params"])
            params = load_start_params(init_from, init_adapter, target, model_cfg)
        if params is None or rl.warmup_steps:
            params = supervised_warmup(model_cfg, env, tokenizer, rl, seed=config.seed, params=params)
        # Placed as a restored state is, so a resumed run runs the very programs an uninterrupted
        # one compiled (and finds them in a compilation cache).
        state = jax.jit(fresh_state, out_shardings=shardings)(params)
    del base  # the state holds it now
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps(
            {"config": config.to_dict(), "model": dataclasses.asdict(model_cfg),
             "rl": dataclasses.asdict(rl)}, indent=2, default=list))

    logger = RunLogger(workdir, config, resume_step=start if restored else None,
                       total_steps=rl.steps, curve=("rewards/mean", "reward.png"))
    with shared_pool(rl.env, rl.groups * rl.group_size, mode=rl.pool_mode,
                     timeout_s=rl.env_timeout_s, env_kwargs=rl.env_kwargs) as pool:
        for step in range(start, rl.steps):
            before = (greedy_accuracy(model_params(state), learner, tokenizer, rl) if step == 0
                      else None)
            started = time.perf_counter()
            reference = state.get("reference") if reference_part is None else model_params(state, reference_part)
            state, row = rollout_step(state, learner, reference, tokenizer, pool, rl, step, config.seed)
            done = step + 1
            row = {"step": done, **row, "perf/step_time_s": time.perf_counter() - started}
            if before is not None:  # the warmed-up policy, before any RL update
                row["eval/accuracy_before_rl"] = before
            if done % rl.eval_every == 0 or done == rl.steps:
                row["eval/accuracy"] = greedy_accuracy(model_params(state), learner, tokenizer, rl)
            logger.log(row)
            if done % config.checkpoint.every_steps == 0 or done == rl.steps:
                checkpointer.save(done, checkpointed(state), {"next_step": done}, {"step": done})
    checkpointer.wait()
    checkpointer.close()
    return logger.close()
