"""The streaming engine: merges checkpoints on disk one leaf in memory at a time.

A method's merge of a leaf depends on no other leaf except through its
whole-model pass (:mod:`mats_jax.method`), so a merge reads the base's and
each model's copy of one leaf, merges them with the method's own
:meth:`~mats_jax.method.MergeMethod.merge` (the same traced function the
in-memory engine runs, jitted once per leaf shape) and writes the result
before reading the next leaf: peak memory is about ``(models + 1) ×`` the
largest leaf, plus the merge's temporaries, whatever the model's size.
An elementwise method (:attr:`~mats_jax.method.MergeMethod.elementwise`)
reading no statistics merges safetensors inputs one block of
``BLOCK_ENTRIES`` entries at a time, read into buffers reused from block
to block (aligned so that JAX takes them without a copy): no leaf-sized
array but the output is made, and no page of input memory is faulted in
twice. Leaves that cannot be read so (other formats, a layout that
transposes them) are read whole; those of a method whose merge holds
leaf-sized temporaries (TIES) are then merged in row blocks. A whole-model
pass (TIES's threshold with ``trim: global``) runs first over the task
vectors, read the same way: a sample of about 3% of every leaf, then one
pass selecting in the sample's bracket
(:func:`~mats_jax.select.streaming_magnitude_thresholds`; the two-pass
radix select if the bracket misses), giving the threshold the in-memory
engine computes. A per-leaf threshold does the same within its leaf.
Data-dependent methods read each leaf's statistics as that leaf is merged. Methods that draw random numbers get
the recipe's ``key(seed)`` and each leaf's path id, as in memory, so a
streamed DARE equals the in-memory one. The engine names no method.

The plan (:func:`plan_merge`) opens every checkpoint's metadata and checks
everything (files, leaves present in every model, shapes, vocabulary sizes,
dtypes, override patterns, statistics) before any tensor is read; the run
(:func:`run_merge`) writes into a temporary directory that is renamed into
place only when complete, with a model card (``README.md``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mats_jax import checks
from mats_jax.engine import check_inputs, leaf_ids, merge_checked
from mats_jax.io.adapters import extract_lora, lora_modules, open_adapter, save_lora
from mats_jax.io.checkpoint import (
    Checkpoint,
    CheckpointWriter,
    atomic_output,
    copy_folder_files,
    file_digest,
    model_folder_files,
    new_digest,
    open_checkpoint,
)
from mats_jax.io.errors import CheckpointError
from mats_jax.io.safetensors import aligned_empty
from mats_jax.io.statistics import StatisticsReader
from mats_jax.mergekit import read_recipe
from mats_jax.method import MergeInputs, MergeMethod, check_model_inputs
from mats_jax.recipe import Override, Recipe, RecipeError, count_layers
from mats_jax.select import (
    MagnitudeQuantiles,
    keep_counts,
    streaming_magnitude_thresholds,
)
from mats_jax.solver.report import format_report
from mats_jax.tree import compute_dtype, is_per_model, pattern_matches

__all__ = [
    "LeafPlan",
    "MergePlan",
    "MergeSummary",
    "Progress",
    "merge_recipe",
    "model_card",
    "plan_merge",
    "run_merge",
]

# The one key of the one-leaf pytrees handed to the library: a fixed structure
# lets each merge function's jit cache serve every leaf of the same shape.
_KEY = "leaf"


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one checkpoint's copy of a leaf comes from."""

    path: str  # the leaf path in that checkpoint (differs for a tied leaf)
    rows: tuple[int, int] | None = None  # (axis, n): keep the first n along axis


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """How one output leaf is made.

    Attributes:
      path: the leaf's tree path.
      method: the merge method's name, or None to copy it unmerged (``skip``).
      parameters: the method's recipe parameters (as the recipe wrote them).
      shape, dtype: of the output leaf (``dtype``: as written).
      base: the base checkpoint's source (None without a base).
      models: each model's source.
      notes: what was done besides merging (tied leaf, vocabulary rows).
    """

    path: str
    method: str | None
    parameters: dict[str, Any]
    shape: tuple[int, ...]
    dtype: np.dtype
    base: Source | None
    models: tuple[Source, ...]
    notes: tuple[str, ...] = ()
    merge_method: MergeMethod | None = None
    record: Any = None  # the method's parameters record
    take: int | None = None  # a copied leaf's model index (None: the base)
    compute: np.dtype | None = None  # the inputs' cast before merging (None: as read)

    @property
    def nbytes(self) -> int:
        """The output leaf's size in bytes."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclasses.dataclass
class MergePlan:
    """A checked merge: opened checkpoints and one :class:`LeafPlan` per output leaf."""

    recipe: Recipe
    base: Checkpoint | None
    models: list[Checkpoint]
    leaves: list[LeafPlan]
    statistics: list[StatisticsReader | None] = dataclasses.field(default_factory=list)

    @property
    def read_bytes(self) -> int:
        """Bytes read by one pass over every input's leaves."""
        n = sum(leaf.nbytes for leaf in self.leaves)
        return n * (len(self.models) + (self.base is not None))

    @property
    def write_bytes(self) -> int:
        """Bytes of the merged checkpoint."""
        return sum(leaf.nbytes for leaf in self.leaves)


class Progress:
    """Hooks a caller (the command line) implements to show progress; no-ops here.

    Stages: ``"checksum"`` (hashing the inputs, beside the merge),
    ``"threshold"`` (TIES's first pass), ``"read"``, ``"merge"``, ``"write"``.
    """

    def start(self, stage: str, total: int) -> None:
        """A stage of ``total`` bytes begins."""

    def advance(self, stage: str, nbytes: int) -> None:
        """``nbytes`` more of ``stage`` are done."""

    def finish(self, stage: str) -> None:
        """The stage is complete."""


@dataclasses.dataclass(frozen=True)
class MergeSummary:
    """What :func:`run_merge` wrote."""

    output: str
    leaves: int
    bytes_written: int
    report: dict[str, Any]
    thresholds: dict[str, list[float]]
    card: str


# ---------------------------------------------------------------------------
# Planning: everything checked before any tensor is read.


def _open(spec: Any, what: str, recipe: Recipe) -> Checkpoint:
    try:
        if spec.adapter:
            base: Any = recipe.base  # the recipe refuses an adapter without one
            return open_adapter(
                spec.path, base=base.path, format=base.format, layout=base.layout
            )
        return open_checkpoint(spec.path, format=spec.format, layout=spec.layout)
    except CheckpointError as e:
        raise CheckpointError(f"{recipe.where(spec.line)}: {what}: {e}") from None


def _tied_hint(path: str, ckpt: Checkpoint, shape: tuple[int, ...] | None) -> str:
    candidates = [
        p
        for p, info in ckpt.leaves.items()
        if "emb" in p.lower() and (shape is None or sorted(info.shape) == sorted(shape))
    ]
    if not candidates:
        return ""
    return f" (this model has {candidates[0]!r}, which looks like the tied matrix)"


