"""Accuracy normalised by each task's own fine-tuned model, and spread over seeds.

.. math:: \\text{normalised}_t = 100 \\cdot \\frac{\\text{acc}_t(\\text{merged})}{\\text{acc}_t(\\text{fine-tuned on } t)}

100 means the merged model does task t as well as t's own model; the
average over tasks is the headline number of the MaTS paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["mean_and_spread", "normalised"]


def normalised(accuracies: Sequence[float], own: Sequence[float]) -> list[float]:
    """Per task, 100 × accuracy / the task's own fine-tuned accuracy.

    Examples:
      >>> normalised([45.0, 90.0], [90.0, 90.0])
      [50.0, 100.0]
    """
    if len(accuracies) != len(own):
        raise ValueError(
            f"{len(accuracies)} accuracies but {len(own)} fine-tuned accuracies"
        )
    if any(o <= 0 for o in own):
        raise ValueError(
            f"fine-tuned accuracies must be positive to normalise by, got {list(own)}"
        )
    return [100.0 * a / o for a, o in zip(accuracies, own, strict=True)]


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value).

    Examples:
      >>> mean_and_spread([1.0, 3.0])
      (2.0, 1.4142135623730951)
    """
    x = np.asarray(values, np.float64)
    if x.size == 0:
        raise ValueError("no values to summarise")
    spread = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return float(x.mean()), spread
