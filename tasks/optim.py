"""AdamW with BERT's decay exclusions and a linear warmup / linear decay schedule, shared by all tasks.

The decay can be keyed to the step budget (`max_steps`, the default) or to the time budget
(`optim.time_keyed=true`: the lr reaches its floor at `trainer.max_time`, as in Cramming, Geiping & Goldstein
2022), so that a time-limited run ends annealed instead of being cut off mid-schedule at a high lr.
`optim.decay_fraction` < 1 holds the peak lr and decays only over the last share of the budget
(warmup-stable-decay, Hägele et al. 2024): a short budget otherwise spends its plateau-escaping steps at a
lr that is already falling.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

_LAYER = re.compile(r"(?:^|\.)bert\.encoder\.layer\.(\d+)\.")


def layer_depth(name: str, num_layers: int) -> int:
    """0 for the embeddings, l + 1 for encoder layer l, num_layers + 1 for the pooler and every head."""
    if ".embeddings." in f".{name}":
        return 0
    match = _LAYER.search(name)
    return int(match.group(1)) + 1 if match else num_layers + 1


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None,
                 layer_decay: float | None = None, head_lr_scale: float | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """BERT applies no weight decay to biases and LayerNorm weights (Devlin et al., Google's optimization.py).
    With `layer_decay`, each depth gets lr * layer_decay ** (distance from the top): the lower layers, which
    pretraining made the most general, move least (ULMFiT / ELECTRA's layer-wise lr decay). With
    `head_lr_scale`, the parameters outside `bert.` (classifier, CRF transitions) get lr * head_lr_scale: they
    start from random init, and under Adam a weight moves about lr per step, so a few hundred fine-tuning steps
    at an encoder's lr leave a CRF's transition scores close to their init."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    depths = {layer_depth(n, 0) - 1 for n, _ in named if _LAYER.search(n)}
    num_layers = max(depths) + 1 if depths else 0
    per_group_lr = layer_decay is not None or head_lr_scale is not None
    groups: dict[tuple[int, bool, bool], dict[str, Any]] = {}
    for name, param in named:
        no_decay = param.ndim < 2 or "LayerNorm" in name or name.endswith(".bias")
        depth = layer_depth(name, num_layers) if layer_decay is not None else 0
        head = head_lr_scale is not None and not name.startswith("bert.")
        key = (depth, head, no_decay)
        group = groups.setdefault(key, {"params": [], "weight_decay": 0.0 if no_decay else weight_decay})
        if per_group_lr:
            scale = float(layer_decay) ** (num_layers + 1 - depth) if layer_decay is not None else 1.0
            group["lr"] = float(lr) * scale * (float(head_lr_scale) if head else 1.0)
            group["head"] = head
        group["params"].append(param)
    if not per_group_lr:  # the two groups of old, in their old order (checkpoints' optimizer states match)
        return [groups.get((0, False, flag), {"params": [], "weight_decay": 0.0 if flag else weight_decay})
                for flag in (False, True)]  # fmt: skip
    return [groups[key] for key in sorted(groups)]


def warmup_steps_from(optim: Mapping[str, Any], total_steps: int) -> int:
    """`warmup_steps` (a step count) when set, else `warmup_fraction` of the run: one meaning per name."""
    steps, fraction = optim.get("warmup_steps"), optim.get("warmup_fraction")
    if steps is not None:
        if isinstance(steps, bool) or float(steps) != int(float(steps)) or int(float(steps)) < 0:
            raise ValueError(
                f"optim.warmup_steps={steps}: a whole number of steps; for a share of the run use "
                "optim.warmup_fraction (and optim.warmup_steps=null)"
            )
        return int(float(steps))
    fraction = float(fraction or 0.0)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"optim.warmup_fraction={fraction}: a share of the total steps, in [0, 1)")
    return int(fraction * total_steps)


def linear_schedule(total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0,
                    time_progress: Callable[[], float] | None = None,
                    decay_fraction: float = 1.0) -> Callable[[int], float]:  # fmt: skip
    """step -> lr factor: linear warmup, then linear decay to min_lr_ratio over the steps, or sooner when
    `time_progress()` (the share of the time budget used since warmup) is further along. With
    `decay_fraction` d < 1 the peak holds until a share 1 - d of the budget is used and the decay takes the rest."""
    total_steps = max(total_steps, 1)
    if not 0.0 < decay_fraction <= 1.0:
        raise ValueError(f"optim.decay_fraction={decay_fraction}: the share of the budget the decay takes, in (0, 1]")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        if time_progress is not None:
            progress = max(progress, time_progress())
        progress = max(0.0, progress - (1.0 - decay_fraction)) / decay_fraction
        return max(min_lr_ratio, 1.0 - min(progress, 1.0) * (1.0 - min_lr_ratio))

    return factor


class BudgetSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Linear warmup over `warmup_steps`, then linear decay to `min_lr_ratio` whichever budget runs out first:
    the steps (`total_steps`) or the time (`clock() -> (elapsed_s, budget_s)`, e.g. Lightning's Timer, which
    carries elapsed time over a resume). The decay's time axis starts where warmup ended."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                 min_lr_ratio: float = 0.0, clock: Callable[[], tuple[float, float] | None] | None = None,
                 decay_fraction: float = 1.0) -> None:  # fmt: skip
        self.total_steps, self.warmup_steps, self.min_lr_ratio = max(total_steps, 1), warmup_steps, min_lr_ratio
        self.decay_fraction = decay_fraction
        self.clock = clock
        self.warmup_end_s: float | None = None  # saved with the state, so a resumed run keeps its time axis
        self.time_progress = 0.0
        super().__init__(optimizer)

    def _time_progress(self) -> float:
        timing = self.clock() if self.clock is not None else None
        if timing is not None:
            elapsed, budget = timing
            if self.warmup_end_s is None:
                self.warmup_end_s = float(elapsed)
            self.time_progress = (elapsed - self.warmup_end_s) / max(budget - self.warmup_end_s, 1e-9)
        return self.time_progress

    def factor(self, step: int) -> float:
        schedule = linear_schedule(self.total_steps, self.warmup_steps, self.min_lr_ratio, self._time_progress,
                                   self.decay_fraction)  # fmt: skip
        return schedule(step)

    def get_lr(self) -> list[float]:
        factor = self.factor(self.last_epoch)
        return [base * factor for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        # plain values only (checkpoints load with weights_only): the clock is the trainer's, set again on resume
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "clock")}


