"""A BERT encoder in flax.linen that reads and writes Hugging Face checkpoints.

The modules are named as the Hugging Face ``BertModel`` names its tensors, so
the parameter tree is the checkpoint's names split at the dots, with Flax's
leaf names (``kernel`` for a linear weight, transposed to (in, out);
``embedding`` for an embedding table, not transposed; ``scale`` for a
LayerNorm weight). :data:`LAYOUT` names the library's preset for that
(``hf_bert``), and
:func:`load_body` reads a checkpoint through :func:`mats_jax.load_checkpoint`
with it, keeping the first ``layers`` layers.

The classifier (:class:`TextClassifier`) pools the last hidden states (the
mean over the real tokens of the attention mask, or the [CLS] state) and
applies a linear head: the
tree is ``{"body": <BertModel's weights>, "head": {"kernel", "bias"}}``, as
the experiment models have (:mod:`mats_experiment.models`). Its input is one
int32 array of shape (batch, 2, length): token ids and the attention mask,
packed so that the experiments' training loop can index examples of one
array.

.. math::

   h = \\mathrm{LN}(E_{\\text{word}}[t] + E_{\\text{pos}}[i] + E_{\\text{type}}[0]),\\quad
   h \\leftarrow \\mathrm{LN}(h + \\mathrm{Attn}(h)),\\quad
   h \\leftarrow \\mathrm{LN}(h + W_2\\,\\mathrm{gelu}(W_1 h)),\\quad
   \\text{logits} = W_{\\text{head}} \\frac{\\sum_i m_i h_i}{\\sum_i m_i} + b

Examples:
  >>> import jax, jax.numpy as jnp
  >>> config = BertConfig(vocab_size=10, hidden_size=8, heads=2, intermediate_size=16, layers=1)
  >>> model = TextClassifier(config, num_classes=3)
  >>> params = init_params(model, jax.random.key(0), length=4)
  >>> sorted(params["body"]["encoder"]["layer"]["0"]["attention"]["self"])
  ['key', 'query', 'value']
  >>> model.apply({"params": params}, jnp.ones((2, 2, 4), jnp.int32)).shape
  (2, 3)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import mats_jax
from mats_jax.tree import path_str
from mats_jax.typing import Array, Params

__all__ = [
    "LAYOUT",
    "POOLINGS",
    "BertBody",
    "BertConfig",
    "BertError",
    "TextClassifier",
    "body_features",
    "config_from_folder",
    "hidden_states",
    "init_params",
    "load_body",
    "mean_pool",
    "pack",
    "pool",
    "save_folder",
    "tokenize",
    "transformers_hidden_states",
]

LAYOUT = "hf_bert"
"""The library's layout preset for Hugging Face BERT names ⇄ this module's tree.

