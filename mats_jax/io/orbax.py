"""Orbax checkpoints of parameter pytrees (Flax linen dicts, nnx states).

:func:`save_orbax` and :func:`load_orbax` are thin, documented wrappers over
``orbax.checkpoint.StandardCheckpointer`` that also work with sharded arrays
across processes (every process calls them, as orbax requires).
:class:`OrbaxReader` restores one leaf at a time (orbax's partial restore), so
a merge never holds a whole model.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mats_jax.io.errors import CheckpointError
from mats_jax.tree import path_str

__all__ = ["OrbaxReader", "is_orbax", "load_orbax", "save_orbax"]

_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt")


def is_orbax(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory holding an orbax checkpoint."""
    path = os.fspath(path)
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, m)) for m in _MARKERS
    )


def _metadata_tree(path: str) -> Any:
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no orbax checkpoint directory there")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            meta = checkpointer.metadata(path)
    except Exception as e:
        raise CheckpointError(
            f"{path}: not a readable orbax checkpoint ({type(e).__name__}: {e}); it may be "
            "incomplete: save or copy it again"
        ) from e
    item = getattr(meta, "item_metadata", None)
    tree = getattr(item, "tree", None)
    leaves = jax.tree.leaves(tree)
    if not leaves or not all(
        hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves
    ):
        raise CheckpointError(
            f"{path}: no readable array metadata in this orbax checkpoint; it may be "
            "incomplete (a missing _METADATA file): save or copy it again"
        )
    return tree


def save_orbax(
    path: str | os.PathLike[str], tree: Any, *, overwrite: bool = False
) -> None:
    """Saves a pytree of arrays (numpy, or jax arrays with any sharding) with orbax.

    Orbax writes into a temporary directory and renames it when complete, so
    an interrupted save leaves no checkpoint. With sharded jax arrays across
    processes, every process calls this with its own addressable shards.

    Args:
      path: the checkpoint directory.
      tree: the pytree.
      overwrite: replace an existing checkpoint at ``path``.

    Raises:
      FileExistsError: if ``path`` exists and ``overwrite`` is False.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp
      >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
      >>> save_orbax(path, {"w": jnp.ones(2)})
      >>> save_orbax(path, {"w": jnp.zeros(2)}, overwrite=True)
      >>> load_orbax(path)["w"]
      array([0., 0.], dtype=float32)
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, tree, force=overwrite)


def load_orbax(path: str | os.PathLike[str], *, shardings: Any = None) -> Any:
    """Restores an orbax checkpoint saved by :func:`save_orbax` (or any orbax pytree).

    Args:
      path: the checkpoint directory.
      shardings: None to restore every leaf as a numpy array on the host;
        a single ``jax.sharding.Sharding`` for every leaf; or a pytree of
        shardings with the checkpoint's structure. Each leaf is then restored
        straight into its sharding (each process reads only its own shards).

    Returns:
      The pytree, with numpy leaves (``shardings=None``) or jax arrays.

    Examples:
      >>> import tempfile, os, numpy as np
      >>> d = os.path.join(tempfile.mkdtemp(), "ckpt")
      >>> save_orbax(d, {"w": np.arange(3.0)})
      >>> load_orbax(d)["w"]
      array([0., 1., 2.])
    """
    path = os.path.abspath(os.fspath(path))
    meta = _metadata_tree(path)
    if shardings is None:
        restore_args = jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta
        )
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            return checkpointer.restore(
                path, args=ocp.args.PyTreeRestore(item=meta, restore_args=restore_args)
            )
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, meta)
    try:
        target = jax.tree.map(
            lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=s),
            meta,
            shardings,
        )
    except ValueError as e:
        raise CheckpointError(
            f"{path}: the shardings pytree does not match the checkpoint's structure ({e})"
        ) from e
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, target)


class OrbaxReader:
    """Serves the leaves of an orbax checkpoint by path, one partial restore each."""

    format = "orbax"
    separator = "/"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))
        meta = _metadata_tree(self.path)
        self.metadata: dict[str, str] = {}
        self.files = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(self.path)
            for f in names
        )
        flat = jax.tree_util.tree_flatten_with_path(meta)[0]
        self._keys: dict[str, tuple[Any, ...]] = {}
        self.specs: dict[str, tuple[tuple[int, ...], np.dtype, str]] = {}
        for key_path, leaf in flat:
            name = path_str(key_path)
            self._keys[name] = tuple(key_path)
            self.specs[name] = (tuple(leaf.shape), np.dtype(leaf.dtype), self.path)

    def read(self, name: str) -> np.ndarray:
        """The leaf at ``name``, restored alone (orbax's partial restore)."""
        item: Any = 0
        for key in reversed(self._keys[name]):
            item = {key.key: item}  # orbax trees of parameters are nested dicts
        restore_args = jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item
        )
        try:
            with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
                out = checkpointer.restore(
                    self.path,
                    args=ocp.args.PyTreeRestore(
                        item=item, restore_args=restore_args, partial_restore=True
                    ),
                )
        except Exception as e:
            raise CheckpointError(
                f"{self.path}: cannot restore leaf {name!r} ({e})"
            ) from e
        for key in self._keys[name]:
            out = out[key.key]
        return np.asarray(out)
