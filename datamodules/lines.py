"""Random access to the lines of a big text file, safe to use from DataLoader worker processes.

Two backends, picked by `data.reader`:

- `offsets` (default): one streaming pass records the byte offset of every line start (int64, 8 bytes a line)
  in `<file>.offsets.npy`; a line is `seek` + `readline`. The index is memory-mapped, so a process holds only
  the pages it touched; memory stays flat whatever the corpus size (see benchmarks/line_memory.py). The index
  is rebuilt when the file's size or mtime changes.
- `linecache`: the standard library's cache. Simple, but every process that reads holds the WHOLE file as a list
  of str (more than the file size for Korean text), and it returns '' on a decode error.

Nothing process-bound is pickled into workers: the file handle and the memory map are opened lazily and
re-opened when `os.getpid()` changes, and `__getstate__` drops them.
"""

from __future__ import annotations

import json
import linecache
import os
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np

from datamodules.download import publish

READERS = ("offsets", "linecache")
SCAN_CHUNK = 4 << 20


class LineReader(Protocol):
    path: Path

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> str: ...


def _file_identity(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def count_lines(path: Path) -> int:
    """Number of lines (a last line without '\\n' counts), streaming, in constant memory."""
    count = 0
    last = b"\n"
    with open(path, "rb") as handle:
        while chunk := handle.read(SCAN_CHUNK):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def _write_line_starts(path: Path, out: np.ndarray) -> None:
    """Fill `out` with the byte offset of every line start, one chunk at a time (memory: one chunk)."""
    out[:1] = 0
    filled, position = 1, 0
    with open(path, "rb") as handle:
        while chunk := handle.read(SCAN_CHUNK):
            starts = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + (position + 1)
            starts = starts[: len(out) - filled]  # the start "after" a final newline is no line
            out[filled : filled + len(starts)] = starts
            filled += len(starts)
            position += len(chunk)


def build_offsets_index(path: Path, index_path: Path | None = None) -> Path:
    """Write (or reuse) the `.npy` line-start index of `path`; returns its path."""
    path = Path(path)
    index_path = Path(index_path) if index_path else path.with_name(path.name + ".offsets.npy")
    meta_path = index_path.with_name(index_path.name + ".json")
    identity = _file_identity(path)
    try:
        if json.loads(meta_path.read_text()) == identity and index_path.is_file():
            np.load(index_path, mmap_mode="r")  # a truncated .npy raises here: rebuilt below, never read
            return index_path
    except (OSError, ValueError):
        pass
    index_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{index_path.name}.", suffix=".npy", dir=index_path.parent)
    os.close(fd)
    try:
        # two streaming passes (count, then fill a memory-mapped .npy): flat memory for any file size
        offsets = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(count_lines(path),))
        if len(offsets):
            _write_line_starts(path, offsets)
        offsets.flush()
        del offsets
        publish(tmp, index_path)
        fd, tmp = tempfile.mkstemp(prefix=f".{meta_path.name}.", dir=meta_path.parent)
        with os.fdopen(fd, "w") as handle:
            json.dump(identity, handle)
        publish(tmp, meta_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return index_path


class OffsetsLineReader:
    """`reader[i]` is line i (without its newline), via a memory-mapped byte-offset index."""

    def __init__(self, path: str | os.PathLike, index_path: str | os.PathLike | None = None) -> None:
        self.path = Path(path)
        self.index_path = build_offsets_index(self.path, index_path)
        self._size = self.path.stat().st_size
        self._pid: int | None = None
        self._handle = None
        self._offsets: np.ndarray | None = None
        self._length = int(np.load(self.index_path, mmap_mode="r").shape[0])

    def _open(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = open(self.path, "rb")  # noqa: SIM115 - lives as long as this reader in this process
        self._offsets = np.load(self.index_path, mmap_mode="r")
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> str:
        if self._pid != os.getpid():
            self._open()
        if not -self._length <= index < self._length:
            raise IndexError(f"line {index} out of range: {self.path} has {self._length} lines")
        self._handle.seek(int(self._offsets[index]))
        return self._handle.readline().decode("utf-8").rstrip("\n")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_pid=None, _handle=None, _offsets=None)
        return state

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle, self._offsets, self._pid = None, None, None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


class LinecacheLineReader:
    """`reader[i]` through `linecache.getline` (which loads the whole file into each process that reads)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._name = str(self.path)
        # counted in a streaming pass so that the parent process does not load the file through linecache
        self._length = count_lines(self.path)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> str:
        if not -self._length <= index < self._length:
            raise IndexError(f"line {index} out of range: {self.path} has {self._length} lines")
        if index < 0:
            index += self._length
        return linecache.getline(self._name, index + 1).rstrip("\n")


def open_lines(path: str | os.PathLike, reader: str = "offsets") -> LineReader:
    """A line reader of the backend named by `data.reader`."""
    if reader == "offsets":
        return OffsetsLineReader(path)
    if reader == "linecache":
        return LinecacheLineReader(path)
    raise ValueError(f"unknown line reader {reader!r}; choose one of {READERS}")
