"""Memory of the two line-reader backends (datamodules/lines.py) under DataLoader workers, vs corpus size.

    python -m benchmarks.line_memory [--sizes-mb 250 1024] [--layout petitions|sentences] [--workers 2]

Builds each corpus in a temp dir by repeating the real petitions of the mirror ($BERT_DATA_MIRROR) until it
reaches the size: `petitions` = the raw JSON lines (~3.5 KB a line), `sentences` = the sentences-file layout
(one sentence a line, rule-split; ~12x more lines, so a 12x larger offsets index). Then, per backend, in a
fresh process: build the index (offsets: the .npy line index; linecache: the line count; its own load happens
lazily in each worker and is part of the pass), and one pass over every line in random order through a
DataLoader with `--workers` workers (only a length per batch travels back, so IPC is not measured).

Memory is sampled every 50 ms with psutil over the process tree (parent + workers):
- RSS parent / RSS worker: the largest resident set of the parent / of any one worker (the target's figure;
  ~230 MB of it is torch itself, shared by fork);
- sum RSS: the sum over the tree, which counts pages shared by fork (torch's ~230 MB) once per process;
- sum PSS: shared pages divided among their sharers (sampled every 0.5 s): the honest total.
Each figure is the peak over the pass.

Measured on the 2-core dev machine (petitions layout; parent + 2 workers):
    corpus    lines    backend    index  pass   RSS parent  RSS worker  sum RSS   sum PSS
    251 MB    73,248   offsets    0.1 s  0.9 s  228 MB      160 MB      546 MB    199 MB
    251 MB    73,248   linecache  0.1 s  2.6 s  228 MB      389 MB      1,004 MB  638 MB
    1,034 MB  302,148  offsets    0.9 s  3.7 s  230 MB      162 MB      551 MB    196 MB
    1,034 MB  302,148  linecache  0.4 s  10.6 s 228 MB      1,109 MB    2,446 MB  2,092 MB
offsets is flat in corpus size; linecache grows ~1x the file per worker. In the sentences layout (7.0M lines
per GB) an offsets worker grows by the index pages it touches (8 B a line, shared page cache): 173 -> 213 MB
from 259 MB to 1 GB, against 519 -> 1,587 MB for linecache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MONTHS = ["2017-08", "2019-04", "2019-05", "2019-06", "2019-07"]


def build_corpus(path: Path, size_bytes: int, layout: str, mirror: Path) -> int:
    """Repeat the real petitions into `path` until it holds `size_bytes`; returns the number of lines."""
    from datamodules.corpora import rule_split

    unit: list[bytes] = []
    for month in MONTHS:
        with open(mirror / "petitions" / f"petitions_{month}", "rb") as src:
            for raw in src:
                if layout == "petitions":
                    unit.append(raw if raw.endswith(b"\n") else raw + b"\n")
                else:
                    record = json.loads(raw)
                    sentences = [record["title"].strip()] + rule_split(record["content"])
                    unit.append(("\n".join(s for s in sentences if s) + "\n\n").encode("utf-8"))
    block = b"".join(unit)
    lines_per_block = block.count(b"\n")
    written = lines = 0
    with open(path, "wb") as out:
        while written < size_bytes:
            out.write(block)
            written += len(block)
            lines += lines_per_block
    return lines


class TreeSampler(threading.Thread):
    def __init__(self, interval: float = 0.05, pss_every: int = 4) -> None:
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process()
        self.interval, self.pss_every = interval, pss_every
        self.parent_rss = self.worker_rss = self.sum_rss = self.sum_pss = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        tick = 0
        while not self.stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
                rss = [p.memory_info().rss for p in procs]
                self.parent_rss = max(self.parent_rss, rss[0])
                self.worker_rss = max([self.worker_rss] + rss[1:])
                self.sum_rss = max(self.sum_rss, sum(rss))
                if tick % self.pss_every == 0:
                    self.sum_pss = max(self.sum_pss, sum(p.memory_full_info().pss for p in procs))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
            tick += 1
            time.sleep(self.interval)


class _Lines:
    def __init__(self, reader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> int:
        return len(self.reader[index])


def _sum(lengths: list[int]) -> int:
    return sum(lengths)


class _Permutation:
    """A random order as ONE int64 array in the parent (a list of 7M Python ints would weigh ~250 MB)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        import numpy as np

        # drawn at the first next(), i.e. after the workers are forked: they do not inherit it
        yield from (int(i) for i in np.random.default_rng(0).permutation(self.n))


