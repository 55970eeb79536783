"""MetaOptimize's hyper-parameters in one place: their allowed ranges, the defaults that the chosen
rules bring, and the checks that refuse a value with a message naming the argument and the fix.

``lr`` is checked as torch.optim checks it, and a little more: a float or int at construction and at
every step (a scheduler may set it, and the check costs a comparison); a tensor at construction, in
``add_param_group``, and at a step whenever the tensor object changes or, for a tensor on the CPU,
its value was written (its version counter moved): reading a CPU tensor does not wait for any
device. A tensor on an accelerator that is written in place (a scheduler's ``fill_``) is not read
again, as reading it would synchronize every step; torch.optim checks ``lr`` in its constructor alone.
"""

from __future__ import annotations

import difflib
import math
import warnings
from itertools import chain
from typing import Any

import torch
from torch import Tensor

# The keys each block takes from one param group (its meta group): the block's initial step size
# and its meta update (with the meta rule's hyper-parameters). Groups that share a block must agree on them.
BLOCK_KEYS = ("alpha0", "meta_lr", "meta_weight_decay")
# alpha0 outside this range under- or overflows exp(beta) in float32 at once (step size 0 or inf)
ALPHA0_RANGE = (1e-30, 1e3)
# alpha0="auto": the first step moves the weights by this fraction of their norm. The estimate is
# kept in [AUTO_ALPHA0_FLOOR, ALPHA0_RANGE[1]]; the floor, the paper's alpha0, is where it ends up when
# the weights are all zero or the first gradients are (then the meta update grows it as in the paper).
AUTO_FIRST_MOVE = 1e-2
AUTO_ALPHA0_FLOOR = 1e-6
# Keywords of other optimizers that users pass out of habit, and what MetaOptimize calls them
OTHER_OPTIMIZERS_KEYWORDS = {
    "betas": "MetaOptimize takes AdamW's betas as momentum= (beta1) and normalizer= (beta2)",
    "learning_rate": "MetaOptimize learns its step size: alpha0= is where it starts ('auto' by default)",
    "initial_lr": "MetaOptimize learns its step size: alpha0= is where it starts ('auto' by default)",
}
# (lowest, highest, whether the highest is allowed): the driver's hyper-parameters ...
RANGES: dict[str, tuple[float, float, bool]] = {
    "weight_decay": (0.0, math.inf, False),
    "meta_weight_decay": (0.0, math.inf, False),
    "gamma": (0.0, 1.0, True),
    "meta_lr": (0.0, math.inf, False),
    "lr": (0.0, math.inf, False),
}
# ... and the built-in rules' (a Rule may set its own: Rule.ranges); eps must be > 0
RULE_RANGES: dict[str, tuple[float, float, bool]] = {
    "momentum": (0.0, 1.0, False),
    "normalizer": (0.0, 1.0, False),
    "lion_interp": (0.0, 1.0, True),
    "eps": (math.ulp(0.0), math.inf, False),
}

from metaopt import rules  # noqa: E402  (after RULE_RANGES, which metaopt.rules reads)


def rules_of(base: str | rules.Rule, meta: str, variant: str) -> tuple[rules.Rule, rules.Rule]:
    """The base and meta :class:`~metaopt.rules.Rule` that the names stand for in ``variant``."""
    if variant not in rules.VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: variant must be one of {list(rules.VARIANTS)}")
    base_rules, meta_rules = rules.VARIANTS[variant]
    if isinstance(base, rules.Rule):
        base_rule = base
    elif base in base_rules:
        base_rule = rules.RULES[base_rules[base]]
    else:
        raise ValueError(f"unknown base {base!r}: base must be one of {sorted(rules.BASES)} or a metaopt.rules.Rule")
    if meta not in meta_rules:
        raise ValueError(f"unknown meta {meta!r}: meta must be one of {sorted(rules.METAS)}")
    return base_rule, rules.RULES[meta_rules[meta]]


def check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: {name} must be one of {list(choices)}")


