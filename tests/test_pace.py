"""The pace check (tasks/pace.py): projections, the shortfall warning and its command, in a real Trainer."""

from __future__ import annotations

import logging
import time

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from pytorch_lightning.loggers import MLFlowLogger

from tasks import pace
from tasks.pace import Projection, StepPace, minutes, project, shortfall_advice
from tests.test_run_pretrain import ROOT


def test_projection_takes_whichever_limit_binds_first():
    # 2 steps/s, 60 s left: 120 more steps by the time limit; max_steps far away -> the time limit binds
    assert project(100, 2.0, 60.0, 10_000) == Projection(120.0, 220, None)
    # max_steps 150 comes first: 50 steps at 2/s = 25 s to go, no step projection
    assert project(100, 2.0, 60.0, 150) == Projection(120.0, None, 25.0)
    # no time limit (max_time=null): time until max_steps
    assert project(0, 0.5, None, 300) == Projection(30.0, None, 600.0)


def test_minutes_reads_like_a_plan():
    assert (minutes(40), minutes(12 * 60 + 10), minutes(200 * 60)) == ("40 s", "12 min", "3 h 20 min")


def test_shortfall_names_the_projection_and_a_step_keyed_command_that_composes():
    slow = Projection(steps_per_min=40.0, projected_steps=2_400, remaining_s=None)
    advice = shortfall_advice(slow, 6_878, "00:01:00:00")
    assert advice is not None
    assert "40 steps a minute" in advice and "2,400 steps" in advice and "6,878" in advice
    assert "about 2 h 52 min here" in advice  # 6,878 steps at 40 a minute
    assert shortfall_advice(Projection(120.0, 7_200, None), 6_878, "00:01:00:00") is None
    assert shortfall_advice(Projection(40.0, None, 600.0), 6_878, None) is None  # step-limited: nothing to warn

    # the advice is a working command: appended to the preset it composes to a run limited by steps alone,
    # with the preset's warmup-stable-decay keyed to those steps
    overrides = advice.split("run it with ")[1].split(" (about")[0].split()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("pretrain", overrides=["experiment=cpu_60min", *overrides])
    assert cfg.trainer.max_steps == 6_878 and cfg.trainer.max_time is None
    assert cfg.optim.time_keyed is False and cfg.optim.decay_fraction == 0.2 and cfg.expected_steps == 6_878


def test_presets_name_the_steps_they_were_measured_at():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        expected = {name: compose("pretrain", overrides=[f"experiment={name}"]).expected_steps
                    for name in ("cpu_60min", "cpu_30min", "first_run")}  # fmt: skip
    assert expected == {"cpu_60min": 6_878, "cpu_30min": 2_188, "first_run": None}


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(64, 4))
        return torch.utils.data.DataLoader(data, batch_size=8)


