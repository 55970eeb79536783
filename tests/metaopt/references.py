"""An independent, slow implementation of the standard Hessian-free step (docs/algorithm.md).

Written from the equations alone and sharing no code with ``metaopt``: all weights live in one
flat float64 vector, every weight knows the index of its block, and each rule is spelled
out with plain tensor arithmetic. The tests drive it with the same gradients as the
optimizer and compare.
"""

from __future__ import annotations

import math

import torch


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