def check_keywords(keywords: dict[str, Any], base_rule: rules.Rule, known: list[str]) -> None:
    """TypeError for a keyword that no rule takes, with the closest known one or the other optimizer's hint."""
    for key in keywords:
        name = key[len("meta_") :] if key.startswith("meta_") else key
        if key in OTHER_OPTIMIZERS_KEYWORDS:
            raise TypeError(f"MetaOptimize got an unexpected keyword argument {key!r}: {OTHER_OPTIMIZERS_KEYWORDS[key]}")
        if not any(name in rule.hyperparameters for rule in (*rules.RULES.values(), base_rule)):
            close = difflib.get_close_matches(key, known, n=1)
            raise TypeError(f"MetaOptimize got an unexpected keyword argument {key!r}"
                            + (f": did you mean {close[0]!r}?" if close else ""))


def defaults(driver: dict[str, Any], given: dict[str, Any], base_rule: rules.Rule, meta_rule: rules.Rule,
             base_name: str, meta: str) -> dict[str, Any]:
    """The param groups' defaults: ``driver``'s values (``meta_lr=None``: the meta rule's), the rules'
    hyper-parameters with their defaults, and the ``given`` ones that are not None (ValueError for
    one that the chosen rules do not use)."""
    result = {**driver, "meta_lr": meta_rule.meta_lr if driver["meta_lr"] is None else driver["meta_lr"],
              "weight_decay": base_rule.weight_decay, **base_rule.hyperparameters,
              **{f"meta_{key}": value for key, value in meta_rule.hyperparameters.items()}}
    for key, value in given.items():
        if value is None:
            continue
        if key not in result:
            raise ValueError(not_applicable(key, base_name, meta))
        result[key] = value
    check(result, "", base_rule, meta_rule)
    return result


def not_applicable(key: str, base_name: str, meta: str) -> str:
    if key.startswith("meta_"):
        users = [m for m, r in rules.METAS.items() if key[len("meta_") :] in rules.RULES[r].hyperparameters]
        return f"{key} does not apply to meta {meta!r}; it applies to meta in {users}"
    users = [b for b, r in rules.BASES.items() if key in rules.RULES[r].hyperparameters]
    return f"{key} does not apply to base {base_name!r}; it applies to base in {users}"


def range_of(rule: rules.Rule, name: str) -> tuple[float, float, bool] | None:
    """The allowed range of a rule's hyper-parameter, or None when the rule sets none."""
    return (rule.ranges or {}).get(name, RULE_RANGES.get(name))


def _check_alpha0(alpha0: Any, where: str) -> None:
    low, high = ALPHA0_RANGE
    if alpha0 is not None and alpha0 != "auto" and not (
        isinstance(alpha0, (int, float)) and not isinstance(alpha0, bool) and low <= alpha0 <= high
    ):
        raise ValueError(
            f"alpha0{where} must be a number in [{low}, {high}] (outside it exp(beta) is 0 or inf in float32) "
            f"or 'auto', got {alpha0!r}"
        )


def check(hyperparameters: dict[str, Any], where: str, base_rule: rules.Rule, meta_rule: rules.Rule) -> None:
    """Raise ValueError naming the argument and its allowed values."""
    _check_alpha0(hyperparameters.get("alpha0"), where)
    if "lr" in hyperparameters:
        check_lr(hyperparameters["lr"], where)
    for key, value in hyperparameters.items():
        if key in RANGES:
            allowed = RANGES[key]
        elif key.startswith("meta_"):
            allowed = range_of(meta_rule, key[len("meta_") :])
        else:
            allowed = range_of(base_rule, key)
        if allowed is None or isinstance(value, Tensor):
            continue
        low, high, high_allowed = allowed
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not (low <= value < high or (high_allowed and value == high))
        ):
            interval = f"({0.0}, {high})" if low == math.ulp(0.0) else f"[{low}, {high}{']' if high_allowed else ')'}"
            raise ValueError(f"{key}{where} must be in {interval}, got {value!r}")


