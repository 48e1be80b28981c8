"""The k-th largest magnitude of many arrays, exactly, without concatenating them.

TIES keeps the top-k entries of each task vector by magnitude, over the whole
model by default. Both merge engines find that threshold with one algorithm,
:func:`radix_select`: a radix select on the float32 bit patterns of ``|x|``
(which order like the magnitudes themselves), one digit per pass, each pass a
histogram of that digit among the entries whose higher digits match the
prefix found so far. Only the histograms differ by engine:

- in memory (:func:`magnitude_threshold`, JAX, inside the jitted merge): four
  passes of 8-bit digits over arrays already on the device, summed across
  devices on a mesh (one ``psum`` of 256 counts per pass);
- streaming (:func:`streaming_magnitude_thresholds`, numpy): two passes of
  16-bit digits, each reading every array once from disk, so the whole model
  is read twice rather than four times; or, given a sample of the entries
  (the streaming engine reads about 3% of each leaf), one pass that counts
  the entries above the sample's bracket of the threshold and keeps those
  in it, and an exact selection among those kept. A bracket that misses
  (an unrepresentative sample) falls back to the radix select.

The result is exact (one of the magnitudes) and the same in both: a streamed
TIES trims a model on disk exactly as :func:`~mats_jax.ties` trims it in
memory. :func:`keep_count` gives both the same k.

Examples:
  >>> import numpy as np
  >>> arrays = [np.array([1.0, -5.0]), np.array([3.0, -2.0])]
  >>> float(magnitude_threshold(arrays, 2)), streaming_magnitude_threshold(lambda: arrays, 2)
  (3.0, 3.0)
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mats_jax.tree import model_value
from mats_jax.tree import total as sum_of
from mats_jax.typing import Array

__all__ = [
    "MagnitudeQuantiles",
    "keep_count",
    "keep_counts",
    "magnitude_threshold",
    "radix_select",
    "streaming_magnitude_threshold",
    "streaming_magnitude_thresholds",
]


class MagnitudeQuantiles(NamedTuple):
    """A whole-model pass: for each model m, the k-th largest ``|τ_m|``, k = ⌈density · N⌉.

    Attributes:
      density: the fraction of entries kept (may be traced in memory).
      per_leaf: N counts one leaf's entries (a threshold per leaf), or, when
        False, the entries of every leaf sharing this pass (one threshold for
        the whole model).
    """

    density: Any
    per_leaf: bool


def keep_count(density: Any, size: int, xp: Any = np) -> Any:
    """TIES's k = ⌈density · N⌉ clipped to [1, N], from a float32 product in both
    engines, so they keep the same entries.

    With ``xp=numpy`` (streaming) a Python int, exact beyond 2^31 entries;
    with ``xp=jax.numpy`` (in memory; density may be traced) an int32 array.

    Examples:
      >>> keep_count(0.2, 10), keep_count(1e-9, 10), keep_count(0.5, 3 * 2**31)
      (2, 1, 3221225472)
      >>> keep_count(0.2, 10, jnp)
      Array(2, dtype=int32)
    """
    k = xp.ceil(xp.float32(density) * xp.float32(size))
    if xp is np:
        return min(max(int(k), 1), size)
    return jnp.clip(k.astype(jnp.int32), 1, size)


def keep_counts(density: Any, size: int, num_models: int, xp: Any = np) -> Any:
    """Each model's :func:`keep_count`: ``density`` is one fraction for all
    models or one per model (a per-model parameter, as mergekit's per-model
    ``density``). A list of ints with numpy, an (M,) int32 array with jax.numpy.

    Examples:
      >>> keep_counts(0.2, 10, 2), keep_counts((0.2, 0.5), 10, 2)
      ([2, 2], [2, 5])
    """
    counts = [keep_count(model_value(density, m), size, xp) for m in range(num_models)]
    return counts if xp is np else jnp.stack(counts)


Histogram = Callable[[Any, int], Any]
"""``count(prefixes, shift) -> (S, 2**bits)``: per stream s, the histogram of the
digit at ``shift`` among the entries whose higher digits equal ``prefixes[s]``'s."""


