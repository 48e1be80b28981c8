"""Benchmark: when MaTS pays off on the real pretrained transformer, a regime map.

The real-model half of ``benchmarks/regime_map.py``: the lead of MaTS
(K-FAC, CG from task arithmetic) over RegMean and task arithmetic in
multitask merging of the four WordNet tasks of ``benchmarks/real_model.py``
(MiniLM-L6's first two layers, the checkpoint's tokenizer, a head per task on
the [CLS] state), along the axes a user controls:

* fine-tuning length: short, moderate (the real-model benchmark's 5 epochs)
  and long (``EPOCHS``), with the statistics from 128 examples per task;
* examples behind each statistic: 32, 128 and 512 per task, at the
  moderate length;
* in every cell: the Fisher kind of MaTS's K-FAC statistic (exact and
  empirical) and CG's iteration count (10 or 30, chosen on validation).

Every hyperparameter is chosen on validation splits; test accuracies are
only reported. Each cell also records what explains it: how far fine-tuning
moved the body (‖θ_m − θ_0‖ / ‖θ_0‖, mean over tasks) and what it gained
over the frozen pretrained body with a refitted head.

Run it from the repository root, after ``apt-get install wordnet-base`` and
``pip install -e '.[dev]'``::

    python benchmarks/real_regime_map.py           # 3 seeds, 5 cells, about 50 min
    python benchmarks/real_regime_map.py --quick   # one seed, 1 layer, 2 cells

Writes ``benchmarks/results/real_regime_map.{md,json}`` from a committed tree
only (``--allow-dirty`` to record anyway); ``--quick`` under the temporary
directory, ``--out DIR`` anywhere; ``--render`` rewrites the markdown from
the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from provenance import (
    QUICK_RESULTS,
    RESULTS,
    add_dirty_option,
    check_destination,
    experiment_header,
    experiment_meta,
)
from real_model import GRIDS, TASKS, minilm_folder

from mats_experiment import report, text_pipeline, train
from mats_experiment.methods import Grids

EPOCHS = {"short": 2, "moderate": 5, "long": 15}
"""Fine-tuning epochs per length; moderate is ``benchmarks/real_model.py``'s."""

CELLS = (
    ("short", 128),
    ("moderate", 128),
    ("long", 128),
    ("moderate", 32),
    ("moderate", 512),
)
"""(fine-tuning length, examples per statistic), fixed before any run."""

METHOD_NAMES = ("task_arithmetic", "regmean", "mats_kfac", "mats_kfac_empirical")
KINDS = {"mats_kfac_empirical": "empirical"}
"""The Fisher kinds' two ends: the model's own distribution and the gold label
(sampled, between them on the image map, left out for time)."""

REAL_GRIDS = dataclasses.replace(GRIDS, cg_iterations=(10, 30))
"""The real-model benchmark's grids, CG cut to (10, 30) iterations: each CG
step of four tasks' K-FAC systems over the 2 layers is about 44 GFLOP, so
(10, 30, 100) would cost 140 steps per candidate set (about 2 min on 2 cores,
per method, cell and seed); validation chose 100 in 1 of 3 seeds there."""
MATS = "mats_kfac"
REFERENCES = ("regmean", "task_arithmetic")


def cell_name(length: str, examples: int) -> str:
    return f"{length} ({EPOCHS[length]} epoch{'s' * (EPOCHS[length] != 1)}), {examples} examples"


def config(
    length: str, examples: int, quick: bool, seeds: tuple[int, ...], layers: int
) -> text_pipeline.TextExperimentConfig:
    training = train.TrainConfig(
        epochs=EPOCHS[length], batch_size=32, learning_rate=3e-4, weight_decay=0.01
    )
    if quick:
        return text_pipeline.TextExperimentConfig(
            folder=minilm_folder(),
            tasks=TASKS[:2],
            pooling="cls",
            layers=1,
            seeds=(0,),
            training=training,
            stat_examples=min(examples, 64),
            methods=("task_arithmetic", "regmean", "mats_kfac"),
            grids=Grids(scale=(0.5, 1.0), alpha=(0.9,), cg_iterations=(10, 30)),
        )
    return text_pipeline.TextExperimentConfig(
        folder=minilm_folder(),
        tasks=TASKS,
        pooling="cls",
        layers=layers,
        seeds=seeds,
        training=training,
        stat_examples=examples,
        methods=METHOD_NAMES,
        grids=REAL_GRIDS,
    )


def relative_movement(models: dict[str, Any]) -> float:
    """‖θ_m − θ_0‖ / ‖θ_0‖ of the body, mean over tasks (float leaves only)."""
    base = [np.asarray(x, np.float64) for x in jax.tree.leaves(models["pretrained"])]
    norm = np.sqrt(sum(float(np.sum(b * b)) for b in base if b.dtype.kind == "f"))
    out = []
    for tuned in models["finetuned"].values():
        leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tuned["body"])]
        diff = sum(
            float(np.sum((t - b) ** 2))
            for t, b in zip(leaves, base, strict=True)
            if b.dtype.kind == "f"
        )
        out.append(np.sqrt(diff) / norm)
    return float(np.mean(out))


