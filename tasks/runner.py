"""What every entry point needs around `Trainer.fit`: MLflow logger, checkpoints, resume, run metadata, plots."""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import (
    Checkpoint,
    EarlyStopping,
    ModelCheckpoint,
    RichModelSummary,
    RichProgressBar,
    Timer,
)
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from tasks import checkpoints, tracking
from tasks.summary import RunSummary, banner

log = logging.getLogger(__name__)

RUN_ID_ENV = "BERT_MLFLOW_RUN_ID"  # hands rank 0's run id to the DDP processes Lightning re-launches


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in str(record.msg)


def quiet_known_noise() -> None:
    """Silence what a user cannot act on, each by its message and the module that emits it (nothing else)."""
    import warnings

    # torchdata's StatefulDataLoader calls torch.set_vital, which torch deprecated (torchdata's to fix)
    warnings.filterwarnings(
        "ignore", message="'set_vital' is deprecated", module="torchdata.stateful_dataloader"
    )
    # Lightning's own pytree helper builds a LeafSpec, which torch deprecated (Lightning's to fix)
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", module="pytorch_lightning"
    )
    # an advertisement for Lightning's cloud logger, printed by every Trainer
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    rank_zero.addFilter(_DropMessage("try installing [litlogger]"))
    # our ModelSummary (without the FLOPs column of zeros) replaces Lightning's default, which it announces
    rank_zero.addFilter(_DropMessage("Trainer already configured with model summary callbacks"))


quiet_known_noise()  # at import: the entry points import this module before any Trainer exists


def choice(group: str) -> str:
    """The option picked for a config group (`model=mini` -> "mini"), for run names."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices.get(group, group))
    except ValueError:  # composed outside @hydra.main (tests)
        return group


def no_partial_logger(cfg: DictConfig) -> None:
    """`logger=none` under a preset that sets `logger.run_name` composes to a logger config with a run name
    and no store: that means no logger, not a crash when the logger is built."""
    logger = cfg.get("logger")
    if logger is not None and "tracking_uri" not in logger:
        with open_dict(cfg):
            cfg.logger = None


def tracking_uri(cfg: DictConfig) -> str:
    """Where run ids are looked up: the logger's store, else the default one (`logger=none`)."""
    return cfg.logger.tracking_uri if cfg.get("logger") else tracking.default_tracking_uri()


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """Kind, hyperparameters, MLflow run id and step of a checkpoint, read safely (tasks.checkpoints)."""
    return checkpoints.meta(path)


def expected_kind(cfg: DictConfig) -> str:
    """The checkpoint kind this entry point resumes: "pretrain" for run.py, the task name for fine-tuning."""
    task = cfg.get("task")
    return str(task.name) if isinstance(task, DictConfig) and task.get("name") else "pretrain"


def _check_resumable(cfg: DictConfig, path: Path) -> dict[str, Any]:
    info = read_checkpoint_meta(path)  # refuses a file that would run code, naming it
    expected = expected_kind(cfg)
    if info["kind"] != expected:
        raise ValueError(
            f"ckpt_path={path} is {checkpoints.describe(info['kind'])}. ckpt_path continues a {expected} run "
            "from its own checkpoint"
        )
    return info


def resolve_resume(cfg: DictConfig) -> tuple[Path | None, str | None]:
    """(checkpoint to resume from, MLflow run to continue); fails before any training on a bad ckpt_path."""
    ref = cfg.get("ckpt_path")
    if ref in (None, ""):
        return None, None
    if str(ref) == "last":
        if cfg.get("logger") is None:
            raise ValueError(
                "ckpt_path=last looks up the newest MLflow run; it needs a logger (not logger=none)"
            )
        run_id, path = tracking.find_resumable_run(cfg.logger.tracking_uri, cfg.logger.experiment_name)
        _check_resumable(cfg, path)
        return path, run_id
    path = Path(str(ref))
    if not path.is_absolute():
        path = Path(cfg.paths.root_dir) / path
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ref}: no such checkpoint file ({path})")
    return path, _check_resumable(cfg, path).get("mlflow_run_id")


@dataclass(frozen=True)
class Branch:
    """A pretraining checkpoint a new run starts from (`branch_from=`): its training state, this config's
    schedule."""

    path: Path
    parent_run_id: str | None
    step: int