def radix_select(count: Histogram, ks: Any, *, bits: int, xp: Any) -> Any:
    """Per stream, the k-th largest of the uint32 bit patterns ``count`` sees.

    Digits of ``bits`` bits from the highest: each pass picks the digit whose
    bucket holds the k-th largest entry (counting from the top) and narrows to
    it. ``xp`` is numpy or jax.numpy (traced inside a jit).

    Args:
      count: the histogram of one pass (see :data:`Histogram`).
      ks: (S,) ranks, 1 ≤ k ≤ the stream's number of entries.
      bits: digit width; 32 must be a multiple of it.
      xp: the array module.

    Returns:
      (S,) float32: the magnitudes whose bit patterns were selected.
    """
    bins = 1 << bits
    remaining = xp.asarray(ks, xp.int64 if xp is np else jnp.int32)
    prefix = xp.zeros(remaining.shape, xp.uint32)
    for shift in range(32 - bits, -1, -bits):
        hist = count(prefix, shift)
        at_least = xp.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # entries with digit >= d
        digit = xp.max(
            xp.where(at_least >= remaining[:, None], xp.arange(bins), -1), axis=1
        )
        above = xp.take_along_axis(at_least - hist, digit[:, None], axis=1)[:, 0]
        remaining = remaining - above
        prefix = prefix | (digit.astype(xp.uint32) << xp.uint32(shift))
    if xp is np:
        return prefix.view(np.float32)
    return jax.lax.bitcast_convert_type(prefix, jnp.float32)


def _float_bits(x: Any, xp: Any) -> Any:
    if xp is np:  # no copy of a float32 chunk before its magnitude
        return (
            np.abs(np.asarray(x).astype(np.float32, copy=False)).ravel().view(np.uint32)
        )
    magnitude = jnp.abs(jnp.asarray(x).astype(jnp.float32)).ravel()
    return jax.lax.bitcast_convert_type(magnitude, jnp.uint32)


def _in_bucket(u: Any, prefix: Any, shift: int, bits: int) -> Any:
    """Entries whose digits above ``shift`` match ``prefix``'s (all on the first pass)."""
    high = shift + bits
    if high >= 32:
        return None
    return (u >> high) == (prefix >> high)


# ---------------------------------------------------------------------------
# In memory (JAX)

_PADDING = np.uint32(0xFFFFFFFF)  # a NaN bit pattern: no finite magnitude has it
_JAX_BITS = 8


def _digit_histogram(
    u: Array, prefix: Array, shift: int, padded: bool = False
) -> Array:
    """Counts of the 8-bit digit at ``shift`` among the entries in ``prefix``'s bucket."""
    digit = ((u >> shift) & 0xFF).astype(jnp.int32)
    in_bucket = _in_bucket(u, prefix, shift, _JAX_BITS)
    if in_bucket is None:
        in_bucket = u != _PADDING if padded else jnp.ones(u.shape, jnp.bool_)
    return jnp.zeros((256,), jnp.int32).at[digit].add(in_bucket.astype(jnp.int32))


def _spread(u: Array, mesh: Mesh) -> Array:
    """A flat array padded to a multiple of the device count and split over all devices.

    The padding is a NaN bit pattern that no pass counts (finite magnitudes
    never have it, so it matches no prefix after the first pass either).
    """
    n = mesh.size
    padded = jnp.pad(u, (0, -u.size % n), constant_values=_PADDING)
    return jax.lax.with_sharding_constraint(
        padded, NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
    )


def _sharded_digit_histogram(mesh: Mesh) -> Callable[[Array, Array, int], Array]:
    axes = tuple(mesh.axis_names)

    def count(u: Array, prefix: Array, shift: int) -> Array:
        # XLA's partitioner gathers a scattered-into histogram's whole operand;
        # counting per device and summing keeps every array split.
        local = functools.partial(_digit_histogram, shift=shift, padded=True)
        return jax.shard_map(
            lambda v, p: jax.lax.psum(local(v, p), axes),
            mesh=mesh,
            in_specs=(PartitionSpec(axes), PartitionSpec()),
            out_specs=PartitionSpec(),
        )(u, prefix)

    return count


