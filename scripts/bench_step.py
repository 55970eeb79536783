"""Time of one optimizer step: MetaOptimize against torch's AdamW and the plain base optimizers.

For each model (ResNet-18 for CIFAR-10, 11.2M parameters; the 15M llama2.c transformer) and
each MetaOptimize configuration (base x meta pair, scalar or blockwise step sizes, kernel),
the script times ``optimizer.step()`` alone, on gradients already in place. Each configuration
is timed side by side with fused AdamW and its plain base optimizer, in one process, taking
turns step by step after a warm-up (the warm-up includes a compiled kernel's compilation);
the median of the rounds is reported, and each ratio is the median over rounds of the two
times of one round (neighbours in time share the machine's load).

On CPU the step runs on one thread and is timed by the process's CPU time, which other
programs sharing the cores hardly disturb; on CUDA by wall time after synchronizing.

    python scripts/bench_step.py                          # CPU: every pair, foreach and compiled kernels
    python scripts/bench_step.py --device cuda
    python scripts/bench_step.py --pairs adamw/lion lion/lion --kernels foreach --models resnet18_cifar
    python scripts/bench_step.py --proxy                  # the launch-bound proxy below
    python scripts/bench_step.py --learned                # the cost of learn=(...): bench_step_learned.csv, .md
    python scripts/bench_step.py --storages separate contiguous   # each kernel with each storage

Writes ``results/performance/bench_step_<device>.csv`` and ``.md`` (a table with the machine).

The launch-bound proxy (``--proxy``) measures the regime of a GPU step without a GPU: as many
parameter tensors as ResNet-18 (62) and llama2.c's 15M transformer (56), of 4 elements each,
so that a step's cost is its Python and its dispatched operations, not its arithmetic. For
every pair, granularity and kernel it reports the host time of a step (CPU time, one thread)
and the number of operations it dispatches (counted by a ``TorchDispatchMode``; the
profiler's two markers around every ``Optimizer.step`` are left out), against fused AdamW
taking turns with it. Writes ``bench_step_proxy.csv`` and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import statistics
import time
from pathlib import Path

import timm.optim
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from experiments.machine import machine
from experiments.models import llama2c_15m, resnet18_cifar
from metaopt import BASES, BLOCKS, METAS, MetaOptimize, param_groups_by_prefix
from metaopt.kernels import KERNELS

RESULTS = Path(__file__).resolve().parents[1] / "results" / "performance"
MODELS = {"resnet18_cifar": (resnet18_cifar, "resnet18"), "llama2c_15m": (llama2c_15m, "llama2c")}

# The plain base optimizers, torch's (timm's for Lion), with fused kernels where torch has them.
PLAIN_BASES = {
    "sgd": ("SGD fused", functools.partial(torch.optim.SGD, lr=1e-3, fused=True)),
    "sgdm": ("SGD momentum fused", functools.partial(torch.optim.SGD, lr=1e-3, momentum=0.9, fused=True)),
    "rmsprop": ("RMSprop foreach", functools.partial(torch.optim.RMSprop, lr=1e-3, foreach=True)),
    "adamw": ("AdamW fused", functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1, fused=True)),
    "lion": ("Lion foreach (timm)", functools.partial(timm.optim.Lion, lr=1e-4, weight_decay=0.1, foreach=True)),
}
ADAMW_FUSED = PLAIN_BASES["adamw"][1]
ADAMW_FOREACH = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1, foreach=True)


class Candidate:
    """One optimizer on its own copy of the model, with fixed random gradients in place."""

    def __init__(self, name: str, make_model, make_optimizer, device: torch.device):
        torch.manual_seed(0)
        self.name = name
        self.model = make_model().to(device)
        generator = torch.Generator(device).manual_seed(1)
        for p in self.model.parameters():
            p.grad = 1e-2 * torch.randn(p.shape, generator=generator, device=device)
        self.optimizer = make_optimizer(self.model)
        self.times: list[float] = []
        self.first_step_s = 0.0


def timed_step(candidate: Candidate, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        candidate.optimizer.step()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start
    start = time.process_time()
    candidate.optimizer.step()
    return time.process_time() - start


def race(candidates: list[Candidate], device: torch.device, warmup: int, rounds: int) -> None:
    """Warm up, then step the candidates in turn, ``rounds`` times."""
    for candidate in candidates:
        start = time.perf_counter()
        candidate.optimizer.step()  # compiles a compiled kernel
        candidate.first_step_s = time.perf_counter() - start
        for _ in range(warmup - 1):
            candidate.optimizer.step()
    for _ in range(rounds):
        for candidate in candidates:
            candidate.times.append(timed_step(candidate, device))


def median_ms(candidate: Candidate) -> float:
    return 1e3 * statistics.median(candidate.times)


def median_ratio(candidate: Candidate, reference: Candidate) -> float:
    """The median over rounds of the candidate's time over the reference's in the same round:
    neighbours in time share the machine's load, which a ratio of medians would not cancel."""
    return statistics.median(t / r for t, r in zip(candidate.times, reference.times))


