"""Beyond step sizes: the ``beyond`` item's report, and a continual stream where the best weight decay changes.

The item (conf/experiment/beyond.yaml) runs MetaOptimize learning the weight decay or the momentum online
beside the step size (``learn=``) from several initial values, and the same optimizers learning the step
size alone with that value fixed. :func:`report` gathers, per ``figure.sweeps`` entry, each initial value's
final metrics over seeds (learned and fixed) and the tuned fixed setting; :func:`plot` draws them
(results/beyond/beyond.png) and :func:`markdown` tabulates them (beyond.md); scripts/make_figures.py
calls both (figure kind ``beyond``).

:func:`continual` (``python -m experiments.beyond continual``) is the continual case, the paper's home
ground: a linear regression stream whose target alternates between noise alone, where the best weight
decay is large, and a strong signal, where it is small (:class:`experiments.data.streams.SignalOrNoise`).
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from experiments.schema import final

TRAIN, TEST = "train/loss", "test/acc"


@dataclass
class Point:
    """One initial value of a sweep: each seed's final train loss, test accuracy and learned value."""

    value: float
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    learned: list[float] = field(default_factory=list)
    trajectories: list[list[dict[str, str]]] = field(default_factory=list)  # each seed's rows


@dataclass
class Sweep:
    title: str
    key: str  # the swept override, e.g. optimizer.weight_decay
    column: str  # the learned hyper-parameter's metrics column
    scale: str  # its axis: log or logit
    learned: list[Point]
    fixed: list[Point]
    tuned_label: str
    tuned: Point


def _points(runs: Sequence[tuple[Any, list]], grid: str, key: str, column: str) -> list[Point]:
    points: dict[float, Point] = {}
    for run, rows in runs:
        if run.grid != grid:
            continue
        value = float(run.values[key])
        point = points.setdefault(value, Point(value))
        finished = rows[0]["status"] == "finished"
        point.losses.append(final(rows, TRAIN) if finished else math.nan)
        point.accuracies.append(final(rows, TEST) if finished else math.nan)
        point.learned.append(final(rows, column) if finished else math.nan)
        point.trajectories.append(rows)
    return [points[value] for value in sorted(points)]


def report(cfg: Any, runs: Sequence[tuple[Any, list]], chosen: Mapping[str, tuple]) -> list[Sweep]:
    """Every ``figure.sweeps`` entry with its learned and fixed points and its tuned fixed setting."""
    sweeps = []
    for entry in cfg.figure.sweeps:
        label, seeds = chosen[entry.fixed]  # "<grid> (weight_decay=0.001, tuned)"
        label = label.split(" (", 1)[-1].removesuffix(")")
        tuned = Point(math.nan, [final(rows, TRAIN) for rows in seeds], [final(rows, TEST) for rows in seeds])
        sweeps.append(Sweep(entry.title, entry.key, entry.column, "logit" if entry.column in ("momentum", "normalizer")
                            else "log", _points(runs, entry.learned, entry.key, entry.column),
                            _points(runs, entry.fixed, entry.key, entry.column), label, tuned))
    return sweeps


def mean_sd(values: Sequence[float], digits: int = 4) -> str:
    """``mean ± sd`` over seeds (``mean`` alone for one seed); ``diverged`` when a seed is not finite."""
    if not values:
        return ""
    if not all(math.isfinite(v) for v in values):
        return "diverged"
    text = f"{statistics.fmean(values):.{digits}g}"
    return text + (f" ± {statistics.stdev(values):.1g}" if len(values) > 1 else "")


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values and all(math.isfinite(v) for v in values) else math.nan


def verdict(sweep: Sweep) -> str:
    """Where learning the hyper-parameter helps: its best and worst initial value against the tuned
    fixed setting, and the spread of the final train loss over the initial values, learned and fixed."""
    learned = [_mean(point.losses) for point in sweep.learned]
    fixed = [_mean(point.losses) for point in sweep.fixed]
    tuned = _mean(sweep.tuned.losses)
    finite_learned = [v for v in learned if math.isfinite(v)] or [math.nan]
    finite_fixed = [v for v in fixed if math.isfinite(v)] or [math.nan]
    return (f"learned from the best initial value: {min(finite_learned):.4g}, from the worst: {max(finite_learned):.4g}; "
            f"fixed at the same values: {min(finite_fixed):.4g} to {max(finite_fixed):.4g}; tuned fixed "
            f"({sweep.tuned_label}): {tuned:.4g} (final train loss, mean over seeds)")


def markdown(title: str, scale: str, sweeps: Sequence[Sweep]) -> str:
    lines = [f"# {title}", "", f"{scale}. Final train loss and test accuracy, mean ± sd over seeds (the fixed "
             "values other than the tuned one ran on the tuning seed alone where the sweep tuned on one); "
             "the learned value is its final value, mean over seeds.", ""]
    for sweep in sweeps:
        name = sweep.key.removeprefix("optimizer.")
        lines += [f"## {sweep.title}", "", f"| initial {name} | learned: train loss | learned: test acc | "
                  f"final learned {sweep.column} | fixed: train loss | fixed: test acc |", "|---|---|---|---|---|---|"]
        fixed = {point.value: point for point in sweep.fixed}
        for point in sweep.learned:
            other = fixed.get(point.value, Point(point.value))
            learned_value = _mean(point.learned)
            lines.append(f"| {point.value:g} | {mean_sd(point.losses)} | {mean_sd(point.accuracies)} | "
                         f"{learned_value:.3g} | {mean_sd(other.losses)} | {mean_sd(other.accuracies)} |")
        lines += ["", f"Tuned fixed ({sweep.tuned_label}): train loss {mean_sd(sweep.tuned.losses)}, test acc "
                  f"{mean_sd(sweep.tuned.accuracies)}.", "", verdict(sweep), ""]
    return "\n".join(lines)


def _draw_finals(ax, sweep: Sweep, metric_of: str) -> None:
    """The final metric against the initial value: learned (solid, with the seeds' range), fixed (dashed),
    the tuned fixed setting (a horizontal line)."""
    for points, style, label in ((sweep.learned, "-o", "learned from it"), (sweep.fixed, "--s", "fixed at it")):
        xs = [point.value for point in points]
        values = [getattr(point, metric_of) for point in points]
        means = [_mean(v) for v in values]
        ax.plot(xs, means, style, label=label, color="C0" if style == "-o" else "C1")
        for x, seeds in zip(xs, values):
            finite = [v for v in seeds if math.isfinite(v)]
            if len(finite) > 1:
                ax.plot([x, x], [min(finite), max(finite)], color="C0" if style == "-o" else "C1", linewidth=3, alpha=0.3)
    tuned = _mean(getattr(sweep.tuned, metric_of))
    if math.isfinite(tuned):
        ax.axhline(tuned, color="grey", linestyle=":", label=f"tuned fixed ({sweep.tuned_label})")
    ax.set_xscale(sweep.scale)


def plot(title: str, scale: str, sweeps: Sequence[Sweep], path: Path) -> None:
    """One column per sweep; rows: final train loss, final test accuracy (against the initial value), and
    the learned hyper-parameter over the steps from each initial value (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(sweeps), figsize=(4.4 * len(sweeps), 10), squeeze=False)
    for col, sweep in enumerate(sweeps):
        name = sweep.key.removeprefix("optimizer.")
        for row, (metric_of, label) in enumerate((("losses", f"final {TRAIN}"), ("accuracies", f"final {TEST}"))):
            ax = axes[row][col]
            _draw_finals(ax, sweep, metric_of)
            ax.set_ylabel(label)
            ax.set_xlabel(f"initial {name}")
            ax.grid(alpha=0.3)
        axes[0][col].set_yscale("log")
        axes[0][col].set_title(sweep.title, fontsize=9)
        axes[0][col].legend(fontsize=6, loc="best")
        ax = axes[2][col]
        for index, point in enumerate(sweep.learned):
            per_seed = [{int(r["step"]): float(r[sweep.column]) for r in rows if r.get(sweep.column, "") not in ("", "nan")}
                        for rows in point.trajectories]
            steps = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
            ax.plot(steps, [statistics.fmean(s[step] for s in per_seed) for step in steps], color=f"C{index}",
                    label=f"from {point.value:g}")
        ax.set_yscale(sweep.scale)
        ax.set_xlabel("step")
        ax.set_ylabel(f"learned {sweep.column}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title} ({scale}; bars: the seeds' range)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the continual stream ------------------------------------------------------------------------

KAPPAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
CONTINUAL_OPTIONS = {  # (AdamW, Adam), scalar blocks, the library's defaults but alpha0 (zero weights: no 'auto')
    **{f"learned kappa from {kappa:g}": {"learn": ("step_size", "weight_decay"), "weight_decay": kappa}
       for kappa in (1e-3, 1e-1)},
    **{f"fixed kappa={kappa:g}": {"weight_decay": kappa} for kappa in KAPPAS},
}
CONTINUAL_ALPHA0 = 1e-3


def continual_run(name: str, seed: int, steps: int, switch_every: int) -> tuple[list[float], list[float]]:
    """The online loss at every step of one learner, and its weight decay at every step."""
    import torch

    from experiments.data.streams import SignalOrNoise
    from metaopt import MetaOptimize

    torch.set_num_threads(1)
    stream = SignalOrNoise(steps=steps, switch_every=switch_every, seed=seed)
    torch.manual_seed(seed)
    model = stream.model()
    optimizer = MetaOptimize(model.parameters(), "adamw", "adam", alpha0=CONTINUAL_ALPHA0, **CONTINUAL_OPTIONS[name])
    learned = "weight_decay" in optimizer.learn
    losses, kappas = [], []
    for t in range(steps):
        x, y = stream.batch(t)
        optimizer.zero_grad()
        loss = stream.loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        kappas.append(optimizer.meta_parameter(model.weight, "weight_decay").item() if learned
                      else optimizer.param_groups[0]["weight_decay"])
    return losses, kappas


def _phase_means(losses: Sequence[float], switch_every: int) -> tuple[float, float, float]:
    """The mean online loss over the stream, over its noise phases and over its signal phases."""
    noise = [v for t, v in enumerate(losses) if (t // switch_every) % 2 == 0]
    signal = [v for t, v in enumerate(losses) if (t // switch_every) % 2 == 1]
    return statistics.fmean(losses), statistics.fmean(noise), statistics.fmean(signal)


def continual(steps: int, seeds: Sequence[int], switch_every: int, out: Path) -> None:
    """Every learner on every seed: out/continual.csv (per run), continual.md (mean ± sd) and continual.png."""
    runs = {(name, seed): continual_run(name, seed, steps, switch_every) for name in CONTINUAL_OPTIONS for seed in seeds}
    out.mkdir(parents=True, exist_ok=True)
    lines = ["method,seed,online_loss,noise_phases,signal_phases,final_kappa"]
    for (name, seed), (losses, kappas) in runs.items():
        lines.append(",".join([name, str(seed), *(f"{v:.6g}" for v in _phase_means(losses, switch_every)), f"{kappas[-1]:.6g}"]))
    (out / "continual.csv").write_text("\n".join(lines) + "\n")
    table = ["| method | online loss | noise phases | signal phases |", "|---|---|---|---|"]
    for name in CONTINUAL_OPTIONS:
        means = [_phase_means(runs[(name, seed)][0], switch_every) for seed in seeds]
        table.append(f"| {name} | " + " | ".join(mean_sd([m[i] for m in means]) for i in range(3)) + " |")
    (out / "continual.md").write_text(
        f"# A stream whose best weight decay changes: (AdamW, Adam), alpha0 = {CONTINUAL_ALPHA0:g}\n\n"
        f"experiments/data/streams.py SignalOrNoise: {steps} steps, noise alone and a strong signal alternating every "
        f"{switch_every} steps, seeds {', '.join(map(str, seeds))}; the mean online loss (each batch's loss before the "
        "step on it), mean ± sd over seeds (`python -m experiments.beyond continual`).\n\n" + "\n".join(table) + "\n")
    _plot_continual(runs, seeds, switch_every, out / "continual.png")


def _plot_continual(runs, seeds, switch_every: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.4), sharex=True)
    steps = len(next(iter(runs.values()))[0])
    window = max(1, switch_every // 10)
    for index, name in enumerate(CONTINUAL_OPTIONS):
        losses = np.mean([runs[(name, seed)][0] for seed in seeds], axis=0)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        learned = name.startswith("learned")
        bottom.plot(np.arange(len(smooth)) + window, smooth, label=name, color=f"C{index}",
                    linewidth=1.6 if learned else 0.8, linestyle="-" if learned else "--")
        if learned:
            top.plot(np.mean([runs[(name, seed)][1] for seed in seeds], axis=0), label=name, color=f"C{index}")
    for ax in (top, bottom):
        for start in range(switch_every, steps, 2 * switch_every):
            ax.axvspan(start, start + switch_every, color="grey", alpha=0.12, linewidth=0)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    top.set_ylabel("learned weight decay")
    top.set_title("grey: signal phases (a small weight decay is best); white: noise alone (a large one)", fontsize=9)
    top.legend(fontsize=7)
    bottom.set_ylabel(f"online loss (mean of {window} steps)")
    bottom.set_xlabel("step")
    bottom.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["continual"])
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--switch-every", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="results/beyond")
    args = parser.parse_args(argv)
    continual(args.steps, args.seeds, args.switch_every, Path(args.out))


if __name__ == "__main__":
    main()
