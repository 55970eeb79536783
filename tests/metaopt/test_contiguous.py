"""storage="contiguous": parameters and gradients as views of the step's flat buffers, against the
separate storage (bit for bit: the same arithmetic on the same buffers) and the reference kernel."""

from __future__ import annotations

import io

import pytest
import torch

from metaopt import BLOCKS, MetaOptimize, contiguous
from metaopt.contiguous import ContiguousSegment
from tests.metaopt.references import Small, backward, make, train, weights_and_step_sizes

PAIRS = [("adamw", "adam"), ("lion", "lion"), ("sgdm", "rmsprop")]


def assert_same(got, expected, tolerance=0.0):
    for a, b in zip(got, expected):
        if tolerance == 0.0:
            assert torch.equal(a, b)
        else:
            assert (a - b).norm() / b.norm() < tolerance


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("base,meta", PAIRS)
def test_contiguous_storage_equals_the_separate_storage_and_the_reference(base, meta, blocks):
    results = {}
    for kernel, storage in (("reference", "separate"), ("flat", "separate"), ("flat", "contiguous")):
        model, optimizer = make(base, meta, blocks, kernel, storage)
        train(model, optimizer, 6)
        results[kernel, storage] = weights_and_step_sizes(model, optimizer)
    assert_same(results["flat", "contiguous"], results["flat", "separate"])
    assert_same(results["flat", "contiguous"], results["reference", "separate"], 1e-12)
    # the comparison has teeth: the step sizes moved away from alpha0
    assert (results["reference", "separate"][1] / 1e-2).log().abs().max() > 1e-3


@pytest.mark.parametrize("kernel", ["reference", "foreach"])
def test_every_kernel_runs_on_the_contiguous_buffers(kernel):
    """Storage is the layout, the kernel the arithmetic: the reference and foreach arithmetic on the
    flat buffers give the reference's numbers."""
    expected_model, expected_optimizer = make(kernel="reference", storage="separate")
    train(expected_model, expected_optimizer, 5)
    model, optimizer = make(kernel=kernel)
    train(model, optimizer, 5)
    assert all(isinstance(segment, ContiguousSegment) for segment in optimizer._plan().segments)
    assert_same(weights_and_step_sizes(model, optimizer), weights_and_step_sizes(expected_model, expected_optimizer), 1e-12)


def test_parameters_and_gradients_are_views_of_one_buffer_and_backward_fills_it_in_place():
    model, optimizer = make()
    train(model, optimizer, 1)
    for params in (group["params"] for group in optimizer.param_groups):
        assert len({p.untyped_storage().data_ptr() for p in params}) == 1
        assert len({p.grad.untyped_storage().data_ptr() for p in params}) == 1
    pointers = [(p.data_ptr(), p.grad.data_ptr()) for p in model.parameters()]
    optimizer.zero_grad()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())  # zeroed in place
    backward(model, 1)
    backward(model, 2)  # accumulates in place
    assert [(p.data_ptr(), p.grad.data_ptr()) for p in model.parameters()] == pointers
    # the gradients accumulated are those of the separate storage
    separate_model, _ = make(storage="separate")
    separate_model.load_state_dict(model.state_dict())
    backward(separate_model, 1)
    backward(separate_model, 2)
    for p, q in zip(model.parameters(), separate_model.parameters()):
        assert torch.equal(p.grad, q.grad)
    optimizer.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


def test_a_replaced_gradient_or_parameter_is_copied_in_and_becomes_a_view_again():
    def replace(model, t):
        if t == 2:  # gradients set to None by the model and recomputed: new tensors
            model.zero_grad()
            backward(model, t)
        if t == 3:  # a gradient assigned, a parameter given new storage
            model.out.weight.grad = model.out.weight.grad.clone() * 0.5
            model.hidden.bias.data = model.hidden.bias.data.clone() + 0.25

    results = []
    for kernel, storage in (("reference", "separate"), ("flat", "contiguous")):
        model, optimizer = make(kernel=kernel, storage=storage)
        train(model, optimizer, 6, between=replace)
        results.append(weights_and_step_sizes(model, optimizer))
    assert_same(results[1], results[0], 1e-12)
    segment = optimizer._plan().segments[-1]
    position = [id(p) for p in segment.params].index(id(model.out.weight))
    assert model.out.weight.grad is segment.grad_views[position]
    assert model.hidden.bias.untyped_storage().data_ptr() == model.out.weight.untyped_storage().data_ptr()


@pytest.mark.parametrize("blocks", ["scalar", "nodewise", "weightwise"])
def test_a_checkpoint_stays_per_parameter_and_resumes_bit_for_bit(blocks):
    straight_model, straight = make(blocks=blocks)
    train(straight_model, straight, 6)
    model, optimizer = make(blocks=blocks)
    train(model, optimizer, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    for values in saved["optimizer"]["state"].values():  # one tensor per parameter, shaped as it
        assert all(v._base is None or v.numel() == v._base.numel() for v in values.values() if isinstance(v, torch.Tensor))
    assert all(v.shape == p.shape for v, p in zip(saved["model"].values(), model.parameters()))
    for storage in ("contiguous", "separate"):
        resumed_model, resumed = make(blocks=blocks, storage=storage)
        resumed_model.load_state_dict(saved["model"])
        resumed.load_state_dict(saved["optimizer"])
        train(resumed_model, resumed, 3, start=3)
        assert_same(weights_and_step_sizes(resumed_model, resumed), weights_and_step_sizes(straight_model, straight))


def test_an_unknown_storage_is_refused():
    with pytest.raises(ValueError, match="storage must be one of"):
        MetaOptimize(Small().parameters(), storage="flat")


@pytest.mark.parametrize("blocks", BLOCKS)
def test_a_cpu_buffer_cut_into_chunks_for_the_eager_kernels_gives_the_same_numbers(blocks, monkeypatch):
    """Above CPU_CHUNK_NUMEL elements the update sees the buffers in chunks (here 7 elements): the same
    arithmetic element by element, so bit for bit the unchunked buffers' result."""
    expected_model, expected = make("adamw", "adam", blocks)
    train(expected_model, expected, 5)
    monkeypatch.setattr(contiguous, "CPU_CHUNK_NUMEL", 7)
    model, optimizer = make("adamw", "adam", blocks)
    train(model, optimizer, 5)
    assert min(len(segment.weights) for segment in optimizer._plan().segments) > 1
    assert_same(weights_and_step_sizes(model, optimizer), weights_and_step_sizes(expected_model, expected))


def held_bytes(model, optimizer) -> int:
    """The bytes of every distinct storage that the parameters, gradients and optimizer state use."""
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters()]
    tensors += [value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]
    tensors += [buffer for segment in optimizer._plan().segments for buffer in (segment.weights[0], segment.grads)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_contiguous_storage_holds_no_copy_of_the_weights_or_gradients():
    """The separate storage's flat layout holds a gathered copy of the weights and one of the gradients;
    the contiguous storage's buffers are the parameters' and gradients' own memory."""
    held = {}
    for storage in ("separate", "contiguous"):
        model, optimizer = make(kernel="flat", storage=storage)
        train(model, optimizer, 2)
        held[storage] = held_bytes(model, optimizer)
    numel = sum(p.numel() for p in model.parameters())
    assert held["separate"] - held["contiguous"] == 2 * numel * 8  # float64: the two gather buffers
