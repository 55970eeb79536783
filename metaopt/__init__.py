"""metaopt: MetaOptimize (ICML 2025) for PyTorch, with the experiments of its paper."""

from metaopt.param_groups import RESNET18_BLOCKS, llama2c_blocks, param_groups_by_prefix
from metaopt.hessian import Approximation
from metaopt.optimizer import BLOCKS, MetaOptimize
from metaopt.rules import BASES, METAS, RULES, Rule
from metaopt.special_cases import hypergradient_descent, idbd

__all__ = [
    "Approximation",
    "BASES",
    "BLOCKS",
    "METAS",
    "MetaOptimize",
    "RESNET18_BLOCKS",
    "RULES",
    "Rule",
    "hypergradient_descent",
    "idbd",
    "llama2c_blocks",
    "param_groups_by_prefix",
]
__version__ = "0.1.0"
