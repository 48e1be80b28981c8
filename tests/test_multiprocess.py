"""Two processes, one merge: statistics on each process's own data, MaTS, one checkpoint.

Each process runs with 4 simulated CPU devices and joins the other through
``jax.distributed`` on localhost (gloo CPU collectives), so the mesh has 8
devices: ("data", "model") = (2, 4), one data row per process. Each process
holds half of every task's examples; the kernels are sharded over "model".
The statistics themselves (gathered from both processes) must equal a
single-process estimate over the union of the data, and the merged
parameters, saved once by both processes together (and restored by each
straight into the merge's shardings), a plain single-device merge. The merge
alone would not do: it does not change when every task's statistics are
scaled alike, as a wrong example count (not summed over processes) scales
them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from mats_jax import kfac, mats, task_arithmetic
from mats_jax.io import load_orbax

# Shared by the workers and the single-process reference: the model, the
# tasks and their data, all from fixed seeds.
COMMON = textwrap.dedent(
    """
    import numpy as np

    TASKS, EXAMPLES, BATCH = 2, 48, 12  # per task; BATCH examples per process and step

    def fn(p, x):
        import jax.numpy as jnp
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    def base_params():
        rng = np.random.default_rng(0)
        return {"w1": rng.normal(size=(6, 16)).astype(np.float32),
                "b1": np.zeros(16, np.float32),
                "w2": rng.normal(size=(16, 8)).astype(np.float32)}

    def task_params(t):
        rng = np.random.default_rng(10 + t)
        return {k: v + 0.3 * rng.normal(size=v.shape).astype(np.float32)
                for k, v in base_params().items()}

    def task_data(t):
        rng = np.random.default_rng(100 + t)
        x = rng.normal(size=(EXAMPLES, 6)).astype(np.float32) + t
        return x

    def process_batches(t, process):
        # Process p holds rows [p * EXAMPLES / 2, (p + 1) * EXAMPLES / 2).
        x = task_data(t)
        half = EXAMPLES // 2
        mine = x[process * half:(process + 1) * half]
        return [{"inputs": mine[i:i + BATCH]} for i in range(0, half, BATCH)]
    """
)

WORKER = textwrap.dedent(
    """
    import os, sys
    process, port, out, stats_out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=process
    )
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from mats_jax import kfac, mats, task_arithmetic
    from mats_jax.io import load_orbax, save_orbax
    exec(COMMON)

    assert jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None)}

    def on_mesh(tree):
        return {k: jax.make_array_from_callback(
                    v.shape, NamedSharding(mesh, specs[k]), lambda i, v=v: v[i])
                for k, v in tree.items()}

    base = on_mesh(base_params())
    models = [on_mesh(task_params(t)) for t in range(TASKS)]
    stats = [
        kfac(fn, models[t], process_batches(t, process), micro_batch_size=2 * BATCH,
             mesh=mesh, progress=False)
        for t in range(TASKS)
    ]
    # Every statistic gathered whole (each process holds only its shards).
    gathered = multihost_utils.process_allgather(stats, tiled=True)
    if process == 0:
        np.savez(stats_out, **{f"{t}_{i}": np.asarray(x)
                               for t, task in enumerate(gathered)
                               for i, x in enumerate(jax.tree.leaves(task))})
    init = task_arithmetic(base, models, scale=0.5)
    result = mats(models, stats, init=init, maxiter=100, tol=1e-6)
    merged = result.params
    # The report is replicated: every process reads all of it.
    iterations = {k: np.asarray(r.iterations).tolist() for k, r in result.report.items()}
    assert iterations["w1"][0] > 0, iterations
    for k, v in merged.items():
        assert v.sharding.is_equivalent_to(NamedSharding(mesh, specs[k]), v.ndim), k
        assert not v.is_fully_addressable
    save_orbax(out, merged)
    # Restored straight into the merge's shardings: each process reads its shards.
    restored = load_orbax(out, shardings={k: v.sharding for k, v in merged.items()})
    for k, v in merged.items():
        assert restored[k].sharding.is_equivalent_to(v.sharding, v.ndim), k
        for mine, theirs in zip(restored[k].addressable_shards, v.addressable_shards):
            assert mine.index == theirs.index
            np.testing.assert_array_equal(np.asarray(mine.data), np.asarray(theirs.data))
    jax.distributed.shutdown()
    print("done", process)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_estimate_and_merge_like_one(tmp_path):
    out, stats_out = tmp_path / "merged", tmp_path / "statistics.npz"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    script = f"COMMON = {COMMON!r}\n" + WORKER
    port = str(_free_port())
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(p), port, str(out), str(stats_out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for p in range(2)
    ]
    try:
        results = [w.communicate(timeout=300) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    for p, (w, (stdout, stderr)) in enumerate(zip(workers, results, strict=True)):
        assert w.returncode == 0, f"process {p}:\n{stderr[-4000:]}"
        assert f"done {p}" in stdout

    # The same merge in this process, on one device, over all the data: each
    # step's micro-batch is process 0's batch followed by process 1's.
    scope: dict = {}
    exec(COMMON, scope)
    base = jax.tree.map(jnp.asarray, scope["base_params"]())
    models = [jax.tree.map(jnp.asarray, scope["task_params"](t)) for t in range(2)]
    stats = []
    for t in range(2):
        halves = [scope["process_batches"](t, p) for p in range(2)]
        batches = [
            {"inputs": np.concatenate([a["inputs"], b["inputs"]])}
            for a, b in zip(*halves, strict=True)
        ]
        stats.append(
            kfac(scope["fn"], models[t], batches, micro_batch_size=24, progress=False)
        )
    # The statistics: each process saw half the examples, so a count of
    # examples not summed over processes would double G and the diagonal
    # Fisher of the bias (A is normalised by rows counted on the devices).
    gathered = np.load(stats_out)
    for t in range(2):
        with_paths = jax.tree_util.tree_flatten_with_path(stats[t])[0]
        for i, (path, want) in enumerate(with_paths):
            # Partial sums per process, then an all-reduce: float32 rounding.
            np.testing.assert_allclose(
                gathered[f"{t}_{i}"],
                want,
                rtol=1e-5,
                atol=1e-6 * float(np.max(np.abs(want))),
                err_msg=f"task {t}, {jax.tree_util.keystr(path)}",
            )
    assert len(gathered.files) == sum(len(jax.tree.leaves(s)) for s in stats)
    init = task_arithmetic(base, models, scale=0.5)
    expected = mats(models, stats, init=init, maxiter=100, tol=1e-6).params

    saved = load_orbax(out)
    assert set(saved) == set(expected)
    for name in expected:
        # The statistics are summed in another order (each process's partial
        # sums, then an all-reduce): differences of float32 rounding, which CG
        # amplifies by the systems' conditioning, to about 1e-5 here.
        scale = float(np.max(np.abs(expected[name])))
        np.testing.assert_allclose(
            saved[name], expected[name], rtol=1e-4, atol=1e-4 * scale
        )
        assert not np.array_equal(saved[name], base[name])
