"""Model Stock (Jang, Yun and Han, 2024): the base moved toward the fine-tuned
models' mean by a ratio set by the angle between their task vectors.

For k fine-tuned models with task vectors ``τ_m = θ_m − θ_0``, per leaf:

.. math::

   \\cos\\theta = \\operatorname{mean}_{m < n}
       \\frac{\\langle \\tau_m, \\tau_n\\rangle}{\\lVert\\tau_m\\rVert \\lVert\\tau_n\\rVert},
   \\qquad
   t = \\frac{k \\cos\\theta}{(k - 1) \\cos\\theta + 1},
   \\qquad
   \\theta = \\theta_0 + t \\cdot \\frac{1}{k} \\sum_m \\tau_m

The paper's argument: fine-tuned weights lie on a thin shell around a centre
the models share, at a common angle θ between their offsets from it; the
point of the segment from θ₀ to the models' mean nearest that centre is at
the fraction ``t``. The more the task vectors agree (cos θ → 1), the closer
the merge is to the mean (t → 1); orthogonal ones (cos θ = 0) give the base.
For k = 2 the mean of the pairwise cosines is the one cosine; for k > 2 the
paper gives no rule, and the mean of the pairwise cosines is mergekit's.

Conventions where the formula is undefined or leaves its domain:

- a pair with a zero task vector (a model equal to the base in that leaf)
  has no angle; its cosine counts as 0 (no agreement), as in mergekit;
- cos θ is clipped to [0, 1]: below 0 the ratio would be negative, and at
  ``cos θ = −1/(k − 1)`` it divides by zero; with the clip ``t`` lies in
  [0, 1], between the base and the mean. ``clip_cosine=False`` computes the
  formula as written, as mergekit does: a negative cosine gives t < 0 (away
  from the mean), and where ``|(k − 1) cos θ + 1| < 1e-6`` the leaf keeps the
  base (t = 0). Converted mergekit recipes use it, so they merge as mergekit
  does.

``filter_wise`` takes one angle, and one ratio, per output feature (the last
axis of a Flax ``(in, out)`` kernel: mergekit's per-row angles of a PyTorch
``(out, in)`` weight) over the other axes; a 1-D leaf (a bias, a norm's
scale) takes one angle for the whole leaf, as mergekit does.

Examples:
  >>> import jax.numpy as jnp
  >>> from mats_jax import model_stock
  >>> base = {"w": jnp.zeros(2)}
  >>> models = [{"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([1.0, -1.0])}]
  >>> model_stock(base, models)["w"]  # orthogonal task vectors: the base
  Array([0., 0.], dtype=float32)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from mats_jax import checks
from mats_jax.engine import run_in_memory
from mats_jax.merge.linear import add_scaled, named_report
from mats_jax.method import MergeInputs, MergeMethod, Needs, check_model_inputs
from mats_jax.sharding import Placement
from mats_jax.solver.report import MergeResult
from mats_jax.tree import register_record, task_vectors
from mats_jax.tree import total as sum_of
from mats_jax.typing import Array, Params

__all__ = [
    "MODEL_STOCK",
    "ModelStock",
    "ModelStockParameters",
    "model_stock",
    "model_stock_ratio",
    "model_stock_ratios",
]


@register_record
@dataclasses.dataclass(frozen=True)
class ModelStockParameters:
    """Model Stock's parameters.

    Attributes:
      filter_wise: one angle and ratio per output feature (the last axis)
        instead of one per leaf (mergekit's ``filter_wise``).
      clip_cosine: clip cos θ to [0, 1] (default); False: the formula as
        written, as mergekit (see the module docstring).
    """

    static_fields: ClassVar[tuple[str, ...]] = ("filter_wise", "clip_cosine")
    filter_wise: bool = False
    clip_cosine: bool = True

    def __post_init__(self) -> None:
        checks.check_flag("filter_wise", self.filter_wise)
        checks.check_flag("clip_cosine", self.clip_cosine)


def model_stock_ratio(
    vectors: Sequence[Array], filter_wise: bool = False, clip_cosine: bool = True
) -> Array:
    """The interpolation ratio ``t`` of one leaf's task vectors (module docstring).

    Args:
      vectors: the k ≥ 2 task vectors of one leaf, of one shape.
      filter_wise: one ratio per entry of the last axis (for leaves of two or
        more axes) instead of one for the leaf.
      clip_cosine: clip cos θ to [0, 1]; False: mergekit's unclipped formula.

    Returns:
      ``t`` (in [0, 1] with the clip): a scalar, or with ``filter_wise`` an array of the
      leaf's last-axis size that broadcasts against the leaf.

    Examples:
      >>> import jax.numpy as jnp
      >>> # cos θ = 1/2 between two task vectors: t = 2 · 0.5 / (0.5 + 1)
      >>> model_stock_ratio([jnp.array([1.0, 0.0]), jnp.array([0.5, 0.8660254])])
      Array(0.6666667, dtype=float32)
    """
    vectors = list(vectors)
    return _ratio(
        lambda start, rows: [_rows(v, start, rows) for v in vectors],
        vectors[0].shape,
        len(vectors),
        filter_wise,
        clip_cosine,
    )


def _leaf_ratio(
    base: Array, models: Sequence[Array], filter_wise: bool, clip_cosine: bool
) -> Array:
    """:func:`model_stock_ratio` of one leaf's task vectors ``θ_m − θ_0``, each
    chunk of them formed from the inputs' rows as it is summed, so that no
    task vector of the whole leaf is held."""
    models = list(models)
    return _ratio(
        lambda start, rows: task_vectors(
            _rows(base, start, rows), [_rows(m, start, rows) for m in models]
        ),
        base.shape,
        len(models),
        filter_wise,
        clip_cosine,
    )


CHUNK_ENTRIES = 1 << 20
"""Entries per chunk of rows over which the ratio's sums are taken."""

Chunk = Callable[[Any, int], list[Array]]
"""``chunk(start, rows)``: the k task vectors' rows ``start : start + rows``
(``start`` may be traced; ``rows`` is static)."""


def _rows(x: Array, start: Any, rows: int) -> Array:
    if x.ndim == 0:
        return x
    return jax.lax.dynamic_slice_in_dim(x, start, rows, axis=0)


def _chunked(chunk: Chunk, shape: tuple[int, ...], init: Any, add: Callable) -> Any:
    """``add(acc, chunk(start, rows))`` over the leaf's rows, a chunk at a time.

    XLA keeps a value that several reductions read (each model's task
    vector, divided by its largest magnitude) as a leaf-sized temporary;
    inside a loop over chunks of rows those temporaries are chunk-sized.
    The streaming IO benchmark's Model Stock held five such temporaries of
    its largest leaf (625 MiB) before.
    """
    if len(shape) == 0:
        return add(init, chunk(0, 1))
    total = shape[0]
    rows = max(1, CHUNK_ENTRIES // max(1, int(np.prod(shape[1:], dtype=np.int64))))
    full, tail = divmod(total, rows)
    if full <= 1:  # one chunk: no loop
        return add(init, chunk(0, total))
    acc = jax.lax.fori_loop(
        0, full, lambda i, acc: add(acc, chunk(i * rows, rows)), init
    )
    return add(acc, chunk(full * rows, tail)) if tail else acc


def _ratio(
    chunk: Chunk, shape: tuple[int, ...], k: int, filter_wise: bool, clip_cosine: bool
) -> Array:
    """The ratio from sums over chunks of the task vectors' rows.

    Two passes: each vector's largest magnitude c_m, then the sums of
    ``(τ_m / c_m)(τ_n / c_n)`` for m ≤ n (scaled first, so no square overflows
    or underflows): norms from the diagonal, cosines from the rest.
    """
    ndim = len(shape)
    axes = tuple(range(ndim - 1)) if filter_wise and ndim >= 2 else None
    out_shape = (shape[-1],) if axes is not None else ()

    def reduce(x: Array, how: Callable) -> Array:
        if axes is None:
            return how(x)
        return how(x, axis=tuple(range(x.ndim - 1)))

    probe = jax.eval_shape(lambda: chunk(0, min(1, shape[0]) if ndim else 1))
    dtype = probe[0].dtype
    zeros = jnp.zeros(out_shape, dtype)
    largest = _chunked(
        chunk,
        shape,
        [zeros] * k,
        lambda acc, xs: [
            jnp.maximum(a, reduce(jnp.abs(x), jnp.max))
            for a, x in zip(acc, xs, strict=True)
        ],
    )
    scale = [jnp.where(c > 0, c, 1) for c in largest]
    pairs = [(m, n) for m in range(k) for n in range(m, k)]

    def add_products(acc: list[Array], xs: list[Array]) -> list[Array]:
        scaled = [x / c for x, c in zip(xs, scale, strict=True)]
        return [
            a + reduce(scaled[m] * scaled[n], jnp.sum)
            for a, (m, n) in zip(acc, pairs, strict=True)
        ]

    sums = dict(
        zip(
            pairs,
            _chunked(chunk, shape, [zeros] * len(pairs), add_products),
            strict=True,
        )
    )
    norms = [jnp.sqrt(sums[m, m]) for m in range(k)]

    def cosine(m: int, n: int) -> Array:
        # A zero task vector has no angle: its cosines count as 0.
        both = (norms[m] > 0) & (norms[n] > 0)
        product = jnp.where(both, norms[m] * norms[n], 1)
        return jnp.where(both, sums[m, n] / product, 0)

    cos = sum_of(cosine(m, n) for m in range(k) for n in range(m + 1, k)) / (
        k * (k - 1) // 2
    )
    if clip_cosine:
        cos = jnp.clip(cos, 0.0, 1.0)
        return k * cos / ((k - 1) * cos + 1)
    denominator = (k - 1) * cos + 1
    singular = jnp.abs(denominator) < 1e-6
    return jnp.where(singular, 0.0, k * cos / jnp.where(singular, 1.0, denominator))


@dataclasses.dataclass(frozen=True)
class ModelStock(MergeMethod):
    """Model Stock, per leaf (see the module docstring).

    It needs the base and at least two models, and takes no weights (its
    ratio assumes the plain mean of the k models): weights that are not all
    equal are refused rather than ignored.
    """

    def needs(self, params: Any) -> Needs:
        return Needs(base=True, models=(2, None), weights=False)

    def merge(
        self, inputs: MergeInputs, params: Any, prepared: Any, placement: Placement
    ) -> MergeResult:
        assert inputs.base is not None
        base_leaves, treedef = jax.tree.flatten(inputs.base)
        model_leaves = [jax.tree.leaves(m) for m in inputs.models]
        merged = []
        for i, b in enumerate(base_leaves):
            leaves = [m[i] for m in model_leaves]
            t = _leaf_ratio(b, leaves, params.filter_wise, params.clip_cosine)
            mean = sum_of(task_vectors(b, leaves)) / len(leaves)
            merged.append(add_scaled(b, mean, t))
        out = jax.tree.unflatten(treedef, merged)
        return MergeResult(out, named_report(out, self.name))


MODEL_STOCK = ModelStock("model_stock", ModelStockParameters)


def model_stock(
    base: Params,
    models: Sequence[Params],
    *,
    filter_wise: bool = False,
    clip_cosine: bool = True,
) -> Params:
    """Model Stock (Jang et al., 2024): the base moved toward the models' mean by
    a ratio from the angle between their task vectors, per leaf.

    .. math::

       t = \\frac{k \\cos\\theta}{(k - 1) \\cos\\theta + 1}, \\qquad
       \\theta = \\theta_0 + t \\cdot \\frac{1}{k} \\sum_m (\\theta_m - \\theta_0)

    with cos θ the mean cosine between pairs of task vectors ``θ_m − θ_0``
    (one pair for k = 2), counted 0 for a pair with a zero task vector and
    clipped to [0, 1] (module docstring). Arithmetic runs in float32 (or the
    leaf's dtype if wider); each leaf is returned in its dtype.

    Values are checked before any work when concrete; traced ones (under an
    outer ``jax.jit``: NaN or Inf in models, weights or statistics,
    hyperparameters out of range, negative weights) are checked only when
    the call is wrapped in ``jax.experimental.checkify.checkify``, and pass
    unchecked otherwise (:func:`~mats_jax.checks.check_traced`).

    Args:
      base: the pretrained parameters θ₀.
      models: k ≥ 2 fine-tuned parameter pytrees.
      filter_wise: one angle and ratio per output feature (the last axis of
        leaves with two or more axes), as mergekit's ``filter_wise``.
      clip_cosine: clip cos θ to [0, 1] (default); False: mergekit's
        unclipped formula (see the module docstring).

    Returns:
      The merged parameters; :func:`model_stock_ratios` gives the ratios.

    Raises:
      MergeInputError: fewer than two models, no base, or (through
        :func:`~mats_jax.merge_pytrees`) weights that are not all equal.

    References:
      Jang, Yun and Han, "Model Stock: All we need is just a few fine-tuned
      models", ECCV 2024 (arXiv:2403.19522).

    Examples:
      >>> import jax.numpy as jnp
      >>> base = {"w": jnp.zeros(2)}
      >>> models = [{"w": jnp.array([2.0, 0.0])}, {"w": jnp.array([1.0, 1.7320508])}]
      >>> model_stock(base, models)["w"]  # cos θ = 1/2, t = 2/3 of the mean
      Array([1.        , 0.57735026], dtype=float32)
    """
    return run_in_memory(
        MODEL_STOCK,
        MODEL_STOCK.parameters(filter_wise=filter_wise, clip_cosine=clip_cosine),
        base=base,
        models=models,
    ).params


def model_stock_ratios(
    base: Params,
    models: Sequence[Params],
    *,
    filter_wise: bool = False,
    clip_cosine: bool = True,
) -> Params:
    """Model Stock's ratio ``t`` for every leaf (what :func:`model_stock` applies).

    Returns:
      A pytree of the models' structure holding each leaf's ``t`` as a
      float32 scalar, or with ``filter_wise`` one per entry of the leaf's
      last axis (leaves with two or more axes).

    Raises:
      MergeInputError: as :func:`model_stock`.

    Examples:
      >>> import jax.numpy as jnp
      >>> base = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
      >>> models = [{"a": jnp.array([1.0, 0.0]), "b": jnp.array([1.0, 0.0])},
      ...           {"a": jnp.array([2.0, 0.0]), "b": jnp.array([0.0, 1.0])}]
      >>> ratios = model_stock_ratios(base, models)
      >>> ratios["a"], ratios["b"]
      (Array(1., dtype=float32), Array(0., dtype=float32))
    """
    params = MODEL_STOCK.parameters(filter_wise=filter_wise, clip_cosine=clip_cosine)
    checks.check_models(models, base)
    check_model_inputs(MODEL_STOCK.name, MODEL_STOCK.needs(params), len(models))
    return _ratios(base, list(models), filter_wise, clip_cosine)


@functools.partial(jax.jit, static_argnames=("filter_wise", "clip_cosine"))
def _ratios(
    base: Params, models: list[Params], filter_wise: bool, clip_cosine: bool
) -> Params:
    return jax.tree.map(
        lambda b, *leaves: _leaf_ratio(b, leaves, filter_wise, clip_cosine),
        base,
        *models,
    )
