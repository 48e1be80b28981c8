"""Pytree arithmetic, task vectors, leaf paths and leaf selection.

Every merge method works leaf by leaf over parameter pytrees (nested dicts of
arrays, as Flax stores them). This module holds the few pytree operations they
share, so each exists once: arithmetic that keeps each leaf's dtype, task
vectors, the path string used in every error message, and the selection of
leaves by path pattern or by a label pytree (as ``optax.partition`` does).

Examples:
  >>> import jax.numpy as jnp
  >>> from mats_jax import tree
  >>> base = {"dense": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}}
  >>> ft = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  >>> tree.task_vectors(base, [ft])[0]["dense"]["bias"]
  Array([1., 1.], dtype=float32)
  >>> tree.leaf_paths(base)["dense"]["kernel"]
  'dense/kernel'
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from mats_jax.typing import Params

T = TypeVar("T")

__all__ = [
    "add",
    "compute_dtype",
    "is_per_model",
    "labels_by_pattern",
    "leaf_paths",
    "map_with_path",
    "model_value",
    "nest_paths",
    "path_str",
    "pattern_matches",
    "register_record",
    "scale",
    "select",
    "sub",
    "task_vectors",
    "total",
    "vdot",
    "weighted_sum",
]


def path_str(path: Sequence[Any]) -> str:
    """Formats a JAX key path as ``a/b/0/kernel``, the form used in every message.

    Args:
      path: a key path, as given by ``jax.tree_util.tree_flatten_with_path``.

    Returns:
      The keys joined by ``/``; ``<root>`` for the empty path (a bare array).

    Examples:
      >>> import jax
      >>> [(p, _)] = jax.tree_util.tree_flatten_with_path({"a": [0, 1]})[0][1:]
      >>> path_str(p)
      'a/1'
    """
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts) if parts else "<root>"


def nest_paths(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts from ``/``-joined leaf paths: the inverse of :func:`path_str`
    for trees of dicts.

    Examples:
      >>> nest_paths({"a/b": 1, "a/c": 2, "d": 3})
      {'a': {'b': 1, 'c': 2}, 'd': 3}
    """
    out: dict[str, Any] = {}
    for name, value in flat.items():
        node = out
        *parents, last = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def map_with_path(fn: Callable[..., Any], tree: Params, *rest: Any) -> Any:
    """``jax.tree.map`` whose function also receives the leaf's path string.

    Args:
      fn: called as ``fn(path, leaf, *other_leaves)``.
      tree: the pytree whose leaves are visited.
      *rest: pytrees with ``tree``'s structure as a prefix.

    Returns:
      A pytree with ``tree``'s structure holding ``fn``'s results.

    Examples:
      >>> map_with_path(lambda p, x: p, {"a": 1, "b": {"c": 2}})
      {'a': 'a', 'b': {'c': 'b/c'}}
    """
    return jax.tree_util.tree_map_with_path(
        lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest
    )


def leaf_paths(tree: Params) -> Any:
    """A pytree of the same structure whose leaves are their own path strings.

    Examples:
      >>> leaf_paths({"layer": {"kernel": 0.0}})
      {'layer': {'kernel': 'layer/kernel'}}
    """
    return map_with_path(lambda p, _: p, tree)


def compute_dtype(dtype: Any) -> np.dtype:
    """The dtype merge arithmetic runs in for a leaf of ``dtype``.

    Low-precision floats (bfloat16, float16) are merged in float32 and cast
    back, so that sums of many task vectors do not lose their small entries.

    Examples:
      >>> import jax.numpy as jnp
      >>> compute_dtype(jnp.bfloat16)
      dtype('float32')
    """
    return np.promote_types(dtype, np.float32)


def total(items: Iterable[T]) -> T:
    """The sum of a non-empty iterable of arrays, without Python ``sum``'s ``0`` start.

    Examples:
      >>> import jax.numpy as jnp
      >>> total(x for x in [jnp.ones(2), jnp.ones(2)])
      Array([2., 2.], dtype=float32)
    """
    return functools.reduce(operator.add, items)


def add(a: Params, b: Params) -> Params:
    """Leafwise ``a + b``."""
    return jax.tree.map(jnp.add, a, b)


