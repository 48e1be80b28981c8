"""Recipes: every method streamed from disk against the in-memory library (the oracle),
overrides, tied leaves, vocabulary policy, and every bad recipe or input."""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo

import mats_jax
from mats_jax import Diagonal, Gram
from mats_jax.io import CheckpointError, load_checkpoint, save_checkpoint
from mats_jax.recipe import RecipeError, load_recipe, parse_recipe
from mats_jax.stream import merge_recipe, plan_merge

WEIGHTS = [1.0, 0.5]


def _model(rng: np.random.Generator, vocab: int = 10) -> dict:
    return {
        "embed": {"embedding": rng.normal(size=(vocab, 4)).astype(np.float32)},
        "fc": {
            "kernel": rng.normal(size=(4, 6)).astype(np.float32),
            "bias": rng.normal(size=(6,)).astype(np.float32),
        },
        "head": {"kernel": rng.normal(size=(6, 3)).astype(np.float32)},
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    rng = np.random.default_rng(0)
    base = _model(rng)
    models = [
        jax.tree.map(
            lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), base
        )
        for _ in WEIGHTS
    ]
    save_checkpoint(d / "base.safetensors", base)
    # Mixed formats: the recipe does not care.
    save_checkpoint(d / "m0.msgpack", models[0])
    save_checkpoint(d / "m1", models[1])  # orbax
    # All safetensors: the engine reads these in blocks.
    for i, m in enumerate(models):
        save_checkpoint(d / f"s{i}.safetensors", m)
    stats: dict[str, list] = {"diag": [], "gram": []}
    for i, m in enumerate(models):
        diag = jax.tree.map(
            lambda x: Diagonal(
                jnp.asarray(rng.uniform(0.1, 1.0, size=x.shape), jnp.float32)
            ),
            m,
        )
        gram = {
            "embed": {"embedding": None},
            "fc": {"kernel": Gram(jnp.asarray(_spd(rng, 4))), "bias": None},
            "head": {"kernel": Gram(jnp.asarray(_spd(rng, 6)))},
        }
        mats_jax.save_statistics(d / f"diag{i}", diag)
        mats_jax.save_statistics(d / f"gram{i}", gram)
        stats["diag"].append(diag)
        stats["gram"].append(gram)
    return d, base, models, stats


def _spd(rng, n):
    a = rng.normal(size=(n, 2 * n)).astype(np.float32)
    return a @ a.T / (2 * n)


def _recipe(
    d,
    method,
    params="{}",
    extra="",
    stats=None,
    weights=WEIGHTS,
    models=("m0.msgpack", "m1"),
):
    text = f"""
base: base.safetensors
models:
  - {{path: {models[0]}, weight: {weights[0]}{f", statistics: {stats}0" if stats else ""}}}
  - {{path: {models[1]}, weight: {weights[1]}{f", statistics: {stats}1" if stats else ""}}}
method: {method}
parameters: {params}
{extra}"""
    return parse_recipe(text, source="recipe.yaml", directory=str(d))


def _dare_with_seed(base, models, seed, **kw):
    # A streamed DARE draws each leaf's masks from key(seed) and the leaf's
    # path, as the in-memory dare does: the same masks.
    return mats_jax.dare(base, models, key=jax.random.key(seed), weights=WEIGHTS, **kw)


