"""datamodules/corpora.py and lines.py: readers, bad input, the cached sentences file, lazy line access."""

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import corpora
from datamodules import lines as lines_module
from datamodules.corpora import SentenceCorpus, prepare_sentences, rule_split
from datamodules.lines import LinecacheLineReader, OffsetsLineReader, open_lines

NAMU_TRAIN = "namuwiki/namuwikitext_20200302.train.sample"


def _petition(title: str, content: str) -> str:
    return json.dumps({"category": "기타", "title": title, "content": content}, ensure_ascii=False)


def _prepare(
    tmp_path: Path, files: list[Path], fmt: str = "petitions", splitter: str = "rule"
) -> SentenceCorpus:
    digests = [str(i) + path.name for i, path in enumerate(files)]  # any stable key will do here
    out = prepare_sentences(
        files, fmt, tmp_path / "cache", digests, splitter=splitter, names=[p.name for p in files]
    )
    return SentenceCorpus(out)


def test_bad_petition_lines_are_counted_with_their_location(tmp_path):
    raw = tmp_path / "petitions_bad"
    lines = [
        _petition("첫 청원", "문장 하나입니다. 문장 둘입니다."),  # 1: fine
        b'{"title": "broken", "content": '.decode(),  # 2: malformed JSON
        None,  # 3: invalid UTF-8
        "",  # 4: empty line
        _petition("", "   "),  # 5: empty document
        _petition("한 문장뿐", ""),  # 6: one-sentence document (kept)
        "[1, 2]",  # 7: JSON but not a petition
        _petition("셋째", "줄\r바꿈\u2028문자."),  # 8: line breaks inside the text must not split lines
    ]
    with raw.open("wb") as handle:
        for line in lines:
            handle.write(b"\xff\xfe bad bytes" if line is None else line.encode())
            handle.write(b"\n")
    corpus = _prepare(tmp_path, [raw])
    skipped = corpus.stats["skipped"]
    assert skipped["malformed_json"] == {"count": 1, "first": ["petitions_bad:2"]}
    assert skipped["invalid_utf8"] == {"count": 1, "first": ["petitions_bad:3"]}
    assert skipped["empty_line"] == {"count": 1, "first": ["petitions_bad:4"]}
    assert skipped["empty_document"] == {"count": 1, "first": ["petitions_bad:5"]}
    assert skipped["malformed_record"] == {"count": 1, "first": ["petitions_bad:7"]}
    assert len(corpus) == 3 and corpus.stats["single_sentence_documents"] == 1
    assert corpus.document(0) == ["첫 청원", "문장 하나입니다.", "문장 둘입니다."]
    assert corpus.document(1) == ["한 문장뿐"]
    assert corpus.document(2) == ["셋째", "줄 바꿈 문자."]
    assert [corpus.where(i) for i in range(3)] == ["petitions_bad:1", "petitions_bad:6", "petitions_bad:8"]
    # the sentences file: one sentence a line, a blank line after each document
    text = corpus.sentences_path.read_text(encoding="utf-8")
    assert text.split("\n\n")[:3] == [
        "첫 청원\n문장 하나입니다.\n문장 둘입니다.",
        "한 문장뿐",
        "셋째\n줄 바꿈 문자.",
    ]


def test_kiwi_splits_real_petitions_without_punctuation(mirror, tmp_path):
    head = tmp_path / "petitions_head"
    with open(mirror / "petitions/petitions_2019-04", "rb") as src:
        head.write_bytes(b"".join(src.readline() for _ in range(8)))
    head.open("ab").write(
        (_petition("제목", "학교는 인력센터가 아닙니다 정말 간곡히 부탁드립니다") + "\n").encode()
    )
    corpus = _prepare(tmp_path, [head], splitter="kiwi")
    assert len(corpus) == 9
    originals = [json.loads(line) for line in head.read_text(encoding="utf-8").splitlines()]
    for index, record in enumerate(originals):
        sentences = corpus.document(index)
        assert sentences[0] == record["title"].strip()
        # nothing lost or reordered: the sentences are the content, whitespace aside
        assert "".join(sentences[1:]).replace(" ", "") == record["content"].replace(" ", "")
    assert corpus.document(8)[1:] == [
        "학교는 인력센터가 아닙니다",
        "정말 간곡히 부탁드립니다",
    ]  # no punctuation at all
    assert sum(len(corpus.document(i)) for i in range(8)) > 8 * 5


def test_rule_splitter():
    assert rule_split('그가 말했다. "정말?" 그렇다! 3.5% 올랐다… 끝') == [
        "그가 말했다.",
        '"정말?"',
        "그렇다!",
        "3.5% 올랐다…",
        "끝",
    ]


