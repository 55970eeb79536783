"""kernel="triton" against the reference kernel: on a CPU under Triton's interpreter (in a subprocess,
since TRITON_INTERPRET must be set before triton is imported), on CUDA wherever a GPU is present.

Tolerances: the Triton kernel computes in float32 with float32 hyper-parameters and pow as exp(t log x),
the reference in torch's float32 ops: after 5 steps the weights agree to 1e-5 (relative) and the learned
log step sizes to 1% of how far they moved from alpha0 (measured: about 1e-6 and 1e-4)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaopt import MetaOptimize, Rule
from tests.metaopt import triton_cases

ROOT = Path(__file__).resolve().parents[2]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
triton = pytest.importorskip("triton")
# Triton's interpreter (TRITON_INTERPRET=1) runs the kernels with numpy, which neither torch nor the library needs
INTERPRETER = pytest.mark.skipif(importlib.util.find_spec("numpy") is None,
                                 reason="Triton's interpreter needs numpy")

# Thin: every base, every meta, every granularity, both variants, both storages and a tensor lr at least once;
# three cases run twice (deterministic).
THIN = (
    [{"base": base, "meta": "adam", "blocks": "param_group"} for base in ("sgd", "sgdm", "rmsprop", "adamw", "lion")]
    + [{"base": "adamw", "meta": meta, "blocks": "layerwise"} for meta in ("sgd", "rmsprop", "adam", "lion")]
    + [{"base": "sgdm", "meta": "rmsprop", "blocks": blocks, "repeat": True}
       for blocks in ("scalar", "nodewise", "weightwise")]
    + [{"base": base, "meta": meta, "blocks": "nodewise", "variant": "released"}
       for base, meta in (("adamw", "adam"), ("sgdm", "rmsprop"), ("rmsprop", "lion"))]
    + [{"base": "lion", "meta": "adam", "blocks": "weightwise", "storage": "contiguous"},
       {"base": "adamw", "meta": "rmsprop", "blocks": "scalar", "storage": "contiguous", "tensor_lr": True}]
)


def interpreted(cases: list[dict]) -> dict[str, dict]:
    environment = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, "-m", "tests.metaopt.triton_cases", json.dumps(cases)], cwd=ROOT,
                               env=environment, capture_output=True, text=True, timeout=3000)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def assert_equals_reference(result: dict) -> None:
    assert result["weights"] < 1e-5
    assert result["log_step_sizes"] < 1e-2
    assert result["moved"] > 1e-4  # the comparison has teeth: the step sizes moved away from alpha0
    assert result["deterministic"] in (True, None)  # bit-identical when run twice


@pytest.fixture(scope="module")
def thin_results():
    return interpreted(THIN)


@INTERPRETER
@pytest.mark.parametrize("case", THIN, ids=triton_cases.name)
def test_the_triton_kernel_equals_the_reference_under_the_interpreter(case, thin_results):
    assert_equals_reference(thin_results[triton_cases.name(case)])


@INTERPRETER
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_every_base_meta_granularity_and_variant_under_the_interpreter():
    results = interpreted(triton_cases.every_case())
    for name, result in results.items():
        assert result["weights"] < 1e-5, name
        assert result["log_step_sizes"] < 1e-2, name
        assert result["deterministic"], name


@CUDA
@pytest.mark.parametrize("case", triton_cases.every_case(), ids=triton_cases.name)
def test_the_triton_kernel_equals_the_reference_on_cuda(case):
    result = triton_cases.compare(**case, device="cuda")
    assert result["weights"] < 1e-5
    assert result["log_step_sizes"] < 1e-2
    assert result["deterministic"]


@CUDA
def test_the_triton_step_never_synchronizes_with_the_host():
    model, optimizer = triton_cases.make("adamw", "lion", "nodewise", "triton", "contiguous", torch.float32, "cuda")
    triton_cases.train(model, optimizer, 2)  # builds the plan and its tables, compiles the kernels
    triton_cases.train(model, optimizer, 1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_cpu_parameter_outside_the_interpreter_is_refused_before_any_work():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs the kernel on a CPU")
    parameter = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="kernel='triton' runs on CUDA tensors.*kernel='flat'"):
        MetaOptimize([parameter], kernel="triton")


def test_a_rule_without_a_triton_form_is_refused():
    custom = Rule({}, (), lambda x, moments, hp, step: (x.sign(), {}))
    with pytest.raises(ValueError, match="no Triton form of this base rule.*kernel='flat'"):
        MetaOptimize([torch.nn.Parameter(torch.ones(3, device="cuda" if torch.cuda.is_available() else "cpu"))],
                     custom, kernel="triton")
