"""Rules carry their hyper-parameters: a new rule is one entry in metaopt/rules.py, and then the
optimizer, the configs and the benchmark take it by name with no other edit."""

from __future__ import annotations

import csv
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from experiments.trainer import train
from metaopt import MetaOptimize, rules
from tests.trainer_helpers import TINY, compose_train

REPO = Path(__file__).resolve().parents[1]


def nesterov_direction(x, moments, hp, step):
    """Nesterov's momentum with a look-ahead weight: m <- rho*m + x; d = x + lookahead * rho * m."""
    m = hp["momentum"] * moments["exp_avg"] + x
    return x + hp["lookahead"] * hp["momentum"] * m, {"exp_avg": m}


NESTEROV = rules.Rule({"momentum": 0.9, "lookahead": 1.0}, ("exp_avg",), nesterov_direction,
                      ranges={"lookahead": (0.0, 1.0, True)})


@pytest.fixture
def nesterov(monkeypatch):
    """The new rule's one entry: its Rule in RULES, its name in the base tables of both variants."""
    monkeypatch.setitem(rules.RULES, "nesterov", NESTEROV)
    monkeypatch.setitem(rules.BASES, "nesterov", "nesterov")
    monkeypatch.setitem(rules.VARIANTS["released"][0], "nesterov", "nesterov")


def test_the_keywords_are_the_rules_hyperparameters():
    """MetaOptimize's explicit rule keywords are exactly the built-in rules' hyper-parameters
    (and meta_ ones) and the two defaults a rule carries (its weight decay as a base, its meta step
    size as a meta rule), so the two cannot drift apart."""
    keywords = {name for name, p in inspect.signature(MetaOptimize).parameters.items() if p.default is None}
    names = {name for rule in rules.RULES.values() for name in rule.hyperparameters}
    assert keywords == {"weight_decay", "meta_lr", *names, *(f"meta_{name}" for name in names)}
    assert all(rule.range_of(name) is not None for rule in rules.RULES.values() for name in rule.hyperparameters)


def test_a_new_rule_in_the_optimizer(nesterov):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = MetaOptimize(model.parameters(), "nesterov", "adam", lookahead=0.5, alpha0=1e-2, meta_lr=0.05)
    assert optimizer.defaults["lookahead"] == 0.5 and optimizer.defaults["weight_decay"] == 0.1
    before = model.weight.detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        optimizer.step()
    assert not torch.equal(model.weight, before)
    assert set(optimizer.state[model.weight]) == {"step", "trace", "exp_avg"}
    with pytest.raises(ValueError, match=r"lookahead must be in \[0.0, 1.0\], got 2.0"):
        MetaOptimize(model.parameters(), "nesterov", "adam", lookahead=2.0)
    with pytest.raises(ValueError, match="lookahead does not apply to base 'adamw'"):
        MetaOptimize(model.parameters(), "adamw", "adam", lookahead=0.5)


def test_a_new_rule_in_a_config(nesterov, tmp_path):
    cfg = compose_train(*TINY, "optimizer=metaopt", "optimizer.base=nesterov", "+optimizer.lookahead=0.5")
    result = train(cfg, str(tmp_path))
    assert result.summary["status"] == "finished"
    assert result.adapter.optimizer.defaults["lookahead"] == 0.5


def test_a_new_rule_in_the_benchmark(nesterov, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_step", REPO / "scripts" / "bench_step.py")
    bench_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_step)
    out = tmp_path / "proxy"
    monkeypatch.setattr(sys, "argv", ["bench_step.py", "--proxy", "--pairs", "nesterov/lion", "--rounds", "1",
                                      "--warmup", "1", "--out", str(out)])
    bench_step.main()
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert {(row["base"], row["kernel"]) for row in rows} == {("nesterov", "foreach"), ("nesterov", "flat")}
    assert all(float(row["step_us"]) > 0 and int(row["ops"]) > 0 for row in rows)
