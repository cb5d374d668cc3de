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


def test_loader_workers_leave_ctrl_c_to_the_trainer(tmp_path, mirror):
    """Ctrl-C in a terminal signals the whole process group. A worker that takes the KeyboardInterrupt stops
    serving (or dies), and the trainer then fails on a lost worker instead of stopping as interrupted with its
    final checkpoint (seen on a 60-minute run: 'Stopped: error', no last.ckpt). Workers must ignore SIGINT."""
    import signal
    import time

    os.environ["BERT_DATA_MIRROR"] = str(mirror)
    dm = _datamodule(tmp_path / "cache", 1)
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batches = iter(loader)
        next(batches)
        (worker,) = batches._workers
        os.kill(worker.pid, signal.SIGINT)
        time.sleep(1.0)
        assert worker.is_alive() and next(batches)["input_ids"].shape[0] > 0
        del batches


class _Draws(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        import random

        import numpy as np

        return torch.tensor([torch.randint(0, 2**30, ()).item(), random.getrandbits(30), np.random.randint(2**30)])


def test_the_ctrl_c_init_keeps_lightnings_worker_seeding(monkeypatch):
    """Lightning seeds workers (seed_everything(workers=True)) only in loaders without a worker_init_fn of their
    own, so ours must do it too: same draws in the workers as under Lightning's own init."""
    from functools import partial

    from lightning_fabric.utilities.seed import pl_worker_init_function

    from datamodules.base import ignore_ctrl_c

    monkeypatch.setenv("PL_SEED_WORKERS", "1")

    def draws(init):
        torch.manual_seed(7)
        loader = torch.utils.data.DataLoader(_Draws(), batch_size=4, num_workers=1, worker_init_fn=init)
        return next(iter(loader))

    ours, lightnings = draws(ignore_ctrl_c), draws(partial(pl_worker_init_function, rank=0))
    assert torch.equal(ours, lightnings)
    assert not torch.equal(ours, draws(None))  # the test can tell seeded from unseeded workers
