"""The block Fisher (``block_fisher``, Dense statistics) against loops of single-example gradients.

The model is the IA³ shape the MaTS paper merges: a frozen kernel whose
outputs are rescaled by a trained vector ``l`` (``h = l ⊙ (x W) + b``), so the
small blocks (the scaling vector, the bias) are the statistics' leaves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mats_jax
from mats_jax import (
    Dense,
    Diagonal,
    StatisticsFallbackWarning,
    block_fisher,
    diagonal_fisher,
)

KEY = jax.random.key(0)


def ia3_params(key=KEY, d=3, hidden=5, classes=4):
    k = jax.random.split(key, 4)
    return {
        "frozen": jax.random.normal(k[0], (d, hidden)) / 2,
        "ia3": 1.0 + 0.2 * jax.random.normal(k[1], (hidden,)),
        "bias": 0.1 * jax.random.normal(k[2], (hidden,)),
        "out": jax.random.normal(k[3], (hidden, classes)),
    }


def ia3_model(params, x):
    h = jnp.tanh(params["ia3"] * (x @ params["frozen"]) + params["bias"])
    return h @ params["out"]


def data(n=23, d=3, classes=4):
    x = jax.random.normal(jax.random.fold_in(KEY, 7), (n, d))
    y = jax.random.randint(jax.random.fold_in(KEY, 8), (n,), 0, classes)
    return x, y


def batches(x, y, size=10):
    return [
        {"inputs": x[s : s + size], "labels": y[s : s + size]}
        for s in range(0, x.shape[0], size)
    ]


def loop_block_fisher(params, x, y, kind, leaf):
    """One example and one class at a time: Σ_i Σ_c w_ic g g^T / N, the definition."""
    n = int(np.size(params[leaf]))
    total = np.zeros((n, n))

    def log_p(value, xi, c):
        p = dict(params, **{leaf: value})
        return jax.nn.log_softmax(ia3_model(p, xi[None]))[0, c]

    grad = jax.jit(jax.grad(log_p))
    for i in range(x.shape[0]):
        probs = np.asarray(jax.nn.softmax(ia3_model(params, x[i : i + 1]))[0])
        classes = (
            [(int(y[i]), 1.0)]
            if kind == "empirical"
            else [(c, float(probs[c])) for c in range(probs.shape[0])]
        )
        for c, weight in classes:
            g = np.asarray(grad(params[leaf], x[i], c), np.float64).reshape(-1)
            total += weight * np.outer(g, g)
    return total / x.shape[0]


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_block_fisher_equals_a_loop_of_single_example_gradients(kind):
    params = ia3_params()
    x, y = data()
    got = block_fisher(
        ia3_model,
        params,
        batches(x, y),
        leaves=["ia3", "bias", "out"],
        kind=kind,
        micro_batch_size=4,
        progress=False,
    )
    assert got["frozen"] is None
    for leaf in ("ia3", "bias", "out"):
        assert isinstance(got[leaf], Dense)
        n = int(np.size(params[leaf]))
        assert got[leaf].f.shape == (n, n)
        want = loop_block_fisher(params, x, y, kind, leaf)
        np.testing.assert_allclose(got[leaf].f, want, rtol=1e-4, atol=1e-7)
        # The block is not diagonal: what it keeps is what the diagonal drops.
        assert np.abs(want - np.diag(np.diag(want))).max() > 1e-3 * np.abs(want).max()


def test_its_diagonal_is_the_diagonal_fisher_and_micro_batches_do_not_matter():
    params = ia3_params()
    x, y = data()
    blocks = [
        block_fisher(
            ia3_model, params, batches(x, y), micro_batch_size=m, progress=False
        )
        for m in (1, 7, 32)
    ]
    diagonal = diagonal_fisher(ia3_model, params, batches(x, y), progress=False)
    for leaf in params:
        for b in blocks[1:]:
            np.testing.assert_allclose(
                b[leaf].f, blocks[0][leaf].f, rtol=1e-5, atol=1e-7
            )
        np.testing.assert_allclose(
            np.diag(blocks[0][leaf].f),
            np.asarray(diagonal[leaf].f).reshape(-1),
            rtol=1e-5,
            atol=1e-8,
        )


def test_sequence_model_with_padding_equals_a_loop():
    # Tokens of a padded sequence: each example's score sums its real tokens'
    # log-likelihoods, and padding counts for nothing.
    vocab, dim = 5, 3
    params = {
        "embed": jax.random.normal(KEY, (vocab, dim)),
        "scale": 1.0 + 0.1 * jax.random.normal(jax.random.fold_in(KEY, 2), (dim,)),
        "proj": jax.random.normal(jax.random.fold_in(KEY, 1), (dim, vocab)),
    }

    def lm(p, tokens):
        return (p["embed"][tokens] * p["scale"]) @ p["proj"]

    tokens = jax.random.randint(KEY, (5, 4), 0, vocab)
    mask = (jnp.arange(4)[None] < jnp.array([4, 3, 2, 4, 1])[:, None]).astype(
        jnp.float32
    )
    got = block_fisher(
        lm,
        params,
        [{"inputs": tokens, "labels": tokens, "mask": mask}],
        leaves="scale",
        kind="empirical",
        micro_batch_size=2,
        progress=False,
    )

    def log_lik(scale, i):
        logp = jax.nn.log_softmax(lm(dict(params, scale=scale), tokens[i : i + 1]))[0]
        picked = jnp.take_along_axis(logp, tokens[i][:, None], axis=1)[:, 0]
        return jnp.sum(mask[i] * picked)

    want = sum(
        np.outer(g, g)
        for g in (np.asarray(jax.grad(log_lik)(params["scale"], i)) for i in range(5))
    )
    np.testing.assert_allclose(got["scale"].f, want / 5, rtol=1e-4, atol=1e-7)


def test_a_leaf_past_the_size_limit_gets_the_fallback_and_is_named():
    params = ia3_params()
    x, y = data()
    with pytest.warns(
        StatisticsFallbackWarning, match=r"'frozen': its block would have 15 rows"
    ):
        got = block_fisher(
            ia3_model,
            params,
            batches(x, y),
            max_block_size=10,
            fallback="diagonal",
            progress=False,
        )
    assert isinstance(got["ia3"], Dense) and isinstance(got["bias"], Dense)
    assert isinstance(got["frozen"], Diagonal) and isinstance(got["out"], Diagonal)
    reference = diagonal_fisher(ia3_model, params, batches(x, y), progress=False)
    np.testing.assert_allclose(got["frozen"].f, reference["frozen"].f, rtol=1e-5)
    with pytest.warns(StatisticsFallbackWarning):
        none = block_fisher(
            ia3_model, params, batches(x, y), max_block_size=10, progress=False
        )
    assert none["frozen"] is None and none["out"] is None


def test_mats_with_block_fishers_equals_a_dense_solve_and_cg_needs_few_steps():
    # The paper's IA³ setting: per-task block Fishers of the scaling vectors,
    # merged by CG; the answer is (Σ F_m)⁻¹ Σ F_m l_m.
    x, y = data(n=40)
    tasks = [ia3_params(jax.random.fold_in(KEY, 10 + m)) for m in range(3)]
    shared = {k: tasks[0][k] for k in ("frozen", "out")}
    models = [dict(shared, ia3=t["ia3"], bias=t["bias"]) for t in tasks]
    stats = [
        block_fisher(
            ia3_model, m, batches(x, y), leaves=["ia3", "bias"], progress=False
        )
        for m in models
    ]
    expected = {}
    for leaf in ("ia3", "bias"):
        total = sum(np.asarray(s[leaf].f, np.float64) for s in stats)
        rhs = sum(
            np.asarray(s[leaf].f, np.float64) @ np.asarray(m[leaf], np.float64)
            for s, m in zip(stats, models, strict=True)
        )
        expected[leaf] = np.linalg.solve(total, rhs)
    closed = mats_jax.solve(models, stats, method="closed_form").params
    init = mats_jax.task_arithmetic(
        shared | {"ia3": jnp.ones(5), "bias": jnp.zeros(5)}, models, scale=1 / 3
    )
    merged, report = mats_jax.mats(models, stats, init=init, maxiter=10, tol=1e-6)
    for leaf in ("ia3", "bias"):
        np.testing.assert_allclose(closed[leaf], expected[leaf], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(merged[leaf], expected[leaf], rtol=1e-3, atol=1e-4)
        # A block of n = 5 entries: CG is exact in n steps in exact
        # arithmetic, a step or two more in float32 to reach tol.
        assert int(report[leaf].iterations[0]) <= 5 + 2
    for leaf in ("frozen", "out"):  # no statistic: the models' average
        np.testing.assert_allclose(merged[leaf], shared[leaf], rtol=1e-6)


def test_saved_block_fishers_load_back(tmp_path):
    params = ia3_params()
    x, y = data()
    stats = block_fisher(ia3_model, params, batches(x, y), leaves="ia3", progress=False)
    mats_jax.save_statistics(tmp_path / "stats", stats)
    loaded = mats_jax.load_statistics(tmp_path / "stats", like=params)
    np.testing.assert_array_equal(loaded["ia3"].f, stats["ia3"].f)
    assert loaded["bias"] is None
