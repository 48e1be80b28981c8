"""What a merge reports per leaf: how it was merged and, for solved leaves, how the solve ended."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from mats_jax.solver.cg import CONVERGED, STATUS_NAMES, UNKNOWN_ITERATIONS
from mats_jax.tree import path_str
from mats_jax.typing import Array, Params

__all__ = [
    "ConvergenceWarning",
    "LeafReport",
    "MergeResult",
    "format_report",
    "unconverged_blocks",
]


class ConvergenceWarning(UserWarning):
    """CG stopped before reaching its tolerance on some blocks."""


@dataclasses.dataclass(frozen=True)
class LeafReport:
    """How one parameter leaf was merged.

    Attributes:
      solver: ``"cg"``, ``"closed_form"``, or ``"fallback:<rule>"`` for a leaf
        without a statistic.
      initial_residual, final_residual, iterations, status: per block, shape
        (B,) (one entry per layer for ``nn.scan``-stacked kernels); None for
        fallback leaves. See :class:`CGInfo`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from mats_jax import KFAC, mats
      >>> models = [{"k": jnp.ones((2, 2)), "b": jnp.zeros(2)},
      ...           {"k": jnp.zeros((2, 2)), "b": jnp.ones(2)}]
      >>> stats = [{"k": KFAC(jnp.eye(2), jnp.eye(2)), "b": None},
      ...          {"k": KFAC(3 * jnp.eye(2), jnp.eye(2)), "b": None}]
      >>> report = mats(models, stats).report
      >>> report["k"].solver, report["k"].iterations, report["b"].solver
      ('cg', Array([1], dtype=int32), 'fallback:average')
    """

    solver: str
    initial_residual: Array | None = None
    final_residual: Array | None = None
    iterations: Array | None = None
    status: Array | None = None


jax.tree_util.register_dataclass(
    LeafReport,
    data_fields=["initial_residual", "final_residual", "iterations", "status"],
    meta_fields=["solver"],
)


class MergeResult(NamedTuple):
    """The merged parameters and, per leaf, a :class:`LeafReport`.

    Attributes:
      params: the merged parameters: a pytree with the models' structure,
        each leaf in its models' dtype.
      report: a pytree with the same structure holding, per leaf, the
        :class:`LeafReport` of how it was merged (print it with
        :func:`format_report`).

    Examples:
      >>> import jax.numpy as jnp
      >>> from mats_jax import Diagonal, fisher_merge
      >>> result = fisher_merge([{"w": jnp.ones(2)}, {"w": jnp.zeros(2)}],
      ...                       [{"w": Diagonal(jnp.ones(2))}] * 2)
      >>> result.params["w"], result.report["w"].solver
      (Array([0.5, 0.5], dtype=float32), 'closed_form')
      >>> params, report = result   # a NamedTuple unpacks
    """

    params: Params
    report: Any


def unconverged_blocks(report: Any, paths: Sequence[str]) -> list[str]:
    """``"path[block i]: status, relative residual r"`` for every solved block
    that stopped short of its tolerance (nothing for traced reports)."""
    leaves = jax.tree.leaves(report, is_leaf=lambda x: isinstance(x, LeafReport))
    short = []
    for path, leaf in zip(paths, leaves, strict=True):
        if leaf.status is None or isinstance(leaf.status, jax.core.Tracer):
            continue
        status = np.asarray(leaf.status)
        for i in np.flatnonzero(status != CONVERGED):
            where = path if status.size == 1 else f"{path}[block {i}]"
            short.append(
                f"{where}: {STATUS_NAMES[status[i]]}, relative residual "
                f"{float(np.asarray(leaf.final_residual)[i]):.3g}"
            )
    return short


def format_report(report: Any) -> str:
    """A plain-text table of a solve report: one row per leaf.

    Columns: path, solver, blocks, iterations (max over blocks), initial and
    final relative residuals (max over blocks), and the statuses seen.

    Examples:
      >>> import jax.numpy as jnp
      >>> from mats_jax import Gram, format_report, regmean
      >>> models = [{"k": jnp.array([[1.0], [0.0]]), "b": jnp.zeros(1)},
      ...           {"k": jnp.array([[0.0], [1.0]]), "b": jnp.ones(1)}]
      >>> grams = [{"k": Gram(jnp.diag(jnp.array([1.0, 0.0]))), "b": None},
      ...          {"k": Gram(jnp.diag(jnp.array([0.0, 1.0]))), "b": None}]
      >>> print(format_report(regmean(models, grams, alpha=1.0).report))
      leaf  solver            blocks  iters  initial   final     status
      b     fallback:average  -       -      -         -         -
      k     closed_form       1       0      5.00e-01  0.00e+00  converged
    """
    rows = [("leaf", "solver", "blocks", "iters", "initial", "final", "status")]
    with_path = jax.tree_util.tree_flatten_with_path(
        report, is_leaf=lambda x: isinstance(x, LeafReport)
    )[0]
    for path, leaf in with_path:
        if leaf.status is None:
            rows.append((path_str(path), leaf.solver, "-", "-", "-", "-", "-"))
            continue
        status = np.asarray(leaf.status)
        rows.append(
            (
                path_str(path),
                leaf.solver,
                str(status.size),
                _iterations(np.asarray(leaf.iterations)),
                f"{float(np.max(np.asarray(leaf.initial_residual))):.2e}",
                f"{float(np.max(np.asarray(leaf.final_residual))):.2e}",
                ",".join(sorted({STATUS_NAMES[s] for s in status.tolist()})),
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _iterations(iterations: np.ndarray) -> str:
    """The most iterations over blocks, ``?`` where the loop did not count them."""
    if np.any(iterations == UNKNOWN_ITERATIONS):
        return "?"
    return str(int(np.max(iterations)))
