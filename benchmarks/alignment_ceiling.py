"""Alignment ceiling of KLUE-NER gold tags through plain vs morpheme-aware WordPiece vocabularies.

Trains both vocabularies on the petitions of the data mirror, round-trips the gold tags of the KLUE-NER test
split (sentence index i % 10 == 0) character -> piece -> character, drops spaces as KLUE scores, and prints
strict-IOB2 entity F1 (the best a wordpiece tagger can reach with that vocabulary) with training times.

    python benchmarks/alignment_ceiling.py [--mirror ../shared/data] [--vocab-size 16000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bert.ner_align import alignment_ceiling  # noqa: E402
from bert.tokenizer import train_tokenizer, unk_rate  # noqa: E402
from datamodules.klue_ner import read_klue_ner, split_by_index  # noqa: E402


def petition_texts(paths: list[Path]):
    for path in paths:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                yield record["title"]
                yield record["content"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_mirror = os.environ.get("BERT_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--mirror", type=Path, default=Path(default_mirror))
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument(
        "--max-seq-len", type=int, default=None, help="truncate like a model would (default: no)"
    )
    args = parser.parse_args()
    mirror = args.mirror.resolve()

    petitions = sorted((mirror / "petitions").glob("petitions_*"))
    corpus_mb = sum(path.stat().st_size for path in petitions) / 1e6
    test = split_by_index(read_klue_ner(mirror / "klue" / "klue-ner-v1.1_dev.tsv"))["test"]
    test_texts = [sentence.text for sentence in test]
    print(
        f"corpus: {len(petitions)} petitions files, {corpus_mb:.1f} MB; KLUE-NER test: {len(test)} sentences"
    )

    rows = []
    for name, morpheme_aware in (("plain", False), ("morpheme-aware (kiwi)", True)):
        started = time.perf_counter()
        tokenizer = train_tokenizer(
            petition_texts(petitions),
            vocab_size=args.vocab_size,
            morpheme_aware=morpheme_aware,
            show_progress=False,
        )
        seconds = time.perf_counter() - started
        ceiling = alignment_ceiling(test, tokenizer, max_seq_len=args.max_seq_len)
        unk, _ = unk_rate(tokenizer, test_texts)
        rows.append((name, seconds, ceiling, unk))

    print(f"\nvocab {args.vocab_size}, KLUE-NER test split, spaces dropped, strict IOB2")
    print(
        "| vocabulary | train s | entity F1 micro | entity F1 macro | chars/piece | exact sentences | [UNK] |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, seconds, ceiling, unk in rows:
        print(
            f"| {name} | {seconds:.1f} | {ceiling['entity_f1_micro']:.4f} | "
            f"{ceiling['entity_f1_macro']:.4f} | {ceiling['chars_per_piece']:.2f} | "
            f"{ceiling['sentences_exact']:.3f} | {unk:.4%} |"
        )
    for name, _, ceiling, _ in rows:
        per_type = ", ".join(f"{kind} {score:.3f}" for kind, score in ceiling["per_type"].items())
        print(f"{name}: per type {per_type}; truncated {ceiling['truncated']}")


if __name__ == "__main__":
    main()
