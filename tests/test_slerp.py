"""SLERP and multi-SLERP against float64 numpy twins of their formulas,
hand-computed cases, the barycentre's defining property, bad parameters, and
per-leaf interpolation factors from a recipe."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mats_jax as mj
from mats_jax.io import load_checkpoint, save_checkpoint
from mats_jax.merge.slerp import DOT_THRESHOLD, spherical_barycentre
from mats_jax.recipe import RecipeError, parse_recipe
from mats_jax.solver.cg import BREAKDOWN, CONVERGED, MAXITER
from mats_jax.stream import plan_merge

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------
# The slow twins: the formulas in float64
# --------------------------------------------------------------------------


def slerp_oracle(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """SLERP of two tensors as vectors, in float64, straight from the formula."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 or ny == 0:
        return (1 - t) * x + t * y
    cos = float(np.sum(x * y) / (nx * ny))
    if abs(cos) > DOT_THRESHOLD:
        return (1 - t) * x + t * y
    omega = np.arccos(np.clip(cos, -1, 1))
    return (np.sin((1 - t) * omega) * x + np.sin(t * omega) * y) / np.sin(omega)


def log_map(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The tangent vector at p pointing to u along the great circle, of length the angle."""
    along = float(p @ u)
    across = u - along * p
    size = np.linalg.norm(across)
    if size == 0:
        return np.zeros_like(p)
    return np.arctan2(size, along) * across / size


def barycentre_oracle(units: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted spherical barycentre in float64: Buss and Fillmore's fixed
    point iteration, run far past convergence."""
    w = weights / weights.sum()
    p = w @ units
    p = p / np.linalg.norm(p)
    for _ in range(500):
        v = sum(wi * log_map(p, u) for wi, u in zip(w, units) if np.any(u))
        size = np.linalg.norm(v)
        if size == 0:
            break
        p = np.cos(size) * p + np.sin(size) * v / size
        p = p / np.linalg.norm(p)
    return p


def multislerp_oracle(
    xs: list[np.ndarray], weights: np.ndarray, base: np.ndarray | None = None
) -> np.ndarray:
    """Multi-SLERP of one leaf in float64: barycentre of the directions times
    the weighted mean norm (of the task vectors about ``base`` if given)."""
    shape = xs[0].shape
    flat = [np.asarray(x, np.float64).reshape(-1) for x in xs]
    if base is not None:
        flat = [x - np.asarray(base, np.float64).reshape(-1) for x in flat]
    norms = np.array([np.linalg.norm(x) for x in flat])
    units = np.stack([x / n if n > 0 else x for x, n in zip(flat, norms)])
    w = np.asarray(weights, np.float64) / np.sum(weights)
    out = (w @ norms) * barycentre_oracle(units, w)
    out = out.reshape(shape)
    return out if base is None else out + np.asarray(base, np.float64)


def pair(
    rng: np.random.Generator, n: int, angle: float, na: float, nb: float
) -> tuple[np.ndarray, np.ndarray]:
    """Two float32 vectors of norms na, nb at ``angle`` radians."""
    a = rng.normal(size=n)
    a /= np.linalg.norm(a)
    c = rng.normal(size=n)
    c -= (c @ a) * a
    c /= np.linalg.norm(c)
    b = np.cos(angle) * a + np.sin(angle) * c
    return (na * a).astype(np.float32), (nb * b).astype(np.float32)


# --------------------------------------------------------------------------
# SLERP
# --------------------------------------------------------------------------


def test_orthogonal_unit_vectors_at_one_half_give_their_normalised_sum():
    a, b = jnp.array([1.0, 0.0, 0.0]), jnp.array([0.0, 1.0, 0.0])
    got = mj.slerp([{"w": a}, {"w": b}], t=0.5)["w"]
    np.testing.assert_allclose(got, (a + b) / np.sqrt(2), rtol=1e-6)
    # The linear mean would have norm 1/√2: SLERP keeps the norm.
    np.testing.assert_allclose(np.linalg.norm(got), 1.0, rtol=1e-6)


def test_hand_computed_angles_and_norms():
    # 60° apart, norm 2: t = 1/2 is at 30° from each, still of norm 2.
    a = np.array([2.0, 0.0], np.float32)
    b = np.array([1.0, np.sqrt(3.0)], np.float32)
    got = mj.slerp([{"w": a}, {"w": b}], t=0.5)["w"]
    np.testing.assert_allclose(got, [np.sqrt(3.0), 1.0], rtol=1e-6)
    # t = 1/4 of a 90° arc: 22.5°.
    got = mj.slerp([{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}], t=0.25)
    np.testing.assert_allclose(
        got["w"], [np.cos(np.pi / 8), np.sin(np.pi / 8)], rtol=1e-6
    )


def test_t_zero_and_one_return_the_end_models_exactly():
    rng = np.random.default_rng(0)
    a = {"k": jnp.asarray(rng.normal(size=(4, 3)), jnp.bfloat16)}
    b = {"k": jnp.asarray(rng.normal(size=(4, 3)), jnp.bfloat16)}
    zero = mj.slerp([a, b], t=0.0)["k"]
    one = mj.slerp([a, b], t=1.0)["k"]
    assert zero.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(a["k"]))
    np.testing.assert_array_equal(np.asarray(one), np.asarray(b["k"]))


