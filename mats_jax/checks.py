"""Validation of merge inputs, done before any work, with errors that name the leaf.

Every public merge function calls these first. Shape, dtype and structure
checks also run under an outer ``jax.jit`` (they only need abstract values).
Checks of values (NaN/Inf, signs, ranges) raise at once for concrete values;
for traced values (arguments of an outer ``jax.jit``) they are staged into
the computation with :func:`jax.experimental.checkify.debug_check`: free and
silent under plain ``jit``, raised when the caller wraps the function with
``checkify.checkify`` (see :func:`check_traced`).
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from mats_jax.stats.statistic import NONNEGATIVE, NONNEGATIVE_DIAGONAL, Statistic
from mats_jax.tree import path_str
from mats_jax.typing import Array, Params, StatTree

__all__ = [
    "FallbackWarning",
    "MergeInputError",
    "check_flag",
    "check_fraction",
    "check_key",
    "check_like",
    "check_models",
    "check_number",
    "check_statistics",
    "check_traced",
    "check_weights",
    "is_traced",
    "warn",
]


class MergeInputError(ValueError):
    """Bad input to a merge: the message names the leaf path and what was expected."""


class FallbackWarning(UserWarning):
    """Leaves of a data-dependent merge that have no statistic in any model, so
    the method's fallback (e.g. averaging) merges them; the message lists them."""


def _flatten(tree: Params) -> tuple[list[tuple[str, Any]], Any]:
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), leaf) for p, leaf in with_path], treedef


def is_traced(x: Any) -> bool:
    """Whether ``x`` is a tracer (its values unknown until run: checks of
    values apply to concrete inputs only)."""
    return isinstance(x, jax.core.Tracer)


def _structure_difference(reference: Params, other: Params) -> str:
    ref_paths = {p for p, _ in _flatten(reference)[0]}
    other_paths = {p for p, _ in _flatten(other)[0]}
    missing = sorted(ref_paths - other_paths)
    extra = sorted(other_paths - ref_paths)
    parts = []
    if missing:
        parts.append("missing leaves " + ", ".join(repr(p) for p in missing[:5]))
    if extra:
        parts.append("unexpected leaves " + ", ".join(repr(p) for p in extra[:5]))
    return "; ".join(parts) or "the same leaf paths but a different container structure"


def _check_finite(entries: Sequence[tuple[str, str, Array]]) -> None:
    """Raises on the first NaN/Inf among ``(owner, path, array)`` entries."""
    _check_values([(*e, None) for e in entries])


def _check_values(entries: Sequence[tuple[str, str, Array, str | None]]) -> None:
    """Raises on the first array that is not finite or breaks its sign rule.

    One fused device pass over every array; traced arrays are checked when
    run under ``checkify`` (:func:`check_traced`).
    """
    for owner, path, array, rule in entries:
        if rule == NONNEGATIVE:
            check_traced(f"{owner} at {path!r}", array, _nonnegative, "finite and >= 0")
        elif rule == NONNEGATIVE_DIAGONAL:
            check_traced(
                f"{owner} at {path!r}",
                array,
                lambda x: (
                    jnp.isfinite(x).all()
                    & (jnp.diagonal(x, axis1=-2, axis2=-1) >= 0).all()
                ),
                "finite with a non-negative diagonal",
            )
        else:
            check_traced(f"{owner} at {path!r}", array, jnp.isfinite, "finite")
    concrete = [e for e in entries if not is_traced(e[2])]
    if not concrete:
        return
    flags: list[tuple[bool, bool] | None] = [_host_flags(e[2], e[3]) for e in concrete]
    on_device = [e for e, f in zip(concrete, flags, strict=True) if f is None]
    if on_device:
        rules = tuple(e[3] for e in on_device)
        # Concrete arrays are checked now even when the merge is being traced
        # (a jitted call closing over concrete models).
        with jax.ensure_compile_time_eval():
            finite_rows, signed_rows = np.asarray(
                _value_flags([e[2] for e in on_device], rules)
            )
        device = iter(zip(finite_rows, signed_rows, strict=True))
        flags = [f if f is not None else next(device) for f in flags]
    finite = [bool(f[0]) for f in flags if f is not None]
    signed = [bool(f[1]) for f in flags if f is not None]
    for (owner, path, _, rule), ok, sign_ok in zip(
        concrete, finite, signed, strict=True
    ):
        if not ok:
            raise MergeInputError(f"{owner} at {path!r}: contains NaN or Inf")
        if not sign_ok:
            what = (
                "negative entries"
                if rule == NONNEGATIVE
                else "negative diagonal entries"
            )
            raise MergeInputError(
                f"{owner} at {path!r}: has {what}; a statistic must be positive semi-definite"
            )


