"""Where a run's numbers go: metrics.csv in the run folder, optionally W&B, and meta.json.

metrics.csv is the run's record (the figures are built from it): one row per logged step,
with train rows and evaluation rows merged when they fall on the same step. A resumed run
first drops the rows written after its checkpoint, so the file ends up exactly as an
uninterrupted run would have written it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import netrc
import os
import platform
import subprocess
import sys
from typing import Any
from urllib.parse import urlparse

import torch


class MetricsLog:
    """metrics.csv (when ``csv``) and a W&B run (when ``wandb`` is a dict of ``wandb.init`` settings).

    Args:
        run_dir: the run folder.
        columns: the CSV header; keys outside it are not written to the CSV.
        resume_step: drop CSV rows after this step (the checkpoint's step); None for a fresh run.
        config: the resolved config, stored with the W&B run.
    """

    def __init__(self, run_dir: str, columns: list[str], *, csv_enabled: bool, wandb: dict[str, Any] | None,
                 resume_step: int | None, config: dict[str, Any], name: str):
        self.path = os.path.join(run_dir, "metrics.csv")
        self.columns = columns
        self.file = None
        if csv_enabled:
            self._open_csv(resume_step)
        self.wandb_run = _init_wandb(run_dir, wandb, config, name) if wandb is not None else None

    def _open_csv(self, resume_step: int | None) -> None:
        rows: list[dict[str, str]] = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames != self.columns:
                    raise ValueError(
                        f"{self.path} has columns {reader.fieldnames}, this run logs {self.columns}; "
                        "the run folder belongs to another configuration: use another run_root or delete it"
                    )
                rows = [row for row in reader if int(row["step"]) <= resume_step]
        self.file = open(self.path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.columns, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def log(self, row: dict[str, Any]) -> None:
        if self.file is not None:
            self.writer.writerow(row)
            self.file.flush()  # a killed job keeps every row it logged
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _wandb_logged_in() -> bool:
    """Whether W&B credentials exist (WANDB_API_KEY or a netrc entry, where `wandb login` writes them)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _init_wandb(run_dir: str, settings: dict[str, Any], config: dict[str, Any], name: str):
    import wandb  # here: only runs with logger=wandb need it

    mode = settings.get("mode")
    if mode is None and "WANDB_MODE" not in os.environ:
        mode = "online" if _wandb_logged_in() else "offline"
    return wandb.init(
        project=settings.get("project", "metaopt"),
        entity=settings.get("entity"),
        tags=list(settings.get("tags") or []),
        mode=mode,
        name=name,
        # one W&B run per run folder: a resumed run continues the same W&B run
        id=hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:16],
        resume="allow",
        dir=os.environ.get("WANDB_DIR", run_dir),
        config=config,
    )


def run_metadata(seed: int, device: torch.device, world_size: int) -> dict[str, Any]:
    """Provenance of a run for meta.json: code version, library versions, hardware (no hostname)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{device.type} ({platform.machine()}, {os.cpu_count()} cores)"
    return {
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": device_name,
        "world_size": world_size,
        "seed": seed,
    }


def write_json(data: dict[str, Any], path: str) -> None:
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(partial, path)
