"""The hybrid layer stack: decoder layers scanned in groups of the layer-type pattern, then the LM head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from qwen_jax.config import FULL_ATTENTION, LINEAR_ATTENTION, ModelConfig
from qwen_jax.model.attention import GatedAttention, segment_causal_mask
from qwen_jax.generate.cache import Cache, init_cache, scanned_view, write_back
from qwen_jax.model.gated_deltanet import GatedDeltaNet
from qwen_jax.model.mlp import SwiGLU
from qwen_jax.model.moe import SparseMoE, load_balancing_loss
from qwen_jax.model.norms import RMSNorm
from qwen_jax.model.positions import rope_index
from qwen_jax.model.rope import rope_cos_sin
from qwen_jax.model.vision import VisionModel
from qwen_jax.model.vlm import check_vision_arguments, embed_vision
from qwen_jax.parallel.context import context_shards
from qwen_jax.parallel.rules import active_mesh, constrain

ACTIVATION_AXES = ("batch", "length", "act_embed")

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@struct.dataclass
class ModelOutput:
    """logits [B, T, V]; hidden [B, T, H] (final-norm output); aux_loss scalar (HF's load-balancing
    loss, unscaled; 0 for dense). MoE only: routing int32 [L, B, T, k] (chosen experts per layer, to
    replay), expert_load [L, E] (unpadded tokens routed to each expert)."""

    logits: jax.Array
    hidden: jax.Array
    aux_loss: jax.Array
    routing: jax.Array | None = None
    expert_load: jax.Array | None = None
    cache: object | None = None


def layer_groups(layer_types: tuple[str, ...]) -> tuple[tuple[str, ...], int, tuple[str, ...]]:
    """Split layer types into (pattern, repeats, tail): pattern * repeats + tail == layer_types.

    The pattern runs up to and including the first full-attention layer ([GDN, GDN, GDN, Attn]
    for every published size), so a 6-layer stack is one scanned group plus a 2-layer tail.
    """
    period = layer_types.index(FULL_ATTENTION) + 1 if FULL_ATTENTION in layer_types else 1
    pattern = layer_types[:period]
    repeats = 0
    while layer_types[repeats * period : (repeats + 1) * period] == pattern:
        repeats += 1
    return pattern, repeats, layer_types[repeats * period :]


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """segment_ids [B, T] -> positions [B, T] counting from 0 at the start of every segment."""
    index = jnp.arange(segment_ids.shape[1])
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


class DecoderLayer(nnx.Module):
    """Pre-norm residual layer: mixer (GDN or gated attention) then SwiGLU or sparse MoE."""

    def __init__(self, cfg: ModelConfig, layer_type: str, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        if layer_type == LINEAR_ATTENTION:
            self.linear_attn = GatedDeltaNet(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.self_attn = GatedAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.is_moe:
            self.mlp = SparseMoE(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype,
                              init_std=cfg.initializer_range, rngs=rngs, lora_for=cfg.lora_for,
                              quant=cfg.weight_quant)

    def __call__(self, h: jax.Array, ctx: dict, replay: jax.Array | None,
                 cache: dict | None) -> tuple[jax.Array, dict, dict | None]:
        """h [B, T, H] -> ([B, T, H], MoE stats or {}, updated cache); ctx holds cos/sin, masks,
        segment ids, the cache column and its valid columns; replay [B, T, k] forces this layer's experts (MoE only)."""
        x = self.input_layernorm(h)
        if self.layer_type == LINEAR_ATTENTION:
            x, cache = self.linear_attn(x, ctx["segment_ids"], cache)
        else:
            x, cache = self.self_attn(x, ctx["cos"], ctx["sin"], ctx["mask"], cache, ctx["cache_index"],
                                      ctx["segment_ids"], ctx["valid"])
        h = h + x
        x = self.post_attention_layernorm(h)
        if isinstance(self.mlp, SparseMoE):
            x, stats = self.mlp(x, ctx["token_mask"], replay)
            return h + x, stats, cache
        return h + self.mlp(x), {}, cache


class LayerGroup(nnx.Module):
    """One repetition of the layer-type pattern; groups are stacked and scanned."""

    def __init__(self, cfg: ModelConfig, pattern: tuple[str, ...], *, rngs: nnx.Rngs):
        self.layers = nnx.List([DecoderLayer(cfg, t, rngs=rngs) for t in pattern])

    def __call__(self, h: jax.Array, ctx: dict, replay: jax.Array | None,
                 caches: tuple | None) -> tuple[jax.Array, dict, tuple | None]:
        """replay [len(layers), B, T, k] or None; caches one per layer or None. MoE stats come back
        stacked over the layers."""
        all_stats, new_caches = [], []
        for i, layer in enumerate(self.layers):
            h, stats, cache = layer(h, ctx, None if replay is None else replay[i],
                                    None if caches is None else caches[i])
            all_stats.append(stats)
            new_caches.append(cache)
        caches = None if caches is None else tuple(new_caches)
        if not self.layers or not all_stats[0]:
            return h, {}, caches
        return h, jax.tree.map(lambda *xs: jnp.stack(xs), *all_stats), caches


