"""LightningDataModule for BERT pretraining (MLM + NSP) on a cached, tokenized, memory-mapped corpus.

prepare_data (idempotent, every step cached under `cache_dir` by content keys, safe under concurrent ranks):
  fetch files (download.py) -> sentences file per split (corpora.py) -> tokenizer (trained on a sample of the
  TRAIN documents unless `tokenizer_path` is given) -> token file per split -> instance plans (instances.py).
setup: train/val split BY DOCUMENT, datasets; bad-input counts are logged once here.

Token file (Megatron-style): `tokens.bin` (uint16 below 65,536 ids, else int32) holds every sentence's ids
back to back; `line_offsets.npy` (int64, one per sentences-file line + 1) says where each line starts. A
segment of consecutive sentences is one slice, so `__getitem__` is two memmap slices plus the masking.

The epoch reaches the workers INSIDE the index: the train sampler yields `(epoch, index)` keys. Lightning calls
`sampler.set_epoch(epoch)` at every epoch start (fit loop, `_set_sampler_epoch`; also through its
`DistributedSamplerWrapper`), before the worker iterator is created, so this works with persistent workers,
with any start method and after a resume. The sampler is a `DistributedSampler` that shards itself by the
trainer's world size, so Lightning does not wrap it (which would shuffle away the length buckets).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from datamodules.base import ignore_ctrl_c
from datamodules.corpora import (
    SentenceCorpus,
    cache_entry_ok,
    cache_lock,
    expect_size,
    open_npy,
    prepare_sentences,
)
from datamodules.download import cached_sha256, fetch, publish, resolve_path
from datamodules.instances import (
    PLAN_COLUMNS,
    MaskingConfig,
    NotEnoughDocumentsError,
    build_example,
    plan_instances,
    sequence_lengths,
)

log = logging.getLogger(__name__)

TOKENS_VERSION = 1
PLAN_VERSION = 1
PLAN_SHA256_MAX_BYTES = 64 << 20  # plans up to this size get a checksum, verified before training
SPLITS = ("train", "val", "test")
_SPLIT_SALT = {"train": 0, "val": 1, "test": 2}
DEFAULT_SPLITTER = {"petitions": "kiwi", "namuwiki": "rule", "klue_ner_train": "rule"}  # klue: never splits


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    )


# ----------------------------------------------------------------------------------------------------------------
# tokenized corpus


def tokenize_corpus(corpus_dir: Path, tokenizer, cache_dir: Path, batch_lines: int = 8192) -> Path:
    """Tokenize every line of the sentences file once (streaming) into `tokens.bin` + `line_offsets.npy`.

    Special-token ids produced from the text (a literal "[MASK]" in a petition) are replaced by [UNK], so
    special ids appear in a sequence only where `build_example` puts them.
    """
    corpus = SentenceCorpus(corpus_dir)
    tokenizer_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:20]
    key = _digest({"v": TOKENS_VERSION, "corpus": Path(corpus_dir).name, "tokenizer": tokenizer_hash})
    out_dir = Path(cache_dir) / "tokens" / key
    if cache_entry_ok(out_dir / "meta.json", lambda: check_tokens(out_dir)):
        return out_dir
    with cache_lock(out_dir.with_name(out_dir.name + ".lock")):
        if cache_entry_ok(out_dir / "meta.json", lambda: check_tokens(out_dir)):
            return out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        vocab_size = tokenizer.get_vocab_size()
        dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        unk_id = tokenizer.token_to_id("[UNK]")
        n_lines = int(corpus.stats["n_lines"])
        fd, tmp_tokens = tempfile.mkstemp(prefix=".tokens.", suffix=".tmp", dir=out_dir)
        tmp_offsets = out_dir / f".line_offsets.{os.getpid()}.npy"
        offsets = np.lib.format.open_memmap(tmp_offsets, mode="w+", dtype=np.int64, shape=(n_lines + 1,))
        offsets[0] = 0
        n_tokens = n_unk = n_special = line = 0
        try:
            with os.fdopen(fd, "wb") as out, open(corpus.sentences_path, "rb") as src, _progress() as bar:
                task = bar.add_task("tokenize sentences", total=n_lines)
                while raw := list(itertools.islice(src, batch_lines)):
                    texts = [r.decode("utf-8").rstrip("\n") for r in raw]
                    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
                    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(texts))
                    ids = np.fromiter(
                        itertools.chain.from_iterable(e.ids for e in encodings),
                        dtype=np.int64,
                        count=lengths.sum(),
                    )
                    special = (ids < 5) & (ids != unk_id)
                    n_special += int(special.sum())
                    ids[special] = unk_id
                    n_unk += int((ids == unk_id).sum())
                    out.write(ids.astype(dtype).tobytes())
                    offsets[line + 1 : line + 1 + len(texts)] = n_tokens + np.cumsum(lengths)
                    n_tokens += int(lengths.sum())
                    line += len(texts)
                    bar.advance(task, len(texts))
            if line != n_lines:
                raise RuntimeError(f"{corpus.sentences_path}: expected {n_lines} lines, read {line}")
            offsets.flush()
            del offsets
            publish(tmp_tokens, out_dir / "tokens.bin")
            publish(tmp_offsets, out_dir / "line_offsets.npy")
        except BaseException:
            Path(tmp_tokens).unlink(missing_ok=True)
            tmp_offsets.unlink(missing_ok=True)
            raise
        meta = {
            "dtype": np.dtype(dtype).name,
            "n_tokens": n_tokens,
            "n_lines": n_lines,
            "vocab_size": vocab_size,
            "tokenizer_sha256": tokenizer_hash,
            "unk_tokens": n_unk,
            "special_ids_in_text": n_special,
        }
        (out_dir / f".meta.{os.getpid()}.tmp").write_text(json.dumps(meta))
        publish(out_dir / f".meta.{os.getpid()}.tmp", out_dir / "meta.json")
    return out_dir


def check_tokens(tokens_dir: Path) -> str | None:
    """The sizes meta.json promises: n_tokens ids in tokens.bin, n_lines + 1 offsets ending at n_tokens."""
    tokens_dir = Path(tokens_dir)
    meta = json.loads((tokens_dir / "meta.json").read_text())
    problem = expect_size(tokens_dir / "tokens.bin", meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize)
    if problem:
        return problem
    offsets = open_npy(tokens_dir / "line_offsets.npy")  # a truncated .npy raises ValueError
    if offsets.shape != (meta["n_lines"] + 1,) or int(offsets[-1]) != meta["n_tokens"]:
        return f"{tokens_dir / 'line_offsets.npy'} does not match meta.json (n_lines, n_tokens)"
    return None


def check_plan(path: Path, meta_path: Path) -> str | None:
    """The size the plan's manifest promises, and its sha256 where one was recorded (small plans)."""
    meta = json.loads(meta_path.read_text())
    problem = expect_size(path, meta["n_instances"] * len(PLAN_COLUMNS) * np.dtype(np.int64).itemsize)
    if problem is None and meta.get("sha256") and _file_sha256(path) != meta["sha256"]:
        problem = f"{path}: sha256 differs from the one in {meta_path.name}"
    return problem


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_tokens(tokens_dir: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    meta = json.loads((Path(tokens_dir) / "meta.json").read_text())
    tokens = np.memmap(
        Path(tokens_dir) / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],)
    )
    line_offsets = np.load(Path(tokens_dir) / "line_offsets.npy", mmap_mode="r")
    return tokens, line_offsets, meta


