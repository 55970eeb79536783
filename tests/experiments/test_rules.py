"""A new rule (the ``nesterov`` fixture of tests/conftest.py, one entry in metaopt/rules.py) in the harness: the
configs and the benchmark take it by name with no other edit (the optimizer: tests/metaopt/test_rules.py)."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

from experiments.trainer import train
from tests.experiments.helpers import TINY, compose_train

REPO = Path(__file__).resolve().parents[2]


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
