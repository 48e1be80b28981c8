"""The engine behind every statistics estimator: one jitted pass per micro-batch.

Per micro-batch it evaluates the model with its dense layers tapped
(:mod:`mats_jax.stats.capture`), backpropagates the Fisher kind's cotangents
(:mod:`mats_jax.stats.likelihood`) to every layer's output at once, and adds
the sums the target statistic type asks for
(:attr:`~mats_jax.Statistic.estimator_sums`):

* ``"inputs"``: ``Σ_r w_r x_r x_rᵀ`` per kernel (and layer, and head for a
  per-head batched product), with ``"rows"`` the row count ``Σ_r w_r``;
* ``"output_gradients"``: ``Σ_r Σ_k g_rk g_rkᵀ``;
* ``"squared_gradients"``: per-example squared scores. For a kernel used once
  with one row per example (a dense layer of a plain classifier) they are
  ``Σ_b Σ_k (x_b ⊙ x_b)(g_bk ⊙ g_bk)ᵀ``, since that example's gradient is the
  outer product ``x_b g_bkᵀ``: no per-example gradient is ever formed. A
  bias of a tap sums the tap's g over each example's rows, and an embedding
  table read by one lookup sums the lookup's g over each example's positions
  that read the same row (both from the same backward pass); every other
  leaf (norms, convolutions, kernels applied to several rows per example, a
  table with other uses) gets them from ``jax.vmap`` of ``jax.vjp``.

Row weights w_r come from the batch's mask: a row of a layer whose rows are
led by the mask's shape ((batch, positions): the tokens of a text model)
takes its entry, so padding tokens count in neither A nor the row count; a
row led by the batch axis alone (after pooling) takes its example's weight.
The likelihood weighs predictions by :func:`~mats_jax.stats.likelihood.prediction_mask`.

Plans. What to compute for a model depends on the shapes of a batch (the
products found when tracing it, their rows). Each distinct batch shape (text
padded per batch to its own length) gets its own plan and jitted step,
cached by the shape signature and compiled once, all adding to one
accumulator: the kernels, their layouts and the accumulator's shapes must be
the same for every shape, or the batch that differs is named in an error.

A kernel gets its Gram or K-FAC statistic unless a factor would have more
than ``max_factor_size`` rows (a vocabulary head's G), it has uses the
capture cannot read, or its rows cannot be told from padding; such leaves
get the fallback, and a :class:`~mats_jax.stats.likelihood.StatisticsFallbackWarning`
lists each with its reason before any work.

:func:`estimate` hands the sums to the type (:meth:`~mats_jax.Statistic.from_sums`),
which applies the package's one normalisation (per example; A and Gram per
row): see :mod:`mats_jax.stats.kronecker`. A statistic type built from these
sums needs no change here.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import types
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mats_jax.stats.accumulate import Step, accumulate
from mats_jax.stats.capture import Bias, Layers, Lookup, Tap, find_layers, tapped
from mats_jax.stats.likelihood import (
    FisherKind,
    StatisticsFallbackWarning,
    StatisticsInputError,
    check_batch,
    check_kind,
    check_label_range,
    check_logits,
    logit_cotangents,
    prediction_mask,
)
from mats_jax.stats.statistic import (
    Diagonal,
    Statistic,
    factor_spec,
    kernel_axes,
    kernel_from_blocks,
)
from mats_jax.tree import leaf_paths, select
from mats_jax.typing import Array, Params, StatTree

__all__ = ["MAX_FACTOR_SIZE", "estimate"]

Fallback = Literal["diagonal"] | None
Target = type[Statistic]
LogitsFn = Callable[[Params, Any], Array]

MAX_FACTOR_SIZE = 8192
"""The default limit on a factor's rows: a kernel whose A or G would have more
falls back. 8192 rows are 256 MiB of float32 per factor and task, and keep
every factor of BERT-large (inputs up to 4096) while leaving out a
vocabulary head's G (30,522 rows for BERT: 3.7 GB per task)."""


def sum_over_examples(x: Array) -> Array:
    """Σ over the leading axis, by pairwise halving.

    XLA's CPU backend lowers a reduction over the leading axis of a large
    array fused with its producer (the squares of per-example gradients) to a
    slow loop: measured 25 ms for 16 × 784 × 256 floats, against under 1.5 ms
    this way. Pairwise halving is as fast as ``jnp.sum`` elsewhere.
    """
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        head = x[:half] + x[half : 2 * half]
        x = jnp.concatenate([head, x[2 * half :]]) if x.shape[0] % 2 else head
    return x[0]


def per_example_gradient_sums(
    logits_fn: LogitsFn,
    params: Params,
    sums: Sequence[str | None],
    micro: Mapping[str, Any],
    key: Array,
    kind: FisherKind,
    num_samples: int,
) -> list[Array | None]:
    """Σ over a micro-batch's examples of a sum of their scores, per leaf.

    ``sums[i]`` names leaf i's: ``"squared_gradients"`` (``Σ_b Σ_k g_bk ⊙
    g_bk``, leaf-shaped), ``"outer_gradients"`` (``Σ_b Σ_k g_bk g_bkᵀ`` of the
    leaf flattened in row-major order, (n, n): one matrix product of the
    stacked per-example gradients) or None (not computed).
    """
    leaves, treedef = jax.tree.flatten(params)
    selected = [name is not None for name in sums]
    chosen = [leaf for leaf, s in zip(leaves, selected, strict=True) if s]
    modes = [name for name in sums if name is not None]
    inputs, mask = micro["inputs"], micro["mask"]
    size = mask.shape[0]
    prediction_shape = jax.eval_shape(lambda: logits_fn(params, inputs)).shape[:-1]
    labels = micro.get("labels")
    labels = labels if labels is not None else jnp.zeros(prediction_shape, jnp.int32)

    def with_chosen(values: list[Array]) -> Params:
        it = iter(values)
        return jax.tree.unflatten(
            treedef,
            [next(it) if s else leaf for leaf, s in zip(leaves, selected, strict=True)],
        )

    def one_example(x: Any, label: Array, m: Array, k: Array) -> list[Array]:
        def logits_of(values: list[Array]) -> Array:
            return logits_fn(with_chosen(values), jax.tree.map(lambda a: a[None], x))

        logits, pullback = jax.vjp(logits_of, chosen)
        weights = prediction_mask(m[None], logits.shape[:-1])
        u = logit_cotangents(logits, label[None], weights, kind, k, num_samples)
        grads = jax.vmap(pullback)(u.astype(logits.dtype))[0]
        return [
            jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0)
            if mode == "squared_gradients"
            else g.astype(jnp.float32).reshape(g.shape[0], -1)  # (k, n)
            for g, mode in zip(grads, modes, strict=True)
        ]

    keys = jax.random.split(key, size)
    per_example = jax.vmap(one_example)(inputs, labels, mask, keys)
    out = []
    for g, mode in zip(per_example, modes, strict=True):
        if mode == "squared_gradients":
            out.append(sum_over_examples(g))
        else:  # every example's every cotangent's gradient, as rows
            rows = g.reshape(-1, g.shape[-1])
            out.append(rows.T @ rows)
    it = iter(out)
    return [next(it) if s else None for s in selected]


