"""The recipe search table: each pretraining recipe's gain over scratch, per task, from finished studies.

    python -m tasks.search <study parent run id> [<study parent run id> ...] [--out search.md]

A study may be named by a unique prefix of its id, as the tables print them (8 characters).

Each study (`python -m tasks.study`) fine-tuned scratch and one or more checkpoints of a pretraining run on
the tasks, 3 seeds each, at each arm's best learning rate on validation. This prints, per checkpoint:
the **validation** gain over the scratch arm of the same study (or, for studies run with `scratch=false`, of the
study with a scratch arm and the same fine-tuning recipe, listed or given as `--scratch <study>`, repeatable) (the
number a recipe is chosen by, mean over seeds), its mean over tasks, and the **test** gain with both arms' seed spreads, flagged `*` where the gain is
larger than the larger of the two spreads. Rows are sorted by mean validation gain: the recipes that lost
stay in the table. A second table, the verdict, sets each checkpoint at its best fine-tuning recipe against
scratch at *its* best (both chosen on val), so that more epochs or another lr that help scratch as much are
not credited to pretraining.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.study import ALL_TASKS, against_scratch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("BERT_PROJECT_ROOT", str(ROOT))


def gains(study: Mapping[str, Any], tasks: Sequence[str], scratch: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows of one study.json: every non-scratch arm against that study's scratch arm (or `scratch`, a row of
    another study, for pretrained-only fine-tuning knobs such as layer_decay or reinit_layers)."""
    rows = study["rows"]
    scratch = next((r for r in rows if r["kind"] == "scratch"), scratch)
    if scratch is None:
        raise ValueError("the study has no scratch arm: gains need one")
    out = []
    for row in rows:
        if row["kind"] == "scratch":
            continue
        per_task = {}
        for task in tasks:
            arm, base = row["cells"].get(task), scratch["cells"].get(task)
            if not arm or not base:
                continue
            test_gain, spread, verdict = against_scratch(arm["mean"], arm["std"], base["mean"], base["std"])
            per_task[task] = {"val_gain": arm["val"] - base["val"], "test_gain": test_gain, "spread": spread,
                              "beats": verdict == "beyond the spread", "test": arm["mean"], "test_std": arm["std"],
                              "scratch": base["mean"], "scratch_std": base["std"], "val": arm["val"],
                              "scratch_val": base["val"], "lr": arm.get("lr"), "scratch_lr": base.get("lr")}  # fmt: skip
        vals = [c["val_gain"] for c in per_task.values()]
        out.append({"arm": row["arm"], "minutes": row.get("minutes"), "steps": row.get("steps"), "tasks": per_task,
                    "mean_val_gain": sum(vals) / len(vals) if vals else float("nan")})  # fmt: skip
    return out


