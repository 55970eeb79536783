"""Run folders: the resolver that names them, and reading a finished one back.

conf/hydra/default.yaml joins a folder's parts with ``${path_join:...}``. Whatever composes that
config (the training entry point, the reproduction pipeline, the tests) registers it first with
:func:`register_resolvers`. :func:`read_run` gives a folder's logged rows, as runs.csv holds them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from omegaconf import OmegaConf


def path_join(*parts: object) -> str:
    """The parts joined by ``/``, skipping empty ones (no experiment, no overrides besides the seed)."""
    return "/".join(str(part) for part in parts if part not in (None, ""))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("path_join"):
        OmegaConf.register_new_resolver("path_join", path_join)


def read_run(folder: Path) -> list[dict[str, str]]:
    """The run's metrics.csv rows, each with its status from meta.json ("finished", "failed", ...);
    no rows if it has logged none yet."""
    meta, metrics = folder / "meta.json", folder / "metrics.csv"
    if not metrics.exists():
        return []
    status = json.loads(meta.read_text()).get("status", "unknown") if meta.exists() else "unknown"
    with open(metrics, newline="") as f:
        return [{**row, "status": status} for row in csv.DictReader(f)]
