"""TIES and DARE: sparsify each task vector, then combine (optionally by sign election).

As in mergekit, a method here is data: a *sparsification* of each task vector
(keep the top-k by magnitude, or drop at random and rescale) and a
*combination* (a weighted sum, or TIES's sign election with a disjoint mean).
``ties`` is magnitude trimming with sign election; ``dare`` is random dropping
with a weighted sum, or with sign election (DARE-TIES).

Sign election and disjoint mean, for trimmed task vectors τ̂_m and weights w_m:

.. math::

   s = \\operatorname{sign}\\Big(\\sum_m w_m \\hat\\tau_m\\Big), \\qquad
   \\tau = \\frac{\\sum_m w_m \\hat\\tau_m [\\operatorname{sign}\\hat\\tau_m = s]}
               {\\sum_m w_m [\\operatorname{sign}\\hat\\tau_m = s]}, \\qquad
   \\theta = \\theta_0 + \\lambda \\tau

entrywise, with τ = 0 where no task agrees with s.

Examples:
  >>> import jax.numpy as jnp
  >>> from mats_jax import ties
  >>> base = {"w": jnp.zeros(3)}
  >>> models = [{"w": jnp.array([3.0, -1.0, 0.5])}, {"w": jnp.array([1.0, 2.0, -4.0])}]
  >>> ties(base, models, density=2 / 3)["w"]
  Array([ 3.,  2., -4.], dtype=float32)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mats_jax import checks
from mats_jax.sharding import input_mesh, keep_shardings, leaf_shardings
from mats_jax.tree import compute_dtype, task_vectors
from mats_jax.tree import total as sum_of
from mats_jax.typing import Array, Params

__all__ = ["dare", "magnitude_threshold", "ties"]

Trim = Literal["global", "per_leaf"]


def magnitude_threshold(
    arrays: Sequence[Array], k: Any, *, mesh: Mesh | None = None
) -> Array:
    """The k-th largest magnitude over several arrays, without concatenating them.

    A radix select on the float32 bit patterns of ``|x|`` (which order like the
    magnitudes themselves): four passes of 256-bin histograms, each summed over
    the arrays. Memory stays at one array's size whatever the number of
    arrays, so TIES can trim over a whole model. Exact: the result is one of
    the magnitudes.

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
    bits = [
        jax.lax.bitcast_convert_type(jnp.abs(a.astype(jnp.float32)).ravel(), jnp.uint32)
        for a in arrays
    ]
    count: Callable[[Array, Array, int], Array] = _digit_histogram
    if mesh is not None and mesh.size > 1:
        bits = [_spread(u, mesh) for u in bits]
        count = _sharded_digit_histogram(mesh)
    remaining = jnp.asarray(k, jnp.int32)
    prefix = jnp.zeros((), jnp.uint32)
    for shift in (24, 16, 8, 0):
        hist = sum_of(count(u, prefix, shift) for u in bits)
        at_least = jnp.cumsum(hist[::-1])[::-1]  # at_least[d]: entries with digit >= d
        digit = jnp.max(jnp.where(at_least >= remaining, jnp.arange(256), -1))
        above = at_least[digit] - hist[digit]
        remaining = remaining - above
        prefix = prefix | (digit.astype(jnp.uint32) << shift)
    return jax.lax.bitcast_convert_type(prefix, jnp.float32)


_PADDING = np.uint32(0xFFFFFFFF)  # a NaN bit pattern: no finite magnitude has it


def _digit_histogram(
    u: Array, prefix: Array, shift: int, padded: bool = False
) -> Array:
    """Counts of the byte at ``shift`` among the entries whose higher bytes match ``prefix``."""
    digit = ((u >> shift) & 0xFF).astype(jnp.int32)
    if shift == 24:
        in_bucket = u != _PADDING if padded else jnp.ones(u.shape, jnp.bool_)
    else:
        in_bucket = (u >> (shift + 8)) == (prefix >> (shift + 8))
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


def _keep_count(density: Any, size: int) -> Array:
    k = jnp.ceil(jnp.asarray(density, jnp.float32) * size).astype(jnp.int32)
    return jnp.clip(k, 1, size)


