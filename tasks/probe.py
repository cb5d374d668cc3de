"""Is it the representation or the fine-tuning? A linear probe of frozen encoders on a classification task.

    python -m tasks.probe <ckpt | run id> [...] [--task topic] [--folds 5] [--layers last|all] [--balanced]
                          [--no-scratch] [--seed 0] [--no-track] [key=value ...]

Fine-tuning changes the encoder and the head together, so when a pretrained checkpoint fine-tunes no better
than random init (topic, "Why" in the README) it cannot say whether the pretrained features lack what the task
needs or whether fine-tuning fails to use them. A linear probe (Alain & Bengio 2016) separates the two: the
encoder is frozen (dropout off), every example becomes the masked mean of a layer's token vectors (what
`task.pooling=mean` reads), and scikit-learn's multinomial logistic regression is fitted on the train split's
standardized features, its inverse regularisation C chosen by the split's val monitor. Rows: a random init
of the first encoder's shape (`scratch`, the seed's init as fine-tuning would start it) and each checkpoint;
cells: test macro F1 (the task's monitor), and class-mean F1 of the rarest classes (the `--rare` classes with
fewest train examples) and of the others. With `--folds N` the task's split rotates as in
`tasks.study folds=N`, so the numbers are comparable to a fold study's. It reads checkpoints (never runs code
from them) and trains nothing but the probes.

Tracked in MLflow (experiment `probe`; `--no-track` prints only): one parent run with `probe.md` (the table),
`probe.png` (test score by layer, each encoder a line; rarest classes and the rest) and `probe.json` (every
probe), and one nested run per encoder whose metrics `test/<monitor>`, `test/<monitor>_std`, `test/f1_rarest`,
`test/f1_others`, `val/<monitor>` are logged at step = layer (0 = embeddings), so MLflow's compare view draws
the encoders over depth. `key=value` arguments are Hydra overrides of the task's config (e.g. another store:
`paths.mlruns_dir=...`).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("BERT_PROJECT_ROOT", str(ROOT))

C_GRID = (0.001, 0.01, 0.1, 1.0)
EXPERIMENT = "probe"


@torch.no_grad()
def pooled_layers(bert: torch.nn.Module, loader: Any) -> list[torch.Tensor]:
    """[(N, C) per layer]: the masked mean over tokens of the embedding output and of every encoder layer."""
    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out))
             for m in (bert.embeddings, *bert.encoder.layer)]  # fmt: skip
    per_layer: list[list[torch.Tensor]] = [[] for _ in hooks]
    bert.eval()
    try:
        for batch in loader:
            captured.clear()
            bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
            mask = batch["attention_mask"].unsqueeze(-1).to(captured[0].dtype)
            for i, hidden in enumerate(captured):
                per_layer[i].append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(chunks) for chunks in per_layer]


def fit_probe(x: dict[str, np.ndarray], y: dict[str, np.ndarray], num_labels: int, monitor: str,
              balanced: bool = False, grid: Sequence[float] = C_GRID) -> dict[str, Any]:  # fmt: skip
    """Logistic regression on train, C by val `monitor` (accuracy | f1_macro); scores on val and test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from bert.metrics import char_confusion, classification_scores

    scaler = StandardScaler().fit(x["train"])
    z = {k: scaler.transform(v) for k, v in x.items()}
    best: dict[str, Any] | None = None
    for c in grid:
        model = LogisticRegression(C=c, max_iter=2000, class_weight="balanced" if balanced else None)
        model.fit(z["train"], y["train"])
        scores = {
            split: classification_scores(char_confusion(y[split], model.predict(z[split]), num_labels))
            for split in ("val", "test")
        }
        if best is None or scores["val"][monitor] > best["val"][monitor]:
            best = {"C": c, **scores}
    assert best is not None
    return best


def split_features(bert: torch.nn.Module, items: Sequence[dict[str, Any]], collate: Any,
                   cache: dict[tuple[int, ...], torch.Tensor], batch_size: int = 64) -> torch.Tensor:  # fmt: skip
    """(N, layers, C) pooled features of `items`; `cache` (input ids -> features) keeps what other folds, which
    re-split the same examples, already encoded, so each example is encoded once per encoder."""
    keys = [tuple(item["input_ids"].tolist()) for item in items]
    todo = list({k: item for k, item in zip(keys, items) if k not in cache}.items())
    batches = [collate([item for _, item in todo[i : i + batch_size]]) for i in range(0, len(todo), batch_size)]
    if batches:
        new = torch.stack(pooled_layers(bert, batches), dim=1)
        cache.update({k: row for (k, _), row in zip(todo, new)})
    return torch.stack([cache[k] for k in keys])


