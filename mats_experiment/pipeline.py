"""The experiment: pretrain, fine-tune per task, gather statistics, merge, evaluate.

For each seed and architecture:

1. pretrain a classifier on the pretraining task;
2. per task, refit a linear head on the pretrained body (the *pretrained*
   baseline), then fine-tune every parameter from there (the task's own
   model, which normalised accuracy divides by);
3. per task, estimate the statistics the chosen methods need on
   ``stat_examples`` training examples of the fine-tuned model;
4. merge the bodies (each task keeps its own fine-tuned head) with every
   method and every candidate of its grid, choose the candidate on the
   validation splits, and report it on the test splits, in two settings:
   multitask (all tasks into one body, chosen by mean normalised validation
   accuracy) and intermediate-task (the body of task A merged, with weight w,
   into that of target task B; chosen and reported on B).

Everything that can be wrong with a configuration (method, task and source
names, missing data packages, too few examples for a statistic) is checked by
:func:`validate` before any training.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

import mats_jax
from mats_experiment import data, derived, methods, models, tasks, train
from mats_experiment.methods import METHODS, Grids, MergeInputs, Method
from mats_experiment.metrics import normalised
from mats_jax.typing import Params, StatTree

__all__ = [
    "MIN_STATISTIC_EXAMPLES",
    "ExperimentConfig",
    "ExperimentError",
    "Prepared",
    "count_units",
    "prepare",
    "run",
    "search_methods",
    "validate",
]

MIN_STATISTIC_EXAMPLES = 16
"""Fewest examples a per-task statistic may be estimated from."""

Progress = Callable[[str], None]


class ExperimentError(ValueError):
    """A configuration that cannot run: the message says what and where."""


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything an experiment run depends on.

    Attributes:
      architectures: "mlp" and/or "vit".
      pretrain: the pretraining task (its head is discarded).
      tasks: the merged tasks (at least two).
      seeds: one run per seed (data splits, initialisation, training order).
      pretrain_training, finetune_training: optimisation per architecture.
      stat_examples: training examples per task for the statistics.
      micro_batch_size: examples per jitted statistics step.
      methods: names of :data:`~mats_experiment.methods.METHODS`.
      grids: the validation grids.
      intermediate_pairs: (intermediate task A, target task B) name pairs.
      intermediate_weights: the weights w of A (B has weight 1).
      intermediate_methods: the methods compared in the intermediate setting,
        a subset of ``methods`` (None: all of them); the variants that sweep
        options of their own multiply that setting's candidates by the
        weights.
      curve_iterations: CG iteration counts for the accuracy-vs-iterations
        curve (multitask, MaTS K-FAC exact from task arithmetic).
      body_options: architecture → model size options.
    """

    architectures: tuple[str, ...]
    pretrain: tasks.TaskSpec
    tasks: tuple[tasks.TaskSpec, ...]
    seeds: tuple[int, ...] = (0,)
    pretrain_training: Mapping[str, train.TrainConfig] = dataclasses.field(
        default_factory=dict
    )
    finetune_training: Mapping[str, train.TrainConfig] = dataclasses.field(
        default_factory=dict
    )
    stat_examples: int = 256
    micro_batch_size: int = 64
    methods: tuple[str, ...] = tuple(METHODS)
    grids: Grids = dataclasses.field(default_factory=Grids)
    intermediate_pairs: tuple[tuple[str, str], ...] = ()
    intermediate_weights: tuple[float, ...] = (0.3, 1.0)
    intermediate_methods: tuple[str, ...] | None = None
    curve_iterations: tuple[int, ...] = (0, 3, 10, 30, 100, 300)
    body_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(
        default_factory=dict
    )


def statistics_needed(config: ExperimentConfig) -> list[str]:
    """The statistics to estimate from data for the configured methods, in a fixed order."""
    names = methods.check_methods(config.methods)
    wanted = {METHODS[n].statistic for n in names}
    wanted |= {methods.DERIVED[s] for s in wanted if s in methods.DERIVED}
    return [s for s in methods.STATISTICS if s in wanted]