def sub(a: Params, b: Params) -> Params:
    """Leafwise ``a - b``."""
    return jax.tree.map(jnp.subtract, a, b)


def scale(s: Any, a: Params) -> Params:
    """Leafwise ``s * a``, keeping each leaf's dtype."""
    return jax.tree.map(
        lambda x: (s * x.astype(compute_dtype(x.dtype))).astype(x.dtype), a
    )


def vdot(a: Params, b: Params) -> jax.Array:
    """The inner product of two pytrees, summed over every leaf, in float32 or wider."""
    parts = jax.tree.leaves(
        jax.tree.map(
            lambda x, y: jnp.vdot(
                x.astype(compute_dtype(x.dtype)), y.astype(compute_dtype(y.dtype))
            ),
            a,
            b,
        )
    )
    return sum(parts, jnp.zeros((), jnp.float32))


def weighted_sum(weights: Any, trees: Sequence[Params]) -> Params:
    """``Σ_m weights[m] · trees[m]``, computed in float32 (or wider) per leaf.

    The result keeps the compute dtype; callers cast back where they return
    parameters.

    Examples:
      >>> import jax.numpy as jnp
      >>> weighted_sum(jnp.array([1.0, 2.0]), [{"w": jnp.ones(2)}, {"w": jnp.ones(2)}])
      {'w': Array([3., 3.], dtype=float32)}
    """

    def leaf_sum(*leaves: jax.Array) -> jax.Array:
        dtype = compute_dtype(leaves[0].dtype)
        total = jnp.zeros(leaves[0].shape, dtype)
        for m, leaf in enumerate(leaves):
            total = total + weights[m].astype(dtype) * leaf.astype(dtype)
        return total

    return jax.tree.map(leaf_sum, *trees)


def task_vectors(base: Params, models: Sequence[Params]) -> list[Params]:
    """Task vectors ``τ_m = θ_m − θ_0``, in each leaf's compute dtype.

    .. math:: \\tau_m = \\theta_m - \\theta_0

    Args:
      base: the pretrained parameters θ₀.
      models: the fine-tuned parameters θ_1 … θ_M, each with ``base``'s structure.

    Returns:
      A list of M pytrees. Low-precision leaves are promoted to float32 so the
      difference is exact enough to sum.

    Examples:
      >>> import jax.numpy as jnp
      >>> from mats_jax import task_vectors
      >>> base = {"w": jnp.ones(2, dtype=jnp.bfloat16)}
      >>> task_vectors(base, [{"w": jnp.array([2.0, 3.0], dtype=jnp.bfloat16)}])
      [{'w': Array([1., 2.], dtype=float32)}]
    """

    def diff(b: jax.Array, m: jax.Array) -> jax.Array:
        dtype = compute_dtype(b.dtype)
        return m.astype(dtype) - b.astype(dtype)

    return [jax.tree.map(diff, base, model) for model in models]


def pattern_matches(pattern: str, path: str) -> bool:
    """Whether a leaf-path pattern matches ``path``.

    A pattern starting with ``re:`` is a regular expression searched in the
    path; anything else is a shell-style glob matched against the whole path.

    Examples:
      >>> pattern_matches("*/kernel", "dense/kernel"), pattern_matches("re:^dense", "dense/bias")
      (True, True)
    """
    if pattern.startswith("re:"):
        return re.search(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern)


