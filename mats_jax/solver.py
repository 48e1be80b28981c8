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

:func:`solve` solves each block as its own system, either in closed form
(Diagonal, Gram and Dense statistics) or by conjugate gradient
(:func:`per_block_cg`), from an initialisation, and reports per block the
initial and final relative residuals, the iterations and how CG stopped.
Blocks of the same shape are batched into one CG (each block keeps its own step
sizes and stopping test). Leaves without a statistic take an explicit fallback
rule. The whole solve is one jitted function: it compiles once per shape
signature, and sweeping the initialisation, iterations, tolerance, damping or
weights reuses the compiled code.

On a device mesh (inputs sharded with ``NamedSharding``), each group of
same-shaped blocks is padded to a multiple of the device count and split over
the devices along its block axis; every device runs CG on its own blocks
under :func:`jax.shard_map`, with no communication in the loop, and each
merged leaf gets its model leaf's sharding back (:mod:`mats_jax.sharding`).
:func:`lower_solve` returns the compiled program's plan, e.g. to read the
memory per device before a merge.

Why not ``jax.scipy.sparse.linalg.cg`` itself: it reports neither iterations
nor residuals and cannot stop a block whose residual grows; :func:`per_block_cg`
is the same iteration (the tests check it against ``jax.scipy``'s, step for
step) with those additions.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mats_jax import checks
from mats_jax.sharding import (
    block_sharding,
    input_mesh,
    keep_shardings,
    leaf_shardings,
    replicated,
)
from mats_jax.stats.statistic import EighSequence, Statistic
from mats_jax.tree import compute_dtype, leaf_paths, path_str
from mats_jax.tree import total as sum_of
from mats_jax.typing import Array, Params, StatTree

__all__ = [
    "STATUS_NAMES",
    "CGInfo",
    "ConvergenceWarning",
    "LeafReport",
    "MergeResult",
    "format_report",
    "lower_solve",
    "per_block_cg",
    "relative_residual",
    "solve",
]

CONVERGED, MAXITER, DIVERGED, BREAKDOWN = 0, 1, 2, 3
STATUS_NAMES = ("converged", "maxiter", "diverged", "breakdown")
"""How a block's solve ended, indexed by ``LeafReport.status``."""


class ConvergenceWarning(UserWarning):
    """CG stopped before reaching its tolerance on some blocks."""


class CGInfo(NamedTuple):
    """Per-block outcome of :func:`per_block_cg`; every field has shape (B,).

    Attributes:
      initial_residual: ``‖b − A x₀‖ / ‖b‖``.
      final_residual: ``‖b − A x‖ / ‖b‖`` of the returned x, recomputed (not
        the recursive estimate CG steers by).
      iterations: CG steps taken by the block.
      status: index into :data:`STATUS_NAMES`.

    Examples:
      Two blocks of a diagonal system, one of them already solved at x₀:

      >>> import jax.numpy as jnp
      >>> from mats_jax import STATUS_NAMES, per_block_cg
      >>> a = jnp.array([[1.0, 2.0], [1.0, 1.0]])
      >>> b = jnp.array([[1.0, 1.0], [1.0, 1.0]])
      >>> x, info = per_block_cg(lambda v: a * v, b, jnp.array([[0.0, 0.0], [1.0, 1.0]]))
      >>> info.iterations, [STATUS_NAMES[int(s)] for s in info.status]
      (Array([2, 0], dtype=int32), ['converged', 'converged'])
    """

    initial_residual: Array
    final_residual: Array
    iterations: Array
    status: Array


def _block_dot(u: Array, v: Array) -> Array:
    return jnp.sum(u * v, axis=tuple(range(1, u.ndim)))


def _per_block(values: Array, like: Array) -> Array:
    return values.reshape(values.shape + (1,) * (like.ndim - 1))


def _norm_or_one(b: Array) -> Array:
    norm = jnp.sqrt(_block_dot(b, b))
    return jnp.where(norm > 0, norm, 1.0)


def relative_residual(matvec: Callable[[Array], Array], b: Array, x: Array) -> Array:
    """``‖b − A x‖ / ‖b‖`` per block (``‖b − A x‖`` where b is zero)."""
    r = b - matvec(x)
    return jnp.sqrt(_block_dot(r, r)) / _norm_or_one(b)


