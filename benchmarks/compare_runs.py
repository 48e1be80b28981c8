"""Compare two runs of the benchmarks: the same seeds' results, and each timing's ratio to its own baseline.

A change that should not change behaviour (a refactor) is checked by running
the benchmarks from the commit before it and from the commit after it, on the
same machine, and comparing:

- ``merging.json``: every summary row (architecture, setting, method) of the
  two runs, per seed. A row is *identical* when every seed's test accuracy is
  the same number; otherwise the largest per-seed difference is shown, with
  the mean accuracy and normalised accuracy of both runs.
- ``solver_kfac.json``: the 100-step ratios to the matmul floor of the same run
  (with and without the residual checks), and the time of each MaTS solve to
  a 1e-5 residual, before and after.
- ``io_merge.json``: each command's median wall time, its ratio to the median
  ``dd`` read of the same run, and its peak memory, before and after.

A ratio against a baseline of the same run is what can be compared across
runs; seconds only when both runs are from the same machine, which the
provenance table shows.

    python benchmarks/compare_runs.py BEFORE_DIR AFTER_DIR [--out FILE] [--title TEXT]

Each directory holds the JSON files the benchmarks wrote (a missing one is
left out of the page). The page is generated from the JSON: nothing in it is
typed by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

RESULT_FILES = ("merging.json", "solver_kfac.json", "io_merge.json")


def load(directory: Path) -> dict[str, Any]:
    """The benchmark results in ``directory``, by file name; missing files left out."""
    return {
        name: json.loads((directory / name).read_text())
        for name in RESULT_FILES
        if (directory / name).is_file()
    }


def _meta(result: dict[str, Any]) -> dict[str, Any]:
    meta = result.get("meta", result)  # merging.json nests its provenance
    machine = meta.get("machine", "")
    if isinstance(machine, dict):
        machine = (
            f"{machine.get('cpu_count')}-core {machine.get('cpu_model')}, "
            f"{machine.get('platform')}"
        )
    return {
        "git": meta.get("git", "?"),
        "date": meta.get("date", "?"),
        "command": meta.get("command", "?"),
        "machine": machine,
    }


def provenance_lines(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    lines = [
        "| file | run | commit | date | machine | command |",
        "|---|---|---|---|---|---|",
    ]
    for name in RESULT_FILES:
        for label, runs in (("before", before), ("after", after)):
            if name in runs:
                m = _meta(runs[name])
                lines.append(
                    f"| `{name}` | {label} | `{m['git']}` | {m['date']} | "
                    f"{m['machine']} | `{m['command']}` |"
                )
    return lines


def _rows(merging: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {
        (row["architecture"], row["setting"], row["label"]): row
        for row in merging["summary"]
    }


def merging_comparison(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per summary row: identical per seed, or the largest per-seed difference."""
    rows_before, rows_after = _rows(before), _rows(after)
    compared = []
    for key in sorted(rows_before.keys() & rows_after.keys()):
        a, b = rows_before[key], rows_after[key]
        deltas = [
            abs(x - y)
            for x, y in zip(a["per_seed_accuracy"], b["per_seed_accuracy"], strict=True)
        ]
        compared.append(
            {
                "row": list(key),
                "identical": all(d == 0 for d in deltas),
                "max_seed_delta": max(deltas),
                "accuracy": [a["accuracy"][0], b["accuracy"][0]],
                "normalised": [a["normalised"][0], b["normalised"][0]],
            }
        )
    return {
        "rows": compared,
        "identical": sum(r["identical"] for r in compared),
        "only_before": sorted(map(list, rows_before.keys() - rows_after.keys())),
        "only_after": sorted(map(list, rows_after.keys() - rows_before.keys())),
    }


def merging_lines(comparison: dict[str, Any]) -> list[str]:
    rows = comparison["rows"]
    lines = [
        f"{comparison['identical']} of {len(rows)} rows give the same test "
        "accuracy for every seed."
    ]
    for side in ("only_before", "only_after"):
        if comparison[side]:
            shown = "; ".join(" / ".join(r) for r in comparison[side])
            lines.append(f"Rows {side.replace('_', ' ')}: {shown}.")
    differing = [r for r in rows if not r["identical"]]
    if differing:
        lines += [
            "",
            "Rows that differ (accuracy and normalised accuracy: mean over seeds):",
            "",
            "| architecture | setting | method | largest per-seed Δ accuracy | "
            "accuracy before → after | normalised before → after |",
            "|---|---|---|---|---|---|",
        ]
        for r in differing:
            arch, setting, label = r["row"]
            lines.append(
                f"| {arch} | {setting} | {label} | {r['max_seed_delta']:.2f} | "
                f"{r['accuracy'][0]:.2f} → {r['accuracy'][1]:.2f} | "
                f"{r['normalised'][0]:.2f} → {r['normalised'][1]:.2f} |"
            )
    return lines