@dataclasses.dataclass(frozen=True)
class _Kernel:
    """One parameter leaf read as a dense kernel, and the taps that use it."""

    leaf: int
    taps: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    layer_shape: tuple[int, ...]
    n_in: int
    n_out: int


def _row_weights(tap: Tap, mask: Array) -> Array | None:
    """Weights of the tap's rows (per loop iteration) from the batch mask, or None.

    Rows whose leading axes are the mask's (batch[, positions]) take the mask;
    rows led by the batch axis alone take the per-example mask (the largest
    weight of the example's positions). Rows not led by the batch axis cannot
    be told apart from padding: None (unrecognised).
    """
    rows = tap.row_shape
    example_mask = mask.reshape(mask.shape[0], -1).max(axis=1)
    for m in (mask, example_mask):
        if rows[: m.ndim] == m.shape:
            w = m.reshape(m.shape + (1,) * (len(rows) - m.ndim))
            return jnp.broadcast_to(w, rows).reshape(-1)
    return None


def _kernel_of(
    layers: Layers, leaf: int, tap_ids: list[int], shape: tuple[int, ...]
) -> _Kernel | str:
    """The leaf as one kernel over all its taps, or why its taps disagree."""
    taps = [layers.taps[i] for i in tap_ids]
    first = taps[0]
    layouts = {
        (
            t.in_axes,
            t.out_axes,
            t.batch_axes,
            tuple(t.loop_shape[lv] for lv in t.layer_levels),
        )
        for t in taps
    }
    if len(layouts) != 1:
        return "its products use different axes of it as inputs and outputs"
    blocks, _, _ = kernel_axes(len(shape), first.in_axes, first.out_axes)
    # The accumulator's block axes are the layers' (leading) then the batch
    # axes': the statistic's are the leaf's other axes, in increasing order.
    assert blocks == (*range(len(first.layer_levels)), *first.batch_axes)
    return _Kernel(
        leaf=leaf,
        taps=tuple(tap_ids),
        in_axes=first.in_axes,
        out_axes=first.out_axes,
        layer_shape=tuple(shape[a] for a in blocks),
        n_in=int(np.prod([shape[a] for a in first.in_axes])),
        n_out=int(np.prod([shape[a] for a in first.out_axes])),
    )


def _kernels(
    layers: Layers,
    leaves: list[Any],
    mask: Any,
    selected: Sequence[bool],
    factors: Mapping[str, str],
    max_factor_size: int | None,
) -> tuple[list[_Kernel], dict[int, str]]:
    """The selected leaves that get a kernel statistic, and why the others with products do not.

    ``factors`` names the factors the target forms (``"inputs"`` → A over the
    kernel's inputs, ``"output_gradients"`` → G over its outputs), to which
    ``max_factor_size`` applies.
    """
    by_leaf: dict[int, list[int]] = {}
    for i, tap in enumerate(layers.taps):
        by_leaf.setdefault(tap.leaf, []).append(i)
    kernels: list[_Kernel] = []
    reasons: dict[int, str] = {}
    for leaf, uses in layers.uses.items():
        if not selected[leaf]:
            continue
        if leaf in by_leaf:
            # A statistic of the products alone would state the leaf's
            # curvature without its other uses (a tied embedding's lookups):
            # the fallback, from per-example gradients, covers them all.
            reasons[leaf] = (
                f"used by {', '.join(uses)} as well as by products: a kernel "
                "statistic would leave those uses out, so the leaf falls back as a whole"
            )
        else:
            unread = [u for u in uses if u.startswith("dot_general")]
            if unread:
                reasons[leaf] = (
                    "a product the capture cannot read ("
                    + "; ".join(u.removeprefix("dot_general: ") for u in unread)
                    + ")"
                )
    for leaf, tap_ids in by_leaf.items():
        if leaf in reasons or not selected[leaf]:
            continue
        kernel = _kernel_of(layers, leaf, tap_ids, tuple(np.shape(leaves[leaf])))
        if isinstance(kernel, str):
            reasons[leaf] = kernel
            continue
        unmaskable = [
            layers.taps[t].row_shape
            for t in tap_ids
            if _row_weights(layers.taps[t], mask) is None
        ]
        if unmaskable:
            reasons[leaf] = (
                f"the rows of its input, {unmaskable[0]}, are not led by "
                "the batch axis, so padding cannot be told apart from real rows"
            )
            continue
        too_big = [
            f"its {name} would have {n} rows, more than max_factor_size={max_factor_size}"
            for sum_name, name in factors.items()
            for n in [kernel.n_in if sum_name == "inputs" else kernel.n_out]
            if max_factor_size is not None and n > max_factor_size
        ]
        if too_big:
            reasons[leaf] = "; ".join(too_big)
            continue
        kernels.append(kernel)
    return kernels, reasons


def _reduce_loops(tap: Tap, x: Array) -> Array:
    """Sums a per-iteration array over the loops that do not slice the leaf."""
    summed = tuple(i for i in range(len(tap.loop_shape)) if i not in tap.layer_levels)
    out = jnp.sum(x, axis=summed) if summed else x
    return out


def _tap_sums(
    tap: Tap, x: Array, gs: Array | None, mask: Array
) -> tuple[Array, Array | None, Array]:
    """(Σ w x xᵀ, Σ g gᵀ, Σ w) for one tap, per layer (and per head)."""
    weights = _row_weights(tap, mask)
    assert weights is not None
    rows_x = tap.rows_and_inputs(x).astype(jnp.float32)
    a = _reduce_loops(tap, jnp.einsum("...ri,r,...rj->...ij", rows_x, weights, rows_x))
    n_loops = int(
        np.prod(
            [
                tap.loop_shape[i]
                for i in range(len(tap.loop_shape))
                if i not in tap.layer_levels
            ]
        )
    )
    count = jnp.sum(weights) * n_loops
    g = None
    if gs is not None:
        rows_g = jax.vmap(tap.rows_and_outputs)(gs).astype(jnp.float32)
        g = _reduce_loops(tap, jnp.einsum("k...ro,k...rp->...op", rows_g, rows_g))
    return a, g, count


