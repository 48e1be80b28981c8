"""The experiment on a real pretrained model: MiniLM's first layers on WordNet gloss tasks.

For each seed:

1. read the first ``layers`` layers of a Hugging Face BERT folder
   (:func:`~mats_experiment.bert.load_body`) and tokenise every task's
   glosses with the folder's own tokenizer (padded to ``length``);
2. per task, refit a linear head on the frozen pretrained body (the
   *pretrained* baseline), then fine-tune body and head from there (the
   task's own model, which normalised accuracy divides by): the whole body,
   or (``finetune``) a LoRA or IA³ adapter of it
   (:mod:`~mats_experiment.adapters`), folded into the body's kernels;
3. per task, estimate the statistics the chosen methods need on
   ``stat_examples`` training examples of the fine-tuned model, with the
   padding positions masked out (``mask`` of shape (batch, positions)) where
   the library accepts such a mask beside (batch, classes) logits, and with a
   per-example mask otherwise (recorded in the results as
   ``statistics_mask``);
4. merge the bodies (each task keeps its own fine-tuned head) with every
   method and every candidate of its grid, choose on the mean normalised
   validation accuracy and report the test accuracy
   (:func:`~mats_experiment.pipeline.search_methods`, the search of the image
   experiments). IA³ fine-tunes are also merged where they were trained, as
   vectors (:data:`ADAPTER_SPACE_METHODS`, with the block Fisher of each
   vector: :func:`mats_jax.block_fisher`), then folded;
5. per (intermediate A, target B) pair of ``intermediate_pairs``, merge B's
   body with A's, weights (1, w) for w in ``intermediate_weights``, every
   method choosing w and its grid on B's validation accuracy (normalised by
   B's own model), and report B's test accuracy.

The results have the image experiments' shape (``{"runs": [...]}``, one per
seed; ``multitask`` empty when ``multitask=False``), so :mod:`~mats_experiment.report` summarises
and plots them. Everything that can be wrong with a configuration is checked
by :func:`validate` before any model is read or trained.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import mats_jax
from mats_experiment import adapters, bert, methods, text, train
from mats_experiment.methods import Grids
from mats_experiment.metrics import normalised
from mats_experiment.pipeline import (
    MIN_STATISTIC_EXAMPLES,
    ExperimentError,
    search_methods,
)
from mats_jax.typing import Params, StatTree

__all__ = [
    "ADAPTER_SPACE_METHODS",
    "DEFAULT_METHODS",
    "TextExperimentConfig",
    "architecture_name",
    "load_tokenizer",
    "run",
    "statistics_batches",
    "validate",
]

DEFAULT_METHODS = (
    "average",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "breadcrumbs",
    "della",
    "multislerp",
    "model_stock",
    "tsv_m",
    "iso_c",
    "iso_cts",
    "fisher",
    "regmean",
    "mats_gram",
    "mats_kfac",
)
"""The methods of the real-model benchmark: one per registered method (SLERP,
which takes two models, through multi-SLERP), MaTS with Gram and K-FAC."""

ADAPTER_SPACE_METHODS = tuple(methods.ADAPTER_METHODS)
"""The methods that merge IA³ fine-tunes as vectors (about l = 1): data-free
ones, and Fisher merging and MaTS with each vector's statistic."""

