"""Spherical interpolation: SLERP between two models, and the weighted spherical
barycentre of several (mergekit's ``slerp`` and ``multislerp``).

Both treat each leaf as one vector (the flattened tensor) and move along the
sphere instead of the chord, so that an interpolation of two tensors of equal
norm keeps that norm, where the linear mean of two directions at an angle Ω
shrinks by cos(Ω/2).

**SLERP** (Shoemake, 1985) of ``a = models[0]`` and ``b = models[1]``:

.. math::

   \\cos\\Omega = \\frac{\\langle a, b\\rangle}{\\lVert a\\rVert \\lVert b\\rVert}, \\qquad
   \\theta = \\frac{\\sin((1-t)\\Omega)}{\\sin\\Omega}\\, a
           + \\frac{\\sin(t\\Omega)}{\\sin\\Omega}\\, b

with the linear ``(1 − t) a + t b`` where the vectors are nearly parallel or
antiparallel (``|cos Ω| >`` :data:`DOT_THRESHOLD`, where ``sin Ω`` is too
small to divide by) or either is zero. ``t = 0`` gives ``a``, ``t = 1`` gives
``b``.

**Multi-SLERP** of ``x_1 … x_M`` with weights ``w_m`` (normalised to sum to
1): the weighted spherical barycentre of the directions ``u_m = x_m / ‖x_m‖``
(Buss and Fillmore, 2001), the point ``p`` of the unit sphere where the
weighted log maps cancel, scaled by the weighted mean of the norms:

.. math::

   \\sum_m w_m \\log_p(u_m) = 0, \\qquad \\theta = \\Big(\\sum_m w_m \\lVert x_m\\rVert\\Big)\\, p

See :func:`spherical_barycentre` for the iteration. With ``about_base`` the
``x_m`` are the task vectors ``θ_m − θ_0`` and the result is added to θ₀.

Examples:
  >>> import jax.numpy as jnp
  >>> from mats_jax import multislerp, slerp
  >>> a, b = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}
  >>> slerp([a, b], t=1 / 3)["w"]  # 30° of the 90° arc from a to b
  Array([0.8660254, 0.5      ], dtype=float32)
  >>> multislerp([a, b], weights=[2 / 3, 1 / 3])["w"]
  Array([0.8660254, 0.5      ], dtype=float32)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

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
from mats_jax.method import MergeInputs, MergeMethod, Needs
from mats_jax.sharding import Placement
from mats_jax.solver.cg import BREAKDOWN, CONVERGED, MAXITER
from mats_jax.solver.report import (
    ConvergenceWarning,
    LeafReport,
    MergeResult,
    unconverged_blocks,
)
from mats_jax.tree import compute_dtype, register_record, task_vectors
from mats_jax.typing import Array, Params

__all__ = [
    "BARYCENTRE_TOL",
    "DOT_THRESHOLD",
    "MULTISLERP",
    "SLERP",
    "Barycentre",
    "Multislerp",
    "MultislerpParameters",
    "Slerp",
    "SlerpParameters",
    "multislerp",
    "multislerp_leaf",
    "slerp",
    "slerp_leaf",
    "spherical_barycentre",
    "unit_and_norm",
]

DOT_THRESHOLD = 0.9995
"""SLERP interpolates linearly where ``|cos Ω|`` exceeds this (Ω within
about 1.8° of 0 or of 180°): there ``sin Ω`` is too small to divide by, and
the arc and the chord differ by less than ``Ω²/8`` relative (3·10⁻⁴ here).
The value is mergekit's, so its SLERP merges are reproduced."""

BARYCENTRE_TOL = 1e-6
"""The barycentre's iteration stops when its step, an angle in radians, is
below this (float32 resolves angles to about 1e-7)."""

_SPREAD_TOL = 1e-6
# The weighted mean of the unit directions is shorter than this when they
# balance out (a and −a with equal weights): no barycentre is defined there.


def unit_and_norm(x: Array, axis: Any = None) -> tuple[Array, Array]:
    """``x / ‖x‖`` and ``‖x‖`` over ``axis`` (None: all), with 0 for a zero vector.

    The norm is taken of ``x`` divided by its largest magnitude, so that
    neither squares of large entries overflow nor squares of tiny ones
    underflow to a zero norm. Norms keep their reduced axes (``keepdims``).

    Examples:
      >>> import jax.numpy as jnp
      >>> u, n = unit_and_norm(jnp.array([3e30, 4e30]))
      >>> u, n
      (Array([0.6, 0.8], dtype=float32), Array([5.e+30], dtype=float32))
      >>> unit_and_norm(jnp.zeros(2))[0]
      Array([0., 0.], dtype=float32)
    """
    largest = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    scaled = x / jnp.where(largest > 0, largest, 1)
    norm = jnp.sqrt(jnp.sum(scaled * scaled, axis=axis, keepdims=True))
    unit = jnp.where(norm > 0, scaled / jnp.where(norm > 0, norm, 1), 0)
    return unit, largest * norm