# Interpolation factors in [0, 1]; those below float32's normal range are
# refused (XLA computes with them as 0), so the strategy rounds them to 0.
FRACTIONS = st.floats(0.0, 1.0).map(lambda t: t if t >= 1e-6 else 0.0)


@pytest.mark.parametrize(
    "b",
    [
        np.array([2.0, 4.0, 6.0]),  # parallel
        np.array([-1.0, -2.0, -3.0]),  # antiparallel
        np.array([1.0, 2.0, 3.0001]),  # within the threshold
        np.zeros(3),  # zero
    ],
    ids=["parallel", "antiparallel", "nearly_parallel", "zero"],
)
def test_nearly_parallel_or_zero_vectors_interpolate_linearly(b):
    a = np.array([1.0, 2.0, 3.0])
    got = mj.slerp(
        [{"w": jnp.asarray(a, jnp.float32)}, {"w": jnp.asarray(b, jnp.float32)}], t=0.3
    )
    np.testing.assert_allclose(got["w"], 0.7 * a + 0.3 * b, rtol=1e-6, atol=1e-7)


def test_just_outside_the_threshold_is_spherical():
    rng = np.random.default_rng(1)
    angle = np.arccos(DOT_THRESHOLD) * 1.5  # |cos Ω| below the threshold
    a, b = pair(rng, 16, angle, 1.0, 1.0)
    got = np.asarray(mj.slerp([{"w": a}, {"w": b}], t=0.5)["w"])
    np.testing.assert_allclose(np.linalg.norm(got), 1.0, rtol=1e-6)
    assert np.linalg.norm(0.5 * a + 0.5 * b) < 1 - 1e-5  # the chord is shorter


ANGLES = st.one_of(
    st.floats(0.0, np.pi),
    st.sampled_from([0.0, 1e-4, 0.03, 0.04, np.pi / 2, np.pi - 0.04, np.pi]),
)


@settings(max_examples=60, deadline=None)
@given(
    angle=ANGLES,
    t=FRACTIONS,
    # 0 or at least 1e-3: XLA on CPU flushes subnormal float32 to zero, so a
    # vector of norm 1e-45 is a zero vector to the merge, not to float64.
    norms=st.tuples(*[st.one_of(st.just(0.0), st.floats(1e-3, 10.0))] * 2),
    seed=st.integers(0, 2**16),
)
def test_slerp_matches_the_float64_formula(angle, t, norms, seed):
    a, b = pair(np.random.default_rng(seed), 24, angle, *norms)
    x, y = a.astype(np.float64), b.astype(np.float64)
    scale = np.linalg.norm(x) * np.linalg.norm(y)
    cos = float(x @ y / scale) if scale > 0 else 0.0
    if abs(abs(cos) - DOT_THRESHOLD) < 1e-5:
        return  # float32 and float64 may fall on either side of the threshold
    tree = lambda x: {"k": jnp.asarray(x.reshape(4, 6))}  # noqa: E731
    got = mj.slerp([tree(a), tree(b)], t=t)["k"]
    want = slerp_oracle(a, b, t).reshape(4, 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, *norms))


