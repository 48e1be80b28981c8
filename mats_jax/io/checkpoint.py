"""One view of every checkpoint format: leaf paths, shapes, dtypes and lazy reads.

:func:`open_checkpoint` detects the format (orbax directory, Flax msgpack file,
safetensors file or sharded directory), applies a :class:`~mats_jax.io.layout.Layout`
and returns a :class:`Checkpoint` whose leaves are named by parameter-tree path
(``h/0/fc/kernel``) whatever the format. :func:`load_checkpoint` and
:func:`save_checkpoint` read and write whole pytrees; :func:`atomic_output`
makes any output appear completely or not at all.

Examples:
  >>> import os, tempfile, numpy as np
  >>> out = os.path.join(tempfile.mkdtemp(), "m.safetensors")
  >>> save_checkpoint(out, {"fc": {"kernel": np.ones((2, 3), np.float32)}})
  >>> ckpt = open_checkpoint(out)
  >>> ckpt.format, ckpt.leaves
  ('safetensors', {'fc/kernel': LeafInfo(shape=(2, 3), dtype=dtype('float32'))})
  >>> load_checkpoint(out)["fc"]["kernel"].shape
  (2, 3)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Protocol

import jax
import numpy as np

from mats_jax.io import msgpack as msgpack_io
from mats_jax.io import orbax as orbax_io
from mats_jax.io import safetensors as st_io
from mats_jax.io.errors import CheckpointError, check_parent, check_replaceable
from mats_jax.io.layout import IDENTITY, PRESETS, Layout, inverse_permutation
from mats_jax.tree import nest_paths, path_str

__all__ = [
    "CHECKSUMS",
    "FORMATS",
    "Checkpoint",
    "CheckpointWriter",
    "LeafInfo",
    "Reader",
    "atomic_output",
    "copy_folder_files",
    "detect_format",
    "file_digest",
    "load_checkpoint",
    "model_folder_files",
    "new_digest",
    "open_checkpoint",
    "open_reader",
    "resolve_layout",
    "save_checkpoint",
    "save_model_folder",
]

Format = Literal["safetensors", "msgpack", "orbax"]
FORMATS: tuple[str, ...] = ("safetensors", "msgpack", "orbax")
MSGPACK_NAME = "params.msgpack"


class Reader(Protocol):
    """A format's lazy reader: tensor specs in the checkpoint's own names, one
    tensor per :meth:`read` (``specs``: name -> (shape, dtype, file))."""

    format: str
    separator: str
    path: str
    files: list[str]
    metadata: dict[str, str]
    specs: dict[str, tuple[tuple[int, ...], np.dtype, str]]

    def read(self, name: str) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """A leaf's shape and dtype as the parameter tree sees it (after the layout)."""

    shape: tuple[int, ...]
    dtype: np.dtype


