"""Orbax checkpoints of parameter pytrees (Flax linen dicts, nnx states).

:func:`save_orbax` and :func:`load_orbax` are thin, documented wrappers over
``orbax.checkpoint.StandardCheckpointer`` that also work with sharded arrays
across processes (every process calls them, as orbax requires).
:class:`OrbaxReader` restores one leaf at a time (orbax's partial restore), so
a merge never holds a whole model.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from mats_jax.io.errors import CheckpointError, check_parent, check_replaceable
from mats_jax.stats.io import is_statistics
from mats_jax.tree import path_str

# orbax.checkpoint (and etils) is imported where it is used: importing it takes
# 0.1-0.2 s, which every mats-jax command would pay, most of them never touching
# this format.

__all__ = ["OrbaxReader", "damage", "is_orbax", "load_orbax", "save_orbax"]

_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt")


def is_orbax(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory holding an orbax checkpoint."""
    path = os.fspath(path)
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, m)) for m in _MARKERS
    )


def damage(path: str | os.PathLike[str]) -> list[str]:
    """What is visibly missing or broken in an orbax checkpoint directory, one
    phrase per problem for messages (empty when every expected piece is there).

    An orbax checkpoint of a pytree holds ``_METADATA`` (the tree's structure,
    JSON) and, in orbax's default OCDBT format (``"use_ocdbt": true`` in it),
    ``manifest.ocdbt`` and data directories ``d/`` (at the top and under each
    writing process's ``ocdbt.process_<i>/``) holding the arrays' shapes,
    dtypes and bytes. A copy that stopped early, or a clean-up that deleted
    the data chunks, leaves some of them out.

    Examples:
      >>> import os, shutil, tempfile, numpy as np
      >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
      >>> save_orbax(path, {"w": np.ones(3)})
      >>> damage(path)
      []
      >>> shutil.rmtree(os.path.join(path, "d"))
      >>> damage(path)
      ['its data directory d/ is missing or empty']
    """
    path = os.fspath(path)
    problems: list[str] = []
    meta_file = os.path.join(path, "_METADATA")
    use_ocdbt = os.path.exists(os.path.join(path, "manifest.ocdbt"))
    if not os.path.isfile(meta_file):
        problems.append("its _METADATA file (the tree's structure) is missing")
    else:
        try:
            with open(meta_file) as f:
                meta = json.load(f)
            use_ocdbt = use_ocdbt or bool(meta.get("use_ocdbt"))
            if not isinstance(meta.get("tree_metadata"), dict):
                raise ValueError("no tree_metadata")
        except (OSError, ValueError, AttributeError):
            problems.append(
                "its _METADATA file is not the JSON orbax writes (truncated or overwritten)"
            )
    if use_ocdbt:
        if not os.path.isfile(os.path.join(path, "manifest.ocdbt")):
            problems.append("manifest.ocdbt (the index of its array data) is missing")
        processes = sorted(
            n for n in os.listdir(path) if n.startswith("ocdbt.process_")
        )
        data_dirs = ["d", *(os.path.join(n, "d") for n in processes)]
        for d in data_dirs:
            full = os.path.join(path, d)
            if not os.path.isdir(full) or not os.listdir(full):
                where = "its data directory" if d == "d" else "the data directory"
                problems.append(f"{where} {d}/ is missing or empty")
    return problems


def _incomplete(path: str, problems: list[str]) -> str:
    return (
        f"{path}: this orbax checkpoint is incomplete or damaged: "
        f"{'; '.join(problems)}; save or copy it again"
    )


def _not_parameters(path: str) -> CheckpointError | None:
    """The error for a statistics checkpoint given where parameters are read."""
    if not is_statistics(path):
        return None
    return CheckpointError(
        f"{path}: a statistics checkpoint (written by mats_jax.save_statistics), not "
        "model parameters: give it as a model's `statistics:` in a recipe, or load it "
        "with mats_jax.load_statistics"
    )


def _metadata_tree(path: str) -> Any:
    import orbax.checkpoint as ocp
    from etils import epath

    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no orbax checkpoint directory there")
    wrong = _not_parameters(path)
    if wrong is not None:
        raise wrong
    problems = damage(path)
    if problems:
        # Orbax would fail on these in worker threads, printing asyncio
        # tracebacks beside its error: name what is missing instead.
        raise CheckpointError(_incomplete(path, problems))
    try:
        # The handler's metadata, not a checkpointer's: a checkpointer also
        # looks for the step's _CHECKPOINT_METADATA, which an item inside a
        # composite checkpoint (a statistics checkpoint's arrays/, a
        # CheckpointManager step's item) keeps one level up, and logs a
        # warning for every such item it opens.
        meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))
    except Exception as e:
        raise CheckpointError(
            f"{path}: not a readable orbax checkpoint ({type(e).__name__}: {e}); it "
            "may be incomplete: save or copy it again"
        ) from e
    tree = getattr(meta, "tree", None)
    leaves = jax.tree.leaves(tree)
    if not leaves or not all(
        hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves
    ):
        raise CheckpointError(
            f"{path}: no array metadata readable in this orbax checkpoint (it holds "
            "no arrays, or its data is damaged): save or copy it again"
        )
    return tree


def _unreadable(path: str, what: str, cause: BaseException) -> CheckpointError:
    """The error for a restore that failed although the metadata was read:
    most often array data missing or damaged."""
    problems = damage(path)
    if os.path.isdir(path) and not any(
        n.startswith("ocdbt.process_") for n in os.listdir(path)
    ):
        # Orbax writes each process's array bytes under its own directory.
        problems.append("no ocdbt.process_<i>/ directory (the arrays' bytes) is there")
    advice = (
        f"this orbax checkpoint is incomplete or damaged: {'; '.join(problems)}; "
        "save or copy it again"
        if problems
        else "if its data files were deleted, truncated or changed since it was "
        "written, save or copy it again"
    )
    return CheckpointError(
        f"{path}: cannot read {what} ({type(cause).__name__}: {cause}); {advice}"
    )


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
      CheckpointError: if ``path`` is the working directory or holds it, or a
        file stands where a directory above it must be.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp
      >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
      >>> save_orbax(path, {"w": jnp.ones(2)})
      >>> save_orbax(path, {"w": jnp.zeros(2)}, overwrite=True)
      >>> load_orbax(path)["w"]
      array([0., 0.], dtype=float32)
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if os.path.lexists(path):
        check_replaceable(path)
    check_parent(path)  # orbax would fail in its threads, printing tracebacks
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
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    meta = _metadata_tree(path)
    if shardings is None:
        restore_args = jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta
        )
        try:
            with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
                return checkpointer.restore(
                    path,
                    args=ocp.args.PyTreeRestore(item=meta, restore_args=restore_args),
                )
        except Exception as e:
            raise _unreadable(path, "its arrays", e) from e
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
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path, target)
    except Exception as e:
        raise _unreadable(path, "its arrays", e) from e


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
        import orbax.checkpoint as ocp

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
            raise _unreadable(self.path, f"leaf {name!r}", e) from e
        for key in self._keys[name]:
            out = out[key.key]
        return np.asarray(out)
