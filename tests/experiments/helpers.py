"""What the harness's tests share: compose conf/train.yaml, read a run's metrics.csv and W&B log, stop a run
as a scheduler would, compare two runs' states, write the sweep.json of a synthetic runs.csv."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import struct
import threading
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from experiments.sweeps import Run, tune_seed
from experiments.trainer import train

CONF = Path(__file__).resolve().parents[2] / "conf"

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


def rows_if_any(run_dir: Path) -> list[dict]:
    try:
        return [row for row in read_metrics(run_dir) if row.get("step", "").isdigit()]
    except (FileNotFoundError, ValueError, KeyError):
        return []


def long_run(*overrides: str) -> list[str]:
    """Long enough to be stopped mid-way; logs, evaluates and checkpoints along the way."""
    return [*TINY, "trainer.max_steps=300", "trainer.log_every=10", "trainer.eval_every=50",
            "trainer.checkpoint_every=100", *overrides]


def last_logged_step(run_dir: Path) -> int:
    """The step of metrics.csv's last whole row, read from the file's last 4 KiB (0 before any):
    cheap enough to poll every few milliseconds beside a run that logs every step."""
    try:
        with open(run_dir / "metrics.csv", "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            whole_rows = f.read().split(b"\n")[:-1]  # after the last newline: a row being written
    except FileNotFoundError:
        return 0
    steps = [int(row.split(b",", 1)[0]) for row in whole_rows if row.split(b",", 1)[0].isdigit()]
    return steps[-1] if steps else 0


def sigterm_when_logged(run_dir: Path, step: int, signum: int = signal.SIGTERM) -> threading.Thread:
    """SIGTERM (or `signum`) this process once metrics.csv shows `step`, as a scheduler's preemption would.
    The deadline only ends the watch of a run that died before logging `step`."""

    def watch():
        deadline = time.time() + 300
        while time.time() < deadline:
            if last_logged_step(run_dir) >= step:
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def train_until_preempted(cfg, run_dir: Path, step: int = 20):
    """``train`` into ``run_dir``, stopped by a SIGTERM once it has logged ``step``."""
    watcher = sigterm_when_logged(run_dir, step=step)
    stopped = train(cfg, str(run_dir))
    watcher.join()
    return stopped


def assert_same_state(a, b):
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    state_a, state_b = a.adapter.state_dict(), b.adapter.state_dict()
    flat_a, flat_b = tensors_by_path(state_a), tensors_by_path(state_b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        assert torch.equal(flat_a[key], flat_b[key]), key


def tensors_by_path(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {}
    out = {}
    for key, value in items:
        out.update(tensors_by_path(value, f"{prefix}/{key}"))
    return out


def read_wandb_history(run_file: str) -> list[dict]:
    """The history rows of a .wandb file."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in read_wandb_records(run_file, "history")]


def read_wandb_records(run_file: str, record_type: str) -> list:
    """The records of one type ("history", "run", ...) of a .wandb file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    raw = Path(run_file).read_bytes()
    block, pos, pending, records = 32768, 7, b"", []  # 7 bytes of file header: ":W&B", magic, version
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == record_type:
                records.append(record)
    return records


def write_sweep_record(out_dir: Path, cfg: DictConfig, item: str, scale: str, runs: list[Run]) -> None:
    """out_dir/sweep.json for a synthetic runs.csv of these runs (as experiments.sweeps.expected_runs gives
    them), as scripts/collect_runs.py writes it from a manifest: in a sweep tuned on one seed, a tuned
    grid's runs on the other seeds are its later runs (the chosen setting's)."""
    import collect_runs  # scripts/, on sys.path in the tests that draw figures

    seed = tune_seed(cfg)
    later = {run for run in runs if seed is not None and run.grid in cfg.figure.tuned and run.values["seed"] != seed}
    collect_runs.write_sweep_record(out_dir, item, scale, [(run, "later" if run in later else "first") for run in runs],
                                    seed, "a test's synthetic runs.csv")
