"""mergekit recipes as mats_jax recipes: the same merge, in our recipe's terms.

A mergekit YAML (``merge_method``, ``base_model``, ``models`` with
``parameters``, ``dtype``, ...) becomes a mats_jax recipe
(:mod:`mats_jax.recipe`) that computes what mergekit computes, with
mergekit's defaults written out (``normalize``, ``rescale``, per-tensor
trimming). ``mats-jax merge`` runs a mergekit YAML directly; ``mats-jax
convert`` writes ours so it can be read and edited.

How the pieces map:

- **methods**: ``linear`` → ``average``; ``task_arithmetic``; ``ties`` →
  ``ties`` with ``trim: per_leaf``; ``dare_ties`` / ``dare_linear`` →
  ``dare`` (``drop_rate = 1 − density``, with or without sign election);
  ``breadcrumbs`` / ``breadcrumbs_ties`` → ``breadcrumbs``; ``della`` /
  ``della_linear`` → ``della`` (``lambda`` → ``scale``); ``slerp`` (its
  ``base_model`` is the t = 0 end); ``multislerp``; ``model_stock`` with
  ``clip_cosine: false`` (mergekit's unclipped ratio).
- **parameters**: a number as it is; a list is a layer gradient
  (``{gradient: [...]}``, interpolated over the layers as mergekit does); a
  list of ``{filter: s, value: v}`` entries becomes overrides whose pattern
  matches leaf paths containing ``s`` (dots read as ``/``), the entry
  without a filter the default.
- **per model**: ``weight`` is the model's weight; ``density``, ``gamma``,
  ``epsilon`` become per-model parameters (``drop_rate`` for DARE).
- **dtype** is the arithmetic dtype and, without ``out_dtype``, the
  output's; ``tokenizer_source: base`` is what copying the base folder's
  files does already.

What has no counterpart (``slices``, other ``merge_method`` values,
``tokenizer``/``chat_template`` options, LoRA ``model+adapter`` syntax, a
filter list in a model's own parameters) is an error naming the key and its
line, before any tensor is read.

Examples:
  >>> text = '''
  ... merge_method: ties
  ... base_model: base
  ... models:
  ...   - model: a
  ...     parameters: {weight: 1.0, density: 0.5}
  ...   - model: b
  ...     parameters: {weight: 0.5, density: 0.7}
  ... dtype: bfloat16
  ... '''
  >>> print(convert_mergekit(text, source="m.yaml"), end="")
  # Converted from the mergekit recipe m.yaml.
  base: base
  models:
  - path: a
    parameters:
      density: 0.5
  - path: b
    weight: 0.5
    parameters:
      density: 0.7
  method: ties
  parameters:
    trim: per_leaf
    normalize: true
    density: 1.0
  dtype: bfloat16
  out_dtype: bfloat16
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from mats_jax.recipe import Recipe, RecipeError, load_recipe, parse_recipe, recipe_text

__all__ = ["MERGEKIT_METHODS", "convert_mergekit", "is_mergekit_recipe", "read_recipe"]

MERGEKIT_METHODS: Mapping[str, tuple[str, Mapping[str, Any]]] = {
    "linear": ("average", {}),
    "task_arithmetic": ("task_arithmetic", {"normalize": False}),
    "ties": ("ties", {"trim": "per_leaf", "normalize": True}),
    "dare_ties": (
        "dare",
        {"sign_election": True, "normalize": False, "rescale": True},
    ),
    "dare_linear": (
        "dare",
        {"sign_election": False, "normalize": False, "rescale": True},
    ),
    "breadcrumbs": ("breadcrumbs", {"sign_election": False, "normalize": False}),
    "breadcrumbs_ties": ("breadcrumbs", {"sign_election": True, "normalize": False}),
    "della": ("della", {"sign_election": True, "normalize": True, "rescale": True}),
    "della_linear": (
        "della",
        {"sign_election": False, "normalize": False, "rescale": True},
    ),
    "slerp": ("slerp", {}),
    "multislerp": ("multislerp", {}),
    "model_stock": ("model_stock", {"clip_cosine": False}),
}
"""mergekit's ``merge_method`` → (our method, the parameters that give
mergekit's defaults)."""

