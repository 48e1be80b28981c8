"""Pytree utilities: paths, selection, arithmetic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mats_jax import tree

PARAMS = {
    "encoder": {
        "layers_0": {
            "attention": {"query": {"kernel": jnp.ones((2, 2))}},
            "norm": {"scale": jnp.ones(2)},
        }
    },
    "head": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
}


def test_leaf_paths_are_slash_joined():
    paths = tree.leaf_paths(PARAMS)
    assert (
        paths["encoder"]["layers_0"]["attention"]["query"]["kernel"]
        == "encoder/layers_0/attention/query/kernel"
    )
    assert tree.leaf_paths({"a": [jnp.ones(1), jnp.ones(1)]})["a"][1] == "a/1"
    assert tree.path_str(()) == "<root>"


@pytest.mark.parametrize(
    ("pattern", "selected"),
    [
        ("*/kernel", {"encoder/layers_0/attention/query/kernel", "head/kernel"}),
        ("head/*", {"head/kernel", "head/bias"}),
        (
            "re:query|norm",
            {"encoder/layers_0/attention/query/kernel", "encoder/layers_0/norm/scale"},
        ),
        (["head/bias", "*/scale"], {"head/bias", "encoder/layers_0/norm/scale"}),
    ],
)
def test_select_by_pattern(pattern, selected):
    mask = tree.select(PARAMS, pattern)
    got = {
        p
        for p, m in zip(jax.tree.leaves(tree.leaf_paths(PARAMS)), jax.tree.leaves(mask))
        if m
    }
    assert got == selected


def test_select_rejects_a_pattern_that_matches_nothing():
    with pytest.raises(
        ValueError,
        match="'decoder/\\*' matches no leaf; the leaves are: encoder/layers_0",
    ):
        tree.select(PARAMS, "decoder/*")


def test_labels_by_pattern_first_rule_wins():
    labels = tree.labels_by_pattern(
        PARAMS, [("head/*", "keep"), ("*/kernel", "kfac")], default="average"
    )
    assert labels["head"]["kernel"] == "keep"
    assert labels["encoder"]["layers_0"]["attention"]["query"]["kernel"] == "kfac"
    assert labels["encoder"]["layers_0"]["norm"]["scale"] == "average"


def test_arithmetic_keeps_dtype_and_computes_in_float32():
    a = {"w": jnp.array([1.0, 2.0], jnp.bfloat16)}
    assert tree.scale(0.5, a)["w"].dtype == jnp.bfloat16
    vectors = tree.task_vectors(a, [{"w": jnp.array([1.5, 2.0], jnp.bfloat16)}])
    assert vectors[0]["w"].dtype == jnp.float32
    np.testing.assert_allclose(vectors[0]["w"], [0.5, 0.0])
    np.testing.assert_allclose(
        tree.weighted_sum(jnp.array([2.0, 1.0]), [a, a])["w"], [3.0, 6.0]
    )
    assert float(tree.vdot(a, a)) == 5.0
    np.testing.assert_allclose(
        tree.sub(tree.add(a, a), a)["w"].astype(jnp.float32), [1.0, 2.0]
    )
