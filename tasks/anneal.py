"""Cooldowns for a study: fine-tune a budget checkpoint as the run it would have been had its budget ended there.

A warmup-stable-decay run (the `cpu_60min` preset) holds its peak lr until the last share of its time limit, so
its budget checkpoints at minutes 10, 20, 30, 40 are mid-schedule, at the peak lr: not what a run planned for
that long would have ended with, and a study of them understates what those minutes buy. Hägele et al. (2024)
find that a short decay branched off the stable phase matches a run planned for that length. So
`python -m tasks.study <run> anneal=true` branches (`branch_from=`) each budget taken at the peak lr into a
decay over the parent's own `optim.decay_fraction` of the steps after warmup (`anneal=0.3`: another share),
and fine-tunes the annealed end in its place. Each cooldown is a pretraining run of its own in the parent's
MLflow experiment (tags `branch_run_id`, `branch_step`); its minutes continue the parent's budget clock, so the
study's minutes axis counts what the cooldown cost too. A study run again reuses a finished cooldown.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.budgets import at_peak

ROOT = Path(__file__).resolve().parents[1]
# set per cooldown: the parent's own values of these are replaced, and a resume or a second start is dropped
SET_HERE = ("branch_from", "trainer.max_steps", "trainer.max_time", "trainer.max_epochs", "optim.time_keyed",
            "optim.decay_fraction", "logger.run_name", "budget_at_end", "expected_steps", "ckpt_path", "pretrained")  # fmt: skip
# what of a study's extra_args also says where a cooldown goes: the store and the folders, not run names
WHERE = ("paths.", "hydra.", "logger.tracking_uri", "logger.artifact_location")


def cooldown_end(step: int, warmup_steps: int, fraction: float) -> int:
    """The `trainer.max_steps` whose step-keyed schedule (tasks.optim.linear_schedule) still holds the peak at
    `step` and decays to the floor over `fraction` of the steps after warmup, starting at the next step."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"anneal={fraction}: the share of the annealed run's steps (after warmup) that decays, in (0, 1)")
    if step <= warmup_steps:
        raise ValueError(f"step {step} is within the {warmup_steps} warmup steps: no stable phase to decay from")
    return math.ceil(warmup_steps + (step - warmup_steps) / (1.0 - fraction))


@dataclass(frozen=True)
class Cooldown:
    budget: dict[str, Any]  # the parent's budget record it branches from
    end: int
    fraction: float
    command: tuple[str, ...]
    minutes: float  # estimated at the parent's pace

    @property
    def step(self) -> int:
        return int(self.budget["step"])


