r"""MetaOptimize with the Hessian kept: the L and 2x2 approximations (docs/algorithm.md, the paper's eq. 13-17).

The Hessian-free step of :mod:`metaopt.kernels` drops every term of the trace update that
involves the Hessian of the loss. This module keeps them. The base optimizer's state is
``x = (w, m, v, ...)`` (the weights and the base rule's moments), the meta optimizer's state is
``y = (beta, mbar, vbar, ...)``. Their sensitivities to past step sizes are carried as traces
(eq. 12-13), one per state tensor:

* ``X = (H, X^m, X^v, ...)``: ``H``, the trace of the weights, is ``state[p]["trace"]``; the
  traces of the base moments are ``state[p]["trace_exp_avg"]``, ``state[p]["trace_exp_avg_sq"]``.
* ``Y = (Y^beta, Y^mbar, ...)``: ``meta_trace``, ``meta_trace_exp_avg``, ... beside each block's
  ``beta`` (``Y^beta`` starts at the identity, the rest at zero; Algorithm 1).

One step is eq. 15 with the blocks of G that the approximation keeps. With ``F(x, g, beta)``
one base step, ``M(y, z)`` one meta step, ``g`` the gradient, ``z = H^T g`` the meta-gradient
and ``Hess`` the Hessian of this step's loss::

    b  = gamma * Y^beta + (1 - gamma) * I                       (B of eq. 46: how beta_t moves)
    X <- dF/dx (gamma X) + dF/dg Hess (gamma H) + dF/dbeta b
    Y <- dM/dy (gamma Y + (1 - gamma) [I; 0]) + dM/dz H^T Hess (gamma H)

The last term is the block dy/dx of G; the L-approximation (eq. 16-17) drops it, the 2x2
approximation keeps it. Both drop Q, the trace of the trace (the last row and column of G):
its update needs third derivatives of the loss. With ``gamma = 1`` and ``meta_lr = 0`` nothing
is dropped and ``H_t`` is exactly ``d w_t / d beta`` of the training run (tests/metaopt/test_exactness.py).

Every product ``dF/d(.) @ tangent`` is computed by automatic differentiation of ``F`` and ``M``
written as pure functions of the rules' ``direction`` (:mod:`metaopt.rules`): nothing is derived
by hand per base or meta rule, so a custom :class:`~metaopt.rules.Rule` gets the same treatment.
The rules act weight by weight, so every block of G is diagonal (the ``[.]`` matrices of
Appendix A): one backward pass per output of ``F`` with a vector of ones gives the diagonals, and
the traces, every column at once, are multiplied by them. (Forward mode, ``torch.func.jvp`` with
the traces as tangents, computes the same numbers, but torch 2.14 runs every op with a
Python-number operand through a slow Python fallback there.) A custom rule
must be elementwise too. ``Hess @ v`` is a Hessian-vector product: a second backward pass through
the gradients that the closure built with ``loss.backward(create_graph=True)``.

With ``m`` step-size blocks ``H`` is an ``n x m`` matrix: once the Hessian couples the weights,
one block's step size moves every weight. ``hessian="hvp"`` keeps the ``m`` columns
(``state[p]["trace"]`` gains a leading dimension of size ``m`` when ``m > 1``; ``Y^beta`` is
``m x m``, one row per block) and costs ``m`` Hessian-vector products a step: the choice for
scalar, param-group and layerwise step sizes. ``hessian="diagonal"`` replaces the Hessian by its
diagonal, so column ``b`` of ``H`` stays on block ``b``'s weights and one tensor per state holds
every column, as in the Hessian-free algorithm: the choice for nodewise and weightwise step sizes.
The diagonal is what ``step(hessian_diagonal={p: ...})`` passes when it is known (``x**2`` for
linear least squares, as in IDBD); otherwise Hutchinson's estimate ``u * (Hess u)``, with a new
random sign vector ``u`` (global RNG) every step. The diagonal route assumes an elementwise base
rule (every built-in rule is).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from metaopt.granularity import GRANULARITIES

KINDS = ("hessian_free", "l", "2x2")
HESSIANS = ("hvp", "diagonal")


class Approximation(NamedTuple):
    """Which terms of the trace update MetaOptimize keeps, and the options the special cases need.

    ``MetaOptimize(approx="l")`` is ``Approximation("l")``; build one to set the rest.

    Attributes:
        kind: ``"hessian_free"`` (Algorithm 3, the default), ``"l"`` (eq. 16-17) or ``"2x2"``
            (eq. 15 without Q).
        hessian: how the Hessian term is formed for ``l`` and ``2x2``: ``"hvp"`` (one
            Hessian-vector product per step-size block) or ``"diagonal"``; ``None`` picks ``"hvp"``
            for scalar, param_group and layerwise blocks and ``"diagonal"`` for nodewise and weightwise.
        clip_trace: clip the factor by which the trace of the weights decays at zero, IDBD's
            rectifier ``(1 - alpha x^2)^+`` (``hessian="diagonal"`` only).
        meta_first: update the step sizes before the base step, with this step's meta-gradient,
            and step with the new ones, as IDBD and hypergradient descent do (``kind="l"`` only).
            The default updates them after, with the step sizes of the base step.
        additive: step sizes are ``lr * beta`` (sigma = identity of eq. 3, hypergradient descent)
            instead of ``lr * exp(beta)``; ``beta`` starts at ``alpha0``.
    """

    kind: str = "hessian_free"
    hessian: str | None = None
    clip_trace: bool = False
    meta_first: bool = False
    additive: bool = False

    def sigma(self, beta: Tensor) -> Tensor:
        """``sigma(beta)`` of eq. 3: the step size a block's ``beta`` stands for (before ``lr``)."""
        return beta if self.additive else torch.exp(beta)

    def initial_beta(self, alpha0: float | Tensor) -> float | Tensor:
        if self.additive:
            return alpha0
        return alpha0.log() if isinstance(alpha0, torch.Tensor) else math.log(alpha0)