# mergekit parameter → ours, per method (parameters not listed keep their name).
_RENAMED = {"della": {"lambda": "scale"}, "della_linear": {"lambda": "scale"}}
# Per-model (tensor) parameters besides the weight, per mergekit method.
_PER_MODEL = {
    "ties": ("density",),
    "dare_ties": ("density",),
    "dare_linear": ("density",),
    "breadcrumbs": ("density", "gamma"),
    "breadcrumbs_ties": ("density", "gamma"),
    "della": ("density", "epsilon"),
    "della_linear": ("density", "epsilon"),
}
# mergekit's defaults for per-model parameters it does not require.
_DEFAULTS = {
    "ties": {"density": 1.0},
    "dare_ties": {"density": 1.0},
    "dare_linear": {"density": 1.0},
    "breadcrumbs": {"density": 1.0, "gamma": 0.01},
    "breadcrumbs_ties": {"density": 1.0, "gamma": 0.01},
    "della": {"density": 1.0, "epsilon": 0.15},
    "della_linear": {"density": 1.0, "epsilon": 0.15},
}
_DARE = ("dare_ties", "dare_linear")
_TOP = (
    "base_model",
    "dtype",
    "merge_method",
    "models",
    "out_dtype",
    "parameters",
    "tokenizer_source",
)
_UNSUPPORTED = {
    "slices": "layer slices (passthrough/frankenmerges) have no counterpart; merge whole models",
    "tokenizer": "tokenizer merging has no counterpart; the base folder's tokenizer is copied",
    "chat_template": "chat templates are copied with the base folder's files",
    "modules": "multi-module configurations have no counterpart",
}


def read_recipe(path: str | os.PathLike[str]) -> Recipe:
    """A recipe file, ours or mergekit's (converted by :func:`convert_mergekit`).

    Errors in a converted recipe name the mergekit file, and lines of the
    converted text (``mats-jax convert`` prints it).

    Raises:
      FileNotFoundError: if the file does not exist.
      RecipeError: ``file:line: message``.

    Examples:
      >>> import os, tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "m.yml")
      >>> _ = open(path, "w").write("models: [{model: a}, {model: b}]\\nmerge_method: linear\\n")
      >>> read_recipe(path).method
      'average'
    """
    path = os.fspath(path)
    text = recipe_text(path)
    if not is_mergekit_recipe(text):
        return load_recipe(path)
    return parse_recipe(
        convert_mergekit(text, source=path),
        source=f"{path} (converted from mergekit: see `mats-jax convert`)",
        directory=os.path.dirname(os.path.abspath(path)),
    )


def is_mergekit_recipe(text: str) -> bool:
    """Whether YAML text is a mergekit recipe (it has ``merge_method``).

    Examples:
      >>> is_mergekit_recipe("merge_method: slerp\\n"), is_mergekit_recipe("method: ties\\n")
      (True, False)
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return False
    return isinstance(root, yaml.MappingNode) and any(
        k.value == "merge_method" for k, _ in root.value
    )


class _Lines:
    """Line numbers of a YAML document's nodes, by key path."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = mark.line + 1 if mark is not None else 1
            raise RecipeError(f"{source}:{line}: not valid YAML: {e}") from None
        self.lines: dict[tuple[Any, ...], int] = {}
        self._walk(root, ())

    def _walk(self, node: Any, path: tuple[Any, ...]) -> None:
        if node is None:
            return
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = (*path, k.value)
                self._walk(v, key)
                self.lines[key] = (
                    k.start_mark.line + 1
                )  # the key's line, not its value's
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self._walk(v, (*path, i))

    def fail(self, path: tuple[Any, ...], message: str) -> RecipeError:
        while path and path not in self.lines:
            path = path[:-1]
        return RecipeError(f"{self.source}:{self.lines.get(path, 1)}: {message}")


def _filter_pattern(text: str) -> str:
    """A mergekit filter (a substring of tensor names) as our ``re:`` pattern
    over leaf paths, whose components are separated by ``/``."""
    return "re:" + re.escape(text).replace(r"\.", "/")


def _value(lines: _Lines, path: tuple[Any, ...], value: Any) -> Any:
    """A mergekit parameter value: a number, or a list as a layer gradient."""
    if isinstance(value, list):
        if not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise lines.fail(
                path,
                f"{path[-1]}: a list is a gradient over the layers and must hold "
                f"numbers, got {value!r}",
            )
        return {"gradient": [float(v) for v in value]}
    return value


def _conditional(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, Mapping) and "value" in v for v in value)
    )