def branch_command(parent_overrides: str, ckpt: str | Path, end: int, fraction: float, run_name: str,
                   where: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """`python run.py <the parent's overrides> branch_from=<ckpt> ...`: the parent's recipe, keyed to steps."""
    from tasks.study import override_key

    where = [o for o in where if o.lstrip("+~").startswith(WHERE)]
    ours = [f"branch_from={ckpt}", f"trainer.max_steps={end}", "trainer.max_time=null", "trainer.max_epochs=-1",
            "optim.time_keyed=false", f"optim.decay_fraction={fraction!r}", f"logger.run_name={run_name}",
            "budget_at_end=true", "expected_steps=null", *where]  # fmt: skip
    drop = set(SET_HERE) | {override_key(o) for o in where}
    kept = [o for o in shlex.split(parent_overrides) if override_key(o) not in drop]
    return [sys.executable, str(ROOT / "run.py"), *kept, *ours]


def plan(parent: Any, budgets: Sequence[dict[str, Any]], anneal: float | None,
         where: Sequence[str] = ()) -> tuple[list[Cooldown], list[dict[str, Any]]]:  # fmt: skip
    """(cooldowns for the budgets at the peak lr, the budgets used as they are). `parent`: the MLflow run;
    `anneal`: the decay's share, None for the parent's own `optim.decay_fraction`."""
    params, tags = parent.data.params, parent.data.tags
    unset = (None, "", "None", "null")
    if params.get("optim.warmup_steps") in unset and params.get("optim.warmup_fraction") not in unset + ("0", "0.0"):
        raise SystemExit(
            f"anneal: run {parent.info.run_id} warms up over a fraction of its steps (optim.warmup_fraction="
            f"{params['optim.warmup_fraction']}), which moves with the cooldown's length; anneal needs "
            "optim.warmup_steps"
        )
    if "overrides" not in tags:
        raise SystemExit(f"anneal: run {parent.info.run_id} has no `overrides` tag, so its recipe cannot be rebuilt")
    warmup = 0 if params.get("optim.warmup_steps") in unset else int(float(params["optim.warmup_steps"]))
    fraction = anneal if anneal is not None else float(params.get("optim.decay_fraction") or 1.0)
    fraction = float(f"{fraction:.6g}")  # one value for the schedule, the command and finding the run again
    if fraction >= 1.0:
        raise SystemExit(
            f"anneal=true: run {parent.info.run_id} decays over its whole budget (optim.decay_fraction="
            f"{params.get('optim.decay_fraction')}), so its checkpoints are already on the decay; "
            "give the cooldown's share, e.g. anneal=0.2"
        )
    name = tags.get("mlflow.runName") or parent.info.run_id[:8]
    cooldowns, as_is = [], []
    for budget in budgets:
        step = int(budget["step"])
        if not at_peak(budget) or step <= warmup:
            as_is.append(budget)
            continue
        end = cooldown_end(step, warmup, fraction)
        per_step = float(budget.get("minutes") or 0.0) / max(step, 1)
        command = branch_command(tags.get("overrides", ""), budget["file"], end, fraction,
                                 f"{name}-cooldown{step}-to{end}", where)  # fmt: skip
        cooldowns.append(Cooldown(dict(budget), end, fraction, tuple(command), per_step * (end - step)))
    return cooldowns, as_is


def finished(client: Any, parent: Any, cooldown: Cooldown) -> Any | None:
    """A FINISHED cooldown of this budget file, end and share (made by an earlier study), or None. Keyed on the
    file, not on `branch_run_id`: a branch's budgets before its branch step are its parent's files."""
    query = f"tags.final_step = '{cooldown.end}' and attributes.status = 'FINISHED'"
    for run in client.search_runs([parent.info.experiment_id], filter_string=query,
                                  order_by=["attributes.end_time DESC"]):  # fmt: skip
        same_file = run.data.tags.get("branch_from") == str(cooldown.budget["file"])
        if same_file and math.isclose(float(run.data.params.get("optim.decay_fraction", "nan")), cooldown.fraction):
            return run
    return None


def run_cooldowns(client: Any, parent: Any, cooldowns: Sequence[Cooldown], lock_dir: Path,
                  say: Callable[[str], None] = print) -> list[dict[str, Any]]:  # fmt: skip
    """Make (or reuse) each cooldown, one at a time with every core (each is a pretraining run, its progress bar
    in this terminal), and return the budget record of its annealed end, naming where it came from."""
    from tasks.study import Children, key_lock, settle_after

    out, children = [], Children()
    for i, cooldown in enumerate(cooldowns, 1):
        label = f"cooldown {i}/{len(cooldowns)}: step {cooldown.step:,} -> {cooldown.end:,}"
        key = f"cooldown-{parent.info.run_id}-{cooldown.step}-{cooldown.end}-{cooldown.fraction:g}"
        with key_lock(lock_dir, key, f"study cooldown (pid {os.getpid()})", say):
            run = finished(client, parent, cooldown)
            if run is None:
                say(f"{label}, about {cooldown.minutes:.0f} min at the parent's pace: {shlex.join(cooldown.command)}")
                try:
                    returncode = children.run(cooldown.command, key, cwd=ROOT)
                except KeyboardInterrupt as stop:  # the branch gets SIGTERM: it saves and ends KILLED
                    children.stop(settle=settle_after(stop))
                    raise
                run = finished(client, parent, cooldown)
                if run is None:
                    raise SystemExit(f"{label} failed (exit {returncode}); its command: {shlex.join(cooldown.command)}")
            else:
                say(f"{label}: done before (run {run.info.run_id})")
        out.append(annealed_end(client, run, cooldown))
    return out


def annealed_end(client: Any, run: Any, cooldown: Cooldown) -> dict[str, Any]:
    """The budget record of a finished cooldown's last step, naming the budget it came from and its run."""
    from tasks.study import read_budgets

    ends = [b for b in read_budgets(client, run.info.run_id, "") if int(b["step"]) == cooldown.end]
    if not ends:
        raise SystemExit(f"cooldown run {run.info.run_id} kept no budget checkpoint at step {cooldown.end}")
    return {**ends[0], "cooldown_from": cooldown.step, "cooldown_run": run.info.run_id}
