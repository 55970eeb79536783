"""Gather one paper item's runs into results/<item>/runs.csv: one row per run and logged step.

    python scripts/collect_runs.py fig1 --scale mini     # after: make fig1 SCALE=mini
    python scripts/collect_runs.py fig1 run_root=/scratch/runs   # the sweep's own overrides, if any

Reads the runs the experiment's sweep expects (experiments/reproduce.py) from their folders
under run_root/<run_group>/ and writes every metrics.csv row with the run's identity: its grid,
arm, seed, every swept key, its status (meta.json) and the sweep's scale (the columns of
experiments/schema.py). A run the sweep expects but that has no folder yet is reported;
scripts/make_figures.py refuses to plot without it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from experiments.reproduce import ITEMS, SCALES, compose_experiment, expected_runs, run_dir_key
from experiments.schema import runs_columns, swept_keys


def collect(item: str, scale: str, out_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[int, list[str]]:
    """Write out_dir/runs.csv; returns (rows written, keys of expected runs not found).

    overrides: as given to the sweep (e.g. run_root=...), so that the same runs are found.
    """
    cfg = compose_experiment(item, scale, overrides)
    runs = expected_runs(cfg)
    group_dir = Path(cfg.run_root) / cfg.run_group
    swept = swept_keys(run.values for run in runs)
    found = {}  # (run key, seed) -> run folder
    for overrides_file in sorted(group_dir.glob("**/.hydra/overrides.yaml")):
        folder = overrides_file.parent.parent
        seed = json.loads((folder / "meta.json").read_text())["seed"] if (folder / "meta.json").exists() else None
        found[(run_dir_key(overrides_file, set(swept)), str(seed))] = folder

    rows, missing, metric_columns = [], [], []
    for run in runs:
        seed = run.values.get("seed", "0")
        folder = found.get((run.key, seed))
        if folder is None or not (folder / "metrics.csv").exists():
            missing.append(f"{run.key} seed={seed}")
            continue
        status = json.loads((folder / "meta.json").read_text()).get("status", "unknown")
        identity = {"item": item, "scale": scale, "grid": run.grid, "arm": run.arm,
                    "run": str(folder.relative_to(group_dir)), "seed": seed, "status": status,
                    **{k: run.values.get(k, "") for k in swept}}
        with open(folder / "metrics.csv", newline="") as f:
            for row in csv.DictReader(f):
                metric_columns += [k for k in row if k not in metric_columns]
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
