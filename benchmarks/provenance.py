"""Where and from what a benchmark ran: machine, versions, commit.

Every script in ``benchmarks/`` records these in its results so that a number
can be traced to the code and the hardware that produced it. Scripts run as
``python benchmarks/<name>.py``, which puts this folder on ``sys.path``.

Recorded results (``benchmarks/results/``) come from a committed tree: every
script calls :func:`check_destination` before it measures anything and
refuses to write there from a tree with uncommitted changes unless given
``--allow-dirty``, in which case :func:`git_revision` says so in the results.
Smoke runs write under the temporary directory (``QUICK_RESULTS``) by default.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import jax
import jaxlib
import numpy as np
import optax

import mats_jax


def cpu_model() -> str:
    """``lscpu``'s model name, or "unknown"."""
    try:
        lscpu = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return "unknown"
    return next(
        (
            line.split(":", 1)[1].strip()
            for line in lscpu.splitlines()
            if line.startswith("Model name")
        ),
        "unknown",
    )


def accelerator() -> str | None:
    """The accelerator JAX computes on (``device_kind``), or None on a CPU."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    return f"{device.device_kind} ({device.platform})"


def machine(**versions: str) -> dict[str, Any]:
    """The machine and the versions of what ran; ``versions`` adds libraries."""
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        **versions,
        "mats_jax": mats_jax.__version__,
        "jax_backend": jax.default_backend(),
        "accelerator": accelerator(),
        "device_count": jax.device_count(),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "nproc_env": os.environ.get("NPROC"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average_1_5_15min": list(os.getloadavg()),
    }


def experiment_meta(
    script: str, revision: str, load_start: list[float], wall_s: float
) -> dict[str, Any]:
    """The provenance of an experiment benchmark's run, as its JSON records it:
    the command (``python benchmarks/<script>`` and this process's arguments),
    the date, the commit, the machine (with flax and optax), the load at the
    start and now, and the wall time."""
    return {
        "command": f"python benchmarks/{script}"
        + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "git": revision,
        "machine": machine(flax=flax.__version__, optax=optax.__version__),
        "load_average_start": load_start,
        "load_average_end": list(os.getloadavg()),
        "wall_s": wall_s,
    }


def experiment_header(meta: dict[str, Any]) -> list[str]:
    """The provenance lines under an experiment report's title, from
    :func:`experiment_meta`'s record (and ``seeds``)."""
    m = meta["machine"]
    return [
        f"- Command: `{meta['command']}` (from the repository root)",
        f"- Date: {meta['date']}; mats_jax {m['mats_jax']} at git {meta['git']}",
        f"- Machine: {m['cpu_count']}-core CPU, `lscpu` model name “{m['cpu_model']}”, "
        f"JAX backend `{m['jax_backend']}`; {m['platform']}",
        f"- Versions: Python {m['python']}, JAX {m['jax']}, flax {m['flax']}, "
        f"optax {m['optax']}, numpy {m['numpy']}",
        "- Load average (1/5/15 min) at start "
        + " / ".join(f"{x:.1f}" for x in meta["load_average_start"])
        + ", at end "
        + " / ".join(f"{x:.1f}" for x in meta["load_average_end"]),
        f"- Total wall time: {meta['wall_s']:.0f} s; seeds: "
        f"{', '.join(map(str, meta['seeds']))}",
    ]


RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent  # the repository: benchmarks/ is at its top level
QUICK_RESULTS = Path(tempfile.gettempdir()) / "mats_jax_benchmarks"


def _git(*args: str, root: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *args], capture_output=True, text=True, check=False, cwd=root
    )


def uncommitted_changes(root: Path = ROOT) -> list[str] | None:
    """Paths with uncommitted changes, untracked files included; None without git.

    ``benchmarks/results/`` is left out: it is what the benchmarks write, so a
    second benchmark run after a first from the same commit still counts as
    clean.
    """
    try:
        status = _git(
            "status",
            "--porcelain",
            "--",
            ".",
            ":(exclude)benchmarks/results",
            root=root,
        )
    except OSError:
        return None
    if status.returncode != 0:
        return None
    return [line[3:] for line in status.stdout.splitlines() if line.strip()]


def git_revision() -> str:
    """The short commit, and whether the tree had uncommitted changes.

    A copy of the tree without ``.git`` (the device machine) passes the
    revision in ``MATS_JAX_GIT_REV``; it cannot be checked there.
    """
    if "MATS_JAX_GIT_REV" in os.environ:
        return os.environ["MATS_JAX_GIT_REV"] + " (given, not checked)"
    return tree_revision(ROOT)


def tree_revision(root: Path) -> str:
    """:func:`git_revision` of the checkout at ``root`` (another worktree)."""
    changes = uncommitted_changes(root)
    if changes is None:
        return "unknown (not a git checkout)"
    revision = _git("rev-parse", "--short", "HEAD", root=root).stdout.strip()
    if not changes:
        return revision
    shown = ", ".join(changes[:5]) + (", …" if len(changes) > 5 else "")
    return f"{revision} with uncommitted changes ({len(changes)} paths: {shown})"


def add_dirty_option(parser: argparse.ArgumentParser) -> None:
    """``--allow-dirty``: record results from a tree with uncommitted changes."""
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="write into benchmarks/results/ even with uncommitted changes "
        "(the provenance line then says so)",
    )


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """``--out PREFIX``, ``--render`` and ``--allow-dirty``: where the results
    go, rewriting the markdown from the recorded JSON alone, and recording
    from a tree with uncommitted changes."""
    parser.add_argument("--out", type=Path, help="output prefix, without suffix")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the markdown from the JSON"
    )
    add_dirty_option(parser)


def render_only(
    out: Path, render: bool, markdown: Callable[[dict[str, Any]], str]
) -> bool:
    """With ``render``, rewrites ``out``.md from ``out``.json and says so."""
    if render:
        result = json.loads(out.with_suffix(".json").read_text())
        out.with_suffix(".md").write_text(markdown(result))
    return render


def writes_results(out: Path) -> bool:
    """Whether ``out`` (a file, a prefix or a folder) lies in benchmarks/results/."""
    resolved = out.resolve()
    return resolved == RESULTS or RESULTS in resolved.parents


def check_destination(out: Path, allow_dirty: bool) -> str:
    """Refuses, before any work, to record results that no commit could reproduce.

    Results under ``benchmarks/results/`` must come from a committed tree
    (outside ``benchmarks/results/`` itself), unless ``--allow-dirty``;
    anywhere else (smoke runs, ``--out``) anything goes.

    Returns :func:`git_revision` as it is now, before the run: the commit
    its code came from. (Read again at the end of a long run, it would name
    whatever was committed meanwhile.)
    """
    revision = git_revision()
    if allow_dirty or not writes_results(out):
        return revision
    changes = uncommitted_changes()
    if changes is None:
        raise SystemExit(
            f"refusing to write {out}: not a git checkout, so the commit cannot be "
            "recorded; pass --out elsewhere or --allow-dirty"
        )
    if changes:
        raise SystemExit(
            f"refusing to write {out}: the tree has uncommitted changes "
            f"({', '.join(changes[:5])}{', …' if len(changes) > 5 else ''}); commit "
            "them, or pass --out elsewhere or --allow-dirty"
        )
    return revision


def write_results(
    out: Path, result: dict[str, Any], markdown: Callable[[dict[str, Any]], str]
) -> None:
    """``out``.json (the measurements) and ``out``.md (``markdown`` of them), printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    report = markdown(result)
    out.with_suffix(".md").write_text(report)
    print(report)
    print(f"wrote {out}.md and {out}.json")
