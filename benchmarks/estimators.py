"""Benchmark: throughput and memory of the statistics estimators on a CPU.

Measures, in one run, on an MLP (784→256→256→10) and a small vision
transformer (28×28 inputs in 7×7 patches → 16 tokens, width 64, 2 heads,
``nn.scan``-stacked pre-LayerNorm blocks, mean-pool, 10 classes), on random
MNIST-shaped data with fixed seeds:

1. ``mats_jax.diagonal_fisher`` throughput (examples/s), ``kind="empirical"``
   (one backward per example) at several ``micro_batch_size`` values, and
   ``kind="exact"`` (one backward per class: 10) at the fastest of them,
   against
   (a) a Python loop over examples calling a jitted ``jax.grad`` of one
   example's log-likelihood and a jitted accumulate of its squares (also with
   both in one jitted call, and the same loop calling a jitted function that
   only returns its accumulator: the dispatch floor), ``block_until_ready`` at
   the end;
   (b) one jitted ``value_and_grad`` of the summed log-likelihood over all
   the examples at once, and over micro-batches of each size, summed: the
   fastest of these is the lower bound.
2. ``mats_jax.gram`` and ``mats_jax.kfac`` (``kind="empirical"``, and
   ``"exact"`` for reference) against the same jitted forward+backward pass
   per micro-batch of the same size, and the ratio that the dense kernels'
   matmul FLOPs alone imply (a floor for both).
3. Peak memory of ``diagonal_fisher`` in fresh subprocesses over 1k, 4k and
   16k examples yielded by a generator (the data is never held), twice each,
   plus a control that holds the data, to show the measurement would see
   growth. The peak is the kernel's ``VmHWM``, reset through
   ``/proc/self/clear_refs`` before the call and again at the request of
   batch 1 (the step is compiled by then), which separates the compilation
   from the accumulation (``ru_maxrss`` cannot be used: after fork+exec it
   keeps the parent's peak); the bytes of live JAX arrays are read at every
   batch too (what the estimator holds, without the allocator's noise).
4. Where the time goes: the compilation per call (counted through
   ``jax.monitoring``), the per-batch finiteness test in ``accumulate``
   (made a no-op for a call), diagonal_fisher restricted to the dense kernels
   (``leaves=``: no second per-example pass for biases and norms), kfac with
   ``fallback=None``, a check of diagonal_fisher against the loop's squared
   gradients, and the main measurements in subprocesses with XLA's YNNPACK
   reduce fusion off (``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce``).

Timing. Each call's compilations are recorded through ``jax.monitoring``.
Execution starts when the step's compilation ends (or, when an earlier call
with the same configuration compiled it, when the first batch is requested),
so the steady throughput is (examples) / (end − that moment), and everything
before it (setup, tracing of the model, compilation) is the call's latency.
One warm-up call per estimator and kind compiles the eager operations around
the step first (its time is reported as the first call). The baselines are
warmed up and timed whole. Methods run round-robin, ``reps`` times, medians
reported, so that load from other processes hits every method alike; the
fastest micro-batch size is re-measured in a second round for the headline.

Run from the repository root:

    .venv/bin/python benchmarks/estimators.py            # full, 7-10 min on 2 cores
    .venv/bin/python benchmarks/estimators.py --quick    # smoke run, < 1 min

The full run writes ``benchmarks/results/estimators.{md,json}``, from a
committed tree only (``--allow-dirty`` to record anyway, said in the results);
``--quick`` writes to the temporary directory unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from provenance import (
    QUICK_RESULTS,
    RESULTS,
    add_dirty_option,
    check_destination,
    machine,
)

import mats_jax
from mats_jax.stats import accumulate as accumulate_module
from mats_jax.stats.capture import find_layers

TARGET_VS_LOOP = 20.0  # diagonal_fisher at least this much faster than the loop
TARGET_VS_BATCHED = 3.0  # and within this factor of one batched gradient
TARGET_KRONECKER = 1.5  # gram/kfac within this factor of a forward+backward
# diagonal_fisher's peak RSS flat: the largest size's mean peak within this
# factor of the smallest's, and the live JAX arrays within LIVE_FLAT_MB (or 5%).
MEMORY_FLAT_RATIO = 1.05
LIVE_FLAT_MB = 1.0
YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type=-reduce"
IMAGE = 784
CLASSES = 10
MODELS = ("mlp", "vit")


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and repetitions of one run."""

    # Examples per throughput measurement (empirical kinds, gram), MLP and ViT:
    # the MLP runs ~25× faster, so it gets more to keep its timed window long.
    examples: tuple[int, int] = (16384, 3072)
    exact_examples: int = 512  # per measurement of the exact kinds
    batch_size: int = 256  # examples per batch of the data iterator
    micro_sizes: tuple[int, ...] = (16, 32, 128)  # diagonal_fisher sweep
    kron_micro_sizes: tuple[int, ...] = (32, 128)  # gram / kfac sweep
    loop_examples: int = 512  # examples of the per-example loop baseline
    reps: int = 3
    memory_models: tuple[str, ...] = MODELS
    memory_examples: tuple[int, ...] = (1024, 4096, 16384)
    memory_micro: int = 32
    memory_reps: int = 2  # children per model and size, interleaved
    memory_control: bool = True
    diagnostic: bool = True  # the YNNPACK subprocesses
    warmup: bool = True
    exact: bool = True  # measure the exact kinds (slow: 10 backward passes)
    variants: bool = True  # the profiling variants (no finiteness test, etc.)
    vit_depth: int = 4
    seed: int = 0


QUICK = Config(
    examples=(256, 256),
    exact_examples=256,
    batch_size=128,
    micro_sizes=(32,),
    kron_micro_sizes=(32,),
    loop_examples=32,
    reps=1,
    memory_models=("mlp",),
    memory_examples=(256, 512),
    memory_reps=1,
    memory_control=False,
    diagnostic=False,
    warmup=False,
    exact=False,
    variants=False,
    vit_depth=1,
)


# On an accelerator: the same measurements with more examples per window (the
# GPU finishes the CPU's windows in milliseconds); no RSS children (host memory
# says nothing about device memory) and no YNNPACK diagnostic (XLA:CPU only).
DEVICE = dataclasses.replace(
    Config(),
    examples=(262144, 65536),
    exact_examples=4096,
    batch_size=1024,
    micro_sizes=(32, 128, 512),
    kron_micro_sizes=(128, 512),
    loop_examples=1024,
    memory_models=(),
    memory_control=False,
    diagnostic=False,
)


# --------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------


