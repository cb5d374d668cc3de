"""The recipe knobs of issue 12: the time-keyed schedule, layer-wise lr decay, re-initialised top layers, the
study's shared scratch arm and the encoder-geometry diagnosis."""

from __future__ import annotations

import io

import pytest
import torch

from bert.heads import BertCrfTagger, BertForSequenceClassification
from bert.model import BertConfig, BertModel
from tasks.diagnose import effective_rank, geometry, lr_at_save
from tasks.optim import BudgetSchedule, build_optimizer, layer_depth, param_groups

SMALL = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=20)


def schedule_with_clock(total_steps: int, warmup: int, budget_s: float, now: list[float]) -> BudgetSchedule:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return BudgetSchedule(opt, total_steps, warmup, 0.0, clock=lambda: (now[0], budget_s))


def lrs_over(schedule: BudgetSchedule, now: list[float], times: list[float]) -> list[float]:
    out = []
    for t in times:
        now[0] = t
        schedule.optimizer.step()
        schedule.step()
        out.append(schedule.get_last_lr()[0])
    return out


def test_time_keyed_schedule_reaches_the_floor_at_the_time_limit_not_at_max_steps():
    now = [0.0]
    schedule = schedule_with_clock(total_steps=1_000_000, warmup=4, budget_s=100.0, now=now)
    lrs = lrs_over(schedule, now, [1, 2, 3, 4, 10, 55, 100, 120])
    assert lrs[:3] == pytest.approx([0.5, 0.75, 1.0])  # warmup in steps
    # decay from the end of warmup (t=4 s) to the budget (100 s), whatever max_steps says
    assert lrs[4] == pytest.approx(1 - 6 / 96)
    assert lrs[5] == pytest.approx(1 - 51 / 96)
    assert lrs[6:] == [0.0, 0.0]


def test_time_keyed_schedule_also_stops_at_max_steps_first():
    now = [0.0]
    schedule = schedule_with_clock(total_steps=10, warmup=0, budget_s=1e9, now=now)
    assert lrs_over(schedule, now, [0.0] * 10)[-1] == pytest.approx(0.0)


def test_decay_fraction_holds_the_peak_then_decays_over_the_last_share_of_the_time_budget():
    now = [0.0]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = BudgetSchedule(opt, 1_000_000, 2, 0.0, clock=lambda: (now[0], 102.0), decay_fraction=0.2)
    # warmup ends at t=2; the budget after it is 100 s: peak until t=82, then linear to 0 at t=102
    lrs = lrs_over(schedule, now, [1, 2, 50, 82, 92, 102])
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.5, 0.0])


def test_decay_fraction_on_steps_and_its_bounds():
    from tasks.optim import linear_schedule

    factor = linear_schedule(total_steps=110, warmup_steps=10, decay_fraction=0.25)
    assert [factor(s) for s in (5, 10, 85, 97.5, 110)] == pytest.approx([0.6, 1.0, 1.0, 0.5, 0.0])
    plain = linear_schedule(total_steps=110, warmup_steps=10)
    assert plain(60) == pytest.approx(0.5)  # decay_fraction=1: the linear decay of old
    with pytest.raises(ValueError, match="decay_fraction"):
        linear_schedule(10, 0, decay_fraction=0.0)


def test_time_keyed_schedule_state_is_plain_and_keeps_its_time_axis_over_a_resume():
    now = [0.0]
    schedule = schedule_with_clock(total_steps=1000, warmup=2, budget_s=100.0, now=now)
    lrs_over(schedule, now, [5, 10, 20])  # warmup ended at t=10
    buffer = io.BytesIO()
    torch.save(schedule.state_dict(), buffer)  # a checkpoint must load with weights_only
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert "clock" not in state and state["warmup_end_s"] == 10.0
    resumed = schedule_with_clock(total_steps=1000, warmup=2, budget_s=100.0, now=now)
    resumed.load_state_dict(state)
    assert lrs_over(resumed, now, [55])[0] == pytest.approx(1 - 45 / 90)


