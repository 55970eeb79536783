"""The drop-in benchmark (conf/experiment/dropin.yaml): every arm composes at every scale and builds
the optimizer a user's own call builds, with no keyword the user would not pass; the schedule-free
adapter trains at y, evaluates at the package's average x and resumes bit for bit; the report's
values and goals match an independent computation; (slow) `make dropin SCALE=smoke` end to end."""

import copy
import csv
import math
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from experiments import checkpoint, dropin
from experiments.adapters import ScheduleFreeAdapter
from experiments.reproduce import CONF, SCALES, compose_experiment
from experiments.sweeps import expected_runs
from experiments.trainer import _test_batches, build_adapter, train
from tests.experiments.helpers import (TINY, assert_same_state, compose_train, computed_columns, long_run, read_metrics,
                                       train_until_preempted, write_sweep_record)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import collect_runs  # noqa: E402
import make_figures  # noqa: E402

NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)
PAIRS = ["adamw_adam", "adamw_lion", "lion_lion", "rmsprop_adam", "sgdm_adam", "sgdm_lion"]
# Each arm's keywords in the user's call (besides the parameters), and that call.
USER_CALLS = {
    "metaopt_defaults": ({}, lambda params: _metaopt()(params)),
    "metaopt_defaults_alpha0_1e-6": ({"alpha0": 1e-6}, lambda params: _metaopt()(params, alpha0=1e-6)),
    **{f"metaopt_defaults_{pair}": ({"base": pair.split("_")[0], "meta": pair.split("_")[1]},
                                    lambda params, pair=pair: _metaopt()(params, base=pair.split("_")[0],
                                                                        meta=pair.split("_")[1]))
       for pair in PAIRS},
    "prodigy_defaults": ({"lr": 1.0}, lambda params: __import__("prodigyopt").Prodigy(params, lr=1.0)),
    "dog_defaults": ({}, lambda params: __import__("dog").DoG(params)),
    "mechanic_adamw_defaults": ({"lr": 1.0}, lambda params: __import__("mechanic_pytorch").mechanize(torch.optim.AdamW)(
        params, lr=1.0)),
    "schedulefree_adamw": ({}, lambda params: __import__("schedulefree").AdamWScheduleFree(params)),
    "adamw_defaults": ({}, lambda params: torch.optim.AdamW(params)),
}
# The arms the issue asks for (an arm added to the sweep must add its user's call above).
CORE_ARMS = {"metaopt_defaults", *(f"metaopt_defaults_{pair}" for pair in PAIRS), "prodigy_defaults", "dog_defaults",
             "mechanic_adamw_defaults", "schedulefree_adamw", "adamw_defaults"}
CONFIGURED = [name for name in USER_CALLS if (CONF / "optimizer" / f"{name}.yaml").exists()]
TASKS = {  # grid -> (dataset, model) at full / mini, and at smoke (embedded data only)
    "digits": (("digits", "mlp"), ("digits", "mlp")),
    "fashion": (("fashion_mnist", "mlp_6blocks"), ("digits", "mlp_6blocks")),
    "text": (("dropin_text", "tiny_transformer"), ("dropin_text", "tiny_transformer")),
}


def _metaopt():
    from metaopt import MetaOptimize

    return MetaOptimize


def _grid_task(grid: str) -> str:
    return grid.removesuffix("_adamw_tuned")


