"""Statistic types: the per-task matrices C_m of ``(Σ_m C_m) θ = Σ_m C_m θ_m``.

A statistic describes, for one parameter leaf of one task, the positive
semi-definite matrix C_m that says which directions of that leaf the task cares
about. Each type is a pytree node holding float32 arrays, mirrors the leaf it
belongs to, and knows the few things the solver needs of it: its product with a
vector (``matvec``), its mean diagonal (for relative damping), and, for a sum of
statistics of its type, an exact pseudo-inverse where one exists in closed form
(``sum_pinv``) and a preconditioner (``sum_preconditioner``).

================  ===============================  ============================
type              C_m                              Σ_m C_m has a closed form?
================  ===============================  ============================
``Diagonal(f)``   diag(f), f the shape of the leaf  yes, elementwise
``Gram(a)``       A ⊗ I_out (RegMean)               yes, an (in, in) solve
``KFAC(a, g)``    A ⊗ G (K-FAC Fisher)              no: conjugate gradient
``Dense(f)``      F, (n, n) with n the leaf size    yes, an (n, n) solve
================  ===============================  ============================

Layout. A dense kernel ``W`` as Flax stores it maps inputs to outputs by
``y = x W``; its axes are inputs, outputs, or block axes (independent blocks,
such as the layer axis of ``nn.scan``-stacked layers). ``Gram`` and ``KFAC``
name the input axes (``in_axes``) and the output axes (``out_axes``); every
other axis is a block axis. With block shape ``s``, ``I`` the product of the
input sizes and ``O`` of the output sizes, ``a`` has shape ``s + (I, I)`` and
``g`` has shape ``s + (O, O)``; the input (and output) axes are flattened in
row-major order. For a kernel ``W`` of shape (in, out) (one block):

.. math::

   (A \\otimes G)\\,\\mathrm{vec}(W) \\equiv A W G, \\qquad
   (A \\otimes I)\\,\\mathrm{vec}(W) \\equiv A W .

Inside the solver every statistic is put in *blocked* form: the leaf becomes
an array ``(B, ...)`` of B independent blocks and the statistic's arrays gain
the same leading axis B.

Examples:
  >>> import jax.numpy as jnp
  >>> w = jnp.ones((3, 2))                      # a Dense kernel, (in, out)
  >>> stat = KFAC(a=jnp.eye(3), g=2 * jnp.eye(2))
  >>> stat.fit_error(w.shape) is None
  True
  >>> blocked = stat.blocked(w.shape)
  >>> blocked.matvec(blocked.to_blocks(w)).shape
  (1, 3, 2)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from mats_jax.tree import total as sum_of
from mats_jax.typing import Array

__all__ = [
    "KFAC",
    "NONNEGATIVE",
    "NONNEGATIVE_DIAGONAL",
    "BlockInverse",
    "Dense",
    "Diagonal",
    "EighSequence",
    "Gram",
    "Statistic",
    "factor_spec",
    "is_statistic_leaf",
    "register_statistic",
]

NONNEGATIVE = "non-negative entries"
"""A sign rule: every entry of the array is >= 0 (a diagonal statistic)."""
NONNEGATIVE_DIAGONAL = "a non-negative diagonal"
"""A sign rule: the trailing matrices' diagonals are >= 0 (necessary for PSD)."""


def is_statistic_leaf(x: object) -> bool:
    """Whether ``x`` is a leaf of a statistics pytree: a statistic or None
    (the ``is_leaf`` of ``jax.tree`` functions that map over statistics).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> stats = {"k": Gram(jnp.eye(2)), "b": None}
      >>> jax.tree.leaves(stats, is_leaf=is_statistic_leaf)
      [None, Gram(a=Array([[1., 0.],
             [0., 1.]], dtype=float32), in_axes=(-2,), out_axes=(-1,))]
    """
    return x is None or isinstance(x, Statistic)


def shrink_off_diagonal(matrix: Array, alpha: Any) -> Array:
    """``α M + (1 − α) diag(M)`` over the last two axes.

    Examples:
      >>> import jax.numpy as jnp
      >>> shrink_off_diagonal(jnp.array([[2.0, 1.0], [1.0, 2.0]]), 0.25)
      Array([[2.  , 0.25],
             [0.25, 2.  ]], dtype=float32)
    """
    eye = jnp.eye(matrix.shape[-1], dtype=bool)
    return jnp.where(eye, matrix, alpha * matrix).astype(matrix.dtype)


def _block_dot_shape(x: Array) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def _pinv_cutoff(values: Array, n: int) -> Array:
    """Eigenvalues at or below this are treated as zero (numpy's matrix_rank rule)."""
    eps = jnp.finfo(values.dtype).eps
    return jnp.max(values, axis=-1, keepdims=True) * n * eps


def _safe_reciprocal(values: Array, cutoff: Array) -> Array:
    # The pseudo-inverse: directions with no curvature are left alone, so the
    # solver keeps the initialisation there, exactly as CG does.
    keep = values > cutoff
    return jnp.where(keep, 1.0 / jnp.where(keep, values, 1.0), 0.0)


