"""Rescaling each task's statistics so that no task is outweighed by its scale alone.

MaTS solves ``(Σ_m C_m) θ = Σ_m C_m θ_m``: on a leaf where one task's
statistic is a tenth of the others', the merge barely sees that task there,
whatever its statistic's shape. Equalising the scales across tasks,

.. math::

   C_m \\leftarrow C_m \\cdot \\bar s / s_m, \\qquad
   s_m = \\operatorname{mean}\\operatorname{diag} C_m, \\quad
   \\bar s = \\tfrac{1}{M} \\textstyle\\sum_m s_m,

per leaf, keeps each statistic's shape (which directions matter to its
task) and the leaf's total scale, and removes the imbalance. A task whose
statistic is zero on a leaf (or None) is left as it is and out of the mean.

Examples:
  >>> import jax.numpy as jnp
  >>> from mats_jax import Diagonal, equalise_statistic_scales
  >>> a = {"w": Diagonal(jnp.array([1.0, 1.0]))}
  >>> b = {"w": Diagonal(jnp.array([1.0, 5.0]))}
  >>> [s["w"].f for s in equalise_statistic_scales([a, b])]
  [Array([2., 2.], dtype=float32), Array([0.6666667, 3.3333335], dtype=float32)]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mats_jax.stats.likelihood import StatisticsInputError
from mats_jax.stats.statistic import Statistic, is_statistic_leaf
from mats_jax.typing import StatTree

__all__ = ["equalise_scales", "equalise_statistic_scales"]


def equalise_scales(stats: Sequence[Statistic | None]) -> list[Statistic | None]:
    """The M tasks' statistics of one leaf, each rescaled to their mean scale.

    Traceable (the scales are arrays): it runs inside a jitted merge.
    """
    present = [s for s in stats if s is not None]
    if not present:
        return list(stats)
    scales = [jnp.mean(s.diagonal_mean()).astype(jnp.float32) for s in present]
    positive = [(s > 0).astype(jnp.float32) for s in scales]
    mean = sum(s * p for s, p in zip(scales, positive, strict=True)) / jnp.maximum(
        sum(positive), 1.0
    )
    factors = iter(
        jnp.where(s > 0, mean / jnp.where(s > 0, s, 1.0), 1.0) for s in scales
    )
    return [None if s is None else s.scaled(next(factors)) for s in stats]


def equalise_statistic_scales(statistics: Sequence[StatTree]) -> list[StatTree]:
    """:func:`equalise_scales` on every leaf of M statistic pytrees (one per task).

    Examples:
      Task b's K-FAC has four times task a's scale; equalised, both have
      the mean, 2.5, and each keeps its shape.

      >>> import jax.numpy as jnp
      >>> from mats_jax import KFAC, equalise_statistic_scales, statistic_scales
      >>> a = {"k": KFAC(jnp.eye(2), jnp.eye(3))}
      >>> b = {"k": KFAC(4 * jnp.eye(2), jnp.eye(3))}
      >>> [statistic_scales(s) for s in equalise_statistic_scales([a, b])]
      [{'k': 2.5}, {'k': 2.5}]
    """
    flat = [jax.tree.flatten(s, is_leaf=is_statistic_leaf) for s in statistics]
    if not flat:
        raise StatisticsInputError("equalise_statistic_scales needs at least one task")
    treedef: Any = flat[0][1]  # its stubs lack __ne__ against another PyTreeDef
    for m, (_, other) in enumerate(flat):
        if other != treedef:
            raise StatisticsInputError(
                f"task {m}'s statistics have another structure than task 0's: "
                f"{other} against {treedef}"
            )
    per_leaf = [
        equalise_scales(list(leaf)) for leaf in zip(*(f[0] for f in flat), strict=True)
    ]
    return [
        jax.tree.unflatten(treedef, [leaf[m] for leaf in per_leaf])
        for m in range(len(statistics))
    ]
