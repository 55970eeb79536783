"""The continual setting through the one trainer: its streams as datasets read in order, its learners
as optimizer configs, its sweep as the item conf/experiment/continual.yaml.

The trainer's train/loss of a stream is checked, step by step and bit for bit, against an online loop
written here (the loss of each batch before the learner steps on it); a stopped stream run resumes bit
for bit; the item's sweep, labels and selection rule are checked against its config.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from experiments.data.streams import LinearTracking, PermutedDigits
from experiments.reproduce import compose_experiment
from experiments.schema import mean_over_last, score
from experiments.sweeps import expected_runs
from experiments.trainer import train
from tests.experiments.helpers import compose_train
from metaopt import Approximation, MetaOptimize, idbd

REPOSITORY = Path(__file__).resolve().parents[2]
STEPS = 60
COMMON = [f"trainer.max_steps={STEPS}", "trainer.log_every=1", "trainer.eval_every=0", "trainer.progress_bar=false",
          "logger=csv", "seed=3"]
LINEAR = ["dataset=linear_tracking", "model=linear"]
DIGITS = ["dataset=permuted_digits", "model=tanh_mlp", "dataset.permute_every=20"]


def logged(run_dir: Path, column: str = "train/loss") -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(row[column]) for row in csv.DictReader(f) if row[column] != ""]


def online_losses(stream, model: nn.Module, optimizer, hessian: str) -> list[float]:
    """The reference: each batch's loss before the step on it, by a loop of its own."""
    losses = []
    for t in range(stream.steps):
        x, y = stream.batch(t)
        optimizer.zero_grad()
        loss = stream.loss(model(x), y)
        loss.backward(create_graph=hessian == "graph")
        if hessian == "exact":
            optimizer.step(hessian_diagonal=stream.hessian_diagonal(model, t))
        else:
            optimizer.step()
        losses.append(loss.item())
    return losses


def linear_model() -> nn.Module:
    model = nn.Linear(20, 1, bias=False)
    nn.init.zeros_(model.weight)
    return model


def digits_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


# (overrides, stream, model, optimizer builder, how the reference gets the Hessian)
LEARNERS = {
    "idbd, exact diagonal": (
        [*LINEAR, "optimizer=idbd", "optimizer.meta_lr=0.01"], LinearTracking, linear_model,
        lambda p: idbd(p, alpha0=1e-3, meta_lr=0.01), "exact"),
    "2x2 weightwise, exact diagonal": (
        [*LINEAR, "optimizer=metaopt_hessian", "optimizer.approx=2x2", "optimizer.base=sgd", "optimizer.meta=adam",
         "optimizer.blocks=weightwise", "optimizer.alpha0=1e-3", "optimizer.weight_decay=0.0",
         "optimizer.adapter.hessian=linear_least_squares"], LinearTracking, linear_model,
        lambda p: MetaOptimize(p, "sgd", "adam", "weightwise", approx="2x2", alpha0=1e-3, meta_lr=1e-3,
                               weight_decay=0.0), "exact"),
    "hessian-free, gamma 0.9": (
        [*DIGITS, "optimizer=metaopt", "optimizer.base=adamw", "optimizer.meta=adam", "optimizer.alpha0=1e-4",
         "optimizer.weight_decay=0.0", "optimizer.gamma=0.9"], PermutedDigits, digits_model,
        lambda p: MetaOptimize(p, "adamw", "adam", alpha0=1e-4, meta_lr=1e-3, weight_decay=0.0, gamma=0.9), "none"),
    "L, Hessian-vector products": (
        [*DIGITS, "optimizer=metaopt_hessian", "optimizer.approx=l", "optimizer.base=sgd", "optimizer.meta=adam",
         "optimizer.alpha0=1e-3", "optimizer.weight_decay=0.0"], PermutedDigits, digits_model,
        lambda p: MetaOptimize(p, "sgd", "adam", approx="l", alpha0=1e-3, meta_lr=1e-3, weight_decay=0.0), "graph"),
    "fixed Adam": (
        [*DIGITS, "optimizer=adam", "optimizer.lr=3e-3"], PermutedDigits, digits_model,
        lambda p: torch.optim.Adam(p, lr=3e-3), "none"),
}


@pytest.mark.parametrize("learner", list(LEARNERS))
def test_a_stream_run_logs_the_online_loss_of_a_loop_written_here_bit_for_bit(tmp_path, learner):
    overrides, stream_class, build_model, build_optimizer, hessian = LEARNERS[learner]
    cfg = compose_train(*overrides, *COMMON, f"run_root={tmp_path}")
    train(cfg, str(tmp_path / "run"))
    settings = {"permute_every": 20} if stream_class is PermutedDigits else {}
    stream = stream_class(steps=STEPS, seed=3, **settings)
    torch.manual_seed(3)
    model = build_model()
    expected = online_losses(stream, model, build_optimizer(model.parameters()), hessian)
    assert logged(tmp_path / "run") == expected
    # a regression logs no accuracy; a classification does
    assert (logged(tmp_path / "run", "train/acc") == []) == (stream_class is LinearTracking)


