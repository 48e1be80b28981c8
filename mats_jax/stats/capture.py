"""Find a model's dense layers from its jaxpr and expose their inputs and output gradients.

Gram (RegMean) and K-FAC statistics need, for every dense kernel W, the inputs
x of the product ``x W`` and the gradient g of the log-likelihood at its
output. Users should not edit their model or add hooks, so this module reads
them off the model function itself:

1. ``fn(params, *args)`` is traced once to a jaxpr with every parameter leaf
   as an input.
2. Parameter leaves are followed through the operations that do not change
   their values (dtype casts, nested ``jit`` calls, remat, custom-derivative
   wrappers), through transposes (a kernel kept in PyTorch's (out, in)
   orientation and used as ``x @ w.T``: the tap records which of the leaf's
   own axes are its inputs and outputs), and through ``scan`` (a leaf sliced
   by a scan over its leading axis is a stack of per-layer kernels, as
   ``nn.scan`` makes them).
3. Every ``dot_general`` that contracts a parameter leaf with an activation is
   a *tap*. A product with batch dimensions on the parameter (per-head
   projections, ``einsum("bthd,hde->bthe", x, w)``) is a tap too: each batch
   index is its own kernel, so the leaf's batch axes are block axes of its
   statistic (block-diagonal over heads). An interpreter re-evaluates the
   jaxpr, adding a zero perturbation ε to each tap's output and returning
   each tap's activation input. The gradient of any function of the outputs
   with respect to ε is the gradient g at the tap's output, so one jitted
   forward and backward pass yields every layer's (x, g) at once.

A leaf with any other use (a gather for an embedding, a convolution, a
product with another parameter, a ``while`` loop) is *unrecognised*, and
:attr:`Layers.uses` says what the uses were: its statistic falls back to
another kind (the callers decide, and say which leaves got what). Two kinds
of unrecognised leaf are still proven to have a gradient the taps give: a
:class:`Bias` (added to one tap's output) and a :class:`Lookup` (an
embedding table read by one gather of whole rows, outside any scan), whose
output gets a perturbation of its own. A leaf used
by several taps (tied weights, a layer applied twice, a kernel that is a scan
constant) accumulates over its uses. A leaf used both by taps and otherwise
(an embedding table that is also the output head) is unrecognised, and its
taps are still listed.

Examples:
  >>> import jax, jax.numpy as jnp, mats_jax
  >>> params = {"w1": jnp.ones((3, 4)), "w2": jnp.ones((2, 4)), "b": jnp.zeros(2)}
  >>> def fn(p, x):
  ...     return jnp.tanh(x @ p["w1"]) @ p["w2"].T + p["b"]  # w2 is (out, in)
  >>> layers = find_layers(fn, params, jnp.ones((5, 3)))
  >>> names = jax.tree.leaves(mats_jax.tree.leaf_paths(params))  # ['b', 'w1', 'w2']
  >>> [(names[tap.leaf], tap.in_axes, tap.out_axes) for tap in layers.taps]
  [('w1', (0,), (1,)), ('w2', (1,), (0,))]
  >>> [(names[i], layers.uses[i]) for i in layers.unrecognised]  # b is added, not multiplied
  [('b', ('broadcast_in_dim',))]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp

from mats_jax.typing import Array, Params

__all__ = ["Bias", "Layers", "Lookup", "Tap", "find_layers", "tapped"]

# Primitives through which a parameter keeps its identity (its values, or a
# cast of them): the product downstream is still a product with the parameter.
_TRANSPARENT = {"convert_element_type", "copy", "copy_p", "reduce_precision"}
# Call-like primitives whose inner jaxpr we can evaluate inline.
_INLINE = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}


@dataclasses.dataclass(frozen=True)
class Tap:
    """A product of an activation with a parameter leaf, found in the jaxpr.

    Attributes:
      leaf: index of the parameter leaf (in ``jax.tree.leaves(params)`` order).
      in_axes: the leaf's axes contracted with the activation (its inputs), in
        the order the product pairs them with ``x_contract``.
      out_axes: the leaf's remaining axes (its outputs), in the order the
        product lays them out (increasing unless the leaf was transposed).
      batch_axes: the leaf's axes that are batch dimensions of the product
        (one kernel per index, e.g. per attention head), increasing; paired
        with the activation's ``x_batch``.
      layer_levels: which enclosing scans slice the leaf, as indices into
        ``loop_shape``: the leaf's leading axes are per-layer axes, one per
        such scan in order (one statistic per layer). Scans that do not slice
        the leaf apply the same kernel at every step: uses to accumulate.
      loop_shape: lengths of all enclosing scans, outermost first; the tap's
        activations and output gradients carry these as leading axes.
      x_contract: the activation's contracted axes (pairing with ``in_axes``).
      x_batch: the activation's batch axes (pairing with ``batch_axes``).
      x_free: the activation's other axes: its rows (examples, tokens, ...).
      param_first: whether the parameter is the product's left operand.
      x_shape, out_shape: per-iteration shapes of the activation and output.
    """

    leaf: int
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    layer_levels: tuple[int, ...]
    loop_shape: tuple[int, ...]
    x_contract: tuple[int, ...]
    x_free: tuple[int, ...]
    param_first: bool
    x_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    batch_axes: tuple[int, ...] = ()
    x_batch: tuple[int, ...] = ()

    def rows_and_inputs(self, x: Array) -> Array:
        """Activations as ``loop_shape + batch_shape + (rows, I)``, I in the order of ``in_axes``."""
        lead = len(self.loop_shape)
        order = (
            tuple(range(lead))
            + tuple(lead + a for a in self.x_batch)
            + tuple(lead + a for a in self.x_free + self.x_contract)
        )
        n_in = math.prod(self.x_shape[a] for a in self.x_contract)
        return jnp.transpose(x, order).reshape(
            *self.loop_shape, *self.batch_shape, -1, n_in
        )

    def rows_and_outputs(self, g: Array) -> Array:
        """Output gradients as ``loop_shape + batch_shape + (rows, O)``, rows ordered like the inputs'.

        A product's output axes are (batch..., activation rows..., parameter
        outputs...), or (batch..., parameter outputs..., activation rows...)
        when the parameter is the left operand.
        """
        lead = len(self.loop_shape) + len(self.x_batch)
        n_out, n_rows = len(self.out_axes), len(self.x_free)
        if self.param_first:
            perm = (
                *range(lead),
                *(lead + n_out + i for i in range(n_rows)),
                *(lead + i for i in range(n_out)),
            )
            g = jnp.transpose(g, perm)
        size_out = math.prod(g.shape[g.ndim - n_out :])
        return g.reshape(*self.loop_shape, *self.batch_shape, -1, size_out)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.x_shape[a] for a in self.x_free)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.x_shape[a] for a in self.x_batch)


@dataclasses.dataclass(frozen=True)
class Bias:
    """A leaf added, broadcast over leading axes, to one tap's output and used nowhere else.

    Its gradient is then a sum of the tap's output gradient g over the axes
    it is broadcast along: for a dense layer's bias, over the rows (an
    example's tokens, when rows are tokens); for a position embedding added
    to a patch embedding, over nothing but the examples.

    Attributes:
      leaf: index of the parameter leaf.
      tap: index of the tap (in :attr:`Layers.taps`) whose output it is added to.
      levels: which enclosing scans slice the leaf (indices into the tap's
        ``loop_shape``, as :attr:`Tap.layer_levels`): its leading axes.
      ndim: how many trailing axes of the tap's per-iteration output the
        leaf's other axes are (in order).
    """

    leaf: int
    tap: int
    levels: tuple[int, ...]
    ndim: int


@dataclasses.dataclass(frozen=True)
class Lookup:
    """A leaf read by one gather of whole rows at integer indices, and used nowhere else.

    ``table[ids]``, ``jnp.take(table, ids, axis=0)``, flax's ``nn.Embed``: the
    output is ``ids.shape + table.shape[1:]``, and example b's gradient of
    row t is the sum of the output gradient over b's positions whose index
    is t (:func:`mats_jax.stats.estimate` squares it from the one batched
    backward pass). :func:`tapped` adds a perturbation to the gather's output
    and returns the indices.

    Attributes:
      leaf: index of the table leaf.
      candidate: the gather's place among the whole-row gathers the trace
        meets, in evaluation order (the evaluation finds it again by it).
      index_shape: the indices' shape: the lookup's rows (examples, positions…).
      out_shape: the gather's output shape.
      mode: ``"clip"`` (an index out of range reads the nearest row) or
        ``"drop"`` (it reads a fill value and has no gradient).
    """

    leaf: int
    candidate: int
    index_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    mode: str


@dataclasses.dataclass(frozen=True)
class Layers:
    """What :func:`find_layers` found: the taps, and the leaves it could not read.

    Attributes:
      taps: the products with a parameter, in evaluation order.
      unrecognised: indices of the leaves with a use other than a tap.
      uses: for each unrecognised leaf, its other uses, described (the
        primitive's name, e.g. ``"gather"`` for an embedding lookup, or why a
        product could not be read: ``"dot_general: ..."``).
      num_leaves, eps_shapes, eps_dtypes: the leaves, and the perturbations
        :func:`tapped` expects: one per tap, then one per lookup.
      biases: the unrecognised leaves proven to be a :class:`Bias` of a tap
        (their only use: added to its output, which has no other use).
      lookups: the unrecognised leaves proven to be a :class:`Lookup`.
    """

    taps: tuple[Tap, ...]
    unrecognised: tuple[int, ...]
    num_leaves: int
    eps_shapes: tuple[tuple[int, ...], ...]
    eps_dtypes: tuple[Any, ...]
    uses: Mapping[int, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    biases: tuple[Bias, ...] = ()
    lookups: tuple[Lookup, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Tag:
    """A value that is parameter leaf ``leaf``, sliced by the scans at ``levels``.

    ``axes[i]`` is the leaf's axis that the value's axis i is (the leaf's
    first ``len(levels)`` axes are the sliced ones; a transpose permutes the
    rest).
    """

    leaf: int
    levels: tuple[int, ...]
    axes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _View:
    """A value that is leaf ``leaf`` (sliced by ``levels``, its axes in order)
    broadcast along new leading axes: its last ``ndim`` axes are the leaf's
    other axes. The shape a bias has when it is added to a product."""

    leaf: int
    levels: tuple[int, ...]
    ndim: int


@dataclasses.dataclass(frozen=True)
class _TapOutput:
    """A value that is tap ``tap``'s output (its perturbation added), as this
    interpreter numbers its taps."""

    tap: int


# How a bias reaches the product it is added to: as ``reshape(b, (1, …, 1, O))``
# (flax's Dense) or ``broadcast_in_dim`` (jnp's broadcasting).
_VIEWS = {"reshape", "broadcast_in_dim"}


def _as_view(tag: Any, x: Any) -> _View | None:
    """A leaf (with its axes in order) or a view of it, as a view; else None."""
    if isinstance(tag, _View):
        return tag
    if isinstance(tag, _Tag) and tag.axes == tuple(
        range(len(tag.levels), len(tag.levels) + x.ndim)
    ):
        return _View(tag.leaf, tag.levels, x.ndim)
    return None


def _view_of(eqn: Any, x: Any, of: _Tag | _View) -> _View | None:
    """The output of a ``reshape``/``broadcast_in_dim`` of a leaf (or view) as a view, or None."""
    tag = _as_view(of, x)
    if tag is None:
        return None
    inner = tuple(x.shape[x.ndim - tag.ndim :])
    out = tuple(eqn.outvars[0].aval.shape)
    if tag.ndim > len(out) or out[len(out) - tag.ndim :] != inner:
        return None
    if eqn.primitive.name == "reshape":
        lead_in, lead_out = x.shape[: x.ndim - tag.ndim], out[: len(out) - tag.ndim]
        ok = all(n == 1 for n in (*lead_in, *lead_out))
    else:
        dims = tuple(eqn.params["broadcast_dimensions"])
        ok = dims[len(dims) - tag.ndim :] == tuple(range(len(out) - tag.ndim, len(out)))
    return tag if ok else None


def _use_counts(jaxpr: Any) -> dict[Any, int]:
    """How often each variable of ``jaxpr`` is read (as an operand or an output)."""
    counts: dict[Any, int] = {}
    for v in [*(v for e in jaxpr.eqns for v in e.invars), *jaxpr.outvars]:
        if not isinstance(v, jex.core.Literal):
            counts[v] = counts.get(v, 0) + 1
    return counts


class _Interpreter:
    """Evaluates a jaxpr, tapping parameter products (see the module docstring).

    In discovery mode (``eps is None``) perturbations are zeros made on the
    spot and the taps are recorded; in evaluation mode ``eps`` supplies them, in
    the order taps were discovered.
    """

    def __init__(
        self,
        eps: Sequence[Array] | None,
        scan_tap_counts: dict[int, int],
        loop_shape: tuple[int, ...] = (),
        lookup_eps: Mapping[int, Array] | None = None,
    ):
        self.eps = eps
        # Taps inside each scan, by id of its equation, shared by every
        # interpreter of one jaxpr: discovery fills it, evaluation reads it.
        self.scan_tap_counts = scan_tap_counts
        self.loop_shape = loop_shape
        self.taps: list[Tap] = []
        self.xs: list[Array] = []
        self.unrecognised: dict[int, set[str]] = {}
        self.biases: list[Bias] = []  # candidates, indexed by self.taps
        self.cursor = 0  # next tap index, relative to this interpreter's eps
        # Whole-row gathers met (candidates, in order), the perturbations of
        # the proven ones by candidate number, and the indices they read.
        self.lookups: list[Lookup] = []
        self.lookup_eps = lookup_eps or {}
        self.lookup_ids: list[Array] = []
        self.gathers: dict[int, int] = {}  # gathers of each leaf, lookups or not

    def reject(self, tag: _Tag, use: str) -> None:
        self.unrecognised.setdefault(tag.leaf, set()).add(use)

    def run(
        self,
        jaxpr: Any,
        consts: Sequence[Any],
        args: Sequence[Any],
        tags: Sequence[_Tag | None],
    ) -> tuple[list[Any], list[_Tag | None]]:
        env: dict[Any, Any] = {}
        tag_env: dict[Any, _Tag | None] = {}

        def read(v: Any) -> Any:
            return v.val if isinstance(v, jex.core.Literal) else env[v]

        def read_tag(v: Any) -> _Tag | None:
            return None if isinstance(v, jex.core.Literal) else tag_env.get(v)

        for v, val in zip(jaxpr.constvars, consts, strict=True):
            env[v] = val
        for v, val, tag in zip(jaxpr.invars, args, tags, strict=True):
            env[v] = val
            tag_env[v] = tag
        counts = _use_counts(jaxpr)
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            intags = [read_tag(v) for v in eqn.invars]
            outvals, outtags = self._eqn(eqn, invals, intags, counts)
            for v, val, tag in zip(eqn.outvars, outvals, outtags, strict=True):
                if not isinstance(v, jex.core.DropVar):
                    env[v] = val
                    tag_env[v] = tag
        outtags = [read_tag(v) for v in jaxpr.outvars]
        # A tap's output leaves an inlined call as one only if nothing inside
        # read it: a bias added outside must be all that reads it.
        outtags = [
            None if isinstance(t, _TapOutput) and counts[v] > 1 else t
            for v, t in zip(jaxpr.outvars, outtags, strict=True)
        ]
        return [read(v) for v in jaxpr.outvars], outtags

    def _eqn(
        self,
        eqn: Any,
        invals: list[Any],
        intags: list[Any],
        counts: Mapping[Any, int],
    ) -> tuple[list[Any], list[Any]]:
        name = eqn.primitive.name
        if name == "add":
            tap = self._bias(eqn, invals, intags, counts)
            if tap is not None:
                # Still the tap's output plus leaves, read through this sum
                # alone: a second bias may follow (a position embedding).
                return self._bind(eqn, invals), [tap]
        # Only a bias's add reads a tap's output as one: elsewhere (and
        # inside calls) it is an activation like any other.
        intags = [None if isinstance(t, _TapOutput) else t for t in intags]
        tagged = [t for t in intags if t is not None]
        if not tagged:
            return self._bind(eqn, invals), [None] * len(eqn.outvars)
        if name in _TRANSPARENT and len(invals) == 1:
            return self._bind(eqn, invals), [intags[0]]
        if name in _VIEWS and intags[0] is not None:
            # Not a product: the leaf's use is listed as before; the view it
            # makes may still prove it a bias.
            self.reject(intags[0], name)
            return self._bind(eqn, invals), [_view_of(eqn, invals[0], intags[0])]
        if name in _INLINE and _INLINE[name] in eqn.params:
            inner = eqn.params[_INLINE[name]]
            closed = (
                inner if hasattr(inner, "jaxpr") else jex.core.ClosedJaxpr(inner, ())
            )
            n_args = len(closed.jaxpr.invars)
            return self.run(
                closed.jaxpr, closed.consts, invals[-n_args:], intags[-n_args:]
            )
        if any(isinstance(t, _View) for t in tagged):
            use = name  # a view read otherwise than added to a tap's output
        elif name == "transpose" and intags[0] is not None:
            tag = intags[0]
            axes = tuple(tag.axes[a] for a in eqn.params["permutation"])
            return self._bind(eqn, invals), [_Tag(tag.leaf, tag.levels, axes)]
        elif name == "dot_general":
            tapped_out, why = self._dot(eqn, invals, intags)
            if tapped_out is not None:
                return [tapped_out], [_TapOutput(self.cursor - 1)]
            use = f"dot_general: {why}"
        elif name == "scan":
            return self._scan(eqn, invals, intags)
        elif name == "gather" and intags[0] is not None:
            self.gathers[intags[0].leaf] = self.gathers.get(intags[0].leaf, 0) + 1
            looked_up = self._lookup(eqn, invals, intags)
            use = name
            if looked_up is not None:
                for t in tagged:
                    self.reject(t, use)
                return [looked_up], [None]
        else:
            use = name
        for t in tagged:
            self.reject(t, use)
        return self._bind(eqn, invals), [None] * len(eqn.outvars)

    def _bias(
        self,
        eqn: Any,
        invals: list[Any],
        intags: list[Any],
        counts: Mapping[Any, int],
    ) -> _TapOutput | None:
        """The tap whose output ``add`` adds a leaf to, broadcast, if nothing else reads it; recorded.

        Then the leaf's gradient is a sum of the tap's output gradient (the
        add's, since the tap's output reaches the loss only through it).
        Only the tap's parameter-output (trailing) axes may hold the leaf,
        and at least the leading row axis (the examples) must be broadcast.
        Candidates only: :func:`find_layers` keeps a leaf with no other use.
        """
        if self.eps is not None or len(invals) != 2:
            return None  # recorded in discovery; evaluation needs no tags
        for i in (0, 1):
            out, other = intags[i], intags[1 - i]
            view = _as_view(other, invals[1 - i])
            if not isinstance(out, _TapOutput) or view is None:
                continue
            tap, y = self.taps[out.tap], invals[i]
            if (
                not tap.param_first
                and not tap.x_batch
                and counts[eqn.invars[i]] == 1
                and invals[1 - i].ndim == y.ndim
                and tuple(eqn.outvars[0].aval.shape) == tuple(y.shape)
                and view.ndim < y.ndim
            ):
                self.biases.append(Bias(view.leaf, out.tap, view.levels, view.ndim))
                return out
        return None

    @staticmethod
    def _bind(eqn: Any, invals: list[Any]) -> list[Any]:
        bind_params = eqn.primitive.get_bind_params(eqn.params)
        subfuns: list[Any] = []
        if isinstance(bind_params, tuple):  # jax < 0.7 returns (subfuns, params)
            subfuns, bind_params = bind_params
        with eqn.ctx.manager:
            out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
        return list(out) if eqn.primitive.multiple_results else [out]

    def _dot(
        self, eqn: Any, invals: list[Any], intags: list[_Tag | None]
    ) -> tuple[Any | None, str]:
        """The tapped product, or (None, why it is not a dense layer)."""
        (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
        if intags[0] is not None and intags[1] is not None:
            return None, "a product of two parameters"
        param_first = intags[0] is not None
        tag = intags[0] if param_first else intags[1]
        assert tag is not None
        p_contract, x_contract = (lhs_c, rhs_c) if param_first else (rhs_c, lhs_c)
        p_batch, x_batch = (lhs_b, rhs_b) if param_first else (rhs_b, lhs_b)
        param, x = (invals[0], invals[1]) if param_first else (invals[1], invals[0])
        p_free = tuple(a for a in range(param.ndim) if a not in (*p_contract, *p_batch))
        x_free = tuple(a for a in range(x.ndim) if a not in (*x_contract, *x_batch))
        if not p_free:
            return None, "contracts every axis of the parameter (no output axis)"
        batch_axes = tuple(tag.axes[a] for a in p_batch)
        if list(batch_axes) != sorted(batch_axes):
            # The statistic's block axes are the leaf's in increasing order.
            return None, f"batch axes {batch_axes} of the leaf out of order"
        out = self._bind(eqn, invals)[0]
        index = self.cursor
        self.cursor += 1
        if self.eps is None:
            eps = jnp.zeros(out.shape, out.dtype)
            self.taps.append(
                Tap(
                    leaf=tag.leaf,
                    in_axes=tuple(tag.axes[a] for a in p_contract),
                    out_axes=tuple(tag.axes[a] for a in p_free),
                    layer_levels=tag.levels,
                    loop_shape=self.loop_shape,
                    x_contract=tuple(x_contract),
                    x_free=x_free,
                    param_first=param_first,
                    x_shape=tuple(x.shape),
                    out_shape=tuple(out.shape),
                    batch_axes=batch_axes,
                    x_batch=tuple(x_batch),
                )
            )
        else:
            eps = self.eps[index]
        self.xs.append(x)
        return out + eps.astype(out.dtype), ""

    def _lookup(
        self, eqn: Any, invals: list[Any], intags: list[_Tag | None]
    ) -> Any | None:
        """The gather's output (its perturbation added) if it reads whole rows of a leaf; else None.

        Whole rows: the leaf untransposed and not sliced by a scan, indexed
        along its first axis by integer indices that are not a parameter,
        ``indices[..., 0]`` the row of each output row, the leaf's other axes
        the output's trailing ones, outside any scan.
        """
        tag = intags[0]
        table, indices = invals
        dims = eqn.params["dimension_numbers"]
        mode = {
            "CLIP": "clip",
            "FILL_OR_DROP": "drop",
            "PROMISE_IN_BOUNDS": "clip",
        }.get(getattr(eqn.params["mode"], "name", ""), "")
        out_shape = tuple(eqn.outvars[0].aval.shape)
        rank = indices.ndim - 1
        if (
            not isinstance(tag, _Tag)
            or intags[1] is not None
            or self.loop_shape
            or tag.levels
            or tag.axes != tuple(range(table.ndim))
            or table.ndim < 1
            or not mode
            or indices.ndim < 1
            or indices.shape[-1] != 1
            or tuple(dims.collapsed_slice_dims) != (0,)
            or tuple(dims.start_index_map) != (0,)
            or tuple(getattr(dims, "operand_batching_dims", ())) != ()
            or tuple(dims.offset_dims) != tuple(range(rank, rank + table.ndim - 1))
            or tuple(eqn.params["slice_sizes"]) != (1, *table.shape[1:])
        ):
            return None
        out = self._bind(eqn, invals)[0]
        candidate = len(self.lookups)
        self.lookups.append(
            Lookup(tag.leaf, candidate, tuple(indices.shape[:-1]), out_shape, mode)
        )
        if candidate in self.lookup_eps:
            self.lookup_ids.append(indices[..., 0])
            return out + self.lookup_eps[candidate].astype(out.dtype)
        return out

    def _scan(
        self, eqn: Any, invals: list[Any], intags: list[_Tag | None]
    ) -> tuple[list[Any], list[_Tag | None]]:
        p = eqn.params
        n_consts, n_carry, body_jaxpr, body_consts = _scan_signature(p)
        length = p["length"]
        consts, carry, xs = (
            invals[:n_consts],
            invals[n_consts : n_consts + n_carry],
            invals[n_consts + n_carry :],
        )
        const_tags = intags[:n_consts]
        carry_tags = intags[n_consts : n_consts + n_carry]
        xs_tags = intags[n_consts + n_carry :]
        for t in carry_tags:
            if t is not None:
                self.reject(t, "scan (as a carry)")
        depth = len(self.loop_shape)
        x_inner_tags: list[_Tag | None] = []
        for t in xs_tags:
            if t is not None and t.axes[0] != len(t.levels):
                # Sliced along an axis that is not its next leading one (a
                # transposed stack): not a stack of per-layer kernels.
                self.reject(t, "scan (sliced along a non-leading axis)")
                t = None
            x_inner_tags.append(
                None if t is None else _Tag(t.leaf, (*t.levels, depth), t.axes[1:])
            )
        start = self.cursor
        discovering = self.eps is None
        count = self.scan_tap_counts.get(id(eqn), 0)
        outer_eps = (
            []
            if discovering or self.eps is None
            else list(self.eps[start : start + count])
        )
        inner_loop = (*self.loop_shape, length)
        recorder: dict[str, Any] = {}

        def step(carry_in: Any, sliced: Any) -> Any:
            x_slice, eps_slice = sliced
            inner = _Interpreter(
                None if discovering else eps_slice, self.scan_tap_counts, inner_loop
            )
            outs, _ = inner.run(
                body_jaxpr,
                body_consts,
                [*consts, *carry_in, *x_slice],
                [*const_tags, *([None] * n_carry), *x_inner_tags],
            )
            recorder["inner"] = inner
            new_carry, ys = outs[:n_carry], outs[n_carry:]
            return new_carry, (ys, inner.xs)

        final_carry, (ys, inner_xs) = jax.lax.scan(
            step,
            list(carry),
            (list(xs), outer_eps),
            length=length,
            reverse=p["reverse"],
            unroll=p["unroll"],
        )
        inner: _Interpreter = recorder["inner"]
        for leaf, uses in inner.unrecognised.items():
            self.unrecognised.setdefault(leaf, set()).update(uses)
        for leaf, n in inner.gathers.items():
            self.gathers[leaf] = self.gathers.get(leaf, 0) + n
        if discovering:
            self.scan_tap_counts[id(eqn)] = len(inner.taps)
            offset = len(self.taps)
            self.taps.extend(inner.taps)
            self.biases.extend(
                dataclasses.replace(b, tap=b.tap + offset) for b in inner.biases
            )
        self.cursor = start + (len(inner.taps) if discovering else count)
        self.xs.extend(inner_xs)
        return [*final_carry, *ys], [None] * (n_carry + len(ys))


def _scan_signature(params: dict[str, Any]) -> tuple[int, int, Any, list[Any]]:
    """(number of consts, number of carries, body jaxpr, body consts) of a scan.

    jax ≤ 0.10 names the counts and closes the body over its constants; jax
    0.11 describes the operands as flat trees (``ft_in``: consts, carry, xs)
    and passes an open body whose constants are operands.
    """
    if "num_consts" in params:
        body = params["jaxpr"]
        return params["num_consts"], params["num_carry"], body.jaxpr, body.consts
    consts, carry, _ = params["ft_in"].elts
    return len(consts), len(carry), params["jaxpr"], []


def _root_tags(leaves: Sequence[Any], num_args: int) -> list[_Tag | None]:
    tags = [_Tag(i, (), tuple(range(jnp.ndim(leaf)))) for i, leaf in enumerate(leaves)]
    return [*tags, *([None] * num_args)]


def _trace(
    fn: Callable[..., Any], params: Params, args: tuple[Any, ...]
) -> tuple[Any, Any, list[Any], list[Any]]:
    """``fn`` as a closed jaxpr over (parameter leaves, argument leaves)."""
    leaves, treedef = jax.tree.flatten(params)
    flat_args, args_def = jax.tree.flatten(args)

    def flat_fn(leaves: list[Any], flat_args: list[Any]) -> Any:
        return fn(
            jax.tree.unflatten(treedef, leaves),
            *jax.tree.unflatten(args_def, flat_args),
        )

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(leaves, flat_args)
    return closed, jax.tree.structure(out_shape), leaves, flat_args


def _discover(closed: Any, leaves: list[Any], flat_args: list[Any]) -> _Interpreter:
    finder = _Interpreter(None, {})

    def run(lv: list[Any], fa: list[Any]) -> Any:
        return finder.run(
            closed.jaxpr, closed.consts, [*lv, *fa], _root_tags(lv, len(fa))
        )[0]

    jax.eval_shape(run, leaves, flat_args)
    return finder


def find_layers(fn: Callable[..., Any], params: Params, *args: Any) -> Layers:
    """Traces ``fn(params, *args)`` and lists its parameter products (taps).

    Args:
      fn: the model function; ``params`` is its first argument.
      params: a parameter pytree (concrete or abstract: only shapes are used).
      *args: example arguments (only shapes and dtypes are used).

    Returns:
      A :class:`Layers`: the taps in evaluation order, the indices of
      unrecognised leaves, and the shapes of the perturbations
      :func:`tapped` expects.
    """
    closed, _, leaves, flat_args = _trace(fn, params, args)
    finder = _discover(closed, leaves, flat_args)
    lookups = _proven_lookups(finder)
    return Layers(
        taps=tuple(finder.taps),
        unrecognised=tuple(sorted(finder.unrecognised)),
        num_leaves=len(leaves),
        eps_shapes=(
            *(t.loop_shape + t.out_shape for t in finder.taps),
            *(lk.out_shape for lk in lookups),
        ),
        eps_dtypes=(
            *(jnp.result_type(leaves[t.leaf]) for t in finder.taps),
            *(jnp.result_type(leaves[lk.leaf]) for lk in lookups),
        ),
        uses={leaf: tuple(sorted(u)) for leaf, u in finder.unrecognised.items()},
        biases=_proven_biases(finder),
        lookups=lookups,
    )


def _proven_biases(finder: _Interpreter) -> tuple[Bias, ...]:
    """The candidate biases with no use besides their one add (and its views)."""
    adds: dict[int, int] = {}
    for b in finder.biases:
        adds[b.leaf] = adds.get(b.leaf, 0) + 1
    products = {t.leaf for t in finder.taps}
    return tuple(
        b
        for b in finder.biases
        if adds[b.leaf] == 1
        and b.leaf not in products
        and finder.unrecognised.get(b.leaf, set()) <= _VIEWS
    )


def _proven_lookups(finder: _Interpreter) -> tuple[Lookup, ...]:
    """The lookups of leaves with no other use: one gather, no product, nothing else."""
    products = {t.leaf for t in finder.taps}
    return tuple(
        lk
        for lk in finder.lookups
        if finder.gathers.get(lk.leaf) == 1
        and lk.leaf not in products
        and finder.unrecognised.get(lk.leaf, set()) == {"gather"}
    )


def tapped(
    fn: Callable[..., Any], layers: Layers
) -> Callable[..., tuple[Any, list[Array]]]:
    """``fn`` rewritten to take perturbations and return the taps' inputs.

    Returns:
      ``g(params, eps, *args) -> (fn(params, *args) with eps added at each
      tap's and lookup's output, [x for each tap, then the indices of each
      lookup])``, where ``eps`` is a list of arrays of ``layers.eps_shapes``
      (zeros to evaluate ``fn`` unchanged). Each x has shape
      ``tap.loop_shape + tap.x_shape``; the indices, ``lookup.index_shape``.
      Differentiating the first output with respect to ``eps`` gives each
      tap's and lookup's output gradient.
    """
    n_taps = len(layers.taps)

    def run(
        params: Params, eps: Sequence[Array], *args: Any
    ) -> tuple[Any, list[Array]]:
        closed, out_tree, leaves, flat_args = _trace(fn, params, args)
        # Discovery on this very jaxpr gives the per-scan tap counts that the
        # evaluation needs; it is trace-time work only.
        finder = _discover(closed, leaves, flat_args)
        if len(finder.taps) != len(layers.taps):
            raise ValueError(
                f"the model function has {len(finder.taps)} dense layers for these "
                f"arguments, but {len(layers.taps)} were found when it was first traced"
            )
        lookup_eps = {
            lk.candidate: e for lk, e in zip(layers.lookups, eps[n_taps:], strict=True)
        }
        interp = _Interpreter(
            list(eps[:n_taps]), finder.scan_tap_counts, (), lookup_eps
        )
        outs, _ = interp.run(
            closed.jaxpr,
            closed.consts,
            [*leaves, *flat_args],
            _root_tags(leaves, len(flat_args)),
        )
        if len(interp.lookup_ids) != len(layers.lookups):
            raise ValueError(
                f"the model function reads {len(interp.lookup_ids)} of the "
                f"{len(layers.lookups)} embedding lookups found when it was first traced"
            )
        return jax.tree.unflatten(out_tree, outs), [*interp.xs, *interp.lookup_ids]

    return run
