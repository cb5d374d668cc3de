"""`python -m tasks.compare`: runs found by id and name prefix, target crossing in steps and wall minutes."""

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from tasks.compare import first_reaching, load_runs, main, table


def _store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("pretrain", artifact_location=(tmp_path / "artifacts").as_uri())
    ids = {}
    # (step, minutes after start, nsp acc); the fast run passes 0.75 at its third point, the slow one never
    for name, points in {
        "fast-a": [(499, 2.0, 0.55), (999, 4.0, 0.70), (1499, 6.0, 0.76), (1999, 8.0, 0.74)],
        "slow-b": [(499, 5.0, 0.52), (999, 10.0, 0.61)],
    }.items():
        run = client.create_run(exp, run_name=name, start_time=1_000_000)
        metrics = [Metric("val/nsp_acc", v, 1_000_000 + int(m * 60_000), s) for s, m, v in points]
        metrics += [Metric("val/mlm_loss", 7.0 - v, 1_000_000 + int(m * 60_000), s) for s, m, v in points]
        client.log_batch(run.info.run_id, metrics=metrics)
        ids[name] = run.info.run_id
    return uri, ids


def test_crossing_in_steps_and_minutes(tmp_path, capsys):
    uri, ids = _store(tmp_path)
    runs = load_runs(["fast", ids["slow-b"]], ["val/mlm_loss", "val/nsp_acc"], uri)
    assert [r.name for r in runs] == ["fast-a", "slow-b"]
    assert [r.name for r in load_runs([ids["slow-b"][:8]], ["val/nsp_acc"], uri)] == ["slow-b"]  # an id prefix
    assert first_reaching(runs[0].curves["val/nsp_acc"], 0.75, higher_is_better=True) == (1499, 6.0)
    assert first_reaching(runs[1].curves["val/nsp_acc"], 0.75, higher_is_better=True) is None
    assert first_reaching(runs[0].curves["val/mlm_loss"], 6.3, higher_is_better=False) == (999, 4.0)
    text = table(runs, ["val/nsp_acc"], "val/nsp_acc", 0.75)
    assert "| fast-a | 2000 | 8.0 | 0.740 | step 1500, 6.0 min |" in text
    assert "| slow-b | 1000 | 10.0 | 0.610 | not reached |" in text

    main([ids["fast-a"], "--tracking-uri", uri, "--out", str(tmp_path / "cmp.png")])
    assert "step 1500, 6.0 min" in capsys.readouterr().out
    main([ids["fast-a"], "--tracking-uri", uri, "--until", "5"])  # equal wall time: cut at 5 minutes
    assert "| fast-a | 1000 | 4.0 | 6.300 | 0.700 | not reached |" in capsys.readouterr().out
    assert (tmp_path / "cmp.png").stat().st_size > 0


def test_unknown_run_is_a_clear_error(tmp_path):
    uri, _ = _store(tmp_path)
    with pytest.raises(SystemExit, match="nope"):
        load_runs(["nope"], ["val/nsp_acc"], uri)
