"""Task metrics built from what ranks can exchange under DDP: summable counts (NER spans, confusion
matrices), or gathered (index, score) lists (STS), reduced before any F1 or correlation is computed.

Entity F1: strict IOB2 spans, as `seqeval` with `mode="strict", scheme=IOB2`. An entity is a `B-X` followed by
the longest run of `I-X`; an `I-X` that does not continue a `B-X`/`I-X` run starts no entity (the lenient
default of seqeval would count it). Micro F1 = 2TP / (2TP + FP + FN) over all types; macro F1 = mean of the
per-type F1 over the types that occur in the gold or the predicted spans (seqeval's set of labels), undefined
F1 = 0 (seqeval's zero_division default).

Sentence boundaries: spans are counted per sentence and end at the sentence end. KLUE-baseline instead joins
all sentences into one sequence, each wrapped in the model's [CLS]/[SEP] predictions. On the joined sequence a
span can only cross a boundary if the next sentence starts with `I-X` continuing the previous sentence's final
`X` span (gold never does after `read_klue_ner`'s repair; a prediction can). Per-sentence counting then scores
that prediction as a correct span plus a stray `I-X` (no entity), the joined sequence as one wrong, longer
span. Counts are identical whenever no predicted sentence opens with such a continuation (tested).

Char F1 (KLUE's definition, `klue_baseline/metrics/functional.py::klue_ner_char_macro_f1`):
`sklearn.metrics.f1_score(trues, preds, labels=list(range(len(label_list))), average="macro",
zero_division=True)` over all characters with spaces removed: a macro mean over ALL 13 labels, O included
(its docstring says "except O tag", the code does not), where a label absent from both gold and prediction
scores 1. `char_f1_klue` computes exactly that from a confusion matrix. KLUE-baseline also scores the [CLS]
and [SEP] positions (gold O); we do not. `char_f1` is the cleaner variant: O excluded, absent labels skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

Counts = dict[str, tuple[int, int, int]]  # entity type -> (tp, fp, fn)


def extract_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Strict IOB2 spans `(type, start, end_exclusive)` of one tag sequence."""
    spans: set[tuple[str, int, int]] = set()
    kind, start = None, 0
    for position, tag in enumerate(tags):
        if tag == "O":
            prefix, tag_kind = "O", None
        elif len(tag) > 2 and tag[1] == "-" and tag[0] in "BI":
            prefix, tag_kind = tag[0], tag[2:]
        else:
            raise ValueError(f"not an IOB2 tag: {tag!r}")
        if kind is not None and not (prefix == "I" and tag_kind == kind):
            spans.add((kind, start, position))
            kind = None
        if prefix == "B":
            kind, start = tag_kind, position
    if kind is not None:
        spans.add((kind, start, len(tags)))
    return spans


def entity_counts(true_seqs: Iterable[Sequence[str]], pred_seqs: Iterable[Sequence[str]]) -> Counts:
    """Per-type (tp, fp, fn) of strict IOB2 spans, sentence by sentence. Types seen in neither are absent."""
    counts: dict[str, list[int]] = {}
    n_true = n_pred = 0
    for true_tags, pred_tags in zip(true_seqs, pred_seqs, strict=True):
        if len(true_tags) != len(pred_tags):
            raise ValueError(f"gold has {len(true_tags)} tags but prediction {len(pred_tags)}")
        true_spans, pred_spans = extract_entities(true_tags), extract_entities(pred_tags)
        n_true += len(true_spans)
        n_pred += len(pred_spans)
        for kind, *_ in true_spans & pred_spans:
            counts.setdefault(kind, [0, 0, 0])[0] += 1
        for kind, *_ in pred_spans - true_spans:
            counts.setdefault(kind, [0, 0, 0])[1] += 1
        for kind, *_ in true_spans - pred_spans:
            counts.setdefault(kind, [0, 0, 0])[2] += 1
    return {kind: (tp, fp, fn) for kind, (tp, fp, fn) in sorted(counts.items())}


