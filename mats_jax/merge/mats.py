"""MaTS (Tam, Bansal and Raffel, 2024): merging by matching models in task parameter subspaces.

.. math::

   \\theta^\\star = \\arg\\min_\\theta \\sum_m w_m \\lVert \\theta - \\theta_m \\rVert^2_{C_m}
   \\iff \\Big(\\sum_m w_m C_m\\Big)\\theta^\\star = \\sum_m w_m C_m \\theta_m

solved per parameter block by conjugate gradient from an initialisation (the
paper initialises from task arithmetic). With K-FAC statistics
``C_m = A_m ⊗ G_m`` the sum has no closed-form inverse; each CG step costs two
small matmuls per task, ``Σ_m A_m V G_m``. CG never moves the components of the
initialisation in the null space of ``Σ C_m``, and stopping early acts as a
regulariser: ``init`` and ``maxiter`` are hyperparameters to tune on validation
data.

Examples:
  >>> import jax.numpy as jnp
  >>> from mats_jax import KFAC, mats, task_arithmetic
  >>> base = {"k": jnp.zeros((2, 2))}
  >>> models = [{"k": jnp.eye(2)}, {"k": -jnp.eye(2)}]
  >>> stats = [{"k": KFAC(jnp.eye(2), jnp.eye(2))}, {"k": KFAC(3 * jnp.eye(2), jnp.eye(2))}]
  >>> init = task_arithmetic(base, models, scale=0.5)
  >>> mats(models, stats, init=init).params["k"]
  Array([[-0.5,  0. ],
         [ 0. , -0.5]], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from mats_jax.solver import Fallback, MergeResult, solve
from mats_jax.typing import Params, StatTree

__all__ = ["mats"]


def mats(
    models: Sequence[Params],
    statistics: Sequence[StatTree],
    *,
    init: Params | None = None,
    weights: Any = None,
    maxiter: int = 100,
    tol: float = 1e-5,
    damping: float = 0.0,
    preconditioner: bool = False,
    fallback: Fallback | Params = "average",
    precision: Literal["float32", "float64"] | None = None,
    check_every: int = 20,
    divergence_factor: float = 10.0,
    group_blocks: bool = True,
) -> MergeResult:
    """Merges by conjugate gradient on ``(Σ_m w_m C_m) θ = Σ_m w_m C_m θ_m``.

    Args:
      models: M fine-tuned parameter pytrees θ_m.
      statistics: M pytrees with the parameters' structure holding a statistic
        per leaf (:class:`~mats_jax.KFAC`, :class:`~mats_jax.Gram`,
        :class:`~mats_jax.Diagonal`, :class:`~mats_jax.Dense`) or None.
      init: CG's starting point: ``task_arithmetic(...)`` (the paper's
        choice), ``ties(...)``, ``average(...)``, the base model, or any
        pytree. Default: the weighted average.
      weights, maxiter, tol, damping: see :func:`~mats_jax.solve`. The paper
        runs 100 iterations (10 for IA³ blocks) with no damping and no
        preconditioner, the defaults here but for ``tol``, which stops blocks
        that converge sooner.
      preconditioner, fallback, precision: see :func:`~mats_jax.solve`.
      check_every, divergence_factor, group_blocks: see :func:`~mats_jax.solve`.

    Returns:
      A :class:`~mats_jax.MergeResult`: the merged parameters and a per-leaf
      report of residuals and iterations.

    Examples:
      K-FAC statistics A_m ⊗ G_m: the second task's A is three times the
      first's, so it pulls the kernel three times as hard.

      >>> import jax.numpy as jnp
      >>> from mats_jax import KFAC, format_report, mats
      >>> models = [{"k": jnp.array([[1.0], [0.0]]), "b": jnp.zeros(1)},
      ...           {"k": jnp.array([[0.0], [1.0]]), "b": jnp.ones(1)}]
      >>> stats = [{"k": KFAC(jnp.eye(2), jnp.eye(1)), "b": None},
      ...          {"k": KFAC(3 * jnp.eye(2), jnp.eye(1)), "b": None}]
      >>> merged, report = mats(models, stats, maxiter=10)
      >>> merged["k"]
      Array([[0.25],
             [0.75]], dtype=float32)
      >>> print(format_report(report))
      leaf  solver            blocks  iters  initial   final     status
      b     fallback:average  -       -      -         -         -
      k     cg                1       1      4.47e-01  0.00e+00  converged
    """
    return solve(
        models,
        statistics,
        init=init,
        weights=weights,
        fallback=fallback,
        method="cg",
        maxiter=maxiter,
        tol=tol,
        damping=damping,
        preconditioner=preconditioner,
        precision=precision,
        check_every=check_every,
        divergence_factor=divergence_factor,
        group_blocks=group_blocks,
    )
