"""Batches, categorical log-likelihoods and the three kinds of Fisher.

Every statistic here is a Fisher information of a categorical model
``p(y | x, θ) = softmax(logits(θ, x))``, over classes (classification) or over
a vocabulary at each position (token-level sequence models), estimated in one
of three ways. All three are expectations of products of the score
``∇ log p(y | x)``; they differ in where y comes from:

* ``"empirical"``: y is the gold label of the example.
* ``"sampled"``: y is drawn from the model's own distribution, ``num_samples``
  times per example (and position); the "true" Fisher, estimated.
* ``"exact"``: the expectation over the model's distribution computed in closed
  form, ``Σ_y p(y|x) s_y s_yᵀ``; one backward pass per class, so for outputs
  with few classes (classification heads).

With logits z and p = softmax(z), ``∂ log p(y)/∂z = e_y − p``. Each kind is a
set of K cotangents u_k on the logits with ``Σ_k u_k u_kᵀ`` equal (in
expectation) to its Fisher with respect to the logits; backpropagating each
u_k gives the parameter-space (or layer-output) vectors whose squares or outer
products make the statistics:

* empirical: ``u = e_y − p`` (K = 1)
* sampled:   ``u_k = (e_{y_k} − p)/√n``, ``y_k ~ p`` (K = n)
* exact:     ``u_c = √p_c (e_c − p)`` for every class c (K = C), since
  ``Σ_c p_c (e_c − p)(e_c − p)ᵀ = diag(p) − p pᵀ``.

A batch is a mapping with ``"inputs"`` (any pytree whose leaves have the batch
as leading axis; passed to the model function as is), ``"labels"`` (integer
class ids in [0, classes), of the logits' prediction shape: (batch,) or
(batch, positions); needed by the empirical kind) and an optional ``"mask"``
(1 for real examples or tokens, 0 for padding). The mask is (batch,), or
(batch, positions) with the positions of the logits (a token-level model) or
of the inputs (a pooled classifier over padded text, whose logits are
(batch, classes)). The likelihood weighs each prediction by
:func:`prediction_mask`: the mask itself, or, for a pooled classifier, its
largest entry per example (1 for an example with any real position); the
estimators also use a (batch, positions) mask to keep padding rows out of the
dense layers' input statistics (:mod:`mats_jax.stats.estimate`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from mats_jax.typing import Array

__all__ = [
    "FisherKind",
    "StatisticsFallbackWarning",
    "StatisticsInputError",
    "check_batch",
    "check_label_range",
    "check_logits",
    "logit_cotangents",
    "prediction_mask",
]

FisherKind = Literal["exact", "sampled", "empirical"]
KINDS = ("exact", "sampled", "empirical")
MAX_EXACT_CLASSES = 1024


class StatisticsInputError(ValueError):
    """Bad input to a statistics estimator: the message says what and where."""


class StatisticsFallbackWarning(UserWarning):
    """Leaves with dense products that an estimator gives its fallback instead of
    a kernel statistic (a factor past ``max_factor_size``, a tied embedding, a
    product the capture cannot read); the message lists each leaf and why."""


def check_kind(kind: str, num_samples: int) -> None:
    if kind not in KINDS:
        raise StatisticsInputError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "sampled" and (int(num_samples) != num_samples or num_samples < 1):
        raise StatisticsInputError(
            f"num_samples must be a positive integer, got {num_samples!r}"
        )


def check_batch(batch: Any, index: int, *, needs_labels: bool) -> int:
    """Validates one batch; returns its size (the leading axis).

    Raises:
      StatisticsInputError: naming the batch index and the offending entry.
    """
    where = f"batch {index}"
    if not isinstance(batch, Mapping) or "inputs" not in batch:
        raise StatisticsInputError(
            f"{where}: expected a mapping with 'inputs' (and 'labels', optionally "
            f"'mask'), got {type(batch).__name__}"
            + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else "")
        )
    unknown = set(batch) - {"inputs", "labels", "mask"}
    if unknown:
        raise StatisticsInputError(
            f"{where}: unknown keys {sorted(unknown)}; a batch has 'inputs', 'labels' and 'mask'"
        )
    if needs_labels and "labels" not in batch:
        raise StatisticsInputError(
            f"{where}: kind='empirical' needs gold 'labels' in every batch"
        )
    sizes = {}
    for name in ("inputs", "labels", "mask"):
        if name not in batch:
            continue
        for path, leaf in jax.tree_util.tree_flatten_with_path(batch[name])[0]:
            shape = np.shape(leaf)
            label = name + jax.tree_util.keystr(path)
            if isinstance(leaf, jax.core.Tracer):
                raise StatisticsInputError(
                    f"{where}: {label} is traced: estimators cannot be called under "
                    "jax.jit (they iterate over concrete batches and jit their own "
                    "steps); call the estimator outside the jitted function"
                )
            if not shape:
                raise StatisticsInputError(
                    f"{where}: {label} is a scalar; every entry needs a leading batch axis"
                )
            sizes[label] = shape[0]
    if not sizes:
        raise StatisticsInputError(f"{where}: 'inputs' has no arrays")
    if len(set(sizes.values())) != 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise StatisticsInputError(f"{where}: leading (batch) sizes differ: {listing}")
    if next(iter(sizes.values())) == 0:
        shapes = ", ".join(
            f"{name}: {tuple(np.shape(leaf))}"
            for name in ("inputs", "labels", "mask")
            if name in batch
            for leaf in jax.tree.leaves(batch[name])
        )
        raise StatisticsInputError(
            f"{where} has no examples (its leading axis has size 0: {shapes}); "
            "leave empty batches out of the iterator"
        )
    if "labels" in batch and not jnp.issubdtype(
        np.asarray(batch["labels"]).dtype, jnp.integer
    ):
        raise StatisticsInputError(
            f"{where}: labels must be integer class ids, got dtype {np.asarray(batch['labels']).dtype}"
        )
    return next(iter(sizes.values()))


def check_logits(
    logits: Any, batch_size: int, labels_shape: tuple[int, ...] | None, kind: str
) -> None:
    """Checks the model output's shape and dtype against the batch (at trace time)."""
    shape = tuple(getattr(logits, "shape", ()))
    if len(shape) not in (2, 3) or shape[0] != batch_size:
        raise StatisticsInputError(
            f"the model function must return logits of shape (batch, classes) or "
            f"(batch, positions, classes) with batch = {batch_size}; got "
            f"{shape if hasattr(logits, 'shape') else type(logits).__name__}"
        )
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        # An argmax or a class id has no gradient: every statistic would be 0.
        raise StatisticsInputError(
            f"the model function must return floating-point logits; got {logits.dtype} "
            f"of shape {shape} (class ids or an argmax have no gradient)"
        )
    if labels_shape is not None and tuple(labels_shape) != shape[:-1]:
        raise StatisticsInputError(
            f"labels have shape {tuple(labels_shape)} but the logits {shape} need labels of shape {shape[:-1]}"
        )
    if kind == "exact" and len(shape) == 3:
        raise StatisticsInputError(
            "kind='exact' is for one prediction per example (logits (batch, classes)); "
            "for token-level sequence models use kind='sampled'"
        )
    if kind == "exact" and shape[-1] > MAX_EXACT_CLASSES:
        raise StatisticsInputError(
            f"kind='exact' needs one backward pass per class; {shape[-1]} classes is too "
            f"many (limit {MAX_EXACT_CLASSES}): use kind='sampled'"
        )


