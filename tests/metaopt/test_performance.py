"""The step never waits for the device, and keeps exactly one parameter-sized buffer (the
trace) beyond the base optimizer's own state, and the flat kernel two more (the gathered
weights and gradients)."""

from __future__ import annotations

import gc
import itertools

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from metaopt import BASES, BLOCKS, METAS, MetaOptimize, RULES
from metaopt.optimizer import _OLD_DYNAMO, BASES as RULE_OF_BASE

PAIRS = list(itertools.product(BASES, METAS))
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_model(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 5), nn.Tanh(), nn.Linear(5, 3))
    return model.to(device, dtype)


def backward(model, t, device="cpu", dtype=torch.float32):
    generator = torch.Generator().manual_seed(t)
    x = torch.randn(8, 1, 6, 6, generator=generator, dtype=dtype).to(device)
    y = torch.randint(0, 3, (8,), generator=generator).to(device)
    nn.functional.cross_entropy(model(x), y).backward()


class NoReadBack(TorchDispatchMode):
    """Fails on every op that copies a tensor's value to the host: ``.item()``, ``bool(t)``,
    ``.tolist()``, ``torch.equal``."""

    READ_BACK = {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.equal.default,
        torch.ops.aten.is_nonzero.default,
    }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READ_BACK:
            raise AssertionError(f"{func} reads a tensor back to the host")
        return func(*args, **(kwargs or {}))


def test_the_read_back_detector_fires():
    with pytest.raises(AssertionError, match="reads a tensor back"), NoReadBack():
        torch.ones(2).sum().item()


@pytest.mark.parametrize("kernel", ["flat", "foreach", "reference"])
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("base,meta", PAIRS)
def test_step_reads_nothing_back(base, meta, blocks, kernel):
    model = make_model()
    optimizer = MetaOptimize(model.parameters(), base, meta, blocks, kernel=kernel, lr=torch.tensor(0.5))
    for t in range(3):
        optimizer.zero_grad()
        backward(model, t)
        with NoReadBack():
            optimizer.step()


def test_skipping_a_nonfinite_step_reads_nothing_back():
    model = make_model()
    optimizer = MetaOptimize(model.parameters(), "adamw", "lion", "layerwise", skip_nonfinite=True)
    for t in range(3):
        optimizer.zero_grad()
        backward(model, t)
        next(model.parameters()).grad.view(-1)[0] = float("nan") if t == 1 else 0.0
        with NoReadBack():
            optimizer.step()
    assert all(p.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("kernel", ["flat", "foreach", "compiled"])
@pytest.mark.parametrize("base,meta,blocks", [("adamw", "lion", "scalar"), ("lion", "lion", "nodewise")])
def test_the_whole_step_compiles_to_one_graph(base, meta, blocks, kernel, device):
    """``torch.compile(step, fullgraph=True)`` fails on any read-back (a graph break), and the
    compiled step computes what the eager one does (the flat kernel's eager step on flat buffers,
    its compiled one per tensor: Inductor fuses the ops either way)."""
    torch._dynamo.reset()  # every case compiles Optimizer.step's one code object: keep under its recompile limit
    if blocks == "nodewise" and _OLD_DYNAMO:
        model = make_model(device)
        optimizer = MetaOptimize(model.parameters(), base, meta, blocks, kernel=kernel)
        backward(model, 0, device)
        with pytest.raises(RuntimeError, match="wrong meta-gradients on torch"):
            torch.compile(optimizer.step, fullgraph=True)()
        return
    results = []
    for compiled in (False, True):
        model = make_model(device)
        optimizer = MetaOptimize(model.parameters(), base, meta, blocks, kernel=kernel, alpha0=1e-2, meta_lr=0.05)
        step = torch.compile(optimizer.step, fullgraph=True) if compiled else optimizer.step
        for t in range(4):
            optimizer.zero_grad()
            backward(model, t, device)
            step()
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-7)