Eigh = Callable[[Array], tuple[Array, Array]]


class EighSequence:
    """Eigendecompositions that run one after another inside one traced program.

    jaxlib 0.10's CPU ``eigh`` splits a batch over XLA's intra-op thread pool
    and blocks until the pieces are done; when as many run at once as the pool
    has threads (one per core), every thread waits and the process hangs
    (seen on 2 cores with ``mats(..., preconditioner=True)``: see
    ``benchmarks/results/solver_kfac.md``). Tying each call's input to the
    previous call's output with an optimisation barrier orders the calls, and
    each call decomposes one matrix at a time (``lax.map``), since the batched
    kernel is what splits over the pool; the solver also holds every CG
    loop back until the last one is done (:meth:`after_all`), since a loop waiting on the pool blocks a thread
    too. One instance per traced solve.
    """

    def __init__(self) -> None:
        self._last: Array | None = None

    def __call__(self, matrix: Array) -> tuple[Array, Array]:
        (matrix,) = self.after_all(matrix)
        # One matrix per call: a batched eigh is what splits over the pool.
        batch = matrix.reshape(-1, *matrix.shape[-2:])
        values, vectors = jax.lax.map(jnp.linalg.eigh, batch)
        values = values.reshape(*matrix.shape[:-1])
        vectors = vectors.reshape(matrix.shape)
        self._last = values
        return values, vectors

    def after_all(self, *arrays: Array) -> tuple[Array, ...]:
        """``arrays``, made available only once every eigh so far is done."""
        if self._last is None:
            return arrays
        *out, _ = jax.lax.optimization_barrier((*arrays, self._last))
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class BlockInverse:
    """An exact or approximate ``(Σ_m C_m + δI)⁺`` for a batch of blocks, as data.

    ``arrays`` all have the leading block axis B and ``rule(*arrays, x)``
    applies the inverse to a blocked ``x``. Being a pytree, it can be sliced
    or vmapped over the blocks (the ``jax_scipy`` CG of the solver vmaps it).

    Examples:
      >>> import jax.numpy as jnp
      >>> from mats_jax import Diagonal
      >>> inverse = Diagonal.sum_pinv([Diagonal(jnp.array([[2.0, 4.0]]))], jnp.zeros(1))
      >>> inverse(jnp.array([[1.0, 1.0]]))
      Array([[0.5 , 0.25]], dtype=float32)
    """

    arrays: tuple[Array, ...]
    rule: Callable[..., Array]

    def __call__(self, x: Array) -> Array:
        return self.rule(*self.arrays, x)


jax.tree_util.register_dataclass(
    BlockInverse, data_fields=["arrays"], meta_fields=["rule"]
)


def _scale_rule(inv: Array, x: Array) -> Array:
    return inv * x


def _dense_rule(u: Array, inv: Array, x: Array) -> Array:
    return jnp.einsum("bij,bj->bi", u, inv * jnp.einsum("bji,bj->bi", u, x))


def _gram_rule(u: Array, inv: Array, x: Array) -> Array:
    return u @ (inv[:, :, None] * (jnp.swapaxes(u, -1, -2) @ x))


def _kronecker_rule(u_x: Array, u_y: Array, inv: Array, v: Array) -> Array:
    rotated = jnp.swapaxes(u_x, -1, -2) @ v @ u_y
    return u_x @ (inv * rotated) @ jnp.swapaxes(u_y, -1, -2)


def _sym_pinv(
    matrix: Array, damping: Array, eigh: Eigh, rule: Callable[..., Array]
) -> BlockInverse:
    """Eigendecomposes a batch of symmetric matrices once: ``(M + δI)⁺`` spectrally."""
    values, vectors = eigh(matrix)
    n = matrix.shape[-1]
    damped = values + damping[:, None]
    inv = _safe_reciprocal(damped, _pinv_cutoff(damped, n))
    return BlockInverse((vectors, inv), rule)