def per_block_cg(
    matvec: Callable[[Array], Array],
    b: Array,
    x0: Array,
    *,
    maxiter: Any = 100,
    tol: Any = 1e-5,
    precond: Callable[[Array], Array] | None = None,
    check_every: int = 20,
    divergence_factor: Any = 10.0,
) -> tuple[Array, CGInfo]:
    """Preconditioned conjugate gradient on B independent SPD systems at once.

    Solves ``A_i x_i = b_i`` for each block i (the leading axis of ``b``),
    where ``matvec`` applies every ``A_i`` to a batch. Each block has its own
    step sizes, its own stopping test and its own iteration count; a stopped
    block no longer changes while the others go on.

    A block stops when its (recursive) relative residual ``‖r‖/‖b‖`` is at most
    ``tol``, when ``maxiter`` steps are done, on breakdown (``pᵀAp ≤ 0`` or a
    non-finite step), or when it diverges: every ``check_every`` steps the true
    residual ``‖b − A x‖`` is recomputed; float32 CG run long past convergence,
    or on a singular system whose right side has rounding noise outside the
    range of A, can see it grow while the recursive residual still shrinks. A
    block whose true residual exceeds ``divergence_factor`` times the best seen
    stops and returns its best checked iterate.

    Args:
      matvec: ``x ↦ A x`` for a batch ``x`` of b's shape.
      b: right-hand sides, ``(B, ...)``.
      x0: initial iterates, b's shape. Components in the null space of A keep
        their value: CG never moves them.
      maxiter: the most steps per block (may be traced).
      tol: relative residual tolerance (may be traced); 0 runs ``maxiter`` steps.
      precond: ``r ↦ P⁻¹ r`` for an SPD (or PSD) approximation P of A, or None.
      check_every: steps between true-residual checks (static); 0 disables them.
      divergence_factor: growth of the true residual over its best that counts
        as divergence.

    Returns:
      ``(x, info)``: the iterates and a :class:`CGInfo`.

    Examples:
      >>> import jax.numpy as jnp
      >>> a = jnp.array([[[4.0, 1.0], [1.0, 3.0]]])
      >>> b = jnp.array([[1.0, 2.0]])
      >>> x, info = per_block_cg(lambda v: jnp.einsum("bij,bj->bi", a, v), b, jnp.zeros_like(b))
      >>> x.round(4), info.iterations
      (Array([[0.0909, 0.6364]], dtype=float32), Array([2], dtype=int32))
    """
    apply_p = precond if precond is not None else (lambda r: r)
    dtype = b.dtype
    tol = jnp.asarray(tol, dtype)
    divergence_factor = jnp.asarray(divergence_factor, dtype)
    maxiter = jnp.asarray(maxiter, jnp.int32)
    denom = _norm_or_one(b)

    def relative(r: Array) -> Array:
        return jnp.sqrt(_block_dot(r, r)) / denom

    r = b - matvec(x0)
    z = apply_p(r)
    rz = _block_dot(r, z)
    res0 = relative(r)
    active = (res0 > tol) & (maxiter > 0)
    status = jnp.where(res0 <= tol, CONVERGED, MAXITER).astype(jnp.int32)
    n_blocks = b.shape[0]
    state = dict(
        k=jnp.zeros((), jnp.int32),
        x=x0,
        r=r,
        p=z,
        rz=rz,
        active=active,
        status=status,
        iterations=jnp.zeros((n_blocks,), jnp.int32),
        x_best=x0,
        best=res0,
    )

    def cond(s: dict[str, Array]) -> Array:
        return (s["k"] < maxiter) & jnp.any(s["active"])

    def check_divergence(s: dict[str, Array]) -> dict[str, Array]:
        true_res = relative_residual(matvec, b, s["x"])
        improved = true_res < s["best"]
        diverged = s["active"] & (true_res > divergence_factor * s["best"])
        best = jnp.where(improved, true_res, s["best"])
        x_best = jnp.where(_per_block(improved, b), s["x"], s["x_best"])
        return dict(
            s,
            x_best=x_best,
            best=best,
            x=jnp.where(_per_block(diverged, b), x_best, s["x"]),
            active=s["active"] & ~diverged,
            status=jnp.where(diverged, DIVERGED, s["status"]),
        )

    def body(s: dict[str, Array]) -> dict[str, Array]:
        p, active = s["p"], s["active"]
        ap = matvec(p)
        pap = _block_dot(p, ap)
        ok = active & (pap > 0) & jnp.isfinite(pap)
        alpha = jnp.where(ok, s["rz"] / jnp.where(ok, pap, 1.0), 0.0)
        x = s["x"] + _per_block(alpha, b) * p
        r = s["r"] - _per_block(alpha, b) * ap
        z = apply_p(r)
        rz_new = _block_dot(r, z)
        beta = jnp.where(
            ok & (s["rz"] > 0), rz_new / jnp.where(s["rz"] > 0, s["rz"], 1.0), 0.0
        )
        converged = ok & (relative(r) <= tol)
        # A zero preconditioned residual with the tolerance unmet means the rest
        # of r lies where P⁻¹ is zero: no further progress is possible.
        stalled = ok & ~converged & ~(rz_new > 0)
        status = jnp.where(converged, CONVERGED, s["status"])
        status = jnp.where((active & ~ok) | stalled, BREAKDOWN, status)
        new = dict(
            s,
            k=s["k"] + 1,
            x=x,
            r=r,
            p=jnp.where(_per_block(ok, b), z + _per_block(beta, b) * p, p),
            rz=jnp.where(ok, rz_new, s["rz"]),
            active=ok & ~converged & ~stalled,
            status=status,
            iterations=s["iterations"] + ok.astype(jnp.int32),
        )
        if check_every <= 0:
            return new
        return jax.lax.cond(
            new["k"] % check_every == 0, check_divergence, lambda t: t, new
        )

    final = jax.lax.while_loop(cond, body, state)
    x = final["x"]
    info = CGInfo(
        initial_residual=res0,
        final_residual=relative_residual(matvec, b, x),
        iterations=final["iterations"],
        status=final["status"],
    )
    return x, info


