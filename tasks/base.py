"""What a fine-tuning task is, and the one LightningModule for every sentence-level task.

A task = a DataModule in `datamodules/` (all I/O; it knows its `labels` and `data_sha256`), a head in
`bert/heads.py`, a metric set (below, or `tasks/ner.py`) and `conf/task/<name>.yaml` naming the three. The
entry point (`run_finetune.py`) only composes them. A task module exposes:
- hparams `task`, `labels`, `model_config`, `tokenizer_dir` (plain types: a checkpoint loads weights_only);
- `load_encoder(state_dict)` for pretrained weights;
- `write_report(out_dir, datamodule)` after testing: files to log as artifacts, and extra metrics.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from bert.heads import BertForSequenceClassification, balanced_class_weights
from bert.metrics import char_confusion, classification_scores, sts_scores
from bert.model import BertConfig, load_state_dict_checked
from tasks.interval import IntervalMeans, log_due
from tasks.optim import build_optimizer

CLASS_WEIGHTS = ("none", "balanced")
Reduce = Callable[[torch.Tensor], torch.Tensor]  # sum over ranks
Gather = Callable[[torch.Tensor], list[torch.Tensor]]  # every rank's tensor


def label_keys_for(labels: Sequence[str], keys: Sequence[str] | None = None) -> list[str]:
    """How each class appears in metric keys (`val/f1_<key>`) and plot ticks. Lightning's MLFlowLogger strips
    every character outside [a-zA-Z0-9_/. -] from metric names, so non-ASCII class names (the Korean petition
    categories) need ASCII keys: given in the task config (`label_keys`), else the name with other characters
    turned into `_`, else `class<i>`."""
    if keys is not None:
        if len(keys) != len(labels) or len(set(keys)) != len(keys):
            raise ValueError(f"label_keys must be {len(labels)} distinct names, one per label; got {list(keys)}")
        bad = [key for key in keys if not re.fullmatch(r"[A-Za-z0-9_.\-]+", key)]
        if bad:
            raise ValueError(f"label_keys must be ASCII letters, digits, _ . - (metric names); got {bad}")
        return list(keys)
    out = []
    for i, label in enumerate(labels):
        key = re.sub(r"[^A-Za-z0-9_.\-]+", "_", str(label)).strip("_")
        out.append(key if key and key not in out else f"class{i}")
    return out


class ClassificationMetrics:
    """Accuracy, macro F1 and per-class F1 from a confusion matrix summed over batches and ranks."""

    def __init__(self, labels: Sequence[str], label_keys: Sequence[str] | None = None) -> None:
        self.labels = list(labels)
        self.label_keys = label_keys_for(self.labels, label_keys)
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(len(self.labels), len(self.labels), dtype=torch.long)

    def update(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        pred = logits.argmax(-1)
        self.confusion += char_confusion(batch["labels"], pred, len(self.labels))

    def compute(self, reduce: Reduce, gather: Gather | None = None) -> tuple[dict[str, float], dict[str, Any]]:
        """(metrics without the stage prefix, what the report needs); resets the state."""
        confusion = reduce(self.confusion).cpu().long()
        self.reset()
        scores = classification_scores(confusion)
        metrics = {"accuracy": scores["accuracy"], "f1_macro": scores["f1_macro"]}
        for key, f1 in zip(self.label_keys, scores["per_class"]):
            metrics[f"f1_{key}"] = f1
        return metrics, {"confusion": confusion}


class RegressionMetrics:
    """KLUE-STS: Pearson, Spearman, binarized F1 over every (index, prediction, gold) gathered from the ranks.
    Rank correlation needs all predictions, so these are gathered, not summed; a sample that
    DistributedSampler repeated to even out the ranks is counted once (deduplicated by its index)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.rows: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        self.rows.append(
            torch.stack(
                [batch["index"].double(), logits.detach().squeeze(-1).double(), batch["labels"].double(),
                 batch["binary_labels"].double()], dim=1,
            ).cpu()
        )  # fmt: skip

    def compute(self, reduce: Reduce, gather: Gather | None = None) -> tuple[dict[str, float], dict[str, Any]]:
        rows = torch.cat(self.rows) if self.rows else torch.zeros(0, 4, dtype=torch.float64)
        self.reset()
        if gather is not None:
            rows = torch.cat(gather(rows))
        order = torch.argsort(rows[:, 0], stable=True)
        rows = rows[order]
        keep = torch.ones(len(rows), dtype=torch.bool)
        keep[1:] = rows[1:, 0] != rows[:-1, 0]
        rows = rows[keep]
        pred, gold, binary = rows[:, 1], rows[:, 2], rows[:, 3]
        return sts_scores(pred, gold, binary), {"pred": pred, "gold": gold}


