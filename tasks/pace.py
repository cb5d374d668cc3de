"""The pace check: how many steps will this run make, and is that what its recipe was measured at?

A time-limited recipe (`experiment=cpu_60min`) buys as many steps as the machine gives it in the time
limit: 6.9-8.3k on the machines its downstream gains were measured on, 2.4k on one 2.4 x slower (README,
"Too few steps"), where the same preset leaves a checkpoint that loses to scratch on the pair tasks. A user
should learn that minutes into the run, not after an hour of pretraining and another of fine-tuning. So a
few minutes in, this projects the run's steps (or, for a step-limited run, its duration), logs it, tags the
MLflow run with it, warns when a time-limited run will fall short of the recipe's `expected_steps` (with the
step-keyed command that reproduces the recipe instead), and says the outcome in the end-of-run summary.

The first projection sees only the first minutes. A machine can slow down later (another job starts, the
validation pauses add up), so the projection is measured again every 10 minutes (or 10 % of the time limit),
over the whole run so far, validation pauses included: the log and the tags follow when it moves by more
than 5 %, and a run that falls short of its recipe later is warned then.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import MLFlowLogger

from tasks import tracking
from tasks.optim import time_left
from tasks.summary import minutes

log = logging.getLogger(__name__)

CHECK_AFTER_S = 120.0  # long enough for a steady rate (the first batches include warm-up work)
CHECK_SHARE = 0.05  # ... or this share of the time limit, whichever is later
RECHECK_AFTER_S = 600.0  # then again every 10 minutes ...
RECHECK_SHARE = 0.1  # ... or this share of the time limit, whichever is later
REPORT_CHANGE = 0.05  # a re-check is logged when the pace moved by more than this fraction


@dataclass(frozen=True)
class Projection:
    steps_per_min: float
    projected_steps: int | None  # by the time limit (time-limited runs)
    remaining_s: float | None  # until max_steps (step-limited runs)


def project(step: int, rate_per_s: float, time_left_s: float | None, max_steps: int | None) -> Projection:
    """Steps by the time limit, or time until max_steps, from the rate measured so far: whichever binds."""
    rate = max(rate_per_s, 1e-12)
    steps_left = max_steps - step if max_steps is not None and max_steps > 0 else None
    if time_left_s is not None and (steps_left is None or rate * time_left_s < steps_left):
        return Projection(rate * 60.0, step + int(rate * time_left_s), None)
    return Projection(rate * 60.0, None, steps_left / rate if steps_left is not None else None)


def shortfall_advice(projection: Projection, expected_steps: int, max_time: Any) -> str | None:
    """The warning for a time-limited run that will end short of the steps its recipe was measured at."""
    if projection.projected_steps is None or projection.projected_steps >= expected_steps:
        return None
    needed = expected_steps / (projection.steps_per_min / 60.0)
    return (
        f"this machine makes {projection.steps_per_min:.0f} steps a minute: about "
        f"{projection.projected_steps:,} steps by trainer.max_time={max_time}, fewer than the {expected_steps:,} "
        "this recipe's downstream gains were measured at (README, 'Too few steps': checkpoints with far fewer "
        "steps lost to scratch on NLI and STS). To reproduce the recipe by steps instead, run it with "
        f"trainer.max_steps={expected_steps} trainer.max_time=null optim.time_keyed=false "
        f"(about {minutes(needed)} here)"
    )


def branch_advice(trainer: pl.Trainer, expected_steps: int, steps_per_min: float) -> str | None:
    """A run that fell short of its recipe's steps and kept a budget checkpoint at the peak lr can reach them
    from there (`branch_from=`) instead of from step 0: the command, and what it costs at this pace."""
    from tasks.budgets import BudgetCheckpoints, stable_budget

    budgets = next((cb for cb in trainer.callbacks if isinstance(cb, BudgetCheckpoints)), None)
    found = stable_budget(budgets.records, expected_steps) if budgets is not None else None
    if found is None:
        return None
    step, to_go = int(found["step"]), expected_steps - int(found["step"])
    return (
        f"To reach {expected_steps:,} steps without starting over, branch from step {step:,} (still at the peak "
        f"lr; README, 'Branch'): python run.py <same overrides> branch_from={found['file']} "
        f"trainer.max_steps={expected_steps} trainer.max_time=null optim.time_keyed=false "
        f"({to_go:,} steps, about {minutes(60.0 * to_go / max(steps_per_min, 1e-9))} here)"
    )


class StepPace(pl.Callback):
    """Measures steps per second of training in this process and reports the projection (see module)."""

    def __init__(self, expected_steps: int | None = None, max_time: Any = None) -> None:
        self.expected_steps = int(expected_steps) if expected_steps else None
        self.max_time = max_time
        self.projection: Projection | None = None
        self.warning: str | None = None
        self.checks = 0
        self._reported: Projection | None = None
        self._start: tuple[int, float] | None = None
        self._checked_s = 0.0
        self._fit_start_step = 0
        self._fit_start_s: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self.projection, self._reported, self.warning, self.checks = None, None, None, None, 0
        self._fit_start_step, self._fit_start_s = int(trainer.global_step), time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        now, step = time.monotonic(), int(trainer.global_step)
        if self._start is None:  # the rate starts after the first batch (data workers, allocator warm-up)
            self._start = (step, now)
            return
        timing = time_left(trainer)
        budget = sum(timing) if timing is not None else 0.0
        start_step, start_s = self._start
        if self.projection is None:
            due = now - start_s >= max(CHECK_AFTER_S, CHECK_SHARE * budget)
        else:
            due = now - self._checked_s >= max(RECHECK_AFTER_S, RECHECK_SHARE * budget)
        if not due or step <= start_step:
            return
        self._checked_s, self.checks = now, self.checks + 1
        max_steps = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps > 0 else None
        remaining = timing[1] if timing is not None else None
        # the rate over the whole run so far: later checks count the validation pauses between them
        self.projection = project(step, (step - start_step) / (now - start_s), remaining, max_steps)
        self._report(trainer)

    def _report(self, trainer: pl.Trainer) -> None:
        p, last = self.projection, self._reported
        if p is None or not trainer.is_global_zero:  # one report per run, not one per DDP process
            return
        if isinstance(trainer.logger, MLFlowLogger):  # the tags follow every check, the log only a change
            tags: dict[str, Any] = {"pace_steps_per_min": f"{p.steps_per_min:.1f}"}
            if p.projected_steps is not None:
                tags["projected_steps"] = p.projected_steps
            tracking.set_tags(trainer.logger, tags)
        if last is not None and abs(p.steps_per_min / last.steps_per_min - 1.0) <= REPORT_CHANGE:
            return  # a steady pace: said already
        was = f" (was {last.steps_per_min:.0f})" if last is not None else ""
        if p.projected_steps is not None:
            log.info("pace: %.0f steps a minute%s, about %s steps by trainer.max_time=%s", p.steps_per_min, was,
                     f"{p.projected_steps:,}", self.max_time)  # fmt: skip
        elif p.remaining_s is not None:
            log.info("pace: %.0f steps a minute%s, step %s of %s, about %s to go", p.steps_per_min, was,
                     f"{trainer.global_step:,}", f"{trainer.max_steps:,}", minutes(p.remaining_s))  # fmt: skip
        self._reported = p
        if self.expected_steps is not None and self.warning is None:  # warned once: not again every re-check
            self.warning = shortfall_advice(p, self.expected_steps, self.max_time)
            if self.warning:
                log.warning("pace: %s", self.warning)

    def summary_line(self, trainer: pl.Trainer) -> str | None:
        """For the end-of-run summary: the pace this run had, and whether it reached the recipe's steps."""
        if self._fit_start_s is None:
            return None
        made = int(trainer.global_step) - self._fit_start_step
        seconds = time.monotonic() - self._fit_start_s
        if made <= 0 or seconds <= 0:
            return None
        line = f"Pace: {made:,} steps in {minutes(seconds)} ({60.0 * made / seconds:.0f} a minute)"
        if self.expected_steps is not None:
            if trainer.global_step < self.expected_steps:
                line += (
                    f"; the recipe was measured at {self.expected_steps:,} steps: expect smaller downstream "
                    "gains (README, 'Too few steps')"
                )
                advice = branch_advice(trainer, self.expected_steps, 60.0 * made / seconds)
                if advice:
                    line += "\n" + advice
            else:
                line += f"; at least the {self.expected_steps:,} steps the recipe was measured at"
        return line
