"""Resuming mid-epoch continues the data stream exactly: no batch replayed, none skipped, same masks."""

from __future__ import annotations

import os

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tasks.pretrain import PretrainModule
from tests.conftest import ROOT


class Recorder(PretrainModule):
    """Records a fingerprint of every training batch (ids after masking, so masks are compared too)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, hash(tuple(batch["input_ids"].flatten().tolist()))))
        return super().training_step(batch, batch_idx)


def _datamodule(cache_dir, num_workers):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("pretrain", overrides=["data=petition_small", f"paths.cache_dir={cache_dir}",
                                             f"data.num_workers={num_workers}"])  # fmt: skip
    dm = instantiate(cfg.data)
    dm.prepare_data()
    return dm


def _fit(dm, max_steps, ckpt_dir, ckpt_path=None, every=None):
    module = Recorder(
        {"vocab_size": dm.vocab_size, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
         "intermediate_size": 64},
        {"lr": 1e-3, "warmup_steps": 0},
    )  # fmt: skip
    callbacks = []
    if every:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=every, save_top_k=-1,
                                                      filename="{step}"))  # fmt: skip
    trainer = pl.Trainer(
        max_steps=max_steps, limit_train_batches=10, limit_val_batches=0, logger=False, accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        enable_checkpointing=bool(every),
    )  # fmt: skip
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module.seen


def test_mid_epoch_resume_replays_nothing(tmp_path, mirror):
    os.environ["BERT_DATA_MIRROR"] = str(mirror)
    torch.manual_seed(0)
    for workers in (0, 2):
        dm = _datamodule(tmp_path / "cache", workers)
        straight = _fit(dm, 25, tmp_path / f"a{workers}")  # epochs of 10 batches: 0, 1, half of 2
        first = _fit(_datamodule(tmp_path / "cache", workers), 15, tmp_path / f"b{workers}", every=15)
        assert first == straight[:15]
        resumed = _fit(_datamodule(tmp_path / "cache", workers), 25, None,
                       ckpt_path=str(tmp_path / f"b{workers}" / "step=15.ckpt"))  # fmt: skip
        assert resumed[0][0] == 1, "resumed in the middle of epoch 1"
        assert resumed == straight[15:], (
            f"workers={workers}: the resumed stream differs from the uninterrupted one"
        )
        assert len({h for _, h in straight}) == 25  # new masks/order every epoch: no batch repeats
