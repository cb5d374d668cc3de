"""Checkpoints: loading one never runs code from it, every path says what a file is, every stop is saved."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.demos.boring_classes import BoringModel, RandomDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from bert import export
from bert.checkpoint import TRUST_ENV, UnsafeCheckpointError
from tasks import checkpoints, runner, tag
from tasks.ner import NerModule
from tasks.pretrain import PretrainModule

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"vocab_size": 30, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
         "intermediate_size": 32}  # fmt: skip


class Payload:
    """Harmless stand-in for a malicious pickle: unpickling it creates `marker` (by calling open)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def tokenizer_dir(tmp_path) -> Path:
    from tokenizers import Tokenizer, models

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"가나다라마바사"])}
    out = tmp_path / "tokenizer"
    out.mkdir()
    Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(str(out / "tokenizer.json"))
    return out


@pytest.fixture
def evil(tmp_path, tokenizer_dir) -> tuple[Path, Path]:
    """A checkpoint that looks like a pretraining one, with the payload inside its hyperparameters."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    module = PretrainModule(SHAPE, {"lr": 1e-3}, tokenizer_dir=str(tokenizer_dir))
    hparams = {**dict(module.hparams), "extra": Payload(marker)}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams, "global_step": 3}, path)
    return path, marker


def test_the_payload_is_real(evil, monkeypatch):
    """The trusted-legacy opt-in does a full unpickle: the payload runs (so the refusals below mean something)."""
    path, marker = evil
    monkeypatch.setenv(TRUST_ENV, "1")
    checkpoints.load(path)
    assert marker.exists()


def test_every_loading_path_refuses_the_payload(evil, tmp_path, capsys):
    path, marker = evil

    with pytest.raises(UnsafeCheckpointError, match="io.open") as err:
        checkpoints.load(path)  # what tasks.predict and every other reader uses
    assert str(path) in str(err.value) and TRUST_ENV in str(err.value)

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    with pytest.raises(UnsafeCheckpointError, match=str(path)):
        runner.load_encoder(str(path), uri, with_weights=True)  # pretrained=

    cfg = OmegaConf.create({"ckpt_path": str(path), "paths": {"root_dir": str(tmp_path)}})
    with pytest.raises(UnsafeCheckpointError, match=str(path)):
        runner.resolve_resume(cfg)  # ckpt_path=

    with pytest.raises(SystemExit, match="refused to load"):
        export.main([str(path), str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()

    with pytest.raises(SystemExit, match="refused to load"):
        tag.main([str(path), "가나다"])

    # Lightning's own load (fit/test ckpt_path) with the arguments the entry points pass
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    with pytest.raises(pickle.UnpicklingError):
        trainer.fit(BoringModel(), ckpt_path=str(path), **runner.lightning_load())
    assert not marker.exists(), "a loading path unpickled the payload"


def test_export_cli_refuses_without_running_it(evil, tmp_path):
    path, marker = evil
    proc = subprocess.run([sys.executable, "-m", "bert.export", str(path), str(tmp_path / "hf")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "io.open" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def _ner_checkpoint(path: Path, tokenizer_dir: Path) -> NerModule:
    torch.manual_seed(0)
    module = NerModule(SHAPE, ["O", "B-PS", "I-PS"], {"lr": 1e-3}, tokenizer_dir=str(tokenizer_dir))
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return module


def test_kind_of_a_checkpoint(tmp_path, tokenizer_dir):
    ner = tmp_path / "ner.ckpt"
    _ner_checkpoint(ner, tokenizer_dir)
    assert checkpoints.meta(ner)["kind"] == "ner"
    legacy = {"hyper_parameters": {"model_config": SHAPE}}  # written before the `task` hyperparameter
    assert checkpoints.checkpoint_kind(legacy) == "pretrain"
    assert checkpoints.checkpoint_kind({"hyper_parameters": {"model_config": SHAPE, "labels": ["O"]}}) == "ner"
    assert checkpoints.checkpoint_kind({"hyper_parameters": {"task": "nli", "labels": ["a"]}}) == "nli"
    assert checkpoints.checkpoint_kind({"state_dict": {}}) == "unknown"
    assert "python -m tasks.tag" in checkpoints.describe("ner")


def test_export_and_resume_say_what_a_fine_tuned_checkpoint_is(tmp_path, tokenizer_dir):
    ner = tmp_path / "ner.ckpt"
    _ner_checkpoint(ner, tokenizer_dir)
    with pytest.raises(SystemExit, match=r"fine-tuned ner checkpoint.*python -m tasks\.tag"):
        export.main([str(ner), str(tmp_path / "hf")])
    cfg = OmegaConf.create({"ckpt_path": str(ner), "paths": {"root_dir": str(tmp_path)}})  # run.py's
    with pytest.raises(ValueError, match="fine-tuned ner checkpoint"):
        runner.resolve_resume(cfg)
    with pytest.raises(SystemExit, match="a pretraining checkpoint"):
        pre = tmp_path / "pre.ckpt"
        module = PretrainModule(SHAPE, {"lr": 1e-3}, tokenizer_dir=str(tokenizer_dir))
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, pre)
        tag.main([str(pre), "가나다"])


def test_pretrained_from_a_fine_tuned_checkpoint_takes_its_encoder(tmp_path, tokenizer_dir):
    ner = tmp_path / "ner.ckpt"
    source = _ner_checkpoint(ner, tokenizer_dir)
    encoder = runner.load_encoder(str(ner), f"sqlite:///{tmp_path}/mlflow.db", with_weights=True)
    assert encoder.tokenizer_dir == tokenizer_dir
    assert encoder.state_dict and all(k.startswith("bert.") for k in encoder.state_dict)
    target = NerModule(encoder.model_config, ["O", "B-LC", "I-LC"], {"lr": 1e-3})
    target.load_encoder(encoder.state_dict)
    for k, v in source.model.bert.state_dict().items():
        assert torch.equal(target.model.bert.state_dict()[k], v), k

    tagger, _ = tag.load_tagger(str(ner))  # the tagger rebuilds the same module, safely
    for k, v in source.state_dict().items():
        assert torch.equal(tagger.state_dict()[k], v), k


class Counting(BoringModel):
    """Records which batch (by its content) each training step saw; its loader is stateful, as ours are, so a
    mid-epoch resume can continue the epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float] = []
        self.data = RandomDataset(32, 64)

    def train_dataloader(self):
        return StatefulDataLoader(self.data, batch_size=2)

    def training_step(self, batch, batch_idx):
        self.seen.append(round(float(batch.sum()), 4))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.log("valid_loss", self.step(batch))


