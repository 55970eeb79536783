"""The paper's items as sweeps: every experiment composes at every scale, each sweep has the runs
the paper's protocol implies, figures come from runs.csv alone and refuse an incomplete one, and
(slow) `make fig1 SCALE=smoke`'s command runs end to end through the submitit local launcher."""

import ast
import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from experiments.reproduce import CONF, ITEMS, SCALES, compose_experiment
from experiments.schema import score, tuning_score
from experiments.sweeps import Run, choose_later, expand_grids, expected_runs, tuning_phases
from metaopt.param_groups import RESNET18_BLOCKS, param_groups_by_prefix
from experiments.models import SixBlockMLP
from experiments.models.resnet import resnet_mini
from tests.experiments.helpers import write_sweep_record

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(ROOT / "scripts"))
import collect_runs  # noqa: E402
import make_figures  # noqa: E402

# The runs each sweep holds, from the paper's protocol (Appendix C) and the scale profiles:
#   full: 3 seeds; fixed steps over 5 values, cosine peaks over 3, DoG over 4 initial movements
#   mini: 2 seeds; the image tasks' grids as the paper's but DoG over 2; on text fixed steps over 3;
#         a tuned grid runs every setting on seed 0, then its best setting on seed 1 (one run more)
#   smoke: 1 seed, the full grids
# Fig. 1: 8 MetaOptimize arms in the released variant, its 6 Adam-meta arms in the standard one, 4 tuned bases
FIG1 = {"full": (8 + 6 + 4 * 5) * 3, "mini": (8 + 6) * 2 + 4 * 5 + 4, "smoke": 8 + 6 + 4 * 5}
FIG4 = {"full": (3 + 2 * 5 + 3 + 4 + 1 + 3 + 3) * 3,  # MetaOptimize, AdamW/Lion, cosine, DoG, Prodigy, gdtuo, mechanic
        "mini": (3 + 1) * 2 + (2 * 5 + 3 + 2 + 3 + 3) + 6, "smoke": 3 + 2 * 5 + 3 + 4 + 1 + 3 + 3}
FIG5 = {"full": (2 + 2 * 5 + 3 + 4 + 1 + 3) * 3,  # as Fig. 4 without gdtuo (tied embeddings)
        "mini": (2 + 1) * 2 + (2 * 3 + 3 + 2 + 3) + 5, "smoke": 2 + 2 * 5 + 3 + 4 + 1 + 3}
# sensitivity: (AdamW, Adam) in two variants and (Lion, Lion) over 7 eta and 5 alpha0 (the paper's
# setting shared), and the AdamW and Lion fixed-step grids; one seed at mini and smoke
SENSITIVITY = 3 * (7 + 5 - 1) + 2 * 5
DROPIN_ARMS = len(OmegaConf.load(CONF / "experiment" / "dropin.yaml").dropin.arms.split(","))
EXPECTED_RUNS = {
    "fig1": FIG1,
    "fig2": {"full": 5 * 3, "mini": 5 * 2, "smoke": 5},  # five alpha0
    "fig3": {"full": 3, "mini": 2, "smoke": 1},  # the blockwise (SGDm, Adam) run of Fig. 1
    "fig4": FIG4,
    "fig5": FIG5,
    "fig6": FIG4,
    "fig7": FIG5,
    "fig8": {"full": 4 * 3, "mini": 4 * 2, "smoke": 4},  # (AdamW, Lion), (Lion, Lion): scalar and blockwise
    "sensitivity": {"full": SENSITIVITY * 3, "mini": SENSITIVITY, "smoke": SENSITIVITY},
    # AdamW and five others on ImageNet; on TinyStories without gdtuo; mini and smoke: the image task
    "table1": {"full": 6 + 5, "mini": 6, "smoke": 6},
    # beyond the paper, on three tasks: its untuned arms on 2 seeds, AdamW's 5 lr on seed 0 then the best on
    # seed 1, at every scale but smoke (1 seed); tests/experiments/test_dropin.py checks the arms
    "dropin": {"full": 3 * (DROPIN_ARMS * 2 + 5 + 1), "mini": 3 * (DROPIN_ARMS * 2 + 5 + 1),
               "smoke": 3 * (DROPIN_ARMS + 5)},
    # beyond the paper, CPU-sized at every scale: 56 runs a seed (tests/experiments/test_continual.py)
    "continual": {"full": 56 * 3, "mini": 56 * 3, "smoke": 56},
    # beyond the paper: (SGDm, Adam) and (AdamW, Adam) learning kappa from 5 values and rho from 3, and the
    # same values fixed (tuned grids); mini: 2 seeds, each fixed grid on seed 0 then its best on seed 1
    "beyond": {"full": 2 * 2 * (5 + 3) * 3, "mini": 2 * (5 + 3) * 2 + 2 * (5 + 3) + 4, "smoke": 2 * 2 * (5 + 3)},
}
# Figures drawn from another's runs: their runs are a subset of that sweep's, in the same folders.
SHARED = {"fig3": "fig1", "fig6": "fig4", "fig7": "fig5", "fig8": "fig4"}


