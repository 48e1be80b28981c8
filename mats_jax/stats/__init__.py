"""Statistics: the per-task matrices C_m that data-dependent merging weighs tasks by."""

from mats_jax.stats.statistic import KFAC, Dense, Diagonal, Gram, Statistic

__all__ = ["KFAC", "Dense", "Diagonal", "Gram", "Statistic"]
