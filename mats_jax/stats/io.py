"""Saving and loading statistics with orbax, so they can be published and reused.

A statistics checkpoint is an orbax checkpoint directory with two items:
``arrays`` (the statistics' arrays, a nested dict keyed by parameter path and
field, saved by ``StandardSave`` and so shardable) and ``layout`` (JSON: for
each parameter leaf, its statistic type and, for Gram and K-FAC, the kernel's
input and output axes; ``null`` for leaves without a statistic). Loading
rebuilds the same statistic pytree, so one team can publish the Fisher of its
model and another merge with it without the data.

Examples:
  >>> import tempfile, jax.numpy as jnp
  >>> from mats_jax import KFAC, load_statistics, save_statistics
  >>> stats = {"dense": {"kernel": KFAC(jnp.eye(3), jnp.eye(2)), "bias": None}}
  >>> path = tempfile.mkdtemp() + "/stats"
  >>> save_statistics(path, stats)
  >>> load_statistics(path)["dense"]["kernel"].g.shape
  (2, 2)
"""

from __future__ import annotations

import os
from typing import Any

import jax

from mats_jax.stats.likelihood import StatisticsInputError
from mats_jax.stats.statistic import Statistic, is_statistic_leaf
from mats_jax.tree import nest_paths, path_str
from mats_jax.typing import StatTree

# orbax.checkpoint is imported where it is used: importing it takes 0.1-0.2 s, which
# every mats-jax command would pay, most of them never touching this format.

__all__ = [
    "FORMAT",
    "is_statistics",
    "load_statistics",
    "read_layout",
    "save_statistics",
]

FORMAT = "mats_jax.statistics/1"
"""The ``format`` entry of a statistics checkpoint's layout record."""


LAYOUT_FILE = os.path.join("layout", "metadata")
"""Where in a statistics checkpoint its layout record is (orbax's JSON item)."""


