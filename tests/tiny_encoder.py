"""Helpers for fine-tuning tests: a tiny tokenizer trained on the mirrored KLUE/petition text and a tiny
pretraining checkpoint written the way the pretraining module saves one (no pretraining run needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bert.model import BertConfig, BertForPreTraining
from bert.tokenizer import save_tokenizer, train_tokenizer

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def sample_texts(mirror: Path, n: int = 400) -> list[str]:
    nli = json.loads((mirror / "klue" / "klue-nli-v1.1_dev.json").read_text(encoding="utf-8"))[:n]
    with open(mirror / "petitions" / "petitions_2019-04", encoding="utf-8") as handle:
        petitions = [json.loads(line)["title"] for _, line in zip(range(n), handle)]
    return [r["premise"] for r in nli] + [r["hypothesis"] for r in nli] + petitions


def make_tokenizer(mirror: Path, out: Path, vocab_size: int = 600) -> Path:
    tokenizer = train_tokenizer(sample_texts(mirror), vocab_size=vocab_size, morpheme_aware=False, show_progress=False)
    return save_tokenizer(tokenizer, out)


def make_pretrain_checkpoint(tokenizer_dir: Path, path: Path, seed: int = 0) -> Path:
    """What the pretraining LightningModule saves: `model.`-prefixed BertForPreTraining weights, plain hparams."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    config = BertConfig(vocab_size=vocab, **TINY)
    torch.manual_seed(seed)
    model = BertForPreTraining(config)
    torch.save(
        {
            "epoch": 0,
            "global_step": 3,
            "state_dict": {"model." + k: v for k, v in model.state_dict().items()},
            "hyper_parameters": {"model_config": config.to_dict(), "tokenizer_dir": str(tokenizer_dir),
                                 "optim": {"lr": 1e-3}},  # fmt: skip
            "mlflow_run_id": None,
        },
        path,
    )
    return path


def compose_finetune(workdir: Path, overrides: list[str]):
    """The config `python run_finetune.py <overrides>` would run, with every output under `workdir`."""
    from hydra import compose, initialize_config_dir

    root = Path(__file__).resolve().parents[1]
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose(
            "finetune",
            overrides=[
                *overrides,
                f"paths.mlruns_dir={workdir}/mlruns",
                f"paths.checkpoint_dir={workdir}/checkpoints",
                f"paths.output_dir={workdir}/out",
                "logger.plots=false",
            ],
        )
    return cfg


_EMPTY_STORE: list[Path] = []


def empty_store(workdir: Path) -> None:
    """A fresh SQLite MLflow store in `workdir/mlruns`, copied from one created (migrated) once per session:
    creating one costs ~10 s of alembic migrations on this machine."""
    import shutil
    import tempfile

    from tasks.tracking import ensure_store

    if not _EMPTY_STORE:
        template = Path(tempfile.mkdtemp(prefix="mlflow-template-")) / "mlflow.db"
        ensure_store(f"sqlite:///{template}", None)
        _EMPTY_STORE.append(template)
    (workdir / "mlruns").mkdir(parents=True, exist_ok=True)
    if not (workdir / "mlruns" / "mlflow.db").exists():
        shutil.copy(_EMPTY_STORE[0], workdir / "mlruns" / "mlflow.db")


def run_finetune_inprocess(workdir: Path, overrides: list[str]) -> float | None:
    """run_finetune.train in this process (no interpreter start-up per run: the fast suite stays fast)."""
    import run_finetune
    from tasks import runner

    empty_store(workdir)
    cfg = compose_finetune(workdir, overrides)
    OmegaConf.resolve(cfg)
    try:
        return run_finetune.train(cfg)
    finally:
        os.environ.pop(runner.RUN_ID_ENV, None)
