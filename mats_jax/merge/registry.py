"""Every merge method once: the table the public functions, recipes, the command
line, the experiments and the tests read.

Examples:
  >>> import jax.numpy as jnp
  >>> import mats_jax
  >>> sorted(mats_jax.METHODS)
  ['average', 'breadcrumbs', 'dare', 'della', 'fisher_merge', 'iso_c', 'iso_cts', 'mats', 'model_stock', 'multislerp', 'regmean', 'slerp', 'task_arithmetic', 'ties', 'tsv_m']
  >>> mats_jax.merge_pytrees("average", models=[{"w": jnp.ones(2)}, {"w": jnp.zeros(2)}]).params
  {'w': Array([0.5, 0.5], dtype=float32)}
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from mats_jax.checks import MergeInputError
from mats_jax.engine import lower_in_memory, run_in_memory
from mats_jax.merge.breadcrumbs import BREADCRUMBS
from mats_jax.merge.della import DELLA
from mats_jax.merge.fisher import FISHER_MERGE
from mats_jax.merge.linear import AVERAGE, TASK_ARITHMETIC
from mats_jax.merge.mats import MATS
from mats_jax.merge.model_stock import MODEL_STOCK
from mats_jax.merge.regmean import REGMEAN
from mats_jax.merge.slerp import MULTISLERP, SLERP
from mats_jax.merge.sparse import DARE, TIES
from mats_jax.merge.svd import ISO_C, ISO_CTS, TSV_M
from mats_jax.method import MergeMethod
from mats_jax.solver.report import MergeResult
from mats_jax.typing import Array, Params, StatTree

__all__ = ["METHODS", "get_method", "lower_merge", "merge_pytrees"]

METHODS: Mapping[str, MergeMethod] = types.MappingProxyType(
    {
        m.name: m
        for m in (
            AVERAGE,
            TASK_ARITHMETIC,
            TIES,
            DARE,
            FISHER_MERGE,
            REGMEAN,
            MATS,
            SLERP,
            MULTISLERP,
            MODEL_STOCK,
            BREADCRUMBS,
            DELLA,
            TSV_M,
            ISO_C,
            ISO_CTS,
        )
    }
)
"""Every registered method by name (read-only)."""


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``.

    Raises:
      MergeInputError: for an unknown name, with a suggestion.

    Examples:
      >>> get_method("ties").name
      'ties'
      >>> get_method("tie")
      Traceback (most recent call last):
      ...
      mats_jax.checks.MergeInputError: unknown method 'tie'; did you mean 'ties'? Methods: average, task_arithmetic, ties, dare, fisher_merge, regmean, mats, slerp, multislerp, model_stock, breadcrumbs, della, tsv_m, iso_c, iso_cts
    """
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), METHODS, n=1)
        raise MergeInputError(
            f"unknown method {name!r}"
            + (f"; did you mean {close[0]!r}?" if close else "")
            + f" Methods: {', '.join(METHODS)}"
        )
    return METHODS[name]


def merge_pytrees(
    method: str | MergeMethod,
    /,
    *,
    models: Sequence[Params],
    base: Params | None = None,
    statistics: Sequence[StatTree] | None = None,
    weights: Any = None,
    key: Array | None = None,
    **parameters: Any,
) -> MergeResult:
    """Merges parameter pytrees in memory with any method, by name or value.

    The one calling convention of every method: ``parameters`` are its
    record's fields (``method.Parameters``; MaTS's ``method="closed_form"``
    too: ``method`` here is positional); base, statistics and key are taken
    by the methods that need them.

    Values are checked before any work when concrete; traced ones (under an
    outer ``jax.jit``: NaN or Inf in models, weights or statistics,
    hyperparameters out of range, negative weights) are checked only when
    the call is wrapped in ``jax.experimental.checkify.checkify``, and pass
    unchecked otherwise (:func:`~mats_jax.checks.check_traced`).

    Returns:
      A :class:`~mats_jax.MergeResult`: parameters and a report per leaf.

    Examples:
      >>> import jax.numpy as jnp
      >>> base = {"w": jnp.zeros(2)}
      >>> models = [{"w": jnp.array([1.0, -2.0])}]
      >>> merge_pytrees("ties", base=base, models=models, density=0.5).params["w"]
      Array([ 0., -2.], dtype=float32)
    """
    resolved = get_method(method) if isinstance(method, str) else method
    return run_in_memory(
        resolved,
        resolved.parameters(**parameters),
        models=models,
        base=base,
        statistics=statistics,
        weights=weights,
        key=key,
    )


def lower_merge(method: str | MergeMethod, /, **arguments: Any) -> jax.stages.Lowered:
    """The program :func:`merge_pytrees` would run, lowered, without running it.

    Takes :func:`merge_pytrees`'s arguments. Compile it to read what a merge
    needs before starting it, e.g. the memory per device of a sharded merge,
    or to check its collectives.

    Examples:
      >>> import jax.numpy as jnp
      >>> lowered = lower_merge("ties", base={"w": jnp.zeros(4)},
      ...                       models=[{"w": jnp.ones(4)}], density=0.5)
      >>> lowered.compile().memory_analysis().argument_size_in_bytes > 0
      True
    """
    resolved = get_method(method) if isinstance(method, str) else method
    inputs = {k: arguments.pop(k) for k in _INPUTS if k in arguments}
    return lower_in_memory(resolved, resolved.parameters(**arguments), **inputs)


_INPUTS = ("models", "base", "statistics", "weights", "key")
