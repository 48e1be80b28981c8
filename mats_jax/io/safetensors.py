"""Hugging Face safetensors: single files and sharded directories with an index.json.

Opening goes through the ``safetensors`` library (``safe_open``), which
checks each file's header and the tensors' sizes against the file. Reading is
then one ``preadv`` per tensor, straight into a new numpy array, at the
tensor's offset from that checked header: going through ``safe_open`` and
``get_tensor`` for every tensor (re-opening the file and parsing its header
each time) took about twice as long on the IO benchmark's 4 GB of inputs.
``pread`` rather than a memory map so tensors already read do not stay in the
process's resident memory.

Writing is streamed: the library's writer needs every tensor in memory at
once, so :class:`SafetensorsWriter` writes the same format (an 8-byte
little-endian header length, a JSON header padded with spaces to a multiple of
8 bytes, then the tensors' bytes back to back) from a plan of names, shapes and
dtypes known in advance, one tensor at a time. Files it writes are read back by
the library in the tests, and are byte-identical to ``safetensors.numpy.save_file``'s
for tensors given in that function's order.

A sharded checkpoint is a directory of ``model-00001-of-0000N.safetensors``
files and ``model.safetensors.index.json`` mapping each tensor to its file (the
layout ``transformers`` reads and writes).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

import ml_dtypes
import numpy as np

from mats_jax.io.errors import CheckpointError

__all__ = [
    "BUFFER_ALIGNMENT",
    "INDEX_NAME",
    "SINGLE_NAME",
    "SafetensorsReader",
    "SafetensorsWriter",
    "TensorSpec",
    "aligned_empty",
    "plan_shards",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

TensorSpec = tuple[str, tuple[int, ...], np.dtype]


def dtype_name(dtype: Any, tensor: str | None = None) -> str:
    """The safetensors name of a numpy dtype (``F32``, ``BF16`` …); ``tensor``
    names the tensor in the error."""
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        where = f"tensor {tensor!r}: " if tensor is not None else ""
        raise CheckpointError(
            f"{where}safetensors cannot store dtype {np.dtype(dtype)} (it stores "
            f"numbers and booleans: {', '.join(_DTYPES)}); drop the leaf or convert it"
        ) from None


def _nbytes(shape: Sequence[int], dtype: Any) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


class SafetensorsReader:
    """Lazy reader of a safetensors file or sharded directory; one tensor per :meth:`read`.

    Args:
      path: a ``.safetensors`` file, a ``model.safetensors.index.json``, or a
        directory holding either an index or exactly one ``.safetensors`` file.

    Attributes:
      path: the path given, absolute.
      files: the ``.safetensors`` files, in index order.
      specs: native tensor name -> (shape, dtype, file).
      separator: ``"."``, the separator of safetensors names.

    Raises:
      CheckpointError: naming the file, if it is missing, truncated or not
        safetensors, or if the index names a file that is not there.
    """

    format = "safetensors"
    separator = "."

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self._safe_open = safe_open
        self.path = os.path.abspath(os.fspath(path))
        self.files, index = _resolve_files(self.path)
        self.metadata: dict[str, str] = {}
        self.specs: dict[str, tuple[tuple[int, ...], np.dtype, str]] = {}
        self._offsets: dict[str, int] = {}
        for file in self.files:
            with self._open(file) as handle:
                self.metadata.update(handle.metadata() or {})
                for name in handle.keys():
                    if name in self.specs:
                        raise CheckpointError(
                            f"{file}: tensor {name!r} is also in {self.specs[name][2]}; "
                            "a tensor must be stored once"
                        )
                    piece = handle.get_slice(name)
                    dtype = piece.get_dtype()
                    if dtype not in _DTYPES:
                        raise CheckpointError(
                            f"{file}: tensor {name!r} has unsupported dtype {dtype}"
                        )
                    self.specs[name] = (tuple(piece.get_shape()), _DTYPES[dtype], file)
            self._offsets.update(_data_offsets(file))
        for name, file in (index or {}).items():
            if self.specs.get(name, (None, None, None))[2] != file:
                held = self.specs[name][2] if name in self.specs else "no file"
                raise CheckpointError(
                    f"{self.path}: the index maps tensor {name!r} to {file}, but "
                    f"{held} holds it: the index does not fit its shards; copy or "
                    "download the checkpoint again"
                )

    def _open(self, file: str) -> Any:
        try:
            return self._safe_open(file, framework="numpy", backend="pread")
        except FileNotFoundError:
            raise CheckpointError(f"{file}: file not found") from None
        except Exception as e:
            raise CheckpointError(
                f"{file}: not a readable safetensors file ({e}); it may be truncated, "
                "still being copied or written wrongly: copy or download it again"
            ) from e

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a numpy array (a fresh copy)."""
        shape, dtype, file = self.specs[name]
        out = aligned_empty(_nbytes(shape, dtype), np.uint8)
        _read_exactly(file, self._offsets[name], out.data, name)
        return out.view(dtype).reshape(shape)

    def read_range(self, name: str, start: int, out: np.ndarray) -> None:
        """Fills ``out`` with the tensor's entries ``start : start + out.size``
        in its stored (C) order: a block of a large tensor, read into a buffer
        the caller reuses (a fresh array per tensor costs its page faults: on
        the IO benchmark, reading into fresh arrays took about three times as
        long as into a reused block).

        Args:
          name: the tensor.
          start: the first entry, counted in the flattened tensor.
          out: a C-contiguous array of the tensor's dtype.

        Raises:
          CheckpointError: ``out`` of another dtype or not contiguous, or a
            range past the tensor's end.
        """
        shape, dtype, file = self.specs[name]
        size = int(np.prod(shape, dtype=np.int64))
        if out.dtype != dtype or not out.flags.c_contiguous:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is {dtype}; a block of it is read into "
                f"a contiguous {dtype} array, not a{'' if out.flags.c_contiguous else ' strided'} "
                f"{out.dtype} one"
            )
        if not 0 <= start <= start + out.size <= size:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has {size} entries; cannot read "
                f"{out.size} from entry {start}"
            )
        offset = self._offsets[name] + start * dtype.itemsize
        _read_exactly(file, offset, out.reshape(-1).view(np.uint8).data, name)


