"""End-to-end: `python run.py` as a user runs it, on a small real corpus, with a throw-away MLflow store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data=petition_small"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")  # the prepared corpus/tokenizer is shared by this module's runs


def run_cli(
    script: str, args: list[str], workdir: Path, cache_dir: Path, timeout: int = 300, env_extra=None, **popen
):
    """Run an entry point from an unrelated cwd, with every output under `workdir`."""
    cmd = [
        sys.executable, str(ROOT / script), *args,
        f"paths.mlruns_dir={workdir}/mlruns", f"paths.cache_dir={cache_dir}",
        f"paths.checkpoint_dir={workdir}/checkpoints",
        f"hydra.run.dir={workdir}/out", f"hydra.sweep.dir={workdir}/multirun",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    if popen:
        return subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def client_for(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")


def runs_of(workdir: Path, experiment: str = "pretrain"):
    client = client_for(workdir)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def check(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def fdr_run(tmp_path_factory, cache_dir):
    workdir = tmp_path_factory.mktemp("fdr")
    # budgets at steps 1 and 2, and at the end (step 3): test_budget_checkpoints_are_kept; system metrics every
    # second (default 10 s), so that a few-second run has some
    proc = run_cli("run.py", [*SMALL, "debug=fdr", "keep_checkpoints_at_steps=[1,2]"], workdir, cache_dir,
                   env_extra={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})  # fmt: skip
    check(proc)
    return workdir, proc


def test_fdr_run_is_tracked_in_mlflow(fdr_run):
    workdir, proc = fdr_run
    assert "trainable parameters:" in proc.stdout
    assert "Pace: 3 steps in " in proc.stdout  # tasks.pace's line in the end-of-run summary
    (run,) = runs_of(workdir)
    client = client_for(workdir)
    assert run.info.status == "FINISHED"
    for key in ("train/mlm_loss", "train/nsp_loss", "train/loss", "train/mlm_acc", "train/nsp_acc",
                "train/tokens_per_s", "lr", "val/loss", "val/mlm_loss", "val/nsp_loss", "val/mlm_acc",
                "val/nsp_acc", "val/mlm_ppl"):  # fmt: skip
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run.info.run_id, "train/mlm_loss")) == 3  # one per step
    assert run.data.params["model.hidden_size"] == "128"
    assert run.data.params["data.vocab_size"] == "2000"
    tags = run.data.tags
    assert tags["git_commit"] and tags["data_sha256"] and tags["task"] == "pretrain"
    for tag in ("best_ckpt", "last_ckpt"):
        assert Path(tags[tag]).is_file(), tags[tag]
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert Path(tags["last_ckpt"]).parent == artifacts / "checkpoints"  # inside the run, not ./<id>/
    for name in ("config.yaml", "model_summary.txt", "tokenizer/tokenizer.json", "plots/curves.png"):
        assert (artifacts / name).is_file(), name
    assert "trainable parameters" in (artifacts / "model_summary.txt").read_text()
    stray = {p.name for p in workdir.iterdir()} - {"mlruns", "out", "checkpoints"}
    assert not stray, f"files written outside the configured folders: {stray}"


def test_fdr_run_reads_at_a_glance(fdr_run, mirror):
    """What a researcher sees in the UI: the config once, without machine paths; how the run was asked for
    and why it stopped; the best value; what it was trained on (sha256); a description = the summary."""
    workdir, proc = fdr_run
    (run,) = runs_of(workdir)
    client = client_for(workdir)
    params = run.data.params
    assert not [k for k in params if k.startswith(("module.", "hydra.", "paths."))]
    paths = {k: v for k, v in params.items() if os.path.isabs(v) or v.startswith(("file:", "sqlite:"))}
    assert not paths, paths
    by_leaf: dict[tuple[str, str], list[str]] = {}
    for key, value in params.items():  # the same setting twice = same leaf name and value under two prefixes
        by_leaf.setdefault((key.rsplit(".", 1)[-1], value), []).append(key)
    assert not {k: v for k, v in by_leaf.items() if len(v) > 1}
    assert params["optim.warmup_steps"] == "500" and params["optim.warmup_fraction"] == "None"  # first_run
    assert int(params["model.vocab_size"]) > 0  # the tokenizer's size, not the size asked for

    tags = run.data.tags
    assert tags["overrides"].split()[:2] == ["data=petition_small", "debug=fdr"]
    assert (tags["model"], tags["data"], tags["experiment"]) == ("tiny", "petition_small", "first_run")
    assert (tags["stop_reason"], tags["final_step"]) == ("max_steps", "3")
    assert len(tags["git_commit"]) == 40 and tags["git_dirty"] in ("True", "False")

    val_loss = [m.value for m in client.get_metric_history(run.info.run_id, "val/loss")]
    assert run.data.metrics["best/val/loss"] == pytest.approx(min(val_loss))
    assert run.data.metrics["best/step"] == 3
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)

    import hashlib

    (dataset_input,) = run.inputs.dataset_inputs  # petition_small: one file
    dataset = dataset_input.dataset
    assert dataset.name == "petitions/petitions_2019-04"
    sha = hashlib.sha256((mirror / dataset.name).read_bytes()).hexdigest()
    assert json.loads(dataset.profile)["sha256"] == sha
    assert dataset.digest == sha[:36]  # MLflow stores at most 36 characters of a digest

    note = tags["mlflow.note.content"]
    assert note in proc.stdout  # the printed summary is the run's description
    for text in (run.info.run_id, "max_steps at step 3", "Best val/loss", "best.ckpt", "workflowType=machine_learning",
                 f"pretrained={run.info.run_id}", f"bert.export {run.info.run_id}"):  # fmt: skip
        assert text in note, (text, note)
    noise = ("set_vital", "LeafSpec", "litlogger", "FLOPs")
    assert not [n for n in noise if n in proc.stdout + proc.stderr]


def test_budget_checkpoints_are_kept(fdr_run):
    import torch

    from tasks.budgets import read_budgets

    workdir, _ = fdr_run
    (run,) = runs_of(workdir)
    ckpt_dir = Path(run.data.tags["last_ckpt"]).parent
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    recorded = json.loads((artifacts / "budgets.json").read_text())
    assert [b["step"] for b in recorded] == [1, 2, 3]  # the two asked for, and the end of training
    assert [b["reason"] for b in recorded] == ["step", "step", "end"]
    assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith(("budget", ".budget"))) == [
        "budget-step1.ckpt", "budget-step2.ckpt", "budget-step3.ckpt"]  # fmt: skip  # no temp file left
    # tokens seen = non-pad tokens of every batch trained on; minutes grow; both stored in each checkpoint
    batch, seq = int(run.data.params["data.batch_size"]), int(run.data.params["data.max_seq_len"])
    tokens = [b["tokens"] for b in recorded]
    assert 0 < tokens[0] <= batch * seq and all(0 < b - a <= batch * seq for a, b in zip(tokens, tokens[1:]))
    assert all(a["minutes"] <= b["minutes"] for a, b in zip(recorded, recorded[1:]))
    from_files = read_budgets(ckpt_dir)  # weights_only=True: the checkpoints hold plain types only
    assert [(b["step"], b["tokens"]) for b in from_files] == [(b["step"], b["tokens"]) for b in recorded]
    one, two = (torch.load(ckpt_dir / f"budget-step{s}.ckpt", weights_only=True)["state_dict"] for s in (1, 2))
    key = "model.bert.embeddings.word_embeddings.weight"
    assert not torch.equal(one[key], two[key])  # kept, not overwritten by later steps


def test_checkpoint_exports_to_transformers(fdr_run, tmp_path):
    workdir, _ = fdr_run
    (run,) = runs_of(workdir)
    out = tmp_path / "hf"
    proc = subprocess.run(
        [sys.executable, "-m", "bert.export", run.data.tags["best_ckpt"], str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    check(proc)
    transformers = pytest.importorskip("transformers")
    model = transformers.BertForPreTraining.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == tok.vocab_size == len(tok)
    assert tok("서울특별시에 살아요")["input_ids"][0] == tok.cls_token_id


def test_bad_configs_fail_before_training(fdr_run, cache_dir, tmp_path):
    workdir, _ = fdr_run
    cases = {
        "no_such_key=1": "Could not override 'no_such_key'",
        "model=huge": "Could not find 'model/huge'",
        "ckpt_path=/nonexistent/x.ckpt": "no such checkpoint file",
    }
    for override, message in cases.items():
        proc = run_cli("run.py", [*SMALL, override], tmp_path, cache_dir, timeout=120)
        assert proc.returncode != 0
        assert message in proc.stderr + proc.stdout, (override, proc.stderr[-2000:])
    assert not runs_of(tmp_path), "a bad config must not start an MLflow run"

    (run,) = runs_of(workdir)
    proc = run_cli(
        "run.py",
        [*SMALL, "data.vocab_size=6000", f"ckpt_path={run.data.tags['last_ckpt']}"],
        tmp_path,
        cache_dir,
    )
    assert proc.returncode != 0
    assert "was trained with a vocabulary of" in proc.stderr, proc.stderr[-2000:]
    assert not runs_of(tmp_path)


@pytest.mark.slow
def test_sweep_runs_each_job(cache_dir, tmp_path):
    proc = run_cli("run.py", ["-m", *SMALL, "debug=fdr", "model=tiny,mini"], tmp_path, cache_dir, timeout=400)
    check(proc)
    runs = runs_of(tmp_path)
    assert sorted(r.data.params["model.hidden_size"] for r in runs) == ["128", "256"]
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
def test_ddp_two_processes_one_run(cache_dir, tmp_path):
    proc = run_cli(
        "run.py", [*SMALL, "debug=fdr", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"],
        tmp_path, cache_dir, timeout=400,
    )  # fmt: skip
    check(proc)
    (run,) = runs_of(tmp_path)  # only rank 0 writes to MLflow
    assert run.info.status == "FINISHED"
    assert "train/mlm_loss" in run.data.metrics
    assert Path(run.data.tags["last_ckpt"]).is_file()


@pytest.mark.slow
def test_kill_then_resume_continues_the_same_run(cache_dir, tmp_path):
    args = [*SMALL, "trainer.max_steps=300", "trainer.max_time=null", "checkpoint_every_n_steps=5",
            "trainer.val_check_interval=50",
            "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1"]  # fmt: skip
    proc = run_cli("run.py", args, tmp_path, cache_dir, popen=True)
    deadline = time.time() + 300
    last = plot = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "mlruns").rglob("last.ckpt"))
        plots = list((tmp_path / "mlruns").rglob("plots/curves.png"))  # drawn at the first validation
        if found and found[0].stat().st_size > 0 and plots:
            last, plot = found[0], plots[0]
            time.sleep(0.5)  # a few more steps beyond the checkpoint, then die without warning
            break
        time.sleep(0.2)
    assert last is not None and proc.poll() is None, "run ended before its first checkpoint and validation"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_ms = time.time() * 1000
    (run,) = runs_of(tmp_path)

    import torch

    ckpt_step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    resumed = run_cli("run.py", [*args, "ckpt_path=last"], tmp_path, cache_dir, timeout=900)
    check(resumed)
    (after,) = runs_of(tmp_path)
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    history = client_for(tmp_path).get_metric_history(run.info.run_id, "train/mlm_loss")
    new_steps = sorted(m.step for m in history if m.timestamp > killed_ms)
    assert 0 < ckpt_step < 300, "killed after the run had finished: the machine is too fast for this test"
    assert new_steps[0] == ckpt_step, (ckpt_step, new_steps[:3])  # continues where the checkpoint was
    assert new_steps == list(range(ckpt_step, 300))

    # the killed run had its curves; the resumed one redrew them (same run), readable by other users
    assert plot.is_file() and plot.stat().st_mtime * 1000 > killed_ms
    assert plot.stat().st_mode & 0o777 == 0o644
    import matplotlib.image

    height, width = matplotlib.image.imread(plot).shape[:2]
    assert height > 0.6 * width, (width, height)  # 2x2 panels, not one row of four
    assert after.data.tags["stop_reason"] == "max_steps" and after.data.tags["final_step"] == "300"
    assert after.data.metrics["best/step"] <= 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_mlflow(args: list[str], port: int, log: Path) -> subprocess.Popen:
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), *args, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            break
    os.killpg(proc.pid, signal.SIGTERM)
    raise AssertionError(f"mlflow did not start:\n{log.read_text()[-3000:]}")


def _rest(port: int, path: str, payload: dict | None = None) -> dict:
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}"
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_remote_mlflow_server_and_local_ui(fdr_run, cache_dir, tmp_path):
    port = _free_port()
    server = _start_mlflow(
        ["server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        port, tmp_path / "server.log",
    )  # fmt: skip
    try:
        work = tmp_path / "client"
        work.mkdir()
        proc = run_cli(
            "run.py", [*SMALL, "debug=fdr", f"logger.tracking_uri=http://127.0.0.1:{port}"], work, cache_dir
        )
        check(proc)
        exp = _rest(port, "experiments/get-by-name?experiment_name=pretrain")["experiment"]
        (run,) = _rest(port, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        run_id = run["info"]["run_id"]
        hist = _rest(port, f"metrics/get-history?run_id={run_id}&metric_key=train/nsp_loss")["metrics"]
        assert [m["step"] for m in hist] == [0, 1, 2]
        assert not (work / "mlruns").exists(), "a remote run must not create a local store"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    workdir, _ = fdr_run  # the local SQLite store, browsed the way the README says
    port = _free_port()
    ui = _start_mlflow(
        ["ui", "--backend-store-uri", f"sqlite:///{workdir}/mlruns/mlflow.db"], port, tmp_path / "ui.log"
    )
    try:
        exp = _rest(port, "experiments/get-by-name?experiment_name=pretrain")["experiment"]
        runs = _rest(port, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED"
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


def _logged_steps(workdir: Path, run_id: str, after_ms: float = 0) -> list[int]:
    history = client_for(workdir).get_metric_history(run_id, "train/mlm_loss")
    return sorted(m.step for m in history if m.timestamp > after_ms)


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["sigterm", "max_time"])
def test_stop_saves_the_last_step_and_resume_continues_it(cache_dir, tmp_path, stop):
    """SIGTERM mid-epoch (as SLURM preempts) or max_time: last.ckpt holds the last trained step, the run is
    tagged with why it stopped, and ckpt_path=last continues at the next step, replaying nothing."""
    # a step cap no machine reaches within the 20 s of max_time (an idle one did 400 steps in less)
    cap = 100_000
    args = [*SMALL, f"trainer.max_steps={cap}", "checkpoint_every_n_steps=1000", "trainer.val_check_interval=1000",
            "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1"]  # fmt: skip
    if stop == "max_time":
        check(run_cli("run.py", [*args, "trainer.max_time=00:00:00:20"], tmp_path, cache_dir))
    else:
        proc = run_cli("run.py", args, tmp_path, cache_dir, popen=True)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            runs = runs_of(tmp_path)
            if runs and len(_logged_steps(tmp_path, runs[0].info.run_id)) >= 10:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "run ended before it could be stopped"
        os.kill(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=120)
    stopped_ms = time.time() * 1000
    (run,) = runs_of(tmp_path)
    tags = run.data.tags
    logged = _logged_steps(tmp_path, run.info.run_id)

    import torch

    ckpt_step = torch.load(tags["last_ckpt"], map_location="cpu", weights_only=True)["global_step"]
    assert ckpt_step == logged[-1] + 1 < cap  # the step after the last logged one: nothing lost
    assert tags["stop_reason"] == stop and int(tags["final_step"]) == ckpt_step
    assert run.info.status == ("KILLED" if stop == "sigterm" else "FINISHED")  # stopped by the user, not crashed

    resumed = run_cli("run.py", [*args, "ckpt_path=last", "trainer.max_steps=" + str(ckpt_step + 5)], tmp_path,
                      cache_dir)  # fmt: skip
    check(resumed)
    (after,) = runs_of(tmp_path)
    assert after.info.run_id == run.info.run_id
    assert _logged_steps(tmp_path, run.info.run_id, stopped_ms) == list(range(ckpt_step, ckpt_step + 5))
    assert after.data.tags["stop_reason"] == "max_steps"


@pytest.mark.parametrize("preset", ["cpu_30min", "cpu_60min"])
def test_recommended_presets_run_under_fdr(preset, cache_dir, tmp_path):
    """The README's recommended pretraining recipes compose and train (a few steps) as a user starts them."""
    check(run_cli("run.py", [f"experiment={preset}", *SMALL, "debug=fdr"], tmp_path, cache_dir))
    (run,) = runs_of(tmp_path)
    params, tags = run.data.params, run.data.tags
    assert (params["optim.time_keyed"], params["model.hidden_size"], params["trainer.max_time"]) == (
        "True", "256", "00:00:30:00" if preset == "cpu_30min" else "00:01:00:00")  # fmt: skip
    assert params["optim.decay_fraction"] == "0.2"  # warmup-stable-decay: the README's measured choice
    assert tags["experiment"] == preset and tags["stop_reason"] == "max_steps"
    assert len(client_for(tmp_path).get_metric_history(run.info.run_id, "lr")) == 3


