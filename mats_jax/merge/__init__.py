"""Merge methods, one module per family, and the registry of them all."""

from mats_jax.merge.fisher import fisher_merge
from mats_jax.merge.linear import average, task_arithmetic
from mats_jax.merge.mats import lower_solve, mats, solve
from mats_jax.merge.registry import METHODS, get_method, lower_merge, merge_pytrees
from mats_jax.merge.regmean import regmean
from mats_jax.merge.sparse import dare, ties

__all__ = [
    "METHODS",
    "average",
    "dare",
    "fisher_merge",
    "get_method",
    "lower_merge",
    "lower_solve",
    "mats",
    "merge_pytrees",
    "regmean",
    "solve",
    "task_arithmetic",
    "ties",
]
