"""The course's multi-layer perceptron, and its variants (conf/model/mlp*.yaml)."""
import sys

import torch
import torch.nn as nn

from mnist.layers import activation, output_function


class MLP(nn.Module):
    """Flatten the 28x28 image, then Linear + activation per hidden layer, then Linear to 10 classes.

    The defaults are the course's network: 784 -> 128 (ReLU) -> 10, log_softmax.
    """

    def __init__(self, hidden=(128,), activations=("relu",), output="log_softmax"):
        super().__init__()
        layers = [nn.Flatten()]
        width = 28 * 28
        for size, name in zip(hidden, activations):
            layers += [nn.Linear(width, size), activation(name)]
            width = size
        layers.append(nn.Linear(width, 10))
        self.layers = nn.Sequential(*layers)
        self.output = output
        self.output_function = output_function(output)

    def forward(self, x) -> torch.Tensor:
        return self.output_function(self.layers(x))


if __name__ == "__main__":  # python -m mnist.mlp [overrides]: the course's `python mlp.py`
    from mnist.run import main

    main(["model=mlp", *sys.argv[1:]])
