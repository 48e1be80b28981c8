"""Benchmark: when MaTS pays off, a regime map on the MLP and the ViT of ``benchmarks/merging.py``.

The lead of MaTS (K-FAC, CG from task arithmetic) over RegMean and over task
arithmetic, in multitask merging, measured along the axes a user controls:

* fine-tuning length: short, moderate (``benchmarks/merging.py``'s) and long
  fine-tuning of every task (epochs per architecture in ``EPOCHS``), with the
  statistics from 256 examples per task;
* examples behind each statistic: 64, 256 and 1000 (every training example
  of a task) per task, at the moderate length;
* in every cell: the Fisher kind of the K-FAC statistic (exact; sampled, one
  or four labels per example; empirical), the initialisation (task
  arithmetic or TIES) and the CG iteration count (the accuracy after 0 … 300
  iterations, besides the count validation chose).

Same tasks, models, pretraining and validation grids as
``benchmarks/merging.py``; every hyperparameter is chosen on validation
splits, test accuracies are only reported. Each cell also records what
explains it: how far fine-tuning moved the body (‖θ_m − θ_0‖ / ‖θ_0‖, mean
over tasks) and what it gained over the pretrained body.

Run it from the repository root, after
``apt-get install dataset-fashion-mnist`` and ``pip install -e '.[dev]'``::

    python benchmarks/regime_map.py            # 3 seeds, MLP and ViT, 5 cells
    python benchmarks/regime_map.py --quick    # one seed, the MLP, 2 cells

Writes ``benchmarks/results/regime_map.{md,json}`` and the plot
``regime_map.png`` (``--quick``: ``regime_map_quick.*`` under the temporary
directory; ``--out DIR`` anywhere), from a committed tree only
(``--allow-dirty`` to record anyway). The markdown is generated from the
measurements; ``--render`` rewrites it from the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from merging import config as merging_config
from provenance import (
    QUICK_RESULTS,
    RESULTS,
    add_dirty_option,
    check_destination,
    experiment_header,
    experiment_meta,
)

from mats_experiment import pipeline, report
from mats_experiment.methods import METHODS as EXPERIMENT_METHODS
from mats_experiment.metrics import mean_and_spread, normalised
from mats_experiment.train import TrainConfig

EPOCHS = {
    "mlp": {"short": 6, "moderate": 30, "long": 90},
    "vit": {"short": 3, "moderate": 12, "long": 36},
}
"""Fine-tuning epochs per architecture and length; moderate is merging.py's."""

CELLS = (
    ("short", 256),
    ("moderate", 256),
    ("long", 256),
    ("moderate", 64),
    ("moderate", 1000),
)
"""(fine-tuning length, examples per task behind each statistic)."""

QUICK_CELLS = (("short", 256), ("moderate", 64))

CELL_FILES = Path(tempfile.gettempdir()) / "mats_jax_regime_map_cells"
"""Where finished cells are kept, by commit, for a stopped run to resume."""

METHODS = (
    "task_arithmetic",
    "ties",
    "regmean",
    "mats_kfac",
    "mats_kfac_ties",
    "mats_kfac_sampled",
    "mats_kfac_sampled_4",
    "mats_kfac_empirical",
)

MATS = "mats_kfac"
KINDS = (
    ("mats_kfac", "exact"),
    ("mats_kfac_sampled", "sampled, 1 label"),
    ("mats_kfac_sampled_4", "sampled, 4 labels"),
    ("mats_kfac_empirical", "empirical"),
)
LEADS = (("regmean", "RegMean"), ("task_arithmetic", "task arithmetic"))
CURVE = (0, 3, 10, 30, 100, 300)


def cell_config(
    length: str, examples: int, seeds: tuple[int, ...], archs: tuple[str, ...]
) -> pipeline.ExperimentConfig:
    """merging.py's experiment, multitask only, at one cell of the map."""
    base = merging_config(False, seeds, archs)
    return dataclasses.replace(
        base,
        # 500 iterations past merging.py's 200: on the MLP validation chose
        # 200, its grid's edge, in the smoke run.
        grids=dataclasses.replace(base.grids, cg_iterations=(0, 10, 50, 200, 500)),
        finetune_training={
            arch: TrainConfig(epochs=EPOCHS[arch][length]) for arch in archs
        },
        stat_examples=examples,
        methods=METHODS,
        intermediate_pairs=(),
        curve_iterations=CURVE,
    )