def time_left(trainer: Any) -> tuple[float, float] | None:
    """(elapsed, remaining) seconds of training from the trainer's Timer (there is one when max_time is set)."""
    from pytorch_lightning.callbacks import Timer

    timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
    remaining = timer.time_remaining("train") if timer is not None else None
    return None if remaining is None else (timer.time_elapsed("train"), remaining)


def trainer_clock(trainer: Any) -> Callable[[], tuple[float, float] | None]:
    """(elapsed, budget) seconds of training, for BudgetSchedule."""
    if time_left(trainer) is None:
        raise ValueError("optim.time_keyed=true decays the lr to its floor at trainer.max_time: set trainer.max_time")

    def clock() -> tuple[float, float] | None:
        timing = time_left(trainer)
        return None if timing is None else (timing[0], timing[0] + timing[1])

    return clock


def probe_then_finetune(optimizer: torch.optim.Optimizer, optim: Mapping[str, Any], total_steps: int,
                        frozen: float, floor: float = 0.0,
                        decay_fraction: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:  # fmt: skip
    """LP-FT (Kumar et al. 2022): the encoder's lr is 0 for the first `frozen` share of the steps while the
    head trains on its features (a linear probe, at the run's schedule), then the encoder gets a warmup and
    decay of its own over the remaining steps. Fine-tuning everything from a random head moves the pretrained
    features before the head is any good, and the features of classes with few examples move most."""
    if not 0.0 < frozen < 1.0:
        raise ValueError(f"optim.freeze_encoder_fraction={frozen}: the share of the steps with a frozen encoder, in [0, 1)")
    if optim.get("time_keyed"):
        raise ValueError("optim.freeze_encoder_fraction is step-keyed: it cannot be combined with optim.time_keyed")
    start = int(frozen * total_steps)
    head = linear_schedule(total_steps, warmup_steps_from(optim, total_steps), floor, None, decay_fraction)
    encoder = linear_schedule(total_steps - start, warmup_steps_from(optim, total_steps - start), floor, None,
                              decay_fraction)  # fmt: skip

    def encoder_factor(step: int) -> float:
        return 0.0 if step < start else encoder(step - start)

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [head if group.get("head") else encoder_factor for group in optimizer.param_groups]
    )