``*_embeddings.weight`` ⇄ ``*_embeddings/embedding`` (not transposed), 1-D
``weight`` ⇄ ``scale`` (LayerNorm), 2-D ``weight`` ⇄ ``kernel`` transposed
from torch's (out, in) to Flax's (in, out); biases keep their names.
"""

MASK_VALUE = -1e9
"""Added to the attention logits of padding keys (their softmax weight is 0)."""


class BertError(ValueError):
    """A checkpoint or configuration this BERT cannot use: the message says which."""


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The sizes of a BERT encoder (the names of a Hugging Face ``config.json``)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    heads: int = 12
    intermediate_size: int = 1536
    layers: int = 6
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


def config_from_folder(folder: str | os.PathLike[str], layers: int) -> BertConfig:
    """The :class:`BertConfig` of a Hugging Face folder, keeping its first ``layers``.

    Raises:
      BertError: if ``config.json`` is missing, is not a BERT's, or has fewer
        layers than asked for.
    """
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise BertError(f"{path}: no config.json; expected a Hugging Face BERT folder")
    with open(path) as f:
        raw = json.load(f)
    if raw.get("model_type") != "bert" or raw.get("hidden_act", "gelu") != "gelu":
        raise BertError(
            f"{path}: model_type {raw.get('model_type')!r}, hidden_act "
            f"{raw.get('hidden_act')!r}; expected a BERT with hidden_act 'gelu'"
        )
    if not 1 <= layers <= raw["num_hidden_layers"]:
        raise BertError(
            f"{path}: has {raw['num_hidden_layers']} layers; asked for {layers} "
            f"(expected 1…{raw['num_hidden_layers']})"
        )
    return BertConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        heads=raw["num_attention_heads"],
        intermediate_size=raw["intermediate_size"],
        layers=layers,
        max_position_embeddings=raw["max_position_embeddings"],
        type_vocab_size=raw["type_vocab_size"],
        layer_norm_eps=raw["layer_norm_eps"],
    )


class SelfAttention(nn.Module):
    """``attention.self``: query, key and value projections, softmax over unmasked keys."""

    config: BertConfig

    @nn.compact
    def __call__(self, h: Array, mask: Array) -> Array:
        c = self.config
        head_dim = c.hidden_size // c.heads

        def project(name: str) -> Array:
            x = nn.Dense(c.hidden_size, name=name)(h)
            return x.reshape(*x.shape[:-1], c.heads, head_dim)

        q, k, v = project("query"), project("key"), project("value")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
        logits = logits + (1.0 - mask[:, None, None, :]) * MASK_VALUE
        mixed = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        return mixed.reshape(*h.shape)


class DenseNorm(nn.Module):
    """``*.output``: a dense layer, then LayerNorm of the residual sum."""

    width: int
    eps: float

    @nn.compact
    def __call__(self, x: Array, residual: Array) -> Array:
        y = nn.Dense(self.width, name="dense")(x)
        return nn.LayerNorm(epsilon=self.eps, name="LayerNorm")(y + residual)


class Attention(nn.Module):
    """``attention``: self-attention, then its output projection and norm."""

    config: BertConfig

    @nn.compact
    def __call__(self, h: Array, mask: Array) -> Array:
        mixed = SelfAttention(self.config, name="self")(h, mask)
        return DenseNorm(
            self.config.hidden_size, self.config.layer_norm_eps, name="output"
        )(mixed, h)


class Intermediate(nn.Module):
    """``intermediate``: the feed-forward expansion with the exact (erf) GELU."""

    width: int

    @nn.compact
    def __call__(self, h: Array) -> Array:
        return nn.gelu(nn.Dense(self.width, name="dense")(h), approximate=False)


class Layer(nn.Module):
    """``encoder.layer.<i>``: post-LayerNorm attention and feed-forward blocks."""

    config: BertConfig

    @nn.compact
    def __call__(self, h: Array, mask: Array) -> Array:
        c = self.config
        h = Attention(c, name="attention")(h, mask)
        x = Intermediate(c.intermediate_size, name="intermediate")(h)
        return DenseNorm(c.hidden_size, c.layer_norm_eps, name="output")(x, h)


class Layers(nn.Module):
    """``encoder.layer``: the layers, named by their index as in the checkpoint."""

    config: BertConfig

    @nn.compact
    def __call__(self, h: Array, mask: Array) -> Array:
        for i in range(self.config.layers):
            h = Layer(self.config, name=str(i))(h, mask)
        return h


class Encoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h: Array, mask: Array) -> Array:
        return Layers(self.config, name="layer")(h, mask)


class Embeddings(nn.Module):
    """``embeddings``: word + position + token type (all type 0), then LayerNorm."""

    config: BertConfig

    @nn.compact
    def __call__(self, ids: Array) -> Array:
        c = self.config
        word = nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(ids)
        position = nn.Embed(
            c.max_position_embeddings, c.hidden_size, name="position_embeddings"
        )(jnp.arange(ids.shape[-1]))
        kind = nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(
            jnp.zeros_like(ids)
        )
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(
            word + position[None] + kind
        )


class BertBody(nn.Module):
    """``BertModel`` without its pooler: the last hidden states, (batch, length, width)."""

    config: BertConfig

    @nn.compact
    def __call__(self, ids: Array, mask: Array) -> Array:
        h = Embeddings(self.config, name="embeddings")(ids)
        return Encoder(self.config, name="encoder")(h, mask.astype(h.dtype))


def mean_pool(hidden: Array, mask: Array) -> Array:
    """The mean of ``hidden`` over the positions where ``mask`` is 1.

    Examples:
      >>> h = jnp.arange(6.0).reshape(1, 3, 2)
      >>> mean_pool(h, jnp.array([[1, 1, 0]])).tolist()
      [[1.0, 2.0]]
    """
    m = mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(axis=-2) / jnp.maximum(m.sum(axis=-2), 1.0)


POOLINGS = ("mean", "cls")
"""``mean``: the mean over real tokens; ``cls``: the first ([CLS]) token's state."""


def pool(hidden: Array, mask: Array, pooling: str) -> Array:
    """The features a head classifies: :func:`mean_pool`, or the [CLS] state."""
    if pooling == "mean":
        return mean_pool(hidden, mask)
    if pooling == "cls":
        return hidden[..., 0, :]
    raise BertError(f"unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")


class TextClassifier(nn.Module):
    """BERT body, pooling (:data:`POOLINGS`), linear head on packed (batch, 2, length) input."""

    config: BertConfig
    num_classes: int
    pooling: str = "mean"

    @nn.compact
    def __call__(self, packed: Array) -> Array:
        ids, mask = packed[:, 0], packed[:, 1]
        hidden = BertBody(self.config, name="body")(ids, mask)
        return nn.Dense(self.num_classes, name="head")(pool(hidden, mask, self.pooling))


def init_params(model: TextClassifier, key: Array, length: int = 8) -> Params:
    """Fresh parameters ``{"body", "head"}`` (random: use :func:`load_body` for the body)."""
    return model.init(key, jnp.ones((1, 2, length), jnp.int32))["params"]


def body_features(
    config: BertConfig, body: Params, packed: Array, pooling: str = "mean"
) -> Array:
    """The pooled last hidden states (what the head sees) of packed inputs."""
    x = jnp.asarray(packed)
    hidden: Array = BertBody(config).apply({"params": body}, x[:, 0], x[:, 1])  # type: ignore[assignment]
    return pool(hidden, x[:, 1], pooling)


