"""Parameter-efficient fine-tunes: PEFT's LoRA and IA³ adapters read as models, and LoRA written back.

An adapter is a fine-tuned model stored as its change to a base: PEFT's
folder of ``adapter_config.json`` and ``adapter_model.safetensors``, tensor
names ``base_model.model.<module>.<part>``. :func:`open_adapter` presents it
as the checkpoint of the whole fine-tuned model, every tensor of the base,
each computed when it is read, one at a time:

- **LoRA** (Hu et al., 2021): a ``Linear`` module's weight
  ``W (out, in)`` becomes ``W + s · B A``, ``A = lora_A (r, in)``,
  ``B = lora_B (out, r)``, ``s = lora_alpha / r`` (``lora_alpha / √r`` with
  ``use_rslora``; per module from ``rank_pattern`` and ``alpha_pattern``);
  with ``fan_in_fan_out`` (GPT-2's ``Conv1D``, stored ``(in, out)``) the
  change is ``s · (B A)ᵀ``. An ``Embedding`` (``lora_embedding_A (r, vocab)``,
  ``lora_embedding_B (dim, r)``) becomes ``W + s · (B A)ᵀ``. ``lora_B.bias``
  (``lora_bias``) adds ``s · b`` to the module's bias.
- **IA³** (Liu et al., 2022): ``ia3_l`` rescales a weight ``W (out, in)``:
  its rows (``(out, 1)``, the module's outputs, so its bias too:
  ``l ⊙ (W x + b)``) or, for ``feedforward_modules``, its columns
  (``(1, in)``, the inputs): ``W ⊙ l``.
- Tensors saved whole (a trained ``bias`` as ``<module>.base_layer.bias`` or
  ``<module>.bias``, ``modules_to_save``) replace the base's.

So every merge method takes adapters where it takes fine-tuned models
(through a recipe's ``models: [{adapter: path}]`` or :func:`load_adapter`),
and adapters of different ranks or targets merge as the full models they
are: a module an adapter does not touch is the base's there. Names and
orientations are the base checkpoint's (PEFT's are PyTorch's); the base's
layout turns them into the parameter tree's, as for any checkpoint.

:func:`extract_lora` goes the other way (mergekit's LoRA extraction): each
chosen kernel's change from the base, ``Δ = U Σ Vᵀ`` truncated to rank r,
becomes ``B = U_r Σ_r``, ``A = V_rᵀ`` (``lora_alpha = r``, so ``s = 1``);
:func:`save_lora` writes it in PEFT's layout, with the relative error
``‖Δ − B A‖_F / ‖Δ‖_F = √(Σ_{i>r} σᵢ²) / √(Σ σᵢ²)`` of each module.

Examples:
  A LoRA of rank 1 on one module of a base, read as the whole model:

  >>> import json, os, tempfile, numpy as np
  >>> from mats_jax.io.checkpoint import save_checkpoint
  >>> d = tempfile.mkdtemp()
  >>> base = os.path.join(d, "base.safetensors")
  >>> save_checkpoint(base, {"fc": {"weight": np.zeros((3, 2), np.float32),
  ...                               "bias": np.zeros(3, np.float32)}})
  >>> adapter = os.path.join(d, "lora")
  >>> os.mkdir(adapter)
  >>> _ = open(os.path.join(adapter, "adapter_config.json"), "w").write(json.dumps(
  ...     {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["fc"]}))
  >>> save_checkpoint(os.path.join(adapter, "adapter_model.safetensors"), {
  ...     "base_model.model.fc.lora_A.weight": np.array([[1.0, 2.0]], np.float32),
  ...     "base_model.model.fc.lora_B.weight": np.array([[1.0], [0.0], [1.0]], np.float32)})
  >>> model = load_adapter(adapter, base=base, layout="hf_linear")
  >>> model["fc"]["kernel"]  # 2 · (B A)ᵀ, in Flax's (in, out)
  array([[2., 0., 2.],
         [4., 0., 4.]], dtype=float32)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mats_jax.io import safetensors as st_io
from mats_jax.io.checkpoint import (
    Checkpoint,
    Format,
    Reader,
    atomic_output,
    flatten,
    open_checkpoint,
    open_reader,
    resolve_layout,
)
from mats_jax.io.errors import CheckpointError
from mats_jax.io.layout import Layout, inverse_permutation
from mats_jax.tree import nest_paths, pattern_matches

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "Adapter",
    "LoraExtraction",
    "extract_lora",
    "is_adapter",
    "load_adapter",
    "lora_modules",
    "open_adapter",
    "read_adapter",
    "save_lora",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_PEFT_TYPES = ("LORA", "IA3")
# Options that change what the tensors mean in ways not read here: refused
# rather than merged wrongly.
_UNSUPPORTED = {
    "use_dora": "DoRA's magnitude vectors",
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trainable token rows",
    "target_parameters": "LoRA on bare parameters",
    "use_qalora": "QA-LoRA",
}
_LORA_PARTS = (
    "lora_A.weight",
    "lora_B.weight",
    "lora_B.bias",
    "lora_embedding_A",
    "lora_embedding_B",
)

Edit = Callable[[np.ndarray], np.ndarray]


def is_adapter(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a PEFT adapter folder (it holds ``adapter_config.json``)."""
    return os.path.isfile(os.path.join(os.fspath(path), ADAPTER_CONFIG))