def test_time_keyed_needs_a_time_limit():
    class NoTimer:
        callbacks: list = []

    with pytest.raises(ValueError, match="trainer.max_time"):
        build_optimizer(BertModel(SMALL), {"lr": 1e-3, "time_keyed": True, "warmup_steps": 0}, 10, NoTimer())


def test_layer_depths_and_decayed_lrs():
    model = BertForSequenceClassification(SMALL, num_labels=3)
    assert layer_depth("bert.embeddings.word_embeddings.weight", 3) == 0
    assert layer_depth("bert.encoder.layer.2.output.dense.weight", 3) == 3
    assert layer_depth("classifier.weight", 3) == 4
    groups = param_groups(model, 0.01, lr=1.0, layer_decay=0.5)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # every parameter exactly once
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["bert.embeddings.word_embeddings.weight"])] == pytest.approx(0.5**4)
    assert lr_of[id(named["bert.encoder.layer.0.intermediate.dense.weight"])] == pytest.approx(0.5**3)
    assert lr_of[id(named["bert.encoder.layer.2.intermediate.dense.weight"])] == pytest.approx(0.5)
    head = [n for n in named if not n.startswith("bert.encoder") and not n.startswith("bert.embeddings")]
    assert head and all(lr_of[id(named[n])] == 1.0 for n in head)  # pooler and classifier: the full lr
    assert wd_of[id(named["bert.encoder.layer.1.output.LayerNorm.weight"])] == 0.0
    assert wd_of[id(named["bert.encoder.layer.1.output.dense.bias"])] == 0.0
    assert wd_of[id(named["bert.encoder.layer.1.output.dense.weight"])] == 0.01
    # the optimizer keeps those per-group lrs as the schedule's base
    out = build_optimizer(model, {"lr": 1.0, "layer_decay": 0.5, "warmup_steps": 0}, 10)
    assert sorted({round(x, 6) for x in out["lr_scheduler"]["scheduler"].base_lrs}) == [0.0625, 0.125, 0.25, 0.5, 1.0]


def test_without_layer_decay_the_two_groups_of_old():
    groups = param_groups(BertForSequenceClassification(SMALL, num_labels=2), 0.01)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0] and all("lr" not in g for g in groups)