def plan_merge(recipe: Recipe) -> MergePlan:
    """Opens the recipe's checkpoints (metadata only) and checks the merge.

    Raises:
      CheckpointError: a missing or unreadable file, a leaf missing from a
        model, shapes or vocabulary sizes that differ, a non-float leaf, a
        pattern that matches nothing; each message names the recipe line, the
        file and the leaf, and says what to do.
    """
    base = _open(recipe.base, "base", recipe) if recipe.base is not None else None
    models = [_open(m, f"models[{i}]", recipe) for i, m in enumerate(recipe.models)]
    statistics: list[StatisticsReader | None] = []
    for i, spec in enumerate(recipe.models):
        try:
            statistics.append(
                StatisticsReader(spec.statistics)
                if spec.statistics is not None
                else None
            )
        except CheckpointError as e:
            raise CheckpointError(
                f"{recipe.where(spec.line)}: models[{i}] statistics: {e}"
            ) from None
    named = ([("base", base)] if base is not None else []) + [
        (f"models[{i}]", m) for i, m in enumerate(models)
    ]
    # Leaf order: the first input's, then leaves only later inputs have.
    order = list(dict.fromkeys(p for _, ckpt in named for p in ckpt.leaves))
    if not order:
        raise CheckpointError(
            f"{recipe.where(recipe.models[0].line)}: no input holds a tensor "
            f"({', '.join(c.path for _, c in named)}): nothing to merge"
        )
    for leaf, source in recipe.tied.items():
        if leaf not in order and source not in order:
            raise CheckpointError(
                f"{recipe.where(recipe.tied_line)}: tied: neither {leaf!r} nor {source!r} is a "
                f"leaf of any input; leaves look like {order[:5]}"
            )
    for override in recipe.overrides:
        if not any(pattern_matches(override.pattern, p) for p in order):
            raise CheckpointError(
                f"{recipe.where(override.line)}: override pattern {override.pattern!r} matches no leaf; "
                f"leaf paths look like {order[:5]} (globs match the whole path; prefix "
                "'re:' for a regular expression)"
            )

    leaves = []
    num_layers = count_layers(order)  # where layer gradients are resolved
    for path in order:
        method, params, rule = recipe.leaf_rule(path, num_layers)
        if method is None:
            leaves.append(_copy_plan(path, rule, named, recipe))
            continue
        try:
            merge_method, record = recipe.leaf_method(path, num_layers)
            assert merge_method is not None
            check_model_inputs(
                method,
                merge_method.needs(record),
                len(models),
                recipe.leaf_weights(path, num_layers),
            )
        except checks.MergeInputError as e:
            line = rule.line if rule is not None else recipe.method_line
            raise RecipeError(f"{recipe.where(line)}: {e}") from None
        sources = _sources(path, named, recipe)
        first = sources[0][1].leaves[sources[0][2]].dtype
        if not jnp.issubdtype(first, jnp.floating):
            leaves.append(_passthrough_plan(path, sources, recipe))
            continue
        leaves.append(
            dataclasses.replace(
                _leaf_plan(recipe, path, method, params, sources, base is not None),
                merge_method=merge_method,
                record=record,
            )
        )
    _check_statistics(recipe, leaves, statistics, order)
    return MergePlan(
        recipe=recipe, base=base, models=models, leaves=leaves, statistics=statistics
    )


def _sources(
    path: str, named: list[tuple[str, Checkpoint]], recipe: Recipe
) -> list[tuple[str, Checkpoint, str]]:
    """Where every input holds leaf ``path`` (its own path, or its tied leaf)."""
    sources: list[tuple[str, Checkpoint, str]] = []
    for who, ckpt in named:
        if path in ckpt.leaves:
            sources.append((who, ckpt, path))
        elif path in recipe.tied and recipe.tied[path] in ckpt.leaves:
            sources.append((who, ckpt, recipe.tied[path]))
        elif path in recipe.tied:
            raise CheckpointError(
                f"{recipe.where(recipe.tied_line)}: tied: {path!r} is read from "
                f"{recipe.tied[path]!r} in models that lack it, but {who} ({ckpt.path}) has "
                f"neither; its leaves look like {list(ckpt.leaves)[:3]}: correct the tied entry"
            )
        else:
            have = [f"{w} ({c.path})" for w, c in named if path in c.leaves]
            shape = next(
                (c.leaves[path].shape for _, c in named if path in c.leaves), None
            )
            raise CheckpointError(
                f"leaf {path!r} is in {', '.join(have)} but not in {who} ({ckpt.path})"
                f"{_tied_hint(path, ckpt, shape)}. If that model ties it to another leaf "
                "(an output head sharing the input embedding), declare it in the recipe: "
                f"`tied: {{{path}: <the shared leaf>}}`; to keep it out of the merge, add "
                f"`overrides: [{{pattern: {path}, skip: true}}]` (the output then copies the base's)."
            )
    return sources


def _copy_plan(
    path: str,
    rule: Override | None,
    named: list[tuple[str, Checkpoint]],
    recipe: Recipe,
) -> LeafPlan:
    """A leaf an override copies unmerged from one input (``skip``: the base,
    else the first model; ``take``: the one it names)."""
    has_base = recipe.base is not None
    take = rule.take if rule is not None else None
    if take is None or take == "base":
        index = 0  # ``named`` starts with the base when there is one
    else:
        index = int(take) + has_base
    who, ckpt = named[index]
    src = path if path in ckpt.leaves else recipe.tied.get(path)
    if src is None or src not in ckpt.leaves:
        line = recipe.where(rule.line) if rule is not None else recipe.source
        raise CheckpointError(
            f"{line}: leaf {path!r} is copied from {who} ({ckpt.path}), which does not "
            f"have it; take it from an input that does"
        )
    info = ckpt.leaves[src]
    notes = [f"{'skipped' if take is None else 'taken'}: copied from {who}"]
    if src != path:
        notes.append(f"{who} reads it from its tied leaf {src!r}")
    from_base = has_base and index == 0
    return _copy_leaf(path, info, src, None if from_base else index - has_base, notes)


def _passthrough_plan(
    path: str, sources: list[tuple[str, Checkpoint, str]], recipe: Recipe
) -> LeafPlan:
    """An integer or boolean leaf (position ids, a step counter): not merged,
    copied from the first input, after checking every input holds the same
    values (read here, before any tensor is merged: such buffers are small)."""
    who, ckpt, src = sources[0]
    info = ckpt.leaves[src]
    reference = ckpt.read(src)
    for other, c, s in sources[1:]:
        theirs = c.leaves[s]
        if theirs.dtype != info.dtype or theirs.shape != info.shape:
            raise CheckpointError(
                f"leaf {path!r}: {who} has {info.dtype} {info.shape} ({ckpt.file_of(src)}) "
                f"but {other} has {theirs.dtype} {theirs.shape} ({c.file_of(s)}); integer and "
                "boolean leaves are not merged and must be alike in every input; choose one "
                f"input's with `overrides: [{{pattern: {path}, take: base}}]` (or `take: <model index>`)"
            )
        values = c.read(s)
        if not np.array_equal(values, reference):
            differ = int(np.count_nonzero(values != reference))
            raise CheckpointError(
                f"leaf {path!r} ({info.dtype} {list(info.shape)}: integer and boolean leaves "
                f"are not merged) differs between {who} ({ckpt.file_of(src)}) and {other} "
                f"({c.file_of(s)}) in {differ} of {reference.size} entries; choose one "
                f"input's with `overrides: [{{pattern: {path}, take: base}}]` (or "
                "`take: <model index>`), or skip it"
            )
    return _copy_leaf(
        path,
        info,
        src,
        None if recipe.base is not None else 0,
        [f"{info.dtype}: not merged, equal in every input, copied from {who}"],
    )


def _copy_leaf(
    path: str, info: Any, src: str, take: int | None, notes: list[str]
) -> LeafPlan:
    """The plan of a leaf copied unmerged from ``src`` of the base (``take``
    None) or of ``models[take]``."""
    return LeafPlan(
        path,
        None,
        {},
        info.shape,
        info.dtype,
        base=Source(src) if take is None else None,
        models=() if take is None else (Source(src),),
        notes=tuple(notes),
        take=take,
    )