def _biases_from_taps(
    layers: Layers, per_example: Sequence[str | None], leaves: list[Any], size: int
) -> dict[int, Bias]:
    """The leaves that want per-example squares and can take them from a tap (:func:`_bias_squares`).

    A :class:`~mats_jax.stats.capture.Bias` whose tap's rows are led by the
    micro-batch's examples, so that each example's gradient is the sum of
    its own rows.
    """
    out = {}
    for bias in layers.biases:
        tap = layers.taps[bias.tap]
        shape = (
            *(tap.loop_shape[level] for level in bias.levels),
            *tap.out_shape[len(tap.out_shape) - bias.ndim :],
        )
        if (
            per_example[bias.leaf] == "squared_gradients"
            and tap.row_shape[:1] == (size,)
            and shape == tuple(np.shape(leaves[bias.leaf]))
        ):
            out[bias.leaf] = bias
    return out


def _lookups_from_taps(
    layers: Layers, per_example: Sequence[str | None], size: int
) -> dict[int, tuple[int, Lookup]]:
    """The tables that want per-example squares and can take them from their
    lookup (:func:`_lookup_squares`), with the lookup's place in ``layers.lookups``.

    A lookup whose indices are led by the micro-batch's examples, so that
    each example's gradient comes from its own output rows.
    """
    return {
        lk.leaf: (j, lk)
        for j, lk in enumerate(layers.lookups)
        if per_example[lk.leaf] == "squared_gradients" and lk.index_shape[:1] == (size,)
    }


def _worth_taking(
    biases: dict[int, Bias],
    per_example: Sequence[str | None],
    g_taps: set[int],
    lookups: Mapping[int, Any],
) -> dict[int, Bias]:
    """The biases to take from the taps: all, if then no leaf is left to the
    per-example pass or a lookup's output gradient is formed; else those
    whose tap's output gradient is formed anyway.

    A tap's g costs a backward pass down to it, which XLA prunes when nothing
    reads it: measured on the benchmark's ViT (LayerNorms left to the
    per-example pass either way), taking every bias from the taps halved
    diagonal_fisher's rate. Without the per-example pass at all, the batched
    backward is cheaper than the vmapped one it replaces. An embedding
    lookup is at the bottom of the model: the backward pass down to it
    forms every tap's g.
    """
    wanted = {i for i, name in enumerate(per_example) if name is not None}
    if lookups or wanted <= biases.keys():
        return biases
    return {i: b for i, b in biases.items() if b.tap in g_taps}


def _bias_squares(bias: Bias, tap: Tap, gs: Array) -> Array:
    """``Σ_b Σ_k (Σ_r g_bkr)²``: a bias's squared per-example gradients, from its tap's.

    ``gs`` is the tap's output gradient, (cotangents, loops…, rows…,
    outputs…), its first row axis the examples. Example b's gradient of a
    leaf added to the tap's output along its last ``bias.ndim`` axes is the
    sum of g over the axes it is broadcast along: the example's other rows,
    and the loops that do not slice the leaf. Padding needs no mask: the
    cotangents carry it, and a padded row's g is what it contributes.
    """
    lead = len(tap.loop_shape)
    loops = tuple(1 + i for i in range(lead) if i not in bias.levels)
    rows = tuple(1 + lead + a for a in range(1, len(tap.out_shape) - bias.ndim))
    per_example = jnp.sum(gs.astype(jnp.float32), axis=loops + rows)
    squares = jnp.sum(jnp.square(per_example), axis=0)  # (levels…, b, leaf…)
    return sum_over_examples(jnp.moveaxis(squares, len(bias.levels), 0))


def _lookup_squares(lookup: Lookup, ids: Array, gs: Array, rows: int) -> Array:
    """``Σ_b Σ_k (Σ_{r: ids_br = t} g_bkr)²`` per table row t: the table's
    squared per-example gradients, from its lookup's output gradient.

    ``gs`` is (cotangents, *ids.shape, *row shape). Example b's gradient of
    row t sums g over b's positions that read t, so positions reading the
    same row are summed (into the first of them) before squaring. An index
    out of range reads the nearest row (``"clip"``) or has no gradient
    (``"drop"``), as the gather's mode says.

    Examples:
      >>> lk = Lookup(0, 0, (1, 3), (1, 3, 1), "drop")
      >>> g = jnp.array([[[[1.0], [2.0], [5.0]]]])  # one cotangent, positions 0 1 2
      >>> _lookup_squares(lk, jnp.array([[1, 1, 0]]), g, 2)[:, 0].tolist()  # [5², (1 + 2)²]
      [25.0, 9.0]
    """
    size = ids.shape[0]
    ids = ids.reshape(size, -1).astype(jnp.int32)
    positions = ids.shape[1]
    g = gs.astype(jnp.float32).reshape(gs.shape[0], size, positions, -1)
    if lookup.mode == "clip":
        ids = jnp.clip(ids, 0, rows - 1)
    else:
        valid = (ids >= 0) & (ids < rows)
        g = jnp.where(valid[None, :, :, None], g, 0.0)
        ids = jnp.where(valid, ids, 0)
    # first[b, r]: b's first position reading r's row (an integer (P, P)
    # comparison per example, not a product with the gradients).
    first = jnp.argmax(ids[:, :, None] == ids[:, None, :], axis=-1)
    summed = jnp.zeros_like(g).at[:, jnp.arange(size)[:, None], first].add(g)
    squares = jnp.sum(jnp.square(summed), axis=0).reshape(size * positions, -1)
    table = (
        jnp.zeros((rows, squares.shape[-1]), jnp.float32)
        .at[ids.reshape(-1)]
        .add(squares)
    )
    return table.reshape(rows, *lookup.out_shape[len(lookup.index_shape) :])


def _one_row_per_example(tap: Tap, size: int) -> bool:
    """A tap whose rows are the examples themselves, applied once per example."""
    return (
        tap.row_shape == (size,)
        and not tap.batch_axes
        and len(tap.layer_levels) == len(tap.loop_shape)
    )


def _shape_str(shape: Sequence[int]) -> str:
    """A per-batch shape with its leading (batch) axis named: ``(batch, 6)``."""
    return "(" + ", ".join(["batch", *(str(n) for n in shape[1:])]) + ")"


def _spec(x: Any, size: int) -> jax.ShapeDtypeStruct:
    """The shape and dtype ``x`` has in a micro-batch of ``size`` examples."""
    shape = tuple(np.shape(x))
    dtype = jax.dtypes.canonicalize_dtype(
        x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    )
    return jax.ShapeDtypeStruct((size, *shape[1:]), dtype)