@dataclasses.dataclass(frozen=True)
class _Change:
    """What an adapter does to one tensor of the base, in the base's own names."""

    module: str  # PEFT's module name
    kind: str  # "lora", "lora_embedding", "lora_bias", "ia3", "replace"
    tensors: tuple[np.ndarray, ...]
    scale: float = 1.0
    fan_in_fan_out: bool = False
    feedforward: bool = False
    start: np.ndarray | None = None  # a trained value replacing the base's first
    optional: bool = False  # applies only where the base has the tensor (a bias)

    def expected_shape(self) -> tuple[int, ...] | None:
        """The base tensor's shape this change fits (None: any, IA³ says below)."""
        if self.kind == "lora":
            a, b = self.tensors
            out_in = (b.shape[0], a.shape[1])
            return out_in[::-1] if self.fan_in_fan_out else out_in
        if self.kind == "lora_embedding":
            a, b = self.tensors
            return (a.shape[1], b.shape[0])
        if self.kind in ("lora_bias", "ia3_bias"):
            return tuple(self.tensors[0].shape)
        if self.kind == "replace":
            assert self.start is not None
            return tuple(self.start.shape)
        return None

    def apply(self, weight: np.ndarray) -> np.ndarray:
        """The fine-tuned tensor from the base's, computed in float32 or wider."""
        wide = np.promote_types(weight.dtype, np.float32)
        w = (weight if self.start is None else self.start).astype(wide)
        t = [x.astype(wide) for x in self.tensors]
        if self.kind == "lora":
            delta = self.scale * (t[1] @ t[0])
            out = w + (delta.T if self.fan_in_fan_out else delta)
        elif self.kind == "lora_embedding":
            out = w + self.scale * (t[1] @ t[0]).T
        elif self.kind == "lora_bias":
            out = w + self.scale * t[0]
        elif self.kind == "ia3_bias":
            out = w * t[0]
        elif self.kind == "ia3":
            oriented = w.T if self.fan_in_fan_out else w
            scaled = oriented * t[0]
            out = scaled.T if self.fan_in_fan_out else scaled
        else:
            out = w
        return out.astype(weight.dtype)


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A PEFT adapter as read: its config and the change to each base module.

    Attributes:
      path: the adapter folder.
      peft_type: ``"LORA"`` or ``"IA3"``.
      config: ``adapter_config.json`` as read.
      changes: per tensor, PEFT's name of the base tensor it changes
        (``<module>.weight``, ``<module>.bias``) and how.
    """

    path: str
    peft_type: str
    config: Mapping[str, Any]
    changes: Mapping[str, _Change]

    @property
    def modules(self) -> list[str]:
        """The base modules it changes, in the file's order."""
        return list(dict.fromkeys(c.module for c in self.changes.values()))