def resolve_branch(cfg: DictConfig) -> Branch | None:
    """`branch_from=<.ckpt>`: a NEW run that takes a pretraining checkpoint's weights, AdamW moments, step and
    data position, and this config's step-keyed schedule and limits. What warmup-stable-decay is for: branch a
    decay (or a longer stable phase) off a checkpoint of the stable phase instead of pretraining again from step
    0. With ckpt_path set too, the branch resumes as any run does. Fails before any data work on a bad path, a
    time-keyed schedule or too few steps."""
    ref = cfg.get("branch_from")
    if ref in (None, ""):
        return None
    if cfg.get("ckpt_path") not in (None, ""):
        return None  # `<same overrides> ckpt_path=last`: a killed branch continues its own run
    if cfg.get("pretrained") not in (None, ""):
        raise ValueError(
            "pretrained and branch_from are both set: pretrained= takes a checkpoint's weights with a fresh "
            "optimizer and schedule, branch_from its whole training state; give one"
        )
    if cfg.optim.get("time_keyed"):
        raise ValueError(
            f"branch_from={ref} needs a step-keyed schedule: add optim.time_keyed=false trainer.max_time=null "
            "trainer.max_steps=<the branch's final step> (a time-keyed decay has no step to end at)"
        )
    path = Path(str(ref))
    if not path.is_absolute():
        path = Path(cfg.paths.root_dir) / path
    if not path.is_file():
        raise FileNotFoundError(f"branch_from={ref}: no such checkpoint file ({path})")
    info = read_checkpoint_meta(path)  # refuses a file that would run code, naming it
    if info["kind"] != "pretrain":
        raise ValueError(f"branch_from={path} is {checkpoints.describe(info['kind'])}; it takes a pretraining one")
    step = int(info.get("global_step") or 0)
    max_steps = int(cfg.trainer.get("max_steps") or -1)
    if max_steps <= step:
        raise ValueError(
            f"branch_from={path} is at step {step}: trainer.max_steps={max_steps} leaves nothing to train; "
            "give the branch's final step"
        )
    return Branch(path, info.get("mlflow_run_id"), step)


def check_checkpoint_vocab(path: Path | None, vocab_size: int) -> None:
    if path is None:
        return
    ckpt_vocab = read_checkpoint_meta(path)["hyper_parameters"].get("model_config", {}).get("vocab_size")
    if ckpt_vocab is not None and int(ckpt_vocab) != int(vocab_size):
        raise ValueError(
            f"checkpoint {path} was trained with a vocabulary of {ckpt_vocab} tokens, but the tokenizer of this "
            f"data config has {vocab_size}: use the same data/tokenizer settings as the run being resumed"
        )


class RunLogger(MLFlowLogger):
    """Lightning ends every run an exception stopped as FAILED. A run the user stopped (Ctrl+C, SIGTERM) is
    KILLED in MLflow's terms, so that the UI tells it from a crash; FinalCheckpoint has tagged `stop_reason`
    by then (on_exception runs before the loggers are finalized)."""

    def finalize(self, status: str = "success") -> None:
        if status == "failed" and self._initialized:
            reason = self.experiment.get_run(self.run_id).data.tags.get("stop_reason")
            if reason in ("interrupted", "sigterm"):
                status = "KILLED"
        super().finalize(status)


