"""tasks/study.py: keys, lr choice, the table; end to end on a tiny pretraining run (slow)."""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.budgets import BudgetCheckpoints
from tasks.study import (
    BUSY,
    STOPPED,
    Cell,
    Children,
    Row,
    choose,
    description,
    end_stopped,
    fold_splits,
    format_cell,
    format_markdown,
    log_to_parent,
    paired_gain,
    parse_args,
    plan_jobs,
    plot_title,
    recipe_overrides,
    run_unless_done,
    set_gains,
    study_key,
    study_metrics,
    time_left_note,
)
from tests.test_run_pretrain import ROOT, check, client_for, run_cli, runs_of

ARM = {"kind": "budget", "run": "abc", "step": 1000, "sha256": "f" * 64}


def test_study_key_is_stable_and_says_what_changes_a_result():
    key = study_key("ner", ARM, 0, 1e-3, ["trainer.max_epochs=6"])
    assert key == study_key("ner", dict(reversed(list(ARM.items()))), 0, 0.001, ["trainer.max_epochs=6"])
    changed = [
        study_key("nli", ARM, 0, 1e-3, ["trainer.max_epochs=6"]),
        study_key("ner", {**ARM, "sha256": "e" * 64}, 0, 1e-3, ["trainer.max_epochs=6"]),
        study_key("ner", ARM, 1, 1e-3, ["trainer.max_epochs=6"]),
        study_key("ner", ARM, 0, 3e-4, ["trainer.max_epochs=6"]),
        study_key("ner", ARM, 0, 1e-3, ["trainer.max_epochs=3"]),
        study_key("ner", ARM, 0, 1e-3, ["trainer.max_epochs=6"], data_version=2),  # the task's data changed
    ]
    assert len({key, *changed}) == 7
    assert study_key("ner", ARM, 0, 1e-3, ["trainer.max_epochs=6"], data_version=None) == key
    # pinned: a new key scheme must bump KEY_VERSION on purpose, or finished studies would rerun everything
    assert key == "c345292d14856307e8d8"
    # where files go is not part of the recipe
    args = ["debug=fdr", "paths.cache_dir=/x", "hydra.run.dir=/y", "logger.tracking_uri=z", "+logger.tags.a=b"]
    assert recipe_overrides(args) == ["debug=fdr"]


def test_lr_choice_by_mean_val_and_test_spread():
    # lr 1e-3 wins on mean val (0.6 vs 0.55) although 3e-4 has the single best val and the best test
    results = {3e-4: [(0.7, 0.9), (0.4, 0.8)], 1e-3: [(0.6, 0.5), (0.6, 0.6), (0.6, 0.7)]}
    cell = choose(results, "max")
    assert cell.lr == 1e-3 and cell.n == 3
    assert cell.mean == pytest.approx(statistics.mean([0.5, 0.6, 0.7]))
    assert cell.std == pytest.approx(statistics.stdev([0.5, 0.6, 0.7]))  # sample std, as the table says
    assert choose(results, "min").lr == 3e-4
    assert choose({1e-3: [(0.6, 0.5)]}, "max").std is None
    assert choose({1e-3: []}, "max") is None  # every run of the arm failed


def test_folds_rotate_the_split_so_each_residue_is_tested_once():
    topic = {"modulus": 10, "test_mod": 0, "val_mod": 1}
    assert fold_splits(topic, 1) == [()]
    folds = fold_splits(topic, 5)
    assert folds[0] == ()  # the task's own split: its runs are the ordinary study's
    assert folds[1] == ("task.data.split.test_mod=2", "task.data.split.val_mod=3")
    tests = [0] + [int(f[0].rsplit("=", 1)[1]) for f in folds[1:]]
    vals = [1] + [int(f[1].rsplit("=", 1)[1]) for f in folds[1:]]
    assert tests == [0, 2, 4, 6, 8] and vals == [1, 3, 5, 7, 9]  # disjoint test sets; val never the fold's test
    sts = fold_splits({"modulus": 5, "test_mod": 0, "val_mod": 1}, 5)
    assert sts[4] == ("task.data.split.test_mod=4", "task.data.split.val_mod=0")  # wraps around
    with pytest.raises(SystemExit, match="multiple"):
        fold_splits(topic, 3)
    with pytest.raises(SystemExit, match="modulus"):
        fold_splits(None, 5, "mytask")


def test_every_task_can_be_studied_in_five_folds():
    from tasks.study import ALL_TASKS, compose

    for task in ALL_TASKS:
        split = compose(task, []).task.data.split
        folds = fold_splits(split, 5, task)
        assert len(folds) == 5 and len(set(folds)) == 5, task


def test_a_fold_run_is_keyed_like_the_same_overrides_given_by_hand():
    from tasks.study import Arm

    arm = Arm("step 1000", "budget", ("pretrained=x",), tuple(ARM.items()), 1000)
    recipe = ["trainer.max_epochs=6"]
    splits = {"topic": fold_splits({"modulus": 10, "test_mod": 0, "val_mod": 1}, 5)}
    jobs = plan_jobs(["topic"], [arm], [0, 1], [1e-3], recipe, {"topic": None}, splits)
    assert len(jobs) == 10 and len({j.key for j in jobs}) == 10
    fold0 = [j for j in jobs if j.fold == 0 and j.seed == 0][0]
    assert fold0.key == study_key("topic", ARM, 0, 1e-3, recipe)  # an ordinary study's run is reused
    fold2 = [j for j in jobs if j.fold == 2 and j.seed == 1][0]
    by_hand = recipe + ["task.data.split.test_mod=4", "task.data.split.val_mod=5"]
    assert fold2.key == study_key("topic", ARM, 1, 1e-3, by_hand)


def test_a_fold_run_gets_its_split_its_own_folder_and_a_tag(tmp_path):
    from tasks.study import Arm, child_command

    arm = Arm("step 1000", "budget", ("pretrained=x",), tuple(ARM.items()), 1000)
    splits = {"topic": fold_splits({"modulus": 10, "test_mod": 0, "val_mod": 1}, 5)}
    fold0, fold3 = [j for j in plan_jobs(["topic"], [arm], [0], [1e-3], [], None, splits) if j.fold in (0, 3)]
    cmd0, cmd3 = (child_command(j, "parent", ["trainer.max_epochs=6"], tmp_path) for j in (fold0, fold3))
    assert "task.data.split.test_mod=6" in cmd3 and "task.data.split.val_mod=7" in cmd3
    assert "+logger.tags.study_fold=3" in cmd3
    assert not any("task.data.split" in a or "study_fold" in a for a in cmd0)  # fold 0: the ordinary study's command
    dirs = {a for a in cmd0 + cmd3 if a.startswith("hydra.run.dir=")}
    assert len(dirs) == 2  # side by side, two folds never share a run folder