@dataclasses.dataclass(frozen=True)
class LeafReport:
    """How one parameter leaf was merged.

    Attributes:
      solver: ``"cg"``, ``"closed_form"``, or ``"fallback:<rule>"`` for a leaf
        without a statistic.
      initial_residual, final_residual, iterations, status: per block, shape
        (B,) (one entry per layer for ``nn.scan``-stacked kernels); None for
        fallback leaves. See :class:`CGInfo`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from mats_jax import KFAC, mats
      >>> models = [{"k": jnp.ones((2, 2)), "b": jnp.zeros(2)},
      ...           {"k": jnp.zeros((2, 2)), "b": jnp.ones(2)}]
      >>> stats = [{"k": KFAC(jnp.eye(2), jnp.eye(2)), "b": None},
      ...          {"k": KFAC(3 * jnp.eye(2), jnp.eye(2)), "b": None}]
      >>> report = mats(models, stats).report
      >>> report["k"].solver, report["k"].iterations, report["b"].solver
      ('cg', Array([1], dtype=int32), 'fallback:average')
    """

    solver: str
    initial_residual: Array | None = None
    final_residual: Array | None = None
    iterations: Array | None = None
    status: Array | None = None


jax.tree_util.register_dataclass(
    LeafReport,
    data_fields=["initial_residual", "final_residual", "iterations", "status"],
    meta_fields=["solver"],
)


class MergeResult(NamedTuple):
    """The merged parameters and, per leaf, a :class:`LeafReport`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from mats_jax import Diagonal, fisher_merge
      >>> result = fisher_merge([{"w": jnp.ones(2)}, {"w": jnp.zeros(2)}],
      ...                       [{"w": Diagonal(jnp.ones(2))}] * 2)
      >>> result.params["w"], result.report["w"].solver
      (Array([0.5, 0.5], dtype=float32), 'closed_form')
      >>> params, report = result   # a NamedTuple unpacks
    """

    params: Params
    report: Any