ADAPTER_STATISTICS = ("block_fisher", "block_diagonal")

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class TextExperimentConfig:
    """Everything a run on the real model depends on.

    Attributes:
      folder: a Hugging Face BERT folder (config.json, model.safetensors,
        tokenizer.json).
      tasks: the merged tasks (at least two, disjoint categories).
      layers: the first layers of the checkpoint kept.
      length: tokens per gloss, [CLS] and [SEP] included (padded, truncated).
      pooling: what the heads classify (:data:`~mats_experiment.bert.POOLINGS`).
      seeds: one run per seed (splits, training order, sampling).
      training: fine-tuning (AdamW, cosine decay).
      head_steps: full-batch Adam steps of the head refit.
      stat_examples: training examples per task for the statistics.
      micro_batch_size: examples per jitted statistics step.
      methods: names of :data:`~mats_experiment.methods.METHODS`.
      grids: the validation grids.
      glosses: the WordNet data files.
      finetune: ``"full"`` (every body parameter), ``"lora"`` or ``"ia3"``
        (:data:`~mats_experiment.adapters.KINDS`).
      lora_rank: the LoRA rank r (``alpha = r``: scale 1).
      adapter_training: fine-tuning of an adapter (no weight decay: IA³'s
        vectors would decay towards 0, not 1).
      multitask: merge every task's body (the multitask setting).
      intermediate_pairs: (intermediate task A, target task B) name pairs:
        B's body merged with A's, weights (1, w), scored on B with B's head
        and normalised by B's own model (the paper's intermediate-task
        merging; a B with few training examples is where A can help).
      intermediate_weights: the weights w of A.
    """

    folder: str
    tasks: tuple[text.TextTaskSpec, ...]
    layers: int = 2
    length: int = 32
    pooling: str = "mean"
    seeds: tuple[int, ...] = (0,)
    training: train.TrainConfig = dataclasses.field(
        default_factory=lambda: train.TrainConfig(
            epochs=5, batch_size=32, learning_rate=3e-4, weight_decay=0.01
        )
    )
    head_steps: int = 300
    stat_examples: int = 256
    micro_batch_size: int = 32
    methods: tuple[str, ...] = DEFAULT_METHODS
    grids: Grids = dataclasses.field(default_factory=Grids)
    glosses: tuple[str, ...] = text.WORDNET
    finetune: str = "full"
    lora_rank: int = 8
    adapter_training: train.TrainConfig = dataclasses.field(
        default_factory=lambda: train.TrainConfig(
            epochs=5, batch_size=32, learning_rate=1e-3, weight_decay=0.0
        )
    )
    multitask: bool = True
    intermediate_pairs: tuple[tuple[str, str], ...] = ()
    intermediate_weights: tuple[float, ...] = (0.1, 0.3, 1.0)


def architecture_name(config: TextExperimentConfig) -> str:
    """The name of the model in tables: the folder's model and the layers kept."""
    return f"MiniLM-L6, first {config.layers} layer{'s' * (config.layers != 1)}"


def _statistics_needed(config: TextExperimentConfig) -> list[str]:
    names = methods.check_methods(config.methods)
    wanted = {methods.METHODS[n].statistic for n in names}
    return [s for s in methods.STATISTICS if s in wanted]


def validate(config: TextExperimentConfig) -> None:
    """Checks the whole configuration; raises ExperimentError before any model is read."""
    try:
        methods.check_methods(config.methods)
        text.check_text_specs(config.tasks)
        bert.config_from_folder(config.folder, config.layers)
    except ValueError as error:
        raise ExperimentError(str(error)) from None
    derived = [
        n
        for n in methods.check_methods(config.methods)
        if methods.METHODS[n].statistic in methods.DERIVED
    ]
    if derived:
        raise ExperimentError(
            f"methods {derived} use derived statistics, which this experiment does not compute"
        )
    names = [t.name for t in config.tasks]
    for a, b in config.intermediate_pairs:
        for n in (a, b):
            if n not in names:
                raise ExperimentError(
                    f"intermediate pair ({a!r}, {b!r}): unknown task {n!r}; tasks: "
                    f"{', '.join(names)}"
                )
        if a == b:
            raise ExperimentError(
                f"intermediate pair ({a!r}, {b!r}): A and B are one task"
            )
    if not config.multitask and not config.intermediate_pairs:
        raise ExperimentError(
            "nothing to merge: multitask=False and no intermediate_pairs"
        )
    if not config.intermediate_weights or min(config.intermediate_weights) <= 0:
        raise ExperimentError(
            "intermediate_weights must be positive, got "
            f"{config.intermediate_weights!r}"
        )
    if len(config.tasks) < 2 or not config.seeds:
        raise ExperimentError(
            f"merging needs at least two tasks and one seed, got {len(config.tasks)} "
            f"tasks and {len(config.seeds)} seeds"
        )
    for name in ("model.safetensors", "tokenizer.json"):
        if not os.path.isfile(os.path.join(config.folder, name)):
            raise ExperimentError(f"{config.folder}: no {name}")
    if config.finetune not in adapters.KINDS:
        raise ExperimentError(
            f"unknown finetune {config.finetune!r}; known: {', '.join(adapters.KINDS)}"
        )
    if isinstance(config.lora_rank, bool) or not (
        isinstance(config.lora_rank, int) and config.lora_rank >= 1
    ):
        raise ExperimentError(
            f"lora_rank must be a positive integer, got {config.lora_rank!r}"
        )
    if config.pooling not in bert.POOLINGS:
        raise ExperimentError(
            f"unknown pooling {config.pooling!r}; known: {', '.join(bert.POOLINGS)}"
        )
    if config.length < 3:
        raise ExperimentError(
            f"length={config.length}: need room for [CLS], a token, [SEP]"
        )
    for spec in config.tasks:
        if spec.sizes[0] < config.training.batch_size:
            raise ExperimentError(
                f"task {spec.name!r}: {spec.sizes[0]} training examples are fewer than "
                f"one batch (batch_size={config.training.batch_size})"
            )
        if _statistics_needed(config) and not (
            MIN_STATISTIC_EXAMPLES <= config.stat_examples <= spec.sizes[0]
        ):
            raise ExperimentError(
                f"task {spec.name!r}: stat_examples={config.stat_examples} must be between "
                f"{MIN_STATISTIC_EXAMPLES} and its {spec.sizes[0]} training examples"
            )
    for path in config.glosses:
        if not os.path.isfile(path):
            raise ExperimentError(
                f"{path}: no WordNet data file; install Debian's wordnet-base"
            )


