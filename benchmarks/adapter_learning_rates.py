"""The learning rates of the real-model benchmark's adapter fine-tuning, chosen on validation.

For seed 0 and the benchmark's first two tasks, fine-tunes a LoRA (rank 8)
and IA³ vectors with each candidate learning rate (5 epochs, AdamW, no
weight decay, from the refitted head) and prints the validation accuracy;
``real_model.ADAPTER_LEARNING_RATES`` holds, per kind, the rate with the
highest mean over the two tasks. Test data is never read. Run from the
repository root::

    python benchmarks/adapter_learning_rates.py > benchmarks/results/adapter_learning_rates.txt
"""

from __future__ import annotations

import time

import jax
import numpy as np
import real_model

from mats_experiment import adapters, bert, text, text_pipeline, train

CANDIDATES = {"lora": (3e-4, 1e-3, 3e-3, 1e-2), "ia3": (3e-3, 1e-2, 3e-2, 1e-1)}


def main() -> None:
    cfg = real_model.config(False, (0,), 2)
    glosses = text.load_glosses(cfg.glosses)
    tokenizer = text_pipeline.load_tokenizer(cfg.folder)
    body_config, base = bert.load_body(cfg.folder, cfg.layers)
    key = jax.random.key(0)
    scores: dict[tuple[str, float], list[float]] = {}
    for spec in cfg.tasks[:2]:
        task = text.build_text_task(spec, glosses, 0)
        x = {
            s: bert.tokenize(tokenizer, getattr(task, s).texts, cfg.length)
            for s in ("train", "val")
        }
        model = bert.TextClassifier(body_config, task.num_classes, cfg.pooling)

        def apply(params, inputs, model=model):
            return model.apply({"params": params}, inputs)

        feats = np.asarray(
            jax.jit(bert.body_features, static_argnums=(0, 3))(
                body_config, base, x["train"], cfg.pooling
            )
        )
        head = train.fit_head(
            feats, task.train.y, task.num_classes, steps=cfg.head_steps
        )
        pretrained = train.accuracy(
            apply, {"body": base, "head": head}, x["val"], task.val.y
        )
        print(f"{spec.name}: pretrained body, refitted head: val {pretrained:.1f}")
        for kind, rates in CANDIDATES.items():

            def through(params, inputs, kind=kind, apply=apply):
                body = adapters.fold(kind, base, params["adapter"])
                return apply({"body": body, "head": params["head"]}, inputs)

            for rate in rates:
                start = time.perf_counter()
                params = {
                    "adapter": adapters.init(
                        kind, base, rank=8, key=jax.random.fold_in(key, 400)
                    ),
                    "head": head,
                }
                schedule = train.TrainConfig(
                    epochs=5, batch_size=32, learning_rate=rate, weight_decay=0.0
                )
                trained = train.fit(
                    through,
                    params,
                    x["train"],
                    task.train.y,
                    schedule,
                    jax.random.fold_in(key, 100),
                )
                acc = train.accuracy(through, trained, x["val"], task.val.y)
                scores.setdefault((kind, rate), []).append(acc)
                print(
                    f"{spec.name}: {kind} learning rate {rate:g}: val {acc:.1f} "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    for kind, rates in CANDIDATES.items():
        means = {r: float(np.mean(scores[(kind, r)])) for r in rates}
        best = max(means, key=means.__getitem__)
        listing = ", ".join(f"{r:g}: {m:.2f}" for r, m in means.items())
        print(f"{kind}: mean validation accuracy per rate {listing}; chosen {best:g}")


if __name__ == "__main__":
    main()
