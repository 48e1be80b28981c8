"""The data-dependent merges as one shape: transform the statistics, then the one solver.

In the MaTS view every data-dependent method minimises
``Σ_m w_m ‖θ − θ_m‖²_{C_m}`` for its own C_m (:mod:`mats_jax.solver`). A
:class:`SubspaceMerge` is that solve with a statistics transform in front, as
optax builds ``adam`` from ``scale_by_adam`` and a learning rate: Fisher
merging floors its diagonal Fisher, RegMean shrinks its Gram matrices toward
their diagonals, MaTS takes the statistics as they are. Each gets the same
checks, fallback rules, initialisations, mesh split and report.

Parameters records of these methods share :func:`check_fallback` and
:func:`check_init`: a fallback is ``"average"``, ``"init"``, ``"base"`` (with a
base model) or a pytree; an initialisation is None (the weighted average),
``"average"``, ``"base"``, another method (:class:`~mats_jax.method.MethodCall`,
run on the same inputs first) or a pytree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax

from mats_jax.checks import MergeInputError
from mats_jax.method import MergeInputs, MergeMethod, MethodCall, Needs
from mats_jax.select import MagnitudeQuantiles
from mats_jax.sharding import Placement
from mats_jax.solver.options import SolverOptions
from mats_jax.solver.report import ConvergenceWarning, MergeResult, unconverged_blocks
from mats_jax.solver.solve import (
    System,
    check_solve_inputs,
    form_system,
    solve_system,
)
from mats_jax.stats.statistic import Statistic
from mats_jax.typing import Params

__all__ = ["SubspaceMerge", "check_fallback", "check_init", "each_statistic"]

Transform = Callable[[Sequence[Statistic | None], Any], list[Statistic | None]]
"""``transform(statistics, params)``: the M tasks' statistics of one leaf,
transformed (a rescaling across tasks sees them all)."""


def each_statistic(
    fn: Callable[[Statistic | None, Any], Statistic | None],
) -> Transform:
    """The transform that applies ``fn(statistic, params)`` to each task's statistic."""

    def transform(stats: Sequence[Statistic | None], params: Any) -> list[Any]:
        return [fn(s, params) for s in stats]

    transform.__name__ = transform.__qualname__ = getattr(fn, "__name__", "transform")
    return transform


def check_fallback(fallback: Any) -> None:
    """A fallback rule: a rule's name or a parameter pytree."""
    if isinstance(fallback, str) and fallback not in ("average", "init", "base"):
        raise MergeInputError(
            "fallback must be 'average', 'init' or a parameter pytree (or 'base' "
            f"with a base model), got {fallback!r}"
        )


def check_init(init: Any) -> None:
    """An initialisation: None, a rule's name, another method or a parameter pytree."""
    if isinstance(init, str) and init not in ("average", "base"):
        raise MergeInputError(
            "init must be 'average', 'base', another method or a parameter pytree, "
            f"got {init!r}"
        )


def _named(value: Any, name: str) -> bool:
    return isinstance(value, str) and value == name


def _is_tree(value: Any) -> bool:
    return value is not None and not isinstance(value, str | MethodCall)


