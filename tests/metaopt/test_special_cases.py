"""IDBD and hypergradient descent as MetaOptimize configurations, against the published algorithms.

The published algorithms are written here from their papers' equations, on plain tensors, and
driven by the same data as the optimizer: IDBD (Sutton, 1992; the paper's eq. 84-88) and
SGD-HD / Adam-HD (Baydin et al., 2017, Algorithms 1 and 3 with the additive rule).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import metaopt
from metaopt import MetaOptimize
from metaopt.hessian import Approximation


def sutton_stream(steps, n=20, relevant=5, flip_every=20, seed=0):
    """Sutton's (1992) tracking task: 5 of 20 inputs matter, with target weights +-1; every 20
    examples one of them flips sign."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.zeros(n, dtype=torch.float64)
    target[:relevant] = 1.0
    for t in range(steps):
        if t > 0 and t % flip_every == 0:
            target[torch.randint(relevant, (1,), generator=generator)] *= -1
        x = torch.randn(n, generator=generator, dtype=torch.float64)
        yield x, target @ x


def published_idbd(stream, n, alpha0, theta):
    """IDBD as Sutton (1992) writes it."""
    beta = torch.full((n,), math.log(alpha0), dtype=torch.float64)
    h = torch.zeros(n, dtype=torch.float64)
    w = torch.zeros(n, dtype=torch.float64)
    clipped = 0
    for x, y in stream:
        delta = y - w @ x
        beta = beta + theta * delta * x * h
        alpha = torch.exp(beta)
        w = w + alpha * delta * x
        decay = 1 - alpha * x**2
        clipped += int((decay < 0).sum())
        h = h * decay.clamp(min=0) + alpha * delta * x
    return w, torch.exp(beta), h, clipped


def run_idbd(stream, n, alpha0, theta):
    w = nn.Parameter(torch.zeros(n, dtype=torch.float64))
    optimizer = metaopt.idbd([w], alpha0=alpha0, meta_lr=theta)
    for x, y in stream:
        optimizer.zero_grad()
        (0.5 * (x @ w - y) ** 2).backward()
        optimizer.step(hessian_diagonal={w: x**2})
    return w.detach(), optimizer.step_size(w), optimizer.state[w]["trace"], optimizer


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_idbd_is_the_published_algorithm():
    w, alpha, h, _ = run_idbd(sutton_stream(400), 20, alpha0=0.1, theta=0.02)
    expected_w, expected_alpha, expected_h, clipped = published_idbd(sutton_stream(400), 20, alpha0=0.1, theta=0.02)
    assert relative_error(w, expected_w) < 1e-12
    assert relative_error(alpha, expected_alpha) < 1e-12
    assert relative_error(h, expected_h) < 1e-12
    assert clipped > 0  # the rectifier was exercised
    assert (expected_alpha / 0.1).log().abs().max() > 0.5  # the step sizes moved


def test_idbd_learns_small_step_sizes_for_irrelevant_inputs():
    """Sutton's result: the step sizes of the 15 irrelevant inputs fall well below those of the 5
    relevant ones (ratio of geometric means 5-6 after 2000 examples, for four streams tried)."""
    _, alpha, _, _ = run_idbd(sutton_stream(2000), 20, alpha0=0.05, theta=0.03)
    assert alpha[:5].log().mean() - alpha[5:].log().mean() > math.log(4)


def classification_batch(t):
    generator = torch.Generator().manual_seed(500 + t)
    return torch.randn(16, 6, generator=generator, dtype=torch.float64), torch.randint(0, 3, (16,), generator=generator)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.float64)


def gradient(model, weights, t):
    x, y = classification_batch(t)
    params = dict(zip([name for name, _ in model.named_parameters()], weights))
    loss = nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    return [g.detach() for g in torch.autograd.grad(loss, weights)]


def published_hypergradient_descent(base, steps, alpha0, beta, rho=0.9, lam=0.999, eps=1e-8):
    """SGD-HD and Adam-HD as Baydin et al. (2017) write them (additive rule)."""
    model = make_model()
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    alpha = alpha0
    last_direction = [torch.zeros_like(p) for p in theta]  # grad_alpha u_{t-1} = -last_direction
    m = [torch.zeros_like(p) for p in theta]
    v = [torch.zeros_like(p) for p in theta]
    for t in range(steps):
        g = gradient(model, theta, t)
        h = -sum((gi * di).sum() for gi, di in zip(g, last_direction))
        alpha = alpha - beta * h
        if base == "sgd":
            direction = g
        else:
            m = [rho * mi + (1 - rho) * gi for mi, gi in zip(m, g)]
            v = [lam * vi + (1 - lam) * gi**2 for vi, gi in zip(v, g)]
            direction = [
                (mi / (1 - rho ** (t + 1))) / (torch.sqrt(vi / (1 - lam ** (t + 1))) + eps) for mi, vi in zip(m, v)
            ]
        with torch.no_grad():
            for p, d in zip(theta, direction):
                p -= alpha * d
        last_direction = direction
    return torch.cat([p.detach().reshape(-1) for p in theta]), float(alpha)


def run(optimizer_for, steps):
    model = make_model()
    optimizer = optimizer_for(model.parameters())
    for t in range(steps):
        optimizer.zero_grad()
        x, y = classification_batch(t)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), optimizer.step_size(next(model.parameters())).item()


@pytest.mark.parametrize("base,alpha0,beta", [("sgd", 0.05, 0.02), ("adamw", 0.003, 1e-4)])
def test_hypergradient_descent_is_the_published_algorithm(base, alpha0, beta):
    w, alpha = run(lambda params: metaopt.hypergradient_descent(params, alpha0=alpha0, meta_lr=beta, base=base), 40)
    expected_w, expected_alpha = published_hypergradient_descent(base, 40, alpha0, beta)
    assert relative_error(w, expected_w) < 1e-12
    assert abs(alpha - expected_alpha) < 1e-12 * abs(expected_alpha)
    assert abs(expected_alpha / alpha0 - 1) > 0.05  # the step size moved


def test_in_metaoptimize_order_hypergradient_descent_is_eq_90_91():
    """Without meta_first, gamma = 0 with additive step sizes is the paper's eq. 90-91: the base step
    uses the step size from before this step's meta update."""
    approx = Approximation("l", additive=True)
    w, alpha = run(lambda params: MetaOptimize(params, "sgd", "sgd", approx=approx, alpha0=0.05, meta_lr=0.02,
                                               gamma=0.0), 40)
    model = make_model()
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    step_size, last_gradient = 0.05, [torch.zeros_like(p) for p in theta]
    for t in range(40):
        g = gradient(model, theta, t)
        with torch.no_grad():
            for p, gi in zip(theta, g):
                p -= step_size * gi
        step_size += 0.02 * sum((gi * li).sum() for gi, li in zip(g, last_gradient))
        last_gradient = g
    assert relative_error(w, torch.cat([p.detach().reshape(-1) for p in theta])) < 1e-12
    assert abs(alpha - step_size) < 1e-12 * step_size
