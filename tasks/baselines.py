"""Lexical floors for the sentence tasks: what the same splits give without a network or pretraining.

    python -m tasks.baselines [--tasks nli,sts,topic] [--seeds 3] [--lrs 0.01,0.1] [--epochs 15] [--balanced]

A fine-tuned BERT should clear these; when neither arm of a study does, the task is data-limited at this size
rather than the checkpoint being bad, and a gain over scratch there means little. The references are the
classic ones, not ours:
- classification (NLI, topic): multinomial logistic regression on binary character 1-3-gram features of the
  text (for a pair: the second text's n-grams, and those of them missing from the first text, the overlap
  signal NLI annotation artifacts carry), the vocabulary taken from the train split only. Trained with AdamW on
  the train split for `epochs`, the epoch with the best val monitor kept (as fine-tuning keeps its best
  checkpoint), the lr chosen by mean val over seeds (as `tasks.study` does); test at that epoch and lr.
  `--balanced` weights the loss by class as `task.class_weights=balanced` does (the floor for such runs).
- regression (STS): no training at all, the Jaccard similarity of the two texts' character sets.
Texts are cut to `max_chars` characters, about what BERT sees at 128 pieces, so the floor reads no more text.
Splits, labels and metrics are the fine-tuning ones: the task's DataModule (conf/task/<task>.yaml) and
`bert.metrics`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from bert.heads import balanced_class_weights
from bert.metrics import char_confusion, classification_scores, pearson, spearman
from tasks.study import choose, format_cell, summarize

SENTENCE_TASKS = ("nli", "sts", "topic")


def char_ngrams(text: str, orders: Sequence[int] = (1, 2, 3)) -> set[str]:
    """Character n-grams with spaces kept as `_` (so word boundaries are features too)."""
    text = text.replace(" ", "_")
    return {text[i : i + n] for n in orders for i in range(len(text) - n + 1)}


def pair_features(text_a: str, text_b: str | None, max_chars: int) -> list[str]:
    grams_a = char_ngrams(text_a[:max_chars])
    if text_b is None:
        return sorted("a" + g for g in grams_a)
    grams_b = char_ngrams(text_b[:max_chars])
    return sorted(
        ["a" + g for g in grams_a] + ["b" + g for g in grams_b] + ["n" + g for g in grams_b - grams_a]
    )


def jaccard(text_a: str, text_b: str) -> float:
    a, b = set(text_a.replace(" ", "")), set(text_b.replace(" ", ""))
    return len(a & b) / max(1, len(a | b))


def encode(features: Sequence[Sequence[str]], vocab: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """EmbeddingBag input (flat ids, offsets); unseen features are dropped, an empty row gets id 0 (bias)."""
    ids, offsets = [], []
    for row in features:
        offsets.append(len(ids))
        ids += [vocab[f] for f in row if f in vocab] or [0]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


def fit_logistic(
    splits: dict[str, tuple[list[list[str]], torch.Tensor]],
    num_labels: int,
    monitor: str,
    lr: float,
    epochs: int,
    seed: int,
    batch_size: int = 32,
    balanced: bool = False,
) -> tuple[float, dict[str, float]]:
    """Train on `train`; (best val monitor, test scores at that epoch). `monitor`: accuracy | f1_macro.
    `balanced`: class-weighted cross-entropy (`bert.heads.balanced_class_weights` of the train counts)."""
    vocab = {"": 0}
    for row in splits["train"][0]:
        for f in row:
            vocab.setdefault(f, len(vocab))
    encoded = {name: (encode(feats, vocab), labels) for name, (feats, labels) in splits.items()}
    torch.manual_seed(seed)
    bag = torch.nn.EmbeddingBag(len(vocab), num_labels, mode="mean")
    torch.nn.init.zeros_(bag.weight)
    bias = torch.nn.Parameter(torch.zeros(num_labels))
    opt = torch.optim.AdamW([bag.weight, bias], lr=lr, weight_decay=0.0)
    train_rows, train_labels = splits["train"][0], splits["train"][1]
    weight = balanced_class_weights(torch.bincount(train_labels, minlength=num_labels)) if balanced else None

    def scores(name: str) -> dict[str, float]:
        (ids, offsets), labels = encoded[name]
        with torch.no_grad():
            pred = (bag(ids, offsets) + bias).argmax(-1)
        out = classification_scores(char_confusion(labels, pred, num_labels))
        return {"accuracy": out["accuracy"], "f1_macro": out["f1_macro"]}

    best_val, best_test = -1.0, {}
    for _ in range(epochs):
        order = torch.randperm(len(train_rows)).tolist()
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            ids, offsets = encode([train_rows[i] for i in batch], vocab)
            loss = torch.nn.functional.cross_entropy(bag(ids, offsets) + bias, train_labels[batch], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        val = scores("val")[monitor]
        if val > best_val:
            best_val, best_test = val, scores("test")
    return best_val, best_test


def task_splits(task: str):
    """(the task config, {split: [SentenceExample]}) read by the task's own DataModule (mirror, checksums)."""
    import hydra

    from tasks.study import compose

    cfg = compose(task, [])
    data = hydra.utils.instantiate(cfg.task.data)
    data.prepare_data()
    return cfg, data.split(data.read(data.paths))


