"""The flat kernel: a param group's optimizer state in one buffer per state key.

The cost of the ``foreach`` kernel grows with the number of tensors: a dot product per tensor
for the meta-gradient, and per-tensor loops and bookkeeping around the multi-tensor ops. On a
GPU, where a step of ResNet-18 (62 tensors) is bound by launches rather than by bytes, that
is most of its time. The flat kernel keeps, for the parameters of one param group that share
a device and a dtype (a *partition*), the trace and the base moments in one flat buffer each;
``state[p]`` holds views into them, so ``state_dict()`` and checkpoints stay per parameter.
For ``layerwise`` blocks the blocks' meta state (``beta``, the meta moments, ``meta_step``)
is a vector with one entry per tensor, viewed the same way. A step of a partition is then:

1. gather the gradients and the weights into two flat buffers (``torch._foreach_copy_``, one
   op each);
2. the meta-gradient terms with the trace from before the step: one dot product (``scalar``,
   ``param_group``) or one segmented sum, an entry per tensor (``layerwise``);
3. the ``foreach`` kernel's base update and trace on the flat tensors (for ``layerwise``, the
   step sizes repeated over each tensor's elements), so the arithmetic is the same code;
4. scatter the weights back (one op).

So the number of operations a step dispatches does not depend on the number of tensors. The
price is memory: the two gather buffers, one copy of the weights and one of the gradients.

The copies cost six passes over the partition's memory a step, which on a CPU, where a step is
bound by memory, outweighs what they save once tensors are large: measured on one thread (62
tensors, (AdamW, Lion)), the flat step takes 0.26x the ``foreach`` step's time at 1k elements
a tensor, 0.8x at 64k-128k and 1.2x at 256k. So on a CPU a partition whose tensors average more
than ``CPU_MAX_MEAN_NUMEL`` elements keeps the ``foreach`` kernel (:func:`pays_off`); on a GPU,
where a step is bound by launches, flat buffers always pay off.

All parameters of a partition take their steps together, so their step counters are equal
and the bias corrections are those of one counter. This holds for state the optimizer
created itself. A partition whose counters may differ (state loaded from a checkpoint, or a
step in which only some of its parameters had gradients) is checked once, reading the
counters back to the host; if they differ, that partition keeps the ``foreach`` kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Partition:
    """One partition's flat buffers and the views that connect them to its parameters."""

    params: list[Tensor]
    blocks: str  # "one" (scalar, param_group: one step size), "tensor" (layerwise), "weight" (weightwise), "node"
    weights: Tensor  # gathered weights: the update runs on them, then they are scattered back
    weight_views: list[Tensor]
    grads: Tensor
    grad_views: list[Tensor]
    trace: Tensor
    moments: dict[str, Tensor]
    steps: Tensor  # one counter per parameter (state[p]["step"] are its entries), all equal
    step: Tensor  # its first entry (a view): the counter of the bias corrections
    lengths: Tensor | None  # "tensor": each tensor's number of elements, on the partition's device
    rows: Tensor | None  # "node": each element's row among the rows of all nodewise blocks (Nodes)
    meta: dict[str, Tensor] | None  # "tensor", "weight": the blocks' beta and meta moments, flat
    meta_steps: Tensor | None  # their counters, one per parameter, all equal
    meta_step: Tensor | None  # the first entry

    def gather(self) -> None:
        torch._foreach_copy_(self.grad_views, [p.grad for p in self.params])
        torch._foreach_copy_(self.weight_views, self.params)

    def scatter(self) -> None:
        torch._foreach_copy_(self.params, self.weight_views)

    def meta_grads(self) -> Tensor:
        """The meta-gradient terms ``h * g`` summed over each block: one, each tensor's or none."""
        if self.blocks == "one":
            return torch.dot(self.trace, self.grads)
        if self.blocks == "tensor":
            return torch.segment_reduce(self.trace * self.grads, "sum", lengths=self.lengths)
        return self.trace * self.grads  # "node": summed into the rows by the caller, across partitions

    def per_element(self, step_sizes: Tensor) -> Tensor:
        """The blocks' step sizes ("tensor": one per tensor, "weight": one per weight, "node": one
        per row of every nodewise block) for each element, in the weights' dtype."""
        step_sizes = step_sizes.to(self.trace.dtype)
        if self.blocks == "tensor":
            return torch.repeat_interleave(step_sizes, self.lengths, output_size=self.trace.numel())
        if self.blocks == "node":
            return step_sizes.index_select(0, self.rows)
        return step_sizes


CPU_MAX_MEAN_NUMEL = 1 << 17


def pays_off(params: list[Tensor]) -> bool:
    """Whether flat buffers make these parameters' steps faster (see the module docstring)."""
    return params[0].device.type != "cpu" or sum(p.numel() for p in params) <= CPU_MAX_MEAN_NUMEL * len(params)