@pytest.fixture(scope="module")
def experiments():
    return {(item, scale): compose_experiment(item, scale) for item in ITEMS for scale in SCALES}


def test_every_paper_item_has_an_experiment_with_its_command():
    for item in ITEMS:
        text = (CONF / "experiment" / f"{item}.yaml").read_text()
        assert text.startswith("# @package _global_\n")
        assert f"make {item}" in text and f"experiment={item}" in text


@pytest.mark.parametrize("item", ITEMS)
def test_a_figures_baselines_are_arms_of_its_panels(experiments, item):
    """figure.baselines (drawn dashed) names arms the panels draw: a misspelt one would draw solid."""
    fig_cfg = experiments[(item, "full")].figure
    baselines = set(fig_cfg.get("baselines") or [])
    arms = {arm for panel in fig_cfg.get("panels") or [] for arm in panel.get("arms") or []}
    assert baselines <= arms
    if fig_cfg.kind == "curves" and fig_cfg.tuned:  # a figure with fixed-step or tuned baselines declares them
        assert set(fig_cfg.tuned) <= baselines


@pytest.mark.parametrize("item", ITEMS)
@pytest.mark.parametrize("scale", SCALES)
def test_sweep_expands_to_the_expected_runs(experiments, item, scale):
    cfg = experiments[(item, scale)]
    runs = expected_runs(cfg, tuning_score=lambda run: 0.0)  # every tuning run scored: the first setting wins
    assert len(runs) == EXPECTED_RUNS[item][scale]
    tuning_first = expected_runs(cfg)  # before any tuning run has finished: the later runs wait
    tuned_later = [run for run in runs if run not in tuning_first]
    assert all(run.grid in cfg.figure.tuned and run.values["seed"] != "0" for run in tuned_later)
    tuned_on_seed_0 = (scale == "mini" and item not in ("sensitivity", "table1", "continual")
                       or item == "dropin" and scale != "smoke")  # dropin: at every scale with two seeds
    assert len(tuned_later) == (len(cfg.figure.tuned) if tuned_on_seed_0 else 0)
    assert cfg.hydra.mode.name == "MULTIRUN"
    # distinct runs land in distinct folders: the folder is named by the overrides and the seed
    assert len({(run.key, run.values["seed"]) for run in runs}) == len(runs)
    assert cfg.run_root == {"full": "runs", "mini": "runs/mini", "smoke": "runs/smoke"}[scale]


# Every (item, scale) in the slow tier; the fast tier composes the sweeps run here (mini) of the
# items whose runs the others reuse. A compose takes about 0.3 s.
COMPOSE_CASES = [pytest.param(item, scale, marks=[] if scale == "mini" and item in ("fig1", "fig2", "fig4", "fig5",
                                                                                   "sensitivity")
                              else [pytest.mark.slow]) for item in ITEMS for scale in SCALES
                if item not in ("dropin", "continual")]  # their data and models: tests/experiments/test_dropin.py,
