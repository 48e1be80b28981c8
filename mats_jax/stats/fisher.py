"""The diagonal Fisher from per-example gradients, in bounded memory.

.. math::

   F = \\frac{1}{N} \\sum_{i=1}^{N} \\sum_k \\big(\\nabla_\\theta \\langle u_{ik}, z_i(\\theta)\\rangle\\big)^2

with z_i the logits of example i and u_{ik} the cotangents of the chosen Fisher
kind (:mod:`mats_jax.stats.likelihood`): ``∇ log p(y_i)`` for the empirical
kind, sampled labels for the sampled kind, and every class weighted by its
probability for the exact kind. For a sequence model the score of an example is
the gradient of the summed log-likelihood of its (unmasked) target tokens.

For a dense kernel used once with one row per example (the layers of a plain
classifier), example i's gradient is the outer product ``x_i g_iᵀ`` of the
layer's input and output gradient, so its square is ``(x_i ⊙ x_i)(g_i ⊙ g_i)ᵀ``:
those kernels need no per-example gradients at all
(:mod:`mats_jax.stats.estimate`). Every other leaf gets per-example gradients
from ``jax.vmap`` over a micro-batch's examples of ``jax.vjp``. Memory is one
micro-batch, whatever the size of the data.

Masks. With (batch, positions, classes) logits a (batch, positions) mask
weighs each position's log-likelihood (padding contributes nothing). With
(batch, classes) logits (a pooled classifier over padded text) the mask may
be (batch, positions), the inputs' positions: an example then counts with its
largest entry (1 if any position is real). N counts the examples with any
real position. Batches may differ in their non-batch sizes (text padded per
batch to its own length): each shape is compiled once, and the result equals
one pass over the examples padded to one length.

Blocks. :func:`block_fisher` keeps each small leaf's whole Fisher block,
``F = (1/N) Σ_i Σ_k g_ik g_ikᵀ`` with g_ik the flattened score (a
:class:`~mats_jax.Dense` statistic): per micro-batch the per-example
gradients are stacked as rows and multiplied once, ``Gᵀ G``, so memory is
the micro-batch's gradients plus the n × n block. This is the statistic the
MaTS paper uses for IA³ scaling vectors; its diagonal is :func:`diagonal_fisher`.

Normalisation (the same for every statistic of this package): per example,
i.e. divided by the number of (unmasked) examples N, so that tasks with more
data do not weigh more; weight tasks explicitly with the merge's ``weights``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jax.sharding import Mesh

from mats_jax.stats.estimate import MAX_FACTOR_SIZE, Fallback, estimate
from mats_jax.stats.likelihood import FisherKind
from mats_jax.stats.statistic import Dense, Diagonal
from mats_jax.typing import Array, Params, StatTree

__all__ = ["block_fisher", "diagonal_fisher"]

LogitsFn = Callable[[Params, Any], Array]


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

    .. math::

       F = \\frac{1}{N} \\sum_i \\sum_k \\big(\\nabla_\\theta \\langle u_{ik}, z_i(\\theta)\\rangle\\big)^2

    (module docstring: the cotangents u of each kind, the masks).

    Every check is made on concrete values: estimators run eagerly over
    concrete batches and parameters (jitting their own steps) and cannot be
    called under ``jax.jit`` (:func:`~mats_jax.stats.estimate.estimate`).

    Args:
      logits_fn: ``logits_fn(params, inputs) -> logits``, floating point, of
        shape (batch, classes) or (batch, positions, classes): e.g.
        ``model.apply`` for a flax.linen module, or a function of
        ``nnx.split``'s state.
      params: the parameter pytree (the first argument of ``logits_fn``).
      batches: an iterable of ``{"inputs", "labels", "mask"}`` batches (see
        :mod:`mats_jax.stats.likelihood`), each of at least one example;
        iterated once. Labels are class ids in [0, classes) wherever the mask
        counts (an ignore index such as -100 at masked positions is not
        read); the mask is (batch,) or (batch, positions) of the logits or of
        the inputs.
      kind: ``"exact"`` (default; one prediction per example), ``"sampled"``
        or ``"empirical"``.
      num_samples: labels drawn per example for ``kind="sampled"``.
      key: PRNG key for sampling (required for ``kind="sampled"``).
      micro_batch_size: examples per vmapped step; memory grows with it (times
        the number of classes for the exact kind).
      mesh: a device mesh to shard each micro-batch's examples over (data
        parallel); the result equals the single-device one.
      leaves: which leaves to compute: None (all), leaf-path patterns (a
        string or a sequence of strings, ``"*/kernel"``, as
        :func:`mats_jax.tree.select` reads them) or a boolean pytree; the
        others get None.
      progress: show a progress bar.

    Returns:
      A pytree with ``params``' structure holding a :class:`~mats_jax.Diagonal`
      (float32) per selected leaf.

    Raises:
      StatisticsInputError: on bad batches (empty ones, labels out of range
        for the empirical kind, shapes the model cannot take, naming the
        batch), an empty iterator, logits of the wrong shape or integer
        dtype, or NaN/Inf in the gradients.

    Examples:
      A linear softmax classifier at W = 0 (uniform predictions): every entry of
      the exact Fisher is E[x_i²] · p_c (1 − p_c) = ½ · 2/9.

      >>> import jax.numpy as jnp
      >>> from mats_jax import diagonal_fisher
      >>> logits_fn = lambda params, x: x @ params["w"]
      >>> params = {"w": jnp.zeros((2, 3))}
      >>> batches = [{"inputs": jnp.eye(2), "labels": jnp.array([0, 2])}]
      >>> fisher = diagonal_fisher(logits_fn, params, batches, progress=False)
      >>> (9 * fisher["w"].f).round(3)
      Array([[1., 1., 1.],
             [1., 1., 1.]], dtype=float32)
      >>> empirical = diagonal_fisher(
      ...     logits_fn, params, batches, kind="empirical", progress=False
      ... )
      >>> (9 * empirical["w"].f).round(3)
      Array([[2. , 0.5, 0.5],
             [0.5, 0.5, 2. ]], dtype=float32)

      Leaves chosen by pattern; batches of two lengths with a positions mask
      beside pooled logits (the all-padding example does not count in N).

      >>> def pooled(p, x):  # x: (batch, positions, 2)
      ...     return x.sum(1) @ p["w"][:2] + p["b"]
      >>> params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
      >>> batches = [
      ...     {"inputs": jnp.ones((1, 2, 2)), "mask": jnp.ones((1, 2))},
      ...     {"inputs": jnp.ones((2, 3, 2)), "mask": jnp.array([[1.0, 0, 0], [0, 0, 0]])},
      ... ]
      >>> fisher = diagonal_fisher(pooled, params, batches, leaves="b", progress=False)
      >>> fisher["w"] is None, (9 * fisher["b"].f).round(3)
      (True, Array([2., 2., 2.], dtype=float32))
    """
    return estimate(
        logits_fn,
        params,
        batches,
        target=Diagonal,
        kind=kind,
        num_samples=num_samples,
        key=key,
        micro_batch_size=micro_batch_size,
        mesh=mesh,
        fallback=None,
        progress=progress,
        leaves=leaves,
    )