def slerp_leaf(a: Array, b: Array, t: Any) -> Array:
    """SLERP of two tensors as flattened vectors (module docstring), in the
    compute dtype of ``a`` (float32 for low-precision leaves).

    The angle is ``Ω = 2 atan2(‖â − b̂‖, ‖â + b̂‖)``, accurate at every angle
    (``arccos`` of the dot product loses half the digits near 0 and π).

    Examples:
      >>> import jax.numpy as jnp
      >>> slerp_leaf(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]), 1 / 3)
      Array([0.8660254, 0.5      ], dtype=float32)
    """
    dtype = compute_dtype(a.dtype)
    x, y = a.astype(dtype), b.astype(dtype)
    ux, nx = unit_and_norm(x)
    uy, ny = unit_and_norm(y)
    t = jnp.asarray(t, dtype)
    cos = jnp.sum(ux * uy)
    omega = 2 * jnp.arctan2(
        jnp.sqrt(jnp.sum((ux - uy) ** 2)), jnp.sqrt(jnp.sum((ux + uy) ** 2))
    )
    linear = (
        (jnp.abs(cos) > DOT_THRESHOLD) | (nx.reshape(()) == 0) | (ny.reshape(()) == 0)
    )
    sin = jnp.where(linear, 1, jnp.sin(omega))
    s0 = jnp.where(linear, 1 - t, jnp.sin((1 - t) * omega) / sin)
    s1 = jnp.where(linear, t, jnp.sin(t * omega) / sin)
    return s0 * x + s1 * y


class Barycentre(NamedTuple):
    """What :func:`spherical_barycentre` found.

    Attributes:
      point: the barycentre, a unit vector; zero where it is undefined.
      first_step, last_step: the first and last step's angle (radians; 0
        without a step).
      steps: the number of steps taken.
      defined: False where the weighted mean of the directions vanishes
        (they balance out, as ``a`` and ``−a`` with equal weights, or all
        are zero).
    """

    point: Array
    first_step: Array
    last_step: Array
    steps: Array
    defined: Array


def spherical_barycentre(
    units: Array, weights: Array, max_iterations: Any
) -> Barycentre:
    """The weighted barycentre of unit vectors on the sphere (Buss and Fillmore, 2001).

    Starts from the normalised weighted mean ``p = Σ w_m u_m / ‖Σ w_m u_m‖``
    and repeats

    .. math::

       v = \\sum_m w_m \\log_p(u_m), \\qquad p \\leftarrow \\exp_p(v)
         = \\cos\\lVert v\\rVert\\, p + \\frac{\\sin\\lVert v\\rVert}{\\lVert v\\rVert}\\, v

    until ``‖v‖ <`` :data:`BARYCENTRE_TOL` or ``max_iterations`` steps, with
    ``log_p(u) = φ (u − ⟨p, u⟩ p) / ‖u − ⟨p, u⟩ p‖`` and
    ``φ = atan2(‖u − ⟨p, u⟩ p‖, ⟨p, u⟩)`` the angle from p to u. The fixed
    point, where the weighted log maps cancel, is the minimiser of
    ``Σ_m w_m φ_m²`` on the sphere. A zero ``u_m`` (a zero tensor) pulls
    nowhere. For two directions the first step lands on the great circle
    through them at the fraction ``w_2`` of their angle: SLERP.

    Args:
      units: (M, N) unit (or zero) vectors.
      weights: (M,) non-negative weights summing to 1.
      max_iterations: the most steps (traced).

    Returns:
      A :class:`Barycentre`.

    Examples:
      >>> import jax.numpy as jnp
      >>> units = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> found = spherical_barycentre(units, jnp.array([2 / 3, 1 / 3]), 50)
      >>> found.point  # 30° from the first direction: a third of the way
      Array([0.8660254, 0.5      ], dtype=float32)
    """
    mean = weights @ units
    spread = jnp.sqrt(jnp.sum(mean * mean))
    defined = spread > _SPREAD_TOL
    p0 = jnp.where(defined, mean / jnp.where(defined, spread, 1), 0)
    limit = jnp.where(defined, max_iterations, 0)

    def step(p: Array) -> tuple[Array, Array]:
        along = units @ p
        across = units - along[:, None] * p
        sine = jnp.sqrt(jnp.sum(across * across, axis=1))
        angle = jnp.arctan2(sine, along)
        scale = jnp.where(sine > 0, angle / jnp.where(sine > 0, sine, 1), 0)
        v = (weights * scale) @ across
        size = jnp.sqrt(jnp.sum(v * v))
        sinc = jnp.where(size > 0, jnp.sin(size) / jnp.where(size > 0, size, 1), 1)
        moved = jnp.cos(size) * p + sinc * v
        return moved / jnp.sqrt(jnp.sum(moved * moved)), size

    Carry = tuple[Array, Array, Array, Array]

    def keep_going(carry: Carry) -> Array:
        _, _, size, i = carry
        return (i < limit) & (size >= BARYCENTRE_TOL)

    def body(carry: Carry) -> Carry:
        p, first, _, i = carry
        moved, size = step(p)
        return moved, jnp.where(i == 0, size, first), size, i + 1

    zero = jnp.zeros((), units.dtype)
    start = (p0, zero, jnp.asarray(jnp.inf, units.dtype), jnp.zeros((), jnp.int32))
    p, first, last, steps = jax.lax.while_loop(keep_going, body, start)
    return Barycentre(p, first, jnp.where(steps > 0, last, zero), steps, defined)


