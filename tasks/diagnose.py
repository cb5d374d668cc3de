"""Why can a pretrained checkpoint fine-tune worse than random init? Look at what its encoder hands a head.

    python -m tasks.diagnose <ckpt | run id> [<ckpt | run id> ...] [--sentences 400] [--no-scratch]

For each encoder, and for a random init of the first one's shape (`scratch`), on KLUE-NER validation sentences
(the encoders' own tokenizers), with dropout off:

- `cos`: mean cosine between final-layer vectors of random token pairs from different sentences. Near 1 means
  every token points the same way (anisotropy; Ethayarajh 2019): the head has little to tell tokens apart.
- `self-sim`: mean cosine between vectors of the same token id in different sentences, minus `cos` (Ethayarajh's
  anisotropy-adjusted self-similarity). High = a token's vector hardly depends on its context.
- `eff. rank`: exp(entropy of the normalised singular values) of the centred token vectors (Roy & Vetterli
  2007), out of the hidden size: how many directions the representations really use.
- `cls cos`: mean cosine between the [CLS] vectors of different sentences (what sentence heads pool).
- `lr at save`: the learning rate in the checkpoint over the schedule's peak. A run cut by its time limit while
  the lr is still high ends on a noisy, unannealed point.

It reads checkpoints (never runs code from them) and the KLUE-NER file the `ner` task uses; it trains nothing.

    python -m tasks.diagnose --crf <fine-tuned NER ckpt | run id> [...]

looks at the other end, the CRF of fine-tuned NER checkpoints: the mean transition score into I-X from the tags
that make the pair ill-formed IOB2 (O, or B-/I- of another type) and from the ones that make it well-formed, the
start score of I-X, and the largest |score|. pytorch-crf starts them uniform in +-0.1; how far fine-tuning moved
them says whether the CRF learned IOB2's grammar or left it to the emissions (`optim.head_lr_scale`).

    python -m tasks.diagnose --decode <fine-tuned NER ckpt | run id> [...]

scores the same checkpoints on the val and test splits twice: with free Viterbi (every tag path) and with
Viterbi over IOB2-valid paths only (`task.module.constrained_decoding`, the default since NER data_version 2),
so the effect of the constraint is measured on identical weights.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("BERT_PROJECT_ROOT", str(ROOT))


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the singular value distribution of the centred rows of x (Roy & Vetterli 2007)."""
    s = torch.linalg.svdvals(x - x.mean(0, keepdim=True))
    p = s / s.sum().clamp_min(1e-12)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def mean_offdiagonal_cosine(unit: torch.Tensor) -> float:
    """Mean cosine between distinct rows of `unit` (unit-norm rows)."""
    n = len(unit)
    return float(((unit @ unit.T).sum() - n) / max(n * (n - 1), 1))


def geometry(hidden: list[torch.Tensor], ids: list[torch.Tensor], seed: int = 0, pairs: int = 20000) -> dict[str, float]:
    """The numbers in the module docstring from per-sentence final-layer vectors `hidden[i]` (T_i, C) of the
    token ids `ids[i]` (T_i,), [CLS] at position 0 and [SEP] last."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.cat([h[1:-1] for h in hidden])
    token_ids = torch.cat([t[1:-1] for t in ids])
    sentence = torch.cat([torch.full((len(h) - 2,), i) for i, h in enumerate(hidden)])
    unit = torch.nn.functional.normalize(tokens, dim=-1)
    a, b = torch.randint(len(unit), (2, pairs), generator=gen)
    keep = sentence[a] != sentence[b]
    cos = float((unit[a[keep]] * unit[b[keep]]).sum(-1).mean())
    same = []
    for token in torch.unique(token_ids):
        where = (token_ids == token).nonzero().flatten()
        if len(torch.unique(sentence[where])) < 2:
            continue
        same.append(mean_offdiagonal_cosine(unit[where[:50]]))
    cls_cos = mean_offdiagonal_cosine(torch.nn.functional.normalize(torch.stack([h[0] for h in hidden]), dim=-1))
    return {
        "cos": cos,
        "self_sim": (sum(same) / len(same) - cos) if same else math.nan,
        "eff_rank": effective_rank(tokens),
        "cls_cos": cls_cos,
    }


def lr_at_save(ckpt: dict[str, Any]) -> float | None:
    """The learning rate the checkpoint's schedule was at, over its peak (1.0 = not decayed at all)."""
    schedulers = ckpt.get("lr_schedulers") or []
    if not schedulers:
        return None
    state = schedulers[0]
    last, base = state.get("_last_lr"), state.get("base_lrs")
    if not last or not base or not base[0]:
        return None
    return float(last[0]) / float(base[0])


