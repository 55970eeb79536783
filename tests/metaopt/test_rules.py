"""Rules carry their hyper-parameters: a new rule is one entry in metaopt/rules.py (the ``nesterov`` fixture of
tests/conftest.py), and then the optimizer takes it by name with no other edit (the configs and the benchmark:
tests/experiments/test_rules.py)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from metaopt import MetaOptimize, rules


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
