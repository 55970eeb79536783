"""One interface through which the trainer drives every optimizer it compares.

The baselines of the paper come from their published packages, and each has its own loop
contract (what to call around ``backward`` and ``step``, what to evaluate, how to
checkpoint) and a few documented bugs (docs/baselines.md). An adapter hides
exactly those differences, so the trainer runs one loop for all of them. :class:`Adapter` is
that contract, the only calls the trainer makes (experiments/trainer.py):

    adapter.check(precision=..., distributed=..., compiled=...)   # refuse what cannot run
    adapter.zero_grad()
    adapter.backward(scaler.scale(loss))
    adapter.unscale(scaler); clip_grad_norm_(...)              # optional
    adapter.step(scaler)                                       # optimizer, scheduler, averager
    ... adapter.eval_model(model) for evaluation, adapter.step_sizes() for logging,
    adapter.plans_zero_step_size() for the divergence check,
    adapter.state_dict() / load_state_dict() for checkpoints, adapter.close() at the end.

Adapters (each a Hydra ``_target_`` of a ``conf/optimizer`` file):

- :class:`OptimizerAdapter`: any ``torch.optim.Optimizer`` (AdamW, timm's Lion, MetaOptimize),
  with an optional LR schedule.
- :class:`HessianAdapter`: MetaOptimize keeping the Hessian term (approx ``l`` / ``2x2``) and IDBD:
  ``backward(create_graph=True)``, or the exact Hessian diagonal of a linear least-squares model.
- :class:`ProdigyAdapter`: logs Prodigy's effective step ``d * lr``.
- :class:`DoGAdapter`: DoG with polynomial-decay averaging; evaluates the averaged model.
- :class:`MechanicAdapter`: mechanic over any torch optimizer; checkpoints that reload.
- :class:`GdtuoAdapter`: gdtuo's ``ModuleWrapper`` loop with ``backward(create_graph=True)``.
- :class:`ScheduleFreeAdapter`: schedule-free optimizers' ``train()`` / ``eval()`` modes.
"""

from __future__ import annotations

import functools
import math
import warnings
from abc import abstractmethod
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from metaopt import MetaOptimize
from metaopt.param_groups import param_groups_by_prefix

OptimizerFactory = Callable[..., Optimizer]  # a functools.partial from Hydra's `_partial_: true`


