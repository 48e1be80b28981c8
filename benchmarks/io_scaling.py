"""Benchmark: how a streamed merge's time grows with the model's size and the number of models.

The inputs are the IO benchmark's (``io_merge.py``: float32 safetensors
checkpoints with Llama names and shapes, fine-tuned = base + N(0, 0.01²)) at
three sizes per model and three model counts:

- size: about 0.25 GB (hidden 512, MLP 2048, 7 layers), 1.0 GB (the IO
  benchmark's own: hidden 1024, MLP 4096, 11 layers) and 4.0 GB (hidden 2048,
  MLP 8192, 13 layers) per model, vocabulary 32000, a base and 3 fine-tuned
  models;
- count: 2, 4 and 8 fine-tuned models of 1.0 GB and a base (the 1.0 GB set's
  base and first three fine-tuned models, and more drawn alike).

For each set, in rounds (A B C … A B C …), each run a separate process under
``/usr/bin/time -v`` after two warm-up reads of its inputs:

- ``dd`` of the inputs (every byte read into user memory: the read time);
- starting Python and importing ``mats_jax`` (a fixed cost of every
  ``mats-jax`` command);
- the physical floor of task arithmetic (``io_merge.FLOOR``: numpy alone, the
  inputs and the output memory-mapped);
- ``mats-jax merge -q`` with task arithmetic (weights 0.3), with the model
  card's checksums (sha256, and ``--checksum blake3``) and without
  (``--no-checksums``), its programs found in
  this benchmark's own compilation cache (filled by an untimed merge of the
  same set first);
- mergekit's task arithmetic (``mergekit-pytorch``) when its virtual
  environment is given;
- each digest alone: the set's files hashed in one process, one after
  another, as the merge's checksum thread does.

The report gives, per set, each run's median against ``dd`` and against the
floor: the fixed costs (starting Python, importing JAX, compiling) weigh less
as the model grows, so the ratios should fall with size, and the read time
should grow in proportion to the inputs.

Run from the repository root, from a committed tree (see ``provenance.py``);
needs ~30 GB of free disk in the scratch directory (each set's inputs are
removed after it is measured, but for the 1.0 GB set, which the IO benchmarks
share):

    .venv/bin/python benchmarks/io_scaling.py [--mergekit VENV] [--repeats 3]
    .venv/bin/python benchmarks/io_scaling.py --quick   # smoke run, small files
    .venv/bin/python benchmarks/io_scaling.py --sets "1 GB" "8 models"  # some sets

Results go to ``benchmarks/results/io_scaling.{md,json}`` (``--quick``: under
the temporary directory; ``--out PREFIX`` anywhere); ``--render`` rewrites the
markdown from the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from io_merge import (
    FLOOR,
    QUICK,
    TA_WEIGHT,
    Dims,
    Run,
    alternating,
    generate,
    mergekit_config,
    recipe,
    scratch_inputs,
    shapes,
    shown,
    summarise_runs,
    warm_page_cache,
)
from provenance import (
    QUICK_RESULTS,
    RESULTS,
    add_output_options,
    check_destination,
    machine,
    render_only,
    write_results,
)

SIZES = {
    "0.25 GB": Dims(vocab=32000, hidden=512, mlp=2048, layers=7),
    "1 GB": Dims(),
    "4 GB": Dims(vocab=32000, hidden=2048, mlp=8192, layers=13),
}
"""Per-model sizes of the size series (base + 3 fine-tuned models each)."""

COUNTS = (2, 4, 8)
"""Fine-tuned models of the count series (1 GB each, and a base)."""

CHECKSUMS = ("sha256", "blake3")
"""The model card's digests, each timed alone and inside a merge."""

HASH = """
import hashlib, sys
new = hashlib.sha256 if sys.argv[1] == "sha256" else __import__("blake3").blake3
for path in sys.argv[2:]:
    digest = new()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
"""
"""Hashes the files ``argv[2:]`` with digest ``argv[1]``, one after another, in
16 MiB reads as ``mats_jax.io.checkpoint.file_digest`` does (without
importing JAX, whose start-up is not the digest's)."""

QUICK_SIZES = {
    "small": Dims(vocab=2048, hidden=128, mlp=512, layers=2),
    "quick": QUICK,
}


