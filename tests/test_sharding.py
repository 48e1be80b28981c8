"""Sharded merging on 8 simulated CPU devices: every method against its single-device twin.

One subprocess (XLA's device count is fixed at start-up) runs every check
and prints its measurements as JSON; the tests below assert on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mats_jax import KFAC, Dense, Diagonal, Gram
from mats_jax.sharding import input_mesh, shard_statistics, statistic_sharding

SCRIPT = textwrap.dedent(
    r"""
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import mats_jax as mj
    from mats_jax import KFAC, Dense, Diagonal, Gram
    from mats_jax.sharding import shard_statistics, input_mesh
    from mats_jax.checks import MergeInputError

    assert jax.device_count() == 8
    import time
    out = {"seconds": {}}
    started = time.perf_counter()
    def lap(name):
        out["seconds"][name] = round(time.perf_counter() - started, 1)
    key = jax.random.key(0)
    mesh = Mesh(np.array(jax.devices()), ("x",))
    mesh2 = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))

    def normal(i, shape):
        return jax.random.normal(jax.random.fold_in(key, i), shape)

    def spd(i, shape):
        *lead, n = shape[:-1]
        q = normal(i, (*shape[:-1], 2 * shape[-1]))
        return q @ jnp.swapaxes(q, -1, -2) / (2 * shape[-1]) + 0.01 * jnp.eye(shape[-1])

    # Leaves of every kind: a stacked kernel and a plain kernel of one block
    # shape (one group of 3 + 2 = 5 blocks, padded to 8), a row-parallel
    # kernel, a bias, a small vector with a Dense statistic, and a leaf
    # without a statistic.
    layout = {
        "stack": ((3, 16, 32), P(None, None, "x")),
        "dense": ((16, 32), P(None, "x")),
        "rows": ((32, 16), P("x", None)),
        "bias": ((32,), P("x")),
        "ia3": ((8,), P()),
        "norm": ((16,), P()),
    }
    M = 3
    base = {k: normal(100 + i, s) for i, (k, (s, _)) in enumerate(layout.items())}
    models = [
        {k: base[k] + 0.5 * normal(10 * m + i, s) for i, (k, (s, _)) in enumerate(layout.items())}
        for m in range(M)
    ]
    shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in layout.items()}

    def kernel_stats(m, kind):
        stats = {}
        for i, (k, in_axes, out_axes) in enumerate(
            [("stack", (1,), (2,)), ("dense", (0,), (1,)), ("rows", (0,), (1,))]
        ):
            shape = layout[k][0]
            lead = shape[:-2]
            a = spd(1000 + 10 * m + i, (*lead, shape[-2], shape[-2]))
            g = spd(2000 + 10 * m + i, (*lead, shape[-1], shape[-1]))
            stats[k] = (KFAC(a, g, in_axes, out_axes) if kind == "kfac"
                        else Gram(a, in_axes, out_axes))
        return stats

    def all_stats(m, kind):
        stats = kernel_stats(m, kind)
        if kind == "kfac":
            stats["bias"] = Diagonal(jnp.abs(normal(3000 + m, (32,))))
            stats["ia3"] = Dense(spd(4000 + m, (8, 8)))
        else:
            stats["bias"] = None
            stats["ia3"] = None
        stats["norm"] = None
        return {k: stats[k] for k in layout}

    kfacs = [all_stats(m, "kfac") for m in range(M)]
    grams = [all_stats(m, "gram") for m in range(M)]
    fishers = [{k: jnp.abs(normal(5000 + 10 * m + i, layout[k][0])) for i, k in enumerate(layout)}
               for m in range(M)]
    closed = [{**g, "bias": kf["bias"], "ia3": kf["ia3"]} for g, kf in zip(grams, kfacs)]

    s_base = jax.device_put(base, shardings)
    s_models = [jax.device_put(m, shardings) for m in models]
    s_kfacs = [shard_statistics(s, s_base) for s in kfacs]
    s_grams = [shard_statistics(s, s_base) for s in grams]
    s_closed = [shard_statistics(s, s_base) for s in closed]
    s_fishers = [jax.device_put(f, shardings) for f in fishers]
    weights = [1.0, 2.0, 0.5]
    init = mj.task_arithmetic(base, models, scale=0.4)
    s_init = mj.task_arithmetic(s_base, s_models, scale=0.4)

    methods = {
        "average": lambda b, ms, st, i: mj.average(ms, weights=weights),
        "task_arithmetic": lambda b, ms, st, i: mj.task_arithmetic(b, ms, scale=0.4),
        "ties_global": lambda b, ms, st, i: mj.ties(b, ms, density=0.3, trim="global"),
        "ties_per_leaf": lambda b, ms, st, i: mj.ties(b, ms, density=0.3, trim="per_leaf"),
        "dare": lambda b, ms, st, i: mj.dare(b, ms, drop_rate=0.4, key=key),
        "dare_ties": lambda b, ms, st, i: mj.dare(b, ms, drop_rate=0.4, key=key, sign_election=True),
        "fisher_merge": lambda b, ms, st, i: mj.fisher_merge(ms, st["fisher"], weights=weights).params,
        "regmean": lambda b, ms, st, i: mj.regmean(ms, st["gram"], alpha=0.8).params,
        "mats_kfac": lambda b, ms, st, i: mj.mats(ms, st["kfac"], init=i, maxiter=40, tol=0.0, weights=weights).params,
        "mats_kfac_precond": lambda b, ms, st, i: mj.mats(ms, st["kfac"], init=i, maxiter=10, tol=1e-6, preconditioner=True, damping=1e-3).params,
        "mats_gram_cg": lambda b, ms, st, i: mj.mats(ms, st["gram"], init=i, maxiter=40, tol=0.0, fallback=b).params,
        "solve_closed_form": lambda b, ms, st, i: mj.solve(ms, st["closed"], method="closed_form", damping=1e-2).params,
        "slerp": lambda b, ms, st, i: mj.slerp(ms[:2], t=0.3),
        "multislerp": lambda b, ms, st, i: mj.multislerp(ms, weights=weights),
        "multislerp_about_base": lambda b, ms, st, i: mj.multislerp(ms, weights=weights, base=b),
        "model_stock": lambda b, ms, st, i: mj.model_stock(b, ms),
        "model_stock_filter_wise": lambda b, ms, st, i: mj.model_stock(b, ms, filter_wise=True),
        "breadcrumbs": lambda b, ms, st, i: mj.breadcrumbs(b, ms, density=0.3, gamma=0.1, weights=weights),
        "breadcrumbs_ties": lambda b, ms, st, i: mj.breadcrumbs(b, ms, density=0.3, gamma=0.1, sign_election=True),
        "della": lambda b, ms, st, i: mj.della(b, ms, density=0.5, epsilon=0.2, key=key, weights=weights),
        "della_linear": lambda b, ms, st, i: mj.della(b, ms, density=0.5, epsilon=0.2, key=key, sign_election=False),
        "tsv_m": lambda b, ms, st, i: mj.tsv_m(b, ms, weights=weights),
        "iso_c": lambda b, ms, st, i: mj.iso_c(b, ms, scale=0.8, weights=weights),
        "iso_cts": lambda b, ms, st, i: mj.iso_cts(b, ms, common_fraction=0.5),
    }
    single_stats = {"kfac": kfacs, "gram": grams, "fisher": fishers, "closed": closed}
    sharded_stats = {"kfac": s_kfacs, "gram": s_grams, "fisher": s_fishers, "closed": s_closed}
    out["methods"] = {}
    for name, fn in methods.items():
        ref = fn(base, models, single_stats, init)
        got = fn(s_base, s_models, sharded_stats, s_init)
        out["methods"][name] = {
            k: {
                "max_abs_diff": float(np.max(np.abs(np.asarray(ref[k]) - np.asarray(got[k])))),
                "scale": float(np.max(np.abs(np.asarray(ref[k])))),
                "same_sharding": bool(got[k].sharding.is_equivalent_to(shardings[k], got[k].ndim)),
                "spec": str(got[k].sharding.spec) if hasattr(got[k].sharding, "spec") else None,
            }
            for k in layout
        }
    lap("methods")
    # The streaming engine's consuming merge on the mesh: a staged method's
    # two programs (the inputs deleted in between) give the one-program merge
    # and keep the leaves' shardings.
    from mats_jax.engine import check_inputs, merge_checked
    from mats_jax.method import MethodCall
    def fresh(tree):
        return jax.tree.map(lambda x: jax.device_put(np.asarray(x), x.sharding), tree)
    ta = mj.get_method("task_arithmetic")
    consumed = {
        "mats_kfac": ("mats", dict(init=MethodCall(ta, ta.parameters(scale=0.4)), maxiter=40, tol=0.0), "kfac"),
        "mats_kfac_precond": ("mats", dict(maxiter=10, tol=1e-6, preconditioner=True, damping=1e-3), "kfac"),
        "solve_closed_form": ("mats", dict(method="closed_form", damping=1e-2), "closed"),
        "regmean": ("regmean", dict(alpha=0.8), "gram"),
        "ties_global": ("ties", dict(density=0.3), None),
    }
    out["consumed"] = {}
    for name, (method_name, kw, kind) in consumed.items():
        method = mj.get_method(method_name)
        params = method.parameters(**kw)
        def run(consume):
            b, ms = fresh(s_base), fresh(s_models)
            st = fresh(sharded_stats[kind]) if kind else None
            inputs, paths, placement = check_inputs(
                method, params, models=ms, base=b, statistics=st, weights=weights)
            got = merge_checked(method, params, inputs, placement=placement, paths=paths,
                                consume=consume).params
            taken = (ms, b if method.needs(params).base else None, st)
            return got, all(x.is_deleted() for x in jax.tree.leaves(taken))
        ref, _ = run(False)
        got, deleted = run(True)
        out["consumed"][name] = {
            "staged": method.staged,
            "deleted": deleted,
            "max_abs_diff": max(float(np.max(np.abs(np.asarray(ref[k]) - np.asarray(got[k])))) for k in layout),
            "same_sharding": all(got[k].sharding.is_equivalent_to(shardings[k], got[k].ndim) for k in layout),
        }
    lap("consumed")
    # The report of a sharded solve: the same iterations, on every process.
    r_single = mj.mats(models, kfacs, init=init, maxiter=200, tol=1e-5).report
    r_shard = mj.mats(s_models, s_kfacs, init=s_init, maxiter=200, tol=1e-5).report
    out["report_iterations"] = [
        [np.asarray(r_single[k].iterations).tolist(), np.asarray(r_shard[k].iterations).tolist(),
         bool(r_shard[k].iterations.is_fully_replicated)]
        for k in ("stack", "dense", "rows", "bias", "ia3")
    ]

    lap("report")
    # Statistics, data and model parallel: a two-layer MLP, kernels sharded
    # over "model", examples over "data".
    params = {"w1": normal(1, (6, 16)), "b1": jnp.zeros(16), "w2": normal(2, (16, 8))}
    p_shardings = {"w1": NamedSharding(mesh2, P(None, "model")), "b1": NamedSharding(mesh2, P("model")),
                   "w2": NamedSharding(mesh2, P("model", None))}
    s_params = jax.device_put(params, p_shardings)
    def fn(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
    x = normal(3, (40, 6))
    y = jax.random.randint(key, (40,), 0, 8)
    batches = [{"inputs": x[:24], "labels": y[:24]}, {"inputs": x[24:], "labels": y[24:]}]
    out["stats"] = {}
    for est in ("kfac", "gram", "diagonal_fisher"):
        f = getattr(mj, est)
        single = f(fn, params, batches, micro_batch_size=8, progress=False)
        sharded = f(fn, s_params, batches, micro_batch_size=8, mesh=mesh2, progress=False)
        flat_single = jax.tree.leaves(single)
        flat_sharded = jax.tree.leaves(sharded)
        out["stats"][est] = {
            "max_abs_diff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(flat_single, flat_sharded)),
            "specs": {
                path: str(leaf.sharding.spec)
                for path, leaf in (
                    (jax.tree_util.keystr(p), l) for p, l in jax.tree_util.tree_flatten_with_path(sharded)[0]
                )
            },
        }

    lap("statistics")
    # Per-device memory of the compiled solver: 16 layers of 64 x 64, K-FAC,
    # the layer axis sharded 8 ways (as nn.scan stacks layers), against the
    # same solve on one device; and the kernels' output axis sharded instead.
    def memory(models, stats):
        lowered = mj.lower_solve(models, stats, maxiter=100, tol=0.0)
        m = lowered.compile().memory_analysis()
        return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
                "temp": m.temp_size_in_bytes,
                "total": m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes}
    big = [{"layers": normal(50 + m, (16, 64, 64))} for m in range(2)]
    big_stats = [{"layers": KFAC(spd(60 + m, (16, 64, 64)), spd(70 + m, (16, 64, 64)), (1,), (2,))} for m in range(2)]
    out["memory"] = {"single": memory(big, big_stats)}
    for name, spec in (("layers", P("x", None, None)), ("outputs", P(None, None, "x"))):
        sh = {"layers": NamedSharding(mesh, spec)}
        sm = [jax.device_put(m, sh) for m in big]
        ss = [shard_statistics(s, sm[0]) for s in big_stats]
        out["memory"][name] = memory(sm, ss)
        ref = mj.mats(big, big_stats, maxiter=100, tol=0.0).params["layers"]
        got = mj.mats(sm, ss, maxiter=100, tol=0.0).params["layers"]
        out["memory"][name]["max_abs_diff"] = float(np.max(np.abs(np.asarray(ref) - np.asarray(got))))

    # TIES's whole-model threshold on a sharded model: histograms per device,
    # no task vector gathered onto one device.
    wide = {"w": jnp.zeros((64, 1024))}
    wide_models = [{"w": normal(80 + m, (64, 1024))} for m in range(3)]
    wide_sh = {"w": NamedSharding(mesh, P(None, "x"))}
    s_wide = jax.device_put(wide, wide_sh)
    s_wide_models = [jax.device_put(m, wide_sh) for m in wide_models]
    one = mj.lower_merge("ties", base=wide, models=wide_models, density=0.2).compile()
    eight = mj.lower_merge(
        "ties", base=s_wide, models=s_wide_models, density=0.2
    ).compile()
    out["ties_memory"] = {
        "single_temp": one.memory_analysis().temp_size_in_bytes,
        "sharded_temp": eight.memory_analysis().temp_size_in_bytes,
        "all_gathers": eight.as_text().count("all-gather("),
    }
    lap("memory")
    # Inputs on two different meshes are refused, naming both.
    other = Mesh(np.array(jax.devices()[:4]), ("x",))
    out["two_meshes"] = {}
    elsewhere = jax.device_put(models[1], NamedSharding(other, P()))
    for name, call in (
        ("average", lambda: mj.average([s_models[0], elsewhere])),
        ("ties", lambda: mj.ties(s_base, [s_models[0], elsewhere], density=0.5)),
        ("mats", lambda: mj.mats([s_models[0], elsewhere], s_kfacs[:2])),
    ):
        try:
            call()
            out["two_meshes"][name] = "no error"
        except MergeInputError as e:
            out["two_meshes"][name] = str(e)
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def measured():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