def convert_mergekit(text: str, *, source: str = "<mergekit recipe>") -> str:
    """A mergekit YAML recipe as the text of the mats_jax recipe that does the same merge.

    Raises:
      RecipeError: ``file:line:`` naming the mergekit key that has no
        counterpart, or a value that cannot be mapped.

    Examples:
      >>> text = "models: [{model: a}, {model: b}]\\nmerge_method: slerp\\nbase_model: a\\n"
      >>> print(convert_mergekit(text + "parameters: {t: [0, 1]}\\n", source="s.yml"), end="")
      # Converted from the mergekit recipe s.yml.
      base: a
      models:
      - path: a
      - path: b
      method: slerp
      parameters:
        t:
          gradient:
          - 0.0
          - 1.0
      >>> convert_mergekit("models: [{model: a}]\\nmerge_method: nuslerp\\n", source="s.yml")
      Traceback (most recent call last):
      ...
      mats_jax.recipe.RecipeError: s.yml:2: mergekit merge_method 'nuslerp' has no counterpart in mats_jax; supported: linear, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear, slerp, multislerp, model_stock
    """
    lines = _Lines(text, source)
    config = yaml.safe_load(text)
    if not isinstance(config, dict) or "merge_method" not in config:
        raise RecipeError(f"{source}:1: not a mergekit recipe (no merge_method)")
    for key in config:
        if key in _UNSUPPORTED:
            raise lines.fail((key,), f"mergekit key {key!r}: {_UNSUPPORTED[key]}")
        if key not in _TOP:
            raise lines.fail(
                (key,),
                f"mergekit key {key!r} has no counterpart in mats_jax "
                f"(supported: {', '.join(_TOP)})",
            )
    name = config["merge_method"]
    if name not in MERGEKIT_METHODS:
        raise lines.fail(
            ("merge_method",),
            f"mergekit merge_method {name!r} has no counterpart in mats_jax; "
            f"supported: {', '.join(MERGEKIT_METHODS)}",
        )
    method, fixed = MERGEKIT_METHODS[name]
    renamed = _RENAMED.get(name, {})
    per_model = _PER_MODEL.get(name, ())

    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise lines.fail(
            ("models",), "models must be a non-empty list of {model: path}"
        )
    base = config.get("base_model")
    entries: list[dict[str, Any]] = []
    for i, item in enumerate(models):
        where = ("models", i)
        if not isinstance(item, dict) or "model" not in item:
            raise lines.fail(
                where, f"models[{i}] must be a mapping with `model: <path>`"
            )
        extra = sorted(set(item) - {"model", "parameters"})
        if extra:
            raise lines.fail(
                (*where, extra[0]), f"models[{i}]: key {extra[0]!r} has no counterpart"
            )
        path = item["model"]
        if not isinstance(path, str):
            raise lines.fail((*where, "model"), f"models[{i}] model must be a path")
        if "+" in path:
            raise lines.fail(
                (*where, "model"),
                f"models[{i}]: {path!r} applies a LoRA adapter (model+adapter), "
                "which mats_jax does not read yet",
            )
        entries.append(
            {"path": path, **_model_parameters(lines, name, i, item, per_model)}
        )

    if name == "slerp":
        # mergekit's slerp: the base model is the t = 0 end and one of the models.
        others = [e for e in entries if e["path"] != base]
        if base is None or len(others) != 1 or len(entries) != 2:
            raise lines.fail(
                ("models",),
                "mergekit slerp needs base_model and exactly one other model "
                "(the base is the t = 0 end)",
            )
        entries = [{"path": base}, others[0]]
    elif base is not None:
        # mergekit lists the base among the models; ours is apart.
        entries = [e for e in entries if e["path"] != base]
        if not entries:
            raise lines.fail(("models",), "the only model is the base model")

    parameters: dict[str, Any] = dict(fixed)
    overrides: list[dict[str, Any]] = []
    for key, value in (config.get("parameters") or {}).items():
        ours = renamed.get(key, key)
        where = ("parameters", key)
        if key == "weight":
            raise lines.fail(where, "a global weight: give each model its `weight`")
        if key == "int8_mask":
            continue  # a memory option of mergekit's; merges compute in float32
        dare_density = name in _DARE and key == "density"
        if dare_density:
            ours = "drop_rate"
        choices = value if _conditional(value) else [{"value": value}]
        for j, entry in enumerate(choices):
            at = (*where, j, "value") if choices is value else where
            v = _value(lines, at, entry["value"])
            if dare_density:
                v = _drop_rate(lines, at, v)
            # mergekit reads `filter` (older recipes: `pattern`).
            text = entry.get("filter", entry.get("pattern"))
            if text is None:
                parameters[ours] = v
            else:
                overrides.append(
                    {"pattern": _filter_pattern(str(text)), "parameters": {ours: v}}
                )
    for key, default in _DEFAULTS.get(name, {}).items():
        ours = "drop_rate" if (name in _DARE and key == "density") else key
        parameters.setdefault(ours, 1.0 - default if ours == "drop_rate" else default)

    companion = {"breadcrumbs": "gamma", "della": "epsilon"}.get(method)
    if companion is not None:
        # mergekit leaves a task vector of density 1 as it is, whatever its
        # gamma or epsilon (their defaults 0.01 and 0.15 included): here that
        # is gamma or epsilon 0 (with them, density 1 would be out of range).
        _density_one_keeps_everything(parameters, entries, companion)
    if name == "linear":
        if parameters.pop("normalize", True) is not True:
            raise lines.fail(
                ("parameters", "normalize"),
                "linear with normalize: false (an unnormalised weighted sum) has no "
                "counterpart; use task_arithmetic",
            )
    recipe: dict[str, Any] = {}
    if base is not None:
        recipe["base"] = base
    recipe["models"] = entries
    recipe["method"] = method
    if parameters:
        recipe["parameters"] = parameters
    if overrides:
        recipe["overrides"] = overrides
    if "dtype" in config:
        recipe["dtype"] = config["dtype"]
        recipe["out_dtype"] = config.get("out_dtype", config["dtype"])
    elif "out_dtype" in config:
        recipe["out_dtype"] = config["out_dtype"]
    source_of_tokenizer = config.get("tokenizer_source")
    if source_of_tokenizer not in (None, "base", base):
        raise lines.fail(
            ("tokenizer_source",),
            f"tokenizer_source {source_of_tokenizer!r}: only the base model's "
            "tokenizer is supported (its files are copied with the base folder's)",
        )
    header = f"# Converted from the mergekit recipe {source}.\n"
    return header + yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False)


