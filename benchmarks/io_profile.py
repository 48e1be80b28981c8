"""Benchmark: where a streamed merge's time goes (a profile of ``merge_recipe``).

On the IO benchmark's inputs (``io_merge.py``: a base and three fine-tuned
float32 safetensors checkpoints of 1.0 GB each, generated in its scratch
folder unless present), runs task arithmetic, TIES with whole-model trimming
and TIES trimmed per tensor, each in its own process, in-process through
``mats_jax.merge_recipe`` (no model card checksums, as
``--checksum none``) under ``cProfile``, after a warm-up read of the inputs
and one unprofiled merge (so compilation is cached and the page cache warm).

Each function's own time (``tottime``: its body, not what it calls; the
categories are disjoint and add up to the profiled total) is put in one
category:

- *reading*: ``os.preadv`` (input bytes into the reused buffers);
- *threshold histograms*: the radix select's histograms, or the one-pass
  selection in a sample's bracket (TIES);
- *task vectors*: forming ``θ_m − θ_0`` block by block for the thresholds;
- *finiteness checks*: the inputs checked finite before each merge;
- *merge (JAX)*: the device arrays' transfer to numpy, which waits for the
  jitted merge (its compute is here);
- *assembling the output*: copying merged blocks into the leaf's output
  array (and faulting its pages in);
- *waiting for the writer*: the main thread waiting on the write thread;
- *compilation*: XLA compiling (none once cached);
- *the rest*: Python, dispatch, everything else.

cProfile adds its own cost to every Python call; these merges make few
(about 0.4 M), so the total stays near the unprofiled wall time, which is
recorded beside it.

    .venv/bin/python benchmarks/io_profile.py [--scratch DIR] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from io_merge import recipe, scratch_inputs, warm_page_cache
from provenance import (
    QUICK_RESULTS,
    RESULTS,
    add_output_options,
    check_destination,
    machine,
    render_only,
    write_results,
)

MERGES = (("task_arithmetic", None), ("ties", "global"), ("ties", "per_leaf"))

# (category, what matches a profiled function: its file's tail and its name)
CATEGORIES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("reading", (("~", "<built-in method posix.preadv>"),)),
    (
        "threshold histograms",
        (
            ("select.py", "_half_histogram"),
            ("select.py", "count"),
            ("select.py", "radix_select"),
            ("select.py", "_above_and_in"),
            ("select.py", "_select_in_brackets"),
            ("select.py", "_brackets"),
        ),
    ),
    ("task vectors", (("stream.py", "task_vectors"),)),
    (
        "finiteness checks",
        (
            ("checks.py", "_host_flags"),
            ("~", "<method 'reduce' of 'numpy.ufunc' objects>"),
        ),
    ),
    ("merge (JAX)", (("~", "<built-in method numpy.asarray>"),)),
    ("assembling the output", (("stream.py", "merge_in_blocks"),)),
    (
        "waiting for the writer",
        (("~", "<method 'acquire' of '_thread.lock' objects>"),),
    ),
    ("compilation", (("compiler.py", "backend_compile_and_load"),)),
)

# Run in a fresh process per merge: one unprofiled merge, then the profiled one.
PROFILED = r"""
import cProfile, json, pstats, shutil, sys, time
from mats_jax import merge_recipe
config, out, dump = sys.argv[1:4]
shutil.rmtree(out, ignore_errors=True)
start = time.perf_counter()
merge_recipe(config, output=out, checksum=None)
unprofiled = time.perf_counter() - start
shutil.rmtree(out)
profile = cProfile.Profile()
start = time.perf_counter()
profile.enable()
merge_recipe(config, output=out, checksum=None)
profile.disable()
profiled = time.perf_counter() - start
shutil.rmtree(out)
stats = pstats.Stats(profile)
rows = [
    [file, line, name, calls, own, total]
    for (file, line, name), (_, calls, own, total, _) in stats.stats.items()
]
json.dump({"unprofiled_s": unprofiled, "profiled_s": profiled, "functions": rows},
          open(dump, "w"))
