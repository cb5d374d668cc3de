"""KLUE-NER reader, splits, character <-> wordpiece alignment and the alignment ceiling."""

import json
import logging
import os
import time
from pathlib import Path

import pytest

from bert.ner_align import (
    AlignmentStats,
    align_tags,
    alignment_ceiling,
    drop_spaces,
    encode_for_ner,
    pieces_to_char_tags,
)
from bert.tokenizer import save_tokenizer, tokenizer_from_vocab, train_tokenizer
from datamodules.klue_ner import (
    LABELS,
    KlueNerDataModule,
    KlueNerDataset,
    NerSentence,
    collate_ner,
    id2label,
    label2id,
    parse_klue_ner,
    read_klue_ner,
    split_by_index,
)

ROOT = Path(__file__).resolve().parents[1]
MIRROR = (ROOT / os.environ.get("BERT_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))).resolve()
KLUE_DEV = MIRROR / "klue" / "klue-ner-v1.1_dev.tsv"
needs_mirror = pytest.mark.skipif(not KLUE_DEV.is_file(), reason=f"no data mirror at {MIRROR}")

GOOD = """## 주석 : ##
## guid-0\t<이순신:PS>은 서울에 갔다.
이\tB-PS
순\tI-PS
신\tI-PS
은\tO
 \tO
서\tB-LC
울\tI-LC
에\tO

## guid-1\t<김 대중:PS>
김\tB-PS
 \tI-PS
대\tI-PS
중\tI-PS
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ner.tsv"
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------
# labels and reader


def test_labels():
    assert len(LABELS) == 13 and LABELS[0] == "O" and label2id["O"] == 0
    assert all(id2label[label2id[label]] == label for label in LABELS)
    assert {label[2:] for label in LABELS[1:]} == {"PS", "LC", "OG", "DT", "TI", "QT"}


def test_reader_good_file(tmp_path):
    sentences = read_klue_ner(write(tmp_path, GOOD))
    assert [s.guid for s in sentences] == ["guid-0", "guid-1"]
    assert sentences[0].text == "이순신은 서울에"
    assert sentences[0].tags[:4] == ["B-PS", "I-PS", "I-PS", "O"]
    assert sentences[0].line_no == 3 and sentences[1].line_no == 13
    assert sentences[1].chars[1] == " " and sentences[1].tags[1] == "I-PS"


def test_reader_line_without_tab(tmp_path):
    path = write(tmp_path, GOOD.replace("순\tI-PS", "순 I-PS"))
    with pytest.raises(ValueError, match=rf"{path.name}:4: .*no tab"):
        read_klue_ner(path)


def test_reader_unknown_tag(tmp_path):
    path = write(tmp_path, GOOD.replace("울\tI-LC", "울\tI-XX"))
    with pytest.raises(ValueError, match=rf"{path.name}:9: unknown tag 'I-XX'"):
        read_klue_ner(path)


def test_reader_repairs_dangling_inside_tags_and_warns_once(tmp_path, caplog):
    text = GOOD.replace("서\tB-LC", "서\tI-LC").replace("김\tB-PS", "김\tI-PS").replace("은\tO", "은\tI-OG")
    with caplog.at_level(logging.WARNING, logger="datamodules.klue_ner"):
        sentences = read_klue_ner(write(tmp_path, text))
    # 은 (I-OG after I-PS: other type), 서 (I-LC after O), 김 (I-PS at a sentence start)
    assert sentences[0].tags[3] == "B-OG" and sentences[0].tags[5] == "B-LC"
    assert sentences[1].tags[:2] == ["B-PS", "I-PS"]
    warnings = [record for record in caplog.records if "repaired" in record.getMessage()]
    assert len(warnings) == 1 and "repaired 3 " in warnings[0].getMessage()
    _, stats = parse_klue_ner(text.splitlines())
    assert stats.tags_repaired == 3


def test_reader_skips_and_counts_empty_sentences(tmp_path, caplog):
    text = GOOD.replace("## guid-1", "## guid-empty\tnothing\n\n## guid-1")
    with caplog.at_level(logging.WARNING, logger="datamodules.klue_ner"):
        sentences = read_klue_ner(write(tmp_path, text))
    assert [s.guid for s in sentences] == ["guid-0", "guid-1"]
    assert any("skipped 1 empty" in record.getMessage() for record in caplog.records)
    assert parse_klue_ner(text.splitlines())[1].empty_sentences_skipped == 1


def test_reader_missing_file(tmp_path):
    missing = tmp_path / "nope" / "klue-ner.tsv"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_klue_ner(missing)


@needs_mirror
def test_reader_and_split_on_mirror():
    sentences = read_klue_ner(KLUE_DEV)
    assert len(sentences) == 5000
    first = sentences[0]
    assert first.guid == "klue-ner-v1_dev_00000-wikitree"
    assert first.text.startswith("경찰은 또 성매매") and first.tags[:3] == ["B-OG", "I-OG", "O"]
    assert all(len(s.chars) == len(s.tags) and all(len(c) == 1 for c in s.chars) for s in sentences)
    splits = split_by_index(sentences)
    assert {name: len(part) for name, part in splits.items()} == {"train": 4000, "val": 500, "test": 500}
    assert splits["test"][0] is sentences[0] and splits["val"][0] is sentences[1]
    assert splits["test"][1] is sentences[10]


def test_split_is_configurable():
    sentences = [NerSentence(["가"], ["O"], guid=str(i)) for i in range(20)]
    splits = split_by_index(sentences, test_mod=3, val_mod=4, modulus=5)
    assert [s.guid for s in splits["test"]] == ["3", "8", "13", "18"]
    assert [s.guid for s in splits["val"]] == ["4", "9", "14", "19"]
    assert len(splits["train"]) == 12
    with pytest.raises(ValueError):
        split_by_index(sentences, test_mod=1, val_mod=1)


def test_datamodule_on_mirror(tmp_path, mirror):
    tokenizer_dir = tmp_path / "tok"
    save_tokenizer(tokenizer_from_vocab(["이순신", "##은", "서울", "##에", "갔", "##다"]), tokenizer_dir)
    file = {"name": "klue/klue-ner-v1.1_dev.tsv", "url": None,
            "sha256": "0f4d5e818f7b82d299c3a87856fc40a706f5943207580ddb252397e387050a54"}  # fmt: skip
    dm = KlueNerDataModule(
        file, mirror=str(mirror), data_dir=str(tmp_path / "data"), tokenizer_dir=str(tokenizer_dir)
    )
    dm.prepare_data()
    dm.setup("fit")
    assert {name: len(ds) for name, ds in dm.datasets.items()} == {"train": 4000, "val": 500, "test": 500}
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 32 and len(batch["chars"]) == len(batch["char_tags"]) == 32
    assert all(len(c) == len(t) == n for c, t, n in zip(batch["chars"], batch["char_tags"], batch["n_chars"]))

    missing = KlueNerDataModule({"name": "klue/nope.tsv", "url": None, "sha256": None}, mirror=str(mirror),
                                data_dir=str(tmp_path / "data"), tokenizer_dir=str(tokenizer_dir))  # fmt: skip
    with pytest.raises(Exception, match="nope.tsv"):
        missing.prepare_data()


# ---------------------------------------------------------------------------------------------------------
# alignment

# 이순신(PS)+은(O): the particle glued to the name
CHARS = list("이순신은 서울에 갔다")
TAGS = ["B-PS", "I-PS", "I-PS", "O", "O", "B-LC", "I-LC", "O", "O", "O", "O"]


def test_glued_particle_round_trip_with_morpheme_vocab():
    tokenizer = tokenizer_from_vocab(["이순신", "##은", "서울", "##에", "갔", "##다"])
    encoded = encode_for_ner(CHARS, TAGS, tokenizer)
    assert tokenizer.decode(encoded.input_ids, skip_special_tokens=False).startswith("[CLS] 이순신")
    assert encoded.piece_tags == [None, "B-PS", "O", "B-LC", "O", "O", "O", None]
    decoded = pieces_to_char_tags(encoded.offsets, encoded.piece_tags, len(CHARS))
    assert decoded == TAGS
    assert alignment_ceiling([(CHARS, TAGS)], tokenizer)["entity_f1_micro"] == 1.0


def test_glued_particle_lost_when_one_piece():
    tokenizer = tokenizer_from_vocab(["이순신은", "서울에", "갔다"])
    encoded = encode_for_ner(CHARS, TAGS, tokenizer)
    assert encoded.piece_tags == [None, "B-PS", "B-LC", "O", None]
    decoded = pieces_to_char_tags(encoded.offsets, encoded.piece_tags, len(CHARS))
    assert decoded[:4] == ["B-PS", "I-PS", "I-PS", "I-PS"]  # the particle joins the name
    ceiling = alignment_ceiling([(CHARS, TAGS)], tokenizer)
    assert ceiling["entity_f1_micro"] == 0.0 and ceiling["sentences_exact"] == 0.0


def test_unk_word_takes_its_first_character_tag():
    tokenizer = tokenizer_from_vocab(["서울", "##에", "갔", "##다"])  # 이순신은 is one [UNK]
    encoded = encode_for_ner(CHARS, TAGS, tokenizer)
    assert encoded.input_ids[1] == tokenizer.token_to_id("[UNK]") and encoded.offsets[1] == (0, 4)
    assert encoded.piece_tags[1] == "B-PS"


def test_multi_word_entity_survives_space_dropping():
    chars, tags = list("김 대중"), ["B-PS", "I-PS", "I-PS", "I-PS"]
    tokenizer = tokenizer_from_vocab(["김", "대", "##중"])
    encoded = encode_for_ner(chars, tags, tokenizer)
    decoded = pieces_to_char_tags(encoded.offsets, encoded.piece_tags, len(chars))
    assert decoded == ["B-PS", "O", "I-PS", "I-PS"]  # the space is covered by no piece
    assert drop_spaces(chars, decoded) == (list("김대중"), ["B-PS", "I-PS", "I-PS"])
    assert drop_spaces(chars, tags)[1] == ["B-PS", "I-PS", "I-PS"]


def test_align_and_decode_primitives():
    offsets = [(0, 0), (0, 2), (2, 3), (4, 6), (0, 0)]
    char_tags = ["B-DT", "I-DT", "O", " ", "B-QT", "I-QT"]
    assert align_tags(offsets, char_tags) == [None, "B-DT", "O", "B-QT", None]
    assert pieces_to_char_tags(offsets, [None, "B-DT", "O", "I-QT", None], 6) == [
        "B-DT", "I-DT", "O", "O", "I-QT", "I-QT",
    ]  # fmt: skip
    with pytest.raises(ValueError):
        pieces_to_char_tags(offsets, ["O"], 6)


def test_truncation_is_counted_not_fatal():
    tokenizer = tokenizer_from_vocab(list("이순신은서울에갔다") + ["##" + c for c in "순신은울에다"])
    stats = AlignmentStats()
    encoded = encode_for_ner(CHARS, TAGS, tokenizer, max_seq_len=5, stats=stats)
    assert len(encoded.input_ids) == 5 and encoded.truncated
    assert stats.truncated == 1 and stats.pieces_cut == 6 and stats.chars_cut == 6
    decoded = pieces_to_char_tags(encoded.offsets, encoded.piece_tags, len(CHARS))
    assert decoded[:3] == TAGS[:3] and set(decoded[3:]) == {"O"}


def test_dataset_and_collate():
    tokenizer = tokenizer_from_vocab(["이순신", "##은", "서울", "##에", "갔", "##다", "김", "대", "##중"])
    sentences = [NerSentence(CHARS, TAGS), NerSentence(list("김 대중"), ["B-PS", "I-PS", "I-PS", "I-PS"])]
    dataset = KlueNerDataset(sentences, tokenizer, max_seq_len=16)
    assert len(dataset) == 2 and dataset.stats.truncated == 0
    item = dataset[0]
    assert item["labels"].tolist() == [-100, label2id["B-PS"], 0, label2id["B-LC"], 0, 0, 0, -100]
    batch = collate_ner([dataset[0], dataset[1]])
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"][1].tolist() == [1] * 5 + [0] * 3
    assert batch["labels"][1, 5:].tolist() == [-100] * 3 and batch["token_type_ids"].sum() == 0


# ---------------------------------------------------------------------------------------------------------
# ceiling on the mirror (slow: kiwi over 11 MB of petitions)


def petition_texts():
    for path in sorted((MIRROR / "petitions").glob("petitions_*")):
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                yield record["title"]
                yield record["content"]


@pytest.mark.slow
@needs_mirror
def test_alignment_ceiling_plain_vs_morpheme_aware():
    test_split = split_by_index(read_klue_ner(KLUE_DEV))["test"]
    results = {}
    for name, morpheme_aware in (("plain", False), ("morpheme-aware", True)):
        started = time.perf_counter()
        tokenizer = train_tokenizer(
            petition_texts(), 16000, morpheme_aware=morpheme_aware, show_progress=False
        )
        seconds = time.perf_counter() - started
        results[name] = alignment_ceiling(test_split, tokenizer)
        ceiling = results[name]
        print(
            f"\n{name:15s} 16k: ceiling micro {ceiling['entity_f1_micro']:.4f} "
            f"macro {ceiling['entity_f1_macro']:.4f} chars/piece {ceiling['chars_per_piece']:.2f} "
            f"(trained in {seconds:.1f} s)"
        )
    assert results["morpheme-aware"]["entity_f1_micro"] >= 0.95
    assert results["plain"]["entity_f1_micro"] < results["morpheme-aware"]["entity_f1_micro"]