def _micro_spec(batch: Mapping[str, Any], size: int) -> dict[str, Any]:
    """Shapes and dtypes of a batch's micro-batches, as :mod:`~mats_jax.stats.accumulate` cuts them."""
    inputs = jax.tree.map(lambda x: _spec(x, size), batch["inputs"])
    mask_shape = tuple(np.shape(batch["mask"]))[1:] if "mask" in batch else ()
    out = {
        "inputs": inputs,
        "mask": jax.ShapeDtypeStruct((size, *mask_shape), jnp.float32),
    }
    if "labels" in batch:
        out["labels"] = _spec(batch["labels"], size)
    return out


def _describe(spec: Mapping[str, Any]) -> str:
    """A micro-batch's shapes for messages, the batch axis named."""
    return ", ".join(
        name + jax.tree_util.keystr(path) + " " + _shape_str(x.shape)
        for name in ("inputs", "mask", "labels")
        if name in spec
        for path, x in jax.tree_util.tree_flatten_with_path(spec[name])[0]
    )


class _LentFunction:
    """The model function a cached plan traces, lent by each estimate that runs the plan.

    A plan outlives the estimate that built it and serves every function its
    key matches (:func:`_function_key`), so it must hold none of them: it
    would keep the first one, its closure and its model alive for the
    process. Each estimate lends its own function for as long as it runs
    (the only time the plan's step is traced) and takes it back.
    """

    def __init__(self) -> None:
        self.fn: Callable[[Params, Any], Any] | None = None

    def __call__(self, params: Params, inputs: Any) -> Any:
        if self.fn is None:
            raise RuntimeError(
                "an estimator's step was traced outside the estimate that runs it"
            )
        return self.fn(params, inputs)

    @contextlib.contextmanager
    def lent(self, fn: Callable[[Params, Any], Any]) -> Iterator[None]:
        previous, self.fn = self.fn, fn
        try:
            yield
        finally:
            self.fn = previous


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one configuration of an estimator computes for one batch shape, and its step.

    Attributes:
      kernels: the leaves that get the kernel statistic (or, for the
        diagonal, the outer-product shortcut).
      per_example: per leaf, the sum its per-example gradients give
        (``"squared_gradients"``, ``"outer_gradients"``) or None.
      init_shapes: the accumulator's shapes, by leaf path and sum.
      step: the step function (jitted by the accumulator, once).
      classes: the logits' last axis, when the statistic needs the logits.
      fallbacks: the leaves with products that do not get the kernel
        statistic, and why (by leaf path).
      model: the model function the step calls, lent to it by the estimate
        running it.
    """

    kernels: tuple[_Kernel, ...]
    per_example: tuple[str | None, ...]
    init_shapes: dict[str, Any]
    step: Step
    classes: int | None
    fallbacks: dict[str, str]
    model: _LentFunction

    def layout(self) -> Any:
        """What every batch shape must agree on: the accumulator and its reading."""
        return (
            tuple((k.leaf, k.in_axes, k.out_axes, k.layer_shape) for k in self.kernels),
            self.per_example,
            self.init_shapes,
        )


# Enough for a text pipeline's length buckets across a few tasks' estimates.
_PLAN_CACHE_SIZE = 64
# How deep the key looks into the lists, tuples and dicts a function refers to.
_KEY_DEPTH = 4
_KEY_ITEMS = 256
# Immutable, hashable and compared by value: numpy's scalars and dtypes
# cannot be weakly referenced, and need not be.
_BY_VALUE = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    type(Ellipsis),
    np.generic,
    np.dtype,
)


class _Unkeyable(Exception):
    """A value the plan cache can compare neither by value nor by identity."""


def _value_key(obj: Any, watched: list[Any], depth: int = 0) -> Hashable:
    """How the plan cache compares a value a model function refers to.

    Immutable scalars by value; small tuples, lists and dicts by their items
    (a dict the user changes between two estimates then changes the key); anything
    else by identity, ``("id", id(obj))``, with ``obj`` appended to
    ``watched``: the cache holds it weakly and drops the entry when it dies,
    before its id can be reused. Raises :class:`_Unkeyable` for an object it
    can hold neither way (no weak references: containers nested past
    ``_KEY_DEPTH`` or longer than ``_KEY_ITEMS`` among them).
    """
    if isinstance(obj, _BY_VALUE):
        return (type(obj), obj)
    if (
        type(obj) in (tuple, list, dict)
        and depth < _KEY_DEPTH
        and len(obj) <= _KEY_ITEMS
    ):
        items = tuple(obj.items()) if type(obj) is dict else obj
        return (type(obj), tuple(_value_key(x, watched, depth + 1) for x in items))
    try:
        weakref.ref(obj)
    except TypeError:
        raise _Unkeyable from None
    watched.append(obj)
    return ("id", id(obj))


def _global_names(code: types.CodeType) -> set[str]:
    """The names a code object (and the functions defined inside it) may read as globals."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _function_key(fn: Any, watched: list[Any]) -> Hashable:
    """What fixes what ``fn`` computes, as the plan cache compares it.

    A Python function by its code object, its closure cells' contents, its
    defaults and the globals its code names (each as :func:`_value_key`
    compares it); a ``functools.partial`` by its function's key and its
    arguments; a bound method by its function's key and its object. So a
    fresh ``lambda p, x: model.apply(p, x)`` built again for every task
    matches the first one while ``model`` is the same object, and a lambda
    closing over another model does not. Any other callable (a jitted
    function, an object with ``__call__``) by identity.
    """
    if isinstance(fn, functools.partial):
        return (
            functools.partial,
            _function_key(fn.func, watched),
            _value_key(fn.args, watched),
            _value_key(fn.keywords, watched),
        )
    if isinstance(fn, types.MethodType):
        # A fresh bound method at every ``model.apply``: its function is the
        # class's own, compared by identity.
        return (
            types.MethodType,
            _value_key(fn.__func__, watched),
            _value_key(fn.__self__, watched),
        )
    if not isinstance(fn, types.FunctionType):
        return _value_key(fn, watched)
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(_value_key(cell.cell_contents, watched))
        except ValueError:  # a cell not yet assigned
            cells.append(None)
    names = sorted(_global_names(fn.__code__) & fn.__globals__.keys())
    return (
        fn.__code__,
        tuple(cells),
        _value_key(fn.__defaults__, watched),
        _value_key(fn.__kwdefaults__, watched),
        tuple((name, _value_key(fn.__globals__[name], watched)) for name in names),
    )


