"""The lexical floors (`tasks.baselines`): features, the training-free STS score and the logistic regression."""

from __future__ import annotations

import torch

from tasks.baselines import char_ngrams, fit_logistic, jaccard, main, pair_features


def test_char_ngrams_keep_word_boundaries():
    assert char_ngrams("가 나", orders=(1, 2)) == {"가", "_", "나", "가_", "_나"}


def test_pair_features_mark_what_the_second_text_adds():
    feats = pair_features("비가 온다", "비가 안 온다", max_chars=100)
    assert "n안" in feats and "b안" in feats and "a안" not in feats
    assert "n비" not in feats  # in both texts: no novelty feature
    assert pair_features("abc", None, max_chars=2) == ["aa", "aab", "ab"]  # cut to max_chars first


def test_jaccard_is_character_set_overlap():
    assert jaccard("가나", "나가") == 1.0
    assert jaccard("가나", "다라") == 0.0
    assert jaccard("가 나", "가다") == 1 / 3  # spaces ignored


def test_logistic_regression_learns_a_lexical_rule_and_reports_test_at_best_val():
    rule = {"좋다": 0, "싫다": 1, "몰라": 2}
    words = list(rule)

    def split(n: int, offset: int):
        texts = [f"{words[(i + offset) % 3]} 문장{i % 7}" for i in range(n)]
        labels = torch.tensor([rule[t.split()[0]] for t in texts])
        return [pair_features(t, None, 64) for t in texts], labels

    splits = {"train": split(60, 0), "val": split(30, 1), "test": split(30, 2)}
    val, test = fit_logistic(splits, 3, "accuracy", lr=0.1, epochs=5, seed=0)
    assert val == 1.0 and test["accuracy"] == 1.0 and test["f1_macro"] == 1.0
    # labels unrelated to the text: no better than chance on held-out rows
    shuffled = {
        k: (f, torch.randint(0, 3, (len(f),), generator=torch.Generator().manual_seed(1)))
        for k, (f, _) in splits.items()
    }
    _, noise = fit_logistic(shuffled, 3, "accuracy", lr=0.1, epochs=5, seed=0)
    assert noise["accuracy"] < 0.7


def test_cli_refuses_a_task_without_a_floor(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["--tasks", "ner"])
    assert "lexical floors exist for nli, sts, topic" in capsys.readouterr().err


def test_sts_floor_on_the_mirrored_file(mirror, capsys):
    assert main(["--tasks", "sts"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| sts |")]
    assert len(rows) == 2 and all("(311/104/104)" in row for row in rows)
    pearson_val, pearson_test = (float(x) for x in rows[0].strip("| ").split(" | ")[-2:])
    assert 0.0 < pearson_test < 1.0 and 0.0 < pearson_val < 1.0  # overlap carries signal on this data
