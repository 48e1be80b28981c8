"""DELLA against hand-computed probabilities and a numpy version of MAGPRUNE
that draws the same uniforms from the same keys, the drop rates checked
statistically, per-model parameters, streaming and bad parameters."""

from __future__ import annotations

import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

import mats_jax
from mats_jax import MergeInputError
from mats_jax.io import load_checkpoint, save_checkpoint
from mats_jax.merge.della import magnitude_keep_probabilities, magprune
from mats_jax.stream import merge_recipe

# --------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------


def _normal_or_zero(x: float) -> float:
    # Fractions below float32's normal range are refused (XLA flushes them).
    return x if x >= 1e-6 else 0.0


def np_keep_probabilities(
    tau: np.ndarray, density: float, epsilon: float
) -> np.ndarray:
    """1 − p_i = ρ − ε + 2ε r_i/(n − 1) per row of the last axis, r_i the
    midrank of |τ_i| in its row counted from the smallest (float64)."""
    shape = tau.shape
    n = shape[-1] if shape else 1
    rows = np.abs(tau.astype(np.float32)).reshape(-1, n).astype(np.float64)
    below = (rows[:, None, :] < rows[:, :, None]).sum(-1)
    equal = (rows[:, None, :] == rows[:, :, None]).sum(-1)
    midrank = below + (equal - 1) / 2
    position = midrank / (n - 1) if n > 1 else np.full(rows.shape, 0.5)
    return (density - epsilon + 2 * epsilon * position).reshape(shape)


def uniforms(key: jax.Array, path: str, m: int, shape: tuple) -> np.ndarray:
    """Model m's uniforms for the leaf at ``path``: the key folded with the
    CRC-32 of the path, then with m."""
    leaf_key = jax.random.fold_in(key, np.uint32(zlib.crc32(path.encode())))
    return np.asarray(jax.random.uniform(jax.random.fold_in(leaf_key, m), shape))


def np_combine(
    taus: list, weights: Any, sign_election: bool, sign: Any = None
) -> np.ndarray:
    """The weighted sum, or with ``sign_election`` the disjoint mean of the
    entries that agree with the sign of that sum (or with ``sign`` if given)."""
    w = [float(x) for x in weights]
    total = sum(wi * t for wi, t in zip(w, taus, strict=True))
    if not sign_election:
        return total
    sign = np.sign(total) if sign is None else sign
    agree = [(np.sign(t) == sign) & (t != 0) for t in taus]
    num = sum(np.where(a, wi * t, 0.0) for a, wi, t in zip(agree, w, taus, strict=True))
    den = sum(np.where(a, wi, 0.0) for a, wi in zip(agree, w, strict=True))
    return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def check_della(
    got: dict,
    base: dict,
    models: list,
    key: jax.Array,
    density: Any,
    epsilon: Any,
    *,
    scale: float = 1.0,
    weights: Any = None,
    sign_election: bool = True,
    rescale: bool = True,
) -> None:
    """``got`` is θ₀ + λ · combine(MAGPRUNE(τ_m)) with the masks b = u < 1 − p_i.

    An entry whose uniform lies within 1e-6 of its keep probability may fall
    either way in float32, so any value there is accepted. With sign election,
    a sum of the kept τ̂ that is zero up to rounding (terms that cancel
    exactly in real arithmetic, such as 2·(2/0.75) − 4/0.75) may elect either
    sign or none in float32: there the mean of either side is accepted.
    """

    def per_model(value: Any, m: int) -> float:
        return value[m] if isinstance(value, (list, tuple)) else value

    weights = [1.0] * len(models) if weights is None else weights
    for path, b in base.items():
        b64 = np.asarray(b, np.float64)
        kept, unsure = [], []
        for m, model in enumerate(models):
            tau = np.asarray(model[path], np.float64) - b64
            keep = np_keep_probabilities(
                tau, per_model(density, m), per_model(epsilon, m)
            )
            u = uniforms(key, path, m, tau.shape).astype(np.float64)
            value = tau / keep if rescale else tau
            kept.append(np.where(u < keep, value, 0.0))
            unsure.append(np.abs(u - keep) < 1e-6)
        signs = [None]
        if sign_election:
            w = [float(x) for x in weights]
            total = sum(wi * t for wi, t in zip(w, kept, strict=True))
            size = sum(abs(wi * t) for wi, t in zip(w, kept, strict=True))
            cancels = np.abs(total) <= 1e-6 * size
            signs += [np.where(cancels, s, np.sign(total)) for s in (-1.0, 0.0, 1.0)]
        value = np.asarray(got[path], np.float64)
        close = np.zeros(b64.shape, bool)
        for sign in signs:
            want = b64 + scale * np_combine(kept, weights, sign_election, sign)
            close |= np.isclose(value, want, rtol=1e-4, atol=1e-4)
        assert np.all(close | np.any(unsure, axis=0)), path