_HOST_CHECKED = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_HOST_BLOCK = 1 << 22  # entries per block: the boolean temporary's size


def _host_flags(array: Any, rule: str | None) -> tuple[bool, bool] | None:
    """(finite, sign rule holds) by numpy, in blocks, for an array whose data
    is in host memory (numpy, or a JAX array on one CPU device: viewed, not
    copied); None for the others, which :func:`_value_flags` checks.

    On the host numpy needs no compilation: the jitted check compiled once
    per set of shapes and took about 1.5 s of a streamed merge's 6 s over
    the IO benchmark's 4 GB of inputs, numpy 0.5–1 s; for K-FAC factors (a
    non-negative diagonal) its compilations were 1.7 s of a 12 s streamed
    MaTS merge of a small model.
    """
    if rule not in (None, NONNEGATIVE, NONNEGATIVE_DIAGONAL):
        return None
    if isinstance(array, jax.Array):
        devices = array.devices()
        if len(devices) != 1 or next(iter(devices)).platform != "cpu":
            return None
        if not array.is_fully_addressable:
            return None
    elif not isinstance(array, np.ndarray):
        return None
    if array.dtype not in _HOST_CHECKED:
        return None
    flat = np.asarray(array).reshape(-1)
    finite = signed = True
    for i in range(0, flat.size, _HOST_BLOCK):
        block = flat[i : i + _HOST_BLOCK]
        finite = finite and bool(np.isfinite(block).all())
        if rule == NONNEGATIVE:
            signed = signed and bool((block >= 0).all())
        if not (finite and signed):
            break
    if finite and rule == NONNEGATIVE_DIAGONAL:
        # A view: a K-FAC factor's diagonal is a row of strided entries.
        diagonal = np.diagonal(np.asarray(array), axis1=-2, axis2=-1)
        signed = bool((diagonal >= 0).all())
    return finite, signed


@functools.partial(jax.jit, static_argnums=1)
def _value_flags(leaves: list[Array], rules: tuple[str | None, ...]) -> Array:
    finite, signed = [], []
    for leaf, rule in zip(leaves, rules, strict=True):
        finite.append(jnp.all(jnp.isfinite(leaf)))
        if rule == NONNEGATIVE:
            signed.append(jnp.all(leaf >= 0))
        elif rule == NONNEGATIVE_DIAGONAL:
            signed.append(jnp.all(jnp.diagonal(leaf, axis1=-2, axis2=-1) >= 0))
        else:
            signed.append(jnp.array(True))
    return jnp.stack([jnp.stack(finite), jnp.stack(signed)])


def check_models(
    models: Sequence[Params], base: Params | None = None, *, name: str = "models"
) -> Any:
    """Checks that the models (and base) are non-empty, alike and finite.

    Every model must have the first model's tree structure, and each leaf the
    same shape and floating dtype in every model.

    Returns:
      The common tree definition.

    Raises:
      MergeInputError: naming the model and the leaf path.
    """
    if isinstance(models, dict) or not isinstance(models, Sequence):
        raise MergeInputError(
            f"{name} must be a list of parameter pytrees, got {type(models).__name__}"
        )
    if len(models) == 0:
        raise MergeInputError(f"{name} is empty: merging needs at least one model")
    named = [(f"{name}[{m}]", model) for m, model in enumerate(models)]
    if base is not None:
        named = [("base", base), *named]
    return _check_alike(named)


