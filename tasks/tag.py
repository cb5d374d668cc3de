"""Tag raw Korean text with a fine-tuned NER model: `python -m tasks.tag <ner-ckpt|run-id> "문장" ...`.

Human-readable; `python -m tasks.predict ner` gives the same entities as JSON lines."""

from __future__ import annotations

import argparse
import sys

import torch

from bert.ner import tag_texts
from tasks.predict import load


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="fine-tuned NER checkpoint (.ckpt) or its MLflow run id")
    parser.add_argument("text", nargs="*", help="sentences (default: one per line on stdin)")
    args = parser.parse_args(argv)
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    loaded = load(args.model, "ner")
    torch.set_grad_enabled(False)
    max_seq_len = int(loaded.hparams.get("max_seq_len", 128))
    for text, entities in zip(texts, tag_texts(loaded.model, loaded.tokenizer, texts, list(loaded.hparams["labels"]), max_seq_len)):
        print(text)
        for ent in entities:
            print(f"  [{ent.start:>3},{ent.end:>3})  {ent.type}  {ent.text}")


if __name__ == "__main__":
    main()