def probe(refs: Sequence[str], task: str = "topic", folds: int = 1, layers: str = "last", balanced: bool = False,
          scratch: bool = True, seed: int = 0, overrides: Sequence[str] = ()) -> list[dict[str, Any]]:  # fmt: skip
    """One row per (encoder, layer, fold): val and test scores of its probe, and the train label counts."""
    from hydra.utils import instantiate

    from tasks.diagnose import frozen_encoder, load_encoders
    from tasks.study import compose, fold_splits

    base = compose(task, list(overrides))
    if not list(base.task.labels):
        raise SystemExit(f"task {task} is a regression task; the probe is for classification (topic, nli)")
    monitor = str(base.task.monitor).split("/", 1)[1]
    encoders = load_encoders(refs, base.logger.tracking_uri, scratch)
    models = {name: frozen_encoder(path, ckpt, hparams, seed) for name, path, ckpt, hparams in encoders}
    caches: dict[str, dict[tuple[int, ...], torch.Tensor]] = {name: {} for name in models}
    rows = []
    for fold, split in enumerate(fold_splits(base.task.data.get("split"), folds, task)):
        cfg = compose(task, [*overrides, *split])
        data: dict[str, Any] = {}
        for name, _, _, hparams in encoders:
            tokenizer_dir = str(hparams["tokenizer_dir"])
            if tokenizer_dir not in data:
                dm = instantiate(cfg.task.data, tokenizer_dir=tokenizer_dir)
                dm.prepare_data()
                dm.setup("fit")
                data[tokenizer_dir] = dm
            dm = data[tokenizer_dir]
            splits = {s: dm.datasets[s].items for s in ("train", "val", "test")}
            feats = {s: split_features(models[name], items, dm.collate_fn, caches[name]) for s, items in splits.items()}
            y = {s: np.array([int(it["labels"]) for it in items]) for s, items in splits.items()}
            num_layers = feats["train"].shape[1]
            for layer in range(num_layers) if layers == "all" else [num_layers - 1]:
                x = {s: feats[s][:, layer].numpy() for s in feats}
                fit = fit_probe(x, y, len(dm.labels), monitor, balanced)
                rows.append({"encoder": name, "layer": layer, "fold": fold, "C": fit["C"], "monitor": monitor,
                             "val": fit["val"][monitor], "test": fit["test"][monitor],
                             "per_class": fit["test"]["per_class"],
                             "train_counts": np.bincount(y["train"], minlength=len(dm.labels)).tolist()})  # fmt: skip
            print(f"fold {fold}: {name} done", file=sys.stderr, flush=True)
    return rows


def summarize_rows(rows: Sequence[dict[str, Any]], rare: int = 4) -> list[dict[str, Any]]:
    """Per (encoder, layer): test mean ± sample std over folds; rare/other class F1 and val averaged over folds."""
    from tasks.study import summarize

    counts = np.asarray(rows[0]["train_counts"])  # the first fold's: the rarest classes are those in every fold
    rarest = set(np.argsort(counts, kind="stable")[:rare].tolist())
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["encoder"], r["layer"]), []).append(r)
    out = []
    for (encoder, layer), group in groups.items():
        mean, std = summarize([r["test"] for r in group])
        per_class = np.mean([r["per_class"] for r in group], axis=0)
        out.append({"encoder": encoder, "layer": layer, "n": len(group), "test": mean,
                    "test_std": None if std is None or math.isnan(std) else std,
                    "rare": float(np.mean([per_class[i] for i in rarest])),
                    "others": float(np.mean([f for i, f in enumerate(per_class) if i not in rarest])),
                    "val": float(np.mean([r["val"] for r in group])), "C": sorted({r["C"] for r in group})})  # fmt: skip
    return out


def table(rows: Sequence[dict[str, Any]], rare: int = 4) -> str:
    """Mean ± sample std over folds per (encoder, layer); rare/other class F1 averaged over folds."""
    lines = [f"| encoder | layer | test (± over folds) | rarest {rare} classes | other classes | val | C |",
             "|---|---:|---|---:|---:|---:|---|"]  # fmt: skip
    for g in summarize_rows(rows, rare):
        spread = "" if g["test_std"] is None else f" ± {g['test_std']:.3f}"
        lines.append(f"| {g['encoder']} | {'emb' if g['layer'] == 0 else g['layer']} | {g['test']:.3f}{spread} "
                     f"(n={g['n']}) | {g['rare']:.3f} | {g['others']:.3f} | {g['val']:.3f} | "
                     f"{','.join(f'{c:g}' for c in g['C'])} |")  # fmt: skip
    return "\n".join(lines)


def plot(summary: Sequence[dict[str, Any]], monitor: str, rare: int, out_png: Path, title: str) -> Path:
    """Left: test score by layer, one line per encoder (bars: std over folds). Right: class-mean F1 of the
    rarest classes (solid) and of the others (dashed): where fine-tuning loses a class, the frozen features may not."""
    from tasks.plots import pyplot, save_figure

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, encoder in enumerate(dict.fromkeys(g["encoder"] for g in summary)):
        points = sorted((g for g in summary if g["encoder"] == encoder), key=lambda g: g["layer"])
        xs = [g["layer"] + 0.04 * i for g in points]  # a nudge apart, so error bars of equal layers do not hide
        left.errorbar(xs, [g["test"] for g in points], yerr=[g["test_std"] or 0.0 for g in points], marker="o",
                      capsize=3, color=f"C{i}", label=encoder)  # fmt: skip
        right.plot(xs, [g["rare"] for g in points], marker="o", color=f"C{i}", label=f"{encoder}: rarest {rare}")
        right.plot(xs, [g["others"] for g in points], marker="s", linestyle="--", color=f"C{i}", label=f"{encoder}: others")
    for ax, ylabel in ((left, f"test {monitor} (linear probe)"), (right, "test class-mean F1")):
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel(ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)  # below: 2 lines per encoder
    return save_figure(fig, out_png, title, dpi=110)