def is_statistics(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory holding a statistics checkpoint (its
    layout record is there; :func:`read_layout` checks it)."""
    return os.path.isfile(os.path.join(os.fspath(path), LAYOUT_FILE))


def read_layout(path: str) -> dict[str, Any]:
    """The layout record of the statistics checkpoint at ``path``, checked.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      StatisticsInputError: naming ``path`` and what is wrong: a parameter
        checkpoint rather than statistics, a missing or damaged layout
        record, or statistics arrays that are missing.
    """
    import orbax.checkpoint as ocp

    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"no statistics checkpoint at {path}; save one with mats_jax.save_statistics"
        )
    if not is_statistics(path):
        if os.path.exists(os.path.join(path, "_METADATA")) or os.path.exists(
            os.path.join(path, "manifest.ocdbt")
        ):
            raise StatisticsInputError(
                f"{path}: an orbax checkpoint of parameters, not statistics (no "
                f"{LAYOUT_FILE} record in it): statistics are written by "
                "mats_jax.save_statistics; parameters are read with mats_jax.load_orbax "
                "or given as a model's path"
            )
        raise StatisticsInputError(
            f"{path}: not a statistics checkpoint (no {LAYOUT_FILE} record in it); "
            "save statistics with mats_jax.save_statistics"
        )
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            meta = checkpointer.restore(
                path, args=ocp.args.Composite(layout=ocp.args.JsonRestore())
            )["layout"]
    except Exception as e:
        raise StatisticsInputError(
            f"{path}: its layout record {LAYOUT_FILE} is unreadable "
            f"({type(e).__name__}: {e}); the checkpoint is damaged: save it again"
        ) from e
    problem = _layout_problem(meta)
    if problem:
        raise StatisticsInputError(
            f"{path}: not a mats_jax statistics checkpoint (format {FORMAT}): "
            f"its layout record {LAYOUT_FILE} {problem}"
        )
    has_arrays = any(entry is not None for entry in meta["layout"].values())
    if has_arrays and not os.path.isdir(os.path.join(path, "arrays")):
        raise StatisticsInputError(
            f"{path}: its arrays/ directory (the statistics' values) is missing; "
            "the checkpoint is incomplete: save or copy it again"
        )
    return meta


def _layout_problem(meta: Any) -> str:
    """What is wrong with a layout record, or ``""``."""
    if not isinstance(meta, dict):
        return f"is {type(meta).__name__}, not a JSON object"
    if meta.get("format") != FORMAT:
        return f"has format {meta.get('format')!r}"
    layout, order = meta.get("layout"), meta.get("order")
    if not isinstance(layout, dict) or not isinstance(order, list):
        return "lacks its 'layout' mapping or 'order' list"
    if sorted(order) != sorted(layout):
        return "lists other leaves in 'order' than in 'layout'"
    for name, entry in layout.items():
        if entry is None:
            continue
        kind = entry.get("type") if isinstance(entry, dict) else None
        try:
            Statistic.by_kind(kind)  # type: ignore[arg-type]
        except ValueError as e:
            return f"gives leaf {name!r} {e}"
    return ""


def save_statistics(path: str | os.PathLike[str], statistics: StatTree) -> None:
    """Saves a statistic pytree as an orbax checkpoint at ``path`` (a new directory).

    Raises:
      FileExistsError: if ``path`` exists (nothing is overwritten).
      NotADirectoryError: if a file stands where a directory above it must be.
      TypeError: if a leaf is neither a statistic nor None.

    Examples:
      >>> import os, tempfile
      >>> import jax.numpy as jnp
      >>> from mats_jax import KFAC, load_statistics, save_statistics
      >>> stats = {"dense": {"kernel": KFAC(jnp.eye(2), jnp.eye(3)), "bias": None}}
      >>> path = os.path.join(tempfile.mkdtemp(), "stats")
      >>> save_statistics(path, stats)
      >>> load_statistics(path)["dense"]["kernel"].g.shape
      (3, 3)
    """
    import orbax.checkpoint as ocp

    path = os.fspath(os.path.abspath(path))
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; statistics are never overwritten")
    ancestor = os.path.dirname(path)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):  # orbax would fail in its threads
        raise NotADirectoryError(
            f"{path}: {ancestor} is a file, so no directory can be made there"
        )
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        statistics, is_leaf=is_statistic_leaf
    )
    arrays: dict[str, dict[str, Any]] = {}
    layout: dict[str, Any] = {}
    for key_path, stat in flat:
        name = path_str(key_path)
        if stat is None:
            layout[name] = None
            continue
        if not isinstance(stat, Statistic):
            raise TypeError(
                f"statistics at {name!r}: expected a statistic or None, got {type(stat).__name__}"
            )
        arrays[name] = stat.arrays()
        layout[name] = stat.layout()
    meta = {"format": FORMAT, "order": [path_str(p) for p, _ in flat], "layout": layout}
    del treedef
    items: dict[str, Any] = {"layout": ocp.args.JsonSave(meta)}
    if arrays:  # orbax refuses an empty item: a tree of None saves its layout only
        items["arrays"] = ocp.args.StandardSave(arrays)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(path, args=ocp.args.Composite(**items))


def load_statistics(
    path: str | os.PathLike[str], like: StatTree | None = None
) -> StatTree:
    """Loads statistics saved by :func:`save_statistics`.

    Args:
      path: the checkpoint directory.
      like: optionally, a parameter (or statistic) pytree whose structure the
        result takes; by default the result is nested dicts keyed by the
        saved leaf paths.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      StatisticsInputError: (a ``ValueError``) naming ``path`` if it is not a
        statistics checkpoint (a parameter checkpoint, a missing or damaged
        layout record or arrays), or ``like`` has other leaves than the ones
        saved.

    Examples:
      >>> import os, tempfile
      >>> import jax.numpy as jnp
      >>> from mats_jax import Diagonal, load_statistics, save_statistics
      >>> path = os.path.join(tempfile.mkdtemp(), "fisher")
      >>> save_statistics(path, {"w": Diagonal(jnp.arange(3.0)), "b": None})
      >>> loaded = load_statistics(path)
      >>> loaded["w"].f, loaded["b"]
      (Array([0., 1., 2.], dtype=float32), None)
    """
    import orbax.checkpoint as ocp

    path = os.fspath(os.path.abspath(path))
    meta = read_layout(path)
    has_arrays = any(e is not None for e in meta["layout"].values())
    arrays: dict[str, Any] = {}
    if has_arrays:
        try:
            with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
                arrays = checkpointer.restore(
                    path, args=ocp.args.Composite(arrays=ocp.args.StandardRestore())
                )["arrays"]
        except Exception as e:
            raise StatisticsInputError(
                f"{path}: cannot read its statistics' arrays under arrays/ "
                f"({type(e).__name__}: {e}); the checkpoint is incomplete or damaged: "
                "save or copy it again"
            ) from e
    stats: dict[str, Statistic | None] = {}
    for name in meta["order"]:
        entry = meta["layout"][name]
        if entry is None:
            stats[name] = None
            continue
        kind = Statistic.by_kind(entry["type"])
        missing = [f for f in kind.array_fields if f not in arrays.get(name, {})]
        if missing:
            raise StatisticsInputError(
                f"{path}: leaf {name!r} ({kind.kind}) has no saved {missing} under "
                "arrays/; the checkpoint is incomplete or damaged: save it again"
            )
        stats[name] = kind.from_saved(arrays[name], entry)
    if like is None:
        return _nest(stats)
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        like, is_leaf=is_statistic_leaf
    )
    names = [path_str(p) for p, _ in flat]
    if sorted(names) != sorted(stats):
        missing = sorted(set(names) - set(stats))
        extra = sorted(set(stats) - set(names))
        raise StatisticsInputError(
            f"{path}: saved leaves differ from `like`: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    return jax.tree_util.tree_unflatten(treedef, [stats[n] for n in names])


def _nest(flat: dict[str, Any]) -> Any:
    if list(flat) == ["<root>"]:  # a bare statistic, saved under path_str(())
        return flat["<root>"]
    return nest_paths(flat)
