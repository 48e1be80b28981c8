"""What a merge method is: a name, a parameters record, its needs, a per-leaf merge.

A :class:`MergeMethod` is a value (a frozen dataclass), in the spirit of
mergekit's ``MergeMethod`` and optax's ``GradientTransformation``:

- ``name``: how the registry and recipes call it;
- ``Parameters``: a frozen dataclass that validates itself when built
  (:func:`~mats_jax.tree.register_record` makes it a pytree whose numbers are
  traced, so sweeping a hyperparameter does not recompile);
- :meth:`~MergeMethod.needs`: which inputs it takes (the base model,
  statistics of given types, a PRNG key);
- :meth:`~MergeMethod.whole_model_pass`: what it needs computed over the whole
  model before merging leaves (today TIES's magnitude threshold), as data the
  engines know how to compute (:class:`~mats_jax.select.MagnitudeQuantiles`);
- :meth:`~MergeMethod.merge`: the merge of any subset of leaves, a pure
  traced function of :class:`MergeInputs`, the parameters and the pass's
  result. No leaf's result depends on another leaf's inputs except through
  that pass, which is what lets the streaming engine merge one leaf at a time
  and get what the in-memory engine gets;
- optionally (:attr:`~MergeMethod.staged`), the merge as two stages,
  :meth:`~MergeMethod.begin` (everything that reads the inputs) and
  :meth:`~MergeMethod.finish` (the rest): an engine that owns the inputs runs
  them as two programs and frees the inputs in between (the data-dependent
  methods: their conjugate gradient needs neither the models nor the summed
  statistics' parts).

The engines (:mod:`mats_jax.engine`) validate inputs, run the pass, jit the
merge and place the result; they name no method.

Examples:
  >>> import jax.numpy as jnp
  >>> import mats_jax
  >>> ties = mats_jax.get_method("ties")
  >>> ties.parameters(density=0.5)
  TiesParameters(density=0.5, scale=1.0, trim='global', normalize=True)
  >>> ties.needs(ties.parameters(density=0.5))
  Needs(base=True, statistics=(), key=False, models=(1, None), weights=True)
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np

from mats_jax.checks import MergeInputError, is_traced
from mats_jax.select import MagnitudeQuantiles
from mats_jax.sharding import Placement
from mats_jax.solver.report import MergeResult
from mats_jax.stats.statistic import Statistic
from mats_jax.tree import is_per_model, model_value, register_record
from mats_jax.typing import Array, Params, StatTree

__all__ = [
    "MergeInputs",
    "MergeMethod",
    "MethodCall",
    "Needs",
    "check_model_inputs",
    "check_per_model",
    "model_value",
    "per_model_fields",
]


class Needs(NamedTuple):
    """The inputs a method takes besides the models, and how many models.

    Attributes:
      base: the pretrained parameters θ₀.
      statistics: the statistic types it accepts per leaf (empty: none).
      key: a PRNG key.
      models: the smallest and largest number of models it merges (largest
        None: no bound); the engines refuse another count before any work
        (:func:`check_model_inputs`).
      weights: it weighs the models by per-model weights. False (SLERP, whose
        interpolation factor is a parameter; Model Stock, whose ratio assumes
        the plain mean): the engines refuse weights that are not all equal,
        rather than ignore them.

    Examples:
      Combined needs (a method and the method it starts from) take both's
      inputs and the counts both accept:

      >>> Needs(base=True) | Needs(models=(2, 2), weights=False)
      Needs(base=True, statistics=(), key=False, models=(2, 2), weights=False)
    """

    base: bool = False
    statistics: tuple[type[Statistic], ...] = ()
    key: bool = False
    models: tuple[int, int | None] = (1, None)
    weights: bool = True

    def __or__(self, other: tuple[Any, ...]) -> Needs:
        assert isinstance(other, Needs)
        highs = [h for h in (self.models[1], other.models[1]) if h is not None]
        return Needs(
            self.base or other.base,
            self.statistics or other.statistics,
            self.key or other.key,
            (max(self.models[0], other.models[0]), min(highs) if highs else None),
            self.weights and other.weights,
        )


class MergeInputs(NamedTuple):
    """What a method merges: pytrees of one structure (any subset of a model's leaves).

    Attributes:
      models: the M fine-tuned parameter pytrees.
      base: the pretrained parameters, or None.
      statistics: M statistic pytrees, or None.
      weights: (M,) float32 weights, validated.
      key: a PRNG key, or None.
      leaf_ids: a pytree of the models' structure holding each leaf's uint32
        id (the CRC-32 of its path): methods that draw random numbers fold it
        into ``key``, so a leaf's draws do not depend on which other leaves
        are merged with it.
    """

    models: Sequence[Params]
    base: Params | None = None
    statistics: Sequence[StatTree] | None = None
    weights: Array | None = None
    key: Array | None = None
    leaf_ids: Params | None = None


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A merge method; see the module docstring. Subclasses implement :meth:`merge`.

    Examples:
      A method of one's own: the entrywise maximum of the models, registered
      nowhere, run by the in-memory engine like any other.

      >>> import dataclasses, jax, jax.numpy as jnp
      >>> from mats_jax import LeafReport, MergeResult
      >>> from mats_jax.engine import run_in_memory
      >>> from mats_jax.tree import register_record
      >>> @register_record
      ... @dataclasses.dataclass(frozen=True)
      ... class NoParameters:
      ...     pass
      >>> class Maximum(MergeMethod):
      ...     def merge(self, inputs, params, prepared, placement):
      ...         merged = jax.tree.map(lambda *xs: jnp.max(jnp.stack(xs), 0), *inputs.models)
      ...         return MergeResult(merged, jax.tree.map(lambda _: LeafReport("maximum"), merged))
      >>> maximum = Maximum("maximum", NoParameters)
      >>> models = [{"w": jnp.array([1.0, -2.0])}, {"w": jnp.array([0.0, 3.0])}]
      >>> run_in_memory(maximum, maximum.parameters(), models=models).params["w"]
      Array([1., 3.], dtype=float32)

    Attributes:
      name: the registry's and recipes' name for it.
      Parameters: its parameters record type.
      statistics_name: what its statistics are called in messages.
      elementwise: each entry of a merged leaf depends only on the same entry
        of the inputs (and the whole-model pass), so an engine may merge a
        large leaf in pieces.
      leaf_sized_temporaries: its merge of a leaf holds temporaries several
        times the leaf's size (TIES: each model's trimmed task vector and its
        signs), so when the streaming engine reads a large leaf whole (inputs
        that cannot be read in blocks) it merges it in row blocks. Without
        them (a weighted sum, which XLA fuses into one pass over the entries)
        a leaf read whole is merged at once: pieces would only add
        allocations. From safetensors inputs every elementwise method's
        leaves are read and merged block by block either way.
    """

    name: str
    Parameters: type
    statistics_name: str = "statistics"
    elementwise: ClassVar[bool] = False
    leaf_sized_temporaries: ClassVar[bool] = False
    data_dependent: ClassVar[bool] = False
    """It merges with per-task statistics (whatever its parameters)."""
    staged: ClassVar[bool] = False
    """Its merge is :meth:`finish` of :meth:`begin`, and what ``begin``
    returns holds less than its inputs (see the module docstring)."""

    def parameters(self, **values: Any) -> Any:
        """The validated parameters record; unknown names get a suggestion.

        Raises:
          MergeInputError: an unknown parameter, or a value out of range,
            naming the parameter.
        """
        known = [f.name for f in dataclasses.fields(self.Parameters)]
        for name in values:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                raise MergeInputError(
                    f"{self.name} has no parameter {name!r}"
                    + (f"; did you mean {close[0]!r}?" if close else "")
                    + f" Its parameters: {', '.join(known) or '(none)'}"
                )
        for name in per_model_fields(self.Parameters):
            # One value per model, as a tuple: records are frozen and hashable.
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        try:
            return self.Parameters(**values)
        except TypeError as e:  # a required parameter is missing
            raise MergeInputError(f"{self.name}: {e}") from None

    def needs(self, params: Any) -> Needs:
        """The inputs it takes with these parameters."""
        return Needs()

    def check(self, inputs: MergeInputs, params: Any, paths: Sequence[str]) -> None:
        """Checks that need the inputs and the parameters together (after the
        engine's generic checks); ``paths`` are the leaves' paths."""

    def whole_model_pass(self, params: Any) -> MagnitudeQuantiles | None:
        """What must be computed over all leaves before merging any (None: nothing)."""
        return None

    def merge(
        self,
        inputs: MergeInputs,
        params: Any,
        prepared: Any,
        placement: Placement,
    ) -> MergeResult:
        """The merged leaves and their reports (traced).

        Args:
          inputs: the leaves to merge.
          params: the parameters record.
          prepared: the whole-model pass's result for these leaves (a pytree of
            the models' structure holding a (M,) array per leaf), or None.
          placement: the inputs' mesh, for methods that split work over it.
        """
        raise NotImplementedError

    def begin(
        self,
        inputs: MergeInputs,
        params: Any,
        prepared: Any,
        placement: Placement,
    ) -> Any:
        """A staged method's first stage (traced): a pytree from which
        :meth:`finish` completes the merge without the inputs. Takes
        :meth:`merge`'s arguments."""
        raise NotImplementedError(f"{self.name} is not staged")

    def finish(self, begun: Any, params: Any, placement: Placement) -> MergeResult:
        """A staged method's second stage (traced): the merge from what
        :meth:`begin` returned."""
        raise NotImplementedError(f"{self.name} is not staged")

    def diagnose(
        self, params: Any, report: Any, paths: Sequence[str]
    ) -> list[tuple[type[Warning], str]]:
        """Warnings about a finished merge (e.g. blocks CG did not converge)."""
        return []


def per_model_fields(parameters: Any) -> tuple[str, ...]:
    """The fields of a parameters record (or its type) that may hold one value
    per model: the record's ``per_model_fields`` (mergekit's per-model
    ``density``, ``weight``-like parameters)."""
    return tuple(getattr(parameters, "per_model_fields", ()))


def check_per_model(method_name: str, params: Any, num_models: int) -> None:
    """Checks that every per-model parameter given per model has one value per model.

    Raises:
      MergeInputError: naming the parameter, the counts and the fix.

    Examples:
      >>> import mats_jax
      >>> ties = mats_jax.get_method("ties")
      >>> check_per_model("ties", ties.parameters(density=[0.2, 0.5]), 3)
      Traceback (most recent call last):
      ...
      mats_jax.checks.MergeInputError: ties: density has 2 values, but 3 models are merged: give one number for all models or one per model
    """
    for name in per_model_fields(params):
        value = getattr(params, name)
        if is_per_model(value) and len(value) != num_models:
            raise MergeInputError(
                f"{method_name}: {name} has {len(value)} values, but "
                f"{num_models} models are merged: give one number for all "
                "models or one per model"
            )


def check_model_inputs(
    method_name: str, needs: Needs, num_models: int, weights: Any = None
) -> None:
    """Refuses a number of models outside ``needs.models`` and, for a method
    that takes no weights (``needs.weights`` False), weights that are not all
    equal (traced weights pass: their values are unknown).

    Raises:
      MergeInputError: naming the method, what it takes and what it got.

    Examples:
      >>> check_model_inputs("slerp", Needs(models=(2, 2)), 3)
      Traceback (most recent call last):
      ...
      mats_jax.checks.MergeInputError: slerp merges exactly 2 models, got 3
      >>> check_model_inputs("slerp", Needs(models=(2, 2), weights=False), 2, [1.0, 0.5])
      Traceback (most recent call last):
      ...
      mats_jax.checks.MergeInputError: slerp does not weigh its models: give equal weights (or none), got [1.0, 0.5]
    """
    low, high = needs.models
    if num_models < low or (high is not None and num_models > high):
        if high == low:
            takes = f"exactly {low}"
        elif high is None:
            takes = f"at least {low}"
        else:
            takes = f"{low} to {high}"
        raise MergeInputError(
            f"{method_name} merges {takes} model{'s' if high != 1 else ''}, "
            f"got {num_models}"
        )
    if needs.weights or weights is None or is_traced(weights):
        return
    values = np.asarray(weights, np.float64).reshape(-1)
    if np.any(values != values[0]):
        raise MergeInputError(
            f"{method_name} does not weigh its models: give equal weights (or "
            f"none), got {values.tolist()}"
        )


@register_record
@dataclasses.dataclass(frozen=True)
class MethodCall:
    """One method with its parameters, as another method's parameter (MaTS's ``init``).

    Examples:
      >>> import mats_jax
      >>> method = mats_jax.get_method("task_arithmetic")
      >>> call = MethodCall(method, method.parameters(scale=0.3))
      >>> call.method.name, call.parameters.scale
      ('task_arithmetic', 0.3)
    """

    static_fields: ClassVar[tuple[str, ...]] = ("method",)
    method: MergeMethod
    parameters: Any
