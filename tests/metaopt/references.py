"""What the library's tests share: the independent float64 references and the small test problem they run on.

The references are slow implementations written from the equations alone (docs/algorithm.md), sharing no
code with ``metaopt``: all weights live in one flat float64 vector, every weight knows the index of its
block, and each rule is spelled out with plain tensor arithmetic. The tests drive them with the same
gradients as the optimizer and compare.

- ``StandardReference``: the standard Hessian-free step.
- ``ReleasedMetaOptimize``: the authors' released update ("The released variant"): the AdamW base and
  the Adam meta keep discounted sums (``m <- rho m + g``), the normalisers are bias-corrected through
  ``mu_t = (1 - lambda) / (1 - lambda^t)`` with ``eps = 1e-10`` inside the square root, SGDm steps with
  the momentum from before the step, and every meta rule decays ``beta`` by ``1 - eta kappa_bar``.
- The test problem: ``Net`` (conv, two linear layers, biases), a fixed stream of batches, two param groups,
  and the comparison of ``MetaOptimize`` at ``meta_lr=0`` with a published fixed-step optimizer.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from metaopt import MetaOptimize

def block_ids(names, shapes, groups, blocks):
    """The block index of every weight of the flattened parameter list.

    names/shapes/groups: one entry per tensor (its name, shape and param-group index).
    """
    ids, next_id, rows_of = [], 0, {}
    for k, (name, shape, group) in enumerate(zip(names, shapes, groups)):
        n = math.prod(shape)
        if blocks == "scalar":
            ids += [0] * n
        elif blocks == "param_group":
            ids += [group] * n
        elif blocks == "layerwise":
            ids += [k] * n
        elif blocks == "weightwise":
            ids += list(range(next_id, next_id + n))
            next_id += n
        elif blocks == "nodewise":
            prefix = name.rsplit(".", 1)[0]
            if name.endswith(".bias") and prefix in rows_of and len(rows_of[prefix]) == n:
                ids += rows_of[prefix]  # bias entry i joins row i of its weight
                continue
            rows = shape[0] if len(shape) >= 1 else 1
            per_row = n // rows
            node = list(range(next_id, next_id + rows))
            next_id += rows
            if name.endswith(".weight"):
                rows_of[prefix] = node
            for r in range(rows):
                ids += [node[r]] * per_row
        else:
            raise ValueError(blocks)
    if blocks == "layerwise":
        next_id = len(shapes)
    elif blocks == "scalar":
        next_id = 1
    elif blocks == "param_group":
        next_id = max(groups) + 1
    return torch.tensor(ids), next_id


class StandardReference:
    """The standard step on a flat weight vector.

    weight_decay: one value per weight (param groups may differ). Meta hyper-parameters
    are shared by all blocks. ``lr`` multiplies the step size as the param group ``lr`` does;
    ``meta_weight_decay`` (kappa-bar) decays beta by ``1 - eta kappa_bar`` every meta step.
    """

    def __init__(self, w, block, n_blocks, base, meta, *, alpha0, meta_lr, gamma, weight_decay, base_hp, meta_hp,
                 meta_weight_decay=0.0):
        self.w = w.clone()
        self.block, self.base, self.meta = block, base, meta
        self.eta, self.gamma, self.kappa, self.kappa_bar = meta_lr, gamma, weight_decay, meta_weight_decay
        self.rho = base_hp.get("momentum")
        self.lam = base_hp.get("normalizer")
        self.c = base_hp.get("lion_interp")
        self.eps = base_hp.get("eps")
        self.rb = meta_hp.get("momentum")
        self.lb = meta_hp.get("normalizer")
        self.cb = meta_hp.get("lion_interp")
        self.meps = meta_hp.get("eps")
        self.m = torch.zeros_like(w)
        self.v = torch.zeros_like(w)
        self.h = torch.zeros_like(w)
        self.beta = torch.full((n_blocks,), math.log(alpha0), dtype=w.dtype)
        self.mb = torch.zeros(n_blocks, dtype=w.dtype)
        self.vb = torch.zeros(n_blocks, dtype=w.dtype)
        self.t = 0

    def step(self, g, lr=1.0):
        self.t += 1
        t = self.t
        # 1. meta-gradient with the trace from before this step
        z = torch.zeros_like(self.beta).index_add_(0, self.block, self.h * g)
        # 2. base update with the old beta
        alpha = lr * torch.exp(self.beta)[self.block]
        if self.base == "sgd":
            d = g
        elif self.base == "sgdm":
            self.m = self.rho * self.m + (1 - self.rho) * g
            d = self.m
        elif self.base == "rmsprop":
            self.v = self.lam * self.v + (1 - self.lam) * g**2
            d = g / (torch.sqrt(self.v / (1 - self.lam**t)) + self.eps)
        elif self.base == "adamw":
            self.m = self.rho * self.m + (1 - self.rho) * g
            self.v = self.lam * self.v + (1 - self.lam) * g**2
            d = (self.m / (1 - self.rho**t)) / (torch.sqrt(self.v / (1 - self.lam**t)) + self.eps)
        elif self.base == "lion":
            d = torch.sign(self.c * self.m + (1 - self.c) * g)
            self.m = self.rho * self.m + (1 - self.rho) * g
        dw = -alpha * (d + self.kappa * self.w)
        self.w = self.w + dw
        # 3. trace
        self.h = self.gamma * (1 - self.kappa * alpha) * self.h + dw
        # 4. meta update, after the meta weight decay
        self.beta = (1 - self.eta * self.kappa_bar) * self.beta
        if self.meta == "sgd":
            self.beta = self.beta - self.eta * z
        elif self.meta == "rmsprop":
            self.vb = self.lb * self.vb + (1 - self.lb) * z**2
            self.beta = self.beta - self.eta * z / (torch.sqrt(self.vb / (1 - self.lb**t)) + self.meps)
        elif self.meta == "adam":
            self.mb = self.rb * self.mb + (1 - self.rb) * z
            self.vb = self.lb * self.vb + (1 - self.lb) * z**2
            self.beta = self.beta - self.eta * (self.mb / (1 - self.rb**t)) / (
                torch.sqrt(self.vb / (1 - self.lb**t)) + self.meps
            )
        elif self.meta == "lion":
            self.beta = self.beta - self.eta * torch.sign(self.cb * self.mb + (1 - self.cb) * z)
            self.mb = self.rb * self.mb + (1 - self.rb) * z
        return self.w

    def step_sizes(self, lr=1.0):
        return lr * torch.exp(self.beta)[self.block]


EPS = 1e-10  # the released code's epsilon, inside the square root


class ReleasedMetaOptimize:
    """The released step on a flat weight vector; ``block`` maps each weight to its block index."""

    def __init__(self, w, block, n_blocks, base, meta, *, alpha0, meta_lr, gamma, weight_decay, meta_weight_decay,
                 base_hp, meta_hp):
        self.w = w.clone()
        self.block, self.base, self.meta = block, base, meta
        self.eta, self.gamma, self.kappa, self.kappa_bar = meta_lr, gamma, weight_decay, meta_weight_decay
        self.rho, self.lam, self.c = base_hp.get("momentum"), base_hp.get("normalizer"), base_hp.get("lion_interp")
        self.rb, self.lb, self.cb = meta_hp.get("momentum"), meta_hp.get("normalizer"), meta_hp.get("lion_interp")
        self.m, self.v, self.h = torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(w)
        self.beta = torch.full((n_blocks,), math.log(alpha0), dtype=w.dtype)
        self.mb = torch.zeros(n_blocks, dtype=w.dtype)
        self.vb = torch.zeros(n_blocks, dtype=w.dtype)
        self.t = 0

    def step(self, g):
        self.t += 1
        t = self.t
        z = torch.zeros_like(self.beta).index_add_(0, self.block, self.h * g)
        alpha = torch.exp(self.beta)[self.block]
        if self.base == "sgd":
            d = g
        elif self.base == "sgdm":
            d = self.m  # the momentum from before this step
            self.m = self.rho * self.m + (1 - self.rho) * g
        elif self.base == "rmsprop":
            self.v = self.lam * self.v + g**2
            d = g / torch.sqrt((1 - self.lam) / (1 - self.lam**t) * self.v + EPS)
        elif self.base == "adamw":
            self.m = self.rho * self.m + g
            self.v = self.lam * self.v + g**2
            d = self.m / torch.sqrt((1 - self.lam) / (1 - self.lam**t) * self.v + EPS)
        elif self.base == "lion":
            d = torch.sign(self.c * self.m + (1 - self.c) * g)
            self.m = self.rho * self.m + (1 - self.rho) * g
        dw = -alpha * (d + self.kappa * self.w)
        self.w = self.w + dw
        self.h = self.gamma * (1 - self.kappa * alpha) * self.h + dw
        if self.meta == "sgd":
            u = z
        elif self.meta == "rmsprop":
            self.vb = self.lb * self.vb + z**2
            u = z / torch.sqrt((1 - self.lb) / (1 - self.lb**t) * self.vb + EPS)
        elif self.meta == "adam":
            self.mb = self.rb * self.mb + z
            self.vb = self.lb * self.vb + z**2
            u = self.mb / torch.sqrt((1 - self.lb) / (1 - self.lb**t) * self.vb + EPS)
        elif self.meta == "lion":
            u = torch.sign(self.cb * self.mb + (1 - self.cb) * z)
            self.mb = self.rb * self.mb + (1 - self.rb) * z
        self.beta = (1 - self.eta * self.kappa_bar) * self.beta - self.eta * u
        return self.w

    def step_sizes(self):
        return torch.exp(self.beta)[self.block]


# -- the test problem --------------------------------------------------------------------------------

# The base rules' hyper-parameters and initial step sizes in the comparisons.
BASE_HP = {
    "sgd": {},
    "sgdm": {"momentum": 0.9},
    "rmsprop": {"normalizer": 0.99, "eps": 1e-8},
    "adamw": {"momentum": 0.9, "normalizer": 0.99, "eps": 1e-8},
    "lion": {"momentum": 0.99, "lion_interp": 0.9},
}
ALPHA0 = {"sgd": 0.05, "sgdm": 0.05, "rmsprop": 3e-3, "adamw": 3e-3, "lion": 1e-3}


class Net(nn.Module):
    """Conv, two linear layers and biases: matrices, filters and vectors for every granularity."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.hidden = nn.Linear(48, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.tanh(self.conv(x)).flatten(1)
        return self.out(torch.tanh(self.hidden(x)))