BUFFER_ALIGNMENT = 64
"""Bytes: XLA's CPU client takes a host array as a device buffer without a
copy only when its data starts on this boundary; numpy's large arrays start
16 bytes past one, so each would be copied once more on its way to JAX."""


def aligned_empty(shape: int | Sequence[int], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a
    :data:`BUFFER_ALIGNMENT` boundary, so ``jax.device_put(x, may_alias=True)``
    uses it in place on the CPU.

    Examples:
      >>> x = aligned_empty((3, 5), np.float32)
      >>> x.shape, x.ctypes.data % BUFFER_ALIGNMENT, x.flags.c_contiguous
      ((3, 5), 0, True)
    """
    dtype = np.dtype(dtype)
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + BUFFER_ALIGNMENT, np.uint8)
    skip = -raw.ctypes.data % BUFFER_ALIGNMENT
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


def _data_offsets(file: str) -> dict[str, int]:
    """Each tensor's absolute byte offset in ``file``, from its header (which
    ``safe_open`` has already checked: 8-byte little-endian length, JSON with
    each tensor's ``data_offsets`` counted from the header's end)."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    start = 8 + length
    return {
        name: start + int(info["data_offsets"][0])
        for name, info in header.items()
        if name != "__metadata__"
    }


def _read_exactly(file: str, offset: int, out: memoryview, name: str) -> None:
    """Fills ``out`` from ``file`` at ``offset`` (a loop: one ``preadv`` reads
    at most about 2 GiB on Linux)."""
    try:
        fd = os.open(file, os.O_RDONLY)
    except FileNotFoundError:
        raise CheckpointError(
            f"{file}: file not found (it was there when the checkpoint was opened)"
        ) from None
    try:
        done = 0
        while done < len(out):
            got = os.preadv(fd, [out[done:]], offset + done)
            if got == 0:
                raise CheckpointError(
                    f"{file}: cannot read tensor {name!r}: the file ends "
                    f"{len(out) - done} bytes before the tensor does; it was "
                    "truncated after it was opened: copy or download it again"
                )
            done += got
    finally:
        os.close(fd)