@dataclasses.dataclass(frozen=True)
class Statistic:
    """A task's positive semi-definite C for one parameter leaf: the statistic types' base class.

    A statistic is a frozen dataclass registered as a pytree (its arrays are
    leaves), so statistics pass through ``jax.jit``, ``jax.tree.map`` and
    orbax like parameters. The solver reaches ``C`` only through these methods.

    Examples:
      >>> import jax.numpy as jnp
      >>> from mats_jax import KFAC, Statistic
      >>> stat = KFAC(jnp.eye(2), 3 * jnp.eye(2))   # C = A ⊗ G for a (2, 2) kernel
      >>> isinstance(stat, Statistic), stat.has_closed_form
      (True, False)
      >>> blocked = stat.blocked((2, 2))            # one block: the whole kernel
      >>> blocked.matvec(blocked.to_blocks(jnp.ones((2, 2))))   # A V G
      Array([[[3., 3.],
              [3., 3.]]], dtype=float32)
    """

    kind: ClassVar[str] = "statistic"
    has_closed_form: ClassVar[bool] = True
    array_fields: ClassVar[tuple[str, ...]] = ()
    """Its arrays: the pytree's data, saved under these names."""
    layout_fields: ClassVar[tuple[str, ...]] = ()
    """Its static layout (kernel axes): pytree metadata, saved in the layout record."""
    matrix_fields: ClassVar[tuple[str, ...]] = ()
    """Its array fields that are square matrices over their last two axes
    (:meth:`off_diagonal_scaled` shrinks them)."""
    sign_rules: ClassVar[dict[str, str]] = {}
    """Per array field, what it must satisfy besides being finite."""
    estimator_sums: ClassVar[tuple[str, ...]] = ()
    """The sums over examples the estimators accumulate for it
    (:mod:`mats_jax.stats.estimate`): ``"squared_gradients"`` (per-example
    squared scores, leaf-shaped), ``"outer_gradients"`` (Σ_b g_b g_bᵀ of the
    per-example scores of the flattened leaf), ``"inputs"`` (Σ_r x_r x_rᵀ of a kernel's
    input rows), ``"rows"`` (the number of rows) and ``"output_gradients"``
    (Σ g gᵀ of the gradients at a kernel's outputs). Empty: no estimator."""
    closed_under_addition: ClassVar[bool] = False
    """Whether the sum of two statistics of the type (same layout) is the
    statistic of their arrays summed (:meth:`summed`)."""

    _types: ClassVar[dict[str, type[Statistic]]] = {}

    @staticmethod
    def by_kind(kind: str) -> type[Statistic]:
        """The registered statistic type named ``kind`` (e.g. ``"KFAC"``).

        Raises:
          ValueError: for a kind no type registered.

        Examples:
          >>> from mats_jax import KFAC, Statistic
          >>> Statistic.by_kind("KFAC") is KFAC
          True
        """
        if kind not in Statistic._types:
            raise ValueError(
                f"unknown statistic type {kind!r}; the types are {sorted(Statistic._types)}"
            )
        return Statistic._types[kind]

    # Serialisation, validity and placement ----------------------------------
    def arrays(self) -> dict[str, Array]:
        """Its arrays by field name (what a statistics checkpoint stores)."""
        return {f: getattr(self, f) for f in self.array_fields}

    def layout(self) -> dict[str, Any]:
        """Its type and static layout as JSON data (the checkpoint's layout record)."""
        return {
            "type": self.kind,
            **{f: [int(a) for a in getattr(self, f)] for f in self.layout_fields},
        }

    @classmethod
    def from_saved(cls, arrays: dict[str, Any], layout: dict[str, Any]) -> Statistic:
        """The inverse of :meth:`arrays` and :meth:`layout`."""
        meta = {f: tuple(layout[f]) for f in cls.layout_fields if f in layout}
        return cls(**{f: arrays[f] for f in cls.array_fields}, **meta)

    def value_checks(self) -> list[tuple[str, Array, str | None]]:
        """``(field, array, sign rule or None)`` for the finiteness and sign checks."""
        return [
            (f, getattr(self, f), self.sign_rules.get(f)) for f in self.array_fields
        ]

    def sharding(self, leaf_sharding: NamedSharding) -> Any:
        """Shardings of its arrays for a leaf sharded as ``leaf_sharding``: this
        statistic's structure with a :class:`~jax.sharding.NamedSharding` per array
        (see :mod:`mats_jax.sharding`)."""
        raise NotImplementedError(f"{self.kind} has no sharding rule")

    @classmethod
    def from_sums(
        cls, sums: dict[str, Array], examples: Array, **layout: Any
    ) -> Statistic:
        """The statistic from the estimator's sums (:attr:`estimator_sums`) over
        ``examples`` examples: the package's one normalisation, per example."""
        raise NotImplementedError(f"{cls.kind} has no estimator")

    # Per-instance interface -------------------------------------------------
    def fit_error(self, leaf_shape: tuple[int, ...]) -> str | None:
        """Why this statistic does not fit a leaf of ``leaf_shape`` (None if it does)."""
        raise NotImplementedError

    def blocked(self, leaf_shape: tuple[int, ...]) -> Statistic:
        """This statistic with a leading block axis B, for a leaf of ``leaf_shape``."""
        raise NotImplementedError

    def to_blocks(self, leaf: Array) -> Array:
        """The leaf as B blocks, ``(B, ...)``; the inverse of ``from_blocks``."""
        raise NotImplementedError

    def from_blocks(self, blocks: Array, leaf_shape: tuple[int, ...]) -> Array:
        raise NotImplementedError

    def matvec(self, x: Array) -> Array:
        """``C x`` for blocked ``x`` (on a blocked statistic)."""
        raise NotImplementedError

    def scaled(self, weight: Array) -> Statistic:
        """``weight · C``."""
        raise NotImplementedError

    def off_diagonal_scaled(self, alpha: Any) -> Statistic:
        """Each of its matrices M (:attr:`matrix_fields`) as ``αM + (1 − α) diag(M)``.

        RegMean's shrinkage of a Gram toward its diagonal, which the MaTS
        paper's code applies to both K-FAC factors (its ``model_lambda``). A
        type without matrices (the diagonal Fisher) is returned as it is.

        Examples:
          >>> import jax.numpy as jnp
          >>> from mats_jax import KFAC
          >>> shrunk = KFAC(jnp.ones((2, 2)), 2 * jnp.ones((2, 2))).off_diagonal_scaled(0.5)
          >>> shrunk.a, shrunk.g
          (Array([[1. , 0.5],
                 [0.5, 1. ]], dtype=float32), Array([[2., 1.],
                 [1., 2.]], dtype=float32))
        """
        return dataclasses.replace(
            self,
            **{
                name: shrink_off_diagonal(getattr(self, name), alpha)
                for name in self.matrix_fields
            },
        )

    def diagonal_mean(self) -> Array:
        """The mean of C's diagonal per block, shape (B,) (on a blocked statistic)."""
        raise NotImplementedError

    def plus_identity(self, damping: Array) -> Statistic:
        """``C + δ_b I`` for each block b (on a blocked statistic; ``damping``
        has shape (B,)), for a type closed under addition: the solver folds
        its damping into the summed statistic, so CG's product needs no
        separate, leaf-sized ``δ x`` term."""
        raise NotImplementedError(f"{self.kind} statistics do not hold a damping")

    def astype(self, dtype: Any) -> Statistic:
        return jax.tree.map(lambda x: x.astype(dtype), self)

    # Operations on a sum of same-typed blocked statistics -------------------
    @classmethod
    def summed(cls, stats: Sequence[Statistic]) -> list[Statistic]:
        """Statistics whose products sum to ``Σ_m C_m x``, as few as the type
        allows: ``[Σ_m C_m]`` for a type closed under addition
        (:attr:`closed_under_addition`: its arrays summed, its layout kept),
        else ``stats`` themselves (a sum of K-FAC products ``Σ_m A_m X G_m``
        is no K-FAC product).

        CG applies the sum at every step: formed once, it costs one product
        and one array per step instead of M.
        """
        if not cls.closed_under_addition:
            return list(stats)
        return [
            dataclasses.replace(
                stats[0],
                **{f: sum_of(getattr(s, f) for s in stats) for f in cls.array_fields},
            )
        ]

    @classmethod
    def sum_pinv(
        cls, stats: Sequence[Statistic], damping: Array, eigh: Eigh = jnp.linalg.eigh
    ) -> BlockInverse:
        """``x ↦ (Σ_m C_m + δ I)⁺ x``: the exact pseudo-inverse, per block.

        ``eigh`` is the eigendecomposition to use (the solver passes an
        :class:`EighSequence`).
        """
        raise NotImplementedError(f"{cls.kind} statistics have no closed-form solve")

    @classmethod
    def sum_preconditioner(
        cls, stats: Sequence[Statistic], damping: Array, eigh: Eigh = jnp.linalg.eigh
    ) -> BlockInverse:
        """An approximation of ``(Σ_m C_m + δ I)⁺`` that is cheap to apply."""
        return cls.sum_pinv(stats, damping, eigh)


