"""bert/convert.py: folders that transformers itself saves load into our model and compute what transformers
computes; folders that are not a BERT, mismatch their tokenizer or lack weights fail naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bert.convert import load_hf_folder
from bert.tokenizer import tokenizer_from_vocab

transformers = pytest.importorskip("transformers")

TOL = 1e-5
SENTENCES = ["이순신은 조선 중기의 무신이다.", "서울특별시는 대한민국의 수도이다.", "Hello 한글 World!"]
PAIRS = (["이순신은 조선 중기의 무신이다.", "Hello World"], ["서울특별시는 수도이다.", "한글"])


def small_vocab() -> list[str]:
    chars = sorted({c for s in SENTENCES for c in s if not c.isspace()})
    return chars + ["##" + c for c in chars] + ["이순신", "##은", "hello", "world"]


def tiny_hf_config(vocab_size: int):
    return transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0,
    )  # fmt: skip


def randomize(model) -> None:
    """Non-zero biases and non-unit LayerNorms, so that a wrongly mapped tensor cannot go unnoticed."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)


def save_tokenizer(folder: Path) -> None:
    tok = tokenizer_from_vocab(small_vocab())
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )  # fmt: skip
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def hf_pretraining(tmp_path_factory) -> Path:
    """What transformers saves for a small random BertForPreTraining and its tokenizer."""
    folder = tmp_path_factory.mktemp("hf") / "bert"
    save_tokenizer(folder)
    vocab_size = len(transformers.AutoTokenizer.from_pretrained(folder))
    model = transformers.BertForPreTraining(tiny_hf_config(vocab_size))
    randomize(model)
    model.save_pretrained(folder)
    return folder


