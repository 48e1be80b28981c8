"""Where parameters, statistics and the solver's blocks live on a device mesh.

JAX's own SPMD machinery does the distribution: inputs carry a
:class:`~jax.sharding.NamedSharding` on a :class:`~jax.sharding.Mesh`, the
merge functions are jitted, and XLA partitions them. This module holds the
few decisions the library makes on top of that.

**Statistics are sharded like their kernels.** For a leaf whose sharding has
the partition spec ``spec`` (one entry per leaf axis):

================  ============================================================
statistic         sharding of its arrays
================  ============================================================
``Diagonal(f)``   the leaf's own (``f`` has the leaf's shape)
``Gram(a)``       ``a`` (blocks…, I, I): block axes as the leaf's block axes,
                  rows as the leaf's input axis, columns unsharded
``KFAC(a, g)``    ``a`` as Gram's; ``g`` (blocks…, O, O): rows as the leaf's
                  output axis, columns unsharded
(both)            a factor whose kernel axis is not split borrows the split
                  of the kernel's other axis (when it divides the factor), so
                  a column-parallel kernel has A split too, not replicated
``Dense(f)``      replicated (Dense is for small leaves)
================  ============================================================

A kernel with several input (or output) axes shards its flattened I (or O)
rows only through its first input (output) axis when the others are
unsharded; otherwise that factor's rows are replicated. Statistics estimated
with a mesh (:func:`~mats_jax.kfac` and friends) come out sharded this way,
and :func:`~mats_jax.shard_statistics` places statistics loaded from elsewhere.

**The solver shards blocks.** Its unit of work is a block (one kernel, or one
layer of a stacked kernel), and blocks of one shape are solved together
(:func:`~mats_jax.solve`). On a mesh of n devices each such group is padded
with empty blocks to a multiple of n and split along its block axis over all
the mesh's axes, and the solve runs under :func:`jax.shard_map`: every device
solves its own blocks with no communication inside the CG loop, and the
result is resharded to each input leaf's sharding. Per-device memory is then
about 1/n of the model for models with many blocks of each shape (every
transformer); a group with fewer blocks than devices (one huge embedding or
output head) is not split inside a block, so a device holds at least one
whole block of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mats_jax import checks
from mats_jax.stats.statistic import Statistic, is_statistic_leaf
from mats_jax.typing import Params, StatTree

__all__ = [
    "Placement",
    "block_sharding",
    "input_mesh",
    "keep_shardings",
    "leaf_shardings",
    "placement_of",
    "replicated",
    "shard_statistics",
    "statistic_sharding",
]


def input_mesh(*trees: Any) -> Mesh | None:
    """The one mesh of more than one device that the arrays of ``trees`` are sharded on.

    None when every array is on a single device (or not a JAX array).

    Raises:
      MergeInputError: when arrays sit on different meshes.

    Examples:
      >>> import jax.numpy as jnp
      >>> input_mesh({"w": jnp.ones(3)}) is None
      True
    """
    meshes: dict[Any, Mesh] = {}
    for leaf in jax.tree.leaves(trees):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            mesh = sharding.mesh
            assert isinstance(mesh, Mesh), "concrete arrays have concrete meshes"
            meshes.setdefault((mesh.axis_names, mesh.devices.tobytes()), mesh)
    if len(meshes) > 1:
        described = "; ".join(
            f"axes {m.axis_names} over {m.size} devices" for m in meshes.values()
        )
        raise checks.MergeInputError(
            f"inputs are sharded over different meshes ({described}): put every "
            "model and statistic on one mesh"
        )
    return next(iter(meshes.values()), None)


def statistic_sharding(stat: Statistic, leaf_sharding: NamedSharding) -> Any:
    """The shardings of ``stat``'s arrays for a leaf sharded as ``leaf_sharding``.

    Returns a pytree of ``stat``'s structure holding one
    :class:`~jax.sharding.NamedSharding` per array: each statistic type's own
    rule (:meth:`~mats_jax.Statistic.sharding`; see the module docstring).
    """
    return stat.sharding(leaf_sharding)


def shard_statistics(statistics: StatTree, params: Params) -> StatTree:
    """Places one task's statistics on the devices of ``params``, sharded like their kernels.

    Leaves of ``params`` that are not sharded with a
    :class:`~jax.sharding.NamedSharding` leave their statistic where it is.

    Args:
      statistics: a pytree of ``params``' structure holding statistics or None.
      params: the parameters, already sharded (e.g. restored from orbax with
        target shardings).

    Returns:
      The statistics, each array put on the mesh by its type's rule
      (:meth:`~mats_jax.Statistic.sharding`, the table of
      :mod:`mats_jax.sharding`).

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> from mats_jax import KFAC
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
      >>> params = {"k": jax.device_put(jnp.ones((4, 2)), NamedSharding(mesh, P(None, "model")))}
      >>> stats = shard_statistics({"k": KFAC(jnp.eye(4), jnp.eye(2))}, params)
      >>> stats["k"].g.sharding.spec, stats["k"].a.sharding.spec
      (P('model', None), P('model', None))
    """
    checks.check_statistics([statistics], [params], name="statistics")

    def place(stat: Statistic | None, leaf: Any) -> Any:
        sharding = getattr(leaf, "sharding", None)
        if stat is None or not isinstance(sharding, NamedSharding):
            return stat
        return jax.device_put(stat, statistic_sharding(stat, sharding))

    return jax.tree.map(place, statistics, params, is_leaf=is_statistic_leaf)


def leaf_shardings(tree: Any) -> tuple[NamedSharding | None, ...]:
    """Each leaf's :class:`~jax.sharding.NamedSharding` (None for other leaves), in order.

    Hashable, so a jitted merge can take it as a static argument and give its
    outputs the inputs' shardings (:func:`keep_shardings`).
    """
    return tuple(
        sharding if isinstance(sharding, NamedSharding) else None
        for sharding in (getattr(x, "sharding", None) for x in jax.tree.leaves(tree))
    )


def keep_shardings(
    leaves: Sequence[Any], shardings: tuple[NamedSharding | None, ...] | None
) -> list[Any]:
    """Inside jit: constrains each leaf to its sharding (None: left to XLA)."""
    if shardings is None:
        return list(leaves)
    return [
        x if s is None else jax.lax.with_sharding_constraint(x, s)
        for x, s in zip(leaves, shardings, strict=True)
    ]


def block_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays with a leading block axis split over every axis of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
    """Arrays held whole by every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


class Placement(NamedTuple):
    """Where a merge runs: the inputs' mesh (None: one device) and the
    shardings the merged leaves keep (one per leaf, in order). Hashable, so a
    jitted merge takes it as a static argument."""

    mesh: Mesh | None = None
    out_shardings: tuple[NamedSharding | None, ...] | None = None


def placement_of(reference: Params, *trees: Any) -> Placement:
    """The placement of a merge whose inputs are ``reference`` and ``trees``:
    their one mesh (or a clear error), and ``reference``'s leaf shardings."""
    mesh = input_mesh(reference, *trees)
    if mesh is None:
        return Placement()
    return Placement(mesh, leaf_shardings(reference))
