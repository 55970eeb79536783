"""Dataset builders for the experiments: each returns a DataSplits (train, test, batch size, kind, model kwargs).

Builders read files that are already on disk and never download; a missing dataset raises
FileNotFoundError with the command that prepares it.
"""

from metaopt.data.common import DataSplits
from metaopt.data.images import cifar10, digits, fashion_mnist, imagenet, mnist
from metaopt.data.text import TokenWindows, text_corpus, tinystories, train_tokenizer

__all__ = [
    "DataSplits",
    "TokenWindows",
    "cifar10",
    "digits",
    "fashion_mnist",
    "imagenet",
    "mnist",
    "text_corpus",
    "tinystories",
    "train_tokenizer",
]
