"""Fisher merging (Matena and Raffel, 2022): a Fisher-weighted average, per entry.

.. math::

   \\theta^\\star = \\frac{\\sum_m w_m \\max(F_m, \\varepsilon)\\, \\theta_m}
                        {\\sum_m w_m \\max(F_m, \\varepsilon)}

elementwise, with F_m the diagonal Fisher of task m. In the MaTS view this is
``C_m = diag(F_m)``, solved in closed form by the same solver as every other
data-dependent method.

Examples:
  >>> import jax.numpy as jnp
  >>> from mats_jax import fisher_merge
  >>> models = [{"w": jnp.array([0.0, 0.0])}, {"w": jnp.array([1.0, 1.0])}]
  >>> fishers = [{"w": jnp.array([1.0, 3.0])}, {"w": jnp.array([1.0, 1.0])}]
  >>> fisher_merge(models, fishers).params["w"]
  Array([0.5 , 0.25], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mats_jax import checks
from mats_jax.solver import Fallback, MergeResult, solve
from mats_jax.stats.statistic import Diagonal
from mats_jax.typing import Params, StatTree

__all__ = ["fisher_merge"]


def _as_diagonal(fishers: StatTree, floor: float) -> StatTree:
    def floored(x: Any) -> Any:
        if x is None:
            return None
        f = x.f if isinstance(x, Diagonal) else x
        if not hasattr(f, "shape"):
            raise checks.MergeInputError(
                f"expected a Fisher array or Diagonal at each leaf, got {type(x).__name__}"
            )
        return Diagonal(jnp.maximum(jnp.asarray(f, jnp.float32), floor))

    return jax.tree.map(
        floored, fishers, is_leaf=lambda x: x is None or isinstance(x, Diagonal)
    )


def fisher_merge(
    models: Sequence[Params],
    fishers: Sequence[StatTree],
    *,
    weights: Any = None,
    floor: float = 1e-6,
    fallback: Fallback | Params = "average",
) -> MergeResult:
    """Merges by per-entry Fisher-weighted averaging; see the module docstring.

    Args:
      models: M fine-tuned parameter pytrees.
      fishers: M pytrees with the parameters' structure holding, per leaf, the
        diagonal Fisher (an array of the leaf's shape, or a
        :class:`~mats_jax.Diagonal`), or None for leaves to merge by ``fallback``.
      weights: per-model weights (default 1).
      floor: ε, the smallest Fisher value used; keeps entries no task's Fisher
        sees from dividing by zero (they get the weighted average).
      fallback: the rule for leaves without a Fisher (see :func:`~mats_jax.solve`).

    Returns:
      A :class:`~mats_jax.MergeResult` (parameters and per-leaf report).
    """
    if isinstance(fishers, dict) or not isinstance(fishers, Sequence):
        raise checks.MergeInputError(
            f"fishers must be a list with one Fisher pytree per model, got {type(fishers).__name__}"
        )
    if not (float(floor) >= 0):
        raise checks.MergeInputError(f"floor must be >= 0, got {floor!r}")
    stats = [_as_diagonal(f, floor) for f in fishers]
    return solve(
        models, stats, weights=weights, fallback=fallback, method="closed_form"
    )
