"""pcomp_jax: ParallelComp long-context inference for Llama-family models in JAX.

Public API (a contract): ``load_model``, ``forward``, ``generate_full``, ``answer``,
``ParallelCompConfig``; the pipeline's pure functions live in ``pcomp_jax.prefill``,
``pcomp_jax.compress`` and ``pcomp_jax.chunking``.
"""

from . import chunking, compress, prefill
from .calibrate import CalibrationRule
from .checkpoints import DEFAULT_MODEL, Model, load_model, save_model
from .decode import Generation, forward, generate_full
from .errors import CheckpointError, InputTooLongError, PcompError
from .config import ConfigError, ParallelCompConfig, load_config
from .model.config import ModelConfig, RopeConfig
from .pipeline import Answer, answer

__all__ = [
    "Answer",
    "CalibrationRule",
    "ConfigError",
    "ParallelCompConfig",
    "answer",
    "chunking",
    "compress",
    "load_config",
    "prefill",
    "save_model",
    "DEFAULT_MODEL",
    "CheckpointError",
    "Generation",
    "InputTooLongError",
    "Model",
    "ModelConfig",
    "PcompError",
    "RopeConfig",
    "forward",
    "generate_full",
    "load_model",
]
