"""tasks.table: learning rate chosen per arm on validation, test mean / sd / range over seeds."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.table import Run, format_table, summarize


def test_summarize_picks_lr_on_val_and_aggregates_seeds():
    rng = np.random.default_rng(0)
    runs, expected = [], {}
    for arm, best_lr in (("pretrained", 1e-3), ("scratch", 3e-4)):
        for lr in (3e-4, 1e-3):
            tests = rng.uniform(0.3, 0.7, 3)
            for seed, test in enumerate(tests):
                val = 0.8 if lr == best_lr else 0.5 + 0.1 * seed  # the other lr is better on one seed only
                runs.append(Run(arm, lr, str(seed), val, {"test/accuracy": float(test)}))
            if lr == best_lr:
                expected[arm] = tests
    runs.append(Run("scratch", 1e-2, "0", None, {"test/accuracy": 1.0}))  # no val score: not counted
    rows = summarize(runs, ["test/accuracy"])
    assert [r.arm for r in rows] == ["pretrained", "scratch"]
    for row in rows:
        tests = expected[row.arm]
        assert row.lr == (1e-3 if row.arm == "pretrained" else 3e-4) and row.n == 3
        mean, sd, lo, hi = row.metrics["test/accuracy"]
        assert mean == pytest.approx(tests.mean()) and sd == pytest.approx(tests.std(ddof=1))
        assert (lo, hi) == (pytest.approx(tests.min()), pytest.approx(tests.max()))
        assert list(row.others.values()) == [pytest.approx(0.6)]
    text = format_table(rows, ["test/accuracy", "test/f1"], "val/accuracy")
    assert text.count("\n") == 3 and "±" in text and "| – |" in text


def test_lower_is_better_monitor():
    runs = [Run("a", 1e-3, "0", 0.2, {}), Run("a", 1e-4, "0", 0.1, {})]
    assert summarize(runs, [], higher_is_better=False)[0].lr == 1e-4
