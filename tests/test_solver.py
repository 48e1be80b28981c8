"""The solver and the data-dependent merges against their slow, obvious twins."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo

import mats_jax
from mats_jax import (
    KFAC,
    Dense,
    Diagonal,
    Gram,
    fisher_merge,
    mats,
    per_block_cg,
    regmean,
    solve,
)
from mats_jax.solver import BREAKDOWN, CONVERGED, DIVERGED, MAXITER


def spd(key, n, rank=None):
    rank = rank or 2 * n
    q = jax.random.normal(key, (n, rank))
    return q @ q.T / rank


def make_models(key, shapes, m):
    keys = jax.random.split(key, m)
    return [
        {
            name: jax.random.normal(jax.random.fold_in(k, i), s)
            for i, (name, s) in enumerate(shapes.items())
        }
        for k in keys
    ]


# --- per_block_cg -----------------------------------------------------------


def batched_system(key, n_blocks=3, n=8):
    a = jnp.stack(
        [
            spd(jax.random.fold_in(key, i), n) + 0.05 * jnp.eye(n)
            for i in range(n_blocks)
        ]
    )
    b = jax.random.normal(jax.random.fold_in(key, 99), (n_blocks, n))
    return a, b


def test_cg_matches_jax_scipy_cg_step_for_step():
    a, b = batched_system(jax.random.PRNGKey(0))
    x0 = jnp.zeros_like(b)
    for steps in (1, 2, 5):
        ours, info = per_block_cg(
            lambda v: jnp.einsum("bij,bj->bi", a, v),
            b,
            x0,
            maxiter=steps,
            tol=0.0,
            check_every=0,
        )
        for i in range(b.shape[0]):
            ref, _ = jax.scipy.sparse.linalg.cg(
                lambda v, i=i: a[i] @ v, b[i], x0[i], tol=0.0, maxiter=steps
            )
            np.testing.assert_allclose(ours[i], ref, rtol=1e-4, atol=1e-5)
        assert info.iterations.tolist() == [steps] * b.shape[0]
        assert info.status.tolist() == [MAXITER] * b.shape[0]


def test_cg_matches_dense_solve_and_reports_per_block():
    a, b = batched_system(jax.random.PRNGKey(1))
    x0 = jax.random.normal(jax.random.PRNGKey(2), b.shape)
    x, info = per_block_cg(
        lambda v: jnp.einsum("bij,bj->bi", a, v), b, x0, maxiter=200, tol=1e-6
    )
    np.testing.assert_allclose(
        x, jnp.linalg.solve(a, b[..., None])[..., 0], rtol=1e-3, atol=1e-4
    )
    assert (info.status == CONVERGED).all()
    assert (info.iterations <= 8 + 2).all()  # n = 8 unknowns per block
    initial = jnp.linalg.norm(
        b - jnp.einsum("bij,bj->bi", a, x0), axis=1
    ) / jnp.linalg.norm(b, axis=1)
    np.testing.assert_allclose(info.initial_residual, initial, rtol=1e-5)
    assert (info.final_residual < 1e-5).all()


def test_cg_blocks_stop_independently():
    # One block is the identity (1 step), the other needs several.
    a = jnp.stack([jnp.eye(6), spd(jax.random.PRNGKey(3), 6) + 0.1 * jnp.eye(6)])
    b = jnp.ones((2, 6))
    x, info = per_block_cg(
        lambda v: jnp.einsum("bij,bj->bi", a, v),
        b,
        jnp.zeros_like(b),
        maxiter=50,
        tol=1e-6,
    )
    assert info.iterations[0] == 1 and info.iterations[1] > 1
    np.testing.assert_allclose(x[0], jnp.ones(6), rtol=1e-6)


def test_cg_keeps_init_in_null_space():
    # A singular SPD system: CG never moves x0 along the null space.
    a = jnp.diag(jnp.array([3.0, 1.0, 0.0]))[None]
    b = jnp.array([[3.0, 2.0, 0.0]])
    x0 = jnp.array([[5.0, 5.0, 7.0]])
    x, info = per_block_cg(
        lambda v: jnp.einsum("bij,bj->bi", a, v), b, x0, maxiter=10, tol=1e-7
    )
    np.testing.assert_allclose(x, [[1.0, 2.0, 7.0]], rtol=1e-6)
    assert info.status[0] == CONVERGED


def test_cg_stops_a_diverging_block_and_returns_its_best_iterate():
    # A singular system whose right side is NOT in the range of A (as rounding
    # noise makes it in float32): CG's iterates grow without bound along the null
    # space while the recursive residual looks fine. The true-residual check
    # catches it and returns the best iterate seen.
    n = 40
    values = jnp.concatenate([jnp.logspace(0, -3, n - 2), jnp.zeros(2)])
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(4), (n, n)))
    a = (q * values) @ q.T
    b = a @ jax.random.normal(jax.random.PRNGKey(5), (n,)) + 1e-3 * q[:, -1]
    matvec = lambda v: jnp.einsum("ij,bj->bi", a, v)  # noqa: E731
    unguarded, _ = per_block_cg(
        matvec, b[None], jnp.zeros((1, n)), maxiter=3000, tol=0.0, check_every=0
    )
    guarded, info = per_block_cg(
        matvec, b[None], jnp.zeros((1, n)), maxiter=3000, tol=0.0, check_every=10
    )
    least_squares = jnp.linalg.pinv(a) @ b
    err_unguarded = float(jnp.linalg.norm(unguarded[0] - least_squares))
    err_guarded = float(jnp.linalg.norm(guarded[0] - least_squares))
    assert info.status[0] in (DIVERGED, BREAKDOWN)
    assert err_guarded < 0.1 * err_unguarded, (err_guarded, err_unguarded)


def test_cg_with_exact_preconditioner_converges_in_one_step():
    a, b = batched_system(jax.random.PRNGKey(6))
    inv = jnp.linalg.inv(a)
    x, info = per_block_cg(
        lambda v: jnp.einsum("bij,bj->bi", a, v),
        b,
        jnp.zeros_like(b),
        maxiter=20,
        tol=1e-5,
        precond=lambda r: jnp.einsum("bij,bj->bi", inv, r),
    )
    assert (info.iterations == 1).all()
    np.testing.assert_allclose(
        x, jnp.linalg.solve(a, b[..., None])[..., 0], rtol=1e-3, atol=1e-4
    )


# --- the solver on statistic pytrees ------------------------------------------------


def kfac_problem(key, m=3, shape=(4, 3), with_bias=True):
    models = make_models(
        key, {"kernel": shape, **({"bias": (shape[-1],)} if with_bias else {})}, m
    )
    stats = []
    for t in range(m):
        k = jax.random.fold_in(key, 100 + t)
        stats.append(
            {
                "kernel": KFAC(
                    spd(k, shape[0]), spd(jax.random.fold_in(k, 1), shape[1])
                ),
                **({"bias": None} if with_bias else {}),
            }
        )
    return models, stats


def explicit_kfac_solution(models, stats, weights, leaf="kernel"):
    total = sum(
        w
        * np.kron(np.asarray(s[leaf].a, np.float64), np.asarray(s[leaf].g, np.float64))
        for w, s in zip(weights, stats)
    )
    rhs = sum(
        w
        * np.kron(np.asarray(s[leaf].a, np.float64), np.asarray(s[leaf].g, np.float64))
        @ np.asarray(mdl[leaf], np.float64).reshape(-1)
        for w, s, mdl in zip(weights, stats, models)
    )
    return np.linalg.solve(total, rhs).reshape(models[0][leaf].shape)


@pytest.mark.parametrize("preconditioner", [False, True])
def test_mats_kfac_equals_dense_solve_of_explicit_kronecker_sum(preconditioner):
    models, stats = kfac_problem(jax.random.PRNGKey(10))
    weights = [1.0, 2.0, 0.5]
    result = mats(
        models,
        stats,
        weights=weights,
        maxiter=500,
        tol=1e-7,
        preconditioner=preconditioner,
    )
    np.testing.assert_allclose(
        result.params["kernel"],
        explicit_kfac_solution(models, stats, weights),
        rtol=1e-3,
        atol=1e-4,
    )
    # The bias has no statistic: weighted average, and the report says so.
    expected_bias = sum(w * m["bias"] for w, m in zip(weights, models)) / sum(weights)
    np.testing.assert_allclose(result.params["bias"], expected_bias, rtol=1e-6)
    assert result.report["bias"].solver == "fallback:average"
    assert result.report["kernel"].solver == "cg"
    assert int(result.report["kernel"].status[0]) == CONVERGED


def test_preconditioner_reduces_iterations_on_ill_conditioned_kfac():
    key = jax.random.PRNGKey(11)
    n_in, n_out = 24, 16
    spectrum_in = jnp.logspace(0, -4, n_in)
    spectrum_out = jnp.logspace(0, -3, n_out)
    q_in, _ = jnp.linalg.qr(jax.random.normal(key, (n_in, n_in)))
    q_out, _ = jnp.linalg.qr(
        jax.random.normal(jax.random.fold_in(key, 1), (n_out, n_out))
    )
    models = make_models(key, {"kernel": (n_in, n_out)}, 3)
    stats = []
    for t in range(3):
        # Shared eigenvectors with task-specific spectra and scales, plus a small
        # task-specific perturbation: the nearest Kronecker product is close.
        pert = 1e-3 * spd(jax.random.fold_in(key, 50 + t), n_in)
        a = (q_in * spectrum_in ** (1 + 0.1 * t)) @ q_in.T + pert
        g = (q_out * spectrum_out) @ q_out.T * (t + 1)
        stats.append({"kernel": KFAC(a, g)})
    plain = mats(models, stats, maxiter=5000, tol=1e-5)
    pre = mats(models, stats, maxiter=5000, tol=1e-5, preconditioner=True)
    it_plain = int(plain.report["kernel"].iterations[0])
    it_pre = int(pre.report["kernel"].iterations[0])
    assert it_pre * 3 < it_plain, (it_pre, it_plain)
    # Both reach the tolerance in the true residual. (With condition numbers
    # near 1e8 the two iterates may still differ in the flattest directions.)
    for result in (plain, pre):
        assert int(result.report["kernel"].status[0]) == CONVERGED
        assert float(result.report["kernel"].final_residual[0]) < 3e-5


def test_mats_with_diagonal_statistics_equals_fisher_merge():
    key = jax.random.PRNGKey(12)
    models = make_models(key, {"w": (5, 3), "b": (3,)}, 3)
    fishers = [
        {
            "w": jax.random.uniform(jax.random.fold_in(key, t), (5, 3)) + 0.1,
            "b": jnp.ones(3) * (t + 1),
        }
        for t in range(3)
    ]
    reference = fisher_merge(models, fishers, weights=[1.0, 2.0, 3.0]).params
    stats = [jax.tree.map(Diagonal, f) for f in fishers]
    # Preconditioned (Jacobi is exact for a diagonal) and plain CG (15 distinct values).
    for preconditioner, maxiter in ((True, 3), (False, 100)):
        got = mats(
            models,
            stats,
            weights=[1.0, 2.0, 3.0],
            maxiter=maxiter,
            tol=1e-7,
            preconditioner=preconditioner,
        ).params
        for leaf in ("w", "b"):
            np.testing.assert_allclose(got[leaf], reference[leaf], rtol=1e-4, atol=1e-5)


def test_fisher_merge_matches_hand_formula_with_floor():
    models = [{"w": jnp.array([1.0, 2.0, 3.0])}, {"w": jnp.array([3.0, 6.0, -3.0])}]
    fishers = [{"w": jnp.array([1.0, 0.0, 0.0])}, {"w": jnp.array([3.0, 0.0, 1e-9])}]
    got = fisher_merge(models, fishers, floor=1e-6).params["w"]
    # entry 0: (1·1 + 3·3)/4; entry 1: both floored, plain mean; entry 2: floors
    # 1e-6 and 1e-6 (1e-9 floored), plain mean.
    np.testing.assert_allclose(got, [2.5, 4.0, 0.0], rtol=1e-5, atol=1e-5)


def fisher_formula(models, fishers, weights, floor):
    """Σ_m w_m max(F_m, ε) θ_m / Σ_m w_m max(F_m, ε), entry by entry, in float64."""
    w = np.asarray(weights, np.float64)[:, None]
    f = np.maximum(np.stack([np.asarray(x, np.float64) for x in fishers]), floor)
    theta = np.stack([np.asarray(m, np.float64) for m in models])
    return np.sum(w * f * theta, axis=0) / np.sum(w * f, axis=0)


def test_fisher_merge_floor_changes_the_answer_as_the_formula_says():
    # Fisher values below, near and above a floor of 0.2, from two tasks of
    # unequal weight: where a task's Fisher is under the floor it counts as 0.2.
    thetas = [
        np.array([1.0, 2.0, 3.0, -1.0, 4.0]),
        np.array([5.0, -2.0, 0.0, 3.0, 8.0]),
    ]
    fishers = [
        np.array([0.05, 0.0, 1.0, 0.3, 0.0]),
        np.array([0.5, 0.1, 0.01, 0.19, 0.0]),
    ]
    weights = [1.0, 3.0]
    floor = 0.2
    got = fisher_merge(
        [{"w": jnp.asarray(t)} for t in thetas],
        [{"w": jnp.asarray(f)} for f in fishers],
        weights=weights,
        floor=floor,
    ).params["w"]
    expected = fisher_formula(thetas, fishers, weights, floor)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    # The floor matters on this input: the unfloored merge (where some task
    # sees the entry) and an additive floor, F + ε, give other answers.
    seen = np.max(np.stack(fishers), axis=0) > 0
    with np.errstate(invalid="ignore"):  # 0/0 where no task sees the entry
        unfloored = fisher_formula(thetas, fishers, weights, 0.0)
    assert np.count_nonzero(np.abs(expected - unfloored)[seen] > 0.1) >= 3
    additive = fisher_formula(thetas, [f + floor for f in fishers], weights, 0.0)
    assert np.max(np.abs(expected - additive)) > 0.1
    # Floor 0: entries no task sees keep the start, the weighted average.
    zero_floor = fisher_merge(
        [{"w": jnp.asarray(t)} for t in thetas],
        [{"w": jnp.asarray(f)} for f in fishers],
        weights=weights,
        floor=0.0,
    ).params["w"]
    average = (thetas[0] + 3 * thetas[1]) / 4
    np.testing.assert_allclose(zero_floor[seen], unfloored[seen], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(zero_floor[~seen], average[~seen], rtol=1e-6)


@pytest.mark.parametrize("preconditioner", [False, True])
def test_mats_with_gram_statistics_equals_regmean(preconditioner):
    key = jax.random.PRNGKey(13)
    models = make_models(key, {"kernel": (6, 4), "bias": (4,)}, 3)
    grams = [
        {"kernel": Gram(spd(jax.random.fold_in(key, t), 6)), "bias": None}
        for t in range(3)
    ]
    reference = regmean(models, grams, alpha=1.0, weights=[1.0, 0.5, 2.0]).params
    got = mats(
        models,
        grams,
        weights=[1.0, 0.5, 2.0],
        maxiter=200,
        tol=1e-7,
        preconditioner=preconditioner,
    ).params
    np.testing.assert_allclose(got["kernel"], reference["kernel"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got["bias"], reference["bias"], rtol=1e-6)


def test_regmean_matches_explicit_least_squares_with_alpha():
    key = jax.random.PRNGKey(14)
    models = make_models(key, {"kernel": (5, 3)}, 2)
    xs = [jax.random.normal(jax.random.fold_in(key, t), (20, 5)) for t in range(2)]
    grams = [{"kernel": Gram(x.T @ x)} for x in xs]
    alpha = 0.7
    shrunk = [
        alpha * np.asarray(x.T @ x)
        + (1 - alpha) * np.diag(np.diag(np.asarray(x.T @ x)))
        for x in xs
    ]
    expected = np.linalg.solve(
        sum(shrunk), sum(s @ np.asarray(m["kernel"]) for s, m in zip(shrunk, models))
    )
    got = regmean(models, grams, alpha=alpha).params["kernel"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # With alpha = 1 RegMean is the exact joint least-squares fit of all tasks'
    # outputs: the gradient of Σ_m ‖X_m W − X_m W_m‖² vanishes at the merge.
    merged = regmean(models, grams, alpha=1.0).params["kernel"]
    grad = sum(x.T @ (x @ merged - x @ m["kernel"]) for x, m in zip(xs, models))
    assert float(jnp.max(jnp.abs(grad))) < 1e-3


def test_regmean_singular_gram_keeps_average_in_null_space():
    models = [{"k": jnp.array([[1.0], [4.0]])}, {"k": jnp.array([[3.0], [0.0]])}]
    dead_second_input = jnp.diag(jnp.array([1.0, 0.0]))
    grams = [{"k": Gram(dead_second_input)}, {"k": Gram(3 * dead_second_input)}]
    got = regmean(models, grams, alpha=1.0).params["k"]
    np.testing.assert_allclose(got, [[2.5], [2.0]], rtol=1e-6)


def test_dense_statistic_solves_the_full_block():
    key = jax.random.PRNGKey(15)
    models = make_models(key, {"ia3": (6,)}, 3)
    stats = [{"ia3": Dense(spd(jax.random.fold_in(key, t), 6))} for t in range(3)]
    total = sum(np.asarray(s["ia3"].f, np.float64) for s in stats)
    rhs = sum(
        np.asarray(s["ia3"].f, np.float64) @ np.asarray(m["ia3"], np.float64)
        for s, m in zip(stats, models)
    )
    expected = np.linalg.solve(total, rhs)
    for method in ("cg", "closed_form"):
        got = solve(models, stats, method=method, maxiter=100, tol=1e-7).params["ia3"]
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_scanned_layers_get_one_system_per_layer():
    # A (layers, in, out) kernel with per-layer factors equals solving each
    # layer as its own leaf.
    key = jax.random.PRNGKey(16)
    n_layers, shape, m = 3, (4, 3), 2
    models = make_models(key, {"kernel": (n_layers, *shape)}, m)
    factors = [
        [
            (
                spd(jax.random.fold_in(key, 10 * t + layer), 4),
                spd(jax.random.fold_in(key, 100 + 10 * t + layer), 3),
            )
            for layer in range(n_layers)
        ]
        for t in range(m)
    ]
    stacked_stats = [
        {"kernel": KFAC(jnp.stack([f[0] for f in fs]), jnp.stack([f[1] for f in fs]))}
        for fs in factors
    ]
    stacked = mats(models, stacked_stats, maxiter=300, tol=1e-7)
    assert stacked.report["kernel"].iterations.shape == (n_layers,)
    for layer in range(n_layers):
        per_layer_models = [{"kernel": mdl["kernel"][layer]} for mdl in models]
        per_layer_stats = [{"kernel": KFAC(*fs[layer])} for fs in factors]
        expected = explicit_kfac_solution(per_layer_models, per_layer_stats, [1.0] * m)
        np.testing.assert_allclose(
            stacked.params["kernel"][layer], expected, rtol=1e-3, atol=1e-4
        )


def test_dense_general_axes_match_reshaped_kernel():
    # A (in, heads, head_dim) projection merges like the same kernel reshaped to
    # (in, heads·head_dim) with the same factors.
    key = jax.random.PRNGKey(17)
    models = make_models(key, {"q": (5, 2, 3)}, 2)
    raw = [
        (spd(jax.random.fold_in(key, t), 5), spd(jax.random.fold_in(key, 10 + t), 6))
        for t in range(2)
    ]
    stats = [{"q": KFAC(a, g, in_axes=(0,), out_axes=(1, 2))} for a, g in raw]
    got = mats(models, stats, maxiter=300, tol=1e-7).params["q"]
    flat_models = [{"q": mdl["q"].reshape(5, 6)} for mdl in models]
    expected = explicit_kfac_solution(
        flat_models, [{"q": KFAC(a, g)} for a, g in raw], [1.0, 1.0], leaf="q"
    )
    np.testing.assert_allclose(got.reshape(5, 6), expected, rtol=1e-3, atol=1e-4)


def test_grouping_same_shaped_blocks_does_not_change_the_answer():
    key = jax.random.PRNGKey(18)
    models = make_models(key, {"a": (4, 3), "b": (4, 3), "c": (3, 4)}, 2)
    stats = [
        {
            name: KFAC(
                spd(jax.random.fold_in(key, 10 * t + i), s[0]),
                spd(jax.random.fold_in(key, 100 + 10 * t + i), s[1]),
            )
            for i, (name, s) in enumerate(
                {"a": (4, 3), "b": (4, 3), "c": (3, 4)}.items()
            )
        }
        for t in range(2)
    ]
    grouped = mats(models, stats, maxiter=300, tol=1e-7, group_blocks=True)
    separate = mats(models, stats, maxiter=300, tol=1e-7, group_blocks=False)
    for leaf in ("a", "b", "c"):
        np.testing.assert_allclose(
            grouped.params[leaf], separate.params[leaf], rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            grouped.params[leaf],
            explicit_kfac_solution(models, stats, [1.0, 1.0], leaf),
            rtol=1e-3,
            atol=1e-4,
        )


def test_damping_pulls_toward_init_and_is_relative():
    models, stats = kfac_problem(jax.random.PRNGKey(19), with_bias=False)
    init = {"kernel": jnp.zeros((4, 3))}
    undamped = mats(models, stats, init=init, maxiter=500, tol=1e-7).params["kernel"]
    damped = mats(models, stats, init=init, damping=10.0, maxiter=500, tol=1e-7).params[
        "kernel"
    ]
    assert float(jnp.linalg.norm(damped)) < float(jnp.linalg.norm(undamped))
    # Explicit: (S + δ I) θ = b + δ θ_init with δ = damping · mean diag(S).
    total = sum(
        np.kron(
            np.asarray(s["kernel"].a, np.float64), np.asarray(s["kernel"].g, np.float64)
        )
        for s in stats
    )
    delta = 10.0 * np.mean(np.diag(total))
    rhs = sum(
        np.kron(
            np.asarray(s["kernel"].a, np.float64), np.asarray(s["kernel"].g, np.float64)
        )
        @ np.asarray(m["kernel"], np.float64).reshape(-1)
        for s, m in zip(stats, models)
    )
    expected = np.linalg.solve(total + delta * np.eye(12), rhs).reshape(4, 3)
    np.testing.assert_allclose(damped, expected, rtol=1e-3, atol=1e-4)
    # Scaling every statistic by 1000 leaves the relative damping's answer unchanged.
    scaled = [{"kernel": KFAC(1000 * s["kernel"].a, s["kernel"].g)} for s in stats]
    rescaled = mats(
        models, scaled, init=init, damping=10.0, maxiter=500, tol=1e-7
    ).params["kernel"]
    np.testing.assert_allclose(rescaled, damped, rtol=1e-3, atol=1e-4)


# --- damping toward init, checked against the dense damped system -----------------


def blocks_of(stat, shape):
    """C as dense float64 matrices, one per block (a Gram or KFAC leaf's leading axis)."""
    if isinstance(stat, Diagonal):
        return [np.diag(np.asarray(stat.f, np.float64).reshape(-1))]
    if isinstance(stat, Dense):
        return [np.asarray(stat.f, np.float64)]
    a = np.asarray(stat.a, np.float64).reshape(-1, shape[-2], shape[-2])
    if isinstance(stat, KFAC):
        g = np.asarray(stat.g, np.float64).reshape(-1, shape[-1], shape[-1])
    else:
        g = np.broadcast_to(np.eye(shape[-1]), (a.shape[0], shape[-1], shape[-1]))
    return [np.kron(a_b, g_b) for a_b, g_b in zip(a, g)]


def damped_solution(models, stats, weights, init, damping, per_block=True, pull=True):
    """Per block: (S + δI) θ = Σ_m w_m C_m θ_m + δ θ_init, S = Σ_m w_m C_m.

    δ = damping · mean diag(S) of the block. ``per_block=False`` takes one δ
    for the whole leaf and ``pull=False`` drops δ θ_init: the answers of two
    plausible bugs, which the tests check their inputs tell apart.
    """
    shape = models[0]["k"].shape
    per_task = [blocks_of(s["k"], shape) for s in stats]
    n = per_task[0][0].shape[0]
    thetas = [np.asarray(m["k"], np.float64).reshape(-1, n) for m in models]
    start = np.asarray(init["k"], np.float64).reshape(-1, n)
    totals = [
        sum(w * c[b] for w, c in zip(weights, per_task)) for b in range(len(start))
    ]
    deltas = [damping * np.mean(np.diag(t)) for t in totals]
    if not per_block:
        deltas = [np.mean(deltas)] * len(deltas)
    out = []
    for b, (total, delta) in enumerate(zip(totals, deltas)):
        rhs = sum(w * c[b] @ t[b] for w, c, t in zip(weights, per_task, thetas))
        rhs = rhs + (delta * start[b] if pull else 0.0)
        out.append(np.linalg.solve(total + delta * np.eye(n), rhs))
    return np.concatenate(out).reshape(shape)


def two_scales(build):
    """A stacked statistic whose second block is 100 times the first."""
    return lambda key: jax.tree.map(
        lambda x, y: jnp.stack([x, 100 * y]),
        build(key),
        build(jax.random.fold_in(key, 7)),
    )


DAMPED_CASES = {
    # name: (leaf shape, statistic builder, solve options)
    "kfac cg": (
        (4, 3),
        lambda k: KFAC(spd(k, 4), spd(jax.random.fold_in(k, 1), 3)),
        {},
    ),
    "kfac cg, two blocks of different scales": (
        (2, 4, 3),
        two_scales(lambda k: KFAC(spd(k, 4), spd(jax.random.fold_in(k, 1), 3))),
        {},
    ),
    "kfac preconditioned": (
        (4, 3),
        lambda k: KFAC(spd(k, 4), spd(jax.random.fold_in(k, 1), 3)),
        {"preconditioner": True},
    ),
    "gram closed form, two blocks": (
        (2, 4, 3),
        two_scales(lambda k: Gram(spd(k, 4))),
        {"method": "closed_form"},
    ),
    "gram cg": ((4, 3), lambda k: Gram(spd(k, 4)), {}),
    "dense closed form": ((6,), lambda k: Dense(spd(k, 6)), {"method": "closed_form"}),
    "dense cg": ((6,), lambda k: Dense(spd(k, 6)), {}),
    "diagonal closed form": (
        (4, 3),
        lambda k: Diagonal(jax.random.uniform(k, (4, 3)) + 0.1),
        {"method": "closed_form"},
    ),
    "diagonal cg": (
        (4, 3),
        lambda k: Diagonal(jax.random.uniform(k, (4, 3)) + 0.1),
        {},
    ),
}


@pytest.mark.parametrize("case", tuple(DAMPED_CASES))
def test_damping_pulls_toward_a_nonzero_init(case):
    # A non-zero init far from every model: "toward init" is not "toward zero",
    # and blocks of different scales get different δ.
    shape, build, options = DAMPED_CASES[case]
    key = jax.random.PRNGKey(26)
    models = make_models(key, {"k": shape}, 3)
    stats = [{"k": build(jax.random.fold_in(key, 100 + t))} for t in range(3)]
    weights = [1.0, 2.0, 0.5]
    init = {"k": 3.0 + jax.random.normal(jax.random.fold_in(key, 9), shape)}
    damping = 0.5
    got = solve(
        models,
        stats,
        init=init,
        weights=weights,
        damping=damping,
        maxiter=500,
        tol=1e-7,
        **options,
    ).params["k"]
    expected = damped_solution(models, stats, weights, init, damping)
    # The systems are well conditioned (damping adds half the mean curvature):
    # every case's float32 solve is within 1.5e-6 of the solution (measured).
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
    # The input tells the right answer from the plausible wrong ones by far more
    # than the tolerance: δ θ_init dropped, and (with blocks) one δ per leaf.
    toward_zero = damped_solution(models, stats, weights, init, damping, pull=False)
    assert np.max(np.abs(expected - toward_zero)) > 0.1
    if len(blocks_of(stats[0]["k"], shape)) > 1:
        one_delta = damped_solution(
            models, stats, weights, init, damping, per_block=False
        )
        assert np.max(np.abs(expected - one_delta)) > 0.1
    # Damped, the merge lies between the undamped solution and init.
    undamped = damped_solution(models, stats, weights, init, 0.0)
    assert np.linalg.norm(got - init["k"]) < np.linalg.norm(undamped - init["k"])


def test_init_and_early_stopping_matter():
    models, stats = kfac_problem(jax.random.PRNGKey(20), with_bias=False)
    inits = [{"kernel": jnp.zeros((4, 3))}, {"kernel": jnp.ones((4, 3))}]
    early = [
        mats(models, stats, init=i, maxiter=1, tol=0.0).params["kernel"] for i in inits
    ]
    assert float(jnp.max(jnp.abs(early[0] - early[1]))) > 1e-2
    converged = [
        mats(models, stats, init=i, maxiter=300, tol=1e-7).params["kernel"]
        for i in inits
    ]
    np.testing.assert_allclose(converged[0], converged[1], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("fallback", ["average", "init", "given"])
def test_fallback_rules(fallback):
    models, stats = kfac_problem(jax.random.PRNGKey(21))
    init = jax.tree.map(lambda x: x + 10.0, models[0])
    base = jax.tree.map(lambda x: x - 10.0, models[0])
    rule = base if fallback == "given" else fallback
    result = mats(models, stats, init=init, fallback=rule, maxiter=5, tol=0.0)
    expected = {
        "average": (models[0]["bias"] + models[1]["bias"] + models[2]["bias"]) / 3,
        "init": init["bias"],
        "given": base["bias"],
    }[fallback]
    np.testing.assert_allclose(result.params["bias"], expected, rtol=1e-6)
    assert result.report["bias"].solver == f"fallback:{fallback}"
    # Every leaf is present in the merged tree (none silently dropped).
    assert jax.tree.structure(result.params) == jax.tree.structure(models[0])


@pytest.mark.filterwarnings("ignore::mats_jax.ConvergenceWarning")
def test_sweeps_reuse_the_compiled_solver(caplog):
    models, stats = kfac_problem(jax.random.PRNGKey(22), shape=(5, 7))

    def sweep(maxiter, tol, damping, scale):
        init = mats_jax.task_arithmetic(models[0], models, scale=scale)
        for _ in range(2):
            mats(
                models,
                stats,
                init=init,
                maxiter=maxiter,
                tol=tol,
                damping=damping,
                weights=[1.0, 2.0, scale],
            )

    mats(models, stats, maxiter=10)
    sweep(10, 1e-5, 0.0, 0.5)  # compiles the solve with an init pytree
    # jax.log_compiles logs every compilation: the sweep must log none.
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for maxiter, tol, damping, scale in (
            (3, 0.0, 0.0, 0.1),
            (50, 1e-4, 0.1, 0.7),
            (7, 1e-6, 1.0, 1.3),
        ):
            sweep(maxiter, tol, damping, scale)
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiled == []


def test_unconverged_cg_warns_and_reports():
    models, stats = kfac_problem(jax.random.PRNGKey(23), shape=(8, 6))
    with pytest.warns(mats_jax.ConvergenceWarning, match="kernel: maxiter"):
        result = mats(models, stats, maxiter=2, tol=1e-8)
    assert mats_jax.STATUS_NAMES[int(result.report["kernel"].status[0])] == "maxiter"
    assert int(result.report["kernel"].iterations[0]) == 2
    assert "kernel" in mats_jax.format_report(result.report)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mats_jax.ConvergenceWarning)
        mats(models, stats, maxiter=500, tol=1e-5)  # converges: no warning
        # No step asked for: the initialisation itself, reported, not warned of.
        init = jax.tree.map(lambda x: x + 1.0, models[0])
        still = mats(models, stats, init=init, maxiter=0, tol=1e-8)
    assert int(still.report["kernel"].iterations[0]) == 0
    np.testing.assert_array_equal(still.params["kernel"], init["kernel"])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_parameters_merge_in_float32_and_keep_their_dtype(dtype):
    models, stats = kfac_problem(jax.random.PRNGKey(24))
    low = [jax.tree.map(lambda x: x.astype(dtype), m) for m in models]
    got = mats(low, stats, maxiter=300, tol=1e-6).params
    assert got["kernel"].dtype == dtype and got["bias"].dtype == dtype
    reference = mats(
        [jax.tree.map(lambda x: x.astype(jnp.float32), m) for m in low],
        stats,
        maxiter=300,
        tol=1e-6,
    ).params
    np.testing.assert_allclose(
        got["kernel"].astype(jnp.float32),
        reference["kernel"].astype(dtype).astype(jnp.float32),
    )


def test_mats_under_outer_jit_equals_eager():
    models, stats = kfac_problem(jax.random.PRNGKey(25))
    eager = mats(models, stats, maxiter=20, tol=0.0)
    jitted = jax.jit(lambda ms, ss, n: mats(ms, ss, maxiter=n, tol=0.0))(
        models, stats, 20
    )
    np.testing.assert_allclose(
        jitted.params["kernel"], eager.params["kernel"], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(
        jitted.report["kernel"].iterations, eager.report["kernel"].iterations
    )


def test_float64_precision_in_a_subprocess():
    # jax_enable_x64 is process-wide, so the check runs in its own interpreter.
    script = textwrap.dedent(
        """
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp, numpy as np
        from mats_jax import KFAC, mats
        key = jax.random.PRNGKey(0)
        def spd(k, n):
            q = jax.random.normal(k, (n, 2 * n), jnp.float32)
            return q @ q.T
        models = [{"k": jax.random.normal(jax.random.fold_in(key, t), (6, 5), jnp.float32)} for t in range(3)]
        stats = [{"k": KFAC(spd(jax.random.fold_in(key, 10 + t), 6), spd(jax.random.fold_in(key, 20 + t), 5))} for t in range(3)]
        out = mats(models, stats, precision="float64", maxiter=500, tol=1e-12)
        assert out.params["k"].dtype == jnp.float32, out.params["k"].dtype
        res = float(out.report["k"].final_residual[0])
        assert res < 1e-10, res
        print("ok", res)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")


def test_preconditioned_solve_of_several_groups_does_not_hang():
    # jaxlib 0.10's batched CPU eigh waits on the intra-op pool; two at once hung
    # this 2-core machine for good (this script, 3 runs out of 3, before the
    # fix). The solver decomposes one matrix at a time, in order (EighSequence);
    # a hang fails here by the timeout, not CI's.
    script = textwrap.dedent(
        """
        import jax, mats_jax
        def spd(key, n):
            x = jax.random.normal(key, (2 * n, n))
            return x.T @ x / (2 * n)
        shapes = [(64, 64)] * 8 + [(64, 256), (256, 64)] * 2
        ks = iter(jax.random.split(jax.random.PRNGKey(0), 200))
        models = [{f"w{i}": jax.random.normal(next(ks), s) for i, s in enumerate(shapes)}
                  for _ in range(4)]
        stats = [{f"w{i}": mats_jax.KFAC(spd(next(ks), s[0]), spd(next(ks), s[1]))
                  for i, s in enumerate(shapes)} for _ in range(4)]
        grams = [{k: mats_jax.Gram(v.a) for k, v in s.items()} for s in stats]
        for grouped in (True, False, True):
            out = mats_jax.mats(models, stats, maxiter=1, tol=0.0, preconditioner=True,
                                group_blocks=grouped)
            jax.block_until_ready(out.params)
            jax.block_until_ready(mats_jax.regmean(models, grams).params)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_grams_with_one_input_size_and_different_output_sizes():
    models = [
        {"q": jnp.ones((4, 4)), "wi": jnp.ones((4, 8))},
        {"q": jnp.zeros((4, 4)), "wi": jnp.zeros((4, 8))},
    ]
    grams = [{"q": Gram(jnp.eye(4)), "wi": Gram(jnp.eye(4))} for _ in models]
    merged = regmean(models, grams, alpha=1.0).params
    np.testing.assert_allclose(merged["wi"], 0.5 * jnp.ones((4, 8)), rtol=1e-6)
    np.testing.assert_allclose(merged["q"], 0.5 * jnp.ones((4, 4)), rtol=1e-6)


@pytest.mark.parametrize(
    ("stat", "options"),
    [
        (lambda t: mats_jax.KFAC(t * jnp.eye(4), jnp.eye(3)), {"preconditioner": True}),
        (lambda t: mats_jax.Gram(t * jnp.eye(4)), {"method": "closed_form"}),
        (lambda t: mats_jax.Dense(t * jnp.eye(12)), {}),
    ],
    ids=["kfac-preconditioned", "gram-closed-form", "dense-cg"],
)
def test_every_product_of_the_solve_runs_at_full_float32_precision(
    stat: Any, options: dict[str, Any]
) -> None:
    # On GPUs and TPUs a float32 matmul at default precision is TF32 or bf16
    # passes, which caps CG's attainable residual near 1e-3. The CPU computes
    # in float32 either way, so the lowered program is what can be checked here.
    models = [{"k": jnp.full((4, 3), float(t))} for t in (1, 2)]
    stats = [{"k": stat(float(t))} for t in (1, 2)]
    text = mats_jax.lower_solve(models, stats, **options).as_text()
    dots = re.findall(r"stablehlo\.(?:dot_general|dot)\b[^\n]*", text)
    assert dots
    assert all("precision = [HIGHEST, HIGHEST]" in d for d in dots), dots


def _consume_problem(kind):
    """Models, base and statistics of ``kind`` for a consuming merge: two
    kernels of one block shape (one group), a stacked kernel (a block per
    layer), a bias, and a leaf without a statistic."""
    key = jax.random.key(11)
    shapes = {"k": (6, 4), "k2": (6, 4), "stack": (2, 6, 4), "b": (4,), "s": (3,)}
    base = {
        n: jax.random.normal(jax.random.fold_in(key, i), s)
        for i, (n, s) in enumerate(shapes.items())
    }
    models = [
        {
            n: base[n] + jax.random.normal(jax.random.fold_in(key, 10 * m + i), s)
            for i, (n, s) in enumerate(shapes.items())
        }
        for m in range(1, 4)
    ]

    def spd_(i, lead, n):
        q = jax.random.normal(jax.random.fold_in(key, 100 + i), (*lead, n, 2 * n))
        return q @ jnp.swapaxes(q, -1, -2) / (2 * n) + 0.1 * jnp.eye(n)

    def task(m):
        if kind is None:
            return None
        if kind is Diagonal:
            return {
                n: Diagonal(
                    jnp.abs(jax.random.normal(jax.random.fold_in(key, 50 + m), s))
                )
                for n, s in shapes.items()
            } | {"s": None}
        kernels = {
            "k": (spd_(10 * m, (), 6), spd_(10 * m + 1, (), 4), (0,), (1,)),
            "k2": (spd_(10 * m + 2, (), 6), spd_(10 * m + 3, (), 4), (0,), (1,)),
            "stack": (spd_(10 * m + 4, (2,), 6), spd_(10 * m + 5, (2,), 4), (1,), (2,)),
        }
        if kind is Gram:
            return {n: Gram(a, i, o) for n, (a, _, i, o) in kernels.items()} | {
                "b": None,
                "s": None,
            }
        return {n: KFAC(a, g, i, o) for n, (a, g, i, o) in kernels.items()} | {
            "b": Dense(spd_(10 * m + 6, (), 4)),
            "s": None,
        }

    return base, models, [task(m) for m in range(3)]


_TA = mats_jax.get_method("task_arithmetic")
_CONSUME_CASES = {
    **zoo.CASES,
    "mats_init_ta": zoo.Case(
        "mats",
        {
            "init": mats_jax.MethodCall(_TA, _TA.parameters(scale=0.4)),
            "maxiter": 7,
            "tol": 0.0,
        },
    ),
    "mats_preconditioned_damped": zoo.Case(
        "mats", {"preconditioner": True, "damping": 0.05, "maxiter": 5, "tol": 0.0}
    ),
    "mats_ungrouped_jax_scipy": zoo.Case(
        "mats",
        {"group_blocks": False, "cg": "jax_scipy", "maxiter": 5, "fallback": "base"},
    ),
}


@pytest.mark.parametrize("name", sorted(_CONSUME_CASES))
def test_a_consuming_merge_equals_the_one_program_merge_and_frees_its_inputs(name):
    # The streaming engine's way (consume=True: a staged method runs as two
    # programs, the inputs deleted in between) against the in-memory engine's
    # one program, for every registry case and solver variants.
    from mats_jax.engine import check_inputs, merge_checked

    case = _CONSUME_CASES[name]
    method = case.merge_method
    params = method.parameters(**case.parameters)
    needs = method.needs(params)
    kind = {None: None, Diagonal: Diagonal, Gram: Gram}.get(case.statistic_type, KFAC)
    weights = [1.0, 2.0, 0.5] if needs.weights else None
    high = needs.models[1]

    def run(consume):
        base, models, stats = _consume_problem(kind)
        models = models[: min(3, high or 3)]
        stats = stats[: len(models)] if kind else None
        inputs, paths, _ = check_inputs(
            method,
            params,
            models=models,
            base=base,
            statistics=stats,
            weights=weights[: len(models)] if weights else None,
            key=jax.random.key(0) if needs.key else None,
        )
        result = merge_checked(method, params, inputs, paths=paths, consume=consume)
        taken = (models, base if needs.base else None, stats)
        return result, jax.tree.leaves(taken)

    want, kept = run(False)
    got, taken = run(True)
    assert not any(x.is_deleted() for x in kept)
    assert all(x.is_deleted() for x in taken)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert jax.tree.structure(got.report) == jax.tree.structure(want.report)