def _config_error(path: str, message: str) -> CheckpointError:
    return CheckpointError(f"{os.path.join(path, ADAPTER_CONFIG)}: {message}")


def _read_config(path: str) -> dict[str, Any]:
    file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not an adapter folder (a directory)")
    if not os.path.isfile(file):
        raise CheckpointError(
            f"{path}: no {ADAPTER_CONFIG}; an adapter folder holds PEFT's config "
            f"and {ADAPTER_WEIGHTS}"
        )
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _config_error(path, f"not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise _config_error(path, "expected a JSON object")
    kind = config.get("peft_type")
    if kind not in _PEFT_TYPES:
        raise _config_error(
            path, f"peft_type {kind!r} is not supported; expected one of {_PEFT_TYPES}"
        )
    for key, what in _UNSUPPORTED.items():
        if config.get(key) not in (None, False, [], {}):
            raise _config_error(
                path, f"{key}: {config[key]!r}: {what} are not supported"
            )
    if not isinstance(config.get("fan_in_fan_out", False), bool):
        raise _config_error(path, "fan_in_fan_out must be true or false")
    if kind == "LORA":
        for key in ("r", "lora_alpha"):
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _config_error(path, f"{key} must be a number, got {value!r}")
            if not value > 0:
                raise _config_error(path, f"{key} must be positive, got {value!r}")
        for key in ("rank_pattern", "alpha_pattern"):
            if not isinstance(config.get(key) or {}, dict):
                raise _config_error(path, f"{key} must be a mapping")
    return config


def _module_matches(module: str, spec: Any) -> bool:
    """PEFT's matching of a module name against ``target_modules``-like specs:
    a string is a regular expression of the whole name, a list holds names
    or name suffixes."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return any(module == s or module.endswith("." + s) for s in spec)


def _pattern_value(module: str, patterns: Mapping[str, Any], default: Any) -> Any:
    """A ``rank_pattern``/``alpha_pattern`` value for ``module`` (PEFT: the
    first key that matches the end of its name)."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", module):
            return value
    return default


def _lora_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    alpha = _pattern_value(
        module, config.get("alpha_pattern") or {}, config["lora_alpha"]
    )
    root = math.sqrt(rank) if config.get("use_rslora") else rank
    return float(alpha) / root


def _split(name: str) -> tuple[str, str]:
    """(module, part) of an adapter tensor name without PEFT's prefix."""
    for part in (*_LORA_PARTS, "ia3_l", "base_layer.bias", "base_layer.weight"):
        if name.endswith("." + part):
            return name[: -len(part) - 1], part
    module, _, leaf = name.rpartition(".")
    return module, leaf