def add_counts(*many: Mapping[str, tuple[int, int, int]]) -> Counts:
    """Sum entity counts (of batches, or of ranks)."""
    total: dict[str, list[int]] = {}
    for counts in many:
        for kind, values in counts.items():
            slot = total.setdefault(kind, [0, 0, 0])
            for index in range(3):
                slot[index] += int(values[index])
    return {kind: tuple(values) for kind, values in sorted(total.items())}  # type: ignore[misc]


def counts_to_tensor(counts: Mapping[str, tuple[int, int, int]], types: Sequence[str]) -> torch.Tensor:
    """(len(types), 3) int64 tensor of tp/fp/fn in the fixed order `types`, e.g. for `all_reduce(SUM)`."""
    unknown = set(counts) - set(types)
    if unknown:
        raise ValueError(f"entity types {sorted(unknown)} not in {list(types)}")
    return torch.tensor([list(counts.get(kind, (0, 0, 0))) for kind in types], dtype=torch.long)


def counts_from_tensor(tensor: torch.Tensor, types: Sequence[str]) -> Counts:
    """Inverse of `counts_to_tensor`; rows of zeros (type seen nowhere) are dropped."""
    rows = tensor.detach().to("cpu", torch.long).tolist()
    return {kind: tuple(row) for kind, row in zip(types, rows, strict=True) if any(row)}  # type: ignore[misc]


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def f1_from_counts(counts: Mapping[str, tuple[int, int, int]]) -> dict:
    """micro / macro F1, micro precision and recall, and per-type F1 (only types with any gold or predicted
    span, as in seqeval's report). All 0.0 when there is no span at all."""
    present = {kind: values for kind, values in counts.items() if any(values)}
    tp = sum(values[0] for values in present.values())
    fp = sum(values[1] for values in present.values())
    fn = sum(values[2] for values in present.values())
    per_type = {kind: _f1(*values) for kind, values in sorted(present.items())}
    return {
        "micro": _f1(tp, fp, fn),
        "macro": sum(per_type.values()) / len(per_type) if per_type else 0.0,
        "precision": tp / (tp + fp) if tp else 0.0,
        "recall": tp / (tp + fn) if tp else 0.0,
        "per_type": per_type,
    }


# ----------------------------------------------------------------------------------------------------------
# character level


def char_confusion(true_ids, pred_ids, num_labels: int, ignore_index: int = -100) -> torch.Tensor:
    """(num_labels, num_labels) int64 confusion matrix, rows = gold, columns = prediction; summable across
    batches and ranks. Accepts flat or nested int sequences or tensors; positions where gold is `ignore_index`
    are skipped."""
    true_ids = torch.as_tensor(true_ids, dtype=torch.long).flatten().cpu()
    pred_ids = torch.as_tensor(pred_ids, dtype=torch.long).flatten().cpu()
    if true_ids.shape != pred_ids.shape:
        raise ValueError(f"gold has {true_ids.numel()} labels but prediction {pred_ids.numel()}")
    keep = true_ids != ignore_index
    true_ids, pred_ids = true_ids[keep], pred_ids[keep]
    if true_ids.numel() and (
        min(true_ids.min(), pred_ids.min()) < 0 or max(true_ids.max(), pred_ids.max()) >= num_labels
    ):
        raise ValueError(f"label ids must lie in [0, {num_labels})")
    flat = torch.bincount(true_ids * num_labels + pred_ids, minlength=num_labels * num_labels)
    return flat.reshape(num_labels, num_labels)


