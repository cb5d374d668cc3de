"""AdamW with BERT's decay exclusions and a linear warmup / linear decay schedule, shared by all tasks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """BERT applies no weight decay to biases and LayerNorm weights (Devlin et al., Google's optimization.py)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "LayerNorm" in name or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


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


def linear_schedule(total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0):
    total_steps = max(total_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return max(min_lr_ratio, 1.0 - progress * (1.0 - min_lr_ratio))

    return factor


def build_optimizer(model: torch.nn.Module, optim: Mapping[str, Any], total_steps: int) -> dict[str, Any]:
    """The dict Lightning's configure_optimizers returns: AdamW + per-step LambdaLR."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    optimizer = torch.optim.AdamW(
        param_groups(model, float(optim.get("weight_decay", 0.01))),
        lr=float(optim["lr"]),
        betas=tuple(optim.get("betas", (0.9, 0.999))),
        eps=float(optim.get("eps", 1e-6)),
        # fused AdamW runs on CPU and CUDA; FSDP/DeepSpeed may swap the optimizer's params, keep it plain there
        fused=bool(optim.get("fused", on_cpu or torch.cuda.is_available())),
    )
    warmup = warmup_steps_from(optim, total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(total_steps, warmup, float(optim.get("min_lr_ratio", 0.0)))
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
