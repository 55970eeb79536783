"""An independent, slow implementation of the authors' released update (docs/algorithm.md,
"The released variant"), on a flat float64 weight vector like tests/standard_reference.py.

Written from the equations alone, sharing no code with ``metaopt``: the AdamW base and the Adam
meta keep discounted sums (``m <- rho m + g``), the normalisers are bias-corrected through
``mu_t = (1 - lambda) / (1 - lambda^t)`` with ``eps = 1e-10`` inside the square root, SGDm steps
with the momentum from before the step, and every meta rule decays ``beta`` by ``1 - eta kappa_bar``.
"""

from __future__ import annotations

import math

import torch

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