class MLP(nn.Module):
    """784 → 256 → 256 → 10 with ReLU."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(256)(x))
        x = nn.relu(nn.Dense(256)(x))
        return nn.Dense(CLASSES)(x)


class Block(nn.Module):
    """A pre-LayerNorm transformer block, shaped for ``nn.scan``."""

    width: int = 64
    heads: int = 2
    hidden: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h)
        h = nn.LayerNorm()(x)
        h = nn.Dense(self.width)(nn.gelu(nn.Dense(self.hidden)(h)))
        return x + h, None


class ViT(nn.Module):
    """28×28 images in 7×7 patches (16 tokens), scanned blocks, mean-pool, head."""

    depth: int = 4
    width: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b = x.shape[0]
        patches = x.reshape(b, 4, 7, 4, 7).transpose(0, 1, 3, 2, 4).reshape(b, 16, 49)
        pos = self.param("pos", nn.initializers.normal(0.02), (16, self.width))
        x = nn.Dense(self.width)(patches) + pos
        stack = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.depth,
        )
        x, _ = stack(width=self.width)(x, None)
        return nn.Dense(CLASSES)(nn.LayerNorm()(x).mean(axis=1))


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    fn: Callable[[Any, jax.Array], jax.Array]
    params: Any

    @property
    def size(self) -> int:
        return int(sum(np.size(x) for x in jax.tree.leaves(self.params)))


def build_model(name: str, cfg: Config) -> Model:
    module = MLP() if name == "mlp" else ViT(depth=cfg.vit_depth)
    params = module.init(jax.random.key(cfg.seed), jnp.zeros((1, IMAGE)))
    return Model(name, module.apply, params)


def random_batch(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    return {
        "inputs": rng.standard_normal((size, IMAGE), dtype=np.float32),
        "labels": rng.integers(0, CLASSES, size).astype(np.int32),
    }


Pool = list[dict[str, np.ndarray]]


def make_pool(cfg: Config, batches: int = 4) -> Pool:
    """A few fixed batches, cycled through by every measurement."""
    rng = np.random.default_rng(cfg.seed)
    return [random_batch(rng, cfg.batch_size) for _ in range(batches)]


def batch_size(pool: Pool) -> int:
    return len(pool[0]["labels"])


class TimedBatches:
    """Cycles through the pool; records when each batch is requested."""

    def __init__(self, pool: Pool, examples: int):
        self.pool = pool
        self.count = max(2, examples // batch_size(pool))
        self.requested: list[float] = []

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(self.count):
            self.requested.append(time.perf_counter())
            yield self.pool[i % len(self.pool)]


def micro_batches(pool: Pool, examples: int, micro: int) -> Iterator[tuple]:
    """(inputs, labels) of each micro-batch of the cycled pool, as numpy slices."""
    for i in range(max(2, examples // batch_size(pool))):
        batch = pool[i % len(pool)]
        for s in range(0, batch_size(pool), micro):
            yield batch["inputs"][s : s + micro], batch["labels"][s : s + micro]


def stacked(pool: Pool, examples: int) -> dict[str, np.ndarray]:
    """The first ``examples`` examples of the cycled pool, as one batch."""
    reps = -(-examples // (len(pool) * batch_size(pool)))
    return {
        k: np.concatenate([b[k] for b in pool] * reps)[:examples]
        for k in ("inputs", "labels")
    }


def log_likelihood(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Σ over examples of log p(label | x)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def zeros_like(params: Any) -> Any:
    return jax.tree.map(jnp.zeros_like, params)


# --------------------------------------------------------------------------
# Measurements: the library
# --------------------------------------------------------------------------


class CompileLog:
    """Backend compilations, from ``jax.monitoring``: (function name, seconds,
    ``perf_counter`` when it finished)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        self.events: list[tuple[str, float, float]] = []
        jax.monitoring.register_event_duration_secs_listener(self)

    def __call__(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == self.EVENT:
            name = str(kwargs.get("fun_name", ""))
            self.events.append((name, duration, time.perf_counter()))

    def since(self, mark: int) -> dict[str, Any]:
        new = self.events[mark:]
        steps = [end for name, _, end in new if is_step(name)]
        return {
            "compile_s": sum(d for _, d, _ in new),
            "step_compiles": len(steps),
            "step_compiled_at": steps[-1] if steps else None,
        }


def is_step(name: str) -> bool:
    """The estimators' jitted step (``jit(step)``, ``jit(checked_step)``)."""
    return name.startswith("jit(") and name.endswith("step)")


COMPILES = CompileLog()

ESTIMATORS = {
    "diagonal_fisher": mats_jax.diagonal_fisher,
    "gram": mats_jax.gram,
    "kfac": mats_jax.kfac,
}
# (estimator, kind) pairs that the run measures; gram takes no kind.
VARIANTS = (
    ("diagonal_fisher", "empirical"),
    ("diagonal_fisher", "exact"),
    ("gram", None),
    ("kfac", "empirical"),
    ("kfac", "exact"),
)


def run_estimator(
    name: str, model: Model, batches: Any, micro: int, kind: str | None, **kwargs: Any
) -> dict[str, float]:
    """One call; steady examples/s after batch 0, latency and compile time."""
    if kind is not None:
        kwargs["kind"] = kind
    mark = len(COMPILES.events)
    start = time.perf_counter()
    out = ESTIMATORS[name](
        model.fn,
        model.params,
        batches,
        micro_batch_size=micro,
        progress=False,
        **kwargs,
    )
    jax.block_until_ready(jax.tree.leaves(out))
    end = time.perf_counter()
    compiles = COMPILES.since(mark)
    began = compiles.pop("step_compiled_at")
    result = {"total_s": end - start, **compiles}
    if isinstance(batches, TimedBatches):
        # Execution starts when the step's compilation ends; the first batch is
        # requested before that (the estimators look at it to trace the model).
        began = began or batches.requested[0]
        result["rate"] = batches.count * batch_size(batches.pool) / (end - began)
        result["latency_s"] = began - start
    return result


def timed_estimator(
    name: str,
    model: Model,
    pool: Pool,
    examples: int,
    micro: int,
    kind: str | None,
    **kwargs: Any,
) -> dict[str, float]:
    return run_estimator(
        name, model, TimedBatches(pool, examples), micro, kind, **kwargs
    )


def without_finite_check(
    name: str, model: Model, pool: Pool, examples: int, micro: int, kind: str | None
) -> dict[str, float]:
    """An estimator with ``accumulate``'s per-batch finiteness test replaced by a
    no-op for the call (profiling only)."""
    original = accumulate_module.record_first_bad
    accumulate_module.record_first_bad = lambda sums, first_bad, index: first_bad
    try:
        return timed_estimator(name, model, pool, examples, micro, kind)
    finally:
        accumulate_module.record_first_bad = original


def kernels_only(params: Any) -> Any:
    """The ``leaves`` selection of the dense kernels (leaves named ``kernel``)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def fisher_paths(model: Model, micro: int) -> dict[str, int]:
    """How many dense kernels diagonal_fisher can take through the outer product
    (used once, one row per example, as ``estimate`` decides) of how many."""
    layers = find_layers(model.fn, model.params, jnp.zeros((micro, IMAGE)))
    uses: dict[int, int] = {}
    for t in layers.taps:
        uses[t.leaf] = uses.get(t.leaf, 0) + 1
    outer = {
        t.leaf
        for t in layers.taps
        if uses[t.leaf] == 1
        and t.row_shape == (micro,)
        and len(t.layer_levels) == len(t.loop_shape)
    }
    return {"kernels": len(uses), "outer_product": len(outer)}


def kernel_flop_floors(model: Model, micro: int) -> dict[str, float]:
    """gram's and kfac's time relative to a forward+backward pass, as far as the
    dense kernels' matmul FLOPs alone set it (with rows r, inputs i, outputs o per
    tap): gram is a forward (2rio) plus A = xᵀx (2ri²); kfac a forward and a
    backward to the layer inputs (4rio) plus A and G = gᵀg (2ro²); fwd+bwd is
    6rio. Attention scores, norms and kfac's diagonal fallback are left out."""
    layers = find_layers(model.fn, model.params, jnp.zeros((micro, IMAGE)))
    fwd_bwd = gram = kfac = 0.0
    for t in layers.taps:
        per_iteration = math.prod(t.x_shape[a] for a in t.x_free)
        rows = math.prod(t.loop_shape) * per_iteration
        n_in = math.prod(t.x_shape[a] for a in t.x_contract)
        n_out = math.prod(t.out_shape) // per_iteration
        fwd_bwd += 6 * rows * n_in * n_out
        gram += 2 * rows * n_in * (n_out + n_in)
        kfac += 2 * rows * (2 * n_in * n_out + n_in**2 + n_out**2)
    return {"gram": gram / fwd_bwd, "kfac": kfac / fwd_bwd}


VARIANTS_MEASURED_HOT = (
    ("diagonal_fisher", "empirical"),
    ("gram", None),
    ("kfac", "empirical"),
)


def cold_calls(
    model: Model, pool: Pool, variants: tuple = VARIANTS
) -> dict[str, dict[str, float]]:
    """The first call of each estimator and kind on one micro-batch of 32 (this
    also compiles the eager operations around the step, once per process)."""
    one = [{k: v[:32] for k, v in pool[0].items()}]
    return {
        f"{name} {kind or ''}".strip(): run_estimator(name, model, one, 32, kind)
        for name, kind in variants
    }


# --------------------------------------------------------------------------
# Measurements: baselines and profiles
# --------------------------------------------------------------------------


def loop_functions(model: Model) -> dict[str, Callable]:
    def score(params: Any, x: jax.Array, y: jax.Array) -> Any:
        return jax.grad(lambda p: log_likelihood(model.fn(p, x), y))(params)

    def add_squares(acc: Any, g: Any) -> Any:
        return jax.tree.map(lambda a, b: a + jnp.square(b), acc, g)

    return {
        "grad": jax.jit(score),
        "accumulate": jax.jit(add_squares),
        "fused": jax.jit(lambda acc, p, x, y: add_squares(acc, score(p, x, y))),
        "dispatch": jax.jit(lambda acc, p, x, y: acc),
    }


def loop_baseline(model: Model, pool: Pool, examples: int, variant: str) -> float:
    """(a): a Python loop of jitted single-example gradients; examples/s."""
    fns = loop_functions(model)
    data = stacked(pool, examples)
    x, y = data["inputs"], data["labels"]

    def run(n: int) -> Any:
        acc = zeros_like(model.params)
        for i in range(n):
            xi, yi = x[i : i + 1], y[i : i + 1]
            if variant == "two calls":
                acc = fns["accumulate"](acc, fns["grad"](model.params, xi, yi))
            else:
                acc = fns[variant](acc, model.params, xi, yi)
        return jax.block_until_ready(acc)

    run(2)
    start = time.perf_counter()
    run(examples)
    return examples / (time.perf_counter() - start)


def stepped_rate(
    step: Callable, init: Any, model: Model, pool: Pool, examples: int, micro: int
) -> float:
    """Examples/s of ``acc = step(acc, params, x, y)`` over the micro-batches."""
    x0, y0 = next(micro_batches(pool, examples, micro))
    jax.block_until_ready(step(init, model.params, x0, y0))
    acc, seen = init, 0
    start = time.perf_counter()
    for x, y in micro_batches(pool, examples, micro):
        acc = step(acc, model.params, x, y)
        seen += len(y)
    jax.block_until_ready(acc)
    return seen / (time.perf_counter() - start)


def grad_step(model: Model) -> Callable:
    """Jitted ``acc + ∇ Σ log p`` over a (micro-)batch: forward + backward."""

    def step(acc: Any, params: Any, x: jax.Array, y: jax.Array) -> Any:
        _, g = jax.value_and_grad(lambda p: log_likelihood(model.fn(p, x), y))(params)
        return jax.tree.map(jnp.add, acc, g)

    return jax.jit(step)


def batched_baseline(model: Model, pool: Pool, examples: int, micro: int) -> float:
    """(b): one value_and_grad per micro-batch, summed; examples/s."""
    return stepped_rate(
        grad_step(model), zeros_like(model.params), model, pool, examples, micro
    )