def test_a_preset_runs_without_a_logger(cache_dir, tmp_path):
    """`logger=none` with a preset that names its run (`logger.run_name`) trains without MLflow."""
    proc = run_cli("run.py", ["experiment=cpu_30min", *SMALL, "debug=fdr", "logger=none"], tmp_path, cache_dir)
    check(proc)
    assert not (tmp_path / "mlruns" / "mlflow.db").exists() and list((tmp_path / "out").rglob("last.ckpt"))


def test_continued_pretraining_starts_from_the_checkpoint(fdr_run, mirror, cache_dir, tmp_path):
    """`experiment=tapt_ner pretrained=<ckpt>`: a new run on the KLUE-NER train text that starts from the
    checkpoint's weights (lr 0 keeps them there, so they must be equal at the end), shape and tokenizer."""
    import torch

    source_dir, _ = fdr_run
    (source,) = runs_of(source_dir)
    ckpt = source.data.tags["last_ckpt"]
    check(run_cli("run.py", ["experiment=tapt_ner", f"pretrained={ckpt}", "debug=fdr", "optim.lr=0.0"], tmp_path,
                  cache_dir))  # fmt: skip
    (run,) = runs_of(tmp_path)
    params, tags = run.data.params, run.data.tags
    assert run.info.run_id != source.info.run_id and tags["init_from"] == ckpt
    assert tags["init_run_id"] == source.info.run_id and tags["experiment"] == "tapt_ner"
    assert params["model.hidden_size"] == source.data.params["model.hidden_size"]  # the checkpoint's shape ...
    assert params["model.hidden_dropout_prob"] == "0.1" and params["nsp_weight"] == "0.0"  # ... this run's dropout
    before = torch.load(ckpt, map_location="cpu", weights_only=True)
    after = torch.load(tags["last_ckpt"], map_location="cpu", weights_only=True)
    assert after["global_step"] == 3
    assert after["hyper_parameters"]["tokenizer_dir"] == before["hyper_parameters"]["tokenizer_dir"]
    assert before["state_dict"].keys() == after["state_dict"].keys()
    assert all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in before["state_dict"])


