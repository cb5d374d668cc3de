"""bert/export.py: the exported folder loads in plain transformers and computes what our model computes."""

import json
import subprocess
import sys
import types
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bert import export
from bert.export import export_transformers, load_pretraining_checkpoint
from bert.model import BertConfig, BertForPreTraining

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SENTENCES = [
    "이순신은 조선 중기의 무신이다.",
    "서울특별시는 대한민국의 수도이다.",
    "나는 오늘 학교에 갔다.",
    "한국어 자연어 처리는 재미있다.",
    "세종대왕은 한글을 창제하였다.",
]
PAIRS = (["이순신은 조선 중기의 무신이다.", "나는 학교에 갔다."], ["서울특별시는 수도이다.", "한글"])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A tiny Korean WordPiece folder built here, independent of bert/tokenizer.py."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFC()  # never NFD: it splits Hangul syllables into jamo
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(SENTENCES, trainers.WordPieceTrainer(vocab_size=300, special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3, 4]
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # keeps tokenizer.json's normalizer as it is
        "unk_token": "[UNK]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
        "model_max_length": 64,
        "do_lower_case": False,
        "strip_accents": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, ensure_ascii=False))
    return out


@pytest.fixture(scope="module")
def config(tokenizer_dir) -> BertConfig:
    from tokenizers import Tokenizer

    vocab_size = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    return BertConfig(vocab_size, **shape)


@pytest.fixture(scope="module")
def model(config) -> BertForPreTraining:
    torch.manual_seed(0)
    return BertForPreTraining(config).eval()