def test_namuwiki_sample_documents_and_headings(mirror, tmp_path):
    raw = mirror / NAMU_TRAIN
    corpus = _prepare(tmp_path, [raw], fmt="namuwiki")
    titles = [line for line in raw.read_text(encoding="utf-8").splitlines() if corpus_title(line)]
    assert len(corpus) == len(titles) == 12
    every_sentence = [s for i in range(len(corpus)) for s in corpus.document(i)]
    assert not any(s.startswith("=") for s in every_sentence)  # titles and headings are not sentences
    assert corpus.document(0)[0] == "인기 호러게임 Five Nights at Freddy's 시리즈의 실사화 영화"
    # the zipped release layout gives the same corpus
    archive = tmp_path / "namu.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(raw, "namuwikitext_20200302.train")
    zipped = SentenceCorpus(
        prepare_sentences(
            [archive], "namuwiki", tmp_path / "cache2", ["zip"], splitter="rule", names=["namu.zip"]
        )
    )
    assert zipped.sentences_path.read_bytes() == corpus.sentences_path.read_bytes()


def corpus_title(line: str) -> bool:
    return corpora._title(line) is not None


def test_preparation_is_cached_by_key(tmp_path, monkeypatch):
    raw = tmp_path / "p"
    raw.write_text(_petition("a", "b. c.") + "\n" + _petition("d", "e.") + "\n", encoding="utf-8")
    first = _prepare(tmp_path, [raw])
    monkeypatch.setattr(corpora, "make_splitter", lambda *a, **k: pytest.fail("prepared twice"))
    assert _prepare(tmp_path, [raw]).dir == first.dir
    assert not list(first.dir.glob(".*tmp"))  # no temporary file left behind


# ----------------------------------------------------------------------------------------------------------------
# line readers


@pytest.fixture
def lines_file(tmp_path: Path) -> tuple[Path, list[str]]:
    lines = [f"{i}번째 문장 {'가' * (i % 7)}" if i % 5 else "" for i in range(500)]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, lines


@pytest.mark.parametrize("reader", ["offsets", "linecache"])
def test_line_readers_return_every_line(lines_file, reader, monkeypatch):
    monkeypatch.setattr(lines_module, "SCAN_CHUNK", 7)  # many chunk boundaries inside lines and characters
    path, lines = lines_file
    lazy = open_lines(path, reader)
    assert len(lazy) == len(lines)
    for i in [0, 1, 5, 123, 499, -1]:
        assert lazy[i] == lines[i]
    with pytest.raises(IndexError):
        lazy[500]


def test_offsets_index_is_saved_and_rebuilt_when_the_file_changes(lines_file):
    path, lines = lines_file
    reader = OffsetsLineReader(path)
    assert reader.index_path.is_file() and np.load(reader.index_path).dtype == np.int64
    path.write_text("\n".join(["새 줄"] + lines) + "\n", encoding="utf-8")
    os.utime(path, ns=(0, 12345))
    reader = OffsetsLineReader(path)
    assert len(reader) == len(lines) + 1 and reader[0] == "새 줄" and reader[1] == lines[0]


def test_no_handle_or_index_is_pickled(lines_file):
    path, _ = lines_file
    reader = OffsetsLineReader(path)
    reader[3]  # opens the handle and the memory map in this process
    state = pickle.loads(pickle.dumps(reader))
    assert state._handle is None and state._offsets is None and state._pid is None
    assert len(pickle.dumps(reader)) < 1000


class _LineDataset(torch.utils.data.Dataset):
    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, i):
        return os.getpid(), self.reader[i]


@pytest.mark.parametrize("reader_cls", [OffsetsLineReader, LinecacheLineReader])
def test_line_readers_work_in_dataloader_workers(lines_file, reader_cls):
    path, lines = lines_file
    reader = reader_cls(path)
    if isinstance(reader, OffsetsLineReader):
        reader[0]  # a handle opened in the parent must not leak into the workers
    loader = torch.utils.data.DataLoader(
        _LineDataset(reader), batch_size=50, num_workers=2, collate_fn=lambda items: items
    )
    seen = [item for batch in loader for item in batch]
    assert [text for _, text in seen] == lines
    assert os.getpid() not in {pid for pid, _ in seen}


def test_klue_ner_train_text_is_the_ner_tasks_train_split_only(tmp_path):
    """Task-adaptive pretraining text: exactly the sentences the NER task trains on, none of its val/test."""
    from datamodules.klue_ner import read_klue_ner, split_by_index

    blocks = []
    for i in range(23):
        text = f"문장 {i}번 서울"
        chars = "\n".join(f"{c}\t{'B-LC' if c == '서' else 'I-LC' if c == '울' else 'O'}" for c in text)
        blocks.append(f"## guid-{i}\t{text}\n{chars}\n")
    blocks.insert(5, "## empty-one\t\n")  # a header without characters: skipped by the NER reader too
    raw = tmp_path / "klue-ner.tsv"
    raw.write_text("## KLUE header comment\n" + "\n".join(blocks), encoding="utf-8")

    corpus = _prepare(tmp_path, [raw], fmt="klue_ner_train")
    splits = split_by_index(read_klue_ner(raw))
    texts = [corpus.document(i) for i in range(len(corpus))]
    assert texts == [[s.text] for s in splits["train"]]  # one sentence per document, in file order
    assert len(texts) == 23 - 3 - 3  # i = 0, 10, 20 -> test; 1, 11, 21 -> val
    held_out = {s.text for s in splits["val"] + splits["test"]}
    assert held_out and not held_out & {t for (t,) in texts}
    assert corpus.where(0) == f"klue-ner.tsv:{splits['train'][0].line_no}"
