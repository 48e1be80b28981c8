"""TSV-M, ISO-C and ISO-CTS: merges that rebuild each matrix from singular vectors.

Each takes the task matrices ``Δ_m = w_m (θ_m − θ_0)`` of a leaf (the weight
scales the task vector before anything else, as FusionBench's per-model
``alpha`` list does), decomposes them with the singular value decomposition
and returns ``θ = θ_0 + α Δ`` for a rebuilt ``Δ``. With ``r = min(n, d)`` for
an ``(n, d)`` matrix:

**TSV-M** (Task Singular Vectors merging, Gargiulo et al., CVPR 2025). Each
task keeps its top ``k`` singular triplets ``Δ_m ≈ U_m Σ_m V_mᵀ`` (``k = ⌊r/M⌋``,
a 1/M share of the rank, or ``⌊share · r⌋``; at least 1). The kept bases are
concatenated and replaced by their nearest orthonormal bases, which removes
the interference between tasks' directions:

.. math::

   U = [U_1 \\cdots U_M], \\quad V = [V_1 \\cdots V_M], \\quad
   \\Sigma = \\operatorname{diag}(\\Sigma_1, \\dots, \\Sigma_M), \\qquad
   \\Delta = \\operatorname{orth}(U)\\, \\Sigma\\, \\operatorname{orth}(V)^\\top

**ISO-C** (Isotropic merging in the common subspace, Marczak et al., ICML
2025). The sum of the task matrices, with its spectrum made flat: every
singular value is replaced by their mean over all ``r`` of them:

.. math::

   \\sum_m \\Delta_m = U S V^\\top, \\qquad
   \\bar\\sigma = \\frac{1}{r} \\sum_{i=1}^{r} s_i, \\qquad
   \\Delta = \\bar\\sigma\\, U V^\\top

**ISO-CTS** (the same paper, common and task-specific subspaces). The top
``k_c`` left singular vectors ``U_c`` of the sum span the common subspace;
each task adds the top ``d`` singular triplets of its matrix with that
subspace projected out, ``(I − U_c U_cᵀ) Δ_m``; the concatenated bases are
orthogonalised and the spectrum made flat, the mean taken over the ``r =
k_c + M d`` kept singular values:

.. math::

   U = [U_c\\; U_1 \\cdots U_M], \\quad V = [V_c\\; V_1 \\cdots V_M], \\qquad
   \\Delta = \\bar\\sigma\\, \\operatorname{orth}(U) \\operatorname{orth}(V)^\\top

with ``k_c = r − M d`` and ``d = round((r − ⌊f r⌋) / M)`` for the common
fraction ``f`` (the reference's rule: the task-specific part divides evenly),
``d ≤ ⌊r/M⌋``.

``orth(X) = P Qᵀ`` for ``X = P Σ Qᵀ`` (:func:`nearest_orthonormal`) is the
nearest matrix with orthonormal columns (or rows, for a wide ``X``). Where
``X`` is rank-deficient, as when two tasks bring the same direction (merging
copies of one model) or a task matrix has fewer than ``k`` non-zero singular
values, ``P Qᵀ`` is not unique: the singular vectors of a zero singular value
are any orthonormal completion, and the reference implementations add
whatever their SVD routine returns. Here singular values at or below the
numerical-rank cutoff (numpy's ``matrix_rank`` rule: ``max(n, d) · ε`` times
the largest) count as zero, and their directions are left out everywhere:
``orth`` is ``P Qᵀ`` on the range of ``X`` (the polar factor with ``X``'s own
range and null space), a triplet of a task matrix with a zero singular
value is dropped, and ISO-C's ``U Vᵀ`` spans the range of the sum only
(with ``σ̄`` still the mean over all ``r``). TSV-M judges the range of its
bases by their accuracy: a computed singular vector of ``σ_i`` carries
rounding of about ``ε σ_1 / σ_i`` outside its task's range (``σ_1`` that
task's largest), so ``U`` and ``V`` are orthogonalised on the numerical
range of ``[U_1 Σ_1 / σ_1^{(1)} ⋯ U_M Σ_M / σ_1^{(M)}]`` (and so for
``V``), whose columns are accurate to ``ε``. Otherwise two copies of one
task matrix with a small ``σ_r`` would bring a direction of that rounding
alone, above the cutoff of ``U`` itself, and ``orth`` would make it a unit
one. On full-rank inputs this is exactly the papers' formula.

Leaves that are not matrices (biases, norms' scales, scalars) take the mean
of the (weighted) task vectors, ``θ_0 + α (1/M) Σ_m w_m τ_m``, as the
reference code of both papers does (with α = 1 and equal weights, the
average of the models); their report says ``fallback:average``. So the
weights enter everywhere as a scale of each task vector before the method:
scaling every weight by ``c`` is scaling α by ``c`` (the merge is
homogeneous in the task vectors), and a zero weight is a task vector of
zeros, which still counts in ``M``. Leaves of three or more axes are a stack of
matrices over their leading axes (the last two are the matrix: Flax's
``(in, out)`` kernels stacked by ``nn.scan``, or a convolution's kernel per
spatial tap), each merged on its own; with ``stacked="fallback"`` they take
the fallback instead (the papers' code merges only 2-D tensors). A recipe's
``overrides`` send other leaves to another rule (the reference code leaves
embeddings and output heads to the mean).

Cost: per matrix of ``(n, d)``, TSV-M takes M + 4 SVDs (one per task, then
two of each ``(n, Mk)`` and ``(d, Mk)`` basis: its range, then its polar
factor on that range), ISO-C one, ISO-CTS M + 3;
each thin SVD costs ``O(n d min(n, d))`` and holds a few matrices of the
leaf's size. They run with ``jnp.linalg.svd`` (LAPACK on CPU, cuSOLVER on
GPU) in float32 (float64 for float64 leaves), under
``jax.default_matmul_precision("highest")`` so a GPU's matmuls do not drop to
TF32; each leaf is returned in its dtype. The cubic cost makes the largest
matrices (embeddings, output heads) dominate: send them to another rule by an
override where they do not need the method.

Examples:
  >>> import jax.numpy as jnp
  >>> from mats_jax import iso_c, tsv_m
  >>> base = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
  >>> models = [{"w": jnp.array([[2.0, 0.0], [0.0, 0.0]]), "b": jnp.array([1.0, 0.0])},
  ...           {"w": jnp.array([[0.0, 0.0], [0.0, 1.0]]), "b": jnp.array([0.0, 1.0])}]
  >>> tsv_m(base, models)["w"]  # each task's top direction, already orthogonal
  Array([[2., 0.],
         [0., 1.]], dtype=float32)
  >>> iso_c(base, models)["w"]  # the sum's singular values 2 and 1 made 1.5
  Array([[1.5, 0. ],
         [0. , 1.5]], dtype=float32)
  >>> iso_c(base, models)["b"]  # not a matrix: the mean of the task vectors
  Array([0.5, 0.5], dtype=float32)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from mats_jax.checks import MergeInputError, check_fraction, check_number
from mats_jax.engine import run_in_memory
from mats_jax.merge.linear import add_scaled
from mats_jax.method import MergeInputs, MergeMethod, Needs
from mats_jax.sharding import Placement
from mats_jax.solver.report import LeafReport, MergeResult
from mats_jax.tree import register_record, task_vectors
from mats_jax.tree import total as sum_of
from mats_jax.typing import Array, Params

__all__ = [
    "FALLBACK",
    "ISO_C",
    "ISO_CTS",
    "TSV_M",
    "IsoCParameters",
    "IsoCtsParameters",
    "SvdMerge",
    "TsvMParameters",
    "is_merged_as_matrices",
    "iso_c",
    "iso_c_matrix",
    "iso_cts",
    "iso_cts_matrix",
    "iso_cts_sizes",
    "nearest_orthonormal",
    "rank_cutoff",
    "tsv_m",
    "tsv_m_matrix",
    "tsv_m_rank",
]

Stacked = Literal["matrices", "fallback"]

FALLBACK = "fallback:average"
"""The report's solver for leaves the SVD methods do not merge as matrices."""