def batch(t, n=16, dtype=torch.float64):
    """The t-th batch of a fixed stream, the same whoever asks for it."""
    generator = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(n, 1, 6, 6, generator=generator, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=generator)
    return x, y


def loss_fn(model, params, t):
    x, y = batch(t)
    return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)


def make_net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return Net().to(dtype)


def two_groups(model, weight_decay=(0.1, 0.0)):
    """conv + hidden in one group, out in another, with different weight decay."""
    named = list(model.named_parameters())
    return [
        {"params": named[:4], "weight_decay": weight_decay[0]},
        {"params": named[4:], "weight_decay": weight_decay[1]},
    ]


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def assert_meta_lr_zero_is(base, meta, make_counterpart, steps=30):
    """MetaOptimize(base, meta) with meta_lr=0 takes the steps of ``make_counterpart(params, alpha0, weight_decay)``
    (the published base optimizer at the fixed step size alpha0) on the test problem; its step sizes stay put."""
    ours, theirs = make_net(), make_net()
    optimizer = MetaOptimize(
        ours.parameters(),
        base,
        meta,
        "layerwise",
        alpha0=ALPHA0[base],
        meta_lr=0.0,
        weight_decay=0.1,
        **BASE_HP[base],
    )
    reference = make_counterpart(theirs.parameters(), ALPHA0[base], 0.1)
    for t in range(steps):
        for model, opt in ((ours, optimizer), (theirs, reference)):
            opt.zero_grad()
            x, y = batch(t)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        torch.testing.assert_close(flat(ours.parameters()), flat(theirs.parameters()), rtol=1e-12, atol=1e-15)
    # The step sizes stayed where they started.
    for p in ours.parameters():
        torch.testing.assert_close(optimizer.step_size(p), torch.tensor(ALPHA0[base], dtype=torch.float64))


