"""Benchmark: MaTS's per-block CG on the K-FAC systems of a small transformer.

For a K-FAC statistic ``C_m = A_m ⊗ G_m`` of a dense kernel ``W`` (Flax layout,
``(in, out)``), MaTS solves per block

    Σ_m A_m X G_m = Σ_m A_m W_m G_m

by conjugate gradient: each step costs two small matmuls per task. This script
builds such systems with the shapes of a small transformer (by default hidden
256, feed-forward 1024, 4 layers, 8 tasks: 24 kernels, plus biases and
LayerNorm leaves with no statistic, which take the fallback rule) from
synthetic but K-FAC-like factors, and measures, in one run:

1. Fixed iterations (100, ``tol=0``): ``mats_jax.mats`` with the divergence
   check every 20 steps and with it off (``check_every=0``), against
   - the matmul floor: one jitted function that does only the matmuls of 100
     CG steps (per step, per block, per task ``A_m @ V`` then ``@ G_m``,
     summed), batched as ``mats`` batches them (one loop per group of
     same-shaped blocks), with no CG around them;
   - the reference implementation's way: a Python loop over blocks of
     ``scipy.sparse.linalg.cg`` on a float32 ``LinearOperator`` whose matvec
     does ``Σ_m A_m V G_m`` in numpy (the right-hand side is formed inside the
     timed region, as ``mats`` forms it inside its own);
   - numpy's matmul floor: the scipy loop's matmuls alone, block by block.
   Compilation is timed separately (a first call with one iteration, minus a
   second one); the reported time is the median of several repetitions, run
   round-robin so that load on the shared machine hits every method alike.
2. Time to solve to a relative residual of 1e-5 on every block: ``mats`` with
   and without its Kronecker preconditioner, with ``group_blocks`` True and
   False, each against the scipy loop (``rtol=1e-5``) preconditioned the same
   way: without a preconditioner, or with the same nearest-Kronecker-product
   inverse, written again in numpy here (checked against
   ``KFAC.sum_preconditioner`` before anything is timed) and built inside the
   timed solve as ``mats`` builds its own. Speed-ups are reported without and
   with ``mats``'s compilation (each variant compiled from a cleared cache).
   Reports wall time, iterations per block, the true relative residuals
   (``mats``'s own report, and recomputed here in float64), and the
   difference between the ``mats`` and scipy solutions. The preconditioner's
   setup is timed on both sides: ``maxiter=0`` calls of ``mats`` with and
   without it, and the numpy inverses built and applied once.

jaxlib 0.10 hung in the preconditioned solve on a 2-core machine before
d3f338e (see the notes in the results); ``--workaround`` applies what earlier
runs needed (``NPROC=64``, one OpenBLAS thread for jaxlib's LAPACK calls). A
full run also checks, in a separate process, whether the hang happens.

Run from the repository root, from a committed tree (see ``provenance.py``;
``--allow-dirty`` to record anyway):

    .venv/bin/python benchmarks/solver_kfac.py            # full, ~13 min on 2 idle cores
    .venv/bin/python benchmarks/solver_kfac.py --quick    # smoke run, small shapes

It writes ``benchmarks/results/solver_kfac.{md,json}`` (``--quick``: under
the temporary directory; ``--out PREFIX`` anywhere); the markdown is
generated from the measured numbers.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import functools
import json
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy
import scipy.linalg  # loads the OpenBLAS whose LAPACK jaxlib's CPU kernels call
import scipy.sparse.linalg as spla
from provenance import (
    QUICK_RESULTS,
    RESULTS,
    add_dirty_option,
    check_destination,
    machine,
)

import mats_jax
from mats_jax import KFAC, format_report, mats, task_arithmetic

# jaxlib 0.10 runs a batched LAPACK call (eigh) by queueing the batch on XLA:CPU's
# intra-op pool and blocking until it is done: as many concurrent calls as the pool
# has threads (one per core) hang the process. mats's preconditioner runs two
# independent batched eigh per group of blocks; NPROC sizes the pool above that.
DEADLOCK_POOL_THREADS = 64
TOL = 1e-5
FIXED_TARGET_VS_FLOOR = 1.3
SOLVE_TARGET_VS_SCIPY = 3.0


@dataclasses.dataclass(frozen=True)
class Config:
    """Shapes, factor spectra and run lengths of one benchmark run."""

    hidden: int = 256
    ff: int = 1024
    layers: int = 4
    tasks: int = 8
    alpha: float = 0.7  # power-law exponent of the shared factor spectra
    task_fraction: float = 0.3  # share of a factor's trace in task-only directions
    task_rank: int = 32  # rank of each task's own directions
    samples_per_dim: int = 2  # n = samples_per_dim · d inputs per factor
    scale_spread: float = 3.0  # per-task scales of G_m drawn in [1/s, s]
    merge_scale: float = 0.3  # task-arithmetic λ of the initialisation
    fixed_iters: int = 100
    reps: int = 3  # round-robin repetitions of the fixed-step runs
    solve_reps: int = 2  # and of the time-to-solve runs
    probe_timeout_s: float = 90.0  # from the start; 0: skip the hang probe
    solve_maxiter: int = 5000
    seed: int = 0


QUICK = Config(
    hidden=64, ff=256, layers=2, tasks=4, task_rank=8, reps=2, probe_timeout_s=0.0
)

# (module, kernel) -> (input source, kernel shape as (in, out) in config names).
KERNELS = {
    ("attention", "query"): ("attn_in", ("hidden", "hidden")),
    ("attention", "key"): ("attn_in", ("hidden", "hidden")),
    ("attention", "value"): ("attn_in", ("hidden", "hidden")),
    ("attention", "out"): ("attn_out", ("hidden", "hidden")),
    ("mlp", "wi"): ("mlp_in", ("hidden", "ff")),
    ("mlp", "wo"): ("mlp_hidden", ("ff", "hidden")),
}
LAYER_NORMS = ("ln_attn", "ln_mlp")


# --------------------------------------------------------------------------
# The problem: models, K-FAC factors, initialisation
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Problem:
    """Fine-tuned models, their K-FAC statistics and the CG initialisation."""

    models: list[dict]
    stats: list[dict]
    init: dict
    kernels: list[tuple[str, str, str]]  # (layer, module, kernel) paths
    spectra: dict[str, Any]
    task_scales: list[float]


@functools.partial(jax.jit, static_argnames=("n",))
def _sample_factor(
    key: jax.Array,
    basis: jax.Array,
    spectrum: jax.Array,
    task_spectrum: jax.Array,
    n: int,
) -> jax.Array:
    """``XᵀX / n`` for n inputs: shared covariance plus a task's own directions."""
    d, r = basis.shape[0], task_spectrum.shape[0]
    k_shared, k_dirs, k_task = jax.random.split(key, 3)
    directions = jnp.linalg.qr(jax.random.normal(k_dirs, (d, r)))[0]
    x = (jax.random.normal(k_shared, (n, d)) * jnp.sqrt(spectrum)) @ basis.T
    x += (jax.random.normal(k_task, (n, r)) * jnp.sqrt(task_spectrum)) @ directions.T
    return x.T @ x / n


def _power_law(n: int, exponent: float, total: float) -> jax.Array:
    values = jnp.arange(1, n + 1, dtype=jnp.float32) ** -exponent
    return total * values / jnp.sum(values)


def _task_factors(key: jax.Array, d: int, cfg: Config) -> list[jax.Array]:
    """One factor per task: a shared power-law covariance plus task directions."""
    k_basis, k_tasks = jax.random.split(key)
    basis = jnp.linalg.qr(jax.random.normal(k_basis, (d, d)))[0]
    shared = _power_law(d, cfg.alpha, 1.0 - cfg.task_fraction)
    own = _power_law(min(cfg.task_rank, d), 1.0, cfg.task_fraction)
    n = cfg.samples_per_dim * d
    return [
        _sample_factor(jax.random.fold_in(k_tasks, m), basis, shared, own, n)
        for m in range(cfg.tasks)
    ]