def read_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Reads a PEFT adapter folder (config and tensors) and checks it.

    Raises:
      CheckpointError: naming the file and the module: a config that is
        missing, malformed or uses an option not supported (DoRA, layer
        replication …), a tensor no rule reads, a LoRA module missing its A or
        B, or ranks that disagree with each other or with ``r``/``rank_pattern``.
    """
    path = os.path.abspath(os.fspath(path))
    config = _read_config(path)
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise CheckpointError(
            f"{path}: no {ADAPTER_WEIGHTS} (PEFT's older adapter_model.bin is a "
            "pickle and is not read: save the adapter with safe_serialization)"
        )
    reader = st_io.SafetensorsReader(weights)
    kind = config["peft_type"]
    fan = bool(config.get("fan_in_fan_out", False))
    parts: dict[str, dict[str, np.ndarray]] = {}
    for raw in reader.specs:
        name = raw[len(_PREFIX) :] if raw.startswith(_PREFIX) else raw
        module, part = _split(name)
        parts.setdefault(module, {})[part] = reader.read(raw)
    changes: dict[str, _Change] = {}

    def where(module: str) -> str:
        return f"{weights}: module {module!r}"

    for module, found in parts.items():
        lora = {p: found.pop(p) for p in _LORA_PARTS if p in found}
        if lora and kind != "LORA":
            raise CheckpointError(f"{where(module)}: LoRA tensors in a {kind} adapter")
        if "ia3_l" in found and kind != "IA3":
            raise CheckpointError(f"{where(module)}: IA³ tensors in a {kind} adapter")
        for a_part, b_part, change_kind in (
            ("lora_A.weight", "lora_B.weight", "lora"),
            ("lora_embedding_A", "lora_embedding_B", "lora_embedding"),
        ):
            if (a_part in lora) != (b_part in lora):
                missing = b_part if a_part in lora else a_part
                raise CheckpointError(f"{where(module)}: {missing} is missing")
            if a_part not in lora:
                continue
            a, b = lora[a_part], lora[b_part]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise CheckpointError(
                    f"{where(module)}: {a_part} {a.shape} and {b_part} {b.shape} are "
                    "not (r, in) and (out, r) of one rank r"
                )
            rank = a.shape[0]
            expected = _pattern_value(
                module, config.get("rank_pattern") or {}, config["r"]
            )
            if rank != expected:
                raise CheckpointError(
                    f"{where(module)}: rank {rank} but the config says r = {expected} "
                    f"(r / rank_pattern in {ADAPTER_CONFIG})"
                )
            scale = _lora_scale(config, module, rank)
            changes[f"{module}.weight"] = _Change(
                module, change_kind, (a, b), scale, fan_in_fan_out=fan
            )
            if "lora_B.bias" in lora and change_kind == "lora":
                changes[f"{module}.bias"] = _Change(
                    module, "lora_bias", (lora["lora_B.bias"],), scale
                )
        if "lora_B.bias" in lora and "lora_B.weight" not in lora:
            raise CheckpointError(f"{where(module)}: lora_B.bias without lora_B.weight")
        if "ia3_l" in found:
            vector = found.pop("ia3_l")
            feedforward = _module_matches(module, config.get("feedforward_modules"))
            want = 0 if feedforward else 1  # the axis of length 1
            if vector.ndim != 2 or vector.shape[want] != 1:
                side = "(1, in)" if feedforward else "(out, 1)"
                raise CheckpointError(
                    f"{where(module)}: ia3_l has shape {vector.shape}, but a "
                    f"{'feed-forward' if feedforward else 'non-feed-forward'} module's "
                    f"is {side} (feedforward_modules in {ADAPTER_CONFIG})"
                )
            changes[f"{module}.weight"] = _Change(
                module, "ia3", (vector,), fan_in_fan_out=fan, feedforward=feedforward
            )
            if not feedforward:
                # l scales the module's outputs, W x + b: its bias too.
                changes[f"{module}.bias"] = _Change(
                    module, "ia3_bias", (vector.reshape(-1),), optional=True
                )
        for part, value in found.items():
            target = part.removeprefix("base_layer.")
            if target in ("weight", "bias") or "." not in part:
                key = f"{module}.{target}"
                if key in changes and changes[key].kind != "lora_bias":
                    raise CheckpointError(
                        f"{where(module)}: {part} given whole and as a change"
                    )
                # A trained bias and lora_B's bias: PEFT adds the second to the first.
                changes[key] = (
                    dataclasses.replace(changes[key], start=value)
                    if key in changes
                    else _Change(module, "replace", (), start=value)
                )
                continue
            raise CheckpointError(
                f"{where(module)}: tensor part {part!r} is not one this library reads "
                f"(LoRA: {', '.join(_LORA_PARTS)}; IA³: ia3_l; whole tensors)"
            )
    if not changes:
        raise CheckpointError(f"{weights}: the adapter holds no tensor")
    return Adapter(path, kind, config, changes)


def _base_name(adapter: Adapter, key: str, names: Sequence[str]) -> str:
    """The base tensor PEFT's ``key`` names: itself, or the one name that ends
    with it, or that it ends with (a base saved with or without the task
    model's prefix, ``bert.`` …)."""
    if key in names:
        return key
    found = [n for n in names if n.endswith("." + key) or key.endswith("." + n)]
    if len(found) == 1:
        return found[0]
    weights = os.path.join(adapter.path, ADAPTER_WEIGHTS)
    if found:
        raise CheckpointError(
            f"{weights}: module tensor {key!r} fits several base tensors "
            f"({', '.join(found[:4])}); the adapter is for another base"
        )
    raise CheckpointError(
        f"{weights}: module tensor {key!r} is not in the base (no tensor named "
        f"{key!r} or ending with it); the adapter is for another base, or the base "
        "was given in another naming"
    )


class AdapterReader:
    """A base's reader with an adapter's changes applied as each tensor is read.

    The base's names, shapes, dtypes and files (for checksums, the adapter's
    two files are added); :meth:`read` computes the fine-tuned tensor.
    """

    def __init__(self, base: Reader, adapter: Adapter) -> None:
        self.format = base.format
        self.separator = base.separator
        self.path = adapter.path
        self.files = [
            os.path.join(adapter.path, ADAPTER_CONFIG),
            os.path.join(adapter.path, ADAPTER_WEIGHTS),
            *base.files,
        ]
        self.metadata = dict(base.metadata or {})
        self.specs = dict(base.specs)
        self._base = base
        self._changes: dict[str, _Change] = {}
        names = list(base.specs)
        weights = os.path.join(adapter.path, ADAPTER_WEIGHTS)
        for key, change in adapter.changes.items():
            if change.optional and not any(
                n == key or n.endswith("." + key) or key.endswith("." + n)
                for n in names
            ):
                continue
            name = _base_name(adapter, key, names)
            shape, dtype, _ = base.specs[name]
            where = f"{weights}: module {change.module!r} on base tensor {name!r}"
            if not np.issubdtype(dtype, np.floating):
                raise CheckpointError(f"{where}: the base tensor is {dtype}, not float")
            expected = change.expected_shape()
            if change.kind == "ia3":
                length = change.tensors[0].size
                oriented = shape[::-1] if change.fan_in_fan_out else shape
                axis = 1 if change.feedforward else 0
                if len(shape) != 2 or oriented[axis] != length:
                    raise CheckpointError(
                        f"{where}: ia3_l of {length} entries does not fit the "
                        f"{'inputs' if change.feedforward else 'outputs'} of a weight "
                        f"of shape {shape}"
                        + (" (fan_in_fan_out: true)" if change.fan_in_fan_out else "")
                    )
            elif expected is not None and tuple(shape) != expected:
                hint = ""
                if change.kind == "lora" and tuple(shape) == expected[::-1]:
                    hint = (
                        f"; it fits transposed: fan_in_fan_out is "
                        f"{str(change.fan_in_fan_out).lower()} in {ADAPTER_CONFIG}, but "
                        "the base stores this weight the other way round"
                    )
                raise CheckpointError(
                    f"{where}: the change has shape {expected}, the base tensor "
                    f"{tuple(shape)}{hint or '; the adapter is for another base'}"
                )
            if name in self._changes:
                raise CheckpointError(f"{where}: changed twice by the adapter")
            self._changes[name] = change

    def read(self, name: str) -> np.ndarray:
        array = self._base.read(name)
        change = self._changes.get(name)
        return array if change is None else change.apply(array)


def open_adapter(
    path: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str],
    format: Format | None = None,
    layout: Layout | str | Any = None,
) -> Checkpoint:
    """The fine-tuned model an adapter makes of ``base``, opened for lazy reading.

    Args:
      path: the PEFT adapter folder.
      base: the base model's checkpoint (the adapter's tensors are matched
        to its names).
      format: the base's format, detected when None.
      layout: the base's layout (a :class:`~mats_jax.io.Layout`, preset name
        or rule list): the tree's names and orientations.

    Raises:
      CheckpointError: naming the file and module, before any base tensor is
        read: an adapter :func:`read_adapter` refuses, a module the base does
        not have, a shape that does not fit (with ``fan_in_fan_out`` named
        when the change fits transposed), a non-float target.

    Examples:
      An IA³ vector scaling a module's outputs (its weight's rows and bias):

      >>> import json, os, tempfile, numpy as np
      >>> from mats_jax.io.checkpoint import save_checkpoint
      >>> d = tempfile.mkdtemp()
      >>> save_checkpoint(os.path.join(d, "base.safetensors"), {"fc": {
      ...     "weight": np.ones((2, 3), np.float32), "bias": np.ones(2, np.float32)}})
      >>> os.mkdir(os.path.join(d, "ia3"))
      >>> _ = open(os.path.join(d, "ia3", "adapter_config.json"), "w").write(json.dumps(
      ...     {"peft_type": "IA3", "target_modules": ["fc"], "feedforward_modules": []}))
      >>> save_checkpoint(os.path.join(d, "ia3", "adapter_model.safetensors"),
      ...     {"base_model.model.fc.ia3_l": np.array([[2.0], [0.5]], np.float32)})
      >>> model = open_adapter(os.path.join(d, "ia3"), base=os.path.join(d, "base.safetensors"))
      >>> model.read("fc/weight"), model.read("fc/bias")
      (array([[2. , 2. , 2. ],
             [0.5, 0.5, 0.5]], dtype=float32), array([2. , 0.5], dtype=float32))
    """
    adapter = read_adapter(path)
    return Checkpoint(
        AdapterReader(open_reader(base, format=format), adapter),
        resolve_layout(layout),
    )


