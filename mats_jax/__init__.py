"""mats_jax: merging fine-tuned models in JAX.

Every data-dependent method solves ``(Σ_m C_m) θ = Σ_m C_m θ_m`` for per-task
statistics C_m (MaTS, Tam, Bansal and Raffel, 2024); the data-free methods
(averaging, task arithmetic, TIES, DARE) are pure functions over pytrees too.
"""

from mats_jax import tree
from mats_jax.checks import MergeInputError
from mats_jax.merge import (
    average,
    dare,
    fisher_merge,
    magnitude_threshold,
    mats,
    regmean,
    task_arithmetic,
    ties,
)
from mats_jax.solver import (
    STATUS_NAMES,
    CGInfo,
    ConvergenceWarning,
    LeafReport,
    MergeResult,
    format_report,
    per_block_cg,
    solve,
)
from mats_jax.stats import (
    KFAC,
    Dense,
    Diagonal,
    Gram,
    Statistic,
    StatisticsInputError,
    diagonal_fisher,
    gram,
    kfac,
    load_statistics,
    save_statistics,
    statistic_scales,
    statistics_table,
)
from mats_jax.tree import task_vectors

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "STATUS_NAMES",
    "CGInfo",
    "ConvergenceWarning",
    "Dense",
    "Diagonal",
    "Gram",
    "LeafReport",
    "MergeInputError",
    "MergeResult",
    "Statistic",
    "StatisticsInputError",
    "average",
    "dare",
    "diagonal_fisher",
    "fisher_merge",
    "format_report",
    "gram",
    "kfac",
    "load_statistics",
    "magnitude_threshold",
    "mats",
    "per_block_cg",
    "regmean",
    "save_statistics",
    "solve",
    "statistic_scales",
    "statistics_table",
    "task_arithmetic",
    "task_vectors",
    "ties",
    "tree",
]