def test_the_first_step_with_auto_alpha0_compiles_to_one_graph():
    """alpha0="auto" estimates the step size in the first step, on the device: no graph break there."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        model = make_model()
        optimizer = MetaOptimize(model.parameters(), "adamw", "lion", alpha0="auto")
        step = torch.compile(optimizer.step, fullgraph=True) if compiled else optimizer.step
        for t in range(3):
            optimizer.zero_grad()
            backward(model, t)
            step()
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-7)


@CUDA
@pytest.mark.parametrize("kernel", ["flat", "foreach", "compiled", "reference"])
@pytest.mark.parametrize("blocks", BLOCKS)
def test_step_never_synchronizes_with_the_gpu(blocks, kernel):
    model = make_model("cuda")
    lr = torch.tensor(0.5, device="cuda")
    optimizer = MetaOptimize(model.parameters(), "adamw", "lion", blocks, kernel=kernel, lr=lr)
    for t in range(3):
        optimizer.zero_grad()
        backward(model, t, "cuda")
        if kernel == "compiled" and t == 0:
            optimizer.step()  # compiling may synchronize (autotuning); the steps after it may not
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def live_storages() -> dict[int, tuple[torch.Tensor, int]]:
    """Every storage that a live tensor holds: its address -> (a tensor holding it, its bytes).
    Holding the result keeps those addresses from being reused by new tensors."""
    gc.collect()
    # Plain tensors only: torch.compile keeps fake tensors, which hold no memory.
    tensors = [obj for obj in gc.get_objects() if type(obj) in (torch.Tensor, nn.Parameter)]
    storages = {t.untyped_storage().data_ptr(): (t, t.untyped_storage().nbytes()) for t in tensors}
    return {address: entry for address, entry in storages.items() if entry[1]}


# The moments depend on the base, the block tensors on the granularity, and the state on the
# driver and on whether the kernel is flat: every base, every granularity with the foreach and
# the flat kernel, and each other kernel once.
STATE_CASES = sorted(
    {(base, "scalar", "foreach") for base in BASES}
    | {("adamw", blocks, kernel) for blocks in BLOCKS for kernel in ("foreach", "flat")}
    | {("adamw", "nodewise", "reference"), ("adamw", "scalar", "compiled")}
)


@pytest.mark.parametrize("base,blocks,kernel", STATE_CASES)
def test_state_is_the_trace_and_the_base_moments(base, blocks, kernel):
    """Per parameter: the trace, the base rule's moments and a step counter; per block: beta,
    a counter and the meta moments. Nothing else stays alive between steps."""
    model = make_model(dtype=torch.float64)
    optimizer = MetaOptimize(model.parameters(), base, "adam", blocks, kernel=kernel)
    backward(model, 0, dtype=torch.float64)
    grads = [p.grad for p in model.parameters()]  # gradients get a Python object when first read: read them now
    before = live_storages()
    assert all(g.untyped_storage().data_ptr() in before for g in grads)
    optimizer.step()
    after_one_step = live_storages()
    new_bytes = sum(nbytes for address, (_, nbytes) in after_one_step.items() if address not in before)

    moments = RULES[RULE_OF_BASE[base]].moment_names
    block_shapes = {
        "scalar": [()],
        "param_group": [()],
        "layerwise": [()] * 6,
        "nodewise": [(3,), (5,), (3,)],  # a bias shares the rows of its weight
        "weightwise": [tuple(p.shape) for p in model.parameters()],
    }[blocks]
    block_numel = sum(torch.Size(shape).numel() for shape in block_shapes)
    n_params = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        state = optimizer.state[p]
        per_param = {key for key in state if not (key == "beta" or key.startswith("meta_"))}
        assert per_param == {"step", "trace", *moments}
        assert all(state[key].shape == p.shape for key in ("trace", *moments))
    n_tensors = len(list(model.parameters()))
    per_param_bytes = 8 * ((1 + len(moments)) * n_params + n_tensors)  # trace, base moments; step counters
    per_block_bytes = 8 * (3 * block_numel + len(block_shapes))  # beta, meta exp_avg and exp_avg_sq; meta step
    flat = kernel == "flat"
    gather_bytes = 2 * 8 * n_params if flat else 0  # the flat kernel's gathered weights and gradients
    if flat and blocks == "layerwise":
        gather_bytes += 8 * n_tensors  # each tensor's length, for the segmented sums
    if flat and blocks == "nodewise":
        gather_bytes += 8 * n_params  # each weight's row (int64)
    assert new_bytes == per_param_bytes + per_block_bytes + gather_bytes
    for t in range(1, 4):
        optimizer.zero_grad(set_to_none=False)
        backward(model, t, dtype=torch.float64)
        optimizer.step()
    assert live_storages().keys() == after_one_step.keys()
