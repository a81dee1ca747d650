"""Build the optimizer and its learning-rate scheduler a config names (conf/optimizer/), from mnist/registry.py."""
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from mnist import registry


def build_optimizer(optimizer_cfg, parameters) -> tuple[Optimizer, LRScheduler | None]:
    """The optimizer with every key of conf/optimizer/<name>.yaml but `name` and `scheduler`."""
    options = {k: v for k, v in optimizer_cfg.items() if k not in ("name", "scheduler")}
    torch_class, _ = registry.OPTIMIZERS[optimizer_cfg.name]
    optimizer = getattr(torch.optim, torch_class)(parameters, **options)
    return optimizer, build_scheduler(optimizer_cfg.scheduler, optimizer)


def build_scheduler(scheduler_cfg, optimizer) -> LRScheduler | None:
    """None for `scheduler: null`; else the scheduler `name` picks (registry.DEFAULT_SCHEDULER without one)."""
    if scheduler_cfg is None:
        return None
    options = dict(scheduler_cfg)
    torch_class, _ = registry.SCHEDULERS[options.pop("name", registry.DEFAULT_SCHEDULER)]
    return getattr(torch.optim.lr_scheduler, torch_class)(optimizer, **options)
