"""The recipe's moving parts: parameter groups, the optimizer, the learning-rate schedule.

Every tutorial default gives the tutorial's SGD and StepLR. The optimizer always has the same
groups for a given config (head first, then the backbone; split by weight decay when there is
any), whatever is frozen at the moment, so its state saves and resumes the same before, at and
after a --freeze-epochs switch: frozen parameters get no gradient, and both optimizers skip those.
"""

import torch

from tl.core.config import Config


def param_groups(net: torch.nn.Module, head: torch.nn.Module, cfg: Config,
                 depths: tuple[dict[str, int], int] | None = None) -> list[dict]:
    """What trains, grouped: {"name", "params", "lr", "weight_decay"}, the head's group first (its lr
    is --lr, the one the metrics show). Parameters frozen for good (feature-extract) are left out.
    depths (--layer-decay: tl.model.network.layer_depths): the backbone in a group per layer, from the top
    down, layer d's lr --lr x --backbone-lr-scale x D^(top - d)."""
    head_ids = {id(p) for p in head.parameters()}
    groups: dict[str, dict] = {}
    for n, p in net.named_parameters():
        if not p.requires_grad:
            continue
        depth = None if depths is None or id(p) in head_ids else depths[0][n]
        part = "head" if id(p) in head_ids else "backbone" if depth is None else f"layer{depth}"
        # Biases and normalization parameters are not decayed (timm's and most recipes' rule).
        decay = cfg.weight_decay if p.ndim > 1 else 0.0
        name = part if not cfg.weight_decay or decay else f"{part}.no_decay"
        lr = cfg.lr * (1.0 if part == "head" else cfg.backbone_lr_scale)
        if depth is not None:
            lr *= cfg.layer_decay ** (depths[1] - depth)
        groups.setdefault(name, {"name": name, "params": [], "lr": lr, "weight_decay": decay})["params"].append(p)
    layers = [f"layer{d}" for d in range(depths[1], -1, -1)] if depths else []
    order = [f"{part}{suffix}" for part in ("head", "backbone", *layers) for suffix in ("", ".no_decay")]
    return [groups[name] for name in order if name in groups]


def describe(groups: list[dict]) -> list[dict]:
    """The groups as config.json and W&B record them."""
    return [{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"],
             "tensors": len(g["params"]), "parameters": sum(p.numel() for p in g["params"])} for g in groups]


def build_optimizer(groups: list[dict], cfg: Config) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch: StepLR or cosine to 0 at --epochs, after an optional linear warmup."""
    S = torch.optim.lr_scheduler
    after = cfg.epochs - cfg.warmup_epochs
    main = S.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma) if cfg.schedule == "step" \
        else S.CosineAnnealingLR(optimizer, T_max=max(after, 1))
    if not cfg.warmup_epochs:
        return main
    warmup = S.LinearLR(optimizer, start_factor=1 / (cfg.warmup_epochs + 1), total_iters=cfg.warmup_epochs)
    return S.SequentialLR(optimizer, [warmup, main], milestones=[cfg.warmup_epochs])