def run_task(
    task: str, seeds: Sequence[int], lrs: Sequence[float], epochs: int, max_chars: int, balanced: bool = False
) -> list[str]:
    """Markdown rows `| task | reference | metric | val | test |` for one task."""
    cfg, splits = task_splits(task)
    sizes = "/".join(str(len(splits[s])) for s in ("train", "val", "test"))
    labels = list(cfg.task.labels)
    if not labels:  # regression: training-free Jaccard
        rows = []
        for split in ("val", "test"):
            pred = torch.tensor([jaccard(e.text_a[:max_chars], e.text_b[:max_chars]) for e in splits[split]])
            gold = torch.tensor([float(e.label) for e in splits[split]])
            rows.append((pearson(pred, gold), spearman(pred, gold)))
        return [
            f"| {task} | character-set Jaccard, no training ({sizes}) | pearson | {rows[0][0]:.3f} | {rows[1][0]:.3f} |",
            f"| {task} | character-set Jaccard, no training ({sizes}) | spearman | {rows[0][1]:.3f} | {rows[1][1]:.3f} |",
        ]
    monitor = cfg.task.monitor.split("/", 1)[1]
    index = {label: i for i, label in enumerate(labels)}
    feats = {
        name: ([pair_features(e.text_a, e.text_b, max_chars) for e in examples],
               torch.tensor([index[e.label] for e in examples]))
        for name, examples in splits.items()
    }  # fmt: skip
    results: dict[float, list[tuple[float, float]]] = {}
    other: dict[float, list[dict[str, float]]] = {}
    for lr in lrs:
        for seed in seeds:
            val, test = fit_logistic(feats, len(labels), monitor, lr, epochs, seed, balanced=balanced)
            results.setdefault(lr, []).append((val, test[monitor]))
            other.setdefault(lr, []).append(test)
    cell = choose(results, "max")
    name = f"char 1-3-gram logistic regression{', balanced classes' if balanced else ''} ({sizes})"
    lines = [f"| {task} | {name} | {monitor} | {cell.val:.3f} | {format_cell(cell)} |"]
    for metric in ("accuracy", "f1_macro"):
        if metric != monitor:
            mean, std = summarize([t[metric] for t in other[cell.lr]])
            lines.append(f"| {task} | {name} | {metric} | | {mean:.3f} ± {std or 0:.3f} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=",".join(SENTENCE_TASKS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lrs", default="0.01,0.1")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--max-chars", type=int, default=256)
    parser.add_argument("--balanced", action="store_true", help="class-weighted loss (task.class_weights=balanced)")
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in SENTENCE_TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; lexical floors exist for {', '.join(SENTENCE_TASKS)}")
    torch.set_num_threads(1)
    lines = ["| task | reference (train/val/test) | metric | val | test |", "|---|---|---|---:|---|"]
    for task in tasks:
        lines += run_task(task, range(args.seeds), [float(x) for x in args.lrs.split(",")], args.epochs,
                          args.max_chars, args.balanced)  # fmt: skip
        print(f"{task}: done", file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
