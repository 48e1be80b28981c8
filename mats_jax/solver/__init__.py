"""The one solver behind every data-dependent merge: ``(Σ_m C_m) θ = Σ_m C_m θ_m``.

MaTS (Tam, Bansal and Raffel, 2024) casts every data-dependent merging method
as the minimiser of a sum of task-weighted quadratic distances,

.. math::

   \\theta^\\star = \\arg\\min_\\theta \\sum_m w_m \\lVert \\theta - \\theta_m \\rVert^2_{C_m}
   \\iff \\Big(\\sum_m w_m C_m + \\delta I\\Big) \\theta^\\star
        = \\sum_m w_m C_m \\theta_m + \\delta\\, \\theta_{\\text{init}},

with one positive semi-definite statistic C_m per task and parameter block
(:mod:`mats_jax.stats`). ``δ`` is an optional Tikhonov damping that pulls the
solution toward the initialisation; it is relative, ``δ = damping · τ`` with τ
the mean diagonal of ``Σ_m w_m C_m`` for the block, so one value suits blocks
whose statistics differ in scale by orders of magnitude.

Each block is its own system, solved in closed form (Diagonal, Gram and Dense
statistics) or by conjugate gradient from an initialisation; the report gives
per block the initial and final relative residuals, the iterations and how CG
stopped. Blocks of the same shape are batched into one CG (each block keeps
its own step sizes and stopping test). Leaves without a statistic take an
explicit fallback rule. The modules, one step each:

- :mod:`~mats_jax.solver.options`: :class:`SolverOptions`, the one record of
  choices, passed whole;
- :mod:`~mats_jax.solver.cg`: :func:`per_block_cg` (the default loop: it
  reports iterations and residuals, stops each block on its own and guards
  against divergence, things :func:`jax.scipy.sparse.linalg.cg` cannot do; the
  tests check it against that function step for step) and
  :func:`jax_scipy_cg`, JAX's own CG vmapped over the blocks;
- :mod:`~mats_jax.solver.blocking`: leaves to groups of blocks and back;
- :mod:`~mats_jax.solver.solve`: the traced solve, with the mesh split;
- :mod:`~mats_jax.solver.report`: :class:`LeafReport`, :class:`MergeResult`,
  :func:`format_report`.

The public entry points are :func:`mats_jax.solve`, :func:`mats_jax.mats`,
:func:`mats_jax.fisher_merge` and :func:`mats_jax.regmean`, and
:func:`mats_jax.lower_solve` for the compiled program's plan.
"""

from mats_jax.solver.cg import (
    BREAKDOWN,
    CONVERGED,
    DIVERGED,
    MAXITER,
    STATUS_NAMES,
    STOPPED,
    CGInfo,
    jax_scipy_cg,
    per_block_cg,
    relative_residual,
)
from mats_jax.solver.options import SolverOptions
from mats_jax.solver.report import (
    ConvergenceWarning,
    LeafReport,
    MergeResult,
    format_report,
)
from mats_jax.solver.solve import solve_traced

__all__ = [
    "BREAKDOWN",
    "CONVERGED",
    "DIVERGED",
    "MAXITER",
    "STATUS_NAMES",
    "STOPPED",
    "CGInfo",
    "ConvergenceWarning",
    "LeafReport",
    "MergeResult",
    "SolverOptions",
    "format_report",
    "jax_scipy_cg",
    "per_block_cg",
    "relative_residual",
    "solve_traced",
]
