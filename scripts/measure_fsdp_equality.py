"""How close MetaOptimize on FSDP2 parameters comes to one process, per granularity, variant, dtype and world size.

Runs the cases of tests/metaopt/test_fsdp.py (its tiny sharded MLP, 50 steps over gloo ranks on the
CPU, each rank fed its share of the same global batches) and prints, for each, what the test only
bounds: the largest relative difference of a step size from the single-process run's, that of the
gathered weights (over the largest weight), whether every rank holds identical step sizes, and the
sizes of the optimizer's all-reduces in a step. Writes results/performance/fsdp_equality.md.

    python scripts/measure_fsdp_equality.py --worlds 2 4
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from tests.metaopt.test_fsdp import STEPS, _single_process, _spawn, _worker, every_case, worst_differences


def measure(world: int) -> list[dict]:
    """One row per case: the worst differences from one process and the all-reduces of a step."""
    rows = []
    with tempfile.TemporaryDirectory() as out:
        _spawn(_worker, world, every_case(), out)
        ranks = [torch.load(Path(out) / f"rank{rank}.pt") for rank in range(world)]
    for index, case in enumerate(every_case()):
        reference = _single_process(case)
        first = ranks[0][index]
        identical = all(torch.equal(a, b) for other in ranks[1:]
                        for a, b in zip(other[index]["alphas"], first["alphas"]))
        alpha, weight = worst_differences(first, reference)
        rows.append({"world": world, "blocks": case["blocks"], "variant": case["variant"],
                     "dtype": str(case["dtype"]).removeprefix("torch."), "mixed": case["mixed"],
                     "identical_on_ranks": identical, "step_size_rel": alpha, "weight_rel": weight,
                     "first_step": first["all_reduces"][0], "later_steps": first["all_reduces"][1]})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["# MetaOptimize on FSDP2 against one process (scripts/measure_fsdp_equality.py)", "",
             f"The test problem of tests/metaopt/test_fsdp.py: a 5-7-1 MLP sharded by `fully_shard` (uneven shards; "
             f"ranks past the first hold no row of the last layer), (AdamW, Adam), {STEPS} steps on gloo CPU ranks, "
             "each rank fed its share of global batches of 8; one process trains the same model on the whole "
             "batches. float32 cases also hold a plain (not sharded) parameter in the optimizer. Step size: the "
             "largest relative difference of any block's step size; weight: the largest difference of a gathered "
             "weight over that tensor's largest weight. All-reduces: the number of values of each of the "
             "optimizer's all-reduces in the first step (alpha0='auto' adds one of 3 values per param group) "
             "and in every later step.", "",
             "| world | blocks | variant | dtype | step sizes identical on every rank | step size vs one process "
             "| weights vs one process | all-reduces, first step | all-reduces, later steps |",
             "|---:|---|---|---|---|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['world']} | {r['blocks']} | {r['variant']} | {r['dtype']}{' + plain' if r['mixed'] else ''} "
                     f"| {'yes' if r['identical_on_ranks'] else 'NO'} | {r['step_size_rel']:.1e} | {r['weight_rel']:.1e} "
                     f"| {r['first_step']} | {r['later_steps']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", default="results/performance/fsdp_equality.md")
    args = parser.parse_args()
    rows = [row for world in args.worlds for row in measure(world)]
    text = markdown(rows)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
