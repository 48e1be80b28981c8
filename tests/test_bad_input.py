"""Bad inputs raise MergeInputError before any work, naming the leaf and what was expected.

Every case runs with the ``no_work`` fixture, which replaces each method's
jitted computation with a function that fails the test: an input must be
rejected by the checks that run first, not by an error deep inside a trace.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from zoo import CASES

import mats_jax as mj
import mats_jax.engine
from mats_jax.tree import nest_paths

SHAPES = {"dense/kernel": (3, 4), "dense/bias": (4,), "nested/inner/scale": (2,)}
NAN_INF = (math.nan, math.inf, -math.inf)


def flat_model(seed: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {p: jnp.asarray(rng.normal(size=s), jnp.float32) for p, s in SHAPES.items()}


def model(seed: int, **replace: Any) -> dict[str, Any]:
    """A parameter pytree; ``replace`` maps a path (``__`` for ``/``) to a leaf, or None to drop it."""
    flat: dict[str, Any] = flat_model(seed)
    for key, value in replace.items():
        path = key.replace("__", "/")
        if value is None:
            del flat[path]
        else:
            flat[path] = value
    return nest_paths(flat)


def with_value(path: str, value: float, seed: int = 0) -> dict[str, Any]:
    """``model(seed)`` with the first entry of the leaf at ``path`` set to ``value``."""
    leaf = np.array(flat_model(seed)[path])
    leaf.flat[0] = value
    return model(seed, **{path.replace("/", "__"): jnp.asarray(leaf)})


def kfac_stats(**replace: Any) -> dict[str, Any]:
    """Statistics for MaTS: KFAC kernel, Diagonal bias, Dense nested leaf."""
    flat = {
        "dense/kernel": mj.KFAC(jnp.eye(3) * 2.0, jnp.eye(4)),
        "dense/bias": mj.Diagonal(jnp.ones(4)),
        "nested/inner/scale": mj.Dense(jnp.eye(2)),
    }
    flat.update({k.replace("__", "/"): v for k, v in replace.items()})
    return nest_paths(flat)


def gram_stats(**replace: Any) -> dict[str, Any]:
    """Statistics for RegMean (and closed-form solves): a Gram on the kernel only."""
    flat = {
        "dense/kernel": mj.Gram(jnp.eye(3)),
        "dense/bias": None,
        "nested/inner/scale": None,
    }
    flat.update({k.replace("__", "/"): v for k, v in replace.items()})
    return nest_paths(flat)


def fishers(**replace: Any) -> dict[str, Any]:
    """Diagonal Fishers (raw arrays wrapped as Diagonal), None for the nested leaf."""
    flat = {
        "dense/kernel": jnp.ones((3, 4)),
        "dense/bias": jnp.ones(4),
        "nested/inner/scale": None,
    }
    flat.update({k.replace("__", "/"): v for k, v in replace.items()})
    return nest_paths(
        {p: mj.Diagonal(v) if hasattr(v, "shape") else v for p, v in flat.items()}
    )


# --------------------------------------------------------------------------
# The registry's methods (tests/zoo.py). Each is called as
# fn(base, models, stats, **kw); stats=None means valid statistics for every
# model, built for the statistic type the method takes.
# --------------------------------------------------------------------------


def _stats(stats: Any, models: Any, make: Callable[[], Any]) -> Any:
    return stats if stats is not None else [make() for _ in models]


STATS_OF_TYPE: dict[Any, Callable[[], Any]] = {
    mj.Diagonal: lambda: fishers(),
    mj.Gram: lambda: gram_stats(),
    mj.Statistic: lambda: kfac_stats(),
}

METHODS: dict[str, Callable[..., Any]] = {
    name: (
        lambda b, ms, s, case=case, **kw: case(
            b,
            ms,
            _stats(s, ms, STATS_OF_TYPE[case.statistic_type])
            if case.statistic_type
            else None,
            **kw,
        )
    )
    for name, case in CASES.items()
}
WITH_BASE = tuple(name for name, case in CASES.items() if case.needs.base)
WITH_STATS = tuple(name for name, case in CASES.items() if case.statistic_type)
STATS = {name: STATS_OF_TYPE[CASES[name].statistic_type] for name in WITH_STATS}


def all_methods() -> Any:
    return pytest.mark.parametrize("method", list(METHODS))


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes every merge computation fail: a bad input must be rejected first."""

    def started(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the merge started computing before rejecting its input")

    # Both engines run every method through merge_checked.
    monkeypatch.setattr(mats_jax.engine, "merge_checked", started)


def rejects(match: str) -> Any:
    return pytest.raises(mj.MergeInputError, match=match)


def test_merge_input_error_is_a_value_error() -> None:
    assert issubclass(mj.MergeInputError, ValueError)


@pytest.mark.parametrize("method", tuple(METHODS))
def test_valid_inputs_pass_the_checks(method: str) -> None:
    # The control for every case below: the same call with good inputs works...
    out = METHODS[method](model(0), [model(1), model(2)], None)
    params = out.params if isinstance(out, mj.MergeResult) else out
    assert jax.tree.structure(params) == jax.tree.structure(model(0))


@pytest.mark.parametrize("method", tuple(METHODS))
def test_no_work_fixture_catches_a_merge_that_runs(method: str, no_work: None) -> None:
    # ...and reaches the computation no_work replaces.
    with pytest.raises(AssertionError, match="started computing"):
        METHODS[method](model(0), [model(1), model(2)], None)


# --------------------------------------------------------------------------
# Models and base
# --------------------------------------------------------------------------

# The first model, or the base for the methods that take one, is the reference.
REF = r"(models\[0\]|base)"
MODEL_CASES = {
    "missing_leaf": (
        model(1, dense__bias=None),
        rf"models\[1\] has a different tree structure from {REF}: "
        r"missing leaves 'dense/bias'",
    ),
    "missing_nested_leaf": (
        model(1, nested__inner__scale=None),
        r"models\[1\] .*missing leaves 'nested/inner/scale'",
    ),
    "extra_leaf": (
        model(1, dense__extra=jnp.zeros(2)),
        r"models\[1\] has a different tree structure .*unexpected leaves 'dense/extra'",
    ),
    "shape": (
        model(1, dense__kernel=jnp.zeros((4, 3))),
        rf"models\[1\] at 'dense/kernel': shape \(4, 3\) differs from {REF}'s \(3, 4\)",
    ),
    "rank": (
        model(1, dense__bias=jnp.zeros((4, 1))),
        rf"models\[1\] at 'dense/bias': shape \(4, 1\) differs from {REF}'s \(4,\)",
    ),
    "dtype": (
        model(1, dense__kernel=jnp.zeros((3, 4), jnp.bfloat16)),
        rf"models\[1\] at 'dense/kernel': dtype bfloat16 differs from {REF}'s float32",
    ),
    "nan": (
        with_value("dense/kernel", math.nan, 1),
        r"models\[1\] at 'dense/kernel': contains NaN or Inf",
    ),
    "inf": (
        with_value("dense/bias", math.inf, 1),
        r"models\[1\] at 'dense/bias': contains NaN or Inf",
    ),
    "minus_inf": (
        with_value("nested/inner/scale", -math.inf, 1),
        r"models\[1\] at 'nested/inner/scale': contains NaN or Inf",
    ),
}


@all_methods()
@pytest.mark.parametrize("case", tuple(MODEL_CASES))
def test_a_model_unlike_the_others_is_rejected(
    method: str, case: str, no_work: None
) -> None:
    bad, match = MODEL_CASES[case]
    with rejects(match):
        METHODS[method](model(0), [model(2), bad, model(3)], None)


@all_methods()
@pytest.mark.parametrize("value", NAN_INF)
@pytest.mark.parametrize("position", [0, 1, 2])
def test_nan_or_inf_in_any_model_is_rejected(
    method: str, value: float, position: int, no_work: None
) -> None:
    models = [model(1), model(2), model(3)]
    models[position] = with_value("nested/inner/scale", value, seed=position + 1)
    with rejects(rf"models\[{position}\] at 'nested/inner/scale': contains NaN or Inf"):
        METHODS[method](model(0), models, None)


BASE_CASES = {
    "missing_leaf": (
        model(0, dense__bias=None),
        r"models\[0\] has a different tree structure from base: unexpected leaves 'dense/bias'",
    ),
    "extra_leaf": (
        model(0, extra=jnp.zeros(2)),
        r"models\[0\] has a different tree structure from base: missing leaves 'extra'",
    ),
    "shape": (
        model(0, dense__kernel=jnp.zeros((3, 5))),
        r"models\[0\] at 'dense/kernel': shape \(3, 4\) differs from base's \(3, 5\)",
    ),
    "dtype": (
        model(0, dense__bias=jnp.zeros(4, jnp.bfloat16)),
        r"models\[0\] at 'dense/bias': dtype float32 differs from base's bfloat16",
    ),
    **{
        f"value_{v}": (
            with_value("dense/kernel", v),
            r"base at 'dense/kernel': contains NaN or Inf",
        )
        for v in NAN_INF
    },
}


@pytest.mark.parametrize("method", WITH_BASE)
@pytest.mark.parametrize("case", tuple(BASE_CASES))
def test_a_base_unlike_the_models_is_rejected(
    method: str, case: str, no_work: None
) -> None:
    bad, match = BASE_CASES[case]
    with rejects(match):
        METHODS[method](bad, [model(1), model(2)], None)


@all_methods()
def test_leaves_that_are_not_arrays_are_rejected(method: str, no_work: None) -> None:
    odd = model(1, dense__bias=1.0)
    base = model(0, dense__bias=1.0)
    with rejects(r"at 'dense/bias': expected a floating-point array, got float"):
        METHODS[method](base, [odd, odd], None)


@all_methods()
@pytest.mark.parametrize("leaf", [np.arange(4), np.ones(4, bool)])
def test_integer_and_bool_leaves_pass_through_unchanged(method: str, leaf: Any) -> None:
    # Position ids, masks, step counters: not merged, the base's kept.
    base = model(0, dense__bias=leaf)
    result = METHODS[method](
        base, [model(1, dense__bias=leaf), model(2, dense__bias=leaf)], None
    )
    kept = result.params["dense"]["bias"]
    assert kept.dtype == leaf.dtype
    np.testing.assert_array_equal(kept, leaf)
    assert result.report["dense"]["bias"].solver == "passthrough"


@all_methods()
def test_integer_leaves_that_differ_are_rejected(method: str, no_work: None) -> None:
    base = model(0, dense__bias=np.arange(4))
    other = model(2, dense__bias=np.arange(4) + 1)
    with rejects(r"at 'dense/bias': this int64 leaf differs"):
        METHODS[method](base, [model(1, dense__bias=np.arange(4)), other], None)


TREE_PARAMETERS = tuple(
    (name, field.name)
    for name, case in CASES.items()
    for field in dataclasses.fields(case.merge_method.Parameters)
    if field.name in ("init", "fallback")
)
"""The (case, field) pairs whose parameter may be a parameter pytree."""


@pytest.mark.parametrize(("method", "field"), TREE_PARAMETERS)
def test_a_parameter_tree_with_integer_leaves_merges_like_one_without(
    method: str, field: str
) -> None:
    # A data-free merge of a checkpoint with a position-ids buffer, given as
    # MaTS's init or a fallback tree, holds the buffer too: it is set aside
    # with the models' and the rest merges as if the leaf were not there.
    ids = np.arange(4)
    base, models = model(0), [model(1), model(2)]
    given = mj.merge_pytrees("task_arithmetic", base=base, models=models, scale=0.5)
    expected = METHODS[method](base, models, None, **{field: given.params})

    def with_ids(tree: Any) -> Any:
        return {**tree, "ids": ids}

    def stats_with_ids(stats: Any) -> Any:
        return [{**s, "ids": None} for s in stats]

    statistic = CASES[method].statistic_type
    stats = [STATS_OF_TYPE[statistic]() for _ in models]  # type: ignore[index]
    result = METHODS[method](
        with_ids(base),
        [with_ids(m) for m in models],
        stats_with_ids(stats),
        **{field: with_ids(given.params)},
    )
    np.testing.assert_array_equal(result.params["ids"], ids)
    assert result.report["ids"].solver == "passthrough"
    del result.params["ids"]
    jax.tree.map(np.testing.assert_array_equal, result.params, expected.params)


@pytest.mark.parametrize(("method", "field"), TREE_PARAMETERS)
def test_a_parameter_tree_whose_integer_leaf_differs_is_rejected(
    method: str, field: str, no_work: None
) -> None:
    base, models = (
        model(0, dense__bias=np.arange(4)),
        [model(m, dense__bias=np.arange(4)) for m in (1, 2)],
    )
    given = model(3, dense__bias=np.arange(4) + 1)
    with rejects(rf"parameters.{field} at 'dense/bias': this int64 leaf differs"):
        METHODS[method](base, models, None, **{field: given})


@all_methods()
def test_a_mismatch_is_rejected_under_jit_too(method: str, no_work: None) -> None:
    # Structure, shape and dtype checks need only abstract values.
    merge = jax.jit(lambda b, ms: METHODS[method](b, ms, None))
    with rejects(r"models\[1\] at 'dense/kernel': shape \(4, 3\) differs"):
        merge(model(0), [model(1), model(2, dense__kernel=jnp.zeros((4, 3)))])


@all_methods()
def test_traced_weights_of_the_wrong_length_are_rejected(
    method: str, no_work: None
) -> None:
    merge = jax.jit(lambda b, ms, w: METHODS[method](b, ms, None, weights=w))
    with rejects(r"weights has shape \(3,\), expected \(2,\): one per model"):
        merge(model(0), [model(1), model(2)], jnp.ones(3))


@all_methods()
def test_an_empty_model_list_is_rejected(method: str, no_work: None) -> None:
    with rejects(r"models is empty: merging needs at least one model"):
        METHODS[method](model(0), [], [])


@all_methods()
def test_a_single_model_instead_of_a_list_is_rejected(
    method: str, no_work: None
) -> None:
    # One statistic pytree per top-level key, so the length checks agree.
    stats = [STATS[method]() for _ in model(1)] if method in WITH_STATS else None
    with rejects(r"models must be a list of parameter pytrees, got dict"):
        METHODS[method](model(0), model(1), stats)


def _counts_refused(low: int, high: int | None) -> set[int]:
    """The model counts next to a method's range (Needs.models) that it refuses."""
    return {n for n in (low - 1, (high or 0) + 1) if n >= 1 and n < low} | (
        {high + 1} if high is not None else set()
    )


COUNT_CASES = [
    (name, n)
    for name, case in CASES.items()
    for n in sorted(_counts_refused(*case.needs.models))
]


@pytest.mark.parametrize(("method", "count"), COUNT_CASES)
def test_a_number_of_models_the_method_does_not_take_is_rejected(
    method: str, count: int, no_work: None
) -> None:
    models = [model(m + 1) for m in range(count)]
    stats = [STATS[method]() for _ in models] if method in WITH_STATS else None
    name = CASES[method].method
    with rejects(rf"{name} merges (exactly|at least|\d+ to) \d+ models?, got {count}$"):
        METHODS[method](model(0), models, stats)


# --------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------

WEIGHT_CASES = {
    "too_many": (
        [1.0, 1.0, 1.0],
        r"weights has shape \(3,\), expected \(2,\): one per model",
    ),
    "too_few": ([1.0], r"weights has shape \(1,\), expected \(2,\): one per model"),
    "not_a_vector": ([[1.0, 1.0]], r"weights has shape \(1, 2\), expected \(2,\)"),
    "all_zero": ([0.0, 0.0], r"weights are all zero"),
    "negative": ([1.0, -0.5], r"weights must be non-negative, got \[1.0, -0.5\]"),
    "nan": ([1.0, math.nan], r"weights must be finite"),
    "inf": ([math.inf, 1.0], r"weights must be finite"),
}


@all_methods()
@pytest.mark.parametrize("case", tuple(WEIGHT_CASES))
def test_bad_weights_are_rejected(method: str, case: str, no_work: None) -> None:
    weights, match = WEIGHT_CASES[case]
    with rejects(match):
        METHODS[method](model(0), [model(1), model(2)], None, weights=weights)


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------

# (method, statistics for every task, expected message)
MISFIT_CASES = {
    "diagonal_shape": (
        "mats",
        kfac_stats(dense__bias=mj.Diagonal(jnp.ones(3))),
        r"(statistics|fishers|grams)\[0\] at 'dense/bias': Diagonal.f has shape \(3,\), "
        r"expected the leaf's shape \(4,\)",
    ),
    "dense_shape": (
        "mats",
        kfac_stats(nested__inner__scale=mj.Dense(jnp.eye(3))),
        r"(statistics|fishers|grams)\[0\] at 'nested/inner/scale': Dense.f has shape \(3, 3\), "
        r"expected \(2, 2\)",
    ),
    "kfac_a_shape": (
        "mats",
        kfac_stats(dense__kernel=mj.KFAC(jnp.eye(4), jnp.eye(4))),
        r"(statistics|fishers|grams)\[0\] at 'dense/kernel': KFAC.a has shape \(4, 4\), expected \(3, 3\)",
    ),
    "kfac_g_shape": (
        "mats",
        kfac_stats(dense__kernel=mj.KFAC(jnp.eye(3), jnp.eye(3))),
        r"(statistics|fishers|grams)\[0\] at 'dense/kernel': KFAC.g has shape \(3, 3\), expected \(4, 4\)",
    ),
    "kfac_missing_axis": (
        "mats",
        kfac_stats(dense__kernel=mj.KFAC(jnp.eye(3), jnp.eye(4), out_axes=(2,))),
        r"(statistics|fishers|grams)\[0\] at 'dense/kernel': KFAC axes .* do not exist on a leaf of rank 2",
    ),
    "kfac_repeated_axis": (
        "mats",
        kfac_stats(
            dense__kernel=mj.KFAC(jnp.eye(3), jnp.eye(3), in_axes=(0,), out_axes=(-2,))
        ),
        r"(statistics|fishers|grams)\[0\] at 'dense/kernel': KFAC .* repeat an axis",
    ),
    "gram_shape_mats": (
        "mats",
        kfac_stats(dense__kernel=mj.Gram(jnp.eye(4))),
        r"(statistics|fishers|grams)\[0\] at 'dense/kernel': Gram.a has shape \(4, 4\), expected \(3, 3\)",
    ),
    "gram_missing_axis_mats": (
        "mats",
        kfac_stats(dense__kernel=mj.Gram(jnp.eye(3), in_axes=(-3,))),
        r"(statistics|fishers|grams)\[0\] at 'dense/kernel': Gram axes .* do not exist on a leaf of rank 2",
    ),
    "gram_on_a_vector": (
        "mats",
        kfac_stats(dense__bias=mj.Gram(jnp.eye(4))),
        r"(statistics|fishers|grams)\[0\] at 'dense/bias': Gram .*do not exist on a leaf of rank 1",
    ),
    "gram_shape_regmean": (
        "regmean",
        gram_stats(dense__kernel=mj.Gram(jnp.eye(4))),
        r"(statistics|fishers|grams)\[0\] at 'dense/kernel': Gram.a has shape \(4, 4\), expected \(3, 3\)",
    ),
    "gram_missing_axis_regmean": (
        "regmean",
        gram_stats(dense__kernel=mj.Gram(jnp.eye(3), in_axes=(5,))),
        r"(statistics|fishers|grams)\[0\] at 'dense/kernel': Gram axes .* do not exist on a leaf of rank 2",
    ),
    "gram_shape_closed_form": (
        "solve_closed_form",
        gram_stats(dense__kernel=mj.Gram(jnp.eye(2))),
        r"(statistics|fishers|grams)\[0\] at 'dense/kernel': Gram.a has shape \(2, 2\), expected \(3, 3\)",
    ),
    "fisher_shape": (
        "fisher_merge",
        fishers(dense__kernel=jnp.ones((4, 3))),
        r"(statistics|fishers|grams)\[0\] at 'dense/kernel': .*shape \(4, 3\), expected the leaf's shape \(3, 4\)",
    ),
    "not_a_statistic_mats": (
        "mats",
        kfac_stats(dense__bias=jnp.ones(4)),
        r"(statistics|fishers|grams)\[0\] at 'dense/bias': expected one of Statistic or None, got ArrayImpl",
    ),
    "kfac_for_regmean": (
        "regmean",
        gram_stats(dense__kernel=mj.KFAC(jnp.eye(3), jnp.eye(4))),
        r"(statistics|fishers|grams)\[0\] at 'dense/kernel': expected one of Gram or None, got KFAC",
    ),
}


@pytest.mark.parametrize("case", tuple(MISFIT_CASES))
def test_a_statistic_that_does_not_fit_its_leaf_is_rejected(
    case: str, no_work: None
) -> None:
    method, stats, match = MISFIT_CASES[case]
    with rejects(match):
        METHODS[method](model(0), [model(1), model(2)], [stats, stats])


# (method, statistics of task 0, statistics of task 1, expected message)
MISMATCH_CASES = {
    "kfac_and_gram": (
        "mats",
        kfac_stats(),
        kfac_stats(dense__kernel=mj.Gram(jnp.eye(3))),
        r"(statistics|fishers|grams)\[1\] at 'dense/kernel': Gram.* differs from statistics\[0\]'s KFAC",
    ),
    "diagonal_and_none": (
        "mats",
        kfac_stats(),
        kfac_stats(dense__bias=None),
        r"(statistics|fishers|grams)\[1\] at 'dense/bias': no statistic \(None\) differs from "
        r"(statistics|fishers|grams)\[0\]'s Diagonal",
    ),
    "different_axes": (
        "mats",
        kfac_stats(dense__kernel=mj.Gram(jnp.eye(3))),
        kfac_stats(dense__kernel=mj.Gram(jnp.eye(3), in_axes=(0,), out_axes=(1,))),
        r"(statistics|fishers|grams)\[1\] at 'dense/kernel': Gram\{'in_axes': \(0,\).*differs from "
        r"(statistics|fishers|grams)\[0\]'s Gram\{'in_axes': \(-2,\)",
    ),
    "gram_and_none_regmean": (
        "regmean",
        gram_stats(),
        gram_stats(dense__kernel=None),
        r"(statistics|fishers|grams)\[1\] at 'dense/kernel': no statistic \(None\) differs",
    ),
    "fisher_and_none": (
        "fisher_merge",
        fishers(),
        fishers(dense__bias=None),
        r"(statistics|fishers|grams)\[1\] at 'dense/bias': no statistic \(None\) differs",
    ),
}


@pytest.mark.parametrize("case", tuple(MISMATCH_CASES))
def test_statistics_of_different_types_for_one_leaf_are_rejected(
    case: str, no_work: None
) -> None:
    method, first, second, match = MISMATCH_CASES[case]
    with rejects(match):
        METHODS[method](model(0), [model(1), model(2)], [first, second])


@pytest.mark.parametrize("method", WITH_STATS)
@pytest.mark.parametrize("count", [1, 3])
def test_a_statistics_list_of_the_wrong_length_is_rejected(
    method: str, count: int, no_work: None
) -> None:
    stats = [STATS[method]() for _ in range(count)]
    with rejects(rf"has {count} entries, expected 2: one per model"):
        METHODS[method](model(0), [model(1), model(2)], stats)


@pytest.mark.parametrize("method", WITH_STATS)
def test_statistics_not_in_a_list_are_rejected(method: str, no_work: None) -> None:
    with rejects(r"must be a list with one .* pytree per model, got dict"):
        METHODS[method](model(0), [model(1)], STATS[method]())


@pytest.mark.parametrize("method", WITH_STATS)
@pytest.mark.parametrize("change", ["missing", "extra"])
def test_a_statistics_tree_with_the_wrong_structure_is_rejected(
    method: str, change: str, no_work: None
) -> None:
    good = STATS[method]()
    bad = STATS[method]()
    if change == "missing":
        del bad["nested"]["inner"]
    else:
        bad["nested"]["other"] = None
    with rejects(
        r"(statistics|fishers|grams)\[1\] does not have the parameters' tree structure \(expected a "
        r"statistic or None at each of: 'dense/bias', 'dense/kernel', 'nested/inner/scale'\)"
    ):
        METHODS[method](model(0), [model(1), model(2)], [good, bad])


def _poisoned(array: jax.Array, value: float) -> jax.Array:
    return jnp.asarray(array).at[(0,) * jnp.ndim(array)].set(value)


# (method, field path of the poisoned array, statistics builder)
NONFINITE_STAT_CASES = {
    "kfac_a": (
        "mats",
        "dense/kernel/a",
        lambda v: kfac_stats(
            dense__kernel=mj.KFAC(_poisoned(jnp.eye(3), v), jnp.eye(4))
        ),
    ),
    "kfac_g": (
        "mats",
        "dense/kernel/g",
        lambda v: kfac_stats(
            dense__kernel=mj.KFAC(jnp.eye(3), _poisoned(jnp.eye(4), v))
        ),
    ),
    "diagonal": (
        "mats",
        "dense/bias/f",
        lambda v: kfac_stats(dense__bias=mj.Diagonal(_poisoned(jnp.ones(4), v))),
    ),
    "dense": (
        "mats",
        "nested/inner/scale/f",
        lambda v: kfac_stats(nested__inner__scale=mj.Dense(_poisoned(jnp.eye(2), v))),
    ),
    "gram": (
        "regmean",
        "dense/kernel/a",
        lambda v: gram_stats(dense__kernel=mj.Gram(_poisoned(jnp.eye(3), v))),
    ),
    "fisher": (
        "fisher_merge",
        "dense/kernel/f",
        lambda v: fishers(dense__kernel=_poisoned(jnp.ones((3, 4)), v)),
    ),
}


@pytest.mark.parametrize(
    ("case", "value"),
    [(case, value) for case in NONFINITE_STAT_CASES for value in NAN_INF],
)
def test_nan_or_inf_in_a_statistic_is_rejected(
    case: str, value: float, no_work: None
) -> None:
    method, field, make = NONFINITE_STAT_CASES[case]
    with rejects(rf"(statistics|fishers|grams)\[1\] at '{field}': contains NaN or Inf"):
        METHODS[method](model(0), [model(1), model(2)], [STATS[method](), make(value)])


@pytest.mark.parametrize("method", ["fisher_merge", "mats"])
def test_a_negative_diagonal_statistic_is_rejected(method: str, no_work: None) -> None:
    negative = -jnp.ones(4)
    stats = (
        fishers(dense__bias=negative)
        if method == "fisher_merge"
        else kfac_stats(dense__bias=mj.Diagonal(negative))
    )
    with rejects(r"(statistics|fishers|grams)\[1\] at 'dense/bias.*negative"):
        METHODS[method](model(0), [model(1), model(2)], [STATS[method](), stats])


# --------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_ties_density_outside_zero_one_is_rejected(
    density: float, no_work: None
) -> None:
    with rejects(r"density must lie in \(0, 1\], got"):
        mj.ties(model(0), [model(1)], density=density)


