"""Fixtures of every test: one torch thread, and a new base rule (Nesterov's momentum) registered for a test."""

from __future__ import annotations

import pytest
import torch

from metaopt import rules


@pytest.fixture(autouse=True)
def one_thread():
    """Run every test on one torch thread.

    Tiny models on a shared 2-core machine run faster and steadier on one thread, and runs
    that a test compares bit for bit must share one thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def nesterov_direction(x, moments, hp, step):
    """Nesterov's momentum with a look-ahead weight: m <- rho*m + x; d = x + lookahead * rho * m."""
    m = hp["momentum"] * moments["exp_avg"] + x
    return x + hp["lookahead"] * hp["momentum"] * m, {"exp_avg": m}


NESTEROV = rules.Rule({"momentum": 0.9, "lookahead": 1.0}, ("exp_avg",), nesterov_direction,
                      ranges={"lookahead": (0.0, 1.0, True)})


@pytest.fixture
def nesterov(monkeypatch):
    """A new rule as a user adds it, one entry: its Rule in RULES, its name in the base tables of both variants."""
    monkeypatch.setitem(rules.RULES, "nesterov", NESTEROV)
    monkeypatch.setitem(rules.BASES, "nesterov", "nesterov")
    monkeypatch.setitem(rules.VARIANTS["released"][0], "nesterov", "nesterov")
