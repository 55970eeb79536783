"""``trainer.strategy=fsdp``: the model's declared blocks sharded with FSDP2, checkpointed in
``torch.distributed.checkpoint`` format.

Every rank holds a slice (rows along dimension 0) of every parameter, of its gradient and of the
optimizer's state, and gathers a block's weights only for its forward and backward. The run's
checkpoint is then two parts: ``checkpoint.pt`` as for every run (step, generators, window, config,
the adapter's state but the optimizer's, checksummed), naming a folder ``checkpoint-shards/step<N>``
where every rank writes its shards of the model and the optimizer (``dcp.save``). The folder is
written before ``checkpoint.pt`` names it, and the folders that neither ``checkpoint.pt`` nor
``checkpoint.previous.pt`` names are removed after, so a stop at any moment leaves a checkpoint to
resume from. A sharded checkpoint loads onto as many or another number of ranks (``dcp.load``
reshards it).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from experiments import checkpoint
from experiments.adapters import Adapter, OptimizerAdapter

SHARDS = "checkpoint-shards"


def units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one, whose weights are gathered one at a time: the blocks a model
    declares (``named_blocks``: ResNet-18's stages, the six-block MLP's blocks), a transformer's
    ``layers``, or else the top-level modules that hold parameters."""
    blocks = getattr(model, "named_blocks", None)
    if blocks:
        return [model.get_submodule(prefix) for prefixes in blocks.values() for prefix in prefixes]
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return list(layers)
    return [child for child in model.children() if next(child.parameters(), None) is not None]


def shard(model: nn.Module, device: torch.device, world_size: int) -> None:
    """``fully_shard`` each unit, then the model (the parameters left over), over all ranks."""
    mesh = init_device_mesh(device.type, (world_size,))
    for unit in units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)


def check(adapter: Adapter, *, precision: str, compiled: bool) -> None:
    """ValueError for what the sharded strategy does not run, before any work."""
    problems = []
    if type(adapter) is not OptimizerAdapter:
        problems.append(f"{type(adapter).__name__} keeps state beside its optimizer's (an average, re-keyed state) that "
                        "is not sharded: run it with trainer.strategy=ddp")
    if precision == "fp16":
        problems.append("fp16's GradScaler is not set up for sharded gradients here: use trainer.precision=bf16")
    if compiled:
        problems.append("trainer.compile=true is not combined with sharding here: set trainer.compile=false")
    if problems:
        raise ValueError("trainer.strategy=fsdp: " + "; ".join(problems))


def local(tree: Any) -> Any:
    """``tree`` with every ``DTensor`` replaced by this rank's shard (for checks that read values)."""
    if isinstance(tree, DTensor):
        return tree.to_local()
    if isinstance(tree, dict):
        return {key: local(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(local(value) for value in tree)
    return tree


def state_dicts(model: nn.Module, adapter: OptimizerAdapter) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's and the optimizer's sharded state dicts, keyed by parameter names."""
    return get_state_dict(model, adapter.optimizer)


def save(model_state: dict[str, Any], optimizer_state: dict[str, Any], checkpoint_path: str, step: int) -> str:
    """Every rank writes its shards into a new folder beside ``checkpoint_path``; returns the folder,
    relative to the run folder, for ``checkpoint.pt`` to name (a collective)."""
    name = os.path.join(SHARDS, f"step{step:09d}")
    folder = os.path.join(os.path.dirname(checkpoint_path), name)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    return name


def load(model: nn.Module, adapter: OptimizerAdapter, run_dir: str, name: str) -> None:
    """Load the shards of ``run_dir/name`` into the sharded model and optimizer (on any number of ranks)."""
    model_state, optimizer_state = state_dicts(model, adapter)
    loaded = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(loaded, checkpoint_id=os.path.join(run_dir, name))
    set_state_dict(model, adapter.optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])


def remove_stale(checkpoint_path: str) -> None:
    """Remove the shard folders that neither the checkpoint nor the previous one names (main rank)."""
    folder = os.path.join(os.path.dirname(checkpoint_path), SHARDS)
    named = set()
    for path in (checkpoint_path, checkpoint.previous_path(checkpoint_path)):
        if os.path.exists(path):
            named.add(os.path.basename(checkpoint.load(path).get("shards") or ""))
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:
        if entry not in named:
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def agreed(problem: tuple[str, str] | None) -> tuple[str, str] | None:
    """The first rank's problem among every rank's (each checks its own shards), the same on every rank."""
    problems: list = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((found for found in problems if found is not None), None)
