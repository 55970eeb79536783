"""Checkpoint files of the trainer: written atomically, read with ``weights_only=True``.

A checkpoint holds everything a resumed run needs to continue bit-for-bit: model,
optimizer (with MetaOptimize's meta state), schedule, averager, GradScaler, the random
number generators of every rank, the step and the config. Everything in it is a tensor or a
plain Python value, so loading it never runs pickled code.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """The state of every random number generator a training step can draw from."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # numpy's key array as a tensor, so the checkpoint stays loadable with weights_only=True
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save(state: dict[str, Any], path: str) -> None:
    """Write to a temporary file, then rename: a job killed mid-write keeps its previous checkpoint."""
    partial = f"{path}.{os.getpid()}.tmp"
    torch.save(state, partial)
    os.replace(partial, path)


def load(path: str) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