def track(rows: Sequence[dict[str, Any]], args: argparse.Namespace, command: str,
          started: float | None = None) -> tuple[str, Path]:  # fmt: skip
    """The parent run (params, probe.md/.png/.json) and one nested run per encoder; returns (run id, out dir)."""
    import json

    from mlflow.tracking import MlflowClient

    from tasks import tracking
    from tasks.study import compose

    cfg = compose(args.task, args.overrides)
    uri = str(cfg.logger.tracking_uri)
    tracking.ensure_store(uri, cfg.logger.get("artifact_location"), experiments=(EXPERIMENT,))
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    monitor = rows[0]["monitor"]
    summary = summarize_rows(rows, args.rare)
    tags = {"task": args.task, "git_commit": tracking.git_commit(ROOT), "probe_command": command}
    start_ms = int(1000 * started) if started else None  # the probe's own duration in the UI, not the logging's
    parent = client.create_run(experiment_id, run_name=f"probe-{args.task}", tags=tags, start_time=start_ms).info.run_id
    params = {"task": args.task, "folds": args.folds, "layers": args.layers, "balanced": args.balanced,
              "rare": args.rare, "seed": args.seed, "encoders": " ".join(args.encoders), "C_grid": C_GRID}  # fmt: skip
    for key, value in params.items():
        client.log_param(parent, key, value)
    for encoder in dict.fromkeys(g["encoder"] for g in summary):
        child = client.create_run(experiment_id, run_name=encoder, start_time=start_ms,
                                  tags={**tags, "mlflow.parentRunId": parent, "probe_encoder": encoder}).info.run_id  # fmt: skip
        for g in (g for g in summary if g["encoder"] == encoder):
            metrics = {f"test/{monitor}": g["test"], "test/f1_rarest": g["rare"], "test/f1_others": g["others"],
                       f"val/{monitor}": g["val"], **({f"test/{monitor}_std": g["test_std"]} if g["test_std"] else {})}  # fmt: skip
            for key, value in metrics.items():
                client.log_metric(child, key, value, step=g["layer"])
        client.set_terminated(child)
    out_dir = Path(cfg.paths.root_dir) / "outputs" / "probe" / parent
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "probe.md").write_text(f"`{command}`\n\n{table(rows, args.rare)}\n", encoding="utf-8")
    (out_dir / "probe.json").write_text(json.dumps({"rows": list(rows), "summary": summary}, indent=2))
    over = f"{args.folds} folds" if args.folds > 1 else "the task's split"
    title = f"linear probe of frozen encoders on {args.task}, {over}{', balanced' if args.balanced else ''}"
    png = plot(summary, monitor, args.rare, out_dir / "probe.png", title)
    for path in (out_dir / "probe.md", out_dir / "probe.json", png):
        client.log_artifact(parent, str(path))
    client.set_terminated(parent)
    return parent, out_dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.probe", description=__doc__.split("\n")[0])
    parser.add_argument("encoders", nargs="+", help="checkpoint files or MLflow run ids (their best, else last, checkpoint); "
                        "key=value: a Hydra override of the task's config")  # fmt: skip
    parser.add_argument("--task", default="topic", help="a classification sentence task: topic | nli")
    parser.add_argument("--folds", type=int, default=1, help="rotate the split as `tasks.study folds=N`")
    parser.add_argument("--layers", choices=("last", "all"), default="last", help="probe the last layer or each")
    parser.add_argument("--balanced", action="store_true", help="class_weight='balanced' in the probe's loss")
    parser.add_argument("--rare", type=int, default=4, help="how many of the rarest train classes to report apart")
    parser.add_argument("--no-scratch", action="store_true", help="leave out the random-init row")
    parser.add_argument("--seed", type=int, default=0, help="the random init's seed")
    parser.add_argument("--no-track", action="store_true", help="print the table only, no MLflow run")
    started = time.time()
    args = parser.parse_intermixed_args(argv)  # options and positionals in any order
    args.overrides = [a for a in args.encoders if "=" in a and not Path(a).exists()]
    args.encoders = [a for a in args.encoders if a not in args.overrides]
    if not args.encoders:
        parser.error("name at least one checkpoint or run id")
    rows = probe(args.encoders, args.task, args.folds, args.layers, args.balanced, not args.no_scratch, args.seed,
                 args.overrides)  # fmt: skip
    print(table(rows, args.rare))
    if not args.no_track:
        command = shlex.join(["python", "-m", "tasks.probe", *(sys.argv[1:] if argv is None else argv)])
        run_id, out_dir = track(rows, args, command, started)
        print(f"MLflow run {run_id} (experiment '{EXPERIMENT}'): probe.md, probe.png, probe.json; also in {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