def _check_statistics(
    recipe: Recipe,
    leaves: list[LeafPlan],
    statistics: list[StatisticsReader | None],
    order: list[str],
) -> None:
    """Every model's statistics against the merge's leaves, before any tensor is
    read: no statistic for a leaf the checkpoints lack, each one of a type the
    leaf's method takes, fitting the leaf's shape, alike in every model. Leaves
    of a data-dependent method with no statistic in any model fall back (the
    method's fallback): each is noted on its plan and listed in one warning."""
    known = set(order)
    for i, reader in enumerate(statistics):
        if reader is None:
            continue
        unknown = [p for p in reader.leaves if p not in known]
        if unknown:
            raise CheckpointError(
                f"{recipe.where(recipe.models[i].line)}: models[{i}] statistics "
                f"({reader.path}) hold {len(unknown)} leaves the checkpoints do not have, "
                f"e.g. {unknown[:3]}; the checkpoints' leaves look like {order[:3]}. "
                "Statistics must be estimated on the parameter tree the merge reads "
                "(the same paths after the checkpoint's layout; a `params/` prefix or "
                "another model's statistics do not fit)"
            )
    fallbacks = []
    for n, leaf in enumerate(leaves):
        if leaf.merge_method is None:
            continue
        needs = leaf.merge_method.needs(leaf.record)
        if not needs.statistics:
            continue
        column = [
            (i, r.abstract(leaf.path))
            for i, r in enumerate(statistics)
            if r is not None
        ]
        kinds = {None if s is None else (s.kind, repr(s.layout())) for _, s in column}
        if len(kinds) > 1:
            listing = ", ".join(
                f"models[{i}] {'none' if s is None else s.kind}" for i, s in column
            )
            raise CheckpointError(
                f"leaf {leaf.path!r}: the models' statistics differ ({listing}); every "
                "model needs the same statistic type and layout for a leaf (or none in all)"
            )
        for i, stat in column:
            if stat is None:
                continue
            where = f"models[{i}] statistics ({statistics[i].path}) at {leaf.path!r}"  # type: ignore[union-attr]
            if not isinstance(stat, needs.statistics):
                names = ", ".join(t.__name__ for t in needs.statistics)
                raise CheckpointError(
                    f"{where}: {leaf.method} takes {names}, got {stat.kind}"
                )
            misfit = stat.fit_error(leaf.shape)
            if misfit:
                raise CheckpointError(f"{where}: {misfit}")
        if kinds == {None}:
            rule = getattr(leaf.record, "fallback", None)
            how = rule if isinstance(rule, str) else "its fallback"
            fallbacks.append(leaf.path)
            leaves[n] = dataclasses.replace(
                leaf, notes=(*leaf.notes, f"no statistic: merged by {how}")
            )
    if fallbacks:
        shown = ", ".join(repr(p) for p in fallbacks[:8])
        checks.warn(
            f"{len(fallbacks)} leaves of a data-dependent merge have no statistic in any "
            f"model and fall back to the method's fallback: {shown}"
            + (" …" if len(fallbacks) > 8 else "")
            + " (listed in the model card)",
            checks.FallbackWarning,
        )


def _leaf_plan(
    recipe: Recipe,
    path: str,
    method: str,
    params: dict[str, Any],
    sources: list[tuple[str, Checkpoint, str]],
    has_base: bool,
) -> LeafPlan:
    infos = [(who, ckpt, src, ckpt.leaves[src]) for who, ckpt, src in sources]
    notes = [
        f"{who} reads it from its tied leaf {src!r}"
        for who, _, src, _ in infos
        if src != path
    ]
    dtypes = list(dict.fromkeys(info.dtype for *_, info in infos))
    listing = ", ".join(
        f"{who} {info.dtype} ({ckpt.file_of(src)})" for who, ckpt, src, info in infos
    )
    if not all(jnp.issubdtype(d, jnp.floating) for d in dtypes):
        raise CheckpointError(
            f"leaf {path!r}: floating in some inputs and not in others ({listing}); "
            f"these are not the same model, or choose one input's leaf with "
            f"`overrides: [{{pattern: {path}, take: <base or a model index>}}]`"
        )
    if len(dtypes) > 1 and recipe.out_dtype is None:
        raise CheckpointError(
            f"leaf {path!r}: the inputs' dtypes differ ({listing}); say which dtype to "
            "write with `out_dtype: <dtype>` in the recipe (the merge then computes in "
            "`dtype:`, by default the widest of them)"
        )
    out_dtype = recipe.out_dtype if recipe.out_dtype is not None else dtypes[0]
    compute = recipe.dtype
    if compute is None and len(dtypes) > 1:
        compute = np.dtype(compute_dtype(functools.reduce(jnp.promote_types, dtypes)))
    widest = compute if compute is not None else dtypes[0]
    if np.dtype(widest).itemsize == 8 and not jax.config.read("jax_enable_x64"):
        notes.append(
            "computed in float32 (JAX's 64-bit mode is off: JAX_ENABLE_X64=1 computes "
            f"in float64), written as {out_dtype}"
        )
    if compute is not None:
        notes.append(f"computed in {compute}")
    if out_dtype not in dtypes or len(dtypes) > 1:
        notes.append(f"written as {out_dtype}")
    shapes = [info.shape for *_, info in infos]
    rows = None
    shape = shapes[0]
    if len(set(shapes)) > 1:
        ndims = {len(s) for s in shapes}
        differing = (
            [a for a in range(len(shape)) if len({s[a] for s in shapes}) > 1]
            if len(ndims) == 1
            else []
        )
        listing = ", ".join(
            f"{who} {info.shape} ({ckpt.file_of(src)})"
            for who, ckpt, src, info in infos
        )
        if len(differing) != 1:
            raise CheckpointError(
                f"leaf {path!r}: shapes differ: {listing}; these are not the same architecture"
            )
        axis = differing[0]
        n = min(s[axis] for s in shapes)
        if recipe.vocab != "shared_rows":
            raise CheckpointError(
                f"leaf {path!r}: sizes differ along axis {axis} ({listing}): the models have "
                f"different vocabularies (an embedding or output head). Refusing by default: "
                f"resize the embeddings to one tokenizer, or set `vocab: shared_rows` in the "
                f"recipe to merge the first {n} rows all models share (assumes those token ids "
                "mean the same tokens)."
            )
        rows = (axis, n)
        shape = tuple(n if a == axis else d for a, d in enumerate(shape))
        notes.append(
            f"vocab shared_rows: first {n} of {sorted({s[axis] for s in shapes})} along axis {axis}"
        )
    srcs = [
        Source(src, rows if ckpt.leaves[src].shape[rows[0]] != rows[1] else None)
        if rows
        else Source(src)
        for _, ckpt, src, _ in infos
    ]
    base_src = srcs[0] if has_base else None
    return LeafPlan(
        path,
        method,
        params,
        shape,
        out_dtype,
        base=base_src,
        models=tuple(srcs[1:] if has_base else srcs),
        notes=tuple(notes),
        compute=compute,
    )


# ---------------------------------------------------------------------------
# Running.


def _to_device(array: np.ndarray, dtype: np.dtype | None = None) -> jax.Array:
    if dtype is not None and array.dtype != dtype:
        array = array.astype(dtype)
    return jax.device_put(array, may_alias=True)


def _copied(plan: MergePlan, leaf: LeafPlan) -> np.ndarray:
    """A leaf copied unmerged, as its input stores it."""
    if leaf.base is not None:
        assert plan.base is not None
        return _read(plan.base, leaf.base)
    return _read(plan.models[leaf.take or 0], leaf.models[0])


