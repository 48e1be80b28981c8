"""Each statistic type against its explicit dense matrix (the slow, obvious twin)."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mats_jax import KFAC, Dense, Diagonal, Gram


def spd(key, n, rank=None, dtype=jnp.float32):
    rank = rank or 2 * n
    q = jax.random.normal(key, (n, rank), dtype)
    return q @ q.T / rank


def explicit_matrix(stat, leaf_shape):
    """C as a dense (N, N) matrix over the leaf flattened in row-major order.

    Built column by column from the definition of each type, with no use of
    the type's own matvec or blocking: C e_j for every unit leaf e_j.
    """
    n = math.prod(leaf_shape)
    columns = []
    for j in range(n):
        e = np.zeros(n, np.float64)
        e[j] = 1.0
        columns.append(apply_by_definition(stat, e.reshape(leaf_shape)).reshape(-1))
    return np.stack(columns, axis=1)


def apply_by_definition(stat, w):
    if isinstance(stat, Diagonal):
        return np.asarray(stat.f, np.float64) * w
    if isinstance(stat, Dense):
        return (np.asarray(stat.f, np.float64) @ w.reshape(-1)).reshape(w.shape)
    ndim = w.ndim
    ins = [a % ndim for a in stat.in_axes]
    outs = [a % ndim for a in stat.out_axes]
    blocks = [a for a in range(ndim) if a not in ins + outs]
    out = np.zeros_like(w)
    for index in np.ndindex(*[w.shape[a] for a in blocks]):
        sl = [slice(None)] * ndim
        for a, i in zip(blocks, index, strict=True):
            sl[a] = i
        block = w[
            tuple(sl)
        ]  # remaining axes in original order: ins and outs interleaved
        kept = [a for a in range(ndim) if a not in blocks]
        order = [kept.index(a) for a in ins + outs]
        mat = np.transpose(block, order)
        in_shape = mat.shape[: len(ins)]
        mat = mat.reshape(math.prod(in_shape), -1)
        a = (
            np.asarray(stat.a, np.float64)[index]
            if blocks
            else np.asarray(stat.a, np.float64)
        )
        result = a @ mat
        if isinstance(stat, KFAC):
            g = (
                np.asarray(stat.g, np.float64)[index]
                if blocks
                else np.asarray(stat.g, np.float64)
            )
            result = result @ g
        result = result.reshape(np.transpose(block, order).shape)
        out[tuple(sl)] = np.transpose(result, np.argsort(order))
    return out


CASES = [
    # (name, leaf shape, builder(key, shape))
    ("diagonal", (3, 4), lambda k, s: Diagonal(jax.random.uniform(k, s))),
    ("dense", (2, 3), lambda k, s: Dense(spd(k, 6))),
    ("gram", (3, 4), lambda k, s: Gram(spd(k, 3))),
    ("kfac", (3, 4), lambda k, s: KFAC(spd(k, 3), spd(jax.random.fold_in(k, 1), 4))),
    (
        "kfac scanned (layers, in, out)",
        (2, 3, 4),
        lambda k, s: KFAC(
            jnp.stack([spd(jax.random.fold_in(k, i), 3) for i in range(2)]),
            jnp.stack([spd(jax.random.fold_in(k, 10 + i), 4) for i in range(2)]),
        ),
    ),
    (
        "kfac DenseGeneral (in, heads, head_dim)",
        (3, 2, 2),
        lambda k, s: KFAC(
            spd(k, 3), spd(jax.random.fold_in(k, 1), 4), in_axes=(0,), out_axes=(1, 2)
        ),
    ),
    (
        "gram out-projection (heads, head_dim, out)",
        (2, 2, 3),
        lambda k, s: Gram(spd(k, 4), in_axes=(0, 1), out_axes=(2,)),
    ),
    (
        "gram scanned, layers of different scales",
        (3, 3, 4),
        lambda k, s: Gram(
            jnp.stack([10.0**i * spd(jax.random.fold_in(k, i), 3) for i in range(3)])
        ),
    ),
    (
        "kfac two block axes (layers, experts, in, out)",
        (2, 2, 3, 2),
        lambda k, s: KFAC(
            jnp.stack(
                [
                    jnp.stack(
                        [spd(jax.random.fold_in(k, 2 * i + j), 3) for j in range(2)]
                    )
                    * (1.0 + 4 * i)
                    for i in range(2)
                ]
            ),
            jnp.stack(
                [
                    jnp.stack(
                        [
                            (1.0 + 9 * j)
                            * spd(jax.random.fold_in(k, 10 + 2 * i + j), 2)
                            for j in range(2)
                        ]
                    )
                    for i in range(2)
                ]
            ),
        ),
    ),
    (
        "kfac layer axis in the middle (in, layers, out)",
        (3, 2, 4),
        lambda k, s: KFAC(
            jnp.stack([spd(jax.random.fold_in(k, i), 3) for i in range(2)]),
            jnp.stack([spd(jax.random.fold_in(k, 10 + i), 4) for i in range(2)]),
            in_axes=(0,),
            out_axes=(2,),
        ),
    ),
]


@pytest.mark.parametrize(("name", "shape", "build"), CASES, ids=[c[0] for c in CASES])
def test_blocked_matvec_equals_explicit_matrix(name, shape, build):
    stat = build(jax.random.PRNGKey(0), shape)
    assert stat.fit_error(shape) is None
    w = jax.random.normal(jax.random.PRNGKey(1), shape)
    blocked = stat.blocked(shape)
    fast = stat.from_blocks(blocked.matvec(stat.to_blocks(w)), shape)
    slow = (
        explicit_matrix(stat, shape) @ np.asarray(w, np.float64).reshape(-1)
    ).reshape(shape)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "shape", "build"), CASES, ids=[c[0] for c in CASES])
def test_blocks_round_trip(name, shape, build):
    stat = build(jax.random.PRNGKey(0), shape)
    w = jax.random.normal(jax.random.PRNGKey(1), shape)
    np.testing.assert_array_equal(stat.from_blocks(stat.to_blocks(w), shape), w)


def block_numbers(stat, shape):
    """Each entry of the leaf (row-major) numbered by its block, from the definition.

    The block axes of a Gram or KFAC leaf are those neither in ``in_axes`` nor
    in ``out_axes``; blocks are numbered row-major over them, in axis order.
    A Diagonal or Dense leaf is one block.
    """
    if isinstance(stat, (Diagonal, Dense)):
        return np.zeros(math.prod(shape), int)
    named = [a % len(shape) for a in (*stat.in_axes, *stat.out_axes)]
    blocks = [a for a in range(len(shape)) if a not in named]
    if not blocks:
        return np.zeros(math.prod(shape), int)
    index = np.indices(shape)
    return np.ravel_multi_index(
        [index[a] for a in blocks], [shape[a] for a in blocks]
    ).reshape(-1)


@pytest.mark.parametrize(("name", "shape", "build"), CASES, ids=[c[0] for c in CASES])
def test_diagonal_mean_equals_explicit_per_block(name, shape, build):
    stat = build(jax.random.PRNGKey(0), shape)
    blocked = stat.blocked(shape)
    diagonal = np.diag(explicit_matrix(stat, shape))
    numbers = block_numbers(stat, shape)
    expected = [np.mean(diagonal[numbers == b]) for b in range(numbers.max() + 1)]
    np.testing.assert_allclose(blocked.diagonal_mean(), expected, rtol=1e-5)
    # The solver scales damping by it: a weighted statistic's mean scales too.
    np.testing.assert_allclose(
        stat.scaled(3.0).blocked(shape).diagonal_mean(),
        3.0 * np.asarray(expected),
        rtol=1e-5,
    )
    if len(expected) > 1:  # blocks of one leaf differ: a mean over them is wrong
        assert max(expected) > 1.01 * min(expected)


@pytest.mark.parametrize(("name", "shape", "build"), CASES, ids=[c[0] for c in CASES])
def test_summed_statistics_apply_the_sum_of_the_matrices(name, shape, build):
    # What CG's loop applies (Statistic.summed) against the explicit Σ_m C_m;
    # types closed under addition give one statistic, K-FAC its M factors.
    stats = [build(jax.random.PRNGKey(m), shape).scaled(0.5 + m) for m in range(3)]
    summed = type(stats[0]).summed([s.blocked(shape) for s in stats])
    w = jax.random.normal(jax.random.PRNGKey(9), shape)
    fast = stats[0].from_blocks(
        sum(s.matvec(stats[0].to_blocks(w)) for s in summed), shape
    )
    total = sum(explicit_matrix(s, shape) for s in stats)
    slow = (total @ np.asarray(w, np.float64).reshape(-1)).reshape(shape)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)
    assert len(summed) == (3 if isinstance(stats[0], KFAC) else 1)


@pytest.mark.parametrize(("name", "shape", "build"), CASES, ids=[c[0] for c in CASES])
def test_plus_identity_adds_each_block_its_damping(name, shape, build):
    # The solver's damped operator, against C + δ_b I built explicitly (a
    # different δ per block); K-FAC, not closed under addition, holds none.
    stat = build(jax.random.PRNGKey(3), shape)
    blocked = stat.blocked(shape)
    n_blocks = stat.to_blocks(jnp.zeros(shape)).shape[0]
    delta = 0.1 + 0.2 * jnp.arange(n_blocks, dtype=jnp.float32)
    if not type(stat).closed_under_addition:
        with pytest.raises(NotImplementedError, match="do not hold a damping"):
            blocked.plus_identity(delta)
        return
    damped = blocked.plus_identity(delta)
    w = jax.random.normal(jax.random.PRNGKey(8), shape)
    fast = stat.from_blocks(damped.matvec(stat.to_blocks(w)), shape)
    per_entry = np.asarray(
        stat.from_blocks(per_block_values(delta, stat.to_blocks(w)), shape),
        np.float64,
    ).reshape(-1)
    total = explicit_matrix(stat, shape) + np.diag(per_entry)
    slow = (total @ np.asarray(w, np.float64).reshape(-1)).reshape(shape)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)


def per_block_values(values, blocks):
    """Each block's value broadcast over its entries."""
    return jnp.broadcast_to(
        values.reshape((-1,) + (1,) * (blocks.ndim - 1)), blocks.shape
    )