def test_scratch_args_give_scratch_its_own_recipe_keyed_like_the_same_overrides_by_hand(tmp_path):
    """`scratch_args=task.pooling=mean`: scratch's runs are those a scratch-only study with the overrides in
    extra_args makes (so they are reused), the pretrained arm's are unchanged, and a key both set is scratch's."""
    from tasks.study import Arm, child_command, merge_overrides

    budget = Arm("step 1000", "budget", ("pretrained=x",), tuple(ARM.items()), 1000)
    scratch_id = (("kind", "scratch"), ("shape", "{}"), ("tokenizer", ()))
    scratch = Arm("scratch", "scratch", ("pretrained=null",), scratch_id, 0, 0, 0.0, ("task.pooling=mean",))
    plain = ["trainer.max_epochs=5"]
    s_job, b_job = plan_jobs(["nli"], [scratch, budget], [0], [3e-4], plain)
    assert s_job.key == study_key("nli", dict(scratch_id), 0, 3e-4, ["trainer.max_epochs=5", "task.pooling=mean"])
    assert b_job.key == study_key("nli", ARM, 0, 3e-4, plain)  # the pretrained arm: as without scratch_args
    s_cmd, b_cmd = (child_command(j, "parent", plain, tmp_path) for j in (s_job, b_job))
    assert "task.pooling=mean" in s_cmd and "task.pooling=mean" not in b_cmd
    # a key set in both: scratch's value replaces the shared one (Hydra takes a key once)
    assert merge_overrides(["trainer.max_epochs=5", "optim.head_lr_scale=10"], ["+optim.head_lr_scale=1"]) == [
        "trainer.max_epochs=5", "+optim.head_lr_scale=1"]
    args = parse_args(["0123", "extra_args=trainer.max_epochs=5", "scratch_args=task.pooling=mean trainer.max_epochs=6"])
    assert args.scratch_args == ["task.pooling=mean", "trainer.max_epochs=6"]
    for bad in (["scratch=false", "scratch_args=task.pooling=mean"], ["scratch_args=optim.lr=1e-3"]):
        with pytest.raises(SystemExit):  # no scratch arm; a key the study sets per run (use lrs=)
            parse_args(["0123", *bad])


def test_pretrained_args_change_the_pretrained_arms_only_so_scratch_runs_are_reused(tmp_path):
    """`pretrained_args=optim.freeze_encoder_fraction=0.33` (LP-FT): the budget arm's runs are those the same
    override in extra_args makes (an earlier scratch=false study's are reused), and scratch's are the plain
    recipe's, so the study pairs LP-FT against scratch runs it need not make again."""
    from tasks.study import Arm, budget_arms, child_command

    ckpt = tmp_path / "budget-step1000.ckpt"
    ckpt.write_bytes(b"weights")
    plain, lpft = ["trainer.max_epochs=6"], "optim.freeze_encoder_fraction=0.33"
    (budget,) = budget_arms([{"file": ckpt, "step": 1000}], "abc", [lpft])
    scratch_id = (("kind", "scratch"), ("shape", "{}"), ("tokenizer", ()))
    scratch = Arm("scratch", "scratch", ("pretrained=null",), scratch_id, 0, 0, 0.0)
    s_job, b_job = plan_jobs(["topic"], [scratch, budget], [0], [1e-3], plain)
    (b_by_hand,) = plan_jobs(["topic"], budget_arms([{"file": ckpt, "step": 1000}], "abc"), [0], [1e-3], [*plain, lpft])
    (s_plain,) = plan_jobs(["topic"], [scratch], [0], [1e-3], plain)
    assert b_job.key == b_by_hand.key and s_job.key == s_plain.key
    assert b_job.key != plan_jobs(["topic"], budget_arms([{"file": ckpt, "step": 1000}], "abc"), [0], [1e-3], plain)[0].key
    s_cmd, b_cmd = (child_command(j, "parent", plain, tmp_path) for j in (s_job, b_job))
    assert lpft in b_cmd and lpft not in s_cmd
    args = parse_args(["0123", "extra_args=trainer.max_epochs=6", f"pretrained_args={lpft} reinit_layers=1"])
    assert args.pretrained_args == [lpft, "reinit_layers=1"] and args.scratch_args == []
    with pytest.raises(SystemExit):  # the study sets the lr per run
        parse_args(["0123", "pretrained_args=optim.lr=1e-4"])
    title = plot_title("abc", plain, [], [0], [1e-3], 5, 1, [lpft])
    assert "pretrained arms also: " + lpft in title.replace("\n    ", " ")


def test_with_folds_the_spread_is_over_folds_and_the_gain_is_paired():
    # fold 1's test set is hard for both arms: unpaired, the spreads overlap; paired, the arm is ahead on every fold
    scratch = choose({1e-3: [(0.5, 0.40, 0), (0.5, 0.42, 0), (0.5, 0.20, 1), (0.5, 0.22, 1), (0.5, 0.31, 2)]}, "max")
    assert scratch.per_fold == pytest.approx({0: 0.41, 1: 0.21, 2: 0.31})
    assert scratch.mean == pytest.approx(statistics.mean([0.41, 0.21, 0.31]))
    assert scratch.std == pytest.approx(statistics.stdev([0.41, 0.21, 0.31]))  # over folds, not runs
    arm = choose({3e-4: [(0.6, 0.45, 0), (0.6, 0.24, 1), (0.6, 0.33, 2)]}, "max")
    mean, std, ahead, total = paired_gain(arm, scratch)
    assert mean == pytest.approx(statistics.mean([0.04, 0.03, 0.02]))
    assert std == pytest.approx(statistics.stdev([0.04, 0.03, 0.02]))
    assert (ahead, total) == (3, 3)
    assert arm.mean - arm.std < scratch.mean + scratch.std  # what the unpaired spreads would have said
    arm.gain = (mean, std, ahead, total)
    assert format_cell(arm) == "0.340 ± 0.105 (n=3, 3 folds, lr 0.0003); vs scratch +0.030 ± 0.010, ahead 3/3"
    # the terminal table: the same parts, one per line, so an 80-column terminal does not wrap them mid-phrase
    assert format_cell(arm, lines=True).split("\n") == [
        "0.340 ± 0.105", "(n=3, 3 folds, lr 0.0003)", "vs scratch +0.030 ± 0.010, ahead 3/3"]
    assert max(len(line) for line in format_cell(arm, lines=True).split("\n")) < 40
    one_fold = choose({1e-3: [(0.5, 0.4, 0), (0.5, 0.5, 0)]}, "max")
    assert one_fold.per_fold == {} and paired_gain(one_fold, scratch) is None