def _flat(tree: Any) -> np.ndarray:
    return np.concatenate(
        [np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)]
    )


def relative_distance(base: Any, tuned: Sequence[Any]) -> float:
    """Mean over tasks of ‖θ_m − θ_0‖ / ‖θ_0‖ over the body.

    Examples:
      >>> relative_distance({"w": np.ones(4)}, [{"w": np.full(4, 1.5)}])
      0.5
    """
    b = _flat(base)
    return float(np.mean([np.linalg.norm(_flat(t) - b) for t in tuned])) / float(
        np.linalg.norm(b)
    )


def summarise_run(run: Mapping[str, Any]) -> dict[str, Any]:
    """What the map keeps of one (architecture, seed) run of a cell."""
    own = {t: v["finetuned_test"] for t, v in run["tasks"].items()}

    def score(test: Mapping[str, float]) -> float:
        return float(np.mean(normalised(list(test.values()), [own[t] for t in test])))

    models = run["models"]
    return {
        "architecture": run["architecture"],
        "seed": run["seed"],
        "normalised": {m: score(r["test"]) for m, r in run["multitask"].items()},
        "base_body": score(run["base_body"]["test"]),
        "chosen": {m: r["chosen"] for m, r in run["multitask"].items()},
        "curve": [
            {"iterations": p["iterations"], "val": p["val"], "test": score(p["test"])}
            for p in run["cg_curve"]
        ],
        "relative_distance": relative_distance(
            models["pretrained"]["body"],
            [p["body"] for p in models["finetuned"].values()],
        ),
        "finetuned_test": float(np.mean(list(own.values()))),
        "gain_test": float(np.mean([v["gain_test"] for v in run["tasks"].values()])),
        "timings_s": run["timings_s"],
    }


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------


def _runs(cell: Mapping[str, Any], arch: str) -> list[Mapping[str, Any]]:
    return [r for r in cell["runs"] if r["architecture"] == arch]


def lead(cell: Mapping[str, Any], arch: str, a: str, b: str) -> np.ndarray:
    """Per seed, method ``a``'s average normalised test accuracy minus ``b``'s."""
    return np.asarray(
        [r["normalised"][a] - r["normalised"][b] for r in _runs(cell, arch)]
    )


def _signed(d: np.ndarray) -> str:
    mean, spread = mean_and_spread(list(d))
    return f"{mean:+.2f} ± {spread:.2f} ({int(np.sum(d > 0))}/{d.size})"


def _mean(
    cell: Mapping[str, Any], arch: str, key: str, method: str = "", digits: int = 1
) -> str:
    """Mean over seeds of a run's ``key`` (of ``method``'s entry, if given)."""
    values = [r[key][method] if method else r[key] for r in _runs(cell, arch)]
    return f"{np.mean(values):.{digits}f}"


def cell_name(cell: Mapping[str, Any], arch: str) -> str:
    return (
        f"{cell['length']} ({cell['epochs'][arch]} epochs), {cell['examples']} examples"
    )