def build_logger(cfg: DictConfig, run_id: str | None, run_name: str) -> MLFlowLogger | None:
    if cfg.get("logger") is None:
        return None
    if rank_zero_only.rank != 0:  # a DDP process re-launched by Lightning: log nothing, know rank 0's run
        run_id = os.environ.get(RUN_ID_ENV)
    if (
        run_id is not None
        and rank_zero_only.rank == 0
        and not tracking.run_exists(cfg.logger.tracking_uri, run_id)
    ):
        log.warning(
            "run %s of the checkpoint is not in %s: logging to a new run", run_id, cfg.logger.tracking_uri
        )
        run_id = None
    artifact_location = cfg.logger.get("artifact_location")
    if artifact_location and str(cfg.logger.tracking_uri).startswith("sqlite:"):
        artifact_location = Path(artifact_location).as_uri()
    else:
        artifact_location = None
    if str(cfg.logger.tracking_uri).startswith("sqlite:"):
        tracking.ensure_store(
            cfg.logger.tracking_uri, cfg.logger.get("artifact_location"), [cfg.logger.experiment_name]
        )
    tags = {str(k): str(v) for k, v in (cfg.logger.get("tags") or {}).items()}
    if cfg.logger.get("parent_run_id"):  # nested under a study's parent run (tasks/study.py)
        tags["mlflow.parentRunId"] = str(cfg.logger.parent_run_id)
    logger = RunLogger(
        experiment_name=cfg.logger.experiment_name,
        run_name=cfg.logger.get("run_name") or run_name,
        tracking_uri=cfg.logger.tracking_uri,
        tags=tags or None,  # set when the run is created (not on resume)
        artifact_location=artifact_location,
        run_id=run_id,
        log_model=False,  # checkpoints already live in the run's artifact folder; no second copy
    )
    if rank_zero_only.rank == 0:
        os.environ[RUN_ID_ENV] = logger.run_id  # creates the run now, so its folder is known
        if run_id is not None:  # resumed: the run was terminated (FAILED/KILLED) when it stopped
            logger.experiment.update_run(run_id, status="RUNNING")
    return logger


def checkpoint_dir(cfg: DictConfig, logger: MLFlowLogger | None) -> Path:
    """Inside the run's own artifact folder when the store is local, so the UI lists the checkpoints."""
    if logger is None:
        return Path(cfg.paths.output_dir) / "checkpoints"
    run_id = os.environ.get(RUN_ID_ENV) or "unknown-run"
    if rank_zero_only.rank == 0:
        artifact_uri = logger.experiment.get_run(logger.run_id).info.artifact_uri
        if urlparse(artifact_uri).scheme == "file":
            return Path(urlparse(artifact_uri).path) / "checkpoints"
    return Path(cfg.paths.checkpoint_dir) / run_id  # ranks > 0 get rank 0's dir by broadcast


def build_callbacks(cfg: DictConfig, ckpt_dir: Path, monitor: str, mode: str = "min") -> list[pl.Callback]:
    best = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    last = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="last",
        every_n_train_steps=cfg.get("checkpoint_every_n_steps") or None,
        save_top_k=0,
        save_last=True,
        enable_version_counter=False,
    )
    callbacks: list[pl.Callback] = [  # the progress bar last: tests drop it
        best, last, FinalCheckpoint(ckpt_dir), ValidateAtMaxSteps(), RunIdStamp(), ModelSummary(),
        ProgressBar(leave=True),
    ]
    budgets = budget_callback(cfg, ckpt_dir)
    if budgets is not None:
        callbacks.append(budgets)
    if "expected_steps" in cfg:  # pretraining (conf/pretrain.yaml names the key): the pace check
        from tasks.pace import StepPace

        callbacks.append(StepPace(cfg.get("expected_steps"), cfg.trainer.get("max_time")))
    return callbacks


lightning_load = checkpoints.lightning_load  # kwargs for Trainer.fit/test(ckpt_path=...): weights_only=True