def test_without_folds_a_gain_counts_only_past_the_larger_seed_spread():
    # the fixed-split rule of the README and `tasks.search`, on seed 9's STS and seed 10's NLI and NER
    rows = [
        Row("scratch", "scratch", 0.0, 0, 0, {"nli": Cell(0.349, 0.010, 3, 3e-4, 0.378), "ner": Cell(0.705, 0.007, 3, 1e-3, 0.7), "sts": Cell(0.252, 0.032, 3, 3e-4, 0.374)}),
        Row("step 4631", "budget", 60.0, 4631, 1, {"nli": Cell(0.368, 0.012, 3, 3e-4, 0.42), "ner": Cell(0.765, 0.003, 3, 1e-3, 0.77), "sts": Cell(0.222, 0.024, 3, 3e-4, 0.459)}),
        Row("step 100", "budget", 1.0, 100, 1, {"nli": Cell(0.320, 0.005, 3, 3e-4, 0.3), "ner": Cell(0.8, None, 1, 1e-3, 0.8)}),
    ]  # fmt: skip
    set_gains(rows)
    assert rows[0].cells["nli"].versus is None  # scratch is not set against itself
    assert format_cell(rows[1].cells["nli"]) == (
        "0.368 ± 0.012 (n=3, lr 0.0003); vs scratch +0.019; beyond the spread (0.012)")
    assert format_cell(rows[1].cells["sts"]).endswith("vs scratch -0.030; within the spread (0.032)")
    assert format_cell(rows[1].cells["ner"]).endswith("vs scratch +0.060; beyond the spread (0.007)")
    assert format_cell(rows[2].cells["nli"]).endswith("vs scratch -0.029; worse beyond the spread (0.010)")
    assert rows[2].cells["ner"].versus[2] == "beyond the spread"  # one arm's spread is enough to judge by
    one = [Row("scratch", "scratch", 0.0, 0, 0, {"ner": Cell(0.5, None, 1, 1e-3, 0.5)}), Row("a", "budget", 1.0, 1, 1, {"ner": Cell(0.9, None, 1, 1e-3, 0.9)})]
    set_gains(one)
    assert format_cell(one[1].cells["ner"]).endswith("vs scratch +0.400; one seed each: no spread")
    assert max(len(line) for line in format_cell(rows[2].cells["nli"], lines=True).split("\n")) < 40


def test_study_md_has_one_row_per_arm():
    rows = [
        Row("scratch", "scratch", 0.0, 0, 0, {"ner": Cell(0.5, 0.01, 3, 1e-3, 0.52)}),
        Row("step 1000", "budget", 9.5, 1000, 3_200_000, {"ner": Cell(0.6123, None, 1, 3e-4, 0.6)}),
        Row("hf:klue", "hf", None, None, None, {}),
    ]
    text = format_markdown(rows, ["ner", "nli"], {"pretraining run": "`abc`"})
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| arm | minutes | steps | tokens | ner test/entity_f1_macro | nli test/accuracy |"
    assert len(table) == 2 + len(rows)
    assert table[2] == "| scratch | 0.0 | 0 | 0 | 0.500 ± 0.010 (n=3, lr 0.001) | – |"
    assert table[3] == "| step 1000 | 9.5 | 1,000 | 3.2M | 0.612 (n=1, lr 0.0003) | – |"
    assert table[4] == "| hf:klue | – | – | – | – | – |"
    assert "- pretraining run: `abc`" in text and "sample std" in text


def test_the_parent_run_carries_the_table_as_metrics_at_each_arms_step():
    folds = {0: 0.5, 1: 0.6}
    rows = [
        Row("scratch", "scratch", 0.0, 0, 0, {"ner": Cell(0.5, 0.01, 3, 1e-3, 0.52), "sts": Cell(0.2, 0.1, 2, 1e-3, 0.3, dict(folds))}),
        Row("step 1000", "budget", 9.5, 1000, 3_200_000, {"ner": Cell(0.6, None, 1, 3e-4, 0.61)}),
        Row("step 2000", "budget", 19.0, 2000, 6_400_000, {"sts": Cell(0.4, 0.05, 2, 1e-3, 0.45, {0: 0.7, 1: 0.6})}),
        Row("hf:klue", "hf", None, None, None, {"ner": Cell(0.9, 0.0, 3, 1e-3, 0.9)}),
    ]
    rows[2].cells["sts"].gain = paired_gain(rows[2].cells["sts"], rows[0].cells["sts"])  # as tabulate sets it
    got = {(key, step): value for key, value, step in study_metrics(rows, ["ner", "sts"])}
    assert got == pytest.approx({
        ("ner/test", 0): 0.5, ("ner/val", 0): 0.52, ("ner/test_std", 0): 0.01, ("ner/gain", 0): 0.0,
        ("sts/test", 0): 0.2, ("sts/val", 0): 0.3, ("sts/test_std", 0): 0.1, ("sts/gain", 0): 0.0,
        ("ner/test", 1000): 0.6, ("ner/val", 1000): 0.61, ("ner/gain", 1000): 0.1,  # one seed: no std
        ("sts/test", 2000): 0.4, ("sts/val", 2000): 0.45, ("sts/test_std", 2000): 0.05,
        ("sts/gain", 2000): 0.1,  # paired over folds: (0.7 - 0.5 + 0.6 - 0.6) / 2
    })  # the hf: row has no step: study.md only


def test_the_description_is_the_table_cut_at_a_line_when_too_long_for_a_tag():
    text = "# Study\n" + "".join(f"| row {i} | 0.5 |\n" for i in range(1000))
    assert description("# Study\n\n- seeds: 0\n\n| arm |\n|---|\n") == "| arm |\n|---|\n\n- seeds: 0\n"
    cut = description(text)
    assert len(cut) <= 8000 and cut.startswith("| row 0 |") and cut.endswith("the artifact study.md)\n")
    assert all(line.endswith("|") for line in cut.splitlines()[:-2])  # whole lines only


