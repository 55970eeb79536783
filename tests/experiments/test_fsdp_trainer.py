"""trainer.strategy=fsdp: two gloo ranks train the digits stand-in with its layers sharded by FSDP2; a
run stopped by SIGTERM and resumed from its distributed checkpoint ends as the uninterrupted run."""

from __future__ import annotations

import gc
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from experiments import sharding
from experiments.models import llama2c_15m, mlp, resnet18_cifar
from experiments.trainer import build_adapter, train
from tests.experiments.helpers import TINY, compose_train, computed_columns, read_metrics

SHARDED = [*TINY, "optimizer=metaopt_adamw_adam", "optimizer.blocks=nodewise", "trainer.strategy=fsdp",
           "trainer.device=cpu", "trainer.max_steps=120", "trainer.log_every=10", "trainer.eval_every=40",
           "trainer.checkpoint_every=50"]


def _rank(rank: int, world_size: int, port: int, run_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    # the process group outlives the run (train leaves a group it did not create), to gather the weights after it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    result = train(compose_train(*SHARDED), run_dir)
    if result.summary["status"] == "finished":
        weights = {name: p.full_tensor() for name, p in result.model.named_parameters()}
        torch.save({"weights": weights, "step_sizes": result.adapter.step_sizes(), "summary": result.summary},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    del result
    gc.collect()  # the sharded model's cycles hold the group: freed before the exit (experiments/train.py says why)
    dist.destroy_process_group()


def _spawn(run_dir: Path, out_dir: Path, port: int):
    """Two ranks training into ``run_dir`` (not joined)."""
    out_dir.mkdir(exist_ok=True)
    return mp.start_processes(_rank, args=(2, port, str(run_dir), str(out_dir)), nprocs=2, join=False,
                              start_method="spawn")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logged_steps(run_dir: Path) -> int:
    try:
        rows = read_metrics(run_dir)
    except FileNotFoundError:
        return 0
    return int(rows[-1]["step"]) if rows and rows[-1]["step"].isdigit() else 0


@pytest.mark.slow
def test_a_sharded_run_stopped_by_sigterm_resumes_as_the_uninterrupted_run(tmp_path):
    reference = _spawn(tmp_path / "reference", tmp_path / "reference-out", _free_port())
    while not reference.join():
        pass

    run_dir = tmp_path / "preempted"
    stopped = _spawn(run_dir, tmp_path / "stopped-out", _free_port())
    deadline = time.time() + 300
    while _logged_steps(run_dir) < 60 and time.time() < deadline:  # past the first checkpoint, at step 50
        time.sleep(0.01)
    os.kill(stopped.pids()[0], signal.SIGTERM)  # as a scheduler preempting the job signals a task
    while not stopped.join():
        pass
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "preempted" and 60 <= meta["step"] < 120, meta
    shards = sorted(os.listdir(run_dir / sharding.SHARDS))
    assert len(shards) == 2 and shards[-1] == f"step{meta['step']:09d}"  # the last two checkpoints'

    resumed = _spawn(run_dir, tmp_path / "resumed-out", _free_port())
    while not resumed.join():
        pass
    assert json.loads((run_dir / "meta.json").read_text())["resumed_at_step"] == meta["step"]
    assert computed_columns(read_metrics(run_dir)) == computed_columns(read_metrics(tmp_path / "reference"))
    for rank in (0, 1):
        got = torch.load(tmp_path / "resumed-out" / f"rank{rank}.pt", weights_only=True)
        want = torch.load(tmp_path / "reference-out" / f"rank{rank}.pt", weights_only=True)
        assert got["step_sizes"] == want["step_sizes"]
        assert got["weights"].keys() == want["weights"].keys()
        assert all(torch.equal(got["weights"][name], want["weights"][name]) for name in want["weights"])


def test_the_units_sharded_one_by_one_are_the_declared_blocks():
    resnet = resnet18_cifar(num_classes=10)
    names = {id(module): name for name, module in resnet.named_modules()}
    assert [names[id(unit)] for unit in sharding.units(resnet)] == [
        "conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]  # stem, the four stages, head
    transformer = llama2c_15m(vocab_size=32)
    assert sharding.units(transformer) == list(transformer.layers)
    digits_mlp = mlp(num_classes=10, in_channels=1, image_size=8)
    assert sharding.units(digits_mlp) == [digits_mlp[1], digits_mlp[3]]  # its two Linear layers


@pytest.mark.parametrize("optimizer, precision, compiled, message", [
    ("mechanic_adamw", "fp32", False, "MechanicAdapter keeps state beside its optimizer's.*trainer.strategy=ddp"),
    ("metaopt_adamw_adam", "fp16", False, "fp16.*trainer.precision=bf16"),
    ("metaopt_adamw_adam", "fp32", True, "set trainer.compile=false"),
])
def test_what_the_sharded_strategy_does_not_run_is_refused_with_the_fix(optimizer, precision, compiled, message):
    cfg = compose_train(*TINY, f"optimizer={optimizer}")
    adapter = build_adapter(cfg.optimizer, mlp(num_classes=10, in_channels=1, image_size=8), 10)
    with pytest.raises(ValueError, match="trainer.strategy=fsdp: .*" + message):
        sharding.check(adapter, precision=precision, compiled=compiled)
    sharding.check(build_adapter(compose_train(*TINY).optimizer, nn.Linear(2, 2), 10), precision="bf16", compiled=False)