def intermediate_methods(config: ExperimentConfig) -> list[str]:
    """The methods of the intermediate setting, in dependency order (see
    :func:`~mats_experiment.methods.check_methods`); empty without pairs."""
    if not config.intermediate_pairs:
        return []
    if config.intermediate_methods is None:
        return methods.check_methods(config.methods)
    chosen = methods.check_methods(config.intermediate_methods)
    missing = [n for n in chosen if n not in methods.check_methods(config.methods)]
    if missing:
        raise ExperimentError(
            f"intermediate_methods {', '.join(map(repr, missing))} not among methods "
            "(their statistics would not be estimated)"
        )
    return chosen


def _derived_needed(config: ExperimentConfig) -> list[str]:
    names = methods.check_methods(config.methods)
    wanted = {METHODS[n].statistic for n in names}
    return [s for s in methods.DERIVED if s in wanted]


def validate(config: ExperimentConfig) -> None:
    """Checks the whole configuration; raises before any data is read or model trained."""
    try:
        methods.check_methods(config.methods)
        intermediate_methods(config)
    except ValueError as error:
        raise ExperimentError(str(error)) from None
    for arch in config.architectures:
        if arch not in models.ARCHITECTURES:
            raise ExperimentError(
                f"unknown architecture {arch!r}; known: {', '.join(models.ARCHITECTURES)}"
            )
    if not config.architectures or not config.seeds:
        raise ExperimentError("at least one architecture and one seed are needed")
    if len(config.tasks) < 2:
        raise ExperimentError(
            f"merging needs at least two tasks, got {len(config.tasks)}"
        )
    specs = [config.pretrain, *config.tasks]
    try:
        tasks.check_specs(specs, list(data.SOURCES))
    except ValueError as error:
        raise ExperimentError(str(error)) from None
    names = {t.name for t in config.tasks}
    for a, b in config.intermediate_pairs:
        for n in (a, b):
            if n not in names:
                raise ExperimentError(
                    f"intermediate pair ({a!r}, {b!r}): unknown task {n!r}; tasks: "
                    f"{', '.join(sorted(names))}"
                )
        if a == b:
            raise ExperimentError(
                f"intermediate pair ({a!r}, {b!r}): A and B are one task"
            )
    if statistics_needed(config):
        if config.stat_examples < MIN_STATISTIC_EXAMPLES:
            raise ExperimentError(
                f"stat_examples={config.stat_examples}: a statistic needs at least "
                f"{MIN_STATISTIC_EXAMPLES} examples per task"
            )
        for t in config.tasks:
            if t.sizes[0] < config.stat_examples:
                raise ExperimentError(
                    f"task {t.name!r} has {t.sizes[0]} training examples, too few for "
                    f"stat_examples={config.stat_examples}"
                )
    for arch in config.architectures:
        for which, table in (
            ("pretrain_training", config.pretrain_training),
            ("finetune_training", config.finetune_training),
        ):
            cfg = table.get(arch, train.TrainConfig())
            for spec in config.tasks if which == "finetune_training" else specs[:1]:
                if spec.sizes[0] < cfg.batch_size:
                    raise ExperimentError(
                        f"task {spec.name!r}: {spec.sizes[0]} training examples are fewer "
                        f"than one batch ({which}[{arch!r}].batch_size={cfg.batch_size})"
                    )
    try:
        data.check_available({s.source for s in specs})
    except data.DataUnavailableError as error:
        raise ExperimentError(str(error)) from None


def count_units(config: ExperimentConfig) -> int:
    """Progress units of :func:`run`: pretraining, fine-tuning, statistics, merges."""
    n_tasks = len(config.tasks)
    ordered = methods.check_methods(config.methods)
    per_run = (
        1
        + n_tasks
        + n_tasks * len(statistics_needed(config))
        + len(ordered)
        + len(intermediate_methods(config)) * len(config.intermediate_pairs)
    )
    return per_run * len(config.architectures) * len(config.seeds)


# --------------------------------------------------------------------------
# Models and evaluation
# --------------------------------------------------------------------------


