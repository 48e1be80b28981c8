"""The two classifiers of the experiments: an MLP and a small vision transformer.

Both are flax.linen modules on (batch, 28, 28) images with the parameter tree
``{"body": ..., "head": {"kernel", "bias"}}``: ``body`` is the shared part
that merging combines, ``head`` the task's own linear classifier, kept per
task. The ViT has the layers real checkpoints have: a patch embedding,
attention with ``DenseGeneral`` query/key/value/output projections, LayerNorm,
and its blocks stacked by ``nn.scan`` (kernels of shape (layers, ...)).

Examples:
  >>> import jax, jax.numpy as jnp
  >>> model = build("vit", num_classes=3)
  >>> params = init_params(model, jax.random.key(0))
  >>> sorted(params)
  ['body', 'head']
  >>> model.apply({"params": params}, jnp.zeros((2, 28, 28))).shape
  (2, 3)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from mats_jax.typing import Array, Params

__all__ = [
    "ARCHITECTURES",
    "Classifier",
    "MLPBody",
    "ViTBody",
    "build",
    "features",
    "init_params",
]

IMAGE_SIDE = 28


class MLPBody(nn.Module):
    """784 → width → width, ReLU: the features a head classifies."""

    width: int = 128
    depth: int = 2

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = x.reshape(x.shape[0], -1)
        for i in range(self.depth):
            x = nn.relu(nn.Dense(self.width, name=f"dense_{i}")(x))
        return x


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``DenseGeneral`` projections.

    Query, key and value kernels have shape (width, heads, head_dim), the
    output kernel (heads, head_dim, width): the layout of Flax's and most JAX
    checkpoints' attention.
    """

    heads: int
    width: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        head_dim = self.width // self.heads

        def project(name: str) -> Array:
            return nn.DenseGeneral((self.heads, head_dim), name=name)(x)

        q, k, v = project("query"), project("key"), project("value")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        return nn.DenseGeneral(self.width, axis=(-2, -1), name="out")(mixed)


class Block(nn.Module):
    """A pre-LayerNorm transformer block, shaped for ``nn.scan`` (carry, None)."""

    width: int
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x: Array, _: Any) -> tuple[Array, None]:
        x = x + SelfAttention(self.heads, self.width, name="attention")(
            nn.LayerNorm(name="norm_attention")(x)
        )
        h = nn.LayerNorm(name="norm_mlp")(x)
        h = nn.Dense(self.mlp, name="mlp_in")(h)
        x = x + nn.Dense(self.width, name="mlp_out")(nn.gelu(h))
        return x, None


class ViTBody(nn.Module):
    """7×7 patches (16 tokens), position embedding, scanned blocks, mean-pool."""

    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp: int = 128
    patch: int = 7

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, p = x.shape[0], self.patch
        grid = IMAGE_SIDE // p
        patches = (
            x.reshape(b, grid, p, grid, p)
            .transpose(0, 1, 3, 2, 4)
            .reshape(b, -1, p * p)
        )
        x = nn.Dense(self.width, name="patch_embedding")(patches)
        x = x + self.param(
            "position", nn.initializers.normal(0.02), (grid * grid, self.width)
        )
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.depth,
        )
        x, _ = blocks(self.width, self.heads, self.mlp, name="blocks")(x, None)
        return nn.LayerNorm(name="norm")(x).mean(axis=1)


class Classifier(nn.Module):
    """A body and a linear head: ``{"body": ..., "head": ...}``."""

    body: nn.Module
    num_classes: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return nn.Dense(self.num_classes, name="head")(self.body(x))


ARCHITECTURES: dict[str, type[nn.Module]] = {"mlp": MLPBody, "vit": ViTBody}


def build(architecture: str, num_classes: int, **body_options: Any) -> Classifier:
    """The classifier for ``architecture`` ("mlp" or "vit") with ``num_classes`` outputs."""
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}"
        )
    body = ARCHITECTURES[architecture](name="body", **body_options)
    return Classifier(body=body, num_classes=num_classes)


def init_params(model: Classifier, key: Array) -> Params:
    """Fresh parameters ``{"body", "head"}`` for (n, 28, 28) inputs."""
    return model.init(key, jnp.zeros((1, IMAGE_SIDE, IMAGE_SIDE)))["params"]


def features(model: Classifier, body_params: Params, x: ArrayLike) -> Array:
    """The body's output (what the head sees) for a batch of images."""
    body = dataclasses.replace(model.body, parent=None, name=None)
    return jnp.asarray(body.apply({"params": body_params}, jnp.asarray(x)))
