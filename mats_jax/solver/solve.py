"""The one solve behind every data-dependent merge, as a traced function.

:func:`solve_traced` runs inside the merge engine's jit (:mod:`mats_jax.engine`)
in five steps, each its own function here or in :mod:`~mats_jax.solver.blocking`:

1. leaves without a statistic take the fallback rule (:func:`fallback_leaf`);
2. the others are grouped and blocked (:func:`~mats_jax.solver.blocking.group_leaves`,
   :func:`~mats_jax.solver.blocking.gather`);
3. on a mesh, each group's blocks are padded and split over the devices
   (:func:`solve_on_mesh`); every device solves its own blocks under
   :func:`jax.shard_map`, with no communication inside the CG loop;
4. every group is solved in closed form or by CG (:func:`solve_groups`);
5. the solutions are cut back into leaves, each with a
   :class:`~mats_jax.LeafReport` (:func:`unblock`).

Every matmul runs at ``"highest"`` precision: the attainable residual of CG is
set by the accuracy of its products, and "float32" must mean float32 matmuls,
not the TF32 or bf16 passes that GPUs and TPUs use for float32 by default (an
H200 ran this solver's matmuls at TF32 unless told otherwise:
benchmarks/results/device_h200.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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
from mats_jax.stats.statistic import EighSequence, Statistic
from mats_jax.tree import compute_dtype
from mats_jax.tree import total as sum_of
from mats_jax.typing import Array, Params

__all__ = [
    "FALLBACKS",
    "check_solve_inputs",
    "fallback_leaf",
    "solve_groups",
    "solve_on_mesh",
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
    with jax.default_matmul_precision("highest"):
        return _solve(
            models, per_task, weights, options, init, fallback, placement or Placement()
        )


def _solve(
    models: Sequence[Params],
    per_task: list[list[Statistic | None]],
    weights: Array,
    options: SolverOptions,
    init: Params | None,
    fallback: str | Params,
    placement: Placement,
) -> tuple[Params, Any]:
    model_leaves = [jax.tree.leaves(model) for model in models]
    treedef = jax.tree.structure(models[0])
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

    out: list[Array | None] = [None] * len(reference)
    reports: list[LeafReport | None] = [None] * len(reference)
    for i, stat in enumerate(per_task[0]):
        if stat is None:
            value, reports[i] = fallback_leaf(i, fallback, average, init_leaf)
            out[i] = value.astype(reference[i].dtype)

    groups = group_leaves(per_task, reference, options.group_blocks)
    blocked = [
        gather(
            g,
            per_task,
            model_leaves,
            init_leaf,
            weights,
            np.dtype(options.precision)
            if options.precision
            else compute_dtype(reference[g.indices[0]].dtype),
        )
        for g in groups
    ]
    stat_types = [g.stat_type for g in groups]
    if placement.mesh is None:
        solved = solve_groups(blocked, stat_types, options)
    else:
        solved = solve_on_mesh(blocked, stat_types, options, placement.mesh)
    for group, (x, info) in zip(groups, solved, strict=True):
        for i, leaf, report in unblock(
            group, x, info, reference, placement.mesh, options.method
        ):
            out[i], reports[i] = leaf, report
    out = keep_shardings(out, placement.out_shardings)
    return jax.tree.unflatten(treedef, out), jax.tree.unflatten(treedef, reports)


def solve_on_mesh(
    blocked: list[Blocked],
    stat_types: list[type[Statistic]],
    options: SolverOptions,
    mesh: Mesh,
) -> list[tuple[Array, CGInfo]]:
    """:func:`solve_groups` with every group's blocks split over ``mesh``.

    Each group is padded with empty blocks to a multiple of the device count;
    every device solves its own blocks (no communication in the CG loop).
    """
    n_devices = mesh.size
    spread = block_sharding(mesh)
    sizes = [g.x0.shape[0] for g in blocked]
    padded = [
        jax.lax.with_sharding_constraint(
            pad_blocks(g, -(-n // n_devices) * n_devices), spread
        )
        for g, n in zip(blocked, sizes, strict=True)
    ]
    solved = jax.shard_map(
        lambda groups, opts: solve_groups(groups, stat_types, opts),
        mesh=mesh,
        in_specs=(spread.spec, PartitionSpec()),
        out_specs=spread.spec,
        check_vma=False,
    )(padded, options)
    return [
        (x[:n], jax.tree.map(lambda v, n=n: v[:n], info))
        for (x, info), n in zip(solved, sizes, strict=True)
    ]


def _matvec(operands: tuple[list[Statistic], Array], x: Array) -> Array:
    """``(Σ_m w_m C_m + δI) x`` for blocked ``x``; operands: weighted statistics, δ."""
    stats, delta = operands
    return sum_of(s.matvec(x) for s in stats) + per_block(delta, x) * x


def solve_groups(
    blocked: list[Blocked],
    stat_types: list[type[Statistic]],
    options: SolverOptions,
) -> list[tuple[Array, CGInfo]]:
    """Solves every group's blocks; blocks are independent, so any split of them works."""
    eigh = EighSequence()  # every eigendecomposition of this solve, one at a time
    prepared = []
    for group, stat_type in zip(blocked, stat_types, strict=True):
        stats, x0 = group.stats, group.x0
        delta = jnp.asarray(options.damping, x0.dtype) * sum_of(
            s.diagonal_mean() for s in stats
        )
        # The loop applies Σ_m C_m, formed once where the type allows it.
        operands = (stat_type.summed(stats), delta)
        b = sum_of(s.matvec(v) for s, v in zip(stats, group.models, strict=True))
        rhs = b + per_block(delta, x0) * x0
        if options.method == "closed_form":
            inverse = stat_type.sum_pinv(stats, delta, eigh)
        elif options.preconditioner:
            inverse = stat_type.sum_preconditioner(stats, delta, eigh)
        else:
            inverse = None
        prepared.append((operands, x0, rhs, inverse))

    solved = []
    for operands, x0, rhs, inverse in prepared:
        # No loop may start before the last eigendecomposition is done (see
        # EighSequence: a CG loop and an eigh waiting at once hang jaxlib 0.10).
        x0, rhs = eigh.after_all(x0, rhs)

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
    reference: list[Array],
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
