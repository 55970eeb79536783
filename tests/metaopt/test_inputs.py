"""What a step cannot take is refused before any work, with an error that names the parameter and
the fix: complex parameters, sparse gradients, a negative or non-finite lr (float or tensor), a
parameter whose dtype or shape changed since its state was made (a swap between two dtypes of
one size and a reshape to as many elements too). Zero-element parameters are
skipped in every granularity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaopt import BLOCKS, MetaOptimize
from metaopt.kernels import KERNELS

EAGER_KERNELS = [kernel for kernel in KERNELS if kernel not in ("compiled", "triton")]  # triton: tests/metaopt/test_triton_kernel.py


def model_and_loss(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    x = torch.randn(5, 3, dtype=dtype)
    return model, lambda: model(x.to(next(model.parameters()).dtype)).square().mean()


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_unchanged(model, before):
    for p, old in zip(model.parameters(), before):
        assert torch.equal(p.detach(), old)


def stepped_once(kernel, blocks="scalar"):
    """A model, its loss and its optimizer after one step."""
    model, loss = model_and_loss()
    optimizer = MetaOptimize(model.named_parameters(), "adamw", "adam", blocks, kernel=kernel)
    loss().backward()
    optimizer.step()
    return model, loss, optimizer


def assert_refused_before_any_work(model, optimizer, error, match):
    before = snapshot(model)
    with pytest.raises(error, match=match):
        optimizer.step()
    assert_unchanged(model, before)


def test_a_complex_parameter_is_refused_at_construction():
    z = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"parameter 'z' is complex \(torch.complex64\).*torch.view_as_real"):
        MetaOptimize([("w", nn.Parameter(torch.randn(2))), ("z", z)])
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] is complex"):
        MetaOptimize([z])
    optimizer = MetaOptimize([nn.Parameter(torch.randn(2))])
    with pytest.raises(TypeError, match="is complex"):
        optimizer.add_param_group({"params": [z]})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("kernel", EAGER_KERNELS)
def test_a_sparse_gradient_is_refused_before_any_work(kernel):
    torch.manual_seed(0)
    embedding, head = nn.Embedding(10, 3, sparse=True), nn.Linear(3, 1)
    optimizer = MetaOptimize([*head.parameters(), *embedding.parameters()], kernel=kernel)
    head(embedding(torch.tensor([1, 2]))).sum().backward()
    before = [p.detach().clone() for p in (*head.parameters(), embedding.weight)]
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[2\] has a torch.sparse_coo gradient.*sparse=False"):
        optimizer.step()
    for p, old in zip((*head.parameters(), embedding.weight), before):
        assert torch.equal(p.detach(), old)
    assert all("trace" not in optimizer.state[p] for p in head.parameters())


@pytest.mark.parametrize("kernel", EAGER_KERNELS)
def test_a_gradient_that_becomes_sparse_is_refused_when_the_parameters_with_gradients_change(kernel):
    """The sparse check runs where the plan is built (the per-step check compares dtypes and sizes alone)."""
    model, _, optimizer = stepped_once(kernel)
    weight = model[0].weight
    weight.grad = weight.grad.to_sparse()
    model[2].bias.grad = None
    assert_refused_before_any_work(model, optimizer, TypeError, "'0.weight' has a torch.sparse_coo gradient")


def trained_with_and_without_empty_tensors(blocks, train, **options):
    """The weights and logged step sizes of the model after ``train(optimizer, loss, params)``, first
    alone, then with an empty weight between its first weight and bias and an empty bias at the end."""
    results = []
    for with_empty in (False, True):
        model, loss = model_and_loss()
        params = list(model.named_parameters())
        if with_empty:
            params.insert(1, ("empty.weight", nn.Parameter(torch.zeros(0, 3))))
            params.append(("empty.bias", nn.Parameter(torch.zeros(0))))
        optimizer = MetaOptimize(params, "adamw", "adam", blocks, alpha0=1e-2, meta_lr=0.05, **options)
        train(optimizer, loss, params)
        logged = optimizer.step_sizes()
        results.append((snapshot(model), {key: value for key, value in logged.items() if "empty" not in key}))
    return results


def assert_same_training(results):
    (expected, expected_logged), (weights, logged) = results
    for value, reference in zip(weights, expected):
        torch.testing.assert_close(value, reference, rtol=0, atol=0)
    assert logged == pytest.approx(expected_logged, rel=1e-12)


@pytest.mark.parametrize("kernel", EAGER_KERNELS)
@pytest.mark.parametrize("blocks", BLOCKS)
def test_zero_element_parameters_are_skipped(blocks, kernel):
    """A model with empty tensors steps as the model without them, and logs its step sizes."""

    def train(optimizer, loss, params):
        for _ in range(3):
            optimizer.zero_grad()
            loss().backward()
            for _, p in params:
                if p.numel() == 0:
                    p.grad = torch.zeros_like(p)
            optimizer.step()

    assert_same_training(trained_with_and_without_empty_tensors(blocks, train, kernel=kernel))


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("approx", ["l", "2x2"])
@pytest.mark.parametrize("blocks", BLOCKS)
def test_zero_element_parameters_are_skipped_by_the_steps_keeping_the_hessian(blocks, approx):
    """The same with Hessian-vector products: the empty tensors hold no block and no column of H."""

    def train(optimizer, loss, params):
        def closure():
            optimizer.zero_grad()
            value = loss() + sum(p.sum() for _, p in params if p.numel() == 0)
            value.backward(create_graph=True)
            return value

        for _ in range(3):
            optimizer.step(closure)

    assert_same_training(trained_with_and_without_empty_tensors(blocks, train, approx=approx))


@pytest.mark.parametrize("lr", [-1e-3, float("nan"), float("inf"), torch.tensor(-0.5), torch.tensor(float("nan"))])
def test_a_negative_or_nonfinite_lr_is_refused_at_construction(lr):
    params = [nn.Parameter(torch.randn(2))]
    with pytest.raises(ValueError, match=r"lr must be a finite number >= 0"):
        MetaOptimize(params, lr=lr)
    with pytest.raises(ValueError, match=r"lr of param group 1 must be a finite number >= 0"):
        MetaOptimize([{"params": params}, {"params": [nn.Parameter(torch.randn(2))], "lr": lr}])


@pytest.mark.parametrize("kernel", EAGER_KERNELS)
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_a_scheduler_that_sets_a_bad_float_lr_is_refused_at_the_step(bad, kernel):
    model, _, optimizer = stepped_once(kernel)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 if t == 0 else bad).step()
    assert_refused_before_any_work(model, optimizer, ValueError,
                                   r"lr of param group 0 must be a finite number >= 0.*learning-rate schedule")


@pytest.mark.parametrize("kernel", EAGER_KERNELS)
def test_a_tensor_lr_written_negative_is_refused_at_the_step(kernel):
    """A tensor on the CPU is read again when its value was written (a scheduler's fill_) or when it
    is another tensor: reading it waits for no device."""
    model, loss = model_and_loss()
    lr = torch.tensor(1.0)
    optimizer = MetaOptimize(model.parameters(), kernel=kernel, lr=lr)
    loss().backward()
    optimizer.step()
    lr.fill_(-2.0)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lr of param group 0 must be a finite number >= 0.*got tensor\(-2.\)"):
        optimizer.step()
    assert_unchanged(model, before)
    optimizer.param_groups[0]["lr"] = torch.tensor(float("inf"))
    with pytest.raises(ValueError, match=r"got tensor\(inf\)"):
        optimizer.step()
    optimizer.param_groups[0]["lr"] = torch.tensor(0.5)
    optimizer.step()


@pytest.mark.parametrize("kernel", EAGER_KERNELS)
@pytest.mark.parametrize("blocks", ["scalar", "nodewise"])
def test_a_model_converted_after_its_first_step_is_refused(blocks, kernel):
    model, loss, optimizer = stepped_once(kernel, blocks)
    model.double()
    optimizer.zero_grad()
    loss().backward()
    assert_refused_before_any_work(model, optimizer, ValueError, r"parameter '0.weight' is now torch.float64 of shape "
                                   r"\(4, 3\), but its optimizer state was made for torch.float32.*build a new MetaOptimize")


@pytest.mark.parametrize("kernel", EAGER_KERNELS)
def test_a_parameter_whose_shape_changed_is_refused(kernel):
    """Pruning rows by hand: the state no longer matches the parameter."""
    model, loss, optimizer = stepped_once(kernel)
    with torch.no_grad():
        model[2].weight.data = model[2].weight.data[:1]
        model[2].bias.data = model[2].bias.data[:1]
    optimizer.zero_grad()
    loss().backward()
    assert_refused_before_any_work(model, optimizer, ValueError, r"parameter '2.weight' is now torch.float32 of shape "
                                   r"\(1, 4\), but its optimizer state was made for torch.float32 of shape \(2, 4\)")


@pytest.mark.parametrize("kernel", EAGER_KERNELS)
def test_a_swap_between_two_dtypes_of_one_size_is_refused(kernel):
    """bfloat16 to float16 keeps every parameter's size in bytes."""
    model, loss = model_and_loss()
    model.bfloat16()
    optimizer = MetaOptimize(model.named_parameters(), "adamw", "adam", kernel=kernel)
    loss().backward()
    optimizer.step()
    model.half()
    optimizer.zero_grad()
    loss().backward()
    assert_refused_before_any_work(model, optimizer, ValueError, r"parameter '0.weight' is now torch.float16 of shape "
                                   r"\(4, 3\), but its optimizer state was made for torch.bfloat16")


@pytest.mark.parametrize("kernel", EAGER_KERNELS)
def test_a_reshape_to_as_many_elements_is_refused(kernel):
    model, loss, optimizer = stepped_once(kernel, "nodewise")
    weight = model[2].weight
    optimizer.zero_grad()
    loss().backward()
    with torch.no_grad():
        weight.data = weight.data.reshape(4, 2)
        weight.grad = weight.grad.reshape(4, 2)
    assert_refused_before_any_work(model, optimizer, ValueError, r"parameter '2.weight' is now torch.float32 of shape "
                                   r"\(4, 2\), but its optimizer state was made for torch.float32 of shape \(2, 4\)")


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("approx", ["l", "2x2"])
def test_the_steps_keeping_the_hessian_refuse_a_converted_model_too(approx):
    model, loss = model_and_loss()
    optimizer = MetaOptimize(model.named_parameters(), approx=approx, alpha0=1e-3)

    def closure():
        optimizer.zero_grad()
        value = loss()
        value.backward(create_graph=True)
        return value

    optimizer.step(closure)
    model.double()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"parameter '0.weight' is now torch.float64"):
        optimizer.step(closure)
    assert_unchanged(model, before)
