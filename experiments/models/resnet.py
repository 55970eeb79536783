"""torchvision's ResNet-18, for ImageNet and in the small-image (CIFAR) variant.

Both keep torchvision's module names (conv1, bn1, layer1..layer4, fc): the optimizer's
block presets (metaopt.param_groups.RESNET18_BLOCKS) select parameters by them.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18 as torchvision_resnet18
from torchvision.models.resnet import BasicBlock, ResNet

from metaopt.param_groups import RESNET18_BLOCKS


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
    model.named_blocks = dict(RESNET18_BLOCKS)
    return model


def resnet18(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """torchvision's ImageNet ResNet-18 (11.7 M parameters with 1000 classes); image_size as in resnet18_cifar."""
    model = torchvision_resnet18(num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = _stem(in_channels, kernel_size=7, stride=2)
    model.named_blocks = dict(RESNET18_BLOCKS)
    return model


def resnet_mini(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int = 8) -> nn.Module:
    """ResNet-18's layout shrunk for CPU runs: the CIFAR stem, one BasicBlock per stage, widths
    width, 2*width, 4*width, 8*width (ResNet-18 has two blocks per stage and width 64).

    It keeps torchvision's module names (conv1, bn1, layer1..layer4, fc), so the six-block
    preset of the paper's blockwise runs applies to it unchanged; the reproduction's SCALE=mini
    profile uses it as the stand-in for ResNet-18.
    """
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    # rebuild the stages at the reduced width; ResNet's own constructor fixes 64 channels
    model.inplanes = width
    model.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.maxpool = nn.Identity()
    model.layer1 = model._make_layer(BasicBlock, width, 1)
    model.layer2 = model._make_layer(BasicBlock, 2 * width, 1, stride=2)
    model.layer3 = model._make_layer(BasicBlock, 4 * width, 1, stride=2)
    model.layer4 = model._make_layer(BasicBlock, 8 * width, 1, stride=2)
    model.fc = nn.Linear(8 * width, num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    model.named_blocks = dict(RESNET18_BLOCKS)
    return model
