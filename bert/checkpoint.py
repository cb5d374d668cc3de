"""Reading a checkpoint file without running code from it: the one `torch.load` of the project.

A `.ckpt` is a pickle, and unpickling can call any function the file names (`os.system`, ...). Checkpoints are
how researchers share models, so every load uses ``torch.load(weights_only=True)``: tensors, numbers, strings
and containers only. Our own checkpoints hold nothing else (hyperparameters are saved as plain dicts).

A file that names anything more is refused with an error naming the file and the global it wanted. For a
trusted legacy file (one you wrote yourself with an older version) ``BERT_TRUST_CHECKPOINTS=1`` loads it with
a full unpickle — UNSAFE: it runs whatever code the file carries; never set it for a file from someone else.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch

# Harmless to rebuild (a path is a string): older checkpoints stored tokenizer_dir as a Path. Allowed only
# inside our loads (a context manager), never registered process-wide.
SAFE_GLOBALS = [pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]
TRUST_ENV = "BERT_TRUST_CHECKPOINTS"  # "1" = full unpickle; runs any code in the file (unsafe, off by default)


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """The file needs more than tensors and plain Python values to load; it was not unpickled."""


def trusted() -> bool:
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def _offending_global(message: str) -> str:
    """torch names the refused global as `GLOBAL module.name` (or `Unsupported global: ...`)."""
    found = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"global:?\s+([\w.]+)", message, re.I)
    return found.group(1) if found else "an object that is not a tensor or plain value"


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's dict, loaded on CPU with ``weights_only=True`` (unless `BERT_TRUST_CHECKPOINTS=1`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if trusted():
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        name = _offending_global(str(err))
        raise UnsafeCheckpointError(
            f"{path}: refused to load: the file names {name}, which is not a tensor or a plain value, and "
            "unpickling it could run code from the file. Checkpoints written by this project never need "
            f"that. If you wrote this file yourself and trust it, {TRUST_ENV}=1 loads it with a full "
            "unpickle (UNSAFE: runs any code the file carries)."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:  # truncated / not a torch file
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def checkpoint_kind(ckpt: dict[str, Any]) -> str:
    """What a checkpoint is: its `task` hyperparameter ("pretrain", "ner", "nli", ...); older files are told
    apart by their hyperparameters (a label list = NER, a model_config alone = pretraining); else "unknown"."""
    hparams = ckpt.get("hyper_parameters") or {}
    if hparams.get("task"):
        return str(hparams["task"])
    if "labels" in hparams:
        return "ner"
    if "model_config" in hparams:
        return "pretrain"
    return "unknown"