# tests/experiments/test_continual.py


@pytest.mark.parametrize("item, scale", COMPOSE_CASES)
def test_each_grid_composes_into_a_run_config(experiments, item, scale):
    """The first run of every grid composes as the job would, with the scale's data and model."""
    cfg = experiments[(item, scale)]
    first = {}
    for run in expected_runs(cfg):
        first.setdefault(run.grid, run)
    stand_ins = {"full": {"cifar10", "imagenet", "tinystories"}, "mini": {"fashion_mnist", "text_corpus"},
                 "smoke": {"digits", "text_corpus"}}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for run in first.values():
            dataset, model = run.values["dataset"], run.values["model"]
            assert dataset in stand_ins[scale]
            job = compose("train", overrides=[f"experiment={item}", f"scale={scale}", *run.overrides])
            assert job.dataset._target_.endswith("." + dataset) and job.optimizer._target_
            assert job.model._target_ == OmegaConf.load(CONF / "model" / f"{model}.yaml")._target_
            assert job.trainer.max_steps == cfg.trainer.max_steps
            if "optimizer.meta_lr" in run.values:  # MetaOptimize arms run at the eta their grid gives
                assert job.optimizer.meta_lr == float(run.values["optimizer.meta_lr"])


# dropin: defaults; continual: one size; beyond: the library's defaults at every scale (tests/experiments/test_beyond.py)
@pytest.mark.parametrize("item", [item for item in ITEMS if item not in ("table1", "dropin", "continual", "beyond")])
def test_mini_scale_keeps_the_algorithms_settings(experiments, item):
    """A CPU-scale stand-in shrinks data, model, grids and seeds, never eta, gamma or alpha0, and runs
    long enough for the step size to grow from alpha0 (at eta = 1e-3, about 7,000 steps)."""
    mini, full = experiments[(item, "mini")], experiments[(item, "full")]
    assert mini.tuning.meta_lr == full.tuning.meta_lr == 1e-3
    assert mini.trainer.max_steps >= 20000
    first = {}  # one run of each MetaOptimize arm
    for run in expected_runs(mini):
        if run.values["optimizer"].startswith("metaopt_"):
            first.setdefault(run.arm, run)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for run in first.values():
            job = compose("train", overrides=[f"experiment={item}", "scale=mini", *run.overrides])
            paper = compose("train", overrides=[f"optimizer={run.values['optimizer']}"]).optimizer
            for key in ("alpha0", "gamma", "meta_momentum", "meta_normalizer", "weight_decay", "momentum"):
                if f"optimizer.{key}" not in run.values:
                    assert job.optimizer[key] == paper[key], (run.key, key)
    if item != "sensitivity":  # two seeds for every arm (sensitivity: one, over 43 settings)
        assert {run.values["seed"] for run in expected_runs(mini)} == {"0", "1"}


@pytest.mark.parametrize("item, source", SHARED.items())
def test_figures_that_share_runs_share_their_folders(experiments, item, source):
    for scale in SCALES:
        cfg, source_cfg = experiments[(item, scale)], experiments[(source, scale)]
        assert cfg.run_group == source_cfg.run_group == source
        if item == "fig8":  # its scalar runs are Fig. 4's, its blockwise runs its own
            shared = {(r.key, r.values["seed"]) for r in expected_runs(cfg) if "6blocks" not in r.key}
        else:
            shared = {(r.key, r.values["seed"]) for r in expected_runs(cfg)}
        assert shared <= {(r.key, r.values["seed"]) for r in expected_runs(source_cfg)}