def check_like(tree: Params, reference: Params, name: str) -> None:
    """Checks that ``tree`` (an initialisation, a fallback) is alike the models."""
    _check_alike([("models[0]", reference), (name, tree)], check_first_finite=False)


def _check_alike(
    named: Sequence[tuple[str, Params]], check_first_finite: bool = True
) -> Any:
    ref_name, reference = named[0]
    ref_leaves, treedef = _flatten(reference)
    if not ref_leaves:
        raise MergeInputError(f"{ref_name} has no array leaves")
    for path, leaf in ref_leaves:
        if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise MergeInputError(
                f"{ref_name} at {path!r}: expected a floating-point array, got "
                f"{getattr(leaf, 'dtype', type(leaf).__name__)}"
            )
    entries = [(ref_name, p, x) for p, x in ref_leaves] if check_first_finite else []
    for other_name, other in named[1:]:
        other_leaves, other_def = _flatten(other)
        if other_def != treedef:
            raise MergeInputError(
                f"{other_name} has a different tree structure from {ref_name}: "
                + _structure_difference(reference, other)
            )
        for (path, ref), (_, leaf) in zip(ref_leaves, other_leaves, strict=True):
            if tuple(getattr(leaf, "shape", ())) != tuple(ref.shape):
                raise MergeInputError(
                    f"{other_name} at {path!r}: shape {tuple(getattr(leaf, 'shape', ()))} "
                    f"differs from {ref_name}'s {tuple(ref.shape)}"
                )
            if getattr(leaf, "dtype", None) != ref.dtype:
                raise MergeInputError(
                    f"{other_name} at {path!r}: dtype {getattr(leaf, 'dtype', type(leaf).__name__)} "
                    f"differs from {ref_name}'s {ref.dtype}"
                )
            entries.append((other_name, path, leaf))
    _check_finite(entries)
    return treedef


def check_weights(weights: Any, num_models: int) -> Array:
    """Validates per-model weights; returns them as a float32 array.

    Weights must be one finite, non-negative number per model, not all zero.
    None means equal weights.
    """
    if weights is None:
        return jnp.ones((num_models,), jnp.float32)
    if is_traced(weights):
        if jnp.shape(weights) != (num_models,):
            raise MergeInputError(
                f"weights has shape {jnp.shape(weights)}, expected ({num_models},): one per model"
            )
        check_traced(
            "weights",
            weights,
            lambda w: _nonnegative(w).all() & (w > 0).any(),
            "finite, non-negative and not all zero",
        )
        return jnp.asarray(weights, jnp.float32)
    if isinstance(weights, (str, bytes)) or (
        isinstance(weights, Sequence)
        and any(w is None or isinstance(w, (bool, str, bytes)) for w in weights)
    ):
        raise MergeInputError(
            f"weights must be one number per model, got {type(weights).__name__} {weights!r}"
        )
    dtype = getattr(weights, "dtype", None)
    if dtype is not None and not (
        np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
    ):
        raise MergeInputError(
            f"weights must be one number per model, got an array of {dtype}"
        )
    try:
        values = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise MergeInputError(
            f"weights must be one number per model, got {type(weights).__name__} {weights!r}"
        ) from None
    if values.shape != (num_models,):
        raise MergeInputError(
            f"weights has shape {values.shape}, expected ({num_models},): one per model"
        )
    if not np.all(np.isfinite(values)):
        raise MergeInputError(f"weights must be finite, got {values.tolist()}")
    if np.any(values < 0):
        raise MergeInputError(f"weights must be non-negative, got {values.tolist()}")
    if not np.any(values > 0):
        raise MergeInputError(f"weights are all zero: {values.tolist()}")
    with np.errstate(over="ignore"):
        single = values.astype(np.float32)
        total = np.sum(single, dtype=np.float32)
    tiny = np.finfo(np.float32).tiny
    if (
        np.any(np.isinf(single))
        or np.isinf(total)
        or np.any((values > 0) & (single < tiny))
    ):
        # Merges compute in float32: such weights would overflow to inf or
        # vanish, and the merged model would be NaN.
        raise MergeInputError(
            f"weights {values.tolist()} lie outside float32's range ({tiny:.3g} to "
            f"{np.finfo(np.float32).max:.3g}) in which merges compute; rescale them "
            "(only their ratios matter to an average)"
        )
    return jnp.asarray(single)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _nonnegative(x: Array) -> Array:
    return jnp.isfinite(x) & (x >= 0)


