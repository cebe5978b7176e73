"""Small models for quick cohorts: the 8×8 digits data set trains them in seconds on a CPU."""

import math
from collections.abc import Sequence

import torch
from torch import nn

from rdml_dist.models.layers import classifier_head, conv3x3, init_weights


class MLP(nn.Sequential):
    """Flatten → (Linear → ReLU → Dropout)* → Linear; the cheapest, least convolutional cohort member.

    Takes float inputs of any shape (images, feature vectors), flattened per sample.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: Sequence[int],
        hidden: Sequence[int] = (128, 64),
        dropout: float = 0.0,
    ) -> None:
        if isinstance(hidden, (str, bytes)) or not all(
            isinstance(width, int) and not isinstance(width, bool) and width > 0 for width in hidden
        ):
            raise ValueError(f"hidden must be a list of positive integers, got {hidden!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        features = math.prod(input_shape)
        for width in hidden:
            layers += [nn.Linear(features, width), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            features = width
        layers.append(nn.Linear(features, num_classes))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers (width, 2·width stride 2, 2·width) → global pool → linear.

    Sized for 8×8 digits (one downsampling keeps a 4×4 map) yet valid for 28×28 and 32×32.
    """

    def __init__(self, num_classes: int, in_channels: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *self._stage(in_channels, width, stride=1),
            *self._stage(width, 2 * width, stride=2),
            *self._stage(2 * width, 2 * width, stride=1),
        )
        self.head = classifier_head(2 * width, num_classes)
        init_weights(self)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
        return [conv3x3(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
