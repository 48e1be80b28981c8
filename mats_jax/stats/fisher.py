"""The diagonal Fisher from per-example gradients, in bounded memory.

.. math::

   F = \\frac{1}{N} \\sum_{i=1}^{N} \\sum_k \\big(\\nabla_\\theta \\langle u_{ik}, z_i(\\theta)\\rangle\\big)^2

with z_i the logits of example i and u_{ik} the cotangents of the chosen Fisher
kind (:mod:`mats_jax.stats.likelihood`): ``∇ log p(y_i)`` for the empirical
kind, sampled labels for the sampled kind, and every class weighted by its
probability for the exact kind. For a sequence model the score of an example is
the gradient of the summed log-likelihood of its (unmasked) target tokens.

Per-example gradients come from ``jax.vmap`` over the examples of a
micro-batch of ``jax.vjp``: memory is one micro-batch of gradients, whatever
the size of the data.

Normalisation (the same for every statistic of this package): per example,
i.e. divided by the number of (unmasked) examples N, so that tasks with more
data do not weigh more; weight tasks explicitly with the merge's ``weights``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mats_jax.stats.accumulate import accumulate
from mats_jax.stats.likelihood import (
    FisherKind,
    StatisticsInputError,
    check_kind,
    check_logits,
    logit_cotangents,
)
from mats_jax.stats.statistic import Diagonal
from mats_jax.tree import leaf_paths
from mats_jax.typing import Array, Params, StatTree

__all__ = ["diagonal_fisher"]

LogitsFn = Callable[[Params, Any], Array]


def per_example_squared_scores(
    logits_fn: LogitsFn,
    params: Params,
    selected: list[bool],
    micro: Mapping[str, Any],
    key: Array,
    kind: FisherKind,
    num_samples: int,
) -> list[Array | None]:
    """Σ over a micro-batch's examples of their squared scores, for the selected leaves."""
    leaves, treedef = jax.tree.flatten(params)
    chosen = [leaf for leaf, s in zip(leaves, selected, strict=True) if s]
    inputs, mask = micro["inputs"], micro["mask"]
    size = mask.shape[0]
    labels = micro.get("labels")
    labels = labels if labels is not None else jnp.zeros(mask.shape, jnp.int32)
    logits_shape = jax.eval_shape(lambda: logits_fn(params, inputs))
    check_logits(logits_shape, size, tuple(labels.shape), kind)

    def with_chosen(values: list[Array]) -> Params:
        it = iter(values)
        return jax.tree.unflatten(
            treedef,
            [next(it) if s else leaf for leaf, s in zip(leaves, selected, strict=True)],
        )

    def one_example(x: Any, label: Array, m: Array, k: Array) -> list[Array]:
        def logits_of(values: list[Array]) -> Array:
            return logits_fn(with_chosen(values), jax.tree.map(lambda a: a[None], x))

        logits, pullback = jax.vjp(logits_of, chosen)
        u = logit_cotangents(logits, label[None], m[None], kind, k, num_samples)
        grads = jax.vmap(pullback)(u.astype(logits.dtype))[0]
        return [jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0) for g in grads]

    keys = jax.random.split(key, size)
    squares = jax.vmap(one_example)(inputs, labels, mask, keys)
    sums = iter([jnp.sum(s, axis=0) for s in squares])
    return [next(sums) if s else None for s in selected]


def diagonal_fisher(
    logits_fn: LogitsFn,
    params: Params,
    batches: Iterable[Mapping[str, Any]],
    *,
    kind: FisherKind = "exact",
    num_samples: int = 1,
    key: Array | None = None,
    micro_batch_size: int = 32,
    mesh: Mesh | None = None,
    leaves: Any = None,
    progress: bool = True,
) -> StatTree:
    """The diagonal Fisher of a categorical model over a data iterator.

    Args:
      logits_fn: ``logits_fn(params, inputs) -> logits`` of shape (batch,
        classes) or (batch, positions, classes): e.g. ``model.apply`` for a
        flax.linen module, or a function of ``nnx.split``'s state.
      params: the parameter pytree (the first argument of ``logits_fn``).
      batches: an iterable of ``{"inputs", "labels", "mask"}`` batches (see
        :mod:`mats_jax.stats.likelihood`); iterated once.
      kind: ``"exact"`` (default; one prediction per example), ``"sampled"``
        or ``"empirical"``.
      num_samples: labels drawn per example for ``kind="sampled"``.
      key: PRNG key for sampling (required for ``kind="sampled"``).
      micro_batch_size: examples per vmapped step; memory grows with it (times
        the number of classes for the exact kind).
      mesh: a device mesh to shard each micro-batch's examples over (data
        parallel); the result equals the single-device one.
      leaves: optional boolean pytree (e.g. from :func:`mats_jax.tree.select`)
        choosing the leaves to compute; the others get None.
      progress: show a progress bar.

    Returns:
      A pytree with ``params``' structure holding a :class:`~mats_jax.Diagonal`
      (float32) per selected leaf.

    Raises:
      StatisticsInputError: on bad batches, an empty iterator, logits of the
        wrong shape, or NaN/Inf in the gradients.
    """
    check_kind(kind, num_samples)
    if kind == "sampled" and key is None:
        raise StatisticsInputError(
            "kind='sampled' needs a PRNG key: key=jax.random.key(seed)"
        )
    selected = _selection(params, leaves)
    paths = jax.tree.leaves(leaf_paths(params))
    init = {
        p: jnp.zeros(jnp.shape(x), jnp.float32)
        for p, x, s in zip(paths, jax.tree.leaves(params), selected, strict=True)
        if s
    }

    @jax.jit
    def step(
        acc: dict[str, Array], micro: Mapping[str, Any], k: Array
    ) -> dict[str, Array]:
        sums = per_example_squared_scores(
            logits_fn, params, selected, micro, k, kind, num_samples
        )
        return {
            p: acc[p] + s for p, s in zip(paths, sums, strict=True) if s is not None
        }

    acc, n = accumulate(
        step,
        init,
        batches,
        key=key if key is not None else jax.random.key(0),
        micro_batch_size=micro_batch_size,
        needs_labels=kind == "empirical",
        mesh=mesh,
        progress=progress,
        description=f"diagonal Fisher ({kind})",
    )
    flat = [
        Diagonal(acc[p] / n) if s else None
        for p, s in zip(paths, selected, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(params), flat)


def _selection(params: Params, leaves: Any) -> list[bool]:
    n = len(jax.tree.leaves(params))
    if leaves is None:
        return [True] * n
    try:
        treedef: Any = jax.tree.structure(params)  # its stubs lack flatten_up_to
        flat = treedef.flatten_up_to(leaves)
    except (ValueError, TypeError) as error:
        raise StatisticsInputError(
            f"leaves must be a boolean pytree with the parameters' structure: {error}"
        ) from None
    return [bool(x) for x in flat]
