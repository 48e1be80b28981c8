"""Model Stock against a float64 numpy twin of the paper's formula,
hand-computed ratios, zero and opposed task vectors, filter-wise angles, and
bad inputs."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mats_jax as mj

ROOT = Path(__file__).resolve().parent.parent


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    """The cosine of two vectors in float64, 0 if either is zero."""
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    return 0.0 if nx == 0 or ny == 0 else float(x @ y / (nx * ny))


def ratio_oracle(vectors: list[np.ndarray]) -> float:
    """t = k cos / ((k − 1) cos + 1), cos the mean pairwise cosine clipped to [0, 1]."""
    k = len(vectors)
    flat = [np.asarray(v, np.float64).reshape(-1) for v in vectors]
    pairs = [cosine(flat[m], flat[n]) for m in range(k) for n in range(m + 1, k)]
    cos = min(max(float(np.mean(pairs)), 0.0), 1.0)
    return k * cos / ((k - 1) * cos + 1)


def model_stock_oracle(
    base: np.ndarray, models: list[np.ndarray], filter_wise: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Model Stock of one leaf in float64: the merged leaf and its ratio(s)."""
    b = np.asarray(base, np.float64)
    vectors = [np.asarray(m, np.float64) - b for m in models]
    mean = sum(vectors) / len(vectors)
    if filter_wise and b.ndim >= 2:
        t = np.array(
            [ratio_oracle([v[..., j] for v in vectors]) for j in range(b.shape[-1])]
        )
    else:
        t = np.array(ratio_oracle(vectors))
    return b + t * mean, t


def tree(x: np.ndarray) -> dict:
    return {"k": jnp.asarray(x)}


def test_hand_computed_ratio_for_two_models_at_sixty_degrees():
    # cos θ = 1/2, k = 2: t = 2 · ½ / (½ + 1) = 2/3; the mean task vector is
    # (1.5, √3/2), so the merge is base + (1, 1/√3).
    base = np.array([1.0, -1.0], np.float32)
    models = [base + np.array([2.0, 0.0]), base + np.array([1.0, np.sqrt(3.0)])]
    got = mj.model_stock({"w": base}, [{"w": m.astype(np.float32)} for m in models])
    np.testing.assert_allclose(
        got["w"], base + np.array([1.0, 1 / np.sqrt(3.0)]), rtol=1e-6
    )
    ratios = mj.model_stock_ratios(
        {"w": base}, [{"w": m.astype(np.float32)} for m in models]
    )
    np.testing.assert_allclose(ratios["w"], 2 / 3, rtol=1e-6)


def test_hand_computed_ratio_for_three_models():
    # Three task vectors at 90° from each other: mean cosine 0, the base.
    base = np.zeros(3, np.float32)
    eye = np.eye(3, dtype=np.float32)
    got = mj.model_stock({"w": base}, [{"w": e} for e in eye])
    np.testing.assert_array_equal(got["w"], base)
    # Three at 60° from each other, cosine ½ for each pair:
    # t = 3 · ½ / (2 · ½ + 1) = 3/4.
    sixty = ((1 - eye) / np.sqrt(2.0)).astype(np.float32)
    assert np.allclose(sixty @ sixty.T, [[1, 0.5, 0.5], [0.5, 1, 0.5], [0.5, 0.5, 1]])
    ratios = mj.model_stock_ratios({"w": base}, [{"w": v} for v in sixty])
    np.testing.assert_allclose(ratios["w"], 0.75, rtol=1e-6)
    got = mj.model_stock({"w": base}, [{"w": v} for v in sixty])
    np.testing.assert_allclose(got["w"], 0.75 * sixty.mean(0), rtol=1e-6)


def test_identical_task_vectors_give_their_model():
    base = np.array([0.5, 1.0, -2.0], np.float32)
    model = base + np.array([1.0, -1.0, 3.0], np.float32)
    got = mj.model_stock({"w": base}, [{"w": model}] * 3)
    np.testing.assert_allclose(got["w"], model, rtol=1e-6, atol=1e-6)


def test_a_zero_task_vector_counts_as_orthogonal():
    base = np.ones(2, np.float32)
    moved = base + np.array([3.0, 4.0], np.float32)
    # k = 2, one model equal to the base: cos θ counts 0, t = 0, the base.
    got = mj.model_stock({"w": base}, [{"w": moved}, {"w": base}])
    np.testing.assert_array_equal(got["w"], base)
    # k = 3, two equal task vectors and a zero one: cosines (1, 0, 0), mean
    # 1/3, t = 3 · ⅓ / (2 · ⅓ + 1) = 3/5; the mean task vector is ⅔ τ.
    got = mj.model_stock({"w": base}, [{"w": moved}, {"w": moved}, {"w": base}])
    np.testing.assert_allclose(
        got["w"], base + 0.6 * (2 / 3) * (moved - base), rtol=1e-6
    )