def _per_label_counts(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    confusion = confusion.to(torch.float64)
    tp = confusion.diagonal()
    fp = confusion.sum(dim=0) - tp
    fn = confusion.sum(dim=1) - tp
    return tp, fp, fn


def char_f1_klue(confusion: torch.Tensor) -> float:
    """KLUE's char F1: macro over every label (O included); a label absent from gold and prediction scores 1
    (sklearn `zero_division=True`), one predicted but never correct scores 0."""
    tp, fp, fn = _per_label_counts(confusion)
    denominator = 2 * tp + fp + fn
    f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.ones_like(tp))
    return float(f1.mean())


def char_f1(confusion: torch.Tensor, outside_id: int = 0) -> float:
    """Macro char F1 over the entity labels (O excluded), labels absent from gold and prediction skipped;
    equal to sklearn `f1_score(labels=<present non-O labels>, average="macro")`. 0.0 if none is present."""
    tp, fp, fn = _per_label_counts(confusion)
    denominator = 2 * tp + fp + fn
    present = denominator > 0
    present[outside_id] = False
    if not present.any():
        return 0.0
    return float((2 * tp[present] / denominator[present]).mean())


# sentence level (NLI, topic: classification; STS: regression). Confusion matrices and (index, score) lists
# are what ranks exchange under DDP; the scores are computed from them once, at epoch end.


def classification_scores(confusion: torch.Tensor) -> dict:
    """Accuracy, macro F1 and per-class F1 from a (gold, predicted) confusion matrix.

    Equal to scikit-learn's `accuracy_score`, `f1_score(average="macro")` (macro over the labels present in
    gold or prediction, sklearn's default label set; KLUE's YNAT metric) and `f1_score(labels=all,
    average=None, zero_division=0)` for `per_class` (a label never predicted nor gold scores 0)."""
    tp, fp, fn = _per_label_counts(confusion)
    total = float(confusion.sum())
    denominator = 2 * tp + fp + fn
    per_class = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.zeros_like(tp))
    present = denominator > 0
    return {
        "accuracy": float(tp.sum()) / total if total else 0.0,
        "f1_macro": float(per_class[present].mean()) if present.any() else 0.0,
        "per_class": [float(f) for f in per_class],
    }


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's r in float64 (scipy.stats.pearsonr); 0.0 when either side is constant (scipy: nan)."""
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() != y.numel():
        raise ValueError(f"{x.numel()} predictions but {y.numel()} gold scores")
    if x.numel() < 2:
        return 0.0
    dx, dy = x - x.mean(), y - y.mean()
    denominator = (dx.square().sum() * dy.square().sum()).sqrt()
    return float((dx * dy).sum() / denominator) if denominator > 0 else 0.0


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks, ties sharing their mean rank (scipy.stats.rankdata's default)."""
    x = x.double().flatten()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    start = 0
    n = x.numel()
    while start < n:  # runs of equal values share (first + last) / 2
        end = start
        while end + 1 < n and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rho = Pearson's r of the average ranks (scipy.stats.spearmanr)."""
    return pearson(average_ranks(x), average_ranks(y))


def binary_f1(gold: torch.Tensor, pred: torch.Tensor) -> float:
    """F1 of the positive class (sklearn `f1_score(average="binary")`, zero_division 0)."""
    gold, pred = gold.bool().flatten(), pred.bool().flatten()
    tp = float((gold & pred).sum())
    fp = float((~gold & pred).sum())
    fn = float((gold & ~pred).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


STS_THRESHOLD = 3.0  # KLUE-STS: a pair is "similar" (binary-label 1) when its score is >= 3.0


def sts_scores(pred: torch.Tensor, gold: torch.Tensor, gold_binary: torch.Tensor) -> dict[str, float]:
    """KLUE-STS: Pearson on the real-valued scores (KLUE's main metric), Spearman, and F1 of the prediction
    binarized at 3.0 against `labels.binary-label` (KLUE-baseline `klue_sts_f1`: sklearn binary F1)."""
    return {
        "pearson": pearson(pred, gold),
        "spearman": spearman(pred, gold),
        "f1": binary_f1(gold_binary, pred.double() >= STS_THRESHOLD),
    }