def load_adapter(
    path: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str],
    format: Format | None = None,
    layout: Layout | str | Any = None,
) -> dict[str, Any]:
    """The whole fine-tuned model as nested dicts of numpy arrays (:func:`open_adapter`).

    Examples:
      See the module's example: a LoRA on ``fc`` read as the model, in Flax's
      orientation through the ``hf_linear`` layout.

      >>> import os, tempfile
      >>> load_adapter(tempfile.mkdtemp(), base="base.safetensors")
      Traceback (most recent call last):
      ...
      mats_jax.io.errors.CheckpointError: ...: no adapter_config.json; an adapter folder holds PEFT's config and adapter_model.safetensors
    """
    ckpt = open_adapter(path, base=base, format=format, layout=layout)
    return nest_paths({p: ckpt.read(p) for p in ckpt.leaves})


@dataclasses.dataclass(frozen=True)
class LoraExtraction:
    """A LoRA extracted from a merged model: what :func:`extract_lora` returns.

    Attributes:
      tensors: PEFT's tensor names -> arrays (``lora_A``, ``lora_B`` per module).
      config: ``adapter_config.json``'s content.
      rank: the rank of every module (a matrix of smaller rank is padded
        with zero rows, which change nothing).
      errors: per module, the relative Frobenius error of the truncation.
      not_carried: leaves that differ from the base but a LoRA cannot hold
        (not a chosen 2-D kernel), with their largest absolute change.

    Examples:
      >>> import numpy as np
      >>> base = {"fc": {"kernel": np.zeros((2, 2), np.float32), "bias": np.zeros(2)}}
      >>> merged = {"fc": {"kernel": np.eye(2, dtype=np.float32), "bias": np.ones(2)}}
      >>> print(extract_lora(base, merged, rank=1).report())
      LoRA of rank 1, 1 modules:
        fc: relative error 0.707
      changed from the base but not in the adapter:
        fc/bias: largest change 1
    """

    tensors: Mapping[str, np.ndarray]
    config: Mapping[str, Any]
    rank: int
    errors: Mapping[str, float]
    not_carried: Mapping[str, float]

    def report(self) -> str:
        """A line per module (its relative error) and per leaf not carried."""
        lines = [f"LoRA of rank {self.rank}, {len(self.errors)} modules:"]
        lines += [f"  {m}: relative error {e:.3g}" for m, e in self.errors.items()]
        if self.not_carried:
            lines.append("changed from the base but not in the adapter:")
            lines += [
                f"  {p}: largest change {v:.3g}" for p, v in self.not_carried.items()
            ]
        return "\n".join(lines)