METHODS = [
    "average",
    "task_arithmetic",
    "ties_global",
    "ties_per_leaf",
    "dare",
    "dare_ties",
    "fisher_merge",
    "regmean",
    "mats_kfac",
    "mats_kfac_precond",
    "mats_gram_cg",
    "solve_closed_form",
    "slerp",
    "multislerp",
    "multislerp_about_base",
    "model_stock",
    "model_stock_filter_wise",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "tsv_m",
    "iso_c",
    "iso_cts",
]


@pytest.mark.parametrize("method", METHODS)
def test_sharded_merge_equals_the_single_device_merge(measured, method):
    for leaf, seen in measured["methods"][method].items():
        assert seen["max_abs_diff"] <= 1e-5 * max(1.0, seen["scale"]), (leaf, seen)


@pytest.mark.parametrize(
    "method",
    ["mats_kfac", "mats_kfac_precond", "solve_closed_form", "regmean", "ties_global"],
)
def test_consuming_merge_on_a_mesh_equals_the_one_program_merge(measured, method):
    seen = measured["consumed"][method]
    assert seen["staged"] == (method != "ties_global")
    assert seen["deleted"], seen  # every input it took is freed
    assert seen["max_abs_diff"] <= 1e-6, seen
    assert seen["same_sharding"], seen


