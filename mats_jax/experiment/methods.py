"""Every merging method of the experiments, as data: its statistic and its grid.

A :class:`Method` says which per-task statistic it needs (none, the diagonal
Fisher, Gram, or K-FAC of a Fisher kind), which hyperparameters it sweeps on
validation data, and how one candidate is merged. Merges see only the shared
body (heads excluded); ``weights`` are the per-task weights (all 1 for
multitask merging; (1, w) for intermediate-task merging, target first).

MaTS variants start CG from the task arithmetic or TIES merge whose
hyperparameters validation chose for that setting (``init``), and sweep the
CG iteration count, which regularises (DESIGN.md §3).
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

import mats_jax
from mats_jax.typing import Params, StatTree

__all__ = [
    "DERIVED",
    "METHODS",
    "STATISTICS",
    "Grids",
    "MergeInputs",
    "Method",
    "candidates",
    "check_methods",
]

STATISTICS = (
    "fisher_exact",
    "gram",
    "kfac_exact",
    "kfac_sampled",
    "kfac_empirical",
)
"""Statistic names estimated from data: what each data-dependent method needs per task."""

DERIVED = {
    "kfac_exact_kernels_only": "kfac_exact",
    "kfac_exact_equalised": "kfac_exact",
}
"""Statistics computed from an estimated one (:mod:`~mats_jax.experiment.derived`)."""


@dataclasses.dataclass(frozen=True)
class Grids:
    """The validation grids of every hyperparameter."""

    scale: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
    ties_scale: tuple[float, ...] = (0.6, 0.8, 1.0, 1.3)
    density: tuple[float, ...] = (0.1, 0.2, 0.4)
    drop_rate: tuple[float, ...] = (0.5, 0.7, 0.9)
    alpha: tuple[float, ...] = (0.5, 0.7, 0.9, 1.0)
    cg_iterations: tuple[int, ...] = (10, 30, 100, 300)


@dataclasses.dataclass(frozen=True)
class MergeInputs:
    """What a merge candidate is computed from."""

    base: Params
    models: Sequence[Params]
    statistics: Mapping[str, Sequence[StatTree]]
    weights: tuple[float, ...]
    init: Mapping[str, Params]
    key: jax.Array


Merge = Callable[[MergeInputs, Mapping[str, Any]], Params]


@dataclasses.dataclass(frozen=True)
class Method:
    """A merging method: label, statistic, grid and merge function.

    Attributes:
      label: the name in tables.
      statistic: a name of :data:`STATISTICS`, or None (data-free).
      grid: hyperparameter name → the :class:`Grids` field it sweeps.
      merge: ``merge(inputs, hyperparameters) -> body``.
      init: for MaTS, the method whose validation-chosen merge starts CG.
    """

    label: str
    statistic: str | None
    grid: Mapping[str, str]
    merge: Merge
    init: str | None = None


def _average(inputs: MergeInputs, hp: Mapping[str, Any]) -> Params:
    return mats_jax.average(inputs.models, weights=inputs.weights)


def _task_arithmetic(inputs: MergeInputs, hp: Mapping[str, Any]) -> Params:
    return mats_jax.task_arithmetic(
        inputs.base, inputs.models, scale=hp["scale"], weights=inputs.weights
    )


def _ties(inputs: MergeInputs, hp: Mapping[str, Any]) -> Params:
    return mats_jax.ties(
        inputs.base,
        inputs.models,
        density=hp["density"],
        scale=hp["scale"],
        weights=inputs.weights,
    )


def _dare_ties(inputs: MergeInputs, hp: Mapping[str, Any]) -> Params:
    return mats_jax.dare(
        inputs.base,
        inputs.models,
        drop_rate=hp["drop_rate"],
        key=inputs.key,
        scale=hp["scale"],
        weights=inputs.weights,
        sign_election=True,
    )


def _fisher(inputs: MergeInputs, hp: Mapping[str, Any]) -> Params:
    return mats_jax.fisher_merge(
        inputs.models, inputs.statistics["fisher_exact"], weights=inputs.weights
    ).params


def _regmean(inputs: MergeInputs, hp: Mapping[str, Any]) -> Params:
    return mats_jax.regmean(
        inputs.models,
        inputs.statistics["gram"],
        alpha=hp["alpha"],
        weights=inputs.weights,
    ).params


def _mats(statistic: str, init: str, preconditioner: bool) -> Merge:
    def merge(inputs: MergeInputs, hp: Mapping[str, Any]) -> Params:
        with warnings.catch_warnings():
            # Stopping at maxiter is the swept regulariser here, not a failure.
            warnings.simplefilter("ignore", mats_jax.ConvergenceWarning)
            return mats_jax.mats(
                inputs.models,
                inputs.statistics[statistic],
                init=inputs.init[init],
                weights=inputs.weights,
                maxiter=hp["cg_iterations"],
                tol=1e-6,
                preconditioner=preconditioner,
            ).params

    return merge


def _mats_method(
    label: str, statistic: str, init: str, preconditioner: bool = False
) -> Method:
    return Method(
        label,
        statistic,
        {"cg_iterations": "cg_iterations"},
        _mats(statistic, init, preconditioner),
        init=init,
    )


METHODS: dict[str, Method] = {
    "average": Method("average", None, {}, _average),
    "task_arithmetic": Method(
        "task arithmetic", None, {"scale": "scale"}, _task_arithmetic
    ),
    "ties": Method("TIES", None, {"density": "density", "scale": "ties_scale"}, _ties),
    "dare_ties": Method(
        "DARE-TIES", None, {"drop_rate": "drop_rate", "scale": "ties_scale"}, _dare_ties
    ),
    "fisher": Method("Fisher merging", "fisher_exact", {}, _fisher),
    "regmean": Method("RegMean", "gram", {"alpha": "alpha"}, _regmean),
    "mats_gram": _mats_method("MaTS (Gram, init TA)", "gram", "task_arithmetic"),
    "mats_kfac": _mats_method(
        "MaTS (K-FAC exact, init TA)", "kfac_exact", "task_arithmetic"
    ),
    "mats_kfac_ties": _mats_method(
        "MaTS (K-FAC exact, init TIES)", "kfac_exact", "ties"
    ),
    "mats_kfac_precond": _mats_method(
        "MaTS (K-FAC exact, init TA, preconditioned)",
        "kfac_exact",
        "task_arithmetic",
        preconditioner=True,
    ),
    "mats_kfac_ties_precond": _mats_method(
        "MaTS (K-FAC exact, init TIES, preconditioned)",
        "kfac_exact",
        "ties",
        preconditioner=True,
    ),
    "mats_kfac_kernels_only": _mats_method(
        "MaTS (K-FAC exact on kernels only, init TA)",
        "kfac_exact_kernels_only",
        "task_arithmetic",
    ),
    "mats_kfac_equalised": _mats_method(
        "MaTS (K-FAC exact, scales equalised across tasks, init TA)",
        "kfac_exact_equalised",
        "task_arithmetic",
    ),
    "mats_kfac_sampled": _mats_method(
        "MaTS (K-FAC sampled, init TA)", "kfac_sampled", "task_arithmetic"
    ),
    "mats_kfac_empirical": _mats_method(
        "MaTS (K-FAC empirical, init TA)", "kfac_empirical", "task_arithmetic"
    ),
}


def check_methods(names: Sequence[str]) -> list[str]:
    """The methods to run, in dependency order; unknown names raise ValueError.

    A MaTS variant brings in the method it is initialised from.
    """
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(
            f"unknown method(s) {', '.join(map(repr, unknown))}; known: {', '.join(METHODS)}"
        )
    wanted = set(names) | {METHODS[n].init for n in names if METHODS[n].init}
    return [n for n in METHODS if n in wanted]


def candidates(method: Method, grids: Grids) -> list[dict[str, Any]]:
    """Every hyperparameter combination of ``method``'s grid.

    Examples:
      >>> len(candidates(METHODS["ties"], Grids(density=(0.1, 0.2), ties_scale=(1.0,))))
      2
      >>> candidates(METHODS["average"], Grids())
      [{}]
    """
    names = list(method.grid)
    values = [getattr(grids, method.grid[n]) for n in names]
    return [
        dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)
    ]