def _as_written(leaf: LeafPlan, merged: np.ndarray) -> np.ndarray:
    """The merged leaf in its output dtype; a cast that overflows (values past
    float16's range, say) is an error naming the leaf, not infinities on disk;
    so is a merge that overflowed (its inputs were checked finite)."""
    if merged.dtype.kind == "f" and not np.all(np.isfinite(merged)):
        raise CheckpointError(
            f"leaf {leaf.path!r}: the merge has NaN or Inf entries although every input "
            f"is finite: the arithmetic overflowed {merged.dtype} (or a solve broke "
            "down); use smaller hyperparameters, weights or statistics, or a wider dtype"
        )
    if merged.dtype == leaf.dtype:
        return merged
    with np.errstate(over="ignore"):  # an overflow is reported below, by leaf
        out = merged.astype(leaf.dtype)
    if not np.all(np.isfinite(out)) and np.all(np.isfinite(merged)):
        largest = float(np.max(np.abs(merged)))
        raise CheckpointError(
            f"leaf {leaf.path!r}: the merge does not fit {leaf.dtype} (largest magnitude "
            f"{largest:.6g} overflows it); write a wider out_dtype"
        )
    return out


def _read(ckpt: Checkpoint, source: Source) -> np.ndarray:
    array = ckpt.read(source.path)
    if source.rows is not None:
        axis, n = source.rows
        array = np.ascontiguousarray(array[(slice(None),) * axis + (slice(0, n),)])
    return array


def _needs_base(leaf: LeafPlan) -> bool:
    """Whether merging ``leaf`` reads the base (a skipped leaf copies it)."""
    if leaf.base is None:
        return False
    if leaf.merge_method is None:
        return True
    return leaf.merge_method.needs(leaf.record).base


def _pass_of(leaf: LeafPlan) -> MagnitudeQuantiles | None:
    if leaf.merge_method is None:
        return None
    return leaf.merge_method.whole_model_pass(leaf.record)


def _pass_group(spec: MagnitudeQuantiles) -> str:
    if is_per_model(spec.density):
        return f"density={[float(d) for d in spec.density]!r}"
    return f"density={float(spec.density)!r}"


ROW_BLOCK_ENTRIES = 1 << 22
"""Entries per block when a leaf is read or merged in pieces (elementwise
methods, task vectors for a threshold): the temporaries' size."""


def _task_vector_blocks(base: Any, model: Any) -> Iterable[np.ndarray]:
    """``θ_m − θ_0`` in the leaf's compute dtype (as ``mats_jax.task_vectors``
    forms it), flattened and in blocks, so no leaf-sized temporary is made."""
    base, model = np.asarray(base).ravel(), np.asarray(model).ravel()
    dtype = compute_dtype(base.dtype)
    for i in range(0, max(base.size, 1), ROW_BLOCK_ENTRIES):
        j = i + ROW_BLOCK_ENTRIES
        yield model[i:j].astype(dtype) - base[i:j].astype(dtype)


BLOCK_ENTRIES = 1 << 20
"""Entries per block when a leaf is read in blocks into reused buffers
(elementwise merges and thresholds from safetensors inputs): small enough
for the host's caches, large enough that a block's dispatch costs little."""


SAMPLE_RUN = 1 << 12
SAMPLE_EVERY = 32
"""A threshold's sample (:func:`~mats_jax.select.streaming_magnitude_thresholds`):
runs of ``SAMPLE_RUN`` entries, one every ``SAMPLE_EVERY`` runs of each leaf
(about 3% of the entries): enough to bracket the threshold's bucket, so its
second pass does not read the model again."""


def _block_size(size: int) -> int:
    """A leaf's block: a power of two (so each merge compiles for few shapes),
    at most :data:`BLOCK_ENTRIES`, the leaf's size rounded up for a small one."""
    return min(BLOCK_ENTRIES, 1 << max(0, (size - 1).bit_length()))


class _OutputBuffers:
    """Two output buffers used in turn, for leaves merged in blocks: one
    filled while the write thread writes the other (one write is in flight
    at a time), so no output leaf's pages are faulted in afresh (0.6 s of
    task arithmetic's 2.3 s on the IO benchmark)."""

    def __init__(self) -> None:
        self._buffers: list[np.ndarray | None] = [None, None]
        self._turn = 0

    def next(self, leaf: LeafPlan) -> np.ndarray:
        """A buffer of ``leaf``'s shape and dtype, not the one handed out last."""
        self._turn ^= 1
        buf = self._buffers[self._turn]
        if buf is None or buf.nbytes < leaf.nbytes:
            buf = self._buffers[self._turn] = aligned_empty(leaf.nbytes, np.uint8)
        return buf[: leaf.nbytes].view(leaf.dtype).reshape(leaf.shape)


class _BlockReader:
    """Reads one leaf's inputs block by block into buffers reused from block
    to block and leaf to leaf.

    Each read into a fresh array page-faults its whole size in; reading
    blocks into the same few buffers does not, and keeps them in the
    caches while they are merged. A leaf is read this way when every input
    it needs stores it in the tree's orientation in a format that reads
    byte ranges (:meth:`~mats_jax.io.checkpoint.Checkpoint.reads_blocks`)
    and any vocabulary trim keeps leading rows.
    """

    def __init__(self, plan: MergePlan) -> None:
        self.plan = plan
        self._buffers: dict[tuple[int, np.dtype], np.ndarray] = {}

    def _buffer(self, slot: int, dtype: np.dtype, size: int) -> np.ndarray:
        key = (slot, np.dtype(dtype))
        buf = self._buffers.get(key)
        if buf is None or buf.size < size:
            buf = self._buffers[key] = aligned_empty(max(size, BLOCK_ENTRIES), dtype)
        return buf[:size]

    def _read(
        self, slot: int, ckpt: Checkpoint, src: Source, start: int, out: np.ndarray
    ) -> None:
        """Entries ``start : start + out.size`` of ``src`` into ``out``: read as
        stored, through a staging buffer of the slot's, when ``out``'s dtype
        differs."""
        stored = ckpt.leaves[src.path].dtype
        if out.dtype == stored:
            ckpt.read_block(src.path, start, out)
            return
        staged = self._buffer(-1 - slot, stored, out.size)
        ckpt.read_block(src.path, start, staged)
        out[:] = staged

    def _sources(
        self, leaf: LeafPlan, with_base: bool
    ) -> list[tuple[Checkpoint, Source]]:
        sources = []
        if with_base:
            assert self.plan.base is not None and leaf.base is not None
            sources.append((self.plan.base, leaf.base))
        return sources + list(zip(self.plan.models, leaf.models, strict=True))

    def can_read(self, leaf: LeafPlan, with_base: bool) -> bool:
        """Whether every input ``leaf`` needs can be read in blocks."""
        if with_base and (self.plan.base is None or leaf.base is None):
            return False
        return all(
            ckpt.reads_blocks(src.path) and (src.rows is None or src.rows[0] == 0)
            for ckpt, src in self._sources(leaf, with_base)
        )

    def blocks(
        self, leaf: LeafPlan, with_base: bool, dtype: np.dtype | None
    ) -> Iterable[tuple[int, int, list[np.ndarray]]]:
        """``(start, count, arrays)`` per block of the flattened leaf: the base's
        entries (with ``with_base``) then each model's, in ``dtype`` (None:
        each input's own), each array of the block size with zeros past
        ``count``. The arrays are overwritten by the next block."""
        size = int(np.prod(leaf.shape, dtype=np.int64))
        block = _block_size(size)
        sources = self._sources(leaf, with_base)
        for start in range(0, size, block):
            count = min(block, size - start)
            arrays = []
            for slot, (ckpt, src) in enumerate(sources):
                out = self._buffer(slot, dtype or ckpt.leaves[src.path].dtype, block)
                self._read(slot, ckpt, src, start, out[:count])
                out[count:] = 0
                arrays.append(out)
            yield start, count, arrays

    def task_vector_sample(self, leaf: LeafPlan) -> Iterable[tuple[int, np.ndarray]]:
        """``(m, θ_m − θ_0)`` over a sample of the leaf: runs of
        :data:`SAMPLE_RUN` entries, one every ``SAMPLE_EVERY`` runs, spread over
        the whole leaf (a small leaf: its first run), each overwritten by
        the next."""
        assert self.plan.base is not None and leaf.base is not None
        dtype = compute_dtype(self.plan.base.leaves[leaf.base.path].dtype)
        size = int(np.prod(leaf.shape, dtype=np.int64))
        run = min(SAMPLE_RUN, size)
        sources = self._sources(leaf, with_base=True)
        buffers = [self._buffer(slot, dtype, run) for slot in range(len(sources))]
        for start in range(0, size - run + 1, SAMPLE_RUN * SAMPLE_EVERY):
            for slot, (ckpt, src) in enumerate(sources):
                self._read(slot, ckpt, src, start, buffers[slot])
            base, *models = buffers
            for m, x in enumerate(models):
                yield m, x - base

    def task_vectors(self, leaf: LeafPlan) -> Iterable[tuple[int, np.ndarray]]:
        """``(m, θ_m − θ_0)`` per block and model, in the leaf's compute dtype
        (as :func:`_task_vector_blocks`), each overwritten by the next."""
        assert self.plan.base is not None and leaf.base is not None
        dtype = compute_dtype(self.plan.base.leaves[leaf.base.path].dtype)
        difference = self._buffer(len(self.plan.models) + 1, dtype, BLOCK_ENTRIES)
        for _, count, (base, *models) in self.blocks(leaf, True, dtype):
            for m, x in enumerate(models):
                yield m, np.subtract(x[:count], base[:count], out=difference[:count])


