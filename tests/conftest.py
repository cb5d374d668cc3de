"""Shared test setup: the project root and the data mirror, as CI sets them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ["BERT_PROJECT_ROOT"] = str(ROOT)
os.environ.setdefault("BERT_DATA_MIRROR", str((ROOT / ".." / "shared" / "data").resolve()))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

MIRROR = Path(os.environ["BERT_DATA_MIRROR"])
if not MIRROR.is_absolute():
    MIRROR = (ROOT / MIRROR).resolve()


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not MIRROR.is_dir():
        pytest.skip(f"data mirror {MIRROR} not found (set BERT_DATA_MIRROR)")
    return MIRROR