# --------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------


def test_keep_probabilities_by_hand():
    # One row, magnitudes ranked 3, 2, 1, 0: ρ − ε + 2ε r/3 = 0.2 + 0.2 r.
    tau = jnp.array([4.0, -3.0, 2.0, 1.0])
    np.testing.assert_allclose(
        magnitude_keep_probabilities(tau, 0.5, 0.3), [0.8, 0.6, 0.4, 0.2], rtol=1e-6
    )
    # Rows are the last axis; ties share their mean rank; a row of equal
    # magnitudes, or of one entry, gets ρ.
    tau = jnp.array([[1.0, -1.0, 3.0], [2.0, 2.0, -2.0]])
    np.testing.assert_allclose(
        magnitude_keep_probabilities(tau, 0.5, 0.25),
        [[0.375, 0.375, 0.75], [0.5, 0.5, 0.5]],
    )
    np.testing.assert_allclose(
        magnitude_keep_probabilities(jnp.ones((3, 1)), 0.7, 0.2), [[0.7]] * 3
    )
    np.testing.assert_allclose(
        magnitude_keep_probabilities(jnp.float32(5.0), 0.7, 0.2), 0.7
    )


def test_a_leaf_of_more_axes_is_ranked_in_rows_of_its_last_axis():
    tau = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5)), jnp.float32)
    stacked = magnitude_keep_probabilities(tau, 0.6, 0.3)
    rows = magnitude_keep_probabilities(tau.reshape(6, 5), 0.6, 0.3)
    np.testing.assert_array_equal(stacked.reshape(6, 5), rows)
    np.testing.assert_allclose(
        stacked, np_keep_probabilities(np.asarray(tau), 0.6, 0.3), rtol=1e-6
    )


def test_each_entry_is_dropped_or_divided_by_its_keep_probability():
    base = {"w": jnp.zeros(4)}
    tau = jnp.array([4.0, -3.0, 2.0, 1.0])
    for seed in range(20):
        key = jax.random.key(seed)
        out = mats_jax.della(base, [{"w": tau}], density=0.5, epsilon=0.3, key=key)["w"]
        u = uniforms(key, "w", 0, (4,))
        keep = np.array([0.8, 0.6, 0.4, 0.2])
        want = np.where(u < keep, np.asarray(tau) / keep, 0.0)
        np.testing.assert_allclose(out, want, rtol=1e-6)
        unscaled = mats_jax.della(
            base, [{"w": tau}], density=0.5, epsilon=0.3, key=key, rescale=False
        )["w"]
        np.testing.assert_allclose(unscaled, np.where(u < keep, tau, 0.0))


def test_density_one_and_no_spread_is_ties_without_trimming():
    base = {"w": jnp.zeros(3)}
    models = [{"w": jnp.array([1.0, -2.0, 3.0])}, {"w": jnp.array([2.0, 1.0, -1.0])}]
    key = jax.random.key(0)
    # Signs of the sums [3, -1, 2]: the disjoint means 1.5, -2, 3.
    elected = mats_jax.della(base, models, density=1.0, epsilon=0.0, key=key)["w"]
    np.testing.assert_allclose(elected, [1.5, -2.0, 3.0])
    linear = mats_jax.della(
        base,
        models,
        density=1.0,
        epsilon=0.0,
        key=key,
        sign_election=False,
        weights=[1.0, 0.5],
        scale=2.0,
    )["w"]
    np.testing.assert_allclose(linear, [4.0, -3.0, 5.0])


