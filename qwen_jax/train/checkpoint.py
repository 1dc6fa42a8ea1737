"""Orbax checkpoints of the whole run: train state, data iterator state and metadata, async, keep-N.

A step directory that cannot be restored (a save killed half way, a truncated copy) is skipped with
a warning naming it, and the next older one is used: never loaded, never fatal, never deleted.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from qwen_jax.parallel.hosts import gather_objects

log = logging.getLogger(__name__)


class Checkpointer:
    """WORKDIR/checkpoints/<step>/{state, data, meta}."""

    def __init__(self, directory: Path, *, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        """Start an (async) save of `state` at `step`; returns once the arrays are copied off-device."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore_latest(self, abstract_state) -> tuple[int, object, dict, dict] | None:
        """(step, state, data_state, meta) from the newest complete checkpoint, or None if there is none."""
        steps = set(self.manager.all_steps())
        for leftover in sorted(self.directory.iterdir()):
            set_aside = ".unreadable-" in leftover.name  # already reported when it was moved
            if leftover.is_dir() and not set_aside and not (
                    leftover.name.isdigit() and int(leftover.name) in steps):
                log.warning("skipping partial checkpoint %s (a save that never finished)", leftover)
        for step in sorted(steps, reverse=True):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is skipped, not fatal
                self._set_aside(step, error)
                continue
            return step, restored.state, restored.data, restored.meta
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        """Rename an unreadable step dir (kept for inspection) so this run can save that step again."""
        broken = self.directory / str(step)
        kept = broken.with_name(f"{step}.unreadable-{int(time.time())}")
        log.warning("skipping incomplete checkpoint %s (moved to %s): %s", broken, kept.name,
                    str(error).splitlines()[0][:300])
        if jax.process_index() == 0:
            broken.rename(kept)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(state, shardings):
    """ShapeDtypeStructs (with shardings) mirroring `state`, the restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def data_states(local: dict) -> dict:
    """Every host's data iterator state, to save: a streaming host's differs from the others'."""
    return {"processes": gather_objects([local])}


def own_data_state(saved: dict) -> dict:
    """This host's iterator state from `data_states`' record."""
    if "processes" not in saved:  # saved before the states were per host: one state for all
        return saved
    states = saved["processes"]
    if len(states) != jax.process_count():
        raise ValueError(f"the checkpoint holds the data states of {len(states)} processes; this run "
                         f"has {jax.process_count()}: resume with as many")
    return states[jax.process_index()]
