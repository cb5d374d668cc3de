"""The one checkpoint reader of the project: find a checkpoint, load it safely, say what it is.

Every load goes through `bert.checkpoint.load_checkpoint` (``torch.load(weights_only=True)``: a shared file
never runs code); Lightning's own loads (`Trainer.fit/test(ckpt_path=...)`) get `lightning_load()`, after the
file was read here first, so a refused file fails with our message before Lightning sees it.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch

from bert.checkpoint import TRUST_ENV, UnsafeCheckpointError, checkpoint_kind, load_checkpoint, trusted

__all__ = [
    "TRUST_ENV",
    "UnsafeCheckpointError",
    "checkpoint_kind",
    "describe",
    "encoder_state",
    "load",
    "lightning_load",
    "meta",
    "module_from",
    "resolve",
]

# what each kind of checkpoint is for: the commands that take it
COMMANDS = {
    "pretrain": "`python run_finetune.py task=<task> pretrained=<it>`, `python -m bert.export <it> <out-dir>`, "
    "or `python run.py ckpt_path=<it>` to continue pretraining",
    "ner": "`python -m tasks.tag <it> \"문장\"` to tag text, or `python run_finetune.py task=ner ckpt_path=<it>` "
    "to continue its fine-tuning",
}


def lightning_load() -> dict[str, Any]:
    """Keyword arguments for `Trainer.fit/test(ckpt_path=...)`: Lightning loads with weights_only=True too."""
    return {"weights_only": not trusted()}


def resolve(ref: str | os.PathLike, tracking_uri: str | None = None) -> Path:
    """A checkpoint path, or an MLflow run id (its best, else last, checkpoint)."""
    from tasks.tracking import resolve_checkpoint

    return Path(resolve_checkpoint(ref, tracking_uri))


def load(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict; refuses (UnsafeCheckpointError) a file that would run code when unpickled."""
    return load_checkpoint(path)


def describe(kind: str) -> str:
    """A sentence naming what a checkpoint of `kind` is and the commands that take it."""
    if kind == "pretrain":
        what = "a pretraining checkpoint"
    elif kind == "unknown":
        return "not a checkpoint of this project (no model_config / task in its hyper_parameters)"
    else:
        what = f"a fine-tuned {kind} checkpoint"
    commands = COMMANDS.get(kind, f"`python run_finetune.py task={kind} ckpt_path=<it>` to continue it")
    return f"{what}; use {commands}"


def meta(path: str | os.PathLike) -> dict[str, Any]:
    """What a run needs to know about a checkpoint before training: kind, hyperparameters, run id, step."""
    ckpt = load(path)
    return {
        "kind": checkpoint_kind(ckpt),
        "hyper_parameters": dict(ckpt.get("hyper_parameters") or {}),
        "mlflow_run_id": ckpt.get("mlflow_run_id"),
        "global_step": ckpt.get("global_step"),
    }


def encoder_state(ckpt: dict[str, Any], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The encoder weights as a `bert.`-prefixed state dict, from a pretraining checkpoint (`model.bert.*` and
    its heads `model.cls.*`) or from a fine-tuned one (its `model.bert.*`; the task head is left out)."""
    state = ckpt.get("state_dict") or {}
    if checkpoint_kind(ckpt) == "pretrain":
        out = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    else:
        out = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.bert.")}
    if not any(k.startswith("bert.") for k in out):
        raise ValueError(f"{path}: no encoder weights (no state_dict key starts with 'model.bert.')")
    return out


def module_from(path: str | os.PathLike, cls: type, kind: str) -> Any:
    """Rebuild a LightningModule of `cls` from a checkpoint of `kind` (its hyperparameters + weights), without
    Lightning's `load_from_checkpoint` (which would unpickle on its own terms)."""
    ckpt = load(path)
    found = checkpoint_kind(ckpt)
    if found != kind:
        raise ValueError(f"{path} is {describe(found)} — this command takes a fine-tuned {kind} checkpoint")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    accepted = inspect.signature(cls.__init__).parameters
    module = cls(**{k: v for k, v in hparams.items() if k in accepted})
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()
