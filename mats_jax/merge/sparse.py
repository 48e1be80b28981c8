"""TIES and DARE: sparsify each task vector, then combine (optionally by sign election).

As in mergekit, these methods are data: one :class:`SparseTaskArithmetic`
configured with a *sparsification* of each task vector (keep the top-k by
magnitude, or drop at random and rescale) and a *consensus* (a weighted sum,
or TIES's sign election with a disjoint mean). ``ties`` is magnitude trimming
with sign election; ``dare`` is random dropping with a weighted sum, or with
sign election (DARE-TIES).

Sign election and disjoint mean, for trimmed task vectors τ̂_m and weights w_m:

.. math::

   s = \\operatorname{sign}\\Big(\\sum_m w_m \\hat\\tau_m\\Big), \\qquad
   \\tau = \\frac{\\sum_m w_m \\hat\\tau_m [\\operatorname{sign}\\hat\\tau_m = s]}
               {\\sum_m w_m [\\operatorname{sign}\\hat\\tau_m = s]}, \\qquad
   \\theta = \\theta_0 + \\lambda \\tau

entrywise, with τ = 0 where no task agrees with s.

Examples:
  >>> import jax.numpy as jnp
  >>> from mats_jax import ties
  >>> base = {"w": jnp.zeros(3)}
  >>> models = [{"w": jnp.array([3.0, -1.0, 0.5])}, {"w": jnp.array([1.0, 2.0, -4.0])}]
  >>> ties(base, models, density=2 / 3)["w"]
  Array([ 3.,  2., -4.], dtype=float32)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp

from mats_jax.checks import MergeInputError, check_flag, check_fraction, check_number
from mats_jax.engine import run_in_memory
from mats_jax.merge.linear import add_scaled, named_report
from mats_jax.method import MergeInputs, MergeMethod, Needs
from mats_jax.select import MagnitudeQuantiles
from mats_jax.sharding import Placement
from mats_jax.solver.report import MergeResult
from mats_jax.tree import model_value, register_record, task_vectors
from mats_jax.tree import total as sum_of
from mats_jax.typing import Array, Params

__all__ = [
    "DARE",
    "TIES",
    "DareParameters",
    "SparseTaskArithmetic",
    "TiesParameters",
    "combine",
    "dare",
    "drop_at_random",
    "merge_sparsified",
    "ties",
    "trim_below",
]

Trim = Literal["global", "per_leaf"]


@register_record
@dataclasses.dataclass(frozen=True)
class TiesParameters:
    """TIES's parameters.

    Attributes:
      density: the fraction k of each task vector kept, in (0, 1] (traced);
        one for all models or one per model (mergekit's per-model
        ``density``).
      scale: λ applied to the merged task vector (traced).
      trim: ``"global"`` (top-k over the whole model, as the TIES paper) or
        ``"per_leaf"`` (top-k within each leaf, as mergekit).
      normalize: the disjoint mean (True, the paper's); False sums the
        agreeing entries (mergekit's ``normalize: false``).
    """

    static_fields: ClassVar[tuple[str, ...]] = ("trim", "normalize")
    per_model_fields: ClassVar[tuple[str, ...]] = ("density",)
    sign_election: ClassVar[bool] = True
    density: Any
    scale: Any = 1.0
    trim: Trim = "global"
    normalize: bool = True

    def __post_init__(self) -> None:
        check_flag("normalize", self.normalize)
        check_fraction(
            "density",
            self.density,
            include_zero=False,
            include_one=True,
            per_model=True,
        )
        check_number("scale", self.scale)
        if self.trim not in ("global", "per_leaf"):
            raise MergeInputError(
                f"trim must be 'global' or 'per_leaf', got {self.trim!r}"
            )


@register_record
@dataclasses.dataclass(frozen=True)
class DareParameters:
    """DARE's parameters.

    Attributes:
      drop_rate: p, the probability of dropping an entry, in [0, 1) (traced);
        one for all models or one per model.
      scale: λ (traced).
      sign_election: combine by sign election and disjoint mean (DARE-TIES).
      rescale: divide the kept entries by 1 − p (DARE's rescaling, the
        default); ``False`` keeps them as they are (mergekit's
        ``rescale: false``).
      normalize: divide by the weights taking part (see :func:`combine`);
        None (default): the disjoint mean with sign election, the plain sum
        without.
    """

    static_fields: ClassVar[tuple[str, ...]] = ("sign_election", "rescale", "normalize")
    per_model_fields: ClassVar[tuple[str, ...]] = ("drop_rate",)
    drop_rate: Any
    scale: Any = 1.0
    sign_election: bool = False
    rescale: bool = True
    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.normalize is not None:
            check_flag("normalize", self.normalize)
        check_fraction(
            "drop_rate",
            self.drop_rate,
            include_zero=True,
            include_one=False,
            per_model=True,
        )
        check_number("scale", self.scale)
        check_flag("sign_election", self.sign_election)
        check_flag("rescale", self.rescale)


def trim_below(vectors: list[Array], thresholds: Array) -> list[Array]:
    """Keeps the entries of each model's vector whose magnitude reaches its threshold."""
    return [
        jnp.where(jnp.abs(v.astype(jnp.float32)) >= thresholds[m], v, 0)
        for m, v in enumerate(vectors)
    ]


def drop_at_random(
    vectors: list[Array],
    drop_rate: Any,
    key: Array,
    leaf_id: Array,
    *,
    rescale: bool = True,
) -> list[Array]:
    """Drops each entry with probability p and rescales the rest by 1/(1 − p)
    (unless ``rescale=False``); p is one rate or one per model.

    Model m's mask is drawn from ``fold_in(fold_in(key, leaf_id), m)``: it
    depends on the leaf's path and the model's index only.
    """
    leaf_key = jax.random.fold_in(key, leaf_id)
    out = []
    for m, v in enumerate(vectors):
        keep = 1.0 - jnp.asarray(model_value(drop_rate, m), jnp.float32)
        mask = jax.random.bernoulli(jax.random.fold_in(leaf_key, m), keep, v.shape)
        kept = v / keep.astype(v.dtype) if rescale else v
        out.append(jnp.where(mask, kept, 0))
    return out


def combine(
    vectors: list[Array],
    weights: Array,
    sign_election: bool,
    normalize: bool | None = None,
) -> Array:
    """Weighted sum, or TIES's sign election with a weighted disjoint mean.

    ``normalize`` divides by the weights that take part: Σ_m w_m without sign
    election, the agreeing models' weights with it (the disjoint mean).
    ``None`` is each combination's usual form: the plain weighted sum, and
    the disjoint mean. (mergekit's ``normalize``; its ``dare_ties`` and
    ``breadcrumbs_ties`` default to ``False``: the agreeing entries summed.)

    Examples:
      >>> import jax.numpy as jnp
      >>> vs, w = [jnp.array([1.0, 2.0]), jnp.array([3.0, -1.0])], jnp.ones(2)
      >>> combine(vs, w, sign_election=True), combine(vs, w, True, normalize=False)
      (Array([2., 2.], dtype=float32), Array([4., 2.], dtype=float32))
      >>> combine(vs, w, sign_election=False, normalize=True)
      Array([2. , 0.5], dtype=float32)
    """
    dtype = vectors[0].dtype
    ws = [weights[m].astype(dtype) for m in range(len(vectors))]
    total = sum_of(w * v for w, v in zip(ws, vectors, strict=True))
    if not sign_election:
        return total / sum_of(ws) if normalize else total
    sign = jnp.sign(total)
    agree = [(jnp.sign(v) == sign) & (v != 0) for v in vectors]
    numerator = sum_of(
        jnp.where(a, w * v, 0) for a, w, v in zip(agree, ws, vectors, strict=True)
    )
    if normalize is False:
        return numerator
    denominator = sum_of(jnp.where(a, w, 0) for a, w in zip(agree, ws, strict=True))
    return jnp.where(
        denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1), 0
    )


def merge_sparsified(
    inputs: MergeInputs,
    params: Any,
    sparsify: Callable[[list[Array], int], list[Array]],
) -> Params:
    """Per leaf i, ``θ₀ + λ · combine(sparsify(τ_1 … τ_M, i))``: the shape every
    sparsifying merge shares (TIES, DARE, Breadcrumbs, DELLA), with the
    parameters' ``sign_election``, ``normalize`` and ``scale``.

    Args:
      inputs: the leaves to merge (base and weights present).
      params: a parameters record with those three fields.
      sparsify: one leaf's M task vectors and the leaf's index → the kept ones.
    """
    assert inputs.weights is not None
    vectors = [jax.tree.leaves(t) for t in task_vectors(inputs.base, inputs.models)]
    base_leaves, treedef = jax.tree.flatten(inputs.base)
    merged = []
    for i, (b, leaves) in enumerate(
        zip(base_leaves, zip(*vectors, strict=True), strict=True)
    ):
        kept = sparsify(list(leaves), i)
        tau = combine(kept, inputs.weights, params.sign_election, params.normalize)
        merged.append(add_scaled(b, tau, params.scale))
    return jax.tree.unflatten(treedef, merged)


Sparsify = Callable[[list[Array], Any, Any, MergeInputs, int], list[Array]]


def _by_magnitude(
    vectors: list[Array], params: Any, thresholds: Any, inputs: MergeInputs, i: int
) -> list[Array]:
    return trim_below(vectors, thresholds)


def _at_random(
    vectors: list[Array], params: Any, prepared: Any, inputs: MergeInputs, i: int
) -> list[Array]:
    assert inputs.key is not None and inputs.leaf_ids is not None
    leaf_id = jax.tree.leaves(inputs.leaf_ids)[i]
    return drop_at_random(
        vectors, params.drop_rate, inputs.key, leaf_id, rescale=params.rescale
    )


@dataclasses.dataclass(frozen=True)
class SparseTaskArithmetic(MergeMethod):
    """Task arithmetic over sparsified task vectors, combined by a consensus rule.

    Attributes:
      sparsify: ``"magnitude"`` (keep entries at or above the whole-model or
        per-leaf k-th magnitude: the engine computes the threshold) or
        ``"random"`` (drop and rescale, with the PRNG key).

    The consensus is the parameters' ``sign_election``.
    """

    sparsify: Literal["magnitude", "random"] = "magnitude"

    leaf_sized_temporaries: ClassVar[bool] = True

    @property
    def elementwise(self) -> bool:  # type: ignore[override]
        # Random masks are drawn for a whole leaf's shape.
        return self.sparsify == "magnitude"

    def needs(self, params: Any) -> Needs:
        return Needs(base=True, key=self.sparsify == "random")

    def whole_model_pass(self, params: Any) -> MagnitudeQuantiles | None:
        if self.sparsify != "magnitude":
            return None
        return MagnitudeQuantiles(params.density, per_leaf=params.trim == "per_leaf")

    def merge(
        self, inputs: MergeInputs, params: Any, prepared: Any, placement: Placement
    ) -> MergeResult:
        thresholds = jax.tree.leaves(prepared) if prepared is not None else None
        sparsify: Sparsify = (
            _by_magnitude if self.sparsify == "magnitude" else _at_random
        )
        out = merge_sparsified(
            inputs,
            params,
            lambda leaves, i: sparsify(
                leaves,
                params,
                thresholds[i] if thresholds is not None else None,
                inputs,
                i,
            ),
        )
        return MergeResult(out, named_report(out, self.name))


TIES = SparseTaskArithmetic("ties", TiesParameters, sparsify="magnitude")
DARE = SparseTaskArithmetic("dare", DareParameters, sparsify="random")


def ties(
    base: Params,
    models: Sequence[Params],
    *,
    density: Any,
    scale: Any = 1.0,
    weights: Any = None,
    trim: Trim = "global",
    normalize: bool = True,
) -> Params:
    """TIES merging (Yadav et al., 2023): trim, elect sign, disjoint mean.

    Each task vector keeps its top-k entries by magnitude (``k = ⌈density · N⌉``;
    entries tied with the k-th magnitude are all kept), a sign is elected per
    entry from the weighted sum of the trimmed vectors, and the entries that
    agree with it are averaged (weighted by w_m); see the module docstring.

    Values are checked before any work when concrete; traced ones (under an
    outer ``jax.jit``: NaN or Inf in models, weights or statistics,
    hyperparameters out of range, negative weights) are checked only when
    the call is wrapped in ``jax.experimental.checkify.checkify``, and pass
    unchecked otherwise (:func:`~mats_jax.checks.check_traced`).

    Args:
      base: pretrained parameters θ₀.
      models: fine-tuned parameters θ_m.
      density: the fraction k of each task vector kept, in (0, 1] (traced);
        one number, or one per model (``[0.2, 0.5]``: each model's own k).
      scale: λ applied to the merged task vector (traced).
      weights: per-model weights (default 1).
      trim: ``"global"`` (the default, as in the TIES paper: the top-k of each
        task vector over the whole model, found by :func:`~mats_jax.magnitude_threshold`
        without concatenating the model) or ``"per_leaf"`` (top-k within each
        leaf, as mergekit does).
      normalize: the disjoint mean (default); False sums the agreeing
        entries (mergekit's ``normalize: false``).

    Returns:
      The merged parameters.

    Examples:
      >>> import jax.numpy as jnp
      >>> base = {"w": jnp.zeros(2)}
      >>> ties(base, [{"w": jnp.array([1.0, -2.0])}], density=0.5)["w"]
      Array([ 0., -2.], dtype=float32)
    """
    params = TIES.parameters(
        density=density, scale=scale, trim=trim, normalize=normalize
    )
    return run_in_memory(TIES, params, base=base, models=models, weights=weights).params


def dare(
    base: Params,
    models: Sequence[Params],
    *,
    drop_rate: Any,
    key: Array,
    scale: Any = 1.0,
    weights: Any = None,
    sign_election: bool = False,
    rescale: bool = True,
    normalize: bool | None = None,
) -> Params:
    """DARE (Yu et al., 2024): drop task-vector entries at random, rescale the rest.

    .. math:: \\hat\\tau_m = \\frac{\\tau_m \\odot b_m}{1 - p}, \\quad b_m \\sim \\mathrm{Bernoulli}(1 - p)

    then ``θ₀ + λ Σ_m w_m τ̂_m``, or, with ``sign_election=True`` (DARE-TIES),
    TIES's sign election and disjoint mean over the τ̂_m.

    Values are checked before any work when concrete; traced ones (under an
    outer ``jax.jit``: NaN or Inf in models, weights or statistics,
    hyperparameters out of range, negative weights) are checked only when
    the call is wrapped in ``jax.experimental.checkify.checkify``, and pass
    unchecked otherwise (:func:`~mats_jax.checks.check_traced`).

    Args:
      base: pretrained parameters θ₀.
      models: fine-tuned parameters θ_m.
      drop_rate: p, the probability of dropping an entry, in [0, 1): p = 1
        would drop everything and divide by zero (traced); one number, or
        one per model.
      key: a JAX PRNG key; a leaf's masks depend only on it, the leaf's path
        and the model's index, so a merge streamed from checkpoints draws the
        same masks.
      scale: λ (traced).
      weights: per-model weights (default 1).
      sign_election: combine by sign election and disjoint mean (DARE-TIES).
      rescale: divide the kept entries by 1 − p (default); ``False`` keeps
        them unscaled (mergekit's ``rescale: false``).
      normalize: divide by the weights taking part; None (default): the
        disjoint mean with sign election, the plain weighted sum without
        (mergekit's ``dare_ties`` sums: ``normalize=False``).

    Returns:
      The merged parameters.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> base = {"w": jnp.zeros(4)}
      >>> out = dare(base, [{"w": jnp.ones(4)}], drop_rate=0.5, key=jax.random.key(0))
      >>> sorted(set(out["w"].tolist())) in ([0.0, 2.0], [2.0], [0.0])
      True
    """
    params = DARE.parameters(
        drop_rate=drop_rate,
        scale=scale,
        sign_election=sign_election,
        rescale=rescale,
        normalize=normalize,
    )
    return run_in_memory(
        DARE, params, base=base, models=models, weights=weights, key=key
    ).params