_SOLVER_RATIOS = {
    "mats_over_floor": "100 steps, MaTS ÷ matmul floor",
    "mats_check0_over_floor": "100 steps, MaTS without residual checks ÷ matmul floor",
}


def solver_lines(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    lines = [
        "| measured | before | after | after ÷ before |",
        "|---|---|---|---|",
    ]
    for key, label in _SOLVER_RATIOS.items():
        for kind in ("median_ratios", "min_ratios"):
            a, b = before["summary"][kind][key], after["summary"][kind][key]
            lines.append(
                f"| {label} ({kind.split('_')[0]} of the repeats) | "
                f"{a:.3f} | {b:.3f} | {b / a:.3f} |"
            )
    solves_before = {r["method"]: r for r in before["summary"]["solve_rows"]}
    for row in after["summary"]["solve_rows"]:
        old = solves_before.get(row["method"])
        if old is None or not row["method"].startswith("mats"):
            continue
        lines.append(
            f"| to a 1e-5 residual, {row['method']}: seconds (iterations, all "
            f"blocks) | {old['seconds']:.2f} s ({old['iters_total']}) | "
            f"{row['seconds']:.2f} s ({row['iters_total']}) | "
            f"{row['seconds'] / old['seconds']:.3f} |"
        )
    return lines


def _io_run(run: dict[str, Any]) -> tuple[float, float]:
    """(median wall seconds, peak MB); a run recorded once has one wall time."""
    walls = run.get("wall_s")
    median = statistics.median(walls) if isinstance(walls, list) else walls
    return float(median), float(run["peak_rss_mb"])


def io_lines(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    dd_before = _io_run(before["runs"]["read_dd"])[0]
    dd_after = _io_run(after["runs"]["read_dd"])[0]
    lines = [
        f"Median `dd` read of the four files: {dd_before:.3f} s before, "
        f"{dd_after:.3f} s after.",
        "",
        "| command | seconds before → after | × dd before → after | "
        "after ÷ before (seconds) | peak MiB before → after |",
        "|---|---|---|---|---|",
    ]
    for name, run in after["runs"].items():
        if not name.startswith("mats_jax") or name not in before["runs"]:
            continue
        (s0, m0), (s1, m1) = _io_run(before["runs"][name]), _io_run(run)
        lines.append(
            f"| `{name}` | {s0:.2f} → {s1:.2f} | {s0 / dd_before:.1f} → "
            f"{s1 / dd_after:.1f} | {s1 / s0:.3f} | {m0:.0f} → {m1:.0f} |"
        )
    repeats = [runs["repeats"] if "repeats" in runs else 1 for runs in (before, after)]
    lines += ["", f"Repeats per command: {repeats[0]} before, {repeats[1]} after."]
    return lines


def page(before: dict[str, Any], after: dict[str, Any], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        "Generated by `python benchmarks/compare_runs.py` from the JSON results "
        "of two runs; see that script for what is compared.",
        "",
        "## Runs",
        "",
        *provenance_lines(before, after),
    ]
    if "merging.json" in before and "merging.json" in after:
        comparison = merging_comparison(before["merging.json"], after["merging.json"])
        lines += ["", "## Merging: the same seeds", "", *merging_lines(comparison)]
    if "solver_kfac.json" in before and "solver_kfac.json" in after:
        lines += [
            "",
            "## Solver",
            "",
            *solver_lines(before["solver_kfac.json"], after["solver_kfac.json"]),
        ]
    if "io_merge.json" in before and "io_merge.json" in after:
        lines += [
            "",
            "## Streaming merges",
            "",
            *io_lines(before["io_merge.json"], after["io_merge.json"]),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--out", type=Path, help="markdown file (default: stdout)")
    parser.add_argument("--title", default="Before and after")
    args = parser.parse_args()
    text = page(load(args.before), load(args.after), args.title)
    if args.out is None:
        print(text, end="")
    else:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
