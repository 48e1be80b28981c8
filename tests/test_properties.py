"""Property tests: invariants every merge method keeps, over small random pytrees.

Each example is a parameter pytree with a dense kernel, a bias and a nested
leaf, drawn by hypothesis from a fixed list of shape configurations (one of
them a stacked kernel with two independent blocks), with 1 to 4 models. The
list is short on purpose: jit compiles once per shape signature.

The statistics are well-conditioned, singular (dead inputs or outputs shared
by every task: an exact null space) or ill-conditioned (condition numbers up
to 1e4 per factor). MaTS and the closed-form solves are checked against a
dense float64 solve of the same systems, damped or not, which keeps the
initialisation in the null space as CG does; comparisons of solves allow
the float32 error of each system's conditioning (see CONDITIONED).

Where a property is exact only in exact arithmetic and a rounding tie can flip
a discrete choice (TIES's and DARE-TIES's elected sign is the sign of a sum of
weighted task vectors, which is 0 or ±tiny at a cancellation), the values are
drawn from a dyadic grid, on which every sum involved is exact in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mats_jax as mj
from mats_jax.tree import nest_paths

# Leaf path -> shape. The second configuration stacks two (3, 2) kernels, as
# nn.scan does: its KFAC and Gram statistics have a leading block axis.
SHAPES = (
    {"dense/kernel": (3, 4), "dense/bias": (4,), "nested/inner/scale": (2,)},
    {"dense/kernel": (2, 3, 2), "dense/bias": (2,), "nested/inner/scale": (3,)},
)
# (shape configuration, number of models) pairs drawn from: 1 to 4 models,
# closed under leaving one model out for M >= 2, and few enough that the
# number of compilations stays small.
SIGNATURES = ((0, 1), (0, 2), (0, 3), (1, 3), (1, 4))

# Entries are 0 or at least 1e-3 in magnitude: XLA on CPU flushes subnormal
# results to zero, so a merge of values near the float32 underflow threshold
# is not exact even where the arithmetic is.
FLOATS = st.floats(-4.0, 4.0, width=32).map(lambda x: x if abs(x) >= 1e-3 else 0.0)
DYADIC = st.integers(-16, 16).map(lambda i: i / 4)  # sums of these are exact
UNIT = st.floats(-1.0, 1.0, width=32)
POSITIVE = st.floats(0.0, 4.0, width=32)
WEIGHT = st.floats(0.125, 4.0)


def fractions(high: float) -> st.SearchStrategy[float]:
    """Fractions in [0, high]; those below float32's normal range are refused
    by the library (XLA computes with them as 0), so they are drawn as 0."""
    return st.floats(0.0, high).map(lambda x: x if x >= 1e-6 else 0.0)


DYADIC_WEIGHT = st.integers(1, 16).map(lambda i: i / 4)
EQUAL_WEIGHT = st.just(1.0)  # for the methods that take no weights

# Statistics come in three spectra (see spd): well-conditioned, singular (an
# exact null space, as dead inputs make) and ill-conditioned, whose factors
# have condition numbers ILL_CONDITION: float32 CG still verifies those
# against a float64 dense solve.
SPECTRA = ("well", "singular", "ill")
ILL_CONDITION = (1e3, 1e4)
# CG settings for MaTS. tol is the relative residual at which CG stops, so the
# error it leaves is up to κ·tol: 1e-8 leaves float32 rounding (below) as the
# only error on these systems, every block converging in under 50 steps
# (measured: 6,000 blocks of each spectrum; tol = 1e-6 left errors of 7e-4 on
# the ill-conditioned ones).
CG = {"maxiter": 200, "tol": 1e-8}
EXACT_TOL = {"rtol": 1e-5, "atol": 1e-5}
# A float32 solve's forward error is a few κ·ε relative to the solution's
# scale, κ the condition number of the system on its range. Measured, as
# |error| / (1 + |x|), over 200 draws of each layout and spectrum against
# dense_solve: at most 6 κ ε for CG, 12 κ ε for the closed forms (float32
# eigh). The comparisons allow CONDITIONED κ ε per leaf, and at least 1e-5:
# about 1e-4 on the well-conditioned systems (the former fixed 2e-3 was 20
# times that), up to 1e-2 on the ill-conditioned ones.
EPS32 = float(np.finfo(np.float32).eps)
CONDITIONED = 50.0


# --------------------------------------------------------------------------
# Pytrees and statistics
# --------------------------------------------------------------------------


def leaves_by_path(tree: Any) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {mj.tree.path_str(p): x for p, x in flat}


def _paired_leaves(actual: Any, expected: Any) -> list[tuple[str, Any, Any]]:
    """Leaves of two trees by path, after checking structure, shapes and dtypes."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    wanted = leaves_by_path(expected)
    pairs = [(path, x, wanted[path]) for path, x in leaves_by_path(actual).items()]
    for path, x, y in pairs:
        assert jnp.shape(x) == jnp.shape(y), path
        assert jnp.result_type(x) == jnp.result_type(y), path
    return pairs


def assert_trees_close(actual: Any, expected: Any, **tol: float) -> None:
    for path, x, y in _paired_leaves(actual, expected):
        np.testing.assert_allclose(
            np.asarray(x, np.float32), np.asarray(y, np.float32), err_msg=path, **tol
        )


def assert_trees_equal(actual: Any, expected: Any) -> None:
    for path, x, y in _paired_leaves(actual, expected):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)


@st.composite
def params(draw: Any, config: int, values: Any = FLOATS) -> dict[str, Any]:
    return nest_paths(
        {
            path: jnp.asarray(draw(hnp.arrays(np.float32, shape, elements=values)))
            for path, shape in SHAPES[config].items()
        }
    )


@st.composite
def spd(
    draw: Any,
    n: int,
    batch: tuple[int, ...] = (),
    spectrum: str = "well",
    dead: np.ndarray | None = None,
) -> jax.Array:
    """A symmetric positive semi-definite (n, n) factor, with leading ``batch`` axes.

    * ``"well"``: ``XᵀX / n + I/2``, eigenvalues in [1/2, n + 1/2].
    * ``"singular"``: the same with the entries ``dead`` marks (a boolean
      ``batch + (n,)`` array) cut off, rows and columns set to zero, as a dead
      input or padding does: an exact null space, in float32 too.
    * ``"ill"``: ``Q diag(κ^(-i/(n-1))) Qᵀ`` for a rotation Q drawn per
      factor, eigenvalues from 1 down to 1/κ, κ drawn from ILL_CONDITION.
    """
    x = draw(hnp.arrays(np.float32, (*batch, n, n), elements=UNIT))
    if spectrum == "ill":
        kappa = draw(st.sampled_from(ILL_CONDITION))
        q, _ = np.linalg.qr(x.astype(np.float64))  # orthogonal even for singular x
        values = kappa ** (-np.arange(n) / max(n - 1, 1))
        return jnp.asarray(((q * values) @ np.swapaxes(q, -1, -2)).astype(np.float32))
    a = np.swapaxes(x, -1, -2) @ x / n + 0.5 * np.eye(n, dtype=np.float32)
    if spectrum == "singular":
        assert dead is not None
        alive = (~dead).astype(np.float32)
        a = a * alive[..., :, None] * alive[..., None, :]
    return jnp.asarray(a)


