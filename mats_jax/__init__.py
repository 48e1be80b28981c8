"""mats_jax: merging fine-tuned models in JAX.

Every data-dependent method solves ``(Σ_m C_m) θ = Σ_m C_m θ_m`` for per-task
statistics C_m (MaTS, Tam, Bansal and Raffel, 2024); the data-free methods
(averaging, task arithmetic, TIES, DARE) are pure functions over pytrees too.
"""

from mats_jax import tree
from mats_jax.checks import FallbackWarning, MergeInputError
from mats_jax.io import (
    CheckpointError,
    Layout,
    load_checkpoint,
    load_orbax,
    open_checkpoint,
    save_checkpoint,
    save_model_folder,
    save_orbax,
)
from mats_jax.merge import (
    METHODS,
    average,
    dare,
    fisher_merge,
    get_method,
    lower_merge,
    lower_solve,
    mats,
    merge_pytrees,
    regmean,
    solve,
    task_arithmetic,
    ties,
)
from mats_jax.method import MergeMethod, MethodCall
from mats_jax.recipe import Recipe, RecipeError, load_recipe, parse_recipe
from mats_jax.select import magnitude_threshold
from mats_jax.sharding import shard_statistics
from mats_jax.solver import (
    STATUS_NAMES,
    CGInfo,
    ConvergenceWarning,
    LeafReport,
    MergeResult,
    SolverOptions,
    format_report,
    jax_scipy_cg,
    per_block_cg,
)
from mats_jax.stats import (
    KFAC,
    MAX_FACTOR_SIZE,
    Dense,
    Diagonal,
    Gram,
    Statistic,
    StatisticsFallbackWarning,
    StatisticsInputError,
    diagonal_fisher,
    gram,
    kfac,
    load_statistics,
    save_statistics,
    statistic_scales,
    statistics_table,
)
from mats_jax.stream import merge_recipe
from mats_jax.tree import task_vectors

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "MAX_FACTOR_SIZE",
    "METHODS",
    "STATUS_NAMES",
    "CGInfo",
    "CheckpointError",
    "ConvergenceWarning",
    "Dense",
    "Diagonal",
    "FallbackWarning",
    "Gram",
    "Layout",
    "LeafReport",
    "MergeInputError",
    "MergeMethod",
    "MergeResult",
    "MethodCall",
    "Recipe",
    "RecipeError",
    "SolverOptions",
    "Statistic",
    "StatisticsFallbackWarning",
    "StatisticsInputError",
    "average",
    "dare",
    "diagonal_fisher",
    "fisher_merge",
    "format_report",
    "get_method",
    "gram",
    "jax_scipy_cg",
    "kfac",
    "load_checkpoint",
    "load_orbax",
    "load_recipe",
    "load_statistics",
    "lower_merge",
    "lower_solve",
    "magnitude_threshold",
    "mats",
    "merge_pytrees",
    "merge_recipe",
    "open_checkpoint",
    "parse_recipe",
    "per_block_cg",
    "regmean",
    "save_checkpoint",
    "save_model_folder",
    "save_orbax",
    "save_statistics",
    "shard_statistics",
    "solve",
    "statistic_scales",
    "statistics_table",
    "task_arithmetic",
    "task_vectors",
    "ties",
    "tree",
]
