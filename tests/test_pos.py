"""Morpheme POS features for the NER tagger (`task.pos_features`): piece alignment against kiwi's own analysis,
the cached analysis of the task file, the tagger's use of them, and prediction from such a checkpoint."""

from __future__ import annotations

import pytest
import torch

from bert.heads import BertCrfTagger
from bert.model import BertConfig
from bert.ner_align import encode_for_ner
from bert.pos import KIWI_TAGS, PAD_ID, POS_LABELS, UNK_ID, analyse, piece_pos_ids
from bert.tokenizer import save_tokenizer, tokenizer_from_vocab
from datamodules import klue_ner
from datamodules.klue_ner import KlueNerDataModule, KlueNerDataset, collate_ner
from tests.test_klue_ner import GOOD as TSV  # two sentences: 이순신은 서울에 / 김 대중

ID = {label: i for i, label in enumerate(POS_LABELS)}
CONFIG = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def test_piece_pos_ids_take_the_morpheme_under_the_first_character():
    # "서울에서 했다": 서울/NNP 에서/JKB, 했 = 하/VV + 었/EP fused into one syllable (same start), 다/EF
    spans = [(0, 2, "NNP"), (2, 4, "JKB"), (5, 6, "VV-R"), (5, 6, "EP"), (6, 7, "EF"), (7, 8, "USER0")]
    offsets = [(0, 0), (0, 1), (1, 2), (2, 4), (5, 6), (6, 7), (7, 8), (0, 0)]  # [CLS] 서 ##울 ##에서 했 ##다 ? [SEP]
    assert piece_pos_ids(offsets, spans, 8) == [
        PAD_ID, ID["B-NNP"], ID["I-NNP"], ID["B-JKB"], ID["B-VV"], ID["B-EF"], UNK_ID, PAD_ID,
    ]  # fmt: skip
    assert piece_pos_ids([(4, 5)], spans, 8) == [PAD_ID]  # the space: no morpheme
    assert piece_pos_ids([(0, 2)], [(0, 9, "NNG")], 2) == [ID["B-NNG"]]  # a span past the text is clipped
    assert len(set(POS_LABELS)) == len(POS_LABELS) == 2 + 2 * len(KIWI_TAGS)


def test_kiwi_finds_the_names_and_every_tag_it_emits_is_known():
    """kiwi itself is the reference: its tags on real text all map to a label, and the names are NNP."""
    from kiwipiepy.utils import _valid_tags

    assert set(KIWI_TAGS) == set(_valid_tags) - {f"USER{i}" for i in range(5)}
    text = "이순신은 1545년 서울에서 태어났다. 삼성전자가 http://a.kr 에 글을 올렸습니다!"
    (spans,) = list(analyse([text]))
    by_text = {text[s:e]: tag for s, e, tag in spans}
    assert by_text["이순신"] == "NNP" and by_text["서울"] == "NNP" and by_text["1545"] == "SN"
    tokenizer = tokenizer_from_vocab(["이순신", "##은", "서울", "##에서", "태어", "##났", "##다", "1545", "##년"])
    encoded = encode_for_ner(list(text), None, tokenizer, 64)
    ids = piece_pos_ids(encoded.offsets, spans, len(text))
    assert UNK_ID not in ids and ids[0] == ids[-1] == PAD_ID and PAD_ID not in ids[1:-1]
    assert POS_LABELS[ids[1]] == "B-NNP"  # 이순신


def test_dataset_carries_pos_ids_and_collate_pads_them():
    tokenizer = tokenizer_from_vocab(["이순신", "##은", "서울", "##에", "갔", "##다", "김", "##대", "##중", "."])
    sentences, _ = klue_ner.parse_klue_ner(TSV.splitlines())
    spans = list(analyse([s.text for s in sentences]))
    dataset = KlueNerDataset(sentences, tokenizer, 16, pos_spans=spans)
    first = dataset[0]
    assert first["pos_ids"].shape == first["input_ids"].shape
    assert POS_LABELS[first["pos_ids"][1]] == "B-NNP" and first["pos_ids"][0] == PAD_ID
    batch = collate_ner([dataset[1], dataset[0]])
    assert batch["pos_ids"].shape == batch["input_ids"].shape
    short = len(dataset[1]["input_ids"])
    assert batch["pos_ids"][0, short:].eq(PAD_ID).all() and batch["pos_ids"][1].tolist() == first["pos_ids"].tolist()
    assert "pos_ids" not in collate_ner([KlueNerDataset(sentences, tokenizer, 16)[0]])
    with pytest.raises(ValueError, match="1 POS analyses for 2 sentences"):
        KlueNerDataset(sentences, tokenizer, 16, pos_spans=spans[:1])