@register_record
@dataclasses.dataclass(frozen=True)
class SlerpParameters:
    """SLERP's parameters.

    Attributes:
      t: the interpolation factor, 0 giving ``models[0]`` and 1 ``models[1]``;
        in [0, 1] unless ``extrapolate`` (traced: sweeping it does not
        recompile; per leaf through recipe overrides).
      extrapolate: allow ``t`` outside [0, 1] (continuing along the arc).
    """

    static_fields: ClassVar[tuple[str, ...]] = ("extrapolate",)
    t: Any = 0.5
    extrapolate: bool = False

    def __post_init__(self) -> None:
        check_flag("extrapolate", self.extrapolate)
        check_number("t", self.t)
        if not self.extrapolate and is_traced(self.t):
            check_traced("t", self.t, lambda t: (t >= 0) & (t <= 1), "in [0, 1]")
        elif not self.extrapolate:
            try:
                check_fraction("t", self.t, include_zero=True, include_one=True)
            except MergeInputError as e:
                raise MergeInputError(
                    f"{e}; to interpolate beyond the two models pass extrapolate=True"
                ) from None


@dataclasses.dataclass(frozen=True)
class Slerp(MergeMethod):
    """SLERP between exactly two models, per leaf (see the module docstring).

    It takes no weights (``t`` is its interpolation factor): weights that are
    not all equal are refused rather than ignored.
    """

    def needs(self, params: Any) -> Needs:
        return Needs(models=(2, 2), weights=False)

    def merge(
        self, inputs: MergeInputs, params: Any, prepared: Any, placement: Placement
    ) -> MergeResult:
        a, b = inputs.models
        merged = jax.tree.map(
            lambda x, y: slerp_leaf(x, y, params.t).astype(x.dtype), a, b
        )
        return MergeResult(merged, named_report(merged, self.name))


@register_record
@dataclasses.dataclass(frozen=True)
class MultislerpParameters:
    """Multi-SLERP's parameters.

    Attributes:
      about_base: interpolate the task vectors ``θ_m − θ_0`` and add the
        result to θ₀ (mergekit's multislerp with a ``base_model``); False:
        the models themselves.
      max_iterations: the most steps of the barycentre's iteration (traced);
        0 stops at the normalised weighted mean of the directions.
    """

    static_fields: ClassVar[tuple[str, ...]] = ("about_base",)
    about_base: bool = False
    max_iterations: Any = 100

    def __post_init__(self) -> None:
        check_flag("about_base", self.about_base)
        n = self.max_iterations
        if not is_traced(n) and (
            isinstance(n, bool) or not isinstance(n, int) or n < 0
        ):
            raise MergeInputError(
                f"max_iterations must be a non-negative integer, got {n!r}"
            )


