"""Benchmark: streaming merges of ~1 GB safetensors checkpoints, against reading them and mergekit.

Generates, in a scratch directory (not committed), a base and three fine-tuned
float32 safetensors checkpoints with Llama-like names and shapes (vocabulary
32000, hidden 1024, MLP 4096 with gate/up/down projections, 11 layers, untied
embedding and head: 250 M parameters, 1.0 GB each; the largest leaves are the
32000×1024 embedding and head, 131 MB). Fine-tuned = base + N(0, 0.01²).

Then times, each run a separate process under ``/usr/bin/time -v`` (wall time
and peak resident memory) after two warm-up reads of the files so the page
cache is warm:

- reading the four files: ``dd`` (16 MB blocks, every byte copied into
  user memory: the read time the targets refer to), ``cat`` to /dev/null (for
  reference: it may splice without copying), ``sha256sum`` of the inputs, and
  every tensor through the safetensors library (``safe_open``, ``pread``);
  starting Python and importing ``mats_jax`` (and with it JAX), which every
  ``mats-jax`` command pays;
- the physical floor of task arithmetic: a short numpy script, no JAX, that
  memory-maps the four inputs (the safetensors header parsed by hand) and
  computes each tensor in blocks straight into a memory-mapped output file
  laid out as safetensors (``FLOOR``; its output is checked against
  ``mats-jax``'s);
- ``mats-jax merge`` (the command line, ``-q``) with task arithmetic
  (weights 0.3 each; also with ``--no-checksums``), TIES with whole-model
  trimming and TIES trimmed per tensor (density 0.25, weights 1, scale 1);
  SLERP between the base and the first fine-tuned model (t = 0.4), and Model
  Stock of the three fine-tuned models about the base;
- ``mergekit-pytorch`` from its own virtual environment (torch CPU) with the
  same task arithmetic, TIES (per tensor, its only kind), SLERP and Model
  Stock, ``normalize`` as needed to compute the same quantity.

Every run is repeated ``--repeats`` times (default 3), alternating between
them (A B C … A B C …) so that load from other jobs on a shared machine falls
on each alike; the report gives the median, minimum and maximum wall time, the
median's ratio to the median ``dd`` read and to mergekit's median for the same
method, and the largest peak memory over the repeats.

It then compares the outputs tensor by tensor (mats-jax against mergekit for
task arithmetic, SLERP, Model Stock and TIES per tensor, classifying any TIES entries that
differ), and checks each merge's peak memory against the target (4 × largest
leaf + 1 GB).

Run from the repository root, from a committed tree (see ``provenance.py``),
with mergekit installed in its own virtual environment (needs ~16 GB of free
disk in the scratch directory):

    .venv/bin/python benchmarks/io_merge.py --mergekit VENV [--scratch DIR] [--repeats 3]
    .venv/bin/python benchmarks/io_merge.py --quick [--mergekit VENV]   # smoke run, ~20 MB files

``--mergekit`` defaults to ``$MERGEKIT_VENV``; the recorded run needs it, a
smoke run skips mergekit without it. Results go to
``benchmarks/results/io_merge.{md,json}`` (``--quick``: under the temporary
directory; ``--out PREFIX`` anywhere); ``--render`` rewrites the markdown
from the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from provenance import (
    QUICK_RESULTS,
    RESULTS,
    add_output_options,
    check_destination,
    render_only,
    write_results,
)

DENSITY, TA_WEIGHT, SLERP_T = 0.25, 0.3, 0.4


@dataclasses.dataclass(frozen=True)
class Dims:
    """The generated checkpoints' sizes."""

    vocab: int = 32000
    hidden: int = 1024
    mlp: int = 4096
    layers: int = 11


QUICK = Dims(vocab=4096, hidden=256, mlp=1024, layers=2)


