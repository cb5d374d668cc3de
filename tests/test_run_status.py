"""A run the user stopped ends KILLED in MLflow, a crash FAILED: Lightning finalizes both as failed."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl

from tasks.runner import FinalCheckpoint, RunLogger
from tests.test_pace import _Tiny


class _Stops(_Tiny):
    def __init__(self, error: type[BaseException]) -> None:
        super().__init__()
        self.error = error

    def training_step(self, batch, batch_idx):
        if self.global_step == 3:
            raise self.error("stop here")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(("error", "reason", "status"), [(KeyboardInterrupt, "interrupted", "KILLED"),
                                                          (RuntimeError, "error", "FAILED")])  # fmt: skip
def test_a_stopped_run_is_killed_and_a_crashed_one_failed(tmp_path, error, reason, status):
    logger = RunLogger(experiment_name="status", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    trainer = pl.Trainer(logger=logger, callbacks=[FinalCheckpoint(tmp_path / "ckpt")], max_steps=50,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises((SystemExit, RuntimeError)):  # Lightning exits after an interrupt, re-raises an error
        trainer.fit(_Stops(error))
    run = logger.experiment.get_run(logger.run_id)
    assert (run.data.tags["stop_reason"], run.info.status) == (reason, status)
    assert (tmp_path / "ckpt" / "last.ckpt").is_file() == (reason == "interrupted")  # the interrupt is saved