def detect_format(path: str | os.PathLike[str]) -> Format:
    """The format of the checkpoint at ``path``.

    Raises:
      CheckpointError: if nothing is there or the format is not recognised.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        if orbax_io.is_orbax(path):
            return "orbax"
        names = os.listdir(path)
        if st_io.INDEX_NAME in names or any(n.endswith(".safetensors") for n in names):
            return "safetensors"
        if any(n.endswith(".msgpack") for n in names):
            return "msgpack"
        raise CheckpointError(
            f"{path}: a directory with no orbax checkpoint, .safetensors or .msgpack file; "
            "point at the checkpoint itself"
        )
    if path.endswith((".safetensors", ".json")):
        return "safetensors"
    if path.endswith((".msgpack", ".flax")):
        return "msgpack"
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "msgpack"


def _msgpack_file(path: str) -> str:
    if not os.path.isdir(path):
        return path
    found = sorted(n for n in os.listdir(path) if n.endswith(".msgpack"))
    if len(found) != 1:
        raise CheckpointError(
            f"{path}: expected exactly one .msgpack file, found {found}"
        )
    return os.path.join(path, found[0])


def resolve_layout(layout: Layout | str | Any) -> Layout:
    """A :class:`Layout` from a layout, a preset name or a list of rule dicts."""
    if isinstance(layout, str):
        if layout not in PRESETS:
            raise CheckpointError(
                f"unknown layout {layout!r}; the presets are {sorted(PRESETS)}"
            )
        return PRESETS[layout]
    return Layout.from_data(layout)


class Checkpoint:
    """A checkpoint opened for lazy, leaf-by-leaf reading.

    Attributes:
      path: the checkpoint's path.
      format: ``"safetensors"``, ``"msgpack"`` or ``"orbax"``.
      files: the files it is made of (for checksums).
      metadata: the file's own metadata (safetensors ``__metadata__``).
      leaves: tree path -> :class:`LeafInfo`, in the checkpoint's order.
      names: tree path -> the checkpoint's own name for the leaf.
    """

    def __init__(self, reader: Reader, layout: Layout = IDENTITY) -> None:
        self._reader = reader
        self.path = reader.path
        self.format = reader.format
        self.files = list(reader.files)
        self.metadata: dict[str, str] = dict(reader.metadata or {})
        self.layout = layout
        self.leaves: dict[str, LeafInfo] = {}
        self.names: dict[str, str] = {}
        self._transpose: dict[str, tuple[int, ...] | None] = {}
        for name, (shape, dtype, _) in reader.specs.items():
            path, perm = layout.to_tree(
                name, ndim=len(shape), separator=reader.separator
            )
            if path in self.leaves:
                raise CheckpointError(
                    f"{self.path}: the layout maps both {self.names[path]!r} and {name!r} "
                    f"to leaf {path!r}; fix the layout rules"
                )
            if perm is not None:
                shape = tuple(shape[i] for i in perm)
            self.leaves[path] = LeafInfo(tuple(shape), np.dtype(dtype))
            self.names[path] = name
            self._transpose[path] = perm

    def file_of(self, path: str) -> str:
        """The file holding leaf ``path``."""
        return self._reader.specs[self.names[path]][2]

    def read(self, path: str) -> np.ndarray:
        """The leaf at tree path ``path``, transposed as the layout says."""
        if path not in self.leaves:
            raise CheckpointError(f"{self.path}: no leaf {path!r}")
        array = self._reader.read(self.names[path])
        perm = self._transpose[path]
        if perm is not None:
            array = np.ascontiguousarray(np.transpose(array, perm))
        return array

    def reads_blocks(self, path: str) -> bool:
        """Whether :meth:`read_block` can read leaf ``path``: its format reads
        byte ranges (safetensors) and it is stored in the tree's orientation
        (no transpose in the layout), so its flattened entries are the
        tree's."""
        return (
            getattr(self._reader, "read_range", None) is not None
            and path in self.leaves
            and self._transpose[path] is None
        )

    def read_block(self, path: str, start: int, out: np.ndarray) -> None:
        """Fills ``out`` with entries ``start : start + out.size`` of leaf
        ``path``, flattened in C order, without reading the rest of the leaf.

        Args:
          path: a leaf for which :meth:`reads_blocks` is True.
          start: the first entry of the flattened leaf.
          out: a C-contiguous array of the leaf's stored dtype (reused by the
            caller from block to block).

        Raises:
          CheckpointError: the leaf cannot be read in blocks, or the block
            does not fit it.

        Examples:
          >>> import os, tempfile, numpy as np
          >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
          >>> save_checkpoint(path, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
          >>> ckpt, out = open_checkpoint(path), np.empty(4, np.float32)
          >>> ckpt.read_block("w", 2, out); out
          array([2., 3., 4., 5.], dtype=float32)
        """
        if not self.reads_blocks(path):
            raise CheckpointError(
                f"{self.path}: leaf {path!r} cannot be read in blocks (a {self.format} "
                "checkpoint, or a leaf the layout transposes); read it whole"
            )
        read_range = self._reader.read_range  # type: ignore[attr-defined]
        read_range(self.names[path], start, out)

    @property
    def nbytes(self) -> int:
        """The total size of the leaves in bytes."""
        return sum(
            int(np.prod(i.shape, dtype=np.int64)) * i.dtype.itemsize
            for i in self.leaves.values()
        )


