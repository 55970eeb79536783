"""How near the memory floor Inductor takes a one-pass MetaOptimize step on a CPU, on one contiguous buffer.

The floor of a (AdamW, any meta) step: read w, g, h, m, v and write w, h, m, v, 9 passes over memory
against fused AdamW's 7 (1.29x). On one contiguous buffer of ``--numel`` elements (ResNet-18's 11.2M by
default; 15.2M for the llama2.c transformer), one thread, each timed by the process's CPU time taking turns
with torch's fused AdamW in one process (median over rounds of the ratio within a round):

* ``library one-pass``: the library's compiled arithmetic (``metaopt.kernels._foreach_update`` with the
  ``adam`` rule) and the meta-gradient's dot product ``h . g`` in one ``torch.compile`` graph;
* ``library update, eager dot``: the same update compiled alone and the dot product in eager mode
  (what ``kernel="compiled"`` with ``storage="contiguous"`` does for a scalar step size);
* ``hand one-pass`` and ``hand update``: the same equations written out, with the bias corrections
  ``1 - rho^t`` passed in as tensors, with and without the dot product in the graph.

Writes ``results/performance/bench_cpu_floor.md``. Reading the generated code (``TORCH_LOGS=output_code``)
explains the gaps: Inductor gives the dot product a loop of its own (two more passes), and with one
step counter it evaluates the bias corrections' powers inside the update's loop.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from experiments.machine import machine
from metaopt import kernels, rules

RESULTS = Path(__file__).resolve().parents[1] / "results" / "performance"
RULE = rules.RULES["adam"]


def library_update(w, g, h, m, v, step, beta):
    kernels._foreach_update([w], [g], [h], {"exp_avg": [m], "exp_avg_sq": [v]}, [step], [torch.exp(beta)],
                            rule=RULE, hp=RULE.hyperparameters, weight_decay=0.1, gamma=1.0)


def library_one_pass(w, g, h, m, v, step, beta):
    z = torch.dot(h, g)
    library_update(w, g, h, m, v, step, beta)
    return z


def hand_update(w, g, h, m, v, alpha, corrected_rho, corrected_lam):
    m.lerp_(g, 0.1)
    v.mul_(0.999).addcmul_(g, g, value=0.001)
    dw = -alpha * ((m / corrected_rho) / ((v / corrected_lam).sqrt() + 1e-8) + 0.1 * w)
    w.add_(dw)
    h.mul_(1 - 0.1 * alpha).add_(dw)


def hand_one_pass(w, g, h, m, v, alpha, corrected_rho, corrected_lam):
    z = torch.dot(h, g)
    hand_update(w, g, h, m, v, alpha, corrected_rho, corrected_lam)
    return z


def candidates(numel: int) -> dict:
    """name -> a function of no arguments that takes one step (compiled at its first call)."""
    generator = torch.Generator().manual_seed(0)
    w, g, h, m, v = (1e-2 * torch.randn(numel, generator=generator) for _ in range(5))
    step, beta = torch.tensor(10.0), torch.tensor(-7.0)
    scalars = (torch.exp(beta), 1 - 0.9 ** step, 1 - 0.999 ** step)
    weight = torch.nn.Parameter(torch.randn(numel, generator=generator))
    weight.grad = 1e-2 * torch.randn(numel, generator=generator)
    adamw = torch.optim.AdamW([weight], lr=1e-3, weight_decay=0.1, fused=True)
    compiled = {name: torch.compile(function, fullgraph=True, dynamic=False) for name, function in (
        ("library one-pass", library_one_pass), ("library update", library_update),
        ("hand one-pass", hand_one_pass), ("hand update", hand_update))}
    return {
        "AdamW fused": adamw.step,
        "library one-pass": lambda: compiled["library one-pass"](w, g, h, m, v, step, beta),
        "library update, eager dot": lambda: (torch.dot(h, g), compiled["library update"](w, g, h, m, v, step, beta)),
        "hand one-pass": lambda: compiled["hand one-pass"](w, g, h, m, v, *scalars),
        "hand update": lambda: compiled["hand update"](w, g, h, m, v, *scalars),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, nargs="+", default=[11_173_962, 15_191_712])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = ["# A one-pass step on one contiguous buffer: Inductor against the memory floor (CPU)", "",
             f"Machine: {machine(torch.device('cpu'))}. Written by `scripts/bench_cpu_floor.py` (its docstring says what "
             "each line is). Time: CPU time of one thread, median of "
             f"{args.rounds} rounds taking turns with fused AdamW in one process. Floor: 9 passes against 7, 1.29x.", ""]
    for numel in args.numel:
        steps = candidates(numel)
        first = {}
        for name, take_step in steps.items():
            start = time.perf_counter()
            take_step()
            first[name] = time.perf_counter() - start
        times = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, take_step in steps.items():
                start = time.process_time()
                take_step()
                times[name].append(time.process_time() - start)
        lines += [f"## {numel / 1e6:.1f}M elements", "", "| step | ms | x fused AdamW | first call (s) |", "|---|---:|---:|---:|"]
        for name, measured in times.items():
            ratio = statistics.median(t / r for t, r in zip(measured, times["AdamW fused"]))
            lines.append(f"| {name} | {1e3 * statistics.median(measured):.2f} | {ratio:.2f} | {first[name]:.1f} |")
            print(f"{numel} {name:28s} {1e3 * statistics.median(measured):8.2f} ms {ratio:5.2f}x", flush=True)
        lines.append("")
    (RESULTS / "bench_cpu_floor.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
