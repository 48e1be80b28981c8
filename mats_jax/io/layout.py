"""Renaming and transposing between a checkpoint's names and parameter-tree paths, as data.

A checkpoint names its tensors in its own way: Hugging Face safetensors use
dotted names with ``(out, in)`` linear weights (``h.0.mlp.fc.weight``), Flax
stores ``(in, out)`` kernels under slash paths (``h_0/mlp/fc/kernel``), and an
orbax checkpoint of an nnx state adds a ``value`` level. A :class:`Layout` is
a list of :class:`Rule` s that map between the two, declared as data (they can
live in a YAML recipe), so no code is written per architecture.

A rule is a pair of templates. ``{name}`` matches one name segment (no
separator inside), ``{name*}`` matches one or more segments; the matched text
is carried to the other side with the separators translated (``.`` in a
safetensors name, ``/`` in a tree path). The first rule whose template matches
(and whose ``ndim`` condition holds) applies; names no rule matches keep their
segments, with the separator translated. ``transpose`` is the axis
permutation from the checkpoint's array to the tree's leaf; writing applies
its inverse, so reading and writing are exact inverses of each other.

Examples:
  >>> layout = Layout.from_data([
  ...     {"checkpoint": "{p*}.weight", "tree": "{p*}/kernel", "transpose": [1, 0], "ndim": 2},
  ...     {"checkpoint": "{p*}.weight", "tree": "{p*}/scale", "ndim": 1},
  ... ])
  >>> layout.to_tree("h.0.fc.weight", ndim=2)
  ('h/0/fc/kernel', (1, 0))
  >>> layout.to_checkpoint("h/0/fc/kernel", ndim=2)
  ('h.0.fc.weight', (1, 0))
  >>> layout.to_tree("h.0.ln.weight", ndim=1)
  ('h/0/ln/scale', None)
  >>> layout.to_tree("wte.embedding", ndim=2)
  ('wte/embedding', None)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "HF_LINEAR",
    "IDENTITY",
    "NNX_STATE",
    "PRESETS",
    "Layout",
    "LayoutError",
    "Rule",
]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\*?)\}")


class LayoutError(ValueError):
    """A layout rule that is malformed, or a name no rule can map back."""


def _compile(template: str, sep: str) -> tuple[re.Pattern[str], list[str]]:
    """A regex for ``template`` and the names of its placeholders, in order."""
    parts, names, pos = [], [], 0
    for m in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[pos : m.start()]))
        name, many = m.group(1), m.group(2) == "*"
        if name in names:
            raise LayoutError(f"template {template!r} uses {{{name}}} twice")
        names.append(name)
        seg = f"[^{re.escape(sep)}]+"
        parts.append(
            f"(?P<{name}>{seg}(?:{re.escape(sep)}{seg})*)"
            if many
            else f"(?P<{name}>{seg})"
        )
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts)), names


@dataclasses.dataclass(frozen=True)
class Rule:
    """One mapping between a checkpoint name template and a tree path template.

    Attributes:
      checkpoint: the template on the checkpoint's side (its own separator).
      tree: the template on the tree's side (``/`` separated).
      transpose: the axis permutation taking the checkpoint's array to the
        tree's leaf (``[1, 0]`` for an ``(out, in)`` weight to an ``(in, out)``
        kernel), or None.
      ndim: apply only to arrays of this many dimensions (None: any).
    """

    checkpoint: str
    tree: str
    transpose: tuple[int, ...] | None = None
    ndim: int | None = None

    def __post_init__(self) -> None:
        for side in (self.checkpoint, self.tree):
            if not isinstance(side, str) or not side:
                raise LayoutError(
                    f"rule templates must be non-empty strings, got {side!r}"
                )
        a = sorted(
            m.group(1) + m.group(2) for m in _PLACEHOLDER.finditer(self.checkpoint)
        )
        b = sorted(m.group(1) + m.group(2) for m in _PLACEHOLDER.finditer(self.tree))
        if a != b:
            raise LayoutError(
                f"rule {self.checkpoint!r} -> {self.tree!r}: both templates must use "
                f"the same placeholders, got {a} and {b}"
            )
        if self.transpose is not None:
            perm = tuple(int(i) for i in self.transpose)
            if sorted(perm) != list(range(len(perm))):
                raise LayoutError(
                    f"rule {self.checkpoint!r}: transpose {list(perm)} is not a permutation of 0..{len(perm) - 1}"
                )
            if self.ndim is not None and self.ndim != len(perm):
                raise LayoutError(
                    f"rule {self.checkpoint!r}: transpose has {len(perm)} axes but ndim is {self.ndim}"
                )
            object.__setattr__(self, "transpose", perm)

    def applies(self, ndim: int) -> bool:
        """Whether the rule's shape conditions hold for an array of ``ndim`` axes."""
        wanted = (
            self.ndim
            if self.ndim is not None
            else (len(self.transpose) if self.transpose is not None else None)
        )
        return wanted is None or wanted == ndim


