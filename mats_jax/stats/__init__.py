"""Statistics: the per-task matrices C_m that data-dependent merging weighs tasks by.

Types (:mod:`~mats_jax.stats.statistic`), estimators from any JAX model
(:func:`diagonal_fisher`, :func:`block_fisher`, :func:`gram`, :func:`kfac`), saving and loading
(:mod:`~mats_jax.stats.io`), a summary of what each leaf got, and the scales of
the tasks' statistics equalised (:mod:`~mats_jax.stats.rescale`).
"""

from mats_jax.stats.estimate import MAX_FACTOR_SIZE
from mats_jax.stats.fisher import block_fisher, diagonal_fisher
from mats_jax.stats.io import load_statistics, save_statistics
from mats_jax.stats.kronecker import gram, kfac
from mats_jax.stats.likelihood import StatisticsFallbackWarning, StatisticsInputError
from mats_jax.stats.rescale import equalise_scales, equalise_statistic_scales
from mats_jax.stats.statistic import (
    KFAC,
    Dense,
    Diagonal,
    Gram,
    Statistic,
    is_statistic_leaf,
    register_statistic,
)
from mats_jax.stats.summary import statistic_scales, statistics_table

__all__ = [
    "KFAC",
    "MAX_FACTOR_SIZE",
    "Dense",
    "Diagonal",
    "Gram",
    "Statistic",
    "StatisticsFallbackWarning",
    "StatisticsInputError",
    "block_fisher",
    "diagonal_fisher",
    "equalise_scales",
    "equalise_statistic_scales",
    "gram",
    "is_statistic_leaf",
    "kfac",
    "load_statistics",
    "register_statistic",
    "save_statistics",
    "statistic_scales",
    "statistics_table",
]