def test_copies_of_the_base_return_the_base_exactly():
    base = {"a": jnp.array([1.5, -2.0]), "b": jnp.ones((2, 3), jnp.bfloat16)}
    for filter_wise in (False, True):
        got = mj.model_stock(base, [base] * 3, filter_wise=filter_wise)
        for key in base:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(base[key]))
            assert got[key].dtype == base[key].dtype


def test_opposed_task_vectors_are_clipped_to_the_base():
    # cos θ = −1 with k = 2 would divide by zero ((k − 1) cos θ + 1 = 0);
    # cos θ = −0.5 would give t = −2. Clipped at 0: t = 0, the base.
    base = np.zeros(2, np.float32)
    tau = np.array([1.0, 2.0], np.float32)
    got = mj.model_stock({"w": base}, [{"w": tau}, {"w": -tau}])
    np.testing.assert_array_equal(got["w"], base)
    other = np.array([-2.0, 0.0], np.float32) + 0.5 * np.array([0.0, 1.0], np.float32)
    assert cosine(tau, other) < 0
    got = mj.model_stock({"w": base}, [{"w": tau}, {"w": other}])
    np.testing.assert_array_equal(got["w"], base)
    assert np.all(np.isfinite(got["w"]))


MODELS = st.integers(2, 4)


@settings(max_examples=40, deadline=None)
@given(
    k=MODELS,
    seed=st.integers(0, 2**16),
    shared=st.floats(0.0, 2.0),
    filter_wise=st.booleans(),
    shape=st.sampled_from([(5,), (3, 4), (2, 3, 4)]),
)
def test_model_stock_matches_the_float64_formula(k, seed, shared, filter_wise, shape):
    # Task vectors with a shared component (cosines spread over [−, +]).
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(np.float32)
    common = rng.normal(size=shape)
    models = [
        (base + shared * common + rng.normal(size=shape)).astype(np.float32)
        for _ in range(k)
    ]
    got = mj.model_stock(tree(base), [tree(m) for m in models], filter_wise=filter_wise)
    want, t = model_stock_oracle(base, models, filter_wise)
    np.testing.assert_allclose(got["k"], want, rtol=1e-5, atol=1e-5)
    ratios = mj.model_stock_ratios(
        tree(base), [tree(m) for m in models], filter_wise=filter_wise
    )
    np.testing.assert_allclose(ratios["k"], t, rtol=1e-5, atol=1e-6)
    assert np.all((0 <= np.asarray(ratios["k"])) & (np.asarray(ratios["k"]) <= 1))


@pytest.mark.parametrize("shape", [(10, 3), (7, 2), (9,), (5, 3, 4)])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_ratio_summed_over_chunks_of_rows_matches_the_formula(
    monkeypatch, shape, filter_wise
):
    # The ratio's sums run over chunks of rows (no leaf-sized temporaries):
    # with 4 entries per chunk these leaves take a loop of chunks and a
    # shorter last one. One model equals the base in its first rows only,
    # another is scaled far beyond float32's squares (1e30).
    import importlib

    module = importlib.import_module("mats_jax.merge.model_stock")
    monkeypatch.setattr(module, "CHUNK_ENTRIES", 4)
    jax.clear_caches()  # traced before with the default chunk
    rng = np.random.default_rng(sum(shape))
    base = rng.normal(size=shape).astype(np.float32)
    models = [(base + rng.normal(size=shape)).astype(np.float32) for _ in range(3)]
    models[0][:2] = base[:2]
    models[2] = (base + 1e30 * rng.normal(size=shape)).astype(np.float32)
    got = mj.model_stock(tree(base), [tree(m) for m in models], filter_wise=filter_wise)
    want, t = model_stock_oracle(base, models, filter_wise)
    np.testing.assert_allclose(got["k"], want, rtol=1e-5, atol=1e-5)
    vectors = [jnp.asarray(m - base) for m in models]
    np.testing.assert_allclose(
        module.model_stock_ratio(vectors, filter_wise), t, rtol=1e-5, atol=1e-6
    )
    jax.clear_caches()


def test_filter_wise_takes_one_angle_per_output_column():
    # Column 0: both tasks move it the same way (t = 1); column 1: orthogonal
    # changes (t = 0).
    base = np.zeros((2, 2), np.float32)
    a = np.array([[1.0, 1.0], [0.0, 0.0]], np.float32)
    b = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    got = mj.model_stock({"k": base}, [{"k": a}, {"k": b}], filter_wise=True)
    np.testing.assert_allclose(got["k"], [[1.0, 0.0], [0.0, 0.0]], atol=1e-7)
    ratios = mj.model_stock_ratios({"k": base}, [{"k": a}, {"k": b}], filter_wise=True)
    np.testing.assert_allclose(ratios["k"], [1.0, 0.0], atol=1e-7)
    # One angle over the whole leaf: cos = 1/2, t = 2/3 for every column.
    whole = mj.model_stock({"k": base}, [{"k": a}, {"k": b}])
    np.testing.assert_allclose(whole["k"], (2 / 3) * (a + b) / 2, rtol=1e-6)


