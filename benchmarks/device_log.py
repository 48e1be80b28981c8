"""The results page of a device run, generated from its raw log.

``device_run.sh`` runs the benchmarks on an accelerator machine and logs what
they print; a step that runs past its time limit leaves no result file, only
the per-repetition times in the log. This script turns such a log into a
markdown page: the machine, every step with its exit status, and tables of the
printed times with every ratio computed from them, so that no figure on the
page is transcribed by hand. What the log cannot hold (the revision, how the
run was called) comes from a notes file beside it (the log's name with the
suffix ``.notes``, one note per line), shown as such.

    python benchmarks/device_log.py benchmarks/results/device_h200_2026-11-27.log \
        > benchmarks/results/device_h200.md
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import statistics
import sys
from pathlib import Path

STEP = re.compile(r"^=== (?P<command>.*) \(limit (?P<limit>\d+)s\) (?P<start>[\d:]+)$")
END = re.compile(r"^=== rc=(?P<rc>\d+) (?P<end>[\d:]+)$")
REP = re.compile(r"^  rep (?P<rep>\d+): (?P<name>.+): (?P<seconds>[\d.]+) s$")
PHASE = re.compile(r"^(?P<phase>fixed iterations|time to solve) \(")
TIMEOUT_CODES = {"124", "137"}  # timeout(1)'s exit status, or killed


@dataclasses.dataclass
class Step:
    """One benchmark command of the log and what it printed."""

    command: str
    limit_s: int
    start: str
    end: str | None = None
    rc: str | None = None
    # phase -> method -> seconds per repetition, in the order printed
    times: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)
    lines: list[str] = dataclasses.field(default_factory=list)

    @property
    def timed_out(self) -> bool:
        return self.rc is None or self.rc in TIMEOUT_CODES

    @property
    def out_name(self) -> str:
        match = re.search(r"--out \S*/(\S+)", self.command)
        return match.group(1) if match else self.command


def parse(text: str) -> tuple[list[str], list[Step]]:
    """The lines before the first step (date, card, versions) and the steps."""
    preamble: list[str] = []
    steps: list[Step] = []
    phase = None
    for line in text.splitlines():
        if m := STEP.match(line):
            steps.append(Step(m["command"], int(m["limit"]), m["start"]))
            phase = None
        elif (m := END.match(line)) and steps:
            steps[-1].rc, steps[-1].end = m["rc"], m["end"]
        elif not steps:
            preamble.append(line)
        elif m := PHASE.match(line):
            phase = m["phase"]
            steps[-1].times.setdefault(phase, {})
        elif (m := REP.match(line)) and phase is not None:
            by_method = steps[-1].times[phase]
            by_method.setdefault(m["name"], []).append(float(m["seconds"]))
        else:
            steps[-1].lines.append(line)
    return preamble, steps


def _f(x: float) -> str:
    return f"{x:.3g}"


def _runs(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def _range(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return _f(lo) if _f(lo) == _f(hi) else f"{_f(lo)}–{_f(hi)}"


FLOOR, SCIPY = "matmul floor", "scipy loop"
MATS = ("mats (check_every=20)", "mats (check_every=0)")


def fixed_table(times: dict[str, list[float]]) -> list[str]:
    """Printed times of the fixed-iteration runs, and ratios per repetition."""
    rows = [
        f"| {name} | {_runs(t)} | {_f(statistics.median(t))} |"
        for name, t in times.items()
    ]
    lines = ["| method | s per repetition | median s |", "|---|---|---|", *rows, ""]
    if FLOOR not in times:
        return lines
    reps = len(times[FLOOR])
    ratio_rows = []
    for name in (*MATS, SCIPY):
        if name not in times or len(times[name]) != reps:
            continue
        per_rep = [m / f for m, f in zip(times[name], times[FLOOR], strict=True)]
        median = statistics.median(times[name]) / statistics.median(times[FLOOR])
        ratio_rows.append(f"| {name} ÷ floor | {_range(per_rep)} | {_f(median)} |")
    for name in MATS:
        if name in times and SCIPY in times and len(times[name]) == len(times[SCIPY]):
            per_rep = [s / m for s, m in zip(times[SCIPY], times[name], strict=True)]
            median = statistics.median(times[SCIPY]) / statistics.median(times[name])
            ratio_rows.append(
                f"| scipy loop ÷ {name} | {_range(per_rep)} | {_f(median)} |"
            )
    return [
        *lines,
        "| ratio | range over repetitions | of the medians |",
        "|---|---|---|",
        *ratio_rows,
        "",
    ]


def solve_table(times: dict[str, list[float]]) -> list[str]:
    rows = [f"| {name} | {_runs(t)} |" for name, t in times.items()]
    lines = ["| method | s per repetition printed |", "|---|---|", *rows, ""]
    if SCIPY in times:
        scipy_first = times[SCIPY][0]
        lines += [
            "Scipy loop's first repetition over each method's first: "
            + ", ".join(
                f"{name} {_f(scipy_first / t[0])}×"
                for name, t in times.items()
                if name != SCIPY
            )
            + ".",
            "",
        ]
    return lines


def step_section(step: Step) -> list[str]:
    status = (
        f"**ran past its {step.limit_s} s limit** (exit {step.rc}; no result file)"
        if step.timed_out
        else f"exit {step.rc}"
    )
    out = [
        f"## `{step.out_name}`",
        "",
        f"`{step.command}`, {step.start}–{step.end or '?'} UTC: {status}.",
        "",
    ]
    if "fixed iterations" in step.times:
        out += ["Fixed iterations (100 CG steps after compilation):", ""]
        out += fixed_table(step.times["fixed iterations"])
    if step.times.get("time to solve"):
        out += [
            "Time to a relative residual of 1e-5 (repetitions printed before the limit):",
            "",
        ]
        out += solve_table(step.times["time to solve"])
    elif "time to solve" in step.times:
        out += ["Time to solve: no repetition printed before the limit.", ""]
    printed = [line for line in step.lines if line.strip()]
    if not step.times and printed:
        out += ["Printed (no timings):", "", "```", *printed, "```", ""]
    return out


def precision_lines(steps: list[Step]) -> list[str]:
    """The floor at `highest` against the default, when both steps printed it."""
    floors = {
        (
            "highest" if s.out_name.endswith("_highest") else "default"
        ): statistics.median(s.times["fixed iterations"][FLOOR])
        for s in steps
        if FLOOR in s.times.get("fixed iterations", {})
    }
    if len(floors) < 2:
        return []
    return [
        f"- The matmul floor's median took {_f(floors['highest'])} s at `highest` "
        f"against {_f(floors['default'])} s at the default precision "
        f"({_f(floors['highest'] / floors['default'])}×). The steps are told apart by "
        "their `--out` names (`…_highest`); the log does not record the environment "
        "(`JAX_DEFAULT_MATMUL_PRECISION`).",
    ]


def machine_lines(preamble: list[str]) -> tuple[str, list[str]]:
    """The card's name, and lines for the date, the card and the versions.

    ``device_run.sh`` logs the date, ``nvidia-smi``'s CSV (a header, then a
    row) and the JAX, jaxlib and flax versions with the devices.
    """
    lines = [line for line in preamble if line.strip()]
    out, title = [], "unknown card"
    if lines:
        out.append(f"- Date: {lines[0]}")
    for header, row in itertools.pairwise(lines):
        if header.startswith("name,"):
            title = row.split(",")[0].strip()
            fields = zip(header.split(","), row.split(","), strict=False)
            out.append(
                "- Card: " + "; ".join(f"{k.strip()}: {v.strip()}" for k, v in fields)
            )
    for line in lines:
        if re.match(r"^[\d.]+ [\d.]+ [\d.]+ ", line):
            jax_v, jaxlib_v, flax_v, devices = line.split(" ", 3)
            out.append(f"- JAX {jax_v}, jaxlib {jaxlib_v}, flax {flax_v}; {devices}")
    return title, out


def page(text: str, log_name: str, notes: list[str]) -> str:
    preamble, steps = parse(text)
    timed_out = [s for s in steps if s.timed_out]
    title, machine = machine_lines(preamble)
    partial = (
        f" (partial: {len(timed_out)} of {len(steps)} steps ran past their limits)"
        if timed_out
        else ""
    )
    out = [
        f"# Device run: {title}{partial}",
        "",
        f"Generated by `benchmarks/device_log.py` from the raw log `{log_name}`. "
        "Times are as the scripts printed them, to 0.01 s: ratios of times near "
        "0.1 s carry up to about ±10% of rounding.",
        "",
    ]
    if timed_out:
        out += [
            "**This is a partial run.** "
            + ", ".join(f"`{s.out_name}`" for s in timed_out)
            + " ran past their time limits and wrote no result files: what follows "
            "are the per-repetition times printed before the limit, not the "
            "benchmarks' summarised results or targets.",
            "",
        ]
    out += [*machine, *precision_lines(steps), ""]
    if notes:
        out += [
            "Notes by whoever ran it (from the notes file beside the log, not from "
            "the log itself):",
            "",
            *(f"- {note}" for note in notes),
            "",
        ]
    for step in steps:
        out += step_section(step)
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path)
    parser.add_argument(
        "--notes", type=Path, help="notes file (default: the log with suffix .notes)"
    )
    args = parser.parse_args()
    notes_file = args.notes or args.log.with_suffix(".notes")
    notes = (
        [line for line in notes_file.read_text().splitlines() if line.strip()]
        if notes_file.exists()
        else []
    )
    sys.stdout.write(page(args.log.read_text(), args.log.name, notes))


if __name__ == "__main__":
    main()
