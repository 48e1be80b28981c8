"""Summaries of experiment results: per-method tables (markdown) and PNG plots.

:func:`summarise` turns the raw results of
:func:`mats_experiment.pipeline.run` into, per architecture, setting and
method, the test accuracy per task and the average accuracy and average
normalised accuracy (mean and sample standard deviation over seeds). Test
accuracies only appear here; every choice was made on validation splits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mats_experiment.methods import METHODS
from mats_experiment.metrics import mean_and_spread, normalised

__all__ = [
    "REFERENCES",
    "gain_warnings",
    "grid_summary",
    "head_to_head",
    "markdown_table",
    "plot_cg_curve",
    "plot_normalised",
    "row",
    "standing_table",
    "summarise",
]

SETTINGS = ("multitask", "intermediate")

REFERENCES = ("mats_kfac", "regmean", "ties")
"""The methods every other one is measured against: MaTS (K-FAC exact, init
task arithmetic), RegMean and TIES."""


def _setting_scores(run: Mapping[str, Any], setting: str) -> dict[str, dict[str, Any]]:
    """Per method: test accuracy per task and the normalised accuracies."""
    own = {t: v["finetuned_test"] for t, v in run["tasks"].items()}
    blocks = (
        [run["multitask"]]
        if setting == "multitask"
        else list(run["intermediate"].values())
    )
    out: dict[str, dict[str, Any]] = {}
    for block in blocks:
        for method, result in block.items():
            entry = out.setdefault(
                method, {"label": result["label"], "accuracy": {}, "normalised": {}}
            )
            for task, acc in result["test"].items():
                entry["accuracy"][task] = acc
                entry["normalised"][task] = normalised([acc], [own[task]])[0]
    return out


def summarise(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows (architecture, setting, method) with means and spreads over seeds.

    Each row has ``label``, ``tasks`` (task → mean test accuracy),
    ``accuracy`` and ``normalised`` (mean, std over seeds of the per-seed
    average over tasks) and ``seeds``.
    """
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for run in results["runs"]:
        for setting in SETTINGS:
            if setting == "intermediate" and not run["intermediate"]:
                continue
            for method, entry in _setting_scores(run, setting).items():
                row = rows.setdefault(
                    (run["architecture"], setting, method),
                    {
                        "architecture": run["architecture"],
                        "setting": setting,
                        "method": method,
                        "label": entry["label"],
                        "per_seed_accuracy": [],
                        "per_seed_normalised": [],
                        "task_accuracy": {},
                    },
                )
                row["per_seed_accuracy"].append(
                    float(np.mean(list(entry["accuracy"].values())))
                )
                row["per_seed_normalised"].append(
                    float(np.mean(list(entry["normalised"].values())))
                )
                for task, acc in entry["accuracy"].items():
                    row["task_accuracy"].setdefault(task, []).append(acc)
    out = []
    for row in rows.values():
        row["accuracy"] = mean_and_spread(row["per_seed_accuracy"])
        row["normalised"] = mean_and_spread(row["per_seed_normalised"])
        row["tasks"] = {
            t: float(np.mean(v)) for t, v in row.pop("task_accuracy").items()
        }
        row["seeds"] = len(row["per_seed_accuracy"])
        out.append(row)
    return out


