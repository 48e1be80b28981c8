"""Merge methods, one module per family, and the registry of them all."""

from mats_jax.merge.breadcrumbs import breadcrumbs
from mats_jax.merge.della import della
from mats_jax.merge.fisher import fisher_merge
from mats_jax.merge.linear import average, task_arithmetic
from mats_jax.merge.mats import lower_solve, mats, solve
from mats_jax.merge.model_stock import model_stock, model_stock_ratios
from mats_jax.merge.registry import METHODS, get_method, lower_merge, merge_pytrees
from mats_jax.merge.regmean import regmean
from mats_jax.merge.slerp import multislerp, slerp
from mats_jax.merge.sparse import dare, ties
from mats_jax.merge.svd import iso_c, iso_cts, tsv_m

__all__ = [
    "METHODS",
    "average",
    "breadcrumbs",
    "dare",
    "della",
    "fisher_merge",
    "get_method",
    "iso_c",
    "iso_cts",
    "lower_merge",
    "lower_solve",
    "mats",
    "merge_pytrees",
    "model_stock",
    "model_stock_ratios",
    "multislerp",
    "regmean",
    "slerp",
    "solve",
    "task_arithmetic",
    "ties",
    "tsv_m",
]
