"""The one solve behind every data-dependent merge, as a traced function.

:func:`solve_traced` runs inside the merge engine's jit (:mod:`mats_jax.engine`)
in two stages, :func:`form_system` and :func:`solve_system`, of four steps,
each its own function here or in :mod:`~mats_jax.solver.blocking`:

1. leaves without a statistic take the fallback rule (:func:`fallback_leaf`);
2. the others are grouped and blocked (:func:`~mats_jax.solver.blocking.group_leaves`,
   :func:`~mats_jax.solver.blocking.gather`), and each group's system is
   formed (:func:`group_system`: the damping, ``Σ_m w_m C_m`` where the
   statistic type sums, the right-hand side);
3. every group is solved in closed form or by CG (:func:`solve_groups`);
4. the solutions are cut back into leaves, each with a
   :class:`~mats_jax.LeafReport` (:func:`unblock`).

On a mesh, each group's blocks are padded and split over the devices; every
device forms and solves its own blocks under :func:`jax.shard_map`, with no
communication inside the CG loop. Between the stages the solve is a
:class:`System`, which holds neither the models nor (for statistic types
closed under addition) the per-task statistics: an engine that owns its
inputs runs the stages as two programs and frees the inputs in between, so
its peak memory is the larger stage's rather than their sum (the streaming
engine, one leaf at a time).

Every matmul runs at ``"highest"`` precision: the attainable residual of CG is
set by the accuracy of its products, and "float32" must mean float32 matmuls,
not the TF32 or bf16 passes that GPUs and TPUs use for float32 by default (an
H200 ran this solver's matmuls at TF32 unless told otherwise:
benchmarks/results/device_h200.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mats_jax.checks import MergeInputError, check_like
from mats_jax.sharding import Placement, block_sharding, keep_shardings, replicated
from mats_jax.solver.blocking import (
    Blocked,
    Group,
    gather,
    group_leaves,
    pad_blocks,
    split,
)
from mats_jax.solver.cg import (
    CONVERGED,
    CGInfo,
    jax_scipy_cg,
    per_block,
    per_block_cg,
    relative_residual,
)
from mats_jax.solver.options import SolverOptions
from mats_jax.solver.report import LeafReport
from mats_jax.stats.statistic import BlockInverse, EighSequence, Statistic
from mats_jax.tree import compute_dtype
from mats_jax.tree import total as sum_of
from mats_jax.typing import Array, Params

__all__ = [
    "FALLBACKS",
    "GroupSystem",
    "System",
    "check_solve_inputs",
    "fallback_leaf",
    "form_system",
    "group_system",
    "solve_groups",
    "solve_system",
    "solve_traced",
    "unblock",
]

FALLBACKS = ("average", "init")
"""The named rules for leaves without a statistic (or a parameter pytree)."""


def check_solve_inputs(
    per_task: list[list[Statistic | None]],
    paths: Sequence[str],
    models: Sequence[Params],
    options: SolverOptions,
    *,
    init: Params | None,
    fallback: str | Params,
    name: str = "statistics",
) -> None:
    """What the solve needs beyond checked models and statistics: an ``init``
    and a ``fallback`` pytree alike the models, a named fallback rule, and a
    closed form for every statistic when ``options.method == "closed_form"``."""
    if init is not None:
        check_like(init, models[0], "init")
    if isinstance(fallback, str):
        if fallback not in FALLBACKS:
            raise MergeInputError(
                f"fallback must be 'average', 'init' or a parameter pytree, got {fallback!r}"
            )
    else:
        check_like(fallback, models[0], "fallback")
    if options.method == "closed_form":
        for path, stat in zip(paths, per_task[0], strict=True):
            if stat is not None and not stat.has_closed_form:
                raise MergeInputError(
                    f"{name} at {path!r}: {stat.kind} has no closed-form solve; "
                    "use method='cg' (mats)"
                )


def fallback_leaf(
    i: int,
    rule: str | Params,
    average: Callable[[int], Array],
    init_leaf: Callable[[int], Array],
) -> tuple[Array, LeafReport]:
    """Leaf ``i`` (without a statistic) by the fallback rule, and its report."""
    if isinstance(rule, str):
        value = average(i) if rule == "average" else init_leaf(i)
        return value, LeafReport(solver=f"fallback:{rule}")
    return jax.tree.leaves(rule)[i], LeafReport(solver="fallback:given")


class GroupSystem(NamedTuple):
    """One group's linear system, blocked: ``(Σ_m w_m C_m + δI) x = rhs`` from ``x0``.

    Attributes:
      stats: the operator's statistics: for a type closed under addition one,
        ``Σ_m w_m C_m + δI`` (:meth:`~mats_jax.Statistic.plus_identity`);
        else every task's ``w_m C_m``.
      delta: (B,) the damping the statistics do not hold: δ for K-FAC, zero
        where it is folded in.
      x0, rhs: the start and the right-hand side ``Σ_m w_m C_m θ_m + δ x0``.
    """

    stats: list[Statistic]
    delta: Array
    x0: Array
    rhs: Array


@dataclasses.dataclass(frozen=True)
class System:
    """A whole solve between its two stages: every leaf's system, and the
    fallback leaves' values. It holds no model and no per-task statistic of a
    type closed under addition (their sum is formed), so a caller that owns
    the inputs can free them once it is formed (the streaming engine).

    Attributes:
      fallbacks: per leaf, its value by the fallback rule (None: solved).
      systems: one :class:`GroupSystem` per group (padded to the mesh's
        device count on a mesh).
      groups: the groups (static, see :class:`~mats_jax.solver.blocking.Group`).
      sizes: each group's number of blocks before padding.
      leaves: each leaf's shape and dtype.
      reports: per leaf, the fallback's report (None: solved).
      treedef: the models' tree structure.
    """

    fallbacks: list[Array | None]
    systems: list[GroupSystem]
    groups: tuple[Group, ...]
    sizes: tuple[int, ...]
    leaves: tuple[jax.ShapeDtypeStruct, ...]
    reports: tuple[LeafReport | None, ...]
    treedef: Any


jax.tree_util.register_dataclass(
    System,
    data_fields=["fallbacks", "systems"],
    meta_fields=["groups", "sizes", "leaves", "reports", "treedef"],
)


def solve_traced(
    models: Sequence[Params],
    per_task: list[list[Statistic | None]],
    weights: Array,
    options: SolverOptions,
    *,
    init: Params | None = None,
    fallback: str | Params = "average",
    placement: Placement | None = None,
) -> tuple[Params, Any]:
    """Solves ``(Σ_m w_m C_m + δI) θ = Σ_m w_m C_m θ_m + δ θ_init`` per block (traced).

    The solve is :func:`form_system` then :func:`solve_system`: run as one
    program here, as two by an engine that frees the inputs in between.

    Args:
      models: the M model pytrees.
      per_task: per task, its statistics in the order of the models' leaves
        (None: the fallback rule), as :func:`~mats_jax.checks.check_statistics`
        returns them.
      weights: (M,) weights scaling each task's statistic.
      options: the :class:`~mats_jax.solver.SolverOptions`.
      init: θ_init, or None for the weighted average.
      fallback: ``"average"``, ``"init"`` or a pytree alike the models.
      placement: the inputs' mesh and the merged leaves' shardings (None:
        one device).

    Returns:
      ``(params, report)``: the merged parameters in the models' dtypes and a
      pytree of :class:`~mats_jax.LeafReport`.
    """
    system = form_system(
        models,
        per_task,
        weights,
        options,
        init=init,
        fallback=fallback,
        placement=placement,
    )
    return solve_system(system, options, placement)


def form_system(
    models: Sequence[Params],
    per_task: list[list[Statistic | None]],
    weights: Array,
    options: SolverOptions,
    *,
    init: Params | None = None,
    fallback: str | Params = "average",
    placement: Placement | None = None,
) -> System:
    """The first stage of :func:`solve_traced` (traced): the fallback leaves
    (:func:`fallback_leaf`), then the other leaves grouped, blocked
    (:func:`~mats_jax.solver.blocking.gather`) and each group's system formed
    (:func:`group_system`). Takes :func:`solve_traced`'s arguments."""
    placement = placement or Placement()
    with jax.default_matmul_precision("highest"):
        model_leaves = [jax.tree.leaves(model) for model in models]
        reference = model_leaves[0]

        def average(i: int) -> Array:
            dtype = compute_dtype(reference[i].dtype)
            acc = sum_of(
                w.astype(dtype) * leaves[i].astype(dtype)
                for w, leaves in zip(weights, model_leaves, strict=True)
            )
            return acc / jnp.sum(weights).astype(dtype)

        init_leaves = jax.tree.leaves(init) if init is not None else None

        def init_leaf(i: int) -> Array:
            return init_leaves[i] if init_leaves is not None else average(i)

        fallbacks: list[Array | None] = [None] * len(reference)
        reports: list[LeafReport | None] = [None] * len(reference)
        for i, stat in enumerate(per_task[0]):
            if stat is None:
                value, reports[i] = fallback_leaf(i, fallback, average, init_leaf)
                fallbacks[i] = value.astype(reference[i].dtype)

        groups = group_leaves(per_task, reference, options.group_blocks)
        blocked = [
            gather(
                g,
                per_task,
                model_leaves,
                init_leaf,
                np.dtype(options.precision)
                if options.precision
                else compute_dtype(reference[g.indices[0]].dtype),
            )
            for g in groups
        ]
        sizes = tuple(g.x0.shape[0] for g in blocked)
        if placement.mesh is None:
            systems = [group_system(g, weights, options) for g in blocked]
        else:
            systems = _on_mesh(
                lambda groups, opts: [group_system(g, weights, opts) for g in groups],
                [
                    pad_blocks(g, _padded(n, placement.mesh))
                    for g, n in zip(blocked, sizes, strict=True)
                ],
                options,
                placement.mesh,
            )
    return System(
        fallbacks,
        systems,
        tuple(groups),
        sizes,
        tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in reference),
        tuple(reports),
        jax.tree.structure(models[0]),
    )


