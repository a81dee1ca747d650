"""The layers every model may take by name from mnist/registry.py: an activation, and what the last layer's
outputs go through. A model's own file builds the rest."""
import functools
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mnist import registry


def activation(name) -> nn.Module:
    """A new layer of the activation mnist/registry.py calls `name`."""
    torch_class, arguments = registry.ACTIVATIONS[name]
    return getattr(nn, torch_class)(**arguments)


def output_function(name) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the last layer's outputs go through (registry.OUTPUTS): log_softmax, softmax, or nothing."""
    function = registry.OUTPUTS[name]
    return functools.partial(getattr(F, function), dim=1) if function else nn.Identity()