def metaoptimize(model: nn.Module, base: str, meta: str, blocks: str, preset: str, kernel: str,
                 storage: str = "separate") -> MetaOptimize:
    if blocks == "scalar":
        return MetaOptimize(model.parameters(), base, meta, "scalar", kernel=kernel, storage=storage)
    return MetaOptimize(param_groups_by_prefix(model, preset), base, meta, "param_group", kernel=kernel, storage=storage)


def setting(kernel: str, storage: str) -> str:
    """A column of the tables: the kernel, and the storage when it is contiguous."""
    return kernel if storage == "separate" else f"{kernel} + contiguous"


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--pairs", nargs="+", default=[f"{b}/{m}" for b, m in itertools.product(BASES, METAS)],
                        help="base/meta pairs, e.g. adamw/lion")
    parser.add_argument("--blocks", nargs="+", default=["scalar", "blockwise"], choices=["scalar", "blockwise"])
    parser.add_argument("--kernels", nargs="+", default=None, choices=list(KERNELS),
                        help="default: foreach, flat and compiled (with --proxy: foreach and flat)")
    parser.add_argument("--storages", nargs="+", default=["separate"], choices=["separate", "contiguous"],
                        help="MetaOptimize(storage=...): each kernel with each (default: separate)")
    parser.add_argument("--proxy", action="store_true", help="the launch-bound proxy: many tiny tensors")
    parser.add_argument("--learned", action="store_true",
                        help="the cost of each hyper-parameter learned beyond the step size (learn=...)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: CPU time measures the step)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 9 on CPU, 30 on CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default results/performance/bench_step_<device>)")
    args = parser.parse_args()
    for pair in args.pairs:
        base, _, meta = pair.partition("/")
        if base not in BASES or meta not in METAS:
            parser.error(f"unknown pair {pair}: bases are {list(BASES)}, metas {list(METAS)}")
    return args


