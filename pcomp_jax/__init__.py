"""pcomp_jax: ParallelComp long-context inference for Llama-family models in JAX.

Public API (a contract): ``load_model``, ``forward``, ``generate_full``, ``answer``,
``read_document`` (a context read once, ``Document.ask`` per question), ``answer_batch``,
``ParallelCompConfig``, ``plan`` (a config resolved for a model), and ``Method`` /
``register_method`` for methods of your own. The pipeline's pure functions, for composing
your own, live in ``pcomp_jax.chunking`` (rows), ``pcomp_jax.prefill`` (sharded chunk
prefill, running top-k), ``pcomp_jax.compress`` (chunk and token scorers),
``pcomp_jax.merge`` (stage 2: the merged cache and the question on it),
``pcomp_jax.decode`` (greedy decoding, the evictions after the merge) and
``pcomp_jax.sharding`` (mesh, logical axes); ``pcomp_jax.pipeline`` runs them as
``run_stage1`` and ``run_stage2``.
"""

from . import _startup

if _startup.started_as_command():  # `python -m pcomp_jax.<command>`: Ctrl-C while importing is one line
    _startup.quiet_interrupts_while_importing()

from . import chunking, compress, decode, merge, methods, pipeline, plans, prefill, sharding
from .calibrate import CalibrationRule
from .checkpoints import DEFAULT_MODEL, Model, load_model, save_model
from .decode import Generation, forward, generate_full
from .errors import CheckpointError, InputTooLongError, PcompError
from .config import ConfigError, ParallelCompConfig, load_config
from .methods import Method, register_method
from .model.config import ModelConfig, RopeConfig
from .pipeline import Answer, answer
from .plans import Plan, plan
from .document import Document, answer_batch, read_document

__all__ = [
    "Answer",
    "Document",
    "CalibrationRule",
    "ConfigError",
    "Method",
    "ParallelCompConfig",
    "answer",
    "answer_batch",
    "read_document",
    "chunking",
    "compress",
    "decode",
    "merge",
    "pipeline",
    "plan",
    "plans",
    "Plan",
    "load_config",
    "methods",
    "prefill",
    "register_method",
    "save_model",
    "sharding",
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

_startup.restore_interrupts()