class RunIdStamp(pl.Callback):
    """Writes the MLflow run id into every checkpoint, so `ckpt_path=<file>` continues the same run."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        run_id = getattr(trainer.logger, "run_id", None) or os.environ.get(RUN_ID_ENV)
        checkpoint["mlflow_run_id"] = run_id


class ValidateAtMaxSteps(pl.Callback):
    """Validates the step a run ends on at `trainer.max_steps`, whether or not it falls on `val_check_interval`.

    Lightning validates every `val_check_interval` batches and when a run is asked to stop (Timer at max_time,
    early stopping), but a run that reaches max_steps between two checks ended unmeasured: a 6,878-step run's
    last val was at 6,499, so its curves, its best checkpoint and the summary missed the annealed end. Asking
    it to stop at max_steps takes Lightning's own stop path, which validates that batch once (on the interval
    too: one check, not two)."""

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temp file beside it and renames it into place: a run killed while saving
    leaves the previous file whole, never a truncated one."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def stop_reason(trainer: pl.Trainer) -> str:
    """Why fit stopped: sigterm, interrupted, error, max_steps, max_time, early_stop, max_epochs or finished.

    Read by FinalCheckpoint (tags `stop_reason`, `final_step`) and by anything summarising a run."""
    final = next((cb for cb in trainer.callbacks if isinstance(cb, FinalCheckpoint)), None)
    if final is not None and final.reason is not None:
        return final.reason
    return _reason_now(trainer)


def _reason_now(trainer: pl.Trainer, exception: BaseException | None = None) -> str:
    if isinstance(exception, SIGTERMException) or trainer.received_sigterm:
        return "sigterm"
    if isinstance(exception, KeyboardInterrupt):
        return "interrupted"
    if exception is not None:
        return "error"
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
        return "max_steps"
    timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
    if timer is not None and timer.time_remaining() is not None and timer.time_remaining() <= 0:
        return "max_time"
    early = next((cb for cb in trainer.callbacks if isinstance(cb, EarlyStopping)), None)
    if early is not None and (early.stopped_epoch > 0 or trainer.should_stop):
        return "early_stop"
    if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch:
        return "max_epochs"
    return "finished"


class FinalCheckpoint(Checkpoint):
    """Saves the state a run stops at into `last.ckpt`, whatever stopped it, and tags the MLflow run with
    `stop_reason` and `final_step`.

    Lightning's ModelCheckpoint(save_last) saves only every N steps or at validation, so a run stopped by
    max_time/max_steps/SIGTERM lost the steps since. The save happens at the end of the batch the stop was
    decided in (Timer and the SIGTERM handler set their flags by then), the same point ModelCheckpoint saves
    at, so `ckpt_path=last` continues with the next batch: nothing replayed, nothing skipped. A Checkpoint
    subclass runs after the other callbacks (Lightning orders checkpoint callbacks last), so after Timer.
    SIGTERM follows Lightning's SLURM handling: its handler sets `trainer.received_sigterm`, the loop raises
    SIGTERMException after the batch, and the job can be requeued and resumed with `ckpt_path=last`.
    KeyboardInterrupt (and a SIGTERM during validation) is saved from `on_exception`, mid-batch: that
    batch is then not trained on resume.
    """

    def __init__(self, dirpath: str | os.PathLike, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self.saved_step: int | None = None
        self.reason: str | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # every checkpoint, not only ours
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        self.saved_step, self.reason = None, None

    def _stopping(self, trainer: pl.Trainer) -> bool:
        stop = bool(trainer.should_stop or trainer.received_sigterm)
        stop = stop or (trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step)
        if trainer.world_size > 1:  # a signal may reach one rank only; saving is collective
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        return stop

    def _save(self, trainer: pl.Trainer) -> None:
        if self.saved_step == trainer.global_step:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # atomic through AtomicCheckpointIO
        self.saved_step = trainer.global_step
        log.info("saved the final state (step %d) to %s", trainer.global_step, self.path)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if self._stopping(trainer):
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)  # e.g. early stopping decided at validation: no-op when already saved
        self._record(trainer, _reason_now(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        reason = _reason_now(trainer, exception)
        if reason in ("sigterm", "interrupted") and trainer.state.fn == "fit":
            self._save(trainer)
        self._record(trainer, reason)

    def _record(self, trainer: pl.Trainer, reason: str) -> None:
        self.reason = reason
        if trainer.is_global_zero and isinstance(trainer.logger, MLFlowLogger):
            tracking.set_tags(trainer.logger, {"stop_reason": reason, "final_step": trainer.global_step})


def budget_callback(cfg: DictConfig, ckpt_dir: Path) -> pl.Callback | None:
    """Kept pretraining checkpoints (`keep_checkpoints_at_steps`, `checkpoint_every_minutes`): only configs
    that name these keys (conf/pretrain.yaml) get them, so fine-tuning runs never do."""
    at_steps = list(cfg.get("keep_checkpoints_at_steps") or [])
    every = cfg.get("checkpoint_every_minutes")
    if not at_steps and not every:
        return None
    from tasks.budgets import BudgetCheckpoints

    return BudgetCheckpoints(ckpt_dir, at_steps, every, at_end=bool(cfg.get("budget_at_end", True)))


class ModelSummary(RichModelSummary):
    """Lightning's table without its FLOPs column: it counts FLOPs only with an `example_input_array`, so
    here it would print a column of zeros."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **kwargs) -> None:  # fmt: skip
        from pytorch_lightning.utilities.model_summary.model_summary import (
            get_formatted_model_size,
            get_human_readable_count,
        )
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style="bold magenta")
        table.add_column(" ", style="dim")
        for name, _ in columns[1:]:
            table.add_column(name, justify="right" if name in ("Params", "In sizes", "Out sizes") else "left")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        console.print(
            f"[bold]Trainable params[/]: {get_human_readable_count(int(trainable_parameters))}   "
            f"[bold]Total params[/]: {get_human_readable_count(int(total_parameters))}   "
            f"[bold]Size[/]: {get_formatted_model_size(model_size)} MB"
        )


