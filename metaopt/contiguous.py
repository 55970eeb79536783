"""Contiguous storage (``MetaOptimize(..., storage="contiguous")``): the parameters and their gradients
live in the flat buffers of the step.

With the default ``storage="separate"`` each parameter keeps its own tensor, and the flat layout
(:class:`metaopt.plan.FlatSegment`) copies the gradients and the weights into two flat buffers before
the update and the weights back after it: six passes over the segment's memory a step, and the memory
of one copy of the weights and one of the gradients.

With ``storage="contiguous"`` the flat segment's weight buffer *is* the parameters' storage: when a
plan is built, every parameter of the segment becomes a view of it (``p.data = view``, so the
``nn.Parameter`` objects, the model and its ``state_dict`` stay as they were) and every gradient a view
of the segment's gradient buffer (``p.grad = view``). ``loss.backward()`` accumulates into an existing
gradient in place, and :meth:`metaopt.MetaOptimize.zero_grad` zeroes it in place, so after the first
step the gradients arrive in the flat buffer and the step neither gathers nor scatters. That holds
until something replaces a gradient (``model.zero_grad()`` sets it to None, a hook or
``create_graph=True`` backward assigns a new tensor) or a parameter's storage (``p.data = ...``): each
step checks every parameter and gradient (a pointer comparison each, microseconds for a model) and
copies the replaced ones in, as the separate storage does, and makes them views again.

What changes for the user:

* a parameter's memory is a view of a buffer shared by its param group (per device and dtype): a
  ``channels_last`` parameter becomes contiguous; ``p.data_ptr()`` changes when a plan is rebuilt
  (after a change of the parameters with gradients, a ``load_state_dict``);
* the memory is that of the separate storage: the old parameter and gradient tensors are freed, and
  no gather buffers are held;
* a parameter that is ever in a step keeps a gradient (zeros after ``zero_grad``), as with
  ``zero_grad(set_to_none=False)``;
* checkpoints stay per parameter, the optimizer's (``state[p]`` are views) and the model's.

With DDP's ``gradient_as_bucket_view=True`` the gradients are DDP's bucket views, which DDP sets again
at each backward: each step then copies them in, as the separate storage does; keep the separate
storage there, and with FSDP2, whose own flat buffers hold the parameters' shards (not tested with
either).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from metaopt.plan import FlatSegment, Plan

STORAGES = ("separate", "contiguous")


# On a CPU the eager kernels' temporaries are as large as the lists they work on; glibc maps every
# allocation above 32 MiB afresh (page faults, zeroed pages) and frees it after, which on ResNet-18's
# 11.2M parameters in one buffer doubled the eager step's time. Cut into chunks of at most this many
# elements, the temporaries come from the heap again.
CPU_CHUNK_NUMEL = 1 << 21


@dataclass(eq=False)
class ContiguousSegment(FlatSegment):
    """A :class:`FlatSegment` whose parameters are views of its weight buffer and whose gradients are
    views of its gradient buffer: nothing to gather or scatter while they stay so. With ``chunk``, the
    kernel's update sees the buffers as lists of views of at most ``chunk`` elements (the same
    arithmetic, element by element)."""

    chunk: int | None = None
    whole: FlatSegment | None = None  # the same buffers unchunked, for the meta-gradient and the step sizes

    def __post_init__(self):
        super().__post_init__()
        if self.chunk is None:
            return
        self.whole = FlatSegment(**{f.name: getattr(self, f.name) for f in fields(FlatSegment) if f.init})
        self.weights = list(self.weights[0].split(self.chunk))
        self.traces = list(self.traces[0].split(self.chunk))
        self.moments = {name: list(values[0].split(self.chunk)) for name, values in self.moments.items()}
        self.steps = self.steps * len(self.weights)

    def gather(self) -> list[Tensor]:
        moved = [i for i, (p, view) in enumerate(zip(self.params, self.weight_views)) if p.data_ptr() != view.data_ptr()]
        for i in moved:  # a parameter given new storage since: its values are the new ones
            self.weight_views[i].copy_(self.params[i])
            self.params[i].data = self.weight_views[i]
        for p, view in zip(self.params, self.grad_views):
            if p.grad is not view:  # replaced (set to None and recomputed, assigned): copied in, a view again
                view.copy_(p.grad)
                p.grad = view
        return [self.grads] if self.chunk is None else list(self.grads.split(self.chunk))

    def meta_grads(self, kernel, grads: list[Tensor]) -> list[Tensor]:
        return super().meta_grads(kernel, grads) if self.chunk is None else self.whole.meta_grads(kernel, [self.grads])

    def alphas(self, of) -> list[Tensor]:
        if self.chunk is None:
            return super().alphas(of)
        alphas = self.whole.alphas(of)[0]
        return [alphas] * len(self.weights) if alphas.dim() == 0 else list(alphas.split(self.chunk))

    def scatter(self) -> None:
        pass


def _adopted(segment: FlatSegment, chunk: bool) -> ContiguousSegment:
    """The segment, its parameters now views of its weight buffer (which the plan filled with their
    values) and their gradients views of its gradient buffer; with ``chunk``, cut into chunks for the
    eager kernels if it is on a CPU and larger than :data:`CPU_CHUNK_NUMEL`."""
    if isinstance(segment, ContiguousSegment):
        return segment
    chunked = chunk and segment.grads.device.type == "cpu" and segment.grads.numel() > CPU_CHUNK_NUMEL
    contiguous = ContiguousSegment(**{f.name: getattr(segment, f.name) for f in fields(segment) if f.init},
                                   chunk=CPU_CHUNK_NUMEL if chunked else None)
    torch._foreach_copy_(contiguous.grad_views, [p.grad for p in segment.params])
    for p, weight, grad in zip(segment.params, contiguous.weight_views, contiguous.grad_views):
        p.data = weight
        p.grad = grad
    return contiguous


def adopt(built: Plan, chunk: bool) -> Plan:
    """``built`` with each flat segment made contiguous (those already contiguous kept as they are);
    ``chunk``: for a kernel that takes lists of tensors (not one that fuses a flat segment's step)."""
    adopted = {id(segment): _adopted(segment, chunk) for segment in built.segments if isinstance(segment, FlatSegment)}

    def swap(segments: list) -> list:
        return [adopted.get(id(segment), segment) for segment in segments]

    by_group = {index: (key, swap(segments)) for index, (key, segments) in built.by_group.items()}
    return built._replace(segments=swap(built.segments), by_group=by_group)

