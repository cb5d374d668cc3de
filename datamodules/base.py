"""What every fine-tuning DataModule shares: the common settings and the train/val/test loaders over
in-memory datasets built in `setup()`. A task's module sets `collate_fn` and fills `self.datasets`."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset


def ignore_ctrl_c(worker_id: int) -> None:
    """DataLoader `worker_init_fn`. Ctrl-C in a terminal signals the whole process group; a worker that takes
    the KeyboardInterrupt stops serving, and the trainer then fails on a lost worker instead of stopping as
    interrupted with its final checkpoint. The main process alone handles it and shuts its workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):  # Lightning seeds workers only of loaders without an init fn
        from lightning_fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)


class TaskDataModule(pl.LightningDataModule):
    """Loaders over `self.datasets[name]`: shuffled `batch_size` batches for train, `eval_batch_size` for
    val/test, batched by the subclass's `collate_fn`."""

    collate_fn: Callable[[list[Any]], dict]  # a staticmethod on the subclass

    def __init__(
        self,
        mirror: str | None = None,
        data_dir: str = "data",
        tokenizer_dir: str | None = None,
        max_seq_len: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.mirror = mirror
        self.data_dir = data_dir
        self.tokenizer_dir = tokenizer_dir
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.datasets: dict[str, Dataset] = {}

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[name],
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            worker_init_fn=ignore_ctrl_c,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
