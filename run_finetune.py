"""Fine-tune on a downstream task: `python run_finetune.py task=<ner|nli|sts|topic> [pretrained=<ckpt|run id|newest|null>]`.

Task-generic: conf/task/<name>.yaml names the data module (`task.data`), the LightningModule (`task.module`),
the monitored metric and the plot panels; nothing here knows a task.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ["BERT_PROJECT_ROOT"] = str(ROOT)  # conf/paths anchors every path here, whatever the cwd

import hydra  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from tasks import runner, tracking  # noqa: E402


def train(cfg: DictConfig) -> float | None:
    """Compose, instantiate, fit, test on one device; returns the best value of the task's monitor (val)."""
    runner.no_partial_logger(cfg)
    ckpt_path, run_id = runner.resolve_resume(cfg)
    encoder = runner.resolve_encoder(cfg)  # fails before any training when there is nothing to start from
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.task.data, tokenizer_dir=str(encoder.tokenizer_dir))
    datamodule.prepare_data()
    model_config = dict(encoder.model_config)
    if cfg.task.get("encoder_dropout") is not None:  # pretraining may have run without dropout (short budgets)
        model_config.update(
            hidden_dropout_prob=cfg.task.encoder_dropout,
            attention_probs_dropout_prob=cfg.task.encoder_dropout,
        )
    module = hydra.utils.instantiate(
        cfg.task.module,
        model_config=model_config,
        labels=list(datamodule.labels),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),  # plain types: weights_only loads
        tokenizer_dir=str(encoder.tokenizer_dir),
        init_from=str(encoder.checkpoint) if encoder.state_dict is not None else None,
        _convert_="all",  # plain dicts and lists in the hparams, so checkpoints load with weights_only
    )
    if encoder.state_dict is not None and ckpt_path is None:
        module.load_encoder(encoder.state_dict)
        module.model.bert.reinit_top_layers(int(cfg.get("reinit_layers") or 0))

    init = "pretrained" if encoder.state_dict is not None else "scratch"
    logger = runner.build_logger(cfg, run_id, f"{cfg.task.name}-{init}-{datetime.now():%m%d-%H%M%S}")
    callbacks = runner.build_callbacks(
        cfg, runner.checkpoint_dir(cfg, logger), monitor=cfg.task.monitor, mode=cfg.task.monitor_mode
    )
    tags = {
        "git_commit": tracking.git_commit(ROOT),
        "data_sha256": datamodule.data_sha256,
        "task": cfg.task.name,
        "init": init,
        "pretrained_run": encoder.run_id or "",
        "pretrained_ckpt": str(encoder.checkpoint or ""),
    }
    panels = OmegaConf.to_container(cfg.task.get("plot_panels") or {}, resolve=True)
    callbacks.append(runner.RunRecordCallback(cfg, tags, encoder.tokenizer_dir, panels))

    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, logger=logger or False, callbacks=callbacks)
    trainer.fit(
        module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, **runner.lightning_load()
    )
    best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    runner.test_on_one_device(cfg, trainer, module, datamodule, logger)
    if trainer.is_global_zero:
        log_report(cfg, module, datamodule, logger, best)
    runner.print_summary(trainer)
    return float(best) if best is not None else None


def log_report(cfg: DictConfig, module: pl.LightningModule, datamodule, logger, best) -> None:
    """The task's report files and extra metrics; the best monitored value; how many inputs were truncated."""
    files, metrics = module.write_report(Path(cfg.paths.output_dir), datamodule)
    if best is not None:
        metrics[f"best/{cfg.task.monitor}"] = float(best)
    if logger is None:
        return
    for path, artifact_dir in files:
        logger.experiment.log_artifact(logger.run_id, str(path), artifact_dir)
    if metrics:
        logger.log_metrics(metrics)
    truncated = {f"truncated_{name}": stats.truncated for name, stats in getattr(datamodule, "stats", {}).items()}
    if truncated:
        tracking.set_tags(logger, truncated)


@hydra.main(version_base="1.3", config_path="conf", config_name="finetune")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    finally:
        os.environ.pop(runner.RUN_ID_ENV, None)  # the next job of a sweep starts its own run


if __name__ == "__main__":
    main()
