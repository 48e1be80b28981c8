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

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from mats_jax.checks import check_flag, check_number
from mats_jax.engine import run_in_memory
from mats_jax.method import MergeInputs, MergeMethod, Needs
from mats_jax.sharding import Placement
from mats_jax.solver.report import LeafReport, MergeResult
from mats_jax.tree import compute_dtype, register_record, task_vectors, weighted_sum
from mats_jax.typing import Array, Params

__all__ = [
    "AVERAGE",
    "TASK_ARITHMETIC",
    "Average",
    "AverageParameters",
    "TaskArithmetic",
    "TaskArithmeticParameters",
    "add_scaled",
    "average",
    "named_report",
    "task_arithmetic",
]


def named_report(tree: Params, name: str) -> Any:
    """A report naming the method for every leaf of ``tree`` (data-free merges)."""
    return jax.tree.map(lambda _: LeafReport(solver=name), tree)


def add_scaled(base: Array, vector: Array, scale: Any) -> Array:
    """``θ₀ + λ τ`` in the leaf's compute dtype, returned in the base's dtype."""
    dtype = compute_dtype(base.dtype)
    return (base.astype(dtype) + jnp.asarray(scale, dtype) * vector).astype(base.dtype)


@register_record
@dataclasses.dataclass(frozen=True)
class AverageParameters:
    """The weighted average has no parameters (the weights are an input)."""


@dataclasses.dataclass(frozen=True)
class Average(MergeMethod):
    """The weighted average of the models.

    .. math:: \\theta = \\frac{\\sum_m w_m \\theta_m}{\\sum_m w_m}

    In the MaTS view this is ``C_m = w_m I``.
    """

    elementwise: ClassVar[bool] = True

    def merge(
        self, inputs: MergeInputs, params: Any, prepared: Any, placement: Placement
    ) -> MergeResult:
        weights = inputs.weights
        assert weights is not None
        total = weighted_sum(weights, inputs.models)
        merged = jax.tree.map(
            lambda t, ref: (t / jnp.sum(weights).astype(t.dtype)).astype(ref.dtype),
            total,
            inputs.models[0],
        )
        return MergeResult(merged, named_report(merged, self.name))


@register_record
@dataclasses.dataclass(frozen=True)
class TaskArithmeticParameters:
    """Task arithmetic's parameters.

    Attributes:
      scale: λ, finite (traced: sweeping it does not recompile).
      normalize: divide the weighted sum of task vectors by Σ_m w_m
        (mergekit's ``normalize``; off by default, as there).
    """

    static_fields: ClassVar[tuple[str, ...]] = ("normalize",)
    scale: Any = 1.0
    normalize: bool = False

    def __post_init__(self) -> None:
        check_number("scale", self.scale)
        check_flag("normalize", self.normalize)


@dataclasses.dataclass(frozen=True)
class TaskArithmetic(MergeMethod):
    """Task arithmetic (Ilharco et al., 2023): add the scaled sum of task vectors.

    .. math:: \\theta = \\theta_0 + \\lambda \\sum_m w_m (\\theta_m - \\theta_0)

    (divided by :math:`\\sum_m w_m` with ``normalize``).
    """

    elementwise: ClassVar[bool] = True

    def needs(self, params: Any) -> Needs:
        return Needs(base=True)

    def merge(
        self, inputs: MergeInputs, params: Any, prepared: Any, placement: Placement
    ) -> MergeResult:
        assert inputs.weights is not None
        total = weighted_sum(inputs.weights, task_vectors(inputs.base, inputs.models))
        if params.normalize:
            weights = inputs.weights
            total = jax.tree.map(lambda t: t / jnp.sum(weights).astype(t.dtype), total)
        merged = jax.tree.map(
            lambda b, t: add_scaled(b, t, params.scale), inputs.base, total
        )
        return MergeResult(merged, named_report(merged, self.name))


AVERAGE = Average("average", AverageParameters)
TASK_ARITHMETIC = TaskArithmetic("task_arithmetic", TaskArithmeticParameters)


def average(models: Sequence[Params], *, weights: Any = None) -> Params:
    """The weighted average of the models.

    .. math:: \\theta = \\frac{\\sum_m w_m \\theta_m}{\\sum_m w_m}

    In the MaTS view this is ``C_m = w_m I``. Arithmetic runs in float32 (or
    the leaf's dtype if wider); each leaf is returned in its own dtype.

    Values are checked before any work when concrete; traced ones (under an
    outer ``jax.jit``: NaN or Inf in models, weights or statistics,
    hyperparameters out of range, negative weights) are checked only when
    the call is wrapped in ``jax.experimental.checkify.checkify``, and pass
    unchecked otherwise (:func:`~mats_jax.checks.check_traced`).

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
    return run_in_memory(
        AVERAGE, AVERAGE.parameters(), models=models, weights=weights
    ).params


def task_arithmetic(
    base: Params,
    models: Sequence[Params],
    *,
    scale: Any = 1.0,
    weights: Any = None,
    normalize: bool = False,
) -> Params:
    """Task arithmetic (Ilharco et al., 2023): add the scaled sum of task vectors.

    .. math:: \\theta = \\theta_0 + \\lambda \\sum_m w_m (\\theta_m - \\theta_0)

    With ``scale = 1/M`` and equal weights this is the average.

    Values are checked before any work when concrete; traced ones (under an
    outer ``jax.jit``: NaN or Inf in models, weights or statistics,
    hyperparameters out of range, negative weights) are checked only when
    the call is wrapped in ``jax.experimental.checkify.checkify``, and pass
    unchecked otherwise (:func:`~mats_jax.checks.check_traced`).

    Args:
      base: the pretrained parameters θ₀.
      models: the fine-tuned parameters θ_m.
      scale: λ; traced, so sweeping it does not recompile.
      weights: per-model weights w_m (default 1).
      normalize: divide the weighted sum by Σ_m w_m (mergekit's option).

    Returns:
      The merged parameters, each leaf in its own dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> base = {"w": jnp.zeros(2)}
      >>> task_arithmetic(base, [{"w": jnp.ones(2)}] * 2, scale=0.3)["w"]
      Array([0.6, 0.6], dtype=float32)
    """
    return run_in_memory(
        TASK_ARITHMETIC,
        TASK_ARITHMETIC.parameters(scale=scale, normalize=normalize),
        base=base,
        models=models,
        weights=weights,
    ).params
