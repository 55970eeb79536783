"""Where the state of a Hessian-free step lives: a plan of segments.

:func:`metaopt.hessian_free.step` is one loop over a :class:`Plan`, whatever the kernel: each
*segment* holds some parameters with gradients and their state as lists of tensors that a kernel
(:mod:`metaopt.kernels`) updates, and each *meta segment* some step-size blocks. A segment has

* ``gather()``: the gradients as the kernel reads them, and the weights where the kernel updates them;
* ``meta_grads(kernel, grads)``: the meta-gradient terms ``h * g`` with the trace from before the
  step, one per entry of ``block_keys`` (the keys of the blocks they add to);
* ``alphas(of)``: the step sizes before the meta update, broadcastable to ``weights``;
* ``scatter()``: the updated weights back into the parameters.

Two layouts:

* :class:`TensorSegment`: each parameter's own state tensors (``state[p]["trace"]`` ...), the
  ``reference``, ``foreach`` and ``compiled`` kernels; ``gather`` reads the gradient list, ``scatter``
  does nothing.
* :class:`FlatSegment` (``kernel="flat"``): the parameters of one param group that share a device
  and a dtype, with the trace and the base moments in one flat buffer each; ``state[p]`` holds
  views into them, so ``state_dict()`` and checkpoints stay per parameter. ``gather`` copies the
  gradients and the weights into two flat buffers (one op each), ``scatter`` copies the weights
  back. For ``layerwise`` and ``weightwise`` blocks the blocks' meta state (``beta``, the meta
  moments, ``meta_step``) is flat too, and for ``nodewise`` every block's rows are one set of
  buffers for all param groups (a bias takes the rows of its weight, which may sit in another
  group). So the number of operations a step dispatches does not depend on the number of
  tensors: the fast layout where a step is bound by launches and Python (a GPU, many small
  tensors). The price is memory: the two gather buffers, one copy of the weights and one of the
  gradients.

The copies cost six passes over the segment's memory a step, which on a CPU, where a step is
bound by memory, outweighs what they save once tensors are large: measured on one thread (62
tensors, (AdamW, Lion)), the flat step takes 0.26x the ``foreach`` step's time at 1k elements
a tensor, 0.8x at 64k-128k and 1.2x at 256k. So on a CPU the parameters whose tensors average
more than ``CPU_MAX_MEAN_NUMEL`` elements keep a :class:`TensorSegment` (:func:`pays_off`); on a
GPU, where a step is bound by launches, flat buffers always pay off.

All parameters of a flat segment take their steps together, so their step counters are equal
and the bias corrections are those of one counter. This holds for state the optimizer created
itself. Parameters whose counters may differ (state loaded from a checkpoint, or a step in
which only some of them had gradients) are checked once, reading the counters back to the host;
if they differ, they keep a :class:`TensorSegment`.

The plan is built when the parameters with gradients, the param groups, or the parameters'
shapes or dtypes change (:func:`signature`; :meth:`metaopt.MetaOptimize._plan`), and under
``torch.compile`` at every traced step (per tensor: Inductor fuses the ops anyway).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Callable, Hashable, NamedTuple

import torch
from torch import Tensor

from metaopt import distributed
from metaopt.distributed import local
from metaopt.granularity import Placement

CPU_MAX_MEAN_NUMEL = 1 << 17


def pays_off(params: list[Tensor]) -> bool:
    """Whether flat buffers make these parameters' steps faster (see the module docstring)."""
    return params[0].device.type != "cpu" or sum(p.numel() for p in params) <= CPU_MAX_MEAN_NUMEL * len(params)


def by_kind(params: list[Tensor]) -> list[list[Tensor]]:
    """The parameters by (device, dtype, sharded or not), in their order."""
    kinds: dict[tuple[torch.device, torch.dtype, bool], list[Tensor]] = {}
    for p in params:
        kinds.setdefault((p.device, p.dtype, distributed.is_sharded(p)), []).append(p)
    return list(kinds.values())


