"""Korean WordPiece tokenizer: training, Hangul safety, offsets, [UNK] rate, saving, transformers loading."""

import json
import os
import re
import time
import unicodedata
from pathlib import Path

import pytest
from tokenizers import trainers

from bert.tokenizer import (
    HANGUL_COMPAT_JAMO,
    SPECIAL_TOKENS,
    build_empty_tokenizer,
    choose_alphabet,
    load_tokenizer,
    morpheme_split,
    save_tokenizer,
    split_at_morphemes,
    tokenizer_fingerprint,
    tokenizer_from_vocab,
    train_tokenizer,
    unk_rate,
)

ROOT = Path(__file__).resolve().parents[1]
MIRROR = (ROOT / os.environ.get("BERT_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))).resolve()
PETITIONS = MIRROR / "petitions"
needs_mirror = pytest.mark.skipif(not PETITIONS.is_dir(), reason=f"no data mirror at {MIRROR}")

CONJOINING_JAMO = re.compile("[\u1100-\u11ff]")
KOREAN = [
    "이순신은 조선 중기의 무신이다.",
    "서울특별시에서 2019년 7월 1일 오후 3시에 열린 회의에 1,200명이 참석했다.",
    "국민청원 게시판에 올라온 글이 20만 명의 동의를 얻었습니다!",
    "KLUE 벤치마크는 한국어 자연어 이해 평가 데이터셋이다 (Park et al., 2021).",
    "ㅋㅋㅋ 정말요?? ㅠㅠ 너무 슬퍼요",
    "大韓民國 헌법 제1조 ①항",
]


def petition_texts(months, every: int = 1):
    for month in months:
        with (PETITIONS / f"petitions_{month}").open(encoding="utf-8") as handle:
            for index, line in enumerate(handle):
                if index % every == 0:
                    record = json.loads(line)
                    yield record["title"]
                    yield record["content"]


TRAIN_MONTHS, HELD_OUT_MONTH = ("2019-04", "2019-05", "2019-06"), "2019-07"


@pytest.fixture(scope="module")
def trained():
    """16k vocabularies trained on every 4th petition of 2019-04..06 (1.6 MB), both variants."""
    if not PETITIONS.is_dir():
        pytest.skip(f"no data mirror at {MIRROR}")
    tokenizers, seconds = {}, {}
    for name, morpheme_aware in (("plain", False), ("morpheme", True)):
        started = time.perf_counter()
        tokenizers[name] = train_tokenizer(
            petition_texts(TRAIN_MONTHS, every=4), 16000, morpheme_aware=morpheme_aware, show_progress=False
        )
        seconds[name] = time.perf_counter() - started
    print(
        f"\ntokenizer training on 1/4 of 2019-04..06: "
        f"plain {seconds['plain']:.1f} s, morpheme-aware {seconds['morpheme']:.1f} s"
    )
    return tokenizers


@pytest.fixture(scope="module")
def held_out_texts():
    return list(petition_texts([HELD_OUT_MONTH]))


# ---------------------------------------------------------------------------------------------------------
# no data needed


def test_normalizer_keeps_hangul_and_case():
    tokenizer = tokenizer_from_vocab(["가"])
    normalize = tokenizer.normalizer.normalize_str
    text = "한국어 KLUE ㅋㅋ Ａ"
    assert normalize(text) == text  # no lowercasing, no NFKC (Ａ, ㅋ stay)
    assert normalize(unicodedata.normalize("NFD", "한국어")) == "한국어"  # NFD input is composed
    assert not CONJOINING_JAMO.search(normalize("각 한글 문장"))
    assert normalize("漢字") == " 漢  字 "  # BERT's CJK split, as tokenize_chinese_chars=True


def test_split_at_morphemes():
    assert split_at_morphemes("이순신은 갔다", [0, 3, 5, 6]) == "이순신 은 갔 다"
    assert (
        split_at_morphemes("이순신은 갔다", [4, 5, 99, 0]) == "이순신은 갔다"
    )  # at spaces / outside: no cut
    assert split_at_morphemes("", [0]) == ""


def test_morpheme_split_with_kiwi():
    split = list(morpheme_split(["이순신은 조선 중기의 무신이다.", "", "서울에서  만났다"]))
    assert split[0] == "이순신 은 조선 중기 의 무신 이 다 ."
    assert split[1] == ""
    assert split[2].replace(" ", "") == "서울에서만났다" and split[2].startswith("서울 에서  ")


def test_fingerprint_is_stable_and_sensitive():
    base = tokenizer_fingerprint(vocab_size=16000, morpheme_aware=True)
    assert re.fullmatch("[0-9a-f]{12}", base)
    assert base == tokenizer_fingerprint(16000, True, initial_alphabet=list(reversed(HANGUL_COMPAT_JAMO)))
    assert base != tokenizer_fingerprint(vocab_size=8000, morpheme_aware=True)
    assert base != tokenizer_fingerprint(vocab_size=16000, morpheme_aware=False)
    assert base != tokenizer_fingerprint(vocab_size=16000, morpheme_aware=True, corpus="namuwiki")


def test_fingerprint_without_kiwipiepy_says_what_to_install(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(ImportError, match="pip install kiwipiepy"):
        tokenizer_fingerprint(vocab_size=16000, morpheme_aware=True)
    assert re.fullmatch("[0-9a-f]{12}", tokenizer_fingerprint(vocab_size=16000, morpheme_aware=False))


def test_small_training_keeps_size_alphabet_and_specials():
    texts = ["이순신은 조선 중기의 무신이다.", "서울에서 만났다. 하였습니다"] * 3
    tokenizer = train_tokenizer(texts, vocab_size=300, morpheme_aware=True, show_progress=False)
    vocab = tokenizer.get_vocab()
    assert [vocab[token] for token in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert len(vocab) <= 300
    for jamo in HANGUL_COMPAT_JAMO:
        assert jamo in vocab and "##" + jamo in vocab
    for char in "이순신은하였습니다":  # syllables that only START morphemes in training still continue words
        assert "##" + char in vocab
    assert "[UNK]" not in tokenizer.encode("ㅋㅋㅋ ㅠㅠ 하였습니다").tokens


@needs_mirror
def test_the_same_texts_give_the_same_tokenizer():
    """tokenizers' trainer numbers `##X` pieces in hash-map order and breaks ties between equally frequent
    merges by id (huggingface/tokenizers#1794): before the ids were fixed up front, three trainings of these
    texts in one process gave three different tokenizer.json (ids, and on 3 MB of petitions 54 pieces)."""
    texts = list(petition_texts(["2019-04"], every=8))
    made = [train_tokenizer(texts, vocab_size=3000, morpheme_aware=False, show_progress=False) for _ in range(3)]
    assert made[0].get_vocab_size() == 3000  # merges reach the size: ties at the cut are decided the same way
    assert len({tokenizer.to_str() for tokenizer in made}) == 1
    assert [token["content"] for token in json.loads(made[0].to_str())["added_tokens"]] == SPECIAL_TOKENS


def test_the_alphabet_is_the_trainers_own_choice():
    """With no ties in the counts, `choose_alphabet` keeps what tokenizers' trainer keeps for a `limit_alphabet`:
    the initial alphabet plus the most frequent other characters, after normalization, whitespace aside."""
    texts = ["가가가가가가 나나나나나 다다다다", "라라라 Ａ마 ㅋ", "바바 ＡＡ"]  # Ａ: NFC keeps it, counted as 3
    for limit in (2, 4, 6, 100):
        trainer = trainers.WordPieceTrainer(vocab_size=0, limit_alphabet=limit, initial_alphabet=["ㅋ"],
                                            special_tokens=SPECIAL_TOKENS, show_progress=False)  # fmt: skip
        theirs = build_empty_tokenizer()
        theirs.train_from_iterator(texts, trainer=trainer)
        singles = sorted(piece for piece in theirs.get_vocab() if len(piece) == 1)
        assert choose_alphabet(build_empty_tokenizer(), texts, ["ㅋ"], limit) == singles, limit
    ties = ["나 가", "다"]  # equal counts: the lower code point stays, whatever a hash map's order
    assert choose_alphabet(build_empty_tokenizer(), ties, [], 2) == ["가", "나"]


def test_load_missing_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------
# trained on petitions


def test_unk_rate_on_held_out_month(trained, held_out_texts):
    for name, tokenizer in trained.items():
        rate, n_pieces = unk_rate(tokenizer, held_out_texts)
        print(f"\n[UNK] on petitions_{HELD_OUT_MONTH} ({name}, 16k): {rate:.4%} of {n_pieces} pieces")
        assert rate < 0.005


def test_special_tokens_and_templates(trained):
    tokenizer = trained["morpheme"]
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert 10000 < tokenizer.get_vocab_size() <= 16000  # the trainer stops early when pairs run out
    single = tokenizer.encode("이순신은 무신이다.")
    assert single.tokens[0] == "[CLS]" and single.tokens[-1] == "[SEP]" and set(single.type_ids) == {0}
    pair = tokenizer.encode("첫 문장이다.", "두 번째 문장")
    first_sep = pair.tokens.index("[SEP]")
    assert pair.tokens[-1] == "[SEP]" and pair.tokens.count("[SEP]") == 2
    assert pair.type_ids == [0] * (first_sep + 1) + [1] * (len(pair.tokens) - first_sep - 1)


def test_round_trip_no_jamo_exact_offsets(trained, held_out_texts):
    texts = KOREAN + [text for text in held_out_texts[:400] if text.strip()]
    # petitions themselves hold a few conjoining jamo (ᆢ U+11A2 as an ellipsis): the vocabulary may hold those,
    # but nothing decomposed from syllables
    corpus_jamo = {
        char for text in petition_texts(TRAIN_MONTHS, every=4) for char in CONJOINING_JAMO.findall(text)
    }
    for name, tokenizer in trained.items():
        vocab_jamo = {char for piece in tokenizer.get_vocab() for char in CONJOINING_JAMO.findall(piece)}
        assert vocab_jamo <= corpus_jamo, name
        checked = 0
        for text in texts:
            encoding = tokenizer.encode(text, add_special_tokens=False)
            if not CONJOINING_JAMO.search(text):
                assert not any(CONJOINING_JAMO.search(token) for token in encoding.tokens), (name, text)
            if unicodedata.normalize("NFC", text) != text:
                continue
            spans = [text[start:end] for start, end in encoding.offsets]
            for token, span in zip(encoding.tokens, spans, strict=True):
                assert token == "[UNK]" or span == token.removeprefix("##"), (name, text, token)
            # every visible character covered exactly once, in order (the normalizer drops control characters)
            visible = "".join(
                char for char in text if not char.isspace() and unicodedata.category(char)[0] != "C"
            )
            assert "".join(spans) == visible.replace("\ufffd", ""), (name, text)
            # decode gives the text back up to WordPiece spacing ([UNK] stands for a whole word)
            expected = "".join(
                span if token != "[UNK]" else token
                for token, span in zip(encoding.tokens, spans, strict=True)
            )
            assert tokenizer.decode(encoding.ids, skip_special_tokens=False).replace(" ", "") == expected
            checked += 1
        assert checked >= 0.95 * len(texts)


def test_morpheme_vocabulary_keeps_particles_apart(trained):
    assert trained["morpheme"].encode("이순신은", add_special_tokens=False).tokens[-1] == "##은"


def test_save_reload_with_transformers(trained, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = trained["morpheme"]
    out_dir = save_tokenizer(tokenizer, tmp_path / "tokenizer")
    save_tokenizer(tokenizer, out_dir)  # overwriting an existing folder works
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tokenizer"]  # no staging folder left
    assert {path.name for path in out_dir.iterdir()} == {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    }  # fmt: skip
    vocab_lines = (out_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert vocab_lines[:5] == SPECIAL_TOKENS and len(vocab_lines) == tokenizer.get_vocab_size()

    reloaded = load_tokenizer(out_dir)
    assert reloaded.to_str() == tokenizer.to_str()
    assert load_tokenizer(out_dir / "tokenizer.json").to_str() == tokenizer.to_str()

    hf = AutoTokenizer.from_pretrained(str(out_dir))
    assert hf.pad_token == "[PAD]" and hf.pad_token_id == 0
    assert hf.mask_token == "[MASK]" and hf.mask_token_id == 4
    assert hf.cls_token_id == 2 and hf.sep_token_id == 3 and hf.unk_token_id == 1
    assert hf.model_max_length == 512
    for text in KOREAN:
        assert hf(text)["input_ids"] == tokenizer.encode(text).ids
        nfd = unicodedata.normalize("NFD", text)
        assert hf(nfd)["input_ids"] == tokenizer.encode(text).ids  # NFC survives the reload
    assert hf.decode(hf("KLUE 벤치마크")["input_ids"], skip_special_tokens=True) == "KLUE 벤치마크"  # cased
    pair = hf("첫 문장이다.", "두 번째 문장")
    ours = tokenizer.encode("첫 문장이다.", "두 번째 문장")
    assert pair["input_ids"] == ours.ids and pair["token_type_ids"] == ours.type_ids
    assert set(pair) == {"input_ids", "token_type_ids", "attention_mask"}
    batch = hf(["가", "이순신은 조선 중기의 무신이다."], padding=True)
    assert batch["input_ids"][0][-1] == 0 and batch["attention_mask"][0][-1] == 0