def full_batch_baseline(model: Model, pool: Pool, examples: int) -> float:
    """(b): one value_and_grad over all the examples at once (median of 5)."""
    step = grad_step(model)
    data = stacked(pool, examples)
    x, y = jnp.asarray(data["inputs"]), jnp.asarray(data["labels"])
    acc = zeros_like(model.params)
    jax.block_until_ready(step(acc, model.params, x, y))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(step(acc, model.params, x, y))
        times.append(time.perf_counter() - start)
    return examples / float(np.median(times))


def loop_agreement(model: Model, pool: Pool) -> float:
    """Max relative difference, over leaves, between diagonal_fisher (empirical)
    and the loop's accumulated squared gradients on the same batch."""
    fns = loop_functions(model)
    batch = pool[0]
    acc = zeros_like(model.params)
    for i in range(batch_size(pool)):
        x, y = batch["inputs"][i : i + 1], batch["labels"][i : i + 1]
        acc = fns["fused"](acc, model.params, x, y)
    library = mats_jax.diagonal_fisher(
        model.fn, model.params, [batch], kind="empirical", progress=False
    )
    n = batch_size(pool)
    ref = [r / n for r in jax.tree.leaves(acc)]
    got = [d.f for d in jax.tree.leaves(library, is_leaf=lambda v: hasattr(v, "f"))]
    # Some leaves have a Fisher of exactly zero in exact arithmetic (an attention
    # key bias shifts every score of a query equally): compare them on the
    # scale of the largest entry instead of their own rounding noise.
    floor = 1e-6 * max(float(jnp.max(r)) for r in ref)
    return max(
        float(jnp.max(jnp.abs(f - r)) / max(float(jnp.max(r)), floor))
        for f, r in zip(got, ref, strict=True)
    )


# --------------------------------------------------------------------------
# The round-robin driver
# --------------------------------------------------------------------------

Task = tuple[str, Callable[[], Any]]


def examples_for(cfg: Config, name: str) -> int:
    return cfg.examples[MODELS.index(name)]


def sweep_tasks(model: Model, pool: Pool, cfg: Config) -> list[Task]:
    """Round 1: every size of the sweeps, the kinds and the baselines."""
    n = examples_for(cfg, model.name)
    tasks: list[Task] = []
    for m in cfg.micro_sizes:
        tasks.append(
            (
                f"fisher empirical m={m}",
                lambda m=m: timed_estimator(
                    "diagonal_fisher", model, pool, n, m, "empirical"
                ),
            )
        )
    for m in sorted(set(cfg.micro_sizes) | set(cfg.kron_micro_sizes)):
        tasks.append(
            (f"batched m={m}", lambda m=m: batched_baseline(model, pool, n, m))
        )
    for m in cfg.kron_micro_sizes:
        tasks += [
            (
                f"gram m={m}",
                lambda m=m: timed_estimator("gram", model, pool, n, m, None),
            ),
            (
                f"kfac empirical m={m}",
                lambda m=m: timed_estimator("kfac", model, pool, n, m, "empirical"),
            ),
        ]
    m0 = cfg.kron_micro_sizes[0]
    for est, kind, label in (
        ("diagonal_fisher", "empirical", "fisher empirical"),
        ("gram", None, "gram"),
        ("kfac", "empirical", "kfac empirical"),
    ):
        if not cfg.variants:
            break
        tasks.append(
            (
                f"{label}, no finiteness check m={m0}",
                lambda est=est, kind=kind: without_finite_check(
                    est, model, pool, n, m0, kind
                ),
            )
        )
    if cfg.exact:
        tasks.append(
            (
                f"kfac exact m={m0}",
                lambda: timed_estimator(
                    "kfac", model, pool, cfg.exact_examples, m0, "exact"
                ),
            )
        )
    if cfg.variants:
        tasks.append(
            (
                f"kfac empirical, fallback=None m={m0}",
                lambda: timed_estimator(
                    "kfac", model, pool, n, m0, "empirical", fallback=None
                ),
            )
        )
    for variant in ("two calls", "fused", "dispatch"):
        tasks.append(
            (
                f"loop {variant}",
                lambda v=variant: loop_baseline(model, pool, cfg.loop_examples, v),
            )
        )
    tasks.append(("full batch", lambda: full_batch_baseline(model, pool, n)))
    return tasks


def profile_tasks(model: Model, pool: Pool, cfg: Config, m: int) -> list[Task]:
    """Round 2, at the fastest micro-batch size: the headline, the exact kind and
    the same-size baseline, measured together."""
    n = examples_for(cfg, model.name)
    tasks: list[Task] = [
        (
            "fisher empirical",
            lambda: timed_estimator("diagonal_fisher", model, pool, n, m, "empirical"),
        ),
        ("batched", lambda: batched_baseline(model, pool, n, m)),
    ]
    if cfg.variants:
        tasks.append(
            (
                "fisher empirical, kernels only",
                lambda: timed_estimator(
                    "diagonal_fisher",
                    model,
                    pool,
                    n,
                    m,
                    "empirical",
                    leaves=kernels_only(model.params),
                ),
            )
        )
    if cfg.exact:
        tasks.append(
            (
                "fisher exact",
                lambda: timed_estimator(
                    "diagonal_fisher", model, pool, cfg.exact_examples, m, "exact"
                ),
            )
        )
    return tasks


START = time.perf_counter()


def elapsed() -> str:
    return f"{time.perf_counter() - START:.0f} s"


def round_robin(tasks: list[Task], reps: int, label: str) -> dict[str, list[Any]]:
    """Runs every task ``reps`` times, rotating the order each time."""
    out: dict[str, list[Any]] = {name: [] for name, _ in tasks}
    for rep in range(reps):
        shift = rep % len(tasks)
        for name, thunk in tasks[shift:] + tasks[:shift]:
            out[name].append(thunk())
        print(f"  {label}: rep {rep + 1}/{reps} done ({elapsed()})", flush=True)
    return out


def medians(runs: dict[str, list[Any]]) -> dict[str, dict[str, float]]:
    """Median of every numeric field (a bare float is the rate)."""
    out = {}
    for name, values in runs.items():
        dicts = [v if isinstance(v, dict) else {"rate": v} for v in values]
        out[name] = {k: float(np.median([d[k] for d in dicts])) for k in dicts[0]}
        out[name]["rate_min"] = min(float(d["rate"]) for d in dicts)
        out[name]["rate_max"] = max(float(d["rate"]) for d in dicts)
    return out


def measure_model(name: str, cfg: Config) -> dict[str, Any]:
    model = build_model(name, cfg)
    pool = make_pool(cfg)
    print(f"{name}: {model.size:,} parameters", flush=True)
    cold = cold_calls(model, pool) if cfg.warmup else {}
    sweep = round_robin(sweep_tasks(model, pool, cfg), cfg.reps, f"{name} sweep")
    sweep_med = medians(sweep)
    best = max(
        cfg.micro_sizes, key=lambda m: sweep_med[f"fisher empirical m={m}"]["rate"]
    )
    profile = round_robin(
        profile_tasks(model, pool, cfg, best), cfg.reps, f"{name} m={best}"
    )
    return {
        "parameters": model.size,
        "best_micro": best,
        "cold_calls": cold,
        "sweep": sweep_med,
        "profile": medians(profile),
        "loop_agreement": loop_agreement(model, pool),
        "fisher_paths": fisher_paths(model, best),
        "flop_floor": kernel_flop_floors(model, cfg.kron_micro_sizes[0]),
        "runs": {"sweep": sweep, "profile": profile},
    }


# --------------------------------------------------------------------------
# Subprocesses: peak memory, and the YNNPACK diagnostic
# --------------------------------------------------------------------------