@settings(max_examples=20, deadline=None)
@given(t=st.floats(-1.0, 2.0), seed=st.integers(0, 2**16))
def test_extrapolation_continues_the_formula(t, seed):
    a, b = pair(np.random.default_rng(seed), 8, 1.0, 1.0, 2.0)
    got = mj.slerp([{"w": a}, {"w": b}], t=t, extrapolate=True)["w"]
    np.testing.assert_allclose(got, slerp_oracle(a, b, t), rtol=1e-5, atol=1e-5)


def test_each_leaf_is_interpolated_on_its_own_and_keeps_its_dtype():
    rng = np.random.default_rng(2)
    a = {
        "x": jnp.asarray(rng.normal(size=5), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(2, 3)), jnp.bfloat16),
    }
    b = {
        "x": jnp.asarray(rng.normal(size=5), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(2, 3)), jnp.bfloat16),
    }
    got = mj.slerp([a, b], t=0.4)
    assert got["y"].dtype == jnp.bfloat16
    for key in ("x", "y"):
        want = slerp_oracle(
            np.asarray(a[key], np.float32), np.asarray(b[key], np.float32), 0.4
        )
        np.testing.assert_allclose(
            np.asarray(got[key], np.float32),
            want,
            rtol=1e-2 if key == "y" else 1e-5,
            atol=1e-2 if key == "y" else 1e-6,
        )


@settings(max_examples=20, deadline=None)
@given(angle=ANGLES, t=FRACTIONS, seed=st.integers(0, 2**16))
def test_swapping_the_models_is_one_minus_t(angle, t, seed):
    # In place of order invariance (which SLERP does not have): the other end.
    a, b = pair(np.random.default_rng(seed), 10, angle, 1.0, 2.5)
    forward = mj.slerp([{"w": a}, {"w": b}], t=t)["w"]
    backward = mj.slerp([{"w": b}, {"w": a}], t=1 - t)["w"]
    np.testing.assert_allclose(forward, backward, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [-0.1, 1.5, 1.0001])
def test_t_outside_zero_one_is_refused_without_extrapolate(t):
    with pytest.raises(
        mj.MergeInputError, match=r"t must lie in \[0, 1\].*extrapolate=True"
    ):
        mj.slerp([{"w": jnp.ones(2)}, {"w": jnp.zeros(2)}], t=t)


def test_extrapolate_still_refuses_a_non_finite_t():
    with pytest.raises(mj.MergeInputError, match="t must be a finite number"):
        mj.slerp(
            [{"w": jnp.ones(2)}, {"w": jnp.zeros(2)}], t=float("nan"), extrapolate=True
        )


@pytest.mark.parametrize("count", [1, 3])
def test_slerp_merges_exactly_two_models(count):
    models = [{"w": jnp.full(2, float(i))} for i in range(count)]
    with pytest.raises(
        mj.MergeInputError, match=f"slerp merges exactly 2 models, got {count}"
    ):
        mj.slerp(models)


def test_slerp_refuses_weights_that_differ_and_takes_equal_ones():
    models = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}]
    with pytest.raises(
        mj.MergeInputError,
        match=r"slerp does not weigh its models: give equal weights \(or none\), got \[1.0, 3.0\]",
    ):
        mj.merge_pytrees("slerp", models=models, weights=[1.0, 3.0], t=0.5)
    equal = mj.merge_pytrees("slerp", models=models, weights=[2.0, 2.0], t=0.5)
    np.testing.assert_array_equal(equal.params["w"], mj.slerp(models, t=0.5)["w"])