def _kernel_leaves(
    key: jax.Array, n_in: int, n_out: int, tasks: int
) -> tuple[dict, list[dict]]:
    """A base kernel and bias, and each task's fine-tuned ones."""
    k_base, k_tasks = jax.random.split(key)
    kernel = jax.random.normal(k_base, (n_in, n_out)) / math.sqrt(n_in)
    tuned = []
    for m in range(tasks):
        k_w, k_b = jax.random.split(jax.random.fold_in(k_tasks, m))
        delta = 0.1 * jax.random.normal(k_w, (n_in, n_out)) / math.sqrt(n_in)
        bias = 0.01 * jax.random.normal(k_b, (n_out,))
        tuned.append({"kernel": kernel + delta, "bias": bias})
    return {"kernel": kernel, "bias": jnp.zeros(n_out)}, tuned


def _layer_norms(key: jax.Array, cfg: Config) -> tuple[dict, list[dict]]:
    """LayerNorm scales and biases: parameters with no statistic (fallback)."""
    base = {
        ln: {"scale": jnp.ones(cfg.hidden), "bias": jnp.zeros(cfg.hidden)}
        for ln in LAYER_NORMS
    }
    tuned = []
    for m in range(cfg.tasks):
        noise = 0.01 * jax.random.normal(
            jax.random.fold_in(key, m), (len(LAYER_NORMS), 2, cfg.hidden)
        )
        tuned.append(
            {
                ln: {"scale": 1.0 + noise[i, 0], "bias": noise[i, 1]}
                for i, ln in enumerate(LAYER_NORMS)
            }
        )
    return base, tuned


def _layer(
    key: jax.Array, cfg: Config, scales: np.ndarray
) -> tuple[list[dict], list[dict], dict]:
    """Per-task parameters and K-FAC statistics, and the base, of one layer."""
    dims = {"hidden": cfg.hidden, "ff": cfg.ff}
    k_inputs, k_outputs, k_params, k_norms = jax.random.split(key, 4)
    sources = sorted({src for src, _ in KERNELS.values()})
    a_factors = {
        src: _task_factors(
            jax.random.fold_in(k_inputs, i),
            dims["ff" if src == "mlp_hidden" else "hidden"],
            cfg,
        )
        for i, src in enumerate(sources)
    }
    base, models = _layer_norms(k_norms, cfg)
    stats: list[dict] = [
        {ln: {"scale": None, "bias": None} for ln in LAYER_NORMS}
        for _ in range(cfg.tasks)
    ]
    for i, ((module, name), (src, (d_in, d_out))) in enumerate(KERNELS.items()):
        n_in, n_out = dims[d_in], dims[d_out]
        g_factors = _task_factors(jax.random.fold_in(k_outputs, i), n_out, cfg)
        base_leaf, tuned = _kernel_leaves(
            jax.random.fold_in(k_params, i), n_in, n_out, cfg.tasks
        )
        base.setdefault(module, {})[name] = base_leaf
        for m in range(cfg.tasks):
            models[m].setdefault(module, {})[name] = tuned[m]
            stat = KFAC(a_factors[src][m], float(scales[m]) * g_factors[m])
            stats[m].setdefault(module, {})[name] = {"kernel": stat, "bias": None}
    return models, stats, base


def build_problem(cfg: Config) -> Problem:
    """The models, statistics and task-arithmetic initialisation, from fixed seeds."""
    key = jax.random.PRNGKey(cfg.seed)
    k_scales, k_layers = jax.random.split(key)
    u = np.asarray(jax.random.uniform(k_scales, (cfg.tasks,), minval=-1.0, maxval=1.0))
    scales = cfg.scale_spread**u
    models: list[dict] = [{} for _ in range(cfg.tasks)]
    stats: list[dict] = [{} for _ in range(cfg.tasks)]
    base: dict = {}
    for layer in range(cfg.layers):
        name = f"layer_{layer}"
        lm, ls, lb = _layer(jax.random.fold_in(k_layers, layer), cfg, scales)
        base[name] = lb
        for m in range(cfg.tasks):
            models[m][name], stats[m][name] = lm[m], ls[m]
    kernels = [(f"layer_{i}", mod, k) for i in range(cfg.layers) for mod, k in KERNELS]
    init = task_arithmetic(base, models, scale=cfg.merge_scale)
    jax.block_until_ready((models, stats, init))
    return Problem(
        models,
        stats,
        init,
        kernels,
        spectra_summary(stats, [k for k in kernels if k[0] == "layer_0"]),
        [float(s) for s in scales],
    )


def median(values: Any) -> float:
    return float(np.median(np.asarray(values, np.float64)))


def get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def spectra_summary(
    stats: list[dict], kernels: list[tuple[str, str, str]]
) -> dict[str, Any]:
    """Condition numbers and eigenvalue ranges of the factors, by factor size.

    Every layer's factors are drawn the same way; the caller passes one layer's
    kernels to keep this cheap.
    """
    seen: dict[int, jax.Array] = {}
    rows: dict[str, dict[str, list[float]]] = {}
    for path in kernels:
        for task in stats:
            stat = get(task, (*path, "kernel"))
            for which, factor in (("A", stat.a), ("G", stat.g)):
                if id(factor) in seen:  # q/k/v share their input factor
                    continue
                values = np.asarray(jnp.linalg.eigvalsh(factor), np.float64)
                seen[id(factor)] = factor
                row = rows.setdefault(
                    f"{which} ({factor.shape[0]}×{factor.shape[0]})",
                    {"cond": [], "lmax": [], "lmin": [], "top10": []},
                )
                row["cond"].append(values[-1] / values[0])
                row["lmax"].append(values[-1])
                row["lmin"].append(values[0])
                row["top10"].append(values[-10:].sum() / values.sum())
    return {
        name: {
            "count": len(r["cond"]),
            "cond_min": min(r["cond"]),
            "cond_median": median(r["cond"]),
            "cond_max": max(r["cond"]),
            "lambda_max_median": median(r["lmax"]),
            "lambda_min_median": median(r["lmin"]),
            "top10_share_median": median(r["top10"]),
        }
        for name, r in rows.items()
    }


# --------------------------------------------------------------------------
# The three solvers: mats, the matmul floor, the scipy loop
# --------------------------------------------------------------------------


def run_mats(
    problem: Problem, maxiter: int, tol: float, **options: Any
) -> mats_jax.MergeResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mats_jax.ConvergenceWarning)
        return mats(
            problem.models,
            problem.stats,
            init=problem.init,
            maxiter=maxiter,
            tol=tol,
            **options,
        )


@dataclasses.dataclass
class Group:
    """Same-shaped blocks stacked as ``mats`` stacks them: factors per task, (B, n, n)."""

    a: list[jax.Array]
    g: list[jax.Array]
    v0: jax.Array


def floor_groups(problem: Problem) -> list[Group]:
    by_shape: dict[tuple[int, ...], list[tuple[str, str, str]]] = {}
    for path in problem.kernels:
        by_shape.setdefault(get(problem.init, (*path, "kernel")).shape, []).append(path)
    groups = []
    for paths in by_shape.values():
        stats = [[get(task, (*p, "kernel")) for p in paths] for task in problem.stats]
        groups.append(
            Group(
                a=[jnp.stack([s.a for s in task]) for task in stats],
                g=[jnp.stack([s.g for s in task]) for task in stats],
                v0=jnp.stack([get(problem.init, (*p, "kernel")) for p in paths]),
            )
        )
    return jax.block_until_ready(groups)


@jax.jit
def matmul_floor(groups: list[dict], n: jax.Array) -> list[jax.Array]:
    """n steps of ``V ← Σ_m A_m V G_m`` per group, normalised so nothing overflows."""

    def run(a: list[jax.Array], g: list[jax.Array], v0: jax.Array) -> jax.Array:
        def step(_: Any, v: jax.Array) -> jax.Array:
            w = functools.reduce(
                jnp.add, [(am @ v) @ gm for am, gm in zip(a, g, strict=True)]
            )
            return w * jax.lax.rsqrt(jnp.sum(w * w, axis=(1, 2), keepdims=True))

        return jax.lax.fori_loop(0, n, step, v0)

    return [run(grp["a"], grp["g"], grp["v0"]) for grp in groups]


