"""Build the model a config names (model.arch), from the classes mnist/registry.py lists."""
import importlib

import torch
from omegaconf import OmegaConf

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