@pytest.mark.parametrize("drop_rate", [1.0, -0.1, 1.5, math.nan, -math.inf])
def test_dare_drop_rate_outside_zero_one_is_rejected(
    drop_rate: float, no_work: None
) -> None:
    # drop_rate = 1 would drop every entry and rescale by 1 / 0.
    with rejects(r"drop_rate must lie in \[0, 1\), got"):
        mj.dare(model(0), [model(1)], drop_rate=drop_rate, key=jax.random.key(0))


@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan])
def test_regmean_alpha_outside_zero_one_is_rejected(
    alpha: float, no_work: None
) -> None:
    with rejects(r"alpha must lie in \[0, 1\], got"):
        mj.regmean([model(1)], [gram_stats()], alpha=alpha)


@pytest.mark.parametrize("floor", [-1e-6, math.nan])
def test_fisher_merge_negative_floor_is_rejected(floor: float, no_work: None) -> None:
    with rejects(r"floor must be >= 0, got"):
        mj.fisher_merge([model(1)], [fishers()], floor=floor)


BAD_KEYS = {
    "int": 0,
    "none": None,
    "two_typed_keys": jax.random.split(jax.random.key(0)),
    "raw_wrong_length": jnp.zeros(3, jnp.uint32),
    "raw_batch": jax.random.split(jax.random.PRNGKey(0)),
    "float": jnp.zeros(2, jnp.float32),
}