def main() -> None:
    args = parse_arguments()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.proxy:
        return proxy(args, device)
    if args.learned:
        return learned_cost(args, device)
    args.kernels = args.kernels or ["foreach", "flat", "compiled"]
    rounds = args.rounds or (30 if device.type == "cuda" else 9)
    out = args.out or RESULTS / f"bench_step_{device.type}"
    out.parent.mkdir(parents=True, exist_ok=True)
    pairs = [tuple(pair.split("/")) for pair in args.pairs]
    rows = []
    for model_name in args.models:
        make_model, preset = MODELS[model_name]
        n_params = sum(p.numel() for p in make_model().parameters())
        print(f"{model_name}: {n_params / 1e6:.1f}M parameters", flush=True)
        rows += baseline_rows(model_name, make_model, n_params, device, args.warmup, rounds)
        for (base, meta), blocks, kernel, storage in itertools.product(pairs, args.blocks, args.kernels, args.storages):
            if kernel == "triton" and device.type != "cuda":
                continue  # Triton's interpreter is a test harness, not a CPU kernel
            rows.append(metaoptimize_row(model_name, make_model, preset, n_params, (base, meta, blocks, kernel, storage),
                                         device, args.warmup, rounds))
        # after each model: a stopped run keeps what it measured
        with open(out.with_suffix(".csv"), "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        out.with_suffix(".md").write_text(markdown(rows, machine(device), device, rounds, args))
        print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')}", flush=True)


def baseline_rows(model_name, make_model, n_params, device, warmup, rounds) -> list[dict]:
    """The baselines alone: torch's AdamW kernels and the plain base optimizers, racing each other."""
    baselines = [Candidate("AdamW fused", make_model, lambda m: ADAMW_FUSED(m.parameters()), device),
                 Candidate("AdamW foreach", make_model, lambda m: ADAMW_FOREACH(m.parameters()), device)]
    baselines += [Candidate(name, make_model, lambda m, f=factory: f(m.parameters()), device)
                  for base, (name, factory) in PLAIN_BASES.items() if base != "adamw"]
    race(baselines, device, warmup, rounds)
    rows = []
    for candidate in baselines:
        ratio = median_ratio(candidate, baselines[0])
        rows.append({"model": model_name, "params": n_params, "optimizer": candidate.name, "base": "", "meta": "",
                     "blocks": "", "kernel": "", "step_ms": round(median_ms(candidate), 3),
                     "adamw_fused_ms": round(median_ms(baselines[0]), 3), "vs_adamw_fused": round(ratio, 3),
                     "plain_base_ms": "", "vs_plain_base": "", "first_step_s": round(candidate.first_step_s, 2)})
        print(f"  {candidate.name:36s} {median_ms(candidate):9.2f} ms  {ratio:5.2f}x fused AdamW", flush=True)
    return rows


def metaoptimize_row(model_name, make_model, preset, n_params, configuration, device, warmup, rounds) -> dict:
    """One MetaOptimize configuration (base, meta, blocks, kernel, storage) racing fused AdamW and its
    plain base optimizer in one process."""
    base, meta, blocks, kernel, storage = configuration
    label = f"MetaOptimize ({base}, {meta}) {blocks} {setting(kernel, storage)}"
    # a base without a torch counterpart (a rule added to metaopt.rules) is timed against AdamW twice
    plain_name, plain = PLAIN_BASES.get(base, PLAIN_BASES["adamw"])
    candidates = [
        Candidate("AdamW fused", make_model, lambda m: ADAMW_FUSED(m.parameters()), device),
        Candidate(plain_name, make_model, lambda m: plain(m.parameters()), device),
        Candidate(label, make_model, lambda m: metaoptimize(m, base, meta, blocks, preset, kernel, storage), device),
    ]
    race(candidates, device, warmup, rounds)
    fused, plain_ms, step = (median_ms(c) for c in candidates)
    vs_fused, vs_plain = median_ratio(candidates[2], candidates[0]), median_ratio(candidates[2], candidates[1])
    print(f"  {label:54s} {step:9.2f} ms  {vs_fused:5.2f}x fused AdamW  {vs_plain:5.2f}x {plain_name}"
          f"  (first step {candidates[2].first_step_s:.1f} s)", flush=True)
    return {"model": model_name, "params": n_params, "optimizer": "MetaOptimize", "base": base, "meta": meta,
            "blocks": blocks, "kernel": setting(kernel, storage),
            "step_ms": round(step, 3), "adamw_fused_ms": round(fused, 3), "vs_adamw_fused": round(vs_fused, 3),
            "plain_base_ms": round(plain_ms, 3), "vs_plain_base": round(vs_plain, 3),
            "first_step_s": round(candidates[2].first_step_s, 2)}


# -- hyper-parameters learned beyond the step size -----------------------------------------------

# What each base learns in the table: every hyper-parameter alone beside the step size, then all at once.
LEARNABLE = {"sgdm": ("weight_decay", "momentum"), "adamw": ("weight_decay", "eps", "momentum", "normalizer")}


def learned_settings(base: str) -> list[tuple[str, tuple[str, ...]]]:
    names = LEARNABLE[base]
    return [("step_size", ("step_size",))] + [(f"+{name}", ("step_size", name)) for name in names] + [
        ("+all", ("step_size", *names))]


def learned_optimizer(model: nn.Module, base: str, learn: tuple[str, ...], kernel: str, blocks: str = "scalar"):
    return MetaOptimize(model.parameters(), base, "adam", blocks, kernel=kernel, learn=learn, weight_decay=1e-2)


def state_buffers(model: nn.Module, optimizer: MetaOptimize) -> float:
    """The optimizer's state in parameter-sized buffers: the elements of every state tensor over the parameters'."""
    params = list(model.parameters())
    held = sum(value.numel() for p in params for value in optimizer.state[p].values() if isinstance(value, torch.Tensor))
    return held / sum(p.numel() for p in params)


def learned_memory(base: str) -> list[dict]:
    """Measured after one step of a small MLP: the extra state over learning the step size alone, per granularity."""
    rows = []
    for blocks in ("scalar", "weightwise"):
        for setting, learn in learned_settings(base):
            model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            optimizer = learned_optimizer(model, base, learn, "foreach", blocks)
            optimizer.step()
            rows.append({"base": base, "blocks": blocks, "setting": setting, "buffers": state_buffers(model, optimizer)})
    return rows


def learned_cost(args, device: torch.device) -> None:
    """Step time of (SGDm, Adam) and (AdamW, Adam) learning each hyper-parameter, side by side with the same
    optimizer learning the step size alone (one race per base and kernel), and the extra state memory."""
    rounds = args.rounds or (30 if device.type == "cuda" else 9)
    out = args.out or RESULTS / "bench_step_learned"
    kernels = args.kernels or ["foreach", "compiled", "reference"]
    rows = []
    for model_name, base, kernel in itertools.product(args.models, LEARNABLE, kernels):
        make_model = MODELS[model_name][0]
        settings = learned_settings(base) if kernel != "reference" else [learned_settings(base)[0], learned_settings(base)[-1]]
        candidates = [Candidate(setting, make_model, lambda m, learn=learn: learned_optimizer(m, base, learn, kernel), device)
                      for setting, learn in settings]
        race(candidates, device, args.warmup, rounds)
        for candidate in candidates:
            rows.append({"model": model_name, "base": base, "kernel": kernel, "setting": candidate.name,
                         "step_ms": round(median_ms(candidate), 3),
                         "vs_step_size_only": round(median_ratio(candidate, candidates[0]), 3),
                         "first_step_s": round(candidate.first_step_s, 2)})
            print(f"  {model_name} ({base}, adam) {kernel:9s} {candidate.name:14s} {median_ms(candidate):9.2f} ms "
                  f"{rows[-1]['vs_step_size_only']:5.2f}x", flush=True)
        del candidates
    memory = [row for base in LEARNABLE for row in learned_memory(base)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out.with_suffix(".md").write_text(learned_markdown(rows, memory, machine(device), rounds, args.warmup))
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')}", flush=True)


def learned_markdown(rows: list[dict], memory: list[dict], machine_line: str, rounds: int, warmup: int) -> str:
    lines = [
        "# The cost of learning hyper-parameters beyond the step size (`learn=`)", "",
        f"Machine: {machine_line}. Time of `optimizer.step()` ({rounds} rounds after {warmup} warm-up steps), "
        "MetaOptimize(base, 'adam', 'scalar', learn=...) for each setting taking turns with the same optimizer "
        "learning the step size alone in one process; a ratio is the median over rounds of the ratio within a round. "
        "`reference`: the generic route (torch.func.jvp of the rule). Written by `scripts/bench_step.py --learned`.", "",
        "| model | base | kernel | learned | step (ms) | x step size only |", "|---|---|---|---|---:|---:|",
    ]
    lines += [f"| {r['model']} | {r['base']} | {r['kernel']} | {r['setting']} | {r['step_ms']:.2f} | "
              f"{r['vs_step_size_only']:.2f} |" for r in rows]
    lines += ["", "## State memory, in parameter-sized buffers (measured after one step)", "",
              "Every state tensor's elements over the parameters' (a 64-128-10 MLP); the difference to the step "
              "size alone is what the learned hyper-parameters add. Weightwise blocks hold each hyper-parameter's "
              "log or logit and its two Adam meta moments per weight besides its traces.", "",
              "| base | blocks | learned | state buffers | extra |", "|---|---|---|---:|---:|"]
    alone = {(r["base"], r["blocks"]): r["buffers"] for r in memory if r["setting"] == "step_size"}
    lines += [f"| {r['base']} | {r['blocks']} | {r['setting']} | {r['buffers']:.2f} | "
              f"{r['buffers'] - alone[(r['base'], r['blocks'])]:.2f} |" for r in memory]
    return "\n".join(lines) + "\n"


# -- the launch-bound proxy ----------------------------------------------------------------------

PROXY_MODELS = {"resnet18 tensors": 62, "llama2c tensors": 56}


class DispatchCount(TorchDispatchMode):
    """Counts the operations dispatched inside it, but the profiler's markers."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "profiler":
            self.count += 1
        return func(*args, **(kwargs or {}))


def tiny_model(n_tensors: int) -> nn.Module:
    return nn.ParameterList([nn.Parameter(torch.randn(4)) for _ in range(n_tensors)])


def dispatched_ops(optimizer: torch.optim.Optimizer) -> int:
    with DispatchCount() as counter:
        optimizer.step()
    return counter.count


def proxy(args, device: torch.device) -> None:
    kernels = args.kernels or ["foreach", "flat"]
    pairs = [tuple(pair.split("/")) for pair in args.pairs]
    steps_per_round, rounds = 50, args.rounds or 9
    rows = []
    for model_name, n_tensors in PROXY_MODELS.items():
        print(f"{model_name}: {n_tensors} tensors of 4 elements", flush=True)
        for (base, meta), blocks, kernel in itertools.product(pairs, BLOCKS, kernels):
            candidates = [
                Candidate("AdamW fused", lambda: tiny_model(n_tensors), lambda m: ADAMW_FUSED(m.parameters()), device),
                Candidate("MetaOptimize", lambda: tiny_model(n_tensors),
                          lambda m: MetaOptimize(m.parameters(), base, meta, blocks, kernel=kernel), device),
            ]
            race(candidates, device, args.warmup, 0)
            ops = [dispatched_ops(c.optimizer) for c in candidates]
            for _ in range(rounds):  # rounds of many steps: one step is too short for the clock
                for candidate in candidates:
                    start = time.process_time()
                    for _ in range(steps_per_round):
                        candidate.optimizer.step()
                    candidate.times.append((time.process_time() - start) / steps_per_round)
            fused_us, step_us = (1e6 * statistics.median(c.times) for c in candidates)
            ratio = median_ratio(candidates[1], candidates[0])
            rows.append({"tensors": model_name, "base": base, "meta": meta, "blocks": blocks, "kernel": kernel,
                         "step_us": round(step_us, 1), "ops": ops[1], "adamw_fused_us": round(fused_us, 1),
                         "adamw_fused_ops": ops[0], "vs_adamw_fused": round(ratio, 3)})
            print(f"  ({base}, {meta}) {blocks:11s} {kernel:8s} {step_us:8.1f} us {ops[1]:4d} ops  "
                  f"{ratio:5.2f}x fused AdamW ({fused_us:.1f} us, {ops[0]} ops)", flush=True)
    out = args.out or RESULTS / "bench_step_proxy"
    with open(out.with_suffix(".csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out.with_suffix(".md").write_text(proxy_markdown(rows, machine(device), rounds, steps_per_round))
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')}", flush=True)


def proxy_markdown(rows: list[dict], machine_line: str, rounds: int, steps_per_round: int) -> str:
    columns = list(dict.fromkeys((r["tensors"], r["kernel"]) for r in rows))
    fused = {r["tensors"]: (r["adamw_fused_us"], r["adamw_fused_ops"]) for r in rows}
    lines = [
        "# Launch-bound proxy: host time and dispatched operations of one step",
        "",
        f"Machine: {machine_line}. Parameters: as many tensors as ResNet-18 (62) or llama2.c's 15M transformer "
        "(56), 4 elements each, so that a step costs its Python and its dispatched operations, the regime of a GPU "
        f"step. Time: CPU time of the process, median of {rounds} rounds of {steps_per_round} steps, taking turns "
        "with fused AdamW in one process; a ratio is the median over rounds of the ratio within a round. Operations: "
        "those one step dispatches (the profiler's markers left out). Written by `scripts/bench_step.py --proxy`.",
        "",
        "Fused AdamW: " + "; ".join(f"{name}: {us:.0f} us, {ops} ops" for name, (us, ops) in fused.items()) + ".",
        "",
        "Each cell: step time as a multiple of fused AdamW's, and the operations a step dispatches.",
        "",
    ]
    lines += pair_table(rows, "tensors", columns, lambda e: f"{e['vs_adamw_fused']:.2f}x, {e['ops']}")
    return "\n".join(lines) + "\n"


def pair_table(rows: list[dict], setting: str, columns: list[tuple[str, str]], cell) -> list[str]:
    """A markdown table: a line per (base, meta, blocks), a column per (rows' ``setting``, kernel)."""
    lines = [
        "| base | meta | blocks | " + " | ".join(f"{name}, {kernel}" for name, kernel in columns) + " |",
        "|---|---|---|" + "---:|" * len(columns),
    ]
    cells = {(r["base"], r["meta"], r["blocks"], r[setting], r["kernel"]): r for r in rows}
    for base, meta, blocks in dict.fromkeys((r["base"], r["meta"], r["blocks"]) for r in rows):
        entries = [cells.get((base, meta, blocks, name, kernel)) for name, kernel in columns]
        lines.append(f"| {base} | {meta} | {blocks} | " + " | ".join(cell(e) if e else "" for e in entries) + " |")
    return lines


def markdown(rows: list[dict], machine_line: str, device: torch.device, rounds: int, args) -> str:
    clock = "CPU time of the process" if device.type == "cpu" else "wall time, synchronized"
    lines = [
        f"# Optimizer step time ({device.type})",
        "",
        f"Machine: {machine_line}. Time: {clock}, median of {rounds} rounds after {args.warmup} warm-up steps, "
        "each configuration taking turns with fused AdamW in one process; a ratio is the median over rounds of the "
        "ratio within a round. Written by `scripts/bench_step.py`.",
        "",
        "## Baselines",
        "",
        "| model | optimizer | step (ms) | x fused AdamW |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {r['model']} | {r['optimizer']} | {r['step_ms']:.2f} | {r['vs_adamw_fused']:.2f} |"
              for r in rows if r["optimizer"] != "MetaOptimize"]
    metaopt_rows = [r for r in rows if r["optimizer"] == "MetaOptimize"]
    columns = sorted({(r["model"], r["kernel"]) for r in metaopt_rows}, key=lambda c: (args.models.index(c[0]), c[1]))
    lines += [
        "",
        "## MetaOptimize: step time as a multiple of fused AdamW's (in brackets: of the plain base optimizer's)",
        "",
        "Blockwise: one step size per named block (`param_groups_by_prefix`: ResNet-18's stem, layer1-4 and head; "
        "the transformer's embedding, 6 layers and head).",
        "",
    ]
    lines += pair_table(metaopt_rows, "model", columns, lambda e: f"{e['vs_adamw_fused']:.2f} ({e['vs_plain_base']:.2f})")
    compiled = [r for r in metaopt_rows if r["kernel"].startswith("compiled")]
    if compiled:
        lines += ["", "First step of the compiled kernel (wall time, with its compilation): " + "; ".join(
            f"{r['model']} ({r['base']}, {r['meta']}) {r['blocks']} {r['kernel']}: {r['first_step_s']:.1f} s" for r in compiled) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