def resolve(approx: str | Approximation, granularity: str) -> Approximation:
    """The :class:`Approximation` that ``approx`` names, with ``hessian`` filled in; ValueError when
    the combination is not supported, naming what to change."""
    if isinstance(approx, str):
        if approx not in KINDS:
            raise ValueError(f"unknown approx {approx!r}: approx must be one of {list(KINDS)} or a metaopt.hessian.Approximation")
        approx = Approximation(approx)
    if not isinstance(approx, Approximation):
        raise ValueError(f"approx must be one of {list(KINDS)} or a metaopt.hessian.Approximation, got {approx!r}")
    if approx.kind not in KINDS:
        raise ValueError(f"unknown Approximation kind {approx.kind!r}: kind must be one of {list(KINDS)}")
    if approx.kind == "hessian_free":
        if approx != Approximation():
            raise ValueError(
                "hessian, clip_trace, meta_first and additive apply to Approximation('l') and Approximation('2x2'), "
                "not to the Hessian-free algorithm"
            )
        return approx
    if approx.hessian is None:
        approx = approx._replace(hessian="hvp" if GRANULARITIES[granularity].few_blocks else "diagonal")
    if approx.hessian not in HESSIANS:
        raise ValueError(f"unknown hessian {approx.hessian!r}: hessian must be one of {list(HESSIANS)}")
    if approx.hessian == "hvp" and not GRANULARITIES[granularity].few_blocks:
        raise ValueError(
            f"approx={approx.kind!r} with hessian='hvp' needs one Hessian-vector product per step-size block, "
            f"one per {'weight' if granularity == 'weightwise' else 'output unit'} with blocks={granularity!r}: "
            f"use hessian='diagonal' (the default for {granularity!r})"
        )
    if approx.clip_trace and approx.hessian != "diagonal":
        raise ValueError("clip_trace=True clips the diagonal decay factor of the trace: it needs hessian='diagonal'")
    if approx.meta_first and approx.kind != "l":
        raise ValueError("meta_first=True is defined for the L-approximation: use Approximation('l', meta_first=True)")
    return approx