@torch.no_grad()
def encode(bert: torch.nn.Module, items: Sequence[dict[str, Any]]) -> list[torch.Tensor]:
    bert.eval()
    out = []
    for item in items:
        hidden, _ = bert(item["input_ids"][None], item["token_type_ids"][None], item["attention_mask"][None])
        out.append(hidden[0])
    return out


def ner_config() -> Any:
    """The composed `finetune task=ner` config: the NER data and the MLflow store both commands read."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("finetune", overrides=["task=ner"])


Encoder = tuple[str, Path | None, "dict[str, Any] | None", "dict[str, Any]"]  # name, path, checkpoint, hparams


def load_encoders(refs: Sequence[str], tracking_uri: str | None, scratch: bool = True) -> list[Encoder]:
    """Each checkpoint (file or run id) read safely, named `run/file`; with `scratch`, a random-init row of the
    first one's shape (and tokenizer) first."""
    from tasks import checkpoints

    loaded: list[Encoder] = []
    for ref in refs:
        path = checkpoints.resolve(ref, tracking_uri)
        ckpt = checkpoints.load(path)
        run = str(ckpt.get("mlflow_run_id") or "")[:8]
        loaded.append((f"{run}/{path.name}" if run else str(ref), path, ckpt, dict(ckpt.get("hyper_parameters") or {})))
    if scratch and loaded:
        loaded.insert(0, ("scratch", None, None, loaded[0][3]))
    return loaded


