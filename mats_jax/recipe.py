"""A YAML merge recipe, validated before any tensor is read.

A recipe names the checkpoints, the method and its hyperparameters, per-leaf
overrides and the output, as mergekit's do::

    base: pretrained/                    # or {path: ..., layout: hf_linear}
    models:
      - path: finetuned_a/model.safetensors
        weight: 1.0
        statistics: stats_a/             # mats_jax.save_statistics output
      - {path: finetuned_b/, weight: 0.5, statistics: stats_b/}
      - {adapter: lora_c/}               # a PEFT adapter, read on the base
    method: ties                         # see mats_jax.METHODS
    parameters: {density: 0.2, scale: 1.0, trim: global}
    overrides:                           # first matching pattern wins
      - {pattern: "*/embedding", skip: true}        # keep the base's leaf
      - {pattern: "re:norm", method: average}       # its own parameters only
      - {pattern: "head/*", parameters: {density: 0.5}}  # over the recipe's
      - {pattern: "head/*", take: 1}                 # copy models[1]'s leaf unmerged
    tied: {lm_head/weight: embed/weight} # a leaf some models store under another name
    vocab: refuse                        # or shared_rows (see below)
    seed: 0                              # DARE's random masks
    layouts:                             # named layouts (rules as in mats_jax.io.layout)
      hf: [{checkpoint: "{p*}.weight", tree: "{p*}/kernel", transpose: [1, 0], ndim: 2}]
    dtype: float32                       # arithmetic dtype (default: each leaf's, bf16/f16 in f32)
    out_dtype: bfloat16                  # floating leaves written in it (default: their input dtype)
    output: {path: merged/, format: safetensors, max_shard_size: 2GB, layout: hf,
             copy_files: true}           # the base folder's config/tokenizer files
    # or a merged adapter: output: {path: lora/, lora: {rank: 16, targets: ["*/query/*"]}}

A model's own ``parameters`` give its values of the method's per-model
parameters (mergekit's per-model ``density``: ``{path: a/, parameters:
{density: 0.3}}``), as does a list with one value per model in
``parameters``. Any number in ``parameters``, an override's or a model's
``parameters``, or a model's ``weight`` may be a layer gradient,
``{gradient: [v0, v1, ...], outside: v}``: interpolated linearly over the
layer stack (:func:`layer_position`), as mergekit's lists are. Precedence,
lowest first: the recipe's, each model's, the first matching override's.
A mergekit recipe is read by :func:`mats_jax.read_recipe`.

A model given as ``adapter:`` (a PEFT LoRA or IA³ folder) is the base with
the adapter applied, read one leaf at a time in the base's format and layout
(:func:`mats_jax.open_adapter`): it needs ``base`` and takes no ``path``,
``format`` or ``layout`` of its own. ``output: {lora: {rank: r}}`` writes the
merged model as a LoRA of rank r on the base instead (PEFT's folder, named as
the base checkpoint: :func:`mats_jax.extract_lora`), each module's
truncation error in its README.

Patterns are globs on the whole leaf path (``/``-separated, after the input's
layout), or regular expressions searched in it with a ``re:`` prefix; a pattern
that matches no leaf is an error. An override that keeps the recipe's method
adds its parameters over the recipe's; one with another method takes only its
own. ``skip`` copies the leaf from the base (from the first model without a
base) unmerged; ``take: base`` or ``take: <i>`` copies it from the base or
from ``models[i]``.

Integer and boolean leaves (position ids, masks, step counters) are not
merged: they pass through from the base (the first model without one) when
every input holds the same values, and are an error naming the leaf when they
differ (then ``skip`` or ``take`` says which input's to keep). Floating leaves
keep their input dtype unless ``out_dtype`` says otherwise.

``output.copy_files`` (default true): a Hugging Face model folder as base
has its other files (``config.json``, the tokenizer's files,
``generation_config.json``, chat templates) copied into the output, so the
output is a folder ``transformers`` loads.

Every error names the recipe file and line (from PyYAML's node marks) and what
is expected; misspelt keys get a suggestion. Method parameters are built into
the method's own parameters record (:func:`build_parameters`), which validates
them, so the recipe accepts exactly what the library accepts.

``vocab`` is the policy for leaves whose shapes differ along one axis between
models (embedding matrices and output heads of models with different
vocabulary sizes): ``refuse`` (default) stops with a message naming the leaf;
``shared_rows`` merges the rows all models have (the first ``min`` rows along
that axis, which assumes the shared token ids mean the same tokens) and writes
a leaf of that size.

Examples:
  >>> recipe = parse_recipe('''
  ... base: base.safetensors
  ... models: [a.safetensors, {path: b.safetensors, weight: 2}]
  ... method: task_arithmetic
  ... parameters: {scale: 0.5}
  ... ''', source="r.yaml")
  >>> recipe.method, recipe.parameters, [m.weight for m in recipe.models]
  ('task_arithmetic', {'scale': 0.5}, [1.0, 2.0])
  >>> parse_recipe("method: average\\nmodels: [a]\\nparamters: {}", source="r.yaml")
  Traceback (most recent call last):
  ...
  mats_jax.recipe.RecipeError: r.yaml:3: unknown key 'paramters' in the recipe; did you mean 'parameters'? Allowed: base, dtype, layouts, method, models, out_dtype, output, overrides, parameters, seed, tied, vocab
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from mats_jax.checks import MergeInputError
from mats_jax.io.checkpoint import FORMATS, resolve_layout
from mats_jax.io.layout import PRESETS, Layout, LayoutError
from mats_jax.merge.registry import METHODS, get_method
from mats_jax.method import MergeMethod, MethodCall, check_per_model, per_model_fields
from mats_jax.tree import pattern_matches

__all__ = [
    "RECIPE_KEYS",
    "ModelSpec",
    "OutputSpec",
    "Override",
    "Recipe",
    "RecipeError",
    "RecipeKey",
    "build_parameters",
    "count_layers",
    "gradient_value",
    "is_gradient",
    "layer_index",
    "layer_position",
    "load_recipe",
    "parse_recipe",
    "recipe_text",
]


class RecipeError(MergeInputError):
    """A recipe that cannot be run; the message starts with ``file:line:``."""


VOCAB_POLICIES = ("refuse", "shared_rows")


def build_parameters(method: MergeMethod, values: Mapping[str, Any]) -> Any:
    """A method's parameters record from a recipe's mapping.

    ``init`` (for the data-dependent methods) may name another, data-free
    method with its parameters, ``{method: task_arithmetic, scale: 0.3}``,
    which becomes a :class:`~mats_jax.MethodCall`; everything else goes to the
    record as it is, which validates it.

    Raises:
      MergeInputError: naming the parameter.

    Examples:
      >>> from mats_jax import get_method
      >>> params = build_parameters(get_method("mats"), {"init": {"method": "ties", "density": 0.2}})
      >>> params.init.method.name, params.init.parameters.density
      ('ties', 0.2)
    """
    values = dict(values)
    if "init" in values:
        values["init"] = _init_value(values["init"])
    return method.parameters(**values)


def _init_value(value: Any) -> Any:
    data_free = [n for n, m in METHODS.items() if not m.data_dependent]
    if isinstance(value, str) and value in ("average", "base"):
        return value
    if isinstance(value, Mapping) and value.get("method") in data_free:
        method = get_method(value["method"])
        rest = {k: v for k, v in value.items() if k != "method"}
        return MethodCall(method, build_parameters(method, rest))
    raise MergeInputError(
        f"init must be 'average', 'base' or {{method: <one of {', '.join(data_free)}>, "
        f"...parameters}}, got {value!r}"
    )


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One input checkpoint: its path, merge weight, statistics and layout."""

    path: str
    weight: Any = 1.0
    """A number, or a layer gradient ``{gradient: [...]}`` (mergekit's
    per-layer weights): see :meth:`Recipe.leaf_weights`."""
    statistics: str | None = None
    layout: Layout = dataclasses.field(default_factory=Layout)
    format: str | None = None
    line: int = 0
    written: str = ""  # the path as the recipe wrote it (for the model card)
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """This model's own values of the method's per-model parameters
    (mergekit's per-model ``density``)."""
    adapter: bool = False
    """``path`` is a PEFT adapter folder: the model is the base with the
    adapter applied (:func:`~mats_jax.io.open_adapter`), in the base's
    format and layout."""