S = TypeVar("S", bound=type[Statistic])


def register_statistic(cls: S) -> S:
    """Registers a statistic type: a pytree (its :attr:`~Statistic.array_fields`
    as data, :attr:`~Statistic.layout_fields` as metadata) known by its ``kind``
    to the checks, sharding, saving and loading.

    A new statistic type is one frozen dataclass subclassing
    :class:`Statistic`, decorated with this.
    """
    jax.tree_util.register_dataclass(
        cls, data_fields=list(cls.array_fields), meta_fields=list(cls.layout_fields)
    )
    Statistic._types[cls.kind] = cls
    return cls


@register_statistic
@dataclasses.dataclass(frozen=True)
class Diagonal(Statistic):
    """A diagonal statistic, such as the diagonal Fisher: ``C = diag(f)``.

    ``f`` has the shape of its leaf. The whole leaf is one block.

    Args:
      f: non-negative array with the leaf's shape.

    Examples:
      >>> import jax.numpy as jnp
      >>> Diagonal(jnp.ones((2, 3))).fit_error((2, 3)) is None
      True
    """

    f: Array
    kind: ClassVar[str] = "Diagonal"
    array_fields: ClassVar[tuple[str, ...]] = ("f",)
    sign_rules: ClassVar[dict[str, str]] = {"f": NONNEGATIVE}
    estimator_sums: ClassVar[tuple[str, ...]] = ("squared_gradients",)
    closed_under_addition: ClassVar[bool] = True

    def sharding(self, leaf_sharding: NamedSharding) -> Any:
        return Diagonal(leaf_sharding)  # type: ignore[arg-type]

    @classmethod
    def from_sums(
        cls, sums: dict[str, Array], examples: Array, **layout: Any
    ) -> Diagonal:
        return Diagonal(sums["squared_gradients"] / examples)

    def fit_error(self, leaf_shape: tuple[int, ...]) -> str | None:
        if tuple(self.f.shape) != tuple(leaf_shape):
            return f"Diagonal.f has shape {tuple(self.f.shape)}, expected the leaf's shape {tuple(leaf_shape)}"
        return None

    def blocked(self, leaf_shape: tuple[int, ...]) -> Diagonal:
        return Diagonal(self.f.reshape(1, -1))

    def to_blocks(self, leaf: Array) -> Array:
        return leaf.reshape(1, -1)

    def from_blocks(self, blocks: Array, leaf_shape: tuple[int, ...]) -> Array:
        return blocks.reshape(leaf_shape)

    def matvec(self, x: Array) -> Array:
        return self.f * x

    def scaled(self, weight: Array) -> Diagonal:
        return Diagonal(weight * self.f)

    def diagonal_mean(self) -> Array:
        return jnp.mean(self.f, axis=-1)

    def plus_identity(self, damping: Array) -> Diagonal:
        return Diagonal(self.f + damping[:, None].astype(self.f.dtype))

    @classmethod
    def sum_pinv(
        cls, stats: Sequence[Statistic], damping: Array, eigh: Eigh = jnp.linalg.eigh
    ) -> BlockInverse:
        total = sum_of(s.f for s in stats) + damping[:, None]  # type: ignore[attr-defined]
        return BlockInverse(
            (_safe_reciprocal(total, _pinv_cutoff(total, 1)),), _scale_rule
        )


