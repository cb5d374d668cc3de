"""Entity and char F1 from summable counts, checked against seqeval (strict IOB2) and scikit-learn."""

import random

import pytest
import torch
from seqeval.metrics import classification_report
from seqeval.metrics import f1_score as seqeval_f1
from seqeval.scheme import IOB2
from sklearn.metrics import f1_score as sklearn_f1

from bert.metrics import (
    add_counts,
    char_confusion,
    char_f1,
    char_f1_klue,
    counts_from_tensor,
    counts_to_tensor,
    entity_counts,
    extract_entities,
    f1_from_counts,
)

TYPES = ("PS", "LC", "OG", "DT", "TI", "QT")
LABELS = ["O"] + [f"{prefix}-{kind}" for kind in TYPES for prefix in ("B", "I")]


def strict(true, pred, average):
    return seqeval_f1(true, pred, average=average, mode="strict", scheme=IOB2, zero_division=0)


def ours(true, pred):
    return f1_from_counts(entity_counts(true, pred))


def random_tags(rng: random.Random, length: int, types=TYPES) -> list[str]:
    """Tags with runs (B then I of the same type), stray I- tags and type switches, so strict != lenient."""
    tags, kind = [], None
    for _ in range(length):
        roll = rng.random()
        if kind is not None and roll < 0.45:
            tags.append(f"I-{kind}")
        elif roll < 0.7:
            tags.append("O")
            kind = None
        else:
            kind = rng.choice(types)
            tags.append(f"{'I' if rng.random() < 0.2 else 'B'}-{kind}")
    return tags


def corrupt(rng: random.Random, tags: list[str], rate: float = 0.15) -> list[str]:
    return [rng.choice(LABELS) if rng.random() < rate else tag for tag in tags]


HAND_MADE = [
    # the seqeval README case: lenient reads I-I as an entity, strict does not
    ([["B-PS", "I-PS", "O"]], [["I-PS", "I-PS", "O"]]),
    # a type switch inside a run, a stray I- after O, a B-B split
    (
        [["B-PS", "I-PS", "O", "B-LC", "I-LC", "I-LC", "O", "B-DT"]],
        [["B-PS", "I-LC", "O", "B-LC", "I-LC", "I-LC", "I-DT", "B-DT"]],
    ),
    (
        [["B-OG", "I-OG", "I-OG", "O", "B-QT"], ["O", "B-TI", "I-TI"]],
        [["B-OG", "B-OG", "I-OG", "O", "I-QT"], ["O", "B-TI", "I-TI"]],
    ),
    # a prediction of a type the gold never has, and a gold type never predicted
    ([["B-PS", "O", "O"], ["B-LC", "I-LC", "O"]], [["B-PS", "O", "B-QT"], ["O", "O", "O"]]),
    # entity running to the sentence end
    ([["O", "B-DT", "I-DT"]], [["O", "B-DT", "I-DT"]]),
]