class Qwen35ForCausalLM(nnx.Module):
    """The Qwen3.5 text model with its LM head (HF `Qwen3_5ForCausalLM`); with `config.vision`, also
    the vision tower whose outputs fill the image/video tokens (HF `Qwen3_5ForConditionalGeneration`)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        std = config.initializer_range
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(std), rngs=rngs)
        pattern, repeats, tail = layer_groups(config.layer_types)
        self.group_pattern, self.num_groups = pattern, repeats

        @nnx.split_rngs(splits=repeats)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_groups(rngs):
            return LayerGroup(config, pattern, rngs=rngs)

        self.groups = make_groups(rngs)
        self.tail = LayerGroup(config, tail, rngs=rngs)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(
                config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                param_dtype=param_dtype, kernel_init=nnx.initializers.normal(std), rngs=rngs)
        self.visual = None if config.vision is None else VisionModel(
            config.vision, dtype=dtype, param_dtype=param_dtype,
            remat_policy=REMAT_POLICIES.get(config.remat), rngs=rngs)

    def layer(self, index: int) -> tuple[DecoderLayer, int | None]:
        """Layer `index` of the stack and its slot in the stacked group params (None in the tail)."""
        period = len(self.group_pattern)
        if index < self.num_groups * period:
            return self.groups.layers[index % period], index // period
        return self.tail.layers[index - self.num_groups * period], None

    def _embed(self, input_ids: jax.Array) -> jax.Array:
        """[B, T] ids -> [B, T, H] rows of the embedding, in the compute dtype.

        The table is gathered whole along the model width first (as FSDP does for any weight it uses): a
        lookup into a table split over both vocab and width hands back rows split over the width, which
        XLA can only bring to the batch layout by replicating them ("involuntary full rematerialization").
        """
        table = self.embed_tokens.embedding[...].astype(self.config.dtype)
        return jnp.take(constrain(table, ("vocab", None)), input_ids, axis=0)

    def head_weight(self) -> jax.Array:
        """[H, V] output projection (the embedding, transposed, when tied)."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., H] -> logits [..., V] in the compute dtype."""
        dtype = jnp.dtype(self.config.dtype)
        return jnp.dot(hidden.astype(dtype), self.head_weight().astype(dtype))

    def init_cache(self, batch: int, max_length: int) -> Cache:
        """An empty decode cache for `batch` rows of up to `max_length` tokens."""
        pattern, _, tail = layer_groups(self.config.layer_types)
        return init_cache(self.config, pattern, self.num_groups, tail, batch, max_length)

    def __call__(self, input_ids: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, pixel_values: jax.Array | None = None,
                 image_grid_thw: jax.Array | None = None, pixel_values_videos: jax.Array | None = None,
                 video_grid_thw: jax.Array | None = None, routing: jax.Array | None = None,
                 cache: Cache | None = None) -> ModelOutput:
        """input_ids int32 [B, T] -> ModelOutput (logits [B, T, V], hidden [B, T, H]).

        pixel_values [num_patches, C * t * p * p] with image_grid_thw int [num_images, 3] (and the
        same for videos): the vision tower's outputs replace the image (video) tokens in order, and
        positions=None gives HF's 3-D (t, h, w) positions. A grid without pixels still sets positions.
        Per-row pixel_values [B, P, D] with image_grid_thw [B, I, 3] (the packed pipeline's batch,
        zero grids after the real ones) embed each row's images into that row; positions required.
        routing int32 [L, B, T, k] (an earlier `out.routing`) replays those experts in every MoE layer.
        cache (from `init_cache`, or an earlier `out.cache`) continues its rows with these T tokens
        and comes back updated in `out.cache`; segment ids may then only mark left padding (0).
        """
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        if segment_ids is not None and segment_ids.shape != input_ids.shape:
            raise ValueError(
                f"segment_ids shape {segment_ids.shape} must equal input_ids shape {input_ids.shape}")
        if routing is not None:
            expected = (cfg.num_hidden_layers, *input_ids.shape, cfg.num_experts_per_tok)
            if not cfg.is_moe or routing.shape != expected:
                raise ValueError(f"routing shape {routing.shape} must be [layers, batch, length, top_k] "
                                 f"= {expected if cfg.is_moe else 'None: this model has no experts'}")
        check_vision_arguments(cfg, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                               positions)
        token_mask = jnp.ones(input_ids.shape, bool) if segment_ids is None else segment_ids > 0
        vision_positions = positions is None and (image_grid_thw is not None or video_grid_thw is not None)
        if vision_positions:
            positions = rope_index(input_ids, image_grid_thw, cfg, video_grid_thw=video_grid_thw,
                                   segment_ids=segment_ids)
            if cache is not None:
                positions = positions + cache.positions[None, :, None]
        if cache is not None:
            if positions is None:  # each row counts on from its own real tokens
                before = jnp.cumsum(token_mask, axis=1) - token_mask
                positions = cache.positions[:, None] + before.astype(jnp.int32)
            valid = jax.lax.dynamic_update_slice(cache.valid, token_mask, (0, cache.index))
            mask = None  # attention masks each block of the cache it reads from `valid`
        else:
            valid = None
            if positions is None:
                positions = (jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
                             if segment_ids is None else segment_positions(segment_ids))
            # None: plain causal rows, which attention runs without materialising a [T, T] mask; and
            # with the sequence split over context, each shard builds its own rows from the segment ids.
            split = context_shards(active_mesh()) > 1
            mask = None if segment_ids is None or split else segment_causal_mask(segment_ids)
        cos, sin = rope_cos_sin(positions, rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta,
                                mrope_section=cfg.mrope_section, dtype=jnp.dtype(cfg.dtype),
                                scaling=cfg.rope_scaling)
        ctx = {"cos": cos, "sin": sin, "mask": mask, "valid": valid, "segment_ids": segment_ids,
               "token_mask": token_mask, "cache_index": None if cache is None else cache.index}
        period = len(self.group_pattern)
        grouped = self.num_groups * period
        group_replay = tail_replay = None
        if routing is not None:
            group_replay = routing[:grouped].reshape(self.num_groups, period, *routing.shape[1:])
            tail_replay = routing[grouped:]

        h = self._embed(input_ids)
        if pixel_values is not None or pixel_values_videos is not None:
            h = embed_vision(self.visual, cfg, h, input_ids, pixel_values, image_grid_thw,
                             pixel_values_videos, video_grid_thw)
        h = constrain(h, ACTIVATION_AXES)
        h, group_stats, group_caches = self._run_groups(
            h, ctx, group_replay, None if cache is None else cache.groups)
        h, tail_stats, tail_caches = self.tail(h, ctx, tail_replay, None if cache is None else cache.tail)
        hidden = self.norm(h)
        out = ModelOutput(logits=self.logits(hidden), hidden=hidden,
                          aux_loss=jnp.zeros((), jnp.float32))
        if cache is not None:
            next_positions = cache.positions + jnp.sum(token_mask, axis=1, dtype=jnp.int32)
            if vision_positions:  # text after the images goes on from the largest position + 1
                last = jnp.max(jnp.where(token_mask, jnp.max(positions, axis=0), -1), axis=1)
                next_positions = jnp.maximum(cache.positions, last + 1)
            out = out.replace(cache=Cache(
                groups=group_caches, tail=tail_caches, valid=valid, positions=next_positions,
                index=cache.index + input_ids.shape[1]))
        if not cfg.is_moe:
            return out
        # Scanned groups give [G, P, ...], the tail [tail, ...]: together [L, ...] in layer order.
        parts = [jax.tree.map(lambda x: x.reshape(grouped, *x.shape[2:]), group_stats), tail_stats]
        stats = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[p for p in parts if p])
        aux = load_balancing_loss(stats["counts"], stats["prob_sum"], jnp.sum(token_mask))
        return out.replace(aux_loss=aux, routing=stats["routing"], expert_load=stats["counts"])

    def _run_groups(self, h: jax.Array, ctx: dict, replay: jax.Array | None,
                    caches: tuple | None) -> tuple[jax.Array, dict, tuple | None]:
        """Scan the stacked groups so compile time does not grow with depth; MoE stats and caches
        stack [G, P, ...] / [G, ...].

        The caches ride in the scan's carry and are updated in place (see `scanned_view`): as scanned inputs
        and outputs they would come back in a new buffer, which a decode loop then copies whole into its
        own every step (XLA:CPU and v5p HLO: two copies of every GDN state per token).
        """
        if self.num_groups == 0:
            return h, {}, caches
        graphdef, state = nnx.split(self.groups)

        def body(carry, xs):
            h, caches = carry
            group_state, group_replay, index = xs
            views = None if caches is None else tuple(scanned_view(c, index) for c in caches)
            h, stats, views = nnx.merge(graphdef, group_state)(h, ctx, group_replay, views)
            if caches is not None:
                caches = tuple(write_back(c, view, index) for c, view in zip(caches, views))
            return (constrain(h, ACTIVATION_AXES), caches), stats

        if self.config.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.config.remat])
        (h, caches), stats = jax.lax.scan(body, (h, caches), (state, replay, jnp.arange(self.num_groups)))
        return h, stats, caches
