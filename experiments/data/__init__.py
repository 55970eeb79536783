"""Dataset builders for the experiments: each returns a DataSplits (train, test, batch size, model kwargs).

Builders read files that are already on disk and never download; a missing dataset raises
FileNotFoundError with the command that prepares it.
"""

from experiments.data.common import DataSplits
from experiments.data.images import cifar10, digits, fashion_mnist, imagenet, mnist
from experiments.data.streams import linear_tracking, permuted_digits
from experiments.data.text import TokenWindows, text_corpus, tinystories, train_tokenizer

__all__ = [
    "DataSplits",
    "TokenWindows",
    "cifar10",
    "digits",
    "fashion_mnist",
    "imagenet",
    "linear_tracking",
    "mnist",
    "permuted_digits",
    "text_corpus",
    "tinystories",
    "train_tokenizer",
]
