"""Gated DeltaNet linear-attention layer (the `linear_attn` of three layers in four)."""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from qwen_jax.config import ConfigError, ModelConfig
from qwen_jax.model.layers import dense
from qwen_jax.model.norms import GatedRMSNorm
from qwen_jax.ops.delta_rule import chunk_terms, gated_delta_rule, normalized_qk, rule_from_terms
from qwen_jax.ops.pallas.decode_step import pallas_delta_rule_step
from qwen_jax.ops.pallas.gated_delta_rule import (check_kernel_shapes, default_block_v, kernel_platform,
                                                  pallas_chunk_terms, pallas_rule_from_terms)
from qwen_jax.parallel.context import AXIS, context_shards, delta_rule_across_shards, previous_shard_tail
from qwen_jax.parallel.rules import active_mesh, active_rules, spec_for, target_platform


def causal_depthwise_conv(x: jax.Array, weight: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """x [B, T, C], weight [K, C] -> [B, T, C]; tap K-1 is the current token, no tap crosses a segment."""
    taps, length = weight.shape[0], x.shape[1]
    x_padded = jnp.pad(x.astype(weight.dtype), ((0, 0), (taps - 1, 0), (0, 0)))
    if segment_ids is not None:
        seg_padded = jnp.pad(segment_ids, ((0, 0), (taps - 1, 0)), constant_values=-1)
    out = jnp.zeros(x.shape, weight.dtype)
    for tap in range(taps):
        window = x_padded[:, tap : tap + length]
        if segment_ids is not None:
            window = jnp.where((seg_padded[:, tap : tap + length] == segment_ids)[..., None], window, 0)
        out = out + window * weight[tap]
    return out.astype(x.dtype)


def gdn_method(cfg: ModelConfig) -> str:
    """The gated delta rule's implementation for multi-token calls: cfg.gdn_impl with "auto" resolved
    ("pallas" on GPU also takes the decode-step kernel for one-token cached calls).

    "auto" takes the Pallas kernels on GPU when their tiling fits the head dims, else the pure-JAX chunked op
    ("pallas" on TPU runs the Mosaic kernels; they have no TPU timings yet, so "auto" leaves TPUs on XLA).
    """
    if cfg.gdn_impl == "jax":
        return "chunked"
    platform = kernel_platform()
    try:
        check_kernel_shapes(cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.gdn_chunk_size,
                            default_block_v(cfg.linear_value_head_dim, platform), platform)
    except ValueError as e:
        if cfg.gdn_impl == "pallas":
            raise ConfigError(f"model.gdn_impl is 'pallas', but {e}") from e
        return "chunked"
    return "pallas" if cfg.gdn_impl == "pallas" or jax.default_backend() == "gpu" else "chunked"


def _log_uniform_a(key, shape, dtype):
    """A_log = log(U(0.01, 16)): HF's Qwen3.5 init (the lower bound keeps log finite)."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 0.01, 16.0)).astype(dtype)


class GatedDeltaNet(nnx.Module):
    """Causal conv + SiLU, l2-normalised q/k, gated delta rule, gated output norm."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, init_std=cfg.initializer_range, rngs=rngs,
                  quant=cfg.weight_quant)
        self.num_k_heads, self.num_v_heads = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.k_head_dim, self.v_head_dim = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.chunk_size, self.scan = cfg.gdn_chunk_size, cfg.gdn_scan
        self.method = gdn_method(cfg)
        self.in_proj_qkv = dense(cfg.hidden_size, cfg.conv_dim, **kw, lora=cfg.lora_for("in_proj_qkv"))
        self.in_proj_z = dense(cfg.hidden_size, cfg.linear_value_dim, **kw, lora=cfg.lora_for("in_proj_z"))
        self.in_proj_b = dense(cfg.hidden_size, self.num_v_heads, **kw, lora=cfg.lora_for("in_proj_b"))
        self.in_proj_a = dense(cfg.hidden_size, self.num_v_heads, **kw, lora=cfg.lora_for("in_proj_a"))
        taps = cfg.linear_conv_kernel_dim
        # PyTorch's Conv1d default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = taps (depthwise).
        bound = 1.0 / math.sqrt(taps)
        self.conv_weight = nnx.Param(
            jax.random.uniform(rngs.params(), (taps, cfg.conv_dim), param_dtype, -bound, bound))
        self.dt_bias = nnx.Param(jnp.ones((self.num_v_heads,), param_dtype))
        self.A_log = nnx.Param(_log_uniform_a(rngs.params(), (self.num_v_heads,), param_dtype))
        self.norm = GatedRMSNorm(self.v_head_dim, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.out_proj = dense(cfg.linear_value_dim, cfg.hidden_size, **kw, lora=cfg.lora_for("out_proj"))

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None,
                 cache: dict | None = None) -> tuple[jax.Array, dict | None]:
        """x [B, T, H] (already normalised), segment_ids [B, T] or None -> ([B, T, H], cache).

        cache {"conv": [B, K-1, C] last pre-conv inputs, "state": [B, Hv, dk, dv] fp32} continues
        the sequence; segment id 0 then marks right padding, which leaves the cache unchanged.
        """
        batch, length, _ = x.shape
        pre_conv = self.in_proj_qkv(x)
        z = self.in_proj_z(x).reshape(batch, length, self.num_v_heads, self.v_head_dim)
        # beta in the activation dtype (as HF), the log-decay g entirely in float32.
        beta = jax.nn.sigmoid(self.in_proj_b(x)).astype(jnp.float32)
        a = self.in_proj_a(x).astype(jnp.float32)
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
            a + self.dt_bias[...].astype(jnp.float32))
        mesh = active_mesh()
        if cache is not None:
            out, cache = self._continue(pre_conv, g, beta, segment_ids, cache)
        elif context_shards(mesh) > 1:
            out = self._across_context(pre_conv, g, beta, segment_ids, mesh)
        else:
            conv = causal_depthwise_conv(pre_conv, self.conv_weight[...], segment_ids)
            out, _ = self._rule(*self._heads(conv), g, beta, segment_ids, None, self.method, mesh)
        out = self.norm(out.astype(x.dtype), z)
        return self.out_proj(out.reshape(batch, length, self.num_v_heads * self.v_head_dim)), cache

    def _heads(self, conv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Conv output [B, T, C] -> SiLU'd q, k [B, T, Hv, dk] (key heads repeated per value head), v [B, T, Hv, dv]."""
        batch, length, _ = conv.shape
        key_dim = self.num_k_heads * self.k_head_dim
        mixed = jax.nn.silu(conv)
        q = mixed[..., :key_dim].reshape(batch, length, self.num_k_heads, self.k_head_dim)
        k = mixed[..., key_dim : 2 * key_dim].reshape(batch, length, self.num_k_heads, self.k_head_dim)
        v = mixed[..., 2 * key_dim :].reshape(batch, length, self.num_v_heads, self.v_head_dim)
        # Grouped value heads: value head j reads key head j // r (repeat-interleave, not tile).
        group = self.num_v_heads // self.num_k_heads
        return jnp.repeat(q, group, axis=2), jnp.repeat(k, group, axis=2), v

    def _rule(self, q, k, v, g, beta, segment_ids, initial_state, method, mesh):
        """The gated delta rule over this layer's heads -> (o [B, T, Hv, dv], state [B, Hv, dk, dv]).

        On a mesh, the Pallas kernels run inside shard_map over the rows and heads: XLA cannot partition a
        kernel call, and every row and head is independent.
        """
        rule = functools.partial(gated_delta_rule, method=method, chunk_size=self.chunk_size, scan=self.scan,
                                 normalize_qk=True, scale=self.k_head_dim**-0.5)
        if method != "pallas" or mesh is None or mesh.size == 1:
            return rule(q, k, v, g, beta, segment_ids=segment_ids, initial_state=initial_state)
        batch, _, heads, _ = v.shape
        rows, heads_axes = spec_for(("batch", "heads"), (batch, heads), mesh, active_rules())
        per_head, per_step = PartitionSpec(rows, None, heads_axes, None), PartitionSpec(rows, None, heads_axes)
        states = PartitionSpec(rows, heads_axes, None, None)

        def local(q, k, v, g, beta, segment_ids, initial_state):
            return rule(q, k, v, g, beta, segment_ids=segment_ids, initial_state=initial_state)

        # check_vma off: the Pallas kernels' output shapes carry no varying-axes type.
        return jax.shard_map(local, mesh=mesh, check_vma=False,
                             in_specs=(per_head, per_head, per_head, per_step, per_step, PartitionSpec(rows, None),
                                       states), out_specs=(per_head, states))(
            q, k, v, g, beta, segment_ids, initial_state)

    def _continue(self, pre_conv, g, beta, segment_ids, cache):
        """A cached call: the conv window and the state carry on; segment id 0 (right padding) leaves both."""
        batch, length, _ = pre_conv.shape
        taps = self.conv_weight.shape[0]
        keep = jnp.ones((batch, length), bool) if segment_ids is None else segment_ids > 0
        pre_conv = jnp.where(keep[..., None], pre_conv, 0)
        window = jnp.concatenate([cache["conv"].astype(pre_conv.dtype), pre_conv], axis=1)
        conv = causal_depthwise_conv(window, self.conv_weight[...], None)[:, taps - 1 :]
        # Real tokens come first in the chunk: the new window ends at the last real one.
        last = jnp.sum(keep, axis=1)[:, None] + jnp.arange(taps - 1)
        conv_cache = jnp.take_along_axis(window, last[..., None], axis=1).astype(cache["conv"].dtype)
        # No decay and no write: the state passes padding unchanged.
        g, beta = jnp.where(keep[..., None], g, 0.0), jnp.where(keep[..., None], beta, 0.0)
        # A scanned layer's state stays stacked [G, B, Hv, dk, dv] (generate.cache.scanned_view).
        group, states = cache.get("group"), cache["state"]
        if length == 1 and self.method == "pallas" and kernel_platform() == "gpu":
            stacked = states[None] if group is None else states
            out, stacked = self._decode_step(*self._heads(conv), g, beta, stacked, 0 if group is None else group)
            return out, {"conv": conv_cache, "state": stacked[0] if group is None else stacked}
        out, state = self._rule(*self._heads(conv), g, beta, None, states if group is None else states[group],
                                "recurrent" if length == 1 else self.method, active_mesh())
        if group is not None:
            state = jax.lax.dynamic_update_index_in_dim(states, state, group, 0)
        return out, {"conv": conv_cache, "state": state}

    def _decode_step(self, q, k, v, g, beta, states, group):
        """One token [B, 1, Hv, ...] through the Pallas step kernel, which steps group `group` of the stacked
        states [G, B, Hv, dk, dv] in place -> (o [B, 1, Hv, dv], states). On a mesh it runs in shard_map over
        the rows and heads, as `_rule` runs the other kernels."""
        q, k = normalized_qk(q[:, 0], k[:, 0], self.k_head_dim**-0.5)
        token = (q, k, v[:, 0], g[:, 0], beta[:, 0])
        step = functools.partial(pallas_delta_rule_step, interpret=target_platform() != "gpu")
        mesh = active_mesh()
        if mesh is not None and mesh.size > 1:
            rows, heads = spec_for(("batch", "heads"), (v.shape[0], v.shape[2]), mesh, active_rules())
            per_head, per_row_head = PartitionSpec(rows, heads, None), PartitionSpec(rows, heads)
            stacked = PartitionSpec(None, rows, heads, None, None)
            step = jax.shard_map(step, mesh=mesh, check_vma=False, out_specs=(per_head, stacked),
                                 in_specs=(per_head,) * 3 + (per_row_head,) * 2 + (stacked, PartitionSpec()))
        o, states = step(*token, states, jnp.asarray(group, jnp.int32))
        return o[:, None].astype(v.dtype), states

    def _across_context(self, pre_conv, g, beta, segment_ids, mesh):
        """Training over a sequence split on the mesh's context axis -> out [B, T, Hv, dv], sharded alike."""
        shards = context_shards(mesh)
        batch, length, _ = pre_conv.shape
        taps = self.conv_weight.shape[0]
        if length % shards or length // shards < taps - 1:
            raise ValueError(f"sequence length {length} must split into mesh.context = {shards} equal shards of at "
                             f"least {taps - 1} tokens (the conv window)")
        ids = jnp.ones((batch, length), jnp.int32) if segment_ids is None else segment_ids
        batch_axes = spec_for(("batch",), (batch,), mesh, active_rules())[0]
        rows, per_token = PartitionSpec(batch_axes, AXIS), PartitionSpec(batch_axes, AXIS, None)
        terms_of, from_terms = chunk_terms, rule_from_terms
        if self.method == "pallas":
            terms_of, from_terms = pallas_chunk_terms, functools.partial(pallas_rule_from_terms, operand=pre_conv.dtype)
        terms_of = functools.partial(terms_of, normalize_qk=True, scale=self.k_head_dim**-0.5)

        def local(pre_conv, weight, g, beta, ids):
            window = jnp.concatenate([previous_shard_tail(pre_conv, taps - 1, fill=0), pre_conv], axis=1)
            window_ids = jnp.concatenate([previous_shard_tail(ids, taps - 1, fill=-1), ids], axis=1)
            q, k, v = self._heads(causal_depthwise_conv(window, weight, window_ids)[:, taps - 1 :])
            out, _ = delta_rule_across_shards(q, k, v, g, beta, ids, chunk_size=self.chunk_size, terms_of=terms_of,
                                              from_terms=from_terms)
            return out

        # check_vma off: the Pallas kernels' output shapes carry no varying-axes type.
        return jax.shard_map(local, mesh=mesh, in_specs=(per_token, PartitionSpec(), per_token, per_token, rows),
                             out_specs=PartitionSpec(batch_axes, AXIS, None, None), check_vma=False)(
            pre_conv, self.conv_weight[...], g, beta, ids)