CLOSED_FORM_CASES = [c for c in CASES if not c[0].startswith("kfac")]


@pytest.mark.parametrize(
    ("name", "shape", "build"), CLOSED_FORM_CASES, ids=[c[0] for c in CLOSED_FORM_CASES]
)
def test_sum_pinv_inverts_sum_of_statistics(name, shape, build):
    stats = [build(jax.random.PRNGKey(m), shape) for m in range(3)]
    blocked = [s.blocked(shape) for s in stats]
    delta = jnp.full((stats[0].to_blocks(jnp.zeros(shape)).shape[0],), 0.1)
    apply = type(stats[0]).sum_pinv(blocked, delta)
    r = jax.random.normal(jax.random.PRNGKey(7), shape)
    fast = stats[0].from_blocks(apply(stats[0].to_blocks(r)), shape)
    total = sum(explicit_matrix(s, shape) for s in stats) + 0.1 * np.eye(
        math.prod(shape)
    )
    slow = np.linalg.solve(total, np.asarray(r, np.float64).reshape(-1)).reshape(shape)
    np.testing.assert_allclose(fast, slow, rtol=1e-3, atol=1e-4)


def test_pinv_leaves_null_space_alone():
    # A Gram with a dead input: the sum is singular; the pseudo-inverse maps the
    # null-space component to zero instead of dividing by zero.
    a = jnp.diag(jnp.array([2.0, 1.0, 0.0]))
    apply = Gram.sum_pinv([Gram(a).blocked((3, 2))], jnp.zeros((1,)))
    out = apply(jnp.ones((1, 3, 2)))
    np.testing.assert_allclose(out[0], [[0.5, 0.5], [1.0, 1.0], [0.0, 0.0]])