@pytest.mark.parametrize("true,pred", HAND_MADE)
def test_hand_made_equals_seqeval_strict(true, pred):
    scores = ours(true, pred)
    assert scores["micro"] == pytest.approx(strict(true, pred, "micro"))
    assert scores["macro"] == pytest.approx(strict(true, pred, "macro"))
    report = classification_report(true, pred, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    for kind, f1 in scores["per_type"].items():
        assert f1 == pytest.approx(report[kind]["f1-score"])
    assert set(scores["per_type"]) == {key for key in report if "avg" not in key}


def test_strict_differs_from_lenient_where_it_should():
    true, pred = HAND_MADE[1]
    lenient = seqeval_f1(true, pred)
    assert ours(true, pred)["micro"] == pytest.approx(strict(true, pred, "micro"))
    assert ours(true, pred)["micro"] != pytest.approx(lenient)
    true, pred = HAND_MADE[0]
    assert seqeval_f1(true, pred) == 1.0 and ours(true, pred)["micro"] == 0.0


def test_extract_entities():
    tags = ["B-PS", "I-PS", "I-LC", "O", "I-DT", "B-QT", "B-QT", "I-QT"]
    assert extract_entities(tags) == {("PS", 0, 2), ("QT", 5, 6), ("QT", 6, 8)}
    with pytest.raises(ValueError, match="IOB2"):
        extract_entities(["B-PS", "PS"])


def test_random_sequences_equal_seqeval_strict():
    rng = random.Random(1234)
    for trial in range(300):
        n_sentences = rng.randint(1, 6)
        true = [random_tags(rng, rng.randint(1, 25)) for _ in range(n_sentences)]
        pred = [corrupt(rng, tags, rate=rng.choice([0.0, 0.1, 0.4])) for tags in true]
        if not any(extract_entities(tags) for tags in true + pred):
            continue  # seqeval's macro of no label at all is undefined
        scores = ours(true, pred)
        assert scores["micro"] == pytest.approx(strict(true, pred, "micro")), trial
        assert scores["macro"] == pytest.approx(strict(true, pred, "macro")), trial


def test_counts_sum_across_ranks():
    rng = random.Random(7)
    true = [random_tags(rng, rng.randint(1, 30)) for _ in range(64)]
    pred = [corrupt(rng, tags) for tags in true]
    whole = entity_counts(true, pred)
    rank0, rank1 = entity_counts(true[::2], pred[::2]), entity_counts(true[1::2], pred[1::2])
    assert add_counts(rank0, rank1) == whole
    summed = counts_to_tensor(rank0, TYPES) + counts_to_tensor(rank1, TYPES)  # what all_reduce(SUM) does
    assert counts_from_tensor(summed, TYPES) == whole
    assert f1_from_counts(counts_from_tensor(summed, TYPES)) == f1_from_counts(whole)


def test_per_sentence_counting_equals_joined_sequence_as_klue_scores():
    """KLUE-baseline scores all sentences joined into ONE sequence. Equal to per-sentence counts unless a
    predicted sentence opens with I-X right after a sentence ending in an X span."""
    rng = random.Random(99)
    for _ in range(200):
        true = [random_tags(rng, rng.randint(1, 20)) for _ in range(rng.randint(1, 5))]
        pred = [corrupt(rng, tags, 0.3) for tags in true]
        # gold after read_klue_ner never opens with I-; make predictions not continue across a boundary either
        true = [["B-" + t[2:] if i == 0 and t.startswith("I-") else t for i, t in enumerate(s)] for s in true]
        pred = [["O" if i == 0 and t.startswith("I-") else t for i, t in enumerate(s)] for s in pred]
        joined_true, joined_pred = [sum(true, [])], [sum(pred, [])]
        if not any(extract_entities(joined_true[0]) | extract_entities(joined_pred[0])):
            continue
        assert ours(true, pred)["micro"] == pytest.approx(strict(joined_true, joined_pred, "micro"))
        assert ours(true, pred)["macro"] == pytest.approx(strict(joined_true, joined_pred, "macro"))
    # the documented difference: a prediction continuing across the boundary
    true, pred = [["B-PS", "I-PS"], ["O", "O"]], [["B-PS", "I-PS"], ["I-PS", "O"]]
    assert ours(true, pred)["micro"] == 1.0
    assert strict([sum(true, [])], [sum(pred, [])], "micro") == 0.0


def test_no_entities_anywhere():
    assert ours([["O", "O"]], [["O", "O"]]) == {
        "micro": 0.0,
        "macro": 0.0,
        "precision": 0.0,
        "recall": 0.0,
        "per_type": {},
    }


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        entity_counts([["O", "O"]], [["O"]])


def test_char_f1_klue_equals_sklearn():
    rng = random.Random(5)
    for trial in range(200):
        n = rng.randint(1, 300)
        # few labels per trial, so that absent labels (scored 1 by zero_division=True) occur often
        alphabet = rng.sample(range(13), rng.randint(1, 13))
        true = [rng.choice(alphabet) for _ in range(n)]
        pred = [rng.choice(alphabet) if rng.random() < 0.5 else t for t in true]
        if rng.random() < 0.3:
            pred = [rng.randrange(13) for _ in range(n)]
        expected = sklearn_f1(true, pred, labels=list(range(13)), average="macro", zero_division=True)
        confusion = char_confusion(true, pred, 13)
        assert char_f1_klue(confusion) == pytest.approx(expected), trial
        present = sorted({label for label in true + pred if label != 0})
        if present:
            clean = sklearn_f1(true, pred, labels=present, average="macro", zero_division=0)
            assert char_f1(confusion, outside_id=0) == pytest.approx(clean), trial


def test_char_confusion_sums_and_ignores():
    true = torch.tensor([[0, 1, 2, -100], [3, 3, -100, -100]])
    pred = torch.tensor([[0, 2, 2, 5], [3, 0, 7, 7]])
    confusion = char_confusion(true, pred, 13)
    assert int(confusion.sum()) == 5
    halves = char_confusion(true[:1], pred[:1], 13) + char_confusion(true[1:], pred[1:], 13)
    assert torch.equal(confusion, halves)
    assert confusion[1, 2] == 1 and confusion[3, 0] == 1
    with pytest.raises(ValueError):
        char_confusion([0, 13], [0, 0], 13)