def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    format: Format | None = None,
    layout: Layout | str | Any = None,
) -> Checkpoint:
    """Opens a checkpoint for lazy reading (only its metadata is read here).

    Args:
      path: an orbax directory, a msgpack file, a safetensors file, index or
        sharded directory.
      format: the format, detected when None.
      layout: a :class:`Layout`, a preset name (``"hf_bert"``, ``"hf_llama"``,
        ``"hf_linear"``, ``"nnx_state"``: :data:`~mats_jax.io.PRESETS`) or a
        list of rule dicts.

    Raises:
      CheckpointError: naming the file if it is missing, truncated or unreadable.

    Examples:
      >>> import os, tempfile, numpy as np
      >>> path = os.path.join(tempfile.mkdtemp(), "hf.safetensors")
      >>> save_checkpoint(path, {"fc": {"weight": np.zeros((3, 2), np.float32)}})
      >>> ckpt = open_checkpoint(path, layout="hf_linear")  # (out, in) -> (in, out)
      >>> ckpt.leaves["fc/kernel"].shape, ckpt.names["fc/kernel"]
      ((2, 3), 'fc.weight')
    """
    return Checkpoint(open_reader(path, format=format), resolve_layout(layout))


def open_reader(
    path: str | os.PathLike[str], *, format: Format | None = None
) -> Reader:
    """The format's lazy reader of the checkpoint at ``path``, in its own names.

    What :func:`open_checkpoint` wraps with a layout; a reader that derives
    tensors from another (an adapter on its base, :mod:`mats_jax.io.adapters`)
    wraps it too.

    Raises:
      CheckpointError: naming the file if it is missing, truncated or unreadable.
    """
    path = os.path.abspath(os.fspath(path))
    fmt = format or detect_format(path)
    if fmt == "safetensors":
        return st_io.SafetensorsReader(path)
    if fmt == "msgpack":
        return msgpack_io.MsgpackReader(_msgpack_file(path))
    if fmt == "orbax":
        return orbax_io.OrbaxReader(path)
    raise CheckpointError(
        f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}"
    )


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    format: Format | None = None,
    layout: Layout | str | Any = None,
) -> dict[str, Any]:
    """The whole checkpoint as nested dicts of numpy arrays (see :func:`open_checkpoint`).

    Examples:
      >>> import os, tempfile, numpy as np
      >>> path = os.path.join(tempfile.mkdtemp(), "params.msgpack")
      >>> save_checkpoint(path, {"dense": {"bias": np.arange(2.0)}})
      >>> load_checkpoint(path)
      {'dense': {'bias': array([0., 1.])}}
    """
    ckpt = open_checkpoint(path, format=format, layout=layout)
    return nest_paths({p: ckpt.read(p) for p in ckpt.leaves})


def flatten(tree: Any) -> dict[str, Any]:
    """``{path: leaf}`` for a parameter pytree, in flattening order.

    Raises:
      CheckpointError: if two leaves have one path (a key holding ``/`` and
        nested keys: ``{"a/b": x, "a": {"b": y}}``), which no format can
        store apart.
    """
    out: dict[str, Any] = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        path = path_str(key_path)
        if path in out:
            raise CheckpointError(
                f"two leaves have the path {path!r} (a key holding '/' and nested keys "
                "name the same leaf); rename one of them"
            )
        out[path] = leaf
    return out


def save_checkpoint(
    path: str | os.PathLike[str],
    tree: Any,
    *,
    format: Format | None = None,
    layout: Layout | str | Any = None,
    max_shard_size: int | None = None,
    overwrite: bool = False,
) -> None:
    """Writes a parameter pytree, completely or not at all.

    Args:
      path: the output: a ``.safetensors`` file or a directory (safetensors,
        sharded when ``max_shard_size`` is given), a ``.msgpack`` file, or an
        orbax directory.
      tree: the parameters (numpy or jax arrays).
      format: the format; by default from the path's suffix (``.safetensors``,
        ``.msgpack``), else orbax.
      layout: the layout to write names and orientations with (safetensors).
      max_shard_size: bytes per safetensors shard at most.
      overwrite: replace an existing output.

    Raises:
      FileExistsError: if ``path`` exists and ``overwrite`` is False.

    Examples:
      >>> import os, tempfile, numpy as np
      >>> out = os.path.join(tempfile.mkdtemp(), "sharded")
      >>> tree = {"a": np.zeros(4, np.float32), "b": np.ones(4, np.float32)}
      >>> save_checkpoint(out, tree, format="safetensors", max_shard_size=16)
      >>> sorted(os.listdir(out))  # doctest: +NORMALIZE_WHITESPACE
      ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors',
       'model.safetensors.index.json']
    """
    path = os.path.abspath(os.fspath(path))
    if format is None:
        format = (
            "safetensors"
            if path.endswith(".safetensors")
            else "msgpack"
            if path.endswith(".msgpack")
            else "orbax"
        )
    with atomic_output(path, overwrite=overwrite) as tmp:
        write_tree(
            tmp, tree, format=format, layout=layout, max_shard_size=max_shard_size
        )