def _fit(tmp_path, pace_cb: StepPace, **trainer_kwargs) -> pl.Trainer:
    logger = MLFlowLogger(experiment_name="pace", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    trainer = pl.Trainer(logger=logger, callbacks=[pace_cb], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_epochs=-1, **trainer_kwargs)  # fmt: skip
    trainer.fit(_Tiny())
    return trainer


@pytest.fixture
def check_at_once(monkeypatch):
    monkeypatch.setattr(pace, "CHECK_AFTER_S", 0.0)
    monkeypatch.setattr(pace, "CHECK_SHARE", 0.0)


def test_a_time_limited_run_short_of_its_recipe_is_warned_tagged_and_summarised(tmp_path, caplog, check_at_once):
    cb = StepPace(expected_steps=10**9, max_time="00:00:00:02")
    with caplog.at_level(logging.INFO, logger="tasks.pace"):
        trainer = _fit(tmp_path, cb, max_steps=10**9, max_time="00:00:00:02")
    assert cb.projection is not None and cb.projection.projected_steps is not None
    assert cb.projection.projected_steps < 10**9 and trainer.global_step > 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("steps by trainer.max_time=00:00:00:02" in m for m in messages)
    (warning,) = [r for r in caplog.records if r.name == "tasks.pace" and r.levelno == logging.WARNING]
    assert "fewer than the 1,000,000,000" in warning.getMessage() and "trainer.max_steps=1000000000" in warning.getMessage()
    tags = trainer.logger.experiment.get_run(trainer.logger.run_id).data.tags
    assert int(tags["projected_steps"]) == cb.projection.projected_steps and float(tags["pace_steps_per_min"]) > 0
    line = cb.summary_line(trainer)
    assert line.startswith(f"Pace: {trainer.global_step:,} steps in ") and "expect smaller downstream gains" in line


def test_a_run_that_reaches_its_steps_is_not_warned(tmp_path, caplog, check_at_once):
    cb = StepPace(expected_steps=5)
    with caplog.at_level(logging.INFO, logger="tasks.pace"):
        trainer = _fit(tmp_path, cb, max_steps=30)  # step-limited: the log says the time to go
    assert not [r for r in caplog.records if r.name == "tasks.pace" and r.levelno >= logging.WARNING]
    assert any("step" in r.getMessage() and "to go" in r.getMessage() for r in caplog.records)
    assert "projected_steps" not in trainer.logger.experiment.get_run(trainer.logger.run_id).data.tags
    assert cb.summary_line(trainer).endswith("at least the 5 steps the recipe was measured at")


class _SlowsDown(_Tiny):
    """Fast for its first steps, then 50 ms a step: another job took the cores."""

    def training_step(self, batch, batch_idx):
        if self.global_step >= 20:
            time.sleep(0.05)
        return super().training_step(batch, batch_idx)


def _fit_slowing_down(tmp_path, caplog, monkeypatch):
    """A 2-second run re-checked every 0.3 s: fast steps (~1 ms) project far more than 100 steps, then at 50 ms
    a step the run makes ~50."""
    monkeypatch.setattr(pace, "RECHECK_AFTER_S", 0.3)
    monkeypatch.setattr(pace, "RECHECK_SHARE", 0.0)
    cb = StepPace(expected_steps=100, max_time="00:00:00:02")
    logger = MLFlowLogger(experiment_name="pace", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    trainer = pl.Trainer(logger=logger, callbacks=[cb], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_epochs=-1, max_time="00:00:00:02")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="tasks.pace"):
        trainer.fit(_SlowsDown())
    infos = [r.getMessage() for r in caplog.records if r.name == "tasks.pace" and r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in caplog.records if r.name == "tasks.pace" and r.levelno == logging.WARNING]
    return cb, trainer, infos, warnings


def test_a_run_that_slows_down_later_is_re_projected_and_warned_then(tmp_path, caplog, check_at_once, monkeypatch):
    cb, trainer, infos, warnings = _fit_slowing_down(tmp_path, caplog, monkeypatch)
    first_steps = int(infos[0].split("about ")[1].split(" steps")[0].replace(",", ""))
    assert first_steps >= 100 and trainer.global_step < 100  # the first check could not have known
    assert cb.checks > 1 and any("(was " in m for m in infos[1:])  # re-projected, the change said
    assert len(warnings) == 1 and "fewer than the 100" in warnings[0]  # warned once, when it fell short
    tags = trainer.logger.experiment.get_run(trainer.logger.run_id).data.tags
    assert int(tags["projected_steps"]) == cb.projection.projected_steps < 100  # the tag follows


def test_the_tag_follows_every_check_not_only_the_logged_ones(tmp_path, caplog, check_at_once, monkeypatch):
    # the log says the pace again only when it moved by more than REPORT_CHANGE; the tag must not go stale
    # with it (a 41-step projection once read 40 in the tag: the first CI run beside a fine-tuning job)
    monkeypatch.setattr(pace, "REPORT_CHANGE", float("inf"))  # only the first check is logged
    cb, trainer, infos, _ = _fit_slowing_down(tmp_path, caplog, monkeypatch)
    assert len(infos) == 1 and cb.checks > 1
    tags = trainer.logger.experiment.get_run(trainer.logger.run_id).data.tags
    assert int(tags["projected_steps"]) == cb.projection.projected_steps < 100


class _Stable(_Tiny):
    """Warmup-stable-decay in miniature: 3 warmup steps, the peak to step 20, then a decay."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.01)
        factor = lambda s: (s + 1) / 3 if s < 3 else (1.0 if s < 20 else 0.5)  # noqa: E731
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                   "interval": "step"}}  # fmt: skip


def test_a_short_run_names_the_branch_from_its_last_budget_at_the_peak(tmp_path, check_at_once):
    from tasks.budgets import BudgetCheckpoints

    budgets = BudgetCheckpoints(tmp_path / "ckpts", at_steps=[1, 5, 12, 25], at_end=False)
    cb = StepPace(expected_steps=10**9, max_time="00:00:00:02")
    logger = MLFlowLogger(experiment_name="pace", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    trainer = pl.Trainer(logger=logger, callbacks=[cb, budgets], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_epochs=-1, max_steps=10**9, max_time="00:00:00:02")  # fmt: skip
    trainer.fit(_Stable())
    assert trainer.global_step > 25
    by_step = {r["step"]: r for r in budgets.records}
    assert by_step[1]["lr"] < by_step[1]["peak_lr"] and by_step[25]["lr"] < by_step[25]["peak_lr"]  # warmup, decay
    assert by_step[12]["lr"] == by_step[12]["peak_lr"] == 0.01
    line = cb.summary_line(trainer)
    advice = line.splitlines()[1]
    assert "branch from step 12 " in advice, advice  # the latest budget at the peak: not 1 (warmup), not 25 (decay)
    assert f"branch_from={tmp_path / 'ckpts' / 'budget-step12.ckpt'} trainer.max_steps=1000000000" in advice
    assert (tmp_path / "ckpts" / "budget-step12.ckpt").is_file()


def test_no_branch_is_named_without_a_budget_at_the_peak(tmp_path, check_at_once):
    cb = StepPace(expected_steps=10**9, max_time="00:00:00:01")
    trainer = _fit(tmp_path, cb, max_steps=10**9, max_time="00:00:00:01")  # no schedule, no budgets
    assert "branch_from" not in cb.summary_line(trainer)