@st.composite
def diagonal(
    draw: Any,
    shape: tuple[int, ...],
    spectrum: str = "well",
    dead: np.ndarray | None = None,
) -> jax.Array:
    """A positive diagonal statistic; zero where ``dead`` (singular) or spread over κ (ill)."""
    f = draw(hnp.arrays(np.float32, shape, elements=POSITIVE))
    if spectrum == "ill":
        kappa = draw(st.sampled_from(ILL_CONDITION))
        return jnp.asarray((kappa ** (-f / 4.0)).astype(np.float32))  # in [1/κ, 1]
    f = f + 0.25
    if spectrum == "singular":
        assert dead is not None
        f = np.where(dead, 0.0, f).astype(np.float32)
    return jnp.asarray(f)


def dead_shapes(kind: str | None, shape: tuple[int, ...]) -> dict[str, tuple]:
    """The shapes of the dead-entry masks a statistic of ``kind`` takes."""
    if kind in ("kfac", "gram"):
        block, n_in, n_out = shape[:-2], shape[-2], shape[-1]
        out = {"in": (*block, n_in)}
        return {**out, "out": (*block, n_out)} if kind == "kfac" else out
    if kind == "dense":
        return {"in": (math.prod(shape),)}
    return {"in": shape} if kind == "diagonal" else {}


@st.composite
def dead_entries(draw: Any, shape: tuple[int, ...], at_least_one: bool) -> np.ndarray:
    dead = np.asarray(draw(hnp.arrays(np.bool_, shape)))
    if at_least_one:
        dead.reshape(-1, shape[-1])[:, draw(st.integers(0, shape[-1] - 1))] = True
    return dead


def statistic(
    draw: Any,
    kind: str | None,
    shape: tuple[int, ...],
    spectrum: str = "well",
    dead: dict[str, np.ndarray] | None = None,
) -> Any:
    """One task's statistic of ``kind`` for a leaf of ``shape`` (PSD; see :func:`spd`)."""
    if kind is None:
        return None
    dead = dead or {}
    if kind == "fisher":  # Fisher merging floors them: zeros allowed
        return mj.Diagonal(
            jnp.asarray(draw(hnp.arrays(np.float32, shape, elements=POSITIVE)))
        )
    if kind == "diagonal":
        return mj.Diagonal(draw(diagonal(shape, spectrum, dead.get("in"))))
    if kind == "dense":
        return mj.Dense(draw(spd(math.prod(shape), (), spectrum, dead.get("in"))))
    block, n_in, n_out = shape[:-2], shape[-2], shape[-1]
    if kind == "gram":
        return mj.Gram(draw(spd(n_in, block, spectrum, dead.get("in"))))
    assert kind == "kfac"
    # Ill-conditioned: one factor of the two, so that A ⊗ G stays near κ.
    ill = draw(st.sampled_from(("a", "g"))) if spectrum == "ill" else None
    return mj.KFAC(
        draw(spd(n_in, block, "well" if ill == "g" else spectrum, dead.get("in"))),
        draw(spd(n_out, block, "well" if ill == "a" else spectrum, dead.get("out"))),
    )


# Which statistic each leaf gets, per statistic family. Leaves with None take
# the solver's fallback rule (the weighted average). The two MaTS layouts
# between them give every statistic type (KFAC, Gram, Diagonal, Dense) and the
# fallback to some leaf; two, not four, because each compiles per signature.
LAYOUTS = {
    "fisher": {
        "dense/kernel": "fisher",
        "dense/bias": "fisher",
        "nested/inner/scale": None,
    },
    "regmean": {"dense/kernel": "gram", "dense/bias": None, "nested/inner/scale": None},
    "kfac": {
        "dense/kernel": "kfac",
        "dense/bias": "diagonal",
        "nested/inner/scale": "dense",
    },
    "gram": {"dense/kernel": "gram", "dense/bias": "dense", "nested/inner/scale": None},
    "closed_form": {
        "dense/kernel": "gram",
        "dense/bias": "diagonal",
        "nested/inner/scale": "dense",
    },
}
MATS_LAYOUTS = ("kfac", "gram")


@st.composite
def statistics(
    draw: Any,
    layout: str | None,
    config: int,
    num_models: int,
    spectrum: str = "well",
) -> list[Any]:
    """One statistics pytree per model.

    With ``spectrum="singular"`` every leaf's statistics share dead entries
    (at least one per block and factor), so ``Σ_m w_m C_m`` is singular there,
    and each task may have dead entries of its own besides.
    """
    if layout is None:
        return [None] * num_models
    kinds = LAYOUTS[layout]
    shared = {
        p: {
            name: draw(dead_entries(s, at_least_one=True))
            for name, s in dead_shapes(kinds[p], shape).items()
        }
        for p, shape in SHAPES[config].items()
    }

    def own_dead(path: str) -> dict[str, np.ndarray]:
        return {
            name: mask | draw(dead_entries(mask.shape, at_least_one=False))
            for name, mask in shared[path].items()
        }

    return [
        nest_paths(
            {
                p: statistic(
                    draw,
                    kinds[p],
                    s,
                    spectrum,
                    own_dead(p) if spectrum == "singular" else None,
                )
                for p, s in SHAPES[config].items()
            }
        )
        for _ in range(num_models)
    ]


def clip(count: int, models: tuple[int, int | None]) -> int:
    """``count`` clipped into a method's model count range ``(low, high)``."""
    low, high = models
    return max(low, count if high is None else min(count, high))


def model_counts(row: str) -> tuple[int, int | None]:
    """The model count range (Needs.models) of the registered method a table
    row is named after (the longest method name it starts with)."""
    name = max((m for m in mj.METHODS if row.startswith(m)), key=len)
    return zoo.CASES[name].needs.models


class Problem(NamedTuple):
    config: int
    base: Any
    models: list[Any]
    weights: list[float]
    stats: list[Any]
    spectrum: str = "well"


@st.composite
def problems(
    draw: Any,
    layout: str | None = None,
    *,
    min_models: int = 1,
    max_models: int = 4,
    values: Any = FLOATS,
    weights: Any = WEIGHT,
    configs: tuple[int, ...] = (0, 1),
    signatures: tuple[tuple[int, int], ...] = SIGNATURES,
    spectra: tuple[str, ...] = ("well",),
    models: tuple[int, int | None] = (1, None),
) -> Problem:
    # ``models``: the method's count (Needs.models); the test's range is
    # clipped into it (SLERP's (2, 2) turns a test's 3 models into 2).
    min_models, max_models = (clip(n, models) for n in (min_models, max_models))
    signatures = [
        (c, m) for c, m in signatures if c in configs and min_models <= m <= max_models
    ]
    config, m = draw(st.sampled_from(signatures))
    spectrum = draw(st.sampled_from(spectra))
    return Problem(
        config,
        draw(params(config, values)),
        [draw(params(config, values)) for _ in range(m)],
        draw(st.lists(weights, min_size=m, max_size=m)),
        draw(statistics(layout, config, m, spectrum)),
        spectrum,
    )