@pytest.mark.parametrize("key", tuple(BAD_KEYS))
def test_dare_bad_prng_key_is_rejected(key: str, no_work: None) -> None:
    with rejects(r"key must be a single JAX PRNG key"):
        mj.dare(model(0), [model(1)], drop_rate=0.5, key=BAD_KEYS[key])


@pytest.mark.parametrize("trim", ["layer", None])
def test_ties_unknown_trim_is_rejected(trim: Any, no_work: None) -> None:
    with rejects(r"trim must be 'global' or 'per_leaf'"):
        mj.ties(model(0), [model(1)], density=0.5, trim=trim)


SOLVE = ("mats", "solve_closed_form")

TREE_ARG_CASES = {
    "init_missing_leaf": (
        "init",
        model(0, dense__bias=None),
        r"init has a different tree structure from models\[0\]: missing leaves 'dense/bias'",
    ),
    "init_extra_leaf": (
        "init",
        model(0, extra=jnp.zeros(1)),
        r"init has a different tree structure from models\[0\]: unexpected leaves 'extra'",
    ),
    "init_shape": (
        "init",
        model(0, dense__kernel=jnp.zeros((4, 3))),
        r"init at 'dense/kernel': shape \(4, 3\) differs from models\[0\]'s \(3, 4\)",
    ),
    "init_dtype": (
        "init",
        model(0, dense__bias=jnp.zeros(4, jnp.bfloat16)),
        r"init at 'dense/bias': dtype bfloat16 differs from models\[0\]'s float32",
    ),
    "init_nan": (
        "init",
        with_value("dense/kernel", math.nan),
        r"init at 'dense/kernel': contains NaN or Inf",
    ),
    "fallback_missing_leaf": (
        "fallback",
        model(0, nested__inner__scale=None),
        r"fallback has a different tree structure from models\[0\]: "
        r"missing leaves 'nested/inner/scale'",
    ),
    "fallback_shape": (
        "fallback",
        model(0, dense__bias=jnp.zeros(5)),
        r"fallback at 'dense/bias': shape \(5,\) differs from models\[0\]'s \(4,\)",
    ),
    "fallback_inf": (
        "fallback",
        with_value("dense/bias", math.inf),
        r"fallback at 'dense/bias': contains NaN or Inf",
    ),
    "fallback_unknown_rule": (
        "fallback",
        "median",
        r"fallback must be 'average', 'init' or a parameter pytree",
    ),
}


