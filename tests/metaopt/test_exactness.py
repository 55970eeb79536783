"""The traces of approx="l" / "2x2" against autograd through the unrolled training run (docs/algorithm.md, "Keeping the Hessian").

The unrolled run is written here from the equations of docs/algorithm.md on one flat float64 weight vector
(no code shared with ``metaopt``): every step's gradient is taken with ``create_graph=True``, so
autograd can differentiate the final weights with respect to the log step sizes. With
``meta_lr = 0`` and ``gamma = 1`` the 2x2 trace is that derivative exactly. With ``meta_lr > 0``
the 2x2 approximation is exact for the run in which the meta-gradient ``z_t = H_t^T g_t`` sees
the trace ``H_t`` as a given number (Q, the trace of the trace, is what it drops), and the L
approximation for the run in which ``z_t`` is a given number altogether; the tests build both.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from metaopt import BASES, MetaOptimize
from metaopt.hessian import Approximation
from tests.metaopt.references import BASE_HP as HP

ALPHA0 = {"sgd": 0.3, "sgdm": 0.3, "rmsprop": 0.03, "adamw": 0.03, "lion": 0.01}
WEIGHT_DECAY = {"sgd": 0.0, "sgdm": 0.1, "rmsprop": 0.1, "adamw": 0.1, "lion": 0.1}
META_HP = {"sgd": {}, "adam": {"momentum": 0.9, "normalizer": 0.99, "eps": 1e-8}}
STEPS = 8
SHAPES = [(5, 4), (5,), (3, 5), (3,)]  # a 4-5-3 tanh network


def batch(t):
    generator = torch.Generator().manual_seed(100 + t)
    return torch.randn(12, 4, generator=generator, dtype=torch.float64), torch.randint(0, 3, (12,), generator=generator)


def loss_at(weights: list[torch.Tensor], t: int) -> torch.Tensor:
    x, y = batch(t)
    w1, b1, w2, b2 = weights
    return nn.functional.cross_entropy(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y)


def separable_data(t):
    generator = torch.Generator().manual_seed(200 + t)
    return torch.randn(2, sum(math.prod(s) for s in SHAPES), generator=generator, dtype=torch.float64)


def separable_loss(weights, t):
    """A loss whose Hessian is diagonal: Hutchinson's estimate u * (Hess u) is then exact."""
    a, b = separable_data(t)
    return (nn.functional.softplus(a * flat(weights) - b) + 0.5 * a**2 * flat(weights) ** 2).sum()


def separable_hessian_diagonal(weights, t):
    a, b = separable_data(t)
    s = torch.sigmoid(a * flat(weights) - b)
    return a**2 * s * (1 - s) + a**2


def initial_weights() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) / 2 for shape in SHAPES]