def check_traced(
    name: str, value: Any, ok: Callable[[Array], Array], expected: str
) -> None:
    """Stages the check ``ok(value)`` of a traced value into the computation.

    Values are unknown while tracing, so a traced hyperparameter, weight,
    model or statistic cannot be refused before the work. Its check is
    recorded with :func:`jax.experimental.checkify.debug_check`: a no-op
    under plain ``jax.jit`` (nothing is computed for it), and an error
    naming ``name`` when the caller functionalises the checks:
    ``err, out = checkify.checkify(jax.jit(f))(...); err.throw()``.
    Concrete values (and the concrete entries of a list) are left to the
    caller's eager checks.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax.experimental import checkify
      >>> def f(scale):
      ...     check_traced("scale", scale, jnp.isfinite, "a finite number")
      ...     return 2 * scale
      >>> jax.jit(f)(jnp.nan)  # unchecked under plain jit
      Array(nan, dtype=float32, weak_type=True)
      >>> err, _ = checkify.checkify(jax.jit(f))(jnp.nan)
      >>> print(err.get())
      scale must be a finite number, got nan (`check` failed)
    """
    entries = (
        [(f"{name}[{i}]", v) for i, v in enumerate(value)]
        if isinstance(value, (list, tuple))
        else [(name, value)]
    )
    for entry, v in entries:
        if is_traced(v):
            checkify.debug_check(
                jnp.all(ok(jnp.asarray(v))), f"{entry} must be {expected}, got {{}}", v
            )


def _real(name: str, value: Any) -> float:
    """``value`` as a float, if it is one real number: an int, a float, a numpy
    scalar or a 0-d array of integers or floats (not a bool, a string, a
    complex number, a ``Fraction`` or ``Decimal``, which jit cannot take)."""
    dtype = getattr(value, "dtype", None)
    if isinstance(value, bool) or not (
        isinstance(value, (int, float))
        or (
            dtype is not None
            and np.ndim(value) == 0
            and (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating))
        )
    ):
        raise MergeInputError(
            f"{name} must be a number (an int, a float or a 0-d array of them), got "
            f"{type(value).__name__} {value!r}"
        )
    try:
        return float(value)
    except OverflowError:  # an int past float64's range
        return math.inf


def _entries(name: str, value: Any, per_model: bool) -> list[tuple[str, Any]]:
    """The numbers to check, each with its name: ``value`` itself, or, for a
    per-model parameter given as a 1-D sequence or array, each entry
    (``density[1]``)."""
    if per_model and (isinstance(value, (list, tuple)) or np.ndim(value) == 1):
        if is_traced(value):
            return []
        if len(value) == 0:
            raise MergeInputError(
                f"{name} is empty: give one number, or one number per model"
            )
        # Traced entries are left to check_traced.
        return [(f"{name}[{i}]", v) for i, v in enumerate(value) if not is_traced(v)]
    return [] if is_traced(value) else [(name, value)]