@pytest.mark.parametrize("method", SOLVE)
@pytest.mark.parametrize("case", tuple(TREE_ARG_CASES))
def test_init_or_fallback_unlike_the_models_is_rejected(
    method: str, case: str, no_work: None
) -> None:
    name, tree, match = TREE_ARG_CASES[case]
    with rejects(match):
        METHODS[method](model(0), [model(1), model(2)], None, **{name: tree})


@pytest.mark.parametrize("method", ["fisher_merge", "regmean"])
def test_fallback_tree_unlike_the_models_is_rejected(
    method: str, no_work: None
) -> None:
    with rejects(
        r"fallback at 'dense/bias': shape \(5,\) differs from models\[0\]'s \(4,\)"
    ):
        METHODS[method](
            model(0), [model(1)], None, fallback=model(0, dense__bias=jnp.zeros(5))
        )


def test_closed_form_with_kfac_statistics_is_rejected(no_work: None) -> None:
    with rejects(
        r"statistics at 'dense/kernel': KFAC has no closed-form solve; use method='cg'"
    ):
        mj.solve(
            [model(1), model(2)], [kfac_stats(), kfac_stats()], method="closed_form"
        )


def test_unknown_solve_method_is_rejected(no_work: None) -> None:
    with rejects(r"method must be 'cg' or 'closed_form', got 'lu'"):
        mj.solve([model(1)], [kfac_stats()], method="lu")


