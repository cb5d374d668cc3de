"""Fetch a corpus file: local data folder, else the local mirror, else the upstream URL; always checksummed.

`fetch(name, url, sha256, data_dir, mirror)` returns a path to a verified copy of the file:

1. `data_dir/name` with the right sha256: used as is.
2. `mirror/name` (the mirror keeps the upstream relative names, e.g. `petitions/petitions_2019-04`): used IN
   PLACE, not copied. The full namuwiki train zip is 4.6 GB; a copy would double the disk use for nothing, and a
   symlink would break silently when the mirror moves. Every later step reads the raw file once, streaming.
3. The URL: streamed with a rich progress bar into a temporary file beside the target, hashed on the fly, and
   moved into place with `os.replace` only when the hash matches, so `data_dir` never holds a partial or wrong
   file.

`sha256=None` means "upstream publishes no checksum": the file is used unverified, with a warning naming it.
Hashing streams 1 MiB chunks; digests are cached under `data_dir/.sha256/` keyed by (path, size, mtime_ns), so
a 4.6 GB file is hashed once, not on every run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the parent of the `datamodules` package
MIRROR_ENV = "BERT_DATA_MIRROR"
CHUNK_BYTES = 1 << 20


class DataFileError(RuntimeError):
    """A corpus file could not be obtained: missing everywhere, or present with the wrong content."""


class ChecksumError(DataFileError):
    pass


def resolve_path(path: str | os.PathLike | None) -> Path | None:
    """Absolute path; a relative one is taken relative to the project root, never the current directory."""
    if path is None or str(path).strip() in ("", "null", "None"):
        return None
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else (PROJECT_ROOT / path).resolve()


def resolve_mirror(mirror: str | os.PathLike | None = None) -> Path | None:
    """The mirror folder from the argument, else from $BERT_DATA_MIRROR; None when neither is set."""
    if mirror is None or str(mirror).strip() in ("", "null", "None"):
        mirror = os.environ.get(MIRROR_ENV)
    return resolve_path(mirror)


# ----------------------------------------------------------------------------------------------------------------
# checksums


def sha256_file(path: Path, progress: bool = False) -> str:
    """sha256 of a file, streamed in 1 MiB chunks (flat memory whatever the size)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with _progress(enabled=progress and size > 256 * CHUNK_BYTES) as bar:
        task = bar.add_task(f"sha256 {path.name}", total=size)
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
                bar.advance(task, len(chunk))
    return digest.hexdigest()


def _record_path(path: Path, data_dir: Path) -> Path:
    key = hashlib.sha1(str(path.resolve()).encode("utf-8")).hexdigest()[:20]
    return data_dir / ".sha256" / f"{path.name}.{key}.json"


def cached_sha256(path: Path, data_dir: Path) -> str:
    """sha256 of `path`, reusing the digest recorded for the same (path, size, mtime_ns)."""
    path = Path(path)
    stat = path.stat()
    record_path = _record_path(path, Path(data_dir))
    identity = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        record = json.loads(record_path.read_text())
        if all(record.get(key) == value for key, value in identity.items()):
            return record["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = sha256_file(path, progress=True)
    _remember(path, Path(data_dir), digest)
    return digest


def _remember(path: Path, data_dir: Path, digest: str) -> None:
    stat = path.stat()
    record = {
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": digest,
    }
    record_path = _record_path(path, data_dir)
    try:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(record_path, json.dumps(record))
    except OSError as err:  # a read-only data_dir only costs a re-hash next time
        log.debug("could not record the sha256 of %s: %s", path, err)


def publish(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move a finished temporary file into place atomically, readable by all (mkstemp creates 0600 files and the
    cache may be shared by several users)."""
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------------------------
# fetch


def fetch(
    name: str,
    url: str | None,
    sha256: str | None,
    data_dir: str | os.PathLike,
    mirror: str | os.PathLike | None = None,
    timeout: float = 60.0,
) -> Path:
    """Path to a verified copy of `name` (an upstream-relative name such as `petitions/petitions_2019-04`).

    Looks in `data_dir`, then in the mirror (argument, else $BERT_DATA_MIRROR; relative paths are taken from the
    project root), then downloads `url` into `data_dir/name`. Raises `ChecksumError` on a wrong hash and
    `DataFileError` when no place has the file.
    """
    data_dir = resolve_path(data_dir)
    if data_dir is None:
        raise ValueError("fetch needs a data_dir")
    expected = sha256.lower() if sha256 else None
    target = data_dir / name

    if target.is_file():
        actual = cached_sha256(target, data_dir)
        if expected is None:
            _warn_unverified(target, actual)
            return target
        if actual == expected:
            return target
        log.warning(
            "%s has the wrong sha256 (expected %s, got %s): removing it and fetching it again",
            target,
            expected,
            actual,
        )
        target.unlink()

    mirror_dir = resolve_mirror(mirror)
    mirror_file = mirror_dir / name if mirror_dir is not None else None
    if mirror_file is not None and mirror_file.is_file():
        actual = cached_sha256(mirror_file, data_dir)
        if expected is None:
            _warn_unverified(mirror_file, actual)
        elif actual != expected:
            raise ChecksumError(
                f"{name}: the mirror copy {mirror_file} has the wrong sha256 "
                f"(expected {expected}, actual {actual}); fix or remove the mirror file"
            )
        log.info("%s: using the mirror copy %s in place", name, mirror_file)
        return mirror_file

    if mirror_file is None:
        mirror_note = f"no mirror configured (set data.mirror or ${MIRROR_ENV})"
    else:
        mirror_note = f"not in the mirror (looked for {mirror_file})"
    if not url:
        raise DataFileError(f"{name}: not in {data_dir}, {mirror_note}, and no upstream URL is configured")
    try:
        return _download(name, url, expected, target, data_dir, timeout)
    except ChecksumError:
        raise
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise DataFileError(
            f"{name}: cannot get this file: {mirror_note}, and the download from {url} failed ({err})"
        ) from err


def _warn_unverified(path: Path, actual: str) -> None:
    log.warning("%s: no sha256 configured, using it NOT verified (its sha256 is %s)", path, actual)


def _download(
    name: str, url: str, expected: str | None, target: Path, data_dir: Path, timeout: float
) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = response.headers.get("Content-Length")
            with _progress() as bar:
                task = bar.add_task(f"download {name}", total=int(total) if total else None)
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.advance(task, len(chunk))
        actual = digest.hexdigest()
        if expected is not None and actual != expected:
            raise ChecksumError(
                f"{name}: the download from {url} has the wrong sha256 (expected {expected}, actual {actual}); "
                "nothing was kept"
            )
        publish(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if expected is None:
        _warn_unverified(target, actual)
    _remember(target, data_dir, actual)
    log.info("%s: downloaded from %s", name, url)
    return target


def _progress(enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )
