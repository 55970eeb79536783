"""The continual setting: MetaOptimize on streams whose loss changes over time.

    python -m experiments.continual                 # both streams, 3 seeds -> results/continual/
    python -m experiments.continual --steps 2000 --seeds 0 --out /tmp/continual   # a quick look

Every learner sees the same streams (experiments/streams.py), one batch per step, once, and is
scored on its online loss (the loss of each batch before it steps on it). The learners:

* MetaOptimize variants: the paper's meta step size for Adam / Lion meta (1e-3) and an initial
  step size one or two orders of magnitude below the good fixed ones. The paper recommends a
  discount gamma < 1 for non-stationary problems: the Hessian-free variants run gamma 0.9, 0.99
  and 1, and the table reports each one's best gamma (as the fixed steps report their best point).
* Fixed step sizes (SGD, Adam) over a grid; the table reports the best grid point, picked in
  hindsight by the very number reported, which favours them.
* IDBD (Sutton, 1992) over a grid of its meta step size: with the exact Hessian diagonal on
  the linear stream (its home ground), with Hutchinson's estimate of it on the digits MLP.

Outputs: curves.csv (online loss per method, seed and window of steps), summary.csv (mean
online loss over the last quarter of each stream, per method: mean and standard deviation
over seeds), continual.png, and README.md with the table.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from dataclasses import dataclass
from multiprocessing import Pool
from typing import Callable

import numpy as np
import torch

from metaopt import Approximation, MetaOptimize, idbd
from experiments.streams import STREAMS

# -- the experiment ---------------------------------------------------------------------------

STREAM_SETTINGS = {
    "linear_tracking": dict(steps=20_000, flip_every=20),  # Sutton's task: a flip every 20 examples
    "permuted_digits": dict(steps=10_000, permute_every=1_000, batch_size=16),  # 10 label permutations
}
SEEDS = (0, 1, 2)
LAST_FRACTION = 0.25  # the summary averages the online loss over the last quarter of each stream
WINDOW = 200  # steps per point of the learning curves
META_LR = 1e-3  # the paper's, for Adam and Lion meta updates
SGD_GRID = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
GAMMAS = (0.9, 0.99, 1.0)  # of the Hessian-free variants
ADAM_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
IDBD_GRID = (3e-3, 1e-2, 3e-2)
CACHE = "runs/continual"  # one .npy per finished run: an interrupted experiment continues where it stopped


@dataclass(frozen=True)
class Method:
    name: str  # label in the table and the plot
    build: Callable  # params -> optimizer
    family: str = ""  # grid members share a family; the table keeps the best member
    hessian: str = ""  # "closure": step(closure) with create_graph; "diagonal": the stream's exact diagonal


def metaoptimize(base, meta, blocks="scalar", approx="hessian_free", *, alpha0, meta_lr=META_LR, **kwargs):
    return lambda params: MetaOptimize(
        params, base, meta, blocks, approx=approx, alpha0=alpha0, meta_lr=meta_lr, weight_decay=0.0, **kwargs
    )


def methods(stream: str) -> list[Method]:
    """Every learner run on ``stream``. alpha0: 1e-3 for SGD bases, 1e-4 for AdamW, 1e-5 for Lion."""
    hvp = "closure"
    diagonal = "diagonal" if stream == "linear_tracking" else "closure"  # exact x^2, or Hutchinson's estimate
    hessian_free = {  # family: (base, meta, blocks, alpha0)
        "MO HF (SGD, Adam) scalar": ("sgd", "adam", "scalar", 1e-3),
        "MO HF (SGD, Adam) weightwise": ("sgd", "adam", "weightwise", 1e-3),
        "MO HF (AdamW, Adam) scalar": ("adamw", "adam", "scalar", 1e-4),
        "MO HF (Lion, Lion) scalar": ("lion", "lion", "scalar", 1e-5),
    }
    runs = [
        Method(f"{family}, gamma={gamma:g}", metaoptimize(base, meta, blocks, alpha0=alpha0, gamma=gamma), family)
        for family, (base, meta, blocks, alpha0) in hessian_free.items() for gamma in GAMMAS
    ]
    runs += [
        Method("MO L (SGD, Adam) scalar", metaoptimize("sgd", "adam", approx="l", alpha0=1e-3), hessian=hvp),
        Method("MO 2x2 (SGD, Adam) scalar", metaoptimize("sgd", "adam", approx="2x2", alpha0=1e-3), hessian=hvp),
        Method("MO 2x2 (SGD, Adam) weightwise", metaoptimize("sgd", "adam", "weightwise", "2x2", alpha0=1e-3),
               hessian=diagonal),
        Method("MO 2x2 (AdamW, Adam) scalar", metaoptimize("adamw", "adam", approx="2x2", alpha0=1e-4), hessian=hvp),
    ]
    runs += [Method(f"SGD lr={lr:g}", lambda p, lr=lr: torch.optim.SGD(p, lr=lr), "SGD (best fixed)") for lr in SGD_GRID]
    runs += [Method(f"Adam lr={lr:g}", lambda p, lr=lr: torch.optim.Adam(p, lr=lr), "Adam (best fixed)") for lr in ADAM_GRID]
    idbd_name = "IDBD" if stream == "linear_tracking" else "IDBD (Hutchinson diagonal)"
    approx = Approximation("l", hessian="diagonal", clip_trace=True, meta_first=True)
    for theta in IDBD_GRID:
        # metaopt.idbd on the linear stream; the same configuration on the MLP, with the Hessian
        # diagonal estimated (IDBD itself is defined for linear least squares).
        build = (lambda p, theta=theta: idbd(p, alpha0=1e-3, meta_lr=theta)) if stream == "linear_tracking" else \
            (lambda p, theta=theta: MetaOptimize(p, "sgd", "sgd", "weightwise", approx=approx, alpha0=1e-3,
                                                 meta_lr=theta, weight_decay=0.0))
        runs.append(Method(f"{idbd_name} theta={theta:g}", build, f"{idbd_name} (best theta)", hessian=diagonal))
    return runs


# -- one run ----------------------------------------------------------------------------------


def run(stream_name: str, method_name: str, seed: int, steps: int | None) -> tuple[str, str, int, np.ndarray]:
    """The online loss of one learner on one stream, step by step (nan after a divergence)."""
    torch.set_num_threads(1)  # runs go in parallel processes; tiny models gain nothing from threads
    settings = dict(STREAM_SETTINGS[stream_name], seed=seed)
    if steps is not None:
        settings["steps"] = steps
    slug = "".join(c if c.isalnum() or c in "=.-" else "_" for c in method_name)
    cached = os.path.join(CACHE, stream_name, f"steps={settings['steps']}", slug, f"seed={seed}.npy")
    if os.path.exists(cached):
        return stream_name, method_name, seed, np.load(cached)
    stream = STREAMS[stream_name](**settings)
    method = next(m for m in methods(stream_name) if m.name == method_name)
    torch.manual_seed(seed)
    model = stream.model()
    optimizer = method.build(model.parameters())
    losses = np.full(stream.steps, np.nan)
    for t in range(stream.steps):
        x, y = stream.batch(t)

        def closure():
            optimizer.zero_grad()
            loss = stream.loss(model(x), y)
            loss.backward(create_graph=method.hessian == "closure")
            return loss

        if method.hessian == "diagonal":
            loss = closure()
            optimizer.step(hessian_diagonal=stream.hessian_diagonal(model, t))
        else:
            loss = optimizer.step(closure)
        losses[t] = loss.item()
        if not math.isfinite(losses[t]):
            break  # diverged: the rest stays nan and the run scores infinity
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    np.save(cached, losses)
    return stream_name, method_name, seed, losses


# -- the whole experiment -----------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="shorten every stream (a quick look)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--streams", nargs="+", default=list(STREAM_SETTINGS), choices=list(STREAM_SETTINGS))
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="results/continual")
    args = parser.parse_args()

    jobs = [(s, m, seed, args.steps) for s in args.streams for m in methods(s) for seed in args.seeds]
    # The runs that keep the Hessian are the slow ones: start them first, so that the processes finish together.
    jobs.sort(key=lambda job: (job[1].hessian == "", job[0] == "linear_tracking"))
    with Pool(args.processes) as pool:
        results = pool.starmap(run, [(s, m.name, seed, steps) for s, m, seed, steps in jobs], chunksize=1)

    os.makedirs(args.out, exist_ok=True)
    summary = summarise(results)
    write_curves(results, os.path.join(args.out, "curves.csv"))
    write_summary(summary, os.path.join(args.out, "summary.csv"))
    plot(results, summary, os.path.join(args.out, "continual.png"))
    write_readme(summary, args, os.path.join(args.out, "README.md"))
    for stream, rows in summary.items():
        print(f"\n{stream}: mean online loss over the last {LAST_FRACTION:.0%}")
        for row in rows:
            print(f"  {row['method']:45s} {row['mean']:.4g} +- {row['std']:.2g}")


def tail_mean(losses: np.ndarray) -> float:
    tail = losses[int(len(losses) * (1 - LAST_FRACTION)):]
    return float(tail.mean()) if np.isfinite(tail).all() else math.inf


def summarise(results) -> dict[str, list[dict]]:
    """Per stream, one row per method (a grid: its best member, by the mean over seeds)."""
    scores: dict[tuple[str, str], list[float]] = {}
    for stream, name, _, losses in results:
        scores.setdefault((stream, name), []).append(tail_mean(losses))
    summary = {}
    for stream in dict.fromkeys(s for s, *_ in results):
        rows = {}
        for method in methods(stream):
            if (stream, method.name) not in scores:
                continue
            values = scores[(stream, method.name)]
            row = {"method": method.family or method.name, "setting": method.name,
                   "mean": float(np.mean(values)), "std": float(np.std(values)), "seeds": len(values)}
            if row["method"] not in rows or row["mean"] < rows[row["method"]]["mean"]:
                rows[row["method"]] = row
        summary[stream] = sorted(rows.values(), key=lambda row: row["mean"])
    return summary


def write_curves(results, path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["stream", "method", "seed", "step", "online_loss"])
        for stream, name, seed, losses in results:
            for start in range(0, len(losses), WINDOW):
                writer.writerow([stream, name, seed, start + WINDOW, f"{np.mean(losses[start:start + WINDOW]):.6g}"])


def write_summary(summary, path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["stream", "method", "setting", "mean", "std", "seeds"])
        writer.writeheader()
        for stream, rows in summary.items():
            for row in rows:
                writer.writerow({"stream": stream, **row})


def plot(results, summary, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(7 * len(summary), 4.5), squeeze=False)
    for ax, (stream, rows) in zip(axes[0], summary.items()):
        for index, row in enumerate(rows):  # the reported setting of every method, mean over seeds
            curves = np.stack([losses for s, name, _, losses in results if s == stream and name == row["setting"]])
            windows = curves[:, : curves.shape[1] // WINDOW * WINDOW].reshape(len(curves), -1, WINDOW).mean(2)
            steps = np.arange(1, windows.shape[1] + 1) * WINDOW
            ax.plot(steps, windows.mean(0), label=f"{row['setting']} ({row['mean']:.3g})", lw=1.2,
                    color=plt.cm.tab20(index % 20), ls="-" if row["setting"].startswith("MO") else "--")
        ax.set(title=stream, xlabel="step", ylabel=f"online loss (mean of {WINDOW} steps)", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_readme(summary, args, path: str) -> None:
    lines = [
        "# The continual setting: online loss on non-stationary streams",
        "",
        "Made by `make continual` (`python -m experiments.continual`); the streams are in experiments/streams.py:",
        f"linear_tracking {STREAM_SETTINGS['linear_tracking']} and permuted_digits {STREAM_SETTINGS['permuted_digits']}"
        + (f", shortened to {args.steps} steps" if args.steps else "") + f"; seeds {args.seeds}.",
        "Each number is the mean online loss (the loss of each batch before the learner steps on it) over",
        f"the last {LAST_FRACTION:.0%} of the stream, mean +- standard deviation over seeds. Grids (fixed step sizes,",
        "IDBD's theta) report their best point, chosen in hindsight by this same number, and so do the",
        f"Hessian-free MetaOptimize variants (MO HF) over the discount gamma in {list(GAMMAS)} (the setting",
        "column names the best gamma); the others (L, 2x2) run gamma 1. Meta step size 1e-3, alpha0 1e-3",
        "(SGD base), 1e-4 (AdamW), 1e-5 (Lion). curves.csv has every run, continual.png the reported settings.",
        "",
    ]
    for stream, rows in summary.items():
        lines += [f"## {stream}", "", "| method | setting | online loss, last quarter |", "|---|---|---|"]
        lines += [f"| {r['method']} | {r['setting'] if r['setting'] != r['method'] else ''} | {r['mean']:.4g} +- {r['std']:.2g} |"
                  for r in rows]
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
