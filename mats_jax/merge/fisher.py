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

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mats_jax.checks import MergeInputError, check_traced, is_traced
from mats_jax.engine import run_in_memory
from mats_jax.merge.subspace import SubspaceMerge, check_fallback, each_statistic
from mats_jax.solver.options import SolverOptions
from mats_jax.solver.report import MergeResult
from mats_jax.stats.statistic import Diagonal, Statistic
from mats_jax.tree import register_record
from mats_jax.typing import Params, StatTree

__all__ = ["FISHER_MERGE", "FisherParameters", "fisher_merge", "floor_fisher"]


@register_record
@dataclasses.dataclass(frozen=True)
class FisherParameters:
    """Fisher merging's parameters.

    Attributes:
      floor: ε, the smallest Fisher value used (>= 0); keeps entries no task's
        Fisher sees from dividing by zero (they get the weighted average).
      fallback: the rule for leaves without a Fisher (see :func:`~mats_jax.solve`).
    """

    floor: Any = 1e-6
    fallback: Any = "average"

    def __post_init__(self) -> None:
        if is_traced(self.floor):
            check_traced("floor", self.floor, lambda f: f >= 0, ">= 0")
        elif not float(self.floor) >= 0:
            raise MergeInputError(f"floor must be >= 0, got {self.floor!r}")
        check_fallback(self.fallback)

    def solver_options(self) -> SolverOptions:
        """Closed form: Fisher merging is elementwise."""
        return SolverOptions(method="closed_form")


def floor_fisher(stat: Statistic | None, params: FisherParameters) -> Statistic | None:
    """``max(F, ε)``: the statistics transform of Fisher merging."""
    if not isinstance(stat, Diagonal):  # None: the checks allow nothing else
        return stat
    return Diagonal(jnp.maximum(stat.f.astype(jnp.float32), params.floor))


FISHER_MERGE = SubspaceMerge(
    "fisher_merge",
    FisherParameters,
    statistics_name="fishers",
    allowed=(Diagonal,),
    transform=each_statistic(floor_fisher),
)


def _as_diagonal(fishers: StatTree) -> StatTree:
    """Wraps bare Fisher arrays as Diagonal statistics; anything else is left to the checks."""

    def wrap(x: Any) -> Any:
        return Diagonal(x) if hasattr(x, "shape") else x

    return jax.tree.map(
        wrap, fishers, is_leaf=lambda x: x is None or isinstance(x, Statistic)
    )


def fisher_merge(
    models: Sequence[Params],
    fishers: Sequence[StatTree],
    *,
    weights: Any = None,
    floor: float = 1e-6,
    fallback: Any = "average",
) -> MergeResult:
    """Averages each entry over the models, weighted by each task's diagonal Fisher.

    .. math::

       \\theta^\\star = \\frac{\\sum_m w_m \\max(F_m, \\varepsilon)\\, \\theta_m}
                            {\\sum_m w_m \\max(F_m, \\varepsilon)}

    elementwise: the closed-form solve of ``C_m = diag(max(F_m, ε))``.

    Values are checked before any work when concrete; traced ones (under an
    outer ``jax.jit``: NaN or Inf in models, weights or statistics,
    hyperparameters out of range, negative weights) are checked only when
    the call is wrapped in ``jax.experimental.checkify.checkify``, and pass
    unchecked otherwise (:func:`~mats_jax.checks.check_traced`).

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

    Examples:
      Each entry is averaged with its tasks' Fisher values as weights:
      (3·1 + 1·0) / 4 = 0.75 and (1·0 + 1·1) / 2 = 0.5.

      >>> import jax.numpy as jnp
      >>> from mats_jax import Diagonal, fisher_merge
      >>> models = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}]
      >>> fishers = [{"w": Diagonal(jnp.array([3.0, 1.0]))},
      ...            {"w": Diagonal(jnp.array([1.0, 1.0]))}]
      >>> merged, report = fisher_merge(models, fishers)
      >>> merged["w"]
      Array([0.75, 0.5 ], dtype=float32)
    """
    if isinstance(fishers, dict) or not isinstance(fishers, Sequence):
        raise MergeInputError(
            f"fishers must be a list with one Fisher pytree per model, got {type(fishers).__name__}"
        )
    return run_in_memory(
        FISHER_MERGE,
        FISHER_MERGE.parameters(floor=floor, fallback=fallback),
        models=models,
        statistics=[_as_diagonal(f) for f in fishers],
        weights=weights,
    )
