"""The registry's methods as test cases: one table every registry-wide test draws from.

A case is a registered method (by name) with example parameters. Each
registered method is a case of its own (with the parameters below, or its
defaults); variants (closed-form solves, per-leaf trimming, …) are extra
cases of the same methods. The statistics a case merges with follow from the
method's needs: the first statistic type it accepts picks the builder
(``Diagonal`` → Fisher-style, ``Gram`` → RegMean-style, any → mixed K-FAC,
Diagonal and Dense). ``test_every_registered_method_is_a_case`` fails when a
new method needs example parameters here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

import mats_jax as mj


@dataclasses.dataclass(frozen=True)
class Case:
    """A registered method with parameters."""

    method: str
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    statistics: type | None = (
        None  # the statistic type to use, if not the first accepted
    )

    @property
    def merge_method(self) -> mj.MergeMethod:
        return mj.get_method(self.method)

    @property
    def needs(self) -> Any:
        method = self.merge_method
        return method.needs(method.parameters(**self.parameters))

    @property
    def statistic_type(self) -> type | None:
        """The statistic type the case merges with (None: data-free): the
        case's own, or the first the method accepts."""
        allowed = self.needs.statistics
        if not allowed:
            return None
        return self.statistics or allowed[0]

    def __call__(
        self,
        base: Any,
        models: Any,
        statistics: Any = None,
        *,
        weights: Any = None,
        key: Any = None,
        **parameters: Any,
    ) -> mj.MergeResult:
        """``mats_jax.merge_pytrees`` with the case's parameters (overridable)."""
        needs = self.needs
        return mj.merge_pytrees(
            self.method,
            models=models,
            base=base if needs.base else None,
            statistics=statistics,
            weights=weights,
            key=(key if key is not None else jax.random.key(0)) if needs.key else None,
            **{**self.parameters, **parameters},
        )


EXAMPLES: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"scale": 0.5},
    "ties": {"density": 0.5},
    "dare": {"drop_rate": 0.3},
    "slerp": {"t": 0.3},
    "breadcrumbs": {"density": 0.5, "gamma": 0.1},
    "della": {"density": 0.6, "epsilon": 0.2},
    "tsv_m": {"scale": 0.9},
    "iso_c": {"scale": 0.9},
    "iso_cts": {"scale": 0.9, "common_fraction": 0.5},
}
"""Parameters for the registered methods whose defaults do not suffice."""

CASES: dict[str, Case] = {
    **{name: Case(name, EXAMPLES.get(name, {})) for name in mj.METHODS},
    "ties_per_leaf": Case("ties", {"density": 0.4, "trim": "per_leaf"}),
    "dare_ties": Case("dare", {"drop_rate": 0.3, "sign_election": True}),
    "solve_closed_form": Case("mats", {"method": "closed_form"}, mj.Gram),
    "mats_shaped_statistics": Case(
        "mats", {"off_diagonal_scale": 0.7, "equalise_scales": True}, mj.Gram
    ),
    "multislerp_about_base": Case("multislerp", {"about_base": True}),
    "model_stock_filter_wise": Case("model_stock", {"filter_wise": True}),
    "breadcrumbs_ties": Case(
        "breadcrumbs", {"density": 0.5, "gamma": 0.1, "sign_election": True}
    ),
    "della_linear": Case(
        "della", {"density": 0.6, "epsilon": 0.2, "sign_election": False}
    ),
}
"""Every registered method, then variants."""
