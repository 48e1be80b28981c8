"""DELLA (Deep, Bhardwaj and Bhardwaj, 2024): drop task-vector entries at random
with probabilities ranked by magnitude within each row (MAGPRUNE), rescale the
kept ones, then elect signs and take the disjoint mean.

For model m with density ρ_m (the mean keep rate, ``p_m = 1 − ρ_m`` the mean
drop rate) and spread ε_m, each row of a leaf's task vector τ_m, of n entries,
ranks its magnitudes from the smallest (rank 0) to the largest (rank n − 1),
and entry i of the row gets the drop probability

.. math::

   p_i = p_m + \\varepsilon_m - 2 \\varepsilon_m \\frac{r_i}{n - 1}
   \\;\\in\\; [\\, p_m - \\varepsilon_m,\\; p_m + \\varepsilon_m \\,],

the largest magnitude the smallest drop probability p − ε, the smallest the
largest, p + ε. The kept entries are rescaled so that each entry keeps its
expected value:

.. math::

   \\hat\\tau_{m,i} = \\frac{b_{m,i}}{1 - p_i}\\, \\tau_{m,i}, \\qquad
   b_{m,i} \\sim \\mathrm{Bernoulli}(1 - p_i),

and the τ̂_m are combined by TIES's sign election and disjoint mean
(:func:`~mats_jax.merge.sparse.combine`; with ``sign_election=False`` the
weighted sum, mergekit's ``della_linear``): ``θ = θ₀ + λ τ``.

Conventions where the paper leaves a choice:

- **rows**: the last axis. A 1-D leaf (a bias) is one row; a leaf of more
  axes is the rows of its last axis with the others fixed, i.e. the leaf
  reshaped to ``(-1, shape[-1])`` (a Flax ``(in, out)`` kernel: each input
  feature's weights to the outputs; a PyTorch ``(out, in)`` weight, as
  mergekit ranks it, has the other orientation); a scalar is one row of one
  entry.
- **ties** in magnitude share their mean rank (``r_i`` is the midrank), so
  tied entries get the same probability; a row of one entry, or of equal
  magnitudes, gets ``p_i = p``. Every row's mean drop probability is p.
- **the draws**: model m's uniforms for a leaf come from
  ``fold_in(fold_in(key, leaf_id), m)``, ``b = u < 1 − p_i``, as DARE draws
  its masks (:func:`~mats_jax.merge.sparse.drop_at_random`): they depend on
  the key, the leaf's path and the model's index only, so a merge streamed
  one leaf at a time draws what the in-memory merge draws; with ε = 0 the
  masks are DARE's for drop rate p.
- **the spread**: ε is the half-width, as in mergekit (the paper's ε is
  the full width of the range).

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from mats_jax import della
  >>> base = {"w": jnp.zeros(4)}
  >>> tau = jnp.array([4.0, -3.0, 2.0, 1.0])
  >>> out = della(base, [{"w": tau}], density=0.5, epsilon=0.3, key=jax.random.key(0))
  >>> # kept entries divided by 1 − p_i = 0.8, 0.6, 0.4, 0.2
  >>> rescaled = tau / jnp.array([0.8, 0.6, 0.4, 0.2])
  >>> bool(jnp.all((out["w"] == 0) | jnp.isclose(out["w"], rescaled)))
  True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from mats_jax.checks import (
    MergeInputError,
    check_flag,
    check_fraction,
    check_number,
    check_traced,
    is_traced,
)
from mats_jax.engine import run_in_memory
from mats_jax.merge.linear import named_report
from mats_jax.merge.sparse import merge_sparsified
from mats_jax.method import MergeInputs, MergeMethod, Needs, model_value
from mats_jax.sharding import Placement
from mats_jax.solver.report import MergeResult
from mats_jax.tree import register_record
from mats_jax.typing import Array, Params

__all__ = [
    "DELLA",
    "Della",
    "DellaParameters",
    "della",
    "magnitude_keep_probabilities",
    "magprune",
]

_SLACK = 1e-12
"""Rounding allowed in ε ≤ 1 − density (1 − 0.9 is below 0.1 in binary)."""


def _check_spread(density: Any, epsilon: Any) -> None:
    """Every drop probability in [0, 1): ε ≤ p = 1 − density and ε < density,
    per model where either is given per model."""
    if any(is_traced(x) for x in jax.tree.leaves((density, epsilon))):
        rho, eps = jnp.asarray(density), jnp.asarray(epsilon)
        check_traced(
            "1 - density - epsilon", 1 - rho - eps, lambda x: x >= -_SLACK, "≥ 0"
        )
        check_traced("density - epsilon", rho - eps, lambda x: x > 0, "> 0")
        return
    d, e = np.asarray(density, np.float64), np.asarray(epsilon, np.float64)
    if d.ndim and e.ndim and d.shape != e.shape:
        return  # the engine names the one whose length is not the model count
    for i, (di, ei) in enumerate(
        zip(*(a.ravel() for a in np.broadcast_arrays(d, e)), strict=True)
    ):
        names = (
            f"density{f'[{i}]' if d.ndim else ''}={di:g}, "
            f"epsilon{f'[{i}]' if e.ndim else ''}={ei:g}"
        )
        if (1 - di) - ei < -_SLACK:
            raise MergeInputError(
                f"{names}: the smallest drop probability p - epsilon = 1 - density "
                f"- epsilon = {1 - di - ei:g} is negative; epsilon must be at most "
                f"1 - density = {1 - di:g}"
            )
        if (1 - di) + ei >= 1:
            raise MergeInputError(
                f"{names}: the largest drop probability p + epsilon = 1 - density "
                f"+ epsilon = {1 - di + ei:g} must be below 1; epsilon must be "
                f"less than density"
            )


@register_record
@dataclasses.dataclass(frozen=True)
class DellaParameters:
    """DELLA's parameters (mergekit's names; its ``lambda`` is ``scale``).

    Attributes:
      density: ρ = 1 − p, the mean fraction of each row kept, in (0, 1]
        (traced); one for all models or one per model.
      epsilon: ε, the half-width of the drop probabilities' range
        [p − ε, p + ε], with 0 ≤ ε ≤ p and ε < 1 − p (traced); one or one per
        model. Default 0.15 (mergekit's).
      scale: λ applied to the merged task vector (traced).
      sign_election: TIES's sign election and disjoint mean (the paper's and
        mergekit's ``della``, the default); False: the weighted sum
        (mergekit's ``della_linear``).
      rescale: divide the kept entries by 1 − p_i (the default); False
        keeps them as they are (mergekit's ``rescale: false``).
      normalize: divide by the weights taking part (see
        :func:`~mats_jax.merge.sparse.combine`); None (default): the
        disjoint mean with sign election, the plain sum without.
    """

    static_fields: ClassVar[tuple[str, ...]] = ("sign_election", "rescale", "normalize")
    per_model_fields: ClassVar[tuple[str, ...]] = ("density", "epsilon")
    density: Any
    epsilon: Any = 0.15
    scale: Any = 1.0
    sign_election: bool = True
    rescale: bool = True
    normalize: bool | None = None

    def __post_init__(self) -> None:
        check_fraction(
            "density",
            self.density,
            include_zero=False,
            include_one=True,
            per_model=True,
        )
        check_fraction(
            "epsilon",
            self.epsilon,
            include_zero=True,
            include_one=False,
            per_model=True,
        )
        _check_spread(self.density, self.epsilon)
        check_number("scale", self.scale)
        check_flag("sign_election", self.sign_election)
        check_flag("rescale", self.rescale)
        if self.normalize is not None:
            check_flag("normalize", self.normalize)


def _row_midranks(magnitudes: Array) -> Array:
    """Per row of an (R, n) array, each entry's rank from the smallest (0) to
    the largest (n − 1), tied entries sharing their mean rank."""
    ordered = jnp.sort(magnitudes, axis=-1)

    def ranks(row_sorted: Array, row: Array) -> Array:
        below = jnp.searchsorted(row_sorted, row, side="left")
        at_most = jnp.searchsorted(row_sorted, row, side="right")
        return (below + at_most - 1).astype(jnp.float32) / 2

    return jax.vmap(ranks)(ordered, magnitudes)


def magnitude_keep_probabilities(vector: Array, density: Any, epsilon: Any) -> Array:
    """MAGPRUNE's keep probability ``1 − p_i`` of every entry, in float32.

    ``1 − p_i = ρ − ε + 2ε · r_i / (n − 1)`` within each row of the last axis
    (r_i the entry's midrank by magnitude, ``r_i / (n − 1) = 1/2`` for a row
    of one entry): see the module docstring.

    Args:
      vector: one leaf's task vector, of any shape.
      density: ρ (traced).
      epsilon: ε (traced).

    Returns:
      An array of ``vector``'s shape with values in [ρ − ε, ρ + ε].

    Examples:
      >>> import jax.numpy as jnp
      >>> magnitude_keep_probabilities(jnp.array([[1.0, -4.0, 2.0], [0.0, 5.0, 5.0]]), 0.5, 0.25)
      Array([[0.25 , 0.75 , 0.5  ],
             [0.25 , 0.625, 0.625]], dtype=float32)
    """
    shape = vector.shape
    n = shape[-1] if shape else 1
    rows = jnp.abs(vector.astype(jnp.float32)).reshape(-1, n)
    if n > 1:
        position = _row_midranks(rows) / (n - 1)
    else:
        position = jnp.full(rows.shape, 0.5, jnp.float32)
    rho, eps = jnp.float32(density), jnp.float32(epsilon)
    keep = (rho - eps) + 2 * eps * position
    # ρ + ε ≤ 1 may round above 1 in float32.
    return jnp.minimum(keep, 1).reshape(shape)


def magprune(
    vectors: Sequence[Array],
    density: Any,
    epsilon: Any,
    key: Array,
    leaf_id: Array,
    *,
    rescale: bool = True,
) -> list[Array]:
    """MAGPRUNE of one leaf's task vectors: each entry kept with its
    :func:`magnitude_keep_probabilities` and divided by it (unless
    ``rescale=False``), else zeroed.

    Model m's uniforms are drawn from ``fold_in(fold_in(key, leaf_id), m)``
    (as DARE's masks), ``b = u < 1 − p_i``.

    Args:
      vectors: the M task vectors of one leaf.
      density, epsilon: one value, or one per model (traced).
      key: a PRNG key.
      leaf_id: the leaf's uint32 id (:func:`~mats_jax.engine.leaf_ids`).
      rescale: divide the kept entries by 1 − p_i.

    Returns:
      The M pruned vectors.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> v = jnp.array([4.0, -3.0, 2.0, 1.0])
      >>> (kept,) = magprune([v], 1.0, 0.0, jax.random.key(0), jnp.uint32(7))
      >>> kept  # density 1, ε = 0: nothing dropped
      Array([ 4., -3.,  2.,  1.], dtype=float32)
    """
    leaf_key = jax.random.fold_in(key, leaf_id)
    out = []
    for m, v in enumerate(vectors):
        keep = magnitude_keep_probabilities(
            v, model_value(density, m), model_value(epsilon, m)
        )
        u = jax.random.uniform(jax.random.fold_in(leaf_key, m), v.shape, jnp.float32)
        kept = v / keep.astype(v.dtype) if rescale else v
        out.append(jnp.where(u < keep, kept, 0))
    return out


@dataclasses.dataclass(frozen=True)
class Della(MergeMethod):
    """DELLA, per leaf (see the module docstring)."""

    # Ranks within rows and masks drawn for the leaf's shape: the leaf is
    # merged whole; it needs nothing from the other leaves.
    elementwise: ClassVar[bool] = False

    def needs(self, params: Any) -> Needs:
        return Needs(base=True, key=True)

    def merge(
        self, inputs: MergeInputs, params: Any, prepared: Any, placement: Placement
    ) -> MergeResult:
        assert inputs.key is not None and inputs.leaf_ids is not None
        key, ids = inputs.key, jax.tree.leaves(inputs.leaf_ids)
        out = merge_sparsified(
            inputs,
            params,
            lambda leaves, i: magprune(
                leaves,
                params.density,
                params.epsilon,
                key,
                ids[i],
                rescale=params.rescale,
            ),
        )
        return MergeResult(out, named_report(out, self.name))


DELLA = Della("della", DellaParameters)


def della(
    base: Params,
    models: Sequence[Params],
    *,
    density: Any,
    key: Array,
    epsilon: Any = 0.15,
    scale: Any = 1.0,
    weights: Any = None,
    sign_election: bool = True,
    rescale: bool = True,
    normalize: bool | None = None,
) -> Params:
    """DELLA (Deep et al., 2024): MAGPRUNE each task vector, then TIES's sign
    election and disjoint mean.

    .. math::

       p_i = 1 - \\rho + \\varepsilon - 2\\varepsilon\\,\\frac{r_i}{n - 1}, \\qquad
       \\hat\\tau_i = \\frac{b_i\\, \\tau_i}{1 - p_i}, \\quad b_i \\sim \\mathrm{Bernoulli}(1 - p_i)

    within each row (the last axis) of each leaf, r_i the entry's rank by
    magnitude from the smallest; then ``θ₀ + λ τ`` with τ the disjoint mean
    of the τ̂_m (or, ``sign_election=False``, ``Σ_m w_m τ̂_m``). See the
    module docstring for rows, ties and the draws.

    Values are checked before any work when concrete; traced ones are
    checked only under ``jax.experimental.checkify.checkify``
    (:func:`~mats_jax.checks.check_traced`).

    Values are checked before any work when concrete; traced ones (under an
    outer ``jax.jit``: NaN or Inf in models, weights or statistics,
    hyperparameters out of range, negative weights) are checked only when
    the call is wrapped in ``jax.experimental.checkify.checkify``, and pass
    unchecked otherwise (:func:`~mats_jax.checks.check_traced`).

    Args:
      base: pretrained parameters θ₀.
      models: fine-tuned parameters θ_m.
      density: ρ = 1 − p, the mean fraction kept, in (0, 1] (traced); one
        number, or one per model.
      key: a JAX PRNG key; a leaf's draws depend only on it, the leaf's path
        and the model's index.
      epsilon: ε, the half-width of the drop probabilities' range around p:
        each p_i must lie in [0, 1), so 0 ≤ ε ≤ 1 − density and ε < density
        (traced); one number, or one per model. Default 0.15 (mergekit's).
      scale: λ (mergekit's ``lambda``; traced).
      weights: per-model weights (default 1).
      sign_election: TIES's sign election and disjoint mean (the default);
        False: the weighted sum (mergekit's ``della_linear``).
      rescale: divide the kept entries by 1 − p_i (default).
      normalize: divide by the weights taking part; None (default): the
        disjoint mean with sign election, the plain weighted sum without.

    Returns:
      The merged parameters.

    Raises:
      MergeInputError: a parameter out of range (naming density and epsilon
        where their drop probabilities leave [0, 1)), or inputs that do not
        fit, before any work.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> base = {"w": jnp.zeros(3)}
      >>> models = [{"w": jnp.array([1.0, -2.0, 3.0])}, {"w": jnp.array([2.0, 1.0, -1.0])}]
      >>> della(base, models, density=1.0, epsilon=0.0, key=jax.random.key(0))["w"]
      Array([ 1.5, -2. ,  3. ], dtype=float32)
    """
    params = DELLA.parameters(
        density=density,
        epsilon=epsilon,
        scale=scale,
        sign_election=sign_election,
        rescale=rescale,
        normalize=normalize,
    )
    return run_in_memory(
        DELLA, params, base=base, models=models, weights=weights, key=key
    ).params
