"""Shared by the trainer and config tests: compose conf/train.yaml, read a run's metrics.csv."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF = Path(__file__).resolve().parents[1] / "conf"

# A run small enough for a test: the embedded digits, a tiny MLP, a handful of steps, no bar.
TINY = [
    "dataset=digits",
    "model=mlp",
    "trainer.max_steps=4",
    "trainer.log_every=2",
    "trainer.eval_every=4",
    "trainer.eval_batches=2",
    "trainer.progress_bar=false",
    "logger=csv",
]

# Columns that measure the machine rather than the computation.
TIMING_COLUMNS = ("time/elapsed_s", "time/step_ms", "time/optimizer_ms", "memory/peak_mb")


@pytest.fixture(autouse=True)
def one_thread():
    """Run the test on one torch thread (autouse wherever it is imported).

    Tiny models on a shared 2-core machine run faster and steadier on one thread, and runs
    that a test compares bit for bit must share one thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_train(*overrides: str) -> DictConfig:
    """conf/train.yaml with overrides, as `python -m experiments.train <overrides>` composes it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def read_metrics(run_dir: str | Path) -> list[dict[str, str]]:
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def computed_columns(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The rows without the timing columns (which differ between any two runs)."""
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


def finite(value: str) -> bool:
    return value != "" and math.isfinite(float(value))
