"""Network definitions: the paper's 4-layer CIFAR net, CIFAR ResNets and a CIFAR VGG-16."""

from __future__ import annotations

from typing import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PaperNet", "CifarResNet", "VGG", "resnet20", "resnet18", "vgg16_bn", "build_model", "MODELS"]


class PaperNet(nn.Module):
    """The GroSS paper's CIFAR-10 network (METHOD.md section 8).

    Four 3x3 convs (``widths``; stride 1, padding 1, bias), each followed by ReLU and 2x2
    max-pooling, then FC -> 256, ReLU, dropout 0.5, FC -> classes. Input: (N, 3, 32, 32).

    Parameters
    ----------
    num_classes : int
    in_channels : int
    widths : 4 ints
        Channels of conv1..conv4.
    fc_std : float
        Standard deviation of the FC weights' normal init: 0.01 in the authors' code (the
        default, which trains), 0.1 in the paper's text (variance 0.01).
    image_size : int
        Input height and width; four poolings divide it by 16.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 32, 64, 64),
        fc_std: float = 0.01,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"PaperNet has four convs, got widths {list(widths)}")
        if image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (four 2x2 poolings), got {image_size}")
        c = [in_channels, *widths]
        self.conv1 = nn.Conv2d(c[0], c[1], 3, padding=1)
        self.conv2 = nn.Conv2d(c[1], c[2], 3, padding=1)
        self.conv3 = nn.Conv2d(c[2], c[3], 3, padding=1)
        self.conv4 = nn.Conv2d(c[3], c[4], 3, padding=1)
        self.fc1 = nn.Linear(c[4] * (image_size // 16) ** 2, 256)
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(256, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, fc_std)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.max_pool2d(F.relu(conv(x)), 2)
        x = self.dropout(F.relu(self.fc1(x.flatten(1))))
        return self.fc2(x)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual; a strided 1x1 conv-BN shortcut on a shape change."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ResNet for 32x32 inputs: a 3x3 stem, stages of basic blocks, global pooling, FC.

    Parameters
    ----------
    blocks : sequence of int
        Blocks per stage; every stage after the first halves the resolution with stride 2.
    widths : sequence of int
        Channels per stage.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (3, 3, 3),
        widths: Sequence[int] = (16, 32, 64),
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(blocks) != len(widths) or not blocks:
            raise ValueError(f"need one width per stage, got blocks={list(blocks)}, widths={list(widths)}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        c = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(c, w, stride=2 if i > 0 and j == 0 else 1))
                c = w
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """A CIFAR VGG: 3x3 conv-BN-ReLU layers and 2x2 max-pools (``"M"``), then one FC layer."""

    def __init__(self, layout: Sequence[int | str] = _VGG16, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in layout:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 of He et al. (2016) for CIFAR: 3 stages of 3 blocks, 16/32/64 channels."""
    return CifarResNet((3, 3, 3), (16, 32, 64), num_classes, in_channels)


def resnet18(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-18 with a 3x3 stem for CIFAR: 4 stages of 2 blocks, 64/128/256/512 channels."""
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels)


def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-16 with BatchNorm for 32x32 inputs (13 convs, one FC layer)."""
    return VGG(_VGG16, num_classes, in_channels)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "paper": PaperNet,
    "resnet20": resnet20,
    "resnet18": resnet18,
    "vgg16_bn": vgg16_bn,
}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a network by name (one of ``MODELS``) with keyword arguments of its constructor."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](**kwargs)