def check_number(name: str, value: Any, *, per_model: bool = False) -> None:
    """Checks that a hyperparameter is one finite real number (traced: :func:`check_traced`).

    With ``per_model=True`` it may also be a 1-D sequence or array, one number
    per model, each checked (the engine checks that there is one per model).

    Examples:
      >>> check_number("scale", float("nan"))
      Traceback (most recent call last):
      ...
      mats_jax.checks.MergeInputError: scale must be a finite number, got nan
      >>> check_number("scale", [0.5, float("inf")], per_model=True)
      Traceback (most recent call last):
      ...
      mats_jax.checks.MergeInputError: scale[1] must be a finite number, got inf
    """
    check_traced(name, value, jnp.isfinite, "a finite number")
    for entry, v in _entries(name, value, per_model):
        number = _real(entry, v)
        if not math.isfinite(number) and not isinstance(v, int):
            raise MergeInputError(f"{entry} must be a finite number, got {v!r}")
        if not abs(number) <= _FLOAT32_MAX:
            raise MergeInputError(
                f"{entry} = {v!r} lies outside float32's range (±{_FLOAT32_MAX:.3g}) "
                "in which merges compute"
            )


def check_flag(name: str, value: Any) -> None:
    """Checks that a switch is a bool (a YAML ``"yes"`` or a 1 is not one).

    Examples:
      >>> check_flag("rescale", "no")
      Traceback (most recent call last):
      ...
      mats_jax.checks.MergeInputError: rescale must be True or False, got 'no'
    """
    if not isinstance(value, bool):
        raise MergeInputError(f"{name} must be True or False, got {value!r}")


_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def check_fraction(
    name: str,
    value: Any,
    *,
    include_zero: bool,
    include_one: bool,
    per_model: bool = False,
) -> None:
    """Checks that a density or drop rate lies in its interval (traced: :func:`check_traced`).

    ``per_model`` as for :func:`check_number`.

    Examples:
      >>> check_fraction("density", [0.2, 1.5], include_zero=False,
      ...                include_one=True, per_model=True)
      Traceback (most recent call last):
      ...
      mats_jax.checks.MergeInputError: density[1] must lie in (0, 1], got 1.5
    """
    interval = ("[" if include_zero else "(") + "0, 1" + ("]" if include_one else ")")
    check_traced(
        name,
        value,
        lambda x: (
            ((x >= 0) if include_zero else (x > 0))
            & ((x <= 1) if include_one else (x < 1))
        ),
        f"in {interval}",
    )
    for entry, value_ in _entries(name, value, per_model):
        v = _real(entry, value_)
        low_ok = v >= 0 if include_zero else v > 0
        high_ok = v <= 1 if include_one else v < 1
        if not (math.isfinite(v) and low_ok and high_ok):
            raise MergeInputError(f"{entry} must lie in {interval}, got {value_!r}")
        if 0 < v < _FLOAT32_TINY:
            # XLA flushes float32 subnormals to zero: such a fraction would
            # count as 0 in the merge (⌈γN⌉ = 0), not as the small one given.
            raise MergeInputError(
                f"{entry} = {value_!r} is below float32's smallest normal number "
                f"({_FLOAT32_TINY:.3g}), which merges compute with as 0: give 0 or "
                "a larger fraction"
            )