# A model folder's weight files, which a merge writes anew rather than copies.
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".safetensors.index.json",
    ".bin",
    ".bin.index.json",
    ".msgpack",
    ".msgpack.index.json",
    ".h5",
    ".pt",
    ".pth",
    ".ckpt",
    ".gguf",
    ".onnx",
)


def model_folder_files(directory: str | os.PathLike[str]) -> list[str]:
    """The names of a model folder's files other than its weights and model card.

    What makes a Hugging Face folder loadable besides the weights:
    ``config.json``, the tokenizer's files, ``generation_config.json``, chat
    templates, and subfolders holding no weights (sentence-transformers'
    ``1_Pooling``). Hidden files and ``README.md`` (the card is written anew)
    are left out.

    Examples:
      >>> import os, tempfile
      >>> d = tempfile.mkdtemp()
      >>> for name in ["config.json", "model.safetensors", "tokenizer.json", "README.md"]:
      ...     _ = open(os.path.join(d, name), "w").write("{}")
      >>> model_folder_files(d)
      ['config.json', 'tokenizer.json']
    """
    directory = os.fspath(directory)
    out = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if (
            name == "README.md"
            or name.startswith(".")
            or name.endswith(WEIGHT_SUFFIXES)
        ):
            continue
        if os.path.isdir(path):
            if any(
                f.endswith(WEIGHT_SUFFIXES) for _, _, fs in os.walk(path) for f in fs
            ):
                continue
        elif not os.path.isfile(path):
            continue
        out.append(name)
    return out


def copy_folder_files(source: str, names: Sequence[str], target: str) -> None:
    """Copies ``names`` (files or folders) from directory ``source`` into ``target``."""
    for name in names:
        src = os.path.join(source, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(target, name))
        else:
            shutil.copy2(src, os.path.join(target, name))


def save_model_folder(
    path: str | os.PathLike[str],
    tree: Any,
    *,
    like: str | os.PathLike[str],
    layout: Layout | str | Any = None,
    max_shard_size: int | None = None,
    overwrite: bool = False,
) -> None:
    """Writes parameters as a model folder like ``like``, completely or not at all.

    The weights go to ``model.safetensors`` (or shards and an index), with the
    ``format`` metadata of ``like``'s weights (``pt`` when it has none, which
    ``transformers`` requires), names and orientations from ``layout``; the
    folder's other files (:func:`model_folder_files`: config, tokenizer …)
    are copied from ``like``. For merged parameters that a tool of the
    original model (``transformers.AutoModel.from_pretrained``) should load.

    Raises:
      CheckpointError: if ``like`` is not a directory, or ``path`` is inside it.
      FileExistsError: if ``path`` exists and ``overwrite`` is False.

    Examples:
      >>> import os, tempfile, numpy as np
      >>> d = tempfile.mkdtemp()
      >>> base = os.path.join(d, "base")
      >>> save_checkpoint(base, {"w": np.zeros(2, np.float32)}, format="safetensors")
      >>> _ = open(os.path.join(base, "config.json"), "w").write("{}")
      >>> save_model_folder(os.path.join(d, "merged"), {"w": np.ones(2, np.float32)}, like=base)
      >>> sorted(os.listdir(os.path.join(d, "merged")))
      ['config.json', 'model.safetensors']
    """
    like = os.path.abspath(os.fspath(like))
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(like):
        raise CheckpointError(f"like={like}: not a model folder (a directory)")
    if path == like or path.startswith(like.rstrip(os.sep) + os.sep):
        raise CheckpointError(f"{path}: inside the model folder it copies ({like})")
    metadata = {"format": "pt"}
    try:
        metadata = {"format": open_checkpoint(like).metadata.get("format", "pt")}
    except CheckpointError:
        pass  # a folder with no readable weights: its other files still apply
    with atomic_output(path, overwrite=overwrite) as tmp:
        write_tree(
            tmp,
            tree,
            format="safetensors",
            layout=layout,
            max_shard_size=max_shard_size,
            metadata=metadata,
        )
        copy_folder_files(like, model_folder_files(like), tmp)


