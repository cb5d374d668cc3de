"""Sentence-task metrics against their outside references: scikit-learn (accuracy, macro / per-class /
binary F1), scipy (Pearson, Spearman) and KLUE-baseline's STS F1; on random predictions and on real gold
labels from the mirrored files with simple real predictors; and the DDP reduction (sum / gather + dedupe)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score

from bert.metrics import (
    average_ranks,
    binary_f1,
    char_confusion,
    classification_scores,
    pearson,
    spearman,
    sts_scores,
)
from tasks.base import ClassificationMetrics, RegressionMetrics, label_keys_for


def klue_sts_f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """KLUE-baseline klue_baseline/metrics/functional.py::klue_sts_f1, without its * 100."""
    preds = np.where(preds >= 3, 1, 0)
    labels = np.where(labels >= 3, 1, 0)
    return f1_score(labels, preds, average="binary")


def assert_classification_matches_sklearn(gold: np.ndarray, pred: np.ndarray, n: int) -> None:
    scores = classification_scores(char_confusion(gold, pred, n))
    assert scores["accuracy"] == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
    assert scores["f1_macro"] == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0), abs=1e-12)
    per_class = f1_score(gold, pred, labels=list(range(n)), average=None, zero_division=0)
    assert scores["per_class"] == pytest.approx(list(per_class), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_classification_random(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 18))
    size = int(rng.integers(1, 300))
    gold = rng.integers(0, n, size)
    # skewed predictions: some classes never predicted, some absent from gold (sklearn's label set differs)
    pred = np.where(rng.random(size) < 0.5, gold, rng.integers(0, max(1, n // 2), size))
    assert_classification_matches_sklearn(gold, pred, n)


def test_classification_on_real_nli_labels(mirror):
    """Gold: the mirrored KLUE-NLI labels; prediction: a real (weak) rule on the texts: negation words ->
    contradiction, hypothesis mostly inside the premise -> entailment, else neutral."""
    records = json.loads((mirror / "klue/klue-nli-v1.1_dev.json").read_text(encoding="utf-8"))
    labels = ["entailment", "neutral", "contradiction"]
    gold = np.array([labels.index(r["gold_label"]) for r in records])

    def rule(premise: str, hypothesis: str) -> int:
        if any(word in hypothesis for word in ("않", "없", "못", "안 ")):
            return 2
        words = hypothesis.split()
        inside = sum(word in premise for word in words) / max(len(words), 1)
        return 0 if inside > 0.5 else 1

    pred = np.array([rule(r["premise"], r["hypothesis"]) for r in records])
    assert 0.3 < accuracy_score(gold, pred) < 0.9  # a real, imperfect predictor
    assert_classification_matches_sklearn(gold, pred, 3)


def test_classification_on_real_topic_labels(mirror):
    """Gold: the petition categories (17, imbalanced); prediction: the category whose name shares a word with
    the title, else the most frequent one (many classes never predicted)."""
    rows = [json.loads(line) for line in open(mirror / "petitions/petitions_2019-05", encoding="utf-8")]
    names = sorted({r["category"] for r in rows})
    gold = np.array([names.index(r["category"]) for r in rows])
    majority = int(np.bincount(gold).argmax())

    def rule(title: str) -> int:
        for i, name in enumerate(names):
            if any(part and part in title for part in name.split("/")):
                return i
        return majority

    pred = np.array([rule(r["title"]) for r in rows])
    assert_classification_matches_sklearn(gold, pred, len(names))


def test_ranks_and_correlations_random():
    rng = np.random.default_rng(0)
    for size in (2, 3, 10, 257):
        x = rng.normal(size=size)
        y = 0.3 * x + rng.normal(size=size)
        ties_x = np.round(x * 2) / 2  # many ties, as STS gold scores (0.2 steps) have
        for a, b in ((x, y), (ties_x, y), (ties_x, np.round(y))):
            if np.ptp(a) == 0 or np.ptp(b) == 0:  # scipy: nan (undefined); ours: 0.0, a loggable number
                assert pearson(torch.tensor(a), torch.tensor(b)) == 0.0
                continue
            assert pearson(torch.tensor(a), torch.tensor(b)) == pytest.approx(pearsonr(a, b)[0], abs=1e-10)
            assert spearman(torch.tensor(a), torch.tensor(b)) == pytest.approx(spearmanr(a, b)[0], abs=1e-10)
    from scipy.stats import rankdata

    ties = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0])
    assert average_ranks(torch.tensor(ties)).tolist() == rankdata(ties).tolist()


def test_sts_on_real_labels(mirror):
    """Gold: the mirrored KLUE-STS scores; prediction: 5 x character-bigram Jaccard of the two sentences."""
    records = json.loads((mirror / "klue/klue-sts-v1.1_dev.json").read_text(encoding="utf-8"))

    def bigrams(text: str) -> set[str]:
        text = text.replace(" ", "")
        return {text[i : i + 2] for i in range(len(text) - 1)}

    pred = np.array([5 * len(bigrams(r["sentence1"]) & bigrams(r["sentence2"]))
                     / max(len(bigrams(r["sentence1"]) | bigrams(r["sentence2"])), 1) for r in records])  # fmt: skip
    gold = np.array([r["labels"]["label"] for r in records])
    binary = np.array([r["labels"]["binary-label"] for r in records])
    assert np.array_equal(binary, (gold >= 3.0).astype(int))  # the file's binary-label is KLUE's binarization
    scores = sts_scores(torch.tensor(pred), torch.tensor(gold), torch.tensor(binary))
    assert 0.2 < scores["pearson"] < 0.95
    assert scores["pearson"] == pytest.approx(pearsonr(pred, gold)[0], abs=1e-10)
    assert scores["spearman"] == pytest.approx(spearmanr(pred, gold)[0], abs=1e-10)
    assert scores["f1"] == pytest.approx(klue_sts_f1(pred, gold), abs=1e-12)
    assert scores["f1"] == pytest.approx(f1_score(binary, (pred >= 3).astype(int)), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_binary_f1_random(seed):
    rng = np.random.default_rng(seed)
    pred = rng.uniform(0, 5, 100)
    gold = np.clip(pred + rng.normal(0, 1.5, 100), 0, 5)
    assert binary_f1(torch.tensor(gold >= 3), torch.tensor(pred >= 3)) == pytest.approx(klue_sts_f1(pred, gold))


def fake_batch(index, labels, binary=None):
    batch = {"index": torch.tensor(index), "labels": torch.tensor(labels)}
    if binary is not None:
        batch["binary_labels"] = torch.tensor(binary)
    return batch


def test_metric_sets_reduce_across_ranks_like_one_device():
    """Two 'ranks' each see part of the data (DistributedSampler repeats sample 0 on the second to even them
    out): classification sums confusion matrices; STS gathers rows and counts each index once."""
    rng = np.random.default_rng(1)
    n, size = 4, 9
    gold = rng.integers(0, n, size)
    logits = torch.tensor(rng.normal(size=(size, n)))
    ranks = [list(range(0, size, 2)), [*range(1, size, 2), 0]]  # 5 and 5 samples, sample 0 twice

    single = ClassificationMetrics(list("abcd"))
    single.update(logits, fake_batch(range(size), gold))
    expected, _ = single.compute(lambda t: t)
    parts = []
    for rank in ranks[:1] + [ranks[1][:-1]]:  # confusion counts: the repeat excluded, as in a test run
        m = ClassificationMetrics(list("abcd"))
        m.update(logits[rank], fake_batch(rank, gold[rank]))
        parts.append(m.confusion)
    summed = sum(parts)
    got, _ = ClassificationMetrics(list("abcd")).compute(lambda t: summed)
    assert got == expected

    pred = rng.uniform(0, 5, size)
    score = np.clip(pred + rng.normal(0, 1, size), 0, 5)
    binary = (score >= 3).astype(int)
    per_rank = []
    for rank in ranks:
        m = RegressionMetrics()
        m.update(torch.tensor(pred[rank]).unsqueeze(-1), fake_batch(rank, score[rank], binary[rank]))
        per_rank.append(torch.cat(m.rows))
    m = RegressionMetrics()
    m.rows = [per_rank[0]]
    got, state = m.compute(lambda t: t, gather=lambda rows: per_rank)
    assert len(state["pred"]) == size
    assert got["pearson"] == pytest.approx(pearsonr(pred, score)[0], abs=1e-10)
    assert got["spearman"] == pytest.approx(spearmanr(pred, score)[0], abs=1e-10)
    assert got["f1"] == pytest.approx(klue_sts_f1(pred, score), abs=1e-12)


def test_label_keys_are_ascii_metric_names():
    assert label_keys_for(["entailment", "neutral"]) == ["entailment", "neutral"]
    assert label_keys_for(["육아/교육", "기타", "a/b"]) == ["class0", "class1", "a_b"]
    with pytest.raises(ValueError, match="one per label"):
        label_keys_for(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="ASCII"):
        label_keys_for(["a"], ["육아"])


def test_balanced_class_weights_match_scikit_learn():
    """`task.class_weights=balanced` is scikit-learn's `class_weight="balanced"`: every class then carries the
    same total weight in the loss. A class missing from training gets 0 (sklearn refuses it)."""
    from sklearn.utils.class_weight import compute_class_weight

    from bert.heads import balanced_class_weights

    y = np.array([0] * 50 + [1] * 7 + [2] * 3 + [3])
    counts = torch.bincount(torch.from_numpy(y), minlength=4)
    ours = balanced_class_weights(counts)
    ref = compute_class_weight("balanced", classes=np.arange(4), y=y)
    assert ours.tolist() == pytest.approx(ref.tolist(), rel=1e-6)
    totals = ours * counts.float()
    assert torch.allclose(totals, totals[0].expand(4))  # equal weight per class
    absent = balanced_class_weights(torch.tensor([4, 0, 4]))
    assert absent[1] == 0 and absent[0] == absent[2] == pytest.approx(1.0)  # 8 / (2 * 4)


def test_weighted_loss_is_the_weighted_mean_of_per_example_losses():
    """The head's weighted loss = sum_i w[y_i] * ce_i / sum_i w[y_i] (torch's convention), not a plain mean."""
    from bert.heads import BertForSequenceClassification
    from bert.model import BertConfig

    head = BertForSequenceClassification(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=16), num_labels=3)  # fmt: skip
    logits, labels = torch.randn(6, 3), torch.tensor([0, 0, 0, 0, 1, 2])
    weight = torch.tensor([0.5, 2.0, 2.0])
    per_example = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    expected = (weight[labels] * per_example).sum() / weight[labels].sum()
    assert head.loss(logits, labels, weight) == pytest.approx(float(expected), rel=1e-6)
    assert head.loss(logits, labels) == pytest.approx(float(per_example.mean()), rel=1e-6)
