"""KLUE-NLI (`klue-nli-v1.1_dev.json`): a JSON list of {guid, premise, hypothesis, gold_label, ...}, labels
entailment / neutral / contradiction. Input `[CLS] premise [SEP] hypothesis [SEP]`.

Only KLUE's dev file is mirrored (3,000 pairs), so it is split by position like KLUE-NER (`split` in
conf/task/nli.yaml; default i % 10 == 0 -> test, 1 -> val, else train: 2,400 / 300 / 300).
Bad input: a record missing a field or with an unknown label -> ValueError naming file, record index and guid;
an empty premise or hypothesis -> skipped, counted and logged.
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


def read_klue_nli(path: Path, labels: Sequence[str] | None = None) -> tuple[list[SentenceExample], SkipCount]:
    examples, empty = [], SkipCount()
    for index, record in enumerate(read_json_records(path)):
        where = record_name(path, record, index)
        guid = field_of(record, "guid", where)
        premise = field_of(record, "premise", where).strip()
        hypothesis = field_of(record, "hypothesis", where).strip()
        label = field_of(record, "gold_label", where)
        if labels is not None and label not in labels:
            raise ValueError(f"{where}: unknown label {label!r} (known: {', '.join(labels)})")
        if not premise or not hypothesis:
            empty.add(where)
            continue
        examples.append(SentenceExample(guid, premise, hypothesis, label, where))
    return examples, empty


class KlueNliDataModule(SentenceDataModule):
    def read(self, paths: Sequence[Path]) -> list[SentenceExample]:
        out = []
        for path in paths:
            examples, empty = read_klue_nli(path, self.labels)
            empty.report(path, "an empty premise or hypothesis")
            out += examples
        return out