def assert_same_outputs(ours: BertForPreTraining, out_dir: Path, tokenizer_dir: Path) -> dict[str, float]:
    from tokenizers import Tokenizer

    theirs, info = transformers.BertForPreTraining.from_pretrained(out_dir, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    hf_tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    enc = hf_tok(*PAIRS, padding=True, return_tensors="pt")
    assert set(enc) == {"input_ids", "token_type_ids", "attention_mask"}
    assert enc["attention_mask"][1].sum() < enc["attention_mask"].shape[1]  # the batch is padded

    # same ids as the raw tokenizers file; no lower-casing/NFD sneaking in on reload
    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(PAIRS[0][0], PAIRS[1][0])
    assert enc["input_ids"][0].tolist() == raw.ids and enc["token_type_ids"][0].tolist() == raw.type_ids
    assert 1 not in raw.ids  # no [UNK]
    nfd = [unicodedata.normalize("NFD", s) for s in PAIRS[0]]
    assert hf_tok(nfd)["input_ids"] == hf_tok(PAIRS[0])["input_ids"]

    ids, types_, mask = enc["input_ids"], enc["token_type_ids"], enc["attention_mask"]
    masked = torch.zeros_like(mask, dtype=torch.bool)
    masked[:, 1:4] = True
    theirs.eval()
    with torch.no_grad():
        hidden, _ = ours.bert(ids, types_, mask)
        out = ours(ids, types_, mask, masked)
        ref = theirs(**enc, output_hidden_states=True)
    keep = mask.bool()
    diffs = {
        "hidden": (hidden - ref.hidden_states[-1])[keep].abs().max().item(),
        "mlm_masked": (out.mlm_logits - ref.prediction_logits[masked]).abs().max().item(),
        "nsp": (out.nsp_logits - ref.seq_relationship_logits).abs().max().item(),
    }
    assert all(d <= TOL for d in diffs.values()), diffs
    return diffs


def test_export_loads_in_transformers(model, config, tokenizer_dir, tmp_path):
    out = export_transformers(model, config, tokenizer_dir, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp folder left behind
    assert_same_outputs(model, out, tokenizer_dir)

    # the same tensor names transformers' own save_pretrained writes (tied copies left out)
    reference = tmp_path / "reference"
    transformers.BertForPreTraining.from_pretrained(out).save_pretrained(reference)
    with (
        safe_open(out / "model.safetensors", "pt") as ours,
        safe_open(reference / "model.safetensors", "pt") as ref,
    ):
        assert sorted(ours.keys()) == sorted(ref.keys())


def test_export_from_state_dict_and_overwrite(model, config, tokenizer_dir, tmp_path):
    out = tmp_path / "export"
    export_transformers(model, config, tokenizer_dir, out)
    with pytest.raises(FileExistsError):
        export_transformers(model, config, tokenizer_dir, out)
    export_transformers(model.state_dict(), config, tokenizer_dir, out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert_same_outputs(model, out, tokenizer_dir)


def test_export_refuses_foreign_tokenizer(config, tokenizer_dir, tmp_path):
    other = BertConfig(**{**config.to_dict(), "vocab_size": config.vocab_size + 7})
    with pytest.raises(ValueError, match="tokenizer does not belong"):
        export_transformers(BertForPreTraining(other), other, tokenizer_dir, tmp_path / "export")
    foreign_weights = BertForPreTraining(other).state_dict()
    with pytest.raises(ValueError, match=f"checkpoint has vocab {config.vocab_size + 7}"):
        export_transformers(foreign_weights, config, tokenizer_dir, tmp_path / "export")
    assert not any(tmp_path.iterdir())


def write_fake_checkpoint(path: Path, model: BertForPreTraining, config: BertConfig, tokenizer_dir) -> Path:
    """What the Lightning pretraining module saves: its `self.model` under 'model.', hparams beside."""
    state_dict = {"model." + k: v for k, v in model.state_dict().items()}
    state_dict["val_mlm_acc.correct"] = torch.tensor(3)  # a metric state outside the model
    torch.save(
        {
            "epoch": 0,
            "global_step": 10,
            "pytorch-lightning_version": "2.6.6",
            "state_dict": state_dict,
            "hyper_parameters": {
                "model_config": config.to_dict(),
                "tokenizer_dir": tokenizer_dir,
                "lr": 1e-3,
            },
            "optimizer_states": [],
        },
        path,
    )
    return path


@pytest.mark.parametrize("tokenizer_dir_type", [str, Path])  # older files stored a Path: allowed, harmless
def test_load_pretraining_checkpoint(model, config, tokenizer_dir, tmp_path, tokenizer_dir_type):
    ckpt = write_fake_checkpoint(tmp_path / "last.ckpt", model, config, tokenizer_dir_type(tokenizer_dir))
    loaded, loaded_config, loaded_tokenizer_dir = load_pretraining_checkpoint(ckpt)
    assert loaded_config == config and loaded_tokenizer_dir == tokenizer_dir
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_cli_end_to_end(model, config, tokenizer_dir, tmp_path):
    ckpt = write_fake_checkpoint(tmp_path / "last.ckpt", model, config, str(tokenizer_dir))
    out = tmp_path / "hf"
    cmd = [sys.executable, "-m", "bert.export", str(ckpt), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "exported" in proc.stdout
    assert_same_outputs(model, out, tokenizer_dir)


def test_cli_needs_a_tokenizer_dir(model, config, tokenizer_dir, tmp_path, capsys):
    ckpt = write_fake_checkpoint(tmp_path / "last.ckpt", model, config, None)
    with pytest.raises(SystemExit):
        export.main([str(ckpt), str(tmp_path / "hf")])
    assert "--tokenizer-dir" in capsys.readouterr().err
    export.main([str(ckpt), str(tmp_path / "hf"), "--tokenizer-dir", str(tokenizer_dir)])
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_run_id_needs_tracking(monkeypatch, tmp_path):
    # None in sys.modules makes the import fail, as it does until tasks/tracking.py exists
    monkeypatch.setitem(sys.modules, "tasks.tracking", None)
    with pytest.raises(SystemExit, match="tasks.tracking.resolve_checkpoint"):
        export._resolve("0123abcd")
    fake = types.ModuleType("tasks.tracking")
    fake.resolve_checkpoint = lambda run_id: tmp_path / f"{run_id}.ckpt"
    monkeypatch.setitem(sys.modules, "tasks.tracking", fake)
    assert export._resolve("0123abcd") == tmp_path / "0123abcd.ckpt"
    assert export._resolve(str(tmp_path)) == tmp_path  # an existing path is used as it is