def _check_stacked(stacked: Any) -> None:
    if stacked not in ("matrices", "fallback"):
        raise MergeInputError(
            f"stacked must be 'matrices' or 'fallback', got {stacked!r}"
        )


def _check_static_fraction(name: str, value: Any, include_zero: bool) -> None:
    # These fractions set how many singular vectors are kept, a shape: they
    # must be known when the merge is traced.
    if isinstance(value, jax.Array) or hasattr(value, "aval"):
        raise MergeInputError(
            f"{name} must be a Python number (it sets how many singular vectors "
            f"are kept, a shape), got {type(value).__name__}"
        )
    check_fraction(name, value, include_zero=include_zero, include_one=True)


@register_record
@dataclasses.dataclass(frozen=True)
class TsvMParameters:
    """TSV-M's parameters.

    Attributes:
      scale: α applied to the merged task matrix (traced).
      share: the fraction of each task matrix's rank ``r = min(n, d)`` it
        keeps, in (0, 1]: ``k = ⌊share · r⌋`` singular triplets (at least 1).
        None (the default, the paper's): ``k = ⌊r / M⌋``, so the M tasks
        together fill at most the rank.
      stacked: leaves of three or more axes are ``"matrices"`` stacked over
        the leading axes, each merged alone, or take the ``"fallback"``.
    """

    static_fields: ClassVar[tuple[str, ...]] = ("share", "stacked")
    scale: Any = 1.0
    share: float | None = None
    stacked: Stacked = "matrices"

    def __post_init__(self) -> None:
        check_number("scale", self.scale)
        if self.share is not None:
            _check_static_fraction("share", self.share, include_zero=False)
            object.__setattr__(self, "share", float(self.share))
        _check_stacked(self.stacked)