def test_a_resumed_study_logs_no_metric_twice(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("study")).info.run_id
    rows = [Row("scratch", "scratch", 0.0, 0, 0, {"ner": Cell(0.5, 0.01, 3, 1e-3, 0.52)}),
            Row("step 1000", "budget", 9.5, 1000, 1, {"ner": Cell(0.6, 0.02, 3, 1e-3, 0.6)})]  # fmt: skip
    log_to_parent(client, run_id, "# Study\n\n| table |\n", rows, ["ner"])
    log_to_parent(client, run_id, "# Study\n\n| table |\n", rows, ["ner"])
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "ner/test")] == [(0, 0.5), (1000, 0.6)]
    rows[1].cells["ner"] = Cell(0.7, 0.02, 3, 1e-3, 0.6)  # a run more at that step moved the cell: logged
    log_to_parent(client, run_id, "# Study\n\n| table 2 |\n", rows, ["ner"])
    history = client.get_metric_history(run_id, "ner/test")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1000, 0.6), (1000, 0.7)]
    assert client.get_run(run_id).data.metrics["ner/test"] == 0.7  # the UI's latest value
    assert client.get_run(run_id).data.tags["mlflow.note.content"] == "| table 2 |\n"


def test_arguments():
    args = parse_args(["0123", "tasks=ner", "seeds=3", "lrs=1e-3,3e-4", 'extra_args=debug=fdr "trainer.max_epochs=2"'])
    assert args.seeds == [0, 1, 2] and args.lrs == [1e-3, 3e-4] and args.tasks == ["ner"]
    assert args.extra_args == ["debug=fdr", "trainer.max_epochs=2"] and args.budgets is None
    assert parse_args(["0123", "seeds=7,9", "budgets=10,20"]).seeds == [7, 9]
    assert args.folds == 1 and parse_args(["0123", "folds=5"]).folds == 5
    with pytest.raises(SystemExit):
        parse_args(["0123", "folds=0"])
    with pytest.raises(SystemExit):
        parse_args(["0123", "epochs=3"])
    with pytest.raises(SystemExit):
        parse_args(["0123", "tasks=no_such_task"])


def test_budget_clock_carries_over_a_resume():
    first = BudgetCheckpoints("unused", at_steps=[5], every_minutes=10)
    first._minutes_before = 23.0  # as if 23 minutes had been trained
    state = first.state_dict()
    resumed = BudgetCheckpoints("unused", at_steps=[5], every_minutes=10)
    resumed.load_state_dict(state)
    assert 23.0 <= resumed.minutes() < 23.1
    assert resumed._next_minutes == 30.0  # the next multiple, not 10 again
    with pytest.raises(ValueError, match="positive"):
        BudgetCheckpoints("unused", at_steps=[0])