SOLVER_NUMBER_CASES = {
    "maxiter_negative": (
        {"maxiter": -1},
        r"maxiter must be a non-negative integer, got -1",
    ),
    "maxiter_fraction": (
        {"maxiter": 2.5},
        r"maxiter must be a non-negative integer, got 2.5",
    ),
    "tol_negative": ({"tol": -1e-3}, r"tol must be finite and >= 0, got -0.001"),
    "tol_nan": ({"tol": math.nan}, r"tol must be finite and >= 0, got nan"),
    "tol_inf": ({"tol": math.inf}, r"tol must be finite and >= 0, got inf"),
    "damping_negative": (
        {"damping": -0.1},
        r"damping must be finite and >= 0, got -0.1",
    ),
    "check_every_negative": ({"check_every": -1}, r"check_every must be >= 0, got -1"),
    "divergence_factor": (
        {"divergence_factor": 1.0},
        r"divergence_factor must be > 1, got 1.0",
    ),
    "precision_unknown": (
        {"precision": "float16"},
        r"precision must be 'float32' or 'float64', got 'float16'",
    ),
}


@pytest.mark.parametrize("case", tuple(SOLVER_NUMBER_CASES))
def test_bad_solver_settings_are_rejected(case: str, no_work: None) -> None:
    kwargs, match = SOLVER_NUMBER_CASES[case]
    with rejects(match):
        mj.mats([model(1), model(2)], [kfac_stats(), kfac_stats()], **kwargs)


