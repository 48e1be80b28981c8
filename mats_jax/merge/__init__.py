"""Merge methods, one module per family; each a pure function over parameter pytrees."""

from mats_jax.merge.fisher import fisher_merge
from mats_jax.merge.linear import average, task_arithmetic
from mats_jax.merge.mats import mats
from mats_jax.merge.regmean import regmean
from mats_jax.merge.sparse import dare, magnitude_threshold, ties

__all__ = [
    "average",
    "dare",
    "fisher_merge",
    "magnitude_threshold",
    "mats",
    "regmean",
    "task_arithmetic",
    "ties",
]
