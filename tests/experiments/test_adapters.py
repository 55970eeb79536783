"""The adapters of experiments/adapters.py: each works around its package's documented bug."""

import functools
import inspect
import io
import math

import pytest
import torch
from dog import DoG
from torch import nn

from experiments import adapters
from experiments.adapters import Adapter, DoGAdapter, GdtuoAdapter, MechanicAdapter, OptimizerAdapter, warmup_cosine

NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)


def two_layers() -> nn.ModuleDict:
    torch.manual_seed(0)
    return nn.ModuleDict({"used": nn.Linear(4, 3), "unused": nn.Linear(4, 3)})


def train_steps(adapter, model, steps: int) -> None:
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        adapter.zero_grad()
        adapter.backward(model["used"](x).square().mean())
        adapter.step(NO_SCALER)


def test_dog_steps_past_a_parameter_without_gradient_and_averages():
    model = two_layers()
    unused = model["unused"].weight.detach().clone()
    adapter = DoGAdapter(model, functools.partial(DoG, reps_rel=1e-6), total_steps=3)
    with pytest.raises(AttributeError):  # the bug the adapter works around (formll/dog#3)
        DoG(two_layers().parameters()).step()
    train_steps(adapter, model, 3)
    assert torch.equal(model["unused"].weight, unused)
    averaged = adapter.eval_model(model)
    assert averaged is adapter.averager.averaged_model and not averaged.training
    assert not torch.equal(averaged["used"].weight, model["used"].weight)  # an average, not the last iterate


def test_mechanic_checkpoint_reloads_after_serialisation_and_continues_identically():
    make = functools.partial(torch.optim.AdamW, lr=1.0, weight_decay=0.1)
    model = two_layers()
    adapter = MechanicAdapter(model, make, total_steps=6, mechanic={"s_init": 1e-6})
    train_steps(adapter, model, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": adapter.state_dict()}, buffer)
    train_steps(adapter, model, 3)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = two_layers()
    resumed_model.load_state_dict(saved["model"])
    resumed = MechanicAdapter(resumed_model, make, total_steps=6, mechanic={"s_init": 1e-6})
    resumed.load_state_dict(saved["optimizer"])
    train_steps(resumed, resumed_model, 3)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, resumed_model.state_dict()[name]), name
    assert resumed.step_sizes() == adapter.step_sizes()


def test_mechanic_step_that_raises_leaves_grad_mode_on():
    model = two_layers()
    adapter = MechanicAdapter(model, functools.partial(torch.optim.SGD, lr=1.0), total_steps=2)
    train_steps(adapter, model, 1)
    # loading its own state_dict without the re-keying: mechanic's step raises KeyError
    adapter.optimizer.load_state_dict(torch.load(_saved(adapter.optimizer.state_dict()), weights_only=False))
    with pytest.raises(KeyError):
        train_steps(adapter, model, 1)
    assert torch.is_grad_enabled()


def _saved(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_gdtuo_learns_its_step_size_and_reports_rmsprop_alpha_squared():
    from gradient_descent_the_ultimate_optimizer import gdtuo

    model = nn.ModuleDict({"used": nn.Linear(4, 3)})
    adapter = GdtuoAdapter(model, gdtuo.RMSProp(alpha=1e-2, optimizer=gdtuo.SGD(1e-3)), total_steps=3)
    assert adapter.step_sizes()["step_size"] == pytest.approx(1e-2)  # stored as sqrt(alpha)
    train_steps(adapter, model, 3)
    assert adapter.step_sizes()["step_size"] != pytest.approx(1e-2)
    adapter.close()
    assert all(p.grad is None for p in adapter.wrapper.all_params_with_gradients)


def test_warmup_cosine_shape():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = warmup_cosine(optimizer, total_steps=10, warmup_steps=4)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:5] == [0.0, 0.5, 1.0, 1.5, 2.0]  # linear from 0 to the peak
    assert lrs[4:] == sorted(lrs[4:], reverse=True)  # then cosine decay, 5/6 of the way at the last step
    assert lrs[-1] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    with pytest.raises(ValueError, match="warmup_steps=10 must be in"):
        warmup_cosine(optimizer, total_steps=10, warmup_steps=10)


def test_plain_adapter_logs_one_step_size_per_group():
    model = two_layers()
    adapter = OptimizerAdapter(model, functools.partial(torch.optim.AdamW, lr=1e-3), total_steps=1,
                               param_groups={"no_decay": True})
    assert adapter.step_sizes() == {"step_size/group0": 1e-3, "step_size/group1": 1e-3}
    assert adapter.optimizer.param_groups[1]["weight_decay"] == 0.0


def test_every_adapter_of_the_module_implements_the_protocol():
    classes = [c for c in vars(adapters).values()
               if inspect.isclass(c) and c.__module__ == adapters.__name__ and c is not Adapter]
    assert {c.__name__ for c in classes} >= {"OptimizerAdapter", "ProdigyAdapter", "DoGAdapter", "MechanicAdapter",
                                             "GdtuoAdapter"}
    for cls in classes:
        assert issubclass(cls, Adapter) and not inspect.isabstract(cls), cls


def test_an_adapter_missing_a_call_of_the_protocol_is_not_one():
    calls = {name: (lambda self, *args, **kwargs: None) for name in
             ("check", "zero_grad", "backward", "step", "step_sizes", "plans_zero_step_size", "eval_model",
              "state_dict", "load_state_dict", "close")}
    assert not isinstance(type("NoUnscale", (), calls)(), Adapter)
    assert isinstance(type("Complete", (), {**calls, "unscale": calls["step"]})(), Adapter)
    subclass = type("NoUnscale", (Adapter,), calls)
    assert inspect.isabstract(subclass)
    with pytest.raises(TypeError, match="unscale"):
        subclass()
