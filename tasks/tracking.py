"""MLflow plumbing shared by pretraining and fine-tuning: the store, runs, resume lookup and artifacts.

MLflow 3 refuses the old folder store, so the local store is SQLite inside ``mlruns/``. Creating a fresh SQLite
store from several processes at once races (alembic migrations), so the store is created once, under a file
lock, before any rank or sweep job builds its own client.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)



def _sqlite_path(tracking_uri: str) -> Path | None:
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///") :])
    return None


@contextmanager
def _store_lock(tracking_uri: str):
    db = _sqlite_path(tracking_uri)
    if db is None:  # a remote server serialises its own migrations
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / ".store.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_store(tracking_uri: str, artifact_location: str | None, experiments: Iterable[str] = ()) -> None:
    """Create (or migrate) the store and the given experiments (names from the config: `logger.experiment_name`)
    once, before any parallel client exists."""
    from mlflow.tracking import MlflowClient

    with _store_lock(tracking_uri):
        client = MlflowClient(tracking_uri)
        for name in experiments:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                location = None
                if artifact_location and _sqlite_path(tracking_uri) is not None:
                    location = Path(artifact_location).as_uri()
                client.create_experiment(name, artifact_location=location)
            elif exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)


try:  # Hydra callback so that sweeps create the store before their first job.
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object


class EnsureStoreCallback(_HydraCallback):
    """Creates the MLflow store before a run or a sweep starts (Hydra callback)."""

    def _ensure(self, config: Any) -> None:
        logger = config.get("logger")
        if logger and str(logger.get("tracking_uri", "")).startswith("sqlite:"):
            ensure_store(logger.tracking_uri, logger.get("artifact_location"), [logger.experiment_name])

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._ensure(config)

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._ensure(config)


def git_commit(root: Path) -> str:
    """The commit the code ran at, with a `-dirty` suffix when the tree has local changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b.c": value}, the form MLflow params take."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def find_resumable_run(tracking_uri: str, experiment: str) -> tuple[str, Path]:
    """The newest run of `experiment` whose `last_ckpt` still exists: (run_id, checkpoint path)."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        runs = client.search_runs(
            [exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=50
        )
        for run in runs:
            ckpt = run.data.tags.get("last_ckpt")
            if ckpt and Path(ckpt).is_file():
                return run.info.run_id, Path(ckpt)
    raise FileNotFoundError(
        f"ckpt_path=last: no run in experiment '{experiment}' of {tracking_uri} has a last checkpoint on disk. "
        "Start a run without ckpt_path first, or pass ckpt_path=<file.ckpt>."
    )


def run_exists(tracking_uri: str, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return _client(tracking_uri).get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def newest_finished_run(tracking_uri: str, experiment: str = "pretrain") -> str | None:
    """Run id of the newest FINISHED run of `experiment` that has a checkpoint, or None."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.end_time DESC"],
        max_results=50,
    )
    for run in runs:
        for tag in ("best_ckpt", "last_ckpt"):
            ckpt = run.data.tags.get(tag)
            if ckpt and Path(ckpt).is_file():
                return run.info.run_id
    return None


def default_tracking_uri() -> str:
    root = Path(os.environ.get("BERT_PROJECT_ROOT", Path(__file__).resolve().parents[1]))
    return f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


def resolve_checkpoint(ref: str | os.PathLike, tracking_uri: str | None = None) -> Path:
    """A checkpoint path, or an MLflow run id whose best (else last) checkpoint is returned."""
    path = Path(ref)
    if path.is_file():
        return path
    uri = tracking_uri or default_tracking_uri()
    from mlflow.exceptions import MlflowException

    try:
        run = _client(uri).get_run(str(ref))
    except MlflowException as err:
        raise FileNotFoundError(
            f"'{ref}' is neither a checkpoint file nor a run id in the MLflow store {uri}"
        ) from err
    for tag in ("best_ckpt", "last_ckpt"):
        ckpt = run.data.tags.get(tag)
        if ckpt and Path(ckpt).is_file():
            return Path(ckpt)
    raise FileNotFoundError(f"MLflow run {ref} has no checkpoint on disk (tags best_ckpt/last_ckpt)")


def log_text(logger: Any, text: str, artifact_file: str) -> None:
    """Write `text` as an artifact of the logger's run (rank 0 only; no-op without MLflow)."""
    run_id = getattr(logger, "run_id", None)
    if run_id is None:
        return
    logger.experiment.log_text(run_id, text, artifact_file)


def log_dir(logger: Any, local_dir: Path, artifact_path: str) -> None:
    run_id = getattr(logger, "run_id", None)
    if run_id is None:
        return
    logger.experiment.log_artifacts(run_id, str(local_dir), artifact_path)


def set_tags(logger: Any, tags: Mapping[str, Any]) -> None:
    run_id = getattr(logger, "run_id", None)
    if run_id is None:
        return
    for key, value in tags.items():
        logger.experiment.set_tag(run_id, key, str(value))


def metric_history(logger: Any, keys: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} read back from the store, for plots."""
    run_id = getattr(logger, "run_id", None)
    if run_id is None:
        return {}
    client = logger.experiment
    out = {}
    for key in keys:
        hist = client.get_metric_history(run_id, key)
        if hist:
            out[key] = sorted((m.step, m.value) for m in hist)
    return out


def plot_curves(
    history: Mapping[str, list[tuple[int, float]]],
    panels: Mapping[str, Iterable[str]],
    out_png: Path,
    title: str = "",
) -> Path | None:
    """One panel per group of metric keys (train and val of the same quantity share a panel)."""
    panels = {name: [k for k in keys if k in history] for name, keys in panels.items()}
    panels = {name: keys for name, keys in panels.items() if keys}
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels.items()):
        for key in keys:
            steps, values = zip(*history[key])
            ax.plot(steps, values, label=key, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out_png.parent, suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name, dpi=110)
    os.replace(tmp.name, out_png)
    plt.close(fig)
    return out_png
