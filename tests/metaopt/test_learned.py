"""Hyper-parameters learned beyond the step sizes (``learn=``), against references written here.

The reference run is written in this file from the equations of docs/algorithm.md (section 15) on one
flat float64 weight vector, with no code shared with ``metaopt``: the base update, the trace of every
learned hyper-parameter in closed form (the Hessian-free recursion ``X <- gamma J X + dF/db`` worked
out for each rule, as the SGDm example of the docs), and the Adam meta update of each ``b_k``. A second
reference differentiates the unrolled base updates with autograd, the gradients fed as data (what
Hessian-free means), to check that the traces are that derivative when ``gamma = 1``.
"""

from __future__ import annotations

import itertools
import math
import pickle

import pytest
import torch
from torch import nn

from metaopt import BASES, METAS, MetaOptimize
from metaopt.granularity import BLOCKS

SHAPES = [(5, 4), (5,), (3, 5), (3,)]  # a 4-5-3 tanh network
NAMES = ["l1.weight", "l1.bias", "l2.weight", "l2.bias"]
ALPHA0 = {"sgd": 0.3, "sgdm": 0.3, "rmsprop": 0.03, "adamw": 0.03, "lion": 0.01}
BASE_HP = {
    "sgd": {"weight_decay": 0.1},
    "sgdm": {"weight_decay": 0.1, "momentum": 0.9},
    "rmsprop": {"weight_decay": 0.1, "normalizer": 0.99, "eps": 1e-4},
    "adamw": {"weight_decay": 0.1, "momentum": 0.9, "normalizer": 0.99, "eps": 1e-4},
    "lion": {"weight_decay": 0.1, "momentum": 0.99, "lion_interp": 0.9},
}
LEARNABLE = {
    "sgd": ("weight_decay",),
    "sgdm": ("weight_decay", "momentum"),
    "rmsprop": ("weight_decay", "normalizer", "eps"),
    "adamw": ("weight_decay", "momentum", "normalizer", "eps"),
    "lion": ("weight_decay",),
}
LOGIT = {"momentum", "normalizer"}
META = {"momentum": 0.9, "normalizer": 0.999, "eps": 1e-8}
META_LR = 1e-2
STEPS = 30


def batch(t):
    generator = torch.Generator().manual_seed(100 + t)
    return torch.randn(12, 4, generator=generator, dtype=torch.float64), torch.randint(0, 3, (12,), generator=generator)


def loss_at(weights, t):
    x, y = batch(t)
    w1, b1, w2, b2 = weights
    return nn.functional.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)


def initial_weights():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) / 2 for shape in SHAPES]


def split(flat):
    return [chunk.view(shape) for chunk, shape in zip(torch.split(flat, [math.prod(s) for s in SHAPES]), SHAPES)]


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def block_ids(blocks):
    sizes = [math.prod(s) for s in SHAPES]
    if blocks == "scalar":
        return torch.zeros(sum(sizes), dtype=torch.long)
    if blocks == "layerwise":
        return torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    return torch.arange(sum(sizes))  # weightwise


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# -- the reference: base updates and closed-form traces ------------------------------------------


def to_value(name, b):
    return torch.sigmoid(b) if name in LOGIT else torch.exp(b)


def to_b(name, value):
    return math.log(value / (1 - value)) if name in LOGIT else math.log(value)


def base_update(base, w, m, v, g, t, hp):
    """New (w, m, v) of one base update with hyper-parameters ``hp`` (per weight or numbers)."""
    rho, lam, c = hp.get("momentum", 0.0), hp.get("normalizer", 0.0), hp.get("lion_interp", 0.0)
    new_m = rho * m + (1 - rho) * g if base in ("sgdm", "adamw", "lion") else m
    new_v = lam * v + (1 - lam) * g * g if base in ("rmsprop", "adamw") else v

    def normalized(x):
        return x / ((new_v / (1 - lam**t)).sqrt() + hp["eps"])

    directions = {
        "sgd": lambda: g,
        "sgdm": lambda: new_m,
        "lion": lambda: torch.sign(c * m + (1 - c) * g),  # with the old m
        "rmsprop": lambda: normalized(g),
        "adamw": lambda: normalized(new_m / (1 - rho**t)),
    }
    return w - hp["step_size"] * (directions[base]() + hp["weight_decay"] * w), new_m, new_v


