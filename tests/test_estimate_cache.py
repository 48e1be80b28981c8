"""The estimators' plan cache: keyed by what a model function computes, holding none of them.

A task loop builds ``lambda p, x: model.apply(p, x)`` afresh for every task:
the plan (and its compiled step) of the first must serve the others, a lambda
of the same code over another model must not share it, and nothing the cache
keeps may keep a function, its closure or its model alive.
"""

from __future__ import annotations

import functools
import gc
import logging
import weakref

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mats_jax import diagonal_fisher, gram, kfac

KEY = jax.random.key(0)
ESTIMATORS = {
    "kfac": functools.partial(kfac, kind="empirical"),
    "diagonal_fisher": functools.partial(diagonal_fisher, kind="empirical"),
    "gram": gram,
}


def params_of(seed: int = 0) -> dict:
    k1, k2, k3 = jax.random.split(jax.random.fold_in(KEY, seed), 3)
    return {
        "hidden": {
            "kernel": jax.random.normal(k1, (3, 5)) / 2,
            "bias": 0.1 * jax.random.normal(k3, (5,)),
        },
        "out": {"kernel": jax.random.normal(k2, (5, 4))},
    }


def tanh_mlp(p, x):
    return (
        jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"]) @ p["out"]["kernel"]
    )


def relu_mlp(p, x):
    return (
        jax.nn.relu(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
        @ p["out"]["kernel"]
    )


def batches(seed: int = 0) -> list[dict]:
    x = jax.random.normal(jax.random.fold_in(KEY, 100 + seed), (12, 3))
    y = jax.random.randint(jax.random.fold_in(KEY, 200 + seed), (12,), 0, 4)
    return [{"inputs": x[:6], "labels": y[:6]}, {"inputs": x[6:], "labels": y[6:]}]


def closure_over(model):
    """A fresh lambda per call, of one code object, closing over ``model``."""
    return lambda p, x: model(p, x)


def counting(model, calls: list):
    """``model``, noting every call (each is a trace: estimators only trace it)."""

    def counted(p, x):
        calls.append(1)
        return model(p, x)

    return counted


def run(name: str, fn, seed: int = 0):
    return ESTIMATORS[name](
        fn, params_of(seed), batches(seed), micro_batch_size=4, progress=False
    )


def assert_same(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def compilations(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_a_fresh_lambda_of_the_same_code_and_model_neither_traces_nor_compiles(
    name, caplog
):
    calls: list = []
    model = counting(tanh_mlp, calls)
    run(name, closure_over(model), seed=0)
    assert calls, "the first estimate traces the model"
    traced = len(calls)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        second = run(name, closure_over(model), seed=1)
    assert len(calls) == traced
    assert compilations(caplog) == []
    # The reused plan computes the second task's statistics, not the first's.
    assert_same(second, run(name, tanh_mlp, seed=1))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_a_lambda_over_another_model_gets_that_models_statistics(name):
    run(name, closure_over(tanh_mlp))
    got = run(name, closure_over(relu_mlp))
    assert_same(got, run(name, relu_mlp))
    differs = [
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(run(name, tanh_mlp)))
    ]
    assert max(differs) > 1e-3  # the two models' statistics do differ


def test_defaults_and_partial_arguments_are_part_of_the_key():
    def with_default(model):
        return lambda p, x, m=model: m(p, x)

    run("kfac", with_default(tanh_mlp))
    assert_same(run("kfac", with_default(relu_mlp)), run("kfac", relu_mlp))

    def apply(model, p, x):
        return model(p, x)

    calls: list = []
    counted = counting(tanh_mlp, calls)
    run("kfac", functools.partial(apply, counted))
    traced = len(calls)
    run("kfac", functools.partial(apply, counted), seed=1)
    assert len(calls) == traced
    assert_same(run("kfac", functools.partial(apply, relu_mlp)), run("kfac", relu_mlp))


def test_a_rebound_global_changes_the_key():
    # One code object whose global ``model`` is rebound between two lambdas.
    namespace: dict = {}
    exec("def make():\n    return lambda p, x: model(p, x)\n", namespace)
    namespace["model"] = tanh_mlp
    first = namespace["make"]()
    run("kfac", first)
    namespace["model"] = relu_mlp
    second = namespace["make"]()
    assert first.__code__ is second.__code__
    assert_same(run("kfac", second), run("kfac", relu_mlp))


def test_a_changed_dict_in_the_closure_changes_the_key():
    models = {"body": tanh_mlp}
    run("kfac", lambda p, x: models["body"](p, x))
    models["body"] = relu_mlp
    assert_same(run("kfac", lambda p, x: models["body"](p, x)), run("kfac", relu_mlp))


class Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(jnp.tanh(nn.Dense(5)(x)))


def test_a_bound_method_got_afresh_reuses_the_plan(caplog):
    module = Linen()
    variables = module.init(KEY, jnp.zeros((1, 3)))
    data = batches()

    def estimate():
        # ``module.apply`` is a new bound-method object at every access.
        return kfac(module.apply, variables, data, micro_batch_size=4, progress=False)

    estimate()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        estimate()
    assert compilations(caplog) == []


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_the_cache_keeps_no_function_closure_or_model_alive(name):
    module = Linen()
    variables = module.init(KEY, jnp.zeros((1, 3)))
    fn = closure_over(module.apply)
    ESTIMATORS[name](fn, variables, batches(), micro_batch_size=4, progress=False)
    dead_fn, dead_module = weakref.ref(fn), weakref.ref(module)
    del fn, module
    gc.collect()
    assert dead_fn() is None
    assert dead_module() is None
    # And an estimate with a new module (its id may be the dead one's) is its own.
    other = Linen()
    got = ESTIMATORS[name](
        lambda p, x: other.apply(p, x),
        variables,
        batches(),
        micro_batch_size=4,
        progress=False,
    )
    want = ESTIMATORS[name](
        other.apply, variables, batches(), micro_batch_size=4, progress=False
    )
    assert_same(got, want)
