"""MetaOptimize: online learning of step sizes (Sharifnassab et al., ICML 2025).

The optimizer is a :class:`torch.optim.Optimizer`; its step is the Hessian-free 2x2
algorithm (Algorithm 3 of the paper) for any pair of a base rule and a meta rule from
:mod:`metaopt.rules`, with step sizes shared by blocks of weights. docs/algorithm.md gives
the equations of both variants (``standard`` and the authors' ``released`` code).
"""

from __future__ import annotations

import inspect
import math
from itertools import chain
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from metaopt import contiguous, distributed, hessian, hessian_free, hyperparameters, learned, plan, state
from metaopt.granularity import BLOCKS, GRANULARITIES, Placement, node_weights
from metaopt.kernels import KERNELS, Kernel
from metaopt.rules import BASES, METAS, VARIANTS, Rule  # noqa: F401  (BASES, METAS, VARIANTS: imported from here by the tests and the harness)

_OLD_DYNAMO = torch.torch_version.TorchVersion(torch.__version__) < (2, 13)



class MetaOptimize(Optimizer):
    r"""A base optimizer whose step sizes are learned online by a meta optimizer.

    Step sizes are :math:`\alpha_b = \mathrm{lr} \cdot e^{\beta_b}`, one :math:`\beta_b` per
    block ``b`` of weights. At every step, with :math:`g = \nabla f_t(w_t)` in ``p.grad`` and a
    trace :math:`h` per weight (zero at the start):

    .. math::
        \begin{aligned}
        z_b &= \textstyle\sum_{i \in b} h_i g_i
            && \text{meta-gradient, with the trace before this step} \\
        \Delta w &= -\alpha \, (d(g) + \kappa w), \quad w \leftarrow w + \Delta w
            && \text{base update, } d \text{ from the base rule, } \alpha \text{ before the meta update} \\
        h &\leftarrow \gamma (1 - \kappa \alpha) \, h + \Delta w
            && \text{trace} \\
        \beta_b &\leftarrow (1 - \eta \bar\kappa) \, \beta_b - \eta \, \bar d(z_b)
            && \text{meta update, } \bar d \text{ from the meta rule}
        \end{aligned}

    where :math:`d` and :math:`\bar d` are the directions of :mod:`metaopt.rules`
    (``adamw`` uses the ``adam`` direction; ``variant="released"`` the released code's rules). When the current gradient points against the
    past weight changes (:math:`z < 0`) the step size grows; when it agrees with them
    (overshooting) it shrinks.

    Args:
        params: parameters or param groups, as for any torch optimizer. Named parameters
            (``model.named_parameters()``) give readable names in :meth:`step_sizes`.
            Groups may set any hyper-parameter below except ``base``, ``meta``, ``blocks``
            and ``kernel``, and a ``block`` name (groups with the same ``block`` share one
            step size when ``blocks="param_group"``).
        base: ``"sgd"``, ``"sgdm"``, ``"rmsprop"``, ``"adamw"``, ``"lion"``, or a
            :class:`metaopt.rules.Rule`.
        meta: ``"sgd"``, ``"rmsprop"``, ``"adam"``, ``"lion"``.
        variant: ``"standard"`` (default: moment averages with bias correction, as torch.optim,
            so that with ``meta_lr=0`` each base is its torch optimizer) or ``"released"`` (the
            update of the authors' research code, which made the paper's figures: ``adamw`` and
            ``adam`` keep discounted sums of gradients, so the same ``alpha`` moves the weights up
            to ``1 / (1 - momentum)`` times further; ``sgdm`` steps with the momentum from before
            the step; ``eps`` defaults to 1e-10 inside the square root). See docs/algorithm.md.
        blocks: which weights share a step size: ``"scalar"`` (all), ``"param_group"``
            (each group, or each ``block`` name), ``"layerwise"`` (each tensor),
            ``"nodewise"`` (each output unit: a row of a weight together with the matching
            bias entry), ``"weightwise"`` (each weight). Groups that share a block must agree on
            its ``alpha0`` and meta hyper-parameters (``ValueError`` otherwise).
        lr: multiplies the learned step size (default 1.0), so that ``torch.optim.lr_scheduler``
            warm-ups and decays compose with it; the trace uses the product. It is not a step
            size: a number other than 1.0 at construction warns and names ``alpha0``.
        alpha0 (:math:`\alpha_0`): initial step size of every block, or ``"auto"`` (default):
            the step size whose first update moves the weights by 1% of their norm,
            :math:`r \lVert w \rVert / \lVert d(g) \rVert` with :math:`r = 10^{-2}` over the param
            group's parameters at their first step, estimated on the device (no host sync). The
            paper starts from 1e-6 and grows it for thousands of steps (docs/algorithm.md, section 14).
        meta_lr (:math:`\eta`): meta step size (default: the meta rule's, 1e-2 for the standard Adam
            and RMSProp metas, 3e-3 for Lion, 1e-3 for SGD and the released variant's sums; the
            paper's is 1e-3 with the released sums, which step up to 10x further).
        gamma (:math:`\gamma`): discount factor in [0, 1] (default 1.0).
        weight_decay (:math:`\kappa`): decoupled weight decay of the base update
            (default 0.1, the paper's value; 0 for ``sgd`` and ``sgdm``, as torch.optim.SGD).
        momentum (:math:`\rho`), normalizer (:math:`\lambda`), lion_interp (:math:`c`),
            eps (:math:`\epsilon`): the base rule's hyper-parameters; defaults of the paper's
            Tables 2-4: sgdm ``momentum=0.9``; rmsprop ``normalizer=0.999``; adamw
            ``momentum=0.9, normalizer=0.999``; lion ``momentum=0.99, lion_interp=0.9``;
            ``eps=1e-8``.
        meta_momentum (:math:`\bar\rho`), meta_normalizer (:math:`\bar\lambda`),
            meta_lion_interp (:math:`\bar c`), meta_eps: the same for the meta rule.
        meta_weight_decay (:math:`\bar\kappa`): weight decay of ``beta`` towards 0, i.e. of the
            step sizes towards 1 (default 0, as in every experiment of the paper).
        kernel: ``"flat"`` (default; the state of each param group in a few flat buffers, so
            that a step dispatches the same ~30 ops however many tensors the model has: the
            fastest where steps are bound by launches and Python, as on a GPU; on a CPU, param
            groups whose tensors average over 131,072 elements run ``foreach``, which moves fewer
            bytes; see :mod:`metaopt.plan`), ``"foreach"`` (multi-tensor ``torch._foreach_*``
            ops on each tensor's own state), ``"compiled"`` (the
            ``foreach`` update compiled by ``torch.compile``, one graph per param group: the fastest
            steps on a CPU after a first step that compiles, 4-13 s for ResNet-18; needs a
            working Inductor), ``"triton"`` (each flat segment's step in two Triton launches, one pass
            over its memory: :mod:`metaopt.triton_kernel`; CUDA tensors, or a CPU under Triton's
            interpreter) or ``"reference"`` (one tensor at a time, the equations as written
            above). See :mod:`metaopt.kernels`.
        storage: ``"separate"`` (default: each parameter and gradient keeps its own tensor) or
            ``"contiguous"``: at the first step each param group's parameters (per device and dtype)
            become views of one flat buffer and their gradients views of one flat gradient buffer,
            which ``backward`` accumulates into and :meth:`zero_grad` zeroes in place, so that the
            step reads and writes them where they are, with no copies (:mod:`metaopt.contiguous`).
            Every kernel then runs on the flat buffers, on a CPU too.
        approx: ``"hessian_free"`` (default; the step above), ``"l"`` or ``"2x2"`` (the trace
            keeps the Hessian term and the traces of the base moments: docs/algorithm.md, see
            :mod:`metaopt.hessian`; :meth:`step` then needs a closure that calls
            ``loss.backward(create_graph=True)``), or a :class:`metaopt.hessian.Approximation`.

        skip_nonfinite: if a gradient holds a NaN or an infinity, skip the whole step (weights,
            moments, traces and step sizes keep their values), as ``torch.amp.GradScaler`` does,
            without reading anything back to the host; costs one copy of the weights and the
            optimizer state per step. Without it (the default) one non-finite gradient entry makes
            the weights and the step sizes non-finite: the trainer of this repository stops there.

        learn: the hyper-parameters learned online (default ``("step_size",)``: the step sizes alone).
            ``"step_size"`` and any of the base rule's ``"weight_decay"``, ``"momentum"``,
            ``"normalizer"``, ``"eps"`` (Lion's ``momentum`` and ``lion_interp`` enter through a sign and
            are refused), each per block as the step sizes, from its keyword's value: a positive one as
            :math:`e^{b}`, one in (0, 1) as :math:`\mathrm{sigmoid}(b)`, with a Hessian-free trace
            :math:`X_k \leftarrow \gamma J_x F \cdot X_k + \partial F / \partial b_k` of the base state
            and its own meta state (:mod:`metaopt.learned`, docs/algorithm.md section 16). Costs one
            parameter-sized trace per learned hyper-parameter, two for ``momentum`` and ``normalizer``,
            and keeps the state per tensor (no flat buffers). Read the values with
            :meth:`meta_parameters` and :meth:`meta_parameter`. ``approx="hessian_free"`` only.

        **rule_hyperparameters: the hyper-parameters of a rule added to :mod:`metaopt.rules`
            beyond the keywords above (``meta_<name>`` for the meta rule's).

    A keyword that the chosen base or meta rule does not use raises ``ValueError``, and so does a
    value outside the range the rule allows (:mod:`metaopt.hyperparameters`). Refused before any
    work, naming the parameter and the fix: a complex parameter (``TypeError``, at construction), a
    sparse gradient (``TypeError``), a negative or non-finite ``lr``, float or tensor, and a
    parameter whose dtype or shape changed since its state was made (``ValueError``, at the step).
    Zero-element parameters are skipped.

    State: ``state[p]["trace"]`` is the trace of ``p`` (``trace_<k>`` and ``trace_<k>_<moment>`` those of a
    learned hyper-parameter ``k``, whose blocks keep ``beta_<k>`` and ``meta_<moment>_<k>``); ``state[p]["step"]`` counts its
    updates; the base rule's moments are ``exp_avg`` / ``exp_avg_sq``. Each block keeps
    ``beta``, ``meta_step`` and the meta rule's moments (``meta_exp_avg``,
    ``meta_exp_avg_sq``): in ``state[p]`` for the per-tensor granularities, in the param
    group for ``param_group`` and in the first param group for ``scalar``.
    :meth:`step` never reads a tensor back to the host.

    References:
        A. Sharifnassab, S. Salehkaleybar, R. Sutton. MetaOptimize: A Framework for
        Optimizing Step Sizes and Other Meta-parameters. ICML 2025.
    """

    def __init__(
        self,
        params: Iterable,
        base: str | Rule = "adamw",
        meta: str = "adam",
        blocks: str = "scalar",
        *,
        variant: str = "standard",
        lr: float | Tensor = 1.0,
        alpha0: float | str = "auto",
        meta_lr: float | None = None,
        gamma: float = 1.0,
        weight_decay: float | None = None,
        momentum: float | None = None,
        normalizer: float | None = None,
        lion_interp: float | None = None,
        eps: float | None = None,
        meta_momentum: float | None = None,
        meta_normalizer: float | None = None,
        meta_lion_interp: float | None = None,
        meta_eps: float | None = None,
        meta_weight_decay: float = 0.0,
        kernel: str = "flat",
        storage: str = "separate",
        approx: str | hessian.Approximation = "hessian_free",
        skip_nonfinite: bool = False,
        learn: tuple[str, ...] = ("step_size",),
        **rule_hyperparameters: float,
    ):
        self.base_rule, self.meta_rule = hyperparameters.rules_of(base, meta, variant)
        hyperparameters.check_choice("blocks", blocks, BLOCKS)
        hyperparameters.check_choice("kernel", kernel, KERNELS)
        hyperparameters.check_choice("storage", storage, contiguous.STORAGES)
        self.storage = storage
        self.base, self.meta, self.granularity, self.kernel, self.variant = base, meta, blocks, kernel, variant  # blocks= is the public name
        if skip_nonfinite and approx != "hessian_free":
            raise ValueError("skip_nonfinite=True is implemented for approx='hessian_free'; check the loss in your "
                             "closure instead for approx='l' or '2x2'")
        self.skip_nonfinite = skip_nonfinite
        self.approx = hessian.resolve(approx, blocks)
        self.learn = hyperparameters.check_learn(learn, self.base_rule, self._base_name(), self.approx.kind)
        self._learned = learned.specs(self.learn, self.base_rule)
        if self._learned and (storage != "separate" or kernel == "triton"):
            raise ValueError(f"learn={self.learn!r} keeps each tensor's state apart (metaopt.learned): use "
                             f"storage='separate' and a kernel other than 'triton' (got storage={storage!r}, "
                             f"kernel={kernel!r}), or learn=('step_size',)")
        known = [p for p in inspect.signature(MetaOptimize).parameters if p != "rule_hyperparameters"]
        hyperparameters.check_keywords(rule_hyperparameters, self.base_rule, known)
        given = {
            "weight_decay": weight_decay, "momentum": momentum, "normalizer": normalizer, "lion_interp": lion_interp,
            "eps": eps, "meta_momentum": meta_momentum, "meta_normalizer": meta_normalizer,
            "meta_lion_interp": meta_lion_interp, "meta_eps": meta_eps,
            **rule_hyperparameters,  # those of a rule added to metaopt.rules beyond the keywords above
        }
        driver = {"lr": lr, "alpha0": alpha0, "meta_lr": meta_lr, "gamma": gamma, "meta_weight_decay": meta_weight_decay}
        defaults = hyperparameters.defaults(driver, given, self.base_rule, self.meta_rule, self._base_name(), meta)
        hyperparameters.check_learned_values(defaults, self.learn, self.base_rule, "")
        hyperparameters.warn_if_lr_is_a_step_size(lr, "")
        self._placements: dict[int, Placement] = {}  # id(p) -> where its step sizes live
        self._mesh_slots: dict[int, int] = {}  # blocks summed over a device mesh (metaopt.distributed)
        self._kernels: list[Kernel] = []  # per param group
        self._cached_plan: plan.Plan | None = None  # the last step's plan, see _plan
        self._checked_lrs: dict[int, Any] = {}  # param group -> its lr last checked (hyperparameters.check_lrs)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # a copy: the group gets the defaults and the block state, and the caller's dict stays as it was,
        # so that the same list of groups can build another optimizer
        param_group = dict(param_group)
        index = len(self.param_groups)
        hyperparameters.check_param_group(param_group, index, self.defaults, self.base_rule, self.meta_rule,
                                          self._base_name(), self.meta)
        hyperparameters.check_learned_values(param_group, self.learn, self.base_rule, f" of param group {index}")
        super().add_param_group(param_group)
        kernel = KERNELS[self.kernel]()
        try:
            plan.check_params(self.param_groups[-1], index)
            if kernel.check is not None:
                kernel.check(self.param_groups[-1]["params"], self.base_rule, self.meta_rule)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        self._placements = self._place()
        try:
            plain_only = ("kernel='triton'" if kernel.fused_update is not None
                          else "storage='contiguous'" if self.storage == "contiguous"
                          else f"learn={self.learn!r}" if self._learned else None)
            plan.check_layouts(self.param_groups, self._placements, self.approx.kind, self.skip_nonfinite, plain_only)
        except ValueError:
            self.param_groups.pop()
            self._placements = self._place()
            raise
        hyperparameters.check_shared_blocks(self._placements, self.param_groups, self.meta_rule,
                                            GRANULARITIES[self.granularity].shares, self.granularity,
                                            tuple(spec.name for spec in self._learned))
        self._kernels.append(kernel)
        self._cached_plan = None
        self._checked_lrs[index] = hyperparameters.lr_mark(self.param_groups[-1]["lr"])

    # -- pickling and checkpoints ---------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {
            **super().__getstate__(),
            "base": self.base,
            "meta": self.meta,
            "granularity": self.granularity,
            "kernel": self.kernel,
            "storage": self.storage,
            "variant": self.variant,
            "skip_nonfinite": self.skip_nonfinite,
            "approx": self.approx,
            "base_rule": self.base_rule,
            "meta_rule": self.meta_rule,
            "learn": self.learn,
        }

    def __setstate__(self, pickled: dict[str, Any]) -> None:
        if "blocks" in pickled:  # pickled before the attribute was named granularity
            pickled["granularity"] = pickled.pop("blocks")
        pickled.setdefault("storage", "separate")  # pickled before there was a choice
        # load_state_dict passes the state alone; a pickle from before learn=(...) learned the step sizes alone
        pickled.setdefault("learn", getattr(self, "learn", ("step_size",)))
        super().__setstate__(pickled)
        self._learned = learned.specs(self.learn, self.base_rule)
        self._placements = self._place()
        self._kernels = [KERNELS[self.kernel]() for _ in self.param_groups]
        self._cached_plan, self._checked_lrs = None, {}

    def state_dict(self) -> dict[str, Any]:
        """The torch state dict, with the configuration under ``"metaoptimize"``, at the top and in the first
        param group: ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` keeps only
        ``state`` and ``param_groups``, so that is where a distributed checkpoint carries it."""
        state_dict = super().state_dict()
        state_dict["metaoptimize"] = self._configuration()
        if state_dict["param_groups"]:
            state_dict["param_groups"][0]["metaoptimize"] = state_dict["metaoptimize"]
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (also one rebuilt by ``torch.distributed.checkpoint``); the meta state
        keeps its float32 precision and moves to the params' device."""
        saved_groups = state_dict.get("param_groups") or [{}]
        saved = state_dict.get("metaoptimize", saved_groups[0].get("metaoptimize"))
        state_dict = {**state_dict, "param_groups": [{k: v for k, v in group.items() if k != "metaoptimize"}
                                                      for group in state_dict.get("param_groups", [])]}
        current = self._configuration()
        if saved is None:
            raise ValueError(
                "this state dict was not saved by MetaOptimize (it has no 'metaoptimize' entry): load it into the "
                f"optimizer that saved it; MetaOptimize({current}) can only resume its own state_dict()"
            )
        if saved != current:
            raise ValueError(f"this checkpoint was saved by MetaOptimize({saved}), not MetaOptimize({current})")
        state.check_checkpoint_shapes(state_dict, self.param_groups, self.base_rule.moment_names)
        kept, meta_state = state.without_meta_keys(state_dict["state"])
        super().load_state_dict({**{k: v for k, v in state_dict.items() if k != "metaoptimize"}, "state": kept})
        self._cached_plan = None  # the loaded state is in tensors of its own: a flat layout gathers it again
        state.restore_meta_keys(meta_state, state_dict["param_groups"], self.param_groups, self.state)

    def _configuration(self) -> dict[str, str]:
        configuration = {"base": self._base_name(), "meta": self.meta, "blocks": self.granularity}
        if self.variant != "standard":
            configuration["variant"] = self.variant
        if self.approx.kind != "hessian_free":
            configuration["approx"] = self.approx.kind
        if self._learned:
            configuration["learn"] = list(self.learn)
        return configuration

    def _base_name(self) -> str:
        return self.base if isinstance(self.base, str) else "custom"

    # -- blocks ---------------------------------------------------------------------------

    def _place(self) -> dict[int, Placement]:
        """Computed whenever the param groups change, not lazily in ``step``: attributes set
        inside ``step`` would break ``torch.compile(optimizer.step)`` on some torch versions."""
        layout: dict[int, Placement] = {}
        first_group_of_block: dict[str, int] = {}
        granularity = GRANULARITIES[self.granularity]
        biases = node_weights(self.param_groups) if granularity.pairs_biases else {}
        for index, group in enumerate(self.param_groups):
            owner_group = first_group_of_block.setdefault(group.get("block", f"group{index}"), index)
            for p in group["params"]:
                layout[id(p)] = granularity.place(p, index, owner_group, biases)
        # Numbered here, in eager Python: step() groups by number, which torch.compile traces
        # exactly (ids of dicts, or of one tensor reached two ways, it does not on every version).
        numbers: dict[int, int] = {}
        for key, block in layout.items():
            owner = ("group", block.owner) if isinstance(block.owner, int) else id(block.owner)
            layout[key] = block._replace(number=numbers.setdefault(owner, len(numbers)))
        self._mesh_slots = distributed.reduced_blocks(self.param_groups, layout, granularity.segment_kind in ("one", "tensor"))
        return layout

    def _owner_state(self, owner) -> dict[str, Any]:
        return self.param_groups[owner] if isinstance(owner, int) else self.state[owner]

    def _init_states(self, params: list[Tensor], trace_columns: int = 1) -> None:
        """The state of each parameter and of its block, created at the parameter's first step (:mod:`metaopt.state`)."""
        state.init_states(params, self.state, self._placements, self.param_groups, self._owner_state,
                          self.base_rule, self.meta_rule, self.approx, trace_columns)
        if self._learned:
            learned.init_states(params, self.state, self._placements, self.param_groups, self._owner_state,
                                self._learned, self.meta_rule.moment_names)

    # -- the step -----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, hessian_diagonal: dict[Tensor, Tensor] | None = None):
        """Perform one MetaOptimize step (base update, trace, meta update).

        Args:
            closure: re-evaluates the model and returns the loss (optional; with approx ``"l"`` or
                ``"2x2"`` required, and it must call ``loss.backward(create_graph=True)``).
            hessian_diagonal: ``{p: diagonal of the Hessian for p}`` when it is known, for
                approx ``"l"`` / ``"2x2"`` with ``hessian="diagonal"`` (then no closure is needed).
        """
        if self.approx.kind != "hessian_free":
            return self._step_keeping_hessian(closure, hessian_diagonal)
        if hessian_diagonal is not None:
            raise ValueError("hessian_diagonal is used by approx='l' or '2x2' with hessian='diagonal'; this optimizer is Hessian-free")
        if self.granularity == "nodewise" and torch.compiler.is_compiling() and _OLD_DYNAMO:
            raise RuntimeError(
                "torch.compile of MetaOptimize.step with blocks='nodewise' computes wrong meta-gradients on "
                f"torch {torch.__version__} (seen on 2.11; right on 2.13 and later): upgrade torch, or leave the step "
                "uncompiled and pass kernel='compiled', which compiles the update alone and is right there"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not torch.compiler.is_compiling():  # a traced step reads its lr where it is traced
            hyperparameters.check_lrs(self.param_groups, self._checked_lrs)
        if self.skip_nonfinite:
            self._step_unless_nonfinite()
        else:
            hessian_free.step(self._plan(), self.param_groups, self._kernels, self.base_rule, self.meta_rule)
        return loss

    def _step_keeping_hessian(self, closure: Callable[[], Any] | None, hessian_diagonal: dict[Tensor, Tensor] | None):
        """approx ``"l"`` / ``"2x2"``: :func:`metaopt.hessian.step` on plain lists of the parameters
        with gradients and of every step-size block, with their state."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()  # builds the gradients' graph for the Hessian-vector products
        if not any(p.grad is not None for group in self.param_groups for p in group["params"]):
            return loss
        plan.check_step_inputs(self.param_groups, [(index, [p for p in group["params"] if p.grad is not None])
                                                   for index, group in enumerate(self.param_groups)], self.state)
        layout = self._placements
        # zero-element parameters have nothing to update: left out, with the blocks only they hold
        everything = [p for group in self.param_groups for p in group["params"] if p.numel()]
        numbered = {layout[id(p)].number: layout[id(p)] for p in everything}
        index_of = {number: index for index, number in enumerate(sorted(numbered))}  # Param.block: index in blocks
        blocks = [numbered[number] for number in sorted(numbered)]
        # every block's state, also of blocks without a gradient this step: each is a column of H
        self._init_states(everything, hessian.trace_columns(self.approx, len(blocks)))
        groups = [
            (group, [hessian.Param(p, self.state[p], index_of[layout[id(p)].number], layout[id(p)].view_shape)
                     for p in group["params"] if p.grad is not None and p.numel()])
            for group in self.param_groups
        ]
        hessian.step(
            self.approx, groups,
            [hessian.StepSizeBlock(self._owner_state(block.owner), self.param_groups[block.meta_group]) for block in blocks],
            base_rule=self.base_rule, meta_rule=self.meta_rule,
            closure_given=closure is not None, hessian_diagonal=hessian_diagonal,
        )
        return loss

    def _step_unless_nonfinite(self) -> None:
        """The step, then every tensor it wrote put back where a gradient was not finite (no host sync)."""
        groups = [[p for p in group["params"] if p.grad is not None] for group in self.param_groups]
        params = list(chain.from_iterable(groups))
        if not params:
            return
        step_plan = self._plan()  # creates the state and the flat buffers, so that they are in the copy
        finite = torch.stack([p.grad.isfinite().all() for p in params]).all()
        written = list(params)
        for p in params:
            written += [value for value in self.state[p].values() if isinstance(value, Tensor)]
        for group in self.param_groups:
            written += [value for key, value in group.items() if state.is_meta_key(key) and isinstance(value, Tensor)]
        before = [tensor.clone() for tensor in written]
        hessian_free.step(step_plan, self.param_groups, self._kernels, self.base_rule, self.meta_rule)
        for tensor, old in zip(written, before):
            tensor.copy_(torch.where(finite, tensor, old))

    def _plan(self) -> plan.Plan:
        """The plan of this step (:mod:`metaopt.plan`), with the state of every parameter with a
        gradient created; kept while the parameters with gradients and their shapes and dtypes stay the
        same (:func:`metaopt.plan.signature`; built at every traced step under torch.compile, where it
        stays per tensor). A new plan is built after :func:`metaopt.plan.check_step_inputs`."""
        groups = [(index, [p for p in group["params"] if p.grad is not None]) for index, group in enumerate(self.param_groups)]
        groups = [(index, params) for index, params in groups if params]
        compiling = torch.compiler.is_compiling()
        key = (tuple((index, tuple(map(id, params))) for index, params in groups), None if compiling else plan.signature(groups))
        cached = self._cached_plan
        if cached is not None and cached.key == key and not compiling:
            return cached
        plan.check_step_inputs(self.param_groups, groups, self.state)
        # zero-element parameters have nothing to update (and no rows or weights to hold step sizes)
        groups = [(index, [p for p in params if p.numel()]) for index, params in groups]
        groups = [(index, params) for index, params in groups if params]
        fresh = {id(p) for _, params in groups for p in params if "trace" not in self.state[p]}
        for _, params in groups:
            self._init_states(params)
        granularity = GRANULARITIES[self.granularity]
        context = plan.Context(
            self.param_groups, self.state, self._placements, self._owner_state, granularity.segment_kind,
            # learned hyper-parameters beyond the step size keep per-tensor state (metaopt.learned)
            (self._kernels[0].flat or self.storage == "contiguous") and not compiling and not self._learned,
            self.base_rule.moment_names, self.meta_rule.moment_names, always_flat=self.storage == "contiguous",
            mesh=distributed.mesh_of(self.param_groups), slots=self._mesh_slots,
        )
        built = plan.build(context, groups, key, fresh, None if compiling else cached)
        if self.storage == "contiguous" and not compiling:
            built = contiguous.adopt(built, chunk=self._kernels[0].fused_update is None)
        if self._learned:
            built = built._replace(learned=learned.build(context, groups, key, fresh, self._learned))
        if not compiling:
            self._cached_plan = built
        return built

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """Reset the gradients: set them to None, or with ``storage="contiguous"`` (when ``set_to_none``
        is not given) zero them in place, so that they stay views of the flat gradient buffers."""
        super().zero_grad(set_to_none=self.storage != "contiguous" if set_to_none is None else set_to_none)

    @property
    def blocks(self) -> str:
        """The ``blocks=`` argument: the granularity of the step sizes."""
        return self.granularity

    # -- reading the step sizes -----------------------------------------------------------

    def step_size(self, p: Tensor) -> Tensor:
        """The current step size ``lr * exp(beta)`` of ``p``, broadcastable to ``p`` (no host sync).
        For a sharded ``DTensor`` parameter with ``nodewise`` or ``weightwise`` blocks, those of the whole
        parameter, gathered from every rank: a collective, to be called on every rank."""
        block = self._placements[id(p)]
        owner_state = self._owner_state(block.owner)
        view_shape = distributed.global_view_shape(block.view_shape, p)
        if "beta" in owner_state:
            alpha = self.approx.sigma(distributed.full(owner_state["beta"])).view(view_shape)
        else:  # before the block's first step; alpha0="auto" is estimated there: NaN until then
            alpha0 = self.param_groups[block.meta_group]["alpha0"]
            alpha0 = math.nan if alpha0 == "auto" else alpha0
            alpha = torch.full(view_shape, alpha0, dtype=hyperparameters.meta_dtype(p.dtype), device=p.device)
        return self.param_groups[block.group]["lr"] * alpha

    def step_sizes(self) -> dict[str, float]:
        """Step sizes for logging: one entry per block for ``scalar``, ``param_group`` and
        ``layerwise``; ``/min``, ``/median``, ``/max`` per tensor for ``nodewise`` and
        ``weightwise``. Reads the values back to the host once (call it when logging; on every rank
        when those blocks are of sharded parameters, see :meth:`step_size`).
        """
        return self._logged(("step_size",))

    def meta_parameter(self, p: Tensor, name: str) -> Tensor:
        """The current value of the learned hyper-parameter ``name`` (one of ``learn``) of ``p``,
        broadcastable to ``p`` (no host sync); ``"step_size"`` is :meth:`step_size`."""
        if name not in self.learn:
            raise ValueError(f"{name!r} is not learned by this optimizer: learn={self.learn!r}")
        if name == "step_size":
            return self.step_size(p)
        block = self._placements[id(p)]
        owner_state = self._owner_state(block.owner)
        if f"beta_{name}" in owner_state:  # after the block's first step
            spec = next(spec for spec in self._learned if spec.name == name)
            return spec.value(owner_state[f"beta_{name}"]).view(block.view_shape)
        initial = self.param_groups[block.meta_group][name]
        return torch.full(block.view_shape, initial, dtype=hyperparameters.meta_dtype(p.dtype), device=p.device)

    def meta_parameters(self) -> dict[str, float]:
        """Every learned hyper-parameter's current values for logging, named as :meth:`step_sizes` names
        the step sizes (``weight_decay``, ``weight_decay/<param>``, ``momentum/<param>/median`` ...); a float
        per block and learned hyper-parameter for ``scalar`` blocks. Reads the values back to the host once."""
        return self._logged(self.learn)

    def _logged(self, learned_names: tuple[str, ...]) -> dict[str, float]:
        """The values of the learned hyper-parameters ``learned_names``, per block or as each tensor's range."""
        names, values = [], []
        seen: set[tuple] = set()
        granularity = GRANULARITIES[self.granularity]
        for index, group in enumerate(self.param_groups):
            param_names = group.get("param_names") or [f"group{index}.param{j}" for j in range(len(group["params"]))]
            for p, param_name in zip(group["params"], param_names):
                if granularity.logs_range and not p.numel():
                    continue  # a zero-element parameter has no step sizes of its own
                owner = self._placements[id(p)].owner
                key = ("group", owner) if isinstance(owner, int) else ("param", id(owner))
                if key in seen:
                    continue
                seen.add(key)
                logged_as = granularity.logged_as.format(block=group.get("block", f"group{index}"), param=param_name)
                for name in learned_names:
                    value = self.meta_parameter(p if isinstance(owner, int) else owner, name).float()
                    logged_name = name + logged_as[len("step_size"):]
                    if granularity.logs_range:
                        names += [f"{logged_name}/{stat}" for stat in ("min", "median", "max")]
                        values += [value.min(), value.median(), value.max()]
                    else:
                        names.append(logged_name)
                        values.append(value.reshape(()))
        if not values:
            return {}
        return dict(zip(names, torch.stack([v.to(values[0].device) for v in values]).tolist()))

    def __repr__(self) -> str:
        head = (
            f"MetaOptimize(base={self._base_name()!r}, meta={self.meta!r}, blocks={self.granularity!r}, "
            f"variant={self.variant!r}, kernel={self.kernel!r}, storage={self.storage!r})"
        )
        return head + super().__repr__()[len(type(self).__name__) :]
