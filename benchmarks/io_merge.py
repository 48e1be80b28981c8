"""Benchmark: streaming merges of ~1 GB safetensors checkpoints, against reading them and mergekit.

Generates, in a scratch directory (not committed), a base and three fine-tuned
float32 safetensors checkpoints with Llama-like names and shapes (vocabulary
32000, hidden 1024, MLP 4096 with gate/up/down projections, 11 layers, untied
embedding and head: 250 M parameters, 1.0 GB each; the largest leaves are the
32000×1024 embedding and head, 131 MB). Fine-tuned = base + N(0, 0.01²).

Then, in one run, each measurement a separate process under
``/usr/bin/time -v`` (wall time and peak resident memory), after two warm-up
reads of the files so the page cache is warm:

- reading the four files: ``dd`` (16 MB blocks, every byte copied into
  user memory: the read time the targets refer to), ``cat`` to /dev/null (for
  reference: it may splice without copying), and every tensor through the
  safetensors library as ``mats-jax`` reads them (``safe_open``, ``pread``);
- ``mats-jax merge`` (the command line, ``-q``) with task arithmetic
  (weights 0.3 each), TIES with whole-model trimming and TIES trimmed per
  tensor (density 0.25, weights 1, scale 1);
- ``mergekit-pytorch`` from its own virtual environment (torch CPU) with the
  same task arithmetic and TIES (per tensor, its only kind), ``normalize``
  as needed to compute the same quantity.

It then compares the outputs tensor by tensor (mats-jax against mergekit for
task arithmetic and TIES per tensor, classifying any TIES entries that differ),
reports each run's time against the ``dd`` read time and mergekit's, its peak memory against the target
(4 × largest leaf + 1 GB), and the load average around each run.

Run from the repository root (needs ~16 GB of free disk in the scratch directory):

    .venv/bin/python benchmarks/io_merge.py [--scratch /tmp/mats_io_bench] [--mergekit /work/mergekit-venv]

``--layers 2`` makes a quick smoke run; results go to
``benchmarks/results/io_merge.{md,json}`` (``--layers`` other than 11: ``io_merge_quick.*``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
VOCAB, HIDDEN, MLP = 32000, 1024, 4096
DENSITY, TA_WEIGHT = 0.25, 0.3


def shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """Llama-like tensor names and (out, in) shapes."""
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{p}.self_attn.{name}.weight"] = (HIDDEN, HIDDEN)
        out[f"{p}.mlp.gate_proj.weight"] = (MLP, HIDDEN)
        out[f"{p}.mlp.up_proj.weight"] = (MLP, HIDDEN)
        out[f"{p}.mlp.down_proj.weight"] = (HIDDEN, MLP)
        out[f"{p}.input_layernorm.weight"] = (HIDDEN,)
        out[f"{p}.post_attention_layernorm.weight"] = (HIDDEN,)
    out["model.norm.weight"] = (HIDDEN,)
    out["lm_head.weight"] = (VOCAB, HIDDEN)
    return out


def generate(scratch: Path, layers: int) -> list[Path]:
    from safetensors.numpy import save_file

    files = [scratch / f"{n}.safetensors" for n in ("base", "ft0", "ft1", "ft2")]
    if all(f.exists() for f in files):
        return files
    rng = np.random.default_rng(0)
    base = {}
    for name, shape in shapes(layers).items():
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
    return files


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


def recipe(scratch: Path, files: list[Path], method: str, trim: str | None) -> Path:
    lines = [f"base: {files[0]}", "models:"]
    weight = TA_WEIGHT if method == "task_arithmetic" else 1.0
    lines += [f"  - {{path: {f}, weight: {weight}}}" for f in files[1:]]
    lines.append(f"method: {method}")
    if method == "ties":
        lines.append(f"parameters: {{density: {DENSITY}, trim: {trim}}}")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", default="/tmp/mats_io_bench")
    parser.add_argument("--mergekit", default="/work/mergekit-venv")
    parser.add_argument("--layers", type=int, default=11)
    parser.add_argument(
        "--render",
        action="store_true",
        help="only rewrite the markdown from the recorded JSON",
    )
    args = parser.parse_args()
    if args.render:
        stem = "io_merge" if args.layers == 11 else "io_merge_quick"
        result = json.loads((RESULTS / f"{stem}.json").read_text())
        (RESULTS / f"{stem}.md").write_text(markdown(result))
        return
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    logs = scratch / "logs"
    logs.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    files = generate(scratch, args.layers)
    sizes = {f.name: f.stat().st_size for f in files}
    largest = max(int(np.prod(s)) * 4 for s in shapes(args.layers).values())
    mats_jax_bin = str(Path(sys.executable).parent / "mats-jax")
    mergekit_bin = str(Path(args.mergekit) / "bin" / "mergekit-pytorch")

    def warm() -> None:
        for _ in range(2):
            subprocess.run(
                ["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True
            )

    runs: dict[str, dict[str, Any]] = {}
    warm()
    # The read baseline: dd copies every byte into its own buffer (cat to
    # /dev/null can splice without copying: shown for reference).
    runs["read_dd"] = timed(
        [
            "sh",
            "-c",
            " && ".join(f"dd if={f} of=/dev/null bs=16M status=none" for f in files),
        ],
        logs / "read_dd.log",
    )
    runs["read_cat"] = timed(
        ["sh", "-c", "cat " + " ".join(map(str, files)) + " > /dev/null"],
        logs / "read_cat.log",
    )
    runs["sha256_inputs"] = timed(["sha256sum", *map(str, files)], logs / "sha256.log")
    runs["read_safetensors"] = timed(
        [sys.executable, "-c", READER, *map(str, files)], logs / "read_safetensors.log"
    )
    outputs = {}
    for method, trim in (
        ("task_arithmetic", None),
        ("ties", "global"),
        ("ties", "per_leaf"),
    ):
        key = f"mats_jax_{method}" + (f"_{trim}" if trim else "")
        out = scratch / f"out_{key}"
        shutil.rmtree(out, ignore_errors=True)
        warm()
        runs[key] = timed(
            [
                mats_jax_bin,
                "merge",
                str(recipe(scratch, files, method, trim)),
                "-o",
                str(out),
                "-q",
            ],
            logs / f"{key}.log",
        )
        outputs[key] = out
    # The model card's checksums hash the 4 GB of inputs beside the merge; the
    # same merge without them shows what the hashing costs.
    out = scratch / "out_mats_jax_task_arithmetic_no_checksums"
    shutil.rmtree(out, ignore_errors=True)
    warm()
    runs["mats_jax_task_arithmetic_no_checksums"] = timed(
        [
            mats_jax_bin,
            "merge",
            str(recipe(scratch, files, "task_arithmetic", None)),
            "-o",
            str(out),
            "-q",
            "--no-checksums",
        ],
        logs / "mats_jax_task_arithmetic_no_checksums.log",
    )
    if Path(mergekit_bin).exists():
        for method in ("task_arithmetic", "ties"):
            key = f"mergekit_{method}"
            out = scratch / f"out_{key}"
            shutil.rmtree(out, ignore_errors=True)
            warm()
            runs[key] = timed(
                [
                    mergekit_bin,
                    str(mergekit_config(scratch, files, method)),
                    str(out),
                    "--quiet",
                ],
                logs / f"{key}.log",
            )
            outputs[key] = out
    comparisons = {}
    if "mergekit_task_arithmetic" in outputs:
        comparisons["task_arithmetic"] = compare(
            outputs["mats_jax_task_arithmetic"], outputs["mergekit_task_arithmetic"]
        )
        comparisons["ties_per_tensor"] = compare(
            outputs["mats_jax_ties_per_leaf"], outputs["mergekit_ties"], files
        )
    result = {
        "command": "python benchmarks/io_merge.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "git": _git_rev(),
        "machine": _machine(),
        "versions": _versions(args.mergekit),
        "layers": args.layers,
        "file_bytes": sizes,
        "largest_leaf_bytes": largest,
        "runs": runs,
        "comparisons": comparisons,
        "load_start": load_start,
        "load_end": os.getloadavg(),
        "total_s": time.perf_counter() - t0,
    }
    stem = "io_merge" if args.layers == 11 else "io_merge_quick"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    print((RESULTS / f"{stem}.md").read_text())


def _git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        ).stdout
        return rev + (" (with uncommitted changes)" if dirty.strip() else "")
    except OSError:
        return "unknown"


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


def _versions(mergekit_venv: str) -> dict[str, str]:
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
    pip = Path(mergekit_venv) / "bin" / "pip"
    if pip.exists():
        listing = subprocess.run(
            [str(pip), "list"], capture_output=True, text=True
        ).stdout
        for pkg in ("mergekit", "torch"):
            m = re.search(rf"^{pkg}\s+(\S+)", listing, re.MULTILINE)
            if m:
                out[pkg] = m.group(1)
    return out


def markdown(r: dict[str, Any]) -> str:
    runs = r["runs"]
    read = runs["read_dd"]["wall_s"]
    target_mem = (4 * r["largest_leaf_bytes"] + 2**30) / 2**20
    total_gb = sum(r["file_bytes"].values()) / 1e9
    lines = [
        "# Benchmark: streaming merges of safetensors checkpoints (`benchmarks/io_merge.py`)",
        "",
        f"- Command: `{r['command']}` (from the repository root)",
        f"- Date: {r['date']}; git {r['git']}",
        f"- Machine: {r['machine']}; no accelerator",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        f"- Load average (1/5/15 min) at start {'/'.join(f'{x:.1f}' for x in r['load_start'])}, "
        f"at end {'/'.join(f'{x:.1f}' for x in r['load_end'])} (2 cores, shared with other jobs)",
        f"- Inputs: base + 3 fine-tuned, float32 safetensors, {total_gb:.2f} GB in all "
        f"({r['layers']} layers; largest leaf {r['largest_leaf_bytes'] / 1e6:.0f} MB); total run {r['total_s']:.0f} s",
        "",
        "## Results",
        "",
        "Each run is one process under `/usr/bin/time -v` after two warm-up reads of the four files.",
        "",
        "| run | wall s | × read (dd) | × mergekit (same method) | peak RSS MiB | load before → after |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for key, run in runs.items():
        mk = None
        if (
            key.startswith("mats_jax_task_arithmetic")
            and "mergekit_task_arithmetic" in runs
        ):
            mk = runs["mergekit_task_arithmetic"]["wall_s"]
        elif key.startswith("mats_jax_ties") and "mergekit_ties" in runs:
            mk = runs["mergekit_ties"]["wall_s"]
        lines.append(
            f"| {key} | {run['wall_s']:.2f} | {run['wall_s'] / read:.2f} | "
            f"{'' if mk is None else format(run['wall_s'] / mk, '.3f')} | "
            f"{run['peak_rss_mb']:.0f} | {run['load_before'][0]:.1f} → {run['load_after'][0]:.1f} |"
            + ("" if run["returncode"] == 0 else f" **exit {run['returncode']}** |")
        )
    lines += ["", "## Targets", ""]
    for key in (
        "mats_jax_task_arithmetic",
        "mats_jax_task_arithmetic_no_checksums",
        "mats_jax_ties_global",
        "mats_jax_ties_per_leaf",
    ):
        run = runs.get(key)
        if run is None:
            continue
        ratio = run["wall_s"] / read
        lines.append(
            f"- {key}: time {ratio:.2f}× the read time (target ≤ 2×: "
            f"**{'met' if ratio <= 2 else 'not met'}**); peak {run['peak_rss_mb']:.0f} MiB against "
            f"4 × largest leaf + 1 GiB = {target_mem:.0f} MiB (**{'met' if run['peak_rss_mb'] <= target_mem else 'not met'}**)"
        )
    for ours, theirs in (
        ("mats_jax_task_arithmetic", "mergekit_task_arithmetic"),
        ("mats_jax_ties_per_leaf", "mergekit_ties"),
    ):
        if ours in runs and theirs in runs:
            a, b = runs[ours], runs[theirs]
            lines.append(
                f"- {ours} against {theirs}: {a['wall_s'] / b['wall_s']:.2f}× its time "
                f"({b['wall_s'] / a['wall_s']:.1f}× faster), peak memory {a['peak_rss_mb']:.0f} MiB "
                f"against {b['peak_rss_mb']:.0f} MiB."
            )
    if r["comparisons"]:
        lines += [
            "",
            "## Same tensors as mergekit",
            "",
            "| merge | leaves | max abs diff | entries beyond 1e-6 + 1e-5·|x| | of entries |",
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
    lines += ["", "## Notes", "", *notes(r)]
    lines.append("")
    return "\n".join(lines)


def notes(r: dict[str, Any]) -> list[str]:
    """What the numbers mean, written from the measurements."""
    runs = r["runs"]
    wall = {k: v["wall_s"] for k, v in runs.items()}
    out = [
        f"- The read baseline: `dd` copied the four files ({sum(r['file_bytes'].values()) / 1e9:.2f} GB) "
        f"into one reused 16 MB buffer in {wall['read_dd']:.2f} s. mats-jax reads each tensor "
        "through safetensors' API into a new numpy array (fresh memory, page faults): reading "
        f"every tensor that way in one Python process took {wall['read_safetensors']:.2f} s, "
        f"{wall['read_safetensors'] / wall['read_dd']:.1f}× dd.",
    ]
    if "sha256_inputs" in wall and "mats_jax_task_arithmetic_no_checksums" in wall:
        out.append(
            f"- The model card's sha256 of every input: `sha256sum` alone took "
            f"{wall['sha256_inputs']:.2f} s on the four files; mats-jax hashes in a thread beside "
            f"the merge, and task arithmetic took {wall['mats_jax_task_arithmetic']:.2f} s with "
            f"checksums and {wall['mats_jax_task_arithmetic_no_checksums']:.2f} s without "
            "(`--no-checksums`)."
        )
    out.append(
        "- Every mats-jax run includes starting Python and importing JAX, orbax and flax, "
        "and compiling the merge once per leaf shape (the compile cache is not kept between "
        "processes); these are fixed costs, not per gigabyte."
    )
    if "mats_jax_ties_global" in wall:
        out.append(
            "- TIES with whole-model trimming reads the inputs three times: two streaming "
            "passes of a radix select for each model's exact threshold, then the merge; "
            f"it took {wall['mats_jax_ties_global']:.2f} s against "
            f"{wall.get('mats_jax_ties_per_leaf', float('nan')):.2f} s per tensor."
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
    out.append(
        "- The load average shows other jobs on the same 2 cores during the run: the "
        "timings are of a shared machine, and the ratios between runs are more telling than "
        "the absolute times."
    )
    return out


if __name__ == "__main__":
    main()
