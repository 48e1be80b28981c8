"""The experiments' LoRA and IA³ fine-tuning: the folded body against the
adapter applied to the activations by hand, and a smoke run of each kind."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_real_model import HAVE_WORDNET, smoke_config

from mats_experiment import adapters, text_pipeline
from mats_jax.tree import leaf_paths

KEY = jax.random.key(0)


def _layer(name):
    k = jax.random.split(jax.random.fold_in(KEY, hash(name) % 1000), 2)
    return {
        "kernel": jax.random.normal(k[0], (4, 6)),
        "bias": jax.random.normal(k[1], (6,)),
    }


BODY = {
    "encoder": {
        "layer": {
            "0": {
                "attention": {
                    "self": {n: _layer(n) for n in ("query", "key", "value")},
                    "output": {"dense": _layer("attn_out")},
                },
                "intermediate": {"dense": _layer("up")},
                "output": {"dense": _layer("down")},
            }
        }
    }
}
X = jax.random.normal(jax.random.fold_in(KEY, 9), (5, 4))


def _module(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def test_ia3_modules_and_the_activations_they_rescale():
    how = adapters.modules("ia3", BODY)
    assert how == {
        "encoder/layer/0/attention/self/key": "ia3_outputs",
        "encoder/layer/0/attention/self/value": "ia3_outputs",
        "encoder/layer/0/output/dense": "ia3_inputs",  # not attention/output/dense
    }
    vectors = {
        m: 1.0
        + 0.3
        * jax.random.normal(
            jax.random.fold_in(KEY, i), (6 if k == "ia3_outputs" else 4,)
        )
        for i, (m, k) in enumerate(how.items())
    }
    folded = adapters.fold("ia3", BODY, vectors)
    for module, kind in how.items():
        before, after = _module(BODY, module), _module(folded, module)
        scales = vectors[module]
        got = X @ after["kernel"] + after["bias"]
        if kind == "ia3_outputs":  # l ⊙ (x W + c)
            want = scales * (X @ before["kernel"] + before["bias"])
        else:  # (x ⊙ l) W + c
            want = (X * scales) @ before["kernel"] + before["bias"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    untouched = _module(folded, "encoder/layer/0/attention/self/query")
    np.testing.assert_array_equal(
        untouched["kernel"],
        BODY["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"],
    )


def test_lora_fold_adds_a_rank_r_change_to_every_kernel_and_starts_at_the_base():
    start = adapters.init("lora", BODY, rank=2, key=KEY)
    assert len(start) == 6
    for a, b in zip(
        jax.tree.leaves(BODY), jax.tree.leaves(adapters.fold("lora", BODY, start))
    ):
        np.testing.assert_array_equal(a, b)  # b = 0: the pretrained body
    trained = jax.tree.map(lambda t: t + 0.1 * jnp.ones_like(t), start)
    folded = adapters.fold("lora", BODY, trained, scale=2.0)
    for module, t in trained.items():
        before, after = _module(BODY, module), _module(folded, module)
        np.testing.assert_allclose(
            X @ after["kernel"],
            X @ before["kernel"] + 2.0 * (X @ t["a"]) @ t["b"],
            rtol=1e-5,
            atol=1e-5,
        )
        assert (
            np.linalg.matrix_rank(
                np.asarray(after["kernel"] - before["kernel"]), tol=1e-4
            )
            <= 2
        )
        np.testing.assert_array_equal(after["bias"], before["bias"])


def test_unknown_kinds_and_missing_keys_are_refused():
    with pytest.raises(ValueError, match="'lora' or 'ia3'"):
        adapters.modules("dora", BODY)
    with pytest.raises(ValueError, match="needs a key"):
        adapters.init("lora", BODY)


@pytest.fixture(scope="module", params=["lora", "ia3"])
def adapter_run(request):
    if not HAVE_WORDNET:
        pytest.skip("Debian wordnet-base not installed")
    kind = request.param
    return kind, text_pipeline.run(
        smoke_config(
            finetune=kind, lora_rank=2, methods=("task_arithmetic", "mats_kfac")
        ),
        keep_models=True,
    )


def test_adapter_fine_tunes_change_only_what_the_adapter_holds(adapter_run):
    kind, results = adapter_run
    (run,) = results["runs"]
    base = run["models"]["pretrained"]
    adapted = adapters.modules(kind, base)
    paths = jax.tree.leaves(leaf_paths(base))
    for tuned in run["models"]["finetuned"].values():
        moved = {
            p
            for p, a, b in zip(
                paths,
                jax.tree.leaves(base),
                jax.tree.leaves(tuned["body"]),
                strict=True,
            )
            if not np.array_equal(np.asarray(a), np.asarray(b))
        }
        assert moved, "training did not move the adapter"
        assert all(p.rpartition("/")[0] in adapted for p in moved)
        if kind == "lora":
            assert all(p.endswith("/kernel") for p in moved)
            for p in moved:
                delta = np.asarray(_module(tuned["body"], p)) - np.asarray(
                    _module(base, p)
                )
                # Rank 2 up to float32 rounding of W + a b.
                sigma = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
                assert sigma[2] < 1e-3 * sigma[0]


def test_ia3_vectors_merged_where_they_were_trained(adapter_run):
    kind, results = adapter_run
    (run,) = results["runs"]
    if kind != "ia3":
        assert not any(k.endswith("_ia3_vectors") for k in run["multitask"])
        return
    assert set(run["multitask"]) >= {
        "task_arithmetic_ia3_vectors",
        "ties_ia3_vectors",
        "block_diagonal_fisher_ia3_vectors",
        "mats_block_fisher_ia3_vectors",
    }
    models = run["models"]
    vectors = [t["adapter"] for t in models["adapters"].values()]
    scale = run["multitask"]["task_arithmetic_ia3_vectors"]["chosen"]["scale"]
    want = adapters.fold(
        "ia3",
        models["pretrained"],
        jax.tree.map(lambda *ls: 1.0 + scale * sum(v - 1.0 for v in ls), *vectors),
    )
    got = models["merged_bodies"]["task_arithmetic_ia3_vectors"]
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6)
    assert "block_fisher" in "".join(run["timings_s"])
