"""The solver's options, one record passed whole.

:class:`SolverOptions` holds every choice of :mod:`mats_jax.solver`: closed
form or CG, which CG loop, its iteration budget, tolerance, damping,
preconditioner, precision and divergence test. It is a pytree
(:func:`mats_jax.tree.register_record`): the numbers (``maxiter``, ``tol``,
``damping``, ``divergence_factor``) are traced, so sweeping them reuses the
compiled solve; the choices are static metadata. It validates itself when
built, naming the option.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

import jax

from mats_jax.checks import MergeInputError, check_flag, check_traced
from mats_jax.tree import register_record

__all__ = ["CG_LOOPS", "SOLVE_METHODS", "SolverOptions"]

SOLVE_METHODS = ("cg", "closed_form")
CG_LOOPS = ("per_block", "jax_scipy")


def _concrete(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer)


@register_record
@dataclasses.dataclass(frozen=True)
class SolverOptions:
    """How :func:`~mats_jax.solve` solves ``(Σ_m w_m C_m + δI) θ = Σ_m w_m C_m θ_m + δ θ_init``.

    Attributes:
      method: ``"cg"`` (conjugate gradient) or ``"closed_form"`` (exact, for
        statistic types that have one).
      maxiter: CG steps per block at most. Early stopping regularises: it is a
        hyperparameter, not only a budget.
      tol: CG's relative residual tolerance per block; 0 runs ``maxiter`` steps.
      damping: relative Tikhonov damping δ/τ, τ the block's mean diagonal of
        ``Σ_m w_m C_m``.
      preconditioner: precondition CG with each statistic type's
        approximation of ``Σ_m w_m C_m + δI``.
      precision: ``"float64"`` solves in double precision (needs
        ``jax_enable_x64``); default float32, or the leaf's dtype if wider.
      check_every, divergence_factor: the divergence test of
        :func:`~mats_jax.per_block_cg`.
      group_blocks: batch same-shaped blocks of different leaves into one CG.
      cg: the CG loop: ``"per_block"`` (:func:`~mats_jax.per_block_cg`: each
        block stops on its own and reports its iterations, residuals and how
        it stopped, and a diverging block returns its best iterate) or
        ``"jax_scipy"`` (:func:`jax.scipy.sparse.linalg.cg` vmapped over the
        blocks, the preconditioner as its ``M``; it cannot report iterations
        or how it stopped, nor stop a diverging block: its report gives the
        recomputed residuals only).

    Examples:
      >>> import jax
      >>> from mats_jax.solver import SolverOptions
      >>> options = SolverOptions(maxiter=50, preconditioner=True)
      >>> jax.tree.leaves(options)   # traced: maxiter, tol, damping, divergence_factor
      [50, 1e-05, 0.0, 10.0]
      >>> SolverOptions(tol=-1.0)
      Traceback (most recent call last):
      ...
      mats_jax.checks.MergeInputError: tol must be finite and >= 0, got -1.0
    """

    static_fields: ClassVar[tuple[str, ...]] = (
        "method",
        "preconditioner",
        "precision",
        "check_every",
        "group_blocks",
        "cg",
    )

    method: Literal["cg", "closed_form"] = "cg"
    maxiter: Any = 100
    tol: Any = 1e-5
    damping: Any = 0.0
    preconditioner: bool = False
    precision: Literal["float32", "float64"] | None = None
    check_every: int = 20
    divergence_factor: Any = 10.0
    group_blocks: bool = True
    cg: Literal["per_block", "jax_scipy"] = "per_block"

    def __post_init__(self) -> None:
        if self.method not in SOLVE_METHODS:
            raise MergeInputError(
                f"method must be 'cg' or 'closed_form', got {self.method!r}"
            )
        if self.cg not in CG_LOOPS:
            raise MergeInputError(
                f"cg must be one of {', '.join(map(repr, CG_LOOPS))}, got {self.cg!r}"
            )
        if _concrete(self.maxiter) and (
            isinstance(self.maxiter, bool)
            or int(self.maxiter) != self.maxiter
            or int(self.maxiter) < 0
        ):
            raise MergeInputError(
                f"maxiter must be a non-negative integer, got {self.maxiter!r}"
            )
        check_traced(
            "maxiter", self.maxiter, lambda x: x >= 0, "a non-negative integer"
        )
        for name in ("tol", "damping"):
            value = getattr(self, name)
            check_traced(
                name, value, lambda x: (x >= 0) & (x < float("inf")), "finite and >= 0"
            )
            if _concrete(value) and not (
                math.isfinite(float(value)) and float(value) >= 0
            ):
                raise MergeInputError(f"{name} must be finite and >= 0, got {value!r}")
        if int(self.check_every) != self.check_every or int(self.check_every) < 0:
            raise MergeInputError(f"check_every must be >= 0, got {self.check_every!r}")
        # Static: part of the compiled program's shape, so a plain int.
        object.__setattr__(self, "check_every", int(self.check_every))
        check_traced(
            "divergence_factor", self.divergence_factor, lambda x: x > 1, "> 1"
        )
        if _concrete(self.divergence_factor) and not float(self.divergence_factor) > 1:
            raise MergeInputError(
                f"divergence_factor must be > 1, got {self.divergence_factor!r}"
            )
        check_flag("preconditioner", self.preconditioner)
        check_flag("group_blocks", self.group_blocks)
        if self.precision not in (None, "float32", "float64"):
            raise MergeInputError(
                f"precision must be 'float32' or 'float64', got {self.precision!r}"
            )
        if self.precision == "float64" and not jax.config.read("jax_enable_x64"):
            raise MergeInputError(
                "precision='float64' needs double precision enabled: "
                "jax.config.update('jax_enable_x64', True) before creating arrays"
            )

    def solver_options(self) -> SolverOptions:
        """These options alone (a record that extends them drops its own fields)."""
        return SolverOptions(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(SolverOptions)}
        )
