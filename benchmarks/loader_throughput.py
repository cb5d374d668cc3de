"""Examples/s of the pretraining DataLoader (conf/data/petition.yaml: the 5 mirrored petition months).

    python -m benchmarks.loader_throughput [--epochs 1] [--vocab-size 16000] [--no-morpheme-aware]

The mini model consumes ~4.5k tokens/s ≈ 35 examples/s (seq 128, batch 32) on this 2-core CPU; the loader must
deliver ≥10x that (350 examples/s). The first run prepares the corpus (kiwi sentence split, tokenizer, token
file) into the project's `.cache/`; the timings below exclude it. Each row iterates whole epochs of the train
loader after a warm-up batch (worker start-up is reported separately as "first batch").

Measured on the 2-core dev machine (23.5k train instances, vocab 16k morpheme-aware): 0 workers 16.2k
examples/s, 2 workers 9.8k (12.6k persistent; per-batch IPC costs more than the work itself), whole-word
masking 9.3k, length buckets 17.8k: 27-51x the 350 examples/s needed.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def make_datamodule(args: argparse.Namespace, **overrides):
    from datamodules.pretrain import PretrainDataModule

    cfg = OmegaConf.load(ROOT / "conf" / "data" / "petition.yaml")
    kwargs = {
        key: cfg[key] for key in cfg if key not in ("_target_", "mirror", "data_dir", "cache_dir", "seed")
    }
    kwargs = OmegaConf.to_container(OmegaConf.create(kwargs), resolve=True)
    kwargs.update(
        mirror=os.environ.get("BERT_DATA_MIRROR"),
        data_dir=str(ROOT / "data"),
        cache_dir=args.cache_dir,
        seed=42,
        max_seq_len=128,
        batch_size=32,
        vocab_size=args.vocab_size,
        morpheme_aware=args.morpheme_aware,
    )
    kwargs.update(overrides)
    return PretrainDataModule(**kwargs)


def measure(datamodule, epochs: int) -> dict:
    loader = datamodule.train_dataloader()
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first_batch = time.perf_counter() - start
    del iterator
    examples = tokens = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        datamodule.set_epoch(epoch)
        for batch in loader:
            examples += batch["input_ids"].shape[0]
            tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - start
    return {
        "first_batch_s": first_batch,
        "examples_s": examples / seconds,
        "tokens_s": tokens / seconds,
        "examples": examples,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--no-morpheme-aware", dest="morpheme_aware", action="store_false")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from rich.console import Console
    from rich.table import Table

    datamodule = make_datamodule(args)
    start = time.perf_counter()
    datamodule.prepare_data()
    print(f"prepare_data: {time.perf_counter() - start:.1f} s (cached after the first run)")

    variants = [
        ("0 workers", dict(num_workers=0)),
        ("2 workers", dict(num_workers=2)),
        ("2 workers, persistent", dict(num_workers=2, persistent_workers=True)),
        ("0 workers, whole-word mask", dict(num_workers=0, whole_word_mask=True)),
        ("0 workers, span mask", dict(num_workers=0, span_mask=True)),
        ("0 workers, length buckets", dict(num_workers=0, length_bucketing=True)),
    ]
    table = Table(
        title=f"pretraining DataLoader, petitions (5 months), seq 128, batch 32, vocab {datamodule.vocab_size}"
    )
    for column in ["loader", "instances", "first batch", "examples/s", "tokens/s", "vs 350 ex/s"]:
        table.add_column(column, justify="right")
    for name, overrides in variants:
        dm = make_datamodule(args, **overrides)
        dm.prepare_data()
        dm.setup("fit")
        row = measure(dm, args.epochs)
        table.add_row(
            name,
            f"{len(dm.datasets['train']):,}",
            f"{row['first_batch_s']:.2f} s",
            f"{row['examples_s']:,.0f}",
            f"{row['tokens_s']:,.0f}",
            f"{row['examples_s'] / 350:.0f}x",
        )
    Console(width=140).print(table)


if __name__ == "__main__":
    os.environ.setdefault("BERT_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
    main()
