"""The in-memory engine: any merge method over whole parameter pytrees, jitted.

:func:`run_in_memory` checks the inputs a method needs (every leaf, before any
work), runs its whole-model pass, merges every leaf in one jitted call and
gives each merged leaf its model leaf's sharding back. One compiled program
per method, parameter structure and input shapes: the parameters' numbers are
traced, so sweeping a hyperparameter reuses it. :func:`lower_in_memory` returns
that program without running it (e.g. for the memory per device of a sharded
merge).

Inputs sharded on a mesh (:class:`~jax.sharding.NamedSharding`) merge there:
the methods split their work over the mesh (the solver's blocks, the
threshold's histograms) and the engine constrains every output leaf to its
input's sharding.

Examples:
  >>> import jax.numpy as jnp
  >>> import mats_jax
  >>> from mats_jax.engine import run_in_memory
  >>> ta = mats_jax.get_method("task_arithmetic")
  >>> result = run_in_memory(ta, ta.parameters(scale=0.5), base={"w": jnp.zeros(2)},
  ...                        models=[{"w": jnp.ones(2)}, {"w": jnp.ones(2)}])
  >>> result.params["w"], result.report["w"].solver
  (Array([1., 1.], dtype=float32), 'task_arithmetic')
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mats_jax import checks
from mats_jax.method import (
    MergeInputs,
    MergeMethod,
    check_model_inputs,
    check_per_model,
)
from mats_jax.select import MagnitudeQuantiles, keep_counts, magnitude_thresholds
from mats_jax.sharding import Placement, input_mesh, keep_shardings, placement_of
from mats_jax.solver.report import LeafReport, MergeResult
from mats_jax.tree import leaf_paths, path_str, task_vectors
from mats_jax.typing import Array, Params, StatTree

__all__ = [
    "check_inputs",
    "leaf_ids",
    "lower_in_memory",
    "merge_checked",
    "run_in_memory",
    "whole_model_pass",
]


def leaf_ids(tree: Params) -> Params:
    """Each leaf's uint32 id, the CRC-32 of its path (see :class:`~mats_jax.method.MergeInputs`)."""
    return jax.tree.map(lambda p: jnp.uint32(zlib.crc32(p.encode())), leaf_paths(tree))


def check_inputs(
    method: MergeMethod,
    params: Any,
    *,
    models: Sequence[Params],
    base: Params | None = None,
    statistics: Sequence[StatTree] | None = None,
    weights: Any = None,
    key: Array | None = None,
) -> tuple[MergeInputs, list[str], Placement]:
    """Validates everything ``method`` takes with ``params``, before any work.

    Returns:
      The inputs as the method sees them, the leaves' paths, and the placement.

    Raises:
      MergeInputError: naming the input, the leaf and what was expected.
    """
    needs = method.needs(params)
    if needs.base and base is None:
        raise checks.MergeInputError(
            f"{method.name} needs the base model (the pretrained parameters)"
        )
    base = base if needs.base else None
    statistics = statistics if needs.statistics else None
    input_mesh(models, base, statistics, params)  # one mesh, or a clear error
    checks.check_models(models, base)
    # Outputs keep the models' shardings.
    placement = placement_of(models[0], models, base, statistics, params)
    checked_weights = checks.check_weights(weights, len(models))
    check_model_inputs(method.name, needs, len(models), checked_weights)
    check_per_model(method.name, params, len(models))
    if needs.statistics:
        checks.check_statistics(
            statistics,  # type: ignore[arg-type]
            models,
            allowed=needs.statistics,
            name=method.statistics_name,
        )
    if needs.key:
        checks.check_key(key)
    paths = jax.tree.leaves(leaf_paths(models[0]))
    inputs = MergeInputs(
        models=list(models),
        base=base,
        statistics=list(statistics) if statistics is not None else None,
        weights=checked_weights,
        key=key if needs.key else None,
        leaf_ids=leaf_ids(models[0]) if needs.key else None,
    )
    method.check(inputs, params, paths)
    return inputs, paths, placement


class _Passthrough(NamedTuple):
    """Integer and boolean leaves set aside from a merge (see :func:`_set_aside`)."""

    treedef: Any  # the models' full tree structure
    kept: list[Any]  # per leaf: the value passed through, or None for merged leaves