def load_tokenizer(folder: str) -> Any:
    """The folder's ``tokenizers.Tokenizer`` (its tokenizer.json)."""
    import tokenizers

    return tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))


@functools.cache
def _model(
    config: bert.BertConfig, num_classes: int, pooling: str
) -> tuple[bert.TextClassifier, Callable[[Params, Any], Any]]:
    model = bert.TextClassifier(config, num_classes, pooling)

    def apply(params: Params, x: Any) -> Any:
        return model.apply({"params": params}, x)

    # One function object per model, so jit and the statistics' plans are
    # compiled once and reused across tasks and seeds.
    return model, apply


@functools.cache
def _features(config: bert.BertConfig, pooling: str) -> Callable[[Params, Any], Any]:
    return jax.jit(functools.partial(bert.body_features, config, pooling=pooling))


def _batched_features(
    config: bert.BertConfig, body: Params, x: np.ndarray, pooling: str
) -> np.ndarray:
    f = _features(config, pooling)
    return np.concatenate(
        [np.asarray(f(body, x[i : i + 256])) for i in range(0, len(x), 256)]
    )


def statistics_batches(
    x: np.ndarray, y: np.ndarray, size: int, positions: bool
) -> list[dict[str, Any]]:
    """Batches of packed inputs for the statistics, with the padding mask.

    ``positions``: the mask is (batch, positions), the attention mask (so
    the K-FAC and Gram input factors count real tokens only); otherwise it is
    (batch,) (every example real, padding positions counted).

    Examples:
      >>> x = bert.pack([[101, 5, 102], [101, 102]], 4)
      >>> [b["mask"].shape for b in statistics_batches(x, np.array([0, 1]), 1, True)]
      [(1, 4), (1, 4)]
    """
    out = []
    for i in range(0, x.shape[0], size):
        chunk = x[i : i + size]
        mask = (
            chunk[:, 1].astype(np.float32)
            if positions
            else np.ones(len(chunk), np.float32)
        )
        out.append({"inputs": chunk, "labels": y[i : i + size], "mask": mask})
    return out


def _statistic(
    name: str,
    apply: Callable[[Params, Any], Any],
    params: Params,
    batches: Sequence[Mapping[str, Any]],
    micro: int,
    key: jax.Array,
) -> StatTree:
    common: dict[str, Any] = {"micro_batch_size": micro, "progress": False}
    if name == "gram":
        stats = mats_jax.gram(apply, params, batches, **common)
    elif name == "fisher_exact":
        stats = mats_jax.diagonal_fisher(apply, params, batches, kind="exact", **common)
    else:
        stats = mats_jax.kfac(
            apply,
            params,
            batches,
            key=key,
            fallback="diagonal",
            **methods.kfac_estimator(name),
            **common,
        )
    return jax.block_until_ready(stats["body"])


