"""The engine behind every statistics estimator: one jitted pass per micro-batch.

Per micro-batch it evaluates the model with its dense layers tapped
(:mod:`mats_jax.stats.capture`), backpropagates the Fisher kind's cotangents
(:mod:`mats_jax.stats.likelihood`) to every layer's output at once, and adds
the sums the target statistic type asks for
(:attr:`~mats_jax.Statistic.estimator_sums`):

* ``"inputs"``: ``Σ_r w_r x_r x_rᵀ`` per kernel (and layer), with ``"rows"``
  the row count ``Σ_r w_r``;
* ``"output_gradients"``: ``Σ_r Σ_k g_rk g_rkᵀ``;
* ``"squared_gradients"``: per-example squared scores. For a kernel used once
  with one row per example (a dense layer of a plain classifier) they are
  ``Σ_b Σ_k (x_b ⊙ x_b)(g_bk ⊙ g_bk)ᵀ``, since that example's gradient is the
  outer product ``x_b g_bkᵀ``: no per-example gradient is ever formed; every
  other leaf (biases, norms, embeddings, convolutions, kernels applied to
  several rows per example) gets them from ``jax.vmap`` of ``jax.vjp``.

:func:`estimate` hands the sums to the type (:meth:`~mats_jax.Statistic.from_sums`),
which applies the package's one normalisation (per example; A and Gram per
row): see :mod:`mats_jax.stats.kronecker`. A statistic type built from these
sums needs no change here.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mats_jax.stats.accumulate import accumulate
from mats_jax.stats.capture import Layers, Tap, find_layers, tapped
from mats_jax.stats.likelihood import (
    FisherKind,
    StatisticsInputError,
    check_batch,
    check_kind,
    check_logits,
    logit_cotangents,
)
from mats_jax.stats.statistic import (
    Diagonal,
    Statistic,
    factor_spec,
    kernel_axes,
    kernel_from_blocks,
)
from mats_jax.tree import leaf_paths
from mats_jax.typing import Array, Params, StatTree

__all__ = ["estimate"]

Fallback = Literal["diagonal"] | None
Target = type[Statistic]
LogitsFn = Callable[[Params, Any], Array]


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


def per_example_squared_scores(
    logits_fn: LogitsFn,
    params: Params,
    selected: list[bool],
    micro: Mapping[str, Any],
    key: Array,
    kind: FisherKind,
    num_samples: int,
) -> list[Array | None]:
    """Σ over a micro-batch's examples of their squared scores, for the selected leaves."""
    leaves, treedef = jax.tree.flatten(params)
    chosen = [leaf for leaf, s in zip(leaves, selected, strict=True) if s]
    inputs, mask = micro["inputs"], micro["mask"]
    size = mask.shape[0]
    labels = micro.get("labels")
    labels = labels if labels is not None else jnp.zeros(mask.shape, jnp.int32)
    logits_shape = jax.eval_shape(lambda: logits_fn(params, inputs))
    check_logits(logits_shape, size, tuple(labels.shape), kind)

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
        u = logit_cotangents(logits, label[None], m[None], kind, k, num_samples)
        grads = jax.vmap(pullback)(u.astype(logits.dtype))[0]
        return [jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0) for g in grads]

    keys = jax.random.split(key, size)
    squares = jax.vmap(one_example)(inputs, labels, mask, keys)
    sums = iter([sum_over_examples(s) for s in squares])
    return [next(sums) if s else None for s in selected]


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


def _kernels(layers: Layers, leaves: list[Any]) -> tuple[list[_Kernel], set[int]]:
    """Groups taps by leaf; a leaf whose uses disagree on its layout is unrecognised."""
    by_leaf: dict[int, list[int]] = {}
    for i, tap in enumerate(layers.taps):
        by_leaf.setdefault(tap.leaf, []).append(i)
    kernels, rejected = [], set(layers.unrecognised)
    for leaf, tap_ids in by_leaf.items():
        if leaf in rejected:
            continue
        taps = [layers.taps[i] for i in tap_ids]
        first = taps[0]
        layouts = {
            (t.in_axes, t.out_axes, tuple(t.loop_shape[lv] for lv in t.layer_levels))
            for t in taps
        }
        if len(layouts) != 1:
            rejected.add(leaf)
            continue
        shape = np.shape(leaves[leaf])
        kernels.append(
            _Kernel(
                leaf=leaf,
                taps=tuple(tap_ids),
                in_axes=first.in_axes,
                out_axes=first.out_axes,
                layer_shape=tuple(shape[: len(first.layer_levels)]),
                n_in=int(np.prod([shape[a] for a in first.in_axes])),
                n_out=int(np.prod([shape[a] for a in first.out_axes])),
            )
        )
    return kernels, rejected