@functools.cache
def _model(arch: str, num_classes: int, options: tuple[tuple[str, Any], ...]) -> Any:
    model = models.build(arch, num_classes, **dict(options))

    def apply(params: Params, x: Any) -> Any:
        return model.apply({"params": params}, x)

    # One function object per model, so jit and the statistics' plans are
    # compiled once and reused across tasks and seeds.
    return model, apply


def _with_body(params: Params, body: Params) -> Params:
    return {"body": body, "head": params["head"]}


def _statistic(
    name: str,
    apply: Callable[[Params, Any], Any],
    params: Params,
    split: tasks.Split,
    config: ExperimentConfig,
    key: jax.Array,
) -> StatTree:
    n = config.stat_examples
    m = config.micro_batch_size
    batches = [
        {"inputs": split.x[i : min(i + m, n)], "labels": split.y[i : min(i + m, n)]}
        for i in range(0, n, m)
    ]
    common: dict[str, Any] = {"micro_batch_size": m, "progress": False}
    if name == "gram":
        stats = mats_jax.gram(apply, params, batches, **common)
    elif name == "fisher_exact":
        stats = mats_jax.diagonal_fisher(apply, params, batches, kind="exact", **common)
    else:
        stats = mats_jax.kfac(
            apply, params, batches, key=key, **methods.kfac_estimator(name), **common
        )
    # Block so that the recorded time per stage is the statistics' own.
    return jax.block_until_ready(stats["body"])


# --------------------------------------------------------------------------
# Merging with validation-chosen hyperparameters
# --------------------------------------------------------------------------


def search_methods(
    ordered: Sequence[str],
    grids: Grids,
    base: Params,
    bodies: Sequence[Params],
    stats: Mapping[str, Sequence[StatTree]],
    weight_grid: Sequence[tuple[float, ...]],
    score_val: Callable[[Params], tuple[float, dict[str, float]]],
    score_test: Callable[[Params], dict[str, float]],
    key: jax.Array,
    progress: Progress,
    setting: str,
    curve_test: bool,
    chosen_bodies: dict[str, Params],
    registry: Mapping[str, Method] = METHODS,
) -> dict[str, Any]:
    """Runs every method's grid, chooses on validation, reports the test scores.

    ``ordered`` is :func:`~mats_experiment.methods.check_methods`' order (a
    MaTS variant after the method it starts from); ``score_val`` returns the
    selection score and the per-task validation accuracies. The chosen body
    of each method goes into ``chosen_bodies``. A method that does not weigh
    its models (Model Stock) runs only the weight tuples whose weights are
    all equal, and is left out of a setting that has none. Any model family
    can use it: only the scoring functions see the model; ``registry`` names
    the methods (:data:`~mats_experiment.methods.ADAPTER_METHODS` for
    adapter vectors).
    """
    out: dict[str, Any] = {}
    best_by_weight: dict[str, dict[tuple[float, ...], Params]] = {}
    for name in ordered:
        method = registry[name]
        start = time.perf_counter()
        trials = []
        best: tuple[float, Params, dict[str, Any]] | None = None
        per_weight: dict[tuple[float, ...], tuple[float, Params]] = {}
        for w in weight_grid:
            init = {k: v[w] for k, v in best_by_weight.items() if w in v}
            inputs = MergeInputs(base, bodies, stats, w, init, key)
            for hp in methods.candidates(method, grids):
                if len(set(w)) > 1 and not method.takes_weights(hp):
                    continue
                body = method.merge(inputs, hp)
                score, _ = score_val(body)
                record = {"hyperparameters": hp, "weights": list(w), "val": score}
                if curve_test and method.init is not None:
                    record["test"] = score_test(body)
                trials.append(record)
                if w not in per_weight or score > per_weight[w][0]:
                    per_weight[w] = (score, body)
                if best is None or score > best[0]:
                    best = (score, body, {**hp, "weights": list(w)})
        if best is None:
            progress(f"{setting}: {method.label} left out (it takes no weights)")
            continue
        best_by_weight[name] = {w: b for w, (_, b) in per_weight.items()}
        chosen_bodies[name] = best[1]
        out[name] = {
            "label": method.label,
            "chosen": best[2],
            "val_score": best[0],
            "test": score_test(best[1]),
            "trials": trials,
            "seconds": time.perf_counter() - start,
        }
        progress(f"{setting}: {method.label}")
    return out


