"""KLUE-NER: the tsv reader, the deterministic train/val/test split, and the wordpiece-aligned dataset.

File layout (klue-ner-v1.1_{train,dev}.tsv): lines starting with `##` are comments; the comment right before
a sentence is `## <guid>\\t<inline-annotated sentence>`; then one `char\\tTAG` line per character, spaces
included (a space is the line `" \\tO"`, or `" \\tI-<TYPE>"` inside a multi-word entity); a blank line
ends a sentence.
Tags are `O` and `B-`/`I-` x PS, LC, OG, DT, TI, QT (IOB2).

`KlueNerDataModule` wraps them for Lightning (fetch with mirror + checksum, split, encode, loaders).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import Dataset

from bert.ner_align import IGNORE_INDEX, AlignmentStats, encode_for_ner
from bert.pos import PAD_ID as POS_PAD_ID
from bert.pos import Span, analyse, piece_pos_ids
from bert.tokenizer import load_tokenizer
from datamodules.base import TaskDataModule
from datamodules.download import _atomic_write_text, cached_sha256, fetch

log = logging.getLogger(__name__)

ENTITY_TYPES = ("PS", "LC", "OG", "DT", "TI", "QT")
# O first (id 0), then KLUE-baseline's own order of the B-/I- tags.
LABELS: tuple[str, ...] = ("O",) + tuple(f"{prefix}-{kind}" for kind in ENTITY_TYPES for prefix in ("B", "I"))
label2id: dict[str, int] = {label: index for index, label in enumerate(LABELS)}
id2label: dict[int, str] = dict(enumerate(LABELS))

SPLITS = ("train", "val", "test")
T = TypeVar("T")  # split_by_index splits sentences and their per-sentence analyses alike


@dataclass
class NerSentence:
    """One KLUE-NER sentence: one tag per character (spaces included). `line_no` is the 1-based line of its
    first character in the source file; `guid` comes from the `## <guid>\\t...` comment before it."""

    chars: list[str]
    tags: list[str]
    guid: str | None = None
    line_no: int = 0

    @property
    def text(self) -> str:
        return "".join(self.chars)


@dataclass
class ReadStats:
    sentences: int = 0
    empty_sentences_skipped: int = 0
    tags_repaired: int = 0
    repaired_examples: list[str] = field(default_factory=list)


def parse_klue_ner(lines: Iterable[str], source: str = "<lines>") -> tuple[list[NerSentence], ReadStats]:
    """Parse KLUE-NER tsv lines (with or without their line ends) into sentences; see `read_klue_ner`."""
    sentences: list[NerSentence] = []
    stats = ReadStats()
    chars: list[str] = []
    tags: list[str] = []
    guid: str | None = None
    pending_guid = False  # a `## <guid>` comment was seen and no character has followed it yet
    first_line = 0

    def close() -> None:
        nonlocal chars, tags, guid, pending_guid
        if chars:
            sentences.append(NerSentence(chars, tags, guid, first_line))
        elif pending_guid:
            stats.empty_sentences_skipped += 1
        chars, tags, guid, pending_guid = [], [], None, False

    for line_no, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if line.startswith("\ufeff") and line_no == 1:
            line = line[1:]
        if line.startswith("##"):
            if not chars:  # the last comment before a sentence names it; header comments are overwritten
                guid = line[2:].split("\t", 1)[0].strip() or None
                pending_guid = True
            continue
        if line == "":
            close()
            continue
        char, tab, tag = line.rpartition("\t")
        if not tab:
            raise ValueError(f"{source}:{line_no}: expected 'char<TAB>tag', found no tab in {line!r}")
        if len(char) != 1:
            raise ValueError(f"{source}:{line_no}: expected one character before the tab, found {char!r}")
        if tag not in label2id:
            raise ValueError(f"{source}:{line_no}: unknown tag {tag!r} (known: {', '.join(LABELS)})")
        if tag.startswith("I-"):
            previous = tags[-1] if tags else "O"
            if previous == "O" or previous[2:] != tag[2:]:
                if len(stats.repaired_examples) < 5:
                    stats.repaired_examples.append(f"{source}:{line_no}: {tag} after {previous}")
                tag = "B-" + tag[2:]
                stats.tags_repaired += 1
        if not chars:
            first_line = line_no
        chars.append(char)
        tags.append(tag)
    close()
    stats.sentences = len(sentences)
    return sentences, stats


def read_klue_ner(path: str | Path) -> list[NerSentence]:
    """Read a KLUE-NER tsv file into a list of `NerSentence`, in file order.

    Bad input:
    - a character line without a tab, or with more than one character before it: ValueError naming file
      and line;
    - an unknown tag: ValueError naming file, line and tag;
    - `I-X` at a sentence start, after `O`, or after a tag of another type: repaired to `B-X` (how strict IOB2
      scoring reads it anyway), counted, and reported once per file as a logged warning with the count;
    - a sentence header (`## <guid>`) with no character lines: skipped, counted, and reported once per file;
    - a missing file: FileNotFoundError naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"KLUE-NER file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        sentences, stats = parse_klue_ner(handle, source=str(path))
    if stats.tags_repaired:
        log.warning(
            "%s: repaired %d I- tags that did not continue an entity of their type to B- (first: %s)",
            path, stats.tags_repaired, "; ".join(stats.repaired_examples),
        )  # fmt: skip
    if stats.empty_sentences_skipped:
        log.warning("%s: skipped %d empty sentences", path, stats.empty_sentences_skipped)
    return sentences