def magnitude_thresholds(
    streams: Sequence[Sequence[Array]], ks: Array, *, mesh: Mesh | None = None
) -> Array:
    """Per stream (a list of arrays, e.g. one model's task vectors), the k-th
    largest magnitude over its arrays: :func:`radix_select` in JAX; (S,) float32."""
    bits = [[_float_bits(a, jnp) for a in arrays] for arrays in streams]
    one: Callable[[Array, Array, int], Array] = _digit_histogram
    if mesh is not None and mesh.size > 1:
        bits = [[_spread(u, mesh) for u in stream] for stream in bits]
        one = _sharded_digit_histogram(mesh)

    def count(prefixes: Array, shift: int) -> Array:
        return jnp.stack(
            [
                sum_of(one(u, prefixes[s], shift) for u in stream)
                for s, stream in enumerate(bits)
            ]
        )

    return radix_select(count, ks, bits=_JAX_BITS, xp=jnp)


def magnitude_threshold(
    arrays: Sequence[Array], k: Any, *, mesh: Mesh | None = None
) -> Array:
    """The k-th largest magnitude over several arrays, without concatenating them.

    The in-memory radix select (see the module docstring): four passes of
    256-bin histograms, each summed over the arrays. Memory stays at one
    array's size whatever the number of arrays, so TIES can trim over a whole
    model. Exact: the result is one of the magnitudes.

    With a ``mesh``, each array is split evenly over all its devices and every
    device counts its own entries; the histograms are summed across devices
    (one ``psum`` of 256 counts per pass), so no device ever holds a whole
    array.

    Args:
      arrays: arrays of any shapes, all finite; magnitudes are taken in float32.
      k: 1 ≤ k ≤ total number of entries (may be traced).
      mesh: the device mesh the arrays are sharded on, or None.

    Returns:
      A float32 scalar t such that at least k entries have ``|x| ≥ t`` and
      fewer than k have ``|x| > t``.

    Examples:
      >>> import jax.numpy as jnp
      >>> magnitude_threshold([jnp.array([1.0, -5.0]), jnp.array([[3.0], [-2.0]])], 2)
      Array(3., dtype=float32)
    """
    return magnitude_thresholds([list(arrays)], jnp.asarray(k)[None], mesh=mesh)[0]


# ---------------------------------------------------------------------------
# Streaming (numpy)

_NUMPY_BITS = 16


_SIGN = np.uint16(0x8000)
_LITTLE = sys.byteorder == "little"


def _half_histogram(a: Any, prefix: np.uint32, shift: int) -> np.ndarray:
    """The 65536-bin histogram of ``|a|``'s bit-pattern half at ``shift``
    (16: the high half, over every entry; 0: the low half, over the entries
    whose high half is ``prefix``'s).

    A float32 array's halves are read in place as uint16 (its sign is the
    high half's top bit, folded away), so no magnitude, shift or mask of the
    whole array is formed: on the IO benchmark the first pass took half the
    time of one through ``|a|``'s uint32 bits.
    """
    a = np.asarray(a)
    if a.dtype != np.float32 or not _LITTLE or not a.flags.c_contiguous:
        u = _float_bits(a, np)
        in_bucket = _in_bucket(u, prefix, shift, _NUMPY_BITS)
        if in_bucket is not None:
            u = u[in_bucket]  # select first: the bucket is a small part
        return np.bincount(
            (u >> np.uint32(shift)) & np.uint32(0xFFFF), minlength=1 << 16
        )
    halves = a.reshape(-1).view(np.uint16)
    high = halves[1::2]
    if shift == 16:
        raw = np.bincount(high, minlength=1 << 16)
        return np.concatenate(
            [raw[:0x8000] + raw[0x8000:], np.zeros(0x8000, raw.dtype)]
        )
    want = np.uint16(int(prefix) >> 16)
    in_bucket = (high | _SIGN) == (want | _SIGN)
    return np.bincount(halves[0::2][in_bucket], minlength=1 << 16)


BRACKET_SIGMAS = 6.0
"""How wide a sample's bracket of the threshold's bucket is: this many
binomial standard deviations of the sample's rank on each side."""