CASES = [
    ("average", "{}", None, lambda b, ms, st: mats_jax.average(ms, weights=WEIGHTS)),
    (
        "task_arithmetic",
        "{scale: 0.7}",
        None,
        lambda b, ms, st: mats_jax.task_arithmetic(b, ms, scale=0.7, weights=WEIGHTS),
    ),
    (
        "ties",
        "{density: 0.3}",
        None,
        lambda b, ms, st: mats_jax.ties(b, ms, density=0.3, weights=WEIGHTS),
    ),
    (
        "ties",
        "{density: 0.3, trim: per_leaf, scale: 0.9}",
        None,
        lambda b, ms, st: mats_jax.ties(
            b, ms, density=0.3, trim="per_leaf", scale=0.9, weights=WEIGHTS
        ),
    ),
    (
        "dare",
        "{drop_rate: 0.4, sign_election: true}",
        None,
        lambda b, ms, st: _dare_with_seed(b, ms, 0, drop_rate=0.4, sign_election=True),
    ),
    (
        "fisher_merge",
        "{}",
        "diag",
        lambda b, ms, st: mats_jax.fisher_merge(ms, st["diag"], weights=WEIGHTS).params,
    ),
    (
        "regmean",
        "{alpha: 0.8, fallback: base}",
        "gram",
        lambda b, ms, st: (
            mats_jax.regmean(
                ms, st["gram"], alpha=0.8, weights=WEIGHTS, fallback=b
            ).params
        ),
    ),
    (
        "mats",
        "{maxiter: 20, init: base}",
        "diag",
        lambda b, ms, st: (
            mats_jax.mats(ms, st["diag"], init=b, maxiter=20, weights=WEIGHTS).params
        ),
    ),
    (
        "mats",
        "{maxiter: 50, off_diagonal_scale: 0.7, equalise_scales: true}",
        "gram",
        lambda b, ms, st: (
            mats_jax.mats(
                ms,
                st["gram"],
                maxiter=50,
                weights=WEIGHTS,
                off_diagonal_scale=0.7,
                equalise_scales=True,
            ).params
        ),
    ),
]


@pytest.mark.parametrize(
    "method, params, stats, oracle", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_streamed_recipe_matches_in_memory_merge(
    checkpoints, tmp_path, method, params, stats, oracle
):
    d, base, models, st = checkpoints
    summary = merge_recipe(_recipe(d, method, params, stats=stats), tmp_path / "out")
    got = load_checkpoint(tmp_path / "out")
    want = oracle(base, models, st)
    if method in ("fisher_merge", "regmean", "mats"):
        # The solver batches same-shaped blocks in memory; streaming solves one leaf
        # at a time, so the float rounding may differ slightly.
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            got,
            want,
        )
        assert summary.report  # the per-leaf solver report reaches the model card
        assert "## Solver report" in (tmp_path / "out" / "README.md").read_text()
    else:
        jax.tree.map(
            lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), got, want
        )


@pytest.mark.parametrize("name", sorted(zoo.CASES))
def test_every_registered_method_streams_as_it_merges_in_memory(
    checkpoints, tmp_path, name
):
    # A recipe with the registry case's parameters gives the in-memory merge
    # (seed 0 is key(0) for methods that draw masks).
    _streams_as_in_memory(checkpoints, tmp_path, name, ("m0.msgpack", "m1"))


def _streams_as_in_memory(checkpoints, tmp_path, name, models):
    """Streams registry case ``name`` from the checkpoints named ``models``
    and checks the result against its in-memory merge; returns the recipe."""
    d, base, trees, st = checkpoints
    case = zoo.CASES[name]
    kind = {None: None, Gram: "gram"}.get(case.statistic_type, "diag")
    # Methods that take no weights (SLERP, Model Stock) refuse unequal ones.
    weights = WEIGHTS if case.needs.weights else [1.0, 1.0]
    recipe = _recipe(
        d,
        case.method,
        json.dumps(dict(case.parameters)),
        stats=kind,
        weights=weights,
        models=models,
    )
    merge_recipe(recipe, tmp_path / "out", checksum=None)
    got = load_checkpoint(tmp_path / "out")
    want = case(base, trees, st[kind] if kind else None, weights=weights).params
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if kind else {"rtol": 0, "atol": 0}
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, np.asarray(b), **tolerance),
        got,
        want,
    )
    return recipe