@pytest.mark.parametrize("scale", SCALES)
def test_every_arm_composes_with_the_users_keywords_only(scale):
    cfg = compose_experiment("dropin", scale)
    runs = expected_runs(cfg, tuning_score=lambda run: 0.0)
    arms = {run.values["optimizer"] for run in runs}
    assert CORE_ARMS <= arms and arms <= set(USER_CALLS), f"declare the user's call of {arms - set(USER_CALLS)}"
    assert {_grid_task(run.grid) for run in runs} == set(TASKS)
    horizons = [int(h) for h in cfg.figure.horizons]
    assert max(horizons) == cfg.trainer.max_steps == (4 if scale == "smoke" else 10000)
    assert all(h % cfg.trainer.eval_every == 0 and h % cfg.trainer.log_every == 0 for h in horizons)
    assert {run.values["seed"] for run in runs} == ({"0"} if scale == "smoke" else {"0", "1"})
    declared = cfg.figure.arms
    assert set(declared) == arms | {dropin.TUNED_KEY}
    assert {arm.role for arm in declared.values()} == {"metaopt", "lr_free", "adamw", "tuned"}
    lrs = set()
    first = {}
    for run in runs:
        first.setdefault((run.grid, run.values["optimizer"], run.values.get("+optimizer.lr")), run)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for (grid, optimizer, lr), run in first.items():
            job = compose("train", overrides=["experiment=dropin", f"scale={scale}", *run.overrides])
            keywords = {k: v for k, v in job.optimizer.items() if k not in ("_target_", "_partial_", "adapter")}
            expected = dict(USER_CALLS[optimizer][0])
            if grid.endswith("_adamw_tuned"):  # AdamW(params, lr=...), torch's other defaults
                expected["lr"] = float(lr)
                lrs.add(float(lr))
            assert keywords == expected, (grid, optimizer)
            assert list(job.optimizer.adapter) == ["_target_"], (grid, optimizer)  # no adapter setting either
            dataset, model = TASKS[_grid_task(grid)][scale == "smoke"]
            assert (job.dataset._target_.rsplit(".", 1)[-1], job.model._target_) == (
                "text_corpus" if dataset == "dropin_text" else dataset,
                OmegaConf.load(CONF / "model" / f"{model}.yaml")._target_)
            if dataset == "dropin_text":
                assert job.dataset.path == ("README.md" if scale == "smoke" else "data/text/kjv.txt")
                assert (job.dataset.vocab_size, job.dataset.batch_size, job.dataset.max_seq_len) == (256, 16, 32)
    assert lrs == {1e-4, 3e-4, 1e-3, 3e-3, 1e-2}


@pytest.mark.parametrize("optimizer", CONFIGURED)
def test_each_arm_builds_the_optimizer_of_the_users_call(optimizer):
    """Instantiated through the harness, each arm's optimizer has the hyper-parameters of the user's own
    call: nothing injected (MetaOptimize's alpha0, meta_lr, weight decay ... stay the library's)."""
    job = compose_train(*TINY, f"optimizer={optimizer}")
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    adapter = build_adapter(job.optimizer, model, total_steps=4)
    by_hand = USER_CALLS[optimizer][1](copy.deepcopy(model).parameters())
    assert type(adapter.optimizer).__name__ == type(by_hand).__name__
    assert adapter.optimizer.defaults == by_hand.defaults
    assert len(adapter.optimizer.param_groups) == 1
    ours = {k: v for k, v in adapter.optimizer.param_groups[0].items() if k not in ("params", "param_names")}
    assert ours == {k: v for k, v in by_hand.param_groups[0].items() if k != "params"}
    if optimizer.startswith("metaopt_"):
        for attribute in ("base", "meta", "blocks", "variant", "kernel", "approx", "base_rule", "meta_rule"):
            assert getattr(adapter.optimizer, attribute) == getattr(by_hand, attribute), attribute
    if optimizer == "mechanic_adamw_defaults":  # mechanize's own keywords: its defaults (s_init 1e-8)
        x = torch.randn(8, 4)
        adapter.zero_grad()
        adapter.backward(model(x).square().mean())
        adapter.step(NO_SCALER)
        assert float(adapter.optimizer.state["_mechanic"]["s_init"]) == pytest.approx(1e-8)
    if optimizer == "dog_defaults":  # the averager at its package's default
        from dog import PolynomialDecayAverager

        assert adapter.averager.gamma == PolynomialDecayAverager(model).gamma


def _steps(adapter, model, x, steps):
    for _ in range(steps):
        adapter.zero_grad()
        adapter.backward(model(x).square().mean())
        adapter.step(NO_SCALER)


def test_schedulefree_trains_at_y_and_evaluates_at_the_packages_average_x():
    from schedulefree import AdamWScheduleFree, AdamWScheduleFreeReference

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    reference_model = copy.deepcopy(model)
    adapter = ScheduleFreeAdapter(model, AdamWScheduleFree, total_steps=6)
    reference = AdamWScheduleFreeReference(reference_model.parameters())  # keeps x as its own state
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    assert adapter.eval_model(model) is model  # before the first step: nothing to average yet
    _steps(adapter, model, x, 6)
    reference.train()
    for _ in range(6):
        reference.zero_grad()
        reference_model(x).square().mean().backward()
        reference.step()
    y = [p.detach().clone() for p in model.parameters()]
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q)  # both at y
    assert adapter.eval_model(model) is model and not adapter._in_train_mode()
    reference.eval()
    for p, q, before in zip(model.parameters(), reference_model.parameters(), y):
        torch.testing.assert_close(p, q)  # at x
        assert not torch.equal(p, before)
    adapter.zero_grad()  # the next step starts in train mode, at y exactly
    assert adapter._in_train_mode()
    for p, before in zip(model.parameters(), y):
        assert torch.equal(p, before)