# -- the segments ----------------------------------------------------------------------------


class TensorSegment:
    """Parameters of one param group with their own state tensors."""

    def __init__(self, group: int, params: list[Tensor], states: list[dict[str, Any]], placements: list[Placement],
                 owners: list[dict[str, Any]], moment_names: tuple[str, ...], reduces: bool):
        self.group = group
        self.params = params
        self.weights = [local(p) for p in params]
        self.traces = [local(s["trace"]) for s in states]
        self.moments = {name: [local(s[name]) for s in states] for name in moment_names}
        self.counters = self.steps = [s["step"] for s in states]
        self.view_shapes = [placement.view_shape for placement in placements]
        self.block_keys = [placement.number for placement in placements]
        self.partial = [reduces and distributed.is_sharded(p) for p in params]  # terms summed over the mesh
        self.betas = [local(owner["beta"]) for owner in owners]
        # nodewise: (rows, 1, ..., 1) terms of a (rows,) beta
        self.term_shapes = [beta.shape if len(shape) != beta.dim() else None for shape, beta in zip(self.view_shapes, self.betas)]

    def gather(self) -> list[Tensor]:
        return [local(p.grad) for p in self.params]

    def meta_grads(self, kernel, grads: list[Tensor]) -> list[Tensor]:
        terms = kernel.meta_grads(self.traces, grads, self.view_shapes)
        return [(z if shape is None else z.view(shape)).to(beta.dtype)
                for z, shape, beta in zip(terms, self.term_shapes, self.betas)]

    def alphas(self, of: Callable[[Hashable, tuple[int, ...], Tensor], Tensor]) -> list[Tensor]:
        return [of(number, shape, beta) for number, shape, beta in zip(self.block_keys, self.view_shapes, self.betas)]

    def scatter(self) -> None:
        pass


@dataclass(eq=False)
class FlatSegment:
    """Parameters of one param group, device and dtype with their state in flat buffers."""

    group: int
    params: list[Tensor]
    shards: list[Tensor]  # the parameters' local tensors (the parameters themselves unless DTensors)
    kind: str  # "one" (scalar, param_group: one step size), "tensor" (layerwise), "weight", "node"
    weights: list[Tensor]  # [the gathered weights]: the update runs on them, then they are scattered back
    weight_views: list[Tensor]
    grads: Tensor
    grad_views: list[Tensor]
    traces: list[Tensor]  # [the flat trace]
    moments: dict[str, list[Tensor]]
    counters: list[Tensor]  # [one counter per parameter] (state[p]["step"] are its entries), all equal
    steps: list[Tensor]  # [its first entry]: the counter of the bias corrections
    beta: Tensor  # "one": the block's; "tensor", "weight": the segment's blocks', flat; "node": every nodewise row's
    block: Hashable  # the key its meta-gradient terms add to
    lengths: Tensor | None = None  # "tensor": each tensor's number of elements
    rows: Tensor | None = None  # "node": each element's row among the rows of all nodewise blocks
    meta: MetaSegment | None = None  # "tensor", "weight": its blocks, whose state it holds
    partial: list[bool] = field(default_factory=lambda: [False])  # its terms are partial sums over the mesh
    block_keys: list[Hashable] = field(init=False)

    def __post_init__(self):
        self.block_keys = [self.block]

    def gather(self) -> list[Tensor]:
        torch._foreach_copy_(self.grad_views, [local(p.grad) for p in self.params])
        torch._foreach_copy_(self.weight_views, self.shards)
        return [self.grads]

    def scatter(self) -> None:
        torch._foreach_copy_(self.shards, self.weight_views)

    def meta_grads(self, kernel, grads: list[Tensor]) -> list[Tensor]:
        """The terms ``h * g`` summed over each block: one, each tensor's, each weight's, or each row's."""
        trace, g = self.traces[0], grads[0]
        if self.kind == "one":
            z = torch.dot(trace, g)
        elif self.kind == "tensor":
            z = torch.segment_reduce(trace * g, "sum", lengths=self.lengths)
        elif self.kind == "node":
            return [torch.zeros_like(self.beta).index_add_(0, self.rows, (trace * g).to(self.beta.dtype))]
        else:
            z = trace * g
        return [z.to(self.beta.dtype)]

    def alphas(self, of: Callable[[Hashable, tuple[int, ...], Tensor], Tensor]) -> list[Tensor]:
        """The blocks' step sizes for each element, in the weights' dtype."""
        if self.kind == "one":
            return [of(self.block, (), self.beta)]
        step_sizes = of(self.block, tuple(self.beta.shape), self.beta).to(self.traces[0].dtype)
        if self.kind == "tensor":
            return [torch.repeat_interleave(step_sizes, self.lengths, output_size=self.traces[0].numel())]
        if self.kind == "node":
            return [step_sizes.index_select(0, self.rows)]
        return [step_sizes]


