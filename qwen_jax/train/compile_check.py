"""`qwen-jax compile`: lower and compile the train step for a real TPU topology on a CPU host.

libtpu describes the topology (jax.experimental.topologies), so XLA:TPU itself compiles the step
over abstract arrays: nothing is allocated, and memory_analysis() is the chip's own figure.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import ml_collections

from qwen_jax.config import ConfigError
from qwen_jax.experiment import model_config, train_config
from qwen_jax.parallel.mesh import make_mesh
from qwen_jax.train.checkpoint import abstract_like
from qwen_jax.train.loop import rules_from_config
from qwen_jax.train.step import make_trainer

# HBM per chip as the spec sheets give it (GB).
HBM_PER_CHIP = {"v4": 32e9, "v5e": 16e9, "v5litepod": 16e9, "v5p": 95e9, "v6e": 32e9}
GIB = 1024**3


@dataclasses.dataclass
class CompileReport:
    topology: str
    devices: int
    mesh: dict
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int
    hbm: float
    error: str | None = None  # XLA's own out-of-memory message when the step cannot fit at all
    kernels: tuple[str, ...] = ()  # the Pallas (Mosaic) kernels the step calls

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @property
    def fits(self) -> bool:
        return self.error is None and self.total <= self.hbm

    def table(self) -> str:
        if self.error is not None:
            return (f"topology {self.topology}: {self.devices} chips, mesh {self.mesh}\n"
                    f"does NOT fit: XLA:TPU refused to compile it: {self.error}")
        rows = [("arguments", self.arguments), ("outputs (not aliased)", self.outputs - self.aliased),
                ("temporaries", self.temporaries), ("generated code", self.code), ("total", self.total)]
        lines = [f"topology {self.topology}: {self.devices} chips, mesh {self.mesh}",
                 "| per device | GiB |", "|---|---|"]
        lines += [f"| {name} | {size / GIB:.2f} |" for name, size in rows]
        lines.append(f"| HBM of the chip | {self.hbm / GIB:.2f} |")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"{verdict}: {self.total / GIB:.2f} of {self.hbm / GIB:.2f} GiB per device")
        lines.append(f"Pallas kernels: {', '.join(self.kernels) or 'none'}")
        return "\n".join(lines)


def tpu_topology(name: str):
    """'v5p:4x4x4' -> a libtpu TopologyDescription (no TPU needed)."""
    generation = name.split(":")[0]
    if ":" not in name or generation not in HBM_PER_CHIP:
        raise ConfigError(f"--topology {name!r} must look like <generation>:<AxBxC> with generation in "
                          f"{sorted(HBM_PER_CHIP)}")
    # libtpu probes the local machine for a TPU unless told there is none to find, and by default
    # takes a machine-wide lock that a second compile (or a test run beside this one) would hit.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(name, platform="tpu")
    except Exception as error:  # noqa: BLE001 - libtpu missing or an unknown shape: say which
        raise ConfigError(f"--topology {name!r}: libtpu could not describe it ({error}); "
                          "pip install libtpu") from None


def mosaic_kernels(lowered_text: str) -> tuple[str, ...]:
    """The Pallas (Mosaic) kernels a program lowered for TPU calls, by name (from its StableHLO text)."""
    return tuple(sorted(set(re.findall(r'kernel_name = "([\w-]+)"', lowered_text))))


def compile_train_step(config: ml_collections.ConfigDict, topology: str) -> CompileReport:
    """Compile the train step of `config` for `topology`; per-device memory from XLA:TPU."""
    model_cfg, train_cfg = model_config(config), train_config(config)
    devices = tpu_topology(topology).devices
    mesh = make_mesh(dict(config.mesh), devices)
    trainer = make_trainer(model_cfg, train_cfg, mesh, rules_from_config(config))
    state = abstract_like(jax.eval_shape(lambda: trainer.init_state(config.seed)), trainer.state_shardings)
    batch = {key: jax.ShapeDtypeStruct((train_cfg.batch_size, train_cfg.seq_len),
                                       jnp.float32 if key == "loss_mask" else jnp.int32,
                                       sharding=sharding)
             for key, sharding in trainer.batch_shardings.items()}
    report = dict(topology=topology, devices=len(devices), mesh=dict(mesh.shape),
                  hbm=HBM_PER_CHIP[topology.split(":")[0]])
    lowered = trainer.step_fn.lower(state, batch)
    report["kernels"] = mosaic_kernels(lowered.as_text())
    try:
        memory = lowered.compile().memory_analysis()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        # XLA:TPU rejects a program whose temporaries cannot fit in HBM at compile time.
        message = str(error).splitlines()[0].split("E1000: ")[-1]
        return CompileReport(**report, arguments=0, outputs=0, aliased=0, temporaries=0, code=0,
                             error=message)
    return CompileReport(
        **report,
        arguments=memory.argument_size_in_bytes, outputs=memory.output_size_in_bytes,
        aliased=memory.alias_size_in_bytes, temporaries=memory.temp_size_in_bytes,
        code=memory.generated_code_size_in_bytes)