def _is_numeric_leaf(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is None or jnp.issubdtype(dtype, jnp.inexact)


def _set_aside(
    models: Sequence[Params],
    base: Params | None,
    statistics: Sequence[StatTree] | None,
    params: Any = None,
) -> tuple[
    Sequence[Params],
    Params | None,
    Sequence[StatTree] | None,
    Any,
    _Passthrough | None,
]:
    """Integer and boolean leaves (position ids, masks, step counters) are not
    merged: each is replaced by None in every input and passes through from
    the base (the first model without one), after checking that every input
    holds the same values (for concrete values; traced ones pass unchecked).

    The inputs are the models, the base, the statistics and every field of
    the method's parameters record that is a pytree like the models (MaTS's
    ``init``, a ``fallback`` tree; also inside a nested
    :class:`~mats_jax.method.MethodCall`): a data-free merge of a checkpoint
    with integer buffers, given as an initialisation, keeps them too."""
    if isinstance(models, dict) or not isinstance(models, Sequence) or not models:
        return models, base, statistics, params, None  # check_models says what is wrong
    flat, flat_def = jax.tree_util.tree_flatten_with_path(models[0])
    treedef: Any = flat_def  # its stubs lack flatten_up_to
    aside = [i for i, (_, leaf) in enumerate(flat) if not _is_numeric_leaf(leaf)]
    if not aside:
        return models, base, statistics, params, None
    named = ([("base", base)] if base is not None else []) + [
        (f"models[{m}]", model) for m, model in enumerate(models)
    ]
    columns = []
    for who, tree in named:
        try:
            columns.append((who, treedef.flatten_up_to(tree)))
        except (ValueError, TypeError):
            return (
                models,
                base,
                statistics,
                params,
                None,
            )  # check_models says what differs
    trees_in_params = list(_model_trees(params, treedef, "parameters"))
    columns += [(who, treedef.flatten_up_to(tree)) for who, tree in trees_in_params]
    kept: list[Any] = [None] * len(flat)
    for i in aside:
        path = path_str(flat[i][0])
        first_who, first = columns[0][0], columns[0][1][i]
        for who, leaves in columns[1:]:
            _check_alike(first_who, first, who, leaves[i], path)
        kept[i] = first

    def strip(tree: Any) -> Any:
        leaves = treedef.flatten_up_to(tree)
        return jax.tree.unflatten(
            treedef, [None if kept[i] is not None else x for i, x in enumerate(leaves)]
        )

    stripped_stats = statistics
    if statistics is not None and not isinstance(statistics, dict):
        try:
            stripped_stats = [strip(s) for s in statistics]
        except (ValueError, TypeError):
            stripped_stats = statistics  # check_statistics says what differs
    return (
        [strip(m) for m in models],
        strip(base) if base is not None else None,
        stripped_stats,
        _map_model_trees(params, treedef, strip) if trees_in_params else params,
        _Passthrough(treedef, kept),
    )


def _check_alike(first_who: str, first: Any, who: str, other: Any, path: str) -> None:
    """A leaf set aside must have the same dtype, shape and (concrete) values
    in every input."""
    if getattr(other, "dtype", None) != first.dtype or np.shape(other) != np.shape(
        first
    ):
        raise checks.MergeInputError(
            f"{who} at {path!r}: {getattr(other, 'dtype', type(other).__name__)} "
            f"{np.shape(other)} differs from {first_who}'s {first.dtype} {np.shape(first)}; "
            "integer and boolean leaves are not merged and must be alike in every input"
        )
    if not (checks.is_traced(first) or checks.is_traced(other)) and not np.array_equal(
        np.asarray(first), np.asarray(other)
    ):
        raise checks.MergeInputError(
            f"{who} at {path!r}: this {first.dtype} leaf differs from {first_who}'s; "
            "integer and boolean leaves are not merged (they pass through when every "
            "input holds the same values): make them equal, or drop the leaf"
        )


def _is_model_tree(value: Any, treedef: Any) -> bool:
    # A bare array's structure is a single leaf, which every scalar shares:
    # only containers can be a model's tree.
    return (
        not isinstance(value, (str, bytes))
        and not jax.tree_util.treedef_is_leaf(treedef)
        and jax.tree.structure(value) == treedef
    )


def _model_trees(params: Any, treedef: Any, who: str) -> Any:
    """``(name, tree)`` for each field of a parameters record (and of the
    records nested in it) that is a pytree with the models' structure."""
    if not dataclasses.is_dataclass(params) or isinstance(params, type):
        return
    for field in dataclasses.fields(params):
        value = getattr(params, field.name)
        name = f"{who}.{field.name}"
        if _is_model_tree(value, treedef):
            yield name, value
        else:
            yield from _model_trees(value, treedef, name)


def _map_model_trees(params: Any, treedef: Any, fn: Any) -> Any:
    """The parameters record with ``fn`` applied to each field
    :func:`_model_trees` finds; the record is rebuilt without re-running its
    validation (it held when it was built)."""
    if not dataclasses.is_dataclass(params) or isinstance(params, type):
        return params
    changed = {}
    for field in dataclasses.fields(params):
        value = getattr(params, field.name)
        if _is_model_tree(value, treedef):
            changed[field.name] = fn(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            new = _map_model_trees(value, treedef, fn)
            if new is not value:
                changed[field.name] = new
    if not changed:
        return params
    rebuilt: Any = copy.copy(params)
    for name, value in changed.items():
        object.__setattr__(rebuilt, name, value)
    return rebuilt


def _put_back(result: MergeResult, aside: _Passthrough | None) -> MergeResult:
    """The merge's result with the leaves :func:`_set_aside` kept, in place."""
    if aside is None:
        return result
    merged = iter(jax.tree.leaves(result.params))
    reports = iter(
        jax.tree.leaves(result.report, is_leaf=lambda x: isinstance(x, LeafReport))
    )
    params, report = [], []
    for value in aside.kept:
        if value is None:
            params.append(next(merged))
            report.append(next(reports))
        else:
            params.append(value)
            report.append(LeafReport("passthrough"))
    return MergeResult(
        jax.tree.unflatten(aside.treedef, params),
        jax.tree.unflatten(aside.treedef, report),
    )


def _warn_fallbacks(inputs: MergeInputs, method: MergeMethod, paths: list[str]) -> None:
    """One :class:`~mats_jax.FallbackWarning` listing the leaves of a
    data-dependent merge that no model has a statistic for."""
    if inputs.statistics is None:
        return
    treedef: Any = jax.tree.structure(inputs.models[0])  # stubs lack flatten_up_to
    columns = [treedef.flatten_up_to(s) for s in inputs.statistics]
    fallbacks = [
        path for i, path in enumerate(paths) if all(c[i] is None for c in columns)
    ]
    if fallbacks:
        shown = ", ".join(repr(p) for p in fallbacks[:8])
        checks.warn(
            f"{method.name}: {len(fallbacks)} of {len(paths)} leaves have no statistic in "
            f"any model and are merged by the method's fallback: {shown}"
            + (" …" if len(fallbacks) > 8 else ""),
            checks.FallbackWarning,
        )


def _warn_narrowed(models: Sequence[Params], paths: list[str]) -> None:
    """One warning naming the float64 leaves that come back float32 (JAX's
    64-bit mode is off, so no jax array holds float64)."""
    if jax.config.read("jax_enable_x64"):
        return
    wide = [
        path
        for path, leaf in zip(paths, jax.tree.leaves(models[0]), strict=True)
        if np.dtype(leaf.dtype) == np.float64
    ]
    if wide:
        checks.warn(
            f"{len(wide)} float64 leaves are merged and returned in float32 because "
            f"JAX's 64-bit mode is off: {', '.join(repr(p) for p in wide[:8])}"
            + (" …" if len(wide) > 8 else "")
            + "; enable it (jax.config.update('jax_enable_x64', True)) to keep "
            "float64, or cast them to float32 to silence this",
            UserWarning,
        )


def whole_model_pass(
    spec: MagnitudeQuantiles | None, inputs: MergeInputs, placement: Placement
) -> Params | None:
    """The pass's result for every leaf (traced): per leaf, (M,) thresholds."""
    if spec is None:
        return None
    assert inputs.base is not None, "a magnitude pass reads task vectors"
    vectors = [jax.tree.leaves(t) for t in task_vectors(inputs.base, inputs.models)]
    treedef = jax.tree.structure(inputs.models[0])
    m = len(vectors)
    if spec.per_leaf:
        per_leaf = [
            magnitude_thresholds(
                [[v[i]] for v in vectors],
                keep_counts(spec.density, vectors[0][i].size, m, jnp),
                mesh=placement.mesh,
            )
            for i in range(len(vectors[0]))
        ]
        return jax.tree.unflatten(treedef, per_leaf)
    size = sum(v.size for v in vectors[0])
    if size >= 2**31:
        raise checks.MergeInputError(
            f"a whole-model magnitude threshold over {size} entries exceeds the "
            "in-memory limit of 2^31 (int32 counts); trim per leaf "
            "(trim='per_leaf'), or merge from checkpoints (streaming counts in int64)"
        )
    ks = keep_counts(spec.density, size, m, jnp)
    thresholds = magnitude_thresholds(vectors, ks, mesh=placement.mesh)
    return jax.tree.unflatten(treedef, [thresholds] * len(vectors[0]))


def _flagged(
    merged: Params, report: Any, placement: Placement
) -> tuple[MergeResult, Array]:
    """The merged leaves in their shardings, and whether each is finite (one
    flag per leaf, in the merge's own program)."""
    leaves, treedef = jax.tree.flatten(merged)
    leaves = keep_shardings(leaves, placement.out_shardings)
    # x · 0 is 0 where x is finite and NaN where not, and a sum of zeros cannot
    # overflow: one reduction per leaf, with no leaf-sized mask (isfinite's).
    finite = jnp.array([jnp.sum(x * 0) == 0 for x in leaves], bool)
    return MergeResult(jax.tree.unflatten(treedef, leaves), report), finite


def _passed(
    method: MergeMethod,
    params: Any,
    inputs: MergeInputs,
    prepared: Any,
    placement: Placement,
) -> Any:
    """The whole-model pass's result: ``prepared`` when the caller ran it,
    else the pass over ``inputs`` (traced)."""
    if prepared is not None:
        return prepared
    return whole_model_pass(method.whole_model_pass(params), inputs, placement)


def _merge_traced(
    inputs: MergeInputs,
    params: Any,
    prepared: Any,
    method: MergeMethod,
    placement: Placement,
) -> tuple[MergeResult, Array]:
    prepared = _passed(method, params, inputs, prepared, placement)
    merged, report = method.merge(inputs, params, prepared, placement)
    return _flagged(merged, report, placement)


_merge_jit = jax.jit(_merge_traced, static_argnames=("method", "placement"))


@functools.partial(jax.jit, static_argnames=("method", "placement"))
def _begin_jit(
    inputs: MergeInputs,
    params: Any,
    prepared: Any,
    method: MergeMethod,
    placement: Placement,
) -> Any:
    prepared = _passed(method, params, inputs, prepared, placement)
    return method.begin(inputs, params, prepared, placement)


@functools.partial(jax.jit, static_argnames=("method", "placement"))
def _finish_jit(
    begun: Any, params: Any, method: MergeMethod, placement: Placement
) -> tuple[MergeResult, Array]:
    merged, report = method.finish(begun, params, placement)
    return _flagged(merged, report, placement)


def _delete(tree: Any, keep: Any) -> None:
    """Frees the buffers of every JAX array in ``tree`` now, but those that
    are also leaves of ``keep`` (an output that is an input passed through)."""
    kept = {id(x) for x in jax.tree.leaves(keep)}
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array) and id(x) not in kept and not x.is_deleted():
            x.delete()


def _merge_consuming(
    method: MergeMethod,
    params: Any,
    inputs: MergeInputs,
    prepared: Any,
    placement: Placement,
) -> tuple[MergeResult, Array]:
    """The merge, deleting the inputs' models, base and statistics once read.

    (Donating them instead was measured on the CPU: XLA reuses a donated
    buffer only for an output, and copies the input first when a later
    computation still reads it, so the peak did not fall.)
    """
    owned = (inputs.models, inputs.base, inputs.statistics)
    if not method.staged:
        out = _merge_jit(inputs, params, prepared, method, placement)
        _delete(owned, keep=out)
        return out
    begun = _begin_jit(inputs, params, prepared, method, placement)
    _delete(owned, keep=begun)
    out = _finish_jit(begun, params, method, placement)
    _delete(begun, keep=out)
    return out


def merge_checked(
    method: MergeMethod,
    params: Any,
    inputs: MergeInputs,
    *,
    prepared: Any = None,
    placement: Placement | None = None,
    paths: Sequence[str] | None = None,
    consume: bool = False,
) -> MergeResult:
    """The jitted merge of inputs :func:`check_inputs` validated: the one program
    both engines run. ``prepared``: the whole-model pass's result when the
    caller computed it (the streaming engine, over the whole model on disk);
    None runs the pass over these inputs.

    With ``paths`` (the leaves' paths), a merged leaf with NaN or Inf entries
    (the inputs were checked finite, so the arithmetic overflowed) is an
    error naming it (traced: under ``checkify``, see :func:`~mats_jax.checks.check_traced`).

    With ``consume``, the caller gives up the inputs' models, base and
    statistics: their JAX arrays are deleted as soon as the merge has read
    them, and a staged method (:attr:`~mats_jax.method.MergeMethod.staged`)
    runs as two programs with the inputs freed in between. The result is
    the same; the peak memory is the larger program's rather than that of
    one program holding both (the streaming engine merges each leaf this
    way).
    """
    placement = placement or Placement()
    if consume:
        result, finite = _merge_consuming(method, params, inputs, prepared, placement)
    else:
        result, finite = _merge_jit(inputs, params, prepared, method, placement)
    if paths is not None:
        _check_merged(method, paths, result.params, finite)
    return result


def _check_merged(
    method: MergeMethod, paths: Sequence[str], merged: Params, finite: Array
) -> None:
    if checks.is_traced(finite):
        for i, path in enumerate(paths):
            checks.check_traced(
                f"{method.name}: merged leaf {path!r}",
                finite[i],
                lambda ok: ok,
                "finite (the inputs are: the arithmetic overflowed)",
            )
        return
    flags = np.asarray(finite)
    if flags.all():
        return
    leaves = jax.tree.leaves(merged)
    bad = [
        (p, x.dtype) for p, x, ok in zip(paths, leaves, flags, strict=True) if not ok
    ]
    shown = ", ".join(f"{p!r} ({dtype})" for p, dtype in bad[:8])
    raise checks.MergeInputError(
        f"{method.name}: the merge of {len(bad)} leaves has NaN or Inf entries although "
        f"every input is finite: {shown}" + (" …" if len(bad) > 8 else "") + "; the "
        "arithmetic overflowed the leaves' dtype (or a solve broke down): use smaller "
        "hyperparameters, weights or statistics, or wider leaves"
    )


def run_in_memory(
    method: MergeMethod,
    params: Any,
    *,
    models: Sequence[Params],
    base: Params | None = None,
    statistics: Sequence[StatTree] | None = None,
    weights: Any = None,
    key: Array | None = None,
) -> MergeResult:
    """Merges ``models`` with ``method`` and its parameters record, in memory.

    Args:
      method: a :class:`~mats_jax.method.MergeMethod`.
      params: its parameters (``method.parameters(...)``).
      models: the M fine-tuned parameter pytrees.
      base, statistics, key: as the method needs (:meth:`~mats_jax.method.MergeMethod.needs`;
        the others are ignored).
      weights: one non-negative weight per model (default equal).

    Returns:
      A :class:`~mats_jax.MergeResult`: parameters in the models' dtypes and a
      :class:`~mats_jax.LeafReport` per leaf. The method's diagnostics (blocks
      CG left short of its tolerance) are raised as warnings at the caller's
      line.

    Integer and boolean leaves (position ids, step counters) are not merged:
    they pass through from the base (the first model without one), checked
    equal in every input, parameter trees such as MaTS's ``init`` included
    (concrete values only); their report says ``passthrough``. Leaves of a data-dependent method with no statistic in
    any model are listed in a :class:`~mats_jax.FallbackWarning`.

    Raises:
      MergeInputError: on inputs that do not fit, before any work.
    """
    models, base, statistics, params, aside = _set_aside(
        models, base, statistics, params
    )
    inputs, paths, placement = check_inputs(
        method,
        params,
        models=models,
        base=base,
        statistics=statistics,
        weights=weights,
        key=key,
    )
    _warn_fallbacks(inputs, method, paths)
    _warn_narrowed(inputs.models, paths)
    result = merge_checked(method, params, inputs, placement=placement, paths=paths)
    for category, message in method.diagnose(params, result.report, paths):
        checks.warn(message, category)
    return _put_back(result, aside)


def lower_in_memory(
    method: MergeMethod, params: Any, **inputs: Any
) -> jax.stages.Lowered:
    """The program :func:`run_in_memory` would run, lowered, without running it.

    Takes :func:`run_in_memory`'s arguments. Compile it to see what a merge
    needs before starting it::

        memory = lower_in_memory(method, params, models=...).compile().memory_analysis()
    """
    models, base, statistics, params, _ = _set_aside(
        inputs.pop("models"),
        inputs.pop("base", None),
        inputs.pop("statistics", None),
        params,
    )
    checked, _, placement = check_inputs(
        method, params, models=models, base=base, statistics=statistics, **inputs
    )
    lowered: jax.stages.Lowered = _merge_jit.lower(
        checked, params, None, method, placement
    )
    return lowered
