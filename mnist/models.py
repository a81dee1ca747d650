"""Build the model and the optimizer a config names."""
import torch

from mnist.cnn import CNN
from mnist.mlp import MLP

OPTIMIZERS = {
    "adadelta": torch.optim.Adadelta,
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}


def build_model(model_cfg):
    if model_cfg.arch == "cnn":
        return CNN()
    return MLP(list(model_cfg.hidden), list(model_cfg.activations), model_cfg.output)


def build_optimizer(optimizer_cfg, parameters):
    """The optimizer with every key of conf/optimizer/<name>.yaml but `name` and `scheduler`."""
    options = {k: v for k, v in optimizer_cfg.items() if k not in ("name", "scheduler")}
    optimizer = OPTIMIZERS[optimizer_cfg.name](parameters, **options)
    scheduler = None
    if optimizer_cfg.scheduler is not None:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, **optimizer_cfg.scheduler)
    return optimizer, scheduler
