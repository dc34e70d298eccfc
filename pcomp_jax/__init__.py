"""pcomp_jax: ParallelComp long-context inference for Llama-family models in JAX.

Public API (a contract): ``load_model``, ``forward``, ``generate_full``.
"""

from .checkpoints import DEFAULT_MODEL, Model, load_model
from .decode import Generation, forward, generate_full
from .errors import CheckpointError, InputTooLongError, PcompError
from .model.config import ModelConfig, RopeConfig

__all__ = [
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
