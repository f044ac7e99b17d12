"""A user's own network, as a user would write it: not one of gross's, loaded by file path.

BatchNorm, a residual block (from a helper file beside it), a strided conv, a depthwise conv, a
1x1 conv, odd widths (24, 48, 96) and global pooling, so any input size works.
"""

import torch.nn.functional as F
from blocks import Residual
from torch import Tensor, nn


class MyNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 24) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.block = Residual(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.dw = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width)
        self.pw = nn.Conv2d(2 * width, 4 * width, 1)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block(F.relu(self.bn(self.stem(x))))
        x = F.relu(self.pw(F.relu(self.dw(F.relu(self.down(x))))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def build(num_classes: int = 10, width: int = 24) -> MyNet:
    """A factory function, as Hydra and Lightning users often name their models."""
    return MyNet(num_classes=num_classes, width=width)
