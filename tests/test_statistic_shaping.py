"""MaTS's statistics options against numpy: the off-diagonal scale of every
statistic's matrices (the paper's code's λ) and the scales equalised across
tasks, each on its own and inside the solve (a dense solve of the explicit
Kronecker sum), traced, and refused when out of range."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mats_jax
from mats_jax import (
    KFAC,
    Dense,
    Diagonal,
    Gram,
    MergeInputError,
    StatisticsInputError,
    equalise_statistic_scales,
    mats,
)
from mats_jax.stats.rescale import equalise_scales


def np_shrunk(m: np.ndarray, alpha: float) -> np.ndarray:
    """αM + (1 − α) diag(M), per trailing matrix."""
    m = np.asarray(m, np.float64)
    diag = np.diagonal(m, axis1=-2, axis2=-1)[..., :, None] * np.eye(m.shape[-1])
    return alpha * m + (1 - alpha) * diag


def spd(rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
    q = rng.normal(size=(n, 2 * n))
    return (scale * q @ q.T / (2 * n)).astype(np.float32)


# --------------------------------------------------------------------------
# The transforms alone
# --------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(alpha=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_off_diagonal_scale_of_every_statistic_type(alpha, seed):
    rng = np.random.default_rng(seed)
    a, g, f = spd(rng, 4), spd(rng, 3), spd(rng, 6)
    stacked = np.stack([spd(rng, 4), spd(rng, 4)])  # scanned layers: (2, 4, 4)
    kfac = KFAC(jnp.asarray(a), jnp.asarray(g)).off_diagonal_scaled(alpha)
    np.testing.assert_allclose(kfac.a, np_shrunk(a, alpha), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(kfac.g, np_shrunk(g, alpha), rtol=1e-6, atol=1e-7)
    gram = Gram(jnp.asarray(stacked)).off_diagonal_scaled(alpha)
    np.testing.assert_allclose(gram.a, np_shrunk(stacked, alpha), rtol=1e-6, atol=1e-7)
    dense = Dense(jnp.asarray(f)).off_diagonal_scaled(alpha)
    np.testing.assert_allclose(dense.f, np_shrunk(f, alpha), rtol=1e-6, atol=1e-7)
    diagonal = Diagonal(jnp.asarray(rng.random(5), jnp.float32))
    np.testing.assert_array_equal(diagonal.off_diagonal_scaled(alpha).f, diagonal.f)
    # The layout travels with the arrays.
    axes = Gram(jnp.asarray(a), in_axes=(0,), out_axes=(1, 2)).off_diagonal_scaled(0.5)
    assert (axes.in_axes, axes.out_axes) == ((0,), (1, 2))


def test_regmean_alpha_is_the_same_shrinkage():
    rng = np.random.default_rng(3)
    models = [
        {"k": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)} for _ in range(3)
    ]
    grams = [{"k": Gram(jnp.asarray(spd(rng, 4)))} for _ in range(3)]
    shrunk = [{"k": g["k"].off_diagonal_scaled(0.6)} for g in grams]
    want = sum(np_shrunk(g["k"].a, 0.6) for g in grams)
    rhs = sum(
        np_shrunk(g["k"].a, 0.6) @ np.asarray(m["k"]) for g, m in zip(grams, models)
    )
    np.testing.assert_allclose(
        mats_jax.regmean(models, grams, alpha=0.6).params["k"],
        np.linalg.solve(want, rhs),
        rtol=1e-4,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        mats_jax.regmean(models, grams, alpha=0.6).params["k"],
        mats_jax.regmean(models, shrunk, alpha=1.0).params["k"],
        rtol=1e-6,
    )


def np_scale(stat) -> float:
    """Mean diagonal of C: for A ⊗ G the product of the factors' mean
    diagonals, for a diagonal statistic the mean entry."""
    if isinstance(stat, KFAC):
        return float(np.mean(np.diagonal(stat.a)) * np.mean(np.diagonal(stat.g)))
    return float(np.mean(stat.f))


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scales=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=4),
)
def test_equalised_scales_are_equal_keep_their_shape_and_their_mean(seed, scales):
    rng = np.random.default_rng(seed)
    tasks = [
        {
            "k": KFAC(jnp.asarray(spd(rng, 3, s)), jnp.asarray(spd(rng, 2))),
            "b": Diagonal(jnp.asarray(s * rng.random(2) + 1e-3, jnp.float32)),
            "none": None,
        }
        for s in scales
    ]
    out = equalise_statistic_scales(tasks)
    for leaf in ("k", "b"):
        before = [np_scale(t[leaf]) for t in tasks]
        after = [np_scale(t[leaf]) for t in out]
        np.testing.assert_allclose(after, np.mean(before), rtol=1e-4)
        for t, o, s in zip(tasks, out, before):
            # C_m · s̄ / s_m: the same matrix up to that factor.
            factor = np.mean(before) / s
            if leaf == "k":
                np.testing.assert_allclose(
                    o[leaf].a, factor * np.asarray(t[leaf].a), rtol=1e-4
                )
                np.testing.assert_allclose(o[leaf].g, t[leaf].g)
            else:
                np.testing.assert_allclose(
                    o[leaf].f, factor * np.asarray(t[leaf].f), rtol=1e-4
                )
        assert all(o["none"] is None for o in out)


def test_a_task_without_a_statistic_or_with_a_zero_one_is_left_out_of_the_mean():
    stats = [
        Diagonal(jnp.array([1.0, 1.0])),
        Diagonal(jnp.array([3.0, 3.0])),
        Diagonal(jnp.zeros(2)),
        None,
    ]
    out = equalise_scales(stats)
    np.testing.assert_allclose(out[0].f, [2.0, 2.0])
    np.testing.assert_allclose(out[1].f, [2.0, 2.0])
    np.testing.assert_array_equal(out[2].f, [0.0, 0.0])
    assert out[3] is None
    assert equalise_scales([None, None]) == [None, None]


def test_statistics_of_different_structures_are_refused():
    with pytest.raises(
        StatisticsInputError, match="task 1's statistics have another structure"
    ):
        equalise_statistic_scales(
            [{"w": Diagonal(jnp.ones(2))}, {"v": Diagonal(jnp.ones(2))}]
        )
    with pytest.raises(StatisticsInputError, match="at least one task"):
        equalise_statistic_scales([])


# --------------------------------------------------------------------------
# Inside the solve
# --------------------------------------------------------------------------


def kfac_tasks(seed: int, scales=(1.0, 0.05, 3.0)):
    rng = np.random.default_rng(seed)
    models = [
        {
            "kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=3), jnp.float32),
        }
        for _ in scales
    ]
    stats = [
        {
            "kernel": KFAC(jnp.asarray(spd(rng, 4, s)), jnp.asarray(spd(rng, 3))),
            "bias": Diagonal(jnp.asarray(s * (rng.random(3) + 0.5), jnp.float32)),
        }
        for s in scales
    ]
    return models, stats


def np_mats(models, stats, weights, alpha=1.0, equalise=False):
    """The dense solve of (Σ w C̃_m) θ = Σ w C̃_m θ_m per leaf, C̃ transformed in numpy."""
    out = {}
    for leaf in ("kernel", "bias"):
        blocks = []
        for s in stats:
            stat = s[leaf]
            if isinstance(stat, KFAC):
                blocks.append(
                    np.kron(np_shrunk(stat.a, alpha), np_shrunk(stat.g, alpha))
                )
            else:
                blocks.append(np.diag(np.asarray(stat.f, np.float64)))
        if equalise:
            scales = [np.mean(np.diagonal(c)) for c in blocks]
            blocks = [c * np.mean(scales) / s for c, s in zip(blocks, scales)]
        total = sum(w * c for w, c in zip(weights, blocks))
        rhs = sum(
            w * c @ np.asarray(m[leaf], np.float64).reshape(-1)
            for w, c, m in zip(weights, blocks, models)
        )
        out[leaf] = np.linalg.solve(total, rhs).reshape(models[0][leaf].shape)
    return out


@pytest.mark.parametrize(
    "alpha, equalise", [(1.0, False), (0.6, False), (1.0, True), (0.3, True)]
)
def test_mats_with_the_options_is_the_dense_solve_of_the_transformed_statistics(
    alpha, equalise
):
    models, stats = kfac_tasks(4)
    weights = [1.0, 2.0, 0.5]
    got = mats(
        models,
        stats,
        weights=weights,
        maxiter=500,
        tol=1e-7,
        off_diagonal_scale=alpha,
        equalise_scales=equalise,
    ).params
    want = np_mats(models, stats, weights, alpha, equalise)
    for leaf in want:
        np.testing.assert_allclose(got[leaf], want[leaf], rtol=1e-3, atol=1e-4)


def test_equalising_moves_the_merge_toward_the_outweighed_task():
    # Task 1's statistics are 0.05× the others': equalised, it counts as much.
    models, stats = kfac_tasks(5)
    plain = mats(models, stats, maxiter=500, tol=1e-7).params
    equal = mats(models, stats, maxiter=500, tol=1e-7, equalise_scales=True).params

    def distance(merged, leaf):
        return float(np.linalg.norm(np.asarray(merged[leaf]) - models[1][leaf]))

    for leaf in plain:
        assert distance(equal, leaf) < distance(plain, leaf), leaf


def test_a_traced_off_diagonal_scale_gives_the_eager_merge():
    models, stats = kfac_tasks(6)

    @jax.jit
    def merged(alpha):
        return mats(
            models, stats, maxiter=200, tol=0.0, off_diagonal_scale=alpha
        ).params

    eager = mats(models, stats, maxiter=200, tol=0.0, off_diagonal_scale=0.4).params
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        merged(jnp.float32(0.4)),
        eager,
    )


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"off_diagonal_scale": 1.5},
            r"off_diagonal_scale must lie in \[0, 1\], got 1.5",
        ),
        ({"off_diagonal_scale": -0.1}, r"off_diagonal_scale must lie in \[0, 1\]"),
        ({"off_diagonal_scale": float("nan")}, r"off_diagonal_scale"),
        ({"equalise_scales": 1}, r"equalise_scales must be True or False, got 1"),
        ({"equalise_scales": "yes"}, r"equalise_scales must be True or False"),
    ],
)
def test_bad_options_are_refused_before_any_work(options, message):
    models, stats = kfac_tasks(7)
    with pytest.raises(MergeInputError, match=message):
        mats(models, stats, **options)