def test_filter_wise_on_a_vector_is_one_angle_for_the_leaf():
    rng = np.random.default_rng(1)
    base = rng.normal(size=6).astype(np.float32)
    models = [rng.normal(size=6).astype(np.float32) + base for _ in range(3)]
    per_leaf = mj.model_stock({"b": base}, [{"b": m} for m in models])
    filter_wise = mj.model_stock(
        {"b": base}, [{"b": m} for m in models], filter_wise=True
    )
    np.testing.assert_array_equal(filter_wise["b"], per_leaf["b"])


def test_model_stock_under_jit():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(3, 2)).astype(np.float32)
    models = [base + rng.normal(size=(3, 2)).astype(np.float32) + 1 for _ in range(3)]
    merge = jax.jit(lambda b, ms: mj.model_stock(b, ms))
    got = merge(tree(base), [tree(m) for m in models])["k"]
    np.testing.assert_allclose(got, model_stock_oracle(base, models)[0], rtol=1e-5)


def test_one_model_is_refused():
    with pytest.raises(
        mj.MergeInputError, match="model_stock merges at least 2 models, got 1"
    ):
        mj.model_stock({"w": jnp.zeros(2)}, [{"w": jnp.ones(2)}])
    with pytest.raises(
        mj.MergeInputError, match="model_stock merges at least 2 models, got 1"
    ):
        mj.model_stock_ratios({"w": jnp.zeros(2)}, [{"w": jnp.ones(2)}])


def test_the_base_is_required():
    with pytest.raises(mj.MergeInputError, match="model_stock needs the base model"):
        mj.merge_pytrees("model_stock", models=[{"w": jnp.ones(2)}] * 2)


def test_weights_that_differ_are_refused_and_equal_ones_taken():
    base, models = {"w": jnp.zeros(2)}, [{"w": jnp.ones(2)}, {"w": jnp.eye(2)[0]}]
    with pytest.raises(
        mj.MergeInputError, match=r"model_stock does not weigh its models.*\[1.0, 2.0\]"
    ):
        mj.merge_pytrees("model_stock", base=base, models=models, weights=[1.0, 2.0])
    equal = mj.merge_pytrees(
        "model_stock", base=base, models=models, weights=[3.0, 3.0]
    )
    np.testing.assert_array_equal(equal.params["w"], mj.model_stock(base, models)["w"])
    assert equal.report["w"].solver == "model_stock"


def test_filter_wise_must_be_a_bool():
    with pytest.raises(mj.MergeInputError, match="filter_wise must be True or False"):
        mj.get_method("model_stock").parameters(filter_wise="yes")


def test_the_docs_page_examples_run():
    text = (ROOT / "docs" / "methods" / "model_stock.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/methods/model_stock.md", "exec"), {})


def test_unclipped_ratio_is_the_formula_as_written_and_keeps_the_base_at_the_pole():
    # Task vectors at cos θ = −0.2 (k = 2): mergekit's unclipped ratio
    # t = 2·(−0.2) / (1 − 0.2) = −0.5; the clipped default gives the base.
    a = np.array([1.0, 0.0], np.float32)
    b = np.array([-0.2, np.sqrt(1 - 0.04)], np.float32)
    base = {"w": jnp.zeros(2)}
    models = [{"w": jnp.asarray(a)}, {"w": jnp.asarray(b)}]
    got = mj.model_stock(base, models, clip_cosine=False)["w"]
    np.testing.assert_allclose(got, -0.5 * (a + b) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mj.model_stock(base, models)["w"], np.zeros(2))
    # cos θ = −1 with k = 2: the denominator vanishes, the leaf keeps the base.
    opposite = [{"w": jnp.asarray(a)}, {"w": jnp.asarray(-a)}]
    np.testing.assert_array_equal(
        mj.model_stock(base, opposite, clip_cosine=False)["w"], np.zeros(2)
    )


def test_merge_of_a_large_leaf_holds_no_leaf_sized_temporary():
    # XLA keeps a value read by several reductions (a task vector over its
    # largest magnitude) as a temporary of the leaf's size; the ratio's sums
    # over chunks of rows keep them chunk-sized. Compiled, not run: 125 MiB
    # leaves, three models (before: 625 MiB of temporaries).
    leaf = jax.ShapeDtypeStruct((32000, 1024), jnp.float32)

    def merge(base, *models):
        return mj.model_stock(
            {"w": base}, [{"w": m} for m in models], clip_cosine=False
        )["w"]

    compiled = jax.jit(merge).lower(leaf, leaf, leaf, leaf).compile()
    temporaries = compiled.memory_analysis().temp_size_in_bytes
    assert temporaries < 32000 * 1024 * 4 / 4, temporaries