def partitions(params: list[Tensor]) -> list[list[Tensor]]:
    """The parameters of one param group by (device, dtype), in their order."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        by_kind.setdefault((p.device, p.dtype), []).append(p)
    return list(by_kind.values())


def _flat(
    states: list[dict[str, Any]], key: str, values: list[Tensor], dtype: torch.dtype, *, copy: bool = True
) -> tuple[Tensor, list[Tensor]]:
    """A flat buffer holding ``values`` one after another (with ``copy``); with ``key``, each
    ``state[key]`` becomes a view of it shaped as its old value. Returns the buffer and the views."""
    numel = sum(value.numel() for value in values)
    buffer = torch.zeros(numel, dtype=dtype, device=values[0].device)
    views, offset = [], 0
    for value in values:
        view = buffer[offset : offset + value.numel()].view(value.shape)
        if copy:
            view.copy_(value)
        views.append(view)
        offset += value.numel()
    if key:
        for state, view in zip(states, views):
            state[key] = view
    return buffer, views


def _equal(counters: list[Tensor], fresh: bool) -> bool:
    """Whether the step counters are equal: known for state created together, else read back once."""
    if fresh or len(counters) == 1:
        return True
    stacked = torch.stack(counters)
    return bool((stacked == stacked[0]).all())


def build(
    params: list[Tensor], states: list[dict[str, Any]], moment_names: tuple[str, ...], meta_moment_names: tuple[str, ...],
    *, blocks: str, fresh: bool, rows: Tensor | None = None,
) -> Partition | None:
    """Move the state of one partition into flat buffers; ``None`` when its counters differ.

    ``states`` must hold each parameter's state already (``trace``, ``step``, the moments; for
    ``blocks`` "tensor" and "weight" the block's ``beta``, ``meta_step`` and meta moments).
    ``fresh``: the optimizer created all of it in this step, so the counters are all zero.
    """
    has_meta = blocks in ("tensor", "weight")  # "node": the blocks are shared across partitions (Nodes)
    if not _equal([s["step"] for s in states], fresh) or (has_meta and not _equal([s["meta_step"] for s in states], fresh)):
        return None
    dtype = params[0].dtype
    weights, weight_views = _flat(states, "", params, dtype)
    grads, grad_views = _flat(states, "", params, dtype, copy=False)
    flat = {key: _flat(states, key, [s[key] for s in states], dtype)[0] for key in ("trace", *moment_names)}
    steps = _flat(states, "step", [s["step"] for s in states], states[0]["step"].dtype)[0]
    meta = meta_steps = None
    if has_meta:
        meta_dtype = states[0]["beta"].dtype
        meta = {key: _flat(states, key, [s[key] for s in states], meta_dtype)[0]
                for key in ("beta", *(f"meta_{name}" for name in meta_moment_names))}
        meta_steps = _flat(states, "meta_step", [s["meta_step"] for s in states], meta_dtype)[0]
    lengths = torch.tensor([p.numel() for p in params], device=params[0].device) if blocks == "tensor" else None
    return Partition(
        params=params, blocks=blocks, weights=weights, weight_views=weight_views, grads=grads, grad_views=grad_views,
        trace=flat["trace"], moments={name: flat[name] for name in moment_names}, steps=steps, step=steps[0],
        lengths=lengths, rows=rows, meta=meta, meta_steps=meta_steps,
        meta_step=None if meta_steps is None else meta_steps[0],
    )


@dataclass
class Nodes:
    """Every nodewise block of an optimizer in flat buffers: a bias takes its step sizes from the
    rows of its weight, which may sit in another param group, so the blocks' meta state is one
    set of buffers for all groups, each block's rows one after another, ordered by meta group."""

    partitions: list[tuple[int, Partition]]  # (param group, its parameters with gradients)
    meta: dict[str, Tensor]  # "beta" and the meta moments, one entry per row
    meta_steps: Tensor  # one counter per block, all equal
    meta_step: Tensor
    ranges: list[tuple[int, slice]]  # (meta group, its rows)


def build_nodes(
    groups: list[tuple[int, list[Tensor], list[dict[str, Any]], list[Tensor]]],
    owners: list[tuple[int, dict[str, Any]]], moment_names: tuple[str, ...], meta_moment_names: tuple[str, ...],
    *, fresh: bool,
) -> Nodes | None:
    """Move the nodewise state into flat buffers; ``None`` when counters differ.

    ``groups``: (param group, parameters, their states, each one's rows as in :class:`Nodes`);
    ``owners``: (meta group, state) of each block, in the order of its rows.
    """
    partitions = []
    for index, params, states, rows in groups:
        partition = build(params, states, moment_names, meta_moment_names, blocks="node", fresh=fresh,
                          rows=torch.cat(rows))
        if partition is None:
            return None
        partitions.append((index, partition))
    states = [state for _, state in owners]
    if not _equal([s["meta_step"] for s in states], fresh):
        return None
    meta_dtype = states[0]["beta"].dtype
    meta = {key: _flat(states, key, [s[key] for s in states], meta_dtype)[0]
            for key in ("beta", *(f"meta_{name}" for name in meta_moment_names))}
    meta_steps = _flat(states, "meta_step", [s["meta_step"] for s in states], meta_dtype)[0]
    ranges, start = [], 0
    for meta_group in dict.fromkeys(group for group, _ in owners):
        end = start + sum(state["beta"].numel() for group, state in owners if group == meta_group)
        ranges.append((meta_group, slice(start, end)))
        start = end
    return Nodes(partitions, meta, meta_steps, meta_steps[0], ranges)
