"""Sentence-task data: the real mirrored files, the splits, encoding against transformers' tokenizer, and
bad input (missing field, unknown label, empty sentence, over-long pair)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from datamodules.klue_nli import KlueNliDataModule, read_klue_nli
from datamodules.klue_sts import KlueStsDataModule, read_klue_sts
from datamodules.petition_topic import PetitionTopicDataModule, read_petitions, stable_bucket
from datamodules.sentence import EncodeStats, SentenceEncoder, collate_sentences, truncate_pair
from tests.tiny_encoder import make_tokenizer

NLI = ["entailment", "neutral", "contradiction"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, mirror) -> Path:
    return make_tokenizer(mirror, tmp_path_factory.mktemp("tok") / "tokenizer")


def datamodule(cls, mirror, tokenizer_dir, files, **kw):
    dm = cls(files=files, mirror=str(mirror), data_dir=str(mirror / "nowhere"), tokenizer_dir=str(tokenizer_dir), **kw)
    dm.setup()
    return dm


def test_real_nli_file_splits_by_premise(mirror, tokenizer_dir):
    dm = datamodule(KlueNliDataModule, mirror, tokenizer_dir, [{"name": "klue/klue-nli-v1.1_dev.json"}], labels=NLI)
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 2400, "val": 300, "test": 300}
    premises = {name: {ex.text_a for ex in ds.examples} for name, ds in dm.datasets.items()}
    # KLUE gives each premise one hypothesis per label: a premise shared across splits would show a model the
    # two other labels in train (anti-informative), so no premise may be in two splits
    assert not premises["train"] & premises["val"] and not premises["train"] & premises["test"]
    assert not premises["val"] & premises["test"]
    for name, ds in dm.datasets.items():
        assert Counter(ex.label for ex in ds.examples) == Counter({label: len(ds) // 3 for label in NLI}), name
    test = dm.datasets["test"]
    assert test.examples[0].guid == "klue-nli-v1_dev_00000"  # premise 0 -> test
    item = test.items[0]
    assert item["input_ids"][0] == 2 and item["token_type_ids"].max() == 1 and item["labels"].dtype == torch.long
    batch = collate_sentences([test[i] for i in range(5)])
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["labels"].tolist() == [
        NLI.index(ex.label) for ex in test.examples[:5]
    ]


def test_real_sts_file(mirror, tokenizer_dir):
    dm = datamodule(KlueStsDataModule, mirror, tokenizer_dir, [{"name": "klue/klue-sts-v1.1_dev.json"}],
                    split={"modulus": 5, "test_mod": 0, "val_mod": 1})  # fmt: skip
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 311, "val": 104, "test": 104}
    batch = collate_sentences([dm.datasets["val"][i] for i in range(8)])
    assert batch["labels"].dtype == torch.float32 and set(batch["binary_labels"].tolist()) <= {0, 1}
    assert ((batch["labels"] >= 3.0).long() == batch["binary_labels"]).all()


def test_real_petitions_split_by_petition(mirror, tokenizer_dir, tmp_path):
    names = [f"petitions/petitions_{m}" for m in ("2017-08", "2019-04", "2019-05", "2019-06", "2019-07")]
    labels = sorted({json.loads(line)["category"] for n in names for line in open(mirror / n, encoding="utf-8")})
    dm = datamodule(PetitionTopicDataModule, mirror, tokenizer_dir, [{"name": n} for n in names], labels=labels)
    sizes = {k: len(v) for k, v in dm.datasets.items()}
    assert sum(sizes.values()) == 3052 and 250 < sizes["test"] < 360 and 250 < sizes["val"] < 360
    ids = {k: {ex.guid for ex in v.examples} for k, v in dm.datasets.items()}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    for ex in dm.datasets["test"].examples[:20]:
        assert stable_bucket(ex.guid) % 10 == 0
    assert dm.stats["train"].truncated > 0.5 * sizes["train"]  # most petitions are longer than 128 pieces

    # the same petition in two files: kept once (and in one split), the repeat counted
    one = (mirror / names[0]).read_text(encoding="utf-8").splitlines()[:30]
    for name in ("a", "b"):
        (tmp_path / name).write_text("\n".join(one) + "\n", encoding="utf-8")
    dup = datamodule(PetitionTopicDataModule, tmp_path, tokenizer_dir, [{"name": "a"}, {"name": "b"}], labels=labels)
    assert sum(len(v) for v in dup.datasets.values()) == 30


def test_encoding_matches_transformers_longest_first(tokenizer_dir, mirror):
    """Pairs (short, one long side, both long; odd and even budgets) encode as transformers'
    tokenizer(a, b, truncation="longest_first") does with the exported tokenizer files."""
    transformers = pytest.importorskip("transformers")
    from bert.tokenizer import load_tokenizer

    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    records = json.loads((mirror / "klue/klue-nli-v1.1_dev.json").read_text(encoding="utf-8"))[:40]
    long_text = " ".join(r["premise"] for r in records[:10])
    pairs = [(r["premise"], r["hypothesis"]) for r in records[:10]]
    pairs += [(long_text, records[0]["hypothesis"]), (records[1]["premise"], long_text), (long_text, long_text[::-1])]
    for max_len in (24, 25, 128):
        stats = EncodeStats()
        ours = SentenceEncoder(load_tokenizer(tokenizer_dir), max_len).encode(pairs, stats)
        n_cut = 0
        for (a, b), item in zip(pairs, ours):
            ref = hf(a, b, truncation="longest_first", max_length=max_len)
            full = hf(a, b)
            n_cut += len(full["input_ids"]) > max_len
            assert item["input_ids"].tolist() == ref["input_ids"], (a[:20], b[:20], max_len)
            assert item["token_type_ids"].tolist() == ref["token_type_ids"]
        assert stats.truncated == n_cut and stats.examples == len(pairs)
    single = SentenceEncoder(load_tokenizer(tokenizer_dir), 16).encode([(long_text, None)])[0]
    assert single["input_ids"].tolist() == hf(long_text, truncation=True, max_length=16)["input_ids"]


def test_precut_of_very_long_texts_changes_nothing(tokenizer_dir, mirror):
    """Texts far over the budget are cut at a space before tokenization: the same ids as encoding all of it."""
    from bert.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    text = " ".join(json.loads(line)["content"] for _, line in zip(range(5), open(mirror / "petitions/petitions_2019-04", encoding="utf-8")))
    encoder = SentenceEncoder(tokenizer, 32)
    assert len(text) > encoder.CHARS_PER_PIECE_CAP * 32
    full = tokenizer.encode(text, add_special_tokens=False).ids[:30]
    assert encoder.encode([(text, None)])[0]["input_ids"].tolist() == [2, *full, 3]
    no_spaces = "가" * 5000  # no space to cut at: encoded whole
    assert len(encoder.encode([(no_spaces, None)])[0]["input_ids"]) <= 32


def test_truncate_pair_counts():
    assert truncate_pair([1, 2, 3], [4], 10) == ([1, 2, 3], [4], 0)
    assert truncate_pair([1, 2, 3, 4, 5], [6, 7], 4) == ([1, 2], [6, 7], 3)
    assert truncate_pair([1, 2, 3], [4, 5, 6], 5) == ([1, 2], [4, 5, 6], 1)
    assert truncate_pair([1, 2, 3], None, 2) == ([1, 2], None, 1)


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


NLI_RECORD = {"guid": "g1", "premise": "비가 온다.", "hypothesis": "날씨가 맑다.", "gold_label": "contradiction"}


def test_nli_bad_records(tmp_path, caplog):
    missing = write_json(tmp_path / "missing.json", [NLI_RECORD, {k: v for k, v in NLI_RECORD.items() if k != "hypothesis"} | {"guid": "g2"}])
    with pytest.raises(ValueError, match=r"missing\.json: record 1 \(guid g2\): missing field 'hypothesis'"):
        read_klue_nli(missing, NLI)
    unknown = write_json(tmp_path / "unknown.json", [NLI_RECORD | {"guid": "g7", "gold_label": "maybe"}])
    with pytest.raises(ValueError, match=r"unknown\.json: record 0 \(guid g7\): unknown label 'maybe'"):
        read_klue_nli(unknown, NLI)
    wrong_type = write_json(tmp_path / "type.json", [NLI_RECORD | {"premise": None}])
    with pytest.raises(ValueError, match=r"type\.json: record 0 \(guid g1\): field 'premise' should be str"):
        read_klue_nli(wrong_type, NLI)
    not_list = write_json(tmp_path / "obj.json", {"data": []})
    with pytest.raises(ValueError, match=r"obj\.json: expected a JSON list"):
        read_klue_nli(not_list, NLI)
    empty = write_json(tmp_path / "empty.json", [NLI_RECORD, NLI_RECORD | {"guid": "g3", "premise": "  "}])
    examples, skipped = read_klue_nli(empty, NLI)
    assert len(examples) == 1 and skipped.count == 1 and "guid g3" in skipped.examples[0]
    with caplog.at_level(logging.WARNING):
        KlueNliDataModule(files=[], labels=NLI).read([empty])
    assert "skipped 1 records with an empty premise or hypothesis" in caplog.text and "empty.json" in caplog.text


STS_RECORD = {"guid": "s1", "sentence1": "a", "sentence2": "b", "labels": {"label": 3.2, "binary-label": 1}}


def test_sts_bad_records(tmp_path):
    missing = write_json(tmp_path / "sts.json", [STS_RECORD | {"guid": "s9", "labels": {"label": 1.0}}])
    with pytest.raises(ValueError, match=r"sts\.json: record 0 \(guid s9\): missing field 'labels.binary-label'"):
        read_klue_sts(missing)
    out_of_range = write_json(tmp_path / "range.json", [STS_RECORD | {"labels": {"label": 7, "binary-label": 1}}])
    with pytest.raises(ValueError, match=r"range\.json: record 0 \(guid s1\): labels.label 7.0 is outside"):
        read_klue_sts(out_of_range)
    bad_binary = write_json(tmp_path / "bin.json", [STS_RECORD | {"labels": {"label": 1, "binary-label": 2}}])
    with pytest.raises(ValueError, match="unknown labels.binary-label 2"):
        read_klue_sts(bad_binary)
    empty = write_json(tmp_path / "empty.json", [STS_RECORD, STS_RECORD | {"sentence2": ""}])
    examples, skipped = read_klue_sts(empty)
    assert len(examples) == 1 and skipped.count == 1
    with pytest.raises(ValueError, match="regression task"):
        KlueStsDataModule(files=[], labels=["x"]).read([empty])


def test_petition_bad_records(tmp_path):
    good = {"petition_idx": "7", "category": "기타", "title": "제목", "content": "내용", "num_agree": 1}
    path = tmp_path / "petitions_x"
    path.write_text(json.dumps(good, ensure_ascii=False) + "\n" + json.dumps({k: v for k, v in good.items() if k != "category"} | {"petition_idx": "8"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"petitions_x:2 \(petition_idx 8\): missing field 'category'"):
        read_petitions(path, ["기타"])
    path.write_text(json.dumps(good | {"category": "우주"}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"petitions_x:1 \(petition_idx 7\): unknown category '우주'"):
        read_petitions(path, ["기타"])
    path.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"petitions_x:1: not a JSON object"):
        read_petitions(path, ["기타"])
    path.write_text(json.dumps(good | {"title": "", "content": " "}) + "\n" + json.dumps(good, ensure_ascii=False) + "\n", encoding="utf-8")
    examples, skipped = read_petitions(path, ["기타"])
    assert len(examples) == 1 and skipped.count == 1 and "petitions_x:1" in skipped.examples[0]


def test_stable_bucket_is_sha256():
    import hashlib

    assert stable_bucket("12345") == int(hashlib.sha256(b"12345").hexdigest()[:16], 16)
