"""Statistics estimators against slow, obviously correct twins."""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mats_jax
from mats_jax import (
    KFAC,
    Diagonal,
    StatisticsInputError,
    diagonal_fisher,
    gram,
    kfac,
)
from mats_jax.stats.capture import find_layers

KEY = jax.random.PRNGKey(0)


def mlp_params(key=KEY, sizes=(3, 5, 4)):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "hidden": {
            "kernel": jax.random.normal(k1, sizes[:2]) / 2,
            "bias": 0.1 * jax.random.normal(k3, sizes[1:2]),
        },
        "out": {"kernel": jax.random.normal(k2, sizes[1:])},
    }


def mlp(params, x):
    h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return h @ params["out"]["kernel"]


def data(n=23, d=3, classes=4, key=KEY):
    x = jax.random.normal(jax.random.fold_in(key, 7), (n, d))
    y = jax.random.randint(jax.random.fold_in(key, 8), (n,), 0, classes)
    return x, y


def as_batches(x, y=None, mask=None, size=10):
    out = []
    for s in range(0, x.shape[0], size):
        batch = {"inputs": x[s : s + size]}
        if y is not None:
            batch["labels"] = y[s : s + size]
        if mask is not None:
            batch["mask"] = mask[s : s + size]
        out.append(batch)
    return out


# --- diagonal Fisher --------------------------------------------------------------


def loop_fisher(params, x, y, kind):
    """One example at a time, one class at a time: the definition."""
    total = jax.tree.map(jnp.zeros_like, params)
    grad_log_p = jax.jit(
        jax.grad(lambda p, xi, c: jax.nn.log_softmax(mlp(p, xi[None]))[0, c])
    )
    for i in range(x.shape[0]):
        probs = jax.nn.softmax(mlp(params, x[i : i + 1]))[0]
        classes = (
            [(int(y[i]), 1.0)]
            if kind == "empirical"
            else [(c, float(probs[c])) for c in range(probs.shape[0])]
        )
        for c, weight in classes:
            g = grad_log_p(params, x[i], c)
            total = jax.tree.map(lambda t, gi, w=weight: t + w * gi**2, total, g)
    return jax.tree.map(lambda t: t / x.shape[0], total)


@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_diagonal_fisher_equals_loop_of_single_example_gradients(kind):
    params = mlp_params()
    x, y = data()
    fisher = diagonal_fisher(
        mlp, params, as_batches(x, y), kind=kind, micro_batch_size=4, progress=False
    )
    expected = loop_fisher(params, x, y, kind)
    for got, want in zip(
        jax.tree.leaves(fisher, is_leaf=lambda s: isinstance(s, Diagonal)),
        jax.tree.leaves(expected),
    ):
        np.testing.assert_allclose(got.f, want, rtol=1e-4, atol=1e-7)


def test_sampled_fisher_approaches_exact_with_many_samples():
    params = mlp_params()
    x, y = data(n=8)
    exact = diagonal_fisher(mlp, params, as_batches(x, y), kind="exact", progress=False)
    sampled = diagonal_fisher(
        mlp,
        params,
        as_batches(x, y),
        kind="sampled",
        num_samples=4000,
        key=jax.random.key(1),
        progress=False,
    )
    for e, s in zip(jax.tree.leaves(exact), jax.tree.leaves(sampled)):
        np.testing.assert_allclose(s, e, rtol=0.1, atol=0.02 * float(jnp.max(e)))


