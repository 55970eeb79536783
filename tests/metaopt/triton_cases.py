"""The Triton kernel against the reference kernel, case by case (not a test module).

On a CPU, Triton's interpreter must be on before triton is imported, so test_triton_kernel.py runs
this module in a subprocess with ``TRITON_INTERPRET=1``:

    TRITON_INTERPRET=1 python -m tests.metaopt.triton_cases '<json list of cases>'

prints one JSON line: for each case, the relative error of the weights, the error of the learned
log step sizes relative to how far they moved, how far they moved, and whether two runs of the
Triton kernel are bit-identical. On CUDA the tests call :func:`compare` in-process.
"""

from __future__ import annotations

import itertools
import json
import sys

import torch

from metaopt import BASES, BLOCKS, METAS
from tests.metaopt.references import make, train, weights_and_step_sizes

ALPHA0 = 1e-2


def compare(base: str, meta: str, blocks: str, variant: str = "standard", storage: str = "separate",
            tensor_lr: bool = False, repeat: bool = False, device: str = "cpu", steps: int = 5) -> dict[str, float]:
    """(reference, triton, with ``repeat`` triton again) trained ``steps`` steps in float32 from the same start."""
    results = []
    for kernel in ("reference", "triton", "triton")[: 3 if repeat else 2]:
        lr = {"lr": torch.tensor(0.8, device=device)} if tensor_lr else {}
        meta_lr = {"meta_lr": 2.0} if meta == "sgd" else {}  # its step is the raw meta-gradient's size
        model, optimizer = make(base, meta, blocks, kernel, storage, torch.float32, device, variant=variant,
                                alpha0=ALPHA0 / 0.8 if tensor_lr else ALPHA0, **lr, **meta_lr)
        train(model, optimizer, steps)
        results.append([tensor.cpu() for tensor in weights_and_step_sizes(model, optimizer)])
    (weights, step_sizes), (got_weights, got_step_sizes), *again = results
    moved = (step_sizes / ALPHA0).log().abs().max().item()
    return {
        "weights": ((got_weights - weights).norm() / weights.norm()).item(),
        "log_step_sizes": ((got_step_sizes / step_sizes).log().abs().max() / max(moved, 1e-30)).item(),
        "moved": moved,
        "deterministic": all(torch.equal(a, b) for a, b in zip(again[0], results[1])) if again else None,
    }


def every_case() -> list[dict]:
    """Every base x meta x granularity x variant, each run twice."""
    return [{"base": base, "meta": meta, "blocks": blocks, "variant": variant, "repeat": True}
            for base, meta, blocks, variant in itertools.product(BASES, METAS, BLOCKS, ("standard", "released"))]


def name(case: dict) -> str:
    return "-".join(str(value) for value in case.values())


if __name__ == "__main__":
    cases = json.loads(sys.argv[1])
    print(json.dumps({name(case): compare(**case) for case in cases}))
