"""`python -m tasks.probe`: frozen-encoder features and the logistic-regression probe on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

from bert.model import BertConfig, BertModel
from datamodules.sentence import collate_sentences
from tasks.probe import C_GRID, fit_probe, pooled_layers, probe, table, track
from tests.tiny_encoder import TINY, make_pretrain_checkpoint, make_tokenizer


def test_pooled_layers_are_the_masked_mean_of_each_unpadded_sequence():
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **TINY))
    items = [{"input_ids": torch.tensor(ids), "token_type_ids": torch.zeros(len(ids), dtype=torch.long),
              "labels": torch.tensor(0)} for ids in ([2, 7, 9, 3], [2, 11, 3], [2, 5, 6, 8, 12, 3])]  # fmt: skip
    layers = pooled_layers(bert, [collate_sentences(items)])
    assert len(layers) == TINY["num_hidden_layers"] + 1 and all(x.shape == (3, TINY["hidden_size"]) for x in layers)
    bert.eval()
    with torch.no_grad():
        for i, item in enumerate(items):
            hidden, _ = bert(item["input_ids"][None])  # alone: no padding at all
            torch.testing.assert_close(layers[-1][i], hidden[0].mean(0), atol=1e-5, rtol=1e-4)
            emb = bert.embeddings(item["input_ids"][None], item["token_type_ids"][None])
            torch.testing.assert_close(layers[0][i], emb[0].mean(0), atol=1e-5, rtol=1e-4)


def test_probe_chooses_c_by_val_as_scikit_learn_scores_it():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8))
    data = {}
    for split, n in (("train", 120), ("val", 60), ("test", 60)):
        y = rng.integers(0, 3, n)
        data[split] = (centers[y] * 0.6 + rng.normal(size=(n, 8)), y)
    x = {k: v[0] for k, v in data.items()}
    y = {k: v[1] for k, v in data.items()}
    fit = fit_probe(x, y, 3, "f1_macro")
    scaler = StandardScaler().fit(x["train"])
    val_f1 = {}
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(x["train"]), y["train"])
        val_f1[c] = f1_score(y["val"], model.predict(scaler.transform(x["val"])), average="macro")
        if c == fit["C"]:
            test_f1 = f1_score(y["test"], model.predict(scaler.transform(x["test"])), average="macro")
    assert fit["C"] == max(C_GRID, key=lambda c: (val_f1[c], -C_GRID.index(c)))
    assert fit["val"]["f1_macro"] == pytest.approx(val_f1[fit["C"]])
    assert fit["test"]["f1_macro"] == pytest.approx(test_f1)
    assert 0.5 < fit["test"]["f1_macro"] < 1.0  # informative but not trivial: the grid matters


def test_probe_rows_over_folds_for_scratch_and_a_checkpoint(tmp_path, mirror):
    tokenizer_dir = make_tokenizer(mirror, tmp_path / "tokenizer")
    ckpt = make_pretrain_checkpoint(tokenizer_dir, tmp_path / "pretrain.ckpt", seed=1)
    rows = probe([str(ckpt)], task="topic", folds=2)
    assert [(r["encoder"], r["fold"]) for r in rows] == [
        ("scratch", 0), (str(ckpt), 0), ("scratch", 1), (str(ckpt), 1)
    ]
    # the two folds test different petitions, so their train counts differ; 17 classes in each
    assert rows[0]["train_counts"] != rows[2]["train_counts"] and len(rows[0]["per_class"]) == 17
    assert all(0.0 <= r["test"] <= 1.0 and r["C"] in C_GRID for r in rows)
    text = table(rows)
    assert "| scratch | 2 |" in text and "(n=2)" in text

    # tracked: a parent run with the table, the plot and every probe; a nested run per encoder, metrics by layer
    import argparse
    import json

    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    args = argparse.Namespace(task="topic", folds=2, layers="last", balanced=False, rare=4, seed=0,
                              encoders=[str(ckpt)], overrides=[f"paths.mlruns_dir={store}", f"paths.root_dir={tmp_path}"])  # fmt: skip
    parent, out_dir = track(rows, args, "python -m tasks.probe x")
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("probe").experiment_id])
    children = {r.data.tags["probe_encoder"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert set(children) == {"scratch", str(ckpt)} and len(runs) == 3
    summary = {g["encoder"]: g for g in json.loads((out_dir / "probe.json").read_text())["summary"]}
    for name, run in children.items():
        (point,) = client.get_metric_history(run.info.run_id, "test/f1_macro")
        mean = sum(r["test"] for r in rows if r["encoder"] == name) / 2
        assert point.step == TINY["num_hidden_layers"] and point.value == pytest.approx(mean)
        assert run.data.metrics["test/f1_rarest"] == pytest.approx(summary[name]["rare"])
    artifacts = Path(client.get_run(parent).info.artifact_uri.removeprefix("file://"))
    assert {p.name for p in artifacts.iterdir()} == {"probe.md", "probe.png", "probe.json"}
    assert text in (artifacts / "probe.md").read_text()
    assert client.get_run(parent).data.params["folds"] == "2"
    with pytest.raises(SystemExit, match="regression"):
        probe([str(ckpt)], task="sts")
