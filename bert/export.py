"""Export a checkpoint as a transformers folder (config.json, model.safetensors, tokenizer files).

    python -m bert.export <checkpoint.ckpt | mlflow-run-id> <out-dir>

A pretraining checkpoint loads with ``transformers.BertForPreTraining.from_pretrained``; a fine-tuned
sentence-task checkpoint (NLI, STS, topic) with ``AutoModelForSequenceClassification.from_pretrained``, with
``id2label`` / ``label2id`` and ``problem_type`` (``regression`` for STS) in config.json. The tokenizer loads
with ``AutoTokenizer.from_pretrained``. Nothing from this repository is needed to use the folder. (NER's CRF
has no transformers counterpart and is not exported.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from bert.checkpoint import checkpoint_kind, load_checkpoint
from bert.heads import BertForSequenceClassification
from bert.model import BertConfig, BertForPreTraining, check_vocab, load_state_dict_checked

# what transformers' save_pretrained leaves out: tied copies it re-creates at load time
TIED_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
REQUIRED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
OPTIONAL_TOKENIZER_FILES = ("special_tokens_map.json", "vocab.txt")
# LightningModule attribute holding the BertForPreTraining: its state dict keys start with this
CKPT_PREFIX = "model."


def sequence_classification_config(model: BertForSequenceClassification, labels: list[str]) -> dict:
    """config.json entries of transformers' BertForSequenceClassification: labels, loss, architecture."""
    names = list(labels) if labels else ["score"]  # regression: one output, named for what it is
    if len(names) != model.num_labels:
        raise ValueError(f"{len(names)} labels for a head with {model.num_labels} outputs")
    if model.pooling != "cls":
        raise ValueError(
            f"a {model.pooling}-pooled head has no transformers equivalent (its BertForSequenceClassification "
            "reads the pooled [CLS]); export the pretraining checkpoint instead and mean-pool its outputs"
        )
    return {
        "architectures": ["BertForSequenceClassification"],
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
        "problem_type": model.problem_type,
        "classifier_dropout": model.dropout.p,
    }


def export_transformers(
    model: BertForPreTraining | BertForSequenceClassification | Mapping[str, torch.Tensor],
    config: BertConfig,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    labels: list[str] | None = None,
) -> Path:
    """Write ``out_dir`` atomically: everything goes to a temp folder beside it, renamed at the end.
    A `BertForSequenceClassification` needs its `labels` (empty list = regression)."""
    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    missing = [n for n in REQUIRED_TOKENIZER_FILES if not (tokenizer_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} lacks {missing}")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    _check_tokenizer_vocab(config, tokenizer_dir / "tokenizer.json")

    if not isinstance(model, (BertForPreTraining, BertForSequenceClassification)):
        # a pretraining state dict: validate keys and shapes by loading it
        state_dict, model = model, BertForPreTraining(config)
        load_state_dict_checked(model, state_dict, strict=True)
    config_json = config.to_transformers_dict()
    if isinstance(model, BertForSequenceClassification):
        if labels is None:
            raise ValueError("a sequence classification export needs its labels (empty list = regression)")
        config_json.update(sequence_classification_config(model, labels))
    # safetensors refuses tensors that share storage: drop the tied copies, own every remaining tensor
    tensors = {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in model.state_dict().items()
        if k not in TIED_KEYS
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the export is meant to be shared
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2, ensure_ascii=False) + "\n")
        for name in REQUIRED_TOKENIZER_FILES + OPTIONAL_TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, tmp / name)
        if (
            out_dir.exists()
        ):  # overwrite: move the old folder aside first, a rename cannot replace a non-empty dir
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def _check_tokenizer_vocab(config: BertConfig, tokenizer_json: Path) -> None:
    from tokenizers import Tokenizer

    check_vocab(config, Tokenizer.from_file(str(tokenizer_json)).get_vocab_size(with_added_tokens=True))


