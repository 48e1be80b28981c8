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

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import jax

from mats_jax.checks import MergeInputError, check_fraction
from mats_jax.engine import lower_in_memory, run_in_memory
from mats_jax.merge.subspace import SubspaceMerge, check_fallback, check_init
from mats_jax.solver.options import SolverOptions
from mats_jax.solver.report import MergeResult
from mats_jax.stats.rescale import equalise_scales
from mats_jax.stats.statistic import Statistic
from mats_jax.tree import register_record
from mats_jax.typing import Params, StatTree

__all__ = ["MATS", "MatsParameters", "lower_solve", "mats", "shape_statistics", "solve"]

Fallback = Literal["average", "init"]


@register_record
@dataclasses.dataclass(frozen=True)
class MatsParameters(SolverOptions):
    """MaTS's parameters: the solver's options, the initialisation and the fallback.

    Its other fields are those of :class:`~mats_jax.solver.SolverOptions`.

    Attributes:
      init: CG's starting point (the value kept in directions no task's
        statistic sees): None or ``"average"`` (the weighted average),
        ``"base"``, another method (a :class:`~mats_jax.method.MethodCall`,
        e.g. task arithmetic, the paper's choice), or a parameter pytree.
      fallback: the rule for leaves without a statistic: ``"average"``,
        ``"init"``, ``"base"`` or a parameter pytree.
      off_diagonal_scale: α in [0, 1]: each statistic's matrices M (both
        K-FAC factors, a Gram, a dense block) become ``αM + (1 − α) diag(M)``
        before the solve, as the paper's code shrinks them (its
        ``model_lambda``) and RegMean its Grams. 1 (the default): as estimated.
      equalise_scales: rescale every leaf's statistics to the same scale in
        every task (:func:`~mats_jax.stats.rescale.equalise_scales`), so that
        a task whose statistic is small on a leaf still counts there.
    """

    static_fields: ClassVar[tuple[str, ...]] = (
        *SolverOptions.static_fields,
        "equalise_scales",
    )

    init: Any = None
    fallback: Any = "average"
    off_diagonal_scale: Any = 1.0
    equalise_scales: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_init(self.init)
        check_fallback(self.fallback)
        check_fraction(
            "off_diagonal_scale",
            self.off_diagonal_scale,
            include_zero=True,
            include_one=True,
        )
        if not isinstance(self.equalise_scales, bool):
            raise MergeInputError(
                f"equalise_scales must be True or False, got {self.equalise_scales!r}"
            )


def shape_statistics(
    stats: Sequence[Statistic | None], params: MatsParameters
) -> list[Statistic | None]:
    """MaTS's statistics transform on one leaf's M statistics: the
    off-diagonal scale, then the scales equalised across tasks (each when asked)."""
    # Applied whatever α is: the merge traces it, and α = 1 leaves every entry as it is.
    out = [
        None if s is None else s.off_diagonal_scaled(params.off_diagonal_scale)
        for s in stats
    ]
    if params.equalise_scales:
        out = equalise_scales(out)
    return out