def hf_folder(tokenizer_dir: Path, out: Path) -> Path:
    """A transformers-saved random BERT over the pretraining run's tokenizer (an `hf:` arm)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    transformers.BertForPreTraining(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.mark.slow
def test_study_end_to_end_and_resume(tmp_path):
    workdir, cache = tmp_path / "w", tmp_path / "cache"
    workdir.mkdir()
    pre = ["data=petition_small", "debug=fdr", "keep_checkpoints_at_steps=[1,2]", "budget_at_end=false"]
    check(run_cli("run.py", pre, workdir, cache))
    (run,) = runs_of(workdir)
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    folder = hf_folder(artifacts / "tokenizer", tmp_path / "hf-tiny")
    extra = f"debug=fdr paths.mlruns_dir={workdir}/mlruns paths.cache_dir={cache} paths.checkpoint_dir={workdir}/ck"
    cmd = [sys.executable, "-m", "tasks.study", run.info.run_id, "tasks=ner", "seeds=1", "lrs=1e-3",
           f"arms=hf:{folder}", f"extra_args={extra}", f"out_dir={tmp_path / 'study'}"]  # fmt: skip
    # stopped (SIGTERM) once its first fine-tuning run is under way: the run ends KILLED, no process goes on
    # training, the parent is KILLED rather than RUNNING for ever, and the same command resumes it (below)
    stopped = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(600):
        if any(r.info.status == "RUNNING" and r.data.tags.get("study_key") for r in runs_of(workdir, "study")):
            break
        time.sleep(0.2)
    stopped.terminate()
    said = stopped.communicate(timeout=180)[0]
    assert stopped.returncode == 130 and "study stopped" in said, said[-3000:]
    assert {r.info.status for r in runs_of(workdir, "study")} <= {"KILLED", "FINISHED"}, said[-3000:]
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline")
                if str(tmp_path / "study") in p.read_bytes().decode(errors="replace")]  # fmt: skip

    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    check(first)
    assert "(resumed)" in first.stdout and re.search(r"launched (\d), reused (\d), failed 0", first.stdout)
    launched, reused = map(int, re.search(r"launched (\d), reused (\d)", first.stdout).groups())
    assert launched + reused == 4 and launched >= 3, first.stdout[-3000:]  # the stopped run made again
    job_lines = [line for line in first.stdout.splitlines() if line.startswith("[") and "s, run " in line]
    assert len(job_lines) == launched and sum("to go, about" in line for line in job_lines) == launched - 1

    client = client_for(workdir)
    (parent,) = [r for r in runs_of(workdir, "study") if r.data.tags.get("study_parent") == "true"]
    children = [r for r in runs_of(workdir, "study") if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.status for r in children) == ["FINISHED"] * 4 + ["KILLED"] * (launched - 3)
    children = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["study_arm"] for r in children) == ["hf:hf-tiny", "scratch", "step 1", "step 2"]
    assert all("test/entity_f1_macro" in r.data.metrics for r in children)
    assert parent.info.status == "FINISHED"
    parent_artifacts = Path(parent.info.artifact_uri.removeprefix("file://"))
    for name in ("study.md", "study.png", "study.json"):
        assert (parent_artifacts / name).is_file(), name
    table = [line for line in (parent_artifacts / "study.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["scratch", "step 1", "step 2", "hf:hf-tiny"]
    assert "entity_f1_macro" in first.stdout  # the table printed in the terminal
    pretrained = next(r for r in children if r.data.tags["study_arm"] == "step 2")
    assert pretrained.data.tags["pretrained_ckpt"].endswith("budget-step2.ckpt")
    assert client.get_run(parent.info.run_id).info.run_id == parent.info.run_id
    parent_run = client.get_run(parent.info.run_id)  # the Overview page: the table and the curve's metrics
    assert parent_run.data.tags["mlflow.note.content"] == description((parent_artifacts / "study.md").read_text())
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "ner/test")] == [0, 1, 2]

    cmd[3] = run.info.run_id[:8]  # a unique prefix names the same run, so the same study resumes
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    check(again)
    assert "launched 0, reused 4, failed 0" in again.stdout, again.stdout[-3000:]
    assert f"parent run {parent.info.run_id}" in again.stdout  # the same study tree
    assert len([r for r in runs_of(workdir, "study") if r.data.tags.get("study_parent") == "true"]) == 1


def test_scratch_arm_is_keyed_by_shape_and_tokenizer_not_by_run(mirror, tmp_path):
    """Two studies of same-shaped runs (a 30- and a 60-minute recipe) share one scratch arm; another shape or
    tokenizer is another arm. Pretraining dropout is not part of a random init."""
    import torch

    from tasks.study import scratch_identity
    from tests.tiny_encoder import make_pretrain_checkpoint, make_tokenizer

    tok_a = make_tokenizer(mirror, tmp_path / "tok_a")  # 600 asked: the alphabet alone (1,676 pieces)
    tok_b = make_tokenizer(mirror, tmp_path / "tok_b", 2500)  # a different vocabulary (merges too)
    one = make_pretrain_checkpoint(tok_a, tmp_path / "one.ckpt", seed=0)
    other_run = make_pretrain_checkpoint(tok_a, tmp_path / "two.ckpt", seed=1)
    ckpt = torch.load(other_run, weights_only=True)
    ckpt["hyper_parameters"]["model_config"]["hidden_dropout_prob"] = 0.0
    ckpt["mlflow_run_id"] = "another-run"
    torch.save(ckpt, other_run)
    other_tokenizer = make_pretrain_checkpoint(tok_b, tmp_path / "three.ckpt")
    assert scratch_identity(one) == scratch_identity(other_run)
    assert scratch_identity(one) != scratch_identity(other_tokenizer)
    ckpt["hyper_parameters"]["model_config"]["num_hidden_layers"] = 3
    torch.save(ckpt, tmp_path / "deeper.ckpt")
    assert scratch_identity(one) != scratch_identity(tmp_path / "deeper.ckpt")


def test_budgets_none_means_scratch_and_hf_arms_only():
    assert parse_args(["abc", "budgets=none"]).budgets == []
    assert parse_args(["abc"]).budgets is None and parse_args(["abc", "budgets=5,7"]).budgets == [5, 7]


def test_search_gains_are_against_the_same_studys_scratch():
    from tasks.search import gains, table

    def cell(mean, std, val):
        return {"mean": mean, "std": std, "n": 3, "lr": 1e-3, "val": val}

    study = {"rows": [
        {"arm": "scratch", "kind": "scratch", "cells": {"ner": cell(0.60, 0.01, 0.62), "sts": cell(0.10, 0.05, 0.1)}},
        {"arm": "step 900", "kind": "budget", "cells": {"ner": cell(0.70, 0.02, 0.71), "sts": cell(0.12, 0.01, 0.0)}},
    ]}  # fmt: skip
    (row,) = gains(study, ["ner", "sts"])
    assert row["tasks"]["ner"]["val_gain"] == pytest.approx(0.09)
    assert row["tasks"]["ner"]["beats"] and not row["tasks"]["sts"]["beats"]  # +0.02 is within the 0.05 spread
    assert row["mean_val_gain"] == pytest.approx((0.09 - 0.1) / 2)
    text = table([{**row, "label": "run · step 900", "recipe": "r"}], ["ner", "sts"])
    assert "+0.090 (test +0.100* ± 0.020)" in text and "+0.020 ± 0.050" in text
    with pytest.raises(ValueError, match="no scratch arm"):
        gains({"rows": study["rows"][1:]}, ["ner"])


def test_search_never_takes_a_fold_study_for_a_one_split_study():
    from tasks.search import _recipe_of

    one = {"recipe": ["trainer.max_epochs=6"]}
    assert _recipe_of(one) == "trainer.max_epochs=6" and _recipe_of({}) == "task defaults"
    assert _recipe_of({**one, "folds": 5}) != _recipe_of(one)  # other test sets: not the same scratch baseline
    own = {**one, "scratch_recipe": ["task.pooling=mean"]}  # scratch at its own overrides: another baseline
    assert _recipe_of(own) not in (_recipe_of(one), "trainer.max_epochs=6 task.pooling=mean")
    lpft = {**one, "pretrained_recipe": ["optim.freeze_encoder_fraction=0.33"]}  # pretrained_args=
    assert _recipe_of(lpft) != _recipe_of(one)  # its pretrained rows are another recipe ...
    assert _recipe_of(lpft, scratch=True) == _recipe_of(one)  # ... its scratch arm is the plain recipe's


def test_search_leaves_out_tasks_studied_on_older_data():
    from tasks.search import stale_tasks

    now = {"ner": None, "nli": 2, "sts": None, "topic": None}
    assert stale_tasks({"tasks": ["nli", "topic"]}, now) == ["nli"]  # a study from before data_version
    assert stale_tasks({"tasks": ["nli", "topic"], "data_versions": {"nli": 2, "topic": None}}, now) == []
    assert stale_tasks({"tasks": ["nli"], "data_versions": {"nli": 3}}, now) == ["nli"]


def test_search_never_compares_with_a_stale_scratch_row():
    from tasks.search import gains, without_tasks

    cell = {"mean": 0.5, "std": 0.01, "val": 0.5}
    scratch = {"kind": "scratch", "arm": "scratch", "cells": {"ner": cell, "topic": cell}}
    arm = {"kind": "budget", "arm": "step 10", "cells": {"ner": {**cell, "val": 0.7}, "topic": {**cell, "val": 0.6}}}
    (row,) = gains({"rows": [arm]}, ["ner", "topic"], without_tasks(scratch, ["ner"]))
    assert list(row["tasks"]) == ["topic"]  # ner's scratch was scored the old way: no ner gain at all


def test_search_measures_a_scratch_false_study_against_scratch_of_its_own_recipe():
    """`--scratch` repeated: each task of a study run with scratch=false takes the scratch arm fine-tuned with the
    same recipe (a feature or more epochs that lift scratch too must not count as pretraining's gain); knobs
    that only act on pretrained weights are ignored in the match, and a task with no match is left out."""
    from tasks.search import gains, scratch_for

    def arm(**vals):
        return {"arm": "scratch", "kind": "scratch",
                "cells": {t: {"mean": v, "std": 0.01, "val": v} for t, v in vals.items()}}  # fmt: skip

    scratch_arms = {"plain": ("trainer.max_epochs=6", arm(ner=0.68)),
                    "pos": ("trainer.max_epochs=6 task.pos_features=true", arm(ner=0.72)),
                    "sts": ("trainer.max_epochs=20", arm(sts=0.33, ner=0.1))}  # fmt: skip
    row, used = scratch_for("trainer.max_epochs=6 task.pos_features=true", ["ner", "sts"], scratch_arms)
    assert row["cells"] == {"ner": scratch_arms["pos"][1]["cells"]["ner"]} and used == ["pos"]  # no sts at 6 epochs
    row, used = scratch_for("trainer.max_epochs=6 optim.layer_decay=0.8", ["ner"], scratch_arms)
    assert row["cells"]["ner"]["val"] == 0.68 and used == ["plain"]
    study = {"rows": [{"arm": "step 9", "kind": "budget", "cells": {"ner": {"mean": 0.76, "std": 0.01, "val": 0.77}}}]}
    (gain,) = gains(study, ["ner"], scratch_for("trainer.max_epochs=6 task.pos_features=true", ["ner"], scratch_arms)[0])
    assert gain["tasks"]["ner"]["val_gain"] == pytest.approx(0.05)  # against scratch with the tag, not 0.09


def test_search_merges_one_recipe_studied_task_by_task():
    from tasks.search import merge

    def entry(task, gain):
        return {"label": "run · step 9", "recipe": "r", "tasks": {task: {"val_gain": gain}}, "mean_val_gain": gain}

    (row,) = merge([entry("ner", 0.1), entry("sts", -0.2)])
    assert set(row["tasks"]) == {"ner", "sts"} and row["mean_val_gain"] == pytest.approx(-0.05)
    assert len(merge([entry("ner", 0.1), {**entry("ner", 0.1), "recipe": "other"}])) == 2


def test_search_best_against_best_picks_each_arms_recipe_on_val():
    """A fine-tuning recipe that lifts scratch too must not count as pretraining's gain: each arm gets its own
    best recipe by val, and the test gain is taken between those two."""
    from tasks.search import best_vs_best, gains

    def cell(mean, std, val, lr=1e-3):
        return {"mean": mean, "std": std, "n": 3, "lr": lr, "val": val}

    short = {"rows": [{"arm": "scratch", "kind": "scratch", "cells": {"sts": cell(0.30, 0.02, 0.40)}},
                      {"arm": "step 9", "kind": "budget", "cells": {"sts": cell(0.10, 0.02, 0.20)}}]}  # fmt: skip
    long = {"rows": [{"arm": "scratch", "kind": "scratch", "cells": {"sts": cell(0.20, 0.01, 0.30, 3e-4)}},
                     {"arm": "step 9", "kind": "budget", "cells": {"sts": cell(0.35, 0.04, 0.50, 3e-4)}}]}  # fmt: skip
    entries = [{**gains(s, ["sts"])[0], "label": "run · step 9", "recipe": f"{r}, lrs [0.001]"}
               for s, r in ((short, "trainer.max_epochs=6"), (long, "trainer.max_epochs=20"))]  # fmt: skip
    (line,) = best_vs_best(entries, ["sts"]).splitlines()[2:]
    # pretrained at 20 epochs (val 0.50) against scratch at 6 epochs (val 0.40): +0.05 on test, beyond 0.04
    assert "trainer.max_epochs=20, lr 0.0003 → 0.500, 0.350 ± 0.040" in line
    assert "trainer.max_epochs=6, lr 0.001 → 0.400, 0.300 ± 0.020" in line
    assert "| +0.050 | yes |" in line
    long["rows"][1]["cells"]["sts"] = cell(0.28, 0.04, 0.50, 3e-4)
    entries[1] = {**gains(long, ["sts"])[0], "label": "run · step 9", "recipe": "trainer.max_epochs=20, lrs [0.001]"}
    assert "| -0.020 | no (within spread) |" in best_vs_best(entries, ["sts"])


def test_search_names_scratchs_own_recipe_not_the_pretrained_arms_overrides():
    """A study with `pretrained_args=` (LP-FT) fine-tuned scratch without them: the verdict's scratch column
    must not say it had them."""
    from tasks.search import best_vs_best, gains

    study = {"rows": [{"arm": "scratch", "kind": "scratch", "cells": {"topic": {"mean": 0.34, "std": 0.03, "n": 3,
                                                                                 "lr": 1e-3, "val": 0.36}}},
                      {"arm": "step 9", "kind": "budget", "cells": {"topic": {"mean": 0.35, "std": 0.02, "n": 3,
                                                                               "lr": 1e-3, "val": 0.35}}}]}  # fmt: skip
    entry = {**gains(study, ["topic"])[0], "label": "run · step 9", "recipe": "6 ep pretrained:lpft, lrs [0.001]",
             "scratch_recipe": "6 ep, lrs [0.001]"}  # fmt: skip
    (line,) = best_vs_best([entry], ["topic"]).splitlines()[2:]
    pretrained, scratch = line.split(" | ")[2:4]
    assert pretrained.startswith("6 ep pretrained:lpft, lr 0.001") and scratch.startswith("6 ep, lr 0.001")


def test_search_names_the_pretrained_arms_own_recipe_not_scratchs_overrides():
    """A study with `scratch_args=` (NLI: mean pooling for scratch only) fine-tuned the pretrained arm without
    them: the verdict's pretrained column must not say it had them."""
    from tasks.search import _recipe_of, best_vs_best, gains

    spec = {"recipe": ["5 ep"], "scratch_recipe": ["task.pooling=mean"], "folds": 1}
    assert _recipe_of(spec) == "5 ep scratch:task.pooling=mean"  # the study: both arms' recipes
    assert _recipe_of(spec, pretrained=True) == "5 ep" and _recipe_of(spec, scratch=True) == _recipe_of(spec)
    study = {"rows": [{"arm": "scratch", "kind": "scratch", "cells": {"nli": {"mean": 0.33, "std": 0.01, "n": 3,
                                                                               "lr": 3e-4, "val": 0.39}}},
                      {"arm": "step 9", "kind": "budget", "cells": {"nli": {"mean": 0.40, "std": 0.01, "n": 3,
                                                                             "lr": 3e-4, "val": 0.41}}}]}  # fmt: skip
    entry = {**gains(study, ["nli"])[0], "label": "run · step 9", "recipe": "5 ep scratch:task.pooling=mean, lrs x",
             "scratch_recipe": "5 ep scratch:task.pooling=mean, lrs x", "pretrained_recipe": "5 ep, lrs x"}  # fmt: skip
    (line,) = best_vs_best([entry], ["nli"]).splitlines()[2:]
    pretrained, scratch = line.split(" | ")[2:4]
    assert pretrained.startswith("5 ep, lr 0.0003") and scratch.startswith("5 ep scratch:task.pooling=mean, lr")


def test_search_pools_scratch_over_every_study_of_the_same_random_init():
    """Scratch's best recipe may have been tried only in another run's study; studies that share a scratch run
    (same shape and tokenizer) share scratch's best, and studies of another init do not."""
    from tasks.search import best_vs_best, gains, scratch_groups

    assert scratch_groups({"a": {"k1", "k2"}, "b": {"k2"}, "c": {"k3"}, "d": {"k3", "k9"}}) == {
        "a": "a", "b": "a", "c": "c", "d": "c"}  # fmt: skip

    def study(scratch_val, scratch_test, arm_val, arm_test):
        return {"rows": [{"arm": "scratch", "kind": "scratch", "cells": {"sts": {"mean": scratch_test, "std": 0.01,
                                                                                  "n": 3, "lr": 1e-3, "val": scratch_val}}},
                         {"arm": "step 9", "kind": "budget", "cells": {"sts": {"mean": arm_test, "std": 0.01, "n": 3,
                                                                                "lr": 3e-4, "val": arm_val}}}]}  # fmt: skip

    sixty = {**gains(study(0.40, 0.30, 0.50, 0.35), ["sts"])[0], "label": "sixty · step 9", "recipe": "6 ep",
             "scratch_group": "g"}  # fmt: skip
    thirty = {**gains(study(0.20, 0.10, 0.30, 0.25), ["sts"])[0], "label": "thirty · step 9", "recipe": "20 ep",
              "scratch_group": "g"}  # fmt: skip
    lines = best_vs_best([sixty, thirty], ["sts"]).splitlines()[2:]
    # thirty's own study ran scratch only at 20 epochs (val 0.20); scratch's best (6 ep, val 0.40) is the bar
    assert "| thirty · step 9 | sts |" in lines[1] and "6 ep, lr 0.001 → 0.400, 0.300" in lines[1]
    assert "| -0.050 | no, worse |" in lines[1]
    alone = best_vs_best([sixty, {**thirty, "scratch_group": "other"}], ["sts"]).splitlines()[3]
    assert "20 ep, lr 0.001 → 0.200, 0.100" in alone and "| +0.150 | yes |" in alone


def test_search_takes_study_ids_on_either_side_of_scratch_ids():
    from tasks.search import parse_args

    args = parse_args(["s1", "--scratch", "x1", "s2", "--scratch", "x2", "s3"])
    assert args.studies == ["s1", "s2", "s3"] and args.scratch == ["x1", "x2"]


def test_runs_and_studies_resolve_from_a_unique_prefix_of_their_id(tmp_path):
    from mlflow.tracking import MlflowClient

    from tasks.search import resolve_study
    from tasks.tracking import resolve_run_id

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    pre = client.create_experiment("pretrain", artifact_location=str(tmp_path / "a"))
    study = client.create_experiment("study", artifact_location=str(tmp_path / "b"))
    run = client.create_run(pre).info.run_id
    parent = client.create_run(study, tags={"study_parent": "true"}).info.run_id
    child = client.create_run(study, tags={"study_parent": parent}).info.run_id
    assert resolve_run_id(client, run) == run and resolve_run_id(client, run[:8].upper()) == run
    assert resolve_study(client, parent[:8]) == parent
    with pytest.raises(SystemExit, match="no run id starts with"):  # a fine-tuning child is not a study
        resolve_study(client, child[:8])
    with pytest.raises(LookupError, match="no run id starts with"):
        resolve_run_id(client, "0" * 31)
    with pytest.raises(LookupError, match="not a run id"):
        resolve_run_id(client, "scratch")


def test_an_ambiguous_prefix_names_the_candidates_across_pages():
    from types import SimpleNamespace

    from mlflow.exceptions import MlflowException

    from tasks.tracking import resolve_run_id

    class Pages(list):
        token = None

    def run(run_id):
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id))

    def search_runs(ids, filter_string, max_results, page_token):
        page = Pages([run("abcd" + "0" * 28), run("ffff" + "0" * 28)] if page_token is None else [run("abcd" + "1" * 28)])
        page.token = "next" if page_token is None else None
        return page

    def get_run(run_id):
        raise MlflowException("no such run")

    client = SimpleNamespace(get_run=get_run, search_runs=search_runs)
    with pytest.raises(LookupError, match="ambiguous: 2 runs"):  # the second match is on the second page
        resolve_run_id(client, "abcd", ["1"])
    assert resolve_run_id(client, "abcd1", ["1"]) == "abcd" + "1" * 28


