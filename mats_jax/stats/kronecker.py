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

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jax.sharding import Mesh

from mats_jax.stats.estimate import Fallback, estimate
from mats_jax.stats.likelihood import FisherKind
from mats_jax.stats.statistic import KFAC, Gram
from mats_jax.typing import Array, Params, StatTree

__all__ = ["gram", "kfac"]


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

    Examples:
      The same classifier: A is the inputs' second moment, G the covariance of
      the categorical distribution, diag(p) − p pᵀ with p uniform over 3 classes.

      >>> import jax.numpy as jnp
      >>> from mats_jax import kfac
      >>> logits_fn = lambda params, x: x @ params["w"]
      >>> params = {"w": jnp.zeros((2, 3))}
      >>> batches = [{"inputs": jnp.eye(2), "labels": jnp.array([0, 2])}]
      >>> stat = kfac(logits_fn, params, batches, progress=False)["w"]
      >>> stat.a
      Array([[0.5, 0. ],
             [0. , 0.5]], dtype=float32)
      >>> (9 * stat.g).round(3)
      Array([[ 2., -1., -1.],
             [-1.,  2., -1.],
             [-1., -1.,  2.]], dtype=float32)
    """
    return estimate(
        logits_fn,
        params,
        batches,
        target=KFAC,
        kind=kind,
        num_samples=num_samples,
        key=key,
        micro_batch_size=micro_batch_size,
        mesh=mesh,
        fallback=fallback,
        progress=progress,
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

    Examples:
      >>> import jax.numpy as jnp
      >>> from mats_jax import gram
      >>> apply_fn = lambda params, x: x @ params["w"]
      >>> params = {"w": jnp.zeros((2, 3))}
      >>> batches = [{"inputs": jnp.array([[1.0, 0.0], [1.0, 2.0]])}]
      >>> gram(apply_fn, params, batches, progress=False)["w"].a
      Array([[1., 1.],
             [1., 2.]], dtype=float32)
    """
    return estimate(
        apply_fn,
        params,
        batches,
        target=Gram,
        kind=kind,
        num_samples=num_samples,
        key=key,
        micro_batch_size=micro_batch_size,
        mesh=mesh,
        fallback=fallback,
        progress=progress,
    )