# --------------------------------------------------------------------------
# The slow twin of the solver: dense float64 matrices, one per block
# --------------------------------------------------------------------------


def is_statistic(x: Any) -> bool:
    return x is None or isinstance(x, mj.Statistic)


def statistics_by_path(stats: Any) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(stats, is_leaf=is_statistic)[0]
    return {mj.tree.path_str(p): x for p, x in flat}


def explicit_blocks(stat: Any, shape: tuple[int, ...]) -> list[np.ndarray]:
    """C as dense float64 matrices, one per block; the blocks tile the leaf in order.

    Written from the definitions: ``diag(f)``, ``F``, ``A ⊗ I`` and ``A ⊗ G``
    over row-major (in, out) kernels; a leading axis of a Gram or KFAC leaf is
    the block axis.
    """
    if isinstance(stat, mj.Diagonal):
        return [np.diag(np.asarray(stat.f, np.float64).reshape(-1))]
    if isinstance(stat, mj.Dense):
        return [np.asarray(stat.f, np.float64)]
    n_in, n_out = shape[-2], shape[-1]
    a = np.asarray(stat.a, np.float64).reshape(-1, n_in, n_in)
    if isinstance(stat, mj.KFAC):
        g = np.asarray(stat.g, np.float64).reshape(-1, n_out, n_out)
    else:
        g = np.broadcast_to(np.eye(n_out), (a.shape[0], n_out, n_out))
    return [np.kron(a_l, g_l) for a_l, g_l in zip(a, g)]


def damped_systems(
    stats: list[Any], weights: Any, path: str, shape: tuple[int, ...], damping: float
) -> list[tuple[np.ndarray, list[np.ndarray], float]]:
    """Per block: ``S = Σ_m w_m C_m``, the weighted ``w_m C_m``, and δ = damping · mean diag(S)."""
    per_task = [
        [w * c for c in explicit_blocks(statistics_by_path(s)[path], shape)]
        for w, s in zip(np.asarray(weights, np.float64), stats)
    ]
    out = []
    for blocks in zip(*per_task):
        total = sum(blocks)
        out.append((total, list(blocks), damping * float(np.mean(np.diag(total)))))
    return out


def condition_number(matrix: np.ndarray) -> float:
    """Largest over smallest eigenvalue on the range (1 for a zero matrix)."""
    values = np.linalg.eigvalsh(matrix)
    top = values.max()
    kept = values[values > 1e-10 * top] if top > 0 else np.ones(1)
    return float(kept.max() / kept.min())


def dense_solve(
    models: list[Any], stats: list[Any], weights: Any, init: Any, damping: float = 0.0
) -> tuple[Any, dict[str, float]]:
    """The merge by its definition, and each leaf's condition number.

    Per block, ``x = x₀ + (S + δI)⁺ (Σ_m w_m C_m θ_m + δ x₀ − (S + δI) x₀)``:
    the solution of the damped system, and with δ = 0 the pseudo-inverse
    solve started from x₀, which keeps x₀'s component in the null space of
    S, as CG does. Leaves without statistics take the weighted average.
    """
    w = np.asarray(weights, np.float64)
    out, conditions = {}, {}
    for path, x0 in leaves_by_path(init).items():
        shape = tuple(np.shape(x0))
        thetas = [np.asarray(leaves_by_path(m)[path], np.float64) for m in models]
        if statistics_by_path(stats[0])[path] is None:
            out[path] = np.asarray(sum(wi * t for wi, t in zip(w, thetas)) / w.sum())
            conditions[path] = 1.0
            continue
        systems = damped_systems(stats, w, path, shape, damping)
        size = systems[0][0].shape[0]
        start = np.asarray(x0, np.float64).reshape(-1, size)
        tasks = [t.reshape(-1, size) for t in thetas]
        solved, kappas = [], []
        for i, (total, weighted, delta) in enumerate(systems):
            matrix = total + delta * np.eye(size)
            rhs = sum(c @ t[i] for c, t in zip(weighted, tasks)) + delta * start[i]
            step = np.linalg.pinv(matrix, rcond=1e-10, hermitian=True)
            solved.append(start[i] + step @ (rhs - matrix @ start[i]))
            kappas.append(condition_number(matrix))
        out[path] = np.concatenate(solved).reshape(shape)
        conditions[path] = max(kappas)
    return nest_paths(out), conditions


def solve_tolerance(*conditions: dict[str, float]) -> dict[str, float]:
    """Per leaf, the float32 tolerance of a solve (see CONDITIONED), over several systems."""
    return {
        path: max(1e-5, CONDITIONED * EPS32 * max(c[path] for c in conditions))
        for path in conditions[0]
    }


def conditioning(stats: list[Any], weights: Any, like: Any) -> dict[str, float]:
    """Each leaf's condition number for these statistics and weights (no solve)."""
    return dense_solve([like] * len(stats), stats, weights, like)[1]


def assert_solved_close(
    actual: Any, expected: Any, tolerance: dict[str, float]
) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    wanted = leaves_by_path(expected)
    for path, x in leaves_by_path(actual).items():
        t = tolerance[path]
        np.testing.assert_allclose(
            np.asarray(x, np.float64), wanted[path], rtol=t, atol=t, err_msg=path
        )


# --------------------------------------------------------------------------
# The methods, as one table: name -> (statistic layout, merge, tolerance).
# merge(base, models, stats, weights) returns the merged parameters.
# --------------------------------------------------------------------------

Merge = Callable[[Any, list[Any], list[Any], Any], Any]


class Method(NamedTuple):
    layout: str | None
    merge: Merge
    tol: dict[str, float] | None  # None: the conditioning's (solve_tolerance)
    values: Any = FLOATS  # DYADIC where a sign election makes rounding ties matter
    weights: Any = WEIGHT
    spectra: tuple[str, ...] = ("well",)  # of the statistics drawn for it
    models: tuple[int, int | None] = (1, None)  # its Needs.models


def _registry_merge(case: zoo.Case, parameters: Callable[[Any], dict]) -> Merge:
    """The registry's merge of ``case`` (``mats_jax.merge_pytrees``), parameters of the base."""

    def merge(b: Any, ms: list[Any], s: list[Any], w: Any) -> Any:
        return case(b, ms, s, weights=w, **parameters(b)).params

    return merge


def _method(
    case: zoo.Case,
    parameters: Callable[[Any], dict] = lambda b: {},
    layout: str | None = None,
    tol: dict[str, float] | None = None,
    spectra: tuple[str, ...] = ("well",),
) -> Method:
    """A row for a registry case: layout from the statistic type it takes, exact
    tolerance for data-free and closed-form merges (the conditioning's for CG),
    dyadic values where a sign election is made, equal weights for a method
    that takes none (Needs.weights False), and the method's model count."""
    method = case.merge_method
    record = method.parameters(**{**case.parameters, **parameters(None)})
    needs = method.needs(record)
    elects = bool(getattr(record, "sign_election", False))
    solved_by_cg = getattr(record, "method", None) == "cg"
    weights = DYADIC_WEIGHT if elects else WEIGHT
    return Method(
        layout or DEFAULT_LAYOUTS[case.statistic_type],
        _registry_merge(case, parameters),
        tol if tol is not None else (None if solved_by_cg else EXACT_TOL),
        DYADIC if elects else FLOATS,
        weights if needs.weights else EQUAL_WEIGHT,
        spectra,
        needs.models,
    )