def _leaves(
    source: Any, layout: Layout
) -> tuple[dict[str, tuple[int, ...]], Callable[[str], Any]]:
    """Leaf shapes and a reader of an open checkpoint, a checkpoint path or a parameter tree."""
    if isinstance(source, str | os.PathLike):
        source = open_checkpoint(source, layout=layout)
    if isinstance(source, Checkpoint):
        return {p: info.shape for p, info in source.leaves.items()}, source.read
    flat = flatten(source)
    return {p: tuple(np.shape(v)) for p, v in flat.items()}, lambda p: np.asarray(
        flat[p]
    )


def lora_modules(
    shapes: Mapping[str, tuple[int, ...]],
    layout: Layout | str | Any = "hf_linear",
    targets: str | Sequence[str] | None = None,
) -> dict[str, str]:
    """The leaves a LoRA on this model can hold, with their PEFT module names.

    A LoRA holds linear kernels: 2-D leaves whose checkpoint name (through
    ``layout``) ends in ``.weight``. ``targets`` (leaf-path patterns) choose
    among them; None: every such leaf the layout transposes (PyTorch's
    ``(out, in)`` linear weights). Checked from the shapes alone, before any
    tensor is read.

    Raises:
      CheckpointError: naming a target that matches no linear kernel, or when
        no leaf is a linear kernel.

    Examples:
      >>> lora_modules({"fc/kernel": (3, 2), "fc/bias": (2,)})
      {'fc/kernel': 'fc'}
    """
    layout = resolve_layout(layout)
    patterns = [targets] if isinstance(targets, str) else list(targets or [])
    used = dict.fromkeys(patterns, False)
    out: dict[str, str] = {}
    for path, shape in shapes.items():
        name, perm = layout.to_checkpoint(path, ndim=len(shape))
        if len(shape) != 2 or not name.endswith(".weight"):
            continue
        matched = [p for p in patterns if pattern_matches(p, path)]
        for p in matched:
            used[p] = True
        if matched or (not patterns and perm is not None):
            out[path] = name[: -len(".weight")]
    unused = [p for p, hit in used.items() if not hit]
    if unused:
        raise CheckpointError(
            f"LoRA targets {unused} match no 2-D leaf whose checkpoint name ends in "
            ".weight (a linear kernel)"
        )
    if not out:
        raise CheckpointError(
            "no leaf a LoRA can hold: no 2-D leaf whose checkpoint name (through the "
            "layout) ends in .weight; a LoRA is named as a Hugging Face checkpoint "
            "(layout='hf_linear' or a preset)"
        )
    return out


