"""CRF head behaviour and the fine-tuning entry point end to end."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torchcrf import CRF

from bert.heads import iob2_allowed, tagger_allowed, viterbi
from bert.model import BertConfig
from bert.ner import BertCrfTagger
from tests.test_run_pretrain import ROOT, check, run_cli, runs_of

CONFIG = BertConfig(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
)


@pytest.mark.parametrize("lstm_hidden", [0, 8])
def test_padding_does_not_change_a_decode(lstm_hidden):
    """With the BiLSTM too: an unpacked backward pass would start on the padding and change the emissions."""
    torch.manual_seed(0)
    model = BertCrfTagger(CONFIG, num_tags=13, lstm_hidden=lstm_hidden).eval()
    ids = torch.randint(5, 99, (1, 9))
    alone = model.decode(ids, torch.ones_like(ids))[0]
    alone_emissions = model.emissions(ids, torch.ones_like(ids))[0]
    batch = torch.zeros(3, 14, dtype=torch.long)
    mask = torch.zeros_like(batch)
    batch[0, :9], mask[0, :9] = ids[0], 1
    batch[1, :14], mask[1, :14] = torch.randint(5, 99, (14,)), 1
    batch[2, :4], mask[2, :4] = torch.randint(5, 99, (4,)), 1
    paths = model.decode(batch, mask)
    assert paths[0] == alone
    torch.testing.assert_close(model.emissions(batch, mask)[0, :9], alone_emissions, atol=1e-5, rtol=1e-5)
    assert [len(p) for p in paths] == [9, 14, 4]


def test_viterbi_matches_pytorch_crf_and_brute_force_under_iob2():
    """Free: pytorch-crf's own decode is the reference. Constrained: the best of every IOB2-valid path,
    enumerated."""
    labels = ["O", "B-PS", "I-PS", "B-LC", "I-LC"]
    start_ok, trans_ok = iob2_allowed(labels)
    torch.manual_seed(0)
    crf = CRF(len(labels), batch_first=True)
    for p in crf.parameters():
        torch.nn.init.normal_(p, std=2.0)  # strong transitions, so that constraints bite
    emissions = torch.randn(6, 5, len(labels)) * 2
    mask = torch.zeros(6, 5, dtype=torch.bool)
    for b, n in enumerate([5, 1, 3, 4, 2, 5]):
        mask[b, :n] = True
    free = viterbi(emissions, mask, crf.start_transitions, crf.transitions, crf.end_transitions)
    assert free == crf.decode(emissions, mask=mask)
    start = crf.start_transitions.masked_fill(~start_ok, -1e4)
    transitions = crf.transitions.masked_fill(~trans_ok, -1e4)
    constrained = viterbi(emissions, mask, start, transitions, crf.end_transitions)
    changed = 0
    for b, n in enumerate(mask.sum(1).tolist()):
        valid = [p for p in itertools.product(range(len(labels)), repeat=n)
                 if start_ok[p[0]] and all(trans_ok[i, j] for i, j in zip(p, p[1:]))]  # fmt: skip
        tags = torch.tensor(valid)
        scores = crf._compute_score(emissions[b, :n].unsqueeze(1).expand(n, len(valid), -1), tags.T,
                                    torch.ones(n, len(valid), dtype=torch.bool))  # fmt: skip
        assert constrained[b] == list(valid[int(scores.argmax())])
        changed += constrained[b] != free[b]
    assert changed > 0  # the free paths broke IOB2 somewhere: the test exercises the constraint


def test_iob2_allowed_moves():
    labels = ["O", "B-PS", "I-PS", "B-LC", "I-LC"]
    start, trans = iob2_allowed(labels)
    assert start.tolist() == [True, True, False, True, False]
    assert trans[1, 2] and trans[2, 2] and trans[3, 4]  # B-PS/I-PS -> I-PS, B-LC -> I-LC
    assert not trans[0, 2] and not trans[4, 2] and not trans[1, 4]  # O -> I-PS, I-LC -> I-PS, B-PS -> I-LC
    assert trans[:, [0, 1, 3]].all()  # O and B-X may follow anything
    with pytest.raises(ValueError, match="not an IOB2 label"):
        iob2_allowed(["O", "PER"])
    cls_start, cls_trans = tagger_allowed(labels)  # the tagger's position 0 is [CLS], always O
    assert cls_start.tolist() == [True, False, False, False, False] and torch.equal(cls_trans, trans)


def test_constrained_tagger_never_decodes_an_ill_formed_span():
    from datamodules.klue_ner import LABELS

    torch.manual_seed(0)
    model = BertCrfTagger(CONFIG, num_tags=len(LABELS)).eval()
    with torch.no_grad():
        model.crf.transitions.normal_(std=3.0)
        model.crf.start_transitions.normal_(std=3.0)
    ids = torch.randint(5, 99, (8, 20))
    free = model.decode(ids, torch.ones_like(ids))
    model.constrain(*iob2_allowed(LABELS))
    constrained = model.decode(ids, torch.ones_like(ids))

    def ill_formed(path: list[int]) -> int:
        tags = ["O"] + [LABELS[t] for t in path]
        return sum(b.startswith("I-") and a not in ("B-" + b[2:], b) for a, b in zip(tags, tags[1:]))

    assert sum(map(ill_formed, free)) > 0
    assert sum(map(ill_formed, constrained)) == 0
    assert "start_allowed" not in model.state_dict()  # checkpoints keep their keys


def test_gold_nll_is_nonnegative_and_decreases_when_training():
    torch.manual_seed(0)
    model = BertCrfTagger(CONFIG, num_tags=5)
    ids = torch.randint(5, 99, (4, 12))
    mask = torch.ones_like(ids)
    mask[2:, 8:] = 0
    tags = torch.randint(0, 5, (4, 12)).masked_fill(mask == 0, -100)  # -100 at padding must be handled
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model.loss(ids, mask, tags)
        assert loss.item() >= 0  # -log p(gold path) with p <= 1
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    assert model.decode(ids[:1], mask[:1])[0] == tags[0].tolist()  # memorised


@pytest.fixture(scope="module")
def pretrained_store(tmp_path_factory):
    """A tiny pretraining run in a throw-away store, to fine-tune from."""
    workdir = tmp_path_factory.mktemp("ner")
    cache = tmp_path_factory.mktemp("ner-cache")
    check(run_cli("run.py", ["data=petition_small", "debug=fdr"], workdir, cache))
    return workdir, cache


def test_finetune_without_any_pretraining_run_says_how_to_make_one(tmp_path):
    proc = run_cli("run_finetune.py", ["task=ner"], tmp_path, tmp_path / "cache", timeout=120)
    assert proc.returncode != 0
    assert "no finished pretraining run" in proc.stderr and "python run.py" in proc.stderr


@pytest.mark.slow
def test_finetune_pretrained_and_scratch_are_tracked(pretrained_store):
    workdir, cache = pretrained_store
    (pre,) = runs_of(workdir)
    proc = run_cli(
        "run_finetune.py",
        ["-m", "task=ner", "debug=fdr", f"pretrained={pre.info.run_id},null"],
        workdir,
        cache,
        timeout=400,
    )
    check(proc)
    runs = [r for r in runs_of(workdir, "finetune-ner") if r.info.run_name != "ner-pos"]  # the store is shared
    assert sorted(r.data.tags["init"] for r in runs) == ["pretrained", "scratch"]
    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    for run in runs:
        assert run.info.status == "FINISHED"
        for stage in ("val", "test"):
            for key in (
                "entity_f1_micro",
                "entity_f1_macro",
                "char_f1_klue",
                "char_f1",
                "loss",
                "alignment_ceiling_micro",
            ):
                assert f"{stage}/{key}" in run.data.metrics or (stage, key) == (
                    "val",
                    "alignment_ceiling_micro",
                )
        assert "train/loss" in run.data.metrics
        artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
        for name in (
            "test_report.txt",
            "plots/test_confusion.png",
            "plots/curves.png",
            "tokenizer/tokenizer.json",
        ):
            assert (artifacts / name).is_file(), name
        assert client.get_metric_history(run.info.run_id, "train/loss")
        # read at a glance: why it stopped, its best, its data, its description = the printed summary
        assert run.data.tags["stop_reason"] == "max_steps" and "best/val/entity_f1_macro" in run.data.metrics
        assert run.data.tags["task"] == "ner" and not [k for k in run.data.params if k.startswith("module.")]
        (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
        assert dataset.name == "klue/klue-ner-v1.1_dev.tsv" and len(dataset.digest) == 36
        assert run.data.tags["mlflow.note.content"] in proc.stdout
    pretrained = next(r for r in runs if r.data.tags["init"] == "pretrained")
    assert pretrained.data.tags["pretrained_run"] == pre.info.run_id

    # re-scoring the best checkpoint reproduces the logged test F1 (IOB2-constrained decoding is the default)
    from tasks.diagnose import decode_scores

    (row,) = decode_scores([pretrained.data.tags["best_ckpt"]])
    assert row["test_iob2"][0] == pytest.approx(pretrained.data.metrics["test/entity_f1_macro"], abs=1e-6)
    assert row["test_iob2"][1] == pytest.approx(pretrained.data.metrics["test/entity_f1_micro"], abs=1e-6)
    assert set(row) == {"checkpoint", "val_free", "val_iob2", "test_free", "test_iob2"}

    _tag_from_the_command_line(pretrained.data.tags["best_ckpt"])

    # exporting the fine-tuning run says what it is and which command takes it (not a key dump)
    out = subprocess.run(
        [sys.executable, "-m", "bert.export", pretrained.data.tags["best_ckpt"], str(workdir / "hf")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0 and "fine-tuned ner checkpoint" in out.stderr and "tasks.tag" in out.stderr
    assert "Traceback" not in out.stderr


def _tag_from_the_command_line(ckpt: str) -> None:
    """`python -m tasks.tag <ckpt> <text>` runs on a fine-tuned NER checkpoint and echoes the text first."""
    out = subprocess.run(
        [sys.executable, "-m", "tasks.tag", ckpt, "이순신은 1545년 서울에서 태어났다."],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    check(out)
    assert out.stdout.startswith("이순신은 1545년 서울에서 태어났다.")


@pytest.mark.slow
def test_finetune_with_pos_features_end_to_end(pretrained_store):
    """`task.pos_features=true`: kiwi's analysis of the task file is cached under data_dir, the checkpoint carries
    the flag, re-scoring it reproduces the logged F1 (so diagnose encodes with POS too) and tasks.tag runs it."""
    from tasks.diagnose import decode_scores

    workdir, cache = pretrained_store
    (pre,) = runs_of(workdir)
    args = ["task=ner", "debug=fdr", f"pretrained={pre.info.run_id}", "task.pos_features=true",
            f"paths.data_dir={workdir}/pos-data", "logger.run_name=ner-pos"]  # fmt: skip
    check(run_cli("run_finetune.py", args, workdir, cache, timeout=600))
    (run,) = [r for r in runs_of(workdir, "finetune-ner") if r.info.run_name == "ner-pos"]
    assert run.info.status == "FINISHED" and list((workdir / "pos-data" / "pos").glob("klue-ner-v1.1_dev-*.json"))
    ckpt = torch.load(run.data.tags["best_ckpt"], weights_only=True)
    assert ckpt["hyper_parameters"]["pos_features"] is True and "model.pos_embeddings.weight" in ckpt["state_dict"]
    (row,) = decode_scores([run.data.tags["best_ckpt"]])
    assert row["test_iob2"][0] == pytest.approx(run.data.metrics["test/entity_f1_macro"], abs=1e-6)
    _tag_from_the_command_line(run.data.tags["best_ckpt"])