# A small convolutional model in two param groups, for the storage and Triton kernel tests.
class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.hidden = nn.Linear(27, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(torch.tanh(self.conv(x)).flatten(1))))


def make(base="adamw", meta="adam", blocks="scalar", kernel="flat", storage="contiguous", dtype=torch.float64,
         device="cpu", **options):
    torch.manual_seed(0)
    model = Small().to(dtype=dtype, device=device)
    named = list(model.named_parameters())
    groups = [{"params": named[:2], "weight_decay": 0.1}, {"params": named[2:], "weight_decay": 0.0}]
    options = {"alpha0": 1e-2, "meta_lr": 0.05, "gamma": 0.9, **options}
    return model, MetaOptimize(groups, base, meta, blocks, kernel=kernel, storage=storage, **options)


def backward(model, t):
    generator = torch.Generator().manual_seed(t)
    x = torch.randn(4, 2, 5, 5, generator=generator, dtype=model.out.weight.dtype)
    y = torch.randint(0, 3, (4,), generator=generator)
    device = model.out.weight.device
    nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()


def train(model, optimizer, steps, start=0, between=None):
    for t in range(start, start + steps):
        optimizer.zero_grad()
        backward(model, t)
        if between is not None:
            between(model, t)
        optimizer.step()


def weights_and_step_sizes(model, optimizer):
    params = list(model.parameters())
    return (torch.cat([p.detach().reshape(-1) for p in params]),
            torch.cat([optimizer.step_size(p).expand_as(p).reshape(-1) for p in params]))
