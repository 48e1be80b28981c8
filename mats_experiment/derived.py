"""Statistics derived from estimated ones, for the experiments' ablations.

:func:`kernels_only` keeps the dense kernels' statistics and drops the rest
(biases, norms, embeddings then follow the merge's fallback rule, the
weighted average, as they do in RegMean). The scales equalised across tasks
are a MaTS option of the library (``equalise_scales``), not a derived
statistic.
"""

from __future__ import annotations

import jax

import mats_jax
from mats_jax.typing import StatTree

__all__ = ["kernels_only"]


def kernels_only(stats: StatTree) -> StatTree:
    """``stats`` with every statistic but K-FAC and Gram replaced by None.

    Examples:
      >>> import jax.numpy as jnp
      >>> s = {"k": mats_jax.KFAC(jnp.eye(2), jnp.eye(2)), "b": mats_jax.Diagonal(jnp.ones(2))}
      >>> sorted(k for k, v in kernels_only(s).items() if v is not None)
      ['k']
    """
    return jax.tree.map(
        lambda s: s if isinstance(s, (mats_jax.KFAC, mats_jax.Gram)) else None,
        stats,
        is_leaf=mats_jax.is_statistic_leaf,
    )
