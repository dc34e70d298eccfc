"""The model's architecture: a frozen, hashable dataclass usable as a static jit argument.

Built from a Hugging Face ``config.json`` (``ModelConfig.from_hf_dict``) or from GGUF
metadata (``pcomp_jax.checkpoints.gguf``). Nothing here depends on a specific model:
layer, head and vocabulary sizes all come from the checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import CheckpointError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (Hugging Face ``rope_parameters`` / ``rope_scaling``).

    type: ``default``, ``linear`` (positions divided by ``factor``), ``dynamic``
      (NTK-aware base rescaled when a call's positions exceed ``original_window``), or
      ``llama3`` (per-frequency scaling with ``low_freq_factor`` / ``high_freq_factor``).
    freq_factors: optional explicit per-frequency divisors (GGUF ``rope_freqs`` tensor),
      applied on top of ``type``; length ``rotary_dim // 2``.
    """

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_window: int | None = None
    freq_factors: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise CheckpointError(
                f"rope type {self.type!r} is not supported; supported rope types: {', '.join(ROPE_TYPES)}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2).

    window: the trained context length (``max_position_embeddings``), W in docs/algorithm.md.
    qkv_bias: whether q/k/v projections carry biases (Qwen2).
    tie_embeddings: whether the output projection reuses the input embedding.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    window: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    qkv_bias: bool = False
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def queries_per_kv_head(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Reads a Hugging Face ``config.json`` dict (transformers 4.x or 5.x layout)."""
        archs = d.get("architectures") or []
        arch = archs[0] if archs else d.get("model_type", "?")
        if arch not in SUPPORTED_HF_ARCHITECTURES:
            raise CheckpointError(
                f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_HF_ARCHITECTURES)}"
            )
        sliding = d.get("sliding_window")
        if sliding is not None and d.get("use_sliding_window", arch != "Qwen2ForCausalLM"):
            raise CheckpointError(
                f"sliding-window attention (sliding_window={sliding}) is not supported; "
                "only full causal attention is (sliding_window: null)"
            )
        num_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // num_heads
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            window=d["max_position_embeddings"],
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope=_rope_from_hf(d),
            qkv_bias=bool(d.get("attention_bias", arch == "Qwen2ForCausalLM")),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


SUPPORTED_HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def _rope_from_hf(d: dict[str, Any]) -> RopeConfig:
    """transformers 5 writes ``rope_parameters`` (theta inside); 4.x ``rope_theta`` + ``rope_scaling``."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError("partial_rotary_factor != 1 is not supported")
    return RopeConfig(
        theta=float(theta),
        type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_window=params.get("original_max_position_embeddings", d.get("max_position_embeddings")),
    )
