"""The course's convolutional network (as in pytorch/examples' mnist)."""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from mnist.layers import output_function


class CNN(nn.Module):
    """The course's CNN; `output` as for the MLP (the course's: log_softmax)."""

    def __init__(self, output="log_softmax"):
        super().__init__()
        self.output = output
        self.output_function = output_function(output)
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        x = self.fc2(x)
        return self.output_function(x)


if __name__ == "__main__":  # python -m mnist.cnn [overrides]: the course's `python cnn.py`
    from mnist.run import main

    main(["model=cnn", *sys.argv[1:]])