DEFAULT_LAYOUTS = {
    None: None,
    mj.Diagonal: "fisher",
    mj.Gram: "regmean",
    mj.Statistic: "kfac",
}
"""The statistics a registry case gets, by the statistic type it takes."""

# Rows that need more than their registry case's defaults; every other case of
# tests/zoo.py (every registered method) gets a row by _method's defaults.
PROPERTY_ROWS = {
    "task_arithmetic": _method(zoo.CASES["task_arithmetic"], lambda b: {"scale": 0.7}),
    "ties": _method(zoo.CASES["ties"], lambda b: {"density": 0.5, "scale": 0.9}),
    # drop_rate=0: with p > 0 each model's mask depends on its index.
    "dare": _method(zoo.CASES["dare"], lambda b: {"drop_rate": 0.0, "scale": 0.6}),
    "dare_ties": _method(zoo.CASES["dare_ties"], lambda b: {"drop_rate": 0.0}),
    # density=1, epsilon=0: otherwise each model's mask depends on its index
    # (tests/test_della.py checks the masks against an oracle instead).
    "della": _method(zoo.CASES["della"], lambda b: {"density": 1.0, "epsilon": 0.0}),
    "della_linear": _method(
        zoo.CASES["della_linear"],
        lambda b: {"density": 1.0, "epsilon": 0.0, "scale": 0.6},
    ),
    # An SVD is backward stable: its rounding scales with the leaf's norm,
    # not with each entry, so entries near zero need an absolute tolerance
    # of that norm's order (seen: 1.4e-5 on entries up to 13 when the
    # models' order changed the summation order).
    **{
        name: _method(zoo.CASES[name], tol={"rtol": 1e-5, "atol": 1e-4})
        for name in ("tsv_m", "iso_c", "iso_cts")
    },
    # Not ill-conditioned: a closed-form solve's error is κ·ε too, and α < 1
    # changes the system whose κ would set the tolerance.
    "regmean": _method(
        zoo.CASES["regmean"],
        lambda b: {"alpha": 0.8},
        tol={"rtol": 1e-4, "atol": 1e-4},
        spectra=("well", "singular"),
    ),
    "solve_closed_form": _method(
        zoo.CASES["solve_closed_form"], tol={"rtol": 1e-4, "atol": 1e-4}
    ),
    **{
        f"mats_{layout}": _method(
            zoo.CASES["mats"],
            lambda b: {"init": b, **CG} if b is not None else CG,
            layout=layout,
            spectra=SPECTRA,
        )
        for layout in MATS_LAYOUTS
    },
}
ROW_CASES = {
    "mats_kfac": "mats",
    "mats_gram": "mats",
}
"""Rows whose name is not their registry case's."""

METHODS = {
    **{
        name: _method(case)
        for name, case in zoo.CASES.items()
        if name not in PROPERTY_ROWS and name not in ROW_CASES.values()
    },
    **PROPERTY_ROWS,
}


def test_every_registry_case_has_a_row() -> None:
    covered = {ROW_CASES.get(name, name) for name in METHODS}
    assert set(zoo.CASES) <= covered


def assert_merges_close(
    method: Method, actual: Any, expected: Any, systems: list[tuple[list, Any]]
) -> None:
    """``actual ≈ expected`` within the method's tolerance; for MaTS, that of the
    worst conditioned of ``systems``, the (statistics, weights) solved on either side.
    """
    if method.tol is not None:
        assert_trees_close(actual, expected, **method.tol)
        return
    conditions = [conditioning(s, w, expected) for s, w in systems]
    assert_solved_close(actual, expected, solve_tolerance(*conditions))


def methods(*names: str) -> Any:
    """``pytest.mark.parametrize`` over rows of METHODS (all rows by default)."""
    names = names or tuple(METHODS)
    return pytest.mark.parametrize("name", names)


# --------------------------------------------------------------------------
# Merging copies of one model returns it
# --------------------------------------------------------------------------


def _one_over_sum(weights: list[float]) -> float:
    return 1.0 / float(np.sum(np.asarray(weights, np.float32)))


def _isotropic_base(theta: Any, base: Any) -> Any:
    """A base about which θ's matrices (the last two axes of a leaf) are
    isotropic, ``θ − orth(θ − θ₀)`` with all singular values 1, and θ itself
    elsewhere: ISO-C's fixed points (it flattens every other spectrum)."""

    def leaf(t: Any, b: Any) -> Any:
        t64 = np.asarray(t, np.float64)
        if t64.ndim < 2:
            return jnp.asarray(t)
        p, _, qt = np.linalg.svd(t64 - np.asarray(b, np.float64), full_matrices=False)
        return jnp.asarray((t64 - p @ qt).astype(np.float32))

    return jax.tree.map(leaf, theta, base)