@pytest.mark.parametrize("method", METHODS)
def test_merged_leaves_keep_their_input_sharding(measured, method):
    for leaf, seen in measured["methods"][method].items():
        assert seen["same_sharding"], (leaf, seen["spec"])


def test_sharded_solve_reports_the_same_iterations_on_every_device(measured):
    for single, sharded, replicated in measured["report_iterations"]:
        assert single == sharded
        assert replicated


def test_statistics_data_and_model_parallel_equal_single_device(measured):
    for estimator, seen in measured["stats"].items():
        assert seen["max_abs_diff"] < 1e-5, estimator


def test_statistics_come_out_sharded_like_their_kernels(measured):
    # w1 is (6, 16) sharded over "model" on its output axis, w2 (16, 8) on its
    # input axis, b1 over "model". w2's G borrows its input split; w1's A
    # cannot (6 rows over 4 devices).
    assert measured["stats"]["kfac"]["specs"] == {
        "['b1'].f": "P('model',)",
        "['w1'].a": "P(None, None)",
        "['w1'].g": "P('model', None)",
        "['w2'].a": "P('model', None)",
        "['w2'].g": "P('model', None)",
    }
    assert (
        measured["stats"]["diagonal_fisher"]["specs"]["['w1'].f"] == "P(None, 'model')"
    )