class MetaSegment(NamedTuple):
    """Step-size blocks of one meta group (the param group whose meta hyper-parameters they use)."""

    group: int
    keys: list[Hashable]  # the keys of their meta-gradients
    betas: list[Tensor]
    moments: dict[str, list[Tensor]]
    counters: list[Tensor]
    steps: list[Tensor]
    rows: slice | None = None  # nodewise: its rows of the one meta-gradient of every row

    def meta_grads(self, sums: dict[Hashable, Tensor]) -> list[Tensor]:
        if self.rows is None:
            return [sums[key] for key in self.keys]
        return [sums[self.keys[0]][self.rows]]


class Plan(NamedTuple):
    key: Any  # what it was built for (see MetaOptimize._plan)
    segments: list
    meta_segments: list[MetaSegment]
    by_group: dict[int, tuple[Any, list]]  # each group's segments and key, kept when only other groups change
    reduction: distributed.MeshReduction | None = None  # sums the partial meta-gradients over the mesh
    learned: Any = None  # learn=(...) beyond step sizes: a metaopt.learned.LearnedPlan aligned with segments


# -- flat buffers ------------------------------------------------------------------------------


def _pack(states: list[dict[str, Any]], key: str, values: list[Tensor], dtype: torch.dtype, *, copy: bool = True
          ) -> tuple[Tensor, list[Tensor]]:
    """A flat buffer holding ``values`` one after another (with ``copy``); with ``key``, each
    ``state[key]`` becomes a view of it shaped as its old value (laid out as it: a ``DTensor`` stays one,
    viewing the buffer). ``values`` are local tensors. Returns the buffer and the views."""
    buffer = torch.zeros(sum(value.numel() for value in values), dtype=dtype, device=values[0].device)
    views, offset = [], 0
    for value in values:
        view = buffer[offset : offset + value.numel()].view(value.shape)
        if copy:
            view.copy_(value)
        views.append(view)
        offset += value.numel()
    if key:
        for state, view in zip(states, views):
            state[key] = distributed.like(state[key], view)
    return buffer, views


def _equal(counters: list[Tensor], fresh: bool) -> bool:
    """Whether the step counters are equal: known for state created together, else read back once."""
    if fresh or len(counters) == 1:
        return True
    stacked = torch.stack(counters)
    return bool((stacked == stacked[0]).all())


def _pack_meta(states: list[dict[str, Any]], meta_moment_names: tuple[str, ...]) -> tuple[dict[str, Tensor], Tensor]:
    """The blocks' beta and meta moments in flat buffers, and their counters."""
    dtype = states[0]["beta"].dtype
    meta = {key: _pack(states, key, [local(s[key]) for s in states], dtype)[0]
            for key in ("beta", *(f"meta_{name}" for name in meta_moment_names))}
    return meta, _pack(states, "meta_step", [s["meta_step"] for s in states], dtype)[0]