def _trim(
    vectors: list[Array], density: Any, trim: Trim, mesh: Mesh | None = None
) -> list[Array]:
    """Keeps the entries of one task's vectors whose magnitude is in the top-k."""
    if trim == "global":
        size = sum(v.size for v in vectors)
        if size >= 2**31:
            raise checks.MergeInputError(
                f"trim='global' over {size} entries exceeds the in-memory limit of 2^31; "
                "use trim='per_leaf'"
            )
        thresholds = [
            magnitude_threshold(vectors, _keep_count(density, size), mesh=mesh)
        ] * len(vectors)
    else:
        thresholds = [
            magnitude_threshold([v], _keep_count(density, v.size), mesh=mesh)
            for v in vectors
        ]
    return [
        jnp.where(jnp.abs(v.astype(jnp.float32)) >= t, v, 0)
        for v, t in zip(vectors, thresholds, strict=True)
    ]


def _combine(vectors: list[Array], weights: Array, sign_election: bool) -> Array:
    """Weighted sum, or TIES's sign election with a weighted disjoint mean."""
    dtype = vectors[0].dtype
    ws = [weights[m].astype(dtype) for m in range(len(vectors))]
    total = sum_of(w * v for w, v in zip(ws, vectors, strict=True))
    if not sign_election:
        return total
    sign = jnp.sign(total)
    agree = [(jnp.sign(v) == sign) & (v != 0) for v in vectors]
    numerator = sum_of(
        jnp.where(a, w * v, 0) for a, w, v in zip(agree, ws, vectors, strict=True)
    )
    denominator = sum_of(jnp.where(a, w, 0) for a, w in zip(agree, ws, strict=True))
    return jnp.where(
        denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1), 0
    )


def _apply(base: Params, merged_vector: list[Array], scale: Any) -> Params:
    base_leaves, treedef = jax.tree.flatten(base)
    out = []
    for b, t in zip(base_leaves, merged_vector, strict=True):
        dtype = compute_dtype(b.dtype)
        out.append((b.astype(dtype) + jnp.asarray(scale, dtype) * t).astype(b.dtype))
    return jax.tree.unflatten(treedef, out)


def ties(
    base: Params,
    models: Sequence[Params],
    *,
    density: Any,
    scale: Any = 1.0,
    weights: Any = None,
    trim: Trim = "global",
) -> Params:
    """TIES merging (Yadav et al., 2023): trim, elect sign, disjoint mean.

    Each task vector keeps its top-k entries by magnitude (``k = ⌈density · N⌉``;
    entries tied with the k-th magnitude are all kept), a sign is elected per
    entry from the weighted sum of the trimmed vectors, and the entries that
    agree with it are averaged (weighted by w_m); see the module docstring.

    Args:
      base: pretrained parameters θ₀.
      models: fine-tuned parameters θ_m.
      density: the fraction k of each task vector kept, in (0, 1] (traced).
      scale: λ applied to the merged task vector (traced).
      weights: per-model weights (default 1).
      trim: ``"global"`` (the default, as in the TIES paper: the top-k of each
        task vector over the whole model, found by :func:`magnitude_threshold`
        without concatenating the model) or ``"per_leaf"`` (top-k within each
        leaf, as mergekit does).

    Returns:
      The merged parameters.

    Examples:
      >>> import jax.numpy as jnp
      >>> base = {"w": jnp.zeros(2)}
      >>> ties(base, [{"w": jnp.array([1.0, -2.0])}], density=0.5)["w"]
      Array([ 0., -2.], dtype=float32)
    """
    mesh = input_mesh(base, models)  # one mesh, or a clear error
    checks.check_models(models, base)
    checks.check_fraction("density", density, include_zero=False, include_one=True)
    if trim not in ("global", "per_leaf"):
        raise checks.MergeInputError(
            f"trim must be 'global' or 'per_leaf', got {trim!r}"
        )
    w = checks.check_weights(weights, len(models))
    return _ties(
        base,
        list(models),
        density,
        scale,
        w,
        trim=trim,
        mesh=mesh,
        out_shardings=None if mesh is None else leaf_shardings(base),
    )


