r"""``kernel="triton"``: the Hessian-free step of a flat segment in two Triton launches.

The order of Algorithm 3 allows one pass over memory: the meta-gradient uses the trace from before the
step and the base update the step sizes from before the meta update. So for each flat segment
(:class:`metaopt.plan.FlatSegment`, the parameters of a param group that share a device and a dtype):

1. :func:`_update_kernel`, one program per *tile* of at most ``BLOCK`` elements, loads
   :math:`w, g, h` and the base rule's moments once, computes the direction, the update
   :math:`\Delta w = -\alpha (d(g) + \kappa w)` with :math:`\alpha = \mathrm{lr}\, e^{\beta_b}` of the
   tile's block, and :math:`h \leftarrow \gamma (1 - \kappa\alpha) h + \Delta w`, stores them once,
   and stores the tile's partial sum of :math:`h g` with the old :math:`h` (weightwise: each element's
   :math:`h g`, its block's whole meta-gradient);
2. :func:`_meta_kernel`, one program per step-size block, sums the partial sums of the block's tiles
   in a fixed order (deterministic, no atomics) and applies the meta rule to :math:`\beta_b`.

Tiles never straddle two blocks: a segment's elements are cut into *runs* of one block each (the whole
buffer for ``scalar`` and ``param_group``, each tensor for ``layerwise``, each row of a weight and each
entry of a bias for ``nodewise``), and each run into tiles; the tables of tiles (start, block) and of
each block's tiles are made once per plan, on the device. Nothing is read back to the host at a step,
and every launch has fixed arguments (the step counters and a tensor ``lr`` are read by the kernels),
so the step can be captured in a CUDA graph.

The arithmetic is generated from the rules rather than written per pair: :func:`_direction` is the
table of :mod:`metaopt.rules` in Triton (one branch per rule, chosen at compile time), used by both
kernels, so the two kernel bodies serve every base x meta pair, granularity and variant. Rules added
to :mod:`metaopt.rules` without a branch here are refused (use ``kernel="flat"``). Arithmetic is in
float32 (float64 for float64 parameters), the hyper-parameters in float32 (Triton passes Python floats
so), with one rounding on store: equal to the reference kernel within float32 rounding.

Parameters that no flat segment holds (see :mod:`metaopt.plan`) take the ``foreach`` arithmetic.
On a CPU the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from metaopt import kernels, rules
from metaopt.plan import FlatSegment

BLOCK = 1024  # elements of a tile
REDUCE_BLOCK = 256  # partial sums a reducing program adds at a time
RULE_IDS = {
    rules.sgd_direction: 0, rules.sgdm_direction: 1, rules.rmsprop_direction: 2, rules.adam_direction: 3,
    rules.lion_direction: 4, rules.sgdm_delayed_direction: 5, rules.rmsprop_sum_direction: 6,
    rules.adam_sum_direction: 7,
}


@triton.jit
def _sign(y):
    return tl.where(y > 0, 1.0, tl.where(y < 0, -1.0, 0.0)).to(y.dtype)


@triton.jit
def _direction(RULE: tl.constexpr, x, m, v, rho, lam, c, eps, corrected_rho, corrected_lam):
    """The rules of :mod:`metaopt.rules`: (d, new m, new v) of x with moments m, v; ``corrected_*``:
    ``1 - decay^t``."""
    if RULE == 0:  # sgd
        d = x
    elif RULE == 1:  # sgdm
        m = rho * m + (1 - rho) * x
        d = m
    elif RULE == 2:  # rmsprop
        v = lam * v + (1 - lam) * x * x
        d = x / (tl.sqrt(v / corrected_lam) + eps)
    elif RULE == 3:  # adam
        m = rho * m + (1 - rho) * x
        v = lam * v + (1 - lam) * x * x
        d = (m / corrected_rho) / (tl.sqrt(v / corrected_lam) + eps)
    elif RULE == 4:  # lion: the sign with the old m
        d = _sign(c * m + (1 - c) * x)
        m = rho * m + (1 - rho) * x
    elif RULE == 5:  # sgdm_delayed: the old m
        d = m
        m = rho * m + (1 - rho) * x
    elif RULE == 6:  # rmsprop_sum
        v = lam * v + x * x
        d = x / tl.sqrt(v * ((1 - lam) / corrected_lam) + eps)
    else:  # adam_sum
        m = rho * m + x
        v = lam * v + x * x
        d = m / tl.sqrt(v * ((1 - lam) / corrected_lam) + eps)
    return d, m, v


@triton.jit
def _load_moments(m_ptr, v_ptr, offsets, mask, x, HAS_M: tl.constexpr, HAS_V: tl.constexpr):
    """A rule's first and second moments (``x``, never used, where it has none)."""
    m = x
    v = x
    if HAS_M:
        m = tl.load(m_ptr + offsets, mask=mask, other=0.0)
    if HAS_V:
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0)
    return m, v


