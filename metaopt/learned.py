r"""Hyper-parameters learned beyond the step sizes: ``MetaOptimize(..., learn=("step_size", "weight_decay", ...))``.

Each learned hyper-parameter :math:`k` is a function of an unconstrained :math:`b_k`, one per block as the
step sizes are: a positive one (``weight_decay`` :math:`\kappa`, ``eps`` :math:`\epsilon`) is
:math:`e^{b_k}`, one in (0, 1) (``momentum`` :math:`\rho`, ``normalizer`` :math:`\lambda`) is
:math:`\mathrm{sigmoid}(b_k)`. With the base state :math:`x = (w, \text{moments})` and the base update
:math:`x \leftarrow F(x, g, \text{hyper-parameters})` of the rules, its trace :math:`X_k` of
:math:`dx/db_k` (the weights' part, and the part of each moment that :math:`k` enters directly) is carried
with the gradient held constant (Hessian-free):

.. math::
    X_k \leftarrow \gamma \, J_x F \cdot X_k + \partial F / \partial b_k

and the meta-gradient of block :math:`b` is :math:`z_{k,b} = \sum_{i \in b} X_{k,i} g_i` with the trace
from before the step; the meta rule updates every :math:`b_k` with its own meta state. The step size's
trace is the :math:`k = \text{step\_size}` case (the moments do not depend on it).

Storage and arithmetic are apart, as in the rest of the library:

* :func:`build`: for every learned hyper-parameter other than the step size, the segments of a
  :class:`metaopt.plan.Plan` over its own traces and blocks (``state[p]["trace_<k>"]``,
  ``state[p]["trace_<k>_<moment>"]``; per block ``beta_<k>`` and ``meta_<moment>_<k>``, counted by the
  step size's ``meta_step``), built by :func:`metaopt.plan.build` itself on a view of the state, so that
  :func:`metaopt.hessian_free.step` drives them as it drives the step sizes: one step path.
* :func:`generic_update` (the ``reference`` kernel, and any rule): :func:`torch.func.jvp` of the pure
  update :math:`F` (tangents :math:`\gamma X_k` for the state, 0 for :math:`g`, :math:`d\,\mathrm{value}/db_k`
  for :math:`k`) gives the new state and every new trace, for any rule, including a user's own.
* :func:`fast_update` (``foreach``, ``flat``, ``compiled``): the traces written out by hand for the
  ``sgdm`` and ``adam`` rules, tested equal to the generic route; other rules take the generic one.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from metaopt import hyperparameters
from metaopt import plan as plans
from metaopt import rules


class Learned(NamedTuple):
    """A learned hyper-parameter other than the step size: its name, parametrisation and moment traces."""

    name: str
    parametrisation: str  # "log": value = exp(b); "logit": value = sigmoid(b)
    moments: tuple[str, ...]  # the base moments it enters directly, each with a trace of its own

    def value(self, b: Tensor) -> Tensor:
        """``exp(b)``, or ``sigmoid(b)`` kept one rounding step inside (0, 1): a saturated sigmoid would be
        exactly 1 in float32 past b = 17, and a momentum or normaliser of 1 divides its bias correction by 0."""
        if self.parametrisation == "log":
            return torch.exp(b)
        eps = torch.finfo(b.dtype).eps
        return torch.sigmoid(b).clamp(eps, 1 - eps)

    def initial_b(self, value: float) -> float:
        return math.log(value) if self.parametrisation == "log" else math.log(value / (1 - value))

    def scale(self, value: Tensor) -> Tensor:
        """``d value / d b`` at ``value``."""
        return value if self.parametrisation == "log" else value * (1 - value)

    def trace_key(self, moment: str | None = None) -> str:
        return f"trace_{self.name}" if moment is None else f"trace_{self.name}_{moment}"


def specs(learn: tuple[str, ...], base_rule: rules.Rule) -> tuple[Learned, ...]:
    """The learned hyper-parameters of ``learn`` beyond the step size (checked by :func:`metaopt.hyperparameters.check_learn`)."""
    kinds = hyperparameters.learnable(base_rule)
    moments_of = base_rule.moments_of or {}
    return tuple(
        Learned(name, kinds[name], () if name == "weight_decay" else moments_of.get(name, base_rule.moment_names))
        for name in learn if name != "step_size"
    )


# -- state ---------------------------------------------------------------------------------------


def init_states(params: list[Tensor], state, placements, param_groups: list[dict[str, Any]],
                owner_state: Callable[[Any], dict[str, Any]], learned: tuple[Learned, ...], meta_moment_names) -> None:
    """Each parameter's traces and each block's ``beta_<k>`` and meta moments, where missing; a block
    starts from its meta group's value of the hyper-parameter (``weight_decay=...`` and so on)."""
    for p in params:
        for spec in learned:
            for moment in (None, *spec.moments):
                state[p].setdefault(spec.trace_key(moment), torch.zeros_like(p, memory_format=torch.preserve_format))
        placement = placements[id(p)]
        owner = owner_state(placement.owner)
        like = owner["beta"]
        for spec in learned:
            if f"beta_{spec.name}" in owner:
                continue
            initial = spec.initial_b(param_groups[placement.meta_group][spec.name])
            owner[f"beta_{spec.name}"] = torch.full_like(like, initial)
            for moment in meta_moment_names:
                owner[f"meta_{moment}_{spec.name}"] = torch.zeros_like(like)


