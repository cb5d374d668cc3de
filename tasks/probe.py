"""Is it the representation or the fine-tuning? A linear probe of frozen encoders on a classification task.

    python -m tasks.probe <ckpt | run id> [...] [--task topic] [--folds 5] [--layers last|all] [--balanced]
                          [--no-scratch] [--seed 0]

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
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("BERT_PROJECT_ROOT", str(ROOT))

C_GRID = (0.001, 0.01, 0.1, 1.0)


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
          scratch: bool = True, seed: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    """One row per (encoder, layer, fold): val and test scores of its probe, and the train label counts."""
    from hydra.utils import instantiate

    from tasks.diagnose import frozen_encoder, load_encoders
    from tasks.study import compose, fold_splits

    base = compose(task, [])
    if not list(base.task.labels):
        raise SystemExit(f"task {task} is a regression task; the probe is for classification (topic, nli)")
    monitor = str(base.task.monitor).split("/", 1)[1]
    encoders = load_encoders(refs, base.logger.tracking_uri, scratch)
    models = {name: frozen_encoder(path, ckpt, hparams, seed) for name, path, ckpt, hparams in encoders}
    caches: dict[str, dict[tuple[int, ...], torch.Tensor]] = {name: {} for name in models}
    rows = []
    for fold, split in enumerate(fold_splits(base.task.data.get("split"), folds, task)):
        cfg = compose(task, list(split))
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
                rows.append({"encoder": name, "layer": layer, "fold": fold, "C": fit["C"],
                             "val": fit["val"][monitor], "test": fit["test"][monitor],
                             "per_class": fit["test"]["per_class"],
                             "train_counts": np.bincount(y["train"], minlength=len(dm.labels)).tolist()})  # fmt: skip
            print(f"fold {fold}: {name} done", file=sys.stderr, flush=True)
    return rows


def table(rows: Sequence[dict[str, Any]], rare: int = 4) -> str:
    """Mean ± sample std over folds per (encoder, layer); rare/other class F1 averaged over folds."""
    from tasks.study import summarize

    counts = np.asarray(rows[0]["train_counts"])  # the first fold's: the rarest classes are those in every fold
    rarest = set(np.argsort(counts, kind="stable")[:rare].tolist())
    lines = [f"| encoder | layer | test (± over folds) | rarest {rare} classes | other classes | val | C |",
             "|---|---:|---|---:|---:|---:|---|"]  # fmt: skip
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["encoder"], r["layer"]), []).append(r)
    for (encoder, layer), group in groups.items():
        mean, std = summarize([r["test"] for r in group])
        per_class = np.mean([r["per_class"] for r in group], axis=0)
        rare_f1 = float(np.mean([per_class[i] for i in rarest]))
        other_f1 = float(np.mean([f for i, f in enumerate(per_class) if i not in rarest]))
        val = float(np.mean([r["val"] for r in group]))
        spread = "" if std is None or math.isnan(std) else f" ± {std:.3f}"
        cs = ",".join(sorted({f"{r['C']:g}" for r in group}))
        lines.append(f"| {encoder} | {'emb' if layer == 0 else layer} | {mean:.3f}{spread} (n={len(group)}) | "
                     f"{rare_f1:.3f} | {other_f1:.3f} | {val:.3f} | {cs} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.probe", description=__doc__.split("\n")[0])
    parser.add_argument("encoders", nargs="+", help="checkpoint files or MLflow run ids (their last checkpoint)")
    parser.add_argument("--task", default="topic", help="a classification sentence task: topic | nli")
    parser.add_argument("--folds", type=int, default=1, help="rotate the split as `tasks.study folds=N`")
    parser.add_argument("--layers", choices=("last", "all"), default="last", help="probe the last layer or each")
    parser.add_argument("--balanced", action="store_true", help="class_weight='balanced' in the probe's loss")
    parser.add_argument("--rare", type=int, default=4, help="how many of the rarest train classes to report apart")
    parser.add_argument("--no-scratch", action="store_true", help="leave out the random-init row")
    parser.add_argument("--seed", type=int, default=0, help="the random init's seed")
    args = parser.parse_args(argv)
    rows = probe(args.encoders, args.task, args.folds, args.layers, args.balanced, not args.no_scratch, args.seed)
    print(table(rows, args.rare))


if __name__ == "__main__":
    main(sys.argv[1:])