Fallback = Literal["average", "init"]


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
) -> MergeResult:
    """Solves ``(Σ_m w_m C_m + δI) θ = Σ_m w_m C_m θ_m + δ θ_init`` per block.

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
      check_every, divergence_factor: CG's divergence test (:func:`per_block_cg`).
      group_blocks: batch same-shaped blocks of different leaves into one CG.

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
    checked = check_inputs(
        models,
        statistics,
        weights=weights,
        init=init,
        fallback=fallback,
        method=method,
        maxiter=maxiter,
        tol=tol,
        damping=damping,
        precision=precision,
        check_every=check_every,
        divergence_factor=divergence_factor,
    )
    return execute(
        models,
        checked,
        init=init,
        method=method,
        maxiter=maxiter,
        tol=tol,
        damping=damping,
        preconditioner=preconditioner,
        precision=precision,
        check_every=check_every,
        divergence_factor=divergence_factor,
        group_blocks=group_blocks,
    )


class CheckedInputs(NamedTuple):
    """What :func:`check_inputs` validated, ready for :func:`execute`."""

    per_task: list[list[Statistic | None]]
    weights: Array
    fallback: str
    fallback_tree: Params | None
    paths: list[str]


def check_inputs(
    models: Sequence[Params],
    statistics: Sequence[StatTree],
    *,
    weights: Any = None,
    init: Params | None = None,
    fallback: Fallback | Params = "average",
    method: str = "cg",
    maxiter: Any = 100,
    tol: Any = 1e-5,
    damping: Any = 0.0,
    precision: str | None = None,
    check_every: int = 20,
    divergence_factor: Any = 10.0,
    allowed: tuple[type, ...] = (Statistic,),
    name: str = "statistics",
) -> CheckedInputs:
    """Validates everything :func:`solve` takes, before any work.

    Methods that transform their statistics (Fisher merging's floor,
    RegMean's shrinkage) validate the raw ones here, transform the checked
    ``per_task`` lists, and hand them to :func:`execute`.
    """
    input_mesh(models, statistics, init, fallback)  # one mesh, or a clear error
    checks.check_models(models)
    checked_weights = checks.check_weights(weights, len(models))
    per_task = checks.check_statistics(statistics, models, allowed=allowed, name=name)
    if init is not None:
        checks.check_like(init, models[0], "init")
    fallback_tree = None
    if not isinstance(fallback, str):
        checks.check_like(fallback, models[0], "fallback")
        fallback_tree, fallback = fallback, "given"
    elif fallback not in ("average", "init"):
        raise checks.MergeInputError(
            f"fallback must be 'average', 'init' or a parameter pytree, got {fallback!r}"
        )
    if method not in ("cg", "closed_form"):
        raise checks.MergeInputError(
            f"method must be 'cg' or 'closed_form', got {method!r}"
        )
    paths = jax.tree.leaves(leaf_paths(models[0]))
    if method == "closed_form":
        for path, stat in zip(paths, per_task[0], strict=True):
            if stat is not None and not stat.has_closed_form:
                raise checks.MergeInputError(
                    f"{name} at {path!r}: {stat.kind} has no closed-form solve; "
                    "use method='cg' (mats)"
                )
    _check_solver_numbers(maxiter, tol, damping, check_every, divergence_factor)
    if precision not in (None, "float32", "float64"):
        raise checks.MergeInputError(
            f"precision must be 'float32' or 'float64', got {precision!r}"
        )
    if precision == "float64" and not jax.config.read("jax_enable_x64"):
        raise checks.MergeInputError(
            "precision='float64' needs double precision enabled: "
            "jax.config.update('jax_enable_x64', True) before creating arrays"
        )
    return CheckedInputs(per_task, checked_weights, fallback, fallback_tree, paths)


def execute(
    models: Sequence[Params],
    checked: CheckedInputs,
    *,
    init: Params | None = None,
    method: str = "cg",
    maxiter: Any = 100,
    tol: Any = 1e-5,
    damping: Any = 0.0,
    preconditioner: bool = False,
    precision: str | None = None,
    check_every: int = 20,
    divergence_factor: Any = 10.0,
    group_blocks: bool = True,
) -> MergeResult:
    """Runs the jitted solve on inputs :func:`check_inputs` validated.

    Inputs sharded on a mesh (see :mod:`mats_jax.sharding`) are solved there,
    each device its own blocks, and every merged leaf keeps its model leaf's
    sharding.
    """
    args, options = _jit_arguments(
        models,
        checked,
        init=init,
        method=method,
        maxiter=maxiter,
        tol=tol,
        damping=damping,
        preconditioner=preconditioner,
        precision=precision,
        check_every=check_every,
        divergence_factor=divergence_factor,
        group_blocks=group_blocks,
    )
    params, report = _solve_jit(*args, **options)
    if isinstance(tol, jax.core.Tracer) or tol > 0:
        # tol = 0 asks for exactly maxiter steps (as the paper runs): no warning.
        _warn_unconverged(report, checked.paths)
    return MergeResult(params, report)


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
    checked = check_inputs(
        models,
        statistics,
        weights=weights,
        init=init,
        fallback=fallback,
        method=method,
        maxiter=maxiter,
        tol=tol,
        damping=damping,
        precision=precision,
        check_every=check_every,
        divergence_factor=divergence_factor,
    )
    args, options = _jit_arguments(
        models,
        checked,
        init=init,
        method=method,
        maxiter=maxiter,
        tol=tol,
        damping=damping,
        preconditioner=preconditioner,
        precision=precision,
        check_every=check_every,
        divergence_factor=divergence_factor,
        group_blocks=group_blocks,
    )
    lowered: jax.stages.Lowered = _solve_jit.lower(*args, **options)
    return lowered


def _jit_arguments(
    models: Sequence[Params],
    checked: CheckedInputs,
    *,
    init: Params | None,
    method: str,
    maxiter: Any,
    tol: Any,
    damping: Any,
    preconditioner: bool,
    precision: str | None,
    check_every: int,
    divergence_factor: Any,
    group_blocks: bool,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments of ``_solve_jit`` for checked inputs."""
    args = (
        models,
        checked.per_task,
        init,
        checked.fallback_tree,
        checked.weights,
        maxiter,
        tol,
        damping,
        divergence_factor,
    )
    options = dict(
        method=method,
        preconditioner=preconditioner,
        fallback=checked.fallback,
        precision=precision,
        check_every=int(check_every),
        group_blocks=group_blocks,
        **_placement(models, checked, init),
    )
    return args, options


def _placement(
    models: Sequence[Params], checked: CheckedInputs, init: Params | None
) -> dict[str, Any]:
    """The mesh the inputs live on and the shardings the merged leaves keep."""
    mesh = input_mesh(models, checked.per_task, init, checked.fallback_tree)
    if mesh is None:
        return {}
    return {"mesh": mesh, "out_shardings": leaf_shardings(models[0])}


def _check_solver_numbers(
    maxiter: Any, tol: Any, damping: Any, check_every: Any, divergence_factor: Any
) -> None:
    def concrete(v: Any) -> bool:
        return not isinstance(v, jax.core.Tracer)

    if concrete(maxiter) and (int(maxiter) != maxiter or int(maxiter) < 0):
        raise checks.MergeInputError(
            f"maxiter must be a non-negative integer, got {maxiter!r}"
        )
    for name, value in (("tol", tol), ("damping", damping)):
        if concrete(value) and not (np.isfinite(float(value)) and float(value) >= 0):
            raise checks.MergeInputError(
                f"{name} must be finite and >= 0, got {value!r}"
            )
    if int(check_every) < 0:
        raise checks.MergeInputError(f"check_every must be >= 0, got {check_every!r}")
    if concrete(divergence_factor) and not float(divergence_factor) > 1:
        raise checks.MergeInputError(
            f"divergence_factor must be > 1, got {divergence_factor!r}"
        )


def _warn_unconverged(report: Any, paths: Sequence[str]) -> None:
    leaves = jax.tree.leaves(report, is_leaf=lambda x: isinstance(x, LeafReport))
    short = []
    for path, leaf in zip(paths, leaves, strict=True):
        if leaf.solver != "cg" or isinstance(leaf.status, jax.core.Tracer):
            continue
        status = np.asarray(leaf.status)
        for i in np.flatnonzero(status != CONVERGED):
            where = path if status.size == 1 else f"{path}[block {i}]"
            short.append(
                f"{where}: {STATUS_NAMES[status[i]]}, relative residual "
                f"{float(np.asarray(leaf.final_residual)[i]):.3g}"
            )
    if short:
        warnings.warn(
            f"CG stopped before its tolerance on {len(short)} block(s): "
            + "; ".join(short[:10])
            + (" …" if len(short) > 10 else ""),
            ConvergenceWarning,
            stacklevel=_caller_stacklevel(),
        )


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning to the first caller outside mats_jax."""
    package = os.path.dirname(os.path.abspath(__file__))
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        package + os.sep
    ):
        level += 1
        frame = frame.f_back  # type: ignore[assignment]
    return level


def _present(stat: Statistic | None) -> Statistic:
    assert stat is not None, "grouped leaves all have statistics"
    return stat


class _Group(NamedTuple):
    indices: list[int]
    stat_type: type[Statistic]


def _group_leaves(
    per_task: list[list[Statistic | None]], leaves: list[Array], group_blocks: bool
) -> list[_Group]:
    groups: dict[Any, _Group] = {}
    for i, stat in enumerate(per_task[0]):
        if stat is None:
            continue
        blocked = stat.blocked(tuple(leaves[i].shape))
        shapes = tuple(x.shape[1:] for x in jax.tree.leaves(blocked))
        # The blocks' own shape too: a Gram fixes only the input size, and
        # kernels (256, 256) and (256, 1024) cannot share one batch.
        block = jax.eval_shape(stat.to_blocks, leaves[i]).shape[1:]
        key = (
            (type(stat), shapes, block, compute_dtype(leaves[i].dtype))
            if group_blocks
            else i
        )
        groups.setdefault(key, _Group([], type(stat))).indices.append(i)
    return list(groups.values())


def _solve_traced(
    models: Sequence[Params],
    per_task: list[list[Statistic | None]],
    init: Params | None,
    fallback_tree: Params | None,
    weights: Array,
    maxiter: Any,
    tol: Any,
    damping: Any,
    divergence_factor: Any,
    *,
    method: str,
    preconditioner: bool,
    fallback: str,
    precision: str | None,
    check_every: int,
    group_blocks: bool,
    mesh: Mesh | None = None,
    out_shardings: tuple[NamedSharding | None, ...] | None = None,
) -> tuple[Params, Any]:
    model_leaves = [jax.tree.leaves(model) for model in models]
    treedef = jax.tree.structure(models[0])
    reference = model_leaves[0]
    n_leaves = len(reference)
    total_weight = jnp.sum(weights)

    def average(i: int) -> Array:
        dtype = compute_dtype(reference[i].dtype)
        acc = sum_of(
            w.astype(dtype) * leaves[i].astype(dtype)
            for w, leaves in zip(weights, model_leaves, strict=True)
        )
        return acc / total_weight.astype(dtype)

    init_leaves = jax.tree.leaves(init) if init is not None else None

    def init_leaf(i: int) -> Array:
        return init_leaves[i] if init_leaves is not None else average(i)

    out: list[Array | None] = [None] * n_leaves
    reports: list[LeafReport | None] = [None] * n_leaves
    fallback_leaves = (
        jax.tree.leaves(fallback_tree) if fallback_tree is not None else None
    )
    for i in range(n_leaves):
        if per_task[0][i] is not None:
            continue
        if fallback == "average":
            value = average(i)
        elif fallback == "init":
            value = init_leaf(i)
        else:
            assert fallback_leaves is not None
            value = fallback_leaves[i]
        out[i] = value.astype(reference[i].dtype)
        reports[i] = LeafReport(solver=f"fallback:{fallback}")

    # Every group as blocked arrays: statistics (weighted), the models and the
    # initialisation, each with a leading block axis.
    groups = _group_leaves(per_task, reference, group_blocks)
    blocked: list[_Blocked] = []
    layouts_of: list[list[Any]] = []
    for group in groups:
        idx = group.indices
        shapes = [tuple(reference[i].shape) for i in idx]
        dtype = (
            np.dtype(precision) if precision else compute_dtype(reference[idx[0]].dtype)
        )
        layouts = [_present(per_task[0][i]) for i in idx]
        layouts_of.append(layouts)

        def gather(
            arrays: list[Array], dtype: Any = dtype, layouts: list[Any] = layouts
        ) -> Array:
            return jnp.concatenate(
                [
                    lay.to_blocks(x.astype(dtype))
                    for lay, x in zip(layouts, arrays, strict=True)
                ]
            )

        stats = []
        for m, task in enumerate(per_task):
            parts = [
                _present(task[i]).blocked(s).astype(dtype)
                for i, s in zip(idx, shapes, strict=True)
            ]
            # Blocked statistics of one group differ at most in their layout
            # metadata (a stacked kernel's axes are not a plain kernel's),
            # which blocked arithmetic never reads: concatenate the arrays.
            stacked = jax.tree.unflatten(
                jax.tree.structure(parts[0]),
                [
                    jnp.concatenate(xs)
                    for xs in zip(*(jax.tree.leaves(p) for p in parts), strict=True)
                ],
            )
            stats.append(stacked.scaled(weights[m].astype(dtype)))
        blocked.append(
            _Blocked(
                stats,
                [gather([leaves[i] for i in idx]) for leaves in model_leaves],
                gather([init_leaf(i) for i in idx]),
            )
        )

    def solve_blocks(
        blocked: list[_Blocked], numbers: tuple[Any, ...]
    ) -> list[tuple[Array, CGInfo]]:
        return _solve_groups(
            blocked,
            [g.stat_type for g in groups],
            numbers,
            method=method,
            preconditioner=preconditioner,
            check_every=check_every,
        )

    numbers = (maxiter, tol, damping, divergence_factor)
    if mesh is None:
        solved = solve_blocks(blocked, numbers)
    else:
        # Each device solves its own blocks: no communication in the CG loop.
        n_devices = mesh.size
        spread = block_sharding(mesh)
        sizes = [g.x0.shape[0] for g in blocked]
        padded = [
            jax.lax.with_sharding_constraint(
                _pad_blocks(g, -(-n // n_devices) * n_devices), spread
            )
            for g, n in zip(blocked, sizes, strict=True)
        ]
        solved = jax.shard_map(
            solve_blocks,
            mesh=mesh,
            in_specs=(spread.spec, PartitionSpec()),
            out_specs=spread.spec,
            check_vma=False,
        )(padded, numbers)
        solved = [
            (x[:n], jax.tree.map(lambda v, n=n: v[:n], info))
            for (x, info), n in zip(solved, sizes, strict=True)
        ]

    solver_name = "closed_form" if method == "closed_form" else "cg"
    for group, layouts, (x, info) in zip(groups, layouts_of, solved, strict=True):
        if mesh is not None:
            # The report is small: every process gets all of it.
            info = jax.lax.with_sharding_constraint(info, replicated(mesh))
        start = 0
        for i, lay in zip(group.indices, layouts, strict=True):
            shape = tuple(reference[i].shape)
            n_blocks = lay.to_blocks(jnp.zeros(shape, jnp.bool_)).shape[0]
            piece = slice(start, start + n_blocks)
            blocks = x[piece]
            if mesh is not None and blocks.shape[-1] % mesh.size == 0:
                # Whole blocks per device to split last axes (an all-to-all),
                # from which XLA reaches the leaf's own layout without
                # gathering a block onto every device.
                blocks = jax.lax.with_sharding_constraint(
                    blocks,
                    NamedSharding(
                        mesh,
                        PartitionSpec(
                            *([None] * (blocks.ndim - 1)), tuple(mesh.axis_names)
                        ),
                    ),
                )
            out[i] = lay.from_blocks(blocks, shape).astype(reference[i].dtype)
            reports[i] = LeafReport(
                solver_name,
                info.initial_residual[piece],
                info.final_residual[piece],
                info.iterations[piece],
                info.status[piece],
            )
            start += n_blocks
    out = keep_shardings(out, out_shardings)
    return jax.tree.unflatten(treedef, out), jax.tree.unflatten(treedef, reports)


def _at_highest_matmul_precision(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` traced with every matmul at ``"highest"`` precision.

    The attainable residual of CG is set by the accuracy of its products:
    "float32" must mean float32 matmuls, not the TF32 or bf16 passes that GPUs
    and TPUs use for float32 by default (an H200 ran this solver's matmuls at
    TF32 unless told otherwise: benchmarks/results/device_h200.md).
    """

    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return traced


_solve_jit = jax.jit(
    _at_highest_matmul_precision(_solve_traced),
    static_argnames=(
        "method",
        "preconditioner",
        "fallback",
        "precision",
        "check_every",
        "group_blocks",
        "mesh",
        "out_shardings",
    ),
)


class _Blocked(NamedTuple):
    """One group's arrays, each with a leading block axis B."""

    stats: list[Statistic]  # per task, weighted
    models: list[Array]  # per task
    x0: Array


def _pad_blocks(blocked: _Blocked, size: int) -> _Blocked:
    """Appends empty blocks (zero statistics, models and start) up to ``size`` blocks.

    An empty block's right side is zero and so is its start: CG finds it
    converged before the first step.
    """

    def pad(x: Array) -> Array:
        return jnp.pad(x, [(0, size - x.shape[0])] + [(0, 0)] * (x.ndim - 1))

    return jax.tree.map(pad, blocked)


def _solve_groups(
    blocked: list[_Blocked],
    stat_types: list[type[Statistic]],
    numbers: tuple[Any, ...],
    *,
    method: str,
    preconditioner: bool,
    check_every: int,
) -> list[tuple[Array, CGInfo]]:
    """Solves every group's blocks; blocks are independent, so any split of them works."""
    maxiter, tol, damping, divergence_factor = numbers
    eigh = EighSequence()  # every eigendecomposition of this solve, one at a time
    prepared: list[Any] = []
    for group, stat_type in zip(blocked, stat_types, strict=True):
        stats, x0 = group.stats, group.x0
        dtype = x0.dtype
        delta = jnp.asarray(damping, dtype) * sum_of(s.diagonal_mean() for s in stats)

        def matvec(
            x: Array, stats: list[Statistic] = stats, delta: Array = delta
        ) -> Array:
            return sum_of(s.matvec(x) for s in stats) + _per_block(delta, x) * x

        b = sum_of(s.matvec(v) for s, v in zip(stats, group.models, strict=True))
        rhs = b + _per_block(delta, x0) * x0
        if method == "closed_form":
            inverse = stat_type.sum_pinv(stats, delta, eigh)
        elif preconditioner:
            inverse = stat_type.sum_preconditioner(stats, delta, eigh)
        else:
            inverse = None
        prepared.append((matvec, x0, rhs, inverse))

    solved = []
    for matvec, x0, rhs, inverse in prepared:
        # No loop may start before the last eigendecomposition is done (see
        # EighSequence: a CG loop and an eigh waiting at once hang jaxlib 0.10).
        x0, rhs = eigh.after_all(x0, rhs)
        if method == "closed_form":
            assert inverse is not None
            x = x0 + inverse(rhs - matvec(x0))
            no_steps = jnp.zeros(rhs.shape[:1], jnp.int32)
            info = CGInfo(
                relative_residual(matvec, rhs, x0),
                relative_residual(matvec, rhs, x),
                iterations=no_steps,
                status=no_steps + CONVERGED,
            )
        else:
            x, info = per_block_cg(
                matvec,
                rhs,
                x0,
                maxiter=maxiter,
                tol=tol,
                precond=inverse,
                check_every=check_every,
                divergence_factor=divergence_factor,
            )
        solved.append((x, info))
    return solved


def format_report(report: Any) -> str:
    """A plain-text table of a solve report: one row per leaf.

    Columns: path, solver, blocks, iterations (max over blocks), initial and
    final relative residuals (max over blocks), and the statuses seen.

    Examples:
      >>> import jax.numpy as jnp
      >>> from mats_jax import Gram, format_report, regmean
      >>> models = [{"k": jnp.array([[1.0], [0.0]]), "b": jnp.zeros(1)},
      ...           {"k": jnp.array([[0.0], [1.0]]), "b": jnp.ones(1)}]
      >>> grams = [{"k": Gram(jnp.diag(jnp.array([1.0, 0.0]))), "b": None},
      ...          {"k": Gram(jnp.diag(jnp.array([0.0, 1.0]))), "b": None}]
      >>> print(format_report(regmean(models, grams, alpha=1.0).report))
      leaf  solver            blocks  iters  initial   final     status
      b     fallback:average  -       -      -         -         -
      k     closed_form       1       0      5.00e-01  0.00e+00  converged
    """
    rows = [("leaf", "solver", "blocks", "iters", "initial", "final", "status")]
    with_path = jax.tree_util.tree_flatten_with_path(
        report, is_leaf=lambda x: isinstance(x, LeafReport)
    )[0]
    for path, leaf in with_path:
        if leaf.status is None:
            rows.append((path_str(path), leaf.solver, "-", "-", "-", "-", "-"))
            continue
        status = np.asarray(leaf.status)
        rows.append(
            (
                path_str(path),
                leaf.solver,
                str(status.size),
                str(int(np.max(np.asarray(leaf.iterations)))),
                f"{float(np.max(np.asarray(leaf.initial_residual))):.2e}",
                f"{float(np.max(np.asarray(leaf.final_residual))):.2e}",
                ",".join(sorted({STATUS_NAMES[s] for s in status.tolist()})),
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
