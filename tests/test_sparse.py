"""TIES, DARE and the magnitude threshold against hand-worked and brute-force twins."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mats_jax import dare, magnitude_threshold, task_arithmetic, ties


def test_ties_hand_worked_example():
    # Task vectors (base 0), density 0.5 over 4 entries keeps the top 2 of each:
    #   τ1 = [ 4, -3,  1, 0.5] -> [ 4, -3, 0, 0]
    #   τ2 = [-1, -2,  5, 0.2] -> [ 0, -2, 5, 0]
    #   τ3 = [ 2,  3, -6, 0.1] -> [ 0,  3,-6, 0]
    # elected sign of the sums [4, -2, -1, 0]: [+, -, -, 0]
    # disjoint means: [4, (-3-2)/2, -6, 0]; scale 0.5 -> [2, -1.25, -3, 0].
    base = {"w": jnp.array([1.0, 1.0, 1.0, 1.0])}
    vectors = [[4, -3, 1, 0.5], [-1, -2, 5, 0.2], [2, 3, -6, 0.1]]
    models = [{"w": base["w"] + jnp.array(v, jnp.float32)} for v in vectors]
    got = ties(base, models, density=0.5, scale=0.5)["w"]
    np.testing.assert_allclose(got, 1.0 + np.array([2.0, -1.25, -3.0, 0.0]), rtol=1e-6)


def test_ties_weights_enter_election_and_mean():
    base = {"w": jnp.zeros(1)}
    models = [{"w": jnp.array([2.0])}, {"w": jnp.array([-1.0])}]
    # Weights 1 and 3: weighted sum 2 - 3 = -1 elects "-"; only model 2 agrees.
    np.testing.assert_allclose(
        ties(base, models, density=1.0, weights=[1.0, 3.0])["w"], [-1.0]
    )
    np.testing.assert_allclose(
        ties(base, models, density=1.0, weights=[1.0, 1.0])["w"], [2.0]
    )


def test_ties_global_and_per_leaf_trimming_differ_as_defined():
    base = {"big": jnp.zeros(4), "small": jnp.zeros(4)}
    model = {
        "big": jnp.array([10.0, 9.0, 8.0, 7.0]),
        "small": jnp.array([0.4, 0.3, 0.2, 0.1]),
    }
    glob = ties(base, [model], density=0.5, trim="global")
    per_leaf = ties(base, [model], density=0.5, trim="per_leaf")
    # Global: the top half of all 8 entries are all in "big".
    np.testing.assert_allclose(glob["big"], model["big"])
    np.testing.assert_allclose(glob["small"], jnp.zeros(4))
    # Per leaf: the top half of each leaf.
    np.testing.assert_allclose(per_leaf["big"], [10.0, 9.0, 0.0, 0.0])
    np.testing.assert_allclose(per_leaf["small"], [0.4, 0.3, 0.0, 0.0])


@settings(max_examples=60, deadline=None)
@given(
    arrays=st.lists(
        hnp.arrays(
            np.float32,
            st.integers(1, 40),
            elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=False),
        ),
        min_size=1,
        max_size=3,
    ),
    data=st.data(),
)
def test_magnitude_threshold_equals_sorting(arrays, data):
    flat = np.sort(np.abs(np.concatenate([a.ravel() for a in arrays])))[::-1]
    k = data.draw(st.integers(1, flat.size))
    got = float(magnitude_threshold([jnp.asarray(a) for a in arrays], k))
    assert got == flat[k - 1]


def test_magnitude_threshold_under_jit_with_traced_k():
    x = jnp.arange(-50.0, 50.0)
    f = jax.jit(lambda k: magnitude_threshold([x], k))
    assert [float(f(k)) for k in (1, 2, 100)] == [50.0, 49.0, 0.0]


def test_ties_keeps_the_requested_fraction():
    key = jax.random.PRNGKey(0)
    base = {"a": jnp.zeros((30, 20)), "b": jnp.zeros((50,))}
    model = {
        "a": jax.random.normal(key, (30, 20)),
        "b": jax.random.normal(jax.random.fold_in(key, 1), (50,)),
    }
    for density in (0.01, 0.2, 0.5, 1.0):
        out = ties(base, [model], density=density)
        kept = sum(int(jnp.sum(v != 0)) for v in jax.tree.leaves(out))
        assert kept == int(np.ceil(density * 650))


def test_dare_is_unbiased_and_drops_at_the_requested_rate():
    base = {"w": jnp.zeros((200, 200))}
    model = {"w": jnp.ones((200, 200))}
    out = dare(base, [model], drop_rate=0.3, key=jax.random.key(1))["w"]
    kept = float(jnp.mean(out != 0))
    assert abs(kept - 0.7) < 0.01
    np.testing.assert_allclose(out[out != 0], 1 / 0.7, rtol=1e-6)
    assert abs(float(jnp.mean(out)) - 1.0) < 0.02  # rescaling keeps the expectation


def test_dare_depends_only_on_the_key():
    base = {"w": jnp.zeros(64)}
    models = [{"w": jnp.ones(64)}, {"w": -jnp.ones(64)}]
    one = dare(base, models, drop_rate=0.5, key=jax.random.key(3))
    again = dare(base, models, drop_rate=0.5, key=jax.random.key(3))
    other = dare(base, models, drop_rate=0.5, key=jax.random.key(4))
    np.testing.assert_array_equal(one["w"], again["w"])
    assert not np.array_equal(one["w"], other["w"])


def test_dare_without_dropping_is_task_arithmetic():
    key = jax.random.PRNGKey(5)
    base = {"w": jax.random.normal(key, (5, 4))}
    models = [
        {"w": jax.random.normal(jax.random.fold_in(key, m), (5, 4))} for m in range(3)
    ]
    got = dare(
        base,
        models,
        drop_rate=0.0,
        key=jax.random.key(0),
        scale=0.4,
        weights=[1.0, 2.0, 0.5],
    )
    expected = task_arithmetic(base, models, scale=0.4, weights=[1.0, 2.0, 0.5])
    np.testing.assert_allclose(got["w"], expected["w"], rtol=1e-6)


def test_dare_ties_elects_signs():
    base = {"w": jnp.zeros(3)}
    models = [{"w": jnp.array([1.0, -1.0, 2.0])}, {"w": jnp.array([3.0, 2.0, -1.0])}]
    got = dare(base, models, drop_rate=0.0, key=jax.random.key(0), sign_election=True)[
        "w"
    ]
    np.testing.assert_allclose(got, [2.0, 2.0, 2.0])


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_sweeping_hyperparameters_does_not_recompile(method, caplog):
    base = {"w": jnp.zeros((7, 3))}
    models = [{"w": jnp.ones((7, 3))}, {"w": -2 * jnp.ones((7, 3))}]

    def run(x):
        if method == "ties":
            return ties(base, models, density=x, scale=x)
        return dare(base, models, drop_rate=x / 2, key=jax.random.key(0), scale=x)

    run(0.5)
    # jax.log_compiles logs every compilation: the sweep must log none.
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for x in (0.1, 0.3, 0.9):
            run(x)
    assert [
        r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()
    ] == []
