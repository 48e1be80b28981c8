"""Benchmark: where MaTS's CG steps help and where they hurt, leaf group by leaf group.

On the MLP and the ViT of ``benchmarks/merging.py`` (same tasks, models,
pretraining, fine-tuning and K-FAC exact statistics from 256 examples per
task), multitask merging: CG starts from task arithmetic at its
validation-chosen scale (the init θ⁰) and runs k = 10, 50, 200 iterations
(θᵏ). For each group of leaves g (a module: its kernel and bias, a norm's
scale and bias, an embedding) it measures, on the validation splits only:

* **moving g alone**: the score of θ⁰ with group g replaced by θᵏ's, minus
  the score of θ⁰ — what CG's change to g does by itself;
* **holding g back**: the score of θᵏ with group g reset to θ⁰'s, minus the
  score of θᵏ — what undoing it recovers;
* **how far CG moved g**: ‖θᵏ_g − θ⁰_g‖ / ‖θ⁰_g − θ_0,g‖ (θ_0 the pretrained
  body), the relative residual CG reached on it (its report's final over
  initial residual, the largest over its blocks), and the spread of the
  statistic's scale across tasks (smallest task's mean diagonal ÷ the
  median task's).

Per task, the change of its normalised validation accuracy from θ⁰ to θᵏ
says which tasks pay. Then, relative damping toward the init: the score
after k iterations of (Σ_m C_m + δτ I) θ = Σ_m C_m θ_m + δτ θ⁰ (τ the mean
diagonal of Σ_m C_m per block) for δ in ``DAMPING``, which keeps the
directions of small curvature near the init. The score is the mean normalised validation accuracy
(100 = every task's own fine-tuned model), the one validation chooses by.

Run from the repository root::

    python benchmarks/cg_diagnosis.py           # 3 seeds, MLP and ViT
    python benchmarks/cg_diagnosis.py --quick   # one seed, the MLP

Writes ``benchmarks/results/cg_diagnosis.{md,json}`` (``--quick``: under the
temporary directory; ``--out DIR`` anywhere), from a committed tree only
(``--allow-dirty`` to record anyway); ``--render`` rewrites the markdown from
the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import warnings
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

import mats_jax
from mats_experiment import data, pipeline
from mats_jax.typing import Params

ITERATIONS = (10, 50, 200)
DAMPING = (0.0, 1e-2, 1e-1, 1.0, 10.0)
"""Relative damping δ toward the init: δ × the mean diagonal of Σ_m C_m, per block."""


def leaf_paths(tree: Params) -> list[str]:
    """Every leaf's path, ``/``-joined, in ``jax.tree.leaves`` order.

    Examples:
      >>> leaf_paths({"b": {"kernel": 1, "bias": 2}, "a": 3})
      ['a', 'b/bias', 'b/kernel']
    """
    return [
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def group_of(path: str) -> str:
    """A leaf's group: its module (the path without the parameter's own name).

    Examples:
      >>> group_of("blocks/attention/key/kernel"), group_of("position")
      ('blocks/attention/key', 'position')
    """
    head, _, name = path.rpartition("/")
    return head if name in ("kernel", "bias", "scale", "embedding") and head else path


def splice(into: Params, source: Params, paths: Sequence[str], group: str) -> Params:
    """``into`` with the leaves of ``group`` taken from ``source``."""
    a, treedef = jax.tree.flatten(into)
    b = jax.tree.leaves(source)
    return jax.tree.unflatten(
        treedef,
        [y if group_of(p) == group else x for p, x, y in zip(paths, a, b, strict=True)],
    )


def _norm(leaves: Sequence[Any]) -> float:
    return float(
        np.sqrt(
            sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in leaves)
        )
    )


def diagnose(prepared: pipeline.Prepared, grids: Any, progress: Any) -> dict[str, Any]:
    """The measurements of one (architecture, seed): see the module's docstring."""
    everything = range(len(prepared.tasks))
    stats = prepared.statistics["kfac_exact"]
    base, bodies = prepared.base, prepared.bodies

    def score(body: Params) -> tuple[float, dict[str, float]]:
        return prepared.normalised_score(body, everything, "val")

    chosen: dict[str, Params] = {}
    ta = pipeline.search_methods(
        ["task_arithmetic"],
        grids,
        base,
        bodies,
        {},
        [tuple(1.0 for _ in bodies)],
        score,
        lambda body: {},
        jax.random.key(0),
        progress,
        "task arithmetic",
        curve_test=False,
        chosen_bodies=chosen,
    )["task_arithmetic"]
    init = chosen["task_arithmetic"]
    paths = leaf_paths(init)
    groups = list(dict.fromkeys(group_of(p) for p in paths))
    init_score, init_acc = score(init)
    own_val = {t: v["finetuned_val"] for t, v in prepared.per_task.items()}
    scales = [mats_jax.statistic_scales(s) for s in stats]

    def spread(group: str) -> float | None:
        ratios = []
        for p in paths:
            if group_of(p) != group or any(s.get(p) is None for s in scales):
                continue
            v = np.asarray([float(s[p]) for s in scales])  # type: ignore[arg-type]
            ratios.append(float(v.min() / np.median(v)))
        return min(ratios) if ratios else None

    leaves0, leaves_init = jax.tree.leaves(base), jax.tree.leaves(init)
    out: dict[str, Any] = {
        "task_arithmetic_scale": ta["chosen"]["scale"],
        "init_val": init_score,
        # The pretrained body under every task's fine-tuned head: task
        # arithmetic at scale 0, the merge that keeps no task vector.
        "base_val": score(base)[0],
        "groups": groups,
        "scale_spread": {g: spread(g) for g in groups},
        "iterations": [],
    }
    for k in ITERATIONS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mats_jax.ConvergenceWarning)
            result = mats_jax.mats(bodies, stats, init=init, maxiter=k, tol=1e-6)
        full = result.params
        full_score, full_acc = score(full)
        reports = jax.tree.leaves(
            result.report, is_leaf=lambda x: isinstance(x, mats_jax.LeafReport)
        )
        leaves_full = jax.tree.leaves(full)
        per_group = {}
        for g in groups:
            idx = [i for i, p in enumerate(paths) if group_of(p) == g]
            moved = _norm([leaves_full[i] - leaves_init[i] for i in idx])
            from_base = _norm([leaves_init[i] - leaves0[i] for i in idx])
            residuals = [
                float(
                    np.max(
                        np.asarray(reports[i].final_residual)
                        / np.maximum(np.asarray(reports[i].initial_residual), 1e-30)
                    )
                )
                for i in idx
                if reports[i].final_residual is not None
            ]
            per_group[g] = {
                "solver": sorted({reports[i].solver for i in idx}),
                "relative_move": moved / from_base if from_base > 0 else None,
                "relative_residual": max(residuals) if residuals else None,
                "moving_alone": score(splice(init, full, paths, g))[0] - init_score,
                "holding_back": score(splice(full, init, paths, g))[0] - full_score,
            }
        out["iterations"].append(
            {
                "iterations": k,
                "val": full_score,
                "per_task": {
                    t: 100.0 * (full_acc[t] - init_acc[t]) / own_val[t]
                    for t in init_acc
                },
                "groups": per_group,
            }
        )
        progress(f"{k} iterations: {full_score:.1f} (init {init_score:.1f})")
    out["damping"] = []
    for delta in DAMPING:
        for k in ITERATIONS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", mats_jax.ConvergenceWarning)
                damped = mats_jax.mats(
                    bodies, stats, init=init, maxiter=k, tol=1e-6, damping=delta
                ).params
            out["damping"].append(
                {"damping": delta, "iterations": k, "val": score(damped)[0]}
            )
        progress(f"damping {delta:g}")
    return out


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _fmt(value: float | None, spec: str = "+.2f") -> str:
    return "—" if value is None else format(value, spec)


