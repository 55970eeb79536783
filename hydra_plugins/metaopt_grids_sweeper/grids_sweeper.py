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
"""

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class GridsSweeperConf:
    _target_: str = "hydra_plugins.metaopt_grids_sweeper.grids_sweeper.GridsSweeper"
    max_batch_size: Optional[int] = None  # runs launched together (submitit_local starts a batch at once)
    params: Dict[str, str] = field(default_factory=dict)  # crossed with every grid
    grids: Dict[str, Any] = field(default_factory=dict)  # name -> {override key: value or comma list}


ConfigStore.instance().store(group="hydra/sweeper", name="grids", node=GridsSweeperConf, provider="metaopt")


def expand_grids(grids: Mapping[str, Any], params: Mapping[str, str], arguments: Sequence[str] = (),
                 config_loader: Any = None) -> List[Tuple[str, List[str]]]:
    """Every run of the sweep as (grid name, overrides), in grid order, without duplicates.

    The command line's own overrides (arguments) apply to every grid, after the grid's keys,
    so `seed=0` or `trainer.max_steps=10` on the command line wins over the config.
    """
    parser = OverridesParser.create(config_loader=config_loader)
    runs: List[Tuple[str, List[str]]] = []
    seen: Set[Tuple[str, ...]] = set()
    for name, grid in grids.items():
        if grid is None:
            continue
        keyed = {**{str(k): str(v) for k, v in grid.items()}, **{str(k): str(v) for k, v in params.items()}}
        for argument in arguments:  # a command-line key replaces the grid's own
            keyed.pop(argument.split("=", 1)[0].lstrip("+~"), None)
        lines = [f"{k}={v}" for k, v in keyed.items()] + list(arguments)
        (batch,) = BasicSweeper.split_arguments(parser.parse_overrides(lines), None)
        for overrides in batch:
            key = tuple(sorted(overrides))
            if key not in seen:
                seen.add(key)
                runs.append((name, overrides))
    return runs


class GridsSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int], params: Optional[Dict[str, str]] = None,
                 grids: Optional[Dict[str, Any]] = None):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = {} if grids is None else grids

    def sweep(self, arguments: List[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        if not self.grids:
            raise ValueError("hydra.sweeper.grids is empty: list the experiment's grids (see conf/experiment/*.yaml)")
        # the grids may interpolate the experiment's keys (${tuning.lr}): resolve them in place
        grids = OmegaConf.to_container(self.grids, resolve=True) if isinstance(self.grids, DictConfig) else self.grids
        params = OmegaConf.to_container(self.params, resolve=True) if isinstance(self.params, DictConfig) else self.params
        runs = [overrides for _, overrides in
                expand_grids(grids, params, arguments, self.hydra_context.config_loader)]
        self.overrides = list(self.split_overrides_to_chunks(runs, self.max_batch_size))
        log.info(f"{len(runs)} runs in {len(self.overrides)} batches")

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        returns, diverged = [], []
        initial_job_idx = 0
        while not self.is_done():
            batch = self.get_job_batch()
            tic = time.perf_counter()
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=initial_job_idx)
            for result in results:
                if result.status == JobStatus.FAILED and isinstance(result._return_value, FloatingPointError):
                    diverged.append(" ".join(result.overrides))
                else:
                    _ = result.return_value  # raises the run's own error
            log.info(f"batch of {len(batch)} done in {time.perf_counter() - tic:.0f} s")
            initial_job_idx += len(batch)
            returns.append(results)
        if diverged:
            log.warning(f"{len(diverged)} runs diverged (kept, with their rows up to the divergence):\n  "
                        + "\n  ".join(diverged))
        return returns
