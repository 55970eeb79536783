"""What every dataset builder returns, and the error it raises when its files are missing."""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch.utils.data import Dataset


@dataclass
class DataSplits:
    """The train and test splits of a dataset, with what the trainer and the model builders need.

    Image classification: items are (float image (C, H, W), int64 label), and model_kwargs holds
    num_classes, in_channels and image_size. Language modelling: items are (int64 tokens (T,),
    int64 next tokens (T,)), and model_kwargs holds vocab_size and max_seq_len. A stream
    (experiments/data/streams.py) is read in order, each example once (``shuffle=False``), and may be
    a regression: the trainer's loss is then the half squared error, and it logs no accuracy.
    """

    train: Dataset
    test: Dataset
    batch_size: int
    model_kwargs: dict
    shuffle: bool = True  # a fresh permutation of the train split every epoch; False: in order
    task: str = "classification"  # or "regression"


def require(*paths: str, prepare: str) -> None:
    """Raise FileNotFoundError naming the first missing path and the command that prepares it.

    Builders never download anything themselves: a run on a cluster node without internet
    should fail at once with the fix in the message, not hang on a download.
    """
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found. Prepare it with:\n    {prepare}")
