"""CIFAR-style ResNet50, the teacher (He et al., arXiv 1512.03385).

Bottleneck blocks 3-4-6-3, a 3x3 stem and no max-pool, as in MergeNet's CIFAR code;
``fc.weight`` is ``[num_classes, 2048]``, the matrix the student's layer attends to.
"""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.residual_function = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.residual_function(x) + self.shortcut(x))


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        )
        self.conv2_x = self._stage(64, 64, 3, 1)
        self.conv3_x = self._stage(256, 128, 4, 2)
        self.conv4_x = self._stage(512, 256, 6, 2)
        self.conv5_x = self._stage(1024, 512, 3, 2)
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        # Each residual branch starts as the identity (Goyal et al., arXiv 1706.02677): without
        # it the initial gradient norm is ~130 and training from scratch at batch 32 diverges.
        for module in self.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.residual_function[-1].weight)

    @staticmethod
    def _stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [Bottleneck(in_channels, channels, stride)]
        layers += [Bottleneck(channels * Bottleneck.expansion, channels, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.conv5_x(self.conv4_x(self.conv3_x(self.conv2_x(x))))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)