# -- the plan ------------------------------------------------------------------------------------


class LearnedPlan(NamedTuple):
    """The learned hyper-parameters' segments: ``segments[i]`` lists, for the step's ``i``-th segment,
    one :class:`metaopt.plan.TensorSegment` per learned hyper-parameter over the same parameters;
    ``meta_segments`` their blocks, updated after the step sizes' (whose counters count the step)."""

    learned: tuple[Learned, ...]
    segments: list[tuple]
    meta_segments: list[plans.MetaSegment]


def _state_view(state, spec: Learned, params: list[Tensor]) -> dict:
    """``state[p]`` as a segment of ``spec`` reads it: its trace as ``trace``, its moment traces as the moments."""
    return {p: {"trace": state[p][spec.trace_key()], "step": state[p]["step"],
                **{moment: state[p][spec.trace_key(moment)] for moment in spec.moments}} for p in params}


def _owner_view(owner: dict[str, Any], spec: Learned, meta_moment_names) -> dict[str, Any]:
    """A block's state as a meta segment of ``spec`` reads it: ``beta_<k>`` as ``beta`` and so on."""
    return {"beta": owner[f"beta_{spec.name}"], "meta_step": owner["meta_step"],
            **{f"meta_{moment}": owner[f"meta_{moment}_{spec.name}"] for moment in meta_moment_names}}


def build(context: plans.Context, groups: list[tuple[int, list[Tensor]]], key: Any, fresh: set[int],
          learned: tuple[Learned, ...]) -> LearnedPlan:
    """The segments of every learned hyper-parameter, per tensor, aligned with the step sizes' plan
    built from ``context`` without flat buffers; their block keys are ``(name, block)``."""
    per_spec, meta_segments = [], []
    params = [p for _, group_params in groups for p in group_params]
    for spec in learned:
        view = context._replace(
            state=_state_view(context.state, spec, params), flat=False, moment_names=spec.moments,
            owner_state=lambda owner, spec=spec: _owner_view(context.owner_state(owner), spec, context.meta_moment_names),
        )
        built = plans.build(view, groups, key, fresh, None)
        for segment in built.segments:
            segment.block_keys = [(spec.name, block) for block in segment.block_keys]
        per_spec.append(built.segments)
        # the step sizes' meta segments count the step: these read the same counters
        meta_segments += [meta._replace(keys=[(spec.name, block) for block in meta.keys], counters=[])
                          for meta in built.meta_segments]
    return LearnedPlan(learned, list(zip(*per_spec)), meta_segments)


