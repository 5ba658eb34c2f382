"""The user's model."""

from torch import nn


class SpiralNet(nn.Module):
    def __init__(self, hidden: int = 64, num_classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)