def load_body(folder: str | os.PathLike[str], layers: int) -> tuple[BertConfig, Params]:
    """The config and the first ``layers`` layers' weights of a Hugging Face BERT folder.

    Read through :func:`mats_jax.load_checkpoint` with :data:`LAYOUT`; the
    pooler and the int64 ``position_ids`` buffer (not a weight) are left out.

    Raises:
      BertError: if a weight the body needs is missing or has another shape.
    """
    config = config_from_folder(folder, layers)
    path = os.path.join(folder, "model.safetensors")
    tree = mats_jax.load_checkpoint(path, layout=LAYOUT)
    tree = tree.get("bert", tree)  # BertFor* checkpoints prefix their names
    expected = jax.eval_shape(
        lambda: BertBody(config).init(
            jax.random.key(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4))
        )["params"]
    )
    body = {
        "embeddings": {
            k: v for k, v in tree.get("embeddings", {}).items() if k != "position_ids"
        },
        "encoder": {
            "layer": {
                str(i): tree.get("encoder", {}).get("layer", {}).get(str(i))
                for i in range(layers)
            }
        },
    }
    flat_expected = _named_leaves(expected)
    flat_body = _named_leaves(body)
    for name, want in flat_expected.items():
        got = flat_body.get(name)
        if got is None or tuple(np.shape(got)) != tuple(want.shape):
            raise BertError(
                f"{path}: tree leaf {name!r} is "
                + ("missing" if got is None else f"of shape {tuple(np.shape(got))}")
                + f"; expected shape {tuple(want.shape)}"
            )
    return config, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), body)


def _named_leaves(tree: Any) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {path_str(path): leaf for path, leaf in flat}


def tokenize(tokenizer: Any, texts: Sequence[str], length: int) -> np.ndarray:
    """Packed (n, 2, length) int32 token ids and attention mask, truncated and padded.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` (left unchanged: a copy is
    set to truncate at ``length``, with its own padding off, so that [SEP]
    stays the last real token); ids include the special tokens ([CLS] …
    [SEP]) and are padded with 0 (mask 0).
    """
    own = type(tokenizer).from_str(tokenizer.to_str())
    own.no_padding()
    own.enable_truncation(max_length=length)
    return pack([e.ids for e in own.encode_batch(list(texts))], length)


def pack(ids: Sequence[Sequence[int]], length: int) -> np.ndarray:
    """Token id lists → packed (n, 2, length) ids and mask; an over-long list keeps its last id.

    The last id of each list ([SEP]) stays last when a list is cut, as
    tokenizers' own truncation does.

    Examples:
      >>> pack([[101, 7, 8, 102], [101, 102]], 3).tolist()
      [[[101, 7, 102], [1, 1, 1]], [[101, 102, 0], [1, 1, 0]]]
    """
    out = np.zeros((len(ids), 2, length), np.int32)
    for i, seq in enumerate(ids):
        seq = list(seq) if len(seq) <= length else [*seq[: length - 1], seq[-1]]
        out[i, 0, : len(seq)] = seq
        out[i, 1, : len(seq)] = 1
    return out


def save_folder(
    path: str | os.PathLike[str],
    body: Params,
    like: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> None:
    """Writes ``body`` as a Hugging Face ``BertModel`` folder that ``transformers`` loads.

    Through :func:`mats_jax.save_model_folder` with :data:`LAYOUT` (weights
    with ``like``'s metadata, its config and tokenizer files copied); the
    pooler, which the body does not use, is ``like``'s own, and config.json
    says the number of layers ``body`` has.
    """
    base = mats_jax.load_checkpoint(
        os.path.join(like, "model.safetensors"), layout=LAYOUT
    )
    base = base.get("bert", base)
    tree: dict[str, Any] = dict(jax.tree.map(np.asarray, body))
    if "pooler" in base:
        tree["pooler"] = base["pooler"]
    mats_jax.save_model_folder(
        path, tree, like=like, layout=LAYOUT, overwrite=overwrite
    )
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        raw = json.load(f)
    raw["num_hidden_layers"] = len(body["encoder"]["layer"])
    with open(config_path, "w") as f:
        json.dump(raw, f, indent=2)


def transformers_hidden_states(
    folder: str | os.PathLike[str], packed: np.ndarray
) -> np.ndarray:
    """The last hidden states of ``transformers.BertModel`` read from ``folder`` (PyTorch, CPU)."""
    import torch
    import transformers

    model = transformers.BertModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(packed[:, 0], np.int64)),
            attention_mask=torch.as_tensor(np.asarray(packed[:, 1], np.int64)),
        )
    return out.last_hidden_state.numpy()


def hidden_states(config: BertConfig, body: Params, packed: np.ndarray) -> np.ndarray:
    """This module's last hidden states of packed inputs (the twin of :func:`transformers_hidden_states`)."""
    x = jnp.asarray(packed)
    return np.asarray(BertBody(config).apply({"params": body}, x[:, 0], x[:, 1]))
