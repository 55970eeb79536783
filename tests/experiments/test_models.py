"""Model builders: shapes, parameter counts, module names the optimizer's block presets rely on."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.param_groups import param_groups_by_prefix
from experiments.models import llama2c, llama2c_15m, mlp, resnet18, resnet18_cifar, small_cnn, tiny_transformer


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def test_llama2c_15m_has_exactly_the_published_parameter_count():
    model = llama2c_15m()
    assert count_parameters(model) == 15_191_712
    assert model.output.weight is model.tok_embeddings.weight
    assert model.layers[0].feed_forward.w1.out_features == 768  # llama2.c's hidden-dim rule for dim 288
    names = {name for name, _ in model.named_modules()}
    assert {"tok_embeddings", "layers.0", "layers.5", "norm", "output"} <= names
    assert "layers.6" not in names


def test_llama2c_blocks_cover_every_parameter_once():
    model = llama2c_15m(vocab_size=512)
    groups = param_groups_by_prefix(model, "llama2c")
    assert [g["block"] for g in groups] == ["embedding"] + [f"layer{i}" for i in range(6)] + ["head"]
    assert sum(p.numel() for g in groups for _, p in g["params"]) == count_parameters(model)


def test_tiny_transformer_forward_backward():
    torch.manual_seed(0)
    model = tiny_transformer(vocab_size=100, max_seq_len=16)
    x = torch.randint(0, 100, (3, 16))
    y = torch.randint(0, 100, (3, 16))
    logits = model(x)
    assert logits.shape == (3, 16, 100)
    loss = F.cross_entropy(logits.flatten(0, -2), y.flatten())
    assert abs(loss.item() - torch.log(torch.tensor(100.0)).item()) < 0.5  # small init: near-uniform predictions
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_llama2c_is_causal_and_supports_grouped_query_attention():
    torch.manual_seed(0)
    model = llama2c(vocab_size=50, max_seq_len=12, dim=32, n_layers=2, n_heads=4, n_kv_heads=2).eval()
    assert model.layers[0].attention.wk.out_features == 16  # 2 kv heads of size 8
    x = torch.randint(0, 50, (2, 12))
    changed = x.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    # a change at positions >= 8 must not reach the logits of positions < 8, and must reach position 8
    assert torch.allclose(model(x)[:, :8], model(changed)[:, :8], atol=1e-6)
    assert not torch.allclose(model(x)[:, 8], model(changed)[:, 8])


def test_llama2c_rejects_sequences_longer_than_max_seq_len():
    model = tiny_transformer(vocab_size=20, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_resnet18_cifar_stem_and_block_names():
    model = resnet18_cifar()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    groups = param_groups_by_prefix(model, "resnet18")
    assert [g["block"] for g in groups] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert sum(p.numel() for g in groups for _, p in g["params"]) == count_parameters(model)


def test_resnet18_cifar_on_one_channel_images():
    model = resnet18_cifar(num_classes=7, in_channels=1, image_size=28)
    assert model.conv1.in_channels == 1
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_resnet18_imagenet():
    model = resnet18()
    assert count_parameters(model) == 11_689_512  # torchvision's ResNet-18
    assert model.conv1.kernel_size == (7, 7) and isinstance(model.maxpool, nn.MaxPool2d)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    assert resnet18(num_classes=5, in_channels=1)(torch.randn(2, 1, 64, 64)).shape == (2, 5)


@pytest.mark.parametrize("build", [mlp, small_cnn])
def test_small_classifiers(build):
    model = build(num_classes=10, in_channels=1, image_size=8)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    model = build(num_classes=3, in_channels=3, image_size=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_small_cnn_rejects_images_too_small_for_its_pools():
    with pytest.raises(ValueError, match="max-pools"):
        small_cnn(num_classes=10, in_channels=1, image_size=8, channels=(8, 8, 8, 8))


@pytest.mark.parametrize("build", [resnet18_cifar, resnet18, mlp, small_cnn])
def test_classifiers_reject_unknown_options(build):
    with pytest.raises(TypeError):
        build(num_classes=10, in_channels=1, image_size=8, widht=3)


def test_language_models_reject_unknown_options():
    with pytest.raises(TypeError):
        llama2c(vocab_size=10, max_seq_len=8, n_layer=2)
