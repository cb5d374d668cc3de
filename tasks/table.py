"""Pretrained-vs-scratch table of a fine-tuning sweep, from the MLflow store:
`python -m tasks.table finetune-nli [--metrics test/accuracy ...] [--filter "tags.git_commit LIKE 'abc%'"]`.

Runs are grouped into arms by how the encoder started (`init` tag: pretrained / scratch, and the checkpoint
it came from or copied its shape from), then by learning rate (`optim.lr`). Each arm's learning rate is the
one with the best mean validation score over its seeds (`best/<task.monitor>`: the best validation value the
run reached, at which its test metrics were taken); the table shows that learning rate's test metrics as
mean ± sample standard deviation over seeds, with the range. Only FINISHED runs count.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks.tracking import _client, default_tracking_uri

DEFAULT_METRICS = {
    "nli": ["test/accuracy", "test/f1_macro"],
    "topic": ["test/accuracy", "test/f1_macro"],
    "sts": ["test/pearson", "test/spearman", "test/f1"],
    "ner": ["test/entity_f1_micro", "test/entity_f1_macro", "test/char_f1_klue"],
}


@dataclass
class Run:
    arm: str
    lr: float
    seed: str
    select: float | None  # the validation score the learning rate is chosen on
    metrics: dict[str, float]


@dataclass
class ArmRow:
    arm: str
    lr: float
    n: int
    select_mean: float
    others: dict[float, float]  # other learning rates: their mean validation score
    metrics: dict[str, tuple[float, float, float, float]]  # metric -> (mean, sd, min, max)


def summarize(runs: Sequence[Run], metrics: Sequence[str], higher_is_better: bool = True) -> list[ArmRow]:
    """Per arm: pick the learning rate by mean validation score, then mean / sd / range of each metric."""
    by_arm: dict[str, dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.select is not None:
            by_arm[run.arm][run.lr].append(run)
    rows = []
    for arm in sorted(by_arm):
        means = {lr: statistics.fmean(r.select for r in group) for lr, group in by_arm[arm].items()}
        best = (max if higher_is_better else min)(means, key=means.get)
        chosen = by_arm[arm][best]
        stats = {}
        for key in metrics:
            values = [r.metrics[key] for r in chosen if key in r.metrics]
            if values:
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                stats[key] = (statistics.fmean(values), sd, min(values), max(values))
        others = {lr: m for lr, m in sorted(means.items()) if lr != best}
        rows.append(ArmRow(arm, best, len(chosen), means[best], others, stats))
    return rows


def arm_name(tags: Mapping[str, str]) -> str:
    source = tags.get("pretrained_run") or Path(tags.get("pretrained_ckpt") or "").stem or "preset"
    return f"{tags.get('init', '?')} ({source[:12]})"


def load_runs(experiment: str, tracking_uri: str, filter_string: str = "") -> tuple[list[Run], str, str]:
    """FINISHED runs of the experiment -> (runs, monitor key, monitor mode)."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment '{experiment}' in {tracking_uri}")
    query = "attributes.status = 'FINISHED'" + (f" and {filter_string}" if filter_string else "")
    found = client.search_runs([exp.experiment_id], filter_string=query, max_results=5000)
    if not found:
        raise SystemExit(f"no FINISHED run in '{experiment}' matching {query!r}")
    monitor = found[0].data.params.get("task.monitor", "")
    mode = found[0].data.params.get("task.monitor_mode", "max")
    runs = [
        Run(
            arm=arm_name(r.data.tags),
            lr=float(r.data.params.get("optim.lr", "nan")),
            seed=r.data.params.get("seed", "?"),
            select=r.data.metrics.get(f"best/{monitor}"),
            metrics=dict(r.data.metrics),
        )
        for r in found
    ]
    return runs, monitor, mode


def format_table(rows: Sequence[ArmRow], metrics: Sequence[str], monitor: str) -> str:
    header = ["arm", "lr (val-selected)", "seeds", f"val {monitor} (mean)", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        others = ", ".join(f"{lr:g}: {m:.3f}" for lr, m in row.others.items())
        cells = [row.arm, f"{row.lr:g}" + (f" ({others})" if others else ""), str(row.n), f"{row.select_mean:.3f}"]
        for key in metrics:
            if key in row.metrics:
                mean, sd, lo, hi = row.metrics[key]
                cells.append(f"{mean:.3f} ± {sd:.3f} ({lo:.3f}–{hi:.3f})")
            else:
                cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.table", description=__doc__.split("\n")[0])
    parser.add_argument("experiment", help="e.g. finetune-nli")
    parser.add_argument("--metrics", nargs="+", help="test metrics to show (default: the task's)")
    parser.add_argument("--filter", default="", help="extra MLflow filter, e.g. \"tags.git_commit LIKE 'abc%%'\"")
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    runs, monitor, mode = load_runs(args.experiment, uri, args.filter)
    metrics = args.metrics or DEFAULT_METRICS.get(args.experiment.removeprefix("finetune-"), [])
    rows = summarize(runs, metrics, higher_is_better=mode != "min")
    print(format_table(rows, metrics, monitor))


if __name__ == "__main__":
    main()
