"""Fine-tune on a downstream task: `python run_finetune.py task=ner [pretrained=<ckpt|run id|newest|null>]`."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ["BERT_PROJECT_ROOT"] = str(ROOT)  # conf/paths anchors every path here, whatever the cwd

import hydra  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from bert.ner_align import alignment_ceiling  # noqa: E402
from bert.tokenizer import load_tokenizer  # noqa: E402
from datamodules.klue_ner import LABELS  # noqa: E402
from tasks import runner, tracking  # noqa: E402
from tasks.ner import NerModule, plot_confusion, report  # noqa: E402

PLOT_PANELS = {
    "loss": ["train/loss", "val/loss"],
    "entity F1": ["val/entity_f1_micro", "val/entity_f1_macro"],
    "char F1": ["val/char_f1_klue", "val/char_f1"],
}


def train(cfg: DictConfig) -> float | None:
    """Compose, instantiate, fit, test on one device; returns the best validation entity macro F1."""
    ckpt_path, run_id = runner.resolve_resume(cfg)
    encoder = runner.resolve_encoder(cfg)  # fails before any training when there is nothing to start from
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.task.data, tokenizer_dir=str(encoder.tokenizer_dir))
    datamodule.prepare_data()
    model_config = dict(encoder.model_config)
    if (
        cfg.task.get("encoder_dropout") is not None
    ):  # pretraining may have run without dropout (short budgets)
        model_config.update(
            hidden_dropout_prob=cfg.task.encoder_dropout,
            attention_probs_dropout_prob=cfg.task.encoder_dropout,
        )
    module = NerModule(
        model_config=model_config,
        labels=LABELS,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),  # plain types: weights_only loads
        tokenizer_dir=str(encoder.tokenizer_dir),
        classifier_dropout=cfg.task.get("classifier_dropout"),
        init_from=str(encoder.checkpoint) if encoder.state_dict is not None else None,
    )
    if encoder.state_dict is not None and ckpt_path is None:
        module.load_encoder(encoder.state_dict)

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
    callbacks.append(runner.RunRecordCallback(cfg, tags, encoder.tokenizer_dir, PLOT_PANELS))

    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, logger=logger or False, callbacks=callbacks)
    trainer.fit(
        module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, **runner.lightning_load()
    )
    runner.test_on_one_device(cfg, trainer, module, datamodule, logger)
    if trainer.is_global_zero and getattr(module, "last_eval", None):
        write_report(cfg, module, logger)
        log_alignment_ceiling(datamodule, encoder.tokenizer_dir, logger)
    runner.print_summary(trainer)
    best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    return float(best) if best is not None else None


def write_report(cfg: DictConfig, module: NerModule, logger) -> None:
    """Per-type report and confusion matrix of the last evaluation (test), printed and logged as artifacts."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last = module.last_eval
    text = report(last["entity"], last["confusion"], module.labels)
    print(text)
    (out_dir / f"{last['stage']}_report.txt").write_text(text, encoding="utf-8")
    plot_confusion(last["confusion"], module.labels, out_dir / f"{last['stage']}_confusion.png")
    if logger is not None:
        logger.experiment.log_artifact(logger.run_id, str(out_dir / f"{last['stage']}_report.txt"))
        logger.experiment.log_artifact(
            logger.run_id, str(out_dir / f"{last['stage']}_confusion.png"), "plots"
        )


def log_alignment_ceiling(datamodule, tokenizer_dir: Path, logger) -> None:
    """The best entity F1 wordpiece-level tags can reach with this tokenizer (gold tags round-tripped)."""
    tokenizer = load_tokenizer(Path(tokenizer_dir))
    ceiling = alignment_ceiling(datamodule.datasets["test"].sentences, tokenizer, datamodule.max_seq_len)
    metrics = {f"test/alignment_ceiling_{k}": ceiling[f"entity_f1_{k}"] for k in ("micro", "macro")}
    print(
        f"alignment ceiling (test): micro {metrics['test/alignment_ceiling_micro']:.4f}, macro {metrics['test/alignment_ceiling_macro']:.4f}"
    )
    if logger is not None:
        logger.log_metrics(metrics)


@hydra.main(version_base="1.3", config_path="conf", config_name="finetune")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    finally:
        os.environ.pop(runner.RUN_ID_ENV, None)  # the next job of a sweep starts its own run


if __name__ == "__main__":
    main()