def test_solver_memory_per_device_is_an_eighth_when_blocks_are_sharded_8_ways(measured):
    single = measured["memory"]["single"]["total"]
    sharded = measured["memory"]["layers"]
    assert sharded["max_abs_diff"] == 0.0
    ratio = sharded["total"] / single
    assert 0.1 < ratio < 0.15, ratio
    assert sharded["temp"] / measured["memory"]["single"]["temp"] < 0.15


def test_solver_memory_with_kernels_sharded_on_their_output_axis(measured):
    # Kernels split on the output axis: the solver reshards them to whole
    # blocks per device, which costs some temporary memory over 1/8.
    single = measured["memory"]["single"]
    sharded = measured["memory"]["outputs"]
    assert sharded["max_abs_diff"] == 0.0
    assert sharded["arguments"] / single["arguments"] < 0.15
    assert sharded["total"] / single["total"] < 0.25


def test_ties_global_threshold_on_a_sharded_model_gathers_nothing(measured):
    seen = measured["ties_memory"]
    assert seen["all_gathers"] == 0
    assert seen["sharded_temp"] / seen["single_temp"] < 0.25, seen


def test_inputs_on_two_meshes_are_refused_before_any_work(measured):
    for method, message in measured["two_meshes"].items():
        assert "different meshes" in message, (method, message)
        assert "8 devices" in message and "4 devices" in message