@pytest.mark.parametrize("name", sorted(zoo.CASES))
def test_every_registered_method_streams_from_blocks_as_it_merges_in_memory(
    checkpoints, tmp_path, monkeypatch, name
):
    # From safetensors inputs an elementwise method's leaves are read and
    # merged block by block (buffers reused, a zero-padded last block): with
    # blocks of 8 entries every leaf takes several, and the merge is still the
    # in-memory one, entry for entry. Other methods read whole leaves.
    from mats_jax import stream

    monkeypatch.setattr(stream, "BLOCK_ENTRIES", 8)
    blocked = _blocks_read(monkeypatch)
    recipe = _streams_as_in_memory(
        checkpoints, tmp_path, name, ("s0.safetensors", "s1.safetensors")
    )
    case = zoo.CASES[name]
    method = case.merge_method
    needs = case.needs
    in_blocks = method.elementwise and not (needs.statistics or needs.key)
    paths = sorted(leaf.path for leaf in plan_merge(recipe).leaves)
    assert sorted(blocked) == (paths if in_blocks else [])


def _blocks_read(monkeypatch) -> set[str]:
    """The leaves read in blocks from now on (a spy on ``Checkpoint.read_block``)."""
    from mats_jax.io import Checkpoint

    read: set[str] = set()
    read_block = Checkpoint.read_block

    def spy(self, path, start, out):
        read.add(path)
        return read_block(self, path, start, out)

    monkeypatch.setattr(Checkpoint, "read_block", spy)
    return read


@pytest.mark.parametrize("format", ["safetensors", "msgpack", "orbax"])
def test_blocked_merges_fill_output_buffers_every_writer_can_take(
    checkpoints, tmp_path, monkeypatch, format
):
    # Leaves merged in blocks fill two output buffers in turn while the
    # write thread writes the other; msgpack and orbax keep every leaf until
    # the end, so they get fresh arrays. Either way each leaf is its own.
    from mats_jax import stream

    monkeypatch.setattr(stream, "BLOCK_ENTRIES", 8)
    d, base, models, _ = checkpoints
    recipe = _recipe(
        d,
        "task_arithmetic",
        "{scale: 0.7}",
        extra=f"output: {{format: {format}}}\n",
        models=("s0.safetensors", "s1.safetensors"),
    )
    merge_recipe(recipe, tmp_path / "out", checksum=None)
    want = mats_jax.task_arithmetic(base, models, scale=0.7, weights=WEIGHTS)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)),
        load_checkpoint(tmp_path / "out"),
        want,
    )


def test_blocks_cast_bfloat16_inputs_and_fall_back_for_transposed_leaves(
    tmp_path, monkeypatch
):
    # bfloat16 inputs are read as stored and cast to the compute dtype block
    # by block; a leaf a layout transposes is read whole. Both merge as in
    # memory.
    import ml_dtypes

    blocked = _blocks_read(monkeypatch)
    rng = np.random.default_rng(11)
    bf16 = lambda t: jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), t)  # noqa: E731
    base, a, b = (bf16(_model(rng)) for _ in range(3))
    save_checkpoint(tmp_path / "base.safetensors", base)
    _two(tmp_path, a, b)
    text = (
        "base: base.safetensors\nmodels: [a.safetensors, b.safetensors]\n"
        "method: ties\nparameters: {density: 0.5}\n"
    )
    recipe = parse_recipe(text, source="r.yaml", directory=str(tmp_path))
    merge_recipe(recipe, tmp_path / "out", checksum=None)
    assert blocked == {leaf.path for leaf in plan_merge(recipe).leaves}
    want = mats_jax.ties(base, [a, b], density=0.5)
    jax.tree.map(
        lambda x, y: np.testing.assert_array_equal(x, np.asarray(y)),
        load_checkpoint(tmp_path / "out"),
        want,
    )
    # In PyTorch orientation (out, in) the kernels are transposed on reading.
    torch_names = {"fc/kernel": "fc.weight", "head/kernel": "head.weight"}
    for name, tree in (("base", base), ("a", a), ("b", b)):
        flat = {
            torch_names.get(f"{k}/{j}", f"{k}.{j}"): np.ascontiguousarray(v.T)
            if f"{k}/{j}" in torch_names
            else v
            for k, leaves in tree.items()
            for j, v in leaves.items()
        }
        save_checkpoint(tmp_path / f"hf_{name}.safetensors", flat)
    text = (
        "base: {path: hf_base.safetensors, layout: hf_linear}\n"
        "models: [{path: hf_a.safetensors, layout: hf_linear}, "
        "{path: hf_b.safetensors, layout: hf_linear}]\n"
        "method: ties\nparameters: {density: 0.5}\n"
    )
    recipe = parse_recipe(text, source="r.yaml", directory=str(tmp_path))
    blocked.clear()
    merge_recipe(recipe, tmp_path / "out_hf", checksum=None)
    assert blocked == {"embed/embedding", "fc/bias"}  # not the transposed kernels
    jax.tree.map(
        lambda x, y: np.testing.assert_array_equal(x, np.asarray(y)),
        load_checkpoint(tmp_path / "out_hf", layout="hf_linear"),
        want,
    )