def check_statistics(
    statistics: Sequence[StatTree],
    models: Sequence[Params],
    *,
    allowed: tuple[type, ...] = (Statistic,),
    name: str = "statistics",
) -> list[list[Statistic | None]]:
    """Checks one statistic pytree per model against the models' leaves.

    Each statistic pytree has the parameters' structure with a statistic (or
    None, for no statistic) at each leaf. A leaf's statistics must have the same
    type and layout in every task, fit the leaf's shape, and be finite, with
    non-negative entries (Diagonal) or a non-negative diagonal (the matrices):
    a cheap necessary condition for positive semi-definiteness that catches
    sign errors. ``name`` is the argument's name in messages.

    Returns:
      For each task, the list of statistics in the order of the models' leaves.
    """
    if isinstance(statistics, dict) or not isinstance(statistics, Sequence):
        raise MergeInputError(
            f"{name} must be a list with one statistic pytree per model, got "
            f"{type(statistics).__name__}"
        )
    if len(statistics) != len(models):
        raise MergeInputError(
            f"{name} has {len(statistics)} entries, expected {len(models)}: one per model"
        )
    leaves, treedef = _flatten(models[0])
    per_task: list[list[Statistic | None]] = []
    for m, stat_tree in enumerate(statistics):
        try:
            flat = treedef.flatten_up_to(stat_tree)
        except (ValueError, TypeError) as error:
            raise MergeInputError(
                f"{name}[{m}] does not have the parameters' tree structure "
                f"(expected a statistic or None at each of: "
                + ", ".join(repr(p) for p, _ in leaves[:8])
                + (" …" if len(leaves) > 8 else "")
                + f"): {error}"
            ) from None
        per_task.append(flat)
    names = ", ".join(t.__name__ for t in allowed)
    for i, (path, leaf) in enumerate(leaves):
        column = [task[i] for task in per_task]
        first = column[0]
        for m, stat in enumerate(column):
            if stat is not None and not isinstance(stat, allowed):
                raise MergeInputError(
                    f"{name}[{m}] at {path!r}: expected one of {names} or None, "
                    f"got {type(stat).__name__}"
                )
            if (stat is None) != (first is None) or (
                stat is not None and not _same_structure(stat, first)
            ):
                raise MergeInputError(
                    f"{name}[{m}] at {path!r}: {_describe(stat)} differs from "
                    f"{name}[0]'s {_describe(first)}; every task needs the same "
                    "statistic type and layout for a leaf"
                )
            if stat is not None:
                misfit = _array_problem(stat) or stat.fit_error(tuple(leaf.shape))
                if misfit:
                    raise MergeInputError(f"{name}[{m}] at {path!r}: {misfit}")
    _check_values(
        [
            (f"{name}[{m}]", f"{path}/{field}", array, rule)
            for m, task in enumerate(per_task)
            for (path, _), stat in zip(leaves, task, strict=True)
            if stat is not None
            for field, array, rule in stat.value_checks()
        ]
    )
    return per_task


def _array_problem(stat: Statistic) -> str:
    """What is wrong with a statistic's arrays' types, or ``""``."""
    for field in stat.array_fields:
        x = getattr(stat, field)
        dtype = getattr(x, "dtype", None)
        if dtype is None or not hasattr(x, "shape"):
            return f"{stat.kind}.{field} must be an array, got {type(x).__name__}"
        if not jnp.issubdtype(dtype, jnp.floating):
            return (
                f"{stat.kind}.{field} has dtype {dtype}; statistics are floating-point "
                "arrays"
            )
    return ""


def _same_structure(a: Any, b: Any) -> bool:
    left: Any = jax.tree.structure(a)  # PyTreeDef's stubs do not declare __eq__
    return bool(left == jax.tree.structure(b))


def _describe(stat: Statistic | None) -> str:
    if stat is None:
        return "no statistic (None)"
    meta = {k: getattr(stat, k) for k in ("in_axes", "out_axes") if hasattr(stat, k)}
    return stat.kind + (f"{meta}" if meta else "")


def check_key(key: Any) -> None:
    """Checks that ``key`` is one JAX PRNG key (typed, or a raw uint32 pair)."""
    is_typed = hasattr(key, "dtype") and jax.dtypes.issubdtype(
        key.dtype, jax.dtypes.prng_key
    )
    is_raw = (
        hasattr(key, "dtype") and key.dtype == jnp.uint32 and tuple(key.shape) == (2,)
    )
    if not (is_typed and key.shape == ()) and not is_raw:
        raise MergeInputError(
            "key must be a single JAX PRNG key (jax.random.key(seed) or "
            f"jax.random.PRNGKey(seed)), got {getattr(key, 'dtype', type(key).__name__)} "
            f"with shape {getattr(key, 'shape', None)}"
        )


def warn(message: str, category: type[Warning]) -> None:
    """Warns with the warning attributed to the first caller outside mats_jax,
    so the user sees their own line."""
    warnings.warn(message, category, stacklevel=_caller_stacklevel())


def _caller_stacklevel() -> int:
    package = os.path.dirname(os.path.abspath(__file__))
    level, frame = 2, sys._getframe(2)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        package + os.sep
    ):
        level += 1
        frame = frame.f_back  # type: ignore[assignment]
    return level
