"""Training with optax: jitted epochs, a refitted linear head, accuracy.

One epoch is one jitted ``lax.scan`` over shuffled mini-batches of the
cross-entropy loss with AdamW; the examples that do not fill the last batch
are left for the next epoch's shuffle. The head refit (the "linear probe"
baseline, and the starting head of fine-tuning) trains only a linear
classifier on the frozen body's features.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mats_jax.typing import Array, Params

__all__ = ["TrainConfig", "accuracy", "fit", "fit_head", "predict"]

ApplyFn = Callable[[Params, Array], Array]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings: AdamW with a cosine decay over ``epochs``."""

    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError(
                f"epochs and batch_size must be ≥ 1 and learning_rate > 0: {self}"
            )


def _loss(apply: ApplyFn, params: Params, x: Array, y: Array) -> Array:
    logits = apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.partial(jax.jit, static_argnames=("apply", "optimizer", "batch_size"))
def _epoch(
    apply: ApplyFn,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    params: Params,
    state: Any,
    x: Array,
    y: Array,
    key: Array,
) -> tuple[Params, Any, Array]:
    n_batches = x.shape[0] // batch_size
    order = jax.random.permutation(key, x.shape[0])[: n_batches * batch_size]
    order = order.reshape(n_batches, batch_size)

    def step(carry: tuple[Params, Any], idx: Array) -> tuple[tuple[Params, Any], Array]:
        p, s = carry
        loss, grads = jax.value_and_grad(functools.partial(_loss, apply))(
            p, x[idx], y[idx]
        )
        updates, s = optimizer.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), loss

    (params, state), losses = jax.lax.scan(step, (params, state), order)
    return params, state, losses.mean()


def fit(
    apply: ApplyFn,
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    config: TrainConfig,
    key: Array,
    on_epoch: Callable[[int, float], None] | None = None,
) -> Params:
    """Trains every parameter of ``apply(params, x) -> logits`` by cross-entropy.

    ``apply`` should be one function object per model (it is a static jit
    argument: a new object recompiles).
    """
    if x.shape[0] < config.batch_size:
        raise ValueError(
            f"{x.shape[0]} training examples are fewer than one batch of {config.batch_size}"
        )
    steps = config.epochs * (x.shape[0] // config.batch_size)
    schedule = optax.cosine_decay_schedule(config.learning_rate, steps)
    optimizer = optax.adamw(schedule, weight_decay=config.weight_decay)
    state = optimizer.init(params)
    xs, ys = jnp.asarray(x), jnp.asarray(y)
    for epoch in range(config.epochs):
        params, state, loss = _epoch(
            apply,
            optimizer,
            config.batch_size,
            params,
            state,
            xs,
            ys,
            jax.random.fold_in(key, epoch),
        )
        if on_epoch is not None:
            on_epoch(epoch, float(loss))
    return params


@functools.partial(jax.jit, static_argnames=("steps",))
def _fit_head(head: Params, feats: Array, y: Array, l2: Array, steps: int) -> Params:
    optimizer = optax.adam(optax.cosine_decay_schedule(0.05, steps))

    def loss(h: Params) -> Array:
        logits = feats @ h["kernel"] + h["bias"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + l2 * jnp.sum(jnp.square(h["kernel"]))

    def step(carry: tuple[Params, Any], _: None) -> tuple[tuple[Params, Any], None]:
        h, s = carry
        updates, s = optimizer.update(jax.grad(loss)(h), s, h)
        return (optax.apply_updates(h, updates), s), None

    (head, _), _ = jax.lax.scan(step, (head, optimizer.init(head)), None, length=steps)
    return head


def fit_head(
    feats: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    steps: int = 300,
    l2: float = 1e-4,
) -> Params:
    """A linear classifier ``{"kernel", "bias"}`` on fixed features: full-batch Adam.

    Features are standardised implicitly by the optimiser's per-coordinate
    steps; ``l2`` keeps the kernel bounded on separable data.
    """
    head = {
        "kernel": jnp.zeros((feats.shape[1], num_classes), jnp.float32),
        "bias": jnp.zeros((num_classes,), jnp.float32),
    }
    return _fit_head(head, jnp.asarray(feats), jnp.asarray(y), jnp.float32(l2), steps)


def predict(
    apply: ApplyFn, params: Params, x: np.ndarray, batch: int = 1000
) -> np.ndarray:
    """Predicted classes, evaluated in batches."""
    jitted = _jitted(apply)
    out = [
        np.asarray(jnp.argmax(jitted(params, jnp.asarray(x[i : i + batch])), -1))
        for i in range(0, x.shape[0], batch)
    ]
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


def accuracy(apply: ApplyFn, params: Params, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of correct predictions, in percent."""
    return float(np.mean(predict(apply, params, x) == y) * 100.0)


@functools.lru_cache(maxsize=64)
def _jitted(apply: ApplyFn) -> Callable[[Params, Array], Array]:
    return jax.jit(apply)
