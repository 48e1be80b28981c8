"""Statistics derived from estimated ones, for the experiments' ablations.

* :func:`kernels_only`: keep the dense kernels' statistics, drop the rest
  (biases, norms, embeddings then follow the merge's fallback rule, the
  weighted average, as they do in RegMean);
* :func:`equalise_scales`: rescale each task's statistic of every leaf so all
  tasks have that leaf's mean scale: ``C_m ← C_m · s̄ / s_m`` with ``s_m`` the
  task's scale (:func:`mats_jax.statistic_scales`, the mean diagonal) and
  ``s̄`` the mean over tasks. It removes the imbalance across tasks and keeps
  each statistic's shape (which directions matter to the task).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

import mats_jax
from mats_jax.tree import path_str
from mats_jax.typing import StatTree

__all__ = ["equalise_scales", "kernels_only"]


def _is_stat(x: object) -> bool:
    return x is None or isinstance(x, mats_jax.Statistic)


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
        is_leaf=_is_stat,
    )


def equalise_scales(stats: Sequence[StatTree]) -> list[StatTree]:
    """Every leaf's statistic rescaled to the same scale in every task.

    Examples:
      >>> import jax.numpy as jnp
      >>> a = {"w": mats_jax.Diagonal(jnp.ones(2))}
      >>> b = {"w": mats_jax.Diagonal(3 * jnp.ones(2))}
      >>> [float(s["w"].f[0]) for s in equalise_scales([a, b])]
      [2.0, 2.0]
    """
    scales = [mats_jax.statistic_scales(s) for s in stats]
    out = []
    for task, tree in enumerate(stats):
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_stat)
        leaves = []
        for path, stat in flat:
            key = path_str(path)
            values = [sc[key] for sc in scales]
            if stat is None or any(v is None or v <= 0 for v in values):
                leaves.append(stat)
                continue
            mean = sum(values) / len(values)  # type: ignore[arg-type]
            leaves.append(stat.scaled(mean / values[task]))  # type: ignore[operator]
        out.append(jax.tree.unflatten(treedef, leaves))
    return out
