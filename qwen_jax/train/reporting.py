"""Where a run's metrics go: WORKDIR/metrics.jsonl, wandb (offline by default), a progress bar, a plot."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import jax
import ml_collections
from tqdm import tqdm

from qwen_jax.train.metrics import JsonlWriter, plot_curve, read_metrics

WANDB_MODES = ("offline", "online", "disabled")


class RunLogger:
    """Process 0 writes; every other process only keeps the rows."""

    def __init__(self, workdir: Path, config: ml_collections.ConfigDict, *, resume_step: int | None,
                 total_steps: int, curve: tuple[str, str] = ("learning/loss", "loss.png")):
        self.workdir, self.curve, self.rows = Path(workdir), curve, []
        self.main = jax.process_index() == 0
        self.jsonl = self.wandb = self.progress = None
        if not self.main:
            return
        self.jsonl = JsonlWriter(self.workdir / "metrics.jsonl", resume_step)
        mode = config.wandb.mode
        if mode != "disabled":
            import wandb

            run_id_file = self.workdir / "wandb_run_id"
            run_id = run_id_file.read_text() if run_id_file.exists() else uuid.uuid4().hex[:8]
            run_id_file.write_text(run_id)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=config.wandb.get("project", "qwen-jax"), dir=self.workdir,
                                    mode=mode, id=run_id, resume="allow", config=config.to_dict())
        self.progress = tqdm(total=total_steps, initial=resume_step or 0, dynamic_ncols=True,
                             mininterval=1.0)

    def log(self, row: dict, *, log: bool = True) -> None:
        """Record one step's row (always kept; written when `log`)."""
        self.rows.append(row)
        if not self.main:
            return
        if log:
            self.jsonl.write(row)
            if self.wandb is not None:
                self.wandb.log({k: _for_wandb(v) for k, v in row.items() if k != "step"},
                               step=row["step"])
        key = self.curve[0]
        postfix = {"loss": f"{row[key]:.3f}"} if key in row else {}
        if "perf/tokens_per_sec" in row:
            postfix["tok/s"] = f"{row['perf/tokens_per_sec']:,.0f}"
        self.progress.set_postfix(postfix, refresh=False)
        self.progress.update(1)

    def note(self, text: str) -> None:
        """A line of its own above the progress bar (process 0 only)."""
        if self.main:
            self.progress.write(text)

    def close(self) -> list[dict]:
        """Flush the sinks and draw the curve from the whole metrics.jsonl (resumed runs included)."""
        if self.main:
            self.progress.close()
            self.jsonl.close()
            if self.wandb is not None:
                self.wandb.finish()
            plot_curve(read_metrics(self.workdir / "metrics.jsonl"), self.curve[0],
                       self.workdir / self.curve[1], title=str(self.workdir.name))
        return self.rows


def _for_wandb(value):
    """Scalars as they are; a per-expert load list as a bar per expert (wandb has no list type)."""
    if not isinstance(value, list):
        return value
    import numpy as np
    import wandb

    return wandb.Histogram(np_histogram=(np.asarray(value), np.arange(len(value) + 1)))
