"""How much does pretraining buy? Fine-tune every budget checkpoint of a pretraining run on every task.

    python -m tasks.study <pretraining run id> [tasks=ner,nli,sts,topic] [budgets=all|none|1000,3500]
        [seeds=3] [lrs=3e-4,1e-3] [folds=1] [arms=hf:<folder>,...] [scratch=true] [anneal=false|true|0.2]
        [extra_args="trainer.max_epochs=6"] [scratch_args="task.pooling=mean"]
        [pretrained_args="optim.freeze_encoder_fraction=0.33"] [out_dir=...] [dry_run=false] [jobs=1]

Arms: scratch (random init, same shape and tokenizer: the 0-minute point; keyed by shape and tokenizer, so
studies of same-shaped runs share it; `budgets=none` runs it alone), each budget checkpoint the run kept
(`keep_checkpoints_at_steps` / `checkpoint_every_minutes` in pretraining), and any `hf:<folder>` transformers
BERT as a named row. Each arm is fine-tuned on each task with the task's standard recipe (conf/task/<task>.yaml
+ conf/finetune.yaml + `extra_args`) at every learning rate in `lrs` and every seed; per arm and task, the
learning rate with the best mean validation monitor over seeds is chosen, and its test metric is reported as
mean ± sample std over seeds. A researcher would choose the learning rate the same way for each arm, so a
pretrained checkpoint and a random init are each compared at their own best one: they differ. Where scratch's
best recipe differs in more than the lr (a random [CLS] that never trains: mean pooling), `scratch_args` gives
the scratch arm its own overrides. `pretrained_args` are the other way round: overrides for the pretrained arms
only (budget checkpoints and `hf:` folders), for knobs that act on pretrained weights (LP-FT's
`optim.freeze_encoder_fraction`, `reinit_layers`, `optim.layer_decay`, `optim.anchor_decay`): scratch keeps the
plain recipe, so its runs are those of any study of that recipe (reused, not made again) and the table pairs
the two.

`folds=N` (N > 1) rotates each task's split N times (test_mod and val_mod move by modulus / N), so every example
is tested once in N folds rather than one fixed test split deciding the comparison: on a few hundred test
examples (topic has classes with 1 test petition, STS ~100 pairs) the split moves a metric more than the seed
does. Cells are then the mean over folds (each the mean over seeds) ± the sample std over folds, and an arm's
cell also gives its gain over the scratch row fold by fold (paired: both arms saw the same test examples):
mean ± std of the per-fold differences and the folds on which it is ahead. Fold 0 is the task's own split, so
its runs are the ordinary study's runs and are reused.

Every fine-tuning run is a plain `python run_finetune.py task=... pretrained=... seed=... optim.lr=...`
subprocess, nested in MLflow under one parent run of experiment `study` (tag `mlflow.parentRunId`), and tagged
`study_key`: a hash of what determines its result (task, the arm's checkpoint hash, seed, lr, recipe
overrides). Re-running the command skips every run whose key already FINISHED, so an interrupted study resumes;
two studies side by side on one store never make the same run twice (a lock per key under
`<mlruns>/study-locks/`: the later study makes its other runs first, then waits for the held one and reuses it).
`extra_args` entries that only say where things go (`paths.*`, `hydra.*`, `logger.*`) are not in the key.
Ctrl+C or SIGTERM stops a study: its runs in progress get SIGTERM and end KILLED, none starts after, and the
parent run ends KILLED; the same command resumes it.
The parent run gets `study.md` (the table), `study.png` (test metric against pretraining minutes, one panel per
task) and `study.json` (every run's numbers); the table is also printed. The table is also the parent run's
description, and its cells its metrics (`<task>/test`, `<task>/gain`, ...) at each arm's pretraining step, so
the MLflow UI draws the study's curves.

`anneal=true` (tasks/anneal.py): each budget a warmup-stable-decay run took at its peak lr is first decayed
in a short pretraining branch, as a run planned to end there would have been, and the annealed end is the arm
("step 3659 (cooldown from 2987)"), its minutes counting the cooldown's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("BERT_PROJECT_ROOT", str(ROOT))

EXPERIMENT = "study"
KEY_VERSION = 1  # bump when the meaning of a key changes, so old runs are not taken for new ones
ALL_TASKS = ("ner", "nli", "sts", "topic")
TEST_METRIC = {"ner": "test/entity_f1_macro", "nli": "test/accuracy", "sts": "test/pearson", "topic": "test/f1_macro"}
NOT_RECIPE = ("paths.", "hydra.", "logger.", "+paths.", "+hydra.", "+logger.")


# ------------------------------------------------------------------------------------------------------------
# what is run


@dataclass(frozen=True)
class Arm:
    """One starting point: scratch, a budget checkpoint, or a transformers folder."""

    name: str
    kind: str  # "scratch" | "budget" | "hf"
    overrides: tuple[str, ...]  # run_finetune.py overrides that select it
    identity: tuple[tuple[str, Any], ...]  # what goes into the study key
    step: int | None = None
    tokens: int | None = None
    minutes: float | None = None
    recipe: tuple[str, ...] = ()  # overrides for this arm only, after extra_args (scratch_args=, pretrained_args=)


@dataclass(frozen=True)
class Job:
    task: str
    arm: Arm
    seed: int
    lr: float
    key: str
    fold: int = 0
    split: tuple[str, ...] = ()  # the fold's split overrides (none for fold 0: the task's own split)


def recipe_overrides(extra_args: Sequence[str]) -> list[str]:
    """The overrides that change a result (not where files go)."""
    return [a for a in extra_args if not a.startswith(NOT_RECIPE)]


def override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def merge_overrides(base: Sequence[str], arm: Sequence[str]) -> list[str]:
    """`base` with an arm's own overrides after it; an arm's override of a key `base` sets replaces that entry
    (Hydra refuses one key twice), so a scratch arm at its own recipe is the run those overrides make by hand."""
    keys = {override_key(o) for o in arm}
    return [o for o in base if override_key(o) not in keys] + list(arm)


def study_key(task: str, arm_identity: Mapping[str, Any], seed: int, lr: float, recipe: Sequence[str],
              data_version: int | None = None) -> str:  # fmt: skip
    """A stable hash of what determines one fine-tuning result; equal keys = the run can be reused.
    `data_version` is the task config's (`task.data_version`): bumped when a task's split, labels or scoring change,
    so runs made before are not reused; absent = not in the key (keys made before it existed hold)."""
    content = {"v": KEY_VERSION, "task": task, "arm": dict(arm_identity), "seed": int(seed), "lr": float(lr),
               "recipe": list(recipe)}  # fmt: skip
    if data_version is not None:
        content["data"] = int(data_version)
    blob = json.dumps(content, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def file_sha256(path: Path, _cache: dict[Path, str] = {}) -> str:  # noqa: B006 - per-process memo on purpose
    path = Path(path).resolve()
    if path not in _cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _cache[path] = digest.hexdigest()
    return _cache[path]


def quote(value: Any) -> str:
    """A Hydra override value quoted so that paths with ':' ',' '=' stay one string."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def budget_arms(budgets: Sequence[Mapping[str, Any]], run_id: str, recipe: Sequence[str] = ()) -> list[Arm]:
    """`recipe`: overrides for the pretrained arms only (`pretrained_args=`)."""
    arms = []
    for b in budgets:
        path = Path(b["file"])
        run = b.get("cooldown_run") or run_id  # a cooldown's end (anneal=): its own run
        identity = (("kind", "budget"), ("run", run), ("step", int(b["step"])), ("sha256", file_sha256(path)))
        name = f"step {int(b['step'])}" + (f" (cooldown from {b['cooldown_from']})" if "cooldown_from" in b else "")
        arms.append(Arm(name, "budget", (f"pretrained={quote(path)}",), identity,
                        int(b["step"]), int(b.get("tokens", 0)), float(b.get("minutes", 0.0)), tuple(recipe)))  # fmt: skip
    return arms