@dataclasses.dataclass(frozen=True)
class Override:
    """A per-leaf rule: leaves whose path matches ``pattern`` use another method,
    other parameters, or are skipped (copied from the base, else from the first
    model) or taken from one input (``take``: ``"base"`` or a model's index)."""

    pattern: str
    method: str | None = None
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    skip: bool = False
    line: int = 0
    take: str | int | None = None

    @property
    def unmerged(self) -> bool:
        """Whether matching leaves are copied from one input rather than merged."""
        return self.skip or self.take is not None


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """Where and how the merged checkpoint is written."""

    path: str | None = None
    format: str = "safetensors"
    layout: Layout = dataclasses.field(default_factory=Layout)
    max_shard_size: int | None = None
    line: int = 0
    copy_files: bool = True
    lora_rank: int | None = None
    """Write a LoRA adapter of this rank (the merged model's change to the
    base, by truncated SVD: :func:`~mats_jax.extract_lora`) instead of the
    merged model."""
    lora_targets: tuple[str, ...] = ()
    """Leaf-path patterns of the kernels the LoRA holds (default: every
    linear kernel that changed)."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``source`` is its file, ``text`` its YAML (for the model card).

    Examples:
      >>> recipe = parse_recipe(
      ...     "models: [a, b]\\nmethod: average\\noverrides: [{pattern: 'emb/*', skip: true}]",
      ...     directory="/ckpts",
      ... )
      >>> recipe.leaf_rule("emb/table")[0] is None, recipe.leaf_rule("fc/kernel")[0]
      (True, 'average')
      >>> recipe.models[1].path
      '/ckpts/b'
    """

    models: tuple[ModelSpec, ...]
    method: str
    base: ModelSpec | None = None
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    overrides: tuple[Override, ...] = ()
    output: OutputSpec = dataclasses.field(default_factory=OutputSpec)
    tied: Mapping[str, str] = dataclasses.field(default_factory=dict)
    vocab: str = "refuse"
    seed: int = 0
    source: str = "<recipe>"
    text: str = ""
    method_line: int = 0
    tied_line: int = 0
    dtype: np.dtype | None = None
    out_dtype: np.dtype | None = None

    def where(self, line: int) -> str:
        """``file:line`` for messages."""
        return f"{self.source}:{line}"

    def leaf_rule(
        self, path: str, num_layers: int | None = None
    ) -> tuple[str | None, dict[str, Any], Override | None]:
        """The method's name (None: skip), parameters and override that apply to leaf ``path``.

        Parameters come, by increasing precedence, from the recipe's
        ``parameters``, each model's own ``parameters`` (as one value per
        model) and the first matching override. Layer gradients
        (``{gradient: [...]}``) are resolved at the leaf's layer position,
        which needs ``num_layers``, the checkpoint's number of layers
        (:func:`count_layers` of its leaf paths).

        Examples:
          >>> recipe = parse_recipe(
          ...     "base: b\\nmodels: [{path: a, parameters: {density: 0.5}}, c]\\n"
          ...     "method: ties\\nparameters: {density: 0.2, scale: {gradient: [0.0, 1.0]}}")
          >>> recipe.leaf_rule("layers/1/kernel", num_layers=3)[1]
          {'density': (0.5, 0.2), 'scale': 0.5}
        """
        override = next(
            (r for r in self.overrides if pattern_matches(r.pattern, path)), None
        )
        if override is not None and override.unmerged:
            return None, {}, override
        method = (override.method if override else None) or self.method
        params = self.method_parameters(method, override)
        per_model = per_model_fields(get_method(method).Parameters)
        resolved = {
            name: tuple(_at_layer(v, path, num_layers, name) for v in value)
            if name in per_model and isinstance(value, tuple)
            else _at_layer(value, path, num_layers, name)
            for name, value in params.items()
        }
        return method, resolved, override

    def method_parameters(
        self, method: str, override: Override | None = None
    ) -> dict[str, Any]:
        """``method``'s parameters where ``override`` (or none) applies, layer
        gradients unresolved: the recipe's ``parameters`` when it is the
        recipe's method, then each model's own (as one value per model, the
        recipe's value for models that give none), then the override's."""
        params = dict(self.parameters) if method == self.method else {}
        for name in per_model_fields(get_method(method).Parameters):
            own = [m.parameters.get(name) for m in self.models]
            if any(v is not None for v in own):
                shared = params.get(name)
                params[name] = tuple(shared if v is None else v for v in own)
        if override is not None:
            params.update(override.parameters)
        return params

    def leaf_method(
        self, path: str, num_layers: int | None = None
    ) -> tuple[MergeMethod | None, Any]:
        """The method (None: skip) and its parameters record for leaf ``path``.

        Examples:
          >>> recipe = parse_recipe("base: b\\nmodels: [a]\\nmethod: ties\\nparameters: {density: 0.3}")
          >>> method, params = recipe.leaf_method("fc/kernel")
          >>> method.name, params.density
          ('ties', 0.3)
        """
        name, params, _ = self.leaf_rule(path, num_layers)
        if name is None:
            return None, None
        method = get_method(name)
        return method, build_parameters(method, params)

    def leaf_weights(self, path: str, num_layers: int | None = None) -> list[float]:
        """The models' weights for leaf ``path``: each model's ``weight``, a
        layer gradient resolved at the leaf's layer (see :meth:`leaf_rule`).

        Examples:
          >>> recipe = parse_recipe(
          ...     "models: [{path: a, weight: {gradient: [1.0, 0.0]}}, b]\\nmethod: average")
          >>> recipe.leaf_weights("layers/2/kernel", num_layers=5)
          [0.5, 1.0]
        """
        return [
            float(_at_layer(m.weight, path, num_layers, f"models[{i}] weight"))
            for i, m in enumerate(self.models)
        ]


_LAYER_COMPONENT = re.compile(r"^(?:\d+|.*_(\d+))$")


def layer_index(path: str) -> int | None:
    """The layer a leaf belongs to: the first component of its path that is a
    number (``encoder/layer/3/...``, ``model/layers/3/...``) or ends in one
    (flax's ``layers_3``, ``Dense_1``); None for leaves outside the layers.

    Examples:
      >>> layer_index("model/layers/3/mlp/kernel"), layer_index("layers_2/Dense_0/kernel")
      (3, 2)
      >>> layer_index("embed/embedding") is None
      True
    """
    for part in path.split("/"):
        match = _LAYER_COMPONENT.match(part)
        if match:
            return int(match.group(1) if match.group(1) is not None else part)
    return None


def count_layers(paths: Any) -> int:
    """The number of layers among leaf paths: one more than the largest
    :func:`layer_index` (0 if no leaf has one)."""
    indices = [i for i in map(layer_index, paths) if i is not None]
    return max(indices) + 1 if indices else 0


def layer_position(path: str, num_layers: int) -> float:
    """Where a leaf sits along the layer stack, in [0, 1]: layer i of L at
    i / (L − 1); leaves outside the layers where mergekit puts them,
    embeddings (a path containing ``embed``) at 0 and the rest (final norm,
    head) at 1.

    Examples:
      >>> layer_position("layers/1/kernel", 5), layer_position("embed/embedding", 5)
      (0.25, 0.0)
      >>> layer_position("lm_head/kernel", 5)
      1.0
    """
    index = layer_index(path)
    if index is None:
        return 0.0 if "embed" in path.lower() else 1.0
    return index / (num_layers - 1) if num_layers > 1 else 0.0


def is_gradient(value: Any) -> bool:
    """Whether a recipe parameter is a layer gradient, ``{gradient: [...]}``."""
    return isinstance(value, Mapping) and "gradient" in value


def gradient_value(value: Mapping[str, Any], position: float) -> float:
    """A layer gradient's value at ``position``: its list of values spread
    evenly over [0, 1] and interpolated linearly (mergekit's gradients).

    Examples:
      >>> gradient_value({"gradient": [0.0, 0.5, 1.0]}, 0.25)
      0.25
      >>> gradient_value({"gradient": [0.3]}, 0.9)
      0.3
    """
    values = [float(v) for v in value["gradient"]]
    return float(np.interp(position, np.linspace(0.0, 1.0, len(values)), values))


def _at_layer(value: Any, path: str, num_layers: int | None, name: str) -> Any:
    if not is_gradient(value):
        return value
    if num_layers is None:
        raise MergeInputError(
            f"{name} is a layer gradient: resolving it needs the checkpoint's "
            f"number of layers (leaf {path!r})"
        )
    if "outside" in value and layer_index(path) is None:
        return value["outside"]
    return gradient_value(value, layer_position(path, num_layers))


