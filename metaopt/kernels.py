"""The two kernels of a MetaOptimize step, as functions of lists of tensors (torch.optim style).

``base_update`` does, for one param group, the meta-gradient terms (with the trace from
before the step), the base update and the trace update; ``meta_update`` moves the log step
sizes of a list of blocks. The ``reference`` kernel goes one tensor at a time and reads as
the equations of :class:`metaopt.MetaOptimize`; the ``foreach`` kernel does the same with
multi-tensor ops. Tests hold them equal.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _reference_base_update(
    params, grads, traces, moments, steps, step_sizes, view_shapes, *, rule, hp, weight_decay, gamma
) -> list[Tensor]:
    """Base update and trace of one param group, tensor by tensor; returns each tensor's
    meta-gradient contribution ``h * g`` (trace before the update), summed to its block's view."""
    meta_grads = []
    for i, (w, g, h) in enumerate(zip(params, grads, traces)):
        meta_grads.append((h * g).sum_to_size(view_shapes[i]))
        steps[i] += 1
        d, new_moments = rule.direction(g, {name: moments[name][i] for name in moments}, hp, steps[i])
        for name, value in new_moments.items():
            moments[name][i].copy_(value)
        alpha = step_sizes[i]
        dw = -alpha * (d + weight_decay * w)
        w.add_(dw)
        h.mul_(gamma * (1 - weight_decay * alpha)).add_(dw)
    return meta_grads


def _reference_meta_update(betas, meta_grads, moments, steps, *, rule, hp, meta_lr) -> None:
    """``beta <- beta - meta_lr * d(z)`` block by block."""
    for i, (beta, z) in enumerate(zip(betas, meta_grads)):
        steps[i] += 1
        u, new_moments = rule.direction(z, {name: moments[name][i] for name in moments}, hp, steps[i])
        for name, value in new_moments.items():
            moments[name][i].copy_(value)
        beta.sub_(meta_lr * u)


def _foreach_base_update(
    params, grads, traces, moments, steps, step_sizes, view_shapes, *, rule, hp, weight_decay, gamma
) -> list[Tensor]:
    """The same as :func:`_reference_base_update` with ``torch._foreach_*`` ops."""
    products = torch._foreach_mul(traces, grads)
    meta_grads = [product.sum_to_size(shape) for product, shape in zip(products, view_shapes)]
    del products
    torch._foreach_add_(steps, 1)
    directions = rule.directions(grads, moments, hp, steps)
    if weight_decay != 0:
        directions = torch._foreach_add(directions, params, alpha=weight_decay)
    updates = torch._foreach_mul(directions, step_sizes)  # alpha * (d + kappa w) = -dw
    del directions
    torch._foreach_sub_(params, updates)
    decays = torch._foreach_mul(step_sizes, -gamma * weight_decay)
    torch._foreach_add_(decays, gamma)  # gamma * (1 - kappa alpha)
    torch._foreach_mul_(traces, decays)
    torch._foreach_sub_(traces, updates)
    return meta_grads


def _foreach_meta_update(betas, meta_grads, moments, steps, *, rule, hp, meta_lr) -> None:
    torch._foreach_add_(steps, 1)
    directions = rule.directions(meta_grads, moments, hp, steps)
    torch._foreach_add_(betas, directions, alpha=-meta_lr)


KERNELS = {
    "reference": (_reference_base_update, _reference_meta_update),
    "foreach": (_foreach_base_update, _foreach_meta_update),
}
