"""The merging methods the experiments run: a registered method, its statistic and its grid.

A :class:`Method` names a method of the library's registry
(:data:`mats_jax.METHODS`) with fixed parameters, the per-task statistic it
merges with (none, the diagonal Fisher, Gram, or K-FAC of a Fisher kind), the
hyperparameters it sweeps on validation data, and, for MaTS, the method whose
chosen merge starts CG. One merge function serves every method
(:meth:`Method.merge`, through :func:`mats_jax.merge_pytrees`). Merges see only
the shared body (heads excluded); ``weights`` are the per-task weights (all 1
for multitask merging; (1, w) for intermediate-task merging, target first).

MaTS variants start CG from the task arithmetic or TIES merge whose
hyperparameters validation chose for that setting (``init``), and sweep the
CG iteration count, which regularises (DESIGN.md §3).
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax

import mats_jax
from mats_jax.typing import Params, StatTree

__all__ = [
    "ADAPTER_METHODS",
    "DERIVED",
    "METHODS",
    "STATISTICS",
    "Grids",
    "MergeInputs",
    "Method",
    "candidates",
    "check_methods",
    "kfac_estimator",
]

STATISTICS = (
    "fisher_exact",
    "gram",
    "kfac_exact",
    "kfac_sampled",
    "kfac_sampled_4",
    "kfac_empirical",
)
"""Statistic names estimated from data: what each data-dependent method needs per task."""


def kfac_estimator(name: str) -> dict[str, Any]:
    """The :func:`mats_jax.kfac` arguments of a K-FAC statistic's name.

    ``kfac_<kind>`` is K-FAC of that Fisher kind; ``kfac_sampled_<k>`` draws
    ``k`` labels per example from the model's own distribution.

    Examples:
      >>> kfac_estimator("kfac_exact"), kfac_estimator("kfac_sampled_4")
      ({'kind': 'exact', 'num_samples': 1}, {'kind': 'sampled', 'num_samples': 4})
    """
    kind, _, samples = name.removeprefix("kfac_").partition("_")
    return {"kind": kind, "num_samples": int(samples) if samples else 1}


DERIVED = {
    "kfac_exact_kernels_only": "kfac_exact",
}
"""Statistics computed from an estimated one (:mod:`~mats_experiment.derived`)."""


@dataclasses.dataclass(frozen=True)
class Grids:
    """The validation grids of every hyperparameter."""

    scale: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
    ties_scale: tuple[float, ...] = (0.6, 0.8, 1.0, 1.3)
    density: tuple[float, ...] = (0.1, 0.2, 0.4)
    drop_rate: tuple[float, ...] = (0.5, 0.7, 0.9)
    alpha: tuple[float, ...] = (0.5, 0.7, 0.9, 1.0)
    cg_iterations: tuple[int, ...] = (10, 30, 100, 300)
    gamma: tuple[float, ...] = (0.01, 0.05)
    della_density: tuple[float, ...] = (0.3, 0.5, 0.7)
    epsilon: tuple[float, ...] = (0.05, 0.15)
    svd_scale: tuple[float, ...] = (0.4, 0.7, 1.0, 1.3, 1.6)
    off_diagonal_scale: tuple[float, ...] = (0.5, 0.7, 0.9, 1.0)
    equalise_scales: tuple[bool, ...] = (False, True)
    damping: tuple[float, ...] = (0.0, 1e-3, 1e-2, 1e-1)


@dataclasses.dataclass(frozen=True)
class MergeInputs:
    """What a merge candidate is computed from."""

    base: Params
    models: Sequence[Params]
    statistics: Mapping[str, Sequence[StatTree]]
    weights: tuple[float, ...]
    init: Mapping[str, Params]
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class Method:
    """A merging method of the experiments: a registered method, configured.

    Attributes:
      label: the name in tables.
      method: the registry's name (:data:`mats_jax.METHODS`).
      statistic: a name of :data:`STATISTICS` (or :data:`DERIVED`), or None
        (data-free).
      grid: hyperparameter name → the :class:`Grids` field it sweeps.
      fixed: the method's parameters that are not swept.
      rename: hyperparameter name → the method's parameter it sets, where
        they differ (``cg_iterations`` sets MaTS's ``maxiter``).
      init: for MaTS, the method whose validation-chosen merge starts CG.
    """

    label: str
    method: str
    statistic: str | None
    grid: Mapping[str, str]
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    rename: Mapping[str, str] = dataclasses.field(default_factory=dict)
    init: str | None = None

    def parameters(self, hp: Mapping[str, Any]) -> dict[str, Any]:
        """The registered method's parameters for hyperparameters ``hp`` (no init)."""
        parameters = dict(self.fixed)
        parameters.update({self.rename.get(k, k): v for k, v in hp.items()})
        return parameters

    def takes_weights(self, hp: Mapping[str, Any]) -> bool:
        """Whether it weighs its models (Model Stock and SLERP do not).

        Examples:
          >>> METHODS["model_stock"].takes_weights({}), METHODS["ties"].takes_weights(
          ...     {"density": 0.2, "scale": 1.0})
          (False, True)
        """
        registered = mats_jax.METHODS[self.method]
        return registered.needs(registered.parameters(**self.parameters(hp))).weights

    def merge(self, inputs: MergeInputs, hp: Mapping[str, Any]) -> Params:
        """The merged body for hyperparameters ``hp``."""
        parameters = self.parameters(hp)
        if self.init is not None:
            parameters["init"] = inputs.init[self.init]
        with warnings.catch_warnings():
            # Stopping at maxiter is the swept regulariser here, not a failure.
            warnings.simplefilter("ignore", mats_jax.ConvergenceWarning)
            result = mats_jax.merge_pytrees(
                self.method,
                models=inputs.models,
                base=inputs.base,
                statistics=inputs.statistics[self.statistic]
                if self.statistic
                else None,
                weights=inputs.weights,
                key=inputs.key,
                **parameters,
            )
        return result.params


def _mats_method(
    label: str,
    statistic: str,
    init: str,
    preconditioner: bool = False,
    options: Mapping[str, Any] | None = None,
    swept: Sequence[str] = (),
) -> Method:
    """MaTS from ``init``, its CG iterations swept, with fixed ``options``
    (:class:`mats_jax.merge.mats.MatsParameters`) and the ``swept`` ones too."""
    return Method(
        label,
        "mats",
        statistic,
        {"cg_iterations": "cg_iterations", **{name: name for name in swept}},
        fixed={"tol": 1e-6, "preconditioner": preconditioner, **(options or {})},
        rename={"cg_iterations": "maxiter"},
        init=init,
    )


METHODS: dict[str, Method] = {
    "average": Method("average", "average", None, {}),
    "task_arithmetic": Method(
        "task arithmetic", "task_arithmetic", None, {"scale": "scale"}
    ),
    "ties": Method("TIES", "ties", None, {"density": "density", "scale": "ties_scale"}),
    "dare_ties": Method(
        "DARE-TIES",
        "dare",
        None,
        {"drop_rate": "drop_rate", "scale": "ties_scale"},
        fixed={"sign_election": True},
    ),
    "breadcrumbs": Method(
        "Breadcrumbs",
        "breadcrumbs",
        None,
        {"density": "density", "gamma": "gamma", "scale": "ties_scale"},
    ),
    "della": Method(
        "DELLA",
        "della",
        None,
        {"density": "della_density", "epsilon": "epsilon", "scale": "ties_scale"},
    ),
    # multislerp with two models and weights (1, w) is SLERP at t = w / (1 + w):
    # it stands for SLERP too, which takes exactly two models.
    "multislerp": Method("multi-SLERP", "multislerp", None, {}),
    "model_stock": Method("Model Stock", "model_stock", None, {}),
    "tsv_m": Method("TSV-M", "tsv_m", None, {"scale": "svd_scale"}),
    "iso_c": Method("ISO-C", "iso_c", None, {"scale": "svd_scale"}),
    "iso_cts": Method("ISO-CTS", "iso_cts", None, {"scale": "svd_scale"}),
    "fisher": Method("Fisher merging", "fisher_merge", "fisher_exact", {}),
    "regmean": Method("RegMean", "regmean", "gram", {"alpha": "alpha"}),
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
        "kfac_exact",
        "task_arithmetic",
        options={"equalise_scales": True},
    ),
    "mats_kfac_shrunk": _mats_method(
        "MaTS (K-FAC exact, factors shrunk off the diagonal, init TA)",
        "kfac_exact",
        "task_arithmetic",
        swept=("off_diagonal_scale",),
    ),
    "mats_kfac_options": _mats_method(
        "MaTS (K-FAC exact, init TA, shrinkage and equalising chosen on validation)",
        "kfac_exact",
        "task_arithmetic",
        swept=("off_diagonal_scale", "equalise_scales"),
    ),
    "mats_kfac_damped": _mats_method(
        "MaTS (K-FAC exact, relative damping chosen on validation, init TA)",
        "kfac_exact",
        "task_arithmetic",
        swept=("damping",),
    ),
    "mats_kfac_sampled": _mats_method(
        "MaTS (K-FAC sampled, init TA)", "kfac_sampled", "task_arithmetic"
    ),
    "mats_kfac_sampled_4": _mats_method(
        "MaTS (K-FAC sampled, 4 labels per example, init TA)",
        "kfac_sampled_4",
        "task_arithmetic",
    ),
    "mats_kfac_empirical": _mats_method(
        "MaTS (K-FAC empirical, init TA)", "kfac_empirical", "task_arithmetic"
    ),
}


ADAPTER_METHODS: dict[str, Method] = {
    "task_arithmetic": METHODS["task_arithmetic"],
    "ties": METHODS["ties"],
    "block_diagonal_fisher": Method(
        "Fisher merging (diagonal of the block Fisher)",
        "fisher_merge",
        "block_diagonal",
        {},
    ),
    "mats_block_fisher": _mats_method(
        "MaTS (block Fisher, init TA)", "block_fisher", "task_arithmetic"
    ),
}
"""The methods that merge adapter vectors (IA³'s l, about 1) where they were
trained, with each vector's whole Fisher block (``block_fisher``) or its
diagonal (``block_diagonal``)."""


def check_methods(
    names: Sequence[str], registry: Mapping[str, Method] = METHODS
) -> list[str]:
    """The methods to run, in dependency order; unknown names raise ValueError.

    A MaTS variant brings in the method it is initialised from.
    """
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(
            f"unknown method(s) {', '.join(map(repr, unknown))}; known: {', '.join(registry)}"
        )
    wanted = set(names) | {registry[n].init for n in names if registry[n].init}
    return [n for n in registry if n in wanted]


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