def test_tuned_grids_follow_appendix_c(experiments):
    runs = expected_runs(experiments[("fig4", "full")])
    values = lambda grid, key: sorted({float(r.values[key]) for r in runs if r.grid == grid})  # noqa: E731
    assert values("adamw", "optimizer.lr") == values("lion", "optimizer.lr") == [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert values("adamw_cosine", "optimizer.lr") == [1e-5, 1e-4, 1e-3]
    assert values("adamw_cosine", "optimizer.adapter.scheduler.warmup_steps") == [10000]
    assert values("dog", "optimizer.reps_rel") == [1e-9, 1e-8, 1e-7, 1e-6]
    assert values("metaopt", "optimizer.meta_lr") == [1e-3]
    # the arms the authors ran through their own class run their update; torch's and the packages' as published
    assert {r.values["optimizer.variant"] for r in runs if r.grid == "metaopt"} == {"released"}
    assert not any("optimizer.variant" in r.values for r in runs if r.grid != "metaopt")
    assert values("adamw_cosine", "optimizer.adapter.scheduler.decay_steps") == [422000]
    cifar = expected_runs(experiments[("fig1", "full")])
    assert {r.values["optimizer.variant"] for r in cifar if r.grid in ("metaopt", "adamw", "lion", "rmsprop", "sgdm")} \
        == {"released"}
    assert {r.values["optimizer.variant"] for r in cifar if r.grid == "standard"} == {"standard"}
    assert {r.arm for r in runs if r.grid == "gdtuo"} == {"gdtuo"}  # a tuned grid is one curve
    assert {r.arm for r in runs if r.grid == "metaopt"} == {"metaopt_adamw_lion", "metaopt_lion_lion",
                                                            "metaopt_sgdm_lion"}
    tinystories = expected_runs(experiments[("fig5", "full")])
    assert {float(r.values["optimizer.adapter.scheduler.warmup_steps"]) for r in tinystories
            if r.grid == "adamw_cosine"} == {1000}


def test_expand_grids_is_a_union_of_products():
    grids = {"a": {"optimizer": "adamw", "optimizer.lr": "1e-3,1e-2"}, "b": {"optimizer": "adamw,lion"},
             "dropped": None}
    runs = expand_grids(grids, {"seed": "0,1"})
    assert [(grid, sorted(o)) for grid, o in runs] == [
        ("a", ["optimizer.lr=0.001", "optimizer=adamw", "seed=0"]),
        ("a", ["optimizer.lr=0.001", "optimizer=adamw", "seed=1"]),
        ("a", ["optimizer.lr=0.01", "optimizer=adamw", "seed=0"]),
        ("a", ["optimizer.lr=0.01", "optimizer=adamw", "seed=1"]),
        ("b", ["optimizer=adamw", "seed=0"]), ("b", ["optimizer=adamw", "seed=1"]),
        ("b", ["optimizer=lion", "seed=0"]), ("b", ["optimizer=lion", "seed=1"]),
    ]
    # a run two grids share is launched once; the command line's keys replace the config's
    assert len(expand_grids({"a": {"optimizer": "adamw"}, "b": {"optimizer": "adamw,lion"}}, {})) == 2
    assert expand_grids(grids, {"seed": "0,1"}, ["seed=5"])[0][1][-1] == "seed=5"
    assert len(expand_grids(grids, {"seed": "0,1"}, ["seed=5"])) == 4
    OverridesParser.create()  # the parser the sweeper uses needs no config loader for these


def test_the_mini_stand_in_declares_six_blocks():
    model = SixBlockMLP(num_classes=10, in_channels=1, image_size=28)
    groups = param_groups_by_prefix(model, "model")
    assert [g["block"] for g in groups] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert sum(p.numel() for g in groups for _, p in g["params"]) == sum(p.numel() for p in model.parameters())
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    # normalised like ResNet-18's blocks: the output ignores the scale of a hidden layer (weight decay shrinks it)
    images = torch.randn(4, 1, 28, 28)
    before = model(images)
    with torch.no_grad():
        for layer in (model.stem, model.layer2):
            layer.weight.mul_(10.0)
            layer.bias.mul_(10.0)
    torch.testing.assert_close(model(images), before, rtol=1e-5, atol=1e-5)
    assert [g["block"] for g in param_groups_by_prefix(resnet_mini(), "model")] == list(RESNET18_BLOCKS)
    with pytest.raises(ValueError, match="declares no named_blocks"):
        param_groups_by_prefix(torch.nn.Linear(2, 2), "model")


def test_resnet_mini_has_resnet18_blocks():
    model = resnet_mini(num_classes=10, in_channels=1, image_size=28, width=8)
    groups = param_groups_by_prefix(model, "resnet18")
    assert [g["block"] for g in groups] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert sum(p.numel() for g in groups for _, p in g["params"]) == sum(p.numel() for p in model.parameters())
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)  # the smoke profile's 8x8 digits