def _fit(tmp_path, max_steps, ckpt_path=None, **trainer_kwargs):
    torch.manual_seed(0)
    module = Counting()
    cfg = OmegaConf.create({"checkpoint_every_n_steps": 4})
    callbacks = runner.build_callbacks(cfg, tmp_path / "ckpts", monitor="valid_loss")[:-1]  # no progress bar
    trainer = pl.Trainer(max_steps=max_steps, max_epochs=-1, limit_train_batches=10, limit_val_batches=2,
                         val_check_interval=5, logger=False, callbacks=callbacks, enable_progress_bar=False,
                         enable_model_summary=False, **trainer_kwargs)  # fmt: skip
    trainer.fit(module, ckpt_path=ckpt_path, **runner.lightning_load())
    return trainer, module.seen


def test_max_steps_stop_saves_the_last_step_and_resume_replays_nothing(tmp_path):
    _, straight = _fit(tmp_path / "a", 23)
    trainer, first = _fit(tmp_path / "b", 13)  # not a multiple of checkpoint_every_n_steps (4)
    last = tmp_path / "b" / "ckpts" / "last.ckpt"
    assert checkpoints.load(last)["global_step"] == 13 == len(first)
    assert runner.stop_reason(trainer) == "max_steps"
    assert not list(last.parent.glob(".*tmp")), "temp files left beside the checkpoint"
    _, resumed = _fit(tmp_path / "b", 23, ckpt_path=str(last))
    assert first + resumed == straight  # mid-epoch (epoch 1, batch 3): nothing replayed, nothing skipped


def test_max_time_stop_saves_the_step_it_stopped_at(tmp_path, monkeypatch):
    import time

    def slow_step(self, batch, batch_idx):
        time.sleep(0.05)
        return BoringModel.training_step(self, batch, batch_idx)

    monkeypatch.setattr(Counting, "training_step", slow_step)
    trainer, _ = _fit(tmp_path, 10_000, max_time={"seconds": 2})
    step = trainer.global_step
    assert 0 < step < 10_000 and runner.stop_reason(trainer) == "max_time"
    assert checkpoints.load(tmp_path / "ckpts" / "last.ckpt")["global_step"] == step


def test_interrupt_saves_the_state(tmp_path):
    class Interrupted(Counting):
        def training_step(self, batch, batch_idx):
            if self.global_step == 6:
                raise KeyboardInterrupt
            return super().training_step(batch, batch_idx)

    trainer = pl.Trainer(max_steps=50, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[runner.FinalCheckpoint(tmp_path)])  # fmt: skip
    with pytest.raises(SystemExit):  # Lightning turns Ctrl+C into a graceful exit(1)
        trainer.fit(Interrupted())
    assert checkpoints.load(tmp_path / "last.ckpt")["global_step"] == 6
    assert runner.stop_reason(trainer) == "interrupted"


def test_atomic_checkpoint_keeps_the_old_file_when_a_save_fails(tmp_path):
    io = runner.AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        io.save_checkpoint({"global_step": 2, "bad": lambda: None}, path)  # unpicklable: fails mid-save
    assert checkpoints.load(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path, tokenizer_dir):
    path = tmp_path / "cut.ckpt"
    module = PretrainModule(SHAPE, {"lr": 1e-3}, tokenizer_dir=str(tokenizer_dir))
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable checkpoint") as err:
        checkpoints.load(path)
    assert str(path) in str(err.value)
