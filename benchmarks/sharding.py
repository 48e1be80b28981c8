"""Benchmark: per-device memory and wall time of a sharded MaTS merge on 1–8 devices.

A fixed model (a stack of transformer-like layers, every kernel with a K-FAC
statistic, several tasks) is merged by :func:`mats_jax.mats` on meshes of 1,
2, 4 and 8 simulated CPU devices, and a model with 8× the layers on 8
devices. Per device, the compiled solve's memory comes from XLA
(``lower_solve(...).compile().memory_analysis()``: arguments, outputs and
temporaries, the same numbers a TPU or GPU compile reports); wall time is the
median of timed runs after compilation. Two layouts of the parameters:

* ``layers``: the stacked layer axis split over the devices (as ``nn.scan``
  stacks layers; each device solves its own layers);
* ``outputs``: every kernel split on its output axis (tensor parallel), which
  the solver reshards to whole blocks per device.

Every sharded result is compared with the one-device result.

The devices are simulated (``--xla_force_host_platform_device_count=8``) on
this machine's cores: memory per device is what XLA allocates per device and
carries over to real devices; wall time on simulated devices shares the same
cores, so it shows the overhead of partitioning, not a speed-up.

Run from the repository root:

    .venv/bin/python benchmarks/sharding.py            # full
    .venv/bin/python benchmarks/sharding.py --quick    # smoke run, small shapes

It writes ``benchmarks/results/sharding.{md,json}``, from a committed tree
only (``--allow-dirty`` to record anyway, said in the results; ``--quick``:
under the temporary directory; ``--out PREFIX`` anywhere); the markdown is
generated from the measured numbers (``--render`` rewrites it from the JSON).
"""

from __future__ import annotations

import os

# Before JAX starts: 8 simulated CPU devices.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from provenance import (
    QUICK_RESULTS,
    RESULTS,
    add_dirty_option,
    check_destination,
    machine,
)

from mats_jax import KFAC, lower_solve, mats, task_arithmetic
from mats_jax.sharding import shard_statistics


@dataclasses.dataclass(frozen=True)
class Config:
    """Shapes and run lengths of one benchmark run."""

    hidden: int = 64
    ff: int = 256
    layers: int = 8  # the fixed model; the large one has 8× as many
    tasks: int = 3
    maxiter: int = 50
    reps: int = 3
    devices: tuple[int, ...] = (1, 2, 4, 8)
    seed: int = 0


QUICK = Config(hidden=16, ff=32, layers=8, maxiter=10, reps=1)


def kernel_shapes(cfg: Config) -> dict[str, tuple[int, int]]:
    """A transformer layer's dense kernels, (in, out) as Flax stores them."""
    h, f = cfg.hidden, cfg.ff
    return {"qkv": (h, 3 * h), "out": (h, h), "wi": (h, f), "wo": (f, h)}


