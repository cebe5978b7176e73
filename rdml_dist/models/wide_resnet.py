"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016): pre-activation blocks, widths 16, 16k, 32k, 64k.

The common strong member of heterogeneous cohorts; WRN-28-2 has ~1.47M parameters.
"""

import torch
import torch.nn.functional as F
from torch import nn

from rdml_dist.models.layers import classifier_head, conv3x3, init_weights


class PreActBlock(nn.Module):
    """BN-ReLU-conv3×3-BN-ReLU-(dropout)-conv3×3.

    Where the shape changes, the shortcut is a 1×1 conv of the pre-activated input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``; ``depth`` must be 6n+4 (16, 22, 28, 40, …)."""

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"Wide ResNet depth must be 6n+4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be a positive integer, got {widen_factor}")
        blocks_per_stage = (depth - 4) // 6
        self.stem = conv3x3(in_channels, 16)
        layers: list[nn.Module] = []
        channels = 16
        for stage, width in enumerate((16 * widen_factor, 32 * widen_factor, 64 * widen_factor)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(PreActBlock(channels, width, stride, dropout))
                channels = width
        self.stages = nn.Sequential(*layers)
        self.final = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())
        self.head = classifier_head(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.final(self.stages(self.stem(x))))