def check_lr(lr: Any, where: str) -> None:
    """``lr`` must be a finite number >= 0, or a real tensor of one such element (read here: a
    synchronization with its device is acceptable in a constructor or a rare change)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.dtype.is_floating_point:
            raise TypeError(f"lr{where} must be a number or a floating-point tensor of one element, got a "
                            f"{lr.dtype} tensor of shape {tuple(lr.shape)}")
        value = float(lr)
    elif isinstance(lr, (int, float)) and not isinstance(lr, bool):
        value = lr
    else:
        raise TypeError(f"lr{where} must be a number or a tensor of one element, got {lr!r}")
    if not 0.0 <= value < math.inf:
        raise ValueError(f"lr{where} must be a finite number >= 0 (it multiplies the learned step sizes), got {lr!r}; "
                         "check the learning-rate schedule that set it")


def lr_mark(lr: Any) -> Any:
    """What identifies an lr already checked: a number itself; a tensor by object and, on the CPU, by
    the version of its value (see the module docstring)."""
    if not isinstance(lr, Tensor):
        return lr
    return (id(lr), lr._version) if lr.device.type == "cpu" else id(lr)


def check_lrs(param_groups: list[dict[str, Any]], checked: dict[int, Any]) -> None:
    """At a step: each group's lr that is not the one checked last (``checked``: group -> :func:`lr_mark`)."""
    for index, group in enumerate(param_groups):
        lr = group["lr"]
        if type(lr) is float and 0.0 <= lr < math.inf:
            continue
        mark = lr_mark(lr)
        if checked.get(index) != mark:
            check_lr(lr, f" of param group {index}")
            checked[index] = mark


def check_param_group(param_group: dict[str, Any], index: int, defaults: dict[str, Any], base_rule: rules.Rule,
                      meta_rule: rules.Rule, base_name: str, meta: str) -> None:
    """ValueError for a key that a param group may not set, or a value out of its range."""
    reserved = {"base", "meta", "blocks", "kernel"} & param_group.keys()
    if reserved:
        raise ValueError(f"{sorted(reserved)} cannot differ between param groups; pass them to MetaOptimize(...)")
    rule_keys = {"weight_decay", *chain.from_iterable(rule.hyperparameters for rule in rules.RULES.values())}
    rule_keys |= {f"meta_{key}" for key in rule_keys}
    for key in param_group.keys() & rule_keys:
        if key not in defaults:
            raise ValueError(not_applicable(key, base_name, meta) + f" (set in param group {index})")
    unknown = set(param_group) - set(defaults) - {"params", "param_names", "block"}
    if unknown:
        raise ValueError(
            f"param group {index} sets {sorted(unknown)}, which MetaOptimize(base={base_name!r}, "
            f"meta={meta!r}) does not use; a group may set {sorted(defaults)} and 'block'"
        )
    check(param_group, f" of param group {index}", base_rule, meta_rule)
    if "lr" in param_group:
        warn_if_lr_is_a_step_size(param_group["lr"], f" in param group {index}", stacklevel=4)


def check_shared_blocks(placements, param_groups: list[dict[str, Any]], meta_rule: rules.Rule, shares: str,
                        blocks: str, learned: tuple[str, ...] = ()) -> None:
    """A block takes alpha0, the initial values of the ``learned`` hyper-parameters and its meta
    hyper-parameters from one group: refuse a group whose own values would be ignored, rather than ignore them."""
    for placement in placements.values():
        group, meta_group = param_groups[placement.group], param_groups[placement.meta_group]
        for key in (*BLOCK_KEYS, *learned, *(f"meta_{name}" for name in meta_rule.hyperparameters)):
            if key in group and group[key] != meta_group[key]:
                raise ValueError(
                    f"param group {placement.group} sets {key}={group[key]!r} but shares its step sizes with param "
                    f"group {placement.meta_group} ({key}={meta_group[key]!r}): blocks={blocks!r} learns {shares}. "
                    f"Give the groups the same {key}, or use blocks='param_group' with distinct 'block' names"
                )


def warn_if_lr_is_a_step_size(lr: float | Tensor, where: str, stacklevel: int = 3) -> None:
    """``lr`` multiplies the learned step size: ``lr=1e-3`` out of habit would give steps of 1e-3 times it."""
    if isinstance(lr, (int, float)) and lr != 1.0:
        warnings.warn(
            f"MetaOptimize got lr={lr!r}{where}: lr multiplies the learned step size (a scheduler's handle, "
            f"1.0 by default), it is not a step size. To start from a step size of {lr!r}, pass alpha0={lr!r} "
            "and leave lr at 1.0",
            UserWarning,
            stacklevel=stacklevel,
        )


