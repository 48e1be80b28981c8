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

import functools
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mats_jax import checks
from mats_jax.method import MergeInputs, MergeMethod
from mats_jax.select import MagnitudeQuantiles, keep_count, magnitude_thresholds
from mats_jax.sharding import Placement, input_mesh, keep_shardings, placement_of
from mats_jax.solver.report import MergeResult
from mats_jax.tree import leaf_paths, task_vectors
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
                jnp.full((m,), keep_count(spec.density, vectors[0][i].size, jnp)),
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
    k = keep_count(spec.density, size, jnp)
    thresholds = magnitude_thresholds(vectors, jnp.full((m,), k), mesh=placement.mesh)
    return jax.tree.unflatten(treedef, [thresholds] * len(vectors[0]))


@functools.partial(jax.jit, static_argnames=("method", "placement"))
def _merge_jit(
    inputs: MergeInputs,
    params: Any,
    prepared: Any,
    *,
    method: MergeMethod,
    placement: Placement,
) -> MergeResult:
    if prepared is None:
        prepared = whole_model_pass(method.whole_model_pass(params), inputs, placement)
    merged, report = method.merge(inputs, params, prepared, placement)
    leaves, treedef = jax.tree.flatten(merged)
    leaves = keep_shardings(leaves, placement.out_shardings)
    return MergeResult(jax.tree.unflatten(treedef, leaves), report)


def merge_checked(
    method: MergeMethod,
    params: Any,
    inputs: MergeInputs,
    *,
    prepared: Any = None,
    placement: Placement | None = None,
) -> MergeResult:
    """The jitted merge of inputs :func:`check_inputs` validated: the one program
    both engines run. ``prepared``: the whole-model pass's result when the
    caller computed it (the streaming engine, over the whole model on disk);
    None runs the pass over these inputs."""
    result: MergeResult = _merge_jit(
        inputs, params, prepared, method=method, placement=placement or Placement()
    )
    return result


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

    Raises:
      MergeInputError: on inputs that do not fit, before any work.
    """
    inputs, paths, placement = check_inputs(
        method,
        params,
        models=models,
        base=base,
        statistics=statistics,
        weights=weights,
        key=key,
    )
    result = merge_checked(method, params, inputs, placement=placement)
    for category, message in method.diagnose(params, result.report, paths):
        checks.warn(message, category)
    return result


def lower_in_memory(
    method: MergeMethod, params: Any, **inputs: Any
) -> jax.stages.Lowered:
    """The program :func:`run_in_memory` would run, lowered, without running it.

    Takes :func:`run_in_memory`'s arguments. Compile it to see what a merge
    needs before starting it::

        memory = lower_in_memory(method, params, models=...).compile().memory_analysis()
    """
    checked, _, placement = check_inputs(method, params, **inputs)
    lowered: jax.stages.Lowered = _merge_jit.lower(
        checked, params, None, method=method, placement=placement
    )
    return lowered