@register_record
@dataclasses.dataclass(frozen=True)
class IsoCParameters:
    """ISO-C's parameters.

    Attributes:
      scale: α applied to the merged task matrix (traced).
      stacked: as :class:`TsvMParameters`.
    """

    static_fields: ClassVar[tuple[str, ...]] = ("stacked",)
    scale: Any = 1.0
    stacked: Stacked = "matrices"

    def __post_init__(self) -> None:
        check_number("scale", self.scale)
        _check_stacked(self.stacked)


@register_record
@dataclasses.dataclass(frozen=True)
class IsoCtsParameters:
    """ISO-CTS's parameters.

    Attributes:
      scale: α applied to the merged task matrix (traced).
      common_fraction: f, the share of the rank given to the common subspace
        before the task-specific part is rounded to divide evenly among the
        tasks (:func:`iso_cts_sizes`), in [0, 1]; 0.8 is the reference's
        default, 1 is ISO-C.
      stacked: as :class:`TsvMParameters`.
    """

    static_fields: ClassVar[tuple[str, ...]] = ("common_fraction", "stacked")
    scale: Any = 1.0
    common_fraction: float = 0.8
    stacked: Stacked = "matrices"

    def __post_init__(self) -> None:
        check_number("scale", self.scale)
        _check_static_fraction(
            "common_fraction", self.common_fraction, include_zero=True
        )
        object.__setattr__(self, "common_fraction", float(self.common_fraction))
        _check_stacked(self.stacked)


# --------------------------------------------------------------------------
# One matrix
# --------------------------------------------------------------------------


def rank_cutoff(
    singular_values: Array, shape: Sequence[int], scale: Any = None
) -> Array:
    """The singular value at or below which a matrix of ``shape`` counts it as zero.

    numpy's ``matrix_rank`` rule, ``max(shape) · ε · scale``, with ``scale``
    the largest singular value by default; ε of the values' dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> s = jnp.linalg.svd(jnp.array([[1.0, 1.0], [1.0, 1.0]]), compute_uv=False)
      >>> (s > rank_cutoff(s, (2, 2))).tolist()  # rank 1
      [True, False]
    """
    eps = float(np.finfo(singular_values.dtype).eps)
    top = jnp.max(singular_values, initial=0.0) if scale is None else scale
    return max(shape) * eps * top