def test_continued_pretraining_refuses_a_foreign_tokenizer(fdr_run, cache_dir, tmp_path):
    source_dir, _ = fdr_run
    (source,) = runs_of(source_dir)
    args = ["experiment=tapt_ner", f"pretrained={source.data.tags['last_ckpt']}", "debug=fdr",
            f"data.tokenizer_path={tmp_path}"]  # fmt: skip
    proc = run_cli("run.py", args, tmp_path, cache_dir)
    assert proc.returncode != 0 and "differs from the tokenizer of pretrained=" in proc.stderr


@pytest.mark.slow
def test_time_keyed_schedule_ends_annealed_at_max_time(cache_dir, tmp_path):
    """optim.time_keyed: a run stopped by max_time ends with the lr at its floor, not mid-schedule."""
    args = [*SMALL, "optim.time_keyed=true", "optim.warmup_steps=5", "optim.warmup_fraction=null",
            "trainer.max_steps=100000", "trainer.max_time=00:00:00:20", "trainer.val_check_interval=1000",
            "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1", "checkpoint_every_n_steps=1000"]  # fmt: skip
    check(run_cli("run.py", args, tmp_path, cache_dir))
    (run,) = runs_of(tmp_path)
    assert run.data.tags["stop_reason"] == "max_time"
    lrs = [m.value for m in sorted(client_for(tmp_path).get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)]
    peak = max(lrs)
    assert len(lrs) > 20 and lrs.index(peak) <= 6  # warmup in steps, then decay
    assert lrs[-1] < 0.1 * peak  # annealed at the time limit, although max_steps was 100,000
    assert all(b <= a + 1e-12 for a, b in zip(lrs[6:], lrs[7:]))  # monotone decay