@dataclasses.dataclass(frozen=True)
class SubspaceMerge(MergeMethod):
    """A solve of ``(Σ_m w_m T(C_m)) θ = Σ_m w_m T(C_m) θ_m`` for a transform T.

    Attributes:
      allowed: the statistic types it accepts.
      transform: ``transform(statistics, params)`` on the M tasks'
        statistics of each leaf (:func:`each_statistic` lifts a transform
        of one statistic), applied after validation (so a NaN, negative or
        misshapen statistic is reported, not transformed away); None: the
        identity.

    The parameters record provides ``solver_options()``, ``init`` (or not:
    the weighted average) and ``fallback``.
    """

    allowed: tuple[type[Statistic], ...] = (Statistic,)
    transform: Transform | None = None
    data_dependent: ClassVar[bool] = True
    staged: ClassVar[bool] = True

    def needs(self, params: Any) -> Needs:
        own = Needs(
            base=_named(getattr(params, "init", None), "base")
            or _named(params.fallback, "base"),
            statistics=self.allowed,
        )
        init = getattr(params, "init", None)
        if isinstance(init, MethodCall):
            return own | init.method.needs(init.parameters)
        return own

    def whole_model_pass(self, params: Any) -> MagnitudeQuantiles | None:
        init = getattr(params, "init", None)
        if isinstance(init, MethodCall):
            return init.method.whole_model_pass(init.parameters)
        return None

    def check(self, inputs: MergeInputs, params: Any, paths: Sequence[str]) -> None:
        init = getattr(params, "init", None)
        if isinstance(init, MethodCall):
            init.method.check(inputs, init.parameters, paths)
        check_solve_inputs(
            self._per_task(inputs, params, transformed=False),
            paths,
            inputs.models,
            params.solver_options(),
            init=init if _is_tree(init) else None,
            fallback=inputs.base
            if _named(params.fallback, "base")
            else params.fallback,
            name=self.statistics_name,
        )

    def _per_task(
        self, inputs: MergeInputs, params: Any, transformed: bool = True
    ) -> list[list[Statistic | None]]:
        treedef: Any = jax.tree.structure(inputs.models[0])
        assert inputs.statistics is not None
        per_task = [
            treedef.flatten_up_to(s) for s in inputs.statistics
        ]  # checked by the engine
        if transformed and self.transform is not None and per_task[0]:
            transform = self.transform
            per_leaf = [
                transform(list(leaf), params) for leaf in zip(*per_task, strict=True)
            ]
            per_task = [list(task) for task in zip(*per_leaf, strict=True)]
        return per_task

    def _init(
        self, inputs: MergeInputs, params: Any, prepared: Any, placement: Placement
    ) -> Params | None:
        init = getattr(params, "init", None)
        if init is None or _named(init, "average"):
            return None  # the solver's weighted average
        if _named(init, "base"):
            return inputs.base
        if isinstance(init, MethodCall):
            return init.method.merge(
                inputs, init.parameters, prepared, placement
            ).params
        return init

    def merge(
        self, inputs: MergeInputs, params: Any, prepared: Any, placement: Placement
    ) -> MergeResult:
        return self.finish(
            self.begin(inputs, params, prepared, placement), params, placement
        )

    def begin(
        self, inputs: MergeInputs, params: Any, prepared: Any, placement: Placement
    ) -> System:
        """The solve's first stage (:func:`~mats_jax.solver.solve.form_system`):
        the statistics transformed, the initialisation, every leaf's system."""
        assert inputs.weights is not None
        return form_system(
            inputs.models,
            self._per_task(inputs, params),
            inputs.weights,
            params.solver_options(),
            init=self._init(inputs, params, prepared, placement),
            fallback=inputs.base
            if _named(params.fallback, "base")
            else params.fallback,
            placement=placement,
        )

    def finish(self, begun: Any, params: Any, placement: Placement) -> MergeResult:
        """The solve's second stage (:func:`~mats_jax.solver.solve.solve_system`)."""
        merged, report = solve_system(begun, params.solver_options(), placement)
        return MergeResult(merged, report)

    def diagnose(
        self, params: Any, report: Any, paths: Sequence[str]
    ) -> list[tuple[type[Warning], str]]:
        options: SolverOptions = params.solver_options()
        tol = options.tol
        # tol = 0 asks for exactly maxiter steps (as the paper runs), and
        # maxiter = 0 for none (the initialisation itself): no warning.
        if options.method != "cg" or not (isinstance(tol, jax.core.Tracer) or tol > 0):
            return []
        if not isinstance(options.maxiter, jax.core.Tracer) and options.maxiter == 0:
            return []
        short = unconverged_blocks(report, paths)
        if not short:
            return []
        return [
            (
                ConvergenceWarning,
                f"CG stopped before its tolerance on {len(short)} block(s): "
                + "; ".join(short[:10])
                + (" …" if len(short) > 10 else ""),
            )
        ]