def nearest_orthonormal(x: Array) -> Array:
    """``P Qᵀ`` for ``x = P Σ Qᵀ``, on the range of ``x``: the nearest matrix to
    ``x`` with orthonormal columns (rows, if ``x`` is wide).

    Singular values at or below :func:`rank_cutoff` count as zero and their
    singular vectors are left out (any orthonormal completion would do for
    them, so the full ``P Qᵀ`` of a rank-deficient ``x`` is not unique); the
    result is then the polar factor with ``x``'s range and null space. A zero
    column of ``x`` gives a zero column.

    Examples:
      >>> import jax.numpy as jnp
      >>> nearest_orthonormal(jnp.array([[2.0, 0.0], [0.0, 0.5]]))
      Array([[1., 0.],
             [0., 1.]], dtype=float32)
      >>> # the same column twice: one direction, shared evenly
      >>> (nearest_orthonormal(jnp.array([[1.0, 1.0], [0.0, 0.0]])) ** 2).round(6)
      Array([[0.5, 0.5],
             [0. , 0. ]], dtype=float32)
    """
    p, s, qt = jnp.linalg.svd(x, full_matrices=False)
    kept = (s > rank_cutoff(s, x.shape)).astype(x.dtype)
    return (p * kept) @ qt


def _nearest_orthonormal_on_span(x: Array, scales: Array) -> Array:
    """:func:`nearest_orthonormal` of ``x`` on the numerical range of
    ``x · diag(scales)``: the range whose columns are scaled by their
    accuracy, so a direction that only the rounding of some column brings
    in counts as zero (a ``scales`` of zero drops its column)."""
    a, s, _ = jnp.linalg.svd(x * scales, full_matrices=False)
    span = a * (s > rank_cutoff(s, x.shape)).astype(x.dtype)
    return span @ nearest_orthonormal(span.T @ x)


def _top_triplets(
    delta: Array, k: int, cutoff_scale: Any = None
) -> tuple[Array, Array, Array]:
    """The top ``k`` singular triplets of ``delta`` as (U (n, k), s (k,), V (d, k)),
    with those of a zero singular value (:func:`rank_cutoff`) zeroed."""
    u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
    kept = s[:k] > rank_cutoff(s, delta.shape, cutoff_scale)
    alive = kept.astype(delta.dtype)
    return u[:, :k] * alive, s[:k] * alive, vt[:k].T * alive


def tsv_m_rank(rank: int, num_models: int, share: float | None = None) -> int:
    """How many singular triplets TSV-M keeps of each task matrix of rank ``rank``.

    ``⌊rank / M⌋`` (the paper's 1/M share) or ``⌊share · rank⌋``, at least 1
    and at most ``rank``. (The reference keeps 0, dropping the leaf's change
    altogether, when M exceeds the rank.)

    Examples:
      >>> tsv_m_rank(768, 8), tsv_m_rank(768, 8, share=0.5), tsv_m_rank(3, 4)
      (96, 384, 1)
    """
    if share is None:
        k = rank // num_models
    else:
        # 1e-9: a decimal share such as 0.29 is not exact in binary, and
        # 0.29 · 100 must keep 29, not 28.
        k = math.floor(share * rank + 1e-9)
    return max(1, min(rank, k))


def tsv_m_matrix(deltas: Sequence[Array], keep: int) -> Array:
    """TSV-M of one leaf's (n, d) task matrices (already weighted), in their dtype.

    Args:
      deltas: the M task matrices ``w_m Δ_m``.
      keep: k, the singular triplets kept per task (:func:`tsv_m_rank`).

    Returns:
      ``orth(U) Σ orth(V)ᵀ`` (module docstring).

    Examples:
      >>> import jax.numpy as jnp
      >>> a = jnp.array([[3.0, 0.0], [0.0, 1.0]])
      >>> tsv_m_matrix([a], keep=2)  # one task, its whole rank: itself
      Array([[3., 0.],
             [0., 1.]], dtype=float32)
    """
    parts = [_top_triplets(delta, keep) for delta in deltas]
    u = jnp.concatenate([p[0] for p in parts], axis=1)
    s = jnp.concatenate([p[1] for p in parts])
    v = jnp.concatenate([p[2] for p in parts], axis=1)
    # Each task's σ_i / σ_1: its singular vectors scaled to the accuracy
    # they are computed to (module docstring).
    relative = jnp.concatenate(
        [p[1] / jnp.where(p[1][0] > 0, p[1][0], 1) for p in parts]
    )
    u_orth = _nearest_orthonormal_on_span(u, relative)
    v_orth = _nearest_orthonormal_on_span(v, relative)
    return (u_orth * s) @ v_orth.T


