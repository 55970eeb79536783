"""Named blocks as param groups: the paper's ResNet-18 and transformer presets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaopt import MetaOptimize, param_groups_by_prefix
from experiments.models import resnet18_cifar, tiny_transformer


def step_once(model, optimizer, inputs):
    optimizer.zero_grad()
    model(inputs).float().square().mean().backward()
    optimizer.step()


def test_resnet18_preset_gives_the_paper_six_blocks():
    model = resnet18_cifar(num_classes=10)
    groups = param_groups_by_prefix(model, "resnet18")
    assert [g["block"] for g in groups] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = MetaOptimize(groups, "sgdm", "adam", "param_group", alpha0=1e-3, meta_lr=0.1)
    step_once(model, optimizer, torch.randn(2, 3, 32, 32))
    step_once(model, optimizer, torch.randn(2, 3, 32, 32))
    sizes = optimizer.step_sizes()
    assert list(sizes) == [f"step_size/{b}" for b in ("stem", "layer1", "layer2", "layer3", "layer4", "head")]
    assert len(set(sizes.values())) == 6  # six blocks, six step sizes


def test_no_decay_groups_share_their_block_step_size():
    torch.manual_seed(0)
    model = resnet18_cifar(num_classes=10)
    groups = param_groups_by_prefix(model, "resnet18", no_decay=True, alpha0=1e-3)
    assert len(groups) == 12
    assert all(g["weight_decay"] == 0.0 for g in groups if all(p.dim() < 2 for _, p in g["params"]))
    optimizer = MetaOptimize(groups, "adamw", "adam", "param_group", meta_lr=0.1)
    # three steps: at the second, Adam's normalised meta step is +-meta_lr in every block alike
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        step_once(model, optimizer, torch.randn(2, 3, 32, 32, generator=generator))
    assert len(optimizer.step_sizes()) == 6
    assert torch.equal(optimizer.step_size(model.layer1[0].conv1.weight), optimizer.step_size(model.layer1[0].bn1.weight))
    assert not torch.equal(optimizer.step_size(model.layer1[0].conv1.weight), optimizer.step_size(model.fc.weight))
    assert optimizer.state[model.fc.weight]["trace"].abs().sum() > 0


def test_llama2c_preset_has_embedding_each_layer_and_head():
    model = tiny_transformer(vocab_size=64, max_seq_len=16, n_layers=3)
    groups = param_groups_by_prefix(model, "llama2c")
    assert [g["block"] for g in groups] == ["embedding", "layer0", "layer1", "layer2", "head"]
    # the output layer is tied to the embedding: it is counted once, in the embedding block
    names = [name for g in groups for name, _ in g["params"]]
    assert "tok_embeddings.weight" in names and "output.weight" not in names
    optimizer = MetaOptimize(groups, "adamw", "adam", "param_group", alpha0=1e-3, meta_lr=0.1)
    step_once(model, optimizer, torch.randint(0, 64, (2, 16)))
    step_once(model, optimizer, torch.randint(0, 64, (2, 16)))
    assert len(optimizer.step_sizes()) == 5


def test_prefixes_must_cover_every_parameter_once():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"parameters \['1.weight', '1.bias'\] match no block"):
        param_groups_by_prefix(model, {"first": ["0"]})
    with pytest.raises(ValueError, match=r"'0.weight' matches several blocks \['a', 'b'\]"):
        param_groups_by_prefix(model, {"a": ["0"], "b": ["0.weight"], "c": ["1"]})
    with pytest.raises(ValueError, match="unknown block preset 'vgg'"):
        param_groups_by_prefix(model, "vgg")