# -- the two pure functions whose derivatives are the trace updates -----------------------


def _base_step(inputs, *, rule, hp, step, lr, weight_decay, approx):
    """``F``: one base step of one tensor, ``w - alpha (d(g) + kappa w)``, and the new moments."""
    d, moments = rule.direction(inputs["g"], {name: inputs[name] for name in rule.moment_names}, hp, step)
    alpha = lr * approx.sigma(inputs["beta"])
    return {"w": inputs["w"] - alpha * (d + weight_decay * inputs["w"]), **moments}


def _meta_step(inputs, *, rule, hp, step, meta_lr, meta_weight_decay):
    """``M``: one meta step of one block's ``beta``, ``(1 - eta kappa_bar) beta - eta d(z)``, and the new moments."""
    u, moments = rule.direction(inputs["z"], {name: inputs[name] for name in rule.moment_names}, hp, step)
    return {"beta": (1 - meta_lr * meta_weight_decay) * inputs["beta"] - meta_lr * u, **moments}


class _SqrtWithZeroSlopeAtZero(TorchFunctionMode):
    """``sqrt`` whose derivative at 0 is 0 instead of infinity, while the steps are differentiated.

    The normaliser ``v`` of rmsprop and adam is 0 only where the input has been exactly 0 since
    the start, and then its tangent is 0 too: the chain rule would give 0 * inf = nan for a term
    whose true value is 0 (at the first meta step, where z = 0, for the whole of dbeta'/dbeta).
    Values are unchanged; a custom rule that takes ``sqrt`` gets the same treatment."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.sqrt or func is Tensor.sqrt:
            (x,) = args
            positive = x > 0
            return torch.where(positive, torch.where(positive, x, 1).sqrt(), 0)
        return func(*args, **(kwargs or {}))


def _step_and_partials(function: Callable, inputs: dict[str, Tensor]):
    """The outputs of an elementwise step and the diagonals of its Jacobian blocks,
    ``partials[output][input]``: one backward pass per output, with a vector of ones."""
    with torch.enable_grad(), _SqrtWithZeroSlopeAtZero():
        leaves = {name: x.detach().requires_grad_() for name, x in inputs.items()}
        outputs = function(leaves)
        partials = {}
        for name, output in outputs.items():
            diagonals = torch.autograd.grad(
                output, list(leaves.values()), torch.ones_like(output), retain_graph=True, materialize_grads=True
            )
            partials[name] = dict(zip(leaves, diagonals))
    return {name: output.detach() for name, output in outputs.items()}, partials


def _push_forward(partials: dict[str, dict[str, Tensor]], tangents: dict[str, Tensor]) -> dict[str, Tensor]:
    """``d output = sum over inputs of partial * d input``, every column at once (dimension 0 of the tangents)."""
    return {output: sum(row[name] * tangent for name, tangent in tangents.items()) for output, row in partials.items()}


# -- the step --------------------------------------------------------------------------


class Param(NamedTuple):
    """A parameter with a gradient, as :func:`step` takes it."""

    param: Tensor
    state: dict[str, Any]  # step, trace (``columns`` first with hessian="hvp"), base moments; their traces added here
    block: int  # the index of its step-size block in the list of blocks
    view_shape: tuple[int, ...]  # the shape of the block's beta broadcast over the parameter


class StepSizeBlock(NamedTuple):
    """Weights that share a step size, as :func:`step` takes them."""

    state: dict[str, Any]  # beta, meta_step, the meta moments; the meta traces are added here
    group: dict[str, Any]  # the param group it takes gamma and its meta hyper-parameters from


class _Block(NamedTuple):
    state: dict[str, Any]
    group: dict[str, Any]
    column: int  # its column of H (hessian="hvp"); 0 with hessian="diagonal"


def trace_columns(approx: Approximation, blocks: int) -> int:
    """The number of columns of the trace ``H``: one per step-size block with ``hessian="hvp"``, else 1."""
    return blocks if approx.hessian == "hvp" else 1


def step(
    approx: Approximation,
    groups: list[tuple[dict[str, Any], list[Param]]],
    step_size_blocks: list[StepSizeBlock],
    *,
    base_rule,
    meta_rule,
    closure_given: bool,
    hessian_diagonal: dict[Tensor, Tensor] | None,
) -> None:
    """One MetaOptimize step of kind ``"l"`` or ``"2x2"`` (see the module doc).

    Args:
        approx: the approximation, with ``hessian`` resolved (:func:`resolve`).
        groups: each param group (its hyper-parameters) with its parameters that have a gradient;
            with ``hessian="hvp"`` the closure built those gradients with ``create_graph=True``.
        step_size_blocks: every block (a block's column of ``H`` exists whether or not its
            weights have a gradient this step), each with its ``beta`` and meta moments created.
        base_rule, meta_rule: the :class:`~metaopt.rules.Rule` of the base and meta updates.
        closure_given: whether ``step`` had a closure (for the error when no gradient has a graph).
        hessian_diagonal: ``{p: diagonal of the Hessian}`` for ``hessian="diagonal"``, when known.
    """
    entries = [(param, group) for group, params in groups for param in params]
    if not entries:
        return
    columns = trace_columns(approx, len(step_size_blocks))
    blocks = [_Block(block.state, block.group, index if approx.hessian == "hvp" else 0)
              for index, block in enumerate(step_size_blocks)]
    _init_traces(entries, blocks, columns, base_rule.moment_names, meta_rule.moment_names)

    # Hess @ (gamma H), before any tensor of the graph changes. gamma = 0 needs none.
    keep_hessian = any(group["gamma"] != 0 for group, _ in groups)
    if hessian_diagonal is not None and approx.hessian != "diagonal":
        raise ValueError(f"hessian_diagonal is used by hessian='diagonal'; this optimizer has hessian={approx.hessian!r}")
    if keep_hessian:
        products, diagonals = _hessian_products(approx, entries, columns, closure_given, hessian_diagonal)
    else:
        products = {param.param: torch.zeros((columns, *param.param.shape), dtype=param.param.dtype,
                                             device=param.param.device) for param, _ in entries}
        diagonals = {param.param: torch.zeros_like(param.param) for param, _ in entries}
    for param, _ in entries:
        p = param.param
        if p.grad.grad_fn is not None:
            p.grad = p.grad.detach()  # frees the graph: it holds the parameters (a reference cycle otherwise)

    z, z_tangent = _meta_gradients(approx, entries, blocks, columns, products)
    if approx.meta_first:
        _meta_updates(meta_rule, blocks, columns, z, z_tangent)
    directions = [_beta_direction(block, columns) for block in blocks]
    for group, params in groups:
        if params:
            _base_update(approx, base_rule, group, params, blocks, directions, products, diagonals, columns)
    if not approx.meta_first:
        _meta_updates(meta_rule, blocks, columns, z, z_tangent)


def _meta_gradients(approx: Approximation, entries, blocks: list[_Block], columns: int, products):
    """Meta-gradient z = H^T g and, for the 2x2 approximation, its tangent H^T Hess (gamma H),
    per block (shape of beta) and per column (leading dimension), with the traces before the step."""
    z: dict[int, Tensor] = {}
    z_tangent: dict[int, Tensor] = {}
    if approx.hessian == "hvp":  # z[b] = H[:, b] . g over every weight; z_tangent[b, j] = H[:, b] . Hess (gamma H[:, j])
        traces = [param.state["trace"].reshape(columns, -1) for param, _ in entries]
        z_all = sum(trace @ param.param.grad.reshape(-1) for trace, (param, _) in zip(traces, entries))
        for index, block in enumerate(blocks):
            z[index] = z_all[block.column]
        if approx.kind == "2x2":
            z_tangent_all = sum(trace @ products[param.param].reshape(columns, -1).T for trace, (param, _) in zip(traces, entries))
            for index, block in enumerate(blocks):
                z_tangent[index] = z_tangent_all[block.column]
    else:  # every column of H lives on its own block: sums over the block's weights
        for param, _ in entries:
            shape = blocks[param.block].state["beta"].shape
            trace = param.state["trace"]
            z[param.block] = z.get(param.block, 0) + (trace * param.param.grad).sum_to_size(param.view_shape).reshape(shape)
            if approx.kind == "2x2":
                row = (trace.unsqueeze(0) * products[param.param]).sum_to_size((1, *param.view_shape)).reshape(1, *shape)
                z_tangent[param.block] = z_tangent.get(param.block, 0) + row
    return z, z_tangent


def _init_traces(entries, blocks: list[_Block], columns: int, base_moments, meta_moments) -> None:
    """The traces of the base moments beside each parameter's trace, and the traces of each
    block's beta (``Y^beta``: a row of the identity) and meta moments, at their first step."""
    for param, _ in entries:
        state = param.state
        if state["trace"].numel() != columns * param.param.numel():
            raise RuntimeError(
                f"the trace of a parameter has {state['trace'].numel() // param.param.numel()} columns, not {columns}: "
                "with hessian='hvp' the step-size blocks cannot change after the first step"
            )
        for name in base_moments:
            if f"trace_{name}" not in state:
                state[f"trace_{name}"] = torch.zeros_like(state["trace"])
    for block in blocks:
        if "meta_trace" in block.state:
            continue
        beta = block.state["beta"]
        if columns > 1:  # hessian="hvp": row `column` of the m x m identity
            trace = torch.zeros(columns, dtype=beta.dtype, device=beta.device)
            trace[block.column] = 1
        else:
            trace = torch.ones_like(beta)
        block.state["meta_trace"] = trace
        for name in meta_moments:
            block.state[f"meta_trace_{name}"] = torch.zeros_like(trace)


