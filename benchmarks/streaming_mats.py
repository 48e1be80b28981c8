"""Benchmark: a data-dependent streaming merge at a real size: MaTS with K-FAC statistics of a 250M-parameter model.

The inputs are the IO benchmark's (``io_merge.py``, generated in the same
scratch directory and reused when present): a base and three fine-tuned
float32 safetensors checkpoints with Llama names and shapes (vocabulary
32000, hidden 1024, MLP 4096, 11 layers, untied embedding and head; 250 M
parameters, 1.0 GB each), read through the ``hf_llama`` layout, so that
kernels are (in, out) as a Flax model holds them.

Each fine-tuned model gets statistics written by :func:`mats_jax.save_statistics`
(about 2.9 GB per task on disk), synthetic but well-conditioned, as
:func:`mats_jax.kfac` would give them for the same model:

- every attention and MLP kernel: K-FAC, ``A`` (in × in) and ``G``
  (out × out), each ``X Xᵀ / k + I`` for a Gaussian ``X`` of ``n × n/8``
  (eigenvalues 1 and about 4.3–15.7: a condition number below 16), ``A``
  scaled per task and leaf by ``10^U(-½, ½)`` so that the tasks weigh each
  leaf differently;
- the vocabulary head (1024 × 32000) and the embedding: a diagonal Fisher
  (entries ``U(0.5, 2)``, scaled alike). A K-FAC head would need a
  32000 × 32000 ``G``, 4.1 GB per task, more than the whole model; the
  estimators give a factor of more than ``MAX_FACTOR_SIZE`` rows (8192) their
  diagonal fallback, and the benchmark does the same;
- the norms' scales: a diagonal Fisher.

Then times, each a separate process under ``/usr/bin/time -v`` after two
warm-up reads of every input (page cache warm):

- ``dd`` of the four checkpoints and the three statistics checkpoints' files
  (every byte read into user memory);
- ``mats-jax merge -q`` of the recipe ``method: mats`` with ``init:
  {method: task_arithmetic, scale: 0.3}``, ``tol: 0`` and ``maxiter: N``
  (``--maxiter``, default 5): N conjugate-gradient steps on every leaf,
  read, solved and written one leaf at a time;
- the same merge with ``maxiter: 0``: everything but the CG steps (reading,
  checking, the right-hand side ``Σ_m C_m θ_m``, the residuals, writing).

The FLOP floor of the solve: for each distinct leaf shape, a jitted loop of
nothing but the products ``Σ_m A_m V G_m`` (K-FAC) or ``Σ_m F_m ⊙ V``
(diagonal), the matmuls CG does per step, timed in this process. The floor
of the N steps is N × Σ_leaves t(shape); a merge also computes ``N + 3`` such
products per leaf (the right-hand side, the initial and the final residual).
The report gives (wall(N) − wall(0)) against the N steps' floor, and wall(N)
against the floor of all ``N + 3`` products plus the ``dd`` read.

The merged output is checked against a numpy conjugate gradient of the same
system (float64, from the same task-arithmetic start) on three leaves: the
first layer's query kernel (K-FAC 1024 × 1024), the last layer's down
projection (K-FAC, A 4096 × 4096) and the head (diagonal).

Peak memory target: ``(models + 1) × the largest leaf + that leaf's
statistics (all tasks) + 1 GiB``, taken over the leaves.

Run from the repository root, from a committed tree (see ``provenance.py``);
needs ~13 GB of free disk in the scratch directory beside the IO benchmark's:

    .venv/bin/python benchmarks/streaming_mats.py [--maxiter 5] [--repeats 1]
    .venv/bin/python benchmarks/streaming_mats.py --quick   # smoke run, ~20 MB models
    .venv/bin/python benchmarks/streaming_mats.py --generate-only   # inputs only

Results go to ``benchmarks/results/streaming_mats.{md,json}`` (``--quick``:
under the temporary directory; ``--out PREFIX`` anywhere); ``--render``
rewrites the markdown from the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from io_merge import Run, alternating, scratch_inputs, warm_page_cache
from provenance import (
    QUICK_RESULTS,
    RESULTS,
    add_output_options,
    check_destination,
    machine,
    render_only,
    write_results,
)

TA_SCALE = 0.3
LAYOUT = "hf_llama"
STATS_VERSION = 1  # bump when the generated statistics change
ORACLE_LEAVES = ("first_query", "last_down", "head")


# ---------------------------------------------------------------------------
# Inputs


def tree_leaves(file: Path) -> dict[str, tuple[int, ...]]:
    """The checkpoint's leaves (after the layout) and their shapes."""
    from mats_jax import open_checkpoint

    ckpt = open_checkpoint(file, layout=LAYOUT)
    return {path: tuple(info.shape) for path, info in ckpt.leaves.items()}