def gather_rows(strategy: Any, world_size: int) -> Gather | None:
    """Rank-varying (N, C) tensors from every rank: sizes first, then padded rows (all_gather needs equal
    shapes). None on one device."""
    if world_size <= 1:
        return None

    def gather(rows: torch.Tensor) -> list[torch.Tensor]:
        sizes = strategy.all_gather(torch.tensor([len(rows)], device=strategy.root_device)).flatten().tolist()
        padded = torch.zeros(max(sizes), rows.shape[1], dtype=rows.dtype)
        padded[: len(rows)] = rows
        everything = strategy.all_gather(padded.to(strategy.root_device)).cpu()  # (world, max, C)
        return [everything[rank, :n] for rank, n in enumerate(sizes)]

    return gather


def task_hparams(
    task: str,
    model_config: Mapping[str, Any],
    labels: Sequence[str],
    optim: Mapping[str, Any],
    tokenizer_dir: str | None,
    classifier_dropout: float | None,
    init_from: str | None,
    max_seq_len: int,
    **extra: Any,
) -> dict[str, Any]:
    """The hyperparameters every fine-tuned checkpoint carries, as plain types (so it loads weights_only and
    `tasks.checkpoints` / `tasks.predict` can read them); `extra` (task-specific) follows `labels`."""
    return {
        "task": str(task),  # what the checkpoint is (tasks.checkpoints)
        "model_config": dict(model_config),
        "labels": [str(label) for label in labels],
        **extra,
        "optim": dict(optim),
        "tokenizer_dir": tokenizer_dir,
        "classifier_dropout": classifier_dropout,
        "init_from": init_from,  # where the encoder came from (a checkpoint), or None = scratch
        "max_seq_len": int(max_seq_len),  # prediction encodes raw text the same way
    }