def _hessian_products(approx: Approximation, entries, columns: int, closure_given: bool, hessian_diagonal):
    """``Hess @ (gamma H)`` of every parameter, shape ``(columns, *p.shape)``, and the Hessian
    diagonal used (``hessian="diagonal"``; zeros otherwise)."""
    params = [param.param for param, _ in entries]
    traces = [param.state["trace"] for param, _ in entries]
    gammas = [group["gamma"] for _, group in entries]
    if approx.hessian == "diagonal" and hessian_diagonal is not None:
        missing = [i for i, p in enumerate(params) if p not in hessian_diagonal]
        if missing:
            raise ValueError(f"hessian_diagonal has no entry for {len(missing)} parameter(s) with a gradient: pass a tensor for every one")
        diagonals = {p: hessian_diagonal[p].to(p.dtype).expand_as(p) for p in params}
    else:
        graphed = [p for p in params if p.grad.grad_fn is not None]
        if not graphed:
            what = f"approx={approx.kind!r} (hessian={approx.hessian!r}) keeps the Hessian term and needs Hessian-vector products"
            if not closure_given:
                raise ValueError(f"{what}: call step(closure) with a closure that calls loss.backward(create_graph=True)")
            raise RuntimeError(f"{what}: the closure passed to step() must call loss.backward(create_graph=True)")
        if approx.hessian == "hvp":
            vectors = [
                [gamma * trace.view(columns, *p.shape)[column] for p, trace, gamma in zip(params, traces, gammas)]
                for column in range(columns)
            ]
            per_column = [_hessian_vector_product(params, graphed, v, last=c == columns - 1) for c, v in enumerate(vectors)]
            products = {p: torch.stack([column[i] for column in per_column]) for i, p in enumerate(params)}
            return products, {p: torch.zeros_like(p) for p in params}
        signs = [torch.empty_like(p).bernoulli_(0.5).mul_(2).sub_(1) for p in params]  # Hutchinson's probe
        products = _hessian_vector_product(params, graphed, signs, last=True)
        diagonals = {p: u * hu for p, u, hu in zip(params, signs, products)}
    products = {p: (diagonals[p] * gamma * trace).view(1, *p.shape) for p, trace, gamma in zip(params, traces, gammas)}
    return products, diagonals