@register_statistic
@dataclasses.dataclass(frozen=True)
class Dense(Statistic):
    """A full block statistic for a small leaf: ``C = F``, (n, n) with n the leaf size.

    For leaves small enough that the whole Fisher block fits (IA³ scaling
    vectors, LoRA-sized adapters, biases); the leaf is flattened in row-major
    order. :func:`~mats_jax.block_fisher` estimates it:
    ``F = (1/N) Σ_i Σ_k g_ik g_ikᵀ`` over the per-example scores.

    Examples:
      >>> import jax.numpy as jnp
      >>> Dense(jnp.eye(6)).fit_error((2, 3)) is None
      True
    """

    f: Array
    kind: ClassVar[str] = "Dense"
    array_fields: ClassVar[tuple[str, ...]] = ("f",)
    matrix_fields: ClassVar[tuple[str, ...]] = ("f",)
    sign_rules: ClassVar[dict[str, str]] = {"f": NONNEGATIVE_DIAGONAL}
    estimator_sums: ClassVar[tuple[str, ...]] = ("outer_gradients",)
    closed_under_addition: ClassVar[bool] = True

    @classmethod
    def from_sums(cls, sums: dict[str, Array], examples: Array, **layout: Any) -> Dense:
        return Dense(sums["outer_gradients"] / examples)

    def sharding(self, leaf_sharding: NamedSharding) -> Any:
        # Dense statistics are for small leaves: every device holds all of it.
        return Dense(NamedSharding(leaf_sharding.mesh, PartitionSpec()))  # type: ignore[arg-type]

    def fit_error(self, leaf_shape: tuple[int, ...]) -> str | None:
        n = math.prod(leaf_shape)
        if tuple(self.f.shape) != (n, n):
            return f"Dense.f has shape {tuple(self.f.shape)}, expected ({n}, {n}) for a leaf of shape {tuple(leaf_shape)}"
        return None

    def blocked(self, leaf_shape: tuple[int, ...]) -> Dense:
        return Dense(self.f[None])

    def to_blocks(self, leaf: Array) -> Array:
        return leaf.reshape(1, -1)

    def from_blocks(self, blocks: Array, leaf_shape: tuple[int, ...]) -> Array:
        return blocks.reshape(leaf_shape)

    def matvec(self, x: Array) -> Array:
        return jnp.einsum("bij,bj->bi", self.f, x)

    def scaled(self, weight: Array) -> Dense:
        return Dense(weight * self.f)

    def diagonal_mean(self) -> Array:
        return jnp.mean(jnp.diagonal(self.f, axis1=-2, axis2=-1), axis=-1)

    def plus_identity(self, damping: Array) -> Dense:
        return Dense(self.f + _scaled_identity(damping, self.f))

    @classmethod
    def sum_pinv(
        cls, stats: Sequence[Statistic], damping: Array, eigh: Eigh = jnp.linalg.eigh
    ) -> BlockInverse:
        return _sym_pinv(sum_of(s.f for s in stats), damping, eigh, _dense_rule)  # type: ignore[attr-defined]


def _scaled_identity(damping: Array, blocks: Array) -> Array:
    """``δ_b I`` for each block b of ``blocks`` (B, n, n)."""
    eye = jnp.eye(blocks.shape[-1], dtype=blocks.dtype)
    return damping.astype(blocks.dtype)[:, None, None] * eye


