"""A Hydra sweeper whose runs are the union of several named grids (``hydra/sweeper=grids``).

Hydra's basic sweeper runs one Cartesian product. A paper figure is several: MetaOptimize arms
at their published settings, each fixed-step baseline over its own step-size grid, DoG over
its initial movement, and so on. Each experiment (conf/experiment/<item>.yaml) lists them::

    hydra:
      sweeper:
        params: {seed: 0,1,2}                    # crossed with every grid
        grids:
          metaopt: {optimizer: metaopt_adamw_adam,metaopt_lion_lion}
          adamw: {optimizer: adamw, optimizer.lr: 1e-5,1e-4,1e-3,1e-2,1e-1}

A grid is a mapping of override key to value or comma list, as in ``hydra.sweeper.params``;
a ``null`` grid is dropped (a scale profile removes a grid that way). Runs that two grids
share are launched once. A run that diverges (the trainer's ``FloatingPointError``) is
expected in a step-size grid: it is reported at the end and the sweep goes on; any other
failure stops the sweep.

Tuning on one seed (``tune_seed: 0``, the mini and smoke profiles): a tuned grid (``tuned``, the
figure's ``figure.tuned``) first runs every setting on the tuning seed only, with the untuned
grids; then its best setting there (``select``, the figure's rule: the lowest final train loss by
default; the trainer's run folders hold it) runs the other seeds. With ``tune_seed: null`` every
setting runs on every seed.

A stop signal to the sweep's own process (SIGTERM: what ``timeout`` and ``kill`` send; SIGHUP: its
terminal closed) is passed on to every process the sweep started (the local launcher's runs, which
checkpoint and exit), and the sweep exits once they have, with 128 + the signal's number.
"""

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobStatus
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import DictConfig, OmegaConf

from experiments.files import atomic_write
from experiments.run_folder import manifest_path, read_run
from experiments.schema import DEFAULT_SELECT, tuning_score
from experiments.sweeps import choose_later, expand_grids, setting_of, tuning_phases, with_arms

log = logging.getLogger(__name__)


@dataclass
class GridsSweeperConf:
    _target_: str = "hydra_plugins.metaopt_grids_sweeper.grids_sweeper.GridsSweeper"
    max_batch_size: Optional[int] = None  # runs launched together (submitit_local starts a batch at once)
    params: Dict[str, str] = field(default_factory=dict)  # crossed with every grid
    grids: Dict[str, Any] = field(default_factory=dict)  # name -> {override key: value or comma list}
    tune_seed: Optional[str] = None  # tune the tuned grids on this seed only, then run their best setting on the others
    tuned: Any = "${oc.select:figure.tuned,[]}"  # the grids whose best setting is a figure's curve
    select: Any = "${oc.select:figure.select,null}"  # that setting's rule (default: experiments.schema.DEFAULT_SELECT)


ConfigStore.instance().store(group="hydra/sweeper", name="grids", node=GridsSweeperConf, provider="metaopt")


class GridsSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int], params: Optional[Dict[str, str]] = None,
                 grids: Optional[Dict[str, Any]] = None, tune_seed: Optional[str] = None,
                 tuned: Optional[Sequence[str]] = None, select: Optional[Mapping[str, str]] = None):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = {} if grids is None else grids
        self.tune_seed = None if tune_seed is None else str(tune_seed)
        self.tuned = list(tuned or [])
        self.select = dict(select or DEFAULT_SELECT)
        self.job_idx = 0  # across both phases, so that no two runs share a launcher job number

    def sweep(self, arguments: List[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        with _forward_stop_signals():
            return self._sweep(arguments)

    def _sweep(self, arguments: List[str]) -> Any:
        if not self.grids:
            raise ValueError("hydra.sweeper.grids is empty: list the experiment's grids (see conf/experiment/*.yaml)")
        # the grids may interpolate the experiment's keys (${tuning.lr}): resolve them in place
        grids = OmegaConf.to_container(self.grids, resolve=True) if isinstance(self.grids, DictConfig) else self.grids
        params = OmegaConf.to_container(self.params, resolve=True) if isinstance(self.params, DictConfig) else self.params
        runs = expand_grids(grids, params, arguments, self.hydra_context.config_loader)
        first, later = tuning_phases(runs, self.tuned, self.tune_seed)

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        run_group = OmegaConf.select(self.config, "run_group") or self.config.hydra.runtime.choices.get("experiment")
        later_runs = [run for settings in later.values() for setting in settings for run in settings[setting]]
        arms = {run.overrides: run.arm for run in with_arms([*first, *later_runs], runs, set(self.tuned))}
        manifest = _Manifest(manifest_path(str(sweep_dir), str(run_group or "sweep"), arguments), arguments,
                             self.tune_seed, first, later_runs, arms)

        log.info(f"{len(first)} runs" + (f", then the best setting of {len(later)} grids tuned on seed "
                                         f"{self.tune_seed} on the other seeds" if later else ""))
        self.planned, self.done, self.failed, self.started = len(first), 0, 0, time.perf_counter()
        returns, diverged = self._launch([overrides for _, overrides in first])
        manifest.ran(first, returns, sweep_dir)
        if later:
            folders = {}  # setting -> the tuning run's folder (a run two grids share was launched once)
            for (_, overrides), result in zip(first, (r for batch in returns for r in batch)):
                folders[setting_of(overrides)] = Path(result.hydra_cfg.hydra.runtime.output_dir)
            chosen = choose_later(later, lambda setting: tuning_score(read_run(folders[setting]), **self.select))
            log.info(f"tuned on seed {self.tune_seed}: the best settings' {len(chosen)} runs on the other seeds")
            self.planned += len(chosen)
            more, more_diverged = self._launch([overrides for _, overrides in chosen])
            manifest.ran(chosen, more, sweep_dir, phase="later")
            returns += more
            diverged += more_diverged
        manifest.write(complete=True)
        if diverged:
            log.warning(f"{len(diverged)} runs diverged (kept, with their rows up to the divergence):\n  "
                        + "\n  ".join(diverged))
        return returns

    def _launch(self, runs: List[List[str]]) -> Tuple[List[Any], List[str]]:
        """Launch runs in batches of max_batch_size; returns (each batch's results, diverged runs)."""
        assert self.launcher is not None
        if not runs:
            return [], []
        self.overrides = list(self.split_overrides_to_chunks(runs, self.max_batch_size))
        self.batch_index = 0
        log.info(f"{len(runs)} runs in {len(self.overrides)} batches")
        returns, diverged = [], []
        while not self.is_done():
            batch = self.get_job_batch()
            tic = time.perf_counter()
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=self.job_idx)
            for result in results:
                if result.status == JobStatus.FAILED and isinstance(result._return_value, FloatingPointError):
                    diverged.append(" ".join(result.overrides))
                else:
                    _ = result.return_value  # raises the run's own error
            self.done += len(batch)
            self.failed += sum(result.status == JobStatus.FAILED for result in results)
            spent = time.perf_counter() - self.started
            left = spent / self.done * (self.planned - self.done)
            log.info(f"batch of {len(batch)} done in {time.perf_counter() - tic:.0f} s: {self.done} of {self.planned} "
                     f"runs done ({self.failed} diverged), {spent:.0f} s so far, about {left:.0f} s left")
            self.job_idx += len(batch)
            returns.append(results)
        return returns, diverged


class _Manifest:
    """The sweep written down (run_root/<run group>/sweep-<digest of its overrides>.json, atomically):
    every run of it (grid, arm, setting, overrides, seed, phase, folder once launched) and, once its tuning is over,
    each tuned grid's chosen setting. scripts/collect_runs.py takes a sweep's runs, their folders and the chosen settings from it."""

    def __init__(self, path: Path, arguments: Sequence[str], tune_seed: Optional[str],
                 first: Sequence[Tuple[str, List[str]]], later: Sequence[Tuple[str, List[str]]],
                 arms: Mapping[Tuple[str, ...], str]):
        self.path = path
        self.record: Dict[str, Any] = {
            "arguments": list(arguments), "tune_seed": tune_seed, "complete": False, "chosen": {},
            "runs": [_entry(grid, overrides, arms[tuple(overrides)], phase)
                     for runs, phase in ((first, "first"), (later, "later")) for grid, overrides in runs],
        }
        self.write()

    def ran(self, runs: Sequence[Tuple[str, List[str]]], returns: Sequence[Any], sweep_dir: Path,
            phase: str = "first") -> None:
        by_overrides = {tuple(entry["overrides"]): entry for entry in self.record["runs"]}
        for (grid, overrides), result in zip(runs, (r for batch in returns for r in batch)):
            entry = by_overrides[tuple(overrides)]
            entry["folder"] = os.path.relpath(result.hydra_cfg.hydra.runtime.output_dir, sweep_dir)
            entry["launched"] = True
            if phase == "later":
                self.record["chosen"][grid] = list(setting_of(overrides))
        self.write()

    def write(self, complete: bool = False) -> None:
        self.record["complete"] = complete
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(str(self.path)) as f:
            json.dump(self.record, f, indent=1)
            f.write("\n")


def _entry(grid: str, overrides: List[str], arm: str, phase: str) -> Dict[str, Any]:
    seed = dict(o.split("=", 1) for o in overrides).get("seed", "0")
    return {"grid": grid, "arm": arm, "setting": list(setting_of(overrides)), "overrides": list(overrides),
            "seed": seed, "phase": phase, "folder": None, "launched": False}


# -- stop signals reach the runs -------------------------------------------------------------------

SWEEP_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
RUNS_EXIT_WAIT_S = 600  # a run checkpoints at the end of its current step, then exits


def descendants(pid: int) -> List[int]:
    """The live processes below ``pid`` (children, theirs, ...), read from /proc (Linux)."""
    parents: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:  # no /proc (macOS): none found
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile
            if fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in parents.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


class _forward_stop_signals:
    """While a sweep runs in the main thread: a SIGTERM or SIGHUP to it goes on to every process below
    it; once they have exited (or after RUNS_EXIT_WAIT_S), the sweep exits with 128 + the signal."""

    def __enter__(self):
        self.previous: Dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in SWEEP_STOP_SIGNALS:
                if signal.getsignal(signum) != signal.SIG_IGN:  # nohup make ...: SIGHUP stays ignored
                    self.previous[signum] = signal.signal(signum, self._forward)
        return self

    def _forward(self, signum: int, frame: Any) -> None:
        runs = descendants(os.getpid())
        name = signal.Signals(signum).name
        log.warning(f"{name}: passed on to the sweep's {len(runs)} processes; waiting for the runs to checkpoint")
        for pid in runs:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + RUNS_EXIT_WAIT_S
        while time.monotonic() < deadline and set(runs) & set(descendants(os.getpid())):
            time.sleep(0.2)
        log.warning(f"{name}: the sweep stops; run the same command again to continue it (finished runs are "
                    "skipped, stopped ones resume)")
        raise SystemExit(128 + signum)

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