def _resolve_files(path: str) -> tuple[list[str], dict[str, str] | None]:
    """The ``.safetensors`` files behind a file, an index or a directory, and
    the index's map of tensors to files (None without an index)."""
    if os.path.isdir(path):
        index = os.path.join(path, INDEX_NAME)
        if os.path.exists(index):
            return _index_files(index)
        found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if len(found) != 1:
            raise CheckpointError(
                f"{path}: expected {INDEX_NAME} or exactly one .safetensors file, found "
                f"{found or 'none'}"
            )
        return [os.path.join(path, found[0])], None
    if path.endswith(".json"):
        return _index_files(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found")
    return [path], None


def _index_files(index: str) -> tuple[list[str], dict[str, str]]:
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except FileNotFoundError:
        raise CheckpointError(f"{index}: file not found") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{index}: not a safetensors index (expected a JSON object with a 'weight_map'): {e}"
        ) from e
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{index}: its 'weight_map' must map tensor names to file names, got "
            f"{type(weight_map).__name__}"
        )
    directory = os.path.dirname(index)
    files = []
    located = {}
    for name, file in weight_map.items():
        full = os.path.join(directory, file)
        located[name] = full
        if full not in files:
            if not os.path.exists(full):
                raise CheckpointError(
                    f"{full}: file not found; {index} maps tensor {name!r} to it"
                )
            files.append(full)
    _check_shard_set(index, files)
    return files, located


_SHARD = re.compile(r"^(.*)-(\d+)-of-(\d+)\.safetensors$")


def _check_shard_set(index: str, files: Sequence[str]) -> None:
    """Refuses an index that omits shards its own file names announce
    (``model-00001-of-00003`` listed, ``…-00002-of-00003`` not): their
    tensors would be silently missing."""
    listed = {os.path.basename(f) for f in files}
    for name in sorted(listed):
        m = _SHARD.match(name)
        if m is None:
            continue
        prefix, digits, total = m.group(1), len(m.group(2)), int(m.group(3))
        expected = {
            f"{prefix}-{i:0{digits}d}-of-{m.group(3)}.safetensors"
            for i in range(1, total + 1)
        }
        missing = sorted(expected - listed)
        if missing:
            raise CheckpointError(
                f"{index}: maps no tensor to {missing[:3]} although its shards are "
                f"{total} ({name} is listed): the index is incomplete; copy or "
                "download it again"
            )
        return