def test_slerp_under_jit_with_a_traced_t():
    a, b = pair(np.random.default_rng(3), 6, 1.2, 1.0, 3.0)
    merge = jax.jit(lambda ms, t: mj.slerp(ms, t=t))
    for t in (0.2, 0.7):
        got = merge([{"w": a}, {"w": b}], jnp.float32(t))["w"]
        np.testing.assert_allclose(got, slerp_oracle(a, b, t), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# Multi-SLERP
# --------------------------------------------------------------------------


def test_three_orthonormal_directions_meet_at_their_symmetric_point():
    eye = np.eye(3, dtype=np.float32)
    got = mj.multislerp([{"w": jnp.asarray(e)} for e in eye])["w"]
    np.testing.assert_allclose(got, np.ones(3) / np.sqrt(3), rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    angle=st.floats(0.05, np.pi - 0.05),
    t=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(1e-3, 1 - 1e-3)),
    norm=st.floats(0.1, 5.0),
    seed=st.integers(0, 2**16),
)
def test_two_models_of_equal_norm_with_weights_one_minus_t_and_t_are_slerp(
    angle, t, norm, seed
):
    a, b = pair(np.random.default_rng(seed), 12, angle, norm, norm)
    models = [{"w": jnp.asarray(a)}, {"w": jnp.asarray(b)}]
    spherical = mj.multislerp(models, weights=[1 - t, t])
    np.testing.assert_allclose(
        spherical["w"], mj.slerp(models, t=t)["w"], rtol=1e-5, atol=1e-5 * norm
    )


@settings(max_examples=20, deadline=None)
@given(
    angle=st.floats(0.05, np.pi - 0.05),
    t=st.floats(0.05, 0.95),
    norms=st.tuples(st.floats(0.1, 5.0), st.floats(0.1, 5.0)),
    seed=st.integers(0, 2**16),
)
def test_two_models_of_any_norm_get_slerps_direction_and_the_mean_norm(
    angle, t, norms, seed
):
    a, b = pair(np.random.default_rng(seed), 12, angle, *norms)
    got = mj.multislerp([{"w": a}, {"w": b}], weights=[1 - t, t])["w"]
    direction = slerp_oracle(a / norms[0], b / norms[1], t)
    want = ((1 - t) * norms[0] + t * norms[1]) * direction
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


WEIGHTS = st.lists(st.floats(0.1, 4.0), min_size=3, max_size=5)


@settings(max_examples=30, deadline=None)
@given(weights=WEIGHTS, seed=st.integers(0, 2**16), spread=st.floats(0.1, 1.0))
def test_multislerp_matches_the_float64_barycentre(weights, seed, spread):
    rng = np.random.default_rng(seed)
    m = len(weights)
    centre = rng.normal(size=(3, 4))
    xs = [
        (centre + spread * rng.normal(size=(3, 4)) * rng.uniform(0.5, 2.0)).astype(
            np.float32
        )
        for _ in range(m)
    ]
    got = mj.multislerp([{"k": jnp.asarray(x)} for x in xs], weights=weights)["k"]
    want = multislerp_oracle(xs, np.asarray(weights))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(weights=WEIGHTS, seed=st.integers(0, 2**16))
def test_the_weighted_log_maps_cancel_at_the_result(weights, seed):
    # The barycentre's defining property, checked in float64 on the result.
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=7).astype(np.float32) + 1.0 for _ in weights]
    got = np.asarray(
        mj.multislerp([{"w": x} for x in xs], weights=weights)["w"], np.float64
    )
    w = np.asarray(weights) / np.sum(weights)
    p = got / np.linalg.norm(got)
    units = [x / np.linalg.norm(x) for x in np.asarray(xs, np.float64)]
    residual = sum(wi * log_map(p, u) for wi, u in zip(w, units))
    assert np.linalg.norm(residual) < 1e-5
    norms = [np.linalg.norm(x.astype(np.float64)) for x in xs]
    np.testing.assert_allclose(np.linalg.norm(got), w @ norms, rtol=1e-5)


def test_on_a_circle_the_barycentre_minimises_the_weighted_squared_angles():
    # A brute-force twin in 2-D: search the circle for min Σ w φ².
    angles = np.array([0.3, 1.4, 2.2])
    weights = np.array([1.0, 2.0, 0.5])
    xs = [np.array([np.cos(a), np.sin(a)], np.float32) for a in angles]
    got = np.asarray(mj.multislerp([{"w": x} for x in xs], weights=weights)["w"])
    grid = np.linspace(0, 2 * np.pi, 2_000_001)
    gaps = np.abs(((grid[:, None] - angles[None, :]) + np.pi) % (2 * np.pi) - np.pi)
    best = grid[np.argmin((gaps**2) @ weights)]
    np.testing.assert_allclose(got, [np.cos(best), np.sin(best)], atol=1e-5)


