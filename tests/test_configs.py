"""Every option of every config group composes, and what it describes can be instantiated here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from bert.model import BertConfig, BertForPreTraining, count_parameters
from tests.conftest import ROOT

CONF = ROOT / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(config_name: str, overrides: list[str], tmp_path: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=[*overrides, f"paths.output_dir={tmp_path}"])
    OmegaConf.resolve(cfg)  # every interpolation must resolve
    return cfg


def trainer_usable(option: str) -> str | None:
    if option in ("gpu", "fsdp", "deepspeed") and not torch.cuda.is_available():
        return "needs a GPU"
    if option == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        return "needs deepspeed"
    return None


@pytest.mark.parametrize("option", options("model"))
def test_model_presets_build(option, tmp_path):
    cfg = composed("pretrain", [f"model={option}"], tmp_path)
    config = BertConfig(vocab_size=1000, **cfg.model)
    assert (
        config.num_attention_heads == config.hidden_size // 64
        and config.intermediate_size == 4 * config.hidden_size
    )
    if option in ("tiny", "mini"):
        assert count_parameters(BertForPreTraining(config)) > 0


@pytest.mark.parametrize("option", options("data"))
def test_data_configs_instantiate(option, tmp_path):
    cfg = composed("pretrain", [f"data={option}"], tmp_path)
    datamodule = instantiate(cfg.data)  # constructor only: no download, no preparation
    assert datamodule.batch_size > 0
    for spec in cfg.data.files:
        assert spec.name and spec.url and spec.url.startswith("https://")


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_configs(option, tmp_path):
    cfg = composed("pretrain", [f"trainer={option}"], tmp_path)
    why = trainer_usable(option)
    if why:
        pytest.skip(f"trainer={option} composes; instantiating it {why}")
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in ("logger", "optim", "debug", "experiment", "paths") for o in options(g)],
)
def test_other_groups_compose(group, option, tmp_path):
    config_name = "finetune" if option.startswith("ner") else "pretrain"
    cfg = composed(config_name, [f"{group}={option}"], tmp_path)
    assert Path(cfg.paths.root_dir) == ROOT
    assert cfg.paths.tracking_uri == f"sqlite:///{ROOT}/mlruns/mlflow.db"


@pytest.mark.parametrize("option", options("task"))
def test_task_configs(option, tmp_path):
    cfg = composed("finetune", [f"task={option}"], tmp_path)
    with open_dict(cfg):
        cfg.task.data.tokenizer_dir = str(tmp_path)
    assert instantiate(cfg.task.data).batch_size > 0
    assert cfg.task_name == f"finetune-{option}"
