"""tasks/anneal.py: a study's cooldowns (anneal=) decay a stable-phase budget as a run planned to end there."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tasks.anneal import branch_command, cooldown_end, finished, plan
from tasks.optim import linear_schedule
from tests.test_run_pretrain import ROOT, check, client_for, run_cli, runs_of


def test_a_stopped_study_stops_its_cooldown_with_sigterm_so_the_branch_saves(tmp_path, monkeypatch):
    """SIGTERM on a study while a cooldown (a pretraining branch) runs: the branch gets SIGTERM, on which a
    pretraining run saves and ends KILLED (not SIGKILL mid-step, as `subprocess.run` would), then the study stops."""
    import os
    import signal
    import threading
    import time

    import tasks.anneal as anneal
    from tasks.study import _stop_on_sigterm

    flag = tmp_path / "flag"
    script = ("import signal, sys, time; from pathlib import Path; f = Path(sys.argv[1])\n"
              "signal.signal(signal.SIGTERM, lambda *a: (f.write_text('SIGTERM'), sys.exit(143)))\n"
              "f.write_text('ready'); time.sleep(60)")  # fmt: skip
    cooldown = anneal.Cooldown({"step": 10, "file": "x"}, 20, 0.2, (sys.executable, "-c", script, str(flag)), 1.0)
    monkeypatch.setattr(anneal, "finished", lambda *args: None)

    def stop_when_under_way() -> None:
        for _ in range(200):
            if flag.exists() and flag.read_text() == "ready":
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        threading.Thread(target=stop_when_under_way).start()
        with pytest.raises(KeyboardInterrupt):
            anneal.run_cooldowns(None, SimpleNamespace(info=SimpleNamespace(run_id="p")), [cooldown], tmp_path,
                                 say=lambda _: None)  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert flag.read_text() == "SIGTERM"


@pytest.mark.parametrize(("step", "warmup", "share"), [(2987, 300, 0.2), (5, 2, 0.5), (4000, 0, 0.1), (301, 300, 0.2)])
def test_the_cooldown_holds_the_peak_through_its_step_then_decays_over_its_share(step, warmup, share):
    end = cooldown_end(step, warmup, share)
    factor = linear_schedule(end, warmup, decay_fraction=share)  # the schedule the branch runs
    assert factor(step) == 1.0 and factor(step + 1) < 1.0  # the decay starts right after the branch point
    assert factor(end) == pytest.approx(0.0, abs=1e-9) and factor(end - 1) > 1e-6
    assert (end - step) == pytest.approx(share * (end - warmup), abs=1.0)  # the share of the steps after warmup


def test_cooldown_refuses_a_warmup_step_and_a_share_outside_0_1():
    with pytest.raises(ValueError, match="warmup"):
        cooldown_end(300, 300, 0.2)
    for share in (0.0, 1.0):
        with pytest.raises(ValueError, match="in \\(0, 1\\)"):
            cooldown_end(1000, 300, share)


def test_branch_command_keeps_the_parents_recipe_and_sets_the_schedule_and_store():
    # the tag as tasks.runner writes it: shell-quoted, so a value with a space or Hydra's quotes comes back whole
    parent = shlex.join(["experiment=cpu_60min", "seed=9", "logger.run_name=a", "ckpt_path=last",
                         "trainer.max_time=00:01:00:00", "paths.mlruns_dir=/old", "budget_at_end=false",
                         "keep_checkpoints_at_steps=[1000, 3500]", "+x='a,b'"])  # fmt: skip
    cmd = branch_command(parent, "/x/budget-step2987.ckpt", 3659, 0.2, "a-cd",
                         ["paths.mlruns_dir=/new", "logger.run_name=mine", "debug=fdr"])  # fmt: skip
    assert cmd[:2] == [sys.executable, str(ROOT / "run.py")]
    assert cmd[2:] == ["experiment=cpu_60min", "seed=9", "keep_checkpoints_at_steps=[1000, 3500]", "+x='a,b'",
                       "branch_from=/x/budget-step2987.ckpt", "trainer.max_steps=3659", "trainer.max_time=null",
                       "trainer.max_epochs=-1", "optim.time_keyed=false", "optim.decay_fraction=0.2",
                       "logger.run_name=a-cd", "budget_at_end=true", "expected_steps=null",
                       "paths.mlruns_dir=/new"]  # fmt: skip  # the study's recipe and run names are not the cooldown's


def _run(params):
    return SimpleNamespace(info=SimpleNamespace(run_id="p" * 32, experiment_id="1"),
                           data=SimpleNamespace(params=params, tags={"mlflow.runName": "cpu-60min",
                                                                     "overrides": "experiment=cpu_60min"}))  # fmt: skip


def test_plan_anneals_the_budgets_at_the_peak_and_keeps_the_others():
    params = {"optim.warmup_steps": "300", "optim.warmup_fraction": "None", "optim.decay_fraction": "0.2"}
    budgets = [{"step": 200, "lr": 6e-4, "peak_lr": 1e-3, "minutes": 2.0, "file": "/c/budget-step200.ckpt"},
               {"step": 2987, "lr": 1e-3, "peak_lr": 1e-3, "minutes": 40.0, "file": "/c/budget-step2987.ckpt"},
               {"step": 4300, "lr": 1e-5, "peak_lr": 1e-3, "minutes": 60.0, "file": "/c/budget-step4300.ckpt"},
               {"step": 900, "minutes": 9.0, "file": "/c/budget-step900.ckpt"}]  # fmt: skip  # no lr: an older run
    cooldowns, as_is = plan(_run(params), budgets, None)
    assert [c.step for c in cooldowns] == [2987] and cooldowns[0].end == 3659 and cooldowns[0].fraction == 0.2
    assert [b["step"] for b in as_is] == [200, 4300, 900]
    assert cooldowns[0].minutes == pytest.approx(40.0 / 2987 * (3659 - 2987))
    assert "logger.run_name=cpu-60min-cooldown2987-to3659" in cooldowns[0].command
    assert plan(_run(params), budgets, 0.5)[0][0].end == 300 + 2 * 2687
    with pytest.raises(SystemExit, match="decays over its whole budget"):
        plan(_run({**params, "optim.decay_fraction": "1.0"}), budgets, None)
    with pytest.raises(SystemExit, match="warmup_fraction"):  # a warmup that would move with the cooldown's length
        plan(_run({**params, "optim.warmup_steps": "None", "optim.warmup_fraction": "0.1"}), budgets, None)
    assert plan(_run({**params, "optim.warmup_fraction": "0.1"}), budgets, None)[0]  # warmup_steps wins: fine
    (odd,), _ = plan(_run(params), budgets, 0.1234567)  # one value for the schedule, the command, the lookup
    assert odd.fraction == 0.123457 and "optim.decay_fraction=0.123457" in odd.command
    assert odd.end == cooldown_end(2987, 300, 0.123457)


def test_a_cooldown_is_found_by_its_budget_file_end_and_share():
    """Not by `branch_run_id`: a branch's budgets from before its branch step are its parent's files, so a
    cooldown of one names the grandparent."""
    params = {"optim.warmup_steps": "300", "optim.decay_fraction": "0.2"}
    budget = {"step": 2987, "lr": 1e-3, "peak_lr": 1e-3, "minutes": 40.0, "file": "/grandparent/budget-step2987.ckpt"}
    (cooldown,), _ = plan(_run(params), [budget], None)

    def made(file, share):
        return SimpleNamespace(data=SimpleNamespace(tags={"branch_from": file, "branch_run_id": "g" * 32},
                                                    params={"optim.decay_fraction": share}))  # fmt: skip

    class Client:
        def __init__(self, runs):
            self.runs, self.queries = runs, []

        def search_runs(self, experiment_ids, filter_string, order_by):
            self.queries.append(filter_string)
            return self.runs

    right = made(budget["file"], "0.2")
    client = Client([made("/other/budget-step2987.ckpt", "0.2"), made(budget["file"], "0.3"), right])
    assert finished(client, _run(params), cooldown) is right
    assert client.queries == ["tags.final_step = '3659' and attributes.status = 'FINISHED'"]
    assert finished(Client([made(budget["file"], "0.3")]), _run(params), cooldown) is None


@pytest.mark.slow
def test_a_study_with_anneal_fine_tunes_the_cooldowns_end_and_reuses_it(tmp_path):
    """A warmup-stable-decay parent with a budget at its peak (step 5): the study branches a decay to step 8 (a
    half of the steps after warmup), fine-tunes that, and a second study finds the cooldown done."""
    workdir, cache = tmp_path / "w", tmp_path / "cache"
    workdir.mkdir()
    pre = ["data=petition_small", "debug=fdr", "optim.lr=4e-3", "optim.warmup_steps=2", "optim.decay_fraction=0.5",
           "optim.time_keyed=true", "trainer.max_time=00:00:30:00", "trainer.max_steps=10",
           "keep_checkpoints_at_steps=[1,5]", "trainer.val_check_interval=5"]  # fmt: skip
    check(run_cli("run.py", pre, workdir, cache))
    (parent,) = runs_of(workdir)
    extra = f"debug=fdr paths.mlruns_dir={workdir}/mlruns paths.cache_dir={cache} paths.checkpoint_dir={workdir}/ck"
    cmd = [sys.executable, "-m", "tasks.study", parent.info.run_id, "tasks=ner", "seeds=1", "lrs=1e-3",
           "scratch=false", "budgets=1,5", "anneal=true", f"extra_args={extra}", f"out_dir={tmp_path / 'study'}"]  # fmt: skip
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    check(first)
    assert "step 1 was not taken at the peak lr" in first.stdout  # in warmup: used as it is
    assert "cooldown 1/1: step 5 -> 8" in first.stdout, first.stdout[-3000:]

    client = client_for(workdir)
    (cooldown,) = [r for r in runs_of(workdir) if r.info.run_id != parent.info.run_id]
    tags = cooldown.data.tags
    assert (tags["branch_run_id"], tags["branch_step"], tags["final_step"]) == (parent.info.run_id, "5", "8")
    lr = {m.step: m.value for m in client.get_metric_history(cooldown.info.run_id, "lr")}
    assert lr[5] == pytest.approx(4e-3) and lr[6] < 4e-3 and lr[7] < lr[6]  # the peak, then the decay
    children = [r for r in runs_of(workdir, "study") if r.data.tags.get("study_parent") != "true"]
    assert sorted(r.data.tags["study_arm"] for r in children) == ["step 1", "step 8 (cooldown from 5)"]
    annealed = next(r for r in children if r.data.tags["study_arm"].startswith("step 8"))
    assert Path(annealed.data.tags["pretrained_ckpt"]).name == "budget-step8.ckpt"
    assert cooldown.info.run_id in annealed.data.tags["pretrained_ckpt"]  # the cooldown's own checkpoint
    assert "step 8 (cooldown from 5)" in (tmp_path / "study" / "study.md").read_text()

    again = subprocess.run([*cmd[:-1], f"out_dir={tmp_path / 'again'}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    check(again)
    assert "cooldown 1/1: step 5 -> 8: done before" in again.stdout and "launched 0, reused 2" in again.stdout
    assert len(runs_of(workdir)) == 2  # no second cooldown


def test_the_anneal_setting():
    from tasks.study import parse_args, plot_title

    assert parse_args(["abc"]).anneal is False
    assert parse_args(["abc", "anneal=true"]).anneal is True  # the parent's own decay share
    assert parse_args(["abc", "anneal=0.3"]).anneal == 0.3
    assert parse_args(["abc", "anneal=0"]).anneal is False
    for bad in ("1.5", "soon"):
        with pytest.raises(SystemExit):
            parse_args(["abc", f"anneal={bad}"])
    title = plot_title("abc", [], [], [0], [1e-3], 1, 1, cooldowns="anneal=0.3")
    assert "decayed first (cooldowns, anneal=0.3)" in title.replace("\n    ", " ")