def _row_weights(tap: Tap, mask: Array) -> Array | None:
    """Weights of the tap's rows (per loop iteration) from the batch mask, or None.

    Rows whose leading axes are the mask's (batch[, positions]) take the mask;
    rows led by the batch axis alone take the per-example mask. Rows not led by
    the batch axis cannot be told apart from padding: None (unrecognised).
    """
    rows = tap.row_shape
    example_mask = mask.reshape(mask.shape[0], -1).max(axis=1)
    for m in (mask, example_mask):
        if rows[: m.ndim] == m.shape:
            w = m.reshape(m.shape + (1,) * (len(rows) - m.ndim))
            return jnp.broadcast_to(w, rows).reshape(-1)
    return None


def _reduce_loops(tap: Tap, x: Array) -> Array:
    """Sums a per-iteration array over the loops that do not slice the leaf."""
    summed = tuple(i for i in range(len(tap.loop_shape)) if i not in tap.layer_levels)
    out = jnp.sum(x, axis=summed) if summed else x
    return out


def _tap_sums(
    tap: Tap, x: Array, gs: Array | None, mask: Array
) -> tuple[Array, Array | None, Array]:
    """(Σ w x xᵀ, Σ g gᵀ, Σ w) for one tap, per layer."""
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


def _first_micro_batch(
    batches: Iterable[Mapping[str, Any]], size: int
) -> tuple[Any, Iterable[Mapping[str, Any]]]:
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise StatisticsInputError(
            "the data iterator yielded no batches: statistics need at least one example"
        ) from None
    batch_size = check_batch(first, 0, needs_labels=False)
    take = np.arange(size) % batch_size
    inputs = jax.tree.map(lambda x: np.asarray(x)[take], first["inputs"])
    return inputs, itertools.chain([first], iterator)


def _one_row_per_example(tap: Tap, size: int) -> bool:
    """A tap whose rows are the examples themselves, applied once per example."""
    return tap.row_shape == (size,) and len(tap.layer_levels) == len(tap.loop_shape)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one configuration of an estimator computes, and its step function."""

    kernels: tuple[_Kernel, ...]
    per_example: tuple[bool, ...]
    init_shapes: dict[str, Any]
    step: Callable[..., Any]


_PLANS: collections.OrderedDict[Any, _Plan] = collections.OrderedDict()


def _signature(tree: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves)


class _Config(NamedTuple):
    """Everything besides shapes that an estimator's plan depends on."""

    target: Target
    kind: FisherKind
    num_samples: int
    fallback: Fallback
    selected: tuple[bool, ...]
    size: int


def _plan(
    fn: Callable[[Params, Any], Any],
    params: Params,
    example_inputs: Any,
    config: _Config,
) -> _Plan:
    """The (cached) plan for this model function, configuration and shapes.

    Reusing the plan reuses its step function, and with it the jitted
    executable: estimating the statistics of many tasks of one model
    compiles once.
    """
    try:
        key = (fn, config, _signature(params), _signature(example_inputs))
        hash(key)
    except TypeError:  # an unhashable model function: no caching
        key = None
    if key is not None and key in _PLANS:
        _PLANS.move_to_end(key)
        return _PLANS[key]
    built = _build_plan(fn, params, example_inputs, config)
    if key is not None:
        _PLANS[key] = built
        if len(_PLANS) > 16:
            _PLANS.popitem(last=False)
    return built


