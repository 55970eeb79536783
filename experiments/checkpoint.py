"""Checkpoint files of the trainer: checksummed, written atomically, read with ``weights_only=True``.

A checkpoint holds everything a resumed run needs to continue bit-for-bit: model,
optimizer (with MetaOptimize's meta state), schedule, averager, GradScaler, the random
number generators of every rank, the step and the config. Everything in it is a tensor or a
plain Python value, so loading it never runs pickled code.

The file holds ``{"sha256": digest, "payload": state}``, the digest taken over every tensor's
bytes, dtype and shape and every plain value of the state; ``load`` recomputes it, so a flipped
bit, a truncated copy or another file under the name is refused rather than resumed from.
Saving first links the current checkpoint to ``checkpoint.previous.pt``, so a damaged
checkpoint still leaves the one before it to resume from.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from typing import Any

import numpy as np
import torch

from experiments.files import atomic_write, temporary_name


class DamagedCheckpoint(ValueError):
    """A checkpoint file that cannot be read or whose payload does not match its checksum."""


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


def previous_path(path: str) -> str:
    """Where ``save`` keeps the checkpoint it replaces: checkpoint.pt -> checkpoint.previous.pt."""
    stem, extension = os.path.splitext(path)
    return f"{stem}.previous{extension}"


def save(state: dict[str, Any], path: str) -> None:
    """Keep the current checkpoint as the previous one, then write the new one atomically."""
    digest = payload_digest(state)
    if os.path.exists(path):
        previous = previous_path(path)
        partial = temporary_name(previous)
        try:
            os.link(path, partial)  # no copy: the previous checkpoint is the current file's second name
        except OSError:  # a file system without hard links
            shutil.copyfile(path, partial)
        os.replace(partial, previous)
    with atomic_write(path, "wb") as f:
        torch.save({"sha256": digest, "payload": state}, f)


def load(path: str) -> dict[str, Any]:
    """The state saved in ``path``, verified against its checksum; DamagedCheckpoint otherwise."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged zip or pickle fails in many ways, all meaning the same
        raise DamagedCheckpoint(f"{path} cannot be read ({type(error).__name__}: {str(error)[:200]})") from error
    if isinstance(saved, dict) and "step" in saved and "payload" not in saved:
        return saved  # written before checkpoints carried a checksum: nothing to verify it against
    if not (isinstance(saved, dict) and saved.keys() == {"sha256", "payload"}):
        raise DamagedCheckpoint(f"{path} is not a metaopt checkpoint (it holds {_describe(saved)})")
    if payload_digest(saved["payload"]) != saved["sha256"]:
        raise DamagedCheckpoint(f"{path} is damaged: its contents do not match the checksum saved with them")
    return saved["payload"]


def load_for_resume(path: str) -> dict[str, Any] | None:
    """The checkpoint a run continues from (None if there is none yet).

    A damaged one is never used: the error names it and the two ways on, resuming from the
    previous checkpoint when that one verifies, or starting the run over.
    """
    if not os.path.exists(path):
        return None
    try:
        return load(path)
    except DamagedCheckpoint as damage:
        previous = previous_path(path)
        try:
            previous_step = load(previous)["step"] if os.path.exists(previous) else None
        except DamagedCheckpoint:
            previous_step = None
        restart = f"start the run over: rm {path}" + (f" {previous}" if os.path.exists(previous) else "")
        if previous_step is None:
            choices = f"No verified previous checkpoint is kept, so {restart}"
        else:
            choices = (f"Either resume from the previous checkpoint (step {previous_step}, verified): mv {previous} {path}"
                       f" (metrics.csv is trimmed to that step and the steps after it are run again), or {restart}")
        raise DamagedCheckpoint(f"{damage}; it was not used. {choices}, then run the same command again.") from None


def payload_digest(state: Any) -> str:
    """SHA-256 over the state: every tensor's dtype, shape and bytes, every plain value's type and repr, in order."""
    digest = hashlib.sha256()

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}\n".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)}\n".encode())
            for key, item in value.items():
                visit(key)
                visit(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__} {len(value)}\n".encode())
            for item in value:
                visit(item)
        else:
            digest.update(f"{type(value).__name__} {value!r}\n".encode())

    visit(state)
    return digest.hexdigest()


def first_non_finite(tree: Any, name: str = "") -> str | None:
    """The name (path of keys) of the first floating-point tensor in ``tree`` holding a NaN or an infinity."""
    if isinstance(tree, torch.Tensor):
        return name if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        found = first_non_finite(value, f"{name}.{key}" if name else str(key))
        if found is not None:
            return found
    return None


def _describe(value: Any) -> str:
    return f"keys {sorted(map(str, value))[:8]}" if isinstance(value, dict) else f"a {type(value).__name__}"
