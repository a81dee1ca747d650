"""Every name the config may use to pick code: model.arch, model.activations, model.output,
loss.name, optimizer.name, optimizer.scheduler, data.name and trainer.precision; and the models
that get a ready batch script (slurm/<name>.sh).

Standard library only: config.validate reads it on the login node, which never imports torch,
and refuses any other name there; mnist/models.py, mnist/optimizers.py, mnist/layers.py and mnist/losses.py
build from it on the compute node. tests/test_models.py builds every entry, so the two cannot disagree.
A new choice is one line.
"""
from typing import NamedTuple

# model.activations: name -> (torch.nn class, its arguments)
ACTIVATIONS = {
    "relu": ("ReLU", {}),
    "sigmoid": ("Sigmoid", {}),
    "tanh": ("Tanh", {}),
    "leaky_relu": ("LeakyReLU", {"negative_slope": 0.01}),
    "elu": ("ELU", {}),
}

# model.output: name -> the torch.nn.functional function applied to the last layer (None: none, the
# logits as they are), and what the model then gives, in the words the loss check uses
OUTPUTS = {
    "log_softmax": "log_softmax",
    "softmax": "softmax",
    "none": None,
}
GIVES = {"log_softmax": "log-probabilities", "softmax": "probabilities", "none": "logits"}


class Arch(NamedTuple):
    model_class: str  # "module.Class": mnist/models.py builds it with the keys of conf/model/<name>.yaml
    options: tuple  # those keys (besides name and arch), each an argument of the class
    outputs: tuple  # the model.output values it can give


# model.arch: name -> its class. A new architecture is a class in its own module, a line here and
# a conf/model/<name>.yaml (docs/models.md).
ARCHS = {
    "mlp": Arch("mnist.mlp.MLP", ("hidden", "activations", "output"), tuple(OUTPUTS)),
    "cnn": Arch("mnist.cnn.CNN", ("output",), tuple(OUTPUTS)),  # the course's ends in log_softmax
    "small_cnn": Arch("mnist.small_cnn.SmallCNN", ("channels", "output"), tuple(OUTPUTS)),
}

# model=<name> -> slurm/<name>.sh, the course's plain batch scripts (mnist/launch/scripts.py writes them)
SCRIPT_MODELS = ("mlp", "cnn")

# data.name: name -> torchvision's dataset class, which is also the folder under data.root
DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}

# trainer.precision: name -> the torch dtype autocast runs in (None: plain float32, no autocast)
PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


class Loss(NamedTuple):
    torch_class: str  # in torch.nn
    targets: str  # "classes": the labels as they are; "one_hot": ten columns, 1.0 at the label
    fits: tuple  # the model.output values it takes
    options: dict  # {option: an example value}: the other keys conf/loss/<name>.yaml may have


# loss.name -> the torch loss the course's notebooks use, as they use it. nll also takes a softmax model's
# probabilities: it takes their log first (the course's sigmoid MLP, mlp_sigmoid, trains so).
LOSSES = {
    "nll": Loss("NLLLoss", "classes", ("log_softmax", "softmax"), {}),
    "cross_entropy": Loss("CrossEntropyLoss", "classes", ("none",), {}),
    "mse": Loss("MSELoss", "one_hot", ("softmax",), {}),
    "bce": Loss("BCELoss", "one_hot", ("softmax",), {}),
    "bce_with_logits": Loss("BCEWithLogitsLoss", "one_hot", ("none",), {}),
    "smooth_l1": Loss("SmoothL1Loss", "one_hot", ("softmax",), {"beta": 1.0}),
    "huber": Loss("HuberLoss", "one_hot", ("softmax",), {"delta": 1.0}),
}

# optimizer.name: name -> (torch.optim class, {option: an example value}): the options, besides lr, that
# conf/optimizer/<name>.yaml may give it (each a number >= 0); `scheduler` is the scheduler's.
OPTIMIZERS = {
    "adadelta": ("Adadelta", {"rho": 0.9, "weight_decay": 0.0}),
    "sgd": ("SGD", {"momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0}),  # the notebook's: momentum 0.9
    "sgd_momentum": ("SGD", {"momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0}),
    "sgd_plain": ("SGD", {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0}),
    "adam": ("Adam", {"weight_decay": 0.0}),
    "adamw": ("AdamW", {"weight_decay": 0.01}),
    "rmsprop": ("RMSprop", {"alpha": 0.99, "momentum": 0.0, "weight_decay": 0.0}),
    "adagrad": ("Adagrad", {"lr_decay": 0.0, "weight_decay": 0.0}),
}

# optimizer.scheduler: null, or {name: <one of these>, <its options>}; without `name`, DEFAULT_SCHEDULER.
# name -> (torch.optim.lr_scheduler class, {option: an example value}); each option is a positive
# number of its example's type.
SCHEDULERS = {
    "step_lr": ("StepLR", {"step_size": 1, "gamma": 0.7}),
}
DEFAULT_SCHEDULER = "step_lr"