class _PlanCache:
    """The plans of recent estimates, least recently used first, holding no model function.

    A key compares some objects by identity (:func:`_value_key`); the cache
    holds each weakly, and an entry goes when one of its objects dies, so no
    id of a dead object can match a new one. The weak references' callbacks
    only note the death (they may run inside any allocation, even in the
    middle of an update of this cache); entries go at the next lookup.
    """

    def __init__(self, size: int):
        self.size = size
        self.plans: collections.OrderedDict[Hashable, _Plan] = collections.OrderedDict()
        self.ids: dict[Hashable, frozenset[int]] = {}
        self.watching: dict[int, weakref.ref[Any]] = {}
        self.dead: list[int] = []

    def get(self, key: Hashable) -> _Plan | None:
        self._forget_dead()
        plan = self.plans.get(key)
        if plan is not None:
            self.plans.move_to_end(key)
        return plan

    def put(self, key: Hashable, plan: _Plan, watched: Sequence[Any]) -> None:
        self._forget_dead()
        for obj in watched:
            if id(obj) not in self.watching:
                self.watching[id(obj)] = weakref.ref(
                    obj, functools.partial(self._note_death, id(obj))
                )
        self.plans[key] = plan
        self.ids[key] = frozenset(id(obj) for obj in watched)
        while len(self.plans) > self.size:
            oldest, _ = self.plans.popitem(last=False)
            del self.ids[oldest]
        self._unwatch_unused()

    def __len__(self) -> int:
        self._forget_dead()
        return len(self.plans)

    def _note_death(self, i: int, _: weakref.ref[Any]) -> None:
        self.dead.append(i)

    def _forget_dead(self) -> None:
        while self.dead:
            i = self.dead.pop()
            self.watching.pop(i, None)
            for key in [k for k, ids in self.ids.items() if i in ids]:
                del self.plans[key], self.ids[key]

    def _unwatch_unused(self) -> None:
        used = frozenset().union(*self.ids.values())
        for i in [i for i in self.watching if i not in used]:
            del self.watching[i]


_PLANS = _PlanCache(_PLAN_CACHE_SIZE)


def _signature(tree: Any) -> Any:
    """The tree's structure, shapes and dtypes (of arrays or ShapeDtypeStructs)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(
        (
            tuple(np.shape(x)),
            str(x.dtype if hasattr(x, "dtype") else jnp.result_type(x)),
        )
        for x in leaves
    )


class _Config(NamedTuple):
    """Everything besides shapes that an estimator's plan depends on."""

    target: Target
    kind: FisherKind
    num_samples: int
    fallback: Fallback
    selected: tuple[bool, ...]
    size: int
    max_factor_size: int | None
    needs_fisher: bool


def _cache_key(fn: Any, rest: Hashable) -> tuple[Hashable | None, list[Any]]:
    """The plan cache's key for ``fn`` and ``rest``, and the objects it compares by identity.

    A function the key cannot read (it refers to a set, say) is compared by
    identity instead (its plan lives as long as it does); one that cannot be
    weakly referenced either, or a key that is not hashable, gets None: no
    caching.
    """
    for read in (_function_key, _value_key):
        watched: list[Any] = []
        try:
            key = (read(fn, watched), rest)
            hash(key)
        except (_Unkeyable, TypeError):
            continue
        return key, watched
    return None, []


def _plan(
    fn: Callable[[Params, Any], Any],
    params: Params,
    micro: Mapping[str, Any],
    config: _Config,
    where: str,
) -> _Plan:
    """The (cached) plan for this model function, configuration and micro-batch shapes.

    Reusing the plan reuses its step function, and with it the jitted
    executable: estimating the statistics of many tasks of one model
    compiles once per batch shape, also when each task builds its own
    ``lambda`` of the model (:func:`_function_key`). The caller lends ``fn``
    to the plan's :attr:`_Plan.model` while it runs the step. ``where`` names
    the batch in errors.
    """
    key, watched = _cache_key(fn, (config, _signature(params), _signature(micro)))
    cached = None if key is None else _PLANS.get(key)
    if cached is not None:
        return cached
    model = _LentFunction()
    with model.lent(fn):
        built = _build_plan(model, params, micro, config, where)
    if key is not None:
        _PLANS.put(key, built, watched)
    return built


def _traced(
    fn: Callable[[Params, Any], Any],
    params: Params,
    micro: Mapping[str, Any],
    config: _Config,
    where: str,
) -> tuple[Layers, tuple[int, ...] | None]:
    """The layers of ``fn`` on these shapes, and its logits' shape if the statistic needs them."""
    try:
        layers = find_layers(fn, params, micro["inputs"])
        logits = jax.eval_shape(fn, params, micro["inputs"])
    except StatisticsInputError:
        raise
    except (TypeError, ValueError) as error:
        # Shapes no plan fits (features of another size): name the batch.
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise StatisticsInputError(
            f"{where}: the model function cannot be applied to it: "
            f"{type(error).__name__}: {message}"
        ) from error
    if not config.needs_fisher:
        return layers, None
    labels = micro.get("labels")
    try:
        check_logits(
            logits,
            config.size,
            None if labels is None else tuple(labels.shape),
            config.kind,
        )
    except StatisticsInputError as error:
        raise StatisticsInputError(f"{where}: {error}") from None
    return layers, tuple(logits.shape)


def _check_mask(
    mask_shape: tuple[int, ...],
    logits_shape: tuple[int, ...] | None,
    inputs: Any,
    layers: Layers,
    where: str,
) -> None:
    """A mask is (batch,), or (batch, positions) of the logits, the inputs or a layer's rows.

    A mask with more axes than the logits' predictions must lead an input's
    shape or a dense layer's rows: it marks positions of the inputs.
    """
    predictions = None if logits_shape is None else logits_shape[:-1]
    positions = sorted(
        shape
        for shape in {tuple(x.shape) for x in jax.tree.leaves(inputs)}
        | {tap.row_shape for tap in layers.taps}
        if shape[:1] == mask_shape[:1]  # led by the batch axis
    )
    of_inputs = any(r[: len(mask_shape)] == mask_shape for r in positions)
    if predictions is None:
        fits = of_inputs
    elif predictions[: len(mask_shape)] == mask_shape:
        fits = True
    else:
        fits = mask_shape[: len(predictions)] == predictions and of_inputs
    if len(mask_shape) == 1 or fits:
        return
    neither = (
        ""
        if predictions is None
        else f"the logits' predictions {_shape_str(predictions)} nor "
    )
    raise StatisticsInputError(
        f"{where}: the mask has shape {_shape_str(mask_shape)}, which matches neither "
        f"{neither}the positions of the inputs or of any dense layer's rows ("
        + ", ".join(_shape_str(r) for r in positions)
        + "): a mask is (batch,), or (batch, positions) with the positions of the "
        "logits or of the inputs"
    )


