"""Predict with any trained head, on raw text; JSON lines out (one object per input, in input order).

    python -m tasks.predict fill-mask <pretrain run|ckpt> "서울은 대한민국의 [MASK]이다." [--top-k 5]
    python -m tasks.predict nsp   <pretrain run|ckpt> "문장 A" "문장 B"          # p_is_next (0 = IsNext)
    python -m tasks.predict ner   <run|ckpt> "이순신은 1545년 서울에서 태어났다."
    python -m tasks.predict nli   <run|ckpt> "전제" "가설"                        # pairs: A B [A B ...]
    python -m tasks.predict sts   <run|ckpt> "문장 1" "문장 2"
    python -m tasks.predict topic <run|ckpt> "청원 제목과 내용"
    ... --file inputs.txt   or   ... < inputs.txt

Inputs come from the arguments, else `--file`, else stdin: one input per line, a pair as `A<TAB>B` or a JSON
object (`{"text": ...}`, or the pair under `a`/`b`, `premise`/`hypothesis` or `sentence1`/`sentence2`).
Inputs are batched (`--batch-size`). The checkpoint must be of the subcommand's kind (its `task` hparam;
pretraining checkpoints have none): otherwise a clear error says what it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bert.model import BertConfig

PAIR_KEYS = (("a", "b"), ("premise", "hypothesis"), ("sentence1", "sentence2"), ("text_a", "text_b"))
PAIR_TASKS = {"nsp", "nli", "sts"}
SENTENCE_TASKS = {"nli", "sts", "topic"}


@dataclass
class Loaded:
    kind: str
    model: torch.nn.Module
    hparams: dict[str, Any]
    tokenizer: Any
    path: Path


def load(ref: str, expected: str, tracking_uri: str | None = None) -> Loaded:
    """A checkpoint (path or MLflow run id) -> model in eval mode + tokenizer; fails when it is not `expected`."""
    from bert.tokenizer import load_tokenizer
    from tasks import checkpoints
    from tasks.runner import tokenizer_dir_of

    path = checkpoints.resolve(ref, tracking_uri)
    try:
        ckpt = checkpoints.load(path)  # weights_only: a file that would run code is refused, never run
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    kind = checkpoints.checkpoint_kind(ckpt)
    if kind != expected:
        command = "fill-mask/nsp" if expected == "pretrain" else expected
        wanted = "a pretraining" if expected == "pretrain" else f"a fine-tuned {expected}"
        raise SystemExit(f"error: `predict {command}` takes {wanted} checkpoint, but {path} is {checkpoints.describe(kind)}")
    hparams = dict(ckpt["hyper_parameters"])
    config = BertConfig.from_dict(dict(hparams["model_config"]))
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if kind == "pretrain":
        from bert.model import BertForPreTraining

        model = BertForPreTraining(config)
    elif kind == "ner":
        from bert.heads import BertCrfTagger, tagger_allowed
        from bert.pos import POS_LABELS

        model = BertCrfTagger(config, len(hparams["labels"]), lstm_hidden=int(hparams.get("lstm_hidden", 0)),
                              pos_vocab=len(POS_LABELS) if hparams.get("pos_features") else 0)  # fmt: skip
        if hparams.get("constrained_decoding", True):  # as tasks.ner.NerModule decodes (IOB2-valid paths only)
            model.constrain(*tagger_allowed(hparams["labels"]))
    else:
        from bert.heads import BertForSequenceClassification

        model = BertForSequenceClassification(config, len(hparams["labels"]) or 1,
                                              pooling=str(hparams.get("pooling", "cls")))  # fmt: skip
    model.load_state_dict(state, strict=True)
    tokenizer = load_tokenizer(tokenizer_dir_of(path, hparams))
    return Loaded(kind, model.eval(), hparams, tokenizer, path)


# ---------------------------------------------------------------------------------------------------------
# inputs


def parse_line(line: str, pair: bool, where: str) -> tuple[str, str | None]:
    """One input line -> (text, second text or None)."""
    line = line.rstrip("\r\n")
    if line.lstrip().startswith("{"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SystemExit(f"{where}: not valid JSON ({err})") from err
        if not pair:
            if not isinstance(record.get("text"), str):
                raise SystemExit(f"{where}: a JSON input needs a string field 'text'")
            return record["text"], None
        for a, b in PAIR_KEYS:
            if isinstance(record.get(a), str) and isinstance(record.get(b), str):
                return record[a], record[b]
        raise SystemExit(f"{where}: a JSON pair needs one of the field pairs {PAIR_KEYS}")
    if not pair:
        return line, None
    parts = line.split("\t")
    if len(parts) != 2:
        raise SystemExit(f"{where}: a pair is two texts separated by one tab, found {len(parts)} field(s)")
    return parts[0], parts[1]


def read_inputs(args: argparse.Namespace, pair: bool) -> list[tuple[str, str | None, str]]:
    """(text, second, where) from the arguments, --file or stdin; empty texts are an error naming the input."""
    out: list[tuple[str, str | None, str]] = []
    if args.texts:
        if pair and len(args.texts) % 2:
            raise SystemExit(f"`{args.command}` takes texts in pairs (A B [A B ...]); got {len(args.texts)} texts")
        step = 2 if pair else 1
        for i in range(0, len(args.texts), step):
            out.append((args.texts[i], args.texts[i + 1] if pair else None, f"argument {i + 1}"))
    else:
        name = args.file or "<stdin>"
        handle = open(args.file, encoding="utf-8") if args.file else sys.stdin
        with handle:
            for line_no, line in enumerate(handle, start=1):
                if line.strip():
                    out.append((*parse_line(line, pair, f"{name}:{line_no}"), f"{name}:{line_no}"))
    for a, b, where in out:
        if not a.strip() or (pair and not (b or "").strip()):
            raise SystemExit(f"{where}: empty text")
    if not out:
        raise SystemExit("no input: pass texts as arguments, --file FILE, or lines on stdin")
    return out


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def pad(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    from datamodules.sentence import collate_sentences

    return collate_sentences(list(rows))


# ---------------------------------------------------------------------------------------------------------
# heads


@torch.no_grad()
def predict_sentences(loaded: Loaded, inputs, batch_size: int) -> Iterable[dict[str, Any]]:
    from datamodules.sentence import SentenceEncoder

    labels = list(loaded.hparams["labels"])
    encoder = SentenceEncoder(loaded.tokenizer, int(loaded.hparams.get("max_seq_len", 128)))
    for chunk in batches(inputs, batch_size):
        batch = pad(encoder.encode([(a, b) for a, b, _ in chunk]))
        logits = loaded.model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).float()
        for (a, b, _), row in zip(chunk, logits):
            record: dict[str, Any] = {"text": a} if b is None else {"a": a, "b": b}
            if not labels:
                record["score"] = round(float(row[0]), 6)
            else:
                probs = row.softmax(-1)
                record["label"] = labels[int(probs.argmax())]
                record["probs"] = {label: round(float(p), 6) for label, p in zip(labels, probs)}
            yield record


@torch.no_grad()
def predict_ner(loaded: Loaded, inputs, batch_size: int) -> Iterable[dict[str, Any]]:
    from bert.ner import tag_texts

    texts = [a for a, _, _ in inputs]
    max_seq_len = int(loaded.hparams.get("max_seq_len", 128))
    entities = tag_texts(loaded.model, loaded.tokenizer, texts, list(loaded.hparams["labels"]), max_seq_len, batch_size)
    for text, found in zip(texts, entities):
        yield {"text": text, "entities": [{"text": e.text, "type": e.type, "start": e.start, "end": e.end} for e in found]}


@torch.no_grad()
def predict_nsp(loaded: Loaded, inputs, batch_size: int, max_seq_len: int) -> Iterable[dict[str, Any]]:
    """p_is_next = softmax(NSP logits)[0]: class 0 = B follows A (Google's and transformers' convention)."""
    from datamodules.sentence import SentenceEncoder

    encoder = SentenceEncoder(loaded.tokenizer, max_seq_len)
    for chunk in batches(inputs, batch_size):
        batch = pad(encoder.encode([(a, b) for a, b, _ in chunk]))
        out = loaded.model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                           torch.zeros_like(batch["input_ids"], dtype=torch.bool))  # fmt: skip
        for (a, b, _), p in zip(chunk, out.nsp_logits.float().softmax(-1)[:, 0]):
            yield {"a": a, "b": b, "p_is_next": round(float(p), 6)}


@torch.no_grad()
def predict_fill_mask(loaded: Loaded, inputs, batch_size: int, top_k: int, max_seq_len: int) -> Iterable[dict[str, Any]]:
    from datamodules.sentence import SentenceEncoder

    mask_id = loaded.tokenizer.token_to_id("[MASK]")
    encoder = SentenceEncoder(loaded.tokenizer, max_seq_len)
    for chunk in batches(inputs, batch_size):
        for a, _, where in chunk:
            if "[MASK]" not in a:
                raise SystemExit(f"{where}: fill-mask needs at least one [MASK] in the text")
        batch = pad(encoder.encode([(a, None) for a, _, _ in chunk]))
        masked = batch["input_ids"].eq(mask_id) & batch["attention_mask"].bool()
        out = loaded.model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], masked)
        probs = out.mlm_logits.float().softmax(-1)  # (N masks in the batch, V), row-major over (B, T)
        rows = masked.nonzero()[:, 0].tolist()
        for i, (a, _, where) in enumerate(chunk):
            mine = [r for r, row in enumerate(rows) if row == i]
            if not mine:
                raise SystemExit(f"{where}: every [MASK] was cut off by max_seq_len={max_seq_len}")
            masks = []
            for r in mine:
                top = probs[r].topk(top_k)
                masks.append([{"token": loaded.tokenizer.id_to_token(int(t)), "p": round(float(p), 6)}
                              for p, t in zip(top.values, top.indices)])  # fmt: skip
            yield {"text": a, "masks": masks}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.predict", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, what in (("fill-mask", "top-k tokens for each [MASK] (pretraining run)"),
                       ("nsp", "p_is_next of sentence pairs A B (pretraining run; 0 = IsNext)"),
                       ("ner", "entities with character spans"), ("nli", "entailment / neutral / contradiction of pairs"),
                       ("sts", "similarity score 0-5 of pairs"), ("topic", "petition category")):  # fmt: skip
        p = sub.add_parser(name, help=what)
        p.add_argument("model", help="checkpoint (.ckpt) or MLflow run id")
        p.add_argument("texts", nargs="*", help="inputs (pairs: A B A B ...); default --file or stdin")
        p.add_argument("--file", help="one input per line (pairs: A<TAB>B, or JSON objects)")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--tracking-uri", help="MLflow store to look run ids up in (default: the project's)")
        if name in ("fill-mask", "nsp"):
            p.add_argument("--max-seq-len", type=int, default=128)
        if name == "fill-mask":
            p.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args(argv)

    expected = "pretrain" if args.command in ("fill-mask", "nsp") else args.command
    inputs = read_inputs(args, pair=args.command in PAIR_TASKS)
    loaded = load(args.model, expected, args.tracking_uri)
    if args.command == "fill-mask":
        records = predict_fill_mask(loaded, inputs, args.batch_size, args.top_k, args.max_seq_len)
    elif args.command == "nsp":
        records = predict_nsp(loaded, inputs, args.batch_size, args.max_seq_len)
    elif args.command == "ner":
        records = predict_ner(loaded, inputs, args.batch_size)
    else:
        records = predict_sentences(loaded, inputs, args.batch_size)
    for record in records:
        print(json.dumps(record, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
