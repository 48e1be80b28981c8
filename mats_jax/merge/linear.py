"""Weighted averaging and task arithmetic: the linear, data-free merges.

Examples:
  >>> import jax.numpy as jnp
  >>> from mats_jax import average, task_arithmetic
  >>> base = {"w": jnp.zeros(2)}
  >>> models = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 3.0])}]
  >>> average(models)["w"]
  Array([0.5, 1.5], dtype=float32)
  >>> task_arithmetic(base, models, scale=0.5)["w"]
  Array([0.5, 1.5], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mats_jax import checks
from mats_jax.sharding import input_mesh
from mats_jax.tree import compute_dtype, task_vectors, weighted_sum
from mats_jax.typing import Params

__all__ = ["average", "task_arithmetic"]


def average(models: Sequence[Params], *, weights: Any = None) -> Params:
    """The weighted average of the models.

    .. math:: \\theta = \\frac{\\sum_m w_m \\theta_m}{\\sum_m w_m}

    In the MaTS view this is ``C_m = w_m I``. Arithmetic runs in float32 (or
    the leaf's dtype if wider); each leaf is returned in its own dtype.

    Args:
      models: M parameter pytrees of one structure.
      weights: one non-negative weight per model, not all zero (default equal).

    Returns:
      The merged parameters.

    Examples:
      >>> import jax.numpy as jnp
      >>> average([{"w": jnp.ones(2)}, {"w": jnp.zeros(2)}], weights=[3.0, 1.0])["w"]
      Array([0.75, 0.75], dtype=float32)
    """
    input_mesh(models)  # one mesh, or a clear error
    checks.check_models(models)
    return _average(list(models), checks.check_weights(weights, len(models)))


@jax.jit
def _average(models: list[Params], weights: jax.Array) -> Params:
    total = weighted_sum(weights, models)
    return jax.tree.map(
        lambda t, ref: (t / jnp.sum(weights).astype(t.dtype)).astype(ref.dtype),
        total,
        models[0],
    )


def task_arithmetic(
    base: Params, models: Sequence[Params], *, scale: Any = 1.0, weights: Any = None
) -> Params:
    """Task arithmetic (Ilharco et al., 2023): add the scaled sum of task vectors.

    .. math:: \\theta = \\theta_0 + \\lambda \\sum_m w_m (\\theta_m - \\theta_0)

    With ``scale = 1/M`` and equal weights this is the average.

    Args:
      base: the pretrained parameters θ₀.
      models: the fine-tuned parameters θ_m.
      scale: λ; traced, so sweeping it does not recompile.
      weights: per-model weights w_m (default 1).

    Returns:
      The merged parameters, each leaf in its own dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> base = {"w": jnp.zeros(2)}
      >>> task_arithmetic(base, [{"w": jnp.ones(2)}] * 2, scale=0.3)["w"]
      Array([0.6, 0.6], dtype=float32)
    """
    input_mesh(base, models)  # one mesh, or a clear error
    checks.check_models(models, base)
    return _task_arithmetic(
        base, list(models), scale, checks.check_weights(weights, len(models))
    )


@jax.jit
def _task_arithmetic(
    base: Params, models: list[Params], scale: Any, weights: jax.Array
) -> Params:
    total = weighted_sum(weights, task_vectors(base, models))

    def apply(b: jax.Array, t: jax.Array) -> jax.Array:
        dtype = compute_dtype(b.dtype)
        return (b.astype(dtype) + jnp.asarray(scale, dtype) * t).astype(b.dtype)

    return jax.tree.map(apply, base, total)