def test_no_spread_draws_dares_masks():
    rng = np.random.default_rng(2)
    base = {
        "a": rng.normal(size=(8, 6)).astype(np.float32),
        "b": np.zeros(5, np.float32),
    }
    models = [
        {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
        for _ in range(3)
    ]
    key = jax.random.key(11)
    for sign_election in (False, True):
        got = mats_jax.della(
            base,
            models,
            density=0.75,
            epsilon=0.0,
            key=key,
            sign_election=sign_election,
        )
        want = mats_jax.dare(
            base, models, drop_rate=0.25, key=key, sign_election=sign_election
        )
        jax.tree.map(np.testing.assert_array_equal, got, want)


# --------------------------------------------------------------------------
# Against the oracle
# --------------------------------------------------------------------------

SHAPES = {"scalar": (), "one": (1,), "bias": (7,), "kernel": (5, 6), "stack": (2, 3, 4)}


@st.composite
def problems(draw: Any, per_model: bool = False) -> tuple:
    m = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    integers = draw(st.booleans())  # many ties in magnitude

    def values(shape: tuple) -> np.ndarray:
        if integers:
            return rng.integers(-3, 4, size=shape).astype(np.float32)
        return rng.normal(size=shape).astype(np.float32)

    base = {k: values(s) for k, s in SHAPES.items()}
    models = [{k: base[k] + values(s) for k, s in SHAPES.items()} for _ in range(m)]
    weights = [draw(st.sampled_from([0.25, 0.5, 1.0, 2.0])) for _ in range(m)]

    def spread() -> tuple[float, float]:
        density = draw(st.floats(0.05, 1.0))
        return density, draw(
            st.floats(
                0.0,
                min(1.0 - density, 0.999 * density),
            ).map(_normal_or_zero)
        )

    if per_model:
        pairs = [spread() for _ in range(m)]
        density, epsilon = [p[0] for p in pairs], [p[1] for p in pairs]
    else:
        density, epsilon = spread()
    key = jax.random.key(draw(st.integers(0, 2**31 - 1)))
    return base, models, weights, density, epsilon, key


@settings(max_examples=20, deadline=None)
@given(
    p=problems(),
    sign_election=st.booleans(),
    rescale=st.booleans(),
    scale=st.floats(-2.0, 2.0),
)
def test_della_is_magprune_with_the_same_draws(p, sign_election, rescale, scale):
    base, models, weights, density, epsilon, key = p
    got = mats_jax.della(
        base,
        models,
        density=density,
        epsilon=epsilon,
        key=key,
        scale=scale,
        weights=weights,
        sign_election=sign_election,
        rescale=rescale,
    )
    check_della(
        got,
        base,
        models,
        key,
        density,
        epsilon,
        scale=scale,
        weights=weights,
        sign_election=sign_election,
        rescale=rescale,
    )


@settings(max_examples=12, deadline=None)
@given(p=problems(per_model=True), sign_election=st.booleans())
def test_per_model_density_and_epsilon_are_each_models_own(p, sign_election):
    base, models, weights, density, epsilon, key = p
    got = mats_jax.della(
        base,
        models,
        density=density,
        epsilon=epsilon,
        key=key,
        weights=weights,
        sign_election=sign_election,
    )
    check_della(
        got,
        base,
        models,
        key,
        density,
        epsilon,
        weights=weights,
        sign_election=sign_election,
    )


def test_drop_rates_by_rank_match_their_probabilities():
    # 4000 rows of 9 distinct magnitudes: the entry of rank r is kept with
    # probability ρ − ε + 2ε r/8, and every row keeps ρ of its entries on average.
    rows, n, density, epsilon = 4000, 9, 0.4, 0.3
    rng = np.random.default_rng(5)
    magnitudes = np.stack([rng.permutation(n) + 1.0 for _ in range(rows)])
    tau = (magnitudes * rng.choice([-1.0, 1.0], size=(rows, n))).astype(np.float32)
    (kept,) = magprune(
        [jnp.asarray(tau)], density, epsilon, jax.random.key(9), jnp.uint32(3)
    )
    kept = np.asarray(kept)
    rank = magnitudes.astype(int) - 1
    for r in range(n):
        expected = density - epsilon + 2 * epsilon * r / (n - 1)
        at_rank = rank == r
        rate = np.mean(kept[at_rank] != 0)
        sigma = math.sqrt(expected * (1 - expected) / rows)
        assert abs(rate - expected) < 5 * sigma, (r, rate, expected)
        # The kept entries are rescaled exactly: their mean is τ's (unbiased).
        np.testing.assert_allclose(
            kept[at_rank & (kept != 0)],
            tau[at_rank & (kept != 0)] / expected,
            rtol=1e-5,
        )
    assert abs(np.mean(kept != 0) - density) < 5 * math.sqrt(
        density * (1 - density) / kept.size
    )


def test_masks_depend_on_the_key_the_leaf_path_and_the_model_index_only():
    rng = np.random.default_rng(4)
    base = {"a": np.zeros((20, 10), np.float32), "b": np.zeros((20, 10), np.float32)}
    tau = rng.normal(size=(20, 10)).astype(np.float32)
    models = [{"a": tau, "b": tau}, {"a": tau, "b": tau}]
    key = jax.random.key(1)
    both = mats_jax.della(
        base, models, density=0.5, epsilon=0.2, key=key, sign_election=False
    )
    alone = mats_jax.della(
        {"a": base["a"]},
        [{"a": tau}] * 2,
        density=0.5,
        epsilon=0.2,
        key=key,
        sign_election=False,
    )
    np.testing.assert_array_equal(both["a"], alone["a"])
    # Another path, another model index or another key: other masks.
    assert not np.array_equal(both["a"], both["b"])
    first = mats_jax.della(
        {"a": base["a"]}, [{"a": tau}], density=0.5, epsilon=0.2, key=key
    )
    second = magprune(
        [jnp.asarray(tau)] * 2, 0.5, 0.2, key, jnp.uint32(zlib.crc32(b"a"))
    )
    # The same masks (the values may differ in the last bit between programs).
    np.testing.assert_array_equal(first["a"] != 0, second[0] != 0)
    np.testing.assert_allclose(first["a"], second[0], rtol=1e-6)
    assert not np.array_equal(second[0], second[1])
    other = mats_jax.della(
        {"a": base["a"]}, [{"a": tau}], density=0.5, epsilon=0.2, key=jax.random.key(2)
    )
    assert not np.array_equal(first["a"], other["a"])
    again = mats_jax.della(
        {"a": base["a"]}, [{"a": tau}], density=0.5, epsilon=0.2, key=key
    )
    np.testing.assert_array_equal(first["a"], again["a"])


def test_under_jit_the_parameters_are_traced():
    rng = np.random.default_rng(6)
    base = {"w": np.zeros((4, 6), np.float32)}
    models = [{"w": rng.normal(size=(4, 6)).astype(np.float32)} for _ in range(2)]
    merge = jax.jit(
        lambda d, e, k: mats_jax.della(base, models, density=d, epsilon=e, key=k)
    )
    for d, e, seed in [(0.5, 0.25, 0), (0.75, 0.125, 1), (0.25, 0.0, 2)]:
        key = jax.random.key(seed)
        check_della(merge(d, e, key), base, models, key, d, e)
    assert merge._cache_size() == 1


# --------------------------------------------------------------------------
# Streaming from a recipe
# --------------------------------------------------------------------------


def test_recipe_with_per_model_parameters_streams_as_in_memory(tmp_path):
    rng = np.random.default_rng(3)
    base = {
        "fc": {"kernel": rng.normal(size=(6, 5)), "bias": rng.normal(size=(5,))},
        "head": {"kernel": rng.normal(size=(5, 3))},
    }
    base = jax.tree.map(lambda x: x.astype(np.float32), base)
    models = [
        jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), base)
        for _ in range(2)
    ]
    save_checkpoint(tmp_path / "base.safetensors", base)
    for i, m in enumerate(models):
        save_checkpoint(tmp_path / f"m{i}.safetensors", m)
    (tmp_path / "r.yaml").write_text(
        """
base: base.safetensors
models:
  - {path: m0.safetensors, weight: 2.0, parameters: {density: 0.3, epsilon: 0.1}}
  - {path: m1.safetensors, weight: 0.5}
method: della
parameters: {density: 0.6, epsilon: 0.2, scale: 0.9}
seed: 7
"""
    )
    merge_recipe(tmp_path / "r.yaml", tmp_path / "out")
    got = load_checkpoint(tmp_path / "out")
    want = mats_jax.della(
        base,
        models,
        density=(0.3, 0.6),
        epsilon=(0.1, 0.2),
        scale=0.9,
        weights=[2.0, 0.5],
        key=jax.random.key(7),
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), got, want
    )