def reference_traces(base, w, m, v, g, t, hp, X, M, V, gamma):
    """The traces after one step in closed form, from the state before it: X[k] (weights),
    M (dm/db_momentum), V (dv/db_normalizer); returns (X, M, V) new."""
    alpha, kappa = hp["step_size"], hp["weight_decay"]
    decay = gamma * (1 - alpha * kappa)
    new_w, new_m, new_v = base_update(base, w, m, v, g, t, hp)
    new = {"step_size": decay * X["step_size"] + (new_w - w)}
    if "weight_decay" in X:
        new["weight_decay"] = decay * X["weight_decay"] - alpha * kappa * w
    if "momentum" in X:  # the moment's own trace, then the weights' through it
        rho = hp["momentum"]
        M = gamma * rho * M + rho * (1 - rho) * (m - g)
        if base == "sgdm":
            new["momentum"] = decay * X["momentum"] - alpha * M
    if base in ("rmsprop", "adamw"):
        lam, eps = hp["normalizer"], hp["eps"]
        c2 = 1 - lam**t
        root = (new_v / c2).sqrt()
        s = root + eps
        numerator = g if base == "rmsprop" else new_m / (1 - hp["momentum"] ** t)
        d = numerator / s
        if "eps" in X:  # dd/db_eps = -eps d / s
            new["eps"] = decay * X["eps"] + alpha * eps * d / s
        if "normalizer" in X:  # dd/db_lambda = -(d / s) d(root)/db_lambda, with root = sqrt(v / c2)
            V = gamma * lam * V + lam * (1 - lam) * (v - g * g)
            v_hat_tangent = V / c2 + new_v * t * lam**t * (1 - lam) / c2**2
            new["normalizer"] = decay * X["normalizer"] + alpha * d / s * torch.where(root > 0, v_hat_tangent / (2 * root), 0.0)
        if "momentum" in X:
            rho = hp["momentum"]
            c1 = 1 - rho**t
            new["momentum"] = decay * X["momentum"] - alpha * (M / c1 + new_m * t * rho**t * (1 - rho) / c1**2) / s
    return new, M, V


class AdamMeta:
    """The meta rule (Adam, bias-corrected) on one tensor of b's."""

    def __init__(self, b):
        self.b, self.m, self.v, self.t = b, torch.zeros_like(b), torch.zeros_like(b), 0

    def update(self, z):
        self.t += 1
        self.m = META["momentum"] * self.m + (1 - META["momentum"]) * z
        self.v = META["normalizer"] * self.v + (1 - META["normalizer"]) * z * z
        m_hat, v_hat = self.m / (1 - META["momentum"] ** self.t), self.v / (1 - META["normalizer"] ** self.t)
        self.b = self.b - META_LR * m_hat / (v_hat.sqrt() + META["eps"])


def reference_run(base, learn, gamma, blocks, steps=STEPS):
    """The weights, traces and learned values after ``steps`` steps, from the equations above."""
    w = flat(initial_weights())
    ids = block_ids(blocks)
    count = int(ids.max()) + 1
    fixed = {**BASE_HP[base]}
    metas = {"step_size": AdamMeta(torch.full((count,), math.log(ALPHA0[base]), dtype=torch.float64))}
    metas.update({name: AdamMeta(torch.full((count,), to_b(name, fixed[name]), dtype=torch.float64)) for name in learn})
    X = {name: torch.zeros_like(w) for name in metas}
    m, v, M, V = (torch.zeros_like(w) for _ in range(4))
    for t in range(1, steps + 1):
        g = torch.func.grad(lambda flat_w: loss_at(split(flat_w), t))(w)
        z = {name: torch.zeros(count, dtype=torch.float64).index_add_(0, ids, X[name] * g) for name in metas}
        hp = {**fixed, **{name: to_value(name, meta.b)[ids] for name, meta in metas.items()}}
        X, M, V = reference_traces(base, w, m, v, g, t, hp, X, M, V, gamma)
        w, m, v = base_update(base, w, m, v, g, t, hp)
        for name, meta in metas.items():
            meta.update(z[name])
    return w, X, {name: to_value(name, meta.b) for name, meta in metas.items()}


# -- the optimizer -------------------------------------------------------------------------------


def make(base, learn, gamma=1.0, blocks="scalar", kernel="foreach", meta_lr=META_LR, **options):
    params = [nn.Parameter(w) for w in initial_weights()]
    optimizer = MetaOptimize(
        [{"params": params, "param_names": NAMES}], base=base, meta="adam", blocks=blocks, kernel=kernel,
        learn=("step_size", *learn), alpha0=ALPHA0[base], gamma=gamma, meta_lr=meta_lr,
        **{**BASE_HP[base], **options}, **{f"meta_{k}": value for k, value in META.items()},
    )
    return params, optimizer