def _scale_spread(stats: Sequence[StatTree]) -> dict[str, float]:
    """Per leaf, max/min across tasks of the statistic's scale (mean diagonal)."""
    scales = [mats_jax.statistic_scales(s) for s in stats]
    spread = {}
    for leaf in scales[0]:
        values = [s[leaf] for s in scales]
        if all(v is not None and v > 0 for v in values):
            spread[leaf] = float(max(values) / min(values))  # type: ignore[type-var, operator]
    return spread


# --------------------------------------------------------------------------
# One run (architecture, seed)
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One (architecture, seed) of an experiment, fine-tuned and measured, ready to merge.

    Attributes:
      tasks: the built tasks, in the configuration's order.
      applies: per task, its model's ``apply(params, x) -> logits``.
      pretrained: the pretrained classifier (its body is the merges' base).
      pretrain_accuracy: its test accuracy on the pretraining task.
      finetuned: per task, the fine-tuned parameters (body and head).
      per_task: per task name, the pretrained body's (refitted head) and the
        fine-tuned model's validation and test accuracy, and the test gain.
      statistics: statistic name → one statistics tree of the body per task.
      timings_s: seconds spent pretraining, fine-tuning and estimating.
    """

    tasks: tuple[tasks.Task, ...]
    applies: tuple[Callable[[Params, Any], Any], ...]
    pretrained: Params
    pretrain_accuracy: float
    finetuned: tuple[Params, ...]
    per_task: Mapping[str, Mapping[str, float]]
    statistics: Mapping[str, Sequence[StatTree]]
    timings_s: Mapping[str, float]

    @property
    def base(self) -> Params:
        """The pretrained body: what the task vectors are taken from."""
        return self.pretrained["body"]

    @property
    def bodies(self) -> list[Params]:
        """The fine-tuned bodies, in task order: what is merged."""
        return [p["body"] for p in self.finetuned]

    def accuracy(
        self, body: Params, indices: Sequence[int], split: str
    ) -> dict[str, float]:
        """Per task of ``indices``: accuracy on ``split`` of ``body`` with the task's own head."""
        return {
            self.tasks[i].name: train.accuracy(
                self.applies[i],
                _with_body(self.finetuned[i], body),
                getattr(self.tasks[i], split).x,
                getattr(self.tasks[i], split).y,
            )
            for i in indices
        }

    def normalised_score(
        self, body: Params, indices: Sequence[int], split: str
    ) -> tuple[float, dict[str, float]]:
        """The mean over ``indices`` of the normalised accuracy on ``split``
        (each task's by its fine-tuned model's on that split), and the accuracies."""
        acc = self.accuracy(body, indices, split)
        own = [self.per_task[self.tasks[i].name][f"finetuned_{split}"] for i in indices]
        return float(np.mean(normalised(list(acc.values()), own))), acc


def prepare(
    config: ExperimentConfig,
    arch: str,
    seed: int,
    sources: Mapping[str, tuple[np.ndarray, np.ndarray]],
    progress: Progress,
) -> Prepared:
    """Pretrains, fine-tunes every task and estimates every statistic the methods need.

    ``sources`` maps each data source the configuration names to its
    (inputs, labels) (:func:`mats_experiment.data.load`); call
    :func:`validate` first.
    """
    timings: dict[str, float] = {}
    options = tuple(sorted(config.body_options.get(arch, {}).items()))
    key = jax.random.key(seed)
    start = time.perf_counter()
    pre = tasks.build_task(config.pretrain, sources[config.pretrain.source], seed)
    task_list = [tasks.build_task(s, sources[s.source], seed) for s in config.tasks]
    pre_model, pre_apply = _model(arch, pre.num_classes, options)
    pre_params = models.init_params(pre_model, jax.random.fold_in(key, 0))
    pre_params = train.fit(
        pre_apply,
        pre_params,
        pre.train.x,
        pre.train.y,
        config.pretrain_training.get(arch, train.TrainConfig()),
        jax.random.fold_in(key, 1),
    )
    base = pre_params["body"]
    pretrain_accuracy = train.accuracy(pre_apply, pre_params, pre.test.x, pre.test.y)
    timings["pretrain"] = time.perf_counter() - start
    progress(f"{arch} seed {seed}: pretrained ({pretrain_accuracy:.1f}%)")

    start = time.perf_counter()
    finetuned: list[Params] = []
    applies = []
    per_task: dict[str, dict[str, float]] = {}
    ft_cfg = config.finetune_training.get(arch, train.TrainConfig())
    for i, task in enumerate(task_list):
        model, apply = _model(arch, task.num_classes, options)
        applies.append(apply)
        feats = np.asarray(models.features(model, base, task.train.x))
        probe = {
            "body": base,
            "head": train.fit_head(feats, task.train.y, task.num_classes),
        }
        tuned = train.fit(
            apply,
            probe,
            task.train.x,
            task.train.y,
            ft_cfg,
            jax.random.fold_in(key, 100 + i),
        )
        finetuned.append(tuned)
        per_task[task.name] = {
            "pretrained_val": train.accuracy(apply, probe, task.val.x, task.val.y),
            "pretrained_test": train.accuracy(apply, probe, task.test.x, task.test.y),
            "finetuned_val": train.accuracy(apply, tuned, task.val.x, task.val.y),
            "finetuned_test": train.accuracy(apply, tuned, task.test.x, task.test.y),
        }
        per_task[task.name]["gain_test"] = (
            per_task[task.name]["finetuned_test"]
            - per_task[task.name]["pretrained_test"]
        )
        progress(f"{arch} seed {seed}: fine-tuned {task.name}")
    timings["finetune"] = time.perf_counter() - start

    start = time.perf_counter()
    stats: dict[str, list[StatTree]] = {}
    for s_name in statistics_needed(config):
        stats[s_name] = []
        for i, task in enumerate(task_list):
            stats[s_name].append(
                _statistic(
                    s_name,
                    applies[i],
                    finetuned[i],
                    task.train,
                    config,
                    jax.random.fold_in(key, 200 + i),
                )
            )
            progress(f"{arch} seed {seed}: statistic {s_name} of {task.name}")
    for s_name in _derived_needed(config):
        source = stats[methods.DERIVED[s_name]]
        stats[s_name] = [derived.kernels_only(s) for s in source]
    timings["statistics"] = time.perf_counter() - start
    return Prepared(
        tasks=tuple(task_list),
        applies=tuple(applies),
        pretrained=pre_params,
        pretrain_accuracy=pretrain_accuracy,
        finetuned=tuple(finetuned),
        per_task=per_task,
        statistics=stats,
        timings_s=timings,
    )


def _run_one(
    config: ExperimentConfig,
    arch: str,
    seed: int,
    sources: Mapping[str, tuple[np.ndarray, np.ndarray]],
    progress: Progress,
) -> dict[str, Any]:
    prepared = prepare(config, arch, seed, sources, progress)
    task_list = prepared.tasks
    stats = prepared.statistics
    base, bodies = prepared.base, prepared.bodies
    timings = dict(prepared.timings_s)
    key = jax.random.key(seed)
    spreads = {
        s: _scale_spread(v) for s, v in stats.items() if s not in methods.DERIVED
    }
    table = (
        mats_jax.statistics_table(stats["kfac_exact"], [t.name for t in task_list])
        if "kfac_exact" in stats
        else None
    )

    ordered = methods.check_methods(config.methods)
    evaluate = prepared.accuracy
    everything = range(len(task_list))

    def score_val_all(body: Params) -> tuple[float, dict[str, float]]:
        return prepared.normalised_score(body, everything, "val")

    start = time.perf_counter()
    merged: dict[str, Params] = {}
    multitask = search_methods(
        ordered,
        config.grids,
        base,
        bodies,
        stats,
        [tuple(1.0 for _ in task_list)],
        score_val_all,
        lambda body: evaluate(body, everything, "test"),
        jax.random.fold_in(key, 300),
        progress,
        f"{arch} seed {seed} multitask",
        curve_test=True,
        chosen_bodies=merged,
    )
    timings["multitask"] = time.perf_counter() - start

    curve = []
    if "kfac_exact" in stats and "task_arithmetic" in multitask:
        ta = multitask["task_arithmetic"]["chosen"]
        init = mats_jax.task_arithmetic(base, bodies, scale=ta["scale"])
        for iters in config.curve_iterations:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", mats_jax.ConvergenceWarning)
                body = (
                    init
                    if iters == 0
                    else mats_jax.mats(
                        bodies, stats["kfac_exact"], init=init, maxiter=iters, tol=1e-6
                    ).params
                )
            curve.append(
                {
                    "iterations": iters,
                    "val": score_val_all(body)[0],
                    "test": evaluate(body, everything, "test"),
                }
            )

    start = time.perf_counter()
    index = {t.name: i for i, t in enumerate(task_list)}
    intermediate = {}
    for a, b in config.intermediate_pairs:
        ia, ib = index[a], index[b]

        def score_val_b(body: Params, ib: int = ib) -> tuple[float, dict[str, float]]:
            return prepared.normalised_score(body, [ib], "val")

        intermediate[f"{a} -> {b}"] = search_methods(
            intermediate_methods(config),
            config.grids,
            base,
            [bodies[ib], bodies[ia]],
            {k: [v[ib], v[ia]] for k, v in stats.items()},
            [(1.0, w) for w in config.intermediate_weights],
            score_val_b,
            lambda body, ib=ib: evaluate(body, [ib], "test"),  # type: ignore[misc]
            jax.random.fold_in(key, 400 + ia * 31 + ib),
            progress,
            f"{arch} seed {seed} {a} -> {b}",
            curve_test=False,
            chosen_bodies={},
        )
    timings["intermediate"] = time.perf_counter() - start
    return {
        "architecture": arch,
        "seed": seed,
        "pretrain_test_accuracy": prepared.pretrain_accuracy,
        "tasks": prepared.per_task,
        "multitask": multitask,
        "intermediate": intermediate,
        "cg_curve": curve,
        # The pretrained body under the fine-tuned heads: the merge that keeps
        # no task vector (task arithmetic at scale 0), for reference.
        "base_body": {
            "val": score_val_all(base)[0],
            "test": evaluate(base, everything, "test"),
        },
        "statistic_scale_spread": spreads,
        "kfac_exact_scales": (
            {
                t.name: mats_jax.statistic_scales(s)
                for t, s in zip(task_list, stats["kfac_exact"], strict=True)
            }
            if "kfac_exact" in stats
            else None
        ),
        "statistics_table": table,
        "timings_s": timings,
        "models": {
            "pretrained": prepared.pretrained,
            "finetuned": dict(
                zip([t.name for t in task_list], prepared.finetuned, strict=True)
            ),
            "merged_bodies": merged,
        },
    }


def run(
    config: ExperimentConfig,
    progress: Progress | None = None,
    keep_models: bool = False,
) -> dict[str, Any]:
    """Validates, then runs every (architecture, seed); returns the raw results.

    Args:
      config: the experiment.
      progress: called with a description after each unit of work
        (:func:`count_units` of them).
      keep_models: also return, per run, the pretrained and fine-tuned
        parameters and each method's chosen multitask body under ``"models"``
        (arrays, not JSON).
    """
    validate(config)
    report = progress or (lambda _: None)
    needed = {config.pretrain.source, *(t.source for t in config.tasks)}
    sources = {name: data.load(name) for name in sorted(needed)}
    runs = []
    for arch in config.architectures:
        for seed in config.seeds:
            result = _run_one(config, arch, seed, sources, report)
            if not keep_models:
                result.pop("models")
            runs.append(result)
    return {"runs": runs}