def load_pretraining_checkpoint(path: str | Path) -> tuple[BertForPreTraining, BertConfig, Path | None]:
    """Read a Lightning .ckpt of the pretraining module: ``state_dict`` under 'model.', and
    ``hyper_parameters`` holding ``model_config`` (BertConfig fields) and ``tokenizer_dir`` (may be None).

    Loaded with ``weights_only=True`` (bert.checkpoint): a file that would run code is refused, never run."""
    ckpt = load_checkpoint(path)
    kind = checkpoint_kind(ckpt)
    if kind != "pretrain":
        hint = (
            "transformers has no CRF head to export it to; to tag text with it use `python -m tasks.tag <it>`"
            if kind == "ner"
            else f"continue it with `python run_finetune.py task={kind} ckpt_path=<it>`"
        )
        what = "not a checkpoint of this project" if kind == "unknown" else f"a fine-tuned {kind} checkpoint"
        raise ValueError(
            f"{path} is {what}: export takes a pretraining checkpoint (`python run.py`) or a fine-tuned "
            f"sentence-task one (nli, sts, topic); {hint}"
            + ("" if kind == "unknown" else ", or export the pretraining run it started from")
        )
    hparams = ckpt.get("hyper_parameters") or {}
    if "model_config" not in hparams:
        raise ValueError(f"{path}: hyper_parameters lack 'model_config' (found {sorted(hparams)})")
    config = BertConfig.from_dict(dict(hparams["model_config"]))
    state_dict = {
        k[len(CKPT_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(CKPT_PREFIX)
    }
    if not state_dict:
        raise ValueError(f"{path}: no state_dict keys start with {CKPT_PREFIX!r}")
    model = BertForPreTraining(config)
    load_state_dict_checked(model, state_dict, strict=True)
    tokenizer_dir = hparams.get("tokenizer_dir")
    return model.eval(), config, None if tokenizer_dir is None else Path(tokenizer_dir)


def load_sequence_classification_checkpoint(
    path: str | Path,
) -> tuple[BertForSequenceClassification, BertConfig, Path | None, list[str]]:
    """Read a fine-tuned sentence-task .ckpt (tasks.base.FinetuneModule): its `self.model` under 'model.',
    hparams `model_config`, `labels` (empty = regression), `tokenizer_dir`."""
    ckpt = load_checkpoint(path)
    hparams = ckpt.get("hyper_parameters") or {}
    if "model_config" not in hparams or "labels" not in hparams:
        raise ValueError(f"{path}: not a fine-tuned sentence-task checkpoint (hparams {sorted(hparams)})")
    config = BertConfig.from_dict(dict(hparams["model_config"]))
    labels = [str(label) for label in hparams["labels"]]
    model = BertForSequenceClassification(config, len(labels) or 1, hparams.get("classifier_dropout"),
                                          pooling=str(hparams.get("pooling", "cls")))  # fmt: skip
    state_dict = {k[len(CKPT_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(CKPT_PREFIX)}
    model.load_state_dict(state_dict, strict=True)
    tokenizer_dir = hparams.get("tokenizer_dir")
    return model.eval(), config, None if tokenizer_dir is None else Path(tokenizer_dir), labels


def _resolve(arg: str) -> Path:
    if Path(arg).exists():
        return Path(arg)
    try:
        from tasks.tracking import resolve_checkpoint
    except ImportError as e:
        raise SystemExit(
            f"{arg!r} is not an existing file, and resolving it as an MLflow run id needs "
            f"tasks.tracking.resolve_checkpoint, which could not be imported: {e}"
        ) from e
    return Path(resolve_checkpoint(arg))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bert.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="Lightning .ckpt (pretraining or sentence task), or its MLflow run id")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--tokenizer-dir", type=Path, help="override the tokenizer folder stored in the checkpoint"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    args = parser.parse_args(argv)

    path = _resolve(args.checkpoint)
    labels = None
    try:
        kind = checkpoint_kind(load_checkpoint(path))
        if kind in ("pretrain", "ner", "unknown"):  # the latter two: refused with what they are and what to do
            model, config, tokenizer_dir = load_pretraining_checkpoint(path)
        else:
            model, config, tokenizer_dir, labels = load_sequence_classification_checkpoint(path)
        tokenizer_dir = args.tokenizer_dir or tokenizer_dir
        if tokenizer_dir is None:
            parser.error("the checkpoint records no tokenizer_dir: pass --tokenizer-dir")
        out = export_transformers(model, config, tokenizer_dir, args.out_dir, args.overwrite, labels)
    except ValueError as err:  # a checkpoint of the wrong kind, one that would run code, or a head transformers
        raise SystemExit(f"error: {err}") from None  # lacks: say so, no traceback
    what = type(model).__name__ + (f" ({kind}: {len(labels) or 'regression'} labels)" if labels is not None else "")
    print(f"exported {what} {config.num_hidden_layers}L/{config.hidden_size}H vocab {config.vocab_size} to {out}")


if __name__ == "__main__":
    main()