@dataclasses.dataclass(frozen=True)
class InputSet:
    """One set of checkpoints: the base first, then the fine-tuned models."""

    name: str
    series: str  # "size" or "count"
    dims: Dims
    files: list[Path]
    scratch: Path
    removable: bool  # its files are this benchmark's alone

    @property
    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def more_tuned(scratch: Path, files: list[Path], count: int) -> list[Path]:
    """The base and ``count`` fine-tuned models: ``files`` (a base and three)
    and further ones drawn alike (base + N(0, 0.01²), seeded per model)."""
    from safetensors.numpy import load_file, save_file

    out = list(files[: count + 1])
    base = None
    for i in range(len(files) - 1, count):
        path = scratch / f"ft{i}.safetensors"
        if not path.exists():
            base = base if base is not None else load_file(str(files[0]))
            rng = np.random.default_rng((0, i))
            tmp = path.with_suffix(".partial")
            save_file(
                {
                    n: x + np.float32(0.01) * rng.standard_normal(x.shape, np.float32)
                    for n, x in base.items()
                },
                str(tmp),
            )
            tmp.rename(path)
        out.append(path)
    return out


def input_sets(root: Path, quick: bool) -> list[InputSet]:
    """Every set, generated under ``root`` when absent; the 1 GB set (and its
    count series) is the IO benchmark's own scratch folder."""
    sets = []
    sizes = QUICK_SIZES if quick else SIZES
    shared_dims, shared, _, shared_files = scratch_inputs(root, quick)
    for name, dims in sizes.items():
        if dims == shared_dims:
            sets.append(InputSet(name, "size", dims, shared_files, shared, False))
            continue
        folder = root / "scaling" / name.replace(" ", "")
        folder.mkdir(parents=True, exist_ok=True)
        sets.append(InputSet(name, "size", dims, [], folder, True))
    for count in (2, 4) if quick else COUNTS:
        sets.append(
            InputSet(f"{count} models", "count", shared_dims, [], shared, False)
        )
    return sets


def prepared(s: InputSet) -> InputSet:
    """``s`` with its files generated (the size series' own folders)."""
    if s.series == "size":
        files = s.files or generate(s.scratch, s.dims)
        return dataclasses.replace(s, files=files)
    count = int(s.name.split()[0])
    shared = generate(s.scratch, s.dims)
    return dataclasses.replace(s, files=more_tuned(s.scratch, shared, count))


def runs_of(s: InputSet, mergekit: Path | None) -> list[Run]:
    names = list(map(str, s.files))
    key = s.name.replace(" ", "_").replace(".", "_")
    folder = s.scratch / f"scaling_{key}"
    folder.mkdir(exist_ok=True)
    dd = " && ".join(f"dd if={f} of=/dev/null bs=16M status=none" for f in names)
    binary = str(Path(sys.executable).parent / "mats-jax")
    config = str(recipe(folder, s.files, "task_arithmetic", None))
    runs = [
        Run("read_dd", ["sh", "-c", dd]),
        Run("import_mats_jax", [sys.executable, "-c", "import mats_jax"]),
        Run(
            "floor_task_arithmetic",
            [
                sys.executable,
                "-c",
                FLOOR,
                str(TA_WEIGHT),
                str(folder / "out_floor"),
                *names,
            ],
            folder / "out_floor",
        ),
        Run(
            "mats_jax_task_arithmetic",
            [binary, "merge", config, "-o", str(folder / "out_mats"), "-q"],
            folder / "out_mats",
        ),
        Run(
            "mats_jax_task_arithmetic_no_checksums",
            [
                binary,
                "merge",
                config,
                "-o",
                str(folder / "out_mats_nc"),
                "-q",
                "--no-checksums",
            ],
            folder / "out_mats_nc",
        ),
        Run(
            "mats_jax_task_arithmetic_blake3",
            [
                binary,
                "merge",
                config,
                "-o",
                str(folder / "out_mats_b3"),
                "-q",
                "--checksum",
                "blake3",
            ],
            folder / "out_mats_b3",
        ),
        # The digests alone, one core, as the merge computes them.
        *(
            Run(f"hash_{name}", [sys.executable, "-c", HASH, name, *names])
            for name in CHECKSUMS
        ),
    ]
    if mergekit is not None:
        mk = str(mergekit_config(folder, s.files, "task_arithmetic"))
        runs.append(
            Run(
                "mergekit_task_arithmetic",
                [
                    str(mergekit / "bin" / "mergekit-pytorch"),
                    mk,
                    str(folder / "out_mk"),
                    "--quiet",
                ],
                folder / "out_mk",
                mergekit,
            )
        )
    return runs