def prediction_mask(mask: ArrayLike, prediction_shape: tuple[int, ...]) -> Array:
    """The weight of each prediction (``logits.shape[:-1]``) from a batch's mask.

    A mask with fewer axes than the predictions (a (batch,) mask of a
    token-level model) weighs all of an example's predictions alike; one with
    more (the (batch, positions) mask of a pooled classifier) gives each
    prediction the largest weight over its extra axes: 1 for an example with
    any real position.

    Raises:
      StatisticsInputError: if neither shape is a prefix of the other.

    Examples:
      >>> import jax.numpy as jnp
      >>> mask = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
      >>> prediction_mask(mask, (2,))  # a pooled classifier: per example
      Array([1., 0.], dtype=float32)
      >>> prediction_mask(jnp.array([1.0, 0.0]), (2, 3))
      Array([[1., 1., 1.],
             [0., 0., 0.]], dtype=float32)
    """
    mask = jnp.asarray(mask, jnp.float32)
    shape, n = tuple(mask.shape), len(prediction_shape)
    if shape[:n] == tuple(prediction_shape):
        return jnp.max(mask, axis=tuple(range(n, mask.ndim))) if mask.ndim > n else mask
    if tuple(prediction_shape[: mask.ndim]) == shape:
        wide = mask.reshape(shape + (1,) * (n - mask.ndim))
        return jnp.broadcast_to(wide, tuple(prediction_shape))
    raise StatisticsInputError(
        f"the mask has shape {shape}, which does not fit predictions of shape "
        f"{tuple(prediction_shape)}: a mask is (batch,) or (batch, positions)"
    )


