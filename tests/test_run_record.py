"""How a run is recorded: params without duplicates or paths, warmup with one meaning, plots, the summary."""

from __future__ import annotations

import os
import stat

import pytest
from omegaconf import OmegaConf

from tasks import tracking
from tasks.optim import build_optimizer, warmup_steps_from
from tasks.summary import RunSummary


def test_warmup_steps_and_fraction_keep_their_meaning():
    assert warmup_steps_from({"warmup_fraction": 0.06, "warmup_steps": None}, 1000) == 60
    assert warmup_steps_from({"warmup_fraction": 0.06, "warmup_steps": 500}, 1000) == 500  # steps win
    assert warmup_steps_from({"warmup_steps": 1}, 1000) == 1  # one step, not "100% of the run"
    assert warmup_steps_from({}, 1000) == 0
    with pytest.raises(ValueError, match="warmup_fraction"):
        warmup_steps_from({"warmup_steps": 0.06}, 1000)  # the old fraction-in-warmup_steps spelling
    with pytest.raises(ValueError, match="warmup_fraction"):
        warmup_steps_from({"warmup_fraction": 1.5}, 1000)


def test_schedule_warms_up_over_the_fraction():
    import torch

    model = torch.nn.Linear(4, 4)
    out = build_optimizer(model, {"lr": 1.0, "warmup_fraction": 0.1, "warmup_steps": None}, 100)
    scheduler = out["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(12):
        lrs.append(out["optimizer"].param_groups[0]["lr"])
        out["optimizer"].step()
        scheduler.step()
    assert lrs[9] == pytest.approx(1.0) and lrs[8] < 1.0 and lrs[11] < 1.0  # peak after 10 = 10% of 100


def test_run_params_hold_each_setting_once_without_paths():
    cfg = OmegaConf.create(
        {
            "seed": 42,
            "paths": {"root_dir": "/home/me/bert", "data_dir": "${paths.root_dir}/data"},
            "data": {"_target_": "x.Y", "seed": "${seed}", "data_dir": "${paths.data_dir}", "mirror": "../m",
                     "files": [{"name": "a", "sha256": "0" * 64}], "batch_size": 32},
            "model": {"hidden_size": 128},
            "logger": {"tracking_uri": "sqlite:////home/me/bert/mlruns/mlflow.db", "plots": True},
            "ckpt_path": "/home/me/x.ckpt",
            "tokenizer": "/somewhere/else",
        }
    )  # fmt: skip
    params = tracking.run_params(
        OmegaConf.to_container(cfg, resolve=True),
        OmegaConf.to_container(cfg, resolve=False),
        {"hidden_size": 128, "vocab_size": 3000},
    )
    assert params == {
        "seed": 42,
        "data.batch_size": 32,
        "model.hidden_size": 128,
        "model.vocab_size": 3000,
        "logger.plots": True,
    }


def test_plot_is_two_by_two_titled_and_readable_by_others(tmp_path):
    old = os.umask(0o077)  # even under a strict umask (NamedTemporaryFile alone gives 0600)
    try:
        history = {key: [(0, 1.0), (10, 0.5)] for key in ("a", "b", "c", "val/nsp_acc")}
        panels = {"A": ["a"], "B": ["b"], "C": ["c"], "NSP accuracy": ["val/nsp_acc"]}
        png = tracking.plot_curves(history, panels, tmp_path / "plots" / "curves.png", title="tiny-run")
    finally:
        os.umask(old)
    assert stat.S_IMODE(png.stat().st_mode) == 0o644
    import matplotlib.image

    height, width = matplotlib.image.imread(png).shape[:2]
    assert height > 0.6 * width  # two rows of two


def test_summary_names_the_stop_the_best_and_the_next_commands():
    summary = RunSummary(
        task="pretrain", stop_reason="max_time", final_step=4773, monitor="val/loss", best_value=6.01,
        best_step=4500, run_name="tiny-petition", run_id="abc123", experiment_id="1",
        tracking_uri="sqlite:////p/mlruns/mlflow.db", best_ckpt="/p/best.ckpt", last_ckpt="/p/last.ckpt",
        limits={"max_steps": 18000, "max_time": "00:00:55:00"},
    )  # fmt: skip
    text = summary.text()
    assert "max_time at step 4,773 (max_steps=18000, max_time=00:00:55:00)" in text
    assert "Best val/loss: 6.0100 at step 4,500" in text
    assert "mlflow ui --backend-store-uri sqlite:////p/mlruns/mlflow.db" in text
    assert "/#/experiments/1/runs/abc123?workflowType=machine_learning" in text
    assert "ckpt_path=last" in text and "pretrained=abc123" in text and "bert.export abc123" in text
    no_run = RunSummary(task="finetune-sts", stop_reason="max_steps", final_step=30, monitor="val/pearson",
                        best_value=0.3, best_step=30, best_ckpt="/tmp/ft1/checkpoints/best.ckpt")  # logger=none
    assert "bert.export /tmp/ft1/checkpoints/best.ckpt exports/ft1 " in no_run.text()  # not exports//tmp/ft1
