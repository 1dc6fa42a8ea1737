"""Logical axis names for every parameter and activation, mapped to mesh axes by a rules table.

Parameters get logical names from their path (MaxText style), because the model stays free of any
mesh; the rules, kept in config, say which mesh axes each logical name is sharded over.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp", "expert")),  # the expert axis is data parallel outside the experts
    ("experts", "expert"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("layers", None),
    ("length", "context"),
    ("act_embed", None),
)

# Kernels whose input side is the model width and output side is split across heads / MLP units.
_IN_PROJECTIONS = {"q_proj": "heads", "k_proj": "heads", "v_proj": "heads", "in_proj_qkv": "heads",
                   "in_proj_z": "heads", "in_proj_b": "heads", "in_proj_a": "heads",
                   "gate_proj": "mlp", "up_proj": "mlp"}
_OUT_PROJECTIONS = {"o_proj": "heads", "out_proj": "heads", "down_proj": "mlp"}


def hashable_rules(rules) -> tuple:
    """Rules as nested tuples (config files give lists), so they can be a jit static argument."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def param_logical_axes(path: Sequence[str], ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the parameter at `path` (e.g. ('groups','layers','0','mlp','up_proj','kernel'))."""
    # Scanned stacks carry a leading layer axis: the decoder's groups and the vision blocks.
    stacked = path[0] == "groups" or tuple(path[:2]) == ("visual", "blocks")
    leaf, owner = path[-1], path[-2] if len(path) > 1 else ""
    if leaf == "embedding":
        axes = ("vocab", "embed")
    elif owner == "lm_head":
        axes = ("embed", "vocab")
    elif leaf == "kernel" and owner in _IN_PROJECTIONS:
        axes = ("embed", _IN_PROJECTIONS[owner])
    elif leaf == "kernel" and owner in _OUT_PROJECTIONS:
        axes = (_OUT_PROJECTIONS[owner], "embed")
    elif leaf == "kernel_scale":  # an int8 kernel's scale per output channel, split as the kernel's outputs
        axes = (_IN_PROJECTIONS[owner],) if owner in _IN_PROJECTIONS else ("embed",)
    elif owner == "experts":  # gate_up_proj [E, H, 2I], down_proj [E, I, H]
        axes = ("experts", "embed", "mlp") if leaf == "gate_up_proj" else ("experts", "mlp", "embed")
    elif leaf == "conv_weight":
        axes = (None, "heads")
    else:  # norms, A_log, dt_bias, routers: small, replicated
        axes = (None,) * (ndim - stacked)
    axes = (("layers",) if stacked else ()) + axes
    if len(axes) != ndim:
        raise ValueError(f"parameter {'/'.join(path)} has {ndim} dims but logical axes {axes}")
    return axes


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> PartitionSpec:
    """PartitionSpec for `logical` axes; a mesh axis that does not divide a dim (or is used twice) is dropped."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape):
        target = table.get(name) if name else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        while axes and size % _product(mesh, axes):
            axes = axes[:-1]
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def _product(mesh: Mesh, axes: Sequence[str]) -> int:
    out = 1
    for axis in axes:
        out *= mesh.shape[axis]
    return out


def _path_names(key_path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in key_path)


def param_shardings(params, mesh: Mesh, rules):
    """A NamedSharding for every leaf of a (pure-dict) params tree."""
    def one(key_path, x):
        names = _path_names(key_path)
        return NamedSharding(mesh, spec_for(param_logical_axes(names, x.ndim), x.shape, mesh, rules))
    return jax.tree_util.tree_map_with_path(one, params)


_ACTIVE = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
    """Within this block, `constrain` pins activations to the mesh; outside it is a no-op."""
    previous = getattr(_ACTIVE, "value", None)
    _ACTIVE.value = (mesh, rules)
    try:
        yield
    finally:
        _ACTIVE.value = previous


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing activation_sharding block, or None outside one."""
    active = getattr(_ACTIVE, "value", None)
    return None if active is None else active[0]


def target_platform() -> str:
    """Where the program being traced runs: the active mesh's devices (a TPU topology that `qwen-jax compile`
    compiles for on a CPU host), else this backend."""
    mesh = active_mesh()
    return jax.default_backend() if mesh is None else mesh.devices.flat[0].platform


def active_rules():
    """The rules of the enclosing activation_sharding block, or None outside one."""
    active = getattr(_ACTIVE, "value", None)
    return None if active is None else active[1]


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical axis names, when activation_sharding is active."""
    active = getattr(_ACTIVE, "value", None)
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(logical, x.shape, mesh, rules)))