def _build_plan(
    fn: Callable[[Params, Any], Any],
    params: Params,
    example_inputs: Any,
    config: _Config,
) -> _Plan:
    target, kind, num_samples, fallback, selected, size = config
    flat_params = jax.tree.leaves(params)
    paths = jax.tree.leaves(leaf_paths(params))
    layers = find_layers(fn, params, example_inputs)
    kernels, _ = _kernels(layers, flat_params)
    probe_mask = jnp.ones((size,))
    kernels = [
        k
        for k in kernels
        if all(_row_weights(layers.taps[t], probe_mask) is not None for t in k.taps)
    ]
    squares = "squared_gradients" in target.estimator_sums
    if squares:
        # Only kernels used once, one row per example, take the outer-product
        # shortcut; the rest need per-example gradients.
        kernels = [
            k
            for k in kernels
            if selected[k.leaf]
            and len(k.taps) == 1
            and _one_row_per_example(layers.taps[k.taps[0]], size)
        ]
    elif not kernels:
        raise StatisticsInputError(
            f"{target.kind}: no dense layer (a product of an activation with a parameter) "
            f"was found in the model function; leaves: {', '.join(paths[:10])}"
        )
    kernel_leaves = {k.leaf for k in kernels}
    per_example = [
        ((squares and selected[i]) or fallback == "diagonal") and i not in kernel_leaves
        for i in range(len(flat_params))
    ]
    needs_g = "output_gradients" in target.estimator_sums or (squares and bool(kernels))
    run = tapped(fn, layers)

    init: dict[str, Any] = {}  # shapes of the accumulator's arrays
    for k in kernels:
        shapes = {
            "squared_gradients": (*k.layer_shape, k.n_in, k.n_out),
            "inputs": (*k.layer_shape, k.n_in, k.n_in),
            "rows": (),
            "output_gradients": (*k.layer_shape, k.n_out, k.n_out),
        }
        init[paths[k.leaf]] = {name: shapes[name] for name in target.estimator_sums}
    for i, chosen in enumerate(per_example):
        if chosen:
            init[paths[i]] = {"squared_gradients": tuple(np.shape(flat_params[i]))}

    def step(
        acc: dict[str, Any], params: Params, micro: Mapping[str, Any], k: Array
    ) -> dict[str, Any]:
        inputs, mask = micro["inputs"], micro["mask"]
        new = dict(acc)
        if kernels:
            eps = [
                jnp.zeros(s, d)
                for s, d in zip(layers.eps_shapes, layers.eps_dtypes, strict=True)
            ]
            gs = None
            if needs_g:
                labels = micro.get("labels")
                out, pullback, xs = jax.vjp(
                    lambda e: run(params, e, inputs), eps, has_aux=True
                )
                check_logits(
                    out,
                    mask.shape[0],
                    None if labels is None else tuple(labels.shape),
                    kind,
                )
                u = logit_cotangents(out, labels, mask, kind, k, num_samples)
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
        if any(per_example):
            sums = per_example_squared_scores(
                fn,
                params,
                per_example,
                micro,
                jax.random.fold_in(k, 1),
                kind,
                num_samples,
            )
            for i, s in enumerate(sums):
                if s is not None:
                    new[paths[i]] = {
                        "squared_gradients": acc[paths[i]]["squared_gradients"] + s
                    }
        return new

    return _Plan(tuple(kernels), tuple(per_example), init, step)


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
) -> StatTree:
    """Estimates ``target`` statistics of ``fn`` over ``batches``; see the module docstring.

    Args:
      target: the statistic type to estimate, from the sums it names
        (:attr:`~mats_jax.Statistic.estimator_sums`): kernel statistics such as
        :class:`~mats_jax.Gram` and :class:`~mats_jax.KFAC` for every dense
        kernel (``fallback`` for the other leaves), or
        :class:`~mats_jax.Diagonal` for every leaf selected by ``leaves``.
      Everything else: as for :func:`~mats_jax.kfac`.
    """
    if fallback not in ("diagonal", None):
        raise StatisticsInputError(
            f"fallback must be 'diagonal' or None, got {fallback!r}"
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
    selected = _selection(params, leaves)
    size = int(micro_batch_size) if int(micro_batch_size) == micro_batch_size else -1
    if size < 1:
        raise StatisticsInputError(
            f"micro_batch_size must be a positive integer, got {micro_batch_size!r}"
        )
    if mesh is not None:
        devices = mesh.shape[mesh.axis_names[0]]
        size = -(-size // devices) * devices
    example_inputs, batches = _first_micro_batch(batches, size)
    plan = _plan(
        fn,
        params,
        example_inputs,
        _Config(target, kind, num_samples, fallback, tuple(selected), size),
    )
    kernels, per_example = plan.kernels, plan.per_example
    flat_params = jax.tree.leaves(params)
    paths = jax.tree.leaves(leaf_paths(params))
    needs_fisher_labels = needs_fisher and kind == "empirical"
    init = jax.tree.map(
        lambda shape: jnp.zeros(shape, jnp.float32),
        plan.init_shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    acc, n = accumulate(
        plan.step,
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
    for i, chosen in enumerate(per_example):
        if chosen:
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
    for i, chosen in enumerate(plan.per_example):
        if chosen:
            out[paths[i]] = {"squared_gradients": _leaf_sharding(flat_params[i], mesh)}
    return out


def _selection(params: Params, leaves: Any) -> list[bool]:
    n = len(jax.tree.leaves(params))
    if leaves is None:
        return [True] * n
    try:
        treedef: Any = jax.tree.structure(params)  # its stubs lack flatten_up_to
        flat = treedef.flatten_up_to(leaves)
    except (ValueError, TypeError) as error:
        raise StatisticsInputError(
            f"leaves must be a boolean pytree with the parameters' structure: {error}"
        ) from None
    return [bool(x) for x in flat]