# --------------------------------------------------------------------------
# Bad parameters
# --------------------------------------------------------------------------


def _merge(**params: Any) -> Any:
    base = {"w": jnp.zeros(4)}
    models = [{"w": jnp.ones(4)}, {"w": -jnp.ones(4)}]
    return mats_jax.della(base, models, key=jax.random.key(0), **params)


@pytest.mark.parametrize(
    "params, match",
    [
        (
            {"density": 0.9, "epsilon": 0.15},
            r"density=0\.9, epsilon=0\.15: the smallest drop probability p - epsilon "
            r".* is negative; epsilon must be at most 1 - density = 0\.1",
        ),
        (
            {"density": 0.2, "epsilon": 0.2},
            r"density=0\.2, epsilon=0\.2: the largest drop probability p \+ epsilon "
            r"= 1 - density \+ epsilon = 1 must be below 1; epsilon must be less than density",
        ),
        (
            {"density": [0.5, 0.9], "epsilon": 0.15},
            r"density\[1\]=0\.9, epsilon=0\.15: the smallest drop probability",
        ),
        (
            {"density": 0.5, "epsilon": [0.1, 0.5]},
            r"density=0\.5, epsilon\[1\]=0\.5: the largest drop probability",
        ),
        ({"density": 0.5, "epsilon": -0.1}, r"epsilon must lie in \[0, 1\), got -0\.1"),
        ({"density": 0.5, "epsilon": math.nan}, r"epsilon must lie in \[0, 1\)"),
        ({"density": 0.0}, r"density must lie in \(0, 1\], got 0\.0"),
        ({"density": 1.5}, r"density must lie in \(0, 1\]"),
        ({"density": 0.5, "scale": math.inf}, r"scale must be a finite number"),
        ({"density": 0.5, "rescale": "no"}, r"rescale must be True or False"),
        ({"density": 0.5, "sign_election": 0}, r"sign_election must be True or False"),
        ({"density": [0.5, 0.5, 0.5]}, r"density has 3 values, but 2 models"),
        ({"density": 0.5, "epsilon": [0.1]}, r"epsilon has 1 values, but 2 models"),
    ],
)
def test_bad_parameters_are_clear_errors(params, match):
    with pytest.raises(MergeInputError, match=match):
        _merge(**params)


