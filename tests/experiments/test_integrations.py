"""metaopt.integrations and examples/: each example runs as a real subprocess on a tiny problem (CPU, no network,
W&B offline), and what reached its logs (TensorBoard events, W&B's offline run, Trainer's trainer_state.json,
Lightning's metrics.csv) is checked against optimizer.step_sizes() at the same step."""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaopt import MetaOptimize
from metaopt.integrations._common import final_multiplier, unwrap
from tests.experiments.helpers import read_wandb_history

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40
SCHEDULE_WARNING = "StepSizeScheduleWarning"


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "default"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def tensorboard_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(str(log_dir / "**" / "events.out.tfevents.*"), recursive=True)
    accumulator = EventAccumulator(events)
    accumulator.Reload()
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def assert_learned(values: list[float]) -> None:
    assert all(value > 0 for value in values) and len(set(values)) > len(values) // 2, values  # moves over the steps


# -- torch alone: no framework is needed to import the library or read a schedule ---------------------------------

def test_import_metaopt_and_its_integrations_package_imports_no_framework():
    code = ("import sys, metaopt, metaopt.integrations, metaopt.integrations._common\n"
            "print([m for m in ('transformers', 'lightning', 'accelerate', 'tensorboard') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _optimizer() -> MetaOptimize:
    """A MetaOptimize after one step: alpha0="auto" estimates the step size there (NaN before it)."""
    model = torch.nn.Linear(2, 1)
    optimizer = MetaOptimize(model.parameters(), base="adamw", meta="lion")
    model(torch.ones(4, 2)).pow(2).mean().backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("make, expected", [
    (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / 100), 0.0),
    (lambda opt: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0), 1.0),
    (lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100), 0.0),
    (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.1), 0.01),
    (lambda opt: torch.optim.lr_scheduler.SequentialLR(opt, [torch.optim.lr_scheduler.ConstantLR(opt, 1.0, 0),
                                                             torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.5, 10)],
                                                       milestones=[10]), 0.5),
    (lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt), None),
])
def test_final_multiplier_replays_a_schedule_without_touching_the_optimizer(make, expected):
    optimizer = _optimizer()
    scheduler = make(optimizer)
    factor = final_multiplier(scheduler, 100)
    assert factor == (None if expected is None else pytest.approx(expected, abs=1e-9))
    assert optimizer.param_groups[0]["lr"] == 1.0 and getattr(scheduler, "last_epoch", 0) == 0


def test_unwrap_finds_metaoptimize_inside_wrappers():
    optimizer = _optimizer()
    wrapped = type("AcceleratedOptimizer", (), {"optimizer": optimizer})()
    assert unwrap(wrapped) is optimizer and unwrap(optimizer) is optimizer
    assert unwrap(torch.optim.SGD([torch.zeros(1)])) is None


def test_huggingface_callback_passed_in_callbacks_says_the_reporting_integrations_miss_the_step_sizes():
    from types import SimpleNamespace

    from metaopt.integrations.huggingface import StepSizeCallback

    optimizer = _optimizer()
    constant = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    state = SimpleNamespace(max_steps=10, global_step=5, log_history=[{"loss": 1.0, "step": 5}])
    callback = StepSizeCallback()
    with pytest.warns(UserWarning, match=r"log_step_sizes\(trainer\)") as caught:
        callback.on_train_begin(SimpleNamespace(report_to=["tensorboard"], lr_scheduler_type="constant"), state, None,
                                optimizer=type("AcceleratedOptimizer", (), {"optimizer": optimizer})(),
                                lr_scheduler=constant)
    assert len(caught) == 1  # and no schedule warning for a constant one
    logs = {"loss": 1.0}
    callback.on_log(None, state, None, logs=logs)
    assert logs["step_size"] == state.log_history[-1]["step_size"] == optimizer.step_sizes()["step_size"] > 0


# -- the examples, as subprocesses ---------------------------------------------------------------------------------