class ProgressBar(RichProgressBar):
    """Step-budgeted runs have max_epochs=-1, which Lightning prints as 'Epoch 0/-2'."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}"


class RunRecordCallback(pl.Callback):
    """Records the run in MLflow so that it reads at a glance: params (the config once), tags (overrides,
    presets, git), dataset inputs, system metrics, `best/*` metrics and curves at every validation, and at the
    end the stop reason and a summary (printed, and the run description)."""

    def __init__(
        self,
        cfg: DictConfig,
        tags: Mapping[str, Any],
        tokenizer_dir: Path | None,
        plot_panels: Mapping[str, list[str]],
    ) -> None:
        self.cfg = cfg
        self.tags = dict(tags)
        self.tokenizer_dir = tokenizer_dir
        self.plot_panels = plot_panels
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.summary: RunSummary | None = None
        self._run_name: str | None = None
        self._system_metrics = None

    # -- state that survives a resume (the best so far) --------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.tags.get("branch_from"):  # a branch is a run of its own: its best is its own, as its best.ckpt
            return
        self.best_value = state_dict.get("best_value")
        self.best_step = state_dict.get("best_step")

    def _checkpoints(self, trainer: pl.Trainer) -> tuple[ModelCheckpoint | None, ModelCheckpoint | None]:
        ckpts = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
        best = next((cb for cb in ckpts if cb.monitor), None)
        last = next((cb for cb in ckpts if cb.save_last), None)
        return best, last

    @staticmethod
    def _logger(trainer: pl.Trainer) -> MLFlowLogger | None:
        return trainer.logger if isinstance(trainer.logger, MLFlowLogger) else None

    # -- start ---------------------------------------------------------------------------------------------------

    @rank_zero_only
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = self._logger(trainer)
        if logger is None:
            return
        client, run_id = logger.experiment, logger.run_id
        self._run_name = client.get_run(run_id).info.run_name
        resolved = OmegaConf.to_container(self.cfg, resolve=True)
        # a resumed run already has its params (MLflow forbids changing them); a branch is a new run
        continued = trainer.ckpt_path is not None and not self.tags.get("branch_from")
        if not continued:
            unresolved = OmegaConf.to_container(self.cfg, resolve=False)
            model_config = pl_module.hparams.get("model_config")
            logger.log_hyperparams(tracking.run_params(resolved, unresolved, model_config))
            files = getattr(trainer.datamodule, "input_files", None)
            if files:
                tracking.log_dataset_inputs(client, run_id, files)
        tracking.log_text(logger, OmegaConf.to_yaml(resolved), "config.yaml")
        if self.tokenizer_dir is not None and Path(self.tokenizer_dir).is_dir():
            tracking.log_dir(logger, Path(self.tokenizer_dir), "tokenizer")
        from bert.model import count_parameters

        n_params = count_parameters(pl_module.model)
        tracking.log_text(
            logger, f"trainable parameters: {n_params:,}\n\n{pl_module.model}\n", "model_summary.txt"
        )
        _, last = self._checkpoints(trainer)
        root = Path(self.cfg.paths.root_dir)
        tags = {
            **self.tags,
            **run_choices(),
            "git_commit": tracking.git_commit(root),
            "git_dirty": tracking.git_dirty(root),
            "n_parameters": n_params,
        }
        if last is not None:  # known up front, so a killed run can be resumed with ckpt_path=last
            tags["last_ckpt"] = str(Path(last.dirpath) / "last.ckpt")
        tracking.set_tags(logger, tags)
        if self.cfg.logger.get("system_metrics", True):
            self._start_system_metrics(logger, resumed=continued)

    def _start_system_metrics(self, logger: MLFlowLogger, resumed: bool) -> None:
        """CPU, memory, disk, network (and GPU with pynvml) as `system/*`, every 10 s, in a daemon thread."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "Started monitoring" lines
        self._system_metrics = SystemMetricsMonitor(
            logger.run_id, resume_logging=resumed, tracking_uri=self.cfg.logger.tracking_uri
        )
        self._system_metrics.start()

    def _stop_system_metrics(self) -> None:
        monitor, self._system_metrics = self._system_metrics, None
        if monitor is None:
            return
        monitor.finish()
        # MLflow's monitor drops the samples of an unfinished interval when it is stopped, so a run shorter
        # than one interval would have no system metrics at all: publish what it collected.
        try:
            pending = monitor.aggregate_metrics()
            if pending:
                monitor.publish_metrics(pending)
                monitor.mlflow_logger.flush()
        except Exception as err:  # system metrics are a convenience; never fail a finished run over them
            log.warning("could not log the last system metrics: %s", err)

    # -- every validation ----------------------------------------------------------------------------------------

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        best, _ = self._checkpoints(trainer)
        value = trainer.callback_metrics.get(best.monitor) if best is not None else None
        if value is not None:
            value = float(value)
            prev = self.best_value
            if prev is None or (value > prev if best.mode == "max" else value < prev):
                self.best_value, self.best_step = value, int(trainer.global_step)
            logger = self._logger(trainer)
            if logger is not None:
                metrics = {f"best/{best.monitor}": self.best_value, "best/step": float(self.best_step)}
                logger.log_metrics(metrics, step=trainer.global_step)
        self.log_plots(trainer)  # refreshed now, so an interrupted run has its curves

    # -- end -----------------------------------------------------------------------------------------------------

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, stop_reason(trainer))

    @rank_zero_only
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish(trainer, _reason_now(trainer, exception))  # runs before FinalCheckpoint records it
        if self.summary is not None:  # Lightning exits right after an interrupt: print it now
            print(summary_banner(self.summary))

    def _finish(self, trainer: pl.Trainer, reason: str) -> None:
        self._stop_system_metrics()
        logger = self._logger(trainer)
        best, last = self._checkpoints(trainer)
        best_path = best.best_model_path if best is not None and best.best_model_path else None
        last_path = Path(last.dirpath) / "last.ckpt" if last is not None and last.dirpath else None
        self.summary = RunSummary(
            task=str(self.cfg.get("task_name", "pretrain")),
            stop_reason=reason,
            final_step=int(trainer.global_step),
            monitor=best.monitor if best is not None else None,
            best_value=self.best_value,
            best_step=self.best_step,
            run_name=self._run_name,
            run_id=logger.run_id if logger is not None else None,
            experiment_id=logger.experiment_id if logger is not None else None,
            tracking_uri=str(self.cfg.logger.tracking_uri) if logger is not None else None,
            best_ckpt=best_path,
            last_ckpt=str(last_path) if last_path is not None and last_path.is_file() else None,
            limits={"max_steps": trainer.max_steps, "max_time": self.cfg.trainer.get("max_time")},
            notes=[line for cb in trainer.callbacks if (line := _summary_line(cb, trainer))],
        )
        if logger is None:
            return
        tags = {"mlflow.note.content": self.summary.text()}  # the run's description in the UI
        if best_path:  # stop_reason and final_step: tagged by FinalCheckpoint
            tags["best_ckpt"] = best_path
        tracking.set_tags(logger, tags)
        self.log_plots(trainer)

    def log_plots(self, trainer: pl.Trainer) -> None:
        logger = self._logger(trainer)
        if logger is None or not self.cfg.logger.get("plots", True):
            return
        keys = [k for keys in self.plot_panels.values() for k in keys]
        history = tracking.metric_history(logger, keys)
        out_dir = Path(self.cfg.paths.output_dir) / "plots"
        png = tracking.plot_curves(
            history, self.plot_panels, out_dir / "curves.png", title=self._run_name or logger.run_id or ""
        )
        if png is not None:
            logger.experiment.log_artifact(logger.run_id, str(png), "plots")


