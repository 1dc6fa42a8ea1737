"""Typed, frozen model configs and the presets registry.

Field names follow Hugging Face's `Qwen3_5TextConfig` so that a config.json maps over one to one.
Every check that can fail names the field, so a bad value is caught before anything compiles.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"
LAYER_TYPES = (LINEAR_ATTENTION, FULL_ATTENTION)
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
GDN_SCANS = ("sequential", "associative")
ARCHITECTURES = ("qwen3_5", "qwen3_next")  # the HF family save_hf writes (weights layout, RoPE)
MOE_DISPATCHES = ("ragged", "padded")
ROPE_TYPES = ("yarn",)  # RoPE scalings besides plain RoPE (HF rope_type "default")
# "auto": cuDNN flash attention on GPU, JAX's splash kernels on TPU (where they tile), XLA's attention elsewhere.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
# DPO's loss of a pair's log-ratio margin h (train.dpo_loss): "sigmoid" DPO's -log sigmoid(beta h) (with
# train.dpo_label_smoothing, cDPO's), "ipo" IPO's (h - 1 / (2 beta))^2 on per-token mean log-probs (as TRL
# does), "hinge" SLiC's max(0, 1 - beta h).
DPO_LOSSES = ("sigmoid", "ipo", "hinge")
# "auto": the Pallas kernel on GPU, the pure-JAX chunked op elsewhere (TPU, CPU).
GDN_IMPLS = ("auto", "jax", "pallas")
# The decoder's projections (module names, as HF and PEFT call them) that LoRA can adapt; the default
# targets leave out in_proj_b / in_proj_a, whose outputs are one number per value head.
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
                "out_proj", "gate_proj", "up_proj", "down_proj")
LORA_DEFAULT_TARGETS = tuple(name for name in LORA_MODULES if name not in ("in_proj_b", "in_proj_a"))
# Weight-only quantisation of those projections' kernels (model.weight_quant; "" none): frozen, so a train or RL
# run needs LoRA to train on them.
WEIGHT_QUANTS = ("", "int8")
# HF's names: tanh-approximated GELU (every published tower) and exact GELU.
VISION_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def default_layer_types(num_layers: int, full_attention_interval: int = 4) -> tuple[str, ...]:
    """HF's rule: layer i is full attention iff (i + 1) % interval == 0."""
    return tuple(
        FULL_ATTENTION if (i + 1) % full_attention_interval == 0 else LINEAR_ATTENTION
        for i in range(num_layers)
    )


