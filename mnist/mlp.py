"""The course's multi-layer perceptron, and its variants (conf/model/mlp*.yaml)."""
import sys

import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "elu": nn.ELU,
}
OUTPUTS = {"log_softmax": F.log_softmax, "softmax": F.softmax}


class MLP(nn.Module):
    """Flatten the 28x28 image, then Linear + activation per hidden layer, then Linear to 10 classes.

    The defaults are the course's network: 784 -> 128 (ReLU) -> 10, log_softmax.
    """

    def __init__(self, hidden=(128,), activations=("relu",), output="log_softmax"):
        super().__init__()
        layers = [nn.Flatten()]
        width = 28 * 28
        for size, activation in zip(hidden, activations):
            layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
            width = size
        layers.append(nn.Linear(width, 10))
        self.layers = nn.Sequential(*layers)
        self.output = output

    def forward(self, x):
        return OUTPUTS[self.output](self.layers(x), dim=1)


if __name__ == "__main__":  # python -m mnist.mlp [overrides]: the course's `python mlp.py`
    from mnist.run import main

    main(["model=mlp", *sys.argv[1:]])