@dataclasses.dataclass(frozen=True)
class RecipeKey:
    """One key of a recipe mapping, as the CLI page's table of keys shows it."""

    type: str
    """What the value is, in YAML's terms."""
    default: str
    """What an absent key means, or ``required``."""
    meaning: str
    """What it does (markdown: literals in backticks)."""


def _choices(names: Any) -> str:
    """``a``, ``b`` or ``c``, in backticks."""
    quoted = [f"`{n}`" for n in names]
    return (
        ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]
    )


_CHECKPOINT_KEYS = {
    "format": RecipeKey(
        f"string: {_choices(FORMATS)}",
        "from the path",
        "the checkpoint's format, where its path does not tell",
    ),
    "layout": RecipeKey(
        "string or list of rules",
        "the names as stored",
        "how its names and orientations map to the tree's leaf paths: a preset "
        f"({_choices(sorted(PRESETS))}), a name from `layouts`, or a list of "
        "rules",
    ),
    "path": RecipeKey(
        "string",
        "required",
        "the checkpoint: a file or a folder, relative to the recipe's folder",
    ),
}

# The keys each mapping of a recipe accepts, by where the mapping sits ("" is
# the recipe itself, "[i]" any entry of a list). The parser's lists of allowed
# keys are made from it, so the documentation's table cannot name other keys.
RECIPE_KEYS: Mapping[str, Mapping[str, RecipeKey]] = {
    "": {
        "base": RecipeKey(
            "path or mapping",
            "none",
            "the pretrained model the others were fine-tuned from: its path, or "
            "the keys `base.*`. Methods on task vectors, adapters and a LoRA "
            "output need it",
        ),
        "dtype": RecipeKey(
            "string: a floating dtype",
            "each leaf's (bfloat16 and float16 in float32)",
            "the dtype the merge computes in",
        ),
        "layouts": RecipeKey(
            "mapping: name to list of rules",
            "none",
            "named layouts that the recipe's `layout` keys may name",
        ),
        "method": RecipeKey(
            "string",
            "required",
            "the merge method, one of `mats_jax.METHODS`",
        ),
        "models": RecipeKey(
            "list of paths or mappings",
            "required",
            "the models to merge: each a path, or the keys `models[i].*`",
        ),
        "out_dtype": RecipeKey(
            "string: a floating dtype",
            "each leaf's input dtype",
            "the dtype floating leaves are written in",
        ),
        "output": RecipeKey(
            "path or mapping",
            "none (then `-o` names it)",
            "where and how the merged model is written: its path, or the keys "
            "`output.*`",
        ),
        "overrides": RecipeKey(
            "list of mappings",
            "none",
            "per-leaf rules, the keys `overrides[i].*`; the first whose pattern "
            "matches a leaf applies to it",
        ),
        "parameters": RecipeKey(
            "mapping",
            "the method's defaults",
            "the method's hyperparameters; a number may be a layer gradient "
            "`{gradient: [...]}`, a per-model parameter a list of one value per "
            "model",
        ),
        "seed": RecipeKey(
            "integer in [0, 2⁶³)",
            "0",
            "the seed of DARE's and DELLA's random masks",
        ),
        "tied": RecipeKey(
            "mapping: leaf path to leaf path",
            "none",
            "a leaf some models store under another name "
            "(`{lm_head/kernel: embed/embedding}`)",
        ),
        "vocab": RecipeKey(
            f"string: {_choices(VOCAB_POLICIES)}",
            "`refuse`",
            "leaves whose sizes differ along one axis (vocabularies): stop naming "
            "the leaf, or merge the rows all models have",
        ),
    },
    "base": _CHECKPOINT_KEYS,
    "models[i]": {
        "adapter": RecipeKey(
            "string",
            "none",
            "a PEFT LoRA or IA³ folder, in place of `path`: the model is the base "
            "with it applied",
        ),
        **_CHECKPOINT_KEYS,
        "parameters": RecipeKey(
            "mapping",
            "the recipe's",
            "this model's values of the method's per-model parameters "
            "(`density`, `drop_rate`, ...)",
        ),
        "statistics": RecipeKey(
            "string",
            "none",
            "the folder of its statistics, saved by `mats_jax.save_statistics`; "
            "data-dependent methods need it for every model",
        ),
        "weight": RecipeKey(
            "number ≥ 0 or layer gradient",
            "1.0",
            "its weight in the merge",
        ),
    },
    "overrides[i]": {
        "method": RecipeKey(
            "string", "the recipe's", "the method for the leaves that match"
        ),
        "parameters": RecipeKey(
            "mapping",
            "none",
            "parameters over the recipe's (with the recipe's method) or the only "
            "ones (with another)",
        ),
        "pattern": RecipeKey(
            "string",
            "required",
            "a glob on the whole leaf path, or a regular expression after `re:`; "
            "one that matches no leaf is an error",
        ),
        "skip": RecipeKey(
            "true or false",
            "false",
            "copy the leaves from the base (the first model without one), unmerged",
        ),
        "take": RecipeKey(
            "`base` or a model's index",
            "none",
            "copy the leaves from the base or from `models[i]`, unmerged",
        ),
    },
    "output": {
        "copy_files": RecipeKey(
            "true or false",
            "true",
            "copy the base folder's other files (config, tokenizer) beside the output",
        ),
        "format": RecipeKey(
            f"string: {_choices(FORMATS)}",
            "`safetensors`",
            "the output's format",
        ),
        "layout": RecipeKey(
            "string or list of rules",
            "the tree's own paths",
            "the layout the output's names and orientations are written in",
        ),
        "lora": RecipeKey(
            "mapping",
            "none",
            "write the merged model's change to the base as a LoRA instead, the "
            "keys `output.lora.*`",
        ),
        "max_shard_size": RecipeKey(
            "size: `2GB`, `500MiB` or bytes",
            "one file",
            "the largest safetensors shard",
        ),
        "path": RecipeKey("string", "the command's `-o`", "the output file or folder"),
    },
    "output.lora": {
        "rank": RecipeKey("integer ≥ 1", "required", "the LoRA's rank"),
        "targets": RecipeKey(
            "pattern or list of patterns",
            "every linear kernel that changed",
            "the leaf paths of the kernels the LoRA holds",
        ),
    },
}
_TOP = tuple(sorted(RECIPE_KEYS[""]))
_MODEL = tuple(sorted(RECIPE_KEYS["models[i]"]))
_BASE = tuple(sorted(RECIPE_KEYS["base"]))
_OVERRIDE = tuple(sorted(RECIPE_KEYS["overrides[i]"]))
_OUTPUT = tuple(sorted(RECIPE_KEYS["output"]))
_LORA = tuple(sorted(RECIPE_KEYS["output.lora"]))


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e3`` and ``1.5e-3`` as numbers (as YAML
    1.2 and JSON do; YAML 1.1 reads a float without a dot and a signed
    exponent as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _Constructor(yaml.constructor.SafeConstructor):
    """Builds values, refusing a key given twice in one mapping (PyYAML keeps
    the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        self.flatten_mapping(node)  # merge keys (<<: *defaults) first
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice in this mapping (first on line {seen[key]})",
                    key_node.start_mark,
                )
            if isinstance(key, Hashable):
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _Parser:
    def __init__(self, source: str, directory: str) -> None:
        self.source = source
        self.directory = directory
        self.layouts: dict[str, Layout] = {}

    def fail(self, node: yaml.Node | None, message: str) -> RecipeError:
        line = node.start_mark.line + 1 if node is not None else 1
        return RecipeError(f"{self.source}:{line}: {message}")

    def value(self, node: yaml.Node) -> Any:
        try:
            return _Constructor().construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as e:
            mark = e.problem_mark
            line = mark.line + 1 if mark is not None else node.start_mark.line + 1
            raise RecipeError(f"{self.source}:{line}: {e.problem}") from None

    def mapping(
        self,
        node: yaml.Node,
        what: str,
        allowed: tuple[str, ...],
        required: tuple[str, ...] = (),
    ) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(
                node, f"{what} must be a mapping with keys {', '.join(allowed)}"
            )
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = self.value(key_node)
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ";"
                raise self.fail(
                    key_node,
                    f"unknown key {key!r} in {what}{hint} Allowed: {', '.join(allowed)}",
                )
            if key in out:
                raise self.fail(key_node, f"key {key!r} appears twice in {what}")
            out[key] = value_node
        for key in required:
            if key not in out:
                raise self.fail(node, f"{what} needs the key {key!r}")
        return out

    def typed(self, node: yaml.Node, kind: type | tuple[type, ...], what: str) -> Any:
        value = self.value(node)
        if isinstance(value, bool) and bool not in (
            kind if isinstance(kind, tuple) else (kind,)
        ):
            raw = getattr(node, "value", "")
            hint = (
                f" (YAML reads {raw} as {str(value).lower()}: quote it, '{raw}', "
                "for the word)"
                if isinstance(raw, str) and raw.lower() not in ("true", "false")
                else ""
            )
            raise self.fail(
                node, f"{what} must be {_kind_name(kind)}, got {value!r}{hint}"
            )
        if not isinstance(value, kind):
            raise self.fail(node, f"{what} must be {_kind_name(kind)}, got {value!r}")
        return value

    def path(self, node: yaml.Node, what: str) -> str:
        value = self.typed(node, str, what)
        return os.path.normpath(os.path.join(self.directory, os.path.expanduser(value)))

    def layout(self, node: yaml.Node, what: str) -> Layout:
        value = self.value(node)
        if isinstance(value, str) and value in self.layouts:
            return self.layouts[value]
        try:
            return resolve_layout(value)
        except (LayoutError, MergeInputError, TypeError) as e:
            names = sorted(self.layouts)
            raise self.fail(
                node,
                f"{what}: {e}"
                + (f" (the recipe's layouts are {names})" if names else ""),
            ) from None

    def model(self, node: yaml.Node, what: str, allowed: tuple[str, ...]) -> ModelSpec:
        line = node.start_mark.line + 1
        if isinstance(node, yaml.ScalarNode):
            return ModelSpec(
                path=self.path(node, what), line=line, written=self.value(node)
            )
        keys = self.mapping(node, what, allowed)
        adapter = "adapter" in keys
        if adapter:
            # An adapter is read in its base's names: its own format or
            # layout would contradict the base's.
            clash = [k for k in ("path", "format", "layout") if k in keys]
            if clash:
                raise self.fail(
                    keys[clash[0]],
                    f"{what}: {clash[0]!r} with 'adapter': an adapter is read on the "
                    "recipe's base, in the base's format and layout",
                )
            keys["path"] = keys.pop("adapter")
        elif "path" not in keys:
            raise self.fail(
                node,
                f"{what} needs the key 'path'"
                + (" (or 'adapter')" if "adapter" in allowed else ""),
            )
        weight: Any = 1.0
        if "weight" in keys:
            weight = self.value(keys["weight"])
            points = weight
            if is_gradient(weight):
                try:
                    _check_gradient(weight)
                except MergeInputError as e:
                    raise self.fail(keys["weight"], f"{what} weight: {e}") from None
                points = [
                    *weight["gradient"],
                    *([weight["outside"]] if "outside" in weight else []),
                ]
            else:
                weight = float(
                    self.typed(keys["weight"], (int, float), f"{what} weight")
                )
                points = [weight]
            for w in points:
                if (
                    isinstance(w, bool)
                    or not isinstance(w, (int, float))
                    or not (0 <= w < float("inf"))
                ):
                    raise self.fail(
                        keys["weight"],
                        f"{what} weight must be finite and >= 0, got {w}",
                    )
        fmt = None
        if "format" in keys:
            fmt = self.typed(keys["format"], str, f"{what} format")
            if fmt not in FORMATS:
                raise self.fail(
                    keys["format"],
                    f"{what} format must be one of {FORMATS}, got {fmt!r}",
                )
        return ModelSpec(
            path=self.path(keys["path"], f"{what} path"),
            weight=weight,
            statistics=self.path(keys["statistics"], f"{what} statistics")
            if "statistics" in keys
            else None,
            layout=self.layout(keys["layout"], f"{what} layout")
            if "layout" in keys
            else Layout(),
            format=fmt,
            line=line,
            written=self.value(keys["path"]),
            parameters=self.typed(keys["parameters"], dict, f"{what} parameters")
            if "parameters" in keys
            else {},
            adapter=adapter,
        )

    def dtype(self, node: yaml.Node, what: str) -> np.dtype:
        """A floating dtype by name (``float32``, ``bfloat16`` …)."""
        name = self.typed(node, str, what)
        try:
            dtype = np.dtype(jnp.dtype(name))
        except TypeError:
            dtype = None
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise self.fail(
                node,
                f"{what} must name a floating dtype (float32, bfloat16, float16, float64), "
                f"got {name!r}",
            )
        if dtype.itemsize == 8 and not jax.config.read("jax_enable_x64"):
            raise self.fail(
                node,
                f"{what} float64 needs JAX's 64-bit mode: set JAX_ENABLE_X64=1 "
                "(or jax.config.update('jax_enable_x64', True)) before the merge",
            )
        return dtype


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a list",
        dict: "a mapping",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(value: Any) -> int:
    """Bytes from ``2GB``, ``500MiB`` or an integer.

    Examples:
      >>> parse_size("2GB"), parse_size("1.5KiB"), parse_size(10)
      (2000000000, 1536, 10)
    """
    m = None if isinstance(value, bool) else _SIZE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (expected e.g. 2GB, 500MiB or bytes)")
    size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if size < 1:
        raise ValueError(f"a shard size must be at least 1 byte, got {value!r}")
    return size


def parse_recipe(
    text: str, *, source: str = "<recipe>", directory: str | None = None
) -> Recipe:
    """Parses and validates recipe text (paths resolve against ``directory``).

    A mergekit recipe (one with ``merge_method``) is refused here, with a
    pointer to :func:`mats_jax.read_recipe`, which converts it.

    Raises:
      RecipeError: ``file:line: what is wrong and what to do``.

    Examples:
      >>> parse_recipe("models: [a]\\nmethod: ties\\nparameters: {density: 0.2}", source="r.yaml")
      Traceback (most recent call last):
      ...
      mats_jax.recipe.RecipeError: r.yaml:3: ties needs a base model: add `base: <path>` to the recipe
    """
    parser = _Parser(source, directory if directory is not None else os.getcwd())
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise RecipeError(f"{source}:{line}: not valid YAML: {e}") from None
    if root is None:
        raise RecipeError(
            f"{source}:1: the recipe is empty; it needs at least models and method"
        )
    if isinstance(root, yaml.MappingNode) and any(
        k.value == "merge_method" for k, _ in root.value
    ):
        raise RecipeError(
            f"{source}:1: this is a mergekit recipe (it has merge_method): run it "
            "with `mats-jax merge`, read it with mats_jax.mergekit.read_recipe, or "
            "convert it with `mats-jax convert`"
        )
    keys = parser.mapping(root, "the recipe", _TOP, required=("models", "method"))

    if "layouts" in keys:
        node = keys["layouts"]
        if not isinstance(node, yaml.MappingNode):
            raise parser.fail(node, "layouts must map names to lists of layout rules")
        for key_node, value_node in node.value:
            name = str(parser.value(key_node))
            parser.layouts[name] = parser.layout(value_node, f"layout {name!r}")

    method_node = keys["method"]
    method = parser.typed(method_node, str, "method")
    if method not in METHODS:
        close = difflib.get_close_matches(method, METHODS, n=1)
        raise parser.fail(
            method_node,
            f"unknown method {method!r}"
            + (f"; did you mean {close[0]!r}?" if close else "")
            + f" Methods: {', '.join(METHODS)}",
        )

    models_node = keys["models"]
    if not isinstance(models_node, yaml.SequenceNode) or not models_node.value:
        raise parser.fail(
            models_node,
            "models must be a non-empty list of paths or {path (or adapter), weight, "
            "statistics} mappings",
        )
    models = tuple(
        parser.model(n, f"models[{i}]", _MODEL) for i, n in enumerate(models_node.value)
    )
    base = parser.model(keys["base"], "base", _BASE) if "base" in keys else None
    for i, model in enumerate(models):
        if model.adapter and base is None:
            raise parser.fail(
                models_node.value[i],
                f"models[{i}] is an adapter, which changes a base: the recipe needs "
                "'base' (the model the adapter was trained from)",
            )

    parameters: dict[str, Any] = {}
    if "parameters" in keys:
        parameters = parser.typed(keys["parameters"], dict, "parameters")

    overrides = []
    if "overrides" in keys:
        node = keys["overrides"]
        if not isinstance(node, yaml.SequenceNode):
            raise parser.fail(
                node, "overrides must be a list of {pattern, method, parameters, skip}"
            )
        for i, item in enumerate(node.value):
            what = f"overrides[{i}]"
            o = parser.mapping(item, what, _OVERRIDE, required=("pattern",))
            rule = Override(
                pattern=parser.typed(o["pattern"], str, f"{what} pattern"),
                method=parser.typed(o["method"], str, f"{what} method")
                if "method" in o
                else None,
                parameters=parser.typed(o["parameters"], dict, f"{what} parameters")
                if "parameters" in o
                else {},
                skip=parser.typed(o["skip"], bool, f"{what} skip")
                if "skip" in o
                else False,
                line=item.start_mark.line + 1,
                take=_take(parser, o["take"], f"{what} take", len(models), base)
                if "take" in o
                else None,
            )
            if rule.unmerged and (rule.method or rule.parameters):
                raise parser.fail(
                    item,
                    f"{what}: {'skip: true' if rule.skip else 'take'} leaves the leaf "
                    "unmerged; drop method/parameters",
                )
            if rule.skip and rule.take is not None:
                raise parser.fail(
                    item, f"{what}: give skip or take, not both (skip is take: base)"
                )
            if rule.method is not None and rule.method not in METHODS:
                raise parser.fail(
                    o["method"],
                    f"{what}: unknown method {rule.method!r}; methods: {', '.join(METHODS)}",
                )
            if rule.pattern.startswith("re:"):
                try:
                    re.compile(rule.pattern[3:])
                except re.error as e:
                    raise parser.fail(
                        o["pattern"], f"{what}: bad regular expression: {e}"
                    ) from None
            overrides.append(rule)

    output = OutputSpec()
    if "output" in keys:
        node = keys["output"]
        if isinstance(node, yaml.ScalarNode):
            output = OutputSpec(
                path=parser.path(node, "output"), line=node.start_mark.line + 1
            )
        else:
            o = parser.mapping(node, "output", _OUTPUT)
            fmt = (
                parser.typed(o["format"], str, "output format")
                if "format" in o
                else "safetensors"
            )
            if fmt not in FORMATS:
                raise parser.fail(
                    o["format"], f"output format must be one of {FORMATS}, got {fmt!r}"
                )
            size = None
            if "max_shard_size" in o:
                try:
                    size = parse_size(parser.value(o["max_shard_size"]))
                except ValueError as e:
                    raise parser.fail(o["max_shard_size"], str(e)) from None
                if fmt != "safetensors":
                    raise parser.fail(
                        o["max_shard_size"],
                        "max_shard_size applies to safetensors output only",
                    )
            rank, targets = _lora_output(parser, o, keys)
            output = OutputSpec(
                lora_rank=rank,
                lora_targets=targets,
                path=parser.path(o["path"], "output path") if "path" in o else None,
                format=fmt,
                layout=parser.layout(o["layout"], "output layout")
                if "layout" in o
                else Layout(),
                max_shard_size=size,
                line=node.start_mark.line + 1,
                copy_files=parser.typed(o["copy_files"], bool, "output copy_files")
                if "copy_files" in o
                else True,
            )

    tied: dict[str, str] = {}
    if "tied" in keys:
        tied = parser.typed(keys["tied"], dict, "tied")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
            raise parser.fail(
                keys["tied"],
                "tied maps leaf paths to leaf paths: {lm_head/kernel: embed/embedding}",
            )
    vocab = "refuse"
    if "vocab" in keys:
        vocab = parser.typed(keys["vocab"], str, "vocab")
        if vocab not in VOCAB_POLICIES:
            raise parser.fail(
                keys["vocab"], f"vocab must be one of {VOCAB_POLICIES}, got {vocab!r}"
            )
    seed = parser.typed(keys["seed"], int, "seed") if "seed" in keys else 0
    if not 0 <= seed < 2**63:
        raise parser.fail(keys["seed"], f"seed must lie in [0, 2**63), got {seed}")

    recipe = Recipe(
        models=models,
        method=method,
        base=base,
        parameters=parameters,
        overrides=tuple(overrides),
        output=output,
        tied=tied,
        vocab=vocab,
        seed=seed,
        source=source,
        text=text,
        method_line=method_node.start_mark.line + 1,
        tied_line=keys["tied"].start_mark.line + 1 if "tied" in keys else 0,
        dtype=parser.dtype(keys["dtype"], "dtype") if "dtype" in keys else None,
        out_dtype=parser.dtype(keys["out_dtype"], "out_dtype")
        if "out_dtype" in keys
        else None,
    )
    _check_semantics(recipe, parser, keys)
    return recipe


def _lora_output(
    parser: _Parser, o: Mapping[str, yaml.Node], keys: Mapping[str, yaml.Node]
) -> tuple[int | None, tuple[str, ...]]:
    """``output.lora: {rank, targets}``: the rank and target patterns, checked."""
    if "lora" not in o:
        return None, ()
    node = o["lora"]
    lora = parser.mapping(node, "output lora", _LORA, required=("rank",))
    rank = parser.typed(lora["rank"], int, "output lora rank")
    if rank < 1:
        raise parser.fail(lora["rank"], f"output lora rank must be ≥ 1, got {rank}")
    if "base" not in keys:
        raise parser.fail(
            node,
            "output lora is the merged model's change to a base: the recipe needs 'base'",
        )
    for key in ("format", "max_shard_size", "layout"):
        if key in o:
            raise parser.fail(
                o[key],
                f"output {key} does not apply to a LoRA output (PEFT's safetensors "
                "folder, named as the base checkpoint)",
            )
    targets: tuple[str, ...] = ()
    if "targets" in lora:
        value = parser.value(lora["targets"])
        value = [value] if isinstance(value, str) else value
        if not (
            isinstance(value, list) and value and all(isinstance(t, str) for t in value)
        ):
            raise parser.fail(
                lora["targets"],
                "output lora targets must be a leaf-path pattern or a list of them",
            )
        targets = tuple(value)
    return rank, targets


def _take(
    parser: _Parser, node: yaml.Node, what: str, models: int, base: ModelSpec | None
) -> str | int:
    """``take: base`` or ``take: <model index>``, checked against the recipe's inputs."""
    value = parser.value(node)
    if value == "base":
        if base is None:
            raise parser.fail(node, f"{what}: base, but the recipe has no base")
        return "base"
    if isinstance(value, bool) or not isinstance(value, int):
        raise parser.fail(
            node,
            f"{what} must be 'base' or a model's index (0..{models - 1}), got {value!r}",
        )
    if not 0 <= value < models:
        raise parser.fail(
            node,
            f"{what}: no models[{value}]; the recipe has {models} models (0..{models - 1})",
        )
    return value


def _check_semantics(
    recipe: Recipe, parser: _Parser, keys: dict[str, yaml.Node]
) -> None:
    """Checks what needs the whole recipe: methods' needs and parameters."""
    _check_model_parameters(recipe, parser, keys)
    uses: list[tuple[str, Override | None, yaml.Node]] = [
        (recipe.method, None, keys.get("parameters", keys["method"]))
    ]
    for override, item in zip(
        recipe.overrides, getattr(keys.get("overrides"), "value", []), strict=False
    ):
        if not override.unmerged:
            uses.append((override.method or recipe.method, override, item))
    for name, rule, node in uses:
        method = get_method(name)
        try:
            for params in _parameter_variants(recipe, name, rule):
                record = build_parameters(method, params)
                check_per_model(name, record, len(recipe.models))
        except MergeInputError as e:
            raise parser.fail(node, f"{name} parameters: {e}") from None
        needs = method.needs(record)
        if needs.base and recipe.base is None:
            raise parser.fail(
                node,
                f"{name} needs a base model"
                + (" (for its init or fallback)" if method.data_dependent else "")
                + ": add `base: <path>` to the recipe",
            )
        if needs.statistics:
            for i, m in enumerate(recipe.models):
                if m.statistics is None:
                    raise parser.fail(
                        keys["models"].value[i],
                        f"{name} needs statistics for every model: add `statistics: <dir>` "
                        f"(saved with mats_jax.save_statistics) to models[{i}]",
                    )
    if all(not is_gradient(m.weight) and m.weight == 0 for m in recipe.models):
        raise parser.fail(
            keys["models"],
            "every model has weight 0; at least one weight must be positive",
        )


def _check_model_parameters(
    recipe: Recipe, parser: _Parser, keys: dict[str, yaml.Node]
) -> None:
    """Each model's own ``parameters`` name per-model parameters of the
    recipe's method (or of an override's)."""
    methods = {recipe.method} | {r.method for r in recipe.overrides if r.method}
    allowed = sorted(
        {f for name in methods for f in per_model_fields(get_method(name).Parameters)}
    )
    for i, model in enumerate(recipe.models):
        for name in model.parameters:
            if name not in allowed:
                raise parser.fail(
                    keys["models"].value[i],
                    f"models[{i}] parameters: {name!r} is not a per-model parameter "
                    f"of {', '.join(sorted(methods))} (per-model: "
                    f"{', '.join(allowed) or 'none'}); "
                    + (
                        "give the model's weight as `weight:` in its entry"
                        if name == "weight"
                        else "set it in the recipe's `parameters`"
                    ),
                )


def _parameter_variants(
    recipe: Recipe, method: str, rule: Override | None
) -> list[dict[str, Any]]:
    """The parameters a method is used with (the recipe's, or an override's),
    once per value a layer gradient in them can take, so that every value is
    validated before any tensor is read."""
    params = recipe.method_parameters(method, rule)

    def values(value: Any) -> list[Any]:
        if isinstance(value, tuple):  # per model: vary one model's at a time
            first = tuple(values(v)[0] for v in value)
            out = [first]
            for m, v in enumerate(value):
                out += [(*first[:m], x, *first[m + 1 :]) for x in values(v)[1:]]
            return out
        if not is_gradient(value):
            return [value]
        _check_gradient(value)
        points = [float(v) for v in value["gradient"]]
        return points + ([value["outside"]] if "outside" in value else [])

    variants = [{n: values(v)[0] for n, v in params.items()}]
    for name, value in params.items():
        for v in values(value)[1:]:
            variants.append({**variants[0], name: v})
    return variants


def _check_gradient(value: Mapping[str, Any]) -> None:
    unknown = sorted(set(value) - {"gradient", "outside"})
    if unknown:
        raise MergeInputError(
            f"a layer gradient has keys gradient and outside, got {unknown}"
        )
    points = value["gradient"]
    if (
        not isinstance(points, list)
        or not points
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in points
        )
    ):
        raise MergeInputError(
            f"gradient must be a non-empty list of numbers, one per point along "
            f"the layers, got {points!r}"
        )


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Reads and validates a recipe file; relative paths in it are relative to its directory.

    Raises:
      FileNotFoundError: if the file does not exist.
      RecipeError: ``file:line: message`` for anything wrong in it.

    Examples:
      >>> import os, tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "recipe.yaml")
      >>> _ = open(path, "w").write("base: base/\\nmodels: [ft/]\\nmethod: task_arithmetic\\n")
      >>> recipe = load_recipe(path)
      >>> recipe.base.path == os.path.join(os.path.dirname(path), "base")
      True
    """
    path = os.fspath(path)
    return parse_recipe(
        recipe_text(path), source=path, directory=os.path.dirname(os.path.abspath(path))
    )


def recipe_text(path: str | os.PathLike[str]) -> str:
    """A recipe file's text, which must be UTF-8.

    Raises:
      FileNotFoundError: if the file does not exist.
      RecipeError: ``file:line:`` where a byte is not UTF-8.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecipeError(
            f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); save the "
            "recipe as UTF-8"
        ) from None