def select(tree: Params, patterns: str | Sequence[str]) -> Any:
    """A boolean pytree: True at the leaves whose path matches any pattern.

    Patterns are shell-style globs matched against the whole path
    (``"*/kernel"``, ``"encoder/layers_*/attention/*"``), or regular expressions
    searched in the path when prefixed with ``re:`` (``"re:(query|key)"``).

    Raises:
      ValueError: if a pattern matches no leaf (a silent typo would otherwise
        leave the model unchanged).

    Examples:
      >>> select({"a": {"kernel": 0, "bias": 0}, "b": {"kernel": 0}}, "*/kernel")
      {'a': {'bias': False, 'kernel': True}, 'b': {'kernel': True}}
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    paths = jax.tree.leaves(leaf_paths(tree))
    for pattern in patterns:
        if not any(pattern_matches(pattern, p) for p in paths):
            raise ValueError(
                f"pattern {pattern!r} matches no leaf; the leaves are: "
                + ", ".join(paths[:20])
                + (" …" if len(paths) > 20 else "")
            )
    return map_with_path(
        lambda p, _: any(pattern_matches(pat, p) for pat in patterns), tree
    )


def labels_by_pattern(
    tree: Params, rules: Mapping[str, str] | Sequence[tuple[str, str]], default: str
) -> Any:
    """A label pytree from ``(pattern, label)`` rules; the first matching rule wins.

    The result can drive per-leaf choices the way ``optax.partition`` uses
    labels: which statistic, which method, or which leaves to skip.

    Raises:
      ValueError: if a rule's pattern matches no leaf.

    Examples:
      >>> labels_by_pattern({"emb": 0, "dense": {"kernel": 0}}, {"*/kernel": "kfac"}, "avg")
      {'dense': {'kernel': 'kfac'}, 'emb': 'avg'}
    """
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    select(tree, [pattern for pattern, _ in items])  # every rule must match something

    def label(path: str, _: Any) -> str:
        for pattern, name in items:
            if pattern_matches(pattern, path):
                return name
        return default

    return map_with_path(label, tree)


R = TypeVar("R", bound=type)


def is_per_model(value: Any) -> bool:
    """Whether a parameter's value is one value per model (a 1-D sequence or
    array) rather than one value for all."""
    return isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) == 1


def model_value(value: Any, m: int) -> Any:
    """Model ``m``'s value of a per-model parameter: ``value[m]`` when it is one
    value per model (a 1-D sequence or array), else ``value`` itself.

    Examples:
      >>> model_value((0.2, 0.5), 1), model_value(0.3, 1)
      (0.5, 0.3)
    """
    return value[m] if is_per_model(value) else value


def register_record(cls: R) -> R:
    """Registers a frozen dataclass of parameters as a pytree.

    Numbers and arrays become the pytree's data, so a jitted function taking
    the record traces them and sweeping them does not recompile; the fields
    named in the class's ``static_fields`` (choices that change the program:
    a trim mode, a flag) and any field holding a string or None are metadata,
    part of the tree structure. A field holding a pytree (an initialisation,
    a nested record) is data. Unflattening does not call ``__init__``, so a
    record's validation runs only when it is built, not inside JAX transforms.

    Examples:
      >>> import dataclasses, jax
      >>> @register_record
      ... @dataclasses.dataclass(frozen=True)
      ... class Options:
      ...     static_fields = ("mode",)  # not annotated: not a field
      ...     scale: float = 1.0
      ...     mode: str = "a"
      ...     init: object = None
      >>> jax.tree.leaves(Options(scale=0.5, init={"w": 2.0}))
      [0.5, 2.0]
      >>> jax.jit(lambda o: o.scale * 2)(Options(scale=3.0))
      Array(6., dtype=float32, weak_type=True)
    """
    names = tuple(f.name for f in dataclasses.fields(cls))
    static = frozenset(getattr(cls, "static_fields", ()))

    def is_meta(name: str, value: Any) -> bool:
        return name in static or value is None or isinstance(value, str)

    def flatten_with_keys(obj: Any) -> tuple[list[tuple[Any, Any]], Any]:
        values = [(n, getattr(obj, n)) for n in names]
        children = [
            (jax.tree_util.GetAttrKey(n), v) for n, v in values if not is_meta(n, v)
        ]
        meta = tuple((n, v) for n, v in values if is_meta(n, v))
        return children, (meta, tuple(n for n, v in values if not is_meta(n, v)))

    def flatten(obj: Any) -> tuple[list[Any], Any]:
        children, aux = flatten_with_keys(obj)
        return [v for _, v in children], aux

    def unflatten(aux: Any, children: Any) -> Any:
        meta, child_names = aux
        obj: Any = object.__new__(cls)
        for n, v in (*meta, *zip(child_names, children, strict=True)):
            object.__setattr__(obj, n, v)
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls
