"""mergekit recipes run by ``mats-jax merge``: every mergekit method we share,
written in the forms mergekit documents (per-model weights and densities,
layer gradients, filtered parameters), streamed from a Hugging Face-named
checkpoint and checked leaf by leaf against the in-memory library with the
parameters mergekit's semantics give that leaf."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import mats_jax
from mats_jax.cli import main
from mats_jax.io import load_checkpoint, save_checkpoint
from mats_jax.mergekit import MERGEKIT_METHODS, convert_mergekit, read_recipe
from mats_jax.recipe import RecipeError, parse_recipe
from mats_jax.stream import merge_recipe
from mats_jax.tree import leaf_paths

LAYERS = 3


def _llama(rng: np.random.Generator) -> dict:
    """A tiny Llama-named checkpoint (dotted names as Hugging Face writes them)."""
    tree: dict = {
        "model.embed_tokens.weight": rng.normal(size=(8, 4)),
        "model.norm.weight": rng.normal(size=(4,)),
        "lm_head.weight": rng.normal(size=(8, 4)),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tree[p + "self_attn.q_proj.weight"] = rng.normal(size=(4, 4))
        tree[p + "mlp.up_proj.weight"] = rng.normal(size=(6, 4))
        tree[p + "input_layernorm.weight"] = rng.normal(size=(4,))
    return {k: np.asarray(v, np.float32) for k, v in tree.items()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("mergekit")
    rng = np.random.default_rng(0)
    base = _llama(rng)
    save_checkpoint(d / "base.safetensors", base)
    for i in range(3):
        tuned = {
            k: v + 0.3 * rng.normal(size=v.shape).astype(np.float32)
            for k, v in base.items()
        }
        save_checkpoint(d / f"m{i}.safetensors", tuned)
    trees = {
        n: load_checkpoint(d / f"{n}.safetensors") for n in ("base", "m0", "m1", "m2")
    }
    return d, trees


def _position(path: str) -> float:
    parts = path.split("/")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1]) / (LAYERS - 1)
    return 0.0 if "embed" in path else 1.0


def _grad(values, path):
    return float(np.interp(_position(path), np.linspace(0, 1, len(values)), values))


def _expect(trees, path, method, models, *, base=True, weights=None, **params):
    """The in-memory merge's value of leaf ``path`` with these parameters."""
    needs = mats_jax.get_method(method).needs(
        mats_jax.get_method(method).parameters(**params)
    )
    result = mats_jax.merge_pytrees(
        method,
        models=[trees[m] for m in models],
        base=trees["base"] if needs.base and base else None,
        weights=weights,
        key=jax.random.key(0) if needs.key else None,
        **params,
    ).params
    node = result
    for part in path.split("/"):
        node = node[part]
    return np.asarray(node)