def _hessian_vector_product(params, graphed, vectors, *, last):
    """``Hess @ v`` by a second backward pass: the gradient of ``g . v`` (gradients without a graph
    are constants: their rows of the Hessian are zero)."""
    index = {p: i for i, p in enumerate(params)}
    with torch.enable_grad():
        products = torch.autograd.grad(
            [p.grad for p in graphed],
            params,
            grad_outputs=[vectors[index[p]] for p in graphed],
            retain_graph=not last,
            allow_unused=True,
        )
    return [torch.zeros_like(p) if hv is None else hv for p, hv in zip(params, products)]


def _beta_direction(block: _Block, columns: int) -> Tensor:
    """``b = gamma Y^beta + (1 - gamma) I``, the row of the block: how its beta moves per column,
    shape ``(columns, *beta.shape)``."""
    gamma = block.group["gamma"]
    beta = block.state["beta"]
    trace = block.state["meta_trace"].view(columns, *beta.shape)
    identity = torch.zeros_like(trace)
    identity[block.column] = 1
    return gamma * trace + (1 - gamma) * identity


def _side_by_side(tensors: list[Tensor], columns: int | None = None) -> Tensor:
    """The tensors of one param group (or meta group) side by side: one vector, or a
    ``(columns, n)`` matrix for traces."""
    if columns is None:
        return torch.cat([t.reshape(-1) for t in tensors])
    return torch.cat([t.reshape(columns, -1) for t in tensors], dim=1)


