"""`python -m tasks.predict` on every head, and `python -m bert.export` of fine-tuned sentence-task checkpoints,
both checked against transformers (the exported folder, loaded with transformers' own classes)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from bert import export
from bert.heads import masked_mean
from bert.tokenizer import load_tokenizer
from datamodules.klue_ner import LABELS as NER_LABELS
from datamodules.sentence import SentenceEncoder
from tasks import predict
from tasks.base import FinetuneModule
from tasks.ner import NerModule
from tests.conftest import ROOT
from tests.tiny_encoder import make_pretrain_checkpoint, make_tokenizer

transformers = pytest.importorskip("transformers")
TOL = 1e-5
NLI = ["entailment", "neutral", "contradiction"]
TOPIC = ["육아/교육", "기타", "교통/건축/국토"]
PAIRS = [("흡연자분들은 발코니가 있는 방이면 발코니에서 흡연이 가능합니다.", "어떤 방에서도 흡연은 금지됩니다."),
         ("비가 온다.", "날씨가 맑고 화창하다고 합니다. 오늘은 외출하기 좋은 날입니다.")]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, mirror):
    base = tmp_path_factory.mktemp("predict")
    tokenizer_dir = make_tokenizer(mirror, base / "tokenizer")
    pretrain = make_pretrain_checkpoint(tokenizer_dir, base / "pretrain.ckpt")
    ckpt = torch.load(pretrain, weights_only=True)  # an NSP head that prefers IsNext, so orientation matters
    ckpt["state_dict"]["model.cls.seq_relationship.bias"] = torch.tensor([2.0, -2.0])
    torch.save(ckpt, pretrain)
    model_config = ckpt["hyper_parameters"]["model_config"]
    ckpts = {"pretrain": pretrain}
    for task, labels in (("nli", NLI), ("sts", []), ("topic", TOPIC), ("ner", list(NER_LABELS))):
        torch.manual_seed(len(labels))
        cls = NerModule if task == "ner" else FinetuneModule
        module = cls(task=task, model_config=model_config, labels=labels, optim={"lr": 1e-3},
                     tokenizer_dir=str(tokenizer_dir))  # fmt: skip
        with torch.no_grad():  # a head that is not all zeros (the init is): logits must differ per class
            module.model.classifier.bias.normal_(0, 1.0)
        ckpts[task] = base / f"{task}.ckpt"
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpts[task])
    return tokenizer_dir, ckpts


def run_predict(args: list[str], capsys, stdin: str | None = None, monkeypatch=None) -> list[dict]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    predict.main(args)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("task", ["nli", "sts", "topic"])
def test_export_reproduces_logits_in_transformers(task, tiny, tmp_path):
    _, ckpts = tiny
    out = tmp_path / "hf"
    export.main([str(ckpts[task]), str(out)])
    theirs, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert type(theirs).__name__ == "BertForSequenceClassification"
    labels = {"nli": NLI, "sts": ["score"], "topic": TOPIC}[task]
    assert theirs.config.id2label == dict(enumerate(labels))
    assert theirs.config.label2id == {label: i for i, label in enumerate(labels)}
    assert theirs.config.problem_type == ("regression" if task == "sts" else "single_label_classification")

    ours, *_ = export.load_sequence_classification_checkpoint(ckpts[task])
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    if task == "topic":
        enc = tokenizer([a + " " + b for a, b in PAIRS], padding=True, return_tensors="pt")
    else:
        enc = tokenizer([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, return_tensors="pt")
    assert enc["attention_mask"].sum(1).min() < enc["attention_mask"].shape[1]  # padded
    with torch.no_grad():
        reference = theirs.eval()(**enc).logits
        logits = ours(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
    assert logits.shape == reference.shape == (len(PAIRS), len(labels))
    assert (logits - reference).abs().max().item() <= TOL

    # predict gives the exported model's answer
    args = [task, str(ckpts[task])] + ([a + " " + b for a, b in PAIRS] if task == "topic" else [t for p in PAIRS for t in p])
    records = run_predict_plain(args)
    if task == "sts":
        assert [r["score"] for r in records] == pytest.approx(reference[:, 0].tolist(), abs=1e-4)
    else:
        probs = reference.softmax(-1)
        assert [r["label"] for r in records] == [labels[i] for i in probs.argmax(-1)]
        assert [r["probs"][labels[0]] for r in records] == pytest.approx(probs[:, 0].tolist(), abs=1e-4)


def run_predict_plain(args: list[str]) -> list[dict]:
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        predict.main(args)
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_ner_checkpoint_is_not_exported(tiny, tmp_path, capsys):
    _, ckpts = tiny
    with pytest.raises(SystemExit, match="fine-tuned ner checkpoint.*no CRF head.*tasks.tag"):
        export.main([str(ckpts["ner"]), str(tmp_path / "hf")])


def test_nsp_orientation_and_fill_mask_match_transformers(tiny, tmp_path, capsys):
    """p_is_next is transformers' softmax(seq_relationship_logits)[:, 0] (0 = IsNext, transformers' docs) on
    the exported pretraining model; fill-mask probabilities are transformers' fill-mask pipeline scores."""
    _, ckpts = tiny
    out = tmp_path / "hf"
    export.main([str(ckpts["pretrain"]), str(out)])
    capsys.readouterr()
    hf = transformers.BertForPreTraining.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    records = run_predict(["nsp", str(ckpts["pretrain"]), *[t for p in PAIRS for t in p]], capsys)
    enc = tokenizer([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = hf(**enc).seq_relationship_logits.softmax(-1)[:, 0]
    assert [r["p_is_next"] for r in records] == pytest.approx(reference.tolist(), abs=1e-5)
    assert all(r["p_is_next"] > 0.9 for r in records)  # the head's bias favours class 0 = IsNext

    text = "흡연자분들은 [MASK]가 있는 방이면 흡연이 가능합니다."
    (record,) = run_predict(["fill-mask", str(ckpts["pretrain"]), text, "--top-k", "3"], capsys)
    masked_lm = transformers.BertForMaskedLM.from_pretrained(out).eval()
    reference = transformers.pipeline("fill-mask", model=masked_lm, tokenizer=tokenizer, top_k=3)(text)
    assert [m["p"] for m in record["masks"][0]] == pytest.approx([r["score"] for r in reference], abs=1e-5)
    assert [m["token"] for m in record["masks"][0]] == [tokenizer.convert_ids_to_tokens(r["token"]) for r in reference]


def test_inputs_from_file_stdin_and_batches(tiny, tmp_path, capsys, monkeypatch):
    _, ckpts = tiny
    lines = [f"{a}\t{b}" for a, b in PAIRS] + [json.dumps({"premise": PAIRS[0][0], "hypothesis": PAIRS[0][1]}, ensure_ascii=False)]
    file = tmp_path / "pairs.txt"
    file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    from_file = run_predict(["nli", str(ckpts["nli"]), "--file", str(file), "--batch-size", "2"], capsys)
    from_args = run_predict(["nli", str(ckpts["nli"]), *PAIRS[0], *PAIRS[1], "--batch-size", "1"], capsys)
    from_stdin = run_predict(["nli", str(ckpts["nli"])], capsys, stdin="\n".join(lines) + "\n", monkeypatch=monkeypatch)
    def same(a: list[dict], b: list[dict]) -> bool:
        """Equal records; probabilities to 1e-5 (a batch pads its shorter rows: float sums differ in the 7th digit)."""
        return len(a) == len(b) and all(
            {k: v for k, v in x.items() if k != "probs"} == {k: v for k, v in y.items() if k != "probs"}
            and x["probs"] == pytest.approx(y["probs"], abs=1e-5)
            for x, y in zip(a, b)
        )

    assert len(from_file) == 3 and same(from_file, from_stdin)
    assert same(from_file[:2], from_args)  # batching changes nothing
    assert same(from_file[2:], from_file[:1])

    sentences = ["이순신은 1545년 서울에서 태어났다.", "세종대왕은 한글을 창제하였다.", "오늘"]
    ner = run_predict(["ner", str(ckpts["ner"]), *sentences, "--batch-size", "3"], capsys)
    one_by_one = run_predict(["ner", str(ckpts["ner"]), *sentences, "--batch-size", "1"], capsys)
    assert ner == one_by_one and [r["text"] for r in ner] == sentences
    for record in ner:
        for entity in record["entities"]:
            assert entity["type"] in ("PS", "LC", "OG", "DT", "TI", "QT") and 0 <= entity["start"] < entity["end"]


def test_predict_ner_decodes_like_the_training_module(tiny, tmp_path):
    """`predict ner` builds its own tagger: it must decode over the same allowed paths as NerModule did."""
    from tasks import checkpoints, predict

    _, ckpts = tiny
    module = checkpoints.module_from(ckpts["ner"], NerModule, "ner")
    loaded = predict.load(str(ckpts["ner"]), "ner")
    assert not module.model.transitions_allowed.all() and not module.model.start_allowed.all()
    for name in ("start_allowed", "transitions_allowed"):
        assert torch.equal(getattr(loaded.model, name), getattr(module.model, name))
    ckpt = torch.load(ckpts["ner"], weights_only=True)
    ckpt["hyper_parameters"]["constrained_decoding"] = False
    torch.save(ckpt, tmp_path / "free.ckpt")
    free = predict.load(str(tmp_path / "free.ckpt"), "ner")
    assert free.model.transitions_allowed.all() and free.model.start_allowed.all()


def test_mean_pooled_head_predicts_and_is_not_exported(tiny, tmp_path):
    """A `task.pooling=mean` checkpoint: predict rebuilds the head as it was trained (no pooler, mean over
    tokens); export refuses it, since transformers' BertForSequenceClassification pools [CLS]."""
    tokenizer_dir, ckpts = tiny
    saved = torch.load(ckpts["sts"], weights_only=True)
    hparams = {**saved["hyper_parameters"], "pooling": "mean"}
    torch.manual_seed(0)
    module = FinetuneModule(**hparams).eval()
    encoder = SentenceEncoder(load_tokenizer(tokenizer_dir), 128)
    with torch.no_grad():  # a head that reads the pairs' mean-pooled difference: their scores differ by 1.0
        pooled = []  # (a random head tied them to 4 places on one CI machine: it can be near orthogonal to it)
        for pair in PAIRS:
            batch = predict.pad(encoder.encode([pair]))
            sequence, _ = module.model.bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
            pooled.append(masked_mean(sequence, batch["attention_mask"])[0])
        difference = pooled[0] - pooled[1]
        module.model.classifier.weight.copy_(difference / difference.dot(difference))
        module.model.classifier.bias.fill_(2.5)
    assert not any(key.startswith("model.bert.pooler") for key in module.state_dict())
    path = tmp_path / "sts-mean.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)

    records = run_predict_plain(["sts", str(path), *[t for p in PAIRS for t in p]])
    loaded = predict.load(path, "sts")
    assert loaded.model.pooling == "mean"
    with torch.no_grad():  # one pair at a time, unpadded: predict's padded batch must give the same score
        batches = [predict.pad(encoder.encode([pair])) for pair in PAIRS]
        reference = [float(loaded.model(b["input_ids"], b["token_type_ids"], b["attention_mask"])) for b in batches]
    assert [r["score"] for r in records] == pytest.approx(reference, abs=1e-5)
    assert reference[0] - reference[1] == pytest.approx(1.0, abs=1e-4), reference  # the pooling trained is used
    with pytest.raises(SystemExit, match="mean-pooled head has no transformers equivalent"):
        export.main([str(path), str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()


def test_clear_errors(tiny, tmp_path, capsys):
    _, ckpts = tiny
    with pytest.raises(SystemExit, match=r"`predict nli` takes a fine-tuned nli checkpoint, but .*sts\.ckpt is a fine-tuned sts checkpoint; use .*tasks\.predict sts"):
        predict.main(["nli", str(ckpts["sts"]), "a", "b"])
    with pytest.raises(SystemExit, match=r"`predict topic` takes a fine-tuned topic checkpoint, but .* is a pretraining checkpoint; use .*tasks\.predict fill-mask"):
        predict.main(["topic", str(ckpts["pretrain"]), "a"])
    with pytest.raises(SystemExit, match=r"`predict fill-mask/nsp` takes a pretraining checkpoint, but .* is a fine-tuned nli checkpoint"):
        predict.main(["nsp", str(ckpts["nli"]), "a", "b"])
    with pytest.raises(SystemExit, match="in pairs"):
        predict.main(["sts", str(ckpts["sts"]), "a", "b", "c"])
    bad = tmp_path / "bad.txt"
    bad.write_text("문장 하나\t문장 둘\n탭 없는 줄\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"bad\.txt:2: a pair is two texts separated by one tab"):
        predict.main(["sts", str(ckpts["sts"]), "--file", str(bad)])
    with pytest.raises(SystemExit, match=r"argument 3: empty text"):
        predict.main(["nli", str(ckpts["nli"]), "a", "b", "c", " "])
    with pytest.raises(SystemExit, match="needs at least one \\[MASK\\]"):
        predict.main(["fill-mask", str(ckpts["pretrain"]), "마스크 없음"])


def test_command_line(tiny):
    _, ckpts = tiny
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.predict", "topic", str(ckpts["topic"])], input="청원 제목 내용\n{\"text\": \"두 번째\"}\n",
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["text"] for r in records] == ["청원 제목 내용", "두 번째"] and all(r["label"] in TOPIC for r in records)