def _damped(run: Mapping[str, Any], delta: float, k: int) -> float:
    return next(
        p["val"]
        for p in run["damping"]
        if p["damping"] == delta and p["iterations"] == k
    )


def arch_section(runs: Sequence[Mapping[str, Any]], arch: str) -> list[str]:
    groups = runs[0]["groups"]
    by_k = {
        k: [next(p for p in r["iterations"] if p["iterations"] == k) for r in runs]
        for k in ITERATIONS
    }
    lines = [
        f"## {arch.upper()}",
        "",
        "Mean normalised validation accuracy of the init (task arithmetic at "
        "scale "
        + ", ".join(f"{r['task_arithmetic_scale']:g}" for r in runs)
        + f" per seed): {np.mean([r['init_val'] for r in runs]):.2f}"
        + (
            f" (the pretrained body under the fine-tuned heads, task arithmetic at "
            f"scale 0: {np.mean([r['base_val'] for r in runs]):.2f})"
            if "base_val" in runs[0]
            else ""
        )
        + "; after "
        + ", ".join(
            f"{k} iterations {np.mean([p['val'] for p in by_k[k]]):.2f}"
            for k in ITERATIONS
        )
        + ".",
        "",
        "Per leaf group, mean over seeds: the change of that score from moving "
        "the group alone to CG's value (from the init) and from holding it back "
        "at the init (from CG's merge), the distance CG moved it relative to the "
        "init's distance from the pretrained body, the relative residual CG "
        "reached on it, and the smallest task's statistic scale over the "
        "median task's.",
        "",
        "| group | solver | scale spread | "
        + " | ".join(f"moving alone, {k} its" for k in ITERATIONS)
        + f" | holding back, {ITERATIONS[-1]} its | "
        + " | ".join(f"moved, {k} its" for k in ITERATIONS)
        + f" | residual, {ITERATIONS[-1]} its |",
        "|---|---|---:|" + "---:|" * (2 * len(ITERATIONS) + 2),
    ]
    last = ITERATIONS[-1]
    for g in groups:
        cells = [
            f"`{g}`",
            ", ".join(by_k[last][0]["groups"][g]["solver"]),
            _fmt(_mean([r["scale_spread"][g] for r in runs]), ".3f"),
            *(
                _fmt(_mean([p["groups"][g]["moving_alone"] for p in by_k[k]]))
                for k in ITERATIONS
            ),
            _fmt(_mean([p["groups"][g]["holding_back"] for p in by_k[last]])),
            *(
                _fmt(_mean([p["groups"][g]["relative_move"] for p in by_k[k]]), ".3f")
                for k in ITERATIONS
            ),
            _fmt(
                _mean([p["groups"][g]["relative_residual"] for p in by_k[last]]), ".2e"
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += (
        []
        if "damping" not in runs[0]
        else [
            "",
            "Relative damping toward the init, (Σ_m C_m + δ τ I) θ = Σ_m C_m θ_m + δ τ θ⁰ "
            "with τ the mean diagonal of Σ_m C_m per block: the score after k "
            f"iterations (mean over seeds; the init scores {np.mean([r['init_val'] for r in runs]):.2f}):",
            "",
            "| δ | " + " | ".join(f"{k} its" for k in ITERATIONS) + " |",
            "|---|" + "---:|" * len(ITERATIONS),
            *(
                f"| {delta:g} | "
                + " | ".join(
                    f"{np.mean([_damped(r, delta, k) for r in runs]):.2f}"
                    for k in ITERATIONS
                )
                + " |"
                for delta in DAMPING
            ),
        ]
    )
    tasks = list(by_k[last][0]["per_task"])
    lines += [
        "",
        "Per task, the change of its normalised validation accuracy from the init "
        "to CG's merge (mean over seeds):",
        "",
        "| task | " + " | ".join(f"{k} its" for k in ITERATIONS) + " |",
        "|---|" + "---:|" * len(ITERATIONS),
        *(
            f"| {t} | "
            + " | ".join(
                f"{np.mean([p['per_task'][t] for p in by_k[k]]):+.2f}"
                for k in ITERATIONS
            )
            + " |"
            for t in tasks
        ),
        "",
    ]
    return lines


def _listed(names: Sequence[str], change: Mapping[str, float]) -> str:
    return ", ".join(f"`{g}` ({change[g]:+.2f})" for g in names) or "none"


def conclusions(by_arch: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    lines = []
    for arch, runs in by_arch.items():
        for k in ITERATIONS:
            points = [
                next(p for p in r["iterations"] if p["iterations"] == k) for r in runs
            ]
            change = np.mean(
                [p["val"] - r["init_val"] for p, r in zip(points, runs, strict=True)]
            )
            alone = {
                g: float(np.mean([p["groups"][g]["moving_alone"] for p in points]))
                for g in runs[0]["groups"]
            }
            order = sorted(alone, key=alone.__getitem__)
            hurt = [g for g in order if alone[g] < 0][:3]
            helped = [g for g in reversed(order) if alone[g] > 0][:3]
            tasks = {
                t: float(np.mean([p["per_task"][t] for p in points]))
                for t in points[0]["per_task"]
            }
            loser = min(tasks, key=tasks.__getitem__)

            lines.append(
                f"- **{arch.upper()}, {k} iterations**: {change:+.2f} points against the "
                f"init. Groups whose change alone lowers the score most: {_listed(hurt, alone)}; "
                f"raises it most: {_listed(helped, alone)}. The task that gains least: "
                f"{loser} ({tasks[loser]:+.2f})."
            )
    return lines


def markdown(saved: Mapping[str, Any]) -> str:
    meta = saved["meta"]
    by_arch: dict[str, list[Mapping[str, Any]]] = {}
    for run in saved["runs"]:
        by_arch.setdefault(run["architecture"], []).append(run)
    lines = [
        "# Benchmark: where MaTS's CG steps help and hurt, per leaf group (`benchmarks/cg_diagnosis.py`)",
        "",
        *experiment_header(meta),
        "",
        "Multitask merging of `benchmarks/merging.py`'s six tasks by MaTS (K-FAC "
        "exact, CG from task arithmetic's validation-chosen merge). Every number "
        "is on the validation splits: this is a diagnosis, nothing is chosen "
        "from it. Changes are in normalised points of the mean normalised "
        "validation accuracy.",
        "",
        "## Conclusions",
        "",
        "<!-- diagnosis: BEGIN conclusions -->",
        *conclusions(by_arch),
        "<!-- diagnosis: END conclusions -->",
        "",
    ]
    for arch, runs in by_arch.items():
        lines += arch_section(runs, arch)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, the MLP")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--architectures", default="mlp,vit")
    parser.add_argument(
        "--render", action="store_true", help="rewrite the markdown from the JSON"
    )
    parser.add_argument("--out", type=Path, help="folder for the results")
    add_dirty_option(parser)
    args = parser.parse_args(argv)
    stem = "cg_diagnosis_quick" if args.quick else "cg_diagnosis"
    folder = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    if args.render:
        saved = json.loads((folder / f"{stem}.json").read_text())
        (folder / f"{stem}.md").write_text(markdown(saved))
        return
    revision = check_destination(folder / stem, args.allow_dirty)
    archs = (
        ("mlp",)
        if args.quick
        else tuple(a.strip() for a in args.architectures.split(","))
    )
    seeds = (0,) if args.quick else tuple(range(args.seeds))
    cfg = dataclasses.replace(
        merging_config(False, seeds, archs),
        methods=("task_arithmetic", "mats_kfac"),
        intermediate_pairs=(),
    )
    pipeline.validate(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    sources = {
        name: data.load(name)
        for name in sorted({cfg.pretrain.source, *(t.source for t in cfg.tasks)})
    }
    load_start = list(os.getloadavg())
    start = time.perf_counter()

    def progress(description: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {description}", flush=True)

    runs = []
    for arch in archs:
        for seed in seeds:
            prepared = pipeline.prepare(cfg, arch, seed, sources, progress)
            runs.append(
                {
                    "architecture": arch,
                    "seed": seed,
                    **diagnose(prepared, cfg.grids, progress),
                }
            )
    meta = {
        **experiment_meta(
            "cg_diagnosis.py", revision, load_start, time.perf_counter() - start
        ),
        "seeds": list(seeds),
    }
    saved = {"meta": meta, "runs": runs}
    (folder / f"{stem}.json").write_text(json.dumps(saved, indent=1, default=float))
    (folder / f"{stem}.md").write_text(markdown(saved))
    print(f"wrote {folder / stem}.md and .json in {meta['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