# --- in-process, one device -----------------------------------------------


def test_statistic_sharding_follows_the_kernel_axes():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    kernel = NamedSharding(mesh, PartitionSpec("data", None, "model"))  # (L, in, out)
    stat = KFAC(jnp.zeros((2, 3, 3)), jnp.zeros((2, 4, 4)), (1,), (2,))
    placed = statistic_sharding(stat, kernel)
    # A's kernel axis (in) is not split: it borrows the output axis's split.
    assert placed.a.spec == PartitionSpec("data", "model", None)
    assert placed.g.spec == PartitionSpec("data", "model", None)
    column = NamedSharding(mesh, PartitionSpec(None, "model"))
    placed = statistic_sharding(KFAC(jnp.zeros((3, 3)), jnp.zeros((4, 4))), column)
    assert placed.a.spec == PartitionSpec("model", None)
    assert placed.g.spec == PartitionSpec("model", None)
    gram = statistic_sharding(
        Gram(jnp.zeros((3, 3))), NamedSharding(mesh, PartitionSpec("model"))
    )
    assert gram.a.spec == PartitionSpec("model", None)
    assert (
        statistic_sharding(Dense(jnp.zeros((4, 4))), kernel).f.spec == PartitionSpec()
    )
    diag = NamedSharding(mesh, PartitionSpec(None, "model"))
    assert statistic_sharding(Diagonal(jnp.zeros((2, 2))), diag).f is diag
    # Several input axes: rows are sharded only through the first one.
    multi = KFAC(jnp.zeros((6, 6)), jnp.zeros((4, 4)), (0, 1), (2,))
    spec = NamedSharding(mesh, PartitionSpec("data", "model", None))
    assert statistic_sharding(multi, spec).a.spec == PartitionSpec(None, None)