def test_about_base_interpolates_the_task_vectors():
    rng = np.random.default_rng(4)
    base = rng.normal(size=(2, 5)).astype(np.float32)
    xs = [base + rng.normal(size=(2, 5)).astype(np.float32) for _ in range(3)]
    w = np.array([1.0, 2.0, 3.0])
    got = mj.multislerp([{"k": x} for x in xs], weights=w, base={"k": base})["k"]
    np.testing.assert_allclose(
        got, multislerp_oracle(xs, w, base), rtol=1e-5, atol=1e-5
    )
    via_registry = mj.merge_pytrees(
        "multislerp",
        models=[{"k": x} for x in xs],
        base={"k": base},
        weights=w,
        about_base=True,
    )
    np.testing.assert_array_equal(via_registry.params["k"], got)
    # Without about_base the base is not taken, and the models are interpolated.
    plain = mj.merge_pytrees(
        "multislerp", models=[{"k": x} for x in xs], base={"k": base}, weights=w
    )
    np.testing.assert_allclose(
        plain.params["k"], multislerp_oracle(xs, w), rtol=1e-5, atol=1e-5
    )


def test_max_iterations_zero_is_the_normalised_mean_of_the_directions():
    # mergekit's multislerp: one tangent step from the normalised weighted
    # mean, which is zero there, so its result is that mean (times the mean norm).
    rng = np.random.default_rng(5)
    xs = [rng.normal(size=6).astype(np.float32) for _ in range(3)]
    w = np.array([0.2, 0.3, 0.5])
    units = np.stack([x / np.linalg.norm(x) for x in xs])
    mean = w @ units
    want = (w @ [np.linalg.norm(x) for x in xs]) * mean / np.linalg.norm(mean)
    got = mj.multislerp([{"w": x} for x in xs], weights=w, max_iterations=0)["w"]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    iterated = mj.multislerp([{"w": x} for x in xs], weights=w)["w"]
    assert np.max(np.abs(np.asarray(iterated) - want)) > 1e-3  # a different point


def test_copies_of_one_model_return_it_and_zero_leaves_stay_zero():
    theta = {"a": jnp.array([3.0, -4.0]), "z": jnp.zeros(3)}
    result = mj.merge_pytrees("multislerp", models=[theta] * 3, weights=[1.0, 2.0, 3.0])
    np.testing.assert_allclose(result.params["a"], theta["a"], rtol=1e-6)
    np.testing.assert_array_equal(result.params["z"], theta["z"])
    assert int(result.report["z"].status[0]) == CONVERGED


def test_directions_that_balance_out_fall_back_to_the_linear_mean_and_warn():
    a = jnp.array([1.0, 2.0])
    models = [
        {"w": a, "ok": jnp.array([1.0, 0.0])},
        {"w": -a, "ok": jnp.array([0.0, 1.0])},
    ]
    with pytest.warns(
        mj.ConvergenceWarning, match=r"multislerp: on 1 leaf.*w: breakdown"
    ):
        result = mj.merge_pytrees("multislerp", models=models)
    np.testing.assert_array_equal(result.params["w"], jnp.zeros(2))
    assert int(result.report["w"].status[0]) == BREAKDOWN
    assert int(result.report["ok"].status[0]) == CONVERGED


