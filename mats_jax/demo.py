"""A short example merge: linear regression tasks that live in different input subspaces.

Each of four tasks sees inputs from its own 12-dimensional subspace of a
32-dimensional input space and has its own linear map to 8 outputs. A
"pretrained" layer is fitted on pooled generic data; each task's fine-tuned
layer is the least-squares fit on that task, starting from the pretrained one. Because the tasks' inputs occupy
different subspaces, one layer can serve them all, and the data-dependent
merges, whose statistics see those subspaces, find it: for a linear layer with
squared loss RegMean (and MaTS with K-FAC statistics, whose output factor is
the identity here) is exactly the multitask least-squares fit. The data-free
merges cannot know which directions matter to which task.

Run it with ``python -m mats_jax.demo``; it prints the held-out mean squared
error per task for every method (lower is better) and the MaTS solver report.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

import mats_jax
from mats_jax.typing import Array, Params

N_TASKS, D_IN, D_OUT, SUBSPACE, N_TRAIN, N_TEST = 4, 32, 8, 12, 400, 400


def _task_data(key: Array, basis: Array, w_true: Array, n: int) -> tuple[Array, Array]:
    k_z, k_noise = jax.random.split(key)
    x = jax.random.normal(k_z, (n, SUBSPACE)) @ basis.T
    y = x @ w_true + 0.1 * jax.random.normal(k_noise, (n, D_OUT))
    return x, y


def _fit(
    x: Array, y: Array, start: Params | None = None, ridge: float = 1e-2
) -> Params:
    """Least squares with a bias, from ``start`` (fine-tuning run to convergence).

    The ridge term pulls toward the starting point, so directions the task's
    inputs never excite keep their starting values, as they do in fine-tuning.
    """
    x1 = jnp.concatenate([x, jnp.ones((x.shape[0], 1))], axis=1)
    w0 = (
        jnp.zeros((D_IN + 1, D_OUT))
        if start is None
        else jnp.concatenate([start["dense"]["kernel"], start["dense"]["bias"][None]])
    )
    step = jnp.linalg.solve(x1.T @ x1 + ridge * jnp.eye(D_IN + 1), x1.T @ (y - x1 @ w0))
    w = w0 + step
    return {"dense": {"kernel": w[:-1], "bias": w[-1]}}


def _mse(params: Params, x: Array, y: Array) -> float:
    pred = x @ params["dense"]["kernel"] + params["dense"]["bias"]
    return float(jnp.mean((pred - y) ** 2))


def main() -> None:
    """Builds the tasks, merges with every method and prints the results."""
    key = jax.random.PRNGKey(0)
    keys = jax.random.split(key, 3 + 3 * N_TASKS)
    w_shared = jax.random.normal(keys[0], (D_IN, D_OUT)) / jnp.sqrt(D_IN)
    generic_x = jax.random.normal(keys[1], (N_TRAIN, D_IN))
    base = _fit(generic_x, generic_x @ w_shared)

    tasks = []
    for t in range(N_TASKS):
        k_basis, k_w, k_data = keys[3 + 3 * t : 6 + 3 * t]
        basis, _ = jnp.linalg.qr(jax.random.normal(k_basis, (D_IN, SUBSPACE)))
        w_true = w_shared + jax.random.normal(k_w, (D_IN, D_OUT)) / jnp.sqrt(D_IN)
        train = _task_data(k_data, basis, w_true, N_TRAIN)
        test = _task_data(jax.random.fold_in(k_data, 1), basis, w_true, N_TEST)
        tasks.append((train, test))

    models = [_fit(*train, start=base) for train, _ in tasks]
    grams = [mats_jax.Gram(train[0].T @ train[0] / N_TRAIN) for train, _ in tasks]
    # Squared loss with unit noise: the output-gradient factor G is the identity.
    kfac = [
        {"dense": {"kernel": mats_jax.KFAC(g.a, jnp.eye(D_OUT)), "bias": None}}
        for g in grams
    ]
    fishers = [
        {
            "dense": {
                "kernel": jnp.outer(jnp.diagonal(g.a), jnp.ones(D_OUT)),
                "bias": None,
            }
        }
        for g in grams
    ]
    init = mats_jax.task_arithmetic(base, models, scale=0.5)

    start = time.perf_counter()
    mats_result = mats_jax.mats(models, kfac, init=init, maxiter=200, tol=1e-6)
    mats_seconds = time.perf_counter() - start
    merged = {
        "average": mats_jax.average(models),
        "task arithmetic (λ=0.5)": init,
        "TIES (k=0.2, λ=1)": mats_jax.ties(base, models, density=0.2, scale=1.0),
        "Fisher merging": mats_jax.fisher_merge(models, fishers).params,
        "RegMean (α=1)": mats_jax.regmean(
            models,
            [{"dense": {"kernel": g, "bias": None}} for g in grams],
            alpha=1.0,
        ).params,
        "MaTS (K-FAC, CG)": mats_result.params,
    }

    print(
        f"mats_jax {mats_jax.__version__} demo: {N_TASKS} linear regression tasks, "
        f"inputs in different {SUBSPACE}-dim subspaces of R^{D_IN}, {D_OUT} outputs."
    )
    print("Held-out mean squared error per task (lower is better):\n")
    header = (
        f"{'method':<26}"
        + "".join(f"{'task ' + str(t):>10}" for t in range(N_TASKS))
        + f"{'mean':>10}"
    )
    print(header)
    rows = {"pretrained": base, "fine-tuned (own task)": None, **merged}
    for name, params in rows.items():
        errors = [
            _mse(params if params is not None else models[t], *test)
            for t, (_, test) in enumerate(tasks)
        ]
        print(
            f"{name:<26}"
            + "".join(f"{e:>10.4f}" for e in errors)
            + f"{sum(errors) / len(errors):>10.4f}"
        )
    print(f"\nMaTS solver report ({mats_seconds:.2f} s, compile included):")
    print(mats_jax.format_report(mats_result.report))


if __name__ == "__main__":
    main()
