"""Thin LightningModule for BERT pretraining: the losses, metrics and logging keys, nothing else."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from bert.model import BertConfig, BertForPreTraining
from tasks.interval import IntervalMeans, log_due
from tasks.optim import build_optimizer, rebase_schedule

TRAIN_KEYS = ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc")


class PretrainModule(pl.LightningModule):
    """MLM + NSP. The MLM head runs only at masked positions (15% of tokens), not the whole sequence."""

    def __init__(
        self,
        model_config: Mapping[str, Any],
        optim: Mapping[str, Any],
        tokenizer_dir: str | None = None,
        compile: bool = False,
        nsp_weight: float = 1.0,
    ) -> None:
        super().__init__()
        # model_config and tokenizer_dir travel inside every checkpoint: export and fine-tuning rebuild from them.
        self.save_hyperparameters(
            {
                "task": "pretrain",  # what the checkpoint is (tasks.checkpoints)
                "model_config": dict(model_config),
                "optim": dict(optim),
                "tokenizer_dir": tokenizer_dir,
                "nsp_weight": float(nsp_weight),
            },
            logger=False,  # RunRecordCallback logs the config (model_config as model.*)
        )
        self.model = BertForPreTraining(BertConfig(**dict(model_config)))
        self._compile = compile
        self.val_mlm_loss = MeanMetric()  # weighted by masked tokens, so perplexity is per token
        self.train_means = IntervalMeans(list(TRAIN_KEYS))
        self._step_start: float | None = None
        self._batch_tokens = 0
        self.tokens_seen = 0  # non-pad tokens trained on, all ranks; saved in checkpoints (budgets, resume)
        self._interval_tokens = 0.0
        self._interval_seconds = 0.0
        # True for `branch_from=`: the checkpoint's schedule state is dropped, this config's is set to its step
        self.branch = False

    def configure_model(self) -> None:
        if self._compile:
            self.model.compile()  # in place: state-dict keys stay those of transformers

    def model_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mlm_labels = batch["mlm_labels"]
        masked = mlm_labels.ne(-100)  # (B, T) bool
        out = self.model(
            batch["input_ids"],
            token_type_ids=batch["token_type_ids"],
            attention_mask=batch["attention_mask"],
            masked_positions=masked,
        )
        mlm_targets = mlm_labels[masked]  # (N,) in the same row-major order as the head's rows
        mlm_loss = F.cross_entropy(out.mlm_logits.float(), mlm_targets)
        nsp_loss = F.cross_entropy(out.nsp_logits.float(), batch["nsp_labels"])
        with torch.no_grad():
            mlm_acc = (out.mlm_logits.argmax(-1) == mlm_targets).float().mean()
            nsp_acc = (out.nsp_logits.argmax(-1) == batch["nsp_labels"]).float().mean()
        return {
            # nsp_weight 0 = MLM only (task-adaptive pretraining on unrelated sentences); NSP is still measured
            "loss": mlm_loss + self.hparams.nsp_weight * nsp_loss,
            "mlm_loss": mlm_loss,
            "nsp_loss": nsp_loss,
            "mlm_acc": mlm_acc,
            "nsp_acc": nsp_acc,
            "n_masked": masked.sum(),
        }

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()
        # counted here, before callbacks' on_train_batch_end, so a budget saved after this batch includes it
        self._batch_tokens = int(batch["attention_mask"].sum()) * self.trainer.world_size
        self.tokens_seen += self._batch_tokens

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model_step(batch)
        self.train_means.update({key: out[key] for key in TRAIN_KEYS})
        if log_due(self.trainer):  # means over the steps since the last log, not the last batch
            for key, value in self.train_means.pop().items():
                self.log(f"train/{key}", value, prog_bar=key in ("mlm_loss", "nsp_acc"))
            self.log("lr", self.optimizers().param_groups[0]["lr"])
        return out["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        if self._step_start is None:
            return
        self._interval_seconds += time.perf_counter() - self._step_start  # forward + backward + optimizer step
        self._interval_tokens += self._batch_tokens  # counted in on_train_batch_start, all ranks
        if log_due(self.trainer):
            rate = self._interval_tokens / max(self._interval_seconds, 1e-9)
            self.log("train/tokens_per_s", rate, prog_bar=True)
            self._interval_tokens = self._interval_seconds = 0.0

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        out = self.model_step(batch)
        bsz = batch["input_ids"].size(0)
        for key in ("loss", "nsp_loss", "nsp_acc"):
            self.log(f"val/{key}", out[key], batch_size=bsz, sync_dist=True)
        n_masked = out["n_masked"].clamp_min(1)
        self.log("val/mlm_acc", out["mlm_acc"], batch_size=int(n_masked), sync_dist=True)
        self.val_mlm_loss.update(out["mlm_loss"], weight=n_masked)

    def on_validation_epoch_end(self) -> None:
        mlm_loss = self.val_mlm_loss.compute()
        self.val_mlm_loss.reset()
        self.log("val/mlm_loss", mlm_loss, prog_bar=True)
        self.log("val/mlm_ppl", torch.exp(mlm_loss.clamp(max=50.0)))

    def configure_optimizers(self) -> dict[str, Any]:
        return build_optimizer(self.model, self.hparams.optim, int(self.trainer.estimated_stepping_batches),
                               self.trainer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # (the MLflow run id is stamped by tasks.runner.RunIdStamp, for every module)
        checkpoint["tokens_seen"] = int(self.tokens_seen)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
        if self.branch:  # Lightning restores what the list holds: nothing, so the schedule stays this config's
            checkpoint["lr_schedulers"] = []
            callbacks = checkpoint.get("callbacks") or {}
            for key in [key for key in callbacks if key.startswith("ModelCheckpoint")]:
                del callbacks[key]  # the parent's best/last paths are not this run's

    def on_train_start(self) -> None:
        if self.branch:
            for config in self.trainer.lr_scheduler_configs:
                rebase_schedule(config.scheduler, self.trainer.global_step)