"""


def category(file: str, name: str) -> str:
    for label, patterns in CATEGORIES:
        for tail, wanted in patterns:
            if name == wanted and (tail == "~" or file.endswith(tail)):
                return label
    return "the rest"


def profile_one(config: Path, out: Path, dump: Path) -> dict[str, Any]:
    subprocess.run(
        [sys.executable, "-c", PROFILED, str(config), str(out), str(dump)], check=True
    )
    raw = json.loads(dump.read_text())
    seconds: dict[str, float] = {label: 0.0 for label, _ in CATEGORIES}
    seconds["the rest"] = 0.0
    top = sorted(raw["functions"], key=lambda r: -r[4])[:12]
    for file, _, name, _, own, _ in raw["functions"]:
        seconds[category(file, name)] += own
    return {
        "unprofiled_s": raw["unprofiled_s"],
        "profiled_s": raw["profiled_s"],
        "seconds": seconds,
        "top_functions": [
            {"function": f"{Path(f).name}:{line}({name})", "calls": calls, "own_s": own}
            for f, line, name, calls, own, _ in top
        ],
    }


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    names = list(r["merges"])
    lines = [
        "# Benchmark: where a streamed merge's time goes (`benchmarks/io_profile.py`)",
        "",
        f"- Command: `{r['command']}`",
        f"- Date: {r['date']}; git {r['git']}; total {r['total_s']:.0f} s",
        f"- Machine: {m['cpu_count']}-core {m['cpu_model']}, {m['platform']}; "
        f"no accelerator; load average {r['load_start'][0]:.1f} at the start",
        f"- Inputs: {r['inputs']}",
        "- Each merge in its own process, in-process `merge_recipe(..., checksum=None)` "
        "after an unprofiled merge (compilation cached, page cache warm), under cProfile.",
        "",
        "## Own time by category (s)",
        "",
        "| category | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    categories = list(r["merges"][names[0]]["seconds"])
    for c in categories:
        cells = [f"{r['merges'][n]['seconds'][c]:.2f}" for n in names]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append(
        "| **profiled total** | "
        + " | ".join(f"**{r['merges'][n]['profiled_s']:.2f}**" for n in names)
        + " |"
    )
    lines.append(
        "| unprofiled, same process | "
        + " | ".join(f"{r['merges'][n]['unprofiled_s']:.2f}" for n in names)
        + " |"
    )
    lines += ["", "## The largest own times", ""]
    for n in names:
        lines += [f"**{n}**", "", "| function | calls | own s |", "|---|---:|---:|"]
        for f in r["merges"][n]["top_functions"]:
            lines.append(f"| `{f['function']}` | {f['calls']} | {f['own_s']:.3f} |")
        lines.append("")
    lines.append(
        "What the categories hold: the module docstring of `benchmarks/io_profile.py`."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/mats_io_bench"))
    parser.add_argument("--quick", action="store_true", help="~20 MB inputs")
    add_output_options(parser)
    args = parser.parse_args()
    out = args.out or (
        QUICK_RESULTS / "io_profile_quick" if args.quick else RESULTS / "io_profile"
    )
    if render_only(out, args.render, markdown):
        return
    revision = check_destination(out, args.allow_dirty)
    start = time.perf_counter()
    load_start = os.getloadavg()
    dims, scratch, logs, files = scratch_inputs(args.scratch, args.quick)
    merges = {}
    for method, trim in MERGES:
        name = method + (f" ({trim})" if trim else "")
        config = recipe(scratch, files, method, trim)
        warm_page_cache(files)
        print(f"profiling {name}", flush=True)
        merges[name] = profile_one(
            config, scratch / "out_profile", logs / f"profile_{method}_{trim}.json"
        )
    size = sum(f.stat().st_size for f in files) / 1e9
    result = {
        "command": "python benchmarks/io_profile.py"
        + (" --quick" if args.quick else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "git": revision,
        "machine": machine(),
        "load_start": load_start,
        "inputs": f"base + {len(files) - 1} fine-tuned float32 safetensors, "
        f"{size:.2f} GB in all (vocabulary {dims.vocab}, hidden {dims.hidden}, "
        f"MLP {dims.mlp}, {dims.layers} layers)",
        "merges": merges,
        "total_s": time.perf_counter() - start,
    }
    write_results(out, result, markdown)


if __name__ == "__main__":
    main()
