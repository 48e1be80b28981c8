"""Renaming and transposing between a checkpoint's names and parameter-tree paths, as data.

A checkpoint names its tensors in its own way: Hugging Face safetensors use
dotted names with ``(out, in)`` linear weights (``h.0.mlp.fc.weight``), Flax
stores ``(in, out)`` kernels under slash paths (``h_0/mlp/fc/kernel``), and an
orbax checkpoint of an nnx state adds a ``value`` level. A :class:`Layout` is
a list of :class:`Rule` s that map between the two, declared as data (they can
live in a YAML recipe), so no code is written per architecture.

A rule is a pair of templates. ``{name}`` matches one name segment (no
separator inside), ``{name*}`` one or more segments, and ``{name**}``, which
must be followed by a separator, zero or more segments with that separator
(``{p**}.wte.weight`` matches ``wte.weight`` and ``transformer.wte.weight``;
when it matches nothing, the other side drops its separator too). The matched
text is carried to the other side with the separators translated (``.`` in a
safetensors name, ``/`` in a tree path); literal text may sit next to a
placeholder inside a segment (``{p*}_proj.weight``). The first rule whose
template matches (and whose ``ndim`` condition holds) applies, in both
directions; names no rule matches keep their segments, with the separator
translated. ``transpose`` is the axis permutation from the checkpoint's array
to the tree's leaf; writing applies its inverse, so reading and writing are
exact inverses of each other, except for a rule whose tree side an earlier
rule also produces (a legacy alias such as ``LayerNorm.gamma``): it is read,
and the earlier rule's name is written.

The presets (:data:`PRESETS`) are :data:`IDENTITY`, :data:`HF_LINEAR` (any
Hugging Face transformer), :data:`HF_BERT`, :data:`HF_LLAMA` and
:data:`NNX_STATE`; a list of rules may name a preset as one of its entries,
whose rules are spliced in at that place.

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
  >>> HF_LINEAR.to_tree("embeddings.word_embeddings.weight", ndim=2)
  ('embeddings/word_embeddings/embedding', None)
  >>> HF_LLAMA.to_tree("model.layers.0.mlp.up_proj.weight", ndim=2)
  ('model/layers/0/mlp/up_proj/kernel', (1, 0))
  >>> HF_BERT.to_tree("encoder.layer.0.output.LayerNorm.gamma", ndim=1)
  ('encoder/layer/0/output/LayerNorm/scale', None)
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "HF_BERT",
    "HF_LINEAR",
    "HF_LLAMA",
    "IDENTITY",
    "NNX_STATE",
    "PRESETS",
    "Layout",
    "LayoutError",
    "Rule",
    "inverse_permutation",
]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\*{0,2})\}")
_SEPARATORS = "./"
_RULE_KEYS = ("checkpoint", "tree", "transpose", "ndim")


class LayoutError(ValueError):
    """A layout rule that is malformed, or a name no rule can map back."""


def _check_optional_runs(template: str, allowed: str, rule: str) -> None:
    """Raises unless every ``{name**}`` in ``template`` is followed by a separator."""
    for m in _PLACEHOLDER.finditer(template):
        follow = template[m.end() : m.end() + 1]
        if m.group(2) == "**" and (len(follow) != 1 or follow not in allowed):
            raise LayoutError(
                f"rule {rule}: {{{m.group(1)}**}} in {template!r} must be followed by "
                f"a separator ({' or '.join(repr(c) for c in allowed)}), got {follow!r}"
            )


@functools.lru_cache(maxsize=1024)
def _compile(template: str, sep: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    """A regex for ``template`` and the names of its placeholders, in order."""
    parts, names, pos = [], [], 0
    seg = f"[^{re.escape(sep)}]+"
    run = f"{seg}(?:{re.escape(sep)}{seg})*"
    for m in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[pos : m.start()]))
        name, stars = m.group(1), m.group(2)
        if name in names:
            raise LayoutError(f"template {template!r} uses {{{name}}} twice")
        names.append(name)
        pos = m.end()
        if stars == "**":
            # The separator after an optional run belongs to it: absent together.
            follow = template[pos : pos + 1]
            if len(follow) != 1 or follow not in _SEPARATORS:
                raise LayoutError(
                    f"template {template!r}: {{{name}**}} must be followed by a separator"
                )
            parts.append(f"(?:(?P<{name}>{run}){re.escape(follow)})?")
            pos += 1
        else:
            parts.append(f"(?P<{name}>{run})" if stars else f"(?P<{name}>{seg})")
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts)), tuple(names)


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

    Examples:
      >>> Rule("{p**}.wte.weight", "{p**}/wte/embedding", ndim=2).applies(2)
      True
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
        rule = f"{self.checkpoint!r} -> {self.tree!r}"
        _check_optional_runs(self.checkpoint, _SEPARATORS, rule)
        _check_optional_runs(self.tree, "/", rule)
        if self.ndim is not None and (
            isinstance(self.ndim, bool) or not isinstance(self.ndim, int)
        ):
            raise LayoutError(
                f"rule {rule}: ndim must be an integer, got {self.ndim!r}"
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

    def to_data(self) -> dict[str, Any]:
        """The rule as a dict, as written in a recipe (:meth:`Layout.from_data`).

        Examples:
          >>> Rule("{p*}.weight", "{p*}/kernel", transpose=(1, 0)).to_data()
          {'checkpoint': '{p*}.weight', 'tree': '{p*}/kernel', 'transpose': [1, 0]}
        """
        entry: dict[str, Any] = {"checkpoint": self.checkpoint, "tree": self.tree}
        if self.transpose is not None:
            entry["transpose"] = list(self.transpose)
        if self.ndim is not None:
            entry["ndim"] = self.ndim
        return entry


def _translate(name: str, src: str, src_sep: str, dst: str, dst_sep: str) -> str | None:
    """``name`` matched against template ``src`` and written through ``dst``."""
    pattern, _ = _compile(src, src_sep)
    m = pattern.fullmatch(name)
    if m is None:
        return None
    values = {k: (v or "").replace(src_sep, dst_sep) for k, v in m.groupdict().items()}
    out, pos = [], 0
    for p in _PLACEHOLDER.finditer(dst):
        out.append(dst[pos : p.start()])
        value, pos = values[p.group(1)], p.end()
        if p.group(2) == "**":
            out.append(value + dst[pos] if value else "")
            pos += 1  # the separator after the run went with it
        else:
            out.append(value)
    out.append(dst[pos:])
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class Layout:
    """An ordered list of :class:`Rule` s; the first that applies wins.

    Attributes:
      rules: the rules, tried in order.

    Examples:
      >>> layout = Layout.from_data([{"checkpoint": "{p*}/value", "tree": "{p*}"}])
      >>> layout.to_tree("encoder/kernel/value", ndim=2, separator="/")
      ('encoder/kernel', None)
      >>> gpt2 = Layout.from_data(  # GPT-2's Conv1D stores (in, out) already
      ...     [{"checkpoint": "{p*}.c_{m}.weight", "tree": "{p*}/c_{m}/kernel", "ndim": 2},
      ...      "hf_linear"])
      >>> gpt2.to_tree("h.0.attn.c_attn.weight", ndim=2)
      ('h/0/attn/c_attn/kernel', None)
      >>> gpt2.to_tree("wte.weight", ndim=2)
      ('wte/embedding', None)
    """

    rules: tuple[Rule, ...] = ()

    @classmethod
    def from_data(
        cls, data: Sequence[Mapping[str, Any] | str] | Layout | None
    ) -> Layout:
        """A layout from a list of dicts with keys ``checkpoint``, ``tree``,
        ``transpose`` and ``ndim`` (as written in a YAML recipe); an entry that
        is a preset's name (:data:`PRESETS`) stands for that preset's rules.

        Raises:
          LayoutError: naming the entry that is malformed or the unknown preset.
        """
        if data is None:
            return IDENTITY
        if isinstance(data, Layout):
            return data
        if isinstance(data, (str, Mapping)):
            raise LayoutError(
                f"a layout is a list of rules (or a preset's name where one is "
                f"accepted), got {data!r}"
            )
        rules: list[Rule] = []
        for i, entry in enumerate(data):
            if isinstance(entry, str):
                if entry not in PRESETS:
                    raise LayoutError(
                        f"layout rule {i}: unknown preset {entry!r}; the presets are "
                        f"{sorted(PRESETS)}"
                    )
                rules.extend(PRESETS[entry].rules)
                continue
            if not isinstance(entry, Mapping):
                raise LayoutError(
                    f"layout rule {i} must be a mapping or a preset's name, got {entry!r}"
                )
            unknown = set(entry) - set(_RULE_KEYS)
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

    def to_data(self) -> list[dict[str, Any]]:
        """The rules as dicts, as written in a recipe: ``from_data`` inverts it.

        Examples:
          >>> Layout.from_data(HF_BERT.to_data()) == HF_BERT
          True
        """
        return [rule.to_data() for rule in self.rules]

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


def _linear(checkpoint: str, tree: str) -> dict[str, Any]:
    """A torch ``nn.Linear`` weight (out, in) <-> a Flax ``Dense`` kernel (in, out)."""
    return {"checkpoint": checkpoint, "tree": tree, "transpose": [1, 0], "ndim": 2}


def _table(checkpoint: str, tree: str) -> dict[str, Any]:
    """A torch ``nn.Embedding`` weight <-> a Flax ``Embed`` table: both (rows, width)."""
    return {"checkpoint": checkpoint, "tree": tree, "ndim": 2}


def _vector(checkpoint: str, tree: str) -> dict[str, Any]:
    """A 1-D tensor renamed as it is (a norm's weight is Flax's ``scale``)."""
    return {"checkpoint": checkpoint, "tree": tree, "ndim": 1}


#: Names map to paths by translating the separator; nothing is transposed.
IDENTITY = Layout()

# Hugging Face calls an embedding table and a linear matrix both ``weight``;
# only the module's name tells them apart. transformers names its
# nn.Embedding modules ``*embeddings``/``*embedding`` (BERT's
# ``word_embeddings``, CLIP's ``token_embedding``, Mamba's ``embeddings``),
# ``embed_tokens``/``embed_positions`` (Llama, BART, OPT, Whisper),
# ``embed_in`` (GPT-NeoX, whose ``embed_out`` is the linear output head),
# ``wte``/``wpe`` (GPT-2), ``shared`` (T5, BART) and T5's
# ``relative_attention_bias``.
_EMBEDDING_MODULES = (
    "embed_tokens",
    "embed_positions",
    "embed_in",
    "wte",
    "wpe",
    "shared",
    "relative_attention_bias",
)

#: Any Hugging Face transformer <-> Flax's names: a 2-D ``weight`` of an
#: embedding module (its name ends in ``embeddings`` or ``embedding``, or is
#: one of ``embed_tokens``, ``embed_positions``, ``embed_in``, ``wte``,
#: ``wpe``, ``shared``, ``relative_attention_bias``) is an ``embedding``,
#: not transposed; any other 1-D ``weight`` (a norm's) is a ``scale``; any
#: other 2-D ``weight`` (a linear layer's, (out, in)) is an (in, out)
#: ``kernel``. Tensors not named ``weight`` (biases, buffers such as
#: ``position_ids``, ``inv_freq``) keep their names and axes.
HF_LINEAR = Layout.from_data(
    [
        _table("{p*}embeddings.weight", "{p*}embeddings/embedding"),
        _table("{p**}.embeddings.weight", "{p**}/embeddings/embedding"),
        _table("{p*}embedding.weight", "{p*}embedding/embedding"),
        _table("{p**}.embedding.weight", "{p**}/embedding/embedding"),
        *(
            _table(f"{{p**}}.{m}.weight", f"{{p**}}/{m}/embedding")
            for m in _EMBEDDING_MODULES
        ),
        _vector("{p*}.weight", "{p*}/scale"),
        _linear("{p*}.weight", "{p*}/kernel"),
    ]
)

#: Hugging Face BERT-family names (``BertModel``, ``BertFor*``, RoBERTa,
#: ELECTRA, MiniLM) <-> the Flax BERT's (the same dotted module names as slash
#: paths): ``*_embeddings.weight`` -> ``embedding``, 1-D ``weight`` (LayerNorm)
#: -> ``scale``, 2-D ``weight`` -> transposed ``kernel``. Checkpoints converted
#: from TensorFlow name LayerNorm's parameters ``gamma``/``beta``: read as
#: ``scale``/``bias`` and written back as ``weight``/``bias``, the names
#: transformers writes.
HF_BERT = Layout.from_data(
    [
        _table("{p*}_embeddings.weight", "{p*}_embeddings/embedding"),
        _vector("{p*}.weight", "{p*}/scale"),
        _linear("{p*}.weight", "{p*}/kernel"),
        # Listed so that writing a LayerNorm bias picks this name, not ``beta``.
        _vector("{p*}.LayerNorm.bias", "{p*}/LayerNorm/bias"),
        _vector("{p*}.LayerNorm.gamma", "{p*}/LayerNorm/scale"),
        _vector("{p*}.LayerNorm.beta", "{p*}/LayerNorm/bias"),
    ]
)

#: Hugging Face Llama-family names (``LlamaModel``, ``LlamaForCausalLM``,
#: Mistral, Qwen2) <-> Flax's: ``embed_tokens.weight`` -> ``embedding``;
#: ``*_proj.weight`` (attention and MLP projections) and ``lm_head.weight``
#: -> transposed ``kernel``; ``*norm.weight`` (RMSNorm, 1-D) -> ``scale``, as
#: ``flax.linen.RMSNorm`` names it. Rotary ``inv_freq`` buffers pass through.
HF_LLAMA = Layout.from_data(
    [
        _table("{p**}.embed_tokens.weight", "{p**}/embed_tokens/embedding"),
        _linear("{p*}_proj.weight", "{p*}_proj/kernel"),
        _vector("{p*}norm.weight", "{p*}norm/scale"),
        _vector("{p**}.norm.weight", "{p**}/norm/scale"),
        _linear("{p**}.lm_head.weight", "{p**}/lm_head/kernel"),
    ]
)

#: An orbax checkpoint of an nnx state stores each variable's array under
#: ``…/value``; this drops that level so nnx and linen trees merge alike.
NNX_STATE = Layout.from_data([{"checkpoint": "{p*}/value", "tree": "{p*}"}])

#: The layouts a recipe, :func:`~mats_jax.open_checkpoint` and the command
#: line accept by name.
PRESETS: dict[str, Layout] = {
    "identity": IDENTITY,
    "hf_linear": HF_LINEAR,
    "hf_bert": HF_BERT,
    "hf_llama": HF_LLAMA,
    "nnx_state": NNX_STATE,
}