def kernel_axes(
    ndim: int, in_axes: Sequence[int], out_axes: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(block axes, input axes, output axes) of a kernel of rank ``ndim``."""
    ins = tuple(a % ndim for a in in_axes)
    outs = tuple(a % ndim for a in out_axes)
    blocks = tuple(a for a in range(ndim) if a not in ins + outs)
    return blocks, ins, outs


def kernel_to_blocks(
    leaf: Array, in_axes: Sequence[int], out_axes: Sequence[int]
) -> Array:
    """A kernel as ``(B, I, O)``: blocks, then inputs and outputs flattened in order."""
    blocks, ins, outs = kernel_axes(leaf.ndim, in_axes, out_axes)
    n_in = math.prod(leaf.shape[a] for a in ins)
    n_out = math.prod(leaf.shape[a] for a in outs)
    return jnp.transpose(leaf, blocks + ins + outs).reshape(-1, n_in, n_out)


def kernel_from_blocks(
    blocks: Array,
    leaf_shape: tuple[int, ...],
    in_axes: Sequence[int],
    out_axes: Sequence[int],
) -> Array:
    """The inverse of :func:`kernel_to_blocks`."""
    order = sum(kernel_axes(len(leaf_shape), in_axes, out_axes), ())
    permuted = blocks.reshape(tuple(leaf_shape[a] for a in order))
    return jnp.transpose(permuted, tuple(int(a) for a in np.argsort(order)))


class _KernelLayout:
    """Shared layout logic of Gram and KFAC: input, output and block axes."""

    kind: ClassVar[str]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]

    def __post_init__(self) -> None:
        # Axes are static pytree metadata: they must be hashable tuples.
        object.__setattr__(self, "in_axes", tuple(int(a) for a in self.in_axes))
        object.__setattr__(self, "out_axes", tuple(int(a) for a in self.out_axes))

    def _axes(
        self, ndim: int
    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        return kernel_axes(ndim, self.in_axes, self.out_axes)

    def _layout_error(self, leaf_shape: tuple[int, ...]) -> str | None:
        ndim = len(leaf_shape)
        named = tuple(self.in_axes) + tuple(self.out_axes)
        if not self.in_axes or not self.out_axes:
            return f"{self.kind} needs at least one input and one output axis"
        if any(not -ndim <= a < ndim for a in named):
            return f"{self.kind} axes in_axes={self.in_axes}, out_axes={self.out_axes} do not exist on a leaf of rank {ndim}"
        if len({a % ndim for a in named}) != len(named):
            return f"{self.kind} in_axes={self.in_axes} and out_axes={self.out_axes} repeat an axis"
        return None

    def _sizes(self, leaf_shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
        blocks, ins, outs = self._axes(len(leaf_shape))
        return (
            tuple(leaf_shape[a] for a in blocks),
            math.prod(leaf_shape[a] for a in ins),
            math.prod(leaf_shape[a] for a in outs),
        )

    def _factor_error(
        self,
        name: str,
        factor: Array,
        expected: tuple[int, ...],
        leaf_shape: tuple[int, ...],
    ) -> str | None:
        if tuple(factor.shape) != expected:
            return (
                f"{self.kind}.{name} has shape {tuple(factor.shape)}, expected {expected} for a "
                f"leaf of shape {tuple(leaf_shape)} with in_axes={self.in_axes}, out_axes={self.out_axes}"
            )
        return None

    def to_blocks(self, leaf: Array) -> Array:
        return kernel_to_blocks(leaf, self.in_axes, self.out_axes)

    def from_blocks(self, blocks: Array, leaf_shape: tuple[int, ...]) -> Array:
        return kernel_from_blocks(blocks, leaf_shape, self.in_axes, self.out_axes)

    def _factor_sharding(
        self, leaf_sharding: NamedSharding, name: str
    ) -> NamedSharding:
        """The sharding of factor ``name`` (``"a"``: rows over the input axes;
        ``"g"``: over the output axes) for a kernel sharded as ``leaf_sharding``."""
        factor = getattr(self, name)
        ndim = factor.ndim - 2 + len(self.in_axes) + len(self.out_axes)
        spec = tuple(leaf_sharding.spec) + (None,) * (ndim - len(leaf_sharding.spec))
        blocks, ins, outs = self._axes(ndim)
        rows, other = (ins, outs) if name == "a" else (outs, ins)
        mesh = leaf_sharding.mesh
        return NamedSharding(
            mesh, factor_spec(mesh, spec, rows, other, blocks, factor.shape[-1])
        )


def _rows_entry(spec: tuple[Any, ...], axes: Sequence[int]) -> Any:
    """The mesh axes sharding a factor's rows: its kernel's first axis of ``axes``."""
    if not axes:
        return None
    first, *rest = axes
    if any(spec[a] is not None for a in rest):
        return None
    return spec[first]


def _entry_size(mesh: Mesh | AbstractMesh, entry: Any) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return int(np.prod([mesh.shape[name] for name in names]))


def factor_spec(
    mesh: Mesh | AbstractMesh,
    leaf_spec: tuple[Any, ...],
    axes: Sequence[int],
    other_axes: Sequence[int],
    block_axes: Sequence[int],
    n: int,
) -> PartitionSpec:
    """The spec of a ``blocks… + (n, n)`` factor whose rows run over ``axes`` of the leaf.

    The rows follow the kernel's ``axes``; where those are not split, they
    borrow the split of the kernel's ``other_axes`` (when it divides n), so
    that a kernel split on one axis has both factors split rather than one
    replicated on every device.
    """
    rows = _rows_entry(leaf_spec, axes)
    if rows is None:
        borrowed = _rows_entry(leaf_spec, other_axes)
        if borrowed is not None and n % _entry_size(mesh, borrowed) == 0:
            rows = borrowed
    return PartitionSpec(*(leaf_spec[a] for a in block_axes), rows, None)


def _blocked_factor(factor: Array, n: int) -> Array:
    return factor.reshape(-1, n, n)


@register_statistic
@dataclasses.dataclass(frozen=True)
class Gram(_KernelLayout, Statistic):
    """RegMean's statistic for a dense kernel: ``C = A ⊗ I``, A = XᵀX of the layer inputs.

    Args:
      a: the Gram matrix of the layer's inputs, ``block_shape + (I, I)``.
      in_axes: the kernel's input axes (default: the second to last).
      out_axes: the kernel's output axes (default: the last).

    Examples:
      >>> import jax.numpy as jnp
      >>> Gram(jnp.eye(4)).fit_error((4, 8)) is None
      True
      >>> Gram(jnp.eye(4), in_axes=(0,), out_axes=(1, 2)).fit_error((4, 2, 8)) is None
      True
    """

    a: Array
    in_axes: tuple[int, ...] = (-2,)
    out_axes: tuple[int, ...] = (-1,)
    kind: ClassVar[str] = "Gram"
    array_fields: ClassVar[tuple[str, ...]] = ("a",)
    matrix_fields: ClassVar[tuple[str, ...]] = ("a",)
    layout_fields: ClassVar[tuple[str, ...]] = ("in_axes", "out_axes")
    sign_rules: ClassVar[dict[str, str]] = {"a": NONNEGATIVE_DIAGONAL}
    estimator_sums: ClassVar[tuple[str, ...]] = ("inputs", "rows")
    closed_under_addition: ClassVar[bool] = True

    def sharding(self, leaf_sharding: NamedSharding) -> Any:
        a: Any = self._factor_sharding(leaf_sharding, "a")
        return Gram(a, self.in_axes, self.out_axes)

    @classmethod
    def from_sums(cls, sums: dict[str, Array], examples: Array, **layout: Any) -> Gram:
        return Gram(sums["inputs"] / jnp.maximum(sums["rows"], 1.0), **layout)

    def fit_error(self, leaf_shape: tuple[int, ...]) -> str | None:
        error = self._layout_error(leaf_shape)
        if error:
            return error
        block, n_in, _ = self._sizes(leaf_shape)
        return self._factor_error("a", self.a, (*block, n_in, n_in), leaf_shape)

    def blocked(self, leaf_shape: tuple[int, ...]) -> Gram:
        _, n_in, _ = self._sizes(leaf_shape)
        return Gram(_blocked_factor(self.a, n_in), self.in_axes, self.out_axes)

    def matvec(self, x: Array) -> Array:
        return self.a @ x

    def scaled(self, weight: Array) -> Gram:
        return Gram(weight * self.a, self.in_axes, self.out_axes)

    def diagonal_mean(self) -> Array:
        return jnp.mean(jnp.diagonal(self.a, axis1=-2, axis2=-1), axis=-1)

    def plus_identity(self, damping: Array) -> Gram:
        # (A ⊗ I) + δI = (A + δI) ⊗ I
        return Gram(
            self.a + _scaled_identity(damping, self.a), self.in_axes, self.out_axes
        )

    @classmethod
    def sum_pinv(
        cls, stats: Sequence[Statistic], damping: Array, eigh: Eigh = jnp.linalg.eigh
    ) -> BlockInverse:
        return _sym_pinv(sum_of(s.a for s in stats), damping, eigh, _gram_rule)  # type: ignore[attr-defined]


@register_statistic
@dataclasses.dataclass(frozen=True)
class KFAC(_KernelLayout, Statistic):
    """The K-FAC Fisher of a dense kernel: ``C = A ⊗ G``.

    ``A = E[x xᵀ]`` over the layer's inputs and ``G = E[g gᵀ]`` over the
    gradients of the log-likelihood at the layer's outputs. Its product with a
    kernel is two small matmuls, ``A W G``; a sum over tasks of such products
    has no closed-form inverse, which is why MaTS solves it by conjugate
    gradient.

    Args:
      a: input factor, ``block_shape + (I, I)``.
      g: output-gradient factor, ``block_shape + (O, O)``.
      in_axes: the kernel's input axes (default: the second to last).
      out_axes: the kernel's output axes (default: the last).

    Examples:
      >>> import jax.numpy as jnp
      >>> stat = KFAC(jnp.eye(4), jnp.eye(8))
      >>> stat.fit_error((4, 8)) is None
      True
      >>> stat.fit_error((8, 4))
      'KFAC.a has shape (4, 4), expected (8, 8) for a leaf of shape (8, 4) with in_axes=(-2,), out_axes=(-1,)'
    """

    a: Array
    g: Array
    in_axes: tuple[int, ...] = (-2,)
    out_axes: tuple[int, ...] = (-1,)
    kind: ClassVar[str] = "KFAC"
    has_closed_form: ClassVar[bool] = False
    array_fields: ClassVar[tuple[str, ...]] = ("a", "g")
    matrix_fields: ClassVar[tuple[str, ...]] = ("a", "g")
    layout_fields: ClassVar[tuple[str, ...]] = ("in_axes", "out_axes")
    sign_rules: ClassVar[dict[str, str]] = {
        "a": NONNEGATIVE_DIAGONAL,
        "g": NONNEGATIVE_DIAGONAL,
    }
    estimator_sums: ClassVar[tuple[str, ...]] = ("inputs", "rows", "output_gradients")

    def sharding(self, leaf_sharding: NamedSharding) -> Any:
        return KFAC(
            self._factor_sharding(leaf_sharding, "a"),  # type: ignore[arg-type]
            self._factor_sharding(leaf_sharding, "g"),  # type: ignore[arg-type]
            self.in_axes,
            self.out_axes,
        )

    @classmethod
    def from_sums(cls, sums: dict[str, Array], examples: Array, **layout: Any) -> KFAC:
        return KFAC(
            sums["inputs"] / jnp.maximum(sums["rows"], 1.0),
            sums["output_gradients"] / examples,
            **layout,
        )

    def fit_error(self, leaf_shape: tuple[int, ...]) -> str | None:
        error = self._layout_error(leaf_shape)
        if error:
            return error
        block, n_in, n_out = self._sizes(leaf_shape)
        return self._factor_error(
            "a", self.a, (*block, n_in, n_in), leaf_shape
        ) or self._factor_error("g", self.g, (*block, n_out, n_out), leaf_shape)

    def blocked(self, leaf_shape: tuple[int, ...]) -> KFAC:
        _, n_in, n_out = self._sizes(leaf_shape)
        return KFAC(
            _blocked_factor(self.a, n_in),
            _blocked_factor(self.g, n_out),
            self.in_axes,
            self.out_axes,
        )

    def matvec(self, x: Array) -> Array:
        return (self.a @ x) @ self.g

    def scaled(self, weight: Array) -> KFAC:
        return KFAC(weight * self.a, self.g, self.in_axes, self.out_axes)

    def diagonal_mean(self) -> Array:
        def mean_diag(m: Array) -> Array:
            return jnp.mean(jnp.diagonal(m, axis1=-2, axis2=-1), axis=-1)

        return mean_diag(self.a) * mean_diag(self.g)

    @classmethod
    def sum_preconditioner(
        cls, stats: Sequence[Statistic], damping: Array, eigh: Eigh = jnp.linalg.eigh
    ) -> BlockInverse:
        """The nearest Kronecker product to ``Σ_m A_m ⊗ G_m``, inverted spectrally.

        .. math::

           \\min_{X, Y} \\Big\\| \\sum_m A_m \\otimes G_m - X \\otimes Y \\Big\\|_F

        is a rank-one approximation (Van Loan and Pitsianis, 1993), found by
        alternating ``X ∝ Σ_m ⟨G_m, Y⟩ A_m`` and ``Y ∝ Σ_m ⟨A_m, X⟩ G_m``: a
        few inner products of small matrices. ``(X ⊗ Y + δ I)⁺`` is then applied
        through the eigendecompositions of X and Y, four matmuls per product.
        It is exact when the tasks share either factor up to scale.
        """
        a_list = [s.a for s in stats]  # type: ignore[attr-defined]
        g_list = [s.g for s in stats]  # type: ignore[attr-defined]

        def inner(p: Array, q: Array) -> Array:
            return jnp.sum(p * q, axis=(-2, -1))[:, None, None]

        def normalised(m: Array) -> Array:
            return m / jnp.maximum(jnp.sqrt(inner(m, m)), jnp.finfo(m.dtype).tiny)

        x = normalised(sum_of(a_list))
        y = normalised(sum_of(g_list))
        for _ in range(4):
            x = normalised(
                sum_of(inner(g, y) * a for a, g in zip(a_list, g_list, strict=True))
            )
            y = normalised(
                sum_of(inner(a, x) * g for a, g in zip(a_list, g_list, strict=True))
            )
        sigma = sum_of(
            inner(a, x) * inner(g, y) for a, g in zip(a_list, g_list, strict=True)
        )
        lam_x, u_x = eigh(sigma * x)
        lam_y, u_y = eigh(y)
        outer = lam_x[:, :, None] * lam_y[:, None, :] + damping[:, None, None]
        # Only numerically zero eigenvalues are dropped: a preconditioner that
        # zeroes small but real curvature would stall CG in those directions.
        cutoff = (
            jnp.max(outer, axis=(-2, -1), keepdims=True) * jnp.finfo(outer.dtype).eps
        )
        return BlockInverse(
            (u_x, u_y, _safe_reciprocal(outer, cutoff)), _kronecker_rule
        )