def shapes(dims: Dims) -> dict[str, tuple[int, ...]]:
    """Llama-like tensor names and (out, in) shapes."""
    h = dims.hidden
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (dims.vocab, h)}
    for i in range(dims.layers):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{p}.self_attn.{name}.weight"] = (h, h)
        out[f"{p}.mlp.gate_proj.weight"] = (dims.mlp, h)
        out[f"{p}.mlp.up_proj.weight"] = (dims.mlp, h)
        out[f"{p}.mlp.down_proj.weight"] = (h, dims.mlp)
        out[f"{p}.input_layernorm.weight"] = (h,)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (dims.vocab, h)
    return out


def generate(scratch: Path, dims: Dims) -> list[Path]:
    from safetensors.numpy import save_file

    files = [scratch / f"{n}.safetensors" for n in ("base", "ft0", "ft1", "ft2")]
    stamp = scratch / "dims.json"
    wanted = json.dumps(dataclasses.asdict(dims))
    if (
        all(f.exists() for f in files)
        and stamp.exists()
        and stamp.read_text() == wanted
    ):
        return files
    rng = np.random.default_rng(0)
    base = {}
    for name, shape in shapes(dims).items():
        if len(shape) == 1:
            base[name] = np.ones(shape, np.float32)
        else:
            base[name] = rng.standard_normal(shape, np.float32) * np.float32(
                shape[-1] ** -0.5
            )
    save_file(base, str(files[0]))
    for f in files[1:]:
        tuned = {
            n: x + np.float32(0.01) * rng.standard_normal(x.shape, np.float32)
            for n, x in base.items()
        }
        save_file(tuned, str(f))
        del tuned
    stamp.write_text(wanted)
    return files


def scratch_inputs(root: Path, quick: bool) -> tuple[Dims, Path, Path, list[Path]]:
    """The sizes, the scratch folder under ``root``, its logs folder and the
    four checkpoints (generated there unless present)."""
    dims = QUICK if quick else Dims()
    scratch = root / ("quick" if quick else "full")
    logs = scratch / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return dims, scratch, logs, generate(scratch, dims)


def warm_page_cache(paths: list[Path]) -> None:
    """Reads ``paths`` twice, so that every timed run finds them in the page cache."""
    for _ in range(2):
        subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)


