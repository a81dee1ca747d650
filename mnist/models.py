"""Build the model and the optimizer a config names, from the choices in mnist/registry.py."""
import importlib

import torch
from omegaconf import OmegaConf
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from mnist import registry
from mnist.errors import UserError


def build_model(model_cfg) -> torch.nn.Module:
    """The class registry.ARCHS names for model.arch, given every other key of conf/model/<name>.yaml."""
    module_name, class_name = registry.ARCHS[model_cfg.arch].model_class.rsplit(".", 1)
    model_class = getattr(importlib.import_module(module_name), class_name)
    options = {k: v for k, v in OmegaConf.to_container(model_cfg).items() if k not in ("name", "arch")}
    try:
        return model_class(**options)
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. a negative size: torch's words, not a traceback
        given = ", ".join(f"model.{k}={v}" for k, v in options.items())
        raise UserError(f"model={model_cfg.name} (model.arch={model_cfg.arch}) cannot be built from {given}: {e}. "
                        f"Check these values on the command line or in conf/model/{model_cfg.name}.yaml.") from None


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
