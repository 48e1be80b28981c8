"""The options mergekit users expect: per-model parameters, ``normalize``,
DARE's ``rescale: false`` and layer gradients, each against a numpy version
of what it means, in memory and streamed from a recipe."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mats_jax
from mats_jax.io import load_checkpoint, save_checkpoint
from mats_jax.recipe import RecipeError, parse_recipe
from mats_jax.stream import merge_recipe


def _np_ties(base, models, densities, weights, normalize=True):
    """TIES per leaf (trim per leaf), each model with its own density."""
    out = {}
    for name in base:
        b = np.asarray(base[name], np.float64)
        taus = []
        for m, d in zip(models, densities, strict=True):
            tau = np.asarray(m[name], np.float64) - b
            k = min(
                max(int(np.ceil(np.float32(d) * np.float32(tau.size))), 1), tau.size
            )
            threshold = np.sort(np.abs(tau).ravel())[::-1][k - 1]
            taus.append(np.where(np.abs(tau) >= threshold, tau, 0.0))
        w = np.asarray(weights, np.float64)
        total = sum(wi * t for wi, t in zip(w, taus, strict=True))
        sign = np.sign(total)
        agree = [(np.sign(t) == sign) & (t != 0) for t in taus]
        num = sum(
            np.where(a, wi * t, 0) for a, wi, t in zip(agree, w, taus, strict=True)
        )
        den = sum(np.where(a, wi, 0) for a, wi in zip(agree, w, strict=True))
        merged = (
            np.where(den > 0, num / np.where(den > 0, den, 1), 0) if normalize else num
        )
        out[name] = b + merged
    return out


def _trees(seed=0, n=3):
    rng = np.random.default_rng(seed)
    base = {
        "a": rng.normal(size=(5, 4)).astype(np.float32),
        "b": rng.normal(size=(7,)).astype(np.float32),
    }
    models = [
        {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
        for _ in range(n)
    ]
    return base, models


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_with_one_density_per_model_is_the_numpy_formula(normalize):
    base, models = _trees()
    densities, weights = [0.2, 0.5, 1.0], [1.0, 2.0, 0.5]
    got = mats_jax.ties(
        base,
        models,
        density=densities,
        weights=weights,
        trim="per_leaf",
        normalize=normalize,
    )
    want = _np_ties(base, models, densities, weights, normalize)
    for k in base:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_per_model_density_equal_values_is_the_shared_density():
    base, models = _trees()
    for trim in ("global", "per_leaf"):
        one = mats_jax.ties(base, models, density=0.3, trim=trim)
        each = mats_jax.ties(base, models, density=(0.3, 0.3, 0.3), trim=trim)
        jax.tree.map(np.testing.assert_array_equal, one, each)


def test_global_trim_with_per_model_density_keeps_each_models_count():
    base, models = _trees()
    densities = [0.1, 0.6, 0.3]
    got = mats_jax.ties(base, [models[0]], density=[densities[0]])
    kept = sum(int(np.sum(np.asarray(got[k]) != base[k])) for k in base)
    size = sum(v.size for v in base.values())
    assert kept == int(np.ceil(np.float32(0.1) * np.float32(size)))
    # Each model trimmed by its own k, then combined: equals the numpy formula
    # over the whole model (one threshold per model over all leaves).
    merged = mats_jax.ties(base, models, density=densities)
    flat_base = np.concatenate([base[k].ravel() for k in sorted(base)])
    flat_models = [np.concatenate([m[k].ravel() for k in sorted(base)]) for m in models]
    want = _np_ties(
        {"x": flat_base}, [{"x": f} for f in flat_models], densities, [1, 1, 1]
    )
    got_flat = np.concatenate([np.asarray(merged[k]).ravel() for k in sorted(base)])
    np.testing.assert_allclose(got_flat, want["x"], rtol=1e-5, atol=1e-6)


def test_dare_per_model_drop_rate_and_rescale_false():
    base, models = _trees()
    key = jax.random.key(4)
    scaled = mats_jax.dare(base, [models[0]], drop_rate=[0.5], key=key)
    unscaled = mats_jax.dare(base, [models[0]], drop_rate=[0.5], key=key, rescale=False)
    for k in base:
        # The same masks; kept entries are τ/(1 − p) with rescale, τ without.
        np.testing.assert_allclose(
            np.asarray(unscaled[k]) - base[k],
            (np.asarray(scaled[k]) - base[k]) * 0.5,
            rtol=1e-5,
            atol=1e-6,
        )
    # A drop rate of 0 for one model keeps all of it (rescaled by 1).
    kept = mats_jax.dare(
        base, models[:2], drop_rate=[0.0, 0.9], key=key, weights=[1.0, 0.0]
    )
    for k in base:
        np.testing.assert_allclose(kept[k], models[0][k], rtol=1e-6)


def test_normalize_divides_by_the_weights_taking_part():
    base, models = _trees()
    w = [1.0, 2.0, 3.0]
    ta = mats_jax.task_arithmetic(base, models, weights=w, normalize=True)
    for k in base:
        want = base[k] + sum(wi * (m[k] - base[k]) for wi, m in zip(w, models)) / 6.0
        np.testing.assert_allclose(ta[k], want, rtol=1e-5, atol=1e-5)
    # DARE-TIES with normalize=False sums the agreeing entries (mergekit's dare_ties).
    key = jax.random.key(1)
    summed = mats_jax.dare(
        base, models, drop_rate=0.0, key=key, sign_election=True, normalize=False
    )
    want = _np_ties(base, models, [1.0] * 3, [1.0] * 3, normalize=False)
    for k in base:
        np.testing.assert_allclose(summed[k], want[k], rtol=1e-5, atol=1e-5)


def test_a_per_model_list_of_the_wrong_length_is_refused():
    base, models = _trees()
    with pytest.raises(
        mats_jax.MergeInputError, match="density has 2 values, but 3 models"
    ):
        mats_jax.ties(base, models, density=[0.2, 0.5])
    with pytest.raises(
        mats_jax.MergeInputError, match=r"density\[1\] must lie in \(0, 1\]"
    ):
        mats_jax.ties(base, models, density=[0.2, 1.5, 0.3])
    with pytest.raises(mats_jax.MergeInputError, match="scale must be a number"):
        mats_jax.ties(base, models, density=0.2, scale=[1.0, 2.0, 3.0])
    with pytest.raises(
        mats_jax.MergeInputError, match="normalize must be True or False"
    ):
        mats_jax.task_arithmetic(base, models, normalize="yes")


# --------------------------------------------------------------------------
# Recipes: per-model parameters and layer gradients, streamed
# --------------------------------------------------------------------------


def _layered(rng, n_layers=3):
    tree = {
        "embed": {"embedding": rng.normal(size=(6, 4)).astype(np.float32)},
        "head": {"kernel": rng.normal(size=(4, 2)).astype(np.float32)},
    }
    for i in range(n_layers):
        tree[f"layers_{i}"] = {"kernel": rng.normal(size=(4, 4)).astype(np.float32)}
    return tree


@pytest.fixture(scope="module")
def layered(tmp_path_factory):
    d = tmp_path_factory.mktemp("layered")
    rng = np.random.default_rng(0)
    base = _layered(rng)
    models = [
        jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), base)
        for _ in range(2)
    ]
    save_checkpoint(d / "base.safetensors", base)
    for i, m in enumerate(models):
        save_checkpoint(d / f"m{i}.safetensors", m)
    return d, base, models


def _write(d, text):
    (d / "r.yaml").write_text(text)
    return d / "r.yaml"


def test_recipe_layer_gradient_is_interpolated_over_the_layers(layered, tmp_path):
    d, base, models = layered
    recipe = _write(
        d,
        """
base: base.safetensors
models: [m0.safetensors, m1.safetensors]
method: task_arithmetic
parameters: {scale: {gradient: [0.0, 1.0]}}
""",
    )
    merge_recipe(recipe, tmp_path / "out")
    got = load_checkpoint(tmp_path / "out")
    # layers_i of 3 at i/2; embeddings at the start (0), the head at the end (1).
    scales = {
        "layers_0": 0.0,
        "layers_1": 0.5,
        "layers_2": 1.0,
        "embed": 0.0,
        "head": 1.0,
    }
    for module, scale in scales.items():
        want = mats_jax.task_arithmetic(base, models, scale=scale)[module]
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
            got[module],
            want,
        )


def test_recipe_gradient_outside_value_and_override_precedence(layered, tmp_path):
    d, base, models = layered
    recipe = _write(
        d,
        """
base: base.safetensors
models: [m0.safetensors, m1.safetensors]
method: task_arithmetic
parameters: {scale: {gradient: [0.2, 0.4, 1.0], outside: 0.7}}
overrides:
  - {pattern: "layers_2/*", parameters: {scale: 0.1}}
""",
    )
    merge_recipe(recipe, tmp_path / "out")
    got = load_checkpoint(tmp_path / "out")
    for module, scale in {
        "layers_0": 0.2,
        "layers_1": 0.4,
        "layers_2": 0.1,
        "embed": 0.7,
        "head": 0.7,
    }.items():
        want = mats_jax.task_arithmetic(base, models, scale=scale)[module]
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
            got[module],
            want,
        )


def test_recipe_per_model_density_streams_as_in_memory(layered, tmp_path):
    d, base, models = layered
    recipe = _write(
        d,
        """
base: base.safetensors
models:
  - {path: m0.safetensors, parameters: {density: 0.25}}
  - m1.safetensors
method: ties
parameters: {density: 0.5, trim: per_leaf}
""",
    )
    merge_recipe(recipe, tmp_path / "out")
    got = load_checkpoint(tmp_path / "out")
    want = mats_jax.ties(base, models, density=(0.25, 0.5), trim="per_leaf")
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), got, want
    )
    # Global trimming: one threshold per model over the whole model, each its own k.
    (d / "r.yaml").write_text((d / "r.yaml").read_text().replace("per_leaf", "global"))
    merge_recipe(d / "r.yaml", tmp_path / "out2")
    got = load_checkpoint(tmp_path / "out2")
    want = mats_jax.ties(base, models, density=(0.25, 0.5))
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), got, want
    )


def test_recipe_per_model_density_with_a_gradient(layered, tmp_path):
    d, base, models = layered
    recipe = _write(
        d,
        """
base: base.safetensors
models:
  - {path: m0.safetensors, parameters: {density: {gradient: [0.2, 0.6]}}}
  - m1.safetensors
method: ties
parameters: {density: 0.5, trim: per_leaf}
""",
    )
    merge_recipe(recipe, tmp_path / "out")
    got = load_checkpoint(tmp_path / "out")
    want = mats_jax.ties(base, models, density=(0.4, 0.5), trim="per_leaf")
    np.testing.assert_array_equal(got["layers_1"]["kernel"], want["layers_1"]["kernel"])


BAD = {
    "not_per_model": (
        "models:\n  - {path: a, parameters: {scale: 0.5}}\n  - b\nbase: c\n"
        "method: ties\nparameters: {density: 0.2}\n",
        r"r.yaml:2: models\[0\] parameters: 'scale' is not a per-model parameter of ties "
        r"\(per-model: density\); set it in the recipe's `parameters`",
    ),
    "weight_in_parameters": (
        "models:\n  - {path: a, parameters: {weight: 0.5}}\n  - b\nbase: c\n"
        "method: ties\nparameters: {density: 0.2}\n",
        r"give the model's weight as `weight:` in its entry",
    ),
    "per_model_out_of_range": (
        "models:\n  - {path: a, parameters: {density: 1.5}}\n  - b\nbase: c\n"
        "method: ties\nparameters: {density: 0.2}\n",
        r"r.yaml:6: ties parameters: density\[0\] must lie in \(0, 1\], got 1.5",
    ),
    "list_wrong_length": (
        "models: [a, b, c]\nbase: d\nmethod: ties\nparameters: {density: [0.2, 0.3]}\n",
        r"r.yaml:4: ties parameters: ties: density has 2 values, but 3 models are merged",
    ),
    "gradient_out_of_range": (
        "models: [a, b]\nbase: d\nmethod: ties\nparameters: {density: {gradient: [0.5, 1.5]}}\n",
        r"r.yaml:4: ties parameters: density must lie in \(0, 1\], got 1.5",
    ),
    "gradient_not_numbers": (
        "models: [a, b]\nbase: d\nmethod: task_arithmetic\n"
        "parameters: {scale: {gradient: [a, b]}}\n",
        r"r.yaml:4: task_arithmetic parameters: gradient must be a non-empty list of numbers",
    ),
    "gradient_unknown_key": (
        "models: [a, b]\nbase: d\nmethod: task_arithmetic\n"
        "parameters: {scale: {gradient: [1], inside: 2}}\n",
        r"a layer gradient has keys gradient and outside, got \['inside'\]",
    ),
    "gradient_outside_bad": (
        "models: [a, b]\nbase: d\nmethod: task_arithmetic\n"
        "parameters: {scale: {gradient: [1], outside: .nan}}\n",
        r"r.yaml:4: task_arithmetic parameters: scale must be a finite number, got nan",
    ),
    "rescale_string": (
        "models: [a, b]\nbase: d\nmethod: dare\nparameters: {drop_rate: 0.2, rescale: 'no'}\n",
        r"r.yaml:4: dare parameters: rescale must be True or False, got 'no'",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_mergekit_options_are_refused_at_their_line(name):
    text, message = BAD[name]
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text, source="r.yaml", directory="/x")


def test_per_model_lists_work_under_jit():
    base, models = _trees()
    f = jax.jit(lambda d: mats_jax.ties(base, models, density=d, trim="per_leaf"))
    got = f(jnp.asarray([0.2, 0.5, 1.0]))
    want = mats_jax.ties(base, models, density=[0.2, 0.5, 1.0], trim="per_leaf")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


def test_a_fraction_that_float32_flushes_to_zero_is_refused():
    # Found by the suite: γ = 9.4e-42 (a float32 subnormal) dropped no entry,
    # as XLA computes it as 0, where ⌈γN⌉ = 1 was meant.
    base, models = _trees()
    with pytest.raises(
        mats_jax.MergeInputError, match=r"gamma = 9\.4e-42 is below float32"
    ):
        mats_jax.breadcrumbs(base, models, density=0.5, gamma=9.4e-42)
    with pytest.raises(
        mats_jax.MergeInputError, match=r"density\[1\] = 1e-40 is below"
    ):
        mats_jax.ties(base, models, density=[0.5, 1e-40, 0.5])
