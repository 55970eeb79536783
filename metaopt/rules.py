"""Update directions shared by the base and the meta optimizer.

MetaOptimize runs two first-order optimizers: the *base* one moves the weights ``w``
along a direction computed from the gradient ``g``; the *meta* one moves the log step
sizes ``beta`` along a direction computed from the meta-gradient ``z`` (docs/algorithm.md).
Both are the same kind of rule, ``x -> d(x)``, with a few moments kept between steps,
so each rule is written once here and used by both (optax's ``scale_by_*`` idea):

================  =========================================================================
rule              direction ``d`` of an input ``x`` at step ``t`` (moments start at zero)
================  =========================================================================
``sgd``           ``d = x``
``sgdm``          ``m <- rho*m + (1-rho)*x``;  ``d = m``
``rmsprop``       ``v <- lambda*v + (1-lambda)*x^2``;  ``d = x / (sqrt(v / (1-lambda^t)) + eps)``
``adam``          ``m`` and ``v`` as above;  ``d = (m / (1-rho^t)) / (sqrt(v / (1-lambda^t)) + eps)``
``lion``          ``d = sign(c*m + (1-c)*x)`` with the old ``m``;  then ``m <- rho*m + (1-rho)*x``
================  =========================================================================

The authors' released code (``MetaOptimize(variant="released")``) uses three rules of its own,
with ``mu_t = (1-lambda) / (1-lambda^t)`` and ``eps`` (default 1e-10) inside the square root:

================  =========================================================================
``sgdm_delayed``  ``d = m`` with the old ``m``;  then ``m <- rho*m + (1-rho)*x``
``rmsprop_sum``   ``v <- lambda*v + x^2``;  ``d = x / sqrt(mu_t*v + eps)``
``adam_sum``      ``m <- rho*m + x`` (a discounted sum);  ``v`` as above;  ``d = m / sqrt(mu_t*v + eps)``
================  =========================================================================

``rho`` is ``momentum``, ``lambda`` is ``normalizer``, ``c`` is ``lion_interp``. Weight
decay and the step size are applied by the driver in :mod:`metaopt.optimizer`, not here.

Every rule comes twice:

* ``direction(x, moments, hp, step) -> (d, new_moments)``: one tensor, pure, written as the
  equations above read. This is the reference kernel and the form that forward-mode
  differentiation can use.
* ``foreach_direction(xs, moments, hp, steps) -> ds``: a list of tensors, moments updated in
  place with ``torch._foreach_*`` ops. This is the fast kernel. It returns either the input
  list itself (``sgd``), a moment list (``sgdm``), which callers must not modify, or new
  tensors, which callers may overwrite (the kernels write the weight change into them).

A rule carries its hyper-parameters: their defaults (the paper's), their allowed ranges, which
``MetaOptimize`` checks, and, for base use, its default weight decay. Adding a rule is one pure
``direction`` function and one entry: ``Rule(defaults, moment_names, direction)`` maps the
function over the list when no ``foreach_direction`` is given; ``MetaOptimize(params, base=rule)``
accepts it as it is, and an entry in ``RULES`` with its name in ``BASES`` / ``METAS`` (and
``VARIANTS["released"]``) makes it a name the optimizer, the configs
(``optimizer.base=<name>``) and the benchmarks accept. Its hyper-parameters are keywords of
``MetaOptimize`` (``meta_<name>`` for the meta rule's).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from metaopt import hyperparameters

Moments = dict[str, Tensor]
Hyperparameters = dict[str, float]


class Rule(NamedTuple):
    """A direction rule: its hyper-parameters (defaults and allowed ranges, by default those of
    :data:`metaopt.hyperparameters.RULE_RANGES`), moments, two kernels, and its default weight decay as a base rule."""

    hyperparameters: dict[str, float]
    moment_names: tuple[str, ...]
    direction: Callable[[Tensor, Moments, Hyperparameters, Tensor], tuple[Tensor, Moments]]
    foreach_direction: Callable[[list[Tensor], dict[str, list[Tensor]], Hyperparameters, list[Tensor]], list[Tensor]] | None = None
    ranges: dict[str, tuple[float, float, bool]] | None = None
    # Library defaults, chosen on the drop-in benchmark (results/dropin/); the paper's values are stated
    # by the experiment configs. As a base: its decoupled weight decay (the paper's 0.1, but 0 for SGD
    # and SGDm, whose step sizes are larger: torch.optim.SGD's default). As a meta rule: its meta step
    # size eta, in log step size per step (a normalised rule moves beta by about eta a step).
    weight_decay: float = 0.1
    meta_lr: float = 1e-2
    # learn=(...) beyond step sizes (metaopt.learned): the moments that each hyper-parameter enters
    # directly, which get a trace of their own when it is learned (None: every moment), and the
    # hyper-parameters whose Hessian-free trace is zero (they enter through a sign), refused there.
    moments_of: dict[str, tuple[str, ...]] | None = None
    zero_trace: tuple[str, ...] = ()

    def range_of(self, name: str) -> tuple[float, float, bool] | None:
        """The allowed range of a hyper-parameter, or None when the rule sets none."""
        return hyperparameters.range_of(self, name)

    def directions(self, xs, moments, hp, steps) -> list[Tensor]:
        """The fast kernel, or the pure one mapped over the list when the rule has none."""
        if self.foreach_direction is not None:
            return self.foreach_direction(xs, moments, hp, steps)
        return [self.direction_of(x, moments, i, hp, steps[i]) for i, x in enumerate(xs)]

    def direction_of(self, x: Tensor, moments: dict[str, list[Tensor]], i: int, hp, step: Tensor) -> Tensor:
        """The pure ``direction`` of ``x``, the ``i``-th tensor of a list, with its new moments written
        into ``moments[name][i]``."""
        d, new = self.direction(x, {name: moments[name][i] for name in moments}, hp, step)
        for name, value in new.items():
            moments[name][i].copy_(value)
        return d


def _bias_corrections(decay: float, steps: list[Tensor]) -> list[Tensor]:
    """``1 - decay^t`` for every step counter ``t`` (tensors, so nothing is read back to the host).

    Counters of one dtype and device are stacked into one small tensor: in eager mode a few
    ops instead of a few per tensor; under ``torch.compile`` the stacked powers are one small
    buffer, computed once rather than in every iteration of the loops that use them.
    """
    if len(steps) == 1:  # the flat kernel's one counter
        return [1 - decay ** steps[0]]
    if len({(step.dtype, step.device) for step in steps}) > 1:
        corrections = torch._foreach_pow(decay, steps)
        torch._foreach_neg_(corrections)
        torch._foreach_add_(corrections, 1.0)
        return corrections
    if torch.compiler.is_compiling():  # stack the powers, not the counters, or Inductor recomputes them per element
        return list((1 - torch.stack(torch._foreach_pow(decay, steps))).unbind())
    return list((1 - decay ** torch.stack(steps)).unbind())


def _normalized(
    xs: list[Tensor], v: list[Tensor], decay: float, eps: float, steps: list[Tensor], *, summed: bool = False
) -> list[Tensor]:
    """``x / (sqrt(v / (1 - decay^t)) + eps)`` in new tensors, one temporary per ``x``; with
    ``summed`` (``v`` a discounted sum), ``x / sqrt(v * (1 - decay) / (1 - decay^t) + eps)``."""
    ds = torch._foreach_div(v, _bias_corrections(decay, steps))
    if summed:
        torch._foreach_mul_(ds, 1 - decay)
        torch._foreach_add_(ds, eps)
        torch._foreach_sqrt_(ds)
    else:
        torch._foreach_sqrt_(ds)
        torch._foreach_add_(ds, eps)
    if torch.compiler.is_compiling():  # Inductor fuses this chain, and out= would only get in its way
        return torch._foreach_div(xs, ds)
    for x, d in zip(xs, ds):
        torch.div(x, d, out=d)
    return ds


# sgd ------------------------------------------------------------------------------------


def sgd_direction(x, moments, hp, step):
    return x, {}


def sgd_foreach_direction(xs, moments, hp, steps):
    return xs


# sgdm: momentum as an exponential moving average ----------------------------------------


def sgdm_direction(x, moments, hp, step):
    rho = hp["momentum"]
    m = rho * moments["exp_avg"] + (1 - rho) * x
    return m, {"exp_avg": m}


def sgdm_foreach_direction(xs, moments, hp, steps):
    torch._foreach_lerp_(moments["exp_avg"], xs, 1 - hp["momentum"])
    return moments["exp_avg"]


# rmsprop (bias-corrected, as Adam with no momentum) --------------------------------------


def rmsprop_direction(x, moments, hp, step):
    lam, eps = hp["normalizer"], hp["eps"]
    v = lam * moments["exp_avg_sq"] + (1 - lam) * x * x
    d = x / ((v / (1 - lam**step)).sqrt() + eps)
    return d, {"exp_avg_sq": v}


def rmsprop_foreach_direction(xs, moments, hp, steps):
    lam = hp["normalizer"]
    v = moments["exp_avg_sq"]
    torch._foreach_mul_(v, lam)
    torch._foreach_addcmul_(v, xs, xs, value=1 - lam)
    return _normalized(xs, v, lam, hp["eps"], steps)


# adam ------------------------------------------------------------------------------------


def adam_direction(x, moments, hp, step):
    rho, lam, eps = hp["momentum"], hp["normalizer"], hp["eps"]
    m = rho * moments["exp_avg"] + (1 - rho) * x
    v = lam * moments["exp_avg_sq"] + (1 - lam) * x * x
    d = (m / (1 - rho**step)) / ((v / (1 - lam**step)).sqrt() + eps)
    return d, {"exp_avg": m, "exp_avg_sq": v}


def adam_foreach_direction(xs, moments, hp, steps):
    rho, lam = hp["momentum"], hp["normalizer"]
    m, v = moments["exp_avg"], moments["exp_avg_sq"]
    torch._foreach_lerp_(m, xs, 1 - rho)
    torch._foreach_mul_(v, lam)
    torch._foreach_addcmul_(v, xs, xs, value=1 - lam)
    ds = _normalized(m, v, lam, hp["eps"], steps)
    torch._foreach_div_(ds, _bias_corrections(rho, steps))
    return ds


# lion ------------------------------------------------------------------------------------


def lion_direction(x, moments, hp, step):
    rho, c = hp["momentum"], hp["lion_interp"]
    d = torch.sign(c * moments["exp_avg"] + (1 - c) * x)
    m = rho * moments["exp_avg"] + (1 - rho) * x
    return d, {"exp_avg": m}


def lion_foreach_direction(xs, moments, hp, steps):
    m = moments["exp_avg"]
    ds = torch._foreach_lerp(m, xs, 1 - hp["lion_interp"])
    torch._foreach_sign_(ds)
    torch._foreach_lerp_(m, xs, 1 - hp["momentum"])
    return ds


# The released code's rules -------------------------------------------------------------


def sgdm_delayed_direction(x, moments, hp, step):
    rho = hp["momentum"]
    m = moments["exp_avg"]
    return m.clone(), {"exp_avg": rho * m + (1 - rho) * x}  # a copy: the caller overwrites the moment


def sgdm_delayed_foreach_direction(xs, moments, hp, steps):
    m = moments["exp_avg"]
    ds = torch._foreach_mul(m, 1.0)  # the old momentum, in new tensors
    torch._foreach_lerp_(m, xs, 1 - hp["momentum"])
    return ds


def rmsprop_sum_direction(x, moments, hp, step):
    lam, eps = hp["normalizer"], hp["eps"]
    v = lam * moments["exp_avg_sq"] + x * x
    d = x / (v * ((1 - lam) / (1 - lam**step)) + eps).sqrt()
    return d, {"exp_avg_sq": v}


def rmsprop_sum_foreach_direction(xs, moments, hp, steps):
    lam = hp["normalizer"]
    v = moments["exp_avg_sq"]
    torch._foreach_mul_(v, lam)
    torch._foreach_addcmul_(v, xs, xs)
    return _normalized(xs, v, lam, hp["eps"], steps, summed=True)


def adam_sum_direction(x, moments, hp, step):
    rho, lam, eps = hp["momentum"], hp["normalizer"], hp["eps"]
    m = rho * moments["exp_avg"] + x
    v = lam * moments["exp_avg_sq"] + x * x
    d = m / (v * ((1 - lam) / (1 - lam**step)) + eps).sqrt()
    return d, {"exp_avg": m, "exp_avg_sq": v}


def adam_sum_foreach_direction(xs, moments, hp, steps):
    rho, lam = hp["momentum"], hp["normalizer"]
    m, v = moments["exp_avg"], moments["exp_avg_sq"]
    torch._foreach_mul_(m, rho)
    torch._foreach_add_(m, xs)
    torch._foreach_mul_(v, lam)
    torch._foreach_addcmul_(v, xs, xs)
    return _normalized(m, v, lam, hp["eps"], steps, summed=True)


# The hyper-parameters' defaults are the paper's (Tables 2-4); they are the same for base and meta
# use. The released code's epsilon is 1e-10, inside the square root. Meta step sizes: 1e-2 for the
# standard Adam and RMSProp metas (the released sums step up to 10x further at the paper's 1e-3,
# which the released rules keep), 3e-3 for Lion (a sign: exactly eta a step), 1e-3 for SGD (its
# step is the raw meta-gradient's size).
# The moments each hyper-parameter enters directly (a learned one's moment traces, metaopt.learned)
_MOMENTUM = {"momentum": ("exp_avg",)}
_NORMALIZER = {"normalizer": ("exp_avg_sq",), "eps": ()}
_ADAM = {**_MOMENTUM, **_NORMALIZER}
RULES: dict[str, Rule] = {
    "sgd": Rule({}, (), sgd_direction, sgd_foreach_direction, weight_decay=0.0, meta_lr=1e-3),
    "sgdm": Rule({"momentum": 0.9}, ("exp_avg",), sgdm_direction, sgdm_foreach_direction, weight_decay=0.0,
                 moments_of=_MOMENTUM),
    "rmsprop": Rule({"normalizer": 0.999, "eps": 1e-8}, ("exp_avg_sq",), rmsprop_direction, rmsprop_foreach_direction,
                    moments_of=_NORMALIZER),
    "adam": Rule(
        {"momentum": 0.9, "normalizer": 0.999, "eps": 1e-8},
        ("exp_avg", "exp_avg_sq"),
        adam_direction,
        adam_foreach_direction,
        moments_of=_ADAM,
    ),
    "lion": Rule(
        {"momentum": 0.99, "lion_interp": 0.9}, ("exp_avg",), lion_direction, lion_foreach_direction, meta_lr=3e-3,
        moments_of=_MOMENTUM, zero_trace=("momentum", "lion_interp"),
    ),
    "sgdm_delayed": Rule(
        {"momentum": 0.9}, ("exp_avg",), sgdm_delayed_direction, sgdm_delayed_foreach_direction, weight_decay=0.0,
        moments_of=_MOMENTUM,
    ),
    "rmsprop_sum": Rule(
        {"normalizer": 0.999, "eps": 1e-10}, ("exp_avg_sq",), rmsprop_sum_direction, rmsprop_sum_foreach_direction,
        meta_lr=1e-3, moments_of=_NORMALIZER,
    ),
    "adam_sum": Rule(
        {"momentum": 0.9, "normalizer": 0.999, "eps": 1e-10},
        ("exp_avg", "exp_avg_sq"),
        adam_sum_direction,
        adam_sum_foreach_direction,
        meta_lr=1e-3,
        moments_of=_ADAM,
    ),
}

# Base and meta names of the paper, and the rule each one uses in each variant: "standard"
# (moment averages, bias-corrected, as torch.optim) and "released" (the authors' research code,
# which made the paper's figures: discounted sums, SGDm with the momentum from before the step).
BASES = {"sgd": "sgd", "sgdm": "sgdm", "rmsprop": "rmsprop", "adamw": "adam", "lion": "lion"}
METAS = {"sgd": "sgd", "rmsprop": "rmsprop", "adam": "adam", "lion": "lion"}
VARIANTS = {
    "standard": (BASES, METAS),
    "released": (
        {"sgd": "sgd", "sgdm": "sgdm_delayed", "rmsprop": "rmsprop_sum", "adamw": "adam_sum", "lion": "lion"},
        {"sgd": "sgd", "rmsprop": "rmsprop_sum", "adam": "adam_sum", "lion": "lion"},
    ),
}