def merge(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (checkpoint, fine-tuning recipe): studies of the same checkpoint and recipe on different
    tasks (e.g. NER in one command, STS in another) are one recipe; the mean is over all their tasks."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in entries:
        row = merged.setdefault((entry["label"], entry["recipe"]), {**entry, "tasks": {}})
        row["tasks"].update(entry["tasks"])
    for row in merged.values():
        vals = [c["val_gain"] for c in row["tasks"].values()]
        row["mean_val_gain"] = sum(vals) / len(vals) if vals else float("nan")
    return list(merged.values())


def scratch_groups(scratch_keys: Mapping[str, set[str]]) -> dict[str, str]:
    """study -> the first study of its group; studies that share a scratch run (same shape, tokenizer, task
    data, recipe and lr give the same run key) fine-tune the same random init, and so share scratch's best."""
    parent = {s: s for s in scratch_keys}

    def root(s: str) -> str:
        while parent[s] != s:
            s = parent[s]
        return s

    owner: dict[str, str] = {}
    for study, keys in scratch_keys.items():
        for key in keys:
            if key in owner:
                parent[root(study)] = root(owner[key])
            else:
                owner[key] = study
    return {s: root(s) for s in scratch_keys}


def resolve_study(client, ref: str) -> str:
    """The parent run id of a study from its id or a unique prefix (the tables print 8 characters)."""
    from tasks.study import EXPERIMENT
    from tasks.tracking import resolve_run_id

    exp = client.get_experiment_by_name(EXPERIMENT)
    try:
        return resolve_run_id(client, ref, [exp.experiment_id] if exp else [], "tags.study_parent = 'true'")
    except LookupError as err:
        raise SystemExit(f"study {ref}: {err} among the studies of the MLflow store {client.tracking_uri}") from None


def load_study(client, parent_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(study.json, study_spec.json) of a study parent run."""
    with tempfile.TemporaryDirectory() as tmp:
        study = json.loads(Path(client.download_artifacts(parent_id, "study.json", tmp)).read_text())
        spec = json.loads(Path(client.download_artifacts(parent_id, "study_spec.json", tmp)).read_text())
    return study, spec


def stale_tasks(spec: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Tasks of a study made on other data than the task configs now name (`task.data_version`; a study from
    before the key existed counts as None): their numbers no longer describe the task."""
    made = spec.get("data_versions") or {}
    return [t for t in spec["tasks"] if made.get(t) != current.get(t)]


def without_tasks(row: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """A study row with the cells of `tasks` removed (e.g. a scratch row measured on an older data_version)."""
    return {**row, "cells": {t: c for t, c in row["cells"].items() if t not in tasks}}


def table(entries: Sequence[dict[str, Any]], tasks: Sequence[str]) -> str:
    head = "| pretraining run · checkpoint | fine-tuning recipe | " + " | ".join(tasks) + " | mean val gain |"
    lines = [head, "|---|---|" + "---|" * len(tasks) + "---:|"]
    for e in sorted((e for e in entries if e["tasks"]), key=lambda e: -e["mean_val_gain"]):
        cells = []
        for task in tasks:
            c = e["tasks"].get(task)
            if c is None:
                cells.append("–")
                continue
            mark = "*" if c["beats"] else ""
            cells.append(f"{c['val_gain']:+.3f} (test {c['test_gain']:+.3f}{mark} ± {c['spread']:.3f})")
        lines.append(f"| {e['label']} | {e['recipe']} | " + " | ".join(cells) + f" | {e['mean_val_gain']:+.3f} |")
    return "\n".join(lines)


def best_vs_best(entries: Sequence[dict[str, Any]], tasks: Sequence[str]) -> str:
    """Per checkpoint and task: the pretrained arm at its best fine-tuning recipe against scratch at *its* best,
    both chosen on val. A recipe that helps scratch too (more epochs, another lr) must not count as a
    pretraining gain, so this, not a row of the search table, is the verdict. Scratch's best is taken over
    every study of the same random init (`scratch_group`), so a run studied with fewer recipes is not
    measured against a weaker bar."""
    lines = ["| pretraining run · checkpoint | task | pretrained: recipe, lr → val, test | "
             "scratch: recipe, lr → val, test | test gain | > larger spread? |", "|---|---|---|---|---:|---|"]
    for label in dict.fromkeys(e["label"] for e in entries):
        mine = [e for e in entries if e["label"] == label]
        group = mine[0].get("scratch_group", label)
        same_init = [e for e in entries if e.get("scratch_group", e["label"]) == group]
        for task in tasks:
            cells = [(e.get("pretrained_recipe", e["recipe"]), e["tasks"][task]) for e in mine if task in e["tasks"]]
            if not cells:
                continue
            arm_recipe, arm = max(cells, key=lambda rc: rc[1]["val"])
            # scratch at its best over every recipe any study of this random init tried, not only this run's
            # and under scratch's own recipe label: the pretrained arms' overrides (LP-FT ...) never reached it
            pool = [(e.get("scratch_recipe", e["recipe"]), e["tasks"][task]) for e in same_init if task in e["tasks"]]
            base_recipe, base = max(pool, key=lambda rc: rc[1]["scratch_val"])
            gain, _, verdict = against_scratch(arm["test"], arm["test_std"], base["scratch"], base["scratch_std"])
            verdict = {"beyond the spread": "yes", "worse beyond the spread": "no, worse",
                       "within the spread": "no (within spread)"}.get(verdict, f"no ({verdict})")  # fmt: skip
            lines.append(
                f"| {label} | {task} | {_recipe(arm_recipe)}, lr {arm['lr']:g} → {arm['val']:.3f}, "
                f"{arm['test']:.3f} ± {arm['test_std'] or 0.0:.3f} | {_recipe(base_recipe)}, lr {base['scratch_lr']:g} → "
                f"{base['scratch_val']:.3f}, {base['scratch']:.3f} ± {base['scratch_std'] or 0.0:.3f} | {gain:+.3f} | {verdict} |"
            )
    return "\n".join(lines)


def scratch_for(
    recipe: str, tasks: Sequence[str], scratch_arms: Mapping[str, tuple[str, Mapping[str, Any]]]
) -> tuple[dict[str, Any], list[str]]:
    """The scratch row a study run with scratch=false is measured against: task by task, the scratch arm of a
    `--scratch` study with the same fine-tuning recipe, apart from knobs that only act on pretrained weights
    (PRETRAINED_ONLY): a gain must not come from another recipe (more epochs, or a feature such as
    task.pos_features, would be credited to pretraining). Returns it and the studies used;
    tasks with no such study are absent from its cells."""
    cells, used = {}, []
    for task in tasks:
        for sid, (their_recipe, arm) in scratch_arms.items():
            if _shared_part(their_recipe) == _shared_part(recipe) and task in arm["cells"]:
                cells[task] = arm["cells"][task]
                used += [sid] if sid not in used else []
                break
    return {"arm": "scratch", "kind": "scratch", "cells": cells}, used


# knobs that act on pretrained weights only: a study of them is measured against scratch without them
PRETRAINED_ONLY = ("optim.layer_decay=", "reinit_layers=", "optim.freeze_encoder_fraction=", "optim.anchor_decay=")


def _shared_part(recipe: str) -> str:
    return " ".join(w for w in recipe.split() if not w.startswith(PRETRAINED_ONLY))


def _recipe_of(spec: Mapping[str, Any], scratch: bool = False, pretrained: bool = False) -> str:
    """A fold study's cells average other test sets than a one-split study's: its recipe says so, so the two
    never stand in for each other's scratch arm. `scratch=True`: the recipe its scratch arm was made with (the
    pretrained arms' own overrides, `pretrained_args=`, never reach it); `pretrained=True`: the pretrained
    arms' (scratch's own overrides, `scratch_args=`, never reach them)."""
    recipe = " ".join(spec.get("recipe") or []) or "task defaults"
    if spec.get("pretrained_recipe") and not scratch:
        recipe += " pretrained:" + " ".join(spec["pretrained_recipe"])
    if spec.get("scratch_recipe") and not pretrained:  # scratch at its own overrides: not the plain recipe's scratch
        recipe += " scratch:" + " ".join(spec["scratch_recipe"])
    return f"{recipe} folds={spec['folds']}" if spec.get("folds", 1) > 1 else recipe


def _scratch_keys(study: Mapping[str, Any]) -> set[str]:
    return {r["key"] for r in study.get("runs", []) if (r.get("tags") or {}).get("study_arm") == "scratch"}


def _serve_as_scratch(
    sid: str,
    study: Mapping[str, Any],
    spec: Mapping[str, Any],
    versions: Mapping[str, Any],
    scratch_arms: dict[str, tuple[str, Mapping[str, Any]]],
    scratch_keys: dict[str, set[str]],
) -> bool:
    """Record a study's scratch arm (less the tasks made on older data) for the scratch=false studies of its
    recipe; False when the study has none."""
    arm = next((r for r in study["rows"] if r["kind"] == "scratch"), None)
    if arm is None:
        return False
    scratch_arms[sid] = (_recipe_of(spec, scratch=True), without_tasks(arm, stale_tasks(spec, versions)))
    scratch_keys[sid] = _scratch_keys(study)
    return True


def _recipe(recipe: str) -> str:
    """The overrides of a recipe label, without the lr grid (the chosen lr is its own column)."""
    return recipe.rsplit(", lrs ", 1)[0]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Study ids may come before, between or after `--scratch` ones (argparse's plain parse stops at the
    first option after a positional list)."""
    parser = argparse.ArgumentParser(prog="python -m tasks.search", description=__doc__.split("\n")[0])
    parser.add_argument("studies", nargs="+", help="study parent run ids, or unique prefixes (experiment 'study')")
    parser.add_argument("--out", help="also write the table to this markdown file")
    parser.add_argument("--scratch", action="append", default=[],
                        help="a study whose scratch arm serves studies run with scratch=false (repeat it: each "
                             "such study, task by task, takes the one with its own fine-tuning recipe)")  # fmt: skip
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)

    from hydra import compose, initialize_config_dir
    from mlflow.tracking import MlflowClient

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        uri = compose("finetune").logger.tracking_uri
        versions = {t: compose("finetune", [f"task={t}"]).task.get("data_version") for t in ALL_TASKS}
    client = MlflowClient(uri)
    args.scratch = [resolve_study(client, ref) for ref in args.scratch]
    args.studies = list(dict.fromkeys(resolve_study(client, ref) for ref in args.studies))
    entries, tasks, scratch_keys, scratch_arms = [], [], {}, {}
    for sid in args.scratch:
        scratch_study, scratch_spec = load_study(client, sid)
        if not _serve_as_scratch(sid, scratch_study, scratch_spec, versions, scratch_arms, scratch_keys):
            raise SystemExit(f"--scratch {sid}: that study has no scratch arm (it was run with scratch=false)")
        stale = stale_tasks(scratch_spec, versions)  # a scratch arm scored another way compares with nothing now
        if stale:
            print(f"scratch study {sid[:8]}: left out {', '.join(stale)}: made on older data "
                  "(task.data_version changed)")  # fmt: skip
    loaded = {parent: load_study(client, parent) for parent in args.studies}
    for parent, (study, spec) in loaded.items():  # a listed study with a scratch arm serves the others too
        if parent not in scratch_arms:
            _serve_as_scratch(parent, study, spec, versions, scratch_arms, scratch_keys)
    for parent, (study, spec) in loaded.items():
        stale = stale_tasks(spec, versions)
        if stale:
            print(f"study {parent[:8]}: left out {', '.join(stale)}: made on older data (task.data_version changed)")
            spec = {**spec, "tasks": [t for t in spec["tasks"] if t not in stale]}
        fallback, used = None, []
        if not any(r["kind"] == "scratch" for r in study["rows"]):
            fallback, used = scratch_for(_recipe_of(spec, scratch=True), spec["tasks"], scratch_arms)
            missing = [t for t in spec["tasks"] if t not in fallback["cells"]]
            if missing:
                print(f"study {parent[:8]} (scratch=false): left out {', '.join(missing)}: no --scratch study of "
                      f"that task with its recipe '{_recipe_of(spec, scratch=True)}'")  # fmt: skip
                spec = {**spec, "tasks": [t for t in spec["tasks"] if t not in missing]}
        # a study run with scratch=false belongs to the group of the scratch studies it is compared with;
        # one run's studies share one random init
        scratch_keys[parent] = (_scratch_keys(study) or set().union(*(scratch_keys[u] for u in used))) | {
            f"pretrain_run:{spec['pretrain_run']}"}  # fmt: skip
        if not spec["tasks"]:
            continue
        tasks += [t for t in spec["tasks"] if t not in tasks]
        name = client.get_run(spec["pretrain_run"]).data.tags.get("mlflow.runName", spec["pretrain_run"][:8])
        recipe = _recipe_of(spec)
        for entry in gains(study, spec["tasks"], fallback):
            entries.append({**entry, "label": f"{name} · {entry['arm']}", "recipe": f"{recipe}, lrs {spec['lrs']}",
                            "scratch_recipe": f"{_recipe_of(spec, scratch=True)}, lrs {spec['lrs']}",
                            "pretrained_recipe": f"{_recipe_of(spec, pretrained=True)}, lrs {spec['lrs']}",
                            "study": parent})  # fmt: skip
    groups = scratch_groups(scratch_keys)
    entries = merge([{**e, "scratch_group": groups[e.pop("study")]} for e in entries])
    text = (
        "Validation gain over scratch, mean over seeds, at each arm's best lr (test gain; ± = the larger seed "
        "std of the two arms; * = test gain larger than that)\n\n" + table(entries, tasks) + "\n\n"
        "Best against best: each arm at the fine-tuning recipe and lr with its best mean val, test mean ± std over "
        "seeds\n\n" + best_vs_best(entries, tasks)
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
