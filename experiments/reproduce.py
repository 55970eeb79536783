"""The paper's items as sweeps: which runs an experiment expects, and which curve each run is.

conf/experiment/<item>.yaml lists its runs as named grids (hydra_plugins/metaopt_grids_sweeper);
scripts/collect_runs.py and scripts/make_figures.py use this module to expand them exactly as the
sweeper does, so a figure knows every run it needs and names the one that is missing.

    cfg = compose_experiment("fig1", "mini")
    for run in expected_runs(cfg): print(run.grid, run.arm, run.key)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from experiments.run_folder import register_resolvers
from experiments.schema import DEFAULT_SELECT, run_key
from hydra_plugins.metaopt_grids_sweeper.grids_sweeper import choose_later, expand_grids, setting_of, tuning_phases

CONF = Path(__file__).resolve().parents[1] / "conf"
register_resolvers()  # the configs composed here and by their users name run folders (conf/hydra/default.yaml)
# The paper's items (and ours beyond it) are the files of conf/experiment/, in natural order (fig2 before fig10).
ITEMS = tuple(sorted((path.stem for path in (CONF / "experiment").glob("*.yaml")),
                     key=lambda name: (name.rstrip("0123456789"), int("0" + name[len(name.rstrip("0123456789")):]))))
SCALES = ("full", "mini", "smoke")


@dataclass(frozen=True)
class Run:
    grid: str  # the grid of conf/experiment/<item>.yaml it comes from
    overrides: tuple[str, ...]  # key=value, as the sweeper passes them
    arm: str  # the curve it belongs to (see arm_names)

    @property
    def key(self) -> str:
        """The run's identity: its sorted overrides, without the seed's (experiments.schema.run_key)."""
        return run_key(self.values)

    @property
    def values(self) -> dict[str, str]:
        return dict(o.split("=", 1) for o in self.overrides)


def compose_experiment(item: str, scale: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """conf/train.yaml with experiment=<item> and scale=<scale>, the hydra node included."""
    if item not in ITEMS:
        raise ValueError(f"unknown paper item {item!r}: use one of {', '.join(ITEMS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: use one of {', '.join(SCALES)}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"experiment={item}", f"scale={scale}", *overrides],
                       return_hydra_config=True)


def expected_runs(cfg: DictConfig, tuning_score: Callable[[Run], float | None] | None = None) -> list[Run]:
    """Every run of the experiment's sweep, in launch order, each with its arm.

    A sweep tuned on one seed (hydra.sweeper.tune_seed) runs a tuned grid's other seeds only for
    the setting that was best on that seed. tuning_score(run) scores a tuning run from its rows
    (experiments.schema.score under select(cfg)), or is None while it has none; the later runs of a
    grid not fully scored, or of every grid without tuning_score, are not expected yet.
    """
    sweeper = cfg.hydra.sweeper
    grids = OmegaConf.to_container(sweeper.grids, resolve=True)
    params = OmegaConf.to_container(sweeper.params, resolve=True) if sweeper.params else {}
    expanded = expand_grids(grids, params)
    tuned = set(cfg.figure.tuned)
    first, later = tuning_phases(expanded, tuned, tune_seed(cfg))
    if later and tuning_score is not None:
        tuning_runs = {setting_of(overrides): Run(grid, tuple(overrides), grid) for grid, overrides in first}
        first += choose_later(later, lambda setting: tuning_score(tuning_runs[setting]))
    runs = [Run(grid, tuple(overrides), grid if grid in tuned else arm_names(grid, overrides, expanded))
            for grid, overrides in first]
    # An arm name that an earlier grid already gave (the same optimizer in another variant) is
    # qualified by its grid: "metaopt_adamw_adam (standard)".
    first_grid = {}
    for run in runs:
        first_grid.setdefault(run.arm, run.grid)
    return [run if first_grid[run.arm] == run.grid else Run(run.grid, run.overrides, f"{run.arm} ({run.grid})")
            for run in runs]


def select(cfg: DictConfig) -> dict[str, str]:
    """The rule that picks a tuned grid's best setting: {metric, mode}."""
    return dict(cfg.figure.get("select") or DEFAULT_SELECT)


def tune_seed(cfg: DictConfig) -> str | None:
    """The seed a tuned grid is tuned on (hydra.sweeper.tune_seed), or None: on every seed."""
    seed = cfg.hydra.sweeper.get("tune_seed")
    return None if seed is None else str(seed)


def arm_names(grid: str, overrides: list[str], expanded: list[tuple[str, list[str]]]) -> str:
    """The curve a run of an untuned grid belongs to (a grid that figure.tuned lists is one
    curve, its best setting, named after the grid).

    Each setting of the grid is its own curve, named by the optimizer when only the optimizer varies
    (metaopt_lion_lion), else by the keys that vary in the grid (optimizer.alpha0=1e-08).
    """
    siblings = [dict(o.split("=", 1) for o in other) for name, other in expanded if name == grid]
    varying = [k for k in siblings[0] if k != "seed" and len({s.get(k) for s in siblings}) > 1]
    values = dict(o.split("=", 1) for o in overrides)
    if varying == ["optimizer"] or not varying:
        return values.get("optimizer", grid)
    parts = [values["optimizer"]] if "optimizer" in varying else []
    return " ".join(parts + [f"{k}={values[k]}" for k in varying if k != "optimizer"])


def run_dir_key(overrides_file: Path, swept: set[str]) -> str:
    """A run folder's key (as Run.key) from the .hydra/overrides.yaml Hydra wrote there: its values
    of the sweep's keys (swept, without the seed), whatever else its command line set (run_root=...)."""
    overrides = [str(o).split("=", 1) for o in OmegaConf.load(overrides_file)]
    return run_key({k: v for k, v in overrides if k in swept})