def test_float64_without_x64_is_rejected(no_work: None) -> None:
    with (
        jax.enable_x64(False),
        rejects(r"precision='float64' needs double precision enabled"),
    ):
        mj.mats([model(1), model(2)], [kfac_stats(), kfac_stats()], precision="float64")


# --------------------------------------------------------------------------
# CG that stops short of its tolerance says so
# --------------------------------------------------------------------------


def _ill_conditioned(n: int, condition: float, seed: int) -> jax.Array:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return jnp.asarray(q @ np.diag(np.geomspace(1.0, condition, n)) @ q.T, jnp.float32)


def _hard_kfac(seed: int) -> dict[str, Any]:
    return kfac_stats(
        dense__kernel=mj.KFAC(
            _ill_conditioned(3, 100.0, seed), _ill_conditioned(4, 100.0, seed + 1)
        )
    )


def test_cg_stopped_before_its_tolerance_warns_and_reports() -> None:
    models, stats = [model(1), model(2)], [_hard_kfac(0), _hard_kfac(10)]
    with pytest.warns(
        mj.ConvergenceWarning,
        match=r"1 block\(s\): dense/kernel: maxiter, relative residual",
    ):
        result = mj.mats(models, stats, maxiter=1, tol=1e-6)
    kernel = result.report["dense"]["kernel"]
    assert kernel.solver == "cg"
    assert [mj.STATUS_NAMES[s] for s in np.asarray(kernel.status)] == ["maxiter"]
    assert np.asarray(kernel.iterations).tolist() == [1]
    assert float(kernel.final_residual[0]) > 1e-6
    # The blocks that did converge are reported as such, and not warned about.
    bias = result.report["dense"]["bias"]
    assert [mj.STATUS_NAMES[s] for s in np.asarray(bias.status)] == ["converged"]
    assert "maxiter" in mj.format_report(result.report)


