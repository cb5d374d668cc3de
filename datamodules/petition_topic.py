"""Petition topic: the `category` of a petition (17 classes, heavily imbalanced) from its title + content.

The files are the mirrored petitions the pretraining corpus is built from (conf/data/petition.yaml; a test
checks that conf/task/topic.yaml lists the same files): the text is also in the pretraining data, the labels
are not. JSON lines, one petition per line with category, title, content, petition_idx, ...

Split by a stable hash of `petition_idx` (sha256, not Python's per-process `hash`), so a petition lands in the
same split in every run and never in two; a repeated petition_idx is skipped and counted.
Bad input: a line that is not a JSON object, a missing field or an unknown category -> ValueError naming file,
line and petition_idx; a petition with neither title nor content -> skipped, counted and logged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from datamodules.sentence import SentenceDataModule, SentenceExample, SkipCount, field_of, split_by_index


def stable_bucket(key: str) -> int:
    """A process-independent integer for `key` (first 8 bytes of its sha256)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def read_petitions(path: Path, labels: Sequence[str] | None = None) -> tuple[list[SentenceExample], SkipCount]:
    examples, empty = [], SkipCount()
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not a JSON object ({err})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, found {type(record).__name__}")
            idx = record.get("petition_idx")
            if idx is not None:
                where += f" (petition_idx {idx})"
            idx = str(field_of(record, "petition_idx", where, (str, int)))
            category = field_of(record, "category", where)
            title = field_of(record, "title", where).strip()
            content = field_of(record, "content", where).strip()
            if labels is not None and category not in labels:
                raise ValueError(f"{where}: unknown category {category!r} (known: {', '.join(labels)})")
            text = " ".join(part for part in (title, content) if part)
            if not text:
                empty.add(where)
                continue
            examples.append(SentenceExample(idx, text, None, category, where))
    return examples, empty


class PetitionTopicDataModule(SentenceDataModule):
    def read(self, paths: Sequence[Path]) -> list[SentenceExample]:
        out, seen, repeated = [], set(), SkipCount()
        for path in paths:
            examples, empty = read_petitions(path, self.labels)
            empty.report(path, "neither title nor content")
            for example in examples:
                if example.guid in seen:
                    repeated.add(example.where)
                    continue
                seen.add(example.guid)
                out.append(example)
        if repeated.count:
            repeated.report(Path(self.files[0]["name"]).parent, "a petition_idx seen before")
        return out

    def split(self, examples: list[SentenceExample]) -> dict[str, list[SentenceExample]]:
        keys = [stable_bucket(example.guid) for example in examples]
        return split_by_index(examples, keys=keys, **self.split_spec)