def rebase_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler, step: int) -> None:
    """Set a freshly built step-keyed schedule to `step` and give the optimizer its lr there: a branch
    (`branch_from=`) restores the parent's weights, moments and step but follows its own schedule."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise TypeError(f"a branch follows a step-keyed LambdaLR schedule, not {type(scheduler).__name__}")
    scheduler.last_epoch = step
    scheduler._step_count = step + 1
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


class AnchoredAdamW(torch.optim.AdamW):
    """AdamW whose groups with `anchor_decay` > 0 decay toward the weights they held when the optimizer was
    built (the pretrained ones) instead of toward 0: L2-SP (Li et al. 2018) in AdamW's decoupled form. Each
    step pulls such a weight a share lr * anchor_decay of the way back to its anchor, so the pull follows the
    schedule (none while LP-FT freezes the encoder). Why: on small data fine-tuning distorts the pretrained
    features most for the classes with few examples (`tasks.probe`); LP-FT delays that, this bounds it. The
    anchors ride in the param groups, so a resumed run keeps pulling toward the same weights."""

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            if group.get("anchor_decay"):
                group.setdefault("anchors", [p.detach().clone() for p in group["params"]])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = super().step(closure)
        for group in self.param_groups:
            share = float(group.get("anchor_decay") or 0.0) * float(group["lr"])
            if share:
                for param, anchor in zip(group["params"], group["anchors"], strict=True):
                    param.lerp_(anchor, share)
        return loss


def build_optimizer(model: torch.nn.Module, optim: Mapping[str, Any], total_steps: int,
                    trainer: Any = None) -> dict[str, Any]:  # fmt: skip
    """The dict Lightning's configure_optimizers returns: AdamW + a per-step schedule (`trainer` gives the
    time budget when `optim.time_keyed`)."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    frozen = float(optim.get("freeze_encoder_fraction") or 0.0)
    anchor = float(optim.get("anchor_decay") or 0.0)
    # a frozen start or an anchored encoder needs the head in groups of its own (head_lr_scale 1 = the same lr)
    head_scale = optim.get("head_lr_scale") or (1.0 if frozen or anchor else None)
    groups = param_groups(model, float(optim.get("weight_decay", 0.01)), float(optim["lr"]),
                          optim.get("layer_decay"), head_scale)  # fmt: skip
    if anchor:
        top = max(float(g["lr"]) for g in groups if not g["head"])
        if anchor < 0 or anchor * top > 1:
            raise ValueError(f"optim.anchor_decay={anchor}: each step pulls lr * anchor_decay of the way back to "
                             f"the pretrained weights, a share in [0, 1] (the encoder's peak lr is {top:g})")
        for group in groups:  # the encoder decays toward its pretrained weights, not toward 0; heads as before
            if not group["head"]:
                group.update(anchor_decay=anchor, weight_decay=0.0)
    optimizer = (AnchoredAdamW if anchor else torch.optim.AdamW)(
        groups,
        lr=float(optim["lr"]),
        betas=tuple(optim.get("betas", (0.9, 0.999))),
        eps=float(optim.get("eps", 1e-6)),
        # fused on CPU only: on GPU, Lightning's bf16/16-mixed plugin refuses gradient clipping with a fused
        # optimizer (seen on an H200), so CUDA gets torch's foreach default (optim.fused=true needs
        # trainer.gradient_clip_val=null); FSDP/DeepSpeed may swap the optimizer's params, plain suits them
        fused=bool(optim.get("fused", on_cpu)),
    )
    warmup = warmup_steps_from(optim, total_steps)
    floor, decay_fraction = float(optim.get("min_lr_ratio", 0.0)), float(optim.get("decay_fraction", 1.0))
    if frozen:
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": probe_then_finetune(
            optimizer, optim, total_steps, frozen, floor, decay_fraction), "interval": "step"}}  # fmt: skip
    if optim.get("time_keyed"):
        clock = trainer_clock(trainer)
        schedule = BudgetSchedule(optimizer, total_steps, warmup, floor, clock, decay_fraction)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, warmup, floor, None, decay_fraction))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
