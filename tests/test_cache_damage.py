"""A damaged preparation cache (a killed preparation, a truncated file) is rebuilt, never read as data."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tests.conftest import ROOT


def _datamodule(cache_dir: Path, tokenizer: Path | None = None):
    """petition_small; with `tokenizer` the tokenizer is given, not trained (training one twice does not give
    the same vocabulary: the tokenizers library breaks ties in no fixed order)."""
    overrides = ["data=petition_small", f"paths.cache_dir={cache_dir}", "data.num_workers=0"]
    if tokenizer is not None:
        overrides.append(f"data.tokenizer_path={tokenizer}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("pretrain", overrides=overrides)
    return instantiate(cfg.data)


def _batches(cache_dir: Path, n: int = 3, tokenizer: Path | None = None) -> list[torch.Tensor]:
    dm = _datamodule(cache_dir, tokenizer)
    dm.prepare_data()
    dm.setup("fit")
    out = []
    for i, batch in enumerate(dm.train_dataloader()):
        if i == n:
            break
        out.append(torch.cat([batch["input_ids"], batch["nsp_labels"][:, None]], 1))
    return out


@pytest.fixture(scope="module")
def clean(tmp_path_factory, mirror) -> tuple[Path, list[torch.Tensor]]:
    os.environ["BERT_DATA_MIRROR"] = str(mirror)
    cache = tmp_path_factory.mktemp("clean")
    return cache, _batches(cache)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _damaged_copy(cache: Path, tmp_path: Path, pattern: str) -> tuple[Path, list[Path]]:
    """A copy of `cache` with every file matching `pattern` cut in half (the test's own cache stays clean)."""
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    damaged = sorted(copy.glob(pattern))
    assert damaged, pattern
    for path in damaged:
        _truncate(path)
    return copy, damaged


@pytest.mark.parametrize("pattern", ["plans/*.bin", "tokens/*/tokens.bin", "tokens/*/line_offsets.npy"])
def test_truncated_cache_file_is_rebuilt(clean, tmp_path, pattern, caplog):
    cache, reference = clean
    copy, damaged = _damaged_copy(cache, tmp_path, pattern)
    with caplog.at_level(logging.WARNING):
        batches = _batches(copy)
    assert _same(batches, reference)
    assert str(damaged[0]) in caplog.text and "rebuilding" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize(
    "pattern", ["sentences/*/sentences.txt", "sentences/*/documents.npy", "sentences/*/sentences.txt.offsets.npy"]
)
def test_truncated_upstream_file_is_rebuilt(clean, tmp_path, pattern):
    cache, reference = clean
    copy, _ = _damaged_copy(cache, tmp_path, pattern)
    assert _same(_batches(copy, tokenizer=_tokenizer(cache)), reference)


def _tokenizer(cache: Path) -> Path:
    (folder,) = (cache / "tokenizers").glob("*/tokenizer.json")
    return folder.parent


@pytest.mark.slow
def test_truncated_tokenizer_is_retrained(clean, tmp_path, caplog):
    cache, _ = clean
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    cut = _tokenizer(copy) / "tokenizer.json"
    _truncate(cut)
    with caplog.at_level(logging.WARNING):
        dm = _datamodule(copy)
        dm.prepare_data()
    assert str(cut) in caplog.text
    assert dm.vocab_size == _datamodule(cache).vocab_size  # loads again (not byte-equal: see _datamodule)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from datamodules import corpora, download, lines, pretrain
    from tests.test_cache_damage import _datamodule
    calls, when, tokenizer = int(sys.argv[2]), sys.argv[3], sys.argv[4]
    original = download.publish
    def publish(tmp, target):
        global calls
        calls -= 1
        if calls == 0 and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        original(tmp, target)
        if calls == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    for module in (corpora, lines, pretrain):
        module.publish = publish
    _datamodule(sys.argv[1], tokenizer).prepare_data()
    """
)


@pytest.mark.slow
def test_preparation_killed_at_any_point_is_rebuilt(clean, tmp_path):
    """SIGKILL before or after the N-th file is moved into place (sentences, index, tokenizer, tokens, plans)."""
    cache, reference = clean
    tokenizer = _tokenizer(cache)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for calls, when in [(1, "before"), (2, "after"), (4, "before"), (6, "after"), (8, "before"), (10, "after")]:
        killed = tmp_path / f"kill{calls}{when}"
        proc = subprocess.run([sys.executable, "-c", KILLER, str(killed), str(calls), when, str(tokenizer)],
                              cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == -signal.SIGKILL, (calls, when, proc.stderr[-2000:])
        assert _same(_batches(killed, tokenizer=tokenizer), reference), (calls, when)
