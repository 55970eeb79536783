"""What issuing the meta-gradients' all-reduce early buys: MetaOptimize's step on FSDP2 parameters,
with the all-reduce asynchronous (issued right after the partial sums, waited on before the meta
update, so that it overlaps the base update) against synchronous (run where the meta update needs it).

Two CPU ranks of the gloo backend (spawned here) shard an MLP with ``fully_shard``; for each
granularity whose blocks are reduced (``scalar``, ``layerwise``) the script times ``optimizer.step()``
alone on gradients in place, the two settings taking turns round by round after a warm-up, the ranks
starting each timed step together (a barrier); a step's time is its wall time on rank 0 (a collective's
wait is part of it). Each ratio is the median over rounds of the two times of one round (neighbours in
time share the machine's load).

    python scripts/bench_fsdp.py                     # 2 ranks, 4 layers of 1024 x 1024, 200 rounds
    python scripts/bench_fsdp.py --width 256 --rounds 50

Writes ``results/performance/bench_fsdp_cpu.csv`` and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from experiments.machine import machine
from metaopt import MetaOptimize, distributed

RESULTS = Path(__file__).resolve().parents[1] / "results" / "performance"
GRANULARITIES = ("scalar", "layerwise")


def _timed_step(optimizer: MetaOptimize, overlap: bool) -> float:
    distributed.OVERLAP = overlap
    dist.barrier()
    start = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - start


def _rank(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    rows = []
    for blocks in GRANULARITIES:
        torch.manual_seed(0)
        model = nn.Sequential(*(nn.Linear(args.width, args.width) for _ in range(args.layers)))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = MetaOptimize(model.parameters(), "adamw", "adam", blocks)
        model(torch.randn(8, args.width)).square().mean().backward()
        for _ in range(args.warmup):
            for overlap in (True, False):
                _timed_step(optimizer, overlap)
        times = {True: [], False: []}
        for round_ in range(args.rounds):
            for overlap in ((True, False) if round_ % 2 else (False, True)):
                times[overlap].append(_timed_step(optimizer, overlap))
        ratios = [a / s for a, s in zip(times[True], times[False])]
        rows.append({"blocks": blocks, "async_ms": 1e3 * statistics.median(times[True]),
                     "sync_ms": 1e3 * statistics.median(times[False]), "async_over_sync": statistics.median(ratios)})
    if rank == 0:
        torch.save(rows, Path(out) / "rows.pt")
    del model, optimizer
    gc.collect()  # the sharded model's cycles hold the group: freed before the exit (experiments/train.py says why)
    dist.destroy_process_group()


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    parameters = args.layers * (args.width * args.width + args.width)
    lines = [
        "# MetaOptimize on FSDP2: asynchronous against synchronous all-reduce (scripts/bench_fsdp.py)",
        "",
        f"{machine(torch.device('cpu'))}; {args.world} gloo ranks of one thread each; an MLP of {args.layers} layers of "
        f"{args.width} x {args.width} ({parameters:,} parameters) sharded by `fully_shard`; (AdamW, Adam); median of "
        f"{args.rounds} rounds of `optimizer.step()` on rank 0, the two settings taking turns; the machine's load "
        f"average (1 min) at the end: {os.getloadavg()[0]:.1f}.",
        "",
        "| blocks | async step (ms) | sync step (ms) | async / sync (median of rounds) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['blocks']} | {r['async_ms']:.2f} | {r['sync_ms']:.2f} | {r['async_over_sync']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_fsdp_cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        mp.spawn(_rank, args=(args.world, os.path.join(scratch, "store"), args, scratch), nprocs=args.world)
        rows = torch.load(Path(scratch) / "rows.pt")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.with_suffix(".csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    args.out.with_suffix(".md").write_text(markdown(rows, args))
    print(markdown(rows, args), flush=True)


if __name__ == "__main__":
    main()