def check_label_range(batch: Mapping[str, Any], index: int, classes: int) -> None:
    """Checks that a batch's labels are class ids in [0, classes) where the mask counts.

    Labels of masked-out predictions (an ignore index such as -100 at padding)
    are not read. Traced labels are not checked.

    Raises:
      StatisticsInputError: naming the batch and the first bad label.
    """
    labels = batch["labels"]
    if isinstance(labels, jax.core.Tracer):
        return
    labels = np.asarray(labels)
    mask = batch.get("mask")
    weights = (
        np.ones(labels.shape, bool)
        if mask is None
        else np.asarray(prediction_mask(mask, labels.shape)) > 0
    )
    bad = weights & ((labels < 0) | (labels >= classes))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise StatisticsInputError(
            f"batch {index}: labels must be class ids in [0, {classes}) where the mask "
            f"is non-zero; labels{list(where)} is {labels[where]} "
            f"({int(bad.sum())} such labels)"
        )


def logit_cotangents(
    logits: Array,
    labels: Array | None,
    mask: Array,
    kind: FisherKind,
    key: Array | None,
    num_samples: int = 1,
) -> Array:
    """The K cotangents on the logits whose backpropagations make the Fisher.

    Args:
      logits: (batch, classes) or (batch, positions, classes).
      labels: integer labels of ``logits.shape[:-1]`` (empirical kind).
      mask: weights of ``logits.shape[:-1]``: 0 drops an example or position.
      kind: ``"exact"``, ``"sampled"`` or ``"empirical"`` (module docstring).
      key: PRNG key for the sampled kind.
      num_samples: samples per example for the sampled kind.

    Returns:
      An array (K, *logits.shape), float32, with no gradient attached.

    Examples:
      >>> import jax.numpy as jnp
      >>> u = logit_cotangents(jnp.zeros((1, 2)), None, jnp.ones(1), "exact", None)
      >>> jnp.einsum("kc,kd->cd", u[:, 0], u[:, 0]).round(4)  # diag(p) - p pᵀ, p = (½, ½)
      Array([[ 0.25, -0.25],
             [-0.25,  0.25]], dtype=float32)
    """
    logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
    p = jax.nn.softmax(logits, axis=-1)
    n_classes = logits.shape[-1]
    weight = mask.astype(jnp.float32)[..., None]
    if kind == "empirical":
        assert labels is not None
        u = (jax.nn.one_hot(labels, n_classes) - p)[None]
    elif kind == "sampled":
        assert key is not None
        draws = jax.random.categorical(
            key, logits, axis=-1, shape=(num_samples, *logits.shape[:-1])
        )
        u = (jax.nn.one_hot(draws, n_classes) - p[None]) / jnp.sqrt(float(num_samples))
    else:
        eye = jnp.eye(n_classes, dtype=p.dtype)
        # u[c] = sqrt(p_c) (e_c - p): class axis first.
        u = jnp.sqrt(jnp.moveaxis(p, -1, 0))[..., None] * (
            eye.reshape((n_classes,) + (1,) * (p.ndim - 1) + (n_classes,)) - p[None]
        )
    return u * weight[None]