def _flat_segment(group: int, params: list[Tensor], states: list[dict[str, Any]], moment_names: tuple[str, ...], *,
                  kind: str, beta: Tensor, block: Hashable, rows: Tensor | None = None, partial: bool = False) -> FlatSegment:
    """Move the state of ``params`` into flat buffers (their counters must be equal)."""
    dtype = params[0].dtype
    shards = [local(p) for p in params]
    weights, weight_views = _pack(states, "", shards, dtype)
    grads, grad_views = _pack(states, "", shards, dtype, copy=False)
    buffers = {key: _pack(states, key, [local(s[key]) for s in states], dtype)[0] for key in ("trace", *moment_names)}
    steps = _pack(states, "step", [s["step"] for s in states], states[0]["step"].dtype)[0]
    lengths = torch.tensor([p.numel() for p in shards], device=shards[0].device) if kind == "tensor" else None
    return FlatSegment(
        group=group, params=params, shards=shards, kind=kind, weights=[weights], weight_views=weight_views, grads=grads,
        grad_views=grad_views, traces=[buffers["trace"]], moments={name: [buffers[name]] for name in moment_names},
        counters=[steps], steps=[steps[0]], beta=local(beta), block=block, lengths=lengths, rows=rows,
        partial=[partial],
    )


# -- building a plan -----------------------------------------------------------------------------


class Context(NamedTuple):
    """What a plan is built from: the optimizer's groups, state and block placements."""

    param_groups: list[dict[str, Any]]
    state: Any  # the optimizer's state, parameter -> dict
    placements: dict[int, Placement]  # id(p) -> where its step sizes live
    owner_state: Callable[[Any], dict[str, Any]]  # a placement's owner -> the dict that holds its block
    kind: str  # the granularity's kind of flat segment, see FlatSegment
    flat: bool  # flat buffers where they pay off
    moment_names: tuple[str, ...]
    meta_moment_names: tuple[str, ...]
    always_flat: bool = False  # flat buffers wherever the counters allow, also where copies would not pay off
    mesh: Any = None  # the device mesh of the DTensor parameters, if any
    slots: dict[int, int] = {}  # the blocks summed over the mesh: number -> slot (metaopt.distributed.reduced_blocks)


def _group_segments(context: Context, index: int, params: list[Tensor], fresh: set[int]) -> list:
    """One param group's segments: flat ones where they pay off and the counters agree, a
    :class:`TensorSegment` for the rest."""
    state, placements = context.state, context.placements
    segments, per_tensor = [], []
    kinds = by_kind(params) if context.flat and context.kind != "node" else []
    for members in kinds:
        states = [state[p] for p in members]
        own_meta = context.kind in ("tensor", "weight")  # the segment holds its blocks' state too
        created_together = all(id(p) in fresh for p in members)
        counters_agree = _equal([s["step"] for s in states], created_together) and (
            not own_meta or _equal([s["meta_step"] for s in states], created_together))
        if not (context.always_flat or pays_off(members)) or not counters_agree:
            per_tensor += members
            continue
        if own_meta:
            meta, meta_steps = _pack_meta(states, context.meta_moment_names)
            segment = _flat_segment(index, members, states, context.moment_names, kind=context.kind,
                                    beta=meta["beta"], block=object(), partial=_partial(context, members[0]))
            segment.meta = MetaSegment(index, [segment.block], [meta["beta"]],
                                       {name: [meta[f"meta_{name}"]] for name in context.meta_moment_names},
                                       [meta_steps], [meta_steps[0]])
        else:
            placement = placements[id(members[0])]
            segment = _flat_segment(index, members, states, context.moment_names, kind="one",
                                    beta=context.owner_state(placement.owner)["beta"], block=placement.number,
                                    partial=_partial(context, members[0]))
        segments.append(segment)
    if not kinds:
        per_tensor = params
    if per_tensor:
        chosen = [placements[id(p)] for p in per_tensor]
        segments.append(TensorSegment(index, per_tensor, [state[p] for p in per_tensor], chosen,
                                      [context.owner_state(placement.owner) for placement in chosen], context.moment_names,
                                      bool(context.slots)))
    return segments