# name -> (layout, merge(base, models, stats, weights, init)). Each row uses
# hyperparameters under which M copies of θ merge to θ.
FIXED_POINT = {
    "average": (None, lambda b, ms, s, w, i: mj.average(ms, weights=w)),
    "task_arithmetic_1_over_m": (
        None,
        lambda b, ms, s, w, i: mj.task_arithmetic(b, ms, scale=1 / len(ms)),
    ),
    "task_arithmetic_1_over_sum_w": (
        None,
        lambda b, ms, s, w, i: mj.task_arithmetic(
            b, ms, scale=_one_over_sum(w), weights=w
        ),
    ),
    "ties_density_1": (
        None,
        lambda b, ms, s, w, i: mj.ties(b, ms, density=1.0, scale=1.0, weights=w),
    ),
    "ties_density_1_per_leaf": (
        None,
        lambda b, ms, s, w, i: mj.ties(b, ms, density=1.0, weights=w, trim="per_leaf"),
    ),
    "dare_drop_0": (
        None,
        lambda b, ms, s, w, i: mj.dare(
            b,
            ms,
            drop_rate=0.0,
            key=jax.random.key(3),
            scale=_one_over_sum(w),
            weights=w,
        ),
    ),
    "dare_ties_drop_0": (
        None,
        lambda b, ms, s, w, i: mj.dare(
            b, ms, drop_rate=0.0, key=jax.random.key(3), weights=w, sign_election=True
        ),
    ),
    "fisher_merge": (
        "fisher",
        lambda b, ms, s, w, i: mj.fisher_merge(ms, s, weights=w).params,
    ),
    "regmean": (
        "regmean",
        lambda b, ms, s, w, i: mj.regmean(ms, s, alpha=0.7, weights=w).params,
    ),
    **{
        f"mats_{layout}": (
            layout,
            lambda b, ms, s, w, i: mj.mats(ms, s, init=i, weights=w, **CG).params,
        )
        for layout in MATS_LAYOUTS
    },
    "slerp": (None, lambda b, ms, s, w, i: mj.slerp(ms, t=0.3)),
    "multislerp": (None, lambda b, ms, s, w, i: mj.multislerp(ms, weights=w)),
    "multislerp_about_base": (
        None,
        lambda b, ms, s, w, i: mj.multislerp(ms, weights=w, base=b),
    ),
    "model_stock": (None, lambda b, ms, s, w, i: mj.model_stock(b, ms)),
    "model_stock_filter_wise": (
        None,
        lambda b, ms, s, w, i: mj.model_stock(b, ms, filter_wise=True),
    ),
    "breadcrumbs_keep_all": (
        None,
        lambda b, ms, s, w, i: mj.breadcrumbs(
            b, ms, density=1.0, gamma=0.0, scale=_one_over_sum(w), weights=w
        ),
    ),
    "breadcrumbs_ties_keep_all": (
        None,
        lambda b, ms, s, w, i: mj.breadcrumbs(
            b, ms, density=1.0, gamma=0.0, weights=w, sign_election=True
        ),
    ),
    "della_keep_all": (
        None,
        lambda b, ms, s, w, i: mj.della(
            b, ms, density=1.0, epsilon=0.0, key=jax.random.key(3), weights=w
        ),
    ),
    "della_linear_keep_all": (
        None,
        lambda b, ms, s, w, i: mj.della(
            b,
            ms,
            density=1.0,
            epsilon=0.0,
            key=jax.random.key(3),
            scale=_one_over_sum(w),
            weights=w,
            sign_election=False,
        ),
    ),
    # Copies with the whole rank each: U = [U_Δ … U_Δ] has rank r, its
    # orthogonalisation shares each direction among the copies, and the
    # merge is the weighted mean of the copies' Δ.
    "tsv_m_share_1": (
        None,
        lambda b, ms, s, w, i: mj.tsv_m(
            b, ms, share=1.0, scale=len(ms) * _one_over_sum(w), weights=w
        ),
    ),
    # ISO-C and ISO-CTS flatten the spectrum: copies of θ return θ only where
    # θ's task matrices are isotropic, so these rows merge about such a base.
    # ISO-CTS with f = 1 is ISO-C; with f < 1 copies fill only k_c + d of the
    # r directions (tests/test_svd_methods.py checks that case).
    "iso_c_isotropic": (
        None,
        lambda b, ms, s, w, i: mj.iso_c(
            _isotropic_base(ms[0], b), ms, scale=_one_over_sum(w), weights=w
        ),
    ),
    "iso_cts_common_fraction_1_isotropic": (
        None,
        lambda b, ms, s, w, i: mj.iso_cts(
            _isotropic_base(ms[0], b),
            ms,
            common_fraction=1.0,
            scale=_one_over_sum(w),
            weights=w,
        ),
    ),
}


FIXED_POINT_SPECTRA = {
    "regmean": ("well", "singular"),  # starts from the average: θ itself
    **{f"mats_{layout}": ("well", "ill") for layout in MATS_LAYOUTS},
}


@pytest.mark.parametrize("name", tuple(FIXED_POINT))
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_merging_copies_of_one_model_returns_it(name: str, data: Any) -> None:
    layout, merge = FIXED_POINT[name]
    # A singular system keeps its start's null-space component: MaTS starts
    # from another point than θ, so only its non-singular systems return θ
    # (test_mats_equals_the_dense_solve_from_init covers the singular ones).
    spectra = FIXED_POINT_SPECTRA.get(name, ("well",))
    p = data.draw(problems(layout, spectra=spectra, models=model_counts(name)))
    theta, init = p.models[0], data.draw(params(p.config))
    copies = [theta] * len(p.models)
    merged = merge(p.base, copies, p.stats, p.weights, init)
    if name.startswith("mats"):
        tolerance = solve_tolerance(conditioning(p.stats, p.weights, theta))
        assert_solved_close(merged, theta, tolerance)
    else:
        assert_trees_close(merged, theta, **EXACT_TOL)


# --------------------------------------------------------------------------
# Against the dense solve, singular and ill-conditioned statistics included
# --------------------------------------------------------------------------

DAMPING = st.one_of(st.just(0.0), st.floats(1e-3, 1.0))


@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("layout", MATS_LAYOUTS)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_mats_equals_the_dense_solve_from_init(
    layout: str, spectrum: str, data: Any
) -> None:
    # With damping, the damped system toward init; without, on a singular
    # system, init's component in the null space of Σ w_m C_m is kept.
    p = data.draw(problems(layout, spectra=(spectrum,)))
    damping = data.draw(DAMPING)
    merged = mj.mats(
        p.models, p.stats, init=p.base, weights=p.weights, damping=damping, **CG
    ).params
    expected, conditions = dense_solve(p.models, p.stats, p.weights, p.base, damping)
    assert_solved_close(merged, expected, solve_tolerance(conditions))


@pytest.mark.parametrize("spectrum", SPECTRA)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_closed_form_solve_equals_the_dense_solve_from_init(
    spectrum: str, data: Any
) -> None:
    # Gram, Diagonal and Dense statistics through their exact pseudo-inverses.
    p = data.draw(
        problems("closed_form", signatures=((0, 2), (1, 3)), spectra=(spectrum,))
    )
    damping = data.draw(DAMPING)
    merged = mj.solve(
        p.models,
        p.stats,
        init=p.base,
        weights=p.weights,
        damping=damping,
        method="closed_form",
    ).params
    expected, conditions = dense_solve(p.models, p.stats, p.weights, p.base, damping)
    assert_solved_close(merged, expected, solve_tolerance(conditions))


# Any hyperparameters: task vectors of copies of the base are all zero, so the
# result is the base exactly. (The average is not in this table: its weights
# are its only hyperparameters, and the test above covers it.)
BASE_FIXED_POINT = {
    "task_arithmetic": lambda b, ms, w, h: mj.task_arithmetic(
        b, ms, scale=h["scale"], weights=w
    ),
    "ties": lambda b, ms, w, h: mj.ties(
        b, ms, density=h["density"], scale=h["scale"], weights=w, trim=h["trim"]
    ),
    "dare": lambda b, ms, w, h: mj.dare(
        b,
        ms,
        drop_rate=h["drop_rate"],
        key=jax.random.key(h["seed"]),
        scale=h["scale"],
        weights=w,
        sign_election=h["sign_election"],
    ),
    "multislerp_about_base": lambda b, ms, w, h: mj.multislerp(ms, weights=w, base=b),
    "breadcrumbs": lambda b, ms, w, h: mj.breadcrumbs(
        b,
        ms,
        density=h["density"],
        gamma=(1 - h["density"]) / 2,
        scale=h["scale"],
        weights=w,
        sign_election=h["sign_election"],
    ),
    "della": lambda b, ms, w, h: mj.della(
        b,
        ms,
        density=h["density"],
        epsilon=min(h["density"], 1 - h["density"]) / 2,
        key=jax.random.key(h["seed"]),
        scale=h["scale"],
        weights=w,
        sign_election=h["sign_election"],
    ),
    # Zero task matrices: no singular value passes the rank cutoff.
    "tsv_m": lambda b, ms, w, h: mj.tsv_m(
        b, ms, scale=h["scale"], share=h["density"], weights=w
    ),
    "iso_c": lambda b, ms, w, h: mj.iso_c(b, ms, scale=h["scale"], weights=w),
    "iso_cts": lambda b, ms, w, h: mj.iso_cts(
        b, ms, scale=h["scale"], common_fraction=h["density"], weights=w
    ),
}

