"""Gather one paper item's runs into results/<item>/runs.csv: one row per run and logged step.

    python scripts/collect_runs.py fig1 --scale mini     # after: make fig1 SCALE=mini
    python scripts/collect_runs.py fig1 run_root=/scratch/runs   # the sweep's own overrides, if any

Reads the runs the experiment's sweep expects (experiments/reproduce.py) from their folders
under run_root/<run_group>/, as the sweep's manifest (run_root/<run_group>/sweep-<digest>.json,
written by the grids sweeper) names them, or, for a sweep run before manifests, as their
.hydra/overrides.yaml name them; either way a folder counts only if its config.yaml is the
configuration this sweep gives the run, and writes every metrics.csv row with the run's identity: its grid,
arm, seed, every swept key, its status (meta.json) and the sweep's scale (the columns of
experiments/schema.py). In a sweep tuned on one seed (hydra.sweeper.tune_seed), a tuned grid's
other seeds are those of its best setting on that seed, chosen from the folders as the sweeper
chose. A run the sweep expects but that has no folder yet is reported; scripts/make_figures.py
refuses to plot without it.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from experiments.files import atomic_write, read_json
from experiments.reproduce import ITEMS, SCALES, compose_experiment, run_dir_key
from experiments.sweeps import Run, expected_runs, select
from experiments.run_folder import IDENTITY_SECTIONS, differences, manifest_path, read_run
from experiments.schema import run_key, runs_columns, swept_keys, tuning_score


def collect(item: str, scale: str, out_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[int, list[str]]:
    """Write out_dir/runs.csv (atomically); returns (rows written, expected runs not found).

    overrides: as given to the sweep (e.g. run_root=...), so that the same runs are found. A run
    folder counts only if the configuration it recorded (its config.yaml) is the one this sweep
    composes for that run, key for key (experiments.run_folder.identity): the folders of the same
    sweep run with other overrides (ARGS=trainer.max_steps=...) or another conf/ are left out, and
    the missing runs name them with the keys that differ.
    """
    cfg = compose_experiment(item, scale, overrides)
    group_dir = Path(cfg.run_root) / cfg.run_group
    # the keys the sweep varies: the later runs of a sweep tuned on one seed vary none of their own
    swept = swept_keys(run.values for run in expected_runs(cfg))
    found = defaultdict(list)  # (run key, seed) -> run folders with those values of the swept keys
    manifest = manifest_path(cfg.run_root, cfg.run_group, [f"experiment={item}", f"scale={scale}", *overrides])
    if manifest.exists():  # the sweep's own record of its runs' folders (the grids sweeper writes it)
        for entry in read_json(str(manifest), "run the sweep again to rewrite it")["runs"]:
            if entry.get("folder"):
                values = dict(o.split("=", 1) for o in entry["overrides"])
                found[(run_key({k: v for k, v in values.items() if k in swept}), entry["seed"])].append(
                    Path(cfg.run_root) / entry["folder"])
    else:  # a sweep run before manifests: every folder of the run group, checked below
        for overrides_file in sorted(group_dir.glob("**/.hydra/overrides.yaml")):
            folder = overrides_file.parent.parent
            found[(run_dir_key(overrides_file, set(swept)), str(recorded_seed(folder)))].append(folder)
    mismatches: dict[tuple[str, str], list[str]] = {}

    @functools.lru_cache(maxsize=None)
    def folder_of(run: Run) -> Path | None:
        """The run's folder: the one among its key's whose recorded configuration is this sweep's."""
        candidates = found.get((run.key, run.values.get("seed", "0")), [])
        if not candidates:
            return None
        expected = run_config(item, scale, overrides, run)
        for folder in candidates:
            recorded = recorded_config(folder)
            changed = ["it recorded no config.yaml (it never started)"] if recorded is None else differences(recorded, expected)
            if not changed:
                return folder
            mismatches.setdefault((run.key, run.values.get("seed", "0")), []).append(
                f"{folder} holds another configuration (recorded -> this sweep's): {'; '.join(changed)}")
        return None

    def run_rows(run: Run) -> list[dict[str, str]]:
        folder = folder_of(run)
        return read_run(folder) if folder is not None else []

    rule = select(cfg)  # the best setting on the tuning seed picks the later runs
    rows, missing, metric_columns = [], [], []
    for run in expected_runs(cfg, lambda run: tuning_score(run_rows(run), **rule)):
        seed = run.values.get("seed", "0")
        folder = folder_of(run)
        logged = run_rows(run)
        if not logged:
            why = mismatches.get((run.key, seed))
            missing.append(f"{run.key} seed={seed}" + (":\n    " + "\n    ".join(why) if why else ""))
            continue
        identity = {"item": item, "scale": scale, "grid": run.grid, "arm": run.arm,
                    "run": str(folder.relative_to(group_dir)), "seed": seed, **{k: run.values.get(k, "") for k in swept}}
        for row in logged:
            metric_columns += [k for k in row if k not in metric_columns and k != "status"]
            rows.append({**identity, **row})

    out_dir.mkdir(parents=True, exist_ok=True)
    # a kill or a full disk while writing leaves the runs.csv from before, never a part of the new one
    with atomic_write(str(out_dir / "runs.csv"), newline="") as f:
        writer = csv.DictWriter(f, fieldnames=runs_columns(swept, metric_columns), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return len(rows), missing


def run_config(item: str, scale: str, overrides: list[str] | tuple[str, ...], run: Run) -> dict:
    """The sections of the configuration the sweep gives this run that make its identity, resolved as
    the trainer records them in config.yaml."""
    given = {override.split("=", 1)[0].lstrip("+~") for override in overrides}
    # as the sweeper does: a key the command line sets replaces the grid's own
    cfg = compose_experiment(item, scale, [*overrides, *(o for o in run.overrides if o.split("=", 1)[0] not in given)])
    return {section: OmegaConf.to_container(cfg[section], resolve=True) if OmegaConf.is_config(cfg[section])
            else cfg[section] for section in IDENTITY_SECTIONS if section in cfg}


def recorded_config(folder: Path) -> dict | None:
    """The resolved configuration a run folder's trainer recorded (config.yaml), or None."""
    path = folder / "config.yaml"
    if not path.exists():
        return None
    try:
        return OmegaConf.to_container(OmegaConf.load(path))
    except Exception as error:  # noqa: BLE001  (a damaged YAML fails in many ways)
        raise ValueError(f"{path} cannot be read ({type(error).__name__}: {error}); rerun its run to rewrite it") from None


def recorded_seed(folder: Path) -> object:
    """The run's seed: meta.json's, else its config.yaml's (meta.json lost)."""
    meta = folder / "meta.json"
    if meta.exists():
        try:
            return json.loads(meta.read_text())["seed"]
        except (ValueError, KeyError) as error:
            raise ValueError(f"{meta} cannot be read ({type(error).__name__}: {error}): rerun the run's command "
                             "to rewrite it (a finished run rebuilds it from its checkpoint)") from None
    config = recorded_config(folder)
    return None if config is None else config.get("seed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("item", choices=ITEMS)
    parser.add_argument("--scale", choices=SCALES, default="full")
    parser.add_argument("--out", default=None, help="folder for runs.csv (default: results/<item>)")
    parser.add_argument("overrides", nargs="*", help="the sweep's own overrides, e.g. run_root=/scratch/runs")
    args = parser.parse_intermixed_args(argv)
    out_dir = Path(args.out or f"results/{args.item}")
    count, missing = collect(args.item, args.scale, out_dir, args.overrides)
    print(f"{out_dir / 'runs.csv'}: {count} rows")
    if missing:
        print(f"{len(missing)} runs of the sweep have no folder yet:\n  " + "\n  ".join(missing), file=sys.stderr)


if __name__ == "__main__":
    main()
