"""datamodules/pretrain.py: the datamodule on a real petitions month from the mirror (via $BERT_DATA_MIRROR).

Every test module builds its datamodule over ONE cache folder of the pytest session, so the slow steps (kiwi
sentence split ~10 s, tokenizer, tokenization) run once per session.
"""

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from datamodules.instances import NotEnoughDocumentsError
from datamodules.pretrain import EpochSampler, PretrainDataModule

MONTH = {
    "name": "petitions/petitions_2019-04",
    "url": "https://raw.githubusercontent.com/lovit/petitions_archive/master/petitions_2019-04",
    "sha256": "6db47ca63b0f46731ec22a2043aa55bd2928efd620bf9cc8c52726f7962b2fc0",
}
ROOT = Path(__file__).resolve().parents[1]


def month_datamodule(base: Path, **overrides) -> PretrainDataModule:
    """The 2019-04 petitions (494 documents), 2k-piece plain WordPiece (fast), mirror from the environment."""
    kwargs = dict(
        files=[MONTH],
        mirror=None,  # -> $BERT_DATA_MIRROR, as CI sets it
        data_dir=str(base / "data"),
        cache_dir=str(base / "cache"),
        vocab_size=2000,
        morpheme_aware=False,
        num_workers=0,
        batch_size=32,
        val_fraction=0.05,
        seed=1234,
    )
    kwargs.update(overrides)
    datamodule = PretrainDataModule(**kwargs)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def shared_base(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "petitions-month"


@pytest.fixture(scope="module")
def datamodule(mirror, tmp_path_factory) -> PretrainDataModule:
    return month_datamodule(shared_base(tmp_path_factory))


def test_public_api(datamodule):
    assert datamodule.vocab_size == datamodule.tokenizer.get_vocab_size() >= 2000
    files = {p.name for p in Path(datamodule.tokenizer_dir).iterdir()}
    assert {"tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"} <= files
    assert len(datamodule.data_sha256) == 64
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "mlm_labels", "nsp_labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    B, T = batch["input_ids"].shape
    assert B == 32 and T <= 128
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() == T  # padded to the longest sequence of the batch, not to max_seq_len
    pad = batch["attention_mask"] == 0
    assert (batch["input_ids"][pad] == 0).all() and (batch["mlm_labels"][pad] == -100).all()
    assert (batch["input_ids"][:, 0] == 2).all()  # [CLS]
    assert set(batch["nsp_labels"].tolist()) <= {0, 1}


def test_train_and_val_documents_are_disjoint(datamodule):
    doc_ids = datamodule._prepare()["doc_ids"]
    train, val = set(doc_ids["train"].tolist()), set(doc_ids["val"].tolist())
    assert not train & val and len(train | val) == 494 and len(val) == round(494 * 0.05)
    for split, docs in (("train", train), ("val", val)):
        plan = datamodule.datasets[split].plan
        assert set(plan[:, 4].tolist()) <= docs and set(plan[:, 5].tolist()) <= docs  # NotNext B too


def test_seed_changes_the_pairs_but_not_the_val_split_or_the_tokenizer(datamodule, tmp_path_factory):
    other = month_datamodule(shared_base(tmp_path_factory), seed=7)
    assert other.tokenizer_dir == datamodule.tokenizer_dir
    for split in ("train", "val"):
        assert (other._prepare()["doc_ids"][split] == datamodule._prepare()["doc_ids"][split]).all()
    assert other.datasets["train"].plan_path != datamodule.datasets["train"].plan_path


def test_namuwiki_sample_uses_the_dev_file_as_val(mirror, tmp_path):
    from omegaconf import OmegaConf

    files = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "data" / "namuwiki_sample.yaml").files)
    dm = month_datamodule(tmp_path, files=files, format="namuwiki", vocab_size=1000, val_fraction=0.0)
    prepared = dm._prepare()
    assert set(prepared["corpora"]) == {"train", "val"}
    # the dev sample has 15 titles; one of them has nothing but headings under it: skipped, counted
    assert len(prepared["doc_ids"]["train"]) == 12 and len(prepared["doc_ids"]["val"]) == 14
    val_stats = json.loads((prepared["corpora"]["val"] / "stats.json").read_text())
    assert val_stats["skipped"]["empty_document"]["count"] == 1
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 32 and set(batch["nsp_labels"].tolist()) <= {0, 1}