def solve_system(
    system: System, options: SolverOptions, placement: Placement | None = None
) -> tuple[Params, Any]:
    """The second stage of :func:`solve_traced` (traced): every group solved
    (:func:`solve_groups`; on a mesh, each device its own blocks under
    :func:`jax.shard_map`, with no communication inside the CG loop) and cut
    back into leaves (:func:`unblock`)."""
    placement = placement or Placement()
    with jax.default_matmul_precision("highest"):
        stat_types = [g.stat_type for g in system.groups]
        if placement.mesh is None:
            solved = solve_groups(system.systems, stat_types, options)
        else:
            solved = [
                (x[:n], jax.tree.map(lambda v, n=n: v[:n], info))
                for (x, info), n in zip(
                    _on_mesh(
                        lambda systems, opts: solve_groups(systems, stat_types, opts),
                        system.systems,
                        options,
                        placement.mesh,
                    ),
                    system.sizes,
                    strict=True,
                )
            ]
        out = list(system.fallbacks)
        reports = list(system.reports)
        for group, (x, info) in zip(system.groups, solved, strict=True):
            for i, leaf, report in unblock(
                group, x, info, system.leaves, placement.mesh, options.method
            ):
                out[i], reports[i] = leaf, report
        out = keep_shardings(out, placement.out_shardings)
    return jax.tree.unflatten(system.treedef, out), jax.tree.unflatten(
        system.treedef, reports
    )


