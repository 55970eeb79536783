"""MetaOptimize: online learning of step sizes (Sharifnassab et al., ICML 2025).

The optimizer is a :class:`torch.optim.Optimizer`; its step is the Hessian-free 2x2
algorithm (Algorithm 3 of the paper) for any pair of a base rule and a meta rule from
:mod:`metaopt.rules`, with step sizes shared by blocks of weights. docs/algorithm.md gives
the equations of both variants (``standard`` and the authors' ``released`` code).
"""

from __future__ import annotations

import difflib
import inspect
import math
import warnings
from itertools import chain
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from metaopt import flat, hessian
from metaopt.granularity import BLOCKS, GRANULARITIES, Block, node_weights
from metaopt.kernels import KERNELS, Kernel
from metaopt.rules import BASES, METAS, RULES, VARIANTS, Rule

_OLD_DYNAMO = torch.torch_version.TorchVersion(torch.__version__) < (2, 13)



def _is_meta_key(key: str) -> bool:
    """Keys kept in float32 (or wider) whatever the parameter's dtype, so that a bf16 model
    still learns its step sizes precisely: the step counters and the whole meta state."""
    return key in ("step", "beta") or key.startswith("meta_")

# The keys each block takes from one param group (its meta group): the block's initial step size
# and its meta update (with the meta rule's hyper-parameters). Groups that share a block must agree on them.
BLOCK_KEYS = ("alpha0", "meta_lr", "meta_weight_decay")
# alpha0 outside this range under- or overflows exp(beta) in float32 at once (step size 0 or inf)
ALPHA0_RANGE = (1e-30, 1e3)
# alpha0="auto": the first step moves the weights by this fraction of their norm. The estimate is
# kept in [AUTO_ALPHA0_FLOOR, ALPHA0_RANGE[1]]; the floor, the paper's alpha0, is where it ends up when
# the weights are all zero or the first gradients are (then the meta update grows it as in the paper).
AUTO_FIRST_MOVE = 1e-2
AUTO_ALPHA0_FLOOR = 1e-6
# Keywords of other optimizers that users pass out of habit, and what MetaOptimize calls them
_OTHER_OPTIMIZERS_KEYWORDS = {
    "betas": "MetaOptimize takes AdamW's betas as momentum= (beta1) and normalizer= (beta2)",
    "learning_rate": "MetaOptimize learns its step size: alpha0= is where it starts ('auto' by default)",
    "initial_lr": "MetaOptimize learns its step size: alpha0= is where it starts ('auto' by default)",
}
# The driver's hyper-parameters (the rules carry theirs): (lowest, highest, whether the highest is allowed)
_RANGES = {
    "weight_decay": (0.0, math.inf, False),
    "meta_weight_decay": (0.0, math.inf, False),
    "gamma": (0.0, 1.0, True),
    "meta_lr": (0.0, math.inf, False),
    "lr": (0.0, math.inf, False),
}


def _step_sizes(lr: float | Tensor, beta: Tensor) -> Tensor:
    """``lr * exp(beta)``; the product skipped for the default ``lr`` of 1.0, exactly equal."""
    if isinstance(lr, float) and lr == 1.0:
        return torch.exp(beta)
    return lr * torch.exp(beta)


