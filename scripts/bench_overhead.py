"""The paper's Table 1: time and memory overhead of each optimizer against AdamW.

* Time overhead, ``(T_alg - T_adamw) / T_adamw``: the time of one training iteration (forward,
  backward and optimizer step, through the optimizer's adapter exactly as
  ``python -m experiments.train`` drives it), the optimizers taking turns iteration by
  iteration in one process after a warm-up; the median over rounds of the ratio within a round.
* Memory overhead, ``B_adamw / B_alg - 1`` with ``B`` the largest batch that fits: on CUDA by
  bisection over the batch size, each probe in a fresh model and optimizer. A CPU has no
  memory limit to fill, so there the script reports the peak resident memory of a short run
  in a fresh process (``(peak_alg - peak_adamw) / peak_adamw``, Linux's VmHWM) and the
  optimizer's state in parameter copies (what stays allocated between steps).

Workloads: ResNet-18 on CIFAR-10 (batch 100), the 15M llama2.c transformer on TinyStories
(batch 128 of 256 tokens), and on CUDA ResNet-18 on ImageNet (batch 256). The data are random
tensors of the datasets' shapes (the speed of an iteration does not depend on the values).
CPU runs shrink the batches (``--batch``) to stay within minutes; a smaller batch makes the
optimizer's share of an iteration, and so every time overhead, larger than at the paper's.

The optimizers are ``conf/optimizer/*.yaml``, built by the trainer's adapters
(``experiments.adapters``): AdamW (fixed and cosine), MetaOptimize variants, DoG (with its
averager), Prodigy, mechanic (AdamW) and gdtuo (Adam over Adam; not on the transformer,
whose tied embeddings gdtuo cannot update).

    python scripts/bench_overhead.py                  # CPU, a few minutes
    python scripts/bench_overhead.py --device cuda    # the paper's batch sizes, bisection for B_max

Writes ``results/performance/bench_overhead_<device>.csv`` and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from experiments.machine import machine
from experiments.trainer import build_adapter

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "results" / "performance"
TOTAL_STEPS = 100_000  # for the schedules; the benchmark runs a few of them

# name: (model config, model keywords, input maker, paper batch, CPU batch, whether CUDA only)
WORKLOADS = {
    "cifar10_resnet18": ("resnet18_cifar", {"num_classes": 10}, "image32", 100, 16, False),
    "tinystories_llama2c_15m": ("llama2c_15m", {}, "tokens", 128, 2, False),
    "imagenet_resnet18": ("resnet18", {"num_classes": 1000}, "image224", 256, 4, True),
}
# label: (conf/optimizer name, overrides); the first is the reference.
OPTIMIZERS = {
    "AdamW": ("adamw", []),
    "AdamW + cosine": ("adamw_cosine", []),
    "MetaOptimize (AdamW, Adam)": ("metaopt_adamw_adam", []),
    "MetaOptimize (AdamW, Lion)": ("metaopt_adamw_lion", []),
    "MetaOptimize (Lion, Lion)": ("metaopt_lion_lion", []),
    "MetaOptimize (AdamW, Lion) blockwise": ("metaopt_adamw_lion_6blocks", []),
    "MetaOptimize (AdamW, Lion) compiled": ("metaopt_adamw_lion", ["optimizer.kernel=compiled"]),
    "MetaOptimize (AdamW, Lion) triton": ("metaopt_adamw_lion", ["optimizer.kernel=triton", "optimizer.storage=contiguous"]),
    "DoG": ("dog", []),
    "Prodigy": ("prodigy", []),
    "mechanic (AdamW)": ("mechanic_adamw", []),
    "gdtuo (Adam, Adam)": ("gdtuo_adam_adam", []),
}


def overrides_for(label: str, workload: str) -> list[str] | None:
    """The Hydra overrides of an optimizer on a workload, or None where it does not run."""
    name, overrides = OPTIMIZERS[label]
    if workload.startswith("tinystories"):
        if name.startswith("gdtuo"):
            return None  # the transformer ties its embeddings, which gdtuo refuses
        if name.endswith("_6blocks"):
            overrides = [*overrides, "optimizer.adapter.param_groups.blocks=llama2c"]
    return [f"optimizer={name}", *overrides]


def build(workload: str, label: str, batch: int, device: torch.device):
    """The model, its adapter (optimizer and loop contract) and a batch of random data."""
    model_name, model_kwargs, inputs, *_ = WORKLOADS[workload]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=[f"model={model_name}", *overrides_for(label, workload)])
    torch.manual_seed(0)
    model = instantiate(cfg.model, **model_kwargs).to(device)
    adapter = build_adapter(cfg.optimizer, model, TOTAL_STEPS)
    generator = torch.Generator().manual_seed(0)
    if inputs == "tokens":
        tokens = torch.randint(0, 32000, (batch, 257), generator=generator)
        x, y = tokens[:, :-1], tokens[:, 1:]
    else:
        size = 32 if inputs == "image32" else 224
        x = torch.randn(batch, 3, size, size, generator=generator)
        y = torch.randint(0, model_kwargs["num_classes"], (batch,), generator=generator)
    return model, adapter, (x.to(device), y.to(device))


def iteration(model, adapter, data, scaler) -> None:
    """One training iteration as the trainer runs it."""
    x, y = data
    adapter.zero_grad()
    loss = F.cross_entropy(model(x).flatten(0, -2), y.flatten())
    adapter.backward(loss)
    adapter.step(scaler)


def elapsed(run, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start
    start = time.process_time()
    run()
    return time.process_time() - start


def time_iterations(workload: str, labels: list[str], batch: int, device: torch.device, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Iteration times (s) of each optimizer over the rounds, the optimizers taking turns."""
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    runs = {}
    for label in labels:
        model, adapter, data = build(workload, label, batch, device)
        for _ in range(warmup):  # the first iterations allocate the state (and compile a compiled kernel)
            iteration(model, adapter, data, scaler)
        runs[label] = (model, adapter, data, [])
    for _ in range(rounds):
        for model, adapter, data, times in runs.values():
            times.append(elapsed(lambda: iteration(model, adapter, data, scaler), device))
    for _, adapter, _, _ in runs.values():
        adapter.close()
    return {label: times for label, (_, _, _, times) in runs.items()}