def test_the_hutchinson_learner_runs_and_its_step_sizes_move(tmp_path):
    """IDBD's configuration on the MLP: the diagonal estimated through the gradients' graph."""
    cfg = compose_train(*DIGITS, "optimizer=idbd_hutchinson", "optimizer.meta_lr=0.03", *COMMON, f"run_root={tmp_path}")
    result = train(cfg, str(tmp_path / "run"))
    approx = result.adapter.optimizer.approx
    assert approx == Approximation("l", hessian="diagonal", clip_trace=True, meta_first=True)
    assert result.summary["step_size/1.weight/max"] != result.summary["step_size/1.weight/min"]


def test_a_stopped_stream_run_resumes_bit_for_bit(tmp_path):
    overrides = [*LINEAR, "optimizer=idbd", "optimizer.meta_lr=0.01", *COMMON, f"run_root={tmp_path}"]
    train(compose_train(*overrides), str(tmp_path / "whole"))
    stopped = train(compose_train(*overrides, "trainer.max_time=0"), str(tmp_path / "resumed"))  # stops after step 1
    assert stopped.summary["status"] == "stopped" and stopped.summary["step"] < STEPS
    train(compose_train(*overrides), str(tmp_path / "resumed"))
    assert logged(tmp_path / "resumed") == logged(tmp_path / "whole")


def test_a_stream_is_read_once_and_the_exact_diagonal_needs_the_linear_model(tmp_path):
    too_long = compose_train(*LINEAR, "optimizer=sgd", *COMMON, "dataset.steps=10", f"run_root={tmp_path}")
    with pytest.raises(ValueError, match=r"a stream of 10 steps.*set trainer.max_steps to at most 10"):
        train(too_long, str(tmp_path / "long"))
    wrong_model = compose_train(*DIGITS, "optimizer=idbd", *COMMON, f"run_root={tmp_path}")
    with pytest.raises(ValueError, match="linear_least_squares is the exact Hessian diagonal of a linear model"):
        train(wrong_model, str(tmp_path / "mlp"))


def test_the_item_declares_every_learner_as_a_labelled_curve():
    cfg = compose_experiment("continual", "full")
    runs = expected_runs(cfg)
    grids = list(cfg.hydra.sweeper.grids)
    assert len(runs) == 168 and {run.grid for run in runs} == set(grids)
    assert sorted(cfg.figure.tuned) == sorted(grids)  # each grid is one curve: its best setting
    assert {run.arm for run in runs} == set(grids) == set(cfg.figure.labels)
    assert [arm for panel in cfg.figure.panels for arm in panel.arms] == grids
    assert set(cfg.figure.baselines) <= set(grids)
    # every run is as long as its stream, and the last quarter is a whole number of logged windows
    for run in runs:
        steps = int(run.values["trainer.max_steps"])
        assert steps in (20000, 10000) and steps * cfg.figure.select.last_fraction % cfg.trainer.log_every == 0


def test_the_selection_over_the_last_quarter_is_the_mean_of_its_rows():
    rows = [{"step": str(step), "train/loss": str(float(step % 7)), "status": "finished"}
            for step in range(10, 101, 10)]
    assert mean_over_last(rows, "train/loss", 0.25) == statistics.fmean(float(s % 7) for s in (80, 90, 100))
    diverged = [dict(row, status="failed") for row in rows]
    assert score([rows, rows], "train/loss", "min", 0.25) == mean_over_last(rows, "train/loss", 0.25)
    assert score([rows, diverged], "train/loss", "min", 0.25) == math.inf


@pytest.mark.slow
def test_make_continual_smoke_sweeps_collects_and_draws(tmp_path):
    """The item end to end as a user runs it (the basic launcher): 56 runs, their manifest and progress,
    runs.csv, the figure and the table with every learner."""
    command = [sys.executable, "-m", "experiments.train", "experiment=continual", "scale=smoke",
               f"run_root={tmp_path}/runs"]
    swept = subprocess.run(command, cwd=REPOSITORY, check=True, capture_output=True, text=True)
    # the sweep says how far it is after each batch, and writes itself down (its manifest)
    assert "56 of 56 runs done (0 diverged)" in swept.stdout + swept.stderr
    (manifest,) = (tmp_path / "runs" / "continual").glob("sweep-*.json")
    record = json.loads(manifest.read_text())
    assert record["complete"] and len(record["runs"]) == 56 and all(entry["folder"] for entry in record["runs"])
    subprocess.run([sys.executable, "scripts/collect_runs.py", "continual", "--scale", "smoke", "--out",
                    str(tmp_path / "results/continual"), f"run_root={tmp_path}/runs"], cwd=REPOSITORY, check=True)
    subprocess.run([sys.executable, "scripts/make_figures.py", "continual", "--results", str(tmp_path / "results")],
                   cwd=REPOSITORY, check=True)
    table = (tmp_path / "results/continual/continual.md").read_text()
    cfg = compose_experiment("continual", "smoke")
    assert all(f"| {label}" in table for label in cfg.figure.labels.values())
    assert (tmp_path / "results/continual/continual.png").stat().st_size > 0
