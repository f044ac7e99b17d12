"""A residual block, imported by mynet.py from beside it (the file's folder is importable while gross loads it)."""

import torch.nn.functional as F
from torch import Tensor, nn


class Residual(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input; the second conv is dilated and bias-free."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=2, dilation=2, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
