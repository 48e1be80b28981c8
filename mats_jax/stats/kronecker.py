"""Gram (RegMean) and K-FAC statistics of every dense kernel, found from the model's jaxpr.

For a dense kernel W used as ``y = x W`` (:mod:`mats_jax.stats.capture` finds
every such product in the model function), with rows r running over the
examples' unmasked positions (tokens, patches; one row per example for a plain
classifier):

.. math::

   A = \\frac{1}{R} \\sum_r w_r x_r x_r^\\top, \\qquad
   G = \\frac{1}{N} \\sum_r \\sum_k g_{rk} g_{rk}^\\top

where w_r is the row's mask weight, R = Σ_r w_r the number of real rows, N
the number of examples with any real position, and g_{rk} the gradient at the
product's output of ``⟨u_k, logits⟩`` for the Fisher kind's cotangents u_k
(:mod:`mats_jax.stats.likelihood`), which carry the mask of the predictions.
Then ``A ⊗ G`` approximates the per-example Fisher block of W (the K-FAC
approximation, with rows treated as independent), the same per-example
normalisation as :func:`~mats_jax.diagonal_fisher`. The Gram statistic of
RegMean is ``A``.

Which kernels. Any axes of a leaf can be its inputs and outputs: a kernel
kept in PyTorch's (out, in) orientation and used as ``x @ w.T`` gets
``in_axes=(1,), out_axes=(0,)``; an einsum over several axes (attention
projections, ``DenseGeneral``) gets them all. A product with batch dimensions
on the kernel (per-head projections, ``einsum("bthd,hde->bthe", x, w)``) is
block-diagonal: one A and G per head, the head axis a block axis of the
statistic. A kernel applied several times (tied weights, a layer reused, the
body of a scan that does not slice it) accumulates over its uses, each use
adding rows. A kernel sliced by a scan over its leading axis (``nn.scan``
layers) gets one statistic per layer. Both come out of one jitted forward and
backward pass per micro-batch: the gradients at every layer's output at once
(one backward per cotangent), never per-example parameter gradients.

The fallback. Leaves that are not dense kernels (biases, norms, embeddings
looked up by index, convolutions, anything the capture does not recognise)
get the ``fallback``: the diagonal Fisher (default for :func:`kfac`), or None
(default for :func:`gram`: RegMean merges them by the solver's fallback rule).
So do kernels that ``leaves`` does not choose, kernels whose A or G would
have more than ``max_factor_size`` rows (default
:data:`~mats_jax.stats.estimate.MAX_FACTOR_SIZE`, 8192: a vocabulary head's
30,522-row G is 3.7 GB per task), and a leaf used both by products and
otherwise: an embedding tied to the output head (looked up by a gather, and
``h @ emb.T``) falls back as a whole, since a kernel statistic of its head
use would leave out the lookups, which carry most of the gradient of its
rows; the diagonal Fisher from per-example gradients covers both uses.
Every leaf with a product that falls back is listed, with the reason, in a
:class:`~mats_jax.stats.likelihood.StatisticsFallbackWarning` before any
work; :func:`~mats_jax.stats.summary.statistics_table` shows which leaf got
what.

Batches. Inputs are any pytree with a leading batch axis; batches may differ
in their other sizes (text padded per batch to its own length): each shape is
planned and compiled once, and all add to the same statistics, which equal one
pass over the same examples padded to one length with the padding masked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jax.sharding import Mesh

from mats_jax.stats.estimate import MAX_FACTOR_SIZE, Fallback, estimate
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
    leaves: Any = None,
    max_factor_size: int | None = MAX_FACTOR_SIZE,
    progress: bool = True,
) -> StatTree:
    """K-FAC factors (A, G) of every dense kernel of a categorical model.

    .. math::

       A = \\frac{1}{R} \\sum_r w_r x_r x_r^\\top, \\qquad
       G = \\frac{1}{N} \\sum_r \\sum_k g_{rk} g_{rk}^\\top, \\qquad
       F_W \\approx A \\otimes G

    over the rows r of the kernel's inputs (real tokens: weight w_r from the
    mask) and the N real examples; see :mod:`mats_jax.stats.kronecker`.

    Every check is made on concrete values: estimators run eagerly over
    concrete batches and parameters (jitting their own steps) and cannot be
    called under ``jax.jit`` (:func:`~mats_jax.stats.estimate.estimate`).

    Args:
      logits_fn: ``logits_fn(params, inputs) -> logits``, floating point,
        (batch, classes) or (batch, positions, classes); any JAX function:
        ``model.apply`` of a flax.linen module, a function of ``nnx.split``'s
        state, plain JAX.
      params: its parameter pytree.
      batches: an iterable of ``{"inputs", "labels", "mask"}`` batches, each
        with a leading batch axis of at least one example. ``inputs``: any
        pytree (token ids, an attention mask, ...); batches may differ in
        their other sizes (lengths). ``labels``: class ids in [0, classes) of
        the logits' shape without classes (read by ``kind="empirical"``).
        ``mask``: optional, (batch,), or (batch, positions) with the positions
        of the logits or of the inputs. With (batch, classes) logits a
        (batch, positions) mask keeps padding tokens out of A (and of its row
        count) in every layer whose rows are (batch, positions); the
        likelihood weighs each example by its largest mask entry (1 if any
        position is real).
      kind: the Fisher used for G (and the fallback diagonal): ``"exact"``
        (default; measured: one sampled label per example made G's scale
        vary by orders of magnitude across confident tasks), ``"sampled"`` or
        ``"empirical"``.
      num_samples: labels per example for ``kind="sampled"``.
      key: PRNG key for sampling.
      micro_batch_size: examples per jitted step.
      mesh: device mesh to shard the examples over (data parallel).
      fallback: ``"diagonal"`` (the diagonal Fisher) or None for leaves that
        do not get K-FAC.
      leaves: which kernels get K-FAC: None (all), leaf-path patterns
        (``["*/attention/*"]``, as :func:`mats_jax.tree.select` reads them),
        or a boolean pytree; the others get the fallback.
      max_factor_size: a kernel whose A or G would have more rows gets the
        fallback (default 8192, :data:`~mats_jax.stats.estimate.MAX_FACTOR_SIZE`);
        None for no limit.
      progress: show a progress bar.

    Returns:
      A statistic pytree with ``params``' structure: a :class:`~mats_jax.KFAC`
      per dense kernel (one system per layer for scanned kernels, per head
      for per-head products; ``in_axes``/``out_axes`` the leaf's own axes),
      the fallback elsewhere. Pass one per task to :func:`~mats_jax.mats`.

    Raises:
      StatisticsInputError: before any work on the first batch, and on
        reaching a later one, naming it: an empty batch, integer logits,
        labels out of range, a mask that fits neither the logits nor the
        inputs, shapes the model cannot take.

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

      Padded text, a pooled classifier, a head kept as (out, in): batches of
      their own lengths, a (batch, positions) mask; A counts real tokens only.

      >>> def classifier(p, inputs):
      ...     h = p["embed"][inputs["ids"]] @ p["dense"]   # (batch, positions, 2)
      ...     m = inputs["mask"][..., None]
      ...     return (m * h).sum(1) / m.sum(1) @ p["head"].T  # head: (classes, 2)
      >>> p = {"embed": jnp.eye(3), "dense": jnp.ones((3, 2)), "head": jnp.ones((2, 2))}
      >>> def batch(ids, mask):
      ...     ids, mask = jnp.array(ids), jnp.array(mask, jnp.float32)
      ...     return {"inputs": {"ids": ids, "mask": mask}, "mask": mask}
      >>> batches = [batch([[0, 1]], [[1, 1]]), batch([[2, 0, 0]], [[1, 0, 0]])]
      >>> stats = kfac(classifier, p, batches, fallback=None, progress=False)
      >>> stats["dense"].a * 3  # rows: tokens 0, 1 and 2 (the padding left out)
      Array([[1., 0., 0.],
             [0., 1., 0.],
             [0., 0., 1.]], dtype=float32)
      >>> stats["head"].in_axes, stats["head"].out_axes
      ((1,), (0,))
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
        leaves=leaves,
        max_factor_size=max_factor_size,
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
    leaves: Any = None,
    max_factor_size: int | None = MAX_FACTOR_SIZE,
    progress: bool = True,
) -> StatTree:
    """RegMean's Gram matrix ``A = Σ_r w_r x_r x_rᵀ / Σ_r w_r`` of the inputs of every dense kernel.

    Every check is made on concrete values: estimators run eagerly over
    concrete batches and parameters (jitting their own steps) and cannot be
    called under ``jax.jit`` (:func:`~mats_jax.stats.estimate.estimate`).

    Args:
      apply_fn: ``apply_fn(params, inputs)``; its output is not used unless
        ``fallback="diagonal"`` (then it must return floating-point logits).
      params: its parameter pytree.
      batches: an iterable of ``{"inputs", "mask"}`` batches (labels unused
        unless for an empirical diagonal fallback); inputs any pytree with a
        leading batch axis, their other sizes free to differ between batches.
        The mask is (batch,) or (batch, positions): rows of a layer led by
        (batch, positions) (tokens) take its entries, so padding counts in
        neither A nor its row count; rows led by the batch axis alone take
        the example's largest entry.
      micro_batch_size: examples per jitted step.
      mesh: device mesh to shard the examples over (data parallel).
      fallback: None (default: leaves that do not get a Gram get no
        statistic, as RegMean averages them) or ``"diagonal"``.
      kind, num_samples, key: the Fisher kind for a diagonal fallback.
      leaves: which kernels get a Gram: None (all), leaf-path patterns, or a
        boolean pytree; the others get the fallback.
      max_factor_size: a kernel whose A would have more rows (inputs) gets
        the fallback (default 8192); None for no limit.
      progress: show a progress bar.

    Returns:
      A statistic pytree with a :class:`~mats_jax.Gram` per dense kernel
      (``in_axes`` the leaf's own input axes: ``(1,)`` for ``x @ w.T``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from mats_jax import gram
      >>> apply_fn = lambda params, x: x @ params["w"]
      >>> params = {"w": jnp.zeros((2, 3))}
      >>> batches = [{"inputs": jnp.array([[1.0, 0.0], [1.0, 2.0]])}]
      >>> gram(apply_fn, params, batches, progress=False)["w"].a
      Array([[1., 1.],
             [1., 2.]], dtype=float32)

      Token rows (batch, positions) with a positions mask: the padding row
      ``[5, 5]`` counts in neither the sum nor the row count.

      >>> tokens = jnp.array([[[1.0, 0.0], [5.0, 5.0]], [[1.0, 2.0], [0.0, 1.0]]])
      >>> mask = jnp.array([[1.0, 0.0], [1.0, 1.0]])
      >>> gram(apply_fn, params, [{"inputs": tokens, "mask": mask}], progress=False)["w"].a * 3
      Array([[2., 2.],
             [2., 5.]], dtype=float32)
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
        leaves=leaves,
        max_factor_size=max_factor_size,
    )