def measure(backend: str, path: Path, workers: int) -> dict:
    """One backend on one corpus, in THIS (fresh) process."""
    from torch.utils.data import DataLoader

    from datamodules.lines import LinecacheLineReader, OffsetsLineReader

    sampler = TreeSampler()
    sampler.start()
    start = time.perf_counter()
    reader = OffsetsLineReader(path) if backend == "offsets" else LinecacheLineReader(path)
    build_s = time.perf_counter() - start
    order = _Permutation(len(reader))
    loader = DataLoader(_Lines(reader), batch_size=4096, sampler=order, num_workers=workers, collate_fn=_sum)
    start = time.perf_counter()
    total_chars = sum(loader)
    pass_s = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    return {
        "backend": backend,
        "lines": len(reader),
        "chars": total_chars,
        "build_s": build_s,
        "pass_s": pass_s,
        "parent_rss_mb": sampler.parent_rss / 2**20,
        "worker_rss_mb": sampler.worker_rss / 2**20,
        "sum_rss_mb": sampler.sum_rss / 2**20,
        "sum_pss_mb": sampler.sum_pss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[250, 1024])
    parser.add_argument("--layout", choices=["petitions", "sentences"], default="petitions")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["offsets", "linecache"])
    parser.add_argument("--tmp", default=None, help="folder for the generated corpora (default: system temp)")
    parser.add_argument("--measure", nargs=2, metavar=("BACKEND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]), args.workers)))
        return

    from rich.console import Console
    from rich.table import Table

    from datamodules.download import resolve_mirror

    mirror = resolve_mirror(None)
    if mirror is None or not (mirror / "petitions").is_dir():
        sys.exit("set BERT_DATA_MIRROR to the data mirror (the petitions are repeated from there)")
    table = Table(
        title=f"line readers, {args.layout} layout, parent + {args.workers} DataLoader workers, one random pass"
    )
    columns = [
        "corpus",
        "lines",
        "backend",
        "index build",
        "pass",
        "RSS parent",
        "RSS worker",
        "sum RSS",
        "sum PSS",
    ]
    for column in columns:
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="line_memory.") as tmp:
        for size_mb in args.sizes_mb:
            path = Path(tmp) / f"corpus_{size_mb}mb.txt"
            n_lines = build_corpus(path, size_mb * 2**20, args.layout, mirror)
            size = path.stat().st_size
            for backend in args.backends:
                run = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.line_memory",
                        "--workers",
                        str(args.workers),
                        "--measure",
                        backend,
                        str(path),
                    ],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                row = json.loads(run.stdout.strip().splitlines()[-1])
                assert row["lines"] == n_lines, (row["lines"], n_lines)
                table.add_row(
                    f"{size / 2**20:,.0f} MB",
                    f"{row['lines']:,}",
                    backend,
                    f"{row['build_s']:.1f} s",
                    f"{row['pass_s']:.1f} s",
                    f"{row['parent_rss_mb']:,.0f} MB",
                    f"{row['worker_rss_mb']:,.0f} MB",
                    f"{row['sum_rss_mb']:,.0f} MB",
                    f"{row['sum_pss_mb']:,.0f} MB",
                )
            path.unlink()
            for side in Path(tmp).glob(f"{path.name}.*"):
                side.unlink()
    Console(width=140).print(table)


if __name__ == "__main__":
    os.environ.setdefault("BERT_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
    main()