def _build_plan(
    model: _LentFunction,
    params: Params,
    micro: Mapping[str, Any],
    config: _Config,
    where: str,
) -> _Plan:
    """The plan of ``model`` (lent its function while this runs) for these shapes."""
    target, kind, num_samples, fallback, selected, size, max_factor_size, _ = config
    flat_params = jax.tree.leaves(params)
    paths = jax.tree.leaves(leaf_paths(params))
    layers, logits_shape = _traced(model, params, micro, config, where)
    mask_spec = micro["mask"]
    _check_mask(tuple(mask_spec.shape), logits_shape, micro["inputs"], layers, where)
    probe_mask = jnp.ones(mask_spec.shape, mask_spec.dtype)
    squares = "squared_gradients" in target.estimator_sums
    outer = "outer_gradients" in target.estimator_sums
    factor_names = {"inputs": "input factor A", "output_gradients": "output factor G"}
    kernels, reasons = _kernels(
        layers,
        flat_params,
        probe_mask,
        [True] * len(flat_params) if squares else selected,
        {k: v for k, v in factor_names.items() if k in target.estimator_sums},
        max_factor_size,
    )
    if outer:
        # Whole blocks, from per-example gradients; a block past the size
        # limit gets the fallback, as a factor would.
        kernels = []
        reasons = {
            i: f"its block would have {int(np.size(flat_params[i]))} rows, more than "
            f"the limit of {max_factor_size}"
            for i, leaf in enumerate(flat_params)
            if selected[i]
            and max_factor_size is not None
            and int(np.size(leaf)) > max_factor_size
        }
    elif squares:
        # Only kernels used once, one row per example, take the outer-product
        # shortcut; the rest need per-example gradients (the same statistic):
        # forming X_bᵀ G_b from the taps instead measured no faster on the
        # real BERT or the benchmark's ViT, while norms keep the vmapped pass.
        kernels = [
            k
            for k in kernels
            if selected[k.leaf]
            and len(k.taps) == 1
            and _one_row_per_example(layers.taps[k.taps[0]], size)
        ]
        reasons = {}
    elif not layers.taps and not reasons:
        # Nothing to read at all (kernels chosen away or too large are
        # fallbacks, and listed, not an error).
        raise StatisticsInputError(
            f"{target.kind}: no dense layer (a product of an activation with a parameter) "
            f"was found in the model function; leaves: {', '.join(paths[:10])}"
        )
    kernel_leaves = {k.leaf for k in kernels}

    def per_example_sum(i: int) -> str | None:
        if outer and selected[i] and i not in reasons:
            return "outer_gradients"
        if (
            (squares and selected[i]) or fallback == "diagonal"
        ) and i not in kernel_leaves:
            return "squared_gradients"
        return None

    per_example = [per_example_sum(i) for i in range(len(flat_params))]
    lookups = _lookups_from_taps(layers, per_example, size)
    biases = _worth_taking(
        _biases_from_taps(layers, per_example, flat_params, size),
        per_example,
        {
            t
            for k in kernels
            for t in k.taps
            if squares or "output_gradients" in target.estimator_sums
        },
        lookups,
    )
    # The leaves left to the second, vmapped per-example pass.
    vmapped = [
        None if i in biases or i in lookups else name
        for i, name in enumerate(per_example)
    ]
    needs_g = (
        "output_gradients" in target.estimator_sums
        or (squares and bool(kernels))
        or bool(biases)
        or bool(lookups)
    )
    run = tapped(model, layers)

    init: dict[str, Any] = {}  # shapes of the accumulator's arrays
    for k in kernels:
        shapes = {
            "squared_gradients": (*k.layer_shape, k.n_in, k.n_out),
            "inputs": (*k.layer_shape, k.n_in, k.n_in),
            "rows": (),
            "output_gradients": (*k.layer_shape, k.n_out, k.n_out),
        }
        init[paths[k.leaf]] = {name: shapes[name] for name in target.estimator_sums}
    for i, name in enumerate(per_example):
        if name == "squared_gradients":
            init[paths[i]] = {name: tuple(np.shape(flat_params[i]))}
        elif name == "outer_gradients":
            n = int(np.size(flat_params[i]))
            init[paths[i]] = {name: (n, n)}

    def step(params: Params, micro: Mapping[str, Any], k: Array) -> dict[str, Any]:
        inputs, mask = micro["inputs"], micro["mask"]
        # The micro-batch's sums, added to zeros (which XLA folds away) where
        # a kernel sums over several taps.
        new: dict[str, Any] = {
            path: {name: jnp.zeros(shape, jnp.float32) for name, shape in entry.items()}
            for path, entry in init.items()
        }
        if kernels or biases or lookups:
            eps = [
                jnp.zeros(s, d)
                for s, d in zip(layers.eps_shapes, layers.eps_dtypes, strict=True)
            ]
            gs = None
            if needs_g:
                out, pullback, xs = jax.vjp(
                    lambda e: run(params, e, inputs), eps, has_aux=True
                )
                weights = prediction_mask(mask, out.shape[:-1])
                u = logit_cotangents(
                    out, micro.get("labels"), weights, kind, k, num_samples
                )
                gs = jax.vmap(pullback)(u.astype(out.dtype))[0]
            else:
                _, xs = run(params, eps, inputs)
            for kern in kernels:
                entry = dict(new[paths[kern.leaf]])
                for t in kern.taps:
                    tap = layers.taps[t]
                    if squares:
                        assert gs is not None
                        x2 = jnp.square(tap.rows_and_inputs(xs[t]).astype(jnp.float32))
                        g2 = jnp.square(
                            jax.vmap(tap.rows_and_outputs)(gs[t]).astype(jnp.float32)
                        )
                        entry["squared_gradients"] = entry[
                            "squared_gradients"
                        ] + jnp.einsum("...bi,k...bo->...io", x2, g2)
                        continue
                    a, g, count = _tap_sums(
                        tap, xs[t], None if gs is None else gs[t], mask
                    )
                    entry["inputs"] = entry["inputs"] + a
                    entry["rows"] = entry["rows"] + count
                    if "output_gradients" in entry:
                        assert g is not None
                        entry["output_gradients"] = entry["output_gradients"] + g
                new[paths[kern.leaf]] = entry
            for i, bias in biases.items():
                assert gs is not None
                squared = _bias_squares(bias, layers.taps[bias.tap], gs[bias.tap])
                new[paths[i]] = {"squared_gradients": squared}
            for i, (j, lookup) in lookups.items():
                assert gs is not None
                at = len(layers.taps) + j
                squared = _lookup_squares(
                    lookup, xs[at], gs[at], int(np.shape(flat_params[i])[0])
                )
                new[paths[i]] = {"squared_gradients": squared}
        if any(vmapped):
            sums = per_example_gradient_sums(
                model,
                params,
                vmapped,
                micro,
                jax.random.fold_in(k, 1),
                kind,
                num_samples,
            )
            for i, s in enumerate(sums):
                name = vmapped[i]
                if s is not None and name is not None:
                    new[paths[i]] = {name: s}
        return new

    return _Plan(
        kernels=tuple(kernels),
        per_example=tuple(per_example),
        init_shapes=init,
        step=step,
        classes=None if logits_shape is None else logits_shape[-1],
        fallbacks={paths[i]: r for i, r in sorted(reasons.items())},
        model=model,
    )