def scratch_identity(like: Path) -> tuple[tuple[str, Any], ...]:
    """Random init is decided by shape and tokenizer, not by which run they were copied from: keyed so, two
    studies of same-shaped runs (e.g. a 30- and a 60-minute recipe) share one scratch arm."""
    from tasks import checkpoints

    hparams = checkpoints.meta(like)["hyper_parameters"]
    # pretraining dropout is not part of a random init: fine-tuning sets the encoder's (task.encoder_dropout)
    shape = {k: v for k, v in dict(hparams.get("model_config") or {}).items() if not k.endswith("dropout_prob")}
    tok = Path(str(hparams.get("tokenizer_dir") or ""))
    files = sorted(f for f in tok.glob("*") if f.is_file()) if tok.is_dir() else []
    return (("kind", "scratch"), ("shape", json.dumps(shape, sort_keys=True, default=str)),
            ("tokenizer", tuple((f.name, file_sha256(f)) for f in files)))  # fmt: skip


def scratch_arm(like: Path, recipe: Sequence[str] = ()) -> Arm:
    """`recipe`: overrides for scratch only (`scratch_args=`), e.g. mean pooling where [CLS] cannot train."""
    identity = scratch_identity(like)
    return Arm("scratch", "scratch", ("pretrained=null", f"scratch_like={quote(like)}"), identity, 0, 0, 0.0,
               tuple(recipe))  # fmt: skip


def hf_arm(ref: str, recipe: Sequence[str] = ()) -> Arm:
    from bert.convert import HF_PREFIX, WEIGHT_FILES

    folder = Path(ref.removeprefix(HF_PREFIX)).expanduser().resolve()
    files = [folder / n for n in ("config.json", "tokenizer.json", "vocab.txt", *WEIGHT_FILES) if (folder / n).is_file()]
    if not (folder / "config.json").is_file():
        raise SystemExit(f"arms={ref}: {folder} has no config.json (a transformers BERT folder is needed)")
    identity = (("kind", "hf"), ("files", tuple((f.name, file_sha256(f)) for f in files)))
    return Arm(f"hf:{folder.name}", "hf", (f"pretrained={quote(HF_PREFIX + str(folder))}",), identity,
               recipe=tuple(recipe))


def fold_splits(split: Mapping[str, Any] | None, folds: int, task: str = "task") -> list[tuple[str, ...]]:
    """The split overrides of each fold: test_mod and val_mod shifted by modulus / folds per fold, so the N test
    sets are disjoint and cover every residue once (fold 0 = the task's own split, no overrides)."""
    if folds == 1:
        return [()]
    if not split or "modulus" not in split:
        raise SystemExit(f"folds={folds}: task {task} has no task.data.split.modulus to rotate")
    modulus, test, val = int(split["modulus"]), int(split["test_mod"]), int(split["val_mod"])
    if folds < 1 or modulus % folds:
        raise SystemExit(f"folds={folds}: task {task}'s split modulus {modulus} is not a multiple of it")
    shift = modulus // folds
    out = [()]
    for f in range(1, folds):
        out.append((f"task.data.split.test_mod={(test + f * shift) % modulus}",
                    f"task.data.split.val_mod={(val + f * shift) % modulus}"))  # fmt: skip
    return out


