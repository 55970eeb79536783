"""What the framework integrations share, with torch alone: finding MetaOptimize inside optimizer
wrappers, the names its step sizes are logged under, and where a learning-rate scheduler takes its ``lr``."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable

import torch

from metaopt.optimizer import MetaOptimize

SIMULATED_STEPS = 100_000  # a scheduler that is not a LambdaLR is stepped on a copy at most this often
FIX = ('MetaOptimize learns the step size itself: keep its `lr` multiplier constant (transformers: '
       'lr_scheduler_type="constant"; any loop: torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, '
       'total_iters=0), or no scheduler)')


class StepSizeScheduleWarning(UserWarning):
    """A learning-rate scheduler will scale MetaOptimize's learned step size down (its ``lr`` multiplier)."""


def unwrap(optimizer: object) -> MetaOptimize | None:
    """The MetaOptimize inside ``optimizer``, following the ``optimizer`` / ``_optimizer`` attributes by
    which wrappers keep the optimizer they wrap (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``); None when there is none."""
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, MetaOptimize):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
    return None


def step_size_logs(optimizers: Iterable[MetaOptimize]) -> dict[str, float]:
    """``optimizer.step_sizes()`` under its own names (``step_size``, ``step_size/<block>``, ...); with several
    MetaOptimize, each one's under ``optimizer<i>/``."""
    optimizers = list(optimizers)
    if len(optimizers) == 1:
        return optimizers[0].step_sizes()
    return {f"optimizer{i}/{name}": value
            for i, optimizer in enumerate(optimizers) for name, value in optimizer.step_sizes().items()}


def final_multiplier(scheduler: object, steps: float) -> float | None:
    """The smallest, over param groups, of ``lr`` after ``steps`` scheduler steps from the start divided by
    ``lr`` at the start: 0.0 for a schedule that decays to 0, 1.0 for a constant one. None when that cannot
    be known in advance (``ReduceLROnPlateau``, which follows a metric; an unbounded run; a scheduler that
    cannot be copied)."""
    if not math.isfinite(steps):
        return None
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return min(float(lr_lambda(int(steps))) for lr_lambda in scheduler.lr_lambdas)
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler) or not steps < SIMULATED_STEPS:
        return None
    # step a copy of the scheduler on a stand-in optimizer that holds the same param groups' settings
    optimizer = scheduler.optimizer  # MetaOptimize or a wrapper that forwards its param_groups
    settings = [{k: v for k, v in group.items() if k not in ("params", "param_names")}
                for group in optimizer.param_groups]
    stand_in = torch.optim.SGD([{**group, "params": [torch.zeros(1)]} for group in settings])
    start = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    try:
        clone = copy.deepcopy(scheduler, memo={id(optimizer): stand_in})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
            for _ in range(int(steps) - clone.last_epoch):
                clone.step()
    except Exception:  # noqa: BLE001: any scheduler we cannot replay is one we cannot judge
        return None
    return min(float(group["lr"]) / float(lr) if float(lr) else 1.0
               for group, lr in zip(stand_in.param_groups, start))


def warn_if_decaying(scheduler: object, steps: float, what: str, optimizer: MetaOptimize) -> bool:
    """Warn (``StepSizeScheduleWarning``) when ``scheduler`` scales ``optimizer``'s step size down over
    ``steps`` steps, or may; ``what`` names the scheduler in the message. Returns whether it warned."""
    if scheduler is None or unwrap(getattr(scheduler, "optimizer", None)) is not optimizer:
        return False
    factor = final_multiplier(scheduler, steps)
    if factor is not None and factor >= 1.0 - 1e-6:
        return False
    if factor is None:
        effect = "may scale it down as training goes on (it cannot be replayed in advance)"
    else:
        effect = f"scales that multiplier down to {factor:.3g}x its starting value by step {int(steps)}"
    warnings.warn(
        f"metaopt: {what} multiplies MetaOptimize's learned step size by the param groups' `lr` and {effect}: "
        "the step size is scaled down with it whatever MetaOptimize learns, and the 'learning_rate' a trainer "
        f"logs is this multiplier, not the step size. {FIX}.",
        StepSizeScheduleWarning, stacklevel=3)
    return True
