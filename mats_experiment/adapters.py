"""Parameter-efficient fine-tuning of the BERT body: LoRA and IA³ adapters, folded into kernels.

An adapter tree maps a module's path in the body (``encoder/layer/0/attention/self/query``)
to its trained tensors; :func:`fold` writes the fine-tuned body they make,
in the body's own (Flax, ``(in, out)``) orientation, as a pure function of
the adapter, so a task's adapter trains through it and its statistics are
taken through it:

- **LoRA** (Hu et al., 2021) on the attention projections (query, key,
  value, output) and both MLP kernels: ``W + s · a b`` with ``a`` (in, r),
  ``b`` (r, out), ``s = alpha / r``; ``a`` starts at N(0, 1/in), ``b`` at
  zero, so training starts from the pretrained body.
- **IA³** (Liu et al., 2022) as the paper places it: the key and value
  projections' outputs rescaled, ``l ⊙ (x W + c)`` (the kernel's columns and
  the bias), and the MLP's down projection's inputs, ``(x ⊙ l) W`` (the
  kernel's rows); ``l`` starts at 1.

Examples:
  >>> import jax.numpy as jnp
  >>> body = {"encoder": {"layer": {"0": {"attention": {"self": {"key": {
  ...     "kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}}}}}}
  >>> ia3 = init("ia3", body)
  >>> list(ia3)
  ['encoder/layer/0/attention/self/key']
  >>> ia3 = {"encoder/layer/0/attention/self/key": jnp.array([1.0, 2.0, 0.0])}
  >>> fold("ia3", body, ia3)["encoder"]["layer"]["0"]["attention"]["self"]["key"]["bias"]
  Array([1., 2., 0.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mats_jax.tree import leaf_paths
from mats_jax.typing import Array, Params

__all__ = ["KINDS", "LORA_MODULES", "fold", "init", "modules"]

KINDS = ("full", "lora", "ia3")
"""How a task is fine-tuned: every parameter of the body, a LoRA or IA³ vectors."""

LORA_MODULES = (
    "attention/self/query",
    "attention/self/key",
    "attention/self/value",
    "attention/output/dense",
    "intermediate/dense",
    "output/dense",
)
"""The modules (path endings) LoRA adapts: every kernel of the attention and the MLP."""

_IA3_OUTPUTS = ("attention/self/key", "attention/self/value")
_IA3_INPUTS = ("output/dense",)  # the MLP's down projection


def _is(module: str, ending: str) -> bool:
    # "output/dense" must not take "attention/output/dense".
    return module.endswith("/" + ending) and not (
        ending == "output/dense" and module.endswith("attention/output/dense")
    )


def _kernel_modules(body: Params) -> dict[str, tuple[int, int]]:
    """Each module holding a 2-D ``kernel``: its path and the kernel's shape."""
    paths = jax.tree.leaves(leaf_paths(body))
    shapes = [tuple(x.shape) for x in jax.tree.leaves(body)]
    return {
        p.removesuffix("/kernel"): s
        for p, s in zip(paths, shapes, strict=True)
        if p.endswith("/kernel") and len(s) == 2
    }


def modules(kind: str, body: Params) -> dict[str, str]:
    """The body's modules an adapter of ``kind`` changes, and how
    (``"lora"``, ``"ia3_outputs"``, ``"ia3_inputs"``)."""
    if kind not in ("lora", "ia3"):
        raise ValueError(f"adapter kind must be 'lora' or 'ia3', got {kind!r}")
    out = {}
    for module in _kernel_modules(body):
        if kind == "lora" and any(_is(module, e) for e in LORA_MODULES):
            out[module] = "lora"
        elif kind == "ia3" and any(_is(module, e) for e in _IA3_OUTPUTS):
            out[module] = "ia3_outputs"
        elif kind == "ia3" and any(_is(module, e) for e in _IA3_INPUTS):
            out[module] = "ia3_inputs"
    if not out:
        raise ValueError(f"no module of the body takes a {kind} adapter")
    return out


def init(
    kind: str, body: Params, *, rank: int = 8, key: Array | None = None
) -> dict[str, Any]:
    """A fresh adapter: the pretrained body unchanged (LoRA's b = 0, IA³'s l = 1)."""
    shapes = _kernel_modules(body)
    out: dict[str, Any] = {}
    for i, (module, how) in enumerate(modules(kind, body).items()):
        n_in, n_out = shapes[module]
        if how == "lora":
            if key is None:
                raise ValueError("a LoRA's a starts random: init needs a key")
            a = jax.random.normal(jax.random.fold_in(key, i), (n_in, rank))
            out[module] = {
                "a": a / jnp.sqrt(float(n_in)),
                "b": jnp.zeros((rank, n_out), jnp.float32),
            }
        else:
            out[module] = jnp.ones(n_out if how == "ia3_outputs" else n_in, jnp.float32)
    return out


def fold(
    kind: str, body: Params, adapter: Mapping[str, Any], *, scale: float = 1.0
) -> Params:
    """The fine-tuned body: ``body`` with each adapted module changed (module docstring).

    ``scale`` is LoRA's ``s = alpha / r``. Differentiable in ``adapter``.
    """
    how = modules(kind, body)
    paths = jax.tree.leaves(leaf_paths(body))
    leaves, treedef = jax.tree.flatten(body)
    out = []
    for path, leaf in zip(paths, leaves, strict=True):
        module, _, name = path.rpartition("/")
        if module in adapter:
            t = adapter[module]
            if how[module] == "lora" and name == "kernel":
                leaf = leaf + scale * (t["a"] @ t["b"])
            elif how[module] == "ia3_outputs":  # columns of the kernel, and the bias
                leaf = leaf * (t[None, :] if name == "kernel" else t)
            elif how[module] == "ia3_inputs" and name == "kernel":
                leaf = leaf * t[:, None]
        out.append(leaf)
    return jax.tree.unflatten(treedef, out)