def test_two_rank_distributed_sampler_shards_disjoint_and_complete(datamodule):
    dataset = datamodule.datasets["train"]
    n = len(dataset)
    shards = [list(DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=True, seed=3)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == (n + 1) // 2
    # DistributedSampler pads an odd-sized dataset by repeating its first sample(s): exactly that overlap
    assert len(set(shards[0]) & set(shards[1])) == 2 * ((n + 1) // 2) - n
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    # our own sampler (what the datamodule uses under DDP, so Lightning keeps it): same guarantees, by batch
    ours = [list(EpochSampler(dataset, batch_size=32, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    indices = [[i for _, i in shard] for shard in ours]
    assert set(indices[0]) | set(indices[1]) == set(range(n))
    assert not set(indices[0]) & set(indices[1])  # a short rank repeats one of ITS batches
    assert -(-len(indices[0]) // 32) == -(-len(indices[1]) // 32)  # the same number of batches per rank
    for size in (1, 5, 31, 32, 33, 64, 97):  # small datasets: every instance once, batches balanced
        subset = torch.utils.data.Subset(dataset, range(size))
        shards = [[i for _, i in EpochSampler(subset, batch_size=32, num_replicas=2, rank=r)] for r in (0, 1)]
        assert set(shards[0]) | set(shards[1]) == set(range(size))
        assert -(-len(shards[0]) // 32) == -(-len(shards[1]) // 32)


def test_length_bucketing_groups_similar_lengths(datamodule):
    dataset = datamodule.datasets["train"]
    lengths = dataset.lengths()

    def mean_spread(sampler) -> float:
        keys = list(sampler)
        batches = [keys[k : k + 32] for k in range(0, len(keys), 32)]
        return float(np.mean([np.ptp(lengths[[i for _, i in b]]) for b in batches]))

    plain = mean_spread(EpochSampler(dataset, batch_size=32, seed=1))
    bucketed = EpochSampler(dataset, batch_size=32, seed=1, lengths=lengths, bucket_batches=20)
    assert mean_spread(bucketed) < plain / 3
    assert sorted(i for _, i in bucketed) == list(range(len(dataset)))


def test_dataset_pickles_without_memmaps(datamodule):
    dataset = datamodule.datasets["train"]
    dataset[0]
    assert len(pickle.dumps(dataset)) < 10_000


class _Recorder(pl.LightningModule):
    """Trains a dummy parameter and records what each epoch's batches held."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, dict[int, list[int]]] = {}

    def training_step(self, batch, batch_idx):
        rows = self.seen.setdefault(self.current_epoch, {})
        for index, ids in zip(batch["index"].tolist(), batch["input_ids"].tolist(), strict=True):
            rows[index] = ids
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("persistent", [False, True])
def test_masks_change_between_epochs_in_a_real_trainer_with_workers(mirror, tmp_path_factory, persistent):
    dm = month_datamodule(
        shared_base(tmp_path_factory), num_workers=2, persistent_workers=persistent, return_index=True
    )
    module = _Recorder()
    trainer = pl.Trainer(
        max_epochs=3,
        limit_train_batches=3,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=dm)
    dataset = dm.datasets["train"]
    assert sorted(module.seen) == [0, 1, 2]
    for epoch, rows in module.seen.items():
        assert len(rows) == 3 * 32
        for index, ids in list(rows.items())[:20]:
            assert (
                ids[: len(dataset[(epoch, index)]["input_ids"])]
                == dataset[(epoch, index)]["input_ids"].tolist()
            )
    # the workers masked epoch 1 differently from epoch 0 (same instances, other masks)
    changed = [
        dataset[(1, i)]["input_ids"].tolist() != dataset[(0, i)]["input_ids"].tolist() for i in module.seen[1]
    ]
    assert np.mean(changed) > 0.9


# ----------------------------------------------------------------------------------------------------------------
# bad input through the whole datamodule


def _write_petitions(path: Path, records: list) -> dict:
    with path.open("wb") as handle:
        for record in records:
            if isinstance(record, bytes):
                handle.write(record)
            else:
                handle.write(json.dumps(record, ensure_ascii=False).encode())
            handle.write(b"\n")
    return {"name": path.name, "url": None, "sha256": None}


def _small_datamodule(tmp_path: Path, files: list[dict], **overrides) -> PretrainDataModule:
    kwargs = dict(
        files=files,
        mirror=str(tmp_path),
        data_dir=str(tmp_path / "data"),
        cache_dir=str(tmp_path / "cache"),
        sentence_splitter="rule",
        vocab_size=200,
        morpheme_aware=False,
        num_workers=0,
        batch_size=4,
        val_fraction=0.0,
        max_seq_len=32,
    )
    kwargs.update(overrides)
    return PretrainDataModule(**kwargs)


def _doc(i: int, n_sentences: int) -> dict:
    body = " ".join(f"문서 {i}의 문장 {k}번은 이렇게 끝납니다." for k in range(n_sentences))
    return {"title": f"제목 {i}", "content": body}


def test_bad_lines_are_skipped_and_reported_once_at_setup(tmp_path, caplog):
    records = [
        _doc(0, 6),
        b"{not json",
        b"\xc3\x28 invalid utf-8",
        b"",
        {"title": "", "content": ""},
        _doc(1, 4),
    ]
    records += [
        {"title": "[MASK] 한 문장만", "content": ""},
        _doc(2, 5),
        {"title": "\u200b", "content": "\ufeff"},
    ]
    spec = _write_petitions(tmp_path / "petitions_bad", records)
    dm = _small_datamodule(tmp_path, [spec])
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        dm.prepare_data()
        dm.setup("fit")
        dm.setup("validate")
    for kind, line in [("malformed_json", 2), ("invalid_utf8", 3), ("empty_line", 4), ("empty_document", 5)]:
        assert sum(f"of kind {kind} (first at petitions_bad:{line})" in m for m in caplog.messages) == 1
    assert any("special-token strings in the text were replaced by [UNK]" in m for m in caplog.messages)
    assert any("train split: 1 documents have no token and were skipped" in m for m in caplog.messages)
    dataset = dm.datasets["train"]
    labels = [dataset[i]["nsp_label"] for i in range(len(dataset))]
    plan = dataset.plan
    assert labels == (plan[:, 4] != plan[:, 5]).astype(int).tolist()
    # the one-sentence document (doc 2 in the corpus) only ever forms NotNext instances as A
    assert all(plan[plan[:, 4] == 2][:, 5] != 2)
    for batch in DataLoader(dataset, batch_size=4, collate_fn=dm.train_dataloader().collate_fn):
        assert not (
            (batch["input_ids"] == 4) & (batch["mlm_labels"] == -100)
        ).any()  # no [MASK] from the text


def test_a_single_document_corpus_is_a_clear_error(tmp_path):
    spec = _write_petitions(tmp_path / "petitions_one", [_doc(0, 30)])
    with pytest.raises(NotEnoughDocumentsError, match="petitions_one.*1 usable document.*NotNext"):
        _small_datamodule(tmp_path, [spec]).prepare_data()
    with pytest.raises(NotEnoughDocumentsError, match="petitions_one.*cannot be split"):
        _small_datamodule(tmp_path, [spec], val_fraction=0.1).prepare_data()


def test_missing_file_and_checksum_mismatch_fail_before_training(tmp_path):
    missing = {"name": "petitions/petitions_1999-01", "url": "http://127.0.0.1:9/x", "sha256": None}
    with pytest.raises(RuntimeError, match="petitions/petitions_1999-01.*127.0.0.1:9"):
        _small_datamodule(tmp_path, [missing]).prepare_data()
    spec = _write_petitions(tmp_path / "petitions_ok", [_doc(0, 3), _doc(1, 3)])
    with pytest.raises(RuntimeError, match="petitions_ok.*wrong sha256"):
        _small_datamodule(tmp_path, [{**spec, "sha256": "ab" * 32}]).prepare_data()


@pytest.mark.parametrize("name", ["petition", "namuwiki", "namuwiki_sample"])
def test_data_configs_compose_and_instantiate(name, monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    monkeypatch.setenv("BERT_PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=[f"data={name}"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, PretrainDataModule)
    assert dm.data_dir == ROOT / "data" and dm.cache_dir == ROOT / ".cache"
    assert all(spec["url"].startswith("https://") for spec in dm.files)
    assert all(spec["sha256"] is None or len(spec["sha256"]) == 64 for spec in dm.files)
    assert dm._prepared is None  # constructing does no I/O


DDP_SCRIPT = """
import json, sys
from pathlib import Path
import pytorch_lightning as pl
import torch
sys.path.insert(0, {root!r})
from tests.test_pretrain_data import month_datamodule

class Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = {{}}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(batch["index"].tolist())
        return (self.weight * batch["input_ids"].float().mean()).sum()

    def on_train_end(self):
        sampler = type(self.trainer.train_dataloader.sampler).__name__
        Path({out!r}, f"rank{{self.global_rank}}.json").write_text(json.dumps([sampler, self.seen]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

if __name__ == "__main__":
    dm = month_datamodule(Path({base!r}), num_workers=1, persistent_workers=True, return_index=True,
                          length_bucketing=True)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_val_batches=0,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Recorder(), datamodule=dm)
"""


@pytest.mark.slow
def test_real_two_process_ddp_keeps_our_sampler_and_shards_disjointly(mirror, tmp_path, tmp_path_factory):
    """Lightning DDP (2 CPU processes, gloo): our EpochSampler is kept (not wrapped), the two ranks' instances
    are disjoint and cover the split, and every epoch has its own order."""
    import subprocess
    import sys

    base = shared_base(tmp_path_factory)
    n = len(month_datamodule(base).datasets["train"])
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path), base=str(base)))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [sampler for sampler, _ in ranks] == ["EpochSampler", "EpochSampler"]
    for epoch in ("0", "1"):
        first, second = (set(seen[epoch]) for _, seen in ranks)
        assert not first & second and len(first | second) == n
    assert ranks[0][1]["0"][:32] != ranks[0][1]["1"][:32]


def test_tokenizer_sample_limits(datamodule):
    from datamodules.corpora import SentenceCorpus
    from datamodules.pretrain import tokenizer_sample

    prepared = datamodule._prepare()
    corpus = SentenceCorpus(prepared["corpora"]["train"])
    train_docs = prepared["doc_ids"]["train"]
    assert len(list(tokenizer_sample(corpus, train_docs, 0, max_sentences=100))) == 100
    sample = list(tokenizer_sample(corpus, train_docs, 0, max_bytes=20_000))
    assert 20_000 <= sum(len(s.encode()) for s in sample) < 21_000
    # no limit: exactly the sentences of the TRAIN documents (val documents never reach the tokenizer)
    train_sentences = [s for d in train_docs for s in corpus.document(int(d))]
    assert sorted(tokenizer_sample(corpus, train_docs, 0)) == sorted(train_sentences)