def map_table(cells: Sequence[Mapping[str, Any]], arch: str) -> str:
    lines = [
        "| cell | ‖θ_m − θ_0‖ / ‖θ_0‖ | fine-tuning gain | pretrained body | task arithmetic | RegMean | MaTS | MaTS − RegMean | MaTS − task arithmetic | CG iterations chosen | task arithmetic's scale chosen |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for cell in cells:
        runs = _runs(cell, arch)
        its = ", ".join(str(r["chosen"][MATS]["cg_iterations"]) for r in runs)
        scales = ", ".join(f"{r['chosen']['task_arithmetic']['scale']:g}" for r in runs)
        lines.append(
            f"| {cell_name(cell, arch)} | {_mean(cell, arch, 'relative_distance', digits=3)} "
            f"| {_mean(cell, arch, 'gain_test')} "
            f"| {_mean(cell, arch, 'base_body')} "
            f"| {_mean(cell, arch, 'normalised', 'task_arithmetic')} "
            f"| {_mean(cell, arch, 'normalised', 'regmean')} "
            f"| {_mean(cell, arch, 'normalised', MATS)} "
            f"| {_signed(lead(cell, arch, MATS, 'regmean'))} "
            f"| {_signed(lead(cell, arch, MATS, 'task_arithmetic'))} "
            f"| {its} | {scales} |"
        )
    return "\n".join(lines)


def kind_table(cells: Sequence[Mapping[str, Any]], arch: str) -> str:
    lines = [
        "| cell | "
        + " | ".join(f"MaTS, {k}" for _, k in KINDS)
        + " | MaTS init TIES − init TA |",
        "|---|" + "---:|" * (len(KINDS) + 1),
    ]
    for cell in cells:
        parts = [
            f"{_mean(cell, arch, 'normalised', m)} ({_signed(lead(cell, arch, m, 'regmean'))})"
            for m, _ in KINDS
        ]
        parts.append(_signed(lead(cell, arch, "mats_kfac_ties", MATS)))
        lines.append(f"| {cell_name(cell, arch)} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def curve_table(cells: Sequence[Mapping[str, Any]], arch: str) -> str:
    lines = [
        "| cell | " + " | ".join(f"{n} its" for n in CURVE) + " | best on validation |",
        "|---|" + "---:|" * (len(CURVE) + 1),
    ]
    for cell in cells:
        runs = _runs(cell, arch)
        test = np.asarray([[p["test"] for p in r["curve"]] for r in runs])
        val = np.asarray([[p["val"] for p in r["curve"]] for r in runs])
        best = ", ".join(str(CURVE[int(np.argmax(v))]) for v in val)
        lines.append(
            f"| {cell_name(cell, arch)} | "
            + " | ".join(f"{t:.1f}" for t in test.mean(axis=0))
            + f" | {best} |"
        )
    return "\n".join(lines)


def conclusions(cells: Sequence[Mapping[str, Any]], archs: Sequence[str]) -> list[str]:
    """Per model: where MaTS leads RegMean by ≥ 1 point on every seed, where it trails."""
    lines = []
    for arch in archs:
        ahead, behind, tied = [], [], []
        for cell in cells:
            d = lead(cell, arch, MATS, "regmean")
            name = f"{cell_name(cell, arch)} ({d.mean():+.2f})"
            if d.mean() >= 1.0 and np.all(d > 0):
                ahead.append(name)
            elif d.mean() <= -1.0 and np.all(d < 0):
                behind.append(name)
            else:
                tied.append(name)
        kinds = []
        for cell in cells:
            best = max(
                KINDS,
                key=lambda k: np.mean(
                    [r["normalised"][k[0]] for r in _runs(cell, arch)]
                ),
            )
            kinds.append(f"{cell_name(cell, arch)}: {best[1]}")
        zero = sum(
            r["chosen"][MATS]["cg_iterations"] == 0
            for cell in cells
            for r in _runs(cell, arch)
        )
        total = sum(len(_runs(cell, arch)) for cell in cells)
        over_base = []
        for cell in cells:
            runs = _runs(cell, arch)
            if "base_body" not in runs[0]:
                continue
            best = max(
                METHODS, key=lambda m: np.mean([r["normalised"][m] for r in runs])
            )
            d = np.asarray([r["normalised"][best] - r["base_body"] for r in runs])
            over_base.append(
                f"{cell_name(cell, arch)}: {EXPERIMENT_METHODS[best].label} {_signed(d)}"
            )
        if over_base:
            lines.append(
                f"- **{arch.upper()}**, the best merge (mean over seeds) against the "
                "pretrained body under the fine-tuned heads, the merge that keeps no "
                "task vector: " + "; ".join(over_base) + "."
            )
        lines += [
            f"- **{arch.upper()}**: MaTS (K-FAC exact, init TA) ahead of RegMean by ≥ 1 "
            f"normalised point on every seed in: {'; '.join(ahead) or 'no cell'}. "
            f"Behind by ≥ 1 on every seed in: {'; '.join(behind) or 'no cell'}. "
            f"Within that in: {'; '.join(tied) or 'no cell'}.",
            f"  - Best Fisher kind (mean over seeds): {'; '.join(kinds)}.",
            f"  - Validation chose 0 CG iterations (MaTS = its task-arithmetic "
            f"init) in {zero} of {total} runs.",
        ]
    return lines


def plot(cells: Sequence[Mapping[str, Any]], archs: Sequence[str], path: Path) -> None:
    """Rows: models. Columns: the leads against fine-tuning length, against the
    examples behind the statistics, and each Fisher kind's lead over RegMean
    against the examples. Error bars: one sample standard deviation over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [c for c in cells if c["examples"] == 256]
    counts = sorted(
        (c for c in cells if c["length"] == "moderate"), key=lambda c: c["examples"]
    )
    with plt.rc_context({"font.size": report.FONT_SIZE}):
        fig, axes = plt.subplots(
            len(archs), 3, figsize=(12.0, 3.6 * len(archs)), squeeze=False
        )
        for row, arch in zip(axes, archs, strict=True):
            panels = (
                (
                    lengths,
                    [c["length"] for c in lengths],
                    "fine-tuning length",
                    LEADS,
                    MATS,
                ),
                (
                    counts,
                    [str(c["examples"]) for c in counts],
                    "examples per task",
                    LEADS,
                    MATS,
                ),
            )
            for ax, (chosen, ticks, xlabel, refs, method) in zip(
                row[:2], panels, strict=True
            ):
                for ref, label in refs:
                    d = [lead(c, arch, method, ref) for c in chosen]
                    ax.errorbar(
                        range(len(chosen)),
                        [x.mean() for x in d],
                        yerr=[mean_and_spread(list(x))[1] for x in d],
                        marker="o",
                        capsize=3,
                        label=f"MaTS − {label}",
                    )
                ax.set_xticks(range(len(chosen)), ticks)
                ax.set_xlabel(xlabel)
            for m, kind in KINDS:
                d = [lead(c, arch, m, "regmean") for c in counts]
                row[2].errorbar(
                    range(len(counts)),
                    [x.mean() for x in d],
                    yerr=[mean_and_spread(list(x))[1] for x in d],
                    marker="o",
                    capsize=3,
                    label=kind,
                )
            row[2].set_xticks(range(len(counts)), [str(c["examples"]) for c in counts])
            row[2].set_xlabel("examples per task (K-FAC's Fisher kind)")
            for ax in row:
                ax.axhline(0.0, color="0.4", lw=0.8)
                ax.grid(color="0.9", lw=0.6)
                ax.legend(frameon=False, fontsize=report.FONT_SIZE - 1)
            row[0].set_ylabel(f"{arch.upper()}: lead\n(normalised points)")
            row[2].set_title("MaTS − RegMean by Fisher kind")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def markdown(saved: Mapping[str, Any], picture: str) -> str:
    meta, cells = saved["meta"], saved["cells"]
    archs = meta["architectures"]
    lines = [
        "# Benchmark: when MaTS pays off, a regime map (`benchmarks/regime_map.py`)",
        "",
        *experiment_header(meta),
        "",
        "Multitask merging of the six tasks of `benchmarks/merging.py` (same "
        "pretraining, models and validation grids), one cell per fine-tuning "
        "length and number of examples behind each statistic. Numbers are "
        "average normalised test accuracy (100 = every task's own fine-tuned "
        "model), mean over seeds; a difference is mean ± sample standard "
        "deviation over seeds, with the seeds on which the first method was "
        "ahead in brackets. Every hyperparameter, CG's iteration count "
        "included, was chosen on validation.",
        "",
        "## Conclusions",
        "",
        "<!-- regime: BEGIN conclusions -->",
        *conclusions(cells, archs),
        "<!-- regime: END conclusions -->",
        "",
        f"![the map]({picture})",
        "",
    ]
    for arch in archs:
        lines += [
            f"## {arch.upper()}",
            "",
            "MaTS is K-FAC with the exact Fisher, CG from task arithmetic's "
            "validation-chosen merge. ‖θ_m − θ_0‖ / ‖θ_0‖ is how far fine-tuning "
            "moved the body (mean over tasks); the gain is the fine-tuned model's "
            "test accuracy minus the pretrained body's with a refitted head "
            "(points, mean over tasks); the pretrained body is the merge that keeps "
            "no task vector (task arithmetic at scale 0), under the fine-tuned heads.",
            "",
            map_table(cells, arch),
            "",
            "Fisher kind of MaTS's K-FAC statistic (in brackets: minus RegMean), "
            "and the initialisation:",
            "",
            kind_table(cells, arch),
            "",
            "MaTS (K-FAC exact, init TA) after a fixed number of CG iterations "
            "(0 is task arithmetic's chosen merge), mean over seeds, and the count "
            "whose validation score was highest, per seed:",
            "",
            curve_table(cells, arch),
            "",
        ]
    lines += [
        "## Time per cell",
        "",
        "| cell | wall time |",
        "|---|---:|",
        *(
            f"| {c['length']}, {c['examples']} examples | {c['wall_s']:.0f} s |"
            for c in cells
        ),
        "",
    ]
    return "\n".join(lines)


def render(folder: Path, stem: str, saved: Mapping[str, Any]) -> None:
    picture = f"{stem}.png"
    plot(saved["cells"], saved["meta"]["architectures"], folder / picture)
    (folder / f"{stem}.md").write_text(markdown(saved, picture))


def _progress(cell: str, total: int, start: float) -> Any:
    """Prints each unit of work done, with the time since ``start``."""
    done = [0]

    def progress(description: str) -> None:
        done[0] += 1
        print(
            f"[{time.perf_counter() - start:7.1f} s] {cell}: "
            f"{done[0]:4d}/{total} {description}",
            flush=True,
        )

    return progress


def run_cell(cell: str, output: Path, seeds: str, architectures: str) -> None:
    """Runs one cell of the map in this process; writes its summary to ``output``."""
    length, n = cell.split("/")
    archs = tuple(architectures.split(","))
    cfg = cell_config(length, int(n), tuple(int(s) for s in seeds.split(",")), archs)
    start = time.perf_counter()
    results = pipeline.run(
        cfg, _progress(cell, pipeline.count_units(cfg), start), keep_models=True
    )
    summary = {
        "length": length,
        "examples": int(n),
        "epochs": {a: EPOCHS[a][length] for a in archs},
        "runs": [summarise_run(r) for r in results["runs"]],
        "wall_s": time.perf_counter() - start,
    }
    # Written whole or not at all: a killed cell leaves no file to resume from.
    partial = output.with_suffix(".partial")
    partial.write_text(json.dumps(summary, indent=1, default=float))
    partial.replace(output)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="one seed, the MLP, 2 cells"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--architectures", default="mlp,vit")
    parser.add_argument(
        "--render",
        action="store_true",
        help="rewrite the markdown and plot from the JSON",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for the results (default benchmarks/results/; --quick: under "
        "the temporary directory)",
    )
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # LENGTH/N: one cell
    parser.add_argument("--cell-output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cell-seeds", help=argparse.SUPPRESS)
    add_dirty_option(parser)
    args = parser.parse_args(argv)
    stem = "regime_map_quick" if args.quick else "regime_map"
    folder = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    if args.render:
        render(folder, stem, json.loads((folder / f"{stem}.json").read_text()))
        return
    if args.cell:
        run_cell(args.cell, args.cell_output, args.cell_seeds, args.architectures)
        return
    revision = check_destination(folder / stem, args.allow_dirty)
    archs = (
        ("mlp",)
        if args.quick
        else tuple(a.strip() for a in args.architectures.split(","))
    )
    seeds = (0,) if args.quick else tuple(range(args.seeds))
    grid = QUICK_CELLS if args.quick else CELLS
    configs = [cell_config(length, n, seeds, archs) for length, n in grid]
    for cfg in configs:  # names, data packages, sizes: before any training
        pipeline.validate(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    load_start = list(os.getloadavg())
    start = time.perf_counter()
    # One process per cell: a cell's compilations and arrays are freed when it
    # ends (one process for every cell ran out of memory on 24 GiB), and a
    # finished cell is kept (under the temporary directory, by commit) so that
    # a run stopped midway resumes from the next cell.
    kept = CELL_FILES / revision.split()[0] / stem
    kept.mkdir(parents=True, exist_ok=True)
    cells = []
    for length, n in grid:
        path = kept / f"{length}_{n}.json"
        if not path.exists() or " " in revision:  # a dirty tree: never reuse
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--cell",
                    f"{length}/{n}",
                    "--cell-output",
                    str(path),
                    "--cell-seeds",
                    ",".join(map(str, seeds)),
                    "--architectures",
                    ",".join(archs),
                ],
                check=True,
            )
        else:
            print(f"{length}/{n}: kept from {path}", flush=True)
        cells.append(json.loads(path.read_text()))
    meta = {
        **experiment_meta(
            "regime_map.py", revision, load_start, time.perf_counter() - start
        ),
        "architectures": list(archs),
        "seeds": list(seeds),
        "methods": list(METHODS),
        "config": json.loads(json.dumps(dataclasses.asdict(configs[0]), default=str)),
    }
    saved = {"meta": meta, "cells": cells}
    # The raw results first: the markdown can be re-rendered from them (--render).
    (folder / f"{stem}.json").write_text(json.dumps(saved, indent=1, default=float))
    render(folder, stem, saved)
    print(f"wrote {folder / stem}.md, .json and plot in {meta['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
