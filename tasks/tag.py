"""Tag raw Korean text with a fine-tuned NER model: `python -m tasks.tag <ner-ckpt|run-id> "문장" ...`."""

from __future__ import annotations

import argparse
import sys

import torch

from bert.ner import tag_texts
from bert.tokenizer import load_tokenizer
from tasks import checkpoints
from tasks.ner import NerModule
from tasks.runner import tokenizer_dir_of


def load_tagger(ref: str) -> tuple[NerModule, object]:
    path = checkpoints.resolve(ref)
    module = checkpoints.module_from(path, NerModule, "ner")  # loaded safely; says so if it is not NER
    tokenizer = load_tokenizer(tokenizer_dir_of(path, module.hparams))
    return module, tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="fine-tuned NER checkpoint (.ckpt) or its MLflow run id")
    parser.add_argument("text", nargs="*", help="sentences (default: one per line on stdin)")
    args = parser.parse_args(argv)
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    try:
        module, tokenizer = load_tagger(args.model)
    except (ValueError, FileNotFoundError) as err:  # wrong kind, or a file that would run code: no traceback
        raise SystemExit(f"error: {err}") from None
    torch.set_grad_enabled(False)
    for text, entities in zip(texts, tag_texts(module.model, tokenizer, texts, module.labels)):
        print(text)
        for ent in entities:
            print(f"  [{ent.start:>3},{ent.end:>3})  {ent.type}  {ent.text}")


if __name__ == "__main__":
    main()