# name -> (mergekit YAML, expected(trees, path) -> array)
CASES = {
    "linear": (
        """
models:
  - {model: m0.safetensors, parameters: {weight: 1.0}}
  - {model: m1.safetensors, parameters: {weight: 0.3}}
  - {model: m2.safetensors, parameters: {weight: 0.5}}
merge_method: linear
dtype: float32
""",
        lambda t, p: _expect(
            t, p, "average", ["m0", "m1", "m2"], weights=[1.0, 0.3, 0.5]
        ),
    ),
    "task_arithmetic": (
        """
base_model: base.safetensors
models:
  - {model: m0.safetensors, parameters: {weight: 0.7}}
  - {model: m1.safetensors, parameters: {weight: 0.4}}
merge_method: task_arithmetic
""",
        lambda t, p: _expect(t, p, "task_arithmetic", ["m0", "m1"], weights=[0.7, 0.4]),
    ),
    "ties_per_layer_weights_and_densities": (
        """
models:
  - model: m0.safetensors
    parameters: {density: [0.8, 0.3, 0.1], weight: [1.0, 0.8, 0.5]}
  - model: m1.safetensors
    parameters: {density: [0.1, 0.4, 0.1], weight: [0.2, 0.8, 0.1]}
  - model: m2.safetensors
    parameters: {density: [0.1, 0.2, 0.6], weight: [0.5, 0.8, 1.0]}
merge_method: ties
base_model: base.safetensors
parameters: {normalize: true}
dtype: float32
""",
        lambda t, p: _expect(
            t,
            p,
            "ties",
            ["m0", "m1", "m2"],
            trim="per_leaf",
            density=tuple(
                _grad(d, p) for d in ([0.8, 0.3, 0.1], [0.1, 0.4, 0.1], [0.1, 0.2, 0.6])
            ),
            weights=[
                _grad(w, p) for w in ([1.0, 0.8, 0.5], [0.2, 0.8, 0.1], [0.5, 0.8, 1.0])
            ],
        ),
    ),
    "dare_ties": (
        """
models:
  - model: base.safetensors
  - {model: m0.safetensors, parameters: {density: 0.53, weight: 0.4}}
  - {model: m1.safetensors, parameters: {density: 0.53, weight: 0.3}}
merge_method: dare_ties
base_model: base.safetensors
parameters: {int8_mask: true}
dtype: float32
""",
        lambda t, p: _expect(
            t,
            p,
            "dare",
            ["m0", "m1"],
            weights=[0.4, 0.3],
            drop_rate=(1 - 0.53, 1 - 0.53),
            sign_election=True,
            normalize=False,
        ),
    ),
    "dare_linear_no_rescale": (
        """
base_model: base.safetensors
models:
  - {model: m0.safetensors, parameters: {density: 0.5, weight: 0.5}}
  - {model: m1.safetensors, parameters: {density: 0.8, weight: 0.5}}
merge_method: dare_linear
parameters: {rescale: false}
""",
        lambda t, p: _expect(
            t,
            p,
            "dare",
            ["m0", "m1"],
            weights=[0.5, 0.5],
            drop_rate=(0.5, 1 - 0.8),
            rescale=False,
            normalize=False,
        ),
    ),
    "breadcrumbs": (
        """
base_model: base.safetensors
models:
  - {model: m0.safetensors, parameters: {weight: 1.0, density: 0.8, gamma: 0.05}}
  - {model: m1.safetensors, parameters: {weight: 1.0, density: 0.6}}
merge_method: breadcrumbs
""",
        lambda t, p: _expect(
            t,
            p,
            "breadcrumbs",
            ["m0", "m1"],
            density=(0.8, 0.6),
            gamma=(0.05, 0.01),
            sign_election=False,
            normalize=False,
        ),
    ),
    "breadcrumbs_ties": (
        """
base_model: base.safetensors
models:
  - {model: m0.safetensors, parameters: {weight: 1.0, density: 0.7, gamma: 0.1}}
  - {model: m1.safetensors, parameters: {weight: 0.5, density: 0.7, gamma: 0.1}}
merge_method: breadcrumbs_ties
""",
        lambda t, p: _expect(
            t,
            p,
            "breadcrumbs",
            ["m0", "m1"],
            weights=[1.0, 0.5],
            density=(0.7, 0.7),
            gamma=(0.1, 0.1),
            sign_election=True,
            normalize=False,
        ),
    ),
    "della": (
        """
base_model: base.safetensors
models:
  - {model: m0.safetensors, parameters: {weight: 1.0, density: 0.6, epsilon: 0.1}}
  - {model: m1.safetensors, parameters: {weight: 1.0, density: 0.5, epsilon: 0.2}}
merge_method: della
parameters: {lambda: 1.1}
""",
        lambda t, p: _expect(
            t,
            p,
            "della",
            ["m0", "m1"],
            density=(0.6, 0.5),
            epsilon=(0.1, 0.2),
            scale=1.1,
            sign_election=True,
            normalize=True,
        ),
    ),
    "della_linear": (
        """
base_model: base.safetensors
models:
  - {model: m0.safetensors, parameters: {weight: 0.5, density: 0.6}}
  - {model: m1.safetensors, parameters: {weight: 0.5, density: 0.6}}
merge_method: della_linear
""",
        lambda t, p: _expect(
            t,
            p,
            "della",
            ["m0", "m1"],
            weights=[0.5, 0.5],
            density=(0.6, 0.6),
            epsilon=(0.15, 0.15),
            sign_election=False,
            normalize=False,
        ),
    ),
    "della_defaults_keep_everything": (
        """
base_model: base.safetensors
models:
  - model: m0.safetensors
  - model: m1.safetensors
merge_method: della
""",
        # Density 1 (mergekit's default) sparsifies nothing: the disjoint mean.
        lambda t, p: _expect(t, p, "ties", ["m0", "m1"], density=1.0, trim="per_leaf"),
    ),
    "breadcrumbs_defaults_keep_everything": (
        """
base_model: base.safetensors
models:
  - {model: m0.safetensors, parameters: {weight: 0.5}}
  - {model: m1.safetensors, parameters: {weight: 0.5}}
merge_method: breadcrumbs
""",
        lambda t, p: _expect(t, p, "task_arithmetic", ["m0", "m1"], weights=[0.5, 0.5]),
    ),
    "gradient_slerp": (
        """
models:
  - model: base.safetensors
  - model: m1.safetensors
merge_method: slerp
base_model: base.safetensors
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
        lambda t, p: _expect(
            {**t, "b0": t["base"]},
            p,
            "slerp",
            ["b0", "m1"],
            t=_grad([0, 0.5, 0.3, 0.7, 1], p)
            if "self_attn" in p
            else _grad([1, 0.5, 0.7, 0.3, 0], p)
            if "mlp" in p
            else 0.5,
        ),
    ),
    "multislerp": (
        """
models:
  - {model: m0.safetensors, parameters: {weight: 0.6}}
  - {model: m1.safetensors, parameters: {weight: 0.4}}
merge_method: multislerp
""",
        lambda t, p: _expect(t, p, "multislerp", ["m0", "m1"], weights=[0.6, 0.4]),
    ),
    "model_stock": (
        """
models:
  - model: m0.safetensors
  - model: m1.safetensors
  - model: m2.safetensors
merge_method: model_stock
base_model: base.safetensors
parameters: {filter_wise: false}
dtype: float32
""",
        lambda t, p: _expect(
            t,
            p,
            "model_stock",
            ["m0", "m1", "m2"],
            filter_wise=False,
            clip_cosine=False,
        ),
    ),
}


def test_every_mergekit_method_we_map_has_a_case():
    covered = {yaml.safe_load(text)["merge_method"] for text, _ in CASES.values()}
    assert covered == set(MERGEKIT_METHODS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_mergekit_recipe_merges_as_mergekit_means(folder, tmp_path, name):
    d, trees = folder
    text, expected = CASES[name]
    (d / f"{name}.yml").write_text(text)
    merge_recipe(d / f"{name}.yml", tmp_path / "out")
    got = load_checkpoint(tmp_path / "out")
    for path in jax.tree.leaves(leaf_paths(got)):
        node = got
        for part in path.split("/"):
            node = node[part]
        np.testing.assert_allclose(
            node, expected(trees, path), rtol=1e-5, atol=1e-6, err_msg=f"{name}: {path}"
        )


def test_convert_writes_a_recipe_that_parses_and_names_its_source(folder, tmp_path):
    d, _ = folder
    (d / "ties.yml").write_text(CASES["ties_per_layer_weights_and_densities"][0])
    out = tmp_path / "ours.yaml"
    result = CliRunner().invoke(main, ["convert", str(d / "ties.yml"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith(f"# Converted from the mergekit recipe {d / 'ties.yml'}.")
    recipe = parse_recipe(text, source="ours.yaml", directory=str(d))
    assert recipe.method == "ties" and recipe.parameters["trim"] == "per_leaf"
    assert recipe.models[0].weight == {"gradient": [1.0, 0.8, 0.5]}
    # Printing to stdout, and refusing to replace a file.
    printed = CliRunner().invoke(main, ["convert", str(d / "ties.yml")])
    assert printed.exit_code == 0 and printed.output == text
    again = CliRunner().invoke(main, ["convert", str(d / "ties.yml"), "-o", str(out)])
    assert again.exit_code == 2 and "exists" in again.output


UNMAPPABLE = {
    "slices": (
        "slices:\n  - sources: [{model: a, layer_range: [0, 2]}]\nmerge_method: slerp\n",
        r"m.yml:1: mergekit key 'slices': layer slices",
    ),
    "unknown_method": (
        "models: [{model: a}]\nmerge_method: nuslerp\n",
        r"m.yml:2: mergekit merge_method 'nuslerp' has no counterpart",
    ),
    "unknown_key": (
        "models: [{model: a}]\nmerge_method: linear\nfoo: 1\n",
        r"m.yml:3: mergekit key 'foo' has no counterpart",
    ),
    "lora": (
        "models: [{model: a+lora}]\nmerge_method: linear\n",
        r"m.yml:1: models\[0\]: 'a\+lora' applies a LoRA adapter",
    ),
    "per_model_unknown": (
        "base_model: b\nmodels:\n  - model: a\n    parameters: {gamma: 0.1}\nmerge_method: ties\n",
        r"m.yml:4: models\[0\] parameter 'gamma' is not a per-model parameter of mergekit's ties",
    ),
    "per_model_filter": (
        "base_model: b\nmodels:\n  - model: a\n    parameters:\n      density:\n"
        "        - {filter: mlp, value: 0.5}\nmerge_method: ties\n",
        r"m.yml:5: models\[0\] density: a filter list in a model's own parameters",
    ),
    "tokenizer_union": (
        "models: [{model: a}]\nmerge_method: linear\ntokenizer_source: union\n",
        r"m.yml:3: tokenizer_source 'union'",
    ),
    "slerp_three": (
        "base_model: a\nmodels: [{model: a}, {model: b}, {model: c}]\n"
        "merge_method: slerp\nparameters: {t: 0.5}\n",
        r"m.yml:2: mergekit slerp needs base_model and exactly one other model",
    ),
    "gradient_strings": (
        "models: [{model: a}, {model: b}]\nmerge_method: slerp\n"
        "base_model: a\nparameters: {t: [a, b]}\n",
        r"m.yml:4: t: a list is a gradient over the layers and must hold numbers",
    ),
    "linear_unnormalised": (
        "models: [{model: a}]\nmerge_method: linear\nparameters: {normalize: false}\n",
        r"m.yml:3: linear with normalize: false",
    ),
}


@pytest.mark.parametrize("name", sorted(UNMAPPABLE))
def test_what_has_no_counterpart_is_an_error_at_its_line(name):
    text, message = UNMAPPABLE[name]
    with pytest.raises(RecipeError, match=message):
        convert_mergekit(text, source="m.yml")


def test_a_converted_value_out_of_range_names_the_converted_recipe(tmp_path):
    (tmp_path / "m.yml").write_text(
        "base_model: b\nmodels:\n  - {model: a, parameters: {density: 1.5}}\n"
        "merge_method: ties\n"
    )
    with pytest.raises(
        RecipeError, match=r"m.yml \(converted from mergekit.*density\[0\] must lie in"
    ):
        read_recipe(tmp_path / "m.yml")
    # Our own parser points at the converter rather than at an unknown key.
    with pytest.raises(RecipeError, match=r"m.yml:1: this is a mergekit recipe"):
        mats_jax.load_recipe(tmp_path / "m.yml")