@triton.jit
def _store_moments(m_ptr, v_ptr, offsets, mask, m, v, HAS_M: tl.constexpr, HAS_V: tl.constexpr):
    if HAS_M:
        tl.store(m_ptr + offsets, m.to(m_ptr.dtype.element_ty), mask=mask)
    if HAS_V:
        tl.store(v_ptr + offsets, v.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _update_kernel(w_ptr, g_ptr, h_ptr, m_ptr, v_ptr, beta_ptr, lr_ptr, partial_ptr, tile_start_ptr, tile_block_ptr,
                   step_ptr, n, lr, weight_decay, gamma, rho, lam, c, eps, log_rho, log_lam,
                   RULE: tl.constexpr, HAS_M: tl.constexpr, HAS_V: tl.constexpr, PER_ELEMENT: tl.constexpr,
                   LR_TENSOR: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr):
    """Base update, trace and partial sums of ``h * g`` of one tile (see the module docstring)."""
    tile = tl.program_id(0)
    if PER_ELEMENT:  # weightwise: every element its own block
        offsets = tile * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        beta = tl.load(beta_ptr + offsets, mask=mask, other=0.0)
    else:
        start = tl.load(tile_start_ptr + tile)
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < tl.load(tile_start_ptr + tile + 1)
        beta = tl.load(beta_ptr + tl.load(tile_block_ptr + tile))
    if LR_TENSOR:
        lr = tl.load(lr_ptr)
    alpha = lr * tl.exp(beta)
    t = tl.load(step_ptr)
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0)
    h = tl.load(h_ptr + offsets, mask=mask, other=0.0)
    m, v = _load_moments(m_ptr, v_ptr, offsets, mask, g, HAS_M, HAS_V)
    if UPCAST:  # bfloat16, float16: computed in float32
        w, g, h, m, v = w.to(tl.float32), g.to(tl.float32), h.to(tl.float32), m.to(tl.float32), v.to(tl.float32)
    z = h * g  # the meta-gradient term, with the trace from before the step
    d, m, v = _direction(RULE, g, m, v, rho, lam, c, eps, 1 - tl.exp(t * log_rho), 1 - tl.exp(t * log_lam))
    dw = -alpha * (d + weight_decay * w)
    tl.store(w_ptr + offsets, (w + dw).to(w_ptr.dtype.element_ty), mask=mask)
    tl.store(h_ptr + offsets, (gamma * (1 - weight_decay * alpha) * h + dw).to(h_ptr.dtype.element_ty), mask=mask)
    _store_moments(m_ptr, v_ptr, offsets, mask, m, v, HAS_M, HAS_V)
    if PER_ELEMENT:
        tl.store(partial_ptr + offsets, z.to(partial_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(partial_ptr + tile, tl.sum(tl.where(mask, z, 0.0).to(partial_ptr.dtype.element_ty), axis=0))


@triton.jit
def _meta_kernel(beta_ptr, m_ptr, v_ptr, z_ptr, partial_ptr, order_ptr, first_ptr, step_ptr, n_blocks,
                 meta_lr, meta_weight_decay, rho, lam, c, eps, log_rho, log_lam,
                 RULE: tl.constexpr, HAS_M: tl.constexpr, HAS_V: tl.constexpr, REDUCE: tl.constexpr,
                 UPDATE: tl.constexpr, BLOCK: tl.constexpr):
    """With ``REDUCE``, one program per block: the block's meta-gradient, its tiles' partial sums added
    in a fixed order (stored in ``z``); without, ``BLOCK`` blocks a program with ``z`` given. With
    ``UPDATE``, the meta update of the blocks' ``beta``."""
    program = tl.program_id(0)
    if REDUCE:
        first = tl.load(first_ptr + program)
        last = tl.load(first_ptr + program + 1)
        total = tl.zeros([BLOCK], dtype=partial_ptr.dtype.element_ty)
        for chunk in range(first, last, BLOCK):
            index = chunk + tl.arange(0, BLOCK)
            tiles = tl.load(order_ptr + index, mask=index < last, other=0)
            total += tl.load(partial_ptr + tiles, mask=index < last, other=0.0)
        offsets = program + tl.arange(0, 1)
        mask = offsets < n_blocks
        z = tl.zeros([1], dtype=partial_ptr.dtype.element_ty) + tl.sum(total, axis=0)
        tl.store(z_ptr + offsets, z, mask=mask)
    else:
        offsets = program * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_blocks
        z = tl.load(z_ptr + offsets, mask=mask, other=0.0)
    if UPDATE:
        t = tl.load(step_ptr)
        beta = tl.load(beta_ptr + offsets, mask=mask, other=0.0)
        m, v = _load_moments(m_ptr, v_ptr, offsets, mask, z, HAS_M, HAS_V)
        u, m, v = _direction(RULE, z, m, v, rho, lam, c, eps, 1 - tl.exp(t * log_rho), 1 - tl.exp(t * log_lam))
        tl.store(beta_ptr + offsets, (1 - meta_lr * meta_weight_decay) * beta - meta_lr * u, mask=mask)
        _store_moments(m_ptr, v_ptr, offsets, mask, m, v, HAS_M, HAS_V)


# -- the host side: tables made once per plan, launches --------------------------------------------


class Layout(NamedTuple):
    """A flat segment's tiles: each tile's start (and the end of the last) and block, the tiles in the
    order of their blocks with each block's first, and the buffers of the partial sums and the sums."""

    tiles: int
    tile_start: Tensor
    tile_block: Tensor
    order: Tensor
    first: Tensor
    partials: Tensor  # one per tile; weightwise: one per element, which is its block's meta-gradient
    sums: Tensor  # one per block


def _runs(segment: FlatSegment) -> tuple[Tensor, Tensor]:
    """The start and the block of each run of consecutive elements of one block."""
    device = segment.traces[0].device
    if segment.kind == "one":
        return torch.zeros(1, dtype=torch.int64, device=device), torch.zeros(1, dtype=torch.int64, device=device)
    if segment.kind == "tensor":
        lengths = segment.lengths.to(torch.int64)
        return torch.cumsum(lengths, 0) - lengths, torch.arange(len(lengths), device=device)
    rows = segment.rows
    starts = torch.cat([torch.zeros(1, dtype=torch.int64, device=device),
                        torch.nonzero(rows[1:] != rows[:-1]).flatten() + 1])
    return starts, rows[starts].to(torch.int64)


def _layout(segment: FlatSegment) -> Layout:
    """The tiles of ``segment`` (reads their number back to the host once, when the plan is new)."""
    n, beta = segment.traces[0].numel(), segment.beta
    if segment.kind == "weight":
        partials = torch.empty(n, dtype=beta.dtype, device=beta.device)
        empty = torch.zeros(1, dtype=torch.int64, device=beta.device)  # not read: a valid pointer
        return Layout(triton.cdiv(n, BLOCK), empty, empty, empty, empty, partials, partials)
    starts, blocks = _runs(segment)
    lengths = torch.diff(starts, append=torch.tensor([n], device=starts.device))
    counts = (lengths + BLOCK - 1) // BLOCK
    tiles = int(counts.sum())
    run_of_tile = torch.repeat_interleave(torch.arange(len(starts), device=starts.device), counts, output_size=tiles)
    first_tile_of_run = torch.cumsum(counts, 0) - counts
    within = torch.arange(tiles, device=starts.device) - first_tile_of_run[run_of_tile]
    tile_start = torch.cat([starts[run_of_tile] + BLOCK * within, torch.tensor([n], device=starts.device)])
    tile_block = blocks[run_of_tile]
    per_block = torch.bincount(tile_block, minlength=beta.numel())
    first = torch.cat([torch.zeros(1, dtype=torch.int64, device=starts.device), torch.cumsum(per_block, 0)])
    return Layout(tiles, tile_start, tile_block, torch.sort(tile_block, stable=True).indices, first,
                  torch.empty(tiles, dtype=beta.dtype, device=beta.device), torch.empty_like(beta).view(-1))


class Partials(kernels.DeferredTerms):
    """A segment's meta-gradient terms as :func:`_update_kernel` left them: reduced by the meta update's
    launch, or by :meth:`reduced` where they are summed with other terms first."""

    def __init__(self, layout: Layout, beta: Tensor):
        self.layout, self.beta = layout, beta

    @property
    def per_element(self) -> bool:
        return self.layout.partials is self.layout.sums

    def reduced(self) -> Tensor:
        if not self.per_element:
            _launch_meta(self.layout.sums, self)
        return self.layout.sums.view(self.beta.shape)


def _rule_arguments(rule, hp: dict[str, float]) -> tuple:
    """(rho, lambda, c, eps, log rho, log lambda): a rule's hyper-parameters as the kernels take them."""
    rho, lam = hp.get("momentum", 0.0), hp.get("normalizer", 0.0)

    def log(x: float) -> float:
        return math.log(x) if x > 0 else -math.inf

    return rho, lam, hp.get("lion_interp", 0.0), hp.get("eps", 0.0), log(rho), log(lam)


def _moment_pointers(moments: dict[str, list[Tensor]], fallback: Tensor) -> tuple[Tensor, Tensor]:
    """The ``exp_avg`` and ``exp_avg_sq`` of a rule (``fallback``, never read, where it has none)."""
    return tuple(moments[name][0] if name in moments else fallback for name in ("exp_avg", "exp_avg_sq"))


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # segment -> its Layout


def fused_update(segment: FlatSegment, grads: list[Tensor], lr: float | Tensor, *, rule, hp, weight_decay, gamma
                 ) -> list[kernels.DeferredTerms]:
    """Launch 1 on a flat segment whose counters count this step: base update, trace, partial sums."""
    if segment not in _LAYOUTS:
        _LAYOUTS[segment] = _layout(segment)
    layout = _LAYOUTS[segment]
    w, h = segment.weights[0], segment.traces[0]
    m, v = _moment_pointers(segment.moments, w)
    lr_tensor = isinstance(lr, Tensor)
    _update_kernel[(layout.tiles,)](
        w, grads[0], h, m, v, segment.beta, lr.to(w.device) if lr_tensor else w, layout.partials,
        layout.tile_start, layout.tile_block, segment.steps[0], w.numel(), 1.0 if lr_tensor else lr,
        weight_decay, gamma, *_rule_arguments(rule, hp),
        RULE=RULE_IDS[rule.direction], HAS_M="exp_avg" in segment.moments, HAS_V="exp_avg_sq" in segment.moments,
        PER_ELEMENT=segment.kind == "weight", LR_TENSOR=lr_tensor,
        UPCAST=w.dtype in (torch.float16, torch.bfloat16), BLOCK=BLOCK,
    )
    return [Partials(layout, segment.beta)]


def _launch_meta(beta: Tensor, z: Tensor | Partials, moments: dict[str, list[Tensor]] | None = None,
                 step: Tensor | None = None, rule=None, hp: dict[str, float] | None = None, meta_lr: float = 0.0,
                 meta_weight_decay: float = 0.0) -> None:
    """Launch 2: reduce ``z`` if it is partial sums (into the layout's ``sums``), and with a ``rule``, the
    meta update of ``beta`` with its ``moments`` and counter ``step``."""
    reduce = isinstance(z, Partials) and not z.per_element
    values = (z.layout.partials if isinstance(z, Partials) else z).reshape(-1)
    layout = z.layout if reduce else None
    names = tuple(moments or ())
    m, v = _moment_pointers(moments or {}, beta)
    n_blocks = beta.numel()
    _meta_kernel[(n_blocks if reduce else triton.cdiv(n_blocks, REDUCE_BLOCK),)](
        beta, m, v, layout.sums if reduce else values, values, layout.order if reduce else values,
        layout.first if reduce else values, step if step is not None else beta, n_blocks,
        meta_lr, meta_weight_decay, *_rule_arguments(rule, hp or {}),
        RULE=RULE_IDS[rule.direction] if rule is not None else 0, HAS_M="exp_avg" in names,
        HAS_V="exp_avg_sq" in names, REDUCE=reduce, UPDATE=rule is not None, BLOCK=REDUCE_BLOCK,
    )


def meta_update(betas, meta_grads, moments, steps, *, rule, hp, meta_lr, meta_weight_decay) -> None:
    """The meta update: launch 2 for the blocks of a flat segment, ``foreach`` for blocks of their own tensors."""
    if not any(isinstance(z, Partials) for z in meta_grads):
        kernels._foreach_meta_update(betas, meta_grads, moments, steps, rule=rule, hp=hp, meta_lr=meta_lr,
                                     meta_weight_decay=meta_weight_decay)
        return
    for i, (beta, z) in enumerate(zip(betas, meta_grads)):
        own = {name: [values[i]] for name, values in moments.items()}
        _launch_meta(beta, z, own, steps[i], rule, hp, meta_lr, meta_weight_decay)


def check(params: list[Tensor], base_rule, meta_rule) -> None:
    """ValueError, before any work, for a rule without a Triton form or a parameter on a CPU outside
    Triton's interpreter."""
    for role, rule in (("base", base_rule), ("meta", meta_rule)):
        if rule.direction not in RULE_IDS:
            raise ValueError(f"kernel='triton' has no Triton form of this {role} rule ({rule.direction.__name__}): "
                             "add a branch to metaopt.triton_kernel._direction, or use kernel='flat'")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for p in params:
        if p.device.type != "cuda" and not (interpreted and p.device.type == "cpu"):
            raise ValueError(f"kernel='triton' runs on CUDA tensors, and a parameter is on {p.device}: move the model "
                             "to a GPU, or use kernel='flat' or 'compiled' (on a CPU, Triton's interpreter runs it "
                             "when TRITON_INTERPRET=1 is set before triton is imported: for tests)")