def uses_kfac(path: str, shape: tuple[int, ...]) -> bool:
    """K-FAC for kernels whose factors stay within the estimators' limit."""
    from mats_jax import MAX_FACTOR_SIZE

    return (
        path.endswith("/kernel") and len(shape) == 2 and max(shape) <= MAX_FACTOR_SIZE
    )


def well_conditioned(n: int, rng: np.random.Generator) -> np.ndarray:
    """``X Xᵀ / k + I`` for a Gaussian ``X`` of ``n × k``, ``k = n/8``."""
    k = max(n // 8, 8)
    x = rng.standard_normal((n, k), dtype=np.float32)
    out = x @ x.T
    out *= np.float32(1.0 / k)
    out[np.diag_indices(n)] += np.float32(1.0)
    return out


def task_statistics(leaves: dict[str, tuple[int, ...]], seed: int) -> dict[str, Any]:
    """One task's statistics, as a tree keyed by the checkpoint's paths."""
    import jax.numpy as jnp

    from mats_jax import KFAC, Diagonal

    rng = np.random.default_rng(seed)
    tree: dict[str, Any] = {}
    for path, shape in leaves.items():
        scale = np.float32(10.0 ** rng.uniform(-0.5, 0.5))
        if uses_kfac(path, shape):
            a = well_conditioned(shape[0], rng)
            a *= scale
            stat: Any = KFAC(
                jnp.asarray(a), jnp.asarray(well_conditioned(shape[1], rng))
            )
        else:
            entries = rng.uniform(0.5, 2.0, shape).astype(np.float32) * scale
            stat = Diagonal(jnp.asarray(entries))
        node = tree
        *parents, name = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = stat
    return tree


def generate_statistics(
    scratch: Path, models: list[Path], leaves: dict[str, tuple[int, ...]]
) -> list[Path]:
    """Each fine-tuned model's statistics checkpoint (reused when up to date)."""
    from mats_jax import save_statistics

    folders = [scratch / f"mats_statistics_{i}" for i in range(len(models))]
    stamp = scratch / "mats_statistics.json"
    wanted = json.dumps({"version": STATS_VERSION, "leaves": sorted(leaves)})
    if (
        all(f.is_dir() for f in folders)
        and stamp.exists()
        and stamp.read_text() == wanted
    ):
        return folders
    stamp.unlink(missing_ok=True)
    for i, folder in enumerate(folders):
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        save_statistics(folder, task_statistics(leaves, seed=100 + i))
        print(f"  statistics {i}: {time.perf_counter() - start:.1f} s", flush=True)
    stamp.write_text(wanted)
    return folders


def recipe(
    scratch: Path,
    files: list[Path],
    stats: list[Path],
    maxiter: int,
    first_layer_only: bool = False,
) -> Path:
    """The merge's recipe; ``first_layer_only`` copies every later layer unmerged
    (the warm-up: each leaf shape merged once, so each program compiled once)."""
    lines = [
        f"base: {{path: {files[0]}, layout: {LAYOUT}}}",
        "models:",
        *(
            f"  - {{path: {f}, layout: {LAYOUT}, statistics: {s}}}"
            for f, s in zip(files[1:], stats, strict=True)
        ),
        "method: mats",
        "parameters: {init: {method: task_arithmetic, scale: "
        f"{TA_SCALE}}}, maxiter: {maxiter}, tol: 0}}",
        f"output: {{format: safetensors, max_shard_size: 2GB, layout: {LAYOUT}}}",
    ]
    if first_layer_only:
        lines.append(
            'overrides: [{pattern: "re:^model/layers/([1-9]|[1-9][0-9]+)/", skip: true}]'
        )
    suffix = "_warm_up" if first_layer_only else ""
    path = scratch / f"recipe_mats_kfac_{maxiter}{suffix}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def statistic_bytes(path: str, shape: tuple[int, ...]) -> int:
    if uses_kfac(path, shape):
        return 4 * (shape[0] ** 2 + shape[1] ** 2)
    return 4 * int(np.prod(shape))


def memory_target_mb(leaves: dict[str, tuple[int, ...]], models: int) -> dict[str, Any]:
    """(models + 1) × leaf + its statistics over the models + 1 GiB, worst leaf."""
    worst, which = 0, ""
    for path, shape in leaves.items():
        need = (models + 1) * 4 * int(np.prod(shape)) + models * statistic_bytes(
            path, shape
        )
        if need > worst:
            worst, which = need, path
    return {"leaf": which, "mb": worst / 2**20 + 1024}


# ---------------------------------------------------------------------------
# The FLOP floor


def floor_per_product(
    leaves: dict[str, tuple[int, ...]], models: int, steps: int = 4, reps: int = 3
) -> dict[str, Any]:
    """Seconds of one ``Σ_m C_m V`` for each distinct (statistic, shape), best of ``reps``."""
    import jax
    import jax.numpy as jnp

    shapes: dict[tuple[str, tuple[int, ...]], int] = {}
    for path, shape in leaves.items():
        kind = "kfac" if uses_kfac(path, shape) else "diagonal"
        shapes[(kind, shape)] = shapes.get((kind, shape), 0) + 1
    out = {}
    for (kind, shape), count in shapes.items():
        key = jax.random.split(jax.random.key(0), 3)
        v = jax.random.normal(key[0], shape)
        if kind == "kfac":
            i, o = shape
            # Scaled so that the iterates neither overflow nor vanish.
            a = jax.random.normal(key[1], (models, i, i)) / np.sqrt(i)
            g = jax.random.normal(key[2], (models, o, o)) / np.sqrt(o * models)
            operands: tuple[Any, ...] = (a, g)
            flops = models * 2 * (i * i * o + i * o * o)

            def product(ops: Any, x: Any) -> Any:
                a, g = ops
                return jnp.einsum("mik,mkl->il", jnp.einsum("mij,jk->mik", a, x), g)
        else:  # the solver forms Σ_m F_m once: one product per step
            operands = (jax.random.uniform(key[1], shape),)
            flops = int(np.prod(shape))

            def product(ops: Any, x: Any) -> Any:
                return ops[0] * x

        @jax.jit
        def loop(ops: Any, x: Any, product: Any = product) -> Any:
            return jax.lax.fori_loop(0, steps, lambda _, y: product(ops, y), x)

        loop(operands, v).block_until_ready()  # compile
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            loop(operands, v).block_until_ready()
            times.append((time.perf_counter() - start) / steps)
        best = min(times)
        out[f"{kind} {shape}"] = {
            "kind": kind,
            "shape": list(shape),
            "leaves": count,
            "seconds_per_product": best,
            "all_s": times,
            "gflop_per_product": flops / 1e9,
            "gflops": flops / best / 1e9,
        }
    return out


# ---------------------------------------------------------------------------
# The oracle: numpy CG of one leaf's system


def numpy_cg(product: Any, b: np.ndarray, x0: np.ndarray, steps: int) -> np.ndarray:
    """Textbook conjugate gradient with the Frobenius inner product."""
    x = x0.copy()
    r = b - product(x)
    p = r.copy()
    rr = float(np.vdot(r, r))
    for _ in range(steps):
        if rr == 0.0:
            break
        ap = product(p)
        alpha = rr / float(np.vdot(p, ap))
        x += alpha * p
        r -= alpha * ap
        rr_new = float(np.vdot(r, r))
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def oracle_paths(leaves: dict[str, tuple[int, ...]]) -> dict[str, str]:
    layers = sorted(
        {int(p.split("/")[2]) for p in leaves if p.startswith("model/layers/")}
    )
    return {
        "first_query": f"model/layers/{layers[0]}/self_attn/q_proj/kernel",
        "last_down": f"model/layers/{layers[-1]}/mlp/down_proj/kernel",
        "head": "lm_head/kernel",
    }


def check_leaf(
    path: str, files: list[Path], stats: list[Path], output: Path, maxiter: int
) -> dict[str, Any]:
    """The merged leaf against a float64 numpy CG of its system."""
    from mats_jax import open_checkpoint
    from mats_jax.io import StatisticsReader

    base = open_checkpoint(files[0], layout=LAYOUT).read(path).astype(np.float64)
    models = [
        open_checkpoint(f, layout=LAYOUT).read(path).astype(np.float64)
        for f in files[1:]
    ]
    read = [StatisticsReader(s).read(path) for s in stats]
    products = [task_product(s) for s in read]

    def product(x: np.ndarray) -> np.ndarray:
        return sum(p(x) for p in products)

    init = base + TA_SCALE * sum(m - base for m in models)
    b = sum(p(m) for p, m in zip(products, models, strict=True))
    expected = numpy_cg(product, b, init, maxiter)
    merged = open_checkpoint(output, layout=LAYOUT).read(path).astype(np.float64)
    scale = float(np.max(np.abs(expected)))
    return {
        "leaf": path,
        "statistic": read[0].kind,
        "max_abs_diff": float(np.max(np.abs(merged - expected))),
        "max_abs_expected": scale,
        "moved_from_init": float(np.max(np.abs(expected - init))),
    }


def task_product(stat: Any) -> Any:
    """``x ↦ C x`` of one task's statistic, in float64."""
    from mats_jax import KFAC

    if isinstance(stat, KFAC):
        a, g = np.asarray(stat.a, np.float64), np.asarray(stat.g, np.float64)
        return lambda x: a @ x @ g
    f = np.asarray(stat.f, np.float64)
    return lambda x: f * x


# ---------------------------------------------------------------------------
# Running


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/mats_io_bench"))
    parser.add_argument("--maxiter", type=int, default=5, help="CG steps per leaf")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each merge")
    parser.add_argument(
        "--quick", action="store_true", help="small models: a smoke run"
    )
    parser.add_argument(
        "--generate-only",
        action="store_true",
        help="write the inputs and statistics into the scratch directory and stop",
    )
    add_output_options(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = args.out or (
        QUICK_RESULTS / "streaming_mats_quick"
        if args.quick
        else RESULTS / "streaming_mats"
    )
    if render_only(out, args.render, markdown):
        return
    revision = check_destination(out, args.allow_dirty)
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    dims, scratch, logs, files = scratch_inputs(args.scratch, args.quick)
    leaves = tree_leaves(files[0])
    stats = generate_statistics(scratch, files[1:], leaves)
    if args.generate_only:
        print(f"inputs ready in {scratch} ({time.perf_counter() - t0:.0f} s)")
        return
    stat_files = sorted(p for s in stats for p in s.rglob("*") if p.is_file())
    inputs = [*files, *stat_files]

    # The installed command, or (on a machine with the tree on PYTHONPATH and
    # no install, as benchmarks/device_run.sh runs) the same entry point.
    script = Path(sys.executable).parent / "mats-jax"
    binary = (
        [str(script)] if script.exists() else [sys.executable, "-m", "mats_jax.cli"]
    )
    dd = " && ".join(f"dd if={f} of=/dev/null bs=16M status=none" for f in inputs)
    runs = [Run("read_dd", ["sh", "-c", dd])]
    for n in (args.maxiter, 0):
        output = scratch / f"out_mats_kfac_{n}"
        config = recipe(scratch, files, stats, n)
        runs.append(
            Run(
                f"mats_kfac_{n}",
                [*binary, "merge", str(config), "-o", str(output), "-q"],
                output,
            )
        )
    # Every timed merge finds its programs in the benchmark's own compilation
    # cache, filled by an untimed merge of the first layer (each leaf shape
    # once): otherwise the first run would pay the compilations and the
    # second, with the same shapes, not.
    cache = scratch / "compilation_cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "MATS_JAX_COMPILATION_CACHE": str(cache)}
    warm_up = [
        *binary,
        "merge",
        str(recipe(scratch, files, stats, args.maxiter, first_layer_only=True)),
        "-o",
        str(scratch / "out_warm_up"),
        "-q",
        "--overwrite",
    ]
    started = time.perf_counter()
    subprocess.run(warm_up, check=True, env=env, capture_output=True)
    warm_up_s = time.perf_counter() - started
    # The floor before and after the merges: load from other jobs moves it.
    floors = [floor_per_product(leaves, len(stats))]
    logs = logs / "streaming_mats"
    logs.mkdir(exist_ok=True)
    timings = alternating(
        runs, args.repeats, logs, lambda: warm_page_cache(inputs), env
    )
    for key, reps in timings.items():
        for i, result in enumerate(reps):
            result["command"] = result["command"].replace(
                dd, "dd of every input (16M blocks)"
            )
            if result["returncode"] != 0:
                print((logs / f"{key}_{i}.log").read_text()[-3000:])
                raise SystemExit(f"{key} failed (exit {result['returncode']})")
    floors.append(floor_per_product(leaves, len(stats)))
    floor = {
        name: {
            **after,
            "all_s": floors[0][name]["all_s"] + after["all_s"],
            "seconds_per_product": min(
                floors[0][name]["seconds_per_product"], after["seconds_per_product"]
            ),
            "before_s": floors[0][name]["seconds_per_product"],
            "after_s": after["seconds_per_product"],
        }
        for name, after in floors[1].items()
    }
    for f in floor.values():
        f["gflops"] = f["gflop_per_product"] / f["seconds_per_product"]
    paths = oracle_paths(leaves)
    checks = {
        name: check_leaf(
            paths[name],
            files,
            stats,
            scratch / f"out_mats_kfac_{args.maxiter}",
            args.maxiter,
        )
        for name in ORACLE_LEAVES
    }
    result = {
        "command": " ".join(["python", "benchmarks/streaming_mats.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "git": revision,
        "machine": machine(),
        "dims": dataclasses.asdict(dims),
        "quick": args.quick,
        "maxiter": args.maxiter,
        "models": len(stats),
        "model_bytes": {f.name: f.stat().st_size for f in files},
        "statistics_bytes": {s.name: folder_bytes(s) for s in stats},
        "leaves": len(leaves),
        "kfac_leaves": sum(uses_kfac(p, s) for p, s in leaves.items()),
        "memory_target": memory_target_mb(leaves, len(stats)),
        "timings": timings,
        "runs": {
            key: {
                "median_s": float(np.median([r["wall_s"] for r in reps])),
                "wall_s": [r["wall_s"] for r in reps],
                "peak_rss_mb": max(r["peak_rss_mb"] or 0 for r in reps),
            }
            for key, reps in timings.items()
        },
        "floor": floor,
        "floor_step_s": sum(
            f["leaves"] * f["seconds_per_product"] for f in floor.values()
        ),
        "floor_step_before_after_s": [
            sum(f["leaves"] * f[k] for f in floor.values())
            for k in ("before_s", "after_s")
        ],
        "oracle": checks,
        "warm_up_s": warm_up_s,
        "load_start": load_start,
        "load_end": os.getloadavg(),
        "total_s": time.perf_counter() - t0,
    }
    write_results(out, result, markdown)


# ---------------------------------------------------------------------------
# Report


def _f(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def markdown(r: dict[str, Any]) -> str:
    m, n = r["machine"], r["maxiter"]
    runs = r["runs"]
    step = r["floor_step_s"]
    wall_n, wall_0 = runs[f"mats_kfac_{n}"]["median_s"], runs["mats_kfac_0"]["median_s"]
    read = runs["read_dd"]["median_s"]
    target = r["memory_target"]
    gb = 1e9
    lines = [
        "# Benchmark: MaTS with K-FAC statistics, streamed, on a 250M-parameter model "
        "(`benchmarks/streaming_mats.py`)",
        "",
        f"- Command: `{r['command']}`",
        f"- Date: {r['date']}; mats_jax {m['mats_jax']} at git {r['git']}",
        f"- Machine: {m['cpu_count']}-core CPU, `lscpu` model name “{m['cpu_model']}”, "
        f"JAX backend `{m['jax_backend']}`; {m['platform']}. Load average "
        f"{', '.join(f'{x:.1f}' for x in r['load_start'])} at the start, "
        f"{', '.join(f'{x:.1f}' for x in r['load_end'])} at the end.",
        f"- Versions: Python {m['python']}, JAX {m['jax']}, jaxlib {m['jaxlib']}, "
        f"numpy {m['numpy']}",
        f"- Inputs: base + {r['models']} models, "
        f"{sum(r['model_bytes'].values()) / gb:.2f} GB of safetensors "
        f"({r['leaves']} leaves, {r['kfac_leaves']} with K-FAC statistics, the rest "
        f"diagonal); statistics {sum(r['statistics_bytes'].values()) / gb:.2f} GB "
        f"({', '.join(f'{v / gb:.2f}' for v in r['statistics_bytes'].values())} GB per "
        "task). Dimensions: " + ", ".join(f"{k} {v}" for k, v in r["dims"].items()),
        f"- Statistics: K-FAC for the {r['kfac_leaves']} attention and MLP kernels, "
        "whose factors have at most `MAX_FACTOR_SIZE` (8192) rows; a diagonal Fisher "
        f"for the head: its K-FAC G would be {r['dims']['vocab']}² floats, "
        f"{4 * r['dims']['vocab'] ** 2 / gb:.1f} GB per task (the estimators give such "
        "a leaf their diagonal fallback, and so does this benchmark), and for the "
        "embedding and the norms. Synthetic, well-conditioned factors "
        "(`X Xᵀ/k + I`, condition number below 16), scaled per task and leaf.",
        f"- Merge: `method: mats`, init task arithmetic (scale {TA_SCALE}), `tol: 0`, "
        f"`maxiter: {n}` (and 0); every run under `/usr/bin/time -v` after two warm "
        f"reads of every input; {len(runs['read_dd']['wall_s'])} repeat(s), medians. "
        "Each finds its compiled programs in the benchmark's own compilation cache, "
        f"filled by an untimed merge of the first layer ({r['warm_up_s']:.0f} s).",
        f"- Total wall time: {r['total_s']:.0f} s",
        "",
        "## Runs",
        "",
        "| run | wall s (all runs) | peak RSS MiB | × dd read |",
        "|---|---:|---:|---:|",
    ]
    for key, run in runs.items():
        walls = ", ".join(f"{w:.1f}" for w in run["wall_s"])
        lines.append(
            f"| {key} | {run['median_s']:.1f} ({walls}) | {run['peak_rss_mb']:.0f} "
            f"| {run['median_s'] / read:.2f} |"
        )
    peak = max(runs[f"mats_kfac_{k}"]["peak_rss_mb"] for k in (n, 0))
    steps_s = wall_n - wall_0
    all_floor = (n + 3) * step
    lines += [
        "",
        "## Against the floors",
        "",
        f"- **Peak memory**: {peak:.0f} MiB against the target {target['mb']:.0f} MiB "
        f"((models + 1) × the leaf + its statistics over the models + 1 GiB, worst at "
        f"`{target['leaf']}`): **{'met' if peak <= target['mb'] else 'missed'}**.",
        f"- **CG steps**: wall(maxiter={n}) − wall(maxiter=0) = {steps_s:.1f} s for {n} "
        f"steps, against their FLOP floor {n} × {step:.2f} s = {n * step:.1f} s: "
        f"**{steps_s / (n * step):.2f}×** the floor"
        if n
        else "- maxiter 0 only",
        f"- **The whole merge**: {wall_n:.1f} s against the floor of all its "
        f"{n + 3} products per leaf ({all_floor:.1f} s) plus the `dd` read of every "
        f"input ({read:.1f} s), {all_floor + read:.1f} s: "
        f"**{wall_n / (all_floor + read):.2f}×**. Without the CG steps (maxiter 0) "
        f"{wall_0:.1f} s, of which 3 products per leaf are {3 * step:.1f} s of floor.",
        "",
        "## The FLOP floor per product",
        "",
        "A jitted loop of nothing but `Σ_m A_m V G_m` (K-FAC: two matmuls per task) or "
        "`(Σ_m F_m) ⊙ V` (diagonal: the solver forms the sum once), timed in the "
        "benchmark's process before and after "
        "the merges (best of 3 loops of 4 products each time; one CG step over "
        "every leaf was "
        + " s before and ".join(f"{x:.2f}" for x in r["floor_step_before_after_s"])
        + " s after).",
        "",
        "| statistic, leaf shape | leaves | GFLOP per product | s per product | GFLOP/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, f in r["floor"].items():
        lines.append(
            f"| {name} | {f['leaves']} | {_f(f['gflop_per_product'])} "
            f"| {f['seconds_per_product']:.4f} | {_f(f['gflops'])} |"
        )
    lines += [
        f"| **one CG step over every leaf** | | "
        f"{_f(sum(f['leaves'] * f['gflop_per_product'] for f in r['floor'].values()))} "
        f"| {step:.2f} | |",
        "",
        "## The output against a numpy conjugate gradient",
        "",
        f"Float64 numpy CG of the same system, {n} steps from the same task-arithmetic "
        "start, on three leaves of the output (read back through the layout).",
        "",
        "| leaf | statistic | max abs difference | max abs entry | max move from the init |",
        "|---|---|---:|---:|---:|",
    ]
    for check in r["oracle"].values():
        lines.append(
            f"| `{check['leaf']}` | {check['statistic']} | {check['max_abs_diff']:.2e} "
            f"| {check['max_abs_expected']:.3g} | {check['moved_from_init']:.3g} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
