"""Known step-size algorithms as MetaOptimize configurations (Appendix B of the paper).

* :func:`idbd`: IDBD (Sutton, 1992). Linear least squares ``f = (a^T w - b)^2 / 2``, one step size
  per weight, SGD base and SGD meta, the L-approximation with the diagonal of the Hessian
  (``a^2``) and the trace's decay clipped at zero (eq. 84-89)::

      beta <- beta - eta g h;   alpha = exp(beta);   w <- w - alpha g;   h <- (1 - alpha a^2)^+ h - alpha g

* :func:`hypergradient_descent`: hypergradient descent (Baydin et al., 2017). Additive step sizes
  (``alpha = beta``), SGD meta, ``gamma = 0`` (eq. 90-91): the trace is the last step's
  ``d w / d alpha``, so the step size follows the product of the last two updates' directions::

      alpha <- alpha + eta g_t . d_{t-1};   w <- w - alpha d_t      (d = the base direction)

Both published algorithms move the step size *before* the base step, with this step's gradient,
and step with the new one; MetaOptimize moves it after (its base step uses the step size the
meta-gradient was computed for). These constructors set ``meta_first=True`` and so reproduce
the published algorithms exactly (tests/metaopt/test_special_cases.py). IDBD needs the Hessian
diagonal at every step: ``optimizer.step(hessian_diagonal={w: a**2})``.
"""

from __future__ import annotations

from typing import Iterable

from metaopt.hessian import Approximation
from metaopt.optimizer import MetaOptimize


def idbd(params: Iterable, *, alpha0: float, meta_lr: float) -> MetaOptimize:
    """IDBD (Sutton, 1992): per-weight step sizes ``exp(beta)`` learned by the rule above.

    Args:
        params: the weights of a linear model trained on ``(a^T w - b)^2 / 2``.
        alpha0: initial step size of every weight.
        meta_lr: the meta step size (Sutton's theta).

    Call ``optimizer.step(hessian_diagonal={w: a**2 for each weight tensor w})`` after
    ``loss.backward()``; no closure is needed.
    """
    approx = Approximation("l", hessian="diagonal", clip_trace=True, meta_first=True)
    return MetaOptimize(
        params, "sgd", "sgd", "weightwise", approx=approx, alpha0=alpha0, meta_lr=meta_lr, gamma=1.0, weight_decay=0.0
    )


def hypergradient_descent(
    params: Iterable,
    *,
    alpha0: float,
    meta_lr: float,
    base: str = "sgd",
    blocks: str = "scalar",
    weight_decay: float = 0.0,
    **base_hyperparameters: float,
) -> MetaOptimize:
    """Hypergradient descent (Baydin et al., 2017) around a base rule: SGD-HD with
    ``base="sgd"``, Adam-HD with ``base="adamw"`` (any other base works the same way).

    Args:
        params: parameters or param groups.
        alpha0: initial step size.
        meta_lr: the hypergradient step size (Baydin's beta).
        base, blocks, weight_decay, base_hyperparameters: as for :class:`MetaOptimize`
            (``blocks="scalar"``, one global step size, is the paper's).

    ``gamma = 0`` drops the Hessian term, so ``step()`` needs no closure.
    """
    approx = Approximation("l", meta_first=True, additive=True)
    return MetaOptimize(
        params,
        base,
        "sgd",
        blocks,
        approx=approx,
        alpha0=alpha0,
        meta_lr=meta_lr,
        gamma=0.0,
        weight_decay=weight_decay,
        **base_hyperparameters,
    )