def timed(
    cmd: list[str], log: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Runs ``cmd`` under /usr/bin/time -v; wall seconds, peak RSS and load averages."""
    load_before = os.getloadavg()
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(
            ["/usr/bin/time", "-v", *cmd], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    wall = time.perf_counter() - start
    text = log.read_text()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    elapsed = re.search(
        r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text
    )
    return {
        "command": " ".join(cmd),
        "returncode": proc.returncode,
        "wall_s": wall,
        "time_v_elapsed": elapsed.group(1) if elapsed else None,
        "peak_rss_mb": int(rss.group(1)) / 1024 if rss else None,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "log": str(log),
    }


# Every tensor of the files read as mats-jax reads them (recorded as "READER").
READER = """
import sys
from safetensors import safe_open
n = 0
for f in sys.argv[1:]:
    with safe_open(f, framework="numpy", backend="pread") as h:
        for k in h.keys():
            n += h.get_tensor(k).nbytes
print(n)
"""


# The physical floor of task arithmetic (recorded as "FLOOR"): no JAX, no
# checks, no copies: inputs memory-mapped, each output tensor computed in
# blocks into a memory-mapped output file with the base's safetensors header
# (the four generated files share one header).
FLOOR = """
import json, os, struct, sys
import numpy as np
weight, out, files = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
def header(f):
    with open(f, "rb") as h:
        (n,) = struct.unpack("<Q", h.read(8))
        return n, json.loads(h.read(n))
n, head = header(files[0])
assert all(header(f) == (n, head) for f in files[1:])
maps = [np.memmap(f, np.uint8, "r") for f in files]
os.makedirs(out, exist_ok=True)
target = os.path.join(out, "model.safetensors")
with open(target, "wb") as f:
    f.truncate(maps[0].size)
dst = np.memmap(target, np.uint8, "r+")
dst[: 8 + n] = maps[0][: 8 + n]
block = 1 << 22
for name, info in head.items():
    if name == "__metadata__":
        continue
    assert info["dtype"] == "F32"
    s, e = (8 + n + o for o in info["data_offsets"])
    base, *tuned = (m[s:e].view(np.float32) for m in maps)
    d = dst[s:e].view(np.float32)
    for i in range(0, d.size, block):
        j = i + block
        acc = tuned[0][i:j] - base[i:j]
        for x in tuned[1:]:
            acc += x[i:j]
            acc -= base[i:j]
        acc *= weight
        acc += base[i:j]
        d[i:j] = acc
dst.flush()
"""


def recipe(scratch: Path, files: list[Path], method: str, trim: str | None) -> Path:
    lines = [f"base: {files[0]}", "models:"]
    weight = TA_WEIGHT if method == "task_arithmetic" else 1.0
    # SLERP interpolates two models: the base (t = 0) and the first fine-tuned.
    models = files[:2] if method == "slerp" else files[1:]
    lines += [f"  - {{path: {f}, weight: {weight}}}" for f in models]
    lines.append(f"method: {method}")
    if method == "ties":
        lines.append(f"parameters: {{density: {DENSITY}, trim: {trim}}}")
    if method == "slerp":
        lines.append(f"parameters: {{t: {SLERP_T}}}")
    if method == "model_stock":  # mergekit's unclipped ratio: the same merge
        lines.append("parameters: {clip_cosine: false}")
    lines.append("output: {format: safetensors, max_shard_size: 2GB}")
    path = scratch / f"recipe_{method}_{trim or 'x'}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def mergekit_config(scratch: Path, files: list[Path], method: str) -> Path:
    weight = TA_WEIGHT if method == "task_arithmetic" else 1.0
    lines = [
        f"merge_method: {method}",
        f"base_model: {files[0]}",
        "dtype: float32",
        "models:",
    ]
    if method in ("slerp", "model_stock"):
        lines += [
            f"  - model: {f}" for f in (files[:2] if method == "slerp" else files[1:])
        ]
        lines.append(
            f"parameters: {{t: {SLERP_T}}}"
            if method == "slerp"
            else "parameters: {filter_wise: false}"
        )
        path = scratch / f"mergekit_{method}.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path
    for f in files[1:]:
        params = f"weight: {weight}" + (
            f", density: {DENSITY}" if method == "ties" else ""
        )
        lines += [f"  - model: {f}", f"    parameters: {{{params}}}"]
    # Task arithmetic adds the weighted task vectors (no normalisation); TIES
    # divides by the weights of the agreeing tasks (the disjoint mean).
    lines.append(
        f"parameters: {{normalize: {'true' if method == 'ties' else 'false'}}}"
    )
    path = scratch / f"mergekit_{method}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def compare(
    ours: Path, theirs: Path, files: list[Path] | None = None
) -> dict[str, Any]:
    """Max abs difference and count of entries differing by more than float32 tolerance.

    With ``files`` (TIES), each differing entry is classified: a task-vector
    entry tied with that model's k-th largest magnitude (mats_jax keeps every
    tied entry, mergekit exactly k in argsort order), or an elected-sign sum
    of exactly zero (mats_jax: no task agrees, the base is kept; mergekit:
    the positive sign wins).
    """
    from mats_jax.io import open_checkpoint

    a, b = open_checkpoint(ours), open_checkpoint(theirs)
    why = {"tie_at_kth_magnitude": 0, "zero_sign_sum": 0, "unexplained": 0}
    names_a, names_b = set(a.leaves), set(b.leaves)
    worst, mismatched, total = 0.0, 0, 0
    for name in sorted(names_a & names_b):
        x, y = a.read(name), b.read(name)
        if x.shape != y.shape:
            return {"error": f"shape of {name}: {x.shape} vs {y.shape}"}
        d = np.abs(x.astype(np.float64) - y.astype(np.float64))
        worst = max(worst, float(d.max()))
        tol = 1e-6 + 1e-5 * np.abs(y.astype(np.float64))
        bad = np.nonzero((d > tol).ravel())[0]
        mismatched += bad.size
        total += d.size
        if bad.size and files is not None:
            base = open_checkpoint(files[0]).read(name).ravel()
            k = int(DENSITY * base.size)
            kept, at_threshold = [], []
            for f in files[1:]:
                tau = open_checkpoint(f).read(name).ravel() - base
                t = np.partition(np.abs(tau), base.size - k)[base.size - k]
                kept.append(np.where(np.abs(tau[bad]) >= t, tau[bad], 0))
                at_threshold.append(np.abs(tau[bad]) == t)
            tie = np.any(at_threshold, axis=0)
            nonzero = np.any(np.asarray(kept) != 0, axis=0)
            zero = ~tie & (np.sum(kept, axis=0) == 0) & nonzero
            why["tie_at_kth_magnitude"] += int(tie.sum())
            why["zero_sign_sum"] += int(zero.sum())
            why["unexplained"] += int((~tie & ~zero).sum())
    return {
        "leaves_compared": len(names_a & names_b),
        "only_ours": sorted(names_a - names_b),
        "only_mergekit": sorted(names_b - names_a),
        "max_abs_diff": worst,
        "entries_beyond_tolerance": mismatched,
        "entries": total,
        **({"differing_entries_by_cause": why} if files is not None else {}),
    }


@dataclasses.dataclass(frozen=True)
class Run:
    """One timed command; ``output`` is removed before each repetition."""

    key: str
    command: list[str]
    output: Path | None = None
    venv: Path | None = None  # mergekit's, left out of the recorded command


def read_runs(scratch: Path, files: list[Path]) -> list[Run]:
    names = list(map(str, files))
    # The read baseline: dd copies every byte into its own buffer (cat to
    # /dev/null can splice without copying: shown for reference).
    dd = " && ".join(f"dd if={f} of=/dev/null bs=16M status=none" for f in names)
    return [
        Run("read_dd", ["sh", "-c", dd]),
        Run("read_cat", ["sh", "-c", "cat " + " ".join(names) + " > /dev/null"]),
        Run("sha256_inputs", ["sha256sum", *names]),
        Run("read_safetensors", [sys.executable, "-c", READER, *names]),
        Run("import_mats_jax", [sys.executable, "-c", "import mats_jax"]),
        Run(
            "floor_task_arithmetic",
            [
                sys.executable,
                "-c",
                FLOOR,
                str(TA_WEIGHT),
                str(scratch / "out_floor"),
                *names,
            ],
            scratch / "out_floor",
        ),
    ]


def mats_runs(scratch: Path, files: list[Path]) -> list[Run]:
    binary = str(Path(sys.executable).parent / "mats-jax")
    runs = []
    for method, trim, extra in (
        ("task_arithmetic", None, []),
        ("ties", "global", []),
        ("ties", "per_leaf", []),
        # The model card's checksums hash the inputs beside the merge; the same
        # merge without them shows what the hashing costs.
        ("task_arithmetic", None, ["--no-checksums"]),
        ("slerp", None, []),
        ("model_stock", None, []),
    ):
        key = f"mats_jax_{method}" + (f"_{trim}" if trim else "")
        key += "_no_checksums" if extra else ""
        out = scratch / f"out_{key}"
        config = str(recipe(scratch, files, method, trim))
        runs.append(
            Run(key, [binary, "merge", config, "-o", str(out), "-q", *extra], out)
        )
    return runs


def mergekit_runs(scratch: Path, files: list[Path], venv: Path) -> list[Run]:
    binary = str(venv / "bin" / "mergekit-pytorch")
    runs = []
    for method in ("task_arithmetic", "ties", "slerp", "model_stock"):
        key, out = f"mergekit_{method}", scratch / f"out_mergekit_{method}"
        config = str(mergekit_config(scratch, files, method))
        runs.append(Run(key, [binary, config, str(out), "--quiet"], out, venv))
    return runs


def shown(command: list[str], venv: Path | None = None) -> str:
    """A command as recorded: no interpreter or virtual-environment paths.

    They name folders of the machine that ran it, not anything to reproduce.
    """
    here = str(Path(sys.executable).parent) + "/"
    named = {READER: "READER", FLOOR: "FLOOR"}
    words = [named.get(word, word.replace(here, "")) for word in command]
    text = " ".join(words)
    if venv is not None:
        text = text.replace(str(venv).rstrip("/"), "$MERGEKIT_VENV")
    return text


def alternating(
    runs: list[Run],
    repeats: int,
    logs: Path,
    warm: Callable[[], None],
    env: dict[str, str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every run ``repeats`` times, in rounds (A B C, A B C, …), each after a warm-up read."""
    out: dict[str, list[dict[str, Any]]] = {r.key: [] for r in runs}
    for i in range(repeats):
        for run in runs:
            if run.output is not None:
                shutil.rmtree(run.output, ignore_errors=True)
            warm()
            result = timed(run.command, logs / f"{run.key}_{i}.log", env)
            result["command"] = shown(run.command, run.venv)
            out[run.key].append(result)
            print(f"  round {i}: {run.key}: {result['wall_s']:.2f} s", flush=True)
    return out


