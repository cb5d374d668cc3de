"""Thin LightningModule for KLUE-NER: CRF loss, Viterbi decode, character-level entity metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bert.heads import BertCrfTagger, tagger_allowed
from bert.metrics import (
    char_confusion,
    char_f1,
    char_f1_klue,
    counts_from_tensor,
    counts_to_tensor,
    entity_counts,
    f1_from_counts,
)
from bert.model import BertConfig
from bert.ner_align import alignment_ceiling, drop_spaces, pieces_to_char_tags
from bert.pos import POS_LABELS
from bert.tokenizer import load_tokenizer
from datamodules.klue_ner import ENTITY_TYPES
from tasks.base import TaskModule, task_hparams
from tasks.plots import plot_confusion


class NerModule(TaskModule):
    """Metrics are computed on characters with spaces dropped, as KLUE scores: predictions are mapped back
    from wordpieces (a piece's first character takes its tag, the following ones I-<type>)."""

    def __init__(
        self,
        model_config: Mapping[str, Any],
        labels: Sequence[str],
        optim: Mapping[str, Any],
        tokenizer_dir: str | None = None,
        classifier_dropout: float | None = 0.1,
        init_from: str | None = None,
        task: str = "ner",
        max_seq_len: int = 128,
        constrained_decoding: bool = True,
        lstm_hidden: int = 0,
        pos_features: bool = False,
    ) -> None:
        super().__init__(
            task_hparams(task, model_config, labels, optim, tokenizer_dir, classifier_dropout, init_from, max_seq_len,
                         constrained_decoding=bool(constrained_decoding), lstm_hidden=int(lstm_hidden),
                         pos_features=bool(pos_features))  # fmt: skip
        )
        self.labels = list(labels)
        self.label2id = {label: i for i, label in enumerate(self.labels)}
        self.model = BertCrfTagger(BertConfig(**dict(model_config)), len(self.labels), classifier_dropout,
                                   int(lstm_hidden), pos_vocab=len(POS_LABELS) if pos_features else 0)  # fmt: skip
        if constrained_decoding:  # Viterbi over IOB2-valid paths only (bert.heads)
            self.model.constrain(*tagger_allowed(self.labels))
        self._reset_counts()

    def _reset_counts(self) -> None:
        self._entity = torch.zeros(len(ENTITY_TYPES), 3, dtype=torch.long)
        self._confusion = torch.zeros(len(self.labels), len(self.labels), dtype=torch.long)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self._log_train_loss(
            self.model.loss(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["token_type_ids"],
                            batch.get("pos_ids"))  # fmt: skip
        )

    def char_predictions(self, batch: Mapping[str, Any]) -> list[list[str]]:
        paths = self.model.decode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch.get("pos_ids"))
        out = []
        for path, offsets, n_chars in zip(paths, batch["offsets"], batch["n_chars"]):
            piece_tags = [self.labels[t] for t in path[: len(offsets)]]
            out.append(pieces_to_char_tags(offsets, piece_tags, n_chars))
        return out

    def scored_tags(self, batch: Mapping[str, Any]) -> tuple[list[list[str]], list[list[str]]]:
        """(gold, predicted) character tags per sentence, spaces dropped: what KLUE scores."""
        gold_seqs, pred_seqs = [], []
        for chars, gold, pred in zip(batch["chars"], batch["char_tags"], self.char_predictions(batch)):
            gold_seqs.append(drop_spaces(chars, gold)[1])
            pred_seqs.append(drop_spaces(chars, pred)[1])
        return gold_seqs, pred_seqs

    def _eval_step(self, batch: Mapping[str, Any], stage: str) -> None:
        bsz = batch["input_ids"].size(0)
        loss = self.model.loss(
            batch["input_ids"], batch["attention_mask"], batch["labels"], batch["token_type_ids"], batch.get("pos_ids")
        )
        self.log(f"{stage}/loss", loss, batch_size=bsz, sync_dist=True)
        gold_seqs, pred_seqs = self.scored_tags(batch)
        self._entity += counts_to_tensor(entity_counts(gold_seqs, pred_seqs), ENTITY_TYPES)
        self._confusion += char_confusion(
            [self.label2id[t] for seq in gold_seqs for t in seq],
            [self.label2id[t] for seq in pred_seqs for t in seq],
            len(self.labels),
        )

    def _log_metrics(self, stage: str) -> None:
        # Sums of TP/FP/FN (and the char confusion) across ranks, then F1: right under DDP, unlike mean of F1s.
        entity = self.trainer.strategy.reduce(self._entity.to(self.device), reduce_op="sum").cpu()
        confusion = self.trainer.strategy.reduce(self._confusion.to(self.device), reduce_op="sum").cpu()
        self._reset_counts()
        scores = f1_from_counts(counts_from_tensor(entity, ENTITY_TYPES))
        metrics = {
            f"{stage}/entity_f1_micro": scores["micro"],
            f"{stage}/entity_f1_macro": scores["macro"],
            f"{stage}/char_f1_klue": char_f1_klue(confusion),
            f"{stage}/char_f1": char_f1(confusion, outside_id=self.label2id["O"]),
        }
        for kind, f1 in scores["per_type"].items():
            metrics[f"{stage}/entity_f1_{kind}"] = f1
        self.log_dict(metrics, prog_bar=False)
        self.last_eval = {"stage": stage, "entity": entity, "confusion": confusion, "metrics": metrics}

    def write_report(self, out_dir: Path, datamodule: Any = None) -> tuple[list[tuple[Path, str | None]], dict[str, float]]:
        """Per-type report and char confusion matrix of the last evaluation (test), and the alignment ceiling:
        the best entity F1 wordpiece-level tags can reach with this tokenizer (gold tags round-tripped)."""
        last = self.last_eval
        if not last:
            return [], {}
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        text = report(last["entity"], last["confusion"], self.labels)
        print(text)
        report_file = out_dir / f"{last['stage']}_report.txt"
        report_file.write_text(text, encoding="utf-8")
        png = plot_confusion(last["confusion"], self.labels, out_dir / f"{last['stage']}_confusion.png")
        metrics: dict[str, float] = {}
        if datamodule is not None and self.hparams.tokenizer_dir:
            tokenizer = load_tokenizer(Path(self.hparams.tokenizer_dir))
            ceiling = alignment_ceiling(datamodule.datasets["test"].sentences, tokenizer, datamodule.max_seq_len)
            metrics = {f"test/alignment_ceiling_{k}": ceiling[f"entity_f1_{k}"] for k in ("micro", "macro")}
            print(f"alignment ceiling (test): micro {metrics['test/alignment_ceiling_micro']:.4f}, "
                  f"macro {metrics['test/alignment_ceiling_macro']:.4f}")  # fmt: skip
        return [(report_file, None), (png, "plots")], metrics


def report(entity: torch.Tensor, confusion: torch.Tensor, labels: Sequence[str]) -> str:
    """Per-type table (precision, recall, F1, support) as text, like seqeval's classification_report."""
    counts = counts_from_tensor(entity, ENTITY_TYPES)
    lines = [f"{'type':<6}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for kind in ENTITY_TYPES:
        tp, fp, fn = counts.get(kind, (0, 0, 0))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        lines.append(f"{kind:<6}{p:>10.4f}{r:>10.4f}{f:>10.4f}{tp + fn:>10d}")
    scores = f1_from_counts(counts)
    lines.append(f"\nentity F1 micro {scores['micro']:.4f}  macro {scores['macro']:.4f}")
    lines.append(
        f"char F1 (KLUE, O included) {char_f1_klue(confusion):.4f}  char F1 (O excluded) {char_f1(confusion):.4f}"
    )
    return "\n".join(lines) + "\n"