def test_model_card_records_recipe_checksums_and_version(checkpoints, tmp_path):
    import hashlib

    d, *_ = checkpoints
    merge_recipe(_recipe(d, "task_arithmetic"), tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "method: task_arithmetic" in card
    assert f"mats_jax {mats_jax.__version__}" in card
    digest = hashlib.sha256((d / "base.safetensors").read_bytes()).hexdigest()
    assert digest in card
    assert "| `fc/kernel` | [4, 6] | float32 | task_arithmetic |" in card


def test_model_card_blake3_checksums_match_the_blake3_package(tmp_path):
    # The oracle: the blake3 package itself over each whole file, and over the
    # `digest  name` lines of a sharded input (what b3sum prints).
    import hashlib

    import blake3

    rng = np.random.default_rng(7)
    save_checkpoint(
        tmp_path / "base", _model(rng), format="safetensors", max_shard_size=200
    )
    _two(tmp_path, _model(rng), _model(rng))
    shards = sorted(p.name for p in (tmp_path / "base").glob("*.safetensors"))
    assert len(shards) > 1
    text = (
        "base: base\nmodels: [a.safetensors, b.safetensors]\nmethod: task_arithmetic\n"
    )
    recipe = parse_recipe(text, source="r.yaml", directory=str(tmp_path))
    merge_recipe(recipe, tmp_path / "out", checksum="blake3")
    card = (tmp_path / "out" / "README.md").read_text()
    single = (tmp_path / "a.safetensors").read_bytes()
    lines = "".join(
        f"{blake3.blake3((tmp_path / 'base' / f).read_bytes()).hexdigest()}  {f}\n"
        for f in shards
    )
    assert "| input | path | files | bytes | blake3 |" in card
    assert f"| base | `base` | {len(shards)} |" in card  # the shards, not the index
    assert f"`{blake3.blake3(single).hexdigest()}`" in card
    assert f"`{blake3.blake3(lines.encode()).hexdigest()}`" in card
    assert hashlib.sha256(single).hexdigest() not in card


@pytest.mark.parametrize("checksum", ["md5", "SHA256", ""])
def test_unknown_checksum_is_refused_before_any_output(checkpoints, tmp_path, checksum):
    d, *_ = checkpoints
    with pytest.raises(CheckpointError, match=r"unknown checksum .*sha256, blake3"):
        merge_recipe(_recipe(d, "task_arithmetic"), tmp_path / "out", checksum=checksum)
    assert not (tmp_path / "out").exists()


def test_blake3_without_its_package_says_what_to_install(
    checkpoints, tmp_path, monkeypatch
):
    d, *_ = checkpoints
    monkeypatch.setitem(sys.modules, "blake3", None)  # import blake3 fails
    with pytest.raises(CheckpointError, match="pip install blake3"):
        merge_recipe(_recipe(d, "task_arithmetic"), tmp_path / "out", checksum="blake3")
    assert not (tmp_path / "out").exists()


def test_overrides_skip_and_method(checkpoints, tmp_path):
    d, base, models, _ = checkpoints
    extra = """overrides:
  - {pattern: "embed/*", skip: true}
  - {pattern: "re:bias$", method: average}
  - {pattern: "head/*", parameters: {scale: 0.1}}
"""
    merge_recipe(_recipe(d, "task_arithmetic", "{scale: 0.5}", extra), tmp_path / "out")
    got = load_checkpoint(tmp_path / "out")
    np.testing.assert_array_equal(got["embed"]["embedding"], base["embed"]["embedding"])
    np.testing.assert_array_equal(
        got["fc"]["bias"], mats_jax.average(models, weights=WEIGHTS)["fc"]["bias"]
    )
    want = mats_jax.task_arithmetic(base, models, scale=0.1, weights=WEIGHTS)["head"][
        "kernel"
    ]
    np.testing.assert_array_equal(got["head"]["kernel"], want)
    want = mats_jax.task_arithmetic(base, models, scale=0.5, weights=WEIGHTS)["fc"][
        "kernel"
    ]
    np.testing.assert_array_equal(got["fc"]["kernel"], want)


def test_output_layout_and_shards(checkpoints, tmp_path):
    d, _, models, _ = checkpoints
    extra = """output:
  format: safetensors
  max_shard_size: 150B
  layout: [{checkpoint: "{p*}.weight", tree: "{p*}/kernel", transpose: [1, 0], ndim: 2}]
"""
    merge_recipe(_recipe(d, "average", extra=extra), tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    from safetensors.numpy import load_file

    tensors = {}
    for f in os.listdir(tmp_path / "out"):
        if f.endswith(".safetensors"):
            tensors.update(load_file(str(tmp_path / "out" / f)))
    want = mats_jax.average(models, weights=WEIGHTS)
    np.testing.assert_array_equal(
        tensors["fc.weight"], np.asarray(want["fc"]["kernel"]).T
    )
    np.testing.assert_array_equal(
        tensors["embed.embedding"], want["embed"]["embedding"]
    )


@pytest.mark.parametrize("fmt", ["msgpack", "orbax"])
def test_other_output_formats(checkpoints, tmp_path, fmt):
    d, _, models, _ = checkpoints
    merge_recipe(
        _recipe(d, "average", extra=f"output: {{format: {fmt}}}"), tmp_path / "out"
    )
    got = load_checkpoint(tmp_path / "out")
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)),
        got,
        mats_jax.average(models, weights=WEIGHTS),
    )
    assert (tmp_path / "out" / "README.md").exists()


