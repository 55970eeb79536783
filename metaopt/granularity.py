"""The granularities of the step sizes (``MetaOptimize(blocks=...)``), in one table.

For each ``blocks`` setting, :data:`GRANULARITIES` says how a parameter's block is found (where
its ``beta`` lives and how it broadcasts), how :meth:`metaopt.MetaOptimize.step_sizes` names it,
what a block shared by several param groups means, whether one Hessian-vector product per block
is affordable (approx ``"l"`` / ``"2x2"``, :mod:`metaopt.hessian`), and which flat buffers the flat
layout keeps (:mod:`metaopt.plan`). Adding a granularity is one entry here.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from torch import Tensor

from metaopt.distributed import local


class Placement(NamedTuple):
    """Where a parameter's step sizes live and how they broadcast against it."""

    owner: int | Tensor  # a param group index (scalar, param_group) or a parameter (its state holds the block)
    view_shape: tuple[int, ...]  # the owner's beta viewed to broadcast against the parameter (its local shard)
    meta_group: int  # index of the param group whose meta hyper-parameters the block uses
    group: int  # index of the parameter's own param group
    number: int = 0  # the block's number, shared by the parameters whose step sizes it holds


class Granularity(NamedTuple):
    place: Callable[[Tensor, int, int, dict[int, tuple[Tensor, int]]], Placement]  # see _scalar etc.
    logged_as: str  # the step_sizes() key, with {block} (param group block name) and {param} (parameter name)
    shares: str  # what a block shared by param groups learns (in errors); "" when blocks are per tensor
    few_blocks: bool  # few enough blocks for one Hessian-vector product each
    segment_kind: str  # the kind of block of a flat segment: "one", "tensor", "weight" or "node" (metaopt/plan.py)
    pairs_biases: bool = False  # a bias takes the step sizes of its weight's rows (node_weights)
    logs_range: bool = False  # step_sizes() logs each tensor's /min, /median and /max


# place(p, index of its param group, first group with its block name, bias -> (weight, its group))
def _scalar(p, index, owner_group, biases):
    return Placement(0, (), 0, index)


def _param_group(p, index, owner_group, biases):
    return Placement(owner_group, (), owner_group, index)


def _layerwise(p, index, owner_group, biases):
    return Placement(p, (), index, index)


def _nodewise(p, index, owner_group, biases):
    if id(p) in biases:  # a bias shares the step sizes of its weight's rows
        weight, weight_group = biases[id(p)]
        return Placement(weight, tuple(local(p).shape), weight_group, index)
    return Placement(p, _node_shape(local(p)), index, index)


def _weightwise(p, index, owner_group, biases):
    return Placement(p, tuple(local(p).shape), index, index)


GRANULARITIES: dict[str, Granularity] = {
    "scalar": Granularity(_scalar, "step_size", "one step size for all groups", True, "one"),
    "param_group": Granularity(_param_group, "step_size/{block}", "one step size per block name", True, "one"),
    "layerwise": Granularity(_layerwise, "step_size/{param}", "", True, "tensor"),
    "nodewise": Granularity(_nodewise, "step_size/{param}", "a bias's step sizes with its weight's rows", False, "node",
                            pairs_biases=True, logs_range=True),
    "weightwise": Granularity(_weightwise, "step_size/{param}", "", False, "weight", logs_range=True),
}
BLOCKS = tuple(GRANULARITIES)  # the values of MetaOptimize(blocks=...)


def _node_shape(p: Tensor) -> tuple[int, ...]:
    """One step size per output unit: per row of a matrix (or filter), per entry of a vector."""
    if p.dim() <= 1:
        return tuple(p.shape)
    return (p.shape[0],) + (1,) * (p.dim() - 1)


def node_weights(param_groups: list[dict[str, Any]]) -> dict[int, tuple[Tensor, int]]:
    """Pair each bias with the weight whose rows it extends: id(bias) -> (weight, its group index).

    With named parameters, ``X.bias`` pairs with ``X.weight``; without names, a vector
    pairs with the parameter just before it in its group (the order of
    ``module.parameters()``). Either way the weight's first dimension must match.
    """
    named = all("param_names" in g for g in param_groups)
    pairs: dict[int, tuple[Tensor, int]] = {}
    if named:
        weights = {
            name[: -len(".weight")]: (p, index)
            for index, g in enumerate(param_groups)
            for name, p in zip(g["param_names"], g["params"])
            if name.endswith(".weight")
        }
        for g in param_groups:
            for name, p in zip(g["param_names"], g["params"]):
                weight = weights.get(name[: -len(".bias")]) if name.endswith(".bias") else None
                if weight is not None and p.dim() == 1 and weight[0].dim() >= 1 and weight[0].shape[0] == p.numel():
                    pairs[id(p)] = weight
        return pairs
    for index, g in enumerate(param_groups):
        for previous, p in zip(g["params"], g["params"][1:]):
            if p.dim() == 1 and previous.dim() >= 1 and previous.shape[0] == p.numel() and id(previous) not in pairs:
                pairs[id(p)] = (previous, index)
    return pairs