def _through_adapter(
    apply: Callable[[Params, Any], Any], kind: str, base: Params
) -> Callable[[Params, Any], Any]:
    """``apply`` of ``{"adapter", "head"}``: the body is ``base`` with the adapter folded in."""

    def through(params: Params, x: Any) -> Any:
        body = adapters.fold(kind, base, params["adapter"])
        return apply({"body": body, "head": params["head"]}, x)

    return through


def _diagonal_of(block: StatTree) -> StatTree:
    """Each Dense block's diagonal, as the Diagonal statistic of its leaf (1-D leaves)."""
    return jax.tree.map(
        lambda s: mats_jax.Diagonal(jnp.diagonal(s.f)),
        block,
        is_leaf=lambda x: isinstance(x, mats_jax.Dense),
    )


def _statistics(
    name: str,
    apply: Callable[[Params, Any], Any],
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    micro: int,
    key: jax.Array,
) -> tuple[StatTree, str]:
    """The statistic with the (batch, positions) mask, or with a per-example one if refused.

    Returns the statistic and which mask it used: ``"positions"``, or
    ``"examples: <why the positions mask was refused>"``.
    """
    try:
        batches = statistics_batches(x, y, micro, positions=True)
        return _statistic(name, apply, params, batches, micro, key), "positions"
    except ValueError as error:
        # A library without masks beside (batch, classes) logits refuses the
        # (batch, positions) mask (a broadcasting error): padding positions
        # then count in the statistics' input factors, recorded as such.
        batches = statistics_batches(x, y, micro, positions=False)
        why = str(error).splitlines()[0][:200]
        return _statistic(name, apply, params, batches, micro, key), f"examples: {why}"


