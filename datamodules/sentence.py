"""Sentence and sentence-pair tasks (NLI, STS, topic): examples, encoding with counted truncation, batching,
and one LightningDataModule that the task readers plug into.

A task's data module subclasses `SentenceDataModule` and implements `read()` (file -> `SentenceExample`s,
every bad record a clear error naming file and record, or a counted, logged skip) and `split()`.
Labels come from the task config (`conf/task/<name>.yaml`), so the data module, the model head and the
metric names all agree on one list; an unknown label in a file is an error, never a new class.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from bert.tokenizer import load_tokenizer
from datamodules.base import TaskDataModule
from datamodules.download import cached_sha256, fetch

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class SentenceExample:
    """One input: a text (or a pair) and its label (a class name, or a score for regression). `where` names
    the record for error messages (file and guid / line)."""

    guid: str
    text_a: str
    text_b: str | None
    label: str | float | None
    where: str
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. STS binary-label


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0  # inputs longer than max_seq_len, cut (longest segment first)
    pieces_cut: int = 0  # of very long texts only the pieces of the pre-cut part count (a lower bound)
    first_truncated: list[str] = field(default_factory=list)


def split_by_index(
    items: Sequence[Any], test_mod: int = 0, val_mod: int = 1, modulus: int = 10, keys: Sequence[int] | None = None
) -> dict[str, list[Any]]:
    """Deterministic split: item i goes to test if key_i % modulus == test_mod, val if == val_mod, else train.
    The key is the position in file order unless `keys` is given (e.g. a stable hash of a document id)."""
    if test_mod == val_mod:
        raise ValueError("split: test_mod and val_mod must differ")
    if not (0 <= test_mod < modulus and 0 <= val_mod < modulus):
        raise ValueError(f"split: test_mod and val_mod must lie in [0, {modulus})")
    out: dict[str, list[Any]] = {name: [] for name in SPLITS}
    for index, item in enumerate(items):
        remainder = (index if keys is None else keys[index]) % modulus
        out["test" if remainder == test_mod else "val" if remainder == val_mod else "train"].append(item)
    return out


def truncate_pair(a: list[int], b: list[int] | None, budget: int) -> tuple[list[int], list[int] | None, int]:
    """Cut the tails so that both segments fit in `budget` pieces, longest first: the shorter segment keeps
    up to half the budget, the longer one the rest (transformers' `truncation="longest_first"`, tested
    against it; when the two are equally long, the second one counts as the longer). Returns (a, b, pieces
    cut)."""
    if b is None:
        return list(a[:budget]), None, max(0, len(a) - budget)
    if len(a) + len(b) <= budget:
        return list(a), list(b), 0
    if len(a) > len(b):
        keep_b = min(len(b), budget // 2)
        keep_a = budget - keep_b
    else:
        keep_a = min(len(a), budget // 2)
        keep_b = budget - keep_a
    return list(a[:keep_a]), list(b[:keep_b]), len(a) + len(b) - budget


class SentenceEncoder:
    """Text (pair) -> `[CLS] a [SEP] (b [SEP])` ids with segment ids, truncated to `max_seq_len`. The same code
    encodes training data and raw text at prediction time.

    A single text far longer than the budget (a petition: ~1,400 characters on average) is cut at a space before it is
    tokenized, so that the tokenizer does not process pages it would throw away; cut at a space, its pieces are
    a prefix of the whole text's pieces, and when they do not fill the budget the whole text is encoded again,
    so the result is the same as tokenizing everything."""

    CHARS_PER_PIECE_CAP = 8  # pre-cut at 8 characters per piece of budget (petitions: ~1.3 per piece)

    def __init__(self, tokenizer, max_seq_len: int = 128) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.cls_id = tokenizer.token_to_id("[CLS]")
        self.sep_id = tokenizer.token_to_id("[SEP]")
        if self.cls_id is None or self.sep_id is None:
            raise ValueError("the tokenizer has no [CLS] or [SEP] token")

    def _pieces(self, texts: Sequence[str], precut: bool = True) -> list[list[int]]:
        """Piece ids of each text (no special tokens), at least `max_seq_len` of them when the text has that many."""
        limit = self.CHARS_PER_PIECE_CAP * self.max_seq_len if precut else float("inf")
        cut = []
        for text in texts:
            if len(text) > limit:
                space = text.rfind(" ", 0, limit)
                text = text[:space] if space > 0 else text
            cut.append(text)
        ids = [e.ids for e in self.tokenizer.encode_batch(cut, add_special_tokens=False)]
        short = [i for i, (full, part) in enumerate(zip(texts, cut)) if part != full and len(ids[i]) <= self.max_seq_len]
        if short:  # the pre-cut text did not fill the budget: encode it whole
            for i, e in zip(short, self.tokenizer.encode_batch([texts[i] for i in short], add_special_tokens=False)):
                ids[i] = e.ids
        return ids

    def encode(self, pairs: Sequence[tuple[str, str | None]], stats: EncodeStats | None = None,
               names: Sequence[str] | None = None) -> list[dict[str, torch.Tensor]]:  # fmt: skip
        # pairs are tokenized whole: which side is longer decides the truncation, so both need true lengths
        firsts = self._pieces([a for a, _ in pairs], precut=all(b is None for _, b in pairs))
        seconds = iter(self._pieces([b for _, b in pairs if b is not None], precut=False))
        items = []
        for i, ((_, b), ids_a) in enumerate(zip(pairs, firsts)):
            ids_b = next(seconds) if b is not None else None
            budget = self.max_seq_len - (3 if ids_b is not None else 2)
            ids_a, ids_b, cut = truncate_pair(ids_a, ids_b, budget)
            if stats is not None:
                stats.examples += 1
                if cut:
                    stats.truncated += 1
                    stats.pieces_cut += cut
                    if len(stats.first_truncated) < 3:
                        stats.first_truncated.append(names[i] if names else str(i))
            input_ids = [self.cls_id, *ids_a, self.sep_id]
            types = [0] * len(input_ids)
            if ids_b is not None:
                input_ids += [*ids_b, self.sep_id]
                types += [1] * (len(ids_b) + 1)
            items.append(
                {
                    "input_ids": torch.tensor(input_ids, dtype=torch.long),
                    "token_type_ids": torch.tensor(types, dtype=torch.long),
                }
            )
        return items


def collate_sentences(items: list[dict], pad_id: int = 0) -> dict:
    """Right-pad to the longest item; labels (long ids or float scores) and extras stacked."""
    longest = max(len(item["input_ids"]) for item in items)
    batch = {
        key: torch.full((len(items), longest), pad_id if key == "input_ids" else 0, dtype=torch.long)
        for key in ("input_ids", "token_type_ids", "attention_mask")
    }
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        batch["input_ids"][row, :n] = item["input_ids"]
        batch["token_type_ids"][row, :n] = item["token_type_ids"]
        batch["attention_mask"][row, :n] = 1
    for key in items[0]:
        if key not in batch and isinstance(items[0][key], torch.Tensor):
            batch[key] = torch.stack([item[key] for item in items])
    return batch


class SentenceDataset(Dataset):
    """Pre-encoded examples; each item holds `input_ids`, `token_type_ids`, `labels` (class id, or float
    score when `labels` is empty = regression), `index` (position in the split) and the examples' extras."""

    def __init__(self, examples: Sequence[SentenceExample], encoder: SentenceEncoder, labels: Sequence[str],
                 stats: EncodeStats | None = None) -> None:  # fmt: skip
        self.examples = list(examples)
        label2id = {label: i for i, label in enumerate(labels)}
        self.items = encoder.encode(
            [(ex.text_a, ex.text_b) for ex in self.examples], stats, [ex.where for ex in self.examples]
        )
        for index, (item, ex) in enumerate(zip(self.items, self.examples)):
            if label2id and ex.label not in label2id:  # readers check first; a new reader cannot slip one in
                raise ValueError(f"{ex.where}: unknown label {ex.label!r} (known: {', '.join(label2id)})")
            if label2id:
                item["labels"] = torch.tensor(label2id[ex.label], dtype=torch.long)
            else:
                item["labels"] = torch.tensor(float(ex.label), dtype=torch.float32)
            item["index"] = torch.tensor(index, dtype=torch.long)
            for key, value in ex.extra.items():
                item[key] = torch.tensor(value)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class SentenceDataModule(TaskDataModule):
    """Fetch (mirror + checksum), read, split, encode; train/val/test loaders. Subclasses implement `read`
    and may override `split`. The tokenizer is the encoder's (the entry point sets `tokenizer_dir`)."""

    collate_fn = staticmethod(collate_sentences)

    def __init__(
        self,
        files: Sequence[Mapping[str, Any]],
        labels: Sequence[str] = (),
        split: Mapping[str, int] | None = None,
        mirror: str | None = None,
        data_dir: str = "data",
        tokenizer_dir: str | None = None,
        max_seq_len: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(mirror, data_dir, tokenizer_dir, max_seq_len, batch_size, eval_batch_size, num_workers)
        self.files = [dict(f) for f in files]
        self.labels = list(labels)  # empty = regression (one score per example)
        self.split_spec = dict(split or {"modulus": 10, "test_mod": 0, "val_mod": 1})
        self.paths: list[Path] = []
        self.datasets: dict[str, SentenceDataset] = {}
        self.stats: dict[str, EncodeStats] = {}

    def read(self, paths: Sequence[Path]) -> list[SentenceExample]:
        raise NotImplementedError

    def split(self, examples: list[SentenceExample]) -> dict[str, list[SentenceExample]]:
        return split_by_index(examples, **self.split_spec)

    def label_counts(self, split: str = "train") -> torch.Tensor:
        """(num_labels,) examples per class in a split, after `setup` (class-weighted losses need them)."""
        if not self.labels:
            raise ValueError(f"{type(self).__name__}: a regression task has no classes to count")
        if split not in self.datasets:
            raise ValueError(f"{type(self).__name__}: no {split!r} split yet; call setup() first")
        ids = torch.tensor([int(item["labels"]) for item in self.datasets[split].items], dtype=torch.long)
        return torch.bincount(ids, minlength=len(self.labels))

    def prepare_data(self) -> None:
        self.paths = [fetch(f["name"], f.get("url"), f.get("sha256"), self.data_dir, self.mirror) for f in self.files]

    @property
    def data_sha256(self) -> str:
        return ",".join(str(f.get("sha256")) for f in self.files)

    @property
    def input_files(self) -> list[dict[str, Any]]:
        """Each task file's upstream name, URL and sha256, for the run's dataset inputs (MLflow's Datasets)."""
        out = []
        for i, file in enumerate(self.files):
            digest = file.get("sha256")
            if digest is None and getattr(self, "paths", None):
                digest = cached_sha256(self.paths[i], Path(self.data_dir))
            out.append({"name": file["name"], "url": file.get("url"), "split": "train,val,test", "sha256": digest})
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if not self.paths:
            self.prepare_data()
        if self.tokenizer_dir is None:
            raise ValueError(f"{type(self).__name__} needs tokenizer_dir (the tokenizer of the encoder)")
        encoder = SentenceEncoder(load_tokenizer(Path(self.tokenizer_dir)), self.max_seq_len)
        for name, examples in self.split(self.read(self.paths)).items():
            self.stats[name] = EncodeStats()
            self.datasets[name] = SentenceDataset(examples, encoder, self.labels, self.stats[name])
            stats = self.stats[name]
            if stats.truncated:
                log.warning(
                    "%s: %d of %d inputs longer than %d pieces were truncated (first: %s)",
                    name, stats.truncated, stats.examples, self.max_seq_len,
                    "; ".join(stats.first_truncated),
                )  # fmt: skip
        log.info("%s: %s examples", type(self).__name__, {k: len(v) for k, v in self.datasets.items()})


@dataclass
class SkipCount:
    """Records skipped on purpose (e.g. an empty sentence): counted, and logged once per file with examples."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str) -> None:
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(where)

    def report(self, source: Path | str, what: str) -> None:
        if self.count:
            log.warning("%s: skipped %d records with %s (first: %s)", source, self.count, what, "; ".join(self.examples))


def read_json_records(path: Path) -> list[dict]:
    """A KLUE file: one JSON list of objects. Anything else is an error naming the file (and the record)."""
    import json

    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, found {type(records).__name__}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {index} is a {type(record).__name__}, not an object")
    return records


def field_of(record: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    """record[key] (dotted keys reach into nested objects), or a ValueError naming the record and the field."""
    value: Any = record
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise ValueError(f"{where}: missing field {key!r}")
        value = value[part]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: field {key!r} should be {getattr(kind, '__name__', kind)}, found {value!r}")
    return value


def record_name(path: Path, record: Mapping[str, Any], index: int) -> str:
    guid = record.get("guid")
    return f"{path}: record {index}" + (f" (guid {guid})" if guid else "")
