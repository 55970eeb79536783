"""MetaOptimize's state: created at a parameter's first step, and loaded from checkpoints.

Per parameter: ``step`` (its counter), ``trace`` and the base rule's moments. Per step-size block
(in the state of the parameter that owns it, or in a param group for ``scalar`` and ``param_group``):
``beta``, ``meta_step`` and the meta rule's moments, in float32 or wider whatever the parameter's
dtype, so that a bf16 model still learns its step sizes precisely.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, Callable

import torch
from torch import Tensor

from metaopt import distributed, hyperparameters


def is_meta_key(key: str) -> bool:
    """Keys kept in float32 (or wider) whatever the parameter's dtype: the step counters and the whole meta state."""
    return key == "step" or key.startswith(("beta", "meta_"))  # beta_<k>: a learned hyper-parameter's (metaopt.learned)


def init_param(p: Tensor, state: dict[str, Any], trace_columns: int, moment_names: tuple[str, ...]) -> None:
    state["step"] = torch.zeros((), dtype=hyperparameters.meta_dtype(p.dtype), device=p.device)
    if trace_columns == 1:
        state["trace"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    else:  # approx "l" / "2x2" with hessian="hvp": one column of H per step-size block
        state["trace"] = torch.zeros((trace_columns, *p.shape), dtype=p.dtype, device=p.device)
    for name in moment_names:
        state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)


def init_block(owner_state: dict[str, Any], shape: tuple[int, ...], alpha0: float | Tensor, like: Tensor, approx,
               meta_moment_names: tuple[str, ...], layout: Tensor | None = None) -> None:
    """A block's state of ``shape`` (a local shard's view shape); with ``layout``, the parameter whose
    rows the block's entries are, laid out as it is (a ``DTensor`` for a sharded one)."""
    dtype = hyperparameters.meta_dtype(like.dtype)

    def laid_out(value: Tensor) -> Tensor:
        return distributed.like(layout, value) if layout is not None and shape else value

    if isinstance(alpha0, Tensor):  # estimated by alpha0="auto", on the device
        beta = approx.initial_beta(alpha0.to(device=like.device, dtype=dtype))
        owner_state["beta"] = laid_out(beta.expand(shape).clone())
    else:
        owner_state["beta"] = laid_out(torch.full(shape, approx.initial_beta(alpha0), dtype=dtype, device=like.device))
    owner_state["meta_step"] = torch.zeros((), dtype=dtype, device=like.device)
    for name in meta_moment_names:
        owner_state[f"meta_{name}"] = laid_out(torch.zeros(shape, dtype=dtype, device=like.device))


def init_states(params: list[Tensor], state, placements, param_groups: list[dict[str, Any]],
                owner_state: Callable[[Any], dict[str, Any]], base_rule, meta_rule, approx, trace_columns: int = 1) -> None:
    """The state of each parameter and of its block, created at the parameter's first step."""
    auto: dict[int, Tensor] = {}  # alpha0="auto", estimated once per param group from its parameters here
    for p in params:
        if "trace" not in state[p]:
            init_param(p, state[p], trace_columns, base_rule.moment_names)
        placement = placements[id(p)]
        owner = owner_state(placement.owner)
        if "beta" in owner:
            continue
        alpha0 = param_groups[placement.meta_group]["alpha0"]
        if alpha0 == "auto":
            if placement.group not in auto:
                group_params = [q for q in params if placements[id(q)].group == placement.group]
                auto[placement.group] = auto_alpha0(group_params, param_groups[placement.group], base_rule)
            alpha0 = auto[placement.group]
        layout = None if isinstance(placement.owner, int) else placement.owner
        shape = () if layout is None else placements[id(layout)].view_shape
        init_block(owner, shape, alpha0, p, approx, meta_rule.moment_names, layout)