def test_schedulefree_run_evaluates_and_checkpoints_at_x(tmp_path):
    from experiments.data import digits

    result = train(compose_train(*TINY, "optimizer=schedulefree_adamw"), str(tmp_path))
    assert not result.adapter._in_train_mode()  # the final checkpoint put it in eval mode: the weights are x
    saved = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(saved["model"][name], tensor), name
    test = digits().test

    def test_loss(model):
        losses, count = 0.0, 0
        with torch.no_grad():
            for xb, yb in _test_batches(test, 64, 2, 0, 1, 0):
                losses += F.cross_entropy(model(xb), yb, reduction="sum").item()
                count += yb.numel()
        return losses / count

    at_x = test_loss(result.model.eval())
    assert result.summary["test/loss"] == pytest.approx(at_x, rel=1e-6)
    at_y = copy.deepcopy(result.model)
    for p, y in zip(at_y.parameters(), result.adapter.train_point):
        p.data.copy_(y)
    assert test_loss(at_y) != pytest.approx(at_x, rel=1e-6)


def test_schedulefree_resume_after_sigterm_is_bit_identical(tmp_path):
    cfg = compose_train(*long_run("optimizer=schedulefree_adamw"))
    reference = train(cfg, str(tmp_path / "reference"))
    stopped = train_until_preempted(cfg, tmp_path / "preempted")
    assert stopped.summary["status"] == "preempted" and 20 <= stopped.summary["step"] < 300
    resumed = train(cfg, str(tmp_path / "preempted"))
    assert resumed.summary["status"] == "finished"
    rows, reference_rows = read_metrics(tmp_path / "preempted"), read_metrics(tmp_path / "reference")
    assert computed_columns(rows) == computed_columns(reference_rows)
    assert_same_state(resumed, reference)


# -- the report --------------------------------------------------------------------------------------

BEST_LR = "0.003"  # the synthetic tuning runs' best lr on seed 0


def synthetic_runs_csv(path: Path) -> dict:
    """results/dropin/runs.csv for the whole mini sweep with random values at the horizons; returns
    truth[(task, arm, seed, step)] = (train loss, test metric)."""
    cfg = compose_experiment("dropin", "mini")
    rng = random.Random(0)
    truth, rows = {}, []
    tuned_scores = {}

    def score(run):
        return tuned_scores.get((run.grid, run.values.get("+optimizer.lr")))

    for grid in cfg.figure.tuned:
        for lr in ("0.0001", "0.0003", "0.001", "0.003", "0.01"):
            tuned_scores[(grid, lr)] = 0.01 if lr == BEST_LR else 0.5 + rng.random()
    runs = expected_runs(cfg, score)
    for run in runs:
        task, seed = _grid_task(run.grid), run.values["seed"]
        lr = run.values.get("+optimizer.lr", "")
        arm = dropin.TUNED_KEY if lr else run.values["optimizer"]
        test_metric = "test/loss" if task == "text" else "test/acc"
        for step in (0, 300, 1000, 3000, 10000):
            train_loss = 0.2 + 0.8 * rng.random()
            test = 1.5 + 0.1 * rng.random() if task == "text" else 0.80 + 0.04 * rng.random()
            if lr and step == 10000 and seed == "0":  # the final train loss the tuning picks by
                train_loss = tuned_scores[(run.grid, lr)]
            row = {"item": "dropin", "scale": "mini", "grid": run.grid, "arm": run.arm, "run": run.key,
                   "status": "finished", **run.values, "step": str(step),
                   "train/loss": "" if step == 0 else repr(train_loss), "test/acc": "", "test/loss": ""}
            row[test_metric] = repr(test)
            rows.append(row)
            if step and (not lr or lr == BEST_LR):  # the tuned arm is its best lr alone
                truth[(task, arm, seed, step)] = (train_loss, test)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_sweep_record(path.parent, cfg, "dropin", "mini", runs)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return truth


