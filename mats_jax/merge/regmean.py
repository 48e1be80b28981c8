"""RegMean (Jin et al., 2023): merge dense kernels by matching their outputs on each task's inputs.

For a kernel W (y = x W) with input Gram matrices A_m = X_mᵀX_m,

.. math::

   W^\\star = \\Big(\\sum_m w_m \\tilde A_m\\Big)^{+} \\sum_m w_m \\tilde A_m W_m,
   \\qquad \\tilde A_m = \\alpha A_m + (1 - \\alpha)\\,\\mathrm{diag}(A_m),

the least-squares fit of every task's layer outputs at once. α < 1 shrinks the
off-diagonal of each Gram toward its diagonal, which regularises and keeps the
sum invertible. In the MaTS view this is ``C_m = Ã_m ⊗ I``, solved in closed
form by the same solver as every other data-dependent method. Leaves without a
Gram (biases, norms, embeddings) take the fallback rule.

Examples:
  >>> import jax.numpy as jnp
  >>> from mats_jax import Gram, regmean
  >>> models = [{"k": jnp.array([[1.0], [0.0]])}, {"k": jnp.array([[0.0], [1.0]])}]
  >>> grams = [{"k": Gram(jnp.diag(jnp.array([1.0, 0.0])))}, {"k": Gram(jnp.diag(jnp.array([0.0, 1.0])))}]
  >>> regmean(models, grams, alpha=1.0).params["k"]
  Array([[1.],
         [1.]], dtype=float32)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from mats_jax.checks import check_fraction
from mats_jax.engine import run_in_memory
from mats_jax.merge.subspace import SubspaceMerge, check_fallback, each_statistic
from mats_jax.solver.options import SolverOptions
from mats_jax.solver.report import MergeResult
from mats_jax.stats.statistic import Gram, Statistic
from mats_jax.tree import register_record
from mats_jax.typing import Params, StatTree

__all__ = ["REGMEAN", "RegMeanParameters", "regmean", "shrink_gram"]


@register_record
@dataclasses.dataclass(frozen=True)
class RegMeanParameters:
    """RegMean's parameters.

    Attributes:
      alpha: off-diagonal scale α in [0, 1]; 1 is plain RegMean.
      fallback: the rule for leaves without a Gram (see :func:`~mats_jax.solve`).
    """

    alpha: Any = 0.9
    fallback: Any = "average"

    def __post_init__(self) -> None:
        check_fraction("alpha", self.alpha, include_zero=True, include_one=True)
        check_fallback(self.fallback)

    def solver_options(self) -> SolverOptions:
        """Closed form: an (in, in) solve per kernel."""
        return SolverOptions(method="closed_form")


def shrink_gram(gram: Statistic | None, params: RegMeanParameters) -> Statistic | None:
    """``Ã = αA + (1 − α) diag(A)``: the statistics transform of RegMean."""
    if not isinstance(gram, Gram):  # None: the checks allow nothing else
        return gram
    return gram.off_diagonal_scaled(params.alpha)


REGMEAN = SubspaceMerge(
    "regmean",
    RegMeanParameters,
    statistics_name="grams",
    allowed=(Gram,),
    transform=each_statistic(shrink_gram),
)


def regmean(
    models: Sequence[Params],
    grams: Sequence[StatTree],
    *,
    alpha: float = 0.9,
    weights: Any = None,
    fallback: Any = "average",
) -> MergeResult:
    """Merges each dense kernel to reproduce every task's outputs on that task's inputs.

    .. math::

       W^\\star = \\Big(\\sum_m w_m \\tilde A_m\\Big)^{+} \\sum_m w_m \\tilde A_m W_m,
       \\qquad \\tilde A_m = \\alpha A_m + (1 - \\alpha)\\,\\mathrm{diag}(A_m),

    with A_m the Gram of the kernel's inputs in task m: the closed-form solve
    of ``C_m = Ã_m ⊗ I``, one (in, in) system per kernel.

    Values are checked before any work when concrete; traced ones (under an
    outer ``jax.jit``: NaN or Inf in models, weights or statistics,
    hyperparameters out of range, negative weights) are checked only when
    the call is wrapped in ``jax.experimental.checkify.checkify``, and pass
    unchecked otherwise (:func:`~mats_jax.checks.check_traced`).

    Args:
      models: M fine-tuned parameter pytrees.
      grams: M pytrees with the parameters' structure holding a
        :class:`~mats_jax.Gram` (the inputs' XᵀX) per dense kernel, or None.
      alpha: off-diagonal scale α in [0, 1]; 1 is plain RegMean. Tune it on
        validation data.
      weights: per-model weights (default 1).
      fallback: the rule for leaves without a Gram (see :func:`~mats_jax.solve`).

    Returns:
      A :class:`~mats_jax.MergeResult`. Where ``Σ Ã_m`` is singular (inputs no
      task ever activates) the solution keeps the weighted average in the
      null space.

    Examples:
      Two tasks whose inputs use disjoint features: each task keeps the rows of
      the kernel its inputs reach. The bias has no Gram and takes the fallback.

      >>> import jax.numpy as jnp
      >>> from mats_jax import Gram, format_report, regmean
      >>> models = [{"k": jnp.array([[1.0], [0.0]]), "b": jnp.zeros(1)},
      ...           {"k": jnp.array([[0.0], [1.0]]), "b": jnp.ones(1)}]
      >>> grams = [{"k": Gram(jnp.diag(jnp.array([1.0, 0.0]))), "b": None},
      ...          {"k": Gram(jnp.diag(jnp.array([0.0, 1.0]))), "b": None}]
      >>> merged, report = regmean(models, grams, alpha=1.0)
      >>> merged["k"], merged["b"]
      (Array([[1.],
             [1.]], dtype=float32), Array([0.5], dtype=float32))
      >>> print(format_report(report))
      leaf  solver            blocks  iters  initial   final     status
      b     fallback:average  -       -      -         -         -
      k     closed_form       1       0      5.00e-01  0.00e+00  converged
    """
    return run_in_memory(
        REGMEAN,
        REGMEAN.parameters(alpha=alpha, fallback=fallback),
        models=models,
        statistics=grams,
        weights=weights,
    )