def frozen_encoder(path: Path | None, ckpt: dict[str, Any] | None, hparams: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """The checkpoint's encoder (random init at `seed` when `ckpt` is None), dropout off: features, not training."""
    from bert.model import BertConfig, BertModel, load_state_dict_checked
    from tasks import checkpoints

    config = dict(hparams["model_config"])
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    bert = BertModel(BertConfig(**config))
    if ckpt is not None:
        load_state_dict_checked(bert, checkpoints.encoder_state(ckpt, path), strict=False)
    return bert


def diagnose(refs: Sequence[str], sentences: int = 400, scratch: bool = True, seed: int = 0) -> list[dict[str, Any]]:
    """One row per encoder (scratch first): the geometry numbers plus step and lr at save."""
    from hydra.utils import instantiate

    cfg = ner_config()
    rows, data_by_tokenizer = [], {}
    for name, path, ckpt, hparams in load_encoders(refs, cfg.logger.tracking_uri, scratch):
        bert = frozen_encoder(path, ckpt, hparams, seed)
        config = hparams["model_config"]
        tokenizer_dir = str(hparams["tokenizer_dir"])
        if tokenizer_dir not in data_by_tokenizer:
            dm = instantiate(cfg.task.data, tokenizer_dir=tokenizer_dir)
            dm.prepare_data()
            dm.setup("validate")
            val = dm.datasets["val"]
            data_by_tokenizer[tokenizer_dir] = [val[i] for i in range(min(sentences, len(val)))]
        items = data_by_tokenizer[tokenizer_dir]
        numbers = geometry(encode(bert, items), [it["input_ids"] for it in items], seed)
        rows.append({"encoder": name, "step": None if ckpt is None else ckpt.get("global_step"),
                     "lr_at_save": None if ckpt is None else lr_at_save(ckpt), **numbers,
                     "hidden": config["hidden_size"]})  # fmt: skip
    return rows


def crf_transitions(ckpt: dict[str, Any]) -> dict[str, float]:
    """Transition statistics of a fine-tuned CRF tagger checkpoint (see the module docstring)."""
    hparams = dict(ckpt.get("hyper_parameters") or {})
    labels, state = list(hparams.get("labels") or []), ckpt.get("state_dict") or {}
    if "model.crf.transitions" not in state or not labels:
        raise ValueError("not a fine-tuned NER (CRF) checkpoint: no model.crf.transitions or no labels in it")
    trans, start = state["model.crf.transitions"].float(), state["model.crf.start_transitions"].float()
    ill, well, into_inside = [], [], [j for j, b in enumerate(labels) if b.startswith("I-")]
    for i, a in enumerate(labels):
        for j in into_inside:
            (well if a[:2] in ("B-", "I-") and a[2:] == labels[j][2:] else ill).append(float(trans[i, j]))
    return {"ill_formed_to_i": sum(ill) / len(ill), "well_formed_to_i": sum(well) / len(well),
            "start_to_i": float(start[into_inside].mean()), "max_abs": float(trans.abs().max()),
            "head_lr_scale": (hparams.get("optim") or {}).get("head_lr_scale"),
            "lr": (hparams.get("optim") or {}).get("lr")}  # fmt: skip


def crf_table(refs: Sequence[str]) -> str:
    from tasks import checkpoints

    uri = ner_config().logger.tracking_uri
    lines = ["| checkpoint | lr | head_lr_scale | ill-formed -> I-X | well-formed -> I-X | start -> I-X | max abs |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for ref in refs:
        path = checkpoints.resolve(ref, uri)
        ckpt = checkpoints.load(path)
        r = crf_transitions(ckpt)
        run = str(ckpt.get("mlflow_run_id") or "")[:8]
        lines.append(f"| {run + '/' if run else ''}{path.name} | {r['lr']} | {r['head_lr_scale'] or 1} | "
                     f"{r['ill_formed_to_i']:+.2f} | {r['well_formed_to_i']:+.2f} | {r['start_to_i']:+.2f} | "
                     f"{r['max_abs']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def decode_scores(refs: Sequence[str]) -> list[dict[str, Any]]:
    """Entity F1 (macro, micro) on val and test of each fine-tuned NER checkpoint, free and IOB2-constrained."""
    from hydra.utils import instantiate

    from bert.heads import tagger_allowed
    from bert.metrics import entity_counts, f1_from_counts
    from tasks import checkpoints
    from tasks.ner import NerModule

    cfg = ner_config()
    rows, data_by_tokenizer = [], {}
    for ref in refs:
        path = checkpoints.resolve(ref, cfg.logger.tracking_uri)
        module = checkpoints.module_from(path, NerModule, "ner")
        pos = bool(module.hparams.get("pos_features", False))
        data_key = (str(module.hparams.tokenizer_dir), int(module.hparams.max_seq_len), pos)  # encoded as it was trained
        if data_key not in data_by_tokenizer:
            dm = instantiate(cfg.task.data, tokenizer_dir=data_key[0], max_seq_len=data_key[1], pos_features=pos)
            dm.prepare_data()
            dm.setup("fit")
            dm.setup("test")
            data_by_tokenizer[data_key] = {"val": dm.val_dataloader(), "test": dm.test_dataloader()}
        run = str(checkpoints.meta(path).get("mlflow_run_id") or "")[:8]
        row: dict[str, Any] = {"checkpoint": f"{run + '/' if run else ''}{path.name}"}
        for constrained in (False, True):
            module.model.constrain(*(tagger_allowed(module.labels) if constrained else (None, None)))
            for stage, loader in data_by_tokenizer[data_key].items():
                gold, pred = [], []
                with torch.no_grad():
                    for batch in loader:
                        batch_gold, batch_pred = module.scored_tags(batch)
                        gold += batch_gold
                        pred += batch_pred
                scores = f1_from_counts(entity_counts(gold, pred))
                row[f"{stage}_{'iob2' if constrained else 'free'}"] = (scores["macro"], scores["micro"])
        rows.append(row)
    return rows


def decode_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| checkpoint | val free | val IOB2 | test free | test IOB2 |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        cells = [f"{r[k][0]:.4f} / {r[k][1]:.4f}" for k in ("val_free", "val_iob2", "test_free", "test_iob2")]
        lines.append(f"| {r['checkpoint']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n(entity F1 macro / micro)"


def table(rows: Sequence[dict[str, Any]]) -> str:
    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    lines = ["| encoder | step | lr at save / peak | cos | self-sim | eff. rank | cls cos |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['encoder']} | {fmt(r['step'], ',')} | {fmt(r['lr_at_save'], '.2f')} | {fmt(r['cos'], '.3f')} | "
                     f"{fmt(r['self_sim'], '.3f')} | {fmt(r['eff_rank'], '.1f')} / {r['hidden']} | "
                     f"{fmt(r['cls_cos'], '.3f')} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.diagnose", description=__doc__.split("\n")[0])
    parser.add_argument("encoders", nargs="+", help="checkpoint files or MLflow run ids (their best, else last, checkpoint)")
    parser.add_argument("--sentences", type=int, default=400, help="KLUE-NER validation sentences to encode")
    parser.add_argument("--no-scratch", action="store_true", help="leave out the random-init row")
    parser.add_argument("--crf", action="store_true", help="fine-tuned NER checkpoints: their CRF transitions")
    parser.add_argument("--decode", action="store_true", help="fine-tuned NER checkpoints: F1, free vs IOB2 Viterbi")
    args = parser.parse_args(argv)
    if args.decode:
        print(decode_table(decode_scores(args.encoders)))
        return
    if args.crf:
        print(crf_table(args.encoders))
        return
    print(table(diagnose(args.encoders, args.sentences, not args.no_scratch)))


if __name__ == "__main__":
    main(sys.argv[1:])