def test_stopping_short_is_reported_and_warned():
    rng = np.random.default_rng(6)
    xs = [rng.normal(size=5).astype(np.float32) for _ in range(4)]
    with pytest.warns(mj.ConvergenceWarning, match="maxiter"):
        result = mj.merge_pytrees(
            "multislerp", models=[{"w": x} for x in xs], max_iterations=1
        )
    assert int(result.report["w"].status[0]) == MAXITER
    assert int(result.report["w"].iterations[0]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        done = mj.merge_pytrees("multislerp", models=[{"w": x} for x in xs])
    assert 1 < int(done.report["w"].iterations[0]) < 100
    assert float(done.report["w"].final_residual[0]) < 1e-6


def test_spherical_barycentre_of_one_direction_is_it():
    u = jnp.array([[0.6, 0.8]])
    found = spherical_barycentre(u, jnp.ones(1), 10)
    np.testing.assert_allclose(found.point, u[0], rtol=1e-6)
    assert bool(found.defined)


@pytest.mark.parametrize(
    "values, match",
    [
        (
            {"max_iterations": -1},
            "max_iterations must be a non-negative integer, got -1",
        ),
        ({"max_iterations": 2.5}, "max_iterations must be a non-negative integer"),
        ({"about_base": "yes"}, "about_base must be True or False"),
    ],
)
def test_bad_multislerp_parameters_are_refused(values, match):
    with pytest.raises(mj.MergeInputError, match=match):
        mj.get_method("multislerp").parameters(**values)


def test_multislerp_about_base_needs_the_base():
    with pytest.raises(mj.MergeInputError, match="multislerp needs the base model"):
        mj.merge_pytrees("multislerp", models=[{"w": jnp.ones(2)}] * 2, about_base=True)


# --------------------------------------------------------------------------
# Recipes: per-leaf interpolation factors, and counts refused at the plan
# --------------------------------------------------------------------------


def _checkpoints(tmp_path, count):
    rng = np.random.default_rng(7)
    models = [
        {
            "fc": {
                "kernel": rng.normal(size=(4, 6)).astype(np.float32),
                "bias": rng.normal(size=(6,)).astype(np.float32),
            },
            "head": {"kernel": rng.normal(size=(6, 3)).astype(np.float32)},
        }
        for _ in range(count)
    ]
    for i, m in enumerate(models):
        save_checkpoint(tmp_path / f"m{i}.safetensors", m)
    return models


def test_recipe_override_sets_t_per_leaf_pattern(tmp_path):
    models = _checkpoints(tmp_path, 2)
    text = """models: [m0.safetensors, m1.safetensors]
method: slerp
parameters: {t: 0.6}
overrides:
  - {pattern: "head/*", parameters: {t: 0.3}}
"""
    mj.merge_recipe(
        parse_recipe(text, source="r.yaml", directory=str(tmp_path)), tmp_path / "out"
    )
    got = load_checkpoint(tmp_path / "out")
    in_memory = lambda t: mj.slerp(models, t=t)  # noqa: E731
    np.testing.assert_array_equal(
        got["head"]["kernel"], in_memory(0.3)["head"]["kernel"]
    )
    np.testing.assert_array_equal(got["fc"]["kernel"], in_memory(0.6)["fc"]["kernel"])
    assert not np.allclose(got["head"]["kernel"], in_memory(0.6)["head"]["kernel"])


def test_a_recipe_with_three_models_for_slerp_is_refused_before_reading(
    tmp_path, monkeypatch
):
    _checkpoints(tmp_path, 3)
    from mats_jax.io.checkpoint import Checkpoint

    def no_reads(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(Checkpoint, "read", no_reads)
    text = "models: [m0.safetensors, m1.safetensors, m2.safetensors]\nmethod: slerp\n"
    with pytest.raises(
        RecipeError, match=r"r\.yaml:2: slerp merges exactly 2 models, got 3"
    ):
        plan_merge(parse_recipe(text, source="r.yaml", directory=str(tmp_path)))


def test_a_recipe_with_unequal_weights_for_slerp_is_refused(tmp_path):
    _checkpoints(tmp_path, 2)
    text = """models:
  - {path: m0.safetensors, weight: 1.0}
  - {path: m1.safetensors, weight: 2.0}
method: slerp
"""
    with pytest.raises(
        RecipeError, match=r"r\.yaml:4: slerp does not weigh its models"
    ):
        plan_merge(parse_recipe(text, source="r.yaml", directory=str(tmp_path)))


def test_the_docs_page_examples_run():
    text = (ROOT / "docs" / "methods" / "slerp.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/methods/slerp.md", "exec"), {})