def _padded(n: int, mesh: Mesh) -> int:
    """``n`` blocks rounded up to a multiple of the mesh's device count."""
    return -(-n // mesh.size) * mesh.size


def _on_mesh(
    body: Callable[[Any, SolverOptions], Any],
    groups: Any,
    options: SolverOptions,
    mesh: Mesh,
) -> Any:
    """``body(groups, options)`` with every group's blocks (padded to a
    multiple of the device count) split over ``mesh``: blocks are
    independent, so each device runs ``body`` on its own, with no
    communication."""
    spread = block_sharding(mesh)
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(spread.spec, PartitionSpec()),
        out_specs=spread.spec,
        check_vma=False,
    )(jax.lax.with_sharding_constraint(groups, spread), options)


def _matvec(operands: tuple[list[Statistic], Array], x: Array) -> Array:
    """``(Σ_m w_m C_m + δI) x`` for blocked ``x``; operands: the operator's
    statistics and the damping they do not hold (:class:`GroupSystem`)."""
    stats, delta = operands
    product = sum_of(s.matvec(x) for s in stats)
    if type(stats[0]).closed_under_addition:
        # δ is in the statistic: no δ x term, whose per-block δ XLA would
        # otherwise broadcast to a leaf-sized array held through the loop.
        return product
    return product + per_block(delta, x) * x


