"""Checkpoint input and output: orbax, Flax msgpack and safetensors, layouts between them, and PEFT adapters."""

from mats_jax.io.adapters import (
    Adapter,
    LoraExtraction,
    extract_lora,
    is_adapter,
    load_adapter,
    lora_modules,
    open_adapter,
    read_adapter,
    save_lora,
)
from mats_jax.io.checkpoint import (
    FORMATS,
    Checkpoint,
    CheckpointWriter,
    LeafInfo,
    atomic_output,
    detect_format,
    load_checkpoint,
    model_folder_files,
    open_checkpoint,
    save_checkpoint,
    save_model_folder,
)
from mats_jax.io.errors import CheckpointError
from mats_jax.io.layout import (
    HF_BERT,
    HF_LINEAR,
    HF_LLAMA,
    IDENTITY,
    NNX_STATE,
    PRESETS,
    Layout,
    LayoutError,
    Rule,
)
from mats_jax.io.msgpack import read_msgpack, write_msgpack
from mats_jax.io.orbax import load_orbax, save_orbax
from mats_jax.io.safetensors import SafetensorsReader, SafetensorsWriter
from mats_jax.io.statistics import StatisticsReader

__all__ = [
    "FORMATS",
    "HF_BERT",
    "HF_LINEAR",
    "HF_LLAMA",
    "IDENTITY",
    "NNX_STATE",
    "PRESETS",
    "Adapter",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriter",
    "Layout",
    "LayoutError",
    "LeafInfo",
    "LoraExtraction",
    "Rule",
    "SafetensorsReader",
    "SafetensorsWriter",
    "StatisticsReader",
    "atomic_output",
    "detect_format",
    "extract_lora",
    "is_adapter",
    "load_adapter",
    "load_checkpoint",
    "load_orbax",
    "lora_modules",
    "model_folder_files",
    "open_adapter",
    "open_checkpoint",
    "read_adapter",
    "read_msgpack",
    "save_checkpoint",
    "save_lora",
    "save_model_folder",
    "save_orbax",
    "write_msgpack",
]
