"""Corpus readers: raw petitions / namuwiki files -> a cached "sentences file" + a document index.

Splitting Korean into sentences is the slow step (kiwipiepy: ~170 KB/s per core), so it runs ONCE, in a
streaming preparation pass, and its result is cached under `cache_dir/sentences/<key>/`:

- `sentences.txt`: one sentence per line, an empty line after every document (UTF-8, no '\\r').
- `documents.npy`: int64 (n_documents, 4): first line, number of sentences, input file index, source line.
- `stats.json`: counts, and every skipped bad input (kind, count, first locations as `file:line`). Written
  last, so its presence marks a complete preparation.

The key hashes the input files' sha256, the format, the splitter and `SENTENCES_VERSION`. Every file is written
under a temporary name and moved into place with `os.replace`; a lock file keeps concurrent processes (DDP
ranks) from doing the work twice.

Formats:
- `petitions`: JSON lines, one petition per line; title (one sentence) + content (split into sentences) form a
  document.
- `namuwiki`: wikitext. ` = Title = ` starts a document, ` = = Section = = ` lines are headings (dropped: they
  are fragments like "개요", not sentences), every other non-empty line is a paragraph. A `.zip` (the v0.1
  release) is read in place, streaming its largest member.

Splitters: `kiwi` (kiwipiepy `split_into_sents`: finds sentence ends without punctuation, as petitions often
have) or `rule` (split after . ! ? … followed by whitespace). namuwiki defaults to `rule`: its paragraphs are
punctuated, and kiwi at ~170 KB/s per core needs ~7.5 core-hours for the 4.6 GB train split (~4 h here).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from datamodules.download import publish
from datamodules.lines import LineReader, open_lines

log = logging.getLogger(__name__)

FORMATS = ("petitions", "namuwiki", "klue_ner_train")
SPLITTERS = ("kiwi", "rule")
SENTENCES_VERSION = 1
MAX_EXAMPLES = 5  # locations kept per kind of skipped input

# Characters that end a line for Python's text readers (str.splitlines / universal newlines). They must not
# survive inside a sentence, or the sentences file would gain lines.
_LINE_BREAKS = re.compile("[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")
_SENTENCE_END = re.compile(r"[.!?。！？…]+[\"'”’」』)\]]*(?=\s)")


@dataclass
class SkipLog:
    """Counts of skipped bad input by kind, with the first locations of each (`file:line`)."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, where: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.examples.setdefault(kind, [])) < MAX_EXAMPLES:
            self.examples[kind].append(where)

    def to_json(self) -> dict:
        return {kind: {"count": n, "first": self.examples.get(kind, [])} for kind, n in self.counts.items()}


def clean_sentence(text: str) -> str:
    return _LINE_BREAKS.sub(" ", text).strip()


# ----------------------------------------------------------------------------------------------------------------
# sentence splitters


def rule_split(paragraph: str) -> list[str]:
    """Split after sentence-final punctuation (plus closing quotes/brackets) that is followed by whitespace."""
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(paragraph):
        sentences.append(paragraph[start : match.end()])
        start = match.end()
    sentences.append(paragraph[start:])
    return [s for s in (clean_sentence(s) for s in sentences) if s]


class KiwiSplitter:
    """kiwipiepy's `split_into_sents` over a batch of paragraphs (threads, results in input order)."""

    def __init__(self, num_workers: int | None = None) -> None:
        from kiwipiepy import Kiwi  # ~1 s to load its model: only when kiwi is the splitter

        self.kiwi = Kiwi(num_workers=max(2, num_workers or os.cpu_count() or 2))

    def __call__(self, paragraphs: list[str]) -> list[list[str]]:
        results = self.kiwi.split_into_sents(paragraphs)
        return [[s for s in (clean_sentence(x.text) for x in sents) if s] for sents in results]