class TaskModule(pl.LightningModule):
    """What the fine-tuning modules share: `self.model` has the encoder as `.bert`; the subclass implements
    `_eval_step(batch, stage)` and `_log_metrics(stage)`, and the hparams hold `optim` (see `task_hparams`)."""

    model: torch.nn.Module

    def __init__(self, hparams: Mapping[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters(dict(hparams), logger=False)  # RunRecordCallback logs the config
        self.last_eval: dict[str, Any] | None = None
        self.train_means = IntervalMeans(["loss"])

    def load_encoder(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Pretrained encoder weights (a BertForPreTraining state dict) into `self.model.bert`; the MLM/NSP
        heads are dropped (and the pooler, where the head has none)."""
        load_state_dict_checked(self.model.bert, state_dict, strict=True)

    def _log_train_loss(self, loss: torch.Tensor) -> torch.Tensor:
        self.train_means.update({"loss": loss})
        if log_due(self.trainer):  # the mean since the last log, not the last batch
            self.log("train/loss", self.train_means.pop()["loss"], prog_bar=True)
        return loss

    def _eval_step(self, batch: Mapping[str, Any], stage: str) -> None:
        raise NotImplementedError

    def _log_metrics(self, stage: str) -> None:
        raise NotImplementedError

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def configure_optimizers(self) -> dict[str, Any]:
        return build_optimizer(self.model, self.hparams.optim, int(self.trainer.estimated_stepping_batches),
                               self.trainer)


class FinetuneModule(TaskModule):
    """Sentence and sentence-pair tasks: pooled-[CLS] (or mean-pooled, `pooling="mean"`) head, cross-entropy
    (labels) or MSE (no labels = one regression score), and the task's metric set. One class for NLI, STS,
    topic and any such task."""

    def __init__(
        self,
        task: str,
        model_config: Mapping[str, Any],
        labels: Sequence[str],
        optim: Mapping[str, Any],
        tokenizer_dir: str | None = None,
        classifier_dropout: float | None = 0.1,
        init_from: str | None = None,
        max_seq_len: int = 128,
        label_keys: Sequence[str] | None = None,
        pooling: str = "cls",
        class_weights: str = "none",
    ) -> None:
        label_keys = None if label_keys is None else [str(key) for key in label_keys]
        if class_weights not in CLASS_WEIGHTS:
            raise ValueError(f"class_weights must be one of {CLASS_WEIGHTS}, got {class_weights!r}")
        if class_weights != "none" and not labels:
            raise ValueError("class_weights needs classes; a regression task (no labels) has none")
        super().__init__(
            task_hparams(task, model_config, labels, optim, tokenizer_dir, classifier_dropout, init_from, max_seq_len,
                         label_keys=label_keys, pooling=str(pooling), class_weights=str(class_weights))
        )  # fmt: skip
        # the training loss's class weights, set in setup("fit"); a buffer so it moves to the device with the
        # model (no copy per step), not persistent so checkpoints do not change
        self.register_buffer("class_weight", None, persistent=False)
        self.task = str(task)
        self.labels = list(self.hparams.labels)
        num_labels = len(self.labels) or 1
        self.model = BertForSequenceClassification(BertConfig(**dict(model_config)), num_labels, classifier_dropout,
                                                   pooling=str(pooling))  # fmt: skip
        self.metrics = ClassificationMetrics(self.labels, label_keys) if self.labels else RegressionMetrics()

    @property
    def is_regression(self) -> bool:
        return not self.labels

    def setup(self, stage: str) -> None:
        """`class_weights="balanced"`: weight the training loss by the train split's class counts (macro F1
        scores every class alike; plain cross-entropy learns the frequent ones). Val and test losses stay
        unweighted, so their curves compare across runs."""
        if stage != "fit" or self.hparams.get("class_weights", "none") == "none":
            return
        datamodule = getattr(self.trainer, "datamodule", None)  # Lightning has run its setup("fit") by now
        if datamodule is None or not hasattr(datamodule, "label_counts"):
            raise ValueError("class_weights=balanced needs a DataModule with label_counts() (SentenceDataModule)")
        counts = datamodule.label_counts("train")
        self.class_weight = balanced_class_weights(counts)
        print("class weights (balanced, train counts): "
              + ", ".join(f"{key} {w:.2f}" for key, w in zip(self.metrics.label_keys, self.class_weight.tolist())))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._log_train_loss(self.model.loss(self(batch), batch["labels"], self.class_weight))

    def _eval_step(self, batch: Mapping[str, torch.Tensor], stage: str) -> None:
        logits = self(batch)
        loss = self.model.loss(logits, batch["labels"])
        self.log(f"{stage}/loss", loss, batch_size=batch["input_ids"].size(0), sync_dist=True)
        self.metrics.update(logits, batch)

    def _log_metrics(self, stage: str) -> None:
        strategy = self.trainer.strategy
        metrics, state = self.metrics.compute(
            lambda t: strategy.reduce(t.to(self.device), reduce_op="sum"),
            gather_rows(strategy, self.trainer.world_size),
        )
        metrics = {f"{stage}/{key}": value for key, value in metrics.items()}
        self.log_dict(metrics)
        self.last_eval = {"stage": stage, "metrics": metrics, **state}

    def write_report(self, out_dir: Path, datamodule: Any = None) -> tuple[list[tuple[Path, str | None]], dict[str, float]]:
        """The last evaluation (test) as files: per-class table + confusion matrix, or predicted-vs-gold scatter."""
        from tasks.plots import plot_confusion, plot_scatter

        last = self.last_eval
        if not last:
            return [], {}
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stage = last["stage"]
        if self.is_regression:
            m = last["metrics"]
            title = f"{self.task} {stage}: pearson {m[f'{stage}/pearson']:.3f}, spearman {m[f'{stage}/spearman']:.3f}"
            png = plot_scatter(last["pred"], last["gold"], out_dir / f"{stage}_scatter.png", title)
            return [(png, "plots")], {}
        text = classification_report(last["confusion"], self.labels)
        print(text)
        report = out_dir / f"{stage}_report.txt"
        report.write_text(text, encoding="utf-8")
        ticks = self.metrics.label_keys  # ASCII: the default plot font has no Hangul glyphs
        png = plot_confusion(last["confusion"], ticks, out_dir / f"{stage}_confusion.png")
        return [(report, None), (png, "plots")], {}


def classification_report(confusion: torch.Tensor, labels: Sequence[str]) -> str:
    """Per-class precision, recall, F1 and support, like sklearn's classification_report."""
    c = confusion.double()
    tp = c.diagonal()
    width = max(12, max(len(str(label)) for label in labels) + 2)
    lines = [f"{'label':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for i, label in enumerate(labels):
        p = float(tp[i] / c[:, i].sum()) if c[:, i].sum() else 0.0
        r = float(tp[i] / c[i].sum()) if c[i].sum() else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        lines.append(f"{label:<{width}}{p:>10.4f}{r:>10.4f}{f:>10.4f}{int(c[i].sum()):>10d}")
    scores = classification_scores(confusion)
    lines.append(f"\naccuracy {scores['accuracy']:.4f}  macro F1 {scores['f1_macro']:.4f}  (n = {int(c.sum())})")
    return "\n".join(lines) + "\n"