def test_report_values_and_goals_match_an_independent_computation(tmp_path):
    truth = synthetic_runs_csv(tmp_path / "dropin" / "runs.csv")
    png = make_figures.build("dropin", tmp_path)
    assert png == tmp_path / "dropin" / "dropin.png" and png.exists()
    text = (tmp_path / "dropin" / "dropin.md").read_text()

    cfg, _, runs, sweep = make_figures.group_runs("dropin", make_figures.read_runs(tmp_path / "dropin" / "runs.csv"),
                                                  tmp_path / "dropin" / "runs.csv")
    chosen, _ = make_figures.curves(cfg, runs, sweep)
    tasks = dropin.report(cfg, runs, chosen)
    roles = {key: arm.role for key, arm in cfg.figure.arms.items()}
    met_any, failed_any = False, False
    for task_name, task in zip(TASKS, tasks):
        accuracy = task_name != "text"
        arms = sorted({arm for (t, arm, _, _) in truth if t == task_name})
        assert sorted(arm.key for arm in task.arms) == arms
        mean = {(arm, step): tuple(statistics.fmean(truth[(task_name, arm, seed, step)][i] for seed in ("0", "1"))
                                   for i in (0, 1))
                for arm in arms for step in (300, 1000, 3000, 10000)}
        for (arm, step), (train_loss, test) in mean.items():
            assert task.values[arm][step] == pytest.approx((train_loss, test), rel=1e-12)
            label = next(a.label for a in task.arms if a.key == arm)
            assert f"| {label} |" in text
        lr_free = [arm for arm in arms if roles[arm] == "lr_free"]
        for arm in (arm for arm in arms if roles[arm] == "metaopt"):
            expected = {300: mean[(arm, 300)][0] <= mean[("adamw_defaults", 300)][0]}
            for step in (1000, 3000, 10000):
                train_ok = mean[(arm, step)][0] <= 1.5 * min(mean[(a, step)][0] for a in lr_free)
                if accuracy:
                    test_ok = mean[(arm, step)][1] >= max(mean[(a, step)][1] for a in lr_free) - 0.01
                else:
                    test_ok = mean[(arm, step)][1] <= min(mean[(a, step)][1] for a in lr_free) + 0.05
                expected[step] = train_ok and test_ok
            assert {step: verdict[0] for step, verdict in task.goals[arm].items()} == expected, (task_name, arm)
            met_any |= any(expected.values())
            failed_any |= not all(expected.values())
    assert met_any and failed_any  # the synthetic values exercise both outcomes
    tuned = next(arm for arm in tasks[0].arms if arm.key == dropin.TUNED_KEY)
    assert tuned.label.endswith(f"({BEST_LR})") and len(tuned.seeds) == 2


def test_make_dropin_runs_the_benchmark_two_at_a_time_and_smoke_on_embedded_data():
    def commands(*args):
        out = subprocess.run(["make", "-n", "dropin", *args], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
        # the benchmark's own commands (a fresh clone's make -n also prints the install and data preparation)
        own = ("experiments.train", "scripts/collect_runs.py", "scripts/make_figures.py", "experiments.dropin")
        return [line for line in out.splitlines() if any(command in line for command in own)]

    estimate, sweep, collect, figure = commands()
    assert estimate.endswith("-m experiments.dropin mini")  # it prints the runs and the estimated wall time
    assert sweep.startswith("OMP_NUM_THREADS=1 ") and "experiment=dropin scale=mini hydra/launcher=local" in sweep
    assert "max_batch_size" not in sweep  # conf/scale/mini.yaml's two at a time
    assert "--scale mini --out results/dropin" in collect and figure.endswith("dropin --results results")
    _, sweep, collect, figure = commands("SCALE=smoke")
    assert "scale=smoke" in sweep and "--out runs/smoke/results/dropin" in collect


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 54 runs of 4 steps, each a fresh process: about 5 minutes on 2 busy cores
def test_dropin_smoke_sweep_through_submitit_local(tmp_path):
    """`make dropin SCALE=smoke`'s commands, with its runs and results under tmp_path."""
    run_root = f"run_root={tmp_path / 'runs'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sweep = subprocess.run([sys.executable, "-m", "experiments.train", "experiment=dropin", "scale=smoke",
                            "hydra/launcher=local", run_root], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=2000)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    count, missing = collect_runs.collect("dropin", "smoke", tmp_path / "results" / "dropin", [run_root])
    assert missing == [] and count > 0
    assert make_figures.build("dropin", tmp_path / "results").exists()
    text = (tmp_path / "results" / "dropin" / "dropin.md").read_text()
    cells = [line for line in text.splitlines() if line.startswith("| ") and " / " in line]
    assert text.count("## ") == 3 and cells and not any("n/a" in line for line in cells)  # every arm, every step
    assert all(math.isfinite(v) for task in dropin.report(*_report_inputs(tmp_path)) for arm in task.values.values()
               for pair in arm.values() for v in pair)


def _report_inputs(tmp_path):
    rows = make_figures.read_runs(tmp_path / "results" / "dropin" / "runs.csv")
    cfg, _, runs, sweep = make_figures.group_runs("dropin", rows, tmp_path / "results" / "dropin" / "runs.csv")
    chosen, _ = make_figures.curves(cfg, runs, sweep)
    return cfg, runs, chosen