def baseline_rows(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per architecture: pretrained (refitted heads) and fine-tuned test accuracy per task."""
    out: dict[str, dict[str, Any]] = {}
    for run in results["runs"]:
        arch = out.setdefault(run["architecture"], {"pretrained": {}, "finetuned": {}})
        for task, v in run["tasks"].items():
            arch["pretrained"].setdefault(task, []).append(v["pretrained_test"])
            arch["finetuned"].setdefault(task, []).append(v["finetuned_test"])
    return out


def gain_warnings(results: Mapping[str, Any], minimum: float = 5.0) -> list[str]:
    """A line per (architecture, seed, task) whose fine-tuning gained < ``minimum`` points.

    The gain is the fine-tuned model's test accuracy minus the pretrained
    body's with a refitted head.

    Examples:
      >>> run = {"architecture": "mlp", "seed": 0, "tasks": {"a": {"gain_test": 2.0,
      ...        "pretrained_test": 90.0, "finetuned_test": 92.0}}}
      >>> gain_warnings({"runs": [run]})
      ['mlp seed 0, task a: fine-tuned 92.0% vs pretrained (refitted head) 90.0%: gain 2.0 < 5.0 points']
    """
    lines = []
    for run in results["runs"]:
        for task, v in run["tasks"].items():
            if v["gain_test"] < minimum:
                lines.append(
                    f"{run['architecture']} seed {run['seed']}, task {task}: fine-tuned "
                    f"{v['finetuned_test']:.1f}% vs pretrained (refitted head) "
                    f"{v['pretrained_test']:.1f}%: gain {v['gain_test']:.1f} < {minimum} points"
                )
    return lines


def row(
    rows: Sequence[Mapping[str, Any]], arch: str, setting: str, method: str
) -> Mapping[str, Any] | None:
    """The summary row of ``method`` in one panel (architecture, setting), or None."""
    return next(
        (
            r
            for r in rows
            if r["architecture"] == arch
            and r["setting"] == setting
            and r["method"] == method
        ),
        None,
    )


def _differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> np.ndarray:
    """Per seed, ``a``'s average normalised accuracy minus ``b``'s."""
    return np.asarray(a["per_seed_normalised"]) - np.asarray(b["per_seed_normalised"])


def head_to_head(
    rows: Sequence[Mapping[str, Any]], arch: str, setting: str, a: str, b: str
) -> str:
    """Method ``a`` minus method ``b``: the mean, per seed, and seeds ``a`` was ahead.

    Empty where either did not run in that panel.

    Examples:
      >>> rows = [{"architecture": "mlp", "setting": "multitask", "method": m,
      ...          "label": m.upper(), "per_seed_normalised": v}
      ...         for m, v in (("x", [90.0, 92.0]), ("y", [91.0, 90.0]))]
      >>> head_to_head(rows, "mlp", "multitask", "x", "y")
      'X − Y: +0.50 normalised points (per seed -1.00, +2.00; ahead on 1/2 seeds)'
    """
    ra, rb = row(rows, arch, setting, a), row(rows, arch, setting, b)
    if ra is None or rb is None:
        return ""
    diffs = _differences(ra, rb)
    return (
        f"{ra['label']} − {rb['label']}: {diffs.mean():+.2f} normalised points "
        f"(per seed {', '.join(f'{d:+.2f}' for d in diffs)}; "
        f"ahead on {int(np.sum(diffs > 0))}/{diffs.size} seeds)"
    )


def standing_table(
    rows: Sequence[Mapping[str, Any]],
    arch: str,
    setting: str,
    references: Sequence[str] = REFERENCES,
) -> str:
    """Where every other method lands against the reference methods.

    A row per method of the panel that is not a reference, best first: its
    average normalised test accuracy and, per reference, the mean difference
    over seeds and on how many seeds it was ahead. Empty when no reference
    ran in the panel.

    Examples:
      >>> rows = [{"architecture": "mlp", "setting": "multitask", "method": m,
      ...          "label": m.upper(), "normalised": (sum(v) / 2, 0.0),
      ...          "per_seed_normalised": v}
      ...         for m, v in (("ties", [90.0, 92.0]), ("x", [91.0, 90.0]))]
      >>> print(standing_table(rows, "mlp", "multitask"))
      | method | avg. normalised | − TIES (ahead on) |
      |---|---|---|
      | X | 90.5 | -0.50 (1/2) |
    """
    present = [r for m in references if (r := row(rows, arch, setting, m)) is not None]
    if not present:
        return ""
    others = sorted(
        (
            r
            for r in rows
            if r["architecture"] == arch
            and r["setting"] == setting
            and r["method"] not in references
        ),
        key=lambda r: -r["normalised"][0],
    )
    lines = [
        "| method | avg. normalised | "
        + " | ".join(f"− {r['label']} (ahead on)" for r in present)
        + " |",
        "|---|---|" + "---|" * len(present),
    ]
    for r in others:
        cells = []
        for ref in present:
            diffs = _differences(r, ref)
            cells.append(f"{diffs.mean():+.2f} ({int(np.sum(diffs > 0))}/{diffs.size})")
        lines.append(
            f"| {r['label']} | {r['normalised'][0]:.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def grid_summary(names: Sequence[str], grids: Mapping[str, Sequence[Any]]) -> list[str]:
    """A line per method: the grid validation chose its hyperparameters from.

    ``grids`` is a :class:`~mats_experiment.methods.Grids` as a mapping (a
    results file's ``config["grids"]``).

    Examples:
      >>> grid_summary(["average", "ties"], {"density": [0.1, 0.2], "ties_scale": [1.0]})
      ['average: no hyperparameters', 'TIES: density ∈ {0.1, 0.2}; scale ∈ {1.0}']
    """
    lines = []
    for name in names:
        method = METHODS[name]
        swept = "; ".join(
            f"{hp} ∈ {{{', '.join(map(str, grids[field]))}}}"
            for hp, field in method.grid.items()
        )
        fixed = ", ".join(f"{k}={v}" for k, v in method.fixed.items())
        lines.append(
            f"{method.label}: {swept or 'no hyperparameters'}"
            + (f" (fixed: {fixed})" if fixed else "")
        )
    return lines


def _pm(pair: Sequence[float], seeds: int) -> str:
    return f"{pair[0]:.1f} ± {pair[1]:.1f}" if seeds > 1 else f"{pair[0]:.1f}"


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    architecture: str,
    setting: str,
    baselines: Mapping[str, Any] | None = None,
) -> str:
    """One markdown table: a row per method, a column per task, then the averages."""
    chosen = [
        r for r in rows if r["architecture"] == architecture and r["setting"] == setting
    ]
    if not chosen:
        return ""
    task_names = list(chosen[0]["tasks"])
    header = ["method", *task_names, "avg. accuracy", "avg. normalised"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    if baselines is not None and setting == "multitask":
        for name, label in (
            ("pretrained", "pretrained body, refitted heads"),
            ("finetuned", "fine-tuned (each task its own model)"),
        ):
            per_task = baselines[name]
            means = [float(np.mean(per_task[t])) for t in task_names]
            norm = "—" if name == "pretrained" else "100.0"
            lines.append(
                f"| {label} | "
                + " | ".join(f"{m:.1f}" for m in means)
                + f" | {np.mean(means):.1f} | {norm} |"
            )
    for r in sorted(chosen, key=lambda r: -r["normalised"][0]):
        lines.append(
            f"| {r['label']} | "
            + " | ".join(f"{r['tasks'].get(t, float('nan')):.1f}" for t in task_names)
            + f" | {_pm(r['accuracy'], r['seeds'])} | **{_pm(r['normalised'], r['seeds'])}** |"
        )
    return "\n".join(lines)


FONT_SIZE = 10
"""Points of every text of the plots (ticks, labels, legends) at their saved
size. The figures are 8 in wide, about a page column's width, so text shown
at the column's width keeps nearly that size; panels stack vertically."""

MATS_COLOR, OTHER_COLOR = "tab:red", "tab:blue"


def _panel_title(arch: str, setting: str) -> str:
    # "mlp" reads as MLP; a descriptive name ("MiniLM-L6, first 2 layers") as written.
    return f"{arch.upper() if arch.isalnum() else arch}, {setting}"


def plot_normalised(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Bar chart: average normalised test accuracy per method (± std over seeds).

    One panel per (architecture, setting), one above the other, and one
    legend over them: MaTS (any statistic, any initialisation) in red, every
    other method in blue, the error bar one sample standard deviation over
    the seeds either side of the mean (no bar for one seed), the dashed
    vertical line 100 (each task's own fine-tuned model).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    archs = sorted({r["architecture"] for r in rows})
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    panels = [
        (arch, setting)
        for arch in archs
        for setting in settings
        if any(r["architecture"] == arch and r["setting"] == setting for r in rows)
    ]
    bars = [
        sum(r["architecture"] == a and r["setting"] == s for r in rows)
        for a, s in panels
    ]
    legend_in = 0.6  # two rows of the legend, above the panels
    heights = [0.27 * n + 1.0 for n in bars]
    with plt.rc_context({"font.size": FONT_SIZE}):
        fig, axes = plt.subplots(
            len(panels),
            1,
            figsize=(8.0, sum(heights) + legend_in),
            squeeze=False,
            gridspec_kw={"height_ratios": heights},
        )
        for ax, (arch, setting) in zip(axes[:, 0], panels, strict=True):
            _bars(ax, rows, arch, setting)
        seeds = sorted({r["seeds"] for r in rows})
        handles = [
            Patch(color=MATS_COLOR, label="MaTS (any statistic, any init)"),
            Patch(color=OTHER_COLOR, label="every other method"),
            # Dashed, unlike the error bars' solid black.
            Line2D(
                [],
                [],
                color="0.3",
                lw=1.0,
                ls="--",
                label="100: each task's own fine-tuned model",
            ),
        ]
        if max(seeds) > 1:  # one seed has no spread, and no error bars
            over = f"{seeds[0]} seeds" if len(seeds) == 1 else "the seeds"
            handles.insert(
                2,
                Line2D(
                    [],
                    [],
                    color="k",
                    lw=1.5,
                    label=f"error bar: ± 1 standard deviation over {over}",
                ),
            )
        fig.legend(
            handles=handles,
            loc="upper center",
            ncol=2,
            frameon=False,
            bbox_to_anchor=(0.5, 1.0),
        )
        fig.tight_layout(rect=(0, 0, 1, 1 - legend_in / (sum(heights) + legend_in)))
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _bars(ax: Any, rows: Sequence[Mapping[str, Any]], arch: str, setting: str) -> None:
    """One panel: a bar per method, best at the top, MaTS variants in red."""
    from matplotlib.ticker import MaxNLocator

    chosen = sorted(
        (r for r in rows if r["architecture"] == arch and r["setting"] == setting),
        key=lambda r: r["normalised"][0],
    )
    y = np.arange(len(chosen))
    ax.barh(
        y,
        [r["normalised"][0] for r in chosen],
        xerr=[r["normalised"][1] for r in chosen],
        color=[
            MATS_COLOR if r["method"].startswith("mats") else OTHER_COLOR
            for r in chosen
        ],
        error_kw={"lw": 1.5},
    )
    ax.set_yticks(y, [r["label"] for r in chosen])
    ax.set_ylim(-0.6, len(chosen) - 0.4)
    low = min(r["normalised"][0] - r["normalised"][1] for r in chosen)
    ax.set_xlim(max(0.0, low - 5), 105)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=7, steps=[1, 2, 5, 10]))
    ax.axvline(100, color="0.3", lw=1.0, ls="--")
    ax.grid(axis="x", color="0.85", lw=0.6)
    ax.set_axisbelow(True)
    ax.set_xlabel("average normalised test accuracy (%)")
    ax.set_title(_panel_title(arch, setting))


def plot_cg_curve(results: Mapping[str, Any], path: Path) -> None:
    """MaTS (K-FAC exact, init task arithmetic) accuracy against CG iterations.

    One panel per architecture, one above the other: a colour per seed, its
    test accuracy solid with markers, its validation accuracy dashed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    archs = sorted({r["architecture"] for r in results["runs"] if r["cg_curve"]})
    with plt.rc_context({"font.size": FONT_SIZE}):
        fig, axes = plt.subplots(
            max(1, len(archs)),
            1,
            figsize=(8.0, 4.2 * max(1, len(archs))),
            squeeze=False,
        )
        for ax, arch in zip(axes[:, 0], archs, strict=False):
            seeds = []
            for run in (r for r in results["runs"] if r["architecture"] == arch):
                own = {t: v["finetuned_test"] for t, v in run["tasks"].items()}
                iters = [max(p["iterations"], 0.5) for p in run["cg_curve"]]
                test = [
                    float(
                        np.mean(
                            normalised(
                                list(p["test"].values()), [own[t] for t in p["test"]]
                            )
                        )
                    )
                    for p in run["cg_curve"]
                ]
                val = [p["val"] for p in run["cg_curve"]]
                (line,) = ax.plot(iters, test, marker="o")
                ax.plot(iters, val, ls="--", color=line.get_color())
                seeds.append(
                    Line2D(
                        [],
                        [],
                        color=line.get_color(),
                        lw=2,
                        label=f"seed {run['seed']}",
                    )
                )
            handles = [
                *seeds,
                Line2D([], [], color="0.3", marker="o", label="test"),
                Line2D([], [], color="0.3", ls="--", label="validation"),
            ]
            ax.set_xscale("log")
            ticks = sorted(
                {
                    max(p["iterations"], 0.5)
                    for r in results["runs"]
                    if r["architecture"] == arch
                    for p in r["cg_curve"]
                }
            )
            ax.set_xticks(ticks, [f"{t:g}" if t >= 1 else "0" for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("CG iterations (0, the task-arithmetic init, plotted at 0.5)")
            ax.set_ylabel("average normalised\naccuracy (%)")
            ax.set_title(
                f"{arch.upper() if arch.isalnum() else arch}: "
                "MaTS (K-FAC exact, init TA) against CG iterations"
            )
            ax.grid(color="0.9", lw=0.6)
            ax.legend(
                handles=handles,
                loc="upper left",
                bbox_to_anchor=(1.01, 1.0),
                frameon=False,
            )
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