def build_plan(
    tokens_dir: Path,
    corpus_dir: Path,
    doc_ids: np.ndarray,
    max_seq_len: int,
    short_seq_prob: float,
    seed: int,
    cache_dir: Path,
    balance_nsp: bool = True,
    dupe_factor: int = 1,
) -> tuple[Path, dict]:
    """Write (or reuse) the instance plan of one split: raw int64 rows of `PLAN_COLUMNS`.

    `dupe_factor` (Google's flag, default 10 there) concatenates that many plans drawn with different seeds:
    each copy cuts the documents into other A/B pairs and draws other NotNext partners. With one plan, every
    epoch shows the same pairs again and NSP can memorise them on a small corpus instead of learning coherence.
    """
    if dupe_factor < 1:
        raise ValueError(f"dupe_factor must be >= 1, got {dupe_factor}")
    spec = {
        "v": PLAN_VERSION,
        "tokens": Path(tokens_dir).name,
        "docs": hashlib.sha256(np.ascontiguousarray(doc_ids, dtype=np.int64).tobytes()).hexdigest(),
        "max_seq_len": max_seq_len,
        "short_seq_prob": short_seq_prob,
        "seed": seed,
        "balance_nsp": balance_nsp,
    }
    if dupe_factor != 1:  # plans cached before the flag existed keep their key
        spec["dupe_factor"] = dupe_factor
    key = _digest(spec)
    path = Path(cache_dir) / "plans" / f"{key}.bin"
    meta_path = path.with_suffix(".json")
    if cache_entry_ok(meta_path, lambda: check_plan(path, meta_path)):
        return path, json.loads(meta_path.read_text())
    with cache_lock(path.with_suffix(".lock")):
        if cache_entry_ok(meta_path, lambda: check_plan(path, meta_path)):
            return path, json.loads(meta_path.read_text())
        _, line_offsets, _ = load_tokens(tokens_dir)
        documents = np.load(Path(corpus_dir) / "documents.npy", mmap_mode="r")
        stats: dict = {}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        n_rows = 0
        try:
            copy_instances = []
            with os.fdopen(fd, "wb") as out:
                for copy in range(dupe_factor):
                    copy_stats: dict = {}
                    first_row = n_rows
                    for chunk in plan_instances(
                        line_offsets,
                        documents,
                        doc_ids,
                        max_seq_len,
                        short_seq_prob,
                        seed if copy == 0 else f"{seed}/dupe{copy}",
                        balance_nsp=balance_nsp,
                        stats=copy_stats,
                    ):
                        out.write(chunk.tobytes())
                        n_rows += len(chunk)
                    for name, value in copy_stats.items():  # document counts are per copy, label counts add up
                        stats[name] = value if name.endswith("documents") else stats.get(name, 0) + value
                    copy_instances.append(n_rows - first_row)
            publish(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        meta = {"n_instances": n_rows, "copy_instances": copy_instances, "columns": list(PLAN_COLUMNS), **stats}
        if path.stat().st_size <= PLAN_SHA256_MAX_BYTES:  # cheap enough to verify at every start
            meta["sha256"] = _file_sha256(path)
        meta_tmp = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
        meta_tmp.write_text(json.dumps(meta))
        publish(meta_tmp, meta_path)
    return path, meta


def check_tokenizer(tokenizer_json: Path) -> str | None:
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(tokenizer_json))
    except Exception as err:  # tokenizers raises its own Exception type on a cut file
        return f"{tokenizer_json} does not load ({err})"
    return None