def test_plain_loop_logs_the_step_sizes_to_tensorboard_and_wandb(tmp_path):
    run_example("plain_loop.py", "--steps", str(STEPS), "--log-every", "10", "--output-dir", str(tmp_path))

    # the same run in this process, reading optimizer.step_sizes() itself
    spec = importlib.util.spec_from_file_location("plain_loop", ROOT / "examples" / "plain_loop.py")
    plain_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plain_loop)
    expected = {step: step_sizes["step_size"] for step, _, step_sizes in plain_loop.train(STEPS, 10)}
    assert sorted(expected) == [10, 20, 30, 40]

    logged = tensorboard_scalars(tmp_path / "tensorboard", "step_size")
    assert logged == pytest.approx(expected, rel=1e-6)  # TensorBoard keeps float32
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    wandb_logged = {row["_step"]: row["step_size"] for row in read_wandb_history(run_file) if "step_size" in row}
    assert wandb_logged == pytest.approx(expected, rel=1e-12)
    assert_learned(list(expected.values()))


def trainer_state(output_dir: Path) -> tuple[list[dict], dict[str, dict]]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    by_step = json.loads((output_dir / "step_sizes_by_step.json").read_text())
    return [entry for entry in history if "loss" in entry], by_step


def test_huggingface_trainer_logs_the_step_sizes_with_a_constant_schedule(tmp_path):
    result = run_example("huggingface_trainer.py", "--max-steps", str(STEPS), "--logging-steps", "5",
                         "--output-dir", str(tmp_path), "--report-to", "tensorboard")
    assert SCHEDULE_WARNING not in result.stderr and "StepSizeCallback runs after" not in result.stderr
    logs, by_step = trainer_state(tmp_path)
    assert [entry["step"] for entry in logs] == list(range(5, STEPS + 1, 5))
    for entry in logs:  # the value optimizer.step_sizes() gave at the end of that step
        assert entry["step_size"] == by_step[str(entry["step"])]["step_size"]
        assert entry["learning_rate"] == 1.0
    assert_learned([entry["step_size"] for entry in logs])
    # log_step_sizes put the callback ahead of Trainer's TensorBoard callback
    tensorboard = tensorboard_scalars(tmp_path, "train/step_size")
    assert tensorboard == pytest.approx({entry["step"]: entry["step_size"] for entry in logs}, rel=1e-6)


def test_huggingface_trainer_default_linear_schedule_warns_and_takes_the_step_size_to_zero(tmp_path):
    result = run_example("huggingface_trainer.py", "--max-steps", str(STEPS), "--logging-steps", "5",
                         "--output-dir", str(tmp_path), "--lr-scheduler-type", "linear")
    assert result.stderr.count(SCHEDULE_WARNING) == 1
    assert "lr_scheduler_type='linear'" in result.stderr and 'lr_scheduler_type="constant"' in result.stderr
    logs, by_step = trainer_state(tmp_path)
    assert [entry["step_size"] for entry in logs] == [by_step[str(entry["step"])]["step_size"] for entry in logs]
    first, last = logs[0]["step_size"], logs[-1]["step_size"]
    # the warning is needed: the schedule, not MetaOptimize, takes the step size to 0
    assert first > 5e-4 and last == 0.0 and by_step[str(STEPS)]["step_size"] == 0.0


@pytest.mark.slow  # two runs of 8 s, most of it importing Lightning
def test_lightning_logs_the_step_sizes_to_its_loggers_and_warns_of_a_decaying_scheduler(tmp_path):
    result = run_example("lightning_trainer.py", "--max-steps", str(STEPS), "--log-every", "10",
                         "--output-dir", str(tmp_path / "none"))
    assert SCHEDULE_WARNING not in result.stderr and "CosineAnnealingLR" not in result.stderr
    with open(tmp_path / "none" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["step_size"]]
    by_step = json.loads((tmp_path / "none" / "step_sizes_by_step.json").read_text())
    # Lightning's `step` column counts the batches before this one's optimizer step: global step - 1
    assert [int(row["step"]) + 1 for row in rows] == [10, 20, 30, 40]
    for row in rows:
        assert float(row["step_size"]) == pytest.approx(by_step[str(int(row["step"]) + 1)]["step_size"], rel=1e-7)
    assert_learned([float(row["step_size"]) for row in rows])

    result = run_example("lightning_trainer.py", "--max-steps", str(STEPS), "--log-every", "10",
                         "--output-dir", str(tmp_path / "cosine"), "--scheduler", "cosine")
    assert result.stderr.count("CosineAnnealingLR of configure_optimizers") == 1
    assert "down to 0x its starting value by step 40" in result.stderr
    by_step = json.loads((tmp_path / "cosine" / "step_sizes_by_step.json").read_text())
    assert by_step[str(STEPS)]["step_size"] == 0.0
