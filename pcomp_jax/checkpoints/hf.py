"""Hugging Face checkpoint directories: ``config.json`` + safetensors (single or sharded)."""

from __future__ import annotations

import json
import os
from contextlib import ExitStack

from safetensors import safe_open

from ..errors import CheckpointError
from ..model.config import ModelConfig
from ..model.llama import Weights
from .convert import build_weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def read_hf_config(path: str) -> ModelConfig:
    """Parses ``path/config.json``; errors name the directory and what is missing."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(
            f"{path!r} has no config.json; a Hugging Face checkpoint directory needs config.json "
            "and model.safetensors (or model.safetensors.index.json)"
        )
    try:
        with open(config_path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {config_path}: {err}") from err
    try:
        return ModelConfig.from_hf_dict(raw)
    except KeyError as err:
        raise CheckpointError(f"{config_path} lacks the field {err.args[0]!r}") from err


def safetensors_files(path: str) -> list[str]:
    """The weight files of a checkpoint directory, from the index when sharded."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as err:
            raise CheckpointError(f"cannot read the shard index {index}: {err}") from err
        missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return [os.path.join(path, n) for n in names]
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(f"{path!r} has no model.safetensors nor model.safetensors.index.json")


def load_hf_weights(path: str, cfg: ModelConfig, dtype) -> Weights:
    """Reads all safetensors shards of ``path`` into a ``Weights`` pytree of ``dtype``."""
    with ExitStack() as stack:
        where = {}
        for file in safetensors_files(path):
            handle = stack.enter_context(safe_open(file, framework="flax"))
            where.update({name: handle for name in handle.keys()})
        return build_weights(lambda n: where[n].get_tensor(n), where.__contains__, cfg, dtype)


def load_hf_tokenizer(path: str):
    """The directory's tokenizer through transformers, or None when it ships none."""
    if not any(os.path.isfile(os.path.join(path, n)) for n in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
