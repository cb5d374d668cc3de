"""Pretrain BERT (masked LM + next-sentence prediction): `python run.py model=small data=namuwiki`."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ["BERT_PROJECT_ROOT"] = str(ROOT)  # conf/paths anchors every path here, whatever the cwd

import hydra  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from bert.model import count_parameters  # noqa: E402
from tasks import runner, tracking  # noqa: E402
from tasks.pretrain import PretrainModule  # noqa: E402

PLOT_PANELS = {
    "MLM loss": ["train/mlm_loss", "val/mlm_loss"],
    "NSP loss": ["train/nsp_loss", "val/nsp_loss"],
    "MLM accuracy": ["train/mlm_acc", "val/mlm_acc"],
    "NSP accuracy": ["train/nsp_acc", "val/nsp_acc"],
}


def train(cfg: DictConfig) -> float | None:
    """Compose, instantiate, fit; returns the best validation loss (what sweeps optimise)."""
    runner.no_partial_logger(cfg)
    ckpt_path, run_id = runner.resolve_resume(cfg)  # bad ckpt_path fails here, before any data work
    branch = runner.resolve_branch(cfg)  # branch_from=...: a new run from a checkpoint's training state
    if branch is not None:
        ckpt_path = branch.path
    encoder = runner.continued_pretraining(cfg)  # pretrained=...: its weights, shape and tokenizer
    pl.seed_everything(cfg.seed, workers=True)

    if encoder is not None:
        OmegaConf.update(cfg, "data.tokenizer_path", str(encoder.tokenizer_dir), force_add=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    runner.check_checkpoint_vocab(ckpt_path, datamodule.vocab_size)

    if encoder is not None:
        model_config = runner.continued_model_config(cfg, encoder)
    else:
        model_config = {
            **OmegaConf.to_container(cfg.model, resolve=True),
            "vocab_size": datamodule.vocab_size,
            "pad_token_id": 0,
        }
    module = PretrainModule(
        model_config=model_config,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),  # plain types: weights_only loads
        tokenizer_dir=str(datamodule.tokenizer_dir),
        compile=cfg.get("compile", False),
        nsp_weight=cfg.get("nsp_weight", 1.0),
    )
    module.branch = branch is not None
    if encoder is not None:
        module.model.load_state_dict(encoder.state_dict)  # strict: every weight of the checkpoint, no more
        print(f"continued pretraining from {encoder.checkpoint}")
    print(f"trainable parameters: {count_parameters(module.model):,}")

    run_name = f"{runner.choice('model')}-{runner.choice('data')}-{datetime.now():%m%d-%H%M%S}"
    logger = runner.build_logger(cfg, run_id, run_name)
    callbacks = runner.build_callbacks(cfg, runner.checkpoint_dir(cfg, logger), monitor="val/loss")
    tags = {
        "git_commit": tracking.git_commit(ROOT),
        "data_sha256": datamodule.data_sha256,
        "task": cfg.task_name,
    }
    if encoder is not None:
        tags["init_from"] = str(encoder.checkpoint)
        if encoder.run_id:
            tags["init_run_id"] = encoder.run_id
    if branch is not None:
        tags.update(branch_from=str(branch.path), branch_step=str(branch.step))
        if branch.parent_run_id:
            tags["branch_run_id"] = branch.parent_run_id
    callbacks.append(runner.RunRecordCallback(cfg, tags, datamodule.tokenizer_dir, PLOT_PANELS))

    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, logger=logger or False, callbacks=callbacks)
    trainer.fit(
        module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, **runner.lightning_load()
    )
    runner.print_summary(trainer)
    best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    metric = best if best is not None else trainer.callback_metrics.get("val/loss")
    return float(metric) if metric is not None else None


@hydra.main(version_base="1.3", config_path="conf", config_name="pretrain")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    finally:
        os.environ.pop(runner.RUN_ID_ENV, None)  # the next job of a sweep starts its own run


if __name__ == "__main__":
    main()
