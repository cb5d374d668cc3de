"""Compare runs of the MLflow store against wall-clock time: `python -m tasks.compare <run id|name prefix> ...`.

Recipes that differ in step cost (tiny vs mini, seq 64 vs 128) can only be compared against wall time, which the
MLflow UI does not plot from our step-indexed metrics. This prints, per run, the last value of each metric and
when (step, minutes since the run started, data preparation included) it first reached `--target`, and draws
the metrics against minutes.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tasks.tracking import _client, default_tracking_uri, resolve_run_id


@dataclass
class RunCurves:
    run_id: str
    name: str
    params: dict[str, str]
    # {metric: [(step, minutes since run start, value), ...]} sorted by step
    curves: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)


def load_runs(
    refs: Iterable[str], metrics: Sequence[str], tracking_uri: str, until_minutes: float | None = None
) -> list[RunCurves]:
    """Each ref is a run id, a run-name prefix (every run of that prefix, oldest first) or a unique run-id prefix."""
    client = _client(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = []
    for ref in refs:
        found = client.search_runs(experiments, filter_string=f"attributes.run_id = '{ref}'") if len(ref) == 32 else []
        if not found:
            found = client.search_runs(
                experiments, filter_string=f"attributes.run_name LIKE '{ref}%'", order_by=["attributes.start_time ASC"]
            )
        if not found:  # a run-id prefix, as the tables print them
            try:
                found = [client.get_run(resolve_run_id(client, ref, experiments))]
            except LookupError as err:
                raise SystemExit(f"no run name starting with '{ref}' in {tracking_uri}, and as a run id: {err}") from None
        runs.extend(found)
    out = []
    for run in runs:
        curves = RunCurves(run.info.run_id, run.info.run_name, dict(run.data.params))
        for key in metrics:
            history = client.get_metric_history(run.info.run_id, key)
            points = sorted((m.step, (m.timestamp - run.info.start_time) / 60_000, m.value) for m in history)
            if until_minutes is not None:  # compare recipes at equal wall time
                points = [p for p in points if p[1] <= until_minutes]
            if points:
                curves.curves[key] = points
        out.append(curves)
    return out


def first_reaching(
    points: Sequence[tuple[int, float, float]], target: float, higher_is_better: bool
) -> tuple[int, float] | None:
    """(step, minutes) of the first point at or past `target`, or None."""
    for step, minutes, value in points:
        if (value >= target) if higher_is_better else (value <= target):
            return step, minutes
    return None


def table(runs: Sequence[RunCurves], metrics: Sequence[str], target_metric: str | None, target: float | None) -> str:
    higher = target_metric is not None and not target_metric.endswith(("loss", "ppl"))
    header = ["run", "steps", "minutes", *metrics]
    if target_metric is not None:
        header.append(f"{target_metric} {'≥' if higher else '≤'} {target}")
    rows = [header, ["---"] * len(header)]
    for run in runs:
        last = [run.curves[m][-1] if m in run.curves else None for m in metrics]
        ends = [p for p in last if p is not None]
        row = [
            run.name,
            str(max(p[0] for p in ends) + 1) if ends else "-",
            f"{max(p[1] for p in ends):.1f}" if ends else "-",
            *(f"{p[2]:.3f}" if p is not None else "-" for p in last),
        ]
        if target_metric is not None:
            hit = first_reaching(run.curves.get(target_metric, []), target, higher)
            row.append(f"step {hit[0] + 1}, {hit[1]:.1f} min" if hit else "not reached")
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def plot(runs: Sequence[RunCurves], metrics: Sequence[str], out: Path, target: tuple[str, float] | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6), squeeze=False)
    for ax, key in zip(axes[0], metrics):
        for run in runs:
            if key in run.curves:
                _, minutes, values = zip(*run.curves[key])
                ax.plot(minutes, values, marker="o", markersize=2.5, label=run.name)
        if target is not None and target[0] == key:
            ax.axhline(target[1], color="grey", linestyle="--", linewidth=1)
        ax.set_title(key)
        ax.set_xlabel("minutes since run start")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run ids, run-name prefixes or unique run-id prefixes")
    parser.add_argument("--metrics", nargs="+", default=["val/mlm_loss", "val/nsp_acc"])
    parser.add_argument("--target", nargs=2, metavar=("METRIC", "VALUE"), default=["val/nsp_acc", "0.75"])
    parser.add_argument("--until", type=float, metavar="MINUTES", help="cut every run at this wall time")
    parser.add_argument("--out", type=Path, help="PNG of the metrics against minutes")
    parser.add_argument("--tracking-uri", default=default_tracking_uri())
    args = parser.parse_args(argv)
    target_metric, target = args.target[0], float(args.target[1])
    metrics = list(dict.fromkeys([*args.metrics, target_metric]))
    runs = load_runs(args.runs, metrics, args.tracking_uri, args.until)
    print(table(runs, args.metrics, target_metric, target))
    if args.out is not None:
        print(f"plot: {plot(runs, args.metrics, args.out, (target_metric, target))}")


if __name__ == "__main__":
    main()
