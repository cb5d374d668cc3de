"""KLUE-NLI (`klue-nli-v1.1_dev.json`): a JSON list of {guid, premise, hypothesis, gold_label, ...}, labels
entailment / neutral / contradiction. Input `[CLS] premise [SEP] hypothesis [SEP]`.

Only KLUE's dev file is mirrored (3,000 pairs), so it is split here, by premise: KLUE wrote one entailment,
one neutral and one contradiction hypothesis for each of 1,000 premises, so a split by pair position puts
every val/test premise in train with exactly the two *other* labels, and a model that remembers premises is
pushed below chance (measured: 0.12 val accuracy for a character n-gram logistic regression, 0.27 for a
fine-tuned mini BERT after 10 epochs). Premise g (in order of first appearance) goes to test if
g % 10 == 0, val if 1, else train (`split` in conf/task/nli.yaml): 2,400 / 300 / 300 pairs, no shared premise.
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
    split_by_index,
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


def premise_groups(examples: Sequence[SentenceExample]) -> list[int]:
    """Each pair's premise index, in order of first appearance: the split key that keeps a premise's
    hypotheses together."""
    first: dict[str, int] = {}
    return [first.setdefault(example.text_a, len(first)) for example in examples]


class KlueNliDataModule(SentenceDataModule):
    def split(self, examples: list[SentenceExample]) -> dict[str, list[SentenceExample]]:
        return split_by_index(examples, keys=premise_groups(examples), **self.split_spec)

    def read(self, paths: Sequence[Path]) -> list[SentenceExample]:
        out = []
        for path in paths:
            examples, empty = read_klue_nli(path, self.labels)
            empty.report(path, "an empty premise or hypothesis")
            out += examples
        return out
