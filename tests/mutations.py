"""Planted bugs the tests must catch: a repeatable mutation check.

Each mutation is a small textual patch of the library (a file, an exact text
that occurs there once, its replacement) and the test files that should
catch it. For each one this script copies the repository (the working tree,
without caches or virtual environments) to a temporary directory, applies
the patch there, runs the named test files in the copy with ``PYTHONPATH``
set to it, and reports whether they failed (caught) or passed (NOT caught),
naming the tests that failed. A baseline run of the same test files on an
unpatched copy comes first, so that a test failing anyway cannot pass for a
catch.

Hypothesis runs with a fixed seed (``--hypothesis-seed=0``), so a property
test catches a mutation or not the same way every run, and without shrinking
(a plugin module written into the copy registers that profile): a shrunk
counterexample costs minutes and says nothing more here.

Run it from anywhere (it finds the repository from its own path)::

    python tests/mutations.py                 # baseline, then every mutation
    python tests/mutations.py --list          # names and descriptions only
    python tests/mutations.py damping-rhs-without-init fisher-floor-ignored
    python tests/mutations.py --markdown      # also print the README table

The exit status is 1 if any mutation survives, its patch no longer applies,
or the baseline fails. The file is not collected by pytest (its name does not
start with ``test_``) and does nothing on import.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
IGNORED = shutil.ignore_patterns(
    ".git",
    ".venv",
    "__pycache__",
    ".hypothesis",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "*.egg-info",
    "build",
    "dist",
    "_build",
)


class Mutation(NamedTuple):
    name: str
    description: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]


SOLVER = "mats_jax/solver/solve.py"
STATISTIC = "mats_jax/stats/statistic.py"
FISHER = "mats_jax/merge/fisher.py"
ACCUMULATE = "mats_jax/stats/accumulate.py"
ESTIMATE = "mats_jax/stats/estimate.py"
# The relative damping δ of a group of blocks, in the CG step.
DAMPING = (
    "        delta = jnp.asarray(options.damping, x0.dtype) * sum_of(\n"
    "            s.diagonal_mean() for s in stats\n"
    "        )\n"
)
SOLVER_TESTS = ("tests/test_solver.py", "tests/test_properties.py")
ESTIMATOR_TESTS = ("tests/test_estimators.py",)

MUTATIONS = (
    # The three that the first mutation round found uncaught.
    Mutation(
        "damping-rhs-without-init",
        "the damped right-hand side drops δ·θ_init (damping pulls toward zero)",
        SOLVER,
        "        rhs = b + per_block(delta, x0) * x0\n",
        "        rhs = b\n",
        SOLVER_TESTS,
    ),
    Mutation(
        "fisher-floor-ignored",
        "fisher_merge ignores its floor",
        FISHER,
        "    return Diagonal(jnp.maximum(stat.f.astype(jnp.float32), params.floor))\n",
        "    return Diagonal(stat.f.astype(jnp.float32))\n",
        SOLVER_TESTS,
    ),
    Mutation(
        "process-count-not-summed",
        "the example count is not summed over processes",
        ACCUMULATE,
        "        seen = int(np.sum(multihost_utils.process_allgather(np.int64(seen))))\n",
        "        seen = int(seen)\n",
        ("tests/test_multiprocess.py",),
    ),
    # Damping.
    Mutation(
        "damping-sign-in-matvec",
        "the matvec subtracts δ·x instead of adding it",
        SOLVER,
        "    return sum_of(s.matvec(x) for s in stats) + per_block(delta, x) * x\n",
        "    return sum_of(s.matvec(x) for s in stats) - per_block(delta, x) * x\n",
        SOLVER_TESTS,
    ),
    Mutation(
        "damping-one-delta-per-group",
        "one δ for every block of a group (mean of the blocks' mean diagonals)",
        SOLVER,
        DAMPING,
        "        delta = jnp.asarray(options.damping, x0.dtype) * jnp.mean(\n"
        "            sum_of(s.diagonal_mean() for s in stats)\n"
        "        ) * jnp.ones(x0.shape[:1], x0.dtype)\n",
        SOLVER_TESTS,
    ),
    Mutation(
        "damping-not-relative",
        "δ is the damping itself, not damping × mean diagonal",
        SOLVER,
        DAMPING,
        "        delta = jnp.asarray(options.damping, x0.dtype) * jnp.ones(x0.shape[:1], x0.dtype)\n",
        SOLVER_TESTS,
    ),
    # The Fisher floor.
    Mutation(
        "fisher-floor-added",
        "the floor is added to the Fisher (F + ε) instead of a maximum",
        FISHER,
        "    return Diagonal(jnp.maximum(stat.f.astype(jnp.float32), params.floor))\n",
        "    return Diagonal(stat.f.astype(jnp.float32) + params.floor)\n",
        SOLVER_TESTS,
    ),
    Mutation(
        "fisher-floor-before-validation",
        "the floor is applied before validation (a negative Fisher is floored away)",
        FISHER,
        "        statistics=[_as_diagonal(f) for f in fishers],\n",
        "        statistics=[\n"
        "            jax.tree.map(\n"
        "                lambda s: floor_fisher(s, FisherParameters(floor=floor)),\n"
        "                _as_diagonal(f),\n"
        "                is_leaf=lambda x: x is None or isinstance(x, Statistic),\n"
        "            )\n"
        "            for f in fishers\n"
        "        ],\n",
        ("tests/test_bad_input.py", "tests/test_solver.py"),
    ),
    # Across processes.
    Mutation(
        "process-count-summed-twice",
        "each process counts its examples times the process count, then sums",
        ACCUMULATE,
        "            seen += _real_examples(batch, batch_size)\n",
        "            seen += _real_examples(batch, batch_size) * jax.process_count()\n",
        ("tests/test_multiprocess.py",),
    ),
    # Statistics that the tests read only for their shape or mean before.
    Mutation(
        "kfac-g-per-row",
        "G is divided by the rows (tokens, uses) instead of the examples",
        STATISTIC,
        '            sums["output_gradients"] / examples,\n',
        '            sums["output_gradients"] / jnp.maximum(sums["rows"], 1.0),\n',
        ESTIMATOR_TESTS,
    ),
    Mutation(
        "kfac-g-first-use-only",
        "G of a kernel used several times keeps only its first use",
        ESTIMATE,
        '                    if "output_gradients" in entry:\n',
        '                    if "output_gradients" in entry and t == kern.taps[0]:\n',
        ESTIMATOR_TESTS,
    ),
    Mutation(
        "inputs-flattened-in-reverse-axis-order",
        "a kernel's several input axes (an output projection's heads, head_dim) "
        "are flattened in reverse order for A",
        "mats_jax/stats/capture.py",
        "            + tuple(lead + a for a in self.x_free + self.x_contract)\n",
        "            + tuple(lead + a for a in self.x_free + tuple(reversed(self.x_contract)))\n",
        ESTIMATOR_TESTS,
    ),
    Mutation(
        "kfac-diagonal-mean-over-all-blocks",
        "KFAC's mean diagonal is one value for all its blocks",
        STATISTIC,
        "        return mean_diag(self.a) * mean_diag(self.g)\n",
        "        return jnp.mean(mean_diag(self.a) * mean_diag(self.g)) * jnp.ones(\n"
        "            self.a.shape[:1]\n"
        "        )\n",
        ("tests/test_statistic.py", "tests/test_solver.py"),
    ),
    Mutation(
        "sampled-labels-summed",
        "the sampled Fisher sums its n labels' outer products instead of averaging",
        "mats_jax/stats/likelihood.py",
        "        u = (jax.nn.one_hot(draws, n_classes) - p[None]) / jnp.sqrt(float(num_samples))\n",
        "        u = jax.nn.one_hot(draws, n_classes) - p[None]\n",
        ESTIMATOR_TESTS,
    ),
    Mutation(
        "masked-examples-counted",
        "examples whose mask is all zero still count in N",
        ACCUMULATE,
        "    return int(np.sum(mask.max(axis=1) > 0))\n",
        "    return batch_size\n",
        ESTIMATOR_TESTS,
    ),
    # Spherical interpolation and Model Stock.
    Mutation(
        "slerp-no-parallel-fallback",
        "SLERP divides by sin Ω for nearly parallel vectors instead of interpolating linearly",
        "mats_jax/merge/slerp.py",
        "        (jnp.abs(cos) > DOT_THRESHOLD) | (nx.reshape(()) == 0) | (ny.reshape(()) == 0)\n",
        "        (nx.reshape(()) == 0) | (ny.reshape(()) == 0)\n",
        ("tests/test_slerp.py",),
    ),
    Mutation(
        "multislerp-one-step",
        "multi-SLERP stops after one step from the normalised mean (mergekit's result)",
        "mats_jax/merge/slerp.py",
        "    limit = jnp.where(defined, max_iterations, 0)\n",
        "    limit = jnp.where(defined, 1, 0)\n",
        ("tests/test_slerp.py",),
    ),
    Mutation(
        "model-stock-ratio-off-by-one",
        "Model Stock's ratio uses k − 1 for k in its numerator",
        "mats_jax/merge/model_stock.py",
        "    return k * cos / ((k - 1) * cos + 1)\n",
        "    return (k - 1) * cos / ((k - 1) * cos + 1)\n",
        ("tests/test_model_stock.py",),
    ),
    Mutation(
        "model-stock-negative-cosine",
        "Model Stock does not clip a negative mean cosine at 0",
        "mats_jax/merge/model_stock.py",
        "    cos = jnp.clip(sum_of(cosines) / len(cosines), 0.0, 1.0)\n",
        "    cos = jnp.minimum(sum_of(cosines) / len(cosines), 1.0)\n",
        ("tests/test_model_stock.py",),
    ),
    # TSV-M, ISO-C and ISO-CTS.
    Mutation(
        "svd-full-polar-factor",
        "the orthogonalisation keeps the arbitrary completion of a rank-deficient basis",
        "mats_jax/merge/svd.py",
        "    kept = (s > rank_cutoff(s, x.shape)).astype(x.dtype)\n",
        "    kept = jnp.ones_like(s)\n",
        ("tests/test_svd_methods.py",),
    ),
    Mutation(
        "tsv-m-not-orthogonalised",
        "TSV-M adds the tasks' truncated SVDs without orthogonalising the bases",
        "mats_jax/merge/svd.py",
        "    return (nearest_orthonormal(u) * s) @ nearest_orthonormal(v).T\n",
        "    return (u * s) @ v.T\n",
        ("tests/test_svd_methods.py",),
    ),
    Mutation(
        "iso-c-mean-over-the-range",
        "ISO-C's mean singular value is taken over the sum's range, not all r",
        "mats_jax/merge/svd.py",
        "    return jnp.mean(s) * ((u * kept) @ vt)\n",
        "    return jnp.sum(s) / jnp.maximum(jnp.sum(kept), 1) * ((u * kept) @ vt)\n",
        ("tests/test_svd_methods.py",),
    ),
    Mutation(
        "iso-cts-common-not-projected-out",
        "ISO-CTS takes each task's top directions without removing the common subspace",
        "mats_jax/merge/svd.py",
        "            outside = delta - u_c @ (u_c.T @ delta)\n",
        "            outside = delta\n",
        ("tests/test_svd_methods.py",),
    ),
    Mutation(
        "svd-fallback-unweighted",
        "the SVD methods' fallback leaves ignore the weights",
        "mats_jax/merge/svd.py",
        "                delta = sum_of(weighted) / len(weighted)\n",
        "                delta = sum_of(leaves) / len(leaves)\n",
        ("tests/test_svd_methods.py",),
    ),
    # Model Breadcrumbs and DELLA.
    Mutation(
        "breadcrumbs-gamma-floor",
        "Breadcrumbs drops ⌊γN⌋ outliers instead of ⌈γN⌉",
        "mats_jax/merge/breadcrumbs.py",
        "    dropped = jnp.ceil(jnp.float32(gamma) * jnp.float32(size)).astype(jnp.int32)\n",
        "    dropped = jnp.floor(jnp.float32(gamma) * jnp.float32(size)).astype(jnp.int32)\n",
        ("tests/test_breadcrumbs.py",),
    ),
    Mutation(
        "breadcrumbs-top-of-band-excluded",
        "Breadcrumbs drops the entries tied with the (d + 1)-th magnitude too",
        "mats_jax/merge/breadcrumbs.py",
        "        out.append(jnp.where((magnitude >= low[m]) & (magnitude <= high[m]), v, 0))\n",
        "        out.append(jnp.where((magnitude >= low[m]) & (magnitude < high[m]), v, 0))\n",
        ("tests/test_breadcrumbs.py",),
    ),
    Mutation(
        "della-probabilities-reversed",
        "DELLA gives the largest magnitudes the largest drop probability",
        "mats_jax/merge/della.py",
        "    keep = (rho - eps) + 2 * eps * position\n",
        "    keep = (rho + eps) - 2 * eps * position\n",
        ("tests/test_della.py",),
    ),
    Mutation(
        "della-ties-by-position",
        "DELLA ranks tied magnitudes by position instead of sharing their mean rank",
        "mats_jax/merge/della.py",
        "        return (below + at_most - 1).astype(jnp.float32) / 2\n",
        "        return below.astype(jnp.float32)\n",
        ("tests/test_della.py",),
    ),
    Mutation(
        "della-no-rescale",
        "DELLA keeps the entries it does not drop without dividing by 1 − p_i",
        "mats_jax/merge/della.py",
        "        kept = v / keep.astype(v.dtype) if rescale else v\n",
        "        kept = v\n",
        ("tests/test_della.py",),
    ),
)


class Outcome(NamedTuple):
    status: str  # "caught", "NOT caught", "patch does not apply", "error"
    failed: tuple[str, ...]
    seconds: float
    output: str


PROFILE_PLUGIN = "mutation_check_profile"
PROFILE = """\
from hypothesis import Phase, settings