def _fixture_results(tmp_path: Path) -> Path:
    (tmp_path / "fig2").mkdir()
    shutil.copy(FIXTURES / "fig2_smoke_runs.csv", tmp_path / "fig2" / "runs.csv")
    shutil.copy(FIXTURES / "fig2_smoke_sweep.json", tmp_path / "fig2" / "sweep.json")
    return tmp_path


def test_make_figures_rebuilds_a_figure_from_runs_csv(tmp_path):
    results = _fixture_results(tmp_path)
    png = make_figures.build("fig2", results)
    assert png.exists() and png.stat().st_size > 10_000
    with open(results / "fig2" / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    # five alpha0, each its own curve, with its final values from the fixture's last rows
    assert [row["arm"] for row in summary] == [f"optimizer.alpha0={a}" for a in
                                               ("1e-08", "1e-07", "1e-06", "1e-05", "0.0001")]
    with open(FIXTURES / "fig2_smoke_runs.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["optimizer.alpha0"] == "0.0001"]
    last = [r for r in rows if r["train/loss"]][-1]
    assert float(summary[-1]["train/loss mean"]) == float(last["train/loss"])


def test_make_figures_refuses_a_csv_with_a_missing_run(tmp_path):
    results = _fixture_results(tmp_path)
    path = results / "fig2" / "runs.csv"
    with open(path) as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if r["optimizer.alpha0"] != "1e-06"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    with pytest.raises(make_figures.MissingRuns, match=r"missing: .*optimizer\.alpha0=1e-06.* seed=0"):
        make_figures.build("fig2", results)
    assert not (results / "fig2" / "fig2.png").exists()


def test_sensitivity_figure_from_its_runs(tmp_path):
    """The sensitivity renderer on a runs.csv holding every run of the smoke sweep: synthetic final
    losses (a bowl in log eta and log alpha0), the largest eta diverged."""
    cfg = compose_experiment("sensitivity", "smoke")
    runs = expected_runs(cfg)
    swept = sorted({k for run in runs for k in run.values if k != "seed"})
    rows = []
    for run in runs:
        values = run.values
        loss = 0.3 + 0.01 * abs(math.log10(float(values.get("optimizer.meta_lr", 1e-3)) / 1e-3)) \
            + 0.02 * abs(math.log10(float(values["optimizer.alpha0"]) / 1e-4))
        diverged = values.get("optimizer.meta_lr") == "0.1" and values["optimizer"] == "metaopt_lion_lion"
        identity = {"item": "sensitivity", "scale": "smoke", "grid": run.grid, "arm": run.arm, "run": run.key,
                    "seed": "0", "status": "failed" if diverged else "finished"}
        for step, value in ((0, 2.3), (4, "nan" if diverged else loss)):
            rows.append({**identity, **{k: values.get(k, "") for k in swept}, "step": step, "train/loss": value})
    (tmp_path / "sensitivity").mkdir()
    write_sweep_record(tmp_path / "sensitivity", cfg, "sensitivity", "smoke", runs)
    with open(tmp_path / "sensitivity" / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    png = make_figures.build("sensitivity", tmp_path)
    assert png.exists() and png.stat().st_size > 10_000
    with open(tmp_path / "sensitivity" / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert {row["setting"].split("optimizer.alpha0=")[1].split()[0] for row in summary
            if row["selected"] == "yes"} == {"0.0001"}  # both tuned bases pick the bowl's bottom
    assert len(summary) == len(runs)


def test_tuned_grid_picks_the_best_setting_and_ranks_a_diverged_run_last():
    def rows(loss, status="finished"):
        return [{"step": "10", "train/loss": str(loss), "status": status}]

    assert make_figures.score([rows(0.5), rows(0.7)], "train/loss", "min") == pytest.approx(0.6)
    assert make_figures.score([rows(0.9)], "test/acc", "max") == float("inf")  # never logged: nan
    assert make_figures.score([rows(0.1, "failed")], "train/loss", "min") == float("inf")
    assert make_figures.score([rows(0.8)], "train/loss", "max") == -0.8


def test_a_sweep_tuned_on_one_seed_runs_the_best_setting_on_the_others(tmp_path):
    """Fig. 1's AdamW grid at smoke size on two seeds: every step size on seed 0, then the best there
    on seed 1; the collected runs hold that choice."""
    run_root = f"run_root={tmp_path / 'runs'}"
    others = [f"hydra.sweeper.grids.{grid}=null" for grid in ("metaopt", "standard", "lion", "rmsprop", "sgdm")]
    sweep = subprocess.run(
        [sys.executable, "-m", "experiments.train", "experiment=fig1", "scale=smoke", 'tuning.seed="0,1"',
         run_root, *others],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    final_loss = {}  # (step size, seed) -> final train loss, read from the run folders
    for metrics in (tmp_path / "runs").glob("fig1/**/metrics.csv"):
        with open(metrics) as f:
            last = list(csv.DictReader(f))[-1]
        lr = metrics.parent.parent.name.split("optimizer.alpha0=")[1].split(",")[0]
        final_loss[(lr, metrics.parent.name)] = float(last["train/loss"])
    tuning = {lr: loss for (lr, seed), loss in final_loss.items() if seed == "seed=0"}
    assert len(tuning) == 5
    best = min(tuning, key=lambda lr: tuning[lr] if math.isfinite(tuning[lr]) else math.inf)  # diverged: last
    assert [lr for lr, seed in final_loss if seed == "seed=1"] == [best]

    # tuning.seed quoted: one value, the seeds the sweeper's params cross (unquoted, Hydra would sweep it)
    count, missing = collect_runs.collect("fig1", "smoke", tmp_path / "results" / "fig1",
                                          [run_root, 'tuning.seed="0,1"', *others])
    assert missing == [] and count > 0
    with open(tmp_path / "results" / "fig1" / "runs.csv") as f:
        assert len({(row["run"], row["seed"]) for row in csv.DictReader(f)}) == 6


def test_tuning_waits_for_every_tuning_run_and_needs_the_tuning_seed():
    runs = [("lr", ["lr=1", "seed=0"]), ("lr", ["lr=1", "seed=1"]), ("lr", ["lr=2", "seed=0"]),
            ("lr", ["lr=2", "seed=1"]), ("arm", ["arm=a", "seed=0"]), ("arm", ["arm=a", "seed=1"])]
    first, later = tuning_phases(runs, ["lr"], "0")
    assert [o for _, o in first] == [["lr=1", "seed=0"], ["lr=2", "seed=0"], ["arm=a", "seed=0"], ["arm=a", "seed=1"]]
    scores = {("lr=1",): 0.5, ("lr=2",): 0.2}
    assert choose_later(later, scores.get) == [("lr", ["lr=2", "seed=1"])]
    assert choose_later(later, {("lr=1",): 0.5, ("lr=2",): None}.get) == []  # lr=2's tuning run is not over
    # seeds without the tuning seed: nothing to tune on, every run is first
    assert tuning_phases([r for r in runs if r[1][-1] == "seed=1"], ["lr"], "0")[1] == {}

    def rows(status):
        return [{"step": "4", "train/loss": "0.3", "status": status}]

    assert tuning_score(rows("finished"), "train/loss", "min") == 0.3
    assert tuning_score(rows("failed"), "train/loss", "min") == float("inf")  # diverged: ranks last
    assert tuning_score(rows("preempted"), "train/loss", "min") is None
    assert tuning_score([], "train/loss", "min") is None
    assert score([], "train/loss", "min") == float("inf")


def test_a_figure_tuned_on_one_seed_draws_the_setting_its_tuning_chose(experiments):
    """In a sweep tuned on one seed the curve is the setting the sweeper chose (sweep.json's chosen, from
    the manifest), not a choice made again here; the summary ranks the others on the tuning seed alone,
    where the mean over seeds would favour a setting that ran one seed only."""
    cfg = experiments[("fig1", "mini")]
    base = ["optimizer=fixed_step", "optimizer.base=adamw", "optimizer.variant=released"]

    def run(lr, seed, loss):
        overrides = (*base, f"optimizer.alpha0={lr}", f"seed={seed}")
        return Run("adamw", overrides, "adamw"), [{"step": "4", "train/loss": str(loss),
                                                                "seed": str(seed), "status": "finished"}]

    runs = [run("1e-3", 0, 0.1), run("1e-3", 1, 0.9), run("1e-2", 0, 0.2), run("1e-4", 0, 0.3)]
    chosen, summary = make_figures.curves(cfg, runs, {"tune_seed": "0", "chosen": {"adamw": runs[0][0].key}})
    assert chosen["adamw"][0] == "adamw (alpha0=1e-3, tuned)" and len(chosen["adamw"][1]) == 2
    assert [(row["setting"], row["selected"]) for row in summary] == [
        (runs[0][0].key, "yes"), (runs[2][0].key, "no"), (runs[3][0].key, "no")]
    # the sweeper's choice is drawn even where this ranking would differ (e.g. a tie broken otherwise)
    chosen, summary = make_figures.curves(cfg, runs, {"tune_seed": "0", "chosen": {"adamw": runs[3][0].key}})
    assert chosen["adamw"][0] == "adamw (alpha0=1e-4, tuned)" and len(chosen["adamw"][1]) == 1
    assert [row["selected"] for row in summary] == ["no", "no", "yes"]


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 28 runs, each a fresh process: about 2 minutes on 2 idle cores, far more on busy ones
def test_fig1_smoke_sweep_through_submitit_local(tmp_path):
    """`make fig1 SCALE=smoke LAUNCHER=local`, with its runs and results under tmp_path."""
    run_root = f"run_root={tmp_path / 'runs'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sweep = subprocess.run(
        [sys.executable, "-m", "experiments.train", "experiment=fig1", "scale=smoke",
         "hydra/launcher=local", run_root],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    # tuning.seed quoted: one value, the seeds the sweeper's params cross (unquoted, Hydra would sweep it)
    count, missing = collect_runs.collect("fig1", "smoke", tmp_path / "results" / "fig1", [run_root])
    assert missing == [] and count > 0
    png = make_figures.build("fig1", tmp_path / "results")
    assert png.exists()
    with open(tmp_path / "results" / "fig1" / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == EXPECTED_RUNS["fig1"]["smoke"]
    # each tuned base contributes one selected step size
    assert sorted(row["arm"] for row in summary if row["selected"] == "yes") == ["adamw", "lion", "rmsprop", "sgdm"]


def test_a_figure_names_the_data_and_model_that_stood_in_for_the_papers(tmp_path):
    """The smoke sweep of Fig. 2 trains digits on resnet_mini: its title says so, not just "CIFAR-10"."""
    results = _fixture_results(tmp_path)
    cfg, _, runs, _ = make_figures.group_runs("fig2", make_figures.read_runs(results / "fig2" / "runs.csv"),
                                              results / "fig2" / "runs.csv")
    assert make_figures.scale_label("fig2", cfg, runs) == "smoke scale; digits, resnet_mini in place of cifar10, resnet18_cifar"
    full = compose_experiment("fig2", "full")
    assert make_figures.scale_label("fig2", full, []) == "full scale"


def test_the_sweeper_plugin_is_glue_that_nothing_in_the_harness_imports():
    """experiments.sweeps holds the sweep's logic; the plugin imports it, never the other way round."""
    importers = []
    for path in sorted((CONF.parent / "experiments").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            if any(name.startswith("hydra_plugins") for name in names):
                importers.append(str(path))
    assert importers == []
