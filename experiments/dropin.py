"""The drop-in benchmark's report (conf/experiment/dropin.yaml): every arm's train loss and test
metric at the horizons (300, 1,000, 3,000, 10,000 steps), means over seeds, and whether each
MetaOptimize arm meets the goals of figure.goals. scripts/make_figures.py (kind dropin) draws
results/dropin/dropin.png and writes results/dropin/dropin.md from it.

    python -m experiments.dropin mini    # the sweep's runs and its estimated wall time (make dropin prints it)

A task is a panel of figure.panels: its untuned arms are the runs of its grid, one arm per optimizer
config, and its tuned AdamW is the best setting of its tuned grid (as the sweeper chose it). Each
arm's label and role come from figure.arms, keyed by its optimizer config (the tuned AdamW: adamw_tuned).

The value at a horizon is the row logged at that step: the train loss is the trainer's mean over the
log window that ends there (trainer.log_every steps), the test metric the evaluation made there.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

TRAIN = "train/loss"
TUNED_KEY = "adamw_tuned"  # the tuned AdamW's entry in figure.arms

# Measured for the wall-time estimate: a run's wall seconds per training step (evaluation every 100
# steps included), the mean over the arms of 500-step runs of each task's grid on one thread of this
# 2-core machine beside other jobs (arms range: digits 0.6-1.9 ms, Fashion-MNIST 2.0-10.7 ms, text
# 2.9-8.0 ms), and a run's start-up (a fresh process: imports, data).
SECONDS_PER_STEP = {"digits": 0.00084, "fashion": 0.0046, "text": 0.0055}
START_S = 6.0


@dataclass
class Arm:
    key: str  # its optimizer config (the tuned AdamW: adamw_tuned)
    label: str
    role: str  # metaopt | lr_free | adamw | tuned
    seeds: list[list[dict[str, str]]]  # each seed's logged rows


@dataclass
class Task:
    title: str
    test_metric: str  # test/acc or test/loss
    arms: list[Arm]
    values: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)  # arm -> step -> (train, test)
    goals: dict[str, dict[int, tuple[bool, str]]] = field(default_factory=dict)  # metaopt arm -> step -> (met, why)


def value_at(rows: Sequence[Mapping[str, str]], metric: str, step: int) -> float:
    """metric in the row logged at step; nan if none holds it (the run stopped or diverged before)."""
    for row in rows:
        if int(row["step"]) == step and row.get(metric, "") != "":
            return float(row[metric])
    return math.nan


def mean_at(seeds: Sequence[Sequence[Mapping[str, str]]], metric: str, step: int) -> float:
    """The mean over seeds at step; nan unless every seed has a finite value there."""
    values = [value_at(rows, metric, step) for rows in seeds]
    return statistics.fmean(values) if values and all(math.isfinite(v) for v in values) else math.nan


def task_arms(fig_cfg: Any, panel: Any, runs: Sequence[tuple[Any, list]], chosen: Mapping[str, tuple]) -> list[Arm]:
    """The panel's arms in sweep order, then its tuned AdamW (the best setting, with its lr in the label)."""
    declared = fig_cfg.arms
    seeds_of: dict[str, list] = {}
    for run, rows in runs:
        if run.grid == panel.grid:
            seeds_of.setdefault(run.values["optimizer"], []).append(rows)
    missing = [key for key in [*seeds_of, TUNED_KEY] if key not in declared]
    if missing:
        raise ValueError(f"figure.arms declares no label for {missing}: add them to conf/experiment/dropin.yaml")
    arms = [Arm(key, declared[key].label, declared[key].role, seeds) for key, seeds in seeds_of.items()]
    if panel.tuned in chosen:
        _, seeds = chosen[panel.tuned]
        lr = next((value for key, value in seeds[0][0].items() if key.lstrip("+") == "optimizer.lr" and value), "")
        arms.append(Arm(TUNED_KEY, f"{declared[TUNED_KEY].label} ({lr})" if lr else declared[TUNED_KEY].label,
                        declared[TUNED_KEY].role, seeds))
    return arms


def best(values: Sequence[float], higher_is_better: bool) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan
    return max(finite) if higher_is_better else min(finite)


def check_goals(task: Task, horizons: Sequence[int], goals: Any) -> None:
    """task.goals for each MetaOptimize arm at each horizon that has a goal (early_step, and from from_step on)."""
    accuracy = task.test_metric.endswith("acc")
    lr_free = [arm.key for arm in task.arms if arm.role == "lr_free"]
    adamw = [arm.key for arm in task.arms if arm.role == "adamw"]
    for arm in task.arms:
        if arm.role != "metaopt":
            continue
        verdicts = {}
        for step in horizons:
            train, test = task.values[arm.key][step]
            if step == goals.early_step:
                reference = best([task.values[key][step][0] for key in adamw], higher_is_better=False)
                verdicts[step] = _verdict([("train loss", train, reference, train <= reference,
                                            f"{_fmt(train)} vs AdamW() {_fmt(reference)}")])
            elif step >= goals.from_step:
                best_train = best([task.values[key][step][0] for key in lr_free], higher_is_better=False)
                best_test = best([task.values[key][step][1] for key in lr_free], higher_is_better=accuracy)
                ratio = train / best_train
                checks = [("train loss", train, best_train, ratio <= goals.train_loss_ratio,
                           f"train {ratio:.2f}x the best")]
                if accuracy:
                    gap = (best_test - test) * 100
                    checks.append(("test accuracy", test, best_test, gap <= goals.test_acc_points * 100 + 1e-9,
                                   f"test acc {gap:+.1f} points below the best"))
                else:
                    gap = test - best_test
                    checks.append(("test loss", test, best_test, gap <= goals.test_loss_nats + 1e-12,
                                   f"test loss {gap:+.3f} above the best"))
                verdicts[step] = _verdict(checks)
        task.goals[arm.key] = verdicts


def _verdict(checks: list[tuple[str, float, float, bool, str]]) -> tuple[bool, str]:
    """(met, why): met only when every value and reference is finite and every check holds."""
    unknown = [name for name, value, reference, _, _ in checks
               if not (math.isfinite(value) and math.isfinite(reference))]
    if unknown:
        return False, "no value: " + ", ".join(unknown)
    failed = [why for _, _, _, met, why in checks if not met]
    return (True, "yes") if not failed else (False, "no: " + "; ".join(failed))


def report(cfg: Any, runs: Sequence[tuple[Any, list]], chosen: Mapping[str, tuple]) -> list[Task]:
    """Every task of the benchmark with its arms' values at the horizons and the MetaOptimize arms' goals."""
    fig_cfg = cfg.figure
    horizons = [int(h) for h in fig_cfg.horizons]
    tasks = []
    for panel in fig_cfg.panels:
        task = Task(panel.title, panel.test_metric, task_arms(fig_cfg, panel, runs, chosen))
        for arm in task.arms:
            task.values[arm.key] = {step: (mean_at(arm.seeds, TRAIN, step), mean_at(arm.seeds, task.test_metric, step))
                                    for step in horizons}
        check_goals(task, horizons, fig_cfg.goals)
        tasks.append(task)
    return tasks


def _fmt(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.4g}" if abs(value) < 1000 else f"{value:.3g}"


def _step(step: int) -> str:
    return f"{step // 1000}k" if step >= 1000 and step % 1000 == 0 else str(step)