def test_existing_output_refused_and_overwritten(checkpoints, tmp_path):
    d, *_ = checkpoints
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        merge_recipe(_recipe(d, "average"), out)
    assert (out / "keep.txt").read_text() == "mine"
    merge_recipe(_recipe(d, "average"), out, overwrite=True)
    assert sorted(os.listdir(out)) == ["README.md", "model.safetensors"]


def test_interrupted_merge_leaves_no_output(checkpoints, tmp_path, monkeypatch):
    d, *_ = checkpoints
    from mats_jax.io import safetensors as st

    calls = {"n": 0}
    original = st.SafetensorsWriter.write

    def failing(self, name, array):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("interrupted mid-write")
        original(self, name, array)

    monkeypatch.setattr(st.SafetensorsWriter, "write", failing)
    with pytest.raises(KeyboardInterrupt):
        merge_recipe(_recipe(d, "average"), tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_inputs_are_not_modified(checkpoints, tmp_path):
    d, *_ = checkpoints
    before = {f: os.stat(d / f).st_mtime_ns for f in os.listdir(d)}
    merge_recipe(_recipe(d, "ties", "{density: 0.5}"), tmp_path / "out")
    assert {f: os.stat(d / f).st_mtime_ns for f in os.listdir(d)} == before


# --- tied leaves and vocabularies ------------------------------------------


def _two(tmp_path, a, b):
    save_checkpoint(tmp_path / "a.safetensors", a)
    save_checkpoint(tmp_path / "b.safetensors", b)


def test_missing_leaf_named_with_what_to_do(tmp_path):
    rng = np.random.default_rng(1)
    a = _model(rng)
    b = {k: v for k, v in _model(rng).items() if k != "head"}
    _two(tmp_path, a, b)
    recipe = parse_recipe(
        "models: [a.safetensors, b.safetensors]\nmethod: average\n",
        source="r.yaml",
        directory=str(tmp_path),
    )
    with pytest.raises(
        CheckpointError,
        match=r"leaf 'head/kernel' is in models\[0\] .*a\.safetensors.* but not in models\[1\] .*b\.safetensors.*tied:.*skip: true",
    ):
        plan_merge(recipe)


def test_tied_head_read_from_the_embedding(tmp_path):
    rng = np.random.default_rng(2)
    a = {
        "embed": {"weight": rng.normal(size=(5, 3)).astype(np.float32)},
        "lm_head": {"weight": rng.normal(size=(5, 3)).astype(np.float32)},
    }
    b = {
        "embed": {"weight": rng.normal(size=(5, 3)).astype(np.float32)}
    }  # ties its head
    _two(tmp_path, a, b)
    text = "models: [a.safetensors, b.safetensors]\nmethod: average\n"
    with pytest.raises(
        CheckpointError,
        match=r"'lm_head/weight'.*not in models\[1\].*'embed/weight', which looks like the tied matrix",
    ):
        plan_merge(parse_recipe(text, source="r.yaml", directory=str(tmp_path)))
    recipe = parse_recipe(
        text + "tied: {lm_head/weight: embed/weight}\n",
        source="r.yaml",
        directory=str(tmp_path),
    )
    merge_recipe(recipe, tmp_path / "out")
    got = load_checkpoint(tmp_path / "out")
    np.testing.assert_allclose(
        got["lm_head"]["weight"], (a["lm_head"]["weight"] + b["embed"]["weight"]) / 2
    )
    assert (
        "reads it from its tied leaf 'embed/weight'"
        in (tmp_path / "out" / "README.md").read_text()
    )


def test_vocab_sizes_refused_by_default_and_shared_rows_on_request(tmp_path):
    rng = np.random.default_rng(3)
    a, b = _model(rng, vocab=10), _model(rng, vocab=12)
    _two(tmp_path, a, b)
    text = "models: [a.safetensors, b.safetensors]\nmethod: average\n"
    with pytest.raises(
        CheckpointError,
        match=r"leaf 'embed/embedding': sizes differ along axis 0.*\(10, 4\).*a\.safetensors.*\(12, 4\).*b\.safetensors.*vocab: shared_rows",
    ):
        plan_merge(parse_recipe(text, source="r.yaml", directory=str(tmp_path)))
    merge_recipe(
        parse_recipe(
            text + "vocab: shared_rows\n", source="r.yaml", directory=str(tmp_path)
        ),
        tmp_path / "out",
    )
    got = load_checkpoint(tmp_path / "out")["embed"]["embedding"]
    np.testing.assert_allclose(
        got, (a["embed"]["embedding"] + b["embed"]["embedding"][:10]) / 2
    )


def test_other_shape_mismatch_and_dtype_mismatch(tmp_path):
    rng = np.random.default_rng(4)
    a, b = _model(rng), _model(rng)
    b["fc"]["kernel"] = np.zeros((5, 7), np.float32)
    _two(tmp_path, a, b)
    text = "models: [a.safetensors, b.safetensors]\nmethod: average\n"
    with pytest.raises(CheckpointError, match="'fc/kernel': shapes differ"):
        plan_merge(parse_recipe(text, source="r.yaml", directory=str(tmp_path)))
    b = _model(rng)
    b["fc"]["bias"] = b["fc"]["bias"].astype(np.int32)
    (tmp_path / "x").mkdir()
    _two(tmp_path / "x", a, b)
    with pytest.raises(
        CheckpointError,
        match=r"'fc/bias': floating in some inputs and not in others.*int32.*take",
    ):
        plan_merge(parse_recipe(text, source="r.yaml", directory=str(tmp_path / "x")))


def test_nan_in_a_leaf_named_by_path(tmp_path):
    rng = np.random.default_rng(5)
    a, b = _model(rng), _model(rng)
    b["fc"]["bias"][2] = np.nan
    _two(tmp_path, a, b)
    recipe = parse_recipe(
        "models: [a.safetensors, b.safetensors]\nmethod: average\n",
        source="r.yaml",
        directory=str(tmp_path),
    )
    with pytest.raises(CheckpointError, match=r"'fc/bias'.*NaN"):
        merge_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- recipe validation: file:line messages, before any tensor is read ------


@pytest.mark.parametrize(
    "text, match",
    [
        (
            "models: [a]\nmethod: average\nparamters: {}\n",
            r"r\.yaml:3: unknown key 'paramters' in the recipe; did you mean 'parameters'\?",
        ),
        (
            "models: [a]\nmethod: avrage\n",
            r"r\.yaml:2: unknown method 'avrage'; did you mean 'average'\?",
        ),
        (
            "models:\n  - {path: a, wieght: 2}\nmethod: average\n",
            r"r\.yaml:2: unknown key 'wieght' in models\[0\]; did you mean 'weight'\?",
        ),
        (
            "models: [a]\nmethod: ties\nparameters: {density: 0.2}\n",
            r"r\.yaml:3: ties needs a base model",
        ),
        (
            "models: [{path: a, statistics: s}]\nmethod: mats\n"
            "parameters: {init: {method: task_arithmetic, scale: 0.3}}\n",
            r"r\.yaml:3: mats needs a base model \(for its init or fallback\)",
        ),
        (
            "base: b\nmodels: [a]\nmethod: task_arithmetic\nparameters: {scale: .nan}\n",
            r"r\.yaml:4: task_arithmetic parameters: scale must be a finite number",
        ),
        (
            "base: b\nmodels: [{path: a, statistics: s}]\nmethod: mats\n"
            "parameters: {init: {method: regmean}}\n",
            r"r\.yaml:4: mats parameters: init must be 'average', 'base' or \{method: <one of "
            r"average, task_arithmetic, ties, dare\b",
        ),
        (
            "base: b\nmodels: [a]\nmethod: ties\nparameters: {density: 1.5}\n",
            r"r\.yaml:4: ties parameters: .*density",
        ),
        (
            "base: b\nmodels: [a]\nmethod: ties\nparameters: {densty: 0.5}\n",
            r"r\.yaml:4: ties parameters: ties has no parameter 'densty'; did you mean 'density'\?",
        ),
        (
            "models: [a]\nmethod: mats\n",
            r"r\.yaml:1: mats needs statistics for every model",
        ),
        (
            "models: [a]\nmethod: average\noverrides:\n  - {pattern: x, methd: average}\n",
            r"r\.yaml:4: unknown key 'methd' in overrides\[0\]",
        ),
        (
            "models: [{path: a, weight: -1}]\nmethod: average\n",
            r"r\.yaml:1: models\[0\] weight must be finite and >= 0",
        ),
        (
            "models: [a]\nmethod: average\noutput: {format: pickle}\n",
            r"r\.yaml:3: output format must be one of",
        ),
        (
            "models: [a]\nmethod: average\nvocab: truncate\n",
            r"r\.yaml:3: vocab must be one of",
        ),
        (
            "models: []\nmethod: average\n",
            r"r\.yaml:1: models must be a non-empty list",
        ),
        ("method: average\n", r"r\.yaml:1: the recipe needs the key 'models'"),
        ("models: [a\nmethod: average\n", r"r\.yaml:\d+: not valid YAML"),
        (
            "models: [a]\nmethod: average\nlayouts: {hf: [{checkpoint: '{p*}.w', tree: '{q*}/k'}]}\n",
            r"r\.yaml:3: layout 'hf': .*same placeholders",
        ),
    ],
)
def test_bad_recipe_points_at_the_line(text, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(text, source="r.yaml", directory="/nonexistent")


def test_pattern_that_matches_nothing_points_at_its_line(checkpoints):
    d, *_ = checkpoints
    extra = "overrides:\n  - {pattern: '*/kernal', skip: true}\n"
    with pytest.raises(
        CheckpointError,
        match=r"recipe\.yaml:9: override pattern '\*/kernal' matches no leaf",
    ):
        plan_merge(_recipe(d, "average", extra=extra))


def test_missing_and_truncated_checkpoint_point_at_the_recipe(checkpoints, tmp_path):
    d, *_ = checkpoints
    text = "models: [nope.safetensors, {path: bad.safetensors}]\nmethod: average\n"
    with pytest.raises(
        CheckpointError,
        match=r"r\.yaml:1: models\[0\]: .*nope\.safetensors: no such file",
    ):
        plan_merge(parse_recipe(text, source="r.yaml", directory=str(tmp_path)))
    data = (d / "base.safetensors").read_bytes()
    (tmp_path / "nope.safetensors").write_bytes(data)
    (tmp_path / "bad.safetensors").write_bytes(data[:-10])
    with pytest.raises(
        CheckpointError,
        match=r"models\[1\]: .*bad\.safetensors: not a readable safetensors file.*truncated",
    ):
        plan_merge(parse_recipe(text, source="r.yaml", directory=str(tmp_path)))


def test_load_recipe_resolves_paths_next_to_the_file(checkpoints, tmp_path):
    d, *_ = checkpoints
    (d / "r.yaml").write_text(
        "models: [m0.msgpack, m1]\nmethod: average\noutput: merged\n"
    )
    recipe = load_recipe(d / "r.yaml")
    assert recipe.models[0].path == str(d / "m0.msgpack")
    assert recipe.output.path == str(d / "merged")


@pytest.mark.parametrize("trim", ["global", "per_leaf"])
def test_ties_merged_in_row_blocks_matches_in_memory(
    checkpoints, tmp_path, monkeypatch, trim
):
    from mats_jax import stream

    monkeypatch.setattr(stream, "ROW_BLOCK_ENTRIES", 7)  # blocks of one or two rows
    d, base, models, _ = checkpoints
    merge_recipe(
        _recipe(d, "ties", f"{{density: 0.4, trim: {trim}}}"), tmp_path / "out"
    )
    want = mats_jax.ties(base, models, density=0.4, trim=trim, weights=WEIGHTS)
    got = load_checkpoint(tmp_path / "out")
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), got, want
    )