def test_time_left_is_the_mean_run_time_times_the_runs_to_go_over_the_jobs():
    # two 11-minute runs side by side finish together: the first to report must not read as 11 minutes a run
    # of one at a time (5 to go: 55 min), but as 5 runs of 11 minutes two at a time
    assert time_left_note(660.0, 1, 6, [660.0], jobs=2) == "; 5 to go, about 28 min left"
    assert time_left_note(660.0, 2, 6, [660.0, 660.0], jobs=2) == "; 4 to go, about 22 min left"
    # no run made here (all made by another study while this one waited): the pace so far
    assert time_left_note(600.0, 2, 24) == "; 22 to go, about 1 h 50 min left"
    assert time_left_note(90.0, 3, 4) == "; 1 to go, about 30 s left"
    assert time_left_note(600.0, 24, 24) == ""


def test_two_studies_never_make_the_same_run_twice(tmp_path):
    """Two studies sharing a store (the scratch arm is shared by every study of a shape) and started side by
    side: the second waits for the first's run of a key and reuses it; if the first failed, it makes the run."""
    import threading
    import time

    from tasks.study import Arm, Job

    job = Job("ner", Arm("scratch", "scratch", (), ()), 0, 1e-3, "k" * 16)
    finished: list[str] = []
    made: list[str] = []
    heard: list[str] = []

    def study(name: str, seconds: float, succeeds: bool, out: dict) -> None:
        def make() -> int:
            made.append(name)
            time.sleep(seconds)
            if succeeds:
                finished.append(name)
            return 0 if succeeds else 1

        out[name] = run_unless_done(job, tmp_path, f"study {name}", lambda: bool(finished), make, say=heard.append)

    for first_succeeds, expected_made, expected_second in ((True, ["a"], None), (False, ["a", "b"], 0)):
        finished.clear(), made.clear(), heard.clear()
        out: dict = {}
        a = threading.Thread(target=study, args=("a", 0.6, first_succeeds, out))
        a.start()
        time.sleep(0.2)  # a holds the key now
        study("b", 0.0, True, out)
        a.join()
        assert made == expected_made and out["b"] == expected_second
        assert heard == [f"study a is making run {job.key}: waiting for it"]
    # not waiting (a study's first pass): a busy key is handed back for later, and nothing is made
    out, made[:], heard[:], finished[:] = {}, [], [], []
    a = threading.Thread(target=study, args=("a", 0.6, True, out))
    a.start()
    time.sleep(0.2)
    assert run_unless_done(job, tmp_path, "study b", lambda: False, lambda: made.append("b") or 0,
                           say=heard.append, wait=False) == BUSY  # fmt: skip
    a.join()
    assert made == ["a"] and heard == [f"study a is making run {job.key}: later"]
    # a study that is not running (died, or done) holds nothing: the key is free at once
    out = {}
    heard.clear()
    finished.clear()
    study("c", 0.0, True, out)
    assert out["c"] == 0 and heard == []