settings.register_profile(
    "mutations",
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    print_blob=False,
)
"""


def copy_repository(into: Path) -> Path:
    target = into / "repo"
    shutil.copytree(ROOT, target, ignore=IGNORED, symlinks=True)
    (target / f"{PROFILE_PLUGIN}.py").write_text(PROFILE)
    return target


def apply(mutation: Mutation, repo: Path) -> bool:
    path = repo / mutation.path
    text = path.read_text()
    if text.count(mutation.old) != 1:
        return False
    path.write_text(text.replace(mutation.old, mutation.new))
    return True


def run_tests(repo: Path, tests: Sequence[str]) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    command = [
        sys.executable,
        "-m",
        "pytest",
        *tests,
        "-q",
        "-rf",
        "-p",
        "no:cacheprovider",
        "-p",
        PROFILE_PLUGIN,
        "--hypothesis-profile=mutations",
        "--hypothesis-seed=0",
    ]
    done = subprocess.run(
        command, cwd=repo, env=env, capture_output=True, text=True, check=False
    )
    return done.returncode, done.stdout + done.stderr


def failed_tests(output: str) -> tuple[str, ...]:
    names = re.findall(
        r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", output, flags=re.MULTILINE
    )
    return tuple(dict.fromkeys(names))


def check(mutation: Mutation | None, tests: Sequence[str]) -> Outcome:
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mats-mutation-") as tmp:
        repo = copy_repository(Path(tmp))
        if mutation is not None and not apply(mutation, repo):
            return Outcome("patch does not apply", (), 0.0, "")
        code, output = run_tests(repo, tests)
    seconds = time.monotonic() - start
    if code == 0:
        status = "NOT caught" if mutation is not None else "passed"
    elif code in (1, 2):  # tests failed, or collection failed (an import error)
        status = "caught" if mutation is not None else "failed"
    else:
        status = "error"
    return Outcome(status, failed_tests(output), seconds, output)


def grouped(failed: Sequence[str]) -> list[str]:
    """Failed test ids, one entry per test function with its failing cases."""
    cases: dict[str, list[str]] = {}
    for name in failed:
        test, _, case = name.removeprefix("tests/").partition("[")
        cases.setdefault(test, [])
        if case:
            cases[test].append(case.removesuffix("]"))
    return [
        f"`{test}`" + (f" [{'; '.join(found)}]" if found else "")
        for test, found in cases.items()
    ]


def markdown(results: list[tuple[Mutation, Outcome]]) -> str:
    rows = [
        "| mutation | what it breaks | caught by |",
        "|---|---|---|",
    ]
    for mutation, outcome in results:
        caught = (
            "<br>".join(grouped(outcome.failed))
            if outcome.status == "caught"
            else f"**{outcome.status}**"
        )
        rows.append(f"| `{mutation.name}` | {mutation.description} | {caught} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the unpatched run"
    )
    parser.add_argument(
        "--markdown", action="store_true", help="print the result as a table"
    )
    parser.add_argument(
        "--output", action="store_true", help="print the end of each test run"
    )
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutations {unknown}; --list shows them")
    chosen = [known[n] for n in args.names] if args.names else list(MUTATIONS)
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.description} ({m.path}; {', '.join(m.tests)})")
        return 0

    ok = True
    if not args.no_baseline:
        files = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        baseline = check(None, files)
        print(
            f"baseline ({', '.join(files)}): {baseline.status} "
            f"in {baseline.seconds:.0f} s",
            flush=True,
        )
        if baseline.status != "passed":
            print(baseline.output[-4000:])
            return 1
    results = []
    for mutation in chosen:
        outcome = check(mutation, mutation.tests)
        results.append((mutation, outcome))
        ok = ok and outcome.status == "caught"
        print(
            f"{mutation.name}: {outcome.status} in {outcome.seconds:.0f} s", flush=True
        )
        for name in outcome.failed:
            print(f"    {name}")
        if outcome.status == "error" or args.output:
            print(outcome.output[-4000:])
    if args.markdown:
        print()
        print(markdown(results))
    survivors = [m.name for m, o in results if o.status != "caught"]
    print(f"\n{len(results) - len(survivors)} of {len(results)} mutations caught")
    if survivors:
        print("not caught: " + ", ".join(survivors))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