def multislerp_leaf(
    vectors: Sequence[Array], weights: Array, max_iterations: Any
) -> tuple[Array, LeafReport]:
    """Multi-SLERP of one leaf's M vectors (module docstring), in their compute
    dtype, and its report: the barycentre's first and last step angle as the
    initial and final residual, its steps, and its status (``breakdown``
    where the directions balance out and the leaf is the weighted linear
    mean ``Σ w_m x_m``; ``maxiter`` where it stopped short)."""
    shape = vectors[0].shape
    flat = jnp.stack([v.reshape(-1) for v in vectors])
    w = (weights / jnp.sum(weights)).astype(flat.dtype)
    units, norms = unit_and_norm(flat, axis=1)
    found = spherical_barycentre(units, w, max_iterations)
    # Undefined where every tensor is zero (the result is then zero too) or
    # the directions balance out (the linear mean, reported as a breakdown).
    balanced = ~found.defined & jnp.any(norms > 0)
    spherical = (w @ norms[:, 0]) * found.point
    merged = jnp.where(balanced, w @ flat, spherical).reshape(shape)
    status = jnp.where(
        balanced,
        BREAKDOWN,
        jnp.where(found.last_step < BARYCENTRE_TOL, CONVERGED, MAXITER),
    )
    report = LeafReport(
        "multislerp",
        initial_residual=found.first_step[None],
        final_residual=found.last_step[None],
        iterations=found.steps[None],
        status=status.astype(jnp.int32)[None],
    )
    return merged, report


@dataclasses.dataclass(frozen=True)
class Multislerp(MergeMethod):
    """The weighted spherical barycentre of the models, per leaf (module docstring).

    The weights are normalised to sum to 1 (only their ratios matter).
    """

    def needs(self, params: Any) -> Needs:
        return Needs(base=params.about_base)

    def merge(
        self, inputs: MergeInputs, params: Any, prepared: Any, placement: Placement
    ) -> MergeResult:
        assert inputs.weights is not None
        models = list(inputs.models)
        vectors = (
            task_vectors(inputs.base, models)
            if params.about_base
            else [
                jax.tree.map(lambda x: x.astype(compute_dtype(x.dtype)), m)
                for m in models
            ]
        )
        columns = [jax.tree.leaves(v) for v in vectors]
        ref_leaves, treedef = jax.tree.flatten(models[0])
        base_leaves = jax.tree.leaves(inputs.base) if params.about_base else None
        merged, reports = [], []
        for i, leaves in enumerate(zip(*columns, strict=True)):
            leaf, report = multislerp_leaf(
                list(leaves), inputs.weights, params.max_iterations
            )
            if base_leaves is not None:
                leaf = base_leaves[i].astype(leaf.dtype) + leaf
            merged.append(leaf.astype(ref_leaves[i].dtype))
            reports.append(report)
        return MergeResult(
            jax.tree.unflatten(treedef, merged), jax.tree.unflatten(treedef, reports)
        )

    def diagnose(
        self, params: Any, report: Any, paths: Sequence[str]
    ) -> list[tuple[type[Warning], str]]:
        short = unconverged_blocks(report, paths)
        if not short:
            return []
        return [
            (
                ConvergenceWarning,
                f"multislerp: on {len(short)} leaf(s) the spherical barycentre "
                "stopped before its tolerance (maxiter: raise max_iterations) or "
                "is undefined (breakdown: the directions balance out, and the "
                "leaf is the weighted linear mean): "
                + "; ".join(short[:10])
                + (" …" if len(short) > 10 else ""),
            )
        ]


SLERP = Slerp("slerp", SlerpParameters)
MULTISLERP = Multislerp("multislerp", MultislerpParameters)


