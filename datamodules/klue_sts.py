"""KLUE-STS (`klue-sts-v1.1_dev.json`): a JSON list of {guid, sentence1, sentence2, labels: {label,
real-label, binary-label}, ...}. Regression on `labels.label` (0-5, KLUE's training target); `binary-label`
(1 iff label >= 3.0) is kept for KLUE's F1. Input `[CLS] sentence1 [SEP] sentence2 [SEP]`.

Only KLUE's dev file is mirrored (519 pairs): split by position, default i % 5 == 0 -> test, 1 -> val, else
train (104 / 104 / 311; modulus 5 rather than NER's 10 so that test Pearson rests on ~100 pairs, not ~50).
Bad input: a missing field, a score outside [0, 5] or a binary-label other than 0/1 -> ValueError naming file,
record index and guid; an empty sentence -> skipped, counted and logged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from datamodules.sentence import (
    SentenceDataModule,
    SentenceExample,
    SkipCount,
    field_of,
    read_json_records,
    record_name,
)

SCORE_RANGE = (0.0, 5.0)


def read_klue_sts(path: Path) -> tuple[list[SentenceExample], SkipCount]:
    examples, empty = [], SkipCount()
    for index, record in enumerate(read_json_records(path)):
        where = record_name(path, record, index)
        guid = field_of(record, "guid", where)
        first = field_of(record, "sentence1", where).strip()
        second = field_of(record, "sentence2", where).strip()
        score = float(field_of(record, "labels.label", where, (int, float)))
        binary = field_of(record, "labels.binary-label", where, int)
        if not SCORE_RANGE[0] <= score <= SCORE_RANGE[1]:
            raise ValueError(f"{where}: labels.label {score} is outside {list(SCORE_RANGE)}")
        if binary not in (0, 1):
            raise ValueError(f"{where}: unknown labels.binary-label {binary!r} (known: 0, 1)")
        if not first or not second:
            empty.add(where)
            continue
        examples.append(SentenceExample(guid, first, second, score, where, {"binary_labels": binary}))
    return examples, empty


class KlueStsDataModule(SentenceDataModule):
    def read(self, paths: Sequence[Path]) -> list[SentenceExample]:
        if self.labels:
            raise ValueError(f"KLUE-STS is a regression task: labels must be empty, got {self.labels}")
        out = []
        for path in paths:
            examples, empty = read_klue_sts(path)
            empty.report(path, "an empty sentence")
            out += examples
        return out