def _split_like(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """The inverse of :func:`_side_by_side`: one tensor per entry of ``like``, shaped like it."""
    columns = flat.shape[0] if flat.dim() == 2 else 1
    sizes = [t.numel() // columns for t in like]
    return [chunk.reshape(t.shape) for chunk, t in zip(torch.split(flat, sizes, dim=-1), like)]


def _base_update(approx: Approximation, rule, group, entries: list[Param], blocks, directions, products, diagonals, columns):
    """Base step of one param group and the update of its traces,
    ``X <- dF/dx (gamma X) + dF/dg Hess (gamma H) + dF/dbeta b``.

    The group's tensors go side by side in one vector: the rules act weight by weight, so one
    differentiation of the step serves them all."""
    params = [param.param for param in entries]
    states = [param.state for param in entries]
    gamma = group["gamma"]
    betas, beta_directions = [], []
    for param in entries:
        p, view_shape = param.param, param.view_shape
        betas.append(blocks[param.block].state["beta"].view(view_shape).expand_as(p))
        # b, per column, broadcast to the block's weights
        b = directions[param.block].reshape((columns,) + (1,) * (p.dim() - len(view_shape)) + tuple(view_shape))
        beta_directions.append(b.expand(columns, *p.shape))
    for state in states:
        state["step"] += 1
    base_step = partial(
        _base_step,
        rule=rule,
        hp={key: group[key] for key in rule.hyperparameters},
        step=_side_by_side([state["step"].expand_as(p) for p, state in zip(params, states)]),
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        approx=approx,
    )
    inputs = {
        "w": _side_by_side([p.detach() for p in params]),
        "g": _side_by_side([p.grad for p in params]),
        "beta": _side_by_side(betas),
        **{name: _side_by_side([state[name] for state in states]) for name in rule.moment_names},
    }
    outputs, partials = _step_and_partials(base_step, inputs)
    traces = _side_by_side([state["trace"] for state in states], columns)
    tangents = {
        "w": gamma * traces,
        "g": _side_by_side([products[p] for p in params], columns),
        "beta": _side_by_side(beta_directions, columns),
        **{name: gamma * _side_by_side([state[f"trace_{name}"] for state in states], columns) for name in rule.moment_names},
    }
    new_traces = _push_forward(partials, tangents)
    if approx.clip_trace:
        # The new trace is A * trace + (the rest), with A = gamma (dF/dw + dF/dg diag(Hess));
        # IDBD's rectifier replaces A by max(A, 0).
        decay = gamma * (partials["w"]["w"] + partials["w"]["g"] * _side_by_side([diagonals[p] for p in params]))
        new_traces["w"] = new_traces["w"] + torch.relu(-decay) * traces
    for p, value in zip(params, _split_like(outputs["w"], params)):
        p.copy_(value)
    for name, key in [("w", "trace")] + [(name, f"trace_{name}") for name in rule.moment_names]:
        for state, value in zip(states, _split_like(new_traces[name], [state[key] for state in states])):
            state[key].copy_(value)
    for name in rule.moment_names:
        for state, value in zip(states, _split_like(outputs[name], [state[name] for state in states])):
            state[name].copy_(value)


def _meta_updates(rule, blocks: list[_Block], columns: int, z, z_tangent) -> None:
    """Meta step of every block with a meta-gradient and the update of its traces,
    ``Y <- dM/dy (gamma Y + (1 - gamma) [I; 0]) + dM/dz H^T Hess (gamma H)``, one meta group
    at a time on its blocks side by side."""
    by_group: dict[int, list[tuple[int, _Block]]] = {}
    for key, block in enumerate(blocks):
        if key in z:
            by_group.setdefault(id(block.group), []).append((key, block))
    for entries in by_group.values():
        group = entries[0][1].group
        gamma = group["gamma"]
        states = [block.state for _, block in entries]
        betas = [state["beta"] for state in states]
        for state in states:
            state["meta_step"] += 1
        meta_step = partial(
            _meta_step,
            rule=rule,
            hp={name: group[f"meta_{name}"] for name in rule.hyperparameters},
            step=_side_by_side([state["meta_step"].expand_as(beta) for state, beta in zip(states, betas)]),
            meta_lr=group["meta_lr"],
            meta_weight_decay=group["meta_weight_decay"],
        )
        inputs = {
            "beta": _side_by_side(betas),
            "z": _side_by_side([z[key].to(beta.dtype) for (key, _), beta in zip(entries, betas)]),
            **{name: _side_by_side([state[f"meta_{name}"] for state in states]) for name in rule.moment_names},
        }
        outputs, partials = _step_and_partials(meta_step, inputs)
        meta_gradient_tangents = [  # the L-approximation drops dM/dz H^T Hess H
            z_tangent[key].to(beta.dtype) if key in z_tangent else torch.zeros((columns, beta.numel()), dtype=beta.dtype, device=beta.device)
            for (key, _), beta in zip(entries, betas)
        ]
        tangents = {
            "beta": _side_by_side([_beta_direction(block, columns) for _, block in entries], columns),
            "z": _side_by_side(meta_gradient_tangents, columns),
            **{name: gamma * _side_by_side([s[f"meta_trace_{name}"] for s in states], columns) for name in rule.moment_names},
        }
        new_traces = _push_forward(partials, tangents)
        for name, key in [("beta", "beta")] + [(name, f"meta_{name}") for name in rule.moment_names]:
            for state, value in zip(states, _split_like(outputs[name], [state[key] for state in states])):
                state[key].copy_(value)
        for name, key in [("beta", "meta_trace")] + [(name, f"meta_trace_{name}") for name in rule.moment_names]:
            for state, value in zip(states, _split_like(new_traces[name], [state[key] for state in states])):
                state[key].copy_(value)
