"""A sweep of named grids, as pure functions of its config: which runs it launches, in which phase,
and which curve each run is.

The sweeper (hydra_plugins/metaopt_grids_sweeper, Hydra's glue) launches these runs and writes
them down in the sweep's manifest, which scripts/collect_runs.py reads and copies into
results/<item>/sweep.json beside runs.csv; scripts/make_figures.py draws the runs and tuned choices
that sweep.json lists, so a figure names the run that is missing and never chooses again.

    cfg = compose_experiment("fig1", "mini")      # experiments.reproduce
    for run in expected_runs(cfg): print(run.grid, run.arm, run.key)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from experiments.schema import DEFAULT_SELECT, run_key


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


Setting = Tuple[str, ...]  # a run's overrides without its seed, sorted


def setting_of(overrides: Sequence[str]) -> Setting:
    return tuple(sorted(o for o in overrides if o.split("=", 1)[0] != "seed"))


def tuning_phases(runs: Sequence[Tuple[str, List[str]]], tuned: Sequence[str], tune_seed: Optional[str]
                  ) -> Tuple[List[Tuple[str, List[str]]], Dict[str, Dict[Setting, List[Tuple[str, List[str]]]]]]:
    """A sweep tuned on one seed, in two phases: (first, later).

    first: the runs of every untuned grid, and each tuned grid's runs on tune_seed, in sweep order;
    later: {tuned grid: {setting: its runs on the other seeds}}, of which only the best setting
    (choose_later) runs. With tune_seed None, every run is first.
    """
    if tune_seed is None:
        return list(runs), {}

    def seed_of(overrides: Sequence[str]) -> str:
        return dict(o.split("=", 1) for o in overrides).get("seed", "0")

    # a setting without a run on the tuning seed (the sweep's seeds leave it out) is not tuned: it runs first
    tunable = {setting_of(overrides) for _, overrides in runs if seed_of(overrides) == str(tune_seed)}
    first, later = [], {}
    for grid, overrides in runs:
        if grid in tuned and seed_of(overrides) != str(tune_seed) and setting_of(overrides) in tunable:
            later.setdefault(grid, {}).setdefault(setting_of(overrides), []).append((grid, overrides))
        else:
            first.append((grid, overrides))
    return first, later


def choose_later(later: Mapping[str, Mapping[Setting, List[Tuple[str, List[str]]]]],
                 tuning_score: Callable[[Setting], Optional[float]]) -> List[Tuple[str, List[str]]]:
    """The later runs of each tuned grid's best setting: the lowest tuning_score(setting)
    (the tuning seed's run, scored by experiments.schema.score), the first in sweep order on a tie.
    A grid with a setting not scored yet (its tuning run is not over: experiments.schema.tuning_score)
    runs nothing later; running the sweep again, once it is, launches them."""
    chosen = []
    for settings in later.values():
        scores = {setting: tuning_score(setting) for setting in settings}
        if any(value is None for value in scores.values()):
            continue
        chosen += settings[min(scores, key=scores.__getitem__)]
    return chosen


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
    return with_arms(first, expanded, tuned)


def with_arms(runs: Sequence[Tuple[str, List[str]]], expanded: Sequence[Tuple[str, List[str]]],
              tuned: Set[str]) -> list[Run]:
    """Each (grid, overrides) of a sweep whose grids expand to ``expanded`` as a Run with its arm:
    a tuned grid's runs are one arm, named after the grid; an untuned grid's, see arm_names."""
    named = [Run(grid, tuple(overrides), grid if grid in tuned else arm_names(grid, list(overrides), expanded))
             for grid, overrides in runs]
    # An arm name that an earlier grid already gave (the same optimizer in another variant) is
    # qualified by its grid: "metaopt_adamw_adam (standard)".
    first_grid: Dict[str, str] = {}
    for run in named:
        first_grid.setdefault(run.arm, run.grid)
    return [run if first_grid[run.arm] == run.grid else Run(run.grid, run.overrides, f"{run.arm} ({run.grid})")
            for run in named]


def select(cfg: DictConfig) -> dict[str, Any]:
    """The rule that picks a tuned grid's best setting: {metric, mode}, and optionally last_fraction
    (experiments.schema.score)."""
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