def measure(
    s: InputSet, repeats: int, mergekit: Path | None, cache: Path
) -> dict[str, Any]:
    runs = runs_of(s, mergekit)
    env = {**os.environ, "MATS_JAX_COMPILATION_CACHE": str(cache)}
    logs = s.scratch / "logs" / "io_scaling"
    logs.mkdir(parents=True, exist_ok=True)
    outputs = [r.output for r in runs if r.output is not None]

    def warm() -> None:
        # One output on disk at a time: the 4 GB set's would not all fit.
        for out in outputs:
            shutil.rmtree(out, ignore_errors=True)
        warm_page_cache(s.files)

    # Untimed: fills the compilation cache with this set's leaf shapes.
    mats = next(r for r in runs if r.key == "mats_jax_task_arithmetic")
    warm()
    subprocess.run(mats.command, check=True, env=env, stdout=subprocess.DEVNULL)
    print(f"{s.name}: {len(s.files)} files, {s.bytes / 1e9:.2f} GB", flush=True)
    timings = alternating(runs, repeats, logs, warm, env)
    for out in outputs:
        shutil.rmtree(out, ignore_errors=True)
    largest = max(int(np.prod(x)) * 4 for x in shapes(s.dims).values())
    return {
        "name": s.name,
        "series": s.series,
        "dims": dataclasses.asdict(s.dims),
        "models": len(s.files) - 1,
        "input_bytes": s.bytes,
        "model_bytes": s.files[0].stat().st_size,
        "largest_leaf_bytes": largest,
        "timings": timings,
        "runs": summarise_runs(timings),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/mats_io_bench"))
    parser.add_argument(
        "--mergekit",
        type=Path,
        default=os.environ.get("MERGEKIT_VENV"),
        help="virtual environment with mergekit (default: $MERGEKIT_VENV; optional)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command")
    parser.add_argument("--quick", action="store_true", help="small sets: a smoke run")
    parser.add_argument(
        "--sets",
        nargs="+",
        metavar="NAME",
        help="only these sets (e.g. '1 GB' '8 models'; default: all)",
    )
    add_output_options(parser)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    out = args.out or (
        QUICK_RESULTS / "io_scaling_quick" if args.quick else RESULTS / "io_scaling"
    )
    if render_only(out, args.render, markdown):
        return
    revision = check_destination(out, args.allow_dirty)
    mergekit = args.mergekit
    if mergekit is not None and not (mergekit / "bin" / "mergekit-pytorch").exists():
        raise SystemExit(f"no mergekit-pytorch in {mergekit}")
    t0 = time.perf_counter()
    cache = args.scratch / "scaling" / "compilation_cache"
    shutil.rmtree(cache, ignore_errors=True)  # every set compiles once, untimed
    sets = []
    chosen = input_sets(args.scratch, args.quick)
    if args.sets:
        unknown = set(args.sets) - {s.name for s in chosen}
        if unknown:
            raise SystemExit(
                f"no set {sorted(unknown)}: the sets are {[s.name for s in chosen]}"
            )
        chosen = [s for s in chosen if s.name in args.sets]
    for s in chosen:
        s = prepared(s)
        sets.append(measure(s, args.repeats, mergekit, cache))
        if s.removable:
            shutil.rmtree(s.scratch)
    result = {
        "command": shown(
            ["python", "benchmarks/io_scaling.py", *sys.argv[1:]], mergekit
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "git": revision,
        "machine": machine(),
        "mergekit": mergekit is not None,
        "quick": args.quick,
        "repeats": args.repeats,
        "sets": sets,
        "total_s": time.perf_counter() - t0,
    }
    write_results(out, result, markdown)


RUNS = (
    ("read_dd", "dd"),
    ("import_mats_jax", "import"),
    ("floor_task_arithmetic", "floor"),
    ("mats_jax_task_arithmetic", "mats-jax"),
    ("mats_jax_task_arithmetic_no_checksums", "mats-jax, no checksums"),
    ("mats_jax_task_arithmetic_blake3", "mats-jax, blake3"),
    ("mergekit_task_arithmetic", "mergekit"),
    ("hash_sha256", "sha256 alone"),
    ("hash_blake3", "blake3 alone"),
)


def _ratio(runs: dict[str, Any], key: str, over: str) -> str:
    if key not in runs or over not in runs:
        return ""
    return f"{runs[key]['median_s'] / runs[over]['median_s']:.2f}"


def set_rows(sets: list[dict[str, Any]]) -> list[str]:
    keys = [k for k, _ in RUNS if any(k in s["runs"] for s in sets)]
    names = dict(RUNS)
    head = ["set", "models", "read GB"] + [f"{names[k]} s" for k in keys]
    timed = [k for k in keys if k not in ("read_dd", "import_mats_jax")]
    head += [f"{names[k]} × dd" for k in timed]
    head += [f"{names[k]} × floor" for k in timed[1:]]
    head += ["mats-jax peak MiB (largest leaf MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in sets:
        runs = s["runs"]
        cells = [s["name"], str(s["models"]), f"{s['input_bytes'] / 1e9:.2f}"]
        cells += [
            f"{runs[k]['median_s']:.2f} ({runs[k]['min_s']:.2f}–{runs[k]['max_s']:.2f})"
            if k in runs
            else ""
            for k in keys
        ]
        cells += [_ratio(runs, k, "read_dd") for k in timed]
        cells += [_ratio(runs, k, "floor_task_arithmetic") for k in timed[1:]]
        mats = runs["mats_jax_task_arithmetic"]
        cells.append(f"{mats['peak_rss_mb']:.0f} ({s['largest_leaf_bytes'] / 1e6:.0f})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def trend_lines(sets: list[dict[str, Any]]) -> list[str]:
    """Whether the ratios fall as the model grows (the size series), and how
    the time per input byte changes with the count (the count series)."""
    out = []
    for series, what in (("size", "model size"), ("count", "number of models")):
        rows = [s for s in sets if s["series"] == series]
        if len(rows) < 2:
            continue
        ratios = [
            s["runs"]["mats_jax_task_arithmetic"]["median_s"]
            / s["runs"]["read_dd"]["median_s"]
            for s in rows
        ]
        floors = [
            s["runs"]["mats_jax_task_arithmetic"]["median_s"]
            / s["runs"]["floor_task_arithmetic"]["median_s"]
            for s in rows
        ]
        per_gb = [
            s["runs"]["mats_jax_task_arithmetic"]["median_s"] / (s["input_bytes"] / 1e9)
            for s in rows
        ]
        names = " → ".join(s["name"] for s in rows)
        falling = all(b <= a for a, b in itertools.pairwise(ratios))
        out.append(
            f"- By {what} ({names}): mats-jax task arithmetic × dd "
            + " → ".join(f"{r:.1f}" for r in ratios)
            + f" ({'falls' if falling else 'does not fall'} throughout); × floor "
            + " → ".join(f"{r:.2f}" for r in floors)
            + "; seconds per GB read "
            + " → ".join(f"{r:.2f}" for r in per_gb)
            + "."
        )
    return out


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# Benchmark: streamed merge time against model size and model count (`benchmarks/io_scaling.py`)",
        "",
        f"- Command: `{r['command']}` (from the repository root)",
        f"- Date: {r['date']}; git {r['git']}",
        f"- Machine: {m['cpu_count']}-core {m['cpu_model']}, {m['platform']}; "
        f"{m['accelerator'] or 'no accelerator'}",
        f"- Versions: python {m['python']}, jax {m['jax']}, numpy {m['numpy']}, "
        f"mats_jax {m['mats_jax']}",
        f"- Load average at start {'/'.join(f'{x:.1f}' for x in m['load_average_1_5_15min'])}; "
        f"total run {r['total_s']:.0f} s; {r['repeats']} rounds per set",
        "",
        "## Results",
        "",
        "Task arithmetic (weights 0.3) of float32 safetensors checkpoints, a base "
        "and the fine-tuned models; medians (min–max) of separate processes under "
        "`/usr/bin/time -v`, each after two warm-up reads of the set's files, the "
        "runs of a set alternating. `dd` reads every input file once; the floor "
        "is numpy alone on memory-mapped files (`io_merge.py`'s `FLOOR`).",
        "",
        *set_rows(r["sets"]),
        "",
        "## Trends",
        "",
        *trend_lines(r["sets"]),
        "",
        "## Notes",
        "",
        "- Every mats-jax run starts Python and imports JAX, orbax and flax, and "
        "finds its programs in this benchmark's compilation cache (filled by an "
        "untimed merge of each set first): these fixed costs are what the ratios "
        "against `dd` lose as the inputs grow.",
        "- The checksums hash every input (sha256 unless named) in a thread "
        "beside the merge; `no checksums` is the same merge with "
        "`--no-checksums`, `blake3` with `--checksum blake3`; `sha256 alone` "
        "and `blake3 alone` hash the set's files in a process of their own, one "
        "file after another on one core, as the merge's thread does.",
        "- Peak memory is the largest over the rounds; the streaming engine holds "
        "one leaf of each input at a time.",
    ]
    if not r["mergekit"]:
        lines.append("- mergekit was not run (no `--mergekit`).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
