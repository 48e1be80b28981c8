"""Gram (RegMean) and K-FAC statistics of every dense kernel, found from the model's jaxpr.

For a dense kernel W used as ``y = x W`` (:mod:`mats_jax.stats.capture` finds
every such product in the model function), with rows r running over the
examples' unmasked positions (tokens, patches; one row per example for a plain
classifier):

.. math::

   A = \\frac{1}{R} \\sum_r x_r x_r^\\top, \\qquad
   G = \\frac{1}{N} \\sum_r \\sum_k g_{rk} g_{rk}^\\top

where R is the number of rows, N the number of examples, and g_{rk} the
gradient at the product's output of ``⟨u_k, logits⟩`` for the Fisher kind's
cotangents u_k (:mod:`mats_jax.stats.likelihood`). Then ``A ⊗ G`` approximates
the per-example Fisher block of W (the K-FAC approximation, with rows treated
as independent), the same per-example normalisation as
:func:`~mats_jax.diagonal_fisher`. The Gram statistic of RegMean is ``A``.

A kernel applied several times (tied weights, a layer reused, the body of a
scan that does not slice it) accumulates over its uses, each use adding rows.
A kernel sliced by a scan over its leading axis (``nn.scan`` layers) gets one
statistic per layer. Both come out of one jitted forward and backward pass per
micro-batch: the gradients at every layer's output at once (one backward per
cotangent), never per-example parameter gradients.

Leaves that are not dense kernels (biases, norms, embeddings looked up by
index, convolutions, anything the capture does not recognise) get the
``fallback``: the diagonal Fisher (default for :func:`kfac`), or None (default
for :func:`gram`: RegMean merges them by the solver's fallback rule).
:func:`~mats_jax.stats.summary.statistics_table` shows which leaf got what.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mats_jax.stats.accumulate import accumulate
from mats_jax.stats.capture import Layers, Tap, find_layers, tapped
from mats_jax.stats.fisher import per_example_squared_scores
from mats_jax.stats.likelihood import (
    FisherKind,
    StatisticsInputError,
    check_batch,
    check_kind,
    check_logits,
    logit_cotangents,
)
from mats_jax.stats.statistic import KFAC, Diagonal, Gram, Statistic
from mats_jax.tree import leaf_paths
from mats_jax.typing import Array, Params, StatTree

__all__ = ["gram", "kfac"]

Fallback = Literal["diagonal"] | None


@dataclasses.dataclass(frozen=True)
class _Kernel:
    """One parameter leaf read as a dense kernel, and the taps that use it."""

    leaf: int
    taps: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    layer_shape: tuple[int, ...]
    n_in: int
    n_out: int


def _kernels(layers: Layers, leaves: list[Any]) -> tuple[list[_Kernel], set[int]]:
    """Groups taps by leaf; a leaf whose uses disagree on its layout is unrecognised."""
    by_leaf: dict[int, list[int]] = {}
    for i, tap in enumerate(layers.taps):
        by_leaf.setdefault(tap.leaf, []).append(i)
    kernels, rejected = [], set(layers.unrecognised)
    for leaf, tap_ids in by_leaf.items():
        if leaf in rejected:
            continue
        taps = [layers.taps[i] for i in tap_ids]
        first = taps[0]
        layouts = {
            (t.in_axes, t.out_axes, tuple(t.loop_shape[lv] for lv in t.layer_levels))
            for t in taps
        }
        if len(layouts) != 1:
            rejected.add(leaf)
            continue
        shape = np.shape(leaves[leaf])
        kernels.append(
            _Kernel(
                leaf=leaf,
                taps=tuple(tap_ids),
                in_axes=first.in_axes,
                out_axes=first.out_axes,
                layer_shape=tuple(shape[: len(first.layer_levels)]),
                n_in=int(np.prod([shape[a] for a in first.in_axes])),
                n_out=int(np.prod([shape[a] for a in first.out_axes])),
            )
        )
    return kernels, rejected


def _row_weights(tap: Tap, mask: Array) -> Array | None:
    """Weights of the tap's rows (per loop iteration) from the batch mask, or None.

    Rows whose leading axes are the mask's (batch[, positions]) take the mask;
    rows led by the batch axis alone take the per-example mask. Rows not led by
    the batch axis cannot be told apart from padding: None (unrecognised).
    """
    rows = tap.row_shape
    example_mask = mask.reshape(mask.shape[0], -1).max(axis=1)
    for m in (mask, example_mask):
        if rows[: m.ndim] == m.shape:
            w = m.reshape(m.shape + (1,) * (len(rows) - m.ndim))
            return jnp.broadcast_to(w, rows).reshape(-1)
    return None


def _reduce_loops(tap: Tap, x: Array) -> Array:
    """Sums a per-iteration array over the loops that do not slice the leaf."""
    summed = tuple(i for i in range(len(tap.loop_shape)) if i not in tap.layer_levels)
    out = jnp.sum(x, axis=summed) if summed else x
    return out


def _tap_sums(
    tap: Tap, x: Array, gs: Array | None, mask: Array
) -> tuple[Array, Array | None, Array]:
    """(Σ w x xᵀ, Σ g gᵀ, Σ w) for one tap, per layer."""
    weights = _row_weights(tap, mask)
    assert weights is not None
    rows_x = tap.rows_and_inputs(x).astype(jnp.float32)
    a = _reduce_loops(tap, jnp.einsum("...ri,r,...rj->...ij", rows_x, weights, rows_x))
    n_loops = int(
        np.prod(
            [
                tap.loop_shape[i]
                for i in range(len(tap.loop_shape))
                if i not in tap.layer_levels
            ]
        )
    )
    count = jnp.sum(weights) * n_loops
    g = None
    if gs is not None:
        rows_g = jax.vmap(tap.rows_and_outputs)(gs).astype(jnp.float32)
        g = _reduce_loops(tap, jnp.einsum("k...ro,k...rp->...op", rows_g, rows_g))
    return a, g, count


def _first_micro_batch(
    batches: Iterable[Mapping[str, Any]], size: int
) -> tuple[Any, Iterable[Mapping[str, Any]]]:
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise StatisticsInputError(
            "the data iterator yielded no batches: statistics need at least one example"
        ) from None
    batch_size = check_batch(first, 0, needs_labels=False)
    take = np.arange(size) % batch_size
    inputs = jax.tree.map(lambda x: np.asarray(x)[take], first["inputs"])
    return inputs, itertools.chain([first], iterator)


def _estimate(
    fn: Callable[[Params, Any], Any],
    params: Params,
    batches: Iterable[Mapping[str, Any]],
    *,
    with_g: bool,
    kind: FisherKind,
    num_samples: int,
    key: Array | None,
    micro_batch_size: int,
    mesh: Mesh | None,
    fallback: Fallback,
    progress: bool,
    name: str,
) -> StatTree:
    if fallback not in ("diagonal", None):
        raise StatisticsInputError(
            f"fallback must be 'diagonal' or None, got {fallback!r}"
        )
    if with_g or fallback == "diagonal":
        check_kind(kind, num_samples)
        if kind == "sampled" and key is None:
            raise StatisticsInputError(
                "kind='sampled' needs a PRNG key: key=jax.random.key(seed)"
            )
    size = int(micro_batch_size)
    if mesh is not None:
        devices = mesh.shape[mesh.axis_names[0]]
        size = -(-size // devices) * devices
    example_inputs, batches = _first_micro_batch(batches, size)
    leaves = jax.tree.leaves(params)
    paths = jax.tree.leaves(leaf_paths(params))
    layers = find_layers(fn, params, example_inputs)
    kernels, rejected = _kernels(layers, leaves)
    probe_mask = jnp.ones((size,))
    for k in list(kernels):
        if any(_row_weights(layers.taps[t], probe_mask) is None for t in k.taps):
            kernels.remove(k)
            rejected.add(k.leaf)
    if not kernels:
        raise StatisticsInputError(
            f"{name}: no dense layer (a product of an activation with a parameter) was found "
            f"in the model function; leaves: {', '.join(paths[:10])}"
        )
    kernel_leaves = {k.leaf for k in kernels}
    diagonal_leaves = [
        fallback == "diagonal" and i not in kernel_leaves for i in range(len(leaves))
    ]
    run = tapped(fn, layers)

    def zeros(shape: tuple[int, ...]) -> Array:
        return jnp.zeros(shape, jnp.float32)

    init: dict[str, Any] = {
        paths[k.leaf]: {
            "a": zeros((*k.layer_shape, k.n_in, k.n_in)),
            "rows": zeros(()),
            **({"g": zeros((*k.layer_shape, k.n_out, k.n_out))} if with_g else {}),
        }
        for k in kernels
    }
    for i, chosen in enumerate(diagonal_leaves):
        if chosen:
            init[paths[i]] = {"f": zeros(np.shape(leaves[i]))}

    @jax.jit
    def step(acc: dict[str, Any], micro: Mapping[str, Any], k: Array) -> dict[str, Any]:
        inputs, mask = micro["inputs"], micro["mask"]
        eps = [
            jnp.zeros(s, d)
            for s, d in zip(layers.eps_shapes, layers.eps_dtypes, strict=True)
        ]
        new = dict(acc)
        if with_g:
            labels = micro.get("labels")
            out, pullback, xs = jax.vjp(
                lambda e: run(params, e, inputs), eps, has_aux=True
            )
            check_logits(
                out,
                mask.shape[0],
                None if labels is None else tuple(labels.shape),
                kind,
            )
            u = logit_cotangents(out, labels, mask, kind, k, num_samples)
            gs = jax.vmap(pullback)(u.astype(out.dtype))[0]
        else:
            _, xs = run(params, eps, inputs)
            gs = None
        for kern in kernels:
            entry = dict(new[paths[kern.leaf]])
            for t in kern.taps:
                a, g, count = _tap_sums(
                    layers.taps[t], xs[t], None if gs is None else gs[t], mask
                )
                entry["a"] = entry["a"] + a
                entry["rows"] = entry["rows"] + count
                if g is not None:
                    entry["g"] = entry["g"] + g
            new[paths[kern.leaf]] = entry
        if any(diagonal_leaves):
            sums = per_example_squared_scores(
                fn,
                params,
                diagonal_leaves,
                micro,
                jax.random.fold_in(k, 1),
                kind,
                num_samples,
            )
            for i, s in enumerate(sums):
                if s is not None:
                    new[paths[i]] = {"f": acc[paths[i]]["f"] + s}
        return new

    acc, n = accumulate(
        step,
        init,
        batches,
        key=key if key is not None else jax.random.key(0),
        micro_batch_size=size,
        needs_labels=(with_g or fallback == "diagonal") and kind == "empirical",
        mesh=mesh,
        progress=progress,
        description=name if not with_g else f"{name} ({kind})",
    )
    out: list[Statistic | None] = [None] * len(leaves)
    for kern in kernels:
        entry = acc[paths[kern.leaf]]
        a = entry["a"] / jnp.maximum(entry["rows"], 1.0)
        if with_g:
            out[kern.leaf] = KFAC(a, entry["g"] / n, kern.in_axes, kern.out_axes)
        else:
            out[kern.leaf] = Gram(a, kern.in_axes, kern.out_axes)
    for i, chosen in enumerate(diagonal_leaves):
        if chosen:
            out[i] = Diagonal(acc[paths[i]]["f"] / n)
    return jax.tree.unflatten(jax.tree.structure(params), out)


def kfac(
    logits_fn: Callable[[Params, Any], Array],
    params: Params,
    batches: Iterable[Mapping[str, Any]],
    *,
    kind: FisherKind = "exact",
    num_samples: int = 1,
    key: Array | None = None,
    micro_batch_size: int = 32,
    mesh: Mesh | None = None,
    fallback: Fallback = "diagonal",
    progress: bool = True,
) -> StatTree:
    """K-FAC factors (A, G) of every dense kernel of a categorical model.

    Args:
      logits_fn: ``logits_fn(params, inputs) -> logits``, (batch, classes) or
        (batch, positions, classes); any JAX function: ``model.apply`` of a
        flax.linen module, a function of ``nnx.split``'s state, plain JAX.
      params: its parameter pytree.
      batches: an iterable of ``{"inputs", "labels", "mask"}`` batches.
      kind: the Fisher used for G (and the fallback diagonal): ``"exact"``
        (default; measured: one sampled label per example made G's scale
        vary by orders of magnitude across confident tasks), ``"sampled"`` or
        ``"empirical"``.
      num_samples: labels per example for ``kind="sampled"``.
      key: PRNG key for sampling.
      micro_batch_size: examples per jitted step.
      mesh: device mesh to shard the examples over (data parallel).
      fallback: ``"diagonal"`` (the diagonal Fisher) or None for leaves that
        are not dense kernels.
      progress: show a progress bar.

    Returns:
      A statistic pytree with ``params``' structure: a :class:`~mats_jax.KFAC`
      per dense kernel (one system per layer for scanned kernels), the fallback
      elsewhere. Pass one per task to :func:`~mats_jax.mats`.
    """
    return _estimate(
        logits_fn,
        params,
        batches,
        with_g=True,
        kind=kind,
        num_samples=num_samples,
        key=key,
        micro_batch_size=micro_batch_size,
        mesh=mesh,
        fallback=fallback,
        progress=progress,
        name="K-FAC",
    )


def gram(
    apply_fn: Callable[[Params, Any], Any],
    params: Params,
    batches: Iterable[Mapping[str, Any]],
    *,
    micro_batch_size: int = 32,
    mesh: Mesh | None = None,
    fallback: Fallback = None,
    kind: FisherKind = "exact",
    num_samples: int = 1,
    key: Array | None = None,
    progress: bool = True,
) -> StatTree:
    """RegMean's Gram matrix ``A = XᵀX / R`` of the inputs of every dense kernel.

    Args:
      apply_fn: ``apply_fn(params, inputs)``; its output is not used unless
        ``fallback="diagonal"`` (then it must return logits).
      params: its parameter pytree.
      batches: an iterable of ``{"inputs", "mask"}`` batches (labels unused).
      micro_batch_size: examples per jitted step.
      mesh: device mesh to shard the examples over (data parallel).
      fallback: None (default: leaves that are not dense kernels get no
        statistic, as RegMean averages them) or ``"diagonal"``.
      kind, num_samples, key: the Fisher kind for a diagonal fallback.
      progress: show a progress bar.

    Returns:
      A statistic pytree with a :class:`~mats_jax.Gram` per dense kernel.
    """
    return _estimate(
        apply_fn,
        params,
        batches,
        with_g=False,
        kind=kind,
        num_samples=num_samples,
        key=key,
        micro_batch_size=micro_batch_size,
        mesh=mesh,
        fallback=fallback,
        progress=progress,
        name="Gram",
    )