def _meta_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _warn_if_lr_is_a_step_size(lr: float | Tensor, where: str) -> None:
    """``lr`` multiplies the learned step size: ``lr=1e-3`` out of habit would give steps of 1e-3 times it."""
    if isinstance(lr, (int, float)) and lr != 1.0:
        warnings.warn(
            f"MetaOptimize got lr={lr!r}{where}: lr multiplies the learned step size (a scheduler's handle, "
            f"1.0 by default), it is not a step size. To start from a step size of {lr!r}, pass alpha0={lr!r} "
            "and leave lr at 1.0",
            UserWarning,
            stacklevel=3,
        )


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
            bytes; see :mod:`metaopt.flat`), ``"foreach"`` (multi-tensor ``torch._foreach_*``
            ops on each tensor's own state), ``"compiled"`` (the
            ``foreach`` update compiled by ``torch.compile``, one graph per param group: the fastest
            steps on a CPU after a first step that compiles, 4-13 s for ResNet-18; needs a
            working Inductor) or ``"reference"`` (one tensor at a time, the equations as written
            above). See :mod:`metaopt.kernels`.
        approx: ``"hessian_free"`` (default; the step above), ``"l"`` or ``"2x2"`` (the trace
            keeps the Hessian term and the traces of the base moments: docs/algorithm.md, see
            :mod:`metaopt.hessian`; :meth:`step` then needs a closure that calls
            ``loss.backward(create_graph=True)``), or a :class:`metaopt.hessian.Approximation`.

        skip_nonfinite: if a gradient holds a NaN or an infinity, skip the whole step (weights,
            moments, traces and step sizes keep their values), as ``torch.amp.GradScaler`` does,
            without reading anything back to the host; costs one copy of the weights and the
            optimizer state per step. Without it (the default) one non-finite gradient entry makes
            the weights and the step sizes non-finite: the trainer of this repository stops there.

        **rule_hyperparameters: the hyper-parameters of a rule added to :mod:`metaopt.rules`
            beyond the keywords above (``meta_<name>`` for the meta rule's).

    A keyword that the chosen base or meta rule does not use raises ``ValueError``, and so does a
    value outside the range the rule allows.

    State: ``state[p]["trace"]`` is the trace of ``p``; ``state[p]["step"]`` counts its
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
        approx: str | hessian.Approximation = "hessian_free",
        skip_nonfinite: bool = False,
        **rule_hyperparameters: float,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}: variant must be one of {list(VARIANTS)}")
        base_rules, meta_rules = VARIANTS[variant]
        if isinstance(base, Rule):
            self.base_rule = base
        elif base in base_rules:
            self.base_rule = RULES[base_rules[base]]
        else:
            raise ValueError(f"unknown base {base!r}: base must be one of {sorted(BASES)} or a metaopt.rules.Rule")
        if meta not in meta_rules:
            raise ValueError(f"unknown meta {meta!r}: meta must be one of {sorted(METAS)}")
        if blocks not in BLOCKS:
            raise ValueError(f"unknown blocks {blocks!r}: blocks must be one of {list(BLOCKS)}")
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}: kernel must be one of {list(KERNELS)}")
        self.base, self.meta, self.blocks, self.kernel, self.variant = base, meta, blocks, kernel, variant
        if skip_nonfinite and approx != "hessian_free":
            raise ValueError("skip_nonfinite=True is implemented for approx='hessian_free'; check the loss in your "
                             "closure instead for approx='l' or '2x2'")
        self.skip_nonfinite = skip_nonfinite
        self.meta_rule = RULES[meta_rules[meta]]
        self.approx = hessian.resolve(approx, blocks)
        for key in rule_hyperparameters:
            name = key[len("meta_") :] if key.startswith("meta_") else key
            if key in _OTHER_OPTIMIZERS_KEYWORDS:
                raise TypeError(f"MetaOptimize got an unexpected keyword argument {key!r}: {_OTHER_OPTIMIZERS_KEYWORDS[key]}")
            if not any(name in rule.hyperparameters for rule in (*RULES.values(), self.base_rule)):
                known = [p for p in inspect.signature(MetaOptimize).parameters if p != "rule_hyperparameters"]
                close = difflib.get_close_matches(key, known, n=1)
                raise TypeError(f"MetaOptimize got an unexpected keyword argument {key!r}"
                                + (f": did you mean {close[0]!r}?" if close else ""))

        given = {
            "weight_decay": weight_decay,
            "momentum": momentum,
            "normalizer": normalizer,
            "lion_interp": lion_interp,
            "eps": eps,
            "meta_momentum": meta_momentum,
            "meta_normalizer": meta_normalizer,
            "meta_lion_interp": meta_lion_interp,
            "meta_eps": meta_eps,
            **rule_hyperparameters,  # those of a rule added to metaopt.rules beyond the keywords above
        }
        defaults = {
            "lr": lr,
            "alpha0": alpha0,
            "meta_lr": self.meta_rule.meta_lr if meta_lr is None else meta_lr,
            "gamma": gamma,
            "meta_weight_decay": meta_weight_decay,
            **self._rule_defaults(),
        }
        for key, value in given.items():
            if value is None:
                continue
            if key not in defaults:
                raise ValueError(self._not_applicable(key))
            defaults[key] = value
        self._check(defaults, "")
        _warn_if_lr_is_a_step_size(lr, "")
        self._block_layout: dict[int, Block] = {}
        self._kernels: list[Kernel] = []  # per param group
        # per param group: (ids of the parameters with gradients, their flat partitions), see _prepare
        self._partitions: dict[int, tuple[tuple[int, ...], list]] = {}
        self._nodes: tuple[tuple, flat.Nodes | None] | None = None  # the same for blocks="nodewise"
        super().__init__(params, defaults)

    # -- hyper-parameters ---------------------------------------------------------------

    def _rule_defaults(self) -> dict[str, float]:
        """The hyper-parameters the chosen rules use, with the paper's defaults."""
        defaults = {"weight_decay": self.base_rule.weight_decay, **self.base_rule.hyperparameters}
        defaults.update({f"meta_{key}": value for key, value in self.meta_rule.hyperparameters.items()})
        return defaults

    def _not_applicable(self, key: str) -> str:
        if key.startswith("meta_"):
            users = [m for m, r in METAS.items() if key[len("meta_") :] in RULES[r].hyperparameters]
            return f"{key} does not apply to meta {self.meta!r}; it applies to meta in {users}"
        users = [b for b, r in BASES.items() if key in RULES[r].hyperparameters]
        return f"{key} does not apply to base {self._base_name()!r}; it applies to base in {users}"

    def _check(self, hyperparameters: dict[str, Any], where: str) -> None:
        """Raise ValueError naming the argument and its allowed values."""
        alpha0 = hyperparameters.get("alpha0")
        low, high = ALPHA0_RANGE
        if alpha0 is not None and alpha0 != "auto" and not (
            isinstance(alpha0, (int, float)) and not isinstance(alpha0, bool) and low <= alpha0 <= high
        ):
            raise ValueError(
                f"alpha0{where} must be a number in [{low}, {high}] (outside it exp(beta) is 0 or inf in float32) "
                f"or 'auto', got {alpha0!r}"
            )
        for key, value in hyperparameters.items():
            if key in _RANGES:
                allowed = _RANGES[key]
            elif key.startswith("meta_"):
                allowed = self.meta_rule.range_of(key[len("meta_") :])
            else:
                allowed = self.base_rule.range_of(key)
            if allowed is None or isinstance(value, Tensor):
                continue
            low, high, high_allowed = allowed
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not (low <= value < high or (high_allowed and value == high))
            ):
                interval = f"({0.0}, {high})" if low == math.ulp(0.0) else f"[{low}, {high}{']' if high_allowed else ')'}"
                raise ValueError(f"{key}{where} must be in {interval}, got {value!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # a copy: the group gets the defaults and the block state, and the caller's dict stays as it was,
        # so that the same list of groups can build another optimizer
        param_group = dict(param_group)
        reserved = {"base", "meta", "blocks", "kernel"} & param_group.keys()
        if reserved:
            raise ValueError(f"{sorted(reserved)} cannot differ between param groups; pass them to MetaOptimize(...)")
        rule_keys = {"weight_decay", *chain.from_iterable(rule.hyperparameters for rule in RULES.values())}
        rule_keys |= {f"meta_{key}" for key in rule_keys}
        for key in param_group.keys() & rule_keys:
            if key not in self.defaults:
                raise ValueError(self._not_applicable(key) + f" (set in param group {len(self.param_groups)})")
        unknown = set(param_group) - set(self.defaults) - {"params", "param_names", "block"}
        if unknown:
            raise ValueError(
                f"param group {len(self.param_groups)} sets {sorted(unknown)}, which MetaOptimize(base={self._base_name()!r}, "
                f"meta={self.meta!r}) does not use; a group may set {sorted(self.defaults)} and 'block'"
            )
        self._check(param_group, f" of param group {len(self.param_groups)}")
        if "lr" in param_group:
            _warn_if_lr_is_a_step_size(param_group["lr"], f" in param group {len(self.param_groups)}")
        super().add_param_group(param_group)
        self._block_layout = self._build_layout()
        self._check_shared_blocks()
        self._kernels.append(KERNELS[self.kernel]())

    # -- pickling and checkpoints ---------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {
            **super().__getstate__(),
            "base": self.base,
            "meta": self.meta,
            "blocks": self.blocks,
            "kernel": self.kernel,
            "variant": self.variant,
            "skip_nonfinite": self.skip_nonfinite,
            "approx": self.approx,
            "base_rule": self.base_rule,
            "meta_rule": self.meta_rule,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._block_layout = self._build_layout()
        self._kernels = [KERNELS[self.kernel]() for _ in self.param_groups]
        self._partitions, self._nodes = {}, None

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        state_dict["metaoptimize"] = self._configuration()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; the meta state keeps its float32 precision and moves to the params' device."""
        saved = state_dict.get("metaoptimize")
        current = self._configuration()
        if saved is None:
            raise ValueError(
                "this state dict was not saved by MetaOptimize (it has no 'metaoptimize' entry): load it into the "
                f"optimizer that saved it; MetaOptimize({current}) can only resume its own state_dict()"
            )
        if saved != current:
            raise ValueError(f"this checkpoint was saved by MetaOptimize({saved}), not MetaOptimize({current})")
        saved_params = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        own_params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        for index, p in zip(saved_params, own_params):
            for key, value in state_dict["state"].get(index, {}).items():
                # a trace of approx "l" / "2x2" has a leading dimension of blocks: compare the trailing ones
                shape = tuple(value.shape[max(0, value.dim() - p.dim()):])
                if key in ("trace", *self.base_rule.moment_names) and (value.dim() < p.dim() or shape != tuple(p.shape)):
                    raise ValueError(
                        f"this checkpoint's state {key!r} of parameter {index} has shape {tuple(value.shape)}, but the "
                        f"parameter has shape {tuple(p.shape)}: it was saved for another model"
                    )
        # torch casts every state tensor to its parameter's dtype; keep the meta keys aside
        # so that a bf16 model does not round its step sizes, and restore them afterwards.
        meta_state, state = {}, {}
        for index, param_state in state_dict["state"].items():
            state[index] = {k: v for k, v in param_state.items() if not _is_meta_key(k)}
            meta_state[index] = {k: v for k, v in param_state.items() if _is_meta_key(k)}
        super().load_state_dict({**{k: v for k, v in state_dict.items() if k != "metaoptimize"}, "state": state})
        self._partitions, self._nodes = {}, None  # the loaded state is in tensors of its own: the flat kernel gathers it again
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = dict(zip(saved_ids, chain.from_iterable(g["params"] for g in self.param_groups)))
        for index, values in meta_state.items():
            p = params[index]
            self.state[p].update({k: v.to(device=p.device) if isinstance(v, Tensor) else v for k, v in values.items()})
        for group in self.param_groups:
            for key, value in group.items():
                if _is_meta_key(key) and isinstance(value, Tensor):
                    group[key] = value.to(group["params"][0].device)

    def _configuration(self) -> dict[str, str]:
        configuration = {"base": self._base_name(), "meta": self.meta, "blocks": self.blocks}
        if self.variant != "standard":
            configuration["variant"] = self.variant
        if self.approx.kind != "hessian_free":
            configuration["approx"] = self.approx.kind
        return configuration

    def _base_name(self) -> str:
        return self.base if isinstance(self.base, str) else "custom"

    # -- blocks ---------------------------------------------------------------------------

    def _build_layout(self) -> dict[int, Block]:
        """Computed whenever the param groups change, not lazily in ``step``: attributes set
        inside ``step`` would break ``torch.compile(optimizer.step)`` on some torch versions."""
        layout: dict[int, Block] = {}
        first_group_of_block: dict[str, int] = {}
        granularity = GRANULARITIES[self.blocks]
        biases = node_weights(self.param_groups) if granularity.pairs_biases else {}
        for index, group in enumerate(self.param_groups):
            owner_group = first_group_of_block.setdefault(group.get("block", f"group{index}"), index)
            for p in group["params"]:
                layout[id(p)] = granularity.block(p, index, owner_group, biases)
        # Numbered here, in eager Python: step() groups by number, which torch.compile traces
        # exactly (ids of dicts, or of one tensor reached two ways, it does not on every version).
        numbers: dict[int, int] = {}
        for key, block in layout.items():
            owner = ("group", block.owner) if isinstance(block.owner, int) else id(block.owner)
            layout[key] = block._replace(number=numbers.setdefault(owner, len(numbers)))
        return layout

    def _check_shared_blocks(self) -> None:
        """A block takes alpha0 and its meta hyper-parameters from one group: refuse a group whose
        own values would be ignored, rather than ignore them."""
        for block in self._block_layout.values():
            group, meta_group = self.param_groups[block.group], self.param_groups[block.meta_group]
            for key in (*BLOCK_KEYS, *(f"meta_{name}" for name in self.meta_rule.hyperparameters)):
                if key in group and group[key] != meta_group[key]:
                    shared = GRANULARITIES[self.blocks].shares
                    raise ValueError(
                        f"param group {block.group} sets {key}={group[key]!r} but shares its step sizes with param "
                        f"group {block.meta_group} ({key}={meta_group[key]!r}): blocks={self.blocks!r} learns {shared}. "
                        f"Give the groups the same {key}, or use blocks='param_group' with distinct 'block' names"
                    )

    def _owner_state(self, owner) -> dict[str, Any]:
        return self.param_groups[owner] if isinstance(owner, int) else self.state[owner]

    def _block_shape(self, owner) -> tuple[int, ...]:
        if isinstance(owner, int):
            return ()
        return self._block_layout[id(owner)].view_shape

    # -- the step -----------------------------------------------------------------------

    def _init_param(self, p: Tensor, state: dict[str, Any], trace_columns: int) -> None:
        state["step"] = torch.zeros((), dtype=_meta_dtype(p.dtype), device=p.device)
        if trace_columns == 1:
            state["trace"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:  # approx "l" / "2x2" with hessian="hvp": one column of H per step-size block
            state["trace"] = torch.zeros((trace_columns, *p.shape), dtype=p.dtype, device=p.device)
        for name in self.base_rule.moment_names:
            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _init_block(self, owner_state: dict[str, Any], shape, alpha0: float | Tensor, like: Tensor) -> None:
        dtype = _meta_dtype(like.dtype)
        if isinstance(alpha0, Tensor):  # estimated by alpha0="auto", on the device
            beta = self.approx.initial_beta(alpha0.to(device=like.device, dtype=dtype))
            owner_state["beta"] = beta.expand(shape).clone()
        else:
            owner_state["beta"] = torch.full(shape, self.approx.initial_beta(alpha0), dtype=dtype, device=like.device)
        owner_state["meta_step"] = torch.zeros((), dtype=dtype, device=like.device)
        for name in self.meta_rule.moment_names:
            owner_state[f"meta_{name}"] = torch.zeros(shape, dtype=dtype, device=like.device)

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
        if self.blocks == "nodewise" and torch.compiler.is_compiling() and _OLD_DYNAMO:
            raise RuntimeError(
                "torch.compile of MetaOptimize.step with blocks='nodewise' computes wrong meta-gradients on "
                f"torch {torch.__version__} (seen on 2.11; right on 2.13 and later): upgrade torch, or leave the step "
                "uncompiled and pass kernel='compiled', which compiles the update alone and is right there"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.skip_nonfinite:
            self._step_unless_nonfinite()
        else:
            self._hessian_free_step()
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
        layout = self._block_layout
        everything = [p for group in self.param_groups for p in group["params"]]
        numbered = {layout[id(p)].number: layout[id(p)] for p in everything}
        blocks = [numbered[number] for number in range(len(numbered))]  # Param.block is the index in this list
        # every block's state, also of blocks without a gradient this step: each is a column of H
        self._init_states(everything, hessian.trace_columns(self.approx, len(blocks)))
        groups = [
            (group, [hessian.Param(p, self.state[p], layout[id(p)].number, layout[id(p)].view_shape)
                     for p in group["params"] if p.grad is not None])
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
        # so that the lazily created state, and the flat buffers that replace it, are in the copy
        if GRANULARITIES[self.blocks].flat == "node":
            self._prepare_nodes()
        for index, group_params in enumerate(groups):
            if group_params:
                self._prepare(index, group_params)
        finite = torch.stack([p.grad.isfinite().all() for p in params]).all()
        written = list(params)
        for p in params:
            written += [value for value in self.state[p].values() if isinstance(value, Tensor)]
        for group in self.param_groups:
            written += [value for key, value in group.items() if _is_meta_key(key) and isinstance(value, Tensor)]
        before = [tensor.clone() for tensor in written]
        self._hessian_free_step()
        for tensor, old in zip(written, before):
            tensor.copy_(torch.where(finite, tensor, old))

    def _init_states(self, params: list[Tensor], trace_columns: int = 1) -> None:
        """The state of each parameter and of its block, created at the parameter's first step."""
        auto_alpha0: dict[int, Tensor] = {}  # alpha0="auto", estimated once per param group from its parameters here
        for p in params:
            state = self.state[p]
            if "trace" not in state:
                self._init_param(p, state, trace_columns)
            block = self._block_layout[id(p)]
            owner_state = self._owner_state(block.owner)
            if "beta" not in owner_state:
                alpha0 = self.param_groups[block.meta_group]["alpha0"]
                if alpha0 == "auto":
                    if block.group not in auto_alpha0:
                        group_params = [q for q in params if self._block_layout[id(q)].group == block.group]
                        auto_alpha0[block.group] = self._auto_alpha0(group_params)
                    alpha0 = auto_alpha0[block.group]
                self._init_block(owner_state, self._block_shape(block.owner), alpha0, p)

    def _auto_alpha0(self, params: list[Tensor]) -> Tensor:
        r"""``alpha0="auto"``: the step size whose first base update moves the weights by
        ``AUTO_FIRST_MOVE`` of their norm, :math:`\alpha_0 = r \, \lVert w \rVert / \lVert d(g) \rVert`
        over ``params`` (the parameters of the param group whose step creates the block, with their
        gradients), where
        :math:`d(g)` is the base rule's first direction (``sign(g)`` for Adam, RMSProp and Lion,
        ``g`` for SGD; ``g`` where the rule's first direction is zero, as the released SGDm's).
        Computed on the device: no host sync."""
        with_grads = [p for p in params if p.grad is not None]
        if not with_grads:
            return torch.tensor(AUTO_ALPHA0_FLOOR)
        dtype = _meta_dtype(with_grads[0].dtype)
        squares = torch.zeros(3, dtype=dtype, device=with_grads[0].device)  # |w|^2, |d|^2, |g|^2
        for p in with_grads:
            group = self.param_groups[self._block_layout[id(p)].group]
            g = p.grad.to(dtype)
            moments = {name: torch.zeros_like(g) for name in self.base_rule.moment_names}
            hp = {key: group[key] for key in self.base_rule.hyperparameters}
            d, _ = self.base_rule.direction(g, moments, hp, torch.ones((), dtype=dtype, device=g.device))
            norms = torch.stack([p.to(dtype).square().sum(), d.square().sum(), g.square().sum()])
            squares += norms.to(squares.device)
        norm_w, norm_d, norm_g = squares.sqrt().unbind()
        norm_d = torch.where(norm_d > 0, norm_d, norm_g)
        alpha0 = torch.where(norm_d > 0, AUTO_FIRST_MOVE * norm_w / norm_d, 0.0).nan_to_num(0.0, 0.0, 0.0)
        return alpha0.clamp(AUTO_ALPHA0_FLOOR, ALPHA0_RANGE[1])

    def _prepare(self, index: int, params: list[Tensor]) -> list[tuple[list[Tensor], flat.Partition | None]] | None:
        """Create the state of ``params`` (the group's parameters with gradients); with the flat kernel,
        their partitions (:mod:`metaopt.flat`), built when this set of parameters first steps."""
        uses_flat = (
            self._kernels[index].flat_update is not None and GRANULARITIES[self.blocks].flat != "node"
            and not torch.compiler.is_compiling()
        )
        if not uses_flat:
            self._init_states(params)
            return None
        key = tuple(map(id, params))
        cached = self._partitions.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        fresh = {id(p) for p in params if "trace" not in self.state[p]}
        self._init_states(params)
        built = []
        for members in flat.partitions(params):
            if not flat.pays_off(members):
                built.append((members, None))
                continue
            built.append((members, flat.build(
                members, [self.state[p] for p in members], self.base_rule.moment_names, self.meta_rule.moment_names,
                blocks=GRANULARITIES[self.blocks].flat, fresh=all(id(p) in fresh for p in members),
            )))
        self._partitions[index] = (key, built)
        return built

    def _prepare_nodes(self) -> flat.Nodes | None:
        """With the flat kernel and nodewise blocks: the state of every parameter with a gradient in
        flat buffers (:class:`metaopt.flat.Nodes`), built when this set of parameters first steps.
        ``None`` (the foreach kernel) under torch.compile, for parameters of several devices or
        dtypes, for large tensors on a CPU (:func:`metaopt.flat.pays_off`), when a block's owner
        has no gradient, or when counters differ."""
        if self._kernels[0].flat_update is None or torch.compiler.is_compiling():
            return None
        groups = [(index, [p for p in group["params"] if p.grad is not None]) for index, group in enumerate(self.param_groups)]
        groups = [(index, params) for index, params in groups if params]
        key = tuple((index, tuple(map(id, params))) for index, params in groups)
        if self._nodes is not None and self._nodes[0] == key:
            return self._nodes[1]
        params = [p for _, group_params in groups for p in group_params]
        fresh = all("trace" not in self.state[p] for p in params)
        for _, group_params in groups:
            self._init_states(group_params)
        layout = self._block_layout
        owners = sorted({id(layout[id(p)].owner): layout[id(p)].owner for p in params}.values(),
                        key=lambda owner: (layout[id(owner)].meta_group, layout[id(owner)].number))
        built = None
        with_grads = {id(p) for p in params}
        one_kind = params and len({(p.device, p.dtype) for p in params}) == 1
        if one_kind and flat.pays_off(params) and all(id(owner) in with_grads for owner in owners):
            offsets, start = {}, 0
            for owner in owners:
                offsets[id(owner)] = start
                start += self.state[owner]["beta"].numel()
            device = params[0].device

            def rows(p: Tensor) -> Tensor:  # the rows of the block of each element of p, row-major
                block = layout[id(p)]
                owned = torch.arange(self.state[block.owner]["beta"].numel(), device=device) + offsets[id(block.owner)]
                return owned.view(block.view_shape).expand(p.shape).reshape(-1)

            built = flat.build_nodes(
                [(index, group_params, [self.state[p] for p in group_params], [rows(p) for p in group_params])
                 for index, group_params in groups],
                [(layout[id(owner)].meta_group, self.state[owner]) for owner in owners],
                self.base_rule.moment_names, self.meta_rule.moment_names, fresh=fresh,
            )
        self._nodes = (key, built)
        return built

    def _nodewise_flat_step(self, nodes: flat.Nodes) -> None:
        """:meth:`_hessian_free_step` on the flat buffers of :class:`metaopt.flat.Nodes`."""
        beta = nodes.meta["beta"]
        meta_grads = torch.zeros_like(beta)
        for index, partition in nodes.partitions:
            group = self.param_groups[index]
            partition.gather()
            meta_grads.index_add_(0, partition.rows, partition.meta_grads().to(beta.dtype))
            step_sizes = partition.per_element(_step_sizes(group["lr"], beta))
            partition.steps.add_(1)
            self._kernels[index].flat_update(
                [partition.weights], [partition.grads], [partition.trace],
                {name: [partition.moments[name]] for name in self.base_rule.moment_names},
                [partition.step], [step_sizes],
                rule=self.base_rule, hp={key: group[key] for key in self.base_rule.hyperparameters},
                weight_decay=group["weight_decay"], gamma=group["gamma"],
            )
            partition.scatter()
        nodes.meta_steps.add_(1)
        for meta_group, rows in nodes.ranges:
            group = self.param_groups[meta_group]
            self._kernels[meta_group].flat_meta_update(
                [beta[rows]], [meta_grads[rows]],
                {name: [nodes.meta[f"meta_{name}"][rows]] for name in self.meta_rule.moment_names},
                [nodes.meta_step],
                rule=self.meta_rule,
                hp={key: group[f"meta_{key}"] for key in self.meta_rule.hyperparameters},
                meta_lr=group["meta_lr"],
                meta_weight_decay=group["meta_weight_decay"],
            )

    def _hessian_free_step(self) -> None:
        if GRANULARITIES[self.blocks].flat == "node":
            nodes = self._prepare_nodes()
            if nodes is not None:
                self._nodewise_flat_step(nodes)
                return
        layout = self._block_layout
        # The step size of each block in each param group that uses it, and each block's
        # meta-gradient terms (by block number), summed after the loop.
        step_sizes_of: dict[tuple[int, int, tuple[int, ...]], Tensor] = {}
        terms_of: dict[int, tuple[dict[str, Any], int, list[Tensor]]] = {}
        flat_meta_updates: list[tuple[int, flat.Partition, Tensor]] = []  # (group, partition, z) of per-tensor blocks

        def step_size_of(block: Block, index: int) -> Tensor:
            key = (block.number, index, block.view_shape)
            if key not in step_sizes_of:
                step_sizes_of[key] = _step_sizes(self.param_groups[index]["lr"], self._owner_state(block.owner)["beta"])
                if step_sizes_of[key].shape != block.view_shape:
                    step_sizes_of[key] = step_sizes_of[key].view(block.view_shape)
            return step_sizes_of[key]

        def add_terms(block: Block, z: Tensor) -> None:
            owner_state = self._owner_state(block.owner)
            beta = owner_state["beta"]
            if z.dim() != beta.dim():  # nodewise: (rows, 1, ..., 1) terms of a (rows,) beta
                z = z.view(beta.shape)
            terms_of.setdefault(block.number, (owner_state, block.meta_group, []))[2].append(z.to(beta.dtype))

        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            hyperparameters = dict(
                rule=self.base_rule,
                hp={key: group[key] for key in self.base_rule.hyperparameters},
                weight_decay=group["weight_decay"],
                gamma=group["gamma"],
            )
            partitions = self._prepare(index, params)
            if partitions is not None:
                unflattened = []
                for members, partition in partitions:
                    if partition is None:  # large tensors on a CPU, or counters that differ: the foreach kernel
                        unflattened += members
                        continue
                    partition.gather()
                    z = partition.meta_grads()
                    if partition.meta is None:  # one step size for the whole partition (scalar, param_group)
                        block = layout[id(members[0])]
                        step_sizes = step_size_of(block, index)
                        add_terms(block, z)
                    else:  # one per tensor (layerwise) or per weight (weightwise), updated below
                        step_sizes = partition.per_element(_step_sizes(group["lr"], partition.meta["beta"]))
                        flat_meta_updates.append((index, partition, z))
                    partition.steps.add_(1)
                    self._kernels[index].flat_update(
                        [partition.weights], [partition.grads], [partition.trace],
                        {name: [partition.moments[name]] for name in self.base_rule.moment_names},
                        [partition.step], [step_sizes], **hyperparameters,
                    )
                    partition.scatter()
                params = unflattened
                if not params:
                    continue
            blocks = [layout[id(p)] for p in params]
            states = [self.state[p] for p in params]
            contributions = self._kernels[index].base_update(
                params,
                [p.grad for p in params],
                [s["trace"] for s in states],
                {name: [s[name] for s in states] for name in self.base_rule.moment_names},
                [s["step"] for s in states],
                [step_size_of(block, index) for block in blocks],
                [block.view_shape for block in blocks],
                **hyperparameters,
            )
            for block, z in zip(blocks, contributions):
                add_terms(block, z)

        # Meta update, once per block, after every base update used the old step sizes; a
        # block's terms are summed by one reduction.
        by_group: dict[int, list] = {}
        for owner_state, meta_group, terms in terms_of.values():
            z = terms[0] if len(terms) == 1 else torch.stack(terms).sum(0)
            by_group.setdefault(meta_group, []).append((owner_state, z))
        for index, partition, z in flat_meta_updates:  # the blocks of a flat partition, as one tensor
            group = self.param_groups[index]
            partition.meta_steps.add_(1)
            self._kernels[index].flat_meta_update(
                [partition.meta["beta"]],
                [z.to(partition.meta["beta"].dtype)],
                {name: [partition.meta[f"meta_{name}"]] for name in self.meta_rule.moment_names},
                [partition.meta_step],
                rule=self.meta_rule,
                hp={key: group[f"meta_{key}"] for key in self.meta_rule.hyperparameters},
                meta_lr=group["meta_lr"],
                meta_weight_decay=group["meta_weight_decay"],
            )
        for meta_group, entries in by_group.items():
            group = self.param_groups[meta_group]
            owner_states = [owner_state for owner_state, _ in entries]
            self._kernels[meta_group].meta_update(
                [s["beta"] for s in owner_states],
                [z for _, z in entries],
                {name: [s[f"meta_{name}"] for s in owner_states] for name in self.meta_rule.moment_names},
                [s["meta_step"] for s in owner_states],
                rule=self.meta_rule,
                hp={key: group[f"meta_{key}"] for key in self.meta_rule.hyperparameters},
                meta_lr=group["meta_lr"],
                meta_weight_decay=group["meta_weight_decay"],
            )

    # -- reading the step sizes -----------------------------------------------------------

    def step_size(self, p: Tensor) -> Tensor:
        """The current step size ``lr * exp(beta)`` of ``p``, broadcastable to ``p`` (no host sync)."""
        block = self._block_layout[id(p)]
        owner_state = self._owner_state(block.owner)
        if "beta" in owner_state:
            alpha = self.approx.step_size(owner_state["beta"]).view(block.view_shape)
        else:  # before the block's first step; alpha0="auto" is estimated there: NaN until then
            alpha0 = self.param_groups[block.meta_group]["alpha0"]
            alpha0 = math.nan if alpha0 == "auto" else alpha0
            alpha = torch.full(block.view_shape, alpha0, dtype=_meta_dtype(p.dtype), device=p.device)
        return self.param_groups[block.group]["lr"] * alpha

    def step_sizes(self) -> dict[str, float]:
        """Step sizes for logging: one entry per block for ``scalar``, ``param_group`` and
        ``layerwise``; ``/min``, ``/median``, ``/max`` per tensor for ``nodewise`` and
        ``weightwise``. Reads the values back to the host once (call it when logging).
        """
        names, values = [], []
        seen: set[tuple] = set()
        granularity = GRANULARITIES[self.blocks]
        for index, group in enumerate(self.param_groups):
            param_names = group.get("param_names") or [f"group{index}.param{j}" for j in range(len(group["params"]))]
            for p, param_name in zip(group["params"], param_names):
                owner = self._block_layout[id(p)].owner
                key = ("group", owner) if isinstance(owner, int) else ("param", id(owner))
                if key in seen:
                    continue
                seen.add(key)
                alpha = self.step_size(p if isinstance(owner, int) else owner).float()
                logged_as = granularity.logged_as.format(block=group.get("block", f"group{index}"), param=param_name)
                if granularity.logs_range:
                    names += [f"{logged_as}/{stat}" for stat in ("min", "median", "max")]
                    values += [alpha.min(), alpha.median(), alpha.max()]
                    continue
                names.append(logged_as)
                values.append(alpha.reshape(()))
        if not values:
            return {}
        return dict(zip(names, torch.stack([v.to(values[0].device) for v in values]).tolist()))

    def __repr__(self) -> str:
        head = (
            f"MetaOptimize(base={self._base_name()!r}, meta={self.meta!r}, blocks={self.blocks!r}, "
            f"variant={self.variant!r}, kernel={self.kernel!r})"
        )
        return head + super().__repr__()[len(type(self).__name__) :]