MATS = SubspaceMerge("mats", MatsParameters, transform=shape_statistics)


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
    cg: Literal["per_block", "jax_scipy"] = "per_block",
    off_diagonal_scale: float = 1.0,
    equalise_scales: bool = False,
) -> MergeResult:
    """Merges by conjugate gradient on ``(Σ_m w_m C_m) θ = Σ_m w_m C_m θ_m``.

    Values are checked before any work when concrete; traced ones (under an
    outer ``jax.jit``: NaN or Inf in models, weights or statistics,
    hyperparameters out of range, negative weights) are checked only when
    the call is wrapped in ``jax.experimental.checkify.checkify``, and pass
    unchecked otherwise (:func:`~mats_jax.checks.check_traced`).

    Args:
      models: M fine-tuned parameter pytrees θ_m.
      statistics: M pytrees with the parameters' structure holding a statistic
        per leaf (:class:`~mats_jax.KFAC`, :class:`~mats_jax.Gram`,
        :class:`~mats_jax.Diagonal`, :class:`~mats_jax.Dense`) or None.
      init: CG's starting point: ``task_arithmetic(...)`` (the paper's
        choice), ``ties(...)``, ``average(...)``, the base model, or any
        pytree. Default: the weighted average.
      weights: one non-negative weight per model, scaling its statistic
        (default: all 1).
      maxiter: CG steps per block at most. The paper runs 100 (the default
        here), and 10 for IA³ blocks; early stopping regularises, so choose it
        on validation data.
      tol: CG's relative residual tolerance per block. The default stops the
        blocks that converge sooner; 0 runs exactly ``maxiter`` steps, as the
        paper does.
      damping: relative Tikhonov damping (see :func:`~mats_jax.solve`); 0,
        the default, as in the paper.
      preconditioner: precondition CG with each statistic type's
        approximation of ``Σ_m w_m C_m + δI`` (see :func:`~mats_jax.solve`);
        off by default, as in the paper.
      fallback: the rule for leaves whose statistic is None: ``"average"``,
        ``"init"`` or a parameter pytree (see :func:`~mats_jax.solve`).
      precision: ``"float64"`` solves in double precision (needs
        ``jax_enable_x64``); default: float32, or the leaf's dtype if wider.
      check_every: every how many CG steps the divergence test recomputes the
        true residual (0: no test; :func:`~mats_jax.per_block_cg`).
      divergence_factor: a block whose true residual exceeds this factor
        times its best stops, returning its best checked iterate.
      group_blocks: batch same-shaped blocks of different leaves into one CG.
      cg: the CG loop, ``"per_block"`` (the default) or ``"jax_scipy"`` (see
        :func:`~mats_jax.solve`).
      off_diagonal_scale: α in [0, 1]: every statistic's matrices (both
        K-FAC factors) shrunk to ``αM + (1 − α) diag(M)``, as the paper's
        code does (its λ); 1, the default, leaves them as estimated. Choose
        it on validation data.
      equalise_scales: rescale each leaf's statistics to one scale across
        tasks (:func:`~mats_jax.equalise_statistic_scales`), for leaves where
        one task's statistic is far smaller than the others'.

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
        cg=cg,
        off_diagonal_scale=off_diagonal_scale,
        equalise_scales=equalise_scales,
    )


def _parameters(**options: Any) -> MatsParameters:
    params: MatsParameters = MATS.parameters(**options)
    return params


def solve(
    models: Sequence[Params],
    statistics: Sequence[StatTree],
    *,
    init: Params | None = None,
    weights: Any = None,
    fallback: Fallback | Params = "average",
    method: Literal["cg", "closed_form"] = "cg",
    maxiter: int = 100,
    tol: float = 1e-5,
    damping: float = 0.0,
    preconditioner: bool = False,
    precision: Literal["float32", "float64"] | None = None,
    check_every: int = 20,
    divergence_factor: float = 10.0,
    group_blocks: bool = True,
    cg: Literal["per_block", "jax_scipy"] = "per_block",
    off_diagonal_scale: float = 1.0,
    equalise_scales: bool = False,
) -> MergeResult:
    """Solves ``(Σ_m w_m C_m + δI) θ = Σ_m w_m C_m θ_m + δ θ_init`` per block.

    Values are checked before any work when concrete; traced ones (under an
    outer ``jax.jit``: NaN or Inf in models, weights or statistics,
    hyperparameters out of range, negative weights) are checked only when
    the call is wrapped in ``jax.experimental.checkify.checkify``, and pass
    unchecked otherwise (:func:`~mats_jax.checks.check_traced`).

    Args:
      models: the M fine-tuned parameter pytrees θ_m.
      statistics: M pytrees with the parameters' structure holding, per leaf, a
        statistic (:class:`~mats_jax.Diagonal`, :class:`~mats_jax.Gram`,
        :class:`~mats_jax.KFAC`, :class:`~mats_jax.Dense`) or None.
      init: the initialisation θ_init (CG's starting point; the value kept in
        directions no task's statistic sees). Default: the weighted average.
      weights: one non-negative weight per model, scaling its statistic
        (default: all 1).
      fallback: the rule for leaves whose statistic is None: ``"average"``
        (weighted average of the models), ``"init"`` (θ_init), or a parameter
        pytree to copy those leaves from (e.g. the pretrained model).
      method: ``"cg"`` (conjugate gradient) or ``"closed_form"`` (exact, for
        statistic types that have one).
      maxiter: CG steps per block at most. Early stopping regularises: it is a
        hyperparameter, not only a budget.
      tol: CG's relative residual tolerance per block.
      damping: relative Tikhonov damping δ/τ (see the module docstring);
        needed when Σ C_m is singular and the initialisation is not a value you
        want kept in its null space, or when CG breaks down on it.
      preconditioner: precondition CG with each statistic type's
        approximation of ``Σ_m w_m C_m + δI`` (exact for Diagonal, Gram and
        Dense; the nearest Kronecker product for KFAC).
      precision: ``"float64"`` runs the solve in double precision (needs
        ``jax.config.update("jax_enable_x64", True)``); default: float32, or
        the leaf's dtype if wider.
      check_every: every how many CG steps the divergence test recomputes the
        true residual (0: no test; :func:`~mats_jax.per_block_cg`).
      divergence_factor: a block whose true residual exceeds this factor
        times its best stops, returning its best checked iterate.
      group_blocks: batch same-shaped blocks of different leaves into one CG.
      cg: the CG loop: ``"per_block"`` (:func:`~mats_jax.per_block_cg`, the
        default: per-block iterations, residuals, stopping status and a
        divergence guard) or ``"jax_scipy"`` (:func:`jax.scipy.sparse.linalg.cg`
        vmapped over the blocks; its report has the residuals but not the
        iterations, shown as ``?``, nor why a block stopped short).
      off_diagonal_scale: α in [0, 1]: each statistic's matrices M become
        ``αM + (1 − α) diag(M)`` (see :class:`MatsParameters`); 1: as given.
      equalise_scales: rescale each leaf's statistics to one scale across
        tasks (see :class:`MatsParameters`).

    Returns:
      A :class:`MergeResult`: parameters in the models' dtypes, and a report
      pytree of :class:`LeafReport`. Blocks where CG stopped short of ``tol``
      are also announced with a :class:`ConvergenceWarning` (when not traced).

    Raises:
      MergeInputError: on inputs that do not fit, before any work.

    Examples:
      Diagonal statistics (Fisher merging) solved in closed form and by CG from
      a given start; both give (3·1 + 1·0)/4 and (1·0 + 1·1)/2.

      >>> import jax.numpy as jnp
      >>> from mats_jax import STATUS_NAMES, Diagonal, solve
      >>> models = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}]
      >>> stats = [{"w": Diagonal(jnp.array([3.0, 1.0]))},
      ...          {"w": Diagonal(jnp.array([1.0, 1.0]))}]
      >>> solve(models, stats, method="closed_form").params["w"]
      Array([0.75, 0.5 ], dtype=float32)
      >>> merged, report = solve(models, stats, init={"w": jnp.zeros(2)}, maxiter=5)
      >>> merged["w"], report["w"].iterations, STATUS_NAMES[int(report["w"].status[0])]
      (Array([0.75, 0.5 ], dtype=float32), Array([2], dtype=int32), 'converged')
    """
    params = _parameters(
        init=init,
        fallback=fallback,
        method=method,
        maxiter=maxiter,
        tol=tol,
        damping=damping,
        preconditioner=preconditioner,
        precision=precision,
        check_every=check_every,
        divergence_factor=divergence_factor,
        group_blocks=group_blocks,
        cg=cg,
        off_diagonal_scale=off_diagonal_scale,
        equalise_scales=equalise_scales,
    )
    return run_in_memory(
        MATS, params, models=models, statistics=statistics, weights=weights
    )


def lower_solve(
    models: Sequence[Params],
    statistics: Sequence[StatTree],
    *,
    init: Params | None = None,
    weights: Any = None,
    fallback: Fallback | Params = "average",
    method: Literal["cg", "closed_form"] = "cg",
    maxiter: int = 100,
    tol: float = 1e-5,
    damping: float = 0.0,
    preconditioner: bool = False,
    precision: Literal["float32", "float64"] | None = None,
    check_every: int = 20,
    divergence_factor: float = 10.0,
    group_blocks: bool = True,
    cg: Literal["per_block", "jax_scipy"] = "per_block",
    off_diagonal_scale: float = 1.0,
    equalise_scales: bool = False,
) -> jax.stages.Lowered:
    """The solve :func:`solve` would run, lowered for these inputs, without running it.

    Compile it to see what a merge needs before starting it, e.g. the memory
    per device of a sharded merge::

        memory = lower_solve(models, statistics).compile().memory_analysis()

    Takes exactly :func:`solve`'s arguments and validates them the same way.

    Examples:
      >>> import jax.numpy as jnp
      >>> from mats_jax import KFAC, lower_solve
      >>> models = [{"k": jnp.ones((4, 3))}, {"k": jnp.zeros((4, 3))}]
      >>> stats = [{"k": KFAC(jnp.eye(4), jnp.eye(3))}, {"k": KFAC(2 * jnp.eye(4), jnp.eye(3))}]
      >>> compiled = lower_solve(models, stats, maxiter=50).compile()
      >>> compiled.memory_analysis().argument_size_in_bytes > 0
      True
    """
    params = _parameters(
        init=init,
        fallback=fallback,
        method=method,
        maxiter=maxiter,
        tol=tol,
        damping=damping,
        preconditioner=preconditioner,
        precision=precision,
        check_every=check_every,
        divergence_factor=divergence_factor,
        group_blocks=group_blocks,
        cg=cg,
        off_diagonal_scale=off_diagonal_scale,
        equalise_scales=equalise_scales,
    )
    return lower_in_memory(
        MATS, params, models=models, statistics=statistics, weights=weights
    )
