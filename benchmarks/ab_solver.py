"""A/B of the solver's 100-step run between two trees: the same problem, alternating processes.

``solver_kfac.py`` times MaTS against the matmul floor in one process; on a
shared machine two such runs hours apart differ by more than a code change
would. This script runs the same measurement from two source trees (for
example the commits before and after a refactor, each checked out with
``git worktree``) in alternating processes, A B A B …, so that load falls on
both alike. Each process imports ``mats_jax`` and ``solver_kfac`` from its
tree, builds ``solver_kfac``'s default problem, compiles, then times
``--reps`` rounds of: 100 MaTS CG steps (``tol=0``, ``check_every=20``) and
the matmul floor (the same 100 steps' matmuls alone), interleaved. The
figure compared is MaTS ÷ floor per round; the report gives its median over
every round of each tree, and their quotient.

    python benchmarks/ab_solver.py TREE_A TREE_B [--labels A B] [--pairs 3] [--reps 1] [--out PREFIX] [--render]

Writes ``PREFIX.json`` and ``PREFIX.md`` (default: under the temporary
directory; under ``benchmarks/results/`` only from a committed tree, as every
benchmark here). Each tree's commit is read from its own git checkout (``provenance.tree_revision``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from provenance import (
    QUICK_RESULTS,
    add_dirty_option,
    check_destination,
    machine,
    tree_revision,
)

# Run in each tree's own interpreter process: imports come from that tree.
CHILD = r"""
import json, sys, time
import jax
import solver_kfac as s
cfg = s.Config()
problem = s.build_problem(cfg)
groups = s.floor_groups(problem)
runs = {
    "mats": lambda n: s.run_mats(problem, n, 0.0, check_every=20),
    "floor": lambda n: s.run_floor(groups, n),
}
for run in runs.values():
    s.compile_time(run)
times = {name: [] for name in runs}
for _ in range(int(sys.argv[1])):
    for name, run in runs.items():
        start = time.perf_counter()
        jax.block_until_ready(run(cfg.fixed_iters))
        times[name].append(time.perf_counter() - start)
print("AB_RESULT " + json.dumps(times))
"""


def run_tree(tree: Path, reps: int) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": f"{tree}:{tree / 'benchmarks'}"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(reps)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tree,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("AB_RESULT "))
    return json.loads(line.removeprefix("AB_RESULT "))


def summarise(rounds: dict[str, list[dict[str, list[float]]]]) -> dict[str, Any]:
    summary = {}
    for label, processes in rounds.items():
        ratios = [
            m / f for p in processes for m, f in zip(p["mats"], p["floor"], strict=True)
        ]
        summary[label] = {
            "mats_over_floor": ratios,
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        }
    return summary


def render(result: dict[str, Any]) -> str:
    a, b = result["labels"]
    s = result["summary"]
    lines = [
        "# Solver A/B: MaTS ÷ matmul floor, 100 CG steps, alternating processes",
        "",
        f"`{result['command']}` on {result['machine']['cpu_count']}-core "
        f"{result['machine']['cpu_model']}, {result['date']}; this script at "
        f"`{result['git']}`.",
        "",
        "| tree | commit | rounds | MaTS ÷ floor, median (min–max) |",
        "|---|---|---|---|",
    ]
    for label in (a, b):
        lines.append(
            f"| {label} | `{result['commits'][label]}` | "
            f"{len(s[label]['mats_over_floor'])} | {s[label]['median']:.3f} "
            f"({s[label]['min']:.3f}–{s[label]['max']:.3f}) |"
        )
    quotient = s[b]["median"] / s[a]["median"]
    overlap = s[b]["min"] <= s[a]["max"] and s[a]["min"] <= s[b]["max"]
    verdict = (
        "the two trees' ranges overlap: a difference this run cannot resolve"
        if overlap
        else f"the ranges do not overlap: {b} is {'slower' if quotient > 1 else 'faster'}"
    )
    lines += ["", f"{b} ÷ {a}, medians: {quotient:.3f}; {verdict}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", type=Path, nargs=2)
    parser.add_argument("--labels", nargs=2, default=["A", "B"])
    parser.add_argument("--pairs", type=int, default=3, help="A B rounds of processes")
    parser.add_argument("--reps", type=int, default=1, help="timed runs per process")
    parser.add_argument("--out", type=Path, default=QUICK_RESULTS / "ab_solver")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite PREFIX.md from PREFIX.json"
    )
    add_dirty_option(parser)
    args = parser.parse_args()
    if args.render:
        result = json.loads(args.out.with_suffix(".json").read_text())
        args.out.with_suffix(".md").write_text(render(result))
        return
    revision = check_destination(args.out, args.allow_dirty)
    trees = [t.resolve() for t in args.trees]
    labels = list(args.labels)
    rounds: dict[str, list[dict[str, list[float]]]] = {label: [] for label in labels}
    for pair in range(args.pairs):
        for label, tree in zip(labels, trees, strict=True):
            rounds[label].append(run_tree(tree, args.reps))
            print(f"pair {pair}: {label}: {rounds[label][-1]}", flush=True)
    result = {
        "command": "python benchmarks/ab_solver.py A B "
        f"--labels {' '.join(labels)} --pairs {args.pairs} --reps {args.reps}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "git": revision,
        "machine": machine(),
        "labels": labels,
        "commits": {
            label: tree_revision(tree)
            for label, tree in zip(labels, trees, strict=True)
        },
        "rounds": rounds,
        "summary": summarise(rounds),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(result))
    print(render(result), end="")


if __name__ == "__main__":
    main()
