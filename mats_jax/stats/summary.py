"""What each leaf got, and at what scale, across tasks.

The scale of a statistic is the mean of its matrix's diagonal (for K-FAC,
``mean diag(A) · mean diag(G)``): how strongly the task pulls that block in
``Σ_m C_m``. Tasks whose scales differ by orders of magnitude dominate the
merge; seeing it is the first step to weighting them (``weights=``) or to a
better Fisher estimate (``kind="exact"``).

Examples:
  >>> import jax.numpy as jnp
  >>> from mats_jax import KFAC
  >>> stats = {"k": KFAC(jnp.eye(2), 3 * jnp.eye(2)), "b": None}
  >>> print(statistics_table([stats, stats], names=["A", "B"]))
  leaf  statistic  A         B
  b     -          -         -
  k     KFAC       3.00e+00  3.00e+00
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from mats_jax.stats.likelihood import StatisticsInputError
from mats_jax.stats.statistic import Statistic, is_statistic_leaf
from mats_jax.tree import path_str
from mats_jax.typing import StatTree

__all__ = ["statistic_scales", "statistics_table"]


def statistic_scales(statistics: StatTree) -> dict[str, float | None]:
    """The scale (mean diagonal) of each leaf's statistic, keyed by leaf path.

    Examples:
      >>> import jax.numpy as jnp
      >>> from mats_jax import KFAC, Diagonal, statistic_scales
      >>> statistic_scales({"k": KFAC(jnp.eye(2), 3 * jnp.eye(2)), "b": None})
      {'b': None, 'k': 3.0}
      >>> statistic_scales({"w": Diagonal(jnp.array([1.0, 3.0]))})
      {'w': 2.0}
    """
    flat = jax.tree_util.tree_flatten_with_path(statistics, is_leaf=is_statistic_leaf)[
        0
    ]
    out: dict[str, float | None] = {}
    for path, stat in flat:
        # diagonal_mean reduces only the trailing axes, so it also serves an
        # unblocked statistic; the mean over blocks of equal size is the mean.
        out[path_str(path)] = (
            None if stat is None else float(np.mean(np.asarray(stat.diagonal_mean())))
        )
    return out


def statistics_table(
    statistics: Sequence[StatTree], names: Sequence[str] | None = None
) -> str:
    """A plain-text table: per leaf, the statistic type and each task's scale.

    Examples:
      >>> import jax.numpy as jnp
      >>> from mats_jax import Diagonal, statistics_table
      >>> task_a = {"w": Diagonal(jnp.ones(2))}
      >>> task_b = {"w": Diagonal(100 * jnp.ones(2))}
      >>> print(statistics_table([task_a, task_b], names=["a", "b"]))
      leaf  statistic  a         b
      w     Diagonal   1.00e+00  1.00e+02
    """
    if (
        isinstance(statistics, Mapping)
        or isinstance(statistics, Statistic)
        or not (isinstance(statistics, Sequence) and statistics)
    ):
        raise StatisticsInputError(
            "statistics_table takes a non-empty list of statistic pytrees, one per "
            f"task, got {type(statistics).__name__}: wrap one tree as [stats]"
        )
    if names is not None and len(names) != len(statistics):
        raise StatisticsInputError(
            f"names has {len(names)} entries for {len(statistics)} statistic pytrees"
        )
    names = (
        list(names)
        if names is not None
        else [f"task {i}" for i in range(len(statistics))]
    )
    scales = [statistic_scales(s) for s in statistics]
    kinds = {
        path_str(p): ("-" if s is None else s.kind)
        for p, s in jax.tree_util.tree_flatten_with_path(
            statistics[0], is_leaf=is_statistic_leaf
        )[0]
    }
    rows = [["leaf", "statistic", *names]]
    for leaf, kind in kinds.items():
        rows.append(
            [
                leaf,
                kind,
                *("-" if sc[leaf] is None else f"{sc[leaf]:.2e}" for sc in scales),
            ]
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    )
