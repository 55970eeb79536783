r"""The Hessian-free step (Algorithm 3 of the paper), written once for every kernel and layout.

One step over a :class:`metaopt.plan.Plan`, with :math:`g` in ``p.grad`` and the trace :math:`h`:

1. per segment, the meta-gradient terms :math:`h \cdot g` with the trace from before the step,
   summed over each block;
2. per segment, the base update :math:`\Delta w = -\alpha (d(g) + \kappa w)` with the step sizes from
   before the meta update, and the trace :math:`h \leftarrow \gamma (1 - \kappa\alpha) h + \Delta w`;
3. per meta segment, once every base update has used the old step sizes, the meta update of its
   blocks' :math:`\beta` with their summed terms (summed over the device mesh too where a block spans
   the shards of a sharded parameter: :mod:`metaopt.distributed`).

The arithmetic is the kernel's (:mod:`metaopt.kernels`), where the state lives the plan's
(:mod:`metaopt.plan`). A kernel with a ``fused_update`` (``triton``) does steps 1 and 2 of a flat
segment in one pass and leaves its terms as partial sums, which its ``meta_update`` reduces in step 3.
Nothing is read back to the host. With ``learn=(...)`` beyond the step size
(:mod:`metaopt.learned`) the plan carries each learned hyper-parameter's segments over the same
parameters: their terms join step 1's, the kernel's ``learned_update`` does step 2 for all of them
at once, and their meta segments follow the step sizes' in step 3.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

import torch
from torch import Tensor

from metaopt import learned
from metaopt.kernels import DeferredTerms
from metaopt.plan import FlatSegment, Plan


def _lr_exp(lr: float | Tensor, beta: Tensor) -> Tensor:
    """``lr * exp(beta)``; the product skipped for the default ``lr`` of 1.0, exactly equal."""
    if isinstance(lr, float) and lr == 1.0:
        return torch.exp(beta)
    return lr * torch.exp(beta)


def _memoized_alphas(lr: float | Tensor, index: int, memo: dict) -> Callable[[Hashable, tuple[int, ...], Tensor], Tensor]:
    """The step sizes of a block for param group ``index``, viewed to broadcast as ``view_shape``:
    computed once per block, group and view in a step (the kernels share them between tensors)."""

    def of(block: Hashable, view_shape: tuple[int, ...], beta: Tensor) -> Tensor:
        key = (block, index, view_shape)
        if key not in memo:
            alphas = _lr_exp(lr, beta)
            memo[key] = alphas.view(view_shape) if alphas.shape != view_shape else alphas
        return memo[key]

    return of


def _summed(zs: list) -> Tensor:
    """A block's terms summed by one reduction (a fused kernel's partial sums reduced first)."""
    if len(zs) == 1:
        return zs[0]
    return torch.stack([z.reduced() if isinstance(z, DeferredTerms) else z for z in zs]).sum(0)


def _collect(segment, zs: list, terms: dict[Hashable, list], partial_terms: dict[Hashable, list]) -> None:
    """A segment's terms by block; those over a shard's rows (``segment.partial``) apart, to be summed over the mesh."""
    for block, z, partial in zip(segment.block_keys, zs, segment.partial):
        (partial_terms if partial else terms).setdefault(block, []).append(z)


def step(plan: Plan, param_groups: list[dict[str, Any]], kernels: list, base_rule, meta_rule) -> None:
    """One Hessian-free step of every segment and meta segment of ``plan``; ``kernels``: each param group's.

    In phases, so that a sharded model's all-reduce (:mod:`metaopt.distributed`) overlaps the base
    update: the meta-gradient terms of every segment; the reduction of the partial ones issued; the
    base updates; the reduction waited on; the meta updates. A fused kernel's segment (never sharded)
    gives its terms in the base update's pass."""
    grads = [segment.gather() for segment in plan.segments]
    fused = [kernels[s.group].fused_update is not None and isinstance(s, FlatSegment) for s in plan.segments]
    # learn=(...) beyond step sizes: each segment's learned hyper-parameters' segments over the same parameters
    learned_parts = [plan.learned.segments[position] if plan.learned is not None else () for position in range(len(fused))]
    terms: dict[Hashable, list] = {}
    partial_terms: dict[Hashable, list] = {}
    for segment, segment_grads, one_pass, parts in zip(plan.segments, grads, fused, learned_parts):
        if not one_pass:
            kernel = kernels[segment.group]
            _collect(segment, segment.meta_grads(kernel, segment_grads), terms, partial_terms)
            for part in parts:  # never sharded (plain tensors only)
                for block, z in zip(part.block_keys, part.meta_grads(kernel, segment_grads)):
                    terms.setdefault(block, []).append(z)
    partial_sums = {block: _summed(zs) for block, zs in partial_terms.items()}
    if plan.reduction is not None:
        plan.reduction.issue(partial_sums)
    memo: dict = {}
    for position, (segment, segment_grads, one_pass) in enumerate(zip(plan.segments, grads, fused)):
        index = segment.group
        group, kernel = param_groups[index], kernels[index]
        hp = dict(rule=base_rule, hp={key: group[key] for key in base_rule.hyperparameters},
                  weight_decay=group["weight_decay"], gamma=group["gamma"])
        if one_pass:  # the meta-gradient terms and the base update in one pass
            torch._foreach_add_(segment.counters, 1)
            _collect(segment, kernel.fused_update(segment, segment_grads, group["lr"], **hp), terms, partial_terms)
        else:
            step_sizes = segment.alphas(_memoized_alphas(group["lr"], index, memo))
            torch._foreach_add_(segment.counters, 1)
            if learned_parts[position]:
                kernel.learned_update(segment.weights, segment_grads, segment.traces, segment.moments, segment.steps,
                                      step_sizes, learned.tensors(plan.learned, position, index, memo), **hp)
            else:
                kernel.update(segment.weights, segment_grads, segment.traces, segment.moments, segment.steps,
                              step_sizes, **hp)
        segment.scatter()
    sums = {block: _summed(zs) for block, zs in terms.items()}
    if plan.reduction is not None:
        for block, z in plan.reduction.wait(partial_sums).items():  # the whole tensors' terms added to the shards'
            sums[block] = z + sums[block] if block in sums else z
    learned_meta_segments = plan.learned.meta_segments if plan.learned is not None else []
    for meta in (*plan.meta_segments, *learned_meta_segments):
        group = param_groups[meta.group]
        if meta.counters:  # a learned hyper-parameter's blocks are counted by their step sizes'
            torch._foreach_add_(meta.counters, 1)
        kernels[meta.group].meta_update(
            meta.betas, meta.meta_grads(sums), meta.moments, meta.steps,
            rule=meta_rule, hp={key: group[f"meta_{key}"] for key in meta_rule.hyperparameters},
            meta_lr=group["meta_lr"], meta_weight_decay=group["meta_weight_decay"],
        )
