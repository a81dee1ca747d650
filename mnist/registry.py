"""Every name the config may use to pick code: model.arch, model.activations, model.output,
optimizer.name and optimizer.scheduler.

Standard library only: config.validate reads it on the login node, which never imports torch,
and refuses any other name there; mnist/models.py and mnist/mlp.py build from it on the compute
node. tests/test_models.py builds every entry, so the two cannot disagree. A new choice is one line.
"""

# model.activations: name -> (torch.nn class, its arguments)
ACTIVATIONS = {
    "relu": ("ReLU", {}),
    "sigmoid": ("Sigmoid", {}),
    "tanh": ("Tanh", {}),
    "leaky_relu": ("LeakyReLU", {"negative_slope": 0.01}),
    "elu": ("ELU", {}),
}

# model.output: name -> the torch.nn.functional function applied to the last layer
OUTPUTS = {
    "log_softmax": "log_softmax",
    "softmax": "softmax",
}

# model.arch: name -> the model.output values it can give (builders: mnist/models.py's BUILDERS)
ARCHS = {
    "mlp": tuple(OUTPUTS),
    "cnn": ("log_softmax",),  # the course's CNN ends in log_softmax
}

# optimizer.name: name -> torch.optim class; the file's other keys (but `scheduler`) are its arguments
OPTIMIZERS = {
    "adadelta": "Adadelta",
    "sgd": "SGD",
    "adam": "Adam",
    "adamw": "AdamW",
    "rmsprop": "RMSprop",
    "adagrad": "Adagrad",
}

# optimizer.scheduler: null, or {name: <one of these>, <its options>}; without `name`, DEFAULT_SCHEDULER.
# name -> (torch.optim.lr_scheduler class, {option: an example value}); each option is a positive
# number of its example's type.
SCHEDULERS = {
    "step_lr": ("StepLR", {"step_size": 1, "gamma": 0.7}),
}
DEFAULT_SCHEDULER = "step_lr"
