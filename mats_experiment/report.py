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

from mats_experiment.metrics import mean_and_spread, normalised

__all__ = [
    "gain_warnings",
    "markdown_table",
    "plot_cg_curve",
    "plot_normalised",
    "summarise",
]

SETTINGS = ("multitask", "intermediate")


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


def plot_normalised(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Bar chart: average normalised test accuracy per method (± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({r["architecture"] for r in rows})
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    fig, axes = plt.subplots(
        len(archs),
        len(settings),
        figsize=(7 * len(settings), 4.5 * len(archs)),
        squeeze=False,
    )
    for i, arch in enumerate(archs):
        for j, setting in enumerate(settings):
            _bars(axes[i][j], rows, arch, setting)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax: Any, rows: Sequence[Mapping[str, Any]], arch: str, setting: str) -> None:
    """One panel: a bar per method, MaTS variants in red."""
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
            "tab:red" if r["method"].startswith("mats") else "tab:blue" for r in chosen
        ],
    )
    ax.set_yticks(y, [r["label"] for r in chosen], fontsize=7)
    low = min(r["normalised"][0] - r["normalised"][1] for r in chosen)
    ax.set_xlim(max(0.0, low - 5), 105)
    ax.axvline(100, color="k", lw=0.5)
    ax.set_xlabel("average normalised test accuracy (%)")
    ax.set_title(f"{arch.upper()}, {setting}")


def plot_cg_curve(results: Mapping[str, Any], path: Path) -> None:
    """MaTS (K-FAC exact, init task arithmetic) accuracy against CG iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({r["architecture"] for r in results["runs"] if r["cg_curve"]})
    fig, axes = plt.subplots(
        1, max(1, len(archs)), figsize=(5 * max(1, len(archs)), 4), squeeze=False
    )
    for ax, arch in zip(axes[0], archs, strict=False):
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
            (line,) = ax.plot(iters, test, marker="o", label=f"seed {run['seed']} test")
            ax.plot(
                iters,
                val,
                ls="--",
                color=line.get_color(),
                label=f"seed {run['seed']} val",
            )
        ax.set_xscale("log")
        ax.set_xlabel("CG iterations (0 plotted at 0.5: the task-arithmetic init)")
        ax.set_ylabel("average normalised accuracy (%)")
        ax.set_title(f"{arch.upper()}: MaTS (K-FAC exact) vs iterations")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
