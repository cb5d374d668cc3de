"""Train metrics as means over the logging interval: one batch (32 NSP pairs) is noise, not a curve point."""

from __future__ import annotations

from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric


def log_due(trainer: pl.Trainer) -> bool:
    """True on the steps whose logged values Lightning sends to the logger (every `log_every_n_steps`)."""
    return bool(trainer._logger_connector.should_update_logs)


class IntervalMeans(torch.nn.Module):
    """Running means of named values since the last time they were logged (DDP-synced on compute)."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__()
        self.means = torch.nn.ModuleDict({key: MeanMetric() for key in keys})

    def update(self, values: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        for key, value in values.items():
            self.means[key].update(value.detach(), weight=weight)

    def pop(self) -> dict[str, torch.Tensor]:
        """The means of the interval; the next interval starts empty."""
        out = {}
        for key, mean in self.means.items():
            if mean.update_count:
                out[key] = mean.compute()
            mean.reset()
        return out
