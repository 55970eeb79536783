"""The library's defaults for drop-in use: alpha0="auto" (the first step moves the weights by 1% of
their norm), the meta step size each meta rule carries, and the traps of the API closed (an ``lr``
that is not a step size, other optimizers' keywords, the caller's param-group dicts)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from metaopt import MetaOptimize
from metaopt.hyperparameters import AUTO_ALPHA0_FLOOR, AUTO_FIRST_MOVE


def make_model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def backward(model, t=0):
    generator = torch.Generator().manual_seed(t)
    x = torch.randn(16, 6, generator=generator, dtype=next(model.parameters()).dtype)
    y = torch.randint(0, 3, (16,), generator=generator)
    nn.functional.cross_entropy(model(x), y).backward()


def norm(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).norm()


@pytest.mark.parametrize("kernel", ["flat", "foreach", "reference"])
@pytest.mark.parametrize("base", ["sgd", "sgdm", "rmsprop", "adamw", "lion"])
def test_auto_alpha0_moves_the_weights_by_one_percent_of_their_norm(base, kernel):
    """Without weight decay and meta update, the first step's weight change is 1% of the weights'
    norm, whatever the base rule's direction (sign-like or the raw gradient)."""
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = MetaOptimize(model.parameters(), base, kernel=kernel, weight_decay=0.0, meta_lr=0.0)
    backward(model)
    optimizer.step()
    moved = norm(p - q for p, q in zip(model.parameters(), before))
    assert AUTO_FIRST_MOVE == 1e-2
    torch.testing.assert_close(moved / norm(before), torch.tensor(0.01, dtype=torch.float64), rtol=1e-10, atol=0)


def test_auto_alpha0_of_the_released_sgdm_uses_the_gradient():
    """The released SGDm steps with the momentum from before the step, zero at the first: the
    estimate falls back on the gradient, alpha0 = 0.01 |w| / |g|."""
    model = make_model()
    w = norm(model.parameters())
    optimizer = MetaOptimize(model.parameters(), "sgdm", variant="released", meta_lr=0.0)
    backward(model)
    g = norm(p.grad for p in model.parameters())
    optimizer.step()
    torch.testing.assert_close(optimizer.step_size(model[0].weight), 0.01 * w / g, rtol=1e-12, atol=0)


def test_auto_alpha0_is_estimated_per_param_group():
    """With one step size per param group, each group's first step moves its own weights by 1%."""
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    optimizer = MetaOptimize(groups, blocks="param_group", weight_decay=0.0, meta_lr=0.0)
    backward(model)
    optimizer.step()
    after = list(model.parameters())
    for members in ((0, 1), (2, 3)):
        moved = norm(after[i] - before[i] for i in members) / norm(before[i] for i in members)
        torch.testing.assert_close(moved, torch.tensor(0.01, dtype=torch.float64), rtol=1e-10, atol=0)
    sizes = list(optimizer.step_sizes().values())
    assert sizes[0] != sizes[1]


@pytest.mark.parametrize("zero", ["weights", "gradients"])
def test_auto_alpha0_has_a_floor_where_there_is_nothing_to_estimate_from(zero):
    model = make_model()
    optimizer = MetaOptimize(model.parameters(), meta_lr=0.0)
    backward(model)
    with torch.no_grad():
        for p in model.parameters():
            (p if zero == "weights" else p.grad).zero_()
    optimizer.step()
    assert optimizer.step_sizes() == {"step_size": pytest.approx(AUTO_ALPHA0_FLOOR, rel=1e-12)}


def test_the_step_size_is_nan_before_the_first_step_estimates_it():
    model = make_model()
    optimizer = MetaOptimize(model.parameters())
    assert torch.isnan(optimizer.step_size(model[0].weight)).all()
    backward(model)
    optimizer.step()
    assert torch.isfinite(optimizer.step_size(model[0].weight)).all()


def test_a_resume_with_auto_alpha0_continues_bit_for_bit():
    model, resumed_model = make_model(), make_model()
    optimizer = MetaOptimize(model.parameters())
    for t in range(3):
        optimizer.zero_grad()
        backward(model, t)
        optimizer.step()
    resumed_model.load_state_dict(model.state_dict())
    resumed = MetaOptimize(resumed_model.parameters())
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as from disk: tensors of its own
    for m, o in ((model, optimizer), (resumed_model, resumed)):
        for t in range(3, 6):
            o.zero_grad()
            backward(m, t)
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))
    assert optimizer.step_sizes() == resumed.step_sizes()


@pytest.mark.parametrize("meta,meta_lr", [("adam", 1e-2), ("rmsprop", 1e-2), ("lion", 3e-3), ("sgd", 1e-3)])
def test_each_meta_rule_carries_its_meta_step_size(meta, meta_lr):
    model = make_model()
    assert MetaOptimize(model.parameters(), meta=meta).defaults["meta_lr"] == meta_lr
    # the released variant's Adam and RMSProp sums step up to 10x further: the paper's 1e-3
    released = MetaOptimize(model.parameters(), meta=meta, variant="released").defaults["meta_lr"]
    assert released == (1e-3 if meta in ("adam", "rmsprop") else meta_lr)
    assert MetaOptimize(model.parameters(), meta=meta, meta_lr=0.5).defaults["meta_lr"] == 0.5


def test_an_lr_that_is_not_one_warns_and_names_alpha0():
    model = make_model()
    with pytest.warns(UserWarning, match=r"lr=0.001: lr multiplies the learned step size.*pass alpha0=0.001"):
        MetaOptimize(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match=r"lr=0.01 in param group 1"):
        MetaOptimize([{"params": [model[0].weight]}, {"params": [model[2].weight], "lr": 1e-2}], blocks="param_group")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MetaOptimize(model.parameters())
        MetaOptimize(model.parameters(), lr=torch.tensor(0.5))  # a scheduler's tensor: its own business


@pytest.mark.parametrize("keyword,value,hint", [
    ("betas", (0.9, 0.99), r"'betas': MetaOptimize takes AdamW's betas as momentum= \(beta1\) and normalizer= \(beta2\)"),
    ("learning_rate", 1e-3, r"'learning_rate': MetaOptimize learns its step size: alpha0= is where it starts"),
])
def test_other_optimizers_keywords_get_a_hint(keyword, value, hint):
    with pytest.raises(TypeError, match=hint):
        MetaOptimize(make_model().parameters(), **{keyword: value})


def test_the_callers_param_groups_are_left_as_they_were():
    model = make_model()
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "weight_decay": 0.0}]
    keys = [set(group) for group in groups]
    for _ in range(2):  # the same list builds a second optimizer
        optimizer = MetaOptimize(groups, blocks="param_group")
        backward(model)
        optimizer.step()
    assert [set(group) for group in groups] == keys