def fresh_batches(cfg: Config, examples: int, seed: int) -> Iterator[dict]:
    """New random batches, generated on demand and dropped after use."""
    rng = np.random.default_rng(seed)
    for _ in range(examples // cfg.batch_size):
        yield random_batch(rng, cfg.batch_size)


def proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Wraps the batches: at the request of batch 1 (the step compiled, batch 0
    dispatched) records the peak so far and resets it; records the RSS at every
    request."""

    def __init__(self, batches: Any):
        self.batches = batches
        self.first_peak = float("nan")
        self.reset = False
        self.rss: list[float] = []
        self.live: list[float] = []

    def __iter__(self) -> Iterator[dict]:
        for i, batch in enumerate(self.batches):
            if i == 1:
                self.first_peak = proc_status_mb("VmHWM")
                self.reset = reset_peak()
            self.rss.append(proc_status_mb("VmRSS"))
            self.live.append(live_arrays_mb())
            yield batch


def live_arrays_mb() -> float:
    """MB held by live JAX arrays (what the process keeps between batches)."""
    arrays = jax.live_arrays()
    total = sum(a.nbytes for a in arrays) / 2**20
    del arrays  # a reference kept across the yield would keep them alive
    return total


def memory_child(model_name: str, examples: int, hold_data: bool, cfg: Config) -> dict:
    model = build_model(model_name, cfg)
    batches: Any = fresh_batches(cfg, examples, seed=1)
    if hold_data:
        batches = list(batches)
    probe = MemoryProbe(batches)
    reset_peak()
    before = proc_status_mb("VmRSS")
    live_before = live_arrays_mb()
    start = time.perf_counter()
    out = mats_jax.diagonal_fisher(
        model.fn,
        model.params,
        probe,
        kind="empirical",
        micro_batch_size=cfg.memory_micro,
        progress=False,
    )
    jax.block_until_ready(jax.tree.leaves(out))
    return {
        "model": model_name,
        "examples": examples,
        "hold_data": hold_data,
        "rss_before_mb": before,
        "first_batch_peak_mb": probe.first_peak,
        "peak_mb": proc_status_mb("VmHWM"),
        "peak_reset": probe.reset,
        "rss_batch1_mb": probe.rss[1],
        "rss_quartiles_mb": [
            probe.rss[min(len(probe.rss) - 1, len(probe.rss) * q // 4)]
            for q in (1, 2, 3)
        ]
        + [probe.rss[-1]],
        "rss_last_mb": probe.rss[-1],
        "live_max_mb": max(probe.live) - live_before,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "seconds": time.perf_counter() - start,
    }


def run_child(args: list[str], env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def quick_flag(quick: bool) -> list[str]:
    return ["--quick"] if quick else []


def memory_scaling(cfg: Config, quick: bool) -> list[dict]:
    rows = []
    for name in cfg.memory_models:
        for rep in range(cfg.memory_reps):
            for n in cfg.memory_examples:
                row = run_child(["--child-memory", name, str(n), *quick_flag(quick)])
                rows.append({**row, "rep": rep})
                print(
                    f"  memory {name} {n}: peak {row['peak_mb']:.0f} MB ({elapsed()})",
                    flush=True,
                )
    if cfg.memory_control:
        n, name = cfg.memory_examples[-1], cfg.memory_models[0]
        args = ["--child-memory", name, str(n), "--hold-data", *quick_flag(quick)]
        rows.append({**run_child(args), "rep": 0})
    return rows


def reduction_repro() -> dict[str, float]:
    """ms for ``jnp.sum(g, axis=0)``, g: f32[32, 784, 256], and as pairwise halvings."""
    g = jnp.asarray(np.random.default_rng(0).random((32, 784, 256), np.float32))

    def pairwise(x: jax.Array) -> jax.Array:
        while x.shape[0] > 1:
            x = x[0::2] + x[1::2]  # the size is a power of two here
        return x[0]

    out = {}
    for name, fn in {
        "sum(g, axis=0)": lambda x: jnp.sum(x, axis=0),
        "pairwise": pairwise,
    }.items():
        f = jax.jit(fn)
        jax.block_until_ready(f(g))
        start = time.perf_counter()
        for _ in range(10):
            r = f(g)
        jax.block_until_ready(r)
        out[name] = (time.perf_counter() - start) / 10 * 1e3
    return out


def diagnostic_child(cfg: Config) -> dict:
    """The main measurements at m=32, one rep, under this process's XLA_FLAGS."""
    out: dict[str, Any] = {"reduction_ms": reduction_repro()}
    m = 32
    for name in MODELS:
        n = examples_for(cfg, name)
        model = build_model(name, cfg)
        pool = make_pool(cfg)
        cold_calls(model, pool, VARIANTS_MEASURED_HOT[:1])
        out[name] = {
            "diagonal_fisher": timed_estimator(
                "diagonal_fisher", model, pool, n, m, "empirical"
            )["rate"],
            "batched (fwd+bwd)": batched_baseline(model, pool, n, m),
            "full batch": full_batch_baseline(model, pool, n),
        }
    return out


def ynn_diagnostic(cfg: Config, quick: bool) -> dict | None:
    if not cfg.diagnostic:
        return None
    args = ["--child-diagnostic", *quick_flag(quick)]
    return {
        "default": run_child(args, env={"XLA_FLAGS": ""}),
        "ynn_reduce_off": run_child(args, env={"XLA_FLAGS": YNN_OFF}),
    }


# --------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------


def kron_entry(sweep: dict, stat: str, m: int) -> dict[str, float]:
    rate, base = sweep[f"{stat} m={m}"]["rate"], sweep[f"batched m={m}"]["rate"]
    return {"micro": m, "rate": rate, "fwd_bwd": base, "slowdown": base / rate}


def summarise_model(res: dict[str, Any], cfg: Config) -> dict[str, Any]:
    sweep, prof, m = res["sweep"], res["profile"], res["best_micro"]
    fisher = prof["fisher empirical"]
    loop = sweep["loop two calls"]["rate"]
    batched = {"one batched grad": sweep["full batch"]["rate"]}
    for k in sorted(set(cfg.micro_sizes) | set(cfg.kron_micro_sizes)):
        batched[f"grads per micro-batch, m={k}"] = sweep[f"batched m={k}"]["rate"]
    best_name = max(batched, key=batched.__getitem__)
    m0 = cfg.kron_micro_sizes[0]
    kron = {  # at the micro-batch size with the best ratio to fwd+bwd
        stat: min(
            (kron_entry(sweep, stat, k) for k in cfg.kron_micro_sizes),
            key=lambda e: e["slowdown"],
        )
        for stat in ("gram", "kfac empirical")
    }
    if f"kfac exact m={m0}" in sweep:
        kron["kfac exact"] = kron_entry(sweep, "kfac exact", m0)
    if f"kfac empirical, fallback=None m={m0}" in sweep:
        kron["kfac empirical, fallback=None"] = kron_entry(
            sweep, "kfac empirical, fallback=None", m0
        )
    kron["kfac empirical, same m"] = kron_entry(sweep, "kfac empirical", m0)
    no_check = {}
    for label in ("fisher empirical", "gram", "kfac empirical"):
        if f"{label}, no finiteness check m={m0}" not in sweep:
            continue
        with_check = sweep[f"{label} m={m0}"]["rate"]
        without = sweep[f"{label}, no finiteness check m={m0}"]["rate"]
        no_check[label] = {
            "rate": with_check,
            "no_check": without,
            "gain": without / with_check,
        }
    return {
        "micro": m,
        "m0": m0,
        "fisher": fisher["rate"],
        "fisher_min": fisher["rate_min"],
        "fisher_max": fisher["rate_max"],
        "fisher_exact": prof.get("fisher exact", {}).get("rate"),
        "kernels_only": prof.get("fisher empirical, kernels only", {}).get("rate"),
        "loop": loop,
        "loop_fused": sweep["loop fused"]["rate"],
        "loop_dispatch": sweep["loop dispatch"]["rate"],
        "batched": batched,
        "best_batched_name": best_name,
        "best_batched": batched[best_name],
        "micro_batched": prof["batched"]["rate"],
        "speedup_vs_loop": fisher["rate"] / loop,
        "ceiling_vs_loop": batched[best_name] / loop,
        "slowdown_vs_batched": batched[best_name] / fisher["rate"],
        "slowdown_vs_micro_batched": prof["batched"]["rate"] / fisher["rate"],
        "no_check": no_check,
        "kron": kron,
        "loop_target_met": fisher["rate"] >= TARGET_VS_LOOP * loop,
        "batched_target_met": batched[best_name] <= TARGET_VS_BATCHED * fisher["rate"],
        "kron_target_met": {
            k: kron[k]["slowdown"] <= TARGET_KRONECKER
            for k in ("gram", "kfac empirical")
        },
    }


def fit_growth(rows: list[dict]) -> dict[str, float | None]:
    """Least-squares line of the peak against the number of examples."""
    x = np.array([r["examples"] for r in rows], float) / 1000.0
    y = np.array([r["peak_mb"] for r in rows], float)
    if len(x) >= 4:
        coef, cov = np.polyfit(x, y, 1, cov=True)
        se: float | None = float(np.sqrt(cov[0, 0]))
    else:
        coef, se = np.polyfit(x, y, 1), None
    return {"slope_mb_per_1k": float(coef[0]), "slope_se": se}


def summarise_memory(rows: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"models": {}}
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name and not r["hold_data"]]
        if not mine:
            continue
        sizes = sorted({r["examples"] for r in mine})
        mean = {
            n: float(np.mean([r["peak_mb"] for r in mine if r["examples"] == n]))
            for n in sizes
        }
        fit = fit_growth(mine)
        same_n = [[r["peak_mb"] for r in mine if r["examples"] == n] for n in sizes]
        noise = max(max(p) - min(p) for p in same_n) if len(same_n[0]) > 1 else None
        largest = [r for r in mine if r["examples"] == sizes[-1]]
        drift = float(
            np.mean([r["rss_last_mb"] - r["rss_quartiles_mb"][0] for r in largest])
        )
        growth = mean[sizes[-1]] - mean[sizes[0]]
        ratio = mean[sizes[-1]] / mean[sizes[0]]
        live = {
            n: float(np.mean([r["live_max_mb"] for r in mine if r["examples"] == n]))
            for n in sizes
        }
        live_growth = live[sizes[-1]] - live[sizes[0]]
        out["models"][name] = {
            "mean_peak_mb": mean,
            "ratio": ratio,
            "growth_mb": growth,
            "noise_mb": noise,
            "fitted_growth_mb": fit["slope_mb_per_1k"] * (sizes[-1] - sizes[0]) / 1e3,
            **fit,
            "drift_mb": drift,
            "drift_rel": drift / mean[sizes[-1]],
            "live_mb": live,
            "live_growth_mb": live_growth,
            "live_flat": live_growth <= max(LIVE_FLAT_MB, 0.05 * live[sizes[0]]),
            "flat": ratio <= MEMORY_FLAT_RATIO
            and live_growth <= max(LIVE_FLAT_MB, 0.05 * live[sizes[0]]),
        }
    for control in (r for r in rows if r["hold_data"]):
        same = [
            r["peak_mb"]
            for r in rows
            if r["model"] == control["model"]
            and r["examples"] == control["examples"]
            and not r["hold_data"]
        ]
        out["control_model"] = control["model"]
        out["control_growth_mb"] = control["peak_mb"] - float(np.mean(same))
        out["control_data_mb"] = control["examples"] * (IMAGE + 1) * 4 / 2**20
    return out


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _f(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _met(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def _slope(v: dict[str, Any]) -> str:
    """The fitted slope of the peaks, with its standard error where there is one."""
    se = v["slope_se"]
    return _f(v["slope_mb_per_1k"]) + ("" if se is None else f" ± {_f(se)}")


def _slower(ratio: float) -> str:
    """A time ratio (other's rate / ours) in words."""
    return f"{_f(ratio)}× slower" if ratio >= 1 else f"{_f(1 / ratio)}× faster"


def targets_table(summary: dict[str, Any]) -> str:
    s = summary["models"]
    rows = [
        [
            f"(1) diagonal_fisher ≥ {TARGET_VS_LOOP:g}× faster than the per-example loop (a)"
        ]
        + [
            f"{_met(s[n]['loop_target_met'])}: {_f(s[n]['speedup_vs_loop'])}×"
            for n in MODELS
        ],
        [
            f"(2) diagonal_fisher within {TARGET_VS_BATCHED:g}× of the batched gradient (b)"
        ]
        + [
            f"{_met(s[n]['batched_target_met'])}: {_slower(s[n]['slowdown_vs_batched'])}"
            for n in MODELS
        ],
    ]
    for i, stat in enumerate(("gram", "kfac empirical"), start=3):
        rows.append(
            [f"({i}) {stat} within {TARGET_KRONECKER:g}× of a forward+backward pass"]
            + [
                f"{_met(s[n]['kron_target_met'][stat])}: "
                f"{_slower(s[n]['kron'][stat]['slowdown'])} (m={s[n]['kron'][stat]['micro']})"
                for n in MODELS
            ]
        )
    mem = summary["memory"]["models"]
    rows.append(
        ["(5) peak memory of diagonal_fisher flat in the number of examples"]
        + [
            f"{_met(mem[n]['flat'])}: peak RSS largest/smallest "
            f"×{_f(mem[n]['ratio'], 4)} ({_f(mem[n]['growth_mb'])} MB; slope "
            f"{_slope(mem[n])} MB per 1,000 examples); live arrays "
            f"{_f(mem[n]['live_growth_mb'])} MB more"
            if n in mem
            else "not measured"
            for n in MODELS
        ]
    )
    return _table(["target", "MLP", "ViT"], rows)


def headline_section(summary: dict[str, Any]) -> str:
    rows = []
    for name in MODELS:
        s = summary["models"][name]
        rows.append(
            [
                name.upper(),
                str(s["micro"]),
                f"{_f(s['fisher'])} ({_f(s['fisher_min'])}–{_f(s['fisher_max'])})",
                _f(s["loop"]),
                _f(s["loop_fused"]),
                _f(s["loop_dispatch"]),
                f"{_f(s['best_batched'])} ({s['best_batched_name']})",
                _f(s["speedup_vs_loop"]),
                _f(s["ceiling_vs_loop"]),
                _f(s["slowdown_vs_batched"]),
                _f(s["fisher_exact"]),
            ]
        )
    header = [
        "model",
        "m",
        "diagonal_fisher (empirical) ex/s (range over reps)",
        "(a) loop ex/s",
        "loop, fused ex/s",
        "loop, dispatch only ex/s",
        "(b) batched gradient ex/s",
        "fisher / loop (target ≥ 20)",
        "(b) / loop: ceiling",
        "(b) / fisher (target ≤ 3)",
        "diagonal_fisher (exact) ex/s",
    ]
    return (
        "## Headline: diagonal_fisher against the baselines\n\n"
        + _table(header, rows)
        + "\n\n*m*: the fastest `micro_batch_size` of the sweep below, re-measured in a second "
        "round (so the headline is not the lucky draw that picked it). (a) *loop*: per "
        "example, a jitted `jax.grad` of its log-likelihood, then a jitted accumulate of the "
        "squares (two dispatches); *fused*: both in one jitted call; *dispatch only*: the same "
        "loop calling a jitted function that returns its accumulator unchanged. (b): the "
        "fastest of one jitted `value_and_grad` of the summed log-likelihood over all the "
        "examples at once and the same over micro-batches of each size, summed (which one "
        "is named). *ceiling*: the speedup over the loop of a Fisher that cost no more than "
        "(b). The exact kind backpropagates 10 cotangents per example.\n"
    )


def sweep_section(results: dict[str, Any], cfg: Config) -> str:
    rows = []
    for name in MODELS:
        res = results["models"][name]
        sweep = res["sweep"]
        for m in cfg.micro_sizes:
            f = sweep[f"fisher empirical m={m}"]
            b = sweep[f"batched m={m}"]["rate"]
            rows.append(
                [
                    name.upper() + (" ←" if m == res["best_micro"] else ""),
                    str(m),
                    f"{_f(f['rate'])} ({_f(f['rate_min'])}–{_f(f['rate_max'])})",
                    _f(b),
                    _f(b / f["rate"]),
                ]
            )
    header = [
        "model",
        "micro_batch_size",
        "diagonal_fisher ex/s (range)",
        "grads per micro-batch (same m) ex/s",
        "ratio",
    ]
    return (
        '## diagonal_fisher, kind="empirical": micro-batch sweep\n\n'
        + _table(header, rows)
        + "\n\n← the fastest size. Compilation is excluded (see *First-call time and "
        "compilation*).\n"
    )


KRON_ROWS = ("gram", "kfac empirical", "kfac empirical, fallback=None", "kfac exact")


def kron_section(results: dict[str, Any], cfg: Config) -> str:
    rows = []
    for name in MODELS:
        sweep = results["models"][name]["sweep"]
        for stat in KRON_ROWS:
            for m in cfg.kron_micro_sizes:
                if f"{stat} m={m}" not in sweep:
                    continue
                r, b = sweep[f"{stat} m={m}"], sweep[f"batched m={m}"]["rate"]
                rows.append(
                    [
                        name.upper(),
                        stat,
                        str(m),
                        _f(r["rate"]),
                        _f(b),
                        _f(b / r["rate"]),
                    ]
                )
    header = [
        "model",
        "statistic",
        "m",
        "ex/s",
        "fwd+bwd (same m) ex/s",
        "fwd+bwd rate / statistic rate (target ≤ 1.5)",
    ]
    return (
        "## gram and kfac against one forward+backward pass\n\n"
        + _table(header, rows)
        + "\n\n*fwd+bwd*: a jitted `value_and_grad` of the summed log-likelihood with respect "
        "to the parameters per micro-batch of the same size, gradients summed. kfac's "
        'default `fallback="diagonal"` also computes the diagonal Fisher (vmapped '
        "per-example gradients) of the leaves that are not dense kernels (biases, LayerNorm "
        "scales and offsets, the position embedding); `fallback=None` shows the kernels' "
        "factors alone. The exact kind needs 10 backward passes and is shown for reference "
        f"({cfg.exact_examples} examples). "
        + " ".join(
            f"{n.upper()}: the dense kernels' matmul FLOPs alone put gram at "
            f"{_f(results['models'][n]['flop_floor']['gram'])}× and kfac at "
            f"{_f(results['models'][n]['flop_floor']['kfac'])}× the time of fwd+bwd "
            "(`kernel_flop_floors`)."
            for n in MODELS
        )
        + "\n"
    )


def compile_section(results: dict[str, Any], cfg: Config) -> str:
    rows = []
    for name in MODELS:
        res = results["models"][name]
        sweep, cold = res["sweep"], res["cold_calls"]
        m0 = cfg.kron_micro_sizes[0]
        later = {
            "diagonal_fisher empirical": sweep[
                f"fisher empirical m={res['best_micro']}"
            ],
            "diagonal_fisher exact": res["profile"].get("fisher exact"),
            "gram": sweep[f"gram m={m0}"],
            "kfac empirical": sweep[f"kfac empirical m={m0}"],
            "kfac exact": sweep.get(f"kfac exact m={m0}"),
        }
        for variant, r in later.items():
            if r is None:
                continue
            first = cold.get(variant, {})
            rows.append(
                [
                    name.upper(),
                    variant,
                    _f(first.get("total_s")),
                    _f(first.get("compile_s")),
                    _f(r["latency_s"]),
                    _f(r["compile_s"]),
                    _f(r["step_compiles"], 2),
                ]
            )
    header = [
        "model",
        "estimator",
        "first call (1 micro-batch of 32) s",
        "first call: XLA compile s",
        "later calls: latency s",
        "later calls: XLA compile s",
        "later calls: `jit(step)` compilations per call",
    ]
    return (
        "## First-call time and compilation\n\n"
        + _table(header, rows)
        + "\n\nCompilations are counted with `jax.monitoring` (backend compile events) during "
        "each call. *First call*: the first call of that estimator and kind in the process, "
        "on one micro-batch (it also compiles the eager operations around the step: the "
        "finiteness check, the final division). *Later calls*: medians over the timed calls "
        "(same estimator, same parameters; for other micro-batch sizes the first rep "
        "compiles, the others reuse it when the library caches the step).\n"
    )


def memory_section(
    results: dict[str, Any], summary: dict[str, Any], cfg: Config
) -> str:
    if not results["memory"]:
        return ""
    rows = [
        [
            r["model"].upper(),
            f"{r['examples']:,}",
            "yes (control)" if r["hold_data"] else "no (generator)",
            _f(r["rss_before_mb"]),
            _f(r["first_batch_peak_mb"]),
            _f(r["peak_mb"]),
            " / ".join(_f(x) for x in r["rss_quartiles_mb"]),
            _f(r["live_max_mb"]),
            _f(r["seconds"]),
        ]
        for r in sorted(
            results["memory"], key=lambda r: (r["model"], r["hold_data"], r["examples"])
        )
    ]
    header = [
        "model",
        "examples",
        "data held in memory",
        "RSS before the call MB",
        "peak up to batch 1 (compilation) MB",
        "peak over batches 1…N MB",
        "RSS at ¼ / ½ / ¾ / last batch MB",
        "live JAX arrays, max MB",
        "call s",
    ]
    mem = summary["memory"]
    reset = all(r["peak_reset"] for r in results["memory"])
    maxrss = max(r["ru_maxrss_mb"] for r in results["memory"])
    text = (
        "## Peak memory of diagonal_fisher against the number of examples\n\n"
        + _table(header, rows)
        + f"\n\nOne fresh subprocess per row ({cfg.memory_reps} per model and size, run "
        'interleaved); kind="empirical", '
        f"micro_batch_size={cfg.memory_micro}, batches of {cfg.batch_size} made by a "
        "generator. Peaks are the kernel's `VmHWM`, reset through `/proc/self/clear_refs` "
        "just before the call and again when batch 1 is requested (the step is compiled "
        "by then), so that the compilation is separated from the accumulation over the "
        "data"
        + (
            ""
            if reset
            else " (the reset failed: the peaks are those of the whole process)"
        )
        + ". At every batch request the RSS and the bytes of all live JAX arrays "
        "(`jax.live_arrays()`, beyond those alive before the call: what the estimator "
        "holds between batches, free of the allocator's noise) are read too. Verdict: "
        f"flat if the mean peak RSS at the largest size is within "
        f"{MEMORY_FLAT_RATIO - 1:.0%} of the smallest's and the live arrays grow by "
        f"less than {LIVE_FLAT_MB:g} MB (or 5%); the least-squares slope of the peaks "
        "against the number of examples is given with its standard error. "
        "(`ru_maxrss` is not usable here: the children are "
        "forked from the benchmark process and Linux keeps the parent's peak across "
        f"fork+exec; it reads up to {_f(maxrss)} MB.)\n\n"
    )
    for name, v in mem["models"].items():
        text += (
            f"- {name.upper()}: mean peak "
            + ", ".join(f"{_f(p)} MB at {n:,}" for n, p in v["mean_peak_mb"].items())
            + f"; identical runs differ by up to {_f(v['noise_mb'])} MB; least-squares "
            f"slope {_slope(v)} MB per 1,000 examples; RSS drift over the last three quarters of the "
            f"largest runs {_f(v['drift_mb'])} MB; live arrays at most "
            + ", ".join(f"{_f(p)} MB at {n:,}" for n, p in v["live_mb"].items())
            + ".\n"
        )
    if "control_growth_mb" in mem:
        text += (
            f"- Control ({mem['control_model'].upper()}): holding the same "
            f"{_f(mem['control_data_mb'])} MB of data in a list peaks "
            f"{_f(mem['control_growth_mb'])} MB above the generator runs with as many "
            "examples: growth of that size is visible to the measurement.\n"
        )
    return text


def profile_section(summary: dict[str, Any], results: dict[str, Any]) -> str:
    rows = []
    for name in MODELS:
        s = summary["models"][name]
        for label, v in s["no_check"].items():
            rows.append(
                [
                    name.upper(),
                    label,
                    str(s["m0"]),
                    _f(v["rate"]),
                    _f(v["no_check"]),
                    _f(v["gain"]),
                ]
            )
    text = "## Where the time goes\n\n"
    if rows:
        text += (
            "**The finiteness test.** `accumulate` tests the sums for NaN/Inf on "
            "the device after every batch (`record_first_bad`, one dispatch per "
            "batch). Replaced by a no-op for the call (same round of measurements "
            "as the sweep):\n\n"
            + _table(
                ["model", "estimator", "m", "ex/s", "test patched out ex/s", "gain"],
                rows,
            )
            + "\n\n"
        )
    rows = []
    for name in MODELS:
        s, res = summary["models"][name], results["models"][name]
        paths = res["fisher_paths"]
        rows.append(
            [
                name.upper(),
                str(s["micro"]),
                f"{paths['outer_product']} of {paths['kernels']}",
                _f(s["fisher"]),
                _f(s["kernels_only"]),
                _f(s["micro_batched"]),
                _f(res["loop_agreement"]),
            ]
        )
    text += (
        "**Which leaves need per-example gradients.** diagonal_fisher takes a dense "
        "kernel used once with one row per example through the outer product "
        "(x²)ᵀ(g²) of one batched backward pass; every other leaf (biases, norms, the "
        "position embedding, kernels applied to several rows per example) gets vmapped "
        "per-example gradients in a second pass:\n\n"
        + _table(
            [
                "model",
                "m",
                "kernels on the outer-product path",
                "diagonal_fisher ex/s",
                "…kernels only (`leaves=`) ex/s",
                "fwd+bwd (same m) ex/s",
                "max rel. difference from the loop's Σ g²",
            ],
            rows,
        )
        + "\n\nThe last column compares diagonal_fisher (empirical) with the squared "
        "per-example gradients that the loop baseline accumulates, on one batch of "
        f"{results['config']['batch_size']} (relative to each leaf's largest entry, or "
        "1e-6 of the largest entry overall for leaves whose Fisher is zero in exact "
        "arithmetic, such as an attention key bias).\n"
    )
    diag = results.get("diagnostic")
    if diag:
        rows = []
        for name in MODELS:
            for key, a in diag["default"][name].items():
                b = diag["ynn_reduce_off"][name][key]
                rows.append([name.upper(), key, _f(a), _f(b), _f(b / a)])
        for key, a in diag["default"]["reduction_ms"].items():
            b = diag["ynn_reduce_off"]["reduction_ms"][key]
            rows.append(
                ["–", f"{key}, g: f32[32,784,256] (ms)", _f(a), _f(b), _f(a / b)]
            )
        text += (
            "\n**XLA's YNNPACK reduce fusion.** The same at m=32, one rep each, in two "
            "fresh subprocesses: XLA's defaults, and "
            f"`XLA_FLAGS={YNN_OFF}`:\n\n"
            + _table(
                [
                    "model",
                    "measurement (ex/s)",
                    "default",
                    "reduce fusion off",
                    "off / default",
                ],
                rows,
            )
            + "\n\nThe last rows time a reduction over the leading axis alone, "
            "`jnp.sum(g, axis=0)`, and the same sum as log2(32) pairwise halvings "
            "`x[0::2] + x[1::2]` (as `estimate.sum_over_examples` now sums over "
            "examples), in milliseconds (last column: default / off).\n"
        )
    return text


def _loop_conclusion(s: dict[str, Any]) -> str:
    mlp, vit = s["mlp"], s["vit"]
    text = (
        f"- **(1) Loop.** diagonal_fisher runs {_f(mlp['speedup_vs_loop'])}× (MLP) and "
        f"{_f(vit['speedup_vs_loop'])}× (ViT) as fast as the per-example loop. The loop's "
        f"dispatch floor is {_f(1e6 / mlp['loop_dispatch'])} µs "
        f"per example and its whole cost {_f(1e6 / mlp['loop'])} µs (MLP) and "
        f"{_f(1e6 / vit['loop'])} µs (ViT), so a Fisher that cost no more than the fastest "
        f"batched gradient would be {_f(mlp['ceiling_vs_loop'])}× (MLP) and "
        f"{_f(vit['ceiling_vs_loop'])}× (ViT) faster than the loop, and no more. "
    )
    for name, v in (("MLP", mlp), ("ViT", vit)):
        if v["ceiling_vs_loop"] < TARGET_VS_LOOP:
            text += f"For the {name} the target is out of reach of any implementation. "
        elif not v["loop_target_met"]:
            need = TARGET_VS_LOOP * v["loop"]
            text += (
                f"The {name} needs {_f(need)} ex/s, {_f(need / v['fisher'])}× its "
                "current rate"
                + (
                    f" (its kernels alone already run at {_f(v['kernels_only'])})"
                    if v["kernels_only"]
                    else ""
                )
                + ". "
            )
    return text + _dispatch_share(mlp, vit)


def _dispatch_share(mlp: dict[str, Any], vit: dict[str, Any]) -> str:
    """How much of the loop's time per example its dispatch floor takes."""
    share = {n: v["loop"] / v["loop_dispatch"] for n, v in (("MLP", mlp), ("ViT", vit))}
    text = (
        "Dispatch is "
        + " and ".join(f"{v:.0%} ({n})" for n, v in share.items())
        + " of the loop's time per example"
    )
    if all(v < 0.5 for v in share.values()):
        return text + (
            ": one example's gradient costs more than its dispatch here, while the "
            f"{TARGET_VS_LOOP:g}× target presumes a loop dominated by dispatch."
        )
    return text + "."


def _batched_conclusion(s: dict[str, Any], results: dict[str, Any]) -> str:
    mlp, vit = s["mlp"], s["vit"]
    if mlp["kernels_only"] is None:
        return (
            f"- **(2) Batched gradient.** diagonal_fisher is "
            f"{_f(mlp['slowdown_vs_batched'])}× (MLP) and "
            f"{_f(vit['slowdown_vs_batched'])}× (ViT) slower than (b)."
        )
    paths = {n: results["models"][n]["fisher_paths"] for n in MODELS}
    return (
        f"- **(2) Batched gradient.** diagonal_fisher is {_f(mlp['slowdown_vs_batched'])}× "
        f"(MLP) and {_f(vit['slowdown_vs_batched'])}× (ViT) slower than the fastest "
        f"batched gradient ({mlp['best_batched_name']}; {vit['best_batched_name']}), and "
        f"{_f(mlp['slowdown_vs_micro_batched'])}× and "
        f"{_f(vit['slowdown_vs_micro_batched'])}× slower than fwd+bwd at its own m. All "
        f"{paths['mlp']['kernels']} MLP kernels take the outer-product path, whose FLOPs "
        "equal fwd+bwd's (a forward, a backward to the layer outputs, one (x²)ᵀ(g²) "
        "product per kernel); the second, per-example pass for the "
        f"{paths['mlp']['kernels']} biases costs "
        + (
            f"×{_f(mlp['kernels_only'] / mlp['fisher'])}"
            if mlp["kernels_only"] >= 1.05 * mlp["fisher"]
            else "nothing measurable"
        )
        + f" (kernels only: {_f(mlp['kernels_only'])} ex/s against {_f(mlp['fisher'])}), and "
        "the kernels alone still take "
        f"{_f(mlp['micro_batched'] / mlp['kernels_only'])}× fwd+bwd's time at that m "
        "(beyond fwd+bwd they run the tapped forward, the squares and the finiteness "
        "test, profiled below). Only "
        f"{paths['vit']['outer_product']} of the ViT's "
        f"{paths['vit']['kernels']} kernels see one row per example; the others (16 "
        "tokens per example) and all its norms and biases need per-example gradients "
        f"(kernels only: {_f(vit['kernels_only'])} ex/s against "
        f"{_f(vit['fisher'])} for every leaf)."
    )


def _check_conclusion(s: dict[str, Any]) -> str:
    if not s["mlp"]["no_check"]:
        return "- The finiteness test was not profiled (`--quick`)."
    parts = [
        f"{label} ×{_f(v['gain'])}"
        for name in MODELS
        for label, v in [
            (f"{name.upper()} {k}", s[name]["no_check"][k]) for k in s[name]["no_check"]
        ]
    ]
    worst = max(v["gain"] for n in MODELS for v in s[n]["no_check"].values())
    return (
        "- **The finiteness test** runs on the device once per batch, over the sums "
        "(for gram and kfac that includes the 784×784 factor of the MLP's "
        f"first layer). Replacing it by a no-op changes the rates at m={s['mlp']['m0']} "
        "by: "
        + ", ".join(parts)
        + (": none by more than 10%." if worst <= 1.1 else f": up to ×{_f(worst)}.")
    )


def _ynn_conclusion(results: dict[str, Any]) -> str:
    d, o = results["diagnostic"]["default"], results["diagnostic"]["ynn_reduce_off"]
    red = "sum(g, axis=0)"
    changes = ", ".join(
        f"{n.upper()} ×{_f(o[n]['diagonal_fisher'] / d[n]['diagonal_fisher'])}"
        for n in MODELS
    )
    slowdown = d["reduction_ms"][red] / o["reduction_ms"][red]
    return (
        "- **XLA's YNNPACK reduce fusion** (jaxlib "
        f"{results['machine']['jaxlib']}) makes a reduction over the leading axis "
        f"{_slower(slowdown)}: `jnp.sum(g, axis=0)` takes {_f(d['reduction_ms'][red])} ms for "
        f"32×784×256 floats, {_f(o['reduction_ms'][red])} ms with the fusion off and "
        f"{_f(d['reduction_ms']['pairwise'])} ms as pairwise halvings. The library now "
        "sums over examples by pairwise halving; with the fusion off diagonal_fisher "
        f"changes by {changes} (single repetitions; the flag moves the baselines too, "
        f"e.g. MLP one batched gradient ×{_f(o['mlp']['full batch'] / d['mlp']['full batch'])})."
    )


def _kron_conclusion(s: dict[str, Any], results: dict[str, Any]) -> str:
    k = {n: s[n]["kron"] for n in MODELS}
    floor = {n: results["models"][n]["flop_floor"] for n in MODELS}
    same = k["mlp"]["kfac empirical, same m"]["micro"]
    fallback = "kfac empirical, fallback=None"
    if fallback not in k["mlp"]:
        return (
            f"- **(3, 4) gram / kfac.** gram is {_slower(k['mlp']['gram']['slowdown'])} "
            f"(MLP) and {_slower(k['vit']['gram']['slowdown'])} (ViT) than a "
            f"forward+backward pass; kfac (empirical) "
            f"{_slower(k['mlp']['kfac empirical']['slowdown'])} and "
            f"{_slower(k['vit']['kfac empirical']['slowdown'])}."
        )
    return (
        f"- **(3, 4) gram / kfac.** gram is {_slower(k['mlp']['gram']['slowdown'])} (MLP) "
        f"and {_slower(k['vit']['gram']['slowdown'])} (ViT) than a forward+backward pass; "
        f"kfac (empirical) {_slower(k['mlp']['kfac empirical']['slowdown'])} and "
        f"{_slower(k['vit']['kfac empirical']['slowdown'])}, at the micro-batch sizes "
        "where the ratio is best. The dense kernels' FLOPs alone put gram at "
        f"{_f(floor['mlp']['gram'])}× and kfac at {_f(floor['mlp']['kfac'])}× the time of "
        "fwd+bwd on the MLP (its first layer has 784 inputs and 256 outputs, so A = xᵀx "
        "costs three times that layer's forward), and at "
        f"{_f(floor['vit']['gram'])}× and {_f(floor['vit']['kfac'])}× on the ViT (kernels "
        f"only){_out_of_reach(floor)}. kfac's default diagonal fallback adds a "
        f"second, per-example pass: without it (`fallback=None`, m={same}) kfac runs at "
        f"{_f(k['mlp']['kfac empirical, fallback=None']['rate'])} instead of "
        f"{_f(k['mlp']['kfac empirical, same m']['rate'])} ex/s (MLP) and "
        f"{_f(k['vit']['kfac empirical, fallback=None']['rate'])} instead of "
        f"{_f(k['vit']['kfac empirical, same m']['rate'])} (ViT), "
        f"{_slower(k['vit']['kfac empirical, fallback=None']['slowdown'])} than fwd+bwd."
    )


def _out_of_reach(floor: dict[str, dict[str, float]]) -> str:
    """The Kronecker targets that the FLOPs alone rule out for plain matmuls."""
    missed = [
        f"{'target (3)' if stat == 'gram' else 'target (4)'} on the {name.upper()}"
        for name in MODELS
        for stat in ("gram", "kfac")
        if floor[name][stat] > TARGET_KRONECKER
    ]
    if not missed:
        return ""
    return (
        f": above the {TARGET_KRONECKER:g}× target, so "
        + " and ".join(missed)
        + " cannot be met with plain matmuls"
    )


def _memory_conclusion(results: dict[str, Any], mem: dict[str, Any]) -> str:
    """diagonal_fisher's peak memory over the data: what was measured, per model."""
    first = results["config"]["memory_examples"][0]
    last = results["config"]["memory_examples"][-1]
    path = _rss_path(results)
    flat = [n.upper() for n, v in mem.items() if v["flat"]]
    grows = [n.upper() for n, v in mem.items() if not v["flat"]]
    parts = []
    for n, v in mem.items():
        part = (
            f"{n.upper()} peak RSS largest/smallest ×{_f(v['ratio'], 4)} "
            f"({_f(v['growth_mb'])} MB; least-squares slope {_slope(v)} MB per 1,000 "
            f"examples{_noise(v)}), live JAX "
            "arrays " + " → ".join(f"{_f(x)}" for x in v["live_mb"].values()) + " MB"
        )
        if n in path:
            a, b, c = path[n]
            part += (
                f", RSS of the largest runs {_f(a)} MB at batch 1, {_f(b)} MB a quarter "
                f"through, {_f(c)} MB at the last batch"
            )
        parts.append(part)
    verdict = []
    if flat:
        verdict.append(
            f"within the target's {MEMORY_FLAT_RATIO - 1:.0%}: " + ", ".join(flat)
        )
    if grows:
        verdict.append(
            f"beyond it: {', '.join(grows)}"
            + (
                " (whose live JAX arrays do not grow: the growth is in the process's "
                "RSS, not in arrays the estimator holds)"
                if all(mem[n.lower()]["live_flat"] for n in grows)
                else ""
            )
        )
    return (
        f"- **(5) Memory.** Peak of diagonal_fisher from {first:,} to {last:,} examples: "
        + "; ".join(parts)
        + ". "
        + _sentence("; ".join(verdict))
    )


def _noise(v: dict[str, Any]) -> str:
    if v["noise_mb"] is None:
        return ""
    return f"; identical runs differ by up to {_f(v['noise_mb'])} MB"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _rss_path(results: dict[str, Any]) -> dict[str, tuple[float, float, float]]:
    """Mean RSS at batch 1, a quarter through and the last batch, largest runs."""
    out = {}
    for name in MODELS:
        rows = [
            r for r in results["memory"] if r["model"] == name and not r["hold_data"]
        ]
        if not rows:
            continue
        top = max(r["examples"] for r in rows)
        rows = [r for r in rows if r["examples"] == top]
        out[name] = (
            float(np.mean([r["rss_batch1_mb"] for r in rows])),
            float(np.mean([r["rss_quartiles_mb"][0] for r in rows])),
            float(np.mean([r["rss_last_mb"] for r in rows])),
        )
    return out


def conclusions(summary: dict[str, Any], results: dict[str, Any]) -> str:
    s = summary["models"]
    lines = [
        "## Conclusions\n",
        _loop_conclusion(s),
        _batched_conclusion(s, results),
        _kron_conclusion(s, results),
        _check_conclusion(s),
    ]
    if results.get("diagnostic"):
        lines.append(_ynn_conclusion(results))
    m0 = results["config"]["kron_micro_sizes"][0]
    vit = results["models"]["vit"]["sweep"]
    # The profile round calls diagonal_fisher again with a configuration that
    # the sweep already ran: a compilation there is a compilation per call.
    recompiles = max(
        results["models"][n]["profile"]["fisher empirical"]["step_compiles"]
        for n in MODELS
    )
    cold = results["models"]["vit"]["cold_calls"]
    if recompiles > 0:
        lines.append(
            "- **Every call compiles its step again**: e.g. "
            f"{_f(vit[f'kfac empirical m={m0}']['compile_s'])} s of XLA compilation "
            "in each kfac call on the ViT. Merging many tasks pays this once per task."
        )
    else:
        first_call = (
            f"the first call of kfac on the ViT takes "
            f"{_f(cold['kfac empirical']['total_s'])} s for one micro-batch "
            f"({_f(cold['kfac empirical']['compile_s'])} s of XLA compilation); "
            if cold
            else ""
        )
        lines.append(
            "- **Compilation is paid once per configuration**: "
            + first_call
            + "a later call with the same model function, kind, selection and shapes "
            "reuses the executable (no compilation in the second round's calls)."
        )
    mem = summary["memory"]["models"]
    lines.append(
        _memory_conclusion(results, mem)
        if mem
        else "- **(5) Memory.** Not measured in this run (`--device`)."
    )
    check_gain = max(
        (v["gain"] for n in MODELS for v in s[n]["no_check"].values()), default=1.0
    )
    todo = []
    if recompiles > 0:
        todo.append(
            "cache the jitted step across calls (on the model function, the kind, the "
            "selection and the shapes)"
        )
    if check_gain > 1.1:
        todo.append(
            "test finiteness every few batches, or on a scalar of each batch's sums"
        )
    if any(
        s[n]["kernels_only"] is not None
        and s[n]["kernels_only"] >= 1.05 * s[n]["fisher"]
        for n in MODELS
    ):
        todo.append(
            "the leaves still on the second, vmapped per-example pass (norms, and "
            "biases the capture cannot prove to be a Dense layer's: a proven one "
            "takes its squares from its layer's output gradient) cost ≥ 5% here: "
            "give them theirs from the taps where their gradient is a function of g"
        )
    if not all(v for n in MODELS for v in s[n]["kron_target_met"].values()):
        todo.append(
            "for gram and kfac, form A and G with a symmetric rank-k update, which "
            "halves the factors' matmul FLOPs"
        )
    numerals = ("i", "ii", "iii", "iv", "v")
    if todo:
        lines.append(
            "- **What the figures suggest changing in mats_jax**: "
            + "; ".join(f"({numerals[i]}) {t}" for i, t in enumerate(todo))
            + "."
        )
    return "\n".join(lines) + "\n"


def markdown(results: dict[str, Any], cfg: Config) -> str:
    info = results["machine"]
    load = ", ".join(f"{x:.1f}" for x in info["load_average_1_5_15min"])
    header = [
        "# Benchmark: statistics estimators on "
        + ("a CPU" if info["accelerator"] is None else info["accelerator"])
        + " (`benchmarks/estimators.py`)",
        "",
        f"- Command: `{results['command']}`",
        f"- Date: {results['date']}; mats_jax {info['mats_jax']} at git {results['git']}",
        f"- Machine: {info['cpu_count']}-core CPU, `lscpu` model name “{info['cpu_model']}”, "
        f"{info['accelerator'] or 'no accelerator'} (JAX backend `{info['jax_backend']}`); "
        f"{info['platform']}. Load average {load} at the start, on "
        f"{info['cpu_count']} cores; the targets are ratios measured in this run.",
        f"- Versions: Python {info['python']}, JAX {info['jax']}, jaxlib {info['jaxlib']}, "
        f"flax {info['flax']}, numpy {info['numpy']}; "
        f"`jax_default_matmul_precision` {info['matmul_precision']}; XLA_FLAGS "
        f"`{info['xla_flags'] or '(unset)'}`",
        f"- Models: MLP 784→256→256→10 ({results['models']['mlp']['parameters']:,} "
        "parameters); ViT: 16 tokens of 7×7 patches (Dense embedding), width 64, 2 heads "
        f"(`nn.MultiHeadDotProductAttention`), {cfg.vit_depth} pre-LayerNorm blocks with an "
        "MLP of 128 stacked by `nn.scan`, mean-pool, Dense head "
        f"({results['models']['vit']['parameters']:,} parameters). Random inputs and labels "
        f"(seed {cfg.seed}), batches of {cfg.batch_size}.",
        f"- Examples per measurement: MLP {cfg.examples[0]:,}, ViT {cfg.examples[1]:,} "
        f"(exact kinds {cfg.exact_examples:,}, "
        f"loop {cfg.loop_examples:,}); {cfg.reps} round-robin repetitions, medians.",
        f"- Total wall time: {results['total_seconds']:.0f} s",
        *(
            [
                "- **--quick smoke run: one repetition, no warm-up, tiny sizes; the numbers "
                "are not meaningful.**"
            ]
            if results["quick"]
            else []
        ),
        "",
        "## Targets\n",
        targets_table(results["summary"]),
        "",
    ]
    return "\n".join(
        [
            *header,
            conclusions(results["summary"], results),
            headline_section(results["summary"]),
            sweep_section(results, cfg),
            kron_section(results, cfg),
            compile_section(results, cfg),
            memory_section(results, results["summary"], cfg),
            profile_section(results["summary"], results),
        ]
    )


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (< 1 min)")
    parser.add_argument(
        "--device",
        action="store_true",
        help="on an accelerator: larger windows, no host-memory or XLA:CPU parts",
    )
    parser.add_argument("--reps", type=int, help="round-robin repetitions")
    parser.add_argument("--out", type=Path, help="output prefix, without suffix")
    parser.add_argument(
        "--child-memory", nargs=2, metavar=("MODEL", "EXAMPLES"), help=argparse.SUPPRESS
    )
    parser.add_argument("--hold-data", action="store_true", help=argparse.SUPPRESS)
    add_dirty_option(parser)
    parser.add_argument(
        "--child-diagnostic", action="store_true", help=argparse.SUPPRESS
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cfg = QUICK if args.quick else DEVICE if args.device else Config()
    if args.device and args.quick:
        cfg = dataclasses.replace(cfg, memory_models=(), memory_control=False)
    if args.reps:
        cfg = dataclasses.replace(cfg, reps=args.reps)
    if args.child_memory:
        name, n = args.child_memory
        print(json.dumps(memory_child(name, int(n), args.hold_data, cfg)))
        return
    if args.child_diagnostic:
        print(json.dumps(diagnostic_child(cfg)))
        return
    out = args.out or (
        QUICK_RESULTS / "estimators_quick" if args.quick else RESULTS / "estimators"
    )
    revision = check_destination(out, args.allow_dirty)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "command": " ".join(
            [".venv/bin/python", "benchmarks/estimators.py", *sys.argv[1:]]
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "git": revision,
        "machine": machine(flax=flax.__version__),
        "config": dataclasses.asdict(cfg),
        "quick": args.quick,
        "models": {name: measure_model(name, cfg) for name in MODELS},
    }
    print("memory…", flush=True)
    results["memory"] = memory_scaling(cfg, args.quick)
    print("YNNPACK diagnostic…", flush=True)
    results["diagnostic"] = ynn_diagnostic(cfg, args.quick)
    results["summary"] = {
        "models": {n: summarise_model(results["models"][n], cfg) for n in MODELS},
        "memory": summarise_memory(results["memory"]),
    }
    results["total_seconds"] = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    report = markdown(results, cfg)
    out.with_suffix(".md").write_text(report)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(report)
    print(f"wrote {out}.md and {out}.json")


if __name__ == "__main__":
    main()