HYPERPARAMETERS = st.fixed_dictionaries(
    {
        "scale": st.floats(-3.0, 3.0),
        "density": st.floats(0.01, 1.0),
        "drop_rate": fractions(0.95),
        "seed": st.integers(0, 2**31 - 1),
        "trim": st.sampled_from(["global", "per_leaf"]),
        "sign_election": st.booleans(),
    }
)


@pytest.mark.parametrize("name", tuple(BASE_FIXED_POINT))
@settings(max_examples=15, deadline=None)
@given(p=problems(), h=HYPERPARAMETERS)
def test_merging_copies_of_the_base_returns_the_base(
    name: str, p: Problem, h: dict[str, Any]
) -> None:
    merged = BASE_FIXED_POINT[name](p.base, [p.base] * len(p.models), p.weights, h)
    assert_trees_equal(merged, p.base)


# --------------------------------------------------------------------------
# Order of the models
# --------------------------------------------------------------------------


# Rows whose merge depends on the order of the models by definition, each
# with what its own tests check instead.
ORDER_DEPENDENT = {
    # models[0] is the t = 0 end: swapping the two models is t -> 1 - t
    # (tests/test_slerp.py::test_swapping_the_models_is_one_minus_t).
    "slerp": "t = 0 is models[0]",
}
ORDER_ILL_CONDITIONED = {
    # Order-invariant in exact arithmetic, but both raise every direction of
    # the summed task matrix to the mean singular value: a direction whose
    # singular value is small is fixed only to rounding of order
    # ε‖Σ τ‖ / σ_small, which the models' order changes (seen: 9e-4 on
    # entries of 10). tests/test_svd_methods.py tests the order on task
    # matrices whose spectra are well separated instead.
    "iso_c": "ill-conditioned small directions",
    "iso_cts": "ill-conditioned small directions",
}


@methods(
    *(
        name
        for name in METHODS
        if name not in ORDER_DEPENDENT and name not in ORDER_ILL_CONDITIONED
    )
)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_result_does_not_depend_on_the_order_of_the_models(
    name: str, data: Any
) -> None:
    method = METHODS[name]
    p = data.draw(
        problems(
            method.layout,
            min_models=2,
            values=method.values,
            weights=method.weights,
            spectra=method.spectra,
            models=method.models,
        )
    )
    order = data.draw(st.permutations(range(len(p.models))))
    merged = method.merge(p.base, p.models, p.stats, p.weights)
    permuted = method.merge(
        p.base,
        [p.models[i] for i in order],
        [p.stats[i] for i in order],
        [p.weights[i] for i in order],
    )
    assert_merges_close(method, permuted, merged, [(p.stats, p.weights)])


@settings(max_examples=10, deadline=None)
@given(
    p=problems(min_models=2),
    drop_rate=st.floats(0.05, 0.9),
    seed=st.integers(0, 2**31 - 1),
    sign_election=st.booleans(),
)
def test_dare_is_deterministic_for_one_key_and_order(
    p: Problem, drop_rate: float, seed: int, sign_election: bool
) -> None:
    # With drop_rate > 0, permuting the models permutes which mask each one
    # gets (a mask depends on the key, the leaf and the model's index), so the
    # result is only reproducible for the same order and key.
    def merge(key: jax.Array) -> Any:
        return mj.dare(
            p.base,
            p.models,
            drop_rate=drop_rate,
            key=key,
            weights=p.weights,
            sign_election=sign_election,
        )

    assert_trees_equal(merge(jax.random.key(seed)), merge(jax.random.key(seed)))
    assert_trees_equal(merge(jax.random.key(seed)), merge(jax.random.PRNGKey(seed)))


@settings(max_examples=15, deadline=None)
@given(
    p=problems(max_models=1), drop_rate=st.floats(0.05, 0.9), seed=st.integers(0, 99)
)
def test_dare_keeps_each_entry_rescaled_or_drops_it(
    p: Problem, drop_rate: float, seed: int
) -> None:
    (model,) = p.models
    merged = mj.dare(p.base, p.models, drop_rate=drop_rate, key=jax.random.key(seed))
    base, theta = leaves_by_path(p.base), leaves_by_path(model)
    for path, x in leaves_by_path(merged).items():
        tau = np.asarray(theta[path]) - np.asarray(base[path])
        delta = np.asarray(x) - np.asarray(base[path])
        kept = np.isclose(delta, tau / np.float32(1 - drop_rate), rtol=1e-5, atol=1e-5)
        dropped = np.isclose(delta, 0.0, atol=1e-6)
        assert np.all(kept | dropped), path


# --------------------------------------------------------------------------
# Linear methods
# --------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    p=problems(),
    lam1=st.floats(-2.0, 2.0),
    lam2=st.floats(-2.0, 2.0),
    weighted=st.booleans(),
)
def test_task_arithmetic_is_linear_in_scale(
    p: Problem, lam1: float, lam2: float, weighted: bool
) -> None:
    weights = p.weights if weighted else None

    def offset(lam: float) -> Any:
        merged = mj.task_arithmetic(p.base, p.models, scale=lam, weights=weights)
        return mj.tree.sub(merged, p.base)

    assert_trees_close(
        offset(lam1 + lam2),
        mj.tree.add(offset(lam1), offset(lam2)),
        rtol=1e-5,
        atol=1e-4,
    )
    assert_trees_equal(offset(0.0), jax.tree.map(jnp.zeros_like, p.base))