def test_cg_that_converges_does_not_warn() -> None:
    models, stats = [model(1), model(2)], [_hard_kfac(0), _hard_kfac(10)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", mj.ConvergenceWarning)
        result = mj.mats(models, stats, maxiter=500, tol=1e-4)
    statuses = [
        np.asarray(r.status)
        for r in jax.tree.leaves(
            result.report, is_leaf=lambda x: isinstance(x, mj.LeafReport)
        )
    ]
    assert all(mj.STATUS_NAMES[s] == "converged" for status in statuses for s in status)


@pytest.mark.parametrize(
    "method",
    [
        "mats",
        "solve",
    ],
)
def test_convergence_warning_points_at_the_callers_line(method: str) -> None:
    merge = mj.mats if method == "mats" else mj.solve
    with pytest.warns(mj.ConvergenceWarning) as record:
        merge([model(1), model(2)], [_hard_kfac(0), _hard_kfac(10)], maxiter=1)
    assert [w.filename for w in record] == [__file__]


# --------------------------------------------------------------------------
# Inputs are never modified
# --------------------------------------------------------------------------


def _numpy(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.array(x), tree)


@pytest.mark.parametrize("method", tuple(METHODS))
def test_numpy_inputs_are_not_modified(method: str) -> None:
    base = _numpy(model(0))
    models = [_numpy(model(1)), _numpy(model(2))]
    stats = [_numpy(STATS[method]()) for _ in models] if method in WITH_STATS else None
    snapshot = copy.deepcopy((base, models, stats))
    ids = jax.tree.map(id, (base, models, stats))
    # Methods that take no weights refuse unequal ones: theirs are equal.
    weights = np.array([1.0, 3.0] if CASES[method].needs.weights else [2.0, 2.0])
    before = weights.copy()
    out = METHODS[method](base, models, stats, weights=weights)
    params = out.params if isinstance(out, mj.MergeResult) else out
    assert (
        jax.tree.map(id, (base, models, stats)) == ids
    )  # same containers, same arrays
    jax.tree.map(np.testing.assert_array_equal, (base, models, stats), snapshot)
    np.testing.assert_array_equal(weights, before)
    for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(models[0]), strict=True):
        assert x is not m and not np.shares_memory(np.asarray(x), m)


@pytest.mark.parametrize("method", tuple(METHODS))
def test_jax_inputs_are_not_donated(method: str) -> None:
    base, models = model(0), [model(1), model(2)]
    stats = [STATS[method]() for _ in models] if method in WITH_STATS else None
    before = _numpy((base, models))
    METHODS[method](base, models, stats)
    assert not any(x.is_deleted() for x in jax.tree.leaves((base, models, stats)))
    jax.tree.map(np.testing.assert_array_equal, _numpy((base, models)), before)


# --------------------------------------------------------------------------
# Hyperparameters validated by the methods' parameters records
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [n for n, c in CASES.items() if "scale" in c.parameters or n in ("ties", "dare")],
)
@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, "0.5", [1.0, 2.0]])
def test_a_scale_that_is_not_one_finite_number_is_rejected(
    name: str, scale: Any, no_work: None
) -> None:
    with rejects(r"scale must be a (finite )?number"):
        METHODS[name](model(0), [model(1), model(2)], None, scale=scale)


def test_jit_over_concrete_models_checks_them_and_merges() -> None:
    models = [model(1), model(2)]
    merged = jax.jit(lambda w: mj.average(models, weights=w))(jnp.array([3.0, 1.0]))
    expected = mj.average(models, weights=[3.0, 1.0])
    jax.tree.map(np.testing.assert_allclose, merged, expected)
    bad = [with_value("dense/kernel", math.nan, 1), model(2)]
    with rejects(r"models\[0\] at 'dense/kernel': contains NaN or Inf"):
        jax.jit(lambda w: mj.average(bad, weights=w))(jnp.ones(2))


def test_fallback_base_without_a_base_is_rejected(no_work: None) -> None:
    with rejects(r"mats needs the base model"):
        mj.merge_pytrees(
            "mats",
            models=[model(1), model(2)],
            statistics=[kfac_stats(), kfac_stats()],
            fallback="base",
        )


def test_an_init_method_that_needs_the_base_needs_it_here(no_work: None) -> None:
    mats = mj.get_method("mats")
    ta = mj.get_method("task_arithmetic")
    init = mj.MethodCall(ta, ta.parameters(scale=0.5))
    with rejects(r"mats needs the base model"):
        mj.merge_pytrees(
            mats,
            models=[model(1), model(2)],
            statistics=[kfac_stats(), kfac_stats()],
            init=init,
        )