def test_adamw_is_fused_on_cpu_only(monkeypatch):
    """Lightning's bf16/16-mixed plugin refuses gradient clipping (trainer.gradient_clip_val, on in every
    preset) when the optimizer unscales inside its step, as fused AdamW does: `trainer=gpu` crashed at its
    first step on an H200. Off the CPU (meta stands in for a GPU here) AdamW is torch's non-fused default."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    cpu = build_optimizer(BertModel(SMALL), {"lr": 1e-3, "warmup_steps": 0}, 10)["optimizer"]
    assert cpu.defaults["fused"] is True
    with torch.device("meta"):
        off_cpu = BertModel(SMALL)
    opt = build_optimizer(off_cpu, {"lr": 1e-3, "warmup_steps": 0}, 10)["optimizer"]
    assert not opt.defaults["fused"] and not getattr(opt, "_step_supports_amp_scaling", False)
    forced = build_optimizer(off_cpu, {"lr": 1e-3, "warmup_steps": 0, "fused": True}, 10)["optimizer"]
    assert getattr(forced, "_step_supports_amp_scaling", False)  # what Lightning's clipping check refuses


def test_head_lr_scale_multiplies_only_the_head():
    model = BertCrfTagger(SMALL, num_tags=5)
    named = dict(model.named_parameters())
    lr_of = {id(p): g["lr"] for g in param_groups(model, 0.01, lr=1.0, head_lr_scale=10.0) for p in g["params"]}
    assert sorted(lr_of) == sorted(id(p) for p in model.parameters())
    for name, param in named.items():  # classifier and CRF transitions at 10x, the whole encoder at 1x
        assert lr_of[id(param)] == (10.0 if name.split(".")[0] in ("classifier", "crf") else 1.0), name
    # with layer decay too: the head keeps the top depth's lr, times the scale
    both = {id(p): g["lr"] for g in param_groups(model, 0.01, lr=1.0, layer_decay=0.5, head_lr_scale=10.0)
            for p in g["params"]}  # fmt: skip
    assert both[id(named["crf.transitions"])] == pytest.approx(10.0)
    assert both[id(named["bert.encoder.layer.2.output.dense.weight"])] == pytest.approx(0.5)
    out = build_optimizer(model, {"lr": 2.0, "head_lr_scale": 10.0, "warmup_steps": 0}, 10)
    assert sorted({round(x, 6) for x in out["lr_scheduler"]["scheduler"].base_lrs}) == [2.0, 20.0]


def test_reinit_top_layers_resets_only_the_top():
    torch.manual_seed(0)
    model = BertModel(SMALL)
    with torch.no_grad():  # "pretrained": move every weight away from its init
        for p in model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.reinit_top_layers(1)
    after = model.state_dict()
    for key, value in after.items():
        changed = not torch.equal(before[key], value)
        assert changed == (key.startswith("encoder.layer.2.") or key.startswith("pooler.")), key
    assert torch.equal(after["encoder.layer.2.output.LayerNorm.weight"], torch.ones(16))  # BERT's init
    with pytest.raises(ValueError, match="reinit_layers=4"):
        model.reinit_top_layers(4)


def test_geometry_tells_collapsed_from_contextual_vectors():
    torch.manual_seed(0)
    ids = [torch.randint(0, 5, (12,)) for _ in range(40)]
    table = torch.randn(5, 32)
    context_free = [table[t] + 0.01 * torch.randn(len(t), 32) for t in ids]  # same id, same vector
    one_direction = [v + 5.0 for v in context_free]  # ... and all sharing one direction (anisotropy)
    contextual = [torch.randn(len(t), 32) for t in ids]
    free, aniso, ctx = geometry(context_free, ids), geometry(one_direction, ids), geometry(contextual, ids)
    assert aniso["cos"] > 0.9 > 0.2 > max(abs(free["cos"]), abs(ctx["cos"]))
    assert free["self_sim"] > 0.5 > 0.05 > abs(ctx["self_sim"])
    assert free["eff_rank"] < 6 < ctx["eff_rank"]
    assert effective_rank(torch.randn(200, 8)) > 7  # isotropic: close to full rank


def test_lr_at_save_reads_the_schedule_state():
    assert lr_at_save({"lr_schedulers": [{"_last_lr": [2e-4], "base_lrs": [1e-3]}]}) == pytest.approx(0.2)
    assert lr_at_save({}) is None


def test_crf_transitions_separate_ill_formed_from_well_formed_pairs():
    from tasks.diagnose import crf_transitions

    labels = ["O", "B-PS", "I-PS", "B-LC", "I-LC"]
    trans = torch.zeros(5, 5)
    trans[0, 2] = trans[0, 4] = -4.0  # O -> I-X: ill-formed
    trans[3, 2] = trans[4, 2] = trans[1, 4] = trans[2, 4] = -2.0  # another type's B/I -> I-X: ill-formed
    trans[1, 2] = trans[2, 2] = trans[3, 4] = trans[4, 4] = 3.0  # B-X / I-X -> I-X: well-formed
    ckpt = {"hyper_parameters": {"labels": labels, "optim": {"lr": 1e-3, "head_lr_scale": 10}},
            "state_dict": {"model.crf.transitions": trans, "model.crf.start_transitions": torch.tensor([0, 0, -1.0, 0, -3.0])}}  # fmt: skip
    r = crf_transitions(ckpt)
    assert r["ill_formed_to_i"] == pytest.approx((2 * -4.0 + 4 * -2.0) / 6)
    assert r["well_formed_to_i"] == pytest.approx(3.0) and r["start_to_i"] == pytest.approx(-2.0)
    assert r["max_abs"] == 4.0 and r["head_lr_scale"] == 10
    with pytest.raises(ValueError, match="not a fine-tuned NER"):
        crf_transitions({"hyper_parameters": {"labels": labels}, "state_dict": {}})


def test_nsp_weight_zero_trains_the_masked_lm_only():
    """`nsp_weight=0` (task-adaptive pretraining on unrelated sentences): NSP is measured, never trained."""
    from tasks.pretrain import PretrainModule

    shape = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 20}  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (4, 12), generator=generator)
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    batch = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids),
             "mlm_labels": labels, "nsp_labels": torch.tensor([0, 1, 0, 1])}  # fmt: skip
    both = PretrainModule(shape, {"lr": 1e-3}).eval()
    mlm_only = PretrainModule(shape, {"lr": 1e-3}, nsp_weight=0.0).eval()
    mlm_only.load_state_dict(both.state_dict())
    full, masked = both.model_step(batch), mlm_only.model_step(batch)
    assert torch.allclose(full["loss"], full["mlm_loss"] + full["nsp_loss"])
    assert torch.allclose(masked["loss"], masked["mlm_loss"]) and torch.allclose(masked["nsp_loss"], full["nsp_loss"])
    masked["loss"].backward()
    nsp_head = mlm_only.model.cls.seq_relationship.weight.grad
    assert nsp_head is None or not nsp_head.any()
    assert mlm_only.model.cls.predictions.transform.dense.weight.grad.abs().sum() > 0


def test_freeze_encoder_fraction_trains_the_head_alone_then_everything():
    """LP-FT: for the first share of the steps the encoder does not move at all (lr 0, so AdamW's decoupled
    weight decay is off too) while the head learns; then the encoder warms up from a small lr."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(SMALL, num_labels=3)
    out = build_optimizer(model, {"lr": 1e-2, "warmup_fraction": 0.2, "freeze_encoder_fraction": 0.5}, 10)
    opt, schedule = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert {g["head"] for g in opt.param_groups} == {True, False}  # head groups of their own, same base lr
    assert sorted({round(g["lr"], 9) for g in opt.param_groups}) == [0.0, 0.005]  # encoder 0; head: 1 of 2 warmup steps
    encoder = dict(model.named_parameters())["bert.encoder.layer.0.attention.self.query.weight"]
    head = dict(model.named_parameters())["classifier.weight"]
    ids = torch.randint(1, 50, (4, 6))
    seen = []
    for _ in range(10):
        before = (encoder.detach().clone(), head.detach().clone())
        enc_lr = next(g["lr"] for g in opt.param_groups if not g["head"])
        model.loss(model(ids), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
        seen.append((enc_lr, not torch.equal(before[0], encoder), not torch.equal(before[1], head)))
    assert [moved for _, moved, _ in seen] == [False] * 5 + [True] * 5
    assert all(head_moved for _, _, head_moved in seen)
    # ... and the encoder's own warmup (1 step: 0.2 of the 5 left) and decay over the steps after the freeze
    assert [round(lr / 1e-2, 3) for lr, _, _ in seen[4:]] == [0.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError, match="freeze_encoder_fraction=1.0"):
        build_optimizer(model, {"lr": 1e-2, "freeze_encoder_fraction": 1.0}, 10)


def _train(model: torch.nn.Module, optim: dict, steps: int = 8, total_steps: int | None = None) -> dict:
    out = build_optimizer(model, optim, total_steps or steps)
    opt, schedule = out["optimizer"], out["lr_scheduler"]["scheduler"]
    ids, labels = torch.randint(1, 50, (4, 6)), torch.tensor([0, 1, 2, 0])
    for _ in range(steps):
        model.loss(model(ids), labels).backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
    return out


def _encoder_drift(model: torch.nn.Module, start: dict[str, torch.Tensor]) -> float:
    return sum((p.detach() - start[n]).norm().item() ** 2 for n, p in model.named_parameters()
               if n.startswith("bert.")) ** 0.5  # fmt: skip


def test_anchor_decay_pulls_the_encoder_back_to_its_pretrained_weights_and_leaves_the_head_alone():
    """L2-SP, decoupled: a share lr * anchor_decay of the way back each step. At share 1 the encoder ends
    each step on its pretrained weights; below it the encoder drifts less than AdamW's decay toward 0 lets
    it; the head is trained exactly as without the anchor; a frozen LP-FT start stays frozen."""
    torch.manual_seed(0)
    pretrained = BertForSequenceClassification(SMALL, num_labels=3)
    start = {n: p.detach().clone() for n, p in pretrained.named_parameters()}

    def copy() -> BertForSequenceClassification:
        model = BertForSequenceClassification(SMALL, num_labels=3)
        model.load_state_dict(pretrained.state_dict())
        return model

    drift = {}
    for anchor in (0.0, 10.0, 100.0):  # lr 1e-2: a share of 0, 0.1 and 1 at the peak
        model = copy()
        torch.manual_seed(1)
        out = _train(model, {"lr": 1e-2, "warmup_fraction": 0.0, "min_lr_ratio": 0.5, "anchor_decay": anchor})
        drift[anchor] = _encoder_drift(model, start)
        if anchor:
            groups = out["optimizer"].param_groups
            assert all(g["weight_decay"] == 0.0 and g["anchor_decay"] == anchor for g in groups if not g["head"])
            assert all("anchor_decay" not in g for g in groups if g["head"])
    assert drift[0.0] > 0.05 and drift[10.0] < 0.8 * drift[0.0], drift
    # share 1 at the peak, 0.5 + at the decayed lr: back on the anchors within rounding, far from plain AdamW
    assert drift[100.0] < 0.2 * drift[10.0], drift

    # at share exactly 1 (constant lr) every step ends on the pretrained encoder; the head learns as without
    plain, anchored = copy(), copy()
    torch.manual_seed(1)
    _train(plain, {"lr": 1e-2, "warmup_fraction": 0.0, "min_lr_ratio": 1.0, "weight_decay": 0.0, "head_lr_scale": 1.0}, 1)
    torch.manual_seed(1)
    _train(anchored, {"lr": 1e-2, "warmup_fraction": 0.0, "min_lr_ratio": 1.0, "weight_decay": 0.0, "anchor_decay": 100.0}, 1)
    for name, param in anchored.named_parameters():
        if name.startswith("bert."):
            torch.testing.assert_close(param, start[name], rtol=0, atol=1e-7)
        else:
            torch.testing.assert_close(param, dict(plain.named_parameters())[name])

    # LP-FT: the anchor's pull is scaled by the encoder's lr, 0 while frozen
    frozen = copy()
    _train(frozen, {"lr": 1e-2, "freeze_encoder_fraction": 0.5, "anchor_decay": 10.0}, 4, total_steps=10)
    assert _encoder_drift(frozen, start) == 0.0
    with pytest.raises(ValueError, match="anchor_decay=200"):
        build_optimizer(copy(), {"lr": 1e-2, "anchor_decay": 200.0}, 10)


def test_anchor_decay_keeps_its_anchors_over_a_resume():
    """The anchors are saved with the optimizer's state: a run resumed from a checkpoint (weights already
    moved) pulls toward the pretrained weights, not toward where it was resumed."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(SMALL, num_labels=3)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = _train(model, {"lr": 1e-2, "anchor_decay": 10.0}, 4)
    buffer = io.BytesIO()
    torch.save(out["optimizer"].state_dict(), buffer)
    buffer.seek(0)
    again = build_optimizer(model, {"lr": 1e-2, "anchor_decay": 10.0}, 4)["optimizer"]
    again.load_state_dict(torch.load(buffer, weights_only=True))
    names = {id(p): n for n, p in model.named_parameters()}
    for group in (g for g in again.param_groups if not g["head"]):
        for param, anchor in zip(group["params"], group["anchors"], strict=True):
            torch.testing.assert_close(anchor, start[names[id(param)]])