def block_fisher(
    logits_fn: LogitsFn,
    params: Params,
    batches: Iterable[Mapping[str, Any]],
    *,
    leaves: Any = None,
    kind: FisherKind = "exact",
    num_samples: int = 1,
    key: Array | None = None,
    micro_batch_size: int = 32,
    max_block_size: int | None = MAX_FACTOR_SIZE,
    fallback: Fallback = None,
    mesh: Mesh | None = None,
    progress: bool = True,
) -> StatTree:
    """The full Fisher block of each small leaf: a :class:`~mats_jax.Dense` statistic.

    .. math::

       F_\\ell = \\frac{1}{N} \\sum_{i=1}^{N} \\sum_k g_{ik} g_{ik}^\\top,
       \\qquad g_{ik} = \\operatorname{vec}\\,\\nabla_{\\theta_\\ell} \\langle u_{ik}, z_i(\\theta)\\rangle

    for each selected leaf θ_ℓ (flattened in row-major order), with the
    cotangents u of the Fisher kind and the masks of :func:`diagonal_fisher`,
    whose statistic is this block's diagonal. Off-diagonal entries are what
    the diagonal loses: how the entries of one block trade off against each
    other (an IA³ vector's scales, a bias's units). Blocks of different leaves
    are independent (block-diagonal across leaves).

    The arguments not listed below (``logits_fn``, ``params``, ``batches``,
    ``kind``, ``num_samples``, ``key``, ``micro_batch_size``, ``mesh``,
    ``progress``) are :func:`diagonal_fisher`'s, with the same meaning.

    Args:
      leaves: which leaves get a block: None (all), leaf-path patterns
        (``"**/ia3_l"``) or a boolean pytree; the others get None (or the
        diagonal Fisher with ``fallback="diagonal"``).
      max_block_size: the most entries a leaf may have for its block (n²
        floats per task: 8192 entries are 256 MiB); a selected leaf past it
        gets the fallback, named in a
        :class:`~mats_jax.StatisticsFallbackWarning`. None: no limit.
      fallback: ``None`` (no statistic) or ``"diagonal"`` for the leaves
        without a block.

    Returns:
      A pytree with ``params``' structure: a :class:`~mats_jax.Dense` (float32,
      (n, n)) per selected leaf within the size limit, the fallback or None
      elsewhere.

    Raises:
      StatisticsInputError: as :func:`diagonal_fisher`.

    Examples:
      A linear softmax classifier at W = 0 (uniform predictions over 3
      classes) on one example x = (1, 2): the exact Fisher of the flattened
      kernel is ``x xᵀ ⊗ (diag(p) − p pᵀ)``, and its diagonal is the diagonal
      Fisher's.

      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from mats_jax import block_fisher, diagonal_fisher
      >>> logits_fn = lambda params, x: x @ params["w"]
      >>> params = {"w": jnp.zeros((2, 3))}
      >>> batches = [{"inputs": jnp.array([[1.0, 2.0]]), "labels": jnp.array([0])}]
      >>> block = block_fisher(logits_fn, params, batches, progress=False)["w"].f
      >>> p = np.full(3, 1 / 3)
      >>> x = np.array([1.0, 2.0])
      >>> np.allclose(block, np.kron(np.outer(x, x), np.diag(p) - np.outer(p, p)), atol=1e-6)
      True
      >>> diagonal = diagonal_fisher(logits_fn, params, batches, progress=False)["w"].f
      >>> np.allclose(np.diag(block), diagonal.reshape(-1))
      True
    """
    return estimate(
        logits_fn,
        params,
        batches,
        target=Dense,
        kind=kind,
        num_samples=num_samples,
        key=key,
        micro_batch_size=micro_batch_size,
        mesh=mesh,
        fallback=fallback,
        progress=progress,
        leaves=leaves,
        max_factor_size=max_block_size,
    )
