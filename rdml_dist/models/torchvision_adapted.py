"""torchvision's ResNet-18 and MobileNetV2, untrained, adapted to 32×32 (and smaller) inputs.

The ImageNet stems downsample 4× (ResNet-18) or 2× before any block, which leaves too
little of a 32×32 image; the usual CIFAR adaptations below keep the early resolution.
torchvision is imported when one of them is built (importing it costs a student process
about a second, which a cohort of the other models need not pay).
"""

from torch import nn

from rdml_dist.models.layers import conv3x3

# torchvision's MobileNetV2 setting (expansion t, channels c, repeats n, stride s) with the
# second stage's stride set to 1, the standard CIFAR change: 32×32 inputs end at 4×4, not 1×1.
CIFAR_MOBILENETV2_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


def _stride1_stem(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 3×3 stride-1 first convolution replacing an ImageNet stem, initialised as torchvision does."""
    conv = conv3x3(in_channels, out_channels)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def cifar_resnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet-18 with a 3×3 stride-1 first convolution and no max pool (11.2M parameters)."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = _stride1_stem(in_channels, model.conv1.out_channels)
    model.maxpool = nn.Identity()
    return model


def cifar_mobilenetv2(
    num_classes: int, in_channels: int = 3, width_mult: float = 1.0, dropout: float = 0.2
) -> nn.Module:
    """MobileNetV2 with a stride-1 first convolution and stride 1 in its second stage (8× downsampling in all)."""
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(
        weights=None,
        num_classes=num_classes,
        width_mult=width_mult,
        dropout=dropout,
        inverted_residual_setting=CIFAR_MOBILENETV2_SETTING,
    )
    stem = model.features[0]
    stem[0] = _stride1_stem(in_channels, stem[0].out_channels)
    return model