def test_masked_examples_do_not_count():
    params = mlp_params()
    x, y = data(n=12)
    mask = jnp.array([1.0] * 7 + [0.0] * 5)
    masked = diagonal_fisher(
        mlp, params, as_batches(x, y, mask, size=12), kind="empirical", progress=False
    )
    first7 = diagonal_fisher(
        mlp, params, as_batches(x[:7], y[:7]), kind="empirical", progress=False
    )
    for a, b in zip(jax.tree.leaves(masked), jax.tree.leaves(first7)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_result_does_not_depend_on_micro_batch_size():
    params = mlp_params()
    x, y = data()
    results = [
        diagonal_fisher(
            mlp,
            params,
            as_batches(x, y),
            kind="exact",
            micro_batch_size=size,
            progress=False,
        )
        for size in (1, 3, 32)
    ]
    for other in results[1:]:
        for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


# --- Gram and K-FAC ---------------------------------------------------------------


def test_gram_equals_xtx_of_a_hand_written_forward_pass():
    params = mlp_params()
    x, _ = data()
    grams = gram(mlp, params, as_batches(x), micro_batch_size=4, progress=False)
    hidden = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    np.testing.assert_allclose(
        grams["hidden"]["kernel"].a, x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        grams["out"]["kernel"].a, hidden.T @ hidden / x.shape[0], rtol=1e-5, atol=1e-6
    )
    assert grams["hidden"]["bias"] is None  # not a dense kernel: RegMean averages it


def test_kfac_factors_equal_hand_computation():
    params = mlp_params()
    x, y = data()
    stats = kfac(mlp, params, as_batches(x, y), micro_batch_size=4, progress=False)
    n = x.shape[0]
    pre = x @ params["hidden"]["kernel"] + params["hidden"]["bias"]
    hidden = jnp.tanh(pre)
    probs = jax.nn.softmax(hidden @ params["out"]["kernel"])
    out_fisher = [
        jnp.diag(p) - jnp.outer(p, p) for p in probs
    ]  # Σ_c p_c (e_c - p)(e_c - p)ᵀ
    g_out = sum(out_fisher) / n
    np.testing.assert_allclose(
        stats["out"]["kernel"].a, hidden.T @ hidden / n, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(stats["out"]["kernel"].g, g_out, rtol=1e-4, atol=1e-7)
    # Hidden layer: the gradient at its output is J_i u with J_i = diag(tanh') W_outᵀ.
    g_hidden = (
        sum(
            (jnp.diag(1 - hidden[i] ** 2) @ params["out"]["kernel"])
            @ out_fisher[i]
            @ (jnp.diag(1 - hidden[i] ** 2) @ params["out"]["kernel"]).T
            for i in range(n)
        )
        / n
    )
    np.testing.assert_allclose(
        stats["hidden"]["kernel"].g, g_hidden, rtol=1e-4, atol=1e-7
    )
    assert isinstance(stats["hidden"]["bias"], Diagonal)  # the fallback, and it says so
    expected_bias = loop_fisher(params, x, y, "exact")["hidden"]["bias"]
    np.testing.assert_allclose(
        stats["hidden"]["bias"].f, expected_bias, rtol=1e-4, atol=1e-8
    )


def test_kfac_of_single_softmax_layer_equals_exact_fisher_block():
    # With zero weights every example has the same output distribution, and the
    # exact Fisher block of W is exactly A ⊗ G.
    x, y = data(n=9, d=3, classes=4)
    params = {"w": jnp.zeros((3, 4))}
    stats = kfac(lambda p, xb: xb @ p["w"], params, as_batches(x, y), progress=False)

    def log_p(w, xi, c):
        return jax.nn.log_softmax(xi @ w)[c]

    exact = jnp.zeros((12, 12))
    for i in range(x.shape[0]):
        probs = jax.nn.softmax(x[i] @ params["w"])
        for c in range(4):
            s = jax.grad(log_p)(params["w"], x[i], c).reshape(-1)
            exact = exact + probs[c] * jnp.outer(s, s)
    exact = exact / x.shape[0]
    np.testing.assert_allclose(
        jnp.kron(stats["w"].a, stats["w"].g), exact, rtol=1e-4, atol=1e-7
    )


def per_example_g(logits_of, inputs, rows_outputs):
    """G = (1/N) Σ_i Σ_rows J_rᵀ (diag p − p pᵀ) J_r, from each example alone.

    ``logits_of(x_i, eps)`` gives one example's logits (classes,) with
    ``eps``, of shape ``rows_outputs`` = (rows, outputs), added at a layer's
    output: J_r is the Jacobian of the logits with respect to row r of eps,
    and diag p − p pᵀ the exact Fisher of a categorical in its logits.
    """
    zeros = jnp.zeros(rows_outputs)

    def one_example(x_i):
        probs = jax.nn.softmax(logits_of(x_i, zeros))
        fisher_logits = jnp.diag(probs) - jnp.outer(probs, probs)
        jac = jax.jacrev(logits_of, argnums=1)(x_i, zeros)  # (classes, rows, O)
        return jnp.einsum("cro,cd,drp->op", jac, fisher_logits, jac)

    return jnp.mean(jax.jit(jax.vmap(one_example))(inputs), axis=0)


def test_g_of_a_kernel_used_twice_accumulates_over_both_uses():
    params = {
        "w": jax.random.normal(KEY, (4, 4)) / 2,
        "head": jax.random.normal(jax.random.fold_in(KEY, 1), (4, 3)),
    }

    def twice(p, x):
        return jnp.tanh(jnp.tanh(x @ p["w"]) @ p["w"]) @ p["head"]

    def perturbed(x_i, first, second):
        h = jnp.tanh(x_i @ params["w"] + first[0])
        return jnp.tanh(h @ params["w"] + second[0]) @ params["head"]

    x, y = data(n=10, d=4)
    stat = kfac(
        twice, params, as_batches(x, y, size=4), micro_batch_size=3, progress=False
    )["w"]
    zeros = jnp.zeros((1, 4))
    g_first = per_example_g(lambda x_i, e: perturbed(x_i, e, zeros), x, (1, 4))
    g_second = per_example_g(lambda x_i, e: perturbed(x_i, zeros, e), x, (1, 4))
    # Both uses add to G, per example (N = 10, not the 20 rows of A).
    np.testing.assert_allclose(stat.g, g_first + g_second, rtol=1e-4, atol=1e-7)
    # Each use alone is far from the sum: the input tells the two apart.
    for one in (g_first, g_second):
        assert float(jnp.max(jnp.abs(stat.g - one))) > 0.1 * float(
            jnp.max(jnp.abs(stat.g))
        )
    h = jnp.tanh(x @ params["w"])
    np.testing.assert_allclose(stat.a, (x.T @ x + h.T @ h) / 20, rtol=1e-5, atol=1e-6)


def test_kfac_is_a_mean_over_unmasked_examples():
    # G (and A) are per-example means: repeating the data, cutting it into
    # other micro-batches, or adding masked-out examples changes nothing.
    params = mlp_params()
    x, y = data(n=12)
    reference = kfac(mlp, params, as_batches(x, y), progress=False)
    repeated = kfac(
        mlp,
        params,
        as_batches(jnp.concatenate([x, x]), jnp.concatenate([y, y]), size=7),
        micro_batch_size=3,
        progress=False,
    )
    padded_x = jnp.concatenate([x, 10 * jnp.ones((5, 3))])
    padded_y = jnp.concatenate([y, jnp.zeros(5, y.dtype)])
    mask = jnp.array([1.0] * 12 + [0.0] * 5)
    padded = kfac(
        mlp, params, as_batches(padded_x, padded_y, mask, size=17), progress=False
    )
    for other in (repeated, padded):
        for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(reference)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_sampled_kfac_approaches_exact_with_many_samples():
    # Each of n sampled labels weighs 1/n: G is their mean, not their sum.
    params = mlp_params()
    x, y = data(n=8)
    exact = kfac(mlp, params, as_batches(x, y), progress=False)
    sampled = kfac(
        mlp,
        params,
        as_batches(x, y),
        kind="sampled",
        num_samples=2000,
        key=jax.random.key(2),
        progress=False,
    )
    for leaf in ("hidden", "out"):
        e, s = exact[leaf]["kernel"], sampled[leaf]["kernel"]
        np.testing.assert_allclose(s.a, e.a, rtol=1e-6)
        # 16,000 draws: Monte Carlo error near 1% of the largest entry.
        np.testing.assert_allclose(s.g, e.g, atol=0.05 * float(jnp.max(jnp.abs(e.g))))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(5, name="hidden")(x))
        return nn.Dense(4, use_bias=False, name="out")(x)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(3, 5, rngs=rngs)
        self.out = nnx.Linear(5, 4, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def einsum_mlp(params, x):
    h = jnp.tanh(
        jnp.einsum("bi,io->bo", x, params["hidden"]["kernel"])
        + params["hidden"]["bias"]
    )
    return jnp.einsum("bi,io->bo", h, params["out"]["kernel"])


def test_linen_nnx_and_plain_jax_give_identical_statistics():
    params = mlp_params()
    x, y = data()
    batches = as_batches(x, y)
    linen_params = {"params": params}
    model = NnxMLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    state["hidden"]["kernel"][...] = params["hidden"]["kernel"]
    state["hidden"]["bias"][...] = params["hidden"]["bias"]
    state["out"]["kernel"][...] = params["out"]["kernel"]

    def nnx_fn(s, xb):
        return nnx.merge(graphdef, s)(xb)

    results = {
        "plain @": kfac(mlp, params, batches, progress=False),
        "plain einsum": kfac(einsum_mlp, params, batches, progress=False),
        "linen": kfac(LinenMLP().apply, linen_params, batches, progress=False)[
            "params"
        ],
        "nnx": kfac(nnx_fn, state, batches, progress=False),
    }
    # Same leaf order in all four (hidden/bias: f, hidden/kernel: a, g, out/kernel: a, g).
    reference = jax.tree.leaves(results["plain @"])
    assert len(reference) == 5
    for name, got in results.items():
        leaves = jax.tree.leaves(got)
        assert len(leaves) == 5, name
        for a, b in zip(leaves, reference):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8, err_msg=name)
    assert isinstance(results["linen"]["hidden"]["kernel"], KFAC)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(6, name="fc")(jnp.tanh(x)), None


class ScannedNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6, name="embed")(x)
        x, _ = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )(name="layers")(x, None)
        return nn.Dense(4, name="head")(x)


class UnrolledNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6, name="embed")(x)
        for i in range(3):
            x = x + nn.Dense(6, name=f"fc_{i}")(jnp.tanh(x))
        return nn.Dense(4, name="head")(x)


def test_scanned_layers_get_per_layer_statistics_equal_to_unrolled():
    x, y = data()
    batches = as_batches(x, y)
    scanned = ScannedNet()
    params = scanned.init(KEY, x)
    unrolled_params = {
        "params": {
            "embed": params["params"]["embed"],
            "head": params["params"]["head"],
            **{
                f"fc_{i}": jax.tree.map(
                    lambda a, i=i: a[i], params["params"]["layers"]["fc"]
                )
                for i in range(3)
            },
        }
    }
    np.testing.assert_allclose(
        scanned.apply(params, x), UnrolledNet().apply(unrolled_params, x), rtol=1e-5
    )
    stacked = kfac(scanned.apply, params, batches, progress=False)["params"]["layers"][
        "fc"
    ]["kernel"]
    unrolled = kfac(UnrolledNet().apply, unrolled_params, batches, progress=False)[
        "params"
    ]
    assert stacked.a.shape == (3, 6, 6) and stacked.g.shape == (3, 6, 6)
    for i in range(3):
        np.testing.assert_allclose(
            stacked.a[i], unrolled[f"fc_{i}"]["kernel"].a, rtol=1e-4, atol=1e-6
        )
        np.testing.assert_allclose(
            stacked.g[i], unrolled[f"fc_{i}"]["kernel"].g, rtol=1e-4, atol=1e-7
        )


def test_a_kernel_used_twice_accumulates_over_its_uses():
    params = {
        "w": jax.random.normal(KEY, (4, 4)) / 2,
        "head": jax.random.normal(jax.random.fold_in(KEY, 1), (4, 3)),
    }

    def twice(p, x):
        return jnp.tanh(jnp.tanh(x @ p["w"]) @ p["w"]) @ p["head"]

    x, _ = data(n=10, d=4)
    got = gram(twice, params, as_batches(x), progress=False)["w"].a
    h = jnp.tanh(x @ params["w"])
    # Both uses add their rows: A = (XᵀX + HᵀH) / (2N).
    np.testing.assert_allclose(got, (x.T @ x + h.T @ h) / 20, rtol=1e-5, atol=1e-6)