def extract_lora(
    base: Any,
    merged: Any,
    *,
    rank: int,
    layout: Layout | str | Any = "hf_linear",
    targets: str | Sequence[str] | None = None,
    base_model_name_or_path: str | None = None,
) -> LoraExtraction:
    """A LoRA of rank ``rank`` whose change to ``base`` approximates ``merged``'s.

    Per chosen kernel (module docstring), read one at a time, ``merged −
    base`` is turned into the checkpoint's orientation by ``layout``
    (PyTorch's ``(out, in)``) and truncated by its SVD.

    Args:
      base, merged: parameter trees, open checkpoints
        (:func:`~mats_jax.open_checkpoint`), or checkpoint paths opened with
        ``layout``.
      rank: the LoRA rank r ≥ 1.
      layout: the layout of the base checkpoint the adapter is for.
      targets: leaf-path patterns (:func:`~mats_jax.tree.pattern_matches`)
        of the kernels to extract; None: every 2-D leaf the layout transposes
        whose checkpoint name ends in ``.weight`` (the linear kernels) and
        that differs from the base.
      base_model_name_or_path: recorded in the config.

    Raises:
      CheckpointError: if the trees' leaves or shapes differ, ``rank`` is not
        a positive integer, or a target matches no 2-D ``.weight`` leaf.

    Examples:
      >>> import numpy as np
      >>> base = {"fc": {"kernel": np.zeros((3, 2), np.float32)}}
      >>> merged = {"fc": {"kernel": np.outer([1.0, 2.0, 3.0], [1.0, -1.0]).astype(np.float32)}}
      >>> lora = extract_lora(base, merged, rank=1)
      >>> {k: v.shape for k, v in lora.tensors.items()}  # PyTorch's (out, in) = (2, 3)
      {'base_model.model.fc.lora_A.weight': (1, 3), 'base_model.model.fc.lora_B.weight': (2, 1)}
      >>> round(lora.errors["fc"], 9)  # a rank-1 change: exact
      0.0
    """
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1:
        raise CheckpointError(f"rank must be a positive integer, got {rank!r}")
    rank = int(rank)
    layout = resolve_layout(layout)
    shapes, read_base = _leaves(base, layout)
    merged_shapes, read_merged = _leaves(merged, layout)
    if set(shapes) != set(merged_shapes):
        missing = sorted(set(shapes) ^ set(merged_shapes))
        raise CheckpointError(
            f"the base and the merged model have different leaves: {missing[:6]}"
        )
    for path, shape in shapes.items():
        if merged_shapes[path] != shape:
            raise CheckpointError(
                f"leaf {path!r}: the base has shape {shape}, the merged model "
                f"{merged_shapes[path]}"
            )
    modules = lora_modules(shapes, layout, targets)
    paths = list(shapes)
    tensors: dict[str, np.ndarray] = {}
    errors: dict[str, float] = {}
    not_carried: dict[str, float] = {}
    for path in paths:
        before, after = read_base(path), read_merged(path)
        _, perm = layout.to_checkpoint(path, ndim=before.ndim)
        wide = np.promote_types(before.dtype, np.float32)
        delta = after.astype(wide) - before.astype(wide)
        chosen = path in modules and (targets is not None or bool(np.any(delta)))
        if not chosen:
            change = float(np.max(np.abs(delta))) if delta.size else 0.0
            if change > 0:
                not_carried[path] = change
            continue
        oriented = np.transpose(delta, inverse_permutation(perm)) if perm else delta
        module = modules[path]
        b, a, errors[module] = _truncate(oriented, rank)
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = a.astype(np.float32)
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = b.astype(np.float32)
    if not tensors:
        raise CheckpointError(
            "no leaf to extract: no linear kernel differs from the base"
        )
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": list(errors),
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": None,
    }
    return LoraExtraction(tensors, config, rank, errors, not_carried)