def run_floor(groups: list[Group], n: int) -> list[jax.Array]:
    return matmul_floor([dataclasses.asdict(g) for g in groups], n)


@dataclasses.dataclass
class NumpyBlock:
    """One kernel's system in numpy float32, as the reference code holds it."""

    path: tuple[str, str, str]
    a: list[np.ndarray]
    g: list[np.ndarray]
    w: list[np.ndarray]
    x0: np.ndarray


def numpy_blocks(problem: Problem) -> list[NumpyBlock]:
    blocks = []
    for path in problem.kernels:
        stats = [get(task, (*path, "kernel")) for task in problem.stats]
        blocks.append(
            NumpyBlock(
                path=path,
                a=[np.asarray(s.a) for s in stats],
                g=[np.asarray(s.g) for s in stats],
                w=[np.asarray(get(m, (*path, "kernel"))) for m in problem.models],
                x0=np.asarray(get(problem.init, (*path, "kernel"))),
            )
        )
    return blocks


def kfac_sum(a: list[np.ndarray], g: list[np.ndarray], v: np.ndarray) -> np.ndarray:
    out = (a[0] @ v) @ g[0]
    for am, gm in zip(a[1:], g[1:], strict=True):
        out += (am @ v) @ gm
    return out


# The same preconditioner as ``mats(..., preconditioner=True)``
# (``KFAC.sum_preconditioner``), written again in numpy for the scipy loop, so
# that the preconditioned pair compares like with like; ``run`` checks that the
# two agree before anything is timed.
KRONECKER_SWEEPS = 4  # alternating updates, as KFAC.sum_preconditioner runs
PRECONDITIONER_AGREEMENT_TOL = 1e-4  # relative; float32 eigendecompositions


def _frobenius_normalised(m: np.ndarray) -> np.ndarray:
    return m / max(float(np.sqrt(np.sum(m * m))), np.finfo(m.dtype).tiny)