def test_fisher_merge_takes_bare_fisher_arrays() -> None:
    models = [model(1), model(2)]
    bare = nest_paths(
        {
            "dense/kernel": jnp.ones((3, 4)),
            "dense/bias": jnp.ones(4),
            "nested/inner/scale": None,
        }
    )
    wrapped = fishers()
    got = mj.fisher_merge(models, [bare, bare]).params
    want = mj.fisher_merge(models, [wrapped, wrapped]).params
    jax.tree.map(np.testing.assert_array_equal, got, want)


# The public functions wrap the registry's methods (some transform their
# arguments first, e.g. fisher_merge wraps bare arrays): each must still check
# the statistics it was given, before any transform or work.
PUBLIC_WITH_STATISTICS: dict[str, Callable[..., Any]] = {
    "fisher_merge": lambda ms, s: mj.fisher_merge(ms, s),
    "regmean": lambda ms, s: mj.regmean(ms, s),
    "mats": lambda ms, s: mj.mats(ms, s),
    "solve": lambda ms, s: mj.solve(ms, s, method="closed_form"),
}
PUBLIC_BAD_STATISTICS = {
    "fisher_merge": lambda v: nest_paths(
        {
            "dense/kernel": jnp.ones((3, 4)).at[0, 0].set(v),
            "dense/bias": jnp.ones(4),
            "nested/inner/scale": None,
        }
    ),
    "regmean": lambda v: gram_stats(dense__kernel=mj.Gram(jnp.eye(3).at[0, 0].set(v))),
    "mats": lambda v: kfac_stats(dense__bias=mj.Diagonal(jnp.ones(4).at[0].set(v))),
    "solve": lambda v: gram_stats(dense__kernel=mj.Gram(jnp.eye(3).at[0, 0].set(v))),
}


@pytest.mark.parametrize("name", tuple(PUBLIC_WITH_STATISTICS))
@pytest.mark.parametrize("value", [-1.0, -math.inf, math.nan])
def test_public_functions_check_their_statistics_before_any_transform(
    name: str, value: float, no_work: None
) -> None:
    good = PUBLIC_BAD_STATISTICS[name](1.0)
    bad = PUBLIC_BAD_STATISTICS[name](value)
    with rejects(r"\[1\] at '.*': (has negative|contains NaN or Inf)"):
        PUBLIC_WITH_STATISTICS[name]([model(1), model(2)], [good, bad])


# --- the finiteness and sign checks on large host arrays ----------------------
# Arrays in host memory are checked by numpy in blocks of 2**22 entries, the
# others by a jitted pass: a bad entry in any block, of any float dtype, in a
# numpy array or a JAX array, is found, and a clean array passes.
LARGE = (1 << 22) + 5  # the last block holds 5 entries


@pytest.mark.parametrize("where", [0, (1 << 22) - 1, 1 << 22, LARGE - 1])
@pytest.mark.parametrize("bad", NAN_INF)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
@pytest.mark.parametrize("kind", ["numpy", "jax"])
def test_non_finite_entry_of_a_large_leaf_found_in_every_block(
    where: int, bad: float, dtype: str, kind: str
) -> None:
    good = np.zeros(LARGE, jnp.dtype(dtype))
    leaf = good.copy()
    leaf[where] = bad
    if kind == "jax":
        good, leaf = jnp.asarray(good), jnp.asarray(leaf)
    mj.checks.check_models([{"w": good}, {"w": good}])
    with pytest.raises(
        mj.MergeInputError, match=r"models\[1\] at 'w': contains NaN or Inf"
    ):
        mj.checks.check_models([{"w": good}, {"w": leaf}])


@pytest.mark.parametrize("where", [0, 1 << 22, LARGE - 1])
@pytest.mark.parametrize("kind", ["numpy", "jax"])
def test_negative_entry_of_a_large_diagonal_statistic_found(
    where: int, kind: str
) -> None:
    model = {"w": np.zeros(LARGE, np.float32)}
    entries = np.ones(LARGE, np.float32)
    entries[where] = -1.0
    if kind == "jax":
        entries = jnp.asarray(entries)
    good = mj.Diagonal(np.ones(LARGE, np.float32))
    mj.checks.check_statistics([{"w": good}], [model])
    with pytest.raises(
        mj.MergeInputError, match=r"statistics\[0\] at 'w/f': has negative entries"
    ):
        mj.checks.check_statistics([{"w": mj.Diagonal(entries)}], [model])


@pytest.mark.parametrize("where", [0, 1, 1029, 2047])
@pytest.mark.parametrize("kind", ["numpy", "jax"])
def test_negative_diagonal_of_a_large_kfac_factor_found(where: int, kind: str) -> None:
    # 2048² entries span one host block; negative off-diagonal entries are
    # allowed (a factor is PSD, not non-negative), a NaN anywhere is not.
    model = {"w": np.zeros((2048, 8), np.float32)}
    g = np.eye(8, dtype=np.float32)
    a = np.eye(2048, dtype=np.float32)
    a[where, (where + 1) % 2048] = -0.5
    negative, not_finite = a.copy(), a.copy()
    negative[where, where] = -1.0
    not_finite[(where + 7) % 2048, where] = np.nan
    put = jnp.asarray if kind == "jax" else np.asarray
    mj.checks.check_statistics([{"w": mj.KFAC(put(a), put(g))}], [model])
    with pytest.raises(
        mj.MergeInputError,
        match=r"statistics\[0\] at 'w/a': has negative diagonal entries",
    ):
        mj.checks.check_statistics([{"w": mj.KFAC(put(negative), put(g))}], [model])
    with pytest.raises(
        mj.MergeInputError, match=r"statistics\[0\] at 'w/a': contains NaN or Inf"
    ):
        mj.checks.check_statistics([{"w": mj.KFAC(put(not_finite), put(g))}], [model])