def slerp(
    models: Sequence[Params], *, t: Any = 0.5, extrapolate: bool = False
) -> Params:
    """SLERP (spherical linear interpolation) between two models, per leaf.

    .. math::

       \\theta = \\frac{\\sin((1-t)\\Omega)}{\\sin\\Omega}\\, \\theta_a
               + \\frac{\\sin(t\\Omega)}{\\sin\\Omega}\\, \\theta_b, \\qquad
       \\cos\\Omega = \\frac{\\langle \\theta_a, \\theta_b\\rangle}
                          {\\lVert\\theta_a\\rVert \\lVert\\theta_b\\rVert}

    on each leaf flattened to a vector, with the linear interpolation
    ``(1 − t) θ_a + t θ_b`` where ``|cos Ω| >`` :data:`DOT_THRESHOLD` or a
    leaf is zero. As mergekit's ``slerp``, it interpolates the models
    themselves: ``models[0]`` (mergekit's base model) is the ``t = 0`` end.
    Arithmetic runs in float32 (or the leaf's dtype if wider); each leaf is
    returned in its dtype.

    Values are checked before any work when concrete; traced ones (under an
    outer ``jax.jit``: NaN or Inf in models, weights or statistics,
    hyperparameters out of range, negative weights) are checked only when
    the call is wrapped in ``jax.experimental.checkify.checkify``, and pass
    unchecked otherwise (:func:`~mats_jax.checks.check_traced`).

    Args:
      models: exactly two parameter pytrees ``[θ_a, θ_b]`` of one structure.
      t: the interpolation factor in [0, 1] (traced); ``t = 0`` returns
        ``θ_a``, ``t = 1`` returns ``θ_b``.
      extrapolate: allow ``t`` outside [0, 1].

    Returns:
      The merged parameters.

    Raises:
      MergeInputError: another number of models than two, ``t`` outside
        [0, 1] without ``extrapolate``, or (through
        :func:`~mats_jax.merge_pytrees`) weights that are not all equal:
        SLERP weighs its two models by ``t`` alone.

    References:
      Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985.

    Examples:
      >>> import jax.numpy as jnp
      >>> a, b = {"w": jnp.array([2.0, 0.0])}, {"w": jnp.array([0.0, 2.0])}
      >>> slerp([a, b], t=0.5)["w"]  # on the circle of radius 2, not the chord
      Array([1.4142135, 1.4142135], dtype=float32)
      >>> slerp([a, b], t=0.0)["w"]
      Array([2., 0.], dtype=float32)
    """
    return run_in_memory(
        SLERP, SLERP.parameters(t=t, extrapolate=extrapolate), models=models
    ).params


def multislerp(
    models: Sequence[Params],
    *,
    weights: Any = None,
    base: Params | None = None,
    max_iterations: Any = 100,
) -> Params:
    """The weighted spherical barycentre of the models, per leaf (mergekit's ``multislerp``).

    .. math::

       \\sum_m w_m \\log_p(u_m) = 0, \\quad u_m = \\frac{x_m}{\\lVert x_m\\rVert},
       \\qquad \\theta = \\Big(\\sum_m w_m \\lVert x_m\\rVert\\Big)\\, p

    on each leaf flattened to a vector, with ``x_m = θ_m``, or, given
    ``base``, ``x_m = θ_m − θ_0`` and ``θ = θ_0 + …``; the weights are
    normalised to sum to 1. ``p`` is found by the fixed-point iteration of
    Buss and Fillmore (:func:`spherical_barycentre`). For two models of
    equal norm with weights ``(1 − t, t)`` this is :func:`slerp` at ``t``;
    for norms that differ, the direction is SLERP's of the directions and
    the norm the weighted mean of the norms (SLERP's is not). A leaf whose
    directions balance out (``a`` and ``−a`` with equal weights: no
    barycentre) is the weighted linear mean, reported as ``breakdown``
    with a :class:`~mats_jax.ConvergenceWarning`.

    mergekit's ``multislerp`` takes one step from the normalised weighted
    mean; that step is zero (the weighted tangents at the mean cancel), so
    its result is the normalised mean of the directions, which
    ``max_iterations=0`` reproduces.

    Values are checked before any work when concrete; traced ones (under an
    outer ``jax.jit``: NaN or Inf in models, weights or statistics,
    hyperparameters out of range, negative weights) are checked only when
    the call is wrapped in ``jax.experimental.checkify.checkify``, and pass
    unchecked otherwise (:func:`~mats_jax.checks.check_traced`).

    Args:
      models: M parameter pytrees of one structure.
      weights: one non-negative weight per model, not all zero (default equal).
      base: θ₀: interpolate the task vectors about it.
      max_iterations: the most steps of the barycentre's iteration (traced).

    Returns:
      The merged parameters, each leaf in its own dtype
      (:func:`~mats_jax.merge_pytrees` ``("multislerp", ...)`` also returns the
      per-leaf report: steps, the last step's angle, status).

    References:
      Buss and Fillmore, "Spherical averages and applications to spherical
      splines and interpolation", ACM Transactions on Graphics 20(2), 2001;
      Goddard, "Multi-SLERP", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea

    Examples:
      >>> import jax.numpy as jnp
      >>> models = [{"w": jnp.array([1.0, 0.0, 0.0])}, {"w": jnp.array([0.0, 1.0, 0.0])},
      ...           {"w": jnp.array([0.0, 0.0, 1.0])}]
      >>> multislerp(models)["w"]
      Array([0.57735026, 0.57735026, 0.57735026], dtype=float32)
    """
    params = MULTISLERP.parameters(
        about_base=base is not None, max_iterations=max_iterations
    )
    return run_in_memory(
        MULTISLERP, params, models=models, base=base, weights=weights
    ).params