def auto_alpha0(params: list[Tensor], group: dict[str, Any], base_rule) -> Tensor:
    r"""``alpha0="auto"``: the step size whose first base update moves the weights by
    ``AUTO_FIRST_MOVE`` of their norm, :math:`\alpha_0 = r \, \lVert w \rVert / \lVert d(g) \rVert`
    over ``params`` (the parameters of the param group ``group`` whose step creates the block, with
    their gradients), where :math:`d(g)` is the base rule's first direction (``sign(g)`` for Adam,
    RMSProp and Lion, ``g`` for SGD; ``g`` where the rule's first direction is zero, as the released
    SGDm's). Computed on the device: no host sync."""
    with_grads = [p for p in params if p.grad is not None]
    if not with_grads:
        return torch.tensor(hyperparameters.AUTO_ALPHA0_FLOOR)
    dtype = hyperparameters.meta_dtype(with_grads[0].dtype)
    # |w|^2, |d|^2, |g|^2 of the whole parameters, and of sharded parameters' local shards (summed over the mesh)
    squares = torch.zeros(2, 3, dtype=dtype, device=distributed.local(with_grads[0]).device)
    hp = {key: group[key] for key in base_rule.hyperparameters}
    for p in with_grads:
        g = distributed.local(p.grad).to(dtype)
        moments = {name: torch.zeros_like(g) for name in base_rule.moment_names}
        d, _ = base_rule.direction(g, moments, hp, torch.ones((), dtype=dtype, device=g.device))
        norms = torch.stack([distributed.local(p).to(dtype).square().sum(), d.square().sum(), g.square().sum()])
        squares[int(distributed.is_sharded(p))] += norms.to(squares.device)
    sharded = [p for p in with_grads if distributed.is_sharded(p)]
    if sharded:  # the first step of a group with sharded parameters: one more all-reduce
        torch.distributed.all_reduce(squares[1], group=sharded[0].device_mesh.get_group())
    norm_w, norm_d, norm_g = squares.sum(0).sqrt().unbind()
    norm_d = torch.where(norm_d > 0, norm_d, norm_g)
    alpha0 = torch.where(norm_d > 0, hyperparameters.AUTO_FIRST_MOVE * norm_w / norm_d, 0.0).nan_to_num(0.0, 0.0, 0.0)
    return alpha0.clamp(hyperparameters.AUTO_ALPHA0_FLOOR, hyperparameters.ALPHA0_RANGE[1])


# -- checkpoints ---------------------------------------------------------------------------------


def check_checkpoint_shapes(state_dict: dict[str, Any], param_groups: list[dict[str, Any]], moment_names) -> None:
    """ValueError when a checkpoint's per-parameter state does not fit the parameters."""
    saved_params = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
    own_params = list(chain.from_iterable(g["params"] for g in param_groups))
    for index, p in zip(saved_params, own_params):
        for key, value in state_dict["state"].get(index, {}).items():
            # a trace of approx "l" / "2x2" has a leading dimension of blocks: compare the trailing ones
            shape = tuple(value.shape[max(0, value.dim() - p.dim()):])
            if key in ("trace", *moment_names) and (value.dim() < p.dim() or shape != tuple(p.shape)):
                raise ValueError(
                    f"this checkpoint's state {key!r} of parameter {index} has shape {tuple(value.shape)}, but the "
                    f"parameter has shape {tuple(p.shape)}: it was saved for another model"
                )


def without_meta_keys(saved: dict[Any, dict[str, Any]]) -> tuple[dict, dict]:
    """The saved per-parameter state split into what torch may cast to the parameter's dtype and the
    meta keys, which keep their precision (torch casts every state tensor to its parameter's dtype)."""
    kept = {index: {k: v for k, v in values.items() if not is_meta_key(k)} for index, values in saved.items()}
    meta = {index: {k: v for k, v in values.items() if is_meta_key(k)} for index, values in saved.items()}
    return kept, meta


def restore_meta_keys(meta_state: dict, saved_groups: list[dict[str, Any]], param_groups: list[dict[str, Any]], state) -> None:
    """Put the meta keys back after ``Optimizer.load_state_dict``, on the parameters' devices."""
    saved_ids = chain.from_iterable(g["params"] for g in saved_groups)
    params = dict(zip(saved_ids, chain.from_iterable(g["params"] for g in param_groups)))
    for index, values in meta_state.items():
        p = params[index]
        state[p].update({k: v.to(device=p.device) if isinstance(v, Tensor) else v for k, v in values.items()})
    for group in param_groups:
        for key, value in group.items():
            if is_meta_key(key) and isinstance(value, Tensor):
                group[key] = value.to(group["params"][0].device)
