"""Budget checkpoints: pretraining snapshots kept for good, each knowing how much compute it cost.

A study of "how much does pretraining buy?" fine-tunes the same run at several points of its training. The
rotating `last.ckpt` cannot serve: it holds only the newest step. This callback writes `budget-step{N}.ckpt`
beside it at chosen steps (`keep_checkpoints_at_steps`), every `checkpoint_every_minutes` of wall time, and
at the end of training, and never deletes them. Each records its step, the tokens seen (non-pad tokens
processed, counted by the module) and the wall minutes of training so far (summed over resumes: the clock's
offset travels in the callback's checkpoint state). The list goes to the MLflow run as `budgets.json`, so
`python -m tasks.study <run id>` finds them from the run id alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger(__name__)

BUDGETS_ARTIFACT = "budgets.json"
BUDGET_PATTERN = re.compile(r"^budget-step(\d+)\.ckpt$")


def budget_filename(step: int) -> str:
    return f"budget-step{step}.ckpt"


class BudgetCheckpoints(pl.Callback):
    """Keep `budget-step{N}.ckpt` at the given steps, every `every_minutes`, and (optionally) at the end."""

    def __init__(
        self,
        dirpath: str | Path,
        at_steps: Iterable[int] = (),
        every_minutes: float | None = None,
        at_end: bool = True,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.at_steps = sorted({int(s) for s in at_steps})
        if any(s < 1 for s in self.at_steps):
            raise ValueError(f"keep_checkpoints_at_steps must be positive steps, got {self.at_steps}")
        if every_minutes is not None and float(every_minutes) <= 0:
            raise ValueError(f"checkpoint_every_minutes must be > 0 (or null), got {every_minutes}")
        self.every_minutes = float(every_minutes) if every_minutes else None
        self.at_end = at_end
        self.records: list[dict[str, Any]] = []  # one per kept checkpoint, oldest first
        self._minutes_before = 0.0  # training minutes of earlier (interrupted) processes of this run
        self._clock_start: float | None = None
        self._next_minutes: float | None = self.every_minutes

    # -- the clock: wall minutes of training, carried over a resume through the checkpoint -----------------

    def minutes(self) -> float:
        if self._clock_start is None:
            return self._minutes_before
        return self._minutes_before + (time.monotonic() - self._clock_start) / 60.0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._clock_start = time.monotonic()

    def state_dict(self) -> dict[str, Any]:
        return {"minutes": self.minutes(), "records": list(self.records)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._minutes_before = float(state_dict.get("minutes", 0.0))
        self._clock_start = time.monotonic()
        self.records = list(state_dict.get("records", []))
        if self.every_minutes:  # the next multiple of the interval after the time already spent
            self._next_minutes = (int(self._minutes_before // self.every_minutes) + 1) * self.every_minutes

    # -- triggers ------------------------------------------------------------------------------------------

    def _saved_steps(self) -> set[int]:
        return {int(r["step"]) for r in self.records}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        step = trainer.global_step  # optimizer steps done, counting this batch's
        due = step in self.at_steps
        if self.every_minutes is not None:
            # ranks' clocks differ slightly: rank 0 decides, or the collective save would hang
            timed = trainer.strategy.broadcast(self.minutes() >= self._next_minutes)
            if timed:
                while self._next_minutes <= self.minutes():
                    self._next_minutes += self.every_minutes
            due = due or timed
        if due and step not in self._saved_steps():
            self.save(trainer, pl_module, reason="step" if step in self.at_steps else "minutes")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_end and not trainer.fast_dev_run and trainer.global_step not in self._saved_steps():
            if trainer.global_step > 0:
                self.save(trainer, pl_module, reason="end")

    # -- saving --------------------------------------------------------------------------------------------

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> dict[str, Any]:
        """Write the checkpoint atomically (temp file + rename): a reader never sees a partial budget."""
        step = int(trainer.global_step)
        path = self.dirpath / budget_filename(step)
        record = {
            "step": step,
            "tokens": int(getattr(pl_module, "tokens_seen", 0)),
            "minutes": round(self.minutes(), 4),
            "reason": reason,
            "file": str(path),
            **_lr_now(trainer),
        }
        self.records.append(record)  # before saving, so the checkpoint's own state lists itself
        tmp = path.with_name(f".{path.name}.tmp")
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp, weights_only=False)  # collective under DDP; rank 0 writes; ends with a barrier
        if trainer.is_global_zero:
            os.replace(tmp, path)
            self._publish(trainer)
        log.info("budget checkpoint %s (%s)", path, record)
        return record

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Every checkpoint says how much compute it holds, budget or not.
        checkpoint["budget"] = {
            "step": int(trainer.global_step),
            "tokens": int(getattr(pl_module, "tokens_seen", 0)),
            "minutes": round(self.minutes(), 4),
        }

    def _publish(self, trainer: pl.Trainer) -> None:
        logger = trainer.logger
        run_id = getattr(logger, "run_id", None)
        if run_id is None:
            return
        logger.experiment.log_text(run_id, json.dumps(self.records, indent=2) + "\n", BUDGETS_ARTIFACT)


def _lr_now(trainer: pl.Trainer) -> dict[str, float]:
    """The lr the next step will use and the schedule's peak: a budget taken at the peak of a warmup-stable-decay
    run is one a longer run would also have passed through, so it can be branched (`branch_from=`)."""
    configs = getattr(trainer, "lr_scheduler_configs", None) or []
    if not configs or not trainer.optimizers:
        return {}
    peak = getattr(configs[0].scheduler, "base_lrs", None)
    if not peak:
        return {}
    return {"lr": float(trainer.optimizers[0].param_groups[0]["lr"]), "peak_lr": float(peak[0])}


def at_peak(record: dict[str, Any]) -> bool:
    """Taken in the stable phase (after warmup, before the decay): a checkpoint a decay can branch from."""
    lr, peak = record.get("lr"), record.get("peak_lr")
    return bool(peak) and lr is not None and lr >= peak * (1 - 1e-6)


def stable_budget(records: Iterable[dict[str, Any]], before_step: int) -> dict[str, Any] | None:
    """The latest budget before `before_step` taken at the peak lr, after warmup (None if there is none)."""
    stable = [r for r in records if at_peak(r) and int(r["step"]) < before_step]
    return max(stable, key=lambda r: int(r["step"]), default=None)


def read_budgets(ckpt_dir: Path) -> list[dict[str, Any]]:
    """Budget records from the checkpoints themselves (when the run's `budgets.json` is not at hand)."""
    import torch

    records = []
    for path in sorted(Path(ckpt_dir).glob("budget-step*.ckpt")):
        if not BUDGET_PATTERN.match(path.name):
            continue
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        budget = dict(ckpt.get("budget") or {})
        if "step" not in budget:
            raise ValueError(f"{path} records no budget (step, tokens, minutes): not a budget checkpoint")
        records.append({**budget, "file": str(path)})
    return sorted(records, key=lambda r: r["step"])