def _run_one(
    config: TextExperimentConfig,
    seed: int,
    glosses: Sequence[tuple[int, str]],
    tokenizer: Any,
    progress: Progress,
) -> dict[str, Any]:
    timings: dict[str, float] = {}
    key = jax.random.key(seed)
    start = time.perf_counter()
    body_config, base = bert.load_body(config.folder, config.layers)
    task_list = [text.build_text_task(s, glosses, seed) for s in config.tasks]
    inputs = [
        {
            split: bert.tokenize(tokenizer, getattr(t, split).texts, config.length)
            for split in ("train", "val", "test")
        }
        for t in task_list
    ]
    timings["load_and_tokenise"] = time.perf_counter() - start

    start = time.perf_counter()
    finetuned: list[Params] = []
    trained_adapters: list[Params] = []  # {"adapter", "head"} per task
    adapter_applies: list[Callable[[Params, Any], Any]] = []
    through_adapter: dict[int, Callable[[Params, Any], Any]] = {}
    applies = []
    per_task: dict[str, dict[str, float]] = {}
    for i, (task, x) in enumerate(zip(task_list, inputs, strict=True)):
        _, apply = _model(body_config, task.num_classes, config.pooling)
        applies.append(apply)
        feats = _batched_features(body_config, base, x["train"], config.pooling)
        probe = {
            "body": base,
            "head": train.fit_head(
                feats, task.train.y, task.num_classes, steps=config.head_steps
            ),
        }
        if config.finetune == "full":
            tuned = train.fit(
                apply,
                probe,
                x["train"],
                task.train.y,
                config.training,
                jax.random.fold_in(key, 100 + i),
            )
        else:
            # One function per model (not per task), so training and the
            # statistics compile once a seed.
            if id(apply) not in through_adapter:
                through_adapter[id(apply)] = _through_adapter(
                    apply, config.finetune, base
                )
            adapter_apply = through_adapter[id(apply)]
            start_adapter = adapters.init(
                config.finetune,
                base,
                rank=config.lora_rank,
                key=jax.random.fold_in(key, 400 + i),
            )
            trained = train.fit(
                adapter_apply,
                {"adapter": start_adapter, "head": probe["head"]},
                x["train"],
                task.train.y,
                config.adapter_training,
                jax.random.fold_in(key, 100 + i),
            )
            trained_adapters.append(trained)
            adapter_applies.append(adapter_apply)
            tuned = {
                "body": adapters.fold(config.finetune, base, trained["adapter"]),
                "head": trained["head"],
            }
        finetuned.append(tuned)
        row = {
            "pretrained_val": train.accuracy(apply, probe, x["val"], task.val.y),
            "pretrained_test": train.accuracy(apply, probe, x["test"], task.test.y),
            "finetuned_val": train.accuracy(apply, tuned, x["val"], task.val.y),
            "finetuned_test": train.accuracy(apply, tuned, x["test"], task.test.y),
        }
        row["gain_test"] = row["finetuned_test"] - row["pretrained_test"]
        if config.pooling != "mean":
            # The stronger frozen-body baseline of a sentence encoder trained
            # for mean pooling: recorded beside the configured pooling's.
            _, mean_apply = _model(body_config, task.num_classes, "mean")
            mean_feats = _batched_features(body_config, base, x["train"], "mean")
            mean_probe = {
                "body": base,
                "head": train.fit_head(
                    mean_feats, task.train.y, task.num_classes, steps=config.head_steps
                ),
            }
            row["pretrained_mean_pool_test"] = train.accuracy(
                mean_apply, mean_probe, x["test"], task.test.y
            )
        per_task[task.name] = row
        progress(
            f"seed {seed}: fine-tuned {task.name} ({row['pretrained_test']:.1f}% → "
            f"{row['finetuned_test']:.1f}%)"
        )
    timings["finetune"] = time.perf_counter() - start

    start = time.perf_counter()
    stats: dict[str, list[StatTree]] = {}
    masks: dict[str, str] = {}
    n = config.stat_examples
    for s_name in _statistics_needed(config):
        stat_start = time.perf_counter()
        stats[s_name] = []
        for i, (task, x) in enumerate(zip(task_list, inputs, strict=True)):
            stat, masks[s_name] = _statistics(
                s_name,
                applies[i],
                finetuned[i],
                x["train"][:n],
                task.train.y[:n],
                config.micro_batch_size,
                jax.random.fold_in(key, 200 + i),
            )
            stats[s_name].append(stat)
        timings[f"statistic {s_name}"] = time.perf_counter() - stat_start
        progress(f"seed {seed}: statistic {s_name} (mask: {masks[s_name]})")
    timings["statistics"] = time.perf_counter() - start

    bodies = [p["body"] for p in finetuned]
    ft_val = [per_task[t.name]["finetuned_val"] for t in task_list]
    everything = range(len(task_list))

    def evaluate(
        body: Params, split: str, which: Sequence[int] = everything
    ) -> dict[str, float]:
        return {
            task_list[i].name: train.accuracy(
                applies[i],
                {"body": body, "head": finetuned[i]["head"]},
                inputs[i][split],
                getattr(task_list[i], split).y,
            )
            for i in which
        }

    def score_val(
        body: Params, which: Sequence[int] = everything
    ) -> tuple[float, dict[str, float]]:
        acc = evaluate(body, "val", which)
        own = [ft_val[i] for i in which]
        return float(np.mean(normalised(list(acc.values()), own))), acc

    merged: dict[str, Params] = {}
    multitask: dict[str, Any] = {}
    if config.multitask:
        start = time.perf_counter()
        multitask = search_methods(
            methods.check_methods(config.methods),
            config.grids,
            base,
            bodies,
            stats,
            [tuple(1.0 for _ in task_list)],
            score_val,
            lambda body: evaluate(body, "test"),
            jax.random.fold_in(key, 300),
            progress,
            f"seed {seed} multitask",
            curve_test=False,
            chosen_bodies=merged,
        )
        timings["multitask"] = time.perf_counter() - start
    index = {t.name: i for i, t in enumerate(task_list)}
    intermediate: dict[str, Any] = {}
    intermediate_bodies: dict[str, dict[str, Params]] = {}
    for a, b in config.intermediate_pairs:
        start = time.perf_counter()
        ia, ib = index[a], index[b]
        intermediate[f"{a} -> {b}"] = search_methods(
            methods.check_methods(config.methods),
            config.grids,
            base,
            [bodies[ib], bodies[ia]],
            {k: [v[ib], v[ia]] for k, v in stats.items()},
            [(1.0, w) for w in config.intermediate_weights],
            functools.partial(score_val, which=[ib]),
            functools.partial(evaluate, split="test", which=[ib]),
            jax.random.fold_in(key, 400 + ia * 31 + ib),
            progress,
            f"seed {seed} {a} -> {b}",
            curve_test=False,
            chosen_bodies=intermediate_bodies.setdefault(f"{a} -> {b}", {}),
        )
        timings[f"intermediate {a} -> {b}"] = time.perf_counter() - start
    if config.multitask and config.finetune == "ia3":
        start = time.perf_counter()
        adapter_stats: dict[str, list[StatTree]] = {n: [] for n in ADAPTER_STATISTICS}
        for i, (task, x) in enumerate(zip(task_list, inputs, strict=True)):
            # Per-example masks: the logits are per example and every example
            # is real (a positions mask would only say which examples count).
            batches = statistics_batches(
                x["train"][:n],
                task.train.y[:n],
                config.micro_batch_size,
                positions=False,
            )
            block = mats_jax.block_fisher(
                adapter_applies[i],
                trained_adapters[i],
                batches,
                leaves="adapter/**",
                micro_batch_size=config.micro_batch_size,
                progress=False,
            )["adapter"]
            adapter_stats["block_fisher"].append(block)
            adapter_stats["block_diagonal"].append(_diagonal_of(block))
        timings["statistic block_fisher"] = time.perf_counter() - start
        progress(f"seed {seed}: block Fisher of the IA³ vectors")
        start = time.perf_counter()
        vectors = [t["adapter"] for t in trained_adapters]
        identity = jax.tree.map(np.ones_like, vectors[0])

        def fold(vector: Params) -> Params:
            return adapters.fold("ia3", base, vector)

        in_adapter_space: dict[str, Params] = {}
        searched = search_methods(
            methods.check_methods(ADAPTER_SPACE_METHODS, methods.ADAPTER_METHODS),
            config.grids,
            identity,
            vectors,
            adapter_stats,
            [tuple(1.0 for _ in task_list)],
            lambda vector: score_val(fold(vector)),
            lambda vector: evaluate(fold(vector), "test"),
            jax.random.fold_in(key, 500),
            progress,
            f"seed {seed} multitask, IA³ vectors",
            curve_test=False,
            chosen_bodies=in_adapter_space,
            registry=methods.ADAPTER_METHODS,
        )
        for name, row in searched.items():
            multitask[f"{name}_ia3_vectors"] = {
                **row,
                "label": f"{row['label']}, IA³ vectors",
            }
            merged[f"{name}_ia3_vectors"] = fold(in_adapter_space[name])
        timings["multitask_ia3_vectors"] = time.perf_counter() - start
    return {
        "architecture": architecture_name(config),
        "seed": seed,
        "tasks": per_task,
        "multitask": multitask,
        "intermediate": intermediate,
        "cg_curve": [],
        "statistics_mask": masks,
        "timings_s": timings,
        "models": {
            "pretrained": base,
            "finetuned": dict(zip([t.name for t in task_list], finetuned, strict=True)),
            "adapters": dict(
                zip([t.name for t in task_list], trained_adapters, strict=False)
            ),
            "merged_bodies": merged,
            "intermediate_bodies": intermediate_bodies,
            "body_config": body_config,
            "pooling": config.pooling,
            "inputs": dict(zip([t.name for t in task_list], inputs, strict=True)),
        },
    }


def run(
    config: TextExperimentConfig,
    progress: Progress | None = None,
    keep_models: bool = False,
) -> dict[str, Any]:
    """Validates, then runs every seed; returns the raw results.

    Args:
      config: the experiment.
      progress: called with a description after each unit of work.
      keep_models: also return, per run, the pretrained body, the fine-tuned
        parameters (and the trained adapters, ``{"adapter", "head"}`` per task,
        for adapter fine-tuning), each method's chosen merged body (and per
        intermediate pair, ``intermediate_bodies[pair][method]``), the body's
        :class:`~mats_experiment.bert.BertConfig` and the tokenised inputs
        under ``"models"`` (arrays, not JSON).
    """
    validate(config)
    report = progress or (lambda _: None)
    glosses = text.load_glosses(config.glosses)
    tokenizer = load_tokenizer(config.folder)
    runs = []
    for seed in config.seeds:
        result = _run_one(config, seed, glosses, tokenizer, report)
        if not keep_models:
            result.pop("models")
        runs.append(result)
    return {"runs": runs}