def test_dense_general_attention_projections():
    class Attention(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.MultiHeadDotProductAttention(
                num_heads=2, qkv_features=4, name="attn"
            )(x)
            return nn.Dense(3, name="head")(h.mean(axis=1))

    n, length = 6, 5
    x = jax.random.normal(KEY, (n, length, 4))
    y = jax.random.randint(KEY, (n,), 0, 3)
    model = Attention()
    params = model.init(KEY, x)
    stats = kfac(model.apply, params, as_batches(x, y), progress=False)["params"][
        "attn"
    ]
    p = params["params"]

    # The same model by hand, with a perturbation added at the output of each
    # projection's product (its gradient is that projection's g).
    def forward(xb, eps):
        def project(name, inputs):
            w = p["attn"][name]
            return (
                jnp.einsum("bli,ihd->blhd", inputs, w["kernel"]) + eps[name] + w["bias"]
            )

        q = project("query", xb) / jnp.sqrt(2.0)
        k, v = project("key", xb), project("value", xb)
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
        heads = jnp.einsum("bhqk,bkhd->bqhd", weights, v)  # the out projection's input
        out = jnp.einsum("blhd,hdo->blo", heads, p["attn"]["out"]["kernel"])
        out = out + eps["out"] + p["attn"]["out"]["bias"]
        logits = out.mean(axis=1) @ p["head"]["kernel"] + p["head"]["bias"]
        return logits, heads

    shapes = {
        "query": (length, 2, 2),
        "key": (length, 2, 2),
        "value": (length, 2, 2),
        "out": (length, 4),
    }
    no_eps = {name: jnp.zeros((1, *s)) for name, s in shapes.items()}
    logits, heads = forward(x, {name: jnp.zeros((n, *s)) for name, s in shapes.items()})
    np.testing.assert_allclose(logits, model.apply(params, x), rtol=1e-5, atol=1e-6)

    def g_at(name):
        """G of one projection, from each example alone (per_example_g)."""

        def logits_of(x_i, e):
            eps = {**no_eps, name: e.reshape(1, *shapes[name])}
            return forward(x_i[None], eps)[0][0]

        return per_example_g(logits_of, x, (length, 4))

    rows = x.reshape(-1, 4)  # every position of every example
    for name in ("query", "key", "value"):
        stat = stats[name]["kernel"]
        assert (
            isinstance(stat, KFAC) and stat.in_axes == (0,) and stat.out_axes == (1, 2)
        )
        np.testing.assert_allclose(
            stat.a, rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-6
        )
        # G over (heads, head_dim), flattened in that order; per example.
        np.testing.assert_allclose(stat.g, g_at(name), rtol=1e-4, atol=1e-7)
    out = stats["out"]["kernel"]
    assert out.in_axes == (0, 1) and out.out_axes == (2,)
    head_rows = heads.reshape(-1, 4)  # (heads, head_dim) flattened in that order
    np.testing.assert_allclose(
        out.a, head_rows.T @ head_rows / head_rows.shape[0], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(out.g, g_at("out"), rtol=1e-4, atol=1e-7)
    # The query's G is not the value's: the perturbations really differ.
    assert (
        float(jnp.max(jnp.abs(stats["query"]["kernel"].g - stats["value"]["kernel"].g)))
        > 1e-3
    )


def test_token_level_sequence_model_with_padding():
    vocab, dim, length = 5, 3, 4
    params = {
        "embed": jax.random.normal(KEY, (vocab, dim)),
        "proj": jax.random.normal(jax.random.fold_in(KEY, 1), (dim, vocab)),
    }

    def lm(p, tokens):
        return p["embed"][tokens] @ p["proj"]  # (batch, positions, vocab)

    tokens = jax.random.randint(KEY, (6, length), 0, vocab)
    mask = (jnp.arange(length)[None] < jnp.array([4, 3, 2, 4, 1, 3])[:, None]).astype(
        jnp.float32
    )
    stats = kfac(
        lm,
        params,
        [{"inputs": tokens, "labels": tokens, "mask": mask}],
        kind="empirical",
        progress=False,
    )
    rows = params["embed"][tokens].reshape(-1, dim)
    w = mask.reshape(-1)
    np.testing.assert_allclose(
        stats["proj"].a, (rows * w[:, None]).T @ rows / w.sum(), rtol=1e-5, atol=1e-6
    )
    probs = jax.nn.softmax(lm(params, tokens)).reshape(-1, vocab)
    scores = (jax.nn.one_hot(tokens.reshape(-1), vocab) - probs) * w[:, None]
    np.testing.assert_allclose(
        stats["proj"].g, scores.T @ scores / 6, rtol=1e-4, atol=1e-6
    )
    assert isinstance(
        stats["embed"], Diagonal
    )  # gathered, not multiplied: the fallback
    with pytest.raises(StatisticsInputError, match="kind='sampled'"):
        kfac(
            lm,
            params,
            [{"inputs": tokens, "labels": tokens, "mask": mask}],
            kind="exact",
            progress=False,
        )


def test_statistics_feed_mats_directly_and_save_and_load(tmp_path):
    x, y = data()
    tasks = [mlp_params(jax.random.PRNGKey(t)) for t in range(3)]
    stats = [
        kfac(mlp, p, as_batches(x, (y + t) % 4), progress=False)
        for t, p in enumerate(tasks)
    ]
    merged = mats_jax.mats(tasks, stats, init=mats_jax.average(tasks), maxiter=50)
    assert jax.tree.structure(merged.params) == jax.tree.structure(tasks[0])
    mats_jax.save_statistics(tmp_path / "task0", stats[0])
    loaded = mats_jax.load_statistics(tmp_path / "task0", like=stats[0])
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(stats[0])):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(loaded) == jax.tree.structure(stats[0])
    with pytest.raises(FileExistsError):
        mats_jax.save_statistics(tmp_path / "task0", stats[0])
    table = mats_jax.statistics_table(stats)
    assert "hidden/kernel  KFAC" in table and "hidden/bias    Diagonal" in table


# --- bad input ----------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    params = mlp_params()
    x, y = data()
    with pytest.raises(StatisticsInputError, match="yielded no batches"):
        kfac(mlp, params, [], progress=False)
    with pytest.raises(StatisticsInputError, match="yielded no batches"):
        diagonal_fisher(mlp, params, iter([]), progress=False)
    with pytest.raises(
        StatisticsInputError,
        match=r"batch 0: leading \(batch\) sizes differ: inputs: 23, labels: 22",
    ):
        diagonal_fisher(mlp, params, [{"inputs": x, "labels": y[:-1]}], progress=False)
    with pytest.raises(StatisticsInputError, match="logits of shape"):
        diagonal_fisher(
            lambda p, xb: jnp.sum(mlp(p, xb)), params, as_batches(x, y), progress=False
        )
    with pytest.raises(StatisticsInputError, match="no dense layer"):
        gram(
            lambda p, xb: xb * p["w"], {"w": jnp.ones(3)}, as_batches(x), progress=False
        )
    with pytest.raises(StatisticsInputError, match="needs gold 'labels'"):
        diagonal_fisher(mlp, params, as_batches(x), kind="empirical", progress=False)
    with pytest.raises(StatisticsInputError, match="needs a PRNG key"):
        kfac(mlp, params, as_batches(x, y), kind="sampled", progress=False)
    bad = jax.tree.map(lambda a: a.at[0].set(jnp.nan) if a.ndim == 1 else a, params)
    with pytest.raises(
        StatisticsInputError, match=r"NaN or Inf appeared .* batch 0, at 'hidden/"
    ):
        kfac(mlp, bad, as_batches(x, y), progress=False)


@pytest.mark.parametrize("estimator", [kfac, gram, diagonal_fisher])
def test_a_non_finite_batch_is_named_with_its_leaves(estimator):
    # The test runs on the sums after each batch: the batch that brings the
    # NaN is named, not a later one, whatever the micro-batch it is in.
    x, y = data()
    x = x.at[14, 1].set(jnp.nan)  # batch 1 of 10-example batches
    with pytest.raises(
        StatisticsInputError, match=r"NaN or Inf appeared .* batch 1, at 'hidden/"
    ):
        estimator(
            mlp, mlp_params(), as_batches(x, y), micro_batch_size=3, progress=False
        )


def test_finite_increments_whose_sum_overflows_are_refused():
    # Each batch's x² is 2.25e38 (finite); the sum of two is not: the
    # second batch is named, with the leaf and the overflow as a cause.
    params = {"w": jnp.ones((1, 2))}
    x = jnp.full((3, 1), 1.5e19)
    with pytest.raises(
        StatisticsInputError,
        match=r"batch 1, at 'w/inputs'.*outgrew float32's range",
    ):
        gram(lambda p, xb: xb @ p["w"], params, as_batches(x, size=1), progress=False)
    # Within float32's range, the same sums are fine.
    ok = gram(
        lambda p, xb: xb @ p["w"], params, as_batches(x / 1e4, size=1), progress=False
    )
    np.testing.assert_allclose(ok["w"].a, [[2.25e30]], rtol=1e-5)


def test_data_parallel_on_eight_devices_equals_single_device():
    script = textwrap.dedent(
        """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh
        from mats_jax import block_fisher, diagonal_fisher, kfac
        assert jax.device_count() == 8, jax.devices()
        key = jax.random.PRNGKey(0)
        params = {"w1": jax.random.normal(key, (3, 5)), "b": jnp.zeros(5),
                  "w2": jax.random.normal(jax.random.fold_in(key, 1), (5, 4))}
        def fn(p, x):
            return jnp.tanh(x @ p["w1"] + p["b"]) @ p["w2"]
        x = jax.random.normal(key, (50, 3))
        y = jax.random.randint(key, (50,), 0, 4)
        batches = [{"inputs": x[:30], "labels": y[:30]}, {"inputs": x[30:], "labels": y[30:]}]
        mesh = Mesh(np.array(jax.devices()), ("data",))
        for estimator in (kfac, diagonal_fisher, block_fisher):
            single = estimator(fn, params, batches, micro_batch_size=16, progress=False)
            sharded = estimator(fn, params, batches, micro_batch_size=16, mesh=mesh, progress=False)
            for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_diagonal_fisher_of_a_sequence_model_equals_a_loop():
    # Kernels applied to several rows per example take the per-example path;
    # the result must still be the mean of squared per-example scores.
    vocab, dim = 5, 3
    params = {
        "embed": jax.random.normal(KEY, (vocab, dim)),
        "proj": jax.random.normal(jax.random.fold_in(KEY, 1), (dim, vocab)),
    }

    def lm(p, tokens):
        return p["embed"][tokens] @ p["proj"]

    tokens = jax.random.randint(KEY, (5, 4), 0, vocab)
    mask = (jnp.arange(4)[None] < jnp.array([4, 3, 2, 4, 1])[:, None]).astype(
        jnp.float32
    )
    got = diagonal_fisher(
        lm,
        params,
        [{"inputs": tokens, "labels": tokens, "mask": mask}],
        kind="empirical",
        micro_batch_size=2,
        progress=False,
    )

    def log_lik(p, i):
        logp = jax.nn.log_softmax(lm(p, tokens[i : i + 1]))[0]
        return jnp.sum(
            mask[i] * jnp.take_along_axis(logp, tokens[i][:, None], axis=1)[:, 0]
        )

    total = jax.tree.map(jnp.zeros_like, params)
    for i in range(5):
        total = jax.tree.map(lambda t, g: t + g**2, total, jax.grad(log_lik)(params, i))
    for leaf in ("embed", "proj"):
        np.testing.assert_allclose(got[leaf].f, total[leaf] / 5, rtol=1e-4, atol=1e-7)


def test_estimating_many_tasks_compiles_once(caplog):
    x, y = data()

    def task(t):
        kfac(
            mlp,
            mlp_params(jax.random.PRNGKey(t)),
            as_batches(x, y, size=12),
            micro_batch_size=5,
            progress=False,
        )

    task(0)
    # jax.log_compiles logs every compilation: the other tasks must log none.
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for t in (1, 2):
            task(t)
    assert [
        r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()
    ] == []


# --- biases' per-example squares from the taps ------------------------------------


def loop_squared_scores(log_lik, params, n):
    """Σ_i (∇ log_lik(params, i))² / n, one example at a time: the definition."""
    total = jax.tree.map(jnp.zeros_like, params)
    for i in range(n):
        total = jax.tree.map(lambda t, g: t + g**2, total, jax.grad(log_lik)(params, i))
    return jax.tree.map(lambda t: t / n, total)


def opaque_bias(b):
    # The same values, through a product the capture does not read as a
    # bias: the leaf takes the vmapped per-example pass (the slow twin).
    return b * 1.0


def token_params(vocab=5, dim=3, hidden=4):
    keys = jax.random.split(jax.random.fold_in(KEY, 31), 5)
    return {
        "embed": jax.random.normal(keys[0], (vocab, dim)),
        "up": {
            "kernel": jax.random.normal(keys[1], (dim, hidden)),
            "bias": jax.random.normal(keys[2], (hidden,)),
        },
        "out": {
            "kernel": jax.random.normal(keys[3], (hidden, vocab)),
            "bias": jax.random.normal(keys[4], (vocab,)),
        },
    }


def token_lm(p, tokens, bias=lambda b: b):
    """Logits per position; the next layer mixes positions (padding included)."""
    h = jnp.tanh(p["embed"][tokens] @ p["up"]["kernel"] + bias(p["up"]["bias"]))
    h = h + jnp.mean(h, axis=1, keepdims=True)  # pads reach real positions
    return h @ p["out"]["kernel"] + bias(p["out"]["bias"])


TOKENS = jax.random.randint(jax.random.fold_in(KEY, 32), (7, 4), 0, 5)
LENGTHS = jnp.array([4, 3, 2, 4, 1, 3, 2])
TOKEN_MASK = (jnp.arange(4)[None] < LENGTHS[:, None]).astype(jnp.float32)


def test_the_capture_proves_which_leaves_are_a_taps_bias():
    params = token_params()
    names = jax.tree.leaves(mats_jax.tree.leaf_paths(params))
    layers = find_layers(token_lm, params, TOKENS)
    assert sorted(names[b.leaf] for b in layers.biases) == ["out/bias", "up/bias"]
    assert layers.uses[names.index("up/bias")] == ("broadcast_in_dim",)

    def not_biases(p, x):
        y = x @ p["w"]
        z = y + p["read_twice"]
        u = x @ p["v"] * 2.0 + p["after_a_scale"]  # g at u is not g at the product
        t = x @ p["t"]
        return (z * y + u + (t + p["twice"]) + (t + p["twice"])) @ p["head"]

    p = {
        name: jnp.ones(shape)
        for name, shape in {
            "w": (3, 2),
            "v": (3, 2),
            "t": (3, 2),
            "head": (2, 2),
            "read_twice": (2,),
            "after_a_scale": (2,),
            "twice": (2,),
        }.items()
    }
    assert find_layers(not_biases, p, jnp.ones((5, 3))).biases == ()


BIAS_ESTIMATORS = {
    "diagonal_fisher": diagonal_fisher,
    "kfac": kfac,
    "gram": functools.partial(gram, fallback="diagonal"),
}


@pytest.mark.parametrize("kind", ["empirical", "exact"])
@pytest.mark.parametrize("estimator", sorted(BIAS_ESTIMATORS))
def test_mlp_biases_from_the_taps_equal_the_per_example_pass_and_a_loop(
    estimator, kind
):
    params = mlp_params(sizes=(3, 6, 4))
    x, y = data(n=13)

    def opaque(p, xb):
        h = jnp.tanh(xb @ p["hidden"]["kernel"] + opaque_bias(p["hidden"]["bias"]))
        return h @ p["out"]["kernel"]

    def run(fn):
        return BIAS_ESTIMATORS[estimator](
            fn,
            params,
            as_batches(x, y, size=5),
            kind=kind,
            micro_batch_size=4,
            progress=False,
        )

    got, twin = run(mlp), run(opaque)
    want = loop_fisher(params, x, y, kind)["hidden"]["bias"]
    np.testing.assert_allclose(got["hidden"]["bias"].f, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        got["hidden"]["bias"].f, twin["hidden"]["bias"].f, rtol=1e-5, atol=1e-8
    )


@pytest.mark.parametrize("estimator", ["diagonal_fisher", "kfac"])
def test_token_model_biases_from_the_taps_equal_the_per_example_pass_and_a_loop(
    estimator,
):
    # Rows are tokens: a bias's per-example gradient sums its example's
    # positions, padded ones included (they reach real ones through the mean).
    # diagonal_fisher of the biases alone: with the kernels and the embedding
    # it would keep its per-example pass, and then takes no bias from the taps
    # whose output gradient it does not form anyway.
    params = token_params()
    batches = [
        {
            "inputs": TOKENS[s : s + 4],
            "labels": TOKENS[s : s + 4],
            "mask": TOKEN_MASK[s : s + 4],
        }
        for s in (0, 4)
    ]
    call = {
        "diagonal_fisher": functools.partial(diagonal_fisher, leaves="*/bias"),
        "kfac": kfac,
    }[estimator]

    def run(fn):
        return call(
            fn, params, batches, kind="empirical", micro_batch_size=3, progress=False
        )

    got = run(token_lm)
    twin = run(lambda p, t: token_lm(p, t, bias=opaque_bias))

    def log_lik(p, i):
        logp = jax.nn.log_softmax(token_lm(p, TOKENS[i : i + 1]))[0]
        picked = jnp.take_along_axis(logp, TOKENS[i][:, None], axis=1)[:, 0]
        return jnp.sum(TOKEN_MASK[i] * picked)

    want = loop_squared_scores(log_lik, params, TOKENS.shape[0])
    for leaf in ("up", "out"):
        np.testing.assert_allclose(
            got[leaf]["bias"].f, want[leaf]["bias"], rtol=1e-5, atol=1e-7
        )
        np.testing.assert_allclose(
            got[leaf]["bias"].f, twin[leaf]["bias"].f, rtol=1e-5, atol=1e-8
        )


def test_scanned_biases_from_the_taps_equal_a_loop():
    # Stacked per-layer biases (nn.scan) take their layer's taps.
    x, y = data()
    net = ScannedNet()
    params = net.init(KEY, x)
    got = diagonal_fisher(
        net.apply,
        params,
        as_batches(x, y),
        kind="empirical",
        micro_batch_size=4,
        leaves="*/bias",
        progress=False,
    )["params"]

    def log_lik(p, i):
        return jax.nn.log_softmax(net.apply(p, x[i : i + 1]))[0, y[i]]

    want = loop_squared_scores(log_lik, params, x.shape[0])["params"]
    names = jax.tree.leaves(mats_jax.tree.leaf_paths(params))
    proven = {names[b.leaf] for b in find_layers(net.apply, params, x[:4]).biases}
    assert "params/layers/fc/bias" in proven
    for path in (("layers", "fc"), ("embed",), ("head",)):
        g, w = got, want
        for key in path:
            g, w = g[key], w[key]
        np.testing.assert_allclose(g["bias"].f, w["bias"], rtol=1e-4, atol=1e-7)


# --- embedding tables' per-example squares from their lookup ----------------------


class EmbedClassifier(nn.Module):
    """nn.Embed for tokens and positions, a Dense layer, a LayerNorm, mean-pool."""

    vocab: int = 6

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(self.vocab, 3, name="word")(tokens)
        h = h + nn.Embed(4, 3, name="position")(jnp.arange(tokens.shape[1]))[None]
        h = nn.LayerNorm(name="norm")(jnp.tanh(nn.Dense(5, name="up")(h)))
        return nn.Dense(3, name="head")(jnp.mean(h, axis=1))


def test_the_capture_proves_which_tables_are_read_by_one_lookup():
    net = EmbedClassifier()
    tokens = jnp.zeros((5, 4), jnp.int32)
    params = net.init(KEY, tokens)
    names = jax.tree.leaves(mats_jax.tree.leaf_paths(params))
    layers = find_layers(net.apply, params, tokens)
    assert {names[lk.leaf]: lk.index_shape for lk in layers.lookups} == {
        "params/word/embedding": (5, 4),
        "params/position/embedding": (4,),  # a lookup, but not led by the examples
    }
    assert layers.uses[names.index("params/word/embedding")] == ("gather",)
    assert len(layers.eps_shapes) == len(layers.taps) + 2

    p = {"table": jnp.ones((6, 3)), "w": jnp.ones((3, 2))}

    def read_twice(p, t):
        return (p["table"][t] + p["table"][t + 1]) @ p["w"]

    def tied(p, t):  # the table is also the output head
        return p["table"][t] @ p["table"].T

    def transposed_back(p, t):  # two transposes: the table's own axes again
        return p["table"].T.T[t] @ p["w"]

    def columns(p, t):  # a gather along the table's second axis
        return jnp.take(p["table"], t % 3, axis=1).sum(axis=0)[..., None] * p["w"][0]

    def of_the_transpose(p, t):  # rows of the transpose: columns of the table
        return jnp.take(p["table"].T, t % 3, axis=0).sum(axis=-1)[..., None] * p["w"][0]

    def in_a_scan(p, t):
        def body(c, row):
            return c + p["table"][row].sum(axis=-1), None

        return jax.lax.scan(body, jnp.zeros(t.shape[0]), t.T)[0][:, None] * p["w"][0]

    tokens = jnp.zeros((5, 4), jnp.int32)
    assert find_layers(read_twice, p, tokens).lookups == ()
    assert find_layers(tied, p, tokens).lookups == ()
    assert find_layers(columns, p, tokens).lookups == ()
    assert find_layers(in_a_scan, p, tokens).lookups == ()
    assert find_layers(of_the_transpose, p, tokens).lookups == ()
    assert len(find_layers(transposed_back, p, tokens).lookups) == 1


def opaque_table(t):
    # The same values through a product the capture does not read as a
    # lookup: the table takes the vmapped per-example pass (the slow twin).
    return t * 1.0


@pytest.mark.parametrize("kind", ["empirical", "exact"])
@pytest.mark.parametrize("mode", ["fill", "clip"])
def test_a_tables_squares_from_its_lookup_equal_the_per_example_pass_and_a_loop(
    kind, mode
):
    # Tokens repeat within an example (their gradients add before the
    # square), padding positions are masked out of the likelihood, and an
    # index out of range has no gradient ("fill") or reads the last row ("clip").
    vocab, dim = 6, 3
    keys = jax.random.split(jax.random.fold_in(KEY, 41), 3)
    params = {
        "table": jax.random.normal(keys[0], (vocab, dim)),
        "w": jax.random.normal(keys[1], (dim, 4)),
    }
    tokens = jax.random.randint(keys[2], (9, 5), 0, vocab)
    tokens = tokens.at[0].set(jnp.array([1, 1, 1, 2, 1])).at[1, 2].set(vocab + 2)
    mask = (
        jnp.arange(5)[None] < jnp.array([5, 4, 3, 5, 1, 2, 5, 4, 3])[:, None]
    ).astype(jnp.float32)
    labels = jax.random.randint(jax.random.fold_in(KEY, 42), (9,), 0, 4)

    def model(p, t, table=lambda x: x):
        h = jnp.take(table(p["table"]), t, axis=0, mode=mode)
        h = jnp.where(jnp.isnan(h), 0.0, h)  # "fill" reads NaN out of range
        return jnp.tanh(h).sum(axis=1) @ p["w"]

    batches = [{"inputs": tokens, "labels": labels, "mask": mask[:, 0]}]
    call = functools.partial(
        diagonal_fisher, kind=kind, micro_batch_size=4, progress=False
    )
    got = call(model, params, batches)
    twin = call(lambda p, t: model(p, t, opaque_table), params, batches)
    assert len(find_layers(model, params, tokens[:4]).lookups) == 1

    def log_p(p, i):
        return jax.nn.log_softmax(model(p, tokens[i : i + 1]))[0]

    total = jnp.zeros_like(params["table"])
    for i in range(tokens.shape[0]):
        probs = jax.nn.softmax(model(params, tokens[i : i + 1]))[0]
        classes = (
            [(int(labels[i]), 1.0)]
            if kind == "empirical"
            else [(c, float(probs[c])) for c in range(4)]
        )
        for c, weight in classes:
            g = jax.grad(lambda p, c=c, i=i: log_p(p, i)[c])(params)["table"]
            total = total + weight * g**2
    want = total / tokens.shape[0]
    np.testing.assert_allclose(got["table"].f, want, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(got["table"].f, twin["table"].f, rtol=1e-5, atol=1e-9)


def test_a_text_models_tables_in_diagonal_fisher_and_kfacs_fallback_equal_a_loop():
    # nn.Embed with padding masked per position, as text models are fed: the
    # word table from its lookup, the position table (its indices are not
    # the examples') and the LayerNorm from the vmapped pass, against a loop.
    net = EmbedClassifier()
    tokens = jax.random.randint(jax.random.fold_in(KEY, 43), (7, 4), 0, 6)
    tokens = tokens.at[2].set(jnp.array([3, 3, 0, 3]))
    labels = jax.random.randint(jax.random.fold_in(KEY, 44), (7,), 0, 3)
    params = net.init(KEY, tokens)
    batches = [{"inputs": tokens, "labels": labels}]

    def log_lik(p, i):
        return jax.nn.log_softmax(net.apply(p, tokens[i : i + 1]))[0, labels[i]]

    want = loop_squared_scores(log_lik, params, 7)["params"]
    fisher = diagonal_fisher(
        net.apply, params, batches, kind="empirical", micro_batch_size=3, progress=False
    )["params"]
    fallback = kfac(
        net.apply,
        params,
        batches,
        kind="empirical",
        micro_batch_size=3,
        fallback="diagonal",
        progress=False,
    )["params"]
    for stats in (fisher, fallback):
        for name in ("word", "position"):
            np.testing.assert_allclose(
                stats[name]["embedding"].f,
                want[name]["embedding"],
                rtol=1e-5,
                atol=1e-8,
            )
        np.testing.assert_allclose(
            stats["norm"]["scale"].f, want["norm"]["scale"], rtol=1e-5, atol=1e-8
        )
    assert isinstance(fallback["up"]["kernel"], KFAC)