def test_kronecker_preconditioner_is_exact_for_shared_output_factor():
    # Σ_m A_m ⊗ (c_m G) = (Σ_m c_m A_m) ⊗ G is itself a Kronecker product.
    key = jax.random.PRNGKey(3)
    g = spd(key, 4)
    stats = [
        KFAC(spd(jax.random.fold_in(key, m), 3), (m + 1.0) * g).blocked((3, 4))
        for m in range(3)
    ]
    apply = KFAC.sum_preconditioner(stats, jnp.zeros((1,)))
    total = sum(
        np.kron(np.asarray(s.a[0], np.float64), np.asarray(s.g[0], np.float64))
        for s in stats
    )
    r = jax.random.normal(jax.random.PRNGKey(4), (1, 3, 4))
    slow = np.linalg.solve(total, np.asarray(r, np.float64).reshape(-1)).reshape(
        1, 3, 4
    )
    np.testing.assert_allclose(apply(r), slow, rtol=2e-3, atol=2e-4)


def test_kronecker_preconditioner_is_nearest_kronecker_product():
    # The preconditioner's X ⊗ Y must beat the plain sum-of-factors product
    # (Σ A_m) ⊗ (Σ G_m) / M in Frobenius distance to Σ A_m ⊗ G_m.
    key = jax.random.PRNGKey(5)
    stats = [
        KFAC(
            spd(jax.random.fold_in(key, m), 3),
            spd(jax.random.fold_in(key, 10 + m), 2) * (1 + 3 * m),
        ).blocked((3, 2))
        for m in range(3)
    ]
    total = sum(
        np.kron(np.asarray(s.a[0], np.float64), np.asarray(s.g[0], np.float64))
        for s in stats
    )
    apply = KFAC.sum_preconditioner(stats, jnp.zeros((1,)))
    # Recover P from P⁻¹ applied to unit vectors.
    columns = [
        np.asarray(apply(jnp.eye(6)[j].reshape(1, 3, 2)), np.float64).reshape(-1)
        for j in range(6)
    ]
    p = np.linalg.inv(np.stack(columns, axis=1))
    naive = (
        np.kron(
            sum(np.asarray(s.a[0]) for s in stats),
            sum(np.asarray(s.g[0]) for s in stats),
        )
        / 3
    )
    scale = np.sum(naive * total) / np.sum(
        naive * naive
    )  # best scaling of the naive guess
    assert np.linalg.norm(total - p) <= np.linalg.norm(total - scale * naive) + 1e-4


@pytest.mark.parametrize(
    ("stat", "shape", "message"),
    [
        (Diagonal(jnp.ones((3, 4))), (4, 3), "Diagonal.f has shape"),
        (Dense(jnp.eye(5)), (2, 3), r"expected \(6, 6\)"),
        (Gram(jnp.eye(3)), (4, 2), r"Gram.a has shape \(3, 3\), expected \(4, 4\)"),
        (
            KFAC(jnp.eye(3), jnp.eye(3)),
            (3, 2),
            r"KFAC.g has shape \(3, 3\), expected \(2, 2\)",
        ),
        (KFAC(jnp.eye(3), jnp.eye(2), in_axes=(3,)), (3, 2), "do not exist"),
        (
            KFAC(jnp.eye(3), jnp.eye(2), in_axes=(0,), out_axes=(0,)),
            (3, 2),
            "repeat an axis",
        ),
    ],
)
def test_fit_error_names_the_mismatch(stat, shape, message):
    error = stat.fit_error(shape)
    assert error is not None and re.search(message, error), error
