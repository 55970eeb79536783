"""The arithmetic of a MetaOptimize step, as functions of lists of tensors (torch.optim style).

A :class:`Kernel` has three functions, which :func:`metaopt.hessian_free.step` calls on the
segments of a plan (:mod:`metaopt.plan`), the step counters already counting this step:
``meta_grads`` (each tensor's meta-gradient term with the trace from before the step, summed to
its block's view), ``update`` (the base update and the trace) and ``meta_update`` (the log step
sizes of a list of blocks). Five kernels:

* ``reference``: one tensor at a time, reading as the equations of :class:`metaopt.MetaOptimize`.
  It is the source of truth that the tests hold the others to.
* ``foreach``: multi-tensor ``torch._foreach_*`` ops in eager mode, written to make few passes
  over memory: the meta-gradient is a dot product per tensor (no product temporary), the
  direction is overwritten by the weight change, and the trace takes that change in one
  ``addcmul``. Works on every device, and under ``torch.compile`` of a training step.
* ``flat``: the ``foreach`` functions run on a few flat buffers per param group instead of one
  tensor per parameter (a layout, :class:`metaopt.plan.FlatSegment`), so that the number of ops a step dispatches does
  not grow with the number of tensors: the fast kernel where a step is bound by launches and
  Python (a GPU, many small tensors).
* ``compiled``: the ``foreach`` update compiled with ``torch.compile`` (one graph per param
  group), so that Inductor fuses the update of each tensor into one loop: it reads the
  weight, gradient, moments and trace once and writes each once, as a fused AdamW does plus
  the trace. The meta-gradient's dot products stay outside the graph, one more read of the
  trace and gradient. The first step compiles (4-13 s for ResNet-18 on a 2-core CPU);
  later steps are the fastest.
* ``triton``: each flat segment's step in two Triton launches, one pass over its memory
  (:mod:`metaopt.triton_kernel`); CUDA, or Triton's interpreter on a CPU.

Every kernel reads ``step_sizes`` as tensors and nothing back to the host. With hyper-parameters learned
beyond the step size, a kernel's ``learned_update`` does the base update and every trace
(:mod:`metaopt.learned`): forward-mode differentiation of the rule for ``reference``, the hand-derived
traces for the others (compiled for ``compiled``).
"""

from __future__ import annotations

import types
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from metaopt import learned


def _reference_meta_grads(traces, grads, view_shapes) -> list[Tensor]:
    """Each tensor's meta-gradient term ``h * g`` (the trace from before the step), summed to its block's view."""
    return [(h * g).sum_to_size(shape) for h, g, shape in zip(traces, grads, view_shapes)]


def _reference_update(params, grads, traces, moments, steps, step_sizes, *, rule, hp, weight_decay, gamma) -> None:
    """Base update and trace, tensor by tensor; ``steps`` already count this step."""
    for i, (w, g, h) in enumerate(zip(params, grads, traces)):
        d = rule.direction_of(g, moments, i, hp, steps[i])
        alpha = step_sizes[i]
        dw = -alpha * (d + weight_decay * w)
        w.add_(dw)
        h.mul_(gamma * (1 - weight_decay * alpha)).add_(dw)


def _reference_meta_update(betas, meta_grads, moments, steps, *, rule, hp, meta_lr, meta_weight_decay) -> None:
    """``beta <- (1 - meta_lr * meta_weight_decay) * beta - meta_lr * d(z)`` block by block; ``steps``
    already count this step."""
    for i, (beta, z) in enumerate(zip(betas, meta_grads)):
        u = rule.direction_of(z, moments, i, hp, steps[i])
        beta.mul_(1 - meta_lr * meta_weight_decay).sub_(meta_lr * u)


