"""A smaller CNN: one 3x3 convolution, max-pool, one linear layer. docs/models.md's example of a new model."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from mnist.layers import output_function


class SmallCNN(nn.Module):
    def __init__(self, channels=16, output="log_softmax"):
        super().__init__()
        self.output = output  # mnist/losses.py reads what the model gives
        self.output_function = output_function(output)
        self.conv = nn.Conv2d(1, channels, 3, 1)  # 28x28 -> 26x26
        self.fc = nn.Linear(channels * 13 * 13, 10)  # after a 2x2 max-pool: 13x13

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.output_function(self.fc(torch.flatten(x, 1)))