def _partial(context: Context, p: Tensor) -> bool:
    """Whether the meta-gradient terms of ``p``'s segment are partial sums, to be summed over the mesh."""
    return bool(context.slots) and distributed.is_sharded(p)


def _meta_segments(context: Context, segments: list) -> list[MetaSegment]:
    """The blocks that get meta-gradient terms from ``segments``: a flat segment's own, and the
    others by meta group, in the order in which they first appear."""
    own = [segment.meta for segment in segments if isinstance(segment, FlatSegment) and segment.meta is not None]
    by_group: dict[int, dict[Hashable, dict[str, Any]]] = {}
    for segment in segments:
        if isinstance(segment, FlatSegment) and segment.meta is not None:
            continue
        params = segment.params[:1] if isinstance(segment, FlatSegment) else segment.params
        for p in params:
            placement = context.placements[id(p)]
            by_group.setdefault(placement.meta_group, {}).setdefault(placement.number, context.owner_state(placement.owner))
    for meta_group, owners in by_group.items():
        states = list(owners.values())
        steps = [s["meta_step"] for s in states]
        own.append(MetaSegment(meta_group, list(owners), [local(s["beta"]) for s in states],
                               {name: [local(s[f"meta_{name}"]) for s in states] for name in context.meta_moment_names},
                               steps, steps))
    return own


def _node_plan(context: Context, groups: list[tuple[int, list[Tensor]]], fresh: bool) -> tuple[list, list] | None:
    """Every nodewise block in one set of flat buffers; ``None`` (per-tensor segments) for parameters
    of several devices or dtypes, large tensors on a CPU, a block's owner without a gradient, or
    counters that differ."""
    state, placements = context.state, context.placements
    params = [p for _, group_params in groups for p in group_params]
    owners = sorted({id(placements[id(p)].owner): placements[id(p)].owner for p in params}.values(),
                    key=lambda owner: (placements[id(owner)].meta_group, placements[id(owner)].number))
    with_grads = {id(p) for p in params}
    if (len({(p.device, p.dtype) for p in params}) != 1 or not (context.always_flat or pays_off(params))
            or any(id(o) not in with_grads for o in owners)):
        return None
    owner_states = [state[owner] for owner in owners]
    if not all(_equal([state[p]["step"] for p in group_params], fresh) for _, group_params in groups):
        return None
    if not _equal([s["meta_step"] for s in owner_states], fresh):
        return None
    offsets, start = {}, 0
    for owner, owner_state in zip(owners, owner_states):
        offsets[id(owner)] = start
        start += local(owner_state["beta"]).numel()
    meta, meta_steps = _pack_meta(owner_states, context.meta_moment_names)
    key = object()

    def rows(p: Tensor) -> Tensor:  # the rows of the block of each element of p, row-major
        placement = placements[id(p)]
        owned = torch.arange(local(state[placement.owner]["beta"]).numel(), device=p.device) + offsets[id(placement.owner)]
        return owned.view(placement.view_shape).expand(local(p).shape).reshape(-1)

    segments = [_flat_segment(index, group_params, [state[p] for p in group_params], context.moment_names, kind="node",
                              beta=meta["beta"], block=key, rows=torch.cat([rows(p) for p in group_params]))
                for index, group_params in groups]
    meta_segments, row, block = [], 0, 0
    for meta_group in dict.fromkeys(placements[id(owner)].meta_group for owner in owners):
        mine = [s for owner, s in zip(owners, owner_states) if placements[id(owner)].meta_group == meta_group]
        end = row + sum(local(s["beta"]).numel() for s in mine)
        rows_of_group = slice(row, end)
        counters = meta_steps[block : block + len(mine)]
        meta_segments.append(MetaSegment(
            meta_group, [key], [meta["beta"][rows_of_group]],
            {name: [meta[f"meta_{name}"][rows_of_group]] for name in context.meta_moment_names},
            [counters], [counters[0]], rows=None if (row, end) == (0, meta["beta"].numel()) else rows_of_group,
        ))
        row, block = end, block + len(mine)
    return segments, meta_segments