def _whole_model_passes(
    plan: MergePlan, progress: Progress, reader: _BlockReader
) -> dict[str, list[float]]:
    """Per group of leaves sharing a whole-model pass, each model's threshold.

    A sample of each leaf, then one pass that reads every leaf of the group
    once from the base and once from each model (two, if the sample's
    bracket misses: :func:`~mats_jax.select.streaming_magnitude_thresholds`).
    """
    groups: dict[str, tuple[MagnitudeQuantiles, list[LeafPlan]]] = {}
    for leaf in plan.leaves:
        spec = _pass_of(leaf)
        if spec is not None and not spec.per_leaf:
            groups.setdefault(_pass_group(spec), (spec, []))[1].append(leaf)
    out: dict[str, list[float]] = {}
    if not groups:
        return out
    base = plan.base
    assert base is not None, "the recipe check requires a base for task vectors"
    total = sum(
        2 * leaf.nbytes * (len(plan.models) + 1)
        for _, leaves in groups.values()
        for leaf in leaves
    )
    progress.start("threshold", total)
    for key, (spec, leaves) in groups.items():
        size = sum(int(np.prod(leaf.shape, dtype=np.int64)) for leaf in leaves)
        ks = keep_counts(spec.density, size, len(plan.models))

        def vectors(
            leaves: list[LeafPlan] = leaves,
        ) -> Iterable[tuple[int, np.ndarray]]:
            for leaf in leaves:
                assert leaf.base is not None
                if reader.can_read(leaf, with_base=True):
                    yield from reader.task_vectors(leaf)
                else:
                    b = _read(base, leaf.base)
                    for m, (c, src) in enumerate(
                        zip(plan.models, leaf.models, strict=True)
                    ):
                        x = _read(c, src)
                        for block in _task_vector_blocks(b, x):
                            yield m, block
                        del x
                progress.advance("threshold", leaf.nbytes * (len(plan.models) + 1))

        def sample(
            leaves: list[LeafPlan] = leaves,
        ) -> Iterable[tuple[int, np.ndarray]]:
            for leaf in leaves:
                if reader.can_read(leaf, with_base=True):
                    yield from reader.task_vector_sample(leaf)

        out[key] = streaming_magnitude_thresholds(
            vectors, ks, sample=sample, sizes=[size] * len(plan.models)
        )
    progress.finish("threshold")
    return out


class _LeafMerger:
    """Merges one leaf at a time with its method's own merge."""

    def __init__(self, plan: MergePlan, thresholds: dict[str, list[float]]) -> None:
        self.plan = plan
        self.num_layers = count_layers(leaf.path for leaf in plan.leaves)
        self.thresholds = thresholds
        self.report: dict[str, Any] = {}
        self.key = jax.random.key(plan.recipe.seed)

    def __call__(self, leaf: LeafPlan, base: Any, models: list[Any]) -> Any:
        if leaf.merge_method is None:
            return base if base is not None else models[0]
        with _naming(leaf):
            return self._merge(leaf, leaf.merge_method, base, models)

    def in_blocks(self, leaf: LeafPlan, reader: _BlockReader) -> bool:
        """Whether ``leaf`` is merged block by block from its inputs on disk:
        an elementwise method that reads no statistics and draws no random
        numbers, with inputs :class:`_BlockReader` can read."""
        method = leaf.merge_method
        if method is None or not method.elementwise:
            return False
        needs = method.needs(leaf.record)
        if needs.statistics or needs.key:
            return False
        return reader.can_read(leaf, with_base=_needs_base(leaf))

    def merge_in_blocks(
        self, leaf: LeafPlan, reader: _BlockReader, out: np.ndarray | None = None
    ) -> np.ndarray:
        """The merged leaf (as written), merged one block at a time: each
        entry of an elementwise merge depends only on the same entry of its
        inputs, so the blocks' merges are the leaf's. ``out``: an array of
        the leaf's shape and dtype to fill (a fresh one when None)."""
        method = leaf.merge_method
        assert method is not None
        with_base = _needs_base(leaf)
        if out is None:
            out = np.empty(leaf.shape, leaf.dtype)
        flat = out.reshape(-1)
        with _naming(leaf):
            prepared = self._prepared(
                leaf,
                lambda: reader.task_vectors(leaf),
                lambda: reader.task_vector_sample(leaf),
            )
            weights = self.plan.recipe.leaf_weights(leaf.path, self.num_layers)
            for start, count, arrays in reader.blocks(leaf, with_base, leaf.compute):
                # On the device without a copy where numpy's buffer allows:
                # the merge's result is awaited below, before the next block
                # refills the buffers.
                put = [_to_device(x) for x in arrays]
                inputs, _, _ = check_inputs(
                    method,
                    leaf.record,
                    models=[{_KEY: x} for x in put[with_base:]],
                    base={_KEY: put[0]} if with_base else None,
                    weights=weights,
                )
                merged = merge_checked(method, leaf.record, inputs, prepared=prepared)
                block = np.asarray(merged.params[_KEY])[:count]
                flat[start : start + count] = _as_written(leaf, block)
        return out

    def _merge(
        self, leaf: LeafPlan, method: MergeMethod, base: Any, models: list[Any]
    ) -> Any:
        params = leaf.record
        needs = method.needs(params)
        stats = None
        if needs.statistics:
            # On the device as read: the merge takes them over (consume=True).
            stats = [
                {_KEY: jax.device_put(r.read(leaf.path)) if r is not None else None}
                for r in self.plan.statistics
            ]
        inputs, _, _ = check_inputs(
            method,
            params,
            models=[{_KEY: m} for m in models],
            base={_KEY: base} if base is not None else None,
            statistics=stats,
            weights=self.plan.recipe.leaf_weights(leaf.path, self.num_layers),
            key=self.key if needs.key else None,
        )
        if needs.key:  # the leaf's own path, not the one-leaf tree's key
            inputs = inputs._replace(
                leaf_ids={_KEY: leaf_ids({leaf.path: 0})[leaf.path]}
            )
        prepared = self._prepared(
            leaf,
            lambda: (
                (m, block)
                for m, x in enumerate(models)
                for block in _task_vector_blocks(base, x)
            ),
        )
        if method.elementwise and method.leaf_sized_temporaries:
            return _merge_in_rows(method, params, inputs, prepared)
        # The leaf's inputs are this merge's own: it frees them as soon as
        # it has read them (a solve's models once its system is formed).
        result = merge_checked(method, params, inputs, prepared=prepared, consume=True)
        if result.report[_KEY].status is not None:
            self.report[leaf.path] = result.report[_KEY]
        for category, message in method.diagnose(params, result.report, [leaf.path]):
            checks.warn(message, category)
        return result.params[_KEY]

    def _prepared(
        self,
        leaf: LeafPlan,
        task_vectors: Callable[[], Iterable[tuple[int, Any]]],
        sample: Callable[[], Iterable[tuple[int, Any]]] | None = None,
    ) -> Any:
        """The whole-model pass's result for this leaf (None without one);
        ``task_vectors`` gives the leaf's ``(m, block of θ_m − θ_0)`` afresh
        for a per-leaf threshold (in blocks: no leaf-sized temporaries), and
        ``sample`` some of them (so the threshold reads the leaf once)."""
        spec = _pass_of(leaf)
        if spec is None:
            return None
        if not spec.per_leaf:
            thresholds = self.thresholds[_pass_group(spec)]
        else:
            size = int(np.prod(leaf.shape, dtype=np.int64))
            ks = keep_counts(spec.density, size, len(self.plan.models))
            thresholds = streaming_magnitude_thresholds(
                task_vectors,
                ks,
                sample=sample,
                sizes=None if sample is None else [size] * len(ks),
            )
        return {_KEY: jnp.asarray(thresholds, jnp.float32)}


