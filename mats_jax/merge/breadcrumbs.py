"""Model Breadcrumbs (Davari and Belilovsky, 2023): drop each task vector's
outliers and its small entries, keep the band between, then task arithmetic.

Per leaf of N entries and per model m, rank the entries of ``|τ_m|`` from the
largest; with

.. math::

   k_m = \\operatorname{clip}(\\lceil \\rho_m N \\rceil, 1, N), \\qquad
   d_m = \\operatorname{clip}(\\lceil \\gamma_m N \\rceil, 0, N - k_m)

(ρ the ``density``, γ the ``gamma``; both products in float32, as TIES's
:func:`~mats_jax.keep_count`), the d_m largest magnitudes are dropped as
outliers, the next k_m are kept and the rest are zeroed:

.. math::

   \\hat\\tau_m = \\tau_m \\odot [\\, t^{\\mathrm{low}}_m \\le |\\tau_m| \\le t^{\\mathrm{high}}_m \\,],
   \\qquad t^{\\mathrm{high}}_m = |\\tau_m|_{(d_m + 1)}, \\quad
   t^{\\mathrm{low}}_m = |\\tau_m|_{(d_m + k_m)}

with ``|τ|_(r)`` the r-th largest magnitude. With distinct magnitudes that
keeps exactly the ranks d_m + 1 … d_m + k_m; entries tied in magnitude are
kept or dropped together, and a tie at either end of the band is kept whole
(as TIES keeps every entry tied with its k-th), so ties only ever keep more
than k_m entries, never fewer. Where the ceilings would overlap
(``d_m + k_m > N``, e.g. ρ = 0.5 and γ = 0.5 of 3 entries) the count dropped
gives way. The merge is then task arithmetic,

.. math:: \\theta = \\theta_0 + \\lambda \\sum_m w_m \\hat\\tau_m ,

or, with ``sign_election=True`` (mergekit's ``breadcrumbs_ties``), TIES's sign
election and disjoint mean over the τ̂_m (:func:`~mats_jax.merge.sparse.combine`).

The two magnitudes of each leaf and model come from the exact radix select
TIES uses (:func:`~mats_jax.select.magnitude_thresholds`), over that leaf
only: no whole-model pass, so a merge streamed one leaf at a time keeps what
the in-memory merge keeps.

Examples:
  >>> import jax.numpy as jnp
  >>> from mats_jax import breadcrumbs
  >>> base = {"w": jnp.zeros(5)}
  >>> tau = jnp.array([5.0, -4.0, 3.0, -2.0, 1.0])
  >>> # drop the top 20% (5.0), keep the next 40% (-4.0 and 3.0)
  >>> breadcrumbs(base, [{"w": tau}], density=0.4, gamma=0.2)["w"]
  Array([ 0., -4.,  3.,  0.,  0.], dtype=float32)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

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
from mats_jax.select import keep_count, magnitude_thresholds
from mats_jax.sharding import Placement
from mats_jax.solver.report import MergeResult
from mats_jax.tree import register_record
from mats_jax.typing import Array, Params

__all__ = [
    "BREADCRUMBS",
    "Breadcrumbs",
    "BreadcrumbsParameters",
    "breadcrumb_counts",
    "breadcrumbs",
    "trim_outliers",
]

_SUM_SLACK = 1e-12
"""How far density + gamma may exceed 1 by rounding (0.9 + 0.1 in binary)."""


def _check_band(density: Any, gamma: Any) -> None:
    """density + gamma ≤ 1, per model where either is given per model."""
    if any(is_traced(x) for x in jax.tree.leaves((density, gamma))):
        check_traced(
            "density + gamma",
            jnp.asarray(density) + jnp.asarray(gamma),
            lambda x: x <= 1 + _SUM_SLACK,
            "at most 1",
        )
        return
    d, g = np.asarray(density, np.float64), np.asarray(gamma, np.float64)
    if d.ndim and g.ndim and d.shape != g.shape:
        return  # the engine names the one whose length is not the model count
    for i, (di, gi) in enumerate(
        zip(*(a.ravel() for a in np.broadcast_arrays(d, g)), strict=True)
    ):
        if di + gi > 1 + _SUM_SLACK:
            at = f"[{i}]" if d.ndim or g.ndim else ""
            raise MergeInputError(
                f"density{at if d.ndim else ''} + gamma{at if g.ndim else ''} "
                f"must be at most 1 (gamma is the top fraction dropped, density the "
                f"fraction kept below it), got density={di:g} + gamma={gi:g} = "
                f"{di + gi:g}: lower one of them"
            )


@register_record
@dataclasses.dataclass(frozen=True)
class BreadcrumbsParameters:
    """Model Breadcrumbs's parameters.

    Attributes:
      density: ρ, the fraction of each task vector kept, in (0, 1] (traced);
        one for all models or one per model.
      gamma: γ, the fraction of largest magnitudes dropped as outliers, in
        [0, 1), with density + gamma ≤ 1 (traced); one or one per model.
        Default 0.01, mergekit's.
      scale: λ (traced).
      sign_election: combine by TIES's sign election and disjoint mean
        (mergekit's ``breadcrumbs_ties``) instead of the weighted sum.
      normalize: divide by the weights taking part (see
        :func:`~mats_jax.merge.sparse.combine`); None (default): the
        disjoint mean with sign election, the plain sum without.
    """

    static_fields: ClassVar[tuple[str, ...]] = ("sign_election", "normalize")
    per_model_fields: ClassVar[tuple[str, ...]] = ("density", "gamma")
    density: Any
    gamma: Any = 0.01
    scale: Any = 1.0
    sign_election: bool = False
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
            "gamma", self.gamma, include_zero=True, include_one=False, per_model=True
        )
        _check_band(self.density, self.gamma)
        check_number("scale", self.scale)
        check_flag("sign_election", self.sign_election)
        if self.normalize is not None:
            check_flag("normalize", self.normalize)


def breadcrumb_counts(density: Any, gamma: Any, size: int) -> tuple[Array, Array]:
    """``(d, k)``: how many of a leaf's ``size`` largest magnitudes are dropped
    as outliers, and how many below them are kept (module docstring).

    Examples:
      >>> [int(c) for c in breadcrumb_counts(0.4, 0.2, 5)]
      [1, 2]
      >>> [int(c) for c in breadcrumb_counts(0.5, 0.5, 3)]  # 2 + 2 > 3: drop 1
      [1, 2]
      >>> [int(c) for c in breadcrumb_counts(0.5, 0.01, 1)]  # one entry: kept
      [0, 1]
    """
    kept = keep_count(density, size, jnp)
    dropped = jnp.ceil(jnp.float32(gamma) * jnp.float32(size)).astype(jnp.int32)
    return jnp.clip(dropped, 0, size - kept), kept


def trim_outliers(
    vectors: Sequence[Array], density: Any, gamma: Any, mesh: Mesh | None = None
) -> list[Array]:
    """Each model's vector with its outliers and its small entries zeroed.

    Args:
      vectors: the M task vectors of one leaf.
      density, gamma: one value or one per model (see the module docstring).
      mesh: the mesh the vectors are sharded on, or None.

    Returns:
      The M band-kept vectors, each in its own dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> v = jnp.array([1.0, -3.0, 3.0, 2.0])
      >>> trim_outliers([v], 0.25, 0.25)[0]  # the tied 3s sit in the band
      Array([ 0., -3.,  3.,  0.], dtype=float32)
    """
    size = vectors[0].size
    counts = [
        breadcrumb_counts(model_value(density, m), model_value(gamma, m), size)
        for m in range(len(vectors))
    ]
    ranks = jnp.stack([d + 1 for d, _ in counts] + [d + k for d, k in counts])
    # One radix select for both ends of every model's band.
    ends = magnitude_thresholds([[v] for v in vectors] * 2, ranks, mesh=mesh)
    high, low = ends[: len(vectors)], ends[len(vectors) :]
    out = []
    for m, v in enumerate(vectors):
        magnitude = jnp.abs(v.astype(jnp.float32))
        out.append(jnp.where((magnitude >= low[m]) & (magnitude <= high[m]), v, 0))
    return out


@dataclasses.dataclass(frozen=True)
class Breadcrumbs(MergeMethod):
    """Model Breadcrumbs, per leaf (see the module docstring)."""

    # A leaf's band depends on all its entries (their ranks), so the leaf is
    # merged whole; it needs nothing from the other leaves.
    elementwise: ClassVar[bool] = False

    def needs(self, params: Any) -> Needs:
        return Needs(base=True)

    def merge(
        self, inputs: MergeInputs, params: Any, prepared: Any, placement: Placement
    ) -> MergeResult:
        out = merge_sparsified(
            inputs,
            params,
            lambda leaves, i: trim_outliers(
                leaves, params.density, params.gamma, placement.mesh
            ),
        )
        return MergeResult(out, named_report(out, self.name))


BREADCRUMBS = Breadcrumbs("breadcrumbs", BreadcrumbsParameters)


def breadcrumbs(
    base: Params,
    models: Sequence[Params],
    *,
    density: Any,
    gamma: Any = 0.01,
    scale: Any = 1.0,
    weights: Any = None,
    sign_election: bool = False,
    normalize: bool | None = None,
) -> Params:
    """Model Breadcrumbs (Davari and Belilovsky, 2023): per leaf, drop each task
    vector's largest fraction γ of magnitudes (outliers) and keep the next
    fraction ρ, then task arithmetic (or TIES's combination).

    .. math:: \\theta = \\theta_0 + \\lambda \\sum_m w_m \\hat\\tau_m

    with τ̂_m the band of τ_m between its (d + 1)-th and (d + k)-th largest
    magnitudes, d = ⌈γN⌉ and k = ⌈ρN⌉ of the leaf's N entries; ties keep
    whole (see the module docstring for the counts and the ties).

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
      density: ρ, the fraction kept, in (0, 1] (traced); one number, or one
        per model.
      gamma: γ, the top fraction dropped, in [0, 1) with density + gamma ≤ 1
        (traced); one number, or one per model. Default 0.01 (mergekit's).
      scale: λ (traced).
      weights: per-model weights (default 1).
      sign_election: TIES's sign election and disjoint mean over the τ̂_m
        (mergekit's ``breadcrumbs_ties``).
      normalize: divide by the weights taking part; None (default): the
        disjoint mean with sign election, the plain weighted sum without
        (mergekit's ``breadcrumbs_ties`` sums: ``normalize=False``).

    Returns:
      The merged parameters.

    Raises:
      MergeInputError: a parameter out of range, density + gamma > 1, or
        inputs that do not fit, before any work.

    Examples:
      >>> import jax.numpy as jnp
      >>> base = {"w": jnp.zeros(4)}
      >>> models = [{"w": jnp.array([4.0, 1.0, -2.0, 0.5])},
      ...           {"w": jnp.array([-1.0, 3.0, 2.0, 0.25])}]
      >>> breadcrumbs(base, models, density=0.5, gamma=0.25)["w"]
      Array([-1.,  1.,  0.,  0.], dtype=float32)
    """
    params = BREADCRUMBS.parameters(
        density=density,
        gamma=gamma,
        scale=scale,
        sign_election=sign_election,
        normalize=normalize,
    )
    return run_in_memory(
        BREADCRUMBS, params, base=base, models=models, weights=weights
    ).params