def _translate(name: str, src: str, src_sep: str, dst: str, dst_sep: str) -> str | None:
    pattern, _ = _compile(src, src_sep)
    m = pattern.fullmatch(name)
    if m is None:
        return None
    values = {k: v.replace(src_sep, dst_sep) for k, v in m.groupdict().items()}
    return _PLACEHOLDER.sub(lambda p: values[p.group(1)], dst)


@dataclasses.dataclass(frozen=True)
class Layout:
    """An ordered list of :class:`Rule` s; the first that applies wins.

    Attributes:
      rules: the rules, tried in order.

    Examples:
      >>> layout = Layout.from_data([{"checkpoint": "{p*}/value", "tree": "{p*}"}])
      >>> layout.to_tree("encoder/kernel/value", ndim=2, separator="/")
      ('encoder/kernel', None)
    """

    rules: tuple[Rule, ...] = ()

    @classmethod
    def from_data(cls, data: Sequence[Mapping[str, Any]] | Layout | None) -> Layout:
        """A layout from a list of dicts with keys ``checkpoint``, ``tree``,
        ``transpose`` and ``ndim`` (as written in a YAML recipe)."""
        if data is None:
            return IDENTITY
        if isinstance(data, Layout):
            return data
        rules = []
        for i, entry in enumerate(data):
            if not isinstance(entry, Mapping):
                raise LayoutError(f"layout rule {i} must be a mapping, got {entry!r}")
            unknown = set(entry) - {"checkpoint", "tree", "transpose", "ndim"}
            if unknown or "checkpoint" not in entry or "tree" not in entry:
                raise LayoutError(
                    f"layout rule {i}: expected keys checkpoint, tree and optionally "
                    f"transpose, ndim; got {sorted(entry)}"
                )
            transpose = entry.get("transpose")
            rules.append(
                Rule(
                    checkpoint=entry["checkpoint"],
                    tree=entry["tree"],
                    transpose=tuple(transpose) if transpose is not None else None,
                    ndim=entry.get("ndim"),
                )
            )
        return cls(tuple(rules))

    def to_tree(
        self, name: str, *, ndim: int, separator: str = "."
    ) -> tuple[str, tuple[int, ...] | None]:
        """The tree path for checkpoint name ``name`` and the transpose to apply."""
        for rule in self.rules:
            if rule.applies(ndim):
                path = _translate(name, rule.checkpoint, separator, rule.tree, "/")
                if path is not None:
                    return path, rule.transpose
        return name.replace(separator, "/"), None

    def to_checkpoint(
        self, path: str, *, ndim: int, separator: str = "."
    ) -> tuple[str, tuple[int, ...] | None]:
        """The checkpoint name for tree path ``path`` and the transpose that
        :meth:`to_tree` applies to it (invert it to write)."""
        for rule in self.rules:
            if rule.applies(ndim):
                name = _translate(path, rule.tree, "/", rule.checkpoint, separator)
                if name is not None:
                    return name, rule.transpose
        return path.replace("/", separator), None


def inverse_permutation(perm: Sequence[int]) -> tuple[int, ...]:
    """The permutation that undoes ``perm``.

    Examples:
      >>> inverse_permutation((2, 0, 1))
      (1, 2, 0)
    """
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


#: Names map to paths by translating the separator; nothing is transposed.
IDENTITY = Layout()

#: Hugging Face ``*.weight`` (out, in) matrices <-> Flax ``kernel`` (in, out);
#: 1-D ``*.weight`` <-> ``scale`` (layer norms). Embedding matrices, which HF
#: also calls ``weight`` but Flax does not transpose, need a rule placed before
#: these (``{p*}.embed_tokens.weight`` -> ``{p*}/embed_tokens/embedding``).
HF_LINEAR = Layout.from_data(
    [
        {
            "checkpoint": "{p*}.weight",
            "tree": "{p*}/kernel",
            "transpose": [1, 0],
            "ndim": 2,
        },
        {"checkpoint": "{p*}.weight", "tree": "{p*}/scale", "ndim": 1},
    ]
)

#: An orbax checkpoint of an nnx state stores each variable's array under
#: ``…/value``; this drops that level so nnx and linen trees merge alike.
NNX_STATE = Layout.from_data([{"checkpoint": "{p*}/value", "tree": "{p*}"}])

PRESETS: dict[str, Layout] = {
    "identity": IDENTITY,
    "hf_linear": HF_LINEAR,
    "nnx_state": NNX_STATE,
}
