"""Conjugate gradient on many independent blocks at once.

:func:`per_block_cg` is the solver's own loop: a batched preconditioned CG in
which every block has its own step sizes, stopping test and iteration count,
that reports per block how it ended and guards against divergence.
:func:`jax_scipy_cg` runs :func:`jax.scipy.sparse.linalg.cg` itself on each
block (vmapped), for users who want that reference loop; it reports only what
can be recomputed from its result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mats_jax.stats.statistic import BlockInverse
from mats_jax.typing import Array

__all__ = [
    "BREAKDOWN",
    "CONVERGED",
    "DIVERGED",
    "MAXITER",
    "STATUS_NAMES",
    "STOPPED",
    "UNKNOWN_ITERATIONS",
    "CGInfo",
    "jax_scipy_cg",
    "per_block_cg",
    "per_block_vdot",
    "relative_residual",
]

CONVERGED, MAXITER, DIVERGED, BREAKDOWN, STOPPED = 0, 1, 2, 3, 4
STATUS_NAMES = ("converged", "maxiter", "diverged", "breakdown", "stopped")
"""How a block's solve ended, indexed by ``LeafReport.status``. ``stopped``:
short of the tolerance for a reason the loop does not report (``jax_scipy``)."""
UNKNOWN_ITERATIONS = -1
"""The iteration count of a loop that does not report one (``jax_scipy``)."""


class CGInfo(NamedTuple):
    """Per-block outcome of :func:`per_block_cg`; every field has shape (B,).

    Attributes:
      initial_residual: ``‖b − A x₀‖ / ‖b‖``.
      final_residual: ``‖b − A x‖ / ‖b‖`` of the returned x, recomputed (not
        the recursive estimate CG steers by).
      iterations: CG steps taken by the block.
      status: index into :data:`STATUS_NAMES`.

    Examples:
      Two blocks of a diagonal system, one of them already solved at x₀:

      >>> import jax.numpy as jnp
      >>> from mats_jax import STATUS_NAMES, per_block_cg
      >>> a = jnp.array([[1.0, 2.0], [1.0, 1.0]])
      >>> b = jnp.array([[1.0, 1.0], [1.0, 1.0]])
      >>> x, info = per_block_cg(lambda v: a * v, b, jnp.array([[0.0, 0.0], [1.0, 1.0]]))
      >>> info.iterations, [STATUS_NAMES[int(s)] for s in info.status]
      (Array([2, 0], dtype=int32), ['converged', 'converged'])
    """

    initial_residual: Array
    final_residual: Array
    iterations: Array
    status: Array


def per_block_vdot(u: Array, v: Array) -> Array:
    """``⟨u_i, v_i⟩`` for every block i (the leading axis)."""
    return jnp.sum(u * v, axis=tuple(range(1, u.ndim)))


def per_block(values: Array, like: Array) -> Array:
    """Per-block values ``(B,)`` shaped to broadcast against ``like`` ``(B, ...)``."""
    return values.reshape(values.shape + (1,) * (like.ndim - 1))


def _norm_or_one(b: Array) -> Array:
    norm = jnp.sqrt(per_block_vdot(b, b))
    return jnp.where(norm > 0, norm, 1.0)


def relative_residual(matvec: Callable[[Array], Array], b: Array, x: Array) -> Array:
    """``‖b − A x‖ / ‖b‖`` per block (``‖b − A x‖`` where b is zero)."""
    r = b - matvec(x)
    return jnp.sqrt(per_block_vdot(r, r)) / _norm_or_one(b)


def per_block_cg(
    matvec: Callable[[Array], Array],
    b: Array,
    x0: Array,
    *,
    maxiter: Any = 100,
    tol: Any = 1e-5,
    precond: Callable[[Array], Array] | None = None,
    check_every: int = 20,
    divergence_factor: Any = 10.0,
) -> tuple[Array, CGInfo]:
    """Preconditioned conjugate gradient on B independent SPD systems at once.

    Solves ``A_i x_i = b_i`` for each block i (the leading axis of ``b``),
    where ``matvec`` applies every ``A_i`` to a batch. Each block has its own
    step sizes, its own stopping test and its own iteration count; a stopped
    block no longer changes while the others go on.

    A block stops when its (recursive) relative residual ``‖r‖/‖b‖`` is at most
    ``tol``, when ``maxiter`` steps are done, on breakdown (``pᵀAp ≤ 0`` or a
    non-finite step), or when it diverges: every ``check_every`` steps the true
    residual ``‖b − A x‖`` is recomputed; float32 CG run long past convergence,
    or on a singular system whose right side has rounding noise outside the
    range of A, can see it grow while the recursive residual still shrinks. A
    block whose true residual exceeds ``divergence_factor`` times the best seen
    stops and returns its best checked iterate.

    Args:
      matvec: ``x ↦ A x`` for a batch ``x`` of b's shape.
      b: right-hand sides, ``(B, ...)``.
      x0: initial iterates, b's shape. Components in the null space of A keep
        their value: CG never moves them.
      maxiter: the most steps per block (may be traced).
      tol: relative residual tolerance (may be traced); 0 runs ``maxiter`` steps.
      precond: ``r ↦ P⁻¹ r`` for an SPD (or PSD) approximation P of A, or None.
      check_every: steps between true-residual checks (static); 0 disables them.
      divergence_factor: growth of the true residual over its best that counts
        as divergence.

    Returns:
      ``(x, info)``: the iterates and a :class:`CGInfo`.

    Examples:
      >>> import jax.numpy as jnp
      >>> a = jnp.array([[[4.0, 1.0], [1.0, 3.0]]])
      >>> b = jnp.array([[1.0, 2.0]])
      >>> x, info = per_block_cg(lambda v: jnp.einsum("bij,bj->bi", a, v), b, jnp.zeros_like(b))
      >>> x.round(4), info.iterations
      (Array([[0.0909, 0.6364]], dtype=float32), Array([2], dtype=int32))
    """
    apply_p = precond if precond is not None else (lambda r: r)
    dtype = b.dtype
    tol = jnp.asarray(tol, dtype)
    divergence_factor = jnp.asarray(divergence_factor, dtype)
    maxiter = jnp.asarray(maxiter, jnp.int32)
    denom = _norm_or_one(b)

    def relative(r: Array) -> Array:
        return jnp.sqrt(per_block_vdot(r, r)) / denom

    r = b - matvec(x0)
    z = apply_p(r)
    rz = per_block_vdot(r, z)
    res0 = relative(r)
    active = (res0 > tol) & (maxiter > 0)
    status = jnp.where(res0 <= tol, CONVERGED, MAXITER).astype(jnp.int32)
    n_blocks = b.shape[0]
    state = dict(
        k=jnp.zeros((), jnp.int32),
        x=x0,
        r=r,
        p=z,
        rz=rz,
        active=active,
        status=status,
        iterations=jnp.zeros((n_blocks,), jnp.int32),
        x_best=x0,
        best=res0,
    )

    def cond(s: dict[str, Array]) -> Array:
        return (s["k"] < maxiter) & jnp.any(s["active"])

    def check_divergence(s: dict[str, Array]) -> dict[str, Array]:
        true_res = relative_residual(matvec, b, s["x"])
        improved = true_res < s["best"]
        diverged = s["active"] & (true_res > divergence_factor * s["best"])
        best = jnp.where(improved, true_res, s["best"])
        x_best = jnp.where(per_block(improved, b), s["x"], s["x_best"])
        return dict(
            s,
            x_best=x_best,
            best=best,
            x=jnp.where(per_block(diverged, b), x_best, s["x"]),
            active=s["active"] & ~diverged,
            status=jnp.where(diverged, DIVERGED, s["status"]),
        )

    def body(s: dict[str, Array]) -> dict[str, Array]:
        p, active = s["p"], s["active"]
        ap = matvec(p)
        pap = per_block_vdot(p, ap)
        ok = active & (pap > 0) & jnp.isfinite(pap)
        alpha = jnp.where(ok, s["rz"] / jnp.where(ok, pap, 1.0), 0.0)
        x = s["x"] + per_block(alpha, b) * p
        r = s["r"] - per_block(alpha, b) * ap
        z = apply_p(r)
        rz_new = per_block_vdot(r, z)
        beta = jnp.where(
            ok & (s["rz"] > 0), rz_new / jnp.where(s["rz"] > 0, s["rz"], 1.0), 0.0
        )
        converged = ok & (relative(r) <= tol)
        # A zero preconditioned residual with the tolerance unmet means the rest
        # of r lies where P⁻¹ is zero: no further progress is possible.
        stalled = ok & ~converged & ~(rz_new > 0)
        status = jnp.where(converged, CONVERGED, s["status"])
        status = jnp.where((active & ~ok) | stalled, BREAKDOWN, status)
        new = dict(
            s,
            k=s["k"] + 1,
            x=x,
            r=r,
            p=jnp.where(per_block(ok, b), z + per_block(beta, b) * p, p),
            rz=jnp.where(ok, rz_new, s["rz"]),
            active=ok & ~converged & ~stalled,
            status=status,
            iterations=s["iterations"] + ok.astype(jnp.int32),
        )
        if check_every <= 0:
            return new
        return jax.lax.cond(
            new["k"] % check_every == 0, check_divergence, lambda t: t, new
        )

    final = jax.lax.while_loop(cond, body, state)
    x = final["x"]
    info = CGInfo(
        initial_residual=res0,
        final_residual=relative_residual(matvec, b, x),
        iterations=final["iterations"],
        status=final["status"],
    )
    return x, info


def jax_scipy_cg(
    matvec: Callable[[Any, Array], Array],
    operands: Any,
    b: Array,
    x0: Array,
    *,
    maxiter: Any = 100,
    tol: Any = 1e-5,
    precond: BlockInverse | None = None,
) -> tuple[Array, CGInfo]:
    """:func:`jax.scipy.sparse.linalg.cg` on each of B blocks, vmapped.

    The same iteration as :func:`per_block_cg` (the tests check they agree),
    by JAX's own implementation: each block is its own system with its own
    step sizes and stopping test ``‖r‖ ≤ tol·‖b‖``. What that loop does not
    return is not reported: the iterations are :data:`UNKNOWN_ITERATIONS`, and
    a block short of ``tol`` has the status ``stopped`` (maxiter, breakdown or
    a stall: it cannot tell); there is no divergence guard.

    Args:
      matvec: ``matvec(operands, x)``, the blocked product for a batch ``x``.
      operands: the pytree ``matvec`` reads, every array with the leading
        block axis B (statistics, damping), so it can be split per block.
      b, x0: right-hand sides and initial iterates, ``(B, ...)``.
      maxiter, tol: as for :func:`per_block_cg` (may be traced).
      precond: the preconditioner, or None.

    Returns:
      ``(x, info)`` with the recomputed initial and final relative residuals.

    Examples:
      >>> import jax.numpy as jnp
      >>> a = jnp.array([[[4.0, 1.0], [1.0, 3.0]]])
      >>> b = jnp.array([[1.0, 2.0]])
      >>> mv = lambda a, v: jnp.einsum("bij,bj->bi", a, v)
      >>> x, info = jax_scipy_cg(mv, a, b, jnp.zeros_like(b))
      >>> x.round(4), int(info.iterations[0])
      (Array([[0.0909, 0.6364]], dtype=float32), -1)
    """

    def one_block(ops: Any, b_i: Array, x0_i: Array, inverse: Any) -> Array:
        ops = jax.tree.map(lambda a: a[None], ops)
        inverse = jax.tree.map(lambda a: a[None], inverse)
        m = None if inverse is None else (lambda r: inverse(r[None])[0])
        x, _ = jax.scipy.sparse.linalg.cg(
            lambda v: matvec(ops, v[None])[0],
            b_i,
            x0_i,
            tol=tol,
            atol=0.0,
            maxiter=maxiter,
            M=m,
        )
        return x

    x = jax.vmap(one_block)(operands, b, x0, precond)

    def full(v: Array) -> Array:
        return matvec(operands, v)

    initial = relative_residual(full, b, x0)
    final = relative_residual(full, b, x)
    tol = jnp.asarray(tol, b.dtype)
    return x, CGInfo(
        initial_residual=initial,
        final_residual=final,
        iterations=jnp.full(b.shape[:1], UNKNOWN_ITERATIONS, jnp.int32),
        status=jnp.where(final <= tol, CONVERGED, STOPPED).astype(jnp.int32),
    )