@functools.partial(jax.jit, static_argnames=("trim", "mesh", "out_shardings"))
def _ties(
    base: Params,
    models: list[Params],
    density: Any,
    scale: Any,
    weights: Array,
    *,
    trim: Trim,
    mesh: Mesh | None = None,
    out_shardings: tuple[NamedSharding | None, ...] | None = None,
) -> Params:
    trimmed = [
        _trim(jax.tree.leaves(t), density, trim, mesh)
        for t in task_vectors(base, models)
    ]
    merged = [
        _combine(list(leaves), weights, True) for leaves in zip(*trimmed, strict=True)
    ]
    # The threshold's split of every vector over the mesh must not leak into
    # the merged leaves' layout.
    merged = keep_shardings(merged, out_shardings)
    return _apply(base, merged, scale)


def dare(
    base: Params,
    models: Sequence[Params],
    *,
    drop_rate: Any,
    key: Array,
    scale: Any = 1.0,
    weights: Any = None,
    sign_election: bool = False,
) -> Params:
    """DARE (Yu et al., 2024): drop task-vector entries at random, rescale the rest.

    .. math:: \\hat\\tau_m = \\frac{\\tau_m \\odot b_m}{1 - p}, \\quad b_m \\sim \\mathrm{Bernoulli}(1 - p)

    then ``θ₀ + λ Σ_m w_m τ̂_m``, or, with ``sign_election=True`` (DARE-TIES),
    TIES's sign election and disjoint mean over the τ̂_m.

    Args:
      base: pretrained parameters θ₀.
      models: fine-tuned parameters θ_m.
      drop_rate: p, the probability of dropping an entry, in [0, 1): p = 1
        would drop everything and divide by zero (traced).
      key: a JAX PRNG key; the masks depend only on it, the leaf's position and
        the model's index.
      scale: λ (traced).
      weights: per-model weights (default 1).
      sign_election: combine by sign election and disjoint mean (DARE-TIES).

    Returns:
      The merged parameters.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> base = {"w": jnp.zeros(4)}
      >>> out = dare(base, [{"w": jnp.ones(4)}], drop_rate=0.5, key=jax.random.key(0))
      >>> sorted(set(out["w"].tolist())) in ([0.0, 2.0], [2.0], [0.0])
      True
    """
    input_mesh(base, models)  # one mesh, or a clear error
    checks.check_models(models, base)
    checks.check_fraction("drop_rate", drop_rate, include_zero=True, include_one=False)
    _check_key(key)
    w = checks.check_weights(weights, len(models))
    return _dare(
        base, list(models), drop_rate, key, scale, w, sign_election=sign_election
    )


def _check_key(key: Any) -> None:
    is_typed = hasattr(key, "dtype") and jax.dtypes.issubdtype(
        key.dtype, jax.dtypes.prng_key
    )
    is_raw = (
        hasattr(key, "dtype") and key.dtype == jnp.uint32 and tuple(key.shape) == (2,)
    )
    if not (is_typed and key.shape == ()) and not is_raw:
        raise checks.MergeInputError(
            "key must be a single JAX PRNG key (jax.random.key(seed) or "
            f"jax.random.PRNGKey(seed)), got {getattr(key, 'dtype', type(key).__name__)} "
            f"with shape {getattr(key, 'shape', None)}"
        )


@functools.partial(jax.jit, static_argnames=("sign_election",))
def _dare(
    base: Params,
    models: list[Params],
    drop_rate: Any,
    key: Array,
    scale: Any,
    weights: Array,
    *,
    sign_election: bool,
) -> Params:
    vectors = [jax.tree.leaves(t) for t in task_vectors(base, models)]
    keep = 1.0 - jnp.asarray(drop_rate, jnp.float32)
    merged = []
    for i, leaves in enumerate(zip(*vectors, strict=True)):
        leaf_key = jax.random.fold_in(key, i)
        dropped = []
        for m, v in enumerate(leaves):
            mask = jax.random.bernoulli(jax.random.fold_in(leaf_key, m), keep, v.shape)
            dropped.append(jnp.where(mask, v / keep.astype(v.dtype), 0))
        merged.append(_combine(dropped, weights, sign_election))
    return _apply(base, merged, scale)