def make_splitter(name: str, num_workers: int | None = None) -> Callable[[list[str]], list[list[str]]]:
    if name == "kiwi":
        return KiwiSplitter(num_workers)
    if name == "rule":
        return lambda paragraphs: [rule_split(p) for p in paragraphs]
    raise ValueError(f"unknown sentence splitter {name!r}; choose one of {SPLITTERS}")


# ----------------------------------------------------------------------------------------------------------------
# raw readers


@dataclass
class RawDocument:
    file_index: int
    line: int  # 1-based line of the petition / of the title line
    fixed: list[str]  # sentences taken as they are (the petition title)
    paragraphs: list[str]  # text to split into sentences


def _open_raw(path: Path) -> tuple[io.BufferedIOBase, int]:
    """A binary stream of the raw text, and its uncompressed size (for the progress bar)."""
    if path.suffix == ".zip":
        archive = zipfile.ZipFile(path)
        members = [info for info in archive.infolist() if not info.is_dir()]
        if not members:
            raise ValueError(f"{path}: empty zip archive")
        member = max(members, key=lambda info: info.file_size)
        log.info("%s: reading member %s (%d bytes)", path.name, member.filename, member.file_size)
        return archive.open(member), member.file_size
    return open(path, "rb"), path.stat().st_size


def _numbered_lines(
    path: Path, display: str, skips: SkipLog, advance: Callable[[int], None]
) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line without newline); invalid UTF-8 lines are skipped and counted."""
    stream, _ = _open_raw(path)
    with stream:
        for number, raw in enumerate(stream, start=1):
            advance(len(raw))
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                skips.add("invalid_utf8", f"{display}:{number}")


def iter_petitions(
    path: Path, file_index: int, display: str, skips: SkipLog, advance
) -> Iterator[RawDocument]:
    for number, line in _numbered_lines(path, display, skips, advance):
        where = f"{display}:{number}"
        if not line.strip():
            skips.add("empty_line", where)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skips.add("malformed_json", where)
            continue
        if not isinstance(record, dict):
            skips.add("malformed_record", where)
            continue
        title, content = record.get("title"), record.get("content")
        if not isinstance(title, (str, type(None))) or not isinstance(content, (str, type(None))):
            skips.add("malformed_record", where)
            continue
        title, content = clean_sentence(title or ""), clean_sentence(content or "")
        yield RawDocument(file_index, number, [title] if title else [], [content] if content else [])


def _title(line: str) -> str | None:
    stripped = line.strip()
    if stripped.startswith("= ") and stripped.endswith(" =") and not stripped.startswith("= = "):
        return stripped[2:-2].strip()
    return None


def iter_namuwiki(
    path: Path, file_index: int, display: str, skips: SkipLog, advance
) -> Iterator[RawDocument]:
    current: RawDocument | None = None
    for number, line in _numbered_lines(path, display, skips, advance):
        if not line.strip():
            continue
        if _title(line) is not None:
            if current is not None:
                yield current
            current = RawDocument(file_index, number, [], [])
        elif line.strip().startswith("= = "):
            continue
        elif current is None:
            skips.add("text_before_first_title", f"{display}:{number}")
        else:
            current.paragraphs.append(clean_sentence(line))
    if current is not None:
        yield current


def iter_klue_ner_train(
    path: Path, file_index: int, display: str, skips: SkipLog, advance
) -> Iterator[RawDocument]:
    from datamodules.klue_ner import read_klue_ner, split_by_index

    # the NER task's own reader and split, so the two agree on which sentences are train
    sentences = read_klue_ner(path)  # bad lines raise ValueError naming file:line
    advance(Path(path).stat().st_size)
    for sentence in split_by_index(sentences)["train"]:
        text = clean_sentence(sentence.text)
        if text:
            yield RawDocument(file_index, sentence.line_no, [text], [])
        else:
            skips.add("blank_sentence", f"{display}:{sentence.line_no}")


READERS = {"petitions": iter_petitions, "namuwiki": iter_namuwiki, "klue_ner_train": iter_klue_ner_train}


# ----------------------------------------------------------------------------------------------------------------
# preparation


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """An exclusive lock (flock on `path`): one process prepares a cache entry, the others wait and reuse it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cache_entry_ok(marker: Path, check: Callable[[], str | None]) -> bool:
    """Whether a cache entry is complete (its marker, written last, exists) and intact (`check` finds no
    problem). A damaged entry loses its marker, with a warning naming the file, so the caller rebuilds it:
    a truncated or half-written file is never read as data."""
    if not marker.is_file():
        return False
    try:
        problem = check()
    except (OSError, ValueError, KeyError, TypeError) as err:  # unreadable json / npy header
        problem = f"{marker.parent}: {type(err).__name__}: {err}"
    if problem is None:
        return True
    log.warning("cache entry damaged, rebuilding it: %s", problem)
    marker.unlink(missing_ok=True)
    return False