def _truncate(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """``B (out, r)``, ``A (r, in)`` with ``B A`` the best rank-r approximation
    of ``delta``, and its relative Frobenius error; zero-padded to ``rank``."""
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    k = min(rank, s.size)
    b = np.zeros((delta.shape[0], rank))
    a = np.zeros((rank, delta.shape[1]))
    b[:, :k] = u[:, :k] * s[:k]
    a[:k] = vt[:k]
    total = float(np.sum(s**2))
    error = math.sqrt(float(np.sum(s[k:] ** 2)) / total) if total > 0 else 0.0
    return b, a, error


def save_lora(
    path: str | os.PathLike[str],
    lora: LoraExtraction,
    *,
    overwrite: bool = False,
    card: str | None = None,
) -> None:
    """Writes an extracted LoRA as a PEFT adapter folder, completely or not at all.

    ``adapter_config.json``, ``adapter_model.safetensors`` (``format: pt``
    metadata, as PEFT writes) and a ``README.md`` with the rank and each
    module's relative error (then ``card``, e.g. the model card of the
    merge it came from); ``peft.PeftModel.from_pretrained`` loads it.

    Raises:
      FileExistsError: if ``path`` exists and ``overwrite`` is False.

    Examples:
      >>> import os, tempfile, numpy as np
      >>> base = {"fc": {"kernel": np.zeros((3, 2), np.float32)}}
      >>> merged = {"fc": {"kernel": np.ones((3, 2), np.float32)}}
      >>> out = os.path.join(tempfile.mkdtemp(), "lora")
      >>> save_lora(out, extract_lora(base, merged, rank=1))
      >>> sorted(os.listdir(out))
      ['README.md', 'adapter_config.json', 'adapter_model.safetensors']
    """
    with atomic_output(path, overwrite=overwrite) as tmp:
        os.makedirs(tmp)
        st_io.write_safetensors(
            os.path.join(tmp, ADAPTER_WEIGHTS),
            dict(lora.tensors),
            metadata={"format": "pt"},
        )
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(dict(lora.config), f, indent=2)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write("# LoRA extracted by mats_jax\n\n```\n" + lora.report() + "\n```\n")
            if card:
                f.write("\n" + card)