def _inner_products(h: Tensor, g: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``(h * g).sum_to_size(shape)`` for the three block shapes: per weight (``shape`` is
    ``h``'s), one block (all ones), or one block per row (``(rows, 1, ..., 1)``, nodewise).
    Sums are dot products, which read ``h`` and ``g`` once and write no parameter-sized product."""
    if shape == tuple(h.shape):
        return h * g
    if all(size == 1 for size in shape):
        if h.is_contiguous() and g.is_contiguous():
            return torch.dot(h.view(-1), g.view(-1)).view(shape)
        return (h * g).sum().view(shape)
    rows = shape[0]
    return torch.bmm(h.reshape(rows, 1, -1), g.reshape(rows, -1, 1)).view(shape)


def _foreach_meta_grads(traces, grads, view_shapes) -> list[Tensor]:
    """:func:`_reference_meta_grads` as dot products (left out of any compiled graph)."""
    return [_inner_products(h, g, shape) for h, g, shape in zip(traces, grads, view_shapes)]


def _owns_directions(directions, grads, moments, rule) -> bool:
    """Whether the directions are new tensors that the kernel may overwrite: a rule's
    ``foreach_direction`` returns the gradients, a moment list, or new tensors."""
    # Compared element by element: torch.compile traces `is` on tensors, not on lists of them.
    return rule.foreach_direction is not None and not any(
        directions[0] is others[0] for others in (grads, *moments.values())
    )


def _per_step_size(function: Callable[[list[Tensor]], list[Tensor]], step_sizes: list[Tensor]) -> list[Tensor]:
    """``function(step_sizes)``, computed in eager mode once per distinct tensor: the driver
    passes one step size tensor per block and param group, shared by the block's tensors."""
    if torch.compiler.is_compiling():  # Inductor fuses these small ops into the update anyway
        return function(step_sizes)
    distinct = {id(alpha): alpha for alpha in step_sizes}
    values = dict(zip(distinct, function(list(distinct.values()))))
    return [values[id(alpha)] for alpha in step_sizes]


def _foreach_update(params, grads, traces, moments, steps, step_sizes, *, rule, hp, weight_decay, gamma) -> None:
    """Base update and trace of :func:`_reference_update` with multi-tensor ops; ``steps``
    already count this step."""
    directions = rule.directions(grads, moments, hp, steps)
    # dw = -alpha * (d + kappa * w), in the directions' memory when they are the kernel's own.
    neg_step_sizes = _per_step_size(torch._foreach_neg, step_sizes)
    if _owns_directions(directions, grads, moments, rule):
        updates = directions
        torch._foreach_mul_(updates, neg_step_sizes)
    else:
        updates = torch._foreach_mul(directions, neg_step_sizes)
    del directions
    if weight_decay != 0:
        torch._foreach_addcmul_(updates, params, neg_step_sizes, value=weight_decay)
    torch._foreach_add_(params, updates)
    # h <- gamma * (1 - kappa * alpha) * h + dw, the decay a number without weight decay
    decays = gamma
    if weight_decay != 0:
        def trace_decays(alphas):
            return torch._foreach_add(torch._foreach_mul(alphas, -gamma * weight_decay), gamma)

        decays = _per_step_size(trace_decays, step_sizes)
    if torch.compiler.is_compiling():  # Inductor fuses these; out= would only get in its way
        torch._foreach_mul_(traces, decays)
        torch._foreach_add_(traces, updates)
        return
    for i, (h, dw) in enumerate(zip(traces, updates)):
        if weight_decay != 0:
            torch.addcmul(dw, h, decays[i], out=h)
        else:
            torch.add(dw, h, alpha=gamma, out=h)


def _foreach_meta_update(betas, meta_grads, moments, steps, *, rule, hp, meta_lr, meta_weight_decay) -> None:
    """Meta update of :func:`_reference_meta_update` with multi-tensor ops; ``steps`` already count this step."""
    directions = rule.directions(meta_grads, moments, hp, steps)
    if meta_weight_decay != 0:
        torch._foreach_mul_(betas, 1 - meta_lr * meta_weight_decay)
    torch._foreach_add_(betas, directions, alpha=-meta_lr)


def _compiled(function: Callable) -> Callable:
    """``torch.compile(function)`` with a code object of its own: Dynamo keeps compiled graphs
    per code object and falls back to eager past ``recompile_limit`` of them, so each param
    group of each optimizer gets its own copy and its own graphs."""
    code = function.__code__.replace()
    copy = types.FunctionType(
        code, function.__globals__, function.__name__, function.__defaults__, function.__closure__
    )
    return torch.compile(copy, fullgraph=True, dynamic=False)


class DeferredTerms:
    """Meta-gradient terms that a fused kernel left unreduced (partial sums), which its ``meta_update``
    reduces in the same launch as the update; :meth:`reduced` gives them as a tensor shaped as the
    block's ``beta``, where they are summed with other terms or sliced first."""

    def reduced(self) -> Tensor:
        raise NotImplementedError

    def __getitem__(self, index) -> Tensor:
        return self.reduced()[index]


class Kernel(NamedTuple):
    """The arithmetic of one kernel for one param group, on lists of tensors whose counters already
    count this step (:func:`metaopt.hessian_free.step` calls them)."""

    meta_grads: Callable  # (traces, grads, view_shapes) -> each tensor's term h * g summed to its block's view
    update: Callable  # (params, grads, traces, moments, steps, step_sizes, **hyper-parameters): base update and trace
    meta_update: Callable  # (betas, meta_grads, moments, steps, **hyper-parameters): the step sizes' update
    flat: bool = False  # keep the state in flat buffers (metaopt/plan.py) where that pays off
    # (flat segment, grads, lr, **hyper-parameters) -> its terms: meta_grads and update of a flat segment in one pass
    fused_update: Callable | None = None
    check: Callable | None = None  # (params, base_rule, meta_rule): ValueError for what the kernel cannot run
    # update with learn=(...) beyond step sizes: base update, step-size trace and the learned ones' traces
    learned_update: Callable = learned.fast_update


def _compiled_learned_update() -> Callable:
    """:func:`metaopt.learned.fast_update` compiled where its traces are hand-derived (the generic route,
    :func:`torch.func.jvp`, stays eager)."""
    compiled = _compiled(learned.fast_update)

    def update(params, grads, traces, moments, steps, step_sizes, learned_tensors, *, rule, **hyperparameters):
        if learned.has_hand_derived(rule, tuple(item.spec for item in learned_tensors)):
            compiled(params, grads, traces, moments, steps, step_sizes, learned_tensors, rule=rule, **hyperparameters)
        else:
            learned.generic_update(params, grads, traces, moments, steps, step_sizes, learned_tensors, rule=rule,
                                   **hyperparameters)

    return update


def _triton() -> Kernel:
    """``kernel="triton"`` (:mod:`metaopt.triton_kernel`, imported here: it imports triton)."""
    try:
        from metaopt import triton_kernel
    except ImportError as error:
        raise ValueError(f"kernel='triton' needs the triton package ({error}): install it (CUDA wheels of torch "
                         "ship it), or use kernel='flat'") from error
    return _foreach()._replace(flat=True, fused_update=triton_kernel.fused_update,
                               meta_update=triton_kernel.meta_update, check=triton_kernel.check)


def _foreach() -> Kernel:
    return Kernel(_foreach_meta_grads, _foreach_update, _foreach_meta_update)


KERNELS: dict[str, Callable[[], Kernel]] = {
    "reference": lambda: Kernel(_reference_meta_grads, _reference_update, _reference_meta_update,
                                learned_update=learned.generic_update),
    "foreach": _foreach,
    # The foreach arithmetic on flat buffers (a layout, metaopt/plan.py): a number of ops per step that
    # does not depend on the number of tensors.
    "flat": lambda: _foreach()._replace(flat=True),
    # The meta-gradient's dot products stay out of the graph: Inductor would give them a loop
    # of their own anyway, and torch 2.14's CPU code generation fails on fusing row sums
    # (nodewise) with the update. Per tensor, not on flat buffers: on a CPU, where a step is
    # bound by memory, gathering into flat buffers costs more than the fused loops save.
    "compiled": lambda: Kernel(_foreach_meta_grads, _compiled(_foreach_update), _compiled(_foreach_meta_update),
                               learned_update=_compiled_learned_update()),
    # Flat segments in two Triton launches (one pass over memory for the base update, trace and the partial
    # sums of the meta-gradient; one for their reduction and the meta update); foreach for the rest.
    "triton": _triton,
}
"""Kernel name -> a function that makes the :class:`Kernel` of one param group."""