def train(params, optimizer, steps, first=1):
    for t in range(first, first + steps):
        optimizer.zero_grad()
        loss_at(params, t).backward()
        optimizer.step()


def learned_values(params, optimizer, name):
    return torch.cat([optimizer.meta_parameter(p, name).expand(p.shape).reshape(-1) for p in params])


def traces(params, optimizer, name):
    key = "trace" if name == "step_size" else f"trace_{name}"
    return flat([optimizer.state[p][key] for p in params])


CASES = [(base, name) for base, names in LEARNABLE.items() for name in names]


@pytest.mark.parametrize("kernel", ["reference", "foreach"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("base,name", CASES)
def test_traces_and_learned_values_equal_the_reference(base, name, gamma, kernel):
    """(b): every base and each of its learnable hyper-parameters, 30 steps, the generic route
    (reference kernel: forward-mode differentiation of the rule) and the fast one (foreach)."""
    params, optimizer = make(base, (name,), gamma, kernel=kernel)
    train(params, optimizer, STEPS)
    w, X, values = reference_run(base, (name,), gamma, "scalar")
    assert relative_error(flat(params), w) < 1e-12
    for learned in ("step_size", name):
        assert relative_error(traces(params, optimizer, learned), X[learned]) < 1e-10, learned
        assert relative_error(learned_values(params, optimizer, learned), values[learned][0].expand(w.shape)) < 1e-12
    assert abs(to_b(name, values[name][0].item()) - to_b(name, BASE_HP[base][name])) > 1e-4  # b_k moved


@pytest.mark.parametrize("blocks", ["layerwise", "weightwise"])
@pytest.mark.parametrize("kernel", ["reference", "foreach", "flat"])
@pytest.mark.parametrize("base", ["sgdm", "adamw"])
def test_every_hyper_parameter_at_once_per_block_equals_the_reference(base, kernel, blocks):
    learn = LEARNABLE[base]
    params, optimizer = make(base, learn, 0.9, blocks=blocks, kernel=kernel)
    train(params, optimizer, STEPS)
    w, X, values = reference_run(base, learn, 0.9, blocks)
    ids = block_ids(blocks)
    assert relative_error(flat(params), w) < 1e-12
    for name in ("step_size", *learn):
        assert relative_error(traces(params, optimizer, name), X[name]) < 1e-10, name
        assert relative_error(learned_values(params, optimizer, name), values[name][ids]) < 1e-12, name


def unrolled_weights(base, learn_name, b, gradients):
    """The weights after the recorded steps as a function of ``b`` (the log or logit of ``learn_name``,
    a tensor autograd differentiates), with the gradients fed as data."""
    w = flat(initial_weights())
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    hp = {**BASE_HP[base], "step_size": ALPHA0[base], learn_name: to_value(learn_name, b)}
    for t, g in enumerate(gradients, start=1):
        w, m, v = base_update(base, w, m, v, g, t, hp)
    return w


@pytest.mark.parametrize("kernel", ["reference", "foreach"])
@pytest.mark.parametrize("base,name", CASES + [(base, "step_size") for base in LEARNABLE])
def test_with_gamma_1_a_trace_is_the_derivative_of_the_unrolled_updates(base, name, kernel):
    """(c): ``meta_lr=0`` keeps every b fixed; the gradients the optimizer saw are fed as data."""
    params, optimizer = make(base, LEARNABLE[base], 1.0, kernel=kernel, meta_lr=0.0)
    gradients = []
    for t in range(1, STEPS + 1):
        optimizer.zero_grad()
        loss_at(params, t).backward()
        gradients.append(flat([p.grad for p in params]).clone())
        optimizer.step()
    initial = ALPHA0[base] if name == "step_size" else BASE_HP[base][name]
    b = torch.tensor(to_b(name, initial), dtype=torch.float64)
    derivative = torch.autograd.functional.jacobian(lambda b: unrolled_weights(base, name, b, gradients), b)
    assert relative_error(traces(params, optimizer, name), derivative) < 1e-10


# -- the default is today's optimizer, and the fast routes equal the generic one -----------------


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("base,meta", list(itertools.product(BASES, METAS)))
def test_learning_the_step_size_alone_is_todays_optimizer_bit_for_bit(base, meta, blocks):
    """(a): learn=("step_size",) takes the step sizes' path alone, with the same state."""
    runs = []
    for options in ({}, {"learn": ("step_size",)}):
        params = [nn.Parameter(w) for w in initial_weights()]
        optimizer = MetaOptimize([{"params": params, "param_names": NAMES}], base=base, meta=meta, blocks=blocks,
                                 alpha0=0.01, **options)
        train(params, optimizer, 5)
        assert optimizer._plan().learned is None
        runs.append((params, optimizer))
    (params, optimizer), (params_learn, optimizer_learn) = runs
    for p, q in zip(params, params_learn):
        assert torch.equal(p, q)
        assert optimizer.state[p].keys() == optimizer_learn.state[q].keys()
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, optimizer_learn.state[q][key]), key
    assert optimizer.meta_parameters() == optimizer.step_sizes() == optimizer_learn.meta_parameters()


def fast_and_generic(base, learn, blocks, kernel, variant="standard", steps=12, meta="adam"):
    runs = []
    for k in ("reference", kernel):
        params = [nn.Parameter(w) for w in initial_weights()]
        optimizer = MetaOptimize([{"params": params, "param_names": NAMES}], base=base, meta=meta, blocks=blocks, kernel=k,
                                 variant=variant, learn=("step_size", *learn), alpha0=ALPHA0[base],
                                 **BASE_HP[base])
        train(params, optimizer, steps)
        runs.append((params, optimizer))
    return runs


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("kernel", ["foreach", "flat"])
@pytest.mark.parametrize("base", ["sgdm", "adamw"])
def test_the_hand_derived_traces_equal_forward_mode_differentiation(base, kernel, blocks):
    (params, optimizer), (fast_params, fast) = fast_and_generic(base, LEARNABLE[base], blocks, kernel)
    for p, q in zip(params, fast_params):
        assert relative_error(q, p) < 1e-12
        for key, value in optimizer.state[p].items():
            assert relative_error(fast.state[q][key], value) < 1e-10, key
    assert fast.meta_parameters() == pytest.approx(optimizer.meta_parameters(), rel=1e-10)


@pytest.mark.parametrize("base", ["sgdm", "adamw", "rmsprop"])
def test_the_released_variant_learns_through_the_generic_route(base):
    (params, optimizer), (fast_params, fast) = fast_and_generic(base, LEARNABLE[base], "scalar", "flat", "released")
    assert fast.meta_parameters() == pytest.approx(optimizer.meta_parameters(), rel=1e-10)
    assert all(value == value for value in fast.meta_parameters().values())


@pytest.mark.parametrize("meta", METAS)
def test_every_meta_rule_learns_the_hyper_parameters(meta):
    (params, optimizer), (fast_params, fast) = fast_and_generic("sgdm", LEARNABLE["sgdm"], "layerwise", "foreach",
                                                                meta=meta)
    assert fast.meta_parameters() == pytest.approx(optimizer.meta_parameters(), rel=1e-10)
    moved = fast.meta_parameters()
    assert moved["momentum/l1.weight"] != pytest.approx(0.9, rel=1e-9) and moved["weight_decay/l2.bias"] != pytest.approx(0.1, rel=1e-9)
    assert fast.state[fast_params[0]]["meta_step"] == 12


@pytest.mark.slow
def test_the_compiled_kernel_equals_the_generic_route():
    (params, optimizer), (fast_params, fast) = fast_and_generic("adamw", LEARNABLE["adamw"], "nodewise", "compiled",
                                                                steps=4)
    assert fast.meta_parameters() == pytest.approx(optimizer.meta_parameters(), rel=1e-10)
    for p, q in zip(params, fast_params):
        assert relative_error(fast.state[q]["trace_normalizer"], optimizer.state[p]["trace_normalizer"]) < 1e-10


# -- resume, reading the values, skipping a step -------------------------------------------------


@pytest.mark.parametrize("blocks", ["scalar", "nodewise", "weightwise"])
@pytest.mark.parametrize("kernel", ["foreach", "reference"])
def test_a_resumed_run_continues_bit_for_bit(blocks, kernel):
    params, optimizer = make("adamw", LEARNABLE["adamw"], 0.9, blocks=blocks, kernel=kernel)
    train(params, optimizer, 6)
    saved_params = [p.detach().clone() for p in params]
    saved = pickle.loads(pickle.dumps(optimizer.state_dict()))
    train(params, optimizer, 6, first=7)
    resumed_params, resumed = make("adamw", LEARNABLE["adamw"], 0.9, blocks=blocks, kernel=kernel)
    with torch.no_grad():
        for p, value in zip(resumed_params, saved_params):
            p.copy_(value)
    resumed.load_state_dict(saved)
    train(resumed_params, resumed, 6, first=7)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
    assert resumed.meta_parameters() == optimizer.meta_parameters()


def test_a_checkpoint_of_other_learned_hyper_parameters_is_refused():
    params, optimizer = make("adamw", ("weight_decay",))
    train(params, optimizer, 1)
    _, other = make("adamw", ("momentum",))
    with pytest.raises(ValueError, match="learn"):
        other.load_state_dict(optimizer.state_dict())


def test_meta_parameters_are_named_as_the_step_sizes():
    params, optimizer = make("sgdm", ("weight_decay", "momentum"), blocks="layerwise")
    before = optimizer.meta_parameters()
    assert before["weight_decay/l1.weight"] == pytest.approx(0.1) and before["momentum/l2.bias"] == pytest.approx(0.9)
    train(params, optimizer, 3)
    values = optimizer.meta_parameters()
    assert set(values) == {f"{name}/{param}" for name in ("step_size", "weight_decay", "momentum") for param in NAMES}
    assert {k: v for k, v in values.items() if k.startswith("step_size")} == optimizer.step_sizes()
    params, optimizer = make("adamw", ("eps",), blocks="nodewise")
    train(params, optimizer, 2)
    assert {"eps/l1.weight/min", "eps/l1.weight/median", "eps/l1.weight/max"} <= set(optimizer.meta_parameters())
    assert optimizer.meta_parameter(params[1], "eps").shape == (5,)  # a bias shares its weight's rows


def test_a_non_finite_gradient_skips_the_learned_state_too():
    params, optimizer = make("adamw", LEARNABLE["adamw"], skip_nonfinite=True)
    train(params, optimizer, 3)
    before = {key: value.clone() for key, value in optimizer.state[params[0]].items()}
    values = optimizer.meta_parameters()
    optimizer.zero_grad()
    loss_at(params, 4).backward()
    params[0].grad[0, 0] = math.nan
    optimizer.step()
    assert optimizer.meta_parameters() == values
    for key, value in before.items():
        assert torch.equal(optimizer.state[params[0]][key], value), key


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("base,learn,options,message", [
    ("sgd", ("step_size", "momentum"), {}, r"no learnable hyper-parameter 'momentum'.*\['step_size', 'weight_decay'\]"),
    ("lion", ("step_size", "momentum"), {}, "through a sign.*zero"),
    ("lion", ("step_size", "lion_interp"), {}, "through a sign"),
    ("sgdm", ("step_size", "weight_decay"), {}, r"weight_decay must be > 0.*got 0\.0"),
    ("sgdm", ("step_size", "momentum"), {"momentum": 0.0}, r"momentum must be in \(0, 1\)"),
    ("adamw", ("weight_decay",), {}, "must include 'step_size'"),
    ("adamw", ("step_size", "eps"), {"approx": "2x2"}, "approx='hessian_free'"),
    ("adamw", ("step_size", "eps"), {"storage": "contiguous"}, "storage='separate'"),
])
def test_what_cannot_be_learned_is_refused(base, learn, options, message):
    with pytest.raises(ValueError, match=message):
        MetaOptimize([nn.Parameter(torch.zeros(3))], base=base, learn=learn, **options)


def test_learn_is_a_tuple_of_names():
    with pytest.raises(TypeError, match="tuple of names"):
        MetaOptimize([nn.Parameter(torch.zeros(3))], learn="weight_decay")


def test_a_param_group_without_weight_decay_is_refused_when_it_is_learned():
    groups = [{"params": [nn.Parameter(torch.zeros(3))]}, {"params": [nn.Parameter(torch.zeros(3))], "weight_decay": 0.0}]
    with pytest.raises(ValueError, match="weight_decay of param group 1 must be > 0"):
        MetaOptimize(groups, base="adamw", learn=("step_size", "weight_decay"))


def test_a_momentum_driven_to_1_in_float32_stays_below_it():
    """A saturated sigmoid rounds to 1 in float32; AdamW's bias correction 1 - rho^t would then be 0."""
    model = nn.Linear(4, 2)
    optimizer = MetaOptimize(model.parameters(), "adamw", learn=("step_size", "momentum"), alpha0=1e-3)
    model(torch.randn(8, 4)).square().mean().backward()
    optimizer.step()
    optimizer.param_groups[0]["beta_momentum"].fill_(30.0)  # sigmoid(30) is 1.0 in float32
    for _ in range(3):
        optimizer.step()
    assert 0 < 1 - optimizer.meta_parameter(model.weight, "momentum").item() <= 2 * torch.finfo(torch.float32).eps
    assert all(p.isfinite().all() for p in model.parameters())
    assert all(value.isfinite().all() for value in optimizer.state[model.weight].values())