def plan_shards(
    specs: Sequence[TensorSpec], max_shard_size: int | None
) -> list[list[TensorSpec]]:
    """Splits tensors, in order, into shards of at most ``max_shard_size`` bytes.

    A tensor larger than the limit gets a shard of its own (as ``transformers``
    does). None: one shard.

    Examples:
      >>> import numpy as np
      >>> f4 = np.dtype(np.float32)
      >>> [len(s) for s in plan_shards([("a", (4,), f4), ("b", (4,), f4), ("c", (8,), f4)], 32)]
      [2, 1]
    """
    if max_shard_size is None:
        return [list(specs)]
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        n = _nbytes(spec[1], spec[2])
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def _header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, shape, dtype in specs:
        n = _nbytes(shape, dtype)
        header[name] = {
            "dtype": dtype_name(dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return struct.pack("<Q", len(text)) + text


class SafetensorsWriter:
    """Writes a safetensors checkpoint one tensor at a time, in a planned order.

    Args:
      path: a ``.safetensors`` file (one shard only), or a directory (created)
        that gets ``model.safetensors``, or shards and an index.
      specs: (name, shape, dtype) of every tensor, in the order they will be
        written.
      max_shard_size: bytes per shard at most (None: one file).
      metadata: string key-value pairs for each file's ``__metadata__``.

    Call :meth:`write` once per tensor in ``specs`` order, then :meth:`close`.
    Memory: one tensor at a time (of a non-contiguous one, a block of rows).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Sequence[TensorSpec],
        *,
        max_shard_size: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self._metadata = dict(metadata or {"format": "pt"})
        if max_shard_size is not None and (
            isinstance(max_shard_size, bool)
            or not isinstance(max_shard_size, (int, np.integer))
            or max_shard_size < 1
        ):
            raise CheckpointError(
                f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}"
            )
        for name, _, dtype in specs:
            dtype_name(dtype, name)
        self._shards = plan_shards(
            [(n, tuple(s), np.dtype(d)) for n, s, d in specs], max_shard_size
        )
        if self.path.endswith(".safetensors"):
            if len(self._shards) > 1:
                raise CheckpointError(
                    f"{self.path}: {len(self._shards)} shards do not fit one file; "
                    "give a directory to write a sharded checkpoint"
                )
            self._files = [self.path]
        else:
            os.makedirs(self.path, exist_ok=True)
            n = len(self._shards)
            names = (
                [SINGLE_NAME]
                if n == 1
                else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            )
            self._files = [os.path.join(self.path, f) for f in names]
        self._order = [
            (i, spec) for i, shard in enumerate(self._shards) for spec in shard
        ]
        self._next = 0
        self._handle: IO[bytes] | None = None

    @property
    def files(self) -> list[str]:
        """The files this writer writes."""
        return list(self._files)

    def write(self, name: str, array: Any) -> None:
        """Writes the next tensor; it must be the next one planned, with its shape and dtype."""
        if self._next >= len(self._order):
            raise CheckpointError(f"{self.path}: tensor {name!r} was not planned")
        shard, (want, shape, dtype) = self._order[self._next]
        array = np.asarray(array)
        if name != want or tuple(array.shape) != shape or array.dtype != dtype:
            raise CheckpointError(
                f"{self.path}: expected tensor {want!r} {shape} {dtype} next, got "
                f"{name!r} {tuple(array.shape)} {array.dtype}"
            )
        if self._handle is None:
            self._handle = open(self._files[shard], "wb")
            self._handle.write(_header(self._shards[shard], self._metadata))
        if array.dtype.byteorder == ">":  # the format is little-endian
            array = array.astype(array.dtype.newbyteorder("<"))
        _write_array(self._handle, array)
        self._next += 1
        last_of_shard = (
            self._next == len(self._order) or self._order[self._next][0] != shard
        )
        if last_of_shard:
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        """Checks every planned tensor was written and writes the index of a sharded directory."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._next != len(self._order):
            missing = [spec[0] for _, spec in self._order[self._next :]]
            raise CheckpointError(f"{self.path}: tensors never written: {missing[:5]}")
        if len(self._files) > 1:
            total = sum(_nbytes(s, d) for shard in self._shards for _, s, d in shard)
            weight_map = {
                name: os.path.basename(file)
                for file, shard in zip(self._files, self._shards, strict=True)
                for name, _, _ in shard
            }
            with open(os.path.join(self.path, INDEX_NAME), "w") as f:
                json.dump(
                    {"metadata": {"total_size": total}, "weight_map": weight_map},
                    f,
                    indent=2,
                )
                f.write("\n")

    def abort(self) -> None:
        """Closes an open file after a failure (the caller removes the output)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


WRITE_BLOCK_BYTES = 1 << 24
"""The most bytes of a non-contiguous array copied at once when written."""


def _write_array(handle: IO[bytes], array: np.ndarray) -> None:
    """Writes ``array``'s bytes in C order. A non-contiguous one (a transposed
    view, as a layout writes a kernel in the other orientation) goes in
    blocks of rows of at most :data:`WRITE_BLOCK_BYTES`, so no copy of the
    whole tensor is made."""
    if array.flags.c_contiguous:
        handle.write(array.reshape(-1).view(np.uint8).data)
        return
    rows = max(1, WRITE_BLOCK_BYTES // max(1, array[:1].nbytes))
    for i in range(0, array.shape[0], rows):
        block = np.ascontiguousarray(array[i : i + rows])
        handle.write(block.reshape(-1).view(np.uint8).data)
        del block  # before the next is made: one block at a time


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
    *,
    max_shard_size: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Writes named arrays (all in memory) with :class:`SafetensorsWriter`; returns the files."""
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    writer = SafetensorsWriter(
        path,
        [(n, tuple(np.shape(a)), np.asarray(a).dtype) for n, a in items],
        max_shard_size=max_shard_size,
        metadata=metadata,
    )
    try:
        for name, array in items:
            writer.write(name, array)
        writer.close()
    finally:
        writer.abort()
    return writer.files
