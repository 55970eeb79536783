"""Gather one paper item's runs into results/<item>/runs.csv: one row per run and logged step.

    python scripts/collect_runs.py fig1 --scale mini     # after: make fig1 SCALE=mini
    python scripts/collect_runs.py fig1 run_root=/scratch/runs   # the sweep's own overrides, if any

Reads the runs the experiment's sweep expects (experiments/reproduce.py) from their folders
under run_root/<run_group>/ and writes every metrics.csv row with the run's identity: its grid,
arm, seed, every swept key, its status (meta.json) and the sweep's scale (the columns of
experiments/schema.py). In a sweep tuned on one seed (hydra.sweeper.tune_seed), a tuned grid's
other seeds are those of its best setting on that seed, chosen from the folders as the sweeper
chose. A run the sweep expects but that has no folder yet is reported; scripts/make_figures.py
refuses to plot without it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from experiments.reproduce import ITEMS, SCALES, Run, compose_experiment, expected_runs, run_dir_key, select
from experiments.run_folder import read_run
from experiments.schema import runs_columns, swept_keys, tuning_score


def collect(item: str, scale: str, out_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[int, list[str]]:
    """Write out_dir/runs.csv; returns (rows written, keys of expected runs not found).

    overrides: as given to the sweep (e.g. run_root=...), so that the same runs are found.
    """
    cfg = compose_experiment(item, scale, overrides)
    group_dir = Path(cfg.run_root) / cfg.run_group
    # the keys the sweep varies: the later runs of a sweep tuned on one seed vary none of their own
    swept = swept_keys(run.values for run in expected_runs(cfg))
    found = {}  # (run key, seed) -> run folder
    for overrides_file in sorted(group_dir.glob("**/.hydra/overrides.yaml")):
        folder = overrides_file.parent.parent
        seed = json.loads((folder / "meta.json").read_text())["seed"] if (folder / "meta.json").exists() else None
        found[(run_dir_key(overrides_file, set(swept)), str(seed))] = folder

    def run_rows(run: Run) -> list[dict[str, str]]:
        folder = found.get((run.key, run.values.get("seed", "0")))
        return read_run(folder) if folder is not None else []

    rule = select(cfg)  # the best setting on the tuning seed picks the later runs
    rows, missing, metric_columns = [], [], []
    for run in expected_runs(cfg, lambda run: tuning_score(run_rows(run), rule["metric"], rule["mode"])):
        seed = run.values.get("seed", "0")
        folder = found.get((run.key, seed))
        logged = run_rows(run)
        if not logged:
            missing.append(f"{run.key} seed={seed}")
            continue
        identity = {"item": item, "scale": scale, "grid": run.grid, "arm": run.arm,
                    "run": str(folder.relative_to(group_dir)), "seed": seed, **{k: run.values.get(k, "") for k in swept}}
        for row in logged:
            metric_columns += [k for k in row if k not in metric_columns and k != "status"]
            rows.append({**identity, **row})

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=runs_columns(swept, metric_columns), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return len(rows), missing


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
