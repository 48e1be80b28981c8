"""Streaming merges of checkpoints on disk: one leaf in memory at a time.

Every method merges blocks independently, so a merge reads the base's and each
model's copy of one leaf, merges them with the library's own function (called
on a one-leaf pytree) and writes the result before reading the next leaf:
peak memory is about ``(models + 1) ×`` the largest leaf, plus the merge's
temporaries, whatever the model's size. TIES with whole-model trimming
(``trim: global``) needs each task vector's k-th largest magnitude over the
whole model first; :func:`streaming_magnitude_threshold` finds it exactly in
two streaming passes (a radix select on the float32 bit patterns, 16 bits per
pass), the same threshold :func:`~mats_jax.magnitude_threshold` computes in
memory. Data-dependent methods (Fisher, RegMean, MaTS) stream too, each leaf
solved with its own statistics.

The plan (:func:`plan_merge`) opens every checkpoint's metadata and checks
everything (files, leaves present in every model, shapes, vocabulary sizes,
dtypes, override patterns, statistics) before any tensor is read; the run
(:func:`run_merge`) writes into a temporary directory that is renamed into
place only when complete, with a model card (``README.md``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import functools
import os
import platform
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mats_jax import checks
from mats_jax.io.checkpoint import (
    MSGPACK_NAME,
    Checkpoint,
    atomic_output,
    file_sha256,
    open_checkpoint,
)
from mats_jax.io.errors import CheckpointError
from mats_jax.io.layout import inverse_permutation
from mats_jax.io.msgpack import write_msgpack
from mats_jax.io.orbax import save_orbax
from mats_jax.io.safetensors import SafetensorsWriter
from mats_jax.io.statistics import StatisticsReader
from mats_jax.merge import sparse
from mats_jax.recipe import METHODS, Recipe, load_recipe
from mats_jax.tree import _pattern_matches, compute_dtype, nest_paths

__all__ = [
    "LeafPlan",
    "MergePlan",
    "MergeSummary",
    "Progress",
    "merge_recipe",
    "plan_merge",
    "run_merge",
    "streaming_magnitude_threshold",
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
      method: the merge method, or None to copy it unmerged (``skip``).
      parameters: the method's recipe parameters.
      shape, dtype: of the output leaf.
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
    for leaf, source in recipe.tied.items():
        if leaf not in order and source not in order:
            raise CheckpointError(
                f"{recipe.where(recipe.tied_line)}: tied: neither {leaf!r} nor {source!r} is a "
                f"leaf of any input; leaves look like {order[:5]}"
            )
    for rule in recipe.overrides:
        if not any(_pattern_matches(rule.pattern, p) for p in order):
            raise CheckpointError(
                f"{recipe.where(rule.line)}: override pattern {rule.pattern!r} matches no leaf; "
                f"leaf paths look like {order[:5]} (globs match the whole path; prefix "
                "'re:' for a regular expression)"
            )

    leaves = []
    for path in order:
        method, params, _ = recipe.leaf_rule(path)
        sources: list[tuple[str, Checkpoint, str]] = []
        for who, ckpt in named:
            if path in ckpt.leaves:
                sources.append((who, ckpt, path))
            elif path in recipe.tied and recipe.tied[path] in ckpt.leaves:
                sources.append((who, ckpt, recipe.tied[path]))
            elif (
                method is None
                and who != "base"
                and base is not None
                and path in base.leaves
            ):
                continue  # skipped leaves are copied from the base; models may lack them
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
        leaves.append(
            _leaf_plan(recipe, path, method, params, sources, base is not None)
        )
    return MergePlan(
        recipe=recipe, base=base, models=models, leaves=leaves, statistics=statistics
    )


def _leaf_plan(
    recipe: Recipe,
    path: str,
    method: str | None,
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
    if method is None:
        who, _ckpt, src, info = infos[0]
        source = Source(src)
        return LeafPlan(
            path,
            None,
            {},
            info.shape,
            info.dtype,
            base=source if has_base else None,
            models=() if has_base else (source,),
            notes=(f"skipped: copied from {who}", *notes),
        )
    dtypes = {info.dtype for *_, info in infos}
    if len(dtypes) > 1 or not jnp.issubdtype(next(iter(dtypes)), jnp.floating):
        listing = ", ".join(
            f"{who} {info.dtype} ({ckpt.file_of(src)})"
            for who, ckpt, src, info in infos
        )
        raise CheckpointError(
            f"leaf {path!r}: merging needs one floating dtype in every input, got {listing}; "
            f"convert the checkpoints, or add `overrides: [{{pattern: {path}, skip: true}}]`"
        )
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
        next(iter(dtypes)),
        base=base_src,
        models=tuple(srcs[1:] if has_base else srcs),
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------
# TIES with whole-model trimming: the exact threshold in two streaming passes.


def streaming_magnitude_thresholds(
    chunks: Callable[[], Iterable[tuple[int, Any]]], ks: Sequence[int]
) -> list[float]:
    """For S streams of arrays, each stream's k_s-th largest magnitude, in two passes.

    A radix select on the float32 bit patterns of ``|x|`` (which order like the
    magnitudes): the first pass histograms the high 16 bits of every array and
    finds the bucket holding the k-th largest; the second histograms the low
    16 bits of the entries in that bucket. Memory: one array at a time and two
    65536-bin histograms per stream. The result equals
    :func:`~mats_jax.magnitude_threshold` on each stream's arrays (tested
    against it), so TIES trims a model on disk exactly as it trims one in memory.

    Args:
      chunks: returns a fresh iterable (it is called twice) of
        ``(stream, array)`` pairs, in any order (for TIES: each leaf's task
        vector for each model, so one pass reads every leaf once per model).
      ks: per stream, 1 ≤ k ≤ its total number of entries.

    Returns:
      Per stream the threshold t: at least k entries have ``|x| ≥ t`` and
      fewer than k have ``|x| > t``.

    Examples:
      >>> import numpy as np
      >>> pairs = [(0, np.array([1.0, -5.0])), (1, np.array([0.5])),
      ...          (0, np.array([3.0, -2.0])), (1, np.array([-4.0]))]
      >>> streaming_magnitude_thresholds(lambda: pairs, [2, 1])
      [3.0, 4.0]
    """

    def bits(a: Any) -> np.ndarray:
        return (
            np.abs(np.asarray(a).astype(np.float32, copy=False)).ravel().view(np.uint32)
        )

    def pick(hist: np.ndarray, remaining: int) -> tuple[int, int]:
        at_least = np.cumsum(hist[::-1])[::-1]  # at_least[d]: entries with digit >= d
        digit = int(np.nonzero(at_least >= remaining)[0].max())
        return digit, remaining - int(at_least[digit] - hist[digit])

    n = len(ks)
    high = np.zeros((n, 1 << 16), np.int64)
    totals = [0] * n
    for s, a in chunks():
        u = bits(a)
        totals[s] += u.size
        high[s] += np.bincount(u >> 16, minlength=1 << 16)
        del u
    for k, total in zip(ks, totals, strict=True):
        if not 1 <= k <= total:
            raise ValueError(f"k must be in [1, {total}], got {k}")
    tops = [pick(high[s], ks[s]) for s in range(n)]
    low = np.zeros((n, 1 << 16), np.int64)
    for s, a in chunks():
        u = bits(a)
        low[s] += np.bincount(u[(u >> 16) == tops[s][0]] & 0xFFFF, minlength=1 << 16)
        del u
    out = []
    for s, (top, remaining) in enumerate(tops):
        bottom, _ = pick(low[s], remaining)
        out.append(
            float(np.array([(top << 16) | bottom], np.uint32).view(np.float32)[0])
        )
    return out


def streaming_magnitude_threshold(chunks: Callable[[], Iterable[Any]], k: int) -> float:
    """:func:`streaming_magnitude_thresholds` for one stream of arrays.

    Examples:
      >>> import numpy as np
      >>> streaming_magnitude_threshold(lambda: [np.array([1.0, -5.0]), np.array([3.0, -2.0])], 2)
      3.0
    """
    return streaming_magnitude_thresholds(lambda: ((0, a) for a in chunks()), [k])[0]


# ---------------------------------------------------------------------------
# Running.


def _to_device(array: np.ndarray) -> jax.Array:
    return jax.device_put(array, may_alias=True)


def _read(ckpt: Checkpoint, source: Source) -> np.ndarray:
    array = ckpt.read(source.path)
    if source.rows is not None:
        axis, n = source.rows
        array = np.ascontiguousarray(array[(slice(None),) * axis + (slice(0, n),)])
    return array


@jax.jit
def _ties_with_thresholds(
    base: jax.Array,
    models: list[jax.Array],
    thresholds: jax.Array,
    scale: Any,
    weights: jax.Array,
) -> jax.Array:
    # TIES's trim with a given per-model threshold, then the library's own
    # sign election, disjoint mean and application (mats_jax.merge.sparse).
    dtype = compute_dtype(base.dtype)
    vectors = [m.astype(dtype) - base.astype(dtype) for m in models]
    trimmed = [
        jnp.where(jnp.abs(v.astype(jnp.float32)) >= thresholds[i], v, 0)
        for i, v in enumerate(vectors)
    ]
    merged = sparse._combine(trimmed, weights, True)
    return sparse._apply({_KEY: base}, [merged], scale)[_KEY]


def _needs_base(leaf: LeafPlan) -> bool:
    """Whether merging ``leaf`` reads the base (average, Fisher, … do not)."""
    if leaf.base is None:
        return False
    if leaf.method is None or METHODS[leaf.method].needs_base:
        return True
    init = leaf.parameters.get("init")
    return "base" in (init, leaf.parameters.get("fallback")) or isinstance(init, dict)


def _is_ties(leaf: LeafPlan, trim: str) -> bool:
    return leaf.method == "ties" and leaf.parameters.get("trim", "global") == trim


_BLOCK_ENTRIES = 1 << 22


def _ties_in_blocks(
    base: Any, models: list[Any], thresholds: jax.Array, scale: Any, weights: jax.Array
) -> np.ndarray:
    """:func:`_ties_with_thresholds` over blocks of rows: with the thresholds
    known, TIES is entrywise, so the merge's temporaries stay block-sized."""
    shape = np.shape(base)
    if len(shape) < 1 or int(np.prod(shape)) <= _BLOCK_ENTRIES:
        return np.asarray(
            _ties_with_thresholds(base, models, thresholds, scale, weights)
        )
    out = np.empty(shape, np.asarray(base).dtype)
    rows = max(1, _BLOCK_ENTRIES // max(1, int(np.prod(shape[1:]))))
    for i in range(0, shape[0], rows):
        j = min(i + rows, shape[0])
        out[i:j] = _ties_with_thresholds(
            base[i:j], [m[i:j] for m in models], thresholds, scale, weights
        )
    return out


class _LeafMerger:
    """Merges one leaf at a time with the library's functions."""

    def __init__(self, plan: MergePlan, thresholds: dict[str, list[float]]) -> None:
        self.plan = plan
        self.weights = [m.weight for m in plan.recipe.models]
        self.thresholds = thresholds
        self.report: dict[str, Any] = {}

    def __call__(self, leaf: LeafPlan, base: Any, models: list[Any]) -> Any:
        if leaf.method is None:
            return base if base is not None else models[0]
        try:
            return self._merge(leaf, base, models)
        except checks.MergeInputError as e:
            message = str(e).replace(repr(_KEY), repr(leaf.path))
            raise CheckpointError(f"leaf {leaf.path!r}: {message}") from None

    def _merge(self, leaf: LeafPlan, base: Any, models: list[Any]) -> Any:
        method, params = leaf.method, dict(leaf.parameters)
        assert method is not None
        b = {_KEY: base} if base is not None else None
        ms = [{_KEY: m} for m in models]
        if method == "ties":
            # Both trims go through the streaming threshold (per leaf: over this
            # leaf alone), which needs no leaf-sized temporaries beyond one
            # task vector, then the library's sign election and disjoint mean.
            checks.check_models(ms, b)
            checks.check_fraction(
                "density", params["density"], include_zero=False, include_one=True
            )
            if _is_ties(leaf, "global"):
                thresholds = self.thresholds[_ties_group(params)]
            else:
                k = keep_count(
                    params["density"], int(np.prod(leaf.shape, dtype=np.int64))
                )
                thresholds = [
                    streaming_magnitude_threshold(
                        functools.partial(_task_vector_blocks, base, m), k
                    )
                    for m in models
                ]
            return _ties_in_blocks(
                base,
                models,
                jnp.asarray(thresholds, jnp.float32),
                params.get("scale", 1.0),
                checks.check_weights(self.weights, len(models)),
            )
        fn = METHODS[method].function
        if method == "average":
            return fn(ms, weights=self.weights, **params)[_KEY]
        if method == "task_arithmetic":
            return fn(b, ms, weights=self.weights, **params)[_KEY]
        if method == "dare":
            leaf_key = jax.random.fold_in(
                jax.random.key(self.plan.recipe.seed), zlib.crc32(leaf.path.encode())
            )
            return fn(b, ms, key=leaf_key, weights=self.weights, **params)[_KEY]
        # Each model's statistic for this leaf alone (None: the fallback rule).
        stats = [
            {_KEY: r.read(leaf.path) if r is not None else None}
            for r in self.plan.statistics
        ]
        if params.get("fallback") == "base":
            params["fallback"] = b
        if "init" in params:
            params["init"] = self._init(params["init"], b, ms)
        result = fn(ms, stats, weights=self.weights, **params)
        self.report[leaf.path] = result.report[_KEY]
        return result.params[_KEY]

    def _init(self, init: Any, b: Any, ms: list[Any]) -> Any:
        import mats_jax

        if init == "base":
            return b
        if init == "average":
            return mats_jax.average(ms, weights=self.weights)
        rest = {k: v for k, v in init.items() if k != "method"}
        fn = getattr(mats_jax, init["method"])
        if init["method"] == "average":
            return fn(ms, weights=self.weights, **rest)
        if init["method"] == "dare":
            rest["key"] = jax.random.key(self.plan.recipe.seed)
        return fn(b, ms, weights=self.weights, **rest)


def _task_vector_blocks(base: Any, model: Any) -> Iterable[np.ndarray]:
    """``θ_m − θ_0`` in the leaf's compute dtype (as ``mats_jax.task_vectors``
    forms it), flattened and in blocks, so no leaf-sized temporary is made."""
    base, model = np.asarray(base).ravel(), np.asarray(model).ravel()
    dtype = compute_dtype(base.dtype)
    for i in range(0, max(base.size, 1), _BLOCK_ENTRIES):
        j = i + _BLOCK_ENTRIES
        yield model[i:j].astype(dtype) - base[i:j].astype(dtype)


def _ties_group(params: dict[str, Any]) -> str:
    return f"density={float(params['density'])!r}"


def keep_count(density: Any, size: int) -> int:
    """TIES's k = ⌈density · N⌉ in [1, N], rounded as the in-memory ``ties`` rounds it
    (a float32 product), in int64 so whole models beyond 2^31 entries work.

    Examples:
      >>> keep_count(0.2, 10), keep_count(1e-9, 10), keep_count(0.5, 3 * 2**31)
      (2, 1, 3221225472)
    """
    k = int(np.ceil(np.float32(density) * np.float32(size)))
    return min(max(k, 1), size)


def _global_ties_thresholds(
    plan: MergePlan, progress: Progress
) -> dict[str, list[float]]:
    """Per group of ``trim: global`` TIES leaves (one density), each model's threshold.

    Two streaming passes; each reads every leaf of the group once from the
    base and once from each model.
    """
    groups: dict[str, list[LeafPlan]] = {}
    for leaf in plan.leaves:
        if _is_ties(leaf, "global"):
            groups.setdefault(_ties_group(leaf.parameters), []).append(leaf)
    out: dict[str, list[float]] = {}
    if not groups:
        return out
    base = plan.base
    assert base is not None
    total = sum(
        2 * leaf.nbytes * (len(plan.models) + 1) for g in groups.values() for leaf in g
    )
    progress.start("threshold", total)
    for key, leaves in groups.items():
        size = sum(int(np.prod(leaf.shape, dtype=np.int64)) for leaf in leaves)
        k = keep_count(leaves[0].parameters["density"], size)

        def vectors(
            leaves: list[LeafPlan] = leaves,
        ) -> Iterable[tuple[int, np.ndarray]]:
            for leaf in leaves:
                assert leaf.base is not None
                b = _read(base, leaf.base)
                for m, (c, src) in enumerate(
                    zip(plan.models, leaf.models, strict=True)
                ):
                    x = _read(c, src)
                    for block in _task_vector_blocks(b, x):
                        yield m, block
                    del x
                progress.advance("threshold", leaf.nbytes * (len(plan.models) + 1))

        out[key] = streaming_magnitude_thresholds(vectors, [k] * len(plan.models))
    progress.finish("threshold")
    return out


def _output_specs(
    plan: MergePlan,
) -> list[tuple[str, tuple[int, ...], np.dtype, tuple[int, ...] | None]]:
    out = []
    layout = plan.recipe.output.layout
    for leaf in plan.leaves:
        name, perm = layout.to_checkpoint(leaf.path, ndim=len(leaf.shape))
        shape = (
            leaf.shape
            if perm is None
            else tuple(leaf.shape[i] for i in inverse_permutation(perm))
        )
        out.append(
            (
                name,
                shape,
                leaf.dtype,
                None if perm is None else inverse_permutation(perm),
            )
        )
    return out


def run_merge(
    plan: MergePlan,
    output: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    checksums: bool = True,
) -> MergeSummary:
    """Streams the merge into directory ``output`` (complete, or not there at all).

    The directory gets the checkpoint (``model.safetensors`` or shards and an
    index; ``params.msgpack``; or the orbax checkpoint itself) and ``README.md``,
    the model card.

    Raises:
      FileExistsError: if ``output`` exists and ``overwrite`` is False.
    """
    progress = progress or Progress()
    recipe = plan.recipe
    output = os.path.abspath(os.fspath(output))
    inputs = [("base", f) for f in plan.base.files] if plan.base is not None else []
    inputs += [(f"models[{i}]", f) for i, m in enumerate(plan.models) for f in m.files]
    for i, spec in enumerate(recipe.models):
        if spec.statistics is not None:
            inputs += [
                (f"models[{i}] statistics", os.path.join(root, f))
                for root, _, names in sorted(os.walk(spec.statistics))
                for f in sorted(names)
            ]
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        atomic_output(output, overwrite=overwrite) as tmp,
    ):
        # Checksums run beside the merge (hashlib releases the GIL).
        def digest_inputs() -> list[tuple[str, str, int, str]]:
            out = []
            for who, f in inputs:
                size = os.path.getsize(f)
                out.append(
                    (who, f, size, file_sha256(f) if checksums else "not computed")
                )
                progress.advance("checksum", size)
            return out

        if checksums:
            progress.start("checksum", sum(os.path.getsize(f) for _, f in inputs))
        digests = pool.submit(digest_inputs)
        thresholds = _global_ties_thresholds(plan, progress)
        merger = _LeafMerger(plan, thresholds)
        specs = _output_specs(plan)
        fmt = recipe.output.format
        writer = None
        collected: dict[str, np.ndarray] = {}
        if fmt == "safetensors":
            writer = SafetensorsWriter(
                tmp,
                [s[:3] for s in specs],
                max_shard_size=recipe.output.max_shard_size,
                metadata={"format": "np", "merged_by": f"mats_jax {_version()}"},
            )
        for stage, total in (
            ("read", plan.read_bytes),
            ("merge", plan.write_bytes),
            ("write", plan.write_bytes),
        ):
            progress.start(stage, total)
        writes = concurrent.futures.ThreadPoolExecutor(1)
        pending: concurrent.futures.Future[None] | None = None

        def write(leaf: LeafPlan, name: str, array: np.ndarray) -> None:
            assert writer is not None
            writer.write(name, array)
            progress.advance("write", leaf.nbytes)

        try:
            for leaf, (name, _, _, perm) in zip(plan.leaves, specs, strict=True):
                # Each input goes to the device as soon as it is read (aliased
                # where numpy's buffer allows), so the host copies are freed.
                # (Reading ahead in a thread was measured: no faster on two
                # cores, and more memory.)
                base = None
                if _needs_base(leaf):
                    assert plan.base is not None and leaf.base is not None
                    base = _to_device(_read(plan.base, leaf.base))
                models = [
                    _to_device(_read(c, s))
                    for c, s in zip(plan.models, leaf.models, strict=False)
                ]
                progress.advance(
                    "read", leaf.nbytes * (len(models) + (base is not None))
                )
                merged = merger(leaf, base, models)
                del base, models
                out = np.asarray(merged)  # waits for the merge; no copy on CPU
                if perm is not None:
                    out = np.ascontiguousarray(np.transpose(out, perm))
                del merged
                progress.advance("merge", leaf.nbytes)
                if pending is not None:
                    pending.result()  # one write in flight: memory stays bounded
                if writer is not None:
                    pending = writes.submit(write, leaf, name, out)
                else:
                    collected[leaf.path] = out
                    progress.advance("write", leaf.nbytes)
                del out
            if pending is not None:
                pending.result()
            if writer is not None:
                writer.close()
            elif fmt == "msgpack":
                os.makedirs(tmp)
                write_msgpack(os.path.join(tmp, MSGPACK_NAME), nest_paths(collected))
            else:
                save_orbax(tmp, nest_paths(collected))
        finally:
            writes.shutdown(wait=True)
            if writer is not None:
                writer.abort()
        for stage in ("read", "merge", "write"):
            progress.finish(stage)
        card = model_card(plan, digests.result(), merger.report, thresholds)
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
    checksums: bool = True,
) -> MergeSummary:
    """Checks and runs a recipe (a :class:`~mats_jax.recipe.Recipe` or a YAML file).

    Args:
      recipe: the recipe or its path.
      output: the output directory (default: the recipe's ``output.path``).
      overwrite: replace an existing output.
      progress: progress hooks.
      checksums: record each input file's sha256 in the model card (hashed
        beside the merge; at a few hundred MB/s per core this can take longer
        than the merge itself).

    Raises:
      RecipeError, CheckpointError: bad input, before any tensor is read.
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
        recipe = load_recipe(recipe)
    target = output if output is not None else recipe.output.path
    if target is None:
        raise CheckpointError(
            f"{recipe.source}: no output: give one (`-o OUT`) or set `output: {{path: ...}}` in the recipe"
        )
    if os.path.lexists(target) and not overwrite:
        raise FileExistsError(
            f"{os.path.abspath(target)} exists; pass --overwrite to replace it"
        )
    return run_merge(
        plan_merge(recipe),
        target,
        overwrite=overwrite,
        progress=progress,
        checksums=checksums,
    )


# ---------------------------------------------------------------------------
# The model card.


def _version() -> str:
    import mats_jax

    return str(mats_jax.__version__)


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "-"


def model_card(
    plan: MergePlan,
    digests: Sequence[tuple[str, str, int, str]],
    report: dict[str, Any],
    thresholds: dict[str, list[float]],
) -> str:
    """The output's README.md: recipe, input checksums, versions, per-leaf methods and solver report."""
    from mats_jax.solver import format_report

    recipe = plan.recipe
    lines = [
        "---",
        "library_name: mats_jax",
        "tags: [merge, mats_jax]",
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
        "| input | file | bytes | sha256 |",
        "|---|---|---:|---|",
    ]
    lines += [
        f"| {who} | `{f}` | {size} | `{digest}` |" for who, f, size, digest in digests
    ]
    if thresholds:
        lines += [
            "",
            "## TIES whole-model thresholds",
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
