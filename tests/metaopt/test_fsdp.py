"""MetaOptimize on FSDP2 (``fully_shard``) parameters, on CPU process groups of the gloo backend.

Each test spawns a world of processes that trains a tiny sharded MLP; the parent process trains the
same model unsharded on the same global batches and compares: the step sizes must be identical on
every rank and equal to the single-process run's, the gathered weights too, the number of
all-reduces a step is counted, and a ``torch.distributed.checkpoint`` round trip continues bit for bit.
"""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed import distributed_c10d

from metaopt import MetaOptimize

STEPS = 50
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-5}  # relative, against one process on the global batch


def _model(dtype: torch.dtype) -> nn.Sequential:
    """7 rows, then 1: the shards are uneven, and all ranks but the first hold no row of the last layer
    (their gradients of its blocks have no elements, and they take part in the all-reduce all the same).
    A plain parameter ``scale`` rides along, not sharded (``mixed`` cases put it in the optimizer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).to(dtype)
    model.scale = torch.linspace(0.5, 1.5, 8, dtype=dtype).requires_grad_()  # one per example of the global batch
    return model


def _optimizer(model: nn.Module, case: dict) -> MetaOptimize:
    named = list(model.named_parameters())
    groups = [{"params": [p for _, p in named[:2]], "param_names": [n for n, _ in named[:2]]},
              {"params": [p for _, p in named[2:]], "param_names": [n for n, _ in named[2:]]}]
    if case.get("mixed"):
        groups[1]["params"].append(model.scale)
        groups[1]["param_names"].append("scale")
    return MetaOptimize(groups, "adamw", "adam", case["blocks"], variant=case["variant"])


def _batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(8, 5, generator=generator).to(dtype), torch.randn(8, 1, generator=generator).to(dtype)


def _train(model, optimizer, steps: range, dtype, rank: int = 0, world: int = 1, counts: list | None = None) -> None:
    """Steps on rank ``rank``'s share of each global batch of 8; ``counts``: the sizes of the all-reduces of each step.
    The plain parameter's gradient is averaged over the ranks by hand (FSDP2 averages the sharded ones')."""
    for step in steps:
        x, y = _batch(step, dtype)
        mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
        loss = ((model(x[mine]) - y[mine]).squeeze(1) * model.scale[mine]).square().mean()
        loss.backward()
        if world > 1:
            distributed_c10d.all_reduce(model.scale.grad)  # not counted: not the optimizer's
            model.scale.grad /= world
        if counts is not None:
            counts.append([])
        optimizer.step()
        optimizer.zero_grad()
        model.scale.grad = None


def _sharded(world: int, dtype: torch.dtype):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = _model(dtype)
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _counting_all_reduces(counts: list) -> None:
    """Record the number of values of every all_reduce in ``counts[-1]`` (in this worker process)."""
    real = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        if counts:
            counts[-1].append(tensor.numel())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counted


def _worker(rank: int, world: int, store: str, cases: list[dict], out: str) -> None:
    """Train every case sharded over ``world`` ranks; save each rank's step sizes, weights and all-reduce sizes."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    counts: list = []
    _counting_all_reduces(counts)
    results = [_sharded_run(case, rank, world, counts) for case in cases]
    torch.save(results, Path(out) / f"rank{rank}.pt")
    _leave_process_group()


def _sharded_run(case: dict, rank: int, world: int, counts: list) -> dict:
    model = _sharded(world, case["dtype"])
    optimizer = _optimizer(model, case)
    counts.clear()
    _train(model, optimizer, range(STEPS), case["dtype"], rank, world, counts)
    counted = [list(step) for step in counts]
    counts.clear()
    return {"step_sizes": optimizer.step_sizes(), "alphas": _alphas(model, optimizer),
            "weights": [p.full_tensor() for p in model.parameters()], "all_reduces": counted}


def _leave_process_group() -> None:
    """Free the sharded models, then destroy the process group, while the interpreter is alive: FSDP2's
    modules hold the group in reference cycles, so without the collection the gloo group (and its worker
    threads) would be destroyed during the interpreter's exit, where a worker thread releasing a tensor
    aborts the process (SIGABRT, "terminate called without an active exception"; seen once in CI)."""
    gc.collect()
    dist.destroy_process_group()


def _alphas(model: nn.Module, optimizer: MetaOptimize) -> list[torch.Tensor]:
    """Each parameter's step sizes at full precision (``step_sizes()`` logs them as float32), whole."""
    return [optimizer.step_size(p).double() for p in model.parameters()]


def _spawn(target, world: int, *args) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        mp.spawn(target, args=(world, os.path.join(scratch, "store"), *args), nprocs=world)