def split(flat: torch.Tensor) -> list[torch.Tensor]:
    return [chunk.view(shape) for chunk, shape in zip(torch.split(flat, [math.prod(s) for s in SHAPES]), SHAPES)]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def block_ids(blocks: str) -> torch.Tensor:
    """The step-size block of every weight of the flat vector (param groups: the two layers)."""
    sizes = [math.prod(s) for s in SHAPES]
    if blocks == "scalar":
        return torch.zeros(sum(sizes), dtype=torch.long)
    if blocks == "layerwise":
        return torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    if blocks == "param_group":
        return torch.cat([torch.full((n,), k // 2) for k, n in enumerate(sizes)])
    if blocks == "weightwise":
        return torch.arange(sum(sizes))
    # nodewise: a row of a weight matrix with the matching bias entry
    rows1, rows2 = torch.arange(5), 5 + torch.arange(3)
    return torch.cat([rows1.repeat_interleave(4), rows1, rows2.repeat_interleave(5), rows2])


def relative_error(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


# -- the unrolled run, from docs/algorithm.md, "One step" and "The standard variant" ----------


def base_step(base, w, g, m, v, t, alpha, kappa):
    """One base update (docs/algorithm.md, "One step", step 2): the new weights and moments."""
    hp = HP[base]
    if base == "sgd":
        d = g
    elif base == "sgdm":
        m = hp["momentum"] * m + (1 - hp["momentum"]) * g
        d = m
    elif base == "rmsprop":
        lam = hp["normalizer"]
        v = lam * v + (1 - lam) * g**2
        d = g / (torch.sqrt(v / (1 - lam**t)) + hp["eps"])
    elif base == "adamw":
        rho, lam = hp["momentum"], hp["normalizer"]
        m = rho * m + (1 - rho) * g
        v = lam * v + (1 - lam) * g**2
        d = (m / (1 - rho**t)) / (torch.sqrt(v / (1 - lam**t)) + hp["eps"])
    else:
        rho, c = hp["momentum"], hp["lion_interp"]
        d = torch.sign(c * m + (1 - c) * g)
        m = rho * m + (1 - rho) * g
    return w - alpha * (d + kappa * w), m, v


def meta_step(meta, beta, z, mb, vb, t, eta):
    """One meta update (docs/algorithm.md, "One step", step 4)."""
    if meta == "sgd":
        return beta - eta * z, mb, vb
    hp = META_HP[meta]
    rho, lam = hp["momentum"], hp["normalizer"]
    mb = rho * mb + (1 - rho) * z
    vb = lam * vb + (1 - lam) * z**2
    return beta - eta * (mb / (1 - rho**t)) / (torch.sqrt(vb / (1 - lam**t)) + hp["eps"]), mb, vb


def unrolled(base, beta, block, *, meta="sgd", meta_lr=0.0, perturbation=None, traces=None, keep_dz_dw=True,
             loss=loss_at):
    """Train STEPS steps with log step sizes ``beta`` (one per block; ``block`` maps each weight to
    its block) and return the final weights and betas as differentiable functions of ``beta`` and of
    ``perturbation`` (added to the betas used at each step: the beta_t of eq. 8).

    The meta-gradient is ``z_t = traces[t]^T g_t`` with the traces as given numbers; with
    ``keep_dz_dw=False`` it is a given number altogether (the L-approximation's run)."""
    w = flat(initial_weights()).requires_grad_()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    mb, vb = torch.zeros_like(beta), torch.zeros_like(beta)
    for t in range(STEPS):
        if perturbation is not None:
            beta = beta + perturbation[t]
        g = torch.autograd.grad(loss(split(w), t), w, create_graph=True)[0]
        w_next, m, v = base_step(base, w, g, m, v, t + 1, torch.exp(beta)[block], WEIGHT_DECAY[base])
        if meta_lr != 0:
            z = torch.zeros_like(beta).index_add(0, block, traces[t] * g)
            if not keep_dz_dw:
                z = z.detach()
            beta, mb, vb = meta_step(meta, beta, z, mb, vb, t + 1, meta_lr)
        w = w_next
    return w, beta


def jacobian(function, x):
    return torch.autograd.functional.jacobian(function, x)


# -- the optimizer's run ----------------------------------------------------------------------


def closure_for(optimizer, params, t, loss_fn=loss_at):
    """The closure that step() needs: the loss of step t, with a gradient that keeps its graph."""

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(params, t)
        loss.backward(create_graph=True)
        return loss

    return closure


def optimizer_run(base, blocks, approx, *, meta="sgd", meta_lr=0.0, gamma=1.0, record=False, loss=loss_at):
    params = [nn.Parameter(w.clone()) for w in initial_weights()]
    optimizer = MetaOptimize(
        [{"params": params[:2]}, {"params": params[2:]}] if blocks == "param_group" else params,
        base,
        meta,
        blocks,
        approx=approx,
        alpha0=ALPHA0[base],
        meta_lr=meta_lr,
        gamma=gamma,
        weight_decay=WEIGHT_DECAY[base],
        **HP[base],
        **{f"meta_{k}": value for k, value in META_HP[meta].items()},
    )
    traces = []
    for t in range(STEPS):
        if record:  # the trace before the step, for the meta-gradient of the unrolled run
            traces.append(flat(optimizer.state[p].get("trace", torch.zeros_like(p)) for p in params))
        optimizer.step(closure_for(optimizer, params, t, loss))
    return params, optimizer, traces


@pytest.mark.parametrize("approx", ["2x2", "l"])
@pytest.mark.parametrize("base", list(BASES))
def test_trace_is_the_derivative_of_the_weights_with_respect_to_beta(base, approx):
    """meta_lr = 0, gamma = 1, scalar step size: H_T = d w_T / d beta, relative error < 1e-8."""
    params, optimizer, _ = optimizer_run(base, "scalar", approx)
    beta = torch.tensor([math.log(ALPHA0[base])], dtype=torch.float64)
    expected = jacobian(lambda b: unrolled(base, b, block_ids("scalar"))[0], beta)[:, 0]
    trace = flat(optimizer.state[p]["trace"] for p in params)
    assert relative_error(flat(p.detach() for p in params), unrolled(base, beta, block_ids("scalar"))[0].detach()) < 1e-12
    assert relative_error(trace, expected) < 1e-8
    if base != "lion":  # Lion's update is flat in w and g: its trace is Hessian-free anyway
        hessian_free_params, hessian_free, _ = optimizer_run(base, "scalar", "hessian_free")
        assert relative_error(flat(hessian_free.state[p]["trace"] for p in hessian_free_params), expected) > 1e-3


@pytest.mark.parametrize("blocks", ["layerwise", "param_group"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_blockwise_trace_has_one_column_per_block(base, blocks):
    """Blockwise step sizes with Hessian-vector products: trace[b] of every tensor = d w_T / d beta_b."""
    params, optimizer, _ = optimizer_run(base, blocks, "2x2")
    block = block_ids(blocks)
    columns = int(block.max()) + 1
    beta = torch.full((columns,), math.log(ALPHA0[base]), dtype=torch.float64)
    expected = jacobian(lambda b: unrolled(base, b, block)[0], beta)  # weights x blocks
    trace = torch.cat([optimizer.state[p]["trace"].reshape(columns, -1) for p in params], dim=1).T
    assert relative_error(trace, expected) < 1e-8
    # The Hessian couples the blocks: perturbing one block's step size moves every tensor.
    assert expected[block != 0, 0].abs().max() > 1e-3


@pytest.mark.parametrize("given_diagonal", [False, True])
@pytest.mark.parametrize("blocks", ["weightwise", "nodewise"])
@pytest.mark.parametrize("base", ["sgd", "rmsprop", "adamw"])
def test_diagonal_trace_is_exact_for_a_diagonal_hessian(base, blocks, given_diagonal):
    """hessian="diagonal": with a diagonal Hessian, H_T[i] = d w_T[i] / d beta of its block, given
    the diagonal or estimated by Hutchinson (then exact)."""
    params = [nn.Parameter(w.clone()) for w in initial_weights()]
    optimizer = MetaOptimize(params, base, "sgd", blocks, approx="2x2", alpha0=ALPHA0[base], meta_lr=0.0,
                             weight_decay=WEIGHT_DECAY[base], **HP[base])
    for t in range(STEPS):
        if given_diagonal:
            optimizer.zero_grad()
            separable_loss(params, t).backward()
            diagonal = separable_hessian_diagonal([p.detach() for p in params], t)
            optimizer.step(hessian_diagonal=dict(zip(params, split(diagonal))))
        else:
            optimizer.step(closure_for(optimizer, params, t, separable_loss))
    block = block_ids(blocks)
    beta = torch.full((int(block.max()) + 1,), math.log(ALPHA0[base]), dtype=torch.float64)
    expected = jacobian(lambda b: unrolled(base, b, block, loss=separable_loss)[0], beta)  # weights x blocks
    own_block = expected[torch.arange(len(block)), block]
    assert relative_error(flat(optimizer.state[p]["trace"] for p in params), own_block) < 1e-8
    assert (expected.sum(1) - own_block).abs().max() < 1e-12  # no weight depends on another block's beta


def combined(jacobian_columns: torch.Tensor, gamma: float) -> torch.Tensor:
    """sum_tau c_tau d(.)/d(perturbation_tau), with the weights of eq. 8 and 12-15 when Y starts at I:
    gamma^(T-1) for the first step, (1 - gamma) gamma^(T-1-tau) for the later ones."""
    weights = torch.tensor(
        [gamma ** (STEPS - 1)] + [(1 - gamma) * gamma ** (STEPS - 1 - tau) for tau in range(1, STEPS)], dtype=torch.float64
    )
    return jacobian_columns @ weights


def meta_state(optimizer, params, blocks, key):
    """A meta state tensor of every block, in block order."""
    if blocks == "scalar":
        return optimizer.param_groups[0][key].reshape(-1)
    return flat(optimizer.state[p][key] for p in params)


DYNAMICS = [  # (base, meta, blocks, loss): HVP columns on the network, the diagonal route on the separable loss
    ("sgd", "sgd", "scalar", loss_at),
    ("adamw", "adam", "scalar", loss_at),
    ("sgdm", "adam", "scalar", loss_at),
    ("sgd", "sgd", "weightwise", separable_loss),
    ("adamw", "adam", "weightwise", separable_loss),
]


@pytest.mark.parametrize("gamma", [1.0, 0.8])
@pytest.mark.parametrize("approx", ["2x2", "l"])
@pytest.mark.parametrize("base,meta,blocks,loss", DYNAMICS, ids=[f"{b}-{m}-{k}" for b, m, k, _ in DYNAMICS])
def test_traces_follow_the_step_size_dynamics(base, meta, blocks, loss, approx, gamma):
    """meta_lr > 0: the traces X (H) and Y (meta_trace) are the discounted derivatives of eq. 8
    and 12 of the run that the approximation describes."""
    meta_lr = {"sgd": 0.5, "adam": 0.05}[meta]
    params, optimizer, traces = optimizer_run(base, blocks, approx, meta=meta, meta_lr=meta_lr, gamma=gamma,
                                              record=True, loss=loss)
    block = block_ids(blocks)
    beta0 = torch.full((int(block.max()) + 1,), math.log(ALPHA0[base]), dtype=torch.float64)

    def run(perturbation):
        return unrolled(base, beta0, block, meta=meta, meta_lr=meta_lr, perturbation=perturbation,
                        traces=traces, keep_dz_dw=approx == "2x2", loss=loss)

    zero = torch.zeros(STEPS, len(beta0), dtype=torch.float64)
    w, beta = run(zero)
    assert relative_error(flat(p.detach() for p in params), w.detach()) < 1e-12
    assert relative_error(meta_state(optimizer, params, blocks, "beta"), beta.detach()) < 1e-12
    assert (beta - beta0).abs().max() > 1e-2  # the step sizes moved
    # d(.)_T[i] / d perturbation_tau[block of i]: the derivatives of eq. 8 and 12, then their discounted sum
    weights, blocks_ = torch.arange(len(block)), torch.arange(len(beta0))
    expected_trace = combined(jacobian(lambda e: run(e)[0], zero)[weights, :, block], gamma)
    expected_meta_trace = combined(jacobian(lambda e: run(e)[1], zero)[blocks_, :, blocks_], gamma)
    assert relative_error(flat(optimizer.state[p]["trace"] for p in params), expected_trace) < 1e-8
    assert relative_error(meta_state(optimizer, params, blocks, "meta_trace"), expected_meta_trace) < 1e-8
    if approx == "2x2" and meta == "sgd":  # Y moves away from 1 only through H^T Hess H
        assert (expected_meta_trace - 1).abs().max() > 1e-4


def test_l_approximation_keeps_y_at_one_and_2x2_moves_it():
    _, l_optimizer, _ = optimizer_run("sgd", "scalar", "l", meta_lr=0.5)
    _, optimizer, _ = optimizer_run("sgd", "scalar", "2x2", meta_lr=0.5)
    assert l_optimizer.param_groups[0]["meta_trace"].item() == 1.0
    assert optimizer.param_groups[0]["meta_trace"].item() != 1.0


# -- as a torch optimizer ---------------------------------------------------------------------


def test_missing_closure_is_a_clear_error():
    params = [nn.Parameter(w.clone()) for w in initial_weights()]
    optimizer = MetaOptimize(params, "sgd", "sgd", approx="2x2")
    loss_at(params, 0).backward()
    with pytest.raises(ValueError, match=r"step\(closure\).*create_graph=True"):
        optimizer.step()


def test_closure_without_create_graph_is_a_clear_error():
    params = [nn.Parameter(w.clone()) for w in initial_weights()]
    optimizer = MetaOptimize(params, "sgd", "sgd", approx="l")

    def closure():
        optimizer.zero_grad()
        loss = loss_at(params, 0)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="create_graph=True"):
        optimizer.step(closure)


def test_hvp_blocks_cannot_change_after_the_first_step():
    """With hessian="hvp" the trace has one column per block: a param group added later (a new
    block) is refused at the next step, naming why, instead of mixing traces of two widths."""
    params = [nn.Parameter(w.clone()) for w in initial_weights()]
    optimizer = MetaOptimize([{"params": params[:2]}], "sgd", "sgd", "param_group", approx="l")
    optimizer.step(closure_for(optimizer, params, 0))
    assert optimizer.state[params[0]]["trace"].shape == params[0].shape
    optimizer.add_param_group({"params": params[2:]})
    with pytest.raises(RuntimeError, match="1 columns, not 2.*cannot change after the first step"):
        optimizer.step(closure_for(optimizer, params, 1))


def test_gamma_zero_needs_no_hessian_and_no_closure():
    params = [nn.Parameter(w.clone()) for w in initial_weights()]
    optimizer = MetaOptimize(params, "adamw", "adam", approx="2x2", gamma=0.0, meta_lr=0.01)
    loss_at(params, 0).backward()
    optimizer.step()
    assert all(torch.isfinite(optimizer.state[p]["trace"]).all() for p in params)


def test_step_frees_the_double_backward_graph():
    """After step() the gradients hold no graph (it would keep the parameters in a reference cycle)."""
    params, _, _ = optimizer_run("adamw", "scalar", "2x2")
    assert all(p.grad.grad_fn is None for p in params)


@pytest.mark.parametrize(
    "blocks,approx,error",
    [
        ("scalar", "exact", "unknown approx 'exact'"),
        ("weightwise", Approximation("2x2", hessian="hvp"), "one per weight.*hessian='diagonal'"),
        ("scalar", Approximation("hessian_free", clip_trace=True), "apply to Approximation"),
        ("scalar", Approximation("2x2", hessian="hessian"), "unknown hessian"),
        ("scalar", Approximation("l", clip_trace=True), "needs hessian='diagonal'"),
        ("scalar", Approximation("2x2", meta_first=True), "meta_first=True is defined for the L"),
    ],
)
def test_unsupported_combinations_name_the_fix(blocks, approx, error):
    params = [nn.Parameter(w.clone()) for w in initial_weights()]
    with pytest.raises(ValueError, match=error):
        MetaOptimize(params, "sgd", "sgd", blocks, approx=approx)


def test_hessian_diagonal_needs_the_diagonal_approximation():
    params = [nn.Parameter(w.clone()) for w in initial_weights()]
    for approx in ("hessian_free", "2x2"):
        optimizer = MetaOptimize(params, "sgd", "sgd", "scalar", approx=approx)
        loss_at(params, 0).backward()
        with pytest.raises(ValueError, match="hessian_diagonal"):
            optimizer.step(hessian_diagonal={p: torch.ones_like(p) for p in params})


def test_checkpoint_resume_is_bit_identical_and_remembers_the_approximation(tmp_path):
    def make():
        params = [nn.Parameter(w.clone()) for w in initial_weights()]
        return params, MetaOptimize(params, "adamw", "adam", "layerwise", approx="2x2", alpha0=0.03, meta_lr=0.05)

    params, optimizer = make()
    for t in range(6):
        optimizer.step(closure_for(optimizer, params, t))
    resumed_params, resumed = make()
    for t in range(3):
        resumed.step(closure_for(resumed, resumed_params, t))
    torch.save({"params": [p.detach() for p in resumed_params], "optimizer": resumed.state_dict()}, tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt")
    resumed_params, resumed = make()
    with torch.no_grad():
        for p, saved in zip(resumed_params, checkpoint["params"]):
            p.copy_(saved)
    resumed.load_state_dict(checkpoint["optimizer"])
    for t in range(3, 6):
        resumed.step(closure_for(resumed, resumed_params, t))
    assert all(torch.equal(p, q) for p, q in zip(params, resumed_params))
    hessian_free = MetaOptimize(make()[0], "adamw", "adam", "layerwise")
    with pytest.raises(ValueError, match="2x2"):
        hessian_free.load_state_dict(checkpoint["optimizer"])


def test_a_custom_rule_gets_the_exact_trace_without_derivations():
    """A base written only as a pure ``direction`` (here: sgdm under another name) is differentiated
    by forward mode: its traces equal those of the built-in sgdm."""
    from metaopt.rules import RULES, Rule

    sgdm = RULES["sgdm"]
    custom = Rule(sgdm.hyperparameters, sgdm.moment_names, sgdm.direction, weight_decay=sgdm.weight_decay)  # no foreach kernel, no derivation
    runs = []
    for base in ("sgdm", custom):
        params = [nn.Parameter(w.clone()) for w in initial_weights()]
        optimizer = MetaOptimize(params, base, "adam", "scalar", approx="2x2", alpha0=0.3, meta_lr=0.05, momentum=0.9)
        for t in range(STEPS):
            optimizer.step(closure_for(optimizer, params, t))
        runs.append(flat(optimizer.state[p]["trace"] for p in params))
    assert torch.equal(runs[0], runs[1])
