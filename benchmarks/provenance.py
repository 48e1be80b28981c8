"""Where and from what a benchmark ran: machine, versions, commit.

Every script in ``benchmarks/`` records these in its results so that a number
can be traced to the code and the hardware that produced it. Scripts run as
``python benchmarks/<name>.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np

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


def git_revision() -> str:
    """The short commit, marked when ``mats_jax/`` has uncommitted changes.

    A copy of the tree without ``.git`` (the device machine) passes the
    revision in ``MATS_JAX_GIT_REV``.
    """
    if "MATS_JAX_GIT_REV" in os.environ:
        return os.environ["MATS_JAX_GIT_REV"]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parent.parent,  # the repository root
        ).stdout.strip()

    dirty = git("status", "--porcelain", "--", "mats_jax")
    return git("rev-parse", "--short", "HEAD") + (
        " (mats_jax has uncommitted changes)" if dirty else ""
    )