def spd(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Random symmetric positive definite matrices, ``shape[:-1] + (n, n)``."""
    n = shape[-1]
    q = jax.random.normal(key, (*shape[:-1], 2 * n))
    return q @ jnp.swapaxes(q, -1, -2) / (2 * n) + 1e-3 * jnp.eye(n)


def build(cfg: Config, layers: int) -> tuple[list[dict], list[dict], dict]:
    """Models (stacked layers, (layers, in, out) kernels), K-FAC statistics, base."""
    key = jax.random.key(cfg.seed)
    base, models, stats = (
        {},
        [{} for _ in range(cfg.tasks)],
        [{} for _ in range(cfg.tasks)],
    )
    for i, (name, (n_in, n_out)) in enumerate(kernel_shapes(cfg).items()):
        k = jax.random.fold_in(key, i)
        base[name] = jax.random.normal(k, (layers, n_in, n_out)) / np.sqrt(n_in)
        for m in range(cfg.tasks):
            km = jax.random.fold_in(k, 100 + m)
            models[m][name] = base[name] + 0.1 * jax.random.normal(km, base[name].shape)
            a = spd(jax.random.fold_in(km, 1), (layers, n_in, n_in))
            g = spd(jax.random.fold_in(km, 2), (layers, n_out, n_out))
            stats[m][name] = KFAC(a, g, in_axes=(1,), out_axes=(2,))
    return models, stats, base


SPECS = {
    "layers": PartitionSpec("x", None, None),
    "outputs": PartitionSpec(None, None, "x"),
}


def place(
    models: list[dict], stats: list[dict], base: dict, n: int, layout: str
) -> tuple:
    """Everything on a mesh of the first n devices (n = 1: left on one device)."""
    if n == 1:
        return models, stats, base
    mesh = Mesh(np.array(jax.devices()[:n]), ("x",))
    shardings = {k: NamedSharding(mesh, SPECS[layout]) for k in base}
    placed = [jax.device_put(m, shardings) for m in models]
    return (
        placed,
        [shard_statistics(s, p) for s, p in zip(stats, placed, strict=True)],
        jax.device_put(base, shardings),
    )


def memory(
    models: list[dict], stats: list[dict], init: dict, cfg: Config
) -> dict[str, int]:
    compiled = lower_solve(
        models, stats, init=init, maxiter=cfg.maxiter, tol=0.0
    ).compile()
    m = compiled.memory_analysis()
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
        "total": int(total),
        "peak": int(getattr(m, "peak_memory_in_bytes", 0) or 0),
    }


def run_case(cfg: Config, layers: int, n: int, layout: str, reference: Any) -> dict:
    models, stats, base = place(*build(cfg, layers), n, layout)
    init = task_arithmetic(base, models, scale=0.3)
    mem = memory(models, stats, init, cfg)

    def merge() -> dict:
        out = mats(models, stats, init=init, maxiter=cfg.maxiter, tol=0.0).params
        return jax.block_until_ready(out)

    start = time.perf_counter()
    result = merge()
    first = time.perf_counter() - start
    times = []
    for _ in range(cfg.reps):
        start = time.perf_counter()
        merge()
        times.append(time.perf_counter() - start)
    shardings = {
        k: str(getattr(v.sharding, "spec", "single device")) for k, v in result.items()
    }
    diff = None
    if reference is not None:
        diff = max(
            float(np.max(np.abs(np.asarray(result[k]) - np.asarray(reference[k]))))
            for k in result
        )
    return {
        "layers": layers,
        "devices": n,
        "layout": layout if n > 1 else "one device",
        "memory_per_device": mem,
        "compile_and_first_run_s": first,
        "times_s": times,
        "median_s": float(np.median(times)),
        "output_specs": shardings,
        "max_abs_diff_vs_one_device": diff,
        "parameters_per_task": int(sum(np.prod(v.shape) for v in result.values())),
        "_result": result,
    }


def mib(x: int) -> str:
    return f"{x / 2**20:.3f}"


def agreement_line(cases: list[dict]) -> str:
    worst = max((c["max_abs_diff_vs_one_device"] or 0.0) for c in cases)
    if worst == 0:
        return (
            "- Every sharded merge equals the one-device merge of the same model bit for "
            "bit (largest absolute difference 0)."
        )
    return (
        f"- The sharded merges differ from the one-device merge of the same model by up "
        f"to {worst:.3g} (largest absolute difference over every leaf)."
    )


def wall_time_line(cfg: Config, cases: list[dict], info: dict, base_time: float) -> str:
    sharded = [
        c["median_s"] for c in cases if c["layers"] == cfg.layers and c["devices"] > 1
    ]
    return (
        f"- Wall time (medians): the fixed model took {base_time:.3f} s on one device and "
        f"{min(sharded):.3f}–{max(sharded):.3f} s sharded, on simulated devices that "
        f"share {info['cpu_count']} cores (see Notes)."
    )


def notes(cfg: Config, cases: list[dict]) -> list[str]:
    """What the layouts do, with the checks that this run's figures allow."""
    one = next(c for c in cases if c["devices"] == 1 and c["layers"] == cfg.layers)
    outputs = [
        c for c in cases if c["layout"] == "outputs" and c["layers"] == cfg.layers
    ]
    slower = all(
        c["memory_per_device"]["total"]
        > one["memory_per_device"]["total"] / c["devices"]
        for c in outputs
    )
    peak_is_io = all(
        c["memory_per_device"]["peak"]
        == c["memory_per_device"]["arguments"] + c["memory_per_device"]["outputs"]
        for c in cases
    )
    even = all(cfg.layers % n == 0 for n in cfg.devices)
    return [
        "- `layers`: with the layer axis split, statistics are split the same way "
        "(`shard_statistics`), and each device solves its own layers: no resharding and "
        "no communication inside the CG loop. `outputs`: the kernels' output axis is "
        "split, G (out × out) by rows with it and A (in × in) by rows borrowing the same "
        "split, so the arguments are 1/n as well; the solver reshards kernels and factors "
        "to whole blocks per device at the start and back at the end (all-to-alls)"
        + (
            ", and per-device memory falls more slowly than 1/n at every device count "
            "here (the reshards' temporaries)."
            if slower
            else "."
        ),
        "- `total` adds arguments, outputs and temporaries as if all were live at once "
        "(an upper bound)"
        + (
            "; XLA's own `peak` figure equals arguments + outputs in every case here, "
            "leaving the temporaries out."
            if peak_is_io
            else "."
        ),
        "- The solver pads each group of same-shaped blocks to a multiple of the device "
        "count with empty blocks"
        + (
            f": with {cfg.layers} layers per group every device count here divides evenly."
            if even
            else "."
        ),
        "- Wall times on simulated devices measure nothing about real multi-device speed; "
        "they are recorded to show the sharded program runs and what partitioning costs on "
        "one CPU.",
    ]


def markdown(cfg: Config, results: dict) -> str:
    info = results["machine"]
    cases = results["cases"]
    one = next(c for c in cases if c["devices"] == 1 and c["layers"] == cfg.layers)
    base_total = one["memory_per_device"]["total"]
    base_time = one["median_s"]
    lines = [
        "# Benchmark: sharded MaTS merge on 1–8 simulated devices (`benchmarks/sharding.py`)",
        "",
        f"- Command: `{results['command']}` (from the repository root)",
        f"- Date: {results['date']}; mats_jax {info['mats_jax']} at git {results['git']}",
        f"- Machine: {info['cpu_count']}-core CPU, `lscpu` model name “{info['cpu_model']}”, "
        f"no accelerator (JAX backend `{info['jax_backend']}`, {info.get('device_count', info.get('simulated_devices'))} "
        f"simulated devices: `{info['xla_flags']}`); {info['platform']}",
        f"- Versions: Python {info['python']}, JAX {info['jax']}, jaxlib {info['jaxlib']}, "
        f"numpy {info['numpy']}",
        "- Load average (1/5/15 min) at start "
        + " / ".join(f"{x:.1f}" for x in results["load_average_at_start"])
        + ", at end "
        + " / ".join(f"{x:.1f}" for x in info["load_average_1_5_15min"])
        + f", on {info['cpu_count']} cores.",
        f"- Total wall time: {results['total_s']:.1f} s",
        "",
        "## Conclusions",
        "",
    ]
    for layout in SPECS:
        row = [
            c
            for c in cases
            if c["layers"] == cfg.layers
            and (c["devices"] == 1 or c["layout"] == layout)
        ]
        ratios = ", ".join(
            f"{c['devices']}: {c['memory_per_device']['total'] / base_total:.3f}"
            for c in row
        )
        lines.append(
            f"- Layout `{layout}`: per-device memory of the compiled solve relative to one "
            f"device, by device count: {ratios} (1/n would be "
            + ", ".join(f"{1 / c['devices']:.3f}" for c in row)
            + ")."
        )
    large_one = next(
        c for c in cases if c["layers"] == 8 * cfg.layers and c["devices"] == 1
    )
    for c in cases:
        if c["layers"] != 8 * cfg.layers or c["devices"] == 1:
            continue
        total = c["memory_per_device"]["total"]
        lines.append(
            f"- The model with 8× the layers on 8 devices (`{c['layout']}`): "
            f"{mib(total)} MiB per device, {total / base_total:.3f}× the fixed model on "
            f"one device and {total / large_one['memory_per_device']['total']:.3f}× the "
            f"large model on one device ({mib(large_one['memory_per_device']['total'])} MiB)."
        )
    lines += [agreement_line(cases), wall_time_line(cfg, cases, info, base_time)]
    h, f = cfg.hidden, cfg.ff
    lines += [
        "",
        "## Problem",
        "",
        f"{cfg.layers} layers (the large model: {8 * cfg.layers}), each with four kernels "
        f"qkv ({h}×{3 * h}), out ({h}×{h}), wi ({h}×{f}), wo ({f}×{h}), stacked on a "
        f"leading layer axis as `nn.scan` does; {cfg.tasks} tasks, each kernel with a "
        f"random `KFAC` statistic (A and G random SPD); MaTS with {cfg.maxiter} CG steps "
        "(`tol=0`) from task arithmetic. Memory is XLA's per-device figure for the "
        "compiled solve (`memory_analysis()`): arguments + outputs + temporaries − "
        "aliased; `peak` is XLA's own peak estimate where the CPU client reports one.",
        "",
        "## Results",
        "",
        "| layers | devices | layout | arguments MiB | outputs MiB | temp MiB | total MiB | "
        "total ÷ one device | peak MiB | median s | runs s | compile+first s | max |Δ| |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        m = c["memory_per_device"]
        lines.append(
            f"| {c['layers']} | {c['devices']} | {c['layout']} | {mib(m['arguments'])} | "
            f"{mib(m['outputs'])} | {mib(m['temp'])} | {mib(m['total'])} | "
            f"{m['total'] / base_total:.3f} | {mib(m['peak'])} | {c['median_s']:.3f} | "
            + " / ".join(f"{t:.3f}" for t in c["times_s"])
            + f" | {c['compile_and_first_run_s']:.2f} | "
            + (
                "-"
                if c["max_abs_diff_vs_one_device"] is None
                else f"{c['max_abs_diff_vs_one_device']:.3g}"
            )
            + " |"
        )
    lines += [
        "",
        "## Notes",
        "",
        *notes(cfg, cases),
        "",
    ]
    return "\n".join(lines)


def write(out: Path, cfg: Config, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(cfg, results))
    print(f"wrote {out}.md and .json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small shapes, one run each"
    )
    parser.add_argument("--out", type=Path, help="output prefix, without suffix")
    parser.add_argument(
        "--render",
        action="store_true",
        help="only rewrite the markdown from the recorded JSON",
    )
    add_dirty_option(parser)
    args = parser.parse_args()
    out = args.out or (
        QUICK_RESULTS / "sharding_quick" if args.quick else RESULTS / "sharding"
    )
    if args.render:
        results = json.loads(out.with_suffix(".json").read_text())
        cfg = Config(
            **{
                k: tuple(v) if isinstance(v, list) else v
                for k, v in results["config"].items()
            }
        )
        out.with_suffix(".md").write_text(markdown(cfg, results))
        return
    revision = check_destination(out, args.allow_dirty)
    cfg = QUICK if args.quick else Config()
    load_at_start = list(os.getloadavg())
    started = time.perf_counter()
    cases = []
    reference = None
    for n in cfg.devices:
        for layout in SPECS if n > 1 else ("layers",):
            case = run_case(cfg, cfg.layers, n, layout, reference)
            if n == 1:
                reference = case["_result"]
            cases.append(case)
            print(
                f"layers={cfg.layers} devices={n} layout={case['layout']}: "
                f"{mib(case['memory_per_device']['total'])} MiB/device, "
                f"{case['median_s']:.3f} s",
                flush=True,
            )
    large_reference = run_case(cfg, 8 * cfg.layers, 1, "layers", None)
    cases.append(large_reference)
    for layout in SPECS:
        case = run_case(cfg, 8 * cfg.layers, 8, layout, large_reference["_result"])
        cases.append(case)
        print(
            f"layers={8 * cfg.layers} devices=8 layout={layout}: "
            f"{mib(case['memory_per_device']['total'])} MiB/device, {case['median_s']:.3f} s",
            flush=True,
        )
    for c in cases:
        del c["_result"]
    results = {
        "command": " ".join(["python", "benchmarks/sharding.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git": revision,
        "config": dataclasses.asdict(cfg),
        "load_average_at_start": load_at_start,
        "cases": cases,
        "total_s": time.perf_counter() - started,
        "machine": machine(),
    }
    write(out, cfg, results)


if __name__ == "__main__":
    main()