@settings(max_examples=25, deadline=None)
@given(p=problems())
def test_average_is_task_arithmetic_with_scale_one_over_m(p: Problem) -> None:
    expected = mj.task_arithmetic(p.base, p.models, scale=1 / len(p.models))
    assert_trees_close(mj.average(p.models), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(p=problems())
def test_weighted_average_is_task_arithmetic_with_normalised_weights(
    p: Problem,
) -> None:
    w = np.asarray(p.weights, np.float32)
    expected = mj.task_arithmetic(p.base, p.models, scale=1.0, weights=w / w.sum())
    assert_trees_close(
        mj.average(p.models, weights=p.weights), expected, rtol=1e-5, atol=1e-5
    )


# --------------------------------------------------------------------------
# Structure, shapes and dtypes
# --------------------------------------------------------------------------

# float32 leaves are checked by every comparison in this file; here a model
# mixes bfloat16 and float32 leaves.
DTYPES = {
    "dense/kernel": jnp.bfloat16,
    "dense/bias": jnp.float32,
    "nested/inner/scale": jnp.bfloat16,
}


@methods()
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_merged_tree_has_the_inputs_structure_shapes_and_dtypes(
    name: str, data: Any
) -> None:
    method = METHODS[name]
    p = data.draw(
        problems(
            method.layout,
            min_models=2,
            max_models=2,
            configs=(0,),
            weights=method.weights,
            models=method.models,
        )
    )

    def cast(tree: Any) -> Any:
        return mj.tree.map_with_path(lambda path, x: x.astype(DTYPES[path]), tree)

    base, models = cast(p.base), [cast(m) for m in p.models]
    merged = method.merge(base, models, p.stats, p.weights)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    for path, x in leaves_by_path(merged).items():
        assert isinstance(x, jax.Array), path
        assert x.shape == SHAPES[0][path], path
        assert x.dtype == DTYPES[path], path

    # Low-precision leaves are merged in float32 and cast back: the result is
    # the float32 merge of the same values, rounded once.
    def upcast(tree: Any) -> Any:
        return jax.tree.map(lambda x: x.astype(jnp.float32), tree)

    in_float32 = method.merge(
        upcast(base), [upcast(m) for m in models], p.stats, p.weights
    )
    assert_trees_close(merged, cast(in_float32), rtol=2**-7, atol=1e-3)


@methods("fisher_merge", "regmean", "mats_kfac", "mats_gram")
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_report_has_one_leaf_report_per_parameter_leaf(name: str, data: Any) -> None:
    method = METHODS[name]
    p = data.draw(problems(method.layout, min_models=3, max_models=3, configs=(1,)))
    if name == "fisher_merge":
        result = mj.fisher_merge(p.models, p.stats, weights=p.weights)
    elif name == "regmean":
        result = mj.regmean(p.models, p.stats, alpha=0.8, weights=p.weights)
    else:
        result = mj.mats(p.models, p.stats, init=p.base, weights=p.weights, **CG)
    is_report = lambda x: isinstance(x, mj.LeafReport)  # noqa: E731
    assert jax.tree.structure(result.report, is_leaf=is_report) == jax.tree.structure(
        result.params
    )
    layout = LAYOUTS[method.layout]
    for path, leaf in leaves_by_path(
        jax.tree.map(lambda r: r.solver, result.report, is_leaf=is_report)
    ).items():
        assert (leaf == "fallback:average") == (layout[path] is None), path


# --------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------

# dare is included with the zero-weighted model last: the masks of the other
# models (which depend on their index) are then the same as without it.
ZERO_WEIGHT_METHODS = (
    "average",
    "task_arithmetic",
    "ties",
    "ties_per_leaf",
    "dare",
    "dare_ties",
    "fisher_merge",
    "regmean",
    "mats_kfac",
    "mats_gram",
    "multislerp",
    "multislerp_about_base",
    "breadcrumbs",
    "breadcrumbs_ties",
)
# Not in the weight tests: slerp and model_stock take no weights (t is SLERP's
# factor; Model Stock's ratio assumes the plain mean) and refuse unequal ones.
# Nor tsv_m, iso_c and iso_cts: their weights scale each task vector before
# the paper's method, which counts the models (TSV-M's ⌊r/M⌋ share,
# ISO-CTS's d, the mean over M of the leaves that are not matrices), a
# zero-weighted or repeated one too; and scaling all weights scales the
# merged task vector, as task arithmetic's. tests/test_svd_methods.py checks
# that scaling the weights is scaling α, and each weight's own effect.


@methods(*ZERO_WEIGHT_METHODS)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_weight_zero_is_leaving_the_model_out(name: str, data: Any) -> None:
    method = METHODS[name]
    p = data.draw(
        problems(
            method.layout,
            min_models=2,
            values=method.values,
            weights=method.weights,
            spectra=method.spectra,
            models=method.models,
        )
    )
    dropped = data.draw(st.integers(0, len(p.models) - 1))
    if name.startswith("dare"):
        dropped = len(p.models) - 1
    weights = list(p.weights)
    weights[dropped] = 0.0
    kept = [i for i in range(len(p.models)) if i != dropped]
    merged = method.merge(p.base, p.models, p.stats, weights)
    without = method.merge(
        p.base,
        [p.models[i] for i in kept],
        [p.stats[i] for i in kept],
        [p.weights[i] for i in kept],
    )
    kept_system = ([p.stats[i] for i in kept], [p.weights[i] for i in kept])
    assert_merges_close(method, merged, without, [kept_system])


@methods(
    "average",
    "ties",
    "ties_per_leaf",
    "dare_ties",
    "fisher_merge",
    "regmean",
    "mats_kfac",
    "mats_gram",
    "multislerp",
    "multislerp_about_base",
    "breadcrumbs_ties",
)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_scaling_all_weights_changes_nothing(name: str, data: Any) -> None:
    method = METHODS[name]
    p = data.draw(
        problems(
            method.layout,
            values=method.values,
            weights=method.weights,
            spectra=method.spectra,
            models=method.models,
        )
    )
    if method.weights is DYADIC_WEIGHT:
        factor = data.draw(st.sampled_from([0.25, 2.0, 3.0, 10.0]))  # keeps sums exact
    else:
        factor = data.draw(st.floats(0.01, 100.0))
    merged = method.merge(p.base, p.models, p.stats, p.weights)
    scaled = method.merge(p.base, p.models, p.stats, [factor * w for w in p.weights])
    assert_merges_close(method, scaled, merged, [(p.stats, p.weights)])


# dare is not here: each copy of a model would get its own mask.
@methods(
    "average",
    "task_arithmetic",
    "ties",
    "ties_per_leaf",
    "fisher_merge",
    "regmean",
    "mats_kfac",
    "mats_gram",
    "multislerp",
    "multislerp_about_base",
    "breadcrumbs",
    "breadcrumbs_ties",
)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_weight_two_is_the_model_twice(name: str, data: Any) -> None:
    # Catches weights applied in the wrong place (squared, to one factor of two,
    # after a normalisation), which scaling all weights at once cannot see.
    method = METHODS[name]
    p = data.draw(
        problems(
            method.layout,
            values=method.values,
            weights=method.weights,
            signatures=((0, 2), (1, 3)),  # M + 1 models is also in SIGNATURES
            spectra=method.spectra,
            models=method.models,
        )
    )
    twice = data.draw(st.integers(0, len(p.models) - 1))
    weights = list(p.weights)
    weights[twice] *= 2
    merged = method.merge(p.base, p.models, p.stats, weights)
    repeated = method.merge(
        p.base,
        [*p.models, p.models[twice]],
        [*p.stats, p.stats[twice]],
        [*p.weights, p.weights[twice]],
    )
    assert_merges_close(method, merged, repeated, [(p.stats, weights)])


@settings(max_examples=15, deadline=None)
@given(p=problems(min_models=2), lam=st.floats(-2.0, 2.0))
def test_task_arithmetic_weights_scale_each_task_vector(p: Problem, lam: float) -> None:
    # θ₀ + λ Σ w_m τ_m: scaling the weights by c is scaling λ by c.
    scaled = mj.task_arithmetic(
        p.base, p.models, scale=lam, weights=[2 * w for w in p.weights]
    )
    expected = mj.task_arithmetic(p.base, p.models, scale=2 * lam, weights=p.weights)
    assert_trees_close(scaled, expected, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------
# Under jax.jit
# --------------------------------------------------------------------------

# name -> (layout, merge(base, models, stats, weights, h)), h the
# hyperparameters. JITTED holds each merge under jax.jit, with every array and
# hyperparameter traced; it is built once here so each shape signature
# compiles once, and sweeping the hyperparameters does not recompile.
JIT_CASES: dict[str, tuple[str | None, Callable[..., Any]]] = {
    "average": (None, lambda b, ms, s, w, h: mj.average(ms, weights=w)),
    "task_arithmetic": (
        None,
        lambda b, ms, s, w, h: mj.task_arithmetic(b, ms, scale=h["scale"], weights=w),
    ),
    "ties": (
        None,
        lambda b, ms, s, w, h: mj.ties(
            b, ms, density=h["density"], scale=h["scale"], weights=w
        ),
    ),
    "ties_per_leaf": (
        None,
        lambda b, ms, s, w, h: mj.ties(
            b, ms, density=h["density"], scale=h["scale"], weights=w, trim="per_leaf"
        ),
    ),
    "dare": (
        None,
        lambda b, ms, s, w, h: mj.dare(
            b, ms, drop_rate=h["drop_rate"], key=h["key"], scale=h["scale"], weights=w
        ),
    ),
    "dare_ties": (
        None,
        lambda b, ms, s, w, h: mj.dare(
            b, ms, drop_rate=h["drop_rate"], key=h["key"], weights=w, sign_election=True
        ),
    ),
    "fisher_merge": (
        "fisher",
        lambda b, ms, s, w, h: mj.fisher_merge(ms, s, weights=w),
    ),
    "regmean": (
        "regmean",
        lambda b, ms, s, w, h: mj.regmean(ms, s, alpha=h["alpha"], weights=w),
    ),
    **{
        f"mats_{layout}": (
            layout,
            lambda b, ms, s, w, h: mj.mats(
                ms,
                s,
                init=b,
                weights=w,
                maxiter=h["maxiter"],
                tol=h["tol"],
                damping=h["damping"],
            ),
        )
        for layout in MATS_LAYOUTS
    },
    "slerp": (None, lambda b, ms, s, w, h: mj.slerp(ms, t=h["t"])),
    "multislerp": (None, lambda b, ms, s, w, h: mj.multislerp(ms, weights=w)),
    "multislerp_about_base": (
        None,
        lambda b, ms, s, w, h: mj.multislerp(
            ms, weights=w, base=b, max_iterations=h["maxiter"]
        ),
    ),
    "model_stock": (None, lambda b, ms, s, w, h: mj.model_stock(b, ms)),
    "model_stock_filter_wise": (
        None,
        lambda b, ms, s, w, h: mj.model_stock(b, ms, filter_wise=True),
    ),
    # Halving and quartering density are exact in float64 and float32 alike,
    # so the eager and the traced run count and rank the same entries.
    "breadcrumbs": (
        None,
        lambda b, ms, s, w, h: mj.breadcrumbs(
            b,
            ms,
            density=h["density"] * 0.5,
            gamma=h["density"] * 0.25,
            scale=h["scale"],
            weights=w,
        ),
    ),
    "breadcrumbs_ties": (
        None,
        lambda b, ms, s, w, h: mj.breadcrumbs(
            b,
            ms,
            density=h["density"] * 0.5,
            gamma=h["density"] * 0.25,
            weights=w,
            sign_election=True,
        ),
    ),
    "della": (
        None,
        lambda b, ms, s, w, h: mj.della(
            b,
            ms,
            density=h["density"] * 0.5,
            epsilon=h["density"] * 0.25,
            key=h["key"],
            scale=h["scale"],
            weights=w,
        ),
    ),
    "della_linear": (
        None,
        lambda b, ms, s, w, h: mj.della(
            b,
            ms,
            density=h["density"] * 0.5,
            epsilon=h["density"] * 0.25,
            key=h["key"],
            weights=w,
            sign_election=False,
        ),
    ),
    # share and common_fraction set how many singular vectors are kept (a
    # shape): static, so fixed here; scale and the weights are traced.
    "tsv_m": (
        None,
        lambda b, ms, s, w, h: mj.tsv_m(b, ms, scale=h["scale"], weights=w),
    ),
    "tsv_m_share": (
        None,
        lambda b, ms, s, w, h: mj.tsv_m(b, ms, scale=h["scale"], share=0.5, weights=w),
    ),
    "iso_c": (
        None,
        lambda b, ms, s, w, h: mj.iso_c(b, ms, scale=h["scale"], weights=w),
    ),
    "iso_cts": (
        None,
        lambda b, ms, s, w, h: mj.iso_cts(
            b, ms, scale=h["scale"], common_fraction=0.5, weights=w
        ),
    ),
}
JITTED = {name: jax.jit(fn) for name, (_, fn) in JIT_CASES.items()}

JIT_HYPERPARAMETERS = st.fixed_dictionaries(
    {
        "scale": st.floats(-2.0, 2.0),
        "density": st.floats(0.05, 1.0),
        "drop_rate": fractions(0.9),
        "alpha": fractions(1.0),
        "maxiter": st.integers(0, 30),
        "tol": st.floats(1e-6, 1e-2),
        "damping": st.floats(0.0, 1.0),
        "seed": st.integers(0, 2**31 - 1),
        "t": fractions(1.0),
    }
)


@pytest.mark.filterwarnings("ignore::mats_jax.ConvergenceWarning")
@pytest.mark.parametrize("name", tuple(JIT_CASES))
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_jit_matches_eager(name: str, data: Any) -> None:
    layout, eager = JIT_CASES[name]
    p = data.draw(
        problems(
            layout,
            min_models=3,
            max_models=3,
            configs=(0,),
            models=model_counts(name),
        )
    )
    h = data.draw(JIT_HYPERPARAMETERS)
    h["key"] = jax.random.key(h.pop("seed"))
    expected = eager(p.base, p.models, p.stats, p.weights, h)
    traced_h = {
        k: jnp.asarray(v) if not isinstance(v, jax.Array) else v for k, v in h.items()
    }
    actual = JITTED[name](p.base, p.models, p.stats, jnp.asarray(p.weights), traced_h)
    if isinstance(expected, mj.MergeResult):
        assert isinstance(actual, mj.MergeResult)
        assert_trees_close(actual.report, expected.report, rtol=1e-4, atol=1e-5)
        expected, actual = expected.params, actual.params
    if name.startswith("mats"):
        tolerance = solve_tolerance(conditioning(p.stats, p.weights, expected))
        assert_solved_close(actual, expected, tolerance)
    else:
        assert_trees_close(actual, expected, **EXACT_TOL)


@pytest.mark.parametrize(
    "table", ["FIXED_POINT", "JIT_CASES"], ids=["fixed_point", "jit"]
)
def test_every_registered_method_is_in_the_named_property_tables(table: str) -> None:
    # These tables need per-method knowledge (the parameters under which
    # copies merge to themselves; which hyperparameters are traced): a new
    # method must say it here.
    rows = globals()[table]
    missing = [m for m in mj.METHODS if not any(r.startswith(m) for r in rows)]
    assert not missing, f"add rows for {missing} to {table}"