def split_by_index(
    sentences: Sequence[T], test_mod: int = 0, val_mod: int = 1, modulus: int = 10
) -> dict[str, list[T]]:
    """Deterministic split by position i in `sentences` (file order, empty sentences already skipped):
    i % modulus == test_mod -> test, == val_mod -> val, else train. The mirror's 5,000 dev sentences give
    4,000 / 500 / 500. The upstream train file is not mirrored, so the dev file is split this way."""
    if test_mod == val_mod:
        raise ValueError("test_mod and val_mod must differ")
    if not (0 <= test_mod < modulus and 0 <= val_mod < modulus):
        raise ValueError(f"test_mod and val_mod must lie in [0, {modulus})")
    splits: dict[str, list[T]] = {name: [] for name in SPLITS}
    for index, sentence in enumerate(sentences):
        remainder = index % modulus
        name = "test" if remainder == test_mod else "val" if remainder == val_mod else "train"
        splits[name].append(sentence)
    return splits


def pos_analyses(sentences: Sequence[NerSentence], source: Path, cache: Path) -> list[list[Span]]:
    """kiwi's morphemes of every sentence of `source`, from `cache` when it holds them for these sentences, else
    analysed (a rich progress bar; ~15 s for 5,000 sentences on 2 cores) and written there atomically."""
    texts = [sentence.text for sentence in sentences]
    if cache.is_file():
        payload = json.loads(cache.read_text(encoding="utf-8"))
        if payload.get("texts_sha256") == _texts_digest(texts):
            return [[(int(s), int(e), str(t)) for s, e, t in spans] for spans in payload["spans"]]
        log.warning("%s: stale POS cache (another file or reader), analysing %s again", cache, source)
    with Progress(TextColumn("kiwi POS {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn()) as bar:  # fmt: skip
        task = bar.add_task(Path(source).name, total=len(texts))
        analyses = []
        for spans in analyse(texts):
            analyses.append(spans)
            bar.advance(task)
    cache.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(cache, json.dumps({"source": str(source), "texts_sha256": _texts_digest(texts),
                                          "spans": analyses}, ensure_ascii=False))  # fmt: skip
    log.info("kiwi POS analysis of %d sentences cached in %s", len(texts), cache)
    return analyses


def _texts_digest(texts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


class KlueNerDataset(Dataset):
    """KLUE-NER sentences encoded for a wordpiece model.

    Each item: `input_ids`, `token_type_ids`, `attention_mask`, `labels` (LongTensors of length at most
    max_seq_len; `labels` holds the label id of each piece's first character, IGNORE_INDEX (-100) at
    [CLS]/[SEP]), `offsets` (character span of each position, (0, 0) for [CLS]/[SEP]), `n_chars` and `index`
    (the sentence's position in `sentences`), so that predictions map back to characters with
    `bert.ner_align.pieces_to_char_tags`. Sentences longer than `max_seq_len` pieces are truncated (KLUE-NER
    sentences are at most 145 characters); how many is in `self.stats`. With `pos_spans` (kiwi's morphemes of
    each sentence, `bert.pos.analyse`), items also hold `pos_ids`: the morpheme tag of each piece.
    """

    def __init__(
        self,
        sentences: Sequence[NerSentence],
        tokenizer,
        max_seq_len: int = 128,
        pos_spans: Sequence[Sequence[Span]] | None = None,
    ):
        self.sentences = list(sentences)
        if pos_spans is not None and len(pos_spans) != len(self.sentences):
            raise ValueError(f"{len(pos_spans)} POS analyses for {len(self.sentences)} sentences")
        self.stats = AlignmentStats()
        self.items = []
        for index, sentence in enumerate(self.sentences):
            encoded = encode_for_ner(sentence.chars, sentence.tags, tokenizer, max_seq_len, stats=self.stats)
            if pos_spans is not None:
                pos_ids = piece_pos_ids(encoded.offsets, pos_spans[index], len(sentence.chars))
            self.items.append(
                {
                    "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
                    "token_type_ids": torch.zeros(len(encoded.input_ids), dtype=torch.long),
                    "attention_mask": torch.ones(len(encoded.input_ids), dtype=torch.long),
                    "labels": torch.tensor(
                        [IGNORE_INDEX if tag is None else label2id[tag] for tag in encoded.piece_tags],
                        dtype=torch.long,
                    ),
                    "offsets": encoded.offsets,
                    "n_chars": len(sentence.chars),
                    "chars": sentence.chars,
                    "char_tags": sentence.tags,
                    "index": index,
                    **({"pos_ids": torch.tensor(pos_ids, dtype=torch.long)} if pos_spans is not None else {}),
                }
            )
        if self.stats.truncated:
            log.warning(
                "%d of %d sentences longer than %d pieces were truncated (%d characters left untagged)",
                self.stats.truncated, len(self.sentences), max_seq_len, self.stats.chars_cut,
            )  # fmt: skip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def collate_ner(items: list[dict], pad_id: int = 0) -> dict:
    """Pad a list of `KlueNerDataset` items to the longest one (right padding; labels padded with -100, POS ids
    with `[PAD]`)."""
    longest = max(len(item["input_ids"]) for item in items)

    def pad(key: str, value: int) -> torch.Tensor:
        batch = torch.full((len(items), longest), value, dtype=torch.long)
        for row, item in enumerate(items):
            batch[row, : len(item[key])] = item[key]
        return batch

    return {
        "input_ids": pad("input_ids", pad_id),
        "token_type_ids": pad("token_type_ids", 0),
        "attention_mask": pad("attention_mask", 0),
        "labels": pad("labels", IGNORE_INDEX),
        "offsets": [item["offsets"] for item in items],
        "n_chars": [item["n_chars"] for item in items],
        "chars": [item["chars"] for item in items],
        "char_tags": [item["char_tags"] for item in items],
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        **({"pos_ids": pad("pos_ids", POS_PAD_ID)} if "pos_ids" in items[0] else {}),
    }


class KlueNerDataModule(TaskDataModule):
    """KLUE-NER train/val/test loaders. The tokenizer comes from the encoder being fine-tuned (its run or
    checkpoint), so the entry point sets `tokenizer_dir` before `setup`. `pos_features` adds each piece's kiwi
    morpheme tag (`bert.pos`); kiwi's analysis of the file is cached in `data_dir` (`pos_cache_path`)."""

    collate_fn = staticmethod(collate_ner)

    def __init__(
        self,
        file: Mapping[str, Any],
        split: Mapping[str, int] | None = None,
        mirror: str | None = None,
        data_dir: str = "data",
        tokenizer_dir: str | None = None,
        max_seq_len: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pos_features: bool = False,
    ) -> None:
        super().__init__(mirror, data_dir, tokenizer_dir, max_seq_len, batch_size, eval_batch_size, num_workers)
        self.pos_features = bool(pos_features)
        self.file = dict(file)
        self.split = dict(split or {"modulus": 10, "test_mod": 0, "val_mod": 1})
        self.path: Path | None = None
        self.datasets: dict[str, KlueNerDataset] = {}
        self.labels = list(LABELS)  # what the head predicts (the tagger's label ids)

    def prepare_data(self) -> None:
        self.path = fetch(self.file["name"], self.file.get("url"), self.file.get("sha256"), self.data_dir, self.mirror)

    @property
    def data_sha256(self) -> str:
        return str(self.file.get("sha256"))

    @property
    def input_files(self) -> list[dict[str, Any]]:
        """The task file's upstream name, URL and sha256, for the run's dataset inputs (one file, three splits)."""
        digest = self.file.get("sha256")
        if digest is None and self.path is not None:
            digest = cached_sha256(self.path, Path(self.data_dir))
        split = "train,val,test"
        return [{"name": self.file["name"], "url": self.file.get("url"), "split": split, "sha256": digest}]

    @property
    def pos_cache_path(self) -> Path:
        """Where kiwi's analysis of the task file is kept: keyed by the file's sha256 and kiwipiepy's version."""
        from importlib.metadata import version

        digest = self.data_sha256 if self.file.get("sha256") else cached_sha256(self.path, Path(self.data_dir))
        return Path(self.data_dir) / "pos" / f"{Path(self.file['name']).stem}-{digest[:16]}-kiwi{version('kiwipiepy')}.json"

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.path is None:
            self.prepare_data()
        if self.tokenizer_dir is None:
            raise ValueError("KlueNerDataModule needs tokenizer_dir (the tokenizer of the encoder)")
        tokenizer = load_tokenizer(Path(self.tokenizer_dir))
        sentences = read_klue_ner(self.path)
        parts = split_by_index(sentences, **self.split)
        # the analyses are split by the same indices, so sentence i keeps its own morphemes
        analyses = (
            split_by_index(pos_analyses(sentences, self.path, self.pos_cache_path), **self.split)
            if self.pos_features else dict.fromkeys(parts)
        )  # fmt: skip
        for name, part in parts.items():
            self.datasets[name] = KlueNerDataset(part, tokenizer, self.max_seq_len, pos_spans=analyses[name])
        log.info(
            "KLUE-NER %s: %s sentences",
            self.path, {name: len(ds) for name, ds in self.datasets.items()},
        )  # fmt: skip
