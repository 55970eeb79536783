"""Gather one paper item's runs into results/<item>/runs.csv: one row per run and logged step.

    python scripts/collect_runs.py fig1 --scale mini     # after: make fig1 SCALE=mini
    python scripts/collect_runs.py fig1 run_root=/scratch/runs   # the sweep's own overrides, if any

Reads the sweep's manifest (run_root/<run_group>/sweep-<digest of its overrides>.json, which the
grids sweeper writes): its runs, their arms and folders, and, in a sweep tuned on one seed
(hydra.sweeper.tune_seed), the setting each tuned grid's tuning chose for its other seeds; nothing is
derived again here. A folder counts only if its config.yaml is the configuration this sweep gives the
run. Writes every metrics.csv row with the run's identity: its grid, arm, seed, every swept key, its
status (meta.json) and the sweep's scale (the columns of experiments/schema.py). Beside it,
sweep.json: the manifest's runs as the figure needs them (grid, arm, overrides, phase) and each tuned
grid's chosen setting, which scripts/make_figures.py takes as they are. A sweep without a manifest (or
with a damaged one) is refused, naming the file; a run the manifest names but that has no folder yet is
reported, and scripts/make_figures.py refuses to plot without it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from experiments.files import atomic_write, read_json
from experiments.reproduce import ITEMS, SCALES, compose_experiment
from experiments.sweeps import Run, tune_seed
from experiments.run_folder import IDENTITY_SECTIONS, differences, manifest_path, read_run
from experiments.schema import run_key, runs_columns, swept_keys


def collect(item: str, scale: str, out_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[int, list[str]]:
    """Write out_dir/runs.csv and out_dir/sweep.json (each atomically); returns (rows written, the
    manifest's runs not found).

    overrides: as given to the sweep (e.g. run_root=...), so that its manifest is found. The runs,
    their arms and folders, and the settings its tuning chose are the manifest's: nothing here
    derives them again. A run folder counts only if the configuration it recorded (its config.yaml)
    is the one this sweep composes for that run, key for key (experiments.run_folder.identity): the
    folders of the same sweep run with other overrides or another conf/ are left out, and the
    missing runs name them with the keys that differ.
    """
    cfg = compose_experiment(item, scale, overrides)
    group_dir = Path(cfg.run_root) / cfg.run_group
    runs = manifest_runs(manifest_path(cfg.run_root, cfg.run_group, [f"experiment={item}", f"scale={scale}", *overrides]),
                         f"make {item} SCALE={scale}" + (f" ARGS='{' '.join(overrides)}'" if overrides else ""))
    # the keys the sweep varies: the later runs of a sweep tuned on one seed vary none of their own
    swept = swept_keys(run.values for run, _, _ in runs)
    rows, missing, metric_columns = [], [], []
    for run, folder, _ in runs:
        seed = run.values.get("seed", "0")
        why = None if folder is None else mismatch(folder, run_config(item, scale, overrides, run))
        if folder is None or why:
            missing.append(f"{run_key({k: run.values.get(k, '') for k in swept})} seed={seed}" + (f":\n    {folder} {why}" if why else ""))
            continue
        identity = {"item": item, "scale": scale, "grid": run.grid, "arm": run.arm,
                    "run": str(folder.relative_to(group_dir)), "seed": seed, **{k: run.values.get(k, "") for k in swept}}
        for row in read_run(folder):
            metric_columns += [k for k in row if k not in metric_columns and k != "status"]
            rows.append({**identity, **row})

    out_dir.mkdir(parents=True, exist_ok=True)
    # a kill or a full disk while writing leaves the runs.csv from before, never a part of the new one
    with atomic_write(str(out_dir / "runs.csv"), newline="") as f:
        writer = csv.DictWriter(f, fieldnames=runs_columns(swept, metric_columns), restval="")
        writer.writeheader()
        writer.writerows(rows)
    write_sweep_record(out_dir, item, scale, [(run, phase) for run, _, phase in runs], tune_seed(cfg),
                       "the sweep's manifest")
    return len(rows), missing


def write_sweep_record(out_dir: Path, item: str, scale: str, runs: list[tuple[Run, str]], seed: str | None,
                       source: str) -> None:
    """out_dir/sweep.json (atomically): every run of the sweep with its phase, and for each tuned grid its
    chosen setting (the key of its later runs: the sweeper runs the other seeds of that setting alone).
    source: where the record comes from."""
    record = {"item": item, "scale": scale, "from": source, "tune_seed": seed,
              "chosen": {run.arm: run.key for run, phase in runs if phase == "later"},
              "runs": [{"grid": run.grid, "arm": run.arm, "overrides": list(run.overrides), "phase": phase}
                       for run, phase in runs]}
    with atomic_write(str(out_dir / "sweep.json")) as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def manifest_runs(path: Path, sweep_command: str) -> list[tuple[Run, Path | None, str]]:
    """The runs a sweep's manifest names, in launch order, each with its folder (None: not launched yet)
    and its phase: every first-phase run, and a tuned grid's later runs once its tuning chose their setting."""
    fix = f"run the sweep (`{sweep_command}`: finished runs are skipped) to write it"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the sweep's manifest names its runs; {fix}")
    record = read_json(str(path), fix)
    try:
        entries, chosen, arguments = record["runs"], record["chosen"], set(record["arguments"])
        # a run's own overrides: its grid's, without the command line's (experiment=, scale=, run_root=...)
        runs = [(Run(entry["grid"], tuple(o for o in entry["overrides"] if o not in arguments), entry["arm"]),
                 entry["folder"], entry) for entry in entries]
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a sweep manifest ({type(error).__name__}: {error}); {fix}") from None
    run_root = path.parent.parent
    return [(run, None if folder is None else run_root / folder, entry["phase"]) for run, folder, entry in runs
            if entry["phase"] == "first" or chosen.get(run.grid) == entry["setting"]]


def mismatch(folder: Path, expected: dict) -> str | None:
    """Why a run folder does not hold this sweep's run (the keys of its recorded configuration that
    differ), or None when it does."""
    recorded = recorded_config(folder)
    if recorded is None:
        return "recorded no config.yaml (it never started)"
    changed = differences(recorded, expected)
    return f"holds another configuration (recorded -> this sweep's): {'; '.join(changed)}" if changed else None


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
