"""Flax msgpack checkpoints (``flax.serialization.msgpack_serialize``).

The format has no index, so a reader loads the whole file once; the leaves
are then served one at a time like the other formats'.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mats_jax.io.errors import CheckpointError
from mats_jax.tree import path_str

# flax.serialization is imported where it is used: importing it takes 0.1-0.2 s, which
# every mats-jax command would pay, most of them never touching this format.

__all__ = ["MsgpackReader", "read_msgpack", "write_msgpack"]


def read_msgpack(path: str | os.PathLike[str]) -> Any:
    """The nested dict of numpy arrays stored in a Flax msgpack file.

    Raises:
      CheckpointError: naming the file, if it is missing, truncated or not msgpack.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    try:
        from flax import serialization

        tree = serialization.msgpack_restore(data)
    except Exception as e:
        raise CheckpointError(
            f"{path}: not a readable Flax msgpack file ({type(e).__name__}: {e}); it may be "
            "truncated: copy it again"
        ) from e
    if not isinstance(tree, dict):
        raise CheckpointError(
            f"{path}: expected a dict of parameters, got {type(tree).__name__}"
        )
    return tree


def write_msgpack(path: str | os.PathLike[str], tree: Any) -> None:
    """Writes a parameter pytree (arrays become numpy) as a Flax msgpack file."""
    with open(os.fspath(path), "wb") as f:
        from flax import serialization

        f.write(serialization.msgpack_serialize(serialization.to_state_dict(tree)))


class MsgpackReader:
    """Serves the leaves of a Flax msgpack file by path (``a/b/kernel``)."""

    format = "msgpack"
    separator = "/"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import jax

        self.path = os.path.abspath(os.fspath(path))
        self.files = [self.path]
        self.metadata: dict[str, str] = {}
        self._leaves: dict[str, np.ndarray] = {}
        flat = jax.tree_util.tree_flatten_with_path(read_msgpack(self.path))[0]
        for key_path, leaf in flat:
            name = path_str(key_path)
            if name in self._leaves:
                raise CheckpointError(
                    f"{self.path}: two leaves have the path {name!r} (a key holding '/' "
                    "and nested keys); this file cannot be read leaf by leaf"
                )
            self._leaves[name] = np.asarray(leaf)
        self.specs = {
            name: (tuple(a.shape), a.dtype, self.path)
            for name, a in self._leaves.items()
        }

    def read(self, name: str) -> np.ndarray:
        """The leaf at ``name``."""
        return self._leaves[name]