def _summary_line(callback: pl.Callback, trainer: pl.Trainer) -> str | None:
    line = getattr(callback, "summary_line", None)
    return line(trainer) if callable(line) else None


def run_choices() -> dict[str, str]:
    """Tags that say how the run was asked for: command-line overrides and the preset of each group."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except ValueError:  # composed outside @hydra.main (tests)
        return {}
    tags = {"overrides": shlex.join(hydra_cfg.overrides.task)}  # shell-quoted: tasks.anneal splits it back
    for group in ("model", "data", "experiment", "task"):
        if group in hydra_cfg.runtime.choices:
            tags[group] = str(hydra_cfg.runtime.choices[group] or "none")
    return tags


def summary_banner(summary: RunSummary) -> str:
    return banner(summary.text())


def print_summary(trainer: pl.Trainer) -> None:
    """The end-of-run summary (entry points call this last, after fit and test)."""
    if not trainer.is_global_zero:
        return
    record = next((cb for cb in trainer.callbacks if isinstance(cb, RunRecordCallback)), None)
    if record is not None and record.summary is not None:
        print(summary_banner(record.summary))


@dataclass
class Encoder:
    """What a fine-tuning run starts from: shape, tokenizer and (unless scratch) pretrained weights."""

    model_config: dict[str, Any]
    tokenizer_dir: Path
    state_dict: dict[str, torch.Tensor] | None
    checkpoint: Path | None
    run_id: str | None


def tokenizer_dir_of(path: Path, hparams: Mapping[str, Any]) -> Path:
    """The tokenizer recorded in the checkpoint, else the `tokenizer/` artifact beside its checkpoints folder."""
    recorded = hparams.get("tokenizer_dir")
    for candidate in (recorded, path.parent.parent / "tokenizer"):
        if candidate and (Path(candidate) / "tokenizer.json").is_file():
            return Path(candidate)
    raise FileNotFoundError(
        f"no tokenizer found for checkpoint {path} (looked at {recorded} and its run's artifacts)"
    )


def load_encoder(ref: str, tracking_uri: str, with_weights: bool) -> Encoder:
    """A checkpoint path or MLflow run id -> its model config, tokenizer and encoder weights.

    A pretraining checkpoint gives its encoder (and heads, dropped by the task module); a fine-tuned one (NER,
    a sentence task) gives its encoder, without the task head."""
    path = checkpoints.resolve(ref, tracking_uri)
    ckpt = checkpoints.load(path)
    kind = checkpoints.checkpoint_kind(ckpt)
    hparams = ckpt.get("hyper_parameters") or {}
    if kind == "unknown" or "model_config" not in hparams:
        raise ValueError(f"pretrained={ref}: {path} is {checkpoints.describe(kind)}")
    if kind != "pretrain":
        log.warning("pretrained=%s is %s: starting from its encoder, without its task head", ref, kind)
    state = checkpoints.encoder_state(ckpt, path) if with_weights else None
    run_id = None if Path(str(ref)).is_file() else str(ref)
    return Encoder(
        dict(hparams["model_config"]),
        tokenizer_dir_of(path, hparams),
        state,
        path,
        run_id or ckpt.get("mlflow_run_id"),
    )


def load_hf_encoder(ref: str, cache_dir: Path, with_weights: bool) -> Encoder:
    """`hf:<folder>`: a local transformers BERT folder (bert/convert.py). Its tokenizer is written once to
    `<cache_dir>/hf-tokenizers/<hash>/tokenizer.json`, the form our datamodules load."""
    import hashlib

    from bert.convert import load_hf_folder, save_tokenizer_json

    folder = load_hf_folder(ref, with_weights=with_weights)
    tokenizer_json = folder.tokenizer.to_str()
    key = hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()[:16]
    tokenizer_dir = Path(cache_dir) / "hf-tokenizers" / key
    if not (tokenizer_dir / "tokenizer.json").is_file():
        save_tokenizer_json(folder.tokenizer, tokenizer_dir)
    return Encoder(
        folder.config.to_dict(),
        tokenizer_dir,
        folder.state_dict if with_weights else None,
        folder.folder,
        None,
    )


def resolve_encoder(cfg: DictConfig) -> Encoder:
    """`pretrained`: a checkpoint, a run id, `newest` (newest finished pretraining run), `hf:<folder>` (a local
    transformers BERT folder) or null (scratch, copying shape and tokenizer from `scratch_like`, which takes the
    same forms, else the `model` preset + `tokenizer_dir`)."""
    from bert.convert import is_hf_ref

    uri = tracking_uri(cfg)
    if is_hf_ref(cfg.get("pretrained")) or (cfg.get("pretrained") is None and is_hf_ref(cfg.get("scratch_like"))):
        ref = cfg.pretrained if cfg.get("pretrained") is not None else cfg.scratch_like
        return load_hf_encoder(str(ref), Path(cfg.paths.cache_dir), with_weights=cfg.get("pretrained") is not None)
    how_to = "pretrain one first with `python run.py` (see README), or pass pretrained=<ckpt|run id>"

    def newest() -> str:
        run_id = tracking.newest_finished_run(uri, "pretrain")
        if run_id is None:
            raise FileNotFoundError(f"no finished pretraining run with a checkpoint in {uri}: {how_to}")
        return run_id

    if cfg.get("pretrained") is not None:
        ref = newest() if cfg.pretrained == "newest" else str(cfg.pretrained)
        return load_encoder(ref, uri, with_weights=True)
    like = cfg.get("scratch_like")
    if like is not None:
        return load_encoder(newest() if like == "newest" else str(like), uri, with_weights=False)
    if not cfg.get("tokenizer_dir"):
        raise ValueError("pretrained=null scratch_like=null needs tokenizer_dir=<folder with tokenizer.json>")
    from bert.tokenizer import load_tokenizer

    tokenizer_dir = Path(cfg.tokenizer_dir)
    model_config = {
        **OmegaConf.to_container(cfg.model, resolve=True),
        "vocab_size": load_tokenizer(tokenizer_dir).get_vocab_size(),
        "pad_token_id": 0,
    }
    return Encoder(model_config, tokenizer_dir, None, None, None)


DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob")


def continued_pretraining(cfg: DictConfig) -> Encoder | None:
    """`pretrained=<ckpt|run id>` for run.py: start from a pretraining checkpoint's weights (encoder and
    heads), shape and tokenizer, with a fresh optimizer, schedule and MLflow run (task-adaptive pretraining).
    `ckpt_path` is different: it resumes the same run, optimizer included."""
    ref = cfg.get("pretrained")
    if ref in (None, ""):
        return None
    encoder = load_encoder(str(ref), tracking_uri(cfg), with_weights=True)
    assert encoder.state_dict is not None
    if not any(key.startswith("cls.") for key in encoder.state_dict):
        raise ValueError(
            f"pretrained={ref}: {encoder.checkpoint} has no pretraining heads; continued pretraining starts "
            "from a pretraining checkpoint (run.py), not a fine-tuned one"
        )
    wanted = cfg.data.get("tokenizer_path")
    if wanted and Path(wanted).resolve() != Path(encoder.tokenizer_dir).resolve():
        raise ValueError(
            f"data.tokenizer_path={wanted} differs from the tokenizer of pretrained={ref} "
            f"({encoder.tokenizer_dir}); its embeddings only fit its own vocabulary"
        )
    return encoder


def continued_model_config(cfg: DictConfig, encoder: Encoder) -> dict[str, Any]:
    """The checkpoint's shape and vocabulary, with this run's dropout (`model.*_dropout_prob`)."""
    config = dict(encoder.model_config)
    for key in DROPOUT_KEYS:
        if key in cfg.model:
            config[key] = float(cfg.model[key])
    return config


def test_on_one_device(
    cfg: DictConfig, trainer: pl.Trainer, module: pl.LightningModule, datamodule: Any, logger: Any
) -> None:
    """Test metrics on one device: DistributedSampler pads the set by repeating samples."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    ckpt = best if best and Path(best).is_file() else None
    if trainer.world_size == 1:
        trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, **checkpoints.lightning_load())
        return
    # A new Trainer on rank 0 opens a process group in prepare_data (Lightning's _InfiniteBarrier) that the
    # other ranks never join: it hung forever. Every rank leaves the DDP process group first.
    trainer.strategy.barrier("test_on_one_device")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if not trainer.is_global_zero:
        return
    single = pl.Trainer(accelerator=trainer.accelerator.__class__.__name__.replace("Accelerator", "").lower(),
                        devices=1, logger=logger or False, enable_checkpointing=False)  # fmt: skip
    single.test(module, datamodule=datamodule, ckpt_path=ckpt, **checkpoints.lightning_load())
