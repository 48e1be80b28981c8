"""Type aliases shared across the package (in the spirit of ``optax._src.base``)."""

from __future__ import annotations

from typing import Any, TypeAlias

import jax

Array: TypeAlias = jax.Array
"""A JAX array."""

Params: TypeAlias = Any
"""A parameter pytree: nested dicts (or any pytree) of floating-point arrays."""

StatTree: TypeAlias = Any
"""A pytree with a parameter pytree's structure holding a statistic or None per leaf."""