CHILD = """
import signal, sys, time
from pathlib import Path
flag = Path(sys.argv[1])
def on_term(signum, frame):
    flag.write_text("SIGTERM")
    sys.exit(143)
signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[2] == "ignore" else on_term)
flag.write_text("ready")
time.sleep(float(sys.argv[3]))
flag.write_text("ended on its own")
"""


def _start_child(children: Children, flag: Path, key: str, on_term: str, seconds: float, out: dict):
    import threading

    thread = threading.Thread(target=lambda: out.__setitem__(key, children.run(
        [sys.executable, "-c", CHILD, str(flag), on_term, str(seconds)], key)))  # fmt: skip
    thread.start()
    for _ in range(200):  # its signal handler is in place once it says ready
        if flag.exists() and flag.read_text():
            break
        time.sleep(0.05)
    return thread


def test_a_stopped_study_stops_its_runs_and_starts_no_other(tmp_path):
    """Ctrl+C or SIGTERM on a study: every run in progress gets SIGTERM (a fine-tuning run then saves and ends
    KILLED), one that ignores it is killed after the grace, one that ends by itself in the settle time is left
    to, and no run starts after."""
    children, out = Children(), {}
    flags = {name: tmp_path / name for name in ("handles", "ignores", "finishes")}
    threads = [_start_child(children, flags["handles"], "k1", "handle", 60, out),
               _start_child(children, flags["ignores"], "k2", "ignore", 60, out),
               _start_child(children, flags["finishes"], "k3", "handle", 0.5, out)]  # fmt: skip
    assert sorted(children.stop(grace=3.0, settle=2.0)) == ["k1", "k2", "k3"]
    for thread in threads:
        thread.join(timeout=10)
    assert out == {"k1": 143, "k2": -9, "k3": 0}
    assert flags["handles"].read_text() == "SIGTERM" and flags["finishes"].read_text() == "ended on its own"
    assert children.run([sys.executable, "-c", "pass"], "k4") == STOPPED and children.keys == ["k1", "k2", "k3"]