def markdown(title: str, scale: str, tasks: Sequence[Task], horizons: Sequence[int], goals: Any,
             seeds: Sequence[str]) -> str:
    """results/dropin/dropin.md: per task, each arm's train loss / test metric at each horizon, then the goals."""
    steps = [_step(h) for h in horizons]
    lines = [f"# {title} ({scale} scale)", "",
             f"Means over seeds {', '.join(seeds)} (scripts/make_figures.py from runs.csv; "
             "conf/experiment/dropin.yaml). Each cell: train loss / test metric at that step; n/a: a seed has no "
             "value there (it stopped or diverged).",
             "",
             f"Goals of a MetaOptimize arm: at step {goals.early_step:,} a train loss no higher than AdamW()'s "
             f"(lr 1e-3); from step {goals.from_step:,} on a train loss at most {goals.train_loss_ratio}x the best "
             "learning-rate-free optimizer's (Prodigy, DoG, mechanic, schedule-free AdamW) and a test accuracy at most "
             f"{goals.test_acc_points * 100:g} point below the best one's (on text: a test loss at most "
             f"{goals.test_loss_nats} nats per byte above the best one's); each metric's best taken over the four.", ""]
    for task in tasks:
        metric = "test accuracy" if task.test_metric.endswith("acc") else "test loss"
        lines += [f"## {task.title}", "", f"Train loss / {metric}.", "",
                  "| arm | " + " | ".join(steps) + " |", "|---|" + "---|" * len(steps)]
        for arm in task.arms:
            cells = [f"{_fmt(train)} / {_fmt(test)}" for train, test in (task.values[arm.key][h] for h in horizons)]
            lines.append(f"| {arm.label} | " + " | ".join(cells) + " |")
        goal_steps = [h for h in horizons if h == goals.early_step or h >= goals.from_step]
        lines += ["", "Goals:", "", "| MetaOptimize arm | " + " | ".join(_step(h) for h in goal_steps) + " | all |",
                  "|---|" + "---|" * (len(goal_steps) + 1)]
        for arm in task.arms:
            if arm.key in task.goals:
                verdicts = task.goals[arm.key]
                met = all(verdicts[h][0] for h in goal_steps)
                lines.append(f"| {arm.label} | " + " | ".join(verdicts[h][1] for h in goal_steps)
                             + f" | {'**yes**' if met else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def plot(fig_cfg: Any, scale: str, tasks: Sequence[Task], path: Any) -> None:
    """One column per task; rows: train loss and the task's test metric against steps (log x), every
    arm's mean over seeds (MetaOptimize solid, the learning-rate-free optimizers dashed, AdamW dotted;
    the library's defaults, the first arm, thick and black). A loss axis ends at 1.5 times the highest
    first value (and at 1e-6 below), so that a diverged run does not flatten every other curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 2.2, not 2.2 x 10^0, on a log axis within a decade
    styles = {"metaopt": "-", "lr_free": "--", "adamw": ":", "tuned": ":"}
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.2 * len(tasks), 8.4), squeeze=False)
    colors = [color for color in plt.get_cmap("tab20").colors if color[0] != color[1] or color[1] != color[2]]
    for col, task in enumerate(tasks):
        for row, metric in enumerate((TRAIN, task.test_metric)):
            ax, first_values, lowest = axes[row][col], [], math.inf
            for index, arm in enumerate(task.arms):
                steps, means = _mean_series(arm.seeds, metric)
                default = index == 0
                ax.plot(steps, means, color="black" if default else colors[index % len(colors)],
                        linestyle=styles.get(arm.role, "-"), linewidth=2.4 if default else 1.1,
                        zorder=3 if default else 2,
                        label=f"{fig_cfg.arms[TUNED_KEY].label} per task" if arm.role == "tuned" else arm.label)
                finite = [value for value in means if math.isfinite(value)]
                first_values += finite[:1]
                lowest = min([lowest, *finite])
            ax.set_xscale("log")
            if metric.endswith("loss") and first_values:
                ax.set_yscale("log")
                low, high = max(lowest, 1e-6) / 1.5, 1.5 * max(first_values)
                ax.set_ylim(low, high)
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())
            ax.set_xlabel("step")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        axes[0][col].set_title(task.title)
    handles, labels = axes[0][0].get_legend_handles_labels()  # the same arms in every column: one legend
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(f"{fig_cfg.title} ({scale} scale; mean over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.11, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_series(seeds: Sequence[Sequence[Mapping[str, str]]], metric: str) -> tuple[list[int], list[float]]:
    """The steps (above 0: the x axis is logarithmic) at which every seed logged metric, and the means there."""
    per_seed = [{int(r["step"]): float(r[metric]) for r in rows if r.get(metric, "") != "" and int(r["step"]) > 0}
                for rows in seeds]
    steps = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
    return steps, [statistics.fmean(s[step] for s in per_seed) for step in steps]


def estimate(cfg: Any) -> tuple[int, float]:
    """(runs, wall seconds) of the sweep at cfg's scale: each run's start-up and steps at the measured
    SECONDS_PER_STEP of its task, hydra.sweeper.max_batch_size runs at a time."""
    from experiments.sweeps import expected_runs

    task_of = {grid: panel.grid for panel in cfg.figure.panels for grid in (panel.grid, panel.tuned)}
    runs = expected_runs(cfg, tuning_score=lambda run: 0.0)  # the tuned grids' later runs included
    seconds = sum(START_S + cfg.trainer.max_steps * SECONDS_PER_STEP[task_of[run.grid]] for run in runs)
    return len(runs), seconds / (cfg.hydra.sweeper.max_batch_size or 1)


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    from experiments.reproduce import SCALES, compose_experiment

    parser = argparse.ArgumentParser(description="The drop-in benchmark's runs and estimated wall time.")
    parser.add_argument("scale", choices=SCALES, nargs="?", default="mini")
    args = parser.parse_args(argv)
    cfg = compose_experiment("dropin", args.scale)
    count, seconds = estimate(cfg)
    at_once = cfg.hydra.sweeper.max_batch_size or 1
    print(f"dropin at scale {args.scale}: {count} runs of {cfg.trainer.max_steps:,} steps, {at_once} at a time: "
          f"about {seconds / 60:.0f} minutes on this machine's CPU (experiments/dropin.py, SECONDS_PER_STEP)")


if __name__ == "__main__":
    main()
