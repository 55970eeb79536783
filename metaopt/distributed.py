r"""MetaOptimize on sharded parameters: FSDP2's ``fully_shard`` (``DTensor``) on a 1-D device mesh.

The step runs on each rank's local shards (:func:`local`: the weights, gradients and state of a
``DTensor`` parameter are its ``to_local()`` tensors), through the same plan and kernels as plain
tensors (:mod:`metaopt.plan`, :mod:`metaopt.hessian_free`). What sharding changes is the meta-gradient
:math:`z_b = \sum_{i \in b} h_i g_i`: over a shard it is a partial sum. So

* blocks that span the rows of a parameter sharded along dim 0 (``scalar``, ``param_group``,
  ``layerwise``) get their partial sums summed over the mesh by one :class:`MeshReduction` a step: one
  ``all_reduce`` of one value per such block, issued asynchronously right after the partial sums and
  waited on only before the meta update, so that it overlaps the base update and nothing is read back
  to the host;
* ``nodewise`` and ``weightwise`` blocks need none: FSDP2 shards dim 0, a block is one row (or one
  weight) and a row never straddles two ranks, so each rank holds whole blocks and their state.

Parameters that are not sharded (plain tensors, ``Replicate`` placements) hold the whole tensor on
every rank: their terms are added after the reduction, not summed over ranks. Layouts where this
does not hold are refused before any work (:func:`metaopt.plan.check_layouts`).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Hashable

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from metaopt.granularity import Placement

# scripts/bench_fsdp.py sets it False to measure what issuing the all-reduce early buys: the
# collective then runs synchronously where the meta update needs it.
OVERLAP = True


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor``. Read from ``sys.modules``: there is none before
    ``torch.distributed.tensor`` is imported, and ``import metaopt`` does not import it (about 0.3 s)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local(tensor: Tensor) -> Tensor:
    """The rank's shard of a ``DTensor`` (the tensor itself, so that in-place updates reach the
    parameter); any other tensor unchanged."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` sharded over its mesh (its local part is a part of it)."""
    if not is_dtensor(tensor):
        return False
    from torch.distributed.tensor import Shard

    return any(isinstance(placement, Shard) for placement in tensor.placements)


def like(original: Tensor, shard: Tensor) -> Tensor:
    """``shard`` as ``original`` is laid out: a ``DTensor`` over its mesh and placements when
    ``original`` is one (dim 0 global as ``original``'s where sharded), ``shard`` itself otherwise. The
    result shares ``shard``'s memory: optimizer state viewing flat buffers stays a ``DTensor``, which
    ``torch.distributed.checkpoint`` saves shard by shard."""
    if not is_dtensor(original):
        return shard
    from torch.distributed.tensor import DTensor

    shape = tuple(shard.shape)
    if is_sharded(original) and shape:
        shape = (original.shape[0], *shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(shard, original.device_mesh, original.placements, run_check=False, shape=shape,
                              stride=stride)


def global_view_shape(view_shape: tuple[int, ...], p: Tensor) -> tuple[int, ...]:
    """A block's view shape (made from ``p``'s local shard) with dim 0 as the whole parameter's."""
    if not view_shape or not is_sharded(p):
        return view_shape
    return (p.shape[0], *view_shape[1:])


def full(tensor: Tensor) -> Tensor:
    """The whole tensor on every rank (a collective for a sharded ``DTensor``: call it on every rank)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def mesh_of(param_groups: list[dict[str, Any]]):
    """The device mesh of the ``DTensor`` parameters (one, :func:`check_layouts`), or ``None``."""
    for group in param_groups:
        for p in group["params"]:
            if is_dtensor(p):
                return p.device_mesh
    return None


def reduced_blocks(param_groups: list[dict[str, Any]], placements: dict[int, Placement], reduces: bool
                   ) -> dict[int, int]:
    """Block number -> its slot in the all-reduce: the blocks holding a sharded parameter, when the
    granularity's blocks span rows (``reduces``). The same on every rank, whatever has a gradient."""
    if not reduces:
        return {}
    numbers = sorted({placements[id(p)].number for group in param_groups for p in group["params"]
                      if is_sharded(p) and p.numel()})
    return {number: slot for slot, number in enumerate(numbers)}


# -- the reduction ---------------------------------------------------------------------------------


class MeshReduction:
    """The partial meta-gradients of one step's blocks, packed in one tensor and summed over the
    mesh by one ``all_reduce``.

    ``slots``: block number -> its place in the packed tensor (:func:`reduced_blocks`);
    ``keys``: each meta-gradient key of the plan whose terms are partial sums -> the block numbers of
    its entries (one for a block, one per tensor for a flat ``layerwise`` segment). A rank without
    terms for a block sends zeros there, so every rank issues the same collective.
    """

    def __init__(self, group, slots: dict[int, int], keys: dict[Hashable, list[int]], dtype: torch.dtype,
                 device: torch.device):
        self.group, self.size, self.dtype, self.device = group, len(slots), dtype, device
        self.keys = list(keys)
        self.lengths = [len(numbers) for numbers in keys.values()]
        slot_of_each_entry = [slots[n] for numbers in keys.values() for n in numbers]
        self.index = torch.tensor(slot_of_each_entry, dtype=torch.long, device=device)
        self.packed: Tensor | None = None
        self.work = None

    def issue(self, partial: dict[Hashable, Tensor]) -> None:
        """Pack the partial sums and start the all-reduce (asynchronously unless :data:`OVERLAP` is off)."""
        packed = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        if self.keys:
            values = torch.cat([partial[key].reshape(-1).to(self.dtype) for key in self.keys])
            packed.index_copy_(0, self.index, values)
        self.packed = packed
        self.work = dist.all_reduce(packed, group=self.group, async_op=True) if OVERLAP else None

    def wait(self, like: dict[Hashable, Tensor]) -> dict[Hashable, Tensor]:
        """The summed meta-gradients, shaped and typed as the partial sums ``like``."""
        if self.work is None:
            dist.all_reduce(self.packed, group=self.group)
        else:
            self.work.wait()
        summed = self.packed.index_select(0, self.index).split(self.lengths) if self.keys else []
        self.packed = self.work = None
        return {key: value.view(like[key].shape).to(like[key].dtype) for key, value in zip(self.keys, summed)}


def reduction(mesh, slots: dict[int, int], keys: dict[Hashable, list[int]], param_groups: list[dict[str, Any]]
              ) -> MeshReduction | None:
    """The plan's :class:`MeshReduction`, or ``None`` when no block spans shards."""
    if not slots:
        return None
    sharded = [p for group in param_groups for p in group["params"] if is_sharded(p)]
    dtype = torch.float32
    for p in sharded:
        dtype = torch.promote_types(dtype, p.dtype)
    return MeshReduction(mesh.get_group(), slots, keys, dtype, local(sharded[0]).device)