def test_shard_statistics_keeps_values_and_validates():
    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    params = {
        "k": jax.device_put(
            jnp.ones((4, 2)), NamedSharding(mesh, PartitionSpec("model"))
        ),
        "b": jnp.ones(2),
    }
    stats = {"k": KFAC(2 * jnp.eye(4), jnp.eye(2)), "b": None}
    placed = shard_statistics(stats, params)
    np.testing.assert_array_equal(placed["k"].a, stats["k"].a)
    assert placed["b"] is None
    from mats_jax import MergeInputError

    with pytest.raises(MergeInputError, match="k"):
        shard_statistics({"k": KFAC(jnp.eye(3), jnp.eye(2)), "b": None}, params)


def test_input_mesh_is_none_for_single_device_arrays():
    assert input_mesh({"w": jnp.ones(3)}, [None, np.ones(2)]) is None


def test_grouped_blocks_with_different_layouts_solve_like_ungrouped():
    # A stacked kernel (layer, in, out) and a plain (in, out) kernel share a
    # block shape, so the solver batches them although their axes differ.
    from mats_jax import mats

    key = jax.random.PRNGKey(3)

    def spd(k, n):
        q = jax.random.normal(k, (n, 2 * n))
        return q @ q.T / (2 * n)

    models = [
        {
            "stack": jax.random.normal(jax.random.fold_in(key, m), (2, 3, 4)),
            "dense": jax.random.normal(jax.random.fold_in(key, 10 + m), (3, 4)),
        }
        for m in range(2)
    ]
    stats = [
        {
            "stack": KFAC(
                jnp.stack(
                    [spd(jax.random.fold_in(key, 20 + m + i), 3) for i in range(2)]
                ),
                jnp.stack(
                    [spd(jax.random.fold_in(key, 30 + m + i), 4) for i in range(2)]
                ),
                (1,),
                (2,),
            ),
            "dense": KFAC(
                spd(jax.random.fold_in(key, 40 + m), 3),
                spd(jax.random.fold_in(key, 50 + m), 4),
            ),
        }
        for m in range(2)
    ]
    grouped = mats(models, stats, maxiter=30, tol=0.0)
    alone = mats(models, stats, maxiter=30, tol=0.0, group_blocks=False)
    for name in ("stack", "dense"):
        np.testing.assert_allclose(
            grouped.params[name], alone.params[name], rtol=1e-5, atol=1e-6
        )