def split_documents(n_documents: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/val split BY DOCUMENT (sorted document ids). A non-empty val split gets at least two
    documents, the minimum for NotNext pairs."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 else max(2, round(n_documents * val_fraction))
    if n_val and n_documents - n_val < 2:
        raise NotEnoughDocumentsError(
            f"{n_documents} document(s) cannot be split into train and val (val_fraction={val_fraction}): each "
            "split needs two documents for NotNext pairs"
        )
    order = np.random.default_rng([seed, 0x5EED]).permutation(n_documents)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


# ----------------------------------------------------------------------------------------------------------------
# dataset, sampler, collate


class PretrainingDataset(Dataset):
    """Map-style dataset of planned instances; masking is drawn from (seed, split, epoch, index).

    `dataset[i]` uses the epoch last given to `set_epoch` (in THIS process); `dataset[(epoch, i)]` names it
    explicitly, which is what `EpochSampler` feeds to DataLoader workers.
    """

    def __init__(
        self,
        tokens_dir: str | os.PathLike,
        plan_path: str | os.PathLike,
        n_instances: int,
        max_seq_len: int,
        masking: MaskingConfig,
        seed: int,
        split: str = "train",
        is_continuation: np.ndarray | None = None,
        return_index: bool = False,
    ) -> None:
        self.tokens_dir = Path(tokens_dir)
        self.plan_path = Path(plan_path)
        self.n_instances = int(n_instances)
        self.max_seq_len = max_seq_len
        self.masking = masking
        self.seed = seed
        self.salt = _SPLIT_SALT.get(split, 3)
        self.is_continuation = is_continuation
        self.return_index = return_index
        self.epoch = 0
        self._pid: int | None = None
        self._tokens: np.ndarray | None = None
        self._plan: np.ndarray | None = None

    def _open(self) -> None:
        self._tokens, _, _ = load_tokens(self.tokens_dir)
        self._plan = np.memmap(
            self.plan_path, dtype=np.int64, mode="r", shape=(self.n_instances, len(PLAN_COLUMNS))
        )
        self._pid = os.getpid()

    @property
    def plan(self) -> np.ndarray:
        if self._pid != os.getpid():
            self._open()
        return self._plan

    def __getstate__(self) -> dict:
        # np.memmap pickles its whole content: never ship it to a worker, re-open there.
        state = self.__dict__.copy()
        state.update(_pid=None, _tokens=None, _plan=None)
        return state

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_instances

    def lengths(self) -> np.ndarray:
        """Sequence length of every instance (deterministic: truncation only picks which side is cut)."""
        return sequence_lengths(self.plan, self.max_seq_len)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        index = int(index)
        if not 0 <= index < self.n_instances:
            raise IndexError(f"instance {index} out of range ({self.n_instances})")
        a_start, a_end, b_start, b_end, a_doc, b_doc = (int(x) for x in self.plan[index])
        tokens = self._tokens
        rng = np.random.default_rng([self.seed, self.salt, int(epoch), index])
        example = build_example(
            tokens[a_start:a_end].astype(np.int64),
            tokens[b_start:b_end].astype(np.int64),
            self.max_seq_len,
            self.masking,
            rng,
            self.is_continuation,
        )
        example["nsp_label"] = int(a_doc != b_doc)  # 0 = IsNext, 1 = NotNext
        if self.return_index:
            example["index"] = index
        return example


class EpochSampler(DistributedSampler):
    """Yields `(epoch, index)` keys: a new order AND new masks every epoch, with the epoch carried in the key.

    Shards itself over `num_replicas` ranks by whole batches: every rank gets the same number of batches
    (as with `DistributedSampler`, a short rank repeats a batch: its own, so the shards stay disjoint). With `lengths`, windows
    of `bucket_batches * batch_size` shuffled instances are sorted by length and cut into batches, then the
    batch order is shuffled: similar lengths share a batch (less padding), randomness stays.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        lengths: np.ndarray | None = None,
        bucket_batches: int = 50,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.lengths = lengths
        self.bucket_batches = bucket_batches
        self.n = len(dataset)
        n_batches = math.ceil(self.n / batch_size)
        self.batches_per_rank = math.ceil(n_batches / num_replicas)
        self._rank_len: int | None = None

    def _rank_batches(self) -> list[np.ndarray]:
        """This rank's batches for the current epoch."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        if self.lengths is not None and self.n:
            window = self.batch_size * self.bucket_batches
            chunks = np.split(order, range(window, self.n, window))
            order = np.concatenate([c[np.argsort(self.lengths[c], kind="stable")] for c in chunks])
        batches = [order[k : k + self.batch_size] for k in range(0, self.n, self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        partial = [b for b in batches if len(b) < self.batch_size]
        if self.shuffle and self.lengths is not None:
            full = [full[i] for i in rng.permutation(len(full))]
        # The partial batch goes last, so every rank's stream is cut into the very batches built here. Ranks
        # short of a batch repeat their own first one (never another rank's: shards stay disjoint).
        mine = (full + partial)[self.rank :: self.num_replicas] or (full + partial)[:1]
        return mine + mine[: self.batches_per_rank - len(mine)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        mine = self._rank_batches()
        self._rank_len = sum(len(b) for b in mine)
        epoch = int(self.epoch)
        return iter([(epoch, int(i)) for b in mine for i in b])

    def __len__(self) -> int:
        if self._rank_len is None:
            self._rank_len = sum(len(b) for b in self._rank_batches())
        return self._rank_len


class PretrainCollator:
    """Pads to the longest sequence of the batch (dynamic padding; `max_seq_len` only caps)."""

    def __init__(self, pad_id: int = 0) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        batch = len(examples)
        input_ids = np.full((batch, width), self.pad_id, dtype=np.int64)
        token_type_ids = np.zeros((batch, width), dtype=np.int64)
        attention_mask = np.zeros((batch, width), dtype=np.int64)
        mlm_labels = np.full((batch, width), -100, dtype=np.int64)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = example["input_ids"]
            token_type_ids[row, :n] = example["token_type_ids"]
            attention_mask[row, :n] = 1
            mlm_labels[row, :n] = example["mlm_labels"]
        out = {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "mlm_labels": torch.from_numpy(mlm_labels),
            "nsp_labels": torch.tensor([e["nsp_label"] for e in examples], dtype=torch.long),
        }
        if "index" in examples[0]:
            out["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
        return out


# ----------------------------------------------------------------------------------------------------------------
# the datamodule


class PretrainDataModule(pl.LightningDataModule):
    """Corpus files -> tokenizer -> MLM/NSP batches. See conf/data/petition.yaml for every knob."""

    def __init__(
        self,
        files: Sequence[Mapping[str, Any]],
        format: str = "petitions",
        mirror: str | None = None,
        data_dir: str = "data",
        cache_dir: str = ".cache",
        reader: str = "offsets",
        sentence_splitter: str | None = None,
        kiwi_workers: int | None = None,
        max_seq_len: int = 128,
        short_seq_prob: float = 0.1,
        balance_nsp: bool = True,
        dupe_factor: int = 1,
        mlm_probability: float = 0.15,
        mask_token_prob: float = 0.8,
        random_token_prob: float = 0.1,
        whole_word_mask: bool = False,
        span_mask: bool = False,
        span_p: float = 0.2,
        span_max_words: int = 10,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 1,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        length_bucketing: bool = False,
        bucket_batches: int = 50,
        val_fraction: float = 0.02,
        vocab_size: int = 16000,
        morpheme_aware: bool = True,
        tokenizer_sample_bytes: int | None = None,
        tokenizer_sample_sentences: int | None = None,
        tokenizer_path: str | None = None,
        seed: int = 1234,
        split_seed: int = 0,
        return_index: bool = False,
    ) -> None:
        super().__init__()
        self.files = [dict(f) for f in files]
        for spec in self.files:
            spec.setdefault("split", "train")
            spec.setdefault("url", None)
            spec.setdefault("sha256", None)
            if spec["split"] not in SPLITS:
                raise ValueError(f"{spec['name']}: split must be one of {SPLITS}, got {spec['split']!r}")
        if not any(spec["split"] == "train" for spec in self.files):
            raise ValueError("data.files holds no train file")
        if whole_word_mask and span_mask:  # before hours of preparation, not after
            raise ValueError("data.span_mask already masks whole words: set data.whole_word_mask=false")
        if format not in DEFAULT_SPLITTER:
            raise ValueError(f"unknown corpus format {format!r}; choose one of {tuple(DEFAULT_SPLITTER)}")
        self.format = format
        self.mirror = mirror
        self.data_dir = resolve_path(data_dir)
        self.cache_dir = resolve_path(cache_dir)
        self.reader = reader
        self.sentence_splitter = sentence_splitter or DEFAULT_SPLITTER[format]
        self.kiwi_workers = kiwi_workers
        self.max_seq_len = max_seq_len
        self.short_seq_prob = short_seq_prob
        self.balance_nsp = balance_nsp
        self.dupe_factor = dupe_factor
        self.masking_args = dict(
            mlm_probability=mlm_probability,
            mask_token_prob=mask_token_prob,
            random_token_prob=random_token_prob,
            whole_word_mask=whole_word_mask,
            span_mask=span_mask,
            span_p=span_p,
            span_max_words=span_max_words,
        )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers and num_workers > 0
        self.pin_memory = pin_memory
        self.length_bucketing = length_bucketing
        self.bucket_batches = bucket_batches
        self.val_fraction = val_fraction
        self.vocab_size_requested = vocab_size
        self.morpheme_aware = morpheme_aware
        self.tokenizer_sample_bytes = tokenizer_sample_bytes
        self.tokenizer_sample_sentences = tokenizer_sample_sentences
        self.tokenizer_path = resolve_path(tokenizer_path)
        self.seed = seed
        self.split_seed = split_seed
        self.return_index = return_index

        self._prepared: dict[str, Any] | None = None
        self._tokenizer = None
        self._reported = False
        self._epoch = 0
        self.datasets: dict[str, PretrainingDataset] = {}
        self._train_sampler: EpochSampler | None = None

    # -- preparation -------------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        self._prepare()

    def _prepare(self) -> dict[str, Any]:
        """Everything on disk, cached; cheap (stat + small reads) once done. Memoized per process."""
        if self._prepared is not None:
            return self._prepared
        paths, digests = [], []
        for spec in self.files:
            path = fetch(spec["name"], spec["url"], spec["sha256"], self.data_dir, self.mirror)
            paths.append(path)
            digests.append(cached_sha256(path, self.data_dir))
        data_sha256 = hashlib.sha256(
            "".join(f"{s['name']} {d}\n" for s, d in zip(self.files, digests, strict=True)).encode()
        ).hexdigest()

        corpora: dict[str, Path] = {}
        for split in SPLITS:
            chosen = [i for i, spec in enumerate(self.files) if spec["split"] == split]
            if chosen:
                corpora[split] = prepare_sentences(
                    [paths[i] for i in chosen],
                    self.format,
                    self.cache_dir,
                    [digests[i] for i in chosen],
                    splitter=self.sentence_splitter,
                    names=[self.files[i]["name"] for i in chosen],
                    kiwi_workers=self.kiwi_workers,
                )
        doc_ids = self._document_split(corpora)
        tokenizer_dir = self._ensure_tokenizer(corpora["train"], doc_ids["train"])
        from bert.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir)
        tokens = {
            split: tokenize_corpus(corpora[source], tokenizer, self.cache_dir)
            for split, source in ((s, self._source_split(s)) for s in doc_ids)
        }
        plans = {}
        for split, docs in doc_ids.items():
            try:
                plans[split] = build_plan(
                    tokens[split],
                    corpora[self._source_split(split)],
                    docs,
                    self.max_seq_len,
                    self.short_seq_prob,
                    self._split_seed(split),
                    self.cache_dir,
                    self.balance_nsp,
                    self.dupe_factor if split == "train" else 1,  # val stays one fixed set of pairs
                )
            except NotEnoughDocumentsError as err:
                names = [s["name"] for s in self.files if s["split"] == self._source_split(split)]
                raise NotEnoughDocumentsError(f"{split} split of {names}: {err}") from None
        self._tokenizer = tokenizer
        self._prepared = {
            "paths": paths,
            "digests": digests,
            "data_sha256": data_sha256,
            "corpora": corpora,
            "doc_ids": doc_ids,
            "tokenizer_dir": tokenizer_dir,
            "tokens": tokens,
            "plans": plans,
        }
        return self._prepared

    def _source_split(self, split: str) -> str:
        """The corpus a split's documents come from (val is carved out of train when no val file exists)."""
        return split if any(s["split"] == split for s in self.files) else "train"

    def _split_seed(self, split: str) -> int:
        return self.seed * 8 + _SPLIT_SALT[split]

    def _document_split(self, corpora: dict[str, Path]) -> dict[str, np.ndarray]:
        n_train_docs = len(np.load(corpora["train"] / "documents.npy", mmap_mode="r"))
        out: dict[str, np.ndarray] = {}
        if "val" in corpora:
            out["train"] = np.arange(n_train_docs)
            out["val"] = np.arange(len(np.load(corpora["val"] / "documents.npy", mmap_mode="r")))
        else:
            try:
                train, val = split_documents(n_train_docs, self.val_fraction, self.split_seed)
            except NotEnoughDocumentsError as err:
                names = [s["name"] for s in self.files if s["split"] == "train"]
                raise NotEnoughDocumentsError(f"{names}: {err}") from None
            out["train"] = train
            if len(val):
                out["val"] = val
        if "test" in corpora:
            out["test"] = np.arange(len(np.load(corpora["test"] / "documents.npy", mmap_mode="r")))
        return out

    def _ensure_tokenizer(self, train_corpus: Path, train_docs: np.ndarray) -> Path:
        if self.tokenizer_path is not None:
            if not (self.tokenizer_path / "tokenizer.json").is_file():
                raise FileNotFoundError(f"data.tokenizer_path={self.tokenizer_path} holds no tokenizer.json")
            return self.tokenizer_path
        from bert.tokenizer import save_tokenizer, tokenizer_fingerprint, train_tokenizer

        fingerprint = tokenizer_fingerprint(
            vocab_size=self.vocab_size_requested,
            morpheme_aware=self.morpheme_aware,
            corpus=train_corpus.name,
            train_documents=hashlib.sha256(np.asarray(train_docs, dtype=np.int64).tobytes()).hexdigest(),
            sample_bytes=self.tokenizer_sample_bytes,
            sample_sentences=self.tokenizer_sample_sentences,
            split_seed=self.split_seed,
            model_max_length=self.max_seq_len,
        )
        out_dir = self.cache_dir / "tokenizers" / f"{fingerprint}-{train_corpus.name[:12]}"
        marker = out_dir / "tokenizer.json"
        if cache_entry_ok(marker, lambda: check_tokenizer(marker)):
            return out_dir
        with cache_lock(out_dir.with_name(out_dir.name + ".lock")):
            if cache_entry_ok(marker, lambda: check_tokenizer(marker)):
                return out_dir
            corpus = SentenceCorpus(train_corpus, self.reader)
            texts = tokenizer_sample(
                corpus,
                train_docs,
                self.split_seed,
                self.tokenizer_sample_bytes,
                self.tokenizer_sample_sentences,
            )
            total = corpus.sentences_path.stat().st_size
            if self.tokenizer_sample_bytes is not None:
                total = min(total, self.tokenizer_sample_bytes)
            what = "tokenizer sample: morpheme split" if self.morpheme_aware else "tokenizer sample"
            with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn()) as bar:
                task, read = bar.add_task(what, total=total), [0]

                def counted(sentences: Iterator[str]) -> Iterator[str]:
                    for sentence in sentences:  # the split runs as the trainer reads: the bar is its progress
                        yield sentence
                        read[0] += len(sentence.encode("utf-8")) + 1
                        bar.update(task, completed=read[0])
                    bar.update(task, total=read[0])  # the train documents' share of the file, read in full
                    bar.stop()  # before the trainer's own bars (counting and merges) start

                tokenizer = train_tokenizer(
                    counted(texts), vocab_size=self.vocab_size_requested, morpheme_aware=self.morpheme_aware
                )
            save_tokenizer(tokenizer, out_dir, model_max_length=self.max_seq_len)
            log.info("trained a %d-piece tokenizer into %s", tokenizer.get_vocab_size(), out_dir)
        return out_dir

    # -- public properties -------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        self._prepare()
        return self._tokenizer

    @property
    def tokenizer_dir(self) -> Path:
        """Folder with tokenizer.json + the transformers files (vocab.txt, tokenizer_config.json, ...)."""
        return self._prepare()["tokenizer_dir"]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def data_sha256(self) -> str:
        """sha256 over "name sha256" lines of every input file: one tag for the whole data config."""
        return self._prepare()["data_sha256"]

    @property
    def input_files(self) -> list[dict[str, Any]]:
        """Each input file's upstream name, URL, split and sha256 (as read), for the run's dataset inputs."""
        digests = self._prepare()["digests"]
        return [
            {"name": s["name"], "url": s["url"], "split": s["split"], "sha256": d}
            for s, d in zip(self.files, digests, strict=True)
        ]

    def set_epoch(self, epoch: int) -> None:
        """For loops without Lightning: sets the epoch of the train sampler (and of the dataset's plain-index
        access). Lightning calls the sampler's `set_epoch` itself."""
        self._epoch = int(epoch)
        if self._train_sampler is not None:
            self._train_sampler.set_epoch(epoch)
        if "train" in self.datasets:
            self.datasets["train"].set_epoch(epoch)

    # -- setup and loaders -------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        prepared = self._prepare()
        masking = self._masking_config()
        words = self.masking_args["whole_word_mask"] or self.masking_args["span_mask"]
        is_continuation = self._continuation_table() if words else None
        for split, (plan_path, plan_meta) in prepared["plans"].items():
            if split not in self.datasets:
                self.datasets[split] = PretrainingDataset(
                    prepared["tokens"][split],
                    plan_path,
                    plan_meta["n_instances"],
                    self.max_seq_len,
                    masking,
                    self._split_seed(split),
                    split,
                    is_continuation,
                    self.return_index,
                )
        self.datasets["train"].set_epoch(self._epoch)
        if not self._reported:
            self._report()
            self._reported = True

    @rank_zero_only
    def _report(self) -> None:
        prepared = self._prepared
        for split, corpus_dir in prepared["corpora"].items():
            stats = json.loads((corpus_dir / "stats.json").read_text(encoding="utf-8"))
            for kind, entry in stats["skipped"].items():
                log.warning(
                    "%s corpus: skipped %d input(s) of kind %s (first at %s)",
                    split,
                    entry["count"],
                    kind,
                    ", ".join(entry["first"]),
                )
            if stats["single_sentence_documents"]:
                log.info(
                    "%s corpus: %d one-sentence documents (NotNext only: no IsNext pair inside them, as in Google's code)",
                    split,
                    stats["single_sentence_documents"],
                )
        for split, (_, meta) in prepared["plans"].items():
            if meta.get("unusable_documents"):
                log.warning(
                    "%s split: %d documents have no token and were skipped", split, meta["unusable_documents"]
                )
            log.info("%s split: %d documents, %d instances", split, meta["documents"], meta["n_instances"])
        for split, tokens_dir in prepared["tokens"].items():
            meta = json.loads((tokens_dir / "meta.json").read_text())
            if meta["special_ids_in_text"]:
                log.warning(
                    "%s corpus: %d special-token strings in the text were replaced by [UNK]",
                    split,
                    meta["special_ids_in_text"],
                )

    def _masking_config(self) -> MaskingConfig:
        tok = self.tokenizer
        ids = {name: tok.token_to_id(name) for name in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
        if sorted(ids.values()) != list(range(5)):
            raise ValueError(f"special tokens must have ids 0..4, the tokenizer has {ids}")
        return MaskingConfig(
            vocab_size=tok.get_vocab_size(),
            pad_id=ids["[PAD]"],
            cls_id=ids["[CLS]"],
            sep_id=ids["[SEP]"],
            mask_id=ids["[MASK]"],
            first_regular_id=5,
            **self.masking_args,
        )

    def _continuation_table(self) -> np.ndarray:
        vocab = self.tokenizer.get_vocab()
        table = np.zeros(len(vocab), dtype=bool)
        for piece, index in vocab.items():
            table[index] = piece.startswith("##")
        return table

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _loader_kwargs(self) -> dict[str, Any]:
        if self.num_workers > 0:
            # The tokenization pass used tokenizers' thread pool; a forked worker would print a warning per
            # process. Workers never tokenize.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return {
            "num_workers": self.num_workers,
            "persistent_workers": self.persistent_workers,
            "pin_memory": self.pin_memory,
            "collate_fn": PretrainCollator(pad_id=0),
            "worker_init_fn": ignore_ctrl_c,
        }

    def train_dataloader(self) -> DataLoader:
        if "train" not in self.datasets:
            self.setup("fit")
        dataset = self.datasets["train"]
        num_replicas, rank = self._world()
        self._train_sampler = EpochSampler(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,
            seed=self.seed,
            num_replicas=num_replicas,
            rank=rank,
            lengths=dataset.lengths() if self.length_bucketing else None,
            bucket_batches=self.bucket_batches,
        )
        # On resume Lightning builds the iterator before its own set_epoch call: start from the restored epoch.
        trainer = getattr(self, "trainer", None)
        self._train_sampler.set_epoch(trainer.current_epoch if trainer is not None else self._epoch)
        # Stateful: a checkpoint taken mid-epoch records how many batches were consumed, and a resumed run
        # skips exactly those (Lightning saves/loads the loader state) instead of replaying the epoch.
        return StatefulDataLoader(
            dataset, batch_size=self.batch_size, sampler=self._train_sampler, **self._loader_kwargs()
        )

    def _eval_loader(self, split: str) -> DataLoader | list:
        if not self.datasets:
            self.setup()
        if split not in self.datasets:
            return []
        return DataLoader(
            self.datasets[split], batch_size=self.eval_batch_size, shuffle=False, **self._loader_kwargs()
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")


def tokenizer_sample(
    corpus: SentenceCorpus,
    doc_ids: np.ndarray,
    seed: int,
    max_bytes: int | None = None,
    max_sentences: int | None = None,
) -> Iterator[str]:
    """Sentences of the given (train) documents in a seeded random document order, until `max_bytes` of UTF-8
    or `max_sentences` sentences (whichever comes first; None = no limit)."""
    order = np.random.default_rng([seed, 0x70C]).permutation(np.asarray(doc_ids))
    n_bytes = n_sentences = 0
    for doc in order:
        for sentence in corpus.document(int(doc)):
            if (max_bytes is not None and n_bytes >= max_bytes) or (
                max_sentences is not None and n_sentences >= max_sentences
            ):
                return
            yield sentence
            n_bytes += len(sentence.encode("utf-8"))
            n_sentences += 1
