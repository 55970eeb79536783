"""torchvision's ResNet-18, for ImageNet and in the small-image (CIFAR) variant.

Both keep torchvision's module names (conv1, bn1, layer1..layer4, fc): the optimizer's
block presets (metaopt.blocks.RESNET18_BLOCKS) select parameters by them.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18 as torchvision_resnet18


def _stem(in_channels: int, kernel_size: int, stride: int) -> nn.Conv2d:
    """A first convolution to 64 channels, initialised as torchvision initialises its own."""
    conv = nn.Conv2d(in_channels, 64, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """ResNet-18 for 32x32-scale images, as in the paper's CIFAR-10 runs: 3x3 stride-1 stem, no max-pool.

    image_size is accepted so that every classifier takes the same model_kwargs; the adaptive
    average pool before fc makes the network work for any size (8x8 digits included).
    """
    model = torchvision_resnet18(num_classes=num_classes)
    # the ImageNet stem (7x7 stride 2, then max-pool) would shrink 32x32 to 8x8 before layer1
    model.conv1 = _stem(in_channels, kernel_size=3, stride=1)
    model.maxpool = nn.Identity()
    return model


def resnet18(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """torchvision's ImageNet ResNet-18 (11.7 M parameters with 1000 classes); image_size as in resnet18_cifar."""
    model = torchvision_resnet18(num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = _stem(in_channels, kernel_size=7, stride=2)
    return model
