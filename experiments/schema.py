"""The results' schema: the columns of metrics.csv and runs.csv, a run's key, and the rules that
turn their rows into the numbers of a figure (a run's time per step, a tuned grid's best setting).

experiments/trainer.py writes metrics.csv and meta.json's summary, scripts/collect_runs.py gathers
an item's runs into results/<item>/runs.csv, scripts/make_figures.py reads it; all three use this
module, so that a column or a rule has one definition.
"""

from __future__ import annotations

import math
import statistics
from typing import Iterable, Mapping

# metrics.csv: one row per logged step. The adapter's step sizes (step_size, or step_size/<name> for
# each block or group) go between the quality and the cost columns.
PROGRESS = ("step", "epoch", "time/elapsed_s")
QUALITY = ("train/loss", "train/acc", "test/loss", "test/acc")
COSTS = ("time/step_ms", "time/optimizer_ms", "memory/peak_mb")
STEP_SIZE = "step_size"

# runs.csv: a run's identity, then its value of every key the sweep varies (blank where it sets
# none; named by swept_keys), then the columns of its metrics.csv.
IDENTITY = ("item", "scale", "grid", "arm", "run", "seed", "status")
SEED = "seed"

# A tuned grid's best setting, unless the figure's config says otherwise (figure.select): by the final
# value of metric, or, with last_fraction, by its mean over the rows of that last fraction of the run
# (the continual setting's online loss over the last quarter of a stream).
DEFAULT_SELECT = {"metric": "train/loss", "mode": "min"}


def metrics_columns(step_size_keys: Iterable[str]) -> list[str]:
    return [*PROGRESS, *QUALITY, *step_size_keys, *COSTS]


def is_step_size(column: str) -> bool:
    return column.startswith(STEP_SIZE)


def runs_columns(swept: Iterable[str], metric_columns: Iterable[str]) -> list[str]:
    return [*IDENTITY, *swept, *metric_columns]


def swept_keys(runs_values: Iterable[Mapping[str, str]]) -> list[str]:
    """The keys a sweep varies (its runs' overrides, as {key: value}), without the seed: the
    columns of runs.csv that make a run's key."""
    return sorted({key for values in runs_values for key in values if key != SEED})


def run_key(values: Mapping[str, str]) -> str:
    """A run's identity within its sweep: its swept values, sorted, without the seed and the
    keys it leaves unset (blank)."""
    return " ".join(sorted(f"{key}={value}" for key, value in values.items() if key != SEED and value != ""))


def steady_median(windows: list[float]) -> float:
    """The median over logged windows, leaving out the first (warm-up, compilation)."""
    return statistics.median(windows[1:] or windows)


def final(rows: list[dict[str, str]], metric: str) -> float:
    """The last logged value of metric; nan if the run never logged it."""
    values = [row[metric] for row in rows if row.get(metric, "") != ""]
    return float(values[-1]) if values else math.nan


def mean_over_last(rows: list[dict[str, str]], metric: str, fraction: float) -> float:
    """The mean of metric over the rows logged in the last ``fraction`` of the run's steps (those after
    step ``(1 - fraction) * last step``); nan if the run logged none there."""
    logged = [(int(row["step"]), float(row[metric])) for row in rows if row.get(metric, "") != ""]
    if not logged:
        return math.nan
    start = (1 - fraction) * logged[-1][0]
    return statistics.fmean(value for step, value in logged if step > start)


def score(run_rows: list[list[dict[str, str]]], metric: str, mode: str, last_fraction: float | None = None) -> float:
    """The selection rule: mean over seeds of the final metric (or of its mean over the last_fraction
    of the run), oriented so that lower is better; a diverged seed ranks last."""
    values = [final(rows, metric) if last_fraction is None else mean_over_last(rows, metric, last_fraction)
              for rows in run_rows]
    if not values or any(not math.isfinite(v) for v in values) or any(rows[0]["status"] != "finished"
                                                                      for rows in run_rows):
        return math.inf
    mean = statistics.fmean(values)
    return mean if mode == "min" else -mean


def tuning_score(rows: list[dict[str, str]], metric: str, mode: str, last_fraction: float | None = None
                 ) -> float | None:
    """A tuning run's score (``score`` of its one seed), or None while it is not over: no rows yet,
    or stopped before the end (preempted, out of time), so that no choice is made without it."""
    if not rows or rows[0]["status"] not in ("finished", "failed"):
        return None
    return score([rows], metric, mode, last_fraction)