def fits(workload: str, label: str, batch: int, device: torch.device) -> bool:
    """Whether two training iterations (the second with the optimizer's state) fit on the GPU."""
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    model = adapter = data = None
    try:
        model, adapter, data = build(workload, label, batch, device)
        for _ in range(2):
            iteration(model, adapter, data, scaler)
        torch.cuda.synchronize(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        if adapter is not None:
            adapter.close()  # gdtuo's graphs would outlive the probe
        model = adapter = data = None
        torch.cuda.empty_cache()


def largest_batch(workload: str, label: str, device: torch.device, guess: int, precision: float) -> int:
    """The largest batch that fits, to ``precision`` (relative): bracket it by doubling or halving
    from ``guess``, then bisect."""
    if fits(workload, label, guess, device):
        low, high = guess, 2 * guess
        while fits(workload, label, high, device):
            low, high = high, 2 * high
    else:
        low, high = guess // 2, guess
        while low > 0 and not fits(workload, label, low, device):
            low, high = low // 2, low
    while high - low > max(1, precision * low):
        middle = (low + high) // 2
        low, high = (middle, high) if fits(workload, label, middle, device) else (low, middle)
    return low


def tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in tensors_in(item)]
    return []


def state_copies(adapter, model) -> float | str:
    """The optimizer's tensors that stay between steps, in copies of the parameters (blank for
    gdtuo, whose state is the autograd graph it keeps between steps)."""
    if adapter.optimizer is None:
        return ""
    groups = [{key: value for key, value in group.items() if key != "params"} for group in adapter.optimizer.param_groups]
    tensors = {id(t): t for t in tensors_in([list(adapter.optimizer.state.values()), groups])}
    if hasattr(adapter, "averager"):  # DoG's iterate average: a copy of the whole model
        tensors.update({id(t): t for t in adapter.averager.averaged_model.parameters()})
    return sum(t.numel() for t in tensors.values()) / sum(p.numel() for p in model.parameters())