def _check_positive(section: str, config, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{section}.{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The Qwen3.5 vision tower (HF `Qwen3_5VisionConfig`). The defaults are HF's: the 9B-and-up
    tower, except out_hidden_size, which no published size has (VISION_PRESETS set it)."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584  # the text model's hidden size
    num_position_embeddings: int = 2304  # a learned square grid (48 x 48)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch row of pixel_values: channels x temporal_patch_size x patch_size^2."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def position_grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    def validate(self) -> None:
        """Raise ConfigError naming the first field that cannot work."""
        _check_positive("model.vision", self, (
            "depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
            "temporal_patch_size", "spatial_merge_size", "out_hidden_size", "num_position_embeddings"))
        # The 2-D rotary gives each of the two axes a quarter of the head's channels.
        if self.hidden_size % self.num_heads or self.head_dim % 4:
            raise ConfigError(
                f"model.vision.hidden_size ({self.hidden_size}) / model.vision.num_heads "
                f"({self.num_heads}) must be a whole head dim divisible by 4")
        if self.position_grid_side**2 != self.num_position_embeddings:
            raise ConfigError(
                f"model.vision.num_position_embeddings ({self.num_position_embeddings}) must be a "
                "square number (a side x side grid)")
        if self.hidden_act not in VISION_ACTIVATIONS:
            raise ConfigError(
                f"model.vision.hidden_act is {self.hidden_act!r}; choose one of {VISION_ACTIVATIONS}")
        if not self.rope_theta > 0:
            raise ConfigError(f"model.vision.rope_theta must be > 0, got {self.rope_theta}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension (HF `rope_parameters` with rope_type "yarn"): each RoPE frequency is
    blended between its original value and value / factor by how many turns it makes within
    original_max_position_embeddings, and cos/sin are scaled by the attention factor."""

    factor: float = 4.0
    original_max_position_embeddings: int = 262144
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # None: from factor (and mscale / mscale_all_dim), as HF
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    rope_type: str = "yarn"

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"model.rope_scaling.rope_type is {self.rope_type!r}; choose one of {ROPE_TYPES}")
        _check_positive("model.rope_scaling", self, ("original_max_position_embeddings",))
        for name in ("factor", "beta_fast", "beta_slow"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.rope_scaling.{name} must be > 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The Qwen3.5 model (dense or MoE; Qwen3-Next too): dimensions, layers, RoPE, runtime dtypes, and
    the vision tower of the vision-language models."""

    vocab_size: int = 248320
    hidden_size: int = 1024
    intermediate_size: int = 3584
    num_hidden_layers: int = 24
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 256
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 16
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    layer_types: tuple[str, ...] | None = None  # None = HF's default rule (every 4th is full)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e7
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, ...] = (11, 11, 10)
    rope_scaling: RopeScaling | None = None  # None: plain RoPE
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 262144
    initializer_range: float = 0.02
    eos_token_id: int | tuple[int, ...] | None = 248044
    pad_token_id: int | None = None
    # Sparse MoE: every layer's MLP is a routed-experts block when num_experts > 0.
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True  # Qwen3-Next's flag; Qwen3.5-MoE always renormalises
    router_aux_loss_coef: float = 0.001
    architecture: str = "qwen3_5"
    # Vision-language models (HF keeps these on the composite config): None = text only.
    vision: VisionConfig | None = None
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054
    # Runtime choices (not part of an HF config).
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # master-weight dtype
    remat: str = "none"
    gdn_chunk_size: int = 64
    gdn_scan: str = "sequential"
    gdn_impl: str = "auto"
    attention_impl: str = "auto"
    splash_block: int = 512  # query and key block of the TPU splash kernels (a multiple of 128)
    # "ragged": sort + jax.lax.ragged_dot (simple; the oracle). "padded": per-expert buffers of
    # moe_capacity_factor x the even share, one batched matmul, and a ragged pass for any overflow.
    moe_dispatch: str = "padded"
    moe_capacity_factor: float = 1.25
    # LoRA (0: none): every projection named in lora_targets gains x A B * lora_alpha / lora_rank, A [in, r],
    # B [r, out]; `qwen-jax train` and `qwen-jax rl` then train only A and B (and the modules named in
    # lora_also_train, whole, e.g. "embed_tokens"), on the frozen init_from weights.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_DEFAULT_TARGETS
    lora_also_train: tuple[str, ...] = ()
    # "int8": the LORA_MODULES projections' kernels stored int8 with a float32 scale per output channel (half a
    # bfloat16 base's bytes; QLoRA's layout with int8 for NF4), quantised from init_from's when a run loads them.
    weight_quant: str = ""

    def __post_init__(self):
        for name in ("lora_targets", "lora_also_train"):  # a command line gives "q_proj,v_proj"
            names = getattr(self, name)
            object.__setattr__(self, name, tuple(n for n in names.split(",") if n) if isinstance(names, str)
                               else tuple(names))
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", default_layer_types(self.num_hidden_layers))
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            object.__setattr__(self, "rope_scaling", RopeScaling(**dict(self.rope_scaling)))
        if self.vision is not None and not isinstance(self.vision, VisionConfig):
            # A dict from a saved config.json, or a ConfigDict from a config file.
            object.__setattr__(self, "vision", VisionConfig(**dict(self.vision)))
        self.validate()

    def lora_for(self, module: str) -> tuple[int, float] | None:
        """(rank, scale = alpha / rank) of the LoRA update on projection `module`, or None."""
        if self.lora_rank and module in self.lora_targets:
            return self.lora_rank, self.lora_alpha / self.lora_rank
        return None

    @property
    def rotary_dim(self) -> int:
        """Rotated channels per attention head (the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the GDN causal conv: q, k and v together."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes` applied (and validated).

        Changing the depth of a config that follows HF's default layer pattern keeps the pattern.
        """
        if ("num_hidden_layers" in changes and "layer_types" not in changes
                and self.layer_types == default_layer_types(self.num_hidden_layers)):
            changes["layer_types"] = None
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raise ConfigError naming the first field that cannot work."""
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "linear_num_key_heads",
            "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
            "linear_conv_kernel_dim", "gdn_chunk_size",
        )
        _check_positive("model", self, positive)
        if not isinstance(self.splash_block, int) or self.splash_block <= 0 or self.splash_block % 128:
            raise ConfigError(f"model.splash_block must be a positive multiple of 128 (TPU lane tiles), "
                              f"got {self.splash_block!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"model.num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(
                f"model.linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                f"model.linear_num_key_heads ({self.linear_num_key_heads})"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"model.layer_types has {len(self.layer_types)} entries but "
                f"model.num_hidden_layers is {self.num_hidden_layers}"
            )
        for i, layer_type in enumerate(self.layer_types):
            if layer_type not in LAYER_TYPES:
                raise ConfigError(
                    f"model.layer_types[{i}] is {layer_type!r}; known layer types: {LAYER_TYPES}"
                )
        rotary = self.rotary_dim
        if not 0 < self.partial_rotary_factor <= 1 or rotary % 2:
            raise ConfigError(
                f"model.partial_rotary_factor ({self.partial_rotary_factor}) x model.head_dim "
                f"({self.head_dim}) must give an even rotary dim in (0, head_dim], got {rotary}"
            )
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != rotary // 2:
            raise ConfigError(
                f"model.mrope_section {self.mrope_section} must have 3 entries (t, h, w) summing to "
                f"rotary_dim / 2 = {rotary // 2}"
            )
        if self.is_moe:
            self._validate_moe()
        for name, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("remat", REMAT_POLICIES),
                              ("gdn_scan", GDN_SCANS), ("architecture", ARCHITECTURES),
                              ("moe_dispatch", MOE_DISPATCHES), ("gdn_impl", GDN_IMPLS),
                              ("attention_impl", ATTENTION_IMPLS), ("weight_quant", WEIGHT_QUANTS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name} is {getattr(self, name)!r}; choose one of {allowed}")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"model.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.vision is not None:
            self._validate_vision()
        self._validate_lora()

    def _validate_lora(self) -> None:
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 0:
            raise ConfigError(f"model.lora_rank must be an integer >= 0 (0: no LoRA), got {self.lora_rank!r}")
        if not self.lora_rank:
            return
        if not self.lora_alpha > 0:
            raise ConfigError(f"model.lora_alpha must be > 0, got {self.lora_alpha!r}")
        unknown = [name for name in self.lora_targets if name not in LORA_MODULES]
        if unknown or not self.lora_targets:
            raise ConfigError(f"model.lora_targets {list(self.lora_targets)}: each must be one of {LORA_MODULES}")

    def _validate_vision(self) -> None:
        if self.architecture != "qwen3_5":
            raise ConfigError(f"model.vision needs model.architecture 'qwen3_5', got {self.architecture!r}")
        if self.vision.out_hidden_size != self.hidden_size:
            raise ConfigError(
                f"model.vision.out_hidden_size ({self.vision.out_hidden_size}) must equal "
                f"model.hidden_size ({self.hidden_size}): vision tokens replace token embeddings")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"model.{name} ({value!r}) must be a token id below model.vocab_size "
                                  f"({self.vocab_size})")

    def _validate_moe(self) -> None:
        _check_positive("model", self, (
            "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"))
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"model.num_experts_per_tok ({self.num_experts_per_tok}) must be <= model.num_experts "
                f"({self.num_experts})")
        if not self.moe_capacity_factor > 0:
            raise ConfigError(f"model.moe_capacity_factor must be > 0, got {self.moe_capacity_factor}")
        if self.router_aux_loss_coef < 0:
            raise ConfigError(f"model.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")


def _qwen35(hidden, layers, heads, kv_heads, mlp, value_heads, tied) -> ModelConfig:
    return ModelConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=mlp, linear_num_value_heads=value_heads,
        tie_word_embeddings=tied,
    )


def _qwen35_moe(hidden, layers, heads, value_heads, experts, top_k, expert_mlp) -> ModelConfig:
    return ModelConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=2, linear_num_value_heads=value_heads, tie_word_embeddings=False,
        num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=expert_mlp,
        shared_expert_intermediate_size=expert_mlp,
    )


TINY = ModelConfig(
    vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
    mrope_section=(2, 1, 1), tie_word_embeddings=True, max_position_embeddings=4096,
    eos_token_id=None,
    # The ids a tokenizer trained here gives the vision tokens (after <|endoftext|> and <|pad|>).
    vision_start_token_id=2, vision_end_token_id=3, image_token_id=4, video_token_id=5,
)

PRESETS: dict[str, ModelConfig] = {
    "qwen3.5-0.8b": _qwen35(1024, 24, 8, 2, 3584, 16, tied=True),
    "qwen3.5-2b": _qwen35(2048, 24, 8, 2, 6144, 16, tied=True),
    "qwen3.5-4b": _qwen35(2560, 32, 16, 4, 9216, 32, tied=True),
    "qwen3.5-9b": _qwen35(4096, 32, 16, 4, 12288, 32, tied=False),
    "qwen3.5-27b": _qwen35(5120, 64, 24, 4, 17408, 48, tied=False),
    # Small enough to train on a laptop CPU, with every structural feature of the real ones:
    # GVA (Hv = 2 Hk), dk != dv, partial mRoPE, GQA, a full-attention layer every fourth.
    "tiny": TINY,
    # Spec 6.2 (every layer MoE, one shared expert of the routed experts' width).
    "qwen3.5-35b-a3b": _qwen35_moe(2048, 40, 16, 32, experts=256, top_k=8, expert_mlp=512),
    "qwen3.5-122b-a10b": _qwen35_moe(3072, 48, 32, 64, experts=256, top_k=8, expert_mlp=1024),
    "qwen3.5-397b-a17b": _qwen35_moe(4096, 60, 32, 64, experts=512, top_k=10, expert_mlp=1024),
    # The tiny model with 8 experts, top-2, and a shared expert.
    "tiny-moe": TINY.replace(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96,
                             shared_expert_intermediate_size=96),
}


def _vision(depth, hidden, mlp, heads, out) -> VisionConfig:
    return VisionConfig(depth=depth, hidden_size=hidden, intermediate_size=mlp, num_heads=heads,
                        out_hidden_size=out)


# The tower each published checkpoint ships (spec section 6; model.visual.* in its safetensors).
# The presets above stay text only: `preset(name, vision=VISION_PRESETS[name])` is the full model.
VISION_PRESETS: dict[str, VisionConfig] = {
    "qwen3.5-0.8b": _vision(12, 768, 3072, 12, 1024),
    "qwen3.5-2b": _vision(24, 1024, 4096, 16, 2048),
    "qwen3.5-4b": _vision(24, 1024, 4096, 16, 2560),
    "qwen3.5-9b": _vision(27, 1152, 4304, 16, 4096),
    "qwen3.5-27b": _vision(27, 1152, 4304, 16, 5120),
    "qwen3.5-35b-a3b": _vision(27, 1152, 4304, 16, 2048),
    "qwen3.5-122b-a10b": _vision(27, 1152, 4304, 16, 3072),
    "qwen3.5-397b-a17b": _vision(27, 1152, 4304, 16, 4096),
    # For the tiny text model: two blocks, an 8 x 8 learned position grid.
    "tiny": VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                         out_hidden_size=TINY.hidden_size, num_position_embeddings=64),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, with `overrides` applied; unknown names list the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset {name!r} is unknown; presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and loop settings (config.train)."""

    steps: int = 300
    batch_size: int = 8  # global, in sequences
    seq_len: int = 256
    lr: float = 3e-3
    warmup_steps: int = 30
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    z_loss: float = 0.0
    dpo_beta: float = 0.1  # data.kind "preference": DPO's beta, how far the policy may move from the reference
    dpo_loss: str = "sigmoid"  # a DPO_LOSSES name
    dpo_label_smoothing: float = 0.0  # "sigmoid": the assumed share of pairs whose labels are flipped (cDPO)
    moe_aux_loss: float | None = None  # None: the model's router_aux_loss_coef (HF's 0.001)
    ce_chunk: int = 2048
    opt_state_dtype: str = "float32"  # AdamW's moments between steps ("bfloat16": half their bytes)
    max_bad_steps: int = 10  # stop after this many consecutive non-finite steps
    log_every: int = 1
    eval_every: int = 100
    eval_batches: int = 4
    profile_steps: int = 0  # trace this many steps into WORKDIR/profile (qwen_jax.train.profiling); 0: none
    profile_start: int = 3  # the first traced step (metrics' numbers, from 1): past compilation and warm-up

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "ce_chunk", "max_bad_steps",
                     "log_every", "eval_every", "eval_batches", "profile_start"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"train.{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "profile_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"train.{name} must be an integer >= 0, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule is {self.schedule!r}; choose one of {SCHEDULES}")
        if self.opt_state_dtype not in DTYPES:
            raise ConfigError(f"train.opt_state_dtype is {self.opt_state_dtype!r}; choose one of {DTYPES}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.batch_size ({self.batch_size}) must be a multiple of train.grad_accum "
                f"({self.grad_accum})")
        for name in ("weight_decay", "grad_clip", "z_loss", "moe_aux_loss"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not self.dpo_beta > 0:
            raise ConfigError(f"train.dpo_beta must be > 0, got {self.dpo_beta}")
        if self.dpo_loss not in DPO_LOSSES:
            raise ConfigError(f"train.dpo_loss is {self.dpo_loss!r}; choose one of {DPO_LOSSES}")
        if not 0 <= self.dpo_label_smoothing < 0.5 or (self.dpo_label_smoothing and self.dpo_loss != "sigmoid"):
            raise ConfigError(f"train.dpo_label_smoothing must be in [0, 0.5), and 0 unless train.dpo_loss is "
                              f"'sigmoid'; got {self.dpo_label_smoothing} with {self.dpo_loss!r}")
        if not 0 <= self.b1 < 1 or not 0 <= self.b2 < 1:
            raise ConfigError(f"train.b1 and train.b2 must be in [0, 1), got {self.b1}, {self.b2}")
