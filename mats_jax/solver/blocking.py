"""Leaves as batches of independent blocks, and back.

Each statistic names the blocks of its leaf (:meth:`~mats_jax.Statistic.blocked`:
one block for a plain kernel, one per layer for a stacked kernel). The solver
groups the leaves whose blocks have one shape and statistic type (so one
batched CG serves them all), stacks each group's statistics, models and
initialisation along a leading block axis, and afterwards splits the solution
back into leaves with one report entry each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mats_jax.stats.statistic import Statistic
from mats_jax.tree import compute_dtype
from mats_jax.typing import Array

__all__ = ["Blocked", "Group", "gather", "group_leaves", "pad_blocks", "split"]


class Group(NamedTuple):
    """Leaves (by index) whose blocks are solved as one batch.

    A value with no arrays (hashable): each leaf's layout is its first task's
    statistic with every array replaced by its shape and dtype, which is all
    that blocking and unblocking read. So a group can be static data of a
    traced pytree (the solver's :class:`~mats_jax.solver.solve.System`).
    """

    indices: tuple[int, ...]
    stat_type: type[Statistic]
    layouts: tuple[Statistic, ...]


def _skeleton(stat: Statistic) -> Statistic:
    """``stat`` with its arrays replaced by their shapes and dtypes."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), stat)


class Blocked(NamedTuple):
    """One group's arrays, each with a leading block axis B."""

    stats: list[Statistic]  # per task, as given (the solve weighs them)
    models: list[Array]  # per task
    x0: Array


def _present(stat: Statistic | None) -> Statistic:
    assert stat is not None, "grouped leaves all have statistics"
    return stat


def group_leaves(
    per_task: list[list[Statistic | None]], leaves: list[Array], group_blocks: bool
) -> list[Group]:
    """The groups of the leaves with statistics: same statistic type, blocked
    statistic shapes, block shape and compute dtype (one leaf per group
    without ``group_blocks``)."""
    groups: dict[Any, tuple[type[Statistic], list[int], list[Statistic]]] = {}
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
        _, indices, layouts = groups.setdefault(key, (type(stat), [], []))
        indices.append(i)
        layouts.append(_skeleton(stat))
    return [
        Group(tuple(indices), stat_type, tuple(layouts))
        for stat_type, indices, layouts in groups.values()
    ]


def gather(
    group: Group,
    per_task: list[list[Statistic | None]],
    model_leaves: list[list[Array]],
    init_leaf: Callable[[int], Array],
    dtype: Any,
) -> Blocked:
    """The group's statistics, models and initialisation as blocks."""
    shapes = [tuple(model_leaves[0][i].shape) for i in group.indices]

    def blocks_of(arrays: Sequence[Array]) -> Array:
        return jnp.concatenate(
            [
                lay.to_blocks(x.astype(dtype))
                for lay, x in zip(group.layouts, arrays, strict=True)
            ]
        )

    stats = []
    for task in per_task:
        parts = [
            _present(task[i]).blocked(s).astype(dtype)
            for i, s in zip(group.indices, shapes, strict=True)
        ]
        # Blocked statistics of one group differ at most in their layout
        # metadata (a stacked kernel's axes are not a plain kernel's), which
        # blocked arithmetic never reads: concatenate the arrays.
        stacked = jax.tree.unflatten(
            jax.tree.structure(parts[0]),
            [
                jnp.concatenate(xs)
                for xs in zip(*(jax.tree.leaves(p) for p in parts), strict=True)
            ],
        )
        stats.append(stacked)
    return Blocked(
        stats,
        [blocks_of([leaves[i] for i in group.indices]) for leaves in model_leaves],
        blocks_of([init_leaf(i) for i in group.indices]),
    )


def pad_blocks(blocked: Blocked, size: int) -> Blocked:
    """Appends empty blocks (zero statistics, models and start) up to ``size`` blocks.

    An empty block's right side is zero and so is its start: CG finds it
    converged before the first step.
    """

    def pad(x: Array) -> Array:
        return jnp.pad(x, [(0, size - x.shape[0])] + [(0, 0)] * (x.ndim - 1))

    return jax.tree.map(pad, blocked)


def split(
    group: Group, x: Array, shapes: Sequence[tuple[int, ...]]
) -> list[tuple[slice, Statistic, Array]]:
    """The group's solution ``x`` (B, ...) cut back per leaf: for each leaf its
    slice of the block axis, its layout and its blocks."""
    out, start = [], 0
    for lay, shape in zip(group.layouts, shapes, strict=True):
        n_blocks = lay.to_blocks(jnp.zeros(shape, jnp.bool_)).shape[0]
        piece = slice(start, start + n_blocks)
        out.append((piece, lay, x[piece]))
        start += n_blocks
    return out