def _peek(
    batches: Iterable[Mapping[str, Any]],
) -> tuple[Mapping[str, Any], Iterator[Mapping[str, Any]]]:
    """The first batch, and an iterator over all of them (the first included)."""
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise StatisticsInputError(
            "the data iterator yielded no batches: statistics need at least one example"
        ) from None
    return first, itertools.chain([first], iterator)


class _PlansByShape:
    """The plan of each batch shape seen in one estimate, checked against the first.

    Called as the accumulator's ``step_for``: plans the batch's shape (once
    per shape), checks that it accumulates into the same statistics as the
    first batch did, checks concrete labels against the classes, and returns
    the plan's step. A context manager: within it, every plan it handed out
    is lent the model function (:class:`_LentFunction`).
    """

    def __init__(
        self, fn: Callable[[Params, Any], Any], params: Params, config: _Config
    ):
        self.fn, self.params, self.config = fn, params, config
        self.plans: dict[Any, _Plan] = {}
        self.first: tuple[_Plan, str] | None = None
        self.lending = contextlib.ExitStack()

    def __enter__(self) -> _PlansByShape:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.lending.close()

    def plan(self, batch: Mapping[str, Any], index: int) -> _Plan:
        spec = _micro_spec(batch, self.config.size)
        key = _signature(spec)
        if key in self.plans:
            return self.plans[key]
        where = f"batch {index} ({_describe(spec)})"
        if self.first is not None:
            where += f"; batch 0 had {self.first[1]}"
        plan = _plan(self.fn, self.params, spec, self.config, where)
        self.lending.enter_context(plan.model.lent(self.fn))
        if self.first is None:
            self.first = (plan, _describe(spec))
        elif plan.layout() != self.first[0].layout():
            raise StatisticsInputError(
                f"{where}: its shapes change which leaves get which statistic "
                f"({_layout_difference(self.first[0], plan)}); statistics over "
                "batches of different shapes must agree on every layer"
            )
        self.plans[key] = plan
        return plan

    def __call__(self, batch: Mapping[str, Any], index: int) -> Step:
        plan = self.plan(batch, index)
        if (
            self.config.needs_fisher
            and self.config.kind == "empirical"
            and plan.classes is not None
        ):
            check_label_range(batch, index, plan.classes)
        return plan.step


def _layout_difference(first: _Plan, other: _Plan) -> str:
    """The leaf paths whose statistics differ between two plans."""
    differ = sorted(
        path
        for path in set(first.init_shapes) | set(other.init_shapes)
        if first.init_shapes.get(path) != other.init_shapes.get(path)
    )
    return "leaves " + ", ".join(differ[:5]) if differ else "the kernels' axes"


def _warn_fallbacks(plan: _Plan, target: Target, fallback: Fallback) -> None:
    """Lists the leaves with products that do not get the kernel statistic, and why."""
    if not plan.fallbacks:
        return
    instead = (
        "the diagonal Fisher (fallback='diagonal')"
        if fallback == "diagonal"
        else "no statistic (fallback=None)"
    )
    # Imported here: mats_jax.checks imports the statistic types, whose package
    # imports this module (a lower layer; only the import order is circular).
    from mats_jax.checks import warn

    listing = "; ".join(f"{path!r}: {why}" for path, why in plan.fallbacks.items())
    warn(
        f"{target.kind}: {len(plan.fallbacks)} leaves with dense products get {instead} "
        f"instead of {target.kind}: {listing}",
        StatisticsFallbackWarning,
    )