def test_datamodule_caches_the_analysis_and_redoes_a_stale_one(tmp_path, monkeypatch):
    source = tmp_path / "ner.tsv"
    source.write_text(TSV, encoding="utf-8")
    tokenizer_dir = tmp_path / "tok"
    save_tokenizer(tokenizer_from_vocab(["이순신", "##은", "서울", "##에", "갔", "##다", "김", "##대", "##중"]),
                   tokenizer_dir)  # fmt: skip

    def build() -> KlueNerDataModule:
        dm = KlueNerDataModule({"name": "ner.tsv", "url": None, "sha256": None}, split={"modulus": 2, "test_mod": 0,
                               "val_mod": 1}, mirror=str(tmp_path), data_dir=str(tmp_path / "data"),
                               tokenizer_dir=str(tokenizer_dir), pos_features=True)  # fmt: skip
        dm.setup("fit")
        return dm

    first = build()
    cache = first.pos_cache_path
    assert cache.is_file() and cache.parent == tmp_path / "data" / "pos"
    ids = first.datasets["test"][0]["pos_ids"].tolist()

    def no_kiwi(texts):
        raise AssertionError("kiwi ran although the cache holds these sentences")

    monkeypatch.setattr(klue_ner, "analyse", no_kiwi)
    assert build().datasets["test"][0]["pos_ids"].tolist() == ids  # from the cache, kiwi not called
    monkeypatch.undo()
    cache.write_text(cache.read_text(encoding="utf-8").replace('"texts_sha256": "', '"texts_sha256": "x'))
    assert build().datasets["test"][0]["pos_ids"].tolist() == ids  # stale: analysed again, same result
    assert '"texts_sha256": "x' not in cache.read_text(encoding="utf-8")


def test_tagger_emissions_use_the_pos_ids_and_train_their_embedding():
    torch.manual_seed(0)
    model = BertCrfTagger(CONFIG, num_tags=5, pos_vocab=len(POS_LABELS)).eval()
    ids = torch.randint(5, 99, (2, 6))
    mask = torch.ones_like(ids)
    pos = torch.randint(2, len(POS_LABELS), (2, 6))
    with pytest.raises(ValueError, match="pass pos_ids"):
        model.emissions(ids, mask)
    changed = pos.clone()
    changed[0, 3] = ID["B-NNP"] if pos[0, 3] != ID["B-NNP"] else ID["B-NNG"]
    a, b = model.emissions(ids, mask, pos_ids=pos), model.emissions(ids, mask, pos_ids=changed)
    assert not torch.allclose(a[0, 3], b[0, 3]) and torch.allclose(a[1], b[1]) and torch.allclose(a[0, :3], b[0, :3])
    model.train()
    model.loss(ids, mask, torch.randint(0, 5, (2, 6)), pos_ids=pos).backward()
    grad = model.pos_embeddings.weight.grad
    assert grad[pos.unique()].abs().sum() > 0 and grad[PAD_ID].abs().sum() == 0  # [PAD] stays the zero vector


def test_predict_tags_raw_text_with_a_pos_checkpoint(tmp_path, mirror, capsys):
    """A checkpoint trained with POS features is rebuilt with them: `predict ner` analyses the raw text."""
    from datamodules.klue_ner import LABELS
    from tasks import checkpoints, predict
    from tasks.ner import NerModule
    from tests.tiny_encoder import make_pretrain_checkpoint, make_tokenizer

    tokenizer_dir = make_tokenizer(mirror, tmp_path / "tokenizer")
    pretrain = torch.load(make_pretrain_checkpoint(tokenizer_dir, tmp_path / "pretrain.ckpt"), weights_only=True)
    torch.manual_seed(0)
    module = NerModule(task="ner", model_config=pretrain["hyper_parameters"]["model_config"], labels=list(LABELS),
                       optim={"lr": 1e-3}, tokenizer_dir=str(tokenizer_dir), pos_features=True)  # fmt: skip
    with torch.no_grad():  # emissions that a name's NNP tag pushes towards B-PS/I-PS
        module.model.classifier.bias.normal_(0, 0.1)
        module.model.pos_embeddings.weight.normal_(0, 1.0)
    path = tmp_path / "ner.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    assert checkpoints.module_from(path, NerModule, "ner").model.pos_embeddings is not None
    sentences = ["이순신은 1545년 서울에서 태어났다.", "세종대왕은 한글을 창제하였다.", "오늘"]
    predict.main(["ner", str(path), *sentences, "--batch-size", "3"])
    batched = capsys.readouterr().out
    predict.main(["ner", str(path), *sentences, "--batch-size", "1"])
    assert capsys.readouterr().out == batched and batched.count("\n") == 3
    loaded = predict.load(str(path), "ner")
    assert loaded.model.pos_embeddings.weight.shape == (len(POS_LABELS), 32)