class LearnedTensors(NamedTuple):
    """One learned hyper-parameter in a segment's update: its values (before the meta update, each
    broadcastable to its tensor), its traces and its moment traces (moment name -> list)."""

    spec: Learned
    values: list[Tensor]
    traces: list[Tensor]
    moments: dict[str, list[Tensor]]


def tensors(learned_plan: LearnedPlan, position: int, index: int, memo: dict) -> list[LearnedTensors]:
    """The learned hyper-parameters of the step's ``position``-th segment (param group ``index``),
    their values computed once per block and view in a step (``memo``, shared with the step sizes)."""
    result = []
    for spec, segment in zip(learned_plan.learned, learned_plan.segments[position]):
        def of(block, view_shape, b, spec=spec):
            memo_key = (block, index, view_shape)
            if memo_key not in memo:
                values = spec.value(b)
                memo[memo_key] = values.view(view_shape) if values.shape != view_shape else values
            return memo[memo_key]

        result.append(LearnedTensors(spec, segment.alphas(of), segment.traces, segment.moments))
    return result


# -- the arithmetic ------------------------------------------------------------------------------


def _drop_undefined(tangent: Tensor, primal: Tensor) -> Tensor:
    """A tangent entry that is NaN where its value is finite came from 0 * inf in the chain rule at a point
    where the rule is locally constant (the square root of a second moment that is still 0, as for a
    weight whose gradients have all been 0): its derivative is 0 there."""
    return torch.where(tangent.isnan() & ~primal.isnan(), 0.0, tangent)


def _update_function(rule: rules.Rule, g: Tensor, step: Tensor, fixed: dict[str, Any]) -> Callable:
    """The pure base update ``(w, moments, values) -> (w', moments')`` with ``values`` the learned
    hyper-parameters (``step_size`` among them) and ``fixed`` the others."""

    def update(w, moments, values):
        hp = {**fixed, **values}
        d, new_moments = rule.direction(g, moments, hp, step)
        return w - hp["step_size"] * (d + hp["weight_decay"] * w), new_moments

    return update


def _generic_one(w, g, h, moments, step, alpha, learned: list[tuple[Learned, Tensor, Tensor, dict]], *,
                 rule, hp, weight_decay, gamma) -> None:
    """:func:`generic_update` for one tensor: one :func:`torch.func.jvp` per learned hyper-parameter."""
    values = {"step_size": alpha, **{spec.name: value for spec, value, _, _ in learned}}
    fixed = {**hp, "weight_decay": weight_decay}
    update = _update_function(rule, g, step, fixed)
    directions = [(None, alpha, h, {}), *learned]
    results = []
    for spec, value, trace, moment_traces in directions:
        name, scale = ("step_size", alpha) if spec is None else (spec.name, spec.scale(value))  # d value / d b
        value_tangents = {key: scale if key == name else torch.zeros_like(other) for key, other in values.items()}
        moment_tangents = {key: gamma * moment_traces[key] if key in moment_traces else torch.zeros_like(m)
                           for key, m in moments.items()}
        (new_w, new_moments), (w_tangent, m_tangents) = torch.func.jvp(
            update, (w, moments, values), (gamma * trace, moment_tangents, value_tangents))
        results.append((trace, moment_traces, w_tangent, m_tangents))
    for trace, moment_traces, w_tangent, m_tangents in results:
        trace.copy_(_drop_undefined(w_tangent, new_w))
        for key, moment_trace in moment_traces.items():
            moment_trace.copy_(_drop_undefined(m_tangents[key], new_moments[key]))
    w.copy_(new_w)
    for key, m in moments.items():
        m.copy_(new_moments[key])


def _per_tensor(learned: list[LearnedTensors], i: int) -> list[tuple[Learned, Tensor, Tensor, dict]]:
    return [(item.spec, item.values[i], item.traces[i], {key: traces[i] for key, traces in item.moments.items()})
            for item in learned]