def iso_c_matrix(deltas: Sequence[Array]) -> Array:
    """ISO-C of one leaf's (n, d) task matrices (already weighted).

    Returns:
      ``σ̄ U Vᵀ`` for the sum ``Σ_m Δ_m = U S Vᵀ``, σ̄ the mean of all
      ``min(n, d)`` singular values, ``U Vᵀ`` over the sum's range.

    Examples:
      >>> import jax.numpy as jnp
      >>> iso_c_matrix([jnp.array([[3.0, 0.0], [0.0, 1.0]])])
      Array([[2., 0.],
             [0., 2.]], dtype=float32)
    """
    total = sum_of(deltas)
    u, s, vt = jnp.linalg.svd(total, full_matrices=False)
    kept = (s > rank_cutoff(s, total.shape)).astype(total.dtype)
    return jnp.mean(s) * ((u * kept) @ vt)


def iso_cts_sizes(
    rank: int, num_models: int, common_fraction: float
) -> tuple[int, int]:
    """ISO-CTS's common size ``k_c`` and per-task size ``d`` for a matrix of rank ``rank``.

    ``d = round((rank − ⌊f · rank⌋) / M)`` (Python's round, as the reference),
    at most ``⌊rank / M⌋``, and ``k_c = rank − M d``: the common and the
    task-specific subspaces together fill the rank.

    Examples:
      >>> iso_cts_sizes(768, 8, 0.8)
      (616, 19)
      >>> iso_cts_sizes(4, 3, 0.0)  # round(4/3) = 1 per task
      (1, 1)
    """
    per_task = round((rank - math.floor(common_fraction * rank + 1e-9)) / num_models)
    per_task = min(per_task, rank // num_models)
    return rank - num_models * per_task, per_task


def iso_cts_matrix(deltas: Sequence[Array], common: int, per_task: int) -> Array:
    """ISO-CTS of one leaf's (n, d) task matrices (already weighted).

    Args:
      deltas: the M task matrices.
      common: k_c, the common subspace's size (:func:`iso_cts_sizes`).
      per_task: d, each task's directions outside it.

    Returns:
      ``σ̄ orth(U) orth(V)ᵀ`` (module docstring), σ̄ the mean of the
      ``k_c + M d`` kept singular values.

    Examples:
      >>> import jax.numpy as jnp
      >>> a = jnp.array([[3.0, 0.0], [0.0, 1.0]])
      >>> iso_cts_matrix([a], common=1, per_task=1)  # one task: ISO-C
      Array([[2., 0.],
             [0., 2.]], dtype=float32)
    """
    total = sum_of(deltas)
    u_c, s_c, v_c = _top_triplets(total, common)
    us, ss, vs = [u_c], [s_c], [v_c]
    if per_task > 0:
        for delta in deltas:
            outside = delta - u_c @ (u_c.T @ delta)
            # A task matrix inside the common subspace leaves rounding noise:
            # cut off relative to the task matrix, not to that noise.
            u, s, v = _top_triplets(outside, per_task, jnp.linalg.norm(delta))
            us.append(u)
            ss.append(s)
            vs.append(v)
    mean = jnp.sum(jnp.concatenate(ss)) / (common + len(deltas) * per_task)
    u_all = nearest_orthonormal(jnp.concatenate(us, axis=1))
    v_all = nearest_orthonormal(jnp.concatenate(vs, axis=1))
    return mean * (u_all @ v_all.T)


# --------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------


def is_merged_as_matrices(shape: Sequence[int], stacked: Stacked = "matrices") -> bool:
    """Whether a leaf of ``shape`` is merged as (a stack of) matrices, or takes
    the fallback (fewer than two axes, an empty matrix, or a stack with
    ``stacked="fallback"``).

    Examples:
      >>> is_merged_as_matrices((4, 3)), is_merged_as_matrices((4,))
      (True, False)
      >>> is_merged_as_matrices((2, 4, 3)), is_merged_as_matrices((2, 4, 3), "fallback")
      (True, False)
    """
    if len(shape) < 2 or min(shape[-2:]) == 0 or math.prod(shape) == 0:
        return False
    return len(shape) == 2 or stacked == "matrices"


MatrixRule = Callable[[Sequence[Array], Any, int], Array]


def _tsv_m_rule(deltas: Sequence[Array], params: Any, rank: int) -> Array:
    return tsv_m_matrix(deltas, tsv_m_rank(rank, len(deltas), params.share))


def _iso_c_rule(deltas: Sequence[Array], params: Any, rank: int) -> Array:
    return iso_c_matrix(deltas)


def _iso_cts_rule(deltas: Sequence[Array], params: Any, rank: int) -> Array:
    common, per_task = iso_cts_sizes(rank, len(deltas), params.common_fraction)
    return iso_cts_matrix(deltas, common, per_task)


_RULES: dict[str, MatrixRule] = {
    "tsv_m": _tsv_m_rule,
    "iso_c": _iso_c_rule,
    "iso_cts": _iso_cts_rule,
}


def _merge_stack(rule: MatrixRule, deltas: list[Array], params: Any) -> Array:
    """The rule over each matrix of a leaf (the last two axes), one after another.

    ``lax.map``, not ``vmap``: jaxlib's CPU SVD splits a batch over XLA's
    intra-op thread pool and blocks until the pieces are done, so two batched
    SVDs running at once on a 2-core machine hold both threads waiting and
    the process hangs (seen with TSV-M on a ViT with scanned blocks); one
    matrix per call runs on its own thread (as ``EighSequence`` does for
    ``eigh``).
    """
    shape = deltas[0].shape
    n, d = shape[-2:]
    flat = tuple(x.reshape(-1, n, d) for x in deltas)
    merged = jax.lax.map(lambda ms: rule(ms, params, min(n, d)), flat)
    return merged.reshape(shape)


@dataclasses.dataclass(frozen=True)
class SvdMerge(MergeMethod):
    """A merge that rebuilds each matrix leaf from singular vectors (module docstring).

    Attributes:
      rule: ``"tsv_m"``, ``"iso_c"`` or ``"iso_cts"``.

    Not elementwise (a merged entry depends on its whole matrix): the
    streaming engine merges each leaf whole.
    """

    rule: Literal["tsv_m", "iso_c", "iso_cts"] = "tsv_m"

    elementwise: ClassVar[bool] = False

    def needs(self, params: Any) -> Needs:
        return Needs(base=True)

    def merge(
        self, inputs: MergeInputs, params: Any, prepared: Any, placement: Placement
    ) -> MergeResult:
        weights = inputs.weights
        assert weights is not None and inputs.base is not None
        vectors = [jax.tree.leaves(t) for t in task_vectors(inputs.base, inputs.models)]
        base_leaves, treedef = jax.tree.flatten(inputs.base)
        rule = _RULES[self.rule]
        merged, reports = [], []
        for b, leaves in zip(base_leaves, zip(*vectors, strict=True), strict=True):
            dtype = leaves[0].dtype
            weighted = [weights[m].astype(dtype) * v for m, v in enumerate(leaves)]
            if is_merged_as_matrices(b.shape, params.stacked):
                with jax.default_matmul_precision("highest"):
                    delta = _merge_stack(rule, weighted, params)
                reports.append(LeafReport(solver=self.name))
            else:
                delta = sum_of(weighted) / len(weighted)
                reports.append(LeafReport(solver=FALLBACK))
            merged.append(add_scaled(b, delta, params.scale))
        return MergeResult(
            jax.tree.unflatten(treedef, merged), jax.tree.unflatten(treedef, reports)
        )


TSV_M = SvdMerge("tsv_m", TsvMParameters, rule="tsv_m")
ISO_C = SvdMerge("iso_c", IsoCParameters, rule="iso_c")
ISO_CTS = SvdMerge("iso_cts", IsoCtsParameters, rule="iso_cts")


def tsv_m(
    base: Params,
    models: Sequence[Params],
    *,
    scale: Any = 1.0,
    share: float | None = None,
    weights: Any = None,
    stacked: Stacked = "matrices",
) -> Params:
    """TSV-M (Gargiulo et al., 2025): each task's top singular vectors, the
    concatenated bases orthogonalised.

    .. math::

       \\theta = \\theta_0 + \\alpha\\, \\operatorname{orth}([U_1 \\cdots U_M])\\,
         \\operatorname{diag}(\\Sigma_1, \\dots, \\Sigma_M)\\,
         \\operatorname{orth}([V_1 \\cdots V_M])^\\top

    per matrix leaf, ``U_m Σ_m V_mᵀ`` the top-k truncated SVD of ``w_m (θ_m −
    θ_0)``; other leaves take the mean of the weighted task vectors (see the
    module docstring for the rank-deficient case and stacked leaves).

    Values are checked before any work when concrete; traced ones (under an
    outer ``jax.jit``: NaN or Inf in models, weights or statistics,
    hyperparameters out of range, negative weights) are checked only when
    the call is wrapped in ``jax.experimental.checkify.checkify``, and pass
    unchecked otherwise (:func:`~mats_jax.checks.check_traced`).

    Args:
      base: the pretrained parameters θ₀.
      models: the fine-tuned parameters θ_m.
      scale: α (traced); the paper uses 1.
      share: the fraction of each task matrix's rank kept, in (0, 1]; None:
        ``⌊r / M⌋`` triplets (:func:`tsv_m_rank`).
      weights: w_m, scaling each task vector first (default 1).
      stacked: ``"matrices"`` (leading axes a stack of matrices) or
        ``"fallback"`` for leaves of three or more axes.

    Returns:
      The merged parameters, each leaf in its dtype.

    References:
      Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri and Rodolà,
      "Task Singular Vectors: Reducing Task Interference in Model Merging",
      CVPR 2025 (arXiv:2412.00081).

    Examples:
      >>> import jax.numpy as jnp
      >>> base = {"w": jnp.zeros((2, 2))}
      >>> models = [{"w": jnp.array([[1.0, 0.0], [0.0, 0.0]])},
      ...           {"w": jnp.array([[1.0, 0.0], [0.0, 0.0]])}]
      >>> tsv_m(base, models)["w"].round(6)  # one direction twice: its mean, not its sum
      Array([[1., 0.],
             [0., 0.]], dtype=float32)
    """
    params = TSV_M.parameters(scale=scale, share=share, stacked=stacked)
    return run_in_memory(
        TSV_M, params, base=base, models=models, weights=weights
    ).params


def iso_c(
    base: Params,
    models: Sequence[Params],
    *,
    scale: Any = 1.0,
    weights: Any = None,
    stacked: Stacked = "matrices",
) -> Params:
    """ISO-C (Marczak et al., 2025): the summed task matrices with a flat spectrum.

    .. math::

       \\sum_m w_m (\\theta_m - \\theta_0) = U S V^\\top, \\qquad
       \\theta = \\theta_0 + \\alpha\\, \\bar\\sigma\\, U V^\\top, \\quad
       \\bar\\sigma = \\tfrac{1}{r} \\textstyle\\sum_{i=1}^{r} s_i

    per matrix leaf, ``r = min(n, d)``; other leaves take the mean of the
    weighted task vectors (module docstring).

    Values are checked before any work when concrete; traced ones (under an
    outer ``jax.jit``: NaN or Inf in models, weights or statistics,
    hyperparameters out of range, negative weights) are checked only when
    the call is wrapped in ``jax.experimental.checkify.checkify``, and pass
    unchecked otherwise (:func:`~mats_jax.checks.check_traced`).

    Args:
      base: the pretrained parameters θ₀.
      models: the fine-tuned parameters θ_m.
      scale: α (traced); choose it on validation data.
      weights: w_m, scaling each task vector first (default 1).
      stacked: ``"matrices"`` or ``"fallback"`` for leaves of three or more axes.

    Returns:
      The merged parameters, each leaf in its dtype.

    References:
      Marczak, Magistri, Cygert, Twardowski, Bagdanov and van de Weijer, "No
      Task Left Behind: Isotropic Model Merging with Common and
      Task-Specific Subspaces", ICML 2025 (arXiv:2502.04959).

    Examples:
      >>> import jax.numpy as jnp
      >>> base = {"w": jnp.zeros((2, 2))}
      >>> iso_c(base, [{"w": jnp.array([[4.0, 0.0], [0.0, 2.0]])}], scale=0.5)["w"]
      Array([[1.5, 0. ],
             [0. , 1.5]], dtype=float32)
    """
    params = ISO_C.parameters(scale=scale, stacked=stacked)
    return run_in_memory(
        ISO_C, params, base=base, models=models, weights=weights
    ).params


def iso_cts(
    base: Params,
    models: Sequence[Params],
    *,
    scale: Any = 1.0,
    common_fraction: float = 0.8,
    weights: Any = None,
    stacked: Stacked = "matrices",
) -> Params:
    """ISO-CTS (Marczak et al., 2025): the sum's top subspace plus each task's
    directions outside it, orthogonalised, with a flat spectrum.

    .. math::

       \\theta = \\theta_0 + \\alpha\\, \\bar\\sigma\\,
         \\operatorname{orth}([U_c\\; U_1 \\cdots U_M])\\,
         \\operatorname{orth}([V_c\\; V_1 \\cdots V_M])^\\top

    per matrix leaf: ``U_c``, ``V_c`` the top ``k_c`` singular vectors of
    ``Σ_m w_m τ_m``, ``U_m``, ``V_m`` the top ``d`` of ``(I − U_c U_cᵀ) w_m
    τ_m``, σ̄ the mean of the ``k_c + M d = r`` singular values kept
    (:func:`iso_cts_sizes`); other leaves take the mean of the weighted task
    vectors (module docstring).

    Values are checked before any work when concrete; traced ones (under an
    outer ``jax.jit``: NaN or Inf in models, weights or statistics,
    hyperparameters out of range, negative weights) are checked only when
    the call is wrapped in ``jax.experimental.checkify.checkify``, and pass
    unchecked otherwise (:func:`~mats_jax.checks.check_traced`).

    Args:
      base: the pretrained parameters θ₀.
      models: the fine-tuned parameters θ_m.
      scale: α (traced); choose it on validation data.
      common_fraction: f in [0, 1], the common subspace's share of the rank
        (0.8, the reference's default; 1 gives ISO-C).
      weights: w_m, scaling each task vector first (default 1).
      stacked: ``"matrices"`` or ``"fallback"`` for leaves of three or more axes.

    Returns:
      The merged parameters, each leaf in its dtype.

    References:
      Marczak et al., ICML 2025 (arXiv:2502.04959), as :func:`iso_c`.

    Examples:
      >>> import jax.numpy as jnp
      >>> base = {"w": jnp.zeros((2, 2))}
      >>> models = [{"w": jnp.array([[4.0, 0.0], [0.0, 0.0]])},
      ...           {"w": jnp.array([[0.0, 0.0], [0.0, 2.0]])}]
      >>> # f = 0: no common subspace, each task's top direction, the
      >>> # spectrum (4, 2) made flat
      >>> iso_cts(base, models, common_fraction=0.0)["w"]
      Array([[3., 0.],
             [0., 3.]], dtype=float32)
    """
    params = ISO_CTS.parameters(
        scale=scale, common_fraction=common_fraction, stacked=stacked
    )
    return run_in_memory(
        ISO_CTS, params, base=base, models=models, weights=weights
    ).params
