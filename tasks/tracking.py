"""MLflow plumbing shared by pretraining and fine-tuning: the store, runs, resume lookup and artifacts.

MLflow 3 refuses the old folder store, so the local store is SQLite inside ``mlruns/``. Creating a fresh SQLite
store from several processes at once races (alembic migrations), so the store is created once, under a file
lock, before any rank or sweep job builds its own client.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# MLflow 3's UI opens in its GenAI view; this query parameter selects the classic "Model training" view
# (checked in headless Chromium against MLflow 3.17's UI; an experiment tag did not change the view).
UI_VIEW_QUERY = "workflowType=machine_learning"
# Where a metric has a chance level, plots draw it (NSP labels are balanced 50/50).
CHANCE = {"train/nsp_acc": 0.5, "val/nsp_acc": 0.5}


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
    """The commit the code ran at (a plain sha; `git_dirty` says whether the tree had local changes)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def git_dirty(root: Path) -> bool | None:
    """Whether tracked files differ from the commit (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return bool(out.strip())
    except (OSError, subprocess.CalledProcessError):
        return None


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


# Config leaves that locate files on this machine (or name the run's store): config.yaml keeps them, params not.
PATH_LEAVES = {"mirror", "data_dir", "cache_dir", "tokenizer_path", "tokenizer_dir", "output_dir", "ckpt_path"}
NOT_PARAMS = {"hydra", "paths", "logger.tracking_uri", "logger.artifact_location", "logger.experiment_name",
              "logger.run_name", "logger.parent_run_id", "logger.tags",  # the run's place and tags, not settings
              "data.files", "task.data.file", "task.data.files"}  # fmt: skip
_REFERENCE = re.compile(r"^\$\{[\w.]+\}$")  # `${seed}`: the same value as another key, not a setting of its own


def _is_machine_path(value: Any) -> bool:
    text = str(value)
    return os.path.isabs(text) or text.startswith(("file:", "sqlite:"))


def run_params(
    resolved: Mapping[str, Any], unresolved: Mapping[str, Any], model_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The config as MLflow params: each setting once, under one name, without machine paths.

    Dropped: Hydra's own settings, `paths.*` and every other path (they stay in `config.yaml`), keys that are
    plain references to another key (`data.seed: ${seed}`), `_target_`s, the store location, and the input
    file lists (they are the run's dataset inputs, with their sha256). `model.*` is the shape the module was
    built with (`model_config`, with the tokenizer's vocab_size): for fine-tuning, the pretrained encoder's.
    """
    raw = flatten(unresolved)
    params = {}
    for key, value in flatten(resolved).items():
        parts = key.split(".")
        if any(".".join(parts[:i]) in NOT_PARAMS for i in range(1, len(parts) + 1)):
            continue
        if parts[-1] == "_target_" or parts[-1] in PATH_LEAVES:
            continue
        if isinstance(raw.get(key), str) and _REFERENCE.match(raw[key]):
            continue
        if value is not None and _is_machine_path(value):
            continue
        params[key] = value
    if model_config is not None:
        params = {k: v for k, v in params.items() if not k.startswith("model.")}
        params.update(flatten(dict(model_config), "model."))
    return params


def log_dataset_inputs(client: Any, run_id: str, files: Iterable[Mapping[str, Any]]) -> None:
    """Each input file as an MLflow dataset (the UI's Datasets column): its upstream name and URL, digest =
    its sha256 (cut to the 36 characters MLflow stores; the full sha256 is in the dataset profile)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for spec in files:
        sha = spec.get("sha256") or ""
        source = {"url": spec["url"]} if spec.get("url") else {"name": spec["name"]}
        dataset = Dataset(
            name=spec["name"],
            digest=sha[:36] or "unknown",
            source_type="http" if spec.get("url") else "local",
            source=json.dumps(source),
            profile=json.dumps({"sha256": sha, "split": spec.get("split")}),
        )
        tags = [InputTag("mlflow.data.context", str(spec.get("split") or "train"))]
        inputs.append(DatasetInput(dataset, tags))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def resolve_run_id(client: Any, ref: str, experiment_ids: Iterable[str] | None = None, filter_string: str = "") -> str:
    """A run id from a full id or a unique prefix of one, like git's short hashes (tables print 8 characters).

    Raises LookupError naming the candidates when the prefix is ambiguous, or when nothing matches."""
    from mlflow.exceptions import MlflowException

    ref = str(ref).strip().lower()
    try:
        return client.get_run(ref).info.run_id
    except MlflowException:
        pass
    if not re.fullmatch(r"[0-9a-f]{4,31}", ref):
        raise LookupError(f"'{ref}' is not a run id (or a prefix of 4+ hex characters of one)")
    ids = list(experiment_ids) if experiment_ids is not None else [e.experiment_id for e in client.search_experiments()]
    found, token = [], None
    while True:  # page through: a store of many studies holds thousands of runs
        page = client.search_runs(ids, filter_string=filter_string, max_results=1000, page_token=token)
        found += [r.info.run_id for r in page if r.info.run_id.startswith(ref)]
        token = page.token
        if not token:
            break
    if len(found) == 1:
        return found[0]
    if not found:
        raise LookupError(f"no run id starts with '{ref}'")
    raise LookupError(f"'{ref}' is ambiguous: {len(found)} runs start with it ({', '.join(sorted(found)[:5])})")


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
    """A checkpoint path, or an MLflow run id (or a unique prefix of one) whose best (else last) checkpoint is
    returned."""
    path = Path(ref)
    if path.is_file():
        return path
    uri = tracking_uri or default_tracking_uri()
    client = _client(uri)
    try:
        run = client.get_run(resolve_run_id(client, str(ref)))
    except LookupError as err:
        raise FileNotFoundError(
            f"'{ref}' is neither a checkpoint file nor a run id in the MLflow store {uri}: {err}"
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
    chance: Mapping[str, float] = CHANCE,
) -> Path | None:
    """One panel per group of metric keys (train and val of the same quantity share a panel), two panels a
    row, a dashed line at chance level where the panel's metrics have one. Written readable by other users."""
    panels = {name: [k for k in keys if k in history] for name, keys in panels.items()}
    panels = {name: keys for name, keys in panels.items() if keys}
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 1 if len(panels) == 1 else 2
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels.items()):
        for key in keys:
            steps, values = zip(*history[key])
            ax.plot(steps, values, label=key, marker="o" if len(steps) < 30 else None, markersize=3)
        levels = {chance[k] for k in keys if k in chance}
        for level in levels:
            ax.axhline(level, color="grey", linestyle="--", linewidth=1, label=f"chance ({level:g})")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out_png.parent, suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name, dpi=110)
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile creates 0600: others sharing the store could not read it
    os.replace(tmp.name, out_png)
    plt.close(fig)
    return out_png