def _learned_hp(hp: dict[str, Any], weight_decay: Any, learned: list[tuple[Learned, Tensor, Tensor, dict]]):
    """The hyper-parameters of one tensor's update with the learned ones' values in place of the groups'."""
    values = {spec.name: value for spec, value, _, _ in learned}
    return {key: values.get(key, value) for key, value in hp.items()}, values.get("weight_decay", weight_decay)


def generic_update(params, grads, traces, moments, steps, step_sizes, learned: list[LearnedTensors], *,
                   rule, hp, weight_decay, gamma) -> None:
    """Base update, step-size trace and every learned trace by forward-mode differentiation of the rule
    (any rule), tensor by tensor; ``steps`` already count this step."""
    for i, (w, g) in enumerate(zip(params, grads)):
        mine = _per_tensor(learned, i)
        tensor_hp, tensor_weight_decay = _learned_hp(hp, weight_decay, mine)
        _generic_one(w, g, traces[i], {key: values[i] for key, values in moments.items()}, steps[i], step_sizes[i],
                     mine, rule=rule, hp=tensor_hp, weight_decay=tensor_weight_decay, gamma=gamma)


# The hand-derived traces, per rule: (w, g, h, moments, step, alpha, kappa, hp, learned, gamma) -> None


def _sgdm_one(w, g, h, moments, step, alpha, kappa, hp, learned, gamma) -> None:
    r"""SGDm: :math:`m' = \rho m + (1-\rho) g`, :math:`\Delta w = -\alpha (m' + \kappa w)`, with
    :math:`\delta = \gamma (1 - \alpha\kappa)`:
    :math:`X_\kappa \leftarrow \delta X_\kappa - \alpha\kappa w`,
    :math:`M_\rho \leftarrow \gamma\rho M_\rho + \rho(1-\rho)(m - g)`,
    :math:`X_\rho \leftarrow \delta X_\rho - \alpha M_\rho'` (the old ``w`` and ``m``, the new ``M_rho``)."""
    rho, m = hp["momentum"], moments["exp_avg"]
    decay = gamma * (1 - alpha * kappa)
    for spec, value, trace, moment_traces in learned:
        if spec.name == "weight_decay":
            trace.mul_(decay).sub_(alpha * kappa * w)
        elif spec.name == "momentum":
            momentum_trace = moment_traces["exp_avg"]
            momentum_trace.mul_(gamma * rho).add_(rho * (1 - rho) * (m - g))
            trace.mul_(decay).sub_(alpha * momentum_trace)
    m.mul_(rho).add_((1 - rho) * g)
    dw = -alpha * (m + kappa * w)
    w.add_(dw)
    h.mul_(decay).add_(dw)


def _adam_one(w, g, h, moments, step, alpha, kappa, hp, learned, gamma) -> None:
    r"""Adam(W): :math:`\hat m = m'/c_1`, :math:`\hat v = v'/c_2` (:math:`c_1 = 1-\rho^t`, :math:`c_2 = 1-\lambda^t`),
    :math:`s = \sqrt{\hat v} + \epsilon`, :math:`d = \hat m / s`, :math:`\Delta w = -\alpha (d + \kappa w)`,
    :math:`\delta = \gamma (1 - \alpha\kappa)`:
    :math:`X_\kappa \leftarrow \delta X_\kappa - \alpha\kappa w`;
    :math:`X_\epsilon \leftarrow \delta X_\epsilon + \alpha\epsilon d / s`;
    :math:`M_\rho \leftarrow \gamma\rho M_\rho + \rho(1-\rho)(m - g)`,
    :math:`X_\rho \leftarrow \delta X_\rho - \alpha (M_\rho'/c_1 + m' t \rho^t (1-\rho)/c_1^2) / s`;
    :math:`V_\lambda \leftarrow \gamma\lambda V_\lambda + \lambda(1-\lambda)(v - g^2)`,
    :math:`X_\lambda \leftarrow \delta X_\lambda + \alpha (d/s) (V_\lambda'/c_2 + v' t \lambda^t (1-\lambda)/c_2^2) / (2\sqrt{\hat v})`
    (0 where :math:`\hat v = 0`)."""
    rho, lam, eps = hp["momentum"], hp["normalizer"], hp["eps"]
    m, v = moments["exp_avg"], moments["exp_avg_sq"]
    by_name = {spec.name: (trace, moment_traces) for spec, _, trace, moment_traces in learned}
    decay = gamma * (1 - alpha * kappa)
    if "momentum" in by_name:
        by_name["momentum"][1]["exp_avg"].mul_(gamma * rho).add_(rho * (1 - rho) * (m - g))
    if "normalizer" in by_name:
        by_name["normalizer"][1]["exp_avg_sq"].mul_(gamma * lam).add_(lam * (1 - lam) * (v - g * g))
    if "weight_decay" in by_name:
        by_name["weight_decay"][0].mul_(decay).sub_(alpha * kappa * w)
    m.mul_(rho).add_((1 - rho) * g)
    v.mul_(lam).add_((1 - lam) * g * g)
    c1, c2 = 1 - rho**step, 1 - lam**step
    root = (v / c2).sqrt()
    s = root + eps
    d = (m / c1) / s
    if "eps" in by_name:
        by_name["eps"][0].mul_(decay).add_(alpha * eps * d / s)
    if "momentum" in by_name:
        trace, moment_traces = by_name["momentum"]
        m_hat_tangent = moment_traces["exp_avg"] / c1 + m * step * rho**step * (1 - rho) / (c1 * c1)
        trace.mul_(decay).sub_(alpha * m_hat_tangent / s)
    if "normalizer" in by_name:
        trace, moment_traces = by_name["normalizer"]
        v_hat_tangent = moment_traces["exp_avg_sq"] / c2 + v * step * lam**step * (1 - lam) / (c2 * c2)
        root_tangent = torch.where(root > 0, v_hat_tangent / (2 * root), 0.0)
        trace.mul_(decay).add_(alpha * d / s * root_tangent)
    dw = -alpha * (d + kappa * w)
    w.add_(dw)
    h.mul_(decay).add_(dw)


HAND_DERIVED: dict[Callable, tuple[Callable, frozenset[str]]] = {
    rules.sgdm_direction: (_sgdm_one, frozenset({"weight_decay", "momentum"})),
    rules.adam_direction: (_adam_one, frozenset({"weight_decay", "eps", "momentum", "normalizer"})),
}
"""A rule's pure direction -> its hand-derived update and the hyper-parameters it learns."""


def has_hand_derived(rule: rules.Rule, learned: tuple[Learned, ...]) -> bool:
    entry = HAND_DERIVED.get(rule.direction)
    return entry is not None and {spec.name for spec in learned} <= entry[1]


def fast_update(params, grads, traces, moments, steps, step_sizes, learned: list[LearnedTensors], *,
                rule, hp, weight_decay, gamma) -> None:
    """:func:`generic_update` with the traces written out by hand where :data:`HAND_DERIVED` has the rule
    (tensor by tensor; one fused graph per param group under ``kernel="compiled"``)."""
    if not has_hand_derived(rule, tuple(item.spec for item in learned)):
        generic_update(params, grads, traces, moments, steps, step_sizes, learned, rule=rule, hp=hp,
                       weight_decay=weight_decay, gamma=gamma)
        return
    one = HAND_DERIVED[rule.direction][0]
    for i, (w, g) in enumerate(zip(params, grads)):
        mine = _per_tensor(learned, i)
        tensor_hp, kappa = _learned_hp(hp, weight_decay, mine)
        one(w, g, traces[i], {key: values[i] for key, values in moments.items()}, steps[i], step_sizes[i], kappa,
            tensor_hp, mine, gamma)