def _final_weights(workdir: Path, run_id: str):
    import torch

    (path,) = (workdir / "mlruns").rglob(f"{run_id}/**/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize(("max_steps", "logged"), [(5, [1, 3, 4]), (4, [1, 3])])
def test_a_run_ending_between_val_checks_validates_its_last_step(cache_dir, tmp_path, max_steps, logged):
    """max_steps off the val interval (6,878 steps, val every 500) still measures the step the run ends on;
    on the interval, once."""
    check(run_cli("run.py", [*SMALL, "debug=fdr", f"trainer.max_steps={max_steps}", "trainer.val_check_interval=2"],
                  tmp_path, cache_dir))  # fmt: skip
    (run,) = runs_of(tmp_path)
    steps = [m.step for m in client_for(tmp_path).get_metric_history(run.info.run_id, "val/loss")]
    # after optimizer steps 2 and 4 (the interval) and 5 (the end); Lightning logs a batch's metrics at the
    # count of steps before it, as train/* (steps 0 … 4)
    assert sorted(steps) == logged
    assert run.data.tags["stop_reason"] == "max_steps" and run.data.tags["final_step"] == str(max_steps)


def test_branch_from_a_stable_phase_checkpoint_is_the_straight_run(cache_dir, tmp_path):
    """A decay branched off a time-keyed warmup-stable-decay run at step 5 ends where a step-keyed run of 16
    steps does from step 0: same weights, same lr at every step, in a new MLflow run that names its parent."""
    import torch

    common = [*SMALL, "optim.lr=4e-3", "optim.warmup_steps=2", "optim.decay_fraction=0.5",
              "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1"]  # fmt: skip
    # no validation after the branch point: a best checkpoint named at the end could only be the parent's
    step_keyed = ["optim.time_keyed=false", "trainer.max_time=null", "trainer.max_steps=16",
                  "trainer.val_check_interval=100"]  # fmt: skip
    straight, parent = tmp_path / "straight", tmp_path / "parent"
    straight.mkdir(), parent.mkdir()
    check(run_cli("run.py", [*common, *step_keyed], straight, cache_dir))
    # the parent: time-keyed, its peak held to step 6 (of 10), a budget checkpoint at step 5
    check(run_cli("run.py", [*common, "optim.time_keyed=true", "trainer.max_time=00:00:30:00",
                             "trainer.max_steps=10", "keep_checkpoints_at_steps=[5]", "trainer.val_check_interval=2"],
                  parent, cache_dir))  # fmt: skip
    (parent_run,) = runs_of(parent)
    (ckpt,) = (parent / "mlruns").rglob("budget-step5.ckpt")
    check(run_cli("run.py", [*common, *step_keyed, f"branch_from={ckpt}"], parent, cache_dir))  # the same store
    runs = {run.info.run_id: run for run in runs_of(parent)}
    assert len(runs) == 2 and parent_run.info.run_id in runs
    (branch_id,) = set(runs) - {parent_run.info.run_id}
    tags = runs[branch_id].data.tags
    assert tags["branch_run_id"] == parent_run.info.run_id and tags["branch_step"] == "5"
    assert tags["final_step"] == "16"
    best = [line for line in tags["mlflow.note.content"].splitlines() if line.startswith("Best checkpoint")]
    assert not any(parent_run.info.run_id in line for line in best), best  # the parent's best is not its own
    params = runs[branch_id].data.params  # a new run: its own config, not a resumed run's (which has them)
    assert params["optim.time_keyed"] == "False" and params["trainer.max_steps"] == "16", sorted(params)[:5]

    client = client_for(parent)
    branch_lr = {m.step: m.value for m in client.get_metric_history(branch_id, "lr")}
    (straight_run,) = runs_of(straight)
    straight_lr = {m.step: m.value for m in client_for(straight).get_metric_history(straight_run.info.run_id, "lr")}
    assert sorted(branch_lr) == list(range(5, 16))  # from the branch point on, no warmup again
    assert branch_lr == pytest.approx({s: straight_lr[s] for s in branch_lr})
    parent_lr = {m.step: m.value for m in client.get_metric_history(parent_run.info.run_id, "lr")}
    assert parent_lr[8] < straight_lr[8]  # the parent was decaying there: the branch followed its own schedule

    ours, theirs = _final_weights(parent, branch_id), _final_weights(straight, straight_run.info.run_id)
    assert ours.keys() == theirs.keys()
    for key in ours:  # same data after step 5 (none replayed), same moments, same lr
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def test_branch_from_refuses_a_time_keyed_schedule(tmp_path, cache_dir):
    proc = run_cli("run.py", [*SMALL, "experiment=cpu_60min", f"branch_from={tmp_path}/x.ckpt"], tmp_path, cache_dir)
    assert proc.returncode != 0 and "needs a step-keyed schedule" in proc.stderr + proc.stdout


def test_a_killed_branch_resumes_its_own_run(tmp_path):
    """`<same overrides> ckpt_path=last` (the summary's command) on a branch continues the branch's run: the
    branch point is not applied again."""
    from omegaconf import OmegaConf

    from tasks import runner

    cfg = OmegaConf.create({"branch_from": str(tmp_path / "parent.ckpt"), "ckpt_path": "last", "pretrained": None,
                            "optim": {"time_keyed": False}, "trainer": {"max_steps": 10},
                            "paths": {"root_dir": str(tmp_path)}})  # fmt: skip
    assert runner.resolve_branch(cfg) is None
    cfg.ckpt_path = None
    with pytest.raises(FileNotFoundError, match="branch_from=.*parent.ckpt"):
        runner.resolve_branch(cfg)