def make_param_groups(model: nn.Module, blocks: Any = None, no_decay: bool = False) -> list[dict[str, Any]]:
    """The model's trainable parameters as named param groups.

    Args:
        blocks: None for one block of all parameters; a preset (``"resnet18"``, ``"llama2c"``)
            or a ``{name: [module prefixes]}`` dict for named blocks (MetaOptimize's
            ``blocks="param_group"``), see :func:`metaopt.param_groups.param_groups_by_prefix`.
        no_decay: put vectors and scalars (biases, norm gains) in a group with
            ``weight_decay=0``, as llama2.c and nanoGPT do.
    """
    if blocks is not None:
        return param_groups_by_prefix(model, blocks, no_decay=no_decay)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not no_decay:
        return [{"params": named}]
    decayed = [(n, p) for n, p in named if p.dim() >= 2]
    not_decayed = [(n, p) for n, p in named if p.dim() < 2]
    return [g for g in ({"params": decayed}, {"params": not_decayed, "weight_decay": 0.0}) if g["params"]]


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_steps: int, min_ratio: float = 0.0, decay_steps: int | None = None
) -> LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to ``min_ratio`` times the peak at
    ``decay_steps`` (default: ``total_steps``, the run's last step).

    The peak is each group's ``lr``. This is the schedule of the authors' AdamW baseline
    and of llama2.c (which warms up from 0 too). The authors' ImageNet script decays to 0 at
    step 422,000 whatever the run's length (``decay_steps=422000``).
    """
    total_steps = total_steps if decay_steps is None else decay_steps
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}); shorten the warm-up")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


@runtime_checkable
class Adapter(Protocol):
    """What the trainer calls on an optimizer, whichever it is.

    An adapter that subclasses it inherits the defaults of ``check``, ``plans_zero_step_size``,
    ``eval_model`` and ``close``, and must implement the rest.
    """

    def check(self, *, precision: str, distributed: bool, compiled: bool) -> None:
        """Raise ValueError if this optimizer cannot run with these trainer settings."""

    @abstractmethod
    def zero_grad(self) -> None:
        """Start a step: drop the previous step's gradients."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """The gradients of the (scaled) loss."""

    @abstractmethod
    def unscale(self, scaler: torch.amp.GradScaler) -> None:
        """Divide the gradients by the scaler's scale in place, so that they can be clipped."""

    @abstractmethod
    def step(self, scaler: torch.amp.GradScaler) -> None:
        """Update the weights (and whatever the method steps along: a schedule, an average)."""

    @abstractmethod
    def step_sizes(self) -> dict[str, float]:
        """The current step sizes for logging: ``step_size`` or ``step_size/<name>`` keys, the
        same ones all run long (they are metrics.csv columns)."""

    def plans_zero_step_size(self) -> bool:
        """Whether a step size of exactly 0 may be planned (a schedule that decays to 0), so
        that one is no underflow."""
        return False

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The model to evaluate: the trained one, unless the method evaluates an average."""
        return model

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's part of a checkpoint."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned, into an adapter built from the same config."""

    def close(self) -> None:
        """Release what the run no longer needs (called once, when the loop ends)."""


class OptimizerAdapter(Adapter):
    """A ``torch.optim.Optimizer`` (and an optional LR schedule) under the plain loop contract.

    Args:
        model: the unwrapped model (not DDP, not compiled), whose parameters it optimizes.
        optimizer: ``params -> Optimizer``, e.g. ``functools.partial(torch.optim.AdamW, lr=1e-3)``.
        total_steps: the run's number of optimizer steps (for schedules).
        param_groups: keyword arguments of :func:`make_param_groups` (``blocks``, ``no_decay``).
        scheduler: ``(optimizer, total_steps) -> LRScheduler``, stepped after every optimizer step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        total_steps: int,
        param_groups: dict[str, Any] | None = None,
        scheduler: Callable[[Optimizer, int], LRScheduler] | None = None,
    ):
        self.model = model
        self.optimizer = self._build(optimizer, make_param_groups(model, **(param_groups or {})))
        self.scheduler = scheduler(self.optimizer, total_steps) if scheduler is not None else None

    def _build(self, optimizer: OptimizerFactory, groups: list[dict[str, Any]]) -> Optimizer:
        return optimizer(groups)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()  # MetaOptimize(storage='contiguous') zeroes its gradient buffers in place, others set None

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def unscale(self, scaler: torch.amp.GradScaler) -> None:
        scaler.unscale_(self.optimizer)

    def step(self, scaler: torch.amp.GradScaler) -> None:
        # The scaler skips the step when the fp16 gradients overflowed (a no-op without fp16).
        scaler.step(self.optimizer)
        if self.scheduler is not None:
            self.scheduler.step()

    def step_sizes(self) -> dict[str, float]:
        """Each group's ``lr``, or MetaOptimize's learned step sizes and, with ``learn=(...)``, the other
        learned hyper-parameters (``weight_decay``, ``momentum`` ... columns; read back to the host)."""
        if isinstance(self.optimizer, MetaOptimize):
            return self.optimizer.meta_parameters()
        return self._group_step_sizes(lambda group: group["lr"])

    def plans_zero_step_size(self) -> bool:
        return self.scheduler is not None

    def _group_step_sizes(self, value: Callable[[dict], Any]) -> dict[str, float]:
        """``step_size`` for one param group, else ``step_size/group<i>`` (the same keys all run long: they are CSV columns)."""
        values = [float(value(group)) for group in self.optimizer.param_groups]
        if len(values) == 1:
            return {"step_size": values[0]}
        return {f"step_size/group{i}": v for i, v in enumerate(values)}

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])


class HessianAdapter(OptimizerAdapter):
    """MetaOptimize with an approximation that keeps the Hessian term (``approx="l"`` or ``"2x2"``,
    metaopt.hessian), IDBD among them, under the plain loop: the step needs what a closure would give.

    Args:
        hessian: ``"graph"``: the backward pass keeps the gradients' graph (``create_graph=True``), so
            that the step takes Hessian-vector products through it, or Hutchinson's estimate of the
            diagonal where the approximation uses the diagonal. ``"linear_least_squares"``: the exact
            diagonal of a linear model without bias and one output trained on the half squared error,
            ``mean over the batch of x^2`` (IDBD's ``a^2``), from the model's inputs, passed to
            ``step(hessian_diagonal=...)``.
    """

    HESSIANS = ("graph", "linear_least_squares")

    def __init__(self, model: nn.Module, optimizer: OptimizerFactory, total_steps: int,
                 param_groups: dict[str, Any] | None = None, hessian: str = "graph"):
        if hessian not in self.HESSIANS:
            raise ValueError(f"optimizer.adapter.hessian={hessian!r} is not one of {list(self.HESSIANS)}")
        if hessian == "linear_least_squares" and not (
                isinstance(model, nn.Linear) and model.bias is None and model.out_features == 1):
            raise ValueError("optimizer.adapter.hessian=linear_least_squares is the exact Hessian diagonal of a linear "
                             f"model without bias and with one output (model=linear), not of {type(model).__name__}: "
                             "use hessian=graph (Hutchinson's estimate) for this model")
        super().__init__(model, optimizer, total_steps, param_groups)
        self.hessian = hessian
        self.inputs: torch.Tensor | None = None  # the last batch's inputs (linear_least_squares)
        if hessian == "linear_least_squares":
            model.register_forward_pre_hook(self._keep_inputs)

    def _keep_inputs(self, module: nn.Module, args: tuple) -> None:
        self.inputs = args[0].detach()

    def check(self, *, precision: str, distributed: bool, compiled: bool) -> None:
        problems = []
        if precision != "fp32":
            problems.append("Hessian-vector products through autocast and a loss scale are not supported: "
                            "use trainer.precision=fp32")
        if distributed:
            problems.append("DDP does not reduce the gradients' graph: run on one device")
        if compiled:
            problems.append("a compiled forward does not support backward(create_graph=True): set trainer.compile=false")
        if problems:
            raise ValueError("MetaOptimize keeping the Hessian term cannot run here: " + "; ".join(problems))

    def backward(self, loss: torch.Tensor) -> None:
        if self.hessian == "linear_least_squares":
            loss.backward()
            return
        # the step differentiates the gradients; zero_grad and close() drop the graphs they hold
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            loss.backward(create_graph=True)

    def step(self, scaler: torch.amp.GradScaler) -> None:
        if self.hessian == "linear_least_squares":
            weight = self.model.weight
            scaler.step(self.optimizer, hessian_diagonal={weight: (self.inputs ** 2).mean(0, keepdim=True)})
        else:
            scaler.step(self.optimizer)

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class ProdigyAdapter(OptimizerAdapter):
    """Prodigy (prodigyopt): a plain optimizer whose effective step size is ``d * lr``.

    Prodigy refuses different ``lr`` values across groups (only 0 is allowed besides the
    maximum); the default groups share one ``lr``.
    """

    def step_sizes(self) -> dict[str, float]:
        return self._group_step_sizes(lambda group: group["d"] * group["lr"])


class DoGAdapter(OptimizerAdapter):
    """DoG (dog-optimizer) with polynomial-decay iterate averaging, as its authors require.

    - ``averager.step()`` after every optimizer step; evaluation runs on the averaged model.
    - DoG reads ``p.grad`` of every parameter and crashes on ``None`` (formll/dog#3): a
      parameter that got no gradient this step gets a zero gradient, which leaves DoG's
      sums unchanged and moves the parameter only by weight decay, if any.
    - One param group by default: each group is a separate DoG (its own distance and
      gradient sums), so a decay / no-decay split would change the algorithm.
    - ``load_state_dict`` moves ``rbar``, ``G`` and ``eta`` to the CPU; they go back to the
      parameters' device here, so a resumed CUDA run does not mix devices.

    Args:
        averager_gamma: the averager's gamma (8, the authors' default).
    """

    def __init__(self, model: nn.Module, optimizer: OptimizerFactory, total_steps: int, averager_gamma: float = 8.0,
                 param_groups: dict[str, Any] | None = None):
        from dog import PolynomialDecayAverager  # here: only this adapter needs the dog package

        super().__init__(model, optimizer, total_steps, param_groups)
        self.averager = PolynomialDecayAverager(model, gamma=averager_gamma)
        self.averager.averaged_model.eval()

    def step(self, scaler: torch.amp.GradScaler) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        super().step(scaler)
        self.averager.step()

    def eval_model(self, model: nn.Module) -> nn.Module:
        return self.averager.averaged_model

    def step_sizes(self) -> dict[str, float]:
        # eta is set by the first step; before it the step size is not defined yet
        return self._group_step_sizes(lambda group: group["eta"][0] if "eta" in group else math.nan)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "averager": self.averager.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for group in self.optimizer.param_groups:
            device = group["params"][0].device
            for key in ("rbar", "G"):
                if key in group:
                    group[key] = group[key].to(device)
            if "eta" in group:
                group["eta"] = [eta.to(device) for eta in group["eta"]]
        self.averager.load_state_dict(state["averager"])


class MechanicAdapter(OptimizerAdapter):
    """mechanic (mechanic-pytorch): a learned scale ``s`` on the updates of a base optimizer.

    ``optimizer`` is the base (e.g. ``partial(torch.optim.AdamW, lr=1.0)``); its class is
    mechanized with ``mechanic`` (the keywords of ``mechanize``: ``s_init``, ``s_decay``, ...).

    - mechanic keeps its per-parameter state in ``state["_mechanic"]`` keyed by parameter
      tensors, which no longer match after a checkpoint is saved and loaded
      (optimizedlearning/mechanic#2, #4): the checkpoint re-keys them by parameter index.
    - A step that raises leaves grad mode off (mechanic sets it without try/finally); it is
      restored here so that an error handler can still call ``backward``.
    - A fused base optimizer under fp16 GradScaler turns ``s`` into NaN for good (the
      fused step runs on overflow steps): refused.
    """

    def __init__(self, model: nn.Module, optimizer: OptimizerFactory, total_steps: int,
                 mechanic: dict[str, Any] | None = None, param_groups: dict[str, Any] | None = None,
                 scheduler: Callable[[Optimizer, int], LRScheduler] | None = None):
        self.mechanic = dict(mechanic or {})
        super().__init__(model, optimizer, total_steps, param_groups, scheduler)

    def _build(self, optimizer: OptimizerFactory, groups: list[dict[str, Any]]) -> Optimizer:
        from mechanic_pytorch import mechanize  # here: only this adapter needs mechanic

        if not isinstance(optimizer, functools.partial):
            raise TypeError("mechanic needs the base optimizer as a partial (`_partial_: true` in its config)")
        if "betas" in self.mechanic:
            self.mechanic["betas"] = tuple(self.mechanic["betas"])
        return mechanize(optimizer.func, **self.mechanic)(groups, *optimizer.args, **optimizer.keywords)

    def check(self, *, precision: str, distributed: bool, compiled: bool) -> None:
        if precision == "fp16" and any(group.get("fused") for group in self.optimizer.param_groups):
            raise ValueError("mechanic over a fused base optimizer turns its scale into NaN under fp16 GradScaler; "
                             "set the base's fused=false or use trainer.precision=bf16")

    def step(self, scaler: torch.amp.GradScaler) -> None:
        grad_enabled = torch.is_grad_enabled()
        try:
            super().step(scaler)
        finally:
            torch.set_grad_enabled(grad_enabled)

    def step_sizes(self) -> dict[str, float]:
        mechanic_state = self.optimizer.state.get("_mechanic")
        scale = float(mechanic_state["s"].sum()) if mechanic_state is not None else 0.0
        return self._group_step_sizes(lambda group: scale * group["lr"])

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        mechanic_state = state["optimizer"]["state"].get("_mechanic")
        if mechanic_state is not None:
            index = {id(p): i for i, p in enumerate(self._params())}
            state["optimizer"]["state"]["_mechanic"] = {
                (f"param{index[id(k)]}" if isinstance(k, torch.Tensor) else k): v for k, v in mechanic_state.items()
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mechanic_state = state["optimizer"]["state"].get("_mechanic")
        if mechanic_state is not None:
            params = self._params()
            rekeyed = {
                (params[int(k[len("param"):])] if isinstance(k, str) and k.startswith("param") else k): v
                for k, v in mechanic_state.items()
            }
            state = {**state, "optimizer": {**state["optimizer"], "state": {**state["optimizer"]["state"], "_mechanic": rekeyed}}}
        super().load_state_dict(state)
        # torch leaves non-parameter state where it was saved; mechanic moves its scalars to
        # the parameters' device itself at the next step, its references must be there already
        for p in self._params():
            entry = self.optimizer.state["_mechanic"].get(p)
            if entry is not None:
                for key, value in entry.items():
                    entry[key] = value.to(p.device)


class ScheduleFreeAdapter(OptimizerAdapter):
    """Schedule-free optimizers (schedulefree, e.g. ``AdamWScheduleFree``): the weights are the
    gradient point y in train mode and the average x in eval mode, switched in place by the
    optimizer's ``train()`` and ``eval()``, which its README requires before training steps and
    before evaluation and checkpoints.

    - ``zero_grad`` (the start of a step) puts the optimizer in train mode, ``eval_model`` and
      ``state_dict`` in eval mode: evaluation runs on x, and a checkpoint holds x as the model's
      weights (the trainer reads the model's tensors, which ``state_dict`` switches in place, before
      it writes the file), as the README asks.
    - ``train()`` recomputes y from x and z, which rounds: y after a round trip differs from y
      before it in the last bits, so a run resumed from a checkpoint (at a step where the
      uninterrupted run made no round trip) would drift from it. The adapter keeps y when it
      switches to eval mode and puts it back after ``train()``, and checkpoints it: every round trip
      is exact and a resumed run continues bit for bit.
    """

    def __init__(self, model: nn.Module, optimizer: OptimizerFactory, total_steps: int,
                 param_groups: dict[str, Any] | None = None):
        super().__init__(model, optimizer, total_steps, param_groups)
        self.train_point: list[torch.Tensor] | None = None  # y, kept while the weights are x

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _in_train_mode(self) -> bool:
        return all(group["train_mode"] for group in self.optimizer.param_groups)

    @torch.no_grad()
    def train_mode(self) -> None:
        """The weights at y, the point the next gradient is taken at."""
        if self._in_train_mode():
            return
        self.optimizer.train()
        if self.train_point is not None:
            for p, y in zip(self._params(), self.train_point):
                p.copy_(y)
            self.train_point = None

    @torch.no_grad()
    def eval_mode(self) -> None:
        """The weights at x, the average the package evaluates."""
        if not self._in_train_mode():
            return
        self.train_point = [p.detach().clone() for p in self._params()]
        self.optimizer.eval()

    def zero_grad(self) -> None:
        self.train_mode()
        super().zero_grad()

    def step(self, scaler: torch.amp.GradScaler) -> None:
        self.train_mode()  # a no-op after zero_grad; the package refuses a step in eval mode
        super().step(scaler)

    def eval_model(self, model: nn.Module) -> nn.Module:
        self.eval_mode()
        return model

    def state_dict(self) -> dict[str, Any]:
        self.eval_mode()
        return {**super().state_dict(), "train_point": self.train_point}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)  # the groups' train_mode with it: eval, as checkpointed
        saved = state.get("train_point")
        self.train_point = None if saved is None else [y.to(p.device) for p, y in zip(self._params(), saved)]


class GdtuoAdapter(Adapter):
    """gdtuo ("Gradient Descent: The Ultimate Optimizer"): a stack of hyper-optimizers.

    Its loop contract replaces the optimizer step: ``ModuleWrapper(model, optimizer=stack)``,
    ``initialize()``, then per step ``begin()``, ``zero_grad()``,
    ``loss.backward(create_graph=True)``, ``step()``. The base step size ``alpha`` is
    additive and learned by the hyper-optimizer (it can become negative).

    What gdtuo cannot do, refused with the reason: fp16 (no GradScaler), DDP and
    ``torch.compile`` (``step()`` swaps every ``nn.Parameter`` for a non-leaf tensor), and
    tied weights (``KeyError`` at the second step).

    Checkpoints hold the weights and the hyper-optimizers' parameters and moment caches.
    A resumed run is not bit-identical: gdtuo's hyper-gradient at the first step after a
    resume would flow through the previous step's autograd graph, which cannot be saved,
    so that one hyper-gradient is zero.

    Args:
        optimizer: the hyper-optimizer stack, e.g. ``gdtuo.Adam(alpha=1e-6, optimizer=gdtuo.Adam(alpha=1e-5))``.
    """

    def __init__(self, model: nn.Module, optimizer: Any, total_steps: int):
        from gradient_descent_the_ultimate_optimizer import gdtuo  # here: only this adapter needs gdtuo

        self.model = model
        self.stack = optimizer
        self.optimizer = None  # no torch Optimizer
        self.wrapper = gdtuo.ModuleWrapper(model, optimizer=optimizer)
        self.wrapper.initialize()

    def check(self, *, precision: str, distributed: bool, compiled: bool) -> None:
        problems = []
        if precision == "fp16":
            problems.append("fp16 needs a GradScaler, which gdtuo has no place for: use trainer.precision=bf16 or fp32")
        if distributed:
            problems.append("DDP fails under gdtuo's backward(create_graph=True) and parameter swapping: run on one device")
        if compiled:
            problems.append("torch.compile recompiles at every step because gdtuo swaps the parameters: set trainer.compile=false")
        names = {id(p): name for name, p in self.model.named_parameters(remove_duplicate=False)}
        if len(names) != len(list(self.model.named_parameters(remove_duplicate=False))):
            problems.append("the model ties weights (e.g. input and output embeddings), which gdtuo cannot update: use another model")
        if problems:
            raise ValueError("gdtuo cannot run here: " + "; ".join(problems))

    def zero_grad(self) -> None:
        self.wrapper.begin()
        self.wrapper.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        # The hyper-gradients flow through the gradient's graph; gdtuo's README requires it
        # and calls torch's warning about the parameter-gradient reference cycle expected:
        # close() breaks the cycle at the end of the run.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            loss.backward(create_graph=True)

    def unscale(self, scaler: torch.amp.GradScaler) -> None:
        """Nothing to unscale: check() refuses fp16, the one precision with a scale."""

    def step(self, scaler: torch.amp.GradScaler) -> None:
        self.wrapper.step()

    def close(self) -> None:
        # gdtuo 1.0 lacks the end() of its README: drop the gradients (and the graphs they
        # hold) of the weights and hyper-parameters, or they leak across runs in one process
        for optimizable in [self.wrapper, *self._stack()]:
            for tensor in optimizable.all_params_with_gradients:
                tensor.grad = None

    def _stack(self) -> list[Any]:
        """The hyper-optimizers, base first (the one that updates the model) to the top."""
        levels, level = [], self.stack
        while hasattr(level, "parameters"):
            levels.append(level)
            level = level.optimizer
        return levels

    def step_sizes(self) -> dict[str, float]:
        base = self.stack
        alpha = base.parameters["alpha"].detach()
        if type(base).__name__ in ("RMSProp", "RMSPropAlpha"):
            alpha = alpha.square()  # gdtuo's RMSProp stores sqrt(alpha) to keep it positive
        return {"step_size": float(alpha)}

    def state_dict(self) -> dict[str, Any]:
        def detached(value):
            if isinstance(value, dict):
                return {k: detached(v) for k, v in value.items()}
            return value.detach().clone() if isinstance(value, torch.Tensor) else value

        return {"stack": [
            {"parameters": detached(level.parameters), "cache": detached(getattr(level, "cache", {})),
             "state": detached(getattr(level, "state", {})), "num_stepments": getattr(level, "num_stepments", None)}
            for level in self._stack()
        ]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        levels = self._stack()
        if len(levels) != len(state["stack"]):
            raise ValueError(f"checkpoint has a gdtuo stack of {len(state['stack'])} levels, the config {len(levels)}")
        for level, saved in zip(levels, state["stack"]):
            level.parameters.update(saved["parameters"])
            if hasattr(level, "cache"):
                level.cache = saved["cache"]
            if hasattr(level, "state"):
                level.state = saved["state"]
            if saved["num_stepments"] is not None:
                level.num_stepments = saved["num_stepments"]
        # the wrapper holds the model's parameters by name; point it at the loaded tensors
        self.wrapper.parameters.update(dict(self.model.named_parameters()))
