"""Streams whose loss changes over time: the continual (non-stationary) setting, as datasets.

A stream is fixed in advance by its seed: ``stream.batch(t)`` is the batch of step ``t``, the
same for every learner that runs on it; ``stream.loss(outputs, targets)`` is the loss on it and
``stream.model()`` builds the model it is meant for. A learner sees each batch once, in order,
and is scored on the *online* loss: the loss of each batch before the learner steps on it.

* :class:`LinearTracking`: Sutton's (1992) tracking task. ``y = w*_t . x`` with ``x ~ N(0, I)``;
  5 of 20 target weights are +-1, the other 15 are 0 (irrelevant inputs), and every
  ``flip_every`` steps one relevant weight, chosen at random, flips sign. A linear model, the
  squared error ``(y_hat - y)^2 / 2``. The best a learner can do is to track the relevant
  weights quickly and leave the irrelevant ones still: one step size per weight helps.
* :class:`PermutedDigits`: scikit-learn's 8x8 digits (1,797 images shipped inside the package),
  with the labels permuted anew every ``permute_every`` steps: the inputs stay, the mapping
  to classes changes. A one-hidden-layer MLP, cross-entropy.

The builders :func:`linear_tracking` and :func:`permuted_digits` (conf/dataset/<name>.yaml) hand a
stream to the trainer as a DataSplits whose train split holds its examples in the order the
learner sees them (``shuffle=False``: batch ``t`` of the loader is ``stream.batch(t)``, each seen
once), with no test split: a learner is scored on its train loss, which the trainer computes on
each batch before stepping on it, the online loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from experiments.data.common import DataSplits


@dataclass
class LinearTracking:
    steps: int
    inputs: int = 20
    relevant: int = 5  # target weights of +-1; the other inputs' weights are 0
    flip_every: int = 20  # steps between sign flips of one relevant weight
    batch_size: int = 1
    seed: int = 0
    x: Tensor = field(init=False, repr=False)  # (steps, batch_size, inputs)
    y: Tensor = field(init=False, repr=False)  # (steps, batch_size, 1)

    def __post_init__(self):
        generator = torch.Generator().manual_seed(self.seed)
        target = torch.zeros(self.inputs)
        target[: self.relevant] = 1.0
        targets = torch.empty(self.steps, self.inputs)
        for t in range(self.steps):
            if t > 0 and t % self.flip_every == 0:
                target[torch.randint(self.relevant, (1,), generator=generator)] *= -1
            targets[t] = target
        self.x = torch.randn(self.steps, self.batch_size, self.inputs, generator=generator)
        self.y = torch.einsum("tbi,ti->tb", self.x, targets).unsqueeze(-1)

    def batch(self, t: int) -> tuple[Tensor, Tensor]:
        return self.x[t], self.y[t]

    def model(self) -> nn.Module:
        model = nn.Linear(self.inputs, 1, bias=False)
        nn.init.zeros_(model.weight)
        return model

    @staticmethod
    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * ((outputs - targets) ** 2).mean()

    def hessian_diagonal(self, model: nn.Module, t: int) -> dict[Tensor, Tensor]:
        """The exact diagonal of the loss's Hessian at step ``t``: the mean of ``x^2`` (IDBD's ``a^2``)."""
        return {model.weight: (self.x[t] ** 2).mean(0, keepdim=True)}


@dataclass
class PermutedDigits:
    steps: int
    permute_every: int = 2000  # steps between new permutations of the labels
    batch_size: int = 16
    hidden: int = 64  # tanh units of model()
    seed: int = 0
    features: Tensor = field(init=False, repr=False)  # (1797, 64) in [0, 1]
    labels: Tensor = field(init=False, repr=False)  # (1797,) the true classes, before any permutation

    def __post_init__(self):
        from sklearn.datasets import load_digits  # here: only this stream needs scikit-learn

        digits = load_digits()
        self.features = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        generator = torch.Generator().manual_seed(self.seed)
        self._indices = torch.randint(len(self.features), (self.steps, self.batch_size), generator=generator)
        tasks = (self.steps + self.permute_every - 1) // self.permute_every
        self._permutations = torch.stack([torch.randperm(10, generator=generator) for _ in range(tasks)])
        self.labels = torch.tensor(digits.target)

    def batch(self, t: int) -> tuple[Tensor, Tensor]:
        indices = self._indices[t]
        return self.features[indices], self._permutations[t // self.permute_every][self.labels[indices]]

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 10))

    @staticmethod
    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        return nn.functional.cross_entropy(outputs, targets)


@dataclass
class SignalOrNoise(LinearTracking):
    """Linear regression whose target alternates every ``switch_every`` steps between noise alone
    (``y = noise * e``: the best weights are 0, and a large weight decay gets there) and a strong signal
    (``y = w* . x + noise * e``, all ``inputs`` entries of ``w*`` +-1: a small weight decay keeps the
    weights at it). The best weight decay changes with the phase; ``signal(t)`` says which phase step
    ``t`` is in. LinearTracking's model, loss and batches (its ``relevant`` and ``flip_every`` unused)."""

    switch_every: int = 1000
    noise: float = 1.0

    def __post_init__(self):
        generator = torch.Generator().manual_seed(self.seed)
        target = torch.randint(2, (self.inputs,), generator=generator).float() * 2 - 1
        self.x = torch.randn(self.steps, self.batch_size, self.inputs, generator=generator)
        on = torch.tensor([self.signal(t) for t in range(self.steps)], dtype=torch.float32).view(-1, 1)
        noise = self.noise * torch.randn(self.steps, self.batch_size, generator=generator)
        self.y = (on * torch.einsum("tbi,i->tb", self.x, target) + noise).unsqueeze(-1)

    def signal(self, t: int) -> bool:
        return (t // self.switch_every) % 2 == 1  # noise first, then signal, and so on


def linear_tracking(steps: int, flip_every: int = 20, inputs: int = 20, relevant: int = 5, batch_size: int = 1,
                    seed: int = 0) -> DataSplits:
    """Sutton's tracking task as a dataset: a regression (the half squared error), for the linear model
    conf/model/linear.yaml (``model_kwargs``: its number of inputs)."""
    stream = LinearTracking(steps, inputs, relevant, flip_every, batch_size, seed)
    return _in_order(stream.x.flatten(0, 1), stream.y.flatten(0, 1), stream, task="regression",
                     model_kwargs={"inputs": inputs})


def permuted_digits(steps: int, permute_every: int = 2000, batch_size: int = 16, seed: int = 0) -> DataSplits:
    """The digits with labels permuted every ``permute_every`` steps, as a dataset: classification, for
    an MLP on 8x8 grey images (``model_kwargs`` as experiments.data.digits gives them)."""
    stream = PermutedDigits(steps, permute_every, batch_size, seed=seed)
    batches = [stream.batch(t) for t in range(steps)]
    return _in_order(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]), stream,
                     task="classification", model_kwargs={"num_classes": 10, "in_channels": 1, "image_size": 8})


def _in_order(x: Tensor, y: Tensor, stream: LinearTracking | PermutedDigits, task: str, model_kwargs: dict
              ) -> DataSplits:
    """A stream's examples, batch after batch, as a train split read in order; an empty test split."""
    return DataSplits(train=TensorDataset(x, y), test=TensorDataset(x[:0], y[:0]), batch_size=stream.batch_size,
                      model_kwargs=model_kwargs, shuffle=False, task=task)