def test_a_missing_or_bad_key_is_refused():
    base = {"w": jnp.zeros(4)}
    with pytest.raises(MergeInputError, match="key"):
        mats_jax.della(base, [{"w": jnp.ones(4)}], density=0.5, key=None)
    with pytest.raises(MergeInputError, match="key"):
        mats_jax.della(base, [{"w": jnp.ones(4)}], density=0.5, key=7)


def test_edges_of_the_valid_spread_are_accepted():
    # p − ε = 0 exactly (rounding included) and ε = 0 at density 1.
    for density, epsilon in [(0.9, 0.1), (0.7, 0.3), (0.5, 0.5 - 1e-9), (1.0, 0.0)]:
        _merge(density=density, epsilon=epsilon)


def test_traced_spread_is_checked_under_checkify():
    merge = jax.jit(lambda d, e: _merge(density=d, epsilon=e))
    err, _ = checkify.checkify(merge)(0.9, 0.15)
    with pytest.raises(Exception, match=r"1 - density - epsilon must be ≥ 0"):
        err.throw()
    err, _ = checkify.checkify(merge)(0.2, 0.3)
    with pytest.raises(Exception, match=r"density - epsilon must be > 0"):
        err.throw()
    err, _ = checkify.checkify(merge)(0.5, 0.2)
    err.throw()  # nothing to report
