"""CIFAR-style MobileNetV2, the student (Sandler et al., arXiv 1801.04381).

Layer names and shapes follow the original MergeNet code, because fusion addresses a
parameter by its state_dict name: ``stage6.2.residual.6.weight`` is ``[160, 960, 1, 1]``.
"""

from __future__ import annotations

import torch
from torch import nn


class LinearBottleNeck(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int = 6) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
            nn.BatchNorm2d(out_channels),
        )
        self.use_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        return out + x if self.use_skip else out


def _stage(repeat: int, in_channels: int, out_channels: int, stride: int, expansion: int) -> nn.Sequential:
    blocks = [LinearBottleNeck(in_channels, out_channels, stride, expansion)]
    blocks += [LinearBottleNeck(out_channels, out_channels, 1, expansion) for _ in range(repeat - 1)]
    return nn.Sequential(*blocks)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        # The original stem is a 1x1 conv with padding 1 (34x34 maps on CIFAR); kept as is
        # so that checkpoints and accuracy stay comparable with MergeNet's.
        self.pre = nn.Sequential(nn.Conv2d(in_channels, 32, 1, padding=1), nn.BatchNorm2d(32), nn.ReLU6(inplace=True))
        self.stage1 = LinearBottleNeck(32, 16, 1, 1)
        self.stage2 = _stage(2, 16, 24, 2, 6)
        self.stage3 = _stage(3, 24, 32, 2, 6)
        self.stage4 = _stage(4, 32, 64, 2, 6)
        self.stage5 = _stage(3, 64, 96, 1, 6)
        self.stage6 = _stage(3, 96, 160, 1, 6)
        self.stage7 = LinearBottleNeck(160, 320, 1, 6)
        self.conv1 = nn.Sequential(nn.Conv2d(320, 1280, 1), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True))
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = self.stage5(x)
        x = self.stage6(x)
        x = self.stage7(x)
        x = self.conv1(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.linear(x)