def run_cell(cfg: text_pipeline.TextExperimentConfig, progress: Any) -> dict[str, Any]:
    """One cell: the pipeline's runs (models dropped) and each seed's movement."""
    results = text_pipeline.run(cfg, progress, keep_models=True)
    movement = []
    for run in results["runs"]:
        movement.append(relative_movement(run.pop("models")))
    return {"runs": results["runs"], "movement": movement}


# --------------------------------------------------------------------------
# The markdown
# --------------------------------------------------------------------------


def _mean_sd(values: list[float], signed: bool = False) -> str:
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):{'+' if signed else ''}.2f} ± {sd:.2f}"


def cell_rows(cell: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method: label, per-seed normalised test accuracy, chosen hyperparameters."""
    out: dict[str, dict[str, Any]] = {}
    for run in cell["runs"]:
        own = {t: r["finetuned_test"] for t, r in run["tasks"].items()}
        for name, result in run["multitask"].items():
            entry = out.setdefault(
                name, {"label": result["label"], "normalised": [], "chosen": []}
            )
            entry["normalised"].append(
                float(np.mean([100.0 * result["test"][t] / own[t] for t in own]))
            )
            entry["chosen"].append(result["chosen"])
    return out


def frozen_body(cell: dict[str, Any]) -> list[float]:
    """Per seed: the frozen pretrained body with a refitted head, normalised."""
    return [
        float(
            np.mean(
                [
                    100.0 * r["pretrained_test"] / r["finetuned_test"]
                    for r in run["tasks"].values()
                ]
            )
        )
        for run in cell["runs"]
    ]


def gains(cell: dict[str, Any]) -> float:
    return float(
        np.mean([r["gain_test"] for run in cell["runs"] for r in run["tasks"].values()])
    )


def difference(rows: dict[str, dict[str, Any]], a: str, b: str) -> str:
    d = [
        x - y for x, y in zip(rows[a]["normalised"], rows[b]["normalised"], strict=True)
    ]
    return f"{_mean_sd(d, signed=True)} ({sum(v > 0 for v in d)}/{len(d)})"


def map_table(cells: dict[str, dict[str, Any]]) -> list[str]:
    first = next(iter(cells.values()))
    names = [n for n in METHOD_NAMES if n in cell_rows(first)]
    labels = [cell_rows(first)[n]["label"] for n in names]
    lines = [
        "| cell | ‖θ_m − θ_0‖ / ‖θ_0‖ | fine-tuning gain | frozen body | "
        + " | ".join(labels)
        + " | MaTS − RegMean | MaTS − task arithmetic | CG iterations chosen |",
        "|---|---:|---:|---:|" + "---:|" * len(names) + "---:|---:|---|",
    ]
    for name, cell in cells.items():
        rows = cell_rows(cell)
        cg = [str(c.get("cg_iterations", "–")) for c in rows[MATS]["chosen"]]
        lines.append(
            f"| {name} | {np.mean(cell['movement']):.4f} | {gains(cell):.1f} | "
            f"{np.mean(frozen_body(cell)):.1f} | "
            + " | ".join(f"{np.mean(rows[n]['normalised']):.1f}" for n in names)
            + f" | {difference(rows, MATS, 'regmean')} | "
            f"{difference(rows, MATS, 'task_arithmetic')} | {', '.join(cg)} |"
        )
    return lines


def conclusions(cells: dict[str, dict[str, Any]]) -> list[str]:
    """Read from the numbers: where MaTS leads RegMean by ≥ 1 on every seed,
    trails it so, or neither; which Fisher kind is better; the best merge."""
    ahead, behind, within = [], [], []
    kinds, best = [], []
    for name, cell in cells.items():
        rows = cell_rows(cell)
        d = [
            x - y
            for x, y in zip(
                rows[MATS]["normalised"], rows["regmean"]["normalised"], strict=True
            )
        ]
        entry = f"{name} ({np.mean(d):+.2f})"
        if min(d) >= 1.0:
            ahead.append(entry)
        elif max(d) <= -1.0:
            behind.append(entry)
        else:
            within.append(entry)
        for other, kind in KINDS.items():
            if other not in rows:
                continue
            e = [
                x - y
                for x, y in zip(
                    rows[MATS]["normalised"], rows[other]["normalised"], strict=True
                )
            ]
            kinds.append(
                f"{name}: exact − {kind} {np.mean(e):+.2f} ({sum(v > 0 for v in e)}/{len(e)})"
            )
        top = max(rows.values(), key=lambda r: np.mean(r["normalised"]))
        best.append(f"{name}: {top['label']} {np.mean(top['normalised']):.1f}")
    counts = [
        c.get("cg_iterations")
        for cell in cells.values()
        for c in cell_rows(cell)[MATS]["chosen"]
    ]
    grid = next(iter(cells.values()))["runs"][0]["multitask"][MATS]["trials"]
    largest = max(
        (t["hyperparameters"].get("cg_iterations", 0) for t in grid), default=None
    )
    edge = (
        [
            f"- Validation chose the grid's largest CG count ({largest}) for MaTS "
            f"(K-FAC exact) in {sum(c == largest for c in counts)} of {len(counts)} "
            "runs: a larger count might have scored higher."
        ]
        if largest
        else []
    )
    return [
        "- MaTS (K-FAC exact, init TA) ahead of RegMean by ≥ 1 normalised point on every "
        f"seed in: {'; '.join(ahead) or 'no cell'}. Behind by ≥ 1 on every seed in: "
        f"{'; '.join(behind) or 'no cell'}. Neither in: {'; '.join(within) or 'no cell'}.",
        f"- Fisher kind of MaTS's K-FAC statistic: {'; '.join(kinds)}.",
        f"- First merge per cell (mean over seeds): {'; '.join(best)}.",
        *edge,
    ]


def markdown(saved: dict[str, Any]) -> str:
    meta, cells = saved["meta"], saved["cells"]
    arch = next(iter(cells.values()))["runs"][0]["architecture"]
    lines = [
        "# Benchmark: when MaTS pays off on the real transformer, a regime map "
        "(`benchmarks/real_regime_map.py`)",
        "",
        *experiment_header(meta),
        "",
        f"Multitask merging of the four WordNet tasks of `benchmarks/real_model.py` on "
        f"{arch} (the pretrained MiniLM-L6 BERT, the checkpoint's tokenizer, a head per "
        "task on the [CLS] state), one cell per fine-tuning length and number of "
        "examples behind each statistic. Numbers are average normalised test accuracy "
        "(100 = every task's own fine-tuned model), mean over seeds; a difference is "
        "mean ± sample standard deviation over seeds, with the seeds on which the "
        "first method was ahead in brackets. Every hyperparameter, CG's iteration "
        "count included, was chosen on validation; the cells, epochs and grids were "
        "fixed before the first run. The frozen body is the pretrained body with a "
        "head refitted per task (no merge); the gain is the fine-tuned model's test "
        "accuracy minus it (points, mean over tasks).",
        "",
        "## Conclusions",
        "",
        *conclusions(cells),
        "",
        "## The map",
        "",
        *map_table(cells),
        "",
        "## Grids",
        "",
        *(f"- {line}" for line in report.grid_summary(meta["methods"], meta["grids"])),
        "",
        "## Seconds per stage, per cell (mean over seeds)",
        "",
        "| cell | " + " | ".join(meta["stages"]) + " |",
        "|---|" + "---:|" * len(meta["stages"]),
        *(
            f"| {name} | "
            + " | ".join(
                f"{np.mean([r['timings_s'].get(s, 0.0) for r in cell['runs']]):.0f}"
                for s in meta["stages"]
            )
            + " |"
            for name, cell in cells.items()
        ),
        "",
    ]
    return "\n".join(lines)


def render(folder: Path, stem: str, saved: dict[str, Any]) -> None:
    (folder / f"{stem}.md").write_text(markdown(saved))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="one seed, 1 layer, 2 cells"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--render", action="store_true", help="rewrite the markdown from the JSON"
    )
    parser.add_argument("--out", type=Path, help="folder for the results")
    add_dirty_option(parser)
    args = parser.parse_args(argv)
    stem = "real_regime_map_quick" if args.quick else "real_regime_map"
    folder = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    if args.render:
        render(folder, stem, json.loads((folder / f"{stem}.json").read_text()))
        return
    revision = check_destination(folder / stem, args.allow_dirty)
    seeds = tuple(range(args.seeds))
    cells = CELLS[:2] if args.quick else CELLS
    configs = {
        cell_name(length, n): config(length, n, args.quick, seeds, args.layers)
        for length, n in cells
    }
    for cfg in configs.values():
        text_pipeline.validate(cfg)  # names, files, sizes: before any model is read
    folder.mkdir(parents=True, exist_ok=True)
    load_start = list(os.getloadavg())
    start = time.perf_counter()

    def progress(description: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {description}", flush=True)

    out: dict[str, Any] = {}
    for name, cfg in configs.items():
        progress(f"cell {name}")
        out[name] = run_cell(cfg, progress)
    first = next(iter(configs.values()))
    stages = sorted(
        {s for c in out.values() for r in c["runs"] for s in r["timings_s"]}
    )
    meta = {
        **experiment_meta(
            "real_regime_map.py", revision, load_start, time.perf_counter() - start
        ),
        "seeds": list(first.seeds),
        "methods": list(first.methods),
        "grids": dataclasses.asdict(first.grids),
        "stages": stages,
        "configs": {
            n: json.loads(json.dumps(dataclasses.asdict(c), default=str))
            for n, c in configs.items()
        },
    }
    saved = {"meta": meta, "cells": out}
    (folder / f"{stem}.json").write_text(json.dumps(saved, indent=1, default=float))
    render(folder, stem, saved)
    print(f"wrote {folder / stem}.md and .json in {meta['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
