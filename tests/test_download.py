"""datamodules/download.py: local copy, mirror (in place, relative to the project root), download, checksums."""

import hashlib
import logging
import os
from pathlib import Path

import pytest

from datamodules import download
from datamodules.download import ChecksumError, DataFileError, fetch

MONTH = "petitions/petitions_2019-04"
MONTH_SHA = "6db47ca63b0f46731ec22a2043aa55bd2928efd620bf9cc8c52726f7962b2fc0"
UNREACHABLE = "http://127.0.0.1:9/petitions_2019-04"  # discard port: connection refused at once


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def upstream(tmp_path: Path) -> tuple[str, bytes]:
    """A file:// "upstream" (urllib handles it like http, so the download path runs without a network)."""
    data = "한국어 청원\n".encode() * 1000
    source = tmp_path / "upstream" / "corpus.txt"
    source.parent.mkdir()
    source.write_bytes(data)
    return source.as_uri(), data


def test_mirror_is_used_in_place_through_the_env_var(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("BERT_DATA_MIRROR", os.path.relpath(mirror, download.PROJECT_ROOT))
    monkeypatch.chdir(tmp_path)  # a relative mirror is resolved against the project root, not the cwd
    path = fetch(MONTH, UNREACHABLE, MONTH_SHA, tmp_path / "data")
    assert path == mirror / MONTH
    assert not (tmp_path / "data" / MONTH).exists()  # read in place, never copied


def test_relative_mirror_argument_and_relative_data_dir_resolve_from_project_root(
    mirror, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(mirror, download.PROJECT_ROOT)
    assert download.resolve_mirror(relative) == mirror.resolve()
    assert download.resolve_path("data") == download.PROJECT_ROOT / "data"


def test_download_verifies_and_replaces_atomically(tmp_path, upstream, monkeypatch):
    monkeypatch.delenv("BERT_DATA_MIRROR", raising=False)
    url, data = upstream
    path = fetch("corpus/corpus.txt", url, _sha(data), tmp_path / "data")
    assert path == tmp_path / "data" / "corpus" / "corpus.txt"
    assert path.read_bytes() == data
    assert not list(path.parent.glob("*.part"))
    # second call: the local copy is used (the upstream is gone), and its hash is not recomputed
    Path(url.removeprefix("file://")).unlink()
    monkeypatch.setattr(download, "sha256_file", lambda *a, **k: pytest.fail("re-hashed a known file"))
    assert fetch("corpus/corpus.txt", url, _sha(data), tmp_path / "data") == path


def test_download_checksum_mismatch_keeps_nothing(tmp_path, upstream, monkeypatch):
    monkeypatch.delenv("BERT_DATA_MIRROR", raising=False)
    url, data = upstream
    with pytest.raises(ChecksumError) as err:
        fetch("corpus/corpus.txt", url, "0" * 64, tmp_path / "data")
    message = str(err.value)
    assert "corpus/corpus.txt" in message and "0" * 64 in message and _sha(data) in message
    assert not any((tmp_path / "data" / "corpus").iterdir())


def test_mirror_checksum_mismatch_is_a_clear_error(mirror, tmp_path):
    with pytest.raises(ChecksumError, match="expected 1111.*actual 6db47ca6"):
        fetch(MONTH, UNREACHABLE, "1" * 64, tmp_path / "data", mirror=str(mirror))


def test_wrong_local_copy_is_replaced(tmp_path, upstream, monkeypatch, caplog):
    monkeypatch.delenv("BERT_DATA_MIRROR", raising=False)
    url, data = upstream
    target = tmp_path / "data" / "corpus" / "corpus.txt"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING):
        assert fetch("corpus/corpus.txt", url, _sha(data), tmp_path / "data").read_bytes() == data
    assert "wrong sha256" in caplog.text


def test_missing_everywhere_is_one_error_naming_both_places(tmp_path, mirror):
    with pytest.raises(DataFileError) as err:
        fetch("petitions/petitions_1999-01", UNREACHABLE, MONTH_SHA, tmp_path / "data", mirror=str(mirror))
    message = str(err.value)
    assert "petitions/petitions_1999-01" in message
    assert str(mirror / "petitions/petitions_1999-01") in message and UNREACHABLE in message


def test_no_mirror_configured_is_named_in_the_error(tmp_path, monkeypatch):
    monkeypatch.delenv("BERT_DATA_MIRROR", raising=False)
    with pytest.raises(DataFileError, match="no mirror configured.*127.0.0.1:9"):
        fetch("x/missing.txt", UNREACHABLE, None, tmp_path / "data")


def test_null_sha256_means_unverified_with_a_warning(tmp_path, upstream, monkeypatch, caplog):
    monkeypatch.delenv("BERT_DATA_MIRROR", raising=False)
    url, data = upstream
    with caplog.at_level(logging.WARNING):
        path = fetch("corpus/corpus.txt", url, None, tmp_path / "data")
    assert path.read_bytes() == data
    assert "NOT verified" in caplog.text and _sha(data) in caplog.text


def test_checksum_streams_and_caches(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * download.CHUNK_BYTES + 17))
    expected = _sha(big.read_bytes())
    assert download.sha256_file(big) == expected
    assert download.cached_sha256(big, tmp_path / "data") == expected
    os.utime(big, ns=(0, 10**9))  # a changed mtime invalidates the cached digest
    with big.open("ab") as handle:
        handle.write(b"x")
    assert download.cached_sha256(big, tmp_path / "data") == _sha(big.read_bytes())
