"""The end-of-run summary: what ran, why it stopped, what it reached, where it is, and what to type next.

Printed by both entry points and stored as the MLflow run description (tag `mlflow.note.content`), so the
terminal and the UI tell the same story.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePath

from tasks.tracking import UI_VIEW_QUERY

DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default


@dataclass
class RunSummary:
    task: str  # "pretrain", "finetune-ner", ...
    stop_reason: str  # tasks.runner.stop_reason: max_steps | max_time | early_stop | sigterm | interrupted ...
    final_step: int
    monitor: str | None = None
    best_value: float | None = None
    best_step: int | None = None
    run_name: str | None = None
    run_id: str | None = None
    experiment_id: str | None = None
    tracking_uri: str | None = None
    best_ckpt: str | None = None
    last_ckpt: str | None = None
    limits: dict[str, object] = field(default_factory=dict)  # max_steps / max_time as configured
    notes: list[str] = field(default_factory=list)  # e.g. tasks.pace: the steps a minute, against the recipe's

    def ui_commands(self) -> list[str]:
        """How to look at the run: the local UI command (or the remote server) and the run's URL."""
        if self.run_id is None or self.tracking_uri is None:
            return []
        if self.tracking_uri.startswith(("http://", "https://")):
            base, start = self.tracking_uri.rstrip("/"), []
        else:
            base, start = DEFAULT_UI, [f"mlflow ui --backend-store-uri {self.tracking_uri}"]
        url = f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}?{UI_VIEW_QUERY}"
        return [*start, f"then open {url}"]

    def next_commands(self) -> list[str]:
        ref = self.run_id or self.best_ckpt or self.last_ckpt
        if ref is None:
            return self.ui_commands()
        # a run's name, or its run id's start, or (logger=none) the run folder the checkpoint is in
        out = self.run_name or (ref[:8] if self.run_id else PurePath(ref).parent.parent.name or "model")
        if self.task == "pretrain":
            follow = [
                f"python run_finetune.py task=ner pretrained={ref}   # fine-tune from this run",
                f"python -m bert.export {ref} exports/{out}   # a transformers folder",
            ]
        elif self.task in ("finetune-ner", "ner"):
            follow = [f'python -m tasks.predict ner {ref} "이순신은 1545년 서울에서 태어났다."   # tag a sentence']
        else:
            task = self.task.removeprefix("finetune-")
            follow = [f'python -m tasks.predict {task} {ref} "..."   # predict on raw text (see README)']
            if task != "ner":
                follow.append(f"python -m bert.export {ref} exports/{out}   # a transformers folder")
        if self.stop_reason in ("interrupted", "sigterm", "error", "max_time") and self.run_id:
            script = "run.py" if self.task == "pretrain" else "run_finetune.py"
            follow.insert(0, f"python {script} <same overrides> ckpt_path=last   # continue this run")
        return [*self.ui_commands(), *follow]

    def text(self) -> str:
        lines = []
        name = self.run_name or "(no MLflow run: logger=none)"
        ident = f" (run id {self.run_id}, experiment {self.experiment_id})" if self.run_id else ""
        lines.append(f"Run {name}{ident}")
        limits = ", ".join(f"{k}={v}" for k, v in self.limits.items() if v not in (None, -1))
        lines.append(
            f"Stopped: {self.stop_reason} at step {self.final_step:,}" + (f" ({limits})" if limits else "")
        )
        if self.monitor is not None:
            if self.best_value is None:
                lines.append(f"Best {self.monitor}: not measured (no validation ran)")
            else:
                lines.append(f"Best {self.monitor}: {self.best_value:.4f} at step {self.best_step:,}")
        lines.extend(self.notes)
        if self.best_ckpt:
            lines.append(f"Best checkpoint: {self.best_ckpt}")
        if self.last_ckpt:
            lines.append(f"Last checkpoint: {self.last_ckpt}")
        commands = self.next_commands()
        if commands:
            lines.append("Next:")
            lines.extend(f"  {c}" for c in commands)
        return "\n".join(lines)


def minutes(seconds: float) -> str:
    """'3 h 20 min' / '12 min' / '40 s': durations as a user plans with them."""
    if seconds < 59.5:
        return f"{seconds:.0f} s"
    total = round(seconds / 60)
    return f"{total // 60} h {total % 60} min" if total >= 60 else f"{total} min"


def banner(text: str, lines: Sequence[str] = ()) -> str:
    """The summary framed, so it stands out of the progress bar and the logs above it."""
    rule = "─" * 72
    return "\n".join([rule, text, *lines, rule])
