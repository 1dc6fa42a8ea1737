"""Gated full attention: q/gate split per head, q/k norms, partial mRoPE, GQA, sigmoid output gate."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from qwen_jax.config import ConfigError, ModelConfig
from qwen_jax.generate.cache import write_columns
from qwen_jax.model.layers import dense
from qwen_jax.model.norms import RMSNorm
from qwen_jax.model.rope import apply_rope
from qwen_jax.ops.blockwise_attention import blockwise_attention
from qwen_jax.ops.cached_attention import cached_attention
from qwen_jax.ops.pallas.splash_attention import splash_attention, splash_supports
from qwen_jax.parallel.context import AXIS, context_shards
from qwen_jax.parallel.rules import active_mesh, active_rules, spec_for, target_platform


def segment_causal_mask(segment_ids: jax.Array) -> jax.Array:
    """segment_ids [B, T] -> bool [B, 1, T, T]: causal and within one segment."""
    length = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal & same)[:, None]


def resolve_attention_impl(impl: str, dtype, platform: str | None = None) -> str:
    """config.attention_impl ("auto" | "xla" | "cudnn" | "splash") -> "xla", "cudnn" or "splash" for
    `platform` (default: where the traced program runs) and the compute dtype."""
    platform = platform or target_platform()
    # cuDNN's fused attention runs only on NVIDIA GPUs and only on half-precision inputs.
    cudnn_ok = platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if impl == "auto":
        return "cudnn" if cudnn_ok else "splash" if platform == "tpu" else "xla"
    if impl == "cudnn" and not cudnn_ok:
        raise ConfigError(
            f"model.attention_impl 'cudnn' needs a GPU backend and a bfloat16/float16 compute dtype, "
            f"got backend {platform!r} and dtype {jnp.dtype(dtype).name!r}; use 'auto' or 'xla'")
    return impl


class GatedAttention(nnx.Module):
    """Softmax attention whose output is gated elementwise by sigmoid(gate) before o_proj."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, init_std=cfg.initializer_range, rngs=rngs,
                  quant=cfg.weight_quant)
        resolve_attention_impl(cfg.attention_impl, dtype)  # an impossible choice fails here, not at the first step
        # Resolved again per call: the platform is the mesh's, known only when the step is traced.
        self.attention_impl, self.splash_block = cfg.attention_impl, cfg.splash_block
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        # q_proj rows are per-head interleaved [query_h (D); gate_h (D)], hence the 2D per head.
        self.q_proj = dense(cfg.hidden_size, self.num_heads * self.head_dim * 2, **kw, lora=cfg.lora_for("q_proj"))
        self.k_proj = dense(cfg.hidden_size, self.num_kv_heads * self.head_dim, **kw, lora=cfg.lora_for("k_proj"))
        self.v_proj = dense(cfg.hidden_size, self.num_kv_heads * self.head_dim, **kw, lora=cfg.lora_for("v_proj"))
        self.o_proj = dense(self.num_heads * self.head_dim, cfg.hidden_size, **kw, lora=cfg.lora_for("o_proj"))
        self.q_norm = RMSNorm(self.head_dim, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.k_norm = RMSNorm(self.head_dim, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None,
                 cache: dict | None = None, index: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, valid: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
        """x [B, T, H], cos/sin [B, T, R], mask bool [B, 1, T, T] or None (plain causal) -> ([B, T, H], cache).

        With a cache ({"k", "v"}: [B, S, Hkv, D]) the new keys and values are written at columns
        index .. index + T - 1, and the queries attend over the first index + T columns, the only
        ones written, as valid [B, S] (columns holding real tokens) allows (ops.cached_attention,
        whatever attention_impl says; mask unused). On a mesh whose context axis splits T, the mask
        comes from segment_ids [B, T] instead.
        """
        batch, length, _ = x.shape
        query_and_gate = self.q_proj(x).reshape(batch, length, self.num_heads, 2 * self.head_dim)
        query, gate = jnp.split(query_and_gate, 2, axis=-1)
        q = apply_rope(self.q_norm(query), cos, sin)
        k = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        k = apply_rope(self.k_norm(k), cos, sin)
        v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
        if cache is not None:
            group = cache.get("group")  # a scanned layer's keys and values stay stacked [G, B, S, ...]
            cache = {**cache, "k": write_columns(cache["k"], k, index, group),
                     "v": write_columns(cache["v"], v, index, group)}
            # Only the columns written so far are read: a prefill or a decode step costs what its
            # tokens cost, not what the cache could hold.
            out = cached_attention(q, cache["k"], cache["v"], valid, index, scale=self.head_dim**-0.5, group=group)
            return self._output(out, gate), cache
        mesh = active_mesh()
        if context_shards(mesh) > 1:
            out = self._across_context(q, k, v, segment_ids, mesh)
        elif (implementation := self._implementation(q.dtype, length)) == "splash":
            out = self._splash(q, k, v, segment_ids, mesh)
        else:
            # No mask means plain causal rows: is_causal is cuDNN's fast path (~3x the masked kernel).
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None,
                                               scale=self.head_dim**-0.5, implementation=implementation)
        return self._output(out, gate), cache

    def _output(self, out: jax.Array, gate: jax.Array) -> jax.Array:
        """Attention out and gate [B, T, Hq, D] -> o_proj(out * sigmoid(gate)) [B, T, H]."""
        out = out.reshape(*out.shape[:2], self.num_heads * self.head_dim)
        return self.o_proj(out * jax.nn.sigmoid(gate.reshape(out.shape)))

    def _implementation(self, dtype, length: int) -> str:
        """"xla", "cudnn" or "splash" for an uncached call of `length` tokens. "auto" falls back to XLA where
        the splash kernels cannot tile the call, an explicit "splash" says why."""
        implementation = resolve_attention_impl(self.attention_impl, dtype)
        if implementation != "splash":
            return implementation
        problem = splash_supports(length, self.head_dim, self.splash_block)
        if problem is None:
            return "splash"
        if self.attention_impl == "splash":
            raise ConfigError(f"model.attention_impl 'splash' cannot run this call: {problem} "
                              f"(model.splash_block {self.splash_block})")
        return "xla"

    def _splash(self, q, k, v, segment_ids, mesh):
        """q [B, T, Hq, D], k, v [B, T, Hkv, D] -> [B, T, Hq, D] by the splash kernels (the Pallas interpreter
        off TPU). On a mesh they run in shard_map over rows and heads: XLA cannot partition a kernel call."""
        attend = functools.partial(splash_attention, scale=self.head_dim**-0.5, block=self.splash_block,
                                   interpret=target_platform() != "tpu")
        if mesh is None or mesh.size == 1:
            return attend(q, k, v, segment_ids)
        rows, heads = spec_for(("batch", "heads"), (q.shape[0], self.num_kv_heads), mesh, active_rules())
        per_head = PartitionSpec(rows, None, heads, None)
        operands, specs = ((q, k, v), (per_head,) * 3)
        if segment_ids is not None:
            operands, specs = (*operands, segment_ids), (*specs, PartitionSpec(rows, None))
        else:
            attend = functools.partial(attend, segment_ids=None)
        # check_vma off: the Pallas kernels' output shapes carry no varying-axes type.
        return jax.shard_map(attend, mesh=mesh, check_vma=False, in_specs=specs, out_specs=per_head)(*operands)

    def _across_context(self, q, k, v, segment_ids, mesh):
        """q [B, T, Hq, D], k, v [B, T, Hkv, D], T split over context -> [B, T, Hq, D], split alike.

        Keys, values and segment ids are gathered over context (with GQA the small side: Hkv heads),
        and attention runs one key block at a time (ops.blockwise_attention), skipping key blocks
        after the last query, so a shard never holds [t, T] scores. Causal work is balanced by a
        zig-zag: the queries are cut into 2 x shards halves and shard i answers halves i and
        2 x shards - 1 - i (`zigzag_queries`), an early and a late one, so every shard computes
        the same number of key blocks instead of the last shard doing all of them.
        """
        batch, length = q.shape[:2]
        ids = jnp.ones((batch, length), jnp.int32) if segment_ids is None else segment_ids
        rules = active_rules()
        batch_axes = spec_for(("batch",), (batch,), mesh, rules)[0]
        # Heads split over the tensor axis only where it divides both query and key/value heads.
        head_axes = spec_for(("heads",), (self.num_kv_heads,), mesh, rules)[0]
        per_head = PartitionSpec(batch_axes, AXIS, head_axes, None)
        shards = context_shards(mesh)
        scale = self.head_dim**-0.5

        def local(q, k, v, ids):
            keys, values, key_ids = (jax.lax.all_gather(x, AXIS, axis=1, tiled=True) for x in (k, v, ids))
            key_positions = jnp.broadcast_to(jnp.arange(keys.shape[1]), key_ids.shape)
            rows, shard = ids.shape
            index = jax.lax.axis_index(AXIS)
            if shard % 2:  # no halves to balance: the shard's own contiguous queries
                positions = jnp.broadcast_to(index * shard + jnp.arange(shard), (rows, shard))
                return blockwise_attention(q, keys, values, positions, key_positions, ids, key_ids,
                                           scale=scale)
            halves = zigzag_queries((q, ids), shards)
            outs = []
            for half, ((q_half, ids_half), chunk) in enumerate(zip(halves, (index, 2 * shards - 1 - index))):
                positions = jnp.broadcast_to(chunk * (shard // 2) + jnp.arange(shard // 2),
                                             (rows, shard // 2))
                outs.append(blockwise_attention(q_half, keys, values, positions, key_positions,
                                                ids_half, key_ids, scale=scale))
            return unzigzag_outputs(outs, shards)

        rows = PartitionSpec(batch_axes, AXIS)
        return jax.shard_map(local, mesh=mesh, in_specs=(per_head, per_head, per_head, rows),
                             out_specs=per_head)(q, k, v, ids)


def zigzag_destination(chunk: int, shards: int) -> int:
    """The shard that answers query half `chunk` of 2 x shards: chunk i and its mirror 2n-1-i
    go to shard i, so each shard has one early and one late half."""
    return chunk if chunk < shards else 2 * shards - 1 - chunk


def zigzag_queries(arrays, shards: int):
    """Inside shard_map over context: this shard's contiguous halves 2i, 2i+1 of each [B, t, ...]
    array -> ((early half i's arrays), (late half 2n-1-i's arrays)), moved by two ppermutes."""
    index = jax.lax.axis_index(AXIS)
    received = []
    for position in (0, 1):  # the shard's first halves all move at once, then its second halves
        pairs = [(i, zigzag_destination(2 * i + position, shards)) for i in range(shards)]
        received.append([jax.lax.ppermute(jnp.split(x, 2, axis=1)[position], AXIS, pairs)
                         for x in arrays])
    # An even shard i gets its early half (i itself) from the first halves' move, an odd one from
    # the second's: chunk 2j lands on an even shard only when it is that shard's own index.
    even = index % 2 == 0
    early = [jnp.where(even, a, b) for a, b in zip(*received)]
    late = [jnp.where(even, b, a) for a, b in zip(*received)]
    return tuple(early), tuple(late)


def unzigzag_outputs(outs, shards: int) -> jax.Array:
    """The inverse of `zigzag_queries` for the (early, late) outputs [B, t/2, ...]: back to the
    shard's contiguous [B, t, ...]."""
    early, late = outs
    even = jax.lax.axis_index(AXIS) % 2 == 0
    back = []
    for position, sent in ((0, jnp.where(even, early, late)), (1, jnp.where(even, late, early))):
        pairs = [(zigzag_destination(2 * i + position, shards), i) for i in range(shards)]
        back.append(jax.lax.ppermute(sent, AXIS, pairs))
    return jnp.concatenate(back, axis=1)