class CheckpointWriter:
    """Writes a parameter checkpoint one leaf at a time, in a declared order.

    The one writer behind :func:`save_checkpoint` and the streaming merge:
    safetensors is streamed leaf by leaf (names and orientations from the
    layout); msgpack and orbax have no append, so their leaves are collected
    and written at :meth:`close`.

    Args:
      path: the new output (inside :func:`atomic_output`).
      leaves: ``(tree path, shape, dtype)`` of every leaf, in writing order.
      format: ``"safetensors"``, ``"msgpack"`` or ``"orbax"``.
      layout: the layout names and orientations are written with (safetensors).
      max_shard_size: bytes per safetensors shard at most.
      metadata: safetensors ``__metadata__``.

    Examples:
      >>> import os, tempfile, numpy as np
      >>> out = os.path.join(tempfile.mkdtemp(), "m.safetensors")
      >>> writer = CheckpointWriter(out, [("w", (2,), np.dtype("float32"))], format="safetensors")
      >>> writer.write("w", np.ones(2, np.float32)); writer.close()
      >>> load_checkpoint(out)["w"]
      array([1., 1.], dtype=float32)
    """

    def __init__(
        self,
        path: str,
        leaves: Sequence[tuple[str, tuple[int, ...], Any]],
        *,
        format: str,
        layout: Layout | str | Any = None,
        max_shard_size: int | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        if format not in FORMATS:
            raise CheckpointError(
                f"unknown checkpoint format {format!r}; expected one of {FORMATS}"
            )
        self.path = path
        self.format = format
        self._collected: dict[str, np.ndarray] = {}
        self._names: dict[str, tuple[str, tuple[int, ...] | None]] = {}
        self._stream: st_io.SafetensorsWriter | None = None
        if format == "safetensors":
            lay = resolve_layout(layout)
            specs = []
            written: dict[str, str] = {}
            for leaf, shape, dtype in leaves:
                name, perm = lay.to_checkpoint(leaf, ndim=len(shape))
                if name in written:
                    raise CheckpointError(
                        f"leaves {written[name]!r} and {leaf!r} are both written as tensor "
                        f"{name!r} (a dotted key and a nested one name the same tensor); "
                        "rename one of them"
                    )
                written[name] = leaf
                inverse = None if perm is None else inverse_permutation(perm)
                self._names[leaf] = (name, inverse)
                stored = shape if inverse is None else tuple(shape[i] for i in inverse)
                specs.append((name, stored, np.dtype(dtype)))
            self._stream = st_io.SafetensorsWriter(
                path, specs, max_shard_size=max_shard_size, metadata=metadata
            )

    @property
    def keeps_leaves(self) -> bool:
        """Whether :meth:`write` keeps the arrays it is given until
        :meth:`close` (msgpack and orbax), so a caller must not refill them;
        safetensors writes each leaf before :meth:`write` returns."""
        return self._stream is None

    def write(self, leaf: str, array: Any) -> None:
        """Writes (or, for msgpack and orbax, keeps) the next leaf."""
        array = np.asarray(array)
        if self._stream is None:
            self._collected[leaf] = array
            return
        name, inverse = self._names[leaf]
        if inverse is not None:  # a view: the writer copies it block by block
            array = np.transpose(array, inverse)
        self._stream.write(name, array)

    def close(self) -> None:
        """Completes the checkpoint."""
        if self._stream is not None:
            self._stream.close()
        elif self.format == "msgpack":
            target = (
                self.path
                if self.path.endswith(".msgpack")
                else os.path.join(self.path, MSGPACK_NAME)
            )
            if target != self.path:
                os.makedirs(self.path, exist_ok=True)
            msgpack_io.write_msgpack(target, nest_paths(self._collected))
        else:
            orbax_io.save_orbax(self.path, nest_paths(self._collected))

    def abort(self) -> None:
        """Closes an open file after a failure (the caller removes the output)."""
        if self._stream is not None:
            self._stream.abort()


def write_tree(
    path: str,
    tree: Any,
    *,
    format: str,
    layout: Layout | str | Any = None,
    max_shard_size: int | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes a pytree at ``path`` in ``format`` without the atomic wrapper
    (``metadata``: the safetensors ``__metadata__``)."""
    flat = {p: np.asarray(x) for p, x in flatten(tree).items()}
    if not flat:
        raise CheckpointError("the tree holds no array leaves: nothing to save")
    writer = CheckpointWriter(
        path,
        [(p, x.shape, x.dtype) for p, x in flat.items()],
        format=format,
        layout=layout,
        max_shard_size=max_shard_size,
        metadata=metadata,
    )
    try:
        for p, x in flat.items():
            writer.write(p, x)
        writer.close()
    finally:
        writer.abort()


_OWNER = ".owner"  # the pid of the process writing a scratch directory


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _remove_stale_scratch(parent: str, prefix: str) -> None:
    """Removes the scratch directories a killed writer of the same output left
    (``.<name>.tmp-*`` whose owner process is gone), with a warning naming each."""
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        scratch = os.path.join(parent, name)
        try:
            with open(os.path.join(scratch, _OWNER)) as f:
                pid = int(f.read().strip() or -1)
        except (OSError, ValueError):
            continue  # not ours, or being created this instant: leave it
        if pid > 0 and not _alive(pid):
            shutil.rmtree(scratch, ignore_errors=True)
            warnings.warn(
                f"removed {scratch}, left by an earlier write of this output that "
                f"was killed (process {pid})",
                stacklevel=3,
            )


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], *, overwrite: bool = False
) -> Iterator[str]:
    """Yields a temporary path next to ``path``; renames it into place on success.

    The temporary path is in a hidden directory beside ``path`` (same file
    system, so the final rename is atomic). On an exception it is removed and
    nothing appears at ``path``; an existing ``path`` is replaced only with
    ``overwrite``, and only once the new output is complete.

    The scratch directory is ``.<name>.tmp-*`` and records its writer's pid:
    one left by a killed process (SIGKILL gives no chance to clean up) is
    removed, with a warning, by the next write of the same output.
    Replacing an existing output takes two renames (the old output aside,
    the new one in): between them, for the time of one rename, nothing is at
    ``path``; the old output is deleted only after the new one is in place.

    Raises:
      FileExistsError: if ``path`` exists and ``overwrite`` is False (before
        anything is written).
      CheckpointError: if ``path`` is the working directory or holds it, or a
        file stands where a directory above it must be.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(
            f"{path} exists; pass --overwrite (overwrite=True) to replace it"
        )
    if os.path.lexists(path):
        check_replaceable(path)
    parent = os.path.dirname(path)
    check_parent(path)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(path)}.tmp-"
    _remove_stale_scratch(parent, prefix)
    scratch = tempfile.mkdtemp(prefix=prefix, dir=parent)
    with open(os.path.join(scratch, _OWNER), "w") as f:
        f.write(str(os.getpid()))
    try:
        tmp = os.path.join(scratch, os.path.basename(path))
        yield tmp
        if not os.path.lexists(tmp):
            raise CheckpointError(f"{path}: the writer produced nothing")
        if os.path.lexists(path):
            os.replace(path, os.path.join(scratch, ".replaced"))
        os.replace(tmp, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


CHECKSUMS = ("sha256", "blake3")
"""The digests a model card can record for its inputs. sha256 is what the
Hugging Face hub lists per file; blake3 (the ``blake3`` package, an optional
dependency) hashed 2.1x as fast on one core of the benchmark machine
(docs/cli.md)."""


def new_digest(algorithm: str) -> Any:
    """A fresh hash object (``update``, ``hexdigest``) of one of :data:`CHECKSUMS`.

    Raises:
      CheckpointError: for another name, or blake3 without its package.

    Examples:
      >>> h = new_digest("sha256")
      >>> h.update(b"abc")
      >>> h.hexdigest()[:16]
      'ba7816bf8f01cfea'
    """
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3":
        try:
            import blake3  # optional: only this checksum needs it
        except ImportError:
            raise CheckpointError(
                "checksum blake3 needs the blake3 package (pip install blake3, or "
                "mats-jax[blake3]); or choose sha256, or none"
            ) from None
        return blake3.blake3()
    raise CheckpointError(
        f"unknown checksum {algorithm!r}: expected one of {', '.join(CHECKSUMS)}"
    )


def file_digest(path: str, algorithm: str = "sha256", chunk: int = 1 << 24) -> str:
    """The hex digest of a file (one of :data:`CHECKSUMS`), read in chunks."""
    digest = new_digest(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