def group_system(group: Blocked, weights: Array, options: SolverOptions) -> GroupSystem:
    """One group's system: the operator (``Σ_m w_m C_m + δI`` formed once
    where the type allows it: CG applies it at every step), the damping it
    does not hold, and the right-hand side ``Σ_m w_m C_m θ_m + δ x0``."""
    x0 = group.x0
    w = [weights[m].astype(x0.dtype) for m in range(len(group.stats))]
    # δ from the unweighted statistics' diagonals: no weighted copy of a
    # statistic is made only to take its mean.
    delta = jnp.asarray(options.damping, x0.dtype) * sum_of(
        w_m * s.diagonal_mean() for w_m, s in zip(w, group.stats, strict=True)
    )
    stats = [s.scaled(w_m) for w_m, s in zip(w, group.stats, strict=True)]
    b = sum_of(s.matvec(v) for s, v in zip(stats, group.models, strict=True))
    rhs = b + per_block(delta, x0) * x0
    stat_type = type(stats[0])
    if stat_type.closed_under_addition:
        (total,) = stat_type.summed(stats)
        return GroupSystem([total.plus_identity(delta)], jnp.zeros_like(delta), x0, rhs)
    return GroupSystem(stat_type.summed(stats), delta, x0, rhs)


def solve_groups(
    systems: list[GroupSystem],
    stat_types: list[type[Statistic]],
    options: SolverOptions,
) -> list[tuple[Array, CGInfo]]:
    """Solves every group's system; blocks are independent, so any split of them works."""
    eigh = EighSequence()  # every eigendecomposition of this solve, one at a time
    inverses: list[BlockInverse | None] = []
    for system, stat_type in zip(systems, stat_types, strict=True):
        # For a type closed under addition the operator is one statistic, the
        # damped sum (its damping here is zero); K-FAC's keeps every task's.
        if options.method == "closed_form":
            inverses.append(stat_type.sum_pinv(system.stats, system.delta, eigh))
        elif options.preconditioner:
            inverses.append(
                stat_type.sum_preconditioner(system.stats, system.delta, eigh)
            )
        else:
            inverses.append(None)

    solved = []
    for system, inverse in zip(systems, inverses, strict=True):
        operands = (system.stats, system.delta)
        # No loop may start before the last eigendecomposition is done (see
        # EighSequence: a CG loop and an eigh waiting at once hang jaxlib 0.10).
        x0, rhs = eigh.after_all(system.x0, system.rhs)

        def matvec(x: Array, operands: Any = operands) -> Array:
            return _matvec(operands, x)

        if options.method == "closed_form":
            assert inverse is not None
            x = x0 + inverse(rhs - matvec(x0))
            no_steps = jnp.zeros(rhs.shape[:1], jnp.int32)
            info = CGInfo(
                relative_residual(matvec, rhs, x0),
                relative_residual(matvec, rhs, x),
                iterations=no_steps,
                status=no_steps + CONVERGED,
            )
        elif options.cg == "jax_scipy":
            x, info = jax_scipy_cg(
                _matvec,
                operands,
                rhs,
                x0,
                maxiter=options.maxiter,
                tol=options.tol,
                precond=inverse,
            )
        else:
            x, info = per_block_cg(
                matvec,
                rhs,
                x0,
                maxiter=options.maxiter,
                tol=options.tol,
                precond=inverse,
                check_every=options.check_every,
                divergence_factor=options.divergence_factor,
            )
        solved.append((x, info))
    return solved


def unblock(
    group: Group,
    x: Array,
    info: CGInfo,
    reference: Sequence[Any],
    mesh: Mesh | None,
    solver: str,
) -> list[tuple[int, Array, LeafReport]]:
    """The group's solution as ``(leaf index, leaf, report)`` per leaf;
    ``solver`` names how it was solved in the reports."""
    if mesh is not None:
        # The report is small: every process gets all of it.
        info = jax.lax.with_sharding_constraint(info, replicated(mesh))
    shapes = [tuple(reference[i].shape) for i in group.indices]
    out = []
    for i, (piece, lay, blocks) in zip(
        group.indices, split(group, x, shapes), strict=True
    ):
        if mesh is not None and blocks.shape[-1] % mesh.size == 0:
            # Whole blocks per device to split last axes (an all-to-all), from
            # which XLA reaches the leaf's own layout without gathering a
            # block onto every device.
            blocks = jax.lax.with_sharding_constraint(
                blocks,
                NamedSharding(
                    mesh,
                    PartitionSpec(
                        *([None] * (blocks.ndim - 1)), tuple(mesh.axis_names)
                    ),
                ),
            )
        leaf = lay.from_blocks(blocks, tuple(reference[i].shape))
        out.append(
            (
                i,
                leaf.astype(reference[i].dtype),
                LeafReport(
                    solver,
                    info.initial_residual[piece],
                    info.final_residual[piece],
                    info.iterations[piece],
                    info.status[piece],
                ),
            )
        )
    return out
