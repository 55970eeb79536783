"""The beyond item: its sweep, the adapter's logging of learned hyper-parameters, its report and its stream."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments import beyond
from experiments.adapters import OptimizerAdapter
from experiments.reproduce import CONF, compose_experiment
from experiments.data.streams import SignalOrNoise
from experiments.sweeps import Run, expected_runs
from metaopt import MetaOptimize


def test_the_mini_scale_shrinks_the_runs_not_the_optimizers():
    """Every grid's first run composes to the same optimizer at mini and at full scale."""
    mini, full = compose_experiment("beyond", "mini"), compose_experiment("beyond", "full")
    assert mini.trainer.max_steps < full.trainer.max_steps
    first = {}
    for run in expected_runs(mini):
        first.setdefault(run.grid, run)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for run in first.values():
            overrides = [o for o in run.overrides if o.split("=", 1)[0] not in ("dataset", "model")]
            jobs = [compose("train", overrides=["experiment=beyond", f"scale={scale}", *overrides]).optimizer
                    for scale in ("mini", "full")]
            assert jobs[0] == jobs[1], run.grid
            learned = [name for name in jobs[0].learn if name != "step_size"]
            assert learned == ([] if "fixed" in run.grid else ["weight_decay" if "kappa" in run.grid else "momentum"])


def test_the_adapter_logs_the_learned_hyper_parameters_as_columns():
    factory = functools.partial(MetaOptimize, base="sgdm", learn=["step_size", "momentum"], alpha0=0.1)  # as Hydra passes it
    logged = OptimizerAdapter(torch.nn.Linear(3, 2), factory, total_steps=1).step_sizes()
    assert set(logged) == {"step_size", "momentum"} and logged["momentum"] == pytest.approx(0.9)


def rows(train_loss: float, learned: float, status: str = "finished") -> list[dict[str, str]]:
    return [{"step": "0", "train/loss": "", "test/acc": "0.1", "weight_decay": "0.01", "status": status},
            {"step": "10", "train/loss": str(train_loss), "test/acc": "0.8", "weight_decay": str(learned), "status": status}]


def test_the_report_pairs_each_initial_value_learned_and_fixed_and_marks_a_divergence(tmp_path):
    cfg = compose_experiment("beyond", "smoke")
    entry = cfg.figure.sweeps[0]
    runs = [(Run(entry.learned, (f"{entry.key}=0.01", f"seed={seed}"), "a"), rows(0.5 + seed, 1e-3)) for seed in (0, 1)]
    runs += [(Run(entry.learned, (f"{entry.key}=1", "seed=0"), "b"), rows(math.nan, math.nan, "failed"))]
    runs += [(Run(entry.fixed, (f"{entry.key}=0.01", "seed=0"), entry.fixed), rows(0.7, 0.01))]
    chosen = {sweep.fixed: (f"{sweep.fixed} (weight_decay=0.01, tuned)", [rows(0.7, 0.01)]) for sweep in cfg.figure.sweeps}
    cfg.figure.sweeps = [entry]
    (sweep,) = beyond.report(cfg, runs, chosen)
    assert [point.value for point in sweep.learned] == [0.01, 1.0]
    assert sweep.learned[0].losses == [0.5, 1.5] and sweep.learned[0].learned == [1e-3, 1e-3]
    text = beyond.markdown("title", "smoke scale", [sweep])
    assert "| 0.01 | 1 ± 0.7 | 0.8 ± 0 | 0.001 | 0.7 | 0.8 |" in text and "| 1 | diverged |" in text
    assert "Tuned fixed (weight_decay=0.01, tuned): train loss 0.7" in text
    beyond.plot("title", "smoke scale", [sweep], tmp_path / "beyond.png")
    assert (tmp_path / "beyond.png").stat().st_size > 10_000


def test_the_stream_alternates_noise_and_signal():
    stream = SignalOrNoise(steps=400, switch_every=100, batch_size=8)
    assert [stream.signal(t) for t in (0, 99, 100, 199, 200)] == [False, False, True, True, False]
    noise, signal = stream.y[:100].std().item(), stream.y[100:200].std().item()
    assert 0.8 < noise < 1.2 and signal > 3 * noise  # 20 inputs of +-1 weights: a signal of sd sqrt(20)