def _model_parameters(
    lines: _Lines,
    name: str,
    i: int,
    item: Mapping[str, Any],
    per_model: tuple[str, ...],
) -> dict[str, Any]:
    """A model entry's ``weight`` and per-model parameters."""
    out: dict[str, Any] = {}
    own: dict[str, Any] = {}
    for key, value in (item.get("parameters") or {}).items():
        where = ("models", i, "parameters", key)
        if _conditional(value):
            raise lines.fail(
                where,
                f"models[{i}] {key}: a filter list in a model's own parameters has "
                "no counterpart; use the recipe's parameters",
            )
        if key == "weight":
            out["weight"] = _value(lines, where, value)
        elif key in per_model:
            if name in _DARE and key == "density":
                own["drop_rate"] = _drop_rate(lines, where, _value(lines, where, value))
            else:
                own[key] = _value(lines, where, value)
        else:
            raise lines.fail(
                where,
                f"models[{i}] parameter {key!r} is not a per-model parameter of "
                f"mergekit's {name} (per model: weight"
                + "".join(f", {p}" for p in per_model)
                + ")",
            )
    if out.get("weight", 1.0) == 1.0:
        out.pop("weight", None)
    if own:
        out["parameters"] = own
    return out


def _density_one_keeps_everything(
    parameters: dict[str, Any], entries: list[dict[str, Any]], companion: str
) -> None:
    if parameters.get("density") == 1.0:
        parameters[companion] = 0.0
    for entry in entries:
        own = entry.get("parameters", {})
        if own.get("density") == 1.0:
            own[companion] = 0.0
        elif "density" in own and parameters.get(companion) == 0.0:
            # Its own density below 1 sparsifies: mergekit's default applies.
            own.setdefault(
                companion,
                _DEFAULTS["breadcrumbs" if companion == "gamma" else "della"][
                    companion
                ],
            )


def _drop_rate(lines: _Lines, where: tuple[Any, ...], density: Any) -> Any:
    """DARE's drop rate p = 1 − density, for a number or a gradient."""
    if isinstance(density, Mapping) and "gradient" in density:
        return {"gradient": [1.0 - float(v) for v in density["gradient"]]}
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise lines.fail(where, f"density must be a number, got {density!r}")
    return 1.0 - float(density)
