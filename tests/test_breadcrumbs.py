"""Model Breadcrumbs against hand-computed cases and a numpy version of the
paper's rule (sort each task vector's magnitudes, keep the band below the
outliers), per-model parameters, streaming and bad parameters."""

from __future__ import annotations

import math
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
from mats_jax.merge.breadcrumbs import breadcrumb_counts, trim_outliers
from mats_jax.stream import merge_recipe

# --------------------------------------------------------------------------
# The oracle: the paper's rule with numpy's sort
# --------------------------------------------------------------------------


def _normal_or_zero(x: float) -> float:
    # Fractions below float32's normal range are refused (XLA flushes them).
    return x if x >= 1e-6 else 0.0


def np_counts(density: float, gamma: float, n: int) -> tuple[int, int]:
    """(dropped, kept): ⌈γN⌉ from the top and ⌈ρN⌉ below, float32 products,
    the drop giving way where the two would overlap."""
    kept = min(max(math.ceil(np.float32(density) * np.float32(n)), 1), n)
    dropped = min(max(math.ceil(np.float32(gamma) * np.float32(n)), 0), n - kept)
    return dropped, kept


def np_band(tau: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """τ with every entry zeroed whose magnitude lies above the (d+1)-th largest
    or below the (d+k)-th largest."""
    magnitude = np.abs(tau.astype(np.float32))
    dropped, kept = np_counts(density, gamma, tau.size)
    largest_first = np.sort(magnitude.ravel())[::-1]
    high, low = largest_first[dropped], largest_first[dropped + kept - 1]
    return np.where((magnitude >= low) & (magnitude <= high), tau, 0.0)


def np_combine(
    taus: list[np.ndarray], weights: Any, sign_election: bool, normalize: Any = None
) -> np.ndarray:
    w = [float(x) for x in weights]
    total = sum(wi * t for wi, t in zip(w, taus, strict=True))
    if not sign_election:
        return total / sum(w) if normalize else total
    sign = np.sign(total)
    agree = [(np.sign(t) == sign) & (t != 0) for t in taus]
    num = sum(np.where(a, wi * t, 0.0) for a, wi, t in zip(agree, w, taus, strict=True))
    if normalize is False:
        return num
    den = sum(np.where(a, wi, 0.0) for a, wi in zip(agree, w, strict=True))
    return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def np_breadcrumbs(
    base: dict,
    models: list[dict],
    density: Any,
    gamma: Any,
    scale: float = 1.0,
    weights: Any = None,
    sign_election: bool = False,
    normalize: Any = None,
) -> dict:
    def per_model(value: Any, m: int) -> float:
        return value[m] if isinstance(value, (list, tuple)) else value

    weights = [1.0] * len(models) if weights is None else weights
    out = {}
    for name, b in base.items():
        b64 = np.asarray(b, np.float64)
        # τ as the library forms it: the float32 difference (a float64 one
        # can order two nearly equal magnitudes the other way at the band's
        # edges, and the oracle would keep another entry).
        taus = [
            np_band(
                (np.asarray(m[name], np.float32) - np.asarray(b, np.float32)).astype(
                    np.float64
                ),
                per_model(density, i),
                per_model(gamma, i),
            )
            for i, m in enumerate(models)
        ]
        out[name] = b64 + scale * np_combine(taus, weights, sign_election, normalize)
    return out


def assert_close(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(
            np.asarray(got[name], np.float64),
            want[name],
            rtol=tol,
            atol=tol,
            err_msg=name,
        )


# --------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------


def test_drops_the_top_gamma_and_keeps_the_next_density():
    base = {"w": jnp.zeros(10)}
    tau = jnp.array([10.0, -9.0, 8.0, -7.0, 6.0, -5.0, 4.0, -3.0, 2.0, -1.0])
    # γ = 0.2 drops 10 and -9; ρ = 0.3 keeps 8, -7 and 6.
    got = mats_jax.breadcrumbs(base, [{"w": tau}], density=0.3, gamma=0.2)["w"]
    want = [0.0, 0.0, 8.0, -7.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    np.testing.assert_array_equal(got, want)


def test_two_models_weights_and_scale_by_hand():
    base = {"w": jnp.array([1.0, 1.0, 1.0, 1.0])}
    models = [
        {"w": jnp.array([5.0, 2.0, -1.0, 1.5])},  # τ = [4, 1, -2, 0.5]
        {"w": jnp.array([0.0, 4.0, 3.0, 1.25])},  # τ = [-1, 3, 2, 0.25]
    ]
    # N = 4, γ = 0.25: d = 1, ρ = 0.5: k = 2.
    # model 0 keeps -2 and 1 (drops 4); model 1 keeps 2 and -1 (drops 3).
    # 0.5 · (2 · [0, 1, -2, 0] + 1 · [-1, 0, 2, 0]) = [-0.5, 1, -1, 0]
    got = mats_jax.breadcrumbs(
        base, models, density=0.5, gamma=0.25, scale=0.5, weights=[2.0, 1.0]
    )["w"]
    np.testing.assert_allclose(got, [0.5, 2.0, 0.0, 1.0])


def test_sign_election_by_hand():
    base = {"w": jnp.zeros(4)}
    models = [
        {"w": jnp.array([4.0, 1.0, -2.0, 0.5])},  # keeps [0, 1, -2, 0]
        {"w": jnp.array([-1.0, 3.0, 2.0, 0.25])},  # keeps [-1, 0, 2, 0]
        {"w": jnp.array([-9.0, 1.5, 3.0, -0.5])},  # keeps [0, 1.5, 3, 0]
    ]
    # Sums [-1, 2.5, 3, 0]: signs [-, +, +, 0]. Disjoint means: -1; (1 + 1.5)/2;
    # (2 + 3)/2; nothing agrees with 0.
    got = mats_jax.breadcrumbs(
        base, models, density=0.5, gamma=0.25, sign_election=True
    )["w"]
    np.testing.assert_allclose(got, [-1.0, 1.25, 2.5, 0.0])
    # normalize=False (mergekit's breadcrumbs_ties): the agreeing entries summed.
    summed = mats_jax.breadcrumbs(
        base, models, density=0.5, gamma=0.25, sign_election=True, normalize=False
    )["w"]
    np.testing.assert_allclose(summed, [-1.0, 2.5, 5.0, 0.0])


def test_magnitudes_tied_at_either_end_of_the_band_are_kept_whole():
    # Magnitudes 3, 3, 2, 1 with d = 1, k = 1: the band is [3, 3], so both
    # 3s stay (neither is the outlier alone), as TIES keeps every tie.
    tau = jnp.array([1.0, -3.0, 3.0, 2.0])
    (kept,) = trim_outliers([tau], 0.25, 0.25)
    np.testing.assert_array_equal(kept, [0.0, -3.0, 3.0, 0.0])
    # Ties at the bottom: 4 | 2, 2, 2 | 1 with d = 1, k = 1 keeps all three 2s.
    tau = jnp.array([2.0, 4.0, -2.0, 1.0, 2.0])
    (kept,) = trim_outliers([tau], 0.2, 0.2)
    np.testing.assert_array_equal(kept, [2.0, 0.0, -2.0, 0.0, 2.0])


@pytest.mark.parametrize(
    "density, gamma, size, want",
    [
        (0.4, 0.2, 5, (1, 2)),
        (0.3, 0.2, 10, (2, 3)),
        (0.5, 0.5, 3, (1, 2)),  # ⌈1.5⌉ + ⌈1.5⌉ > 3: the drop gives way
        (0.9, 0.1, 10, (1, 9)),
        (0.5, 0.01, 1, (0, 1)),  # a one-entry leaf keeps its entry
        (1.0, 0.0, 7, (0, 7)),
        (0.01, 0.0, 7, (0, 1)),  # at least one entry kept
        (0.1, 0.05, 1000, (50, 100)),
    ],
)
def test_counts(density, gamma, size, want):
    got = tuple(int(c) for c in breadcrumb_counts(density, gamma, size))
    assert got == want == np_counts(density, gamma, size)


def test_gamma_zero_with_sign_election_is_ties_per_leaf():
    rng = np.random.default_rng(1)
    base = {"a": rng.normal(size=(6, 5)), "b": rng.normal(size=(9,))}
    base = {k: v.astype(np.float32) for k, v in base.items()}
    models = [
        {k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}
        for _ in range(3)
    ]
    got = mats_jax.breadcrumbs(base, models, density=0.3, gamma=0.0, sign_election=True)
    want = mats_jax.ties(base, models, density=0.3, trim="per_leaf")
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_scalar_and_one_entry_leaves_keep_their_change():
    base = {"s": jnp.float32(1.0), "v": jnp.array([2.0])}
    model = {"s": jnp.float32(3.0), "v": jnp.array([-1.0])}
    got = mats_jax.breadcrumbs(base, [model], density=0.5, gamma=0.2)
    np.testing.assert_array_equal(got["s"], 3.0)
    np.testing.assert_array_equal(got["v"], [-1.0])


# --------------------------------------------------------------------------
# Against the oracle
# --------------------------------------------------------------------------

SHAPES = {"scalar": (), "one": (1,), "bias": (7,), "kernel": (5, 6), "stack": (2, 3, 4)}


@st.composite
def problems(draw: Any, per_model: bool = False) -> tuple:
    m = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    # Small integers make ties in magnitude common; normals make them rare.
    integers = draw(st.booleans())

    def values(shape: tuple) -> np.ndarray:
        if integers:
            return rng.integers(-3, 4, size=shape).astype(np.float32)
        return rng.normal(size=shape).astype(np.float32)

    base = {k: values(s) for k, s in SHAPES.items()}
    models = [{k: base[k] + values(s) for k, s in SHAPES.items()} for _ in range(m)]
    weights = [draw(st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0])) for _ in range(m)]

    def band() -> tuple[float, float]:
        density = draw(st.floats(0.01, 1.0))
        gamma = (
            draw(st.floats(0.0, 1.0 - density).map(_normal_or_zero))
            if density < 1
            else 0.0
        )
        return density, min(gamma, 0.99)

    if per_model:
        pairs = [band() for _ in range(m)]
        density, gamma = [p[0] for p in pairs], [p[1] for p in pairs]
    else:
        density, gamma = band()
    return base, models, weights, density, gamma


@settings(max_examples=20, deadline=None)
@given(
    p=problems(),
    sign_election=st.booleans(),
    normalize=st.sampled_from([None, True, False]),
    scale=st.floats(-2.0, 2.0),
)
def test_breadcrumbs_is_the_numpy_rule(p, sign_election, normalize, scale):
    base, models, weights, density, gamma = p
    got = mats_jax.breadcrumbs(
        base,
        models,
        density=density,
        gamma=gamma,
        scale=scale,
        weights=weights,
        sign_election=sign_election,
        normalize=normalize,
    )
    want = np_breadcrumbs(
        base, models, density, gamma, scale, weights, sign_election, normalize
    )
    assert_close(got, want, tol=1e-4)


@settings(max_examples=12, deadline=None)
@given(p=problems(per_model=True), sign_election=st.booleans())
def test_per_model_density_and_gamma_are_each_models_own(p, sign_election):
    base, models, weights, density, gamma = p
    got = mats_jax.breadcrumbs(
        base,
        models,
        density=density,
        gamma=gamma,
        weights=weights,
        sign_election=sign_election,
    )
    want = np_breadcrumbs(
        base, models, density, gamma, 1.0, weights, sign_election=sign_election
    )
    assert_close(got, want, tol=1e-4)


@settings(max_examples=20, deadline=None)
@given(
    n=st.sampled_from([1, 2, 7, 31, 60]),  # one compile per size
    density=st.floats(0.01, 1.0),
    share=st.floats(0.0, 1.0).map(_normal_or_zero),
    seed=st.integers(0, 2**31 - 1),
)
def test_distinct_magnitudes_keep_exactly_the_ranks_d_plus_1_to_d_plus_k(
    n, density, share, seed
):
    # Without ties the band is exactly the ranks below the d outliers.
    gamma = min(share * (1.0 - density), 0.99)
    tau = (
        np.random.default_rng(seed).permutation(np.arange(1, n + 1)).astype(np.float32)
    )
    tau *= np.where(np.arange(n) % 2, -1.0, 1.0).astype(np.float32)
    (kept,) = trim_outliers([jnp.asarray(tau)], density, gamma)
    dropped, k = np_counts(density, gamma, n)
    rank = np.argsort(np.argsort(-np.abs(tau)))  # 0 for the largest
    want = np.where((rank >= dropped) & (rank < dropped + k), tau, 0.0)
    np.testing.assert_array_equal(kept, want)
    assert int(np.count_nonzero(kept)) == k


def test_under_jit_the_parameters_are_traced():
    base = {"w": jnp.zeros(10)}
    models = [{"w": jnp.arange(1.0, 11.0)}, {"w": -jnp.arange(10.0, 0.0, -1.0)}]
    merge = jax.jit(
        lambda d, g: mats_jax.breadcrumbs(base, models, density=d, gamma=g)["w"]
    )
    for d, g in [(0.3, 0.2), (0.5, 0.0), (0.2, 0.5)]:
        want = np_breadcrumbs(base, models, d, g)["w"]
        np.testing.assert_allclose(merge(d, g), want)
    assert merge._cache_size() == 1


# --------------------------------------------------------------------------
# Streaming from a recipe
# --------------------------------------------------------------------------


def test_recipe_with_per_model_density_streams_as_in_memory(tmp_path):
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
  - {path: m0.safetensors, weight: 2.0, parameters: {density: 0.3, gamma: 0.2}}
  - {path: m1.safetensors, weight: 0.5}
method: breadcrumbs
parameters: {density: 0.5, gamma: 0.1, sign_election: true}
"""
    )
    merge_recipe(tmp_path / "r.yaml", tmp_path / "out")
    got = load_checkpoint(tmp_path / "out")
    want = mats_jax.breadcrumbs(
        base,
        models,
        density=(0.3, 0.5),
        gamma=(0.2, 0.1),
        weights=[2.0, 0.5],
        sign_election=True,
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
    return mats_jax.breadcrumbs(base, models, **params)


@pytest.mark.parametrize(
    "params, match",
    [
        (
            {"density": 0.8, "gamma": 0.3},
            r"density \+ gamma must be at most 1 .* got density=0\.8 \+ gamma=0\.3 = 1\.1",
        ),
        (
            {"density": [0.5, 0.8], "gamma": 0.3},
            r"density\[1\] \+ gamma must be at most 1 .*density=0\.8 \+ gamma=0\.3",
        ),
        (
            {"density": 0.5, "gamma": [0.1, 0.6]},
            r"density \+ gamma\[1\] must be at most 1",
        ),
        ({"density": 0.5, "gamma": 1.0}, r"gamma must lie in \[0, 1\), got 1\.0"),
        ({"density": 0.5, "gamma": -0.1}, r"gamma must lie in \[0, 1\)"),
        ({"density": 0.0}, r"density must lie in \(0, 1\], got 0\.0"),
        ({"density": math.nan}, r"density must lie in \(0, 1\]"),
        ({"density": [0.5, 1.2]}, r"density\[1\] must lie in \(0, 1\]"),
        ({"density": 0.5, "scale": math.inf}, r"scale must be a finite number"),
        (
            {"density": 0.5, "sign_election": "yes"},
            r"sign_election must be True or False",
        ),
        ({"density": 0.5, "normalize": 1}, r"normalize must be True or False"),
        ({"density": [0.2, 0.3, 0.4]}, r"density has 3 values, but 2 models"),
        ({"density": 0.5, "gamma": [0.1]}, r"gamma has 1 values, but 2 models"),
    ],
)
def test_bad_parameters_are_clear_errors(params, match):
    with pytest.raises(MergeInputError, match=match):
        _merge(**params)


def test_density_plus_gamma_of_exactly_one_is_accepted():
    for density, gamma in [(0.9, 0.1), (0.7, 0.3), (0.5, 0.5)]:
        _merge(density=density, gamma=gamma)


def test_traced_density_plus_gamma_is_checked_under_checkify():
    merge = jax.jit(lambda d, g: _merge(density=d, gamma=g))
    err, _ = checkify.checkify(merge)(0.8, 0.3)
    with pytest.raises(Exception, match=r"density \+ gamma must be at most 1"):
        err.throw()
    err, _ = checkify.checkify(merge)(0.7, 0.2)
    err.throw()  # nothing to report