def peak_memory_child(workload: str, label: str, batch: int) -> None:
    """In a fresh process: peak resident memory (bytes) of a few CPU iterations, and the state."""
    torch.set_num_threads(1)
    model, adapter, data = build(workload, label, batch, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(3):
        iteration(model, adapter, data, scaler)
    # VmHWM, the peak resident set of this program (ru_maxrss would include the parent's at fork)
    status = Path("/proc/self/status").read_text()
    peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    print(json.dumps({"peak_bytes": 1024 * peak_kib, "state_copies": state_copies(adapter, model)}))


def peak_memory(workload: str, label: str, batch: int) -> dict:
    command = [sys.executable, __file__, "--peak-memory-of", workload, label, str(batch)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workloads", nargs="+", default=None, choices=list(WORKLOADS))
    parser.add_argument("--optimizers", nargs="+", default=None, choices=list(OPTIMIZERS))
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch per workload (default: the paper's on CUDA, small on CPU)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: CPU time measures the iteration)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5 on CPU, 20 on CUDA)")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="CUDA: the memory the largest batch must fit in (default: the whole GPU; less makes the bisection faster)")
    parser.add_argument("--precision", type=float, default=0.01, help="CUDA: relative precision of the largest batch")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default results/performance/bench_overhead_<device>)")
    parser.add_argument("--peak-memory-of", nargs=3, metavar=("WORKLOAD", "OPTIMIZER", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_memory_of:
        workload, label, batch = args.peak_memory_of
        return peak_memory_child(workload, label, int(batch))

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    workloads = args.workloads or [w for w, spec in WORKLOADS.items() if cuda or not spec[5]]
    # CPU: no minutes of compiling, and no Triton
    default_labels = [label for label in OPTIMIZERS if cuda or not label.endswith(("compiled", "triton"))]
    labels = args.optimizers or default_labels
    if labels[0] != "AdamW":
        labels = ["AdamW", *[label for label in labels if label != "AdamW"]]
    if args.batch is not None and len(args.batch) != len(workloads):
        parser.error(f"--batch needs one size per workload ({workloads})")
    rounds = args.rounds or (20 if cuda else 5)
    out = args.out or RESULTS / f"bench_overhead_{device.type}"
    out.parent.mkdir(parents=True, exist_ok=True)
    memory_line = ""
    if cuda and args.memory_gib:
        torch.cuda.set_per_process_memory_fraction(args.memory_gib * 2**30 / torch.cuda.get_device_properties(device).total_memory, device.index or 0)
        memory_line = f"Largest batches within {args.memory_gib:g} GiB of the GPU's memory (a cap set by `--memory-gib`), to {100 * args.precision:g}%. "

    rows = []
    for index, workload in enumerate(workloads):
        paper_batch, cpu_batch = WORKLOADS[workload][3:5]
        batch = args.batch[index] if args.batch else (paper_batch if cuda else cpu_batch)
        runnable = [label for label in labels if overrides_for(label, workload) is not None]
        print(f"{workload}, batch {batch}: timing {len(runnable)} optimizers", flush=True)
        times = time_iterations(workload, runnable, batch, device, args.warmup, rounds)
        for label in labels:
            row = {"workload": workload, "batch": batch, "optimizer": label, "iteration_ms": "", "time_overhead": "",
                   "state_copies": "", "peak_mb": "", "memory_overhead": "", "max_batch": "", "batch_overhead": ""}
            if label in times:
                row["iteration_ms"] = round(1e3 * statistics.median(times[label]), 2)
                # the median over rounds of the ratio within a round, which shares the machine's load
                row["time_overhead"] = round(statistics.median(t / r for t, r in zip(times[label], times["AdamW"])) - 1, 4)
            rows.append(row)
        for row in rows[-len(labels):]:
            if row["iteration_ms"] == "":
                continue
            if cuda:
                guess = rows[-len(labels)]["max_batch"] or batch  # AdamW's, once known
                row["max_batch"] = largest_batch(workload, row["optimizer"], device, guess, args.precision)
            else:
                measured = peak_memory(workload, row["optimizer"], batch)
                row["peak_mb"] = round(measured["peak_bytes"] / 2**20, 1)
                row["state_copies"] = measured["state_copies"] if measured["state_copies"] == "" else round(measured["state_copies"], 2)
        reference = rows[-len(labels)]
        for row in rows[-len(labels):]:
            if row["iteration_ms"] == "":
                print(f"  {row['optimizer']:40s} (does not run on this workload)")
                continue
            if cuda:
                row["batch_overhead"] = round(reference["max_batch"] / row["max_batch"] - 1, 4)
                memory = f"B_max {row['max_batch']}  overhead {100 * row['batch_overhead']:+.1f}%"
            else:
                row["memory_overhead"] = round(row["peak_mb"] / reference["peak_mb"] - 1, 4)
                memory = f"peak {row['peak_mb']:.0f} MB ({100 * row['memory_overhead']:+.1f}%), state {row['state_copies']} copies"
            print(f"  {row['optimizer']:40s} {row['iteration_ms']:9.1f} ms  time {100 * row['time_overhead']:+6.1f}%  {memory}", flush=True)
        write(out, rows, markdown(rows, device, rounds, args.warmup, memory_line))  # after each workload: a stopped run keeps what it measured


def write(out: Path, rows: list[dict], table: str) -> None:
    with open(out.with_suffix(".csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')}", flush=True)


def markdown(rows: list[dict], device: torch.device, rounds: int, warmup: int, memory_line: str) -> str:
    cuda = device.type == "cuda"
    clock = "wall time, synchronized" if cuda else "CPU time of the process, one thread"
    memory_columns = "largest batch | memory overhead (B_AdamW / B - 1)" if cuda else "state (parameter copies) | peak memory (MB) | memory overhead (peak / peak_AdamW - 1)"
    lines = [
        f"# Table 1: time and memory overhead against AdamW ({device.type})",
        "",
        f"Machine: {machine(device)}. Iteration time: {clock}, median of {rounds} rounds after {warmup} warm-up "
        "iterations, the optimizers taking turns in one process; the time overhead is the median over rounds of the "
        f"ratio within a round. {memory_line}Written by `scripts/bench_overhead.py`.",
        "",
    ]
    if not cuda:
        lines += ["On CPU the batches are small (see the batch column), so the optimizer's share of an iteration, and every "
                  "time overhead, is larger than at the paper's batch sizes; peak memory is the resident set of a fresh "
                  "process after 3 iterations (interpreter and libraries included).", ""]
    for workload in dict.fromkeys(row["workload"] for row in rows):
        selected = [row for row in rows if row["workload"] == workload]
        lines += [f"## {workload}, batch {selected[0]['batch']}", "",
                  f"| optimizer | iteration (ms) | time overhead | {memory_columns} |",
                  "|---|---:|---:|" + ("---:|" * (2 if cuda else 3))]
        for row in selected:
            if row["iteration_ms"] == "":
                lines.append(f"| {row['optimizer']} | does not run here | | |" + ("" if cuda else " |"))
                continue
            time_cell = f"{row['iteration_ms']:.1f} | {100 * row['time_overhead']:+.1f}%"
            if cuda:
                memory_cell = f"{row['max_batch']} | {100 * row['batch_overhead']:+.1f}%"
            else:
                state = "graph" if row["state_copies"] == "" else f"{row['state_copies']:.2f}"
                memory_cell = f"{state} | {row['peak_mb']:.0f} | {100 * row['memory_overhead']:+.1f}%"
            lines.append(f"| {row['optimizer']} | {time_cell} | {memory_cell} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