def expect_size(path: Path, size: int) -> str | None:
    """None when `path` has exactly `size` bytes, else what is wrong (naming the file)."""
    if not path.is_file():
        return f"{path} is missing"
    actual = path.stat().st_size
    return None if actual == size else f"{path} has {actual} bytes, its manifest promises {size}"


def open_npy(path: Path) -> np.ndarray:
    """np.load(mmap) whose error names the file (numpy says only `mmap length is greater than file size`)."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None


def check_sentences(out_dir: Path) -> str | None:
    """The sizes stats.json promises: the sentences file's bytes, the document index's rows."""
    stats = json.loads((out_dir / "stats.json").read_text(encoding="utf-8"))
    if "sentences_bytes" in stats:  # caches written before this check have no size: checked by rows only
        problem = expect_size(out_dir / "sentences.txt", stats["sentences_bytes"])
        if problem:
            return problem
    elif not (out_dir / "sentences.txt").is_file():
        return f"{out_dir / 'sentences.txt'} is missing"
    documents = open_npy(out_dir / "documents.npy")
    if documents.shape != (stats["n_documents"], 4):
        return f"{out_dir / 'documents.npy'} has shape {documents.shape}, stats.json promises ({stats['n_documents']}, 4)"
    return None


def sentences_key(fmt: str, splitter: str, digests: Iterable[str]) -> str:
    blob = json.dumps({"v": SENTENCES_VERSION, "format": fmt, "splitter": splitter, "inputs": list(digests)})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def prepare_sentences(
    files: list[Path],
    fmt: str,
    cache_dir: Path,
    digests: list[str],
    splitter: str = "kiwi",
    names: list[str] | None = None,
    kiwi_workers: int | None = None,
    batch_chars: int = 1 << 20,
) -> Path:
    """Split `files` (one corpus, in order) into the cached sentences file; returns the corpus folder."""
    if fmt not in READERS:
        raise ValueError(f"unknown corpus format {fmt!r}; choose one of {FORMATS}")
    names = names or [str(f) for f in files]
    out_dir = Path(cache_dir) / "sentences" / sentences_key(fmt, splitter, digests)
    if cache_entry_ok(out_dir / "stats.json", lambda: check_sentences(out_dir)):
        return out_dir
    with cache_lock(out_dir.with_name(out_dir.name + ".lock")):
        if cache_entry_ok(out_dir / "stats.json", lambda: check_sentences(out_dir)):  # finished meanwhile
            return out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_sentences(files, fmt, out_dir, digests, splitter, names, kiwi_workers, batch_chars)
    return out_dir


def _write_sentences(files, fmt, out_dir, digests, splitter_name, names, kiwi_workers, batch_chars) -> None:
    split = make_splitter(splitter_name, kiwi_workers)
    skips = SkipLog()
    documents: list[tuple[int, int, int, int]] = []
    n_lines = n_single = 0
    total_bytes = sum(_open_raw_size(f) for f in files)
    fd, tmp_name = tempfile.mkstemp(prefix=".sentences.", suffix=".tmp", dir=out_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out, _progress() as bar:
            task = bar.add_task(f"split sentences ({splitter_name})", total=total_bytes)

            def flush(batch: list[RawDocument]) -> None:
                nonlocal n_lines, n_single
                paragraphs = [p for doc in batch for p in doc.paragraphs]
                split_paragraphs = iter(split(paragraphs)) if paragraphs else iter(())
                for doc in batch:
                    sentences = list(doc.fixed)
                    for _ in doc.paragraphs:
                        sentences.extend(next(split_paragraphs))
                    if not sentences:
                        skips.add("empty_document", f"{names[doc.file_index]}:{doc.line}")
                        continue
                    documents.append((n_lines, len(sentences), doc.file_index, doc.line))
                    n_single += len(sentences) == 1
                    out.write("\n".join(sentences))
                    out.write("\n\n")
                    n_lines += len(sentences) + 1

            for file_index, path in enumerate(files):
                batch: list[RawDocument] = []
                size = 0
                reader = READERS[fmt]
                for doc in reader(
                    Path(path), file_index, names[file_index], skips, lambda n: bar.advance(task, n)
                ):
                    batch.append(doc)
                    size += sum(len(p) for p in doc.paragraphs)
                    if size >= batch_chars:
                        flush(batch)
                        batch, size = [], 0
                flush(batch)
        publish(tmp, out_dir / "sentences.txt")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    index = np.asarray(documents, dtype=np.int64).reshape(-1, 4)
    _atomic_save_npy(out_dir / "documents.npy", index)
    stats = {
        "version": SENTENCES_VERSION,
        "format": fmt,
        "splitter": splitter_name,
        "inputs": [{"name": n, "sha256": d} for n, d in zip(names, digests, strict=True)],
        "n_documents": len(documents),
        "n_sentences": int(index[:, 1].sum()) if len(documents) else 0,
        "n_lines": n_lines,
        "sentences_bytes": (out_dir / "sentences.txt").stat().st_size,
        "single_sentence_documents": n_single,
        "skipped": skips.to_json(),
    }
    _atomic_write_json(out_dir / "stats.json", stats)
    log.info("%s: %d documents, %d sentences", out_dir, stats["n_documents"], stats["n_sentences"])


def _open_raw_size(path: Path) -> int:
    stream, size = _open_raw(Path(path))
    stream.close()
    return size


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npy", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_json(path: Path, payload: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, ensure_ascii=False, indent=1)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())


# ----------------------------------------------------------------------------------------------------------------
# reading a prepared corpus


class SentenceCorpus:
    """A prepared corpus: documents as lists of sentences, read lazily by index through a line reader."""

    def __init__(self, corpus_dir: str | os.PathLike, reader: str = "offsets") -> None:
        self.dir = Path(corpus_dir)
        self.sentences_path = self.dir / "sentences.txt"
        self.stats = json.loads((self.dir / "stats.json").read_text(encoding="utf-8"))
        self.documents = np.load(self.dir / "documents.npy", mmap_mode="r")
        self.reader_name = reader
        self._lines: LineReader | None = None

    @property
    def lines(self) -> LineReader:
        if self._lines is None:
            self._lines = open_lines(self.sentences_path, self.reader_name)
        return self._lines

    def __len__(self) -> int:
        return int(self.documents.shape[0])

    def document(self, index: int) -> list[str]:
        first, count = (int(x) for x in self.documents[index, :2])
        return [self.lines[first + k] for k in range(count)]

    def where(self, index: int) -> str:
        """`file:line` of document `index` in the raw input."""
        _, _, file_index, line = (int(x) for x in self.documents[index])
        return f"{self.stats['inputs'][file_index]['name']}:{line}"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_lines"] = None
        state["documents"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.documents = np.load(self.dir / "documents.npy", mmap_mode="r")