def build(context: Context, groups: list[tuple[int, list[Tensor]]], key: Any, fresh: set[int], previous: Plan | None) -> Plan:
    """The plan of a step for ``groups``, (param group, its parameters with gradients) whose state
    exists; ``fresh``: the ids of the parameters whose state this step created. A group whose
    parameters did not change keeps its segments from ``previous``."""
    if context.flat and context.kind == "node":
        built = _node_plan(context, groups, all(id(p) in fresh for _, ps in groups for p in ps))
        if built is not None:  # nodewise blocks are rows, never split between ranks: nothing to reduce
            return Plan(key, built[0], built[1], {})
    by_group, segments = {}, []
    kept = previous.by_group if previous is not None and context.kind != "node" else {}
    for index, params in groups:
        group_key = tuple(map(id, params))
        if index in kept and kept[index][0] == group_key:
            by_group[index] = kept[index]
        else:
            by_group[index] = (group_key, _group_segments(context, index, params, fresh))
        segments += by_group[index][1]
    reduced = {}  # the keys of the partial sums -> the numbers of the blocks of their entries
    for segment in segments:
        for block, partial in zip(segment.block_keys, segment.partial):
            if partial:
                tensors = isinstance(segment, FlatSegment) and segment.kind == "tensor"
                reduced[block] = [context.placements[id(p)].number for p in segment.params] if tensors else [block]
    reduction = distributed.reduction(context.mesh, context.slots, reduced, context.param_groups)
    return Plan(key, segments, _meta_segments(context, segments), by_group, reduction)


# -- what a step cannot take ---------------------------------------------------------------------


def _name(group: dict[str, Any], index: int, position: int) -> str:
    names = group.get("param_names")
    return repr(names[position]) if names else f"param_groups[{index}]['params'][{position}]"


def check_params(group: dict[str, Any], index: int) -> None:
    """TypeError for a parameter that MetaOptimize cannot update: a complex one (its step sizes and
    its moments would be complex, not the rules' real ones)."""
    for position, p in enumerate(group["params"]):
        if p.is_complex():
            raise TypeError(
                f"parameter {_name(group, index, position)} is complex ({p.dtype}): MetaOptimize learns real step "
                "sizes for real weights. Optimize its real and imaginary parts as a real parameter instead, "
                "e.g. nn.Parameter(torch.view_as_real(z)) with torch.view_as_complex(...) in the forward pass"
            )


