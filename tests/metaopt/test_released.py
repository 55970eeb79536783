"""variant="released": the authors' research-code update against an independent reference
(tests/metaopt/references.py), for every base, meta, blocks setting and kernel."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from metaopt import BASES, METAS, MetaOptimize
from tests.metaopt.references import (ReleasedMetaOptimize, batch, block_ids, flat, loss_fn, make_net, relative_error,
                                      two_groups)

PAIRS = list(itertools.product(BASES, METAS))
# The released code's defaults, written out here so that a change of metaopt's defaults shows.
BASE_HP = {
    "sgd": {},
    "sgdm": {"momentum": 0.9},
    "rmsprop": {"normalizer": 0.999},
    "adamw": {"momentum": 0.9, "normalizer": 0.999},
    "lion": {"momentum": 0.99, "lion_interp": 0.9},
}
META_HP = {
    "sgd": {},
    "rmsprop": {"normalizer": 0.999},
    "adam": {"momentum": 0.9, "normalizer": 0.999},
    "lion": {"momentum": 0.99, "lion_interp": 0.9},
}
# Large enough that the step sizes move within the run (the released AdamW steps up to 10x further).
ALPHA0 = {"sgd": 0.05, "sgdm": 0.05, "rmsprop": 3e-3, "adamw": 1e-3, "lion": 1e-3}
META_LR = {"sgd": 0.5, "rmsprop": 0.02, "adam": 0.01, "lion": 0.02}


def released_run(base, meta, blocks, gamma, meta_weight_decay, kernel, steps=30):
    """(weights, step sizes) of MetaOptimize(variant="released") and of the reference, same stream."""
    model = make_net()
    names = [n for n, _ in model.named_parameters()]
    shapes = [tuple(p.shape) for p in model.parameters()]
    groups = [0, 0, 0, 0, 1, 1]
    block, n_blocks = block_ids(names, shapes, groups, blocks)
    kappa = torch.cat([torch.full((math.prod(s),), 0.1 if g == 0 else 0.0, dtype=torch.float64)
                       for s, g in zip(shapes, groups)])
    reference = ReleasedMetaOptimize(
        flat(model.parameters()), block, n_blocks, base, meta, alpha0=ALPHA0[base], meta_lr=META_LR[meta],
        gamma=gamma, weight_decay=kappa, meta_weight_decay=meta_weight_decay, base_hp=BASE_HP[base],
        meta_hp=META_HP[meta],
    )
    optimizer = MetaOptimize(
        two_groups(model), base, meta, blocks, variant="released", kernel=kernel, alpha0=ALPHA0[base],
        meta_lr=META_LR[meta], gamma=gamma, meta_weight_decay=meta_weight_decay,
    )
    reference_model = make_net()
    for t in range(steps):
        chunks = torch.split(reference.w, [math.prod(s) for s in shapes])
        params = {n: c.view(s).clone().requires_grad_() for n, c, s in zip(names, chunks, shapes)}
        grads = torch.autograd.grad(loss_fn(reference_model, params, t), list(params.values()))
        reference.step(flat(grads))
        optimizer.zero_grad()
        x, y = batch(t)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    step_sizes = flat([optimizer.step_size(p).expand_as(p) for p in model.parameters()])
    return (flat(model.parameters()), step_sizes), (reference.w, reference.step_sizes())


@pytest.mark.parametrize("meta_weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("blocks", ["scalar", "layerwise", "param_group"])
@pytest.mark.parametrize("base,meta", PAIRS)
def test_released_variant_matches_the_reference(base, meta, blocks, gamma, meta_weight_decay):
    for kernel in ("reference", "foreach", "flat"):
        (weights, step_sizes), (expected_weights, expected_step_sizes) = released_run(
            base, meta, blocks, gamma, meta_weight_decay, kernel
        )
        assert relative_error(weights, expected_weights) < 1e-10, kernel
        assert relative_error(step_sizes, expected_step_sizes) < 1e-10, kernel
    # The comparison has teeth only if the step sizes moved away from alpha0.
    assert (expected_step_sizes / ALPHA0[base]).log().abs().max() > 1e-3


@pytest.mark.parametrize("base,meta", [("adamw", "adam"), ("sgdm", "rmsprop"), ("lion", "lion")])
def test_released_variant_compiled_kernel_matches_the_reference(base, meta):
    (weights, step_sizes), (expected_weights, expected_step_sizes) = released_run(
        base, meta, "layerwise", 0.9, 0.1, "compiled", steps=8
    )
    assert relative_error(weights, expected_weights) < 1e-10
    assert relative_error(step_sizes, expected_step_sizes) < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("meta_weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("blocks", ["scalar", "layerwise", "param_group"])
@pytest.mark.parametrize("base,meta", PAIRS)
def test_released_variant_compiled_kernel_matches_the_reference_everywhere(base, meta, blocks, meta_weight_decay):
    (weights, step_sizes), (expected_weights, expected_step_sizes) = released_run(
        base, meta, blocks, 0.9, meta_weight_decay, "compiled", steps=8
    )
    assert relative_error(weights, expected_weights) < 1e-10
    assert relative_error(step_sizes, expected_step_sizes) < 1e-10


def _weight_changes(variant, lr_at, steps, momentum=0.9):
    """Per-step weight changes of an AdamW-base MetaOptimize with meta_lr 0 and no weight decay,
    on one fixed stream of gradients (not a function of the weights, so two runs see the same)."""
    w = torch.zeros(50, dtype=torch.float64, requires_grad=True)
    optimizer = MetaOptimize([w], "adamw", "sgd", variant=variant, alpha0=1e-3, meta_lr=0.0, weight_decay=0.0,
                             momentum=momentum, eps=1e-30)
    generator = torch.Generator().manual_seed(0)
    changes = []
    for t in range(1, steps + 1):
        w.grad = torch.randn(50, generator=generator, dtype=torch.float64) + 0.3
        optimizer.param_groups[0]["lr"] = lr_at(t)
        before = w.detach().clone()
        optimizer.step()
        changes.append(w.detach() - before)
    return changes


def test_released_adamw_is_standard_adamw_with_alpha_scaled_by_the_momentum_sum():
    """meta_lr = 0, rho > 0, kappa = 0: the released AdamW's step t is the standard one with alpha
    scaled by (1 - rho^t) / (1 - rho), the sum of the momentum's weights (1 at t = 1, 10 in the limit)."""
    rho, steps = 0.9, 60
    released = _weight_changes("released", lambda t: 1.0, steps, rho)
    standard = _weight_changes("standard", lambda t: (1 - rho**t) / (1 - rho), steps, rho)
    for t, (a, b) in enumerate(zip(released, standard), start=1):
        assert relative_error(a, b) < 1e-12, t
    # and the factor is really there: unscaled, the two differ by up to 1 / (1 - rho)
    unscaled = _weight_changes("standard", lambda t: 1.0, steps, rho)
    assert (released[-1].norm() / unscaled[-1].norm()).item() == pytest.approx((1 - rho**steps) / (1 - rho), rel=1e-9)


def test_released_sgdm_first_step_is_weight_decay_alone():
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    optimizer = MetaOptimize([w], "sgdm", "adam", variant="released", alpha0=0.1, weight_decay=0.5)
    w.grad = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    optimizer.step()
    assert torch.equal(w.detach(), torch.full((3,), 1 - 0.1 * 0.5, dtype=torch.float64))


def test_variant_is_validated_and_checked_on_load():
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="variant must be one of"):
        MetaOptimize([w], variant="authors")
    with pytest.raises(ValueError, match="meta_weight_decay must be in"):
        MetaOptimize([w], meta_weight_decay=-1.0)
    released = MetaOptimize([w], variant="released")
    standard = MetaOptimize([w])
    with pytest.raises(ValueError, match="variant"):
        standard.load_state_dict(released.state_dict())
    assert released.defaults["eps"] == 1e-10 and standard.defaults["eps"] == 1e-8
    assert "variant='released'" in repr(released)