@contextlib.contextmanager
def _naming(leaf: LeafPlan) -> Iterator[None]:
    """A method's input error, naming the leaf by its path in the checkpoint
    rather than the one-leaf tree's key."""
    try:
        yield
    except checks.MergeInputError as e:
        message = str(e).replace(repr(_KEY), repr(leaf.path))
        raise CheckpointError(f"leaf {leaf.path!r}: {message}") from None


def _rows(tree: Any, i: int, j: int) -> Any:
    """Rows ``i:j`` of a one-leaf tree. On the CPU they are cut from a host
    view of the array (no copy): cutting the device array block by block
    held more memory (the IO benchmark's peak). Elsewhere from the array, so
    that no block copies the leaf to the host."""
    if tree is None:
        return None
    array = tree[_KEY]
    if isinstance(array, jax.Array) and any(
        d.platform != "cpu" for d in array.devices()
    ):
        return {_KEY: array[i:j]}
    return {_KEY: np.asarray(array)[i:j]}


def _merge_in_rows(
    method: MergeMethod, params: Any, inputs: MergeInputs, prepared: Any
) -> Any:
    """An elementwise method's merge over blocks of rows, so its temporaries
    stay block-sized."""
    first = inputs.models[0][_KEY]
    shape = np.shape(first)
    if len(shape) < 1 or int(np.prod(shape)) <= ROW_BLOCK_ENTRIES:
        return merge_checked(method, params, inputs, prepared=prepared).params[_KEY]
    out = np.empty(shape, first.dtype)
    rows = max(1, ROW_BLOCK_ENTRIES // max(1, int(np.prod(shape[1:]))))
    for i in range(0, shape[0], rows):
        j = min(i + rows, shape[0])
        piece = inputs._replace(
            models=[_rows(m, i, j) for m in inputs.models],
            base=_rows(inputs.base, i, j),
        )
        out[i:j] = merge_checked(method, params, piece, prepared=prepared).params[_KEY]
    return out


class InputDigest(NamedTuple):
    """One input checkpoint's record in the model card."""

    who: str  # base, models[i], models[i] statistics
    written: str  # its path as the recipe wrote it
    files: int
    size: int
    digest: str  # of its one file, or combined over its files


def combined_digest(
    files: Sequence[str], digests: Sequence[str], algorithm: str = "sha256"
) -> str:
    """One digest for a checkpoint of several files (sharded safetensors, an
    orbax directory): the digest of its ``<digest>  <relative name>`` lines, in
    name order (what ``sha256sum`` or ``b3sum`` prints for them); a single
    file's own digest.

    Examples:
      >>> combined_digest(["d/a"], ["ab12"])
      'ab12'
    """
    if len(files) == 1:
        return digests[0]
    root = os.path.commonpath([os.path.dirname(f) for f in files])
    lines = sorted(
        f"{d}  {os.path.relpath(f, root)}\n"
        for f, d in zip(files, digests, strict=True)
    )
    combined = new_digest(algorithm)
    combined.update("".join(lines).encode())
    return str(combined.hexdigest())


def input_checkpoints(plan: MergePlan) -> list[tuple[str, str, list[str]]]:
    """``(who, path as written, files)`` of every input: checkpoints and statistics."""
    recipe = plan.recipe
    out = []
    if plan.base is not None and recipe.base is not None:
        out.append(("base", recipe.base.written or recipe.base.path, plan.base.files))
    for i, (spec, ckpt) in enumerate(zip(recipe.models, plan.models, strict=True)):
        out.append((f"models[{i}]", spec.written or spec.path, ckpt.files))
    for i, spec in enumerate(recipe.models):
        if spec.statistics is not None:
            files = [
                os.path.join(root, f)
                for root, _, names in sorted(os.walk(spec.statistics))
                for f in sorted(names)
            ]
            out.append((f"models[{i}] statistics", spec.statistics, files))
    return out


def base_folder_files(plan: MergePlan) -> tuple[str, list[str]]:
    """The base model folder (the first model's without a base) and the names
    of its files to copy (:func:`~mats_jax.io.checkpoint.model_folder_files`),
    when it is a directory of safetensors weights and the output is
    safetensors: the output is then a model folder its own tools load."""
    source = plan.base if plan.base is not None else plan.models[0]
    if (
        plan.recipe.output.format != "safetensors"
        or source.format != "safetensors"
        or not os.path.isdir(source.path)
    ):
        return source.path, []
    return source.path, model_folder_files(source.path)


def _tensor_format(plan: MergePlan) -> str:
    """The safetensors ``format`` metadata: the base's (the first model's
    without a base), else ``pt``, which ``transformers`` requires (it refuses
    files whose format is not pt, tf, flax or mlx)."""
    source = plan.base if plan.base is not None else plan.models[0]
    return (
        source.metadata.get("format", "pt") if source.format == "safetensors" else "pt"
    )


def _inside(path: str, directory: str) -> bool:
    """Whether ``path`` is ``directory`` or inside it, as written or with
    symbolic links resolved (a link inside ``directory`` to a file elsewhere
    is inside it: replacing the directory removes the link)."""
    for p, d in (
        (os.path.abspath(path), os.path.abspath(directory)),
        (os.path.realpath(path), os.path.realpath(directory)),
    ):
        if p == d or p.startswith(d.rstrip(os.sep) + os.sep):
            return True
    return False


def check_output(plan: MergePlan, output: str) -> None:
    """Refuses, before any work, an output that would destroy or mix with an
    input: the output path is an input, the recipe or a statistics directory,
    holds one of them, or lies inside an input directory; or it names a file
    (the output is a directory: weights, model card, copied files).

    Raises:
      CheckpointError: naming the input and the output.
    """
    recipe = plan.recipe
    if output.endswith((".safetensors", ".msgpack", ".json")):
        raise CheckpointError(
            f"output {output}: the output is a directory (the weights, a model card "
            "README.md and the base's config files); give a directory path, e.g. "
            f"{os.path.splitext(output)[0]}/"
        )
    if os.path.lexists(output) and not os.path.isdir(output):
        raise CheckpointError(
            f"output {output} exists and is not a directory; refusing to replace a file"
        )
    ancestor = os.path.dirname(output)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise CheckpointError(
            f"output {output}: {ancestor} is a file, so no directory can be made there"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CheckpointError(f"output {output}: no permission to write in {ancestor}")
    protected = [("the recipe", recipe.source)] if os.path.exists(recipe.source) else []
    protected += [
        (who, path)
        for who, path in [
            *([("base", plan.base.path)] if plan.base is not None else []),
            *((f"models[{i}]", m.path) for i, m in enumerate(plan.models)),
            *(
                (f"models[{i}] statistics", s.statistics)
                for i, s in enumerate(recipe.models)
                if s.statistics is not None
            ),
        ]
    ]
    for who, path in protected:
        if _inside(path, output):
            raise CheckpointError(
                f"output {output} holds {who} ({path}); an output (with --overwrite) "
                "replaces its whole directory, so it must not contain any input: "
                "choose another output path"
            )
        if os.path.isdir(path) and _inside(output, path):
            raise CheckpointError(
                f"output {output} is inside {who} ({path}); inputs are never written "
                "into: choose an output outside it"
            )


def run_merge(
    plan: MergePlan,
    output: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    checksum: str | None = "sha256",
) -> MergeSummary:
    """Streams the merge into directory ``output`` (complete, or not there at all).

    The directory gets the checkpoint (``model.safetensors`` or shards and an
    index; ``params.msgpack``; or the orbax checkpoint itself) and ``README.md``,
    the model card.

    ``checksum``: the digest of every input file the model card records (one
    of :data:`~mats_jax.io.checkpoint.CHECKSUMS`), hashed in a thread beside
    the merge; None records none.

    Raises:
      CheckpointError: an unknown ``checksum``, or blake3 without its package
        (before anything is read or written).
      FileExistsError: if ``output`` exists and ``overwrite`` is False.
    """
    if checksum is not None:
        new_digest(checksum)  # an unknown or missing digest fails before any work
    progress = progress or Progress()
    recipe = plan.recipe
    output = os.path.abspath(os.fspath(output))
    check_output(plan, output)
    inputs = input_checkpoints(plan)
    folder, extra_files = base_folder_files(plan)
    if not recipe.output.copy_files:
        extra_files = []
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        atomic_output(output, overwrite=overwrite) as tmp,
    ):
        # Checksums run beside the merge (hashlib and blake3 release the GIL).
        def digest_inputs() -> list[InputDigest]:
            out = []
            for who, written, files in inputs:
                size = sum(os.path.getsize(f) for f in files)
                digests = []
                for f in files:
                    digests.append(file_digest(f, checksum) if checksum else "")
                    progress.advance("checksum", os.path.getsize(f))
                out.append(
                    InputDigest(
                        who,
                        written,
                        len(files),
                        size,
                        combined_digest(files, digests, checksum)
                        if checksum
                        else "not computed",
                    )
                )
            return out

        if checksum:
            progress.start(
                "checksum", sum(os.path.getsize(f) for *_, fs in inputs for f in fs)
            )
        digests = pool.submit(digest_inputs)
        reader = _BlockReader(plan)
        thresholds = _whole_model_passes(plan, progress, reader)
        merger = _LeafMerger(plan, thresholds)
        writer = CheckpointWriter(
            tmp,
            [(leaf.path, leaf.shape, leaf.dtype) for leaf in plan.leaves],
            format=recipe.output.format,
            layout=recipe.output.layout,
            max_shard_size=recipe.output.max_shard_size,
            metadata={
                "format": _tensor_format(plan),
                "merged_by": f"mats_jax {_version()}",
            },
        )
        for stage, total in (
            ("read", plan.read_bytes),
            ("merge", plan.write_bytes),
            ("write", plan.write_bytes),
        ):
            progress.start(stage, total)
        writes = concurrent.futures.ThreadPoolExecutor(1)
        pending: concurrent.futures.Future[None] | None = None
        outputs = _OutputBuffers()

        def write(leaf: LeafPlan, array: np.ndarray) -> None:
            writer.write(leaf.path, array)
            progress.advance("write", leaf.nbytes)

        try:
            for leaf in plan.leaves:
                if leaf.merge_method is None:
                    out = _copied(plan, leaf)  # as stored: no device, no cast
                    progress.advance("read", leaf.nbytes)
                elif merger.in_blocks(leaf, reader):
                    out = merger.merge_in_blocks(
                        leaf,
                        reader,
                        None if writer.keeps_leaves else outputs.next(leaf),
                    )
                    progress.advance(
                        "read", leaf.nbytes * (len(plan.models) + _needs_base(leaf))
                    )
                else:
                    # Each input goes to the device as soon as it is read
                    # (aliased where numpy's buffer allows), so the host copies
                    # are freed. (Reading ahead in a thread was measured: no
                    # faster on two cores, and more memory.)
                    base = None
                    if _needs_base(leaf):
                        assert plan.base is not None and leaf.base is not None
                        base = _to_device(_read(plan.base, leaf.base), leaf.compute)
                    models = [
                        _to_device(_read(c, s), leaf.compute)
                        for c, s in zip(plan.models, leaf.models, strict=False)
                    ]
                    progress.advance(
                        "read", leaf.nbytes * (len(models) + (base is not None))
                    )
                    merged = merger(leaf, base, models)
                    del base, models
                    out = _as_written(leaf, np.asarray(merged))  # waits for the merge
                    del merged
                progress.advance("merge", leaf.nbytes)
                if pending is not None:
                    pending.result()  # one write in flight: memory stays bounded
                pending = writes.submit(write, leaf, out)
                del out
            if pending is not None:
                pending.result()
            writer.close()
        finally:
            writes.shutdown(wait=True)
            writer.abort()
        for stage in ("read", "merge", "write"):
            progress.finish(stage)
        copy_folder_files(folder, extra_files, tmp)
        card = model_card(
            plan, digests.result(), merger.report, thresholds, extra_files, checksum
        )
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(card)
    return MergeSummary(
        output=output,
        leaves=len(plan.leaves),
        bytes_written=plan.write_bytes,
        report=merger.report,
        thresholds=thresholds,
        card=card,
    )


def merge_recipe(
    recipe: Recipe | str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    checksum: str | None = "sha256",
) -> MergeSummary:
    """Checks and runs a recipe (a :class:`~mats_jax.recipe.Recipe` or a YAML file).

    Args:
      recipe: the recipe or its path.
      output: the output directory (default: the recipe's ``output.path``).
      overwrite: replace an existing output.
      progress: progress hooks.
      checksum: the digest of each input file the model card records,
        ``"sha256"`` (what the Hugging Face hub lists) or ``"blake3"`` (the
        ``blake3`` package; 2.1x as fast on one core of the benchmark
        machine), or None for none.
        Hashed beside the merge, at 1-3 GB/s per core: for many large
        inputs it can be the longest part of a merge.

    Raises:
      RecipeError, CheckpointError: bad input (an unknown ``checksum``
        included), before any tensor is read.
      FileExistsError: an existing output without ``overwrite``.

    Examples:
      >>> import os, tempfile, numpy as np
      >>> from mats_jax import load_checkpoint, parse_recipe, save_checkpoint
      >>> d = tempfile.mkdtemp()
      >>> for name, value in [("base", 0.0), ("a", 1.0), ("b", 3.0)]:
      ...     save_checkpoint(os.path.join(d, name + ".safetensors"), {"w": np.full(2, value, np.float32)})
      >>> recipe = parse_recipe(
      ...     "base: base.safetensors\\nmodels: [a.safetensors, b.safetensors]\\n"
      ...     "method: task_arithmetic\\nparameters: {scale: 0.5}", directory=d)
      >>> summary = merge_recipe(recipe, os.path.join(d, "merged"))
      >>> load_checkpoint(os.path.join(d, "merged"))["w"], sorted(os.listdir(summary.output))
      (array([2., 2.], dtype=float32), ['README.md', 'model.safetensors'])
    """
    if not isinstance(recipe, Recipe):
        recipe = read_recipe(recipe)
    target = output if output is not None else recipe.output.path
    if target is None:
        raise CheckpointError(
            f"{recipe.source}: no output: give one (`-o OUT`) or set `output: {{path: ...}}` in the recipe"
        )
    if os.path.lexists(target) and not overwrite:
        raise FileExistsError(
            f"{os.path.abspath(target)} exists; pass --overwrite to replace it"
        )
    if recipe.output.lora_rank is not None:
        return _merge_to_lora(recipe, target, overwrite, progress, checksum)
    return run_merge(
        plan_merge(recipe),
        target,
        overwrite=overwrite,
        progress=progress,
        checksum=checksum,
    )


def _merge_to_lora(
    recipe: Recipe,
    target: str | os.PathLike[str],
    overwrite: bool,
    progress: Progress | None,
    checksum: str | None,
) -> MergeSummary:
    """``output: {lora: ...}``: the merge, streamed into a temporary model named
    as the base checkpoint, then its change to the base as a LoRA
    (:func:`~mats_jax.extract_lora`, one kernel at a time), written
    completely or not at all."""
    base = recipe.base
    assert base is not None and recipe.output.lora_rank is not None  # parse checks
    output = dataclasses.replace(
        recipe.output,
        format="safetensors",
        layout=base.layout,
        max_shard_size=None,
        copy_files=False,
    )
    plan = plan_merge(dataclasses.replace(recipe, output=output))
    try:
        lora_modules(
            {leaf.path: tuple(leaf.shape) for leaf in plan.leaves},
            base.layout,
            recipe.output.lora_targets or None,
        )
    except CheckpointError as error:
        raise RecipeError(
            f"{recipe.source}:{recipe.output.line}: output lora: {error}"
        ) from None
    parent = os.path.dirname(os.path.abspath(os.fspath(target)))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".mats-jax-lora-") as tmp:
        merged_path = os.path.join(tmp, "merged")
        summary = run_merge(plan, merged_path, progress=progress, checksum=checksum)
        lora = extract_lora(
            _open(base, "base", recipe),
            open_checkpoint(merged_path, layout=base.layout),
            rank=recipe.output.lora_rank,
            layout=base.layout,
            targets=recipe.output.lora_targets or None,
            base_model_name_or_path=base.written or base.path,
        )
        save_lora(target, lora, overwrite=overwrite, card=summary.card)
    return dataclasses.replace(
        summary,
        output=os.path.abspath(os.fspath(target)),
        bytes_written=sum(int(t.nbytes) for t in lora.tensors.values()),
    )