MAX_CANDIDATES = 1 << 25
"""The most entries (over every stream) a sampled pass keeps to select
among; beyond it the radix select runs instead."""


def _highest(reached: np.ndarray) -> int:
    """The highest bucket where ``reached`` holds (0 if none)."""
    return int(np.max(np.nonzero(reached)[0], initial=0))


def _brackets(
    hist: np.ndarray, ks: Sequence[int], sizes: Sequence[int]
) -> list[tuple[int, int]]:
    """Per stream, the buckets (high halves of ``|x|``) the k-th largest lies
    in with near certainty, judged from a sample's histogram of them: the
    ranks ``k / size ± BRACKET_SIGMAS`` binomial deviations of the sample,
    one bucket wider on each side."""
    out = []
    for h, k, size in zip(hist, ks, sizes, strict=True):
        n = int(h.sum())
        if n == 0:
            out.append((0, 0x7FFF))
            continue
        f = k / size
        spread = BRACKET_SIGMAS * (np.sqrt(f * (1 - f) / n) + 1 / n)
        at_least = np.cumsum(h[::-1])[::-1]  # sample entries in bucket >= d
        lo = _highest(at_least >= (f + spread) * n) if f + spread < 1 else 0
        hi = _highest(at_least >= (f - spread) * n) if f - spread > 0 else 0x7FFF
        out.append((max(0, lo - 1), min(0x7FFF, hi + 1)))
    return out


def streaming_magnitude_thresholds(
    chunks: Callable[[], Iterable[tuple[int, Any]]],
    ks: Sequence[int],
    *,
    sample: Callable[[], Iterable[tuple[int, Any]]] | None = None,
    sizes: Sequence[int] | None = None,
) -> list[float]:
    """For S streams of arrays, each stream's k_s-th largest magnitude, in two passes
    (one with a ``sample``).

    The streaming radix select (see the module docstring): the first pass
    histograms the high 16 bits of every array and finds the bucket holding
    the k-th largest; the second histograms the low 16 bits of the entries in
    that bucket. Memory: one array at a time and two 65536-bin histograms per
    stream. The result equals :func:`magnitude_threshold` on each stream's
    arrays (tested against it).

    With a ``sample`` (some of the same entries, as ``(stream, array)``
    pairs) and each stream's size, one pass does: the sample's histogram
    brackets each threshold's bucket; the pass counts the entries above the
    bracket and keeps those in it (at most :data:`MAX_CANDIDATES`), and the
    k-th largest is selected among those kept. No entry is histogrammed,
    which is most of a radix pass's time. Where a bracket misses (an
    unrepresentative sample) the radix select runs after it. The result is
    the same either way; only the time differs.

    Args:
      chunks: returns a fresh iterable (it is called once per pass) of
        ``(stream, array)`` pairs, in any order (for TIES: each leaf's task
        vector for each model, so one pass reads every leaf once per model).
      ks: per stream, 1 ≤ k ≤ its total number of entries.
      sample: returns an iterable of ``(stream, array)`` pairs of entries
        drawn from the same arrays (read once, before the pass).
      sizes: per stream its number of entries (with ``sample``).

    Returns:
      Per stream the threshold t: at least k entries have ``|x| ≥ t`` and
      fewer than k have ``|x| > t``.

    Raises:
      ValueError: a k outside [1, the stream's size], or ``sample`` without
        ``sizes``.

    Examples:
      >>> import numpy as np
      >>> pairs = [(0, np.array([1.0, -5.0])), (1, np.array([0.5])),
      ...          (0, np.array([3.0, -2.0])), (1, np.array([-4.0]))]
      >>> streaming_magnitude_thresholds(lambda: pairs, [2, 1])
      [3.0, 4.0]
      >>> streaming_magnitude_thresholds(
      ...     lambda: pairs, [2, 1], sample=lambda: pairs[:2], sizes=[4, 2])
      [3.0, 4.0]
    """
    n = len(ks)
    if sample is not None:
        if sizes is None or len(sizes) != n:
            raise ValueError("a sample needs each stream's size (sizes=)")
        drawn = np.zeros((n, 1 << _NUMPY_BITS), np.int64)
        for s, a in sample():
            drawn[s] += _half_histogram(a, np.uint32(0), 16)
        found = _select_in_brackets(chunks, ks, _brackets(drawn[:, :0x8000], ks, sizes))
        if found is not None:
            return found
    return _radix_thresholds(chunks, ks)


def _check_ks(ks: Sequence[int], totals: Sequence[int]) -> None:
    for k, total in zip(ks, totals, strict=True):
        if not 1 <= k <= total:
            raise ValueError(f"k must be in [1, {total}], got {k}")


def _select_in_brackets(
    chunks: Callable[[], Iterable[tuple[int, Any]]],
    ks: Sequence[int],
    brackets: list[tuple[int, int]],
) -> list[float] | None:
    """One pass: per stream, the entries above its bracket counted and those
    in it kept; the k-th largest selected among those kept. None where a
    bracket misses the k-th largest, or more than :data:`MAX_CANDIDATES`
    would be kept."""
    n = len(ks)
    totals, above = [0] * n, [0] * n
    kept: list[list[np.ndarray]] = [[] for _ in range(n)]
    held = 0
    for s, a in chunks():
        totals[s] += np.size(a)
        count, bits = _above_and_in(a, *brackets[s])
        above[s] += count
        held += bits.size
        if held > MAX_CANDIDATES:
            return None
        kept[s].append(bits)
    _check_ks(ks, totals)
    out = []
    for k, count, parts in zip(ks, above, kept, strict=True):
        bits = np.concatenate(parts) if parts else np.zeros(0, np.uint32)
        rank = k - count  # the k-th largest is the rank-th largest kept
        if not 1 <= rank <= bits.size:
            return None
        out.append(
            float(
                np.partition(bits, bits.size - rank)[bits.size - rank].view(np.float32)
            )
        )
    return out


def _above_and_in(a: Any, lo: int, hi: int) -> tuple[int, np.ndarray]:
    """How many of ``|a|``'s entries lie in buckets (high halves) above ``hi``,
    and the uint32 bit patterns of those in buckets ``lo`` … ``hi``."""
    a = np.asarray(a)
    if a.dtype != np.float32 or not _LITTLE or not a.flags.c_contiguous:
        u = _float_bits(a, np)
    else:
        u = a.reshape(-1).view(np.uint32)  # the sign is shifted out below
    # The magnitude's bits shifted up one: each comparison below is one
    # contiguous pass over uint32s.
    doubled = u << np.uint32(1)
    count = (
        int(np.count_nonzero(doubled >= np.uint32((hi + 1) << 17)))
        if hi < 0x7FFF
        else 0
    )
    doubled -= np.uint32(lo << 17)  # wraps below the bracket
    keep = doubled <= np.uint32(((hi - lo + 1) << 17) - 1)
    return count, u[keep] & np.uint32(0x7FFFFFFF)


def _radix_thresholds(
    chunks: Callable[[], Iterable[tuple[int, Any]]], ks: Sequence[int]
) -> list[float]:
    """The two-pass radix select of :func:`streaming_magnitude_thresholds`."""
    n = len(ks)
    bins = 1 << _NUMPY_BITS
    totals = [0] * n
    checked = False

    def count(prefixes: np.ndarray, shift: int) -> np.ndarray:
        nonlocal checked
        hist = np.zeros((n, bins), np.int64)
        for s, a in chunks():
            if not checked:
                totals[s] += np.size(a)
            hist[s] += _half_histogram(a, prefixes[s], shift)
        if not checked:
            checked = True
            _check_ks(ks, totals)
        return hist

    return [float(t) for t in radix_select(count, ks, bits=_NUMPY_BITS, xp=np)]


def streaming_magnitude_threshold(chunks: Callable[[], Iterable[Any]], k: int) -> float:
    """:func:`streaming_magnitude_thresholds` for one stream of arrays.

    Examples:
      >>> import numpy as np
      >>> streaming_magnitude_threshold(lambda: [np.array([1.0, -5.0]), np.array([3.0, -2.0])], 2)
      3.0
    """
    return streaming_magnitude_thresholds(lambda: ((0, a) for a in chunks()), [k])[0]