def plan_jobs(tasks: Sequence[str], arms: Sequence[Arm], seeds: Sequence[int], lrs: Sequence[float],
              recipe: Sequence[str], data_versions: Mapping[str, int | None] | None = None,
              splits: Mapping[str, Sequence[tuple[str, ...]]] | None = None) -> list[Job]:  # fmt: skip
    """Every (task, arm, lr, fold, seed). An arm's own overrides and a fold's split join the recipe in the key:
    such a run is the same run as one made by hand with those overrides in extra_args."""
    versions, splits = data_versions or {}, splits or {}
    return [
        Job(task, arm, seed, lr,
            study_key(task, dict(arm.identity), seed, lr,
                      [*merge_overrides(recipe, recipe_overrides(arm.recipe)), *split], versions.get(task)),
            fold, split)
        for task in tasks
        for arm in arms
        for lr in lrs
        for fold, split in enumerate(splits.get(task, [()]))
        for seed in seeds
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# the table


@dataclass
class Cell:
    mean: float
    std: float | None  # sample std over seeds (over folds when folds > 1); None with one
    n: int
    lr: float
    val: float
    per_fold: dict[int, float] = field(default_factory=dict)  # fold -> mean test over its seeds (folds > 1)
    gain: tuple[float, float | None, int, int] | None = None  # vs scratch per fold: mean, std, ahead, folds
    versus: tuple[float, float, str] | None = None  # vs scratch without folds: gain, spread, verdict


@dataclass
class Row:
    arm: str
    kind: str
    minutes: float | None
    steps: int | None
    tokens: int | None
    cells: dict[str, Cell] = field(default_factory=dict)


def summarize(values: Sequence[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def choose(results: Mapping[float, Sequence[tuple[float, ...]]], mode: str) -> Cell | None:
    """{lr: [(val, test) or (val, test, fold) per run]} -> the lr with the best mean val, with its test mean ±
    std: over seeds, or with several folds the mean and sample std of the per-fold means (a fold's test set,
    not the seed, is what moves a small task's metric most)."""
    scored = {lr: runs for lr, runs in results.items() if runs}
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    lr = max(scored, key=lambda k: sign * summarize([r[0] for r in scored[k]])[0])
    runs = scored[lr]
    by_fold: dict[int, list[float]] = {}
    for run in runs:
        by_fold.setdefault(run[2] if len(run) > 2 else 0, []).append(run[1])
    val = summarize([r[0] for r in runs])[0]
    if len(by_fold) < 2:
        mean, std = summarize([r[1] for r in runs])
        return Cell(mean, std, len(runs), lr, val)
    per_fold = {f: summarize(tests)[0] for f, tests in sorted(by_fold.items())}
    mean, std = summarize(list(per_fold.values()))
    return Cell(mean, std, len(runs), lr, val, per_fold)


def paired_gain(cell: Cell, scratch: Cell) -> tuple[float, float | None, int, int] | None:
    """The arm minus scratch fold by fold, on the folds both have: (mean, sample std, folds ahead, folds)."""
    common = sorted(set(cell.per_fold) & set(scratch.per_fold))
    if len(common) < 2:
        return None
    diffs = [cell.per_fold[f] - scratch.per_fold[f] for f in common]
    mean, std = summarize(diffs)
    return mean, std, sum(d > 0 for d in diffs), len(common)


def against_scratch(mean: float, std: float | None, base: float, base_std: float | None) -> tuple[float, float, str]:
    """(gain, spread, verdict): a gain counts only past the larger of the two arms' seed spreads, the rule the
    README and `tasks.search` use, because on a few hundred test examples a lucky seed is the commonest gain."""
    gain, spread = mean - base, max(std or 0.0, base_std or 0.0)
    if std is None and base_std is None:
        return gain, spread, "one seed each: no spread"
    if gain > spread:
        return gain, spread, "beyond the spread"
    return gain, spread, "worse beyond the spread" if gain < -spread else "within the spread"


def human_tokens(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def format_cell(cell: Cell | None, lines: bool = False) -> str:
    """One line for study.md; `lines=True` puts the score, its runs and the gain on lines of their own, so the
    terminal table keeps each column narrow instead of wrapping a long cell mid-phrase."""
    if cell is None:
        return "–"
    spread = f" ± {cell.std:.3f}" if cell.std is not None else ""
    folds = f", {len(cell.per_fold)} folds" if cell.per_fold else ""
    parts = [f"{cell.mean:.3f}{spread}", f"(n={cell.n}{folds}, lr {cell.lr:g})"]
    if cell.gain is not None:
        mean, std, ahead, total = cell.gain
        parts.append(f"vs scratch {mean:+.3f}" + (f" ± {std:.3f}" if std is not None else "") + f", ahead {ahead}/{total}")
    elif cell.versus is not None:
        gain, spread, verdict = cell.versus
        parts.append(f"vs scratch {gain:+.3f}")
        parts.append(verdict + (f" ({spread:.3f})" if "no spread" not in verdict else ""))
    if lines:
        return "\n".join(parts)
    return f"{parts[0]} {parts[1]}" + "".join(f"; {part}" for part in parts[2:])


def row_label(row: Row) -> tuple[str, str, str]:
    minutes = "–" if row.minutes is None else f"{row.minutes:.1f}"
    steps = "–" if row.steps is None else f"{row.steps:,}"
    return minutes, steps, human_tokens(row.tokens)


def format_markdown(rows: Sequence[Row], tasks: Sequence[str], header: Mapping[str, str]) -> str:
    """study.md: one row per arm, one column per task's test metric."""
    lines = ["# Study: how much does pretraining buy?", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += [
        "- cells: test metric, mean ± sample std over seeds (n runs), at the learning rate with the best mean "
        "validation monitor for that arm and task; with folds, the mean and sample std over folds of each fold's "
        "mean, and the gain over scratch fold by fold (mean ± std of the paired differences, folds ahead); "
        "without folds, the gain over scratch and whether it is beyond the larger of the two seed spreads",
        "",
        "| arm | minutes | steps | tokens | " + " | ".join(f"{t} {TEST_METRIC.get(t, 'test')}" for t in tasks) + " |",
        "|---|---:|---:|---:|" + "---|" * len(tasks),
    ]
    for row in rows:
        minutes, steps, tokens = row_label(row)
        cells = " | ".join(format_cell(row.cells.get(t)) for t in tasks)
        lines.append(f"| {row.arm} | {minutes} | {steps} | {tokens} | {cells} |")
    return "\n".join(lines) + "\n"


DESCRIPTION_LIMIT = 8000  # MLflow's longest tag value; the run's description is the tag mlflow.note.content


def description(markdown: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """study.md as the parent run's description, so its Overview page in the MLflow UI shows the table rather than
    "No description": the table first (the UI folds a long description after a few lines), then the header
    without study.md's title (the run's name says it). A table too long for a tag is cut at a line and points
    to the artifact."""
    lines = [line for line in markdown.splitlines() if not line.startswith("# ")]
    table = [line for line in lines if line.startswith("|")]
    rest = [line for line in lines if not line.startswith("|")]
    markdown = "\n".join(table + rest).strip("\n") + "\n"
    if len(markdown) <= limit:
        return markdown
    tail = "\n\n(cut here: the whole table is the artifact study.md)\n"
    return markdown[: markdown.rfind("\n", 0, limit - len(tail))] + tail


def study_metrics(rows: Sequence[Row], tasks: Sequence[str]) -> list[tuple[str, float, int]]:
    """The table as (key, value, step) metrics of the parent run, each at its arm's pretraining step (scratch at
    0), so the MLflow UI charts `<task>/test` and `<task>/gain` against steps: the study's curve, and studies
    side by side in the runs table. `<task>/gain` is the arm minus scratch (paired over folds where there are
    folds). Arms without a step (hf: folders) stay in study.md only."""
    scratch = next((r for r in rows if r.kind == "scratch"), None)
    metrics = []
    for row in rows:
        if row.steps is None:
            continue
        for task in tasks:
            cell = row.cells.get(task)
            if cell is None:
                continue
            metrics += [(f"{task}/test", cell.mean, row.steps), (f"{task}/val", cell.val, row.steps)]
            if cell.std is not None:
                metrics.append((f"{task}/test_std", cell.std, row.steps))
            base = scratch.cells.get(task) if scratch is not None else None
            if row is scratch:
                metrics.append((f"{task}/gain", 0.0, row.steps))
            elif base is not None:
                gain = cell.gain[0] if cell.gain is not None else cell.mean - base.mean
                metrics.append((f"{task}/gain", gain, row.steps))
    return metrics


def log_to_parent(client, parent_id: str, markdown: str, rows: Sequence[Row], tasks: Sequence[str]) -> None:
    """Description and metrics of the study's parent run. A resumed study logs only values not already logged at
    that step, so the charts get no duplicate points."""
    from mlflow.entities import Metric

    client.set_tag(parent_id, "mlflow.note.content", description(markdown))
    now = int(time.time() * 1000)
    logged: dict[str, set[tuple[int, float]]] = {}
    new = []
    for key, value, step in study_metrics(rows, tasks):
        if key not in logged:
            logged[key] = {(m.step, m.value) for m in client.get_metric_history(parent_id, key)}
        if (step, float(value)) not in logged[key]:
            new.append(Metric(key, float(value), now, step))
    for start in range(0, len(new), 1000):  # MLflow takes at most 1,000 metrics a batch
        client.log_batch(parent_id, metrics=new[start : start + 1000])


def print_table(rows: Sequence[Row], tasks: Sequence[str], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=True)  # cells span lines: a rule between rows keeps arms apart
    for name in ("arm", "minutes", "steps", "tokens"):
        table.add_column(name, justify="left" if name == "arm" else "right")
    for task in tasks:
        table.add_column(f"{task}\n{TEST_METRIC.get(task, 'test')}", justify="right")
    for row in rows:
        table.add_row(row.arm, *row_label(row), *(format_cell(row.cells.get(t), lines=True) for t in tasks))
    Console().print(table)


def plot_title(run_id: str, recipe: Sequence[str], scratch_recipe: Sequence[str], seeds: Sequence[int],
               lrs: Sequence[float], folds: int, panels: int, pretrained_recipe: Sequence[str] = (),
               cooldowns: str = "") -> str:  # fmt: skip
    """What a reader of the picture alone needs to know the arms were made alike (or how not), wrapped to fit."""
    import textwrap

    seeds_text = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    over = f"{folds} folds x {seeds_text}" if folds > 1 else seeds_text
    lr_text = f"lr chosen on val of {', '.join(f'{lr:g}' for lr in lrs)}" if len(lrs) > 1 else f"lr {lrs[0]:g}"
    lines = [f"pretraining run {run_id}; {over}; {lr_text}", f"recipe: {' '.join(recipe) or 'each task standard'}"]
    if scratch_recipe:
        lines.append(f"scratch (0 min) also: {' '.join(scratch_recipe)}")
    if pretrained_recipe:
        lines.append(f"pretrained arms also: {' '.join(pretrained_recipe)}")
    if cooldowns:
        lines.append(f"budgets at the peak lr decayed first (cooldowns, {cooldowns})")
    width = int(4.4 * panels * 13)  # characters at fontsize 9 across the figure (110 dpi)
    return "\n".join(textwrap.fill(line, width, subsequent_indent="    ") for line in lines)


def plot(rows: Sequence[Row], tasks: Sequence[str], out_png: Path, title: str) -> Path:
    """Test metric against pretraining minutes, each point labelled with its steps, one panel per task;
    scratch at 0, hf arms as flat lines."""
    from tasks.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.4 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        points = [(r.minutes or 0.0, r.cells[task], r.steps, r.arm) for r in rows
                  if r.kind != "hf" and task in r.cells]  # fmt: skip
        curve = sorted(points, key=lambda point: point[0])  # by x only: Cells do not order
        if curve:
            xs = [m for m, *_ in curve]
            over = "folds" if any(c.per_fold for _, c, *_ in curve) else "seeds"
            ax.errorbar(xs, [c.mean for _, c, *_ in curve], yerr=[c.std or 0.0 for _, c, *_ in curve], marker="o",
                        capsize=3, label=f"this run (0 = scratch); bars: std over {over}")  # fmt: skip
            # minutes depend on the machine (and on what else ran on it); the steps say how far training got.
            # Labels sit left of their point, but the leftmost one's to the right, where the panel has room.
            for x, cell, steps, arm in curve:
                if steps:
                    text = f"{steps:,} steps" + (" (cooldown)" if "cooldown" in arm else "")
                    left = x == xs[0]
                    ax.annotate(text, (x, cell.mean), textcoords="offset points", xytext=(5 if left else -5, 4),
                                ha="left" if left else "right", fontsize=7)  # fmt: skip
        for i, row in enumerate(r for r in rows if r.kind == "hf" and task in r.cells):
            ax.axhline(row.cells[task].mean, linestyle="--", color=f"C{i + 1}", label=row.arm)
        ax.set_title(task)
        ax.set_xlabel("pretraining minutes (points: steps)")
        ax.set_ylabel(TEST_METRIC.get(task, "test metric"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, out_png, title, dpi=110)


# ------------------------------------------------------------------------------------------------------------
# MLflow and the runs


def compose(task: str, extra_args: Sequence[str]):
    """The fine-tuning config a child run will use (its store, monitor, paths), composed as Hydra would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("finetune", overrides=[f"task={task}", *extra_args])


def read_budgets(client, run_id: str, store_hint: str) -> list[dict[str, Any]]:
    """The run's `budgets.json` artifact, else the budget checkpoints beside its last checkpoint."""
    import tempfile

    from mlflow.exceptions import MlflowException

    from tasks.budgets import BUDGETS_ARTIFACT
    from tasks.budgets import read_budgets as read_from_files

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise SystemExit(f"run {run_id} is not in the MLflow store {store_hint}") from err
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, BUDGETS_ARTIFACT, tmp)
            budgets = json.loads(Path(local).read_text())
        except (MlflowException, OSError):
            budgets = []
    if not budgets and run.data.tags.get("last_ckpt"):
        budgets = read_from_files(Path(run.data.tags["last_ckpt"]).parent)
    present = [b for b in budgets if Path(b["file"]).is_file()]
    if len(present) < len(budgets):
        print(f"warning: {len(budgets) - len(present)} budget checkpoints of run {run_id} are gone from disk")
    return sorted(present, key=lambda b: b["step"])


def parent_run(client, experiment_id: str, spec: Mapping[str, Any], pretrain_run: str) -> tuple[str, bool]:
    """The study's parent run: the one with the same spec hash (resume), else a new one."""
    spec_sha = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    found = client.search_runs([experiment_id], filter_string=f"tags.study_spec = '{spec_sha}'",
                               order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id, True
    tags = {"study_spec": spec_sha, "pretrain_run": pretrain_run, "study_parent": "true"}
    run = client.create_run(experiment_id, run_name=f"study-{pretrain_run[:8]}", tags=tags)
    client.log_text(run.info.run_id, json.dumps(spec, indent=2, sort_keys=True), "study_spec.json")
    return run.info.run_id, False


def finished_run(client, experiment_id: str, key: str):
    runs = client.search_runs([experiment_id], filter_string=f"tags.study_key = '{key}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.end_time DESC"], max_results=1)  # fmt: skip
    return runs[0] if runs else None


def child_command(job: Job, parent_id: str, extra_args: Sequence[str], run_dir: Path) -> list[str]:
    slug = f"{job.task}-{job.arm.name.replace(' ', '').replace(':', '-').replace('/', '-')}-s{job.seed}-lr{job.lr:g}"
    slug += f"-fold{job.fold}" if job.fold else ""
    return [
        sys.executable, str(ROOT / "run_finetune.py"), f"task={job.task}", *merge_overrides(extra_args, job.arm.recipe),
        *job.split, *job.arm.overrides,
        f"seed={job.seed}", f"optim.lr={job.lr}", f"logger.experiment_name={EXPERIMENT}",
        f"logger.parent_run_id={quote(parent_id)}", f"logger.run_name={quote(slug)}",
        f"+logger.tags.study_key={quote(job.key)}", f"+logger.tags.study_arm={quote(job.arm.name)}",
        f"+logger.tags.study_parent={quote(parent_id)}",
        *([f"+logger.tags.study_fold={job.fold}"] if job.fold else []),
        f"hydra.run.dir={quote(run_dir / slug)}",
    ]  # fmt: skip


BUSY = "busy"  # run_unless_done's answer where another study holds the key and the caller would not wait


STOPPED = "stopped"  # a run the study did not start because it was told to stop


class Children:
    """The fine-tuning processes a study is running, so that a study that is stopped (Ctrl+C, SIGTERM) stops
    them too rather than leaving them training with no study to record them: each gets SIGTERM, which a run
    answers by saving and ending KILLED in MLflow (tasks/runner.py), and SIGKILL if it has not ended after
    `grace` seconds; a run not yet started is not started."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[subprocess.Popen, str] = {}
        self.keys: list[str] = []  # the study keys this study started a process for
        self.stopping = False

    def run(self, cmd: Sequence[str], key: str, **popen: Any) -> int | str:
        """The process's exit code, or `STOPPED` where the study is stopping and it was not started."""
        with self._lock:
            if self.stopping:
                return STOPPED
            proc = subprocess.Popen(cmd, **popen)
            self._live[proc] = key
            self.keys.append(key)
        code = proc.wait()  # interrupted (Ctrl+C in the main thread), it stays listed for stop()
        with self._lock:
            self._live.pop(proc, None)
        return code

    def stop(self, grace: float = 60.0, settle: float = 0.0) -> list[str]:
        """Stop every live process and start no other; the keys of those that were live. `settle`: seconds to
        let them end on their own first (a Ctrl+C in a terminal reaches the whole process group, children too)."""
        with self._lock:
            self.stopping = True
            live = dict(self._live)
        settled = time.monotonic() + settle
        for proc in live:
            _wait_until(proc, settled)
        for proc in live:
            if proc.poll() is None:
                proc.terminate()
        killed = time.monotonic() + grace
        for proc in live:
            if not _wait_until(proc, killed):
                proc.kill()
                proc.wait()
        return list(live.values())


def _wait_until(proc: subprocess.Popen, deadline: float) -> bool:
    """Whether `proc` ended by `deadline` (a `time.monotonic()` value)."""
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return False
    return True


@contextmanager
def key_lock(lock_dir: Path, key: str, owner: str, say: Callable[[str], None] = print, wait: bool = True,
             give_up: Callable[[], bool] = lambda: False, poll_s: float = 2.0) -> Iterator[bool]:  # fmt: skip
    """Hold the study key while its run is made, so two studies that share a store (scratch is shared by every
    study of a shape) never launch the same run twice. Yields whether it is held: with `wait`, always (after
    waiting for the other study) unless `give_up()` turns true meanwhile; without, False where another study
    holds it. An flock, so a study that dies lets go; one machine's studies."""
    import fcntl

    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{key}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another study"
            if not wait:
                say(f"{holder} is making run {key}: later")
                yield False
                return
            say(f"{holder} is making run {key}: waiting for it")
            while True:  # polled, not blocking, so that a study told to stop does not wait on in a thread
                if give_up():
                    yield False
                    return
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(poll_s)
        handle.seek(0)
        handle.truncate()
        handle.write(owner)
        handle.flush()
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_unless_done(job: Job, lock_dir: Path, owner: str, done: Callable[[], bool], make: Callable[[], int | str],
                    say: Callable[[str], None] = print, wait: bool = True,
                    give_up: Callable[[], bool] = lambda: False) -> int | str | None:  # fmt: skip
    """`make()`'s exit code; None where another study finished the run meanwhile (then it is reused); `BUSY`
    where another study is making it and `wait` is off (a study first makes the runs no one else is making), or
    where the study was stopped while it waited (`give_up`)."""
    with key_lock(lock_dir, job.key, owner, say, wait, give_up) as held:
        if not held:
            return BUSY
        if done():
            return None
        return make()


def val_score(client, run, monitor: str, mode: str) -> float | None:
    metrics = run.data.metrics
    if f"best/{monitor}" in metrics:
        return float(metrics[f"best/{monitor}"])
    history = [m.value for m in client.get_metric_history(run.info.run_id, monitor)]
    if not history:
        return None
    return max(history) if mode == "max" else min(history)


# ------------------------------------------------------------------------------------------------------------
# the command


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tasks.study", description=__doc__.split("\n")[0])
    parser.add_argument("run_id", help="MLflow run id (or a unique prefix) of a pretraining run with budget checkpoints")
    parser.add_argument("settings", nargs="*", metavar="key=value",
                        help="tasks= budgets= seeds= lrs= folds= arms= scratch= anneal= extra_args= scratch_args= "
                             "pretrained_args= out_dir= dry_run= jobs=")  # fmt: skip
    args = parser.parse_args(argv)
    known = {"tasks": None, "budgets": "all", "seeds": "3", "lrs": "3e-4,1e-3", "arms": "", "scratch": "true",
             "extra_args": "", "scratch_args": "", "pretrained_args": "", "out_dir": None, "dry_run": "false", "jobs": "1",
             "folds": "1", "anneal": "false"}  # fmt: skip
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            parser.error(f"unknown setting {item!r}: use key=value with key in {sorted(known)}")
        known[key] = value
    split = lambda text: [t.strip() for t in (text or "").split(",") if t.strip()]  # noqa: E731
    available = [t for t in ALL_TASKS if (ROOT / "conf" / "task" / f"{t}.yaml").is_file()]
    tasks = split(known["tasks"]) if known["tasks"] else available
    missing = [t for t in tasks if not (ROOT / "conf" / "task" / f"{t}.yaml").is_file()]
    if missing:
        parser.error(f"tasks {missing} have no conf/task/<task>.yaml (available: {available})")
    seeds = known["seeds"]
    ns = argparse.Namespace(
        run_id=args.run_id,
        tasks=tasks,
        # budgets=none: no checkpoint arms (scratch and hf arms only; scratch still copies a checkpoint's shape)
        budgets=None if known["budgets"] == "all" else [] if known["budgets"] == "none" else
        [int(s) for s in split(known["budgets"])],
        # seeds=3 means seeds 0, 1, 2; seeds=7,8 means those
        seeds=list(range(int(seeds))) if "," not in seeds else [int(s) for s in split(seeds)],
        lrs=[float(x) for x in split(known["lrs"])],
        arms=split(known["arms"]),
        scratch=known["scratch"].lower() in ("1", "true", "yes"),
        extra_args=shlex.split(known["extra_args"]),
        scratch_args=shlex.split(known["scratch_args"]),
        pretrained_args=shlex.split(known["pretrained_args"]),
        out_dir=known["out_dir"],
        dry_run=known["dry_run"].lower() in ("1", "true", "yes"),
        jobs=int(known["jobs"]),
        folds=int(known["folds"]),
        anneal=_anneal_setting(known["anneal"], parser),
        command="python -m tasks.study " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
    )  # fmt: skip
    if not ns.seeds or not ns.lrs:
        parser.error("seeds and lrs must name at least one value")
    if ns.jobs < 1:
        parser.error(f"jobs={ns.jobs}: run at least one fine-tuning run at a time")
    if ns.scratch_args and not ns.scratch:
        parser.error("scratch_args= applies to the scratch arm, and scratch=false leaves it out")
    for name in ("scratch_args", "pretrained_args"):
        per_run = [o for o in getattr(ns, name) if override_key(o) in ("optim.lr", "seed", "task", "pretrained", "scratch_like")]
        if per_run:
            parser.error(f"{name}={' '.join(per_run)}: the study sets these per run (lrs=, seeds=, tasks=, arms=)")
    if ns.folds < 1:
        parser.error(f"folds={ns.folds}: 1 is the task's own split, N > 1 rotates it N times")
    return ns


def _anneal_setting(text: str, parser: argparse.ArgumentParser) -> float | bool:
    """anneal=false -> False; true -> True (the run's own decay share); a number -> that share."""
    if text.lower() in ("false", "0", "no", ""):
        return False
    if text.lower() in ("true", "yes"):
        return True
    try:
        share = float(text)
    except ValueError:
        parser.error(f"anneal={text}: false, true (the run's own optim.decay_fraction) or a share in (0, 1)")
    if not 0.0 < share < 1.0:
        parser.error(f"anneal={text}: the cooldown's share of the annealed run's steps, in (0, 1)")
    return share


def _with_cooldowns(client, args: argparse.Namespace, budgets: list[dict[str, Any]],
                    lock_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:  # fmt: skip
    """anneal=: the budgets at the peak lr replaced by their cooldowns' ends (made now, or found), the others as
    they are; and a line per cooldown for the table's header. A dry run makes none and leaves out those not made."""
    from tasks import anneal

    parent = client.get_run(args.run_id)
    share = None if args.anneal is True else float(args.anneal)
    where = [a for a in args.extra_args if a.startswith(NOT_RECIPE)]
    planned, as_is = anneal.plan(parent, budgets, share, where)
    for budget in as_is:
        print(f"anneal: step {int(budget['step'])} was not taken at the peak lr after warmup (or its lr was not "
              "recorded): used as it is")
    if args.dry_run:
        ends = []
        for cooldown in planned:
            run = anneal.finished(client, parent, cooldown)
            print(f"anneal: step {cooldown.step} -> {cooldown.end}: " + (
                f"done before (run {run.info.run_id})" if run else
                f"would run, about {cooldown.minutes:.0f} min: {shlex.join(cooldown.command)}"))  # fmt: skip
            if run is not None:
                ends.append(anneal.annealed_end(client, run, cooldown))
    else:
        ends = anneal.run_cooldowns(client, parent, planned, lock_dir)
    lines = [f"step {e['cooldown_from']} -> {e['step']} (run `{e['cooldown_run']}`)" for e in ends]
    return sorted([*as_is, *ends], key=lambda b: int(b["step"])), lines


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    """Plan, launch what is not finished, tabulate. Returns {'launched', 'reused', 'failed', 'rows', ...}."""
    from mlflow.tracking import MlflowClient

    from tasks import tracking

    configs = {task: compose(task, args.extra_args) for task in args.tasks}
    first = configs[args.tasks[0]]
    uri, artifact_location = first.logger.tracking_uri, first.logger.get("artifact_location")
    if str(uri).startswith("sqlite:"):
        tracking.ensure_store(uri, artifact_location, experiments=(EXPERIMENT,))
    client = MlflowClient(uri)
    try:  # a unique prefix will do; the spec (and so resuming) keys on the full id
        args.run_id = tracking.resolve_run_id(client, args.run_id)
    except LookupError as err:
        raise SystemExit(f"run {args.run_id}: {err} in the MLflow store {uri}") from None

    budgets = all_budgets = read_budgets(client, args.run_id, uri)
    if args.budgets is not None:
        wanted = set(args.budgets)
        unknown = wanted - {b["step"] for b in budgets}
        if unknown:
            raise SystemExit(f"budgets={sorted(unknown)}: run {args.run_id} kept only steps {[b['step'] for b in budgets]}")
        budgets = [b for b in budgets if b["step"] in wanted]
    lock_dir = Path(first.paths.mlruns_dir) / "study-locks"
    cooldown_lines: list[str] = []
    if args.anneal is not False and budgets:
        budgets, cooldown_lines = _with_cooldowns(client, args, budgets, lock_dir)
    if args.dry_run and args.anneal is not False and not budgets:
        print("dry run: the cooldowns above come first; their fine-tuning runs are listed once they exist")
        return {"launched": 0, "reused": 0, "failed": [], "jobs": []}
    like_from = budgets or all_budgets
    if not budgets and not args.arms and not (args.budgets == [] and args.scratch):
        raise SystemExit(
            f"run {args.run_id} has no budget checkpoints: pretrain with keep_checkpoints_at_steps=[...] or "
            "checkpoint_every_minutes=<m> (see README, 'Study'), or pass arms=hf:<folder>"
        )
    arms: list[Arm] = []
    if args.scratch:
        like = Path(like_from[0]["file"]) if like_from else None
        if like is None:
            raise SystemExit("the scratch arm copies shape and tokenizer from a budget checkpoint: none found")
        arms.append(scratch_arm(like, args.scratch_args))
    pretrained_args = args.pretrained_args
    arms += budget_arms(budgets, args.run_id, pretrained_args)
    arms += [hf_arm(ref if ref.startswith("hf:") else f"hf:{ref}", pretrained_args) for ref in args.arms]
    if pretrained_args and all(a.kind == "scratch" for a in arms):
        raise SystemExit("pretrained_args= applies to the pretrained arms, and this study has none (budgets=none)")

    recipe = recipe_overrides(args.extra_args)
    versions = {task: cfg.task.get("data_version") for task, cfg in configs.items()}
    splits = {task: fold_splits(cfg.task.data.get("split"), args.folds, task) for task, cfg in configs.items()}
    jobs = plan_jobs(args.tasks, arms, args.seeds, args.lrs, recipe, versions, splits)
    spec = {"pretrain_run": args.run_id, "tasks": args.tasks, "arms": [a.name for a in arms], "seeds": args.seeds,
            "lrs": args.lrs, "recipe": recipe, "data_versions": versions}  # fmt: skip
    if args.folds > 1:  # only then: a one-fold study keeps the spec (and so the parent run) it always had
        spec["folds"] = args.folds
    scratch_recipe = recipe_overrides(args.scratch_args)
    if scratch_recipe:  # likewise: only a study with them has them in its spec
        spec["scratch_recipe"] = scratch_recipe
    pretrained_recipe = recipe_overrides(pretrained_args)
    if pretrained_recipe:
        spec["pretrained_recipe"] = pretrained_recipe
    if args.anneal is not False:
        spec["anneal"] = args.anneal
    folds = f" x {args.folds} folds" if args.folds > 1 else ""
    print(f"study of run {args.run_id}: {len(arms)} arms x {len(args.tasks)} tasks x {len(args.lrs)} lrs{folds} x "
          f"{len(args.seeds)} seeds = {len(jobs)} fine-tuning runs")  # fmt: skip
    if args.dry_run:
        for job in jobs:
            fold = f" fold {job.fold}" if args.folds > 1 else ""
            print(f"  {job.key}  {job.task:6s} {job.arm.name:24s} seed {job.seed} lr {job.lr:g}{fold}")
        return {"launched": 0, "reused": 0, "failed": [], "jobs": jobs}

    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parent_id, resumed = parent_run(client, experiment_id, spec, args.run_id)
    print(f"parent run {parent_id} in experiment '{EXPERIMENT}'" + (" (resumed)" if resumed else ""))
    out_dir = Path(args.out_dir or Path(first.paths.root_dir) / "outputs" / "study" / parent_id)
    out_dir.mkdir(parents=True, exist_ok=True)

    launched, reused, failed, found = 0, 0, [], {}
    todo = []
    for i, job in enumerate(jobs, 1):
        fold = f" fold {job.fold}" if args.folds > 1 else ""
        label = f"[{i}/{len(jobs)}] {job.task} {job.arm.name} seed {job.seed} lr {job.lr:g}{fold}"
        run = finished_run(client, experiment_id, job.key)
        if run is not None:
            reused += 1
            found[job.key] = run
            print(f"{label}: done before (run {run.info.run_id})")
        else:
            todo.append((label, job))
    # Side by side, each child gets an equal share of the cores (torch would otherwise start one thread per
    # core in every child and oversubscribe them); an explicit OMP_NUM_THREADS wins.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))

    owner = f"study {parent_id} (pid {os.getpid()})"
    children = Children()

    def launch(label: str, job: Job, wait: bool) -> tuple[str, Job, int | str | None, float]:
        cmd = child_command(job, parent_id, args.extra_args, out_dir / "runs")
        log_file = out_dir / "logs" / f"{job.key}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()

        def make() -> int | str:
            with open(log_file, "w") as log:
                return children.run(cmd, job.key, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)

        def done() -> bool:
            return finished_run(client, experiment_id, job.key) is not None

        def say(text: str) -> None:
            print(f"{label}: {text}")

        returncode = run_unless_done(job, lock_dir, owner, done, make, say, wait, lambda: children.stopping)
        return label, job, returncode, time.time() - started

    started = time.time()
    count, made_s = 0, []
    try:
        with progress_bar() as progress, ThreadPoolExecutor(max_workers=args.jobs) as pool:
            bar = progress.add_task("fine-tuning runs", total=len(todo))

            def report(label: str, job: Job, returncode: int | str | None, seconds: float) -> None:
                nonlocal count, launched, reused
                count += 1
                progress.advance(bar)
                run = finished_run(client, experiment_id, job.key)
                if returncode == 0 and run is not None:
                    made_s.append(seconds)
                left = time_left_note(time.time() - started, count, len(todo), made_s, args.jobs)

                def say(text: str) -> None:
                    progress.console.print(f"{label}: {text}{left}", soft_wrap=True, markup=False, highlight=False)

                if returncode is None and run is not None:  # another study made it while this one waited
                    reused += 1
                    found[job.key] = run
                    say(f"made by another study (run {run.info.run_id})")
                elif returncode != 0 or run is None:
                    launched += 1
                    log_file = out_dir / "logs" / f"{job.key}.log"
                    failed.append({"key": job.key, "label": label, "log": str(log_file), "returncode": returncode})
                    say(f"FAILED (exit {returncode}); log {log_file}")
                else:
                    launched += 1
                    found[job.key] = run
                    say(f"{seconds:.0f}s, run {run.info.run_id}")

            try:
                # first every run no other study is making; then, waiting, those another study was making
                later = []
                for label, job, returncode, seconds in pool.map(lambda item: launch(*item, wait=False), todo):
                    if returncode == BUSY:
                        later.append((label, job))
                    else:
                        report(label, job, returncode, seconds)
                for result in pool.map(lambda item: launch(*item, wait=True), later):
                    report(*result)
            except KeyboardInterrupt as stop:  # Ctrl+C, or SIGTERM (main): stop the runs, then end the parent
                progress.console.print("stopping: the runs in progress get SIGTERM and end KILLED ...")
                children.stop(settle=settle_after(stop))
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    except KeyboardInterrupt:
        end_stopped(client, experiment_id, parent_id, children.keys)
        print(f"study stopped: {count} of {len(todo)} runs ended this time, and the parent run {parent_id} is KILLED; "
              "the same command resumes it (finished runs are reused)")  # fmt: skip
        raise

    rows = tabulate(client, jobs, arms, found, configs)
    share = "" if args.anneal is False else "anneal=true: the run's own decay share" if args.anneal is True else \
        f"anneal={args.anneal:g}"
    title = plot_title(args.run_id, recipe, scratch_recipe, args.seeds, args.lrs, args.folds, len(args.tasks),
                       pretrained_recipe, share)
    header = {
        "pretraining run": f"`{args.run_id}`",
        "study run": f"`{parent_id}` (experiment `{EXPERIMENT}`)",
        "seeds": ", ".join(map(str, args.seeds)),
        "learning rates": ", ".join(f"{lr:g}" for lr in args.lrs),
        **({"folds": f"{args.folds} (each task's split rotated; fold 0 is its own)"} if args.folds > 1 else {}),
        "recipe overrides": f"`{' '.join(recipe)}`" if recipe else "none (each task's standard recipe)",
        **({"scratch's own overrides": f"`{' '.join(scratch_recipe)}`"} if scratch_recipe else {}),
        **({"pretrained arms' own overrides": f"`{' '.join(pretrained_recipe)}`"} if pretrained_recipe else {}),
        **({"cooldowns (anneal=)": ", ".join(cooldown_lines) or "none: no budget was at the peak lr"}
           if args.anneal is not False else {}),
        "command": f"`{args.command}`",
    }
    markdown = format_markdown(rows, args.tasks, header)
    (out_dir / "study.md").write_text(markdown, encoding="utf-8")
    results = [{"key": k, "run_id": r.info.run_id, "metrics": dict(r.data.metrics), "tags": {
        t: v for t, v in r.data.tags.items() if t.startswith("study_")}} for k, r in found.items()]  # fmt: skip
    (out_dir / "study.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "runs": results,
                                                    "failed": failed}, indent=2))  # fmt: skip
    png = plot(rows, args.tasks, out_dir / "study.png", title)
    for path in (out_dir / "study.md", out_dir / "study.json", png):
        client.log_artifact(parent_id, str(path))
    log_to_parent(client, parent_id, markdown, rows, args.tasks)
    print_table(rows, args.tasks, title)
    print(f"launched {launched}, reused {reused}, failed {len(failed)}; study.md and study.png in {out_dir} "
          f"and in MLflow run {parent_id}")  # fmt: skip
    client.set_terminated(parent_id, status="FAILED" if failed else "FINISHED")
    return {"launched": launched, "reused": reused, "failed": failed, "rows": rows, "parent_run_id": parent_id,
            "out_dir": out_dir, "jobs": jobs}  # fmt: skip


def tabulate(client, jobs: Sequence[Job], arms: Sequence[Arm], found: Mapping[str, Any], configs) -> list[Row]:
    rows = []
    for arm in arms:
        row = Row(arm.name, arm.kind, arm.minutes, arm.step, arm.tokens)
        for task, cfg in configs.items():
            monitor, mode = cfg.task.monitor, cfg.task.get("monitor_mode", "max")
            metric = TEST_METRIC.get(task, f"test/{str(monitor).split('/', 1)[-1]}")
            per_lr: dict[float, list[tuple[float, float, int]]] = {}
            for job in jobs:
                if job.arm != arm or job.task != task:
                    continue
                per_lr.setdefault(job.lr, [])
                run = found.get(job.key)
                if run is None or metric not in run.data.metrics:
                    continue
                val = val_score(client, run, monitor, mode)
                if val is not None:
                    per_lr[job.lr].append((val, float(run.data.metrics[metric]), job.fold))
            cell = choose(per_lr, mode)
            if cell is not None:
                row.cells[task] = cell
        rows.append(row)
    set_gains(rows)
    return rows


def set_gains(rows: Sequence[Row]) -> None:
    """Every cell against scratch's on its task: paired over folds where both have them, else the verdict."""
    scratch = next((r for r in rows if r.kind == "scratch"), None)
    for row in rows:
        for task, cell in row.cells.items():
            if scratch is not None and row is not scratch and task in scratch.cells:
                base = scratch.cells[task]
                cell.gain = paired_gain(cell, base)
                if cell.gain is None:
                    cell.versus = against_scratch(cell.mean, cell.std, base.mean, base.std)


def progress_bar() -> Any:
    """The study's bar: runs done of those to launch, time spent and left (a study is hours on 2 cores)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def time_left_note(elapsed_s: float, done: int, total: int, run_s: Sequence[float] = (), jobs: int = 1) -> str:
    """'; 10 to go, about 1 h 5 min left', for the job lines. From the mean time of the runs made so far, `jobs`
    side by side (the pace so far would count the first of two runs finishing together as the only one done);
    the pace so far where none was made here (all made by another study)."""
    from tasks.summary import minutes

    if done >= total:
        return ""
    to_go = total - done
    seconds = sum(run_s) / len(run_s) * to_go / max(1, jobs) if run_s else elapsed_s / done * to_go
    return f"; {to_go} to go, about {minutes(seconds)} left"


def end_stopped(client, experiment_id: str, parent_id: str, keys: Sequence[str]) -> None:
    """A stopped study's record: its parent run KILLED, and so is any run it started that a signal ended before
    the run could say so itself (during its start-up, or SIGKILLed after the grace), rather than RUNNING for ever
    in the MLflow UI."""
    for key in keys:
        for run in client.search_runs([experiment_id], f"tags.study_key = '{key}' and attributes.status = 'RUNNING'"):
            client.set_terminated(run.info.run_id, status="KILLED")
    client.set_terminated(parent_id, status="KILLED")


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt("SIGTERM")


def settle_after(stop: KeyboardInterrupt) -> float:
    """Seconds to let children end on their own: a Ctrl+C reached them too (one process group), a SIGTERM
    (`_stop_on_sigterm`) only this process."""
    return 0.0 if stop.args == ("SIGTERM",) else 30.0


def main(argv: Sequence[str] | None = None) -> int:
    """The command. SIGTERM (`kill`, a job scheduler) stops a study as Ctrl+C does: its runs end KILLED, then it."""
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        result = run_study(parse_args(argv))
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