def summarise_runs(timings: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median, minimum and maximum wall time and the largest peak memory per run."""
    out = {}
    for key, reps in timings.items():
        walls = [r["wall_s"] for r in reps]
        peaks = [r["peak_rss_mb"] for r in reps if r["peak_rss_mb"] is not None]
        out[key] = {
            "repeats": len(reps),
            "wall_s": walls,
            "median_s": float(np.median(walls)),
            "min_s": min(walls),
            "max_s": max(walls),
            "peak_rss_mb": max(peaks) if peaks else None,
            "returncodes": [r["returncode"] for r in reps],
            "load_before_first": reps[0]["load_before"],
            "load_after_last": reps[-1]["load_after"],
        }
    return out


# mats-jax runs and the mergekit run that computes the same merge.
MERGEKIT_PEER = {
    "mats_jax_task_arithmetic": "mergekit_task_arithmetic",
    "mats_jax_task_arithmetic_no_checksums": "mergekit_task_arithmetic",
    "mats_jax_ties_per_leaf": "mergekit_ties",
    "mats_jax_slerp": "mergekit_slerp",
    "mats_jax_model_stock": "mergekit_model_stock",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/mats_io_bench"))
    parser.add_argument(
        "--mergekit",
        type=Path,
        default=os.environ.get("MERGEKIT_VENV"),
        help="virtual environment with mergekit (default: $MERGEKIT_VENV)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command")
    parser.add_argument(
        "--quick", action="store_true", help="small checkpoints (~20 MB): a smoke run"
    )
    add_output_options(parser)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    out = args.out or (
        QUICK_RESULTS / "io_merge_quick" if args.quick else RESULTS / "io_merge"
    )
    if render_only(out, args.render, markdown):
        return
    revision = check_destination(out, args.allow_dirty)
    mergekit = args.mergekit
    if mergekit is not None and not (mergekit / "bin" / "mergekit-pytorch").exists():
        raise SystemExit(f"no mergekit-pytorch in {mergekit}")
    if mergekit is None and not args.quick:
        raise SystemExit(
            "the benchmark compares against mergekit: pass --mergekit VENV (or set "
            "MERGEKIT_VENV), a virtual environment with mergekit and a CPU torch"
        )
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    dims, scratch, logs, files = scratch_inputs(args.scratch, args.quick)
    runs = read_runs(scratch, files) + mats_runs(scratch, files)
    if mergekit is not None:
        runs += mergekit_runs(scratch, files, mergekit)
    timings = alternating(runs, args.repeats, logs, lambda: warm_page_cache(files))
    outputs = {r.key: r.output for r in runs if r.output is not None}
    comparisons = {
        "floor_task_arithmetic": compare(
            outputs["mats_jax_task_arithmetic"], outputs["floor_task_arithmetic"]
        )
    }
    if mergekit is not None:
        comparisons["task_arithmetic"] = compare(
            outputs["mats_jax_task_arithmetic"], outputs["mergekit_task_arithmetic"]
        )
        comparisons["ties_per_tensor"] = compare(
            outputs["mats_jax_ties_per_leaf"], outputs["mergekit_ties"], files
        )
        for method in ("slerp", "model_stock"):
            comparisons[method] = compare(
                outputs[f"mats_jax_{method}"], outputs[f"mergekit_{method}"]
            )
    result = {
        "command": shown(["python", "benchmarks/io_merge.py", *sys.argv[1:]], mergekit),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "git": revision,
        "machine": _machine(),
        "cpu_count": os.cpu_count(),
        "versions": _versions(mergekit),
        "dims": dataclasses.asdict(dims),
        "quick": args.quick,
        "file_bytes": {f.name: f.stat().st_size for f in files},
        "largest_leaf_bytes": max(int(np.prod(s)) * 4 for s in shapes(dims).values()),
        "repeats": args.repeats,
        "timings": timings,
        "runs": summarise_runs(timings),
        "comparisons": comparisons,
        "load_start": load_start,
        "load_end": os.getloadavg(),
        "total_s": time.perf_counter() - t0,
    }
    write_results(out, result, markdown)


def _machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()}-core {model}, {mem:.0f} GiB RAM, {platform.platform()}"


def _versions(mergekit_venv: Path | None) -> dict[str, str]:
    import jax
    import safetensors

    import mats_jax

    out = {
        "python": platform.python_version(),
        "mats_jax": mats_jax.__version__,
        "jax": jax.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }
    pip = None if mergekit_venv is None else mergekit_venv / "bin" / "pip"
    if pip is not None and pip.exists():
        listing = subprocess.run(
            [str(pip), "list"], capture_output=True, text=True
        ).stdout
        for pkg in ("mergekit", "torch"):
            m = re.search(rf"^{pkg}\s+(\S+)", listing, re.MULTILINE)
            if m:
                out[pkg] = m.group(1)
    return out


def _loads(values: list[float]) -> str:
    return "/".join(f"{x:.1f}" for x in values)


def _failed(run: dict[str, Any]) -> str:
    bad = [c for c in run["returncodes"] if c != 0]
    return f" **exit {', '.join(map(str, bad))}**" if bad else ""


def _floor(runs: dict[str, Any]) -> float | None:
    """The floor run's median (None in results recorded before it existed)."""
    floor = runs.get("floor_task_arithmetic")
    return None if floor is None else floor["median_s"]


def results_table(r: dict[str, Any]) -> list[str]:
    runs = r["runs"]
    read, floor = runs["read_dd"]["median_s"], _floor(runs)
    lines = [
        "| run | wall s: median (min–max) | all runs s | × read (dd), medians "
        "| × floor, medians | × mergekit (same merge), medians | peak RSS MiB (max) "
        "| load before first → after last |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for key, run in runs.items():
        peer = runs.get(MERGEKIT_PEER.get(key, ""))
        lines.append(
            f"| {key} | {run['median_s']:.2f} ({run['min_s']:.2f}–{run['max_s']:.2f}) | "
            + " / ".join(f"{w:.2f}" for w in run["wall_s"])
            + f" | {run['median_s'] / read:.2f} | "
            + ("" if floor is None else f"{run['median_s'] / floor:.2f}")
            + " | "
            + ("" if peer is None else f"{run['median_s'] / peer['median_s']:.3f}")
            + f" | {run['peak_rss_mb']:.0f} | {run['load_before_first'][0]:.1f} → "
            f"{run['load_after_last'][0]:.1f} |{_failed(run)}"
        )
    return lines


# The time targets, as multiples of the floor: TIES reads its inputs more than
# once (its thresholds), the rest once.
FLOOR_TARGET = {"mats_jax_ties_global": 3.0, "mats_jax_ties_per_leaf": 3.0}


def target_lines(r: dict[str, Any]) -> list[str]:
    runs = r["runs"]
    read, floor = runs["read_dd"]["median_s"], _floor(runs)
    target_mem = (4 * r["largest_leaf_bytes"] + 2**30) / 2**20
    lines = []
    for key, run in runs.items():
        if not key.startswith("mats_jax"):
            continue
        mem_ok = run["peak_rss_mb"] <= target_mem
        if floor is None:  # recorded before the floor: against dd, as then
            ratio, limit, against = run["median_s"] / read, 2.0, "the median read time"
        else:
            ratio, limit = run["median_s"] / floor, FLOOR_TARGET.get(key, 2.0)
            against = f"the floor's median ({run['median_s'] / read:.1f}× dd)"
        lines.append(
            f"- {key}: median time {ratio:.2f}× {against} (target ≤ {limit:g}×: "
            f"**{'met' if ratio <= limit else 'not met'}**); peak {run['peak_rss_mb']:.0f} MiB "
            f"(largest over {run['repeats']} runs) against 4 × largest leaf + 1 GiB = "
            f"{target_mem:.0f} MiB (**{'met' if mem_ok else 'not met'}**)"
        )
    for ours, theirs in MERGEKIT_PEER.items():
        if ours in runs and theirs in runs:
            a, b = runs[ours], runs[theirs]
            ratio = a["median_s"] / b["median_s"]
            lines.append(
                f"- {ours} against {theirs}: {ratio:.2f}× its median time ("
                + (f"{1 / ratio:.1f}× faster" if ratio < 1 else f"{ratio:.1f}× slower")
                + f"), peak memory {a['peak_rss_mb']:.0f} MiB against "
                f"{b['peak_rss_mb']:.0f} MiB."
            )
    return lines


def comparison_lines(r: dict[str, Any]) -> list[str]:
    if not r["comparisons"]:
        return ["", "## Same tensors as mergekit", "", "mergekit was not run."]
    lines = [
        "",
        "## Same tensors as mergekit (and as the floor)",
        "",
        "Each row compares mats-jax's output with the other's, leaf by leaf "
        "(`floor_task_arithmetic`: mats-jax's task arithmetic against the numpy floor's).",
        "",
        "| merge | leaves | max abs diff | entries beyond 1e-6 + 1e-5·\\|x\\| | of entries |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, c in r["comparisons"].items():
        if "error" in c:
            lines.append(f"| {name} | {c['error']} | | | |")
            continue
        lines.append(
            f"| {name} | {c['leaves_compared']} | {c['max_abs_diff']:.3g} | "
            f"{c['entries_beyond_tolerance']} | {c['entries']} |"
        )
    for name, c in r["comparisons"].items():
        if "differing_entries_by_cause" in c:
            causes = ", ".join(
                f"{k}: {v}" for k, v in c["differing_entries_by_cause"].items()
            )
            lines += ["", f"{name}: differing entries by cause: {causes}."]
    return lines


def markdown(r: dict[str, Any]) -> str:
    total_gb = sum(r["file_bytes"].values()) / 1e9
    dims = r["dims"]
    lines = [
        "# Benchmark: streaming merges of safetensors checkpoints (`benchmarks/io_merge.py`)",
        "",
        f"- Command: `{r['command']}` (from the repository root)",
        f"- Date: {r['date']}; git {r['git']}",
        f"- Machine: {r['machine']}; no accelerator",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        f"- Load average (1/5/15 min) at start {_loads(r['load_start'])}, at end "
        f"{_loads(r['load_end'])}, on {r['cpu_count']} cores",
        f"- Inputs: base + 3 fine-tuned, float32 safetensors, {total_gb:.2f} GB in all "
        f"({dims['layers']} layers, hidden {dims['hidden']}, vocabulary {dims['vocab']}; "
        f"largest leaf {r['largest_leaf_bytes'] / 1e6:.0f} MB); total run {r['total_s']:.0f} s",
        *(
            [
                "- **--quick smoke run: small checkpoints; the numbers are not meaningful.**"
            ]
            if r["quick"]
            else []
        ),
        "",
        "## Results",
        "",
        f"Each command ran {r['repeats']} times, alternating between commands (one round "
        "runs each once, in the order of the table), each run one process under "
        "`/usr/bin/time -v` after two warm-up reads of the four files.",
        "",
        *results_table(r),
        "",
        "## Targets",
        "",
        *target_lines(r),
        *comparison_lines(r),
        "",
        "## Notes",
        "",
        *notes(r),
        "",
    ]
    return "\n".join(lines)


def notes(r: dict[str, Any]) -> list[str]:
    """What the numbers mean, written from the measurements (medians)."""
    runs = r["runs"]
    wall = {k: v["median_s"] for k, v in runs.items()}
    out = [
        f"- The read baseline: `dd` copied the four files ({sum(r['file_bytes'].values()) / 1e9:.2f} GB) "
        f"into one reused 16 MB buffer in {wall['read_dd']:.2f} s. Reading every tensor "
        "through safetensors' API (`safe_open`, `get_tensor`) into new numpy arrays in "
        f"one Python process took {wall['read_safetensors']:.2f} s, "
        f"{wall['read_safetensors'] / wall['read_dd']:.1f}× dd.",
        *(
            [
                f"- The floor: numpy alone, inputs and output memory-mapped, took "
                f"{wall['floor_task_arithmetic']:.2f} s for task arithmetic "
                f"({wall['floor_task_arithmetic'] / wall['read_dd']:.1f}× dd: it also "
                f"computes and writes {max(r['file_bytes'].values()) / 1e9:.2f} GB; its peak RSS "
                "counts the mapped files' pages). Starting Python and importing mats_jax "
                f"(JAX with it) took {wall['import_mats_jax']:.2f} s, "
                f"{wall['import_mats_jax'] / wall['floor_task_arithmetic']:.2f}× the "
                "floor: a bound below every mats-jax command's time that no change to "
                "the merge can lift."
            ]
            if "floor_task_arithmetic" in wall
            else []
        ),
        f"- The model card's sha256 of every input: `sha256sum` alone took "
        f"{wall['sha256_inputs']:.2f} s on the four files; mats-jax hashes in a thread beside "
        f"the merge, and task arithmetic took {wall['mats_jax_task_arithmetic']:.2f} s with "
        f"checksums and {wall['mats_jax_task_arithmetic_no_checksums']:.2f} s without "
        "(`--no-checksums`).",
        "- Every mats-jax run includes starting Python and importing JAX, orbax and flax, "
        "and loading each leaf shape's compiled merge from the persistent compilation "
        "cache the command line keeps (`MATS_JAX_COMPILATION_CACHE`; compiled once, by "
        "the first run).",
        "- TIES with whole-model trimming reads the inputs twice, plus a 3% sample: one "
        "pass that selects each model's exact threshold within the sample's bracket, "
        "then the merge; "
        f"it took {wall['mats_jax_ties_global']:.2f} s against "
        f"{wall['mats_jax_ties_per_leaf']:.2f} s per tensor.",
    ]
    if "mats_jax_slerp" in wall:
        out.append(
            f"- SLERP reads two of the four files (the base and one model) and took "
            f"{wall['mats_jax_slerp']:.2f} s; Model Stock reads all four and took "
            f"{wall['mats_jax_model_stock']:.2f} s, against task arithmetic's "
            f"{wall['mats_jax_task_arithmetic']:.2f} s."
        )
    ties = r["comparisons"].get("ties_per_tensor", {})
    if "differing_entries_by_cause" in ties:
        c = ties["differing_entries_by_cause"]
        out.append(
            f"- TIES per tensor against mergekit: {ties['entries_beyond_tolerance']} of "
            f"{ties['entries']} entries differ beyond float32 tolerance: "
            f"{c['tie_at_kth_magnitude']} where a task-vector entry equals that model's k-th "
            "largest magnitude (mats-jax keeps every entry tied with the threshold, mergekit keeps "
            f"exactly k in argsort order), {c['zero_sign_sum']} where the trimmed task vectors "
            "sum to exactly zero (mats-jax: no sign is elected and the base is kept; mergekit: "
            f"the positive sign wins), {c['unexplained']} otherwise."
        )
    spread = {k: v["max_s"] / v["min_s"] for k, v in runs.items() if v["min_s"] > 0}
    widest = max(spread, key=spread.__getitem__)
    out.append(
        f"- Spread over the {r['repeats']} runs (slowest / fastest): widest for {widest} "
        f"({spread[widest]:.2f}×); the load averages above show how busy the machine was."
    )
    return out


if __name__ == "__main__":
    main()