# ---------------------------------------------------------------------------
# The model card.


def _version() -> str:
    return importlib.metadata.version("mats_jax")


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "-"


def _yaml_string(text: str) -> str:
    """``text`` as a double-quoted YAML scalar (JSON's quoting is valid YAML)."""
    return json.dumps(text)


def model_card(
    plan: MergePlan,
    digests: Sequence[InputDigest],
    report: dict[str, Any],
    thresholds: dict[str, list[float]],
    copied: Sequence[str] = (),
    checksum: str | None = "sha256",
) -> str:
    """The output's README.md, a Hugging Face model card: front matter
    (``base_model`` listing the inputs as the recipe wrote them, ``tags``,
    ``library_name``), then the recipe, one digest per input checkpoint,
    versions, per-leaf methods and notes (fallbacks, dtypes, copies), the
    files copied from the base folder and the solver report."""
    recipe = plan.recipe
    names = [d.written for d in digests if not d.who.endswith("statistics")]
    library = "transformers" if "config.json" in copied else "mats_jax"
    lines = [
        "---",
        "base_model:",
        *(f"- {_yaml_string(n)}" for n in names),
        "tags:",
        "- merge",
        "- mats_jax",
        f"- {_yaml_string(recipe.method)}",
        f"library_name: {library}",
        "---",
        "",
        "# Merged model",
        "",
        f"Merged with mats_jax {_version()} (jax {jax.__version__}, Python "
        f"{platform.python_version()}) on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}: "
        f"{recipe.method} of {len(recipe.models)} models"
        + (" onto a base" if recipe.base is not None else "")
        + f", {len(plan.leaves)} leaves, {plan.write_bytes / 1e6:.1f} MB.",
        "",
        f"## Recipe (`{os.path.basename(recipe.source)}`)",
        "",
        "```yaml",
        recipe.text.rstrip(),
        "```",
        "",
        "## Inputs",
        "",
        f"One {checksum} per input: of its file, or, for a checkpoint of several "
        f"files, of their `{checksum}  name` lines in name order."
        if checksum
        else "No checksums were computed.",
        "",
        f"| input | path | files | bytes | {checksum or 'checksum'} |",
        "|---|---|---:|---:|---|",
    ]
    lines += [
        f"| {d.who} | `{d.written}` | {d.files} | {d.size} | `{d.digest}` |"
        for d in digests
    ]
    if copied:
        lines += [
            "",
            "Copied from the base folder: " + ", ".join(f"`{n}`" for n in copied),
        ]
    fallbacks = [
        leaf.path
        for leaf in plan.leaves
        if any(n.startswith("no statistic") for n in leaf.notes)
    ]
    if fallbacks:
        lines += [
            "",
            f"**{len(fallbacks)} leaves had no statistic in any model** and were merged "
            "by the method's fallback: " + ", ".join(f"`{p}`" for p in fallbacks),
        ]
    if thresholds:
        lines += [
            "",
            "## Whole-model magnitude thresholds (TIES with trim: global)",
            "",
            "| group | per-model magnitude threshold |",
            "|---|---|",
        ]
        lines += [
            f"| {k} | {', '.join(f'{t:.6g}' for t in ts)} |"
            for k, ts in thresholds.items()
        ]
    lines += [
        "",
        "## Leaves",
        "",
        "| leaf | shape | dtype | method | parameters | notes |",
        "|---|---|---|---|---|---|",
    ]
    for leaf in plan.leaves:
        lines.append(
            f"| `{leaf.path}` | {list(leaf.shape)} | {leaf.dtype} | {leaf.method or 'skip'} | "
            f"{_params_text(leaf.parameters)} | {'; '.join(leaf.notes) or '-'} |"
        )
    if report:
        lines += ["", "## Solver report", "", "```", format_report(report), "```"]
    return "\n".join(lines) + "\n"