def meta_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the step counters and the meta state: float32 or wider, whatever the parameter's."""
    return torch.promote_types(dtype, torch.float32)


# -- learn=(...): the hyper-parameters learned online (metaopt.learned) ----------------------------

# The driver's learnable hyper-parameters: the step size and the decoupled weight decay, both positive.
# A rule's hyper-parameter is learnable when its range is (0, 1) or positive (see learnable).
DRIVER_LEARNABLE = {"step_size": "log", "weight_decay": "log"}


def learnable(base_rule: rules.Rule) -> dict[str, str]:
    """The hyper-parameters that ``learn=`` may name for this base rule, each with its parametrisation:
    ``"log"`` (a positive one is ``exp(b)``) or ``"logit"`` (one in (0, 1) is ``sigmoid(b)``)."""
    result = dict(DRIVER_LEARNABLE)
    for name in base_rule.hyperparameters:
        allowed = range_of(base_rule, name)
        if name in base_rule.zero_trace or allowed is None:
            continue
        low, high, _ = allowed
        if low >= 0.0 and high == 1.0:
            result[name] = "logit"
        elif low >= 0.0 and high == math.inf:
            result[name] = "log"
    return result


def check_learn(learn: Any, base_rule: rules.Rule, base_name: str, approx_kind: str) -> tuple[str, ...]:
    """``learn`` as a tuple of names; ValueError for a name the base rule does not have (or whose trace is
    zero), TypeError for a lone string, and ValueError without ``"step_size"`` or with ``approx`` other
    than ``"hessian_free"``."""
    allowed = learnable(base_rule)
    if isinstance(learn, str) or not all(isinstance(name, str) for name in learn):
        raise TypeError(f"learn must be a tuple of names, e.g. learn=('step_size', 'weight_decay'), got {learn!r}")
    learn = tuple(dict.fromkeys(learn))
    for name in learn:
        if name in base_rule.zero_trace:
            raise ValueError(
                f"learn={learn!r}: {name} of base {base_name!r} enters its update through a sign, whose derivative is "
                f"zero almost everywhere, so its Hessian-free trace stays zero and it would never move; "
                f"base {base_name!r} can learn {sorted(allowed)}")
        if name not in allowed:
            raise ValueError(f"learn={learn!r}: base {base_name!r} has no learnable hyper-parameter {name!r}; "
                             f"it can learn {sorted(allowed)}")
    if "step_size" not in learn:
        raise ValueError(f"learn={learn!r} must include 'step_size': MetaOptimize always learns its step sizes, "
                         f"and may learn more of {sorted(allowed)} with them")
    if learn != ("step_size",) and approx_kind != "hessian_free":
        raise ValueError(f"learn={learn!r} is implemented for approx='hessian_free'; learn only ('step_size',) "
                         f"with approx={approx_kind!r}")
    return learn


def check_learned_values(values: dict[str, Any], learn: tuple[str, ...], base_rule: rules.Rule, where: str) -> None:
    """ValueError for a learned hyper-parameter whose initial value its parametrisation cannot take:
    0 for a positive one (log 0), 0 or 1 for one in (0, 1)."""
    kinds = learnable(base_rule)
    for name in learn:
        if name == "step_size" or name not in values or isinstance(values[name], Tensor):
            continue
        value = values[name]
        if kinds[name] == "log" and not value > 0:
            raise ValueError(f"learn=(..., {name!r}) learns log({name}): {name}{where} must be > 0 to start from, "
                             f"got {value!r}; pass e.g. {name}=1e-4")
        if kinds[name] == "logit" and not 0 < value < 1:
            raise ValueError(f"learn=(..., {name!r}) learns logit({name}): {name}{where} must be in (0, 1) to start "
                             f"from, got {value!r}; pass e.g. {name}=0.9")
