"""Where a run's numbers go: metrics.csv in the run folder, optionally W&B, and meta.json.

metrics.csv is the run's record (the figures are built from it): one row per logged step,
with train rows and evaluation rows merged when they fall on the same step. A resumed run
first drops the rows written after its checkpoint, so the file ends up exactly as an
uninterrupted run would have written it. That trimmed copy replaces the file atomically
(experiments/files.py), and a last line torn by a kill is dropped with the rows after the
checkpoint, so no kill at any moment empties or garbles the file; rows are then appended.

A W&B run is keyed by the run folder, so a resumed run continues it. A process killed with
SIGKILL takes along the rows its W&B service had not yet written, so each clean close records
the last step W&B was handed (``wandb.json``) and a resumed run first logs again, from
metrics.csv, the rows after that step: W&B then holds every row metrics.csv holds, each under
its training step (W&B charts take ``step`` as their x-axis), some of them twice with the same
values.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import netrc
import os
import platform
import subprocess
import sys
from typing import Any
from urllib.parse import urlparse

import torch

from experiments.files import atomic_write, open_no_follow, read_json


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
        self.wandb_record = os.path.join(run_dir, "wandb.json")
        self.file = None
        self.last_step = None
        kept_rows = self._open_csv(resume_step) if csv_enabled else []
        self.wandb_run = None
        if wandb is not None:
            handed_over = -1  # read before the W&B run starts: a refusal leaves no W&B run open in the process
            if os.path.exists(self.wandb_record):
                handed_over = read_json(self.wandb_record, f"delete it (rm {self.wandb_record}) and run again: the "
                                        "run then logs every kept row of metrics.csv to W&B again")["last_step"]
            self.wandb_run = _init_wandb(run_dir, wandb, config, name)
            try:
                for row in kept_rows:
                    if int(row["step"]) > handed_over:
                        self._log_to_wandb({key: float(value) for key, value in row.items() if value != ""})
            except BaseException:
                self.wandb_run.finish(exit_code=1)
                self.wandb_run = None
                raise

    def _open_csv(self, resume_step: int | None) -> list[dict[str, str]]:
        """Start metrics.csv over, keeping the rows up to ``resume_step``; returns them."""
        rows = self._rows_up_to(resume_step) if resume_step is not None and os.path.exists(self.path) else []
        with atomic_write(self.path, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(rows)
        self.file = open(self.path, "a", newline="", opener=lambda name, flags: open_no_follow(name, flags))
        self.writer = csv.DictWriter(self.file, fieldnames=self.columns, extrasaction="ignore")
        return rows

    def _rows_up_to(self, step: int) -> list[dict[str, str]]:
        """The complete rows of metrics.csv up to ``step``; a last line without its line break was torn by a kill."""
        with open(self.path, newline="") as f:
            text = f.read()
        complete = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(complete, newline=""))
        if reader.fieldnames != self.columns:
            found = f"the columns {reader.fieldnames}" if reader.fieldnames else "no header (it is empty)"
            raise ValueError(
                f"{self.path} has {found}, this run logs {self.columns}. The checkpoint is "
                f"fine: to continue the run with a new metrics.csv, move this one aside (mv {self.path} "
                f"{self.path}.old) and run the same command again; if the folder holds another configuration's "
                "run, use another run_root instead"
            )
        return [row for row in reader if len(row) == len(self.columns) and None not in row.values()
                and int(row["step"]) <= step]

    def log(self, row: dict[str, Any]) -> None:
        if self.file is not None:
            self.writer.writerow(row)
            self.file.flush()  # a killed job keeps every row it logged
        if self.wandb_run is not None:
            self._log_to_wandb(row)

    def _log_to_wandb(self, row: dict[str, Any]) -> None:
        # the training step travels as a column (every chart's x-axis, see _init_wandb), not as W&B's own
        # step, which a resumed run has already passed when it logs rows again
        self.wandb_run.log(dict(row, step=int(row["step"])))
        self.last_step = int(row["step"])

    def sync(self) -> None:
        """Put the rows logged so far on the disk (before a checkpoint that counts on them)."""
        if self.file is not None:
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.wandb_run is not None:
            self.wandb_run.finish()  # hands every logged row over
            self.wandb_run = None
            if self.last_step is not None:
                write_json({"last_step": self.last_step}, self.wandb_record)


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
    run = wandb.init(
        project=settings.get("project", "metaopt"),
        entity=settings.get("entity"),
        tags=list(settings.get("tags") or []),
        group=settings.get("group"),
        job_type=settings.get("job_type"),
        notes=settings.get("notes"),
        mode=mode,
        name=name,
        # one W&B run per run folder: a resumed run continues the same W&B run
        # the real path: a folder reached through a symbolic link and then directly stays one W&B run
        id=hashlib.sha1(os.path.realpath(run_dir).encode()).hexdigest()[:16],
        resume="allow",
        dir=os.environ.get("WANDB_DIR", run_dir),
        config=config,
    )
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


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
    with atomic_write(path) as f:
        json.dump(data, f, indent=2)
        f.write("\n")