def estimate(
    fn: Callable[[Params, Any], Any],
    params: Params,
    batches: Iterable[Mapping[str, Any]],
    *,
    target: Target,
    kind: FisherKind,
    num_samples: int,
    key: Array | None,
    micro_batch_size: int,
    mesh: Mesh | None,
    fallback: Fallback,
    progress: bool,
    leaves: Any = None,
    max_factor_size: int | None = MAX_FACTOR_SIZE,
) -> StatTree:
    """Estimates ``target`` statistics of ``fn`` over ``batches``; see the module docstring.

    Every check (labels within the classes, masks, the logits' dtype, batch
    shapes) is made on concrete values: estimators run eagerly over concrete
    batches and parameters, jitting their own per-micro-batch steps, and
    cannot themselves be called under ``jax.jit``.

    Args:
      target: the statistic type to estimate, from the sums it names
        (:attr:`~mats_jax.Statistic.estimator_sums`): kernel statistics such as
        :class:`~mats_jax.Gram` and :class:`~mats_jax.KFAC` for every selected
        dense kernel (``fallback`` for the other leaves), or
        :class:`~mats_jax.Diagonal` for every leaf selected by ``leaves``.
      leaves: which leaves get the target statistic: None (all), a boolean
        pytree with ``params``' structure, or leaf-path patterns (a string or
        a sequence of strings, as :func:`mats_jax.tree.select` reads them).
      max_factor_size: the most rows a formed factor (A, G) may have; a kernel
        past it gets the fallback. None: no limit.
      Everything else: as for :func:`~mats_jax.kfac`.
    """
    if fallback not in ("diagonal", None):
        raise StatisticsInputError(
            f"fallback must be 'diagonal' or None, got {fallback!r}"
        )
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(params)):
        raise StatisticsInputError(
            "params are traced: estimators cannot be called under jax.jit (they "
            "iterate over concrete batches and jit their own steps); call the "
            "estimator outside the jitted function"
        )
    gradient_sums = {"output_gradients", "squared_gradients"}
    needs_fisher = bool(gradient_sums & set(target.estimator_sums)) or (
        fallback == "diagonal"
    )
    if needs_fisher:
        check_kind(kind, num_samples)
        if kind == "sampled" and key is None:
            raise StatisticsInputError(
                "kind='sampled' needs a PRNG key: key=jax.random.key(seed)"
            )
    if max_factor_size is not None and (
        int(max_factor_size) != max_factor_size or max_factor_size < 1
    ):
        raise StatisticsInputError(
            f"max_factor_size must be a positive integer or None, got {max_factor_size!r}"
        )
    selected = _selection(params, leaves)
    size = int(micro_batch_size) if int(micro_batch_size) == micro_batch_size else -1
    if size < 1:
        raise StatisticsInputError(
            f"micro_batch_size must be a positive integer, got {micro_batch_size!r}"
        )
    if mesh is not None:
        devices = mesh.shape[mesh.axis_names[0]]
        size = -(-size // devices) * devices
    first, batches = _peek(batches)
    needs_fisher_labels = needs_fisher and kind == "empirical"
    check_batch(first, 0, needs_labels=needs_fisher_labels)
    config = _Config(
        target,
        kind,
        num_samples,
        fallback,
        tuple(selected),
        size,
        None if max_factor_size is None else int(max_factor_size),
        needs_fisher,
    )
    with _PlansByShape(fn, params, config) as plans:
        plan = plans.plan(first, 0)
        _warn_fallbacks(plan, target, fallback)
        kernels, per_example = plan.kernels, plan.per_example
        flat_params = jax.tree.leaves(params)
        paths = jax.tree.leaves(leaf_paths(params))
        init = jax.tree.map(
            lambda shape: jnp.zeros(shape, jnp.float32),
            plan.init_shapes,
            is_leaf=lambda x: isinstance(x, tuple),
        )
        acc, n = accumulate(
            plans,
            init,
            params,
            batches,
            key=key if key is not None else jax.random.key(0),
            micro_batch_size=size,
            needs_labels=needs_fisher_labels,
            mesh=mesh,
            state_shardings=(
                None
                if mesh is None
                else _accumulator_shardings(plan, flat_params, paths, mesh)
            ),
            progress=progress,
            description=f"{target.kind} ({kind})" if needs_fisher else target.kind,
        )
    out: list[Statistic | None] = [None] * len(flat_params)
    n_examples = jnp.asarray(n, jnp.float32)
    for kern in kernels:
        sums = dict(acc[paths[kern.leaf]])
        if "squared_gradients" in sums:  # in (blocks, I, O) layout: the leaf's
            shape = tuple(np.shape(flat_params[kern.leaf]))
            blocks = sums["squared_gradients"].reshape(-1, kern.n_in, kern.n_out)
            sums["squared_gradients"] = kernel_from_blocks(
                blocks, shape, kern.in_axes, kern.out_axes
            )
        out[kern.leaf] = target.from_sums(
            sums, n_examples, in_axes=kern.in_axes, out_axes=kern.out_axes
        )
    for i, name in enumerate(per_example):
        if name == "outer_gradients":
            out[i] = target.from_sums(acc[paths[i]], n_examples)
        elif name == "squared_gradients":
            out[i] = Diagonal.from_sums(acc[paths[i]], n_examples)
    if mesh is not None:
        out = [
            stat if stat is None else _placed(stat, leaf, mesh)
            for stat, leaf in zip(out, flat_params, strict=True)
        ]
    return jax.tree.unflatten(jax.tree.structure(params), out)


def _leaf_sharding(leaf: Any, mesh: Mesh) -> NamedSharding:
    """The leaf's sharding if it is sharded on ``mesh``; else replicated there."""
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
        return sharding
    return NamedSharding(mesh, PartitionSpec())


def _placed(stat: Statistic, leaf: Any, mesh: Mesh) -> Statistic:
    """``stat`` sharded like its kernel (:mod:`mats_jax.sharding`)."""
    placed: Statistic = jax.device_put(stat, stat.sharding(_leaf_sharding(leaf, mesh)))
    return placed


def _accumulator_shardings(
    plan: _Plan, flat_params: list[Any], paths: list[str], mesh: Mesh
) -> dict[str, Any]:
    """Shardings of the accumulator: each sum sharded like its kernel."""
    replicated = NamedSharding(mesh, PartitionSpec())
    out: dict[str, Any] = {}
    for kern in plan.kernels:
        leaf = flat_params[kern.leaf]
        leaf_spec = _leaf_sharding(leaf, mesh).spec
        ndim = np.ndim(leaf)
        spec = tuple(leaf_spec) + (None,) * (ndim - len(leaf_spec))
        blocks, ins, outs = kernel_axes(ndim, kern.in_axes, kern.out_axes)
        entry = out[paths[kern.leaf]] = {}
        for name in plan.init_shapes[paths[kern.leaf]]:
            if name == "rows":
                entry[name] = replicated
            elif name == "squared_gradients":  # (blocks…, I, O)
                ins_rows = factor_spec(mesh, spec, ins, (), blocks, kern.n_in)
                outs_rows = factor_spec(mesh, spec, outs, (), blocks, kern.n_out)
                entry[name] = NamedSharding(
                    mesh, PartitionSpec(*ins_rows[:-1], outs_rows[-2])
                )
            else:  # a factor: rows over the kernel's input or output axes
                rows, other, n = (
                    (ins, outs, kern.n_in)
                    if name == "inputs"
                    else (outs, ins, kern.n_out)
                )
                entry[name] = NamedSharding(
                    mesh, factor_spec(mesh, spec, rows, other, blocks, n)
                )
    for i, name in enumerate(plan.per_example):
        if name == "squared_gradients":
            out[paths[i]] = {name: _leaf_sharding(flat_params[i], mesh)}
        elif name == "outer_gradients":  # a small block: every device holds it
            out[paths[i]] = {name: replicated}
    return out


def _selection(params: Params, leaves: Any) -> list[bool]:
    """Which leaves get the target statistic: all, a boolean pytree, or path patterns."""
    n = len(jax.tree.leaves(params))
    if leaves is None:
        return [True] * n
    is_patterns = isinstance(leaves, str) or (
        isinstance(leaves, Sequence)
        and len(leaves) > 0
        and all(isinstance(p, str) for p in leaves)
    )
    if is_patterns:
        try:
            leaves = select(params, leaves)
        except ValueError as error:
            raise StatisticsInputError(f"leaves: {error}") from None
    try:
        treedef: Any = jax.tree.structure(params)  # its stubs lack flatten_up_to
        flat = treedef.flatten_up_to(leaves)
    except (ValueError, TypeError) as error:
        raise StatisticsInputError(
            "leaves must be leaf-path patterns (e.g. ['*/kernel']) or a boolean "
            f"pytree with the parameters' structure: {error}"
        ) from None
    return [bool(x) for x in flat]