def _single_process(case: dict) -> dict:
    model = _model(case["dtype"])
    optimizer = _optimizer(model, case)
    _train(model, optimizer, range(STEPS), case["dtype"])
    return {"step_sizes": optimizer.step_sizes(), "alphas": _alphas(model, optimizer),
            "weights": [p.detach() for p in model.parameters()]}


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def _check_world(world: int, cases: list[dict], tmp_path: Path) -> list[dict]:
    """Spawn the world, compare every rank with one process; returns each case's results on rank 0."""
    _spawn(_worker, world, cases, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    for index, case in enumerate(cases):
        reference = _single_process(case)
        first = ranks[0][index]
        for other in ranks[1:]:  # identical on every rank, not close
            assert all(torch.equal(a, b) for a, b in zip(other[index]["alphas"], first["alphas"])), case
            assert other[index]["all_reduces"] == first["all_reduces"], case
        tolerance = TOLERANCE[case["dtype"]]
        assert first["step_sizes"].keys() == reference["step_sizes"].keys()
        step_sizes, weights = worst_differences(first, reference)
        assert step_sizes <= tolerance, (case, step_sizes)
        assert weights <= tolerance, (case, weights)
    return [ranks[0][index] for index in range(len(cases))]


def worst_differences(sharded: dict, reference: dict) -> tuple[float, float]:
    """The largest relative difference of a step size from one process's, and the largest difference
    of a gathered weight over that tensor's largest weight (scripts/measure_fsdp_equality.py prints both)."""
    step_sizes = max(((a - b).abs() / b.abs()).max().item() for a, b in zip(sharded["alphas"], reference["alphas"]))
    weights = max(((s - w).abs().max() / w.abs().max()).item() for s, w in zip(sharded["weights"], reference["weights"]))
    return step_sizes, weights


def _case(blocks: str, variant: str = "standard", dtype: torch.dtype = torch.float64, mixed: bool = False) -> dict:
    """``mixed``: a plain parameter, its gradient averaged by hand, in the optimizer with the DTensor ones."""
    return {"blocks": blocks, "variant": variant, "dtype": dtype, "mixed": mixed}


# one all-reduce a step of one value per block that spans shards; none for blocks of rows or weights
ALL_REDUCE_SIZES = {"scalar": [1], "param_group": [2], "layerwise": [4], "nodewise": [], "weightwise": []}


def every_case() -> list[dict]:
    """Every granularity and variant, in float64 and in float32 with a plain parameter mixed in."""
    return [_case(blocks, variant, dtype, mixed) for blocks in ALL_REDUCE_SIZES for variant in ("standard", "released")
            for dtype, mixed in ((torch.float64, False), (torch.float32, True))]


@pytest.mark.parametrize("cases", [
    [_case("scalar", mixed=True)],
    pytest.param([_case("layerwise", "released"), _case("nodewise", dtype=torch.float32)], marks=pytest.mark.slow),
], ids=["scalar", "layerwise-nodewise"])
def test_two_ranks_match_one_process_and_reduce_once_a_step(cases, tmp_path):
    for case, result in zip(cases, _check_world(2, cases, tmp_path)):
        sizes = ALL_REDUCE_SIZES[case["blocks"]]
        assert all(step == sizes for step in result["all_reduces"][1:]), result["all_reduces"][1]
        # alpha0="auto": on the first step, one more all-reduce (|w|^2, |d|^2, |g|^2) per param group that
        # creates a block: one group for scalar, both for the others
        first = result["all_reduces"][0]
        assert first == [3] * (1 if case["blocks"] == "scalar" else 2) + sizes, first


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_every_granularity_and_variant_matches_one_process(world, tmp_path):
    cases = every_case()
    for case, result in zip(cases, _check_world(world, cases, tmp_path)):
        assert all(step == ALL_REDUCE_SIZES[case["blocks"]] for step in result["all_reduces"][1:])


# -- torch.distributed.checkpoint -----------------------------------------------------------------


def _checkpoint_worker(rank: int, world: int, store: str, case: dict, checkpoint: str, out: str, save: bool) -> None:
    """``save``: 5 steps, a distributed checkpoint, 5 more; else: a new model and optimizer load the
    checkpoint and take the last 5 steps. Saves the gathered weights and step sizes after them."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    result = _checkpointed_run(rank, world, case, checkpoint, save)
    torch.save(result, Path(out) / f"{'saved' if save else 'loaded'}{world}-rank{rank}.pt")
    _leave_process_group()


def _checkpointed_run(rank: int, world: int, case: dict, checkpoint: str, save: bool) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _sharded(world, case["dtype"])
    optimizer = _optimizer(model, case)
    if save:
        _train(model, optimizer, range(5), case["dtype"], rank, world)
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint)
    else:
        with torch.no_grad():
            for p in model.parameters():  # not the saved weights until loaded
                p.add_(1.0)
        model_state, optimizer_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(loaded, checkpoint_id=checkpoint)
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    _train(model, optimizer, range(5, 10), case["dtype"], rank, world)
    return {"step_sizes": optimizer.step_sizes(), "weights": [p.full_tensor() for p in model.parameters()]}


def _round_trip(case: dict, saved_on: int, loaded_on: int, tmp_path: Path) -> tuple[dict, dict]:
    checkpoint = str(tmp_path / "checkpoint")
    _spawn(_checkpoint_worker, saved_on, case, checkpoint, str(tmp_path), True)
    _spawn(_checkpoint_worker, loaded_on, case, checkpoint, str(tmp_path), False)
    return torch.load(tmp_path / f"saved{saved_on}-rank0.pt"), torch.load(tmp_path / f"loaded{loaded_on}-rank0.pt")


@pytest.mark.slow
@pytest.mark.parametrize("blocks", ["param_group", "nodewise"])
def test_distributed_checkpoint_resumes_bit_for_bit(blocks, tmp_path):
    uninterrupted, resumed = _round_trip(_case(blocks), 2, 2, tmp_path)
    assert resumed["step_sizes"] == uninterrupted["step_sizes"]
    assert all(torch.equal(a, b) for a, b in zip(resumed["weights"], uninterrupted["weights"]))


@pytest.mark.slow
@pytest.mark.parametrize("blocks", ["scalar", "layerwise", "weightwise"])
def test_distributed_checkpoint_saved_on_two_ranks_loads_on_four(blocks, tmp_path):
    uninterrupted, resumed = _round_trip(_case(blocks), 2, 4, tmp_path)
    assert resumed["step_sizes"].keys() == uninterrupted["step_sizes"].keys()
    assert max(_relative(resumed["step_sizes"][k], v) for k, v in uninterrupted["step_sizes"].items()) <= 1e-12
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(resumed["weights"], uninterrupted["weights"]))


# -- layouts refused before any work ----------------------------------------------------------------


@pytest.fixture(scope="module")
def one_rank():
    """A process group of this process alone, for DTensors of every layout."""
    with tempfile.TemporaryDirectory() as scratch:
        dist.init_process_group("gloo", init_method=f"file://{scratch}/store", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


def _parameter(placements, mesh_shape=(1,)) -> nn.Parameter:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", mesh_shape)
    return nn.Parameter(DTensor.from_local(torch.ones(4, 3), mesh, placements, run_check=False))


def test_layouts_the_step_cannot_take_are_refused_naming_the_parameter_and_the_fix(one_rank):
    from torch.distributed.tensor import Partial, Replicate, Shard

    refused = [
        (dict(params=[("w", _parameter([Shard(0), Replicate()], (1, 1)))]), "'w' lives on a 2-D device mesh: .*1-D"),
        (dict(params=[("w", _parameter([Shard(1)]))]), r"'w' has placements \(Shard\(dim=1\),\).*shard dim 0"),
        (dict(params=[("w", _parameter([Partial()]))]), "'w' has placements .*Partial.*Replicate"),
        (dict(params=[("w", _parameter([Shard(0)]))], approx="l"), "'w' is a DTensor: approx='l'.*hessian_free"),
        (dict(params=[("w", _parameter([Shard(0)]))], skip_nonfinite=True), "'w' is a DTensor: skip_nonfinite.*False"),
        (dict(params=[("w", _parameter([Shard(0)]))], learn=("step_size", "weight_decay"), weight_decay=0.1),
         r"'w' is a DTensor: learn=\('step_size', 'weight_decay'\) takes plain tensors"),
        (dict(params=[("w", _parameter([Shard(0)]))], storage="contiguous"),
         "'w' is a DTensor: storage='contiguous' takes plain tensors.*storage='separate'"),
        (dict(params=[("fc.weight", _parameter([Shard(0)])), ("fc.bias", nn.Parameter(torch.ones(4)))], blocks="nodewise"),
         "'fc.bias' takes the step sizes of its weight's rows.*shard both along dim 0"),
    ]
    for keywords, message in refused:
        with pytest.raises(ValueError, match=message):
            MetaOptimize(**keywords)


def test_a_row_block_of_a_sharded_weight_is_sharded_with_it(one_rank):
    """nodewise and weightwise step sizes of a DTensor are DTensors laid out as its rows (what a
    distributed checkpoint saves shard by shard); scalar and layerwise ones plain tensors."""
    from torch.distributed.tensor import DTensor, Shard

    for blocks, laid_out in (("nodewise", True), ("weightwise", True), ("layerwise", False), ("scalar", False)):
        weight = _parameter([Shard(0)])
        optimizer = MetaOptimize([("fc.weight", weight)], blocks=blocks, alpha0=0.1)
        weight.grad = weight.detach() * 2
        optimizer.step()
        beta = (optimizer.param_groups[0] if blocks == "scalar" else optimizer.state[weight])["beta"]
        assert isinstance(beta, DTensor) == laid_out, blocks
        assert isinstance(optimizer.state[weight]["trace"], DTensor)
        assert optimizer.step_size(weight).shape == {"nodewise": (4, 1), "weightwise": (4, 3)}.get(blocks, ())