def encode(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(folder)(*PAIRS, padding=True, return_tensors="pt")


def test_pretraining_folder_matches_transformers(hf_pretraining):
    loaded = load_hf_folder(f"hf:{hf_pretraining}")
    assert loaded.missing == []
    ours = loaded.model()
    theirs = transformers.BertForPreTraining.from_pretrained(hf_pretraining).eval()
    enc = encode(hf_pretraining)
    assert enc["attention_mask"].sum() < enc["attention_mask"].numel()  # padded: the mask path is tested
    # our tokenizer (the folder's tokenizer.json as our datamodules read it) gives transformers' ids
    raw = loaded.tokenizer.encode(PAIRS[0][0], PAIRS[1][0])
    assert raw.ids == enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()
    with torch.no_grad():
        ref = theirs(**enc, output_hidden_states=True)
        hidden, _ = ours.bert(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
        out = ours(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
    keep = enc["attention_mask"].bool()
    assert (hidden - ref.hidden_states[-1])[keep].abs().max() <= TOL
    assert (out.mlm_logits - ref.prediction_logits)[keep].abs().max() <= TOL
    assert (out.nsp_logits - ref.seq_relationship_logits).abs().max() <= TOL


def test_bert_model_folder_without_prefix_or_heads(hf_pretraining, tmp_path):
    folder = tmp_path / "encoder"
    shutil.copytree(hf_pretraining, folder)
    (folder / "model.safetensors").unlink()
    encoder = transformers.BertModel.from_pretrained(hf_pretraining).eval()
    encoder.save_pretrained(folder)
    loaded = load_hf_folder(folder)
    assert loaded.missing and all(k.startswith("cls.") for k in loaded.missing)
    ours = loaded.model()
    enc = encode(folder)
    with torch.no_grad():
        ref = encoder(**enc)
        hidden, pooled = ours.bert(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
    keep = enc["attention_mask"].bool()
    assert (hidden - ref.last_hidden_state)[keep].abs().max() <= TOL
    assert (pooled - ref.pooler_output).abs().max() <= TOL
    # the fresh heads are tied to the folder's embedding, and the same on every load
    assert torch.equal(ours.cls.predictions.decoder.weight, ours.bert.embeddings.word_embeddings.weight)
    again = load_hf_folder(folder).state_dict
    assert all(torch.equal(again[k], loaded.state_dict[k]) for k in loaded.missing)


def test_pytorch_bin_folder_loads_weights_only(hf_pretraining, tmp_path):
    folder = tmp_path / "bin"
    shutil.copytree(hf_pretraining, folder)
    (folder / "model.safetensors").unlink()
    theirs = transformers.BertForPreTraining.from_pretrained(hf_pretraining)
    torch.save(theirs.state_dict(), folder / "pytorch_model.bin")
    loaded = load_hf_folder(folder)
    assert loaded.weights_file.name == "pytorch_model.bin"
    for key, value in theirs.state_dict().items():
        if not key.endswith("position_ids"):
            assert torch.equal(loaded.state_dict[key], value), key
    (folder / "pytorch_model.bin").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        load_hf_folder(folder)


@pytest.mark.parametrize("lowercase", [False, True])
def test_vocab_txt_only_tokenizes_like_transformers(hf_pretraining, tmp_path, lowercase):
    folder = tmp_path / "vocab"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_pretraining / name, folder / name)
    vocab = transformers.AutoTokenizer.from_pretrained(hf_pretraining).get_vocab()
    (folder / "vocab.txt").write_text("".join(p + "\n" for p in sorted(vocab, key=vocab.get)), encoding="utf-8")
    settings = {"do_lower_case": lowercase, "tokenizer_class": "BertTokenizer"}
    if not lowercase:
        settings["strip_accents"] = False
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    reference = transformers.BertTokenizer.from_pretrained(folder)
    ours = load_hf_folder(folder).tokenizer
    for a, b in zip(*PAIRS):
        assert ours.encode(a, b).ids == reference(a, b)["input_ids"], (a, b)
    hangul = ours.encode(SENTENCES[0]).tokens
    assert ("[UNK]" in hangul) == lowercase  # NFD splits the syllables into jamo, which this vocab lacks


def test_not_a_bert_is_refused_naming_config(hf_pretraining, tmp_path):
    folder = tmp_path / "roberta"
    shutil.copytree(hf_pretraining, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type is 'roberta'"):
        load_hf_folder(folder)


def test_vocabulary_mismatch_names_both_files(hf_pretraining, tmp_path):
    folder = tmp_path / "mismatch"
    shutil.copytree(hf_pretraining, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 3}))
    with pytest.raises(ValueError, match=r"tokenizer\.json has \d+ tokens but .*config\.json says vocab_size"):
        load_hf_folder(folder)


def test_missing_weights_and_foreign_tensors(hf_pretraining, tmp_path):
    folder = tmp_path / "noweights"
    shutil.copytree(hf_pretraining, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"noweights: no weights \(looked for model\.safetensors"):
        load_hf_folder(folder)
    assert load_hf_folder(folder, with_weights=False).config.hidden_size == 32  # scratch_like needs no weights

    state = transformers.BertForPreTraining.from_pretrained(hf_pretraining).state_dict()
    torch.save({**state, "classifier.weight": torch.zeros(3, 32)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: 1 tensors .*classifier\.weight"):
        load_hf_folder(folder)
    del state["bert.encoder.layer.1.output.dense.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: 1 encoder tensors missing"):
        load_hf_folder(folder)


def test_runner_resolves_hf_folder_for_fine_tuning(hf_pretraining, tmp_path):
    from bert.tokenizer import load_tokenizer
    from tasks.ner import NerModule
    from tasks.runner import resolve_encoder

    cfg = OmegaConf.create({"pretrained": f"hf:{hf_pretraining}", "paths": {"cache_dir": str(tmp_path)},
                            "logger": None})  # fmt: skip
    encoder = resolve_encoder(cfg)
    assert load_tokenizer(encoder.tokenizer_dir).get_vocab_size() == encoder.model_config["vocab_size"]
    module = NerModule(encoder.model_config, ["O", "B-PS", "I-PS"], {"lr": 1e-3})
    module.load_encoder(encoder.state_dict)
    theirs = transformers.BertModel.from_pretrained(hf_pretraining).eval()
    for key, value in theirs.state_dict().items():
        if not key.startswith("pooler.") and not key.endswith("position_ids"):
            assert torch.equal(module.model.bert.state_dict()[key], value), key
    scratch = resolve_encoder(OmegaConf.merge(cfg, {"pretrained": None, "scratch_like": f"hf:{hf_pretraining}"}))
    assert scratch.state_dict is None and scratch.tokenizer_dir == encoder.tokenizer_dir