def test_a_stopped_study_does_not_wait_on_for_another_studys_run(tmp_path):
    import threading

    from tasks.study import Arm, Job

    job = Job("ner", Arm("scratch", "scratch", (), ()), 0, 1e-3, "k" * 16)
    holder = threading.Thread(target=run_unless_done, args=(job, tmp_path, "study a", lambda: False,
                                                            lambda: time.sleep(3) or 0))  # fmt: skip
    holder.start()
    time.sleep(0.3)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    began = time.monotonic()
    assert run_unless_done(job, tmp_path, "study b", lambda: False, lambda: 0, say=lambda _: None,
                           give_up=stop.is_set) == BUSY  # fmt: skip
    assert time.monotonic() - began < 2.9  # gave up at the next poll, not when a's run ended
    holder.join()


def test_a_stopped_study_leaves_no_run_running_in_mlflow(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("study")
    parent = client.create_run(experiment).info.run_id
    killed_early = client.create_run(experiment, tags={"study_key": "mine"}).info.run_id  # never said KILLED
    ended = client.create_run(experiment, tags={"study_key": "mine2"}).info.run_id
    client.set_terminated(ended, status="KILLED")  # ended on its SIGTERM: kept as it is
    other = client.create_run(experiment, tags={"study_key": "theirs"}).info.run_id  # another study's, live
    end_stopped(client, experiment, parent, ["mine", "mine2"])
    status = {run_id: client.get_run(run_id).info.status for run_id in (parent, killed_early, ended, other)}
    assert status == {parent: "KILLED", killed_early: "KILLED", ended: "KILLED", other: "RUNNING"}


def test_the_plot_says_how_the_arms_were_made_scratch_overrides_included():
    title = plot_title("6fac4d78", ["trainer.max_epochs=6", "optim.head_lr_scale=10"], ["task.pooling=mean"],
                       [0], [1e-3, 3e-4], 5, 2)  # fmt: skip
    assert title.splitlines() == [
        "pretraining run 6fac4d78; 5 folds x seed 0; lr chosen on val of 0.001, 0.0003",
        "recipe: trainer.max_epochs=6 optim.head_lr_scale=10",
        "scratch (0 min) also: task.pooling=mean",
    ]
    plain = plot_title("6fac4d78", [], [], [0, 1, 2], [1e-3], 1, 1)
    assert plain.splitlines() == ["pretraining run 6fac4d78; seeds 0, 1, 2; lr 0.001", "recipe: each task standard"]
    long = plot_title("r", [f"task.option_{i}=value" for i in range(20)], [], [0], [1e-3], 1, 1)
    assert all(len(line) <= 4.4 * 13 for line in long.splitlines()) and len(long.splitlines()) > 2


def test_every_step_label_of_the_plot_lies_inside_its_panel(tmp_path, monkeypatch):
    """Without a scratch arm the leftmost point is a budget: its label used to run over the panel's left edge."""
    import tasks.plots
    import tasks.study

    drawn = []
    real_save = tasks.plots.save_figure

    def save(fig, out_png, suptitle="", dpi=120):
        fig.tight_layout()
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            frame = ax.get_window_extent(renderer)
            for text in ax.texts:
                box = text.get_window_extent(renderer)
                drawn.append((text.get_text(), box.x0 >= frame.x0 and box.x1 <= frame.x1))
        return real_save(fig, out_png, suptitle, dpi)

    monkeypatch.setattr(tasks.plots, "save_figure", save)
    cell = lambda mean: Cell(mean=mean, std=0.01, n=3, lr=1e-3, val=mean)  # noqa: E731
    rows = [Row("step 2282 (cooldown from 1885)", "budget", 35.3, 2282, None, {"ner": cell(0.751)}),
            Row("step 4256", "budget", 60.0, 4256, None, {"ner": cell(0.752)})]  # fmt: skip
    assert tasks.study.plot(rows, ["ner"], tmp_path / "study.png", "title").exists()
    assert [text for text, _ in drawn] == ["2,282 steps (cooldown)", "4,256 steps"]
    assert all(inside for _, inside in drawn), drawn
