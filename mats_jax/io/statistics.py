"""Lazy, leaf-by-leaf reading of statistics saved by :func:`mats_jax.save_statistics`.

A streaming merge with data-dependent methods needs each leaf's statistic only
while that leaf is merged; :func:`mats_jax.load_statistics` restores them all
(a diagonal Fisher is as large as the model). :class:`StatisticsReader`
reads the checkpoint's layout record once and restores one leaf's factor
arrays at a time (orbax's partial restore), giving the same statistics as
:func:`~mats_jax.load_statistics` (tested against it).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from mats_jax.io.errors import CheckpointError
from mats_jax.io.orbax import OrbaxReader
from mats_jax.stats.io import read_layout
from mats_jax.stats.likelihood import StatisticsInputError
from mats_jax.stats.statistic import Statistic

__all__ = ["StatisticsReader"]


class StatisticsReader:
    """Serves one leaf's statistic at a time from a statistics checkpoint.

    Args:
      path: a directory written by :func:`mats_jax.save_statistics`.

    Attributes:
      path: the directory.
      leaves: the saved leaf paths, in order.

    Raises:
      CheckpointError: if ``path`` is missing or not a statistics checkpoint.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp
      >>> from mats_jax import Diagonal, save_statistics
      >>> path = os.path.join(tempfile.mkdtemp(), "fisher")
      >>> save_statistics(path, {"w": Diagonal(jnp.arange(3.0)), "b": None})
      >>> reader = StatisticsReader(path)
      >>> reader.read("w").f, reader.read("b")
      (Array([0., 1., 2.], dtype=float32), None)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.path):
            raise CheckpointError(
                f"{self.path}: no statistics checkpoint there; save one with mats_jax.save_statistics"
            )
        try:
            meta = read_layout(self.path)
        except StatisticsInputError as e:
            raise CheckpointError(str(e)) from e
        self._layout: dict[str, Any] = meta["layout"]
        self.leaves: list[str] = list(meta["order"])
        has_arrays = any(entry is not None for entry in self._layout.values())
        self._arrays = (
            OrbaxReader(os.path.join(self.path, "arrays")) if has_arrays else None
        )
        for leaf, entry in self._layout.items():
            if entry is None:
                continue
            kind = Statistic.by_kind(entry["type"])
            assert self._arrays is not None
            missing = [
                f for f in kind.array_fields if f"{leaf}/{f}" not in self._arrays.specs
            ]
            if missing:
                raise CheckpointError(
                    f"{self.path}: leaf {leaf!r} ({kind.kind}) has no saved {missing} "
                    "under arrays/; the checkpoint is incomplete or damaged: save it again"
                )

    def abstract(self, leaf: str) -> Statistic | None:
        """The statistic saved for ``leaf`` with shapes in place of arrays
        (:class:`jax.ShapeDtypeStruct`), read from the metadata alone: for
        checking it against a leaf before any array is restored."""
        entry = self._layout.get(leaf)
        if entry is None:
            return None
        assert self._arrays is not None
        kind = Statistic.by_kind(entry["type"])
        arrays = {}
        for f in kind.array_fields:
            shape, dtype, _ = self._arrays.specs[f"{leaf}/{f}"]
            arrays[f] = jax.ShapeDtypeStruct(shape, dtype)
        return kind.from_saved(arrays, entry)

    def read(self, leaf: str) -> Statistic | None:
        """The statistic saved for ``leaf``, or None (saved as None, or not saved)."""
        entry = self._layout.get(leaf)
        if entry is None:
            return None
        assert self._arrays is not None
        kind = Statistic.by_kind(entry["type"])
        arrays = {
            f: jnp.asarray(self._arrays.read(f"{leaf}/{f}")) for f in kind.array_fields
        }
        return kind.from_saved(arrays, entry)