def nearest_kronecker(
    a: list[np.ndarray], g: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """σX and Y with σ X ⊗ Y nearest to Σ_m A_m ⊗ G_m in Frobenius norm.

    Van Loan and Pitsianis's rank-one problem, by alternating
    ``X ∝ Σ_m ⟨G_m, Y⟩ A_m`` and ``Y ∝ Σ_m ⟨A_m, X⟩ G_m`` from the sums.
    """
    x, y = _frobenius_normalised(sum(a)), _frobenius_normalised(sum(g))
    for _ in range(KRONECKER_SWEEPS):
        x = _frobenius_normalised(
            sum(np.sum(gm * y) * am for am, gm in zip(a, g, strict=True))
        )
        y = _frobenius_normalised(
            sum(np.sum(am * x) * gm for am, gm in zip(a, g, strict=True))
        )
    sigma = sum(np.sum(am * x) * np.sum(gm * y) for am, gm in zip(a, g, strict=True))
    return sigma * x, y


@dataclasses.dataclass
class KroneckerInverse:
    """``(σX ⊗ Y)⁺`` through the eigendecompositions of σX and Y."""

    u_x: np.ndarray
    u_y: np.ndarray
    inv: np.ndarray  # 1 / (λ_x,i λ_y,j), 0 for numerically zero products

    def __call__(self, v: np.ndarray) -> np.ndarray:
        rotated = self.u_x.T @ v @ self.u_y
        return self.u_x @ (self.inv * rotated) @ self.u_y.T


def kronecker_inverse(a: list[np.ndarray], g: list[np.ndarray]) -> KroneckerInverse:
    x, y = nearest_kronecker(a, g)
    lam_x, u_x = np.linalg.eigh(x)
    lam_y, u_y = np.linalg.eigh(y)
    outer = lam_x[:, None] * lam_y[None, :]
    # As mats: only numerically zero products are dropped.
    keep = outer > outer.max() * np.finfo(outer.dtype).eps
    inv = np.where(keep, 1.0 / np.where(keep, outer, 1.0), 0.0).astype(outer.dtype)
    return KroneckerInverse(u_x, u_y, inv)


def scipy_cg_block(
    block: NumpyBlock, maxiter: int, rtol: float, preconditioner: bool = False
) -> tuple[np.ndarray, int]:
    """The reference's solve of one block: scipy CG over a LinearOperator.

    With ``preconditioner`` the Kronecker inverse is built here, inside the
    timed region, as ``mats`` builds its own inside its call.
    """
    shape, size = block.x0.shape, block.x0.size

    def matvec(v: np.ndarray) -> np.ndarray:
        return kfac_sum(block.a, block.g, v.reshape(shape)).ravel()

    operator = spla.LinearOperator((size, size), matvec=matvec, dtype=np.float32)
    inverse = None
    if preconditioner:
        apply = kronecker_inverse(block.a, block.g)
        inverse = spla.LinearOperator(
            (size, size),
            matvec=lambda v: apply(v.reshape(shape)).ravel(),
            dtype=np.float32,
        )
    b = sum(
        (a @ w) @ g for a, g, w in zip(block.a, block.g, block.w, strict=True)
    ).ravel()
    steps = [0]

    def count(_: np.ndarray) -> None:
        steps[0] += 1

    x, _ = spla.cg(
        operator,
        b,
        x0=block.x0.ravel(),
        rtol=rtol,
        atol=0.0,
        maxiter=maxiter,
        M=inverse,
        callback=count,
    )
    return x.reshape(shape), steps[0]


def run_scipy(
    blocks: list[NumpyBlock], maxiter: int, rtol: float, preconditioner: bool = False
) -> list[tuple[np.ndarray, int]]:
    return [scipy_cg_block(block, maxiter, rtol, preconditioner) for block in blocks]


def numpy_matmul_floor(blocks: list[NumpyBlock], n: int) -> list[np.ndarray]:
    """The scipy loop's matmuls alone: n products ``Σ_m A_m V G_m`` per block."""
    out = []
    for block in blocks:
        v = block.x0
        for _ in range(n):
            w = kfac_sum(block.a, block.g, v)
            v = w / np.linalg.norm(w)
        out.append(v)
    return out


def numpy_preconditioner_setup(blocks: list[NumpyBlock]) -> list[np.ndarray]:
    """Every block's Kronecker inverse, built and applied once (as mats's maxiter=0)."""
    return [kronecker_inverse(b.a, b.g)(b.x0) for b in blocks]


def preconditioner_agreement(blocks: list[NumpyBlock]) -> dict[str, float]:
    """The numpy Kronecker inverse against ``KFAC.sum_preconditioner``, per shape.

    On the first block of each shape, both applied to one random matrix;
    relative difference ‖P_numpy v − P_mats v‖ / ‖P_mats v‖.
    """
    rng = np.random.default_rng(0)
    out: dict[str, float] = {}
    for block in blocks:
        name = "×".join(map(str, block.x0.shape))
        if name in out:
            continue
        v = rng.standard_normal(block.x0.shape).astype(np.float32)
        stats = [
            KFAC(jnp.asarray(a)[None], jnp.asarray(g)[None])
            for a, g in zip(block.a, block.g, strict=True)
        ]
        # As inside the solver: true float32 products whatever JAX's default.
        with jax.default_matmul_precision("highest"):
            apply = KFAC.sum_preconditioner(stats, jnp.zeros(1))
            theirs = np.asarray(apply(jnp.asarray(v)[None])[0], np.float64)
        ours = kronecker_inverse(block.a, block.g)(v).astype(np.float64)
        out[name] = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    return out


# --------------------------------------------------------------------------
# Timing and checks
# --------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def compile_time(run: Callable[[int], Any]) -> float:
    """First call minus second call, both with one iteration."""
    first, _ = timed(lambda: run(1))
    second, _ = timed(lambda: run(1))
    return max(first - second, 0.0)


def round_robin(
    runs: dict[str, Callable[[], Any]], reps: int
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Times every run ``reps`` times, interleaved; returns the times and last outputs."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, Any] = {}
    for rep in range(reps):
        for name, run in runs.items():
            seconds, outputs[name] = timed(run)
            times[name].append(seconds)
            print(f"  rep {rep}: {name}: {seconds:.2f} s", flush=True)
    return times, outputs


def true_residuals(blocks: list[NumpyBlock], solution: list[np.ndarray]) -> list[float]:
    """‖b − Σ A_m X G_m‖ / ‖b‖ per block, in float64."""
    out = []
    for block, x in zip(blocks, solution, strict=True):
        a = [m.astype(np.float64) for m in block.a]
        g = [m.astype(np.float64) for m in block.g]
        b = sum(
            (am @ w.astype(np.float64)) @ gm
            for am, gm, w in zip(a, g, block.w, strict=True)
        )
        r = b - kfac_sum(a, g, x.astype(np.float64))
        out.append(float(np.linalg.norm(r) / np.linalg.norm(b)))
    return out


def relative_difference(x: list[np.ndarray], y: list[np.ndarray]) -> float:
    return max(
        float(np.linalg.norm(p - q) / np.linalg.norm(q))
        for p, q in zip(x, y, strict=True)
    )


def mats_kernels(problem: Problem, result: mats_jax.MergeResult) -> list[np.ndarray]:
    return [np.asarray(get(result.params, (*p, "kernel"))) for p in problem.kernels]


def mats_report_arrays(
    problem: Problem, result: mats_jax.MergeResult
) -> dict[str, list[float]]:
    leaves = [get(result.report, (*p, "kernel")) for p in problem.kernels]
    return {
        field: [float(np.asarray(getattr(leaf, field))[0]) for leaf in leaves]
        for field in ("iterations", "initial_residual", "final_residual", "status")
    }


def flops_per_matvec(blocks: list[NumpyBlock]) -> int:
    return sum(
        2 * len(b.a) * b.x0.size * (b.x0.shape[0] + b.x0.shape[1]) for b in blocks
    )


def stats_of(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {name: {"median": median(t), "min": min(t)} for name, t in times.items()}


# --------------------------------------------------------------------------
# The two experiments
# --------------------------------------------------------------------------


def fixed_iterations(
    problem: Problem, blocks: list[NumpyBlock], cfg: Config
) -> dict[str, Any]:
    """mats at ``tol=0`` for ``fixed_iters`` steps against the floor and the scipy loop."""
    groups = floor_groups(problem)
    steps: dict[str, Callable[[int], Any]] = {
        "mats (check_every=20)": lambda n: run_mats(problem, n, 0.0, check_every=20),
        "mats (check_every=0)": lambda n: run_mats(problem, n, 0.0, check_every=0),
        "matmul floor": lambda n: run_floor(groups, n),
        "scipy loop": lambda n: run_scipy(blocks, n, 0.0),
        "numpy matmul floor": lambda n: numpy_matmul_floor(blocks, n),
    }
    compiles = {}
    for name, run in steps.items():
        if name.startswith(("scipy", "numpy")):
            run(1)  # nothing to compile: a warm-up only
        else:
            compiles[name] = compile_time(run)
    runs = {
        name: functools.partial(run, cfg.fixed_iters) for name, run in steps.items()
    }
    runs["mats, maxiter=0 (fixed cost)"] = lambda: run_mats(
        problem, 0, 0.0, check_every=20
    )
    times, outputs = round_robin(runs, cfg.reps)
    mats_x = mats_kernels(problem, outputs["mats (check_every=0)"])
    scipy_x = [x for x, _ in outputs["scipy loop"]]
    return {
        "iterations": cfg.fixed_iters,
        "compile_s": compiles,
        "times_s": times,
        "stats_s": stats_of(times),
        "mats_vs_scipy_relative_difference": relative_difference(mats_x, scipy_x),
        "scipy_dtype": str(scipy_x[0].dtype),
        "gflop_per_matvec": flops_per_matvec(blocks) / 1e9,
    }


MATS_SOLVE_VARIANTS = {
    f"mats (preconditioner={pre}, group_blocks={group})": {
        "preconditioner": pre,
        "group_blocks": group,
    }
    for pre in (False, True)
    for group in (True, False)
}


def describe_mats(
    problem: Problem, blocks: list[NumpyBlock], result: mats_jax.MergeResult
) -> dict[str, Any]:
    solution = mats_kernels(problem, result)
    return {
        "report": mats_report_arrays(problem, result),
        "residual_f64": true_residuals(blocks, solution),
        "solution": solution,
        "format_report": format_report(result.report),
    }


def describe_scipy(blocks: list[NumpyBlock], out: list) -> dict[str, Any]:
    solution = [x for x, _ in out]
    return {
        "iterations": [n for _, n in out],
        "residual_f64": true_residuals(blocks, solution),
        "solution": solution,
    }


def mats_to_tol(problem: Problem, options: dict) -> Callable[[int], Any]:
    return lambda n: run_mats(problem, n, TOL, **options)


SCIPY_SOLVE_VARIANTS = {
    "scipy loop": False,
    "scipy loop (preconditioner)": True,
}


def scipy_counterpart(options: dict) -> str:
    """The scipy loop with the same preconditioning as a mats variant."""
    return next(
        name
        for name, pre in SCIPY_SOLVE_VARIANTS.items()
        if pre == options["preconditioner"]
    )


def solve_compile_times(problem: Problem) -> dict[str, float]:
    """Each variant's compilation from a cold cache, then every variant warm again.

    Without clearing, a variant whose program section 1 (or another variant)
    already compiled would show next to no compile time.
    """
    compiles = {}
    for name, options in MATS_SOLVE_VARIANTS.items():
        jax.clear_caches()
        compiles[name] = compile_time(mats_to_tol(problem, options))
    for options in MATS_SOLVE_VARIANTS.values():
        timed(lambda options=options: mats_to_tol(problem, options)(1))
    return compiles


def time_to_solve(
    problem: Problem, blocks: list[NumpyBlock], cfg: Config
) -> dict[str, Any]:
    """Every variant to ``TOL``, ``solve_reps`` round-robin repetitions."""
    compiles = solve_compile_times(problem)
    runs: dict[str, Callable[[], Any]] = {
        name: functools.partial(run_scipy, blocks, cfg.solve_maxiter, TOL, pre)
        for name, pre in SCIPY_SOLVE_VARIANTS.items()
    }
    for name, options in MATS_SOLVE_VARIANTS.items():
        runs[name] = functools.partial(
            run_mats, problem, cfg.solve_maxiter, TOL, **options
        )
    times, outputs = round_robin(runs, cfg.solve_reps)
    out = {name: describe_scipy(blocks, outputs[name]) for name in SCIPY_SOLVE_VARIANTS}
    for name, run in out.items():
        run["options"] = {"preconditioner": SCIPY_SOLVE_VARIANTS[name]}
        run["compile_s"] = 0.0  # nothing to compile
    for name, options in MATS_SOLVE_VARIANTS.items():
        run = describe_mats(problem, blocks, outputs[name])
        run["options"] = options
        run["compile_s"] = compiles[name]
        run["scipy_counterpart"] = scipy_counterpart(options)
        run["relative_difference_vs_scipy"] = relative_difference(
            run["solution"], out[run["scipy_counterpart"]]["solution"]
        )
        out[name] = run
    for name, run in out.items():
        run["times_s"] = times[name]
        run["seconds"] = min(times[name])
    return out


def preconditioner_setup(
    problem: Problem, blocks: list[NumpyBlock], cfg: Config
) -> dict[str, Any]:
    """The preconditioner's setup and one application, on both sides.

    mats: ``maxiter=0`` calls with and without it (their difference); the
    scipy loop: building every block's numpy Kronecker inverse and applying it
    once.
    """
    runs = {
        f"mats, preconditioner={pre}": functools.partial(
            run_mats, problem, 0, 0.0, preconditioner=pre
        )
        for pre in (False, True)
    }
    runs["numpy Kronecker inverses"] = functools.partial(
        numpy_preconditioner_setup, blocks
    )
    times, _ = round_robin(runs, cfg.reps)
    stats = stats_of(times)
    return {
        "times_s": times,
        "stats_s": stats,
        "mats_setup_s": stats["mats, preconditioner=True"]["median"]
        - stats["mats, preconditioner=False"]["median"],
        "scipy_setup_s": stats["numpy Kronecker inverses"]["median"],
        # From the fastest runs, as the solves' times are: for the time per step.
        "mats_setup_min_s": stats["mats, preconditioner=True"]["min"]
        - stats["mats, preconditioner=False"]["min"],
    }


HANG_PROBE = """
import jax, jax.numpy as jnp, mats_jax
def spd(key, n):
    x = jax.random.normal(key, (2 * n, n))
    return x.T @ x / (2 * n)
shapes = [(64, 64)] * 8 + [(64, 256), (256, 64)] * 2  # groups of 8, 2 and 2 blocks
ks = iter(jax.random.split(jax.random.PRNGKey(0), 200))
models = [{f"w{i}": jax.random.normal(next(ks), s) for i, s in enumerate(shapes)}
          for _ in range(4)]
stats = [{f"w{i}": mats_jax.KFAC(spd(next(ks), s[0]), spd(next(ks), s[1]))
          for i, s in enumerate(shapes)} for _ in range(4)]
for _ in range(3):
    jax.block_until_ready(mats_jax.mats(models, stats, maxiter=1, preconditioner=True))
"""


def start_hang_probe() -> subprocess.Popen:
    """A small preconditioned mats in a fresh process without the workaround.

    It runs while the problem is built (untimed); a hung process sits idle.
    """
    env = {k: v for k, v in os.environ.items() if k != "NPROC"}
    return subprocess.Popen(
        [sys.executable, "-c", HANG_PROBE],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def finish_hang_probe(probe: subprocess.Popen | None, deadline: float) -> str:
    if probe is None:
        return "not run"
    try:
        code = probe.wait(timeout=max(deadline - time.perf_counter(), 0.0))
    except subprocess.TimeoutExpired:
        probe.kill()
        probe.wait()
        return "hangs (no result when the timing started)"
    return "returns" if code == 0 else f"fails (exit {code})"


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def solve_summary(
    name: str, run: dict[str, Any], solved: dict[str, Any]
) -> dict[str, Any]:
    iters = run["report"]["iterations"] if "report" in run else run["iterations"]
    residuals = run["report"]["final_residual"] if "report" in run else None
    counterpart = run.get("scipy_counterpart")
    return {
        "method": name,
        "seconds": run["seconds"],
        "times_s": run["times_s"],
        "compile_s": run["compile_s"],
        "iters_max": int(max(iters)),
        "iters_median": float(median(iters)),
        "iters_total": int(sum(iters)),
        "report_residual_max": max(residuals) if residuals else None,
        "f64_residual_max": max(run["residual_f64"]),
        "scipy_counterpart": counterpart,
        "rel_diff_vs_scipy": run.get("relative_difference_vs_scipy"),
        "speedup_vs_scipy": (
            solved[counterpart]["seconds"] / run["seconds"] if counterpart else None
        ),
    }


def solve_pairs(solved: dict[str, Any]) -> list[dict[str, Any]]:
    """Each mats variant against the scipy loop preconditioned as it is.

    The speed-up is scipy's time over mats's, without and with mats's
    compilation (scipy compiles nothing); both sides build their
    preconditioner inside the timed call.
    """
    pairs = []
    for name, run in solved.items():
        counterpart = run.get("scipy_counterpart")
        if counterpart is None:
            continue
        scipy_s = solved[counterpart]["seconds"]
        warm = scipy_s / run["seconds"]
        cold = scipy_s / (run["seconds"] + run["compile_s"])
        pairs.append(
            {
                "mats": name,
                "scipy": counterpart,
                "preconditioner": run["options"]["preconditioner"],
                "group_blocks": run["options"]["group_blocks"],
                "scipy_s": scipy_s,
                "mats_s": run["seconds"],
                "compile_s": run["compile_s"],
                "speedup": warm,
                "speedup_with_compile": cold,
                "met": warm >= SOLVE_TARGET_VS_SCIPY,
                "met_with_compile": cold >= SOLVE_TARGET_VS_SCIPY,
            }
        )
    return pairs


def per_step(fixed: dict[str, Any]) -> dict[str, float]:
    """Seconds per CG step from the fastest runs; mats's fixed cost subtracted."""
    best = {name: s["min"] for name, s in fixed["stats_s"].items()}
    n, base = fixed["iterations"], best["mats, maxiter=0 (fixed cost)"]
    return {
        "mats loop (check_every=20)": (best["mats (check_every=20)"] - base) / n,
        "mats loop (check_every=0)": (best["mats (check_every=0)"] - base) / n,
        "matmul floor": best["matmul floor"] / n,
        "scipy loop": best["scipy loop"] / n,
        "numpy matmul floor": best["numpy matmul floor"] / n,
    }


def ratios(fixed: dict[str, Any], which: str) -> dict[str, float]:
    s = {name: v[which] for name, v in fixed["stats_s"].items()}
    floor, scipy_s = s["matmul floor"], s["scipy loop"]
    return {
        "mats_over_floor": s["mats (check_every=20)"] / floor,
        "mats_check0_over_floor": s["mats (check_every=0)"] / floor,
        "mats_over_scipy": s["mats (check_every=20)"] / scipy_s,
        "mats_check0_over_scipy": s["mats (check_every=0)"] / scipy_s,
        "check_overhead": s["mats (check_every=20)"] / s["mats (check_every=0)"] - 1,
        "fixed_cost_share": s["mats, maxiter=0 (fixed cost)"]
        / s["mats (check_every=20)"],
    }


def summarise(
    fixed: dict[str, Any],
    solved: dict[str, Any],
    setup: dict[str, Any],
    agreement: dict[str, float],
) -> dict[str, Any]:
    rows = [solve_summary(name, run, solved) for name, run in solved.items()]
    pairs = solve_pairs(solved)
    steps = per_step(fixed)
    by_median, by_min = ratios(fixed, "median"), ratios(fixed, "min")
    return {
        "fixed_iters": fixed["iterations"],
        "median_ratios": by_median,
        "min_ratios": by_min,
        "seconds_per_step": steps,
        "gflops": {k: fixed["gflop_per_matvec"] / v for k, v in steps.items()},
        "solve_rows": rows,
        "solve_pairs": pairs,
        "fixed_target_met": by_median["mats_over_floor"] <= FIXED_TARGET_VS_FLOOR,
        "fixed_vs_scipy_target_met": by_median["mats_over_scipy"] <= 1.0,
        "preconditioner_setup_s": setup["mats_setup_s"],
        "preconditioner_setup_min_s": setup["mats_setup_min_s"],
        "scipy_preconditioner_setup_s": setup["scipy_setup_s"],
        "preconditioner_agreement": agreement,
    }


def _f(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    if abs(x) < 1e-2 or abs(x) >= 1e4:
        return f"{x:.{digits}g}"
    return f"{x:.{digits}f}".rstrip("0").rstrip(".")


def _e(x: float | None) -> str:
    return "–" if x is None else f"{x:.3e}"


def _loads(values: list[float]) -> str:
    return " / ".join(f"{v:.1f}" for v in values)


def _runs(times: list[float]) -> str:
    return " / ".join(_f(t) for t in times)


def _workaround(applied: dict[str, Any] | None) -> str:
    if applied is None:
        return "none"
    return (
        f"NPROC={applied['NPROC']} (XLA:CPU pool size), 1 OpenBLAS thread in "
        f"jaxlib's LAPACK calls ({applied['one_thread']})"
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


SPECTRA_HEADER = [
    "factor (layer 0)",
    "count",
    "cond min",
    "cond median",
    "cond max",
    "λmax (median)",
    "λmin (median)",
    "top-10 share of trace",
]
FIXED_HEADER = [
    "method",
    "median s",
    "min s",
    "all runs s",
    "compile s",
    "× floor (median / min)",
    "× scipy (median / min)",
    "matvecs",
]
SOLVE_HEADER = [
    "method",
    "wall s (fastest)",
    "all runs s",
    "compile s",
    "iterations max / median / sum",
    "max residual (report)",
    "max residual (float64)",
    "‖x − x_scipy‖/‖x_scipy‖ (same preconditioning)",
    "scipy (same preconditioning) ÷ method",
]


def problem_section(cfg: Config, problem: Problem, blocks: list[NumpyBlock]) -> str:
    shapes: dict[tuple[int, ...], int] = {}
    for b in blocks:
        shapes[b.x0.shape] = shapes.get(b.x0.shape, 0) + 1
    n_leaves = len(jax.tree.leaves(problem.models[0]))
    spectra = _table(
        SPECTRA_HEADER,
        [
            [name, str(s["count"])]
            + [_f(s[k]) for k in ("cond_min", "cond_median", "cond_max")]
            + [_f(s[k]) for k in ("lambda_max_median", "lambda_min_median")]
            + [_f(s["top10_share_median"])]
            for name, s in problem.spectra.items()
        ],
    )
    scales = ", ".join(_f(s, 2) for s in problem.task_scales)
    groups = ", ".join(f"{n}× {s[0]}×{s[1]}" for s, n in shapes.items())
    return f"""## Problem

{cfg.layers} layers, hidden {cfg.hidden}, feed-forward {cfg.ff}, {cfg.tasks} tasks. Per layer the
kernels query/key/value/out ({cfg.hidden}×{cfg.hidden}), mlp `wi` ({cfg.hidden}×{cfg.ff}) and
mlp `wo` ({cfg.ff}×{cfg.hidden}), Flax layout (in, out), each with a `KFAC` statistic:
{len(blocks)} kernel blocks ({groups}), plus biases and two LayerNorms per layer with no
statistic ({n_leaves - len(blocks)} leaves, weighted-average fallback). One CG step costs
{_f(flops_per_matvec(blocks) / 1e9)} GFLOP (2 matmuls per task per block).

Factors: each is `XᵀX / n` for n = {cfg.samples_per_dim}·d sampled inputs
`x = z_s·diag(√λ)·Uᵀ + z_t·diag(√μ)·V_mᵀ`: a covariance shared by all tasks (random basis U
per layer and factor, power-law spectrum λ_i ∝ i^-{cfg.alpha}, {1 - cfg.task_fraction:.0%} of
the trace) plus {cfg.task_rank} directions of the task's own (random V_m, μ_i ∝ i^-1,
{cfg.task_fraction:.0%} of the trace). query/key/value share their input factor A, as in a
transformer. Each task's G_m is scaled by {cfg.scale_spread}^u, u ~ U(−1, 1): scales
{scales}. Fine-tuned kernels are the base (N(0, 1/in)) plus a task vector of relative
size 0.1; CG starts from task arithmetic with λ = {cfg.merge_scale}. Spectra of the factors
(the condition number of one task's A_m ⊗ G_m is the product of its two factors'):

{spectra}
"""


MATVECS = {
    "mats (check_every=20)": "{n} + 2 + {checks} checks + rhs",
    "mats (check_every=0)": "{n} + 2 + rhs",
    "matmul floor": "{n}",
    "scipy loop": "{n} + 1 + rhs",
    "numpy matmul floor": "{n}",
    "mats, maxiter=0 (fixed cost)": "2 + rhs",
}


def fixed_section(fixed: dict[str, Any], summary: dict[str, Any]) -> str:
    stats, n = fixed["stats_s"], fixed["iterations"]
    floor, scipy_s = stats["matmul floor"], stats["scipy loop"]
    rows = [
        [
            name,
            _f(s["median"]),
            _f(s["min"]),
            _runs(fixed["times_s"][name]),
            _f(fixed["compile_s"].get(name)),
            f"{_f(s['median'] / floor['median'])} / {_f(s['min'] / floor['min'])}",
            f"{_f(s['median'] / scipy_s['median'])} / {_f(s['min'] / scipy_s['min'])}",
            MATVECS[name].format(n=n, checks=n // 20),
        ]
        for name, s in stats.items()
    ]
    table = _table(
        FIXED_HEADER,
        rows,
    )
    steps = _table(
        ["", "ms per CG step", "GFLOP/s"],
        [
            [k, _f(1e3 * v), _f(summary["gflops"][k])]
            for k, v in summary["seconds_per_step"].items()
        ],
    )
    reps = len(fixed["times_s"]["matmul floor"])
    return f"""## 1. Fixed iterations ({n} CG steps, `tol=0`)

{reps} round-robin repetitions after compilation; ratios from the medians and from the
fastest runs. "rhs" is the right-hand side Σ A_m W_m G_m (one matvec's worth of matmuls),
"2" the initial and final residuals; the floors do only the {n} matvecs (XLA's batched as
mats batches them; numpy's as the scipy loop does them, block by block). Both mats and scipy
run CG from the same start: after {n} steps their iterates differ by
{_e(fixed["mats_vs_scipy_relative_difference"])} (relative, worst block; scipy ran in
{fixed["scipy_dtype"]}).

{table}

Per CG step, from the fastest runs (mats: time at {n} steps minus time at 0 steps, over {n}):

{steps}
"""


def solve_section(summary: dict[str, Any], setup: dict[str, Any], n_blocks: int) -> str:
    rows = [
        [
            r["method"],
            _f(r["seconds"]),
            _runs(r["times_s"]),
            _f(r["compile_s"]),
            f"{r['iters_max']} / {_f(r['iters_median'])} / {r['iters_total']}",
            _e(r["report_residual_max"]),
            _e(r["f64_residual_max"]),
            _e(r["rel_diff_vs_scipy"]),
            _f(r["speedup_vs_scipy"]),
        ]
        for r in summary["solve_rows"]
    ]
    stats = setup["stats_s"]
    with_p = stats["mats, preconditioner=True"]["median"]
    without = stats["mats, preconditioner=False"]["median"]
    agreement = ", ".join(
        f"{shape} {_e(d)}" for shape, d in summary["preconditioner_agreement"].items()
    )
    return f"""## 2. Time to solve to relative residual {TOL:g} on every block

Round-robin repetitions after compilation; the fastest run counts (noise on a shared machine
only adds time). `maxiter` is traced, so each mats variant compiles once, by a 1-step call
from a cleared compilation cache (its compile time is that call's time minus a second
one's). Residuals are ‖b − Σ A_m X G_m‖/‖b‖ of the returned solution: mats's own report
(float32), and recomputed here in float64 (worst block); iterations are per block
({n_blocks} blocks; scipy counts its own). Each mats variant is compared with the scipy loop
preconditioned as it is.

{_table(SOLVE_HEADER, rows)}

The scipy loop's preconditioner is the same nearest Kronecker product
({KRONECKER_SWEEPS} alternating updates from the sums, inverted through the eigendecompositions
of its two factors), written again in numpy and built inside each block's timed solve, as
mats builds its own inside its call. Applied to one random matrix, it agrees with mats's
`KFAC.sum_preconditioner` to {agreement} (relative, the first block of each shape; checked
≤ {PRECONDITIONER_AGREEMENT_TOL:g} before any timing).

Preconditioner setup (nearest Kronecker product, two eigendecompositions per block, one
application), medians: mats {_f(setup["mats_setup_s"])} s (`maxiter=0` calls:
{_f(with_p)} s with it, {_f(without)} s without); numpy {_f(setup["scipy_setup_s"])} s
(every block's inverse built and applied once).
"""


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def _pair(pairs: list[dict[str, Any]], preconditioner: bool, grouped: bool) -> dict:
    return next(
        p
        for p in pairs
        if p["preconditioner"] == preconditioner and p["group_blocks"] == grouped
    )


def solve_target_line(pairs: list[dict[str, Any]], preconditioner: bool) -> str:
    grouped, ungrouped = (_pair(pairs, preconditioner, g) for g in (True, False))

    def both(p: dict[str, Any]) -> str:
        return (
            f"{_f(p['speedup'])}× {_verdict(p['met'])}, counting compilation "
            f"{_f(p['speedup_with_compile'])}× {_verdict(p['met_with_compile'])}"
        )

    which = "with" if preconditioner else "without"
    return (
        f"- Time to solve to {TOL:g}, ≥ {SOLVE_TARGET_VS_SCIPY:g}× faster than the scipy "
        f"loop, both {which} the Kronecker preconditioner (the scipy loop: "
        f"{_f(grouped['scipy_s'])} s): `group_blocks=True` (the default) {both(grouped)}; "
        f"`group_blocks=False` {both(ungrouped)}."
    )


def target_lines(summary: dict[str, Any]) -> list[str]:
    med, fast = summary["median_ratios"], summary["min_ratios"]
    pairs = summary["solve_pairs"]
    return [
        f"- Fixed iterations, mats ≤ {FIXED_TARGET_VS_FLOOR}× the matmul floor: "
        f"{_verdict(summary['fixed_target_met'])}: {_f(med['mats_over_floor'])}× on "
        f"medians ({_f(fast['mats_over_floor'])}× fastest runs); with `check_every=0` "
        f"{_f(med['mats_check0_over_floor'])}× ({_f(fast['mats_check0_over_floor'])}×).",
        f"- Fixed iterations, mats no slower than the scipy loop: "
        f"{_verdict(summary['fixed_vs_scipy_target_met'])}: {_f(med['mats_over_scipy'])}× "
        f"the scipy loop's time on medians ({_f(fast['mats_over_scipy'])}× fastest runs).",
        solve_target_line(pairs, preconditioner=False),
        solve_target_line(pairs, preconditioner=True),
    ]


def loop_cost_line(summary: dict[str, Any]) -> str:
    steps, gflops = summary["seconds_per_step"], summary["gflops"]
    over = steps["mats loop (check_every=0)"] / steps["matmul floor"]
    return (
        f"- mats's CG loop (`check_every=0`) costs {_f(over)}× the XLA matmul floor per "
        "step"
        + (
            ": within 5% of its matmuls alone."
            if over <= 1.05
            else f": {over - 1:.0%} more than its matmuls alone."
        )
        + f" The floors run at {_f(gflops['matmul floor'])} GFLOP/s (XLA) and "
        f"{_f(gflops['numpy matmul floor'])} GFLOP/s (numpy)."
    )


def scipy_gap_line(summary: dict[str, Any]) -> str:
    """How much of the scipy loop's extra time per step its matmuls explain."""
    steps = summary["seconds_per_step"]
    scipy_step, mats_step = steps["scipy loop"], steps["mats loop (check_every=0)"]
    share = steps["numpy matmul floor"] / scipy_step
    text = (
        f"- The scipy loop's matmuls alone (the numpy floor) take {share:.0%} of its "
        f"time per step ({_f(1e3 * steps['numpy matmul floor'])} of "
        f"{_f(1e3 * scipy_step)} ms)"
    )
    gap = scipy_step - mats_step
    if gap <= 0:
        return text + "; mats's loop is not faster per step here."
    explained = (steps["numpy matmul floor"] - steps["matmul floor"]) / gap
    return text + (
        f"; of the {_f(1e3 * gap)} ms per step by which it trails mats, the difference "
        f"between numpy's and XLA's matmuls accounts for {explained:.0%}"
        + (
            ": the scipy loop is slower mostly for its matmuls, not its Python loop."
            if explained >= 0.5
            else ": the rest is CG's vector work and Python outside the matmuls."
        )
    )


def preconditioner_line(summary: dict[str, Any]) -> str:
    rows = {r["method"]: r for r in summary["solve_rows"]}
    plain = rows["mats (preconditioner=False, group_blocks=True)"]
    pre = rows["mats (preconditioner=True, group_blocks=True)"]
    scipy_plain, scipy_pre = rows["scipy loop"], rows["scipy loop (preconditioner)"]
    # Fastest solve minus the fastest setup, over the worst block's iterations.
    pre_step = (pre["seconds"] - summary["preconditioner_setup_min_s"]) / pre[
        "iters_max"
    ]
    plain_step = plain["seconds"] / plain["iters_max"]
    per_step = (
        f"for {_f(pre_step / plain_step)}× the time per step and"
        if pre_step > 0
        else "(its setup, measured apart, exceeds the solve's fastest run: no time "
        "per step is given) for"
    )
    return (
        f"- The Kronecker preconditioner cuts mats's worst block from "
        f"{plain['iters_max']} to {pre['iters_max']} iterations (sum over blocks "
        f"{plain['iters_total']} → {pre['iters_total']}) {per_step} "
        f"{_f(summary['preconditioner_setup_s'])} s of setup (median), of a "
        f"{_f(pre['seconds'])} s solve; the scipy loop's, from {scipy_plain['iters_max']} "
        f"to {scipy_pre['iters_max']} (sum {scipy_plain['iters_total']} → "
        f"{scipy_pre['iters_total']}), {_f(summary['scipy_preconditioner_setup_s'])} s of "
        f"setup, {_f(scipy_plain['seconds'])} s → {_f(scipy_pre['seconds'])} s."
    )


def grouping_line(summary: dict[str, Any]) -> str:
    rows = {r["method"]: r for r in summary["solve_rows"]}
    parts = []
    for pre in (False, True):
        grouped = rows[f"mats (preconditioner={pre}, group_blocks=True)"]
        alone = rows[f"mats (preconditioner={pre}, group_blocks=False)"]
        faster = "grouped" if grouped["seconds"] < alone["seconds"] else "ungrouped"
        parts.append(
            f"{'with' if pre else 'without'} the preconditioner grouped "
            f"{_f(grouped['seconds'])} s, ungrouped {_f(alone['seconds'])} s ({faster} "
            f"faster; compilation {_f(grouped['compile_s'])} s and "
            f"{_f(alone['compile_s'])} s)"
        )
    return (
        "- `group_blocks=True` runs a group until its slowest block stops and keeps "
        "paying the stopped blocks' matvecs, in fewer, larger programs: "
        + "; ".join(parts)
        + "."
    )


def finding_lines(summary: dict[str, Any]) -> list[str]:
    fast = summary["min_ratios"]
    return [
        loop_cost_line(summary),
        scipy_gap_line(summary),
        f"- The divergence check (a true-residual matvec every 20 steps) costs "
        f"{fast['check_overhead']:+.1%} (fastest runs); a call's fixed cost (input checks, "
        f"stacking the factors, right-hand side, residuals) is "
        f"{fast['fixed_cost_share']:.1%} of a {summary['fixed_iters']}-step solve.",
        preconditioner_line(summary),
        grouping_line(summary),
    ]


def conclusions(summary: dict[str, Any]) -> str:
    lines = ["## Conclusions", "", *target_lines(summary), *finding_lines(summary)]
    return "\n".join(lines) + "\n"


HANG_NOTE = """- **Hang in the preconditioned solve (jaxlib 0.10.2), fixed in d3f338e.** jaxlib 0.10's CPU
  LAPACK kernels (here `eigh`) split a batch over XLA:CPU's intra-op thread pool and block
  until the pieces are done. The pool has one thread per core; when as many batched
  `eigh` calls wait at once as the pool has threads, every thread waits and the process hangs
  for good, idle. `KFAC.sum_preconditioner` runs two `eigh` per group of blocks, so
  `mats(..., preconditioner=True)` hung on a 2-core machine up to 9d832c2 (ordering the calls
  with optimisation barriers was not enough). Since d3f338e the solver decomposes one matrix
  at a time (`lax.map` over the batch), which gives the pool nothing to split. The probe
  (`HANG_PROBE` in the script: 12 small kernels, 4 tasks, run in a fresh process without any
  workaround while the problem is built) checks it at the revision measured.
  `--workaround` restores what earlier runs needed: `NPROC=64` before JAX starts (a 64-thread
  pool) and one thread for scipy's bundled OpenBLAS, which jaxlib's LAPACK calls."""


def notes(results: dict[str, Any]) -> str:
    """What the set-up implies, with the figures of this run where there are any."""
    rows = {r["method"]: r for r in results["summary"]["solve_rows"]}
    plain = rows["mats (preconditioner=False, group_blocks=True)"]
    spread = {
        name: max(t) / min(t)
        for name, t in results["fixed_iterations"]["times_s"].items()
        if min(t) > 0
    }
    widest = max(spread, key=spread.__getitem__)
    return f"""## Notes

{HANG_NOTE}
- Synthetic factors: each task's factor is a shared power-law covariance plus directions of
  its own (see Problem); unpreconditioned CG needed at most {plain["iters_max"]} steps per
  block to reach {TOL:g} here. The Kronecker preconditioner is exact when the tasks share a
  factor up to scale; the task-own directions are what it cannot capture.
- The mats and scipy solutions at {TOL:g} can differ by up to about κ × (the two residuals),
  κ the block's condition number: both meet the tolerance and may differ in directions of
  small curvature.
- Spread of the fixed-iteration runs (slowest / fastest repetition): widest for {widest}
  ({_f(spread[widest])}×); see the load averages in the header for other work on the machine.

Hang probe at this revision, without the workaround: **{results["hang_probe_without_workaround"]}**.
"""


def markdown(
    cfg: Config, problem: Problem, blocks: list[NumpyBlock], results: dict[str, Any]
) -> str:
    info = results["machine"]
    summary = results["summary"]
    pre_name = "mats (preconditioner=True, group_blocks=True)"
    header = [
        "# Benchmark: MaTS per-block CG on K-FAC systems (`benchmarks/solver_kfac.py`)",
        "",
        f"- Command: `{results['command']}` (from the repository root)",
        f"- Date: {results['date']}; mats_jax {info['mats_jax']} at git {results['git']}",
        f"- Machine: {info['cpu_count']}-core CPU, `lscpu` model name "
        f"“{info['cpu_model']}”, {info['accelerator'] or 'no accelerator'} "
        f"(JAX backend `{info['jax_backend']}`); "
        f"{info['platform']}",
        f"- Versions: Python {info['python']}, JAX {info['jax']}, jaxlib "
        f"{info['jaxlib']}, numpy {info['numpy']}, scipy {info['scipy']}; "
        f"`jax_default_matmul_precision` {info['matmul_precision']}",
        f"- Workaround (see Notes): {_workaround(results['workaround'])}",
        f"- Load average (1/5/15 min) at start {_loads(results['load_average_at_start'])}, "
        f"at end {_loads(info['load_average_1_5_15min'])}, on {info['cpu_count']} cores.",
        f"- Total wall time: {_f(results['total_seconds'])} s",
        "",
    ]
    report = results["time_to_solve"][pre_name]["format_report"]
    return "\n".join(
        [
            *header,
            conclusions(summary),
            problem_section(cfg, problem, blocks),
            fixed_section(results["fixed_iterations"], summary),
            solve_section(summary, results["preconditioner_setup"], len(blocks)),
            notes(results),
            f"## `format_report` of the solve {pre_name}",
            "",
            "```",
            report,
            "```",
            "",
        ]
    )


def to_json(results: dict[str, Any]) -> dict[str, Any]:
    """Drops the solutions (large arrays) and converts numpy scalars."""

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k != "solution"}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            return x.item()
        return x

    return clean(results)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small shapes: a smoke run"
    )
    parser.add_argument("--reps", type=int, help="repetitions of the fixed-step runs")
    parser.add_argument("--out", type=Path, help="output path prefix")
    parser.add_argument(
        "--workaround",
        action="store_true",
        help="NPROC=64 and one OpenBLAS thread for jaxlib's LAPACK (needed before d3f338e)",
    )
    parser.add_argument(
        "--no-probe", action="store_true", help="skip the hang probe (jaxlib 0.10 CPU)"
    )
    add_dirty_option(parser)
    return parser.parse_args()


def checked_agreement(blocks: list[NumpyBlock]) -> dict[str, float]:
    """The two preconditioners' agreement; stops the run if they are not the same."""
    agreement = preconditioner_agreement(blocks)
    worst = max(agreement.values())
    print(f"numpy vs mats preconditioner: {worst:.2e} (relative, worst)", flush=True)
    if worst > PRECONDITIONER_AGREEMENT_TOL:
        raise SystemExit(
            f"the scipy loop's preconditioner differs from mats's by {worst:.2e} "
            f"(> {PRECONDITIONER_AGREEMENT_TOL:g}): the comparison would not be like "
            "for like"
        )
    return agreement


def run(cfg: Config, revision: str) -> tuple[Problem, list[NumpyBlock], dict[str, Any]]:
    start = time.perf_counter()
    load_at_start = list(os.getloadavg())
    probe = start_hang_probe() if cfg.probe_timeout_s > 0 else None
    print("building the problem…", flush=True)
    problem = build_problem(cfg)
    blocks = numpy_blocks(problem)
    agreement = checked_agreement(blocks)
    hang = finish_hang_probe(probe, start + cfg.probe_timeout_s)
    print(f"fixed iterations ({cfg.fixed_iters} steps, {cfg.reps} reps)…", flush=True)
    fixed = fixed_iterations(problem, blocks, cfg)
    print(f"time to solve ({cfg.solve_reps} reps)…", flush=True)
    solved = time_to_solve(problem, blocks, cfg)
    print("preconditioner setup…", flush=True)
    setup = preconditioner_setup(problem, blocks, cfg)
    results = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "git": revision,
        "machine": machine(scipy=scipy.__version__),
        "load_average_at_start": load_at_start,
        "config": dataclasses.asdict(cfg),
        "spectra": problem.spectra,
        "task_scales": problem.task_scales,
        "fixed_iterations": fixed,
        "time_to_solve": solved,
        "preconditioner_setup": setup,
        "hang_probe_without_workaround": hang,
        "preconditioner_agreement": agreement,
        "summary": summarise(fixed, solved, setup, agreement),
        "total_seconds": time.perf_counter() - start,
    }
    return problem, blocks, results


def single_threaded_jax_lapack() -> str | None:
    """Sets scipy's bundled OpenBLAS, which jaxlib's LAPACK kernels call, to 1 thread.

    jaxlib 0.10 already runs a batch of ``eigh`` in parallel over its pool; an
    OpenBLAS thread team inside each piece oversubscribes the cores and made
    batched ``eigh`` 10 to 500× slower here. numpy's own OpenBLAS (the scipy
    loop's matmuls) is a different library and keeps its threads.
    """
    with open("/proc/self/maps") as maps:
        paths = {
            line.split()[-1]
            for line in maps
            if "scipy.libs" in line and "libscipy_openblas" in line
        }
    for path in paths:
        ctypes.CDLL(path).scipy_openblas_set_num_threads(1)
    return ", ".join(sorted(Path(p).name for p in paths)) or None


def apply_workaround() -> dict[str, Any]:
    # NPROC is read when XLA's CPU client starts, which nothing has done yet.
    os.environ.setdefault("NPROC", str(DEADLOCK_POOL_THREADS))
    return {"NPROC": os.environ["NPROC"], "one_thread": single_threaded_jax_lapack()}


def main() -> None:
    args = parse_args()
    workaround = apply_workaround() if args.workaround else None
    cfg = QUICK if args.quick else Config()
    if args.reps:
        cfg = dataclasses.replace(cfg, reps=args.reps)
    if args.no_probe:
        cfg = dataclasses.replace(cfg, probe_timeout_s=0.0)
    out = args.out or (
        QUICK_RESULTS / "solver_kfac_quick" if args.quick else RESULTS / "solver_kfac"
    )
    revision = check_destination(out, args.allow_dirty)
    problem, blocks, results = run(cfg, revision)
    results["workaround"] = workaround
    report = markdown(cfg, problem, blocks, results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(report)
    out.with_suffix(".json").write_text(json.dumps(to_json(results), indent=1))
    print(report)
    print(f"wrote {out}.md and {out}.json")


if __name__ == "__main__":
    main()