def check_layouts(param_groups: list[dict[str, Any]], placements: dict[int, Placement], approx_kind: str,
                  skip_nonfinite: bool, plain_only: str | None = None) -> None:
    """ValueError, naming the parameter and the fix, for a ``DTensor`` parameter the step cannot take:
    a mesh of more than one dimension or another mesh than the other parameters', a placement other
    than ``Shard(0)`` or ``Replicate()``, a bias sharded otherwise than its weight's rows (nodewise), and
    the options that need whole tensors (approx ``"l"`` / ``"2x2"``, ``skip_nonfinite``) or plain ones
    (``plain_only``: ``"kernel='triton'"``, ``"storage='contiguous'"``)."""
    meshes = []
    for index, group in enumerate(param_groups):
        for position, p in enumerate(group["params"]):
            name = _name(group, index, position)
            owner = placements[id(p)].owner
            laid_out_as_owner = getattr(owner, "placements", None) == getattr(p, "placements", None)
            if isinstance(owner, Tensor) and owner is not p and not laid_out_as_owner:
                raise ValueError(f"parameter {name} takes the step sizes of its weight's rows (blocks='nodewise') but is "
                                 "laid out otherwise than that weight: shard both along dim 0 on the same mesh")
            if not distributed.is_dtensor(p):
                continue
            from torch.distributed.tensor import Replicate, Shard

            if approx_kind != "hessian_free":
                raise ValueError(f"parameter {name} is a DTensor: approx={approx_kind!r} keeps Hessian-vector products "
                                 "of whole tensors; use approx='hessian_free' (the default) with fully_shard")
            if plain_only is not None:
                raise ValueError(f"parameter {name} is a DTensor: {plain_only} takes plain tensors only; use "
                                 "kernel='flat' and storage='separate' (the defaults) with fully_shard")
            if skip_nonfinite:
                raise ValueError(f"parameter {name} is a DTensor: skip_nonfinite=True is not implemented for sharded "
                                 "parameters; leave it False and let the trainer stop on a non-finite loss")
            if p.device_mesh.ndim != 1:
                raise ValueError(f"parameter {name} lives on a {p.device_mesh.ndim}-D device mesh: MetaOptimize takes "
                                 "1-D meshes (fully_shard(module, mesh=init_device_mesh(device, (world_size,))))")
            if any(not isinstance(pl, Replicate) and pl != Shard(0) for pl in p.placements):
                raise ValueError(f"parameter {name} has placements {p.placements}: MetaOptimize takes Shard(0) "
                                 "(fully_shard's default) or Replicate(); shard dim 0, or redistribute it")
            if meshes and p.device_mesh != meshes[0]:
                raise ValueError(f"parameter {name} is on mesh {p.device_mesh}, the others on {meshes[0]}: one "
                                 "MetaOptimize takes parameters of one device mesh; build one optimizer per mesh")
            meshes.append(p.device_mesh)


def signature(groups: list[tuple[int, list[Tensor]]]) -> list:
    """What the plan's segments and state were made for besides the parameters themselves, compared
    at every step in C loops (about 8 microseconds for 60 tensors): each parameter's shape and dtype,
    which ``model.double()``, ``.half()``, a swap between bfloat16 and float16, pruning and a reshape
    all change. A gradient that becomes sparse while the parameters stay the same is found where the
    plan is next built."""
    return [(list(map(_SHAPE, params)), list(map(_DTYPE, params))) for _, params in groups]


_SHAPE = attrgetter("shape")
_DTYPE = attrgetter("dtype")


def check_step_inputs(param_groups: list[dict[str, Any]], groups: list[tuple[int, list[Tensor]]], state) -> None:
    """Before a plan is built, and so before any work: TypeError for a sparse gradient, ValueError for a
    parameter whose dtype or shape changed since its state was made."""
    for index, params in groups:
        group = param_groups[index]
        positions = {id(p): position for position, p in enumerate(group["params"])}
        for p in params:
            name = _name(group, index, positions[id(p)])
            if p.grad.layout != torch.strided:
                raise TypeError(
                    f"parameter {name} has a {p.grad.layout} gradient: MetaOptimize takes dense gradients. "
                    "Use nn.Embedding(..., sparse=False), or another optimizer (torch.optim.SparseAdam) for that parameter"
                )
            trace = state[p].get("trace") if p in state else None
            if trace is not None and (trace.dtype != p.dtype or trace.dim() < p.dim()
                                      or tuple(trace.shape[trace.dim() - p.dim():]) != tuple(p.shape)):
                raise ValueError(
                    f"parameter {name} is now {p.dtype} of shape {tuple(p.shape)}, but its optimizer state was made for "
                    f"{trace.dtype} of shape {tuple(trace.shape)}: convert or reshape the model before building "
                    "MetaOptimize (model.double(), pruning), or build a new MetaOptimize after the change"
                )
