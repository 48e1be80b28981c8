"""The solver's two CG loops: its own per-block loop and jax.scipy's, vmapped.

``cg="jax_scipy"`` runs :func:`jax.scipy.sparse.linalg.cg` itself on every
block; it must give what the default loop gives on the oracle problems (a
dense float64 solve of the K-FAC system), with and without the Kronecker
preconditioner, and report only what it knows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mats_jax as mj
from mats_jax.solver.cg import UNKNOWN_ITERATIONS


def spd(key, n):
    q = jax.random.normal(key, (n, 2 * n))
    return q @ q.T / (2 * n) + 0.05 * jnp.eye(n)


def stacked_problem(key, m=3, layers=4, shape=(5, 3)):
    """Models with a plain kernel and a stacked kernel (one system per layer)."""
    models, stats = [], []
    for t in range(m):
        k = jax.random.fold_in(key, t)
        models.append(
            {
                "dense": jax.random.normal(jax.random.fold_in(k, 0), shape),
                "stack": jax.random.normal(jax.random.fold_in(k, 1), (layers, *shape)),
            }
        )
        stats.append(
            {
                "dense": mj.KFAC(
                    spd(jax.random.fold_in(k, 2), shape[0]),
                    spd(jax.random.fold_in(k, 3), shape[1]),
                ),
                "stack": mj.KFAC(
                    jnp.stack(
                        [
                            spd(jax.random.fold_in(k, 10 + i), shape[0])
                            for i in range(layers)
                        ]
                    ),
                    jnp.stack(
                        [
                            spd(jax.random.fold_in(k, 20 + i), shape[1])
                            for i in range(layers)
                        ]
                    ),
                ),
            }
        )
    return models, stats


def dense_solution(models, stats, weights, leaf, layer=None):
    """The oracle: (Σ w A ⊗ G)⁻¹ Σ w (A ⊗ G) vec(W) by numpy in float64."""

    def pick(x):
        x = np.asarray(x, np.float64)
        return x if layer is None else x[layer]

    total = sum(
        w * np.kron(pick(s[leaf].a), pick(s[leaf].g)) for w, s in zip(weights, stats)
    )
    rhs = sum(
        w * np.kron(pick(s[leaf].a), pick(s[leaf].g)) @ pick(m[leaf]).reshape(-1)
        for w, s, m in zip(weights, stats, models)
    )
    return np.linalg.solve(total, rhs).reshape(pick(models[0][leaf]).shape)


@pytest.mark.parametrize("preconditioner", [False, True])
def test_jax_scipy_cg_equals_the_default_loop_and_the_dense_solve(preconditioner):
    models, stats = stacked_problem(jax.random.PRNGKey(0))
    weights = [1.0, 0.5, 2.0]
    options = dict(
        maxiter=300, tol=1e-6, weights=weights, preconditioner=preconditioner
    )
    ours = mj.mats(models, stats, **options)
    theirs = mj.mats(models, stats, cg="jax_scipy", **options)
    for leaf in ("dense", "stack"):
        np.testing.assert_allclose(
            theirs.params[leaf], ours.params[leaf], rtol=1e-4, atol=1e-5
        )
    np.testing.assert_allclose(
        theirs.params["dense"],
        dense_solution(models, stats, weights, "dense"),
        rtol=1e-3,
        atol=1e-4,
    )
    for layer in range(4):
        np.testing.assert_allclose(
            theirs.params["stack"][layer],
            dense_solution(models, stats, weights, "stack", layer),
            rtol=1e-3,
            atol=1e-4,
        )


def test_jax_scipy_cg_reports_what_it_knows():
    models, stats = stacked_problem(jax.random.PRNGKey(1))
    result = mj.mats(models, stats, cg="jax_scipy", maxiter=300, tol=1e-6)
    report = result.report["stack"]
    assert report.solver == "cg"
    # Iterations: not reported by jax.scipy's loop.
    assert report.iterations.tolist() == [UNKNOWN_ITERATIONS] * 4
    # The residuals are recomputed from the result, so they are facts.
    assert (np.asarray(report.final_residual) <= 1e-5).all()
    assert [mj.STATUS_NAMES[s] for s in report.status.tolist()] == ["converged"] * 4
    table = mj.format_report(result.report)
    assert "stack  cg      4       ?" in table


def test_jax_scipy_cg_short_of_tol_is_stopped_and_warned():
    models, stats = stacked_problem(jax.random.PRNGKey(2))
    with pytest.warns(mj.ConvergenceWarning, match=r"stopped, relative residual"):
        result = mj.mats(models, stats, cg="jax_scipy", maxiter=1, tol=1e-8)
    assert set(result.report["dense"].status.tolist()) == {mj.solver.STOPPED}


def test_jax_scipy_cg_matches_per_block_cg_step_for_step():
    key = jax.random.PRNGKey(3)
    a = jnp.stack([spd(jax.random.fold_in(key, i), 6) for i in range(3)])
    b = jax.random.normal(jax.random.fold_in(key, 9), (3, 6))

    def matvec(operands, v):
        return jnp.einsum("bij,bj->bi", operands, v)

    for steps in (1, 2, 4):
        ours, _ = mj.per_block_cg(
            lambda v: matvec(a, v),
            b,
            jnp.zeros_like(b),
            maxiter=steps,
            tol=0.0,
            check_every=0,
        )
        theirs, _ = mj.jax_scipy_cg(
            matvec, a, b, jnp.zeros_like(b), maxiter=steps, tol=0.0
        )
        np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)


def test_an_unknown_cg_loop_is_rejected():
    models, stats = stacked_problem(jax.random.PRNGKey(4))
    with pytest.raises(
        mj.MergeInputError, match=r"cg must be one of 'per_block', 'jax_scipy'"
    ):
        mj.mats(models, stats, cg="scipy")
