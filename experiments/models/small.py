"""Small image classifiers for CPU runs and tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def mlp(num_classes: int, in_channels: int, image_size: int, hidden: Sequence[int] = (128,),
        activation: str = "relu") -> nn.Sequential:
    """Flatten, then Linear + activation (``relu`` or ``tanh``) for each hidden width, then a Linear to the
    class logits."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"model.activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels * image_size * image_size
    for h in hidden:
        layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def linear(inputs: int, outputs: int = 1) -> nn.Linear:
    """A linear model without bias, its weights starting at zero: the learner of the linear tracking
    stream (experiments/data/streams.py) and of IDBD."""
    model = nn.Linear(inputs, outputs, bias=False)
    nn.init.zeros_(model.weight)
    return model


def small_cnn(num_classes: int, in_channels: int, image_size: int, channels: Sequence[int] = (16, 32)) -> nn.Sequential:
    """3x3 conv + ReLU + 2x2 max-pool for each channel count, then a Linear on the flattened features."""
    size = image_size // 2 ** len(channels)  # each max-pool halves the side, rounding down
    if size < 1:
        raise ValueError(
            f"{len(channels)} max-pools shrink a {image_size}x{image_size} image to nothing; use fewer channels"
        )
    layers: list[nn.Module] = []
    for c in channels:
        layers += [nn.Conv2d(in_channels, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        in_channels = c
    layers += [nn.Flatten(), nn.Linear(in_channels * size * size, num_classes)]
    return nn.Sequential(*layers)


class SixBlockMLP(nn.Module):
    """An MLP in six named parts, ``stem``, ``layer1`` ... ``layer4`` and ``head``, as ResNet-18's six
    blocks: the CPU-scale stand-in for the paper's blockwise step sizes (``named_blocks``).

    The stem maps the flattened image to ``width`` units and each layer is Linear at ``width``; both
    are followed by a layer normalisation without parameters and a ReLU, and the head maps to the
    class logits. The normalisation stands in for ResNet-18's BatchNorms: it makes the network
    invariant to the scale of each hidden layer's weights, which is what lets SGDm train under the
    paper's weight decay of 0.1 (without it the decay shrinks the product of six layers' weights,
    and with it the signal, to nothing). Having no parameters, it leaves the optimizer the same
    twelve tensors.
    """

    named_blocks = {name: (name,) for name in ("stem", "layer1", "layer2", "layer3", "layer4", "head")}

    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int = 128):
        super().__init__()
        self.stem = nn.Linear(in_channels * image_size * image_size, width)
        self.layer1, self.layer2, self.layer3, self.layer4 = (nn.Linear(width, width) for _ in range(4))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in (self.stem, self.layer1, self.layer2, self.layer3, self.layer4):
            x = torch.relu(nn.functional.layer_norm(layer(x), (layer.out_features,)))
        return self.head(x)