def test_skip_copies_the_base_when_a_model_lacks_the_leaf(tmp_path):
    rng = np.random.default_rng(6)
    base = _model(rng)
    a = _model(rng)
    b = {k: v for k, v in _model(rng).items() if k != "head"}
    save_checkpoint(tmp_path / "base.safetensors", base)
    _two(tmp_path, a, b)
    text = (
        "base: base.safetensors\nmodels: [a.safetensors, b.safetensors]\n"
        "method: task_arithmetic\noverrides: [{pattern: head/kernel, skip: true}]\n"
    )
    merge_recipe(
        parse_recipe(text, source="r.yaml", directory=str(tmp_path)),
        tmp_path / "out",
        checksum=None,
    )
    got = load_checkpoint(tmp_path / "out")
    np.testing.assert_array_equal(got["head"]["kernel"], base["head"]["kernel"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "skipped: copied from base" in card and "not computed" in card


def test_missing_statistics_point_at_the_recipe_line(checkpoints):
    d, *_ = checkpoints
    recipe = _recipe(d, "fisher_merge", stats="no_such_stats")
    with pytest.raises(
        CheckpointError,
        match=r"recipe\.yaml:4: models\[0\] statistics: .*no_such_stats0: no statistics checkpoint there",
    ):
        plan_merge(recipe)
